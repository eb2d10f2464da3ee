"""The MoE feed-forward layer: router, balancing losses, dispatch (EP all-to-all), grouped experts, shared expert."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsetron.kernels.grouped_gemm import GEMM_TILE_M
from sparsetron.parallel.expert.balance import (
    global_batch_aux_loss,
    router_z_loss,
    routing_entropy,
    sequence_aux_loss,
    switch_aux_loss,
)
from sparsetron.parallel.expert.dispatch import (
    DROP_POLICIES,
    ROUNDING_MODES,
    Assignments,
    ExpertDispatcher,
    apply_capacity,
    expert_capacity,
    round_to_tile,
)
from sparsetron.parallel.expert.experts import SwiGLU, SwiGLUExperts
from sparsetron.parallel.expert.router import build_router

#: Load-balancing loss variants (``model.aux_loss``).
AUX_LOSSES = ("sequence", "switch", "global", "none")


@dataclass
class MoEStats:
    """What one MoE forward reports besides its output (all fp32, no grad except ``aux_loss``).

    - ``aux_loss``: scalar, coefficient-weighted balance loss plus router z-loss (differentiable).
    - ``tokens_per_expert_E``: ``[E]`` kept (token, expert) assignments of this rank's tokens per expert.
    - ``dropped``: scalar, router assignments dropped by capacity or rounding down.
    - ``entropy``: scalar, mean per-token entropy of the routing probabilities.
    """

    aux_loss: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    dropped: torch.Tensor
    entropy: torch.Tensor


class MoE(nn.Module):
    """Mixture-of-experts SwiGLU FFN with HF Mixtral / Qwen2-MoE / Qwen3-MoE semantics, EP-capable.

    ``forward(x_BSD) -> (y_BSD, MoEStats)``; ``y`` in the activation dtype. Each token goes to the experts
    its router picks (``router``, see :data:`~sparsetron.parallel.expert.router.ROUTERS`; options in
    ``router_options``), their outputs summed with the router weights; with ``shared_ffn_dim > 0`` a dense
    SwiGLU is added to every token, scaled by ``sigmoid(shared_gate(x))`` when ``shared_gate`` (Qwen2-MoE)
    and unscaled otherwise (DeepSeek).

    Dropless by default. ``capacity_factor`` caps each expert at ``ceil(T·k/E·factor)`` of this rank's
    ``T`` tokens (``drop_policy``: keep the highest-scoring or the earliest); ``token_rounding`` (up, down,
    nearest) instead rounds every expert's count to a multiple of ``rounding_tile`` (SonicMoE).

    Balance loss (``aux_loss``): ``sequence`` (per-sequence switch loss, the default), ``switch`` (over the
    micro-batch), ``global`` (over all ranks of ``batch_group``) or ``none``; times ``aux_loss_coef``; plus
    ``z_loss_coef`` × router z-loss.

    Parallelism is set from outside: ``seq_group`` (context-parallel group: sequences are sharded over it),
    ``batch_group`` (all data- and context-parallel ranks, for the global loss), and :meth:`enable_expert_parallel`.
    With an EP group the routed tokens travel by all-to-all over it (dispatch overlapped with the shared
    expert); otherwise nothing but the balance statistics communicates.
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
        aux_loss: str = "sequence",
        aux_loss_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        capacity_factor: float | None = None,
        drop_policy: str = "score",
        token_rounding: str = "off",
        rounding_tile: int = GEMM_TILE_M,
        expert_backend: str = "auto",
        router_options: dict | None = None,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        _check_options(aux_loss, capacity_factor, drop_policy, token_rounding)
        self.num_experts = num_experts
        self.top_k = top_k
        self.seq_group = None
        self.batch_group = None
        self.aux_loss = aux_loss
        self.aux_loss_coef = aux_loss_coef
        self.z_loss_coef = z_loss_coef
        self.capacity_factor = capacity_factor
        self.drop_policy = drop_policy
        self.token_rounding = token_rounding
        self.rounding_tile = rounding_tile
        self.init_std = init_std
        options = dict(router_options or {})
        if router in ("softmax_topk", "sigmoid_bias", "cosine", "quantile", "sinkhorn"):
            options.setdefault("normalize_topk", normalize_topk)
        self.router = build_router(router, dim, num_experts, top_k, init_std=init_std, **options)
        self.token_major = router != "expert_choice"
        self.experts = SwiGLUExperts(num_experts, dim, ffn_dim, init_std=init_std, backend=expert_backend)
        self.shared_expert = SwiGLU(dim, shared_ffn_dim, init_std=init_std) if shared_ffn_dim > 0 else None
        self.shared_gate = nn.Linear(dim, 1, bias=False) if shared_ffn_dim > 0 and shared_gate else None
        self.dispatcher = ExpertDispatcher(num_experts)
        self.init_weights()

    def init_weights(self) -> None:
        """normal(0, init_std) for every weight; visits router, experts, shared expert, shared gate."""
        self.router.init_weights()
        self.experts.init_weights()
        if self.shared_expert is not None:
            self.shared_expert.init_weights()
        if self.shared_gate is not None:
            nn.init.normal_(self.shared_gate.weight, mean=0.0, std=self.init_std)

    def enable_expert_parallel(self, ep_mesh, *, grad_scale: float = 1.0, overlap_chunks: int = 1) -> None:
        """Shard the routed experts over the 1-D ``ep_mesh`` and route tokens over its group.

        Every rank must hold the same full weights when called. ``grad_scale`` multiplies the expert weight
        gradients (the trainer passes ``1/ep``, see :attr:`SwiGLUExperts.grad_scale`). ``overlap_chunks``
        splits the tokens so one chunk's all-to-alls overlap another's experts (dropless top-k routing).
        """
        self.dispatcher = ExpertDispatcher(self.num_experts, ep_mesh.get_group(), chunks=overlap_chunks)
        self.experts.shard(ep_mesh)
        self.experts.grad_scale = grad_scale

    def _assign(self, route, num_tokens: int) -> tuple[Assignments, int | None]:
        if self.capacity_factor is not None:
            capacity = expert_capacity(num_tokens, self.top_k, self.num_experts, self.capacity_factor)
            a = apply_capacity(
                route.token_N, route.expert_N, route.weight_N, route.scores_TE, capacity, self.drop_policy
            )
            return a, capacity
        if self.token_rounding != "off":
            a = round_to_tile(
                route.token_N,
                route.expert_N,
                route.weight_N,
                route.scores_TE,
                route.probs_TE,
                self.rounding_tile,
                self.token_rounding,
            )
            return a, None
        keep_N = torch.ones_like(route.token_N, dtype=torch.bool)
        # Top-k routers give exactly K token-major assignments per token; expert choice does not.
        per_token = (
            self.top_k if route.token_N.numel() == num_tokens * self.top_k and self.token_major else None
        )
        a = Assignments(
            route.token_N, route.expert_N, route.weight_N, keep_N, None, route.token_N.numel(), per_token
        )
        return a, None

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        batch, seq_len, dim = x_BSD.shape
        x_TD = x_BSD.reshape(batch * seq_len, dim)
        route = self.router(x_TD)
        assignments, capacity = self._assign(route, x_TD.shape[0])
        parts = self.dispatcher.dispatch(x_TD, assignments, capacity)
        # The shared expert runs while the first dispatch all-to-all is in flight.
        shared_TD = None
        if self.shared_expert is not None:
            shared_TD = self.shared_expert(x_TD)
            if self.shared_gate is not None:
                shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
        # Chunk c's experts run while chunk c+1's rows arrive and chunk c−1's outputs leave.
        for part in parts:
            part = self.dispatcher.wait(part)
            rows = part.rows if capacity is None else self.dispatcher.padded_rows(part)
            self.dispatcher.combine_start(self.experts(rows, part.counts_G), part)
        outputs = [self.dispatcher.combine_finish(part) for part in parts]
        y_TD = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        if shared_TD is not None:
            y_TD = y_TD + shared_TD
        stats = self._stats(route, assignments, batch, seq_len, x_BSD.device)
        return y_TD.view(batch, seq_len, dim), stats

    def _stats(self, route, a: Assignments, batch: int, seq_len: int, device) -> MoEStats:
        num_experts = self.num_experts
        with torch.no_grad():
            kept_N = a.keep_N.to(torch.float32)
            counts_E = torch.zeros(num_experts, dtype=torch.float32, device=device)
            counts_E.scatter_add_(0, a.expert_N, kept_N)
            entropy = routing_entropy(route.probs_TE)
            dropped = a.dropped()
        aux = counts_E.new_zeros(())
        if self.aux_loss_coef and self.aux_loss != "none":
            aux = self.aux_loss_coef * self._balance_loss(route, a, counts_E, batch, seq_len)
        if self.z_loss_coef:
            logits_BSE = route.logits_TE.view(batch, seq_len, num_experts)
            aux = aux + self.z_loss_coef * router_z_loss(logits_BSE, self.seq_group)
        return MoEStats(aux, counts_E, dropped, entropy)

    def _balance_loss(self, route, a: Assignments, counts_E, batch: int, seq_len: int) -> torch.Tensor:
        # Balance losses count what the router chose (before capacity), as Switch/GShard do.
        with torch.no_grad():
            routed = a.routed
            ones_N = torch.ones(routed, dtype=torch.float32, device=counts_E.device)
            if self.aux_loss == "sequence":
                seq_N = a.token_N[:routed] // seq_len
                counts_BE = torch.zeros(batch, self.num_experts, dtype=torch.float32, device=counts_E.device)
                counts_BE.index_put_((seq_N, a.expert_N[:routed]), ones_N, accumulate=True)
            else:
                routed_E = torch.zeros_like(counts_E).index_add_(0, a.expert_N[:routed], ones_N)
        if self.aux_loss == "sequence":
            probs_BSE = route.probs_TE.view(batch, seq_len, self.num_experts)
            return sequence_aux_loss(probs_BSE, counts_BE, self.top_k, self.seq_group)
        if self.aux_loss == "switch":
            return switch_aux_loss(route.probs_TE, routed_E, self.top_k)
        # The global loss is a share per rank summed over batch_group; the trainer sums ranks' losses as
        # means over their sequences, so scale the share by the data-parallel width of the group.
        share = global_batch_aux_loss(route.probs_TE, routed_E, self.top_k, self.batch_group)
        return share * _data_parallel_width(self.batch_group, self.seq_group)

    def extra_repr(self) -> str:
        drops = (
            f"capacity_factor={self.capacity_factor}, drop_policy={self.drop_policy}"
            if self.capacity_factor is not None
            else f"dropless, token_rounding={self.token_rounding}"
        )
        return f"aux_loss={self.aux_loss}, aux_loss_coef={self.aux_loss_coef}, z_loss_coef={self.z_loss_coef}, {drops}"


