"""Neural optimal transport, array level: Monge maps from control to treated cells.

Two estimators of the map ``T`` that pushes a control population onto a treated one:

* **Per-condition ICNN duals (CellOT, Makkuva et al. 2020).** For each condition, a pair of
  input-convex potentials from ott-jax (:class:`ott.neural.networks.icnn.ICNN`): ``f`` with
  ``T = grad f`` and ``g`` with ``grad g`` its inverse, trained on the W2 Kantorovich dual by
  the min-max of :class:`ott.neural.methods.neuraldual.W2NeuralDual` (``inner_steps`` updates of
  ``g`` per update of ``f``, the conjugate amortised by ``g``). Both start from the Gaussian
  (Bures) map between the two populations (their covariances shrunk, Ledoit-Wolf, so that a
  condition with fewer cells than features has one) or from the identity. The ICNN's quadratic
  layers compute ott's function with its diagonal term as a matrix product (see
  :class:`_PosDefPotentials`). Every condition trains at
  once: parameters are stacked on a leading axis and the ott step functions are ``vmap``-ped.
  Cells are expressed relative to the condition's source mean and divided by one scalar scale,
  which leaves the OT map unchanged (translation and isotropic scaling commute with it).
* **A conditional Monge map (CondOT-style, Uscidda & Cuturi 2023).** One network for all
  conditions, ``T(x | c) = x + D(x | c)``, where ``D`` is the additive-by-member field of
  :class:`cellflow.nn.ResponseField` evaluated at ``t = 0`` (the condition and population
  encoders shared with flow matching). It is trained to push each source batch onto its target
  batch (Sinkhorn divergence, or regression onto the barycentric projection of the entropic OT
  plan) while staying a Monge map (the entropic Monge gap ``E|x - T x|^2 - OT_eps(x, T x)``, as
  in :func:`ott.neural.methods.monge_gap.monge_gap_from_samples`, as regulariser), so held-out
  doses, combinations, cell types and patients are predicted by the same network. Each entropic
  OT term is solved by ott-jax Sinkhorn on frozen points and enters the loss as ``<P, C>``
  (envelope theorem), so no gradient flows through the Sinkhorn iterations.

Everything here is a pure function of PyTrees; both ``make_*_train_chunk`` return one jitted
function running ``chunk`` steps with ``lax.scan`` (sampling included).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen, nnx
from jax.sharding import Mesh
from ott.geometry import pointcloud
from ott.neural.methods import neuraldual
from ott.neural.networks import icnn, potentials
from ott.neural.networks.layers import posdef
from ott.problems.linear import linear_problem
from ott.solvers.linear import acceleration, sinkhorn

from cellflow._errors import CellflowValueError
from cellflow.data import ConditionArrays, TrainingArrays, sample_batches
from cellflow.nn import ResponseField
from cellflow.solvers.flow_matching import checked_plan
from cellflow.solvers.gaussian import monge_map_matrix, shrunk_covariance, sqrtm_psd
from cellflow.train import TrainState, ema_update, initial_state, scanned_training_chunk, shared_jit

__all__ = [
    "MAP_FITS",
    "DualConfig",
    "DualData",
    "MapScalars",
    "MongeMapConfig",
    "dual_potentials",
    "init_dual_state",
    "init_duals",
    "make_dual_train_chunk",
    "make_map_train_chunk",
    "map_cells",
    "map_losses",
    "push_map",
    "transport",
]


# ---------------------------------------------------------------------------------------------
# Conditional Monge map
# ---------------------------------------------------------------------------------------------
#: How the conditional map is fitted (:class:`MongeMapConfig`'s ``fit``).
MAP_FITS = ("sinkhorn_divergence", "barycentric")


@dataclass(frozen=True)
class MongeMapConfig:
    """Hyper-parameters of the conditional map (hashable; :class:`MapScalars` and ``ema_decay``
    reach the training program as arguments, the others shape it).

    Attributes
    ----------
    batch_size
        Source and target cells per condition per step.
    conditions_per_step
        Treated groups per step.
    epsilon
        Entropic regularisation of the Sinkhorn divergence and of the Monge gap, relative to the
        source batch's mean squared pairwise distance.
    monge_gap
        Weight of the Monge-gap regulariser (0 gives a plain distribution-matching map).
    fit
        ``"sinkhorn_divergence"``: push each source batch onto its target batch (Sinkhorn
        divergence of the mapped cells to the target). ``"barycentric"``: regress the
        barycentric projection of the entropic OT plan between the source and target batches
        (Seguy et al. 2018), a per-cell target like flow matching's.
    ema_decay
        EMA decay of the weights used to predict.
    covariate_dropout
        Probability of hiding a covariate value in training (teaches the "unknown" slot).
    """

    batch_size: int = 128
    conditions_per_step: int = 8
    epsilon: float = 0.05
    monge_gap: float = 1.0
    fit: str = "sinkhorn_divergence"
    ema_decay: float = 0.999
    covariate_dropout: float = 0.1

    def __post_init__(self):
        if self.fit not in MAP_FITS:
            raise CellflowValueError(f"MongeMapConfig: fit={self.fit!r} is invalid; valid choices: {list(MAP_FITS)}.")
        if not self.epsilon > 0:
            raise CellflowValueError(f"MongeMapConfig: epsilon={self.epsilon!r} must be > 0.")
        if self.batch_size < 2 or self.conditions_per_step < 1:
            raise CellflowValueError(
                f"MongeMapConfig: batch_size={self.batch_size!r} must be >= 2 and conditions_per_step="
                f"{self.conditions_per_step!r} >= 1."
            )


class MapScalars(NamedTuple):
    """The continuous numbers of :class:`MongeMapConfig` that :func:`make_map_train_chunk` passes to
    its compiled program as arguments (fits that differ only in them share the program)."""

    epsilon: float | jax.Array
    monge_gap: float | jax.Array
    covariate_dropout: float | jax.Array

    @classmethod
    def of(cls, config: MongeMapConfig) -> MapScalars:
        """The config's values."""
        return cls(config.epsilon, config.monge_gap, config.covariate_dropout)


