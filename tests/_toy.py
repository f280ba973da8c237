"""A tiny hand-made AnnData whose mean shifts are known exactly."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

D = 3
# Mean shift of each single perturbation at dose 1 (dose 10 doubles it), per patient.
SHIFTS = {
    ("A", "P1"): np.array([1.0, 0.0, 0.0]),
    ("A", "P2"): np.array([3.0, 0.0, 0.0]),
    ("B", "P1"): np.array([0.0, 2.0, 0.0]),
    ("B", "P2"): np.array([0.0, 4.0, 0.0]),
}
BASE = {"P1": np.zeros(D), "P2": np.array([0.0, 0.0, 5.0]), "P3": np.array([0.0, 0.0, -5.0])}


def toy_adata(n: int = 40, seed: int = 0) -> ad.AnnData:
    """Controls of P1, P2, P3; A and B at doses 1 and 10 for P1, P2; A+B at 1+1 for P1 only.

    Noise is centred exactly per group, so group means are exactly the designed values.
    """
    rng = np.random.default_rng(seed)
    blocks, rows = [], []

    def add(condition, dose, patient, mean):
        noise = rng.normal(size=(n, D))
        blocks.append(mean + noise - noise.mean(axis=0))
        rows.extend([(condition, dose, patient)] * n)

    for patient in ("P1", "P2", "P3"):
        add("control", "0", patient, BASE[patient])
    for patient in ("P1", "P2"):
        for drug in ("A", "B"):
            for dose in (1.0, 10.0):
                add(drug, str(dose), patient, BASE[patient] + SHIFTS[(drug, patient)] * (2.0 if dose == 10.0 else 1.0))
    add("A+B", "1+1", "P1", BASE["P1"] + SHIFTS[("A", "P1")] + SHIFTS[("B", "P1")] + np.array([0.0, 0.0, 1.0]))
    obs = pd.DataFrame(rows, columns=["condition", "dose", "patient"])
    obs.index = [f"cell{i}" for i in range(len(obs))]
    adata = ad.AnnData(X=np.vstack(blocks).astype(np.float32), obs=obs)
    adata.obsm["X_pca"] = adata.X.copy()
    adata.layers["counts"] = adata.X.copy()
    return adata
