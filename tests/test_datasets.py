"""Tests of cellflow.datasets: the synthetic generator, its ground truth and the file readers."""

from __future__ import annotations

import itertools

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import cellflow as cf
from cellflow._errors import CellflowKeyError, CellflowValueError
from cellflow.datasets import SyntheticTruth, read, synthetic


@pytest.fixture(scope="module")
def default_data():
    return synthetic()


@pytest.fixture(scope="module")
def small_data():
    return synthetic(n_features=8, n_states=3, n_patients=2, n_drugs=3, n_control=60, n_cells=40, seed=3)


# --------------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------------
def test_same_seed_identical_different_seed_differs():
    kw = dict(n_features=6, n_patients=2, n_drugs=3, n_control=30, n_cells=20)
    a1, t1 = synthetic(seed=7, **kw)
    a2, t2 = synthetic(seed=7, **kw)
    a3, t3 = synthetic(seed=8, **kw)
    np.testing.assert_array_equal(a1.X, a2.X)
    pd.testing.assert_frame_equal(a1.obs, a2.obs)
    assert t1.synergy_pairs == t2.synergy_pairs
    assert a1.shape == a3.shape
    assert not np.allclose(a1.X, a3.X)

    x = t1.sample_control(50, "P1", seed=1)
    np.testing.assert_array_equal(x, t2.sample_control(50, "P1", seed=1))
    np.testing.assert_array_equal(t1(x, "A+C", seed=2), t2(x, "A+C", seed=2))
    np.testing.assert_array_equal(t1.sample("B", 30, "P2", seed=4), t2.sample("B", 30, "P2", seed=4))
    assert not np.allclose(t1(x, "A+C", seed=2), t3(x, "A+C", seed=2))
    assert not np.allclose(t1(x, "A", seed=2), t1(x, "A", seed=3))  # noise seed matters
    assert not np.allclose(x, t1.sample_control(50, "P1", seed=2))


# --------------------------------------------------------------------------------------------------
# layout of the AnnData
# --------------------------------------------------------------------------------------------------
def test_default_layout(default_data):
    adata, truth = default_data
    n_conditions_per_patient = 4 * 3 + 6  # singles x doses + all pairs at one dose
    assert adata.shape == (4 * (400 + 150 * n_conditions_per_patient), 20)
    assert adata.X.dtype == np.float32
    assert list(adata.var_names) == [f"f{j}" for j in range(20)]
    assert list(adata.obs.columns) == ["condition", "dose", "patient", "state"]
    obs = adata.obs
    for col in ("condition", "patient", "state"):
        assert isinstance(obs[col].dtype, pd.CategoricalDtype)
    assert list(obs["condition"].cat.categories) == [
        "control", "A", "B", "C", "D", "A+B", "A+C", "A+D", "B+C", "B+D", "C+D",
    ]
    assert list(obs["patient"].cat.categories) == ["P1", "P2", "P3", "P4"]
    assert list(obs["state"].cat.categories) == ["S0", "S1", "S2"]
    assert all(isinstance(v, str) for v in obs["dose"])
    assert set(obs.loc[obs["condition"] == "control", "dose"]) == {"0"}
    assert set(obs.loc[obs["condition"] == "A", "dose"]) == {"0.1", "1.0", "10.0"}
    assert set(obs.loc[obs["condition"] == "B+D", "dose"]) == {"1.0+1.0"}
    assert truth.drugs == ("A", "B", "C", "D")
    assert truth.patients == ("P1", "P2", "P3", "P4")
    assert truth.n_features == 20
    assert len(truth.synergy_pairs) == 3  # about half of the 6 pairs
    assert adata.uns["synthetic"]["seed"] == 0
    assert adata.obs_names.is_unique


def test_every_patient_has_every_condition(default_data):
    adata, truth = default_data
    counts = adata.obs.groupby(["patient", "condition", "dose"], observed=True).size()
    for p in truth.patients:
        assert counts[(p, "control", "0")] == 400
        for k in truth.drugs:
            for d in ("0.1", "1.0", "10.0"):
                assert counts[(p, k, d)] == 150
        for a, b in itertools.combinations(truth.drugs, 2):
            assert counts[(p, f"{a}+{b}", "1.0+1.0")] == 150
    assert len(counts) == 4 * (1 + 12 + 6)
    # every state is present in every patient's controls (weights >= 0.1)
    ctrl = adata.obs[adata.obs["condition"] == "control"]
    assert (ctrl.groupby(["patient", "state"], observed=False).size() > 0).all()
    assert (truth.state_weights >= 0.1 - 1e-12).all()


