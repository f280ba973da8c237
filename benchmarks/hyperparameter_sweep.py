"""Wall time of a hyper-parameter sweep: the first fit compiles, the others reuse its program.

A flow-matching fit's training program takes its continuous hyper-parameters as arguments
(``learning_rate``, ``warmup``, ``weight_decay`` and ``steps`` in the optimiser's state;
``sigma``, ``sigma_min``, ``epsilon``, ``ema_decay``, ``covariate_dropout`` and
``interaction_penalty`` as arguments of the scanned chunk), so a sweep over them compiles once.
This script fits the default model on the synthetic default (every patient, dose and drug)
once per value of a small sweep, each fit timed from ``fit`` to its return, and reports the
first fit (compilation included: the in-memory programs are cleared and the on-disk cache is
off), the mean of the others, their ratio, and how many training programs were compiled.
``--compare-structure`` adds a fit that changes the program (``path="smoothed"``), which has
to compile again.

    python benchmarks/hyperparameter_sweep.py [--steps 50] [--seed 0]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ["CELLFLOW_COMPILATION_CACHE"] = "off"  # every compilation is counted, none loaded from disk

import jax  # noqa: E402
import numpy as np  # noqa: E402

import cellflow as cf  # noqa: E402

SWEEP = (
    {},
    {"sigma": 1.0},
    {"sigma": 3.0},
    {"epsilon": 0.05},
    {"ema_decay": 0.99},
    {"covariate_dropout": 0.3},
    {"interaction_penalty": 0.3},
    {"learning_rate": 3e-3},
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-structure", action="store_true", help="also time a fit with path='smoothed'")
    args = parser.parse_args()

    compiled: list[str] = []

    def record(event: str, duration: float, **info) -> None:
        if event == "/jax/core/compile/backend_compile_duration" and "scan_steps" in str(info.get("fun_name", "")):
            compiled.append(f"{duration:.2f}")

    jax.monitoring.register_event_duration_secs_listener(record)
    adata, _ = cf.datasets.synthetic(seed=args.seed)
    cf.train.clear_compiled_programs()
    sweep = list(SWEEP) + ([{"path": "smoothed"}] if args.compare_structure else [])
    fits = []
    for options in sweep:
        model = cf.ResponseModel(adata, rep="X", dose_key="dose", covariate_keys=("patient",), method="flow_matching", **options)
        start = time.perf_counter()
        model.fit(steps=args.steps, seed=args.seed, progress=False)
        seconds = time.perf_counter() - start
        fits.append({"options": options, "seconds": round(seconds, 3), "final_loss": round(float(model.history_["loss"].iloc[-1]), 4),
                     "training_programs_compiled_so_far": len(compiled)})
    shared = [f["seconds"] for f in fits[1 : len(SWEEP)]]
    print(json.dumps({
        "benchmark": "hyperparameter_sweep",
        "device": str(jax.devices()[0]),
        "steps": args.steps,
        "first_fit_seconds": fits[0]["seconds"],
        "later_fits_mean_seconds": round(float(np.mean(shared)), 3),
        "first_over_later": round(fits[0]["seconds"] / float(np.mean(shared)), 2),
        "training_programs_compiled": len(compiled),
        "compile_seconds": compiled,
        "fits": fits,
    }, indent=1))


if __name__ == "__main__":
    main()
