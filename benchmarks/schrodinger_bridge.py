"""Schrödinger bridges (``method="schrodinger_bridge"``) against known answers.

1. **Gaussian oracle** (REFERENCES D3). Control N(0, A) and treated N(b, B) with random
   covariances (eigenvalues in [0.5, 2]) in d = 4 and 16. The bridge for reference noise
   ``sigma dW`` is Gaussian with end-point cross-covariance ``C_sigma`` and marginal covariance
   ``Sigma_t`` in closed form (:func:`cellflow.solvers.gaussian.gaussian_bridge`). The fitted
   bridge moves 10,000 fresh control cells by its SDE; reported are the relative Frobenius
   errors of Cov(X0, X1) against ``C_sigma`` and of Cov(X_0.5) against ``Sigma_0.5`` (goal:
   both < 10 %), and the same for the probability-flow ODE, whose coupling is deterministic and
   so is not the bridge's.
2. **Time course with a known path** (:func:`cellflow.datasets.time_course`: cells rotate half
   a turn while diffusing). (a) Three snapshots t = 0 (controls), 1, 2: the model is fitted
   through all of them, and its prediction at t = 1 is compared with the displacement
   (straight-line OT) interpolation of the end snapshots. (b) Five snapshots t = 0, 0.5, ..., 2
   with t = 1 left out of training: the prediction at the unmeasured time against the
   interpolation of its measured neighbours (t = 0.5 and 1.5). Energy distance to a fresh
   sample of the true snapshot, with the noise floor (two independent samples).

    python benchmarks/schrodinger_bridge.py [--part gaussian time] [--dims 4 16] [--seeds 0]
                                            [--steps N] [--cells 4000] [--option key=value ...]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import anndata as ad
import jax
import numpy as np

import cellflow as cf
from cellflow.cli import _key_values
from cellflow.datasets import time_course
from cellflow.solvers.gaussian import gaussian_bridge
from cellflow.solvers.interpolation import displacement_interpolation


def random_covariance(rng, d):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q @ np.diag(rng.uniform(0.5, 2.0, d)) @ q.T


def relative_error(estimate, truth) -> float:
    return float(np.linalg.norm(estimate - truth) / np.linalg.norm(truth))


def gaussian_oracle(dims, seeds, cells, steps, sigma, options) -> list[dict]:
    rows = []
    for d in dims:
        for seed in seeds:
            rng = np.random.default_rng(seed)
            A, B = random_covariance(rng, d), random_covariance(rng, d)
            b = rng.normal(size=d)
            x0, x1 = rng.multivariate_normal(np.zeros(d), A, cells), rng.multivariate_normal(b, B, cells)
            adata = ad.AnnData(np.vstack([x0, x1]).astype(np.float32), obs={"condition": ["control"] * cells + ["T"] * cells})
            adata.obs_names = [f"c{i}" for i in range(adata.n_obs)]
            truth = gaussian_bridge(np.zeros(d), A, b, B, sigma)
            test = rng.multivariate_normal(np.zeros(d), A, 10000).astype(np.float32)
            start = time.perf_counter()
            model = cf.ResponseModel(
                adata, rep="X", method="schrodinger_bridge", sigma=sigma, population_encoder=False,
                covariate_dropout=0.0, **{"conditions_per_step": 1, **options},
            ).fit(steps=steps, batch_size=256, progress=False)
            fit_seconds = time.perf_counter() - start
            row = {"d": d, "seed": seed, "sigma": sigma, "fit_seconds": round(fit_seconds, 1)}
            for sampler in ("sde", "ode"):
                model.options["sampler"] = sampler
                # The facade's predict returns X1 only; the path's middle comes from predict_path.
                path = model._method.predict_path(
                    model.state_, model.spec_, model.embeddings_, model.options, test, model.spec_.group_conditions[0],
                    (), jax.random.key(seed), np.array([0.5, 1.0]),
                )
                cross = np.cov(test.T, path[1].T)[:d, d:]
                row[f"{sampler}/cross_covariance_error"] = round(relative_error(cross, truth.cross), 4)
                row[f"{sampler}/middle_covariance_error"] = round(relative_error(np.cov(path[0].T), truth.marginal(0.5)[1]), 4)
                row[f"{sampler}/end_covariance_error"] = round(relative_error(np.cov(path[1].T), B), 4)
            model.options["sampler"] = "sde"
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def time_courses(seeds, steps, options) -> list[dict]:
    rows = []
    for seed in seeds:
        for name, times, held_out in (("three_snapshots", (0.0, 1.0, 2.0), None), ("held_out_middle", (0.0, 0.5, 1.0, 1.5, 2.0), 1.0)):
            data = time_course(n_cells=1000, times=times, seed=seed)
            truth = time_course(n_cells=1000, times=times, seed=seed + 1000)
            train = data if held_out is None else data[data.obs.time != held_out].copy()
            start = time.perf_counter()
            model = cf.ResponseModel(train, rep="X_pca", method="schrodinger_bridge", time_key="time", **options)
            model.fit(steps=steps, seed=seed, progress=False)
            fit_seconds = time.perf_counter() - start
            controls = truth[truth.obs.condition == "control"]
            middle = 1.0
            observed = truth[truth.obs.time == middle].obsm["X_pca"]
            pred = model.predict(controls, "drug", time=middle, seed=seed).obsm["X_pca"]
            before, after = (0.0, 2.0) if held_out is None else (0.5, 1.5)
            first = data[data.obs.time == before].obsm["X_pca"]
            last = data[data.obs.time == after].obsm["X_pca"]
            s = (middle - before) / (after - before)
            linear = np.asarray(displacement_interpolation(jax.random.key(seed), first, last, s))
            row = {
                "task": name, "seed": seed, "fit_seconds": round(fit_seconds, 1),
                "schrodinger_bridge": cf.metrics.energy_distance(pred, observed),
                "linear_interpolation": cf.metrics.energy_distance(linear, observed),
                "noise_floor": cf.metrics.energy_distance(data[data.obs.time == middle].obsm["X_pca"], observed),
            }
            row["ratio_to_linear"] = row["schrodinger_bridge"] / row["linear_interpolation"]
            rows.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="+", default=["gaussian", "time"], choices=["gaussian", "time"])
    parser.add_argument("--dims", nargs="+", type=int, default=[4, 16])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--cells", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--option", action="append", help="schrodinger_bridge option key=value")
    args = parser.parse_args()
    options = _key_values(args.option, "--option")
    payload = {"benchmark": "schrodinger_bridge", "steps": args.steps, "options": options}
    if "gaussian" in args.part:
        payload["gaussian"] = gaussian_oracle(args.dims, args.seeds, args.cells, args.steps, args.sigma, options)
    if "time" in args.part:
        payload["time"] = time_courses(args.seeds, args.steps, {"sigma": 0.3, **options})
    print(json.dumps(payload, indent=1, default=float))


if __name__ == "__main__":
    main()
