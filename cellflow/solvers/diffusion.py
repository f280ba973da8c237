"""Conditional denoising diffusion (EDM parametrisation), array level: loss, scanned steps, sampling.

Cells are assumed standardised (about unit variance per feature; the method layer does it).
Following Karras et al. (2022, "Elucidating the design space of diffusion-based generative
models"), a cell ``y`` is noised to ``x = y + sigma n`` with ``log sigma ~ N(p_mean, p_std^2)``
and the denoiser is preconditioned as

    D(x; sigma | c) = c_skip(sigma) x + c_out(sigma) F(t(sigma), c_in(sigma) x | c)

with ``c_skip = s_d^2 / (sigma^2 + s_d^2)``, ``c_out = sigma s_d / sqrt(sigma^2 + s_d^2)``,
``c_in = 1 / sqrt(sigma^2 + s_d^2)`` (``s_d`` the data scale) and the network's time input
``t(sigma)`` in ``[0, 1]``, the log noise level normalised between ``sigma_min`` and
``sigma_max``. The loss ``|F - (y - c_skip x) / c_out|^2`` is the EDM-weighted denoising loss.

The network ``F`` is a :class:`cellflow.nn.Denoiser`: a base field conditioned on covariates and
the source population plus an additive-by-member response field that is zero for the control
condition. With probability ``p_uncond`` a group is replaced by its own control cells under the
empty condition, so the base field is the denoiser of the controls of the same context and
classifier-free guidance ``F_u + w (F_c - F_u)`` is the response part scaled by ``w``.

Sampling integrates the probability-flow ODE ``dx/dsigma = (x - D(x; sigma)) / sigma`` (Heun)
or the reverse SDE ``dx = 2 (x - D) / sigma dsigma + sqrt(2 sigma) dW`` (Euler-Maruyama with a
diffrax ``VirtualBrownianTree``) with diffrax, stepping through the noise levels of the Karras
schedule ``sigma(s) = (sigma_0^(1/rho) + s (sigma_min^(1/rho) - sigma_0^(1/rho)))^rho`` at
``s = 0, 1/n, ..., 1``, from pure noise at ``sigma_0 = sigma_max`` or, SDEdit-like,
from control cells noised to an intermediate ``sigma_0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import lineax
import optax
from flax import nnx
from jax.sharding import Mesh

from cellflow._errors import CellflowValueError
from cellflow.data import ConditionArrays, TrainingArrays, sample_batches
from cellflow.nn import Denoiser
from cellflow.solvers.flow_matching import init_state
from cellflow.train import scanned_training_chunk, shared_jit

__all__ = [
    "SAMPLERS",
    "DiffusionConfig",
    "DiffusionScalars",
    "denoise",
    "generate",
    "init_state",
    "loss_terms",
    "make_train_chunk",
    "noise_time",
    "preconditioning",
    "sample",
    "sigma_schedule",
]


@dataclass(frozen=True)
class DiffusionConfig:
    """Hyper-parameters of the solver (hashable; :class:`DiffusionScalars` and ``ema_decay`` reach
    the training program as arguments, the others shape it).

    Attributes
    ----------
    batch_size
        Cells per condition per step.
    conditions_per_step
        Conditions (treated groups) per step.
    sigma_data
        Scale of the (standardised) data.
    sigma_min, sigma_max
        Noise range of sampling; also the range mapped to the network's time input ``[0, 1]``.
    p_mean, p_std
        Log-normal distribution of the training noise levels.
    rho
        Curvature of the Karras sampling schedule.
    p_uncond
        Probability of training a group on its control cells under the empty condition.
    ema_decay
        EMA decay of the weights.
    covariate_dropout
        Probability of hiding each covariate value during training.
    """

    batch_size: int = 256
    conditions_per_step: int = 4
    sigma_data: float = 1.0
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    p_mean: float = -1.2
    p_std: float = 1.2
    rho: float = 7.0
    p_uncond: float = 0.1
    ema_decay: float = 0.999
    covariate_dropout: float = 0.1


class DiffusionScalars(NamedTuple):
    """The continuous training numbers of :class:`DiffusionConfig` that :func:`make_train_chunk`
    passes to its compiled program as arguments (fits that differ only in them share the program;
    ``sigma_data``, ``sigma_min`` and ``sigma_max`` also shape sampling and stay static)."""

    p_mean: float | jax.Array
    p_std: float | jax.Array
    p_uncond: float | jax.Array
    covariate_dropout: float | jax.Array

    @classmethod
    def of(cls, config: DiffusionConfig) -> DiffusionScalars:
        """The config's values."""
        return cls(config.p_mean, config.p_std, config.p_uncond, config.covariate_dropout)


