"""Schrödinger bridges by score and flow matching ([SF]2M), array level.

The Schrödinger bridge with reference ``dX = sigma dW`` between a control population mu and a
treated population nu is the stochastic process closest (in KL) to Brownian motion that starts
in mu and ends in nu. Its end-point coupling is the entropic OT plan with ``epsilon = 2 sigma^2``
(on the squared Euclidean cost, unscaled), and given its end points it is a Brownian bridge.
Following Tong et al. (AISTATS 2024), pairs ``(x0, x1)`` are drawn from minibatch Sinkhorn
plans (ott-jax), ``x_t = (1 - t) x0 + t x1 + sigma sqrt(t (1 - t)) z``, and two fields regress

* the probability-flow velocity ``u_t = (1 - 2t) / (2 t (1 - t)) (x_t - mu_t) + x1 - x0``, and
* the scaled score ``(sigma^2 / 2) grad log p_t`` through ``|lambda_t s + z|^2``,
  ``lambda_t = 2 sigma sqrt(t (1 - t)) / sigma^2``.

Cells are then moved by the SDE ``dX = (v + s) dt + sigma dW`` (Euler–Maruyama through diffrax)
or by the probability-flow ODE ``dX = v dt``. The regression targets are valid for any coupling,
so ``coupling="aligned"`` (pairs known, SBAlign's setting) and ``"independent"`` reuse the same
loss.

Time-resolved data: each training group carries an interval ``[start, end]`` of the process's
clock (``(0, 1)`` for a single treated snapshot). A group's source cells are then the previous
snapshot, its reference noise over the interval is ``sigma^2 (end - start)``, and one pair of
fields serves every interval, so the fitted process passes through all snapshots.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import lineax
import optax
from flax import nnx
from jax.sharding import Mesh

from cellflow.data import ConditionArrays, TrainingArrays, sample_batches
from cellflow.solvers.flow_matching import sample_plan
from cellflow.train import COUPLING_FALLBACK, scanned_training_chunk

__all__ = ["BridgeConfig", "BridgeScalars", "bridge_sample", "couple", "make_train_chunk", "push", "simulate"]

_COUPLINGS = ("entropic", "independent", "aligned")


@dataclass(frozen=True)
class BridgeConfig:
    """Hyper-parameters of the solver (hashable; :class:`BridgeScalars` and ``ema_decay`` reach
    the training program as arguments, the others shape it).

    Attributes
    ----------
    batch_size
        Cells per condition per step.
    conditions_per_step
        Conditions (training groups) per step.
    sigma
        Reference Brownian noise per unit of the process's clock; the coupling's entropic
        regularisation over an interval of length ``L`` is ``2 sigma^2 L`` (ott-jax ``epsilon``).
    coupling
        ``"entropic"`` (minibatch Sinkhorn), ``"independent"``, or ``"aligned"`` (the batch's
        source and target rows are known pairs).
    tau_a, tau_b
        Unbalancedness of the entropic coupling (1.0 is balanced).
    sinkhorn_iterations, sinkhorn_threshold
        Sinkhorn's stopping rule.
    t_margin
        Training times are drawn from ``[t_margin, 1 - t_margin]`` of each interval: the flow
        target's noise term grows like ``1 / sqrt(t (1 - t))`` at the ends.
    score_weight
        Weight of the score-matching term.
    ema_decay
        EMA decay of the weights.
    covariate_dropout
        Probability of hiding each covariate value during training.
    population_size
        Source cells summarised by the population encoder.
    """

    batch_size: int = 256
    conditions_per_step: int = 4
    sigma: float = 1.0
    coupling: str = "entropic"
    tau_a: float = 1.0
    tau_b: float = 1.0
    sinkhorn_iterations: int = 1000
    sinkhorn_threshold: float = 1e-2
    t_margin: float = 1e-3
    score_weight: float = 1.0
    ema_decay: float = 0.999
    covariate_dropout: float = 0.1
    population_size: int = 256

    def __post_init__(self):
        if self.coupling not in _COUPLINGS:
            raise ValueError(f"coupling={self.coupling!r} is invalid; valid choices: {list(_COUPLINGS)}.")
        if not self.sigma > 0:
            raise ValueError(f"sigma={self.sigma!r} must be > 0 for a Schrödinger bridge.")


class BridgeScalars(NamedTuple):
    """The continuous numbers of :class:`BridgeConfig` that :func:`make_train_chunk` passes to its
    compiled program as arguments (fits that differ only in them share the program)."""

    sigma: float | jax.Array
    score_weight: float | jax.Array
    covariate_dropout: float | jax.Array

    @classmethod
    def of(cls, config: BridgeConfig) -> BridgeScalars:
        """The config's values."""
        return cls(config.sigma, config.score_weight, config.covariate_dropout)