def map_cells(model: ResponseField, x: jax.Array, encoded, key: jax.Array | None = None) -> jax.Array:
    """``T(x | c) = x + D(x | c)`` for cells ``x`` ``(B, d)`` and an encoded condition."""
    return x + model(jnp.zeros(()), x, encoded, key)


def map_losses(
    model: ResponseField,
    source: jax.Array,
    target: jax.Array,
    condition: ConditionArrays,
    key: jax.Array,
    config: MongeMapConfig,
    scalars: MapScalars | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Per-condition fitting loss and Monge gap of the map on a stack of batches.

    Parameters
    ----------
    model
        The map network.
    source, target
        ``(G, B, d)`` control and treated cells of ``G`` conditions.
    condition
        The conditions (leading axis ``G``).
    key
        Training randomness (covariate dropout, dropout).
    config
        Hyper-parameters.
    scalars
        Replace the config's continuous values (maybe traced); the config still decides which
        terms exist (no Monge gap when ``config.monge_gap`` is 0).

    Returns
    -------
    ``(fit, gap)``, each ``(G,)`` in units of squared distance: the Sinkhorn divergence of the
    mapped batch to the target, estimated on disjoint halves of the batch (without its
    ``-OT(y, y) / 2`` term, which does not depend on the map; see :func:`_frozen_plans`), and
    the Monge gap ``E|x - T(x)|^2 - <P, C>`` with ``P`` the entropic plan between ``x`` and
    ``T(x)``. Both are transport costs of plans held fixed: by the envelope theorem their
    gradients in the cells are those of the entropic OT costs, and their values, unlike ott's
    ``reg_ot_cost``, carry no entropy offset (so an exact map has a gap near 0).
    """

    scalars = MapScalars.of(config) if scalars is None else scalars

    def map_one(condition, source, key):
        key_encode, key_field = jax.random.split(key)
        encoded = model.encode(condition, source, key_encode, scalars.covariate_dropout)
        return map_cells(model, source, encoded, key_field)

    mapped = jax.vmap(map_one)(condition, source, jax.random.split(key, source.shape[0]))
    # Every entropic OT term is solved on frozen points and enters the loss as <P, C>, so no
    # gradient flows through Sinkhorn. lax.map, not vmap: each solve stops at its own
    # convergence, and the network above stays batched over conditions.
    plans = jax.lax.map(lambda args: _frozen_plans(*args, config, scalars.epsilon), (source, mapped, target))
    fit = jax.vmap(partial(_fit_cost, config.fit))(plans, mapped, target)
    if config.monge_gap == 0:
        return fit, jnp.zeros_like(fit)
    displacement = jnp.mean(jnp.sum((mapped - source) ** 2, axis=-1), axis=-1)
    return fit, displacement - jax.vmap(_plan_cost)(plans["gap"], source, mapped)


def _halves(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Two disjoint halves of a batch ``(B, d)`` (a last odd cell is left out)."""
    half = x.shape[0] // 2
    return x[:half], x[half : 2 * half]


def _frozen_plans(
    source: jax.Array, mapped: jax.Array, target: jax.Array, config: MongeMapConfig, epsilon: float | jax.Array | None = None
) -> dict[str, jax.Array]:
    """Entropic plans of the fitting loss's OT problems and (for the Monge gap) of OT(x, T x).

    ``fit="sinkhorn_divergence"``: each half of the mapped batch against its half of the target
    batch, and the two mapped halves against each other,
    ``S = (OT(Tx_a, y_a) + OT(Tx_b, y_b)) / 2 - OT(Tx_a, Tx_b) / 2`` (up to the map-free
    ``-OT(y_a, y_b) / 2``). Solving the self term on the same points as the cross term
    (``OT(Tx, Tx)``) would match every mapped cell with itself at a small blur, and the
    remaining minibatch bias of ``OT(Tx, y)`` -- each cell drawn towards a few random targets --
    would shrink and distort the map; with disjoint halves the cross and self terms carry the
    same bias, so the expected gradient vanishes exactly when ``T`` pushes the source onto the
    target. ``fit="barycentric"``: the plan of OT(x, y) between the source and target batches,
    whose barycentric projection the map regresses (Seguy et al. 2018).
    """
    # epsilon is relative to the spread of the source batch (its mean squared pairwise distance),
    # not to the mean cost of each pair of clouds: that cost grows with the displacement, and a
    # blur that grows with it biases the Monge gap towards maps that move less.
    epsilon = (config.epsilon if epsilon is None else epsilon) * 2.0 * jnp.sum(jnp.var(jax.lax.stop_gradient(source), axis=0))
    if config.fit == "barycentric":
        plans = {"xy": _solve(source, target, epsilon)}
    else:
        (mapped_a, mapped_b), (target_a, target_b) = _halves(mapped), _halves(target)
        plans = {"a": _solve(mapped_a, target_a, epsilon), "b": _solve(mapped_b, target_b, epsilon), "self": _solve(mapped_a, mapped_b, epsilon)}
    if config.monge_gap > 0:
        plans["gap"] = _solve(source, mapped, epsilon)
    return plans


def _fit_cost(fit: str, plans: dict[str, jax.Array], mapped: jax.Array, target: jax.Array) -> jax.Array:
    """The fitting loss as ``<P, C>`` terms of the frozen plans (differentiable in the mapped cells)."""
    if fit == "barycentric":
        return _plan_cost(plans["xy"], mapped, target)
    (mapped_a, mapped_b), (target_a, target_b) = _halves(mapped), _halves(target)
    return 0.5 * (_plan_cost(plans["a"], mapped_a, target_a) + _plan_cost(plans["b"], mapped_b, target_b) - _plan_cost(plans["self"], mapped_a, mapped_b))


def _solve(x: jax.Array, y: jax.Array, epsilon: jax.Array) -> jax.Array:
    """Entropic OT plan between frozen copies of two point clouds (squared Euclidean cost, absolute epsilon)."""
    geometry = pointcloud.PointCloud(jax.lax.stop_gradient(x), jax.lax.stop_gradient(y), epsilon=epsilon)
    # Only plans' gradients are used, so a 1 % marginal error is plenty; adaptive momentum
    # (Lehmann et al.) halves the iterations that dominate a CPU step.
    solver = sinkhorn.Sinkhorn(threshold=1e-2, max_iterations=1000, momentum=acceleration.Momentum(start=20, inner_iterations=10))
    return checked_plan(solver(linear_problem.LinearProblem(geometry)).matrix)


def _plan_cost(plan: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    """``<P, C(x, y)>`` with the plan ``P`` held fixed (differentiable in ``x``, ``y``)."""
    plan = jax.lax.stop_gradient(plan)
    cost = jnp.sum(x**2, 1)[:, None] + jnp.sum(y**2, 1)[None, :] - 2.0 * x @ y.T
    return jnp.sum(plan * cost)


def make_map_train_chunk(
    graphdef: Any,
    optimizer: optax.GradientTransformation,
    arrays: TrainingArrays,
    config: MongeMapConfig,
    chunk: int,
    mesh: Mesh | None = None,
):
    """A jitted ``state -> (state, {"loss", "fit", "monge_gap": (chunk,)})`` of ``chunk`` steps.

    With a ``mesh`` (:func:`cellflow.train.group_mesh`) each step's groups are split over its devices.
    """

    def loss_fn(params, batch, key, scalars: MapScalars):
        model = nnx.merge(graphdef, params)
        fit, gap = map_losses(model, batch.source, batch.target, batch.condition, key, config, scalars)
        fit, gap = fit.mean(), gap.mean()
        return fit + scalars.monge_gap * gap, {"fit": fit, "monge_gap": gap}

    def sample(arrays, key):
        return sample_batches(arrays, key, config.batch_size, config.conditions_per_step)

    return scanned_training_chunk(loss_fn, sample, optimizer, config.ema_decay, chunk, arrays, mesh, MapScalars.of(config))


@jax.jit
def _push_map(graphdef, params, x, condition, population):
    model = nnx.merge(graphdef, params)
    return map_cells(model, x, model.encode(condition, population))


def push_map(graphdef: Any, params: Any, x: jax.Array, condition: ConditionArrays, population: jax.Array) -> jax.Array:
    """Map source cells ``x`` ``(n, d)`` under ``condition``; ``population`` ``(N, d)`` feeds the encoder."""
    return _push_map(graphdef, params, x, condition, population)


# ---------------------------------------------------------------------------------------------
# Per-condition ICNN duals
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DualConfig:
    """Static hyper-parameters of the per-condition ICNN duals.

    Attributes
    ----------
    hidden
        Hidden widths of both ICNNs.
    batch_size
        Source and target cells per condition per step.
    inner_steps
        Updates of the conjugate potential ``g`` per update of ``f``.
    init
        ``"gaussian"`` (start at the Bures map between the Gaussian fits of the two populations,
        with Ledoit-Wolf shrunk covariances) or ``"identity"``.
    init_scale
        Standard deviation of the ICNN hidden weights at initialisation; small, so the network
        starts close to its quadratic (Gaussian or identity) part.
    ema_decay
        EMA decay of the weights used to predict.
    """

    hidden: tuple[int, ...] = (64, 64, 64, 64)
    batch_size: int = 256
    inner_steps: int = 5
    init: str = "gaussian"
    init_scale: float = 0.01
    ema_decay: float = 0.99


class DualData(NamedTuple):
    """Normalised cells of every condition, for in-jit sampling.

    Attributes
    ----------
    cells
        ``(n, d)`` all cells, each expressed in its own condition's coordinates.
    source_start, source_size, target_start, target_size
        ``(C,)`` slices of ``cells`` holding each condition's control and treated cells.
    shift
        ``(C, d)`` origin of each condition's coordinates (its source mean).
    scale
        ``(C,)`` each condition's length unit (root of the source's mean total variance).
    """

    cells: jax.Array
    source_start: jax.Array
    source_size: jax.Array
    target_start: jax.Array
    target_size: jax.Array
    shift: jax.Array
    scale: jax.Array


class _PosDefPotentials(posdef.PosDefPotentials):
    """ott-jax's positive-definite quadratic potentials (same parameters, same function), with
    the diagonal term as a matrix product: ott forms a ``(cells, features, potentials)`` array
    for it, which made a dual step 17x slower at 20 features and over 100x at 150."""

    @linen.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        x = x.reshape((-1, dim))
        diagonal = self.rectifier_fn(self.param("diag_kernel", self.kernel_diag_init, (dim, self.num_potentials)))
        y = 0.5 * jnp.dot(x**2, diagonal, precision=self.precision)
        if self.rank > 0:
            factors = self.param("quad_kernel", self.kernel_lr_init, (self.num_potentials, dim, self.rank))
            y = y + 0.5 * jnp.sum(jnp.tensordot(x, factors, axes=(-1, 1), precision=self.precision) ** 2, axis=-1)
        if self.use_linear:
            y = y + jnp.dot(x, self.param("lin_kernel", self.kernel_linear_init, (dim, self.num_potentials)), precision=self.precision)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.num_potentials,))
        return y


