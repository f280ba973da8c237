"""Tests of cellflow.metrics against direct float64 numpy computations."""

from __future__ import annotations

import time
import warnings

import anndata as ad
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from cellflow._errors import CellflowKeyError, CellflowValueError
from cellflow.metrics import (
    DEFAULT_MMD_GAMMAS,
    METRICS,
    energy_distance,
    evaluate,
    mmd,
    noise_floor,
    pearson_delta,
    r2_mean,
    sinkhorn_divergence,
)


# --------------------------------------------------------------------------- references


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    diff = a[:, None, :] - b[None, :, :]
    return np.einsum("ijk,ijk->ij", diff, diff)


def _energy_ref(x, y, squared=False):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    f = _sqdist if squared else (lambda a, b: np.sqrt(_sqdist(a, b)))
    return 2 * f(x, y).mean() - f(x, x).mean() - f(y, y).mean()


def _mmd_ref(x, y, gammas=DEFAULT_MMD_GAMMAS):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    vals = []
    for g in gammas:
        k = lambda a, b: np.exp(-g * _sqdist(a, b)).mean()  # noqa: E731
        vals.append(k(x, x) + k(y, y) - 2 * k(x, y))
    return float(np.mean(vals))


def _clouds(rng, n, m, d, shift=0.0, offset=3.0):
    x = rng.normal(size=(n, d)) + shift + offset
    y = rng.normal(size=(m, d)) * 1.2 + offset
    return x, y


# --------------------------------------------------------------------------- energy distance


@pytest.mark.parametrize(
    ("n", "m", "d", "chunk_size", "shift"),
    [
        (60, 60, 4, 1024, 0.0),  # one tile
        (100, 70, 8, 32, 0.5),  # n != m, chunk < n and not dividing n
        (130, 200, 16, 48, 0.0),  # chunk not a power of two, same distribution
        (50, 120, 3, 16, 2.0),
    ],
)
@pytest.mark.parametrize("squared", [False, True])
def test_energy_distance_matches_numpy(rng, n, m, d, chunk_size, shift, squared):
    x, y = _clouds(rng, n, m, d, shift)
    got = energy_distance(x, y, squared=squared, chunk_size=chunk_size)
    assert isinstance(got, float)
    assert got == pytest.approx(_energy_ref(x, y, squared), rel=1e-5)


def test_energy_distance_chunk_size_does_not_change_value(rng):
    x, y = _clouds(rng, 100, 70, 8, 0.3)
    values = [energy_distance(x, y, chunk_size=c) for c in (32, 48, 1024)]
    np.testing.assert_allclose(values, values[0], rtol=1e-6)


def test_energy_distance_accepts_jax_and_float32(rng):
    x, y = _clouds(rng, 100, 70, 8, 0.5)
    ref = _energy_ref(x, y)
    assert energy_distance(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), chunk_size=32) == pytest.approx(
        _energy_ref(x.astype(np.float32), y.astype(np.float32)), rel=1e-5
    )
    assert energy_distance(x.astype(np.float32), y.astype(np.float32), chunk_size=32) == pytest.approx(ref, rel=1e-4)


def test_energy_distance_identical_clouds_is_zero(rng):
    x, _ = _clouds(rng, 100, 1, 8)
    scale = np.sqrt(_sqdist(x, x)).mean()
    assert abs(energy_distance(x, x, chunk_size=32)) < 1e-5 * scale
    assert abs(energy_distance(x, x.copy(), squared=True)) < 1e-12
    # A permutation of the same cells is the same distribution.
    assert abs(energy_distance(x, x[rng.permutation(len(x))], chunk_size=32)) < 1e-5 * scale


def test_energy_distance_is_translation_invariant_far_from_origin(rng):
    x, y = _clouds(rng, 100, 70, 8, 0.5)
    ref = _energy_ref(x, y)
    assert energy_distance(x + 1e3, y + 1e3, chunk_size=32) == pytest.approx(ref, rel=1e-5)


def test_energy_distance_single_cells():
    x, y = np.array([[0.0, 0.0]]), np.array([[3.0, 4.0]])
    assert energy_distance(x, y) == pytest.approx(10.0, rel=1e-6)  # 2 * 5 - 0 - 0


