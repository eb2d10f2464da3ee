"""Block attention kernels (tier 2): run decomposition, and every backend against naive fp64 attention.

The oracle is written here from the definition: an explicit mask from global token indices (causal, doc ids,
window), a softmax and autograd for the gradients. The kernels are driven as context parallelism drives them:
each query shard attends over several key blocks whose partial results are merged in fp32, and the backward
of every block gets the GLOBAL output and LSE, its dq summed over key blocks and its dk/dv over query shards.
GPU tests (``-m gpu``) compare the flash and cuDNN paths with the reference backend in bf16.
"""

from __future__ import annotations

import pytest
import torch

from sparsetron.kernels import attention_sdpa
from sparsetron.kernels.attention import (
    KeyPart,
    PairKind,
    RowPlan,
    Run,
    block_attention_backward,
    block_attention_forward,
    classify_pair,
    index_runs,
    plan_block,
)
from sparsetron.kernels.attention_ref import attention_backward_ref, attention_forward_ref, merge_partials
from sparsetron.parallel.context.layouts import global_token_index

S, W, B, D = 32, 4, 2, 8
SCALE = 0.35
# fp64 agreement. Not 1e-14: the first fp64 torch.logsumexp of a process is now and then ~1e-9 off on this
# CPU (torch 2.13; seen in the naive oracle itself, 12 of 150 fresh processes), so the bar leaves it room.
FP64_TOL = 1e-8
# (layout, block): contiguous 1 run, zigzag 2, striped block 2 → 4 short runs (decomposed), block 1 → 8
# runs of one token (one masked call).
LAYOUTS = [("contiguous", 1), ("zigzag", 1), ("striped", 2), ("striped", 1)]


def naive_mask(q_index, k_index, *, causal, q_doc=None, k_doc=None, window=None):
    """Bool [B or 1, Sq, Sk]: which key each query sees, straight from the definition."""
    i, j = q_index[:, None], k_index[None, :]
    allowed = torch.ones(len(q_index), len(k_index), dtype=torch.bool)
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= i - j < window
    allowed = allowed[None]
    if q_doc is not None:
        allowed = allowed & (q_doc[:, :, None] == k_doc[:, None, :])
    return allowed


def naive_attention(q, k, v, mask_BQK, scale):
    """fp64 masked softmax attention, differentiable; rows that see no key give out 0 and lse -inf."""
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    mask = mask_BQK[:, None]
    seen = mask.any(dim=-1, keepdim=True)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    # Unseen rows get finite dummy scores, so neither softmax nor its gradient makes NaNs there.
    scores = torch.where(seen, scores.masked_fill(~mask, float("-inf")), torch.zeros((), dtype=q.dtype))
    probs = torch.softmax(scores, dim=-1) * mask
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    lse = torch.where(seen[..., 0], torch.logsumexp(scores, dim=-1), float("-inf"))
    return out, lse


def naive_full(q, k, v, dout, *, causal, doc=None, window=None):
    """Output, LSE and gradients of the whole sequence (fp64, autograd)."""
    leaves = [t.detach().to(torch.float64).requires_grad_() for t in (q, k, v)]
    index = torch.arange(q.shape[1])
    mask = naive_mask(index, index, causal=causal, q_doc=doc, k_doc=doc, window=window)
    out, lse = naive_attention(*leaves, mask, SCALE)
    out.backward(dout.to(torch.float64))
    return out.detach(), lse.detach(), *(t.grad for t in leaves)


def make_problem(hq=4, hkv=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, hq, D, generator=g, dtype=dtype)
    k = torch.randn(B, S, hkv, D, generator=g, dtype=dtype)
    v = torch.randn(B, S, hkv, D, generator=g, dtype=dtype)
    dout = torch.randn(B, S, hq, D, generator=g, dtype=dtype)
    return q, k, v, dout


