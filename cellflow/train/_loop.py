"""The host-side loop: runs jitted chunks of ``lax.scan``-ned steps, logs, evaluates, checkpoints.

Each chunk is one dispatch of ``chunk`` training steps with no host synchronisation inside;
the host only reads the chunk's losses to update the progress bar and history.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cellflow._errors import CellflowValueError, user_stacklevel
from cellflow.train._checkpoint import latest_checkpoint, restore_checkpoint, save_checkpoint
from cellflow.train._state import TrainState

__all__ = ["COUPLING_FALLBACK", "LoopResult", "chunk_size", "run_training"]

#: Name of the training metric that gives the fraction of a step's minibatches whose OT coupling
#: failed (Sinkhorn gave no usable plan) and were paired independently instead.
COUPLING_FALLBACK = "coupling_fallback"
#: Above this fraction of all batches, :func:`run_training` warns about failed couplings.
FALLBACK_WARNING_FRACTION = 0.05


@dataclass
class LoopResult:
    """Outcome of :func:`run_training`.

    Attributes
    ----------
    state
        Final training state.
    best_ema
        EMA parameters at the best validation score (the final EMA without validation).
    history
        One row per chunk: ``step``, ``loss`` (mean over the chunk), and ``val_*`` columns.
    stopped_early
        Whether early stopping ended training.
    """

    state: TrainState
    best_ema: Any
    history: pd.DataFrame = field(default_factory=pd.DataFrame)
    stopped_early: bool = False


def chunk_size(steps: int, chunk: int) -> int:
    """Steps per dispatch: the largest divisor of ``steps`` that is at most ``chunk``.

    So that ``fit(steps=n)`` runs exactly ``n`` steps (the learning-rate schedule ends where the
    run does) while each dispatch still runs as many steps as allowed: 2,000 steps in chunks of
    100, 250 steps in chunks of 50, 30 steps in one chunk of 30.
    """
    steps, chunk = int(steps), max(1, min(int(chunk), int(steps)))
    return next(c for c in range(chunk, 0, -1) if steps % c == 0)


def run_training(
    train_chunk: Callable[[TrainState], tuple[TrainState, dict[str, jax.Array]]],
    state: TrainState,
    steps: int,
    chunk: int,
    *,
    evaluate: Callable[[Any], float] | None = None,
    eval_every: int = 500,
    patience: int = 5,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1000,
    resume: bool = False,
    progress: bool = True,
    description: str = "training",
    run: Mapping[str, Any] | None = None,
) -> LoopResult:
    """Run ``steps`` training steps in jitted chunks of ``chunk`` steps.

    Parameters
    ----------
    train_chunk
        Jitted ``state -> (state, metrics)`` running ``chunk`` steps; ``metrics["loss"]`` has
        shape ``(chunk,)``.
    state
        Initial state (replaced by the latest checkpoint when ``resume``).
    steps
        Total number of steps (a multiple of ``chunk`` is run: ``ceil(steps / chunk)`` chunks;
        :func:`chunk_size` gives the largest chunk that divides ``steps``).
    evaluate
        ``ema_params -> score`` (lower is better), run every ``eval_every`` steps; the best EMA
        is kept and training stops after ``patience`` evaluations without improvement.
    checkpoint_dir, checkpoint_every, resume
        Save the state every ``checkpoint_every`` steps with orbax; ``resume`` restarts from the
        latest checkpoint in ``checkpoint_dir`` (from scratch when there is none yet).
    run
        JSON description of the run (options, steps, seed, data) saved with each checkpoint; a
        resume whose ``run`` differs from the checkpoint's raises rather than continue another run.

    Raises :class:`~cellflow._errors.CellflowValueError` as soon as a chunk's mean loss is not
    finite, rather than returning NaN weights.

    The history has one row per chunk: ``step``, the mean of each metric over the chunk,
    ``seconds`` since this call started (the first chunk includes compilation) and, when
    evaluated, ``val_energy_distance``.
    """
    history: list[dict] = []
    if resume and checkpoint_dir is None:
        warnings.warn(
            f"{description}: resume=True, but there is no checkpoint_dir option to resume from, so training starts "
            "from scratch; pass checkpoint_dir=<directory> to the model to write and resume checkpoints.",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    if resume and checkpoint_dir is not None and latest_checkpoint(checkpoint_dir) is not None:
        state, history = restore_checkpoint(checkpoint_dir, state, run)
    start = int(state.step)
    n_chunks = -(-steps // chunk)
    best_score, best_ema, waited, stopped = np.inf, state.ema, 0, False
    bar = tqdm(total=n_chunks * chunk, initial=min(start, n_chunks * chunk), desc=description, disable=not progress, unit="step")
    # the first dispatch traces and compiles the chunk (seconds) before any step runs
    bar.set_postfix_str("compiling")
    clock = time.perf_counter()
    while int(state.step) < n_chunks * chunk:
        before = int(state.step)
        state, metrics = train_chunk(state)
        step = int(state.step)
        if step - before != chunk:
            bar.close()
            raise CellflowValueError(
                f"train_chunk ran {step - before} steps per call but run_training was given chunk={chunk}; "
                "build the chunk with the same number of steps (cellflow.train.chunk_size(steps, ...))."
            )
        row = {"step": step, **{k: float(np.mean(v)) for k, v in metrics.items()}}
        # reading the losses above waited for the chunk, so this is its true end time
        row["seconds"] = time.perf_counter() - clock
        if not np.isfinite(row["loss"]):
            bar.close()
            raise CellflowValueError(
                f"{description} diverged: the loss is {row['loss']} in steps {step - chunk + 1}-{step}. "
                "Lower the learning_rate option (for OT couplings, raising epsilon also helps) or standardise the cells."
            )
        if evaluate is not None and (step % eval_every < chunk or step >= n_chunks * chunk):
            score = float(evaluate(state.ema))
            row["val_energy_distance"] = score
            if score < best_score:
                best_score, best_ema, waited = score, state.ema, 0
            else:
                waited += 1
        history.append(row)
        bar.set_postfix({k: f"{v:.4g}" for k, v in _shown_terms(history).items()}, refresh=False)
        bar.update(chunk)
        if checkpoint_dir is not None and (step % checkpoint_every < chunk or step >= n_chunks * chunk):
            save_checkpoint(checkpoint_dir, state, history, run)
        if evaluate is not None and waited >= patience:
            stopped = True
            break
    bar.close()
    _warn_failed_couplings(history, description)
    if evaluate is None:
        best_ema = state.ema
    return LoopResult(state, best_ema, pd.DataFrame(history), stopped)


def _shown_terms(history: list[dict[str, float]]) -> dict[str, float]:
    """What the progress bar shows of the history so far (all of it stays in ``history_``).

    The last chunk's terms, without those that carry no news: the step and seconds (the bar
    counts both), a term that has been exactly zero all along (an interaction term on data
    without combinations), and the share of failed couplings while it is harmless. The last
    validation score stays on until the next one replaces it.
    """
    row = history[-1]
    shown = {
        key: value
        for key, value in row.items()
        if key not in ("step", "seconds", "val_energy_distance")
        and (key != COUPLING_FALLBACK or value > FALLBACK_WARNING_FRACTION)
        and (key == "loss" or any(past.get(key, 0.0) != 0.0 for past in history))
    }
    scores = [past["val_energy_distance"] for past in history if "val_energy_distance" in past]
    if scores:
        shown["val_energy_distance"] = scores[-1]
    return shown


def _warn_failed_couplings(history: list[dict], description: str) -> None:
    """Warn when a sizeable share of the minibatch OT couplings failed (random pairs were used)."""
    fractions = [row[COUPLING_FALLBACK] for row in history if COUPLING_FALLBACK in row]
    if fractions and np.mean(fractions) > FALLBACK_WARNING_FRACTION:
        warnings.warn(
            f"{description}: the minibatch OT coupling failed in {np.mean(fractions):.0%} of the batches (Sinkhorn gave "
            "no usable plan, usually because its regularisation is too small for float32), and those batches were "
            "paired at random, which generalises worse; raise the epsilon option (for the Schrödinger bridge, sigma) "
            "or standardise the cells. The history's "
            f"{COUPLING_FALLBACK!r} column gives the fraction per chunk.",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
