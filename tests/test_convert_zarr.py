"""The zarr checkpoint format: bit-exact round trips, chunk layout, dtype attributes and refusals."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from sparsetron.checkpoint.convert.neutral import (
    MANIFEST_FILE,
    ConversionError,
    TensorGroup,
    bounded,
    group_names,
    group_of,
    read_manifest,
    tensor_hash,
)
from sparsetron.checkpoint.convert.zarr_store import (
    FORMAT_VERSION,
    ZarrReader,
    ZarrWriter,
    array_path,
    canonical_name,
    default_chunks,
)
from sparsetron.config import AuxLoss, ModelConfig, RouterName
from sparsetron.model import Transformer

PLAIN = ModelConfig(
    vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, num_experts=4, top_k=2, expert_ffn_dim=16
)
# Everything else non-default too: a shared expert, another router and balance loss, other floats.
SHARED = dataclasses.replace(
    PLAIN,
    shared_expert_ffn_dim=24,
    router=RouterName.sigmoid_bias,
    aux_loss=AuxLoss.global_batch,
    norm_eps=1e-5,
    rope_theta=1e6,
)
GATE_UP = "layers.0.moe.experts.w_gate_up"


def model_tensors(cfg: ModelConfig, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of a freshly initialised model, in ``dtype``, with no two tensors alike."""
    torch.manual_seed(seed)
    state = Transformer(cfg).to(dtype).state_dict()
    # Norm weights initialise to ones and biases to zeros: perturb so a swapped or zeroed tensor shows.
    return {k: (v + 0.01 * torch.randn_like(v)).to(dtype) for k, v in state.items()}


