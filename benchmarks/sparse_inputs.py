"""Shared by the sparse-attention benchmarks: patterns at a target block density, and flex_attention's view of them.

``calibrated(kind, q, k, block, density)`` estimates a ``block_topk`` or ``vertical_slash`` pattern from the
inputs, searching the budget (top-k blocks; slashes) until the block density (active blocks over the causal
triangle) is the closest to ``density``. Vertical-slash also keeps ``verticals`` key columns (bars), which
add work but no blocks. ``flex_block_mask`` builds the same pattern as a flex_attention ``BlockMask``: blocks
strictly below the diagonal and fully active are *full*, the diagonal block and bar-only blocks are *partial*
(evaluated with the exact token rule).
"""

from __future__ import annotations

import torch

from sparsetron.parallel.context.pattern_estimation import estimate_pattern
from sparsetron.parallel.context.patterns import BlockPattern


def estimate(kind: str, q, k, block: int, budget: int, verticals: int, group=None, layout_block=None):
    """``kind``'s pattern from this rank's q/k (``group``: the cp group, striped shards; None: whole sequence)."""
    if kind == "block_topk":
        options = {"k": budget, "local_blocks": 1}
    else:
        options = {
            "verticals": verticals,
            "slashes": budget,
            "last_q": 64,
            "sink_blocks": 1,
            "window_blocks": 1,
        }
    return estimate_pattern(
        kind, q, k, group, layout="striped", layout_block=layout_block or block, block=block, **options
    )


def calibrated(
    kind: str, q, k, block: int, density: float, verticals: int, group=None
) -> tuple[BlockPattern, int]:
    """The pattern whose block density is closest to ``density``, and its budget (bisection on the budget;
    density grows with it). Collective over ``group`` when given (every rank takes the same steps)."""
    low, high = 1, (q.shape[1] * (1 if group is None else torch.distributed.get_world_size(group))) // block
    best = None
    while low <= high:
        mid = (low + high) // 2
        pattern = estimate(kind, q, k, block, mid, verticals, group)
        got = pattern.density()
        if best is None or abs(got - density) < abs(best[0].density() - density):
            best = (pattern, mid)
        if got < density:
            low = mid + 1
        else:
            high = mid - 1
    return best


def flex_block_mask(pattern: BlockPattern, heads_q: int):
    """The pattern as a flex_attention ``BlockMask`` over ``heads_q`` query heads (GQA: head h uses KV head
    ``h // (heads_q / Hkv)``)."""
    from torch.nn.attention.flex_attention import BlockMask

    active = pattern.active_BHQK  # [B, Hkv, n, n]
    b, hkv, n, _ = active.shape
    block, group = pattern.block, heads_q // hkv
    idx = torch.arange(n, device=active.device)
    below = idx[None, :] < idx[:, None]
    full = active & below
    partial = active & ~below  # the diagonal (causal inside the block)
    bars_BHS = pattern.bars_BHS
    if bars_BHS is not None:
        bar_blocks = bars_BHS.reshape(b, hkv, n, block).any(-1)  # [B, Hkv, n]
        partial = partial | (bar_blocks[:, :, None, :] & ~active & (idx[None, :] <= idx[:, None]))

    def to_indices(mask):
        mask = mask.repeat_interleave(group, dim=1)
        counts = mask.sum(-1).to(torch.int32)
        # Active block ids first (stable), as flex expects the first ``count`` entries of each row.
        order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts, order

    def mask_mod(bi, hi, qi, ki):
        h = hi // group
        in_block = active[bi, h, qi // block, ki // block]
        if bars_BHS is not None:
            in_block = in_block | bars_BHS[bi, h, ki]
        return in_block & (ki <= qi)

    kv_num, kv_idx = to_indices(partial)
    full_num, full_idx = to_indices(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod)
