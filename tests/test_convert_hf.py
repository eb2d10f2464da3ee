"""HF checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE) through the neutral form, against transformers itself.

Oracles: the HF model that wrote the checkpoint (same logits from our model built on what HFReader read),
transformers' ``from_pretrained`` / ``AutoConfig`` of what HFWriter wrote, and the bytes of the input
safetensors (a round trip rewrites every tensor bit for bit, in the layout ``save_pretrained`` uses).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_model import HF_CASES, hf_model, randomize_hf

from sparsetron.checkpoint.convert.hf import INDEX_FILE, HFReader, HFWriter
from sparsetron.checkpoint.convert.neutral import (
    MANIFEST_FILE,
    ConversionError,
    TensorGroup,
    group_names,
    read_manifest,
    tensor_hash,
)
from sparsetron.model import Transformer

transformers = pytest.importorskip("transformers")

KINDS = sorted(HF_CASES)
TOKENS_BS = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(3))
#: Small enough that every tiny checkpoint is split over several shards.
SHARD = "20KB"


def saved_hf(
    tmp_path: Path, kind: str, *, shard: str | None = None, fused: bool = False, dtype=torch.float32
) -> tuple[torch.nn.Module, Path]:
    """A randomized tiny HF model of ``kind`` and the directory ``save_pretrained`` wrote it to."""
    torch.manual_seed(0)
    model = hf_model(kind, HF_CASES[kind]).eval()
    randomize_hf(model)
    model = model.to(dtype)
    path = tmp_path / f"hf-{kind}"
    options = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, save_original_format=not fused, **options)
    return model, path


def safetensors_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def all_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not iterable
                out[key] = handle.get_tensor(key)
    return out


def our_model(reader: HFReader) -> Transformer:
    cfg = reader.model_config()
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    state = {}
    for group in reader.groups():
        state.update(group.tensors)
    model.load_state_dict(state, strict=True)
    return model.eval()


def hf_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS_BS, use_cache=False).logits


def load_hf(path: Path) -> torch.nn.Module:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", experts_implementation="eager", output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    return model.eval()


# --------------------------------------------------------------------------------------------------------
# Reading: same logits as the HF model
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("kind", KINDS)
def test_reader_gives_the_hf_models_logits(tmp_path, kind, sharded):
    hf, path = saved_hf(tmp_path, kind, shard=SHARD if sharded else None)
    assert len(safetensors_files(path)) > 1 if sharded else (path / "model.safetensors").is_file()
    reader = HFReader(path)
    assert reader.layout == "per_expert"  # what save_pretrained of transformers 5 writes
    expected_cfg = HF_CASES[kind]
    cfg = reader.model_config()
    for field in [
        "vocab_size",
        "dim",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "num_experts",
        "top_k",
        "expert_ffn_dim",
        "shared_expert_ffn_dim",
        "normalize_topk",
        "rope_theta",
        "norm_eps",
        "tie_embeddings",
        "attention_bias",
        "qk_norm",
    ]:
        assert getattr(cfg, field) == getattr(expected_cfg, field), field
    assert cfg.resolved_head_dim() == expected_cfg.resolved_head_dim()
    got = our_model(reader)(TOKENS_BS).logits_BSV
    assert (got - hf_logits(hf)).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_reader_reads_the_fused_expert_layout(tmp_path, kind):
    hf, path = saved_hf(tmp_path, kind, shard=SHARD, fused=True)
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in all_tensors(path))
    reader = HFReader(path)
    assert reader.layout == "fused"
    assert (our_model(reader)(TOKENS_BS).logits_BSV - hf_logits(hf)).abs().max() <= 1e-5


def test_reader_groups_stream_one_layer_at_a_time(tmp_path):
    _, path = saved_hf(tmp_path, "qwen2_moe", shard=SHARD)
    reader = HFReader(path)
    cfg = reader.model_config()
    stream = reader.groups()
    first = next(stream)
    assert first.name == "embed" and set(first.tensors) == {"embed.weight"}
    assert [first.name] + [g.name for g in stream] == group_names(cfg)


def test_reader_accepts_legacy_config_keys(tmp_path):
    """Pre-5 configs: top-level rope_theta, rope_scaling null, Qwen3's expert count as num_experts."""
    _, path = saved_hf(tmp_path, "qwen3_moe")
    config = json.loads((path / "config.json").read_text())
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"] * 3
    config["rope_scaling"] = None
    config["num_experts"] = config.pop("num_local_experts")
    (path / "config.json").write_text(json.dumps(config))
    cfg = HFReader(path).model_config()
    assert cfg.rope_theta == HF_CASES["qwen3_moe"].rope_theta * 3
    assert cfg.num_experts == HF_CASES["qwen3_moe"].num_experts


