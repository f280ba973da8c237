"""Side by side with theislab's CellFlow (``cellflow-tools``): training speed, prediction speed
and held-out quality on the synthetic default, measured in one run on one machine.

Both packages import as ``cellflow``, so ``cellflow-tools`` (and ``requests``, which it uses
without declaring it) is installed by this script into its own virtual environment (``--venv``,
created on first use) and driven there by ``benchmarks/_cellflow_tools_driver.py``; this
library runs in the current interpreter.

Data: :func:`cellflow.datasets.synthetic` (default arguments) at dose 1 only (the driver gives
CellFlow no doses, so neither library gets them). Training leaves out two drug pairs (one
synergistic, one additive) for every patient; predictions start from fresh control cells of
patient P1 and are scored with the energy distance against a fresh sample of the true
response, beside ``mean_shift`` and the noise floor.

Measured:

* **equal architecture** (``--width``, ``--depth``, ``--token-dim``, batch size, one condition
  per step as CellFlow trains): steady-state training steps per second (compilation excluded),
  ratios, achieved training GFLOP/s (``6 x parameters x cells`` per step, the dense-layer
  estimate) against this machine's measured float32 matmul peak, and held-out energy distance
  after the same number of steps. Ours is run twice:

  - ``matched``: the same network structure and the same coupling as CellFlow's, i.e. one
    velocity field of the pooled condition (``field="joint"``) and Sinkhorn at CellFlow's
    ``epsilon = 1`` (relative to the mean cost). This is the like-for-like comparison of the
    training machinery, and the one the ratio ``steps_per_second_ratio`` refers to;
  - ``additive``: our default structure at the same widths and depths (one field per
    combination member plus an interaction field, about 3 x the dense FLOPs on pairs) with our
    default ``epsilon = 0.01``.
* **prediction** with the matched model: all 10 conditions (4 drugs, 6 pairs) x ``--cells``
  cells with each library's default solver (CellFlow: adaptive Tsit5 at rtol = atol = 1e-5;
  ours: Heun with 16 steps), wall time of the call including compilation (ours also warm);
* **each library's defaults**: CellFlow's default network (about 70 M parameters; its default
  optimiser accumulates 20 steps per update) trained for the cumulative step counts of
  ``--default-steps`` and scored at each on ``--default-cells`` cells per held-out pair (its
  default prediction takes minutes per condition on a CPU), against our defaults trained for
  the step counts of ``--our-default-steps`` (each a fresh fit, compilation included: every
  compiled program is forgotten before it). For
  every point of their curve: the fit time of the first of ours that reaches its held-out
  energy distance, and the ratio of wall times (theirs: set-up plus timed training, their
  compilation excluded, so ours pays compilation and theirs does not). Every fit of ours is
  then repeated with the next seed: that refit reuses the compiled training program
  (:func:`cellflow.train.shared_jit`), as a seed sweep or a re-run notebook cell does, which
  gives ``wall_time_ratios_refit`` (compilation excluded on both sides);
  ``wall_time_ratios_both_compiling`` adds their warm-up step (their compilation) to their time
  against our fresh fits. Every fit is also repeated, same seed, in a new Python process that
  finds the program in the on-disk compilation cache (:func:`cellflow.train.set_compilation_cache`)
  that the first fit wrote, as the same script run again or a notebook after a kernel restart
  does: ``wall_time_ratios_new_session`` (its training losses are checked to be the first fit's,
  so it scores the first fit's energy distance). The cache starts empty in a folder of this run,
  so the first fits compile whatever an earlier run left behind.

    python benchmarks/vs_cellflow_tools.py [--steps 500] [--cells 1000] [--default-steps 30 300] [--venv DIR]

Prints one JSON object. Needs network access to PyPI the first time (to build the venv).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import jax
import jax.numpy as jnp
import numpy as np

import cellflow as cf
from cellflow._demo import _held_out_pairs
from cellflow.data import parse_obs_conditions

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "_cellflow_tools_driver.py"
DEFAULT_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cellflow-bench" / "cellflow-tools-venv"
PATIENT = "P1"


# --------------------------------------------------------------------------------------------
# the peer's environment
# --------------------------------------------------------------------------------------------
def ensure_venv(venv: Path) -> Path:
    """The python of a venv holding ``cellflow-tools`` and ``requests``; created if missing."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import cellflow.model"], capture_output=True, check=False).returncode == 0:
        return python
    print(f"creating {venv} with cellflow-tools (one-off, a few minutes)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "cellflow-tools", "requests"], check=True)
    return python


def run_driver(python: Path, workdir: Path, name: str, args: list[str]) -> dict:
    out = workdir / f"{name}.json"
    command = [str(python), str(DRIVER), *args, "--out", str(out)]
    print("running", " ".join(command[1:]), file=sys.stderr)
    # PYTHONPATH may point at this repository, whose package would shadow cellflow-tools' own
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(command, check=True, stdout=sys.stderr, env=environment)
    result = json.loads(out.read_text())
    with np.load(result["predictions"]) as predictions:
        result["arrays"] = {k.removeprefix("predictions_"): predictions[k] for k in predictions.files if k.startswith("predictions_")}
        for point in result["points"][1:]:
            prefix = f"step{point['steps']}_predictions_"
            point["arrays"] = {k.removeprefix(prefix): predictions[k] for k in predictions.files if k.startswith(prefix)}
    result["points"][0]["arrays"] = result["arrays"]
    return result


# --------------------------------------------------------------------------------------------
# data and scoring
# --------------------------------------------------------------------------------------------
def make_data(seed: int, workdir: Path, n_cells: int):
    """Training cells at dose 1 (CellFlow's driver has no doses), minus the held-out pairs."""
    adata, truth = cf.datasets.synthetic(seed=seed)
    adata = adata[adata.obs["dose"].astype(str).isin(["0", "1.0", "1.0+1.0"])].copy()
    labels = parse_obs_conditions(adata, "condition", "control").labels()
    combinations = sorted({c for c in labels if "+" in c})
    held = _held_out_pairs(truth, combinations)
    train = adata[~np.isin(labels, held)].copy()
    source = ad.AnnData(
        X=truth.sample_control(n_cells, PATIENT, seed=seed + 1).astype(np.float32),
        obs={"patient": [PATIENT] * n_cells, "condition": ["control"] * n_cells},
    )
    source.obs_names = [f"source{i}" for i in range(n_cells)]
    conditions = held + [c for c in sorted(set(labels)) if c and c not in held]
    train.write_h5ad(workdir / "train.h5ad")
    source.write_h5ad(workdir / "predict.h5ad")
    return train, source, truth, held, conditions


def held_out_energy(predictions: dict[str, np.ndarray], truth, held: list[str], seed: int) -> dict[str, float]:
    scores = {}
    for condition in held:
        n = len(predictions[condition])
        observed = truth.sample(condition, n, PATIENT, dose=[1.0] * len(condition.split("+")), seed=seed + 7)
        scores[condition] = cf.metrics.energy_distance(predictions[condition], observed)
    scores["mean"] = float(np.mean([scores[c] for c in held]))
    return scores


def noise_floor_and_mean_shift(train, source, truth, held, seed) -> dict[str, float]:
    model = cf.ResponseModel(train, rep="X", covariate_keys=("patient",), method="mean_shift").fit()
    shifted = {c: model.predict(source, c, covariates={"patient": PATIENT}).X for c in held}
    fresh = {c: truth.sample(c, source.n_obs, PATIENT, dose=[1.0] * len(c.split("+")), seed=seed + 99) for c in held}
    return {"mean_shift": held_out_energy(shifted, truth, held, seed)["mean"],
            "noise_floor": held_out_energy(fresh, truth, held, seed)["mean"]}


# --------------------------------------------------------------------------------------------
# this library
# --------------------------------------------------------------------------------------------
def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        f(a).block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def n_parameters(model: cf.ResponseModel) -> int:
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(model.state_.params)))


