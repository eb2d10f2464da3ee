"""The `sparsetron` command line: config show/check/docs and real local launches (`bench`: test_bench_cli.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from launch_env import clean_env
from typer.testing import CliRunner

from sparsetron.cli import app

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "train" / "demo.yaml")
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_help_lists_every_subcommand():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("train", "launch", "convert", "sync", "bench", "config"):
        assert command in result.output


def test_config_show_prints_the_resolved_yaml(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("parallel: {cp: 4, dp_shard: 1}\n")
    result = invoke("config", "show", DEMO, str(extra), "train.steps=3")
    assert result.exit_code == 0, result.output
    assert "steps: 3" in result.output and "cp: 4" in result.output
    assert "num_experts: 8" in result.output  # from the demo preset


def test_config_show_reports_a_typo_with_a_suggestion():
    result = invoke("config", "show", DEMO, "parallel.cpp=2")
    assert result.exit_code == 2
    assert "unknown key 'parallel.cpp'" in result.output and "did you mean 'parallel.cp'?" in result.output


def test_config_check_passes_and_fails():
    ok = invoke("config", "check", DEMO, "--world-size", "4")
    assert ok.exit_code == 0 and "ok: ParallelDims(world_size=4" in ok.output
    bad = invoke("config", "check", DEMO, "parallel.cp=4", "--world-size", "6")
    assert bad.exit_code == 2
    text = " ".join(bad.output.split())
    assert "world_size=6" in text and "cp=4" in text and "dp_replicate=2" in text and "dp_shard=2" in text
    assert "ep=1" in text and "2 × 2 × 4 = 16 must equal world_size=6" in text


SPARSE_RING = [
    "model.attention_pattern=window",
    "model.sparse_block=64",
    "parallel.cp_method=sparse_ring",
    "parallel.cp_layout=striped",
    "parallel.cp_block=64",
    "parallel.cp=4",
    "parallel.dp_replicate=1",
    "parallel.dp_shard=1",
]


@pytest.mark.parametrize(
    ("extra", "ring"),
    [
        ([], "sparse ring: flat"),
        (["parallel.cp_node_size=2"], "sparse ring: 2 nodes × 2, hierarchical"),
        (["cluster.nodes=4", "cluster.procs_per_node=1"], "sparse ring: 4 nodes × 1, hierarchical"),
    ],
)
def test_config_check_names_the_sparse_ring_it_will_run(extra, ring):
    result = invoke("config", "check", DEMO, *SPARSE_RING, *extra, "--world-size", "4")
    assert result.exit_code == 0, result.output
    assert ring in " ".join(result.output.split())


def test_config_check_defaults_to_the_cluster_size():
    result = invoke("config", "check", DEMO, "cluster.procs_per_node=2")
    assert result.exit_code == 2 and "world_size=2" in result.output


def test_config_docs_lists_keys_with_defaults():
    result = invoke("config", "docs", "parallel")
    assert result.exit_code == 0
    assert "parallel.cp_method" in result.output and "ring" in result.output
    assert "train.lr" not in result.output
    assert invoke("config", "docs", "nosuch").exit_code == 2


QUICK = [
    "model.preset=tiny",
    "train.seq_len=128",
    "train.global_batch_tokens=1024",
    "train.steps=2",
    "train.warmup_steps=1",
]


def test_train_starts_local_processes_through_torchrun(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sparsetron.cli",
            "train",
            DEMO,
            *QUICK,
            f"train.run_dir={run_dir}",
            "--nproc",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=clean_env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    topology = json.loads((run_dir / "topology.json").read_text())
    assert topology["launcher"] == "torchrun"
    assert topology["groups"]["dp_shard"] == [[0, 1], [2, 3]] and topology["groups"]["dp_replicate"] == [
        [0, 2],
        [1, 3],
    ]
    assert sorted(r["rank"] for r in topology["ranks"]) == [0, 1, 2, 3]
    assert "dp_replicate: 2" in (run_dir / "config.yaml").read_text()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert "run summary" in proc.stdout


def test_train_refuses_a_bad_layout_before_starting_anything(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "sparsetron.cli", "train", DEMO, f"train.run_dir={run_dir}", "--nproc", "3"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "world_size=3" in proc.stderr
    assert not run_dir.exists()


def test_train_under_an_external_torchrun_runs_each_rank(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "sparsetron.cli",
            "train",
            DEMO,
            *QUICK,
            "parallel.dp_replicate=1",
            f"train.run_dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=clean_env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    topology = json.loads((run_dir / "topology.json").read_text())
    assert topology["groups"]["dp_shard"] == [[0, 1]] and topology["launcher"] == "torchrun"
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
