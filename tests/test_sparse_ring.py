"""Sparse ring attention on 2 and 4 gloo ranks: output, LSE and gradients equal single-process masked attention
with the same block pattern (fp32, relative error ≤ 1e-5) for static, block top-k and vertical-slash patterns,
and the bytes sent per step are exactly the K/V blocks the pattern references."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from sparsetron.parallel.context.patterns import (
    block_topk,
    pool_blocks,
    sliding_window_sinks,
    strided,
    vertical_slash,
)
from sparsetron.parallel.context.sparse_plan import plan_striped
from sparsetron.parallel.context.sparse_ring import SparseRingStats, sparse_ring_attention

BLOCK, BATCH, HQ, HKV, D = 4, 2, 4, 2, 8


def _inputs(seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, seq, HQ, D, generator=g)
    k = torch.randn(BATCH, seq, HKV, D, generator=g)
    v = torch.randn(BATCH, seq, HKV, D, generator=g)
    return q, k, v, torch.randn(BATCH, seq, HQ, D, generator=g)


def _pattern(kind: str, q, k):
    seq = q.shape[1]
    if kind == "window":
        return sliding_window_sinks(BATCH, HKV, seq, BLOCK, window_blocks=3, sink_blocks=1)
    if kind == "strided":
        return strided(BATCH, HKV, seq, BLOCK, stride=3, local_blocks=1)
    if kind == "topk":
        return block_topk(pool_blocks(q, BLOCK), pool_blocks(k, BLOCK), BLOCK, k=2)
    return vertical_slash(q[:, -8:], k, BLOCK, verticals=3, slashes=3)


def _stripe(seq: int, world: int, rank: int) -> torch.Tensor:
    blocks = torch.arange(rank, seq // BLOCK, world)
    return (blocks[:, None] * BLOCK + torch.arange(BLOCK)[None, :]).reshape(-1)


def _run(kind: str, seq: int, seed: int):
    world, rank = dist.get_world_size(), dist.get_rank()
    q, k, v, dout = _inputs(seq, seed)
    pattern = _pattern(kind, q, k)
    idx = _stripe(seq, world, rank)
    ql, kl, vl = (t[:, idx].clone().requires_grad_() for t in (q, k, v))
    stats = SparseRingStats()
    out, lse = sparse_ring_attention(ql, kl, vl, pattern, stats=stats)
    (out * dout[:, idx]).sum().backward()
    return {"idx": idx, "out": out.detach(), "lse": lse, "dq": ql.grad, "dk": kl.grad, "dv": vl.grad,
            "forward_bytes": stats.forward_bytes}  # fmt: skip


def _reference(kind: str, seq: int, seed: int):
    q, k, v, dout = _inputs(seq, seed)
    pattern = _pattern(kind, q, k)
    mask = pattern.token_mask(heads_per_group=HQ // HKV)  # [B, Hq, S, S]
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    ke, ve = (t.repeat_interleave(HQ // HKV, dim=2) for t in (k, v))
    logits = torch.einsum("bqhd,bkhd->bhqk", q, ke) * D**-0.5
    logits = logits.masked_fill(~mask, float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), ve)
    (out * dout).sum().backward()
    return pattern, {
        "out": out.detach(),
        "lse": logits.logsumexp(-1),
        "dq": q.grad,
        "dk": k.grad,
        "dv": v.grad,
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", ["window", "strided", "topk", "vertical_slash"])
def test_sparse_ring_equals_masked_attention(ranks, kind, world):
    seq, seed = 16 * BLOCK, 5
    per_rank = ranks.run(world, _run, kind, seq, seed, timeout=120)
    pattern, expected = _reference(kind, seq, seed)
    got = {name: torch.zeros_like(expected[name]) for name in expected}
    for result in per_rank:
        idx = result["idx"]
        for name in ("out", "dq", "dk", "dv"):
            got[name][:, idx] = result[name]
        got["lse"][:, :, idx] = result["lse"]
    for name in expected:
        assert _rel(got[name], expected[name]) <= 1e-5, (kind, world, name, _rel(got[name], expected[name]))
    # Bytes: exactly the referenced K/V blocks of each step (K and V, fp32), nothing at step 0 (local).
    plan = plan_striped(pattern, world)
    block_bytes = 2 * BATCH * BLOCK * HKV * D * 4
    for rank, result in enumerate(per_rank):
        expected_bytes = [0] + [
            len(plan.needed[s][(rank + s) % world]) * block_bytes for s in range(1, world)
        ]
        assert result["forward_bytes"] == expected_bytes, (rank, result["forward_bytes"], expected_bytes)
    assert sum(sum(r["forward_bytes"]) for r in per_rank) < (world - 1) * seq * 2 * BATCH * HKV * D * 4


def _through_the_api(seq: int, seed: int):
    from sparsetron.parallel.context.api import context_attention
    from sparsetron.parallel.context.layouts import shard_sequence

    world, rank = dist.get_world_size(), dist.get_rank()
    q, k, v, _ = _inputs(seq, seed)
    pattern = _pattern("topk", q, k)
    shard = [shard_sequence(t, 1, None, "striped", BLOCK) for t in (q, k, v)]
    assert torch.equal(shard[0], q[:, _stripe(seq, world, rank)])  # the API's striped layout is the ring's
    via_api = context_attention(*shard, group=dist.group.WORLD, method="sparse_ring", layout="striped",
                                block=BLOCK, pattern=pattern)  # fmt: skip
    direct, _ = sparse_ring_attention(*shard, pattern)
    return torch.equal(via_api, direct)


def test_context_attention_runs_the_sparse_ring(ranks):
    assert ranks.run(2, _through_the_api, 8 * BLOCK, 3, timeout=120) == [True, True]
