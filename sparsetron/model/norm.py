"""RMSNorm with HF's numerics (Mixtral / Qwen2-MoE / Qwen3-MoE ``*RMSNorm``)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square normalisation over the last dimension, scaled by a learned ``weight [dim]``.

    ``forward(x_ND) -> y_ND`` for any leading shape. The statistic is computed in fp32 and the normalised
    value is cast back to the input dtype *before* the weight multiplies it, exactly as HF does, so the
    result dtype is ``promote(weight.dtype, x.dtype)``. Nothing communicates.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.init_weights()

    def init_weights(self) -> None:
        """Set the scale to ones (draws no random numbers)."""
        nn.init.ones_(self.weight)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        input_dtype = x_ND.dtype
        x32_ND = x_ND.to(torch.float32)
        x32_ND = x32_ND * torch.rsqrt(x32_ND.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32_ND.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"
