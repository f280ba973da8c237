"""Flow matching: coupling, learning a known map, determinism, save/load, resume, validation."""


import anndata as ad
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cellflow as cf
from cellflow.solvers import flow_matching as fm

SMALL = dict(width=64, depth=2, token_dim=16, context_dim=16, conditions_per_step=2, chunk=50, warmup=20)


def shift_data(n=300, seed=0):
    """control ~ N(0, I) in 2-d; drug A moves cells by (+3, 0), drug B by (0, -2) scaled by |x_0|."""
    rng = np.random.default_rng(seed)
    blocks, labels = [], []
    for label in ("control", "A", "B"):
        x = rng.normal(size=(n, 2))
        if label == "A":
            x = x + np.array([3.0, 0.0])
        if label == "B":
            x = x + np.array([0.0, -2.0]) * np.abs(x[:, :1])
        blocks.append(x)
        labels += [label] * n
    return ad.AnnData(X=np.vstack(blocks).astype(np.float32), obs={"condition": labels})


def test_a_failing_coupling_is_reported_not_silently_replaced_by_random_pairs():
    rng = np.random.default_rng(0)
    x, y = (jnp.asarray(rng.normal(size=(64, 2)) + shift, jnp.float32) for shift in (0.0, 3.0))
    _, _, fell_back = fm.couple(jax.random.key(0), x, y, fm.FlowMatchingConfig(epsilon=1e-6), with_status=True)
    assert bool(fell_back)  # float32 Sinkhorn cannot resolve this epsilon: the batch is paired at random
    _, _, fell_back = fm.couple(jax.random.key(0), x, y, fm.FlowMatchingConfig(), with_status=True)
    assert not bool(fell_back)

    adata = shift_data(n=60)
    with pytest.warns(UserWarning, match=r"coupling failed in \d+% of the batches.*raise the epsilon"):
        model = cf.ResponseModel(adata, rep="X", method="flow_matching", **{**SMALL, "epsilon": 1e-6}).fit(
            steps=50, batch_size=32, progress=False
        )
    assert model.history_["coupling_fallback"].iloc[-1] > 0.5
    with pytest.raises(cf.CellflowValueError, match=r"epsilon=0 for method .flow_matching. is invalid: expected a number > 0"):
        cf.ResponseModel(adata, rep="X", method="flow_matching", epsilon=0)
    for bad in (dict(epsilon=0.0), dict(tau_a=1.5), dict(batch_size=0), dict(sigma=-1.0)):
        with pytest.raises(cf.CellflowValueError, match=f"{next(iter(bad))}=.*must be"):
            fm.FlowMatchingConfig(**bad)


def test_a_batch_sinkhorn_cannot_solve_is_solved_again_at_a_larger_epsilon():
    from ott.geometry import pointcloud
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import acceleration, sinkhorn

    rng = np.random.default_rng(0)
    x, y = (jnp.asarray(rng.normal(size=(64, 2)) + shift, jnp.float32) for shift in (0.0, 3.0))
    solver = sinkhorn.Sinkhorn(threshold=1e-2, max_iterations=500, momentum=acceleration.Momentum(start=20, inner_iterations=10))
    once = solver(linear_problem.LinearProblem(pointcloud.PointCloud(x, y, epsilon=1e-4, scale_cost="mean"))).matrix
    assert not bool(fm.usable_plan(once))  # one accelerated solve at this epsilon gives no usable plan
    x0, x1, fell_back = fm.sample_plan(jax.random.key(0), x, y, epsilon=1e-4, with_status=True)
    assert not bool(fell_back)
    # the retried plan still pairs by proximity: beyond the common shift, pairs are far closer than at random
    shift = jnp.mean(y, 0) - jnp.mean(x, 0)
    independent = jnp.mean(jnp.sum((x[:, None] + shift - y[None]) ** 2, -1))
    assert float(jnp.mean(jnp.sum((x0 + shift - x1) ** 2, -1))) < 0.3 * float(independent)


def test_array_level_choices_are_validated_not_silently_replaced():
    from flax import nnx

    from cellflow.nn import ResponseField
    from cellflow.solvers import diffusion, neural_ot

    with pytest.raises(cf.CellflowValueError, match=r"fit='barycentrix'.*'barycentric'"):
        neural_ot.MongeMapConfig(fit="barycentrix")
    with pytest.raises(cf.CellflowValueError, match=r"pooling='max'.*'attention'"):
        ResponseField(2, 3, (), width=8, depth=1, token_dim=4, context_dim=4, pooling="max", rngs=nnx.Rngs(0))
    with pytest.raises(cf.CellflowValueError, match=r"solver='rk4'.*'heun'"):
        fm._solver("rk4")
    with pytest.raises(cf.CellflowValueError, match=r"sampler='ODE'.*'ode'"):
        diffusion.generate(None, None, jnp.zeros((2, 2)), None, None, jax.random.key(0), diffusion.DiffusionConfig(), sampler="ODE")


