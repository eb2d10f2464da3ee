"""The MoE feed-forward layer (single process): router, routed SwiGLU experts, optional shared expert."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from sparsetron.parallel.expert.experts import SwiGLU, SwiGLUExperts
from sparsetron.parallel.expert.router import build_router


@dataclass
class MoEStats:
    """What one MoE forward reports besides its output.

    - ``aux_loss``: fp32 scalar, the coefficient-weighted sequence-level switch load-balancing loss
      (differentiable through the router probabilities).
    - ``tokens_per_expert_E``: fp32 ``[E]`` counts of routed (token, choice) pairs; sums to ``T·K``; no grad.
    """

    aux_loss: torch.Tensor
    tokens_per_expert_E: torch.Tensor


def sequence_aux_loss(
    probs_BSE: torch.Tensor, counts_BE: torch.Tensor, top_k: int, seq_group: object | None = None
) -> torch.Tensor:
    """Switch load-balancing loss per sequence, averaged over sequences (fp32 scalar, no coefficient).

    For sequence b: ``f_be = counts_be / (S·k)``, ``P_be = mean_s probs_bse``, ``aux_b = E · Σ_e f_be·P_be``.
    Averaging per-sequence values makes the loss independent of how sequences are grouped into
    micro-batches or data-parallel ranks.

    With context parallelism each rank holds a shard of every sequence; ``seq_group`` is that group. The
    counts (no gradient) are all-reduced over it, and each rank keeps only its own tokens' share of
    ``P_be``, so the ranks' values sum to the unsharded loss, gradient included.
    """
    _, local_len, num_experts = probs_BSE.shape
    seq_len = local_len
    if seq_group is not None:
        counts_BE = counts_BE.clone()
        dist.all_reduce(counts_BE, group=seq_group)
        seq_len = local_len * dist.get_world_size(seq_group)
    fraction_BE = counts_BE / (seq_len * top_k)
    mean_prob_BE = probs_BSE.sum(dim=1) / seq_len
    return (num_experts * (fraction_BE * mean_prob_BE).sum(dim=-1)).mean()


class MoE(nn.Module):
    """Mixture-of-experts SwiGLU FFN with HF Mixtral / Qwen2-MoE / Qwen3-MoE semantics.

    ``forward(x_BSD) -> (y_BSD, MoEStats)``; ``y`` in the activation dtype. Each token goes to ``top_k``
    of ``num_experts`` routed experts (router chosen by name, see ``router.ROUTERS``), their outputs are
    summed with the router weights; with ``shared_ffn_dim > 0`` a dense SwiGLU is added to every token,
    scaled by ``sigmoid(shared_gate(x))`` when ``shared_gate`` (Qwen2-MoE) and unscaled otherwise
    (DeepSeek). The aux loss is ``aux_loss_coef ×`` :func:`sequence_aux_loss`.

    Submodules: ``router`` (``weight [E, dim]``), ``experts`` (stacked ``w_gate``, ``w_up``, ``w_down``),
    and when enabled ``shared_expert`` (``gate_proj``, ``up_proj``, ``down_proj``) and ``shared_gate``
    (``Linear(dim, 1)``, no bias). Single process: ``ep_group`` must be None, nothing communicates.
    """

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_experts: int,
        top_k: int,
        router: str = "softmax_topk",
        normalize_topk: bool = True,
        shared_ffn_dim: int = 0,
        shared_gate: bool = True,
        aux_loss_coef: float = 0.01,
        ep_group: object | None = None,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if ep_group is not None:
            raise ValueError(
                "MoE(ep_group=...): expert parallelism is not available yet (it arrives with the all-to-all dispatcher); "
                "pass ep_group=None (and parallel.ep=1) for the single-process MoE layer."
            )
        self.num_experts = num_experts
        self.top_k = top_k
        # The context-parallel group when sequences are sharded (set by Transformer.set_sequence_group).
        self.seq_group = None
        self.aux_loss_coef = aux_loss_coef
        self.init_std = init_std
        self.router = build_router(
            router, dim, num_experts, top_k, normalize_topk=normalize_topk, init_std=init_std
        )
        self.experts = SwiGLUExperts(num_experts, dim, ffn_dim, init_std=init_std)
        self.shared_expert = SwiGLU(dim, shared_ffn_dim, init_std=init_std) if shared_ffn_dim > 0 else None
        self.shared_gate = nn.Linear(dim, 1, bias=False) if shared_ffn_dim > 0 and shared_gate else None
        self.init_weights()

    def init_weights(self) -> None:
        """normal(0, init_std) for every weight; visits router, experts, shared expert, shared gate."""
        self.router.init_weights()
        self.experts.init_weights()
        if self.shared_expert is not None:
            self.shared_expert.init_weights()
        if self.shared_gate is not None:
            nn.init.normal_(self.shared_gate.weight, mean=0.0, std=self.init_std)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        batch, seq_len, dim = x_BSD.shape
        x_TD = x_BSD.reshape(batch * seq_len, dim)
        route = self.router(x_TD)
        y_TD = self.experts(x_TD, route.indices_TK, route.weights_TK)
        if self.shared_expert is not None:
            shared_TD = self.shared_expert(x_TD)
            if self.shared_gate is not None:
                shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD
        with torch.no_grad():
            # scatter_add instead of bincount: no device sync to size the output.
            indices_BN = route.indices_TK.reshape(batch, seq_len * self.top_k)
            counts_BE = torch.zeros(batch, self.num_experts, dtype=torch.float32, device=x_BSD.device)
            counts_BE.scatter_add_(1, indices_BN, torch.ones_like(indices_BN, dtype=torch.float32))
        if self.aux_loss_coef:
            probs_BSE = route.probs_TE.view(batch, seq_len, self.num_experts)
            aux_loss = self.aux_loss_coef * sequence_aux_loss(
                probs_BSE, counts_BE, self.top_k, self.seq_group
            )
        else:
            aux_loss = counts_BE.new_zeros(())
        return y_TD.view(batch, seq_len, dim), MoEStats(aux_loss, counts_BE.sum(dim=0))

    def extra_repr(self) -> str:
        return f"aux_loss_coef={self.aux_loss_coef}"
