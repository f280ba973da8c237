"""The ``subspace`` option of the learned methods: fit in the top principal components of the
training cells, and give each predicted cell back its own remainder outside them.

A network fitted on thousands of genes must regenerate each gene's noise from its own errors,
and those errors add up over the genes: on Kang 2018's held-out patient in 1,267 log-count genes
every learned method fitted on every gene lost to ``mean_shift``. In a principal subspace the
network sees where the cells and the responses vary; outside it each cell keeps what it had,
moved by the condition's mean shift there (:func:`outside_weights`).

Array work is in :mod:`cellflow.solvers.subspace`; this module holds what the methods share:
the option and its ``"auto"`` rule, the data in subspace coordinates, the way back, and the
saved arrays.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from cellflow._errors import CellflowKeyError, CellflowValueError, user_stacklevel
from cellflow.data import Condition, DataSpec, EmbeddingTable, PerturbationData, condition_weights
from cellflow.methods._base import Option
from cellflow.methods._baselines import MeanShift
from cellflow.solvers import baselines
from cellflow.solvers import subspace as principal

__all__ = [
    "AUTO_SUBSPACE_ABOVE",
    "AUTO_SUBSPACE_COMPONENTS",
    "AUTO_SUBSPACE_VARIANCE",
    "choose_subspace",
    "enter_subspace",
    "leave_subspace",
    "outside_weights",
    "subspace_from_arrays",
    "subspace_option",
    "subspace_run_description",
    "subspace_to_arrays",
    "to_subspace",
]

#: ``subspace="auto"`` fits in this many principal components ...
AUTO_SUBSPACE_COMPONENTS = 20
#: ... when the representation has more features than this ...
AUTO_SUBSPACE_ABOVE = 100
#: ... and those components hold less than this share of the training cells' variance (on
#: genes they hold a third; on CellProfiler features, where they hold nine tenths, the rest is
#: structure, not noise, and fitting in them was measured worse).
AUTO_SUBSPACE_VARIANCE = 0.5

_ARRAYS = ("subspace/mean", "subspace/basis", "subspace/outside")


def _check(value) -> str | None:
    # numpy integers arrive as Python ones (Method.validate_options)
    if value in ("auto", "full") or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return None
    return "expected 'auto', 'full' or a positive integer (the number of principal components)."


def subspace_option(what: str) -> Option:
    """The ``subspace`` option of a method that fits ``what`` (default ``"auto"``)."""
    return Option(
        "auto",
        f"fit {what} in this many principal components of the training cells, each predicted cell keeping its "
        "own remainder, moved by the condition's mean shift pooled over covariate values: an integer, "
        f"'full' (every feature), or 'auto' ({AUTO_SUBSPACE_COMPONENTS} components when there are more than "
        f"{AUTO_SUBSPACE_ABOVE} features and they hold less than {AUTO_SUBSPACE_VARIANCE:.0%} of the variance, "
        "as on genes; else 'full')",
        _check,
    )


def choose_subspace(cells: np.ndarray, option: str | int) -> principal.Subspace | None:
    """The principal subspace to fit in for the ``subspace`` option, or ``None`` for the whole
    representation.

    ``"auto"``: the top :data:`AUTO_SUBSPACE_COMPONENTS` principal axes of ``cells`` when there
    are more than :data:`AUTO_SUBSPACE_ABOVE` features and those axes hold less than
    :data:`AUTO_SUBSPACE_VARIANCE` of the variance; else the whole representation.
    """
    n_cells, n_features = cells.shape
    if option == "full":
        return None
    if option == "auto":
        if n_features <= AUTO_SUBSPACE_ABOVE or n_cells <= AUTO_SUBSPACE_COMPONENTS:
            return None
        subspace = principal.principal_subspace(cells, AUTO_SUBSPACE_COMPONENTS)
        return subspace if principal.captured_variance(subspace, cells) < AUTO_SUBSPACE_VARIANCE else None
    if option > min(n_cells, n_features):
        raise CellflowValueError(
            f"option subspace={option} asks for more principal components than the training data have "
            f"features ({n_features}) or cells ({n_cells}); valid: 'auto', 'full' or an integer in "
            f"[1, {min(n_cells, n_features)}]."
        )
    return None if option == n_features else principal.principal_subspace(cells, int(option))


def subspace_run_description(subspace: principal.Subspace | None) -> dict[str, int]:
    """What a checkpoint's run description records of the subspace: the choice, not the option,
    so that a run in the whole representation is described as before the option existed (its
    older checkpoints still resume) whatever the option's spelling."""
    return {} if subspace is None else {"subspace_components": subspace.n_components}


