"""Data-parallel training: flow-matching steps per second on 1, 2, 4, ... devices, in one run.

Each training step draws ``conditions_per_step`` condition groups; with ``devices=k`` every
device takes ``conditions_per_step / k`` of them (its own coupling, loss and gradients) and the
gradients are averaged across devices (``cellflow.train.group_mesh``). Measured on the synthetic
default with a fixed total batch, so the ideal is a speed-up of ``k``; held-out quality is
reported beside, to show that splitting the batch does not change what is learned.

    python benchmarks/sharding.py [--steps 300] [--conditions-per-step 8] [--devices 1 2 4 8]

On a machine with one accelerator (or a CPU) only ``devices=1`` exists; to exercise the code
path on a CPU, ask XLA for host devices first (they share the CPU's cores, so do not expect a
speed-up there)::

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/sharding.py --devices 1 2

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

import cellflow as cf
from cellflow._demo import _held_out_pairs
from cellflow.data import parse_obs_conditions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300, help="timed steps (after one chunk of compilation)")
    parser.add_argument("--chunk", type=int, default=50)
    parser.add_argument("--conditions-per-step", type=int, default=8)
    parser.add_argument("--devices", type=int, nargs="+", default=None, help="device counts (default 1, 2, 4, ... up to all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    available = len(jax.local_devices())
    counts = args.devices or [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= available]
    counts = [k for k in counts if k <= available and args.conditions_per_step % k == 0]

    adata, truth = cf.datasets.synthetic(seed=args.seed)
    labels = parse_obs_conditions(adata, "condition", "control").labels()
    held = _held_out_pairs(truth, sorted({c for c in labels if "+" in c}))
    train = adata[~np.isin(labels, held)].copy()
    source = truth.sample_control(1000, "P1", seed=args.seed + 1)

    runs = []
    for k in counts:
        model = cf.ResponseModel(
            train, rep="X", dose_key="dose", covariate_keys=("patient",), method="flow_matching",
            devices=k, chunk=args.chunk, conditions_per_step=args.conditions_per_step,
        ).fit(steps=args.chunk + args.steps, seed=args.seed, progress=False)
        history = model.history_
        # the first chunk includes compilation
        rate = (history["step"].iloc[-1] - history["step"].iloc[0]) / (history["seconds"].iloc[-1] - history["seconds"].iloc[0])
        energy = []
        for condition in held:
            prediction = model.predict(source, condition, dose="1.0+1.0", covariates={"patient": "P1"}).X
            observed = truth.sample(condition, 2000, "P1", dose="1.0+1.0", seed=args.seed + 7)
            energy.append(cf.metrics.energy_distance(prediction, observed))
        runs.append({"devices": k, "steps_per_second": rate, "compile_and_first_chunk_seconds": float(history["seconds"].iloc[0]),
                     "held_out_energy_distance": float(np.mean(energy))})
    base = runs[0]["steps_per_second"] if runs else None
    for run in runs:
        run["speed_up"] = run["steps_per_second"] / base
    print(json.dumps({
        "benchmark": "sharding",
        "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
        "available_devices": available,
        "conditions_per_step": args.conditions_per_step,
        "steps": args.steps,
        "held_out": held,
        "runs": runs,
    }, indent=1))


if __name__ == "__main__":
    main()