def test_explicit_combinations_and_doses():
    adata, truth = synthetic(
        n_features=5, n_patients=2, n_drugs=3, doses=(1.0, 3.0), combinations=[("C", "A"), "B+C"],
        synergy_pairs=[("A", "C")], combination_doses=(1.0, (0.5, 2.0)), n_control=10, n_cells=5,
    )
    assert list(adata.obs["condition"].cat.categories) == ["control", "A", "B", "C", "A+C", "B+C"]
    assert set(adata.obs.loc[adata.obs["condition"] == "A+C", "dose"]) == {"1.0+1.0", "0.5+2.0"}
    assert truth.synergy_pairs == (("A", "C"),)
    assert adata.n_obs == 2 * (10 + 5 * (3 * 2 + 2 * 2))


def test_invalid_arguments_name_the_value():
    with pytest.raises(CellflowKeyError, match="'Q'"):
        synthetic(n_drugs=3, combinations=[("A", "Q")])
    with pytest.raises(CellflowKeyError, match="'Z'"):
        synthetic(n_drugs=3, synergy_pairs=["A+Z"])
    with pytest.raises(CellflowValueError, match="some_pairs"):
        synthetic(combinations="some_pairs")
    with pytest.raises(CellflowValueError, match="n_cells"):
        synthetic(n_cells=-1)


# --------------------------------------------------------------------------------------------------
# the truth
# --------------------------------------------------------------------------------------------------
def test_truth_errors(small_data):
    _, truth = small_data
    x = truth.sample_control(4, "P1")
    with pytest.raises(CellflowKeyError, match=r"'Z'.*'A', 'B', 'C'"):
        truth(x, "A+Z")
    with pytest.raises(CellflowValueError, match=r"'1.0\+2.0\+3.0'.*3 part"):
        truth(x, "A+B", dose="1.0+2.0+3.0")
    with pytest.raises(CellflowValueError, match="shape"):
        truth(x[:, :3], "A")
    with pytest.raises(CellflowKeyError, match="P7"):
        truth.sample_control(3, "P7")
    with pytest.raises(CellflowValueError):
        truth(x, "A", dose=-1.0)


def test_truth_control_and_dose_forms(small_data):
    _, truth = small_data
    x = truth.sample_control(100, "P2", seed=5)
    out = truth(x, "control")
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_array_equal(out, x)
    # None == 1.0 per member == "1.0+1.0"; doses are aligned with the members as written
    ref = truth(x, "A+B", seed=1)
    np.testing.assert_array_equal(ref, truth(x, "A+B", dose=1.0, seed=1))
    np.testing.assert_array_equal(ref, truth(x, "B+A", dose="1.0+1.0", seed=1))
    np.testing.assert_allclose(
        truth(x, "A+B", dose="2.0+0.5", noise=False), truth(x, "B+A", dose="0.5+2.0", noise=False), atol=1e-6
    )
    # unseen dose, held-out triple
    assert np.isfinite(truth(x, "A+B+C", dose="0.3+7.0+1e+01")).all()


def test_drug_e_pairs_like_any_other():
    # the "+" of a dose's exponent ("1e+05") must not protect a member name ending in "e"
    adata, truth = synthetic(n_features=4, n_patients=1, n_drugs=6, doses=(1.0,), n_control=20, n_cells=5, seed=0)
    assert {"D+E", "E+F"} <= set(adata.obs["condition"].astype(str))
    x = truth.sample_control(10, "P1", seed=0)
    np.testing.assert_allclose(
        truth(x, "E+F", dose="1e+05+0.5", noise=False), truth(x, "F+E", dose="0.5+1e+05", noise=False), atol=1e-5
    )
    assert truth.parse("E+F", "1e+05+0.5") == {"E": 1e5, "F": 0.5}
    synthetic(n_features=4, n_patients=1, n_drugs=6, combinations=["E+F"], synergy_pairs=["E+F"], n_control=5, n_cells=5)


