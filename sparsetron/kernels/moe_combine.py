"""Weighted combine of expert outputs back into tokens, reading the rows where the experts left them.

After the experts, the ``N = T·K`` output rows sit in expert order; token ``t``'s ``k``-th copy is row
``position_TK[t, k]``. :func:`weighted_combine` computes ``y_TD[t] = Σ_k weight_TK[t, k] · rows_ND[position_TK[t, k]]``
in one pass (fp32 accumulation), where separate torch ops would un-permute the rows into a copy, broadcast-
multiply and reduce. The backward writes each row's gradient straight to its position (positions are a
permutation: no atomics) and reduces the weight gradient per (token, copy).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pyproject installs triton on Linux x86_64 only
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_BLOCK_D = 128 if _INTERPRET else 1024


def weighted_combine(
    rows_ND: torch.Tensor, position_TK: torch.Tensor, weight_TK: torch.Tensor
) -> torch.Tensor:
    """``y_TD[t] = Σ_k weight_TK[t, k] · rows_ND[position_TK[t, k]]``, differentiable in rows and weights.

    ``rows_ND [N, D]`` (activation dtype), ``position_TK [T, K]`` int64 (every row used at most once),
    ``weight_TK [T, K]`` (any float dtype; the gradient comes back in it). Returns ``[T, D]`` in the rows'
    dtype. Fused Triton kernels on CUDA; torch ops elsewhere (the kernels are tested on the CPU under
    ``TRITON_INTERPRET=1`` through :func:`fused_weighted_combine`). Nothing communicates.
    """
    empty = rows_ND.shape[1] == 0 or position_TK.numel() == 0
    if triton is not None and rows_ND.is_cuda and not empty and rows_ND.dtype != torch.float64:
        return fused_weighted_combine(rows_ND, position_TK, weight_TK)
    return _combine_reference(rows_ND, position_TK, weight_TK)


def fused_weighted_combine(
    rows_ND: torch.Tensor, position_TK: torch.Tensor, weight_TK: torch.Tensor
) -> torch.Tensor:
    """:func:`weighted_combine` through the Triton kernels whatever the device (CUDA, or the interpreter)."""
    return _WeightedCombine.apply(rows_ND, position_TK, weight_TK)


def _combine_reference(rows_ND, position_TK, weight_TK):
    tokens, copies = position_TK.shape
    gathered_TKD = rows_ND.index_select(0, position_TK.reshape(-1)).view(tokens, copies, -1)
    return torch.bmm(weight_TK.to(rows_ND.dtype).view(tokens, 1, copies), gathered_TKD).squeeze(1)


class _WeightedCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows_ND, position_TK, weight_TK):
        rows_ND, position_TK = rows_ND.contiguous(), position_TK.contiguous()
        weight32_TK = weight_TK.float().contiguous()
        tokens, copies = position_TK.shape
        dim = rows_ND.shape[1]
        out_TD = rows_ND.new_empty(tokens, dim)
        grid = (tokens, triton.cdiv(dim, _BLOCK_D))
        _combine_fwd_kernel[grid](rows_ND, position_TK, weight32_TK, out_TD, dim, K=copies, BLOCK_D=_BLOCK_D)
        ctx.save_for_backward(rows_ND, position_TK, weight32_TK)
        ctx.weight_dtype = weight_TK.dtype
        return out_TD

    @staticmethod
    def backward(ctx, grad_TD):
        rows_ND, position_TK, weight32_TK = ctx.saved_tensors
        grad_TD = grad_TD.contiguous()
        tokens, copies = position_TK.shape
        # Rows no token references (none on the dropless path) keep a zero gradient.
        grad_rows_ND = torch.zeros_like(rows_ND)
        grad_weight_TK = torch.empty_like(weight32_TK)
        _combine_bwd_kernel[(tokens,)](
            rows_ND,
            position_TK,
            weight32_TK,
            grad_TD,
            grad_rows_ND,
            grad_weight_TK,
            rows_ND.shape[1],
            K=copies,
            BLOCK_D=_BLOCK_D,
        )
        return grad_rows_ND, None, grad_weight_TK.to(ctx.weight_dtype)


if triton is not None:

    @triton.jit
    def _combine_fwd_kernel(
        rows_ptr, position_ptr, weight_ptr, out_ptr, dim, K: tl.constexpr, BLOCK_D: tl.constexpr
    ):
        token = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = cols < dim
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k in tl.static_range(K):
            row = tl.load(position_ptr + token * K + k).to(tl.int64)
            weight = tl.load(weight_ptr + token * K + k)
            acc += weight * tl.load(rows_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + token * dim + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _combine_bwd_kernel(
        rows_ptr,
        position_ptr,
        weight_ptr,
        grad_ptr,
        grad_rows_ptr,
        grad_weight_ptr,
        dim,
        K: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        token = tl.program_id(0).to(tl.int64)
        for k in tl.static_range(K):
            row = tl.load(position_ptr + token * K + k).to(tl.int64)
            weight = tl.load(weight_ptr + token * K + k)
            dot = tl.zeros([BLOCK_D], dtype=tl.float32)
            for start in range(0, dim, BLOCK_D):
                cols = start + tl.arange(0, BLOCK_D)
                mask = cols < dim
                grad = tl.load(grad_ptr + token * dim + cols, mask=mask, other=0.0).to(tl.float32)
                value = tl.load(rows_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
                dot += grad * value
                tl.store(
                    grad_rows_ptr + row * dim + cols,
                    (weight * grad).to(grad_rows_ptr.dtype.element_ty),
                    mask=mask,
                )
            tl.store(grad_weight_ptr + token * K + k, tl.sum(dot, axis=0))
