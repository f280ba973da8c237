"""From an AnnData and the model's arguments to arrays: cells, treated groups and control pools.

A *group* is the set of treated cells that share a condition (perturbations with doses) and
covariate values. Each group is paired with a *pool* of control cells: the controls with the
same covariate values (same patient, cell line, cell type). Where no control shares all of a
group's covariate values, the group falls back to the pool of all controls; this is recorded in
``groups["pool_fallback"]`` and announced with a warning, since the learned response then also
absorbs the covariate difference.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from cellflow._errors import CellflowKeyError, CellflowValueError, format_choices, user_stacklevel
from cellflow.data._conditions import COMBINATION_SEPARATOR, Condition, parse_condition
from cellflow.data._representation import _counts_verdict, _sampled_values, embedding_axes, get_representation

__all__ = ["ALL_CONTROLS", "TIME_COLUMN", "DataSpec", "ObsConditions", "PerturbationData", "check_obs_column", "parse_obs_conditions", "prepare"]

ALL_CONTROLS = "<all controls>"
TIME_COLUMN = "_time"


def check_obs_column(adata: ad.AnnData, key: str, argument: str) -> None:
    """Raise :class:`CellflowKeyError` if ``key`` is not (the string name of) an ``obs`` column."""
    if not isinstance(key, str) or key not in adata.obs.columns:
        hint = ""
        if isinstance(key, str) and key in adata.var_names:
            hint = (
                f" {key!r} is a feature (a var name) of adata: a table read with cellflow.datasets.read keeps numeric "
                f"columns as features unless named in obs_columns=[..., {key!r}]."
            )
        raise CellflowKeyError(
            f"{argument}={key!r} is not a column of adata.obs; valid choices: {format_choices(adata.obs.columns)}.{hint}"
        )


def _column_as_str(adata: ad.AnnData, key: str, argument: str) -> np.ndarray:
    column = adata.obs[key]
    missing = column.isna().to_numpy()
    if missing.any():
        raise CellflowValueError(
            f"{argument}={key!r}: {int(missing.sum())} cell(s) have a missing value (first: "
            f"{adata.obs_names[missing][:3].tolist()}); fill or drop them."
        )
    return column.astype(str).to_numpy()


@dataclass(frozen=True)
class DataSpec:
    """What a fitted model needs to know about its training data in order to predict.

    It holds no cells, only metadata, and round-trips through JSON (see :meth:`to_json`).

    Attributes
    ----------
    rep, perturbation_key, control, dose_key, covariate_keys
        The arguments the data was prepared with.
    n_features
        Dimension of the representation.
    feature_names
        Names of the features when ``rep`` is ``"X"`` or a layer, else ``None``.
    vocabulary
        Sorted perturbation names seen in training, alone or in combinations.
    max_members
        Size of the largest combination seen in training.
    covariate_values
        For each covariate key, the values seen in training (controls included).
    groups
        One row per treated group: ``condition``, ``dose``, one column per covariate key,
        ``n_cells``, ``pool`` (row of :attr:`pools`) and ``pool_fallback``.
    pools
        One row per control pool: one column per covariate key and ``n_cells``; the last row
        is the pool of all controls (covariate values ``ALL_CONTROLS``).
    numeric_dose
        Whether the dose column was numeric (predictions then report numeric doses).
    dose_format
        How a text dose column writes numbers: ``"float"`` when every treated cell's dose reads
        as Python floats (``"1.0"``, ``"1.0+0.5"``), else ``"short"`` (``"1"``, ``"1+0.5"``);
        predictions write doses the same way, so they group with the observed cells.
    time_key
        The ``obs`` column of measurement times, or ``None``. With it every group is one snapshot
        (``groups["time"]``) and the process's clock runs from the controls' time to the last one.
    time_range
        ``(origin, end)``: the controls' time and the latest treated time (``time_key`` only).
    axes
        Fingerprint of the embedding's axes (:func:`~cellflow.data.embedding_axes`) when ``rep``
        is a PCA that records them, else ``None``.
    """

    rep: str
    perturbation_key: str
    control: str
    dose_key: str | None
    covariate_keys: tuple[str, ...]
    n_features: int
    feature_names: tuple[str, ...] | None
    vocabulary: tuple[str, ...]
    max_members: int
    covariate_values: dict[str, tuple[str, ...]]
    groups: pd.DataFrame = field(repr=False)
    pools: pd.DataFrame = field(repr=False)
    numeric_dose: bool = False
    time_key: str | None = None
    time_range: tuple[float, float] | None = None
    dose_format: str = "short"
    axes: str | None = None

    def clock(self, time: float | np.ndarray) -> np.ndarray:
        """Times in ``time_key`` units -> the process's clock in ``[0, 1]`` (0 = the controls)."""
        origin, end = self.time_range
        return (np.asarray(time, np.float64) - origin) / (end - origin)

    @cached_property
    def group_conditions(self) -> list[Condition]:
        """The parsed condition of every group, in group order."""
        return [
            parse_condition(c, d, control=self.control)
            for c, d in zip(self.groups["condition"], self.groups["dose"])
        ]

    @cached_property
    def group_covariates(self) -> list[tuple[str, ...]]:
        """The covariate values of every group, in group order."""
        return [tuple(map(str, row)) for row in self.groups[list(self.covariate_keys)].to_numpy()]

    def to_json(self) -> str:
        payload = {
            "rep": self.rep,
            "perturbation_key": self.perturbation_key,
            "control": self.control,
            "dose_key": self.dose_key,
            "covariate_keys": list(self.covariate_keys),
            "n_features": self.n_features,
            "feature_names": None if self.feature_names is None else list(self.feature_names),
            "vocabulary": list(self.vocabulary),
            "max_members": self.max_members,
            "covariate_values": {k: list(v) for k, v in self.covariate_values.items()},
            "groups": self.groups.to_dict(orient="list"),
            "pools": self.pools.to_dict(orient="list"),
            "numeric_dose": self.numeric_dose,
            "dose_format": self.dose_format,
            "time_key": self.time_key,
            "time_range": None if self.time_range is None else list(self.time_range),
            "axes": self.axes,
        }
        return json.dumps(payload)

    @classmethod
    def from_json(cls, text: str) -> DataSpec:
        p = json.loads(text)
        return cls(
            rep=p["rep"],
            perturbation_key=p["perturbation_key"],
            control=p["control"],
            dose_key=p["dose_key"],
            covariate_keys=tuple(p["covariate_keys"]),
            n_features=int(p["n_features"]),
            feature_names=None if p["feature_names"] is None else tuple(p["feature_names"]),
            vocabulary=tuple(p["vocabulary"]),
            max_members=int(p["max_members"]),
            covariate_values={k: tuple(v) for k, v in p["covariate_values"].items()},
            groups=pd.DataFrame(p["groups"]),
            pools=pd.DataFrame(p["pools"]),
            numeric_dose=bool(p.get("numeric_dose", False)),
            dose_format=p.get("dose_format", "short"),
            time_key=p.get("time_key"),
            time_range=None if p.get("time_range") is None else tuple(map(float, p["time_range"])),
            axes=p.get("axes"),
        )


