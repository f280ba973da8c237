"""``ResponseModel``: the AnnData-facing facade (fit / predict / save / load)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import jax
import numpy as np
import pandas as pd

from cellflow import __version__
from cellflow._errors import CellflowKeyError, CellflowValueError, format_choices, user_stacklevel
from cellflow.data import (
    DataSpec,
    EmbeddingTable,
    check_finite,
    embedding_axes,
    format_dose,
    get_representation,
    make_embedding_table,
    parse_condition,
    prepare,
)
from cellflow.methods import METHODS, get_method

__all__ = ["ResponseModel"]

_FORMAT_VERSION = 1
_CONFIG_FILE = "cellflow.json"
_STATE_FILE = "state.npz"
_EMBEDDINGS_FILE = "embeddings.npy"


def replaceable_model_path(path: str | os.PathLike) -> bool:
    """Whether ``save(path, overwrite=True)`` may replace what is at ``path``: a saved model or an empty directory."""
    path = Path(path)
    return path.is_dir() and ((path / _CONFIG_FILE).exists() or not any(path.iterdir()))


def _checked_seed(seed: Any) -> int:
    """``seed`` as an int, or an error naming it: a non-negative integer, numpy integers included."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise CellflowValueError(f"seed must be a non-negative integer, got {seed!r}.")
    return int(seed)


def _is_missing(value: Any) -> bool:
    """``None``, NaN or ``pd.NA`` (what :func:`pandas.isna` calls missing): an unknown covariate value, not the string ``'None'``."""
    return pd.api.types.is_scalar(value) and bool(pd.isna(value))


def _as_seen_numbers(values: list[str | None], seen: Sequence[str]) -> list[str | None]:
    """``values`` with each one absent from ``seen`` replaced by the seen value of the same number, if any."""
    numbers = {}
    for value in seen:
        try:
            numbers.setdefault(float(value), value)
        except ValueError:
            continue
    if not numbers:
        return values
    known = set(seen)

    def matched(value: str | None) -> str | None:
        if value is None or value in known:
            return value
        try:
            return numbers.get(float(value), value)
        except ValueError:
            return value

    return [matched(value) for value in values]


