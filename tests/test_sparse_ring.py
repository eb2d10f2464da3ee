"""Sparse ring attention on 2 and 4 gloo ranks: output, LSE and gradients equal single-process masked attention
with the same block pattern (fp32, relative error ≤ 1e-5) for static, block top-k and vertical-slash patterns,
and the bytes sent per step are exactly the K/V blocks the pattern references."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from sparse_reference import (
    BATCH,
    BLOCK,
    HKV,
    KERNEL_BLOCK,
    KERNEL_D,
    D,
    inputs,
    masked_attention,
    needs_interpreter,
    pattern_of,
    rel,
    stripe,
)

from sparsetron.parallel.context.sparse_plan import plan_striped
from sparsetron.parallel.context.sparse_ring import SparseRingStats, sparse_ring_attention


def _run(kind: str, seq: int, seed: int, backend: str = "auto", block: int = BLOCK, head_dim: int = D):
    world, rank = dist.get_world_size(), dist.get_rank()
    q, k, v, dout = inputs(seq, seed, head_dim)
    pattern = pattern_of(kind, q, k, block)
    idx = stripe(seq, world, rank, block)
    ql, kl, vl = (t[:, idx].clone().requires_grad_() for t in (q, k, v))
    stats = SparseRingStats()
    out, lse = sparse_ring_attention(ql, kl, vl, pattern, stats=stats, backend=backend)
    (out * dout[:, idx]).sum().backward()
    return {"idx": idx, "out": out.detach(), "lse": lse, "dq": ql.grad, "dk": kl.grad, "dv": vl.grad,
            "forward_bytes": stats.forward_bytes}  # fmt: skip


def _reference(kind: str, seq: int, seed: int, block: int = BLOCK, head_dim: int = D):
    q, k, v, dout = inputs(seq, seed, head_dim)
    pattern = pattern_of(kind, q, k, block)
    return pattern, masked_attention(q, k, v, dout, pattern)


def _check(ranks, kind: str, world: int, backend: str = "auto", block: int = BLOCK, head_dim: int = D):
    seq, seed = 16 * block, 5
    per_rank = ranks.run(world, _run, kind, seq, seed, backend, block, head_dim, timeout=240)
    pattern, expected = _reference(kind, seq, seed, block, head_dim)
    got = {name: torch.zeros_like(expected[name]) for name in expected}
    for result in per_rank:
        idx = result["idx"]
        for name in ("out", "dq", "dk", "dv"):
            got[name][:, idx] = result[name]
        got["lse"][:, :, idx] = result["lse"]
    for name in expected:
        assert rel(got[name], expected[name]) <= 1e-5, (kind, world, name, rel(got[name], expected[name]))
    # Bytes: exactly the referenced K/V blocks of each step (K and V, fp32), nothing at step 0 (local).
    plan = plan_striped(pattern, world)
    block_bytes = 2 * BATCH * block * HKV * head_dim * 4
    for rank, result in enumerate(per_rank):
        expected_bytes = [0] + [
            len(plan.needed[s][(rank + s) % world]) * block_bytes for s in range(1, world)
        ]
        assert result["forward_bytes"] == expected_bytes, (rank, result["forward_bytes"], expected_bytes)
    assert sum(sum(r["forward_bytes"]) for r in per_rank) < (world - 1) * seq * 2 * BATCH * HKV * head_dim * 4


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", ["window", "strided", "topk", "vertical_slash"])
def test_sparse_ring_equals_masked_attention(ranks, kind, world):
    _check(ranks, kind, world, backend="reference")


@needs_interpreter
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", ["topk", "vertical_slash"])
def test_sparse_ring_with_the_triton_kernel(ranks, kind, world):
    """The same ring with each step's math in the block-sparse Triton kernel (bars: vertical_slash)."""
    _check(ranks, kind, world, backend="triton", block=KERNEL_BLOCK, head_dim=KERNEL_D)


def _through_the_api(seq: int, seed: int):
    from sparsetron.parallel.context.api import context_attention
    from sparsetron.parallel.context.layouts import shard_sequence

    world, rank = dist.get_world_size(), dist.get_rank()
    q, k, v, _ = inputs(seq, seed)
    pattern = pattern_of("topk", q, k)
    shard = [shard_sequence(t, 1, None, "striped", BLOCK) for t in (q, k, v)]
    assert torch.equal(shard[0], q[:, stripe(seq, world, rank)])  # the API's striped layout is the ring's
    via_api = context_attention(*shard, group=dist.group.WORLD, method="sparse_ring", layout="striped",
                                block=BLOCK, pattern=pattern)  # fmt: skip
    direct, _ = sparse_ring_attention(*shard, pattern)
    return torch.equal(via_api, direct)


def test_context_attention_runs_the_sparse_ring(ranks):
    assert ranks.run(2, _through_the_api, 8 * BLOCK, 3, timeout=120) == [True, True]
