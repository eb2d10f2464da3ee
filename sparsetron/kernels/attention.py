"""Block attention with LSE: the entry point every context-parallel method calls.

``block_attention_forward`` / ``block_attention_backward`` compute one (query shard, key shard) pair given the
GLOBAL token indices of both sides (see :mod:`sparsetron.kernels.attention_ref` for the mask semantics). Output
and LSE are fp32 so partial results merge without loss; the backward takes the global output and LSE.

**Run decomposition.** Each side's indices split into maximal runs of consecutive global indices (contiguous
shards have 1, zigzag 2, striped ``S_local / block``). Every (query run, key run) pair is one of

- EMPTY: nothing visible (causal with every key after every query, or a window that excludes all) — skipped;
- FULL: everything visible, no doc ids (a window that cuts nothing in the pair does not count);
- CAUSAL_DIAG: causal, no doc ids, both runs cover the same index range (the kernels' own causal mask);
- PARTIAL: anything else (doc ids, a window that cuts, offset causal overlaps) — computed with the mask.

Adjacent key runs of the same kind (FULL or PARTIAL) are computed as one pair, and so are adjacent query runs
with identical pairs and no CAUSAL_DIAG: neither kind depends on where runs start (PARTIAL builds its mask
from the indices), so e.g. a zigzag ring step is a single kernel call. Partial outputs of one query run merge
over its key pairs with :func:`merge_partials` (fp32); disjoint query runs are concatenated; rows that see
nothing get out 0 and lse -inf. The backward walks the same plan: dq accumulates over key pairs, dk/dv over
query runs, in fp32 (fp64 for fp64 inputs).

**Fragmented blocks.** A side cut into many short runs (striped with small blocks) would turn into thousands
of kernel calls, each with host work (slicing, launch, fp32 merge: tens of µs) and tiles mostly empty below
~64 rows. So when there are more than ``FEW_RUN_PAIRS`` run pairs and a side's runs average under
``MIN_RUN_TOKENS`` tokens, or more than ``MAX_RUN_PAIRS`` pairs at all (planning alone would cost
milliseconds), the whole block is one masked call (PARTIAL), unless its bounding index ranges are EMPTY.

**Backends** (``backend=``): ``reference`` is the mask-based fp32 math of :mod:`attention_ref` on any device
(the CPU path and the oracle; rows are processed in chunks so its score matrix stays bounded). ``flash`` and
``cudnn`` run FULL and CAUSAL_DIAG pairs through torch's fused kernels (:mod:`attention_sdpa`, bf16/fp16 on
CUDA, GQA heads expanded locally) and PARTIAL pairs through the reference on the same device. ``auto`` picks
the faster fused kernel per pair shape where one can run (rule in :func:`attention_sdpa.pick`: cuDNN from
1K×1K tokens up, flash below), else the reference. A forced fused backend that cannot run raises.

Planning reads both index tensors on the host: pass them on the CPU to avoid a device sync per call.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from sparsetron.kernels import attention_sdpa
from sparsetron.kernels.attention_ref import (
    attention_backward_ref,
    attention_forward_ref,
    merge_partials,
    visible_mask,
)

BACKENDS = ("auto", "reference", *attention_sdpa.FUSED_BACKENDS)
#: Beyond this many (query run, key run) pairs a block is always computed as one masked call.
MAX_RUN_PAIRS = 1024
#: Up to this many pairs a block is always decomposed, however short its runs.
FEW_RUN_PAIRS = 16
#: Runs averaging fewer tokens than this (on either side) count as short.
MIN_RUN_TOKENS = 64
#: The reference backend processes query rows in chunks of at most this many score elements (B·H·rows·Sk).
REF_SCORE_ELEMENTS = 1 << 26


class PairKind(enum.Enum):
    """How much of a (query run, key run) pair is visible, which decides how it is computed."""

    EMPTY = "empty"
    FULL = "full"
    CAUSAL_DIAG = "causal_diag"
    PARTIAL = "partial"


_FUSED_KINDS = (PairKind.FULL, PairKind.CAUSAL_DIAG)
# Kinds that do not depend on where a run starts, so adjacent ones compute as one.
_MERGEABLE_KINDS = (PairKind.EMPTY, PairKind.FULL, PairKind.PARTIAL)


@dataclass(frozen=True)
class Run:
    """Local positions ``[start, stop)`` holding the consecutive global indices ``first, first + 1, …``."""

    start: int
    stop: int
    first: int

    @property
    def last(self) -> int:
        return self.first + self.stop - self.start - 1


@dataclass(frozen=True)
class KeyPart:
    """Local key positions ``k`` and how the query rows that own this part see them."""

    k: slice
    kind: PairKind


@dataclass(frozen=True)
class RowPlan:
    """Local query rows ``q`` and the non-empty key parts they attend over, in local key order."""

    q: slice
    parts: tuple[KeyPart, ...]


def index_runs(index_S: torch.Tensor) -> list[Run]:
    """Maximal runs of consecutive global indices in ``index_S`` (int, ``[S]``), in local order; host-side."""
    index = index_S.detach().to("cpu", torch.int64)
    if index.numel() == 0:
        return []
    breaks = (torch.nonzero(index[1:] - index[:-1] != 1).flatten() + 1).tolist()
    starts, stops = [0, *breaks], [*breaks, index.numel()]
    firsts = index[starts].tolist()
    return [Run(a, b, f) for a, b, f in zip(starts, stops, firsts, strict=True)]


def _nothing_visible(lo: int, hi: int, *, causal: bool, window: int | None) -> bool:
    # Visible pairs need 0 <= i - j (causal) and i - j < window; the pair's i - j spans [lo, hi].
    return (causal and hi < 0) or (window is not None and lo >= window)


def classify_pair(q_run: Run, k_run: Run, *, causal: bool, window: int | None, has_docs: bool) -> PairKind:
    """The :class:`PairKind` of one (query run, key run) pair from their global index ranges."""
    lo, hi = q_run.first - k_run.last, q_run.last - k_run.first
    if _nothing_visible(lo, hi, causal=causal, window=window):
        return PairKind.EMPTY
    cut_by_window = window is not None and hi >= window
    if has_docs or cut_by_window:
        return PairKind.PARTIAL
    if not causal or lo >= 0:
        return PairKind.FULL
    same_range = q_run.first == k_run.first and q_run.last == k_run.last
    return PairKind.CAUSAL_DIAG if same_range else PairKind.PARTIAL


def _merge_adjacent(parts: list[KeyPart]) -> list[KeyPart]:
    merged: list[KeyPart] = []
    for part in parts:
        if merged and part.kind == merged[-1].kind and part.kind in _MERGEABLE_KINDS:
            merged[-1] = KeyPart(slice(merged[-1].k.start, part.k.stop), part.kind)
        else:
            merged.append(part)
    return merged


def _key_parts(q_run: Run, k_runs: list[Run], *, causal: bool, window: int | None, has_docs: bool):
    parts = [
        KeyPart(
            slice(k.start, k.stop), classify_pair(q_run, k, causal=causal, window=window, has_docs=has_docs)
        )
        for k in k_runs
    ]
    return tuple(p for p in _merge_adjacent(parts) if p.kind is not PairKind.EMPTY)


def _merge_rows(rows: list[RowPlan]) -> list[RowPlan]:
    merged: list[RowPlan] = []
    for row in rows:
        # A CAUSAL_DIAG part is tied to its own query range (the kernel's mask assumes aligned indices).
        independent = all(p.kind is not PairKind.CAUSAL_DIAG for p in row.parts)
        if merged and independent and row.parts == merged[-1].parts:
            merged[-1] = RowPlan(slice(merged[-1].q.start, row.q.stop), row.parts)
        else:
            merged.append(row)
    return merged


def _fragmented(q_runs: list[Run], k_runs: list[Run]) -> bool:
    pairs = len(q_runs) * len(k_runs)
    mean_q = q_runs[-1].stop / len(q_runs)
    mean_k = k_runs[-1].stop / len(k_runs)
    return pairs > MAX_RUN_PAIRS or (pairs > FEW_RUN_PAIRS and min(mean_q, mean_k) < MIN_RUN_TOKENS)


def _whole_block(q_runs: list[Run], k_runs: list[Run], *, causal: bool, window: int | None) -> RowPlan:
    lo = min(r.first for r in q_runs) - max(r.last for r in k_runs)
    hi = max(r.last for r in q_runs) - min(r.first for r in k_runs)
    rows = slice(0, q_runs[-1].stop)
    if _nothing_visible(lo, hi, causal=causal, window=window):
        return RowPlan(rows, ())
    return RowPlan(rows, (KeyPart(slice(0, k_runs[-1].stop), PairKind.PARTIAL),))


def plan_block(
    q_index_S: torch.Tensor, k_index_S: torch.Tensor, *, causal: bool, window: int | None, has_docs: bool
) -> list[RowPlan]:
    """How to compute one block: query row ranges in order (covering all rows) with their key parts.

    Host-side (reads the indices on the CPU); no communication.
    """
    q_runs, k_runs = index_runs(q_index_S), index_runs(k_index_S)
    if not q_runs:
        return []
    if not k_runs:
        return [RowPlan(slice(0, q_runs[-1].stop), ())]
    if _fragmented(q_runs, k_runs):
        return [_whole_block(q_runs, k_runs, causal=causal, window=window)]
    rows = [
        RowPlan(
            slice(r.start, r.stop), _key_parts(r, k_runs, causal=causal, window=window, has_docs=has_docs)
        )
        for r in q_runs
    ]
    return _merge_rows(rows)


@dataclass(frozen=True)
class _Block:
    """The tensors and mask settings of one block call, shared by all its pairs."""

    q_BSHD: torch.Tensor
    k_BSHD: torch.Tensor
    v_BSHD: torch.Tensor
    q_index_S: torch.Tensor
    k_index_S: torch.Tensor
    q_doc_BS: torch.Tensor | None
    k_doc_BS: torch.Tensor | None
    causal: bool
    window: int | None
    scale: float
    kernels: tuple[str, ...]  # the fused kernels FULL/CAUSAL_DIAG pairs may use; () means the reference

    def mask(self, q: slice, k: slice) -> torch.Tensor:
        device = self.q_BSHD.device
        return visible_mask(
            self.q_index_S[q].to(device),
            self.k_index_S[k].to(device),
            causal=self.causal,
            q_doc_BS=None if self.q_doc_BS is None else self.q_doc_BS[:, q].to(device),
            k_doc_BS=None if self.k_doc_BS is None else self.k_doc_BS[:, k].to(device),
            window=self.window,
        )

    def fused(self, part: KeyPart) -> bool:
        return bool(self.kernels) and part.kind in _FUSED_KINDS

    def kernel(self, seq_q: int, seq_k: int) -> str:
        return attention_sdpa.pick(self.kernels, seq_q, seq_k)


def _prepare(
    q_BSHD, k_BSHD, v_BSHD, q_index_S, k_index_S, q_doc_BS, k_doc_BS, causal, window, scale, backend
):
    _check_shapes(q_BSHD, k_BSHD, v_BSHD, q_index_S, k_index_S)
    block = _Block(
        q_BSHD=q_BSHD,
        k_BSHD=k_BSHD,
        v_BSHD=v_BSHD,
        q_index_S=q_index_S,
        k_index_S=k_index_S,
        q_doc_BS=q_doc_BS,
        k_doc_BS=k_doc_BS,
        causal=causal,
        window=window,
        scale=scale,
        kernels=_fused_kernels(backend, q_BSHD),
    )
    rows = plan_block(q_index_S, k_index_S, causal=causal, window=window, has_docs=q_doc_BS is not None)
    return block, rows


def _fused_kernels(backend: str, q_BSHD: torch.Tensor) -> tuple[str, ...]:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "reference":
        return ()
    if backend == "auto":
        return attention_sdpa.runnable(q_BSHD)
    reason = attention_sdpa.unsupported_reason(backend, q_BSHD)
    if reason is not None:
        raise ValueError(
            f"backend={backend!r} cannot run these inputs: {reason}; "
            "use backend='auto' (fused where possible, else the reference) or backend='reference'"
        )
    return (backend,)


def _check_shapes(q_BSHD, k_BSHD, v_BSHD, q_index_S, k_index_S) -> None:
    hq, hkv = q_BSHD.shape[2], k_BSHD.shape[2]
    if k_BSHD.shape != v_BSHD.shape or hq % hkv:
        raise ValueError(
            f"k {tuple(k_BSHD.shape)} and v {tuple(v_BSHD.shape)} must match and Hq={hq} be a multiple of Hkv={hkv}"
        )
    if q_index_S.shape != (q_BSHD.shape[1],) or k_index_S.shape != (k_BSHD.shape[1],):
        raise ValueError(
            f"indices {tuple(q_index_S.shape)}, {tuple(k_index_S.shape)} must be [Sq]={q_BSHD.shape[1]}, "
            f"[Sk]={k_BSHD.shape[1]}"
        )


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _expand_heads(x_BSHD: torch.Tensor, heads: int) -> torch.Tensor:
    # Local copy only: the fused kernels want equal head counts; K/V never travel expanded.
    groups = heads // x_BSHD.shape[2]
    return x_BSHD.repeat_interleave(groups, dim=2) if groups > 1 else x_BSHD.contiguous()


def _sum_groups(dx_BSHD: torch.Tensor, kv_heads: int) -> torch.Tensor:
    # GQA: the expanded heads' gradients summed per K/V head, upcast inside the reduction (no fp32 copy).
    if dx_BSHD.shape[2] == kv_heads:
        return dx_BSHD
    return dx_BSHD.unflatten(2, (kv_heads, -1)).sum(dim=3, dtype=_acc_dtype(dx_BSHD))


def _has_fused_part(block: _Block, rows: list[RowPlan]) -> bool:
    return any(block.fused(part) for row in rows for part in row.parts)


def _row_chunks(block: _Block, q: slice, seq_k: int) -> list[slice]:
    b, _, hq, _ = block.q_BSHD.shape
    step = max(1, REF_SCORE_ELEMENTS // max(1, b * hq * seq_k))
    return [slice(s, min(s + step, q.stop)) for s in range(q.start, q.stop, step)]


def _reference_forward(block: _Block, q: slice, k: slice) -> tuple[torch.Tensor, torch.Tensor]:
    k_BSHD, v_BSHD = block.k_BSHD[:, k], block.v_BSHD[:, k]
    outs, lses = [], []
    for rows in _row_chunks(block, q, k_BSHD.shape[1]):
        out, lse = attention_forward_ref(
            block.q_BSHD[:, rows], k_BSHD, v_BSHD, block.mask(rows, k), block.scale
        )
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=2)


def _part_forward(block: _Block, kv_wide, q: slice, part: KeyPart) -> tuple[torch.Tensor, torch.Tensor]:
    if not block.fused(part):
        return _reference_forward(block, q, part.k)
    q_BSHD = block.q_BSHD[:, q]
    k_BSHD, v_BSHD = kv_wide[0][:, part.k], kv_wide[1][:, part.k]
    kernel = block.kernel(q_BSHD.shape[1], k_BSHD.shape[1])
    causal = part.kind is PairKind.CAUSAL_DIAG
    return attention_sdpa.fused_forward(kernel, q_BSHD, k_BSHD, v_BSHD, causal=causal, scale=block.scale)


def _row_forward(block: _Block, kv_wide, row: RowPlan) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = None, None
    for part in row.parts:
        out, lse = merge_partials(out, lse, *_part_forward(block, kv_wide, row.q, part))
    if out is None:
        b, _, hq, d = block.q_BSHD.shape
        rows = row.q.stop - row.q.start
        dtype, device = _acc_dtype(block.q_BSHD), block.q_BSHD.device
        out = torch.zeros(b, rows, hq, d, dtype=dtype, device=device)
        lse = torch.full((b, hq, rows), float("-inf"), dtype=dtype, device=device)
    return out, lse


def _wide_kv(block: _Block, rows: list[RowPlan]) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not _has_fused_part(block, rows):
        return None
    hq = block.q_BSHD.shape[2]
    return _expand_heads(block.k_BSHD, hq), _expand_heads(block.v_BSHD, hq)


def _empty_forward(q_BSHD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, s, h, d = q_BSHD.shape
    dtype = _acc_dtype(q_BSHD)
    out = torch.zeros(b, s, h, d, dtype=dtype, device=q_BSHD.device)
    return out, torch.full((b, h, s), float("-inf"), dtype=dtype, device=q_BSHD.device)


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
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over the keys of this block: ``(out_BSHD fp32, lse_BHS fp32)``; no communication.

    q: [B, Sq, Hq, D]; k, v: [B, Sk, Hkv, D]; indices int64 [Sq], [Sk]; doc ids int [B, S] or None.
    fp64 inputs give fp64 results. Rows that see no key here get out 0 and lse -inf.
    ``backend``: 'auto' | 'reference' | 'flash' | 'cudnn' (module docstring).
    """
    block, rows = _prepare(
        q_BSHD, k_BSHD, v_BSHD, q_index_S, k_index_S, q_doc_BS, k_doc_BS, causal, window, scale, backend
    )
    if not rows:
        return _empty_forward(q_BSHD)
    kv_wide = _wide_kv(block, rows)
    pieces = [_row_forward(block, kv_wide, row) for row in rows]
    if len(pieces) == 1:
        return pieces[0]
    return torch.cat([o for o, _ in pieces], dim=1), torch.cat([lse for _, lse in pieces], dim=2)


