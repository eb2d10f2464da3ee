"""Megatron-core ``torch_dist`` distributed checkpoints of GPT MoE models (local or TE layer specs).

megatron-core's ``dist_checkpointing`` writes a DCP checkpoint plus ``metadata.json`` (backend names) and
``common.pt`` (non-sharded state; Megatron-LM puts its ``args`` there). Its sharded state dict stacks the
decoder layers on a leading axis and the experts on the next one, so every tensor is read whole through DCP,
one layer slice at a time, without megatron-core (which cannot load on a CPU-only machine). Names, for
layer ``i`` of ``L``, experts ``E``, query groups ``G`` of ``Hq/G`` heads of size ``d``:

=====================================================================  =========================================
``embedding.word_embeddings.weight`` ``[V, D]``                         ``embed.weight``
``decoder.layers.self_attention.linear_qkv.layer_norm_weight[i]``       ``layers.i.attn_norm.weight``
``decoder.layers.self_attention.linear_qkv.weight[i]``                  ``q/k/v_proj``: rows per group ``g``:
  ``[G·(Hq/G + 2)·d, D]``                                                 ``Hq/G`` query heads, then k, then v
``decoder.layers.self_attention.linear_proj.weight[i]`` ``[D, Hq·d]``   ``layers.i.attn.o_proj.weight``
``decoder.layers.mlp.linear_fc1.layer_norm_weight[i]``                  ``layers.i.ffn_norm.weight``
``decoder.layers.mlp.router.weight[i]`` ``[E, D]``                      ``layers.i.moe.router.weight``
``decoder.layers.mlp.experts.experts.linear_fc1.weight[i]`` ``[E, 2F, D]`` ``w_gate_up`` ``[E, D, 2F]`` (gate first)
``decoder.layers.mlp.experts.experts.linear_fc2.weight[i]`` ``[E, D, F]``  ``w_down`` ``[E, F, D]``
``decoder.final_layernorm.weight``, ``output_layer.weight``             ``norm.weight``, ``lm_head.weight``
=====================================================================  =========================================

The layer-norm names are the ones megatron-core uses in checkpoints for both specs (the local spec's
``input_layernorm`` / ``pre_mlp_layernorm`` are saved under them). Semantics megatron-core shares with
sparsetron's model: RoPE rotate-half, softmax over the top-k router logits (``normalize_topk``), SwiGLU with the
gate half first, RMSNorm. The model config comes from Megatron-LM's ``args`` in ``common.pt`` when present,
else it must be given. Conversion is model-only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from sparsetron.checkpoint.convert.dcp_format import single_process
from sparsetron.checkpoint.convert.neutral import (
    ConversionError,
    TensorGroup,
    atomic_directory,
    check_group,
    tensor_hash,
    write_manifest,
)
from sparsetron.config import ModelConfig

LAYERS = "decoder.layers."
QKV = LAYERS + "self_attention.linear_qkv.weight"
ATTN_NORM = LAYERS + "self_attention.linear_qkv.layer_norm_weight"
PROJ = LAYERS + "self_attention.linear_proj.weight"
FFN_NORM = LAYERS + "mlp.linear_fc1.layer_norm_weight"
ROUTER = LAYERS + "mlp.router.weight"
FC1 = LAYERS + "mlp.experts.experts.linear_fc1.weight"
FC2 = LAYERS + "mlp.experts.experts.linear_fc2.weight"
EMBED, FINAL_NORM, OUTPUT = (
    "embedding.word_embeddings.weight",
    "decoder.final_layernorm.weight",
    "output_layer.weight",
)
#: What megatron-core's dist_checkpointing writes next to the DCP files.
METADATA = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}


def _check_supported(cfg: ModelConfig) -> None:
    unsupported = {
        "shared_expert_ffn_dim": cfg.shared_expert_ffn_dim,
        "attention_bias": cfg.attention_bias,
        "qk_norm": cfg.qk_norm,
        "tie_embeddings": cfg.tie_embeddings,
    }
    named = [f"model.{k}={v}" for k, v in unsupported.items() if v]
    if named or not cfg.normalize_topk:
        named += [] if cfg.normalize_topk else ["model.normalize_topk=false"]
        raise ConversionError(
            f"the megatron format maps the plain GPT MoE layer (GQA, RoPE, RMSNorm, SwiGLU experts, top-k softmax "
            f"router, untied output layer); this model has {', '.join(named)}"
        )


def model_config_from_args(args: object) -> ModelConfig:
    """Megatron-LM's ``args`` namespace (from ``common.pt``) as a ModelConfig."""
    get = args.__dict__.get if hasattr(args, "__dict__") else dict(args).get
    heads = get("num_attention_heads")
    return ModelConfig(
        vocab_size=get("padded_vocab_size") or get("vocab_size"),
        dim=get("hidden_size"),
        n_layers=get("num_layers"),
        n_heads=heads,
        n_kv_heads=get("num_query_groups") if get("group_query_attention") else heads,
        head_dim=get("kv_channels"),
        num_experts=get("num_experts"),
        top_k=get("moe_router_topk"),
        expert_ffn_dim=get("moe_ffn_hidden_size") or get("ffn_hidden_size"),
        rope_theta=float(get("rotary_base") or 10000),
        norm_eps=float(get("norm_epsilon") or 1e-5),
        tie_embeddings=not get("untie_embeddings_and_output_weights"),
    )


