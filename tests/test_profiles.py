"""Image-based profiles: reading tables, embedding images, plate normalisation, feature
selection, aggregation and retrieval metrics, against hand-computed values."""

from __future__ import annotations

import anndata as ad
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from conftest import shared_file
from flax import nnx
from sklearn.metrics import average_precision_score

import cellflow as cf
from cellflow._errors import CellflowKeyError, CellflowValueError


# --------------------------------------------------------------------------------------------
# a tiny plate layout with numbers small enough to check by hand
# --------------------------------------------------------------------------------------------
def _plates() -> ad.AnnData:
    # plate P1: controls 1, 2, 4 (median 2, MAD 1) and 10, 10, 10 in feature b (MAD 0)
    # plate P2: controls 3, 5, 10 (median 5, MAD 2)
    x = np.array(
        [
            [1.0, 10.0, 7.0],
            [2.0, 10.0, 7.0],
            [4.0, 10.0, 7.0],
            [8.0, 13.0, 7.0],
            [3.0, 12.0, 7.0],
            [5.0, 14.0, 7.0],
            [10.0, 20.0, 7.0],
            [1.0, 16.0, 7.0],
        ]
    )
    obs = pd.DataFrame(
        {
            "plate": ["P1"] * 4 + ["P2"] * 4,
            "compound": ["DMSO", "DMSO", "DMSO", "taxol", "DMSO", "DMSO", "DMSO", "taxol"],
        },
        index=[f"w{i}" for i in range(8)],
    )
    return ad.AnnData(X=x.astype(np.float32), obs=obs, var=pd.DataFrame(index=["a", "b", "const"]))


def test_normalize_plates_robust_z_matches_hand_values():
    adata = _plates()
    before = adata.X.copy()
    out = cf.pp.normalize_plates(adata, "plate", "DMSO", "compound", method="robust_z", scale_floor=0.0)
    np.testing.assert_array_equal(adata.X, before)  # input untouched
    assert list(out.var_names) == ["a", "b"]  # 'const' has no spread over controls
    assert out.uns["normalize_plates"]["dropped_features"] == ["const"]
    k = 1.4826
    # feature a: P1 (x - 2) / (1 k); P2 (x - 5) / (2 k)
    np.testing.assert_allclose(out.X[:4, 0], (np.array([1, 2, 4, 8]) - 2) / k, rtol=1e-6)
    np.testing.assert_allclose(out.X[4:, 0], (np.array([3, 5, 10, 1]) - 5) / (2 * k), rtol=1e-6)
    # feature b on P1: MAD 0 and no floor -> centred only; P2: median 14, MAD 2
    np.testing.assert_allclose(out.X[:4, 1], [0, 0, 0, 3], rtol=1e-6)
    np.testing.assert_allclose(out.X[4:, 1], (np.array([12, 14, 20, 16]) - 14) / (2 * k), rtol=1e-6)


def test_normalize_plates_scale_floor_uses_pooled_control_scale():
    out = cf.pp.normalize_plates(_plates(), method="robust_z", scale_floor=0.5)
    # feature b, all six controls 10,10,10,12,14,20: median 11, MAD median(|.-11|)=median(1,1,1,1,3,9)=1
    floor = 0.5 * 1.4826 * 1.0
    np.testing.assert_allclose(out.X[3, 1], 3 / floor, rtol=1e-6)