@dataclass(frozen=True)
class _Grads:
    """The backward's per-call inputs: upstream gradient and the GLOBAL output/LSE of this block's rows."""

    dout_BSHD: torch.Tensor
    out_BSHD: torch.Tensor
    lse_BHS: torch.Tensor


def _reference_backward(block: _Block, grads: _Grads, q: slice, k: slice):
    k_BSHD, v_BSHD = block.k_BSHD[:, k], block.v_BSHD[:, k]
    dqs, dk, dv = [], None, None
    for rows in _row_chunks(block, q, k_BSHD.shape[1]):
        dq_c, dk_c, dv_c = attention_backward_ref(
            grads.dout_BSHD[:, rows],
            block.q_BSHD[:, rows],
            k_BSHD,
            v_BSHD,
            grads.out_BSHD[:, rows],
            grads.lse_BHS[:, :, rows],
            block.mask(rows, k),
            block.scale,
        )
        dqs.append(dq_c)
        dk = dk_c if dk is None else dk + dk_c
        dv = dv_c if dv is None else dv + dv_c
    return torch.cat(dqs, dim=1), dk, dv


def _fused_backward(block: _Block, grads_low: _Grads, kv_wide, q: slice, part: KeyPart):
    q_BSHD = block.q_BSHD[:, q]
    k_BSHD, v_BSHD = kv_wide[0][:, part.k], kv_wide[1][:, part.k]
    kernel = block.kernel(q_BSHD.shape[1], k_BSHD.shape[1])
    dq, dk, dv = attention_sdpa.fused_backward(
        kernel,
        grads_low.dout_BSHD[:, q],
        q_BSHD,
        k_BSHD,
        v_BSHD,
        grads_low.out_BSHD[:, q],
        grads_low.lse_BHS[:, :, q],
        causal=part.kind is PairKind.CAUSAL_DIAG,
        scale=block.scale,
    )
    hkv = block.k_BSHD.shape[2]
    return dq, _sum_groups(dk, hkv), _sum_groups(dv, hkv)


