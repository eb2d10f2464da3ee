"""Layout invariance with context parallelism: the same seed and data give the same losses for every cp layout."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from sparsetron.config import load_config
from sparsetron.dist.preflight import check_job

BASE = [
    "model.preset=tiny",
    "train.seq_len=128",
    "train.global_batch_tokens=1024",
    "train.steps=20",
    "train.warmup_steps=3",
    "train.lr=3e-3",
    "train.log_every=1000",
    "data.source=corpus",
    "checkpoint.interval=0",
    "parallel.ep=1",
    "parallel.dp_replicate=1",
]


def _losses(overrides: list[str]) -> list[float]:
    from sparsetron.train.trainer import train

    cfg = load_config(None, overrides)
    return train(cfg, check_job(cfg, dist.get_world_size()).build_mesh("cpu"), "cpu").losses


@pytest.fixture(scope="module")
def cp1_losses(ranks, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cp1")
    return ranks.run(
        1, _losses, [*BASE, "parallel.dp_shard=1", "parallel.cp=1", f"train.run_dir={run_dir}"], timeout=600
    )[0]


LAYOUTS = {
    "ring-zigzag-cp2": (2, ["parallel.cp=2", "parallel.dp_shard=1"]),
    "ring-zigzag-cp4": (4, ["parallel.cp=4", "parallel.dp_shard=1"]),
    "ring-cp2-fsdp2": (4, ["parallel.cp=2", "parallel.dp_shard=2"]),
    "ring-striped-cp2": (
        2,
        ["parallel.cp=2", "parallel.dp_shard=1", "parallel.cp_layout=striped", "parallel.cp_block=16"],
    ),
    "ring-contiguous-cp2": (2, ["parallel.cp=2", "parallel.dp_shard=1", "parallel.cp_layout=contiguous"]),
    "hybrid-2x2": (
        4,
        ["parallel.cp=4", "parallel.dp_shard=1", "parallel.cp_method=hybrid", "parallel.ulysses_degree=2"],
    ),
    "ulysses-cp2": (2, ["parallel.cp=2", "parallel.dp_shard=1", "parallel.cp_method=ulysses"]),
    "allgather-cp2": (2, ["parallel.cp=2", "parallel.dp_shard=1", "parallel.cp_method=allgather"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_context_parallel_training_matches_cp1(ranks, tmp_path, cp1_losses, name):
    world, overrides = LAYOUTS[name]
    losses = ranks.run(world, _losses, [*BASE, *overrides, f"train.run_dir={tmp_path}"], timeout=600)[0]
    assert len(losses) == len(cp1_losses) == 20
    assert cp1_losses[-1] < cp1_losses[0] - 0.5
    worst = max(abs(a - b) / b for a, b in zip(losses, cp1_losses, strict=True))
    assert worst <= 1e-4, f"{name}: max relative loss difference {worst:.2e}"


PASSKEY_CP = [
    "model.preset=tiny",
    "data.source=synthetic",
    "data.task=passkey",
    "data.passkey_digits=3",
    "train.seq_len=128",
    "train.global_batch_tokens=1024",
    "train.steps=2",
    "train.eval_samples=8",
    "checkpoint.interval=0",
    "parallel.ep=1",
    "parallel.dp_replicate=1",
]


def _eval_accuracy(overrides: list[str]) -> float:
    from sparsetron.train.trainer import train

    cfg = load_config(None, overrides)
    return train(cfg, check_job(cfg, dist.get_world_size()).build_mesh("cpu"), "cpu").eval_accuracy


def test_evaluation_under_context_parallelism_matches(ranks, tmp_path):
    """Eval shards inputs and gathers logits over cp: same accuracy as cp=1 (and every rank agrees)."""
    one = ranks.run(
        1,
        _eval_accuracy,
        [*PASSKEY_CP, "parallel.cp=1", "parallel.dp_shard=1", f"train.run_dir={tmp_path / 'a'}"],
    )
    two = ranks.run(
        2,
        _eval_accuracy,
        [*PASSKEY_CP, "parallel.cp=2", "parallel.dp_shard=1", f"train.run_dir={tmp_path / 'b'}"],
    )
    assert two == [one[0], one[0]]