def ours(train, options: dict, steps: int, batch_size: int, seed: int) -> tuple[cf.ResponseModel, float]:
    model = cf.ResponseModel(train, rep="X", covariate_keys=("patient",), method="flow_matching", **options)
    start = time.perf_counter()
    model.fit(steps=steps, batch_size=batch_size, seed=seed, progress=False)
    return model, time.perf_counter() - start


NEW_SESSION_FIT = """
import json, sys, time
import anndata as ad
import cellflow as cf
train = ad.read_h5ad(sys.argv[1])
model = cf.ResponseModel(train, rep="X", covariate_keys=("patient",), method="flow_matching")
start = time.perf_counter()
model.fit(steps=int(sys.argv[2]), seed=int(sys.argv[3]), progress=False)
seconds = time.perf_counter() - start
print(json.dumps({"fit_seconds": seconds, "loss": model.history_["loss"].tolist()}))
"""


def new_session_fit(workdir: Path, steps: int, seed: int) -> dict:
    """Our default fit, timed in a fresh Python process that shares this run's compilation cache."""
    environment = {**os.environ, "CELLFLOW_COMPILATION_CACHE": str(cf.train.compilation_cache_dir())}
    result = subprocess.run([sys.executable, "-c", NEW_SESSION_FIT, str(workdir / "train.h5ad"), str(steps), str(seed)],
                            capture_output=True, text=True, env=environment, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def steady_steps_per_second(model: cf.ResponseModel) -> float:
    """Steps per second after the first chunk (which includes compilation), from the history."""
    history = model.history_
    return (history["step"].iloc[-1] - history["step"].iloc[0]) / (history["seconds"].iloc[-1] - history["seconds"].iloc[0])


def our_predictions(model, source, conditions) -> dict[str, np.ndarray]:
    return {c: model.predict(source, c, covariates={"patient": PATIENT}).X for c in conditions}


def timed_predictions(model, source, conditions) -> tuple[dict[str, np.ndarray], float, float]:
    """Predictions, and the seconds of the first (cold) and of a repeated (warm) prediction."""
    start = time.perf_counter()
    predictions = our_predictions(model, source, conditions)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    our_predictions(model, source, conditions)
    return predictions, cold, time.perf_counter() - start


def side(n_params: int, rate: float, arrays: dict[str, np.ndarray], args, truth, held) -> dict:
    """Speed and held-out quality of one side of the equal-architecture comparison."""
    return {"n_parameters": n_params, "steps_per_second": rate,
            "gflops_per_second": 6 * n_params * args.batch_size * rate / 1e9,
            "held_out_energy_distance": held_out_energy(arrays, truth, held, args.seed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500, help="timed steps at equal architecture")
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--token-dim", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--cells", type=int, default=1000, help="source cells per predicted condition")
    parser.add_argument("--default-steps", type=int, nargs="+", default=[30, 300],
                        help="cumulative steps of CellFlow's default network at which it is scored")
    parser.add_argument("--default-cells", type=int, default=100, help="cells per condition predicted by it")
    parser.add_argument("--our-default-steps", type=int, nargs="+", default=[10, 25, 50, 100, 250, 500, 1000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    args = parser.parse_args()

    python = ensure_venv(args.venv)
    peak = matmul_peak_gflops()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        cf.train.set_compilation_cache(workdir / "xla")
        train, source, truth, held, conditions = make_data(args.seed, workdir, args.cells)
        reference = noise_floor_and_mean_shift(train, source, truth, held, args.seed)
        common = ["--data", str(workdir / "train.h5ad"), "--predict", str(workdir / "predict.h5ad"),
                  "--batch-size", str(args.batch_size)]

        # equal architecture and batch, one condition per step (CellFlow's way); 10 conditions predicted
        theirs = run_driver(python, workdir, "equal", [
            *common, "--conditions", *conditions, "--cells", str(args.cells), "--width", str(args.width),
            "--depth", str(args.depth), "--token-dim", str(args.token_dim), "--steps", str(args.steps),
            "--warmup-steps", str(args.warmup_steps),
        ])
        widths = dict(width=args.width, depth=args.depth, token_dim=args.token_dim, context_dim=args.token_dim,
                      conditions_per_step=1, chunk=args.warmup_steps)
        runs = {"matched": dict(widths, field="joint", epsilon=1.0), "additive": widths}
        sides = {}
        for name, options in runs.items():
            # the first chunk (warm-up steps) includes compilation; the rate is timed from the rest
            model, _ = ours(train, options, args.warmup_steps + args.steps, args.batch_size, args.seed)
            if name == "matched":
                # timed before any other prediction of this model, so that "cold" includes compilation
                predictions, cold, warm = timed_predictions(model, source, conditions)
            else:
                predictions = our_predictions(model, source, held)
            sides[name] = {"options": {k: v for k, v in options.items() if k != "chunk"}}
            sides[name] |= side(n_parameters(model), steady_steps_per_second(model), predictions, args, truth, held)
        cellflow_tools = side(theirs["n_parameters"], theirs["steps_per_second"], theirs["arrays"], args, truth, held)
        equal = {
            "steps": args.steps, "batch_size": args.batch_size,
            "ours_matched": sides["matched"],
            "ours_additive": sides["additive"],
            "cellflow_tools": cellflow_tools,
            "steps_per_second_ratio": sides["matched"]["steps_per_second"] / theirs["steps_per_second"],
            "steps_per_second_ratio_additive": sides["additive"]["steps_per_second"] / theirs["steps_per_second"],
        }
        prediction = {
            "conditions": len(conditions), "cells": args.cells,
            "cellflow_tools_seconds": theirs["predict_seconds"],
            "ours_seconds_cold": cold, "ours_seconds_warm": warm,
            "ratio_cold": theirs["predict_seconds"] / cold, "ratio_warm": theirs["predict_seconds"] / warm,
        }

        # each library's defaults: CellFlow's 70 M-parameter network against our defaults
        first, *more = args.default_steps
        theirs_default = run_driver(python, workdir, "defaults", [
            *common, "--conditions", *held, "--cells", str(args.default_cells), "--defaults",
            "--steps", str(first), "--more-steps", *map(str, more), "--warmup-steps", "1",
        ])
        their_points = [
            {"steps": point["steps"], "setup_and_train_seconds": theirs_default["setup_seconds"] + point["train_seconds"],
             "warmup_seconds": theirs_default["warmup_seconds"],
             "predict_seconds": point["predict_seconds"],
             "held_out_energy_distance": held_out_energy(point["arrays"], truth, held, args.seed)["mean"]}
            for point in theirs_default["points"]
        ]
        small_source = source[: args.default_cells]
        ladder, refits, new_sessions = [], [], []
        for steps in args.our_default_steps:
            # a fresh fit in this process compiles its training program; a refit of the same
            # configuration with another seed (as in a seed sweep or a notebook re-run) reuses it
            for rows, seed in ((ladder, args.seed), (refits, args.seed + 1)):
                if seed == args.seed:
                    # fits differing only in their number of steps share a training program (the
                    # optimiser's numbers are in its state), so each point of the ladder first
                    # forgets every program, in memory and on disk, and compiles its own
                    cf.train.clear_compiled_programs(on_disk=True)
                model, seconds = ours(train, {}, steps, None, seed)
                predictions = our_predictions(model, small_source, held)
                rows.append({"steps": steps, "seed": seed, "fit_seconds": seconds,
                             "held_out_energy_distance": held_out_energy(predictions, truth, held, args.seed)["mean"]})
                if seed == args.seed:
                    first_losses = model.history_["loss"].tolist()
            again = new_session_fit(workdir, steps, args.seed)
            if again["loss"] != first_losses:
                raise RuntimeError(f"the new-session fit of {steps} steps did not replay the first fit's losses")
            new_sessions.append({"steps": steps, "seed": args.seed, "fit_seconds": again["fit_seconds"],
                                 "held_out_energy_distance": ladder[-1]["held_out_energy_distance"]})
        for point in their_points:
            for rows, suffix in ((ladder, ""), (refits, "_refit"), (new_sessions, "_new_session")):
                reached = next((row for row in rows if row["held_out_energy_distance"] <= point["held_out_energy_distance"]), None)
                point[f"ours_first_to_reach{suffix}"] = reached
                point[f"wall_time_ratio{suffix}"] = None if reached is None else point["setup_and_train_seconds"] / reached["fit_seconds"]
            # compilation counted on both sides: their warm-up step against our fresh fit
            reached = point["ours_first_to_reach"]
            point["wall_time_ratio_both_compiling"] = None if reached is None else (
                point["setup_and_train_seconds"] + point["warmup_seconds"]) / reached["fit_seconds"]
        defaults = {
            "cellflow_tools": {"n_parameters": theirs_default["n_parameters"], "cells": args.default_cells,
                               "points": their_points},
            "ours": ladder,
            "ours_refit": refits,
            "ours_new_session": new_sessions,
            "wall_time_ratios": [point["wall_time_ratio"] for point in their_points],
            "wall_time_ratios_refit": [point["wall_time_ratio_refit"] for point in their_points],
            "wall_time_ratios_new_session": [point["wall_time_ratio_new_session"] for point in their_points],
            "wall_time_ratios_both_compiling": [point["wall_time_ratio_both_compiling"] for point in their_points],
        }

    print(json.dumps({
        "benchmark": "vs_cellflow_tools",
        "device": str(jax.devices()[0]),
        "cellflow_tools_version": theirs.get("cellflow_tools_version"),
        "matmul_peak_gflops": peak,
        "held_out": held,
        "reference_energy_distance": reference,
        "equal_architecture": equal,
        "prediction_10_conditions": prediction,
        "defaults": defaults,
    }, indent=1, default=float))


if __name__ == "__main__":
    main()
