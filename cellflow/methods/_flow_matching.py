"""``method="flow_matching"``: conditional OT flow matching through the method contract."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from flax import nnx

from cellflow.data import (
    Condition,
    DataSpec,
    EmbeddingTable,
    PerturbationData,
    build_training_arrays,
    condition_weights,
    encode_condition,
)
from cellflow.methods._base import Method, Option
from cellflow.methods._learned import (
    bucket, build_response_field, known_covariates, params_from_arrays, params_to_arrays, run_description,
    split_validation, train_with_options, validation_scorer,
)
from cellflow.methods._options import (
    early_stopping_options, fraction, non_negative, one_of, optimizer_options, positive, positive_int,
    response_field_options, training_loop_options, unit_interval,
)
from cellflow.methods import _subspace as subspaces
from cellflow.methods._baselines import GaussianOT, MeanShift
from cellflow.nn import ResponseField
from cellflow.solvers import baselines
from cellflow.solvers import flow_matching as fm
from cellflow.solvers import subspace as principal
from cellflow.train import chunk_size, group_mesh, make_optimizer

__all__ = ["FlowMatching", "FlowMatchingState", "default_steps"]

_SOLVERS = ("euler", "heun", "midpoint", "tsit5", "dopri5")
#: Default training steps per group where they come to more than 2,000, and the most the defaults train.
STEPS_PER_GROUP = 14
MAX_DEFAULT_STEPS = 10_000

_PRIORS = {"none": None, "mean_shift": MeanShift, "gaussian_ot": GaussianOT}


class FlowMatchingState(NamedTuple):
    """A fitted flow-matching model: graph definition, EMA parameters, history, baseline prior, and
    with ``subspace``, the principal subspace the flow runs in and each group's mean shift outside it."""

    graphdef: Any
    params: Any
    history: pd.DataFrame
    prior: baselines.AffineResponse | None = None
    subspace: principal.Subspace | None = None
    outside: baselines.AffineResponse | None = None


