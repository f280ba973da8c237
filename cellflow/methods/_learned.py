"""Machinery shared by the learned methods (flow matching, Schrödinger bridge, neural OT,
diffusion): building the response field, saving parameters, describing and running the training
loop, validation splits and scoring, and padding predictions to shared lengths."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cellflow._errors import CellflowValueError
from cellflow.data import DataSpec, PerturbationData, encode_condition
from cellflow.methods import _subspace as subspaces
from cellflow.methods._options import training_loop_options
from cellflow.nn import ResponseField
from cellflow.solvers import baselines
from cellflow.solvers import flow_matching as fm
from cellflow.solvers import subspace as principal
from cellflow.train import chunk_size, run_training


def build_response_field(spec: DataSpec, embedding_dim: int, options: Mapping[str, Any], seed: int = 0) -> ResponseField:
    """A :class:`ResponseField` sized for ``spec`` from the architecture options shared by the
    methods built on it (``width``, ``depth``, ``token_dim``, ``context_dim``,
    ``population_encoder``, ``pooling``, ``field``, ``conditioning``, ``dropout``, ``centre``)."""
    return ResponseField(
        spec.n_features,
        embedding_dim,
        tuple(len(v) for v in spec.covariate_values.values()),
        width=options["width"],
        depth=options["depth"],
        token_dim=options["token_dim"],
        context_dim=options["context_dim"],
        population=options["population_encoder"],
        pooling=options["pooling"],
        field=options["field"],
        film=options["conditioning"] == "film",
        dropout_rate=float(options["dropout"]),
        centre=options["centre"],
        rngs=nnx.Rngs(seed),
    )


def params_to_arrays(params: Any) -> dict[str, np.ndarray]:
    """Flatten a parameter PyTree into ``{key path: array}`` for saving."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def params_from_arrays(arrays: Mapping[str, np.ndarray], template: Any) -> Any:
    """Inverse of :func:`params_to_arrays`, shaped like ``template``; an array of another shape
    (a model saved with other options or on other data) raises rather than running misshapen.
    Arrays that are not parameters (a method's other saved state) are left alone."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    restored = []
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        array = np.asarray(arrays[name])
        if array.shape != tuple(leaf.shape):
            raise CellflowValueError(
                f"saved parameter {name} has shape {array.shape}, but the model built from the saved options "
                f"expects {tuple(leaf.shape)}."
            )
        restored.append(jnp.asarray(array))
    return jax.tree_util.tree_unflatten(treedef, restored)


def run_description(
    data: PerturbationData, options: Mapping[str, Any], *, subspace: principal.Subspace | None = None, **fit_arguments: Any
) -> dict[str, Any]:
    """What makes a training run what it is, as JSON for its checkpoints: the options (except
    where and how it dispatches and checkpoints; for ``subspace`` the choice made, see
    :func:`~cellflow.methods._subspace.subspace_run_description`), the fit's arguments and a
    digest of the data's description (groups, vocabulary, covariates)."""
    loop_only = set(training_loop_options()) | {"subspace"}
    described = {k: v for k, v in options.items() if k not in loop_only}
    described.update(subspaces.subspace_run_description(subspace))
    described.update(fit_arguments)
    described["data"] = hashlib.sha256(data.spec.to_json().encode()).hexdigest()[:16]
    return json.loads(json.dumps(described, default=str))


def train_with_options(train_chunk, state, steps: int, options: Mapping[str, Any], *, resume: bool, progress: bool,
                       description: str, evaluate=None, run: Mapping[str, Any] | None = None):
    """:func:`cellflow.train.run_training` with the loop options every learned method shares
    (``chunk``, ``eval_every``, ``patience``, ``checkpoint_dir``, ``checkpoint_every``); ``run``
    (see :func:`run_description`) guards resumes against another run's checkpoints."""
    return run_training(
        train_chunk,
        state,
        steps,
        chunk_size(steps, options["chunk"]),
        evaluate=evaluate,
        eval_every=options["eval_every"],
        patience=options["patience"],
        checkpoint_dir=options["checkpoint_dir"],
        checkpoint_every=options["checkpoint_every"],
        resume=resume,
        progress=progress,
        description=description,
        run=run,
    )


def bucket(n: int) -> int:
    """Pad cell counts to powers of two (>= 256) so that predictions reuse compiled code."""
    return max(256, 1 << (int(n) - 1).bit_length())


def known_covariates(spec: DataSpec, covariates: tuple[str | None, ...]) -> tuple[str | None, ...]:
    """Covariate values never seen with treated cells are unknown to the model (a new patient)."""
    known = [set(spec.groups[key]) for key in spec.covariate_keys]
    return tuple(v if v in k else None for v, k in zip(covariates, known))


def split_validation(data: PerturbationData, fraction: float, rng: np.random.Generator):
    """Hold out ``fraction`` of each group's treated cells (groups keep at least 2 training cells)."""
    train, held = [], []
    for index in data.group_index:
        shuffled = rng.permutation(index)
        n_val = min(int(round(fraction * len(index))), max(len(index) - 2, 0))
        held.append(shuffled[:n_val])
        train.append(shuffled[n_val:])
    return dataclasses.replace(data, group_index=tuple(train)), dataclasses.replace(data, group_index=tuple(held))


def validation_scorer(
    graphdef, validation: PerturbationData, embeddings, spec, batch_size, rng, prior=None, max_groups: int = 32, move=None,
    combine: str = "velocities",
):
    """``ema -> mean energy distance`` over up to ``max_groups`` held-out groups (one jitted call).

    ``move(graphdef, params, start, condition, source) -> prediction`` pushes one group's batch;
    the default integrates the flow-matching ODE with 8 Euler steps, combining members by ``combine``.
    """
    groups = [g for g, index in enumerate(validation.group_index) if len(index) >= 2]
    groups = sorted(rng.choice(groups, size=min(max_groups, len(groups)), replace=False).tolist()) if groups else []
    if not groups:
        return None
    if move is None:
        def move(graphdef, params, start, condition, source):
            return fm.integrate(graphdef, params, start, condition, source, "euler", 8, combine=combine)

    def draw(cells: np.ndarray) -> np.ndarray:
        return cells[rng.integers(0, len(cells), batch_size)]

    sources = np.stack([draw(validation.source_cells(g)) for g in groups])
    targets = np.stack([draw(validation.target_cells(g)) for g in groups])
    starts = sources
    if prior is not None:
        starts = np.stack([np.asarray(baselines.push_group(prior, jnp.asarray(x), g)) for x, g in zip(sources, groups)])
    encoded = [
        encode_condition(
            spec.group_conditions[g], spec.group_covariates[g], embeddings, spec.covariate_values, spec.max_members
        )
        for g in groups
    ]
    conditions = jax.tree.map(lambda *leaves: jnp.asarray(np.stack(leaves)), *encoded)

    @jax.jit
    def score(params, starts, sources, targets, conditions):
        def one(start, source, target, condition):
            return fm.energy_distance(move(graphdef, params, start, condition, source), target)

        return jnp.mean(jax.vmap(one)(starts, sources, targets, conditions))

    return lambda params: score(params, jnp.asarray(starts), jnp.asarray(sources), jnp.asarray(targets), conditions)