def as_groups(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> Iterator[TensorGroup]:
    """``tensors`` as neutral groups in streaming order."""
    for name in group_names(cfg):
        yield TensorGroup(name, {k: v for k, v in tensors.items() if group_of(k) == name})


def read_all(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    reader = ZarrReader(path)
    seen: list[str] = []
    tensors: dict[str, torch.Tensor] = {}
    for group in reader.groups():
        seen.append(group.name)
        tensors.update(group.tensors)
    assert seen == group_names(reader.model_config())
    return reader.model_config(), tensors


def write(path: Path, cfg: ModelConfig, tensors: dict[str, torch.Tensor], **kwargs) -> dict[str, str]:
    return ZarrWriter(path, **kwargs).write(cfg, as_groups(cfg, tensors), {"source": {"format": "test"}})


def edit_json(path: Path, change) -> None:
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


@pytest.fixture(scope="module")
def fp32_store(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = model_tensors(PLAIN, torch.float32)
    path = tmp_path_factory.mktemp("zarr") / "fp32.zarr"
    write(path, PLAIN, tensors)
    return path, tensors


def fresh_copy(store: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    return copy


@pytest.mark.parametrize(
    ("cfg", "dtype"), [(PLAIN, torch.float32), (SHARED, torch.bfloat16), (SHARED, torch.float32)]
)
def test_neutral_zarr_neutral_is_bit_exact(tmp_path, cfg, dtype):
    tensors = model_tensors(cfg, dtype)
    written = write(tmp_path / "out.zarr", cfg, tensors)
    want = {k: tensor_hash(v) for k, v in tensors.items()}
    assert written == want
    assert read_manifest(tmp_path / "out.zarr")["tensors"] == want
    got_cfg, got = read_all(tmp_path / "out.zarr")
    assert got_cfg == cfg
    assert list(got) == list(tensors)
    assert {k: v.dtype for k, v in got.items()} == {k: dtype for k in tensors}
    assert {k: tensor_hash(v) for k, v in got.items()} == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zarr_neutral_zarr_is_bit_exact(tmp_path, dtype):
    first = tmp_path / "first.zarr"
    write(first, SHARED, model_tensors(SHARED, dtype, seed=3), shard_layout={GATE_UP: (2, 32, 32)})
    reader = ZarrReader(first)
    second = tmp_path / "second.zarr"
    rewritten = ZarrWriter(second, shard_layout={GATE_UP: (2, 32, 32)}).write(
        reader.model_config(), reader.groups(), {"source": reader.describe()}
    )
    assert rewritten == read_manifest(first)["tensors"]
    _, again = read_all(second)
    assert {k: tensor_hash(v) for k, v in again.items()} == rewritten
    for name in rewritten:
        a, b = zarr.open_array(first / array_path(name)), zarr.open_array(second / array_path(name))
        assert (a.dtype, a.chunks, dict(a.attrs)) == (b.dtype, b.chunks, dict(b.attrs))
        assert np.array_equal(a[...], b[...])


def test_reader_yields_groups_lazily(fp32_store, tmp_path):
    path = fresh_copy(fp32_store[0], tmp_path)
    groups = ZarrReader(path).groups()
    assert next(groups).name == "embed"
    # Damaging layer 1 after the first group was read must only show when layer 1 is read.
    shutil.rmtree(path / "layers" / "1" / "attn" / "q_proj" / "weight" / "c")
    assert next(groups).name == "layers.0"
    with pytest.raises(ConversionError, match="layers/1/attn/q_proj/weight"):
        next(groups)


def test_bf16_arrays_hold_bit_patterns_with_dtype_attribute(tmp_path):
    tensors = model_tensors(PLAIN, torch.bfloat16)
    write(tmp_path / "bf16.zarr", PLAIN, tensors)
    root = zarr.open_group(tmp_path / "bf16.zarr", mode="r")
    for name, tensor in tensors.items():
        array = root[array_path(name)]
        assert array.dtype == np.uint16
        assert dict(array.attrs) == {"dtype": "bfloat16"}
        assert np.array_equal(array[...], tensor.view(torch.int16).numpy().view(np.uint16))


def test_fp32_arrays_are_native_and_group_attributes_hold_the_config(fp32_store):
    path, tensors = fp32_store
    root = zarr.open_group(path, mode="r")
    attrs = dict(root.attrs)
    assert attrs["format_version"] == FORMAT_VERSION
    assert attrs["model_config"]["dim"] == 32 and attrs["model_config"]["router"] == "softmax_topk"
    json.dumps(attrs)
    for name, tensor in tensors.items():
        array = root[array_path(name)]
        assert array.dtype == np.float32 and array.attrs["dtype"] == "float32"
        assert np.array_equal(array[...], tensor.numpy())


def test_array_paths_map_canonical_names_one_to_one():
    for name in model_tensors(SHARED, torch.float32):
        assert canonical_name(array_path(name)) == name
    assert array_path(GATE_UP) == "layers/0/moe/experts/w_gate_up"


def test_chunks_follow_the_shard_layout(tmp_path):
    layout = {GATE_UP: (2, 32, 32), "layers.1.moe.experts.w_down": (1, 16, 32), "embed.weight": (16, 32)}
    write(tmp_path / "s.zarr", SHARED, model_tensors(SHARED, torch.bfloat16), shard_layout=layout)
    root = zarr.open_group(tmp_path / "s.zarr", mode="r")
    for name, box in layout.items():
        array = root[array_path(name)]
        assert array.chunks == box
        assert array.nchunks_initialized == array.nchunks == np.prod(np.ceil(np.divide(array.shape, box)))
    assert root[array_path("layers.1.moe.experts.w_gate_up")].chunks == (4, 32, 32)
    assert root[array_path("layers.0.moe.experts.w_down")].chunks == (4, 16, 32)
    manifest = read_manifest(tmp_path / "s.zarr")
    assert manifest["shard_layout"][GATE_UP] == [2, 32, 32]


def test_default_chunks_split_leading_dimensions_above_the_cap():
    assert default_chunks((8, 1024, 1024), 2, cap=4 * 2**20) == (2, 1024, 1024)
    assert default_chunks((8, 1024, 1024), 2, cap=2**20) == (1, 512, 1024)
    assert default_chunks((64, 32), 4) == (64, 32)
    assert default_chunks((3, 0), 4) == (3, 1)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({GATE_UP: (2, 32)}, "does not fit its shape"),
        ({GATE_UP: (8, 32, 32)}, "does not fit"),
        ({"layers.9.x": (1,)}, "layers.9.x"),
    ],
)
def test_bad_shard_layout_is_refused(tmp_path, layout, message):
    with pytest.raises(ConversionError, match=message):
        write(tmp_path / "bad.zarr", PLAIN, model_tensors(PLAIN, torch.float32), shard_layout=layout)
    assert list(tmp_path.iterdir()) == []


def test_missing_array_is_named(fp32_store, tmp_path):
    path = fresh_copy(fp32_store[0], tmp_path)
    shutil.rmtree(path / "layers" / "1" / "moe" / "experts" / "w_down")
    with pytest.raises(ConversionError, match=r"array layers/1/moe/experts/w_down .*missing.*convert"):
        ZarrReader(path)


def test_extra_array_is_refused(fp32_store, tmp_path):
    path = fresh_copy(fp32_store[0], tmp_path)
    zarr.open_group(path, mode="r+").create_array("layers/5/stray", shape=(2,), dtype="float32")
    with pytest.raises(ConversionError, match="layers/5/stray"):
        ZarrReader(path)


@pytest.mark.parametrize(
    ("attr", "message"),
    [
        ("float16", "stores float32 but its dtype attribute 'float16'"),
        ("bf17", "dtype attribute 'bf17'"),
        (None, "None"),
    ],
)
def test_wrong_dtype_attribute_is_named(fp32_store, tmp_path, attr, message):
    path = fresh_copy(fp32_store[0], tmp_path)

    def change(record):
        if attr is None:
            del record["attributes"]["dtype"]
        else:
            record["attributes"]["dtype"] = attr

    edit_json(path / "layers" / "0" / "attn" / "k_proj" / "weight" / "zarr.json", change)
    with pytest.raises(ConversionError, match="layers/0/attn/k_proj/weight") as info:
        read_all(path)
    assert message in str(info.value)


def test_bf16_attribute_on_a_float_array_is_refused(fp32_store, tmp_path):
    path = fresh_copy(fp32_store[0], tmp_path)
    edit_json(path / "embed" / "weight" / "zarr.json", lambda r: r["attributes"].update(dtype="bfloat16"))
    with pytest.raises(
        ConversionError, match="embed/weight stores float32 but its dtype attribute 'bfloat16' needs uint16"
    ):
        read_all(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.pop("model_config"), "model_config is missing"),
        (lambda a: a.update(model_config="dim=32"), "must be a mapping"),
        (lambda a: a["model_config"].pop("n_layers"), r"lacks keys \['n_layers'\]"),
        (lambda a: a["model_config"].update(dim="wide"), "model_config is invalid"),
        (lambda a: a["model_config"].update(router="nearest_expert"), "model_config is invalid"),
        (lambda a: a["model_config"].update(colour="blue"), "model_config is invalid"),
        (lambda a: a.update(format_version=99), "format_version=99"),
    ],
)
def test_missing_or_garbled_config_attribute_is_refused(fp32_store, tmp_path, change, message):
    path = fresh_copy(fp32_store[0], tmp_path)
    edit_json(path / "zarr.json", lambda r: change(r["attributes"]))
    with pytest.raises(ConversionError, match=message):
        ZarrReader(path)