class FlowMatching(Method):
    """Conditional optimal-transport flow matching (the flagship).

    Minibatch OT couplings inside each condition, a velocity field that adds one learned member
    field per perturbation of a combination plus an interaction field, covariate embeddings with
    an "unknown" slot for unseen values, and a DeepSets summary of the source population. See
    :mod:`cellflow.solvers.flow_matching` and :mod:`cellflow.nn.response`.

    Defaults are chosen for 10-100-dimensional embeddings (PCA, image features): 2,000 steps
    (more on large screens, below) of 8 conditions x 128 cells, width 128, depth 3, learning
    rate 1e-3 with warm-up and cosine decay, Sinkhorn epsilon 0.01 of the mean cost, EMA 0.999,
    Heun with 16 steps to predict. About two minutes on two CPU cores; the cost per step does
    not grow with the number of cells, so larger data sets need more steps rather than more
    time per step. A screen of more than 142 training groups ((condition, dose, covariates)
    combinations) therefore gets 14 steps per group by default (rounded up to a multiple of
    500, at most 10,000; :func:`default_steps`), so that each group is drawn about as often as
    in a screen of 142. Measured on a synthetic screen of 440 groups (40 drugs x 3 doses x 4
    patients, the middle dose of 10 drugs held out, 67,600 cells, 20-d; scored against 1,000
    true cells per group), 2,000 steps (80 s) gave an energy distance of 0.069 on 24 seen
    groups and 0.094 on the 40 held-out doses, against 0.053 and 0.071 with the 6,500 steps
    that are now its default (224 s); gaussian_ot (nearest seen dose) scored 0.076 and 0.075,
    mean_shift 0.157 and 0.110, the noise floor 0.030 and 0.031 (``python
    benchmarks/flow_matching_steps.py --steps 2000 6500 --held-out-drugs 10``): with 2,000
    steps flow matching lost the held-out doses to gaussian_ot. Every task of
    ``experiments/run.py``, the demo and the benchmarks against CellFlow have at most 89 groups
    and keep 2,000 steps.

    The training points lie on a Brownian bridge between each coupled pair (``path="brownian"``)
    with ``sigma=2`` control-cell spreads (the root mean square of the per-feature standard
    deviation within each control pool, so the option means the same on PCA scores and on image
    features), while the target stays the pair's displacement: the field learns displacements
    averaged over a neighbourhood that is widest mid-way, and so carries cells slightly off the
    training populations, such as a new patient's or an unseen cell type's. Energy distances
    against the straight path (``path="straight"``, the previous default), seeds 0-2 unless
    noted: Kang 2018 held-out patient 0.458 (seed 0) to 0.243 (mean_shift 0.255), scGen
    held-out CD4T cells 0.729 (seed 0) to 0.524 (mean_shift 2.147); at seed 0, synthetic
    held-out combinations 0.233 to 0.212 and unseen patient 0.106 to 0.097 (sigma 1.5),
    BBBC021 held-out doses 20.9 to 21.8 (sigma 1.5; mean_shift 24.8), the one task where it
    cost a little. The exact bridge velocity as target did worse (Kang 0.334 against 0.278 at
    sigma 1.3).

    The displacement target contracts the prediction: on a Gaussian oracle
    (``benchmarks/flow_matching_dispersion.py``, 20-d, N(0, I) to N(2, 1.44 I)) the predicted
    variance is 0.87 of the truth's with 600 training cells and 0.85 with 5,000. ``path="smoothed"``
    blurs the path by ``sigma_min + 2 sigma t (1 - t)`` control spreads and regresses the path's own
    velocity (see :func:`cellflow.solvers.flow_matching.interpolate`), so the flow keeps most of the
    treated spread (0.98 and 0.91; energy distance 0.022 against 0.031 and 0.012 against 0.022,
    noise floor 0.008); ``sigma_min`` keeps the field from pulling onto the training cells of small
    groups (0.3 control spreads gave 1.27 with 600 cells, none 1.79). It trades tasks, seeds 0-2:
    better for an unseen cell type (scGen held-out CD4T cells 0.387 against 0.527, R² top-50 0.973
    against 0.962) and the synthetic unseen patient (0.052 against 0.063, scored against 2,000 true
    cells), worse for Kang's held-out patient (0.261 against 0.248, mean_shift 0.255; R² top-50
    0.984 against 0.990) and synthetic held-out combinations (0.199 against 0.178). Both Kang tasks
    hold out a (condition, covariate) pair whose control cells were seen, so the data do not say
    in advance which path suits; compare the two on a held-out split of your own data
    (:func:`cellflow.data.holdout`).

    ``interaction_penalty=1`` adds the interaction field's mean squared velocity to the loss
    (an additivity prior): the member fields then explain as much of every seen combination as
    they can, and the interaction field, whose guess for an unseen pair is an extrapolation,
    only the rest. It only acts on combinations. On the synthetic default (held-out
    combinations scored against 2,000 cells of the true response, seeds 0/1/2) it moved
    flow matching from 0.161 / 0.129 / 0.329 to 0.129 / 0.114 / 0.307 (mean_shift 0.181 /
    0.201 / 0.441), better on both the additive and the synergistic held-out pair of every
    seed; 0.1 gave 0.147 at seed 0.

    ``combine`` says how the additive fields predict a combination. Integrating the sum of the
    member fields along one path (``"velocities"``, the flow the loss fits) evaluates each
    member's field at cells the other members have already moved, where that field was trained
    only if the combination was. ``"displacements"`` moves each source cell by each member's
    field on its own, adds the displacements, and adds what the interaction field integrates
    along the combined path. The default, ``"auto"``, uses the trained flow for combinations
    seen in training and the displacements for new ones. Scored against 2,000 cells of the true
    response on the synthetic default (``benchmarks/flow_matching_synthetic.py --reference-cells
    2000``, held-out combinations, seeds 0/1/2), ``"auto"`` gave 0.110 / 0.114 / 0.310 against
    0.115 / 0.125 / 0.309 with ``combine="velocities"``; the held-out additive pair improved on
    every seed (0.077 / 0.061 / 0.096 against 0.082 / 0.073 / 0.106; the additive oracle is at
    the noise floor, 0.024-0.028). On combinations seen in training the displacements did worse
    for synergistic pairs (0.064 against 0.057 at seed 0), whose interaction was fitted along the
    summed path, hence ``"auto"``.

    ``unseen_interaction=False`` drops the interaction field's guess for combinations never seen
    in training (``combine="members"`` for them): the prediction is then the members' own
    displacements added, the additive model. On the synthetic default, whose synergies are random
    vectors of each pair and so cannot be guessed, it improved the held-out combinations on every
    seed (the same scoring as above, seed-0/1/2 models: 0.110 / 0.113 / 0.310 to 0.104 / 0.110 /
    0.291), though the unseen patient's additive pair got worse on two seeds. It stays on by
    default because real combination screens do have learnable non-additivity (CellFlow beat the
    additive baseline on combosciplex and Norman); compare both on held-out seen combinations of
    your own data.

    ``field="joint"`` replaces the member and interaction fields by one field of the pooled
    condition (CellFlow's structure): one network evaluation per cell whatever the number of
    members, so about a third of the dense FLOPs of a step on pairs, and the like-for-like
    configuration against CellFlow in ``benchmarks/vs_cellflow_tools.py``. On data without
    combinations only the member field is evaluated in either case.

    ``prior="mean_shift"`` or ``"gaussian_ot"`` starts the flow from that baseline's prediction
    and learns only the remainder. It is off by default: measured on Kang 2018 it changed the
    held-out-patient energy distance from 0.458 to 0.428 (mean_shift prior) and 0.685
    (gaussian_ot prior), and for a held-out cell type (scGen CD4T) it made predictions worse
    (0.73 to 8.4), because the baseline's guess for an unseen covariate value moves the start
    off the distribution the field was trained on.

    ``subspace`` runs the flow in the top principal components of the training cells
    (:mod:`cellflow.solvers.subspace`); each predicted cell keeps its own remainder outside them,
    moved by the condition's mean shift there, averaged over covariate values whatever the
    query's (the flow carries the covariates' effects inside). On expression data a field fitted on every gene
    must regenerate each gene's noise from its own errors, which add up over thousands of genes:
    on Kang 2018's held-out patient in 1,267 log-count genes it scored an energy distance of 0.416
    against mean_shift's 0.351 (seed 0). In 20 components it scores 0.328 (seeds 0-2, 53 s a fit;
    R² of the shift over the top 50 DEGs 0.983 against 0.981), and for scGen's held-out CD4T cells
    in its 6,998 genes 0.270 against mean_shift's 0.949 and identity's 1.213 (R² top-50 0.960
    against 0.071; 83 s a fit), ``python experiments/run.py --tasks kang_patient_genes
    scgen_cd4t_genes --methods identity mean_shift flow_matching --seeds 0 1 2``. (Seed 0, other
    widths: 10 components 0.286 and 50 components 0.346 on scGen's genes, 50 0.330 and 100 0.350
    on Kang's.) ``"auto"`` takes 20 components when there are more than 100 features and those
    components hold less than half of the variance (Kang's genes 0.37, scGen's 0.33): where
    they hold most of it the rest is structure, not noise, and the field sees every feature.
    BBBC021's 211 CellProfiler features (0.93) in 20 components scored 34.7 on held-out doses
    against 21.7 in the whole representation (mean_shift 24.8), so ``"auto"`` keeps them whole;
    so it does every representation of at most 100 features, such as a 50-d PCA, where 20
    components helped for scGen's held-out cell type (0.406 against 0.560, seed 0) but not for
    Kang's held-out patient (0.277 against 0.245).
    """

    name = "flow_matching"
    summary = "conditional OT flow matching (additive member fields, population encoder)"
    default_steps = 2000
    options = {
        **response_field_options("the velocity fields"),
        **optimizer_options(),
        "conditions_per_step": Option(8, "treated groups per training step", positive_int),
        "coupling": Option("ot", "'ot' (minibatch Sinkhorn) or 'independent'", one_of(*fm.COUPLINGS)),
        "epsilon": Option(0.01, "Sinkhorn regularisation relative to the mean cost", positive),
        "tau_a": Option(1.0, "source unbalancedness (1 = balanced)", unit_interval),
        "tau_b": Option(1.0, "target unbalancedness (1 = balanced)", unit_interval),
        "path": Option(
            "brownian",
            "probability path: 'brownian' (noisy, displacement target), 'straight' or 'smoothed' (noisy, exact velocity)",
            one_of(*fm.PATHS),
        ),
        "sigma": Option(2.0, "noise of the probability path, in units of the control cells' spread", non_negative),
        "sigma_min": Option(0.6, "noise floor of path='smoothed', in units of the control cells' spread", non_negative),
        "ema_decay": Option(0.999, "EMA decay of the weights used to predict", fraction),
        "covariate_dropout": Option(0.1, "probability of hiding a covariate value in training", fraction),
        "interaction_penalty": Option(
            1.0, "weight of the interaction field's squared velocity in the loss (an additivity prior for combinations)", non_negative
        ),
        "group_weighting": Option("uniform", "draw groups 'uniform'ly or by 'size'", one_of("uniform", "size")),
        "solver": Option("heun", f"ODE solver: one of {list(_SOLVERS)}", one_of(*_SOLVERS)),
        "n_steps": Option(16, "ODE steps of fixed-step solvers", positive_int),
        "combine": Option(
            "auto",
            "how additive member fields predict a combination: 'displacements' (each member's own flow from the source "
            "cell, displacements added, plus the interaction field), 'members' (the same without the interaction "
            "field), 'velocities' (one flow of the summed fields, as trained), or 'auto' (velocities for combinations "
            "seen in training; displacements, or members with unseen_interaction=False, for the others)",
            one_of("auto", *fm.COMBINE_RULES),
        ),
        "unseen_interaction": Option(
            True,
            "with combine='auto': add the interaction field's extrapolated guess to a combination never seen in "
            "training (True), or predict it from its members' displacements alone (False, the additive prediction)",
            one_of(True, False),
        ),
        "population_size": Option(256, "source cells summarised at prediction time", positive_int),
        **early_stopping_options(),
        **training_loop_options(),
        "prior": Option(
            "none",
            "start the flow from a baseline's prediction and learn the rest: 'none', 'mean_shift' or 'gaussian_ot'",
            one_of(*_PRIORS),
        ),
        "subspace": subspaces.subspace_option("the flow"),
    }

    # -- construction -------------------------------------------------------------------------
    def _config(self, options: Mapping[str, Any], batch_size: int, noise_scale: float = 1.0) -> fm.FlowMatchingConfig:
        return fm.FlowMatchingConfig(
            batch_size=batch_size,
            conditions_per_step=options["conditions_per_step"],
            coupling=options["coupling"],
            epsilon=float(options["epsilon"]),
            tau_a=float(options["tau_a"]),
            tau_b=float(options["tau_b"]),
            path=options["path"],
            sigma=float(options["sigma"]) * noise_scale,
            sigma_min=float(options["sigma_min"]) * noise_scale,
            ema_decay=float(options["ema_decay"]),
            covariate_dropout=float(options["covariate_dropout"]),
            interaction_penalty=float(options["interaction_penalty"]),
            population_size=options["population_size"],
        )

    def build(self, spec: DataSpec, embedding_dim: int, options: Mapping[str, Any], seed: int = 0) -> ResponseField:
        """The untrained module for data described by ``spec`` (whose ``n_features`` are the principal
        components when the flow runs in a subspace)."""
        return build_response_field(spec, embedding_dim, options, seed)

    # -- fit ----------------------------------------------------------------------------------
    def fit(self, data: PerturbationData, embeddings: EmbeddingTable, options, *, steps, batch_size, seed, progress, resume=False):
        steps = steps or default_steps(data.n_groups)
        batch_size = batch_size or 128
        subspace = subspaces.choose_subspace(data.cells, options["subspace"])
        run = run_description(data, options, steps=steps, batch_size=batch_size, seed=seed, subspace=subspace)
        outside, data = subspaces.enter_subspace(data, embeddings, subspace)
        config = self._config(options, batch_size, control_spread(data))
        rng = np.random.default_rng(seed)
        train_data, validation = data, None
        if options["validation_fraction"] > 0:
            train_data, validation = split_validation(data, options["validation_fraction"], rng)
        arrays = build_training_arrays(train_data, embeddings, group_weighting=options["group_weighting"])
        prior = None
        if _PRIORS[options["prior"]] is not None:
            prior = _PRIORS[options["prior"]]().fit(
                train_data, embeddings, {}, steps=None, batch_size=None, seed=seed, progress=False
            )
        key = jax.random.key(seed)
        model = self.build(data.spec, embeddings.dim, options, seed)
        optimizer = make_optimizer(options["learning_rate"], steps, warmup=options["warmup"], weight_decay=options["weight_decay"])
        graphdef, state = fm.init_state(model, optimizer, key)
        train_chunk = fm.make_train_chunk(
            graphdef, optimizer, arrays, config, chunk_size(steps, options["chunk"]), prior,
            group_mesh(config.conditions_per_step, options["devices"]),
        )
        evaluate = None
        if validation is not None:
            evaluate = validation_scorer(
                graphdef, validation, embeddings, data.spec, batch_size, rng, prior,
                # validation groups are combinations seen in training
                combine="velocities" if options["combine"] == "auto" else options["combine"],
            )
        result = train_with_options(
            train_chunk, state, steps, options, evaluate=evaluate, resume=resume, progress=progress,
            description="flow matching", run=run,
        )
        return FlowMatchingState(graphdef, result.best_ema, result.history, prior, subspace, outside)

    def history(self, state: FlowMatchingState) -> pd.DataFrame:
        return state.history

    # -- predict ------------------------------------------------------------------------------
    def predict(self, state, spec, embeddings, options, source, condition: Condition, covariates, key) -> np.ndarray:
        # The fields are shared across members, so combinations larger than any seen in training
        # (e.g. pairs after training on single drugs) only need wider padding.
        arrays = encode_condition(
            condition, known_covariates(spec, covariates), embeddings, spec.covariate_values,
            max(spec.max_members, len(condition)),
        )
        n = source.shape[0]
        cells = subspaces.to_subspace(state.subspace, source)
        population = cells[np.asarray(jax.random.randint(key, (options["population_size"],), 0, n))]
        start = cells
        if state.prior is not None:
            weights = condition_weights(condition, covariates, spec.group_conditions, spec.group_covariates, embeddings)
            start = np.asarray(baselines.push(state.prior, cells, weights))
        padded = bucket(n)
        x = np.zeros((padded, start.shape[1]), np.float32)
        x[:n] = start
        y = fm.push(
            state.graphdef,
            state.params,
            jnp.asarray(x),
            jax.tree.map(jnp.asarray, arrays),
            jnp.asarray(population),
            solver=options["solver"],
            n_steps=options["n_steps"],
            combine=_combine_rule(options["combine"], condition, spec, options["unseen_interaction"]),
        )
        return subspaces.leave_subspace(state.subspace, state.outside, y[:n], source, condition, spec, embeddings)

    # -- persistence --------------------------------------------------------------------------
    def state_to_arrays(self, state: FlowMatchingState) -> dict[str, np.ndarray]:
        arrays = params_to_arrays(state.params)
        if state.prior is not None:
            arrays["prior/offset"] = np.asarray(state.prior.offset)
            if state.prior.linear is not None:
                arrays["prior/linear"] = np.asarray(state.prior.linear)
        return arrays | subspaces.subspace_to_arrays(state.subspace, state.outside)

    def state_from_arrays(self, arrays, spec, options, embeddings) -> FlowMatchingState:
        # The arrays say which space the field was trained in (models saved before the option
        # existed ran in the whole representation, whatever "auto" would choose now).
        subspace, outside, spec = subspaces.subspace_from_arrays(arrays, spec)
        graphdef, template = nnx.split(self.build(spec, embeddings.dim, options))
        params = params_from_arrays(arrays, template)
        prior = None
        if "prior/offset" in arrays:
            linear = arrays.get("prior/linear")
            prior = baselines.AffineResponse(jnp.asarray(arrays["prior/offset"]), None if linear is None else jnp.asarray(linear))
        return FlowMatchingState(graphdef, params, pd.DataFrame(), prior, subspace, outside)