def preconditioning(sigma: jax.Array, sigma_data: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """EDM coefficients ``(c_skip, c_out, c_in)``, each shaped like ``sigma``."""
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / jnp.sqrt(total), 1.0 / jnp.sqrt(total)


def noise_time(sigma: jax.Array, config: DiffusionConfig) -> jax.Array:
    """The network's time input: ``log sigma`` mapped linearly from ``[log sigma_min, log sigma_max]`` to ``[0, 1]``."""
    lo, hi = jnp.log(config.sigma_min), jnp.log(config.sigma_max)
    return jnp.clip((jnp.log(sigma) - lo) / (hi - lo), 0.0, 1.0)


def sigma_schedule(s: jax.Array, sigma_start: float, config: DiffusionConfig) -> tuple[jax.Array, jax.Array]:
    """Karras schedule ``sigma(s)`` from ``sigma_start`` (``s = 0``) to ``sigma_min`` (``s = 1``) and ``dsigma/ds``."""
    a, b = sigma_start ** (1.0 / config.rho), config.sigma_min ** (1.0 / config.rho)
    base = a + s * (b - a)
    return base**config.rho, config.rho * base ** (config.rho - 1.0) * (b - a)


def denoise(
    model: Denoiser,
    x: jax.Array,
    sigma: jax.Array,
    encoded: Any,
    config: DiffusionConfig,
    guidance: float | jax.Array = 1.0,
    key: jax.Array | None = None,
) -> jax.Array:
    """Denoised estimate ``D(x; sigma)`` ``(B, d)`` of noisy cells ``x`` ``(B, d)`` at noise ``sigma`` (scalar or ``(B,)``)."""
    sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])
    c_skip, c_out, c_in = preconditioning(sigma, config.sigma_data)
    out = model(noise_time(sigma, config), c_in[:, None] * x, encoded, key, guidance)
    return c_skip[:, None] * x + c_out[:, None] * out


def loss_terms(
    model: Denoiser, y: jax.Array, encoded: Any, key: jax.Array, config: DiffusionConfig, scalars: DiffusionScalars | None = None
) -> jax.Array:
    """EDM-weighted denoising loss ``(B,)`` of clean cells ``y`` ``(B, d)`` (mean over features).

    ``scalars`` replaces the config's ``p_mean`` and ``p_std`` (maybe traced)."""
    scalars = DiffusionScalars.of(config) if scalars is None else scalars
    key_sigma, key_noise, key_field = jax.random.split(key, 3)
    sigma = jnp.exp(scalars.p_mean + scalars.p_std * jax.random.normal(key_sigma, y.shape[:1]))
    x = y + sigma[:, None] * jax.random.normal(key_noise, y.shape)
    c_skip, c_out, c_in = preconditioning(sigma, config.sigma_data)
    out = model(noise_time(sigma, config), c_in[:, None] * x, encoded, key_field)
    target = (y - c_skip[:, None] * x) / c_out[:, None]
    return jnp.mean((out - target) ** 2, axis=-1)


def make_train_chunk(
    graphdef: Any,
    optimizer: optax.GradientTransformation,
    arrays: TrainingArrays,
    config: DiffusionConfig,
    chunk: int,
    mesh: Mesh | None = None,
):
    """A jitted ``state -> (state, {"loss": (chunk,)})`` running ``chunk`` denoising steps.

    Each step draws ``conditions_per_step`` groups of ``batch_size`` treated cells with as many
    control cells of the matching pool (the population the encoder summarises). With
    probability ``p_uncond`` a group's targets are its control cells and its condition is
    emptied (the "unconditional" model). Sampling, loss, gradient, optax update and EMA all
    run inside one ``lax.scan``. With a ``mesh`` (:func:`cellflow.train.group_mesh`) each
    step's groups are split over its devices.
    """

    def loss_fn(params, batch, key, scalars: DiffusionScalars):
        model = nnx.merge(graphdef, params)
        groups = batch.source.shape[0]

        def group_loss(condition: ConditionArrays, source, target, key):
            key_uncond, key_encode, key_loss = jax.random.split(key, 3)
            uncond = jax.random.bernoulli(key_uncond, scalars.p_uncond)
            y = jnp.where(uncond, source, target)
            condition = condition._replace(mask=condition.mask & ~uncond)
            encoded = model.encode(condition, source, key_encode, scalars.covariate_dropout)
            return jnp.mean(loss_terms(model, y, encoded, key_loss, config, scalars))

        losses = jax.vmap(group_loss)(batch.condition, batch.source, batch.target, jax.random.split(key, groups))
        return jnp.mean(losses), {}

    def sample(arrays, key):
        return sample_batches(arrays, key, config.batch_size, config.conditions_per_step)

    return scanned_training_chunk(loss_fn, sample, optimizer, config.ema_decay, chunk, arrays, mesh, DiffusionScalars.of(config))


class _NoiseGrid(diffrax.StepTo):
    """``diffrax.StepTo`` over a grid that is valid by construction, without its run-time checks.

    StepTo verifies the grid (strictly monotonic, ending at ``t0`` and ``t1``) with host callbacks,
    and a compiled program holding a callback cannot be serialized: the sampler could not be kept
    in the on-disk compilation cache. :func:`generate` builds its grid from a strictly decreasing
    noise schedule and integrates from its first to its last time, so the checks cannot fail.
    """

    def wrap(self, direction):
        return type(self)(ts=self.ts * direction)

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        return self.ts[1], 2


