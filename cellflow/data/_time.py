"""Training pairs beyond control pools: time courses (previous snapshots) and known partners."""

from __future__ import annotations

import dataclasses

import numpy as np

from cellflow.data._dataset import TIME_COLUMN, PerturbationData

__all__ = ["align_partners", "chain_snapshots"]


def chain_snapshots(data: PerturbationData) -> tuple[PerturbationData, np.ndarray]:
    """Pair every snapshot with the previous snapshot of the same condition and covariates.

    A time course is learned as consecutive intervals of one process: the first snapshot of a
    condition starts from its control pool at clock 0, every later one from the snapshot before
    it.

    Parameters
    ----------
    data
        Data prepared with a ``time_key``.

    Returns
    -------
    ``(chained, intervals)``: ``chained`` is ``data`` whose group ``g`` is paired with the cells
    of its previous snapshot (appended as extra pools), and ``intervals`` ``(G, 2)`` float32
    holds each group's ``(start, end)`` on the clock (:meth:`DataSpec.clock`).
    """
    spec = data.spec
    if spec.time_key is None:
        raise ValueError("chain_snapshots needs data prepared with a time_key.")
    groups = spec.groups
    clock = spec.clock(groups[TIME_COLUMN].to_numpy())
    identity = ["condition", "dose", *spec.covariate_keys]
    pools = list(data.pool_index)
    pool_of_group = groups["pool"].to_numpy().copy()
    intervals = np.zeros((len(groups), 2), np.float32)
    intervals[:, 1] = clock
    for _, frame in groups.groupby(identity, sort=False, observed=True):
        ordered = frame.index[np.argsort(clock[frame.index], kind="stable")]
        for previous, current in zip(ordered[:-1], ordered[1:]):
            pool_of_group[current] = len(pools)
            pools.append(data.group_index[previous])
            intervals[current, 0] = clock[previous]
    chained_groups = groups.copy()
    chained_groups["pool"] = pool_of_group
    chained_spec = dataclasses.replace(spec, groups=chained_groups)
    return dataclasses.replace(data, spec=chained_spec, pool_index=tuple(pools)), intervals


def align_partners(data: PerturbationData) -> PerturbationData:
    """Pair every group with the list of its treated cells' known partners, row for row.

    Returns ``data`` whose group ``g``'s pool (appended) holds, at position ``i``, the partner of
    the group's ``i``-th treated cell, so that drawing the same rows from both gives known pairs.
    """
    if data.partners is None:
        raise ValueError("align_partners needs data prepared with a pair_key.")
    pools = list(data.pool_index)
    pool_of_group = np.empty(data.n_groups, np.int64)
    for group, index in enumerate(data.group_index):
        pool_of_group[group] = len(pools)
        pools.append(data.partners[index])
    groups = data.spec.groups.copy()
    groups["pool"] = pool_of_group
    return dataclasses.replace(data, spec=dataclasses.replace(data.spec, groups=groups), pool_index=tuple(pools))