def _data_parallel_width(batch_group, seq_group) -> int:
    import torch.distributed as dist

    width = dist.get_world_size(batch_group) if batch_group is not None else 1
    return width // (dist.get_world_size(seq_group) if seq_group is not None else 1)


def _check_options(aux_loss: str, capacity_factor, drop_policy: str, token_rounding: str) -> None:
    problems = []
    if aux_loss not in AUX_LOSSES:
        problems.append(f"aux_loss={aux_loss!r} must be one of {', '.join(AUX_LOSSES)}")
    if drop_policy not in DROP_POLICIES:
        problems.append(f"drop_policy={drop_policy!r} must be one of {', '.join(DROP_POLICIES)}")
    if token_rounding not in ROUNDING_MODES:
        problems.append(f"token_rounding={token_rounding!r} must be one of {', '.join(ROUNDING_MODES)}")
    if capacity_factor is not None and capacity_factor <= 0:
        problems.append(f"capacity_factor={capacity_factor} must be > 0, or null for dropless routing")
    if capacity_factor is not None and token_rounding != "off":
        problems.append(
            "capacity_factor and token_rounding both set: rounding replaces the capacity cap; set one of them "
            "(token_rounding=off or capacity_factor=null)"
        )
    if problems:
        raise ValueError("invalid MoE options: " + "; ".join(problems) + ".")
