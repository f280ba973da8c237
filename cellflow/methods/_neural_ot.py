"""``method="neural_ot"``: Monge maps from control to treated cells (CellOT, CondOT) through the method contract."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
from flax import nnx

from cellflow._errors import CellflowKeyError, format_choices
from cellflow.data import (
    Condition,
    DataSpec,
    EmbeddingTable,
    PerturbationData,
    build_training_arrays,
    encode_condition,
)
from cellflow.methods._base import Method, Option
from cellflow.methods._learned import (
    bucket, build_response_field, known_covariates, params_from_arrays, params_to_arrays, run_description,
    split_validation, train_with_options, validation_scorer,
)
from cellflow.methods._options import (
    early_stopping_options, fraction, non_negative, one_of, positive, positive_int, response_field_options,
    training_loop_options,
)
from cellflow.methods import _subspace as subspaces
from cellflow.nn import ResponseField
from cellflow.solvers import baselines
from cellflow.solvers import flow_matching as fm
from cellflow.solvers import neural_ot
from cellflow.solvers import subspace as principal
from cellflow.train import chunk_size, group_mesh, make_optimizer

__all__ = ["ConditionalMapState", "DualMapsState", "NeuralOT"]

_MAPS = ("conditional", "per_condition")


class ConditionalMapState(NamedTuple):
    """A fitted conditional map: graph definition, EMA parameters, training history."""

    graphdef: Any
    params: Any
    history: pd.DataFrame
    subspace: principal.Subspace | None = None
    outside: baselines.AffineResponse | None = None


class DualMapsState(NamedTuple):
    """Fitted per-condition potentials: stacked ``f`` parameters and each condition's coordinates."""

    params_f: Any
    shift: jax.Array
    scale: jax.Array
    conditions: tuple[Condition, ...]
    history: pd.DataFrame
    subspace: principal.Subspace | None = None
    outside: baselines.AffineResponse | None = None


def _hidden(value):
    ok = isinstance(value, (list, tuple)) and value and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in value
    )
    return None if ok else "expected a non-empty list of positive integers, e.g. [64, 64, 64, 64]."


def trained_conditions(spec: DataSpec) -> tuple[Condition, ...]:
    """The distinct treated conditions of the training groups, sorted (one ICNN pair each)."""
    return tuple(sorted(set(spec.group_conditions)))