#: Samplers of :func:`generate`: the probability-flow ODE (Heun) or the reverse SDE (Euler–Maruyama).
SAMPLERS = ("ode", "sde")


def generate(
    graphdef: Any,
    params: Any,
    source: jax.Array,
    condition: ConditionArrays,
    population: jax.Array,
    key: jax.Array,
    config: DiffusionConfig,
    sampler: str = "ode",
    n_steps: int = 32,
    guidance: float = 1.0,
    sigma_start: float | None = None,
) -> jax.Array:
    """Unjitted body of :func:`sample`, for use inside other jitted functions.

    diffrax integrates in the time ``r = -sigma`` (increasing) on the Karras grid of noise levels
    (``diffrax.StepTo``); for the ODE this is the second-order sampler of Karras et al.
    """
    if sampler not in SAMPLERS:
        raise CellflowValueError(f"sampler={sampler!r} is invalid; valid choices: {list(SAMPLERS)}.")
    model = nnx.merge(graphdef, params)
    encoded = model.encode(condition, population)
    start = config.sigma_max if sigma_start is None else float(sigma_start)
    if not start > config.sigma_min:
        raise CellflowValueError(f"sampling starts at noise level {start} but must start above sigma_min={config.sigma_min}.")
    key_start, key_brownian = jax.random.split(key)
    noise = jax.random.normal(key_start, source.shape, source.dtype)
    x = start * noise if sigma_start is None else source + start * noise
    shape = x.shape
    sigmas, _ = sigma_schedule(jnp.linspace(0.0, 1.0, n_steps + 1), start, config)
    times = -sigmas

    def ode_drift(r, y, args):  # dx/dr = -dx/dsigma = -(x - D) / sigma
        x = y.reshape(shape)
        return (-(x - denoise(model, x, -r, encoded, config, guidance)) / -r).reshape(-1)

    if sampler == "ode":
        terms, solver = diffrax.ODETerm(ode_drift), diffrax.Heun()
    else:
        # reverse SDE: dx = 2 (x - D) / sigma dsigma + sqrt(2 sigma) dW, with dsigma = -dr
        brownian = diffrax.VirtualBrownianTree(
            -start, -config.sigma_min, tol=0.25 * config.sigma_min, shape=(x.size,), key=key_brownian
        )

        def diffusion(r, y, args):
            return lineax.DiagonalLinearOperator(jnp.full(y.shape, jnp.sqrt(-2.0 * r), y.dtype))

        terms = diffrax.MultiTerm(
            diffrax.ODETerm(lambda r, y, args: 2.0 * ode_drift(r, y, args)), diffrax.ControlTerm(diffusion, brownian)
        )
        solver = diffrax.Euler()
    solution = diffrax.diffeqsolve(
        terms,
        solver,
        t0=times[0],
        t1=times[-1],
        dt0=None,
        y0=x.reshape(-1),
        stepsize_controller=_NoiseGrid(ts=times),
        max_steps=n_steps,
        # exactly n_steps steps through the grid, so the solve cannot fail: no error check (a host callback)
        throw=False,
    )
    return solution.ys[-1].reshape(shape)


_sample = shared_jit(generate, static_argnums=(0, 6, 7, 8, 9, 10))


def sample(
    graphdef: Any,
    params: Any,
    source: jax.Array,
    condition: ConditionArrays,
    population: jax.Array,
    key: jax.Array,
    config: DiffusionConfig,
    *,
    sampler: str = "ode",
    n_steps: int = 32,
    guidance: float = 1.0,
    sigma_start: float | None = None,
) -> jax.Array:
    """Generate one cell per row of ``source`` ``(n, d)`` under ``condition``.

    Parameters
    ----------
    graphdef, params
        The :class:`~cellflow.nn.Denoiser`.
    source
        ``(n, d)`` standardised control cells: the starting points when ``sigma_start`` is
        given (SDEdit-like), otherwise only their shape matters (generation from pure noise).
    condition
        The condition (unbatched :class:`ConditionArrays`).
    population
        ``(N, d)`` standardised control cells summarised by the population encoder.
    key
        PRNG key of the starting noise and of the SDE's Brownian motion.
    config
        The solver's configuration (noise range, schedule).
    sampler
        ``"ode"`` (probability flow, Heun) or ``"sde"`` (reverse SDE, Euler-Maruyama).
    n_steps
        Integration steps.
    guidance
        Classifier-free guidance weight ``w`` (1: the conditional model).
    sigma_start
        ``None``: start from pure noise at ``sigma_max``; a number: start from ``source`` noised
        to this level and integrate the rest of the way.

    Returns
    -------
    ``(n, d)`` generated cells (standardised).
    """
    return _sample(graphdef, params, source, condition, population, key, config, sampler, n_steps, float(guidance), sigma_start)
