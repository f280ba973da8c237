import os

import anndata as ad
import numpy as np
import pandas as pd
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
    # observed and predicted cells concatenate for a joint plot; the shared embedding survives
    both = ad.concat([source, pred], label="origin", keys=["observed", "predicted"])
    assert both.obsm["X_pca"].shape == (3 * source.n_obs, 3)


def test_layer_prediction_concatenates_with_observed_cells(toy):
    model = cf.ResponseModel(toy, rep="counts", dose_key="dose", covariate_keys=("patient",), method="mean_shift").fit()
    source = toy[(toy.obs.condition == "control") & (toy.obs.patient == "P1")]
    pred = model.predict(source, "A", dose=10.0)
    np.testing.assert_array_equal(pred.X, pred.layers["counts"])
    assert not np.shares_memory(pred.X, pred.layers["counts"])
    both = ad.concat([source, pred], label="origin", keys=["observed", "predicted"])
    np.testing.assert_array_equal(both.layers["counts"][source.n_obs:], pred.layers["counts"])
    np.testing.assert_array_equal(both.layers["counts"][: source.n_obs], source.layers["counts"])


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
    with pytest.warns(UserWarning, match=r"covariate 'patient': \['P9'\] did not occur in the training data \(values seen: \['P1', 'P2', 'P3'\]\)") as caught:
        typo = model.predict(source, "A", dose=1.0, covariates={"patient": "P9"})
    assert {w.filename for w in caught} == {__file__}  # the warning points at the user's line
    with pytest.warns(UserWarning, match="covariate 'patient' is neither given in covariates= nor a column of source.obs"):
        from_array = model.predict(np.asarray(source.X), "A", dose=1.0)
    # both are predicted as an unknown patient, i.e. the same way
    np.testing.assert_array_equal(typo.X, from_array.X)


def test_overwrite_replaces_only_a_saved_model(toy, tmp_path):
    model = cf.ResponseModel(toy, rep="X", method="mean_shift").fit()
    results = tmp_path / "results"
    results.mkdir()
    (results / "figure1.pdf").write_text("precious")
    with pytest.raises(FileExistsError, match="not a saved cellflow model"):
        model.save(results, overwrite=True)
    assert (results / "figure1.pdf").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    model.save(tmp_path / "empty", overwrite=True)
    assert cf.ResponseModel.load(tmp_path / "empty").method == "mean_shift"


def test_predict_labels_doses_and_covariates_as_a_user_would_group_them():
    adata, _ = cf.datasets.synthetic(n_features=4, n_control=30, n_cells=20, n_patients=2, n_drugs=2, combinations=[])
    model = cf.ResponseModel(adata, rep="X", dose_key="dose", covariate_keys=("patient",), method="mean_shift").fit()
    source = adata[(adata.obs.condition == "control").to_numpy() & (adata.obs.patient == "P1").to_numpy()]
    pred = model.predict(source, ["A", "A", "B"], dose=[1.0, 10.0, 1.0], covariates={"patient": "P2"})
    # doses written as synthetic() writes them ("1.0"), so predictions group with the observed cells
    asked = {("A", "1.0"), ("A", "10.0"), ("B", "1.0")}
    is_asked = [(c, d) in asked for c, d in zip(adata.obs.condition, adata.obs.dose)]
    truth = adata[np.asarray(is_asked) & (adata.obs.patient == "P2").to_numpy()]
    table = cf.metrics.evaluate(pred, truth, rep="X", groupby=["condition", "dose", "patient"], metrics=("energy_distance",))
    assert sorted(map(tuple, table[["condition", "dose", "patient"]].to_numpy())) == [
        ("A", "1.0", "P2"), ("A", "10.0", "P2"), ("B", "1.0", "P2"),
    ]
    # the same condition at two doses: the dose tells the copies of a source cell apart
    first = source.obs_names[0]
    assert pred.obs_names.is_unique and {f"{first}-A@1.0", f"{first}-A@10.0", f"{first}-B"} <= set(pred.obs_names)


def test_predict_rejects_doses_it_cannot_use_and_accepts_non_string_labels(toy):
    no_doses = cf.ResponseModel(toy, rep="X", method="mean_shift").fit()
    source = toy[toy.obs.condition == "control"]
    with pytest.raises(cf.CellflowValueError, match=r"dose=5.0 was given.*without a dose_key"):
        no_doses.predict(source, "A", dose=5.0)
    with_doses = cf.ResponseModel(toy, rep="X", dose_key="dose", method="mean_shift").fit()
    for bad in (0.0, -1.0, "1+-1"):
        with pytest.raises(cf.CellflowValueError, match="must be positive and finite"):
            with_doses.predict(source, "A+B" if "+" in str(bad) else "A", dose=bad)
    with pytest.raises(cf.CellflowValueError, match="must name conditions"):
        no_doses.predict(source, None)

    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(0)
    integer_labels = ad.AnnData(
        rng.normal(size=(60, 3)).astype(np.float32),
        obs=pd.DataFrame({"condition": [0] * 30 + [1] * 30}, index=[f"c{i}" for i in range(60)]),
    )
    model = cf.ResponseModel(integer_labels, rep="X", control=0, method="mean_shift").fit()
    np.testing.assert_array_equal(model.predict(integer_labels[:5], 1).X, model.predict(integer_labels[:5], "1").X)


