"""The fused error-feedback + per-chunk top-k kernel (Triton, interpreted on the CPU) against the torch path."""

from __future__ import annotations

import pytest
import torch

from sparsetron.kernels.chunk_topk import fused_ef_topk
from sparsetron.parallel.data.compress import add_chunked_, chunking_for, topk_per_chunk

CASES = [
    ((128, 192), 4096, 64, torch.bfloat16),  # 64×64 tiles
    ((2, 64, 128), 4096, 8, torch.bfloat16),  # stacked experts: tiles per expert
    ((5000,), 4096, 64, torch.float32),  # flat runs, the last one padded
    ((3, 70), 64, 64, torch.float32),  # k = chunk: everything selected
    ((300,), 128, 5, torch.float16),
]


@pytest.mark.parametrize(("shape", "chunk", "k", "dtype"), CASES)
def test_kernel_matches_the_torch_path_bit_for_bit(shape, chunk, k, dtype):
    generator = torch.Generator().manual_seed(len(shape) * chunk + k)
    chunking = chunking_for(shape, chunk)
    error_NC = torch.randn(chunking.num_chunks, chunk, generator=generator)
    if not chunking.tiled:
        error_NC.view(-1)[chunking.numel :] = 0  # padding never holds error
    delta = torch.randn(shape, generator=generator).to(dtype)
    fused, reference = error_NC.clone(), error_NC.clone()
    indices, values = fused_ef_topk(fused, delta, 0.9, k, chunking.tiled)
    add_chunked_(reference.mul_(0.9), delta, chunking)
    expected_indices, expected_values = topk_per_chunk(reference, k)
    assert torch.equal(fused, reference)
    assert torch.equal(indices, expected_indices)
    assert torch.equal(values, expected_values)


def test_ties_at_the_threshold_take_the_lowest_indices():
    error_NC = torch.zeros(2, 64)
    error_NC[0, 5] = 1.0
    error_NC[1, [7, 9, 11]] = -2.0
    indices, values = fused_ef_topk(error_NC, torch.zeros(128), 1.0, 4, tiled=False)
    assert indices.tolist() == [[0, 1, 2, 5], [0, 7, 9, 11]]
    assert values.tolist() == [[0.0, 0.0, 0.0, 1.0], [0.0, -2.0, -2.0, -2.0]]


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"chunk=48 must be a power of two"):
        fused_ef_topk(torch.zeros(1, 48), torch.zeros(48), 1.0, 4, tiled=False)
