"""The multi-rank harness itself: results, error propagation, timeouts, crashes, recovery."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
from multirank import RankFailure, RankTimeout


def _rank_and_sum(offset: int) -> tuple[int, float]:
    t = torch.tensor([float(dist.get_rank() + offset)])
    dist.all_reduce(t)
    return dist.get_rank(), t.item()


def _fail_on(bad_rank: int) -> int:
    if dist.get_rank() == bad_rank:
        raise ValueError(f"boom on rank {bad_rank}")
    return dist.get_rank()


def _fail_then_others_block(bad_rank: int) -> None:
    """The bad rank raises before a collective; the others wait in it (as in a real bug)."""
    if dist.get_rank() == bad_rank:
        raise ArithmeticError("bad rank gave up before the all_reduce")
    dist.all_reduce(torch.ones(1))


def _hang_on(slow_rank: int) -> int:
    if dist.get_rank() == slow_rank:
        time.sleep(600)
    return dist.get_rank()


def _die_on(bad_rank: int) -> int:
    if dist.get_rank() == bad_rank:
        os._exit(17)
    return dist.get_rank()


def _returns_tensor() -> torch.Tensor:
    return torch.full((2, 3), float(dist.get_rank()))


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_results_come_back_in_rank_order(ranks, world):
    expected = float(sum(range(world)) + 5 * world)
    assert ranks.run(world, _rank_and_sum, 5) == [(r, expected) for r in range(world)]


def test_tensors_come_back(ranks):
    out = ranks.run(2, _returns_tensor)
    assert torch.equal(out[1], torch.ones(2, 3))


def test_a_raising_rank_reraises_its_traceback(ranks):
    with pytest.raises(RankFailure) as info:
        ranks.run(4, _fail_on, 2)
    message = str(info.value)
    assert "rank 2 of 4 failed" in message
    assert "ValueError: boom on rank 2" in message
    assert "_fail_on" in message  # the traceback, not just the message


def test_failure_is_reported_promptly_while_peers_block(ranks):
    start = time.monotonic()
    with pytest.raises(RankFailure, match="ArithmeticError: bad rank gave up") as info:
        ranks.run(4, _fail_then_others_block, 1, timeout=60)
    assert time.monotonic() - start < 30, "waited for the timeout instead of reporting the failure"
    assert "were still running and were stopped" in str(info.value)


def test_a_hang_times_out_with_stacks(ranks):
    start = time.monotonic()
    with pytest.raises(RankTimeout) as info:
        ranks.run(2, _hang_on, 1, timeout=3)
    elapsed = time.monotonic() - start
    assert 3 <= elapsed < 20
    message = str(info.value)
    assert "ranks [1] of 2 did not finish within 3s (finished: [0])" in message
    assert "_hang_on" in message  # the faulthandler dump shows where rank 1 was stuck


def test_a_dead_rank_is_reported(ranks):
    with pytest.raises(RankFailure, match="rank 3 died \\(exit code 17\\)"):
        ranks.run(4, _die_on, 3)


def test_pool_recovers_after_failures(ranks):
    for bad in (_fail_on, _die_on):
        with pytest.raises(RankFailure):
            ranks.run(2, bad, 0)
        assert ranks.run(2, _rank_and_sum, 0) == [(0, 1.0), (1, 1.0)]
