"""Energy distance and MMD at scale: time and memory of cellflow's chunked JAX kernels.

Compares, in one run on the same data, cellflow's jitted tiled kernels with a float64 numpy
reference that walks scipy ``cdist`` row blocks (the straightforward way to stay in bounded
memory), and reports the peak memory increase against the size of the full distance matrix.

    python benchmarks/metrics_scale.py [--n 20000] [--d 50]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
from scipy.spatial.distance import cdist

import cellflow as cf


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def blocked_mean_distance(a: np.ndarray, b: np.ndarray, block: int = 2048) -> float:
    total = 0.0
    for start in range(0, len(a), block):
        total += cdist(a[start : start + block], b).sum()
    return total / (len(a) * len(b))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--d", type=int, default=50)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.n, args.d)).astype(np.float32)
    y = (rng.normal(size=(args.n, args.d)) * 1.1 + 0.2).astype(np.float32)

    cf.metrics.energy_distance(x[:256], y[:256])  # compile outside the timing
    rss_before = peak_rss_mb()
    start = time.perf_counter()
    energy = cf.metrics.energy_distance(x, y)
    seconds_ours = time.perf_counter() - start
    rss_after = peak_rss_mb()

    start = time.perf_counter()
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    reference = 2 * blocked_mean_distance(x64, y64) - blocked_mean_distance(x64, x64) - blocked_mean_distance(y64, y64)
    seconds_reference = time.perf_counter() - start

    start = time.perf_counter()
    mmd = cf.metrics.mmd(x[:5000], y[:5000])
    seconds_mmd = time.perf_counter() - start

    print(json.dumps({
        "benchmark": "metrics_scale",
        "n": args.n,
        "m": args.n,
        "d": args.d,
        "energy_distance": energy,
        "energy_distance_reference_float64": reference,
        "relative_error": abs(energy - reference) / abs(reference),
        "seconds_cellflow": round(seconds_ours, 3),
        "seconds_scipy_blocked_float64": round(seconds_reference, 3),
        "speedup_vs_scipy_blocked": round(seconds_reference / seconds_ours, 2),
        "peak_rss_increase_mb": round(rss_after - rss_before, 1),
        "full_distance_matrix_mb": round(args.n * args.n * 4 / 2**20, 1),
        "mmd_5000x5000": mmd,
        "seconds_mmd_5000x5000_6_gammas": round(seconds_mmd, 3),
    }, indent=1))


if __name__ == "__main__":
    main()
