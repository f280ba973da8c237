"""Profile retrieval: how well a similarity between profiles recovers shared labels.

These are the scores of the image-based profiling field (Cell Painting, CellProfiler or
foundation-encoder embeddings), phrased as information retrieval: each profile is a query;
the other profiles are ranked by similarity to it; the profiles that share its label are the
positives. The average precision (AP) of one query is the mean, over its positives, of the
precision among the candidates ranked at or above that positive; a random ranking scores
about ``n_positives / n_candidates``.

* :func:`map_retrieval`: mechanism-of-action (or any label) retrieval: mean AP over queries,
  optionally not counting profiles of the query's own compound (the usual "not same
  compound" rule, so that retrieval must reach *other* compounds with the same mechanism).
* :func:`retrieval_scores`: the same, one row per query, with precision at ``k``.
* :func:`map_retrieval_shuffled`: the label-shuffled baseline of :func:`map_retrieval`.
* :func:`phenotypic_activity`: per treatment, mAP of retrieving its replicates against
  negative-control profiles, with a permutation p-value and Benjamini-Hochberg q-value
  (a treatment is *active* when its replicates stand out from the controls).
* :func:`replicate_reproducibility`: per treatment, mAP of retrieving its replicates among
  the other treatments' profiles (are replicates more alike than different treatments?).

Everything here is small dense linear algebra and sorting on ``n_profiles x n_profiles``
similarities in float64 numpy, computed in row blocks; it never touches the training stack.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from cellflow._errors import CellflowKeyError, CellflowValueError, format_choices
from cellflow.data._dataset import check_obs_column
from cellflow.data._representation import get_representation

__all__ = [
    "SIMILARITIES",
    "average_precision",
    "retrieval_scores",
    "map_retrieval",
    "map_retrieval_shuffled",
    "phenotypic_activity",
    "replicate_reproducibility",
]

#: Similarities accepted by every retrieval function.
SIMILARITIES: tuple[str, ...] = ("cosine", "pearson", "euclidean")

_ROW_BLOCK = 1024


# --------------------------------------------------------------------------------------------
# core: similarities and average precision
# --------------------------------------------------------------------------------------------
def _check_similarity(similarity: str) -> str:
    if similarity not in SIMILARITIES:
        raise CellflowValueError(f"similarity={similarity!r} is not supported; valid choices: {format_choices(SIMILARITIES)}.")
    return similarity


def _prepare_profiles(x: np.ndarray, similarity: str) -> np.ndarray:
    """Rows transformed so that ``a @ b.T`` is the similarity (euclidean handled apart)."""
    x = np.asarray(x, dtype=np.float64)
    if similarity == "pearson":
        x = x - x.mean(axis=1, keepdims=True)
    if similarity in ("cosine", "pearson"):
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        # a zero profile (e.g. a control at the plate median) is equally dissimilar to all
        x = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    return x


def _similarity_block(queries: np.ndarray, profiles: np.ndarray, similarity: str) -> np.ndarray:
    if similarity == "euclidean":
        sq = (queries**2).sum(1)[:, None] + (profiles**2).sum(1)[None, :] - 2.0 * queries @ profiles.T
        return -np.sqrt(np.maximum(sq, 0.0))
    return queries @ profiles.T


def _rank(scores: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Column order of each row by decreasing score, candidates first."""
    ranked = np.where(candidate, scores, -np.inf)
    # stable sort on the negated score: ties keep profile order, so results are reproducible
    return np.argsort(-ranked, axis=1, kind="stable")


