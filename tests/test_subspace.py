"""Principal subspaces: the axes, the projection round trip, and flow matching on many features."""

import anndata as ad
import jax.numpy as jnp
import numpy as np
import pytest

import cellflow as cf
from cellflow.methods._subspace import AUTO_SUBSPACE_COMPONENTS, choose_subspace
from cellflow.solvers import subspace as principal

SMALL = dict(width=64, depth=2, token_dim=16, context_dim=16, conditions_per_step=2, chunk=50, warmup=20)


def test_principal_subspace_finds_the_top_axes_of_a_known_covariance():
    rng = np.random.default_rng(0)
    d = 60
    axes, _ = np.linalg.qr(rng.normal(size=(d, d)))
    scales = np.concatenate([[6.0, 4.0, 3.0], np.full(d - 3, 0.5)])
    x = (rng.normal(size=(4000, d)) * scales) @ axes.T + 2.0
    sub = principal.principal_subspace(x, 3)
    basis = np.asarray(sub.basis)
    assert basis.shape == (d, 3) and np.allclose(basis.T @ basis, np.eye(3), atol=1e-5)
    # cosines of the principal angles between the found and the true span
    cosines = np.linalg.svd(basis.T @ axes[:, :3], compute_uv=False)
    assert cosines.min() > 0.999
    np.testing.assert_allclose(np.asarray(sub.mean), x.mean(0), atol=1e-4)
    # the same seed gives the same axes; a subsample of the cells gives nearly the same span
    np.testing.assert_array_equal(basis, np.asarray(principal.principal_subspace(x, 3).basis))
    sampled = np.asarray(principal.principal_subspace(x, 3, max_cells=1000).basis)
    assert np.linalg.svd(sampled.T @ axes[:, :3], compute_uv=False).min() > 0.99
    for bad in (0, 61):
        with pytest.raises(cf.CellflowValueError, match=r"n_components must be in \[1, .*60\], got"):
            principal.principal_subspace(x, bad)


def test_embed_keeps_each_cells_remainder_and_replaces_its_coordinates():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(50, 12)), jnp.float32)
    sub = principal.principal_subspace(np.asarray(x), 4)
    np.testing.assert_allclose(principal.embed(sub, principal.project(sub, x), x), x, atol=1e-5)
    z = jnp.asarray(rng.normal(size=(50, 4)), jnp.float32)
    moved = principal.embed(sub, z, x)
    np.testing.assert_allclose(principal.project(sub, moved), z, atol=1e-5)
    outside = lambda y: y - principal.project(sub, y) @ sub.basis.T  # noqa: E731
    np.testing.assert_allclose(outside(moved), outside(x), atol=1e-5)


def test_subspace_option_chooses_components_and_names_the_valid_choices():
    rng = np.random.default_rng(2)

    def cells(d, noise):
        """Three strong axes in ``d`` features plus per-feature noise."""
        axes, _ = np.linalg.qr(rng.normal(size=(d, 3)))
        return (rng.normal(size=(500, 3)) * 3.0 @ axes.T + noise * rng.normal(size=(500, d))).astype(np.float32)

    genes_like, compact = cells(300, 1.0), cells(300, 0.1)
    # measured: the top 20 axes hold 0.23 of the variance of the first and 0.91 of the second
    assert principal.captured_variance(principal.principal_subspace(genes_like, 20), genes_like) < 0.3
    assert choose_subspace(genes_like, "auto").n_components == AUTO_SUBSPACE_COMPONENTS
    assert choose_subspace(compact, "auto") is None
    assert choose_subspace(cells(100, 1.0), "auto") is None  # too few features to bother
    assert choose_subspace(compact, "full") is None
    assert choose_subspace(compact, 30).n_components == 30
    assert choose_subspace(compact[:, :30], 30) is None
    with pytest.raises(cf.CellflowValueError, match=r"subspace=31 .* features \(30\) or cells \(500\); valid: 'auto', 'full'"):
        choose_subspace(compact[:, :30], 31)
    adata = ad.AnnData(np.zeros((4, 3), np.float32), obs={"condition": ["control", "control", "A", "A"]})
    with pytest.raises(cf.CellflowValueError, match=r"subspace='pca'.*'auto', 'full' or a positive integer"):
        cf.ResponseModel(adata, method="flow_matching", subspace="pca")
    # numpy numbers (from a grid), also inside lists, are taken and kept as Python ones, so that
    # the model saves as JSON
    options = cf.ResponseModel(
        adata, rep="X", method="flow_matching", subspace=np.int64(3), warmup=np.int64(10), learning_rate=np.float32(1e-3)
    ).options
    assert [type(options[k]) for k in ("subspace", "warmup", "learning_rate")] == [int, int, float]
    hidden = cf.ResponseModel(adata, rep="X", method="neural_ot", map="per_condition", hidden=[np.int64(8)]).options["hidden"]
    assert hidden == [8] and type(hidden[0]) is int


