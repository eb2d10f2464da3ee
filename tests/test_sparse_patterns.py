"""Block-sparse attention patterns: static patterns' exact blocks, CSR lists, token masks; block top-k and
vertical-slash estimation find planted structure, respect causality and budgets, and are deterministic; pooled
context-parallel shards give the same pattern as the whole sequence."""

from __future__ import annotations

import pytest
import torch

from sparsetron.kernels.attention_ref import attention_forward_ref
from sparsetron.parallel.context.patterns import (
    BlockPattern,
    _attention_mass,
    _grouped_queries,
    _key_chunks,
    _log_normalizer,
    _vertical_slash_pattern,
    _vertical_slash_scores,
    block_topk,
    from_block_mask,
    pool_blocks,
    sliding_window_sinks,
    strided,
    vertical_slash,
)


def test_sliding_window_and_sinks_blocks():
    pattern = sliding_window_sinks(1, 1, seq=6 * 4, block=4, window_blocks=2, sink_blocks=1)
    expected = torch.tensor(
        [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 0, 0], [1, 0, 0, 1, 1, 0],
         [1, 0, 0, 0, 1, 1]], dtype=torch.bool)  # fmt: skip
    assert torch.equal(pattern.active_BHQK[0, 0], expected)
    offsets, keys = pattern.lists()
    assert offsets.tolist() == [0, 1, 3, 6, 9, 12, 15]
    assert keys.tolist() == [0, 0, 1, 0, 1, 2, 0, 2, 3, 0, 3, 4, 0, 4, 5]
    assert pattern.density() == pytest.approx(15 / 21)


def test_strided_heads_cover_every_causal_block():
    pattern = strided(2, 4, seq=16 * 8, block=8, stride=4, local_blocks=1)
    union = pattern.active_BHQK.any(dim=1)
    assert torch.equal(union, torch.ones(2, 16, 16, dtype=torch.bool).tril())
    assert not torch.equal(pattern.active_BHQK[:, 0], pattern.active_BHQK[:, 1])  # heads differ


def test_token_mask_is_causal_and_expands_groups():
    mask = from_block_mask(torch.ones(1, 2, 3, 3, dtype=torch.bool), 2).token_mask(heads_per_group=3)
    assert mask.shape == (1, 6, 6, 6) and torch.equal(mask[0, 0], torch.ones(6, 6, dtype=torch.bool).tril())
    with pytest.raises(ValueError, match="must be bool"):
        from_block_mask(torch.ones(3, 3), 2)
    with pytest.raises(ValueError, match="multiple of the block size"):
        sliding_window_sinks(1, 1, seq=10, block=4, window_blocks=1)


def _qk(seed: int, seq: int, hq: int = 4, hkv: int = 2, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, seq, hq, d, generator=g), torch.randn(1, seq, hkv, d, generator=g)


def test_block_topk_finds_the_planted_block_and_keeps_causality():
    block, n = 8, 8
    q, k = _qk(0, block * n)
    direction = torch.randn(16)
    q[0, 6 * block : 7 * block] += 4 * direction  # query block 6 ...
    k[0, 2 * block : 3 * block] += 4 * direction  # ... matches key block 2
    pattern = block_topk(pool_blocks(q, block), pool_blocks(k, block), block, k=1, local_blocks=1)
    active = pattern.active_BHQK[0]
    assert active[:, 6, 2].all() and active[:, 6].sum(dim=-1).tolist() == [2, 2]  # local + the planted one
    assert not (active & ~torch.ones(n, n, dtype=torch.bool).tril()).any()
    assert torch.equal(active.diagonal(dim1=-2, dim2=-1), torch.ones(2, n, dtype=torch.bool))
    again = block_topk(pool_blocks(q, block), pool_blocks(k, block), block, k=1, local_blocks=1)
    assert torch.equal(pattern.active_BHQK, again.active_BHQK)


