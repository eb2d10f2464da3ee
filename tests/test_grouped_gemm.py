"""Grouped GEMM backends against an fp64 per-group reference: forward, dx, dw, padding rows, empty groups.

On the CPU the triton kernels run in the interpreter (conftest sets TRITON_INTERPRET=1 before triton is
imported), with 16-row tiles so that groups span several tiles and tiles straddle groups.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsetron.kernels import grouped_gemm
from sparsetron.kernels.grouped_gemm import (
    GEMM_TILE_M,
    grouped_mm,
    grouped_swiglu,
    torch_grouped_mm_available,
)

# Relative Frobenius error against the fp64 reference. fp32: the kernels use IEEE fp32 products. bf16: inputs
# are rounded to bf16 before the reference sees them, so what remains is the output's rounding (the
# interpreter truncates fp32 -> bf16 where a GPU rounds to nearest: ~4e-3).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# SwiGLU also rounds its intermediates (gate, up, hidden) to the activation dtype: three more bf16 roundings.
SWIGLU_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
TRITON_SKIP = grouped_gemm._triton_unsupported_reason(torch.zeros(1, 1))
needs_triton = pytest.mark.skipif(TRITON_SKIP is not None, reason=f"triton cannot run here: {TRITON_SKIP}")

# (M, K, N, counts): M, K, N not multiples of the interpreter's 16-wide tiles unless named so.
CASES = {
    "uneven": (50, 40, 24, [5, 17, 9, 19]),
    "empty_groups": (33, 24, 20, [0, 12, 0, 0, 21, 0]),
    "single_group": (37, 20, 36, [37]),
    "trailing_padding": (30, 18, 26, [6, 10, 3]),
    "all_padding": (8, 16, 16, [0, 0]),
    "no_rows": (0, 16, 8, [0, 0, 0]),
    "tile_multiples": (48, 32, 48, [16, 32]),
}


def make_problem(case, dtype, seed=0):
    rows, k, n, counts = CASES[case]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = (torch.randn(len(counts), k, n, generator=g) / k**0.5).to(dtype)
    dy = torch.randn(rows, n, generator=g).to(dtype)
    return x, w, torch.tensor(counts), dy


def reference(x, w, counts, dy):
    """fp64 ``(y, dx, dw)`` one group at a time; padding rows and empty groups stay zero."""
    x, w, dy = x.double(), w.double(), dy.double()
    y = x.new_zeros(x.shape[0], w.shape[2])
    dx, dw = torch.zeros_like(x), torch.zeros_like(w)
    start = 0
    for g, count in enumerate(counts.tolist()):
        rows = slice(start, start + count)
        y[rows] = x[rows] @ w[g]
        dx[rows] = dy[rows] @ w[g].T
        dw[g] = x[rows].T @ dy[rows]
        start += count
    return y, dx, dw


def run_backend(fn, x, w, counts, dy, **kw):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fn(x, w, counts, **kw)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def assert_matches(got, want, tol):
    for name, a, b in zip(("y", "dx", "dw"), got, want, strict=True):
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert rel(a, b) <= tol, (name, rel(a, b))


def assert_exact_zeros(got, counts):
    # Padding rows and empty groups are zero by construction, not approximately.
    y, dx, dw = got
    total = int(counts.sum())
    assert not y[total:].any() and not dx[total:].any()
    assert not dw[counts == 0].any()


def backends():
    return ["loop", pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", backends())
def test_matches_fp64_reference(backend, case, dtype):
    x, w, counts, dy = make_problem(case, dtype)
    got = run_backend(grouped_mm, x, w, counts, dy, backend=backend)
    assert all(t.dtype == dtype for t in got)
    assert_matches(got, reference(x, w, counts, dy), TOL[dtype])
    assert_exact_zeros(got, counts)


@needs_triton
def test_triton_takes_strided_inputs_and_gradients():
    # A transposed weight view, a row-strided x and an expanded (stride-0) gradient, as autograd may send.
    x, w, counts, _ = make_problem("uneven", torch.float32)
    w_view = w.transpose(1, 2).contiguous().transpose(1, 2)
    x_view = torch.cat([x, x], dim=1)[:, : x.shape[1]]
    dy = torch.ones(1, w.shape[2]).expand(x.shape[0], -1)
    got = run_backend(grouped_mm, x_view, w_view, counts, dy, backend="triton")
    assert_matches(got, reference(x, w, counts, dy), TOL[torch.float32])


def test_auto_is_loop_on_cpu():
    x, w, counts, _ = make_problem("uneven", torch.float32)
    assert not torch_grouped_mm_available(x, w)
    assert torch.equal(grouped_mm(x, w, counts), grouped_mm(x, w, counts, backend="loop"))


def test_loop_handles_fp64():
    x, w, counts, dy = make_problem("empty_groups", torch.float64)
    assert_matches(
        run_backend(grouped_mm, x, w, counts, dy, backend="loop"), reference(x, w, counts, dy), 1e-12
    )


# -- torch._grouped_mm -----------------------------------------------------------------------------------------

# torch._grouped_mm wants 16-byte rows: K and N multiples of 8 for bf16 (4 for fp32).
TORCH_CASES = {"uneven": [5, 17, 9, 19], "empty_and_padding": [0, 12, 0, 21, 0], "single": [40]}


def torch_cpu_skip_reason():
    """Why torch._grouped_mm cannot run on the CPU here (older torch builds lack it or its CPU kernel)."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    try:
        torch._grouped_mm(torch.ones(1, 4), torch.ones(1, 4, 4), offs=torch.ones(1, dtype=torch.int32))
    except (RuntimeError, NotImplementedError) as exc:
        return f"torch {torch.__version__} has no CPU torch._grouped_mm: {exc}"
    return None