def many_features_data(n=400, d=150, seed=0, noise=0.6):
    """Cells in 150-d: three high-variance axes where state and response live, isotropic noise
    in every feature. Drug A shifts the first axis by +5 in state 0 and -3 in state 1 (cell
    state is the sign of the second axis); drug B scales the third axis by 2."""
    rng = np.random.default_rng(seed)
    axes, _ = np.linalg.qr(rng.normal(size=(d, 3)))

    def cells(label, m):
        z = rng.normal(size=(m, 3)) * np.array([1.0, 3.0, 1.0])
        if label == "A":
            z[:, 0] += np.where(z[:, 1] > 0, 5.0, -3.0)
        if label == "B":
            z[:, 2] *= 2.0
        return z @ axes.T + noise * rng.normal(size=(m, d))

    labels = ["control", "A", "B"]
    x = np.vstack([cells(label, n) for label in labels]).astype(np.float32)
    train = ad.AnnData(x, obs={"condition": np.repeat(labels, n)})
    source = ad.AnnData(cells("control", n).astype(np.float32), obs={"condition": ["control"] * n})
    truth = cells("A", n).astype(np.float32)
    return train, source, truth


def test_flow_matching_on_many_features_moves_cells_in_the_subspace_and_keeps_their_remainder(tmp_path):
    train, source, truth = many_features_data()
    model = cf.ResponseModel(train, rep="X", method="flow_matching", **SMALL).fit(steps=300, batch_size=64, progress=False)
    state = model.state_
    assert state.subspace is not None and state.subspace.basis.shape == (150, AUTO_SUBSPACE_COMPONENTS)
    pred = model.predict(source, "A", seed=0).X

    # outside the subspace every cell keeps its own remainder, moved by A's mean shift there
    basis = np.asarray(state.subspace.basis)
    outside = lambda y: y - (y - np.asarray(state.subspace.mean)) @ basis @ basis.T  # noqa: E731
    shift_outside = np.asarray(state.outside.offset)[list(model.spec_.groups["condition"]).index("A")]
    np.testing.assert_allclose(outside(pred), outside(source.X) + shift_outside, atol=2e-4)

    # inside it the flow learned the state-dependent response: far better than no effect or
    # one shift for all (measured at 300 steps: energy distance 0.088 vs mean_shift 0.219, identity
    # 0.247; the top 20 axes hold 0.40 of the variance, so "auto" chose the subspace)
    distance = lambda x: cf.metrics.energy_distance(x, truth)  # noqa: E731
    mean_shift = cf.ResponseModel(train, rep="X", method="mean_shift").fit().predict(source, "A").X
    assert distance(pred) < 0.5 * min(distance(mean_shift), distance(source.X))

    model.save(tmp_path / "model")
    again = cf.ResponseModel.load(tmp_path / "model")
    np.testing.assert_array_equal(again.predict(source, "A", seed=0).X, pred)


def test_a_model_saved_before_the_subspace_option_loads_in_the_whole_representation(tmp_path):
    import json

    train, source, _ = many_features_data(n=100)
    model = cf.ResponseModel(train, rep="X", method="flow_matching", subspace="full", **SMALL)
    model.fit(steps=50, batch_size=32, progress=False)
    pred = model.predict(source, "A", seed=0).X
    model.save(tmp_path / "model")
    # what such a model's config looked like: no "subspace" option, so "auto" would now apply
    config_file = tmp_path / "model" / "cellflow.json"
    config = json.loads(config_file.read_text())
    del config["options"]["subspace"]
    config_file.write_text(json.dumps(config))
    again = cf.ResponseModel.load(tmp_path / "model")
    assert again.state_.subspace is None
    np.testing.assert_array_equal(again.predict(source, "A", seed=0).X, pred)


