"""Reference block attention with log-sum-exp, forward and backward: the oracle every backend matches.

A *block* is one (query chunk, key chunk) pair of a context-parallel computation. Which query may see which
key is decided by **global token indices** (where each token sits in the unsharded sequence, whatever the
layout), document ids and an optional sliding window:

    visible(i, j) = (j <= i if causal) and doc(i) == doc(j) and (i - j < window if window)

The forward returns the block's output normalised within the block plus its LSE, so partial results from
several blocks merge exactly (:func:`merge_partials`). The backward takes the *global* (merged) output and
LSE, so each block's gradient is its exact share of the full attention gradient (FlashAttention-2 style).
Math runs in fp32 (fp64 for fp64 inputs); GQA shares each K/V head across ``Hq / Hkv`` query heads without
copying K/V across ranks.
"""

from __future__ import annotations

import torch


def visible_mask(
    q_index_S: torch.Tensor,
    k_index_S: torch.Tensor,
    *,
    causal: bool,
    q_doc_BS: torch.Tensor | None = None,
    k_doc_BS: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Boolean visibility ``[B or 1, Sq, Sk]`` from global token indices (int64) and optional doc ids ``[B, S]``."""
    i = q_index_S[:, None]
    j = k_index_S[None, :]
    mask = torch.ones(i.shape[0], j.shape[1], dtype=torch.bool, device=q_index_S.device)
    if causal:
        mask = mask & (j <= i)
    if window is not None:
        mask = mask & (i - j < window)
    mask = mask[None]
    if q_doc_BS is not None:
        mask = mask & (q_doc_BS[:, :, None] == k_doc_BS[:, None, :])
    return mask


def _math_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _expand_kv(x_BSHD: torch.Tensor, n_q_heads: int) -> torch.Tensor:
    groups = n_q_heads // x_BSHD.shape[2]
    return x_BSHD.repeat_interleave(groups, dim=2) if groups > 1 else x_BSHD


def attention_forward_ref(
    q_BSHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor, mask_BQK: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block's attention: ``(out_BSHD, lse_BHS)`` in fp32 (fp64 for fp64 inputs).

    q: [B, Sq, Hq, D]; k, v: [B, Sk, Hkv, D] with Hq % Hkv == 0; mask: bool [B or 1, Sq, Sk].
    Rows that see no key get out = 0 and lse = -inf (they contribute nothing when merged).
    """
    dtype = _math_dtype(q_BSHD)
    hq = q_BSHD.shape[2]
    q = q_BSHD.to(dtype).transpose(1, 2)
    k = _expand_kv(k_BSHD, hq).to(dtype).transpose(1, 2)
    v = _expand_kv(v_BSHD, hq).to(dtype).transpose(1, 2)
    scores_BHQK = (q @ k.transpose(-1, -2)) * scale
    scores_BHQK = scores_BHQK.masked_fill(~mask_BQK[:, None], float("-inf"))
    lse_BHQ = torch.logsumexp(scores_BHQK, dim=-1)
    probs = torch.exp(scores_BHQK - lse_BHQ[..., None].clamp_min(torch.finfo(dtype).min))
    probs = torch.where(mask_BQK[:, None], probs, torch.zeros((), dtype=dtype))
    out_BSHD = (probs @ v).transpose(1, 2)
    return out_BSHD, lse_BHQ


def attention_backward_ref(
    dout_BSHD: torch.Tensor,
    q_BSHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    v_BSHD: torch.Tensor,
    out_BSHD: torch.Tensor,
    lse_BHS: torch.Tensor,
    mask_BQK: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This block's share of ``(dq, dk, dv)`` given the GLOBAL output and LSE of the query rows (fp32/fp64).

    dk, dv come back with the KV head count of k/v (GQA groups summed), ready to accumulate.
    """
    dtype = _math_dtype(q_BSHD)
    b, _, hq, d = q_BSHD.shape
    hkv = k_BSHD.shape[2]
    q = q_BSHD.to(dtype).transpose(1, 2)
    k = _expand_kv(k_BSHD, hq).to(dtype).transpose(1, 2)
    v = _expand_kv(v_BSHD, hq).to(dtype).transpose(1, 2)
    do = dout_BSHD.to(dtype).transpose(1, 2)
    o = out_BSHD.to(dtype).transpose(1, 2)
    lse = lse_BHS.to(dtype)
    scores = (q @ k.transpose(-1, -2)) * scale
    # Rows with lse = -inf saw no key anywhere: their probabilities are zero, not NaN.
    probs = torch.exp(scores - lse[..., None].clamp_min(torch.finfo(dtype).min))
    probs = torch.where(
        mask_BQK[:, None] & torch.isfinite(lse)[..., None], probs, torch.zeros((), dtype=dtype)
    )
    dv = probs.transpose(-1, -2) @ do
    dp = do @ v.transpose(-1, -2)
    delta = (do * o).sum(dim=-1, keepdim=True)
    ds = probs * (dp - delta)
    dq = (ds @ k) * scale
    dk = (ds.transpose(-1, -2) @ q) * scale
    groups = hq // hkv
    dk = dk.transpose(1, 2).reshape(b, -1, hkv, groups, d).sum(dim=3)
    dv = dv.transpose(1, 2).reshape(b, -1, hkv, groups, d).sum(dim=3)
    return dq.transpose(1, 2), dk, dv


def merge_partials(
    out_a: torch.Tensor | None, lse_a: torch.Tensor | None, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attentions over disjoint key sets, in fp32: ``out [B,S,H,D]``, ``lse [B,H,S]``.

    Exact for any number of merges and any order (up to rounding); -inf LSEs (no keys) are neutral.
    """
    out_b = out_b.to(torch.float64 if out_b.dtype == torch.float64 else torch.float32)
    lse_b = lse_b.to(out_b.dtype)
    if out_a is None:
        return out_b, lse_b
    lse = torch.logaddexp(lse_a, lse_b)
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    wa = torch.where(finite, torch.exp(lse_a - safe), torch.zeros_like(lse))
    wb = torch.where(finite, torch.exp(lse_b - safe), torch.zeros_like(lse))
    out = out_a * wa.transpose(1, 2)[..., None] + out_b * wb.transpose(1, 2)[..., None]
    return out, lse