def test_pairwise_metrics_reject_bad_input(rng):
    x, y = _clouds(rng, 10, 10, 3)
    with pytest.raises(CellflowValueError, match="same number of features"):
        energy_distance(x, y[:, :2])
    with pytest.raises(CellflowValueError, match="chunk_size"):
        energy_distance(x, y, chunk_size=0)
    with pytest.raises(CellflowValueError, match="2-dimensional"):
        mmd(x[0], y)
    with pytest.raises(CellflowValueError, match="no cells"):
        mmd(x[:0], y)
    bad = x.copy()
    bad[4, 1] = np.nan
    with pytest.raises(CellflowValueError, match=r"x holds NaN.*\[4\]"):
        energy_distance(bad, y)
    with pytest.raises(CellflowValueError, match="gammas"):
        mmd(x, y, gammas=(1.0, -1.0))


# --------------------------------------------------------------------------- mmd


@pytest.mark.parametrize(("n", "m", "d", "chunk_size", "shift"), [(100, 70, 8, 32, 0.5), (60, 60, 4, 1024, 0.0)])
def test_mmd_matches_numpy(rng, n, m, d, chunk_size, shift):
    x, y = _clouds(rng, n, m, d, shift)
    got = mmd(x, y, chunk_size=chunk_size)
    assert isinstance(got, float)
    assert got == pytest.approx(_mmd_ref(x, y), rel=1e-5)


def test_mmd_custom_gammas_and_identity(rng):
    x, y = _clouds(rng, 100, 70, 8, 0.5)
    assert mmd(x, y, gammas=(0.3,), chunk_size=32) == pytest.approx(_mmd_ref(x, y, (0.3,)), rel=1e-5)
    assert abs(mmd(x, x, chunk_size=32)) < 1e-6


# --------------------------------------------------------------------------- sinkhorn


def _entropic_ot_ref(x, y, eps, n_iter=300):
    """float64 log-domain Sinkhorn, uniform weights: dual value <a, f> + <b, g> = OT_eps."""
    from scipy.special import logsumexp

    cost = _sqdist(x, y)
    log_a, log_b = np.full(len(x), -np.log(len(x))), np.full(len(y), -np.log(len(y)))
    f, g = np.zeros(len(x)), np.zeros(len(y))
    for _ in range(n_iter):
        f = -eps * logsumexp((g[None, :] - cost) / eps + log_b[None, :], axis=1)
        g = -eps * logsumexp((f[:, None] - cost) / eps + log_a[:, None], axis=0)
    return np.exp(log_a) @ f + np.exp(log_b) @ g


def _sinkhorn_div_ref(x, y, eps=1.0):
    return _entropic_ot_ref(x, y, eps) - 0.5 * _entropic_ot_ref(x, x, eps) - 0.5 * _entropic_ot_ref(y, y, eps)


def test_sinkhorn_divergence_self_zero_and_shift_positive(rng):
    x, y = _clouds(rng, 64, 48, 4, offset=0.0)
    assert abs(sinkhorn_divergence(x, x)) < 1e-3
    near = sinkhorn_divergence(x, y)
    far = sinkhorn_divergence(x, y + 2.0)
    assert isinstance(far, float)
    assert 0 < near < far
    # Equals an independent float64 Sinkhorn (zero-weight padding leaves it unchanged).
    assert near == pytest.approx(_sinkhorn_div_ref(x, y), rel=1e-4)
    assert far == pytest.approx(_sinkhorn_div_ref(x, y + 2.0), rel=1e-4)
    assert sinkhorn_divergence(x[:50], y) == pytest.approx(_sinkhorn_div_ref(x[:50], y), rel=1e-4)


def test_sinkhorn_divergence_pads_each_cloud_to_its_own_size(rng, monkeypatch):
    # many predicted against few observed cells is the usual case (a control pool per
    # condition against one treated group): padding both to the larger size would make the
    # (x, y) and (y, y) solves 8 and 64 times larger here, for the same value
    from cellflow.metrics import _distribution

    shapes = []
    solve = _distribution._sinkdiv

    def recording(x, y, a, b, **kwargs):
        shapes.append((x.shape[0], y.shape[0]))
        return solve(x, y, a, b, **kwargs)

    monkeypatch.setattr(_distribution, "_sinkdiv", recording)
    x, y = _clouds(rng, 250, 30, 3)
    assert sinkhorn_divergence(x, y) == pytest.approx(_sinkhorn_div_ref(x, y), rel=1e-4)
    assert shapes == [(256, 32)]


