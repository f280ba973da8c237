"""Does flow matching reproduce the spread of the treated cells? A Gaussian oracle by group size.

Control cells N(0, I) and treated cells N(shift, scale^2 I) in ``--dim`` dimensions, one
condition, ``--cells`` cells of each in training. The exact response is known, so the prediction
from fresh control cells is compared with fresh treated cells: the ratio of their summed
per-feature variances (1 is right; above 1 over-dispersed, below 1 under-dispersed) and their
energy distance. Each ``--config`` is a set of flow_matching options (``key=value`` joined by
``,``; ``default`` for none).

    python benchmarks/flow_matching_dispersion.py [--cells 600 5000] [--steps 2000]
        [--config default path=straight,sigma=0 path=smoothed ...]

Prints one JSON object. Measured with the defaults above on two CPU cores (2,000 steps, 20
dimensions, noise floor 0.008):

=========  ============================  ==============  ===============
cells      options                       variance ratio  energy distance
=========  ============================  ==============  ===============
600        default (Brownian, sigma 2)   0.87            0.031
600        path=straight, sigma=0        1.84            0.253
600        path=smoothed                 0.98            0.022
5,000      default (Brownian, sigma 2)   0.85            0.022
5,000      path=straight, sigma=0        1.04            0.010
5,000      path=smoothed                 0.91            0.012
=========  ============================  ==============  ===============

On a few hundred cells the straight path overfits the treated sample (1.84; 2.28 after 6,000
steps), and the default's path noise holds that back; on large groups the same noise
under-disperses and costs twice the straight path's energy distance. ``path="smoothed"`` (the
noisy path's exact velocity, with a noise floor) is close to right on both.
"""

from __future__ import annotations

import argparse
import json
import time

import anndata as ad
import numpy as np

import cellflow as cf
from cellflow.cli import _key_values


def gaussian_cells(rng: np.random.Generator, n: int, dim: int, shift: float, scale: float) -> np.ndarray:
    return (scale * rng.normal(size=(n, dim)) + shift).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cells", nargs="+", type=int, default=[600, 5000], help="training cells per condition")
    parser.add_argument("--dim", type=int, default=20)
    parser.add_argument("--shift", type=float, default=2.0)
    parser.add_argument("--scale", type=float, default=1.2, help="standard deviation of the treated cells")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--test-cells", type=int, default=2000)
    parser.add_argument("--config", nargs="+", default=["default", "path=straight,sigma=0", "path=smoothed"],
                        help="flow_matching options per configuration: key=value pairs joined by ',' or 'default'")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    results = []
    for n in args.cells:
        rng = np.random.default_rng(args.seed)
        control = gaussian_cells(rng, n, args.dim, 0.0, 1.0)
        treated = gaussian_cells(rng, n, args.dim, args.shift, args.scale)
        adata = ad.AnnData(X=np.vstack([control, treated]), obs={"condition": ["control"] * n + ["treated"] * n})
        source = gaussian_cells(rng, args.test_cells, args.dim, 0.0, 1.0)
        truth = gaussian_cells(rng, args.test_cells, args.dim, args.shift, args.scale)
        for config in args.config:
            options = {} if config == "default" else _key_values(config.split(","), "--config")
            start = time.perf_counter()
            model = cf.ResponseModel(adata, rep="X", method="flow_matching", **options)
            model.fit(steps=args.steps, seed=args.seed, progress=False)
            predicted = model.predict(source, "treated", seed=args.seed).X
            results.append({
                "cells": n,
                "options": options,
                "variance_ratio": round(float(predicted.var(axis=0).sum() / truth.var(axis=0).sum()), 4),
                "energy_distance": round(float(cf.metrics.energy_distance(predicted, truth)), 4),
                "seconds": round(time.perf_counter() - start, 1),
            })
    print(json.dumps({"benchmark": "flow_matching_dispersion", "dim": args.dim, "steps": args.steps,
                      "noise_floor": round(float(cf.metrics.energy_distance(
                          gaussian_cells(np.random.default_rng(args.seed + 1), args.test_cells, args.dim, args.shift, args.scale), truth)), 4),
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