def test_held_out_synergy_vs_additive():
    # only A+B measured; C+D and the rest are held out
    adata, truth = synthetic(
        n_features=10, n_patients=2, n_drugs=4, combinations=[("A", "B")], synergy_pairs=[("C", "D"), ("A", "B")],
        n_control=20, n_cells=10, seed=1,
    )
    assert "C+D" not in adata.obs["condition"].cat.categories
    x, states = truth.sample_control(2000, "P1", seed=0, return_state=True)
    for pair, synergistic in (("C+D", True), ("A+C", False), ("B+D", False)):
        a, b = pair.split("+")
        combined = truth(x, pair, noise=False).astype(np.float64) - x
        additive = truth.displacement(x, a) + truth.displacement(x, b)
        gap = np.linalg.norm(combined - additive, axis=1).mean()
        if synergistic:
            assert gap > 0.5, gap  # in within-state std units
            # the interaction is state-dependent: clearly non-zero on average within each state
            for s in range(truth.n_states):
                assert np.linalg.norm((combined - additive)[states == s].mean(0)) > 0.5
        else:
            assert gap < 1e-4, gap
    # with noise, the mean displacement of many cells agrees too
    noisy = truth(x, "A+C", seed=3).astype(np.float64) - x
    additive = truth.displacement(x, "A") + truth.displacement(x, "C")
    assert np.linalg.norm(noisy.mean(0) - additive.mean(0)) < 0.1


def test_samples_without_synergy_are_the_additive_truth():
    _, truth = synthetic(n_features=6, n_patients=2, n_drugs=3, synergy_pairs=[("A", "B")], n_control=10, n_cells=5, seed=4)
    # the same generator without synergy pairs (its other parameters come from their own streams)
    additive = SyntheticTruth(truth.n_features, truth.n_states, truth.n_patients, truth.n_drugs, synergy_pairs=[],
                              noise_std=truth.noise_std, seed=truth.seed)
    for condition in ("A+B", "A+C", "B"):
        np.testing.assert_array_equal(truth.sample(condition, 40, "P2", seed=9, synergy=False),
                                      additive.sample(condition, 40, "P2", seed=9))
    x = truth.sample_control(40, "P1", seed=1)
    np.testing.assert_array_equal(truth(x, "A+B", seed=2, synergy=False), additive(x, "A+B", seed=2))
    assert not np.allclose(truth.sample("A+B", 40, "P2", seed=9), additive.sample("A+B", 40, "P2", seed=9))


def test_dose_response_monotone(small_data):
    _, truth = small_data
    x = truth.sample_control(1000, "P1", seed=2)
    for drug in truth.drugs:
        norms = [np.linalg.norm(truth.displacement(x, drug, d).mean(0)) for d in (0.0, 0.01, 0.1, 1.0, 10.0, 100.0)]
        assert norms[0] == 0.0
        assert all(b > a for a, b in zip(norms, norms[1:])), (drug, norms)
        assert norms[-1] > 1.5  # saturating response of a few within-state std units
    hills = truth.hill("A", np.array([0.0, 0.1, 1.0, 10.0, 1e6]))
    assert np.all(np.diff(hills) > 0) and hills[0] == 0 and hills[-1] < 1 + 1e-12


def test_response_depends_on_state(small_data):
    _, truth = small_data
    x, states = truth.sample_control(3000, "P1", seed=0, return_state=True)
    for drug in truth.drugs:
        disp = truth.displacement(x, drug, 10.0)
        means = [disp[states == s].mean(0) for s in range(truth.n_states)]
        gaps = [np.linalg.norm(means[s] - means[t]) for s, t in itertools.combinations(range(truth.n_states), 2)]
        assert min(gaps) > 0.5, (drug, gaps)
    # and it is not a per-state constant either: it varies within a state (nonlinear in x)
    disp = truth.displacement(x, "A", 1.0)
    assert disp[states == 0].std(0).mean() > 0.02