def _faster(layer: posdef.PosDefPotentials) -> _PosDefPotentials:
    """The same layer, configured as ott configured it, computed by :class:`_PosDefPotentials`."""
    fields = {f.name: getattr(layer, f.name) for f in dataclasses.fields(layer) if f.init and f.name not in ("parent", "name")}
    return _PosDefPotentials(**fields)


class _ICNN(icnn.ICNN):
    """ott-jax's ICNN whose quadratic layers are :class:`_PosDefPotentials`; its final quadratic
    potential has full rank and starts at zero, :func:`init_duals` writing the starting map in."""

    def _get_wx(self, dim: int, rank: int) -> linen.Module:
        return _faster(super()._get_wx(dim, rank))

    def _get_pos_def_potentials(self, rank: int) -> posdef.PosDefPotentials:
        return _faster(super()._get_pos_def_potentials(rank))


def _potential(dim: int, config: DualConfig) -> icnn.ICNN:
    return _ICNN(
        dim_data=dim,
        dim_hidden=list(config.hidden),
        # the rank of each hidden layer's quadratic term as in ott's default; the final quadratic
        # potential has full rank, to hold a Gaussian (Bures) map
        ranks=(1,) * (len(config.hidden) + 1) + (dim,),
        pos_weights=True,
        init_fn=linen.initializers.normal(config.init_scale),
    )


