"""What more training steps buy on a screen with many groups.

The defaults train 2,000 steps of 8 groups each whatever the data, so a screen of hundreds of
(drug, dose, patient) groups sees each group a few dozen times. This fits flow matching with
each of ``--steps`` on a synthetic screen of ``--drugs`` drugs at the generator's three doses
for four patients (single drugs only), and scores ``--groups`` seen groups, drawn once, against
1,000 cells of the generator's true response each, beside ``mean_shift`` and the noise floor
(500 fresh true cells against the same 1,000).

With ``--held-out-drugs N`` the middle dose of the first ``N`` drugs is taken out of training for
every patient, and those groups are scored too (``held_out_dose``), with ``gaussian_ot`` (nearest
seen dose) beside: what the steps buy on a dose the model never saw, which is where more steps
count most.

    python benchmarks/flow_matching_steps.py [--drugs 40] [--steps 2000 8000] [--groups 24] [--held-out-drugs 0] [--seed 0]

Prints one JSON object: the mean energy distance of each model, the floor, and each fit's seconds.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np

import cellflow as cf


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--drugs", type=int, default=40)
    parser.add_argument("--steps", type=int, nargs="+", default=[2000, 8000])
    parser.add_argument("--groups", type=int, default=24, help="seen groups scored")
    parser.add_argument("--held-out-drugs", type=int, default=0, help="drugs whose middle dose is held out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    adata, truth = cf.datasets.synthetic(n_drugs=args.drugs, combinations=(), seed=args.seed)
    groups = adata.obs[["condition", "dose", "patient"]].astype(str).drop_duplicates()
    groups = groups[groups.condition != "control"]
    doses = sorted(groups.dose.unique(), key=float)
    held_drugs = list(adata.obs.condition.cat.categories.drop("control"))[: args.held_out_drugs]
    is_held = groups.condition.isin(held_drugs) & (groups.dose == doses[len(doses) // 2])
    held, groups = groups[is_held], groups[~is_held]
    rng = np.random.default_rng(args.seed)
    scored = {"seen": groups.iloc[np.sort(rng.choice(len(groups), min(args.groups, len(groups)), replace=False))]}
    if len(held):
        scored["held_out_dose"] = held
        cells = adata.obs[["condition", "dose", "patient"]].astype(str).apply(tuple, axis=1)
        adata = adata[~cells.isin(set(held.itertuples(index=False, name=None))).to_numpy()].copy()
    arguments = dict(rep="X", dose_key="dose", covariate_keys=("patient",))

    baselines = ("mean_shift", "gaussian_ot") if len(held) else ("mean_shift",)
    models = {name: cf.ResponseModel(adata, method=name, **arguments).fit() for name in baselines}
    seconds = {}
    for steps in args.steps:
        start = time.perf_counter()
        models[f"flow_matching_{steps}_steps"] = cf.ResponseModel(adata, **arguments).fit(steps=steps, seed=args.seed, progress=False)
        seconds[f"flow_matching_{steps}_steps"] = round(time.perf_counter() - start, 1)

    energy_distance = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the held-out doses' nearest-dose notice
        for part, part_groups in scored.items():
            scores: dict[str, list[float]] = {name: [] for name in (*models, "noise_floor")}
            for condition, dose, patient in part_groups.itertuples(index=False):
                source = truth.sample_control(500, patient, seed=args.seed + 11)
                reference = truth.sample(condition, 1000, patient, dose=dose, seed=args.seed + 12)
                fresh = truth.sample(condition, 500, patient, dose=dose, seed=args.seed + 13)
                scores["noise_floor"].append(cf.metrics.energy_distance(fresh, reference))
                for name, model in models.items():
                    prediction = model.predict(source, condition, dose=dose, covariates={"patient": patient}, seed=args.seed).X
                    scores[name].append(cf.metrics.energy_distance(prediction, reference))
            energy_distance[part] = {name: round(float(np.mean(values)), 4) for name, values in scores.items()}

    print(json.dumps({
        "benchmark": "flow_matching_steps",
        "cells": adata.n_obs,
        "groups": len(groups),
        "groups_scored": {part: len(part_groups) for part, part_groups in scored.items()} if len(held) else len(scored["seen"]),
        "energy_distance": energy_distance if len(held) else energy_distance["seen"],
        "fit_seconds": seconds,
    }, indent=1))


if __name__ == "__main__":
    main()