def couple(
    key: jax.Array, source: jax.Array, target: jax.Array, config: BridgeConfig, length: jax.Array | float = 1.0,
    *, with_status: bool = False, sigma: float | jax.Array | None = None,
):
    """``(x0, x1)`` pairs ``(B, d)`` from the static bridge's coupling over an interval of ``length``
    (with ``with_status``, also whether Sinkhorn failed: see :func:`~cellflow.solvers.flow_matching.sample_plan`).
    ``sigma`` (a number or a traced scalar) replaces ``config.sigma``."""
    if config.coupling in ("independent", "aligned"):
        return (source, target, jnp.asarray(False)) if with_status else (source, target)
    sigma = config.sigma if sigma is None else sigma
    return sample_plan(
        key, source, target, epsilon=2.0 * sigma**2 * length, scale_cost=1.0, tau_a=config.tau_a,
        tau_b=config.tau_b, max_iterations=config.sinkhorn_iterations, threshold=config.sinkhorn_threshold,
        with_status=with_status,
    )


def bridge_sample(key: jax.Array, x0: jax.Array, x1: jax.Array, sigma: float | jax.Array, margin: float = 1e-3):
    """A point on the Brownian bridge of each pair and the regression targets there.

    Parameters
    ----------
    key
        PRNG key.
    x0, x1
        ``(B, d)`` end points.
    sigma
        Bridge noise over the unit interval.
    margin
        Times are uniform on ``[margin, 1 - margin]``.

    Returns
    -------
    ``(t, x_t, velocity, noise, weight)``: times ``(B,)``, points ``(B, d)``, the conditional
    probability-flow velocity ``(B, d)``, the standard normal noise ``(B, d)`` and the score
    weight ``lambda_t`` ``(B,)``, so that ``lambda_t s + noise`` is the score residual.
    """
    key_t, key_z = jax.random.split(key)
    t = jax.random.uniform(key_t, (x0.shape[0],), minval=margin, maxval=1.0 - margin)
    std = sigma * jnp.sqrt(t * (1.0 - t))
    noise = jax.random.normal(key_z, x0.shape)
    x_t = (1.0 - t[:, None]) * x0 + t[:, None] * x1 + std[:, None] * noise
    velocity = ((1.0 - 2.0 * t) / (2.0 * t * (1.0 - t)) * std)[:, None] * noise + (x1 - x0)
    weight = 2.0 * std / sigma**2
    return t, x_t, velocity, noise, weight


def _sample_population(arrays: TrainingArrays, key: jax.Array, group: jax.Array, size: int) -> jax.Array:
    """``(size, d)`` cells of ``group``'s control pool in ``arrays``."""
    pool = arrays.group_pool[group]
    offsets = jax.random.randint(key, (size,), 0, arrays.pool_size[pool])
    return arrays.cells[arrays.source_index[arrays.pool_start[pool] + offsets]]


