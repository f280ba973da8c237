"""Closed-form baselines as affine displacement fields: identity, mean shift and Gaussian OT.

Each training group ``g`` (a condition under given covariate values) gets a displacement
``r_g(x) = L_g x + c_g``: a mean shift has ``L_g = 0`` and ``c_g = mean(target) - mean(source)``;
the Gaussian OT (W2) map ``T_g(x) = b_g + M_g (x - a_g)`` has ``L_g = M_g - I`` and
``c_g = b_g - M_g a_g``. A queried condition is a weighted sum of groups (a combination adds
its members, an unseen patient averages over patients; the weights come from
:func:`cellflow.data.condition_weights`), and because displacements are affine the sum is too.
The fits run once on the host; :func:`push` is jitted.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cellflow._errors import CellflowValueError
from cellflow.solvers.gaussian import monge_map_matrix, shrunk_covariance

__all__ = ["AffineResponse", "GroupMoments", "fit_gaussian_ot", "fit_mean_shift", "group_moments", "push", "push_group"]


class AffineResponse(NamedTuple):
    """Per-group affine displacements ``r_g(x) = linear[g] @ x + offset[g]``.

    Attributes
    ----------
    offset
        ``(G, d)``.
    linear
        ``(G, d, d)``, or ``None`` for pure shifts.
    """

    offset: jax.Array
    linear: jax.Array | None = None


class GroupMoments(NamedTuple):
    """Moments of each group's source (control pool) and target cells, float64.

    Attributes
    ----------
    source_mean, target_mean
        ``(G, d)``.
    source_cov, target_cov
        ``(G, d, d)`` or ``None`` when only means were computed.
    """

    source_mean: np.ndarray
    target_mean: np.ndarray
    source_cov: np.ndarray | None = None
    target_cov: np.ndarray | None = None


def group_moments(
    sources: list[np.ndarray],
    targets: list[np.ndarray],
    *,
    covariances: bool = False,
    shrinkage: str | float = "ledoit_wolf",
) -> GroupMoments:
    """Means (and shrunk covariances) of paired source and target cell arrays.

    Parameters
    ----------
    sources, targets
        For each group, ``(n_g, d)`` control and ``(m_g, d)`` treated cells. Identical source
        arrays (shared control pools) are summarised once.
    covariances
        Also estimate covariances (see :func:`cellflow.solvers.gaussian.shrunk_covariance`).
    """
    if len(sources) != len(targets) or not sources:
        raise CellflowValueError("group_moments needs one source and one target array per group.")
    cache: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    def moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if id(x) not in cache:
            cache[id(x)] = (
                np.asarray(x, np.float64).mean(axis=0),
                shrunk_covariance(x, shrinkage) if covariances else None,
            )
        return cache[id(x)]

    source = [moments(x) for x in sources]
    target = [moments(y) for y in targets]
    return GroupMoments(
        source_mean=np.stack([m for m, _ in source]),
        target_mean=np.stack([m for m, _ in target]),
        source_cov=np.stack([c for _, c in source]) if covariances else None,
        target_cov=np.stack([c for _, c in target]) if covariances else None,
    )


def fit_mean_shift(moments: GroupMoments) -> AffineResponse:
    """Per-group mean shifts ``mean(target) - mean(source)``."""
    return AffineResponse(offset=jnp.asarray(moments.target_mean - moments.source_mean, jnp.float32))


def fit_gaussian_ot(moments: GroupMoments) -> AffineResponse:
    """Per-group W2 maps between Gaussian fits of source and target, as displacements."""
    if moments.source_cov is None or moments.target_cov is None:
        raise CellflowValueError("fit_gaussian_ot needs covariances: call group_moments(..., covariances=True).")
    d = moments.source_mean.shape[1]
    linear, offset = [], []
    for a, A, b, B in zip(moments.source_mean, moments.source_cov, moments.target_mean, moments.target_cov):
        M = monge_map_matrix(A, B)
        linear.append(M - np.eye(d))
        offset.append(b - M @ a)
    return AffineResponse(
        offset=jnp.asarray(np.stack(offset), jnp.float32), linear=jnp.asarray(np.stack(linear), jnp.float32)
    )


@jax.jit
def push(response: AffineResponse, x: jax.Array, weights: jax.Array) -> jax.Array:
    """Move cells by the weighted sum of group displacements.

    Parameters
    ----------
    response
        Fitted displacements.
    x
        ``(n, d)`` source cells.
    weights
        ``(G,)`` weight of each group's displacement.

    Returns
    -------
    ``(n, d)``: ``x + sum_g weights[g] (linear[g] @ x + offset[g])``.
    """
    x = jnp.asarray(x, jnp.float32)
    weights = jnp.asarray(weights, jnp.float32)
    y = x + weights @ response.offset
    if response.linear is not None:
        y = y + x @ jnp.einsum("g,gij->ji", weights, response.linear)
    return y


def push_group(response: AffineResponse, x: jax.Array, group: jax.Array) -> jax.Array:
    """Move cells ``x`` ``(n, d)`` by the displacement of one group (a traced int index).

    Unjitted, for use inside other jitted functions (e.g. to start a flow from the baseline).
    """
    y = x + response.offset[group]
    if response.linear is not None:
        y = y + x @ response.linear[group].T
    return y