def test_normalize_plates_z_and_whitening():
    adata = _plates()
    z = cf.pp.normalize_plates(adata, method="z", scale_floor=0.0)
    p2 = np.array([3.0, 5.0, 10.0])
    np.testing.assert_allclose(z.X[7, 0], (1 - p2.mean()) / p2.std(), rtol=1e-6)

    rng = np.random.default_rng(0)
    cov = np.array([[4.0, 1.5, 0.0], [1.5, 2.0, 0.3], [0.0, 0.3, 1.0]])
    x = rng.multivariate_normal([1.0, -2.0, 3.0], cov, size=400)
    obs = pd.DataFrame({"plate": ["P"] * 400, "compound": ["DMSO"] * 300 + ["drug"] * 100}, index=[f"w{i}" for i in range(400)])
    sphered = cf.pp.normalize_plates(ad.AnnData(X=x.astype(np.float32), obs=obs), method="sphering", regularization=1e-9)
    controls = sphered.X[:300].astype(np.float64)
    np.testing.assert_allclose(controls.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(np.cov(controls, rowvar=False), np.eye(3), atol=1e-4)
    # ZCA keeps features aligned: the whitening matrix is symmetric positive definite
    tvn = cf.pp.normalize_plates(ad.AnnData(X=x.astype(np.float32), obs=obs), method="tvn", regularization=1e-9)
    np.testing.assert_allclose(np.cov(tvn.X[:300].astype(np.float64), rowvar=False), np.eye(3), atol=1e-4)


def test_normalize_plates_errors():
    adata = _plates()
    with pytest.raises(CellflowValueError, match="'robust'.*'robust_z'"):
        cf.pp.normalize_plates(adata, method="robust")
    with pytest.raises(CellflowKeyError, match="'Plate'.*'plate'"):
        cf.pp.normalize_plates(adata, plate_key="Plate")
    with pytest.raises(CellflowValueError, match="'dmso'.*'DMSO'"):
        cf.pp.normalize_plates(adata, control="dmso")
    short = adata[[0, 1, 2, 3, 6, 7]].copy()  # P2 keeps one control well
    with pytest.raises(CellflowValueError, match="'P2'.*min_controls=2"):
        cf.pp.normalize_plates(short)
    cf.pp.normalize_plates(short, min_controls=1)


def test_select_features_reasons():
    rng = np.random.default_rng(1)
    n = 200
    a = rng.normal(size=n)
    table = {
        "a": a,
        "a_copy": 2 * a + 1,  # perfectly correlated with a
        "b": rng.normal(size=n),
        "flat": np.full(n, 3.0),
        "spike": np.r_[np.zeros(n - 1), 5.0],  # 2 distinct values, 1:199 frequency
        "broken": np.r_[rng.normal(size=n - 1), np.nan],
    }
    adata = ad.AnnData(X=pd.DataFrame(table).to_numpy(np.float32), var=pd.DataFrame(index=list(table)))
    out = cf.pp.select_features(adata, corr_threshold=0.9)
    dropped = out.uns["select_features"]["dropped"]
    assert dropped["flat"] == "near_constant" and dropped["spike"] == "near_constant"
    assert dropped["broken"] == "non_finite"
    assert {"a", "a_copy"} & set(dropped) and dropped.get("a", dropped.get("a_copy")).startswith("correlated:")
    assert sorted(out.var_names) in (["a", "b"], ["a_copy", "b"])
    assert out.n_obs == n
    kept_all = cf.pp.select_features(adata, corr_threshold=None)
    assert sorted(kept_all.var_names) == ["a", "a_copy", "b"]


def test_aggregate_median_mean_and_obs():
    adata = _plates()
    adata.obs["moa"] = pd.Categorical(["ctrl"] * 3 + ["MT"] + ["ctrl"] * 3 + ["MT"])
    wells = cf.pp.aggregate(adata, by=["compound"], method="median")
    assert list(wells.obs.compound) == ["DMSO", "taxol"]
    assert list(wells.obs.n_aggregated) == [6, 2]
    assert "moa" in wells.obs and "plate" not in wells.obs  # plate varies within DMSO
    assert list(wells.obs.moa) == ["ctrl", "MT"]
    np.testing.assert_allclose(wells.X[0, :2], [3.5, 11.0])
    means = cf.pp.aggregate(adata, by=["plate", "compound"], method="mean")
    assert means.n_obs == 4 and list(means.obs_names) == ["P1_DMSO", "P1_taxol", "P2_DMSO", "P2_taxol"]
    np.testing.assert_allclose(means.X[2, 0], 6.0)
    with pytest.raises(CellflowKeyError, match="'well'"):
        cf.pp.aggregate(adata, by="well")
    with pytest.raises(CellflowValueError, match="'max'.*'median'"):
        cf.pp.aggregate(adata, by="plate", method="max")


# --------------------------------------------------------------------------------------------
# reading embedding tables
# --------------------------------------------------------------------------------------------
def test_read_npz_and_metadata_prefix(tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(5, 3))
    np.savez(tmp_path / "cells.npz", embeddings=emb, compound=np.array(list("AABBC")), dose=np.arange(5.0),
             feature_names=np.array(["f0", "f1", "f2"]))
    adata = cf.datasets.read(tmp_path / "cells.npz")
    np.testing.assert_allclose(adata.X, emb.astype(np.float32))
    assert list(adata.var_names) == ["f0", "f1", "f2"] and list(adata.obs.columns) == ["compound", "dose"]
    in_obsm = cf.datasets.read(tmp_path / "cells.npz", obsm_key="X_dino")
    np.testing.assert_allclose(in_obsm.obsm["X_dino"], emb.astype(np.float32))
    assert in_obsm.n_vars == 0

    np.savez(tmp_path / "two.npz", a=emb, b=emb)
    with pytest.raises(CellflowValueError, match="features_key"):
        cf.datasets.read(tmp_path / "two.npz")
    with pytest.raises(CellflowKeyError, match="'c'"):
        cf.datasets.read(tmp_path / "two.npz", features_key="c")

    table = pd.DataFrame({"Metadata_Plate": [1, 1, 2], "Metadata_Concentration": [0.1, 1.0, 1.0], "Cells_Area": [3.0, 4.0, 5.0]})
    table.to_csv(tmp_path / "profiles.csv", index=False)
    profiles = cf.datasets.read(tmp_path / "profiles.csv")
    assert list(profiles.var_names) == ["Cells_Area"]
    assert list(profiles.obs.columns) == ["Metadata_Plate", "Metadata_Concentration"]
    assert list(cf.datasets.read(tmp_path / "profiles.csv", metadata_prefix=None).var_names) == list(table.columns)


# --------------------------------------------------------------------------------------------
# embedding images
# --------------------------------------------------------------------------------------------
class _TinyEncoder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 4, kernel_size=(3, 3), rngs=rngs)
        self.head = nnx.Linear(4, 5, rngs=rngs)

    def __call__(self, images):
        h = nnx.relu(self.conv(images.astype(jnp.float32) / 255.0))
        return self.head(h.mean(axis=(1, 2)))