def test_a_step_of_ones_own_loop_is_the_scanned_step():
    from cellflow.data import build_training_arrays, make_embedding_table, prepare, sample_batches
    from cellflow.methods import get_method
    from cellflow.train import make_optimizer, step_keys

    data = prepare(shift_data(n=60), rep="X")
    embeddings = make_embedding_table(data.spec.vocabulary, None)
    options = {**get_method("flow_matching").validate_options({}), "width": 16, "depth": 1, "token_dim": 8, "context_dim": 8}
    model = get_method("flow_matching").build(data.spec, embeddings.dim, options)
    optimizer = make_optimizer(1e-3, 6, warmup=2)
    config = fm.FlowMatchingConfig(batch_size=16, conditions_per_step=2)
    graphdef, start = fm.init_state(model, optimizer, jax.random.key(0))
    arrays = build_training_arrays(data, embeddings)

    scanned, scanned_metrics = fm.make_train_chunk(graphdef, optimizer, arrays, config, 3)(start)
    step, state, losses = jax.jit(fm.make_step(graphdef, optimizer, config)), start, []
    for _ in range(3):  # a hand-written loop that draws its batches as the scanned one does
        state, metrics = step(state, sample_batches(arrays, step_keys(state)[0], config.batch_size, config.conditions_per_step))
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 3
    np.testing.assert_allclose(losses, np.asarray(scanned_metrics["loss"]), rtol=1e-5)
    for mine, theirs in zip(jax.tree.leaves(state.params), jax.tree.leaves(scanned.params)):
        np.testing.assert_allclose(np.asarray(mine), np.asarray(theirs), rtol=1e-4, atol=1e-6)


def test_ot_coupling_recovers_a_permutation():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 3)), jnp.float32)
    perm = rng.permutation(64)
    config = fm.FlowMatchingConfig(epsilon=1e-3, sinkhorn_iterations=2000)
    x0, x1 = fm.couple(jax.random.key(0), x, x[perm] + 0.01, config)
    np.testing.assert_allclose(np.asarray(x1), np.asarray(x) + 0.01, atol=1e-5)
    independent = fm.FlowMatchingConfig(coupling="independent")
    _, y1 = fm.couple(jax.random.key(0), x, x[perm], independent)
    assert not np.allclose(np.asarray(y1), np.asarray(x))


def test_a_diverged_sinkhorn_plan_falls_back_to_the_independent_coupling():
    good = jnp.eye(4) / 4
    np.testing.assert_array_equal(np.asarray(fm.checked_plan(good)), np.asarray(good))
    independent = np.full((4, 4), 1 / 16)
    for bad in (good.at[0, 0].set(jnp.nan), good.at[0, 0].set(1e30), good * 3):
        np.testing.assert_allclose(np.asarray(fm.checked_plan(bad)), independent)
    # Unbalanced plans need not have uniform marginals, only be finite.
    np.testing.assert_array_equal(np.asarray(fm.checked_plan(good * 3, None)), np.asarray(good * 3))


