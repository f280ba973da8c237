"""orbax checkpoints of a :class:`TrainState` (plus the loss history and what the run was), with resume."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cellflow._errors import CellflowValueError
from cellflow.train._state import TrainState

__all__ = ["save_checkpoint", "restore_checkpoint", "latest_checkpoint"]


def _manager(directory: str | Path) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        Path(directory).absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
        item_names=("state", "history", "run"),
    )


def save_checkpoint(directory: str | Path, state: TrainState, history: list[dict], run: Mapping[str, Any] | None = None) -> None:
    """Save ``state`` at its step (orbax writes to a temporary directory and renames: atomic).

    ``run`` (JSON) describes the run (method options, steps, seed, data) so that a resume can
    check that it continues the same one.
    """
    with _manager(directory) as manager:
        manager.save(
            int(state.step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(jax.tree.map(np.asarray, state)),
                history=ocp.args.JsonSave(history),
                run=ocp.args.JsonSave(dict(run or {})),
            ),
        )
        manager.wait_until_finished()


def latest_checkpoint(directory: str | Path) -> int | None:
    """Step of the latest checkpoint in ``directory``, or ``None``."""
    if not Path(directory).exists():
        return None
    with _manager(directory) as manager:
        return manager.latest_step()


def _saved_leaf_count(manager: ocp.CheckpointManager, step: int) -> int:
    """Number of arrays in the saved training state, read without a template (so whatever its
    layout); compared with the template's to tell a state of another layout from other errors."""
    saved = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    return len(jax.tree.leaves(saved))


def restore_checkpoint(
    directory: str | Path, template: TrainState, run: Mapping[str, Any] | None = None
) -> tuple[TrainState, list[dict]]:
    """Restore the latest checkpoint into the structure of ``template``.

    Raises
    ------
    CellflowValueError
        The checkpoint is of another run: its ``run`` description differs from ``run`` (given),
        or its arrays do not have the template's shapes (another architecture).
    """
    with _manager(directory) as manager:
        step = manager.latest_step()
        # checkpoints written before runs were described hold no "run" item: nothing to compare
        has_run = (Path(directory).absolute() / str(step) / "run").exists()
        saved_run = manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"] if has_run else None
        if run is not None and saved_run and "subspace" in saved_run and "subspace_components" not in saved_run:
            # written when the run description held the subspace option rather than the choice
            # (flow matching, 4b43192): the parameters' shapes, checked below, tell the spaces apart
            saved_run = {k: v for k, v in saved_run.items() if k != "subspace"}
            run = {k: v for k, v in run.items() if k != "subspace_components"}
        if run is not None and saved_run:
            differing = sorted(k for k in set(run) | set(saved_run) if saved_run.get(k) != run.get(k))
            if differing:
                details = "; ".join(f"{k}: {saved_run.get(k)!r} there, {run.get(k)!r} now" for k in differing[:5])
                raise CellflowValueError(
                    f"checkpoint_dir={str(directory)!r} holds step {step} of a different run ({details}), so "
                    "resume=True would continue another model; fit with resume=False to start afresh, or use "
                    "another checkpoint_dir."
                )
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(jax.tree.map(np.asarray, template)),
                    history=ocp.args.JsonRestore(),
                ),
            )
        except ValueError:
            if _saved_leaf_count(manager, step) == len(jax.tree.leaves(template)):
                raise
            raise CellflowValueError(
                f"checkpoint_dir={str(directory)!r} holds step {step} of a training state whose layout differs "
                "from this version's (written by an earlier cellflow, or with another optimiser), so it cannot be "
                "resumed; fit with resume=False to start afresh, or use another checkpoint_dir."
            ) from None
    for (path, expected), got in zip(jax.tree_util.tree_flatten_with_path(template)[0], jax.tree.leaves(restored["state"])):
        if np.shape(got) != np.shape(expected):
            raise CellflowValueError(
                f"checkpoint_dir={str(directory)!r} holds a model of another architecture: "
                f"{jax.tree_util.keystr(path)} has shape {np.shape(got)} there, {np.shape(expected)} now."
            )
    state = jax.tree.map(lambda t, r: jax.numpy.asarray(r, dtype=t.dtype), template, restored["state"])
    return state, list(restored["history"] or [])
