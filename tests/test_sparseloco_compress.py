"""SparseLoCo's compressor against direct definitions: chunking, top-k, codebook quantisation, error feedback."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsetron.parallel.data.compress import (
    TILE,
    ErrorFeedback,
    add_chunked_,
    chunking_for,
    dequantize,
    fit_codebook,
    from_chunks,
    quantize,
    to_chunks,
    topk_per_chunk,
)

SHAPES = [(7,), (4096,), (5000,), (128, 192), (130, 64), (3, 5, 7), (64, 64), (2, 64, 128)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk", [16, 4096])
def test_chunks_round_trip_and_tiles_are_spatial_blocks(shape, chunk):
    x = torch.randn(shape)
    chunking = chunking_for(shape, chunk)
    rows = to_chunks(x, chunking)
    assert rows.shape == (chunking.num_chunks, chunk)
    assert torch.equal(from_chunks(rows, chunking), x)
    if chunking.tiled and chunking.num_chunks > 1:
        # Row 1 of the chunks is the tile right of the first one: x[0:64, 64:128] of the matrix view
        # (for stacked experts [E, d, f] the rows of expert 0 come first, so tiles never straddle experts).
        matrix = x.reshape(-1, shape[-1])
        assert torch.equal(rows[1].view(TILE, TILE), matrix[:TILE, TILE : 2 * TILE])
    else:
        assert torch.equal(rows.reshape(-1)[: x.numel()], x.reshape(-1))
        assert not rows.reshape(-1)[x.numel() :].any()


@settings(max_examples=40, deadline=None)
@given(chunks=st.integers(1, 6), chunk=st.integers(1, 80), data=st.data())
def test_topk_per_chunk_keeps_the_largest_magnitudes_in_index_order(chunks, chunk, data):
    k = data.draw(st.integers(1, chunk))
    seed = data.draw(st.integers(0, 2**16))
    x = torch.randn(chunks, chunk, generator=torch.Generator().manual_seed(seed))
    indices, values = topk_per_chunk(x, k)
    assert indices.shape == values.shape == (chunks, k)
    assert torch.equal(indices, indices.sort(dim=1).values)
    assert torch.equal(values, x.gather(1, indices))
    # Every kept magnitude is at least every dropped one (ties are measure-zero with randn).
    kept = torch.zeros_like(x, dtype=torch.bool).scatter_(1, indices, True)
    smallest_kept = x.abs().masked_fill(~kept, float("inf")).min(dim=1).values
    largest_dropped = x.abs().masked_fill(kept, -1.0).max(dim=1).values
    assert bool((smallest_kept >= largest_dropped).all())


@pytest.mark.parametrize("bits", [1, 2, 3, 8])
def test_codebook_levels_are_bin_means_and_codes_keep_the_sign(bits):
    values = torch.randn(4000, generator=torch.Generator().manual_seed(bits))
    codebook = fit_codebook(values, bits)
    codes = quantize(values, codebook, bits)
    assert codebook.shape == (1 << bits,) and codebook.dtype == torch.float32
    assert codes.dtype == torch.uint8 and int(codes.max()) < 1 << bits
    restored = dequantize(codes, codebook)
    assert torch.equal(torch.sign(restored), torch.sign(values))
    bins = 1 << (bits - 1)
    assert torch.equal(codebook[bins:], -codebook[:bins])
    assert bool((codebook[:bins].diff() >= 0).all())  # magnitude levels ascend
    # Relative error near the Lloyd–Max optimum for Gaussian data (0.603, 0.343, 0.186 at 1, 2, 3 bits):
    # measured 0.605, 0.367, 0.230, and 0.023 at 8 bits.
    error = float((restored - values).norm() / values.norm())
    assert error < {1: 0.62, 2: 0.38, 3: 0.25, 8: 0.03}[bits]


def test_two_bit_codebook_is_the_mean_magnitude_per_half():
    values = torch.tensor([0.1, -0.2, 0.3, -0.4, 1.0, -2.0, 3.0, -4.0])
    codebook = fit_codebook(values, 2)
    # Magnitudes split at their median: {0.1, 0.2, 0.3, 0.4} and {1, 2, 3, 4}.
    torch.testing.assert_close(codebook, torch.tensor([0.25, 2.5, -0.25, -2.5]))
    # Codes pick the nearest level: |1.0| is nearer 0.25 than 2.5.
    codes = quantize(values, codebook, 2)
    assert codes.tolist() == [0, 2, 0, 2, 0, 3, 1, 3]


@pytest.mark.parametrize("shape", [(256, 128), (3000,), (65, 64)])
def test_error_feedback_keeps_everything_not_sent(shape):
    """With decay 1 the error plus everything sent equals the sum of all deltas, step after step."""
    ef = ErrorFeedback(chunk=4096, topk=64, bits=2, decay=1.0)
    generator = torch.Generator().manual_seed(0)
    total_delta = torch.zeros(shape)
    total_sent = torch.zeros(shape)
    for _ in range(4):
        delta = torch.randn(shape, generator=generator)
        sent = ef.compress("w", delta)
        total_delta += delta
        dense = sent.dense()
        total_sent += dense
        chunking = sent.chunking
        per_chunk = to_chunks(dense, chunking).ne(0).sum(dim=1)
        assert int(per_chunk.max()) <= 64
    torch.testing.assert_close(total_sent + ef.state_dict()["w"], total_delta, atol=1e-5, rtol=1e-5)


def test_error_decay_scales_the_old_error():
    ef = ErrorFeedback(chunk=16, topk=16, bits=8, decay=0.5)
    first = torch.randn(32)
    sent = ef.compress("b", first)
    residual = first - sent.dense()
    torch.testing.assert_close(ef.state_dict()["b"], residual)
    second = torch.randn(32)
    sent2 = ef.compress("b", second)
    torch.testing.assert_close(ef.state_dict()["b"], 0.5 * residual + second - sent2.dense())


def test_bad_settings_and_shape_changes_are_named():
    with pytest.raises(ValueError, match=r"bits=9 must be between 1 and 8"):
        fit_codebook(torch.randn(4), 9)
    with pytest.raises(ValueError, match=r"top-k k=5 must be between 1 and the chunk size 4"):
        topk_per_chunk(torch.randn(2, 4), 5)
    with pytest.raises(ValueError, match=r"chunk=0 must be ≥ 1"):
        chunking_for((4,), 0)
    with pytest.raises(ValueError, match=r"error decay β=1.5"):
        ErrorFeedback(decay=1.5)
    with pytest.raises(ValueError, match=r"bits=12 must be 1–8"):
        ErrorFeedback(bits=12)
    ef = ErrorFeedback(chunk=16, topk=4)
    ef.compress("w", torch.randn(8))
    with pytest.raises(
        ValueError, match=r"tensor 'w': delta of shape \(9,\) but its error buffer has shape \(8,\)"
    ):
        ef.compress("w", torch.randn(9))


def test_add_chunked_matches_to_chunks():
    for shape in SHAPES:
        chunking = chunking_for(shape, 4096)
        x = torch.randn(shape)
        rows = add_chunked_(torch.ones(chunking.num_chunks, 4096), x, chunking)
        expected = to_chunks(x, chunking) + 1
        if not chunking.tiled:  # padding stays untouched
            expected.view(-1)[x.numel() :] = 1
        assert torch.equal(rows, expected)


@pytest.mark.parametrize("bits", [16, 32])
def test_raw_values_and_full_k_send_everything(bits):
    """k = chunk with fp32 values sends the error exactly (nothing left); bf16 leaves only its rounding."""
    ef = ErrorFeedback(chunk=64, topk=64, bits=bits, decay=0.9)
    delta = torch.randn(3, 70)
    sent = ef.compress("w", delta)
    assert sent.codes_NK.dtype == (torch.float32 if bits == 32 else torch.bfloat16)
    assert sent.codebook.numel() == 0
    if bits == 32:
        assert torch.equal(sent.dense(), delta)
        assert not ef.state_dict()["w"].any()
    else:
        assert torch.equal(sent.dense(), delta.bfloat16().float())
        assert torch.equal(ef.state_dict()["w"], delta - delta.bfloat16().float())


def test_error_state_round_trips_through_tensor_layout():
    ef = ErrorFeedback(chunk=4096, topk=8, bits=2)
    for name, shape in (("tiled", (128, 192)), ("flat", (5000,)), ("experts", (2, 64, 128))):
        ef.compress(name, torch.randn(shape))
    state = ef.state_dict()
    restored = ErrorFeedback(chunk=4096, topk=8, bits=2)
    restored.load_state_dict(state)
    for name, (chunking, error_NC) in ef.errors.items():
        assert restored.errors[name][0] == chunking
        assert torch.equal(restored.errors[name][1], error_NC)