def test_sinkhorn_iterations_work_on_cost_matrices_not_on_the_cells():
    # in gene space (d in the thousands) recomputing the costs from the cells at every
    # convergence check dominated: no array as wide as a cell may enter a Sinkhorn loop
    import functools

    import jax
    from jax.extend.core import ClosedJaxpr, Jaxpr

    from cellflow.metrics import _distribution

    width = 7  # no other array in the solve is 7 wide

    def nested(eqn):
        for value in eqn.params.values():
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(item, (ClosedJaxpr, Jaxpr)):
                    yield item.jaxpr if isinstance(item, ClosedJaxpr) else item

    def widths_inside_loops(jaxpr, inside=False):
        widths = set()
        for eqn in jaxpr.eqns:
            if inside:
                widths |= {v.aval.shape[-1] for v in eqn.invars if getattr(getattr(v, "aval", None), "shape", ())}
            for sub in nested(eqn):
                widths |= widths_inside_loops(sub, inside or eqn.primitive.name == "while")
        return widths

    solve = functools.partial(_distribution._sinkdiv, epsilon=1.0, scale_cost=1.0)
    x, y = jnp.ones((32, width)), jnp.ones((16, width))
    traced = jax.make_jaxpr(solve)(x, y, jnp.full(32, 1 / 32), jnp.full(16, 1 / 16))
    widths = widths_inside_loops(traced.jaxpr)
    assert {16, 32} <= widths  # the loops were found
    assert width not in widths


def test_sinkhorn_divergence_bad_epsilon(rng):
    x, y = _clouds(rng, 8, 8, 2)
    with pytest.raises(CellflowValueError, match="epsilon"):
        sinkhorn_divergence(x, y, epsilon=0.0)


# --------------------------------------------------------------------------- r2 and pearson


def test_r2_mean_matches_sklearn(rng):
    r2_score = pytest.importorskip("sklearn.metrics").r2_score
    x, y = _clouds(rng, 40, 50, 30, 0.1)
    ctrl = rng.normal(size=(25, 30)) + 2.5
    assert r2_mean(x, y) == pytest.approx(r2_score(y.mean(0), x.mean(0)), rel=1e-12)
    assert r2_mean(x, y, ctrl) == pytest.approx(
        r2_score(y.mean(0) - ctrl.mean(0), x.mean(0) - ctrl.mean(0)), rel=1e-12
    )
    idx = np.array([1, 5, 7, 20, 29])
    mask = np.zeros(30, dtype=bool)
    mask[idx] = True
    expected = r2_score(y.mean(0)[idx], x.mean(0)[idx])
    assert r2_mean(x, y, features=idx) == pytest.approx(expected, rel=1e-12)
    assert r2_mean(x, y, features=mask) == pytest.approx(expected, rel=1e-12)
    assert r2_mean(y, y) == 1.0
    # Not symmetric.
    assert r2_mean(x, y) != pytest.approx(r2_mean(y, x))


def test_r2_mean_bad_features(rng):
    x, y = _clouds(rng, 5, 5, 4)
    with pytest.raises(CellflowValueError, match="out of range"):
        r2_mean(x, y, features=[0, 4])
    with pytest.raises(CellflowValueError, match="boolean mask of length 3"):
        r2_mean(x, y, features=[True, False, True])


def test_pearson_delta_matches_corrcoef(rng):
    x, y = _clouds(rng, 40, 50, 30, 0.1)
    ctrl = rng.normal(size=(25, 30)) + 2.5
    dx, dy = x.mean(0) - ctrl.mean(0), y.mean(0) - ctrl.mean(0)
    assert pearson_delta(x, y, ctrl) == pytest.approx(np.corrcoef(dx, dy)[0, 1], rel=1e-10)
    idx = np.arange(0, 30, 3)
    assert pearson_delta(x, y, ctrl, features=idx) == pytest.approx(np.corrcoef(dx[idx], dy[idx])[0, 1], rel=1e-10)
    assert pearson_delta(y, y, ctrl) == pytest.approx(1.0)
    assert np.isnan(pearson_delta(ctrl, y, ctrl))  # zero predicted shift


