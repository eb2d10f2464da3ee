"""Rotary position embedding (HF rotate-half convention), computed from explicit position ids.

Positions are *global* token positions: under context parallelism a rank holds non-contiguous pieces of a
sequence, so cos/sin are computed from the ids it is given, never from ``arange(S_local)``. Nothing is
cached in buffers, so a model built on the meta device needs no re-initialisation of RoPE state.
"""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x_BSHD: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dimension (HF ``rotate_half``); same shape and dtype."""
    half = x_BSHD.shape[-1] // 2
    return torch.cat((-x_BSHD[..., half:], x_BSHD[..., :half]), dim=-1)


def apply_rotary(x_BSHD: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor) -> torch.Tensor:
    """Rotate ``x_BSHD`` by the angles whose cos/sin are ``cos_BSD``/``sin_BSD`` (shared by all heads).

    Computed in the dtype of the operands, as HF does (cos/sin come cast to the activation dtype).
    """
    cos_BS1D = cos_BSD.unsqueeze(2)
    sin_BS1D = sin_BSD.unsqueeze(2)
    return x_BSHD * cos_BS1D + rotate_half(x_BSHD) * sin_BS1D


class RotaryEmbedding(nn.Module):
    """cos/sin tables of RoPE for given positions: ``forward(positions_BS, dtype) -> (cos_BSD, sin_BSD)``.

    ``inv_freq = 1 / theta^(arange(0, D, 2) / D)``; angles ``positions * inv_freq`` in fp32 (exact for
    positions below 2^24), duplicated to ``D`` (rotate-half layout), then cos/sin cast to ``dtype``.
    Has no parameters and no buffers. Nothing communicates.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}; choose an even head_dim.")
        self.head_dim = head_dim
        self.theta = float(theta)

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """``[D/2]`` fp32 inverse frequencies, computed by the same expression as HF's default RoPE."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (self.theta**exponents)

    def forward(self, positions_BS: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        angles_BSd = positions_BS[..., None].float() * self.inv_freq(positions_BS.device)
        angles_BSD = torch.cat((angles_BSd, angles_BSd), dim=-1)
        return angles_BSD.cos().to(dtype), angles_BSD.sin().to(dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"
