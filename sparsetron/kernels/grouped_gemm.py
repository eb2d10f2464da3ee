"""Grouped GEMM for MoE experts: rows grouped contiguously by expert, one weight matrix per group.

``grouped_mm(x_MK, w_GKN, counts_G) -> y_MN``: the first ``counts_G[0]`` rows of ``x_MK`` are multiplied by
``w_GKN[0]``, the next ``counts_G[1]`` by ``w_GKN[1]``, and so on. Rows past ``sum(counts_G)`` (padding,
dropped slots) give zeros in ``y`` and get zero gradient; a group with no rows gets a zero weight gradient.
Differentiable in ``x`` and ``w`` (``dx = grouped(dy, wᵀ)``, ``dw[g] = x_gᵀ dy_g``); the output has ``x``'s
dtype, products accumulate in fp32 (fp64 for fp64 inputs on the loop backend). ``counts_G`` is an int32/int64
tensor on ``x``'s device, read on the device: the torch and triton backends never sync with the host.
:func:`grouped_swiglu` builds the SwiGLU expert FFN from three grouped GEMMs.

**Backends** (``backend=``):

- ``loop``: plain torch ops, one matmul per group (reads the counts on the host once, so it syncs on a GPU);
  any device and dtype. The CPU path and the reference.
- ``torch``: ``torch._grouped_mm`` under our own autograd function. Its fused kernel (CUTLASS, no host sync)
  runs only for bf16 on sm90/sm100 GPUs (H100/H200/B200) with 16-byte aligned rows
  (:func:`torch_grouped_mm_available`); elsewhere (CPU, fp16/fp32 on CUDA) torch loops over groups after
  copying the offsets to the host. The kernel leaves rows past the last offset uninitialised in the output and in dx (pytorch#154557),
  and some GPUs leave empty groups' dw unwritten (pytorch#172439), so we zero those rows (a small kernel
  that touches only them on CUDA) rather than use torch's own autograd formula.
- ``triton``: the kernels below (bf16/fp16/fp32, CUDA or ``TRITON_INTERPRET=1`` on the CPU). The row-tile
  schedule is computed on the device from the counts: the forward grid has ``cdiv(M, BLOCK_M) + G``
  row tiles, an upper bound on the tiles of all groups plus the padding rows, and each program finds its
  group by comparing its tile index with the groups' cumulative tile counts; programs past the groups' tiles
  write the padding rows' zeros. ``dx`` runs the same kernel on a transposed view of ``w`` (no copy); ``dw``
  has one program per (K tile, N tile, group) that loops over the group's rows. fp32 inputs use IEEE fp32
  products (no TF32), so the interpreter matches fp32 references.
- ``auto``: ``torch`` where :func:`torch_grouped_mm_available`, else ``triton`` on CUDA, else ``loop``.

**Bad counts.** Counts on the CPU are checked (non-negative, ``sum ≤ M``) by every backend, and the loop
backend checks device counts after reading them. On a GPU the torch and triton backends cannot check without
a host sync; they clamp the group boundaries to ``[0, M]`` so bad counts never read or write out of bounds.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pyproject installs triton on Linux x86_64 only
    triton = None

BACKENDS = ("auto", "loop", "torch", "triton")

#: Row tile of the grouped GEMMs: the triton backend's ``BLOCK_M`` on a GPU; torch's CUTLASS kernel uses 128
#: or 64, which divides it. A group of ``c`` rows runs ``cdiv(c, GEMM_TILE_M)`` tiles, so the remainder of its
#: last tile is wasted work unless ``c`` is a multiple: token rounding rounds each expert's count to one.
GEMM_TILE_M: int = 128

# What both torch._grouped_mm and the triton kernels take.
_GEMM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# torch's CUTLASS grouped GEMM handles fewer groups than this (GroupMM.cu, torch 2.11).
_TORCH_MAX_GROUPS = 1024
# Triton picks the interpreter when a kernel is defined, so the tile configs follow the same switch: the
# interpreter runs numpy per program, so small tiles keep CPU tests fast and still span several tiles.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_MM_BLOCK_M = 16 if _INTERPRET else GEMM_TILE_M
# The interpreter (triton 3.9) multiplies bf16 dot operands' bit patterns as integers; there the kernels
# multiply fp32 copies instead, which gives the same products (bf16 × bf16 is exact in fp32).
_DOT_IN_FP32 = _INTERPRET
# Row tiles that share each column tile in the forward grid, so their rows of x stay in L2 meanwhile.
_SUPER_M = 8
# Tile of the kernel that zeros rows after torch._grouped_mm, and its most programs along a row (each loops
# over its share of the columns: a [G, K·N] view of dw has more column tiles than a grid axis may hold).
_ZERO_BLOCK_R, _ZERO_BLOCK_C = 16, 256
_ZERO_COL_PROGRAMS = 1024


# -- input checks and backend choice ---------------------------------------------------------------------------


def grouped_mm(
    x_MK: torch.Tensor, w_GKN: torch.Tensor, counts_G: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """``y_MN``: rows of ``x_MK`` grouped by ``counts_G`` times their group's ``w_GKN[g]`` (module docstring).

    ``x_MK [M, K]`` and ``w_GKN [G, K, N]`` of one dtype, ``counts_G [G]`` int32/int64, all on one device.
    Returns ``y_MN [M, N]`` in ``x``'s dtype, zero past ``sum(counts_G)``; differentiable in ``x`` and ``w``.
    """
    _check_inputs(x_MK, w_GKN, counts_G)
    chosen = _resolve_backend(backend, x_MK, w_GKN)
    if chosen == "loop":
        return _loop_mm(x_MK, w_GKN, counts_G)
    if chosen == "torch":
        return _TorchGroupedMM.apply(x_MK, w_GKN, counts_G)
    return _TritonGroupedMM.apply(x_MK, w_GKN, counts_G)


def grouped_swiglu(
    x_MD: torch.Tensor,
    w_gate_up_GD2F: torch.Tensor,
    w_down_GFD: torch.Tensor,
    counts_G: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``y_MD``: per group ``(silu(x @ w_gate[g]) * (x @ w_up[g])) @ w_down[g]`` over rows grouped by ``counts_G``.

    ``x_MD [M, D]``; ``w_gate_up_GD2F [G, D, 2F]`` holds ``w_gate`` in its first ``F`` columns and ``w_up`` in
    the last ``F``; ``w_down_GFD [G, F, D]``; weights in ``x``'s dtype; ``counts_G [G]`` int on ``x``'s device.
    Returns ``y_MD [M, D]``, zero past ``sum(counts_G)``: one grouped GEMM with ``N = 2F`` (wider tiles and
    half the launches of separate gate and up GEMMs), :func:`swiglu_activation`, one grouped GEMM back;
    ``backend`` as in :func:`grouped_mm`; differentiable in ``x`` and the weights.
    """
    groups, dim, width = w_gate_up_GD2F.shape
    if width % 2 or w_down_GFD.shape != (groups, width // 2, dim):
        raise ValueError(
            f"w_gate_up {tuple(w_gate_up_GD2F.shape)} and w_down {tuple(w_down_GFD.shape)} must be [G, D, 2F] "
            "and [G, F, D] (gate columns first, then up); pass the stacked expert weights without transposing them"
        )
    gate_up_M2F = grouped_mm(x_MD, w_gate_up_GD2F, counts_G, backend=backend)
    return grouped_mm(swiglu_activation(gate_up_M2F), w_down_GFD, counts_G, backend=backend)


def swiglu_activation(gate_up_M2F: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up_M2F = [gate | up]`` (``[M, 2F]`` → ``[M, F]``), differentiable.

    On CUDA one fused Triton kernel each way (fp32 math, the input dtype stored), where separate torch ops
    would read and write the ``[M, F]`` intermediates several times; elsewhere plain torch ops (the kernels
    are tested on the CPU under ``TRITON_INTERPRET=1`` through ``_SwiGLUActivation``).
    """
    fused = gate_up_M2F.dtype in _GEMM_DTYPES and gate_up_M2F.numel() > 0  # fp64 keeps exact torch math
    if triton is not None and gate_up_M2F.is_cuda and fused:
        return _SwiGLUActivation.apply(gate_up_M2F)
    gate_MF, up_MF = gate_up_M2F.chunk(2, dim=1)
    return F.silu(gate_MF) * up_MF


class _SwiGLUActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up_M2F):
        gate_up_M2F = gate_up_M2F.contiguous()
        rows, width = gate_up_M2F.shape
        out_MF = gate_up_M2F.new_empty(rows, width // 2)
        grid = (triton.cdiv(out_MF.numel(), _ACT_BLOCK),)
        _swiglu_fwd_kernel[grid](gate_up_M2F, out_MF, out_MF.numel(), width // 2, BLOCK=_ACT_BLOCK)
        ctx.save_for_backward(gate_up_M2F)
        return out_MF

    @staticmethod
    def backward(ctx, grad_MF):
        (gate_up_M2F,) = ctx.saved_tensors
        grad_MF = grad_MF.contiguous()
        grad_M2F = torch.empty_like(gate_up_M2F)
        grid = (triton.cdiv(grad_MF.numel(), _ACT_BLOCK),)
        _swiglu_bwd_kernel[grid](
            gate_up_M2F, grad_MF, grad_M2F, grad_MF.numel(), grad_MF.shape[1], BLOCK=_ACT_BLOCK
        )
        return grad_M2F


def torch_grouped_mm_available(x_MK: torch.Tensor, w_GKN: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs its fused, sync-free kernel on tensors like ``x_MK``, ``w_GKN``.

    Rules of torch 2.11 (``GroupedBlas.cpp``, ``GroupedMMUtils.h``, ``GroupMM.cu``): CUDA device of compute
    capability 9.x or 10.x; ``x`` and ``w`` bf16; unit stride in the last dim and the other strides, so K and
    N, multiples of 16 bytes (8 bf16 elements), storage 16-byte aligned; fewer than 1024 groups. We also ask
    for ``M ≥ 1``: a rank with no rows at all takes the triton backend. ``auto`` picks ``torch`` exactly here.
    """
    if _torch_unsupported_reason(x_MK, w_GKN) is not None or not x_MK.is_cuda:
        return False
    fused_arch = torch.cuda.get_device_capability(x_MK.device)[0] in (9, 10)
    both_bf16 = x_MK.dtype == w_GKN.dtype == torch.bfloat16
    storage_aligned = x_MK.data_ptr() % 16 == 0 and w_GKN.data_ptr() % 16 == 0
    sizes_ok = x_MK.shape[0] >= 1 and w_GKN.shape[0] < _TORCH_MAX_GROUPS
    return fused_arch and both_bf16 and storage_aligned and sizes_ok


def _check_inputs(x_MK: torch.Tensor, w_GKN: torch.Tensor, counts_G: torch.Tensor) -> None:
    if x_MK.dim() != 2 or w_GKN.dim() != 3:
        raise ValueError(
            f"x_MK {tuple(x_MK.shape)} must be 2-D [M, K] and w_GKN {tuple(w_GKN.shape)} 3-D [G, K, N]; "
            "flatten the token dims of x (x.flatten(0, -2)) and stack one [K, N] weight per group"
        )
    if w_GKN.shape[0] < 1 or x_MK.shape[1] != w_GKN.shape[1]:
        raise ValueError(
            f"w_GKN {tuple(w_GKN.shape)} must hold G ≥ 1 groups of [K, N] with K = x_MK.shape[1] = "
            f"{x_MK.shape[1]}; pass weights as [G, in, out], not [G, out, in]"
        )
    if counts_G.shape != (w_GKN.shape[0],) or counts_G.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"counts_G ({counts_G.dtype}, shape {tuple(counts_G.shape)}) must be int32 or int64 of shape "
            f"[G] with G={w_GKN.shape[0]} (w_GKN.shape[0]); pass one row count per group"
        )
    if x_MK.dtype != w_GKN.dtype:
        raise ValueError(f"x_MK is {x_MK.dtype} but w_GKN is {w_GKN.dtype}; cast w to x's dtype")
    if not x_MK.device == w_GKN.device == counts_G.device:
        raise ValueError(
            f"x_MK ({x_MK.device}), w_GKN ({w_GKN.device}) and counts_G ({counts_G.device}) must share a "
            "device; keep counts_G on x's device (the GPU backends read it there, without a host sync)"
        )
    if counts_G.device.type == "cpu":
        _check_counts(counts_G.tolist(), x_MK.shape[0])


def _check_counts(counts: list[int], rows: int) -> None:
    if any(c < 0 for c in counts) or sum(counts) > rows:
        raise ValueError(
            f"counts_G={counts} must be non-negative and sum to at most M={rows} (the rows of x_MK), got "
            f"sum {sum(counts)}; rows past the sum are padding, so pass x with at least that many rows"
        )


def _resolve_backend(backend: str, x_MK: torch.Tensor, w_GKN: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if torch_grouped_mm_available(x_MK, w_GKN):
            return "torch"
        return "triton" if x_MK.is_cuda and _triton_unsupported_reason(x_MK) is None else "loop"
    if backend == "loop":
        return backend
    reason = (
        _torch_unsupported_reason(x_MK, w_GKN) if backend == "torch" else _triton_unsupported_reason(x_MK)
    )
    if reason is not None:
        raise ValueError(
            f"backend={backend!r} cannot run these inputs: {reason}; use backend='auto' (picks one that "
            "can) or backend='loop'"
        )
    return backend


def _torch_unsupported_reason(x_MK: torch.Tensor, w_GKN: torch.Tensor) -> str | None:
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if x_MK.dtype not in _GEMM_DTYPES:
        return f"dtype is {x_MK.dtype}; torch._grouped_mm takes bfloat16, float16 or float32"
    align = 16 // x_MK.element_size()
    for name, t in (("x_MK", x_MK), ("w_GKN", w_GKN)):
        if t.stride(-1) != 1 or any(s % align for s in t.stride()[:-1]):
            return (
                f"{name} has strides {t.stride()}; torch._grouped_mm needs unit stride in the last dim and "
                f"the others multiples of 16 bytes ({align} elements), so K and N multiples of {align}"
            )
    if w_GKN.shape[2] % align:
        return f"N={w_GKN.shape[2]} is not a multiple of {align} (16 bytes), which torch._grouped_mm needs"
    return None


def _triton_unsupported_reason(x_MK: torch.Tensor) -> str | None:
    if triton is None:
        return "triton is not installed"
    if x_MK.dtype not in _GEMM_DTYPES:
        return f"dtype is {x_MK.dtype}; the triton kernels take bfloat16, float16 or float32"
    if not x_MK.is_cuda and not _INTERPRET:
        return (
            f"tensors are on {x_MK.device.type}; triton needs CUDA, or TRITON_INTERPRET=1 set before import"
        )
    if x_MK.shape[0] >= 2**31:
        return f"M={x_MK.shape[0]} rows do not fit the kernels' int32 row schedule"
    return None


# -- loop backend ----------------------------------------------------------------------------------------------


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _loop_mm(x_MK: torch.Tensor, w_GKN: torch.Tensor, counts_G: torch.Tensor) -> torch.Tensor:
    """Reference: one matmul per group in fp32 (fp64 for fp64), autograd through plain torch ops."""
    counts = counts_G.tolist()  # one host read; syncs on a GPU
    _check_counts(counts, x_MK.shape[0])
    acc = _acc_dtype(x_MK)
    parts, start = [], 0
    for g, count in enumerate(counts):
        parts.append((x_MK[start : start + count].to(acc) @ w_GKN[g].to(acc)).to(x_MK.dtype))
        start += count
    parts.append(x_MK.new_zeros(x_MK.shape[0] - start, w_GKN.shape[2]))
    return torch.cat(parts)


# -- torch backend ---------------------------------------------------------------------------------------------


def _offsets(counts_G: torch.Tensor, rows: int) -> torch.Tensor:
    # Clamped so that unchecked device counts never address rows outside x.
    return counts_G.clamp(min=0).cumsum(0).clamp(max=rows).to(torch.int32)


def _zero_rows_(t_RC: torch.Tensor, zero_R: torch.Tensor) -> None:
    """Zero in place the rows of ``t_RC`` (2-D, unit stride in dim 1) where ``zero_R`` (bool ``[R]``) is True."""
    if t_RC.is_cuda and triton is not None:
        _zero_rows_triton(t_RC, zero_R)
    else:
        t_RC.masked_fill_(zero_R[:, None], 0)


def _aligned_rows(t: torch.Tensor) -> torch.Tensor:
    # Incoming gradients may be expanded (stride 0) or offset views; torch._grouped_mm rejects both.
    if t.is_contiguous() and t.data_ptr() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


class _TorchGroupedMM(torch.autograd.Function):
    """``torch._grouped_mm`` forward and backward, with padding rows and empty groups' dw zeroed."""

    @staticmethod
    def forward(ctx, x_MK, w_GKN, counts_G):
        offs_G = _offsets(counts_G, x_MK.shape[0])
        y_MN = torch._grouped_mm(x_MK, w_GKN, offs=offs_G)
        _zero_rows_(y_MN, _padding_rows(offs_G, x_MK.shape[0]))
        ctx.save_for_backward(x_MK, w_GKN, offs_G)
        return y_MN

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy_MN):
        x_MK, w_GKN, offs_G = ctx.saved_tensors
        dy_MN = _aligned_rows(dy_MN)
        dx_MK = dw_GKN = None
        if ctx.needs_input_grad[0]:
            dx_MK = torch._grouped_mm(dy_MN, w_GKN.transpose(-2, -1), offs=offs_G)
            _zero_rows_(dx_MK, _padding_rows(offs_G, x_MK.shape[0]))
        if ctx.needs_input_grad[1]:
            dw_GKN = torch._grouped_mm(x_MK.transpose(-2, -1), dy_MN, offs=offs_G)
            empty_G = torch.diff(offs_G, prepend=offs_G.new_zeros(1)) == 0
            _zero_rows_(dw_GKN.view(dw_GKN.shape[0], -1), empty_G)
        return dx_MK, dw_GKN, None


def _padding_rows(offs_G: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.arange(rows, device=offs_G.device) >= offs_G[-1]


def _zero_rows_triton(t_RC: torch.Tensor, zero_R: torch.Tensor) -> None:
    """:func:`_zero_rows_` on the device; programs whose rows all stay exit after reading their flags."""
    rows, cols = t_RC.shape
    if t_RC.numel() == 0:
        return
    grid = (triton.cdiv(rows, _ZERO_BLOCK_R), min(triton.cdiv(cols, _ZERO_BLOCK_C), _ZERO_COL_PROGRAMS))
    # uint8 view of the bool flags: plain bytes on every triton version.
    _zero_rows_kernel[grid](
        t_RC,
        zero_R.view(torch.uint8),
        rows,
        cols,
        t_RC.stride(0),
        BLOCK_R=_ZERO_BLOCK_R,
        BLOCK_C=_ZERO_BLOCK_C,
    )


# -- triton backend --------------------------------------------------------------------------------------------


def _schedule(counts_G: torch.Tensor, rows: int, block_m: int) -> torch.Tensor:
    """int32 ``[3, G]`` on the counts' device: each group's first row, end row, and cumulative row-tile count."""
    end_G = counts_G.clamp(min=0).cumsum(0).clamp(max=rows)
    start_G = torch.cat([end_G.new_zeros(1), end_G[:-1]])
    tile_end_G = torch.div(end_G - start_G + block_m - 1, block_m, rounding_mode="floor").cumsum(0)
    return torch.stack([start_G, end_G, tile_end_G]).to(torch.int32)


def _precision(dtype: torch.dtype) -> str:
    # IEEE fp32 products for fp32 inputs (TF32 would miss fp32 references by ~1e-3); halves ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


def _triton_mm(a_MK: torch.Tensor, b_GKN: torch.Tensor, sched_3G: torch.Tensor) -> torch.Tensor:
    """Grouped ``a_MK @ b_GKN[g]`` by the schedule (any strides); padding rows written as zeros."""
    rows, inner = a_MK.shape
    groups, _, cols = b_GKN.shape
    out_MN = a_MK.new_empty(rows, cols)
    if out_MN.numel() == 0:
        return out_MN
    tiles_m = triton.cdiv(rows, _MM_BLOCK_M) + groups

    def grid(meta):
        return (tiles_m * triton.cdiv(cols, meta["BLOCK_N"]),)

    _grouped_mm_kernel[grid](
        a_MK, b_GKN, out_MN, sched_3G, rows, cols, inner, groups,
        *a_MK.stride(), *b_GKN.stride(), *out_MN.stride(),
        BLOCK_M=_MM_BLOCK_M, SUPER_M=_SUPER_M, G_POW2=max(16, triton.next_power_of_2(groups)),
        PRECISION=_precision(a_MK.dtype), DOT_IN_FP32=_DOT_IN_FP32,
    )  # fmt: skip
    return out_MN


def _triton_dw(x_MK: torch.Tensor, dy_MN: torch.Tensor, sched_3G: torch.Tensor, dtype: torch.dtype):
    """``dw_GKN[g] = x_gᵀ dy_g`` over each group's rows of the schedule, zero for empty groups."""
    groups = sched_3G.shape[1]
    inner, cols = x_MK.shape[1], dy_MN.shape[1]
    dw_GKN = x_MK.new_empty(groups, inner, cols, dtype=dtype)
    if dw_GKN.numel() == 0:
        return dw_GKN

    def grid(meta):
        return (triton.cdiv(inner, meta["BLOCK_K"]) * triton.cdiv(cols, meta["BLOCK_N"]), groups)

    _grouped_dw_kernel[grid](
        x_MK, dy_MN, dw_GKN, sched_3G, cols, inner, groups,
        *x_MK.stride(), *dy_MN.stride(), *dw_GKN.stride(),
        PRECISION=_precision(x_MK.dtype), DOT_IN_FP32=_DOT_IN_FP32,
    )  # fmt: skip
    return dw_GKN


class _TritonGroupedMM(torch.autograd.Function):
    """The triton kernels: forward, ``dx`` through ``wᵀ`` (a view), ``dw`` reduced over each group's rows."""

    @staticmethod
    def forward(ctx, x_MK, w_GKN, counts_G):
        sched_3G = _schedule(counts_G, x_MK.shape[0], _MM_BLOCK_M)
        ctx.save_for_backward(x_MK, w_GKN, sched_3G)
        return _triton_mm(x_MK, w_GKN, sched_3G)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy_MN):
        x_MK, w_GKN, sched_3G = ctx.saved_tensors
        dx_MK = _triton_mm(dy_MN, w_GKN.transpose(1, 2), sched_3G) if ctx.needs_input_grad[0] else None
        dw_GKN = _triton_dw(x_MK, dy_MN, sched_3G, w_GKN.dtype) if ctx.needs_input_grad[1] else None
        return dx_MK, dw_GKN, None


def _mm_configs() -> list:
    if _INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    ]