def _quadratic_start(
    source: np.ndarray, target: np.ndarray, init: str, max_cells: int = 10_000
) -> tuple[np.ndarray, np.ndarray]:
    """``(F, b)`` with ``F F^T = M`` of the potential ``x^T M x / 2 + b^T x`` whose gradient is the
    starting map: the W2 map between Gaussian fits of ``source`` and ``target`` (``"gaussian"``),
    or the identity. The covariances are shrunk (Ledoit-Wolf) so that the map exists when a
    condition has fewer cells than features (its sample covariance is singular). At most
    ``max_cells`` of each side are used (the first ones, so the start is deterministic)."""
    dim = source.shape[1]
    if init != "gaussian":
        return np.eye(dim, dtype=np.float32), np.zeros(dim, np.float32)
    source, target = source[:max_cells], target[:max_cells]
    matrix = monge_map_matrix(shrunk_covariance(source), shrunk_covariance(target))
    offset = target.mean(axis=0) - matrix @ source.mean(axis=0)
    return sqrtm_psd(matrix).astype(np.float32), offset.astype(np.float32)


def _started(params: Any, source: np.ndarray, target: np.ndarray, init: str) -> Any:
    """``params`` of one potential with its final quadratic term set to the starting map."""
    factor, offset = _quadratic_start(source, target, init)
    final = dict(params["pos_def_potentials"])
    final["quad_kernel"] = jnp.asarray(factor)[None]
    final["lin_kernel"] = jnp.asarray(offset)[:, None]
    final["diag_kernel"] = jnp.zeros_like(final["diag_kernel"])
    return {**params, "pos_def_potentials": final}