def make_docs(seed=0):
    """Doc ids [B, S]: several documents per row, some spanning shards, different per batch row."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(B, S, generator=g) < 0.15
    starts[:, S // 3] = True
    return starts.cumsum(dim=1)


def shards(layout, block):
    return [global_token_index(S, r, W, layout, block) for r in range(W)]


def blockwise(q, k, v, dout, q_shards, k_blocks, *, doc=None, backend="auto", **mask):
    """The kernels driven like a ring: (out, lse, dq, dk, dv) in full sequence order, accumulated in fp32+."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    hq = q.shape[2]
    out_full = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse_full = torch.zeros(q.shape[0], hq, q.shape[1], dtype=acc, device=q.device)
    dq_full, dk_full, dv_full = (torch.zeros(t.shape, dtype=acc, device=q.device) for t in (q, k, v))

    def docs(qi, ki):
        return {} if doc is None else {"q_doc_BS": doc[:, qi], "k_doc_BS": doc[:, ki]}

    for qi in q_shards:
        out, lse = None, None
        for ki in k_blocks:
            part = block_attention_forward(
                q[:, qi], k[:, ki], v[:, ki], qi, ki, scale=SCALE, backend=backend, **docs(qi, ki), **mask
            )
            out, lse = merge_partials(out, lse, *part)
        out_full[:, qi], lse_full[:, :, qi] = out, lse
    for qi in q_shards:
        for ki in k_blocks:
            dq, dk, dv = block_attention_backward(
                dout[:, qi], q[:, qi], k[:, ki], v[:, ki], out_full[:, qi], lse_full[:, :, qi], qi, ki,
                scale=SCALE, backend=backend, **docs(qi, ki), **mask,
            )  # fmt: skip
            dq_full[:, qi] += dq
            dk_full[:, ki] += dk
            dv_full[:, ki] += dv
    return out_full, lse_full, dq_full, dk_full, dv_full


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def assert_lse_close(lse, ref, tol):
    assert torch.equal(torch.isinf(lse), torch.isinf(ref))
    finite = torch.isfinite(ref)
    assert (lse[finite].double() - ref[finite]).abs().max().item() <= tol


def assert_matches(got, want, tol):
    out, lse, dq, dk, dv = got
    out_r, lse_r, dq_r, dk_r, dv_r = want
    assert_lse_close(lse, lse_r, tol)
    for name, a, b in (("out", out, out_r), ("dq", dq, dq_r), ("dk", dk, dk_r), ("dv", dv, dv_r)):
        assert rel(a, b) <= tol, (name, rel(a, b))


# -- run decomposition and classification -------------------------------------------------------------------


# Zigzag's last rank holds chunks W-1 and W, which touch: one run.
@pytest.mark.parametrize(
    ("layout", "block", "n_runs"),
    [("contiguous", 1, [1] * W), ("zigzag", 1, [2] * (W - 1) + [1]), ("striped", 2, [4] * W)],
)
def test_index_runs_of_layouts(layout, block, n_runs):
    for index, expected in zip(shards(layout, block), n_runs, strict=True):
        runs = index_runs(index)
        assert len(runs) == expected
        assert runs[0].start == 0 and runs[-1].stop == len(index)
        for run in runs:
            assert index[run.start : run.stop].tolist() == list(range(run.first, run.last + 1))


def test_index_runs_of_arbitrary_indices():
    assert index_runs(torch.tensor([5, 6, 7, 2, 3, 9])) == [Run(0, 3, 5), Run(3, 5, 2), Run(5, 6, 9)]
    assert index_runs(torch.tensor([4, 4, 5])) == [Run(0, 1, 4), Run(1, 3, 4)]
    assert index_runs(torch.tensor([], dtype=torch.int64)) == []


def run_of(first, length):
    return Run(0, length, first)


@pytest.mark.parametrize(
    ("q_run", "k_run", "causal", "window", "has_docs", "kind"),
    [
        (run_of(0, 8), run_of(8, 8), True, None, False, PairKind.EMPTY),  # keys all in the future
        (run_of(8, 8), run_of(8, 8), True, None, False, PairKind.CAUSAL_DIAG),
        (run_of(8, 8), run_of(0, 8), True, None, False, PairKind.FULL),  # keys all in the past
        (run_of(0, 8), run_of(8, 8), False, None, False, PairKind.FULL),
        (run_of(4, 8), run_of(0, 8), True, None, False, PairKind.PARTIAL),  # offset causal overlap
        (run_of(8, 8), run_of(0, 8), True, None, True, PairKind.PARTIAL),  # doc ids
        (run_of(8, 8), run_of(8, 8), True, None, True, PairKind.PARTIAL),
        (run_of(8, 8), run_of(0, 8), True, 4, False, PairKind.PARTIAL),  # window cuts
        (run_of(8, 8), run_of(0, 8), True, 16, False, PairKind.FULL),  # window cuts nothing
        (run_of(8, 8), run_of(8, 8), True, 8, False, PairKind.CAUSAL_DIAG),
        (run_of(8, 8), run_of(8, 8), True, 7, False, PairKind.PARTIAL),
        (run_of(24, 8), run_of(0, 8), True, 17, False, PairKind.EMPTY),  # window excludes all
        (run_of(24, 8), run_of(0, 8), False, 17, True, PairKind.EMPTY),
        (
            run_of(0, 8),
            run_of(8, 8),
            False,
            4,
            False,
            PairKind.FULL,
        ),  # non-causal window bounds only the past
    ],
)
def test_classify_pair(q_run, k_run, causal, window, has_docs, kind):
    assert classify_pair(q_run, k_run, causal=causal, window=window, has_docs=has_docs) is kind


