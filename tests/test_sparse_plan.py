"""The striped sparse-ring planner: per-rank per-step work of a pattern, its step imbalance, idle steps, and the
KV blocks each rank must receive at each step (only those referenced)."""

from __future__ import annotations

import pytest
import torch

from sparsetron.parallel.context.patterns import (
    block_topk,
    from_block_mask,
    pool_blocks,
    sliding_window_sinks,
)
from sparsetron.parallel.context.sparse_plan import plan_striped


def test_dense_causal_work_is_balanced_at_every_step():
    n, world = 64, 4
    pattern = from_block_mask(torch.ones(1, 2, n, n, dtype=torch.bool), block=8)
    plan = plan_striped(pattern, world)
    assert int(plan.work_RS.sum()) == int(pattern.active_BHQK.sum())
    assert plan.imbalance() <= 1.10, plan.work_RS
    assert plan.idle_steps() == []
    # Causal and dense: each rank needs all of the source's blocks at or before its last query block.
    assert plan.sent_blocks()[:, 0].sum() == 0  # step 0 is local


def test_a_local_window_idles_far_steps_and_sends_only_neighbours():
    n, world = 32, 4
    pattern = sliding_window_sinks(1, 1, seq=n * 4, block=4, window_blocks=2, sink_blocks=0)
    plan = plan_striped(pattern, world)
    assert plan.idle_steps() == [2, 3]
    sent = plan.sent_blocks()
    # The previous block of each query block (rank 0's first query block has none).
    assert sent[:, 2:].sum() == 0 and sent[:, 1].tolist() == [7, 8, 8, 8]
    assert plan.imbalance() == pytest.approx(1.0, abs=0.15)
    block_bytes = 2 * 4 * 128 * 2  # K and V, 4 tokens, 128 dims, bf16
    assert plan.bytes_per_step(block_bytes)[1] == 31 * block_bytes
    assert (
        plan.bytes_per_step(block_bytes).sum()
        < (world - 1) * world * plan.dense_bytes_per_step(block_bytes) // world
    )


def test_needed_blocks_are_exactly_the_referenced_ones():
    active = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    active[0, 0, 3, 0] = active[0, 0, 2, 2] = active[0, 0, 1, 0] = True
    plan = plan_striped(from_block_mask(active, 2), world=2)
    # Rank 1 holds query blocks 1 and 3; at step 1 it reads rank 0's key blocks: both reference block 0 only.
    assert plan.needed[1][1].tolist() == [0]
    assert plan.needed[1][0].tolist() == []  # rank 0's queries (0, 2) reference nothing on rank 1
    assert plan.work_RS.tolist() == [[1, 0], [0, 2]]


def test_bars_count_as_work_for_later_queries():
    active = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    pattern = from_block_mask(active, 2)
    bars = torch.zeros(1, 1, 8, dtype=torch.bool)
    bars[0, 0, 1] = True  # key column 1 (block 0) for every query
    plan = plan_striped(type(pattern)(pattern.active_BHQK, 2, True, bars), world=2)
    assert int(plan.work_RS.sum()) == 4  # every query block reads block 0


def test_block_topk_pattern_plans_and_refuses_ragged_stripes():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 96, 4, 8, generator=g), torch.randn(1, 96, 2, 8, generator=g)
    pattern = block_topk(pool_blocks(q, 8), pool_blocks(k, 8), 8, k=2)
    plan = plan_striped(pattern, world=4)
    assert int(plan.work_RS.sum()) == int(pattern.active_BHQK.sum())
    with pytest.raises(ValueError, match="multiples of the ring size 5"):
        plan_striped(pattern, world=5)
