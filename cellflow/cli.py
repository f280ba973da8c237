"""Command line: ``cellflow demo | train | predict | evaluate | bench``."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import anndata as ad
    import pandas as pd

__all__ = ["main"]

#: Metrics ``cellflow bench`` reports unless ``--metric`` is given.
BENCH_METRICS = ("energy_distance", "mmd")
#: Methods ``cellflow bench`` compares unless ``--methods`` is given.
BENCH_METHODS = ("identity", "mean_shift", "flow_matching")
#: Model arguments of the built-in synthetic data (``cellflow bench`` without FILE).
SYNTHETIC_ARGS = {"rep": "X", "perturbation_key": "condition", "control": "control", "dose_key": "dose",
                  "covariate_keys": ("patient",)}
#: Model arguments of a data file when the flags are not given.
FILE_ARGS = {"rep": "X_pca", "perturbation_key": "condition", "control": "control", "dose_key": None,
             "covariate_keys": ()}


def _key_values(items: Sequence[str] | None, what: str) -> dict:
    """Parse ``key=value`` pairs; values are JSON when they parse as JSON (Python's ``True``,
    ``False`` and ``None`` are accepted too), else strings."""
    python_literals = {"True": True, "False": False, "None": None}
    parsed = {}
    for item in items or ():
        if "=" not in item:
            from cellflow._errors import CellflowValueError

            raise CellflowValueError(f"{what} {item!r} must look like key=value")
        key, value = item.split("=", 1)
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = python_literals.get(value, value)
    return parsed


def _read_cells(path: str, obs_columns: Sequence[str] | None = None, keys: Iterable[str | None] = ()) -> ad.AnnData:
    """Read a data file with :func:`cellflow.datasets.read`, keeping metadata out of the features.

    A csv/tsv/parquet table's numeric columns become features, so a numeric dose, time or
    donor-id column would land in ``X``. The table is then read again with those columns in
    ``obs``: every column of ``obs_columns`` (``--obs-column``) and every column named by
    ``keys`` (``--dose-key``, ``--covariate-key``, ...) that was read as a feature. An ``.h5ad``
    file is returned as read: its ``obs`` columns are metadata already.

    Parameters
    ----------
    path
        ``.h5ad``, ``.csv``, ``.tsv``, ``.parquet`` or ``.npz`` file.
    obs_columns
        Table columns to keep as metadata even when numeric.
    keys
        Column names the command uses as metadata (``None`` entries are ignored).

    Raises
    ------
    CellflowKeyError
        An ``obs_columns`` entry that is not a column of the table.
    """
    import cellflow as cf

    adata = cf.datasets.read(path)
    if Path(path).suffix.lower() == ".h5ad":
        return adata
    moved = [c for c in obs_columns or () if c not in adata.obs.columns]
    moved += [k for k in keys if k and k in adata.var_names]
    if not moved:
        return adata
    return cf.datasets.read(path, obs_columns=[*adata.obs.columns, *dict.fromkeys(moved)])


def _check_out_file(path: str | None, flag: str = "--out") -> None:
    """Fail before any work when the file ``path`` cannot be written (its folder must exist and be writable)."""
    from cellflow._errors import CellflowValueError

    if path is None:
        return
    out = Path(path)
    folder = out.parent
    if out.is_dir():
        raise CellflowValueError(f"{flag} {path!r} is a directory; give the path of a file.")
    if not folder.is_dir():
        raise CellflowValueError(f"{flag} {path!r}: the folder {str(folder)!r} does not exist; create it first.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CellflowValueError(f"{flag} {path!r}: the folder {str(folder)!r} is not writable.")


def _check_out_dir(path: str, overwrite: bool) -> None:
    """Fail before fitting when the model directory ``path`` exists (without ``--overwrite``) or cannot be
    created (the nearest existing folder above it must be writable; missing folders are created)."""
    from cellflow._errors import CellflowValueError

    from cellflow.model import replaceable_model_path

    out = Path(path).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {path!r} exists; pass --overwrite to replace it.")
    if out.exists() and not replaceable_model_path(out):
        raise FileExistsError(f"--out {path!r} exists and is not a saved cellflow model, so --overwrite does not replace it.")
    folder = next(p for p in out.parents if p.exists())
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise CellflowValueError(f"--out {path!r}: {str(folder)!r} is not a writable folder, so the model cannot be saved there.")


def _check_methods(names: Sequence[str], flag: str = "") -> None:
    """Raise, naming ``flag`` (as the user typed it) and the valid choices, if a name is not a method.

    Here rather than through :func:`cellflow.methods.get_method`, whose message names the
    ``method=`` argument of ``ResponseModel``, which these commands do not have.
    """
    from cellflow.methods import METHODS

    unknown = [name for name in names if name not in METHODS]
    if unknown:
        from cellflow._errors import CellflowKeyError

        raise CellflowKeyError(f"{flag}{unknown[0]!r} is not a method; valid choices: {sorted(METHODS)}.")


def _options(args) -> int:
    from cellflow.methods import options_table

    _check_methods([args.method])
    table = options_table(args.method)
    if table.empty:
        print(f"method {args.method!r} takes no options.")
        return 0
    width = max(len(name) for name in table.index)
    for name, row in table.iterrows():
        print(f"{name:<{width}}  {row['default']!r:<14}  {row['description']}")
    return 0


def _demo(args) -> int:
    from cellflow._demo import run_demo

    methods = None if args.methods is None else tuple(args.methods)
    if methods is not None:
        _check_methods(methods, "--methods ")
    run_demo(args.out, seed=args.seed, steps=args.steps, plot=not args.no_plot, methods=methods)
    return 0


def _train(args) -> int:
    import cellflow as cf

    _check_out_dir(args.out, args.overwrite)
    covariate_keys = tuple(args.covariate_key or ())
    keys = (args.perturbation_key, args.dose_key, args.time_key, args.pair_key, *covariate_keys)
    adata = _read_cells(args.data, args.obs_column, keys)
    embeddings = None if args.perturbation_embeddings is None else cf.datasets.read_embeddings(args.perturbation_embeddings)
    model = cf.ResponseModel(
        adata,
        rep=args.rep,
        perturbation_key=args.perturbation_key,
        control=args.control,
        dose_key=args.dose_key,
        covariate_keys=covariate_keys,
        time_key=args.time_key,
        pair_key=args.pair_key,
        perturbation_embeddings=embeddings,
        method=args.method,
        **_key_values(args.option, "--option"),
    )
    model.fit(steps=args.steps, batch_size=args.batch_size, seed=args.seed, progress=not args.quiet)
    model.save(args.out, overwrite=args.overwrite)
    print(f"saved {model!r} to {args.out}")
    return 0


def _predict(args) -> int:
    import cellflow as cf

    _check_out_file(args.out)
    model = cf.ResponseModel.load(args.model)
    spec = model.spec_
    source = _read_cells(args.source, args.obs_column, (spec.perturbation_key, spec.dose_key, spec.time_key, *spec.covariate_keys))
    if args.source_control:
        source = source[source.obs[model.perturbation_key].astype(str) == model.control]
    doses = args.dose if args.dose else None
    if doses is not None and len(doses) == 1:
        doses = doses[0]
    pred = model.predict(
        source, args.perturbation, dose=doses, covariates=_key_values(args.covariate, "--covariate") or None, seed=args.seed,
        time=args.time
    )
    pred.write_h5ad(args.out)
    print(f"wrote {pred.n_obs} predicted cells to {args.out}")
    return 0


def _predicted_groups_of(truth: ad.AnnData, pred: ad.AnnData, groupby: Sequence[str], only_predicted: bool) -> ad.AnnData:
    """``truth``, or with ``only_predicted`` its cells in groups that ``pred`` holds (the groups
    left out are named on stderr). Without it, a group of ``truth`` that ``pred`` lacks is an
    error that points to ``--only-predicted``."""
    import numpy as np

    from cellflow._errors import CellflowValueError, format_choices
    from cellflow.metrics._distribution import (
        _absent_groups_message, _as_columns, _check_obs_columns, _group_label, _match_groups,
    )

    columns = _as_columns(groupby, "groupby")
    _check_obs_columns(pred, columns, "groupby", "pred")
    _check_obs_columns(truth, columns, "groupby", "truth")
    groups = _match_groups(pred.obs, truth.obs, columns)
    if not groups.absent:
        return truth
    if not only_predicted:
        raise CellflowValueError(
            f"{_absent_groups_message(groups, columns)} Pass --only-predicted to score only the groups PRED holds."
        )
    kept = [k for k in groups.truth if k not in groups.absent]
    if not kept:
        raise CellflowValueError(f"no group of truth (--groupby={columns!r}) has predicted cells in pred.")
    left_out = [_group_label(k) for k in groups.absent]
    print(f"cellflow evaluate: scoring {len(kept)} group(s); left out, not predicted: {format_choices(left_out, limit=10)}",
          file=sys.stderr)
    rows = np.sort(np.concatenate([groups.truth[k] for k in kept]))
    return truth[rows].copy()


def _evaluate(args) -> int:
    import cellflow as cf

    _check_out_file(args.out)
    pred = _read_cells(args.pred, args.obs_column, args.groupby or ("condition",))
    if args.groupby is None:  # the columns of the conditions PRED was predicted for, else 'condition'
        info = pred.uns.get("cellflow")
        recorded = info.get("groupby") if isinstance(info, Mapping) else None
        args.groupby = [str(c) for c in recorded] if recorded is not None and len(recorded) else ["condition"]
    truth = _predicted_groups_of(_read_cells(args.truth, args.obs_column, args.groupby), pred, args.groupby, args.only_predicted)
    control = _read_cells(args.control, args.obs_column, args.groupby) if args.control else None
    table = cf.metrics.evaluate(
        pred, truth, rep=args.rep, groupby=args.groupby, control=control, metrics=tuple(args.metric), max_cells=args.max_cells,
        floors=args.floors,
    )
    if args.out:
        table.to_csv(args.out, index=False)
    print(table.to_string(index=False))
    return 0


# -- bench ------------------------------------------------------------------------------------
def _method_options(methods: Sequence[str], options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``--option`` values per method: each method gets the options it has.

    Raises
    ------
    CellflowKeyError
        An unknown method, or an option that none of ``methods`` has (the message lists theirs).
    """
    from cellflow._errors import CellflowKeyError, format_choices
    from cellflow.methods import get_method

    known = {m: get_method(m).options for m in methods}
    unused = [k for k in options if not any(k in opts for opts in known.values())]
    if unused:
        valid = sorted({k for opts in known.values() for k in opts})
        raise CellflowKeyError(
            f"--option {unused[0]!r} is not an option of any of the methods {list(methods)}; valid choices: "
            f"{format_choices(valid, limit=100)}."
        )
    return {m: {k: v for k, v in options.items() if k in opts} for m, opts in known.items()}


