import jax
import numpy as np
import pandas as pd
import pytest
from _toy import toy_adata

import cellflow as cf
from cellflow.data import (
    ALL_CONTROLS,
    Condition,
    build_training_arrays,
    condition_weights,
    make_embedding_table,
    parse_condition,
    prepare,
    sample_batch,
    sample_batches,
)


def test_parse_condition_canonical_order_and_doses():
    c = parse_condition("B+A", "0.5+2", control="control")
    assert c == Condition(("A", "B"), (2.0, 0.5))
    assert c.label == "A+B" and c.dose_label == "2+0.5"
    assert parse_condition("A", None, control="control") == Condition(("A",), (1.0,))
    assert parse_condition("A+B", 3.0, control="control").doses == (3.0, 3.0)
    assert parse_condition("control", "0", control="control").is_control
    # control members inside a combination are dropped, with their dose
    assert parse_condition("control+A", "0+2", control="control") == Condition(("A",), (2.0,))


@pytest.mark.parametrize("bad", ["A++B", "+A"])
def test_parse_condition_empty_member(bad):
    with pytest.raises(cf.CellflowValueError, match="empty member"):
        parse_condition(bad, control="control")


def test_prepare_groups_and_pools():
    adata = toy_adata()
    data = prepare(adata, rep="X", dose_key="dose", covariate_keys=("patient",))
    groups = data.spec.groups
    assert len(groups) == 9  # A, B x 2 doses x 2 patients + A+B for P1
    assert set(groups["patient"]) == {"P1", "P2"}
    assert not groups["pool_fallback"].any()
    pools = data.spec.pools
    assert list(pools["patient"]) == ["P1", "P2", "P3", ALL_CONTROLS]
    for g in range(data.n_groups):
        patient = groups["patient"].iloc[g]
        np.testing.assert_allclose(data.source_cells(g).mean(0), adata[(adata.obs.condition == "control") & (adata.obs.patient == patient)].X.mean(0), atol=1e-5)
    assert data.spec.vocabulary == ("A", "B") and data.spec.max_members == 2
    assert data.spec.covariate_values == {"patient": ("P1", "P2", "P3")}


def test_prepare_falls_back_to_all_controls_with_warning():
    adata = toy_adata()
    adata = adata[~((adata.obs.condition == "control") & (adata.obs.patient == "P2"))].copy()
    with pytest.warns(UserWarning, match="paired with all control cells"):
        data = prepare(adata, rep="X", dose_key="dose", covariate_keys=("patient",))
    fallback = data.spec.groups[data.spec.groups["pool_fallback"]]
    assert set(fallback["patient"]) == {"P2"}
    assert (fallback["pool"] == len(data.spec.pools) - 1).all()


def test_prepare_does_not_modify_input():
    adata = toy_adata()
    before = adata.copy()
    prepare(adata, rep="X", dose_key="dose", covariate_keys=("patient",))
    assert adata.obs.equals(before.obs) and np.array_equal(adata.X, before.X)
    assert list(adata.obsm) == list(before.obsm) and list(adata.uns) == list(before.uns)


def test_sparse_and_layer_and_obsm_representations():
    import scipy.sparse as sp

    adata = toy_adata()
    dense = prepare(adata, rep="X").cells
    adata.X = sp.csr_matrix(adata.X)
    np.testing.assert_array_equal(prepare(adata, rep="X").cells, dense)
    np.testing.assert_array_equal(prepare(adata, rep="counts").cells, dense)
    np.testing.assert_array_equal(prepare(adata, rep="X_pca").cells, dense)


def test_embeddings_default_one_hot_and_user_table():
    table = make_embedding_table(("A", "B"))
    assert table.one_hot and table.vectors.shape == (2, 2)
    user = make_embedding_table(("A", "B"), {"A": [1, 0, 0], "B": [0, 1, 0], "C": [0, 0, 1]})
    np.testing.assert_array_equal(user.lookup(["C"]), [[0, 0, 1]])
    frame = make_embedding_table(("A",), pd.DataFrame([[1.0, 2.0]], index=["A"]))
    assert frame.dim == 2
    # a (1, d) row is a vector; a (k, d) block is refused rather than flattened
    assert make_embedding_table(("A",), {"A": np.ones((1, 3))}).dim == 3
    with pytest.raises(cf.CellflowValueError, match=r"must be vectors.*'B': \(2, 3\)"):
        make_embedding_table(("A", "B"), {"A": np.ones(6), "B": np.ones((2, 3))})


