"""Names of the features of a representation (``X``, a layer or an ``obsm`` entry).

The feature-wise preprocessing functions (:func:`~cellflow.pp.normalize_plates`,
:func:`~cellflow.pp.select_features`, :func:`~cellflow.pp.aggregate`,
:func:`~cellflow.pp.standardize_to_control`) read any representation and return a new AnnData
whose ``X`` holds the result. Its ``var`` must describe the columns of the representation that
was read, which are the genes of ``var`` only for ``X`` and layers.
"""

from __future__ import annotations

import anndata as ad
import pandas as pd

from cellflow._errors import CellflowKeyError, format_choices
from cellflow.data._representation import available_representations

__all__ = ["feature_table"]


def feature_table(adata: ad.AnnData, rep: str) -> pd.DataFrame:
    """A ``var`` table with one row per column of the representation ``rep``.

    ``rep`` is resolved as :func:`cellflow.data.get_representation` does: ``"X"``, then an
    ``obsm`` key, then a layer.

    Parameters
    ----------
    adata
        The AnnData; not modified.
    rep
        ``"X"``, an ``obsm`` key or a layer name.

    Returns
    -------
    pandas.DataFrame
        ``"X"`` or a layer: a copy of ``adata.var`` (the genes or features). An ``obsm`` key:
        an empty table indexed by the entry's column names when it is a DataFrame with unique
        column names, else by ``f"{rep}_{j}"`` for column ``j`` (``"X_pca_0"``, ``"X_pca_1"``,
        ...), so the features are never mistaken for genes.

    Raises
    ------
    CellflowKeyError
        ``rep`` is neither ``"X"``, an ``obsm`` key nor a layer (the message lists them).
    """
    if not isinstance(rep, str):
        raise CellflowKeyError(f"rep must be a string naming 'X', an obsm key or a layer, got {rep!r}.")
    if rep == "X":
        return adata.var.copy()
    if rep in adata.obsm:
        entry = adata.obsm[rep]
        if isinstance(entry, pd.DataFrame):
            names = [str(c) for c in entry.columns]
            if len(set(names)) == len(names):
                return pd.DataFrame(index=pd.Index(names))
        return pd.DataFrame(index=pd.Index([f"{rep}_{j}" for j in range(entry.shape[1])]))
    if rep in adata.layers:
        return adata.var.copy()
    raise CellflowKeyError(
        f"rep={rep!r} is neither 'X', an obsm key nor a layer of this AnnData; "
        f"valid choices: {format_choices(available_representations(adata))}."
    )