@dataclass(frozen=True)
class PerturbationData:
    """Prepared training data: the cells, and the indices of each group and control pool.

    Attributes
    ----------
    spec
        Metadata (see :class:`DataSpec`).
    cells
        ``(n_cells, n_features)`` float32, every cell of the AnnData in ``spec.rep``.
    group_index
        For each group, the indices (into ``cells``) of its treated cells.
    pool_index
        For each pool, the indices of its control cells.
    partners
        With ``pair_key``: for every cell the index of the control cell it descends from, or -1.
    """

    spec: DataSpec
    cells: np.ndarray = field(repr=False)
    group_index: tuple[np.ndarray, ...] = field(repr=False)
    pool_index: tuple[np.ndarray, ...] = field(repr=False)
    partners: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_groups(self) -> int:
        return len(self.group_index)

    def source_cells(self, group: int) -> np.ndarray:
        """``(n, d)`` control cells paired with ``group``."""
        return self.cells[self.pool_index[int(self.spec.groups["pool"].iloc[group])]]

    def target_cells(self, group: int) -> np.ndarray:
        """``(n, d)`` treated cells of ``group``."""
        return self.cells[self.group_index[group]]


def _warn_if_counts(cells: np.ndarray, rep: str) -> None:
    """Warn when a row sample of ``cells`` looks like raw counts: non-negative integers above 1."""
    values = _sampled_values(cells)
    verdict, evidence = _counts_verdict(values)
    if verdict and values.max() > 1:
        warnings.warn(
            f"rep={rep!r} looks like raw counts ({evidence}). Every method "
            "moves cells in the space it is given: in raw counts library size dominates the distances, and "
            "predictions are not counts (they can be negative or fractional). Log-normalise first "
            "(cellflow.pp.log_normalize) and usually reduce the genes (cellflow.pp.pca, then rep='X_pca').",
            UserWarning,
            stacklevel=user_stacklevel(),
        )


def prepare(
    adata: ad.AnnData,
    *,
    rep: str = "X",
    perturbation_key: str = "condition",
    control: str = "control",
    dose_key: str | None = None,
    covariate_keys: Sequence[str] = (),
    time_key: str | None = None,
    pair_key: str | None = None,
    warn_fallback: bool = True,
) -> PerturbationData:
    """Validate an AnnData and turn it into :class:`PerturbationData`.

    Parameters
    ----------
    adata
        Control and perturbed cells. Not modified.
    rep
        ``"X"``, an ``obsm`` key or a layer.
    perturbation_key
        ``obs`` column of perturbation labels; combinations are members joined by ``"+"``.
    control
        Value of ``perturbation_key`` marking control cells.
    dose_key
        Optional ``obs`` column of doses: a number, or numbers joined by ``"+"`` aligned with the
        combination's members. Without it every member has dose 1.
    covariate_keys
        ``obs`` columns the response depends on (patient, cell line, cell type).
    time_key
        Optional ``obs`` column of measurement times (numbers, or text spelling them). Treated
        cells then form one group per condition, covariates and time (a snapshot); the controls
        are the process's start and must be at the earliest time (controls measured later are
        not used, with a warning).
    pair_key
        Optional ``obs`` column naming, for every treated cell, the control cell it is known to
        descend from (its ``obs_name``; lineage barcodes, repeated imaging). Only methods that
        learn from aligned pairs use it.
    warn_fallback
        Warn when a treated group has no control cells with its covariate values.

    Returns
    -------
    The prepared data.

    Raises
    ------
    CellflowKeyError
        Unknown ``rep`` or a missing ``obs`` column.
    CellflowValueError
        Absent control value, NaN/inf cells, unparsable or misaligned doses, no treated cells.
    """
    if not isinstance(adata, ad.AnnData):
        raise CellflowValueError(f"adata must be an AnnData, got {type(adata).__name__}.")
    if adata.n_obs == 0:
        raise CellflowValueError("adata has no cells.")
    covariate_keys = (covariate_keys,) if isinstance(covariate_keys, str) else tuple(covariate_keys)
    conditions = parse_obs_conditions(adata, perturbation_key, control, dose_key)
    for key in covariate_keys:
        check_obs_column(adata, key, "covariate_keys")
    if perturbation_key in covariate_keys or (dose_key is not None and dose_key in covariate_keys):
        raise CellflowValueError(
            f"covariate_keys={list(covariate_keys)!r} must not contain the perturbation or dose column."
        )
    cells = get_representation(adata, rep)
    _warn_if_counts(cells, rep)

    control = str(control)
    times, time_range = None, None
    if time_key is not None:
        times, time_range = _snapshot_times(adata, time_key, conditions.is_control, (perturbation_key, dose_key, *covariate_keys))
    condition_label = conditions.labels()
    dose_label = np.array([c.dose_label for c in conditions.unique], dtype=object)[conditions.codes]
    is_control = conditions.is_control
    parsed = conditions.unique
    if is_control.all():
        raise CellflowValueError(
            f"adata.obs[{perturbation_key!r}] holds only control cells ({control!r}); nothing to learn."
        )

    covariates = {key: _column_as_str(adata, key, "covariate_keys") for key in covariate_keys}
    table = pd.DataFrame({"condition": condition_label, "dose": dose_label, **covariates})
    if times is not None:
        table[TIME_COLUMN] = times
        late_controls = is_control & (times > time_range[0])
        if late_controls.any():
            warnings.warn(
                f"time_key={time_key!r}: {int(late_controls.sum())} control cell(s) were measured after the "
                f"earliest control time {time_range[0]:g}; the process starts from the earliest controls, so "
                f"these are not used.",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
            # ``table`` keeps its row positions as index, so dropping rows keeps indices into ``cells``.
            table = table[~late_controls]
            is_control = is_control[~late_controls]

    # ``table`` has a RangeIndex, so the index of any subset holds row positions into ``cells``.
    pools, pool_index, pool_lookup = _control_pools(table[is_control], covariate_keys)

    treated = table[~is_control]
    treated_rows = treated.index.to_numpy()
    group_keys = ["condition", "dose", *covariate_keys, *([TIME_COLUMN] if times is not None else [])]
    group_codes = treated.groupby(group_keys, sort=True, observed=True).ngroup().to_numpy()
    order = np.argsort(group_codes, kind="stable")
    boundaries = np.flatnonzero(np.diff(group_codes[order])) + 1
    group_index = tuple(treated_rows[chunk] for chunk in np.split(order, boundaries))
    first_rows = [int(chunk[0]) for chunk in np.split(order, boundaries)]
    groups = treated.iloc[first_rows].reset_index(drop=True)
    groups["n_cells"] = [len(idx) for idx in group_index]
    cov_tuples = [tuple(row) for row in groups[list(covariate_keys)].to_numpy()]
    all_pool = len(pools) - 1
    groups["pool"] = [pool_lookup.get(t, all_pool) for t in cov_tuples]
    groups["pool_fallback"] = [bool(covariate_keys) and t not in pool_lookup for t in cov_tuples]
    if warn_fallback and groups["pool_fallback"].any():
        fallback = groups[groups["pool_fallback"]]
        warnings.warn(
            f"{len(fallback)} treated group(s) have no control cells with the same covariate values "
            f"{list(covariate_keys)} (e.g. {fallback[list(covariate_keys)].iloc[0].tolist()}); they are paired "
            f"with all control cells instead.",
            UserWarning,
            stacklevel=user_stacklevel(),
        )

    members = sorted({m for c in parsed for m in c.members})
    feature_names = tuple(map(str, adata.var_names)) if (rep == "X" or rep in adata.layers) and rep not in adata.obsm else None
    spec = DataSpec(
        rep=rep,
        perturbation_key=perturbation_key,
        control=control,
        dose_key=dose_key,
        covariate_keys=covariate_keys,
        n_features=int(cells.shape[1]),
        feature_names=feature_names,
        vocabulary=tuple(members),
        max_members=max(len(c) for c in parsed),
        covariate_values={k: tuple(sorted(set(v))) for k, v in covariates.items()},
        groups=groups,
        pools=pools,
        numeric_dose=dose_key is not None and pd.api.types.is_numeric_dtype(adata.obs[dose_key]),
        time_key=time_key,
        time_range=time_range,
        dose_format=_dose_format(adata.obs[dose_key][~conditions.is_control]) if dose_key is not None else "short",
        axes=embedding_axes(adata, rep),
    )
    partners = None
    if pair_key is not None:
        if time_key is not None:
            raise CellflowValueError("pair_key and time_key cannot be combined yet; give one of them.")
        partners = _partners(adata, pair_key, conditions.is_control)
    return PerturbationData(spec=spec, cells=cells, group_index=group_index, pool_index=pool_index, partners=partners)


@dataclass(frozen=True)
class ObsConditions:
    """The parsed condition of every cell: ``unique[codes[i]]`` is cell ``i``'s condition."""

    unique: list[Condition]
    codes: np.ndarray

    @property
    def is_control(self) -> np.ndarray:
        return np.array([c.is_control for c in self.unique], dtype=bool)[self.codes]

    def labels(self) -> np.ndarray:
        return np.array([c.label for c in self.unique], dtype=object)[self.codes]


#: Perturbation labels that are missing values turned into text.
_MISSING_TEXT = frozenset({"nan", "none", "<na>", "null"})


def parse_obs_conditions(adata: ad.AnnData, perturbation_key: str, control: str, dose_key: str | None = None) -> ObsConditions:
    """Parse ``adata.obs[perturbation_key]`` (and doses) into conditions, validating columns and control.

    Raises
    ------
    CellflowKeyError
        A missing column.
    CellflowValueError
        Missing labels, an absent control value, unparsable or misaligned doses.
    """
    check_obs_column(adata, perturbation_key, "perturbation_key")
    if dose_key is not None:
        check_obs_column(adata, dose_key, "dose_key")
    labels = _column_as_str(adata, perturbation_key, "perturbation_key")
    control = str(control)
    if not (labels == control).any():
        raise CellflowValueError(
            f"control={control!r} does not occur in adata.obs[{perturbation_key!r}]; values present: "
            f"{format_choices(sorted(set(labels)))}."
        )
    look_alikes = sorted(v for v in set(labels) if v.strip() != control and v.strip().lower() == control.lower())
    if look_alikes:
        warnings.warn(
            f"adata.obs[{perturbation_key!r}] holds {format_choices(look_alikes)}, which differ from control={control!r} "
            "only in case, so they are treated as a perturbation; rename them if they are control cells.",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    doses = adata.obs[dose_key].to_numpy() if dose_key is not None else np.full(adata.n_obs, None, dtype=object)
    # Parse each distinct (label, dose) pair once: tables have millions of cells but few conditions.
    codes, first = _factorize_pairs(labels, doses)
    unique = []
    for code, i in enumerate(first):
        try:
            unique.append(parse_condition(labels[i], doses[i], control=control, dose_key=dose_key))
        except CellflowValueError as error:
            cells = adata.obs_names[codes == code]
            raise CellflowValueError(
                f"adata.obs[{perturbation_key!r}] of {len(cells)} cell(s) (first: {cells[:3].tolist()}): {error}"
            ) from None
    if dose_key is not None:
        for code, condition in enumerate(unique):
            if not condition.is_control and not all(np.isfinite(d) and d > 0 for d in condition.doses):
                cells = adata.obs_names[codes == code]
                raise CellflowValueError(
                    f"dose_key={dose_key!r}: {len(cells)} cell(s) of {condition.label!r} (first: {cells[:3].tolist()}) have "
                    f"dose {adata.obs[dose_key].iloc[first[code]]!r}; a treated cell's doses must be positive concentrations "
                    "(no treatment is the control; if the column holds log doses, give 10 ** dose)."
                )
    missing_like = sorted(v for v in set(labels) if v.strip().lower() in _MISSING_TEXT)
    if missing_like:
        warnings.warn(
            f"adata.obs[{perturbation_key!r}] holds {format_choices(missing_like)}, which reads like a missing value "
            "written as text (e.g. by .astype(str)); it is treated as a perturbation. Drop those cells, or keep "
            "the column's missing values as NaN, which are refused with the cells named.",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    conditions = ObsConditions(unique, codes)
    if dose_key is not None:
        # a treated cell without a dose would silently join (or invent) the default-dose group
        undosed = adata.obs[dose_key].isna().to_numpy() & ~conditions.is_control
        if undosed.any():
            raise CellflowValueError(
                f"dose_key={dose_key!r}: {int(undosed.sum())} treated cell(s) have a missing dose (first: "
                f"{adata.obs_names[undosed][:3].tolist()}); fill or drop them (control cells may have none)."
            )
    return conditions


def _dose_format(doses: pd.Series) -> str:
    """``"float"`` if every distinct dose text reads as Python floats (``"1.0+0.5"``), else ``"short"``."""
    if pd.api.types.is_numeric_dtype(doses):
        return "short"
    for text in pd.unique(doses.dropna().astype(str)):
        try:
            if any(part.strip() != repr(float(part)) for part in text.split(COMBINATION_SEPARATOR)):
                return "short"
        except ValueError:
            return "short"
    return "float"


def _factorize_pairs(labels: np.ndarray, doses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes of distinct (label, dose) pairs per cell, and the first cell of each pair."""
    keys = pd.Series(labels).str.cat(pd.Series(doses, dtype=object).map(repr), sep="\x1f")
    codes, uniques = pd.factorize(keys, sort=False)
    first = np.full(len(uniques), -1, dtype=np.int64)
    seen = np.unique(codes, return_index=True)
    first[seen[0]] = seen[1]
    return codes, first


def _control_pools(
    controls: pd.DataFrame, covariate_keys: tuple[str, ...]
) -> tuple[pd.DataFrame, tuple[np.ndarray, ...], dict[tuple[str, ...], int]]:
    """Control pools per covariate value combination, plus a last pool of all controls."""
    indices: list[np.ndarray] = []
    records: list[dict[str, Any]] = []
    lookup: dict[tuple[str, ...], int] = {}
    if covariate_keys:
        for values, frame in controls.groupby(list(covariate_keys), sort=True, observed=True):
            values = values if isinstance(values, tuple) else (values,)
            lookup[tuple(values)] = len(indices)
            indices.append(frame.index.to_numpy())
            records.append({**dict(zip(covariate_keys, values)), "n_cells": len(frame)})
    indices.append(controls.index.to_numpy())
    records.append({**{k: ALL_CONTROLS for k in covariate_keys}, "n_cells": len(controls)})
    return pd.DataFrame.from_records(records), tuple(indices), lookup


def _snapshot_times(
    adata: ad.AnnData, time_key: str, is_control: np.ndarray, other_keys: Sequence[str | None]
) -> tuple[np.ndarray, tuple[float, float]]:
    """Validated float times of every cell and the clock's ``(origin, end)``."""
    check_obs_column(adata, time_key, "time_key")
    if time_key in other_keys:
        raise CellflowValueError(
            f"time_key={time_key!r} must differ from the perturbation, dose and covariate columns."
        )
    column = adata.obs[time_key]
    if pd.api.types.is_bool_dtype(column):
        raise CellflowValueError(
            f"time_key={time_key!r} must be a numeric obs column (e.g. hours or days); it has dtype {column.dtype}."
        )
    if pd.api.types.is_numeric_dtype(column):
        times = column.to_numpy(np.float64)
    else:
        # Times written as text ("0", "24") become categorical when AnnData is saved; as doses do,
        # they are read as the numbers they spell.
        text = column.astype(str).to_numpy()
        times = pd.to_numeric(pd.Series(text), errors="coerce").to_numpy(np.float64)
        not_numbers = sorted(set(text[np.isnan(times) & ~np.isin(text, ("nan", "NaN"))]))
        if not_numbers:
            raise CellflowValueError(
                f"time_key={time_key!r} must hold numbers (e.g. hours or days); it has dtype {column.dtype} with "
                f"values that are not numbers: {format_choices(not_numbers)}."
            )
    bad = ~np.isfinite(times)
    if bad.any():
        raise CellflowValueError(
            f"time_key={time_key!r}: {int(bad.sum())} cell(s) have no finite time (first: "
            f"{adata.obs_names[bad][:3].tolist()})."
        )
    origin = float(times[is_control].min())
    treated = times[~is_control]
    early = treated <= origin
    if early.any():
        raise CellflowValueError(
            f"time_key={time_key!r}: {int(early.sum())} treated cell(s) are at or before the controls' time "
            f"{origin:g} (first: {adata.obs_names[~is_control][early][:3].tolist()}); with a time course the "
            f"controls are the start of the process and every treated snapshot comes later."
        )
    return times, (origin, float(treated.max()))


def _partners(adata: ad.AnnData, pair_key: str, is_control: np.ndarray) -> np.ndarray:
    """Row of each treated cell's named control partner (-1 for controls)."""
    check_obs_column(adata, pair_key, "pair_key")
    named = adata.obs[pair_key].to_numpy()
    rows = pd.Index(adata.obs_names).get_indexer(pd.Series(named[~is_control]).astype(str))
    missing = rows < 0
    if missing.any():
        raise CellflowValueError(
            f"pair_key={pair_key!r}: {int(missing.sum())} treated cell(s) name no cell of adata (first: "
            f"{adata.obs_names[~is_control][missing][:3].tolist()} -> {named[~is_control][missing][:3].tolist()}); "
            f"every treated cell must name the obs_name of its control cell."
        )
    not_control = ~is_control[rows]
    if not_control.any():
        raise CellflowValueError(
            f"pair_key={pair_key!r}: {int(not_control.sum())} treated cell(s) name a partner that is not a control "
            f"cell (first: {adata.obs_names[~is_control][not_control][:3].tolist()})."
        )
    partners = np.full(adata.n_obs, -1, np.int64)
    partners[~is_control] = rows
    return partners