def _umask() -> int:
    """The process's file-creation mask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class ResponseModel:
    """Learn how perturbations move a population of control cells, and predict unseen conditions.

    Parameters
    ----------
    adata
        Control and perturbed cells. Never modified.
    rep
        Where cells live: ``"X"``, a layer name or an ``obsm`` key.
    perturbation_key
        ``obs`` column of perturbation labels; a combination is ``"A+B"``.
    control
        The value of ``perturbation_key`` for unperturbed cells.
    dose_key
        Optional ``obs`` column of doses: a number, or ``"1.0+0.5"`` aligned with the members.
    covariate_keys
        ``obs`` columns the response depends on (cell line, cell type, patient). Each treated
        group is paired with the control cells that share its covariate values, or with all
        controls where there are none.
    perturbation_embeddings
        Optional ``{name: vector}`` or DataFrame indexed by name; default one-hot. Names beyond
        the training data make unseen perturbations predictable by methods that use embeddings.
    method
        One of the registered methods (see ``cellflow.methods.METHODS``): ``"identity"``,
        ``"mean_shift"``, ``"gaussian_ot"``, ``"flow_matching"``, ``"neural_ot"``,
        ``"schrodinger_bridge"``, ``"diffusion"``.
    time_key
        Optional ``obs`` column of measurement times (hours, days): numbers, or text spelling
        them. The controls are the start of the process (at the earliest control time) and the
        treated cells of a condition form one snapshot per time; the method fits one process
        through all snapshots, and :meth:`predict` takes ``time=`` (any time from the controls'
        to the last snapshot's, measured or not; a list gives trajectories). Supported by
        methods that model time (``"schrodinger_bridge"``).
    pair_key
        Optional ``obs`` column naming, for every treated cell, the ``obs_name`` of the control
        cell it is known to descend from (lineage barcodes, repeated imaging of the same cell).
        Methods that learn from aligned pairs (``"schrodinger_bridge"``, then an SBAlign-style
        bridge through the known pairs) use it instead of an OT coupling.
    **options
        Method hyper-parameters, validated against the method's documented options:
        ``cf.methods.options_table(method)`` lists them with their defaults and meaning
        (``cellflow options METHOD`` at a shell).

    Examples
    --------
    >>> model = cf.ResponseModel(adata, rep="X_pca", perturbation_key="condition",
    ...                          control="control", covariate_keys=("patient",), method="mean_shift")
    >>> pred = model.fit().predict(adata[adata.obs.condition == "control"], perturbation="A+B")
    """

    def __init__(
        self,
        adata: ad.AnnData,
        rep: str = "X_pca",
        perturbation_key: str = "condition",
        control: str = "control",
        dose_key: str | None = None,
        covariate_keys: Sequence[str] = (),
        perturbation_embeddings: Mapping[str, Sequence[float]] | pd.DataFrame | None = None,
        method: str = "flow_matching",
        time_key: str | None = None,
        pair_key: str | None = None,
        **options: Any,
    ) -> None:
        self.method = method
        self._method = get_method(method)
        if time_key is not None and not self._method.supports_time:
            timed = [name for name, m in METHODS.items() if m.supports_time]
            raise CellflowValueError(
                f"method={method!r} does not model time, so time_key={time_key!r} cannot be used; methods that do: "
                f"{format_choices(timed)}."
            )
        if pair_key is not None and not self._method.supports_pairs:
            paired = [name for name, m in METHODS.items() if m.supports_pairs]
            raise CellflowValueError(
                f"method={method!r} does not learn from known pairs, so pair_key={pair_key!r} cannot be used; methods "
                f"that do: {format_choices(paired)}."
            )
        self.options = self._method.validate_options(options)
        self._data = prepare(
            adata,
            rep=rep,
            perturbation_key=perturbation_key,
            control=control,
            dose_key=dose_key,
            covariate_keys=covariate_keys,
            time_key=time_key,
            pair_key=pair_key,
        )
        self.spec_: DataSpec = self._data.spec
        self.embeddings_: EmbeddingTable = make_embedding_table(self.spec_.vocabulary, perturbation_embeddings)
        self.state_: Any = None
        self.history_: pd.DataFrame = pd.DataFrame()

    # -- properties ---------------------------------------------------------------------------
    @property
    def rep(self) -> str:
        return self.spec_.rep

    @property
    def perturbation_key(self) -> str:
        return self.spec_.perturbation_key

    @property
    def control(self) -> str:
        return self.spec_.control

    @property
    def is_fitted(self) -> bool:
        return self.state_ is not None

    def __repr__(self) -> str:
        spec = self.spec_
        status = "fitted" if self.is_fitted else "not fitted"
        return (
            f"ResponseModel(method={self.method!r}, rep={spec.rep!r}, n_features={spec.n_features}, "
            f"groups={len(spec.groups)}, perturbations={len(spec.vocabulary)}, "
            f"covariate_keys={list(spec.covariate_keys)}"
            f"{'' if spec.time_key is None else f', time_key={spec.time_key!r}'}, {status})"
        )

    # -- fit ----------------------------------------------------------------------------------
    def fit(
        self,
        steps: int | None = None,
        batch_size: int | None = None,
        seed: int = 0,
        progress: bool = True,
        resume: bool = False,
    ) -> ResponseModel:
        """Fit the method on the training data and return ``self``.

        Parameters
        ----------
        steps
            Training steps (learned methods; ``None`` for the method's default). The closed-form
            baselines ignore it.
        batch_size
            Cells per batch (learned methods).
        seed
            Seed of all randomness in training.
        progress
            Show a progress bar.
        resume
            Continue from the latest training checkpoint in the ``checkpoint_dir`` option
            (learned methods); the result equals an uninterrupted run. A checkpoint of another
            run (other options, steps, batch size, seed or data) is refused with an error; with
            no checkpoint yet, training starts from scratch.
        """
        if self._data is None:
            raise CellflowValueError(
                "this model was loaded from disk without its training data; build a new ResponseModel to refit."
            )
        for name, value in (("steps", steps), ("batch_size", batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0):
                raise CellflowValueError(f"{name}={value!r} must be a positive integer or None.")
        largest = int(max(self.spec_.groups["n_cells"].max(), self.spec_.pools["n_cells"].max()))
        if batch_size is not None and batch_size > largest:
            raise CellflowValueError(
                f"batch_size={batch_size} is more cells than any group holds (the largest holds {largest}): a batch "
                "draws the cells of one group, so a larger one only repeats them, and the OT coupling's memory grows "
                f"with batch_size squared; choose at most {largest}."
            )
        self.state_ = self._method.fit(
            self._data,
            self.embeddings_,
            self.options,
            steps=steps,
            batch_size=batch_size,
            seed=_checked_seed(seed),
            progress=progress,
            resume=resume,
        )
        self.history_ = self._method.history(self.state_)
        return self

    # -- predict ------------------------------------------------------------------------------
    def _source_array(self, source: ad.AnnData | np.ndarray) -> np.ndarray:
        if isinstance(source, ad.AnnData):
            if self.spec_.axes is not None and self.rep not in source.obsm:
                raise CellflowKeyError(
                    f"source has no obsm[{self.rep!r}]: the model predicts in the training cells' PCA, so embed the "
                    f"source cells in it first: source = cellflow.pp.project(source, reference=<training AnnData>, "
                    f"key={self.rep!r})."
                )
            x = get_representation(source, self.rep, features=self.spec_.feature_names)
            self._warn_other_axes(source)
        elif isinstance(source, pd.DataFrame) and self.spec_.feature_names is not None:
            # columns are matched by name, as for an AnnData: a bare array would silently mix genes up
            wanted = list(self.spec_.feature_names)
            columns = source.columns.astype(str)
            missing = [name for name in wanted if name not in columns]
            if missing:
                raise CellflowKeyError(
                    f"source (a DataFrame) lacks {len(missing)} of the model's {len(wanted)} features in rep={self.rep!r}: "
                    f"{format_choices(missing, limit=10)}. Its columns are matched to them by name."
                )
            x = source.set_axis(columns, axis=1)[wanted].to_numpy(dtype=np.float32)
            check_finite(x, self.rep, name="source")
        else:
            x = np.array(source, dtype=np.float32)
            if x.ndim != 2:
                raise CellflowValueError(f"source must be an AnnData or a (cells, features) array, got shape {x.shape}.")
            check_finite(x, self.rep, name="source")
        if x.shape[1] != self.spec_.n_features:
            raise CellflowValueError(
                f"source has {x.shape[1]} features in rep={self.rep!r} but the model was trained on "
                f"{self.spec_.n_features}; source shape {x.shape}, expected (n, {self.spec_.n_features})."
            )
        if x.shape[0] == 0:
            raise CellflowValueError("source has no cells.")
        return x

    def _warn_other_axes(self, source: ad.AnnData) -> None:
        """Warn when the source's embedding records axes (a PCA) other than the training cells'."""
        axes = embedding_axes(source, self.rep)
        if self.spec_.axes is not None and axes is not None and axes != self.spec_.axes:
            warnings.warn(
                f"source.obsm[{self.rep!r}] is a PCA with other axes than the training cells' (its components "
                "differ), so its coordinates mean something else to the model. Embed the source cells in the "
                f"training PCA instead: cellflow.pp.project(source, reference=<training AnnData>, key={self.rep!r}).",
                UserWarning,
                stacklevel=user_stacklevel(),
            )

    def _source_covariates(self, source: Any, covariates: Mapping[str, Any] | None) -> list[tuple[str | None, ...]]:
        """Covariate values of every source cell: from ``covariates``, else from ``source.obs``."""
        keys = self.spec_.covariate_keys
        covariates = dict(covariates or {})
        unknown = [k for k in covariates if k not in keys]
        if unknown:
            raise CellflowKeyError(
                f"covariates key {unknown[0]!r} is not a covariate of this model; valid choices: {format_choices(keys)}."
            )
        n = source.n_obs if isinstance(source, ad.AnnData) else len(source)
        columns, given, explicit_unknown = [], set(), set()
        for key in keys:
            if key in covariates:
                value = covariates[key]
                missing = _is_missing(value)
                columns.append([None if missing else str(value)] * n)
                if missing:  # asked for explicitly: predicted as of an unknown value, without a warning
                    explicit_unknown.add(key)
            elif isinstance(source, ad.AnnData) and key in source.obs.columns:
                column = source.obs[key]
                # a missing value is an unknown covariate value, not the string 'nan'
                columns.append([None if missing else str(v) for v, missing in zip(column, column.isna())])
            else:
                columns.append([None] * n)
                continue
            given.add(key)
        # 1 and 1.0 (an integer column in training, a float one here, or the reverse) are one value
        columns = [_as_seen_numbers(column, self.spec_.covariate_values[key]) for key, column in zip(keys, columns)]
        self._warn_unseen_covariates(
            {key: column for key, column in zip(keys, columns) if key not in explicit_unknown}, given
        )
        return list(zip(*columns)) if keys else [()] * n

    def _warn_unseen_covariates(self, columns: Mapping[str, list[str | None]], given: set[str]) -> None:
        """Warn about covariates that are missing or hold values absent from the training data (a new patient, a typo).

        ``columns``: the values of each covariate to check, per cell, by key; ``given``: the keys
        given in ``covariates=`` or present as ``source.obs`` columns.
        """
        for key, column in columns.items():
            seen = self.spec_.covariate_values[key]
            if column and all(v is None for v in column) and key not in given:
                warnings.warn(
                    f"covariate {key!r} is neither given in covariates= nor a column of source.obs, so every source "
                    f"cell is predicted as of an unknown {key}; pass covariates={{{key!r}: value}} "
                    f"(values seen in training: {format_choices(seen)}).",
                    UserWarning,
                    stacklevel=user_stacklevel(),
                )
                continue
            n_missing = sum(v is None for v in column)
            if n_missing:
                warnings.warn(
                    f"covariate {key!r} is missing for {n_missing} source cell(s), which are predicted as of an "
                    f"unknown {key} (values seen in training: {format_choices(seen)}).",
                    UserWarning,
                    stacklevel=user_stacklevel(),
                )
            unseen = sorted({v for v in column if v is not None} - set(seen))
            if unseen:
                warnings.warn(
                    f"covariate {key!r}: {format_choices(unseen)} did not occur in the training data "
                    f"(values seen: {format_choices(seen)}), so they are predicted as new values: the learned methods use "
                    "their 'unknown' covariate embedding and the source cells, the baselines average over the seen values. "
                    "Check the spelling if they are meant to be known ones.",
                    UserWarning,
                    stacklevel=user_stacklevel(),
                )

    def predict(
        self,
        source: ad.AnnData | np.ndarray,
        perturbation: str | Sequence[str],
        dose: float | str | Sequence[float | str] | None = None,
        covariates: Mapping[str, Any] | None = None,
        seed: int = 0,
        time: float | Sequence[float] | None = None,
    ) -> ad.AnnData:
        """Predict the treated state of every source cell under one or several conditions.

        Parameters
        ----------
        source
            Control cells in the model's ``rep`` (AnnData, or a ``(n, d)`` array), e.g. a new
            patient's untreated cells. A DataFrame's columns are matched to the model's genes
            by name when it was trained on ``"X"`` or a layer, and its index names the cells.
        perturbation
            A condition (``"A"``, ``"A+B"``), or a list of them, stacked in the output.
        dose
            Models with a ``dose_key`` only: a positive number (every member), ``"1.0+0.5"``
            (aligned with the members as written), or a list aligned with ``perturbation``;
            ``None`` is dose 1 for every member (with a warning on models with a ``dose_key``).
        covariates
            ``{key: value}`` applied to every source cell (and written to the output's ``obs``);
            values may be unseen; ``None`` asks for an unknown value (as for a patient of whom
            nothing is recorded). Keys not given are read per cell from ``source.obs`` when
            present (a missing value there is an unknown value), else treated as unknown.
        seed
            Seed of the prediction's randomness (stochastic methods).
        time
            Models fitted with a ``time_key`` only: the time (in ``time_key`` units) at which to
            predict, default the latest measured time. A list gives every source cell's
            trajectory: its position at each time along one simulated path, stacked per time
            with ``obs[time_key]`` set (plot with :func:`cellflow.pl.trajectories`).

        Returns
        -------
        AnnData with one predicted cell per source cell per condition (and per time), holding
        the prediction in the model's ``rep`` (``X``, the layer, or ``obsm``; with a layer, ``X``
        holds a copy of it; with ``obsm``, ``X`` is an empty ``(n, 0)`` matrix; either way
        :func:`anndata.concat` with observed cells keeps the prediction), ``obs`` copied from the
        source with ``obs[perturbation_key]`` (and ``obs[dose_key]`` written as the training
        data wrote doses, ``obs[time_key]``, the ``covariates``) set, and ``uns["cellflow"]``
        recording the method, the ``rep`` and the
        ``obs`` columns that tell the predicted conditions apart (``"groupby"``, what
        :func:`cellflow.metrics.evaluate` should group by). Cells are named
        ``"{source name}-{condition}"`` (the condition as ``obs`` writes it), with ``"@{dose}"``
        added when a condition is predicted at several doses, and made unique
        (:func:`anndata.utils.make_index_unique`) where names would repeat.

        Warns when ``source.obs[perturbation_key]`` holds treated cells (predictions start from
        the source as if it were untreated) and about covariate values absent from training.
        """
        if not self.is_fitted:
            raise CellflowValueError("the model is not fitted; call model.fit() first.")
        seed = _checked_seed(seed)
        x = self._source_array(source)
        perturbations = self._perturbation_labels(perturbation)
        if isinstance(dose, (list, tuple, np.ndarray, pd.Series)):
            doses = list(dose)
            if len(doses) != len(perturbations):
                raise CellflowValueError(
                    f"dose has {len(doses)} entries but perturbation has {len(perturbations)}; give one per condition."
                )
        else:
            doses = [dose] * len(perturbations)
        for d in doses:
            if isinstance(d, (float, np.floating)) and np.isnan(d):
                raise CellflowValueError(f"dose={dose!r} holds NaN; give a positive number, or None for the default dose.")
        if self.spec_.dose_key is None and any(d is not None for d in doses):
            raise CellflowValueError(
                f"dose={dose!r} was given, but the model was built without a dose_key, so it cannot tell doses "
                "apart; pass dose_key=<obs column of doses> to ResponseModel to model them."
            )
        conditions = [
            parse_condition(p, d, control=self.control, dose_key=self.spec_.dose_key) for p, d in zip(perturbations, doses)
        ]
        for condition, d in zip(conditions, doses):
            if not all(np.isfinite(v) and v > 0 for v in condition.doses):
                raise CellflowValueError(
                    f"dose={d!r} for {condition.label!r}: doses must be positive and finite (no treatment is the "
                    "control: the source cells themselves)."
                )
        self._warn_treated_source(source)
        self._warn_dose_extrapolation(conditions, doses)
        for condition in conditions:
            for member in condition.members:
                self.embeddings_.index(member)  # raises for unknown perturbations without embedding
        times = self._times(time)
        cell_covariates = self._source_covariates(source, covariates)
        undosed = [c.label for c, d in zip(conditions, doses) if d is None and not c.is_control]
        if self.spec_.dose_key is not None and undosed:
            warnings.warn(
                f"no dose given for {format_choices(sorted(set(undosed)))}, so they are predicted at dose 1 (for "
                f"each member, the nearest dose seen in training on a log scale); pass dose= to choose.",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        groups: dict[tuple, list[int]] = {}
        for i, values in enumerate(cell_covariates):
            groups.setdefault(values, []).append(i)

        key = jax.random.key(seed)
        blocks = []
        for c, condition in enumerate(conditions):
            y = np.empty((1 if times is None else len(times), *x.shape), x.dtype)
            for g, (values, rows) in enumerate(groups.items()):
                rows = np.asarray(rows)
                args = (self.state_, self.spec_, self.embeddings_, self.options, x[rows], condition, values)
                group_key = jax.random.fold_in(jax.random.fold_in(key, c), g)
                if times is None:
                    y[0, rows] = self._method.predict(*args, group_key)
                else:
                    y[:, rows] = self._method.predict_path(*args, group_key, self.spec_.clock(times))
            blocks.append(y)
        return self._assemble(source, blocks, conditions, times, covariates)

    @staticmethod
    def _perturbation_labels(perturbation: Any) -> list[str]:
        """``perturbation`` as a list of labels; scalars such as ``1`` (integer labels) become ``"1"``."""
        if isinstance(perturbation, Iterable) and not isinstance(perturbation, (str, bytes)):
            labels = list(perturbation)  # lists, arrays, obs[...].unique() (categoricals), sets, generators
        else:
            labels = [perturbation]
        if not labels:
            raise CellflowValueError("perturbation must name at least one condition.")
        for label in labels:
            if label is None or (isinstance(label, float) and np.isnan(label)):
                raise CellflowValueError(f"perturbation={perturbation!r} must name conditions such as 'A' or 'A+B', not {label!r}.")
        return [str(label) for label in labels]

    def _warn_dose_extrapolation(self, conditions: list, doses: list) -> None:
        """Warn about given doses of a member outside the range of its doses in training."""
        if self.spec_.dose_key is None:
            return
        seen: dict[str, list[float]] = {}
        for condition in self.spec_.group_conditions:
            for member, d in zip(condition.members, condition.doses):
                seen.setdefault(member, []).append(d)
        outside = []
        for condition, given in zip(conditions, doses):
            for member, d in zip(condition.members, condition.doses):
                if given is not None and member in seen and not min(seen[member]) <= d <= max(seen[member]):
                    outside.append(f"{member} at {d:g} (trained on {min(seen[member]):g} to {max(seen[member]):g})")
        if outside:
            warnings.warn(
                f"doses outside those seen in training: {', '.join(sorted(set(outside)))}; the prediction extrapolates "
                "(mean_shift and gaussian_ot take the nearest seen dose).",
                UserWarning,
                stacklevel=user_stacklevel(),
            )

    def _warn_treated_source(self, source: Any) -> None:
        """Predictions start from the source as if untreated: say so when ``source.obs`` says otherwise."""
        if not isinstance(source, ad.AnnData) or self.perturbation_key not in source.obs.columns:
            return
        labels = source.obs[self.perturbation_key].dropna().astype(str).str.strip()
        treated = labels[labels != self.control]
        if len(treated):
            warnings.warn(
                f"{len(treated)} of {source.n_obs} source cells are not control cells (obs[{self.perturbation_key!r}] "
                f"holds {format_choices(sorted(treated.unique())[:5])}); predictions start from the source cells as "
                f"if they were untreated. Pass source[source.obs[{self.perturbation_key!r}] == {self.control!r}] to "
                "start from the controls.",
                UserWarning,
                stacklevel=user_stacklevel(),
            )

    def _times(self, time) -> np.ndarray | None:
        """Validated increasing prediction times, or ``None`` for a model without ``time_key``."""
        time_key = self.spec_.time_key
        if time_key is None:
            if time is not None:
                raise CellflowValueError(
                    f"time={time!r} was given, but the model was built without a time_key; pass "
                    f"time_key=<numeric obs column> to ResponseModel to fit a time course."
                )
            return None
        origin, end = self.spec_.time_range
        times = np.atleast_1d(np.asarray(end if time is None else time, np.float64))
        if times.ndim != 1 or not np.isfinite(times).all():
            raise CellflowValueError(f"time={time!r} must be a finite number or a list of numbers.")
        if (times < origin).any() or (times > end).any() or (np.diff(times) <= 0).any():
            raise CellflowValueError(
                f"time={time!r} must be increasing and within the measured range of {time_key!r}, {origin:g} "
                f"(the controls) to {end:g}; the process is not fitted beyond its last snapshot."
            )
        return times

    def _assemble(self, source, blocks, conditions, times=None, covariates=None) -> ad.AnnData:
        n = blocks[0].shape[1]
        if isinstance(source, ad.AnnData):
            base_obs = source.obs.copy()
            names = source.obs_names.astype(str)
        elif isinstance(source, pd.DataFrame):  # its index names the cells
            names = source.index.astype(str)
            base_obs = pd.DataFrame(index=names)
        else:
            base_obs = pd.DataFrame(index=pd.RangeIndex(n).astype(str))
            names = base_obs.index
        for key, value in (covariates or {}).items():  # the cells were predicted as of these values
            base_obs[key] = None if _is_missing(value) else str(value)
        labels = [self.control if c.is_control else c.label for c in conditions]
        repeated = pd.Series(labels).duplicated(keep=False).to_numpy()
        # the same condition at several doses: the dose tells the copies of a source cell apart
        if self.spec_.dose_key is not None:
            labels = [f"{label}@{self._dose_value(c)}" if again else label for label, c, again in zip(labels, conditions, repeated)]
        frames = []
        for condition, label in zip(conditions, labels):
            for t in [None] if times is None else times:
                obs = base_obs.copy()
                obs[self.perturbation_key] = condition.label if not condition.is_control else self.control
                if self.spec_.dose_key is not None:
                    obs[self.spec_.dose_key] = self._dose_value(condition)
                suffix = ""
                if t is not None:
                    obs[self.spec_.time_key] = float(t)
                    suffix = f"-{self.spec_.time_key}={t:g}" if len(times) > 1 else ""
                obs.index = [f"{name}-{label}{suffix}" for name in names]
                frames.append(obs)
        obs = pd.concat(frames)
        if not obs.index.is_unique:  # a condition asked for twice, or source cells of the same name
            obs.index = ad.utils.make_index_unique(obs.index)
        obs[self.perturbation_key] = obs[self.perturbation_key].astype("category")
        prediction = np.concatenate([block.reshape(-1, block.shape[-1]) for block in blocks]).astype(np.float32)
        rep = self.rep
        if rep == "X":
            out = ad.AnnData(X=prediction, obs=obs, var=self._var())
        elif self.spec_.feature_names is not None:  # a layer
            # X as well (as cellflow.pp.decode_adata writes a decoded layer): anndata.concat with
            # observed cells needs X on both sides, and scanpy's plots read X; a copy, so that
            # editing X does not silently edit the layer
            out = ad.AnnData(X=prediction.copy(), obs=obs, var=self._var(), layers={rep: prediction})
        else:
            # an empty X (not None), as the loaders give embeddings, so anndata.concat with observed cells works
            out = ad.AnnData(X=np.zeros((len(obs), 0), dtype=np.float32), obs=obs, obsm={rep: prediction})
        # the obs columns that tell the predicted conditions apart: what an evaluation groups by
        groupby = [self.perturbation_key, *([self.spec_.dose_key] if self.spec_.dose_key is not None else [])]
        groupby += [self.spec_.time_key] if times is not None and len(times) > 1 else []
        out.uns["cellflow"] = {"method": self.method, "rep": rep, "groupby": groupby}
        return out

    def _dose_value(self, condition) -> float | str:
        """The dose as the training data wrote it: a number for numeric columns where possible."""
        doses = set(condition.doses) or {0.0}
        if self.spec_.numeric_dose and len(doses) == 1:
            return float(doses.pop())
        if condition.is_control:
            return format_dose(0.0)
        if self.spec_.dose_format == "float":
            return "+".join(repr(float(d)) for d in condition.doses)
        return condition.dose_label

    def _var(self) -> pd.DataFrame:
        names = self.spec_.feature_names or tuple(str(i) for i in range(self.spec_.n_features))
        return pd.DataFrame(index=pd.Index(names, name=None))

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        """Save the fitted model to the directory ``path``, atomically.

        The model is written to a temporary sibling directory and moved into place only when
        complete, so an interrupted save never leaves a half-written model at ``path``.

        Parameters
        ----------
        path
            Target directory.
        overwrite
            Replace a model saved earlier at ``path`` (or an empty directory); any other file or
            directory there is never replaced.
        """
        if not self.is_fitted:
            raise CellflowValueError("the model is not fitted; nothing to save.")
        path = Path(path).expanduser()
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
        if path.exists() and not replaceable_model_path(path):
            raise FileExistsError(
                f"{path} exists and is not a saved cellflow model ({_CONFIG_FILE} missing), so overwrite=True does "
                "not replace it; choose another path."
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            # mkdtemp makes the directory private (0700); a saved model gets the usual permissions
            os.chmod(tmp, 0o777 & ~_umask())
            config = {
                "format_version": _FORMAT_VERSION,
                "cellflow_version": __version__,
                "method": self.method,
                "options": self.options,
                "spec": json.loads(self.spec_.to_json()),
                "embeddings": {"names": list(self.embeddings_.names), "one_hot": self.embeddings_.one_hot},
                "history": self.history_.to_dict(orient="list"),
            }
            (tmp / _CONFIG_FILE).write_text(json.dumps(config, indent=1))
            np.save(tmp / _EMBEDDINGS_FILE, self.embeddings_.vectors)
            np.savez(tmp / _STATE_FILE, **self._method.state_to_arrays(self.state_))
            if path.exists():
                backup = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, backup)
                os.replace(tmp, path)
                shutil.rmtree(backup, ignore_errors=True)
            else:
                os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ResponseModel:
        """Load a model saved with :meth:`save`; it predicts exactly as the saved one did."""
        path = Path(path).expanduser()
        config_file = path / _CONFIG_FILE
        if not config_file.exists():
            raise FileNotFoundError(f"{path} holds no saved cellflow model ({_CONFIG_FILE} missing).")
        config = json.loads(config_file.read_text())
        if config.get("format_version") != _FORMAT_VERSION:
            raise CellflowValueError(
                f"{path} was saved in format {config.get('format_version')!r}; this cellflow reads {_FORMAT_VERSION}."
            )
        if config["method"] not in METHODS:
            get_method(config["method"])  # raises with the list of available methods
        model = cls.__new__(cls)
        model.method = config["method"]
        model._method = get_method(config["method"])
        model.options = model._method.validate_options(config["options"])
        model._data = None
        model.spec_ = DataSpec.from_json(json.dumps(config["spec"]))
        model.embeddings_ = EmbeddingTable(
            tuple(config["embeddings"]["names"]), np.load(path / _EMBEDDINGS_FILE), config["embeddings"]["one_hot"]
        )
        with np.load(path / _STATE_FILE) as arrays:
            model.state_ = model._method.state_from_arrays(dict(arrays), model.spec_, model.options, model.embeddings_)
        model.history_ = pd.DataFrame(config.get("history", {}))
        return model
