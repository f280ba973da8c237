"""Inputs as users hand them over: genes in another order, backed files, raw counts, other PCAs,
numbers written two ways, seeds, paths with ``~``."""

import os
import stat
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from _toy import toy_adata

import cellflow as cf

GENES = ["IFIT1", "ISG15", "CD14"]


@pytest.fixture(scope="module")
def toy():
    adata = toy_adata()
    adata.var_names = GENES
    return adata


@pytest.fixture(scope="module")
def model(toy):
    return cf.ResponseModel(toy, rep="X", dose_key="dose", covariate_keys=("patient",), method="mean_shift").fit()


def controls(adata, patient="P1"):
    return adata[(adata.obs.condition == "control") & (adata.obs.patient == patient)]


def test_predict_matches_genes_by_name(toy, model):
    source = controls(toy)
    expected = model.predict(source, "A", dose=1.0).X
    reordered = source[:, GENES[::-1]].copy()
    np.testing.assert_array_equal(model.predict(reordered, "A", dose=1.0).X, expected)
    wider = ad.AnnData(X=np.hstack([reordered.X, np.ones((source.n_obs, 1), np.float32)]), obs=source.obs.copy())
    wider.var_names = [*GENES[::-1], "MT-CO1"]
    np.testing.assert_array_equal(model.predict(wider, "A", dose=1.0).X, expected)
    with pytest.raises(cf.CellflowValueError, match=r"lacks 1 of the 3 expected features: \['CD14'\]"):
        model.predict(source[:, GENES[:2]].copy(), "A", dose=1.0)
    # an AnnData built from a bare array has no gene names to match: columns are taken as they come
    bare = ad.AnnData(X=np.asarray(source.X), obs=source.obs.copy())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(model.predict(bare, "A", dose=1.0).X, expected)


def test_evaluate_matches_genes_by_name(toy, model):
    pred = model.predict(controls(toy), "A", dose=1.0)
    truth = toy[(toy.obs.condition == "A") & (toy.obs.dose == "1.0") & (toy.obs.patient == "P1")]
    kwargs = dict(rep="X", groupby="condition", metrics=["energy_distance", "r2_mean"], features=["IFIT1", "ISG15"])
    expected = cf.metrics.evaluate(pred, truth, **kwargs)
    shuffled = cf.metrics.evaluate(pred, truth[:, GENES[::-1]].copy(), **kwargs)
    np.testing.assert_allclose(shuffled[["energy_distance", "r2_mean"]], expected[["energy_distance", "r2_mean"]], rtol=1e-6)
    assert expected["r2_mean"].iloc[0] > 0.99


@pytest.mark.parametrize("sparse", [False, True])
def test_backed_anndata_trains_and_predicts(toy, model, tmp_path, sparse):
    adata = toy.copy()
    if sparse:
        adata.X = sp.csr_matrix(adata.X)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    np.testing.assert_array_equal(cf.data.get_representation(backed, "X"), toy.X)
    refit = cf.ResponseModel(backed, rep="X", dose_key="dose", covariate_keys=("patient",), method="mean_shift").fit()
    source = controls(toy)
    np.testing.assert_allclose(refit.predict(source, "B", dose=10.0).X, model.predict(source, "B", dose=10.0).X, atol=1e-6)


def test_raw_counts_are_flagged(toy):
    counts = toy.copy()
    counts.X = np.random.default_rng(0).poisson(3.0, size=counts.shape).astype(np.float32)
    with pytest.warns(UserWarning, match="looks like raw counts"):
        cf.ResponseModel(counts, rep="X", method="mean_shift")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cf.ResponseModel(toy, rep="X", method="mean_shift")