# --------------------------------------------------------------------------- noise floor


def _mixture(rng, k, d=5):
    """Cells of two states, each cell's state drawn independently (as a perfect prediction's)."""
    z = rng.normal(size=(k, d))
    z[rng.random(k) < 1 / 3] += 3.0
    return z * np.linspace(0.5, 1.5, d)


@pytest.mark.parametrize("chunk_size", [1024, 16])
def test_noise_floor_matches_its_formula(rng, chunk_size):
    y = _mixture(rng, 70) + 100.0  # far from the origin: the centring must keep float32 accurate
    off_diagonal = ~np.eye(70, dtype=bool)
    distances = np.sqrt(_sqdist(y, y))[off_diagonal]
    assert noise_floor(y, 30, chunk_size=chunk_size) == pytest.approx((1 / 30 + 1 / 70) * distances.mean(), rel=1e-5)
    assert noise_floor(y) == pytest.approx(2 / 70 * distances.mean(), rel=1e-5)  # n_predicted defaults to m
    squared = noise_floor(y, 30, metric="energy_distance_squared")
    assert squared == pytest.approx((1 / 30 + 1 / 70) * _sqdist(y, y)[off_diagonal].mean(), rel=1e-9)
    kernels = [np.exp(-g * _sqdist(y, y))[off_diagonal].mean() for g in (0.5, 0.05)]
    expected = (1 / 30 + 1 / 70) * np.mean([1 - k for k in kernels])
    assert noise_floor(y, 30, metric="mmd", gammas=(0.5, 0.05), chunk_size=chunk_size) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("metric", "score"), [
    ("energy_distance", energy_distance),
    ("energy_distance_squared", lambda x, y: energy_distance(x, y, squared=True)),
    ("mmd", mmd),
])
def test_noise_floor_is_what_a_perfect_prediction_scores_on_average(rng, metric, score):
    # truth and a perfect prediction are independent draws of one distribution; the floor,
    # computed from the truth alone, is the mean score (and far below the score of a shifted prediction)
    floors, perfect, shifted = [], [], []
    for _ in range(150):
        y, x = _mixture(rng, 120), _mixture(rng, 40)
        floors.append(noise_floor(y, 40, metric=metric))
        perfect.append(score(x, y))
        shifted.append(score(x + 1.0, y))
    standard_error = np.std(perfect) / np.sqrt(len(perfect))
    assert abs(np.mean(perfect) - np.mean(floors)) < 3 * standard_error + 0.01 * np.mean(floors), (
        np.mean(perfect), np.mean(floors), standard_error)
    assert np.mean(shifted) > 1.3 * np.mean(floors)


def test_noise_floor_rejects_bad_input(rng):
    y = rng.normal(size=(10, 3))
    with pytest.raises(CellflowValueError, match="'sinkhorn_divergence'.*energy_distance"):
        noise_floor(y, metric="sinkhorn_divergence")
    with pytest.raises(CellflowValueError, match="at least 2 cells"):
        noise_floor(y[:1])
    for bad in (0, 2.5, True):
        with pytest.raises(CellflowValueError, match="n_predicted"):
            noise_floor(y, bad)


# --------------------------------------------------------------------------- evaluate


def _adata(rng, conditions, patients, n_per, d=6, shift=0.0):
    obs_rows, blocks = [], []
    for ci, cond in enumerate(conditions):
        for pi, pat in enumerate(patients):
            blocks.append(rng.normal(size=(n_per, d)) + ci + 0.3 * pi + shift)
            obs_rows += [(cond, pat)] * n_per
    obs = pd.DataFrame(obs_rows, columns=["condition", "patient"])
    obs.index = obs.index.astype(str)
    obs["condition"] = obs["condition"].astype("category")
    var = pd.DataFrame(index=[f"g{i}" for i in range(d)])
    return ad.AnnData(X=np.concatenate(blocks).astype(np.float32), obs=obs, var=var)


@pytest.fixture
def eval_data(rng):
    truth = _adata(rng, ["a", "b", "c"], ["p1", "p2"], 20)
    pred = _adata(rng, ["c", "a", "b", "extra"], ["p1", "p2"], 15, shift=0.2)
    control = _adata(rng, ["ctrl"], ["p1", "p2"], 30, shift=-1.0)
    return pred, truth, control


