"""Conditional optimal-transport flow matching, array level: coupling, loss, scanned steps, sampling.

Training pairs come from minibatch optimal transport inside each condition (ott-jax Sinkhorn,
balanced or unbalanced), which is what makes flow matching generalise to unseen conditions: with
independent pairing the learned flow is not the response map. Along a straight path
``x_t = (1 - t) x0 + t x1`` (optionally with Brownian-bridge noise ``sigma sqrt(t (1 - t)) z``)
the velocity field regresses ``x1 - x0``; the ``"smoothed"`` path blurs the line by Gaussian noise
and regresses its exact velocity instead (see :func:`interpolate`). Sampling integrates the
learned ODE with diffrax.

Everything here is a pure function of PyTrees; ``make_train_chunk`` returns one jitted function
that runs ``chunk`` steps with ``lax.scan`` (sampling, coupling, gradient, optax update and EMA
included), so a training run is a handful of dispatches without host round trips.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh
from ott.geometry import pointcloud
from ott.problems.linear import linear_problem
from ott.solvers.linear import acceleration, sinkhorn

from cellflow._errors import CellflowValueError, format_choices
from cellflow.data import ConditionArrays, TrainingArrays, sample_batches
from cellflow.nn import ResponseField
from cellflow.solvers.baselines import AffineResponse, push_group
from cellflow.train import COUPLING_FALLBACK, TrainState, initial_state, scanned_training_chunk, shared_jit, training_step

__all__ = ["COMBINE_RULES", "COUPLINGS", "PATHS", "SOLVERS", "FlowMatchingConfig", "FlowMatchingScalars", "checked_plan", "couple", "sample_plan", "usable_plan", "energy_distance", "interpolate", "make_train_chunk", "make_step", "flow_matching_loss", "push", "init_state", "integrate"]


PATHS = ("straight", "brownian", "smoothed")
COUPLINGS = ("ot", "independent")


@dataclass(frozen=True)
class FlowMatchingConfig:
    """Hyper-parameters of the solver (hashable).

    The continuous ones (:class:`FlowMatchingScalars` and ``ema_decay``) reach the training
    program of :func:`make_train_chunk` as arguments; the others shape the program.

    Attributes
    ----------
    batch_size
        Cells per condition per step (source and target).
    conditions_per_step
        Conditions (treated groups) per step.
    coupling
        ``"ot"`` (minibatch Sinkhorn) or ``"independent"``.
    epsilon
        Entropic regularisation relative to the mean cost of the batch.
    tau_a, tau_b
        Unbalancedness of source and target (1.0 is balanced; < 1 tolerates outliers).
    sinkhorn_iterations
        Maximum Sinkhorn iterations.
    path
        ``"straight"``, ``"brownian"`` (Brownian bridge with noise ``sigma``) or ``"smoothed"``
        (noise ``sigma_min + 2 sigma t (1 - t)``, exact velocity); see :func:`interpolate`.
    sigma
        Path noise, in the units of the data (the method layer scales its ``sigma`` option by
        the control cells' spread).
    sigma_min
        Noise floor of the ``"smoothed"`` path (its standard deviation at ``t = 0`` and ``t = 1``),
        in the units of the data.
    ema_decay
        EMA decay of the weights.
    covariate_dropout
        Probability of hiding each covariate value during training (teaches the "unknown" slot
        used for unseen patients).
    interaction_penalty
        Weight of the mean squared velocity of the interaction field (combinations only) in the
        loss: an additivity prior, so that the member fields explain as much of each seen
        combination as they can and the interaction field only what they cannot.
    population_size
        Source cells summarised by the population encoder at prediction time.
    """

    batch_size: int = 256
    conditions_per_step: int = 4
    coupling: str = "ot"
    epsilon: float = 0.01
    tau_a: float = 1.0
    tau_b: float = 1.0
    sinkhorn_iterations: int = 500
    path: str = "straight"
    sigma: float = 0.0
    sigma_min: float = 0.0
    ema_decay: float = 0.999
    covariate_dropout: float = 0.1
    interaction_penalty: float = 0.0
    population_size: int = 256

    def __post_init__(self):
        for name, value, choices in (("path", self.path, PATHS), ("coupling", self.coupling, COUPLINGS)):
            if value not in choices:
                raise CellflowValueError(f"FlowMatchingConfig: {name}={value!r} is invalid; valid choices: {format_choices(choices)}.")
        checks = (
            ("batch_size", self.batch_size >= 2, "an integer >= 2"),
            ("conditions_per_step", self.conditions_per_step >= 1, "a positive integer"),
            ("epsilon", self.epsilon > 0, "> 0 (0 is unregularised OT, which Sinkhorn cannot solve)"),
            ("tau_a", 0 < self.tau_a <= 1, "in (0, 1]"),
            ("tau_b", 0 < self.tau_b <= 1, "in (0, 1]"),
            ("sinkhorn_iterations", self.sinkhorn_iterations >= 1, "a positive integer"),
            ("sigma", self.sigma >= 0, ">= 0"),
            ("sigma_min", self.sigma_min >= 0, ">= 0"),
            ("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1)"),
            ("covariate_dropout", 0 <= self.covariate_dropout <= 1, "in [0, 1]"),
            ("interaction_penalty", self.interaction_penalty >= 0, ">= 0"),
            ("population_size", self.population_size >= 1, "a positive integer"),
        )
        for name, valid, expected in checks:
            if not valid:
                raise CellflowValueError(f"FlowMatchingConfig: {name}={getattr(self, name)!r} must be {expected}.")


class FlowMatchingScalars(NamedTuple):
    """The continuous hyper-parameters of :class:`FlowMatchingConfig` as a PyTree.

    :func:`make_train_chunk` hands them to the loss as arguments of the compiled training
    program, so fits that differ only in these values (a sweep over ``sigma`` or ``epsilon``)
    share one compiled program. Fields as in :class:`FlowMatchingConfig`; floats or scalar arrays.
    """

    epsilon: float | jax.Array
    sigma: float | jax.Array
    sigma_min: float | jax.Array
    covariate_dropout: float | jax.Array
    interaction_penalty: float | jax.Array

    @classmethod
    def of(cls, config: FlowMatchingConfig) -> FlowMatchingScalars:
        """The config's values."""
        return cls(config.epsilon, config.sigma, config.sigma_min, config.covariate_dropout, config.interaction_penalty)


def couple(
    key: jax.Array,
    source: jax.Array,
    target: jax.Array,
    config: FlowMatchingConfig,
    *,
    with_status: bool = False,
    epsilon: float | jax.Array | None = None,
) -> tuple[jax.Array, ...]:
    """Resample ``(x0, x1)`` pairs ``(B, d)`` from the entropic OT plan between two batches.

    Each source cell keeps its place; its partner is drawn from its row of the plan (for
    unbalanced plans, source cells are also redrawn by their row mass). ``with_status`` also
    returns whether Sinkhorn failed and the batch was paired independently (see
    :func:`sample_plan`). ``epsilon`` (a number or a traced scalar) replaces ``config.epsilon``.
    """
    if config.coupling == "independent":
        return (source, target, jnp.asarray(False)) if with_status else (source, target)
    return sample_plan(
        key, source, target, epsilon=config.epsilon if epsilon is None else epsilon, scale_cost="mean", tau_a=config.tau_a, tau_b=config.tau_b,
        max_iterations=config.sinkhorn_iterations, with_status=with_status,
    )


#: Sinkhorn solves of a minibatch at most, each at :data:`RETRY_EPSILON_FACTOR` times the
#: previous epsilon, before its cells are paired at random (:func:`sample_plan`).
SINKHORN_ATTEMPTS = 3
RETRY_EPSILON_FACTOR = 4.0


def sample_plan(
    key: jax.Array,
    source: jax.Array,
    target: jax.Array,
    *,
    epsilon: float | jax.Array,
    scale_cost: str | float = "mean",
    tau_a: float = 1.0,
    tau_b: float = 1.0,
    max_iterations: int = 500,
    threshold: float = 1e-2,
    with_status: bool = False,
) -> tuple[jax.Array, ...]:
    """Draw ``(x0, x1)`` pairs ``(B, d)`` from the entropic OT plan of squared Euclidean cost.

    Parameters
    ----------
    key
        PRNG key.
    source, target
        ``(B, d)`` batches.
    epsilon
        Entropic regularisation; relative to the cost's ``scale_cost`` (``"mean"``), or absolute
        with ``scale_cost=1.0`` (the Schrödinger bridge's ``2 sigma^2``).
    tau_a, tau_b
        Unbalancedness (1.0 is balanced).
    max_iterations, threshold
        Sinkhorn's stopping rule.
    with_status
        Also return a boolean scalar: ``True`` when Sinkhorn gave no usable plan (see
        :func:`checked_plan`) and the pairs were drawn from the independent coupling. Training
        loops report it, since a run that falls back often (an ``epsilon`` too small for float32)
        silently trains on random pairs.

    A batch whose plan is unusable is solved again at :data:`RETRY_EPSILON_FACTOR` times the
    epsilon, up to :data:`SINKHORN_ATTEMPTS` solves, before it falls back.

    Returns
    -------
    ``(x0, x1)``, or ``(x0, x1, fell_back)`` with ``with_status``.
    """
    # Pairs are only sampled from the plan, so a 1 % marginal error is plenty; adaptive momentum
    # (Lehmann et al.) then cuts the iterations that dominate a CPU step.
    solver = sinkhorn.Sinkhorn(
        threshold=threshold,
        max_iterations=max_iterations,
        momentum=acceleration.Momentum(start=20, inner_iterations=10),
    )
    tolerance = None if tau_a < 1.0 or tau_b < 1.0 else 0.5

    def attempt(carry):
        tries, scale, _, _ = carry
        geometry = pointcloud.PointCloud(source, target, epsilon=epsilon * scale, scale_cost=scale_cost)
        raw = solver(linear_problem.LinearProblem(geometry, tau_a=tau_a, tau_b=tau_b)).matrix
        return tries + 1, scale * RETRY_EPSILON_FACTOR, raw, usable_plan(raw, tolerance)

    # The momentum diverges on a few batches (6-8 % of those of a small synthetic screen at
    # epsilon 0.01, none at 0.02): those are solved again at a larger epsilon, by the same solver
    # in a loop (one program, nothing more to compile), rather than paired at random.
    n, m = source.shape[0], target.shape[0]
    start = (jnp.zeros((), jnp.int32), jnp.ones((), source.dtype), jnp.zeros((n, m), source.dtype), jnp.zeros((), bool))
    _, _, raw, usable = jax.lax.while_loop(lambda c: (c[0] < SINKHORN_ATTEMPTS) & ~c[3], attempt, start)
    plan = jnp.where(usable, raw, jnp.full_like(raw, 1.0 / raw.size))
    key_rows, key_cols = jax.random.split(key)
    log_plan = jnp.log(jnp.maximum(plan, 1e-30))
    if tau_a < 1.0 or tau_b < 1.0:
        rows = jax.random.categorical(key_rows, jax.scipy.special.logsumexp(log_plan, axis=1), shape=(n,))
    else:
        rows = jnp.arange(n)
    cols = jax.random.categorical(key_cols, log_plan[rows], axis=-1)
    return (source[rows], target[cols], ~usable) if with_status else (source[rows], target[cols])


def usable_plan(plan: jax.Array, tolerance: float | None = 0.5) -> jax.Array:
    """Whether a Sinkhorn plan ``(n, m)`` of uniform marginals can be used (a boolean scalar).

    ``tolerance`` bounds the relative error of the uniform marginals; ``None`` (unbalanced
    problems) only asks for a finite, non-negative plan.
    """
    n, m = plan.shape
    usable = jnp.all(jnp.isfinite(plan)) & jnp.all(plan >= 0)
    if tolerance is not None:
        rows, cols = plan.sum(axis=1) * n, plan.sum(axis=0) * m
        usable = usable & (jnp.max(jnp.abs(rows - 1.0)) < tolerance) & (jnp.max(jnp.abs(cols - 1.0)) < tolerance)
    return usable


def checked_plan(plan: jax.Array, tolerance: float | None = 0.5) -> jax.Array:
    """The plan ``(n, m)``, or the independent coupling where Sinkhorn went astray.

    Accelerated Sinkhorn occasionally diverges on a minibatch (NaN, or a finite plan whose
    marginals are far off). Its plan would poison the weights; one step with the independent
    coupling of that batch does no harm. See :func:`usable_plan` for ``tolerance``.
    """
    n, m = plan.shape
    return jnp.where(usable_plan(plan, tolerance), plan, jnp.full_like(plan, 1.0 / (n * m)))


def interpolate(
    key: jax.Array,
    x0: jax.Array,
    x1: jax.Array,
    config: FlowMatchingConfig,
    sigma: float | jax.Array | None = None,
    sigma_min: float | jax.Array | None = None,
):
    """Times ``(B,)``, positions ``x_t`` ``(B, d)`` and target velocities ``(B, d)``.

    ``sigma`` and ``sigma_min`` (numbers or traced scalars) replace the config's values; the
    config decides which noise terms exist (none on a ``"straight"`` or ``"brownian"`` path whose
    ``config.sigma`` is 0).

    The target is ``x1 - x0`` on the ``"straight"`` and ``"brownian"`` paths.

    With ``path="brownian"`` the positions are points of a Brownian bridge between the pair,
    ``x_t = (1 - t) x0 + t x1 + sigma sqrt(t (1 - t)) z``, but the target stays the pair's
    displacement ``x1 - x0`` rather than the bridge's own velocity (which adds
    ``sigma (1 - 2t) / (2 sqrt(t (1 - t))) z``). The field so learns the displacement averaged
    over a Gaussian neighbourhood of width ``sigma sqrt(t (1 - t))``: exact at ``t = 0`` and
    ``t = 1``, smooth in between, which is what lets it carry cells that sit slightly off the
    training populations (a new patient, an unseen cell type). Measured on Kang 2018 (held-out
    patient, seed 0, sigma 1.3 control spreads) the exact bridge velocity gave an energy distance
    of 0.334 against 0.278 with the displacement target. The exact bridge, with its score, is
    ``method="schrodinger_bridge"``.

    With ``path="smoothed"`` the noise is ``(sigma_min + 2 sigma t (1 - t)) z`` (as wide mid-way
    as the Brownian bridge's plus the floor) and the target is the path's own velocity
    ``x1 - x0 + 2 sigma (1 - 2 t) z``, bounded at every ``t``. The flow then carries the control
    population blurred by ``sigma_min`` onto the treated population blurred alike, the treated
    spread included, rather than the averaged displacements; the floor keeps the field smooth
    at ``t = 1``, where without it a field fitted to a few hundred treated cells pulls onto them
    and over-disperses.
    """
    sigma = config.sigma if sigma is None else sigma
    sigma_min = config.sigma_min if sigma_min is None else sigma_min
    key_t, key_z = jax.random.split(key)
    t = jax.random.uniform(key_t, (x0.shape[0],))
    x_t = (1.0 - t[:, None]) * x0 + t[:, None] * x1
    u = x1 - x0
    if config.path == "smoothed":
        z = jax.random.normal(key_z, x0.shape)
        x_t = x_t + (sigma_min + sigma * 2.0 * t * (1.0 - t))[:, None] * z
        u = u + (sigma * 2.0 * (1.0 - 2.0 * t))[:, None] * z
    elif config.sigma > 0:
        scale = jnp.sqrt(t * (1.0 - t)) if config.path == "brownian" else jnp.ones_like(t)
        x_t = x_t + sigma * scale[:, None] * jax.random.normal(key_z, x0.shape)
    return t, x_t, u


def init_state(model: ResponseField, optimizer: optax.GradientTransformation, key: jax.Array) -> tuple[Any, TrainState]:
    """Split an initialised module into its graph definition and a fresh :class:`TrainState`."""
    graphdef, params = nnx.split(model)
    return graphdef, initial_state(params, optimizer.init, key)


def flow_matching_loss(graphdef: Any, config: FlowMatchingConfig, prior: AffineResponse | None = None):
    """``loss_fn(params, batch, key, scalars=None) -> (loss, terms)`` of flow matching on a batch
    of condition groups.

    ``batch`` is a :class:`cellflow.data.sample_batches` batch: ``source`` and ``target``
    ``(G, B, d)``, ``condition`` (:class:`ConditionArrays` with a leading group axis) and
    ``group`` ``(G,)``. Each group's cells are coupled (:func:`couple`), points and target
    velocities drawn on the path (:func:`interpolate`), and the loss is the mean squared error
    of the summed member and interaction fields plus ``interaction_penalty`` times the
    interaction field's mean square. ``terms`` holds ``flow``, ``interaction`` and
    ``coupling_fallback`` (the fraction of groups whose OT coupling failed).

    ``scalars`` (:class:`FlowMatchingScalars`, maybe traced) replaces the config's continuous
    values; the config still decides which terms exist (a zero ``sigma`` in it leaves the path
    noise out of the program).

    With a ``prior`` (per-group affine displacements of a baseline), the flow starts from the
    baseline's prediction ``prior_g(x0)`` instead of the control cells ``x0`` and learns only
    what the baseline misses; the population encoder still sees the control cells.
    """

    def loss_fn(params, batch, key, scalars: FlowMatchingScalars | None = None):
        scalars = FlowMatchingScalars.of(config) if scalars is None else scalars
        model = nnx.merge(graphdef, params)
        groups = batch.source.shape[0]
        key_couple, key_path, key_model = jax.random.split(key, 3)
        start = batch.source if prior is None else jax.vmap(partial(push_group, prior))(batch.source, batch.group)
        # lax.map, not vmap: Sinkhorn's while loop would run every group to the slowest one.
        x0, x1, fell_back = jax.lax.map(
            lambda args: couple(*args, config, with_status=True, epsilon=scalars.epsilon),
            (jax.random.split(key_couple, groups), start, batch.target),
        )
        t, x_t, u = jax.vmap(interpolate, in_axes=(0, 0, 0, None, None, None))(
            jax.random.split(key_path, groups), x0, x1, config, scalars.sigma, scalars.sigma_min
        )

        def group_velocity(condition, source, t, x_t, key):
            key_encode, key_field = jax.random.split(key)
            encoded = model.encode(condition, source, key_encode, scalars.covariate_dropout)
            return model.velocity_terms(t, x_t, encoded, key_field)

        members, interaction = jax.vmap(group_velocity)(batch.condition, batch.source, t, x_t, jax.random.split(key_model, groups))
        flow = jnp.mean(jnp.sum((members + interaction - u) ** 2, axis=-1))
        penalty = jnp.mean(jnp.sum(interaction**2, axis=-1))
        terms = {"flow": flow, "interaction": penalty, COUPLING_FALLBACK: jnp.mean(fell_back.astype(jnp.float32))}
        return flow + scalars.interaction_penalty * penalty, terms

    return loss_fn


def make_step(
    graphdef: Any, optimizer: optax.GradientTransformation, config: FlowMatchingConfig, prior: AffineResponse | None = None
):
    """A pure ``step(state, batch) -> (state, metrics)``: one flow-matching step on a batch you give.

    For training loops of your own (your sampler, your sharding, ``jax.jit`` or ``lax.scan``
    around it); :func:`make_train_chunk` is the same step scanned over batches it samples
    itself. ``batch`` as in :func:`flow_matching_loss`, e.g. from
    ``cellflow.data.sample_batches(arrays, key, config.batch_size, config.conditions_per_step)``.

    Examples
    --------
    >>> graphdef, state = init_state(model, optimizer, jax.random.key(0))  # doctest: +SKIP
    >>> step = jax.jit(make_step(graphdef, optimizer, config))  # doctest: +SKIP
    >>> state, metrics = step(state, sample_batches(arrays, key, 256, 4))  # doctest: +SKIP
    """
    return training_step(flow_matching_loss(graphdef, config, prior), optimizer, config.ema_decay)


def make_train_chunk(
    graphdef: Any,
    optimizer: optax.GradientTransformation,
    arrays: TrainingArrays,
    config: FlowMatchingConfig,
    chunk: int,
    prior: AffineResponse | None = None,
    mesh: Mesh | None = None,
):
    """A jitted ``state -> (state, {"loss": (chunk,), ...})`` running ``chunk`` flow-matching steps.

    Each step samples its batch from ``arrays`` and runs :func:`make_step`'s step; ``prior`` as
    in :func:`flow_matching_loss`. The config's continuous values (:class:`FlowMatchingScalars`)
    and ``ema_decay`` are arguments of the compiled program, so fits that differ only in them
    share it. With a ``mesh`` (:func:`cellflow.train.group_mesh`) each
    step's groups are split over its devices.
    """
    loss_fn = flow_matching_loss(graphdef, config, prior)

    def sample(arrays, key):
        return sample_batches(arrays, key, config.batch_size, config.conditions_per_step)

    return scanned_training_chunk(
        loss_fn, sample, optimizer, config.ema_decay, chunk, arrays, mesh, scalars=FlowMatchingScalars.of(config)
    )


#: diffrax solvers of :func:`push` and :func:`integrate` by name (``tsit5`` and ``dopri5`` adaptive).
SOLVERS = {"euler": diffrax.Euler, "heun": diffrax.Heun, "midpoint": diffrax.Midpoint, "tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5}


def _solver(name: str):
    if name not in SOLVERS:
        raise CellflowValueError(f"solver={name!r} is invalid; valid choices: {list(SOLVERS)}.")
    return SOLVERS[name]()


#: How the member fields of an additive field make a combination's prediction.
COMBINE_RULES = ("displacements", "members", "velocities")


def push(
    graphdef: Any,
    params: Any,
    x: jax.Array,
    condition: ConditionArrays,
    population: jax.Array,
    *,
    solver: str = "heun",
    n_steps: int = 16,
    rtol: float = 1e-3,
    atol: float = 1e-3,
    combine: str = "displacements",
) -> jax.Array:
    """Integrate the learned ODE from ``t = 0`` to ``1`` for source cells ``x`` ``(n, d)``.

    Parameters
    ----------
    graphdef, params
        The velocity field.
    x
        ``(n, d)`` source cells.
    condition
        The condition (unbatched :class:`ConditionArrays`).
    population
        ``(N, d)`` source cells summarised by the population encoder.
    solver
        ``"euler"``, ``"heun"``, ``"midpoint"`` (fixed ``n_steps``) or ``"tsit5"``/``"dopri5"``
        (adaptive, tolerances ``rtol``/``atol``).
    combine
        For a combination under an additive field: ``"displacements"`` moves each source cell
        by every member's field on its own (each field only sees positions along its own
        member's path, where it was trained) and adds the displacements, plus what the
        interaction field adds along the combined path; ``"members"`` does the same without the
        interaction field (the purely additive prediction from the members); ``"velocities"``
        integrates the sum of the fields along one path. Single perturbations and joint fields
        are unaffected.

    Returns
    -------
    ``(n, d)`` predicted cells.
    """
    if combine not in COMBINE_RULES:
        raise CellflowValueError(f"push: combine={combine!r} is invalid; valid choices: {format_choices(COMBINE_RULES)}.")
    return _push(graphdef, params, x, condition, population, solver, n_steps, rtol, atol, combine)


def integrate(graphdef, params, x, condition, population, solver="heun", n_steps=16, rtol=1e-3, atol=1e-3, combine="displacements"):
    """Unjitted body of :func:`push`, for use inside other jitted functions."""
    model = nnx.merge(graphdef, params)
    encoded = model.encode(condition, population)
    adaptive = solver in ("tsit5", "dopri5")

    def solve(velocity, y0):
        solution = diffrax.diffeqsolve(
            diffrax.ODETerm(velocity),
            _solver(solver),
            t0=0.0,
            t1=1.0,
            dt0=None if adaptive else 1.0 / n_steps,
            y0=y0,
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol) if adaptive else diffrax.ConstantStepSize(),
            max_steps=4096 if adaptive else n_steps,
            # a fixed-step solve cannot fail, and without diffrax's error check (a host callback)
            # the program can be kept in the on-disk compilation cache
            throw=adaptive,
        )
        return jax.tree.map(lambda y: y[-1], solution.ys)

    def one_path(x):
        return solve(lambda t, y, args: model(t, y, encoded), x)

    slots = encoded.tokens.shape[0]
    if not (combine in ("displacements", "members") and model.field == "additive" and slots > 1):
        return one_path(x)

    def combined(members, interaction):
        return x + jnp.sum(members - x, axis=0) + interaction

    def member_paths(x):
        starts = jnp.broadcast_to(x, (slots, *x.shape))
        if combine == "members":
            return combined(solve(lambda t, members, args: model.member_velocities(t, members, encoded), starts), 0.0)

        # state: each member's own path (K, n, d) and the interaction's displacement (n, d)
        def velocity(t, state, args):
            members, interaction = state
            return (
                model.member_velocities(t, members, encoded),
                model.interaction_velocity(t, combined(members, interaction), encoded),
            )

        return combined(*solve(velocity, (starts, jnp.zeros_like(x))))

    # a single member's own path is the one path: skip the empty slots' work
    return jax.lax.cond(encoded.mask.sum() > 1, member_paths, one_path, x)


# shared between models of one architecture and kept on disk across processes, like training
_push = shared_jit(integrate, static_argnums=(0, 5, 6, 9))


def energy_distance(x: jax.Array, y: jax.Array) -> jax.Array:
    """Biased Euclidean energy distance of two small batches ``(n, d)``, ``(m, d)`` (in-jit use).

    For evaluation at scale use :func:`cellflow.metrics.energy_distance`, which is chunked.
    """

    def mean_distance(a, b):
        squared = jnp.sum(a**2, 1)[:, None] + jnp.sum(b**2, 1)[None, :] - 2.0 * a @ b.T
        return jnp.mean(jnp.sqrt(jnp.maximum(squared, 1e-12)))

    centre = jnp.concatenate([x, y]).mean(axis=0)
    x, y = x - centre, y - centre
    return 2.0 * mean_distance(x, y) - mean_distance(x, x) - mean_distance(y, y)
