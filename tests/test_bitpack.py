"""Device-side bit packing: the wire format's LSB-first layout, for every width and length, both directions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsetron.parallel.data.bitpack import pack_bits, packed_len, unpack_bits


def _reference(values: list[int], width: int) -> bytes:
    """Bit i·w + b of the stream is bit b of value i; stream bit j is bit j % 8 of byte j // 8."""
    out = bytearray(packed_len(len(values), width))
    for i, value in enumerate(values):
        for b in range(width):
            if value >> b & 1:
                position = i * width + b
                out[position // 8] |= 1 << position % 8
    return bytes(out)


@settings(max_examples=120, deadline=None)
@given(width=st.integers(0, 32), data=st.data())
def test_pack_matches_the_bit_layout_and_round_trips(width, data):
    values = data.draw(st.lists(st.integers(0, (1 << width) - 1 if width else 0), max_size=40))
    tensor = torch.tensor(values, dtype=torch.int64)
    packed = pack_bits(tensor, width)
    assert packed.dtype == torch.uint8 and bytes(packed.tolist()) == _reference(values, width)
    assert unpack_bits(packed, len(values), width).tolist() == values


def test_bad_width_and_short_buffers_are_named():
    with pytest.raises(ValueError, match=r"width=33 must be within \[0, 32\]"):
        pack_bits(torch.zeros(2, dtype=torch.int64), 33)
    with pytest.raises(ValueError, match=r"2 packed bytes hold fewer than 2 values of 12 bits"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 2, 12)
