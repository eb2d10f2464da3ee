"""End to end on CPU: exact resume, layout invariance, resharded resume, divergence, the CLI (tier 3)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from launch_env import clean_env

from sparsetron.config import load_config
from sparsetron.dist.preflight import check_job

REPO = Path(__file__).resolve().parents[1]

# A tiny MoE on short packed sequences of the shipped corpus: 8 sequences per step, so dp of 1, 2 and 4 all
# divide it, with micro-batches of 2 (gradient accumulation on every layout).
BASE = [
    "model.preset=tiny",
    "train.seq_len=128",
    "train.global_batch_tokens=1024",
    "train.micro_batch_size=1",
    "train.steps=20",
    "train.warmup_steps=3",
    "train.lr=3e-3",
    "train.log_every=100",
    "data.source=corpus",
    "checkpoint.keep_last=2",
    "checkpoint.interval=0",
    "parallel.cp=1",
    "parallel.ep=1",
]


def _train(overrides: list[str], stop_after: int | None = None) -> list[float]:
    """On every rank: resolve the config for this world, build the mesh, train; rank 0's losses come back."""
    from sparsetron.train.trainer import train

    cfg = load_config(None, overrides)
    dims = check_job(cfg, dist.get_world_size())
    return train(cfg, dims.build_mesh("cpu"), "cpu", stop_after=stop_after).losses


def run(
    ranks, world: int, run_dir: Path, extra: list[str] = (), stop_after: int | None = None
) -> list[float]:
    layout = {
        1: ["parallel.dp_shard=1"],
        2: ["parallel.dp_shard=2"],
        4: ["parallel.dp_replicate=2", "parallel.dp_shard=2"],
    }
    overrides = [*BASE, *layout[world], f"train.run_dir={run_dir}", *extra]
    return ranks.run(world, _train, overrides, stop_after, timeout=600)[0]


def rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def test_resume_is_exact(ranks, tmp_path):
    straight = run(ranks, 2, tmp_path / "straight")
    first = run(ranks, 2, tmp_path / "resumed", stop_after=10)
    second = run(ranks, 2, tmp_path / "resumed")
    assert len(first) == 10 and len(second) == 10
    assert first + second == straight  # bitwise: same layout, same reductions, restored optimizer state
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 21))


def test_layout_invariance(ranks, tmp_path):
    one = run(ranks, 1, tmp_path / "w1")
    two = run(ranks, 2, tmp_path / "w2")
    four = run(ranks, 4, tmp_path / "w4")
    assert one[-1] < one[0] - 0.5, f"loss did not fall: {one[0]:.3f} -> {one[-1]:.3f}"
    assert rel(two, one) <= 1e-4, (one, two)
    assert rel(four, one) <= 1e-4, (one, four)


def test_checkpoint_saved_on_four_ranks_continues_on_two_and_one(ranks, tmp_path):
    saved = tmp_path / "w4"
    run(ranks, 4, saved, stop_after=10)
    continued = {}
    for world in (4, 2, 1):
        target = tmp_path / f"continue{world}"
        shutil.copytree(saved, target)
        continued[world] = run(ranks, world, target, ["train.steps=14"])
        assert len(continued[world]) == 4
    assert rel(continued[2], continued[4]) <= 1e-5
    assert rel(continued[1], continued[4]) <= 1e-5


def _diverge(overrides: list[str]) -> None:
    from sparsetron.model import Transformer

    real_forward = Transformer.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        calls["n"] += 1
        if (
            calls["n"] >= 5
        ):  # one micro-batch per step on 2 ranks with 4 sequences each: step 2's second micro-batch
            out.logits_BSV = out.logits_BSV * float("nan")
        return out

    Transformer.forward = poisoned
    try:
        _train(overrides)
    finally:
        Transformer.forward = real_forward


def test_non_finite_loss_stops_with_step_and_rank(ranks, tmp_path):
    from multirank import RankFailure

    overrides = [*BASE, "parallel.dp_shard=2", f"train.run_dir={tmp_path}"]
    with pytest.raises(RankFailure) as info:
        ranks.run(2, _diverge, overrides, timeout=300)
    message = str(info.value)
    assert "TrainingDiverged: non-finite loss at step 2 on rank" in message
    assert "lower train.lr" in message


