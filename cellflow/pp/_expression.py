"""Preprocessing: log-normalisation, PCA with a decoder back to genes, and top DEGs.

The functions follow scanpy habits: they take an :class:`~anndata.AnnData`, read ``X`` or a
layer, and either return a new AnnData (``copy=True``, the default here) or write into the
input and return ``None`` (``copy=False``).

:func:`pca` stores everything needed to map an embedding back to gene space in
``adata.uns[key_added]``, so that predictions made in PCA space (e.g. by a flow-matching model)
can be decoded with :func:`decode` / :func:`decode_adata`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from cellflow._errors import CellflowKeyError, CellflowValueError, format_choices, user_stacklevel
from cellflow.data._representation import _counts_check, _values, feature_columns, get_representation
from cellflow.pp._features import feature_table

__all__ = ["log_normalize", "pca", "project", "decode", "decode_adata", "top_degs", "standardize_to_control"]

_DEG_METHODS = ("wilcoxon", "t-test", "t-test_overestim_var")
_CONTROL = "__cellflow_control__"  # internal label of control cells in top_degs
_HVG_FLAVORS = ("seurat", "cell_ranger", "seurat_v3", "seurat_v3_paper")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _gene_matrix(adata: ad.AnnData, rep: str | None, argname: str = "rep") -> Any:
    """Return ``adata.X`` (``rep`` is ``"X"`` or ``None``) or ``adata.layers[rep]``, uncopied."""
    if rep is None or rep == "X":
        matrix = adata.X
        if matrix is None:
            raise CellflowValueError(f"{argname}='X' is empty (adata.X is None); pass a layer name instead.")
        return matrix
    if not isinstance(rep, str) or rep not in adata.layers:
        raise CellflowKeyError(
            f"{argname}={rep!r} is neither 'X' nor a layer of this AnnData; "
            f"valid choices: {format_choices(['X', *adata.layers.keys()])}."
        )
    return adata.layers[rep]


def _float_copy(matrix: Any) -> np.ndarray | sp.spmatrix:
    """A floating-point copy of a dense or sparse matrix; integers become float32."""
    if sp.issparse(matrix):
        dtype = matrix.dtype if np.issubdtype(matrix.dtype, np.floating) else np.float32
        return sp.csr_matrix(matrix, dtype=dtype, copy=True)
    array = np.asarray(matrix.to_numpy() if hasattr(matrix, "to_numpy") else matrix)
    dtype = array.dtype if np.issubdtype(array.dtype, np.floating) else np.float32
    return np.array(array, dtype=dtype, copy=True)


def _check_finite_matrix(matrix: Any, argname: str, rep: str) -> None:
    if not np.isfinite(_values(matrix)).all():
        raise CellflowValueError(f"{argname}={rep!r} holds NaN or inf values; remove or impute them first.")


def _looks_like_counts(matrix: Any) -> bool:
    """Whether a row sample of ``matrix`` holds non-negative integers only (and some non-zero)."""
    return _counts_check(matrix)[0] is True


def _check_positive_int(value: Any, argname: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise CellflowValueError(f"{argname} must be a positive integer, got {value!r}.")
    return int(value)


# --------------------------------------------------------------------------------------------
# log_normalize
# --------------------------------------------------------------------------------------------
def log_normalize(
    adata: ad.AnnData,
    *,
    target_sum: float | None = 1e4,
    layer: str | None = None,
    key_added: str = "logcounts",
    copy: bool = True,
) -> ad.AnnData | None:
    """Library-size normalise and ``log1p``-transform counts into a new layer.

    Runs :func:`scanpy.pp.normalize_total` followed by :func:`scanpy.pp.log1p` on a copy of
    ``adata.X`` (or of ``adata.layers[layer]``) and stores the result in
    ``adata.layers[key_added]``. The source matrix is never modified; an existing layer
    ``key_added`` is overwritten.

    Parameters
    ----------
    adata
        AnnData holding non-negative counts in ``X`` or in ``layer``.
    target_sum
        Total count of every cell after normalisation. ``None`` uses the median of the cells'
        totals (scanpy's behaviour).
    layer
        Layer holding the counts; ``None`` (or ``"X"``) reads ``adata.X``.
    key_added
        Name of the layer that receives the log-normalised values.
    copy
        If ``True`` (default), return a new AnnData and leave ``adata`` untouched. If
        ``False``, add the layer to ``adata`` in place and return ``None``.

    Returns
    -------
    A new :class:`~anndata.AnnData` with ``layers[key_added]`` if ``copy=True``, else ``None``.
    Sparse input gives a sparse (CSR) layer; integer counts give float32 values.

    Warns
    -----
    UserWarning
        The input does not look like raw counts: some values are not integers (checked on up to
        1,000 evenly spaced rows), as in data that is already normalised or log-transformed.
        Normalising and logging it again distorts it silently; pass the layer holding the raw
        counts instead. Counts corrected to non-integer values (e.g. for ambient RNA) warn
        too; normalising those is intended, and the warning can be ignored.
    """
    matrix = _gene_matrix(adata, layer, "layer")
    if not isinstance(key_added, str) or not key_added:
        raise CellflowValueError(f"key_added must be a non-empty string, got {key_added!r}.")
    if target_sum is not None and not (np.isfinite(target_sum) and target_sum > 0):
        raise CellflowValueError(f"target_sum must be a positive number or None, got {target_sum!r}.")
    source = "X" if layer is None else layer
    _check_finite_matrix(matrix, "layer", source)
    values = _values(matrix)
    if values.size and values.min() < 0:
        raise CellflowValueError(
            f"layer={source!r} holds negative values (min {values.min():.4g}); log_normalize expects "
            "non-negative counts. Is it already normalised?"
        )
    verdict, evidence = _counts_check(matrix)
    if verdict is False:
        warnings.warn(
            f"layer={source!r} does not look like raw counts ({evidence}): it may already be normalised or "
            "log-transformed, and log_normalize would normalise and log it again. Pass the layer holding the raw "
            f"counts (layer=...), or skip log_normalize if {source!r} is already log-normalised.",
            UserWarning,
            stacklevel=user_stacklevel(),
        )

    work = ad.AnnData(X=_float_copy(matrix))
    sc.pp.normalize_total(work, target_sum=target_sum)
    sc.pp.log1p(work)

    out = adata.copy() if copy else adata
    out.layers[key_added] = work.X
    return out if copy else None


# --------------------------------------------------------------------------------------------
# pca
# --------------------------------------------------------------------------------------------
def pca(
    adata: ad.AnnData,
    n_comps: int = 50,
    *,
    rep: str = "X",
    key_added: str = "X_pca",
    n_top_genes: int | None = None,
    hvg_flavor: Literal["seurat", "cell_ranger", "seurat_v3", "seurat_v3_paper"] = "seurat",
    svd_solver: str | None = None,
    random_state: int | None = 0,
    copy: bool = True,
) -> ad.AnnData | None:
    """Principal component analysis of ``X`` or a layer, storing a decoder to gene space.

    The chosen matrix is (optionally) restricted to highly variable genes, centred per gene
    and decomposed with :func:`scanpy.pp.pca`. Sparse matrices are supported (scanpy centres
    them implicitly, without densifying). An embedding ``z`` maps back to genes as
    ``mean + z @ components`` (see :func:`decode`).

    Parameters
    ----------
    adata
        The AnnData.
    n_comps
        Number of principal components; at most ``min(n_obs, n_genes used)``.
    rep
        ``"X"`` or the name of a layer (e.g. ``"logcounts"``) to decompose.
    key_added
        Key of the embedding in ``obsm`` and of the decoder in ``uns``.
    n_top_genes
        If given, first select this many highly variable genes of ``rep`` with
        :func:`scanpy.pp.highly_variable_genes` and run PCA on them only.
    hvg_flavor
        ``flavor`` of :func:`scanpy.pp.highly_variable_genes`. ``"seurat"`` and
        ``"cell_ranger"`` expect log-normalised values; ``"seurat_v3"`` expects counts and
        needs ``scikit-misc`` (the PCA itself still runs on ``rep``).
    svd_solver
        Passed to :func:`scanpy.pp.pca`. ``None`` uses scanpy's default, or
        ``"covariance_eigh"`` when ``n_comps`` equals ``min(n_obs, n_genes)`` (which ARPACK
        cannot compute).
    random_state
        Seed of the SVD solver.
    copy
        If ``True`` (default), return a new AnnData and leave ``adata`` untouched. If
        ``False``, write the results into ``adata`` and return ``None`` (scanpy's convention).

    Returns
    -------
    A new :class:`~anndata.AnnData` if ``copy=True``, else ``None``. Either way the target
    AnnData receives

    ``obsm[key_added]``
        ``(n_obs, n_comps)`` embedding, ``(x - mean) @ components.T``.
    ``uns[key_added]``
        dict with ``mean`` ``(n_genes,)``, ``components`` ``(n_comps, n_genes)`` (orthonormal
        rows), ``variance`` and ``variance_ratio`` ``(n_comps,)``, ``var_names`` (the
        ``n_genes`` genes used, in order), ``rep``, ``n_comps``, and, when ``n_top_genes`` is
        given, ``n_top_genes``, ``hvg_flavor`` and ``highly_variable`` (boolean mask over all
        of ``adata.var_names``).

    Float64 input is decomposed in float64; anything else in float32.

    Warns
    -----
    UserWarning
        ``rep`` looks like raw counts (non-negative integers, checked on up to 1,000 evenly
        spaced rows): the leading components of raw counts mostly follow each cell's library
        size and a few highly expressed genes. Run :func:`log_normalize` first and pass
        ``rep="logcounts"``.
    """
    n_comps = _check_positive_int(n_comps, "n_comps")
    if not isinstance(key_added, str) or not key_added:
        raise CellflowValueError(f"key_added must be a non-empty string, got {key_added!r}.")
    matrix = _gene_matrix(adata, rep)
    _check_finite_matrix(matrix, "rep", rep)
    if _looks_like_counts(matrix):
        hvg_note = ""
        if n_top_genes is not None and hvg_flavor in ("seurat", "cell_ranger"):
            hvg_note = f" hvg_flavor={hvg_flavor!r} also expects log-normalised data."
        warnings.warn(
            f"rep={rep!r} looks like raw counts (non-negative integers): PCA of raw counts is dominated by "
            "library size and a few highly expressed genes. Run cellflow.pp.log_normalize first and pass "
            f"rep='logcounts'.{hvg_note}",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    matrix = _float_copy(matrix)
    var_names = np.asarray(adata.var_names, dtype=object)

    hvg_mask = None
    if n_top_genes is not None:
        n_top_genes = _check_positive_int(n_top_genes, "n_top_genes")
        if n_top_genes > adata.n_vars:
            raise CellflowValueError(f"n_top_genes={n_top_genes} exceeds the number of genes ({adata.n_vars}).")
        if hvg_flavor not in _HVG_FLAVORS:
            raise CellflowKeyError(f"hvg_flavor={hvg_flavor!r} is unknown; valid choices: {format_choices(_HVG_FLAVORS)}.")
        work = ad.AnnData(X=matrix, var=pd.DataFrame(index=pd.Index(var_names.astype(str))))
        sc.pp.highly_variable_genes(work, n_top_genes=n_top_genes, flavor=hvg_flavor)
        hvg_mask = work.var["highly_variable"].to_numpy(dtype=bool)
        matrix = matrix[:, hvg_mask]
        var_names = var_names[hvg_mask]

    n_obs, n_genes = matrix.shape
    if n_comps > min(n_obs, n_genes):
        raise CellflowValueError(
            f"n_comps={n_comps} exceeds min(n_obs, n_genes) = min({n_obs}, {n_genes}) = {min(n_obs, n_genes)}."
        )
    if svd_solver is None and n_comps == min(n_obs, n_genes):
        svd_solver = "covariance_eigh"
    dtype = np.float64 if matrix.dtype == np.float64 else np.float32
    if sp.issparse(matrix):
        mean = np.asarray(matrix.sum(axis=0, dtype=np.float64)).ravel() / n_obs
    else:
        mean = matrix.mean(axis=0, dtype=np.float64)

    work = ad.AnnData(X=matrix)
    sc.pp.pca(work, n_comps=n_comps, zero_center=True, svd_solver=svd_solver, random_state=random_state, dtype=dtype)

    info: dict[str, Any] = {
        "mean": mean.astype(dtype),
        "components": np.ascontiguousarray(work.varm["PCs"].T, dtype=dtype),
        "variance": np.asarray(work.uns["pca"]["variance"], dtype=np.float64),
        "variance_ratio": np.asarray(work.uns["pca"]["variance_ratio"], dtype=np.float64),
        "var_names": var_names,
        "rep": rep,
        "n_comps": n_comps,
    }
    if hvg_mask is not None:
        info.update(n_top_genes=n_top_genes, hvg_flavor=hvg_flavor, highly_variable=hvg_mask)

    out = adata.copy() if copy else adata
    out.obsm[key_added] = np.asarray(work.obsm["X_pca"], dtype=dtype)
    out.uns[key_added] = info
    return out if copy else None


# --------------------------------------------------------------------------------------------
# decode
# --------------------------------------------------------------------------------------------
def _scanpy_layout(reference: ad.AnnData, key: str) -> tuple[str, str] | None:
    """``(varm key, uns key)`` of a :func:`scanpy.pp.pca` result stored as ``obsm[key]``, if any.

    scanpy writes ``obsm["X_pca"]``, ``varm["PCs"]`` and ``uns["pca"]`` by default, and
    ``obsm[k]``, ``varm[k]``, ``uns[k]`` with ``key_added=k``.
    """
    if key not in reference.obsm:
        return None
    layouts = [(key, key), *([("PCs", "pca")] if key == "X_pca" else [])]
    for varm_key, uns_key in layouts:
        info = reference.uns.get(uns_key)
        if varm_key in reference.varm and isinstance(info, Mapping) and isinstance(info.get("params"), Mapping):
            return varm_key, uns_key
    return None


def _scanpy_pca_info(reference: ad.AnnData, key: str, varm_key: str, uns_key: str) -> dict[str, Any]:
    """The decoder of a scanpy PCA, checked against the embedding it produced.

    scanpy keeps the loadings (``varm``) but not the gene means it centred on; they are the
    means of the matrix it read (``X``, or ``params["layer"]``) over the genes it used
    (``params["mask_var"]``). Re-projecting a sample of cells confirms that this matrix is
    still the one the PCA saw.
    """
    params = reference.uns[uns_key]["params"]
    layer = params.get("layer")
    where = f"reference.layers[{layer!r}]" if layer else "reference.X"
    matrix = _gene_matrix(reference, layer or "X", "the PCA's layer")
    mask_var = params.get("mask_var", "highly_variable" if params.get("use_highly_variable") else None)
    if isinstance(mask_var, str):
        if mask_var not in reference.var:
            raise CellflowKeyError(
                f"the scanpy PCA {key!r} used the genes of reference.var[{mask_var!r}], which is gone; valid "
                f"columns: {format_choices(reference.var.columns)}."
            )
        genes = reference.var[mask_var].to_numpy(dtype=bool)
    else:
        genes = np.ones(reference.n_vars, dtype=bool)
    loadings = np.asarray(reference.varm[varm_key])[genes]  # (n_genes used, n_comps)
    used = matrix[:, genes]
    if params.get("zero_center", True):
        mean = np.asarray(used.mean(axis=0, dtype=np.float64)).ravel()
    else:
        mean = np.zeros(loadings.shape[0])
    sample = np.unique(np.linspace(0, reference.n_obs - 1, min(reference.n_obs, 256)).astype(int))
    rows = used[sample]
    rows = rows.toarray() if sp.issparse(rows) else np.asarray(rows)
    projected = (rows - mean) @ loadings
    embedding = np.asarray(reference.obsm[key])[sample, : loadings.shape[1]]
    if not np.allclose(projected, embedding, rtol=1e-3, atol=1e-3 * float(np.abs(embedding).max() + 1e-12)):
        raise CellflowValueError(
            f"reference.obsm[{key!r}] (from scanpy.pp.pca) is not {where} projected on reference.varm[{varm_key!r}]: "
            f"{where} changed after the PCA (scaled, filtered or replaced), so the gene means it was centred on are "
            "lost. Decode with the AnnData as it was when the PCA ran, or run cellflow.pp.pca, which stores them."
        )
    dtype = loadings.dtype if np.issubdtype(loadings.dtype, np.floating) else np.float32
    return {
        "mean": mean.astype(dtype),
        "components": np.ascontiguousarray(loadings.T, dtype=dtype),
        "var_names": np.asarray(reference.var_names[genes], dtype=object),
        "rep": layer or "X",
        "n_comps": loadings.shape[1],
    }


def _pca_info(reference: ad.AnnData | Mapping[str, Any], key: str) -> Mapping[str, Any]:
    if isinstance(reference, ad.AnnData):
        cellflow_info = reference.uns.get(key)
        if not (isinstance(cellflow_info, Mapping) and "components" in cellflow_info):
            layout = _scanpy_layout(reference, key)
            if layout is not None:
                return _scanpy_pca_info(reference, key, *layout)
        if key not in reference.uns:
            raise CellflowKeyError(
                f"key={key!r} is not in reference.uns, so there is no PCA decoder to use; run "
                f"cellflow.pp.pca(reference, key_added={key!r}) first. uns keys present: "
                f"{format_choices(reference.uns.keys())}."
            )
        info = reference.uns[key]
        where = f"reference.uns[{key!r}]"
    elif isinstance(reference, Mapping):
        info = reference
        where = "reference"
    else:
        raise CellflowValueError(
            f"reference must be the AnnData on which cellflow.pp.pca was run, or its uns dict; got "
            f"{type(reference).__name__}."
        )
    if not isinstance(info, Mapping):
        raise CellflowValueError(f"{where} is a {type(info).__name__}, not a dict written by cellflow.pp.pca.")
    missing = [k for k in ("mean", "components") if k not in info]
    if missing:
        raise CellflowKeyError(
            f"{where} lacks {format_choices(missing)}; it was not written by cellflow.pp.pca "
            f"(keys present: {format_choices(info.keys())}). Run cellflow.pp.pca(..., key_added={key!r})."
        )
    return info


def decode(x: Any, reference: ad.AnnData | Mapping[str, Any], *, key: str = "X_pca") -> np.ndarray:
    """Map PCA embeddings back to gene space: ``mean + x @ components``.

    Parameters
    ----------
    x
        Embeddings of shape ``(..., n_comps)`` (NumPy, JAX or anything array-like); a single
        cell may be given as a 1-d array.
    reference
        The AnnData on which :func:`pca` was run (its ``uns[key]`` is read), or that dict itself;
        or an AnnData on which :func:`scanpy.pp.pca` was run (``obsm[key]`` with scanpy's
        ``varm``/``uns`` entries): its gene means, which scanpy does not keep, are recomputed
        from the matrix it read, after checking that this matrix still gives ``obsm[key]``.
    key
        ``key_added`` used in :func:`pca` (the ``obsm`` key for a scanpy PCA).

    Returns
    -------
    np.ndarray of shape ``(..., n_genes)`` over ``uns[key]["var_names"]``, in the precision of
    the stored components (float32 unless the PCA was run on float64 data).
    """
    info = _pca_info(reference, key)
    components = np.asarray(info["components"])
    mean = np.asarray(info["mean"])
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[-1] != components.shape[0]:
        raise CellflowValueError(
            f"x has shape {x.shape} but the PCA {key!r} has components of shape {components.shape} "
            f"(n_comps, n_genes); x must be (..., {components.shape[0]})."
        )
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(components.dtype)
    return (x @ components + mean).astype(np.result_type(components.dtype, np.float32), copy=False)


def decode_adata(
    adata: ad.AnnData,
    reference: ad.AnnData | Mapping[str, Any],
    *,
    rep: str = "X_pca",
    key: str = "X_pca",
) -> ad.AnnData:
    """Decode the embedding ``rep`` of every cell of ``adata`` into a gene-space AnnData.

    Parameters
    ----------
    adata
        AnnData holding embeddings, e.g. predicted cells, in ``obsm[rep]`` (or ``X`` / a layer).
    reference
        The AnnData on which :func:`pca` was run, or its ``uns[key]`` dict.
    rep
        Where the embeddings of ``adata`` live: an ``obsm`` key (looked up first), a layer or
        ``"X"``.
    key
        ``key_added`` used in :func:`pca`.

    Returns
    -------
    A new :class:`~anndata.AnnData` with ``X`` the decoded expression (dense), ``obs`` a copy of
    ``adata.obs`` and ``var`` the reference's ``var`` rows for the genes used by the PCA (just
    their names when ``reference`` is a dict or lacks some of them). The decoded values are in
    the scale the PCA read (e.g. log-normalised when it read ``"logcounts"``), so they are also
    stored under that layer's name, and ``uns["cellflow"]["rep"]`` names it:
    :func:`cellflow.metrics.evaluate` and :func:`cellflow.pl.embedding` then read the observed
    cells' matching layer, not their raw counts in ``X``.
    """
    info = _pca_info(reference, key)
    pca_rep = str(info.get("rep", "X"))
    x = get_representation(adata, rep)
    decoded = decode(x, info, key=key)
    n_genes = decoded.shape[1]
    if "var_names" in info:
        var_names = pd.Index(np.asarray(info["var_names"]).astype(str))
    else:
        var_names = pd.Index([str(i) for i in range(n_genes)])
    if len(var_names) != n_genes:
        raise CellflowValueError(
            f"the PCA {key!r} stores {len(var_names)} var_names but components for {n_genes} genes."
        )
    if isinstance(reference, ad.AnnData) and var_names.isin(reference.var_names).all():
        var = reference.var.loc[var_names].copy()
    else:
        var = pd.DataFrame(index=var_names)
    out = ad.AnnData(X=decoded, obs=adata.obs.copy(), var=var)
    recorded = adata.uns.get("cellflow")
    out.uns["cellflow"] = {**(dict(recorded) if isinstance(recorded, Mapping) else {}), "rep": pca_rep, "decoded_from": rep}
    if pca_rep != "X":
        # a copy, so that editing X does not silently edit the layer as well
        out.layers[pca_rep] = decoded.copy()
    return out


def project(
    adata: ad.AnnData, reference: ad.AnnData | Mapping[str, Any], *, key: str = "X_pca", copy: bool = True
) -> ad.AnnData | None:
    """Embed new cells in a PCA fitted earlier with :func:`pca` (on other cells).

    A model trained in a PCA space predicts only from cells embedded on the same axes: a new
    patient's control cells, measured later, go through this function with the training data
    as ``reference``, not through a PCA of their own.

    Parameters
    ----------
    adata
        The new cells, holding the PCA's genes in ``X`` or in the layer the PCA read (matched by
        var name: other genes, and another gene order, are fine).
    reference
        The AnnData on which :func:`pca` was run (its ``uns[key]`` is read), or that dict itself.
    key
        ``key_added`` used in :func:`pca`; also where the embedding is written.
    copy
        If ``True`` (default), return a new AnnData; if ``False``, write into ``adata`` and return
        ``None``.

    Returns
    -------
    ``obsm[key]``: ``(n_obs, n_comps)``, ``(x - mean) @ components.T`` with the reference's mean
    and components; ``uns[key]``: a copy of the reference's PCA description (so :func:`decode`
    works on the new cells, and a model can tell that both are on the same axes).

    Raises
    ------
    CellflowValueError
        ``adata`` lacks some of the PCA's genes (they are named).
    CellflowKeyError
        ``adata`` lacks the layer the PCA read.
    """
    info = _pca_info(reference, key)
    components, mean = np.asarray(info["components"]), np.asarray(info["mean"])
    rep = str(info.get("rep", "X"))
    if rep != "X" and rep not in adata.layers:
        raise CellflowKeyError(
            f"the PCA {key!r} was fitted on layer {rep!r} of the reference, which adata lacks (its layers: "
            f"{format_choices(adata.layers.keys())}); compute it as for the reference cells, e.g. "
            f"cellflow.pp.log_normalize(adata, key_added={rep!r}) for log-normalised counts."
        )
    matrix = _gene_matrix(adata, rep)
    if "var_names" in info:
        columns = feature_columns(adata.var_names, np.asarray(info["var_names"]).astype(str), rep)
        if columns is not None:
            matrix = matrix[:, columns]
    if matrix.shape[1] != components.shape[1]:
        raise CellflowValueError(
            f"rep={rep!r} of adata has {matrix.shape[1]} genes but the PCA {key!r} was fitted on {components.shape[1]}."
        )
    _check_finite_matrix(matrix, "rep", rep)
    # x @ C.T - mean @ C.T: a sparse matrix is never densified
    embedding = np.asarray(matrix @ components.T, dtype=np.float64) - mean.astype(np.float64) @ components.T.astype(np.float64)
    out = adata.copy() if copy else adata
    out.obsm[key] = embedding.astype(components.dtype)
    out.uns[key] = {k: (np.array(v, copy=True) if isinstance(v, np.ndarray) else v) for k, v in info.items()}
    return out if copy else None


# --------------------------------------------------------------------------------------------
# top_degs
# --------------------------------------------------------------------------------------------
def _as_list(value: Any) -> list[Any]:
    if isinstance(value, str) or not isinstance(value, Sequence | np.ndarray | pd.Index):
        return [value]
    return list(value)


def _rank_vs_control(
    matrix: Any,
    labels: np.ndarray,
    groups: list[str],
    var_names: pd.Index,
    *,
    n_genes: int,
    method: str,
    rankby_abs: bool,
) -> dict[str, list[str]]:
    """Run scanpy's rank_genes_groups of every group against the cells labelled ``_CONTROL``."""
    obs = pd.DataFrame({"group": pd.Categorical(labels)}, index=pd.Index([str(i) for i in range(len(labels))]))
    work = ad.AnnData(X=matrix, obs=obs, var=pd.DataFrame(index=var_names))
    with warnings.catch_warnings():
        # scanpy adds five columns per group to one DataFrame, and pandas warns of fragmentation
        # once per column after about twenty groups: hundreds of lines the user can do nothing about
        warnings.simplefilter("ignore", pd.errors.PerformanceWarning)
        sc.tl.rank_genes_groups(
            work,
            "group",
            groups=groups,
            reference=_CONTROL,
            method=method,
            n_genes=n_genes,
            rankby_abs=rankby_abs,
            use_raw=False,
            key_added="degs",
        )
    names = work.uns["degs"]["names"]
    return {g: [str(name) for name in names[g]] for g in groups}