def test_interpolation_path():
    x0, x1 = jnp.zeros((5, 2)), jnp.ones((5, 2))
    t, x_t, u = fm.interpolate(jax.random.key(1), x0, x1, fm.FlowMatchingConfig())
    np.testing.assert_allclose(np.asarray(x_t), np.asarray(t)[:, None] * np.ones((5, 2)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(u), 1.0)


def test_solver_config_rejects_an_unknown_path_or_coupling_and_names_the_choices():
    with pytest.raises(cf.CellflowValueError, match=r"path='smooth'.*\['straight', 'brownian', 'smoothed'\]"):
        fm.FlowMatchingConfig(path="smooth")
    with pytest.raises(cf.CellflowValueError, match=r"coupling='sinkhorn'.*\['ot', 'independent'\]"):
        fm.FlowMatchingConfig(coupling="sinkhorn")


def test_brownian_path_spreads_points_by_sigma_around_the_straight_line():
    n = 20_000
    x0, x1 = jnp.zeros((n, 2)), jnp.ones((n, 2))
    config = fm.FlowMatchingConfig(path="brownian", sigma=2.0)
    t, x_t, u = fm.interpolate(jax.random.key(0), x0, x1, config)
    t = np.asarray(t)
    keep = (t > 0.05) & (t < 0.95)
    scaled = (np.asarray(x_t) - t[:, None])[keep] / np.sqrt(t * (1 - t))[keep, None]
    np.testing.assert_allclose(scaled.std(axis=0), 2.0, rtol=0.05)
    np.testing.assert_allclose(scaled.mean(axis=0), 0.0, atol=0.05)
    # the target stays the pair's displacement (see interpolate's docstring)
    np.testing.assert_allclose(np.asarray(u), 1.0)


def test_smoothed_path_has_a_noise_floor_and_targets_its_own_velocity():
    n = 20_000
    x0, x1 = jnp.zeros((n, 2)), jnp.ones((n, 2))
    config = fm.FlowMatchingConfig(path="smoothed", sigma=2.0, sigma_min=0.5)
    t, x_t, u = fm.interpolate(jax.random.key(0), x0, x1, config)
    t, x_t, u = (np.asarray(a, np.float64) for a in (t, x_t, u))

    def width(s):
        return 0.5 + 2.0 * 2.0 * s * (1 - s)

    z = (x_t - t[:, None]) / width(t)[:, None]
    np.testing.assert_allclose(z.std(axis=0), 1.0, rtol=0.05)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=0.05)
    # the target is d/dt of (1 - t) x0 + t x1 + width(t) z at fixed z, so the flow keeps the marginals
    def position(s):
        return s[:, None] + width(s)[:, None] * z

    h = 1e-3
    np.testing.assert_allclose(u, (position(t + h) - position(t - h)) / (2 * h), atol=1e-4)
    assert np.abs(u - 1.0).max() > 1.0  # not the displacement target


def test_smoothed_path_keeps_the_treated_spread_that_the_displacement_target_contracts():
    rng = np.random.default_rng(0)
    n, dim = 1000, 4
    cells = np.vstack([rng.normal(size=(n, dim)), 2.0 + 1.5 * rng.normal(size=(n, dim))]).astype(np.float32)
    adata = ad.AnnData(X=cells, obs={"condition": ["control"] * n + ["treated"] * n})
    source = rng.normal(size=(2000, dim)).astype(np.float32)
    ratios = {}
    for path in ("brownian", "smoothed"):
        model = cf.ResponseModel(adata, rep="X", method="flow_matching", path=path, **SMALL)
        pred = model.fit(steps=300, batch_size=128, seed=0, progress=False).predict(source, "treated").X
        ratios[path] = pred.var(axis=0).sum() / (dim * 1.5**2)
    assert ratios["brownian"] < 0.9, ratios
    assert abs(ratios["smoothed"] - 1.0) < abs(ratios["brownian"] - 1.0) / 2, ratios


def test_path_noise_is_in_units_of_the_control_spread():
    from cellflow.data import prepare
    from cellflow.methods._flow_matching import control_spread

    rng = np.random.default_rng(0)
    # two patients far apart, each with within-patient standard deviation 3 in every feature
    cells = np.vstack([rng.normal(size=(4000, 4)) * 3.0, rng.normal(size=(4000, 4)) * 3.0 + 50.0]).astype(np.float32)
    obs = {"condition": ["control", "A"] * 4000, "patient": ["P1"] * 4000 + ["P2"] * 4000}
    data = prepare(ad.AnnData(X=cells, obs=obs), covariate_keys=("patient",))
    assert control_spread(data) == pytest.approx(3.0, rel=0.05)
    rescaled = prepare(ad.AnnData(X=cells * 10, obs=obs), covariate_keys=("patient",))
    assert control_spread(rescaled) == pytest.approx(10 * control_spread(data), rel=1e-4)


@pytest.fixture(scope="module")
def fitted():
    adata = shift_data()
    model = cf.ResponseModel(adata, rep="X", method="flow_matching", **SMALL).fit(steps=600, batch_size=64, progress=False)
    return adata, model


