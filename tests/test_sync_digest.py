"""The weight-sync digest: updating it from the changed elements equals recomputing it, for every dtype and
special bit pattern; any single changed element changes it; blocks of any size give the same value."""

from __future__ import annotations

import pytest
import torch

from sparsetron.sync import digest as digest_module
from sparsetron.sync.codec import DTYPES, bits_view
from sparsetron.sync.digest import tensor_digest, updated_digest


def _random_bits(dtype: torch.dtype, numel: int, generator: torch.Generator) -> torch.Tensor:
    width = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (numel * width,), generator=generator, dtype=torch.uint8)
    return bits_view(raw.view(dtype if dtype != torch.bool else torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_update_from_changed_elements_equals_a_full_recompute(dtype):
    generator = torch.Generator().manual_seed(0)
    bits = _random_bits(dtype, 70_001, generator)
    if dtype == torch.bool:
        bits = bits & 1
    before = tensor_digest(bits)
    indices = torch.randperm(bits.numel(), generator=generator)[:3_000].sort().values
    new = _random_bits(dtype, indices.numel(), generator)
    if dtype == torch.bool:
        new = new & 1
    if bits.element_size() == 2:  # NaN payloads, ±Inf, -0.0 of the 16-bit floats; extremes of int16
        new[:6] = torch.tensor([0x7FC1, -1, 0x7F80, -128, -32768, 32767], dtype=torch.int16)
    after_bits = bits.clone()
    after_bits[indices] = new
    assert updated_digest(before, indices, bits[indices], new) == tensor_digest(after_bits)
    assert 0 <= before < 2**64


@pytest.mark.parametrize("width_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64], ids=str)
def test_every_single_bit_flip_changes_the_digest(width_dtype):
    bits = torch.zeros(97, dtype=width_dtype)
    before = tensor_digest(bits)
    seen = {before}
    for position in (0, 1, 50, 96):
        for bit in range(bits.element_size() * 8):
            flipped = bits.clone()
            flipped[position] = torch.tensor(1, dtype=torch.int64).bitwise_left_shift(bit).to(width_dtype)
            after = tensor_digest(flipped)
            assert after != before, (position, bit)
            seen.add(after)
    # Distinct single-bit changes give distinct digests too (a collision here would be a 2^-60 event).
    assert len(seen) == 1 + 4 * bits.element_size() * 8


def test_position_matters():
    bits = torch.zeros(10, dtype=torch.int16)
    a, b = bits.clone(), bits.clone()
    a[2], b[7] = 5, 5
    assert tensor_digest(a) != tensor_digest(b)


def test_block_size_does_not_change_the_value(monkeypatch):
    generator = torch.Generator().manual_seed(3)
    bits = _random_bits(torch.float32, 10_007, generator)
    indices = torch.arange(0, bits.numel(), 3)
    new = _random_bits(torch.float32, indices.numel(), generator)
    expected = (tensor_digest(bits), updated_digest(11, indices, bits[indices], new))
    monkeypatch.setattr(digest_module, "_CPU_BLOCK", 1000)
    assert (tensor_digest(bits), updated_digest(11, indices, bits[indices], new)) == expected


def test_empty_inputs():
    assert tensor_digest(torch.zeros(0, dtype=torch.int16)) == 0
    empty = torch.zeros(0, dtype=torch.int64)
    assert updated_digest(123, empty, empty.to(torch.int16), empty.to(torch.int16)) == 123
