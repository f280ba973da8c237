"""Compiled training programs are shared between fits of the same configuration, never between different programs."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import anndata as ad
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cellflow as cf
from cellflow.train import clear_compiled_programs, compilation_cache_dir, set_compilation_cache, shared_jit

from test_flow_matching import SMALL, shift_data


@pytest.fixture
def count_compilations(monkeypatch):
    counts = {"n": 0, "programs": []}
    real = jax.stages.Lowered.compile

    def counting(self, *args, **kwargs):
        counts["n"] += 1
        counts["programs"].append(self.as_text().split("@", 1)[1].split()[0])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(jax.stages.Lowered, "compile", counting)
    return counts


def closure_adding(constant: np.ndarray):
    offset = jnp.asarray(constant)
    return shared_jit(lambda x: 2.0 * x + offset)


@pytest.mark.parametrize("size", [1_000, 200_000])
def test_closures_differing_only_in_a_captured_array_are_compiled_apart(size, count_compilations):
    clear_compiled_programs()
    x = jnp.arange(size, dtype=jnp.float32)
    base = np.linspace(0.0, 1.0, size, dtype=np.float32)
    first = closure_adding(base)(x)
    assert count_compilations["n"] == 1
    # a new closure of the same program (same captured values) reuses the executable
    np.testing.assert_array_equal(closure_adding(base.copy())(x), first)
    assert count_compilations["n"] == 1
    tweaked = base.copy()
    tweaked[size // 3] += 5.0
    np.testing.assert_array_equal(np.asarray(closure_adding(tweaked)(x)) - np.asarray(first), tweaked - base)
    assert count_compilations["n"] == 2


def test_a_new_argument_shape_compiles_a_new_program(count_compilations):
    clear_compiled_programs()
    double = shared_jit(lambda x: 2.0 * x)
    np.testing.assert_array_equal(double(jnp.ones(3)), 2.0 * np.ones(3))
    np.testing.assert_array_equal(double(jnp.ones((2, 2))), 2.0 * np.ones((2, 2)))
    np.testing.assert_array_equal(double(jnp.ones(3, dtype=jnp.int32)), 2.0 * np.ones(3))
    assert count_compilations["n"] == 3


def test_programs_of_the_same_text_for_arguments_of_other_shapes_are_kept_apart(disk_cache, count_compilations):
    # JAX drops arguments a program does not read, so their shapes leave no trace in its text:
    # an optimiser's init of two models with as many parameters in other shapes (another data
    # set's covariate and member vocabularies) lowers to the same program.
    clear_compiled_programs()
    count = shared_jit(lambda tree: jnp.zeros(sum(leaf.size for leaf in jax.tree.leaves(tree))))
    first = {"covariates": jnp.ones((8, 4)), "members": jnp.ones((3, 4))}
    second = {"covariates": jnp.ones((5, 4)), "members": jnp.ones((6, 4))}
    assert count(first).shape == (44,)
    assert count(second).shape == (44,)
    assert count_compilations["n"] == 2
    clear_compiled_programs()  # as in a new process: the two programs come back from disk
    assert count(second).shape == count(first).shape == (44,)
    assert count_compilations["n"] == 2


def test_refitting_a_configuration_reuses_its_compiled_training_chunk(count_compilations):
    # a covariate for covariate_dropout, and a combination for interaction_penalty, to act on
    singles = shift_data(n=100)
    x = np.random.default_rng(1).normal(size=(100, 2))
    both = ad.AnnData(X=(x + [3.0, 0.0] + [0.0, -2.0] * np.abs(x[:, :1])).astype(np.float32), obs={"condition": ["A+B"] * 100})
    adata = ad.concat([singles, both], index_unique="-")
    adata.obs["batch"] = np.where(np.arange(adata.n_obs) % 2, "b1", "b2")
    source = adata[adata.obs.condition == "control"][:50]

    def fit(seed, steps=20, **optimiser):
        model = cf.ResponseModel(adata, rep="X", method="flow_matching", covariate_keys=("batch",),
                                 **{**SMALL, "chunk": 20, **optimiser})
        return model.fit(steps=steps, batch_size=32, seed=seed, progress=False).predict(source, "A+B", covariates={"batch": "b1"}).X

    clear_compiled_programs()
    fit(0)
    after_first = count_compilations["n"]
    shared = fit(1)
    # the second fit compiled nothing, neither for training nor for prediction; nor does a sweep
    # over the optimiser's numbers, which live in its state rather than in the program
    assert count_compilations["n"] == after_first
    swept = fit(1, steps=60, learning_rate=3e-3, warmup=5, weight_decay=1e-3)
    # the optimiser's first state holds the new numbers (a program of a few constants)
    assert count_compilations["programs"][after_first:] == ["jit_init_fn"] and not np.allclose(swept, shared)
    # nor one over the solver's continuous numbers, which are arguments of the program
    for number, value in (("sigma", 1.0), ("epsilon", 0.05), ("ema_decay", 0.5), ("covariate_dropout", 0.3),
                          ("covariate_dropout", 0.0), ("interaction_penalty", 0.2)):
        assert not np.allclose(fit(1, **{number: value}), shared), number
    assert count_compilations["n"] == after_first + 1
    clear_compiled_programs()
    np.testing.assert_array_equal(fit(1), shared)
    assert count_compilations["n"] == 2 * after_first + 1  # what the first fit compiled, again


def with_batches(adata):
    # two batches, one of which holds only ten of B's cells: the groups (A, b1), (A, b2), (B, b1), (B, b2)
    batch = np.where(np.arange(adata.n_obs) % 2, "b1", "b2")
    is_b = (adata.obs.condition == "B").to_numpy()
    batch[is_b] = "b1"
    batch[np.flatnonzero(is_b)[:10]] = "b2"
    adata.obs["batch"] = batch
    return adata


def test_data_sets_of_nearby_sizes_share_the_training_program(count_compilations, monkeypatch):
    options = {**SMALL, "chunk": 10}

    def fit(adata):
        model = cf.ResponseModel(adata, rep="X", method="flow_matching", covariate_keys=("batch",), **options)
        source = adata[adata.obs.condition == "control"][:50]
        return model.fit(steps=10, batch_size=32, seed=0, progress=False).predict(source, "A", covariates={"batch": "b1"}).X

    clear_compiled_programs()
    fit(with_batches(shift_data(n=200)))
    # another fold: other cells, 3 x 210 of them
    fit(with_batches(shift_data(n=210, seed=1)))
    # another fold with a training group fewer (B in batch b2 held out)
    fewer = with_batches(shift_data(n=200, seed=2))
    fit(fewer[~((fewer.obs.condition == "B") & (fewer.obs.batch == "b2"))].copy())
    assert count_compilations["programs"].count("jit_scan_steps") == 1
    # padding changes nothing the sampler draws: the same fit without it predicts the same cells
    padded = fit(with_batches(shift_data(n=210, seed=1)))
    monkeypatch.setattr("cellflow.data._sampler.padded_length", lambda n: n)
    np.testing.assert_array_equal(fit(with_batches(shift_data(n=210, seed=1))), padded)
    assert count_compilations["programs"].count("jit_scan_steps") == 2


@pytest.mark.parametrize("method, sweep", [
    ("schrodinger_bridge", ({"sigma": 1.0}, {"sigma": 0.5}, {"score_weight": 0.5}, {"covariate_dropout": 0.3})),
    ("neural_ot", ({}, {"epsilon": 0.2}, {"monge_gap": 0.5}, {"covariate_dropout": 0.3})),
    ("diffusion", ({}, {"p_uncond": 0.3}, {"covariate_dropout": 0.3})),
])
def test_a_sweep_over_a_solver_number_shares_its_training_program(method, sweep, count_compilations):
    adata = shift_data(n=60)
    adata.obs["batch"] = np.where(np.arange(adata.n_obs) % 2, "b1", "b2")  # for covariate_dropout to act on
    small = {"width": 32, "token_dim": 8, "context_dim": 8, "conditions_per_step": 2, "chunk": 10}
    clear_compiled_programs()
    losses = []
    for options in sweep:
        model = cf.ResponseModel(adata, rep="X", method=method, covariate_keys=("batch",), **small, **options)
        losses.append(model.fit(steps=10, batch_size=32, seed=0, progress=False).history_["loss"].to_numpy())
    assert count_compilations["programs"].count("jit_scan_steps") == 1
    for options, loss in zip(sweep[1:], losses[1:]):
        assert not np.array_equal(loss, losses[0]), options


# -- the on-disk cache ---------------------------------------------------------------------------
@pytest.fixture
def without_jax_cache():
    """JAX's persistent cache (which the test session turns on) off, as it is by default."""
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    yield
    jax.config.update("jax_enable_compilation_cache", True)
    compilation_cache.reset_cache()


