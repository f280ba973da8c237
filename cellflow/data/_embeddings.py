"""Perturbation embeddings: user tables ``{name: vector}`` / DataFrames, or one-hot by default."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cellflow._errors import CellflowKeyError, CellflowValueError, format_choices

__all__ = ["EmbeddingTable", "make_embedding_table"]


@dataclass(frozen=True)
class EmbeddingTable:
    """A lookup from perturbation name to a fixed-length vector.

    Attributes
    ----------
    names
        Names with an embedding (the training vocabulary, plus any extra names the user gave,
        which makes perturbations never seen in training predictable).
    vectors
        ``(len(names), dim)`` float32.
    one_hot
        Whether the table is the default one-hot code over the training vocabulary.
    """

    names: tuple[str, ...]
    vectors: np.ndarray = field(repr=False)
    one_hot: bool = False

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise CellflowKeyError(
                f"perturbation {name!r} was not seen in training and has no entry in perturbation_embeddings; "
                f"known perturbations: {format_choices(self.names)}. Pass perturbation_embeddings={{name: vector}} "
                f"covering it to predict an unseen perturbation."
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def lookup(self, names: Sequence[str]) -> np.ndarray:
        """``(len(names), dim)`` vectors of ``names``."""
        return self.vectors[[self.index(n) for n in names]]


def make_embedding_table(
    vocabulary: Sequence[str],
    embeddings: Mapping[str, Sequence[float]] | pd.DataFrame | None = None,
) -> EmbeddingTable:
    """Build the embedding table for a training vocabulary.

    Parameters
    ----------
    vocabulary
        Perturbation names seen in training.
    embeddings
        ``None`` for a one-hot code over ``vocabulary``; a mapping ``{name: vector}``; or a
        DataFrame indexed by name with one column per dimension. Every vocabulary member must be
        covered; extra names are kept so that they can be predicted.

    Raises
    ------
    CellflowKeyError
        A vocabulary member has no embedding.
    CellflowValueError
        Vectors of different lengths, non-numeric or non-finite values.
    """
    vocabulary = tuple(vocabulary)
    if embeddings is None:
        return EmbeddingTable(vocabulary, np.eye(len(vocabulary), dtype=np.float32), one_hot=True)
    if isinstance(embeddings, pd.DataFrame):
        names = tuple(map(str, embeddings.index))
        try:
            vectors = embeddings.to_numpy(dtype=np.float32)
        except (TypeError, ValueError):
            raise CellflowValueError("perturbation_embeddings DataFrame must hold only numeric columns.") from None
    elif isinstance(embeddings, Mapping):
        names = tuple(map(str, embeddings.keys()))
        # A (1, d) row is a vector; a (k, d) block is not one (flattening it would silently
        # give a k*d-long "embedding").
        blocks = {n: np.shape(v) for n, v in embeddings.items() if sum(size > 1 for size in np.shape(v)) > 1}
        if blocks:
            raise CellflowValueError(
                f"perturbation_embeddings values must be vectors (one row per name); got arrays of shape "
                f"{dict(list(blocks.items())[:10])}."
            )
        lengths = {n: np.asarray(v).reshape(-1).shape[0] for n, v in embeddings.items()}
        if len(set(lengths.values())) > 1:
            raise CellflowValueError(
                f"perturbation_embeddings vectors differ in length: {dict(list(lengths.items())[:10])}."
            )
        try:
            vectors = np.stack([np.asarray(v, dtype=np.float32).reshape(-1) for v in embeddings.values()])
        except (TypeError, ValueError):
            raise CellflowValueError("perturbation_embeddings values must be numeric vectors.") from None
    else:
        raise CellflowValueError(
            f"perturbation_embeddings must be None, a {{name: vector}} mapping or a DataFrame indexed by name, "
            f"got {type(embeddings).__name__}."
        )
    if len(set(names)) != len(names):
        raise CellflowValueError("perturbation_embeddings has duplicated names.")
    if not np.isfinite(vectors).all():
        bad = [n for n, row in zip(names, vectors) if not np.isfinite(row).all()]
        raise CellflowValueError(f"perturbation_embeddings has NaN or inf values for {format_choices(bad)}.")
    missing = [m for m in vocabulary if m not in names]
    if missing:
        raise CellflowKeyError(
            f"perturbation_embeddings has no vector for perturbation(s) {format_choices(missing)} seen in the data; "
            f"names present: {format_choices(names)}."
        )
    return EmbeddingTable(names, vectors, one_hot=False)