def zigzag_plan(q_rank, k_rank, **kw):
    z = shards("zigzag", 1)
    return plan_block(z[q_rank], z[k_rank], causal=True, window=None, has_docs=False, **kw)


def test_zigzag_ring_steps_are_one_call_each():
    chunk = S // (2 * W)  # rank r holds chunks r and 2W-1-r
    early, late, whole = slice(0, chunk), slice(chunk, 2 * chunk), slice(0, 2 * chunk)
    # Keys of an earlier rank: both query chunks see its early chunk, nothing of its late one.
    assert zigzag_plan(2, 1) == [RowPlan(whole, (KeyPart(early, PairKind.FULL),))]
    # Keys of a later rank: only the late query chunk sees them, all of them.
    assert zigzag_plan(1, 2) == [RowPlan(early, ()), RowPlan(late, (KeyPart(whole, PairKind.FULL),))]
    assert zigzag_plan(1, 1) == [
        RowPlan(early, (KeyPart(early, PairKind.CAUSAL_DIAG),)),
        RowPlan(late, (KeyPart(early, PairKind.FULL), KeyPart(late, PairKind.CAUSAL_DIAG))),
    ]


def test_striped_past_blocks_merge_into_one_full_part():
    striped = [global_token_index(S, r, 2, "striped", 4) for r in range(2)]
    rows = plan_block(striped[1], striped[0], causal=True, window=None, has_docs=False)
    # Query block j of rank 1 sees key blocks 0..j of rank 0 entirely: one prefix.
    assert rows == [
        RowPlan(slice(4 * j, 4 * j + 4), (KeyPart(slice(0, 4 * j + 4), PairKind.FULL),)) for j in range(4)
    ]


