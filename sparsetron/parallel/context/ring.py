"""Exact ring attention: K/V shards travel around the context-parallel group while each rank keeps its queries.

Forward: at step s rank r holds the K/V shard of rank (r − s) mod W; the next shard is already in flight
(double buffer, ``batch_isend_irecv``) while this one is computed, and each step's partial output and LSE are
merged in **fp32** — never in bf16, whose rounding would make the error grow with the ring size.

Backward: K/V travel the same way again, and with each shard travels its **fp32** dK/dV accumulator: every
rank adds its contribution and passes it on, and after W steps each accumulator arrives home complete. The
dK/dV hop of one step overlaps the next step's computation.

Causality, documents and windows come from global token indices, so every layout (contiguous, zigzag,
striped) works; blocks a rank cannot see are skipped by the kernel, K/V still pass through for the others.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from sparsetron.dist.comm import all_gather_equal, ring_shift
from sparsetron.kernels.attention import block_attention_backward, block_attention_forward
from sparsetron.kernels.attention_ref import merge_partials
from sparsetron.parallel.context.autograd_ops import gather_token_indices


def _source(rank: int, step: int, world: int) -> int:
    return (rank - step) % world


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_index_S, doc_ids_BS, group, causal, window, scale):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        # Indices and doc ids of every shard: small int tensors, gathered once instead of travelling each step.
        # The kernels plan on host-side indices; gathering them on the CPU avoids a device sync per step.
        indices = gather_token_indices(q_index_S, group=group, device=q.device).view(world, -1).unbind(0)
        docs = all_gather_equal(doc_ids_BS, group) if doc_ids_BS is not None else [None] * world
        kv = torch.stack([k, v]).contiguous()  # one message per step instead of two
        spare = torch.empty_like(kv)
        out, lse = None, None
        for step in range(world):
            pending = ring_shift(kv, spare, group) if step + 1 < world else []
            src = _source(rank, step, world)
            part_out, part_lse = block_attention_forward(
                q,
                kv[0],
                kv[1],
                indices[rank],
                indices[src],
                scale=scale,
                causal=causal,
                q_doc_BS=docs[rank],
                k_doc_BS=docs[src],
                window=window,
            )
            out, lse = merge_partials(out, lse, part_out, part_lse)
            for request in pending:
                request.wait()
            kv, spare = spare, kv
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.indices, ctx.docs, ctx.group = indices, docs, group
        ctx.causal, ctx.window, ctx.scale = causal, window, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, indices, docs = ctx.group, ctx.indices, ctx.docs
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        kv = torch.stack([k, v]).contiguous()
        kv_spare = torch.empty_like(kv)
        acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        dkv = torch.zeros(kv.shape, dtype=acc_dtype, device=kv.device)  # the accumulator of the shard in hand
        dkv_spare = torch.empty_like(dkv)
        dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
        dkv_pending: list = []
        for step in range(world):
            kv_pending = ring_shift(kv, kv_spare, group) if step + 1 < world else []
            src = _source(rank, step, world)
            part_dq, part_dk, part_dv = block_attention_backward(
                dout,
                q,
                kv[0],
                kv[1],
                out,
                lse,
                indices[rank],
                indices[src],
                scale=ctx.scale,
                causal=ctx.causal,
                q_doc_BS=docs[rank],
                k_doc_BS=docs[src],
                window=ctx.window,
            )
            dq += part_dq
            # The accumulator for this shard arrives from the previous holder while we computed.
            for request in dkv_pending:
                request.wait()
            if step > 0:
                dkv, dkv_spare = dkv_spare, dkv
            dkv[0] += part_dk
            dkv[1] += part_dv
            # Pass it on; after the last step this hop brings every accumulator home to its owner.
            dkv_pending = ring_shift(dkv, dkv_spare, group)
            for request in kv_pending:
                request.wait()
            kv, kv_spare = kv_spare, kv
        for request in dkv_pending:
            request.wait()
        dk, dv = dkv_spare[0], dkv_spare[1]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group,
    q_index_S: torch.Tensor,
    causal: bool = True,
    doc_ids_BS: torch.Tensor | None = None,
    window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact attention of this rank's queries over the whole sequence spread over ``group`` (ring P2P).

    q: [B, S_local, Hq, D]; k, v: [B, S_local, Hkv, D] (Hq % Hkv == 0; K/V travel with Hkv heads);
    q_index_S: int64 global token indices of this rank's tokens; doc_ids_BS: this rank's doc ids or None.
    Returns [B, S_local, Hq, D] in q's dtype. Differentiable. Communicates over ``group`` (W−1 K/V hops
    forward; W−1 K/V hops and W fp32 dK/dV hops backward).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _RingAttention.apply(q, k, v, q_index_S, doc_ids_BS, group, causal, window, scale)
