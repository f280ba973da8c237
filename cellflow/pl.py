"""Plots: predicted vs observed cells, metric bars, training curves, profile retrieval (matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd

from cellflow._errors import CellflowKeyError, format_choices
from cellflow.data import get_representation

__all__ = ["embedding", "metric_bars", "retrieval", "training_curve"]


def _axes(ax):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4))
    return ax


def embedding(
    populations: dict[str, ad.AnnData | np.ndarray],
    *,
    rep: str = "X",
    fit_on: str | None = None,
    ax=None,
    max_cells: int = 2000,
    seed: int = 0,
    title: str | None = None,
):
    """Scatter several cell populations on the first two principal components of one of them.

    Parameters
    ----------
    populations
        ``{label: cells}``, each an AnnData (read in ``rep``) or an ``(n, d)`` array, e.g.
        ``{"control": ..., "observed": ..., "predicted": ...}``.
    rep
        Representation of AnnData inputs.
    fit_on
        Label whose cells define the principal axes (default: all populations pooled).
    ax
        Matplotlib axes; a new figure when ``None``.
    max_cells
        Cells drawn per population, to keep plots light.

    Returns
    -------
    The axes.
    """
    arrays = {k: get_representation(v, rep) if isinstance(v, ad.AnnData) else np.asarray(v, np.float32) for k, v in populations.items()}
    if fit_on is not None and fit_on not in arrays:
        raise CellflowKeyError(f"fit_on={fit_on!r} is not a population; valid choices: {format_choices(arrays)}.")
    basis = arrays[fit_on] if fit_on else np.concatenate(list(arrays.values()))
    mean = basis.mean(axis=0)
    _, _, vt = np.linalg.svd(basis - mean, full_matrices=False)
    axes2 = vt[:2].T
    rng = np.random.default_rng(seed)
    ax = _axes(ax)
    for label, x in arrays.items():
        if len(x) > max_cells:
            x = x[rng.choice(len(x), max_cells, replace=False)]
        z = (x - mean) @ axes2
        ax.scatter(z[:, 0], z[:, 1], s=4, alpha=0.5, label=label, rasterized=True)
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2")
    ax.legend(markerscale=3, frameon=False)
    if title:
        ax.set_title(title)
    return ax


def metric_bars(
    table: pd.DataFrame,
    *,
    metric: str = "energy_distance",
    x: str = "task",
    hue: str = "method",
    order: Sequence[str] | None = None,
    ax=None,
    log: bool = False,
):
    """Grouped bar chart of a metric from a tidy table (one row per task and method).

    Parameters
    ----------
    table
        Tidy results with columns ``x``, ``hue`` and ``metric``.
    order
        Order of the ``hue`` values (default: first appearance).
    """
    for column in (x, hue, metric):
        if column not in table.columns:
            raise CellflowKeyError(f"column {column!r} is not in the table; valid choices: {format_choices(table.columns)}.")
    means = table.groupby([x, hue], sort=False)[metric].mean().unstack(hue)
    if order is not None:
        means = means[[h for h in order if h in means.columns]]
    ax = _axes(ax)
    n = means.shape[1]
    width = 0.8 / max(n, 1)
    positions = np.arange(len(means.index))
    for i, column in enumerate(means.columns):
        ax.bar(positions + (i - (n - 1) / 2) * width, means[column].to_numpy(), width, label=str(column))
    ax.set_xticks(positions, [str(i) for i in means.index])
    ax.set_ylabel(metric.replace("_", " "))
    if log:
        ax.set_yscale("log")
    ax.legend(frameon=False, fontsize="small")
    return ax


def training_curve(history: pd.DataFrame, *, columns: Sequence[str] | None = None, ax=None, log: bool = True):
    """Plot training metrics (``model.history_``) against the step."""
    if history.empty:
        raise CellflowKeyError("history is empty: the model has no training curve (closed-form methods have none).")
    columns = [c for c in history.columns if c != "step"] if columns is None else list(columns)
    ax = _axes(ax)
    steps = history["step"] if "step" in history else np.arange(len(history))
    for column in columns:
        ax.plot(steps, history[column], label=column)
    ax.set_xlabel("step")
    if log:
        ax.set_yscale("log")
    ax.legend(frameon=False)
    return ax


def retrieval(
    scores: pd.DataFrame,
    *,
    shuffled: np.ndarray | None = None,
    ax=None,
    title: str | None = None,
):
    """Mean average precision per label (e.g. per mechanism of action), with chance beside.

    Parameters
    ----------
    scores
        Per-query table of :func:`cellflow.metrics.retrieval_scores` (columns ``label``,
        ``average_precision``, ``n_positives``, ``n_candidates``).
    shuffled
        Optional mAPs of :func:`cellflow.metrics.map_retrieval_shuffled`, drawn as a band.
    ax
        Matplotlib axes; a new figure when ``None``.

    Returns
    -------
    The axes. Bars are each label's mean AP; ticks mark each label's chance level (mean of
    ``n_positives / n_candidates``); the dashed line is the overall mAP.
    """
    missing = [c for c in ("label", "average_precision", "n_positives", "n_candidates") if c not in scores.columns]
    if missing:
        raise CellflowKeyError(
            f"scores lacks columns {missing}; pass the table of cellflow.metrics.retrieval_scores "
            f"(columns present: {format_choices(scores.columns)})."
        )
    ax = _axes(ax)
    per_label = scores.assign(chance=scores.n_positives / scores.n_candidates).groupby("label")[["average_precision", "chance"]].mean()
    per_label = per_label.sort_values("average_precision")
    y = np.arange(len(per_label))
    ax.barh(y, per_label["average_precision"], color="tab:blue", label="mean AP")
    ax.scatter(per_label["chance"], y, marker="|", s=200, color="black", label="chance", zorder=3)
    ax.axvline(scores["average_precision"].mean(), color="tab:blue", linestyle="--", label="mAP")
    if shuffled is not None and len(shuffled):
        low, high = np.percentile(shuffled, [2.5, 97.5])
        ax.axvspan(low, high, color="grey", alpha=0.3, label="shuffled labels (95%)")
    ax.set_yticks(y, per_label.index)
    ax.set_xlim(0, 1)
    ax.set_xlabel("average precision")
    ax.legend(loc="lower right", fontsize="small")
    if title:
        ax.set_title(title)
    return ax
