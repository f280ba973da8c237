"""The conditional velocity field of flow matching: condition and population encoders plus an
additive-by-member vector field.

A condition is a set of members (perturbations with doses) plus covariates. Each member becomes
a token; the velocity is the sum of one member field per token plus an interaction field that
sees permutation-invariant pair features of the tokens and is switched on only for
combinations:

    v(t, x | c) = sum_k f(t, x | token_k, context) + [K > 1] g(t, x | pool(tokens), pairs, context)

so that an unseen combination of seen members starts from the sum of their learned responses
(the structure measured to generalise to unseen pairs), while the interaction field learns what
departs from additivity. The cost of a step grows with the number of member slots ``K``; when
training data has no combinations (``K = 1``) the interaction field is not evaluated at all.
To predict a combination the fields can also be applied one member at a time
(:meth:`ResponseField.member_velocities`, :meth:`ResponseField.interaction_velocity`): each
member moves the source cells along its own path and the displacements add, see
:func:`cellflow.solvers.flow_matching.push`.

``field="joint"`` instead evaluates one field on the pooled member tokens, the pair features and
the context, ``v(t, x | c) = [K > 0] f(t, x | pool(tokens), pairs, context)`` (the structure of
set-encoder models such as theislab's CellFlow): one network evaluation per cell whatever ``K``,
at the price of the additive starting point for unseen combinations.

``context`` holds covariate embeddings and, optionally, a DeepSets summary of the source
population, which lets a new patient's untreated cells steer the prediction. The control
condition (no members) has zero velocity by construction.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from cellflow._errors import CellflowValueError
from cellflow.data import ConditionArrays
from cellflow.nn.layers import MLP, ResidualBlock, _layer_norm, _linear, dropout, sinusoidal_time_embedding

__all__ = ["FIELDS", "POOLINGS", "Encoded", "ResponseField", "dose_features"]

#: Structures of the velocity field: one field per member plus an interaction field, or one field
#: of the pooled condition.
FIELDS = ("additive", "joint")
#: Poolings of the member tokens for the interaction (or joint) field.
POOLINGS = ("mean", "attention")


def dose_features(doses: jax.Array) -> jax.Array:
    """``(..., K)`` doses -> ``(..., K, 2)`` features: log-dose and a saturating transform."""
    safe = jnp.maximum(doses, 1e-6)
    return jnp.stack([jnp.log10(safe) / 3.0, safe / (1.0 + safe)], axis=-1)


class Encoded(NamedTuple):
    """A condition encoded once per batch and reused at every ODE step.

    Attributes
    ----------
    tokens
        ``(K, token_dim)`` member tokens.
    mask
        ``(K,)`` bool.
    context
        ``(context_dim,)`` covariate and population context.
    centre
        ``(d,)`` origin of the fields' inputs: the source population's mean when the field
        works in population-relative coordinates, else zeros.
    """

    tokens: jax.Array
    mask: jax.Array
    context: jax.Array
    centre: jax.Array


class _ConditionedMLP(nnx.Module):
    """``(t, x, c) -> R^d``: input projection, residual FiLM blocks, zero-initialised output."""

    def __init__(self, n_features, cond_features, width, depth, n_frequencies, film, dropout_rate, *, rngs):
        self.n_frequencies = n_frequencies
        self.inp = _linear(n_features + 2 * n_frequencies, width, rngs=rngs)
        self.blocks = nnx.List(
            [ResidualBlock(width, cond_features, film=film, dropout_rate=dropout_rate, rngs=rngs) for _ in range(depth)]
        )
        self.norm = _layer_norm(width, rngs=rngs)
        self.out = _linear(width, n_features, rngs=rngs, zero=True)

    def __call__(self, t, x, c, key=None):
        h = self.inp(jnp.concatenate([x, sinusoidal_time_embedding(t, self.n_frequencies)], axis=-1))
        keys = [None] * len(self.blocks) if key is None else list(jax.random.split(key, len(self.blocks)))
        for block, k in zip(self.blocks, keys):
            h = block(h, c, k)
        return self.out(jax.nn.silu(self.norm(h)))


class ResponseField(nnx.Module):
    """Condition encoder, population encoder and additive velocity field in one module.

    The flow-matching solver (:mod:`cellflow.solvers.flow_matching`) talks to it through
    :meth:`encode` (condition, covariates and source population -> :class:`Encoded`),
    :meth:`velocity_terms` (training: the summed member fields and the interaction field at
    ``(t, x)``), :meth:`__call__` (their sum, for sampling) and, for ``combine="displacements"``
    or ``"members"`` with ``field="additive"``, :meth:`member_velocities` and
    :meth:`interaction_velocity`. A module of your own that provides these (e.g. a subclass
    replacing the population encoder) trains and predicts with the same solver.

    Parameters
    ----------
    n_features
        Dimension ``d`` of the cells.
    embedding_dim
        Dimension of perturbation embeddings.
    covariate_sizes
        Number of training values of each covariate (an extra "unknown" slot is added).
    width, depth
        Hidden width and number of residual blocks of the fields.
    token_dim, context_dim
        Sizes of member tokens and of the context vector.
    population
        Summarise the source population with a DeepSets encoder.
    pooling
        ``"mean"`` or ``"attention"`` pooling of member tokens for the interaction (or joint) field.
    field
        ``"additive"`` (one member field per token plus an interaction field for combinations)
        or ``"joint"`` (one field of the pooled condition); see the module docstring.
    film
        Condition the fields by FiLM (True) or by concatenation (False).
    dropout_rate
        Dropout in the residual blocks and on the population summary.
    centre
        Feed the fields cell positions relative to the source population's mean, so that a
        population that is offset as a whole (a new patient, a new batch) is handled like the
        training populations.
    n_frequencies
        Frequencies of the time embedding.
    rngs
        Initialisation keys.
    """

    def __init__(
        self,
        n_features: int,
        embedding_dim: int,
        covariate_sizes: tuple[int, ...] = (),
        *,
        width: int = 256,
        depth: int = 3,
        token_dim: int = 64,
        context_dim: int = 64,
        population: bool = True,
        pooling: str = "mean",
        field: str = "additive",
        film: bool = True,
        dropout_rate: float = 0.0,
        centre: bool = False,
        n_frequencies: int = 8,
        rngs: nnx.Rngs,
    ):
        if field not in FIELDS:
            raise CellflowValueError(f"field={field!r} is not one of {list(FIELDS)}")
        if pooling not in POOLINGS:
            raise CellflowValueError(f"pooling={pooling!r} is invalid; valid choices: {list(POOLINGS)}.")
        self.centre = centre
        self.field = field
        self.covariate_sizes = tuple(covariate_sizes)
        self.context_dim = context_dim
        self.pooling = pooling
        self.dropout_rate = dropout_rate
        self.token = MLP(embedding_dim + 2, (token_dim,), token_dim, rngs=rngs)
        self.covariates = nnx.List([nnx.Embed(n + 1, context_dim, rngs=rngs) for n in self.covariate_sizes])
        self.population = (
            MLP(n_features, (width,), context_dim, rngs=rngs) if population else None
        )
        self.population_out = MLP(context_dim, (context_dim,), context_dim, rngs=rngs) if population else None
        self.attention_query = nnx.Param(jnp.zeros((token_dim,))) if pooling == "attention" else None
        self.attention_key = _linear(token_dim, token_dim, rngs=rngs) if pooling == "attention" else None
        pooled = 2 * token_dim + context_dim  # pooled tokens, pair features, context
        if field == "joint":
            self.joint_field = _ConditionedMLP(n_features, pooled, width, depth, n_frequencies, film, dropout_rate, rngs=rngs)
        else:
            cond = token_dim + context_dim
            self.member_field = _ConditionedMLP(n_features, cond, width, depth, n_frequencies, film, dropout_rate, rngs=rngs)
            self.interaction_field = _ConditionedMLP(
                n_features, pooled, width, max(1, depth - 1), n_frequencies, film, dropout_rate, rngs=rngs
            )

    # -- encoding -----------------------------------------------------------------------------
    def encode(
        self,
        condition: ConditionArrays,
        source: jax.Array,
        key: jax.Array | None = None,
        covariate_dropout: float | jax.Array = 0.0,
    ) -> Encoded:
        """Encode one condition and its source population ``(N, d)``.

        ``key`` enables training-time randomness: covariate values are replaced by "unknown"
        with probability ``covariate_dropout`` and the population summary gets dropout.
        """
        tokens = self.token(jnp.concatenate([condition.members, dose_features(condition.doses)], axis=-1))
        tokens = tokens * condition.mask[:, None]
        context = jnp.zeros((self.context_dim,))
        keys = jax.random.split(key, len(self.covariate_sizes) + 1) if key is not None else None
        for i, (table, size) in enumerate(zip(self.covariates, self.covariate_sizes)):
            code = condition.covariates[i]
            code = jnp.where((code < 0) | (code >= size), size, code)
            # a traced rate (a training program shared across rates) always draws
            if keys is not None and (isinstance(covariate_dropout, jax.Array) or covariate_dropout > 0):
                code = jnp.where(jax.random.bernoulli(keys[i], covariate_dropout), size, code)
            context = context + table(code)
        if self.population is not None:
            summary = self.population_out(jax.nn.silu(self.population(source)).mean(axis=0))
            summary = dropout(summary, self.dropout_rate, None if keys is None else keys[-1])
            context = context + summary
        centre = source.mean(axis=0) if self.centre else jnp.zeros(source.shape[-1], source.dtype)
        return Encoded(tokens, condition.mask, context, jax.lax.stop_gradient(centre))

    def _pool(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        if self.pooling == "attention":
            logits = self.attention_key(tokens) @ self.attention_query[...]
            weights = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf))
            return jnp.where(mask.any(), weights @ tokens, 0.0)
        return tokens.sum(axis=0) / jnp.maximum(mask.sum(), 1)

    # -- velocity -----------------------------------------------------------------------------
    def __call__(self, t: jax.Array, x: jax.Array, encoded: Encoded, key: jax.Array | None = None) -> jax.Array:
        """Velocity ``(B, d)`` at times ``t`` ``(B,)`` (or a scalar) and positions ``x`` ``(B, d)``."""
        velocity, interaction = self.velocity_terms(t, x, encoded, key)
        return velocity + interaction

    def velocity_terms(
        self, t: jax.Array, x: jax.Array, encoded: Encoded, key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """The two parts of the velocity, each ``(B, d)``: the sum of the member fields, and the
        interaction field's contribution (zero unless the condition has several members).

        With ``field="joint"`` the first part is the joint field's velocity and the second is zero.
        """
        keys = (None, None) if key is None else tuple(jax.random.split(key))
        if self.field == "joint":
            t, x = self._inputs(t, x, encoded)
            velocity = jnp.where(encoded.mask.any(), 1.0, 0.0) * self.joint_field(t, x, self._pooled_condition(encoded), keys[0])
            return velocity, jnp.zeros_like(velocity)
        per_member = self._member_fields(t, x, encoded, keys[0], None)  # (K, B, d), one x for all
        velocity = jnp.einsum("k,kbd->bd", encoded.mask.astype(x.dtype), per_member)
        return velocity, self.interaction_velocity(t, x, encoded, keys[1])

    def member_velocities(self, t: jax.Array, xs: jax.Array, encoded: Encoded, key: jax.Array | None = None) -> jax.Array:
        """Each member's own field at its own positions: ``xs`` ``(K, B, d)`` -> ``(K, B, d)``.

        Slot ``k`` holds member ``k``'s velocity at ``xs[k]``; masked (empty) slots are zero.
        Additive fields only.
        """
        per_member = self._member_fields(t, xs, encoded, key, 0)
        return encoded.mask.astype(xs.dtype)[:, None, None] * per_member

    def _member_fields(self, t, x, encoded: Encoded, key, x_axis: int | None) -> jax.Array:
        """Unmasked ``(K, B, d)`` member fields at ``x``: ``(B, d)`` shared (``x_axis=None``) or
        ``(K, B, d)`` one position set per member (``x_axis=0``)."""
        t, x = self._inputs(t, x, encoded)

        def member_velocity(token, x):
            return self.member_field(t, x, jnp.concatenate([token, encoded.context]), key)

        return jax.vmap(member_velocity, in_axes=(0, x_axis))(encoded.tokens, x)

    def interaction_velocity(self, t: jax.Array, x: jax.Array, encoded: Encoded, key: jax.Array | None = None) -> jax.Array:
        """The interaction field's velocity ``(B, d)`` at ``x`` ``(B, d)``: zero unless the
        condition has several members (and not evaluated at all when no slot for a second member
        exists). Additive fields only."""
        t, x = self._inputs(t, x, encoded)
        if encoded.tokens.shape[0] == 1:
            # one member slot: no combination can occur, so skip the field (its output would be masked)
            return jnp.zeros_like(x)
        interaction = self.interaction_field(t, x, self._pooled_condition(encoded), key)
        return jnp.where(encoded.mask.sum() > 1, 1.0, 0.0) * interaction

    def _inputs(self, t: jax.Array, x: jax.Array, encoded: Encoded) -> tuple[jax.Array, jax.Array]:
        """Times broadcast to ``(B,)`` and positions ``(..., B, d)`` relative to the centre."""
        return jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[-2:-1]), x - encoded.centre

    def _pooled_condition(self, encoded: Encoded) -> jax.Array:
        tokens = encoded.tokens
        total = tokens.sum(axis=0)
        pairs = 0.5 * (total * total - (tokens * tokens).sum(axis=0))  # sum_{i<j} token_i * token_j
        return jnp.concatenate([self._pool(tokens, encoded.mask), pairs, encoded.context])