TORCH_CPU_SKIP = torch_cpu_skip_reason()
needs_torch_cpu = pytest.mark.skipif(TORCH_CPU_SKIP is not None, reason=str(TORCH_CPU_SKIP))


@needs_torch_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", TORCH_CASES)
def test_torch_backend_matches_loop(case, dtype):
    # On the CPU torch._grouped_mm runs its per-group fallback; forward and our backward both work there
    # (torch's own autograd does not: it rejects stride-0 gradients and leaves padding rows of dx unset).
    counts = torch.tensor(TORCH_CASES[case])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 32, generator=g).to(dtype)
    w = (torch.randn(len(counts), 32, 24, generator=g) / 32**0.5).to(dtype)
    dy = torch.ones(1, 24).to(dtype).expand(50, -1)
    got = run_backend(grouped_mm, x, w, counts, dy, backend="torch")
    assert_matches(got, run_backend(grouped_mm, x, w, counts, dy, backend="loop"), TOL[dtype])
    assert_exact_zeros(got, counts)


@needs_torch_cpu
def test_torch_backend_rejects_unaligned_rows():
    x, w, counts, _ = make_problem("uneven", torch.bfloat16)  # K=40 and N=24 are multiples of 8
    with pytest.raises(ValueError, match=r"w_GKN has strides \(800, 20, 1\).*backend='auto'"):
        grouped_mm(x, w[..., :20].contiguous(), counts, backend="torch")
    with pytest.raises(ValueError, match=r"N=20 is not a multiple of 8"):
        grouped_mm(x, w[..., :20], counts, backend="torch")  # aligned strides, but y's rows would not be
    with pytest.raises(ValueError, match=r"x_MK has strides \(40, 2\)"):
        grouped_mm(x[:, ::2], w[:, :20], counts, backend="torch")


@needs_triton
@pytest.mark.parametrize("col_programs", [1024, 1], ids=["one_pass", "column_loop"])
def test_zero_rows_kernel(monkeypatch, col_programs):
    # The CUDA path that zeros padding rows and empty groups' dw after torch._grouped_mm, in the interpreter;
    # with one program per row tile, each loops over the 2 column tiles.
    monkeypatch.setattr(grouped_gemm, "_ZERO_COL_PROGRAMS", col_programs)
    t = torch.randn(70, 300)
    zero = torch.arange(70) >= 37
    zero[3] = True
    want = t.masked_fill(zero[:, None], 0)
    grouped_gemm._zero_rows_triton(t, zero)
    assert torch.equal(t, want)


