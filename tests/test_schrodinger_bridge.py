"""Schrödinger bridge: the Gaussian oracle (REFERENCES D3), a time course with a known path,
the facade round trip and option errors."""

import anndata as ad
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cellflow as cf
from cellflow.data import build_training_arrays, encode_condition, make_embedding_table, prepare
from cellflow.datasets import time_course
from cellflow.methods import get_method
from cellflow.solvers import flow_matching as fm
from cellflow.solvers import schrodinger_bridge as sb
from cellflow.solvers.gaussian import gaussian_bridge
from cellflow.solvers.interpolation import displacement_interpolation
from cellflow.train import make_optimizer, run_training

SMALL = dict(width=64, depth=2, token_dim=16, context_dim=16, conditions_per_step=2, chunk=100, warmup=50)


def _random_covariance(rng, d):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q @ np.diag(rng.uniform(0.5, 2.0, d)) @ q.T


def test_bridge_sample_targets_are_the_brownian_bridge():
    x0, x1 = jnp.zeros((4000, 2)), jnp.ones((4000, 2))
    t, x_t, velocity, noise, weight = sb.bridge_sample(jax.random.key(0), x0, x1, 0.5)
    mean = t[:, None] * x1
    np.testing.assert_allclose(np.asarray(x_t - mean), 0.5 * np.sqrt(t * (1 - t))[:, None] * np.asarray(noise), atol=1e-5)
    # The conditional probability-flow velocity moves the bridge's mean at x1 - x0 on average.
    np.testing.assert_allclose(np.asarray(velocity).mean(axis=0), [1.0, 1.0], atol=0.1)
    np.testing.assert_allclose(np.asarray(weight), 2 * 0.5 * np.sqrt(t * (1 - t)) / 0.25, rtol=1e-5)


def test_gaussian_bridge_oracle_d4():
    """End-point cross-covariance and mid-time covariance of the simulated SDE within 10 % of D3."""
    d, sigma, n = 4, 1.0, 4000
    rng = np.random.default_rng(0)
    A, B = _random_covariance(rng, d), _random_covariance(rng, d)
    b = rng.normal(size=d)
    x0, x1 = rng.multivariate_normal(np.zeros(d), A, n), rng.multivariate_normal(b, B, n)
    adata = ad.AnnData(X=np.vstack([x0, x1]).astype(np.float32), obs={"condition": ["control"] * n + ["T"] * n})
    data = prepare(adata, rep="X")
    embeddings = make_embedding_table(data.spec.vocabulary, None)
    options = {**get_method("schrodinger_bridge").validate_options({}), "population_encoder": False, "width": 64}
    model = get_method("schrodinger_bridge").build(data.spec, embeddings.dim, options)
    steps = 600
    optimizer = make_optimizer(2e-3, steps, warmup=50)
    config = sb.BridgeConfig(batch_size=256, conditions_per_step=1, sigma=sigma, ema_decay=0.99)
    graphdef, state = fm.init_state(model, optimizer, jax.random.key(0))
    train_chunk = sb.make_train_chunk(graphdef, optimizer, build_training_arrays(data, embeddings), config, 100)
    params = run_training(train_chunk, state, steps, 100, progress=False).best_ema

    condition = jax.tree.map(jnp.asarray, encode_condition(data.spec.group_conditions[0], (), embeddings, {}, 1))
    start = rng.multivariate_normal(np.zeros(d), A, 8000).astype(np.float32)
    ys = np.asarray(sb.push(graphdef, params, jnp.asarray(start), condition, jnp.asarray(start[:256]), jax.random.key(1),
                            jnp.array([0.0, 0.5, 1.0]), sigma, n_steps=64))
    truth = gaussian_bridge(np.zeros(d), A, b, B, sigma)
    cross = np.cov(ys[0].T, ys[2].T)[:d, d:]
    cross_error = np.linalg.norm(cross - truth.cross) / np.linalg.norm(truth.cross)
    middle = truth.marginal(0.5)[1]
    middle_error = np.linalg.norm(np.cov(ys[1].T) - middle) / np.linalg.norm(middle)
    assert cross_error < 0.1, cross_error
    assert middle_error < 0.1, middle_error
    # The probability-flow ODE keeps the marginals but not the coupling: it must differ.
    ode = np.asarray(sb.push(graphdef, params, jnp.asarray(start), condition, jnp.asarray(start[:256]), jax.random.key(1),
                             jnp.array([0.5, 1.0]), sigma, sde=False, n_steps=32))
    assert np.linalg.norm(np.cov(ode[0].T) - middle) / np.linalg.norm(middle) < 0.15
    assert np.linalg.norm(np.cov(start.T, ode[1].T)[:d, d:] - truth.cross) / np.linalg.norm(truth.cross) > 2 * cross_error