def test_config_that_does_not_match_the_arrays_is_refused(fp32_store, tmp_path):
    path = fresh_copy(fp32_store[0], tmp_path)
    edit_json(path / "zarr.json", lambda r: r["attributes"]["model_config"].update(dim=48))
    with pytest.raises(ConversionError, match="shape"):
        read_all(path)


def test_truncated_chunk_is_named(fp32_store, tmp_path):
    path = fresh_copy(fp32_store[0], tmp_path)
    chunk = path / "layers" / "0" / "attn" / "o_proj" / "weight" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-7])
    with pytest.raises(
        ConversionError, match=r"layers/0/attn/o_proj/weight: a chunk cannot be decoded .*truncated"
    ):
        read_all(path)


def test_missing_chunk_file_is_not_read_as_zeros(fp32_store, tmp_path):
    path = fresh_copy(fp32_store[0], tmp_path)
    (path / "norm" / "weight" / "c" / "0").unlink()
    with pytest.raises(ConversionError, match=r"norm/weight has 1 of 1 chunk files missing"):
        read_all(path)


def test_contents_changed_after_conversion_fail_the_manifest_hash(fp32_store, tmp_path):
    path = fresh_copy(fp32_store[0], tmp_path)
    array = zarr.open_array(path / "lm_head" / "weight", mode="r+")
    array[0, 0] = array[0, 0] + 1
    with pytest.raises(ConversionError, match="lm_head/weight: contents do not match the hash"):
        read_all(path)
    # Without the manifest check the edited value reads back as written.
    reader = ZarrReader(path, verify=False)
    head = next(g for g in reader.groups() if g.name == "head")
    assert head.tensors["lm_head.weight"][0, 0] == fp32_store[1]["lm_head.weight"][0, 0] + 1


