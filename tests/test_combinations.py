"""Flow matching on combinations: member and interaction fields, how they combine, unseen
combinations and members. Apart from tests/test_flow_matching.py so that the two files run in
parallel test workers."""

import copy

import anndata as ad
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cellflow as cf
from cellflow.solvers import flow_matching as fm

from test_flow_matching import SMALL, shift_data


@pytest.mark.parametrize("prior", ["none", "mean_shift"])
def test_unseen_perturbation_with_embedding_and_combination(prior):
    # with a prior, the unseen C starts from the baseline's stand-ins (A and B tie: both averaged)
    adata = shift_data(n=100)
    embeddings = {"A": [1.0, 0.0], "B": [0.0, 1.0], "C": [0.7, 0.7]}
    model = cf.ResponseModel(
        adata, rep="X", method="flow_matching", perturbation_embeddings=embeddings, prior=prior, **SMALL
    ).fit(steps=50, batch_size=32, progress=False)
    source = adata[adata.obs.condition == "control"]
    pred = model.predict(source, ["C", "A+B"])
    assert pred.shape == (2 * source.n_obs, 2) and np.isfinite(pred.X).all()
    with pytest.raises(cf.CellflowKeyError, match="'Z'"):
        model.predict(source, "Z")



def shifted_conditions(shifts, seed, n=80):
    """``n`` cells of N(0, I) in 2-d per condition, moved by that condition's shift."""
    rng = np.random.default_rng(seed)
    x = np.vstack([rng.normal(size=(n, 2)) + shift for shift in shifts.values()]).astype(np.float32)
    return ad.AnnData(X=x, obs={"condition": np.repeat(list(shifts), n)})



def test_interaction_penalty_leaves_an_additive_combination_to_the_member_fields():
    """A+B is exactly additive here; the additivity prior keeps the interaction field quiet."""
    shifts = {"control": [0.0, 0.0], "A": [3.0, 0.0], "B": [0.0, -2.0], "A+B": [3.0, -2.0]}
    adata = shifted_conditions(shifts, seed=0)
    interaction = {}
    for penalty in (0.0, 10.0):
        model = cf.ResponseModel(adata, rep="X", method="flow_matching", interaction_penalty=penalty, **{**SMALL, "learning_rate": 1e-2})
        history = model.fit(steps=100, batch_size=32, progress=False).history_
        assert {"loss", "flow", "interaction"} <= set(history)
        interaction[penalty] = history["interaction"].iloc[-1]
        shift = (model.predict(adata[:80], "A+B").X - adata[:80].X).mean(axis=0)
        np.testing.assert_allclose(shift, [3.0, -2.0], atol=0.6)
    assert interaction[10.0] < 0.2 * interaction[0.0]



def test_joint_field_learns_singles_and_combinations_with_one_network():
    """``field="joint"``: one field of the pooled condition instead of one per member."""
    shifts = {"control": [0.0, 0.0], "A": [3.0, 0.0], "B": [0.0, -2.0], "A+B": [1.0, 1.0]}
    adata = shifted_conditions(shifts, seed=1)
    model = cf.ResponseModel(adata, rep="X", method="flow_matching", field="joint", **{**SMALL, "learning_rate": 1e-2})
    history = model.fit(steps=150, batch_size=32, progress=False).history_
    assert (history["interaction"] == 0).all()
    assert "joint_field" in model.state_.params and "member_field" not in model.state_.params
    for condition in ("A", "B", "A+B"):
        shift = (model.predict(adata[:80], condition).X - adata[:80].X).mean(axis=0)
        np.testing.assert_allclose(shift, shifts[condition], atol=0.6, err_msg=condition)
    np.testing.assert_array_equal(model.predict(adata[:80], "control").X, adata[:80].X)
    with pytest.raises(cf.CellflowValueError, match=r"field.*'additive', 'joint'"):
        cf.ResponseModel(adata, rep="X", method="flow_matching", field="sum")



