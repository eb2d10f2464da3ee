"""The GPU coding kernels of weight-sync deltas against the torch coding they replace (interpreter on the CPU)."""

from __future__ import annotations

import os

import pytest
import torch

from sparsetron.kernels import delta_coding
from sparsetron.parallel.data.bitpack import packed_len
from sparsetron.sync import codec

pytestmark = pytest.mark.skipif(
    delta_coding.triton is None
    or (not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs Triton on CUDA or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    ("count", "numel"), [(1, 10), (37, 40), (300, 70_000), (2500, 1 << 33), (1500, 1500)]
)
def test_elias_fano_bits_match_the_torch_coding(count, numel):
    generator = torch.Generator().manual_seed(count)
    if numel < 1 << 24:
        positions = torch.randperm(numel, generator=generator)[:count].sort().values
    else:  # far beyond int32: high parts and low widths up to 32 bits
        positions = torch.randint(0, numel, (count,), generator=generator).unique()
    first, span = int(positions[0]), int(positions[-1] - positions[0])
    lows = {0, 1, 7, codec._ef_layout(positions.numel(), span)[0], min(32, span.bit_length())}
    for low in sorted(low for low in lows if span >> low < 1 << 20):  # unary parts of ≤ 1M bits
        head = [3, 0x85, 0x01, low][-(1 + low % 3) :]
        low_bytes = packed_len(positions.numel(), low)
        body = codec._ef_encode(positions - first, low, span)
        ours = delta_coding.elias_fano_bits(
            positions.to(DEVICE), first, low, head, low_bytes, len(head) + body.numel()
        )
        assert torch.equal(ours.cpu(), torch.cat([torch.tensor(head, dtype=torch.uint8), body])), low


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("diff", [False, True])
def test_byte_planes_match_the_torch_shuffle(dtype, diff):
    generator = torch.Generator().manual_seed(3)
    values = torch.randint(-(2**62), 2**62, (3001,), generator=generator).to(dtype)
    base = torch.randint(-(2**62), 2**62, (3001,), generator=generator).to(dtype) if diff else None
    if diff:  # small differences, and the wrap-around ends of the width
        base[:1000] = values[:1000] - torch.randint(-3, 4, (1000,), generator=generator).to(dtype)
        values[1000:1002] = torch.tensor([0, -1], dtype=torch.int64).to(dtype)
        base[1000:1002] = torch.tensor([-1, 0], dtype=torch.int64).to(dtype)
    expected = codec._shuffle(values if base is None else codec._zigzag(values, base))
    ours = delta_coding.byte_planes(values.to(DEVICE), None if base is None else base.to(DEVICE))
    assert torch.equal(ours.cpu(), expected)
