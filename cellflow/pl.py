"""Plots: predicted vs observed cells, metric bars, training curves, profile retrieval (matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd

from cellflow._errors import CellflowKeyError, CellflowValueError, format_choices
from cellflow.data import default_representation, get_representation
from cellflow.train import COUPLING_FALLBACK

__all__ = ["embedding", "metric_bars", "retrieval", "training_curve", "trajectories"]


def _axes(ax):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4))
    return ax


def embedding(
    populations: dict[str, ad.AnnData | np.ndarray],
    *,
    rep: str | None = None,
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
        Representation of every AnnData input; ``None``: the one the first prediction among them
        was predicted in (``uns["cellflow"]["rep"]``), else ``"X"``. For ``"X"`` and layers the
        genes are matched by var name to the first AnnData's, so the others may hold more genes
        or another order.
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
    if rep is None:  # every population in one space: the first prediction's, else X
        recorded = [default_representation(v) for v in populations.values() if isinstance(v, ad.AnnData) and "cellflow" in v.uns]
        rep = recorded[0] if recorded else "X"
    # genes are matched by name, as in evaluate: observed cells may hold more genes, or another order
    named = [v for v in populations.values() if isinstance(v, ad.AnnData) and rep not in v.obsm]
    var_order = list(named[0].var_names) if named else None
    arrays = {
        k: get_representation(v, rep, features=None if rep in v.obsm else var_order)
        if isinstance(v, ad.AnnData)
        else np.asarray(v, np.float32)
        for k, v in populations.items()
    }
    widths = {k: v.shape[1] if v.ndim == 2 else v.shape for k, v in arrays.items()}
    if len(set(widths.values())) > 1:
        raise CellflowValueError(f"populations must have the same number of features (AnnData read in rep={rep!r}); got {widths}.")
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
    x: str | None = None,
    hue: str | None = None,
    order: Sequence[str] | None = None,
    ax=None,
    log: bool = False,
):
    """Grouped bar chart of a metric from a tidy table (one row per task and method).

    Parameters
    ----------
    table
        Tidy results with columns ``x``, ``metric`` and, if given, ``hue``: a benchmark's table
        (``cellflow bench``, ``experiments/run.py``) or :func:`cellflow.metrics.evaluate`'s.
    x
        Column of the bar groups; default ``"task"`` if the table has it, else its first
        column of labels (e.g. ``"condition"`` of an ``evaluate`` table).
    hue
        Column of the bars within a group; default ``"method"`` if the table has it, else one
        bar per group.
    order
        Order of the ``hue`` values (default: first appearance).

    A ``"<metric>_floor"`` column (``evaluate(..., floors=True)``, ``experiments/run.py``) is
    drawn as a dashed line over each group of bars: what a perfect prediction would score.
    """
    floor = f"{metric}_floor"
    if x is None:
        labels = [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c]) and c != hue]
        # a table grouped by a numeric column (dose, time) has no text label: its first column
        # that is neither the metric nor a cell count names the groups
        numeric = [c for c in table.columns if c not in (metric, floor, hue) and not str(c).startswith("n_")]
        x = "task" if "task" in table.columns else (labels[0] if labels else (numeric[0] if numeric else "task"))
    if hue is None and "method" in table.columns and x != "method":
        hue = "method"
    for column in (x, metric) if hue is None else (x, hue, metric):
        if column not in table.columns:
            raise CellflowKeyError(f"column {column!r} is not in the table; valid choices: {format_choices(table.columns)}.")
    if hue is None:
        means = table.groupby(x, sort=False)[metric].mean().to_frame(metric)
    else:
        means = table.groupby([x, hue], sort=False)[metric].mean().unstack(hue)
    if order is not None:
        means = means[[h for h in order if h in means.columns]]
    ax = _axes(ax)
    n = means.shape[1]
    width = 0.8 / max(n, 1)
    positions = np.arange(len(means.index))
    for i, column in enumerate(means.columns):
        ax.bar(positions + (i - (n - 1) / 2) * width, means[column].to_numpy(), width, label=str(column))
    ticks = [str(i) for i in means.index]
    ax.set_xticks(positions, ticks)
    # labels that would not fit side by side (a character is about 0.6 em wide) are slanted,
    # anchored at their end, so that they stay readable
    font_points = ax.get_xticklabels()[0].get_fontsize() if ticks else 0.0
    room_points = ax.get_window_extent().width * 72 / ax.figure.dpi / max(len(ticks), 1)
    if max((len(t) for t in ticks), default=0) * 0.6 * font_points > room_points:
        ax.set_xticks(positions, ticks, rotation=30, ha="right")
    if floor in table.columns:
        floors = table.groupby(x, sort=False)[floor].mean().reindex(means.index).to_numpy()
        ax.hlines(floors, positions - 0.45, positions + 0.45, colors="black", linestyles="--", linewidth=1,
                  label="noise floor")
    ax.set_ylabel(metric.replace("_", " "))
    if log:
        ax.set_yscale("log")
    if hue is not None or floor in table.columns:
        ax.legend(frameon=False, fontsize="small")
    return ax


def training_curve(history: pd.DataFrame, *, columns: Sequence[str] | None = None, ax=None, log: bool = True):
    """Plot training metrics (``model.history_``) against the step.

    Parameters
    ----------
    history
        ``model.history_``: one row per dispatched chunk of steps.
    columns
        Columns to draw; default every loss and validation column (not ``step``, the wall
        time ``seconds`` or ``coupling_fallback``).
    ax
        Matplotlib axes; a new figure when ``None``.
    log
        Logarithmic y axis (not applied when a drawn value is not positive).

    Returns
    -------
    The axes.
    """
    if history.empty:
        raise CellflowValueError("history is empty: the model has no training curve (closed-form methods have none).")
    if columns is None:  # the losses: not the step, the clock or the share of failed couplings
        columns = [c for c in history.columns if c not in ("step", "seconds", COUPLING_FALLBACK)]
    else:
        columns = list(columns)
        unknown = [c for c in columns if c not in history.columns]
        if unknown:
            raise CellflowKeyError(f"columns {unknown!r} are not in history; valid choices: {format_choices(history.columns)}.")
    ax = _axes(ax)
    steps = history["step"] if "step" in history else np.arange(len(history))
    marker = "o" if len(history) <= 20 else None  # a short fit has a chunk or a few: show the points
    for column in columns:
        ax.plot(steps, history[column], label=column, marker=marker)
    ax.set_xlabel("step")
    values = history[columns].to_numpy(dtype=float)
    if log and np.all(values[np.isfinite(values)] > 0):
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


def trajectories(
    predicted: ad.AnnData,
    *,
    time_key: str,
    rep: str | None = None,
    observed: ad.AnnData | None = None,
    max_cells: int = 200,
    ax=None,
    seed: int = 0,
    title: str | None = None,
):
    """Paths of predicted cells through time on the first two principal components.

    Parameters
    ----------
    predicted
        The output of ``model.predict(source, perturbation, time=[t0, t1, ...])``: one row per
        source cell per time, the same cells in the same order at every time.
    time_key
        The model's ``time_key`` (a column of ``predicted.obs``).
    rep
        Representation to read; ``None``: the one ``predicted`` was predicted in.
    observed
        Optional measured snapshots (with ``obs[time_key]``), scattered in the same colours.
    max_cells
        Paths drawn.
    ax
        Matplotlib axes; a new figure when ``None``.

    Returns
    -------
    The axes.
    """
    import matplotlib.pyplot as plt

    if time_key not in predicted.obs:
        raise CellflowKeyError(f"time_key={time_key!r} is not a column of predicted.obs; valid choices: {format_choices(predicted.obs.columns)}.")
    rep = rep or default_representation(predicted)
    times = np.sort(predicted.obs[time_key].unique())
    cells = get_representation(predicted, rep)
    paths = np.stack([cells[(predicted.obs[time_key] == t).to_numpy()] for t in times], axis=1)  # (n, T, d)
    mean = paths.reshape(-1, paths.shape[-1]).mean(axis=0)
    _, _, vt = np.linalg.svd(paths.reshape(-1, paths.shape[-1]) - mean, full_matrices=False)
    z = (paths - mean) @ vt[:2].T
    rng = np.random.default_rng(seed)
    shown = rng.choice(len(z), min(max_cells, len(z)), replace=False)
    ax = _axes(ax)
    colours = plt.get_cmap("viridis")(np.linspace(0, 1, len(times)))
    for path in z[shown]:
        ax.plot(path[:, 0], path[:, 1], color="0.6", lw=0.5, alpha=0.5)
    for i, t in enumerate(times):
        ax.scatter(z[shown, i, 0], z[shown, i, 1], s=5, color=colours[i], label=f"{time_key}={t:g}", rasterized=True)
    if observed is not None:
        measured = get_representation(observed, rep)
        for i, t in enumerate(times):
            at = (observed.obs[time_key] == t).to_numpy()
            if at.any():
                w = (measured[at][: max_cells] - mean) @ vt[:2].T
                ax.scatter(w[:, 0], w[:, 1], s=12, marker="x", color=colours[i], alpha=0.6)
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2")
    ax.legend(markerscale=3, frameon=False, fontsize="small")
    if title:
        ax.set_title(title)
    return ax


def __dir__() -> list[str]:
    # tab completion lists the public names, not this module's imports
    return sorted(__all__)