def test_evaluate_matches_direct_calls(eval_data):
    pred, truth, control = eval_data
    pred_before, truth_before = pred.copy(), truth.copy()
    metrics = ("energy_distance", "energy_distance_squared", "mmd", "r2_mean", "r2_delta", "pearson_delta")
    df = evaluate(pred, truth, control=control, metrics=metrics)
    assert list(df.columns) == ["condition", "n_pred", "n_truth", "n_control", *metrics]
    assert df["condition"].tolist() == ["a", "b", "c"]  # "extra" (pred only) is ignored
    for _, row in df.iterrows():
        x = pred.X[(pred.obs["condition"] == row["condition"]).to_numpy()]
        y = truth.X[(truth.obs["condition"] == row["condition"]).to_numpy()]
        assert (row["n_pred"], row["n_truth"], row["n_control"]) == (len(x), len(y), control.n_obs)
        assert row["energy_distance"] == pytest.approx(energy_distance(x, y), rel=1e-6)
        assert row["energy_distance_squared"] == pytest.approx(energy_distance(x, y, squared=True), rel=1e-9)
        assert row["mmd"] == pytest.approx(mmd(x, y), rel=1e-6)
        assert row["r2_mean"] == pytest.approx(r2_mean(x, y), rel=1e-9)
        assert row["r2_delta"] == pytest.approx(r2_mean(x, y, control.X), rel=1e-9)
        assert row["pearson_delta"] == pytest.approx(pearson_delta(x, y, control.X), rel=1e-9)
    # Inputs untouched.
    for after, before in ((pred, pred_before), (truth, truth_before)):
        np.testing.assert_array_equal(after.X, before.X)
        pd.testing.assert_frame_equal(after.obs, before.obs)


def test_evaluate_reports_each_distance_beside_its_floor(eval_data):
    pred, truth, _ = eval_data
    metrics = ("energy_distance", "r2_mean", "mmd")
    df = evaluate(pred, truth, metrics=metrics, floors=True, max_cells=12)
    assert list(df.columns) == ["condition", "n_pred", "n_truth", "energy_distance", "energy_distance_floor", "r2_mean",
                                "mmd", "mmd_floor"]
    plain = evaluate(pred, truth, metrics=metrics, max_cells=12)
    pd.testing.assert_frame_equal(df[plain.columns], plain)
    for position, row in df.iterrows():
        y = truth.X[(truth.obs["condition"] == row["condition"]).to_numpy()]
        rng = np.random.default_rng([0, position])  # the subsample evaluate scored
        rng.choice(len(pred.X[(pred.obs["condition"] == row["condition"]).to_numpy()]), size=12, replace=False)
        y_sub = y[np.sort(rng.choice(len(y), size=12, replace=False))]
        assert row["energy_distance_floor"] == pytest.approx(noise_floor(y_sub, 12), rel=1e-6)
        assert row["mmd_floor"] == pytest.approx(noise_floor(y_sub, 12, metric="mmd"), rel=1e-6)
    with pytest.raises(CellflowValueError, match="floors must be True or False"):
        evaluate(pred, truth, floors="yes")


def test_evaluate_takes_the_floors_from_the_scores_own_pass_over_the_pairs(eval_data, monkeypatch):
    import cellflow.metrics._distribution as distribution

    passes = []
    row_sums = distribution._row_sums
    monkeypatch.setattr(distribution, "_row_sums", lambda *args, **kwargs: passes.append(1) or row_sums(*args, **kwargs))
    pred, truth, _ = eval_data
    counts = {}
    for floors in (False, True):
        passes.clear()
        evaluate(pred, truth, metrics=("energy_distance", "mmd"), floors=floors)
        counts[floors] = len(passes)
    assert counts[True] == counts[False] == 2 * 3  # two metrics, three groups


