"""The block-sparse Triton kernels against masked attention (fp32, relative error ≤ 1e-5): every pattern kind
(bars included), GQA and MHA, two block sizes, non-causal masks, key subsets merged in place, rows that see
nothing, and the errors. On the CPU they run in Triton's interpreter (conftest sets TRITON_INTERPRET=1); the
GPU tests compare bf16 against the fp32 reference."""

from __future__ import annotations

import pytest
import torch
from sparse_reference import BATCH, HKV, HQ, masked_attention, needs_interpreter, pattern_of, rel

from sparsetron.kernels import block_sparse
from sparsetron.kernels.block_sparse import (
    attention_delta,
    block_sparse_attention,
    block_sparse_backward,
    block_sparse_forward,
    sparse_lists,
)
from sparsetron.parallel.context.patterns import from_block_mask
from sparsetron.parallel.context.sparse_compute import resolve_backend


def _inputs(seq: int, hq: int, hkv: int, d: int, seed: int = 0, device="cpu", dtype=torch.float32):
    g = torch.Generator(device=device).manual_seed(seed)
    shape = lambda h: (BATCH, seq, h, d)  # noqa: E731
    q, k, v, dout = (torch.randn(shape(h), generator=g, device=device) for h in (hq, hkv, hkv, hq))
    return q.to(dtype), k.to(dtype), v.to(dtype), dout.to(dtype)


