"""Small communication helpers; the process group is always an argument."""

from __future__ import annotations

import torch
import torch.distributed as dist


def ring_neighbours(group) -> tuple[int, int]:
    """Global ranks of the next and previous member of ``group`` (None: the world), in group rank order."""
    group = group if group is not None else dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    return dist.get_global_rank(group, (rank + 1) % world), dist.get_global_rank(group, (rank - 1) % world)


def ring_shift(send: torch.Tensor, recv: torch.Tensor, group) -> list[dist.Work]:
    """Post ``send`` to the next rank of ``group`` and receive the previous rank's into ``recv`` (async).

    Both tensors must be contiguous and of equal shape on every rank. Returns the requests to ``wait()``;
    computation issued before waiting overlaps with the transfer. Communicates over ``group``.
    """
    nxt, prev = ring_neighbours(group)
    ops = [dist.P2POp(dist.isend, send, nxt, group), dist.P2POp(dist.irecv, recv, prev, group)]
    return dist.batch_isend_irecv(ops)


def all_gather_equal(x: torch.Tensor, group) -> list[torch.Tensor]:
    """Every member's ``x`` (equal shapes), in group rank order. Communicates over ``group``."""
    pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, x.contiguous(), group=group)
    return pieces
