"""Tests of cellflow.pp: log_normalize, pca, decode / decode_adata, top_degs."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
from conftest import shared_file

from cellflow import pp
from cellflow._errors import CellflowKeyError, CellflowValueError

MUSCAT = "kang2018_muscat_example_sce.h5ad"
SCGEN = "kang2018_scgen_valid_pbmc.h5ad"
IFN_GENES = ["ISG15", "IFI6", "IFIT1", "IFIT3", "MX1"]


# ------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------
def _low_rank(rng: np.random.Generator, n_obs: int = 200, n_vars: int = 40, rank: int = 5) -> np.ndarray:
    scores = rng.normal(size=(n_obs, rank)) * np.linspace(5.0, 1.0, rank)
    loadings = rng.normal(size=(rank, n_vars))
    return scores @ loadings + rng.uniform(1.0, 3.0, size=n_vars)


@pytest.fixture
def low_rank_adata(rng) -> ad.AnnData:
    x = _low_rank(rng)
    obs = pd.DataFrame({"condition": rng.choice(["ctrl", "drug"], size=x.shape[0])}, index=[f"c{i}" for i in range(x.shape[0])])
    var = pd.DataFrame({"symbol": [f"S{j}" for j in range(x.shape[1])]}, index=[f"g{j}" for j in range(x.shape[1])])
    return ad.AnnData(X=x, obs=obs, var=var)


@pytest.fixture(scope="module")
def muscat() -> ad.AnnData:
    return ad.read_h5ad(shared_file(MUSCAT))


def _snapshot(adata: ad.AnnData) -> dict:
    x = adata.X.toarray() if sp.issparse(adata.X) else np.array(adata.X)
    return {
        "X": x,
        "sparse": sp.issparse(adata.X),
        "layers": {k: (v.toarray() if sp.issparse(v) else np.array(v)) for k, v in adata.layers.items()},
        "obsm": sorted(adata.obsm.keys()),
        "uns": sorted(adata.uns.keys()),
        "obs": adata.obs.copy(),
        "var": adata.var.copy(),
    }


def _assert_unchanged(adata: ad.AnnData, before: dict) -> None:
    after = _snapshot(adata)
    np.testing.assert_array_equal(after["X"], before["X"])
    assert after["sparse"] == before["sparse"]
    assert after["layers"].keys() == before["layers"].keys()
    for k in before["layers"]:
        np.testing.assert_array_equal(after["layers"][k], before["layers"][k])
    assert after["obsm"] == before["obsm"]
    assert after["uns"] == before["uns"]
    pd.testing.assert_frame_equal(after["obs"], before["obs"])
    pd.testing.assert_frame_equal(after["var"], before["var"])


# ------------------------------------------------------------------------------------------
# pca / decode on synthetic data
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("n_comps", [5, 8])
def test_pca_decode_reconstructs_low_rank(low_rank_adata, sparse, n_comps):
    if sparse:
        low_rank_adata.X = sp.csr_matrix(low_rank_adata.X)
    out = pp.pca(low_rank_adata, n_comps)
    x = low_rank_adata.X.toarray() if sparse else low_rank_adata.X
    decoded = pp.decode(out.obsm["X_pca"], out)
    assert decoded.shape == x.shape
    np.testing.assert_allclose(decoded, x, atol=1e-8 * np.abs(x).max())


def test_pca_float32_reconstructs(low_rank_adata):
    low_rank_adata.X = low_rank_adata.X.astype(np.float32)
    out = pp.pca(low_rank_adata, 6)
    assert out.obsm["X_pca"].dtype == np.float32
    decoded = pp.decode(out.obsm["X_pca"], out)
    assert decoded.dtype == np.float32
    np.testing.assert_allclose(decoded, low_rank_adata.X, atol=1e-4 * np.abs(low_rank_adata.X).max())


def test_pca_too_few_components_is_lossy(low_rank_adata):
    out = pp.pca(low_rank_adata, 2)
    err = np.abs(pp.decode(out.obsm["X_pca"], out) - low_rank_adata.X).max()
    assert err > 1e-2


def test_pca_matches_scanpy_reconstruction(rng):
    x = rng.normal(size=(150, 30)) + rng.uniform(0, 2, size=30)
    adata = ad.AnnData(X=x)
    out = pp.pca(adata, 10, random_state=0)

    ref = ad.AnnData(X=x.copy())
    sc.pp.pca(ref, n_comps=10, random_state=0, dtype="float64")
    scanpy_recon = x.mean(axis=0) + ref.obsm["X_pca"] @ ref.varm["PCs"].T

    np.testing.assert_allclose(pp.decode(out.obsm["X_pca"], out), scanpy_recon, atol=1e-10)
    np.testing.assert_allclose(out.uns["X_pca"]["variance_ratio"], ref.uns["pca"]["variance_ratio"], rtol=1e-10)
    # same subspace and the same scores up to the sign of each component
    signs = np.sign(np.sum(out.obsm["X_pca"] * ref.obsm["X_pca"], axis=0))
    np.testing.assert_allclose(out.obsm["X_pca"] * signs, ref.obsm["X_pca"], atol=1e-10)


@pytest.mark.parametrize("sparse", [False, True])
def test_decode_reads_a_pca_made_by_scanpy(low_rank_adata, sparse):
    adata = low_rank_adata.copy()
    adata.var["keep"] = np.arange(adata.n_vars) % 4 != 0
    adata.layers["work"] = adata.X.copy()
    if sparse:
        adata.X = sp.csr_matrix(adata.X)
    sc.pp.pca(adata, n_comps=5, mask_var="keep")  # obsm X_pca, varm PCs, uns pca
    sc.pp.pca(adata, n_comps=4, layer="work", key_added="pcs_work")  # obsm, varm and uns under one key
    dense = adata.X.toarray() if sp.issparse(adata.X) else adata.X

    decoded = pp.decode_adata(adata[:30], adata)  # rank 5: the embedding holds every cell exactly
    assert list(decoded.var_names) == list(adata.var_names[adata.var["keep"]])
    np.testing.assert_allclose(decoded.X, dense[:30][:, adata.var["keep"].to_numpy()], rtol=1e-4, atol=1e-4)
    # four components of the layer: the mean plus the projection onto scanpy's loadings
    work = adata.layers["work"]
    expected = work.mean(0) + (work - work.mean(0)) @ adata.varm["pcs_work"] @ adata.varm["pcs_work"].T
    on_layer = pp.decode_adata(adata[:30], adata, rep="pcs_work", key="pcs_work")
    np.testing.assert_allclose(on_layer.layers["work"], expected[:30], rtol=1e-4, atol=1e-4)
    assert on_layer.uns["cellflow"]["rep"] == "work"

    # the matrix the PCA read was changed afterwards: its means are no longer the PCA's
    scaled = adata.copy()
    scaled.X = dense * 2.0
    with pytest.raises(CellflowValueError, match=r"obsm\['X_pca'\] \(from scanpy.pp.pca\) is not reference.X projected"):
        pp.decode(adata.obsm["X_pca"][:3], scaled)
    del scaled.var["keep"]
    with pytest.raises(CellflowKeyError, match=r"reference.var\['keep'\], which is gone"):
        pp.decode(adata.obsm["X_pca"][:3], scaled)


def test_pca_uns_contents(low_rank_adata):
    out = pp.pca(low_rank_adata, 7, key_added="emb")
    info = out.uns["emb"]
    assert out.obsm["emb"].shape == (low_rank_adata.n_obs, 7)
    assert info["mean"].shape == (low_rank_adata.n_vars,)
    assert info["components"].shape == (7, low_rank_adata.n_vars)
    np.testing.assert_allclose(info["components"] @ info["components"].T, np.eye(7), atol=1e-10)
    np.testing.assert_allclose(info["mean"], low_rank_adata.X.mean(axis=0), atol=1e-12)
    assert info["rep"] == "X"
    assert info["variance_ratio"].shape == (7,)
    assert np.all(np.diff(info["variance_ratio"]) <= 1e-12)
    assert list(info["var_names"]) == list(low_rank_adata.var_names)
    assert "X_pca" not in out.obsm


def test_pca_sparse_equals_dense(low_rank_adata):
    dense = pp.pca(low_rank_adata, 4)
    sparse_in = low_rank_adata.copy()
    sparse_in.X = sp.csr_matrix(sparse_in.X)
    sparse = pp.pca(sparse_in, 4)
    assert sp.issparse(sparse.X)  # the matrix is not densified in the result
    np.testing.assert_allclose(
        pp.decode(sparse.obsm["X_pca"], sparse), pp.decode(dense.obsm["X_pca"], dense), atol=1e-8
    )


def test_pca_on_layer_and_n_comps_equal_to_n_genes(rng):
    x = rng.normal(size=(50, 12))
    adata = ad.AnnData(X=np.zeros_like(x), layers={"expr": x})
    out = pp.pca(adata, 12, rep="expr")
    assert out.uns["X_pca"]["rep"] == "expr"
    np.testing.assert_allclose(pp.decode(out.obsm["X_pca"], out), x, atol=1e-10)


def test_pca_copy_semantics(low_rank_adata):
    before = _snapshot(low_rank_adata)
    out = pp.pca(low_rank_adata, 5)
    assert out is not low_rank_adata
    _assert_unchanged(low_rank_adata, before)

    sparse_in = low_rank_adata.copy()
    sparse_in.X = sp.csr_matrix(sparse_in.X)
    before = _snapshot(sparse_in)
    pp.pca(sparse_in, 5, n_top_genes=20)
    _assert_unchanged(sparse_in, before)

    assert pp.pca(low_rank_adata, 5, copy=False) is None
    assert "X_pca" in low_rank_adata.obsm and "X_pca" in low_rank_adata.uns
    np.testing.assert_array_equal(low_rank_adata.X, before["X"])


def test_pca_n_top_genes(rng):
    n_obs, n_vars = 300, 120
    mu = np.geomspace(2.0, 20.0, n_vars)
    x = rng.poisson(mu, size=(n_obs, n_vars)).astype(np.float64)
    planted = np.arange(5, n_vars, 12)  # 10 over-dispersed genes spread over the range of means
    on = rng.random((n_obs, planted.size)) < 0.5
    x[:, planted] = rng.poisson(2 * mu[planted], size=(n_obs, planted.size)) * on
    adata = ad.AnnData(X=sp.csr_matrix(np.log1p(x)), var=pd.DataFrame(index=[f"g{j}" for j in range(n_vars)]))
    out = pp.pca(adata, 5, n_top_genes=15)
    info = out.uns["X_pca"]
    assert len(info["var_names"]) == 15
    assert info["components"].shape == (5, 15) and info["mean"].shape == (15,)
    assert info["n_top_genes"] == 15 and info["hvg_flavor"] == "seurat"
    assert info["highly_variable"].shape == (n_vars,) and info["highly_variable"].sum() == 15
    assert list(info["var_names"]) == list(adata.var_names[info["highly_variable"]])
    # the selection is scanpy's, on the chosen matrix
    ref = adata.copy()
    sc.pp.highly_variable_genes(ref, n_top_genes=15, flavor="seurat")
    np.testing.assert_array_equal(info["highly_variable"], ref.var["highly_variable"].to_numpy())
    assert len({f"g{j}" for j in planted} & set(info["var_names"])) >= 8
    # PCA on the selected genes only
    sub = pp.pca(adata[:, info["highly_variable"]].copy(), 5)
    np.testing.assert_allclose(pp.decode(out.obsm["X_pca"], out), pp.decode(sub.obsm["X_pca"], sub), atol=1e-6)
    decoded = pp.decode_adata(out, out)
    assert list(decoded.var_names) == list(info["var_names"])
    assert decoded.shape == (n_obs, 15)


def test_pca_hvg_on_counts_warns(rng):
    adata = ad.AnnData(X=rng.poisson(2.0, size=(100, 30)).astype(np.float32))
    with pytest.warns(UserWarning, match="raw counts"):
        pp.pca(adata, 3, n_top_genes=10)


def test_pca_h5ad_roundtrip(low_rank_adata, tmp_path):
    out = pp.pca(low_rank_adata, 5)
    path = tmp_path / "pca.h5ad"
    out.write_h5ad(path)
    back = ad.read_h5ad(path)
    np.testing.assert_allclose(pp.decode(back.obsm["X_pca"], back), pp.decode(out.obsm["X_pca"], out))
    assert pp.decode_adata(back, back).var_names.equals(out.var_names)


def test_decode_shapes_and_dict_reference(low_rank_adata):
    out = pp.pca(low_rank_adata, 5)
    z = out.obsm["X_pca"]
    full = pp.decode(z, out)
    np.testing.assert_allclose(pp.decode(z[0], out.uns["X_pca"]), full[0])
    stacked = pp.decode(np.stack([z[:10], z[10:20]]), out)
    assert stacked.shape == (2, 10, low_rank_adata.n_vars)
    np.testing.assert_allclose(stacked[1], full[10:20])


def test_decode_adata(low_rank_adata):
    out = pp.pca(low_rank_adata, 5)
    pred = ad.AnnData(
        X=np.zeros((4, 1)),
        obs=pd.DataFrame({"condition": ["a", "b", "c", "d"]}, index=list("wxyz")),
        obsm={"X_pca": out.obsm["X_pca"][:4], "other": out.obsm["X_pca"][4:8]},
    )
    dec = pp.decode_adata(pred, out)
    assert dec.shape == (4, low_rank_adata.n_vars)
    pd.testing.assert_frame_equal(dec.obs, pred.obs)
    pd.testing.assert_frame_equal(dec.var, low_rank_adata.var)
    np.testing.assert_allclose(dec.X, low_rank_adata.X[:4], atol=1e-5)
    dec_other = pp.decode_adata(pred, out.uns["X_pca"], rep="other")
    np.testing.assert_allclose(dec_other.X, low_rank_adata.X[4:8], atol=1e-5)
    assert list(dec_other.var_names) == list(low_rank_adata.var_names)


# ------------------------------------------------------------------------------------------
# pca / decode errors
# ------------------------------------------------------------------------------------------
def test_decode_missing_key(low_rank_adata):
    with pytest.raises(CellflowKeyError, match="X_pca") as err:
        pp.decode(np.zeros((2, 3)), low_rank_adata)
    assert "cellflow.pp.pca" in str(err.value)
    out = pp.pca(low_rank_adata, 3)
    with pytest.raises(CellflowKeyError, match="'nope'"):
        pp.decode(np.zeros((2, 3)), out, key="nope")
    with pytest.raises(CellflowKeyError, match="components"):
        pp.decode(np.zeros((2, 3)), {"mean": np.zeros(4)})


def test_decode_dimension_mismatch(low_rank_adata):
    out = pp.pca(low_rank_adata, 3)
    with pytest.raises(CellflowValueError) as err:
        pp.decode(np.zeros((2, 4)), out)
    msg = str(err.value)
    assert "(2, 4)" in msg and f"(3, {low_rank_adata.n_vars})" in msg
    pred = ad.AnnData(X=np.zeros((2, 1)), obsm={"X_pca": np.zeros((2, 7))})
    with pytest.raises(CellflowValueError, match=r"\(2, 7\)"):
        pp.decode_adata(pred, out)
    with pytest.raises(CellflowKeyError, match="'missing'"):
        pp.decode_adata(pred, out, rep="missing")


def test_pca_errors(low_rank_adata):
    with pytest.raises(CellflowKeyError, match="'counts'") as err:
        pp.pca(low_rank_adata, 3, rep="counts")
    assert "'X'" in str(err.value)
    with pytest.raises(CellflowValueError, match="n_comps=41"):
        pp.pca(low_rank_adata, 41)
    with pytest.raises(CellflowValueError, match="n_comps"):
        pp.pca(low_rank_adata, 0)
    with pytest.raises(CellflowValueError, match="n_top_genes=100"):
        pp.pca(low_rank_adata, 3, n_top_genes=100)
    with pytest.raises(CellflowKeyError, match="hvg_flavor='bogus'"):
        pp.pca(low_rank_adata, 3, n_top_genes=10, hvg_flavor="bogus")
    bad = low_rank_adata.copy()
    bad.X[0, 0] = np.nan
    with pytest.raises(CellflowValueError, match="NaN"):
        pp.pca(bad, 3)


# ------------------------------------------------------------------------------------------
# log_normalize
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparse", [False, True])
def test_log_normalize(rng, sparse):
    counts = rng.poisson(3.0, size=(40, 25)).astype(np.int64)
    counts[:, 0] += 1  # no empty cells
    adata = ad.AnnData(X=sp.csr_matrix(counts) if sparse else counts.copy())
    before = _snapshot(adata)
    out = pp.log_normalize(adata, target_sum=100.0)
    _assert_unchanged(adata, before)
    result = out.layers["logcounts"]
    assert sp.issparse(result) == sparse
    result = result.toarray() if sparse else result
    expected = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 100.0)
    np.testing.assert_allclose(result, expected, rtol=1e-5)
    np.testing.assert_array_equal(out.X.toarray() if sparse else out.X, counts)  # X stays raw counts


def test_log_normalize_layer_and_in_place(rng):
    counts = rng.poisson(3.0, size=(20, 10)).astype(np.float32) + 1
    adata = ad.AnnData(X=np.zeros_like(counts), layers={"counts": counts.copy()})
    assert pp.log_normalize(adata, layer="counts", key_added="lognorm", target_sum=None, copy=False) is None
    totals = counts.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(adata.layers["lognorm"], np.log1p(counts / totals * np.median(totals)), rtol=1e-5)
    np.testing.assert_array_equal(adata.layers["counts"], counts)


def test_log_normalize_errors(rng):
    adata = ad.AnnData(X=rng.normal(size=(5, 4)))
    with pytest.raises(CellflowValueError, match="negative"):
        pp.log_normalize(adata)
    with pytest.raises(CellflowKeyError, match="'counts'") as err:
        pp.log_normalize(adata, layer="counts")
    assert "'X'" in str(err.value)
    with pytest.raises(CellflowValueError, match="target_sum"):
        pp.log_normalize(ad.AnnData(X=np.ones((3, 3))), target_sum=-1)


# ------------------------------------------------------------------------------------------
# top_degs on synthetic data
# ------------------------------------------------------------------------------------------
@pytest.fixture
def deg_adata(rng) -> ad.AnnData:
    """2 cell types x {ctrl, up, down}; 'up' raises g0-g4, 'down' lowers g5-g9 (a lot) and
    raises g10 (a little)."""
    n_per, n_vars = 40, 40
    blocks, obs = [], []
    for cell_type in ("T", "B"):
        for condition in ("ctrl", "up", "down"):
            x = rng.normal(5.0, 1.0, size=(n_per, n_vars))
            if condition == "up":
                x[:, :5] += 4.0
            if condition == "down":
                x[:, 5:10] -= 4.0
                x[:, 10] += 1.0
            blocks.append(x)
            obs += [(condition, cell_type)] * n_per
    obs = pd.DataFrame(obs, columns=["condition", "cell_type"], index=[f"c{i}" for i in range(len(obs))])
    obs = obs.astype("category")
    x = sp.csr_matrix(np.vstack(blocks))  # sparse float64, like the Kang layers (numba kernels compile once)
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(n_vars)]))


def test_top_degs_synthetic(deg_adata):
    before = _snapshot(deg_adata)
    degs = pp.top_degs(deg_adata, "condition", "ctrl", n_genes=5)
    _assert_unchanged(deg_adata, before)
    assert list(degs) == ["down", "up"]  # category order, control excluded
    assert set(degs["up"]) == {f"g{j}" for j in range(5)}
    assert set(degs["down"]) == {f"g{j}" for j in range(5, 10)}  # absolute score: down-regulated genes

    signed = pp.top_degs(deg_adata, "condition", "ctrl", n_genes=5, groups="down", rankby_abs=False)
    assert list(signed) == ["down"]
    assert signed["down"][0] == "g10" and not set(signed["down"]) & {f"g{j}" for j in range(5, 10)}


def test_top_degs_by_covariate(deg_adata):
    degs = pp.top_degs(deg_adata, "condition", "ctrl", n_genes=5, groups=["up"], groupby_covariates="cell_type")
    assert set(degs) == {"T_up", "B_up"}
    for genes in degs.values():
        assert set(genes) == {f"g{j}" for j in range(5)}


def test_top_degs_skips_strata_without_controls(deg_adata):
    keep = ~((deg_adata.obs["cell_type"] == "B") & (deg_adata.obs["condition"] == "ctrl")).to_numpy()
    adata = deg_adata[keep].copy()
    with pytest.warns(UserWarning, match="B_up"):
        degs = pp.top_degs(adata, "condition", "ctrl", n_genes=3, groupby_covariates=["cell_type"])
    assert set(degs) == {"T_up", "T_down"}


def test_top_degs_errors(deg_adata):
    with pytest.raises(CellflowKeyError, match="'drug'") as err:
        pp.top_degs(deg_adata, "drug", "ctrl")
    assert "'condition'" in str(err.value) and "'cell_type'" in str(err.value)
    with pytest.raises(CellflowKeyError, match="'DMSO'") as err:
        pp.top_degs(deg_adata, "condition", "DMSO")
    assert all(f"'{v}'" in str(err.value) for v in ("ctrl", "up", "down"))
    with pytest.raises(CellflowKeyError, match="'sideways'"):
        pp.top_degs(deg_adata, "condition", "ctrl", groups=["up", "sideways"])
    with pytest.raises(CellflowValueError, match="'ctrl'"):
        pp.top_degs(deg_adata, "condition", "ctrl", groups=["up", "ctrl"])
    with pytest.raises(CellflowKeyError, match="method='logreg'"):
        pp.top_degs(deg_adata, "condition", "ctrl", method="logreg")
    with pytest.raises(CellflowKeyError, match="'tissue'"):
        pp.top_degs(deg_adata, "condition", "ctrl", groupby_covariates="tissue")
    with pytest.raises(CellflowKeyError, match="'logcounts'"):
        pp.top_degs(deg_adata, "condition", "ctrl", rep="logcounts")
    with pytest.raises(CellflowValueError, match="n_genes"):
        pp.top_degs(deg_adata, "condition", "ctrl", n_genes=0)


def test_top_degs_n_genes_capped(deg_adata):
    degs = pp.top_degs(deg_adata, "condition", "ctrl", groups="up")  # default n_genes=50 > 40 genes
    assert len(degs["up"]) == deg_adata.n_vars


def test_top_degs_of_many_perturbations_does_not_relay_pandas_fragmentation_warnings():
    # a screen of a few dozen drugs: scanpy's per-group column inserts made pandas warn hundreds of times
    rng = np.random.default_rng(0)
    labels = ["ctrl"] * 20 + [f"drug{i}" for i in range(30) for _ in range(4)]
    adata = ad.AnnData(
        rng.poisson(2.0, size=(len(labels), 12)).astype(np.float32),
        obs=pd.DataFrame({"condition": labels}, index=[f"c{i}" for i in range(len(labels))]),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.PerformanceWarning)
        degs = pp.top_degs(adata, "condition", "ctrl", n_genes=3)
    assert len(degs) == 30 and all(len(genes) == 3 for genes in degs.values())


# ------------------------------------------------------------------------------------------
# real data: Kang et al. 2018
# ------------------------------------------------------------------------------------------
def test_pca_kang_decoded_means(muscat):
    before = _snapshot(muscat)
    out = pp.pca(muscat, 50, rep="logcounts")
    _assert_unchanged(muscat, before)
    assert out.obsm["X_pca"].shape == (muscat.n_obs, 50)
    assert out.uns["X_pca"]["components"].shape == (50, muscat.n_vars)
    stim = (muscat.obs["group_id"] == "stim").to_numpy()
    decoded = pp.decode_adata(out[stim], out)
    assert decoded.n_obs == stim.sum()
    real_means = np.asarray(muscat.layers["logcounts"][stim].mean(axis=0)).ravel()
    corr = np.corrcoef(decoded.X.mean(axis=0), real_means)[0, 1]
    assert corr > 0.99
    # decoding the embedding of the stimulated cells reproduces the per-gene response
    ctrl_means = np.asarray(muscat.layers["logcounts"][~stim].mean(axis=0)).ravel()
    decoded_ctrl = pp.decode(out.obsm["X_pca"][~stim], out).mean(axis=0)
    assert np.corrcoef(decoded.X.mean(axis=0) - decoded_ctrl, real_means - ctrl_means)[0, 1] > 0.99


def test_top_degs_kang_interferon(muscat):
    present = [g for g in IFN_GENES if g in muscat.var_names]
    assert present, "none of the interferon genes is in var_names"
    before = _snapshot(muscat)
    degs = pp.top_degs(muscat, "group_id", "ctrl", rep="logcounts")
    _assert_unchanged(muscat, before)
    assert list(degs) == ["stim"]
    assert len(degs["stim"]) == 50 and len(set(degs["stim"])) == 50
    assert set(present) & set(degs["stim"])


@pytest.mark.filterwarnings("ignore::anndata.OldFormatWarning", "ignore:Moving element:FutureWarning")
def test_top_degs_kang_scgen_by_cell_type():
    adata = ad.read_h5ad(shared_file(SCGEN))
    adata.X = adata.X.astype(np.float64)  # same dtype as the muscat layer: numba kernels compile once
    degs = pp.top_degs(adata, "condition", "control", n_genes=20, groupby_covariates="cell_type")
    assert "CD4T_stimulated" in degs and len(degs) == adata.obs["cell_type"].nunique()
    present = [g for g in IFN_GENES if g in adata.var_names]
    assert present
    assert set(present) & set(degs["CD4T_stimulated"])


def test_standardize_to_control_hand_computed():
    import anndata as ad

    x = np.array([[1.0, 5.0, 2.0], [3.0, 5.0, 4.0], [10.0, 5.0, 0.0]], dtype=np.float32)
    adata = ad.AnnData(X=x, obs={"drug": ["DMSO", "DMSO", "taxol"]})
    before = adata.X.copy()
    out = pp.standardize_to_control(adata, "drug", "DMSO")
    # feature 1 is constant in controls and dropped; control mean (2, 3), std (1, 1)
    np.testing.assert_allclose(out.X, [[-1.0, -1.0], [1.0, 1.0], [8.0, -3.0]])
    assert list(out.var_names) == ["0", "2"]
    np.testing.assert_allclose(out.var["control_mean"], [2.0, 3.0])
    np.testing.assert_array_equal(adata.X, before)
    with pytest.raises(CellflowValueError, match=r"control='ctrl'.*'DMSO'"):
        pp.standardize_to_control(adata, "drug", "ctrl")


def test_standardize_to_control_obsm_rep_names_features_after_the_rep(low_rank_adata):
    adata = pp.pca(low_rank_adata, 4)
    out = pp.standardize_to_control(adata, "condition", "ctrl", rep="X_pca")
    assert list(out.var_names) == ["X_pca_0", "X_pca_1", "X_pca_2", "X_pca_3"]  # not the genes g0..g3
    ctrl = (adata.obs["condition"] == "ctrl").to_numpy()
    z = adata.obsm["X_pca"]
    expected = (z - z[ctrl].mean(axis=0)) / z[ctrl].std(axis=0)
    np.testing.assert_allclose(out.X, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.var["control_mean"], z[ctrl].mean(axis=0), rtol=1e-5, atol=1e-6)
    # fewer columns than var: used to raise a raw IndexError
    adata.obsm["two"] = z[:, :2]
    assert list(pp.standardize_to_control(adata, "condition", "ctrl", rep="two").var_names) == ["two_0", "two_1"]
    adata.layers["same"] = adata.X.copy()
    assert list(pp.standardize_to_control(adata, "condition", "ctrl", rep="same").var_names) == list(adata.var_names)


# ------------------------------------------------------------------------------------------
# labels compared as strings, counts checks
# ------------------------------------------------------------------------------------------
def test_top_degs_compares_control_and_groups_as_strings(deg_adata):
    adata = deg_adata.copy()
    codes = {"ctrl": "101", "up": "107", "down": "110"}
    adata.obs["patient"] = pd.Categorical(adata.obs["condition"].map(codes).astype(str))
    by_string = pp.top_degs(adata, "patient", "101", n_genes=5)
    by_number = pp.top_degs(adata, "patient", 101, n_genes=5)  # raised "control=101 does not occur"
    assert by_number == by_string and set(by_number) == {"107", "110"}
    assert set(by_number["107"]) == {f"g{j}" for j in range(5)}
    assert pp.top_degs(adata, "patient", 101, n_genes=5, groups=[107]) == {"107": by_string["107"]}
    with pytest.raises(CellflowValueError, match="control value 101"):
        pp.top_degs(adata, "patient", 101, groups=["107", "101"])
    # and the other way round: an integer column, labels given as strings
    adata.obs["patient_int"] = adata.obs["patient"].astype(int)
    assert pp.top_degs(adata, "patient_int", "101", n_genes=5) == by_string
    with pytest.raises(CellflowKeyError, match=r"control=102 .*'101'"):
        pp.top_degs(adata, "patient_int", 102)


def test_top_degs_values_equal_as_strings_are_an_error(deg_adata):
    adata = deg_adata.copy()
    values = np.array([1, "1", "ctrl"], dtype=object)
    adata.obs["mixed"] = values[np.arange(adata.n_obs) % 3]
    with pytest.raises(CellflowValueError, match="equal as strings"):
        pp.top_degs(adata, "mixed", "ctrl")


def test_log_normalize_warns_on_input_that_is_not_counts(rng):
    counts = rng.poisson(3.0, size=(60, 20)).astype(np.float32) + 1
    logged = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)
    adata = ad.AnnData(X=sp.csr_matrix(logged), layers={"counts": counts})
    with pytest.warns(UserWarning, match=r"layer='X' does not look like raw counts.*non-integer"):
        pp.log_normalize(adata)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pp.log_normalize(adata, layer="counts")  # counts: silent
    from cellflow.pp._expression import _counts_check

    assert _counts_check(sp.csr_matrix((5, 4), dtype=np.float32))[0] is None  # nothing to judge: no warning


def test_pca_warns_on_raw_counts(rng):
    counts = rng.poisson(2.0, size=(100, 30)).astype(np.float32)
    adata = ad.AnnData(X=sp.csr_matrix(counts))
    with pytest.warns(UserWarning, match="raw counts.*library size.*log_normalize") as record:
        pp.pca(adata, 3)
    assert len(record) == 1
    logged = pp.log_normalize(adata)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pp.pca(logged, 3, rep="logcounts")


def test_counts_check_samples_rows_of_large_matrices():
    from cellflow.data._representation import _COUNT_CHECK_ROWS, _sampled_values

    n_rows = 50 * _COUNT_CHECK_ROWS
    matrix = sp.random(n_rows, 20, density=0.1, format="csr", random_state=0, dtype=np.float32)
    sample = _sampled_values(matrix)
    assert 0 < sample.size <= _COUNT_CHECK_ROWS * 20 and sample.size < matrix.nnz / 10
    assert _sampled_values(np.ones((n_rows, 3))).size == _COUNT_CHECK_ROWS * 3
    # evenly spaced: the first and the last rows are both looked at
    tail = sp.lil_matrix((n_rows, 2), dtype=np.float32)
    tail[n_rows - 1, 0] = 0.5
    assert 0.5 in _sampled_values(sp.csr_matrix(tail))


@pytest.mark.filterwarnings("ignore::anndata.OldFormatWarning", "ignore:Moving element:FutureWarning")
def test_counts_warnings_on_the_real_files(muscat):
    with pytest.warns(UserWarning, match="rep='X' looks like raw counts"):
        pp.pca(muscat, 5)  # X holds counts
    scgen = ad.read_h5ad(shared_file(SCGEN))
    with pytest.warns(UserWarning, match="layer='X' does not look like raw counts"):
        pp.log_normalize(scgen)  # X holds log1p values
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pp.pca(muscat, 5, rep="logcounts")  # the README's flows stay silent
        pp.pca(scgen, 5)


def test_decoded_predictions_are_scored_and_drawn_on_the_scale_the_pca_read(rng):
    import matplotlib

    matplotlib.use("Agg")
    import cellflow as cf

    names = [f"g{i}" for i in range(12)]
    counts = rng.poisson(rng.uniform(0.5, 8.0, size=12), size=(80, 12)).astype(np.float32)
    adata = ad.AnnData(X=counts, obs=pd.DataFrame({"condition": ["A"] * 80}, index=[f"c{i}" for i in range(80)]),
                       var=pd.DataFrame(index=names))
    adata = pp.pca(pp.log_normalize(adata), 6, rep="logcounts")
    genes = pp.decode_adata(adata, adata)
    assert genes.uns["cellflow"] == {"rep": "logcounts", "decoded_from": "X_pca"}
    np.testing.assert_array_equal(genes.layers["logcounts"], genes.X)
    assert not np.shares_memory(genes.layers["logcounts"], genes.X)
    # the observed cells' counts in X are not what a decoded prediction is compared with
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = cf.metrics.evaluate(genes, adata, metrics=("energy_distance", "r2_mean"))
    assert table["r2_mean"].iloc[0] > 0.95
    # genes are matched by name in plots as in evaluate: another order draws the same points
    reordered = adata[:, names[::-1]].copy()
    drawn = cf.pl.embedding({"decoded": genes, "observed": reordered}).collections[1].get_offsets()
    same = cf.pl.embedding({"decoded": genes, "observed": adata}).collections[1].get_offsets()
    np.testing.assert_allclose(np.asarray(drawn), np.asarray(same), atol=1e-5)


def test_new_cells_missing_the_pca_layer_or_embedding_are_told_what_to_compute(rng):
    import cellflow as cf

    names = [f"g{i}" for i in range(10)]
    counts = rng.poisson(3.0, size=(60, 10)).astype(np.float32)
    obs = pd.DataFrame({"condition": ["control"] * 30 + ["A"] * 30}, index=[f"c{i}" for i in range(60)])
    train = pp.pca(pp.log_normalize(ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=names))), 4, rep="logcounts")
    new = ad.AnnData(X=counts[:30].copy(), obs=obs.iloc[:30].copy(), var=pd.DataFrame(index=names))
    with pytest.raises(CellflowKeyError, match=r"fitted on layer 'logcounts'.*log_normalize\(adata, key_added='logcounts'\)"):
        pp.project(new, train)
    model = cf.ResponseModel(train, method="mean_shift").fit()
    with pytest.raises(CellflowKeyError, match=r"no obsm\['X_pca'\].*cellflow.pp.project"):
        model.predict(new, "A")
    assert model.predict(pp.project(pp.log_normalize(new), train), "A").n_obs == 30
