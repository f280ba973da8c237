"""The conditional denoiser of diffusion: a condition-free base field plus a :class:`ResponseField`.

    F(t, x | c) = base(t, x | context) + w * response(t, x | c)

``context`` (covariate embeddings and the DeepSets summary of the source population) is computed
by the response field's encoder and shared by both parts. The response part is additive by
combination member (see :mod:`cellflow.nn.response`) and is exactly zero for the control
condition (no members), so the base field alone is the denoiser of the control cells of the
given covariates and population. That makes classifier-free guidance free: the "unconditional"
model is the control condition of the same context, and ``base + w * response`` equals
``F_uncond + w (F_cond - F_uncond)`` with one network evaluation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cellflow.nn.response import Encoded, ResponseField, _ConditionedMLP

__all__ = ["Denoiser"]


class Denoiser(nnx.Module):
    """Base field conditioned on the context only, plus an additive-by-member response field.

    Parameters
    ----------
    response
        The condition-dependent part (its encoder also provides the shared context).
    n_features
        Dimension ``d`` of the cells.
    width, depth
        Hidden width and residual blocks of the base field.
    film
        Condition the base field by FiLM (True) or concatenation.
    dropout_rate
        Dropout in the base field's residual blocks.
    n_frequencies
        Frequencies of the noise-level embedding.
    rngs
        Initialisation keys.
    """

    def __init__(
        self,
        response: ResponseField,
        n_features: int,
        *,
        width: int = 128,
        depth: int = 3,
        film: bool = True,
        dropout_rate: float = 0.0,
        n_frequencies: int = 8,
        rngs: nnx.Rngs,
    ):
        self.response = response
        self.base = _ConditionedMLP(n_features, response.context_dim, width, depth, n_frequencies, film, dropout_rate, rngs=rngs)

    def encode(self, condition, source: jax.Array, key: jax.Array | None = None, covariate_dropout: float = 0.0) -> Encoded:
        """Encode one condition and its source population ``(N, d)`` (see :meth:`ResponseField.encode`)."""
        return self.response.encode(condition, source, key, covariate_dropout)

    def __call__(
        self, t: jax.Array, x: jax.Array, encoded: Encoded, key: jax.Array | None = None, guidance: float | jax.Array = 1.0
    ) -> jax.Array:
        """Network output ``(B, d)`` at noise times ``t`` ``(B,)`` or scalar in ``[0, 1]``, inputs ``x`` ``(B, d)``.

        ``guidance`` ``w`` scales the condition-specific part (``w = 1``: the conditional model;
        ``w = 0``: the control condition of the same context).
        """
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
        keys = (None, None) if key is None else tuple(jax.random.split(key))
        base = self.base(t, x, encoded.context, keys[0])
        return base + guidance * self.response(t, x, encoded, keys[1])