def make_train_chunk(
    graphdef: Any,
    optimizer: optax.GradientTransformation,
    arrays: TrainingArrays,
    config: BridgeConfig,
    chunk: int,
    intervals: jax.Array | None = None,
    populations: TrainingArrays | None = None,
    mesh: Mesh | None = None,
):
    """A jitted ``state -> (state, {"loss", "flow", "score": (chunk,)})`` of ``chunk`` steps.

    Parameters
    ----------
    graphdef
        Graph definition of a :class:`~cellflow.nn.BridgeField`.
    optimizer
        optax transformation.
    arrays
        Training arrays; with ``config.coupling == "aligned"`` every group's source pool must
        list the partners of its treated cells in the same order.
    config
        Static configuration.
    chunk
        Steps per call.
    intervals
        ``(G, 2)`` start and end of each group's interval on the process's clock; default
        ``(0, 1)`` for every group.
    populations
        Arrays whose control pools the population encoder summarises (time-resolved data, where
        ``arrays``' sources are previous snapshots); default ``arrays``.
    mesh
        Devices over which each step's groups are split (:func:`cellflow.train.group_mesh`).
    """
    populations = arrays if populations is None else populations
    n_groups = arrays.group_start.shape[0]
    intervals = jnp.tile(jnp.array([[0.0, 1.0]]), (n_groups, 1)) if intervals is None else jnp.asarray(intervals)

    def sample(data, key):
        arrays, populations = data
        key_batch, key_population = jax.random.split(key)
        if config.coupling != "aligned":
            batch = sample_batches(arrays, key_batch, config.batch_size, config.conditions_per_step)
        else:
            batch = _sample_aligned(arrays, key_batch, config.batch_size, config.conditions_per_step)
        population = jax.vmap(lambda k, g: _sample_population(populations, k, g, config.batch_size))(
            jax.random.split(key_population, config.conditions_per_step), batch.group
        )
        return batch, population

    def loss_fn(params, batch_and_population, key, scalars: BridgeScalars):
        batch, population = batch_and_population
        model = nnx.merge(graphdef, params)
        groups = batch.source.shape[0]
        key_couple, key_path, key_model = jax.random.split(key, 3)
        start, end = intervals[batch.group, 0], intervals[batch.group, 1]
        length = end - start
        x0, x1, fell_back = jax.lax.map(
            lambda args: couple(args[0], args[1], args[2], config, args[3], with_status=True, sigma=scalars.sigma),
            (jax.random.split(key_couple, groups), batch.source, batch.target, length),
        )
        sigma_interval = scalars.sigma * jnp.sqrt(length)
        t, x_t, velocity, noise, weight = jax.vmap(bridge_sample, in_axes=(0, 0, 0, 0, None))(
            jax.random.split(key_path, groups), x0, x1, sigma_interval, config.t_margin
        )

        def group_fields(condition, population, clock, x_t, key):
            key_encode, key_field = jax.random.split(key)
            encoded = model.encode(condition, population, key_encode, scalars.covariate_dropout)
            return model(clock, x_t, encoded, key_field)

        clock = start[:, None] + t * length[:, None]
        v, s = jax.vmap(group_fields)(batch.condition, population, clock, x_t, jax.random.split(key_model, groups))
        # On the process's clock velocities scale by 1 / length; the score residual does not.
        flow = jnp.mean(jnp.sum((v * length[:, None, None] - velocity) ** 2, axis=-1))
        score = jnp.mean(jnp.sum((weight[..., None] * s * length[:, None, None] + noise) ** 2, axis=-1))
        terms = {"flow": flow, "score": score, COUPLING_FALLBACK: jnp.mean(fell_back.astype(jnp.float32))}
        return flow + scalars.score_weight * score, terms

    return scanned_training_chunk(
        loss_fn, sample, optimizer, config.ema_decay, chunk, (arrays, populations), mesh, BridgeScalars.of(config)
    )


