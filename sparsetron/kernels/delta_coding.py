"""Weight-sync delta coding on the GPU in one launch per stream: Elias–Fano positions and value byte planes.

Encoding an 8B-parameter version on an H100 is bound by the host launching kernels, not by the GPU running
them: torch needed ~22 launches to Elias–Fano-code one bucket and ~6 to zig-zag and byte-shuffle its values,
at ~30 µs of host time each (1 900 launches, ~60 ms, for 30 tensors; the GPU was busy 21 ms). Here each is one
kernel. Bits are OR-ed into 64-bit words (little-endian, so the words' bytes are the LSB-first bit stream of
``sparsetron.sync.codec``); neighbouring elements share words, hence atomics.

Both run on CUDA, or anywhere under ``TRITON_INTERPRET=1`` (tests compare them with the torch coding).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pyproject installs triton on Linux x86_64 only
    triton = None

BLOCK = 1024
_WARPS = 4


def kernels_apply(t: torch.Tensor) -> bool:
    """Whether the kernels should code ``t``: Triton present and the tensor on a CUDA device."""
    return triton is not None and t.is_cuda


def elias_fano_bits(
    positions: torch.Tensor, first: int, low: int, head: list[int], low_bytes: int, total_bytes: int
) -> torch.Tensor:
    """uint8 [total_bytes]: ``head`` bytes, then the low ``low`` bits of every offset packed LSB-first
    (``low_bytes`` bytes), then the unary high parts (offset ``i``'s high part ``h`` sets bit ``h + i``).

    ``positions`` int64 [n] strictly increasing, offsets taken from ``first``. Launches: a zero fill, the
    kernel, and the copy of the few head bytes.
    """
    count = positions.numel()
    words = torch.zeros(triton.cdiv(total_bytes, 8), dtype=torch.int64, device=positions.device)
    if count:
        _elias_fano_kernel[(triton.cdiv(count, BLOCK),)](
            positions, words, count, first, 8 * len(head), 8 * (len(head) + low_bytes),
            LOW=low, BLOCK=BLOCK, num_warps=_WARPS,
        )  # fmt: skip
    stream = words.view(torch.uint8)[:total_bytes]
    if head:
        # The head's bytes share a word with the first low bits only bytewise, so copying them after the
        # kernel (same stream) cannot clear a low bit.
        stream[: len(head)].copy_(torch.tensor(head, dtype=torch.uint8), non_blocking=True)
    return stream


def byte_planes(values: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """uint8 [width · n]: every element's byte 0, then every byte 1, … of ``values`` (same-width int [n]), or
    with ``base`` of the zig-zag mapped wrapped difference ``values − base`` (few ulps → small integers)."""
    count = values.numel()
    width = values.element_size()
    planes = torch.empty(width * count, dtype=torch.uint8, device=values.device)
    if count:
        _planes_kernel[(triton.cdiv(count, BLOCK),)](
            values, values if base is None else base, planes, count,
            WIDTH=width, DIFF=base is not None, BLOCK=BLOCK, num_warps=_WARPS,
        )  # fmt: skip
    return planes


if triton is not None:

    @triton.jit
    def _or_bits(words, bit, value, mask, bits: tl.constexpr):
        """OR ``value`` (< 2**bits, int64) into the bit stream ``words`` at bit offset ``bit``."""
        shift = bit & 63
        word = bit >> 6
        tl.atomic_or(words + word, value << shift, mask=mask)
        # Bits beyond the word's end go to the next one (only possible when the value is wider than one bit).
        if bits > 1:
            spill = mask & (shift + bits > 64) & (shift > 0)
            tl.atomic_or(words + word + 1, value >> (64 - shift), mask=spill)

    @triton.jit
    def _elias_fano_kernel(
        positions, words, count, first, lows_at, unary_at, LOW: tl.constexpr, BLOCK: tl.constexpr
    ):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < count
        offset = tl.load(positions + i, mask=mask, other=first) - first
        if LOW > 0:
            _or_bits(words, lows_at + i * LOW, offset & ((1 << LOW) - 1), mask, LOW)
        _or_bits(words, unary_at + (offset >> LOW) + i, tl.full([BLOCK], 1, tl.int64), mask, 1)

    @triton.jit
    def _planes_kernel(
        values, base, planes, count, WIDTH: tl.constexpr, DIFF: tl.constexpr, BLOCK: tl.constexpr
    ):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < count
        coded = tl.load(values + i, mask=mask, other=0).to(tl.int64)
        if DIFF:
            # Sign-extended loads subtract exactly in int64; the byte planes keep the low WIDTH bytes, so the
            # result is the difference wrapped in the width, zig-zag mapped.
            diff = coded - tl.load(base + i, mask=mask, other=0).to(tl.int64)
            diff = (diff << (64 - 8 * WIDTH)) >> (64 - 8 * WIDTH)  # wrap to the width, sign-extended
            coded = (diff << 1) ^ (diff >> 63)
        for k in tl.static_range(WIDTH):
            tl.store(planes + k * count + i, ((coded >> (8 * k)) & 0xFF).to(tl.uint8), mask=mask)