def test_embed_images_matches_direct_call_with_padding():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(11, 8, 8, 3), dtype=np.uint8)
    encoder = _TinyEncoder(nnx.Rngs(0))
    direct = np.asarray(encoder(jnp.asarray(images)))
    obs = pd.DataFrame({"well": [f"A{i}" for i in range(11)]})
    out = cf.pp.embed_images(images, encoder, batch_size=4, obs=obs)
    assert out.shape == (11, 5)
    np.testing.assert_allclose(out.X, direct, rtol=1e-5, atol=1e-6)
    assert list(out.obs.well) == list(obs.well)
    in_obsm = cf.pp.embed_images(images, lambda b: b.reshape(b.shape[0], -1)[:, :6].astype(jnp.float32), 5, key_added="X_raw")
    np.testing.assert_array_equal(in_obsm.obsm["X_raw"], images.reshape(11, -1)[:, :6])
    with pytest.raises(CellflowValueError, match=r"\(batch, n_features\)"):
        cf.pp.embed_images(images, lambda b: b, 4)
    with pytest.raises(CellflowValueError, match="obs has 3 rows"):
        cf.pp.embed_images(images, encoder, 4, obs=obs.iloc[:3])


# --------------------------------------------------------------------------------------------
# retrieval metrics
# --------------------------------------------------------------------------------------------
def test_average_precision_matches_sklearn():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.normal(size=30)
        positive = rng.random(30) < 0.3
        positive[0] = True
        assert cf.metrics.average_precision(scores, positive) == pytest.approx(
            average_precision_score(positive, scores), abs=1e-12
        )