def test_block_topk_from_context_parallel_shards_equals_the_whole_sequence():
    """Zigzag shards of 4 ranks pooled locally, gathered and put back in global block order."""
    block, world = 4, 4
    q, k = _qk(1, block * 2 * world * 2)
    chunks_q, chunks_k = q.chunk(2 * world, dim=1), k.chunk(2 * world, dim=1)
    pooled_q, pooled_k = [None] * (2 * world), [None] * (2 * world)
    for rank in range(world):
        for chunk in (rank, 2 * world - 1 - rank):  # zigzag: each rank holds chunk r and its mirror
            pooled_q[chunk] = pool_blocks(chunks_q[chunk], block)
            pooled_k[chunk] = pool_blocks(chunks_k[chunk], block)
    sharded = block_topk(torch.cat(pooled_q, dim=1), torch.cat(pooled_k, dim=1), block, k=2)
    whole = block_topk(pool_blocks(q, block), pool_blocks(k, block), block, k=2)
    assert torch.equal(sharded.active_BHQK, whole.active_BHQK)


def test_vertical_slash_finds_a_planted_column_and_diagonal():
    block, seq, last = 8, 128, 16
    q, k = _qk(2, seq, hq=2, hkv=1)
    sink = torch.randn(16)
    k[0, 37] = 6 * sink  # every query attends to key 37: a vertical
    q[0, :, :] += 2 * sink
    pattern = vertical_slash(q[:, -last:], k, block, verticals=2, slashes=4, sink_blocks=1, window_blocks=1)
    assert pattern.bars_BHS[0, 0, 37]
    assert pattern.bars_BHS.sum() == 2
    active = pattern.active_BHQK[0, 0]
    assert active[:, 0].all() and active.diagonal().all()  # sinks and the local window are kept
    assert not (active & ~torch.ones(16, 16, dtype=torch.bool).tril()).any()
    loose = vertical_slash(q[:, -last:], k, block, mass=0.99)
    tight = vertical_slash(q[:, -last:], k, block, mass=0.5)
    assert loose.bars_BHS.sum() >= tight.bars_BHS.sum() >= 1
    assert (loose.active_BHQK | ~tight.active_BHQK).all()  # more mass never drops a block
    with pytest.raises(ValueError, match="either verticals"):
        vertical_slash(q[:, -last:], k, block, verticals=2)