def default_steps(n_groups: int) -> int:
    """Flow matching's default number of training steps for ``n_groups`` training groups.

    2,000 up to 142 groups; beyond, 14 per group rounded up to a multiple of 500 (so that the
    steps split into equal dispatches), at most 10,000. See :class:`FlowMatching`.
    """
    per_group = -(-STEPS_PER_GROUP * int(n_groups) // 500) * 500
    return int(min(MAX_DEFAULT_STEPS, max(FlowMatching.default_steps, per_group)))


def control_spread(data: PerturbationData) -> float:
    """Root mean square over features of the within-pool standard deviation of the control cells.

    The unit of flow matching's path noise: it makes ``sigma`` mean the same on PCA scores,
    z-scored image features or raw embeddings. Within the pools that training draws sources from
    (per patient, plate, ...), so that differences between them do not count as spread.
    """
    variances, weights = [], []
    for pool in np.unique(data.spec.groups["pool"].to_numpy()):
        index = data.pool_index[int(pool)]
        if len(index) >= 2:
            variances.append(data.cells[index].astype(np.float64).var(axis=0).mean())
            weights.append(len(index))
    if not variances:
        return 1.0
    spread = float(np.sqrt(np.average(variances, weights=weights)))
    return spread if spread > 0 else 1.0


def _combine_rule(rule: str, condition: Condition, spec: DataSpec, unseen_interaction: bool = True) -> str:
    """``"auto"``: integrate the summed fields for a combination of members trained together (the
    flow the loss fitted), and add each member's own displacement for a new combination (each
    member field then only sees positions along its own member's paths, where it was trained),
    plus the interaction field's guess unless ``unseen_interaction`` is off."""
    if rule != "auto":
        return rule
    if len(condition.members) < 2:
        return "velocities"  # the same prediction either way; this one compiles the smaller program
    seen = {c.members for c in spec.group_conditions}
    if condition.members in seen:
        return "velocities"
    return "displacements" if unseen_interaction else "members"