class MegatronReader:
    """A megatron-core ``torch_dist`` checkpoint directory read as neutral groups (see the module docstring).

    ``model_cfg``: the model the checkpoint holds, when ``common.pt`` carries no Megatron-LM ``args``. The
    decoder tensors are stored stacked over all layers, and DCP reads whole tensors, so the first decoder
    group loads every layer's attention and expert weights at once: this reader holds the decoder in memory
    (``--max-memory`` still bounds each group passed on).
    """

    format = "megatron"

    def __init__(self, path: str | Path, model_cfg: ModelConfig | None = None) -> None:
        self.path = Path(path)
        meta_file = self.path / "metadata.json"
        try:
            backend = json.loads(meta_file.read_text()).get("sharded_backend")
        except (OSError, ValueError) as exc:
            raise ConversionError(
                f"{meta_file}: missing or unreadable ({exc}); not a megatron checkpoint"
            ) from exc
        if backend != "torch_dist":
            raise ConversionError(f"{meta_file}: sharded_backend={backend!r}; only torch_dist is supported")
        self.cfg = model_cfg or self._config_from_common()
        _check_supported(self.cfg)
        self.metadata = dcp.FileSystemReader(self.path).read_metadata().state_dict_metadata
        self._check_shapes()

    def _config_from_common(self) -> ModelConfig:
        common = self.path / "common.pt"
        try:
            state = torch.load(common, map_location="cpu", weights_only=False)
        except (OSError, RuntimeError) as exc:
            raise ConversionError(
                f"{common}: unreadable ({exc}); pass the model config (--model-config)"
            ) from exc
        if not isinstance(state, dict) or "args" not in state:
            raise ConversionError(
                f"{common} holds no Megatron-LM args, so the model's shape is unknown; pass --model-config "
                "YAML (its model: section)"
            )
        return model_config_from_args(state["args"])

    def _expected(self) -> dict[str, tuple[int, ...]]:
        c = self.cfg
        d, layers, e, f = c.resolved_head_dim(), c.n_layers, c.num_experts, c.expert_ffn_dim
        return {
            EMBED: (c.vocab_size, c.dim),
            QKV: (layers, (c.n_heads + 2 * c.n_kv_heads) * d, c.dim),
            ATTN_NORM: (layers, c.dim),
            PROJ: (layers, c.dim, c.n_heads * d),
            FFN_NORM: (layers, c.dim),
            ROUTER: (layers, e, c.dim),
            FC1: (layers, e, 2 * f, c.dim),
            FC2: (layers, e, c.dim, f),
            FINAL_NORM: (c.dim,),
            OUTPUT: (c.vocab_size, c.dim),
        }

    def _check_shapes(self) -> None:
        for key, shape in self._expected().items():
            stored = self.metadata.get(key)
            if stored is None or not hasattr(stored, "size"):
                raise ConversionError(
                    f"{self.path}: tensor {key} is missing; not a GPT MoE checkpoint of this model"
                )
            if tuple(stored.size) != shape:
                raise ConversionError(
                    f"{self.path}: {key} is {tuple(stored.size)}, the model config needs {shape}; pass the config "
                    "the checkpoint was trained with"
                )

    def model_config(self) -> ModelConfig:
        return self.cfg

    def describe(self) -> dict:
        return {"format": self.format, "path": str(self.path), "torch": torch.__version__}

    def _load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        state = {k: torch.empty(self.metadata[k].size, dtype=self.metadata[k].properties.dtype) for k in keys}
        with single_process():
            dcp.load(
                state,
                storage_reader=dcp.FileSystemReader(self.path),
                planner=dcp.DefaultLoadPlanner(allow_partial_load=True),
            )
        return state

    def groups(self) -> Iterator[TensorGroup]:
        c = self.cfg
        yield self._checked(TensorGroup("embed", {"embed.weight": self._load([EMBED])[EMBED]}))
        stacked = self._load([QKV, ATTN_NORM, PROJ, FFN_NORM, ROUTER, FC1, FC2])
        d, groups = c.resolved_head_dim(), c.n_kv_heads
        per_group = c.n_heads // groups
        for i in range(c.n_layers):
            qkv = stacked[QKV][i].reshape(groups, per_group + 2, d, c.dim)
            p = f"layers.{i}."
            yield self._checked(
                TensorGroup(
                    f"layers.{i}",
                    {
                        p + "attn_norm.weight": stacked[ATTN_NORM][i].clone(),
                        p + "attn.q_proj.weight": qkv[:, :per_group].reshape(-1, c.dim).clone(),
                        p + "attn.k_proj.weight": qkv[:, per_group].reshape(-1, c.dim).clone(),
                        p + "attn.v_proj.weight": qkv[:, per_group + 1].reshape(-1, c.dim).clone(),
                        p + "attn.o_proj.weight": stacked[PROJ][i].clone(),
                        p + "ffn_norm.weight": stacked[FFN_NORM][i].clone(),
                        p + "moe.router.weight": stacked[ROUTER][i].clone(),
                        p + "moe.experts.w_gate_up": stacked[FC1][i].transpose(1, 2).contiguous(),
                        p + "moe.experts.w_down": stacked[FC2][i].transpose(1, 2).contiguous(),
                    },
                )
            )
        head = self._load([FINAL_NORM, OUTPUT])
        yield self._checked(
            TensorGroup("head", {"norm.weight": head[FINAL_NORM], "lm_head.weight": head[OUTPUT]})
        )

    def _checked(self, group: TensorGroup) -> TensorGroup:
        check_group(self.cfg, group, str(self.path))
        return group


