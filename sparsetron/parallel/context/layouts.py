"""How a sequence is split over the ranks of a context-parallel group, and back.

Three layouts, each a fixed permutation of the ``S`` global token indices into ``W`` equal shards:

- ``contiguous``: rank r holds ``[r·S/W, (r+1)·S/W)``. Simple, but causal work grows with r.
- ``zigzag``: the sequence is cut into ``2W`` chunks; rank r holds chunks ``r`` and ``2W−1−r``, so every
  rank does the same causal work (an early and a late chunk).
- ``striped``: blocks of ``block`` tokens dealt round-robin, rank r holds blocks ``r, r+W, r+2W, …``;
  every ring step then carries nearly the same causal work on every rank (used by sparse rings).

Each rank also needs the global index of every token it holds: causality, document boundaries and RoPE
positions are all defined on the unsharded sequence.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

LAYOUTS = ("contiguous", "zigzag", "striped")


class ShardingError(ValueError):
    """A sequence that cannot be split with the requested layout; the message names the sizes and a fix."""


def check_shardable(seq_len: int, world: int, layout: str, block: int = 1) -> None:
    """Raise :class:`ShardingError` unless ``seq_len`` splits evenly into ``world`` shards of ``layout``."""
    if layout not in LAYOUTS:
        raise ShardingError(f"layout={layout!r} is not one of {', '.join(LAYOUTS)}")
    if world < 1:
        raise ShardingError(f"the context-parallel group must have at least 1 rank, got {world}")
    unit = {"contiguous": world, "zigzag": 2 * world, "striped": world * block}[layout]
    if block < 1:
        raise ShardingError(f"striped block={block} must be a positive number of tokens")
    if seq_len % unit:
        rule = {
            "contiguous": f"cp = {world}",
            "zigzag": f"2 × cp = {unit}",
            "striped": f"cp × block = {world} × {block}",
        }
        fits = [
            name
            for name in LAYOUTS
            if seq_len % {"contiguous": world, "zigzag": 2 * world, "striped": world * block}[name] == 0
        ]
        hint = f"; layouts that fit: {', '.join(fits)}" if fits else ""
        raise ShardingError(
            f"sequence length {seq_len} is not divisible by {rule[layout]} for the {layout} layout; "
            f"pad or pick seq_len as a multiple of {unit}{hint}"
        )


def global_token_index(seq_len: int, rank: int, world: int, layout: str, block: int = 1) -> torch.Tensor:
    """Global indices (int64, ``[seq_len // world]``) of the tokens rank ``rank`` holds, in local order."""
    check_shardable(seq_len, world, layout, block)
    local = seq_len // world
    if layout == "contiguous":
        return torch.arange(rank * local, (rank + 1) * local)
    if layout == "zigzag":
        chunk = seq_len // (2 * world)
        first = torch.arange(rank * chunk, (rank + 1) * chunk)
        second = torch.arange((2 * world - 1 - rank) * chunk, (2 * world - rank) * chunk)
        return torch.cat([first, second])
    blocks = torch.arange(rank, seq_len // block, world)
    return (blocks[:, None] * block + torch.arange(block)[None, :]).flatten()


def _rank_world(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def shard_sequence(x: torch.Tensor, dim: int, group, layout: str = "zigzag", block: int = 1) -> torch.Tensor:
    """This rank's shard of ``x`` along ``dim`` (no communication: every rank holds the full ``x``).

    ``group`` is the context-parallel process group (None: the world). Differentiable (an index_select).
    """
    rank, world = _rank_world(group)
    index = global_token_index(x.shape[dim], rank, world, layout, block).to(x.device)
    return x.index_select(dim, index)


class _GatherSequence(torch.autograd.Function):
    """All-gather equal shards; backward all-reduces the gradient (every rank may use the whole result) and
    keeps this rank's shard."""

    @staticmethod
    def forward(ctx, x_local: torch.Tensor, dim: int, group, order: torch.Tensor) -> torch.Tensor:
        ctx.dim, ctx.group, ctx.order, ctx.local = dim, group, order, x_local.shape[dim]
        ctx.rank = dist.get_rank(group)
        pieces = [torch.empty_like(x_local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, x_local.contiguous(), group=group)
        stacked = torch.cat(pieces, dim=dim)
        full = torch.empty_like(stacked)
        full.index_copy_(dim, order.to(x_local.device), stacked)
        return full

    @staticmethod
    def backward(ctx, grad_full: torch.Tensor):
        grad = grad_full.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        mine = ctx.order[ctx.rank * ctx.local : (ctx.rank + 1) * ctx.local].to(grad.device)
        return grad.index_select(ctx.dim, mine), None, None, None


def unshard_sequence(
    x_local: torch.Tensor, dim: int, group, layout: str = "zigzag", block: int = 1
) -> torch.Tensor:
    """The full sequence on every rank from the shards of ``group`` (all-gather over ``group``).

    Differentiable: the gradient of every rank's use of the full tensor flows back to each shard.
    """
    world = dist.get_world_size(group)
    seq_len = x_local.shape[dim] * world
    order = torch.cat([global_token_index(seq_len, r, world, layout, block) for r in range(world)])
    return _GatherSequence.apply(x_local, dim, group, order)
