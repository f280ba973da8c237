"""How close flow matching gets to the truth on the conditions it was trained on, beside the held-out ones.

On the synthetic default (the demo's split: two held-out drug pairs per patient, one patient's
treated cells held out), every model is fitted once per seed and then predicts, for one training
patient's held-out control cells, every single drug and every drug pair at dose 1, seen or
held out. Each prediction is scored by the energy distance to ``--reference-cells`` cells of the
generator's true response, beside the noise floor (a fresh true sample as large as the
prediction) and, for pairs, the additive oracle (the true response without the pair's own
synergy). The seen conditions bound what the held-out ones can reach: a model whose single-drug
predictions sit at k times the floor cannot predict an additive pair better than its members.

    python benchmarks/flow_matching_seen_conditions.py [--seeds 0] [--steps N] [--patient P1]
        [--reference-cells 2000] [--methods mean_shift gaussian_ot flow_matching] [--option key=value ...]

``--option`` goes to flow_matching. Prints one JSON object: per seed and condition the scores,
and means over single drugs, seen pairs and held-out pairs.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import cellflow as cf
from cellflow._demo import held_out_tasks
from cellflow.cli import _key_values
from cellflow.data import holdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--patient", default="P1", help="a training patient whose held-out control cells are the source")
    parser.add_argument("--reference-cells", type=int, default=2000)
    parser.add_argument("--methods", nargs="+", default=["mean_shift", "gaussian_ot", "flow_matching"])
    parser.add_argument("--option", action="append", help="flow_matching option key=value")
    args = parser.parse_args()
    options = _key_values(args.option, "--option")

    runs = []
    for seed in args.seeds:
        adata, truth = cf.datasets.synthetic(seed=seed)
        _, task, held = held_out_tasks(adata, truth)
        split = holdout(adata, task != "", covariate_keys=("patient",))
        models = {
            method: cf.ResponseModel(
                split.train, rep="X", dose_key="dose", covariate_keys=("patient",), method=method,
                **(options if method == "flow_matching" else {}),
            ).fit(steps=args.steps, seed=seed, progress=False)
            for method in args.methods
        }
        obs = split.test.obs
        source = split.test[((obs["condition"].astype(str) == "control") & (obs["patient"].astype(str) == args.patient)).to_numpy()]
        drugs = list(truth.drugs)
        pairs = [f"{a}+{b}" for i, a in enumerate(drugs) for b in drugs[i + 1 :]]
        rows = []
        for condition in drugs + pairs:
            members = condition.count("+") + 1
            dose = "+".join(["1.0"] * members)
            reference = truth.sample(condition, args.reference_cells, args.patient, dose=dose, seed=seed + 20_000)
            fresh = truth.sample(condition, source.n_obs, args.patient, dose=dose, seed=seed + 10_000)
            kind = "single" if members == 1 else ("held-out pair" if condition in held else "seen pair")
            row = {"condition": condition, "kind": kind, "noise_floor": cf.metrics.energy_distance(fresh, reference)}
            if members > 1:
                guess = truth.sample(condition, source.n_obs, args.patient, dose=dose, seed=seed + 10_000, synergy=False)
                row["additive_oracle"] = cf.metrics.energy_distance(guess, reference)
            for method, model in models.items():
                pred = model.predict(source, condition, dose=dose, covariates={"patient": args.patient}, seed=seed).X
                row[method] = cf.metrics.energy_distance(pred, reference)
            rows.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        means = {}
        for kind in ("single", "seen pair", "held-out pair"):
            chosen = [r for r in rows if r["kind"] == kind]
            columns = [c for c in ("noise_floor", "additive_oracle", *args.methods) if c in chosen[0]]
            means[kind] = {c: round(float(np.mean([r[c] for r in chosen])), 4) for c in columns}
        runs.append({"seed": seed, "held_out_pairs": held, "means": means, "conditions": rows})
    print(json.dumps({"benchmark": "flow_matching_seen_conditions", "options": options, "steps": args.steps,
                      "patient": args.patient, "reference_cells": args.reference_cells, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
