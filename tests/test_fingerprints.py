"""Morgan fingerprints as perturbation embeddings (RDKit is in the test extra)."""

import anndata as ad
import numpy as np
import pytest

import cellflow as cf

pytest.importorskip("rdkit", reason="RDKit is an optional extra: pip install 'cellflow-jax[chem]'")

SMILES = {
    "aspirin": "CC(=O)Oc1ccccc1C(=O)O",
    "salicylic_acid": "OC(=O)c1ccccc1O",
    "caffeine": "Cn1cnc2c1c(=O)n(C)c(=O)n2C",
}


def _tanimoto(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / np.maximum(a, b).sum())


def test_morgan_fingerprints_bits_and_similarity():
    fps = cf.data.morgan_fingerprints(SMILES, radius=2, n_bits=1024)
    assert fps.shape == (3, 1024) and list(fps.index) == list(SMILES) and fps.dtypes.unique().tolist() == [np.float32]
    assert set(np.unique(fps.to_numpy())) <= {0.0, 1.0}
    assert fps.loc["aspirin"].sum() == 24  # ECFP4, 1024 bits, as RDKit computes it
    a, s, c = (fps.loc[n].to_numpy() for n in SMILES)
    assert _tanimoto(a, s) > 2 * _tanimoto(a, c)
    counts = cf.data.morgan_fingerprints(SMILES, counts=True)
    assert (counts.to_numpy() >= fps.to_numpy()).all() and counts.to_numpy().max() > 1
    with pytest.raises(cf.CellflowValueError, match="'broken'"):
        cf.data.morgan_fingerprints({**SMILES, "broken": "C1CC(("})
    with pytest.raises(cf.CellflowValueError, match="n_bits"):
        cf.data.morgan_fingerprints(SMILES, n_bits=0)


def test_unseen_drug_predicted_from_its_fingerprint():
    """Train on aspirin (+3, 0) and caffeine (0, -3); salicylic acid, never seen, shares
    aspirin's substructures, so its predicted shift must lean towards aspirin's."""
    rng = np.random.default_rng(0)
    shifts = {"control": (0.0, 0.0), "aspirin": (3.0, 0.0), "caffeine": (0.0, -3.0)}
    x = np.vstack([rng.normal(size=(200, 2)) + np.array(s) for s in shifts.values()]).astype(np.float32)
    adata = ad.AnnData(X=x, obs={"condition": np.repeat(list(shifts), 200)})
    fps = cf.data.morgan_fingerprints(SMILES, n_bits=256)
    model = cf.ResponseModel(
        adata, rep="X", method="flow_matching", perturbation_embeddings=fps,
        width=64, depth=2, token_dim=16, context_dim=16, conditions_per_step=2, chunk=100, warmup=20,
    ).fit(steps=300, batch_size=64, progress=False)
    source = adata[adata.obs.condition == "control"]
    shift = model.predict(source, "salicylic_acid").X.mean(0) - source.X.mean(0)
    to_aspirin = np.linalg.norm(shift - np.array(shifts["aspirin"]))
    to_caffeine = np.linalg.norm(shift - np.array(shifts["caffeine"]))
    assert to_aspirin < to_caffeine, (shift, to_aspirin, to_caffeine)
