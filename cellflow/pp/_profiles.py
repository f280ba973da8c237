"""Image-based profiles: plate normalisation against controls, feature selection, aggregation.

Morphological profiles (CellProfiler features, or embeddings of a ViT-MAE / DINO / SimCLR
encoder) carry strong plate and batch effects, and their features come in unrelated units.
The field's answer, followed here:

1. :func:`normalize_plates`: on each plate, centre and scale every feature on that plate's
   negative-control wells (robust z-score by default); optionally whiten on the controls
   (sphering / typical-variation normalisation), so that the typical untreated variation is
   isotropic and treatment effects are measured against it.
2. :func:`select_features`: drop features that are non-finite, near-constant or redundant
   (highly correlated with a feature already kept).
3. :func:`aggregate`: cells to wells, wells to treatments (median or mean).

Every function returns a new AnnData and records what it did in ``uns``. Each reads ``rep``
(``"X"``, a layer or an ``obsm`` key) and writes its result to ``X`` of the returned AnnData, so
the steps chain with the default ``rep="X"``. The returned ``var`` describes the columns that
were read: the input's ``var`` rows for ``X`` or a layer; for an ``obsm`` key (e.g. image-encoder
embeddings), the entry's column names if it is a DataFrame, else ``f"{rep}_{j}"`` for its column
``j`` (see :func:`cellflow.pp._features.feature_table`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from cellflow._errors import CellflowValueError, format_choices
from cellflow.data._dataset import check_obs_column
from cellflow.data._representation import get_representation
from cellflow.pp._features import feature_table

__all__ = ["NORMALIZATION_METHODS", "normalize_plates", "select_features", "aggregate"]

#: Methods of :func:`normalize_plates`.
NORMALIZATION_METHODS: tuple[str, ...] = ("robust_z", "z", "tvn", "sphering")

# 1.4826 * MAD estimates the standard deviation of a normal distribution
_MAD_TO_STD = 1.4826


def _control_mask(adata: ad.AnnData, perturbation_key: str, control: Any) -> np.ndarray:
    values = adata.obs[perturbation_key].astype(str)
    controls = [str(control)] if isinstance(control, str | int | float) else [str(c) for c in control]
    mask = values.isin(controls).to_numpy()
    if not mask.any():
        raise CellflowValueError(
            f"control={control!r} marks no row of adata.obs[{perturbation_key!r}]; values present: "
            f"{format_choices(sorted(values.unique()))}."
        )
    return mask


def _centre_scale(values: np.ndarray, robust: bool) -> tuple[np.ndarray, np.ndarray]:
    """Location and scale of each column: median and 1.4826 MAD, or mean and standard deviation."""
    if robust:
        centre = np.median(values, axis=0)
        return centre, _MAD_TO_STD * np.median(np.abs(values - centre), axis=0)
    return values.mean(axis=0), values.std(axis=0)


def _whitening(controls: np.ndarray, regularization: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean and whitening matrix of the control rows (ZCA of their correlation), shrunk towards isotropy.

    ``W = diag(1/s) V diag((lambda + r * mean(lambda))^-1/2) V^T``, with ``s`` the controls'
    standard deviations and ``V``, ``lambda`` the eigen-decomposition of their correlation: with
    fewer controls than features the covariance is singular, and an absolute epsilon would blow
    up directions in which controls happen not to vary; a floor relative to the mean eigenvalue
    keeps them at a sane scale. The correlation, not the covariance, so that the floor is the same
    whatever the features' units: on raw CellProfiler features a few in the thousands set the
    mean eigenvalue of the covariance, and the floor then whitened nothing else (BBBC021, raw
    features: MoA mAP 0.62, against 0.84 after a z-score).
    """
    mean = controls.mean(axis=0)
    centred = controls - mean
    spread = centred.std(axis=0, ddof=1) if controls.shape[0] > 1 else np.ones(controls.shape[1])
    spread = np.where(spread > 0, spread, 1.0)
    standardised = centred / spread
    correlation = standardised.T @ standardised / max(controls.shape[0] - 1, 1)
    eigenvalues, eigenvectors = np.linalg.eigh(correlation)
    eigenvalues = np.maximum(eigenvalues, 0.0)
    floor = regularization * max(float(eigenvalues.mean()), np.finfo(np.float64).tiny)
    scale = 1.0 / np.sqrt(eigenvalues + floor)
    return mean, ((eigenvectors * scale) @ eigenvectors.T) / spread[:, None]


