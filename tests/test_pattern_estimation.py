"""Pattern estimation under context parallelism: block top-k and vertical-slash patterns estimated from the
shards of 1, 2 and 4 gloo ranks, in zigzag, striped and contiguous layouts, are bitwise the pattern of the
whole sequence."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from sparsetron.parallel.context.layouts import global_token_index
from sparsetron.parallel.context.pattern_estimation import estimate_pattern

SEQ, BLOCK = 64, 4
OPTIONS = {"block_topk": {"k": 3}, "vertical_slash": {"verticals": 3, "slashes": 2, "last_q": 8}}


def _inputs():
    g = torch.Generator().manual_seed(11)
    return torch.randn(2, SEQ, 4, 8, generator=g), torch.randn(2, SEQ, 2, 8, generator=g)


def _estimate(kind: str, layout: str):
    world, rank = dist.get_world_size(), dist.get_rank()
    q, k = _inputs()
    layout_block = BLOCK if layout == "striped" else 1
    index = global_token_index(SEQ, rank, world, layout, layout_block)
    pattern = estimate_pattern(kind, q[:, index], k[:, index], dist.group.WORLD, layout=layout,
                               layout_block=layout_block,
                               block=BLOCK, **OPTIONS[kind])  # fmt: skip
    return pattern.active_BHQK, pattern.bars_BHS


@pytest.mark.parametrize("kind", ["block_topk", "vertical_slash"])
@pytest.mark.parametrize(("world", "layout"), [(2, "zigzag"), (4, "zigzag"), (2, "striped"), (4, "striped"),
                                               (4, "contiguous")])  # fmt: skip
def test_estimation_is_identical_for_every_layout(ranks, kind, world, layout):
    q, k = _inputs()
    whole = estimate_pattern(kind, q, k, block=BLOCK, **OPTIONS[kind])
    for active, bars in ranks.run(world, _estimate, kind, layout, timeout=120):
        assert torch.equal(active, whole.active_BHQK)
        assert (bars is None and whole.bars_BHS is None) or torch.equal(bars, whole.bars_BHS)


def test_a_block_that_straddles_shards_is_refused(ranks):
    from multirank import RankFailure

    # zigzag on 4 ranks: runs of 8 consecutive tokens; a block of 16 would pool tokens of two runs.
    with pytest.raises(RankFailure, match="does not fit the zigzag shards"):
        ranks.run(4, _straddle, timeout=120)


def _straddle():
    world, rank = dist.get_world_size(), dist.get_rank()
    q, k = _inputs()
    index = global_token_index(SEQ, rank, world, "zigzag")
    estimate_pattern("block_topk", q[:, index], k[:, index], dist.group.WORLD, layout="zigzag", block=16, k=1)