def _retrieval_profiles() -> ad.AnnData:
    # two mechanisms along two axes; compounds c1/c2 (MoA X) and c3/c4 (MoA Y), two doses each
    x = np.array(
        [
            [1.0, 0.1], [0.9, 0.0],  # c1
            [1.0, 0.3], [0.8, 0.2],  # c2
            [0.1, 1.0], [0.6, 0.8],  # c3
            [0.0, 1.0], [0.2, 0.9],  # c4
            [0.7, 0.7],  # DMSO
        ]
    )
    obs = pd.DataFrame(
        {
            "compound": ["c1", "c1", "c2", "c2", "c3", "c3", "c4", "c4", "DMSO"],
            "moa": ["X", "X", "X", "X", "Y", "Y", "Y", "Y", "DMSO"],
        },
        index=[f"p{i}" for i in range(9)],
    )
    return ad.AnnData(X=x.astype(np.float32), obs=obs)


def test_map_retrieval_by_hand():
    adata = _retrieval_profiles()
    # without exclude_same every query's 3 positives rank first except the ambiguous p5
    scores = cf.metrics.retrieval_scores(adata, "moa", exclude=("DMSO",))
    assert len(scores) == 8 and (scores.n_positives == 3).all() and (scores.n_candidates == 7).all()
    x = adata.X / np.linalg.norm(adata.X, axis=1, keepdims=True)
    for name, row in scores.iterrows():
        i = adata.obs_names.get_loc(name)
        others = [j for j in range(8) if j != i]
        expected = average_precision_score(adata.obs.moa.iloc[others] == adata.obs.moa.iloc[i], x[others] @ x[i])
        assert row.average_precision == pytest.approx(expected)
    value = cf.metrics.map_retrieval(adata, "moa", exclude=("DMSO",))
    assert value == pytest.approx(scores.average_precision.mean())
    # with exclude_same, each query has 2 positives (the other compound's doses) among 6
    same = cf.metrics.retrieval_scores(adata, "moa", exclude=("DMSO",), exclude_same="compound")
    assert (same.n_positives == 2).all() and (same.n_candidates == 6).all()
    assert same.loc["p0", "average_precision"] == pytest.approx(1.0)
    assert cf.metrics.map_retrieval(adata, "moa", exclude="DMSO", average="label") == pytest.approx(
        scores.groupby("label").average_precision.mean().mean()
    )
    import matplotlib

    matplotlib.use("Agg")
    ax = cf.pl.retrieval(scores, shuffled=np.array([0.3, 0.4, 0.5]))
    assert [t.get_text() for t in ax.get_yticklabels()] == sorted(
        ["X", "Y"], key=lambda label: scores.groupby("label").average_precision.mean()[label]
    )
    with pytest.raises(CellflowKeyError, match="average_precision"):
        cf.pl.retrieval(scores.drop(columns="average_precision"))
    with pytest.raises(CellflowKeyError, match="'dmso'"):
        cf.metrics.map_retrieval(adata, "moa", exclude=("dmso",))
    with pytest.raises(CellflowKeyError, match="'MoA'"):
        cf.metrics.map_retrieval(adata, "MoA")
    with pytest.raises(CellflowValueError, match="'dot'.*'cosine'"):
        cf.metrics.map_retrieval(adata, similarity="dot")


def test_shuffled_baseline_is_near_chance():
    rng = np.random.default_rng(0)
    labels = np.repeat(list("ABCD"), 10)
    centres = rng.normal(size=(4, 8)) * 3
    x = centres[np.searchsorted(list("ABCD"), labels)] + rng.normal(size=(40, 8))
    adata = ad.AnnData(X=x.astype(np.float32), obs=pd.DataFrame({"moa": labels}, index=[f"p{i}" for i in range(40)]))
    observed = cf.metrics.map_retrieval(adata, "moa", exclude=())
    shuffled = cf.metrics.map_retrieval_shuffled(adata, "moa", exclude=(), n_permutations=30, seed=1)
    assert observed > 0.95
    # chance level: AP of random scores with 9 positives among 39 candidates (sklearn)
    chance = np.mean([average_precision_score(np.arange(39) < 9, rng.random(39)) for _ in range(4000)])
    assert shuffled.shape == (30,) and abs(shuffled.mean() - chance) < 0.03, (shuffled.mean(), chance)