def test_predict_warns_about_treated_source_cells_and_missing_covariates(toy):
    model = cf.ResponseModel(toy, rep="X", covariate_keys=("patient",), method="mean_shift").fit()
    mixed = ad.concat([toy[toy.obs.condition == "control"][:40], toy[toy.obs.condition == "A"][:40]])
    with pytest.warns(UserWarning, match=r"40 of 80 source cells are not control cells.*'A'"):
        model.predict(mixed, "B")
    source = toy[toy.obs.condition == "control"].copy()
    source.obs["patient"] = source.obs["patient"].astype(object)
    source.obs.iloc[:3, source.obs.columns.get_loc("patient")] = np.nan
    with pytest.warns(UserWarning, match=r"covariate 'patient' is missing for 3 source cell"):
        pred = model.predict(source, "B")
    with pytest.warns(UserWarning, match="did not occur in the training data"):
        expected = model.predict(source[:3], "B", covariates={"patient": "P9"}).X  # unknown, not a patient named 'nan'
    np.testing.assert_allclose(pred.X[:3], expected, atol=1e-6)


def test_a_control_label_differing_only_in_case_warns(toy):
    adata = toy.copy()
    adata.obs["condition"] = adata.obs["condition"].astype(str)
    adata.obs.iloc[:5, adata.obs.columns.get_loc("condition")] = "Control"
    with pytest.warns(UserWarning, match=r"'Control'.*differ from control='control' only in case"):
        cf.ResponseModel(adata, rep="X", method="mean_shift")


def test_gaussian_ot_names_a_group_too_small_for_a_covariance(toy):
    adata = toy[~((toy.obs.condition == "B").to_numpy() & (toy.obs.patient == "P2").to_numpy() & (toy.obs.dose == "10.0").to_numpy())]
    lone = toy[(toy.obs.condition == "B").to_numpy() & (toy.obs.patient == "P2").to_numpy() & (toy.obs.dose == "10.0").to_numpy()][:1]
    adata = ad.concat([adata, lone])
    with pytest.raises(cf.CellflowValueError, match=r"condition 'B' at dose '10' \(patient='P2'\) has 1 treated cell.*mean_shift"):
        cf.ResponseModel(adata, rep="X", dose_key="dose", covariate_keys=("patient",), method="gaussian_ot").fit()


def test_evaluate_and_plots_read_a_prediction_in_the_representation_it_was_made_in(toy):
    import matplotlib

    matplotlib.use("Agg")
    model = cf.ResponseModel(toy, rep="X_pca", method="mean_shift").fit()
    pred = model.predict(toy[toy.obs.condition == "control"], "A")
    truth = toy[toy.obs.condition == "A"]
    table = cf.metrics.evaluate(pred, truth, metrics=("energy_distance",))  # pred has no X: its rep is X_pca
    assert table["energy_distance"].iloc[0] == cf.metrics.evaluate(pred, truth, rep="X_pca", metrics=("energy_distance",))["energy_distance"].iloc[0]
    with pytest.raises(cf.CellflowValueError, match=r"rep='X' is empty.*valid choices.*'X_pca'"):
        cf.metrics.evaluate(pred, truth, rep="X")
    cf.pl.embedding({"predicted": pred, "observed": truth.obsm["X_pca"]})
    with pytest.raises(cf.CellflowValueError, match="same number of features"):
        cf.pl.embedding({"predicted": pred, "observed": truth.X[:, :2]})
    # every AnnData is read in the prediction's space, even when X has the same width
    shifted = truth.copy()
    shifted.obsm["X_pca"] = shifted.obsm["X_pca"] + 100.0
    ax = cf.pl.embedding({"observed": shifted, "predicted": pred})
    observed_points = ax.collections[0].get_offsets()
    reference = cf.pl.embedding({"observed": shifted.obsm["X_pca"], "predicted": pred.obsm["X_pca"]}).collections[0].get_offsets()
    np.testing.assert_allclose(np.asarray(observed_points), np.asarray(reference), atol=1e-4)