def _part_backward(block: _Block, grads: _Grads, grads_low: _Grads | None, kv_wide, q: slice, part: KeyPart):
    if block.fused(part):
        return _fused_backward(block, grads_low, kv_wide, q, part)
    return _reference_backward(block, grads, q, part.k)


def _row_backward(block, grads, grads_low, kv_wide, row: RowPlan, dk_acc, dv_acc) -> torch.Tensor:
    """dq of ``row`` (summed over its key parts); adds each part's dk/dv into the accumulators in place.

    Parts may come back in bf16 (fused): they are added into fp32 (fp64) accumulators, never summed in bf16.
    """
    acc = dk_acc.dtype
    dq = None
    for part in row.parts:
        dq_p, dk_p, dv_p = _part_backward(block, grads, grads_low, kv_wide, row.q, part)
        dq = dq_p.to(acc) if dq is None else dq.add_(dq_p)
        dk_acc[:, part.k] += dk_p
        dv_acc[:, part.k] += dv_p
    if dq is None:
        b, _, hq, d = block.q_BSHD.shape
        return torch.zeros(b, row.q.stop - row.q.start, hq, d, dtype=acc, device=block.q_BSHD.device)
    return dq


def _low_precision(block: _Block, grads: _Grads, rows: list[RowPlan]) -> _Grads | None:
    # The fused kernels read out/dout in the input dtype, both contiguous so that their strides agree.
    if not _has_fused_part(block, rows):
        return None
    dtype = block.q_BSHD.dtype
    return _Grads(
        grads.dout_BSHD.to(dtype).contiguous(), grads.out_BSHD.to(dtype).contiguous(), grads.lse_BHS
    )


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
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This block's ``(dq, dk, dv)`` (fp32, dk/dv with Hkv heads) from the global ``out`` and ``lse``; no communication.

    dout, out: [B, Sq, Hq, D]; lse: [B, Hq, Sq] fp32 — the merged results over ALL key blocks, so summing
    this over key blocks (dq) and query blocks (dk, dv) gives the exact full gradient. fp64 in, fp64 out.
    """
    block, rows = _prepare(
        q_BSHD, k_BSHD, v_BSHD, q_index_S, k_index_S, q_doc_BS, k_doc_BS, causal, window, scale, backend
    )
    grads = _Grads(dout_BSHD, out_BSHD, lse_BHS)
    grads_low, kv_wide = _low_precision(block, grads, rows), _wide_kv(block, rows)
    acc = _acc_dtype(q_BSHD)
    dk = torch.zeros(k_BSHD.shape, dtype=acc, device=k_BSHD.device)
    dv = torch.zeros(v_BSHD.shape, dtype=acc, device=v_BSHD.device)
    dq_pieces = [_row_backward(block, grads, grads_low, kv_wide, row, dk, dv) for row in rows]
    if not dq_pieces:
        return torch.zeros(q_BSHD.shape, dtype=acc, device=q_BSHD.device), dk, dv
    return torch.cat(dq_pieces, dim=1) if len(dq_pieces) > 1 else dq_pieces[0], dk, dv