@pytest.fixture
def disk_cache(tmp_path, without_jax_cache):
    """cellflow's on-disk cache in a fresh folder, and nothing in memory, for the test's duration."""
    from cellflow.train import _compile

    previous = _compile._cache_dir
    set_compilation_cache(tmp_path / "xla")
    clear_compiled_programs()
    yield tmp_path / "xla"
    _compile._cache_dir = previous
    clear_compiled_programs()


def test_the_cache_stays_out_of_the_way_of_jax_own(tmp_path, count_compilations):
    # an executable JAX loaded from its persistent cache cannot be serialized again on a CPU
    from cellflow.train import _compile

    previous = _compile._cache_dir
    set_compilation_cache(tmp_path)
    try:
        assert jax.config.jax_compilation_cache_dir  # the test session's (conftest.py)
        clear_compiled_programs()
        np.testing.assert_array_equal(shared_jit(lambda v: v * 5.0)(jnp.ones(2)), 5.0 * np.ones(2))
        assert count_compilations["n"] == 1 and not list(tmp_path.glob("*.xla"))
    finally:
        _compile._cache_dir = previous


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    from cellflow.train import _compile

    monkeypatch.setattr(_compile, "_cache_dir", _compile._UNSET)
    monkeypatch.setenv("CELLFLOW_COMPILATION_CACHE", str(tmp_path))
    assert compilation_cache_dir() == tmp_path
    for off in ("off", "0", "", "FALSE"):
        monkeypatch.setenv("CELLFLOW_COMPILATION_CACHE", off)
        assert compilation_cache_dir() is None
    monkeypatch.delenv("CELLFLOW_COMPILATION_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compilation_cache_dir() == tmp_path / "cellflow" / "xla"
    set_compilation_cache(None)  # an explicit choice wins over the environment
    assert compilation_cache_dir() is None


def test_a_refit_after_the_memory_is_cleared_loads_its_training_program_from_disk(disk_cache, count_compilations):
    adata = shift_data(n=100)
    source = adata[adata.obs.condition == "control"][:50]

    def fit():
        model = cf.ResponseModel(adata, rep="X", method="flow_matching", **SMALL)
        return model.fit(steps=20, batch_size=32, seed=0, progress=False).predict(source, "A").X

    first = fit()
    compiled = count_compilations["n"]
    assert compiled >= 1 and len(list(disk_cache.glob("*.xla"))) == compiled
    clear_compiled_programs()  # as in a new process: nothing in memory, the files on disk
    np.testing.assert_array_equal(fit(), first)
    assert count_compilations["n"] == compiled
    clear_compiled_programs(on_disk=True)
    assert not list(disk_cache.glob("*.xla"))
    np.testing.assert_array_equal(fit(), first)
    assert count_compilations["n"] == 2 * compiled


def test_the_diffusion_sampler_is_kept_on_disk_too(disk_cache, count_compilations):
    from test_diffusion import SMALL as SMALL_DIFFUSION

    adata = shift_data(n=100)
    source = adata[adata.obs.condition == "control"][:50]
    model = cf.ResponseModel(adata, rep="X", method="diffusion", **SMALL_DIFFUSION).fit(steps=10, batch_size=32, progress=False)
    first = model.predict(source, "A", seed=0).X
    compiled = count_compilations["n"]
    entries = len(list(disk_cache.glob("*.xla")))
    assert entries >= 3  # the optimiser's initial state, the training chunk and the sampler
    clear_compiled_programs()  # as in a new process
    np.testing.assert_array_equal(model.predict(source, "A", seed=0).X, first)
    assert count_compilations["n"] == compiled


def test_a_new_process_reuses_the_program_a_previous_one_compiled(tmp_path):
    # the entry holds the argument and result structures too (here a TrainState), so a process
    # that has never compiled the program can call it
    script = textwrap.dedent(
        """
        import json, jax, jax.numpy as jnp
        from cellflow.train import TrainState, shared_jit
        compilations = {"n": 0}
        real = jax.stages.Lowered.compile
        def counting(self, *args, **kwargs):
            compilations["n"] += 1
            return real(self, *args, **kwargs)
        jax.stages.Lowered.compile = counting
        state = TrainState({"w": jnp.arange(4.0)}, {"w": jnp.ones(4)}, (), jnp.zeros((), jnp.int32), jnp.zeros(2, jnp.uint32))
        step = shared_jit(lambda s: s._replace(params={"w": jnp.sin(s.params["w"]) + s.ema["w"]}, step=s.step + 1))
        out = step(step(state))
        print(json.dumps({"compilations": compilations["n"], "w": out.params["w"].tolist(), "step": int(out.step)}))
        """
    )
    env = {**os.environ, "CELLFLOW_COMPILATION_CACHE": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    runs = []
    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    assert [r["compilations"] for r in runs] == [1, 0]
    assert runs[0]["w"] == runs[1]["w"] and runs[1]["step"] == 2


def test_a_damaged_entry_is_compiled_again_and_replaced(disk_cache, count_compilations):
    x = jnp.arange(5.0)
    np.testing.assert_array_equal(shared_jit(lambda v: v * 3.0)(x), 3.0 * np.arange(5.0))
    (entry,) = disk_cache.glob("*.xla")
    entry.write_bytes(b"not a program")
    clear_compiled_programs()
    np.testing.assert_array_equal(shared_jit(lambda v: v * 3.0)(x), 3.0 * np.arange(5.0))
    assert count_compilations["n"] == 2
    assert entry.read_bytes() != b"not a program"


def test_an_unwritable_cache_warns_once_and_training_goes_on(tmp_path, monkeypatch, without_jax_cache, count_compilations):
    from cellflow.train import _compile

    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setattr(_compile, "_cache_dir", blocker / "xla")
    monkeypatch.setattr(_compile, "_warned_unwritable", False)
    clear_compiled_programs()
    with pytest.warns(RuntimeWarning, match="cannot write its compilation cache"):
        np.testing.assert_array_equal(shared_jit(lambda v: v + 1.0)(jnp.zeros(3)), np.ones(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(shared_jit(lambda v: v + 2.0)(jnp.zeros(3)), 2.0 * np.ones(3))
    assert count_compilations["n"] == 2
    clear_compiled_programs()


def test_the_cache_drops_its_least_recently_used_programs_beyond_its_size(disk_cache, monkeypatch):
    from cellflow.train import _compile

    x = jnp.arange(3.0)
    shared_jit(lambda v: v + 1.0)(x)
    (oldest,) = disk_cache.glob("*.xla")
    monkeypatch.setattr(_compile, "MAX_CACHE_BYTES", int(1.5 * oldest.stat().st_size))
    os.utime(oldest, (1, 1))
    shared_jit(lambda v: v + 2.0)(x)
    remaining = list(disk_cache.glob("*.xla"))
    assert len(remaining) == 1 and remaining[0] != oldest


def test_tracing_runs_without_the_cycle_collector_which_is_back_on_after():
    import gc

    seen = []

    def program(x):
        seen.append(gc.isenabled())  # runs while JAX traces
        return x + 1.0

    assert gc.isenabled()
    shared_jit(program)(jnp.zeros(3))
    assert seen == [False] and gc.isenabled()
    gc.disable()
    try:  # a caller that turned it off keeps it off
        shared_jit(program)(jnp.zeros(4))
        assert not gc.isenabled()
    finally:
        gc.enable()
