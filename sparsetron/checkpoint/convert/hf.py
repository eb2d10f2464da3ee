"""Hugging Face checkpoints (``config.json`` + safetensors) of Mixtral, Qwen2-MoE and Qwen3-MoE, read and written.

On-disk expert layouts (both are read; either is written):

- ``per_expert``: one matrix per expert, what transformers 5's ``save_pretrained`` writes by default (it
  reverts its in-memory fusion on save) and what every published checkpoint holds. Mixtral:
  ``model.layers.{i}.block_sparse_moe.experts.{e}.w1/w3/w2.weight`` (gate, up, down) with the router at
  ``block_sparse_moe.gate.weight``; Qwen: ``model.layers.{i}.mlp.experts.{e}.gate_proj/up_proj/down_proj.weight``
  with the router at ``mlp.gate.weight``. Shapes ``[F, D]`` (gate, up) and ``[D, F]`` (down).
- ``fused``: transformers 5's in-memory form, written by ``save_pretrained(save_original_format=False)``:
  ``model.layers.{i}.mlp.experts.gate_up_proj`` ``[E, 2F, D]`` (gate rows first) and ``mlp.experts.down_proj``
  ``[E, D, F]``; Mixtral's ``block_sparse_moe`` is renamed ``mlp`` there.

Sparsetron stacks experts as ``w_gate_up [E, D, 2F]`` and ``w_down [E, F, D]``: every conversion is a
transpose, a concatenation or a split, so values are moved, never recomputed, and dtypes stay as stored.

Tensors are read lazily (:func:`safetensors.safe_open`), one group at a time; the writer streams each
tensor's bytes to disk as its group arrives, so neither side holds more than about one layer.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from sparsetron.checkpoint.convert.neutral import (
    ConversionError,
    TensorGroup,
    atomic_directory,
    check_group,
    expected_specs,
    group_names,
    group_of,
    tensor_hash,
    write_manifest,
)
from sparsetron.config import ModelConfig

MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
LAYOUTS = ("per_expert", "fused")
CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
#: transformers 5.23 class defaults of the config keys read here (used when config.json leaves one out).
_DEFAULTS = {
    "mixtral": {"rms_norm_eps": 1e-5, "rope_theta": 1e6, "num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "norm_topk_prob": False,
        "qkv_bias": True,
    },
    "qwen3_moe": {
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "norm_topk_prob": False,
        "attention_bias": False,
    },
}
#: Per-expert names of (gate, up, down) on disk.
_EXPERT_NAMES = {
    "mixtral": ("w1", "w3", "w2"),
    "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
}
#: Buffers some older checkpoints carry that hold no weights (recomputed from the config); skipped on read.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


# --------------------------------------------------------------------------------------------------------
# Config mapping
# --------------------------------------------------------------------------------------------------------


def model_config_from_hf(hf: dict, source: str = CONFIG_FILE) -> ModelConfig:
    """Our :class:`ModelConfig` from the dict of an HF ``config.json``; ConversionError naming the key and why
    for anything sparsetron's model cannot reproduce exactly."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConversionError(
            f"{source}: model_type={model_type!r} is not supported; the hf format converts "
            f"{', '.join(MODEL_TYPES)}"
        )
    defaults = _DEFAULTS[model_type]

    def get(key: str, default=None):
        value = hf.get(key)
        if value is None:
            value = defaults.get(key, default)
        if value is None:
            raise ConversionError(f"{source}: key {key!r} is missing; {model_type} needs it")
        return value

    def refuse(key: str, why: str) -> None:
        raise ConversionError(f"{source}: {key}={hf.get(key)!r} is not supported: {why}")

    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "sparsetron's experts are SwiGLU (silu)")
    theta = _rope_theta(hf, defaults["rope_theta"], source)
    n_heads = int(get("num_attention_heads"))
    n_kv_heads = hf.get("num_key_value_heads") or n_heads
    dim = int(get("hidden_size"))
    head_dim = hf.get("head_dim")
    experts = _num_experts(hf, model_type, source)

    if model_type == "mixtral":
        if hf.get("sliding_window") is not None:
            refuse("sliding_window", "sparsetron attends over the whole sequence; set it to null")
        if float(hf.get("router_jitter_noise") or 0.0) != 0.0:
            refuse("router_jitter_noise", "sparsetron's router adds no jitter; set it to 0.0")
        moe = dict(
            expert_ffn_dim=int(get("intermediate_size", 14336)),
            shared_expert_ffn_dim=0,
            normalize_topk=True,
            attention_bias=False,
            qk_norm=False,
        )
    else:
        if int(hf.get("decoder_sparse_step") or 1) != 1:
            refuse("decoder_sparse_step", "sparsetron puts an MoE layer in every block; it must be 1")
        if hf.get("mlp_only_layers"):
            refuse("mlp_only_layers", "sparsetron has no dense-MLP blocks; it must be empty")
        if hf.get("use_sliding_window"):
            refuse("use_sliding_window", "sparsetron attends over the whole sequence; it must be false")
        layer_types = hf.get("layer_types") or []
        if any(t != "full_attention" for t in layer_types):
            refuse("layer_types", "every layer must be full_attention")
        moe = dict(
            expert_ffn_dim=int(get("moe_intermediate_size")),
            normalize_topk=bool(get("norm_topk_prob")),
        )
        if model_type == "qwen2_moe":
            shared = int(get("shared_expert_intermediate_size"))
            if shared <= 0:
                refuse("shared_expert_intermediate_size", "Qwen2-MoE without a shared expert is not mapped")
            moe |= dict(
                shared_expert_ffn_dim=shared,
                shared_expert_gate=True,
                attention_bias=bool(get("qkv_bias")),
                qk_norm=False,
            )
        else:
            if get("attention_bias"):
                refuse(
                    "attention_bias", "Qwen3-MoE then also biases o_proj, which sparsetron's attention lacks"
                )
            moe |= dict(shared_expert_ffn_dim=0, attention_bias=False, qk_norm=True)
    values = dict(
        vocab_size=int(get("vocab_size")),
        dim=dim,
        n_layers=int(get("num_hidden_layers")),
        n_heads=n_heads,
        n_kv_heads=int(n_kv_heads),
        head_dim=None if head_dim is None else int(head_dim),
        num_experts=experts,
        top_k=int(get("num_experts_per_tok")),
        rope_theta=theta,
        norm_eps=float(get("rms_norm_eps")),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **moe,
    )
    if hf.get("initializer_range") is not None:
        values["init_std"] = float(hf["initializer_range"])
    if hf.get("max_position_embeddings") is not None:
        values["max_seq_len"] = int(hf["max_position_embeddings"])
    cfg = ModelConfig(**values)
    if cfg.n_heads % cfg.n_kv_heads or cfg.resolved_head_dim() % 2 or not 1 <= cfg.top_k <= cfg.num_experts:
        raise ConversionError(
            f"{source}: num_attention_heads={n_heads}, num_key_value_heads={n_kv_heads}, head_dim="
            f"{cfg.resolved_head_dim()}, num_experts_per_tok={cfg.top_k}, experts={experts} do not describe a "
            "valid model (heads must divide, head_dim be even, 1 <= top_k <= experts)"
        )
    return cfg