def init_duals(
    key: jax.Array, sources: Sequence[np.ndarray], targets: Sequence[np.ndarray], config: DualConfig
) -> tuple[DualData, dict[str, Any]]:
    """Normalise each condition's cells and initialise its pair of potentials.

    Parameters
    ----------
    key
        Initialisation key.
    sources, targets
        Per condition, ``(n_c, d)`` control cells and ``(m_c, d)`` treated cells.
    config
        Hyper-parameters.

    Returns
    -------
    ``(data, params)``: the :class:`DualData` and ``{"f": ..., "g": ...}`` ICNN parameters
    stacked over conditions (leading axis ``C``).
    """
    shifts, scales, blocks, f_params, g_params = [], [], [], [], []
    for index, (source, target) in enumerate(zip(sources, targets)):
        source, target = np.asarray(source, np.float32), np.asarray(target, np.float32)
        shift = source.mean(axis=0)
        scale = float(np.sqrt(max(np.mean((source - shift) ** 2), 1e-12)))
        x, y = (source - shift) / scale, (target - shift) / scale
        shifts.append(shift)
        scales.append(scale)
        blocks += [x, y]
        key_f, key_g = jax.random.split(jax.random.fold_in(key, index))
        potential = _potential(x.shape[1], config)
        blank = jnp.zeros((1, x.shape[1]))
        f_params.append(_started(potential.init(key_f, blank)["params"], x, y, config.init))
        g_params.append(_started(potential.init(key_g, blank)["params"], y, x, config.init))
    sizes = np.array([len(block) for block in blocks])
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    data = DualData(
        cells=jnp.asarray(np.concatenate(blocks)),
        source_start=jnp.asarray(starts[0::2], jnp.int32),
        source_size=jnp.asarray(sizes[0::2], jnp.int32),
        target_start=jnp.asarray(starts[1::2], jnp.int32),
        target_size=jnp.asarray(sizes[1::2], jnp.int32),
        shift=jnp.asarray(np.stack(shifts)),
        scale=jnp.asarray(np.array(scales, np.float32)),
    )
    stack = lambda trees: jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)
    return data, {"f": stack(f_params), "g": stack(g_params)}


