"""Ulysses context parallelism: trade the sequence split for a head split, attend locally, trade back.

Each rank holds ``S/W`` tokens of every head. One all-to-all per tensor turns that into all ``S`` tokens of
``Hq/W`` query heads (and the KV heads those read), one local attention runs over the whole sequence, and one
all-to-all brings the output back to sequence sharding. The gathered sequence is in group-rank order, not in
token order; nothing is reordered because the global token indices travel with it and define the mask.

GQA on the wire: with ``Hkv % W == 0`` KV heads are split like query heads; with ``W % Hkv == 0`` each rank
receives only the single KV head its query heads share, so each KV head goes to ``W/Hkv`` ranks (never expanded
to ``Hq`` heads before sending). Other head counts cannot be split: use ring or all-gather attention, or hybrid
with a smaller Ulysses degree (:func:`check_ulysses_heads` lists the ones that fit).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from sparsetron.parallel.context.autograd_ops import (
    RedistributedAttention,
    SeqToHeads,
    Visibility,
    check_local_inputs,
    gather_doc_ids,
    gather_token_indices,
)


def _heads_split(q_heads: int, kv_heads: int, degree: int) -> bool:
    return q_heads % degree == 0 and (kv_heads % degree == 0 or degree % kv_heads == 0)


def check_ulysses_heads(q_heads: int, kv_heads: int, world: int) -> None:
    """Raise ``ValueError`` unless Ulysses can split ``q_heads`` query and ``kv_heads`` KV heads over ``world``
    ranks (``Hq % W == 0`` and ``Hkv % W == 0`` or ``W % Hkv == 0``). The message names the alternatives and the
    hybrid Ulysses degrees (divisors of ``world``) that would fit. No communication: usable before launch."""
    if _heads_split(q_heads, kv_heads, world):
        return
    degrees = [d for d in range(2, world) if world % d == 0 and _heads_split(q_heads, kv_heads, d)]
    hybrid = (
        f", or method='hybrid' with a Ulysses degree that divides the heads: {degrees}"
        if degrees
        else f"; no hybrid Ulysses degree dividing W={world} fits these heads"
    )
    raise ValueError(
        f"Ulysses cannot split Hq={q_heads} query heads and Hkv={kv_heads} KV heads over W={world} ranks: it needs "
        f"Hq % W == 0 and either Hkv % W == 0 or W % Hkv == 0. Use method='ring' or method='allgather' "
        f"(no head constraint){hybrid}"
    )


def ulysses_attention(
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
    """Exact, differentiable attention of this rank's query tokens over the whole sequence, Ulysses style.

    q: [B, S_local, Hq, D]; k, v: [B, S_local, Hkv, D] (any float dtype, all the same); ``q_index_S``: int64
    [S_local], the global token indices of this rank's tokens (:func:`~.layouts.global_token_index`, any
    layout); ``doc_ids_BS``: int [B, S_local] doc ids of those tokens, or None; ``causal``/``window`` as in
    :func:`sparsetron.kernels.attention_ref.visible_mask`; ``scale`` defaults to ``1/sqrt(D)``.
    Returns out [B, S_local, Hq, D] in q's dtype (fp32 attention math; fp32 sums of replicated-KV gradients).

    Communicates over ``group`` (the context-parallel group, W ranks, every rank calls): forward small
    all-gathers of the indices (on the CPU where the group can) and doc ids, and four all_to_all_single (q, k,
    v, out); backward four (dout, dq, dk, dv). Pass ``q_index_S`` on the CPU.
    Raises ``ValueError`` (before any communication) when the heads do not split over W, see
    :func:`check_ulysses_heads`.
    """
    check_local_inputs(q, k, v, q_index_S, doc_ids_BS)
    check_ulysses_heads(q.shape[2], k.shape[2], dist.get_world_size(group))
    index_S = gather_token_indices(q_index_S, group=group, device=q.device)
    doc_BS = gather_doc_ids(doc_ids_BS, group=group, device=q.device)
    visibility = Visibility(index_S, index_S, doc_BS, doc_BS, causal, window)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return RedistributedAttention.apply(
        q, k, v, SeqToHeads(group, q.shape[2]), SeqToHeads(group, k.shape[2]), visibility, scale
    )