def test_learns_the_map(fitted):
    adata, model = fitted
    source = adata[adata.obs.condition == "control"]
    for label in ("A", "B"):
        truth = adata[adata.obs.condition == label].X
        pred = model.predict(source, label).X
        identity = cf.metrics.energy_distance(source.X, truth)
        learned = cf.metrics.energy_distance(pred, truth)
        assert learned < 0.15 * identity, (label, learned, identity)
    # the map of A is a translation: each cell moves by about (3, 0)
    shift = (model.predict(source, "A").X - source.X).mean(0)
    np.testing.assert_allclose(shift, [3.0, 0.0], atol=0.3)
    assert {"step", "loss"} <= set(model.history_.columns)
    assert model.history_["loss"].iloc[-1] < model.history_["loss"].iloc[0]


def test_deterministic_and_save_load(fitted, tmp_path):
    adata, model = fitted
    source = adata[adata.obs.condition == "control"][:100]
    first = model.predict(source, ["A", "B"], seed=3).X
    np.testing.assert_array_equal(first, model.predict(source, ["A", "B"], seed=3).X)
    model.save(tmp_path / "fm")
    loaded = cf.ResponseModel.load(tmp_path / "fm")
    np.testing.assert_array_equal(first, loaded.predict(source, ["A", "B"], seed=3).X)
    assert loaded.history_.equals(model.history_)
    # same seed, same training
    again = cf.ResponseModel(adata, rep="X", method="flow_matching", **SMALL).fit(steps=50, batch_size=32, seed=5, progress=False)
    twice = cf.ResponseModel(adata, rep="X", method="flow_matching", **SMALL).fit(steps=50, batch_size=32, seed=5, progress=False)
    np.testing.assert_array_equal(again.predict(source, "A").X, twice.predict(source, "A").X)


def test_resume_after_interruption_matches_uninterrupted(tmp_path, monkeypatch):
    adata = shift_data(n=100)
    source = adata[adata.obs.condition == "control"]
    args = dict(rep="X", method="flow_matching", **{**SMALL, "chunk": 25}, checkpoint_every=50)

    full = cf.ResponseModel(adata, **args, checkpoint_dir=str(tmp_path / "a")).fit(steps=100, batch_size=32, progress=False)

    import cellflow.train._loop as loop

    real_save = loop.save_checkpoint
    calls = {"n": 0}

    def crash_after_first_checkpoint(*a, **k):
        real_save(*a, **k)
        calls["n"] += 1
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(loop, "save_checkpoint", crash_after_first_checkpoint)
    interrupted = cf.ResponseModel(adata, **args, checkpoint_dir=str(tmp_path / "b"))
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(steps=100, batch_size=32, progress=False)
    assert calls["n"] == 1 and cf.train.latest_checkpoint(tmp_path / "b") == 50
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    interrupted.fit(steps=100, batch_size=32, progress=False, resume=True)
    np.testing.assert_array_equal(full.predict(source, "A").X, interrupted.predict(source, "A").X)
    assert list(interrupted.history_["step"]) == list(full.history_["step"])

    # the checkpoints are of this run: another architecture, learning rate or seed must not resume from them
    wider = {**args, "width": 2 * SMALL["width"]}
    with pytest.raises(cf.CellflowValueError, match=r"different run \(width: 64 there, 128 now\)"):
        cf.ResponseModel(adata, **wider, checkpoint_dir=str(tmp_path / "a")).fit(steps=100, batch_size=32, progress=False, resume=True)
    with pytest.raises(cf.CellflowValueError, match=r"seed: 0 there, 1 now"):
        cf.ResponseModel(adata, **args, checkpoint_dir=str(tmp_path / "a")).fit(steps=100, batch_size=32, seed=1, progress=False, resume=True)
    with pytest.warns(UserWarning, match="no checkpoint_dir option to resume from") as caught:
        cf.ResponseModel(adata, **args).fit(steps=25, batch_size=32, progress=False, resume=True)
    assert {w.filename for w in caught if "checkpoint_dir" in str(w.message)} == {__file__}  # the user's line


def test_validation_split_records_scores():
    adata = shift_data(n=120)
    model = cf.ResponseModel(
        adata, rep="X", method="flow_matching", **{**SMALL, "chunk": 25}, validation_fraction=0.2, eval_every=25, patience=2
    ).fit(steps=100, batch_size=32, progress=False)
    assert "val_energy_distance" in model.history_ and model.history_["val_energy_distance"].notna().all()


