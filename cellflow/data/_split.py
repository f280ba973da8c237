"""Train / test splits that hold out conditions, combinations, doses or covariate values.

Every split keeps all control cells in ``train`` (they are the model's input, never its target)
and puts into ``test`` the held-out treated cells plus the control cells that share their
covariate values (``covariate_keys``; all controls when there are none), so that
``test[test.obs[perturbation_key] == control]`` is the source population to predict from.
Both are views of the input AnnData (``adata[mask]``); call ``.copy()`` to modify them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import anndata as ad
import numpy as np

from cellflow._errors import CellflowValueError, format_choices
from cellflow.data._conditions import parse_condition
from cellflow.data._dataset import check_obs_column, parse_obs_conditions

__all__ = ["Split", "holdout", "split_combinations", "split_conditions", "split_covariates", "split_doses"]


class Split(NamedTuple):
    """``train`` and ``test`` views of an AnnData."""

    train: ad.AnnData
    test: ad.AnnData


def _as_list(values: Any) -> list:
    if isinstance(values, str) or not isinstance(values, Iterable):
        return [values]
    return list(values)


def holdout(
    adata: ad.AnnData,
    mask: np.ndarray,
    *,
    perturbation_key: str = "condition",
    control: str = "control",
    covariate_keys: Sequence[str] = (),
) -> Split:
    """Split off the treated cells selected by ``mask``.

    Parameters
    ----------
    adata
        The data.
    mask
        ``(n_obs,)`` bool, True for treated cells to hold out (control cells are ignored).
    perturbation_key, control
        Where control cells are marked.
    covariate_keys
        Columns on which test controls must match held-out cells (e.g. ``("patient",)``).

    Returns
    -------
    :class:`Split` of views.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (adata.n_obs,):
        raise CellflowValueError(f"mask must have shape ({adata.n_obs},), got {mask.shape}.")
    is_control = parse_obs_conditions(adata, perturbation_key, control).is_control
    held_out = mask & ~is_control
    if not held_out.any():
        raise CellflowValueError("the split holds out no treated cell.")
    test_controls = is_control.copy()
    for key in covariate_keys:
        check_obs_column(adata, key, "covariate_keys")
        values = adata.obs[key].astype(str).to_numpy()
        test_controls &= np.isin(values, np.unique(values[held_out]))
    return Split(adata[~held_out], adata[held_out | test_controls])


def split_conditions(
    adata: ad.AnnData,
    conditions: str | Iterable[str],
    *,
    perturbation_key: str = "condition",
    control: str = "control",
    covariate_keys: Sequence[str] = (),
) -> Split:
    """Hold out every cell of the given conditions (at all doses and covariate values).

    ``"B+A"`` and ``"A+B"`` name the same condition.

    Raises
    ------
    CellflowValueError
        A requested condition has no cells (the message lists the conditions present).
    """
    obs_conditions = parse_obs_conditions(adata, perturbation_key, control)
    labels = obs_conditions.labels()
    present = sorted({c.label for c in obs_conditions.unique if not c.is_control})
    wanted = [parse_condition(c, control=control).label for c in _as_list(conditions)]
    for label in wanted:
        if label not in present:
            raise CellflowValueError(
                f"condition {label!r} has no cells in adata.obs[{perturbation_key!r}]; conditions present: "
                f"{format_choices(present)}."
            )
    return holdout(
        adata, np.isin(labels, wanted), perturbation_key=perturbation_key, control=control, covariate_keys=covariate_keys
    )