def normalize_plates(
    adata: ad.AnnData,
    plate_key: str = "plate",
    control: Any = "DMSO",
    perturbation_key: str = "compound",
    method: str = "robust_z",
    *,
    rep: str = "X",
    min_controls: int = 2,
    scale_floor: float = 0.5,
    regularization: float = 0.1,
) -> ad.AnnData:
    """Normalise profiles plate by plate against the negative-control wells.

    Parameters
    ----------
    adata
        Profiles (wells or cells) with a plate column; not modified.
    plate_key
        ``obs`` column naming each row's plate (or batch).
    control
        Value (or list of values) of ``perturbation_key`` for the negative controls.
    perturbation_key
        ``obs`` column of the treatment.
    method
        One of :data:`NORMALIZATION_METHODS`:

        * ``"robust_z"`` (default): per plate, ``(x - median_c) / (1.4826 MAD_c)``, the
          median and median absolute deviation taken over the plate's control rows;
        * ``"z"``: per plate, ``(x - mean_c) / std_c`` over the control rows;
        * ``"sphering"``: no plate step; centre on all controls and whiten with the
          controls' correlation (ZCA-cor), so control variation becomes isotropic whatever
          the features' units;
        * ``"tvn"``: typical-variation normalisation (Ando et al. 2017): ``"robust_z"`` per
          plate, then sphering fitted on the normalised controls of all plates.
    rep
        ``"X"``, a layer or an ``obsm`` key holding the profiles.
    min_controls
        Each plate needs at least this many control rows (plate-wise methods).
    scale_floor
        Plate-wise methods: a plate's scale of a feature is at least ``scale_floor`` times that
        feature's scale over all control rows. A scale estimated from a handful of control
        wells is noisy (BBBC021 has 6 per plate), and a plate whose controls happen to agree
        would otherwise blow the feature up on that plate. ``0`` disables the floor.
    regularization
        Sphering: eigenvalues of the control covariance are raised by ``regularization``
        times their mean before inversion (needed when there are fewer controls than
        features; smaller whitens harder).

    Returns
    -------
    anndata.AnnData
        ``X`` the normalised profiles (float32) whatever ``rep`` was, the input's ``obs`` and
        ``uns``, and a ``var`` row per kept feature: the input's ``var`` rows for ``X`` or a layer;
        for an ``obsm`` key, the entry's column names (DataFrame) or ``f"{rep}_{j}"``, ``j`` the
        column in ``obsm[rep]``. Features constant over all control rows are dropped (they have
        no scale); ``uns["normalize_plates"]`` records the method, keys, ``rep`` and the dropped
        features (by those names).

    Raises
    ------
    CellflowKeyError
        A key that is not an ``obs`` column (the message lists them).
    CellflowValueError
        An unknown ``method``; ``control`` matching nothing; a plate with fewer than
        ``min_controls`` control rows (the message names the plates); non-finite profiles.

    Examples
    --------
    >>> wells = cf.pp.normalize_plates(adata, plate_key="plate", control="DMSO",
    ...                                perturbation_key="compound", method="robust_z")
    """
    if method not in NORMALIZATION_METHODS:
        raise CellflowValueError(f"method={method!r} is not supported; valid choices: {format_choices(NORMALIZATION_METHODS)}.")
    check_obs_column(adata, perturbation_key, "perturbation_key")
    plate_wise = method in ("robust_z", "z", "tvn")
    if plate_wise:
        check_obs_column(adata, plate_key, "plate_key")
    for name, value in (("scale_floor", scale_floor), ("regularization", regularization)):
        if not np.isfinite(value) or value < 0:
            raise CellflowValueError(f"{name} must be a finite number >= 0, got {value!r}.")
    if method in ("tvn", "sphering") and regularization <= 0:
        raise CellflowValueError(f"regularization must be > 0 for method={method!r}, got {regularization!r}.")
    is_control = _control_mask(adata, perturbation_key, control)
    values = get_representation(adata, rep, dtype=np.float64)
    features = feature_table(adata, rep)

    # features with no spread over the controls cannot be scaled against them
    robust = method in ("robust_z", "tvn")
    _, global_scale = _centre_scale(values[is_control], robust=robust)
    keep = global_scale > 0
    if not keep.any():
        raise CellflowValueError(f"every feature of rep={rep!r} is constant over the control rows; nothing to normalise.")
    values, global_scale = values[:, keep], global_scale[keep]

    if plate_wise:
        plates = adata.obs[plate_key].astype(str).to_numpy()
        counts = pd.Series(plates[is_control]).value_counts()
        short = sorted(p for p in set(plates) if counts.get(p, 0) < min_controls)
        if short:
            raise CellflowValueError(
                f"plates {format_choices(short)} of adata.obs[{plate_key!r}] have fewer than min_controls={min_controls} "
                f"control rows ({perturbation_key}={control!r}); drop them or use method='sphering'."
            )
        out = np.empty_like(values)
        for plate in dict.fromkeys(plates):
            rows = plates == plate
            centre, scale = _centre_scale(values[rows & is_control], robust=robust)
            scale = np.maximum(scale, scale_floor * global_scale)
            out[rows] = (values[rows] - centre) / np.where(scale > 0, scale, 1.0)
        values = out
    if method in ("tvn", "sphering"):
        mean, whitening = _whitening(values[is_control], regularization)
        values = (values - mean) @ whitening

    var = features.iloc[np.flatnonzero(keep)].copy()
    result = ad.AnnData(X=values.astype(np.float32), obs=adata.obs.copy(), var=var, uns=copy.deepcopy(dict(adata.uns)))
    result.uns["normalize_plates"] = {
        "method": method,
        "plate_key": plate_key if plate_wise else None,
        "perturbation_key": perturbation_key,
        "control": [str(c) for c in np.atleast_1d(np.asarray(control, dtype=object))],
        "rep": rep,
        "dropped_features": [str(v) for v in features.index[~keep]],
    }
    return result