def _bench_model_args(args, synthetic: bool) -> dict[str, Any]:
    """``ResponseModel`` data arguments: the flags given, else the defaults of the data source."""
    defaults = SYNTHETIC_ARGS if synthetic else FILE_ARGS
    given = {
        "rep": args.rep, "perturbation_key": args.perturbation_key, "control": args.control, "dose_key": args.dose_key,
        "covariate_keys": tuple(args.covariate_key) if args.covariate_key else None,
    }
    return {key: defaults[key] if value is None else value for key, value in given.items()}


def _synthetic_split(adata: ad.AnnData, truth: Any) -> Any:
    """The demo's split: a synergistic and an additive pair for every patient, and every treated cell of the last patient."""
    import cellflow as cf
    from cellflow._demo import held_out_tasks

    _, task, _ = held_out_tasks(adata, truth)
    return cf.data.holdout(adata, task != "", covariate_keys=("patient",))


def _bench_split(args, adata: ad.AnnData, model_args: dict[str, Any]) -> tuple[Any, str]:
    """``(split, kind)`` from the one hold-out flag given.

    Raises
    ------
    CellflowValueError
        ``--hold-out-doses`` without a dose column.
    """
    import cellflow as cf

    keys = {"perturbation_key": model_args["perturbation_key"], "control": model_args["control"]}
    covariate_keys = model_args["covariate_keys"]
    if args.hold_out_conditions:
        return cf.data.split_conditions(adata, args.hold_out_conditions, **keys, covariate_keys=covariate_keys), "conditions"
    if args.hold_out_combinations is not None:
        combinations = args.hold_out_combinations or None
        return cf.data.split_combinations(adata, combinations, **keys, covariate_keys=covariate_keys), "combinations"
    if args.hold_out_doses:
        if model_args["dose_key"] is None:
            raise cf.CellflowValueError("--hold-out-doses needs --dose-key, the obs column of the doses.")
        split = cf.data.split_doses(
            adata, args.hold_out_doses, **keys, dose_key=model_args["dose_key"], covariate_keys=covariate_keys
        )
        return split, "doses"
    covariates: dict[str, list] = {}
    for item in args.hold_out_covariate:
        for key, value in _key_values([item], "--hold-out-covariate").items():
            covariates.setdefault(key, []).append(value)
    return cf.data.split_covariates(adata, covariates, **keys), "covariates"


