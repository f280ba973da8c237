"""A jit-friendly sampler of (source batch, target batch, condition) with fixed shapes.

Everything the sampler needs lives in :class:`TrainingArrays`, a PyTree of device arrays, so
sampling is a pure function of ``(arrays, key)`` that can run inside ``jax.jit`` and
``lax.scan`` without host round trips. Treated cells of all groups are stored back to back
(``target_index`` with ``group_start``/``group_size``), control pools likewise, so a batch is
drawn with two ``randint`` calls and two gathers.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cellflow._errors import CellflowValueError, format_choices
from cellflow.data._conditions import Condition
from cellflow.data._dataset import PerturbationData
from cellflow.data._embeddings import EmbeddingTable

__all__ = [
    "Batch",
    "ConditionArrays",
    "TrainingArrays",
    "build_training_arrays",
    "encode_condition",
    "sample_batch",
    "sample_batches",
]


class ConditionArrays(NamedTuple):
    """One condition as fixed-shape arrays, padded to ``max_members`` members.

    Attributes
    ----------
    members
        ``(K, e)`` embeddings of the members; zero rows where ``mask`` is False.
    doses
        ``(K,)`` dose of each member; 0 where ``mask`` is False.
    mask
        ``(K,)`` bool, True for real members.
    covariates
        ``(C,)`` int32 code of each covariate value (index into the sorted training values), -1
        for a value never seen in training.
    """

    members: jax.Array
    doses: jax.Array
    mask: jax.Array
    covariates: jax.Array


class Batch(NamedTuple):
    """A training batch drawn from one treated group.

    Attributes
    ----------
    source
        ``(B, d)`` control cells from the group's control pool.
    target
        ``(B, d)`` treated cells of the group.
    condition
        The group's condition (leading batch axes appear when batches are stacked).
    group
        Index of the group, int32 scalar.
    """

    source: jax.Array
    target: jax.Array
    condition: ConditionArrays
    group: jax.Array


class TrainingArrays(NamedTuple):
    """Device-resident training data (a PyTree), see :func:`build_training_arrays`.

    Every leaf is padded along its first axis (cells, groups, pools) to a length from a coarse
    grid (:func:`padded_length`), so that data sets of nearby sizes (cross-validation folds, a
    filtered copy, the same experiment next week) give the training program arguments of the
    same shapes and share its compilation. Padding is never drawn: padded groups have
    probability 0 and no cells, and every cell index a sampler forms stays below
    ``group_start + group_size`` (``pool_start + pool_size``), which counts real cells only.
    :attr:`n_groups` counts the real groups.
    """

    cells: jax.Array
    target_index: jax.Array
    group_start: jax.Array
    group_size: jax.Array
    source_index: jax.Array
    pool_start: jax.Array
    pool_size: jax.Array
    group_pool: jax.Array
    conditions: ConditionArrays  # leading axis: groups
    group_probs: jax.Array

    @property
    def n_groups(self) -> int:
        """Number of real (not padded) treated groups."""
        return int(np.count_nonzero(np.asarray(self.group_size)))


def encode_condition(
    condition: Condition,
    covariates: Sequence[str | None],
    embeddings: EmbeddingTable,
    covariate_values: dict[str, tuple[str, ...]],
    max_members: int,
) -> ConditionArrays:
    """Fixed-shape arrays of one condition (numpy, to be stacked or sent to device).

    Raises
    ------
    CellflowKeyError
        A member has no embedding (see :meth:`EmbeddingTable.index`).
    CellflowValueError
        The condition has more members than ``max_members``.
    """
    k = len(condition)
    if k > max_members:
        raise CellflowValueError(
            f"condition {condition.label!r} has {k} members, more than the {max_members} the model was built for."
        )
    members = np.zeros((max_members, embeddings.dim), dtype=np.float32)
    doses = np.zeros(max_members, dtype=np.float32)
    mask = np.zeros(max_members, dtype=bool)
    if k:
        members[:k] = embeddings.lookup(condition.members)
        doses[:k] = condition.doses
        mask[:k] = True
    codes = np.array(
        [
            values.index(v) if v in values else -1
            for v, values in zip(covariates, covariate_values.values())
        ],
        dtype=np.int32,
    )
    return ConditionArrays(members, doses, mask, codes)


#: Lengths below this are padded to it; above it, to a multiple of an eighth of their power of two.
_MIN_PADDED_LENGTH = 64


def padded_length(n: int) -> int:
    """The length to which :func:`build_training_arrays` pads an axis of ``n`` entries.

    The smallest multiple of ``2**floor(log2(n)) / 8`` (and of 64) that holds ``n``: eight
    sizes per doubling, so padding adds at most 12.5 % and sizes within a few percent of each
    other usually share one.
    """
    if n <= _MIN_PADDED_LENGTH:
        return _MIN_PADDED_LENGTH
    step = max(_MIN_PADDED_LENGTH, (1 << (int(n).bit_length() - 1)) // 8)
    return -(-int(n) // step) * step


def _pad_rows(array: np.ndarray) -> np.ndarray:
    length = padded_length(len(array))
    if length == len(array):
        return array
    padded = np.zeros((length, *array.shape[1:]), dtype=array.dtype)
    padded[: len(array)] = array
    return padded


def _concatenate(index_lists: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sizes = np.array([len(i) for i in index_lists], dtype=np.int32)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
    return np.concatenate(index_lists).astype(np.int32), starts, sizes


def build_training_arrays(
    data: PerturbationData,
    embeddings: EmbeddingTable,
    *,
    group_weighting: str = "uniform",
    max_members: int | None = None,
) -> TrainingArrays:
    """Move prepared data to device as a :class:`TrainingArrays` PyTree.

    Parameters
    ----------
    data
        Prepared data (:func:`cellflow.data.prepare`).
    embeddings
        Perturbation embeddings covering the training vocabulary.
    group_weighting
        ``"uniform"`` draws every treated group equally often; ``"size"`` in proportion to its
        number of cells.
    max_members
        Padding size of combinations; defaults to the largest combination in ``data``.
    """
    weightings = ("uniform", "size")
    if group_weighting not in weightings:
        raise CellflowValueError(f"group_weighting={group_weighting!r} is invalid; valid choices: {format_choices(weightings)}.")
    spec = data.spec
    max_members = spec.max_members if max_members is None else max_members
    target_index, group_start, group_size = _concatenate(data.group_index)
    source_index, pool_start, pool_size = _concatenate(data.pool_index)
    encoded = [
        encode_condition(c, cov, embeddings, spec.covariate_values, max_members)
        for c, cov in zip(spec.group_conditions, spec.group_covariates)
    ]
    conditions = ConditionArrays(*(np.stack(parts) for parts in zip(*encoded)))
    probs = group_size.astype(np.float32) if group_weighting == "size" else np.ones(len(group_size), np.float32)
    # padded groups have probability 0 (never drawn; jax.random.choice draws the real ones
    # exactly as without them) and no cells; padded pools, no cells
    arrays = TrainingArrays(
        cells=_pad_rows(data.cells),
        target_index=_pad_rows(target_index),
        group_start=_pad_rows(group_start),
        group_size=_pad_rows(group_size),
        source_index=_pad_rows(source_index),
        pool_start=_pad_rows(pool_start),
        pool_size=_pad_rows(pool_size),
        group_pool=_pad_rows(spec.groups["pool"].to_numpy(np.int32)),
        conditions=ConditionArrays(*(_pad_rows(leaf) for leaf in conditions)),
        group_probs=_pad_rows(probs / probs.sum()),
    )
    # a transfer per leaf; jnp.asarray would compile a copy per leaf shape in a fresh process
    return jax.device_put(arrays)


@partial(jax.jit, static_argnames=("batch_size",))
def sample_batch(arrays: TrainingArrays, key: jax.Array, batch_size: int) -> Batch:
    """Draw one batch: a group, then ``batch_size`` of its cells and of its controls (with replacement).

    Parameters
    ----------
    arrays
        Training arrays.
    key
        PRNG key.
    batch_size
        Number of source and of target cells (static).

    Returns
    -------
    A :class:`Batch` with ``source``/``target`` of shape ``(batch_size, d)``.
    """
    key_group, key_target, key_source = jax.random.split(key, 3)
    group = jax.random.choice(key_group, arrays.group_start.shape[0], p=arrays.group_probs)
    offsets = jax.random.randint(key_target, (batch_size,), 0, arrays.group_size[group])
    target = arrays.cells[arrays.target_index[arrays.group_start[group] + offsets]]
    pool = arrays.group_pool[group]
    offsets = jax.random.randint(key_source, (batch_size,), 0, arrays.pool_size[pool])
    source = arrays.cells[arrays.source_index[arrays.pool_start[pool] + offsets]]
    condition = jax.tree.map(lambda leaf: leaf[group], arrays.conditions)
    return Batch(source, target, condition, group.astype(jnp.int32))


@partial(jax.jit, static_argnames=("batch_size", "n_groups"))
def sample_batches(arrays: TrainingArrays, key: jax.Array, batch_size: int, n_groups: int) -> Batch:
    """``n_groups`` independent batches stacked on a leading axis (shapes ``(n_groups, batch_size, d)``)."""
    return jax.vmap(sample_batch, in_axes=(None, 0, None))(arrays, jax.random.split(key, n_groups), batch_size)