def _template(dim: int, config: DualConfig) -> icnn.ICNN:
    """The ICNN module of the initialised parameters."""
    return _potential(dim, config)


def make_dual_train_chunk(data: DualData, optimizer: optax.GradientTransformation, config: DualConfig, chunk: int):
    """A jitted ``state -> (state, {"loss", "w2": (chunk,)})`` running ``chunk`` steps of every dual.

    ``state.params`` is ``{"f": ..., "g": ...}`` stacked over conditions. The losses are
    ott-jax's (:meth:`W2NeuralDual.get_step_fn`): ``g`` minimises ``f(grad g(y)) - <grad g(y), y>``
    and ``f`` the dual ``E f(x) + E[<grad g(y), y> - f(grad g(y))]``. ``loss`` is the dual
    objective and ``w2`` ott's estimate of the squared W2 distance (normalised units), both
    averaged over conditions.
    """
    dim = data.cells.shape[1]
    template = _template(dim, config)
    dual = neuraldual.W2NeuralDual(
        dim,
        neural_f=template,
        neural_g=template,
        optimizer_f=optimizer,
        optimizer_g=optimizer,
        num_inner_iters=config.inner_steps,
        conjugate_solver=None,
        amortization_loss="objective",
        parallel_updates=False,
        pos_weights=True,
        rng=jax.random.key(0),
    )
    step_f = dual.get_step_fn(train=True, to_optimize="f")
    step_g = dual.get_step_fn(train=True, to_optimize="g")

    def train_state(params, opt_state, step):
        return potentials.PotentialTrainState(
            step=step,
            apply_fn=template.apply,
            params=params,
            tx=optimizer,
            opt_state=opt_state,
            potential_value_fn=template.potential_value_fn,
            potential_gradient_fn=template.potential_gradient_fn,
        )

    def draw(cells, key, start, size):
        return cells[start + jax.random.randint(key, (config.batch_size,), 0, size)]

    def condition_step(cells, params, opt_state, step, key, source_start, source_size, target_start, target_size):
        def batch(k):
            k_source, k_target = jax.random.split(k)
            return {"source": draw(cells, k_source, source_start, source_size), "target": draw(cells, k_target, target_start, target_size)}

        state_f = train_state(params["f"], opt_state["f"], step)
        state_g = train_state(params["g"], opt_state["g"], step)
        keys = jax.random.split(key, config.inner_steps + 1)

        def inner(state_g, k):
            state_g, _, _ = step_g(state_f, state_g, batch(k))
            return state_g, None

        state_g, _ = jax.lax.scan(inner, state_g, keys[:-1])
        state_f, loss, w2 = step_f(state_f, state_g, batch(keys[-1]))
        return (
            {"f": state_f.params, "g": state_g.params},
            {"f": state_f.opt_state, "g": state_g.opt_state},
            loss,
            w2,
        )

    def step(data: DualData, state: TrainState):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        n_conditions = data.source_start.shape[0]
        params, opt_state, loss, w2 = jax.vmap(condition_step, in_axes=(None, 0, 0, None, 0, 0, 0, 0, 0))(
            data.cells,
            state.params,
            state.opt_state,
            state.step,
            jax.random.split(key, n_conditions),
            data.source_start,
            data.source_size,
            data.target_start,
            data.target_size,
        )
        ema = ema_update(state.ema, params, config.ema_decay, state.step)
        return TrainState(params, ema, opt_state, state.step + 1, state.key), (loss.mean(), w2.mean())

    def scan_steps(state: TrainState, data: DualData):
        state, (loss, w2) = jax.lax.scan(lambda state, _: step(data, state), state, None, length=chunk)
        return state, {"loss": loss, "w2": w2}

    # the cells are an argument, not constants folded into the program
    run = shared_jit(scan_steps)

    def train_chunk(state: TrainState):
        return run(state, data)

    return train_chunk


