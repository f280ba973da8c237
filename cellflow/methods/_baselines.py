"""The closed-form baselines through the method contract: identity, mean_shift, gaussian_ot."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from cellflow._errors import CellflowValueError
from cellflow.data import Condition, DataSpec, EmbeddingTable, PerturbationData, condition_weights
from cellflow.methods._base import Method, Option
from cellflow.solvers import baselines

__all__ = ["Identity", "MeanShift", "GaussianOT"]


class Identity(Method):
    """Predicts the source cells unchanged: the "no effect" yardstick."""

    name = "identity"
    summary = "returns the source cells"

    def fit(self, data, embeddings, options, *, steps, batch_size, seed, progress, resume=False) -> dict:
        return {}

    def predict(self, state, spec, embeddings, options, source, condition, covariates, key) -> np.ndarray:
        return np.array(source, dtype=np.float32)

    def state_to_arrays(self, state) -> dict[str, np.ndarray]:
        return {}

    def state_from_arrays(self, arrays, spec, options, embeddings) -> dict:
        return {}


class _AffineBaseline(Method):
    """A baseline whose per-group responses are affine displacements, combined by condition weights."""

    covariances = False

    @abc.abstractmethod
    def _fit_response(self, moments: baselines.GroupMoments) -> baselines.AffineResponse:
        """The per-group affine displacements from the groups' source and target moments."""

    def fit(self, data: PerturbationData, embeddings, options, *, steps, batch_size, seed, progress, resume=False):
        pools = [data.cells[index] for index in data.pool_index]
        sources = [pools[p] for p in data.spec.groups["pool"]]
        targets = [data.cells[index] for index in data.group_index]
        if self.covariances:
            _check_covariance_sizes(data, sources, targets)
        moments = baselines.group_moments(
            sources, targets, covariances=self.covariances, shrinkage=options.get("shrinkage", "ledoit_wolf")
        )
        return self._fit_response(moments)

    def predict(
        self,
        state: baselines.AffineResponse,
        spec: DataSpec,
        embeddings: EmbeddingTable,
        options: Mapping[str, Any],
        source: np.ndarray,
        condition: Condition,
        covariates: tuple[str | None, ...],
        key: jax.Array,
    ) -> np.ndarray:
        weights = condition_weights(condition, covariates, spec.group_conditions, spec.group_covariates, embeddings)
        return np.asarray(baselines.push(state, source, weights))

    def state_to_arrays(self, state: baselines.AffineResponse) -> dict[str, np.ndarray]:
        arrays = {"offset": np.asarray(state.offset)}
        if state.linear is not None:
            arrays["linear"] = np.asarray(state.linear)
        return arrays

    def state_from_arrays(self, arrays, spec, options, embeddings) -> baselines.AffineResponse:
        return baselines.AffineResponse(offset=arrays["offset"], linear=arrays.get("linear"))


def _check_covariance_sizes(data: PerturbationData, sources: list[np.ndarray], targets: list[np.ndarray]) -> None:
    """A covariance needs two cells: name the first group (or its control pool) with fewer."""
    spec = data.spec
    for g, (x, y) in enumerate(zip(sources, targets)):
        if min(len(x), len(y)) >= 2:
            continue
        row = spec.groups.iloc[g]
        where = ", ".join(f"{k}={row[k]!r}" for k in spec.covariate_keys)
        what = f"condition {row['condition']!r}" + (f" at dose {row['dose']!r}" if spec.dose_key else "") + (f" ({where})" if where else "")
        side = f"has {len(y)} treated cell" if len(y) < 2 else f"is paired with {len(x)} control cell"
        raise CellflowValueError(
            f"gaussian_ot fits a covariance per group and control pool, but {what} {side}; a covariance needs at "
            "least 2 cells. Drop such groups, add the cells, or use method='mean_shift'."
        )


class MeanShift(_AffineBaseline):
    """Adds the observed mean shift of the condition (control pool to treated cells).

    Combinations add their members' shifts; an unseen dose takes the nearest seen dose on a log
    scale; unseen covariate values average over those where the condition was observed; a
    perturbation never observed alone, given a vector in ``perturbation_embeddings``, takes the
    shift of the most similar perturbations observed alone (see
    :func:`cellflow.data.condition_weights`).
    """

    name = "mean_shift"
    summary = "source + observed mean shift (members added, nearest log-dose, covariate average)"

    def _fit_response(self, moments):
        return baselines.fit_mean_shift(moments)


def _check_shrinkage(value: Any) -> str | None:
    if value == "ledoit_wolf":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0:
        return None
    return "expected 'ledoit_wolf' or a number in [0, 1]."


class GaussianOT(_AffineBaseline):
    """The closed-form W2 map between Gaussian fits of control and treated cells.

    Combinations add their members' displacements; doses and covariates are resolved as for
    ``mean_shift``. Covariances are Ledoit-Wolf shrunk by default, so the map is defined even with
    fewer cells than features; fit it in a reduced space (PCA), not on thousands of genes.
    """

    name = "gaussian_ot"
    summary = "closed-form W2 map between Gaussian fits (members' displacements added)"
    covariances = True
    options = {
        "shrinkage": Option("ledoit_wolf", "covariance shrinkage: 'ledoit_wolf' or a number in [0, 1]", _check_shrinkage),
    }

    def _fit_response(self, moments):
        return baselines.fit_gaussian_ot(moments)