def select_features(
    adata: ad.AnnData,
    *,
    rep: str = "X",
    min_std: float = 1e-6,
    unique_cut: float = 0.01,
    freq_cut: float = 0.05,
    corr_threshold: float | None = 0.9,
    subset: np.ndarray | None = None,
) -> ad.AnnData:
    """Drop non-finite, near-constant and redundant features (pycytominer's rules).

    Parameters
    ----------
    adata
        Profiles; not modified.
    rep
        ``"X"``, a layer or an ``obsm`` key holding the features.
    min_std
        Features whose standard deviation is at most this are near-constant.
    unique_cut, freq_cut
        A feature is also near-constant when it has few distinct values (at most
        ``unique_cut`` times the number of rows) *and* its second most frequent value is
        rare next to the most frequent (count ratio at most ``freq_cut``).
    corr_threshold
        Greedy decorrelation: features are visited from the least to the most redundant (mean
        absolute correlation with the others); each is kept unless its absolute Pearson
        correlation with a feature already kept exceeds this. ``None`` skips the step.
    subset
        Optional boolean mask or indices of the rows to compute the statistics on (e.g. the
        control wells); all rows are returned.

    Returns
    -------
    anndata.AnnData
        The kept features only in ``X`` (float32) whatever ``rep`` was, ``obs`` copied, and a
        ``var`` row per kept feature: the input's ``var`` rows for ``X`` or a layer; for an
        ``obsm`` key, the entry's column names (DataFrame) or ``f"{rep}_{j}"``, ``j`` the column
        in ``obsm[rep]``. ``uns["select_features"]`` records ``rep`` and maps each dropped
        feature (by those names) to its reason under ``"dropped"``: ``"non_finite"``,
        ``"near_constant"`` or ``"correlated:<kept feature>"``. Every function here copies the
        input's ``uns`` and adds its own record, so the provenance of a profile table
        accumulates.
    """
    if corr_threshold is not None and not 0 < corr_threshold <= 1:
        raise CellflowValueError(f"corr_threshold must be in (0, 1] or None, got {corr_threshold!r}.")
    values = get_representation(adata, rep, dtype=np.float64, check=False)
    features = feature_table(adata, rep)
    rows = np.arange(adata.n_obs) if subset is None else np.asarray(subset)
    stats = values[rows]
    if stats.shape[0] < 2:
        raise CellflowValueError(f"select_features needs at least 2 rows to compute statistics on, got {stats.shape[0]}.")
    names = [str(v) for v in features.index]
    reasons: dict[str, str] = {}
    finite = np.isfinite(values).all(axis=0)
    for j in np.flatnonzero(~finite):
        reasons[names[j]] = "non_finite"
    near_constant = np.zeros(values.shape[1], dtype=bool)
    for j in np.flatnonzero(finite):
        column = stats[:, j]
        if column.std() <= min_std:
            near_constant[j] = True
            continue
        _, counts = np.unique(column, return_counts=True)
        if counts.size / column.size <= unique_cut and counts.size > 1:
            top = np.sort(counts)[::-1]
            near_constant[j] = top[1] / top[0] <= freq_cut
    for j in np.flatnonzero(near_constant):
        reasons[names[j]] = "near_constant"
    candidates = np.flatnonzero(finite & ~near_constant)
    keep = list(candidates)
    if corr_threshold is not None and candidates.size > 1:
        corr = np.abs(np.corrcoef(stats[:, candidates], rowvar=False))
        np.fill_diagonal(corr, 0.0)
        order = np.argsort(corr.mean(axis=0), kind="stable")
        kept_local: list[int] = []
        for i in order:
            redundant = [k for k in kept_local if corr[i, k] > corr_threshold]
            if redundant:
                reasons[names[candidates[i]]] = f"correlated:{names[candidates[redundant[0]]]}"
            else:
                kept_local.append(int(i))
        keep = sorted(candidates[kept_local].tolist())
    if not keep:
        raise CellflowValueError("select_features dropped every feature; relax min_std, freq_cut or corr_threshold.")
    result = ad.AnnData(
        X=values[:, keep].astype(np.float32),
        obs=adata.obs.copy(),
        var=features.iloc[keep].copy(),
        uns=copy.deepcopy(dict(adata.uns)),
    )
    result.uns["select_features"] = {"rep": rep, "dropped": reasons}
    return result


