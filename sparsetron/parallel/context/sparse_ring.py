"""Sparse ring attention: block-sparse attention over a striped context-parallel layout, moving only the KV
blocks the pattern references.

Layout: the sequence is cut into blocks of ``pattern.block`` tokens, block ``i`` living on rank ``i mod W``
(:mod:`.sparse_plan`); a rank's tensors hold its blocks in increasing order. The pattern is global and the
same on every rank (estimated from gathered inputs, :mod:`.patterns`), so every rank computes the same
:class:`~.sparse_plan.StripedPlan` and knows, without asking, which of its blocks each peer needs at each step:
no request exchange, no metadata on the wire. At step ``s`` rank ``r`` sends rank ``r + s`` exactly the K/V
blocks that rank's queries reference and receives from rank ``r − s`` the ones its own queries reference;
steps where neither has any are skipped. Each step's partial output and LSE merge exactly (fp32); the backward
recomputes each step's share from the global output and LSE (FlashAttention-2 style) and returns the K/V
gradients of received blocks to their owners over the reverse links.

Each step's local math is :class:`~.sparse_compute.StepAttention`: the block-sparse Triton kernels on CUDA
(merging each step into the running output in place), the exact fp32 reference elsewhere. The ring keeps the
K/V blocks it received for the backward (memory O(referenced blocks)).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from sparsetron.parallel.context.patterns import BlockPattern
from sparsetron.parallel.context.sparse_compute import StepAttention, resolve_backend, token_index
from sparsetron.parallel.context.sparse_plan import StripedPlan, plan_striped


@dataclass
class SparseRingStats:
    """What one call moved: K/V bytes this rank sent at each step of the forward and of the backward."""

    forward_bytes: list[int] = field(default_factory=list)
    backward_bytes: list[int] = field(default_factory=list)


def _local_positions(global_blocks: torch.Tensor, world: int, block: int) -> torch.Tensor:
    """Positions, in this rank's local tensors, of the tokens of its own ``global_blocks``."""
    return token_index(global_blocks // world, block)


def _exchange(
    send: torch.Tensor | None,
    recv_shape: tuple[int, ...] | None,
    dst: int,
    src: int,
    group,
    like: torch.Tensor,
) -> torch.Tensor | None:
    """Send ``send`` to ``dst`` and receive a tensor of ``recv_shape`` from ``src`` (either may be absent)."""
    requests, received = _post(send, recv_shape, dst, src, group, like)
    for request in requests:
        request.wait()
    return received


def _post(
    send: torch.Tensor | None,
    recv_shape: tuple[int, ...] | None,
    dst: int,
    src: int,
    group,
    like: torch.Tensor,
) -> tuple[list, torch.Tensor | None]:
    """:func:`_exchange` without the wait: the pending requests and the buffer they will fill."""
    received = None if recv_shape is None else torch.empty(recv_shape, dtype=like.dtype, device=like.device)
    ops = []
    if send is not None:
        ops.append(dist.P2POp(dist.isend, send.contiguous(), dist.get_global_rank(group, dst), group))
    if received is not None:
        ops.append(dist.P2POp(dist.irecv, received, dist.get_global_rank(group, src), group))
    return (dist.batch_isend_irecv(ops) if ops else []), received


class _SparseRing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pattern: BlockPattern, plan: StripedPlan, group, scale: float, stats, backend):
        world, rank = plan.world, dist.get_rank(group)
        block, batch = pattern.block, q.shape[0]
        hkv = k.shape[2]
        my_q = torch.arange(rank, pattern.active_BHQK.shape[2], world, device=q.device)
        attend = StepAttention(pattern, my_q, scale, backend)
        out, lse, received = None, None, []
        for step in range(world):
            dst, src = (rank + step) % world, (rank - step) % world
            want, give = plan.needed[step][rank].to(q.device), plan.needed[step][dst].to(q.device)
            if step == 0:
                kv = torch.stack([k, v])[:, :, _local_positions(want, world, block)]
                sent = 0
            else:
                send = torch.stack([k, v])[:, :, _local_positions(give, world, block)] if len(give) else None
                shape = (2, batch, len(want) * block, hkv, k.shape[3]) if len(want) else None
                kv = _exchange(send, shape, dst, src, group, k)
                sent = 0 if send is None else send.numel() * send.element_size()
            if stats is not None:
                stats.forward_bytes.append(sent)
            received.append((want, kv))
            if kv is None or not len(want):
                continue
            out, lse = attend.forward(q, kv, want, out, lse)
        if out is None:  # no query of this rank sees any key
            out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
            lse = torch.full((batch, q.shape[2], q.shape[1]), float("-inf"), device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.received, ctx.pattern, ctx.plan, ctx.group, ctx.stats, ctx.attend = (
            received, pattern, plan, group, stats, attend,
        )  # fmt: skip
        ctx.mark_non_differentiable(lse)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        pattern, plan, group, stats, attend = ctx.pattern, ctx.plan, ctx.group, ctx.stats, ctx.attend
        world, rank = plan.world, dist.get_rank(group)
        block, batch = pattern.block, q.shape[0]
        hkv = k.shape[2]
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dkv = torch.zeros((2, *k.shape), dtype=acc, device=q.device)
        for step in range(world):
            dst, src = (rank + step) % world, (rank - step) % world
            want, kv = ctx.received[step]
            grads = None
            if kv is not None and len(want):
                grads = attend.backward(dout, q, kv, want, out, lse, dq)
            if step == 0:
                if grads is not None:
                    dkv[:, :, _local_positions(want, world, block)] += grads
                continue
            # K/V gradients of what we received go back to its owner (src); ours come back from dst.
            mine = plan.needed[step][dst].to(q.device)
            shape = (2, batch, len(mine) * block, hkv, k.shape[3]) if len(mine) else None
            back = _exchange(grads, shape, src, dst, group, dq)
            if stats is not None:
                stats.backward_bytes.append(0 if grads is None else grads.numel() * grads.element_size())
            if back is not None:
                dkv[:, :, _local_positions(mine, world, block)] += back
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None, None


def sparse_ring_attention(
    q_BSHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    v_BSHD: torch.Tensor,
    pattern: BlockPattern,
    group: dist.ProcessGroup | None = None,
    *,
    scale: float | None = None,
    plan: StripedPlan | None = None,
    stats: SparseRingStats | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention of this rank's striped blocks: ``(out_BSHD, lse_BHS)``; collective over ``group``.

    q: ``[B, S_local, Hq, D]``, k/v: ``[B, S_local, Hkv, D]`` (Hq % Hkv == 0) holding this rank's blocks of the
    stripe (global block ``t·W + rank`` at local block ``t``); ``pattern``: the global pattern, identical on
    every rank; ``plan``: :func:`plan_striped` of it (computed when not given). Differentiable in q, k, v;
    ``lse`` (fp32) is not. ``stats`` (optional) records the bytes sent per step. ``backend``: each step's
    local math (:mod:`.sparse_compute`: ``auto``, ``triton`` or ``reference``).
    """
    group = group or dist.group.WORLD
    plan = checked_plan(q_BSHD, k_BSHD, pattern, dist.get_world_size(group), plan)
    scale = scale if scale is not None else q_BSHD.shape[-1] ** -0.5
    backend = resolve_backend(backend, q_BSHD, pattern.block)
    return _SparseRing.apply(q_BSHD, k_BSHD, v_BSHD, pattern, plan, group, scale, stats, backend)


def checked_plan(
    q_BSHD: torch.Tensor, k_BSHD: torch.Tensor, pattern: BlockPattern, world: int, plan: StripedPlan | None
) -> StripedPlan:
    """``plan`` (or :func:`plan_striped` of ``pattern``), after checking it and the shards fit ``world`` ranks."""
    plan = plan or plan_striped(pattern, world)
    if plan.world != world:
        raise ValueError(f"plan is for {plan.world} ranks, the group has {world}")
    local_blocks = pattern.active_BHQK.shape[2] // world
    if q_BSHD.shape[1] != local_blocks * pattern.block or k_BSHD.shape[1] != q_BSHD.shape[1]:
        raise ValueError(
            f"this rank holds {q_BSHD.shape[1]} query and {k_BSHD.shape[1]} key tokens; the pattern's stripe "
            f"is {local_blocks} blocks of {pattern.block} tokens each"
        )
    return plan
