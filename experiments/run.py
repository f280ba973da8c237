"""Paper-style tasks on the real data in ../shared/data, every method beside the baselines.

Tasks (see ../shared/data/README.md for provenance):

- ``kang_patient``: Kang 2018 (muscat subset). Train on patient 101 (control and stimulated)
  plus patient 107's control cells; predict 107's stimulated cells from its control cells,
  per cell type. Metrics in a 50-d PCA of log counts, and R² of the mean shift over the top
  50 DEGs after decoding to genes.
- ``kang_patient_genes``: the same split, fitted and scored on the 1,267 log-count genes
  (R² over the top 50 DEGs directly, nothing to decode).
- ``kang_celltypes``: the same data (both patients), every cell type held out in turn (five
  folds, one model each): predict its stimulated cells from its control cells, scored per
  patient (ten cases), in the same 50-d PCA and top-50-DEG spaces.
- ``scgen_cd4t``: Kang 2018 as preprocessed for scGen; hold out stimulated CD4T cells.
- ``scgen_cd4t_genes``: the same, fitted and scored on scGen's 6,998 normalised genes.
- ``scgen_celltypes``: the same data, every cell type held out in turn (scGen's whole
  benchmark: seven folds, one model each); predict its stimulated cells from its control cells.
- ``bbbc021_dose``: BBBC021 CellProfiler well profiles (robust z-scored per plate on its DMSO
  wells, redundant features dropped); hold out the 1 uM treatments of compounds with at least
  three doses; predict them from DMSO wells.
- ``bbbc021_compound``: the same profiles; hold out every well of one compound per mechanism
  of action (among those with at least two compounds; drawn once, with a fixed seed), and
  predict each of its concentrations from DMSO wells, knowing the compound only through its
  perturbation embedding: a one-hot code of its mechanism of action. Unseen drugs: the learned
  methods read the embedding, the baselines take the compounds of the same mechanism.

    python experiments/run.py [--tasks kang_patient kang_patient_genes kang_celltypes scgen_cd4t
                                       scgen_cd4t_genes scgen_celltypes bbbc021_dose bbbc021_compound]
                              [--methods identity mean_shift gaussian_ot flow_matching neural_ot
                                         neural_ot:map=per_condition] [--seeds 0 1 2]
                              [--steps N] [--option key=value ...] [--data ../shared/data] [--out results.csv]

Prints a table per task and, at the end, one JSON object with every figure: means over the
cases and seeds, and the median of each R² (a condition that barely moves can dominate its mean).
Beside each energy distance, ``energy_distance_floor`` is what a perfect prediction of as many
cells would score against the same observed cells (:func:`cellflow.metrics.noise_floor`), and
``gap_closed`` the share of the gap from mean_shift's energy distance to that floor that a
method closes (1: as good as a perfect prediction; 0: mean_shift's score; needs mean_shift among
the methods).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

import cellflow as cf

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@dataclass
class Task:
    """A prepared task: training data, model arguments, and (source, truth) pairs to score."""

    train: ad.AnnData
    model_args: dict
    cases: list[dict]  # each: perturbation, dose, source, truth, genes (optional: decode, degs)
    rep: str
    reference: ad.AnnData | None = None
    deg_key: str | None = None
    fold: str = ""  # what a task made of several folds (one model each) holds out in this one


def kang_patient(data: Path) -> Task:
    adata = cf.pp.pca(cf.datasets.read(data / "kang2018_muscat_example_sce.h5ad"), 50, rep="logcounts")
    train, test = cf.data.split_covariates(adata, {"patient": "107"}, perturbation_key="group_id", control="ctrl")
    degs = cf.pp.top_degs(train, "group_id", "ctrl", n_genes=50, rep="logcounts")["stim"]
    source = test[test.obs.group_id == "ctrl"]
    truth = test[test.obs.group_id == "stim"]
    return Task(
        train=train,
        model_args=dict(rep="X_pca", perturbation_key="group_id", control="ctrl", covariate_keys=("patient", "cluster_id")),
        cases=[dict(perturbation="stim", dose=None, source=source, truth=truth, degs=degs)],
        rep="X_pca",
        reference=adata,
        deg_key="logcounts",
    )


def kang_celltypes(data: Path) -> list[Task]:
    adata = cf.pp.pca(cf.datasets.read(data / "kang2018_muscat_example_sce.h5ad"), 50, rep="logcounts")
    return [_kang_celltype_fold(adata, str(cell_type)) for cell_type in adata.obs.cluster_id.cat.categories]


def _kang_celltype_fold(adata: ad.AnnData, cell_type: str) -> Task:
    train, test = cf.data.split_covariates(
        adata, {"cluster_id": cell_type}, perturbation_key="group_id", control="ctrl"
    )
    degs = cf.pp.top_degs(train, "group_id", "ctrl", n_genes=50, rep="logcounts")["stim"]
    cases = []
    for patient in test.obs.patient.cat.categories:
        cells = test[(test.obs.patient == patient).to_numpy()]
        # one case per patient: the two patients respond differently, and pooling them would
        # score a patient mix of the source against another mix of the truth
        cases.append(dict(perturbation="stim", dose=None, source=cells[cells.obs.group_id == "ctrl"],
                          truth=cells[cells.obs.group_id == "stim"], degs=degs))
    return Task(
        train=train,
        model_args=dict(
            rep="X_pca", perturbation_key="group_id", control="ctrl", covariate_keys=("patient", "cluster_id")
        ),
        cases=cases,
        rep="X_pca",
        reference=adata,
        deg_key="logcounts",
        fold=cell_type,
    )


def kang_patient_genes(data: Path) -> Task:
    adata = cf.datasets.read(data / "kang2018_muscat_example_sce.h5ad")
    train, test = cf.data.split_covariates(adata, {"patient": "107"}, perturbation_key="group_id", control="ctrl")
    degs = cf.pp.top_degs(train, "group_id", "ctrl", n_genes=50, rep="logcounts")["stim"]
    return Task(
        train=train,
        model_args=dict(rep="logcounts", perturbation_key="group_id", control="ctrl", covariate_keys=("patient", "cluster_id")),
        cases=[dict(perturbation="stim", dose=None, source=test[test.obs.group_id == "ctrl"],
                    truth=test[test.obs.group_id == "stim"], degs=degs)],
        rep="logcounts",
        deg_key="logcounts",
    )


def _scgen_fold(adata: ad.AnnData, cell_type: str, rep: str = "X_pca_cf") -> Task:
    train, test = cf.data.split_covariates(adata, {"cell_type": cell_type})
    degs = cf.pp.top_degs(train, "condition", "control", n_genes=50)["stimulated"]
    return Task(
        train=train,
        model_args=dict(rep=rep, covariate_keys=("cell_type",)),
        cases=[dict(
            perturbation="stimulated", dose=None, source=test[test.obs.condition == "control"],
            truth=test[test.obs.condition == "stimulated"], degs=degs,
        )],
        rep=rep,
        reference=None if rep == "X" else adata,
        deg_key="X",
        fold=cell_type,
    )


def _scgen_pbmc(data: Path) -> ad.AnnData:
    return cf.pp.pca(cf.datasets.read(data / "kang2018_scgen_valid_pbmc.h5ad"), 50, key_added="X_pca_cf")


def scgen_cd4t(data: Path) -> Task:
    return _scgen_fold(_scgen_pbmc(data), "CD4T")


def scgen_cd4t_genes(data: Path) -> Task:
    return _scgen_fold(cf.datasets.read(data / "kang2018_scgen_valid_pbmc.h5ad"), "CD4T", rep="X")


def scgen_celltypes(data: Path) -> list[Task]:
    adata = _scgen_pbmc(data)
    return [_scgen_fold(adata, str(cell_type)) for cell_type in adata.obs.cell_type.cat.categories]


def _bbbc021_profiles(data: Path) -> ad.AnnData:
    wells = cf.datasets.read(data / "bbbc021_per_well_mean_cytominergallery.h5ad")
    normalised = cf.pp.normalize_plates(wells, plate_key="plate", control="DMSO", perturbation_key="compound")
    return cf.pp.select_features(normalised, subset=(normalised.obs.compound == "DMSO").to_numpy())


def bbbc021_dose(data: Path) -> Task:
    adata = _bbbc021_profiles(data)
    n_doses = adata.obs.groupby("compound", observed=True)["concentration"].nunique()
    at_one = set(adata.obs.compound[adata.obs.concentration == 1.0])
    held = sorted(c for c, n in n_doses.items() if n >= 3 and c in at_one and c != "DMSO")
    train, test = cf.data.split_doses(
        adata, 1.0, perturbation_key="compound", dose_key="concentration", control="DMSO", perturbations=held
    )
    source = test[test.obs.compound == "DMSO"]
    return Task(
        train=train,
        model_args=dict(rep="X", perturbation_key="compound", control="DMSO", dose_key="concentration"),
        cases=[dict(perturbation=c, dose=1.0, source=source, truth=test[test.obs.compound == c]) for c in held],
        rep="X",
    )


def bbbc021_compound(data: Path) -> Task:
    adata = _bbbc021_profiles(data)
    treated = adata.obs[adata.obs.compound != "DMSO"]
    mechanism = treated.groupby("compound", observed=True)["moa"].first().astype(str)
    mechanisms = sorted(mechanism.unique())
    rng = np.random.default_rng(0)  # part of the task's definition, not of any method's seed
    held = sorted(
        str(rng.choice(sorted(mechanism.index[mechanism == m]))) for m in mechanisms if (mechanism == m).sum() >= 2
    )
    embeddings = {c: np.eye(len(mechanisms), dtype=np.float32)[mechanisms.index(m)] for c, m in mechanism.items()}
    is_held = adata.obs.compound.isin(held).to_numpy()
    source = adata[(adata.obs.compound == "DMSO").to_numpy()]
    cases = [
        dict(perturbation=c, dose=float(dose), source=source,
             truth=adata[((adata.obs.compound == c) & (adata.obs.concentration == dose)).to_numpy()])
        for c in held
        for dose in sorted(adata.obs.concentration[adata.obs.compound == c].unique())
    ]
    return Task(
        train=adata[~is_held].copy(),
        model_args=dict(rep="X", perturbation_key="compound", control="DMSO", dose_key="concentration",
                        perturbation_embeddings=embeddings),
        cases=cases,
        rep="X",
    )


TASKS: dict[str, Callable[[Path], Task | list[Task]]] = {
    "kang_patient": kang_patient,
    "kang_patient_genes": kang_patient_genes,
    "kang_celltypes": kang_celltypes,
    "scgen_cd4t": scgen_cd4t,
    "scgen_cd4t_genes": scgen_cd4t_genes,
    "scgen_celltypes": scgen_celltypes,
    "bbbc021_dose": bbbc021_dose,
    "bbbc021_compound": bbbc021_compound,
}


def score_case(task: Task, pred: ad.AnnData, case: dict) -> dict:
    # energy_distance_floor: what a perfect prediction of as many cells would score, no method can
    # go below it; evaluate takes it from the energy distance's own pass over the pairs
    scores = cf.metrics.evaluate(
        pred, case["truth"], rep=task.rep, groupby=None, control=case["source"],
        metrics=("energy_distance", "mmd", "r2_delta"), floors=True,
    ).iloc[0]
    row = {name: float(scores[name]) for name in ("energy_distance", "energy_distance_floor", "mmd", "r2_delta")}
    if not case.get("degs"):
        return row
    x = cf.data.get_representation(pred, task.rep)
    control = cf.data.get_representation(case["source"], task.rep)
    if task.reference is None:  # scored in gene space: nothing to decode
        y = cf.data.get_representation(case["truth"], task.rep)
        genes = pred.var_names.get_indexer(case["degs"])
        row["r2_delta_top50_degs"] = cf.metrics.r2_mean(x[:, genes], y[:, genes], control=control[:, genes])
    else:
        genes = task.reference.var_names.get_indexer(case["degs"])
        decoded = cf.pp.decode(x, task.reference, key=task.rep)[:, genes]
        truth_genes = cf.data.get_representation(case["truth"], task.deg_key)[:, genes]
        control_genes = cf.data.get_representation(case["source"], task.deg_key)[:, genes]
        row["r2_delta_top50_degs"] = cf.metrics.r2_mean(decoded, truth_genes, control=control_genes)
    return row


BASELINES = ("identity", "mean_shift", "gaussian_ot")


def method_spec(text: str) -> tuple[str, dict]:
    """``"neural_ot:map=per_condition,init=identity"`` -> ``("neural_ot", {"map": "per_condition", ...})``."""
    from cellflow.cli import _key_values

    name, _, rest = text.partition(":")
    parts = re.split(r",(?=[A-Za-z_]\w*=)", rest)  # commas inside values such as [64,64] stay
    return name, _key_values([part for part in parts if part], f"--methods {text}")


def run(
    tasks, methods, seeds, data: Path, options: dict | None = None, steps: int | None = None, verbose: bool = False
) -> pd.DataFrame:
    """Fit every method on every task and seed; ``options`` and ``steps`` go to learned methods.

    A method may carry its own options after a colon, e.g. ``"neural_ot:map=per_condition"``;
    results are labelled with the whole string. ``verbose`` prints a line per fit to stderr
    (fit time and mean energy distance), so a long run shows where it is. A warning is shown
    the first time it is raised in the run: the same dose extrapolated by every method and
    seed of a task is one line, not one per fit.
    """
    rows, shown = [], set()
    for name in tasks:
        folds = TASKS[name](data)
        for task in [folds] if isinstance(folds, Task) else folds:
            for label in methods:
                method, own = method_spec(label)
                for seed in seeds:
                    with _once_per_run(shown):
                        start = time.perf_counter()
                        extra = {} if method in BASELINES else {**(options or {}), **own}
                        model = cf.ResponseModel(task.train, method=method, **task.model_args, **extra)
                        model.fit(steps=None if method in BASELINES else steps, seed=seed, progress=False)
                        fit_seconds = time.perf_counter() - start
                        for case in task.cases:
                            pred = model.predict(case["source"], case["perturbation"], dose=case["dose"], seed=seed)
                            rows.append({
                                "task": name, "fold": task.fold, "method": label, "seed": seed,
                                "condition": case["perturbation"], "fit_seconds": fit_seconds,
                                **score_case(task, pred, case),
                            })
                    if verbose:
                        energy = np.mean([row["energy_distance"] for row in rows[-len(task.cases):]])
                        where = f"{name}/{task.fold}" if task.fold else name
                        print(f"{where} {label} seed {seed}: fitted in {fit_seconds:.1f} s, energy distance {energy:.4f}",
                              file=sys.stderr, flush=True)
    return pd.DataFrame(rows)


@contextmanager
def _once_per_run(shown: set[tuple[str, type]]) -> Iterator[None]:
    """Re-raise each warning of the block unless one of the same text and category is in ``shown``."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:  # also when the block fails: its warnings may say why
        for warning in caught:
            key = (str(warning.message), warning.category)
            if key not in shown:
                shown.add(key)
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def _gap_closed(summary: pd.DataFrame) -> pd.Series:
    """Share of the gap from mean_shift's energy distance to the floor that each method closes.

    1 is a perfect prediction, 0 is mean_shift's score, negative is worse than mean_shift;
    NaN where the task was not run with mean_shift. Ratios of the means over cases and seeds.
    """
    closed = pd.Series(np.nan, index=summary.index)
    for task in summary.index.get_level_values("task").unique():
        if (task, "mean_shift") not in summary.index:
            continue
        baseline, floor = summary.loc[(task, "mean_shift"), ["energy_distance", "energy_distance_floor"]]
        for method in summary.loc[task].index:
            closed[(task, method)] = (baseline - summary.loc[(task, method), "energy_distance"]) / (baseline - floor)
    return closed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--tasks", nargs="+", choices=list(TASKS), help="default: every task but the gene-space ones (slow for gaussian_ot)",
        default=[name for name in TASKS if not name.endswith("_genes")],
    )
    parser.add_argument("--methods", nargs="+", default=["identity", "mean_shift", "gaussian_ot"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=None, help="CSV of per-condition results")
    parser.add_argument("--steps", type=int, default=None, help="training steps of learned methods")
    parser.add_argument("--option", action="append", help="option key=value of the learned methods")
    args = parser.parse_args()
    from cellflow.cli import _key_values

    results = run(
        args.tasks, args.methods, args.seeds, args.data, _key_values(args.option, "--option"), args.steps, verbose=True
    )
    if args.out:
        results.to_csv(args.out, index=False)
    metrics = [
        c for c in ("energy_distance", "energy_distance_floor", "mmd", "r2_delta", "r2_delta_top50_degs") if c in results
    ]
    grouped = results.groupby(["task", "method"], sort=False)
    summary = grouped[metrics].mean()
    # a few conditions that barely move (R² of a near-zero shift) can dominate the mean of R²
    for column in ("r2_delta", "r2_delta_top50_degs"):
        if column in results:
            summary[f"{column}_median"] = grouped[column].median()
    summary["gap_closed"] = _gap_closed(summary)
    with pd.option_context("display.width", 160, "display.float_format", "{:.4f}".format):
        print(summary.to_string())
    payload = {f"{t}/{m}": {k: round(float(v), 4) for k, v in row.items() if np.isfinite(v)} for (t, m), row in summary.iterrows()}
    print(json.dumps({"experiment": "real_data", "seeds": args.seeds, "results": payload}, indent=1))


if __name__ == "__main__":
    main()