def test_progress_bar_shows_only_informative_terms():
    from cellflow.train._loop import _shown_terms

    history = [
        {"step": 25, "loss": 3.0, "flow": 3.0, "interaction": 0.0, "coupling_fallback": 0.0, "seconds": 4.0,
         "val_energy_distance": 0.5},
        {"step": 50, "loss": 2.0, "flow": 2.0, "interaction": 0.0, "coupling_fallback": 0.0, "seconds": 5.0},
    ]
    # no interaction on data without combinations, no step or seconds (the bar shows both), and
    # the last validation score until the next evaluation
    assert _shown_terms(history) == {"loss": 2.0, "flow": 2.0, "val_energy_distance": 0.5}
    history.append({"step": 75, "loss": 1.0, "flow": 1.0, "interaction": 0.1, "coupling_fallback": 0.5, "seconds": 6.0,
                    "val_energy_distance": 0.4})
    assert _shown_terms(history) == {"loss": 1.0, "flow": 1.0, "interaction": 0.1, "coupling_fallback": 0.5,
                                     "val_energy_distance": 0.4}
    history.append({"step": 100, "loss": 1.0, "flow": 1.0, "interaction": 0.0, "coupling_fallback": 0.0, "seconds": 7.0})
    assert _shown_terms(history)["interaction"] == 0.0  # once it has moved, it stays on


def test_option_validation():
    adata = shift_data(n=20)
    with pytest.raises(cf.CellflowValueError, match=r"solver='rk4'.*valid choices.*'heun'"):
        cf.ResponseModel(adata, rep="X", method="flow_matching", solver="rk4")
    with pytest.raises(cf.CellflowKeyError, match=r"option 'widht'.*valid options.*'width'"):
        cf.ResponseModel(adata, rep="X", method="flow_matching", widht=3)


def test_prior_starts_from_the_baseline_and_round_trips(tmp_path):
    from cellflow.solvers import baselines

    prior = "gaussian_ot"
    adata = shift_data(n=150)
    model = cf.ResponseModel(adata, rep="X", method="flow_matching", prior=prior, **SMALL).fit(
        steps=150, batch_size=64, progress=False
    )
    state = model.state_
    assert state.prior is not None and (state.prior.linear is not None) == (prior == "gaussian_ot")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 2)), jnp.float32)
    weights = np.eye(state.prior.offset.shape[0], dtype=np.float32)[1]
    np.testing.assert_allclose(
        baselines.push_group(state.prior, x, 1), baselines.push(state.prior, x, weights), rtol=1e-6, atol=1e-6
    )
    source = adata[adata.obs.condition == "control"]
    pred = model.predict(source, "A")
    shift = pred.X.mean(0) - source.X.mean(0)
    np.testing.assert_allclose(shift, [3.0, 0.0], atol=0.3)
    model.save(tmp_path / "m")
    np.testing.assert_array_equal(cf.ResponseModel.load(tmp_path / "m").predict(source, "A").X, pred.X)


@pytest.mark.slow  # an option that is off by default; kept out of the 10-minute default run
def test_centred_fields_are_translation_equivariant():
    """With population-relative positions, a control population moved as a whole (a new
    patient or batch) gets the same response, moved with it."""
    adata = shift_data(n=100)
    model = cf.ResponseModel(
        adata, rep="X", method="flow_matching", centre=True, population_encoder=False, **SMALL
    ).fit(steps=50, batch_size=32, progress=False)
    source = adata[adata.obs.condition == "control"].X
    offset = np.array([2.5, -1.0], np.float32)
    moved = model.predict(source + offset, "B", seed=3).X
    np.testing.assert_allclose(moved, model.predict(source, "B", seed=3).X + offset, atol=2e-4)


def test_training_stops_with_a_clear_error_when_the_loss_diverges():
    from cellflow.train import TrainState, run_training

    state = TrainState(params={"w": jnp.zeros(())}, ema={"w": jnp.zeros(())}, opt_state=(), step=jnp.array(0), key=jax.random.key_data(jax.random.key(0)))

    def diverging_chunk(state):
        loss = jnp.where(state.step >= 10, jnp.nan, 1.0) * jnp.ones(10)
        return state._replace(step=state.step + 10), {"loss": loss}

    with pytest.raises(cf.CellflowValueError, match=r"toy diverged: the loss is nan in steps 11-20.*learning_rate"):
        run_training(diverging_chunk, state, 50, 10, progress=False, description="toy")
    # a chunk built for another number of steps than run_training is told would overshoot
    with pytest.raises(cf.CellflowValueError, match=r"train_chunk ran 10 steps per call but run_training was given chunk=20"):
        run_training(diverging_chunk, state, 60, 20, progress=False, description="toy")