def _ranked_average_precision(
    order: np.ndarray, positive: np.ndarray, candidate: np.ndarray, k: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """AP of each row, given the ranking of its candidates.

    Parameters
    ----------
    order
        Ranking of :func:`_rank`, shape ``(q, n)``.
    positive, candidate
        Boolean masks of shape ``(q, n)``; positives must be candidates.
    k
        Optional cut-off per row, shape ``(q,)``, for precision at ``k``; ``None`` uses each
        row's number of positives (R-precision).

    Returns
    -------
    ap, n_positive, n_candidate, precision_at_k
        Arrays of shape ``(q,)``; ``ap`` is NaN for rows without positives.
    """
    hits = np.take_along_axis(positive & candidate, order, axis=1)
    cumulative = np.cumsum(hits, axis=1)
    ranks = np.arange(1, order.shape[1] + 1)[None, :]
    n_pos = hits.sum(axis=1)
    n_cand = candidate.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.where(hits, cumulative / ranks, 0.0).sum(axis=1) / n_pos
        k = n_pos if k is None else np.minimum(np.asarray(k), n_cand)
        at_k = np.take_along_axis(cumulative, np.maximum(k - 1, 0)[:, None], axis=1)[:, 0]
        precision_k = np.where(k > 0, at_k / np.maximum(k, 1), np.nan)
    ap = np.where(n_pos > 0, ap, np.nan)
    return ap, n_pos, n_cand, precision_k


def average_precision(scores: Any, positive: Any) -> float:
    """Average precision of ranking ``scores`` (higher first) for the boolean ``positive``.

    Equal to :func:`sklearn.metrics.average_precision_score` when scores have no ties (with
    ties, profiles keep their input order instead of being pooled). NaN without positives.

    Parameters
    ----------
    scores
        Shape ``(n,)``.
    positive
        Boolean, shape ``(n,)``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    if scores.ndim != 1 or positive.shape != scores.shape:
        raise CellflowValueError(
            f"average_precision: scores and positive must be 1-d of one length, got shapes {scores.shape} and {positive.shape}."
        )
    candidate = np.ones_like(positive)[None]
    ap, *_ = _ranked_average_precision(_rank(scores[None], candidate), positive[None], candidate)
    return float(ap[0])


def _null_average_precision(n_positive: int, n_candidate: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """AP of ``size`` uniformly random rankings with ``n_positive`` hits among ``n_candidate``."""
    keys = rng.random((size, n_candidate))
    ranks = np.sort(np.argpartition(keys, n_positive - 1, axis=1)[:, :n_positive], axis=1) + 1
    return (np.arange(1, n_positive + 1)[None, :] / ranks).mean(axis=1)


def _benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    q = np.full_like(p, np.nan)
    finite = np.isfinite(p)
    values = p[finite]
    if values.size:
        order = np.argsort(values)
        scaled = values[order] * values.size / np.arange(1, values.size + 1)
        adjusted = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
        out = np.empty_like(values)
        out[order] = adjusted
        q[finite] = out
    return q


# --------------------------------------------------------------------------------------------
# AnnData plumbing
# --------------------------------------------------------------------------------------------
def _columns(value: str | Sequence[str], name: str) -> list[str]:
    columns = [value] if isinstance(value, str) else list(value)
    if not columns or not all(isinstance(c, str) for c in columns):
        raise CellflowValueError(f"{name} must be an obs column name or a non-empty list of them, got {value!r}.")
    return columns


def _check_columns(adata: ad.AnnData, columns: Sequence[str], name: str) -> None:
    for column in columns:
        check_obs_column(adata, column, name)


def _labels(adata: ad.AnnData, columns: Sequence[str]) -> np.ndarray:
    """One integer code per row for the combination of values in ``columns``."""
    frame = adata.obs[list(columns)].astype(str)
    return frame.agg("\x1f".join, axis=1).to_numpy() if len(columns) > 1 else frame.iloc[:, 0].to_numpy()


def _as_set(values: Any) -> set[str]:
    if values is None:
        return set()
    if isinstance(values, str | int | float | np.integer | np.floating):
        return {str(values)}
    return {str(v) for v in values}


def _query_rows(
    x: np.ndarray,
    similarity: str,
    positive_fns,
    candidate_fn,
    queries: np.ndarray,
    k: np.ndarray | None,
) -> list[tuple[np.ndarray, ...]]:
    """Blocked AP for the rows ``queries``, one result per function of ``positive_fns``.

    ``*_fn(rows) -> (len(rows), n)`` boolean masks. Similarities and rankings depend only on
    the candidates, so they are computed once per block whatever the number of positive masks
    (the label permutations of :func:`map_retrieval_shuffled`).
    """
    profiles = _prepare_profiles(x, similarity)
    out = [[np.empty(queries.size) for _ in range(4)] for _ in positive_fns]
    for start in range(0, queries.size, _ROW_BLOCK):
        rows = queries[start : start + _ROW_BLOCK]
        candidate = candidate_fn(rows)
        candidate[np.arange(rows.size), rows] = False  # a query never retrieves itself
        order = _rank(_similarity_block(profiles[rows], profiles, similarity), candidate)
        block_k = None if k is None else k[start : start + _ROW_BLOCK]
        for targets, positive_fn in zip(out, positive_fns, strict=True):
            values = _ranked_average_precision(order, positive_fn(rows), candidate, block_k)
            for target, value in zip(targets, values, strict=True):
                target[start : start + rows.size] = value
    return [tuple(targets) for targets in out]


def _profiles(adata: ad.AnnData, rep: str) -> np.ndarray:
    x = get_representation(adata, rep, dtype=np.float64)
    if x.shape[0] < 2:
        raise CellflowValueError(f"retrieval needs at least 2 profiles, got {x.shape[0]}.")
    return x


# --------------------------------------------------------------------------------------------
# label retrieval (mechanism of action)
# --------------------------------------------------------------------------------------------
def _label_retrieval_setup(adata, label_key, rep, exclude, exclude_same, similarity):
    """Validated profiles, labels, query rows and candidate rule of label retrieval."""
    _check_similarity(similarity)
    _check_columns(adata, [label_key], "label_key")
    same_columns = [] if exclude_same is None else _columns(exclude_same, "exclude_same")
    _check_columns(adata, same_columns, "exclude_same")
    labels = adata.obs[label_key].astype(str).to_numpy()
    excluded = _as_set(exclude)
    unknown = excluded - set(labels)
    if unknown:
        raise CellflowKeyError(
            f"exclude={sorted(unknown)} not found in adata.obs[{label_key!r}]; values present: "
            f"{format_choices(sorted(set(labels)))}. Pass exclude=() if there is nothing to leave out."
        )
    x = _profiles(adata, rep)
    kept = ~np.isin(labels, list(excluded))
    groups = _labels(adata, same_columns) if same_columns else None

    def candidate(rows: np.ndarray) -> np.ndarray:
        mask = np.broadcast_to(kept, (rows.size, kept.size)).copy()
        if groups is not None:
            mask &= groups[rows][:, None] != groups[None, :]
        return mask

    return x, labels, np.flatnonzero(kept), candidate


def _mean_average_precision(ap: np.ndarray, labels: np.ndarray, average: str) -> float:
    """mAP over queries with a positive (``ap`` not NaN), by query or by label."""
    found = ~np.isnan(ap)
    if not found.any():
        return float("nan")
    if average == "label":
        return float(pd.Series(ap[found]).groupby(labels[found]).mean().mean())
    return float(ap[found].mean())


def _check_average(average: str) -> None:
    averages = ("query", "label")
    if average not in averages:
        raise CellflowValueError(f"average={average!r} is not supported; valid choices: {format_choices(averages)}.")


def retrieval_scores(
    adata: ad.AnnData,
    label_key: str = "moa",
    rep: str = "X",
    exclude: Sequence[Any] | Any = (),
    *,
    exclude_same: str | Sequence[str] | None = None,
    similarity: str = "cosine",
    k: int | None = None,
) -> pd.DataFrame:
    """Average precision of retrieving same-label profiles, one row per query profile.

    Parameters
    ----------
    adata
        Profiles, e.g. one per treatment (compound x concentration); not modified.
    label_key
        ``obs`` column of the labels to retrieve (mechanism of action).
    rep
        ``"X"``, a layer or an ``obsm`` key holding the profiles.
    exclude
        Label values (e.g. ``"DMSO"``) whose profiles are neither queries nor candidates.
    exclude_same
        ``obs`` column(s) (e.g. ``"compound"``): candidates that share the query's value there
        are removed from its ranking, so a compound cannot retrieve its own other doses.
    similarity
        One of :data:`SIMILARITIES`: ``"cosine"`` (default), ``"pearson"`` or ``"euclidean"``
        (negative distance).
    k
        Cut-off of ``precision_at_k``; ``None`` uses each query's number of positives
        (R-precision).

    Returns
    -------
    pandas.DataFrame
        Indexed by the query's ``obs_names``: ``label``, ``n_positives``, ``n_candidates``,
        ``average_precision`` and ``precision_at_k``. Queries without any positive are dropped.
    """
    if k is not None and (isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1):
        raise CellflowValueError(f"k must be a positive integer or None, got {k!r}.")
    x, labels, queries, candidate = _label_retrieval_setup(adata, label_key, rep, exclude, exclude_same, similarity)

    def positive(rows: np.ndarray) -> np.ndarray:
        return labels[rows][:, None] == labels[None, :]

    per_query_k = None if k is None else np.full(queries.size, int(k))
    [(ap, n_pos, n_cand, precision)] = _query_rows(x, similarity, [positive], candidate, queries, per_query_k)
    frame = pd.DataFrame(
        {
            "label": labels[queries],
            "n_positives": n_pos.astype(int),
            "n_candidates": n_cand.astype(int),
            "average_precision": ap,
            "precision_at_k": precision,
        },
        index=adata.obs_names[queries],
    )
    return frame[frame.n_positives > 0]


def map_retrieval(
    adata: ad.AnnData,
    label_key: str = "moa",
    rep: str = "X",
    exclude: Sequence[Any] | Any = ("DMSO",),
    *,
    exclude_same: str | Sequence[str] | None = None,
    similarity: str = "cosine",
    average: str = "query",
) -> float:
    """Mean average precision of retrieving profiles that share a label (e.g. a MoA).

    Every profile whose label is not in ``exclude`` is a query; the others are ranked by
    ``similarity``; those with the query's label are its positives (see
    :func:`retrieval_scores` for the arguments).

    Parameters
    ----------
    average
        ``"query"`` (default): mean AP over queries. ``"label"``: mean over labels of the
        labels' mean AP, so that large classes do not dominate.

    Returns
    -------
    float
        In ``[0, 1]``; NaN when no query has a positive.

    Examples
    --------
    >>> profiles = cf.pp.aggregate(cf.pp.normalize_plates(wells), by=["compound", "concentration"])
    >>> cf.metrics.map_retrieval(profiles, label_key="moa", exclude=("DMSO",), exclude_same="compound")
    """
    _check_average(average)
    scores = retrieval_scores(adata, label_key, rep, exclude, exclude_same=exclude_same, similarity=similarity)
    return _mean_average_precision(scores["average_precision"].to_numpy(), scores["label"].to_numpy(), average)


def map_retrieval_shuffled(
    adata: ad.AnnData,
    label_key: str = "moa",
    rep: str = "X",
    exclude: Sequence[Any] | Any = ("DMSO",),
    *,
    exclude_same: str | Sequence[str] | None = None,
    similarity: str = "cosine",
    average: str = "query",
    n_permutations: int = 100,
    seed: int = 0,
) -> np.ndarray:
    """The label-shuffled baseline of :func:`map_retrieval`.

    Labels are permuted among the non-excluded profiles; when ``exclude_same`` is given, whole
    groups (e.g. compounds) are permuted as units, so each group keeps one label and the
    baseline keeps the data's structure. Arguments as in :func:`map_retrieval`.

    Returns
    -------
    numpy.ndarray
        Shape ``(n_permutations,)``: the mAP under each permutation.
    """
    if isinstance(n_permutations, bool) or not isinstance(n_permutations, int | np.integer) or n_permutations < 1:
        raise CellflowValueError(f"n_permutations must be a positive integer, got {n_permutations!r}.")
    _check_average(average)
    x, labels, queries, candidate = _label_retrieval_setup(adata, label_key, rep, exclude, exclude_same, similarity)
    same_columns = [] if exclude_same is None else _columns(exclude_same, "exclude_same")
    groups = _labels(adata, same_columns)[queries] if same_columns else np.arange(queries.size).astype(str)
    unique_groups, first = np.unique(groups, return_index=True)
    group_labels = labels[queries][first]
    rng = np.random.default_rng(seed)
    labelings = []
    for _ in range(n_permutations):
        mapping = dict(zip(unique_groups, rng.permutation(group_labels), strict=True))
        permuted = labels.copy()
        permuted[queries] = [mapping[g] for g in groups]
        labelings.append(permuted)
    positive_fns = [lambda rows, labels=permuted: labels[rows][:, None] == labels[None, :] for permuted in labelings]
    results = _query_rows(x, similarity, positive_fns, candidate, queries, None)
    return np.array([
        _mean_average_precision(ap, permuted[queries], average)
        for (ap, *_), permuted in zip(results, labelings, strict=True)
    ])


# --------------------------------------------------------------------------------------------
# replicate retrieval (phenotypic activity and reproducibility)
# --------------------------------------------------------------------------------------------
def _replicate_map(
    adata: ad.AnnData,
    group_key: str | Sequence[str],
    rep: str,
    negatives_fn,
    *,
    skip: np.ndarray,
    similarity: str,
    null_size: int,
    seed: int,
    alpha: float,
) -> pd.DataFrame:
    _check_similarity(similarity)
    columns = _columns(group_key, "group_key")
    _check_columns(adata, columns, "group_key")
    if isinstance(null_size, bool) or not isinstance(null_size, int | np.integer) or null_size < 1:
        raise CellflowValueError(f"null_size must be a positive integer, got {null_size!r}.")
    if not 0 < alpha < 1:
        raise CellflowValueError(f"alpha must be in (0, 1), got {alpha!r}.")
    x = _profiles(adata, rep)
    groups = _labels(adata, columns)
    queries = np.flatnonzero(~skip)

    def positive(rows: np.ndarray) -> np.ndarray:
        return groups[rows][:, None] == groups[None, :]

    def candidate(rows: np.ndarray) -> np.ndarray:
        return positive(rows) | negatives_fn(rows)

    [(ap, n_pos, n_cand, _)] = _query_rows(x, similarity, [positive], candidate, queries, None)
    rng = np.random.default_rng(seed)
    null_cache: dict[tuple[int, int], np.ndarray] = {}
    rows = []
    query_groups = groups[queries]
    for group in dict.fromkeys(query_groups):
        members = np.flatnonzero((query_groups == group) & (n_pos > 0))
        first = adata.obs.iloc[queries[np.flatnonzero(query_groups == group)[0]]]
        row: dict[Hashable, Any] = {c: first[c] for c in columns}
        row["n_replicates"] = int((query_groups == group).sum())
        if members.size == 0:
            row.update(n_negatives=0, mean_average_precision=np.nan, p_value=np.nan)
            rows.append(row)
            continue
        null = np.zeros(null_size)
        for m in members:
            config = (int(n_pos[m]), int(n_cand[m]))
            if config not in null_cache:
                null_cache[config] = _null_average_precision(*config, null_size, rng)
            null += null_cache[config][rng.permutation(null_size)]
        null /= members.size
        observed = float(ap[members].mean())
        row["n_negatives"] = int(n_cand[members[0]] - n_pos[members[0]])
        row["mean_average_precision"] = observed
        row["p_value"] = (1.0 + float((null >= observed - 1e-12).sum())) / (1.0 + null_size)
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame["q_value"] = _benjamini_hochberg(frame["p_value"].to_numpy(dtype=np.float64))
    frame["significant"] = frame["q_value"] < alpha
    return frame


def phenotypic_activity(
    adata: ad.AnnData,
    perturbation_key: str = "compound",
    control: Any = "DMSO",
    rep: str = "X",
    *,
    group_key: str | Sequence[str] | None = None,
    similarity: str = "cosine",
    null_size: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> pd.DataFrame:
    """Which treatments differ from the negative controls: replicate retrieval against controls.

    For each replicate profile of a treatment, the other replicates are the positives and the
    control profiles the negatives; the treatment's mAP is compared with that of random
    rankings (``null_size`` permutations) for a p-value, corrected over treatments with
    Benjamini-Hochberg. The ``mean_average_precision`` column is the replicate reproducibility
    against controls (copairs' phenotypic-activity mAP); :func:`replicate_reproducibility` ranks
    replicates against the other treatments instead.

    Parameters
    ----------
    adata
        Replicate-level profiles (e.g. normalised wells); not modified.
    perturbation_key, control
        ``obs`` column and its value (or list of values) for negative controls.
    rep
        Where the profiles are.
    group_key
        Column(s) that define a treatment; default ``perturbation_key`` (use
        ``["compound", "concentration"]`` for dose-resolved treatments).
    similarity, null_size, alpha, seed
        Similarity (see :data:`SIMILARITIES`), permutations of the null, the q-value threshold
        and the seed of the permutations.

    Returns
    -------
    pandas.DataFrame
        One row per treatment: the ``group_key`` columns, ``n_replicates``, ``n_negatives``,
        ``mean_average_precision``, ``p_value``, ``q_value`` and ``significant``
        (``q_value < alpha``, i.e. phenotypically active). The fraction of active
        treatments is ``frame.significant.mean()``.
    """
    _check_columns(adata, [perturbation_key], "perturbation_key")
    values = adata.obs[perturbation_key].astype(str).to_numpy()
    controls = _as_set(control)
    is_control = np.isin(values, list(controls))
    if is_control.sum() < 1:
        raise CellflowValueError(
            f"control={control!r} marks no profile in adata.obs[{perturbation_key!r}]; values present: "
            f"{format_choices(sorted(set(values)))}."
        )
    return _replicate_map(
        adata,
        perturbation_key if group_key is None else group_key,
        rep,
        lambda rows: np.broadcast_to(is_control, (rows.size, is_control.size)).copy(),
        skip=is_control,
        similarity=similarity,
        null_size=null_size,
        seed=seed,
        alpha=alpha,
    )


def replicate_reproducibility(
    adata: ad.AnnData,
    group_key: str | Sequence[str] = "compound",
    rep: str = "X",
    exclude: Sequence[Any] | Any = ("DMSO",),
    *,
    exclude_key: str | None = None,
    similarity: str = "cosine",
    null_size: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> pd.DataFrame:
    """How reproducible each treatment is: replicate retrieval among the other treatments.

    For each replicate profile, the other replicates of its treatment are the positives and
    every profile of another treatment the negatives (profiles whose ``exclude_key`` value is
    in ``exclude``, e.g. controls, take no part). Returns the same columns as
    :func:`phenotypic_activity`.

    Parameters
    ----------
    group_key
        Column(s) that define a treatment.
    exclude, exclude_key
        Values of ``obs[exclude_key]`` (default: the first ``group_key`` column) to leave out.
    """
    columns = _columns(group_key, "group_key")
    _check_columns(adata, columns, "group_key")
    key = columns[0] if exclude_key is None else exclude_key
    _check_columns(adata, [key], "exclude_key")
    skip = np.isin(adata.obs[key].astype(str).to_numpy(), list(_as_set(exclude)))
    groups = _labels(adata, columns)
    return _replicate_map(
        adata,
        columns,
        rep,
        lambda rows: (groups[rows][:, None] != groups[None, :]) & ~skip[None, :],
        skip=skip,
        similarity=similarity,
        null_size=null_size,
        seed=seed,
        alpha=alpha,
    )
