"""Fused Triton passes of vertical-slash estimation: the attention of the last queries on a rank's keys, without
materialising the ``[B, Hkv, G, L, N]`` scores.

* :func:`log_normalizer` — each program scores ``BLOCK_N`` keys against the ``G·L`` last queries of one KV head
  and writes their per-row max and sum of exponentials; the chunks combine in fp64 on the host side of the
  call (a ``logsumexp`` over ``[B·Hkv·G, chunks, L]``).
* :func:`attention_probabilities` — the same scores normalised by the (global) log-normaliser, averaged over
  the group's query heads: fp32 ``[B, Hkv, L, N]``, 1/G of the scores' size and fp32 instead of fp64.

Causality: key position ``p`` is visible to query ``l`` (position ``seq − L + l``) when ``p ≤ seq − L + l``.
Scores are ``q·k`` of the already scaled queries: bf16/fp16 keys meet the queries rounded to their dtype on
tensor cores (fp32 accumulation), fp32 keys meet fp32 queries in IEEE fp32. Each score is computed by the same
instruction sequence whatever the layout, so every rank and every sharding see the same values. On the CPU
they run in Triton's interpreter (tests); :func:`unsupported_reason` says when they cannot run.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pyproject installs triton on Linux x86_64 only
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Keys per program: a [L, BLOCK_N] score tile per query head of the group.
_BLOCK_N = 16 if _INTERPRET else 64


def unsupported_reason(q_BHGLD: torch.Tensor, k_BNHD: torch.Tensor) -> str | None:
    """Why the fused passes cannot run on these inputs (None: they can)."""
    if triton is None:
        return "triton is not installed"
    if not k_BNHD.is_cuda and not _INTERPRET:
        return f"tensors are on {k_BNHD.device.type}; triton needs CUDA or TRITON_INTERPRET=1"
    last, d = q_BHGLD.shape[3], q_BHGLD.shape[4]
    for name, n in (("last_q", last), ("head dim", d)):
        if n < 16 or n & (n - 1):
            return f"{name} {n} is not a power of two ≥ 16 (a dot tile)"
    if k_BNHD.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"keys are {k_BNHD.dtype}"
    return None


if triton is not None:

    @triton.jit
    def _scores(Q, k, qh, rows, offs_d, HEAD_DIM: tl.constexpr, LAST: tl.constexpr, IEEE: tl.constexpr):
        """``[L, BLOCK_N]`` scores of query head ``qh`` (row block of ``Q`` ``[B·Hkv·G, L, D]``) on keys ``k``."""
        q = tl.load(Q + qh.to(tl.int64) * LAST * HEAD_DIM + rows[:, None] * HEAD_DIM + offs_d[None, :])
        if IEEE:
            return tl.dot(q, tl.trans(k), input_precision="ieee")
        return tl.dot(q, tl.trans(k))

    @triton.jit
    def _key_tile(K, Pos, bh, chunk, s_kb, s_ks, s_kh, n_keys, heads_kv, q_first, offs_d, rows,
                  BLOCK_N: tl.constexpr):  # fmt: skip
        """This program's keys (in the queries' dtype) and which (query, key) pairs causality lets through."""
        b = bh // heads_kv
        h = bh % heads_kv
        keys = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = keys < n_keys
        pos = tl.load(Pos + keys, mask=valid, other=0)
        k = tl.load(
            K + b.to(tl.int64) * s_kb + keys.to(tl.int64)[:, None] * s_ks + h * s_kh + offs_d[None, :],
            mask=valid[:, None], other=0.0,
        )  # fmt: skip
        visible = valid[None, :] & (pos[None, :] <= (q_first + rows)[:, None])
        return k, keys, valid, visible

    @triton.jit
    def _normalizer_kernel(
        Q, K, Pos, M, S, s_kb, s_ks, s_kh, n_keys, heads_kv, n_chunks, q_first,
        GROUP: tl.constexpr, LAST: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        IEEE: tl.constexpr,
    ):  # fmt: skip
        bh = tl.program_id(0)
        chunk = tl.program_id(1)
        rows = tl.arange(0, LAST)
        offs_d = tl.arange(0, HEAD_DIM)
        k, _, _, visible = _key_tile(K, Pos, bh, chunk, s_kb, s_ks, s_kh, n_keys, heads_kv, q_first, offs_d,
                                     rows, BLOCK_N)  # fmt: skip
        for g in range(GROUP):
            qh = bh * GROUP + g
            s = tl.where(visible, _scores(Q, k, qh, rows, offs_d, HEAD_DIM, LAST, IEEE), float("-inf"))
            m = tl.max(s, 1)
            total = tl.sum(tl.exp(s - tl.where(m == float("-inf"), 0.0, m)[:, None]), 1)
            out = (qh.to(tl.int64) * n_chunks + chunk) * LAST + rows
            tl.store(M + out, m)
            tl.store(S + out, total)

    @triton.jit
    def _probabilities_kernel(
        Q, K, Pos, Lse, P, s_kb, s_ks, s_kh, n_keys, heads_kv, q_first,
        GROUP: tl.constexpr, LAST: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        IEEE: tl.constexpr,
    ):  # fmt: skip
        bh = tl.program_id(0)
        chunk = tl.program_id(1)
        rows = tl.arange(0, LAST)
        offs_d = tl.arange(0, HEAD_DIM)
        k, keys, valid, visible = _key_tile(K, Pos, bh, chunk, s_kb, s_ks, s_kh, n_keys, heads_kv, q_first,
                                            offs_d, rows, BLOCK_N)  # fmt: skip
        mean = tl.zeros([LAST, BLOCK_N], tl.float32)
        for g in range(GROUP):
            qh = bh * GROUP + g
            lse = tl.load(Lse + qh.to(tl.int64) * LAST + rows)
            s = _scores(Q, k, qh, rows, offs_d, HEAD_DIM, LAST, IEEE)
            mean += tl.where(visible, tl.exp(s - tl.where(lse == float("-inf"), 0.0, lse)[:, None]), 0.0)
        mean = mean / GROUP
        out = bh.to(tl.int64) * LAST * n_keys + rows[:, None] * n_keys + keys[None, :]
        tl.store(P + out, mean, mask=valid[None, :])


def _inputs(q_BHGLD: torch.Tensor, k_BNHD: torch.Tensor, positions_N: torch.Tensor):
    """Queries in the keys' dtype (fp32 under the interpreter, whose bf16 math is wrong), flattened to
    ``[B·Hkv·G, L, D]``; keys likewise; int32 positions on the device; whether dots run in IEEE fp32."""
    dtype = torch.float32 if _INTERPRET or k_BNHD.dtype == torch.float32 else k_BNHD.dtype
    q = q_BHGLD.to(dtype).reshape(-1, *q_BHGLD.shape[3:]).contiguous()
    k = k_BNHD.to(dtype) if k_BNHD.stride(-1) == 1 else k_BNHD.to(dtype).contiguous()
    return q, k, positions_N.to(device=k.device, dtype=torch.int32), dtype == torch.float32


def log_normalizer(q_BHGLD: torch.Tensor, k_BNHD: torch.Tensor, positions_N: torch.Tensor, seq: int):
    """fp64 ``[B, Hkv, G, L]``: log of each last query's softmax denominator over keys ``[B, N, Hkv, D]`` at
    global positions ``positions_N`` (−inf for a query that sees none). ``q_BHGLD``: scaled last queries.
    Local to this device."""
    bsz, hkv, group, last, d = q_BHGLD.shape
    q, k, pos, ieee = _inputs(q_BHGLD, k_BNHD, positions_N)
    chunks = triton.cdiv(k.shape[1], _BLOCK_N)
    m = torch.empty(bsz * hkv * group, chunks, last, dtype=torch.float32, device=k.device)
    s = torch.empty_like(m)
    _normalizer_kernel[(bsz * hkv, chunks)](
        q, k, pos, m, s, k.stride(0), k.stride(1), k.stride(2), k.shape[1], hkv, chunks, seq - last,
        GROUP=group, LAST=last, BLOCK_N=_BLOCK_N, HEAD_DIM=d, IEEE=ieee,
    )  # fmt: skip
    lse = (m.double() + s.double().log()).logsumexp(dim=1)  # -inf + log 0 stays -inf: nothing seen
    return lse.reshape(bsz, hkv, group, last)


def attention_probabilities(
    q_BHGLD: torch.Tensor, k_BNHD: torch.Tensor, positions_N: torch.Tensor, seq: int, lse_BHGL: torch.Tensor
) -> torch.Tensor:
    """fp32 ``[B, Hkv, L, N]``: the last queries' attention on keys ``[B, N, Hkv, D]`` at ``positions_N``,
    normalised by the global ``lse_BHGL`` and averaged over each group's query heads. Local to this device."""
    bsz, hkv, group, last, d = q_BHGLD.shape
    q, k, pos, ieee = _inputs(q_BHGLD, k_BNHD, positions_N)
    n_keys = k.shape[1]
    probs = torch.empty(bsz, hkv, last, n_keys, dtype=torch.float32, device=k.device)
    lse = lse_BHGL.float().reshape(-1, last).contiguous()
    _probabilities_kernel[(bsz * hkv, triton.cdiv(n_keys, _BLOCK_N))](
        q, k, pos, lse, probs, k.stride(0), k.stride(1), k.stride(2), n_keys, hkv, seq - last,
        GROUP=group, LAST=last, BLOCK_N=_BLOCK_N, HEAD_DIM=d, IEEE=ieee,
    )  # fmt: skip
    return probs