def top_degs(
    adata: ad.AnnData,
    perturbation_key: str,
    control: Any,
    *,
    n_genes: int = 50,
    rep: str = "X",
    groups: Any = None,
    method: Literal["wilcoxon", "t-test", "t-test_overestim_var"] = "wilcoxon",
    groupby_covariates: str | Sequence[str] | None = None,
    rankby_abs: bool = True,
) -> dict[str, list[str]]:
    """Top differentially expressed genes of each perturbation against the control cells.

    Runs :func:`scanpy.tl.rank_genes_groups` with ``reference`` set to the control cells, on a
    private AnnData built from a copy of the relevant cells; ``adata`` is never modified.

    Genes are ranked by the **absolute** test score by default (``rankby_abs=True``), so the
    list holds the most strongly up- *and* down-regulated genes, which is what matters when
    judging predicted responses. Pass ``rankby_abs=False`` for scanpy's default ranking
    (largest positive score first, i.e. up-regulated genes).

    Parameters
    ----------
    adata
        AnnData with log-normalised expression in ``X`` or in layer ``rep``.
    perturbation_key
        Column of ``adata.obs`` holding the perturbation of each cell.
    control
        Value of ``perturbation_key`` marking control cells. Labels are compared as strings
        (as everywhere in cellflow), so ``101`` and ``"101"`` mean the same value.
    n_genes
        Number of genes returned per perturbation; capped at ``adata.n_vars``.
    rep
        ``"X"`` or a layer name.
    groups
        A perturbation value or a list of them (compared as strings, like ``control``); ``None``
        uses every value present other than ``control``.
    method
        Test of :func:`scanpy.tl.rank_genes_groups`: ``"wilcoxon"``, ``"t-test"`` or
        ``"t-test_overestim_var"`` (``"logreg"`` has no control reference and is not offered).
    groupby_covariates
        obs column(s), e.g. the cell type. If given, every stratum (each combination of the
        covariate values) is tested separately, perturbed cells against the control cells of
        the same stratum; strata without at least 2 control cells and perturbations with fewer
        than 2 cells in a stratum are skipped with a warning.
    rankby_abs
        Rank by absolute score (default) or by signed score.

    Returns
    -------
    dict mapping each perturbation (as a string) to its ``n_genes`` top genes, best first. With
    ``groupby_covariates`` the keys are the covariate values and the perturbation joined by
    ``"_"``, e.g. ``"B cells_stim"``.
    """
    if not isinstance(perturbation_key, str) or perturbation_key not in adata.obs.columns:
        raise CellflowKeyError(
            f"perturbation_key={perturbation_key!r} is not a column of adata.obs; valid choices: "
            f"{format_choices(adata.obs.columns)}."
        )
    if method not in _DEG_METHODS:
        raise CellflowKeyError(f"method={method!r} is not supported; valid choices: {format_choices(_DEG_METHODS)}.")
    n_genes = min(_check_positive_int(n_genes, "n_genes"), adata.n_vars)
    covariates = [] if groupby_covariates is None else _as_list(groupby_covariates)
    for cov in covariates:
        if cov not in adata.obs.columns or cov == perturbation_key:
            raise CellflowKeyError(
                f"groupby_covariates entry {cov!r} is not a column of adata.obs other than the perturbation_key; "
                f"valid choices: {format_choices(c for c in adata.obs.columns if c != perturbation_key)}."
            )
    matrix = _gene_matrix(adata, rep)

    column = adata.obs[perturbation_key]
    # labels are compared as strings, like everywhere else in cellflow (ResponseModel, splits,
    # standardize_to_control): control=101 finds the cells labelled "101" and vice versa
    labels_all = np.where(column.notna().to_numpy(), column.astype(str).to_numpy(dtype=object), None)
    present_raw = list(pd.unique(column.dropna()))
    present = list(dict.fromkeys(str(v) for v in present_raw))
    control_label = str(control)
    is_control = labels_all == control_label
    if not is_control.any():
        raise CellflowKeyError(
            f"control={control!r} does not occur in adata.obs[{perturbation_key!r}]; values present: "
            f"{format_choices(present)}."
        )
    if groups is None:
        names = [v for v in present if v != control_label]
        if isinstance(column.dtype, pd.CategoricalDtype):  # keep the category order
            kept = set(names)
            names = [str(c) for c in column.cat.categories if str(c) in kept]
    else:
        requested = _as_list(groups)
        present_set = set(present)
        missing = [g for g in requested if str(g) not in present_set]
        if missing:
            raise CellflowKeyError(
                f"groups {format_choices(missing)} do not occur in adata.obs[{perturbation_key!r}]; values present: "
                f"{format_choices(present)}."
            )
        if any(str(g) == control_label for g in requested):
            raise CellflowValueError(f"groups must not include the control value {control!r}.")
        names = list(dict.fromkeys(str(g) for g in requested))
    if not names:
        raise CellflowValueError(
            f"adata.obs[{perturbation_key!r}] holds no perturbed cells besides control={control!r}."
        )
    if len(present) < len(present_raw):
        # distinct values that print alike (1 and "1" in an object column) would be merged
        printed = pd.Series([str(v) for v in present_raw]).value_counts()
        clashes = sorted(printed.index[printed > 1])
        if set(clashes) & {control_label, *names}:
            raise CellflowValueError(
                f"adata.obs[{perturbation_key!r}] holds distinct values that are equal as strings: "
                f"{format_choices(clashes)}; labels are compared as strings, so make them distinct."
            )
    if _CONTROL in names:
        raise CellflowValueError(f"perturbation value {_CONTROL!r} is reserved by top_degs; rename it.")
    group_masks = {name: labels_all == name for name in names}

    var_names = pd.Index(adata.var_names.astype(str))
    if covariates:
        strata = adata.obs[covariates].astype(str).agg("_".join, axis=1).to_numpy()
        strata_order = list(pd.unique(adata.obs[covariates].dropna().astype(str).agg("_".join, axis=1)))
    else:
        strata = np.full(adata.n_obs, "", dtype=object)
        strata_order = [""]

    result: dict[str, list[str]] = {}
    skipped: list[str] = []
    for stratum in strata_order:
        in_stratum = strata == stratum
        ctrl = is_control & in_stratum
        sizes = {name: int((mask & in_stratum).sum()) for name, mask in group_masks.items()}
        prefix = f"{stratum}_" if covariates else ""
        if ctrl.sum() < 2:
            if not covariates:
                raise CellflowValueError(f"control={control!r} has {int(ctrl.sum())} cell(s); at least 2 are needed.")
            skipped += [f"{prefix}{name} (stratum has {int(ctrl.sum())} control cell(s))" for name, n in sizes.items() if n]
            continue
        small = [name for name, n in sizes.items() if 0 < n < 2]
        if small:
            if not covariates:
                raise CellflowValueError(f"groups {format_choices(small)} have a single cell; at least 2 are needed.")
            skipped += [f"{prefix}{name} (1 cell)" for name in small]
        tested = [name for name, n in sizes.items() if n >= 2]
        if not tested:
            continue
        labels = np.full(adata.n_obs, None, dtype=object)
        labels[ctrl] = _CONTROL
        for name in tested:
            labels[group_masks[name] & in_stratum] = name
        rows = np.flatnonzero(pd.notna(labels))
        ranked = _rank_vs_control(
            matrix[rows],  # fancy indexing copies: adata is never touched
            labels[rows].astype(str),
            tested,
            var_names,
            n_genes=n_genes,
            method=method,
            rankby_abs=rankby_abs,
        )
        result.update({f"{prefix}{name}": genes for name, genes in ranked.items()})
    if skipped:
        warnings.warn(
            f"top_degs skipped {len(skipped)} perturbation/stratum pair(s) with too few cells: {format_choices(skipped)}.",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    return result


# --------------------------------------------------------------------------------------------
# scaling against control cells
# --------------------------------------------------------------------------------------------
def standardize_to_control(
    adata: ad.AnnData,
    perturbation_key: str,
    control: Any,
    *,
    rep: str = "X",
    min_std: float = 1e-6,
) -> ad.AnnData:
    """Z-score every feature against the control cells, dropping features constant in controls.

    ``x' = (x - mean_control) / std_control``, feature by feature, so that a unit means "one
    standard deviation of untreated variation" in every feature (CellProfiler and other
    image features come in wildly different units). For plate-wise normalisation of screens,
    apply it per plate.

    Parameters
    ----------
    adata
        The AnnData; not modified.
    perturbation_key
        ``obs`` column marking control cells.
    control
        Value of ``perturbation_key`` for control cells.
    rep
        ``"X"``, a layer or an ``obsm`` key (e.g. ``"X_pca"``) to scale.
    min_std
        Features whose control standard deviation is at most this are dropped.

    Returns
    -------
    A new AnnData with the scaled features in ``X`` (float32) whatever ``rep`` was, and the kept
    features only. Its ``var`` has a row per kept feature: the input's ``var`` rows for ``X`` or
    a layer; for an ``obsm`` key, the entry's column names (DataFrame) or ``f"{rep}_{j}"``, ``j``
    the column in ``obsm[rep]`` (``"X_pca_0"``, ...). The control means and standard deviations
    are stored in ``var["control_mean"]`` and ``var["control_std"]``.
    """
    if perturbation_key not in adata.obs.columns:
        raise CellflowKeyError(
            f"perturbation_key={perturbation_key!r} is not a column of adata.obs; valid choices: "
            f"{format_choices(adata.obs.columns)}."
        )
    is_control = (adata.obs[perturbation_key].astype(str) == str(control)).to_numpy()
    if is_control.sum() < 2:
        raise CellflowValueError(
            f"control={control!r} marks {int(is_control.sum())} cell(s) in adata.obs[{perturbation_key!r}]; at least 2 "
            f"are needed. Values present: {format_choices(sorted(adata.obs[perturbation_key].astype(str).unique()))}."
        )
    values = get_representation(adata, rep, dtype=np.float64)
    features = feature_table(adata, rep)
    mean = values[is_control].mean(axis=0)
    std = values[is_control].std(axis=0)
    keep = std > min_std
    scaled = ((values[:, keep] - mean[keep]) / std[keep]).astype(np.float32)
    var = features.iloc[np.flatnonzero(keep)].copy()
    var["control_mean"], var["control_std"] = mean[keep], std[keep]
    return ad.AnnData(X=scaled, obs=adata.obs.copy(), var=var)
