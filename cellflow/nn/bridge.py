"""The two fields of a Schrödinger bridge: probability-flow velocity and scaled score."""

from __future__ import annotations

import jax
from flax import nnx

from cellflow.data import ConditionArrays
from cellflow.nn.response import Encoded, ResponseField

__all__ = ["BridgeField"]


class BridgeField(nnx.Module):
    """A pair of :class:`ResponseField` s: ``velocity`` v(t, x | c) and ``score`` s(t, x | c).

    In [SF]2M's parametrisation v is the probability-flow ODE velocity of the bridge and s is
    ``(sigma^2 / 2) grad log p_t``; the bridge's SDE is ``dX = (v + s) dt + sigma dW``. Both
    fields keep the response field's structure (one field per combination member plus an
    interaction, covariate and population context), so unseen combinations and patients are
    handled as in flow matching; each has its own encoders.
    """

    def __init__(self, velocity: ResponseField, score: ResponseField):
        self.velocity = velocity
        self.score = score

    def encode(
        self, condition: ConditionArrays, source: jax.Array, key: jax.Array | None = None,
        covariate_dropout: float | jax.Array = 0.0,
    ) -> tuple[Encoded, Encoded]:
        """Encode a condition and its source population ``(N, d)`` for both fields."""
        keys = (None, None) if key is None else tuple(jax.random.split(key))
        return (
            self.velocity.encode(condition, source, keys[0], covariate_dropout),
            self.score.encode(condition, source, keys[1], covariate_dropout),
        )

    def __call__(
        self, t: jax.Array, x: jax.Array, encoded: tuple[Encoded, Encoded], key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """``(velocity, score)``, each ``(B, d)``, at times ``t`` ``(B,)`` and positions ``x`` ``(B, d)``."""
        keys = (None, None) if key is None else tuple(jax.random.split(key))
        return self.velocity(t, x, encoded[0], keys[0]), self.score(t, x, encoded[1], keys[1])
