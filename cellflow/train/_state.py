"""Training state as a PyTree, optimiser construction and EMA."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["TrainState", "make_optimizer", "ema_update", "scanned_training_chunk"]


class TrainState(NamedTuple):
    """Everything that evolves during training; a PyTree, so it can be scanned and checkpointed.

    Attributes
    ----------
    params
        Model parameters (an ``nnx.State``).
    ema
        Exponential moving average of ``params`` (used for prediction).
    opt_state
        optax state.
    step
        int32 scalar, steps done.
    key
        PRNG key data of the run; step ``s`` draws from ``fold_in(key, s)``, so training
        resumed from a checkpoint replays exactly the same batches.
    """

    params: Any
    ema: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array


def make_optimizer(
    learning_rate: float, steps: int, *, warmup: int = 200, weight_decay: float = 0.0, clip: float = 1.0
) -> optax.GradientTransformation:
    """AdamW with linear warm-up, cosine decay to 1 % of the peak, and global-norm clipping."""
    warmup = min(warmup, max(steps // 10, 1))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps=warmup, decay_steps=max(steps, warmup + 1), end_value=learning_rate * 0.01
    )
    return optax.chain(optax.clip_by_global_norm(clip), optax.adamw(schedule, weight_decay=weight_decay))


def ema_update(ema: Any, params: Any, decay: float, step: jax.Array | None = None) -> Any:
    """``d * ema + (1 - d) * params``, leaf by leaf.

    With ``step``, the decay warms up as ``d = min(decay, (1 + step) / (10 + step))`` so that the
    average forgets the random initialisation in short runs.
    """
    if step is not None:
        decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def key_data(key: jax.Array) -> jax.Array:
    """Raw ``uint32`` data of a typed key (checkpoint-friendly)."""
    return jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key


def scanned_training_chunk(
    loss_fn: Callable[[Any, Any, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]],
    sample: Callable[[jax.Array], Any],
    optimizer: optax.GradientTransformation,
    ema_decay: float,
    chunk: int,
) -> Callable[[TrainState], tuple[TrainState, dict[str, jax.Array]]]:
    """A jitted ``state -> (state, {"loss": (chunk,), ...})`` running ``chunk`` optimiser steps.

    Step ``s`` draws its key from ``fold_in(state.key, s)`` (so a resumed run replays the same
    batches), samples ``batch = sample(key_batch)``, differentiates
    ``loss_fn(params, batch, key_loss) -> (loss, {name: scalar})``, applies the optax update and
    the EMA, all inside one ``lax.scan``: a chunk is one dispatch with no host round trip. The
    returned dict holds the loss and every named term of each step.
    """

    def step(state: TrainState, _):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        key_batch, key_loss = jax.random.split(key)
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, sample(key_batch), key_loss)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema, params, ema_decay, state.step)
        return TrainState(params, ema, opt_state, state.step + 1, state.key), {"loss": loss, **terms}

    @jax.jit
    def train_chunk(state: TrainState):
        return jax.lax.scan(step, state, None, length=chunk)

    return train_chunk