def _bench_data(args) -> tuple[Any, dict[str, Any], str]:
    """``(split, model_args, kind)``: FILE and its hold-out flag, or the synthetic data and the demo's split."""
    import cellflow as cf

    hold_out = (args.hold_out_conditions, args.hold_out_combinations, args.hold_out_doses, args.hold_out_covariate)
    given = any(h is not None for h in hold_out)
    model_args = _bench_model_args(args, synthetic=args.data is None)
    if args.data is None:
        adata, truth = cf.datasets.synthetic()
        if not given:
            return _synthetic_split(adata, truth), model_args, "demo"
    else:
        if not given:
            raise cf.CellflowValueError(
                f"{args.data!r}: say what to hold out with one of --hold-out-conditions, --hold-out-combinations, "
                "--hold-out-doses or --hold-out-covariate."
            )
        keys = (model_args["perturbation_key"], model_args["dose_key"], *model_args["covariate_keys"])
        adata = _read_cells(args.data, args.obs_column, keys)
    split, kind = _bench_split(args, adata, model_args)
    return split, model_args, kind


def _held_out_groups(test: ad.AnnData, model_args: dict[str, Any]) -> list[tuple[dict[str, str], ad.AnnData, ad.AnnData]]:
    """``(group, source, truth)`` for every held-out (condition, dose, covariate values) group of ``test``.

    ``group`` holds the condition, the dose (with a dose column) and the covariate values;
    ``source`` the control cells of ``test`` with the same covariate values (all of them when none match).
    """
    import numpy as np

    import cellflow as cf

    dose_key, covariate_keys = model_args["dose_key"], list(model_args["covariate_keys"])
    conditions = cf.data.parse_obs_conditions(test, model_args["perturbation_key"], model_args["control"], dose_key)
    frame = test.obs[covariate_keys].astype(str).reset_index(drop=True)
    frame.insert(0, "condition", conditions.labels())
    if dose_key is not None:
        frame.insert(1, "dose", np.array([c.dose_label for c in conditions.unique], dtype=object)[conditions.codes])
    is_control = conditions.is_control
    groups = []
    for group in frame[~is_control].drop_duplicates().to_dict(orient="records"):
        same_covariates = (frame[covariate_keys] == [group[k] for k in covariate_keys]).all(axis=1).to_numpy()
        truth = (frame[list(group)] == list(group.values())).all(axis=1).to_numpy()
        source = is_control & same_covariates if (is_control & same_covariates).any() else is_control
        groups.append((group, test[source], test[truth]))
    return groups


