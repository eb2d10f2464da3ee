"""SwiGLU feed-forward networks: the stacked routed experts and the dense (shared) one."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsetron.kernels.grouped_gemm import grouped_swiglu, swiglu_activation


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


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` (see :attr:`SwiGLUExperts.grad_scale`)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class SwiGLUExperts(nn.Module):
    """``E`` SwiGLU experts with stacked weights; dim 0 is the expert, so EP/FSDP can shard it.

    Parameters: ``w_gate_up [E, dim, 2·ffn]`` (gate columns, then up columns: one GEMM computes both) and
    ``w_down [E, ffn, dim]``; expert ``e`` maps ``x_D -> (silu(x @ gate[e]) * (x @ up[e])) @ w_down[e]`` with
    ``gate, up = w_gate_up.chunk(2, dim=-1)`` (HF's fused ``gate_up_proj [E, 2·ffn, dim]`` transposed). With expert parallelism the parameters are
    DTensors sharded on dim 0 over the EP mesh (:meth:`shard`); the forward computes with the local
    ``E_local`` experts only.

    ``forward`` takes rows already grouped by (local) expert, in one of two forms (one entry point, so
    FSDP's hooks gather the weights either way); nothing communicates:

    - ``forward(rows_MD, counts_G) -> y_MD``: the first ``counts_G[0]`` rows go to expert 0, and so on;
      rows past ``sum(counts_G)`` give zeros. Runs a grouped GEMM (``backend``: auto, torch, triton, loop;
      see :mod:`sparsetron.kernels.grouped_gemm`).
    - ``forward(x_GCD) -> y_GCD``: ``C`` rows per expert (capacity dispatch), a batched GEMM.
    """

    def __init__(
        self, num_experts: int, dim: int, ffn_dim: int, *, init_std: float = 0.02, backend: str = "auto"
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.init_std = init_std
        self.backend = backend
        # Set by expert parallelism: FSDP averages expert gradients over the expert-data-parallel ranks only,
        # but each already sums the tokens of all EP ranks; 1/ep makes them world means like dense gradients.
        self.grad_scale = 1.0
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, dim, 2 * ffn_dim))
        self.w_down = nn.Parameter(torch.empty(num_experts, ffn_dim, dim))
        self.init_weights()

    def init_weights(self) -> None:
        """normal(0, init_std) for w_gate_up, w_down (in that order)."""
        for weight in (self.w_gate_up, self.w_down):
            nn.init.normal_(weight, mean=0.0, std=self.init_std)

    def shard(self, ep_mesh) -> None:
        """Make the stacked weights DTensors sharded on the expert axis over the 1-D ``ep_mesh``.

        Every rank must hold the same full weights (as after a seeded CPU init); each keeps its slice.
        Checkpoints then store the global ``[E, ...]`` tensors whatever the EP degree.
        """
        from torch.distributed.tensor import Shard, distribute_tensor

        for name in ("w_gate_up", "w_down"):
            full = getattr(self, name)
            setattr(self, name, nn.Parameter(distribute_tensor(full.data, ep_mesh, [Shard(0)])))

    def local_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``[E_local, ...]`` weights this rank computes with (gradient scaled by ``grad_scale``)."""
        weights = []
        for weight in (self.w_gate_up, self.w_down):
            local = weight.to_local() if hasattr(weight, "to_local") else weight
            weights.append(_ScaleGrad.apply(local, self.grad_scale) if self.grad_scale != 1.0 else local)
        return tuple(weights)

    def forward(self, rows: torch.Tensor, counts_G: torch.Tensor | None = None) -> torch.Tensor:
        w_gate_up, w_down = (w.to(rows.dtype) for w in self.local_weights())
        if counts_G is not None:
            return grouped_swiglu(rows, w_gate_up, w_down, counts_G, backend=self.backend)
        experts, slots, _ = rows.shape
        gate_up_GC2F = torch.bmm(rows, w_gate_up)
        hidden_GCF = swiglu_activation(gate_up_GC2F.flatten(0, 1)).view(experts, slots, -1)
        return torch.bmm(hidden_GCF, w_down)

    def extra_repr(self) -> str:
        experts, ffn_dim, dim = self.w_down.shape
        return f"experts={experts}, dim={dim}, ffn_dim={ffn_dim}, backend={self.backend}"