# -- SwiGLU ----------------------------------------------------------------------------------------------------


def swiglu_reference(x, w_gate, w_up, w_down, counts):
    """fp64 per-expert SwiGLU with autograd; padding rows zero."""
    parts, start = [], 0
    for g, count in enumerate(counts.tolist()):
        xg = x[start : start + count]
        parts.append((F.silu(xg @ w_gate[g]) * (xg @ w_up[g])) @ w_down[g])
        start += count
    parts.append(x.new_zeros(x.shape[0] - start, x.shape[1]))
    return torch.cat(parts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", backends())
def test_grouped_swiglu_matches_per_expert_reference(backend, dtype):
    rows, dim, ffn, counts = 40, 24, 20, torch.tensor([9, 0, 22, 3])
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(4, dim, ffn, generator=g), torch.randn(4, dim, ffn, generator=g)]
    weights.append(torch.randn(4, ffn, dim, generator=g))
    tensors = [torch.randn(rows, dim, generator=g), *(w / w.shape[1] ** 0.5 for w in weights)]
    dy = torch.randn(rows, dim, generator=g)
    leaves = [t.to(dtype).requires_grad_() for t in tensors]
    y = grouped_swiglu(leaves[0], torch.cat(leaves[1:3], dim=2), leaves[3], counts, backend=backend)
    y.backward(dy.to(dtype))
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    y_ref = swiglu_reference(*ref_leaves, counts)
    y_ref.backward(dy.double())
    assert rel(y.detach(), y_ref.detach()) <= SWIGLU_TOL[dtype]
    for leaf, ref in zip(leaves, ref_leaves, strict=True):
        assert rel(leaf.grad, ref.grad) <= SWIGLU_TOL[dtype]
    assert not y[34:].any() and not leaves[0].grad[34:].any()
    assert not any(leaf.grad[1].any() for leaf in leaves[1:])


def test_grouped_swiglu_rejects_mismatched_weights():
    x, w, counts, _ = make_problem("uneven", torch.float32)  # w [4, 40, 24]
    with pytest.raises(ValueError, match=r"must be \[G, D, 2F\] and \[G, F, D\]"):
        grouped_swiglu(x, w, w, counts)


# -- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"counts": [20, 20, 20, 20]}, r"sum to at most M=50.*got sum 80"),
        ({"counts": [5, -1, 9, 19]}, r"must be non-negative"),
        ({"counts": [5, 17, 28]}, r"shape \[G\] with G=4"),
        ({"counts_dtype": torch.float32}, r"must be int32 or int64"),
        ({"x": torch.zeros(2, 25, 40)}, r"must be 2-D \[M, K\]"),
        ({"w": torch.zeros(4, 24, 40)}, r"K = x_MK.shape\[1\] = 40"),
        ({"w_dtype": torch.float64}, r"cast w to x's dtype"),
        ({"backend": "cutlass"}, r"not one of auto, loop, torch, triton"),
    ],
    ids=["sum", "negative", "groups", "counts_dtype", "x_dims", "k_mismatch", "dtype_mismatch", "backend"],
)
@pytest.mark.parametrize("backend", ["loop", "triton", "auto"])
def test_bad_input_is_explained(backend, change, message):
    x, w, counts, _ = make_problem("uneven", torch.float32)
    x = change.get("x", x)
    w = change.get("w", w).to(change.get("w_dtype", w.dtype))
    counts = torch.tensor(
        change.get("counts", counts.tolist()), dtype=change.get("counts_dtype", torch.int64)
    )
    with pytest.raises(ValueError, match=message):
        grouped_mm(x, w, counts, backend=change.get("backend", backend))


def test_forced_triton_on_unsupported_dtype_says_why():
    x, w, counts, _ = make_problem("uneven", torch.float64)
    with pytest.raises(ValueError, match=r"backend='triton' cannot run these inputs: dtype is torch.float64"):
        grouped_mm(x, w, counts, backend="triton")


