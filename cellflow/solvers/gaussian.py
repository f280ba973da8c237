"""Closed forms between Gaussians: W2 (Monge) maps, entropic OT and the Schrödinger bridge.

They are the oracles that learned solvers are tested against (REFERENCES D1-D3) and the core
of the ``gaussian_ot`` baseline. Computed on the host in float64 with eigendecompositions:
they run once per fit, and inverse square roots of covariances lose too much in float32.

Conventions: ``N(a, A)`` is the source, ``N(b, B)`` the target; the squared Euclidean cost has no
1/2; the entropic problem is ``min <C, P> + 2 sigma^2 KL(P | mu x nu)``, i.e. ott-jax's
``epsilon = 2 sigma^2``; the bridge's reference process is ``dX = sigma dW`` on ``[0, 1]``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from cellflow._errors import CellflowValueError

__all__ = [
    "GaussianBridge",
    "bures_cross_term",
    "entropic_cross_covariance",
    "entropic_ot_cost",
    "gaussian_bridge",
    "inv_sqrtm_psd",
    "monge_map_matrix",
    "shrunk_covariance",
    "sqrtm_psd",
    "w2_squared",
]


def _symmetric(matrix: np.ndarray) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise CellflowValueError(f"expected a square matrix, got shape {matrix.shape}.")
    return 0.5 * (matrix + matrix.T)


def _power_psd(matrix: np.ndarray, power: float, floor: float = 0.0) -> np.ndarray:
    eigenvalues, eigenvectors = np.linalg.eigh(_symmetric(matrix))
    eigenvalues = np.maximum(eigenvalues, floor)
    return (eigenvectors * eigenvalues**power) @ eigenvectors.T


def sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix ``(d, d)`` (negative eigenvalues clipped to 0)."""
    return _power_psd(matrix, 0.5)


def inv_sqrtm_psd(matrix: np.ndarray, floor: float = 1e-12) -> np.ndarray:
    """Inverse symmetric square root of a PD matrix, eigenvalues floored at ``floor``."""
    return _power_psd(matrix, -0.5, floor)


def bures_cross_term(A: np.ndarray, B: np.ndarray) -> float:
    """``tr (A^{1/2} B A^{1/2})^{1/2}``."""
    root = sqrtm_psd(A)
    return float(np.trace(sqrtm_psd(root @ _symmetric(B) @ root)))


