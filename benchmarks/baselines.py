"""Quality and speed of the closed-form baselines.

- Gaussian oracle: L2-UVP of ``gaussian_ot`` against the closed-form W2 map (d = 10 and 50,
  5,000 cells each side), beside ``mean_shift`` and ``identity``.
- Synthetic default (the demo's tasks): energy distance of each baseline on held-out
  combinations and an unseen patient, beside the noise floor.
- Fit and predict wall time of each baseline on the synthetic default.

    python benchmarks/baselines.py

Prints one JSON object.
"""

from __future__ import annotations

import json
import time

import anndata as ad
import numpy as np

import cellflow as cf
from cellflow._demo import run_demo
from cellflow.solvers import gaussian


def gaussian_oracle(d: int, n: int = 5000, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def spd(floor):
        m = rng.normal(size=(d, d))
        return m @ m.T / d + floor * np.eye(d)

    A, B = spd(0.5), spd(0.3)
    a, b = rng.normal(size=d), rng.normal(size=d) + 2.0
    x, y = rng.multivariate_normal(a, A, n), rng.multivariate_normal(b, B, n)
    adata = ad.AnnData(X=np.vstack([x, y]).astype(np.float32), obs={"condition": ["control"] * n + ["drug"] * n})
    exact = b + (x - a) @ gaussian.monge_map_matrix(A, B)
    result = {}
    for method in ("identity", "mean_shift", "gaussian_ot"):
        pred = cf.ResponseModel(adata, rep="X", method=method).fit().predict(adata[:n], "drug").X
        result[f"l2_uvp_percent_{method}"] = float(100 * np.mean(np.sum((pred - exact) ** 2, 1)) / np.trace(B))
    return result


def timings() -> dict:
    adata, _ = cf.datasets.synthetic(seed=0)
    source = adata[adata.obs.condition == "control"]
    out = {"n_cells": adata.n_obs, "n_source_cells": source.n_obs}
    for method in ("identity", "mean_shift", "gaussian_ot"):
        start = time.perf_counter()
        model = cf.ResponseModel(adata, rep="X", dose_key="dose", covariate_keys=("patient",), method=method).fit()
        fit = time.perf_counter() - start
        model.predict(source, "A+B", dose="1+1")  # compile
        start = time.perf_counter()
        model.predict(source, ["A+B", "C", "A+D"], dose=["1+1", 10.0, "1+1"])
        out[method] = {"fit_seconds": round(fit, 3), "predict_3_conditions_seconds": round(time.perf_counter() - start, 3)}
    return out


def main() -> None:
    _, summary = run_demo(None, verbose=False)
    print(json.dumps({
        "benchmark": "baselines",
        "gaussian_oracle_d10_n5000": gaussian_oracle(10),
        "gaussian_oracle_d50_n5000": gaussian_oracle(50),
        "synthetic_default_energy_distance": summary.round(4).to_dict(orient="index"),
        "timings_synthetic_default": timings(),
    }, indent=1))


if __name__ == "__main__":
    main()
