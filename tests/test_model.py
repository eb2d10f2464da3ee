"""The reference model and the single-process MoE layer against independent oracles.

Oracles: HF transformers' Mixtral / Qwen2-MoE / Qwen3-MoE (same weights, same tokens), naive fp64 attention
with an explicit mask and complex-number RoPE, a per-token loop MoE, hand-computed aux loss, and the
parameter counts derived from the architecture (Mixtral's equals HF's published 46,702,792,704).
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsetron.config import ModelConfig, config_root, load_config
from sparsetron.model import Attention, LocalAttention, Transformer, count_parameters
from sparsetron.parallel.expert import MoE, build_router


def tiny_config(**overrides) -> ModelConfig:
    base = ModelConfig(
        vocab_size=97,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        num_experts=4,
        top_k=2,
        expert_ffn_dim=48,
        aux_loss_coef=0.01,
    )
    return replace(base, **overrides)


# --------------------------------------------------------------------------------------------------------
# 1. HF parity
# --------------------------------------------------------------------------------------------------------

HF_CASES = {
    "mixtral": tiny_config(norm_eps=1e-5, rope_theta=1e6),
    "qwen2_moe": tiny_config(
        num_experts=6,
        top_k=2,
        attention_bias=True,
        shared_expert_ffn_dim=40,
        shared_expert_gate=True,
        normalize_topk=False,
    ),
    "qwen3_moe": tiny_config(
        head_dim=16, num_experts=8, top_k=3, qk_norm=True, normalize_topk=True, tie_embeddings=True
    ),
}


def hf_model(kind: str, cfg: ModelConfig) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        num_experts_per_tok=cfg.top_k,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings,
        attn_implementation="eager",
        experts_implementation="eager",
    )
    if kind == "mixtral":
        config = transformers.MixtralConfig(
            **common, intermediate_size=cfg.expert_ffn_dim, num_local_experts=cfg.num_experts
        )
        return transformers.MixtralForCausalLM(config)
    if kind == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(
            **common,
            moe_intermediate_size=cfg.expert_ffn_dim,
            shared_expert_intermediate_size=cfg.shared_expert_ffn_dim,
            num_experts=cfg.num_experts,
            norm_topk_prob=cfg.normalize_topk,
            qkv_bias=cfg.attention_bias,
        )
        return transformers.Qwen2MoeForCausalLM(config)
    config = transformers.Qwen3MoeConfig(
        **common,
        head_dim=cfg.resolved_head_dim(),
        moe_intermediate_size=cfg.expert_ffn_dim,
        num_experts=cfg.num_experts,
        norm_topk_prob=cfg.normalize_topk,
        attention_bias=cfg.attention_bias,
    )
    return transformers.Qwen3MoeForCausalLM(config)


@torch.no_grad()
def randomize_hf(model: nn.Module) -> None:
    """Weights far from HF's defaults so that a missed copy shows: norms ≠ 1, biases ≠ 0, decisive routing."""
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.copy_(1.0 + 0.2 * torch.randn_like(param))
        elif name.endswith("mlp.gate.weight"):
            param.normal_(0.0, 0.5)
        else:
            param.normal_(0.0, 0.1)