# --------------------------------------------------------------------------------------------------------
# Writing: byte-identical round trips that transformers loads
# --------------------------------------------------------------------------------------------------------


def assert_same_tensors(source: Path, output: Path) -> None:
    before, after = all_tensors(source), all_tensors(output)
    assert sorted(before) == sorted(after)
    for key, tensor in before.items():
        other = after[key]
        assert (other.dtype, other.shape) == (tensor.dtype, tensor.shape), key
        assert tensor_hash(other) == tensor_hash(tensor), key  # dtype, shape and bytes


@pytest.mark.parametrize("fused", [False, True], ids=["per_expert", "fused"])
@pytest.mark.parametrize("kind", KINDS)
def test_hf_to_neutral_to_hf_is_byte_identical_and_loads(tmp_path, kind, fused):
    hf, path = saved_hf(tmp_path, kind, shard=SHARD, fused=fused)
    reader = HFReader(path)
    out = tmp_path / "out"
    writer = HFWriter(out, kind, layout=reader.layout, max_shard_bytes=20_000)
    hashes = writer.write(reader.model_config(), reader.groups(), {"source": reader.describe()})

    assert_same_tensors(path, out)
    shards = safetensors_files(out)
    assert len(shards) > 1
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", f.name) for f in shards)
    for file in shards:  # payload within the bound, or one tensor too large to share a shard
        with safe_open(str(file), framework="pt") as handle:
            sizes = [handle.get_tensor(k).nbytes for k in handle.keys()]  # noqa: SIM118
        assert sum(sizes) <= 20_000 or len(sizes) == 1, (file.name, sizes)
    index = json.loads((out / INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == {f.name for f in shards}
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in all_tensors(out).values()
    )
    manifest = read_manifest(out)
    assert manifest["tensors"] == hashes
    assert manifest["source"]["model_type"] == kind and manifest["output"]["layout"] == reader.layout

    config = transformers.AutoConfig.from_pretrained(out)
    original = transformers.AutoConfig.from_pretrained(path)
    assert config.model_type == kind
    for key in [
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "num_experts",
        "num_experts_per_tok",
        "rms_norm_eps",
        "tie_word_embeddings",
        "head_dim",
        "rope_parameters",
    ]:
        assert getattr(config, key, None) == getattr(original, key, None), key
    torch.testing.assert_close(hf_logits(load_hf(out)), hf_logits(hf), atol=0, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_round_trip_is_byte_identical(tmp_path, kind):
    _, path = saved_hf(tmp_path, kind, shard=SHARD, dtype=torch.bfloat16)
    reader = HFReader(path)
    groups = list(reader.groups())
    assert all(t.dtype == torch.bfloat16 for g in groups for t in g.tensors.values())
    out = tmp_path / "out"
    HFWriter(out, kind, max_shard_bytes=10_000).write(reader.model_config(), iter(groups), {})
    assert_same_tensors(path, out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_hf(out).dtype == torch.bfloat16


@pytest.mark.parametrize("kind", KINDS)
def test_sparsetron_model_written_as_hf_gives_the_same_logits(tmp_path, kind):
    """Neutral → HF from our own model: transformers computes what sparsetron computes."""
    torch.manual_seed(1)
    ours = Transformer(replace(HF_CASES[kind], init_std=0.2)).eval()
    state = ours.state_dict()
    groups = []
    for name in group_names(ours.cfg):
        if name == "head":
            keys = [k for k in state if not k.startswith(("embed.", "layers."))]
        else:
            keys = [k for k in state if k.startswith(name + ".")]
        groups.append(TensorGroup(name, {k: state[k] for k in keys}))
    out = tmp_path / "out"
    HFWriter(out, kind).write(ours.cfg, groups, {})
    assert (out / "model.safetensors").is_file() and not (out / INDEX_FILE).exists()
    with torch.no_grad():
        expected = ours(TOKENS_BS).logits_BSV
    assert (hf_logits(load_hf(out)) - expected).abs().max() <= 1e-5
    assert HFReader(out).model_config() == ours.cfg  # the config survives HF → neutral unchanged


# --------------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------------


def rewrite_tensors(file: Path, edit) -> None:
    with safe_open(str(file), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_missing_shard_is_named(tmp_path):
    _, path = saved_hf(tmp_path, "mixtral", shard=SHARD)
    victim = safetensors_files(path)[2]
    victim.unlink()
    with pytest.raises(ConversionError, match=rf"{re.escape(victim.name)}.*missing"):
        HFReader(path)


def test_key_listed_in_index_but_absent_from_its_shard_is_named(tmp_path):
    _, path = saved_hf(tmp_path, "mixtral", shard=SHARD)
    index = json.loads((path / INDEX_FILE).read_text())
    key = "model.layers.1.self_attn.q_proj.weight"
    file = path / index["weight_map"][key]
    rewrite_tensors(file, lambda t: t.pop(key))
    with pytest.raises(ConversionError, match=rf"{re.escape(file.name)}: tensor {re.escape(key)}"):
        HFReader(path)


def test_unknown_key_is_named_with_its_file(tmp_path):
    _, path = saved_hf(tmp_path, "qwen3_moe")
    rewrite_tensors(
        path / "model.safetensors", lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.ones(3)})
    )
    with pytest.raises(
        ConversionError, match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.extra\.weight"
    ):
        HFReader(path)


def test_missing_key_is_named(tmp_path):
    _, path = saved_hf(tmp_path, "qwen2_moe")
    key = "model.layers.1.mlp.experts.5.up_proj.weight"
    rewrite_tensors(path / "model.safetensors", lambda t: t.pop(key))
    with pytest.raises(ConversionError, match=rf"tensor {re.escape(key)} is missing"):
        HFReader(path)


def test_wrong_shape_is_named_with_its_file(tmp_path):
    _, path = saved_hf(tmp_path, "mixtral")
    key = "model.layers.0.block_sparse_moe.experts.1.w2.weight"
    rewrite_tensors(path / "model.safetensors", lambda t: t.update({key: torch.zeros(32, 47)}))
    with pytest.raises(
        ConversionError, match=rf"model\.safetensors: tensor {re.escape(key)} has shape \[32, 47\]"
    ):
        HFReader(path)


def test_truncated_safetensors_is_named(tmp_path):
    _, path = saved_hf(tmp_path, "qwen2_moe", shard=SHARD)
    victim = safetensors_files(path)[-1]
    os.truncate(victim, victim.stat().st_size - 7)
    with pytest.raises(ConversionError, match=rf"{re.escape(victim.name)}: not a valid safetensors file"):
        HFReader(path)


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is KeyError:
            config.pop(key)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


BAD_CONFIGS = {
    "model_type": ("mixtral", {"model_type": "llama"}, r"model_type='llama' is not supported"),
    "rope-yarn": (
        "qwen3_moe",
        {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}},
        r"rope_parameters\.rope_type='yarn'",
    ),
    "legacy-rope-scaling": (
        "mixtral",
        {"rope_scaling": {"type": "linear", "factor": 2.0}},
        r"rope_scaling\.rope_type='linear'",
    ),
    "sliding-window": ("mixtral", {"sliding_window": 4096}, r"sliding_window=4096"),
    "qwen-sliding-window": ("qwen2_moe", {"use_sliding_window": True}, r"use_sliding_window=True"),
    "decoder-sparse-step": ("qwen2_moe", {"decoder_sparse_step": 2}, r"decoder_sparse_step=2"),
    "mlp-only-layers": ("qwen3_moe", {"mlp_only_layers": [1]}, r"mlp_only_layers=\[1\]"),
    "qwen3-attention-bias": ("qwen3_moe", {"attention_bias": True}, r"attention_bias=True.*o_proj"),
    "activation": ("qwen2_moe", {"hidden_act": "gelu"}, r"hidden_act='gelu'"),
    "missing-key": ("mixtral", {"hidden_size": KeyError}, r"'hidden_size' is missing"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_unsupported_config_is_refused_naming_the_key(tmp_path, case):
    kind, changes, message = BAD_CONFIGS[case]
    _, path = saved_hf(tmp_path, kind)
    edit_config(path, **changes)
    with pytest.raises(ConversionError, match=rf"config\.json: .*{message}"):
        HFReader(path)


def test_directory_without_weights_is_refused(tmp_path):
    _, path = saved_hf(tmp_path, "mixtral")
    (path / "model.safetensors").unlink()
    with pytest.raises(
        ConversionError, match=r"neither model\.safetensors nor model\.safetensors\.index\.json"
    ):
        HFReader(path)


@pytest.mark.parametrize(
    "kind, changes, message",
    [
        (
            "mixtral",
            {"shared_expert_ffn_dim": 16},
            r"shared_expert_ffn_dim=16 \(Mixtral has no shared expert\)",
        ),
        ("mixtral", {"normalize_topk": False}, r"normalize_topk=false"),
        ("qwen2_moe", {"shared_expert_ffn_dim": 0}, r"sigmoid-gated shared expert"),
        ("qwen3_moe", {"qk_norm": False}, r"qk_norm=false"),
        ("qwen3_moe", {"router": "sigmoid_bias"}, r"router=sigmoid_bias"),
    ],
)
def test_writer_refuses_what_the_model_type_cannot_express(tmp_path, kind, changes, message):
    cfg = replace(HF_CASES[kind], **changes)
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=message):
        HFWriter(out, kind).write(cfg, iter([]), {})
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_failing_write_leaves_no_output(tmp_path):
    _, path = saved_hf(tmp_path, "qwen2_moe")
    reader = HFReader(path)

    def groups_then_bad_shape():
        for group in reader.groups():
            if group.name == "layers.1":
                group.tensors["layers.1.moe.router.weight"] = torch.zeros(5, 32)
            yield group

    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"layers\.1\.moe\.router\.weight has shape \(5, 32\)"):
        HFWriter(out, "qwen2_moe", max_shard_bytes=10_000).write(
            reader.model_config(), groups_then_bad_shape(), {}
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no output, no scratch directory

    def truncated_stream():
        stream = reader.groups()
        yield next(stream)

    with pytest.raises(ConversionError, match=r"input ended before group layers\.0"):
        HFWriter(out, "qwen2_moe").write(reader.model_config(), truncated_stream(), {})
    assert not out.exists()


def test_writer_refuses_an_existing_output(tmp_path):
    _, path = saved_hf(tmp_path, "mixtral")
    reader = HFReader(path)
    with pytest.raises(ConversionError, match="already exists"):
        HFWriter(path, "mixtral").write(reader.model_config(), reader.groups(), {})
    assert (path / "model.safetensors").is_file() and not (path / MANIFEST_FILE).exists()


def test_tied_checkpoint_that_also_stores_the_head(tmp_path):
    """Some tied checkpoints carry lm_head.weight as a copy of the embedding: accepted when equal, else refused."""
    hf, path = saved_hf(tmp_path, "qwen3_moe")
    file = path / "model.safetensors"
    rewrite_tensors(file, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    reader = HFReader(path)
    assert (our_model(reader)(TOKENS_BS).logits_BSV - hf_logits(hf)).abs().max() <= 1e-5
    rewrite_tensors(file, lambda t: t["lm_head.weight"].add_(1.0))
    with pytest.raises(ConversionError, match=r"model\.safetensors: tensor lm_head\.weight differs"):
        list(HFReader(path).groups())
