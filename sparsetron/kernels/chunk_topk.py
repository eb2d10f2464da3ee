"""SparseLoCo's heavy pass in one kernel: error-feedback update and per-chunk top-k selection.

For every chunk row of the error buffer ``e_NC`` (fp32, chunk layout) one program loads its ``C`` entries and
the matching ``Δ`` (any float dtype, read straight from the tensor's own layout: 64×64 tiles or flat runs),
stores ``e ← β·e + Δ``, and selects the ``k`` largest ``|e|``: the ``k``-th largest magnitude is found by
bisection on the fp32 bit pattern (positive floats order like their bits, 31 halvings of a count over the
row), ties at the threshold are taken in index order, and the selected positions are compacted with a prefix
sum, so indices come out sorted without a sort. Reads ``e`` and ``Δ`` once and writes ``e`` once: where
torch needs an update, an ``abs`` copy, ``topk``, a sort and a gather, each a full pass.

Deterministic (no atomics, a fixed tie rule: lower indices first). Nothing communicates.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pyproject installs triton on Linux x86_64 only
    triton = None

#: Side of the 2-D tiles (matches sparsetron.parallel.data.compress.TILE).
TILE = 64


def kernel_applies(error_NC: torch.Tensor) -> bool:
    """Whether :func:`fused_ef_topk` should run for this buffer: Triton present, CUDA, power-of-two chunks."""
    chunk = error_NC.shape[1]
    return triton is not None and error_NC.is_cuda and chunk > 0 and chunk & (chunk - 1) == 0


def fused_ef_topk(
    error_NC: torch.Tensor, delta: torch.Tensor, decay: float, k: int, tiled: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``e ← decay·e + Δ`` in place on ``error_NC`` [N, C] fp32, then per row the ``k`` largest ``|e|``.

    ``delta``: the tensor (any float dtype) whose chunking ``error_NC`` holds: ``tiled`` → its matrix view
    ``[numel / shape[-1], shape[-1]]`` cut into 64×64 tiles in row-major tile order (C = 4096), else its
    flattened elements in runs of C (the last run zero-padded). Returns ``(indices_NK int64 ascending,
    values_NK fp32)``. Runs the Triton kernel whatever the device (CUDA, or the CPU interpreter); the torch
    reference is :meth:`sparsetron.parallel.data.compress.ErrorFeedback.compress`'s other path.
    """
    rows, chunk = error_NC.shape
    if chunk & (chunk - 1) or not 1 <= k <= chunk:
        raise ValueError(f"chunk={chunk} must be a power of two and k={k} within [1, chunk] for the kernel")
    if not error_NC.is_contiguous() or error_NC.dtype != torch.float32:
        raise ValueError("error_NC must be a contiguous float32 [N, C] buffer")
    delta = delta.contiguous()
    cols = delta.shape[-1] if delta.dim() else 1
    indices_NK = torch.empty(rows, k, dtype=torch.int64, device=error_NC.device)
    values_NK = torch.empty(rows, k, dtype=torch.float32, device=error_NC.device)
    if rows:
        _ef_topk_kernel[(rows,)](
            error_NC, delta, indices_NK, values_NK, float(decay), delta.numel(), cols,
            max(cols // TILE, 1), CHUNK=chunk, K=k, TILED=tiled, TILE_SIDE=TILE,
            num_warps=4,  # measured on H200 at C=4096: 4 warps 11.9 ms per 1B elements, 8: 19.8, 2: 22.4
        )  # fmt: skip
    return indices_NK, values_NK


if triton is not None:

    @triton.jit
    def _ef_topk_kernel(
        error_ptr, delta_ptr, indices_ptr, values_ptr, decay, numel, cols, tiles_per_row,
        CHUNK: tl.constexpr, K: tl.constexpr, TILED: tl.constexpr, TILE_SIDE: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        j = tl.arange(0, CHUNK)
        error = tl.load(error_ptr + row * CHUNK + j)
        if TILED:
            tile_row = row // tiles_per_row
            tile_col = row % tiles_per_row
            source = (tile_row * TILE_SIDE + j // TILE_SIDE) * cols + tile_col * TILE_SIDE + j % TILE_SIDE
            delta = tl.load(delta_ptr + source).to(tl.float32)
        else:
            source = row * CHUNK + j
            delta = tl.load(delta_ptr + source, mask=source < numel, other=0.0).to(tl.float32)
        error = error * decay + delta
        tl.store(error_ptr + row * CHUNK + j, error)

        # The k-th largest |e| by bisection on its bit pattern: the largest T with count(bits ≥ T) ≥ K.
        bits = error.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        low = tl.zeros((), dtype=tl.int32)
        high = tl.full((), 0x7FFFFFFF, dtype=tl.int32)
        for _ in tl.static_range(31):
            mid = low + (high - low) // 2
            enough = tl.sum((bits >= mid).to(tl.int32), axis=0) >= K
            low = tl.where(enough, mid, low)
            high = tl.where(enough, high, mid)
        above = bits > low
        at = bits == low
        room = K - tl.sum(above.to(tl.int32), axis=0)
        selected = above | (at & (tl.cumsum(at.to(tl.int32), axis=0) <= room))
        slot = tl.cumsum(selected.to(tl.int32), axis=0) - 1
        tl.store(indices_ptr + row * K + slot, j.to(tl.int64), mask=selected)
        tl.store(values_ptr + row * K + slot, error, mask=selected)
