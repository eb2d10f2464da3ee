"""Estimating a block-sparse pattern under context parallelism, identically on every rank and every layout.

Each rank holds a shard of q and k (``sparsetron.parallel.context.layouts``). The estimators in
:mod:`.patterns` need global inputs, so the small things are gathered over the context-parallel group and put
back in global order before the (deterministic, fp32) estimation runs on every rank:

* ``block_topk``: each rank mean-pools its own blocks (a block never straddles ranks when the shard unit is a
  multiple of the block), all-gathers the pooled blocks (``1/block`` of q and k) and reorders them;
* ``vertical_slash``: q and k are gathered whole and the last ``last_q`` queries scored against every key
  (the reference path: it holds the sequence's q and k during estimation).

Because the gathered tensors are exact copies and the estimation code is the same, the pattern is bitwise the
same for cp = 1, 2, 4 … and for zigzag, striped or contiguous shards. No gradient flows through estimation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from sparsetron.parallel.context.layouts import global_token_index
from sparsetron.parallel.context.patterns import BlockPattern, block_topk, pool_blocks, vertical_slash


def _gather_global(x_BSHD: torch.Tensor, group, layout: str, block: int) -> torch.Tensor:
    """All shards of ``x`` (sequence dim 1) gathered over ``group`` and put in global token order."""
    world = dist.get_world_size(group)
    if world == 1:
        return x_BSHD
    parts = [torch.empty_like(x_BSHD) for _ in range(world)]
    dist.all_gather(parts, x_BSHD.contiguous(), group=group)
    seq = x_BSHD.shape[1] * world
    order = torch.cat([global_token_index(seq, r, world, layout, block) for r in range(world)])
    out = torch.empty((x_BSHD.shape[0], seq, *x_BSHD.shape[2:]), dtype=x_BSHD.dtype, device=x_BSHD.device)
    out[:, order.to(x_BSHD.device)] = torch.cat(parts, dim=1)
    return out


def _gather_pooled(x_BSHD: torch.Tensor, block: int, group, layout: str, layout_block: int) -> torch.Tensor:
    """Global-order pooled blocks ``[B, S/block, H, D]`` from each rank's locally pooled shard."""
    world = dist.get_world_size(group)
    seq = x_BSHD.shape[1] * world
    index = global_token_index(seq, dist.get_rank(group), world, layout, layout_block)
    starts = index.reshape(-1, block)
    # Local blocks must be whole, contiguous global blocks, or pooling here would mix tokens of two blocks.
    if not torch.equal(starts, starts[:, :1] + torch.arange(block)) or bool((starts[:, 0] % block).any()):
        raise ValueError(
            f"pattern block {block} does not fit the {layout} shards (each rank's run of consecutive tokens must be "
            "a multiple of the block); pick a block dividing the shard unit"
        )
    pooled = pool_blocks(x_BSHD, block)
    if world == 1:
        return pooled
    parts = [torch.empty_like(pooled) for _ in range(world)]
    dist.all_gather(parts, pooled.contiguous(), group=group)
    blocks = torch.cat(
        [global_token_index(seq, r, world, layout, layout_block)[::block] // block for r in range(world)]
    )
    out = torch.empty(
        (pooled.shape[0], seq // block, *pooled.shape[2:]), dtype=pooled.dtype, device=pooled.device
    )
    out[:, blocks.to(pooled.device)] = torch.cat(parts, dim=1)
    return out


@torch.no_grad()
def estimate_pattern(
    kind: str,
    q_BSHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    group=None,
    *,
    layout: str = "striped",
    layout_block: int = 1,
    block: int,
    **options,
) -> BlockPattern:
    """The global ``kind`` pattern (``block_topk`` or ``vertical_slash``) from this rank's shards of q
    ``[B, S_local, Hq, D]`` and k ``[B, S_local, Hkv, D]``; collective over the context-parallel ``group``
    (None: q and k hold whole sequences, nothing is gathered). ``options`` go to the estimator (``k``,
    ``local_blocks``; ``verticals``/``slashes``/``mass``, ``last_q`` …). Every rank returns the same pattern.
    """
    world = 1 if group is None else dist.get_world_size(group)
    if world == 1:
        layout, layout_block = "contiguous", 1
    if kind == "block_topk":
        if world == 1:
            return block_topk(pool_blocks(q_BSHD, block), pool_blocks(k_BSHD, block), block, **options)
        q_pooled = _gather_pooled(q_BSHD, block, group, layout, layout_block)
        k_pooled = _gather_pooled(k_BSHD, block, group, layout, layout_block)
        return block_topk(q_pooled, k_pooled, block, **options)
    if kind == "vertical_slash":
        last_q = options.pop("last_q", 64)
        q_all = q_BSHD if world == 1 else _gather_global(q_BSHD, group, layout, layout_block)
        k_all = k_BSHD if world == 1 else _gather_global(k_BSHD, group, layout, layout_block)
        return vertical_slash(q_all[:, -last_q:], k_all, block, **options)
    raise ValueError(f"kind={kind!r}: estimated patterns are block_topk and vertical_slash")