def test_a_combination_member_never_seen_alone_does_not_drop_the_other_members_outside_shift():
    # E is observed only within C+E and has no embedding: mean_shift cannot place it, but A's
    # shift outside the subspace must still move A+E's cells (it used to be dropped whole)
    rng = np.random.default_rng(3)
    d, n = 40, 60
    # four strong axes span the subspace; the shifts are small and spread over every feature
    axes = np.linalg.qr(rng.normal(size=(d, 4)))[0]

    def cells(shift=0.0):
        return (5.0 * rng.normal(size=(n, 4)) @ axes.T + rng.normal(size=(n, d)) + shift).astype(np.float32)

    shifts = {label: 0.5 * rng.normal(size=d) for label in ("A", "C", "C+E")}
    labels = ["control", "A", "C", "C+E"]
    train = ad.AnnData(np.vstack([cells(shifts.get(label, 0.0)) for label in labels]), obs={"condition": np.repeat(labels, n)})
    source = ad.AnnData(cells(), obs={"condition": ["control"] * n})
    model = cf.ResponseModel(train, rep="X", method="flow_matching", subspace=np.int64(4), **SMALL)
    model.fit(steps=10, batch_size=16, progress=False)
    state = model.state_
    basis, centre = np.asarray(state.subspace.basis), np.asarray(state.subspace.mean)
    outside = lambda y: y - (y - centre) @ basis @ basis.T  # noqa: E731
    shift_of_a = np.asarray(state.outside.offset)[list(model.spec_.groups["condition"]).index("A")]
    assert np.linalg.norm(shift_of_a) > 1.0
    with pytest.warns(UserWarning, match=r"'A\+E': perturbation\(s\) \['E'\] were never observed alone") as record:
        pred = model.predict(source, "A+E", seed=0).X
    assert record[0].filename == __file__  # the warning points at the user's call
    np.testing.assert_allclose(outside(pred), outside(source.X) + shift_of_a, atol=2e-4)


def test_a_whole_representation_run_resumes_checkpoints_whatever_the_subspace_spelling(tmp_path):
    # "auto" on 150 compact-enough features and "full" both run in the whole representation, as
    # every run did before the option existed: their checkpoints are the same run's
    train, source, _ = many_features_data(n=60, noise=0.1)
    assert choose_subspace(train.X, "auto") is None
    args = dict(rep="X", method="flow_matching", checkpoint_dir=str(tmp_path / "run"), checkpoint_every=10, **SMALL)
    fit = dict(batch_size=16, progress=False)
    whole = cf.ResponseModel(train, **args, subspace="auto").fit(steps=30, **fit)
    resumed = cf.ResponseModel(train, **args, subspace="full").fit(steps=30, resume=True, **fit)
    np.testing.assert_array_equal(resumed.predict(source, "A", seed=0).X, whole.predict(source, "A", seed=0).X)
    # a run in 5 components is another model
    with pytest.raises(cf.CellflowValueError, match=r"subspace_components: None there, 5 now"):
        cf.ResponseModel(train, **args, subspace=5).fit(steps=30, resume=True, **fit)


@pytest.mark.parametrize(
    "method, options",
    [
        ("schrodinger_bridge", {}),
        ("neural_ot", {}),
        ("neural_ot", {"map": "per_condition", "hidden": [16, 16]}),
        ("diffusion", {}),
    ],
)
def test_every_learned_method_fits_in_the_subspace_and_keeps_each_cells_remainder(tmp_path, method, options):
    train, source, _ = many_features_data(n=120)
    small = {"chunk": 20} if options.get("map") else SMALL  # the ICNN duals take none of the field's options
    model = cf.ResponseModel(train, rep="X", method=method, **small, **options).fit(steps=20, batch_size=32, progress=False)
    state = model.state_
    assert state.subspace is not None and state.subspace.basis.shape == (150, AUTO_SUBSPACE_COMPONENTS)
    pred = model.predict(source, "A", seed=0).X
    basis, centre = np.asarray(state.subspace.basis), np.asarray(state.subspace.mean)
    outside = lambda y: y - (y - centre) @ basis @ basis.T  # noqa: E731
    shift_outside = np.asarray(state.outside.offset)[list(model.spec_.groups["condition"]).index("A")]
    np.testing.assert_allclose(outside(pred), outside(source.X) + shift_outside, atol=2e-4)
    model.save(tmp_path / "model")
    np.testing.assert_array_equal(cf.ResponseModel.load(tmp_path / "model").predict(source, "A", seed=0).X, pred)
    if method == "diffusion":  # every method reads the option through the same choose_subspace
        whole = cf.ResponseModel(train, rep="X", method=method, subspace="full", **small).fit(steps=2, batch_size=32, progress=False)
        assert whole.state_.subspace is None


def test_the_bridge_keeps_a_time_course_whole_and_says_why_it_cannot_take_a_subspace():
    # 150 genes-like features: "auto" would take a subspace without the time course
    adata = cf.datasets.time_course(n_cells=60, n_features=150, noise=1.0, seed=0)
    args = dict(rep="X", method="schrodinger_bridge", time_key="time", chunk=10, width=32, depth=1)
    model = cf.ResponseModel(adata, **args).fit(steps=2, batch_size=16, progress=False)
    assert model.state_.subspace is None
    with pytest.raises(cf.CellflowValueError, match=r"subspace=5 is not supported together with time_key.*'auto' or 'full'"):
        cf.ResponseModel(adata, **args, subspace=5).fit(steps=2, progress=False)