def _bench_scores(
    args, train: ad.AnnData, groups: list, model_args: dict[str, Any], options: dict[str, dict], metrics: Sequence[str]
) -> pd.DataFrame:
    """Fit every method with every seed, predict every group and score it: one row per method, seed and group."""
    import pandas as pd

    import cellflow as cf

    embeddings = None if args.perturbation_embeddings is None else cf.datasets.read_embeddings(args.perturbation_embeddings)
    covariate_keys = model_args["covariate_keys"]
    rows = []
    for method in args.methods:
        for seed in args.seeds:
            start = time.perf_counter()
            model = cf.ResponseModel(train, method=method, perturbation_embeddings=embeddings, **model_args, **options[method])
            model.fit(steps=args.steps, seed=seed, progress=False)
            seconds = time.perf_counter() - start
            if not args.quiet:
                print(f"cellflow bench: fitted {method} (seed {seed}) in {seconds:.1f} s", file=sys.stderr)
            for group, source, truth in groups:
                pred = model.predict(
                    source, group["condition"], dose=group.get("dose"), covariates={k: group[k] for k in covariate_keys},
                    seed=seed,
                )
                scores = cf.metrics.evaluate(
                    pred, truth, rep=model.rep, groupby=None, control=source, metrics=tuple(metrics), floors=True
                )
                rows.append({"method": method, "seed": seed, **group, **scores.to_dict(orient="records")[0], "fit_seconds": seconds})
    return pd.DataFrame(rows)