def _random_response_field(field="additive", seed=0):
    """A small additive field with every weight random (the output layers start at zero)."""
    from flax import nnx

    from cellflow.nn import ResponseField

    model = ResponseField(2, 2, (), width=16, depth=2, token_dim=8, context_dim=8, field=field, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [0.5 * jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
    return graphdef, jax.tree.unflatten(treedef, leaves)



def _condition(*members):
    """Two member slots; ``members`` are indices into the one-hot embeddings of A and B."""
    from cellflow.data import ConditionArrays

    embedding = np.zeros((2, 2), np.float32)
    doses, mask = np.zeros(2, np.float32), np.zeros(2, bool)
    for slot, member in enumerate(members):
        embedding[slot, member], doses[slot], mask[slot] = 1.0, 1.0, True
    return ConditionArrays(jnp.asarray(embedding), jnp.asarray(doses), jnp.asarray(mask), jnp.zeros((0,), jnp.int32))



def test_combining_by_displacements_adds_each_members_own_flow_plus_the_interaction():
    """``combine="displacements"``: each member's field moves the source cells on its own, the
    displacements add, and the interaction field adds what it integrates along the combined path;
    singles and joint fields are untouched."""
    graphdef, params = _random_response_field()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 2)), jnp.float32)
    population = x
    push = lambda condition, rule: np.asarray(fm.push(graphdef, params, x, condition, population, combine=rule))
    for single in (_condition(0), _condition(1)):
        np.testing.assert_array_equal(push(single, "displacements"), push(single, "velocities"))

    pair = push(_condition(0, 1), "displacements")
    members_alone = push(_condition(0), "velocities") + push(_condition(1), "velocities") - np.asarray(x)
    # Without the interaction field the pair is exactly the sum of the members' own displacements.
    no_interaction = copy.deepcopy(params)
    no_interaction["interaction_field"]["out"] = jax.tree.map(jnp.zeros_like, params["interaction_field"]["out"])
    additive_pair = np.asarray(fm.push(graphdef, no_interaction, x, _condition(0, 1), population, combine="displacements"))
    np.testing.assert_allclose(additive_pair, members_alone, atol=1e-5)
    # "members" is that prediction with the interaction field in place: it is left out
    np.testing.assert_allclose(push(_condition(0, 1), "members"), members_alone, atol=1e-5)
    for single in (_condition(0), _condition(1)):
        np.testing.assert_array_equal(push(single, "members"), push(single, "velocities"))
    # The interaction field moves the pair on top of that, and summing the fields' velocities along
    # one path is a different prediction.
    assert np.abs(pair - members_alone).mean() > 1e-2
    assert np.abs(push(_condition(0, 1), "velocities") - pair).mean() > 1e-2
    with pytest.raises(cf.CellflowValueError, match=r"combine='sum'.*'displacements', 'members', 'velocities'"):
        push(_condition(0, 1), "sum")

    graphdef, params = _random_response_field("joint")
    joint = lambda rule: np.asarray(fm.push(graphdef, params, x, _condition(0, 1), population, combine=rule))
    np.testing.assert_array_equal(joint("displacements"), joint("velocities"))



def test_combine_auto_keeps_the_trained_flow_for_seen_combinations_and_adds_displacements_for_new_ones():
    shifts = {"control": [0.0, 0.0], "A": [3.0, 0.0], "B": [0.0, -2.0], "C": [-1.0, 1.0], "A+B": [3.0, -2.0]}
    adata = shifted_conditions(shifts, seed=3, n=40)
    model = cf.ResponseModel(adata, rep="X", method="flow_matching", **SMALL).fit(steps=50, batch_size=32, progress=False)
    assert model.options["combine"] == "auto"
    source = adata[adata.obs.condition == "control"]

    def predicted(condition, rule):
        model.options["combine"] = rule
        return model.predict(source, condition, seed=1).X

    for condition, rule in (("A+B", "velocities"), ("B+C", "displacements"), ("A+C", "displacements"), ("C", "velocities")):
        np.testing.assert_array_equal(predicted(condition, "auto"), predicted(condition, rule), err_msg=condition)
    assert not np.allclose(predicted("B+C", "displacements"), predicted("B+C", "velocities"))
    # without the unseen-combination interaction guess, only new combinations change: to members alone
    model.options["unseen_interaction"] = False
    for condition, rule in (("A+B", "velocities"), ("B+C", "members"), ("C", "velocities")):
        np.testing.assert_array_equal(predicted(condition, "auto"), predicted(condition, rule), err_msg=condition)
    assert not np.allclose(predicted("B+C", "members"), predicted("B+C", "displacements"))
    with pytest.raises(cf.CellflowValueError, match=r"combine.*'auto', 'displacements', 'members', 'velocities'"):
        cf.ResponseModel(adata, rep="X", method="flow_matching", combine="sum")
    with pytest.raises(cf.CellflowValueError, match=r"unseen_interaction='no'.*valid choices: \[True, False\]"):
        cf.ResponseModel(adata, rep="X", method="flow_matching", unseen_interaction="no")