def test_fragmented_block_is_one_masked_call():
    index = global_token_index(S, 1, W, "striped", 1)
    rows = plan_block(index, index, causal=True, window=None, has_docs=False)
    assert rows == [RowPlan(slice(0, S // W), (KeyPart(slice(0, S // W), PairKind.PARTIAL),))]
    later = torch.arange(100, 100 + 2 * S, 2)  # fragmented and entirely after the queries: nothing to do
    rows = plan_block(torch.arange(0, 2 * S, 2), later, causal=True, window=None, has_docs=False)
    assert rows == [RowPlan(slice(0, S), ())]


def covered(rows, seq_q, seq_k):
    """Bool [Sq, Sk]: the (query, key) positions some planned part computes."""
    cover = torch.zeros(seq_q, seq_k, dtype=torch.bool)
    for row in rows:
        for part in row.parts:
            cover[row.q, part.k] = True
    return cover


@pytest.mark.parametrize("window", [None, 3, 9])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("layout", "block"), LAYOUTS)
def test_plan_claims_hold_against_the_mask(layout, block, causal, window):
    # What the fused kernels rely on: FULL parts see everything, CAUSAL_DIAG parts exactly j <= i, rows
    # partition the queries, and nothing visible is left out of the plan.
    index = shards(layout, block)
    for qi in index:
        for ki in [*index, torch.cat(index)]:
            rows = plan_block(qi, ki, causal=causal, window=window, has_docs=False)
            assert [r.q.start for r in rows] == [0, *(r.q.stop for r in rows[:-1])] and rows[
                -1
            ].q.stop == len(qi)
            mask = naive_mask(qi, ki, causal=causal, window=window)[0]
            assert not (mask & ~covered(rows, len(qi), len(ki))).any()
            for row in rows:
                for part in row.parts:
                    sub = mask[row.q, part.k]
                    if part.kind is PairKind.FULL:
                        assert sub.all()
                    if part.kind is PairKind.CAUSAL_DIAG:
                        assert torch.equal(sub, torch.ones_like(sub).tril())


# -- numerics against the naive oracle ------------------------------------------------------------------------


MASKS = {
    "plain": {},
    "docs": {"doc": True},
    "window": {"window": 5},
    "docs+window": {"doc": True, "window": 11},
}


def check_layout(
    layout, block, *, causal, hq, hkv, gathered=False, dtype=torch.float64, doc=False, window=None
):
    q, k, v, dout = make_problem(hq, hkv)
    docs = make_docs() if doc else None
    want = naive_full(q, k, v, dout, causal=causal, doc=docs, window=window)
    q_shards = shards(layout, block)
    k_blocks = [torch.cat(q_shards)] if gathered else q_shards
    cast = [t.to(dtype) for t in (q, k, v, dout)]
    return blockwise(*cast, q_shards, k_blocks, doc=docs, causal=causal, window=window), want


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("layout", "block"), LAYOUTS)
def test_sharded_blocks_match_full_attention(layout, block, causal, mask):
    got, want = check_layout(layout, block, causal=causal, hq=4, hkv=2, **MASKS[mask])
    assert_matches(got, want, FP64_TOL)


@pytest.mark.parametrize(("hq", "hkv"), [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize(("layout", "block"), LAYOUTS)
def test_heads_and_gathered_keys_match_full_attention(layout, block, hq, hkv):
    # One key block holding the whole sequence in all-gather (rank) order, as all-gather/Ulysses CP use it.
    got, want = check_layout(layout, block, causal=True, hq=hq, hkv=hkv, gathered=True, doc=True)
    assert_matches(got, want, FP64_TOL)


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize(("layout", "block"), LAYOUTS)
def test_fp32_inputs_within_1e5_of_fp64(layout, block, mask):
    got, want = check_layout(layout, block, causal=True, hq=4, hkv=2, dtype=torch.float32, **MASKS[mask])
    assert all(t.dtype == torch.float32 for t in got)
    assert_matches(got, want, 1e-5)


def test_rows_without_visible_keys():
    # Keys 4..11 for queries 0..7, causal: rows 0-3 see nothing; taken as the whole key set, their global
    # out is 0 and lse -inf, and their gradients are zero, not NaN.
    q, k, v, dout = make_problem()
    qi, ki = torch.arange(0, 8), torch.arange(4, 12)
    q, k, v, dout = q[:, :8], k[:, :8], v[:, :8], dout[:, :8]
    out, lse = block_attention_forward(q, k, v, qi, ki, scale=SCALE, causal=True)
    assert torch.equal(out[:, :4], torch.zeros_like(out[:, :4]))
    assert torch.isneginf(lse[:, :, :4]).all() and torch.isfinite(lse[:, :, 4:]).all()
    grads = block_attention_backward(dout, q, k, v, out, lse, qi, ki, scale=SCALE, causal=True)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out_r, lse_r = naive_attention(*leaves, naive_mask(qi, ki, causal=True), SCALE)
    out_r.backward(dout)
    assert_matches((out, lse, *grads), (out_r.detach(), lse_r.detach(), *(t.grad for t in leaves)), FP64_TOL)
    assert torch.equal(grads[0][:, :4], torch.zeros_like(grads[0][:, :4]))


def test_block_with_nothing_visible_returns_zero_and_neg_inf():
    q, k, v, _ = make_problem()
    out, lse = block_attention_forward(
        q[:, :8], k[:, :8], v[:, :8], torch.arange(8), torch.arange(8, 16), scale=1.0
    )
    assert not out.any() and torch.isneginf(lse).all()


def test_reference_row_chunks_are_exact(monkeypatch):
    from sparsetron.kernels import attention

    whole = check_layout("zigzag", 1, causal=True, hq=4, hkv=2, doc=True)[0]
    monkeypatch.setattr(attention, "REF_SCORE_ELEMENTS", B * 4 * 3)  # three query rows per chunk
    chunked = check_layout("zigzag", 1, causal=True, hq=4, hkv=2, doc=True)[0]
    for a, b in zip(whole, chunked, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def stand_in_forward(backend, q, k, v, *, causal, scale):
    """What flash/cuDNN compute, from the reference: all keys visible, or j <= i on a square pair."""
    mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool)
    return attention_forward_ref(q, k, v, (mask.tril() if causal else mask)[None], scale)


def stand_in_backward(backend, dout, q, k, v, out, lse, *, causal, scale):
    mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool)
    return attention_backward_ref(dout, q, k, v, out, lse, (mask.tril() if causal else mask)[None], scale)


@pytest.mark.parametrize(("hq", "hkv"), [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("mask", ["plain", "window"])
@pytest.mark.parametrize(("layout", "block"), LAYOUTS)
def test_fused_path_orchestration_with_a_stand_in_kernel(monkeypatch, layout, block, mask, hq, hkv):
    # The fused path (head expansion, group sums, global out/LSE slices, fp32 accumulation) on the CPU:
    # the stand-in computes only what a fused kernel can, so a misplanned pair would show up as an error.
    monkeypatch.setattr(attention_sdpa, "unsupported_reason", lambda backend, q: None)
    monkeypatch.setattr(attention_sdpa, "fused_forward", stand_in_forward)
    monkeypatch.setattr(attention_sdpa, "fused_backward", stand_in_backward)
    q, k, v, dout = make_problem(hq, hkv)
    window = MASKS[mask].get("window")
    want = naive_full(q, k, v, dout, causal=True, window=window)
    index = shards(layout, block)
    assert_matches(
        blockwise(q, k, v, dout, index, index, backend="flash", causal=True, window=window), want, 1e-6
    )


def test_backend_is_validated():
    q, k, v, _ = make_problem()
    index = torch.arange(S)
    with pytest.raises(ValueError, match="not one of"):
        block_attention_forward(q, k, v, index, index, scale=SCALE, backend="triton")
    with pytest.raises(ValueError, match="CUDA-only"):
        block_attention_forward(q, k, v, index, index, scale=SCALE, backend="flash")
    with pytest.raises(ValueError, match=r"\[Sq\]"):
        block_attention_forward(q, k, v, index[:-1], index, scale=SCALE)
    auto = block_attention_forward(q, k, v, index, index, scale=SCALE, backend="auto")
    reference = block_attention_forward(q, k, v, index, index, scale=SCALE, backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(auto, reference, strict=True))


# -- GPU: the fused kernels against the reference backend, bf16 -------------------------------------------------

BF16_TOL = 2e-2


def gpu_problem(seq, hq, hkv, d=128, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(1, seq, hq, d), (1, seq, hkv, d), (1, seq, hkv, d), (1, seq, hq, d)]
    return [torch.randn(s, device="cuda", dtype=torch.bfloat16, generator=g) for s in shapes]


def gpu_blockwise(q, k, v, dout, q_shards, k_blocks, backend, **mask):
    q_shards = [i.cuda() for i in q_shards]
    k_blocks = [i.cuda() for i in k_blocks]
    return blockwise(q, k, v, dout, q_shards, k_blocks, backend=backend, **mask)


@pytest.mark.gpu
@pytest.mark.parametrize(("hq", "hkv"), [(8, 8), (8, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend", ["flash", "cudnn"])
def test_fused_pair_matches_reference(backend, causal, hq, hkv):
    q, k, v, dout = gpu_problem(1000, hq, hkv)
    index = [torch.arange(1000)]
    got = gpu_blockwise(q, k, v, dout, index, index, backend, causal=causal)
    want = gpu_blockwise(q, k, v, dout, index, index, "reference", causal=causal)
    assert_matches(got, want, BF16_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 1500])
@pytest.mark.parametrize(("layout", "block"), [("contiguous", 1), ("zigzag", 1), ("striped", 250)])
@pytest.mark.parametrize("backend", ["auto", "flash", "cudnn"])
def test_fused_ring_decomposition_matches_reference(backend, layout, block, window):
    # A cutting window mixes fused pairs with PARTIAL ones computed by the reference on the GPU.
    seq, world = 4000, 4
    q, k, v, dout = gpu_problem(seq, 8, 2)
    shards_ = [global_token_index(seq, r, world, layout, block) for r in range(world)]
    got = gpu_blockwise(q, k, v, dout, shards_, shards_, backend, causal=True, window=window)
    want = gpu_blockwise(q, k, v, dout, shards_, shards_, "reference", causal=True, window=window)
    assert_matches(got, want, BF16_TOL)
