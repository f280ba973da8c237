"""Neural OT (``method="neural_ot"``) against known answers: the Gaussian Monge map and held-out doses.

1. **Gaussian oracle** (REFERENCES D1). Source N(a, A) and target N(b, B) with random means and
   covariances in d = 2, 8 and 32; the OT map is ``T(x) = b + M (x - a)`` in closed form. Each
   map variant is fitted through :class:`cellflow.ResponseModel` on ``--cells`` cells per side
   and scored by L2-UVP = 100 E|T_hat(x) - T(x)|^2 / tr B on fresh source cells (Korotin et al.
   2021; a constant map scores 100 %, the identity far more here because the means differ).
   The Gaussian (Bures) map fitted on the same training cells is reported beside it: the ICNN
   starts there, so training must not lose its accuracy.
2. **Held-out doses** on the synthetic default (:func:`cellflow.datasets.synthetic`): every
   single drug's middle dose (1.0) is removed from training for every patient, then predicted
   from each patient's control cells, and scored by energy distance against fresh cells of the
   true response; identity, mean_shift (nearest seen dose), flow_matching (``--compare``) and
   the noise floor beside it.

    python benchmarks/neural_ot.py [--part gaussian doses] [--dims 2 8 32] [--seeds 0 1 2]
                                   [--maps per_condition conditional]
                                   [--steps N] [--cells 4000] [--option key=value ...]
                                   [--compare flow_matching]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import anndata as ad
import numpy as np
import pandas as pd

import cellflow as cf
from cellflow.cli import _key_values
from cellflow.solvers import gaussian


def gaussian_pair(d: int, seed: int):
    """Means and covariances of a random Gaussian pair and its closed-form Monge map matrix."""
    rng = np.random.default_rng(seed)

    def covariance():
        q = rng.normal(size=(d, d))
        return q @ q.T / d + 0.2 * np.eye(d)

    a, A, b, B = rng.normal(size=d), covariance(), rng.normal(size=d) + 2.0, covariance()
    return a, A, b, B, gaussian.monge_map_matrix(A, B)


def sample(rng, mean, cov, n):
    return (mean + rng.normal(size=(n, len(mean))) @ np.linalg.cholesky(cov).T).astype(np.float32)


def gaussian_adata(d: int, n: int, seed: int):
    a, A, b, B, M = gaussian_pair(d, seed)
    rng = np.random.default_rng(seed + 1)
    x, y = sample(rng, a, A, n), sample(rng, b, B, n)
    obs = pd.DataFrame({"condition": ["control"] * n + ["treated"] * n}, index=[f"c{i}" for i in range(2 * n)])
    test = sample(np.random.default_rng(seed + 2), a, A, 5000)
    truth = b + (test - a) @ M.T
    return ad.AnnData(np.vstack([x, y]), obs=obs), test, truth, float(np.trace(B))


def uvp(pred: np.ndarray, truth: np.ndarray, variance: float) -> float:
    return float(100.0 * np.mean(np.sum((pred - truth) ** 2, axis=1)) / variance)


def gaussian_oracle(dims, seeds, cells, steps, options, maps=("per_condition", "conditional")) -> list[dict]:
    rows = []
    variants = {
        "per_condition": {"map": "per_condition", **options.get("per_condition", {})},
        "conditional": {"map": "conditional", "population_encoder": False, "covariate_dropout": 0.0, **options.get("conditional", {})},
    }
    for d in dims:
        for seed in seeds:
            adata, test, truth, variance = gaussian_adata(d, cells, seed)
            source = ad.AnnData(test)
            row = {"d": d, "seed": seed}
            bures = cf.ResponseModel(adata, rep="X", method="gaussian_ot", shrinkage=0.0).fit()
            row["gaussian_ot"] = uvp(bures.predict(source, "treated").X, truth, variance)
            row["identity"] = uvp(test, truth, variance)
            for name, variant in variants.items():
                if name not in maps:
                    continue
                start = time.perf_counter()
                model = cf.ResponseModel(adata, rep="X", method="neural_ot", **variant).fit(steps=steps, seed=seed, progress=False)
                row[name] = uvp(model.predict(source, "treated", seed=seed).X, truth, variance)
                row[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def held_out_doses(seeds, steps, options, compare=()) -> list[dict]:
    rows = []
    for seed in seeds:
        adata, truth = cf.datasets.synthetic(seed=seed)
        held = (adata.obs["dose"].astype(str) == "1.0") & ~adata.obs["condition"].astype(str).str.contains("+", regex=False)
        train = adata[~held].copy()
        drugs = sorted({c for c in adata.obs["condition"].astype(str) if c != "control" and "+" not in c})
        patients = sorted(adata.obs["patient"].astype(str).unique())
        common = dict(rep="X", perturbation_key="condition", control="control", dose_key="dose", covariate_keys=("patient",))
        models = {m: cf.ResponseModel(train, method=m, **common) for m in ("identity", "mean_shift")}
        start = time.perf_counter()
        models["neural_ot"] = cf.ResponseModel(train, method="neural_ot", **common, **options.get("conditional", {}))
        models["neural_ot"].fit(steps=steps, seed=seed, progress=False)
        seconds = time.perf_counter() - start
        for name in compare:
            models[name] = cf.ResponseModel(train, method=name, **common)
        for name, model in models.items():
            if name != "neural_ot":
                model.fit(steps=steps, seed=seed, progress=False)
        scores = {m: [] for m in (*models, "noise_floor")}
        for patient in patients:
            source = train[(train.obs["condition"] == "control") & (train.obs["patient"] == patient)]
            for drug in drugs:
                observed = truth.sample(drug, 500, patient, dose=1.0, seed=seed + 7)
                fresh = truth.sample(drug, source.n_obs, patient, dose=1.0, seed=seed + 99)
                for name, model in models.items():
                    pred = model.predict(source, drug, dose=1.0, covariates={"patient": patient}, seed=seed).X
                    scores[name].append(cf.metrics.energy_distance(pred, observed))
                scores["noise_floor"].append(cf.metrics.energy_distance(fresh, observed))
        row = {"seed": seed, "neural_ot_seconds": round(seconds, 1), **{m: float(np.mean(v)) for m, v in scores.items()}}
        row["neural_ot/mean_shift"] = row["neural_ot"] / row["mean_shift"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", nargs="+", default=["gaussian", "doses"], choices=["gaussian", "doses"])
    parser.add_argument("--dims", nargs="+", type=int, default=[2, 8, 32])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--cells", type=int, default=4000, help="training cells per side of the Gaussian pair")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--option", action="append", help="neural_ot option key=value for both variants")
    parser.add_argument("--per-condition-option", action="append", help="option for map='per_condition' only")
    parser.add_argument("--conditional-option", action="append", help="option for map='conditional' only")
    parser.add_argument("--maps", nargs="+", default=["per_condition", "conditional"], help="map variants in the Gaussian part")
    parser.add_argument("--compare", nargs="*", default=["flow_matching"], help="methods scored beside on held-out doses")
    args = parser.parse_args()
    shared = _key_values(args.option, "--option")
    options = {
        "per_condition": {**shared, **_key_values(args.per_condition_option, "--per-condition-option")},
        "conditional": {**shared, **_key_values(args.conditional_option, "--conditional-option")},
    }
    result = {"benchmark": "neural_ot", "steps": args.steps, "options": options}
    if "gaussian" in args.part:
        rows = pd.DataFrame(gaussian_oracle(args.dims, args.seeds, args.cells, args.steps, options, args.maps))
        result["gaussian_l2_uvp_percent"] = rows.groupby("d").mean(numeric_only=True).drop(columns="seed").round(3).to_dict(orient="index")
    if "doses" in args.part:
        rows = pd.DataFrame(held_out_doses(args.seeds, args.steps, options, args.compare))
        result["held_out_doses_energy_distance"] = rows.mean(numeric_only=True).drop("seed").round(4).to_dict()
    print(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    main()
