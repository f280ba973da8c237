"""What more training steps buy on a screen with many groups.

The defaults train 2,000 steps of 8 groups each whatever the data, so a screen of hundreds of
(drug, dose, patient) groups sees each group a few dozen times. This fits flow matching with
each of ``--steps`` on a synthetic screen of ``--drugs`` drugs at the generator's three doses
for four patients (single drugs only), and scores ``--groups`` seen groups, drawn once, against
1,000 cells of the generator's true response each, beside ``mean_shift`` and the noise floor
(500 fresh true cells against the same 1,000).

    python benchmarks/flow_matching_steps.py [--drugs 40] [--steps 2000 8000] [--groups 24] [--seed 0]

Prints one JSON object: the mean energy distance of each model, the floor, and each fit's seconds.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import cellflow as cf


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--drugs", type=int, default=40)
    parser.add_argument("--steps", type=int, nargs="+", default=[2000, 8000])
    parser.add_argument("--groups", type=int, default=24, help="seen groups scored")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    adata, truth = cf.datasets.synthetic(n_drugs=args.drugs, combinations=(), seed=args.seed)
    groups = adata.obs[["condition", "dose", "patient"]].astype(str).drop_duplicates()
    groups = groups[groups.condition != "control"]
    rng = np.random.default_rng(args.seed)
    scored = groups.iloc[np.sort(rng.choice(len(groups), min(args.groups, len(groups)), replace=False))]
    arguments = dict(rep="X", dose_key="dose", covariate_keys=("patient",))

    models, seconds = {"mean_shift": cf.ResponseModel(adata, method="mean_shift", **arguments).fit()}, {}
    for steps in args.steps:
        start = time.perf_counter()
        models[f"flow_matching_{steps}_steps"] = cf.ResponseModel(adata, **arguments).fit(steps=steps, seed=args.seed, progress=False)
        seconds[f"flow_matching_{steps}_steps"] = round(time.perf_counter() - start, 1)

    scores: dict[str, list[float]] = {name: [] for name in (*models, "noise_floor")}
    for condition, dose, patient in scored.itertuples(index=False):
        source = truth.sample_control(500, patient, seed=args.seed + 11)
        reference = truth.sample(condition, 1000, patient, dose=dose, seed=args.seed + 12)
        fresh = truth.sample(condition, 500, patient, dose=dose, seed=args.seed + 13)
        scores["noise_floor"].append(cf.metrics.energy_distance(fresh, reference))
        for name, model in models.items():
            prediction = model.predict(source, condition, dose=dose, covariates={"patient": patient}, seed=args.seed).X
            scores[name].append(cf.metrics.energy_distance(prediction, reference))

    print(json.dumps({
        "benchmark": "flow_matching_steps",
        "cells": adata.n_obs,
        "groups": len(groups),
        "groups_scored": len(scored),
        "energy_distance": {name: round(float(np.mean(values)), 4) for name, values in scores.items()},
        "fit_seconds": seconds,
    }, indent=1))


if __name__ == "__main__":
    main()
