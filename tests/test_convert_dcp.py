"""Checkpoint conversion through sparsetron's DCP format and the `sparsetron convert` command: a training
checkpoint saved at one layout reads as whole tensors, converts to a model-only checkpoint bit for bit, and a
run at another layout starts from it (`checkpoint.init_from`); the bound, atomicity and error messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch_env import REPO, clean_env
from typer.testing import CliRunner

from sparsetron.checkpoint.convert.dcp_format import DCPReader, DCPWriter
from sparsetron.checkpoint.convert.neutral import (
    MANIFEST_FILE,
    ConversionError,
    TensorGroup,
    group_names,
    read_manifest,
    tensor_hash,
)
from sparsetron.checkpoint.convert.run import check, convert, detect_format
from sparsetron.cli import app

DEMO = str(REPO / "configs" / "train" / "demo.yaml")
QUICK = ["model.preset=tiny", "train.seq_len=128", "train.global_batch_tokens=1024", "train.warmup_steps=1"]


def _train(run_dir: Path, nproc: int, *overrides: str) -> Path:
    proc = subprocess.run(
        [sys.executable, "-m", "sparsetron.cli", "train", DEMO, *QUICK, f"train.run_dir={run_dir}", *overrides,
         "--nproc", str(nproc)],
        capture_output=True, text=True, timeout=300, env=clean_env(), cwd=run_dir.parent,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return sorted((run_dir / "checkpoints").glob("step-*"))[-1]


def _hashes(reader) -> dict[str, str]:
    return {k: tensor_hash(v) for group in reader.groups() for k, v in group.tensors.items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A checkpoint of 2 steps at ep=2 over dp_shard=2 × dp_replicate=2 (4 ranks)."""
    run_dir = tmp_path_factory.mktemp("ep2") / "run"
    return _train(run_dir, 4, "train.steps=2", "parallel.ep=2")


def test_training_checkpoint_converts_to_model_only_bit_for_bit(trained, tmp_path):
    reader = DCPReader(trained)
    assert [g.name for g in reader.groups()] == group_names(reader.model_config())
    stacked = next(g for g in reader.groups() if g.name == "layers.0").tensors[
        "layers.0.moe.experts.w_gate_up"
    ]
    assert stacked.shape[0] == reader.model_config().num_experts  # whole, though saved as ep=2 shards
    out = tmp_path / "model"
    hashes = convert(DCPReader(trained), DCPWriter(out))
    assert detect_format(out) == "dcp"
    assert hashes == _hashes(DCPReader(out)) == _hashes(DCPReader(trained))
    assert check(DCPReader(trained), DCPReader(out)) == []
    manifest = read_manifest(out)
    assert manifest["source"]["format"] == "dcp" and manifest["model_only"] and manifest["tensors"] == hashes


def test_a_run_at_another_layout_starts_from_the_converted_weights(trained, tmp_path):
    model_only = tmp_path / "model"
    convert(DCPReader(trained), DCPWriter(model_only))
    # lr 0: the run's final weights are exactly what it started from.
    run_dir = tmp_path / "run"
    final = _train(run_dir, 2, "train.steps=1", "train.lr=0", "parallel.dp_replicate=1",
                   f"checkpoint.init_from={model_only}")  # fmt: skip
    assert _hashes(DCPReader(final)) == _hashes(DCPReader(model_only))


def test_cli_convert_check_compare_and_refusals(trained, tmp_path):
    runner = CliRunner()
    out = tmp_path / "model"
    result = runner.invoke(app, ["convert", str(trained), str(out), "--to", "dcp", "--check"])
    assert result.exit_code == 0, result.output
    assert "every tensor of" in " ".join(result.output.split())
    again = runner.invoke(app, ["convert", str(trained), str(out), "--to", "dcp"])
    assert again.exit_code == 2 and "already exists" in again.output
    compared = runner.invoke(app, ["convert", "--compare", str(trained), str(out)])
    assert compared.exit_code == 0 and "layers.1.moe.experts.w_down" in compared.output
    tiny = runner.invoke(
        app, ["convert", str(trained), str(tmp_path / "x"), "--to", "dcp", "--max-memory", "1KiB"]
    )
    assert tiny.exit_code == 2 and "more than --max-memory" in " ".join(tiny.output.split())
    assert not (tmp_path / "x").exists()  # nothing half-written
    unknown = runner.invoke(app, ["convert", str(tmp_path), str(tmp_path / "y"), "--to", "dcp"])
    assert unknown.exit_code == 2 and "not a checkpoint this tool knows" in " ".join(unknown.output.split())


def test_a_failing_writer_leaves_no_output(trained, tmp_path):
    def broken_groups():
        yield from DCPReader(trained).groups()
        raise ConversionError("source died")

    reader = DCPReader(trained)
    out = tmp_path / "model"
    with pytest.raises(ConversionError, match="source died"):
        DCPWriter(out).write(reader.model_config(), broken_groups(), {})
    assert not out.exists() and not list(tmp_path.glob(".model.tmp-*"))


def test_mismatched_groups_are_refused_with_the_key(trained, tmp_path):
    reader = DCPReader(trained)
    groups = list(reader.groups())
    groups[1].tensors["layers.0.attn.q_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ConversionError, match=r"layers.0.attn.q_proj.weight has shape \(3, 3\)"):
        DCPWriter(tmp_path / "a").write(reader.model_config(), groups, {})
    groups = [TensorGroup("embed", {})]
    with pytest.raises(ConversionError, match="group embed is missing"):
        DCPWriter(tmp_path / "b").write(reader.model_config(), groups, {})


def test_reader_names_what_is_wrong(trained, tmp_path):
    with pytest.raises(ConversionError, match="no DCP .metadata"):
        DCPReader(tmp_path)
    with pytest.raises(ConversionError, match="replica-00001.model.embed.weight is not in the checkpoint"):
        next(DCPReader(trained, replica=1).groups())
    assert (trained / "manifest.json").exists() and not (trained / MANIFEST_FILE).exists()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / ".metadata").write_bytes((trained / ".metadata").read_bytes())
    (broken / "manifest.json").write_text(json.dumps({"not": "a manifest"}))
    with pytest.raises(ConversionError, match="cannot read the run config"):
        DCPReader(broken)


def test_init_from_a_checkpoint_of_another_model_is_refused_by_name(trained, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "sparsetron.cli", "train", DEMO, *QUICK, "train.steps=1", "model.n_layers=3",
         "parallel.dp_replicate=1", f"train.run_dir={run_dir}", f"checkpoint.init_from={trained}", "--nproc", "2"],
        capture_output=True, text=True, timeout=300, env=clean_env(), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "does not fit the model" in text and "'model.layers.2.attn.q_proj.weight'" in text, text[-3000:]
