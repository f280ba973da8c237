"""The ``cellflow demo`` job: fit on the synthetic default, predict held-out tasks, compare to baselines."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from cellflow import datasets, metrics
from cellflow.data import holdout, parse_obs_conditions
from cellflow.methods import METHODS
from cellflow.model import ResponseModel

__all__ = ["run_demo", "best_available_method", "METHOD_PREFERENCE"]

#: Methods in order of expected quality; the demo fits the first one available.
METHOD_PREFERENCE = ("flow_matching", "schrodinger_bridge", "neural_ot", "diffusion", "gaussian_ot", "mean_shift")
BASELINES = ("identity", "mean_shift")


def best_available_method() -> str:
    return next(m for m in METHOD_PREFERENCE if m in METHODS)


def _held_out_pairs(truth: datasets.SyntheticTruth, combinations: list[str]) -> list[str]:
    """One synergistic and one additive pair when both exist: the two kinds of unseen combination."""
    synergy = {"+".join(sorted(p)) for p in truth.synergy_pairs}
    chosen = [c for c in combinations if c in synergy][:1] + [c for c in combinations if c not in synergy][:1]
    return chosen or combinations[:1]


def held_out_tasks(adata, truth: datasets.SyntheticTruth) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The demo's split of synthetic data: ``(conditions, task, held_combos)``.

    ``conditions`` is each cell's canonical condition (``""`` for controls), ``task`` each
    cell's held-out task (``""`` for training cells): one synergistic and one additive pair for
    every patient (``held_combos``), and every treated cell of the last patient.
    """
    conditions = parse_obs_conditions(adata, "condition", "control").labels()
    held_combos = _held_out_pairs(truth, sorted({c for c in conditions if "+" in c}))
    new_patient = truth.patients[-1]
    patient = adata.obs["patient"].astype(str).to_numpy()
    task = np.where(np.isin(conditions, held_combos), "held-out combinations", "")
    task = np.where((task == "") & (patient == new_patient) & (conditions != ""), f"unseen patient ({new_patient})", task)
    return conditions, task, held_combos


