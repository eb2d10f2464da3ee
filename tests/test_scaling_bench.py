"""benchmarks/scaling.py in its CPU correctness mode, as a user runs it: under torchrun on 4 and 8 gloo ranks.

``--cpu`` runs every part once at tiny sizes and checks it against a single-process reference, raising on a
mismatch above 1e-4: dense ring, Ulysses and every hybrid a×b vs causal SDPA; the flat and hierarchical
(2 groups × W/2) sparse rings vs masked attention; the Qwen3- and DeepSeek-like EP layers under every
balancer vs the same layer unsharded; the cp = ep = W training run vs FSDP alone (cp = ep = 1). Here the
run must exit 0 and report an "ok" row for every case. Bad launches (odd W for the hierarchical ring, heads
Ulysses cannot split, experts EP cannot split) must exit 2 before any process group starts, naming the value
and the fix. About 20 s (4 ranks) and 40 s (8 ranks) on a 2-core machine, 5 s per bad launch.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from launch_env import REPO, clean_env

SCRIPT = REPO / "benchmarks" / "scaling.py"
BALANCERS = ["none", "aux_loss", "aux_free_bias", "sinkhorn", "quantile", "expert_choice"]


def _expected_cases(world: int) -> dict[str, list[str]]:
    """The case names each part must report as "ok" on ``world`` ranks (default CPU sizes)."""
    hybrids = {4: ["hybrid 2×2"], 8: ["hybrid 2×4", "hybrid 4×2"]}[world]
    node = world // 2
    return {
        "dense": [f"{m}, 64 tokens/rank" for m in ["ring", "ulysses", *hybrids]],
        "sparse": [
            f"{k} {ring}" for k in ("block_topk", "vertical_slash") for ring in ("flat", f"hier 2×{node}")
        ],
        "ep": [
            f"{layer} {balancer}: {what}"
            for layer in ("qwen3", "deepseek")
            for balancer in BALANCERS
            for what in ("y, dx", "balancing load counts every copy")
        ],
        "e2e": [f"cp×ep {world}×{world} losses vs dp_shard {world} over 3 steps"],
    }


@pytest.mark.slow
@pytest.mark.parametrize("world", [4, 8])
def test_cpu_checks_pass_under_torchrun(tmp_path, world):
    out = tmp_path / "scaling.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world)]
    proc = subprocess.run(
        [*cmd, str(SCRIPT), "--cpu", "--parts", "dense", "sparse", "ep", "e2e", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=clean_env(), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads(out.read_text())["results"]
    for part, cases in _expected_cases(world).items():
        rows = results[part]
        # Flat sparse rows also name the density the calibration reached: compare by prefix.
        assert [r["case"].split(", density")[0] for r in rows] == cases, part
        assert all(r["result"] == "ok" and r["max_rel_error"] <= 1e-4 for r in rows), rows
        for row in rows:  # the table on stdout shows the same rows
            assert f"| {part} | {row['case']} | {row['max_rel_error']:.1e} | ok |" in proc.stdout


@pytest.mark.parametrize(
    ("world", "args", "message"),
    [
        (3, ["--parts", "sparse"], "W=3: the hierarchical sparse ring runs 2 groups of W/2 ranks"),
        (16, ["--parts", "dense"], "dense ulysses at W=16: Ulysses cannot split Hq=8"),
        (
            3,
            ["--parts", "ep", "--methods", "ring"],
            "EP = W = 3 must divide the 16 experts of the qwen3 layer",
        ),
        (4, ["--tokens-per-gpu", "63"], "--tokens-per-gpu 63: the zigzag layout"),
        (4, ["--parts", "sparse", "--sparse-seq", "600"], "e.g. --sparse-seq 608"),
    ],
)
def test_bad_launches_exit_2_naming_the_value_and_the_fix(world, args, message):
    """Validation runs before the process group, so one process with the launch's variables shows it."""
    env = clean_env() | {"WORLD_SIZE": str(world), "RANK": "0"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu", *args], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr, proc.stderr
