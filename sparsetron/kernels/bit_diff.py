"""Bitwise change detection between two same-shaped integer bit-pattern tensors, in two streaming passes.

Pass 1 counts, per block of :data:`BLOCK` elements, the positions whose bits differ (no boolean mask is
materialised); the caller sums the counts of every tensor and reads them with one host sync. Pass 2 re-reads
each block, compacts its changed positions with a prefix sum at the block's offset (so positions come out
sorted) and writes them with the new and old bits. Each pass reads both tensors once: where torch
materialises a mask, reduces it, then re-reads it for ``nonzero`` and gathers twice.

:func:`changed_counts` / :func:`changed_elements` run on CUDA, or anywhere under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pyproject installs triton on Linux x86_64 only
    triton = None

#: Elements per program. Measured on H200 over a 2^28-element int16 pair: 1024 elements with 4 warps counts
#: in 0.24 ms and compacts in 0.64 ms (606 GB/s of weights); 4096 with 8 warps compacted in 1.30 ms.
BLOCK = 1024
_WARPS = 4


def kernels_apply(current: torch.Tensor) -> bool:
    """Whether the kernels should run for ``current``: Triton present and the tensor on a CUDA device."""
    return triton is not None and current.is_cuda


def changed_counts(current: torch.Tensor, published: torch.Tensor) -> torch.Tensor:
    """int32 [ceil(numel / BLOCK)]: per block, how many positions' bits differ (flat 1-D int tensors)."""
    numel = current.numel()
    blocks = triton.cdiv(numel, BLOCK)
    counts = torch.empty(blocks, dtype=torch.int32, device=current.device)
    if blocks:
        _count_kernel[(blocks,)](current, published, counts, numel, BLOCK=BLOCK, num_warps=_WARPS)
    return counts


def changed_elements(
    current: torch.Tensor, published: torch.Tensor, counts: torch.Tensor, total: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(positions int64 [total] ascending, new bits, old bits)`` of the differing elements.

    ``counts`` from :func:`changed_counts` of the same tensors, ``total`` its sum (read on the host).
    """
    positions = torch.empty(total, dtype=torch.int64, device=current.device)
    new = torch.empty(total, dtype=current.dtype, device=current.device)
    old = torch.empty(total, dtype=current.dtype, device=current.device)
    if total:
        offsets = torch.cumsum(counts, 0) - counts
        _compact_kernel[(counts.numel(),)](
            current,
            published,
            counts,
            offsets,
            positions,
            new,
            old,
            current.numel(),
            BLOCK=BLOCK,
            num_warps=8,
        )
    return positions, new, old


if triton is not None:

    @triton.jit
    def _count_kernel(current_ptr, published_ptr, counts_ptr, numel, BLOCK: tl.constexpr):
        block = tl.program_id(0).to(tl.int64)
        where = block * BLOCK + tl.arange(0, BLOCK)
        inside = where < numel
        differs = tl.load(current_ptr + where, mask=inside, other=0) != tl.load(
            published_ptr + where, mask=inside, other=0
        )
        tl.store(counts_ptr + block, tl.sum(differs.to(tl.int32), axis=0))

    @triton.jit
    def _compact_kernel(
        current_ptr, published_ptr, counts_ptr, offsets_ptr, positions_ptr, new_ptr, old_ptr, numel,
        BLOCK: tl.constexpr,
    ):  # fmt: skip
        block = tl.program_id(0).to(tl.int64)
        if tl.load(counts_ptr + block) == 0:
            return
        where = block * BLOCK + tl.arange(0, BLOCK)
        inside = where < numel
        new = tl.load(current_ptr + where, mask=inside, other=0)
        old = tl.load(published_ptr + where, mask=inside, other=0)
        differs = new != old
        # The in-block scan fits int32; only the global slot needs 64 bits.
        slot = tl.load(offsets_ptr + block) + (tl.cumsum(differs.to(tl.int32), axis=0) - 1).to(tl.int64)
        tl.store(positions_ptr + slot, where, mask=differs)
        tl.store(new_ptr + slot, new, mask=differs)
        tl.store(old_ptr + slot, old, mask=differs)