def init_dual_state(params: dict[str, Any], optimizer: optax.GradientTransformation, key: jax.Array) -> TrainState:
    """A fresh :class:`TrainState` for stacked dual parameters (one optimiser state per condition)."""
    return initial_state(params, lambda stacked: {name: jax.vmap(optimizer.init)(p) for name, p in stacked.items()}, key)


def dual_potentials(dim: int, config: DualConfig) -> icnn.ICNN:
    """The ICNN module whose parameters :func:`init_duals` stacks (to evaluate a potential)."""
    return _template(dim, config)


def transport(params_f: Any, data_shift: jax.Array, data_scale: jax.Array, x: jax.Array, config: DualConfig) -> jax.Array:
    """``T(x) = grad f(x)`` of one condition's potential, in the original coordinates.

    Parameters
    ----------
    params_f
        The condition's ``f`` parameters (unstacked).
    data_shift, data_scale
        The condition's ``(d,)`` origin and scalar unit (:class:`DualData`).
    x
        ``(n, d)`` source cells.
    config
        Hyper-parameters (the ICNN's structure).

    Returns
    -------
    ``(n, d)`` transported cells.
    """
    return _transport(params_f, data_shift, data_scale, x, config)


@partial(jax.jit, static_argnums=(4,))
def _transport(params_f, shift, scale, x, config):
    potential = _template(x.shape[1], config)
    gradient = jax.vmap(jax.grad(lambda z: potential.apply({"params": params_f}, z)))
    return shift + scale * gradient((x - shift) / scale)