def test_evaluate_multi_column_groupby_control_match_and_features(eval_data):
    pred, truth, control = eval_data
    df = evaluate(
        pred,
        truth,
        groupby=["condition", "patient"],
        control=control,
        control_match="patient",
        metrics=["r2_delta", "pearson_delta", "sinkhorn_divergence"],
        features=["g0", "g2", "g3", "g5"],
    )
    assert len(df) == 6
    assert list(df.columns[:5]) == ["condition", "patient", "n_pred", "n_truth", "n_control"]
    cols = [0, 2, 3, 5]
    for _, row in df.iterrows():
        x, y = (
            a.X[((a.obs["condition"] == row["condition"]) & (a.obs["patient"] == row["patient"])).to_numpy()]
            for a in (pred, truth)
        )
        c = control.X[(control.obs["patient"] == row["patient"]).to_numpy()]
        assert row["n_control"] == 30
        assert row["r2_delta"] == pytest.approx(r2_mean(x, y, c, features=cols), rel=1e-9)
        assert row["pearson_delta"] == pytest.approx(pearson_delta(x, y, c, features=cols), rel=1e-9)
        assert row["sinkhorn_divergence"] == pytest.approx(sinkhorn_divergence(x, y), rel=1e-4, abs=1e-5)


def test_evaluate_control_match_fallback_and_ambiguity(eval_data):
    pred, truth, control = eval_data
    control = control[control.obs["patient"] == "p1"].copy()
    with pytest.warns(UserWarning, match="no control cell matches"):
        df = evaluate(
            pred,
            truth,
            groupby=["condition", "patient"],
            control=control,
            control_match=("patient",),
            metrics="r2_delta",
        )
    assert df["n_control"].tolist() == [30] * 6
    with pytest.raises(CellflowValueError, match="'patient' holds 2 values"):
        evaluate(pred, truth, control=control, control_match=("patient",), metrics="r2_delta")


def test_evaluate_max_cells_is_deterministic(eval_data):
    pred, truth, _ = eval_data
    kwargs = dict(metrics=("energy_distance", "r2_mean"), max_cells=10, seed=3)
    df1, df2 = evaluate(pred, truth, **kwargs), evaluate(pred, truth, **kwargs)
    pd.testing.assert_frame_equal(df1, df2)
    full = evaluate(pred, truth, metrics=("energy_distance", "r2_mean"))
    assert df1["n_pred"].tolist() == full["n_pred"].tolist() == [30, 30, 30]
    np.testing.assert_allclose(df1["r2_mean"], full["r2_mean"])  # means use all cells
    assert not np.allclose(df1["energy_distance"], full["energy_distance"])


def test_evaluate_obsm_rep_and_no_groupby(eval_data):
    pred, truth, _ = eval_data
    pred, truth = pred.copy(), truth.copy()
    pred.obsm["X_pca"], truth.obsm["X_pca"] = pred.X[:, :3] * 2, truth.X[:, :3] * 2
    metrics = ("energy_distance_squared", "r2_mean")
    df = evaluate(pred, truth, rep="X_pca", groupby=None, metrics=metrics, features=[0, 2])
    assert list(df.columns) == ["n_pred", "n_truth", "energy_distance_squared", "r2_mean"]
    assert df.loc[0, "n_pred"] == pred.n_obs  # the whole object, including the pred-only group
    x, y = pred.obsm["X_pca"], truth.obsm["X_pca"]
    assert df.loc[0, "energy_distance_squared"] == pytest.approx(_energy_ref(x, y, squared=True), rel=1e-5)
    assert df.loc[0, "r2_mean"] == pytest.approx(r2_mean(x, y, features=[0, 2]), rel=1e-9)


def test_evaluate_errors(eval_data):
    pred, truth, control = eval_data
    with pytest.raises(CellflowValueError) as err:
        evaluate(pred, truth, metrics=("mmd", "wasserstein"))
    assert "'wasserstein'" in str(err.value)
    for name in METRICS:
        assert repr(name) in str(err.value)
    pred2 = pred.copy()
    pred2.obs["drug"] = "x"
    with pytest.raises(CellflowKeyError, match=r"'drug'.*truth\.obs.*'condition'"):
        evaluate(pred2, truth, groupby="drug")
    with pytest.raises(CellflowKeyError, match="'drug'.*pred"):
        evaluate(pred, truth, groupby="drug")
    with pytest.raises(CellflowValueError, match=r"pearson_delta.*control="):
        evaluate(pred, truth, metrics=("r2_mean", "pearson_delta"))
    with pytest.raises(CellflowValueError, match=r"'b'.*no cells in pred"):
        evaluate(pred[pred.obs["condition"] != "b"].copy(), truth, metrics="r2_mean")
    with pytest.raises(CellflowKeyError, match="'zz'"):
        evaluate(pred, truth, metrics="r2_mean", features=["g0", "zz"])
    with pytest.raises(CellflowKeyError, match="'X_pca'"):
        evaluate(pred, truth, rep="X_pca")
    pred_pca, truth_pca = pred.copy(), truth.copy()
    pred_pca.obsm["X_pca"], truth_pca.obsm["X_pca"] = pred.X[:, :6], truth.X[:, :6]
    with pytest.raises(CellflowValueError, match="rep='X_pca' is not indexed by var"):
        evaluate(pred_pca, truth_pca, rep="X_pca", metrics="r2_mean", features=["g0"])
    with pytest.raises(CellflowKeyError, match="control_match column 'batch'"):
        evaluate(pred, truth, control=control, control_match="batch", metrics="r2_delta")


