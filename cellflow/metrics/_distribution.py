"""Distances between predicted and observed cell populations.

Convention everywhere: ``x`` holds the **predicted** cells, shape ``(n, d)``, and ``y``
the **observed** cells, shape ``(m, d)``, for one condition. Every function accepts
numpy or JAX arrays and returns a Python :class:`float`.

The definitions follow the CellFlow / CellOT / cell-eval evaluation code:

* :func:`energy_distance`: biased (V-statistic) energy distance, Euclidean or squared
  Euclidean;
* :func:`mmd`: biased RBF MMD², averaged over several bandwidths;
* :func:`sinkhorn_divergence`: debiased entropic OT (``ott-jax``);
* :func:`r2_mean`: coefficient of determination between mean expression vectors
  (or mean shifts from control);
* :func:`pearson_delta`: Pearson correlation of mean shifts from control;
* :func:`noise_floor`: the expected energy distance or MMD of a perfect prediction;
* :func:`evaluate`: all of the above, per condition, on two AnnData objects.

The pairwise metrics (:func:`energy_distance`, :func:`mmd`) never build the full
``n x m`` distance matrix: rows and columns are padded to a multiple of a block size,
and a jitted :func:`jax.lax.scan` walks over ``block x block`` tiles, so memory stays
``O((n + m) d + block² G)`` (``G`` kernels) whatever the number of cells.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import anndata as ad
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax import lax

from cellflow._errors import CellflowKeyError, CellflowValueError, format_choices, user_stacklevel
from cellflow.data._representation import _counts_verdict, _sampled_values, default_representation, get_representation

__all__ = [
    "METRICS",
    "DEFAULT_MMD_GAMMAS",
    "energy_distance",
    "mmd",
    "sinkhorn_divergence",
    "noise_floor",
    "FLOOR_METRICS",
    "r2_mean",
    "pearson_delta",
    "evaluate",
]

#: Names accepted by :func:`evaluate` in ``metrics``.
METRICS: tuple[str, ...] = (
    "energy_distance",
    "energy_distance_squared",
    "mmd",
    "sinkhorn_divergence",
    "r2_mean",
    "r2_delta",
    "pearson_delta",
)

#: RBF bandwidths of CellOT / CellFlow ``compute_scalar_mmd``.
DEFAULT_MMD_GAMMAS: tuple[float, ...] = (2.0, 1.0, 0.5, 0.1, 0.01, 0.005)

_DELTA_METRICS = ("r2_delta", "pearson_delta")
_MIN_BLOCK = 8

ArrayLike = Any  # numpy array, jax array, or anything np.asarray accepts


# --------------------------------------------------------------------------- input checks


def _as_cells(array: ArrayLike, name: str) -> np.ndarray:
    """``array`` as a float64 ``(cells, features)`` numpy array; raise naming ``name``."""
    if isinstance(array, ad.AnnData):  # np.asarray would iterate it cell by cell before failing
        raise CellflowValueError(
            f"{name} is an AnnData; pass its cells as an array (e.g. {name}.X or {name}.obsm['X_pca']), or compare "
            "AnnData objects group by group with cellflow.metrics.evaluate."
        )
    try:
        out = np.asarray(array, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise CellflowValueError(f"{name} must be a numeric array of shape (cells, features): {err}") from None
    if out.ndim != 2:
        raise CellflowValueError(f"{name} must be 2-dimensional (cells, features), got shape {out.shape}.")
    if out.shape[0] == 0:
        raise CellflowValueError(f"{name} holds no cells (shape {out.shape}).")
    if not np.isfinite(out).all():
        bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
        raise CellflowValueError(
            f"{name} holds NaN or inf values in {bad.size} cell(s) (first row indices: {bad[:5].tolist()})."
        )
    return out


def _check_same_width(**arrays: np.ndarray) -> None:
    widths = {name: a.shape[1] for name, a in arrays.items()}
    if len(set(widths.values())) > 1:
        raise CellflowValueError(f"arrays must have the same number of features, got {widths}.")


def _check_chunk_size(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise CellflowValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    return int(chunk_size)


def _check_gammas(gammas: Sequence[float]) -> np.ndarray:
    gam = np.atleast_1d(np.asarray(gammas, dtype=np.float64))
    if gam.ndim != 1 or gam.size == 0 or not np.all(np.isfinite(gam)) or np.any(gam <= 0):
        raise CellflowValueError(f"gammas must be a non-empty sequence of positive finite numbers, got {gammas!r}.")
    return gam


def _column_index(features: ArrayLike | None, n_features: int) -> np.ndarray | slice:
    """Turn ``features`` (integer indices or a boolean mask) into a column index."""
    if features is None:
        return slice(None)
    idx = np.asarray(features)
    if idx.ndim != 1:
        raise CellflowValueError(f"features must be 1-dimensional (indices or a boolean mask), got shape {idx.shape}.")
    if idx.dtype == bool:
        if idx.size != n_features:
            raise CellflowValueError(
                f"features is a boolean mask of length {idx.size}, but the arrays have {n_features} features."
            )
        idx = np.flatnonzero(idx)
    elif idx.size == 0:
        idx = idx.astype(np.intp)
    elif not np.issubdtype(idx.dtype, np.integer):
        raise CellflowValueError(
            f"features must hold integer column indices or be a boolean mask, got dtype {idx.dtype}."
        )
    if idx.size == 0:
        raise CellflowValueError("features selects no column.")
    if idx.min() < -n_features or idx.max() >= n_features:
        raise CellflowValueError(
            f"features holds indices out of range for {n_features} features "
            f"(min {int(idx.min())}, max {int(idx.max())})."
        )
    return idx


# --------------------------------------------------------------------------- blocked kernel sums


def _block_size(n: int, m: int, chunk_size: int) -> int:
    """Tile side: ``chunk_size``, or the next power of two above ``max(n, m)`` if smaller.

    Rounding small problems up to a power of two bounds the number of compiled shapes.
    """
    size = max(n, m, _MIN_BLOCK)
    return int(min(chunk_size, 1 << (size - 1).bit_length()))


def _pad_rows(points: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad ``points`` with zero rows to a multiple of ``block``; return them and a 0/1 row mask."""
    n = points.shape[0]
    n_pad = -(-n // block) * block
    padded = np.zeros((n_pad, points.shape[1]), dtype=points.dtype)
    padded[:n] = points
    mask = np.zeros(n_pad, dtype=np.float32)
    mask[:n] = 1.0
    return padded, mask


def _kahan_add(
    acc: jax.Array, comp: jax.Array, start: tuple[jax.Array, ...], values: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Compensated (Kahan) ``acc[start : start + values.shape] += values``."""
    old = lax.dynamic_slice(acc, start, values.shape)
    old_comp = lax.dynamic_slice(comp, start, values.shape)
    corrected = values - old_comp
    new = old + corrected
    new_comp = (new - old) - corrected
    return lax.dynamic_update_slice(acc, new, start), lax.dynamic_update_slice(comp, new_comp, start)


@functools.partial(jax.jit, static_argnames=("kernel", "block"))
def _tile_row_sums(
    z: jax.Array,
    sq_norms: jax.Array,
    mask: jax.Array,
    n_blocks_x: jax.Array,
    params: jax.Array,
    *,
    kernel: str,
    block: int,
) -> jax.Array:
    """Row sums of ``k(‖z_i − z_j‖²)`` over the columns of each cloud, tile by tile.

    ``z`` stacks the padded predicted cells (its first ``n_blocks_x`` blocks) and the
    padded observed cells. The upper triangle of ``block x block`` tiles of the ``z``
    kernel matrix is visited with :func:`jax.lax.scan`; an off-diagonal tile also stands
    for its transpose, whose row sums are its column sums. The diagonal of diagonal
    tiles (a point against itself) is set to exactly 0 distance.

    Parameters
    ----------
    z
        Padded float32 points, shape ``(N, d)`` with ``N`` a multiple of ``block``.
    sq_norms
        Their squared norms, shape ``(N,)``.
    mask
        ``(N,)``: 1 for real rows, 0 for padding.
    n_blocks_x
        Number of leading blocks of ``z`` that hold predicted cells (a traced scalar,
        so that the split does not trigger a recompilation).
    params
        ``(G,)`` kernel parameters (the RBF ``gamma`` values; ignored for distances).
    kernel
        ``"euclidean"`` (``k = sqrt(d²)``, ``G = 1``) or ``"rbf"`` (``k = exp(-γ d²)``).
    block
        Tile side.

    Returns
    -------
    jax.Array of shape ``(N, 2, G)``: entry ``[i, s, g]`` is the float32 sum of
    ``k_g(z_i, z_j)`` over the real rows ``j`` of cloud ``s`` (0: predicted, 1: observed),
    accumulated across tiles with Kahan compensation.
    """
    n_out = 1 if kernel == "euclidean" else params.shape[0]
    n_blocks = z.shape[0] // block
    rows, cols = np.triu_indices(n_blocks)  # static: depends on shapes only
    eye = jnp.eye(block, dtype=bool)
    acc = jnp.zeros((z.shape[0], 2, n_out), dtype=jnp.float32)
    zero = jnp.zeros((), dtype=jnp.int32)

    def step(carry, tile):
        acc, comp = carry
        i, j = tile
        ri, rj = i * block, j * block
        zi = lax.dynamic_slice_in_dim(z, ri, block)
        zj = lax.dynamic_slice_in_dim(z, rj, block)
        cross = jnp.dot(zi, zj.T, precision=lax.Precision.HIGHEST)
        sq = lax.dynamic_slice_in_dim(sq_norms, ri, block)[:, None] + lax.dynamic_slice_in_dim(sq_norms, rj, block)
        d2 = jnp.maximum(sq - 2.0 * cross, 0.0)  # clamp round-off below 0
        d2 = jnp.where((i == j) & eye, 0.0, d2)
        weight = lax.dynamic_slice_in_dim(mask, ri, block)[:, None] * lax.dynamic_slice_in_dim(mask, rj, block)
        if kernel == "euclidean":
            values = (jnp.sqrt(d2) * weight)[..., None]
        else:
            values = jnp.exp(-d2[..., None] * params) * weight[..., None]
        cloud_i = (i >= n_blocks_x).astype(jnp.int32)
        cloud_j = (j >= n_blocks_x).astype(jnp.int32)
        acc, comp = _kahan_add(acc, comp, (ri, cloud_j, zero), values.sum(axis=1)[:, None, :])
        # The transposed tile (j, i) is not visited: add this tile's column sums to the
        # rows of block j (zeros on a diagonal tile, which is its own transpose).
        col_sums = jnp.where(i != j, values.sum(axis=0), 0.0)
        acc, comp = _kahan_add(acc, comp, (rj, cloud_i, zero), col_sums[:, None, :])
        return (acc, comp), None

    tiles = (jnp.asarray(rows, dtype=jnp.int32), jnp.asarray(cols, dtype=jnp.int32))
    (acc, comp), _ = lax.scan(step, (acc, jnp.zeros_like(acc)), tiles)
    return acc - comp


def _row_sums(z: np.ndarray, mask: np.ndarray, n_blocks_x: int, params: np.ndarray, kernel: str, block: int) -> np.ndarray:
    """:func:`_tile_row_sums` of padded, centred float32 points ``z``, as float64, shape ``(N, 2, G)``."""
    # Norms of the float32-rounded points, accumulated in float64.
    sq_norms = np.square(z.astype(np.float64)).sum(axis=1).astype(np.float32)
    sums = _tile_row_sums(
        z, sq_norms, mask, np.int32(n_blocks_x), np.asarray(params, dtype=np.float32), kernel=kernel, block=block
    )
    return np.asarray(sums, dtype=np.float64)


def _pair_means(x: np.ndarray, y: np.ndarray, kernel: str, params: np.ndarray, chunk_size: int) -> np.ndarray:
    """Means of ``k`` over the pairs (x, y), (x, x), (y, y); shape ``(3, G)``, float64.

    Both clouds are centered on their common mean first (in float64), which keeps the
    float32 ``‖a‖² + ‖b‖² − 2 a·b`` expansion accurate; distances are translation
    invariant. One jitted call per ``(padded total rows, block, d, G)``.
    """
    n, m = x.shape[0], y.shape[0]
    center = (x.sum(axis=0) + y.sum(axis=0)) / (n + m)
    block = _block_size(n, m, chunk_size)
    x_pad, x_mask = _pad_rows((x - center).astype(np.float32), block)
    y_pad, y_mask = _pad_rows((y - center).astype(np.float32), block)
    z = np.concatenate([x_pad, y_pad])
    sums = _row_sums(z, np.concatenate([x_mask, y_mask]), x_pad.shape[0] // block, params, kernel, block)
    n_x = x_pad.shape[0]
    s_xx, s_xy = sums[:n_x, 0].sum(axis=0), sums[:n_x, 1].sum(axis=0)
    s_yx, s_yy = sums[n_x:, 0].sum(axis=0), sums[n_x:, 1].sum(axis=0)
    return np.stack([(s_xy + s_yx) / (2.0 * n * m), s_xx / (n * n), s_yy / (m * m)])

# --------------------------------------------------------------------------- public metrics


def energy_distance(x: ArrayLike, y: ArrayLike, *, squared: bool = False, chunk_size: int = 1024) -> float:
    r"""Biased energy distance between predicted and observed cells.

    .. math::

        E = \frac{2}{nm}\sum_{i,j} \delta(x_i, y_j) - \frac{1}{n^2}\sum_{i,j} \delta(x_i, x_j)
            - \frac{1}{m^2}\sum_{i,j} \delta(y_i, y_j),

    with diagonals included (V-statistic) and :math:`\delta` the Euclidean distance, or
    the squared Euclidean distance when ``squared=True`` (the scPerturb / CellFlow
    ``compute_e_distance`` variant).

    Parameters
    ----------
    x
        Predicted cells, shape ``(n, d)``.
    y
        Observed cells, shape ``(m, d)``.
    squared
        Use squared Euclidean distances. For this biased estimator the value equals
        :math:`2\,\lVert \bar x - \bar y \rVert^2` exactly, which is what is computed
        (in float64, in ``O((n + m) d)``), free of the cancellation a pairwise float32
        sum would suffer.
    chunk_size
        Side of the square tiles of the distance matrix processed at once; memory is
        ``O((n + m) d + chunk_size²)``.

    Returns
    -------
    float
        The energy distance (0 for identical clouds, up to float32 round-off).

    Notes
    -----
    Euclidean distances are computed in float32 (in JAX, jitted, tile by tile) on clouds
    centered on their common mean, clamped at 0 before the square root, with the
    diagonal of the self terms set to exactly 0; tile sums are accumulated per row with
    Kahan compensation and the rows are summed in float64. Points that coincide across
    ``x`` and ``y`` get a distance of order :math:`\sqrt{\epsilon_{32}}\,\lVert x\rVert`
    instead of 0.
    """
    x_arr, y_arr = _as_cells(x, "x"), _as_cells(y, "y")
    _check_same_width(x=x_arr, y=y_arr)
    chunk_size = _check_chunk_size(chunk_size)
    if squared:
        delta = x_arr.mean(axis=0) - y_arr.mean(axis=0)
        return float(2.0 * np.dot(delta, delta))
    return _energy_of(_pair_means(x_arr, y_arr, "euclidean", np.zeros(1), chunk_size))


def _energy_of(means: np.ndarray) -> float:
    """The energy distance from :func:`_pair_means` of the Euclidean distance."""
    return float(2.0 * means[0, 0] - means[1, 0] - means[2, 0])


def _mmd_of(means: np.ndarray) -> float:
    """The MMD averaged over bandwidths from :func:`_pair_means` of the RBF kernels."""
    return float((means[1] + means[2] - 2.0 * means[0]).mean())


def _self_kernel_total(y: np.ndarray, kernel: str, params: np.ndarray, chunk_size: int) -> np.ndarray:
    """Sum of ``k(y_i, y_j)`` over all ordered pairs of ``y``, diagonal included; shape ``(G,)``, float64."""
    centred = (y - y.mean(axis=0)).astype(np.float32)
    block = _block_size(y.shape[0], y.shape[0], chunk_size)
    padded, mask = _pad_rows(centred, block)
    return _row_sums(padded, mask, 0, params, kernel, block)[:, 1].sum(axis=0)  # no block is "predicted"


#: Metrics with a closed-form noise floor (:func:`noise_floor`).
FLOOR_METRICS: tuple[str, ...] = ("energy_distance", "energy_distance_squared", "mmd")


def noise_floor(
    y: ArrayLike,
    n_predicted: int | None = None,
    *,
    metric: str = "energy_distance",
    gammas: Sequence[float] = DEFAULT_MMD_GAMMAS,
    chunk_size: int = 1024,
) -> float:
    r"""Expected score of a perfect prediction: the noise floor of a biased distance.

    A perfect prediction is ``n_predicted`` cells drawn independently from the distribution
    the observed cells ``y`` come from. Its :func:`energy_distance` or :func:`mmd` to ``y``
    is not 0, because both are biased V-statistics of finite samples; this is the value it
    has in expectation, estimated without bias from ``y`` alone (no second sample, no
    generator, no random numbers):

    .. math::

        \mathbb{E}\,E = \Big(\frac1n + \frac1m\Big)\,\mathbb{E}\,\delta(Y, Y'), \qquad
        \mathbb{E}\,\mathrm{MMD}^2_\gamma = \Big(\frac1n + \frac1m\Big)
            \big(1 - \mathbb{E}\,k_\gamma(Y, Y')\big),

    where ``Y, Y'`` are two independent observed cells, estimated by the mean over the
    ``m (m - 1)`` ordered pairs of distinct cells of ``y``, and, for the squared energy
    distance, :math:`\mathbb{E}\,\delta = 2 \operatorname{tr}\Sigma` with the unbiased
    covariance of ``y``. A score near its floor cannot be improved by any model; the gap
    from a baseline's score to the floor is what there is to win. Unlike the distance
    between two halves of ``y``, it needs no split, so it holds for the sample sizes
    actually scored.

    Parameters
    ----------
    y
        Observed cells, shape ``(m, d)``, ``m >= 2``.
    n_predicted
        Number of predicted cells scored against ``y`` (default ``m``).
    metric
        ``"energy_distance"``, ``"energy_distance_squared"`` or ``"mmd"``
        (:data:`FLOOR_METRICS`), with the same definitions as those functions.
    gammas
        RBF parameters of ``"mmd"``, shape ``(G,)``.
    chunk_size
        Side of the square tiles of the distance matrix processed at once.

    Returns
    -------
    float
        The expected score of a perfect prediction of ``n_predicted`` cells.

    Examples
    --------
    >>> floor = cf.metrics.noise_floor(truth, n_predicted=len(pred))
    >>> cf.metrics.energy_distance(pred, truth) / floor  # 1 is as good as it gets
    """
    if metric not in FLOOR_METRICS:
        raise CellflowValueError(
            f"metric={metric!r} has no closed-form noise floor; choose one of {list(FLOOR_METRICS)}."
        )
    y_arr = _as_cells(y, "y")
    m = y_arr.shape[0]
    if m < 2:
        raise CellflowValueError(f"y must hold at least 2 cells to estimate a noise floor, got shape {y_arr.shape}.")
    n = m if n_predicted is None else n_predicted
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise CellflowValueError(f"n_predicted must be a positive integer or None, got {n_predicted!r}.")
    chunk_size = _check_chunk_size(chunk_size)
    if metric == "energy_distance_squared":
        return float((1.0 / n + 1.0 / m) * 2.0 * np.var(y_arr, axis=0, ddof=1).sum())
    if metric == "energy_distance":
        return _floor_of(_self_kernel_total(y_arr, "euclidean", np.zeros(1), chunk_size), n, m, metric)
    return _floor_of(_self_kernel_total(y_arr, "rbf", _check_gammas(gammas), chunk_size), n, m, metric)


def _floor_of(self_total: np.ndarray, n: int, m: int, metric: str) -> float:
    """:func:`noise_floor` of ``"energy_distance"`` or ``"mmd"`` from the sum of ``k(y_i, y_j)``
    over all ``m²`` ordered pairs of observed cells, diagonal included, shape ``(G,)``."""
    # the diagonal holds distance 0: k = 0 for distances, k = 1 for the RBF kernel
    distinct = self_total if metric == "energy_distance" else self_total - m
    mean = distinct / (m * (m - 1))
    return float((1.0 / n + 1.0 / m) * (mean[0] if metric == "energy_distance" else (1.0 - mean).mean()))


def _score_and_floor(x: np.ndarray, y: np.ndarray, metric: str) -> tuple[float, float]:
    """:func:`energy_distance` or :func:`mmd` (default parameters) of ``x`` to ``y`` and the
    :func:`noise_floor` of ``len(x)`` cells, from one pass over the pairs (``len(y) >= 2``)."""
    x, y = _as_cells(x, "x"), _as_cells(y, "y")
    n, m = x.shape[0], y.shape[0]
    if metric == "energy_distance":
        means = _pair_means(x, y, "euclidean", np.zeros(1), 1024)
        return _energy_of(means), _floor_of(means[2] * m * m, n, m, metric)
    means = _pair_means(x, y, "rbf", _check_gammas(DEFAULT_MMD_GAMMAS), 1024)
    return _mmd_of(means), _floor_of(means[2] * m * m, n, m, metric)


def mmd(
    x: ArrayLike,
    y: ArrayLike,
    *,
    gammas: Sequence[float] = DEFAULT_MMD_GAMMAS,
    chunk_size: int = 1024,
) -> float:
    r"""Biased RBF maximum mean discrepancy, averaged over bandwidths.

    For each :math:`\gamma`, with :math:`k_\gamma(a, b) = \exp(-\gamma \lVert a - b\rVert^2)`
    (sklearn ``rbf_kernel``),

    .. math::

        \mathrm{MMD}^2_\gamma = \overline{K_{xx}} + \overline{K_{yy}} - 2\,\overline{K_{xy}},

    the biased V-statistic (diagonals included, no square root). The value returned is
    the mean over ``gammas`` (CellOT / CellFlow ``compute_scalar_mmd``).

    Parameters
    ----------
    x
        Predicted cells, shape ``(n, d)``.
    y
        Observed cells, shape ``(m, d)``.
    gammas
        Positive RBF parameters, shape ``(G,)``.
    chunk_size
        Side of the square tiles of the kernel matrix processed at once.

    Returns
    -------
    float
        The mean over ``gammas`` of MMD²_γ.
    """
    x_arr, y_arr = _as_cells(x, "x"), _as_cells(y, "y")
    _check_same_width(x=x_arr, y=y_arr)
    chunk_size = _check_chunk_size(chunk_size)
    gam = _check_gammas(gammas)
    return _mmd_of(_pair_means(x_arr, y_arr, "rbf", gam, chunk_size))


_SINKHORN_MAX_ITERATIONS = 20_000


@functools.partial(jax.jit, static_argnames=("epsilon", "scale_cost"))
def _sinkdiv(
    x: jax.Array, y: jax.Array, a: jax.Array, b: jax.Array, *, epsilon: float, scale_cost: float | str
) -> tuple[jax.Array, jax.Array]:
    from ott.geometry import costs, geometry, pointcloud
    from ott.tools import sinkhorn_divergence as sd

    def cost(u: jax.Array, v: jax.Array) -> jax.Array:
        return pointcloud.PointCloud(u, v, cost_fn=costs.SqEuclidean()).cost_matrix

    # The costs are computed once and handed over as matrices: point clouds make ott recompute
    # them from the d-dimensional cells at every convergence check, which on 1,267 genes took
    # two thirds of the time. ε = 1 on unscaled PCA coordinates (costs in the hundreds) needs
    # more than ott's default 2,000 iterations for some populations; a converged solve stops
    # early either way.
    value, out = sd.sinkhorn_divergence(
        geometry.Geometry, cost(x, y), cost(x, x), cost(y, y), a=a, b=b, epsilon=epsilon, scale_cost=scale_cost,
        solve_kwargs={"max_iterations": _SINKHORN_MAX_ITERATIONS},
    )
    return value, jnp.all(jnp.asarray(out.converged))


def _bucket(n: int) -> int:
    """Round ``n`` up to 16 or to one of 4 sizes per octave (waste at most 25 %)."""
    if n <= 16:
        return 16
    step = 1 << ((n - 1).bit_length() - 3)
    return -(-n // step) * step


def sinkhorn_divergence(
    x: ArrayLike,
    y: ArrayLike,
    *,
    epsilon: float = 1.0,
    scale_cost: float | str = 1.0,
) -> float:
    r"""Debiased Sinkhorn divergence with squared Euclidean cost (``ott-jax``).

    .. math::

        S_\varepsilon(X, Y) = \mathrm{OT}_\varepsilon(X, Y) - \tfrac12 \mathrm{OT}_\varepsilon(X, X)
            - \tfrac12 \mathrm{OT}_\varepsilon(Y, Y),

    with uniform weights and :math:`\mathrm{OT}_\varepsilon` ott's ``reg_ot_cost``; this is
    CellFlow's ``compute_sinkhorn_div`` (reported there for ε ∈ {1, 10, 100}).

    Parameters
    ----------
    x
        Predicted cells, shape ``(n, d)``.
    y
        Observed cells, shape ``(m, d)``.
    epsilon
        Entropic regularisation, in units of the (scaled) cost.
    scale_cost
        Passed to :class:`ott.geometry.pointcloud.PointCloud` (a float, or ``"mean"``,
        ``"max_cost"``, ...).

    Returns
    -------
    float
        :math:`S_\varepsilon`; about 0 for identical clouds. A :class:`RuntimeWarning`
        is emitted when one of the three Sinkhorn problems did not converge.

    Notes
    -----
    Compiling ott's three Sinkhorn solves takes seconds, so with a numeric
    ``scale_cost`` each cloud is padded to a bucketed size (4 sizes per octave) with
    zero-weight points, which leaves the value unchanged and lets calls with different
    numbers of cells share one compilation. String ``scale_cost``
    values depend on the cost matrix, so those calls are not padded. ott builds
    ``n x m`` cost matrices: subsample large populations (``max_cells`` in
    :func:`evaluate`).
    """
    value, converged = _sinkhorn_divergence_checked(x, y, epsilon=epsilon, scale_cost=scale_cost)
    if not converged:
        warnings.warn(
            f"sinkhorn_divergence: Sinkhorn did not converge for epsilon={epsilon!r}; "
            "the value is approximate (try a larger epsilon or a scale_cost such as 'mean').",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )
    return value


def _sinkhorn_divergence_checked(
    x: ArrayLike, y: ArrayLike, *, epsilon: float = 1.0, scale_cost: float | str = 1.0
) -> tuple[float, bool]:
    """:func:`sinkhorn_divergence` and whether its three Sinkhorn problems converged."""
    x_arr, y_arr = _as_cells(x, "x"), _as_cells(y, "y")
    _check_same_width(x=x_arr, y=y_arr)
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float, np.number)) or not epsilon > 0:
        raise CellflowValueError(f"epsilon must be a positive number, got {epsilon!r}.")
    n, m = x_arr.shape[0], y_arr.shape[0]
    a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
    if isinstance(scale_cost, str):
        pass
    elif isinstance(scale_cost, bool) or not isinstance(scale_cost, (int, float, np.number)) or not scale_cost > 0:
        raise CellflowValueError(f"scale_cost must be a positive number or an ott scaling name, got {scale_cost!r}.")
    else:
        scale_cost = float(scale_cost)
        # each cloud to its own bucket: a common size would turn 1,500 predicted against 120
        # observed cells into two 1,536-point clouds, and the (x, y) and (y, y) solves 12 and
        # 144 times larger than they need be
        size_x, size_y = _bucket(n), _bucket(m)
        center = (x_arr.sum(axis=0) + y_arr.sum(axis=0)) / (n + m)
        x_arr = np.concatenate([x_arr, np.broadcast_to(center, (size_x - n, x_arr.shape[1]))])
        y_arr = np.concatenate([y_arr, np.broadcast_to(center, (size_y - m, y_arr.shape[1]))])
        a, b = np.pad(a, (0, size_x - n)), np.pad(b, (0, size_y - m))
    value, converged = _sinkdiv(
        jnp.asarray(x_arr, dtype=jnp.float32),
        jnp.asarray(y_arr, dtype=jnp.float32),
        jnp.asarray(a, dtype=jnp.float32),
        jnp.asarray(b, dtype=jnp.float32),
        epsilon=float(epsilon),
        scale_cost=scale_cost,
    )
    return float(value), bool(converged)


def _r2_score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """``sklearn.metrics.r2_score`` for 1-d inputs (``force_finite=True`` semantics)."""
    if y_true.size < 2:
        return float("nan")  # sklearn: not well defined with fewer than two samples
    ss_res = float(np.sum((y_true - y_pred) ** 2))
    ss_tot = float(np.sum((y_true - y_true.mean()) ** 2))
    if ss_tot == 0.0:
        return 1.0 if ss_res == 0.0 else 0.0
    return 1.0 - ss_res / ss_tot


def r2_mean(
    x: ArrayLike,
    y: ArrayLike,
    control: ArrayLike | None = None,
    *,
    features: ArrayLike | None = None,
) -> float:
    r"""Coefficient of determination between mean profiles (CellFlow ``compute_r_squared``).

    Without ``control``: ``r2_score(y_true=mean(y), y_pred=mean(x))`` over features.
    With ``control``: the same on mean shifts, ``y_true = mean(y) − mean(control)`` and
    ``y_pred = mean(x) − mean(control)``.

    Parameters
    ----------
    x
        Predicted cells, shape ``(n, d)``.
    y
        Observed cells, shape ``(m, d)``.
    control
        Optional control cells, shape ``(c, d)``.
    features
        Optional integer column indices or boolean mask of length ``d`` restricting the
        score to those features (e.g. top differentially expressed genes).

    Returns
    -------
    float
        :math:`1 - \sum_g (t_g - p_g)^2 / \sum_g (t_g - \bar t)^2`, computed in float64.
        As in sklearn: NaN with fewer than two features; 1.0 (perfect) or 0.0 when the
        true vector is constant. Not symmetric in ``x`` and ``y``.
    """
    x_arr, y_arr = _as_cells(x, "x"), _as_cells(y, "y")
    arrays = {"x": x_arr, "y": y_arr}
    if control is not None:
        arrays["control"] = _as_cells(control, "control")
    _check_same_width(**arrays)
    cols = _column_index(features, x_arr.shape[1])
    y_true = y_arr[:, cols].mean(axis=0)
    y_pred = x_arr[:, cols].mean(axis=0)
    if control is not None:
        base = arrays["control"][:, cols].mean(axis=0)
        y_true, y_pred = y_true - base, y_pred - base
    return _r2_score(y_true, y_pred)


def pearson_delta(
    x: ArrayLike,
    y: ArrayLike,
    control: ArrayLike,
    *,
    features: ArrayLike | None = None,
) -> float:
    """Pearson correlation of predicted and observed mean shifts from control (cell-eval).

    Parameters
    ----------
    x
        Predicted cells, shape ``(n, d)``.
    y
        Observed cells, shape ``(m, d)``.
    control
        Control cells, shape ``(c, d)``.
    features
        Optional integer column indices or boolean mask of length ``d``.

    Returns
    -------
    float
        Pearson r over features between ``mean(x) − mean(control)`` and
        ``mean(y) − mean(control)``; NaN if either shift is constant or fewer than two
        features are used.
    """
    x_arr, y_arr, c_arr = _as_cells(x, "x"), _as_cells(y, "y"), _as_cells(control, "control")
    _check_same_width(x=x_arr, y=y_arr, control=c_arr)
    cols = _column_index(features, x_arr.shape[1])
    base = c_arr[:, cols].mean(axis=0)
    pred = x_arr[:, cols].mean(axis=0) - base
    true = y_arr[:, cols].mean(axis=0) - base
    if pred.size < 2:
        return float("nan")
    pred = pred - pred.mean()
    true = true - true.mean()
    denom = np.sqrt(np.dot(pred, pred) * np.dot(true, true))
    if denom == 0.0:
        return float("nan")
    return float(np.clip(np.dot(pred, true) / denom, -1.0, 1.0))


# --------------------------------------------------------------------------- evaluate


def _validate_metrics(metrics: str | Sequence[str]) -> tuple[str, ...]:
    names = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    if not names:
        raise CellflowValueError(f"metrics is empty; choose among {format_choices(METRICS)}.")
    for name in names:
        if name not in METRICS:
            raise CellflowValueError(f"unknown metric {name!r} in metrics; valid choices: {format_choices(METRICS)}.")
    if len(set(names)) != len(names):
        raise CellflowValueError(f"metrics lists a metric twice: {list(names)!r}.")
    return names


def _as_columns(value: str | Sequence[str] | None, name: str) -> list[str]:
    if value is None:
        return []
    cols = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(c, str) for c in cols):
        raise CellflowValueError(f"{name} must be an obs column name or a list of them, got {value!r}.")
    return cols


def _check_obs_columns(adata: ad.AnnData, columns: list[str], arg: str, which: str) -> None:
    for col in columns:
        if col not in adata.obs.columns:
            raise CellflowKeyError(
                f"{arg} column {col!r} is not in {which}.obs; available columns: "
                f"{format_choices(adata.obs.columns)}."
            )


def _group_indices(obs: pd.DataFrame, columns: list[str]) -> dict[tuple[Hashable, ...], np.ndarray]:
    """Map each observed combination of ``columns`` (as a tuple) to its row positions."""
    if not columns:
        return {(): np.arange(len(obs))}
    grouped = obs[columns].groupby(columns, observed=True, sort=True, dropna=True).indices
    return {(k if isinstance(k, tuple) else (k,)): np.asarray(v) for k, v in grouped.items()}


class _GroupMatch(NamedTuple):
    """Truth's groups matched to pred's (see :func:`_match_groups`)."""

    truth: dict[tuple, np.ndarray]  # truth's rows per group key
    pred: dict[tuple, np.ndarray]  # pred's rows per comparable key (:func:`_comparable`)
    pred_keys: list[tuple]  # pred's group keys as written
    absent: list[tuple]  # truth's group keys that pred lacks


def _match_groups(pred_obs: pd.DataFrame, truth_obs: pd.DataFrame, columns: list[str]) -> _GroupMatch:
    """Group both tables by ``columns`` and find truth's groups without predicted cells.

    A dose written 100.0 in one table and '100.0' in the other is one group.
    """
    truth_groups = _group_indices(truth_obs, columns)
    pred_by_label = _group_indices(pred_obs, columns)
    pred_groups: dict[tuple, np.ndarray] = {}
    for k, v in pred_by_label.items():
        pred_groups[_comparable(k)] = np.concatenate([pred_groups.get(_comparable(k), np.empty(0, int)), v])
    absent = [k for k in truth_groups if _comparable(k) not in pred_groups]
    return _GroupMatch(truth_groups, pred_groups, list(pred_by_label), absent)


def _group_label(key: tuple) -> Any:
    """A group key as messages show it: the bare value of a one-column key."""
    return key[0] if len(key) == 1 else key


def _absent_groups_message(groups: _GroupMatch, columns: list[str]) -> str:
    shown = [_group_label(k) for k in groups.absent]
    present = [_group_label(k) for k in groups.pred_keys]
    return (
        f"groups {format_choices(shown, limit=10)} of truth (groupby={columns!r}) have no cells in pred, whose "
        f"groups are {format_choices(present, limit=10)}."
    )


def _comparable(key: tuple) -> tuple:
    """A group key whose numbers compare as numbers, however they were written (``100``, ``"100.0"``)."""

    def value(v: Any) -> Any:
        if isinstance(v, (bool, np.bool_)):
            return v
        try:
            return float(v)
        except (TypeError, ValueError):
            return str(v)

    return tuple(value(v) for v in key)


def _resolve_features(features: Sequence[Any] | np.ndarray | None, reference: ad.AnnData, n_features: int, rep: str):
    """``features`` (var names of ``reference``, integer indices or a boolean mask) as column indices."""
    if features is None:
        return None
    if isinstance(features, str):
        features = [features]
    feats = np.asarray(features)
    if feats.ndim != 1 or feats.size == 0:
        raise CellflowValueError(f"features must be a non-empty 1-d list of var names or indices, got {features!r}.")
    if feats.dtype.kind in "USO" and all(isinstance(f, str) for f in feats.tolist()):
        if (rep != "X" and rep in reference.obsm) or n_features != reference.n_vars:
            raise CellflowValueError(
                f"features are var names, but rep={rep!r} is not indexed by var (it has {n_features} columns, "
                f"the AnnData has {reference.n_vars} vars); pass integer column indices for this representation."
            )
        positions = reference.var_names.get_indexer(feats)
        missing = feats[positions < 0].tolist()
        if missing:
            raise CellflowKeyError(
                f"features {format_choices(missing, limit=10)} are not among the var names "
                f"(e.g. {format_choices(reference.var_names[:10])})."
            )
        return positions
    return _column_index(feats, n_features)


def _subsample(n: int, max_cells: int | None, rng: np.random.Generator) -> np.ndarray:
    if max_cells is None or n <= max_cells:
        return np.arange(n)
    return np.sort(rng.choice(n, size=max_cells, replace=False))


def evaluate(
    pred: ad.AnnData,
    truth: ad.AnnData,
    *,
    rep: str | None = None,
    groupby: str | Sequence[str] | None = "condition",
    control: ad.AnnData | None = None,
    control_match: str | Sequence[str] = (),
    metrics: str | Sequence[str] = ("energy_distance", "mmd", "sinkhorn_divergence", "r2_mean"),
    features: Sequence[Any] | np.ndarray | None = None,
    max_cells: int | None = None,
    seed: int = 0,
    floors: bool = False,
) -> pd.DataFrame:
    """Compare predicted and observed cells condition by condition.

    Parameters
    ----------
    pred
        Predicted cells, ``(n_obs_pred, n_vars)``.
    truth
        Observed cells, ``(n_obs_truth, n_vars)``.
    rep
        Representation used for every metric: ``"X"``, an ``obsm`` key or a layer
        (:func:`cellflow.data.get_representation`), the same in ``pred``, ``truth`` and
        ``control``. ``None``: the one ``pred`` was predicted in (``ResponseModel.predict``
        records it), else ``"X"``. For ``"X"`` and layers, the columns of ``truth`` and
        ``control`` are matched to ``pred``'s var names, so they may hold their genes in
        another order or more genes (:func:`cellflow.data.feature_columns`).
    groupby
        obs column, or list of columns, present in both ``pred`` and ``truth``; one row is
        returned per combination present in ``truth`` (sorted). ``None`` compares the whole
        objects as a single group. Groups present only in ``pred`` are ignored; a group of
        ``truth`` without predicted cells raises :class:`CellflowValueError`. Cells of
        ``truth`` with a missing label raise; those of ``pred`` are ignored.
    control
        Control cells, required for ``"r2_delta"`` and ``"pearson_delta"``.
    control_match
        obs columns (of ``truth`` and ``control``) on which each group's controls are
        matched, e.g. ``("patient",)``: the group's truth cells must hold a single value
        in each column, and the controls with the same values are used. If no control
        matches, all controls are used and a :class:`UserWarning` names the groups.
    metrics
        Names from :data:`METRICS`: ``"energy_distance"`` (Euclidean),
        ``"energy_distance_squared"``, ``"mmd"``, ``"sinkhorn_divergence"`` (ε = 1),
        ``"r2_mean"``, ``"r2_delta"``, ``"pearson_delta"``, each with its function's
        defaults.
    features
        var names, integer column indices or a boolean mask restricting the mean-based
        metrics (``r2_mean``, ``r2_delta``, ``pearson_delta``), e.g. top DEGs. Var names
        need a representation with one column per var (``"X"`` or a layer).
    max_cells
        If given, the distribution metrics (energy distance, MMD, Sinkhorn) use at most
        this many cells per side and group, drawn without replacement, deterministically
        from ``seed`` and the group's position. Mean-based metrics use all cells.
    seed
        Seed of the subsampling.
    floors
        Add a ``"<metric>_floor"`` column after each of ``"energy_distance"``,
        ``"energy_distance_squared"`` and ``"mmd"`` asked: what a perfect prediction of
        the group, as many cells as were scored, would score in expectation
        (:func:`noise_floor`, from the observed cells alone).

    Returns
    -------
    pandas.DataFrame
        One row per group: the ``groupby`` columns, ``n_pred``, ``n_truth`` (cells in the
        group, before subsampling), ``n_control`` (only when ``control`` is given: the
        matched controls), then one float column per metric, in the order asked (each
        followed by its floor with ``floors=True``).

    Raises
    ------
    CellflowValueError
        Unknown metric, delta metric without ``control``, group without predictions,
        ambiguous ``control_match``, bad ``max_cells``.
    CellflowKeyError
        Missing obs column, representation or var name.
    """
    names = _validate_metrics(metrics)
    if rep is None:
        rep = default_representation(pred)
    group_cols = _as_columns(groupby, "groupby")
    match_cols = _as_columns(control_match, "control_match")
    for arg, value in (("pred", pred), ("truth", truth)):
        if not isinstance(value, ad.AnnData):
            raise CellflowValueError(f"{arg} must be an AnnData, got {type(value).__name__}.")
    if control is not None and not isinstance(control, ad.AnnData):
        raise CellflowValueError(f"control must be an AnnData or None, got {type(control).__name__}.")
    needs_control = [n for n in names if n in _DELTA_METRICS]
    if needs_control and control is None:
        raise CellflowValueError(
            f"metrics {needs_control!r} compare shifts from control cells: pass control=<AnnData of control cells>."
        )
    if not isinstance(floors, (bool, np.bool_)):
        raise CellflowValueError(f"floors must be True or False, got {floors!r}.")
    bad_max = isinstance(max_cells, bool) or not isinstance(max_cells, (int, np.integer)) or max_cells < 1
    if max_cells is not None and bad_max:
        raise CellflowValueError(f"max_cells must be a positive integer or None, got {max_cells!r}.")
    _check_obs_columns(pred, group_cols, "groupby", "pred")
    _check_obs_columns(truth, group_cols, "groupby", "truth")
    if match_cols:
        if control is None:
            raise CellflowValueError(f"control_match={match_cols!r} needs control=<AnnData of control cells>.")
        _check_obs_columns(truth, match_cols, "control_match", "truth")
        _check_obs_columns(control, match_cols, "control_match", "control")
    if group_cols:
        missing_label = truth.obs[group_cols].isna().any(axis=1).to_numpy()
        if missing_label.any():
            raise CellflowValueError(
                f"truth holds {int(missing_label.sum())} cell(s) with a missing groupby label in {group_cols!r}."
            )

    x_all = get_representation(pred, rep)
    # genes are matched by name: truth and control may hold them in another order, or more of them
    var_order = None if rep in pred.obsm else list(pred.var_names)
    y_all = get_representation(truth, rep, features=var_order)
    c_all = get_representation(control, rep, features=var_order) if control is not None else None
    widths = {"pred": x_all.shape[1], "truth": y_all.shape[1]}
    if c_all is not None:
        widths["control"] = c_all.shape[1]
    if len(set(widths.values())) > 1:
        raise CellflowValueError(f"rep={rep!r} has different numbers of columns: {widths}.")
    if var_order is not None:
        _warn_if_scales_differ(x_all, y_all, rep, truth)
    # after matching by name the columns follow pred's var order, else (no shared name) truth's
    named = var_order is not None and pred.var_names.isin(truth.var_names).any()
    cols = _resolve_features(features, pred if named else truth, y_all.shape[1], rep)

    groups = _match_groups(pred.obs, truth.obs, group_cols)
    if groups.absent:
        raise CellflowValueError(_absent_groups_message(groups, group_cols))
    truth_groups, pred_groups = groups.truth, groups.pred

    fallback: list[Any] = []
    unconverged: list[Any] = []
    rows = []
    for position, (key, truth_idx) in enumerate(truth_groups.items()):
        pred_idx = np.sort(pred_groups[_comparable(key)])
        x, y = x_all[pred_idx], y_all[truth_idx]
        row: dict[str, Any] = dict(zip(group_cols, key))
        row["n_pred"], row["n_truth"] = len(pred_idx), len(truth_idx)

        ctrl = None
        if c_all is not None:
            ctrl_mask = np.ones(c_all.shape[0], dtype=bool)
            for col in match_cols:
                values = truth.obs[col].iloc[truth_idx].unique()
                if len(values) != 1:
                    raise CellflowValueError(
                        f"control_match column {col!r} holds {len(values)} values "
                        f"{format_choices(list(values), limit=5)} in group {dict(zip(group_cols, key))!r} of truth; "
                        "each group must have a single value to match its controls."
                    )
                ctrl_mask &= (control.obs[col] == values[0]).to_numpy(dtype=bool, na_value=False)
            if match_cols and not ctrl_mask.any():
                fallback.append(_group_label(key))
                ctrl_mask[:] = True
            ctrl = c_all[ctrl_mask]
            row["n_control"] = int(ctrl_mask.sum())

        rng = np.random.default_rng([seed, position])
        x_sub = x[_subsample(len(x), max_cells, rng)]
        y_sub = y[_subsample(len(y), max_cells, rng)]
        for name in names:
            if name == "sinkhorn_divergence":
                # not through _METRIC_FUNCS: its non-convergence is gathered into one warning below
                row[name], converged = _sinkhorn_divergence_checked(x_sub, y_sub)
                if not converged:
                    unconverged.append(_group_label(key))
            elif floors and name in ("energy_distance", "mmd") and len(y_sub) > 1:
                # the floor's observed pairs are among the score's: one pass for both
                row[name], row[f"{name}_floor"] = _score_and_floor(x_sub, y_sub, name)
            else:
                row[name] = _METRIC_FUNCS[name](x, y, x_sub, y_sub, ctrl, cols)
                if floors and name in FLOOR_METRICS:
                    row[f"{name}_floor"] = noise_floor(y_sub, len(x_sub), metric=name) if len(y_sub) > 1 else np.nan
        rows.append(row)

    if unconverged:
        warnings.warn(
            f"evaluate: Sinkhorn (epsilon=1) did not converge for groups {format_choices(unconverged, limit=10)}, so "
            "their sinkhorn_divergence is approximate. Energy distance and MMD need no iterations; for another "
            "regularisation call cellflow.metrics.sinkhorn_divergence(x, y, epsilon=..., scale_cost='mean') per group.",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )

    if fallback:
        warnings.warn(
            f"evaluate: no control cell matches control_match={match_cols!r} for groups "
            f"{format_choices(fallback, limit=10)}; all {c_all.shape[0]} control cells were used for them.",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    scores = []
    for name in names:
        scores += [name, f"{name}_floor"] if floors and name in FLOOR_METRICS else [name]
    columns = [*group_cols, "n_pred", "n_truth", *(["n_control"] if control is not None else []), *scores]
    return pd.DataFrame(rows, columns=columns)


def _warn_if_scales_differ(pred_values: np.ndarray, truth_values: np.ndarray, rep: str, truth: ad.AnnData) -> None:
    """Warn when the observed cells hold raw counts in ``rep`` but the predictions do not.

    The usual cause is a prediction decoded to log-normalised expression scored against the
    counts in ``truth.X``: every metric is then dominated by the change of scale.
    """
    truth_counts, truth_evidence = _counts_verdict(_sampled_values(truth_values))
    pred_counts, pred_evidence = _counts_verdict(_sampled_values(pred_values))
    if truth_counts and pred_counts is False:
        layers = [name for name in truth.layers.keys() if name != rep]
        hint = f"pass rep=<the layer of truth on the predictions' scale>, one of {format_choices(layers)}" if layers else (
            "normalise truth as the training data were (e.g. cellflow.pp.log_normalize) and pass rep=<that layer>"
        )
        warnings.warn(
            f"evaluate: rep={rep!r} holds raw counts in truth ({truth_evidence}) but not in pred ({pred_evidence}): "
            f"the metrics would mostly measure the change of scale; {hint}.",
            UserWarning,
            stacklevel=user_stacklevel(),
        )


_MetricFunc = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, "np.ndarray | None", Any], float]

#: name -> f(x, y, x_subsampled, y_subsampled, control, feature columns)
_METRIC_FUNCS: dict[str, _MetricFunc] = {
    "energy_distance": lambda x, y, xs, ys, c, f: energy_distance(xs, ys),
    "energy_distance_squared": lambda x, y, xs, ys, c, f: energy_distance(xs, ys, squared=True),
    "mmd": lambda x, y, xs, ys, c, f: mmd(xs, ys),
    "sinkhorn_divergence": lambda x, y, xs, ys, c, f: _sinkhorn_divergence_checked(xs, ys)[0],  # evaluate: see there
    "r2_mean": lambda x, y, xs, ys, c, f: r2_mean(x, y, features=f),
    "r2_delta": lambda x, y, xs, ys, c, f: r2_mean(x, y, c, features=f),
    "pearson_delta": lambda x, y, xs, ys, c, f: pearson_delta(x, y, c, features=f),
}
assert set(_METRIC_FUNCS) == set(METRICS)