def test_a_slash_activates_the_key_blocks_on_its_diagonal():
    block, seq = 4, 32
    q, k = torch.zeros(1, 4, 1, 8), torch.zeros(1, seq, 1, 8)
    # Query i attends only to key i - 5: one slash at offset 5.
    q[0, :, 0, 0] = 1.0
    for i in range(seq - 4, seq):
        k[0, i - 5, 0, 0] = 50.0
    pattern = vertical_slash(q, k, block, verticals=0, slashes=1, sink_blocks=0, window_blocks=0)
    active = pattern.active_BHQK[0, 0]
    for qb in range(seq // block):
        lo, hi = qb * block - 5, qb * block + block - 1 - 5
        expected = {p // block for p in (lo, hi) if p >= 0}
        assert set(active[qb].nonzero().flatten().tolist()) == expected, qb


def test_reference_attention_under_a_pattern_equals_masked_softmax():
    q, k = _qk(3, 32)
    v = torch.randn_like(k)
    pattern = block_topk(pool_blocks(q, 4), pool_blocks(k, 4), 4, k=2)
    mask = pattern.token_mask(heads_per_group=2)  # [1, 4, 32, 32]
    out, lse = attention_forward_ref(q[:, :, :1], k[:, :, :1], v[:, :, :1], mask[:, 0], 0.25)
    logits = torch.einsum("bqd,bkd->bqk", q[:, :, 0], k[:, :, 0]) * 0.25
    logits = logits.masked_fill(~mask[:, 0], float("-inf"))
    expected = torch.einsum("bqk,bkd->bqd", logits.softmax(-1), v[:, :, 0])
    assert torch.allclose(out[:, :, 0], expected, atol=1e-6)
    assert torch.allclose(lse[:, 0], logits.logsumexp(-1), atol=1e-6)
    assert isinstance(pattern, BlockPattern)


def _direct_vertical_slash_scores(q_last, k):
    """Oracle: the whole fp64 causal softmax of the last queries at once, its group mean summed per key column
    and, query by query, per diagonal offset ``o = i − j``."""
    bsz, last, hq, d = q_last.shape
    seq, hkv = k.shape[1], k.shape[2]
    q = q_last.double().reshape(bsz, last, hkv, hq // hkv, d)
    logits = torch.einsum("blhgd,bshd->bhgls", q, k.double()) * d**-0.5
    queries = torch.arange(seq - last, seq)
    logits = logits.masked_fill(torch.arange(seq)[None, :] > queries[:, None], float("-inf"))
    probs = logits.softmax(dim=-1).mean(dim=2)  # [B, Hkv, L, S]
    slash = torch.zeros(bsz, hkv, seq, dtype=torch.float64)
    for row, i in enumerate(queries.tolist()):
        slash[..., : i + 1] += probs[..., row, : i + 1].flip(-1)  # keys i, i − 1, …, 0: offsets 0 … i
    return probs.sum(dim=2), slash


@pytest.mark.parametrize("key_chunk", [None, 1, 5, 16, 40])
def test_chunked_vertical_slash_scores_equal_the_direct_computation(key_chunk):
    q, k = _qk(4, 64, hq=6, hkv=2, d=8)
    q_last = q[:, -20:] * 3  # peaked attention: the scores differ by orders of magnitude
    vertical, slash = _vertical_slash_scores(q_last, k * 3, None, key_chunk)
    expected_vertical, expected_slash = _direct_vertical_slash_scores(q_last, k * 3)
    assert vertical.dtype == slash.dtype == torch.float64
    torch.testing.assert_close(vertical, expected_vertical, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(slash, expected_slash, rtol=1e-12, atol=1e-15)
    assert float(vertical.sum()) == pytest.approx(20 * 2, rel=1e-12)  # each query's attention sums to 1


@pytest.mark.parametrize("mode", [{"verticals": 5, "slashes": 3}, {"mass": 0.7}])
def test_vertical_slash_pattern_does_not_depend_on_the_chunks(mode):
    q, k = _qk(5, 96)
    whole = vertical_slash(q[:, -24:], k, 8, **mode)
    for key_chunk in (1, 7, 32):
        chunked = vertical_slash(q[:, -24:], k, 8, key_chunk=key_chunk, **mode)
        assert torch.equal(chunked.active_BHQK, whole.active_BHQK)
        assert torch.equal(chunked.bars_BHS, whole.bars_BHS)


def test_scores_of_scattered_key_subsets_add_up_to_the_whole():
    """What each context-parallel rank computes: its keys at scattered global positions (the strided, non-run
    path), the softmax denominators combined over the subsets, the scores summed."""
    seq, last = 48, 12
    q, k = _qk(6, seq)
    q_BHGLD = _grouped_queries(q[:, -last:], 2, None)
    early, late = torch.arange(seq - 6), torch.arange(seq - 6, seq)
    # Strided subsets, and one whose keys all follow the first queries (those rows have lse = −inf there).
    subsets = [early[early % 3 == r] for r in range(3)] + [late]
    pieces = [(k[:, positions], positions, _key_chunks(positions, 10)) for positions in subsets]
    lse = torch.stack([_log_normalizer(q_BHGLD, kp, pos, seq, ch) for kp, pos, ch in pieces]).logsumexp(0)
    sums = [_attention_mass(q_BHGLD, kp, pos, seq, lse, ch) for kp, pos, ch in pieces]
    expected_vertical, expected_slash = _direct_vertical_slash_scores(q[:, -last:], k)
    torch.testing.assert_close(sum(v for v, _ in sums), expected_vertical, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(sum(s for _, s in sums), expected_slash, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("block", [1, 4, 8])
def test_selected_slashes_activate_exactly_the_blocks_their_tokens_touch(block):
    seq = 64
    g = torch.Generator().manual_seed(7)
    slash_score = torch.rand(2, 3, seq, generator=g)
    pattern = _vertical_slash_pattern(
        torch.zeros(2, 3, seq), slash_score, block, verticals=0, slashes=9, sink_blocks=0, window_blocks=0
    )
    chosen = slash_score.argsort(dim=-1, descending=True)[..., :9]
    n = seq // block
    expected = torch.zeros(2, 3, n, n, dtype=torch.bool)
    for b, h in ((b, h) for b in range(2) for h in range(3)):
        for offset in chosen[b, h].tolist():
            for i in range(offset, seq):  # query i attends key i − offset on this diagonal
                expected[b, h, i // block, (i - offset) // block] = True
    assert torch.equal(pattern.active_BHQK, expected)