def test_a_pca_of_other_cells_is_flagged_and_project_embeds_on_the_training_axes():
    rng = np.random.default_rng(0)
    counts = rng.poisson(rng.gamma(2.0, 1.0, size=30), size=(300, 30)).astype(np.float32)
    adata = ad.AnnData(X=sp.csr_matrix(counts), obs={"condition": ["control"] * 150 + ["A"] * 150,
                                                     "patient": (["P1"] * 100 + ["P2"] * 50) * 2})
    adata.var_names = [f"g{i}" for i in range(30)]
    adata = cf.pp.pca(cf.pp.log_normalize(adata), 5, rep="logcounts")
    model = cf.ResponseModel(adata[adata.obs.patient == "P1"].copy(), rep="X_pca", method="mean_shift").fit()
    new = adata[adata.obs.patient == "P2"].copy()
    expected = new.obsm["X_pca"]
    del new.obsm["X_pca"], new.uns["X_pca"]
    new = new[:, new.var_names[::-1]].copy()
    projected = cf.pp.project(new, adata)
    np.testing.assert_allclose(projected.obsm["X_pca"], expected, atol=1e-4)
    assert "X_pca" not in new.obsm  # copy=True leaves the input alone
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.predict(projected[projected.obs.condition == "control"], "A")
    own = cf.pp.pca(new, 5, rep="logcounts")
    with pytest.warns(UserWarning, match="PCA with other axes"):
        model.predict(own[own.obs.condition == "control"], "A")
    with pytest.raises(cf.CellflowValueError, match="lacks 10 of the 30 expected features"):
        cf.pp.project(new[:, :20].copy(), adata)


def test_covariate_numbers_match_however_written(toy):
    adata = toy.copy()
    adata.obs["batch"] = np.where(adata.obs.patient == "P1", 1, 2)
    model = cf.ResponseModel(adata, rep="X", covariate_keys=("batch",), method="mean_shift", dose_key="dose").fit()
    source = controls(adata).copy()
    expected = model.predict(source, "A", dose=1.0).X
    source.obs["batch"] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(model.predict(source, "A", dose=1.0).X, expected)
        np.testing.assert_array_equal(model.predict(source, "A", dose=1.0, covariates={"batch": 1.0}).X, expected)


@pytest.mark.parametrize("seed", [None, 1.5, "1", True, -1])
def test_seeds_must_be_non_negative_integers(model, toy, seed):
    with pytest.raises(cf.CellflowValueError, match="seed must be a non-negative integer"):
        model.predict(controls(toy), "A", dose=1.0, seed=seed)
    with pytest.raises(cf.CellflowValueError, match="seed must be a non-negative integer"):
        cf.ResponseModel(toy, rep="X", method="mean_shift").fit(seed=seed)