def w2_squared(a: np.ndarray, A: np.ndarray, b: np.ndarray, B: np.ndarray) -> float:
    """Squared 2-Wasserstein distance between ``N(a, A)`` and ``N(b, B)``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sum((a - b) ** 2) + np.trace(A) + np.trace(B) - 2.0 * bures_cross_term(A, B))


def monge_map_matrix(A: np.ndarray, B: np.ndarray, floor: float = 1e-12) -> np.ndarray:
    """The symmetric PD matrix ``M`` of the W2 map ``T(x) = b + M (x - a)`` from ``N(a, A)`` to ``N(b, B)``.

    ``M = A^{-1/2} (A^{1/2} B A^{1/2})^{1/2} A^{-1/2}``.

    Parameters
    ----------
    A, B
        ``(d, d)`` source and target covariances.
    floor
        Eigenvalue floor for ``A^{-1/2}``; a singular ``A`` should be regularised first
        (see :func:`shrunk_covariance`).
    """
    root = sqrtm_psd(A)
    inv_root = inv_sqrtm_psd(A, floor)
    return _symmetric(inv_root @ sqrtm_psd(root @ _symmetric(B) @ root) @ inv_root)


def shrunk_covariance(x: np.ndarray, shrinkage: str | float = "ledoit_wolf") -> np.ndarray:
    """Covariance of samples ``x`` ``(n, d)`` shrunk towards a scaled identity.

    Parameters
    ----------
    x
        Samples.
    shrinkage
        ``"ledoit_wolf"`` for the Ledoit-Wolf (2004) optimal intensity, or a number in ``[0, 1]``
        (0 gives the maximum-likelihood covariance). Shrinkage keeps the covariance invertible when
        there are fewer cells than features.

    Returns
    -------
    ``(d, d)`` float64 covariance.
    """
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    if n < 2:
        raise CellflowValueError(f"a covariance needs at least 2 cells, got {n}.")
    centred = x - x.mean(axis=0)
    sample = centred.T @ centred / n
    target_scale = np.trace(sample) / d
    if isinstance(shrinkage, str):
        if shrinkage != "ledoit_wolf":
            raise CellflowValueError(f"shrinkage={shrinkage!r} is invalid; valid choices: 'ledoit_wolf' or a number in [0, 1].")
        dispersion = np.sum((sample - target_scale * np.eye(d)) ** 2) / d
        # sum_k ||x_k x_k^T - S||_F^2 = sum_k |x_k|^4 - n ||S||_F^2
        spread = (np.sum(np.sum(centred**2, axis=1) ** 2) - n * np.sum(sample**2)) / (n**2 * d)
        intensity = 0.0 if dispersion == 0 else min(spread, dispersion) / dispersion
    else:
        intensity = float(shrinkage)
        if not 0.0 <= intensity <= 1.0:
            raise CellflowValueError(f"shrinkage={shrinkage!r} must be in [0, 1] or 'ledoit_wolf'.")
    return (1.0 - intensity) * sample + intensity * target_scale * np.eye(d)


def entropic_cross_covariance(A: np.ndarray, B: np.ndarray, sigma: float) -> np.ndarray:
    """Cross-covariance ``C_sigma`` of the entropic OT plan between ``N(., A)`` and ``N(., B)``.

    ``D = (4 A^{1/2} B A^{1/2} + sigma^4 I)^{1/2}``, ``C = (A^{1/2} D A^{-1/2} - sigma^2 I) / 2``
    (Janati et al. 2020; ott-jax ``epsilon = 2 sigma^2``).
    """
    d = A.shape[0]
    root = sqrtm_psd(A)
    inner = sqrtm_psd(4.0 * root @ _symmetric(B) @ root + sigma**4 * np.eye(d))
    return 0.5 * (root @ inner @ inv_sqrtm_psd(A) - sigma**2 * np.eye(d))


def entropic_ot_cost(a: np.ndarray, A: np.ndarray, b: np.ndarray, B: np.ndarray, sigma: float) -> float:
    """``OT_sigma`` = min ``E|x - y|^2 + 2 sigma^2 KL(P | mu x nu)`` between ``N(a, A)`` and ``N(b, B)``."""
    d = A.shape[0]
    root = sqrtm_psd(A)
    inner = sqrtm_psd(4.0 * root @ _symmetric(B) @ root + sigma**4 * np.eye(d))
    s2 = sigma**2
    _, logdet = np.linalg.slogdet(inner + s2 * np.eye(d))
    return float(
        np.sum((np.asarray(a) - np.asarray(b)) ** 2)
        + np.trace(A)
        + np.trace(B)
        - np.trace(inner)
        + d * s2 * (1.0 - np.log(2.0 * s2))
        + s2 * logdet
    )


class GaussianBridge(NamedTuple):
    """The Schrödinger bridge between ``N(mean0, cov0)`` and ``N(mean1, cov1)`` for ``dX = sigma dW``.

    Attributes
    ----------
    mean0, cov0, mean1, cov1
        End-point marginals.
    sigma
        Reference noise.
    cross
        ``C_sigma = Cov(X_0, X_1)``.
    """

    mean0: np.ndarray
    cov0: np.ndarray
    mean1: np.ndarray
    cov1: np.ndarray
    sigma: float
    cross: np.ndarray

    def marginal(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """Mean ``(d,)`` and covariance ``(d, d)`` of ``X_t``."""
        d = self.cov0.shape[0]
        mean = (1 - t) * self.mean0 + t * self.mean1
        cov = (
            (1 - t) ** 2 * self.cov0
            + t**2 * self.cov1
            + t * (1 - t) * (self.cross + self.cross.T + self.sigma**2 * np.eye(d))
        )
        return mean, cov

    def drift(self, t: float, x: np.ndarray) -> np.ndarray:
        """SDE drift ``f(t, x)`` ``(n, d)`` of ``dX = f dt + sigma dW``."""
        d = self.cov0.shape[0]
        mean, cov = self.marginal(t)
        s_t = t * self.cov1 - (1 - t) * self.cov0 + (1 - t) * self.cross - t * self.cross.T - self.sigma**2 * t * np.eye(d)
        return (self.mean1 - self.mean0) + (np.asarray(x) - mean) @ np.linalg.solve(cov, s_t)

    def probability_flow(self, t: float, x: np.ndarray) -> np.ndarray:
        """Velocity ``(n, d)`` of the probability-flow ODE with the same marginals."""
        mean, cov = self.marginal(t)
        return self.drift(t, x) + 0.5 * self.sigma**2 * np.linalg.solve(cov, (np.asarray(x) - mean).T).T


def gaussian_bridge(mean0, cov0, mean1, cov1, sigma: float) -> GaussianBridge:
    """Closed-form Gaussian Schrödinger bridge (Bunne et al. 2023), see :class:`GaussianBridge`."""
    cov0, cov1 = _symmetric(cov0), _symmetric(cov1)
    return GaussianBridge(
        np.asarray(mean0, np.float64), cov0, np.asarray(mean1, np.float64), cov1, float(sigma),
        entropic_cross_covariance(cov0, cov1, sigma),
    )
