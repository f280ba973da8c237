"""Compiled training programs are shared between fits of the same configuration, never between different programs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cellflow as cf
from cellflow.train import clear_compiled_programs, shared_jit

from test_flow_matching import SMALL, shift_data


@pytest.fixture
def count_compilations(monkeypatch):
    counts = {"n": 0}
    real = jax.stages.Lowered.compile

    def counting(self, *args, **kwargs):
        counts["n"] += 1
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


def test_refitting_a_configuration_reuses_its_compiled_training_chunk(count_compilations):
    adata = shift_data(n=100)
    source = adata[adata.obs.condition == "control"][:50]

    def fit(seed):
        model = cf.ResponseModel(adata, rep="X", method="flow_matching", **SMALL)
        return model.fit(steps=20, batch_size=32, seed=seed, progress=False).predict(source, "A").X

    clear_compiled_programs()
    fit(0)
    after_first = count_compilations["n"]
    shared = fit(1)
    # the second fit compiled nothing for training (prediction programs are jitted by shape already)
    assert count_compilations["n"] == after_first
    clear_compiled_programs()
    np.testing.assert_array_equal(fit(1), shared)
    assert count_compilations["n"] == after_first + 1