def test_sampler_shapes_membership_and_jit():
    adata = toy_adata()
    data = prepare(adata, rep="X", dose_key="dose", covariate_keys=("patient",))
    arrays = build_training_arrays(data, make_embedding_table(data.spec.vocabulary))
    batch = sample_batch(arrays, jax.random.key(0), 8)
    assert batch.source.shape == (8, 3) and batch.target.shape == (8, 3)
    assert batch.condition.members.shape == (2, 2) and batch.condition.mask.shape == (2,)
    for seed in range(20):
        batch = sample_batch(arrays, jax.random.key(seed), 8)
        g = int(batch.group)
        target_rows = {tuple(r) for r in data.target_cells(g)}
        source_rows = {tuple(r) for r in data.source_cells(g)}
        assert all(tuple(r) in target_rows for r in np.asarray(batch.target))
        assert all(tuple(r) in source_rows for r in np.asarray(batch.source))
        condition = data.spec.group_conditions[g]
        assert int(batch.condition.mask.sum()) == len(condition)
        np.testing.assert_allclose(np.asarray(batch.condition.doses)[: len(condition)], condition.doses)
    stacked = sample_batches(arrays, jax.random.key(1), 4, 5)
    assert stacked.source.shape == (5, 4, 3) and stacked.group.shape == (5,)
    # the arrays are padded (to share compiled programs), but only real groups are ever drawn
    assert arrays.group_start.shape[0] > data.n_groups == arrays.n_groups
    drawn = np.asarray(sample_batches(arrays, jax.random.key(2), 1, 2000).group)
    assert set(drawn.tolist()) == set(range(data.n_groups))
    # same key, same batch
    np.testing.assert_array_equal(sample_batch(arrays, jax.random.key(3), 8).target, sample_batch(arrays, jax.random.key(3), 8).target)


def test_condition_weights_rules():
    adata = toy_adata()
    spec = prepare(adata, rep="X", dose_key="dose", covariate_keys=("patient",)).spec
    conditions, covariates = spec.group_conditions, spec.group_covariates

    def weights(label, dose, patient):
        w = condition_weights(parse_condition(label, dose, control="control"), (patient,), conditions, covariates)
        return {(conditions[g].label, conditions[g].dose_label, covariates[g][0]): w[g] for g in np.flatnonzero(w)}

    assert weights("A", 1.0, "P1") == {("A", "1", "P1"): 1.0}
    # nearest dose on a log scale: 4 is nearer to 10 than to 1 in log space
    assert weights("A", 4.0, "P1") == {("A", "10", "P1"): 1.0}
    assert weights("A", 2.0, "P1") == {("A", "1", "P1"): 1.0}
    # unseen patient (P3 has only controls) and unknown patient: average over patients
    assert weights("A", 1.0, "P3") == {("A", "1", "P1"): 0.5, ("A", "1", "P2"): 0.5}
    assert weights("A", 1.0, None) == {("A", "1", "P1"): 0.5, ("A", "1", "P2"): 0.5}
    # observed combination used whole; unobserved for P2 -> whole combination averaged over patients where seen
    assert weights("A+B", "1+1", "P1") == {("A+B", "1+1", "P1"): 1.0}
    with pytest.raises(cf.CellflowKeyError, match="'C'"):
        weights("A+C", "1+1", "P1")


def test_split_helpers():
    adata = toy_adata()
    train, test = cf.data.split_conditions(adata, "B+A", covariate_keys=("patient",))
    assert "A+B" not in set(train.obs.condition) and set(test.obs.condition) == {"A+B", "control"}
    assert set(test.obs.patient) == {"P1"}
    assert (train.obs.condition == "control").sum() == (adata.obs.condition == "control").sum()

    train, test = cf.data.split_combinations(adata, seed=0)
    assert set(test.obs.condition) == {"A+B", "control"}

    train, test = cf.data.split_doses(adata, 10.0, dose_key="dose", perturbations="A")
    held = test[test.obs.condition != "control"]
    assert set(held.obs.condition) == {"A"} and set(held.obs.dose) == {"10.0"}
    assert ((train.obs.condition == "A") & (train.obs.dose == "10.0")).sum() == 0

    train, test = cf.data.split_covariates(adata, {"patient": "P2"})
    assert set(test.obs.patient) == {"P2"}
    assert set(train[train.obs.patient == "P2"].obs.condition) == {"control"}
    assert test.is_view and train.is_view


def test_split_errors_name_the_value():
    adata = toy_adata()
    with pytest.raises(cf.CellflowValueError, match="'Z'.*conditions present"):
        cf.data.split_conditions(adata, "Z")
    with pytest.raises(cf.CellflowValueError, match="P9"):
        cf.data.split_covariates(adata, {"patient": "P9"})
    with pytest.raises(cf.CellflowKeyError, match="'donor'"):
        cf.data.split_covariates(adata, {"donor": "P1"})
    with pytest.raises(cf.CellflowValueError, match="doses present"):
        cf.data.split_doses(adata, 3.0, dose_key="dose")