def _through_kernel(q, k, v, dout, pattern):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = block_sparse_attention(q, k, v, pattern)
    (out * dout).sum().backward()
    return {"out": out.detach(), "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}


@needs_interpreter
@pytest.mark.parametrize("kind", ["window", "strided", "topk", "vertical_slash"])
@pytest.mark.parametrize(("block", "d"), [(16, 16), (32, 32)])
def test_kernel_equals_masked_attention(kind, block, d):
    q, k, v, dout = _inputs(8 * block, HQ, HKV, d, seed=1)
    pattern = pattern_of(kind, q, k, block)
    assert (pattern.bars_BHS is not None) == (kind == "vertical_slash")
    got, expected = _through_kernel(q, k, v, dout, pattern), masked_attention(q, k, v, dout, pattern)
    for name in expected:
        assert rel(got[name], expected[name]) <= 1e-5, (kind, block, name, rel(got[name], expected[name]))


@needs_interpreter
def test_kernel_mha_and_non_causal_mask():
    """One query head per KV head, and a random block mask without the causal triangle."""
    q, k, v, dout = _inputs(96, 2, 2, 16, seed=2)
    active = torch.rand(BATCH, 2, 6, 6, generator=torch.Generator().manual_seed(3)) < 0.4
    active |= torch.eye(6, dtype=torch.bool)  # every row sees something (empty rows: the test below)
    pattern = from_block_mask(active, 16, causal=False)
    mask = pattern.token_mask()
    assert not pattern.causal and bool(mask.triu(1).any())  # some keys after their query are attended
    got, expected = _through_kernel(q, k, v, dout, pattern), masked_attention(q, k, v, dout, pattern)
    for name in expected:
        assert rel(got[name], expected[name]) <= 1e-5, (name, rel(got[name], expected[name]))


@needs_interpreter
def test_key_subsets_merge_in_place_like_one_call():
    """A ring step's shape: striped query blocks, keys held in two disjoint sets merged into (out, lse)."""
    block, d = 16, 16
    q, k, v, dout = _inputs(8 * block, HQ, HKV, d, seed=4)
    pattern = pattern_of("vertical_slash", q, k, block)
    my_q = torch.tensor([1, 3, 5, 7])
    first, second = torch.tensor([0, 2, 4, 6]), torch.tensor([1, 3, 5, 7])
    tokens = lambda blocks: (blocks[:, None] * block + torch.arange(block)).reshape(-1)  # noqa: E731
    q_local = q[:, tokens(my_q)]
    out, lse = block_sparse_forward(
        q_local, k[:, tokens(first)], v[:, tokens(first)], sparse_lists(pattern, my_q, first), d**-0.5
    )
    block_sparse_forward(
        q_local, k[:, tokens(second)], v[:, tokens(second)], sparse_lists(pattern, my_q, second), d**-0.5,
        out_BSHD=out, lse_BHS=lse,
    )  # fmt: skip
    every = torch.arange(8)
    whole, whole_lse = block_sparse_forward(q_local, k, v, sparse_lists(pattern, my_q, every), d**-0.5)
    assert rel(out, whole) <= 1e-5 and rel(lse, whole_lse) <= 1e-5
    # Backward per key set from the merged (global) out/lse: dq sums over sets, dk/dv land per set.
    delta = attention_delta(dout[:, tokens(my_q)], out)
    dq = torch.zeros(q_local.shape)
    dk_first, _ = block_sparse_backward(
        dout[:, tokens(my_q)], q_local, k[:, tokens(first)], v[:, tokens(first)], lse, delta,
        sparse_lists(pattern, my_q, first), d**-0.5, dq,
    )  # fmt: skip
    dq_whole = torch.zeros(q_local.shape)
    dk_whole, _ = block_sparse_backward(
        dout[:, tokens(my_q)], q_local, k, v, whole_lse, delta, sparse_lists(pattern, my_q, every), d**-0.5,
        dq_whole,
    )  # fmt: skip
    assert rel(dk_first, dk_whole[:, tokens(first)]) <= 1e-5
    block_sparse_backward(
        dout[:, tokens(my_q)], q_local, k[:, tokens(second)], v[:, tokens(second)], lse, delta,
        sparse_lists(pattern, my_q, second), d**-0.5, dq,
    )  # fmt: skip
    assert rel(dq, dq_whole) <= 1e-5


@needs_interpreter
def test_rows_that_see_nothing_get_zero_and_minus_infinity():
    """Causal query blocks before every held key block: out 0, lse -inf, zero gradients, no NaN."""
    block, d = 16, 16
    q, k, v, dout = _inputs(4 * block, HQ, HKV, d, seed=5)
    pattern = from_block_mask(torch.ones(BATCH, HKV, 4, 4, dtype=torch.bool), block)
    lists = sparse_lists(pattern, torch.tensor([0, 1]), torch.tensor([2, 3]))
    out, lse = block_sparse_forward(q[:, : 2 * block], k[:, 2 * block :], v[:, 2 * block :], lists, d**-0.5)
    assert bool((out == 0).all()) and bool(torch.isneginf(lse).all())
    dq = torch.zeros(BATCH, 2 * block, HQ, d)
    dk, dv = block_sparse_backward(
        dout[:, : 2 * block], q[:, : 2 * block], k[:, 2 * block :], v[:, 2 * block :], lse,
        attention_delta(dout[:, : 2 * block], out), lists, d**-0.5, dq,
    )  # fmt: skip
    assert not bool(dq.any()) and not bool(dk.any()) and not bool(dv.any())


@needs_interpreter
def test_bad_inputs_say_what_and_how():
    q, k, v, _ = _inputs(64, HQ, HKV, 16)
    pattern = pattern_of("window", q, k, 16)
    lists = sparse_lists(pattern, torch.arange(4), torch.arange(4))
    with pytest.raises(ValueError, match=r"head dim 24 is not a power of two"):
        block_sparse_forward(*(torch.zeros(BATCH, 64, h, 24) for h in (HQ, HKV, HKV)), lists, 1.0)
    with pytest.raises(ValueError, match=r"block 8 is not a multiple of 16"):
        block_sparse_attention(
            *(torch.zeros(BATCH, 64, h, 16) for h in (HQ, HKV, HKV)), pattern_of("window", q, k, 8)
        )
    with pytest.raises(ValueError, match=r"the lists cover 4×4 blocks of 16 tokens.*q holds 32"):
        block_sparse_forward(q[:, :32], k, v, lists, 1.0)
    with pytest.raises(ValueError, match=r"dtype is torch.float64"):
        block_sparse_forward(q.double(), k.double(), v.double(), lists, 1.0)
    with pytest.raises(
        ValueError, match=r"backend='triton' cannot run these inputs: head dim 8.*backend='auto'"
    ):
        resolve_backend("triton", torch.zeros(1, 4, 2, 8), 16)
    with pytest.raises(ValueError, match=r"backend='flash' is not one of auto, triton, reference"):
        resolve_backend("flash", q, 16)
    assert resolve_backend("auto", q, 16) == "reference"  # the interpreter is for tests, never picked on CPU


# -- GPU: bf16 kernels against the fp32 reference ---------------------------------------------------------

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or block_sparse.triton is None, reason="needs a CUDA GPU and triton"
)


@needs_cuda
@pytest.mark.parametrize("kind", ["topk", "vertical_slash"])
@pytest.mark.parametrize("block", [64, 128])
def test_gpu_bf16_kernel_matches_fp32_reference(kind, block):
    q, k, v, dout = _inputs(16 * block, 8, 2, 128, seed=6, device="cuda")
    pattern = pattern_of(kind, q, k, block)
    got = _through_kernel(*(t.bfloat16() for t in (q, k, v, dout)), pattern)
    reference = masked_attention(q, k, v, dout, pattern)
    for name in reference:
        err = rel(got[name].float(), reference[name])
        assert err <= 2e-2, (kind, block, name, err)


@needs_cuda
def test_gpu_fp32_kernel_is_exact():
    q, k, v, dout = _inputs(512, 8, 2, 64, seed=7, device="cuda")
    pattern = pattern_of("vertical_slash", q, k, 64)
    got, reference = _through_kernel(q, k, v, dout, pattern), masked_attention(q, k, v, dout, pattern)
    for name in reference:
        assert rel(got[name], reference[name]) <= 1e-5, (name, rel(got[name], reference[name]))