@pytest.fixture(scope="module")
def course():
    train = time_course(n_cells=400, seed=0)
    model = cf.ResponseModel(train, rep="X_pca", method="schrodinger_bridge", time_key="time", sigma=0.3, **SMALL)
    return train, model.fit(steps=500, batch_size=128, progress=False)


def test_time_course_passes_through_the_middle_snapshot(course):
    train, model = course
    truth = time_course(n_cells=400, seed=1)
    controls = truth[truth.obs.condition == "control"]
    pred = model.predict(controls, "drug", time=[1.0, 2.0])
    assert pred.n_obs == 2 * controls.n_obs and set(pred.obs["time"]) == {1.0, 2.0}
    middle = truth[truth.obs.time == 1.0].obsm["X_pca"]
    linear = np.asarray(displacement_interpolation(
        jax.random.key(0), controls.obsm["X_pca"], truth[truth.obs.time == 2.0].obsm["X_pca"], 0.5
    ))
    ours = cf.metrics.energy_distance(pred[pred.obs.time == 1.0].obsm["X_pca"], middle)
    assert ours < 0.25 * cf.metrics.energy_distance(linear, middle)
    assert model.predict(controls, "drug").obs["time"].unique().tolist() == [2.0]


def test_time_course_round_trip_and_determinism(course, tmp_path):
    train, model = course
    controls = train[train.obs.condition == "control"]
    before = controls.copy()
    a = model.predict(controls, "drug", time=[0.5, 1.5], seed=3)
    b = model.predict(controls, "drug", time=[0.5, 1.5], seed=3)
    np.testing.assert_array_equal(a.obsm["X_pca"], b.obsm["X_pca"])
    assert not np.array_equal(model.predict(controls, "drug", time=1.5, seed=4).obsm["X_pca"], a.obsm["X_pca"][controls.n_obs:])
    model.save(tmp_path / "bridge")
    loaded = cf.ResponseModel.load(tmp_path / "bridge")
    np.testing.assert_array_equal(loaded.predict(controls, "drug", time=[0.5, 1.5], seed=3).obsm["X_pca"], a.obsm["X_pca"])
    np.testing.assert_array_equal(controls.obsm["X_pca"], before.obsm["X_pca"])
    assert controls.obs.equals(before.obs)


def test_time_errors(course):
    train, model = course
    controls = train[train.obs.condition == "control"]
    with pytest.raises(ValueError, match="increasing and within the measured range"):
        model.predict(controls, "drug", time=-1.0)
    with pytest.raises(ValueError, match="not fitted beyond its last snapshot"):
        model.predict(controls, "drug", time=[1.0, 3.0])
    with pytest.raises(ValueError, match="does not model time.*schrodinger_bridge"):
        cf.ResponseModel(train, rep="X_pca", method="flow_matching", time_key="time")
    with pytest.raises(KeyError, match="time_key='day'"):
        cf.ResponseModel(train, rep="X_pca", method="schrodinger_bridge", time_key="day")
    # times written as text (categorical once saved) are read as the numbers they spell
    spelled = train.copy()
    spelled.obs["stage"] = spelled.obs["time"].astype(str).astype("category")
    numeric, text = (cf.data.prepare(a, rep="X_pca", time_key=k).spec for a, k in ((train, "time"), (spelled, "stage")))
    assert text.time_range == numeric.time_range and text.groups.equals(numeric.groups)
    spelled.obs["stage"] = "day " + spelled.obs["time"].astype(str)
    with pytest.raises(ValueError, match=r"time_key='stage' must hold numbers.*not numbers: \['day 0.0'"):
        cf.ResponseModel(spelled, rep="X_pca", method="schrodinger_bridge", time_key="stage")
    spelled.obs["stage"] = spelled.obs["time"] > 0
    with pytest.raises(ValueError, match="numeric obs column"):
        cf.ResponseModel(spelled, rep="X_pca", method="schrodinger_bridge", time_key="stage")
    untimed = cf.ResponseModel(train, rep="X_pca", method="mean_shift").fit()
    with pytest.raises(ValueError, match="without a time_key"):
        untimed.predict(controls, "drug", time=1.0)


