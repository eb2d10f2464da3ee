"""Routers: which experts each token goes to, and with what weight.

A router maps ``x_TD`` to a :class:`RouterOutput`. Routers are looked up by name in :data:`ROUTERS` through
:func:`build_router`, so later balancing schemes (sigmoid with bias, Sinkhorn, ...) are added as new
entries without touching the MoE layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RouterOutput:
    """What a router decided for ``T`` tokens, ``E`` experts, ``K`` experts per token.

    - ``indices_TK``: int64 expert ids, per token in descending order of probability.
    - ``weights_TK``: combine weights, in the activation dtype (differentiable).
    - ``probs_TE``: fp32 routing probabilities over all experts (differentiable; used by the aux loss).
    - ``logits_TE``: fp32 router logits.
    """

    indices_TK: torch.Tensor
    weights_TK: torch.Tensor
    probs_TE: torch.Tensor
    logits_TE: torch.Tensor


class Router(nn.Module, ABC):
    """Base of all routers: holds the gate ``weight [E, dim]`` (no bias; HF name ``gate.weight``).

    Subclasses implement ``forward(x_TD) -> RouterOutput``. Nothing communicates.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, *, init_std: float = 0.02) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(
                f"top_k={top_k} must be between 1 and num_experts={num_experts}; lower top_k or add experts."
            )
        self.num_experts = num_experts
        self.top_k = top_k
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.init_weights()

    def init_weights(self) -> None:
        """normal(0, init_std) gate weight."""
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)

    @abstractmethod
    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        """Route ``x_TD [T, dim]`` (activation dtype)."""


class SoftmaxTopKRouter(Router):
    """Softmax over all experts, keep the top k, optionally renormalise them (HF Mixtral / Qwen-MoE).

    As HF: logits ``x_TD @ weight.T`` in the activation dtype, softmax in fp32, ``torch.topk``, the k
    weights divided by their sum when ``normalize_topk`` (Mixtral always; Qwen ``norm_topk_prob``), then
    cast to the activation dtype.
    """

    def __init__(
        self, dim: int, num_experts: int, top_k: int, *, normalize_topk: bool = True, init_std: float = 0.02
    ) -> None:
        super().__init__(dim, num_experts, top_k, init_std=init_std)
        self.normalize_topk = normalize_topk

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        logits_TE = F.linear(x_TD, self.weight).float()
        probs_TE = torch.softmax(logits_TE, dim=-1)
        top_probs_TK, indices_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.normalize_topk:
            top_probs_TK = top_probs_TK / top_probs_TK.sum(dim=-1, keepdim=True)
        return RouterOutput(indices_TK, top_probs_TK.to(x_TD.dtype), probs_TE, logits_TE)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, normalize_topk={self.normalize_topk}"


#: Router classes by config name (``model.router``).
ROUTERS: dict[str, type[Router]] = {"softmax_topk": SoftmaxTopKRouter}


def build_router(
    name: str, dim: int, num_experts: int, top_k: int, *, normalize_topk: bool = True, init_std: float = 0.02
) -> Router:
    """The router registered as ``name`` in :data:`ROUTERS`; an unknown name lists the known ones."""
    if name not in ROUTERS:
        raise ValueError(f"unknown router '{name}'; known routers: {', '.join(sorted(ROUTERS))}.")
    return ROUTERS[name](dim, num_experts, top_k, normalize_topk=normalize_topk, init_std=init_std)