def test_response_magnitude_vs_within_state_noise(default_data):
    adata, truth = default_data
    obs = adata.obs
    is_ctrl = (obs["condition"] == "control").to_numpy()
    ctrl_states = obs.loc[is_ctrl, "state"].to_numpy()
    within_std = np.mean([np.sqrt(adata.X[is_ctrl][ctrl_states == s].var(0).mean()) for s in truth.states])
    assert 0.8 < within_std < 1.3
    x = truth.sample_control(2000, "P1")
    for cond in ("A", "B", "C", "D", "A+B", "C+D"):
        shift = np.linalg.norm(truth.displacement(x, cond, 1.0).mean(0))
        assert 0.5 * within_std < shift < 5 * within_std, (cond, shift)


def _hotelling(data: np.ndarray, reference: np.ndarray) -> float:
    """n (mean_data - mean_ref)^T Cov_ref^-1 (mean_data - mean_ref): ~ chi^2(d) when they agree."""
    diff = data.mean(0) - reference.mean(0)
    return float(len(data) * diff @ np.linalg.solve(np.cov(reference, rowvar=False), diff))


def test_sample_matches_anndata(default_data):
    adata, truth = default_data
    obs = adata.obs
    for cond, dose, patient in (("A+B", "1.0+1.0", "P2"), ("C", "10.0", "P3"), ("control", "0", "P1")):
        mask = ((obs["condition"] == cond) & (obs["dose"] == dose) & (obs["patient"] == patient)).to_numpy()
        data = adata.X[mask].astype(np.float64)
        sampled = truth.sample(cond, 10000, patient, dose=None if cond == "control" else dose, seed=11)
        assert sampled.dtype == np.float32 and sampled.shape == (10000, 20)
        # chi^2 with 20 degrees of freedom: 99.9% quantile ~45
        stat = _hotelling(data, sampled.astype(np.float64))
        assert stat < 50, (cond, stat)
        # the check has power: the untreated population of the same patient is far off
        if cond != "control":
            other = truth.sample_control(10000, patient, seed=11).astype(np.float64)
            assert _hotelling(data, other) > 200


# --------------------------------------------------------------------------------------------------
# read
# --------------------------------------------------------------------------------------------------
def _table(adata: ad.AnnData) -> pd.DataFrame:
    df = pd.DataFrame(adata.X, columns=list(adata.var_names), index=adata.obs_names)
    return pd.concat([df, adata.obs[["condition", "dose", "patient"]].astype(str)], axis=1)


def test_read_h5ad_roundtrip(small_data, tmp_path):
    adata, _ = small_data
    path = tmp_path / "cells.h5ad"
    adata.copy().write_h5ad(path)
    back = read(path)
    np.testing.assert_array_equal(back.X, adata.X)
    assert list(back.obs_names) == list(adata.obs_names)
    for col in adata.obs.columns:
        assert back.obs[col].astype(str).tolist() == adata.obs[col].astype(str).tolist()
    assert list(back.uns["synthetic"]["drugs"]) == list(adata.uns["synthetic"]["drugs"])
    with pytest.raises(CellflowValueError, match="obs_columns"):
        read(path, obs_columns=["condition"])


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".csv.gz", ".parquet"])
def test_read_table_roundtrip(small_data, tmp_path, suffix):
    adata, _ = small_data
    df = _table(adata)
    path = tmp_path / f"cells{suffix}"
    if suffix == ".parquet":
        df.to_parquet(path)
    else:
        df.to_csv(path, sep="\t" if suffix == ".tsv" else ",")
    back = read(path)
    assert back.X.dtype == np.float32
    np.testing.assert_array_equal(back.X, adata.X)
    assert list(back.var_names) == list(adata.var_names)
    assert list(back.obs_names) == list(adata.obs_names)
    assert list(back.obs.columns) == ["condition", "dose", "patient"]
    for col in back.obs.columns:
        assert back.obs[col].astype(str).tolist() == adata.obs[col].astype(str).tolist()