def _dw_configs() -> list:
    if _INTERPRET:
        return [triton.Config({"BLOCK_K": 16, "BLOCK_N": 16, "BLOCK_M": 16}, num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_K": 128, "BLOCK_N": 128, "BLOCK_M": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_K": 128, "BLOCK_N": 64, "BLOCK_M": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_K": 64, "BLOCK_N": 128, "BLOCK_M": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_K": 128, "BLOCK_N": 128, "BLOCK_M": 32}, num_warps=4, num_stages=4),
    ]


# Elements per program of the SwiGLU activation kernels (the interpreter runs numpy per program: go wide).
_ACT_BLOCK = 4096 if _INTERPRET else 1024

if triton is not None:

    @triton.jit
    def _swiglu_fwd_kernel(gate_up_ptr, out_ptr, numel, width, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        row, col = offsets // width, offsets % width
        gate = tl.load(gate_up_ptr + row * 2 * width + col, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gate_up_ptr + row * 2 * width + width + col, mask=mask, other=0.0).to(tl.float32)
        out = gate * tl.sigmoid(gate) * up
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(gate_up_ptr, grad_ptr, grad_gate_up_ptr, numel, width, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        row, col = offsets // width, offsets % width
        gate_at = row * 2 * width + col
        gate = tl.load(gate_up_ptr + gate_at, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gate_up_ptr + gate_at + width, mask=mask, other=0.0).to(tl.float32)
        grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        grad_gate = grad * up * sig * (1.0 + gate * (1.0 - sig))
        grad_up = grad * gate * sig
        dtype = grad_gate_up_ptr.dtype.element_ty
        tl.store(grad_gate_up_ptr + gate_at, grad_gate.to(dtype), mask=mask)
        tl.store(grad_gate_up_ptr + gate_at + width, grad_up.to(dtype), mask=mask)

    @triton.jit
    def _dot(a, b, acc, PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
        if DOT_IN_FP32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _swizzle(pid, tiles_m, tiles_n, SUPER_M: tl.constexpr):
        # Bands of SUPER_M row tiles; within a band the row tile varies fastest, then the column tile.
        per_band = SUPER_M * tiles_n
        first_m = (pid // per_band) * SUPER_M
        band_rows = tl.minimum(tiles_m - first_m, SUPER_M)
        local = pid % per_band
        return first_m + local % band_rows, local // band_rows

    @triton.jit
    def _group_tile(
        x_ptr, w_ptr, y_ptr, sched_ptr, g, pid_m, cols, N, K, G,
        stride_xm, stride_xk, stride_wg, stride_wk, stride_wn, stride_ym, stride_yn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    ):  # fmt: skip
        row_start = tl.load(sched_ptr + g)
        row_end = tl.load(sched_ptr + G + g)
        first_tile = tl.load(sched_ptr + 2 * G + g) - tl.cdiv(row_end - row_start, BLOCK_M)
        rows = row_start + (pid_m - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end  # the group's last tile stops at its end, not at the next group's rows
        col_ok = cols < N
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :] * stride_xk
        w_ptrs = w_ptr + g.to(tl.int64) * stride_wg + ks[:, None] * stride_wk + cols[None, :] * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = ks < K - k0
            x_tile = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_tile = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _dot(x_tile, w_tile, acc, PRECISION, DOT_IN_FP32)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
        y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _padding_tile(
        y_ptr, sched_ptr, pid_m, cols, M, N, G, stride_ym, stride_yn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        # Tiles past the groups' tiles cover the padding rows [sum(counts), M) from its first row; the bound
        # cdiv(M, BLOCK_M) + G leaves enough of them (a sum of G + 1 cdivs exceeds the cdiv of the sum by ≤ G).
        total = tl.load(sched_ptr + 2 * G - 1)
        group_tiles = tl.load(sched_ptr + 3 * G - 1)
        rows = total + (pid_m - group_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :] * stride_yn
        zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=y_ptr.dtype.element_ty)
        tl.store(y_ptrs, zeros, mask=(rows < M)[:, None] & (cols < N)[None, :])

    # stride_wn tells the forward (w rows contiguous) from dx (wᵀ, a view) when their N and K coincide.
    @triton.autotune(configs=_mm_configs(), key=["N", "K", "stride_wn"])
    @triton.jit
    def _grouped_mm_kernel(
        x_ptr, w_ptr, y_ptr, sched_ptr, M, N, K, G,
        stride_xm, stride_xk, stride_wg, stride_wk, stride_wn, stride_ym, stride_yn,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SUPER_M: tl.constexpr, G_POW2: tl.constexpr, PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    ):  # fmt: skip
        tiles_m = tl.cdiv(M, BLOCK_M) + G
        pid_m, pid_n = _swizzle(tl.program_id(0), tiles_m, tl.cdiv(N, BLOCK_N), SUPER_M)
        groups = tl.arange(0, G_POW2)
        tile_end = tl.load(sched_ptr + 2 * G + groups, mask=groups < G, other=tiles_m)
        g = tl.sum((tile_end <= pid_m).to(tl.int32), axis=0)  # groups whose tiles all come before pid_m
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if g < G:
            _group_tile(
                x_ptr, w_ptr, y_ptr, sched_ptr, g, pid_m, cols, N, K, G,
                stride_xm, stride_xk, stride_wg, stride_wk, stride_wn, stride_ym, stride_yn,
                BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, DOT_IN_FP32,
            )  # fmt: skip
        else:
            _padding_tile(y_ptr, sched_ptr, pid_m, cols, M, N, G, stride_ym, stride_yn, BLOCK_M, BLOCK_N)

    @triton.autotune(configs=_dw_configs(), key=["N", "K"])
    @triton.jit
    def _grouped_dw_kernel(
        x_ptr, dy_ptr, dw_ptr, sched_ptr, N, K, G,
        stride_xm, stride_xk, stride_dym, stride_dyn, stride_dwg, stride_dwk, stride_dwn,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    ):  # fmt: skip
        g = tl.program_id(1)
        tiles_n = tl.cdiv(N, BLOCK_N)
        ks = (tl.program_id(0) // tiles_n) * BLOCK_K + tl.arange(0, BLOCK_K)
        cols = (tl.program_id(0) % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        k_ok = ks < K
        col_ok = cols < N
        row_end = tl.load(sched_ptr + G + g)
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for r0 in range(tl.load(sched_ptr + g), row_end, BLOCK_M):  # no rows: acc stays 0
            rows = r0 + tl.arange(0, BLOCK_M)
            row_ok = rows < row_end
            x_ptrs = x_ptr + ks[:, None] * stride_xk + rows.to(tl.int64)[None, :] * stride_xm
            dy_ptrs = dy_ptr + rows.to(tl.int64)[:, None] * stride_dym + cols[None, :] * stride_dyn
            xt_tile = tl.load(x_ptrs, mask=k_ok[:, None] & row_ok[None, :], other=0.0)
            dy_tile = tl.load(dy_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _dot(xt_tile, dy_tile, acc, PRECISION, DOT_IN_FP32)
        dw_ptrs = dw_ptr + g.to(tl.int64) * stride_dwg + ks[:, None] * stride_dwk + cols[None, :] * stride_dwn
        tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=k_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _zero_rows_kernel(t_ptr, zero_ptr, R, C, stride_r, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        zero = tl.load(zero_ptr + rows, mask=rows < R, other=0) != 0
        if tl.max(zero.to(tl.int32), axis=0) > 0:  # most programs have no row to zero: they stop here
            row_ptrs = t_ptr + rows.to(tl.int64)[:, None] * stride_r
            zeros = tl.zeros((BLOCK_R, BLOCK_C), dtype=t_ptr.dtype.element_ty)
            for c0 in range(tl.program_id(1) * BLOCK_C, C, tl.num_programs(1) * BLOCK_C):
                cols = c0 + tl.arange(0, BLOCK_C)
                tl.store(row_ptrs + cols[None, :], zeros, mask=zero[:, None] & (cols < C)[None, :])
