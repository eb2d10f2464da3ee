"""The reference MoE decoder: embedding, pre-norm decoder blocks (GQA attention + MoE FFN), norm, LM head.

Semantics follow HF Mixtral / Qwen2-MoE / Qwen3-MoE so that checkpoints convert exactly. The model is
single-process; parallelism is applied from outside (FSDP2 per block, an attention core for context
parallelism, an ``ep_group`` for the MoE layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsetron.config import ModelConfig
from sparsetron.model.attention import Attention
from sparsetron.model.norm import RMSNorm
from sparsetron.parallel.expert import MoE


@dataclass
class ModelOutput:
    """Result of :meth:`Transformer.forward`.

    - ``logits_BSV``: next-token logits in the activation dtype.
    - ``aux_loss``: fp32 scalar, the MoE load-balancing losses summed over layers (coefficient applied).
    - ``tokens_per_expert_LE``: fp32 ``[n_layers, E]`` kept (token, expert) assignments per layer; no grad.
    - ``dropped_L``: fp32 ``[n_layers]`` router assignments dropped (capacity, rounding down); no grad.
    - ``entropy_L``: fp32 ``[n_layers]`` mean per-token routing entropy; no grad.
    """

    logits_BSV: torch.Tensor
    aux_loss: torch.Tensor
    tokens_per_expert_LE: torch.Tensor
    dropped_L: torch.Tensor
    entropy_L: torch.Tensor


#: Model-config fields that become router options, per router (``model.router_*`` -> option name).
ROUTER_OPTION_FIELDS = {
    "softmax_topk": {"normalize_topk": "normalize_topk"},
    "sigmoid_bias": {
        "normalize_topk": "normalize_topk",
        "bias_update_speed": "router_bias_update_speed",
        "routed_scaling": "router_scaling",
    },
    "cosine": {"normalize_topk": "normalize_topk", "cosine_dim": "router_cosine_dim"},
    "sinkhorn": {"sinkhorn_iters": "router_sinkhorn_iters", "ssr_prob": "router_ssr_prob"},
    "expert_choice": {"capacity_factor": "router_capacity_factor"},
    "quantile": {"normalize_topk": "normalize_topk"},
}


def build_moe(cfg: ModelConfig) -> MoE:
    """The MoE layer a decoder block of ``cfg`` uses (router options taken from the ``router_*`` fields)."""
    router = cfg.router.value if hasattr(cfg.router, "value") else str(cfg.router)
    options = {name: getattr(cfg, field) for name, field in ROUTER_OPTION_FIELDS[router].items()}
    options |= {"n_groups": cfg.router_groups, "topk_groups": cfg.router_topk_groups}
    return MoE(
        cfg.dim,
        cfg.expert_ffn_dim,
        cfg.num_experts,
        cfg.top_k,
        router=router,
        shared_ffn_dim=cfg.shared_expert_ffn_dim,
        shared_gate=cfg.shared_expert_gate,
        aux_loss=_value(cfg.aux_loss),
        aux_loss_coef=cfg.aux_loss_coef,
        z_loss_coef=cfg.z_loss_coef,
        capacity_factor=cfg.capacity_factor,
        drop_policy=_value(cfg.drop_policy),
        token_rounding=_value(cfg.token_rounding),
        rounding_tile=cfg.rounding_tile,
        expert_backend=_value(cfg.expert_backend),
        router_options=options,
        init_std=cfg.init_std,
    )


def _value(choice) -> str:
    return choice.value if hasattr(choice, "value") else str(choice)


def check_model_config(cfg: ModelConfig) -> None:
    """Raise ``ValueError`` naming each shape rule ``cfg`` breaks, the bad values and the fix."""
    head_dim = cfg.resolved_head_dim()
    problems = []
    if cfg.n_heads % cfg.n_kv_heads:
        problems.append(
            f"n_heads={cfg.n_heads} must be a multiple of n_kv_heads={cfg.n_kv_heads} (choose a divisor)"
        )
    if head_dim <= 0 or head_dim % 2:
        problems.append(f"head_dim={head_dim} must be positive and even for RoPE (set model.head_dim)")
    if not 1 <= cfg.top_k <= cfg.num_experts:
        problems.append(f"top_k={cfg.top_k} must be between 1 and num_experts={cfg.num_experts}")
    if problems:
        raise ValueError("invalid model config: " + "; ".join(problems) + ".")


class DecoderLayer(nn.Module):
    """One pre-norm block: ``h = h + attn(attn_norm(h)); h = h + moe(ffn_norm(h))``.

    ``forward(h_BSD, positions_BS, doc_ids_BS=None) -> (h_BSD, aux_loss, moe_stats_S)``: plain
    tensors in and out, so FSDP2 and activation checkpointing can wrap the block as it is. Nothing
    communicates unless the attention core or MoE layer was built to.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(
            cfg.dim,
            cfg.n_heads,
            cfg.n_kv_heads,
            cfg.resolved_head_dim(),
            rope_theta=cfg.rope_theta,
            bias=cfg.attention_bias,
            qk_norm=cfg.qk_norm,
            norm_eps=cfg.norm_eps,
            init_std=cfg.init_std,
        )
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.moe = build_moe(cfg)

    def init_weights(self) -> None:
        """Initialise attn_norm, attn, ffn_norm, moe, in that order."""
        self.attn_norm.init_weights()
        self.attn.init_weights()
        self.ffn_norm.init_weights()
        self.moe.init_weights()

    def forward(
        self, h_BSD: torch.Tensor, positions_BS: torch.Tensor, doc_ids_BS: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h_BSD = h_BSD + self.attn(self.attn_norm(h_BSD), positions_BS, doc_ids_BS)
        ffn_BSD, stats = self.moe(self.ffn_norm(h_BSD))
        # Statistics travel as one no-grad tensor [E + 2]: tokens per expert, dropped, entropy.
        moe_stats = torch.cat([stats.tokens_per_expert_E, stats.dropped[None], stats.entropy[None]])
        return h_BSD + ffn_BSD, stats.aux_loss, moe_stats


class Transformer(nn.Module):
    """MoE decoder LM built from a :class:`~sparsetron.config.ModelConfig`.

    ``forward(tokens_BS, positions_BS=None, doc_ids_BS=None) -> ModelOutput``. ``positions_BS`` (int) are
    global positions, ``arange(S)`` per row by default; ``doc_ids_BS`` (int) restrict attention to earlier
    tokens of the same document. Attributes: ``embed`` (``nn.Embedding``), ``layers`` (``nn.ModuleList`` of
    :class:`DecoderLayer`), ``norm`` (final RMSNorm) and ``lm_head`` (``nn.Linear(dim, V)`` without bias,
    or None when ``tie_embeddings``: the head then reads ``embed.weight`` at call time, so the tie survives
    ``to_empty`` and state-dict loading).

    Construction draws random numbers only in :meth:`init_weights`: the modules are built on the meta
    device and then materialised on the ambient default device, so ``Transformer(cfg)`` after
    ``torch.manual_seed(s)`` equals a model built under ``torch.device("meta")``, moved with
    ``to_empty(device=...)`` and initialised with ``init_weights()`` after the same seed. Under a meta
    device context nothing is allocated. Nothing communicates.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        check_model_config(cfg)
        self.cfg = cfg
        device = torch.get_default_device()  # honours `with torch.device(...)` and set_default_device
        with torch.device("meta"):
            self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
            self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if device.type != "meta":
            self.to_empty(device=device)
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Deterministic given the RNG state: normal(0, init_std) for every weight matrix (embedding, attention,
        router, stacked experts, shared expert and gate, head), ones for norm weights, zeros for biases;
        visits embed, each layer in order, norm, lm_head.
        """
        nn.init.normal_(self.embed.weight, mean=0.0, std=self.cfg.init_std)
        for layer in self.layers:
            layer.init_weights()
        self.norm.init_weights()
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=self.cfg.init_std)

    def set_attention_core(self, core: nn.Module) -> None:
        """Install ``core`` (see :mod:`sparsetron.model.attention` for its interface) in every layer."""
        for layer in self.layers:
            layer.attn.core = core

    def set_sequence_group(self, group: object | None) -> None:
        """Declare that every sequence is sharded over ``group`` (context parallelism), so per-sequence
        statistics (the MoE balance loss) combine across it; None for unsharded sequences."""
        for moe in self.moe_layers():
            moe.seq_group = group

    def set_batch_group(self, group: object | None) -> None:
        """Declare the group of all data- and context-parallel ranks of one micro-step (the global
        balance loss, ``model.aux_loss=global``, counts expert load over it)."""
        for moe in self.moe_layers():
            moe.batch_group = group

    def moe_layers(self) -> list[MoE]:
        """The MoE layer of every decoder block, in order (looks through activation-checkpoint wrappers)."""
        return [module for module in self.modules() if isinstance(module, MoE)]

    def enable_expert_parallel(self, ep_mesh, *, grad_scale: float = 1.0, overlap_chunks: int = 1) -> None:
        """Shard every layer's routed experts over ``ep_mesh`` and dispatch tokens over its group
        (see :meth:`MoE.enable_expert_parallel`)."""
        for moe in self.moe_layers():
            moe.enable_expert_parallel(ep_mesh, grad_scale=grad_scale, overlap_chunks=overlap_chunks)

    @torch.no_grad()
    def update_router_balance(self, load_LE: torch.Tensor) -> None:
        """After an optimizer step: hand each layer's router the global tokens-per-expert ``load_LE``
        (fp32 ``[n_layers, E]``, identical on every rank) for load-based balancing (e.g. the expert bias)."""
        for moe, load_E in zip(self.moe_layers(), load_LE, strict=True):
            moe.router.update_balance(load_E)

    def forward(
        self,
        tokens_BS: torch.Tensor,
        positions_BS: torch.Tensor | None = None,
        doc_ids_BS: torch.Tensor | None = None,
    ) -> ModelOutput:
        if positions_BS is None:
            batch, seq_len = tokens_BS.shape
            positions_BS = torch.arange(seq_len, device=tokens_BS.device).expand(batch, seq_len)
        h_BSD = self.embed(tokens_BS)
        aux_losses = []
        moe_stats = []
        for layer in self.layers:
            h_BSD, aux_loss, moe_stats_S = layer(h_BSD, positions_BS, doc_ids_BS)
            aux_losses.append(aux_loss)
            moe_stats.append(moe_stats_S)
        h_BSD = self.norm(h_BSD)
        head_weight_VD = self.embed.weight if self.lm_head is None else self.lm_head.weight
        stats_LS = torch.stack(moe_stats)
        return ModelOutput(
            logits_BSV=F.linear(h_BSD, head_weight_VD),
            aux_loss=torch.stack(aux_losses).sum(),
            tokens_per_expert_LE=stats_LS[:, :-2],
            dropped_L=stats_LS[:, -2],
            entropy_L=stats_LS[:, -1],
        )


def count_parameters(model_or_cfg: nn.Module | ModelConfig) -> tuple[int, int]:
    """``(total, active)`` parameter counts of a model (any device, meta included) or of a config.

    ``active`` counts, per MoE layer, ``top_k`` of the ``num_experts`` routed experts, plus everything else
    (attention, norms, router, shared expert, embedding, head). A config is counted by building its model
    on the meta device, so nothing is allocated.
    """
    if isinstance(model_or_cfg, ModelConfig):
        with torch.device("meta"):
            model_or_cfg = Transformer(model_or_cfg)
    total = sum(p.numel() for p in model_or_cfg.parameters())
    inactive = 0
    for module in model_or_cfg.modules():
        if isinstance(module, MoE):
            routed = sum(p.numel() for p in module.experts.parameters())
            inactive += routed // module.num_experts * (module.num_experts - module.top_k)
    return total, total - inactive
