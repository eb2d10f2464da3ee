"""Block attention with LSE: the entry point every context-parallel method calls.

``block_attention_forward`` / ``block_attention_backward`` compute one (query shard, key shard) pair given the
GLOBAL token indices of both sides (see :mod:`sparsetron.kernels.attention_ref` for the mask semantics). Output
and LSE are fp32 so partial results merge without loss; the backward takes the global output and LSE.
"""

from __future__ import annotations

import torch

from sparsetron.kernels.attention_ref import attention_backward_ref, attention_forward_ref, visible_mask


def block_attention_forward(
    q_BSHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    v_BSHD: torch.Tensor,
    q_index_S: torch.Tensor,
    k_index_S: torch.Tensor,
    *,
    scale: float,
    causal: bool = True,
    q_doc_BS: torch.Tensor | None = None,
    k_doc_BS: torch.Tensor | None = None,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over the keys of this block: ``(out_BSHD fp32, lse_BHS fp32)``; no communication.

    q: [B, Sq, Hq, D]; k, v: [B, Sk, Hkv, D]; indices int64 [Sq], [Sk]; doc ids int [B, S] or None.
    """
    mask = visible_mask(
        q_index_S, k_index_S, causal=causal, q_doc_BS=q_doc_BS, k_doc_BS=k_doc_BS, window=window
    )
    return attention_forward_ref(q_BSHD, k_BSHD, v_BSHD, mask, scale)


def block_attention_backward(
    dout_BSHD: torch.Tensor,
    q_BSHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    v_BSHD: torch.Tensor,
    out_BSHD: torch.Tensor,
    lse_BHS: torch.Tensor,
    q_index_S: torch.Tensor,
    k_index_S: torch.Tensor,
    *,
    scale: float,
    causal: bool = True,
    q_doc_BS: torch.Tensor | None = None,
    k_doc_BS: torch.Tensor | None = None,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This block's ``(dq, dk, dv)`` (fp32, dk/dv with Hkv heads) from the global ``out`` and ``lse``; no communication."""
    mask = visible_mask(
        q_index_S, k_index_S, causal=causal, q_doc_BS=q_doc_BS, k_doc_BS=k_doc_BS, window=window
    )
    return attention_backward_ref(dout_BSHD, q_BSHD, k_BSHD, v_BSHD, out_BSHD, lse_BHS, mask, scale)
