"""Principal subspaces: run a solver on the main axes of variation and carry the rest unchanged.

On thousands of genes most of a cell's variance is per-gene noise that a response leaves as it
is. A learned field fitted on all of them must regenerate that noise from its own errors, which
adds up over the features; fitted on the top principal components of the training cells, where
the responses and cell states live, it moves each cell only there, and the cell keeps its own
remainder (:func:`embed`):

.. math::

    x' = x + (z' - P x) B^\\top, \\qquad P x = (x - \\mu) B,

with ``B`` the ``(d, k)`` orthonormal basis, ``mu`` the training mean and ``z'`` the solver's
prediction from ``P x``. Unlike decoding ``mu + z' B^T`` it loses none of the cell's variance.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cellflow._errors import CellflowValueError

__all__ = ["Subspace", "captured_variance", "embed", "principal_subspace", "project"]


class Subspace(NamedTuple):
    """An affine subspace of feature space.

    Attributes
    ----------
    mean
        ``(d,)`` origin: the mean of the cells it was fitted on.
    basis
        ``(d, k)`` orthonormal columns, the principal axes by decreasing variance.
    """

    mean: jax.Array
    basis: jax.Array

    @property
    def n_components(self) -> int:
        return int(self.basis.shape[1])


def principal_subspace(
    cells: np.ndarray, n_components: int, *, max_cells: int = 20_000, power_iterations: int = 4, seed: int = 0
) -> Subspace:
    """The top ``n_components`` principal axes of ``cells``.

    A randomised range finder with power iterations (Halko, Martinsson and Tropp 2011) on at most
    ``max_cells`` cells drawn without replacement, so the cost is ``O(n d k)`` rather than the
    ``O(n d^2)`` of a covariance on thousands of genes. Deterministic for a given ``seed``.

    Parameters
    ----------
    cells
        ``(n, d)`` cells.
    n_components
        ``k``, with ``1 <= k <= min(n, d)``.
    max_cells
        Cells used at most; more add little to the axes and cost time.
    power_iterations
        Passes sharpening the range towards the top axes.
    seed
        Seed of the cell draw and of the random test matrix.

    Returns
    -------
    A :class:`Subspace` with a ``(d,)`` mean and ``(d, k)`` basis, float32.
    """
    x = np.asarray(cells)
    if x.ndim != 2:
        raise CellflowValueError(f"cells must have shape (n, d), got shape {x.shape}.")
    n, d = x.shape
    if not 1 <= n_components <= min(n, d):
        raise CellflowValueError(
            f"n_components must be in [1, min(n_cells, n_features)] = [1, {min(n, d)}], got {n_components}."
        )
    rng = np.random.default_rng(seed)
    if n > max_cells:
        x = x[np.sort(rng.choice(n, max_cells, replace=False))]
    mean = x.mean(axis=0, dtype=np.float64)
    x = (x - mean).astype(np.float32)
    width = min(n_components + 10, min(x.shape))
    q, _ = np.linalg.qr(x @ rng.standard_normal((d, width)))
    for _ in range(power_iterations):
        q, _ = np.linalg.qr(x.T @ q)
        q, _ = np.linalg.qr(x @ q)
    _, _, vt = np.linalg.svd(q.T @ x, full_matrices=False)
    return Subspace(jnp.asarray(mean, jnp.float32), jnp.asarray(vt[:n_components].T, jnp.float32))


def project(subspace: Subspace, x: jax.Array) -> jax.Array:
    """Coordinates ``(n, k)`` of cells ``x`` ``(n, d)`` in the subspace."""
    return x @ subspace.basis - subspace.mean @ subspace.basis  # no centred (n, d) copy


def embed(subspace: Subspace, z: jax.Array, x: jax.Array) -> jax.Array:
    """Cells ``x`` ``(n, d)`` with their coordinates in the subspace replaced by ``z`` ``(n, k)``.

    What lies outside the subspace (each cell's own remainder) is kept as it is.
    """
    return x + (z - project(subspace, x)) @ subspace.basis.T


def captured_variance(subspace: Subspace, cells: np.ndarray) -> float:
    """Fraction of the variance of ``cells`` ``(n, d)`` about the subspace's mean that lies in it.

    Near 1 for a compact representation (an embedding, curated image features: little outside
    the top axes), well below it for expression data, where per-gene noise spreads most of the
    variance over thousands of directions.
    """
    x = np.asarray(cells, np.float32)
    mean = np.asarray(subspace.mean)
    basis = np.asarray(subspace.basis)
    total = float(np.sum(np.square(x - mean), dtype=np.float64))
    inside = float(np.sum(np.square(x @ basis - mean @ basis), dtype=np.float64))
    return inside / total if total > 0 else 1.0
