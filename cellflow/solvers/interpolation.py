"""The time-course baseline: straight-line (displacement) interpolation between two snapshots."""

from __future__ import annotations

from functools import partial

import jax

from cellflow.solvers.flow_matching import sample_plan

__all__ = ["displacement_interpolation"]


@partial(jax.jit, static_argnames=("max_iterations",))
def displacement_interpolation(
    key: jax.Array, x0: jax.Array, x1: jax.Array, s: float | jax.Array, epsilon: float = 0.01, max_iterations: int = 2000
) -> jax.Array:
    """McCann's interpolation ``(1 - s) x0 + s T(x0)`` between populations ``(n, d)`` and ``(m, d)``.

    ``T`` pairs each cell of ``x0`` with one of ``x1`` drawn from the entropic OT plan (ott-jax
    Sinkhorn, ``epsilon`` relative to the mean squared distance), so with a small ``epsilon`` this
    is the W2 geodesic between the snapshots: what one predicts for an intermediate time when
    cells are assumed to move in straight lines.

    Returns
    -------
    ``(n, d)`` interpolated cells.
    """
    start, end = sample_plan(
        key, x0, x1, epsilon=epsilon, scale_cost="mean", max_iterations=max_iterations, threshold=1e-3
    )
    return (1.0 - s) * start + s * end
