"""Block-sparse flash attention in Triton: forward and backward over per-query-block lists of key blocks plus
individual key columns ("bars"), with LSE out and in, fp32 accumulation, GQA without copying K/V.

The work lists (:class:`SparseLists`, built by :func:`sparse_lists` from a
:class:`~sparsetron.parallel.context.patterns.BlockPattern` and the blocks a call holds) say, for every (batch,
KV head, query block), which of the held key blocks it attends to (CSR, sorted), and for every (batch, KV head)
which held key columns are bars. Causality is decided by global positions (each held block carries its global
block id), so the same kernel serves a whole sequence or one step of a sparse ring, where the queries are a
rank's striped blocks and the keys the blocks it received. A bar is skipped for a query block whose list
already holds the bar's block, so nothing is counted twice.

* forward, one program per (batch·query head, query block): online softmax over the listed blocks (in
  ``BLOCK_N`` slices) and then the bars (in ``BAR_N`` slices, gathered by position); writes the block's fp32
  output and LSE, or, with ``accumulate``, merges them into a running ``(out, lse)`` in place (a sparse ring's
  step merges without another pass over memory);
* backward (FlashAttention-2 style, from the *global* output and LSE): ``dq`` one program per (batch·query
  head, query block) over the same lists, added into an fp32 ``dq``; ``dk``/``dv`` one program per (batch·KV
  head, key block) over the transposed lists and the group's query heads (no atomics); bars' ``dk``/``dv`` one
  program per (batch·KV head, ``BAR_N`` bars) over the query blocks after them, added into the key gradients.

Inputs are bf16/fp16 (fp32 accepted: dots then run in IEEE fp32); head dim a power of two in [16, 256];
the block a multiple of 16. On the CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` set
before import), where bf16 math is broken, so there inputs are upcast to fp32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pyproject installs triton on Linux x86_64 only
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_LOG2E = 1.4426950408889634
# Bars are gathered this many columns at a time (a dot needs ≥ 16 on each side).
BAR_N = 16 if _INTERPRET else 64
#: Longest run of query blocks one dk/dv program walks for a key block (longer lists are split, atomics add up).
KEY_SEGMENT = 4 if _INTERPRET else 32
# The bars' dk/dv kernel splits the query blocks until about this many programs run (a few per SM).
_BAR_PROGRAMS = 4 if _INTERPRET else 1024


@dataclass(frozen=True)
class SparseLists:
    """Work lists of one block-sparse call (int32 on the tensors' device; see the module docstring).

    ``row_start`` ``[B·Hkv·nQ + 1]`` / ``cols``: held key blocks per query block; ``col_start`` ``[B·Hkv·nK + 1]``
    / ``rows``: the transpose (query blocks per key block); ``q_block_ids`` ``[nQ]`` / ``k_block_ids`` ``[nK]``:
    global block ids of the held query and key blocks; ``bar_start`` ``[B·Hkv + 1]`` / ``bar_pos``: positions
    of bar columns among the held key tokens, with their batch and head (int64, for scattering gradients);
    ``active`` uint8 ``[B·Hkv·nQ, nK]`` (bars only: which blocks a row already holds).
    """

    block: int
    batch: int
    heads_kv: int
    q_block_ids: torch.Tensor
    k_block_ids: torch.Tensor
    row_start: torch.Tensor
    cols: torch.Tensor
    col_start: torch.Tensor
    rows: torch.Tensor
    bar_start: torch.Tensor | None = None
    bar_pos: torch.Tensor | None = None
    bar_batch: torch.Tensor | None = None
    bar_head: torch.Tensor | None = None
    active: torch.Tensor | None = None
    max_bars: int = 0
    causal: bool = True
    #: ``(seg_row, seg_start)`` int32: the dk/dv kernel's programs, each a run of at most
    #: ``KEY_SEGMENT`` query blocks of one key block's list (so a key block every query sees, e.g. a sink,
    #: is spread over many programs instead of one long tail); see :func:`_key_segments`.
    key_segments: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def n_q(self) -> int:
        return len(self.q_block_ids)

    @property
    def n_k(self) -> int:
        return len(self.k_block_ids)


def _csr(active_RC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 ``(start [R + 1], columns)`` of a bool matrix, columns sorted within each row."""
    start = torch.zeros(active_RC.shape[0] + 1, dtype=torch.int32, device=active_RC.device)
    start[1:] = torch.cumsum(active_RC.sum(dim=1), 0)
    return start, active_RC.nonzero()[:, 1].to(torch.int32)


def _key_segments(col_start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut each key block's query list (CSR ``col_start``) into runs of at most ``KEY_SEGMENT`` entries; an empty
    list keeps one (empty) run so its zero gradient is still written. Returns ``(row of each run, starts [R+1])``."""
    lengths = (col_start[1:] - col_start[:-1]).long()
    pieces = torch.clamp((lengths + KEY_SEGMENT - 1) // KEY_SEGMENT, min=1)
    seg_row = torch.repeat_interleave(torch.arange(len(lengths), device=col_start.device), pieces)
    first = torch.cumsum(pieces, 0) - pieces  # index of each row's first run
    within = torch.arange(len(seg_row), device=col_start.device) - first[seg_row]
    starts = col_start[:-1].long()[seg_row] + within * KEY_SEGMENT
    seg_start = torch.empty(len(seg_row) + 1, dtype=torch.int32, device=col_start.device)
    seg_start[:-1] = starts.to(torch.int32)
    seg_start[-1] = col_start[-1]
    # A run ends where the next begins, except the last run of a row, which ends at the row's end.
    return seg_row.to(torch.int32), seg_start


def sparse_lists(pattern, q_blocks: torch.Tensor, k_blocks: torch.Tensor) -> SparseLists:
    """The work lists of ``pattern`` (a ``BlockPattern``) for the query blocks ``q_blocks`` attending to the
    held key blocks ``k_blocks`` (int64 global block ids, in the order the tensors hold them).

    One host sync per list (their lengths); everything stays on the pattern's device.
    """
    block, device = pattern.block, pattern.active_BHQK.device
    q_blocks, k_blocks = q_blocks.to(device), k_blocks.to(device)
    batch, heads_kv = pattern.active_BHQK.shape[:2]
    active = pattern.active_BHQK[:, :, q_blocks][:, :, :, k_blocks]  # [B, Hkv, nQ, nK]
    if pattern.causal:  # the kernels mask only the diagonal block: blocks after it must not be listed
        active = active & (k_blocks[None, :] <= q_blocks[:, None])
    row_start, cols = _csr(active.reshape(-1, len(k_blocks)))
    col_start, rows = _csr(active.transpose(2, 3).reshape(-1, len(q_blocks)))
    lists = dict(
        block=block, batch=batch, heads_kv=heads_kv, causal=pattern.causal, key_segments=_key_segments(col_start),
        q_block_ids=q_blocks.to(torch.int32), k_block_ids=k_blocks.to(torch.int32),
        row_start=row_start, cols=cols, col_start=col_start, rows=rows,
    )  # fmt: skip
    if pattern.bars_BHS is not None:
        positions = (k_blocks[:, None] * block + torch.arange(block, device=device)).reshape(-1)
        bars = pattern.bars_BHS[:, :, positions].reshape(batch * heads_kv, -1)  # [B·Hkv, nK·block]
        bar_start, bar_pos = _csr(bars)
        if len(bar_pos):
            counts = bar_start[1:] - bar_start[:-1]
            owner = torch.repeat_interleave(torch.arange(batch * heads_kv, device=device), counts.long())
            lists.update(
                bar_start=bar_start, bar_pos=bar_pos, bar_batch=owner // heads_kv, bar_head=owner % heads_kv,
                active=active.reshape(-1, len(k_blocks)).to(torch.uint8), max_bars=int(counts.max()),
            )  # fmt: skip
    return SparseLists(**lists)


def unsupported_reason(q_BSHD: torch.Tensor, block: int) -> str | None:
    """Why the Triton kernels cannot run on these inputs (None: they can)."""
    if triton is None:
        return "triton is not installed"
    if not q_BSHD.is_cuda and not _INTERPRET:
        return (
            f"tensors are on {q_BSHD.device.type}; triton needs CUDA, or TRITON_INTERPRET=1 set before import"
        )
    if q_BSHD.dtype not in _DTYPES:
        return f"dtype is {q_BSHD.dtype}; the kernels take bfloat16, float16 or float32"
    d = q_BSHD.shape[-1]
    if d < 16 or d > 256 or d & (d - 1):
        return f"head dim {d} is not a power of two in [16, 256]"
    if block % 16 or block < 16:
        return f"block {block} is not a multiple of 16 (the smallest tile a dot takes)"
    return None


if triton is not None:

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _softmax_step(q, k, v, visible, m_i, l_i, acc, qk_scale, MASKED: tl.constexpr, IEEE: tl.constexpr):
        """One online-softmax update of ``(m, l, acc)`` (log2 domain) with keys ``k``/``v`` ``[N, D]``."""
        s = _dot(q, tl.trans(k), IEEE) * qk_scale
        if MASKED:
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows that have seen nothing yet keep m = -inf: shift by 0 so exp2 gives 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        return m_new, l_i, acc

    @triton.jit
    def _bar_keys(
        bar_pos, active, k_block_ids, c, stop, row, n_k, k_base, v_base, s_ks, s_vs, q_pos,
        BLOCK: tl.constexpr, BAR_N: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
    ):  # fmt: skip
        """Bars ``c … c + BAR_N`` of a row, gathered: their K and V ``[BAR_N, D]`` (zero where unused) and which
        (query, bar) pairs count (not in a block the row already holds; causal)."""
        idx = c + tl.arange(0, BAR_N)
        valid = idx < stop
        pos = tl.load(bar_pos + idx, mask=valid, other=0)
        kb = pos // BLOCK
        held = tl.load(active + row.to(tl.int64) * n_k + kb, mask=valid, other=1)
        use = valid & (held == 0)
        rows = pos.to(tl.int64)[:, None]
        offs_d = tl.arange(0, HEAD_DIM)[None, :]
        k = tl.load(k_base + rows * s_ks + offs_d, mask=use[:, None], other=0.0)
        v = tl.load(v_base + rows * s_vs + offs_d, mask=use[:, None], other=0.0)
        visible = use[None, :]
        if CAUSAL:
            k_pos = tl.load(k_block_ids + kb, mask=valid, other=0) * BLOCK + pos % BLOCK
            visible = visible & (k_pos[None, :] <= q_pos[:, None])
        return k, v, visible

    @triton.jit
    def _key_slice(
        k_base, v_base, kb, k_first, n0, q_pos, s_ks, s_vs,
        BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):  # fmt: skip
        """Keys ``n0 … n0 + BLOCK_N`` of held block ``kb`` (global first position ``k_first``): K and V
        ``[BLOCK_N, D]`` and the causal visibility of each (query, key) pair."""
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        # 64-bit block base, 32-bit offsets inside the block: cheaper address math per element.
        first = (kb * BLOCK).to(tl.int64)
        k = tl.load(k_base + first * s_ks + offs_n[:, None] * s_ks + offs_d[None, :])
        v = tl.load(v_base + first * s_vs + offs_n[:, None] * s_vs + offs_d[None, :])
        return k, v, (k_first + offs_n)[None, :] <= q_pos[:, None]

    @triton.jit
    def _fwd_block(
        q, k_base, v_base, kb, k_first, q_pos, s_ks, s_vs, m_i, l_i, acc, qk_scale,
        BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
        IEEE: tl.constexpr,
    ):  # fmt: skip
        """Online softmax over held key block ``kb``, in ``BLOCK_N`` slices."""
        for n0 in tl.static_range(0, BLOCK, BLOCK_N):
            k, v, visible = _key_slice(
                k_base, v_base, kb, k_first, n0, q_pos, s_ks, s_vs, BLOCK, BLOCK_N, HEAD_DIM
            )
            m_i, l_i, acc = _softmax_step(q, k, v, visible, m_i, l_i, acc, qk_scale, MASKED, IEEE)
        return m_i, l_i, acc

    @triton.jit
    def _dq_block(
        q, do, k_base, v_base, kb, k_first, q_pos, s_ks, s_vs, lse2, delta, dq, qk_scale,
        BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
        IEEE: tl.constexpr,
    ):  # fmt: skip
        """``dq`` share of held key block ``kb``, in ``BLOCK_N`` slices."""
        for n0 in tl.static_range(0, BLOCK, BLOCK_N):
            k, v, visible = _key_slice(
                k_base, v_base, kb, k_first, n0, q_pos, s_ks, s_vs, BLOCK, BLOCK_N, HEAD_DIM
            )
            dq = _dq_step(q, do, k, v, visible, lse2, delta, dq, qk_scale, MASKED, IEEE)
        return dq

    @triton.jit
    def _fwd_kernel(
        Q, K, V, Out, Lse,
        row_start, cols, q_block_ids, k_block_ids, bar_start, bar_pos, active,
        s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_os, s_oh,
        qk_scale, n_q, n_k, heads_q, heads_kv, seq_q,
        BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BAR_N: tl.constexpr,
        GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_BARS: tl.constexpr, ACCUMULATE: tl.constexpr,
        IEEE: tl.constexpr,
    ):  # fmt: skip
        bh = tl.program_id(0)
        m = tl.program_id(1)
        b = bh // heads_q
        hq = bh % heads_q
        hk = hq // GROUP
        row = (b * heads_kv + hk) * n_q + m
        offs_m = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, HEAD_DIM)
        tok = m * BLOCK + offs_m
        q_pos = tl.load(q_block_ids + m) * BLOCK + offs_m
        q = tl.load(
            Q + b.to(tl.int64) * s_qb + tok[:, None].to(tl.int64) * s_qs + hq * s_qh + offs_d[None, :]
        )
        k_base = K + b.to(tl.int64) * s_kb + hk * s_kh
        v_base = V + b.to(tl.int64) * s_vb + hk * s_vh
        m_i = tl.full([BLOCK], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK], tl.float32)
        acc = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
        start = tl.load(row_start + row)
        stop = tl.load(row_start + row + 1)
        # Causal lists hold no block after the query block (sparse_lists drops them) and are sorted, so only
        # the last can straddle the diagonal: the others skip the mask.
        unmasked_stop = stop - 1 if CAUSAL else stop
        for i in range(start, unmasked_stop):
            kb = tl.load(cols + i)
            m_i, l_i, acc = _fwd_block(
                q, k_base, v_base, kb, tl.load(k_block_ids + kb) * BLOCK, q_pos, s_ks, s_vs, m_i, l_i, acc,
                qk_scale, BLOCK, BLOCK_N, HEAD_DIM, False, IEEE,
            )  # fmt: skip
        if CAUSAL and stop > start:
            kb = tl.load(cols + stop - 1)
            m_i, l_i, acc = _fwd_block(
                q, k_base, v_base, kb, tl.load(k_block_ids + kb) * BLOCK, q_pos, s_ks, s_vs, m_i, l_i, acc,
                qk_scale, BLOCK, BLOCK_N, HEAD_DIM, True, IEEE,
            )  # fmt: skip
        if HAS_BARS:
            stop = tl.load(bar_start + b * heads_kv + hk + 1)
            for c in range(tl.load(bar_start + b * heads_kv + hk), stop, BAR_N):
                k, v, visible = _bar_keys(
                    bar_pos, active, k_block_ids, c, stop, row, n_k, k_base, v_base, s_ks, s_vs, q_pos,
                    BLOCK, BAR_N, HEAD_DIM, CAUSAL,
                )  # fmt: skip
                m_i, l_i, acc = _softmax_step(q, k, v, visible, m_i, l_i, acc, qk_scale, True, IEEE)
        seen = l_i > 0
        l_safe = tl.where(seen, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) / 1.4426950408889634, float("-inf"))
        o_ptr = Out + b.to(tl.int64) * s_ob + tok[:, None].to(tl.int64) * s_os + hq * s_oh + offs_d[None, :]
        lse_ptr = Lse + bh.to(tl.int64) * seq_q + tok
        if ACCUMULATE:
            # Merge with the running partial over other keys: both normalised, weights from their LSEs.
            lse_old = tl.load(lse_ptr)
            top = tl.maximum(lse_old, lse)
            top_safe = tl.where(top == float("-inf"), 0.0, top)
            w_old = tl.exp(lse_old - top_safe)
            w_new = tl.exp(lse - top_safe)
            total = w_old + w_new
            total_safe = tl.where(total > 0, total, 1.0)
            out = (tl.load(o_ptr) * w_old[:, None] + out * w_new[:, None]) / total_safe[:, None]
            lse = tl.where(total > 0, top_safe + tl.log(total_safe), float("-inf"))
        tl.store(o_ptr, out)
        tl.store(lse_ptr, lse)

    @triton.jit
    def _dq_step(q, do, k, v, visible, lse2, delta, dq, qk_scale, MASKED: tl.constexpr, IEEE: tl.constexpr):
        s = _dot(q, tl.trans(k), IEEE) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            p = tl.where(visible, p, 0.0)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.to(k.dtype), k, IEEE)

    @triton.jit
    def _dq_kernel(
        Q, K, V, DO, Lse, Delta, DQ,
        row_start, cols, q_block_ids, k_block_ids, bar_start, bar_pos, active,
        s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_db, s_ds, s_dh, s_gb, s_gs, s_gh,
        qk_scale, sm_scale, n_q, n_k, heads_q, heads_kv, seq_q,
        BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BAR_N: tl.constexpr,
        GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_BARS: tl.constexpr, ADD_DQ: tl.constexpr,
        IEEE: tl.constexpr,
    ):  # fmt: skip
        bh = tl.program_id(0)
        m = tl.program_id(1)
        b = bh // heads_q
        hq = bh % heads_q
        hk = hq // GROUP
        row = (b * heads_kv + hk) * n_q + m
        offs_m = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, HEAD_DIM)
        tok = (m * BLOCK + offs_m).to(tl.int64)
        q_pos = tl.load(q_block_ids + m) * BLOCK + offs_m
        q = tl.load(Q + b.to(tl.int64) * s_qb + tok[:, None] * s_qs + hq * s_qh + offs_d[None, :])
        do = tl.load(DO + b.to(tl.int64) * s_db + tok[:, None] * s_ds + hq * s_dh + offs_d[None, :])
        lse2 = tl.load(Lse + bh.to(tl.int64) * seq_q + tok) * 1.4426950408889634
        delta = tl.load(Delta + bh.to(tl.int64) * seq_q + tok)
        k_base = K + b.to(tl.int64) * s_kb + hk * s_kh
        v_base = V + b.to(tl.int64) * s_vb + hk * s_vh
        dq = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
        start = tl.load(row_start + row)
        stop = tl.load(row_start + row + 1)
        unmasked_stop = stop - 1 if CAUSAL else stop  # as in the forward: only the last block is diagonal
        for i in range(start, unmasked_stop):
            kb = tl.load(cols + i)
            dq = _dq_block(
                q, do, k_base, v_base, kb, tl.load(k_block_ids + kb) * BLOCK, q_pos, s_ks, s_vs, lse2, delta, dq,
                qk_scale, BLOCK, BLOCK_N, HEAD_DIM, False, IEEE,
            )  # fmt: skip
        if CAUSAL and stop > start:
            kb = tl.load(cols + stop - 1)
            dq = _dq_block(
                q, do, k_base, v_base, kb, tl.load(k_block_ids + kb) * BLOCK, q_pos, s_ks, s_vs, lse2, delta, dq,
                qk_scale, BLOCK, BLOCK_N, HEAD_DIM, True, IEEE,
            )  # fmt: skip
        if HAS_BARS:
            stop = tl.load(bar_start + b * heads_kv + hk + 1)
            for c in range(tl.load(bar_start + b * heads_kv + hk), stop, BAR_N):
                k, v, visible = _bar_keys(
                    bar_pos, active, k_block_ids, c, stop, row, n_k, k_base, v_base, s_ks, s_vs, q_pos,
                    BLOCK, BAR_N, HEAD_DIM, CAUSAL,
                )  # fmt: skip
                dq = _dq_step(q, do, k, v, visible, lse2, delta, dq, qk_scale, True, IEEE)
        dq_ptr = DQ + b.to(tl.int64) * s_gb + tok[:, None] * s_gs + hq * s_gh + offs_d[None, :]
        dq = dq * sm_scale
        if ADD_DQ:
            dq += tl.load(dq_ptr)
        tl.store(dq_ptr, dq)

    @triton.jit
    def _delta_kernel(DO, Out, Delta, s_db, s_ds, s_dh, s_ob, s_os, s_oh, heads, seq,
                      BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):  # fmt: skip
        """Delta[b, h, s] = Σ_d dO·O over ``BLOCK`` tokens of one (batch, head), in fp32."""
        bh = tl.program_id(0)
        b = bh // heads
        h = bh % heads
        tok = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = tok < seq
        offs_d = tl.arange(0, HEAD_DIM)
        t = tok.to(tl.int64)[:, None]
        do = tl.load(DO + b.to(tl.int64) * s_db + t * s_ds + h * s_dh + offs_d[None, :], mask=inside[:, None])
        o = tl.load(Out + b.to(tl.int64) * s_ob + t * s_os + h * s_oh + offs_d[None, :], mask=inside[:, None])
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(Delta + bh.to(tl.int64) * seq + tok, delta, mask=inside)

    @triton.jit
    def _dkdv_step(
        k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, k_pos, q_pos, use_k, dk, dv, qk_scale,
        MASKED: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """Adds one query slice's share into ``dk``/``dv`` ``[N, D]`` (keys on rows: p and ds transposed);
        ``MASKED``: keys ``use_k`` only, each up to its query (``k_pos <= q_pos``)."""
        q = tl.load(q_ptr)
        do = tl.load(do_ptr)
        lse2 = tl.load(lse_ptr) * 1.4426950408889634
        delta = tl.load(delta_ptr)
        s_t = _dot(k, tl.trans(q), IEEE) * qk_scale
        p_t = tl.math.exp2(s_t - lse2[None, :])
        if MASKED:
            p_t = tl.where(use_k[:, None] & (k_pos[:, None] <= q_pos[None, :]), p_t, 0.0)
        dv += _dot(p_t.to(do.dtype), do, IEEE)
        dp_t = _dot(v, tl.trans(do), IEEE)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, IEEE)
        return dk, dv

    @triton.jit
    def _dkdv_block(
        k, v, q_base, do_base, lse_base, delta_base, m, q_block_ids, s_qs, s_ds, k_pos, use_k, dk, dv, qk_scale,
        BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
        IEEE: tl.constexpr,
    ):  # fmt: skip
        """``dk``/``dv`` share of query block ``m`` (one query head: the bases point at it), in ``BLOCK_M`` slices."""
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q_first = tl.load(q_block_ids + m) * BLOCK
        first_row = tl.cast(m, tl.int64) * BLOCK
        q_blk = q_base + first_row * s_qs
        do_blk = do_base + first_row * s_ds
        for m0 in tl.static_range(0, BLOCK, BLOCK_M):
            rows = m0 + offs_m
            dk, dv = _dkdv_step(
                k, v, q_blk + rows[:, None] * s_qs + offs_d[None, :], do_blk + rows[:, None] * s_ds + offs_d[None, :],
                lse_base + first_row + rows, delta_base + first_row + rows, k_pos, q_first + rows, use_k, dk, dv,
                qk_scale, MASKED, IEEE,
            )  # fmt: skip
        return dk, dv

    @triton.jit
    def _dkdv_kernel(
        Q, K, V, DO, Lse, Delta, DK, DV,
        col_start, rows, seg_row, seg_start, q_block_ids, k_block_ids,
        s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_db, s_ds, s_dh, s_gb, s_gs, s_gh,
        qk_scale, sm_scale, n_q, n_k, heads_q, heads_kv, seq_q,
        BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP: tl.constexpr,
        CAUSAL: tl.constexpr, ATOMIC: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """One segment of one key block's query-block list (``seg_row``: batch·KV head·nK + key block; the list
        positions ``seg_start[i] … seg_start[i + 1]``): stores its ``dk``/``dv``, or adds them atomically when
        long lists are cut into several segments (``ATOMIC``)."""
        seg = tl.program_id(0)
        row = tl.load(seg_row + seg)
        bh = row // n_k
        n = row % n_k
        b = bh // heads_kv
        hk = bh % heads_kv
        offs_n = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, HEAD_DIM)
        keys = (n * BLOCK + offs_n).to(tl.int64)
        k_pos = tl.load(k_block_ids + n) * BLOCK + offs_n
        k = tl.load(K + b.to(tl.int64) * s_kb + keys[:, None] * s_ks + hk * s_kh + offs_d[None, :])
        v = tl.load(V + b.to(tl.int64) * s_vb + keys[:, None] * s_vs + hk * s_vh + offs_d[None, :])
        dk = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
        everything = offs_n >= 0
        start = tl.load(seg_start + seg)
        stop = tl.load(seg_start + seg + 1)
        # Causal, sorted: only the first query block of the whole list can be this key block's own (diagonal).
        diagonal = (start == tl.load(col_start + row)) & (stop > start) if CAUSAL else start < 0
        unmasked_start = start + diagonal.to(tl.int32)
        for g in range(GROUP):
            hq = hk * GROUP + g
            q_base = Q + b.to(tl.int64) * s_qb + hq * s_qh
            do_base = DO + b.to(tl.int64) * s_db + hq * s_dh
            stat = (b * heads_q + hq).to(tl.int64) * seq_q
            if diagonal:
                dk, dv = _dkdv_block(
                    k, v, q_base, do_base, Lse + stat, Delta + stat, tl.load(rows + start), q_block_ids, s_qs,
                    s_ds, k_pos, everything, dk, dv, qk_scale, BLOCK, BLOCK_M, HEAD_DIM, True, IEEE,
                )  # fmt: skip
            for i in range(unmasked_start, stop):
                dk, dv = _dkdv_block(
                    k, v, q_base, do_base, Lse + stat, Delta + stat, tl.load(rows + i), q_block_ids, s_qs, s_ds,
                    k_pos, everything, dk, dv, qk_scale, BLOCK, BLOCK_M, HEAD_DIM, False, IEEE,
                )  # fmt: skip
        g_off = b.to(tl.int64) * s_gb + keys[:, None] * s_gs + hk * s_gh + offs_d[None, :]
        if ATOMIC:
            tl.atomic_add(DK + g_off, dk * sm_scale, sem="relaxed")
            tl.atomic_add(DV + g_off, dv, sem="relaxed")
        else:
            tl.store(DK + g_off, dk * sm_scale)
            tl.store(DV + g_off, dv)

    @triton.jit
    def _bar_dkdv_kernel(
        Q, K, V, DO, Lse, Delta, DKB, DVB,
        bar_start, bar_pos, active, q_block_ids, k_block_ids,
        s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_db, s_ds, s_dh,
        qk_scale, sm_scale, n_q, n_k, heads_q, heads_kv, seq_q, total_bars, q_per_split,
        BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BAR_N: tl.constexpr,
        GROUP: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """Bars' ``dk``/``dv`` from query blocks ``split·q_per_split …`` (program axis 2), into that split's slice
        of ``DKB``/``DVB`` ``[splits, total_bars, D]``: splitting the query blocks keeps the GPU busy with few bars."""
        bh = tl.program_id(0)
        c = tl.load(bar_start + bh) + tl.program_id(1) * BAR_N
        stop = tl.load(bar_start + bh + 1)
        split = tl.program_id(2)
        if c < stop:
            b = bh // heads_kv
            hk = bh % heads_kv
            offs_d = tl.arange(0, HEAD_DIM)
            idx = c + tl.arange(0, BAR_N)
            valid = idx < stop
            pos = tl.load(bar_pos + idx, mask=valid, other=0)
            kb = pos // BLOCK
            k_pos = tl.load(k_block_ids + kb, mask=valid, other=0) * BLOCK + pos % BLOCK
            keys = pos.to(tl.int64)
            k = tl.load(K + b.to(tl.int64) * s_kb + keys[:, None] * s_ks + hk * s_kh + offs_d[None, :],
                        mask=valid[:, None], other=0.0)  # fmt: skip
            v = tl.load(V + b.to(tl.int64) * s_vb + keys[:, None] * s_vs + hk * s_vh + offs_d[None, :],
                        mask=valid[:, None], other=0.0)  # fmt: skip
            if CAUSAL:
                first_key = tl.min(tl.where(valid, k_pos, 2147483647), 0)
            else:
                first_key = tl.min(tl.where(valid, 0, 0), 0)
            dk = tl.zeros([BAR_N, HEAD_DIM], tl.float32)
            dv = tl.zeros([BAR_N, HEAD_DIM], tl.float32)
            for m in range(split * q_per_split, tl.minimum(split * q_per_split + q_per_split, n_q)):
                # Causal: query blocks that end before the earliest bar see none of them.
                if tl.load(q_block_ids + m) * BLOCK + BLOCK > first_key:
                    held = tl.load(active + ((bh * n_q + m).to(tl.int64)) * n_k + kb, mask=valid, other=1)
                    use = valid & (held == 0)
                    for g in range(GROUP):
                        hq = hk * GROUP + g
                        stat = (b * heads_q + hq).to(tl.int64) * seq_q
                        dk, dv = _dkdv_block(
                            k, v, Q + b.to(tl.int64) * s_qb + hq * s_qh, DO + b.to(tl.int64) * s_db + hq * s_dh,
                            Lse + stat, Delta + stat, m, q_block_ids, s_qs, s_ds, k_pos, use, dk, dv, qk_scale,
                            BLOCK, BLOCK_M, HEAD_DIM, True, IEEE,
                        )  # fmt: skip
            out = (split.to(tl.int64) * total_bars + idx)[:, None] * HEAD_DIM + offs_d[None, :]
            tl.store(DKB + out, dk * sm_scale, mask=valid[:, None])
            tl.store(DVB + out, dv, mask=valid[:, None])


def _strides(x_BSHD: torch.Tensor) -> tuple[int, int, int]:
    if x_BSHD.stride(-1) != 1:
        raise ValueError(f"the head dim must be contiguous (stride 1), got strides {x_BSHD.stride()}")
    return x_BSHD.stride(0), x_BSHD.stride(1), x_BSHD.stride(2)


def _tiles(block: int, head_dim: int) -> dict[str, dict]:
    """Per kernel: its tile (``BLOCK_N`` key slice / ``BLOCK_M`` query slice) and launch options for
    ``block``-token blocks. Small under the interpreter, where every program is numpy; on Hopper, tuned with
    ``benchmarks/sparse_kernel.py --sweep`` at head dim 128, block 128."""
    if _INTERPRET:
        return {"fwd": {"BLOCK_N": min(block, 32)}, "dq": {"BLOCK_N": min(block, 32)},
                "dkdv": {"BLOCK_M": min(block, 32)}, "bars": {"BLOCK_M": min(block, 32)}}  # fmt: skip
    wide = head_dim > 64
    warps = 8 if block >= 128 else 4
    return {
        "fwd": {"BLOCK_N": min(block, 128), "num_warps": warps, "num_stages": 3 if wide else 4},
        "dq": {"BLOCK_N": min(block, 64), "num_warps": warps, "num_stages": 2},
        "dkdv": {"BLOCK_M": min(block, 32 if wide else 64), "num_warps": warps, "num_stages": 2},
        "bars": {"BLOCK_M": min(block, 32 if wide else 64), "num_warps": 4, "num_stages": 2},
    }


def _prepared(*tensors: torch.Tensor) -> list[torch.Tensor]:
    # The interpreter computes bf16 wrong (see the module docstring): it gets fp32 copies.
    return [t.float() if _INTERPRET and t.dtype != torch.float32 else t for t in tensors]


def _bar_args(lists: SparseLists, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if lists.bar_pos is None:
        dummy = torch.zeros(1, dtype=torch.int32, device=like.device)
        return dummy, dummy, dummy.to(torch.uint8)
    return lists.bar_start, lists.bar_pos, lists.active


def _check(q_BSHD, k_BSHD, v_BSHD, lists: SparseLists) -> None:
    reason = unsupported_reason(q_BSHD, lists.block)
    if reason is not None:
        raise ValueError(f"the block-sparse Triton kernel cannot run these inputs: {reason}")
    b, sq, hq, d = q_BSHD.shape
    if k_BSHD.shape != v_BSHD.shape or k_BSHD.shape[0] != b or k_BSHD.shape[3] != d or hq % k_BSHD.shape[2]:
        raise ValueError(
            f"q {tuple(q_BSHD.shape)}, k {tuple(k_BSHD.shape)}, v {tuple(v_BSHD.shape)}: need q [B, Sq, Hq, D], "
            "k = v [B, Sk, Hkv, D] with Hq a multiple of Hkv"
        )
    covered = (lists.n_q * lists.block, lists.n_k * lists.block, lists.batch, lists.heads_kv)
    if (sq, k_BSHD.shape[1], b, k_BSHD.shape[2]) != covered:
        raise ValueError(
            f"the lists cover {lists.n_q}×{lists.n_k} blocks of {lists.block} tokens, batch {lists.batch} and "
            f"{lists.heads_kv} KV heads; q holds {sq} and k {k_BSHD.shape[1]} tokens, batch {b}, "
            f"{k_BSHD.shape[2]} KV heads"
        )


def block_sparse_forward(
    q_BSHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    v_BSHD: torch.Tensor,
    lists: SparseLists,
    scale: float,
    *,
    out_BSHD: torch.Tensor | None = None,
    lse_BHS: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention of ``q`` ``[B, Sq, Hq, D]`` to the held ``k``/``v`` ``[B, Sk, Hkv, D]`` within
    ``lists``: ``(out_BSHD in out_dtype, lse_BHS fp32)``, rows that see nothing getting 0 and -inf.

    Given a running ``out_BSHD``/``lse_BHS`` (fp32, contiguous, over other keys) the result is merged into them
    in place and they are returned. Local to this device: no communication.
    """
    _check(q_BSHD, k_BSHD, v_BSHD, lists)
    q, k, v = _prepared(q_BSHD, k_BSHD, v_BSHD)
    b, sq, hq, d = q.shape
    accumulate = out_BSHD is not None
    if not accumulate:
        out_BSHD = torch.empty(q.shape, dtype=out_dtype, device=q.device)
        lse_BHS = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    if lists.n_q == 0:  # nothing to attend from: a fresh result is empty, a running one unchanged
        if not accumulate:
            out_BSHD.zero_()
            lse_BHS.fill_(float("-inf"))
        return out_BSHD, lse_BHS
    tiles = _tiles(lists.block, d)
    bar_start, bar_pos, active = _bar_args(lists, q)
    _fwd_kernel[(b * hq, lists.n_q)](
        q, k, v, out_BSHD, lse_BHS,
        lists.row_start, lists.cols, lists.q_block_ids, lists.k_block_ids, bar_start, bar_pos, active,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out_BSHD),
        scale * _LOG2E, lists.n_q, lists.n_k, hq, lists.heads_kv, sq,
        BLOCK=lists.block, HEAD_DIM=d, BAR_N=BAR_N, GROUP=hq // lists.heads_kv,
        CAUSAL=lists.causal, HAS_BARS=lists.bar_pos is not None, ACCUMULATE=accumulate,
        IEEE=q.dtype == torch.float32, **tiles["fwd"],
    )  # fmt: skip
    return out_BSHD, lse_BHS


