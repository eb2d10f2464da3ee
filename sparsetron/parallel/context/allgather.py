"""All-gather context parallelism (Llama 3 style): gather K/V, attend the local queries, reduce-scatter dK/dV.

Each rank keeps its ``S/W`` query tokens and all-gathers the keys and values of the whole sequence (cheap under
GQA: K/V have ``Hkv`` heads, often far fewer than ``Hq``). One local attention runs against the gathered K/V,
which sit in group-rank order; the gathered global token indices define the mask, so no layout is assumed.
The backward computes dK/dV for the whole gathered sequence in fp32 and reduce-scatters them to their owners.
"""

from __future__ import annotations

import torch

from sparsetron.parallel.context.autograd_ops import (
    AllGatherSequence,
    LocalTokens,
    RedistributedAttention,
    Visibility,
    check_local_inputs,
    gather_doc_ids,
    gather_token_indices,
)


def allgather_attention(
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
    """Exact, differentiable attention of this rank's query tokens over the whole sequence via K/V all-gather.

    q: [B, S_local, Hq, D]; k, v: [B, S_local, Hkv, D] (any float dtype, all the same; any Hq % Hkv == 0);
    ``q_index_S``: int64 [S_local], the global token indices of this rank's tokens
    (:func:`~.layouts.global_token_index`, any layout); ``doc_ids_BS``: int [B, S_local] doc ids of those
    tokens, or None; ``causal``/``window`` as in :func:`sparsetron.kernels.attention_ref.visible_mask`;
    ``scale`` defaults to ``1/sqrt(D)``. Returns out [B, S_local, Hq, D] in q's dtype (fp32 attention math).

    Communicates over ``group`` (the context-parallel group, every rank calls): forward small all-gathers of the
    indices (on the CPU where the group can) and doc ids, and one all-gather each of k and v (input dtype);
    backward one fp32 reduce-scatter each of dk and dv. Pass ``q_index_S`` on the CPU.
    Memory: keeps the gathered K/V ([B, S, Hkv, D]) for the backward.
    """
    check_local_inputs(q, k, v, q_index_S, doc_ids_BS)
    k_index_S = gather_token_indices(q_index_S, group=group, device=q.device)
    k_doc_BS = gather_doc_ids(doc_ids_BS, group=group, device=q.device)
    q_doc_BS = None if doc_ids_BS is None else doc_ids_BS.to(device=q.device, dtype=torch.int64)
    # Both index tensors on the host, where the kernels plan (gather_token_indices returns the CPU).
    visibility = Visibility(q_index_S.to("cpu", torch.int64), k_index_S, q_doc_BS, k_doc_BS, causal, window)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return RedistributedAttention.apply(q, k, v, LocalTokens(), AllGatherSequence(group), visibility, scale)