def test_option_errors():
    adata = time_course(n_cells=20)
    with pytest.raises(ValueError, match="sigma"):
        cf.ResponseModel(adata, rep="X_pca", method="schrodinger_bridge", sigma=0.0)
    with pytest.raises(ValueError, match="valid choices"):
        cf.ResponseModel(adata, rep="X_pca", method="schrodinger_bridge", sampler="milstein")


def test_trajectory_plot(course):
    import matplotlib

    matplotlib.use("Agg")
    train, model = course
    controls = train[train.obs.condition == "control"]
    pred = model.predict(controls, "drug", time=[0.0, 0.5, 1.0, 1.5, 2.0])
    ax = cf.pl.trajectories(pred, time_key="time", rep="X_pca", observed=train, max_cells=50)
    assert len(ax.lines) == 50
    np.testing.assert_allclose(pred[pred.obs.time == 0.0].obsm["X_pca"], controls.obsm["X_pca"], atol=1e-6)
    with pytest.raises(KeyError, match="day"):
        cf.pl.trajectories(pred, time_key="day", rep="X_pca")


def _swapping_clusters(n=200):
    """Two control clusters swap places: OT would keep each cluster on its own side, the given
    pairs (obs["parent"]) send it across."""
    rng = np.random.default_rng(0)
    left, right = np.array([-2.0, 0.0, 0.0]), np.array([2.0, 0.0, 0.0])
    controls = np.vstack([left + 0.2 * rng.normal(size=(n, 3)), right + 0.2 * rng.normal(size=(n, 3))])
    ends = np.array([[2.0, 8.0, 1.0], [-2.0, 8.0, -1.0]])
    treated = np.vstack([ends[0] + 0.2 * rng.normal(size=(n, 3)), ends[1] + 0.2 * rng.normal(size=(n, 3))])
    names = [f"c{i}" for i in range(2 * n)] + [f"t{i}" for i in range(2 * n)]
    adata = ad.AnnData(
        np.vstack([controls, treated]).astype(np.float32),
        obs={"condition": ["control"] * (2 * n) + ["drug"] * (2 * n), "parent": [""] * (2 * n) + names[: 2 * n]},
    )
    adata.obs_names = names
    return adata


def test_pair_key_errors():
    adata = _swapping_clusters(10)
    data = cf.data.prepare(adata, rep="X", pair_key="parent")
    aligned = cf.data.align_partners(data)
    np.testing.assert_array_equal(aligned.source_cells(0), adata.X[:20])  # row i is treated cell i's parent
    np.testing.assert_array_equal(aligned.target_cells(0), adata.X[20:])
    with pytest.raises(ValueError, match="does not learn from known pairs"):
        cf.ResponseModel(adata, rep="X", method="flow_matching", pair_key="parent")
    broken = adata.copy()
    broken.obs.loc["t0", "parent"] = "nobody"
    with pytest.raises(ValueError, match="name no cell"):
        cf.ResponseModel(broken, rep="X", method="schrodinger_bridge", pair_key="parent")
    broken.obs.loc["t0", "parent"] = "t1"
    with pytest.raises(ValueError, match="not a control"):
        cf.ResponseModel(broken, rep="X", method="schrodinger_bridge", pair_key="parent")


@pytest.mark.slow
def test_known_pairs_override_the_ot_coupling():
    """The aligned bridge follows the given pairs across; the OT-coupled one stays on its side."""
    n = 200
    adata = _swapping_clusters(n)
    options = dict(SMALL, sigma=0.1, population_encoder=False, conditions_per_step=1)
    aligned = cf.ResponseModel(adata, rep="X", method="schrodinger_bridge", pair_key="parent", **options).fit(steps=300, batch_size=64, progress=False)
    coupled = cf.ResponseModel(adata, rep="X", method="schrodinger_bridge", **options).fit(steps=300, batch_size=64, progress=False)
    source = adata[:n]  # the left cluster
    crossed = lambda model: np.mean(model.predict(source, "drug").X[:, 0] > 0)  # noqa: E731
    assert crossed(aligned) > 0.8
    assert crossed(coupled) < 0.2
