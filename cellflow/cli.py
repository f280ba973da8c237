"""Command line: ``cellflow demo | train | predict | evaluate``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _key_values(items: Sequence[str] | None, what: str) -> dict:
    """Parse ``key=value`` pairs; values are JSON when they parse as JSON (Python's ``True``,
    ``False`` and ``None`` are accepted too), else strings."""
    python_literals = {"True": True, "False": False, "None": None}
    parsed = {}
    for item in items or ():
        if "=" not in item:
            raise SystemExit(f"cellflow: {what} {item!r} must look like key=value")
        key, value = item.split("=", 1)
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = python_literals.get(value, value)
    return parsed


def _demo(args) -> int:
    from cellflow._demo import run_demo

    run_demo(args.out, seed=args.seed, steps=args.steps, plot=not args.no_plot)
    return 0


def _train(args) -> int:
    import cellflow as cf

    adata = cf.datasets.read(args.data)
    embeddings = None if args.perturbation_embeddings is None else cf.datasets.read_embeddings(args.perturbation_embeddings)
    model = cf.ResponseModel(
        adata,
        rep=args.rep,
        perturbation_key=args.perturbation_key,
        control=args.control,
        dose_key=args.dose_key,
        covariate_keys=tuple(args.covariate_key or ()),
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

    model = cf.ResponseModel.load(args.model)
    source = cf.datasets.read(args.source)
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


def _evaluate(args) -> int:
    import cellflow as cf

    pred, truth = cf.datasets.read(args.pred), cf.datasets.read(args.truth)
    control = cf.datasets.read(args.control) if args.control else None
    table = cf.metrics.evaluate(
        pred, truth, rep=args.rep, groupby=args.groupby, control=control, metrics=tuple(args.metric), max_cells=args.max_cells
    )
    if args.out:
        table.to_csv(args.out, index=False)
    print(table.to_string(index=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cellflow", description="Predict how cell populations respond to perturbations.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="fit on the built-in synthetic data, predict held-out tasks, compare to baselines")
    demo.add_argument("--out", default="cellflow_demo", help="output directory (default: cellflow_demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-plot", action="store_true", help="skip the PNG figure")
    demo.add_argument("--steps", type=int, default=None, help="training steps of the learned method (default: its own)")
    demo.set_defaults(func=_demo)

    train = sub.add_parser("train", help="fit a ResponseModel on an h5ad/csv/parquet file and save it")
    train.add_argument("data")
    train.add_argument("--out", required=True, help="model directory")
    train.add_argument("--method", default="mean_shift")
    train.add_argument("--rep", default="X_pca")
    train.add_argument("--perturbation-key", default="condition")
    train.add_argument("--control", default="control")
    train.add_argument("--dose-key", default=None)
    train.add_argument("--covariate-key", action="append", help="repeat for several covariates")
    train.add_argument("--time-key", default=None, help="numeric obs column of measurement times (time courses)")
    train.add_argument("--pair-key", default=None, help="obs column naming each treated cell's control partner")
    train.add_argument(
        "--perturbation-embeddings", default=None, metavar="FILE",
        help="table of perturbation vectors (a names column plus numeric columns; csv/tsv/parquet/h5ad/npz); "
        "perturbations listed beyond the data can then be predicted",
    )
    train.add_argument("--option", action="append", help="method option as key=value (repeatable)")
    train.add_argument("--steps", type=int, default=None)
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--overwrite", action="store_true")
    train.add_argument("--quiet", action="store_true")
    train.set_defaults(func=_train)

    predict = sub.add_parser("predict", help="predict treated cells from a saved model and source cells")
    predict.add_argument("model")
    predict.add_argument("source", help="h5ad/csv/parquet of source (control) cells")
    predict.add_argument("--perturbation", action="append", required=True, help="repeat for several conditions")
    predict.add_argument("--dose", action="append", help="one per --perturbation, or one for all")
    predict.add_argument("--covariate", action="append", help="key=value applied to every source cell")
    predict.add_argument("--source-control", action="store_true", help="use only the control cells of SOURCE")
    predict.add_argument("--seed", type=int, default=0)
    predict.add_argument("--time", type=float, nargs="+", default=None, help="time(s) to predict (models fitted with --time-key)")
    predict.add_argument("--out", required=True, help="output .h5ad")
    predict.set_defaults(func=_predict)

    evaluate = sub.add_parser("evaluate", help="compare predicted and observed cells per group")
    evaluate.add_argument("pred")
    evaluate.add_argument("truth")
    evaluate.add_argument("--rep", default="X")
    evaluate.add_argument("--groupby", default="condition")
    evaluate.add_argument("--control", default=None, help="file of control cells, for delta metrics")
    evaluate.add_argument("--metric", action="append", default=None)
    evaluate.add_argument("--max-cells", type=int, default=None)
    evaluate.add_argument("--out", default=None, help="CSV output")
    evaluate.set_defaults(func=_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "metric", "unset") is None:
        args.metric = ["energy_distance", "mmd", "sinkhorn_divergence", "r2_mean"]
    from cellflow._errors import CellflowKeyError, CellflowValueError

    try:
        return args.func(args)
    except (CellflowKeyError, CellflowValueError, FileNotFoundError, FileExistsError) as err:
        print(f"cellflow {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
