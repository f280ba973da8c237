"""BBBC021 from well profiles to predicted compound responses, the whole path.

1. Read the CellProfiler per-well profiles (``../shared/data``).
2. Normalise plate by plate against DMSO wells (each method, and none), select features,
   aggregate wells to treatments (compound x concentration) and score mechanism-of-action
   retrieval (mAP, "not same compound") beside the label-shuffled baseline.
3. Phenotypic activity: which treatments' replicate wells stand out from DMSO wells.
4. Held-out concentrations: hold out the 1 uM treatments of the compounds with at least three
   concentrations, predict them from DMSO wells with every method, and score the R² of the
   mean shift and the energy distance per compound.
5. MoA retrieval of the held-out treatments against the training treatments, with measured
   and with predicted profiles.

    python experiments/bbbc021.py [--methods identity mean_shift gaussian_ot flow_matching]
                                  [--seeds 0 1 2] [--steps N] [--permutations 100] [--data DIR]
                                  [--figure moa_retrieval.png]

Prints tables, then one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

import cellflow as cf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import BASELINES, DEFAULT_DATA, TASKS

FILE = "bbbc021_per_well_mean_cytominergallery.h5ad"
TREATMENT = ["compound", "concentration"]
RETRIEVAL = dict(label_key="moa", exclude=("DMSO",), exclude_same="compound")


def normalisation_table(wells: ad.AnnData, permutations: int) -> pd.DataFrame:
    """Treatment-level MoA retrieval for every normalisation method, with and without selection."""
    rows = []
    for method in ("none", *cf.pp.NORMALIZATION_METHODS):
        normalised = wells if method == "none" else cf.pp.normalize_plates(wells, method=method)
        for select in (False, True):
            profiles = normalised
            if select:
                profiles = cf.pp.select_features(normalised, subset=(normalised.obs.compound == "DMSO").to_numpy())
            treatments = cf.pp.aggregate(profiles, by=TREATMENT)
            shuffled = cf.metrics.map_retrieval_shuffled(treatments, n_permutations=permutations, **RETRIEVAL)
            rows.append({
                "normalisation": method,
                "feature_selection": select,
                "n_features": profiles.n_vars,
                "moa_map": cf.metrics.map_retrieval(treatments, **RETRIEVAL),
                "shuffled_map_mean": float(shuffled.mean()),
                "shuffled_map_max": float(shuffled.max()),
            })
    return pd.DataFrame(rows)


def treatment_profiles(adata: ad.AnnData) -> ad.AnnData:
    return cf.pp.aggregate(adata, by=TREATMENT)


def heldout_retrieval(reference: ad.AnnData, queries: ad.AnnData) -> float:
    """Mean AP of each held-out treatment retrieving the training treatments of its MoA.

    Each query is ranked against the reference alone (never against the other queries), so
    measured and predicted profiles face the same candidates.
    """
    ap = []
    for i in range(queries.n_obs):
        query = queries[i].copy()
        query.obs_names = ["query"]
        combined = ad.concat([reference, query], join="inner")
        scores = cf.metrics.retrieval_scores(combined, "moa", exclude=(), exclude_same="compound")
        if "query" in scores.index:
            ap.append(scores.loc["query", "average_precision"])
    return float(np.mean(ap))


def dose_prediction(data: Path, methods, seeds, steps) -> tuple[pd.DataFrame, pd.DataFrame]:
    task = TASKS["bbbc021_dose"](data)
    train_treatments = treatment_profiles(task.train[task.train.obs.compound != "DMSO"])
    held = [case["perturbation"] for case in task.cases]
    source = task.cases[0]["source"]
    truth = ad.concat([case["truth"] for case in task.cases])
    rows, retrieval = [], []
    measured = treatment_profiles(truth)
    retrieval.append({"profiles": "measured", "seed": None, "moa_map": heldout_retrieval(train_treatments, measured)})
    for method in methods:
        for seed in seeds if method not in BASELINES else seeds[:1]:
            model = cf.ResponseModel(task.train, method=method, **task.model_args)
            model.fit(steps=None if method in BASELINES else steps, seed=seed, progress=False)
            pred = model.predict(source, held, dose=1.0, seed=seed)
            table = cf.metrics.evaluate(
                pred, truth, rep="X", groupby="compound", control=source, metrics=("r2_delta", "energy_distance", "mmd")
            )
            table["method"], table["seed"] = method, seed
            rows.append(table)
            pred.obs["moa"] = pred.obs["compound"].map(dict(zip(truth.obs.compound, truth.obs.moa, strict=False)))
            retrieval.append({
                "profiles": f"predicted by {method}",
                "seed": seed,
                "moa_map": heldout_retrieval(train_treatments, treatment_profiles(pred)),
            })
    return pd.concat(rows, ignore_index=True), pd.DataFrame(retrieval)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["identity", "mean_shift", "gaussian_ot", "flow_matching"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--permutations", type=int, default=100)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--figure", type=Path, default=None, help="write MoA retrieval per mechanism (png)")
    args = parser.parse_args()
    wells = cf.datasets.read(args.data / FILE)

    normalisation = normalisation_table(wells, args.permutations)
    normalised = cf.pp.normalize_plates(wells)
    activity = cf.metrics.phenotypic_activity(normalised, "compound", "DMSO", group_key=TREATMENT)
    if args.figure is not None:
        import matplotlib

        matplotlib.use("Agg")
        treatments = treatment_profiles(normalised)
        ax = cf.pl.retrieval(
            cf.metrics.retrieval_scores(treatments, **RETRIEVAL),
            shuffled=cf.metrics.map_retrieval_shuffled(treatments, n_permutations=args.permutations, **RETRIEVAL),
            title="BBBC021 MoA retrieval, robust z per plate",
        )
        ax.figure.set_size_inches(7, 5)
        ax.figure.tight_layout()
        ax.figure.savefig(args.figure, dpi=110)
    scores, retrieval = dose_prediction(args.data, args.methods, args.seeds, args.steps)
    per_method = scores.groupby(["method", "seed"], sort=False)[["r2_delta", "energy_distance", "mmd"]].mean()
    summary = per_method.groupby("method", sort=False).agg(["mean", "std"])

    with pd.option_context("display.width", 160, "display.float_format", "{:.3f}".format):
        print("MoA retrieval on treatment profiles (mAP, not same compound):")
        print(normalisation.to_string(index=False))
        print(f"\nphenotypically active treatments (q < 0.05, robust_z): {activity.significant.mean():.3f} of {len(activity)}")
        print("\nheld-out 1 uM treatments, mean over compounds (mean and std over seeds):")
        print(summary.to_string())
        print("\nMoA retrieval of the held-out treatments against training treatments:")
        print(retrieval.to_string(index=False))

    payload = {
        "experiment": "bbbc021",
        "seeds": args.seeds,
        "normalisation": normalisation.round(4).to_dict(orient="records"),
        "phenotypic_activity_fraction": round(float(activity.significant.mean()), 4),
        "held_out_doses": {
            method: {f"{metric}_{stat}": round(float(summary.loc[method, (metric, stat)]), 4)
                     for metric in ("r2_delta", "energy_distance", "mmd") for stat in ("mean", "std")
                     if np.isfinite(summary.loc[method, (metric, stat)])}
            for method in summary.index
        },
        "moa_retrieval_held_out": retrieval.groupby("profiles", sort=False)["moa_map"].mean().round(4).to_dict(),
    }
    print(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
