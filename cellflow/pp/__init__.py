"""Preprocessing, following scanpy habits (AnnData in, a new AnnData out unless told otherwise).

* Expression (:mod:`cellflow.pp._expression`): :func:`log_normalize`, :func:`pca` with
  :func:`project` (new cells onto its axes) and :func:`decode` / :func:`decode_adata` back to genes, :func:`top_degs`,
  :func:`standardize_to_control`.
* Image-based profiles (:mod:`cellflow.pp._profiles`): :func:`normalize_plates` (robust z,
  z, sphering, typical-variation normalisation against controls), :func:`select_features`,
  :func:`aggregate` (cells to wells, wells to treatments).
* Images (:mod:`cellflow.pp._images`): :func:`embed_images` runs a JAX/flax encoder in
  jitted batches.

The feature-wise functions (:func:`normalize_plates`, :func:`select_features`,
:func:`aggregate`, :func:`standardize_to_control`) read ``rep`` (``"X"``, a layer or an ``obsm``
key) and always write their result to ``X`` of the returned AnnData. Its ``var`` names the
columns that were read: the genes of ``var`` for ``X`` or a layer; for an ``obsm`` key, the
entry's column names if it is a DataFrame, else ``f"{rep}_{j}"`` (``"X_pca_0"``, ...).
"""

from cellflow.pp._expression import (
    decode,
    decode_adata,
    log_normalize,
    pca,
    project,
    standardize_to_control,
    top_degs,
)
from cellflow.pp._images import embed_images
from cellflow.pp._profiles import (
    NORMALIZATION_METHODS,
    aggregate,
    normalize_plates,
    select_features,
)

__all__ = [
    "log_normalize",
    "pca",
    "project",
    "decode",
    "decode_adata",
    "top_degs",
    "standardize_to_control",
    "NORMALIZATION_METHODS",
    "normalize_plates",
    "select_features",
    "aggregate",
    "embed_images",
]
