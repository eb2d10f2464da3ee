"""DiLoCo / SparseLoCo in the trainer on CPU gloo ranks: replicas end bit-identical, a resume in the middle of
an inner phase (with an exchange in flight) continues the uninterrupted run exactly, per-outer-step byte
accounting lands in metrics.jsonl, and checkpoints of another replica structure are refused by name."""

from __future__ import annotations

import json

import pytest
import torch.distributed as dist

from sparsetron.checkpoint import read_manifest
from sparsetron.config import load_config
from sparsetron.dist.preflight import check_job

BASE = [
    "model.preset=tiny",
    "model.dim=128",  # 128-wide matrices: 64×64 tiles, compressed (the 128-element norms go dense)
    "model.expert_ffn_dim=128",
    "train.seq_len=128",
    "train.global_batch_tokens=1024",
    "train.micro_batch_size=1",
    "train.warmup_steps=2",
    "train.lr=3e-3",
    "train.log_every=1000",
    "data.source=corpus",
    "data.heldout_windows=4",
    "train.eval_samples=4",
    "checkpoint.interval=0",
]


def _train(overrides: list[str], stop_after: int | None = None) -> list[float]:
    from sparsetron.train.trainer import train

    cfg = load_config(None, overrides)
    mesh = check_job(cfg, dist.get_world_size()).build_mesh("cpu")
    return train(cfg, mesh, "cpu", stop_after=stop_after).losses


def replica_hashes(checkpoint) -> dict[str, dict[str, str]]:
    """Per replica prefix: model tensor name → sha256 from the manifest."""
    by_replica: dict[str, dict[str, str]] = {}
    for key, record in read_manifest(checkpoint)["tensors"].items():
        replica, section, name = key.split(".", 2)
        if section == "model":
            by_replica.setdefault(replica, {})[name] = record["sha256"]
    return by_replica


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


SPARSE = [
    *BASE,
    "parallel.dp_replicate=2",
    "parallel.dp_shard=2",
    "train.dp.algorithm=sparseloco",
    "train.dp.inner_steps=3",
    "train.dp.overlap=true",
    "train.steps=9",
]


def test_sparseloco_replicas_end_identical_and_resume_mid_phase_exactly(ranks, tmp_path):
    whole = ranks.run(4, _train, [*SPARSE, f"train.run_dir={tmp_path / 'whole'}"], timeout=600)[0]
    # Stopped after step 5: mid-phase, with phase 1's exchange in flight (overlap) — then resumed.
    split_dir = tmp_path / "split"
    first = ranks.run(4, _train, [*SPARSE, f"train.run_dir={split_dir}"], 5, timeout=600)[0]
    rest = ranks.run(4, _train, [*SPARSE, f"train.run_dir={split_dir}"], timeout=600)[0]
    assert first + rest == whole
    assert whole[-1] < whole[0] - 0.5

    hashes = replica_hashes(tmp_path / "whole" / "checkpoints" / "step-00000009")
    assert sorted(hashes) == ["replica-00000", "replica-00001"]
    assert hashes["replica-00000"] == hashes["replica-00001"]

    records = _metrics(tmp_path / "whole")
    outer = [r for r in records if "outer_payload_bytes" in r]
    assert [r["step"] for r in outer] == [3, 6, 9]
    for r in outer:
        assert r["outer_ratio_vs_bf16"] > 30  # 64 of 4096 at ≤ 14 bits each, norms dense
        assert r["outer_sent_bytes"] >= r["outer_payload_bytes"] > 0
        assert r["comm_bytes"] >= r["outer_sent_bytes"]
    assert "eval_loss" in records[-1]


def test_diloco_over_four_replicas_ends_identical(ranks, tmp_path):
    overrides = [
        *BASE,
        "parallel.dp_replicate=4",
        "parallel.dp_shard=1",
        "train.dp.algorithm=diloco",
        "train.dp.inner_steps=2",
        "train.steps=5",  # the last phase is one step: finishing syncs it too
        f"train.run_dir={tmp_path}",
    ]
    losses = ranks.run(4, _train, overrides, timeout=600)[0]
    assert len(losses) == 5
    hashes = replica_hashes(tmp_path / "checkpoints" / "step-00000005")
    assert len(hashes) == 4 and len({tuple(sorted(h.items())) for h in hashes.values()}) == 1
    outer_steps = [r["step"] for r in _metrics(tmp_path) if "outer_payload_bytes" in r]
    assert outer_steps == [2, 4, 5]


def test_checkpoint_of_another_replica_structure_is_refused(ranks, tmp_path):
    ddp = [
        *BASE,
        "parallel.dp_replicate=2",
        "parallel.dp_shard=1",
        "train.steps=2",
        f"train.run_dir={tmp_path}",
    ]
    ranks.run(2, _train, ddp, timeout=600)
    resumed = [*ddp, "train.steps=4", "train.dp.algorithm=sparseloco", "train.dp.inner_steps=2"]
    with pytest.raises(Exception, match=r"saved with train.dp.algorithm=ddp but this run uses sparseloco"):
        ranks.run(2, _train, resumed, timeout=600)