def run_demo(
    out_dir: str | Path | None = "cellflow_demo",
    *,
    seed: int = 0,
    n_control: int = 400,
    n_cells: int = 150,
    methods: tuple[str, ...] | None = None,
    method_options: dict[str, dict] | None = None,
    steps: int | None = None,
    plot: bool = True,
    verbose: bool = True,
    reference_cells: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run the demo and return ``(per_condition, summary)`` tables.

    The synthetic default (:func:`cellflow.datasets.synthetic`) has four patients, four drugs at
    three doses and all pairwise combinations. Training leaves out two combinations (one
    synergistic, one additive) for every patient, and every treated cell of the last patient,
    whose control cells alone are seen. Each method then predicts the held-out cells from the
    matching control cells, and the energy distance to the observed cells is compared with the
    noise floor: the energy distance between the observed cells and a fresh sample of the true
    response.

    Parameters
    ----------
    out_dir
        Where ``results.csv``, ``summary.csv`` and ``demo.png`` are written (``None``: nothing).
    seed
        Seed of the data and of training.
    n_control, n_cells
        Cells per patient for controls and for each treated condition.
    methods
        Methods to compare; default: identity, mean_shift and the best available method.
    method_options
        ``{method: {option: value}}`` passed to :class:`ResponseModel`.
    steps
        Training steps of learned methods (their default when ``None``).
    plot
        Write the figure.
    verbose
        Print progress and the table.
    reference_cells
        Score against this many cells drawn from the generator's true response instead of the
        observed held-out cells (``n_cells`` per condition). The observed cells are a small sample,
        so their energy distance to even a perfect prediction is the noise floor; a large true
        sample measures the prediction's own error, and the floor becomes that of a true sample
        the size of the prediction.

    Held-out combinations also get an ``additive_oracle`` column: a sample of the true response
    without the pair's own synergy (a pair-specific random vector that no model of the members
    can know), the size of the prediction: what a perfect prediction from the members scores,
    and so the figure to read a method's score on held-out combinations against.
    """
    say = print if verbose else (lambda *a, **k: None)
    adata, truth = datasets.synthetic(seed=seed, n_control=n_control, n_cells=n_cells)
    best = best_available_method()
    methods = tuple(dict.fromkeys(methods or (*BASELINES, "gaussian_ot", best)))
    patients = list(truth.patients)
    new_patient = patients[-1]
    conditions, task, held_combos = held_out_tasks(adata, truth)
    split = holdout(adata, task != "", covariate_keys=("patient",))
    say(
        f"synthetic data: {adata.n_obs} cells x {adata.n_vars} features, {len(set(conditions)) - 1} conditions, "
        f"{len(patients)} patients; held out: combinations {held_combos} and every treated cell of {new_patient}."
    )

    test = split.test
    test_task = task[np.asarray(adata.obs_names.get_indexer(test.obs_names))]
    keys = test.obs[["condition", "dose", "patient"]].astype(str)
    rows = []
    models = {}
    for method in methods:
        start = time.perf_counter()
        models[method] = ResponseModel(
            split.train, rep="X", dose_key="dose", covariate_keys=("patient",), method=method,
            **(method_options or {}).get(method, {}),
        ).fit(steps=steps, seed=seed, progress=verbose)
        say(f"fitted {method:<14s} in {time.perf_counter() - start:6.1f} s")

    groups = keys[test.obs["condition"].astype(str) != "control"].drop_duplicates().itertuples(index=False)
    for condition, dose, pat in groups:
        mask = ((keys["condition"] == condition) & (keys["dose"] == dose) & (keys["patient"] == pat)).to_numpy()
        source = test[((keys["condition"] == "control") & (keys["patient"] == pat)).to_numpy()]
        task_name = test_task[mask][0]
        if reference_cells:
            observed = truth.sample(condition, reference_cells, pat, dose=dose, seed=seed + 20_000)
            fresh = truth.sample(condition, source.n_obs, pat, dose=dose, seed=seed + 10_000)
        else:
            observed = test.X[mask]
            fresh = truth.sample(condition, len(observed), pat, dose=dose, seed=seed + 10_000)
        row = {"task": task_name, "condition": condition, "dose": dose, "patient": pat}
        row["noise_floor"] = metrics.energy_distance(fresh, observed)
        if condition in held_combos:
            guess = truth.sample(condition, source.n_obs, pat, dose=dose, seed=seed + 10_000, synergy=False)
            row["additive_oracle"] = metrics.energy_distance(guess, observed)
        for method, model in models.items():
            pred = model.predict(source, condition, dose=dose, covariates={"patient": pat}, seed=seed).X
            row[method] = metrics.energy_distance(pred, observed)
        rows.append(row)
    per_condition = pd.DataFrame(rows)
    references = [c for c in ("noise_floor", "additive_oracle") if c in per_condition]
    summary = per_condition.groupby("task", sort=False)[[*methods, *references]].mean()
    summary.insert(len(methods), "n_conditions", per_condition.groupby("task", sort=False).size())
    for method in methods:
        if method != "mean_shift" and "mean_shift" in methods:
            summary[f"{method}/mean_shift"] = summary[method] / summary["mean_shift"]

    if verbose:
        with pd.option_context("display.width", 160, "display.float_format", "{:.3f}".format):
            print("\nEnergy distance to the observed held-out cells (lower is better), mean over conditions:")
            print(summary.to_string(na_rep="-"))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        per_condition.to_csv(out / "results.csv", index=False)
        summary.to_csv(out / "summary.csv")
        if plot:
            _figure(out / "demo.png", per_condition, methods, test, keys, models, held_combos, seed)
        say(f"\nwrote {out / 'results.csv'}, {out / 'summary.csv'}" + (f", {out / 'demo.png'}" if plot else ""))
    return per_condition, summary


def _figure(path, per_condition, methods, test, keys, models, held_combos, seed) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cellflow import pl

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    tidy = per_condition.melt(
        id_vars=["task", "condition", "dose", "patient"], value_vars=[*methods, "noise_floor"], var_name="method",
        value_name="energy_distance",
    )
    pl.metric_bars(tidy, metric="energy_distance", order=[*methods, "noise_floor"], ax=left)
    left.set_title("held-out energy distance (lower is better)")
    combo, patient = held_combos[0], keys["patient"].iloc[0]
    source = test[((keys["condition"] == "control") & (keys["patient"] == patient)).to_numpy()]
    observed = test[((keys["condition"] == combo) & (keys["patient"] == patient)).to_numpy()]
    best = methods[-1]
    predicted = models[best].predict(source, combo, dose=observed.obs["dose"].iloc[0], seed=seed)
    pl.embedding(
        {"control": source.X, "observed": observed.X, f"predicted ({best})": predicted.X},
        ax=right, title=f"unseen combination {combo}, patient {patient}",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
