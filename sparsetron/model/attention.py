"""Grouped-query self-attention with RoPE, and the single-process attention core behind it.

The module is split at the point where parallel schemes differ: :class:`Attention` projects, normalises
and rotates q/k/v and projects the result back; its ``core`` only turns ``(q, k, v)`` into the attention
output. Context parallelism replaces the core (see :meth:`sparsetron.model.Transformer.set_attention_core`)
and keeps the projections.

Core interface (any ``nn.Module``)::

    core(q_BSHD, k_BSHD, v_BSHD, *, doc_ids_BS, positions_BS) -> out_BSHD

q has ``Hq`` heads and k/v ``Hkv`` heads with ``Hq % Hkv == 0``; query head ``h`` reads kv head
``h // (Hq / Hkv)`` (HF ``repeat_kv`` order). ``positions_BS`` are the global positions of the local tokens
and ``doc_ids_BS`` (or None) their document ids; attention is causal and stays inside a document.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsetron.model.norm import RMSNorm
from sparsetron.model.rope import RotaryEmbedding, apply_rotary


def document_causal_mask(doc_ids_BS: torch.Tensor) -> torch.Tensor:
    """``[B, 1, S, S]`` bool: query i may read key j iff ``j <= i`` and both carry the same document id."""
    seq_len = doc_ids_BS.shape[1]
    same_doc_BSS = doc_ids_BS[:, :, None] == doc_ids_BS[:, None, :]
    causal_SS = torch.ones(seq_len, seq_len, dtype=torch.bool, device=doc_ids_BS.device).tril()
    return (same_doc_BSS & causal_SS).unsqueeze(1)


class LocalAttention(nn.Module):
    """The single-process attention core: the whole sequence is on this process.

    ``forward(q_BSHD, k_BSHD, v_BSHD, *, doc_ids_BS=None, positions_BS=None) -> out_BSHD`` (dtype of q).
    Causality follows the order of tokens in the sequence, so ``positions_BS`` is not needed here (it is in
    the interface for cores that see only part of a sequence). Without document ids it takes SDPA's
    ``is_causal`` fast path; with them it builds an explicit ``[B, 1, S, S]`` boolean mask (O(S²) memory,
    fine for a reference). K/V heads are never repeated in memory (SDPA ``enable_gqa``). Scale
    ``1/sqrt(D)``. Has no parameters; nothing communicates.
    """

    def forward(
        self,
        q_BSHD: torch.Tensor,
        k_BSHD: torch.Tensor,
        v_BSHD: torch.Tensor,
        *,
        doc_ids_BS: torch.Tensor | None = None,
        positions_BS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q_BHSD, k_BHSD, v_BHSD = (t.transpose(1, 2) for t in (q_BSHD, k_BSHD, v_BSHD))
        grouped = q_BHSD.shape[1] != k_BHSD.shape[1]
        scale = q_BSHD.shape[-1] ** -0.5
        if doc_ids_BS is None:
            out_BHSD = F.scaled_dot_product_attention(
                q_BHSD, k_BHSD, v_BHSD, is_causal=True, scale=scale, enable_gqa=grouped
            )
        else:
            out_BHSD = F.scaled_dot_product_attention(
                q_BHSD,
                k_BHSD,
                v_BHSD,
                attn_mask=document_causal_mask(doc_ids_BS),
                scale=scale,
                enable_gqa=grouped,
            )
        return out_BHSD.transpose(1, 2)


class Attention(nn.Module):
    """GQA self-attention: q/k/v projections (optional bias), optional per-head q/k RMSNorm, RoPE, core, o.

    ``forward(x_BSD, positions_BS, doc_ids_BS=None) -> y_BSD`` in the activation dtype. Parameters use HF
    names: ``q_proj [Hq·D, dim]``, ``k_proj``/``v_proj [Hkv·D, dim]`` (+ ``bias`` when ``bias``),
    ``o_proj [dim, Hq·D]`` without bias, and ``q_norm``/``k_norm [D]`` when ``qk_norm`` (Qwen3: normalise
    each head before RoPE). Nothing communicates unless the installed ``core`` does.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        rope_theta: float,
        bias: bool = False,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(
                f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads} (grouped-query attention); "
                "pick n_kv_heads among the divisors of n_heads."
            )
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.init_std = init_std
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.rope = RotaryEmbedding(head_dim, rope_theta)
        self.core: nn.Module = LocalAttention()
        self.init_weights()

    def init_weights(self) -> None:
        """normal(0, init_std) weights, zero biases, unit q/k norms; visits q, k, v, o, q_norm, k_norm."""
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.normal_(proj.weight, mean=0.0, std=self.init_std)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.init_weights()

    def forward(
        self, x_BSD: torch.Tensor, positions_BS: torch.Tensor, doc_ids_BS: torch.Tensor | None = None
    ) -> torch.Tensor:
        batch, seq_len, _ = x_BSD.shape
        q_BSHD = self.q_proj(x_BSD).view(batch, seq_len, self.n_heads, self.head_dim)
        k_BSHD = self.k_proj(x_BSD).view(batch, seq_len, self.n_kv_heads, self.head_dim)
        v_BSHD = self.v_proj(x_BSD).view(batch, seq_len, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q_BSHD = self.q_norm(q_BSHD)
            k_BSHD = self.k_norm(k_BSHD)
        cos_BSD, sin_BSD = self.rope(positions_BS, x_BSD.dtype)
        q_BSHD = apply_rotary(q_BSHD, cos_BSD, sin_BSD)
        k_BSHD = apply_rotary(k_BSHD, cos_BSD, sin_BSD)
        out_BSHD = self.core(q_BSHD, k_BSHD, v_BSHD, doc_ids_BS=doc_ids_BS, positions_BS=positions_BS)
        return self.o_proj(out_BSHD.reshape(batch, seq_len, self.n_heads * self.head_dim))