def test_tile_size_is_the_gpu_row_tile():
    assert isinstance(GEMM_TILE_M, int) and GEMM_TILE_M == 128


# -- GPU: torch and triton against the loop reference, bf16, with dirty allocator memory ---------------------


def gpu_problem(counts, dim=256, ffn=512, padding=70, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = sum(counts) + padding
    x = torch.randn(rows, dim, device="cuda", generator=g).to(dtype)
    w = (torch.randn(len(counts), dim, ffn, device="cuda", generator=g) / dim**0.5).to(dtype)
    dy = torch.randn(rows, ffn, device="cuda", generator=g).to(dtype)
    return x, w, torch.tensor(counts, device="cuda"), dy


def poison_allocator():
    # Freed NaN blocks are what torch.empty hands out next, so unwritten output rows would show up as NaN;
    # one large block for the large pool, 1 MiB ones for the small pool (allocations up to 1 MiB).
    blocks = [torch.full((1 << 18,), float("nan"), device="cuda") for _ in range(64)]
    blocks.append(torch.full((1 << 26,), float("nan"), device="cuda"))
    del blocks  # all freed together, so they are distinct blocks


GPU_COUNTS = {
    "uneven": [300, 0, 129, 1, 517, 0, 64, 250],
    "all_empty": [0, 0, 0, 0],
    "one_group": [1000],
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_COUNTS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_backend_matches_loop_bf16(backend, case):
    x, w, counts, dy = gpu_problem(GPU_COUNTS[case])
    if backend == "torch" and not torch_grouped_mm_available(x, w):
        pytest.skip("torch._grouped_mm's fused kernel needs bf16 on sm90/sm100")
    want = run_backend(grouped_mm, x, w, counts, dy, backend="loop")
    run_backend(grouped_mm, x, w, counts, dy, backend=backend)  # autotune outside the checked call
    poison_allocator()
    got = run_backend(grouped_mm, x, w, counts, dy, backend=backend)
    assert_matches(got, want, TOL[torch.bfloat16])
    assert_exact_zeros(got, counts.cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_backends_do_not_sync(backend):
    x, w, counts, dy = gpu_problem(GPU_COUNTS["uneven"])
    if backend == "torch" and not torch_grouped_mm_available(x, w):
        pytest.skip("torch._grouped_mm's fused kernel needs bf16 on sm90/sm100")
    run_backend(grouped_mm, x, w, counts, dy, backend=backend)  # autotune (it syncs) first
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_backend(grouped_mm, x, w, counts, dy, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_gpu_triton_fp32_matches_fp64_reference():
    x, w, counts, dy = gpu_problem(GPU_COUNTS["uneven"], dtype=torch.float32)
    got = run_backend(grouped_mm, x, w, counts, dy, backend="triton")
    assert_matches(got, reference(x, w, counts.cpu(), dy), 1e-5)


@pytest.mark.gpu
def test_gpu_triton_with_no_rows():
    x, w, counts, dy = gpu_problem([0, 0], padding=0)
    y, dx, dw = run_backend(grouped_mm, x, w, counts, dy, backend="triton")
    assert y.shape == (0, w.shape[2]) and dx.shape == x.shape and not dw.any()


@pytest.mark.gpu
def test_gpu_auto_picks_torch_where_available():
    x, w, _, _ = gpu_problem([4])
    expected = "torch" if torch_grouped_mm_available(x, w) else "triton"
    assert grouped_gemm._resolve_backend("auto", x, w) == expected
    assert grouped_gemm._resolve_backend("auto", x.float(), w.float()) == "triton"
    assert grouped_gemm._resolve_backend("auto", x[:0], w) == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_grouped_swiglu_matches_loop(backend):
    x, w_gate, counts, _ = gpu_problem(GPU_COUNTS["uneven"], dim=256, ffn=384)
    w_up = gpu_problem(GPU_COUNTS["uneven"], dim=256, ffn=384)[1].roll(1, dims=0)
    w_down = gpu_problem(GPU_COUNTS["uneven"], dim=384, ffn=256)[1]
    dy = x.roll(1, dims=0)
    results = []
    for name in (backend, "loop"):
        leaves = [t.clone().requires_grad_() for t in (x, w_gate, w_up, w_down)]
        y = grouped_swiglu(leaves[0], torch.cat(leaves[1:3], dim=2), leaves[3], counts, backend=name)
        y.backward(dy)
        results.append([y.detach(), *(t.grad for t in leaves)])
    for got, want in zip(*results, strict=True):
        assert rel(got, want) <= SWIGLU_TOL[torch.bfloat16]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_activation_kernel_matches_torch_ops_with_gradients(dtype):
    """The fused activation kernels (interpreter here, compiled on CUDA) against silu(gate) * up, both ways."""
    g = torch.Generator().manual_seed(3)
    gate_up = (torch.randn(37, 2 * 45, generator=g) * 3).to(dtype).requires_grad_()
    grad = torch.randn(37, 45, generator=g).to(dtype)
    got = grouped_gemm._SwiGLUActivation.apply(gate_up)
    (got_grad,) = torch.autograd.grad(got, gate_up, grad)
    ref_in = gate_up.detach().double().requires_grad_()
    gate, up = ref_in.chunk(2, dim=1)
    want = F.silu(gate) * up
    (want_grad,) = torch.autograd.grad(want, ref_in, grad.double())
    tol = TOL[dtype]
    assert float((got.double() - want).norm() / want.norm()) <= tol
    assert float((got_grad.double() - want_grad).norm() / want_grad.norm()) <= tol


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_combine_kernel_matches_reference_with_gradients(dtype):
    """y[t] = Σ_k w[t,k]·rows[pos[t,k]] through the Triton kernels vs fp64 torch ops: value, d rows, d weights."""
    from sparsetron.kernels.moe_combine import _combine_reference, fused_weighted_combine

    g = torch.Generator().manual_seed(4)
    tokens, copies, dim = 13, 3, 150  # dim spans two interpreter blocks, the last one partial
    rows = torch.randn(tokens * copies, dim, generator=g).to(dtype).requires_grad_()
    position = torch.randperm(tokens * copies, generator=g).view(tokens, copies)
    weight = torch.rand(tokens, copies, generator=g).requires_grad_()
    grad = torch.randn(tokens, dim, generator=g).to(dtype)
    got = fused_weighted_combine(rows, position, weight)
    got_rows, got_weight = torch.autograd.grad(got, (rows, weight), grad)
    ref_rows = rows.detach().double().requires_grad_()
    ref_weight = weight.detach().double().requires_grad_()
    want = _combine_reference(ref_rows, position, ref_weight)
    want_rows, want_weight = torch.autograd.grad(want, (ref_rows, ref_weight), grad.double())
    tol = TOL[dtype]
    for a, b in ((got, want), (got_rows, want_rows), (got_weight, want_weight)):
        assert float((a.double() - b).norm() / b.norm()) <= tol


@pytest.mark.gpu
def test_gpu_weighted_combine_matches_reference():
    from sparsetron.kernels.moe_combine import _combine_reference, weighted_combine

    g = torch.Generator(device="cuda").manual_seed(5)
    tokens, copies, dim = 4096, 8, 2048
    rows = torch.randn(tokens * copies, dim, device="cuda", generator=g).bfloat16().requires_grad_()
    position = torch.randperm(tokens * copies, device="cuda", generator=g).view(tokens, copies)
    weight = torch.rand(tokens, copies, device="cuda", generator=g).requires_grad_()
    grad = torch.randn(tokens, dim, device="cuda", generator=g).bfloat16()
    results = []
    for fn in (weighted_combine, _combine_reference):
        leaves = (rows.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_())
        out = fn(leaves[0], position, leaves[1])
        results.append((out, *torch.autograd.grad(out, leaves, grad)))
    for got, want in zip(*results, strict=True):
        assert rel(got.float(), want.float()) <= TOL[torch.bfloat16]