def _bench_summary(table: pd.DataFrame, metrics: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per method: the mean over groups and seeds of each metric, the ratio of energy distances to
    ``mean_shift``'s and the share of the gap from ``mean_shift``'s to the noise floor that the
    method closes (when ``mean_shift`` ran too), and the mean fit time."""
    summary = table.groupby("method", sort=False)[[*metrics, "fit_seconds"]].mean()
    if "energy_distance" in metrics and "mean_shift" in summary.index:
        baseline = summary.loc["mean_shift", "energy_distance"]
        floor = table["energy_distance_floor"].mean()
        summary.insert(len(metrics), "energy_distance/mean_shift", summary["energy_distance"] / baseline)
        summary.insert(len(metrics) + 1, "gap_closed", (baseline - summary["energy_distance"]) / (baseline - floor))
    return {method: {k: round(float(v), 4) for k, v in row.items()} for method, row in summary.iterrows()}


def _bench_floors(table: pd.DataFrame, metrics: Sequence[str]) -> dict[str, float]:
    """The mean over groups of each distance's noise floor: what a perfect prediction would score."""
    return {m: round(float(table[f"{m}_floor"].mean()), 4) for m in metrics if f"{m}_floor" in table}


def _bench(args) -> int:
    _check_out_file(args.out)
    metrics = args.metric or list(BENCH_METRICS)
    _check_methods(args.methods, "--methods ")
    options = _method_options(args.methods, _key_values(args.option, "--option"))  # before any work
    split, model_args, kind = _bench_data(args)
    groups = _held_out_groups(split.test, model_args)
    table = _bench_scores(args, split.train, groups, model_args, options, metrics)
    if args.out:
        table.to_csv(args.out, index=False)
    held_out = sorted({group["condition"] for group, _, _ in groups})
    print(json.dumps({
        "benchmark": "cellflow_bench",
        "data": args.data or "synthetic",
        "split": {"kind": kind, "held_out_conditions": held_out, "n_groups": len(groups),
                  "n_train_cells": split.train.n_obs, "n_test_cells": split.test.n_obs},
        "model": {k: list(v) if isinstance(v, tuple) else v for k, v in model_args.items()},
        "seeds": args.seeds,
        "steps": args.steps,
        "noise_floor": _bench_floors(table, metrics),
        "results": _bench_summary(table, metrics),
    }, indent=1))
    return 0


# -- parser -----------------------------------------------------------------------------------
def _shown(value: Any) -> str:
    """A default as help text shows it."""
    if isinstance(value, tuple):
        return " ".join(value) or "none"
    return "none" if value is None else str(value)


def _add_data_arguments(parser: argparse.ArgumentParser, *, file_defaults: bool) -> None:
    """The flags that describe the data to ``ResponseModel`` (train and bench)."""
    if file_defaults:
        defaults = {k: v for k, v in FILE_ARGS.items() if k != "covariate_keys"}
        shown = {k: f"(default: {_shown(v)})" for k, v in FILE_ARGS.items()}
    else:  # bench: None means "the default of the data source"
        defaults = dict.fromkeys(("rep", "perturbation_key", "control", "dose_key"))
        shown = {k: f"(default: {_shown(FILE_ARGS[k])}; {_shown(SYNTHETIC_ARGS[k])} for the synthetic data)" for k in FILE_ARGS}
    parser.add_argument("--rep", default=defaults["rep"], help=f"'X', a layer or an obsm key {shown['rep']}")
    parser.add_argument("--perturbation-key", default=defaults["perturbation_key"],
                        help=f"obs column of the conditions {shown['perturbation_key']}")
    parser.add_argument("--control", default=defaults["control"], help=f"condition of the control cells {shown['control']}")
    parser.add_argument("--dose-key", default=defaults["dose_key"], help=f"obs column of the doses {shown['dose_key']}")
    parser.add_argument("--covariate-key", action="append",
                        help=f"obs column the response depends on (repeatable) {shown['covariate_keys']}")
    parser.add_argument(
        "--obs-column", action="append", metavar="COL",
        help="csv/tsv/parquet column to keep as metadata although numeric, e.g. a donor id (repeatable); "
        "columns named by the --*-key flags are kept anyway",
    )
    parser.add_argument(
        "--perturbation-embeddings", default=None, metavar="FILE",
        help="table of perturbation vectors (a names column plus numeric columns; csv/tsv/parquet/h5ad/npz); "
        "perturbations listed beyond the data can then be predicted",
    )


def _add_bench_parser(sub) -> None:
    bench = sub.add_parser(
        "bench", help="compare methods on a held-out split; prints one JSON object",
        description="Fit each method with each seed on the training part of a split, predict every held-out "
        "(condition, dose, covariate values) group from its matching control cells and print one JSON object: per "
        "method the mean of each metric over groups and seeds, the ratio of its energy distance to mean_shift's "
        "and the fit time. Without FILE: the built-in synthetic data and the demo's split.",
    )
    bench.add_argument("data", nargs="?", default=None, metavar="FILE", help="h5ad/csv/parquet (default: synthetic data)")
    bench.add_argument("--methods", nargs="+", default=list(BENCH_METHODS), metavar="METHOD",
                       help=f"methods to compare (default: {_shown(BENCH_METHODS)})")
    bench.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="SEED", help="training seeds (default: 0)")
    _add_data_arguments(bench, file_defaults=False)
    hold_out = bench.add_mutually_exclusive_group()
    hold_out.add_argument("--hold-out-conditions", nargs="+", metavar="COND", help="conditions to hold out, e.g. A+B")
    hold_out.add_argument("--hold-out-combinations", nargs="*", metavar="COMB",
                          help="combinations to hold out; none given: a random quarter of those whose members occur alone")
    hold_out.add_argument("--hold-out-doses", nargs="+", type=float, metavar="DOSE", help="doses to hold out (needs --dose-key)")
    hold_out.add_argument("--hold-out-covariate", action="append", metavar="KEY=VALUE",
                          help="hold out the treated cells with this covariate value, e.g. patient=107 (repeatable)")
    bench.add_argument("--steps", type=int, default=None, help="training steps of learned methods (default: their own)")
    bench.add_argument("--option", action="append", help="method option as key=value, given to the methods that have it (repeatable)")
    bench.add_argument("--metric", action="extend", nargs="+", default=None,
                       metavar="METRIC", help=f"metrics of cellflow.metrics.evaluate (default: {_shown(BENCH_METRICS)})")
    bench.add_argument("--out", default=None, help="CSV of the scores per method, seed and held-out group")
    bench.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    bench.set_defaults(func=_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cellflow", description="Predict how cell populations respond to perturbations.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="fit on the built-in synthetic data, predict held-out tasks, compare to baselines")
    demo.add_argument("--out", default="cellflow_demo", help="output directory (default: cellflow_demo)")
    demo.add_argument("--seed", type=int, default=0, help="seed of data, training and prediction (default: %(default)s)")
    demo.add_argument("--no-plot", action="store_true", help="skip the PNG figure")
    demo.add_argument("--steps", type=int, default=None, help="training steps of the learned method (default: its own)")
    demo.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                      help="methods to compare (default: identity, mean_shift, gaussian_ot and flow_matching)")
    demo.set_defaults(func=_demo)

    options = sub.add_parser("options", help="list a method's options with their defaults and meaning")
    options.add_argument("method", nargs="?", default="flow_matching", help="method name (default: %(default)s)")
    options.set_defaults(func=_options)

    train = sub.add_parser("train", help="fit a ResponseModel on an h5ad/csv/parquet file and save it")
    train.add_argument("data", help="h5ad/csv/parquet of the training cells, controls and treated")
    train.add_argument("--out", required=True, help="model directory (missing folders are created)")
    train.add_argument(
        "--method", default="flow_matching",
        help="flow_matching, schrodinger_bridge, neural_ot, diffusion, gaussian_ot, mean_shift or identity (default: %(default)s)",
    )
    _add_data_arguments(train, file_defaults=True)
    train.add_argument("--time-key", default=None, help="obs column of measurement times, numbers (time courses)")
    train.add_argument("--pair-key", default=None, help="obs column naming each treated cell's control partner")
    train.add_argument("--option", action="append", help="method option as key=value (repeatable)")
    train.add_argument("--steps", type=int, default=None, help="training steps of learned methods (default: the method's own)")
    train.add_argument("--batch-size", type=int, default=None, help="cells per condition and step (default: the method's own)")
    train.add_argument("--seed", type=int, default=0, help="seed of initialisation and training (default: %(default)s)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_train)

    predict = sub.add_parser("predict", help="predict treated cells from a saved model and source cells")
    predict.add_argument("model", help="folder of a model written by 'cellflow train' (or ResponseModel.save)")
    predict.add_argument("source", help="h5ad/csv/parquet of source (control) cells")
    predict.add_argument("--perturbation", action="append", required=True, help="repeat for several conditions")
    predict.add_argument("--dose", action="append", help="one per --perturbation, or one for all")
    predict.add_argument("--covariate", action="append", help="key=value applied to every source cell")
    predict.add_argument("--source-control", action="store_true", help="use only the control cells of SOURCE")
    predict.add_argument("--obs-column", action="append", metavar="COL", help="csv/tsv/parquet column to keep as metadata although numeric")
    predict.add_argument("--seed", type=int, default=0, help="seed of stochastic predictions (default: %(default)s)")
    predict.add_argument("--time", type=float, nargs="+", default=None, help="time(s) to predict (models fitted with --time-key)")
    predict.add_argument("--out", required=True, help="output .h5ad (its folder must exist)")
    predict.set_defaults(func=_predict)

    evaluate = sub.add_parser("evaluate", help="compare predicted and observed cells per group")
    evaluate.add_argument("pred", help="h5ad/csv/parquet of predicted cells, e.g. written by 'cellflow predict'")
    evaluate.add_argument("truth", help="h5ad/csv/parquet of the observed cells to compare them with")
    evaluate.add_argument("--rep", default=None, help="'X', a layer or an obsm key (default: the one PRED was predicted in, else X)")
    evaluate.add_argument("--groupby", action="append", metavar="COL",
                          help="obs column to group cells by (repeatable; default: the perturbation (and dose) columns "
                          "recorded by 'cellflow predict' in PRED, else condition)")
    evaluate.add_argument("--control", default=None, help="file of control cells, for delta metrics")
    evaluate.add_argument("--only-predicted", action="store_true",
                          help="score only the groups of TRUTH that PRED holds (e.g. TRUTH is the whole data set, controls "
                          "included); without it a group of TRUTH without predictions is an error")
    evaluate.add_argument("--obs-column", action="append", metavar="COL", help="csv/tsv/parquet column to keep as metadata although numeric")
    evaluate.add_argument("--metric", action="extend", nargs="+", default=None, metavar="METRIC",
                          help="metrics of cellflow.metrics.evaluate (default: energy_distance mmd sinkhorn_divergence r2_mean)")
    evaluate.add_argument("--max-cells", type=int, default=None,
                          help="cells per side and group for the distribution metrics (default: all)")
    evaluate.add_argument("--floors", action="store_true",
                          help="add each distance's noise floor: what a perfect prediction would score (energy distance, MMD)")
    evaluate.add_argument("--out", default=None, help="CSV output")
    evaluate.set_defaults(func=_evaluate)

    _add_bench_parser(sub)
    return parser


def _flag_names(parser: argparse.ArgumentParser, command: str) -> dict[str, str]:
    """``{dest: "--flag"}`` of ``command``'s options whose flag differs from the Python name."""
    for action in parser._subparsers._group_actions:  # argparse keeps the sub-commands here only
        sub = action.choices.get(command)
        if sub is not None:
            return {
                a.dest: a.option_strings[-1]
                for a in sub._actions
                if a.option_strings and a.option_strings[-1].startswith("--") and a.dest != "help"
            }
    return {}


def _in_flags(message: str, parser: argparse.ArgumentParser, command: str) -> str:
    """An error of the library, with its argument names (``dose_key=``) written as flags (``--dose-key=``).

    Names are this command's flags; a model option the message asks to pass "to ResponseModel"
    is a flag of ``cellflow train``, so that command is named instead.
    """
    flags = {**_flag_names(parser, "train"), **_flag_names(parser, command)}
    message = message.replace("to ResponseModel", "to `cellflow train`")
    for dest in sorted(flags, key=len, reverse=True):
        message = re.sub(rf"(?<![\w.-]){re.escape(dest)}=", f"{flags[dest]}=", message)
    return message


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "evaluate" and args.metric is None:
        args.metric = ["energy_distance", "mmd", "sinkhorn_divergence", "r2_mean"]
    from cellflow._errors import CellflowKeyError, CellflowValueError

    def show_warning(message, category, filename, lineno, file=None, line=None):
        # the library's own source line means nothing to someone at a shell prompt
        print(f"cellflow {args.command}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        try:
            return args.func(args)
        except (CellflowKeyError, CellflowValueError, FileNotFoundError, FileExistsError) as err:
            print(f"cellflow {args.command}: error: {_in_flags(str(err), parser, args.command)}", file=sys.stderr)
            return 2
        except BrokenPipeError:
            # the reader went away (`cellflow options | head`): say nothing more, as a shell tool does
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1


if __name__ == "__main__":
    sys.exit(main())
