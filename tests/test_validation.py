"""Every bad input gets an error of the documented type naming the offending key or value."""

import numpy as np
import pytest
from _toy import toy_adata

import cellflow as cf


@pytest.fixture
def adata():
    return toy_adata(n=10)


def make(adata, **kwargs):
    args = dict(rep="X", perturbation_key="condition", control="control", method="mean_shift")
    args.update(kwargs)
    return cf.ResponseModel(adata, **args)


def test_unknown_rep_lists_choices(adata):
    with pytest.raises(cf.CellflowKeyError, match=r"rep='X_umap'.*valid choices.*'X_pca'.*'counts'"):
        make(adata, rep="X_umap")


@pytest.mark.parametrize(
    "kwargs, argument, value",
    [
        ({"perturbation_key": "drug"}, "perturbation_key", "drug"),
        ({"dose_key": "conc"}, "dose_key", "conc"),
        ({"covariate_keys": ("patient", "donor")}, "covariate_keys", "donor"),
    ],
)
def test_missing_obs_columns(adata, kwargs, argument, value):
    with pytest.raises(cf.CellflowKeyError) as err:
        make(adata, **kwargs)
    message = str(err.value)
    assert f"{argument}={value!r}" in message and "'condition'" in message  # lists the valid columns


def test_a_key_read_as_a_feature_says_how_to_keep_it_as_metadata(adata, tmp_path):
    import pandas as pd

    table = pd.DataFrame(adata.X, columns=["g0", "g1", "g2"])
    table["condition"] = adata.obs["condition"].to_numpy()
    table["patient_id"] = adata.obs["patient"].str[1:].astype(int).to_numpy()  # numeric donor ids
    table.to_csv(tmp_path / "cells.csv", index=False)
    cells = cf.datasets.read(tmp_path / "cells.csv")
    with pytest.raises(cf.CellflowKeyError, match=r"'patient_id' is a feature.*obs_columns="):
        make(cells, covariate_keys=("patient_id",))
    make(cf.datasets.read(tmp_path / "cells.csv", obs_columns=["condition", "patient_id"]), covariate_keys=("patient_id",))


def test_control_value_absent(adata):
    with pytest.raises(cf.CellflowValueError, match=r"control='ctrl'.*values present.*'control'"):
        make(adata, control="ctrl")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_cells(adata, bad):
    adata.X[3, 1] = bad
    with pytest.raises(cf.CellflowValueError, match=r"rep='X'.*NaN or inf.*\[3\]"):
        make(adata)


def test_dose_that_does_not_parse(adata):
    adata.obs["dose"] = adata.obs["dose"].astype(object)
    adata.obs.iloc[-1, adata.obs.columns.get_loc("dose")] = "high"
    with pytest.raises(cf.CellflowValueError, match=r"dose 'high' in column 'dose'.*'A\+B'"):
        make(adata, dose_key="dose")


def test_dose_not_aligned_with_members(adata):
    adata.obs["dose"] = adata.obs["dose"].astype(object)
    adata.obs.iloc[-1, adata.obs.columns.get_loc("dose")] = "1+1+1"
    with pytest.raises(cf.CellflowValueError, match=r"dose '1\+1\+1'.*3 parts.*'A\+B' has 2"):
        make(adata, dose_key="dose")


def test_treated_cell_without_a_dose(adata):
    adata.obs["dose"] = adata.obs["dose"].astype(object)
    controls = np.flatnonzero(adata.obs["condition"] == "control")
    adata.obs.iloc[controls, adata.obs.columns.get_loc("dose")] = None  # controls may lack a dose
    make(adata, dose_key="dose")
    treated = adata.obs_names[adata.obs["condition"] != "control"][4]
    adata.obs.loc[treated, "dose"] = np.nan
    with pytest.raises(cf.CellflowValueError, match=rf"dose_key='dose': 1 treated cell.*missing dose.*{treated}"):
        make(adata, dose_key="dose")


def test_missing_perturbation_label(adata):
    adata.obs["condition"] = adata.obs["condition"].astype(object)
    adata.obs.iloc[0, 0] = None
    with pytest.raises(cf.CellflowValueError, match=r"perturbation_key='condition'.*missing value.*cell0"):
        make(adata)


def test_only_controls(adata):
    controls = adata[adata.obs.condition == "control"].copy()
    with pytest.raises(cf.CellflowValueError, match="only control cells"):
        make(controls)


def test_condition_with_no_cells_in_split(adata):
    with pytest.raises(cf.CellflowValueError, match=r"condition 'C' has no cells.*'A\+B'"):
        cf.data.split_conditions(adata, "C")


def test_unknown_method_and_option(adata):
    with pytest.raises(cf.CellflowKeyError, match=r"method='ot_magic'.*valid choices.*'mean_shift'"):
        make(adata, method="ot_magic")
    with pytest.raises(cf.CellflowKeyError, match=r"option 'shrinkge'.*'gaussian_ot'.*valid options.*'shrinkage'"):
        make(adata, method="gaussian_ot", shrinkge=0.1)
    with pytest.raises(cf.CellflowValueError, match=r"shrinkage=2.0"):
        make(adata, method="gaussian_ot", shrinkage=2.0)


def test_embedding_table_missing_vocabulary_member(adata):
    with pytest.raises(cf.CellflowKeyError, match=r"no vector for perturbation\(s\) \['B'\]"):
        make(adata, perturbation_embeddings={"A": [1.0, 0.0]})
    with pytest.raises(cf.CellflowValueError, match="differ in length"):
        make(adata, perturbation_embeddings={"A": [1.0, 0.0], "B": [1.0]})


def test_predict_errors(adata):
    model = make(adata, dose_key="dose", covariate_keys=("patient",))
    source = adata[adata.obs.condition == "control"]
    with pytest.raises(cf.CellflowValueError, match="not fitted"):
        model.predict(source, "A")
    model.fit()
    with pytest.raises(cf.CellflowKeyError, match=r"perturbation 'Z'.*no entry in perturbation_embeddings.*'A', 'B'"):
        model.predict(source, "A+Z", dose="1+1")
    with pytest.raises(cf.CellflowValueError, match=r"source has 2 features.*trained on 3.*\(n, 3\)"):
        model.predict(np.zeros((5, 2)), "A")
    with pytest.raises(cf.CellflowKeyError, match=r"covariates key 'donor'.*valid choices.*'patient'"):
        model.predict(source, "A", dose=1.0, covariates={"donor": "P1"})
    with pytest.raises(cf.CellflowValueError, match=r"dose 'x'.*'A'"):
        model.predict(source, "A", dose="x")
    with pytest.raises(cf.CellflowValueError, match="dose has 2 entries but perturbation has 1"):
        model.predict(source, ["A"], dose=[1.0, 2.0])
    with pytest.raises(cf.CellflowKeyError, match="rep='X_pca'"):
        cf.ResponseModel(adata, rep="X_pca", method="identity").fit().predict(_strip_obsm(source), "A")


def _strip_obsm(source):
    copy = source.copy()
    del copy.obsm["X_pca"]
    return copy


def test_user_adata_never_modified(adata):
    before = adata.copy()
    model = make(adata, dose_key="dose", covariate_keys=("patient",)).fit()
    source = adata[adata.obs.condition == "control"]
    model.predict(source, ["A", "A+B"], dose=[1.0, "1+1"])
    assert adata.obs.equals(before.obs)
    np.testing.assert_array_equal(adata.X, before.X)
    assert set(adata.obsm) == set(before.obsm) and set(adata.layers) == set(before.layers)