def test_metrics_tuple():
    assert METRICS == (
        "energy_distance",
        "energy_distance_squared",
        "mmd",
        "sinkhorn_divergence",
        "r2_mean",
        "r2_delta",
        "pearson_delta",
    )


# --------------------------------------------------------------------------- large


def _energy_ref_blocked(x, y, block=2000):
    """float64 energy distance, blocked, with centered data (exact up to ~1e-12)."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    center = np.concatenate([x, y]).mean(0)
    x, y = x - center, y - center

    def mean_dist(a, b):
        nb = np.einsum("ij,ij->i", b, b)
        total = 0.0
        for i in range(0, len(a), block):
            blk = a[i : i + block]
            d2 = np.einsum("ij,ij->i", blk, blk)[:, None] + nb[None, :] - 2.0 * blk @ b.T
            total += np.sqrt(np.maximum(d2, 0.0)).sum()
        return total / (len(a) * len(b))

    return 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)


@pytest.mark.slow
def test_energy_distance_20k_cells():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20_000, 50)).astype(np.float32)
    y = (rng.normal(size=(20_000, 50)) * 1.1 + 0.05).astype(np.float32)
    start = time.perf_counter()
    got = energy_distance(x, y)
    elapsed = time.perf_counter() - start
    print(f"energy_distance 20k x 20k x 50: {elapsed:.1f} s")
    assert got == pytest.approx(_energy_ref_blocked(x, y), rel=1e-5)


def test_evaluate_warns_when_predictions_and_observed_cells_are_on_different_scales(rng):
    counts = rng.poisson(3.0, size=(60, 5)).astype(np.float32)
    names = [f"g{i}" for i in range(5)]
    obs = pd.DataFrame({"condition": ["A"] * 60}, index=[f"c{i}" for i in range(60)])
    truth = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=names))
    truth.layers["logcounts"] = np.log1p(counts)
    pred = ad.AnnData(X=np.log1p(counts[::-1]) + 0.01, obs=truth.obs.copy(), var=pd.DataFrame(index=names))
    pred.layers["logcounts"] = pred.X.copy()  # as cellflow.pp.decode_adata writes a decoded prediction
    with pytest.warns(UserWarning, match=r"rep='X' holds raw counts in truth .* but not in pred.*\['logcounts'\]"):
        evaluate(pred, truth, metrics=("energy_distance",))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        on_one_scale = evaluate(pred, truth, rep="logcounts", metrics=("energy_distance",))
        assert on_one_scale["energy_distance"].iloc[0] < 0.2


def test_evaluate_gathers_sinkhorn_failures_in_one_warning_at_the_callers_line(rng):
    # far-apart clouds at epsilon=1 without cost scaling: Sinkhorn stops before converging
    x = rng.normal(size=(30, 4)) * 50.0
    obs = pd.DataFrame({"condition": ["A"] * 15 + ["B"] * 15}, index=[f"c{i}" for i in range(30)])
    pred, truth = ad.AnnData(X=x.astype(np.float32), obs=obs), ad.AnnData(X=(x[::-1] + 400.0).astype(np.float32), obs=obs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate(pred, truth, metrics=("sinkhorn_divergence",))
    sinkhorn = [w for w in caught if "Sinkhorn" in str(w.message)]
    assert len(sinkhorn) == 1 and sinkhorn[0].filename == __file__
    assert "groups ['A', 'B']" in str(sinkhorn[0].message) and "epsilon=" in str(sinkhorn[0].message)
