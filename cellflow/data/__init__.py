"""AnnData -> arrays: representations, conditions, embeddings, a jittable sampler and splits.

The data layer knows AnnData and nothing of solvers; solvers receive the arrays it produces.
"""

from cellflow.data._conditions import Condition, format_dose, parse_condition
from cellflow.data._dataset import (
    ALL_CONTROLS,
    TIME_COLUMN,
    DataSpec,
    ObsConditions,
    PerturbationData,
    parse_obs_conditions,
    prepare,
)
from cellflow.data._embeddings import EmbeddingTable, make_embedding_table
from cellflow.data._fingerprints import morgan_fingerprints
from cellflow.data._lookup import condition_weights, embedding_neighbours
from cellflow.data._representation import (
    available_representations,
    check_finite,
    default_representation,
    embedding_axes,
    feature_columns,
    get_representation,
)
from cellflow.data._sampler import (
    Batch,
    ConditionArrays,
    TrainingArrays,
    build_training_arrays,
    encode_condition,
    sample_batch,
    sample_batches,
)
from cellflow.data._split import (
    Split,
    holdout,
    split_combinations,
    split_conditions,
    split_covariates,
    split_doses,
)
from cellflow.data._time import align_partners, chain_snapshots

__all__ = [
    "ALL_CONTROLS",
    "TIME_COLUMN",
    "Batch",
    "Condition",
    "ConditionArrays",
    "DataSpec",
    "EmbeddingTable",
    "ObsConditions",
    "PerturbationData",
    "Split",
    "align_partners",
    "TrainingArrays",
    "available_representations",
    "build_training_arrays",
    "chain_snapshots",
    "check_finite",
    "condition_weights",
    "embedding_neighbours",
    "encode_condition",
    "format_dose",
    "default_representation",
    "embedding_axes",
    "feature_columns",
    "get_representation",
    "holdout",
    "make_embedding_table",
    "morgan_fingerprints",
    "parse_condition",
    "parse_obs_conditions",
    "prepare",
    "sample_batch",
    "sample_batches",
    "split_combinations",
    "split_conditions",
    "split_covariates",
    "split_doses",
]
