"""Building blocks: time embeddings, residual MLP blocks with conditioning, dropout with explicit keys,
and initialisers that cost no compilation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cellflow.train import key_data

__all__ = ["MLP", "ResidualBlock", "dropout", "lecun_normal", "ones", "sinusoidal_time_embedding", "zeros"]

# Standard deviation of a standard normal truncated to [-2, 2]; dividing by it restores unit variance.
_TRUNCATED_STD = 0.87962566103423978


def lecun_normal(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """LeCun-normal kernel ``(fan_in, fan_out)``: normal truncated at two standard deviations,
    variance ``1 / fan_in``, drawn on the host from the bits of ``key``.

    The distribution of :func:`jax.nn.initializers.lecun_normal`. It is drawn with NumPy because
    XLA compiles the device version once per distinct shape, about 0.3 s each on a CPU, which
    made building a model cost seconds before training started. Deterministic in ``key``.
    """
    rng = np.random.default_rng(np.asarray(key_data(key)).ravel())
    z = rng.standard_normal(math.prod(shape))
    outside = np.abs(z) > 2.0
    while outside.any():
        z[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(z) > 2.0
    fan_in = shape[0] if len(shape) > 1 else 1
    # cast on the host: a cast on the device compiles once per shape
    return jnp.asarray((z / (_TRUNCATED_STD * math.sqrt(fan_in))).reshape(shape).astype(np.dtype(dtype)), dtype)


def zeros(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """Zeros made on the host (no per-shape compilation)."""
    # with its dtype given, jnp.asarray transfers the buffer; without, it compiles a copy per shape
    return jnp.asarray(np.zeros(shape, np.dtype(dtype)), dtype)


def ones(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """Ones made on the host (no per-shape compilation)."""
    return jnp.asarray(np.ones(shape, np.dtype(dtype)), dtype)


def _layer_norm(width: int, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(width, scale_init=ones, bias_init=zeros, rngs=rngs)


def _linear(in_features: int, out_features: int, *, rngs: nnx.Rngs, zero: bool = False) -> nnx.Linear:
    """``nnx.Linear`` with the host initialisers above (zero kernel when ``zero``)."""
    return nnx.Linear(in_features, out_features, kernel_init=zeros if zero else lecun_normal, bias_init=zeros, rngs=rngs)


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
        self.layers = nnx.List([_linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

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
        self.norm = _layer_norm(width, rngs=rngs)
        self.hidden = _linear(width if film else width + cond_features, width, rngs=rngs)
        self.modulation = _linear(cond_features, 2 * width, rngs=rngs) if film else None
        self.out = _linear(width, width, rngs=rngs, zero=True)

    def __call__(self, h: jax.Array, c: jax.Array, key: jax.Array | None = None) -> jax.Array:
        z = self.norm(h)
        if self.film:
            scale, shift = jnp.split(self.modulation(c), 2, axis=-1)
            z = self.hidden(z) * (1.0 + scale) + shift
        else:
            z = self.hidden(jnp.concatenate([z, jnp.broadcast_to(c, (*z.shape[:-1], c.shape[-1]))], axis=-1))
        z = dropout(jax.nn.silu(z), self.dropout_rate, key)
        return h + self.out(z)
