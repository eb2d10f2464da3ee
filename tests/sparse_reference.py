"""Shared by the sparse-ring tests: seeded inputs, the striped shard of a rank, the four pattern kinds, and the
single-process masked attention (with autograd) every sparse ring must equal."""

from __future__ import annotations

import pytest
import torch

from sparsetron.parallel.context.patterns import (
    BlockPattern,
    block_topk,
    pool_blocks,
    sliding_window_sinks,
    strided,
    vertical_slash,
)

BLOCK, BATCH, HQ, HKV, D = 4, 2, 4, 2, 8
BLOCK_BYTES = 2 * BATCH * BLOCK * HKV * D * 4  # K and V of one block, fp32


#: What the Triton kernels need at least (a dot takes 16 × 16 tiles): the kernel variants of the tests use it.
KERNEL_BLOCK, KERNEL_D = 16, 16


def inputs(seq: int, seed: int, head_dim: int = D):
    """q ``[B, S, Hq, D]``, k, v ``[B, S, Hkv, D]`` and an output gradient, fp32."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, seq, HQ, head_dim, generator=g)
    k = torch.randn(BATCH, seq, HKV, head_dim, generator=g)
    v = torch.randn(BATCH, seq, HKV, head_dim, generator=g)
    return q, k, v, torch.randn(BATCH, seq, HQ, head_dim, generator=g)


def pattern_of(kind: str, q: torch.Tensor, k: torch.Tensor, block: int = BLOCK) -> BlockPattern:
    """One of the four pattern kinds (window, strided, topk, vertical_slash) for these inputs."""
    seq = q.shape[1]
    if kind == "window":
        return sliding_window_sinks(BATCH, HKV, seq, block, window_blocks=3, sink_blocks=1)
    if kind == "strided":
        return strided(BATCH, HKV, seq, block, stride=3, local_blocks=1)
    if kind == "topk":
        return block_topk(pool_blocks(q, block), pool_blocks(k, block), block, k=2)
    return vertical_slash(q[:, -8:], k, block, verticals=3, slashes=3)


def stripe(seq: int, world: int, rank: int, block: int = BLOCK) -> torch.Tensor:
    """Token positions of rank ``rank``'s striped blocks (block i on rank i mod W), in local order."""
    blocks = torch.arange(rank, seq // block, world)
    return (blocks[:, None] * block + torch.arange(block)[None, :]).reshape(-1)


def masked_attention(q, k, v, dout, pattern: BlockPattern) -> dict[str, torch.Tensor]:
    """Dense attention under ``pattern``'s token mask: out, lse and dq/dk/dv (autograd), fp32; any head counts
    (query heads grouped over ``Hq / Hkv`` KV heads)."""
    groups = q.shape[2] // k.shape[2]
    mask = pattern.token_mask(heads_per_group=groups)  # [B, Hq, S, S]
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    ke, ve = (t.repeat_interleave(groups, dim=2) for t in (k, v))
    logits = torch.einsum("bqhd,bkhd->bhqk", q, ke) * q.shape[-1] ** -0.5
    logits = logits.masked_fill(~mask, float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), ve)
    (out * dout).sum().backward()
    return {
        "out": out.detach(),
        "lse": logits.logsumexp(-1).detach(),
        "dq": q.grad,
        "dk": k.grad,
        "dv": v.grad,
    }


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute error relative to ``b``'s largest magnitude."""
    return float((a - b).detach().abs().max() / b.detach().abs().max().clamp(min=1e-30))


def _interpreter_skip_reason() -> str | None:
    from sparsetron.kernels.block_sparse import unsupported_reason

    return unsupported_reason(torch.zeros(1, KERNEL_D), KERNEL_BLOCK)


#: Marks tests of the Triton kernels on CPU tensors: they need the interpreter (conftest sets it; a GPU
#: machine that exports TRITON_INTERPRET=0 skips them and runs the GPU tests instead).
needs_interpreter = pytest.mark.skipif(
    _interpreter_skip_reason() is not None, reason=f"triton on CPU tensors: {_interpreter_skip_reason()}"
)
