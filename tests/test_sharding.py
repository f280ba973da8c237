"""Data-parallel training: a step's condition groups split over devices.

The machine running the tests may have one device, so the checks run in a subprocess that
asks XLA for two host (CPU) devices; on real accelerators the same code splits over GPUs/TPUs.
"""

import json
import os
import subprocess
import sys
import textwrap

import anndata as ad
import numpy as np
import pytest

import cellflow as cf

SCRIPT = textwrap.dedent(
    """
    import json
    import anndata as ad
    import jax
    import numpy as np
    import cellflow as cf

    rng = np.random.default_rng(0)
    n = 150
    x = np.vstack([rng.normal(size=(n, 2)), rng.normal(size=(n, 2)) + [3.0, 0.0], rng.normal(size=(n, 2))])
    adata = ad.AnnData(X=x.astype(np.float32), obs={"condition": ["control"] * n + ["A"] * n + ["B"] * n})
    small = dict(width=32, depth=1, token_dim=8, context_dim=8, conditions_per_step=2, chunk=40, warmup=10, learning_rate=1e-2)
    source = adata[:n]
    out = {"devices": len(jax.devices()), "compilations": []}
    compilations = {"n": 0}
    real_compile = jax.stages.Lowered.compile

    def counting_compile(self, *args, **kwargs):
        compilations["n"] += 1
        return real_compile(self, *args, **kwargs)

    jax.stages.Lowered.compile = counting_compile
    for devices in (1, 2, 2):
        model = cf.ResponseModel(adata, rep="X", method="flow_matching", devices=devices, **small)
        before = compilations["n"]
        model.fit(steps=120, batch_size=32, seed=1, progress=False)
        out["compilations"].append(compilations["n"] - before)
        shift = (model.predict(source, "A").X - source.X).mean(axis=0)
        out.setdefault(str(devices), []).append({"shift": shift.tolist(), "loss": model.history_["loss"].tolist()})
    mesh = cf.train.group_mesh(2)
    out["mesh"] = None if mesh is None else mesh.devices.size
    try:
        cf.train.group_mesh(3, 2)
    except cf.CellflowValueError as error:
        out["error"] = str(error)
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def two_device_run():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_two_devices_learn_what_one_device_learns(two_device_run):
    assert two_device_run["devices"] == 2 and two_device_run["mesh"] == 2
    (one,), (two, again) = two_device_run["1"], two_device_run["2"]
    # the devices draw their own keys, so the runs differ only by sampling noise
    assert abs(two["shift"][0] - one["shift"][0]) < 0.3 and abs(two["shift"][1] - one["shift"][1]) < 0.3
    assert two["shift"][0] > 2.0  # drug A moves cells by (3, 0)
    # the loss of the last 40 steps (one chunk): about 0.6 either way, at every seed tried
    assert abs(two["loss"][-1] - one["loss"][-1]) < 0.25 * one["loss"][-1]
    assert two == again  # deterministic for a given number of devices


def test_sharded_training_compiles_its_chunk_once_and_refits_reuse_it(two_device_run):
    # one program per device count; the state enters every chunk with the same shardings (the
    # first chunk used to compile a second program for the replicated state it returned); the
    # first fit also compiles the optimiser's initial state, which every later fit shares
    assert two_device_run["compilations"] == [2, 1, 0]


def test_device_count_must_divide_the_groups_per_step(two_device_run):
    assert "devices=2 does not divide conditions_per_step=3" in two_device_run["error"]
    assert "valid device counts: [1]" in two_device_run["error"]


def test_one_device_trains_without_a_mesh_and_bad_counts_are_named():
    assert cf.train.group_mesh(8, 1) is None  # the plain single-device step
    with pytest.raises(cf.CellflowValueError, match="devices=10000 is invalid: this process has"):
        cf.train.group_mesh(8, 10_000)
    with pytest.raises(cf.CellflowValueError, match="devices=0 .* expected a positive integer or None"):
        cf.ResponseModel(ad.AnnData(np.zeros((4, 2), np.float32), obs={"condition": ["control", "A"] * 2}), rep="X", devices=0)
