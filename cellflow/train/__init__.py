"""The jitted training loop: scanned steps, optax schedules, EMA, orbax checkpoints with resume."""

from cellflow.train._checkpoint import latest_checkpoint, restore_checkpoint, save_checkpoint
from cellflow.train._loop import LoopResult, run_training
from cellflow.train._state import TrainState, ema_update, key_data, make_optimizer, scanned_training_chunk

__all__ = [
    "LoopResult",
    "TrainState",
    "ema_update",
    "key_data",
    "latest_checkpoint",
    "make_optimizer",
    "restore_checkpoint",
    "run_training",
    "save_checkpoint",
    "scanned_training_chunk",
]