def test_read_obs_columns_rule(tmp_path):
    df = pd.DataFrame({"g0": [1.0, 2.0, np.nan], "g1": [0.5, 0.1, 0.2], "dose": [0.1, 1.0, 10.0], "drug": list("ABC")})
    path = tmp_path / "t.csv"
    df.to_csv(path, index=False)  # no index column: obs_names are "0", "1", "2"
    auto = read(path)
    assert list(auto.var_names) == ["g0", "g1", "dose"]
    assert list(auto.obs.columns) == ["drug"]
    assert list(auto.obs_names) == ["0", "1", "2"]
    assert np.isnan(auto.X[2, 0])  # NaN features are allowed here
    explicit = read(path, obs_columns=["dose", "drug"])
    assert list(explicit.var_names) == ["g0", "g1"]
    assert explicit.obs["dose"].tolist() == [0.1, 1.0, 10.0]
    with pytest.raises(CellflowKeyError, match="'nope'"):
        read(path, obs_columns=["nope"])
    with pytest.raises(CellflowValueError, match="'drug'"):
        read(path, obs_columns=["dose"])


def test_read_errors(tmp_path):
    path = tmp_path / "cells.xlsx"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(CellflowValueError, match=r"\.xlsx") as err:
        read(path)
    assert ".h5ad" in str(err.value) and ".parquet" in str(err.value)
    missing = tmp_path / "missing.csv"
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        read(missing)


def test_truth_class_standalone():
    t = SyntheticTruth(n_features=4, n_states=2, n_patients=1, n_drugs=2, synergy_pairs=[], seed=5)
    x = t.sample_control(10, "P1")
    assert t.synergy_pairs == ()
    np.testing.assert_allclose(
        t.displacement(x, "A+B"), t.displacement(x, "A") + t.displacement(x, "B"), atol=1e-12
    )


def test_read_embeddings_takes_names_from_a_column_or_the_index(tmp_path):
    table = pd.DataFrame({"perturbation": ["A", "B", "C"], "e0": [1.0, 0.0, 0.9], "e1": [0.0, 1.0, 0.1]})
    expected = table.set_index("perturbation").astype(np.float32)
    table.to_csv(tmp_path / "e.csv", index=False)
    table.to_csv(tmp_path / "e.tsv.gz", sep="\t", index=False)
    table.to_parquet(tmp_path / "e.parquet")
    table.set_index("perturbation").to_csv(tmp_path / "indexed.csv")
    for name in ("e.csv", "e.tsv.gz", "e.parquet", "indexed.csv"):
        read = cf.datasets.read_embeddings(tmp_path / name)
        assert list(read.index) == ["A", "B", "C"] and list(read.columns) == ["e0", "e1"], name
        np.testing.assert_array_equal(read.to_numpy(), expected.to_numpy())
    # numeric names (gene IDs) given explicitly are names, not a dimension
    table.assign(perturbation=[101, 102, 103]).to_csv(tmp_path / "ids.csv", index=False)
    assert list(cf.datasets.read_embeddings(tmp_path / "ids.csv", name_column="perturbation").index) == ["101", "102", "103"]
    # the result is what ResponseModel takes
    assert cf.data.make_embedding_table(["A", "B"], cf.datasets.read_embeddings(tmp_path / "e.csv")).names == ("A", "B", "C")


def test_read_embeddings_rejects_tables_without_clear_names(tmp_path):
    table = pd.DataFrame({"perturbation": ["A", "A"], "target": ["x", "y"], "e0": [1.0, 0.0]})
    table[["e0"]].to_csv(tmp_path / "unnamed.csv", index=False)
    with pytest.raises(cf.CellflowValueError, match="no column of perturbation names"):
        cf.datasets.read_embeddings(tmp_path / "unnamed.csv")
    table.to_csv(tmp_path / "two.csv", index=False)
    with pytest.raises(cf.CellflowValueError, match=r"several non-numeric columns \['perturbation', 'target'\]; pass name_column"):
        cf.datasets.read_embeddings(tmp_path / "two.csv")
    with pytest.raises(cf.CellflowKeyError, match=r"name_column='drug' is not a column.*valid choices: \['perturbation', 'target', 'e0'\]"):
        cf.datasets.read_embeddings(tmp_path / "two.csv", name_column="drug")
    with pytest.raises(cf.CellflowValueError, match=r"names \['A'\] more than once"):
        cf.datasets.read_embeddings(tmp_path / "two.csv", name_column="perturbation")
