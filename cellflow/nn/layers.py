"""Building blocks: time embeddings, residual MLP blocks with conditioning, dropout with explicit keys."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["MLP", "ResidualBlock", "dropout", "sinusoidal_time_embedding"]


def sinusoidal_time_embedding(t: jax.Array, n_frequencies: int = 16) -> jax.Array:
    """Embed times ``t`` ``(...,)`` in ``[0, 1]`` as ``(..., 2 * n_frequencies)`` sines and cosines."""
    frequencies = jnp.pi * 2.0 ** jnp.arange(n_frequencies, dtype=jnp.float32) / 2.0 ** (n_frequencies // 2)
    angles = t[..., None] * frequencies
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity when ``key`` is ``None`` (inference) or ``rate == 0``."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


class MLP(nnx.Module):
    """``Linear -> SiLU -> ... -> Linear`` with ``len(widths)`` hidden layers.

    Parameters
    ----------
    in_features, out_features
        Input and output sizes.
    widths
        Hidden layer sizes.
    rngs
        Parameter initialisation keys.
    """

    def __init__(self, in_features: int, widths: tuple[int, ...], out_features: int, *, rngs: nnx.Rngs):
        sizes = (in_features, *widths, out_features)
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = jax.nn.silu(layer(x))
        return self.layers[-1](x)


class ResidualBlock(nnx.Module):
    """``h + Linear(SiLU(Linear(LayerNorm(h)) * (1 + scale(c)) + shift(c)))``.

    The condition ``c`` enters by FiLM (feature-wise scale and shift) when ``film`` is True,
    otherwise by concatenation to the block's input. The output layer starts at zero, so every
    block starts as the identity and deep stacks train stably.
    """

    def __init__(self, width: int, cond_features: int, *, film: bool = True, dropout_rate: float = 0.0, rngs: nnx.Rngs):
        self.film = film
        self.dropout_rate = dropout_rate
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.hidden = nnx.Linear(width if film else width + cond_features, width, rngs=rngs)
        self.modulation = nnx.Linear(cond_features, 2 * width, rngs=rngs) if film else None
        self.out = nnx.Linear(width, width, kernel_init=nnx.initializers.zeros, rngs=rngs)

    def __call__(self, h: jax.Array, c: jax.Array, key: jax.Array | None = None) -> jax.Array:
        z = self.norm(h)
        if self.film:
            scale, shift = jnp.split(self.modulation(c), 2, axis=-1)
            z = self.hidden(z) * (1.0 + scale) + shift
        else:
            z = self.hidden(jnp.concatenate([z, jnp.broadcast_to(c, (*z.shape[:-1], c.shape[-1]))], axis=-1))
        z = dropout(jax.nn.silu(z), self.dropout_rate, key)
        return h + self.out(z)