@torch.no_grad()
def load_from_hf(ours: Transformer, hf: nn.Module) -> None:
    """Copy HF weights into our model; every one of our parameters must be written exactly once."""
    src = hf.state_dict()
    dst = ours.state_dict()
    mapping: dict[str, torch.Tensor] = {"embed.weight": src["model.embed_tokens.weight"]}
    mapping["norm.weight"] = src["model.norm.weight"]
    if ours.lm_head is not None:
        mapping["lm_head.weight"] = src["lm_head.weight"]
    for i in range(ours.cfg.n_layers):
        hf_layer, our_layer = f"model.layers.{i}.", f"layers.{i}."
        mapping[our_layer + "attn_norm.weight"] = src[hf_layer + "input_layernorm.weight"]
        mapping[our_layer + "ffn_norm.weight"] = src[hf_layer + "post_attention_layernorm.weight"]
        for key, value in src.items():
            if key.startswith(hf_layer + "self_attn."):
                mapping[our_layer + "attn." + key.removeprefix(hf_layer + "self_attn.")] = value
        mapping[our_layer + "moe.router.weight"] = src[hf_layer + "mlp.gate.weight"]
        # HF stores experts fused: gate_up_proj [E, 2F, D] (gate rows first), down_proj [E, D, F].
        gate_up = src[hf_layer + "mlp.experts.gate_up_proj"]
        mapping[our_layer + "moe.experts.w_gate_up"] = gate_up.transpose(1, 2)
        mapping[our_layer + "moe.experts.w_down"] = src[hf_layer + "mlp.experts.down_proj"].transpose(1, 2)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            hf_key = hf_layer + f"mlp.shared_expert.{proj}.weight"
            if hf_key in src:
                mapping[our_layer + f"moe.shared_expert.{proj}.weight"] = src[hf_key]
        if hf_layer + "mlp.shared_expert_gate.weight" in src:
            mapping[our_layer + "moe.shared_gate.weight"] = src[hf_layer + "mlp.shared_expert_gate.weight"]
    assert set(mapping) == set(dst), (sorted(set(dst) - set(mapping)), sorted(set(mapping) - set(dst)))
    for key, value in mapping.items():
        assert dst[key].shape == value.shape, key
        dst[key].copy_(value)


def hf_tokens_per_expert(router_logits: tuple[torch.Tensor, ...], top_k: int, experts: int) -> torch.Tensor:
    counts = []
    for logits_TE in router_logits:
        chosen_TK = torch.topk(torch.softmax(logits_TE.float(), dim=-1), top_k, dim=-1).indices
        counts.append(torch.bincount(chosen_TK.flatten(), minlength=experts).float())
    return torch.stack(counts)


def parity_pair(kind: str) -> tuple[Transformer, nn.Module]:
    cfg = HF_CASES[kind]
    torch.manual_seed(0)
    hf = hf_model(kind, cfg).eval()
    randomize_hf(hf)
    ours = Transformer(cfg).eval()
    load_from_hf(ours, hf)
    return ours, hf


@pytest.mark.parametrize("kind", sorted(HF_CASES))
def test_logits_and_routing_match_hf(kind):
    ours, hf = parity_pair(kind)
    cfg = ours.cfg
    tokens_BS = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens_BS, output_router_logits=True, use_cache=False)
        got = ours(tokens_BS)
    assert got.logits_BSV.dtype == torch.float32
    torch.testing.assert_close(got.logits_BSV, expected.logits, atol=1e-5, rtol=0)
    hf_counts = hf_tokens_per_expert(expected.router_logits, cfg.top_k, cfg.num_experts)
    assert torch.equal(got.tokens_per_expert_LE, hf_counts)
    assert got.tokens_per_expert_LE.shape == (cfg.n_layers, cfg.num_experts)


@pytest.mark.parametrize("kind", sorted(HF_CASES))
def test_document_masking_matches_hf_packed_sequences(kind):
    """HF treats position ids that restart as packed documents (block-diagonal causal mask)."""
    ours, hf = parity_pair(kind)
    doc_lengths = [[5, 9, 3, 7], [11, 13]]
    positions_BS = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in doc_lengths])
    doc_ids_BS = torch.stack(
        [torch.cat([torch.full((n,), 10 * d + 3) for d, n in enumerate(row)]) for row in doc_lengths]
    )
    tokens_BS = torch.randint(0, ours.cfg.vocab_size, positions_BS.shape)
    with torch.no_grad():
        expected = hf(tokens_BS, position_ids=positions_BS, use_cache=False).logits
        got = ours(tokens_BS, positions_BS=positions_BS, doc_ids_BS=doc_ids_BS).logits_BSV
        unmasked = ours(tokens_BS, positions_BS=positions_BS).logits_BSV
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (unmasked - expected).abs().max() > 1e-2  # the documents really are separated


# --------------------------------------------------------------------------------------------------------
# 2. Attention against a naive fp64 reference
# --------------------------------------------------------------------------------------------------------