def test_prediction_names_are_the_conditions_and_unique(toy):
    model = cf.ResponseModel(toy, rep="X", method="mean_shift").fit()
    source = controls(toy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pred = model.predict(source, ["B+A", "A+B"])
    assert pred.obs_names.is_unique
    assert pred.obs_names[0] == f"{source.obs_names[0]}-A+B"
    assert not any("@" in name for name in pred.obs_names)


def test_labels_that_read_as_missing_values_and_empty_labels(toy):
    adata = toy.copy()
    adata.obs["condition"] = adata.obs["condition"].astype(str)
    adata.obs.iloc[400:410, adata.obs.columns.get_loc("condition")] = "nan"
    with pytest.warns(UserWarning, match="reads like a missing value"):
        cf.ResponseModel(adata, rep="X", method="mean_shift")
    adata.obs.iloc[400:410, adata.obs.columns.get_loc("condition")] = ""
    with pytest.raises(cf.CellflowValueError, match=r"adata.obs\['condition'\] of 10 cell\(s\) \(first: \['cell400'"):
        cf.ResponseModel(adata, rep="X", method="mean_shift")


def test_save_expands_the_home_directory_and_is_readable_by_others(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # where a literal '~' directory would go
    model.save("~/my model")
    saved = tmp_path / "home" / "my model"
    assert not (tmp_path / "~").exists()
    assert (saved / "cellflow.json").exists()
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(saved.stat().st_mode) == 0o777 & ~mask
    source = controls(toy_adata())
    source.var_names = GENES
    np.testing.assert_array_equal(cf.ResponseModel.load("~/my model").predict(source, "A", dose=1.0).X,
                                  model.predict(source, "A", dose=1.0).X)


def test_metrics_refuse_anndata_at_once(toy):
    with pytest.raises(cf.CellflowValueError, match=r"x is an AnnData; pass its cells as an array"):
        cf.metrics.energy_distance(toy, toy.X)


def test_fit_arguments_given_as_options_and_oversized_batches(toy):
    with pytest.raises(cf.CellflowKeyError, match=r"steps is an argument of fit\(\): model.fit\(steps=30\)"):
        cf.ResponseModel(toy, rep="X", method="flow_matching", steps=30)
    with pytest.raises(cf.CellflowValueError, match="batch_size=1000000 is more cells than any group holds"):
        cf.ResponseModel(toy, rep="X", method="flow_matching").fit(batch_size=10**6)


def test_doses_must_be_positive_in_training_and_given(toy, model):
    with pytest.raises(cf.CellflowValueError, match="holds NaN"):
        model.predict(controls(toy), "A", dose=float("nan"))
    adata = toy.copy()
    adata.obs["dose"] = adata.obs["dose"].astype(str).where(adata.obs.condition != "B", "0")
    with pytest.raises(cf.CellflowValueError, match=r"cell\(s\) of 'B' .* have dose '0'; a treated cell's doses must be positive"):
        cf.ResponseModel(adata, rep="X", dose_key="dose", method="mean_shift")
    with pytest.warns(UserWarning, match=r"doses outside those seen in training: A at 1000 \(trained on 1 to 10\)"):
        model.predict(controls(toy), "A", dose=1000.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.predict(controls(toy), "A", dose=3.0)


def test_evaluate_groups_doses_written_as_text_or_numbers(toy, model):
    pred = model.predict(controls(toy), ["A", "B"], dose=[10.0, 10.0])
    truth = toy[(toy.obs.condition.isin(["A", "B"])) & (toy.obs.dose == "10.0") & (toy.obs.patient == "P1")].copy()
    truth.obs["dose"] = truth.obs["dose"].astype(float)
    table = cf.metrics.evaluate(pred, truth, rep="X", groupby=["condition", "dose"], metrics=["r2_mean"])
    assert table["r2_mean"].min() > 0.99 and len(table) == 2


def test_metric_bars_reads_an_evaluate_table(toy, model):
    import matplotlib

    matplotlib.use("Agg")
    pred = model.predict(controls(toy), ["A", "B"], dose=[1.0, 1.0])
    truth = toy[toy.obs.condition.isin(["A", "B"]) & (toy.obs.dose == "1.0") & (toy.obs.patient == "P1")]
    ax = cf.pl.metric_bars(cf.metrics.evaluate(pred, truth, rep="X", groupby="condition", metrics=["energy_distance"]))
    assert [t.get_text() for t in ax.get_xticklabels()] == ["A", "B"]
    # with floors, each group gets a dashed line at its floor
    table = cf.metrics.evaluate(pred, truth, rep="X", groupby="condition", metrics=["energy_distance"], floors=True)
    ax = cf.pl.metric_bars(table)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["A", "B"]
    (lines,) = ax.collections
    assert lines.get_label() == "noise floor"
    np.testing.assert_allclose([segment[0, 1] for segment in lines.get_segments()], table["energy_distance_floor"])


def test_cli_groupby_repeats_and_key_value_errors(toy, model, tmp_path, capsys):
    from cellflow.cli import main

    pred = model.predict(toy[toy.obs.condition == "control"], "A", dose=1.0)
    truth = toy[(toy.obs.condition == "A") & (toy.obs.dose == "1.0")].copy()
    pred.write_h5ad(tmp_path / "pred.h5ad")
    truth.write_h5ad(tmp_path / "truth.h5ad")
    assert main(["evaluate", str(tmp_path / "pred.h5ad"), str(tmp_path / "truth.h5ad"), "--rep", "X",
                 "--groupby", "condition", "--groupby", "patient", "--metric", "r2_mean"]) == 0
    out = capsys.readouterr().out
    assert "condition" in out and "P2" in out
    toy.write_h5ad(tmp_path / "train.h5ad")
    assert main(["train", str(tmp_path / "train.h5ad"), "--out", str(tmp_path / "m"), "--rep", "X",
                 "--method", "mean_shift", "--option", "learning_rate"]) == 2
    assert "cellflow train: error: --option 'learning_rate' must look like key=value" in capsys.readouterr().err


def test_sphering_does_not_depend_on_feature_units():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)) @ rng.normal(size=(8, 8))
    obs = {"compound": ["DMSO"] * 40 + ["drug"] * 20, "plate": ["p1"] * 60}
    scaled = x * np.array([1000.0, 1, 1, 1, 0.001, 1, 1, 1])
    a = cf.pp.normalize_plates(ad.AnnData(X=x.astype(np.float32), obs=obs), method="sphering")
    b = cf.pp.normalize_plates(ad.AnnData(X=scaled.astype(np.float32), obs=obs), method="sphering")
    np.testing.assert_allclose(a.X, b.X, atol=1e-3)


def test_choices_taken_from_numeric_columns_read_as_plain_numbers():
    from cellflow._errors import format_choices

    assert format_choices(pd.Series([101, 107]).unique()) == "[101, 107]"
    assert format_choices([np.float32(0.5), "a"]) == "[0.5, 'a']"


@pytest.mark.parametrize("name", ["cellflow", "cellflow.data", "cellflow.datasets", "cellflow.methods", "cellflow.metrics",
                                  "cellflow.nn", "cellflow.pl", "cellflow.pp", "cellflow.solvers", "cellflow.train"])
def test_tab_completion_lists_the_public_names(name):
    import importlib
    import types

    module = importlib.import_module(name)
    exported = {n for n in module.__all__ if not n.startswith("_")}
    public = {
        n for n in dir(module)
        if not n.startswith("_")
        # an imported submodule shows up as Python adds it, exported or not
        and (n in exported or not (isinstance(getattr(module, n), types.ModuleType) and getattr(module, n).__name__ == f"{name}.{n}"))
    }
    assert public == exported
    assert all(hasattr(module, n) for n in module.__all__)


def _counts(adata):
    counts = adata.copy()
    counts.X = np.random.default_rng(0).poisson(3.0, size=counts.shape).astype(np.float32)
    return counts


def _without_p2_controls(adata):
    return adata[~((adata.obs.condition == "control") & (adata.obs.patient == "P2"))].copy()


def _log_normalised(adata):
    adata = _counts(adata)
    adata.layers["logcounts"] = np.log1p(adata.X)
    return adata


@pytest.mark.parametrize(
    "trigger, message",
    [
        (lambda toy, model: cf.ResponseModel(_counts(toy), rep="X", method="mean_shift"), "looks like raw counts"),
        (lambda toy, model: cf.ResponseModel(_without_p2_controls(toy), rep="X", covariate_keys=("patient",), method="mean_shift"),
         "have no control cells with the same covariate values"),
        (lambda toy, model: cf.pp.log_normalize(_log_normalised(toy), layer="logcounts"), "does not look like raw counts"),
        (lambda toy, model: model.predict(controls(toy), "A", dose=1000.0), "doses outside those seen in training"),
    ],
    ids=["raw counts", "no matching controls", "log_normalize twice", "dose out of range"],
)
def test_warnings_point_at_the_users_line(toy, model, trigger, message):
    # however deep in the library a warning arises, it names the line of the caller's code
    with pytest.warns(UserWarning, match=message) as caught:
        trigger(toy, model)
    assert {w.filename for w in caught if message in str(w.message)} == {__file__}
