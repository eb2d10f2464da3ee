"""Fixed-width bit packing of non-negative integers, on whatever device the tensor lives (LSB-first).

``pack_bits(v_M, w)`` writes value ``i``'s bit ``b`` at stream bit ``i·w + b``, and stream bit ``j`` is bit
``j % 8`` of byte ``j // 8``: the layout of the SparseLoCo wire format. Everything is elementwise torch, so on a
GPU packing 12-bit indices runs at memory bandwidth and only the packed bytes ever cross to the host.

Values are packed in groups of ``g = 8 / gcd(w, 8)`` (the fewest values that fill whole bytes: 2 for 12-bit
indices, 4 for 2-bit codes): each group becomes one int64 word, cut into bytes. That needs 8 bytes of scratch
per value instead of one per bit. Widths whose groups exceed 56 bits (9, 11, 13, 15 …) expand to single bits.
"""

from __future__ import annotations

import math

import torch

#: Largest group, in bits, that fits an int64 word with room to shift.
_WORD_BITS = 56


def packed_len(count: int, width: int) -> int:
    """Bytes taken by ``count`` values of ``width`` bits."""
    return (count * width + 7) // 8


def _check_width(width: int) -> None:
    if not 0 <= width <= 32:
        raise ValueError(f"width={width} must be within [0, 32] bits")


def pack_bits(values_M: torch.Tensor, width: int) -> torch.Tensor:
    """uint8 ``[packed_len(M, width)]`` holding ``values_M`` (any int dtype, each in ``[0, 2**width)``)."""
    _check_width(width)
    count = values_M.numel()
    device = values_M.device
    if width == 0 or count == 0:
        return torch.zeros(0, dtype=torch.uint8, device=device)
    group = 8 // math.gcd(width, 8)
    values = values_M.reshape(-1).to(torch.int64)
    if group * width > _WORD_BITS:
        return _pack_by_bits(values, width)
    pad = -count % group
    if pad:
        values = torch.cat([values, values.new_zeros(pad)])
    value_shifts = torch.arange(group, device=device, dtype=torch.int64) * width
    words_G = (values.view(-1, group) << value_shifts).sum(dim=1)
    byte_shifts = torch.arange(group * width // 8, device=device, dtype=torch.int64) * 8
    packed = ((words_G.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return packed[: packed_len(count, width)]


def unpack_bits(packed: torch.Tensor, count: int, width: int) -> torch.Tensor:
    """int64 ``[count]``: inverse of :func:`pack_bits` (``packed`` uint8 holding ≥ ``count·width`` bits)."""
    _check_width(width)
    device = packed.device
    if width == 0 or count == 0:
        return torch.zeros(count, dtype=torch.int64, device=device)
    needed = packed_len(count, width)
    if packed.numel() < needed:
        raise ValueError(f"{packed.numel()} packed bytes hold fewer than {count} values of {width} bits")
    group = 8 // math.gcd(width, 8)
    if group * width > _WORD_BITS:
        return _unpack_by_bits(packed[:needed], count, width)
    group_bytes = group * width // 8
    data = packed[:needed].to(torch.int64)
    pad = -needed % group_bytes
    if pad:
        data = torch.cat([data, data.new_zeros(pad)])
    byte_shifts = torch.arange(group_bytes, device=device, dtype=torch.int64) * 8
    words_G = (data.view(-1, group_bytes) << byte_shifts).sum(dim=1)
    value_shifts = torch.arange(group, device=device, dtype=torch.int64) * width
    values = (words_G.unsqueeze(1) >> value_shifts) & ((1 << width) - 1)
    return values.reshape(-1)[:count]


def _pack_by_bits(values_M: torch.Tensor, width: int) -> torch.Tensor:
    """Bit-at-a-time packing for widths whose byte-aligned groups do not fit a word."""
    count = values_M.numel()
    shifts_W = torch.arange(width, device=values_M.device, dtype=torch.int64)
    bits = ((values_M.unsqueeze(1) >> shifts_W) & 1).to(torch.uint8).reshape(-1)
    pad = packed_len(count, width) * 8 - bits.numel()
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    byte_shifts = torch.arange(8, device=values_M.device, dtype=torch.uint8)
    return (bits.view(-1, 8) << byte_shifts).sum(dim=1, dtype=torch.uint8)


def _unpack_by_bits(packed: torch.Tensor, count: int, width: int) -> torch.Tensor:
    byte_shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = ((packed.reshape(-1, 1) >> byte_shifts) & 1).reshape(-1)[: count * width]
    shifts_W = torch.arange(width, device=packed.device, dtype=torch.int64)
    return (bits.view(count, width).to(torch.int64) << shifts_W).sum(dim=1)