def test_fit_runs_exactly_the_requested_number_of_steps():
    from cellflow.train import chunk_size

    assert [chunk_size(s, 100) for s in (2000, 250, 30, 7, 101)] == [100, 50, 30, 7, 1]
    adata = shift_data(n=40)
    model = cf.ResponseModel(adata, rep="X", method="flow_matching", **SMALL).fit(steps=30, batch_size=16, progress=False)
    assert list(model.history_["step"]) == [30]


def test_default_steps_grow_with_the_number_of_training_groups(monkeypatch):
    # each step draws a few groups: a screen of hundreds of groups saw each one a few dozen
    # times in 2,000 steps, which held-out doses paid for (benchmarks/flow_matching_steps.py)
    from cellflow.methods import _flow_matching

    assert [_flow_matching.default_steps(n) for n in (1, 72, 142, 143, 440, 5000)] == [2000, 2000, 2000, 2500, 6500, 10000]

    class Stop(Exception):
        pass

    def stop(train_chunk, state, steps, *args, **kwargs):
        raise Stop(steps)

    monkeypatch.setattr(_flow_matching, "train_with_options", stop)
    rng = np.random.default_rng(0)
    labels = ["control"] * 20 + [f"drug{i}" for i in range(150) for _ in range(2)]
    screen = ad.AnnData(X=rng.normal(size=(len(labels), 2)).astype(np.float32), obs={"condition": labels})
    steps = {}
    for asked in (None, 30):
        with pytest.raises(Stop) as stopped:
            cf.ResponseModel(screen, rep="X", method="flow_matching", **SMALL).fit(steps=asked, progress=False)
        steps[asked] = stopped.value.args[0]
    assert steps == {None: 2500, 30: 30}


def test_host_initialiser_matches_lecun_normal_and_is_deterministic():
    from cellflow.nn.layers import lecun_normal

    key = jax.random.key(3)
    kernel = np.asarray(lecun_normal(key, (400, 300)))
    assert kernel.shape == (400, 300) and kernel.dtype == np.float32
    np.testing.assert_allclose(kernel.std() * np.sqrt(400), 1.0, atol=0.02)
    assert np.abs(kernel).max() * np.sqrt(400) <= 2.0 / 0.87962566103423978 + 1e-5
    np.testing.assert_array_equal(kernel, lecun_normal(key, (400, 300)))
    assert not np.array_equal(kernel, lecun_normal(jax.random.key(4), (400, 300)))


def test_checkpoints_without_a_run_description_still_restore(tmp_path):
    import orbax.checkpoint as ocp

    from cellflow.train import TrainState, restore_checkpoint, save_checkpoint

    state = TrainState(params={"w": jnp.ones(3)}, ema={"w": jnp.ones(3)}, opt_state=(), step=jnp.array(5),
                       key=jax.random.key_data(jax.random.key(0)))
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    with ocp.CheckpointManager((tmp_path / "old").absolute(), options=options, item_names=("state", "history")) as manager:
        manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(jax.tree.map(np.asarray, state)),
                                                history=ocp.args.JsonSave([{"step": 5}])))
        manager.wait_until_finished()
    restored, history = restore_checkpoint(tmp_path / "old", state, {"width": 16})  # written before runs were described
    assert int(restored.step) == 5 and history == [{"step": 5}]
    save_checkpoint(tmp_path / "new", state, [{"step": 5}], {"width": 16})
    assert int(restore_checkpoint(tmp_path / "new", state, {"width": 16})[0].step) == 5
    with pytest.raises(cf.CellflowValueError, match=r"width: 16 there, 32 now"):
        restore_checkpoint(tmp_path / "new", state, {"width": 32})
    # described with the subspace option (4b43192) rather than the choice: the shapes decide
    save_checkpoint(tmp_path / "option", state, [{"step": 5}], {"width": 16, "subspace": "auto"})
    assert int(restore_checkpoint(tmp_path / "option", state, {"width": 16})[0].step) == 5
    assert int(restore_checkpoint(tmp_path / "option", state, {"width": 16, "subspace_components": 20})[0].step) == 5
    with pytest.raises(cf.CellflowValueError, match=r"width: 16 there, 32 now"):
        restore_checkpoint(tmp_path / "option", state, {"width": 32})
    # another layout of the training state (an earlier version's optimiser state) is named as such
    relaid = state._replace(opt_state=({"count": jnp.zeros(())},))
    with pytest.raises(cf.CellflowValueError, match=r"layout differs from this version's.*resume=False"):
        restore_checkpoint(tmp_path / "new", relaid, {"width": 16})