def test_predict_takes_any_iterable_of_conditions(toy):
    model = cf.ResponseModel(toy, rep="X", method="mean_shift").fit()
    source = toy[toy.obs.condition == "control"][:5]
    singles = toy[toy.obs.condition.isin(["A", "B"]).to_numpy()].obs.condition  # categorical
    expected = model.predict(source, ["A", "B"]).X
    for conditions in (singles.unique(), singles.astype("string").unique(), {"A": 1, "B": 2}.keys(), (c for c in "AB")):
        np.testing.assert_array_equal(model.predict(source, conditions).X, expected)


def test_training_curve_draws_the_losses_not_the_clock():
    import matplotlib
    import pandas as pd

    matplotlib.use("Agg")
    history = pd.DataFrame({"step": [100], "loss": [0.5], "interaction": [0.01], "seconds": [9.3]})
    ax = cf.pl.training_curve(history)
    assert [line.get_label() for line in ax.get_lines()] == ["loss", "interaction"]
    assert ax.get_lines()[0].get_marker() == "o" and ax.get_yscale() == "log"  # one chunk: a visible point
    signed = pd.DataFrame({"step": np.arange(1, 31), "w2": np.linspace(-1, 1, 30)})
    assert cf.pl.training_curve(signed).get_yscale() == "linear"
    with pytest.raises(cf.CellflowKeyError, match=r"columns \['lr'\].*valid choices"):
        cf.pl.training_curve(history, columns=["lr"])
    with pytest.raises(cf.CellflowValueError, match="closed-form methods have none"):
        cf.pl.training_curve(pd.DataFrame())


def test_metric_bars_names_groups_of_a_numeric_column_and_slants_crowded_labels():
    import matplotlib

    matplotlib.use("Agg")
    by_dose = pd.DataFrame({"dose": [0.1, 1.0, 10.0], "n_pred": [5, 5, 5], "energy_distance": [1.0, 2.0, 3.0]})
    ax = cf.pl.metric_bars(by_dose)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.1", "1.0", "10.0"]
    assert ax.get_xticklabels()[0].get_rotation() == 0
    many = pd.DataFrame({"condition": [f"drug{i}+drug{i + 1}" for i in range(6)], "energy_distance": np.arange(6.0)})
    assert cf.pl.metric_bars(many).get_xticklabels()[0].get_rotation() == 30
    # long labels with room to spare stay level
    tasks = pd.DataFrame({"task": ["held-out combinations", "unseen patient (P4)"], "energy_distance": [1.0, 2.0]})
    assert cf.pl.metric_bars(tasks).get_xticklabels()[0].get_rotation() == 0


def test_a_dose_model_asked_without_a_dose_says_which_dose_it_uses(toy):
    model = cf.ResponseModel(toy, rep="X", dose_key="dose", method="mean_shift").fit()
    source = toy[toy.obs.condition == "control"][:5]
    with pytest.warns(UserWarning, match=r"no dose given for \['A'\], so they are predicted at dose 1"):
        undosed = model.predict(source, "A")
    np.testing.assert_array_equal(undosed.X, model.predict(source, "A", dose=1.0).X)


def test_a_dataframe_source_is_matched_to_the_genes_by_column_name(toy):
    model = cf.ResponseModel(toy, rep="X", method="mean_shift").fit()
    source = toy[toy.obs.condition == "control"]
    expected = model.predict(source, "A")
    names = [str(v) for v in toy.var_names]
    frame = pd.DataFrame(np.asarray(source.X), index=source.obs_names, columns=names)
    shuffled = frame[names[::-1]].assign(extra=1.0)  # another order and one more column
    pred = model.predict(shuffled, "A")
    np.testing.assert_allclose(pred.X, expected.X, atol=1e-6)
    assert list(pred.obs_names) == list(expected.obs_names)  # the index names the cells
    with pytest.raises(cf.CellflowKeyError, match=rf"lacks 1 of the model's 3 features.*{names[0]!r}"):
        model.predict(frame.drop(columns=names[0]), "A")


def test_an_explicit_none_covariate_is_an_unknown_value_not_the_text_none(toy):
    import warnings

    model = cf.ResponseModel(toy, rep="X", covariate_keys=("patient",), method="mean_shift").fit()
    source = toy[toy.obs.condition == "control"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for explicitly: nothing to warn about
        unknown = model.predict(source, "A", covariates={"patient": None})
    with pytest.warns(UserWarning, match="did not occur in the training data"):
        new_patient = model.predict(source, "A", covariates={"patient": "P9"})
    np.testing.assert_array_equal(unknown.X, new_patient.X)
    assert unknown.obs["patient"].isna().all()
    assert unknown.uns["cellflow"]["groupby"] == ["condition"]