def _rope_theta(hf: dict, default: float, source: str) -> float:
    """RoPE base from ``rope_parameters`` (transformers 5) or the legacy ``rope_theta`` / ``rope_scaling``."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConversionError(f"{source}: {key}={value!r} must be a mapping")
        rope_type = value.get("rope_type", value.get("type", "default"))
        if rope_type != "default":
            raise ConversionError(
                f"{source}: {key}.rope_type={rope_type!r} is not supported: sparsetron implements only default "
                "(unscaled) RoPE"
            )
        if float(value.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ConversionError(
                f"{source}: {key}.partial_rotary_factor={value['partial_rotary_factor']} is not supported: "
                "sparsetron rotates the whole head"
            )
    if params is not None and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    if hf.get("rope_theta") is not None:
        return float(hf["rope_theta"])
    return float(default)


def _num_experts(hf: dict, model_type: str, source: str) -> int:
    """Routed experts, under either spelling (transformers 5 saves Qwen3-MoE's as ``num_local_experts``)."""
    found = {name: int(hf[name]) for name in ("num_local_experts", "num_experts") if hf.get(name) is not None}
    if len(set(found.values())) > 1:
        raise ConversionError(f"{source}: expert counts disagree: {found}")
    if found:
        return next(iter(found.values()))
    return int(_DEFAULTS[model_type]["num_local_experts" if model_type == "mixtral" else "num_experts"])


def hf_config_dict(cfg: ModelConfig, model_type: str, dtype: torch.dtype) -> dict:
    """The ``config.json`` of ``cfg`` as ``model_type`` (refuses, with ConversionError, what it cannot express)."""
    check_expressible(cfg, model_type)
    out = {
        "architectures": [_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "num_experts_per_tok": cfg.top_k,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_dropout": 0.0,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if model_type == "mixtral":
        out |= {
            "head_dim": cfg.head_dim,
            "intermediate_size": cfg.expert_ffn_dim,
            "num_local_experts": cfg.num_experts,
            "sliding_window": None,
            "router_jitter_noise": 0.0,
        }
    else:
        out |= {
            "moe_intermediate_size": cfg.expert_ffn_dim,
            "num_experts": cfg.num_experts,
            "norm_topk_prob": cfg.normalize_topk,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "use_sliding_window": False,
        }
    if model_type == "qwen2_moe":
        out |= {
            "shared_expert_intermediate_size": cfg.shared_expert_ffn_dim,
            "intermediate_size": cfg.shared_expert_ffn_dim,
            "qkv_bias": cfg.attention_bias,
        }
    if model_type == "qwen3_moe":
        out |= {"head_dim": cfg.resolved_head_dim(), "attention_bias": False}
    return out


def check_expressible(cfg: ModelConfig, model_type: str) -> None:
    """ConversionError naming every field of ``cfg`` that an HF ``model_type`` checkpoint cannot express."""
    if model_type not in MODEL_TYPES:
        raise ConversionError(
            f"model_type={model_type!r} is not supported; choose one of {', '.join(MODEL_TYPES)}"
        )
    router = cfg.router.value if hasattr(cfg.router, "value") else str(cfg.router)
    problems = []
    if router != "softmax_topk":
        problems.append(f"router={router} (HF MoE models route by softmax top-k)")
    if cfg.router_groups != 1:
        problems.append(f"router_groups={cfg.router_groups} (HF routing is not group-limited)")
    if model_type == "mixtral":
        if cfg.shared_expert_ffn_dim:
            problems.append(
                f"shared_expert_ffn_dim={cfg.shared_expert_ffn_dim} (Mixtral has no shared expert)"
            )
        if not cfg.normalize_topk:
            problems.append("normalize_topk=false (Mixtral always renormalises the top-k weights)")
        if cfg.attention_bias:
            problems.append("attention_bias=true (Mixtral has no attention bias)")
        if cfg.qk_norm:
            problems.append("qk_norm=true (Mixtral has no q/k norm)")
    elif model_type == "qwen2_moe":
        if not cfg.shared_expert_ffn_dim or not cfg.shared_expert_gate:
            problems.append(
                f"shared_expert_ffn_dim={cfg.shared_expert_ffn_dim}, shared_expert_gate={cfg.shared_expert_gate} "
                "(Qwen2-MoE always has a sigmoid-gated shared expert)"
            )
        if cfg.qk_norm:
            problems.append("qk_norm=true (Qwen2-MoE has no q/k norm)")
        if cfg.resolved_head_dim() != cfg.dim // cfg.n_heads:
            problems.append(
                f"head_dim={cfg.head_dim} (Qwen2-MoE's head_dim is hidden_size // num_attention_heads)"
            )
    else:
        if cfg.shared_expert_ffn_dim:
            problems.append(
                f"shared_expert_ffn_dim={cfg.shared_expert_ffn_dim} (Qwen3-MoE has no shared expert)"
            )
        if cfg.attention_bias:
            problems.append(
                "attention_bias=true (Qwen3-MoE's attention bias includes o_proj, which sparsetron lacks)"
            )
        if not cfg.qk_norm:
            problems.append("qk_norm=false (Qwen3-MoE always normalises q and k per head)")
    if problems:
        raise ConversionError(f"cannot write the model as hf {model_type}: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------------------
# Name and layout mapping
# --------------------------------------------------------------------------------------------------------


class _GroupPlan:
    """How one neutral group maps to HF tensors: ``hf_specs`` (HF key → shape) and the two conversions."""

    def __init__(
        self,
        hf_specs: dict[str, tuple[int, ...]],
        to_neutral: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
        to_hf: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    ) -> None:
        self.hf_specs = hf_specs
        self.to_neutral = to_neutral
        self.to_hf = to_hf


def _moe_prefix(model_type: str, layout: str) -> str:
    return "block_sparse_moe" if model_type == "mixtral" and layout == "per_expert" else "mlp"


def _direct_name(key: str, moe_prefix: str) -> str:
    """HF name of a canonical tensor that maps one to one (everything but the routed experts)."""
    fixed = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if key in fixed or key == "lm_head.weight":
        return fixed.get(key, key)
    _, index, rest = key.split(".", 2)
    hf_layer = f"model.layers.{index}."
    renames = {
        "attn_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "moe.router.weight": f"{moe_prefix}.gate.weight",
        "moe.shared_gate.weight": "mlp.shared_expert_gate.weight",
    }
    if rest in renames:
        return hf_layer + renames[rest]
    if rest.startswith("attn."):
        return hf_layer + "self_attn." + rest.removeprefix("attn.")
    if rest.startswith("moe.shared_expert."):
        return hf_layer + "mlp.shared_expert." + rest.removeprefix("moe.shared_expert.")
    raise ConversionError(
        f"sparsetron tensor {key} has no HF name (a model feature the hf format cannot hold)"
    )


def group_plans(cfg: ModelConfig, model_type: str, layout: str) -> dict[str, _GroupPlan]:
    """Plan of every group of ``cfg``'s model stored as HF ``model_type`` in ``layout``."""
    if layout not in LAYOUTS:
        raise ConversionError(f"layout={layout!r} is not supported; choose one of {', '.join(LAYOUTS)}")
    specs = expected_specs(cfg)
    prefix = _moe_prefix(model_type, layout)
    experts, ffn, dim = cfg.num_experts, cfg.expert_ffn_dim, cfg.dim
    gate_name, up_name, down_name = _EXPERT_NAMES[model_type]
    plans = {}
    for group in group_names(cfg):
        keys = [k for k in specs if group_of(k) == group]
        direct = {k: _direct_name(k, prefix) for k in keys if ".moe.experts." not in k}
        hf_specs = {direct[k]: specs[k][0] for k in direct}
        expert_keys: dict[str, str] = {}
        if group.startswith("layers."):
            hf_moe = f"model.{group}.{prefix}.experts."
            ours = f"{group}.moe.experts."
            expert_keys = {"gate_up": ours + "w_gate_up", "down": ours + "w_down"}
            if layout == "fused":
                hf_specs[hf_moe + "gate_up_proj"] = (experts, 2 * ffn, dim)
                hf_specs[hf_moe + "down_proj"] = (experts, dim, ffn)
            else:
                for e in range(experts):
                    hf_specs[f"{hf_moe}{e}.{gate_name}.weight"] = (ffn, dim)
                    hf_specs[f"{hf_moe}{e}.{up_name}.weight"] = (ffn, dim)
                    hf_specs[f"{hf_moe}{e}.{down_name}.weight"] = (dim, ffn)
        plans[group] = _GroupPlan(
            hf_specs,
            _make_to_neutral(direct, expert_keys, prefix, group, layout, experts, model_type),
            _make_to_hf(direct, expert_keys, prefix, group, layout, experts, model_type, ffn),
        )
    return plans


def _make_to_neutral(direct, expert_keys, prefix, group, layout, experts, model_type):
    gate_name, up_name, down_name = _EXPERT_NAMES[model_type]

    def to_neutral(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {ours: hf[theirs] for ours, theirs in direct.items()}
        if expert_keys:
            hf_moe = f"model.{group}.{prefix}.experts."
            if layout == "fused":
                # [E, 2F, D] (gate rows first) -> [E, D, 2F]; [E, D, F] -> [E, F, D].
                out[expert_keys["gate_up"]] = hf[hf_moe + "gate_up_proj"].transpose(1, 2).contiguous()
                out[expert_keys["down"]] = hf[hf_moe + "down_proj"].transpose(1, 2).contiguous()
            else:
                out[expert_keys["gate_up"]] = torch.stack(
                    [
                        torch.cat(
                            [hf[f"{hf_moe}{e}.{gate_name}.weight"].T, hf[f"{hf_moe}{e}.{up_name}.weight"].T],
                            1,
                        )
                        for e in range(experts)
                    ]
                )
                out[expert_keys["down"]] = torch.stack(
                    [hf[f"{hf_moe}{e}.{down_name}.weight"].T for e in range(experts)]
                )
        return out

    return to_neutral


def _make_to_hf(direct, expert_keys, prefix, group, layout, experts, model_type, ffn):
    gate_name, up_name, down_name = _EXPERT_NAMES[model_type]

    def to_hf(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {theirs: ours[key] for key, theirs in direct.items()}
        if expert_keys:
            hf_moe = f"model.{group}.{prefix}.experts."
            gate_up, down = ours[expert_keys["gate_up"]], ours[expert_keys["down"]]
            if layout == "fused":
                out[hf_moe + "gate_up_proj"] = gate_up.transpose(1, 2).contiguous()
                out[hf_moe + "down_proj"] = down.transpose(1, 2).contiguous()
            else:
                for e in range(experts):
                    out[f"{hf_moe}{e}.{gate_name}.weight"] = gate_up[e, :, :ffn].T.contiguous()
                    out[f"{hf_moe}{e}.{up_name}.weight"] = gate_up[e, :, ffn:].T.contiguous()
                    out[f"{hf_moe}{e}.{down_name}.weight"] = down[e].T.contiguous()
        return out

    return to_hf


# --------------------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path}: file not found; an hf checkpoint directory needs it")
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConversionError(f"{path}: not readable JSON ({err})") from err
    if not isinstance(value, dict):
        raise ConversionError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def _safe_open(path: Path):
    from safetensors import safe_open

    if not path.is_file():
        raise ConversionError(f"{path}: safetensors file not found")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError) for bad files
        raise ConversionError(
            f"{path}: not a valid safetensors file ({err}); it may be truncated or corrupt"
        ) from err


class HFReader:
    """An HF checkpoint directory (Mixtral, Qwen2-MoE or Qwen3-MoE) read as neutral groups.

    The constructor reads ``config.json`` and every safetensors header (no tensor data): it refuses, with
    ConversionError naming file and key, unsupported configs, missing shards, missing or unknown tensors and
    wrong shapes. :meth:`groups` then reads one group's tensors at a time.
    """

    format = "hf"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.hf_config = _read_json(self.path / CONFIG_FILE)
        self.model_type = self.hf_config.get("model_type")
        self._cfg = model_config_from_hf(self.hf_config, str(self.path / CONFIG_FILE))
        self._files = self._weight_files()
        self._inventory = self._read_headers()
        self.layout = self._detect_layout()
        self._plans = group_plans(self._cfg, self.model_type, self.layout)
        self._check_inventory()

    def _weight_files(self) -> dict[str, str | None]:
        """HF key → shard file name (from the index), or ``{"": file}`` for a single unindexed file."""
        index = self.path / INDEX_FILE
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{index}: has no weight_map")
            for name in sorted(set(weight_map.values())):
                if not (self.path / name).is_file():
                    keys = sorted(k for k, v in weight_map.items() if v == name)
                    raise ConversionError(
                        f"{self.path / name}: shard named in {index} (for {keys[:3]} …) is missing; "
                        "re-download the checkpoint"
                    )
            return dict(weight_map)
        if (self.path / SINGLE_FILE).is_file():
            return {"": SINGLE_FILE}
        raise ConversionError(
            f"{self.path}: neither {SINGLE_FILE} nor {INDEX_FILE} found; only safetensors checkpoints are read "
            "(convert pytorch_model.bin files to safetensors first)"
        )

    def _read_headers(self) -> dict[str, tuple[str, tuple[int, ...], str]]:
        """HF key → (file, shape, dtype) from every file's header."""
        inventory = {}
        for name in sorted(set(self._files.values())):
            path = self.path / name
            with _safe_open(path) as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open is not iterable
                    sliced = handle.get_slice(key)
                    inventory[key] = (name, tuple(sliced.get_shape()), sliced.get_dtype())
        if "" not in self._files:
            for key, name in self._files.items():
                if key not in inventory or inventory[key][0] != name:
                    raise ConversionError(
                        f"{self.path / name}: tensor {key}, which {INDEX_FILE} places in this file, is not in it"
                    )
            inventory = {k: v for k, v in inventory.items() if self._files.get(k) == v[0]}
        return inventory

    def _detect_layout(self) -> str:
        layer = "model.layers.0."
        if any(k.startswith(layer) and ".experts.gate_up_proj" in k for k in self._inventory):
            return "fused"
        return "per_expert"

    def _check_inventory(self) -> None:
        expected = {k: s for plan in self._plans.values() for k, s in plan.hf_specs.items()}
        present = {k for k in self._inventory if not k.endswith(_IGNORED_SUFFIXES)}
        tied_head = self._cfg.tie_embeddings and "lm_head.weight" in present
        if tied_head:
            present.discard("lm_head.weight")  # a tied checkpoint may store the head too; checked on read
        missing = sorted(expected.keys() - present)
        unknown = sorted(present - expected.keys())
        if missing:
            raise ConversionError(
                f"{self.path}: tensor {missing[0]} is missing ({len(missing)} missing in all: {missing[:5]}); "
                f"a {self.model_type} checkpoint in the {self.layout} layout with this config.json needs it"
            )
        if unknown:
            name = self._inventory[unknown[0]][0]
            raise ConversionError(
                f"{self.path / name}: tensor {unknown[0]} is unknown ({len(unknown)} in all: {unknown[:5]}); it "
                f"is not part of a {self.model_type} model with this config.json ({self.layout} expert layout)"
            )
        for key, shape in expected.items():
            name, got, _ = self._inventory[key]
            if got != shape:
                raise ConversionError(
                    f"{self.path / name}: tensor {key} has shape {list(got)}, config.json implies {list(shape)}"
                )
        if tied_head and self._inventory["lm_head.weight"][1] != expected["model.embed_tokens.weight"]:
            raise ConversionError(f"{self.path}: tensor lm_head.weight of a tied model has the wrong shape")

    def model_config(self) -> ModelConfig:
        return self._cfg

    def _load(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self._inventory[key][0], []).append(key)
        out = {}
        for name, names in by_file.items():
            path = self.path / name
            with _safe_open(path) as handle:
                for key in names:
                    try:
                        out[key] = handle.get_tensor(key)
                    except Exception as err:
                        raise ConversionError(f"{path}: tensor {key} cannot be read ({err})") from err
        return out

    def groups(self) -> Iterator[TensorGroup]:
        for name, plan in self._plans.items():
            hf = self._load(plan.hf_specs)
            group = TensorGroup(name, plan.to_neutral(hf))
            del hf
            if name == "head" and self._cfg.tie_embeddings and "lm_head.weight" in self._inventory:
                pair = self._load(["lm_head.weight", "model.embed_tokens.weight"])
                if not torch.equal(pair["lm_head.weight"], pair["model.embed_tokens.weight"]):
                    raise ConversionError(
                        f"{self.path / self._inventory['lm_head.weight'][0]}: tensor lm_head.weight differs from "
                        "model.embed_tokens.weight although tie_word_embeddings is true"
                    )
            check_group(self._cfg, group, str(self.path))
            yield group

    def describe(self) -> dict:
        return {
            "format": self.format,
            "path": str(self.path),
            "model_type": self.model_type,
            "layout": self.layout,
            "transformers_version": self.hf_config.get("transformers_version"),
            "files": sorted(set(self._files.values())),
        }


# --------------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------------


class _ShardStream:
    """One safetensors file written as tensors arrive: data goes to a side file, the file is assembled by finish()."""

    def __init__(self, directory: Path, number: int) -> None:
        self.directory = directory
        self.data_path = directory / f".shard-{number:05d}.data"
        self.path = directory / f".shard-{number:05d}.safetensors"
        self.data = open(self.data_path, "wb")  # noqa: SIM115 - closed in finish()
        self.header: dict[str, dict] = {}
        self.nbytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().contiguous().cpu()
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise ConversionError(f"tensor {key} has dtype {t.dtype}, which safetensors cannot store")
        size = t.numel() * t.element_size()
        if size:
            self.data.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        self.header[key] = {
            "dtype": _SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [self.nbytes, self.nbytes + size],
        }
        self.nbytes += size

    def finish(self) -> None:
        """Write the complete safetensors file to :attr:`path` (header, then the data) and drop the side file."""
        self.data.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        with open(self.path, "wb") as out, open(self.data_path, "rb") as data:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(data, out, length=16 * 2**20)
        self.data_path.unlink()


class HFWriter:
    """Writes neutral groups as an HF checkpoint of ``model_type`` that transformers loads with
    ``from_pretrained``.

    ``layout="per_expert"`` writes what ``save_pretrained`` writes (the published layout), ``"fused"`` what
    ``save_pretrained(save_original_format=False)`` writes. Shards hold at most ``max_shard_bytes`` each (a
    larger tensor gets a shard of its own), named ``model-00001-of-0000N.safetensors`` with
    ``model.safetensors.index.json``; a single shard is ``model.safetensors``. Output appears atomically.
    """

    format = "hf"

    def __init__(
        self,
        path: str | os.PathLike,
        model_type: str = "mixtral",
        *,
        layout: str = "per_expert",
        max_shard_bytes: int = 5 * 2**30,
    ) -> None:
        if model_type not in MODEL_TYPES:
            raise ConversionError(
                f"model_type={model_type!r} is not supported; choose one of {', '.join(MODEL_TYPES)}"
            )
        if layout not in LAYOUTS:
            raise ConversionError(f"layout={layout!r} is not supported; choose one of {', '.join(LAYOUTS)}")
        if max_shard_bytes <= 0:
            raise ConversionError(f"max_shard_bytes={max_shard_bytes} must be positive")
        self.path = Path(path)
        self.model_type = model_type
        self.layout = layout
        self.max_shard_bytes = max_shard_bytes

    def write(self, cfg: ModelConfig, groups: Iterable[TensorGroup], manifest: dict) -> dict[str, str]:
        check_expressible(cfg, self.model_type)
        plans = group_plans(cfg, self.model_type, self.layout)
        order = list(plans)
        hashes: dict[str, str] = {}
        with atomic_directory(self.path) as scratch:
            shards: list[_ShardStream] = []  # finished ones are closed and hold their header only
            current: _ShardStream | None = None
            dtype = None
            seen = 0
            try:
                for group in groups:
                    if seen >= len(order) or group.name != order[seen]:
                        expected = order[seen] if seen < len(order) else "nothing"
                        raise ConversionError(f"HFWriter: got group {group.name}, expected {expected}")
                    seen += 1
                    check_group(cfg, group, "HFWriter input")
                    hashes.update({k: tensor_hash(v) for k, v in group.tensors.items()})
                    if group.name == "embed":
                        dtype = group.tensors["embed.weight"].dtype
                    for key, tensor in plans[group.name].to_hf(group.tensors).items():
                        size = tensor.numel() * tensor.element_size()
                        if current is None or (
                            current.header and current.nbytes + size > self.max_shard_bytes
                        ):
                            if current is not None:
                                current.finish()
                            current = _ShardStream(scratch, len(shards) + 1)
                            shards.append(current)
                        current.add(key, tensor)
                if seen != len(order):
                    raise ConversionError(f"HFWriter: input ended before group {order[seen]}")
                if current is not None:
                    current.finish()
            finally:
                if current is not None:
                    current.data.close()
            files = self._name_shards(scratch, shards)
            (scratch / CONFIG_FILE).write_text(
                json.dumps(hf_config_dict(cfg, self.model_type, dtype), indent=2, sort_keys=True) + "\n"
            )
            output = {
                "format": self.format,
                "model_type": self.model_type,
                "layout": self.layout,
                "files": files,
            }
            write_manifest(scratch, {**manifest, "output": output}, hashes)
        return hashes

    def _name_shards(self, scratch: Path, shards: list[_ShardStream]) -> list[str]:
        """Give the finished shards their HF names (now that their number is known) and write the index."""
        total = len(shards)
        names = (
            [SINGLE_FILE]
            if total == 1
            else [f"model-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)]
        )
        weight_map, total_size, total_parameters = {}, 0, 0
        for shard, name in zip(shards, names, strict=True):
            os.replace(shard.path, scratch / name)
            total_size += shard.nbytes
            for key, entry in shard.header.items():
                weight_map[key] = name
                numel = 1
                for n in entry["shape"]:
                    numel *= n
                total_parameters += numel
        if total > 1:
            index = {
                "metadata": {"total_parameters": total_parameters, "total_size": total_size},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (scratch / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return names