class NeuralOT(Method):
    """Neural optimal-transport maps: a deterministic cell-level map ``T(x)`` per condition.

    ``map="conditional"`` (default) is one CondOT-style network for every condition,
    ``T(x | c) = x + D(x | c)``, with the condition and population encoders of flow matching. It
    is trained to push each control batch onto its treated batch (Sinkhorn divergence, estimated
    on disjoint halves of the batch so that its minibatch bias does not shrink the map) with the
    Monge gap as regulariser, so it predicts held-out doses, combinations, cell types and
    patients. ``map="per_condition"`` is CellOT: a pair of input-convex potentials per treated
    condition trained on the W2 dual, ``T = grad f``, started from the Gaussian (Bures) map
    (``init="gaussian"``) or the identity. It pools each condition's cells over covariate values
    (as CellOT does, so a new patient or cell type is mapped by its condition's map) and can only
    predict conditions it was trained on.

    Defaults: 2,000 steps. For the conditional map, 8 conditions x 128 cells per step, width
    128, depth 3, Sinkhorn epsilon 0.05 of the source batch's mean squared distance, Monge-gap
    weight 1, and ``centre=True``: the map sees each cell relative to its source population's
    mean, so a population offset as a whole (a new patient) is moved like the training ones.
    Measured (seed 0): held-out patient on Kang 2018 energy distance 0.240 with it against 0.304
    without (mean_shift 0.255); held-out doses on the synthetic default 0.065 against 0.064;
    held-out cell type (scGen CD4T) 0.406 against 0.333 (mean_shift 2.147): where the response
    depends on where a population sits, as across cell types, ``centre=False`` can be better. For the per-condition maps, every condition at each step with 256 cells, ICNN
    widths [64]*4, 5 conjugate updates per potential update, Adam(0.5, 0.9) at 1e-3. Measured on
    2 CPU cores with 50-d PCA (Kang 2018): about 3 minutes for the conditional map, under a
    minute for the per-condition ICNNs (held-out patient, seed 0: energy distance 0.273 against
    mean_shift's 0.255; ``python experiments/run.py --tasks kang_patient --methods mean_shift
    neural_ot:map=per_condition``). They start at the Bures map, so a few hundred steps often
    suffice.

    ``subspace`` (default ``"auto"``, as for flow matching): on many features whose top 20
    principal components hold less than half of the variance (genes) the maps are fitted in those
    components and each predicted cell keeps its own remainder outside them, moved by the
    condition's mean shift pooled over covariate values. On Kang 2018's held-out patient in 1,267
    log-count genes: 0.327 (0.489 fitted on every gene, seed 0); scGen's held-out CD4T cells in 6,998 genes: 0.271 (mean_shift 0.351
    and 0.949; seeds 0-2, ``python experiments/run.py --tasks kang_patient_genes scgen_cd4t_genes
    --methods neural_ot --seeds 0 1 2``).
    """

    name = "neural_ot"
    summary = "neural Monge maps: conditional (CondOT-style, Monge gap) or per-condition ICNN duals (CellOT)"
    default_steps = 2000
    options = {
        "map": Option("conditional", f"'conditional' (one network, Monge gap) or 'per_condition' (ICNN duals): {list(_MAPS)}", one_of(*_MAPS)),
        # conditional map
        **response_field_options("the map network", centre=True),
        "conditions_per_step": Option(8, "treated groups per training step (conditional map)", positive_int),
        "epsilon": Option(0.05, "Sinkhorn regularisation of the fit and Monge gap, relative to the source spread (mean squared distance)", positive),
        "monge_gap": Option(1.0, "weight of the Monge-gap regulariser (conditional map)", non_negative),
        "fit": Option(
            "sinkhorn_divergence",
            "fitting loss of the conditional map: 'sinkhorn_divergence' (mapped cells vs target) or 'barycentric' (regress the OT plan's barycentric projection)",
            one_of("sinkhorn_divergence", "barycentric"),
        ),
        "covariate_dropout": Option(0.1, "probability of hiding a covariate value in training", fraction),
        "group_weighting": Option("uniform", "draw groups 'uniform'ly or by 'size'", one_of("uniform", "size")),
        "population_size": Option(256, "source cells summarised at prediction time", positive_int),
        **early_stopping_options(" (conditional map)"),
        # per-condition ICNN duals
        "hidden": Option([64, 64, 64, 64], "hidden widths of the ICNN potentials (per_condition)", _hidden),
        "inner_steps": Option(5, "conjugate-potential updates per potential update (per_condition)", positive_int),
        "init": Option("gaussian", "ICNN start: 'gaussian' (Bures map) or 'identity' (per_condition)", one_of("gaussian", "identity")),
        "init_scale": Option(0.01, "std of the ICNN hidden weights at initialisation (per_condition)", non_negative),
        # shared
        "learning_rate": Option(1e-3, "learning rate (conditional: peak of warm-up and cosine decay; per_condition: constant)", non_negative),
        "weight_decay": Option(0.0, "AdamW weight decay (conditional map)", non_negative),
        "warmup": Option(200, "warm-up steps (conditional map)", non_negative),
        "ema_decay": Option(0.999, "EMA decay of the weights used to predict", fraction),
        **training_loop_options(", conditional map"),
        "subspace": subspaces.subspace_option("the maps"),
    }

    # -- conditional map ----------------------------------------------------------------------
    def _map_config(self, options: Mapping[str, Any], batch_size: int) -> neural_ot.MongeMapConfig:
        return neural_ot.MongeMapConfig(
            batch_size=batch_size,
            conditions_per_step=options["conditions_per_step"],
            epsilon=float(options["epsilon"]),
            monge_gap=float(options["monge_gap"]),
            fit=options["fit"],
            ema_decay=float(options["ema_decay"]),
            covariate_dropout=float(options["covariate_dropout"]),
        )

    def _dual_config(self, options: Mapping[str, Any], batch_size: int) -> neural_ot.DualConfig:
        return neural_ot.DualConfig(
            hidden=tuple(int(h) for h in options["hidden"]),
            batch_size=batch_size,
            inner_steps=options["inner_steps"],
            init=options["init"],
            init_scale=float(options["init_scale"]),
            ema_decay=float(options["ema_decay"]),
        )

    def build(self, spec: DataSpec, embedding_dim: int, options: Mapping[str, Any], seed: int = 0) -> ResponseField:
        """The untrained conditional map network for data described by ``spec``."""
        return build_response_field(spec, embedding_dim, options, seed)

    def fit(self, data: PerturbationData, embeddings: EmbeddingTable, options, *, steps, batch_size, seed, progress, resume=False):
        steps = steps or self.default_steps
        batch_size = batch_size or (256 if options["map"] == "per_condition" else 128)
        subspace = subspaces.choose_subspace(data.cells, options["subspace"])
        run = run_description(data, options, steps=steps, batch_size=batch_size, seed=seed, subspace=subspace)
        outside, data = subspaces.enter_subspace(data, embeddings, subspace)
        loop = dict(steps=steps, batch_size=batch_size, seed=seed, progress=progress, resume=resume, run=run)
        if options["map"] == "per_condition":
            state = self._fit_duals(data, options, **loop)
        else:
            state = self._fit_map(data, embeddings, options, **loop)
        return state._replace(subspace=subspace, outside=outside)

    def _fit_map(self, data, embeddings, options, *, steps, batch_size, seed, progress, resume, run):
        config = self._map_config(options, batch_size)
        rng = np.random.default_rng(seed)
        train_data, validation = data, None
        if options["validation_fraction"] > 0:
            train_data, validation = split_validation(data, options["validation_fraction"], rng)
        arrays = build_training_arrays(train_data, embeddings, group_weighting=options["group_weighting"])
        key = jax.random.key(seed)
        model = self.build(data.spec, embeddings.dim, options, seed)
        optimizer = make_optimizer(options["learning_rate"], steps, warmup=options["warmup"], weight_decay=options["weight_decay"])
        graphdef, state = fm.init_state(model, optimizer, key)
        train_chunk = neural_ot.make_map_train_chunk(
            graphdef, optimizer, arrays, config, chunk_size(steps, options["chunk"]),
            group_mesh(config.conditions_per_step, options["devices"]),
        )
        evaluate = None
        if validation is not None:
            evaluate = _map_validation_scorer(graphdef, validation, embeddings, data.spec, batch_size, rng)
        result = train_with_options(
            train_chunk, state, steps, options, evaluate=evaluate, resume=resume, progress=progress,
            description="neural OT (conditional map)", run=run,
        )
        return ConditionalMapState(graphdef, result.best_ema, result.history)

    def _fit_duals(self, data: PerturbationData, options, *, steps, batch_size, seed, progress, resume, run):
        config = self._dual_config(options, batch_size)
        conditions = trained_conditions(data.spec)
        by_condition = {condition: [] for condition in conditions}
        for group, condition in enumerate(data.spec.group_conditions):
            by_condition[condition].append(group)
        sources, targets = [], []
        for condition in conditions:
            groups = by_condition[condition]
            pools = sorted({int(data.spec.groups["pool"].iloc[g]) for g in groups})
            sources.append(data.cells[np.concatenate([data.pool_index[p] for p in pools])])
            targets.append(data.cells[np.concatenate([data.group_index[g] for g in groups])])
        key_init, key_train = jax.random.split(jax.random.key(seed))
        dual_data, params = neural_ot.init_duals(key_init, sources, targets, config)
        # Constant-rate Adam with beta = (0.5, 0.9), as in W2NeuralDual and CellOT: the min-max is
        # a game, and both gradient clipping and a decaying rate were measured to stall it (Gaussian
        # oracle, d = 2, 300 steps: L2-UVP 0.25 % constant, 2.0 % cosine decay, 1.4 % clipped).
        optimizer = optax.adam(options["learning_rate"], b1=0.5, b2=0.9)
        state = neural_ot.init_dual_state(params, optimizer, key_train)
        train_chunk = neural_ot.make_dual_train_chunk(dual_data, optimizer, config, chunk_size(steps, options["chunk"]))
        result = train_with_options(
            train_chunk, state, steps, options, resume=resume, progress=progress, description="neural OT (per-condition ICNN)",
            run=run,
        )
        return DualMapsState(result.best_ema["f"], dual_data.shift, dual_data.scale, conditions, result.history)

    def history(self, state) -> pd.DataFrame:
        return state.history

    # -- predict ------------------------------------------------------------------------------
    def predict(self, state, spec, embeddings, options, source, condition: Condition, covariates, key) -> np.ndarray:
        cells = subspaces.to_subspace(state.subspace, source)
        if isinstance(state, DualMapsState):
            moved = self._predict_dual(state, options, cells, condition)
        else:
            moved = self._predict_map(state, spec, embeddings, options, cells, condition, covariates, key)
        return subspaces.leave_subspace(state.subspace, state.outside, moved, source, condition, spec, embeddings)

    def _predict_map(self, state, spec, embeddings, options, source, condition, covariates, key) -> np.ndarray:
        arrays = encode_condition(
            condition, known_covariates(spec, covariates), embeddings, spec.covariate_values,
            max(spec.max_members, len(condition)),
        )
        n = source.shape[0]
        population = source[np.asarray(jax.random.randint(key, (options["population_size"],), 0, n))]
        x = np.zeros((bucket(n), source.shape[1]), np.float32)
        x[:n] = source
        y = neural_ot.push_map(state.graphdef, state.params, jnp.asarray(x), jax.tree.map(jnp.asarray, arrays), jnp.asarray(population))
        return np.asarray(y[:n])

    def _predict_dual(self, state: DualMapsState, options, source: np.ndarray, condition: Condition) -> np.ndarray:
        if condition.is_control:
            return np.array(source, dtype=np.float32)
        if condition not in state.conditions:
            raise CellflowKeyError(
                f"condition {condition.label!r} (dose {condition.dose_label}) has no map: map='per_condition' "
                f"(CellOT) predicts only the conditions it was trained on; use map='conditional' for unseen "
                f"conditions. Trained conditions: "
                f"{format_choices([f'{c.label} @ {c.dose_label}' for c in state.conditions])}."
            )
        index = state.conditions.index(condition)
        params = jax.tree.map(lambda leaf: leaf[index], state.params_f)
        n = source.shape[0]
        x = np.zeros((bucket(n), source.shape[1]), np.float32)
        x[:n] = source
        config = self._dual_config(options, 1)
        y = neural_ot.transport(params, state.shift[index], state.scale[index], jnp.asarray(x), config)
        return np.asarray(y[:n])

    # -- persistence --------------------------------------------------------------------------
    def state_to_arrays(self, state) -> dict[str, np.ndarray]:
        arrays = params_to_arrays(state.params_f if isinstance(state, DualMapsState) else state.params)
        if isinstance(state, DualMapsState):
            arrays["dual/shift"] = np.asarray(state.shift)
            arrays["dual/scale"] = np.asarray(state.scale)
        return arrays | subspaces.subspace_to_arrays(state.subspace, state.outside)

    def state_from_arrays(self, arrays, spec, options, embeddings):
        subspace, outside, spec = subspaces.subspace_from_arrays(arrays, spec)
        return self._state_from_arrays(arrays, spec, options, embeddings)._replace(subspace=subspace, outside=outside)

    def _state_from_arrays(self, arrays, spec, options, embeddings):
        if options["map"] == "per_condition":
            conditions = trained_conditions(spec)
            config = self._dual_config(options, 1)
            template = neural_ot.dual_potentials(spec.n_features, config)
            shapes = jax.eval_shape(lambda: template.init(jax.random.key(0), jnp.zeros((1, spec.n_features)))["params"])
            # one potential per trained condition, stacked on a leading axis
            stacked = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct((len(conditions), *leaf.shape), leaf.dtype), shapes)
            params = params_from_arrays(arrays, stacked)
            return DualMapsState(params, jnp.asarray(arrays["dual/shift"]), jnp.asarray(arrays["dual/scale"]), conditions, pd.DataFrame())
        graphdef, template = nnx.split(self.build(spec, embeddings.dim, options))
        return ConditionalMapState(graphdef, params_from_arrays(arrays, template), pd.DataFrame())


def _map_validation_scorer(graphdef, validation: PerturbationData, embeddings, spec, batch_size, rng, max_groups: int = 32):
    """``ema -> mean energy distance`` of mapped held-out cells over up to ``max_groups`` groups."""

    def move(graphdef, params, start, condition, source):
        model = nnx.merge(graphdef, params)
        return neural_ot.map_cells(model, start, model.encode(condition, source))

    return validation_scorer(graphdef, validation, embeddings, spec, batch_size, rng, max_groups=max_groups, move=move)
