"""The jitted training loop: scanned steps, optax schedules, EMA, orbax checkpoints with resume."""

from cellflow.train._checkpoint import latest_checkpoint, restore_checkpoint, save_checkpoint
from cellflow.train._compile import clear_compiled_programs, compilation_cache_dir, set_compilation_cache, shared_jit
from cellflow.train._loop import COUPLING_FALLBACK, LoopResult, chunk_size, run_training
from cellflow.train._state import (
    GROUP_AXIS,
    TrainState,
    ema_update,
    group_mesh,
    initial_state,
    key_data,
    make_optimizer,
    scale_by_warmup_cosine,
    scanned_training_chunk,
    step_keys,
    training_step,
)

__all__ = [
    "COUPLING_FALLBACK",
    "GROUP_AXIS",
    "LoopResult",
    "TrainState",
    "chunk_size",
    "clear_compiled_programs",
    "compilation_cache_dir",
    "ema_update",
    "group_mesh",
    "initial_state",
    "key_data",
    "latest_checkpoint",
    "make_optimizer",
    "restore_checkpoint",
    "run_training",
    "save_checkpoint",
    "scale_by_warmup_cosine",
    "scanned_training_chunk",
    "set_compilation_cache",
    "shared_jit",
    "step_keys",
    "training_step",
]
