"""Hybrid (2-D) context parallelism: Ulysses all-to-all inside a node × ring attention across nodes (USP).

The sequence is sharded over all ``R × U`` context-parallel ranks. Inside each Ulysses group (``U`` ranks,
node-local, fast links) an all-to-all turns sequence shards into head shards, so each rank holds its group's
tokens for ``Hq / U`` heads; a ring over the ``R`` groups (slower inter-node links) then computes exact
attention over the whole sequence for those heads; a second all-to-all brings outputs back to sequence shards.
With the zigzag layout over all ``R·U`` ranks, the tokens a Ulysses group gathers form a zigzag pair of the
ring, so the causal work stays balanced.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from sparsetron.parallel.context.autograd_ops import SeqToHeads, gather_doc_ids, gather_token_indices
from sparsetron.parallel.context.ring import ring_attention
from sparsetron.parallel.context.ulysses import check_ulysses_heads


class _Redistribute(torch.autograd.Function):
    """``mapping.forward`` with its adjoint as the gradient (a linear collective, see autograd_ops)."""

    @staticmethod
    def forward(ctx, x, mapping):
        ctx.mapping, ctx.dtype = mapping, x.dtype
        return mapping.forward(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.mapping.adjoint(grad.contiguous(), ctx.dtype), None


class _Undistribute(torch.autograd.Function):
    """``mapping.adjoint`` (for a permutation: the inverse) with ``mapping.forward`` as the gradient."""

    @staticmethod
    def forward(ctx, x, mapping, dtype):
        ctx.mapping = mapping
        return mapping.adjoint(x, dtype)

    @staticmethod
    def backward(ctx, grad):
        return ctx.mapping.forward(grad.contiguous()), None, None


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    ring_group,
    ulysses_group,
    q_index_S: torch.Tensor,
    causal: bool = True,
    doc_ids_BS: torch.Tensor | None = None,
    window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact attention with Ulysses over ``ulysses_group`` and a ring over ``ring_group``.

    q: [B, S_local, Hq, D]; k, v: [B, S_local, Hkv, D]; q_index_S: global indices of this rank's tokens
    (the layout over all ring × Ulysses ranks, cp rank = ring rank · U + Ulysses rank). Returns
    [B, S_local, Hq, D] in q's dtype; differentiable. Communicates over ``ulysses_group`` (all-to-alls of
    q, k, v, out and their gradients; small all-gathers of indices and doc ids) and ``ring_group`` (P2P ring).
    """
    check_ulysses_heads(q.shape[2], k.shape[2], dist.get_world_size(ulysses_group))
    q_map = SeqToHeads(ulysses_group, q.shape[2])
    kv_map = SeqToHeads(ulysses_group, k.shape[2])
    q_heads = _Redistribute.apply(q, q_map)
    k_heads = _Redistribute.apply(k, kv_map)
    v_heads = _Redistribute.apply(v, kv_map)
    index = gather_token_indices(q_index_S, group=ulysses_group, device=q.device)
    docs = gather_doc_ids(doc_ids_BS, group=ulysses_group, device=q.device)
    out_heads = ring_attention(
        q_heads,
        k_heads,
        v_heads,
        group=ring_group,
        q_index_S=index,
        causal=causal,
        doc_ids_BS=docs,
        window=window,
        scale=scale,
    )
    return _Undistribute.apply(out_heads, q_map, q.dtype)