def test_phenotypic_activity_and_reproducibility():
    rng = np.random.default_rng(0)
    controls = rng.normal(size=(30, 6))
    active = rng.normal(size=(4, 6)) * 0.3 + np.array([4.0, 0, 0, 0, 0, 0])
    inactive = rng.normal(size=(4, 6))
    x = np.vstack([controls, active, inactive])
    obs = pd.DataFrame({"compound": ["DMSO"] * 30 + ["hit"] * 4 + ["dud"] * 4}, index=[f"w{i}" for i in range(38)])
    adata = ad.AnnData(X=x.astype(np.float32), obs=obs)
    activity = cf.metrics.phenotypic_activity(adata, "compound", "DMSO", null_size=500).set_index("compound")
    assert activity.loc["hit", "mean_average_precision"] == pytest.approx(1.0)
    assert activity.loc["hit", "significant"] and not activity.loc["dud", "significant"]
    assert activity.loc["hit", "n_negatives"] == 30 and activity.loc["hit", "n_replicates"] == 4
    assert activity.loc["hit", "p_value"] < 0.01
    reproducibility = cf.metrics.replicate_reproducibility(adata, "compound", exclude="DMSO", null_size=200)
    assert set(reproducibility.compound) == {"hit", "dud"}
    assert (reproducibility.n_negatives == 4).all()
    with pytest.raises(CellflowValueError, match="'ctrl'"):
        cf.metrics.phenotypic_activity(adata, "compound", "ctrl")


# --------------------------------------------------------------------------------------------
# BBBC021: normalisation makes mechanisms retrievable
# --------------------------------------------------------------------------------------------
def test_bbbc021_moa_retrieval_beats_shuffled():
    wells = cf.datasets.read(shared_file("bbbc021_per_well_mean_cytominergallery.h5ad"))
    kwargs = dict(label_key="moa", exclude=("DMSO",), exclude_same="compound")
    raw = cf.metrics.map_retrieval(cf.pp.aggregate(wells, by=["compound", "concentration"]), **kwargs)
    normalised = cf.pp.normalize_plates(wells, plate_key="plate", control="DMSO", perturbation_key="compound")
    treatments = cf.pp.aggregate(normalised, by=["compound", "concentration"])
    observed = cf.metrics.map_retrieval(treatments, **kwargs)
    shuffled = cf.metrics.map_retrieval_shuffled(treatments, n_permutations=20, **kwargs)
    assert observed > shuffled.max() + 0.3, (observed, shuffled.max())
    assert observed > raw + 0.1, (observed, raw)
    activity = cf.metrics.phenotypic_activity(normalised, "compound", "DMSO", group_key=["compound", "concentration"], null_size=200)
    assert activity.significant.mean() > 0.5


# --------------------------------------------------------------------------------------------
# any rep: X, a layer or an obsm entry; X of the result, var naming the columns that were read
# --------------------------------------------------------------------------------------------
def _plates_with_embedding(n_columns: int) -> tuple[ad.AnnData, np.ndarray]:
    adata = _plates()
    rng = np.random.default_rng(3)
    embedding = rng.normal(size=(adata.n_obs, n_columns))
    embedding[:, 1] = 4.0  # constant: dropped by every function that drops features
    adata.obsm["emb"] = embedding
    adata.layers["copy"] = adata.X.copy()
    return adata, embedding


