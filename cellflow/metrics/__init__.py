"""Metrics: distances between predicted and observed populations, and profile retrieval.

* Distribution and mean-shift metrics (:mod:`cellflow.metrics._distribution`):
  :func:`energy_distance`, :func:`mmd`, :func:`sinkhorn_divergence`, :func:`r2_mean`,
  :func:`pearson_delta` and :func:`evaluate`; :func:`noise_floor`, what a perfect prediction
  scores.
* Retrieval metrics of image-based profiling (:mod:`cellflow.metrics._retrieval`):
  :func:`map_retrieval`, :func:`retrieval_scores`, :func:`map_retrieval_shuffled`,
  :func:`phenotypic_activity`, :func:`replicate_reproducibility` and
  :func:`average_precision`.
"""

from cellflow.metrics._distribution import (
    DEFAULT_MMD_GAMMAS,
    FLOOR_METRICS,
    METRICS,
    energy_distance,
    evaluate,
    mmd,
    noise_floor,
    pearson_delta,
    r2_mean,
    sinkhorn_divergence,
)
from cellflow.metrics._retrieval import (
    SIMILARITIES,
    average_precision,
    map_retrieval,
    map_retrieval_shuffled,
    phenotypic_activity,
    replicate_reproducibility,
    retrieval_scores,
)

__all__ = [
    "METRICS",
    "DEFAULT_MMD_GAMMAS",
    "SIMILARITIES",
    "energy_distance",
    "mmd",
    "sinkhorn_divergence",
    "noise_floor",
    "FLOOR_METRICS",
    "r2_mean",
    "pearson_delta",
    "evaluate",
    "average_precision",
    "retrieval_scores",
    "map_retrieval",
    "map_retrieval_shuffled",
    "phenotypic_activity",
    "replicate_reproducibility",
]