def _sample_aligned(arrays: TrainingArrays, key: jax.Array, batch_size: int, n_groups: int):
    """Like :func:`~cellflow.data.sample_batches`, but row ``i`` of a group's source pool is the
    partner of its ``i``-th treated cell, and the same rows are drawn from both."""
    from cellflow.data import Batch

    def one(key):
        key_group, key_rows = jax.random.split(key)
        group = jax.random.choice(key_group, arrays.group_start.shape[0], p=arrays.group_probs)
        rows = jax.random.randint(key_rows, (batch_size,), 0, arrays.group_size[group])
        target = arrays.cells[arrays.target_index[arrays.group_start[group] + rows]]
        pool = arrays.group_pool[group]
        source = arrays.cells[arrays.source_index[arrays.pool_start[pool] + rows]]
        condition = jax.tree.map(lambda leaf: leaf[group], arrays.conditions)
        return Batch(source, target, condition, group.astype(jnp.int32))

    return jax.vmap(one)(jax.random.split(key, n_groups))


def simulate(
    graphdef: Any,
    params: Any,
    x: jax.Array,
    condition: ConditionArrays,
    population: jax.Array,
    key: jax.Array,
    times: jax.Array,
    *,
    sigma: float,
    sde: bool = True,
    n_steps: int = 64,
    t0: float = 0.0,
) -> jax.Array:
    """Move cells ``x`` ``(n, d)`` from ``t0`` along the learned bridge; cells at each of ``times``.

    Parameters
    ----------
    graphdef, params
        The :class:`~cellflow.nn.BridgeField`.
    x
        ``(n, d)`` cells at time ``t0``.
    condition
        Unbatched :class:`~cellflow.data.ConditionArrays`.
    population
        ``(N, d)`` source cells for the population encoder.
    key
        PRNG key of the Brownian path.
    times
        ``(T,)`` increasing times in ``[t0, 1]`` at which to return the cells.
    sigma
        The reference noise the fields were trained with.
    sde
        Euler–Maruyama on ``dX = (v + s) dt + sigma dW`` (True) or Heun on the probability-flow
        ODE ``dX = v dt`` (False).
    n_steps
        Steps over the unit interval (fewer over shorter spans).

    Returns
    -------
    ``(T, n, d)`` cells.
    """
    model = nnx.merge(graphdef, params)
    encoded = model.encode(condition, population)
    t1 = times[-1]
    # A fixed step of 1 / n_steps, so that cells at a given time do not depend on the other times asked for.
    dt = 1.0 / n_steps
    n = jnp.maximum(jnp.ceil((t1 - t0) / dt), 1)
    saveat = diffrax.SaveAt(ts=times)
    if sde:
        def drift(t, y, args):
            v, s = model(t, y, encoded)
            return v + s

        brownian = diffrax.UnsafeBrownianPath(shape=x.shape, key=key)
        diffusion = diffrax.ControlTerm(lambda t, y, args: lineax.DiagonalLinearOperator(jnp.full(y.shape, sigma, y.dtype)), brownian)
        terms = diffrax.MultiTerm(diffrax.ODETerm(drift), diffusion)
        solver = diffrax.Euler()
    else:
        terms = diffrax.ODETerm(lambda t, y, args: model(t, y, encoded)[0])
        solver = diffrax.Heun()
    solution = diffrax.diffeqsolve(
        terms,
        solver,
        t0=t0,
        t1=jnp.maximum(t1, t0 + 1e-6),
        dt0=(t1 - t0) / n,
        y0=x,
        saveat=saveat,
        stepsize_controller=diffrax.ConstantStepSize(),
        max_steps=4 * n_steps + 4,
        # Sampling is never differentiated; the unsafe Brownian path needs forward mode.
        adjoint=diffrax.ForwardMode() if sde else diffrax.RecursiveCheckpointAdjoint(),
    )
    return solution.ys


@partial(jax.jit, static_argnums=(0,), static_argnames=("sde", "n_steps"))
def push(graphdef, params, x, condition, population, key, times, sigma, *, sde=True, n_steps=64, t0=0.0):
    """Jitted :func:`simulate`."""
    return simulate(graphdef, params, x, condition, population, key, times, sigma=sigma, sde=sde, n_steps=n_steps, t0=t0)