@pytest.mark.parametrize("n_columns", [2, 3, 5])  # fewer, as many and more columns than var
def test_normalize_plates_obsm_rep_names_features_after_the_rep(n_columns):
    adata, embedding = _plates_with_embedding(n_columns)
    out = cf.pp.normalize_plates(adata, method="z", rep="emb", scale_floor=0.0)
    alone = cf.pp.normalize_plates(
        ad.AnnData(X=embedding.astype(np.float32), obs=adata.obs.copy()), method="z", scale_floor=0.0
    )
    np.testing.assert_allclose(out.X, alone.X, rtol=1e-5, atol=1e-6)  # alone's input was rounded to float32
    kept = [j for j in range(n_columns) if j != 1]
    assert list(out.var_names) == [f"emb_{j}" for j in kept]  # not the genes 'a', 'b', 'const'
    assert out.uns["normalize_plates"]["dropped_features"] == ["emb_1"]
    assert out.uns["normalize_plates"]["rep"] == "emb"
    # a layer is described by var, like X
    layer = cf.pp.normalize_plates(adata, method="z", rep="copy", scale_floor=0.0)
    assert list(layer.var_names) == ["a", "b"]
    np.testing.assert_allclose(layer.X, cf.pp.normalize_plates(adata, method="z", scale_floor=0.0).X)


def test_obsm_dataframe_rep_keeps_its_column_names():
    adata, embedding = _plates_with_embedding(3)
    adata.obsm["emb"] = pd.DataFrame(embedding, index=adata.obs_names, columns=["area", "flat", "texture"])
    out = cf.pp.normalize_plates(adata, method="z", rep="emb")
    assert list(out.var_names) == ["area", "texture"]
    assert out.uns["normalize_plates"]["dropped_features"] == ["flat"]
    assert list(cf.pp.aggregate(adata, by="compound", rep="emb").var_names) == ["area", "flat", "texture"]


def test_select_features_obsm_rep_names_features_after_the_rep():
    adata, embedding = _plates_with_embedding(2)
    out = cf.pp.select_features(adata, rep="emb", corr_threshold=None)
    assert list(out.var_names) == ["emb_0"]
    assert out.uns["select_features"] == {"rep": "emb", "dropped": {"emb_1": "near_constant"}}
    np.testing.assert_allclose(out.X[:, 0], embedding[:, 0].astype(np.float32))
    three, _ = _plates_with_embedding(3)  # as many columns as var: must not borrow the gene names
    assert list(cf.pp.select_features(three, rep="emb", corr_threshold=None).var_names) == ["emb_0", "emb_2"]


def test_aggregate_obsm_rep_names_features_after_the_rep():
    adata, embedding = _plates_with_embedding(3)
    out = cf.pp.aggregate(adata, by="compound", rep="emb", method="mean")
    assert list(out.var_names) == ["emb_0", "emb_1", "emb_2"]
    np.testing.assert_allclose(out.X[0], embedding[[0, 1, 2, 4, 5, 6]].mean(axis=0), rtol=1e-6)
    assert list(cf.pp.aggregate(adata, by="compound", rep="copy").var_names) == ["a", "b", "const"]
    # an obsm key that is also a layer name is read from obsm (as everywhere), and named so
    adata.layers["emb"] = adata.X.copy()
    assert list(cf.pp.aggregate(adata, by="compound", rep="emb").var_names) == ["emb_0", "emb_1", "emb_2"]


def test_bbbc021_normalize_plates_and_select_features_on_an_obsm_entry():
    wells = cf.datasets.read(shared_file("bbbc021_per_well_mean_cytominergallery.h5ad"))
    wells.obsm["feat"] = wells.X[:, :20].copy()
    kwargs = dict(plate_key="plate", control="DMSO", perturbation_key="compound")
    out = cf.pp.normalize_plates(wells, rep="feat", **kwargs)
    reference = cf.pp.normalize_plates(wells[:, :20].copy(), **kwargs)
    np.testing.assert_allclose(out.X, reference.X, rtol=1e-5, atol=1e-5)
    assert out.var_names[0] == "feat_0" and not set(out.var_names) & set(wells.var_names)
    wells.obsm["feat"] = out.X
    selected = cf.pp.select_features(wells, rep="feat")
    assert set(selected.var_names) <= {f"feat_{j}" for j in range(out.n_vars)}
