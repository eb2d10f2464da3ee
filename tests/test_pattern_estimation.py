"""Pattern estimation under context parallelism: block top-k and vertical-slash patterns estimated from the
shards of 1, 2 and 4 gloo ranks, in zigzag, striped and contiguous layouts, are bitwise the pattern of the
whole sequence; vertical-slash in budget and mass mode, with the last queries spread over several ranks and
keys scored in small chunks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from sparsetron.parallel.context.layouts import global_token_index
from sparsetron.parallel.context.pattern_estimation import _vertical_slash_scores_sharded, estimate_pattern
from sparsetron.parallel.context.patterns import _vertical_slash_scores

SEQ, BLOCK, LAST_Q = 64, 4, 24
CASES = {
    "block_topk": ("block_topk", {"k": 3}),
    "vs_budget": ("vertical_slash", {"verticals": 3, "slashes": 2, "last_q": LAST_Q}),
    "vs_mass": ("vertical_slash", {"mass": 0.6, "last_q": LAST_Q}),
}
SHARDINGS = [(2, "zigzag", 1), (4, "zigzag", 1), (2, "striped", BLOCK), (4, "striped", BLOCK),
             (4, "contiguous", 1)]  # fmt: skip
#: Stripes of 1 token give every rank scattered keys; block top-k refuses them (it pools whole blocks).
SCATTERED = [(2, "striped", 1), (4, "striped", 1)]
PARAMS = [(case, *sharding) for case in CASES for sharding in SHARDINGS] + [
    (case, *sharding) for case in ("vs_budget", "vs_mass") for sharding in SCATTERED
]


def _inputs():
    g = torch.Generator().manual_seed(11)
    return torch.randn(2, SEQ, 4, 8, generator=g), torch.randn(2, SEQ, 2, 8, generator=g)


def _estimate(case: str, layout: str, layout_block: int, options: dict):
    world, rank = dist.get_world_size(), dist.get_rank()
    q, k = _inputs()
    kind, case_options = CASES[case]
    index = global_token_index(SEQ, rank, world, layout, layout_block)
    pattern = estimate_pattern(kind, q[:, index], k[:, index], dist.group.WORLD, layout=layout,
                               layout_block=layout_block, block=BLOCK, **case_options, **options)  # fmt: skip
    return pattern.active_BHQK, pattern.bars_BHS


@pytest.mark.parametrize(("case", "world", "layout", "layout_block"), PARAMS)
def test_estimation_is_identical_for_every_layout(ranks, case, world, layout, layout_block):
    kind, options = CASES[case]
    _assert_the_last_queries_are_spread(world, layout, layout_block)
    q, k = _inputs()
    whole = estimate_pattern(kind, q, k, block=BLOCK, **options)
    # Small key chunks on the ranks: the sums run in yet another order than in the whole-sequence estimate.
    extra = {"key_chunk": 8} if kind == "vertical_slash" else {}
    for active, bars in ranks.run(world, _estimate, case, layout, layout_block, extra, timeout=120):
        assert torch.equal(active, whole.active_BHQK)
        assert (bars is None and whole.bars_BHS is None) or torch.equal(bars, whole.bars_BHS)


def _assert_the_last_queries_are_spread(world: int, layout: str, layout_block: int) -> None:
    holders = [global_token_index(SEQ, r, world, layout, layout_block) >= SEQ - LAST_Q for r in range(world)]
    assert sum(bool(mine.any()) for mine in holders) > 1


@pytest.mark.parametrize(("world", "layout", "layout_block"), SHARDINGS + SCATTERED)
def test_sharded_vertical_slash_scores_round_to_the_same_fp32(ranks, world, layout, layout_block):
    """Stronger than equal patterns: the fp32 scores the selection sees are bitwise those of the whole
    sequence, although the fp64 sums ran in another order (key chunks of 8 and 5, several ranks)."""
    q, k = _inputs()
    whole = _vertical_slash_scores(q[:, -LAST_Q:], k, None, None)
    for key_chunk in (8, 5):
        for scores in ranks.run(world, _sharded_scores, layout, layout_block, key_chunk, timeout=120):
            for sharded, expected in zip(scores, whole, strict=True):
                assert torch.equal(sharded, expected.float())


def _sharded_scores(layout: str, layout_block: int, key_chunk: int):
    world, rank = dist.get_world_size(), dist.get_rank()
    q, k = _inputs()
    index = global_token_index(SEQ, rank, world, layout, layout_block)
    scores = _vertical_slash_scores_sharded(
        q[:, index], k[:, index], dist.group.WORLD, layout, layout_block, LAST_Q, None, key_chunk
    )
    return tuple(s.float() for s in scores)


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
