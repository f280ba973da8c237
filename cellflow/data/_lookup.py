"""Express a queried condition as a weighted sum of the training groups' responses.

The baselines predict a condition that may never have been observed: an unseen combination,
an unseen dose, an unseen patient. Their rule is written once here, as weights over training
groups, so that any per-group response that combines linearly (a mean shift, an affine map)
can use it:

1. Members: a condition observed as a whole (same members) is used as a whole; otherwise a
   combination is the sum of its members, each looked up alone. A member never observed alone
   (an unseen drug) takes the response of the perturbations observed alone that are most similar
   to it in the user's perturbation embeddings (:func:`embedding_neighbours`), averaged.
2. Doses: among the observed doses of those members, the nearest on a log scale (summed over
   members for a combination).
3. Covariates: the groups whose covariate values match the query on the largest number of
   covariate keys, averaged. A new patient, or one seen only in control cells, thus gets the
   average response over the patients where the condition was observed; with several keys
   (cell type and patient) the matching cell type is still honoured.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cellflow._errors import CellflowKeyError, format_choices
from cellflow.data._conditions import Condition
from cellflow.data._embeddings import EmbeddingTable

__all__ = ["condition_weights", "embedding_neighbours"]

_DOSE_FLOOR = 1e-12  # log-dose distance needs positive doses; 0 maps to a very small one


def _log_dose(doses: Sequence[float]) -> np.ndarray:
    return np.log(np.maximum(np.abs(np.asarray(doses, dtype=np.float64)), _DOSE_FLOOR))


def _covariate_weights(candidates: list[int], covariates: Sequence[tuple[str, ...]], query: tuple[str | None, ...]) -> dict[int, float]:
    """Average over the candidates that match ``query`` on the most covariate keys."""
    scores = np.array(
        [sum(q is not None and q == v for q, v in zip(query, covariates[g])) for g in candidates], dtype=np.int64
    )
    best = [g for g, s in zip(candidates, scores) if s == scores.max()]
    # Every distinct covariate value combination (every patient) counts once, however many
    # groups it has at the chosen dose.
    counts: dict[tuple[str, ...], int] = {}
    for g in best:
        counts[covariates[g]] = counts.get(covariates[g], 0) + 1
    return {g: 1.0 / (len(counts) * counts[covariates[g]]) for g in best}


def _nearest_dose_groups(
    groups: list[int], conditions: Sequence[Condition], covariates: Sequence[tuple[str, ...]], doses: Sequence[float]
) -> list[int]:
    """Per covariate combination, the groups at the dose nearest to ``doses`` on a log scale."""
    target = _log_dose(doses)
    chosen: list[int] = []
    by_covariates: dict[tuple[str, ...], list[int]] = {}
    for g in groups:
        by_covariates.setdefault(covariates[g], []).append(g)
    for members in by_covariates.values():
        distance = [float(np.abs(_log_dose(conditions[g].doses) - target).sum()) for g in members]
        chosen.extend(g for g, d in zip(members, distance) if np.isclose(d, min(distance)))
    return chosen


def condition_weights(
    query: Condition,
    query_covariates: tuple[str | None, ...],
    conditions: Sequence[Condition],
    covariates: Sequence[tuple[str, ...]],
    embeddings: EmbeddingTable | None = None,
) -> np.ndarray:
    """Weights ``w`` over training groups such that the query's response is ``sum_g w[g] r[g]``.

    Parameters
    ----------
    query
        The condition to predict.
    query_covariates
        Its covariate values, one per covariate key; ``None`` where unknown.
    conditions
        The condition of every training group.
    covariates
        The covariate values of every training group.
    embeddings
        The model's perturbation embeddings: a member never observed alone stands for the
        average of its :func:`embedding_neighbours` (observed alone) at its dose.

    Returns
    -------
    ``(n_groups,)`` float64 weights. All zeros for the control condition.

    Raises
    ------
    CellflowKeyError
        A member of the query was never observed alone (and the query never as a whole) and has
        no neighbour in ``embeddings``.
    """
    weights = np.zeros(len(conditions), dtype=np.float64)
    if query.is_control:
        return weights
    neighbours = {} if embeddings is None else embedding_neighbours(query, conditions, embeddings)
    whole = [g for g, c in enumerate(conditions) if c.members == query.members]
    parts = [(whole, query.doses, 1.0)] if whole else []
    if not parts:
        for member, dose in zip(query.members, query.doses):
            alone = [g for g, c in enumerate(conditions) if c.members == (member,)]
            if alone:
                parts.append((alone, (dose,), 1.0))
                continue
            stand_ins = [[g for g, c in enumerate(conditions) if c.members == (n,)] for n in neighbours.get(member, ())]
            stand_ins = [groups for groups in stand_ins if groups]
            if not stand_ins:
                seen_alone = sorted({c.members[0] for c in conditions if len(c) == 1})
                raise CellflowKeyError(
                    f"perturbation {member!r} (in {query.label!r}) was never observed alone, so the baseline "
                    f"cannot predict it (give it a vector in perturbation_embeddings to use the most similar "
                    f"perturbations observed alone); perturbations observed alone: {format_choices(seen_alone)}."
                )
            parts.extend((groups, (dose,), 1.0 / len(stand_ins)) for groups in stand_ins)
    for candidates, doses, share in parts:
        at_dose = _nearest_dose_groups(candidates, conditions, covariates, doses)
        for g, w in _covariate_weights(at_dose, covariates, query_covariates).items():
            weights[g] += share * w
    return weights


def embedding_neighbours(
    query: Condition, conditions: Sequence[Condition], embeddings: EmbeddingTable, tolerance: float = 1e-6
) -> dict[str, tuple[str, ...]]:
    """For each member of ``query`` never observed alone, the most similar perturbations observed alone.

    Similarity is the cosine of the angle between perturbation embeddings (for binary
    fingerprints, a close relative of the Tanimoto similarity); every perturbation within
    ``tolerance`` of the best is kept, so that members sharing an annotation (say a one-hot
    mechanism of action) are averaged rather than one picked arbitrarily.

    Parameters
    ----------
    query
        The condition to predict.
    conditions
        The condition of every training group.
    embeddings
        The model's perturbation embeddings.
    tolerance
        Similarities within this much of the best count as ties.

    Returns
    -------
    ``{member: names}``; empty when the query was observed as a whole, and for the default one-hot
    table, whose codes say nothing about similarity. Members without a vector are left out.
    """
    if embeddings.one_hot or any(c.members == query.members for c in conditions):
        return {}
    observed_alone = sorted({c.members[0] for c in conditions if len(c) == 1})
    candidates = [n for n in observed_alone if n in embeddings]
    missing = [m for m in query.members if m not in observed_alone and m in embeddings]
    if not candidates or not missing:
        return {}

    def unit(vectors: np.ndarray) -> np.ndarray:
        vectors = np.asarray(vectors, np.float64)
        return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)

    similarity = unit(embeddings.lookup(missing)) @ unit(embeddings.lookup(candidates)).T
    return {
        member: tuple(n for n, s in zip(candidates, row) if s >= row.max() - tolerance)
        for member, row in zip(missing, similarity)
    }
