r"""Train and time theislab's CellFlow (PyPI ``cellflow-tools``) for the side-by-side speed benchmark.

``cellflow-tools`` imports as ``cellflow``, like this library, so this script never runs in
this repository's environment: it is executed with the python of a separate virtual environment
that holds ``cellflow-tools`` and ``requests`` (an import-time dependency it does not declare)::

    python3.11 -m venv /tmp/cft_venv && /tmp/cft_venv/bin/pip install cellflow-tools requests
    /tmp/cft_venv/bin/python benchmarks/_cellflow_tools_driver.py \
        --data train.h5ad --predict source.h5ad --conditions A+B B+C \
        --width 64 --depth 2 --token-dim 32 \
        --batch-size 128 --steps 50 --warmup-steps 10 --cells 200 --out out.json

(``--defaults`` instead of ``--width/--depth/--token-dim`` keeps every network default of
``CellFlow.prepare_model``.) It only calls the public API of ``cellflow-tools``:

- Each drug of a combination ``"A+B"`` becomes its own perturbation covariate (obs columns
  ``drug_1 .. drug_K``, padded with the entry ``"control"`` whose representation is the
  ``null_value`` vector), with one-hot representations in ``uns``, so that unseen pairs of seen
  drugs can be predicted. ``patient`` is a sample covariate (one-hot in ``uns``) and a split
  covariate, so that each patient's treated cells are learnt from that patient's control cells.
  Doses are ignored.
- Training runs ``--warmup-steps`` iterations (compilation), then times ``--steps`` further
  iterations of ``CellFlow.train``.
- Prediction pushes the first ``--cells`` control cells of ``--predict`` through every
  condition with the default ODE settings of ``CellFlow.predict``, timing the whole call.

- ``--more-steps`` continues training to further cumulative step counts and predicts at each,
  which gives points of the training curve (``points`` in the JSON: cumulative timed training
  seconds and prediction seconds per point).

Writes a JSON file (``--out``) and the predictions to ``<out stem>_predictions.npz``
(``predictions_<condition>`` arrays of shape ``(cells, features)``, rows in source order;
``step<S>_predictions_<condition>`` for the points of ``--more-steps``).
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import metadata
from pathlib import Path

import anndata as ad
import jax
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellflow.model import CellFlow  # cellflow-tools' package, not this repository's

CONTROL = "control"
CONTROL_KEY = "is_control"
DRUG_REP = "drug_onehot"
PATIENT_REP = "patient_onehot"
NULL_VALUE = 0.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line.

    Parameters
    ----------
    argv
        Arguments; :obj:`None` reads :data:`sys.argv`.

    Returns
    -------
    The parsed arguments; ``--defaults`` and ``--width/--depth/--token-dim`` exclude each other.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data", type=Path, required=True, help="training .h5ad")
    parser.add_argument("--predict", type=Path, required=True, help=".h5ad of control cells to predict from")
    parser.add_argument("--conditions", nargs="+", required=True, help="conditions to predict, e.g. A+B")
    parser.add_argument("--cells", type=int, required=True, help="source cells per predicted condition")
    parser.add_argument("--width", type=int)
    parser.add_argument("--depth", type=int)
    parser.add_argument("--token-dim", type=int)
    parser.add_argument("--defaults", action="store_true", help="every network default of prepare_model")
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--warmup-steps", type=int, required=True)
    parser.add_argument(
        "--more-steps", type=int, nargs="*", default=[],
        help="after --steps, keep training to these cumulative numbers of timed steps, predicting at each",
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    if any(b <= a for a, b in zip([args.steps, *args.more_steps], args.more_steps)):
        parser.error("--more-steps must increase, starting above --steps")
    sized = [args.width, args.depth, args.token_dim]
    if args.defaults and any(v is not None for v in sized):
        parser.error("--defaults excludes --width, --depth and --token-dim")
    if not args.defaults and any(v is None for v in sized):
        parser.error("give --width, --depth and --token-dim, or --defaults")
    return args


def members(condition: str) -> list[str]:
    """Split a condition such as ``"B+A"`` into its sorted drugs (``[]`` for the control).

    Parameters
    ----------
    condition
        Condition string; combinations are joined by ``"+"``.

    Returns
    -------
    The drugs of the condition.
    """
    if condition == CONTROL:
        return []
    return sorted(m.strip() for m in condition.split("+"))


def one_hot(names: list[str]) -> dict[str, np.ndarray]:
    """One-hot representation of each name.

    Parameters
    ----------
    names
        Distinct names, in the order of their unit vectors.

    Returns
    -------
    Mapping from name to a float32 unit vector of length ``len(names)``.
    """
    eye = np.eye(len(names), dtype=np.float32)
    return {name: eye[i] for i, name in enumerate(names)}


def dense_x(adata: ad.AnnData) -> np.ndarray:
    """Return ``adata.X`` as a dense float32 array.

    Parameters
    ----------
    adata
        Annotated data.

    Returns
    -------
    The cell features.
    """
    x = adata.X.toarray() if sp.issparse(adata.X) else adata.X
    return np.asarray(x, dtype=np.float32)


def drug_columns(n_slots: int) -> list[str]:
    """Names of the obs columns holding the drugs of a combination.

    Parameters
    ----------
    n_slots
        Largest number of drugs in a condition.

    Returns
    -------
    ``["drug_1", ..., "drug_<n_slots>"]``.
    """
    return [f"drug_{i + 1}" for i in range(n_slots)]


def covariate_frame(conditions: pd.Series, patients: pd.Series, n_slots: int) -> pd.DataFrame:
    """Covariate columns in the layout that ``CellFlow.prepare_data`` expects.

    Parameters
    ----------
    conditions
        Condition of each row (``"control"``, ``"A"``, ``"A+B"``, ...).
    patients
        Patient of each row.
    n_slots
        Number of drug columns; shorter combinations are padded with ``"control"``.

    Returns
    -------
    Frame with the boolean control column, the drug columns and ``patient``.
    """
    drugs = [members(c) for c in conditions.astype(str)]
    padded = [d + [CONTROL] * (n_slots - len(d)) for d in drugs]
    frame = pd.DataFrame(padded, columns=drug_columns(n_slots), index=conditions.index)
    frame.insert(0, CONTROL_KEY, conditions.astype(str).eq(CONTROL).to_numpy())
    frame["patient"] = patients.astype(str).to_numpy()
    return frame


def training_adata(data: ad.AnnData, n_slots: int, reps: dict[str, dict[str, np.ndarray]]) -> tuple[ad.AnnData, int]:
    """Training AnnData in CellFlow's layout.

    Patients without both control and treated cells are left out: with ``patient`` as split
    covariate CellFlow refuses control populations that have no treated counterpart, and treated
    cells without control cells of their patient have no source to be learnt from.

    Parameters
    ----------
    data
        Training cells with obs ``condition`` and ``patient``.
    n_slots
        Number of drug columns.
    reps
        Representations to store in ``uns``.

    Returns
    -------
    The AnnData and the number of cells left out.
    """
    is_control = data.obs["condition"].astype(str).eq(CONTROL)
    patient = data.obs["patient"].astype(str)
    usable = set(patient[is_control]) & set(patient[~is_control])
    keep = patient.isin(usable).to_numpy()
    kept = data[keep]
    adata = ad.AnnData(
        X=dense_x(kept),
        obs=covariate_frame(kept.obs["condition"], kept.obs["patient"], n_slots),
        uns=dict(reps),
    )
    return adata, int((~keep).sum())


def network_kwargs(args: argparse.Namespace) -> dict:
    """Network arguments of ``CellFlow.prepare_model``.

    Parameters
    ----------
    args
        Parsed command line.

    Returns
    -------
    ``{}`` for ``--defaults``; otherwise layers sized by ``--width``, ``--depth`` and
    ``--token-dim`` (one MLP layer of width ``token_dim`` before and after pooling).
    """
    if args.defaults:
        return {}
    width, depth, token = args.width, args.depth, args.token_dim
    return {
        "hidden_dims": (width,) * depth,
        "decoder_dims": (width,) * depth,
        "time_encoder_dims": (width,),
        "condition_embedding_dim": token,
        "layers_before_pool": ({"layer_type": "mlp", "dims": (token,)},),
        "layers_after_pool": ({"layer_type": "mlp", "dims": (token,)},),
    }


def train_timed(model: CellFlow, batch_size: int, steps: int, warmup_steps: int) -> dict:
    """Run the warm-up iterations, then time ``steps`` further iterations.

    ``CellFlow.train`` reads every step's loss on the host; the parameters are also awaited
    before the clock stops. Each call of ``CellFlow.train`` restarts its batch and key
    sequences, so the timed steps begin with the warm-up's batches (irrelevant to speed).

    Parameters
    ----------
    model
        Prepared model.
    batch_size
        Cells per source and target batch.
    steps
        Timed iterations.
    warmup_steps
        Untimed iterations run first (compilation).

    Returns
    -------
    ``warmup_seconds`` (compilation and the warm-up iterations), ``train_seconds``,
    ``steps_per_second`` and ``final_loss``.
    """

    def run(n: int) -> None:
        # The in-loop validation hook fires when it > 1 and (it - 1) % valid_freq == 0: never for valid_freq=n.
        model.train(num_iterations=n, batch_size=batch_size, valid_freq=max(n, 1))
        jax.block_until_ready(model.solver.vf_state.params)

    start = time.perf_counter()
    if warmup_steps:
        run(warmup_steps)
    warmup_seconds = time.perf_counter() - start
    start = time.perf_counter()
    run(steps)
    seconds = time.perf_counter() - start
    losses = model.trainer.training_logs["loss"]
    return {
        "warmup_seconds": warmup_seconds,
        "train_seconds": seconds,
        "steps_per_second": steps / seconds,
        "final_loss": float(losses[-1]) if losses else None,
    }


def predict_timed(
    model: CellFlow,
    source: ad.AnnData,
    conditions: list[str],
    n_slots: int,
    reps: dict[str, dict[str, np.ndarray]],
) -> tuple[dict[str, np.ndarray], float]:
    """Predict every condition from the source cells with CellFlow's default ODE settings.

    One predicted cell per source cell: each (condition, patient) pair is a row of the
    covariate data, and CellFlow pushes that patient's source cells through it.

    Parameters
    ----------
    model
        Trained model.
    source
        Control cells with obs ``patient``.
    conditions
        Conditions to predict.
    n_slots
        Number of drug columns.
    reps
        Representations, stored in the ``uns`` of the source AnnData that CellFlow reads.

    Returns
    -------
    Predictions per condition, shape ``(n_obs, n_features)`` in source order, and the seconds
    the prediction call took.
    """
    patient = source.obs["patient"].astype(str).to_numpy()
    src = ad.AnnData(
        X=dense_x(source),
        obs=pd.DataFrame({CONTROL_KEY: True, "patient": patient}, index=source.obs_names),
        uns=dict(reps),
    )
    pairs = [(c, p) for c in conditions for p in sorted(set(patient))]
    ids = [f"{c}|{p}" for c, p in pairs]
    rows = pd.DataFrame({"condition": [c for c, _ in pairs], "patient": [p for _, p in pairs]})
    covariates = covariate_frame(rows["condition"], rows["patient"], n_slots)
    covariates[CONTROL_KEY] = False
    covariates["condition_id"] = ids

    start = time.perf_counter()
    out = model.predict(src, covariate_data=covariates, condition_id_key="condition_id")  # host numpy arrays
    seconds = time.perf_counter() - start

    predictions = {c: np.empty(src.shape, dtype=np.float32) for c in conditions}
    for (condition, p), key in zip(pairs, ids, strict=True):
        predictions[condition][patient == p] = np.asarray(out[key])
    return predictions, seconds


def versions() -> dict:
    """Versions of the packages the timings depend on, and the device.

    Returns
    -------
    Package versions, JAX backend and device.
    """
    packages = ("cellflow-tools", "jax", "jaxlib", "flax", "optax", "diffrax", "ott-jax", "anndata", "numpy")
    found = {name.replace("-", "_") + "_version": metadata.version(name) for name in packages}
    return found | {"backend": jax.default_backend(), "device": str(jax.devices()[0])}


def main(argv: list[str] | None = None) -> None:
    """Build, train, time and predict; write the JSON and the predictions.

    Parameters
    ----------
    argv
        Command-line arguments; :obj:`None` reads :data:`sys.argv`.
    """
    args = parse_args(argv)
    data = ad.read_h5ad(args.data)
    source = ad.read_h5ad(args.predict)
    if source.n_obs < args.cells:
        raise SystemExit(f"--cells {args.cells} exceeds the {source.n_obs} cells of {args.predict}")
    source = source[: args.cells]
    conditions = list(args.conditions)

    all_conditions = list(data.obs["condition"].astype(str).unique()) + conditions
    drugs = sorted({d for c in all_conditions for d in members(c)})
    n_slots = max(len(members(c)) for c in all_conditions)
    patients = sorted(set(data.obs["patient"].astype(str)) | set(source.obs["patient"].astype(str)))
    reps = {
        DRUG_REP: one_hot(drugs) | {CONTROL: np.full(len(drugs), NULL_VALUE, dtype=np.float32)},
        PATIENT_REP: one_hot(patients),
    }
    train, n_left_out = training_adata(data, n_slots, reps)
    kwargs = network_kwargs(args)

    start = time.perf_counter()
    model = CellFlow(train, solver="otfm")
    model.prepare_data(
        sample_rep="X",
        control_key=CONTROL_KEY,
        perturbation_covariates={"drugs": drug_columns(n_slots)},
        perturbation_covariate_reps={"drugs": DRUG_REP},
        sample_covariates=["patient"],
        sample_covariate_reps={"patient": PATIENT_REP},
        split_covariates=["patient"],
        max_combination_length=n_slots,
        null_value=NULL_VALUE,
    )
    model.prepare_model(**kwargs)
    jax.block_until_ready(model.solver.vf_state.params)
    setup_seconds = time.perf_counter() - start
    n_parameters = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(model.solver.vf_state.params))

    timing = train_timed(model, args.batch_size, args.steps, args.warmup_steps)
    predictions, predict_seconds = predict_timed(model, source, conditions, n_slots, reps)
    arrays = {f"predictions_{c}": p for c, p in predictions.items()}

    # Further points of the training curve: continue training (CellFlow.train keeps the
    # parameters and optimiser state between calls) and predict again. Their wall time is the
    # setup plus the cumulative timed training, prediction excluded.
    points = [{"steps": args.steps, "train_seconds": timing["train_seconds"], "predict_seconds": predict_seconds}]
    for total in args.more_steps:
        more = train_timed(model, args.batch_size, total - points[-1]["steps"], 0)
        point_predictions, point_seconds = predict_timed(model, source, conditions, n_slots, reps)
        points.append({"steps": total, "train_seconds": points[-1]["train_seconds"] + more["train_seconds"],
                       "predict_seconds": point_seconds})
        arrays |= {f"step{total}_predictions_{c}": p for c, p in point_predictions.items()}

    args.out.parent.mkdir(parents=True, exist_ok=True)
    npz = args.out.with_name(f"{args.out.stem}_predictions.npz")
    np.savez(npz, **arrays)
    record = {
        "method": "cellflow-tools CellFlow (otfm)",
        "network": "prepare_model defaults" if args.defaults else kwargs,
        "optimizer": "prepare_model default: optax.MultiSteps(optax.adam(5e-5), 20)",
        "ode_solver": "CellFlow.predict default: diffrax.Tsit5, PIDController(rtol=1e-5, atol=1e-5)",
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "n_features": int(train.n_vars),
        "n_training_cells": int(train.n_obs),
        "n_training_cells_left_out": n_left_out,
        "n_training_conditions": int(model.train_data.n_perturbations),
        "max_combination_length": n_slots,
        "n_parameters": n_parameters,
        "setup_seconds": setup_seconds,
        **timing,
        "conditions": conditions,
        "cells_per_condition": int(source.n_obs),
        "predict_seconds": predict_seconds,
        "points": points,
        "predictions": str(npz),
        **versions(),
    }
    args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
