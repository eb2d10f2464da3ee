"""SwiGLU feed-forward networks: the stacked routed experts and the dense (shared) one."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """Dense SwiGLU ``down(silu(gate(x)) * up(x))`` with HF names ``gate_proj``, ``up_proj``, ``down_proj``.

    ``forward(x_ND) -> y_ND`` in the activation dtype; linears without bias. Nothing communicates.
    """

    def __init__(self, dim: int, ffn_dim: int, *, init_std: float = 0.02) -> None:
        super().__init__()
        self.init_std = init_std
        self.gate_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.up_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """normal(0, init_std) for gate, up, down (in that order)."""
        for proj in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(proj.weight, mean=0.0, std=self.init_std)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_ND)) * self.up_proj(x_ND))


class SwiGLUExperts(nn.Module):
    """``E`` SwiGLU experts with stacked weights; dim 0 is the expert, so EP/FSDP can shard it.

    Parameters: ``w_gate [E, dim, ffn]``, ``w_up [E, dim, ffn]``, ``w_down [E, ffn, dim]``; expert ``e`` maps
    ``x_D -> (silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e]``.

    ``forward(x_TD, indices_TK, weights_TK) -> y_TD``: each token's output is the sum over its ``K`` experts
    of the expert output times the router weight (activation dtype). Dropless. The token copies are sorted
    by expert so that each expert runs one GEMM on a contiguous slice, then scattered back with
    ``index_add``. This is the CPU reference: it loops over experts and reads the per-expert counts on the
    host (one device sync); grouped-GEMM backends replace the loop. Nothing communicates.
    """

    def __init__(self, num_experts: int, dim: int, ffn_dim: int, *, init_std: float = 0.02) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.init_std = init_std
        self.w_gate = nn.Parameter(torch.empty(num_experts, dim, ffn_dim))
        self.w_up = nn.Parameter(torch.empty(num_experts, dim, ffn_dim))
        self.w_down = nn.Parameter(torch.empty(num_experts, ffn_dim, dim))
        self.init_weights()

    def init_weights(self) -> None:
        """normal(0, init_std) for w_gate, w_up, w_down (in that order)."""
        for weight in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(weight, mean=0.0, std=self.init_std)

    def forward(self, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        top_k = indices_TK.shape[1]
        # One row per (token, choice) pair, N = T·K; a stable sort keeps token order inside each expert.
        expert_N = indices_TK.reshape(-1)
        order_N = torch.argsort(expert_N, stable=True)
        token_N = order_N // top_k
        rows_per_expert = torch.bincount(expert_N, minlength=self.num_experts).tolist()
        x_ND = x_TD[token_N]
        y_chunks = []
        for expert, x_nD in enumerate(torch.split(x_ND, rows_per_expert)):
            hidden_nF = F.silu(x_nD @ self.w_gate[expert]) * (x_nD @ self.w_up[expert])
            y_chunks.append(hidden_nF @ self.w_down[expert])
        y_ND = torch.cat(y_chunks) * weights_TK.reshape(-1)[order_N, None]
        return torch.zeros_like(x_TD).index_add(0, token_N, y_ND)

    def extra_repr(self) -> str:
        experts, dim, ffn_dim = self.w_gate.shape
        return f"experts={experts}, dim={dim}, ffn_dim={ffn_dim}"
