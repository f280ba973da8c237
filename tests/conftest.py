from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CELLFLOW_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def shared_file(name: str) -> Path:
    """Path of a file in ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real data {name!r} not found in {SHARED_DATA} (set CELLFLOW_SHARED_DATA)")
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def pytest_configure(config):
    # Every fit builds fresh jitted closures, so identical programs (same architecture and shapes
    # in different tests) would otherwise compile again; a session-local persistent cache turns
    # those repeats into disk reads. It starts empty, so results cannot depend on earlier runs.
    import tempfile

    import jax

    # cellflow's own cache of training programs across processes would otherwise be the user's
    # (~/.cache/cellflow/xla): tests never read programs compiled before the run, nor leave any.
    # Set in the environment, so subprocesses started by tests inherit it.
    os.environ["CELLFLOW_COMPILATION_CACHE"] = "off"
    cache = tempfile.mkdtemp(prefix="cellflow-jax-cache-")
    config._cellflow_jax_cache = cache
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    import shutil

    cache = getattr(config, "_cellflow_jax_cache", None)
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)