def test_failed_write_leaves_no_output(tmp_path):
    tensors = model_tensors(PLAIN, torch.float32)

    def broken() -> Iterator[TensorGroup]:
        groups = as_groups(PLAIN, tensors)
        yield next(groups)
        yield next(groups)
        raise OSError("source disk went away")

    with pytest.raises(OSError, match="went away"):
        ZarrWriter(tmp_path / "out.zarr").write(PLAIN, broken(), {})
    assert list(tmp_path.iterdir()) == []


def test_incomplete_or_misordered_input_is_refused(tmp_path):
    tensors = model_tensors(PLAIN, torch.float32)
    groups = list(as_groups(PLAIN, tensors))
    with pytest.raises(ConversionError, match=r"ended before groups \['layers.1', 'head'\]"):
        ZarrWriter(tmp_path / "short.zarr").write(PLAIN, groups[:2], {})
    with pytest.raises(ConversionError, match="got group layers.1 at position 1, expected layers.0"):
        ZarrWriter(tmp_path / "order.zarr").write(PLAIN, [groups[0], groups[2], groups[1], groups[3]], {})
    wrong = TensorGroup("embed", {"embed.weight": torch.zeros(65, 32)})
    with pytest.raises(ConversionError, match="embed.weight has shape"):
        ZarrWriter(tmp_path / "shape.zarr").write(PLAIN, [wrong], {})
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_not_overwritten(fp32_store):
    path, tensors = fp32_store
    before = read_manifest(path)
    with pytest.raises(ConversionError, match="already exists"):
        write(path, PLAIN, tensors)
    assert read_manifest(path) == before
    assert (path / MANIFEST_FILE).exists()


def test_max_memory_bound_refuses_an_oversized_group(tmp_path, fp32_store):
    tensors = model_tensors(SHARED, torch.float32)
    groups = list(as_groups(SHARED, tensors))
    largest = max(g.nbytes for g in groups)
    with pytest.raises(ConversionError, match="group layers.0 holds .* more than --max-memory"):
        ZarrWriter(tmp_path / "capped.zarr").write(SHARED, bounded(iter(groups), largest - 1), {})
    assert list(tmp_path.iterdir()) == []
    ZarrWriter(tmp_path / "fits.zarr").write(SHARED, bounded(iter(groups), largest), {})
    # Reading through the bound: the reader's groups are no larger than the writer's.
    reader = ZarrReader(fp32_store[0])
    assert [g.name for g in bounded(reader.groups(), largest)] == group_names(PLAIN)
