"""Expert-parallel training end to end on CPU: layout invariance over ep (and ep × cp), resharded resume
across EP degrees, the routing statistics in metrics.jsonl, and the aux-loss-free bias staying in step."""

from __future__ import annotations

import json
import shutil

import pytest
import torch.distributed as dist

from sparsetron.config import load_config
from sparsetron.dist.preflight import check_job

# The tiny preset with 8 experts (so ep=4 holds two per rank), top-2, a shared expert.
BASE = [
    "model.preset=tiny",
    "model.num_experts=8",
    "model.shared_expert_ffn_dim=64",
    "train.seq_len=128",
    "train.global_batch_tokens=1024",
    "train.micro_batch_size=1",
    "train.steps=20",
    "train.warmup_steps=3",
    "train.lr=3e-3",
    "train.log_every=1000",
    "data.source=corpus",
    "checkpoint.interval=0",
    "parallel.dp_replicate=1",
]


def _train(overrides: list[str], stop_after: int | None = None) -> list[float]:
    from sparsetron.train.trainer import train

    cfg = load_config(None, overrides)
    return train(
        cfg, check_job(cfg, dist.get_world_size()).build_mesh("cpu"), "cpu", stop_after=stop_after
    ).losses


def _rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def ep1_losses(ranks, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ep1")
    overrides = [*BASE, "parallel.dp_shard=4", "parallel.ep=1", f"train.run_dir={run_dir}"]
    return ranks.run(4, _train, overrides, timeout=600)[0]


LAYOUTS = {
    "ep2": ["parallel.dp_shard=4", "parallel.ep=2"],
    "ep4": ["parallel.dp_shard=4", "parallel.ep=4"],
    "ep2-cp2": ["parallel.dp_shard=2", "parallel.cp=2", "parallel.ep=2"],
    "ep2-overlap2": ["parallel.dp_shard=4", "parallel.ep=2", "parallel.ep_overlap_chunks=2"],
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_expert_parallel_training_matches_ep1(ranks, tmp_path, ep1_losses, name):
    losses = ranks.run(4, _train, [*BASE, *LAYOUTS[name], f"train.run_dir={tmp_path}"], timeout=600)[0]
    assert ep1_losses[-1] < ep1_losses[0] - 0.5
    worst = _rel(losses, ep1_losses)
    assert worst <= 1e-4, f"{name}: max relative loss difference {worst:.2e}"


def test_checkpoint_saved_at_ep4_continues_at_ep2_and_ep1(ranks, tmp_path):
    """Experts are stored on a global expert axis, so a checkpoint reshards across EP degrees."""
    saved = tmp_path / "ep4"
    layouts = {4: LAYOUTS["ep4"], 2: LAYOUTS["ep2"], 1: ["parallel.dp_shard=4", "parallel.ep=1"]}
    ranks.run(4, _train, [*BASE, *layouts[4], f"train.run_dir={saved}"], 10, timeout=600)
    continued = {}
    for ep, layout in layouts.items():
        target = tmp_path / f"continue-ep{ep}"
        shutil.copytree(saved, target)
        overrides = [*BASE, *layout, f"train.run_dir={target}", "train.steps=14"]
        continued[ep] = ranks.run(4, _train, overrides, timeout=600)[0]
        assert len(continued[ep]) == 4
    assert _rel(continued[2], continued[4]) <= 1e-5
    assert _rel(continued[1], continued[4]) <= 1e-5


def _bias_after_training(overrides: list[str]) -> list[list[float]]:
    from sparsetron.train import trainer

    cfg = load_config(None, overrides)
    mesh = check_job(cfg, dist.get_world_size()).build_mesh("cpu")
    captured = {}
    original = trainer.build_model

    def keep_model(*args, **kwargs):
        captured["model"] = original(*args, **kwargs)
        return captured["model"]

    trainer.build_model = keep_model
    try:
        trainer.train(cfg, mesh, "cpu")
    finally:
        trainer.build_model = original
    return [moe.router.expert_bias.tolist() for moe in captured["model"].moe_layers()]


def test_metrics_report_routing_and_aux_free_bias_stays_identical_on_every_rank(ranks, tmp_path):
    overrides = [
        *BASE,
        *LAYOUTS["ep2"],
        "model.router=sigmoid_bias",
        "model.aux_loss=none",
        "model.capacity_factor=1.0",
        "train.steps=6",
        f"train.run_dir={tmp_path}",
    ]
    biases = ranks.run(4, _bias_after_training, overrides, timeout=600)
    assert all(bias == biases[0] for bias in biases), "ranks disagree on the expert bias"
    assert any(value != 0.0 for layer in biases[0] for value in layer), "the bias never moved"

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6
    for record in records:
        tokens = record["expert_tokens"]
        assert len(tokens) == 2 and len(tokens[0]) == 8  # layers × experts
        dropped = record["dropped_tokens"]
        # Per layer, kept + dropped = every token's top-2 choices over the global batch.
        for kept_E, dropped_layer in zip(tokens, dropped, strict=True):
            assert sum(kept_E) + dropped_layer == 1024 * 2
        assert record["ep_rank_load_max_over_mean"] >= 1.0
        assert all(0.0 < h <= 2.08 for h in record["router_entropy"])  # ≤ ln(8)
        assert record["comm_bytes"] > 0
