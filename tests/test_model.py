import os

import anndata as ad
import numpy as np
import pytest
from _toy import toy_adata

import cellflow as cf


@pytest.fixture(scope="module")
def toy():
    return toy_adata()


@pytest.mark.parametrize("method", ["identity", "mean_shift", "gaussian_ot"])
@pytest.mark.parametrize("rep", ["X", "X_pca", "counts"])
def test_save_load_identical_predictions(toy, tmp_path, method, rep):
    model = cf.ResponseModel(toy, rep=rep, dose_key="dose", covariate_keys=("patient",), method=method).fit()
    source = toy[toy.obs.condition == "control"]
    before = model.predict(source, ["A+B", "B"], dose=["1+1", 3.0], seed=1)
    model.save(tmp_path / "model")
    loaded = cf.ResponseModel.load(tmp_path / "model")
    after = loaded.predict(source, ["A+B", "B"], dose=["1+1", 3.0], seed=1)
    get = (lambda a: a.X) if rep == "X" else (lambda a: a.obsm[rep]) if rep == "X_pca" else (lambda a: a.layers[rep])
    np.testing.assert_array_equal(get(before), get(after))
    assert before.obs.equals(after.obs)
    assert loaded.options == model.options and loaded.spec_.groups.equals(model.spec_.groups)
    assert repr(loaded) == repr(model)


def test_save_is_atomic_and_refuses_overwrite(toy, tmp_path):
    model = cf.ResponseModel(toy, rep="X", method="mean_shift").fit()
    target = tmp_path / "m"
    model.save(target)
    with pytest.raises(FileExistsError):
        model.save(target)
    model.save(target, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temporary or backup directory left behind
    with pytest.raises(FileNotFoundError, match="no saved cellflow model"):
        cf.ResponseModel.load(tmp_path / "nothing")
    loaded = cf.ResponseModel.load(target)
    with pytest.raises(cf.CellflowValueError, match="without its training data"):
        loaded.fit()


def test_prediction_anndata_layout(toy):
    model = cf.ResponseModel(toy, rep="X_pca", dose_key="dose", covariate_keys=("patient",), method="mean_shift").fit()
    source = toy[(toy.obs.condition == "control") & (toy.obs.patient == "P1")]
    pred = model.predict(source, ["A", "B+A"], dose=[10.0, "1+1"])
    assert pred.n_obs == 2 * source.n_obs
    assert pred.obsm["X_pca"].shape == (2 * source.n_obs, 3)
    assert list(pred.obs["condition"].cat.categories) == ["A", "A+B"]
    assert pred.obs["dose"].tolist() == ["10"] * source.n_obs + ["1+1"] * source.n_obs
    assert (pred.obs["patient"] == "P1").all()  # source obs carried over
    assert pred.obs_names.is_unique


def test_covariates_from_source_obs_per_cell(toy):
    model = cf.ResponseModel(toy, rep="X", dose_key="dose", covariate_keys=("patient",), method="mean_shift").fit()
    source = toy[toy.obs.condition == "control"]
    pred = model.predict(source, "A", dose=1.0)
    shift = pred.X - source.X
    for patient, expected in (("P1", [1, 0, 0]), ("P2", [3, 0, 0]), ("P3", [2, 0, 0])):
        np.testing.assert_allclose(shift[(source.obs.patient == patient).to_numpy()].mean(0), expected, atol=1e-5)
    # an explicit covariate overrides obs
    forced = model.predict(source, "A", dose=1.0, covariates={"patient": "P2"})
    np.testing.assert_allclose((forced.X - source.X).mean(0), [3, 0, 0], atol=1e-5)


def test_same_seed_same_prediction(toy):
    model = cf.ResponseModel(toy, rep="X", method="gaussian_ot").fit(seed=3)
    source = toy[toy.obs.condition == "control"]
    np.testing.assert_array_equal(model.predict(source, "A", seed=0).X, model.predict(source, "A", seed=0).X)


def test_array_source_accepted(toy):
    model = cf.ResponseModel(toy, rep="X", method="mean_shift").fit()
    pred = model.predict(np.zeros((4, 3), np.float32), "A")
    assert isinstance(pred, ad.AnnData) and pred.shape == (4, 3)


def test_unseen_or_missing_covariates_warn_and_known_ones_do_not(toy):
    import warnings

    model = cf.ResponseModel(toy, rep="X", dose_key="dose", covariate_keys=("patient",), method="mean_shift").fit()
    source = toy[toy.obs.condition == "control"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.predict(source, "A", dose=1.0)  # every patient seen: silent
        model.predict(source, "A", dose=1.0, covariates={"patient": "P2"})
    with pytest.warns(UserWarning, match=r"covariate 'patient': \['P9'\] did not occur in the training data \(values seen: \['P1', 'P2', 'P3'\]\)"):
        typo = model.predict(source, "A", dose=1.0, covariates={"patient": "P9"})
    with pytest.warns(UserWarning, match="covariate 'patient' is neither given in covariates= nor a column of source.obs"):
        from_array = model.predict(np.asarray(source.X), "A", dose=1.0)
    # both are predicted as an unknown patient, i.e. the same way
    np.testing.assert_array_equal(typo.X, from_array.X)