def test_cli_trains_reports_and_survives_sigterm(tmp_path):
    """`sparsetron train --nproc 2`, stopped by SIGTERM mid-run (as Slurm preemption), resumed, reported."""
    run_dir = tmp_path / "run"
    argv = [
        sys.executable,
        "-m",
        "sparsetron.cli",
        "train",
        *BASE,
        "parallel.dp_replicate=1",
        "parallel.dp_shard=2",
        "train.steps=40",
        f"train.run_dir={run_dir}",
        "--nproc",
        "2",
    ]
    proc = subprocess.Popen(
        argv,
        env=clean_env(),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    saved = sorted((run_dir / "checkpoints").glob("step-*"))
    assert saved, output
    stopped_at = int(saved[-1].name.split("-")[1])
    assert 3 <= stopped_at < 40, output
    assert "stopping: saved" in output

    resumed = subprocess.run(argv, env=clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {saved[-1]} at step {stopped_at}" in resumed.stdout
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 41))
    assert "run summary" in resumed.stdout

    report = subprocess.run(
        [sys.executable, "-m", "sparsetron.cli", "report", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
    )
    assert report.returncode == 0, report.stderr
    assert (run_dir / "report" / "loss_lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


SPARSE = [
    "data.source=synthetic",
    "model.attention_pattern=block_topk",
    "model.sparse_block=16",
    "model.sparse_topk=2",
    "model.sparse_dense_layers=1",
    "train.steps=4",
]


def test_sparse_ring_training_matches_the_single_process_sparse_model(ranks, tmp_path):
    """Layer 0 dense (exact ring on striped shards), layer 1 block top-k estimated per step: cp=2 over the sparse
    ring gives the losses of cp=1 attending within the same patterns locally."""
    local = ranks.run(1, _train, [*BASE, *SPARSE, f"train.run_dir={tmp_path / 'cp1'}"], timeout=300)[0]
    overrides = [*BASE, *SPARSE, "parallel.cp=2", "parallel.dp_shard=1", "parallel.cp_method=sparse_ring",
                 "parallel.cp_layout=striped", "parallel.cp_block=16", f"train.run_dir={tmp_path / 'cp2'}"]  # fmt: skip
    overrides.remove("parallel.cp=1")
    ring = ranks.run(2, _train, overrides, timeout=300)[0]
    dense = ranks.run(1, _train, [*BASE, "data.source=synthetic", "train.steps=4", f"train.run_dir={tmp_path / 'd'}"],
                      timeout=300)[0]  # fmt: skip
    assert rel(ring, local) <= 1e-4, (ring, local)
    assert local != dense  # the pattern really changed the attention


def _train_counting_rings(overrides: list[str]) -> tuple[list[float], int, int]:
    """:func:`_train`, also counting this rank's calls of the hierarchical and of the flat sparse ring."""
    from sparsetron.parallel.context import sparse_hier, sparse_ring

    hierarchical, flat = sparse_hier.hierarchical_sparse_ring_attention, sparse_ring.sparse_ring_attention
    with (
        mock.patch.object(
            sparse_hier, "hierarchical_sparse_ring_attention", wraps=hierarchical
        ) as hier_calls,
        mock.patch.object(sparse_ring, "sparse_ring_attention", wraps=flat) as flat_calls,
    ):
        losses = _train(overrides)
    return losses, hier_calls.call_count, flat_calls.call_count


@pytest.mark.parametrize(
    ("cp", "dp_shard", "node_size"),
    [(4, 1, 2), (2, 2, 1)],
    ids=["cp4-as-2x2", "fsdp2-x-cp2-as-2x1"],
)
def test_hierarchical_sparse_ring_training_matches_the_single_process_sparse_model(
    ranks, tmp_path, cp, dp_shard, node_size
):
    """4 ranks, cp = 4 as 2 nodes × 2 (parallel.cp_node_size=2), or two cp groups of 2 ranks as 2 nodes × 1
    (each builds its own node groups): the block top-k layer runs over the hierarchical sparse ring (inner ring
    in a node, outer across nodes), never the flat one, and gives the losses of cp = 1."""
    local = ranks.run(1, _train, [*BASE, *SPARSE, f"train.run_dir={tmp_path / 'cp1'}"], timeout=300)[0]
    overrides = [*BASE, *SPARSE, f"parallel.cp={cp}", f"parallel.dp_shard={dp_shard}",
                 "parallel.cp_method=sparse_ring", "parallel.cp_layout=striped", "parallel.cp_block=16",
                 f"parallel.cp_node_size={node_size}", f"train.run_dir={tmp_path / 'hier'}"]  # fmt: skip
    overrides.remove("parallel.cp=1")
    per_rank = ranks.run(4, _train_counting_rings, overrides, timeout=300)
    assert all(hier > 0 and flat == 0 for _, hier, flat in per_rank), [r[1:] for r in per_rank]
    assert rel(per_rank[0][0], local) <= 1e-4, (per_rank[0][0], local)


def test_seed_changes_the_run(ranks, tmp_path):
    a = run(ranks, 1, tmp_path / "a", ["train.steps=3"])
    b = run(ranks, 1, tmp_path / "b", ["train.steps=3", "train.seed=1"])
    assert a != b
    assert torch.isfinite(torch.tensor(a + b)).all()


PASSKEY = [
    "model.preset=tiny",
    "data.source=synthetic",
    "data.task=passkey",
    "data.passkey_digits=3",
    "train.seq_len=128",
    "train.global_batch_tokens=4096",
    "train.micro_batch_size=8",
    "train.lr=3e-3",
    "train.warmup_steps=30",
    "train.steps=250",
    "train.eval_samples=64",
    "train.log_every=1000",
    "checkpoint.interval=0",
]


def _passkey_accuracy(overrides: list[str]) -> float:
    from sparsetron.train.trainer import train

    cfg = load_config(None, overrides)
    return train(cfg, check_job(cfg, dist.get_world_size()).build_mesh("cpu"), "cpu").eval_accuracy


#: Block-sparse from the second layer on (the first stays dense, as MInference keeps its first layers): blocks
#: of 16 tokens, per KV head the 8 key columns and 4 diagonals carrying most of the last 16 queries' attention,
#: plus the first block and the local one.
VERTICAL_SLASH = [
    "model.attention_pattern=vertical_slash",
    "model.sparse_dense_layers=1",
    "model.sparse_block=16",
    "model.sparse_verticals=8",
    "model.sparse_slashes=4",
    "model.sparse_last_q=16",
]


def test_passkey_retrieval_is_learned_well_above_chance_dense_and_sparse(ranks, tmp_path):
    """3-digit passkey hidden at a random depth of 128 bytes: exact-match chance is 1/900. In 400 steps the tiny
    MoE reaches 81% with dense attention and 81% with vertical-slash layers (seed 0; seed 1: 83% and 58%,
    measured); the test asserts at least 50% dense, 30% sparse and the sparse one within 25 points of the dense
    one, on 64 held-out samples. Measured and left out: with *every* layer sparse, learning is fragile (seed 0:
    78%, seed 1: 0% after 400 steps): a query only retrieves the passkey once the estimated pattern holds its
    column, which it does only once attention already points there. At this length the pattern keeps ~82% of
    the causal blocks, so this checks training through the estimator, not retrieval at high sparsity."""
    steps = ["train.steps=400"]
    dense = ranks.run(
        1, _passkey_accuracy, [*PASSKEY, *steps, f"train.run_dir={tmp_path / 'dense'}"], timeout=600
    )[0]
    sparse = ranks.run(
        1, _passkey_accuracy, [*PASSKEY, *steps, *VERTICAL_SLASH, f"train.run_dir={tmp_path / 'sparse'}"],
        timeout=600,
    )[0]  # fmt: skip
    assert dense >= 0.50, f"dense passkey accuracy {dense:.1%} after 400 steps"
    assert sparse >= 0.30 and sparse >= dense - 0.25, f"sparse {sparse:.1%} vs dense {dense:.1%}"


def test_activation_checkpointing_changes_memory_not_math(ranks, tmp_path):
    plain = run(ranks, 2, tmp_path / "plain", ["train.steps=4"])
    recomputed = run(ranks, 2, tmp_path / "ac", ["train.steps=4", "train.activation_checkpointing=true"])
    assert rel(recomputed, plain) <= 1e-6
    # The checkpoint keys stay those of the plain model, so runs with and without it share checkpoints.
    from sparsetron.checkpoint import read_manifest

    keys = set(read_manifest(tmp_path / "ac" / "checkpoints" / "step-00000004")["tensors"])
    assert keys == set(read_manifest(tmp_path / "plain" / "checkpoints" / "step-00000004")["tensors"])


def test_clip_grad_norm_scales_the_gradients_and_returns_the_norm_before_clipping():
    from sparsetron.train.optim import clip_grad_norm

    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    params[0].grad = torch.tensor([3.0, 0.0, 0.0])
    params[1].grad = torch.tensor([[0.0, 4.0], [0.0, 0.0]])
    assert clip_grad_norm(params, 1.0) == pytest.approx(5.0)
    clipped = torch.cat([p.grad.flatten() for p in params]).norm()
    assert float(clipped) == pytest.approx(1.0, rel=1e-5)
    assert clip_grad_norm(params, float("inf")) == pytest.approx(1.0, rel=1e-5)  # measures only