def enter_subspace(
    data: PerturbationData, embeddings: EmbeddingTable, subspace: principal.Subspace | None
) -> tuple[baselines.AffineResponse | None, PerturbationData]:
    """``(outside, data)``: each training group's mean shift outside ``subspace`` and the data in
    subspace coordinates (``None`` and the data unchanged without a subspace)."""
    if subspace is None:
        return None, data
    shift = MeanShift().fit(data, embeddings, {}, steps=None, batch_size=None, seed=0, progress=False)
    offset = shift.offset - (shift.offset @ subspace.basis) @ subspace.basis.T
    projected = dataclasses.replace(data, cells=to_subspace(subspace, data.cells), spec=_spec_in(data.spec, subspace))
    return baselines.AffineResponse(offset), projected


def _spec_in(spec: DataSpec, subspace: principal.Subspace) -> DataSpec:
    """The data description a network fitted in ``subspace`` is built for."""
    return dataclasses.replace(spec, n_features=subspace.n_components, feature_names=None)


def to_subspace(subspace: principal.Subspace | None, cells: np.ndarray) -> np.ndarray:
    """``(n, k)`` float32 coordinates of ``cells`` in ``subspace`` (the cells themselves without
    one), computed on the host: training cells are never copied to a device whole."""
    if subspace is None:
        return cells
    on_host = principal.Subspace(np.asarray(subspace.mean), np.asarray(subspace.basis))
    return principal.project(on_host, np.asarray(cells, np.float32))


def leave_subspace(
    subspace: principal.Subspace | None,
    outside: baselines.AffineResponse | None,
    z,
    source: np.ndarray,
    condition: Condition,
    spec: DataSpec,
    embeddings: EmbeddingTable,
    fraction: float | np.ndarray = 1.0,
) -> np.ndarray:
    """Source cells moved to the prediction ``z`` ``(n, k)`` inside the subspace and, outside it,
    by ``fraction`` of the condition's mean shift (:func:`outside_weights`); ``z`` itself without
    a subspace. ``fraction`` places a point of a path (0 = the source, 1 = the end); with a
    ``(T,)`` array of them, ``z`` is a path ``(T, n, k)`` and so is the result."""
    if subspace is None:
        return np.asarray(z)
    weights = jnp.asarray(outside_weights(condition, spec, embeddings), jnp.float32)
    source = jnp.asarray(source)

    def point(z, fraction):
        return np.asarray(baselines.push(outside, principal.embed(subspace, jnp.asarray(z), source), fraction * weights))

    if np.ndim(fraction) == 0:
        return point(z, fraction)
    return np.stack([point(z_t, f) for z_t, f in zip(z, np.asarray(fraction))])


def outside_weights(condition: Condition, spec: DataSpec, embeddings: EmbeddingTable) -> np.ndarray:
    """Weights over the training groups of the mean shift that moves a predicted cell outside the
    subspace: ``mean_shift``'s for ``condition``, averaged over covariate values whatever the
    query's (as ``mean_shift`` predicts an unseen patient: per-value shifts of thousands of genes
    are mostly noise, and the model inside the subspace carries the covariates' effects).

    A member that ``mean_shift`` cannot place (never observed alone, no embedding neighbour)
    contributes no shift outside the subspace, with a warning; the other members still do.
    """
    pooled = (None,) * len(spec.covariate_keys)

    def weights_of(query: Condition) -> np.ndarray:
        return condition_weights(query, pooled, spec.group_conditions, spec.group_covariates, embeddings)

    try:
        return weights_of(condition)
    except CellflowKeyError:
        pass
    weights = np.zeros(len(spec.group_conditions), np.float64)
    unplaced = []
    for member, dose in zip(condition.members, condition.doses):
        try:
            weights += weights_of(Condition((member,), (dose,)))
        except CellflowKeyError:
            unplaced.append(member)
    warnings.warn(
        f"{condition.label!r}: perturbation(s) {unplaced} were never observed alone and have no embedding "
        "neighbour, so outside the principal subspace only the other members move the cells "
        "(give them vectors in perturbation_embeddings, or fit with subspace='full').",
        UserWarning,
        stacklevel=user_stacklevel(),
    )
    return weights


def subspace_to_arrays(subspace: principal.Subspace | None, outside: baselines.AffineResponse | None) -> dict[str, np.ndarray]:
    """The arrays that save a subspace and its outside shifts (none without a subspace)."""
    if subspace is None:
        return {}
    return dict(zip(_ARRAYS, (np.asarray(subspace.mean), np.asarray(subspace.basis), np.asarray(outside.offset))))


def subspace_from_arrays(
    arrays: Mapping[str, Any], spec: DataSpec
) -> tuple[principal.Subspace | None, baselines.AffineResponse | None, DataSpec]:
    """``(subspace, outside, spec)``: the saved subspace (``None`` for a model fitted in the whole
    representation, as every model saved before the option was) and the spec the network was
    built for."""
    if "subspace/basis" not in arrays:
        return None, None, spec
    subspace = principal.Subspace(jnp.asarray(arrays["subspace/mean"]), jnp.asarray(arrays["subspace/basis"]))
    outside = baselines.AffineResponse(jnp.asarray(arrays["subspace/outside"]))
    return subspace, outside, _spec_in(spec, subspace)