def naive_attention(q_BSHD, k_BSHD, v_BSHD, doc_ids_BS=None):
    batch, seq_len, n_heads, head_dim = q_BSHD.shape
    group = n_heads // k_BSHD.shape[2]
    k_BSHD = k_BSHD.repeat_interleave(group, dim=2)
    v_BSHD = v_BSHD.repeat_interleave(group, dim=2)
    scores_BHSS = torch.einsum("bqhd,bkhd->bhqk", q_BSHD, k_BSHD) / math.sqrt(head_dim)
    allowed_BSS = torch.ones(batch, seq_len, seq_len, dtype=torch.bool).tril()
    if doc_ids_BS is not None:
        allowed_BSS &= doc_ids_BS[:, :, None] == doc_ids_BS[:, None, :]
    scores_BHSS = scores_BHSS.masked_fill(~allowed_BSS[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores_BHSS, dim=-1), v_BSHD)


def naive_rope(x_BSHD, positions_BS, theta):
    """Rotate-half RoPE as complex multiplication: pair (i, i + D/2) turns by pos · theta^(-2i/D)."""
    half = x_BSHD.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / (2 * half))
    angle_BSd = positions_BS.double()[..., None] * freqs
    z_BSHd = torch.complex(x_BSHD[..., :half], x_BSHD[..., half:]) * torch.polar(
        torch.ones_like(angle_BSd), angle_BSd
    ).unsqueeze(2)
    return torch.cat([z_BSHd.real, z_BSHd.imag], dim=-1)


