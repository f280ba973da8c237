"""Where cells live in an AnnData: ``X``, a layer, or an ``obsm`` entry."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellflow._errors import CellflowKeyError, CellflowValueError, format_choices, user_stacklevel

__all__ = [
    "available_representations",
    "check_finite",
    "default_representation",
    "embedding_axes",
    "feature_columns",
    "get_representation",
]


def default_representation(adata: ad.AnnData) -> str:
    """The representation a prediction of cellflow was written in (``uns["cellflow"]["rep"]``), else ``"X"``."""
    info = adata.uns.get("cellflow") if isinstance(adata, ad.AnnData) else None
    rep = info.get("rep") if isinstance(info, dict) else None
    return rep if isinstance(rep, str) else "X"


def available_representations(adata: ad.AnnData) -> list[str]:
    """Names accepted as ``rep``: ``"X"``, every ``obsm`` key, every layer name."""
    return ["X", *adata.obsm.keys(), *adata.layers.keys()]


def get_representation(
    adata: ad.AnnData, rep: str = "X", *, dtype=np.float32, check: bool = True, features: Sequence[str] | None = None
) -> np.ndarray:
    """Return the cells of ``adata`` in representation ``rep`` as a dense array.

    Parameters
    ----------
    adata
        The AnnData (in memory or opened with ``backed="r"``).
    rep
        ``"X"``, an ``obsm`` key (looked up first) or a layer name.
    dtype
        dtype of the returned array.
    check
        Raise if the array holds NaN or inf.
    features
        For ``"X"`` and layers: the var names wanted, in their order. Columns are then matched
        by name, so ``adata`` may hold its genes in another order or more genes; see
        :func:`feature_columns` for names that are missing.

    Returns
    -------
    np.ndarray of shape ``(adata.n_obs, n_features)``; a new array, never a view of ``adata``.
    """
    if not isinstance(rep, str):
        raise CellflowKeyError(f"rep must be a string naming 'X', an obsm key or a layer, got {rep!r}.")
    if rep == "X":
        matrix = adata.X
    elif rep in adata.obsm:
        matrix = adata.obsm[rep]
    elif rep in adata.layers:
        matrix = adata.layers[rep]
    else:
        raise CellflowKeyError(
            f"rep={rep!r} is neither 'X', an obsm key nor a layer of this AnnData; "
            f"valid choices: {format_choices(available_representations(adata))}."
        )
    # an X without columns is how embeddings (obsm) are stored beside an empty X, as by the
    # loaders and predict(): asking for it is asking for the wrong representation
    if matrix is None or (rep == "X" and adata.n_vars == 0):
        others = [r for r in available_representations(adata) if r != "X"]
        choices = f"valid choices: {format_choices(others)}" if others else "this AnnData holds no other representation"
        why = "adata.X is None" if matrix is None else "adata.X has no columns"
        raise CellflowValueError(f"rep={rep!r} is empty ({why}); {choices}.")
    if hasattr(matrix, "to_memory"):  # a sparse matrix of an AnnData opened with backed="r"
        matrix = matrix.to_memory()
    elif isinstance(matrix, h5py.Dataset):  # a dense matrix of an AnnData opened with backed="r"
        matrix = matrix[()]
    columns = None
    if features is not None and rep not in adata.obsm:
        columns = feature_columns(adata.var_names, features, rep)
    if columns is not None:
        matrix = matrix[:, columns]
    if sp.issparse(matrix):
        array = np.asarray(matrix.toarray(), dtype=dtype)
    elif hasattr(matrix, "to_numpy"):  # obsm entries may be DataFrames
        array = np.array(matrix.to_numpy(), dtype=dtype)
    else:
        array = np.array(matrix, dtype=dtype)  # np.array copies: the AnnData is never aliased
    if array.ndim != 2:
        raise CellflowValueError(f"rep={rep!r} must be 2-dimensional (cells x features), got shape {array.shape}.")
    if check:
        check_finite(array, rep)
    return array


def check_finite(array: np.ndarray, rep: str, *, name: str | None = None) -> None:
    """Raise :class:`CellflowValueError` naming the first cells with NaN or inf values.

    The message names ``rep={rep!r}``, or ``name`` (e.g. ``"source"``) when given.
    """
    finite = np.isfinite(array)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.all(axis=1))
        raise CellflowValueError(
            f"{name or f'rep={rep!r}'} holds NaN or inf values in {bad_rows.size} cell(s) (first row indices: "
            f"{bad_rows[:5].tolist()}); remove or impute them first."
        )


def feature_columns(var_names: Sequence[str], features: Sequence[str], rep: str = "X") -> np.ndarray | None:
    """Positions in ``var_names`` of ``features`` (the var names a model or a prediction holds).

    Returns ``None`` when the columns are already those features in that order, or when no name
    is shared at all (an AnnData built from an array, with var names ``"0"``, ``"1"``, ...): the
    columns are then taken by position, with a warning unless the names are those defaults.

    Raises
    ------
    CellflowValueError
        Some features, but not all, are among ``var_names``, or ``var_names`` holds duplicates.
    """
    var_names, features = pd.Index([str(v) for v in var_names]), pd.Index([str(f) for f in features])
    if var_names.equals(features):
        return None
    shared = features.isin(var_names)
    if not shared.any():
        if not var_names.equals(pd.Index([str(i) for i in range(len(var_names))])):
            warnings.warn(
                f"rep={rep!r}: no var name is one of the expected features ({format_choices(list(features), limit=3)}), "
                "so columns are matched by position; rename var_names to the features to match them by name.",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        return None
    if not shared.all():
        missing = list(features[~shared])
        raise CellflowValueError(
            f"rep={rep!r} lacks {len(missing)} of the {len(features)} expected features: {format_choices(missing, limit=10)}. "
            "Columns are matched by var name; give cells measured on the same features."
        )
    if not var_names.is_unique:
        duplicated = list(var_names[var_names.duplicated()].unique())
        raise CellflowValueError(
            f"rep={rep!r}: var_names hold duplicates ({format_choices(duplicated, limit=10)}), so features cannot be matched "
            "by name; call adata.var_names_make_unique() first."
        )
    return var_names.get_indexer(features)


def embedding_axes(adata: ad.AnnData, rep: str) -> str | None:
    """A fingerprint of the axes of the embedding ``obsm[rep]``, or ``None`` where none is recorded.

    The axes are those of :func:`cellflow.pp.pca` (``uns[rep]["components"]``), or of scanpy's
    PCA (``varm["PCs"]``) for ``rep="X_pca"``. Cells embedded on the same axes (a subset of one
    AnnData, or new cells put through :func:`cellflow.pp.project`) share the fingerprint; a PCA
    computed on other cells does not.
    """
    if rep not in adata.obsm:
        return None
    info = adata.uns.get(rep)
    if isinstance(info, Mapping) and "components" in info:
        axes = np.asarray(info["components"])
    elif rep == "X_pca" and "PCs" in adata.varm:
        axes = np.asarray(adata.varm["PCs"])
    else:
        return None
    return hashlib.sha1(np.ascontiguousarray(axes, dtype=np.float32).tobytes() + str(axes.shape).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# raw-counts check (shared by ResponseModel's data preparation and cellflow.pp)
# --------------------------------------------------------------------------------------------
# the counts checks look at this many rows (evenly spaced) of a larger matrix: O(rows) work
_COUNT_CHECK_ROWS = 1000


def _values(matrix: Any) -> np.ndarray:
    """The stored values of a dense or sparse matrix (for cheap checks)."""
    return np.asarray(matrix.data if sp.issparse(matrix) else matrix)


def _sampled_values(matrix: Any, max_rows: int = _COUNT_CHECK_ROWS) -> np.ndarray:
    """The stored values of at most ``max_rows`` evenly spaced rows of ``matrix``.

    Evenly spaced rather than the first rows, so that a file sorted by condition or sample is
    seen in every part; deterministic, so a warning does not come and go between runs.
    """
    n_rows = matrix.shape[0]
    if n_rows > max_rows:
        rows = np.linspace(0, n_rows - 1, max_rows).round().astype(np.int64)
        if sp.issparse(matrix) and matrix.format not in ("csr", "csc"):
            matrix = sp.csr_matrix(matrix)
        matrix = matrix[rows]
    elif hasattr(matrix, "to_numpy"):
        matrix = matrix.to_numpy()
    return _values(matrix).ravel()


def _counts_check(matrix: Any) -> tuple[bool | None, str]:
    """Do (a sample of rows of) ``matrix`` look like raw counts, i.e. non-negative integers?

    Returns ``(verdict, evidence)``: ``None`` when the sample holds no non-zero value (nothing to
    judge), else ``True`` / ``False`` and a short description for a warning message.
    """
    return _counts_verdict(_sampled_values(matrix))


def _counts_verdict(values: np.ndarray) -> tuple[bool | None, str]:
    """:func:`_counts_check` of values already sampled (:func:`_sampled_values`)."""
    nonzero = values[values != 0]
    if nonzero.size == 0:
        return None, "no non-zero values"
    if np.issubdtype(nonzero.dtype, np.integer):
        if nonzero.min() >= 0:
            return True, f"integer values, max {nonzero.max()}"
        return False, f"negative values (min {nonzero.min()})"
    fractional = nonzero != np.round(nonzero)
    if fractional.any():
        example = nonzero[np.flatnonzero(fractional)[0]]
        return False, (
            f"{fractional.mean():.0%} of the sampled non-zero values are non-integer, e.g. {example:.4g}; "
            f"max {nonzero.max():.4g}"
        )
    if nonzero.min() < 0:
        return False, f"negative values (min {nonzero.min():.4g})"
    return True, f"non-negative integer values, max {nonzero.max():.4g}"
