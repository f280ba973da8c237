"""Where cells live in an AnnData: ``X``, a layer, or an ``obsm`` entry."""

from __future__ import annotations

import anndata as ad
import numpy as np
import scipy.sparse as sp

from cellflow._errors import CellflowKeyError, CellflowValueError, format_choices

__all__ = ["available_representations", "check_finite", "default_representation", "get_representation"]


def default_representation(adata: ad.AnnData) -> str:
    """The representation a prediction of cellflow was written in (``uns["cellflow"]["rep"]``), else ``"X"``."""
    info = adata.uns.get("cellflow") if isinstance(adata, ad.AnnData) else None
    rep = info.get("rep") if isinstance(info, dict) else None
    return rep if isinstance(rep, str) else "X"


def available_representations(adata: ad.AnnData) -> list[str]:
    """Names accepted as ``rep``: ``"X"``, every ``obsm`` key, every layer name."""
    return ["X", *adata.obsm.keys(), *adata.layers.keys()]


def get_representation(adata: ad.AnnData, rep: str = "X", *, dtype=np.float32, check: bool = True) -> np.ndarray:
    """Return the cells of ``adata`` in representation ``rep`` as a dense array.

    Parameters
    ----------
    adata
        The AnnData.
    rep
        ``"X"``, an ``obsm`` key (looked up first) or a layer name.
    dtype
        dtype of the returned array.
    check
        Raise if the array holds NaN or inf.

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
    if matrix is None:
        others = [r for r in available_representations(adata) if r != "X"]
        choices = f"valid choices: {format_choices(others)}" if others else "this AnnData holds no other representation"
        raise CellflowValueError(f"rep={rep!r} is empty (adata.X is None); {choices}.")
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


def check_finite(array: np.ndarray, rep: str) -> None:
    """Raise :class:`CellflowValueError` naming the first cells with NaN or inf values."""
    finite = np.isfinite(array)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.all(axis=1))
        raise CellflowValueError(
            f"rep={rep!r} holds NaN or inf values in {bad_rows.size} cell(s) (first row indices: "
            f"{bad_rows[:5].tolist()}); remove or impute them first."
        )