def attention_delta(dout_BSHD: torch.Tensor, out_BSHD: torch.Tensor) -> torch.Tensor:
    """fp32 ``[B, H, S]``: rowsum(dout · out), the softmax backward's per-row term (FlashAttention-2's D).
    One fused Triton pass where the kernels run (torch would write fp32 copies of both); torch elsewhere."""
    if unsupported_reason(dout_BSHD, 16) is not None:
        return (dout_BSHD.float() * out_BSHD.float()).sum(-1).transpose(1, 2).contiguous()
    b, s, h, d = out_BSHD.shape
    delta = torch.empty((b, h, s), dtype=torch.float32, device=out_BSHD.device)
    _delta_kernel[(b * h, triton.cdiv(s, 64))](
        dout_BSHD, out_BSHD, delta, *_strides(dout_BSHD), *_strides(out_BSHD), h, s, BLOCK=64, HEAD_DIM=d
    )
    return delta


def block_sparse_backward(
    dout_BSHD: torch.Tensor,
    q_BSHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    v_BSHD: torch.Tensor,
    lse_BHS: torch.Tensor,
    delta_BHS: torch.Tensor,
    lists: SparseLists,
    scale: float,
    dq_BSHD: torch.Tensor,
    dkv_2BSHD: torch.Tensor | None = None,
    *,
    add_dq: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`block_sparse_forward`'s share of the attention, from the *global* ``lse``
    ``[B, Hq, Sq]`` and ``delta`` (:func:`attention_delta` of the global output): adds the queries' share into
    ``dq_BSHD`` (in place, any float dtype; fp32 when it sums several calls; ``add_dq=False``: overwrites it)
    and returns ``(dk, dv)``
    ``[B, Sk, Hkv, D]`` of the held keys: fp32, or written into ``dkv_2BSHD`` (``[2, B, Sk, Hkv, D]``, any float
    dtype, overwritten) when given. Local: no communication.
    """
    _check(q_BSHD, k_BSHD, v_BSHD, lists)
    q, k, v, do = _prepared(q_BSHD, k_BSHD, v_BSHD, dout_BSHD)
    b, sq, hq, d = q.shape
    if dkv_2BSHD is None:
        dkv_2BSHD = torch.empty((2, *k.shape), dtype=torch.float32, device=k.device)
    dk, dv = dkv_2BSHD[0], dkv_2BSHD[1]
    if lists.n_q == 0 or lists.n_k == 0:
        dkv_2BSHD.zero_()
        if not add_dq:
            dq_BSHD.zero_()
        return dk, dv
    lse_BHS, delta_BHS = lse_BHS.contiguous(), delta_BHS.contiguous()
    tiles = _tiles(lists.block, d)
    bar_start, bar_pos, active = _bar_args(lists, q)
    group = hq // lists.heads_kv
    common = dict(
        BLOCK=lists.block, HEAD_DIM=d, GROUP=group, CAUSAL=lists.causal, IEEE=q.dtype == torch.float32
    )
    sizes = (scale * _LOG2E, scale, lists.n_q, lists.n_k, hq, lists.heads_kv, sq)
    _dq_kernel[(b * hq, lists.n_q)](
        q, k, v, do, lse_BHS, delta_BHS, dq_BSHD,
        lists.row_start, lists.cols, lists.q_block_ids, lists.k_block_ids, bar_start, bar_pos, active,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq_BSHD), *sizes,
        BAR_N=BAR_N, HAS_BARS=lists.bar_pos is not None, ADD_DQ=add_dq, **common, **tiles["dq"],
    )  # fmt: skip
    seg_row, seg_start = lists.key_segments
    atomic = len(seg_row) > lists.batch * lists.heads_kv * lists.n_k  # some list was cut in several
    # Atomic adds go to a zeroed fp32 buffer (the caller's when it is one).
    target = dkv_2BSHD
    if atomic:
        fp32 = dkv_2BSHD.dtype == torch.float32
        target = dkv_2BSHD.zero_() if fp32 else torch.zeros_like(dkv_2BSHD, dtype=torch.float32)
    _dkdv_kernel[(len(seg_row),)](
        q, k, v, do, lse_BHS, delta_BHS, target[0], target[1],
        lists.col_start, lists.rows, seg_row, seg_start, lists.q_block_ids, lists.k_block_ids,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(target[0]), *sizes,
        ATOMIC=atomic, **common, **tiles["dkdv"],
    )  # fmt: skip
    if target is not dkv_2BSHD:
        dkv_2BSHD.copy_(target)
    if lists.bar_pos is not None:
        chunks = b * lists.heads_kv * triton.cdiv(lists.max_bars, BAR_N)
        splits = max(1, min(lists.n_q, triton.cdiv(_BAR_PROGRAMS, chunks)))
        q_per_split = triton.cdiv(lists.n_q, splits)
        # Zeroed: a chunk's programs beyond its last bar, or a split with no query block, store nothing.
        dk_bars = torch.zeros(splits, len(lists.bar_pos), d, dtype=torch.float32, device=k.device)
        dv_bars = torch.zeros_like(dk_bars)
        _bar_dkdv_kernel[(b * lists.heads_kv, triton.cdiv(lists.max_bars, BAR_N), splits)](
            q, k, v, do, lse_BHS, delta_BHS, dk_bars, dv_bars,
            lists.bar_start, lists.bar_pos, lists.active, lists.q_block_ids, lists.k_block_ids,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *sizes, len(lists.bar_pos), q_per_split,
            BAR_N=BAR_N, **common, **tiles["bars"],
        )  # fmt: skip
        where = (lists.bar_batch, lists.bar_pos.long(), lists.bar_head)
        dk.index_put_(where, dk_bars.sum(0), accumulate=True)
        dv.index_put_(where, dv_bars.sum(0), accumulate=True)
    return dk, dv


class _BlockSparseAttention(torch.autograd.Function):
    # One call covers every key, so results go straight to the inputs' dtype (no fp32 round trip); only the
    # bars' key gradients, added on top of the blocks', accumulate in fp32.
    @staticmethod
    def forward(ctx, q, k, v, lists: SparseLists, scale: float):
        out, lse = block_sparse_forward(q, k, v, lists, scale, out_dtype=q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.lists, ctx.scale = lists, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dkv_dtype = torch.float32 if ctx.lists.bar_pos is not None else k.dtype
        dkv = torch.empty((2, *k.shape), dtype=dkv_dtype, device=k.device)
        dk, dv = block_sparse_backward(
            dout, q, k, v, lse, attention_delta(dout, out), ctx.lists, ctx.scale, dq, dkv, add_dq=False
        )
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None


def block_sparse_attention(
    q_BSHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    v_BSHD: torch.Tensor,
    pattern,
    *,
    scale: float | None = None,
    lists: SparseLists | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention of a whole sequence within ``pattern`` (a ``BlockPattern`` over it):
    ``(out_BSHD in q's dtype, lse_BHS fp32)``; differentiable in q, k, v. Single device, no communication.

    q ``[B, S, Hq, D]``, k/v ``[B, S, Hkv, D]``, S = the pattern's blocks × block. ``lists``: the pattern's
    :func:`sparse_lists` over every block, when the caller reuses them across calls.
    """
    if lists is None:
        every = torch.arange(pattern.active_BHQK.shape[-1], device=q_BSHD.device)
        lists = sparse_lists(pattern, every, every)
    return _BlockSparseAttention.apply(q_BSHD, k_BSHD, v_BSHD, lists, scale or q_BSHD.shape[-1] ** -0.5)


__all__ = [
    "BAR_N",
    "SparseLists",
    "attention_delta",
    "block_sparse_attention",
    "block_sparse_backward",
    "block_sparse_forward",
    "sparse_lists",
    "unsupported_reason",
]