def naive_attention_module(attn: Attention, x_BSD, positions_BS, doc_ids_BS=None):
    batch, seq_len, _ = x_BSD.shape

    def heads(proj, n):
        return (x_BSD @ proj.weight.T + proj.bias).view(batch, seq_len, n, attn.head_dim)

    def rms(t, norm):
        return t / (t.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt() * norm.weight

    q, k, v = (
        heads(attn.q_proj, attn.n_heads),
        heads(attn.k_proj, attn.n_kv_heads),
        heads(attn.v_proj, attn.n_kv_heads),
    )
    if attn.q_norm is not None:
        q, k = rms(q, attn.q_norm), rms(k, attn.k_norm)
    q, k = naive_rope(q, positions_BS, attn.rope.theta), naive_rope(k, positions_BS, attn.rope.theta)
    out = naive_attention(q, k, v, doc_ids_BS)
    return out.reshape(batch, seq_len, -1) @ attn.o_proj.weight.T


DOC_IDS_BS = torch.tensor([[7, 7, 7, 3, 3, 9, 9, 9, 9, 1, 1, 1], [42, 42, 42, 42, 42, 5, 5, 5, 5, 5, 5, 0]])


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("docs", [False, True], ids=["causal", "documents"])
def test_local_attention_matches_naive_fp64(n_kv_heads, docs):
    gen = torch.Generator().manual_seed(0)
    batch, seq_len, head_dim = DOC_IDS_BS.shape[0], DOC_IDS_BS.shape[1], 8
    q = torch.randn(batch, seq_len, 4, head_dim, dtype=torch.float64, generator=gen)
    k = torch.randn(batch, seq_len, n_kv_heads, head_dim, dtype=torch.float64, generator=gen)
    v = torch.randn(batch, seq_len, n_kv_heads, head_dim, dtype=torch.float64, generator=gen)
    doc_ids = DOC_IDS_BS if docs else None
    got = LocalAttention()(q, k, v, doc_ids_BS=doc_ids, positions_BS=None)
    torch.testing.assert_close(got, naive_attention(q, k, v, doc_ids), atol=1e-12, rtol=0)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_rope_positions_and_shift_invariance(qk_norm):
    torch.manual_seed(0)
    attn = Attention(32, 4, 2, 8, rope_theta=10000.0, bias=True, qk_norm=qk_norm, init_std=0.3).double()
    if qk_norm:
        with torch.no_grad():
            attn.q_norm.weight.normal_(1.0, 0.2)
            attn.k_norm.weight.normal_(1.0, 0.2)
    batch, seq_len = DOC_IDS_BS.shape
    x = torch.randn(batch, seq_len, 32, dtype=torch.float64)
    default = torch.arange(seq_len).expand(batch, seq_len)
    gapped = default + torch.where(default >= seq_len // 2, 1000, 0)
    # RoPE angles are fp32 by design (as HF), good to about position · 2^-24 rad: outputs of size ~10 agree
    # with the fp64 reference to ~1e-6 near position 0 and ~1e-4 near position 1000.
    for positions, tol in ((default, 2e-6), (default + 1000, 1e-4), (gapped, 1e-4)):
        for doc_ids in (None, DOC_IDS_BS):
            expected = naive_attention_module(attn, x, positions, doc_ids)
            torch.testing.assert_close(attn(x, positions, doc_ids), expected, atol=tol, rtol=0)
    base = attn(x, default)
    # Shifting every position by a constant is invisible to RoPE attention; a gap in the middle is not.
    torch.testing.assert_close(attn(x, default + 1000), base, atol=1e-4, rtol=0)
    assert (attn(x, gapped) - base).abs().max() > 1.0


# --------------------------------------------------------------------------------------------------------
# 3. MoE against a per-token reference
# --------------------------------------------------------------------------------------------------------


def naive_moe(moe: MoE, x_BSD, normalize_topk: bool):
    """Loop over tokens and their chosen experts; returns (y_BSD, counts_BE, probs_BSE)."""
    batch, seq_len, dim = x_BSD.shape
    experts = moe.experts
    y_rows, probs_rows = [], []
    counts_BE = torch.zeros(batch, moe.num_experts)
    for b in range(batch):
        for s in range(seq_len):
            x_D = x_BSD[b, s]
            # The router works in fp32 whatever the activation dtype; its weights return in that dtype.
            probs_E = torch.softmax((moe.router.weight @ x_D).float(), dim=-1)
            top_probs, top_experts = torch.topk(probs_E, moe.top_k)
            if normalize_topk:
                top_probs = top_probs / top_probs.sum()
            top_probs = top_probs.to(x_D.dtype)
            y_D = torch.zeros_like(x_D)
            for weight, e in zip(top_probs, top_experts.tolist(), strict=True):
                w_gate, w_up = experts.w_gate_up[e].chunk(2, dim=-1)
                hidden = F.silu(x_D @ w_gate) * (x_D @ w_up)
                y_D = y_D + weight * (hidden @ experts.w_down[e])
                counts_BE[b, e] += 1
            if moe.shared_expert is not None:
                shared = moe.shared_expert
                shared_D = shared.down_proj.weight @ (
                    F.silu(shared.gate_proj.weight @ x_D) * (shared.up_proj.weight @ x_D)
                )
                if moe.shared_gate is not None:
                    shared_D = torch.sigmoid(moe.shared_gate.weight @ x_D) * shared_D
                y_D = y_D + shared_D
            y_rows.append(y_D)
            probs_rows.append(probs_E)
    return (
        torch.stack(y_rows).view(batch, seq_len, dim),
        counts_BE,
        torch.stack(probs_rows).view(batch, seq_len, -1),
    )


def hand_aux_loss(counts_BE, probs_BSE, top_k, coef):
    batch, seq_len, experts = probs_BSE.shape
    per_sequence = []
    for b in range(batch):
        total = 0.0
        for e in range(experts):
            total += (counts_BE[b, e] / (seq_len * top_k)) * probs_BSE[b, :, e].mean()
        per_sequence.append(experts * total)
    return coef * sum(per_sequence) / batch


MOE_CASES = {
    "routed-only": dict(shared_ffn_dim=0),
    "shared-gated": dict(shared_ffn_dim=24, shared_gate=True),
    "shared-ungated": dict(shared_ffn_dim=24, shared_gate=False, normalize_topk=False),
}


def make_moe(**kwargs) -> MoE:
    torch.manual_seed(0)
    options = dict(dim=16, ffn_dim=20, num_experts=5, top_k=2, aux_loss_coef=0.05, init_std=0.3)
    return MoE(**{**options, **kwargs}).double()


@pytest.mark.parametrize("case", sorted(MOE_CASES))
def test_moe_forward_backward_and_aux_match_per_token_reference(case):
    moe = make_moe(**MOE_CASES[case])
    normalize = MOE_CASES[case].get("normalize_topk", True)
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(3, 7, 16, dtype=torch.float64)

    y, stats = moe(x)
    ((y * probe).sum() + 10 * stats.aux_loss).backward()
    got_grads = {n: p.grad.clone() for n, p in moe.named_parameters()} | {"x": x.grad.clone()}
    moe.zero_grad()
    x.grad = None

    y_ref, counts_BE, probs_BSE = naive_moe(moe, x, normalize)
    aux_ref = hand_aux_loss(counts_BE, probs_BSE, moe.top_k, moe.aux_loss_coef)
    ((y_ref * probe).sum() + 10 * aux_ref).backward()
    ref_grads = {n: p.grad for n, p in moe.named_parameters()} | {"x": x.grad}

    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(stats.aux_loss, aux_ref.to(stats.aux_loss.dtype), atol=1e-7, rtol=1e-6)
    assert torch.equal(stats.tokens_per_expert_E, counts_BE.sum(0))
    assert stats.tokens_per_expert_E.sum() == 3 * 7 * moe.top_k
    assert not stats.tokens_per_expert_E.requires_grad
    assert set(got_grads) == set(ref_grads)
    for name, grad in ref_grads.items():
        # The router computes in fp32 by design, so gradients that flow through it agree to fp32 precision.
        tol = 1e-6 if name in ("router.weight", "x") else 1e-12
        torch.testing.assert_close(got_grads[name], grad, atol=tol, rtol=0, msg=name)


def test_aux_loss_is_invariant_to_splitting_the_batch():
    moe = make_moe()
    x = torch.randn(5, 6, 16, dtype=torch.float64)
    whole = moe(x)[1]
    first, second = moe(x[:2])[1], moe(x[2:])[1]
    torch.testing.assert_close(whole.aux_loss, (2 * first.aux_loss + 3 * second.aux_loss) / 5)
    torch.testing.assert_close(
        whole.tokens_per_expert_E, first.tokens_per_expert_E + second.tokens_per_expert_E
    )


def test_moe_keeps_activation_dtype_and_reports_fp32_stats():
    moe = make_moe(shared_ffn_dim=24).to(torch.bfloat16)
    y, stats = moe(torch.randn(2, 5, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert stats.aux_loss.dtype == stats.tokens_per_expert_E.dtype == torch.float32
    route = moe.router(torch.randn(4, 16, dtype=torch.bfloat16))
    assert route.weight_N.dtype == torch.bfloat16
    assert route.probs_TE.dtype == route.logits_TE.dtype == torch.float32


def test_moe_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match=r"unknown router 'sinkhron'; known routers: cosine, expert_choice"):
        build_router("sinkhron", 8, 4, 2)
    with pytest.raises(ValueError, match=r"capacity_factor and token_rounding both set"):
        MoE(8, 8, 4, 2, capacity_factor=1.0, token_rounding="up")
    with pytest.raises(ValueError, match=r"aux_loss='batch' must be one of sequence, switch, global, none"):
        MoE(8, 8, 4, 2, aux_loss="batch")
    with pytest.raises(ValueError, match="top_k=5 must be between 1 and num_experts=4"):
        MoE(8, 8, 4, 5)
    with pytest.raises(ValueError, match="n_heads=6 must be a multiple of n_kv_heads=4"):
        Transformer(tiny_config(n_heads=6, n_kv_heads=4, head_dim=8))


# --------------------------------------------------------------------------------------------------------
# 4. Meta device, parameter counts, deterministic initialisation
# --------------------------------------------------------------------------------------------------------


def expected_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active) from the architecture, written out independently of the model code."""
    d, hd = cfg.dim, cfg.resolved_head_dim()
    attention = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    attention += cfg.attention_bias * hd * (cfg.n_heads + 2 * cfg.n_kv_heads) + cfg.qk_norm * 2 * hd
    expert = 3 * d * cfg.expert_ffn_dim
    shared = 3 * d * cfg.shared_expert_ffn_dim + (
        d if cfg.shared_expert_ffn_dim and cfg.shared_expert_gate else 0
    )
    layer_fixed = attention + 2 * d + cfg.num_experts * d + shared
    outside = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2) + d
    total = cfg.n_layers * (layer_fixed + cfg.num_experts * expert) + outside
    active = cfg.n_layers * (layer_fixed + cfg.top_k * expert) + outside
    return total, active


def test_mixtral_8x7b_on_meta_has_hf_published_size():
    cfg = load_config(None, ["model.preset=mixtral-8x7b"]).model
    with torch.device("meta"):
        model = Transformer(cfg)
    assert all(p.is_meta for p in model.parameters())
    total, active = count_parameters(model)
    assert (total, active) == expected_counts(cfg)
    assert total == 46_702_792_704  # HF model card of mistralai/Mixtral-8x7B-v0.1
    assert round(active / 1e8) == 129  # "12.9B active"
    assert count_parameters(cfg) == (total, active)


def test_qwen3_30b_a3b_on_meta_has_published_size():
    # Qwen3-MoE normalises q and k per head; the preset may predate the qk_norm field, so set it here.
    cfg = load_config(None, ["model.preset=qwen3-30b-a3b", "model.qk_norm=true"]).model
    with torch.device("meta"):
        model = Transformer(cfg)
    assert all(p.is_meta for p in model.parameters())
    total, active = count_parameters(model)
    assert (total, active) == expected_counts(cfg) == (30_532_122_624, 3_353_032_704)
    assert abs(total / 30.5e9 - 1) < 0.01
    # Qwen publishes "3.3B activated" for 3.35B counted with both embedding and head: truncated, not rounded.
    assert math.floor(active / 1e8) == 33


@pytest.mark.parametrize("preset", sorted(p.stem for p in config_root().joinpath("model").glob("*.yaml")))
def test_every_preset_builds_on_meta_with_the_architecture_count(preset):
    cfg = load_config(None, [f"model.preset={preset}"]).model
    with torch.device("meta"):
        model = Transformer(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert count_parameters(model) == expected_counts(cfg)


def test_meta_init_then_materialise_equals_direct_construction():
    cfg = tiny_config(attention_bias=True, qk_norm=True, shared_expert_ffn_dim=24)
    torch.manual_seed(123)
    direct = Transformer(cfg)
    with torch.device("meta"):
        deferred = Transformer(cfg)
    deferred.to_empty(device="cpu")
    torch.manual_seed(123)
    deferred.init_weights()
    direct_state, deferred_state = direct.state_dict(), deferred.state_dict()
    assert list(direct_state) == list(deferred_state)
    for name, tensor in direct_state.items():
        assert torch.equal(tensor, deferred_state[name]), name
    for name, tensor in direct_state.items():
        if name.endswith("norm.weight"):
            assert torch.equal(tensor, torch.ones_like(tensor)), name
        elif name.endswith(".bias"):
            assert torch.equal(tensor, torch.zeros_like(tensor)), name
        elif tensor.numel() > 1000:
            assert abs(tensor.std().item() - cfg.init_std) < 0.1 * cfg.init_std, name


def test_tied_head_reads_the_embedding_and_survives_to_empty():
    cfg = tiny_config(tie_embeddings=True)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.lm_head is None
    tokens = torch.randint(0, cfg.vocab_size, (1, 6))
    h_BSD = model.embed(tokens)
    for layer in model.layers:
        h_BSD = layer(h_BSD, torch.arange(6)[None])[0]
    torch.testing.assert_close(model(tokens).logits_BSV, model.norm(h_BSD) @ model.embed.weight.T)


def test_set_attention_core_installs_the_core_in_every_layer():
    class CountingCore(nn.Module):
        def __init__(self):
            super().__init__()
            self.local = LocalAttention()
            self.calls = 0

        def forward(self, q_BSHD, k_BSHD, v_BSHD, *, doc_ids_BS, positions_BS):
            self.calls += 1
            return self.local(q_BSHD, k_BSHD, v_BSHD, doc_ids_BS=doc_ids_BS, positions_BS=positions_BS)

    torch.manual_seed(0)
    model = Transformer(tiny_config(n_layers=3))
    tokens = torch.randint(0, 97, (2, 10))
    before = model(tokens).logits_BSV
    core = CountingCore()
    model.set_attention_core(core)
    torch.testing.assert_close(model(tokens).logits_BSV, before, atol=0, rtol=0)
    assert core.calls == 3


# --------------------------------------------------------------------------------------------------------
# 5. Training sanity
# --------------------------------------------------------------------------------------------------------


def test_every_parameter_gets_a_gradient_and_loss_falls():
    cfg = tiny_config(attention_bias=True, qk_norm=True, shared_expert_ffn_dim=24, aux_loss_coef=0.01)
    torch.manual_seed(0)
    model = Transformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 33))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    doc_ids = torch.tensor([[0] * 20 + [1] * 12, [4] * 32])

    def loss_fn():
        out = model(inputs, doc_ids_BS=doc_ids)
        return F.cross_entropy(out.logits_BSV.flatten(0, 1), targets.flatten()) + out.aux_loss

    loss_fn().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses
