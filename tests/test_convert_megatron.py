"""Megatron-core torch_dist checkpoints: a fixture written by megatron-core 0.16.1 on a GPU
(benchmarks/megatron_fixtures.py) reads on the CPU into sparsetron's model with megatron's logits; what the
megatron writer produces reads back bit for bit (and megatron-core loads it: checked on the GPU machine)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from launch_env import REPO
from typer.testing import CliRunner

from sparsetron.checkpoint.convert.dcp_format import DCPReader, DCPWriter
from sparsetron.checkpoint.convert.megatron_format import MegatronReader, MegatronWriter
from sparsetron.checkpoint.convert.neutral import ConversionError, tensor_hash
from sparsetron.checkpoint.convert.run import check, convert, detect_format
from sparsetron.cli import app
from sparsetron.config import load_config
from sparsetron.model import Transformer

FIXTURE = REPO / "tests" / "fixtures" / "megatron"
CHECKPOINT = FIXTURE / "torch_dist"


@pytest.fixture(scope="module")
def cfg():
    return load_config([FIXTURE / "model.yaml"]).model


def _hashes(reader) -> dict[str, str]:
    return {k: tensor_hash(v) for g in reader.groups() for k, v in g.tensors.items()}


def test_megatron_checkpoint_gives_megatrons_logits(cfg):
    assert json.loads((FIXTURE / "model.json").read_text())["megatron_core"] == "0.16.1"
    assert detect_format(CHECKPOINT) == "megatron"
    state = {k: v for g in MegatronReader(CHECKPOINT, cfg).groups() for k, v in g.tensors.items()}
    model = Transformer(cfg).eval()
    model.load_state_dict(state)
    reference = torch.load(FIXTURE / "logits.pt")
    with torch.no_grad():
        logits = model(reference["tokens"]).logits_BSV
    # megatron-core's fp32 forward on an H100 against ours on the CPU.
    assert (logits - reference["logits"]).abs().max() <= 1e-5


def test_megatron_to_dcp_to_megatron_is_bit_exact(cfg, tmp_path):
    convert(MegatronReader(CHECKPOINT, cfg), DCPWriter(tmp_path / "dcp"))
    hashes = convert(DCPReader(tmp_path / "dcp"), MegatronWriter(tmp_path / "megatron"))
    written = MegatronReader(tmp_path / "megatron", cfg)
    assert hashes == _hashes(written) == _hashes(MegatronReader(CHECKPOINT, cfg))
    assert check(MegatronReader(CHECKPOINT, cfg), written) == []
    # The same keys and global shapes megatron-core wrote, so its own loader finds everything it asks for.
    ours = written.metadata
    theirs = MegatronReader(CHECKPOINT, cfg).metadata
    assert ours.keys() == theirs.keys()
    assert all(getattr(ours[k], "size", None) == getattr(theirs[k], "size", None) for k in ours)
    assert (
        json.loads((tmp_path / "megatron" / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    )


def test_cli_reads_megatron_with_a_model_config(tmp_path):
    result = CliRunner().invoke(
        app,
        ["convert", str(CHECKPOINT), str(tmp_path / "out"), "--to", "hf", "--model-type", "mixtral",
         "--model-config", str(FIXTURE / "model.yaml"), "--check"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    no_config = CliRunner().invoke(app, ["convert", str(CHECKPOINT), str(tmp_path / "x"), "--to", "dcp"])
    assert no_config.exit_code == 2 and "holds no Megatron-LM args" in " ".join(no_config.output.split())


def test_mismatches_are_named(cfg, tmp_path):
    wrong = cfg.__class__(**{**cfg.__dict__, "expert_ffn_dim": 64})
    with pytest.raises(
        ConversionError, match=r"linear_fc1.weight is \(2, 4, 192, 64\), the model config needs"
    ):
        MegatronReader(CHECKPOINT, wrong)
    broken = tmp_path / "broken"
    shutil.copytree(CHECKPOINT, broken)
    (broken / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr"}))
    with pytest.raises(ConversionError, match="only torch_dist is supported"):
        MegatronReader(broken, cfg)
    shared = cfg.__class__(**{**cfg.__dict__, "shared_expert_ffn_dim": 32})
    with pytest.raises(ConversionError, match="shared_expert_ffn_dim=32"):
        MegatronWriter(tmp_path / "y").write(shared, [], {})
    assert not (tmp_path / "y").exists()
