"""Check that a built mesh is wired as its layout says, with real collectives on every axis.

A miswired cluster (wrong rank order, a node joined twice, a bad interface) shows up here in seconds as a
clear error, instead of as wrong gradients hours into a run.
"""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist

from sparsetron.dist.errors import LayoutError
from sparsetron.dist.layout import ParallelMesh, mesh_axis_names


def verify_mesh(mesh: ParallelMesh, device: torch.device | str = "cpu") -> dict[str, list[int]]:
    """All-gather the rank ids over every mesh axis and compare with the layout's expected groups, in order.

    Collective over every group of ``mesh`` (each axis in turn); every rank must call it.
    Returns ``{axis: ranks of this rank's group in group order}``. Raises :class:`LayoutError` naming the axis,
    the expected group and what the collective saw.
    """
    rank = dist.get_rank()
    mine: dict[str, list[int]] = {}
    for axis in mesh_axis_names():
        expected = next(g for g in mesh.dims.groups_of(axis) if rank in g)
        group = mesh.group(axis)
        seen = [torch.empty(1, dtype=torch.int64, device=device) for _ in expected]
        if dist.get_world_size(group) != len(expected):
            raise LayoutError(
                f"mesh axis '{axis}' on rank {rank}: expected a group of {len(expected)} ranks {expected}, "
                f"the process group has {dist.get_world_size(group)}"
            )
        dist.all_gather(seen, torch.tensor([rank], device=device), group=group)
        got = [int(t.item()) for t in seen]
        if got != expected:
            raise LayoutError(
                f"mesh axis '{axis}' on rank {rank}: expected group {expected} (in this order), "
                f"an all-gather over its process group returned {got}"
            )
        mine[axis] = got
    return mine


def gather_topology(mesh: ParallelMesh, penv_local_rank: int) -> list[dict]:
    """Every rank's host, local rank and mesh coordinates, gathered on all ranks (collective over the world)."""
    me = {
        "rank": dist.get_rank(),
        "host": socket.gethostname(),
        "local_rank": penv_local_rank,
        "coords": {axis: mesh.coordinate(axis) for axis in mesh_axis_names()},
    }
    everyone: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, me)
    return everyone