def split_combinations(
    adata: ad.AnnData,
    combinations: str | Iterable[str] | None = None,
    *,
    perturbation_key: str = "condition",
    control: str = "control",
    fraction: float = 0.25,
    seed: int = 0,
    covariate_keys: Sequence[str] = (),
) -> Split:
    """Hold out combinations whose members were all observed alone.

    Parameters
    ----------
    combinations
        The combinations to hold out; by default a random ``fraction`` (at least one) of the
        combinations whose every member also occurs alone, drawn with ``seed``.
    """
    if combinations is not None:
        return split_conditions(
            adata, combinations, perturbation_key=perturbation_key, control=control, covariate_keys=covariate_keys
        )
    unique = parse_obs_conditions(adata, perturbation_key, control).unique
    singles = {c.members[0] for c in unique if len(c) == 1}
    candidates = sorted({c.label for c in unique if len(c) > 1 and set(c.members) <= singles})
    if not candidates:
        raise CellflowValueError(
            f"adata.obs[{perturbation_key!r}] has no combination whose members all occur alone; nothing to hold out."
        )
    if not 0 < fraction <= 1:
        raise CellflowValueError(f"fraction={fraction!r} must be in (0, 1].")
    n = max(1, int(round(fraction * len(candidates))))
    chosen = np.random.default_rng(seed).choice(candidates, size=n, replace=False).tolist()
    return split_conditions(
        adata, chosen, perturbation_key=perturbation_key, control=control, covariate_keys=covariate_keys
    )


def split_doses(
    adata: ad.AnnData,
    doses: float | Iterable[float],
    *,
    perturbation_key: str = "condition",
    dose_key: str = "dose",
    control: str = "control",
    perturbations: str | Iterable[str] | None = None,
    covariate_keys: Sequence[str] = (),
) -> Split:
    """Hold out the cells treated at the given doses (every member of a combination at that dose).

    Parameters
    ----------
    doses
        Dose value(s) to hold out.
    perturbations
        Restrict to these conditions (default: all).
    """
    obs_conditions = parse_obs_conditions(adata, perturbation_key, control, dose_key)
    wanted = [float(d) for d in _as_list(doses)]
    allowed = None if perturbations is None else {parse_condition(p, control=control).label for p in _as_list(perturbations)}
    selected = np.array(
        [
            not c.is_control
            and (allowed is None or c.label in allowed)
            and any(np.allclose(c.doses, d) for d in wanted)
            for c in obs_conditions.unique
        ],
        dtype=bool,
    )
    if not selected.any():
        present = sorted({d for c in obs_conditions.unique for d in c.doses})
        raise CellflowValueError(
            f"no treated cell has dose(s) {wanted} in adata.obs[{dose_key!r}]"
            + (f" for {sorted(allowed)}" if allowed else "")
            + f"; doses present: {format_choices(present)}."
        )
    return holdout(
        adata,
        selected[obs_conditions.codes],
        perturbation_key=perturbation_key,
        control=control,
        covariate_keys=covariate_keys,
    )


def split_covariates(
    adata: ad.AnnData,
    covariates: Mapping[str, Any],
    *,
    perturbation_key: str = "condition",
    control: str = "control",
    conditions: str | Iterable[str] | None = None,
) -> Split:
    """Hold out the treated cells with given covariate values (a patient, a cell type).

    Their control cells stay in ``train`` (as a new patient's untreated cells would be known)
    and are also the controls of ``test``.

    Parameters
    ----------
    covariates
        ``{column: value or list of values}``, e.g. ``{"patient": "107"}``; a cell is held out
        when it matches on every column.
    conditions
        Hold out only these conditions of the matching cells (default: all treated).
    """
    if not covariates:
        raise CellflowValueError("covariates must name at least one column, e.g. {'patient': '107'}.")
    mask = np.ones(adata.n_obs, dtype=bool)
    for key, values in covariates.items():
        check_obs_column(adata, key, "covariates")
        column = adata.obs[key].astype(str).to_numpy()
        wanted = [str(v) for v in _as_list(values)]
        absent = [v for v in wanted if v not in set(column)]
        if absent:
            raise CellflowValueError(
                f"covariates[{key!r}] value(s) {absent} do not occur in adata.obs[{key!r}]; values present: "
                f"{format_choices(sorted(set(column)))}."
            )
        mask &= np.isin(column, wanted)
    if conditions is not None:
        obs_conditions = parse_obs_conditions(adata, perturbation_key, control)
        wanted_conditions = [parse_condition(c, control=control).label for c in _as_list(conditions)]
        mask &= np.isin(obs_conditions.labels(), wanted_conditions)
    return holdout(
        adata, mask, perturbation_key=perturbation_key, control=control, covariate_keys=tuple(covariates)
    )
