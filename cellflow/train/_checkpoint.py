"""orbax checkpoints of a :class:`TrainState` (plus the loss history), with resume."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from cellflow.train._state import TrainState

__all__ = ["save_checkpoint", "restore_checkpoint", "latest_checkpoint"]


def _manager(directory: str | Path) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        Path(directory).absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
        item_names=("state", "history"),
    )


def save_checkpoint(directory: str | Path, state: TrainState, history: list[dict]) -> None:
    """Save ``state`` at its step (orbax writes to a temporary directory and renames: atomic)."""
    with _manager(directory) as manager:
        manager.save(
            int(state.step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(jax.tree.map(np.asarray, state)),
                history=ocp.args.JsonSave(history),
            ),
        )
        manager.wait_until_finished()


def latest_checkpoint(directory: str | Path) -> int | None:
    """Step of the latest checkpoint in ``directory``, or ``None``."""
    if not Path(directory).exists():
        return None
    with _manager(directory) as manager:
        return manager.latest_step()


def restore_checkpoint(directory: str | Path, template: TrainState) -> tuple[TrainState, list[dict]]:
    """Restore the latest checkpoint into the structure of ``template``."""
    with _manager(directory) as manager:
        step = manager.latest_step()
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(jax.tree.map(np.asarray, template)),
                history=ocp.args.JsonRestore(),
            ),
        )
    state = jax.tree.map(lambda t, r: jax.numpy.asarray(r, dtype=t.dtype), template, restored["state"])
    return state, list(restored["history"] or [])