def _extra_states(cfg: ModelConfig) -> dict[str, list]:
    """The per-module ``_extra_state`` objects megatron-core saves under its keys: ``[None]`` for modules without
    extra state (what megatron-core 0.16.1 writes for the local spec; its loader expects a sequence there)."""
    layers, experts = cfg.n_layers, cfg.num_experts
    out = {}
    for name in ("self_attention.linear_proj", "self_attention.linear_qkv"):
        for i in range(layers):
            out[f"{LAYERS}{name}._extra_state/shard_{i}_{layers}"] = [None]
    for name in ("linear_fc1", "linear_fc2"):
        for i in range(layers):
            for e in range(experts):
                key = f"{LAYERS}mlp.experts.experts.{name}._extra_state/shard_{i}.{e}_{layers}.{experts}"
                out[key] = [None]
    return out


class MegatronWriter:
    """Writes neutral groups as a megatron-core ``torch_dist`` checkpoint (module docstring's names), which
    megatron-core's ``dist_checkpointing.load`` reads into a GPTModel of the same configuration (verified on the
    GPU machine: ``benchmarks/megatron_fixtures.py --verify``). The layer-stacked tensors are assembled before
    the single DCP save, so this writer holds the whole model. Model-only."""

    format = "megatron"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def write(self, cfg: ModelConfig, groups: Iterable[TensorGroup], manifest: dict) -> dict[str, str]:
        _check_supported(cfg)
        tensors: dict[str, torch.Tensor] = {}
        for group in groups:
            check_group(cfg, group, "megatron writer input")
            tensors.update(group.tensors)
        hashes = {k: tensor_hash(v) for k, v in tensors.items()}
        layer = [f"layers.{i}." for i in range(cfg.n_layers)]

        def stack(name: str, transform=lambda t: t) -> torch.Tensor:
            return torch.stack([transform(tensors[p + name]) for p in layer])

        def qkv(p: str) -> torch.Tensor:
            d, groups_ = cfg.resolved_head_dim(), cfg.n_kv_heads
            q = tensors[p + "attn.q_proj.weight"].reshape(groups_, cfg.n_heads // groups_, d, cfg.dim)
            k = tensors[p + "attn.k_proj.weight"].reshape(groups_, 1, d, cfg.dim)
            v = tensors[p + "attn.v_proj.weight"].reshape(groups_, 1, d, cfg.dim)
            return torch.cat([q, k, v], dim=1).reshape(-1, cfg.dim)

        state = {
            EMBED: tensors["embed.weight"],
            QKV: torch.stack([qkv(p) for p in layer]),
            ATTN_NORM: stack("attn_norm.weight"),
            PROJ: stack("attn.o_proj.weight"),
            FFN_NORM: stack("ffn_norm.weight"),
            ROUTER: stack("moe.router.weight"),
            FC1: stack("moe.experts.w_gate_up", lambda t: t.transpose(1, 2)),
            FC2: stack("moe.experts.w_down", lambda t: t.transpose(1, 2)),
            FINAL_NORM: tensors["norm.weight"],
            OUTPUT: tensors["lm_head.weight"],
        }
        state = {k: v.contiguous() for k, v in state.items()} | _extra_states(cfg)
        with atomic_directory(self.path) as scratch:
            with single_process():
                dcp.save(state, storage_writer=dcp.FileSystemWriter(scratch))
            (scratch / "metadata.json").write_text(json.dumps(METADATA))
            torch.save({}, scratch / "common.pt")
            write_manifest(scratch, manifest, hashes)
        return hashes
