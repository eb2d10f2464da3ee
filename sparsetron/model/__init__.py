"""The reference MoE decoder (GQA + RoPE + MoE FFN) with HF Mixtral / Qwen-MoE semantics."""

from sparsetron.model.attention import Attention, LocalAttention, document_causal_mask
from sparsetron.model.norm import RMSNorm
from sparsetron.model.rope import RotaryEmbedding, apply_rotary, rotate_half
from sparsetron.model.transformer import (
    DecoderLayer,
    ModelOutput,
    Transformer,
    check_model_config,
    count_parameters,
)

__all__ = [
    "Attention",
    "DecoderLayer",
    "LocalAttention",
    "ModelOutput",
    "RMSNorm",
    "RotaryEmbedding",
    "Transformer",
    "apply_rotary",
    "check_model_config",
    "count_parameters",
    "document_causal_mask",
    "rotate_half",
]