def aggregate(
    adata: ad.AnnData,
    by: str | Sequence[str],
    *,
    method: str = "median",
    rep: str = "X",
) -> ad.AnnData:
    """Aggregate rows (cells to wells, wells to treatments) by the values of ``obs`` columns.

    Parameters
    ----------
    adata
        Profiles; not modified.
    by
        ``obs`` column(s) whose value combination defines a group, e.g. ``["plate", "well"]``
        for cells to wells or ``["compound", "concentration"]`` for wells to treatments.
    method
        ``"median"`` (default, robust to outlier rows) or ``"mean"``.
    rep
        ``"X"``, a layer or an ``obsm`` key holding the profiles.

    Returns
    -------
    anndata.AnnData
        One row per group, in order of first appearance: ``X`` the aggregated profiles
        (float32) whatever ``rep`` was; ``obs`` the ``by`` columns, every other ``obs`` column
        that is constant within each group (e.g. the mechanism of action), and
        ``n_aggregated``; ``var`` the input's ``var`` for ``X`` or a layer, and for an ``obsm``
        key the entry's column names (DataFrame) or ``f"{rep}_{j}"``.
    """
    methods = ("median", "mean")
    if method not in methods:
        raise CellflowValueError(f"method={method!r} is not supported; valid choices: {format_choices(methods)}.")
    columns = [by] if isinstance(by, str) else list(by)
    if not columns:
        raise CellflowValueError("by must name at least one obs column.")
    for column in columns:
        check_obs_column(adata, column, "by")
    values = get_representation(adata, rep, dtype=np.float64)
    var = feature_table(adata, rep)
    obs = adata.obs.reset_index(drop=True)
    # codes number the groups in order of first appearance, so group g starts at first_rows[g]
    codes = obs.groupby(columns, sort=False, observed=True, dropna=False).ngroup().to_numpy()
    _, first_rows = np.unique(codes, return_index=True)
    n_groups = first_rows.size
    out = np.empty((n_groups, values.shape[1]))
    for g in range(n_groups):
        rows = values[codes == g]
        out[g] = np.median(rows, axis=0) if method == "median" else rows.mean(axis=0)
    distinct = obs.groupby(codes).nunique(dropna=False)
    constant = [c for c in obs.columns if c not in columns and (distinct[c] <= 1).all()]
    new_obs = obs.iloc[first_rows][columns + constant].reset_index(drop=True)
    for column in columns + constant:
        if isinstance(adata.obs[column].dtype, pd.CategoricalDtype):
            new_obs[column] = pd.Categorical(new_obs[column], categories=adata.obs[column].cat.categories)
    new_obs["n_aggregated"] = np.bincount(codes, minlength=n_groups)
    new_obs.index = pd.Index(["_".join(str(v) for v in row) for row in new_obs[columns].itertuples(index=False)])
    result = ad.AnnData(X=out.astype(np.float32), obs=new_obs, var=var, uns=copy.deepcopy(dict(adata.uns)))
    result.uns["aggregate"] = {"by": columns, "method": method, "rep": rep}
    return result
