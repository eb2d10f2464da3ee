"""`sparsetron bench`: the listing, and `bench sparse-cp` against the planner and the rings themselves.

The printed and JSON numbers are checked against :func:`plan_striped` of patterns built here from the same seeded
inputs; the hierarchical ring's inter- and intra-node bytes against what the real ring sends on 4 gloo ranks.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from launch_env import clean_env
from matplotlib.image import imread
from sparse_reference import BLOCK_BYTES, inputs, pattern_of, stripe
from typer.testing import CliRunner

from sparsetron.cli import app
from sparsetron.parallel.context.patterns import (
    block_topk,
    pool_blocks,
    sliding_window_sinks,
    strided,
    vertical_slash,
)
from sparsetron.parallel.context.sparse_plan import plan_striped
from sparsetron.parallel.context.sparse_report import (
    SparseCPSpec,
    build_pattern,
    hierarchical_traffic,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: 32 blocks of 32 tokens on 4 ranks, one KV head of D = 128: one K+V block is 2 × 32 × 128 × 2 B = 16 KiB.
SMALL = ["--seq", "1024", "--block", "32", "--world", "4", "--heads", "2", "--kv-heads", "1"]
BLOCK_KIB = 16

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def flat(text: str) -> str:
    return " ".join(text.split())


def test_bench_without_a_name_lists_the_benchmarks():
    result = invoke("bench")
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "sparsetron bench sparse-cp" in text
    assert "benchmarks/*.py" in text and "benchmarks/RESULTS.md" in text
    help_text = flat(invoke("bench", "--help").output)
    assert "sparse-cp" in help_text and "benchmarks/RESULTS.md" in help_text


def test_sparse_cp_prints_the_striped_plan_and_writes_pngs_and_json(tmp_path):
    """A window of 2 blocks: each query block reads its own and the previous block, so only step 1 moves
    K/V (31 blocks: block 0 has no predecessor) and steps 2, 3 are idle."""
    plots, numbers = tmp_path / "plots", tmp_path / "out" / "report.json"
    args = ["--pattern", "window", "--window-blocks", "2", "--sink-blocks", "0", *SMALL]
    result = invoke("bench", "sparse-cp", *args, "--plot", str(plots), "--json", str(numbers))
    assert result.exit_code == 0, result.output
    text = result.output

    pattern = sliding_window_sinks(1, 1, 1024, 32, window_blocks=2, sink_blocks=0)
    plan = plan_striped(pattern, 4)
    report = json.loads(numbers.read_text())
    assert report["work_RS"] == plan.work_RS.tolist()
    assert report["work_max_S"] == plan.work_RS.max(dim=0).values.tolist()
    assert report["imbalance_S"] == pytest.approx(plan.step_imbalance().tolist())
    assert report["idle_steps"] == [2, 3] == plan.idle_steps()
    assert report["density"] == pytest.approx(pattern.density())
    block_bytes = BLOCK_KIB * 1024
    assert report["block_bytes"] == block_bytes
    assert (
        report["sparse_bytes_S"] == [0, 31 * block_bytes, 0, 0] == plan.bytes_per_step(block_bytes).tolist()
    )
    assert report["dense_bytes_S"] == [0] + [32 * block_bytes] * 3
    assert report["hierarchy"] is None

    density = float(re.search(r"^density\s+([0-9.]+)$", text, re.M).group(1))
    assert density == pytest.approx(pattern.density(), abs=1e-4)
    assert re.search(r"^idle steps\s+2, 3$", text, re.M), text
    worst = int(plan.step_imbalance().argmax())
    assert f"worst-step max/mean {float(plan.step_imbalance()[worst]):.3f} (step {worst})" in text
    # 31 × 16 KiB = 496 KiB of a dense ring's 3 steps × 32 blocks × 16 KiB = 1.5 MiB.
    assert "bytes sent          496.0 KiB vs dense ring 1.50 MiB (32.3%)" in text, text
    rows = re.findall(r"^\s*(\d)(?: worst| idle)?\s+(\d+)\s+([0-9.]+)\s+([0-9.]+)\s+(\S+ \S+)\s+(\S+ \S+)\s+(\S+)\s*$",
                      text, re.M)  # fmt: skip
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3], text
    assert [int(r[1]) for r in rows] == plan.work_RS.max(dim=0).values.tolist()
    assert [r[4] for r in rows] == ["0 B", "496.0 KiB", "0 B", "0 B"]
    assert [r[5] for r in rows] == ["0 B", "512.0 KiB", "512.0 KiB", "512.0 KiB"]
    assert [r[6] for r in rows] == ["-", "96.9%", "0.0%", "0.0%"]
    assert re.search(r"^\s*2 idle\s", text, re.M) and re.search(rf"^\s*{worst} worst\s", text, re.M)

    for name in ("pattern.png", "work.png"):
        data = (plots / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
        image = imread(plots / name)
        assert image.ndim == 3 and min(image.shape[:2]) >= 300
    assert f"wrote {plots / 'pattern.png'} and {plots / 'work.png'}" in flat(text)


def _same_inputs(spec: SparseCPSpec):
    """q, k as the command draws them for random inputs (seeded; q first)."""
    g = torch.Generator().manual_seed(spec.seed)
    q = torch.randn(spec.batch, spec.seq, spec.heads, spec.head_dim, generator=g)
    k = torch.randn(spec.batch, spec.seq, spec.kv_heads, spec.head_dim, generator=g)
    return q, k


@pytest.mark.parametrize("kind", ["strided", "topk", "vertical_slash"])
def test_sparse_cp_plans_the_pattern_it_names(kind, tmp_path):
    args = ["--pattern", kind, "--seq", "512", "--block", "16", "--world", "4", "--heads", "4", "--kv-heads", "2",
            "--head-dim", "32", "--seed", "3", "--k", "3", "--stride", "3", "--verticals", "5", "--slashes", "2",
            "--last-q", "32"]  # fmt: skip
    if kind != "vertical_slash":
        args = args[: args.index("--verticals")]
    result = invoke("bench", "sparse-cp", *args, "--json", str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.output
    spec = SparseCPSpec(pattern=kind, seq=512, block=16, world=4, heads=4, kv_heads=2, head_dim=32, seed=3)
    q, k = _same_inputs(spec)
    if kind == "strided":
        pattern = strided(1, 2, 512, 16, stride=3, local_blocks=1)
    elif kind == "topk":
        pattern = block_topk(pool_blocks(q, 16), pool_blocks(k, 16), 16, k=3, local_blocks=1)
    else:
        pattern = vertical_slash(q[:, -32:], k, 16, verticals=5, slashes=2, sink_blocks=1)
    plan = plan_striped(pattern, 4)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["work_RS"] == plan.work_RS.tolist()
    assert report["density"] == pytest.approx(pattern.density())
    block_bytes = 2 * 2 * 16 * 32 * 2
    assert report["sparse_bytes_S"] == plan.bytes_per_step(block_bytes).tolist()
    assert ("static: stride 3" if kind == "strided" else "random inputs, seed 3") in result.output


@pytest.mark.parametrize("kind", ["topk", "vertical_slash"])
def test_planted_inputs_are_found(kind):
    spec = SparseCPSpec(pattern=kind, inputs="planted", seq=2048, block=32, world=4)
    pattern, note = build_pattern(spec)
    active = pattern.active_BHQK[0, 0]
    if kind == "topk":
        hot = [int(b) for b in re.search(r"hot key blocks \[([0-9, ]+)\]", note).group(1).split(", ")]
        # Every query block past the local one picks every hot block before it.
        for block in hot:
            assert bool(active[block + 1 :, block].all()), block
    else:
        match = re.search(r"planted key columns \[([0-9, ]+)\], slash offset (\d+)", note)
        columns = [int(c) for c in match.group(1).split(", ")]
        offset = int(match.group(2))
        assert all(bool(pattern.bars_BHS[0, 0, c]) for c in columns), columns
        # The slash: every query block far enough along holds the key block ``offset`` tokens back.
        n = active.shape[0]
        assert all(bool(active[q, (q * 32 - offset) // 32]) for q in range(offset // 32 + 1, n))


def _ring_bytes(kind: str, seq: int, node_size: int):
    """On every rank: forward bytes of the flat sparse ring and of the hierarchical one for one pattern."""
    from sparsetron.parallel.context.sparse_hier import (
        HierarchicalRingStats,
        hierarchical_sparse_ring_attention,
        hierarchy_groups,
    )
    from sparsetron.parallel.context.sparse_ring import SparseRingStats, sparse_ring_attention

    q, k, v, _ = inputs(seq, 7)
    pattern = pattern_of(kind, q, k)
    idx = stripe(seq, dist.get_world_size(), dist.get_rank())
    flat_stats, hier_stats = SparseRingStats(), HierarchicalRingStats()
    shards = [t[:, idx] for t in (q, k, v)]
    sparse_ring_attention(*shards, pattern, stats=flat_stats)
    groups = hierarchy_groups(node_size)
    hierarchical_sparse_ring_attention(*shards, pattern, node_size=node_size, groups=groups, stats=hier_stats)
    return flat_stats.forward_bytes, hier_stats.forward_inter, hier_stats.forward_intra


@pytest.mark.parametrize("kind", ["window", "vertical_slash"])
def test_hierarchical_bytes_are_what_the_rings_send(ranks, kind):
    """4 gloo ranks as 2 nodes × 2: the report's per-offset inter/intra-node bytes and the flat ring's bytes
    across and within nodes equal the sums of the rings' own per-rank counters."""
    seq, world, node_size = 64, 4, 2
    per_rank = ranks.run(world, _ring_bytes, kind, seq, node_size, timeout=120)
    q, k, _, _ = inputs(seq, 7)
    plan = plan_striped(pattern_of(kind, q, k), world)
    traffic = hierarchical_traffic(plan, node_size, BLOCK_BYTES)
    assert traffic.inter_T == [sum(r[1][t] for r in per_rank) for t in range(2)]
    assert traffic.intra_T == [sum(sum(r[2][t]) for r in per_rank) for t in range(2)]
    # The flat ring's step s brings rank r the blocks of rank r − s: across nodes when their nodes differ.
    crossing = sum(r[0][s] for rank, r in enumerate(per_rank) for s in range(1, world)
                   if rank // node_size != (rank - s) % world // node_size)  # fmt: skip
    total = sum(sum(r[0]) for r in per_rank)
    assert traffic.flat_inter == crossing and traffic.flat_intra == total - crossing
    assert traffic.inter_T[1] > 0


def test_sparse_cp_prints_the_hierarchical_traffic(tmp_path):
    args = ["--pattern", "topk", "--k", "4", *SMALL, "--node-size", "2", "--json", str(tmp_path / "r.json")]
    result = invoke("bench", "sparse-cp", *args)
    assert result.exit_code == 0, result.output
    hierarchy = json.loads((tmp_path / "r.json").read_text())["hierarchy"]
    spec = SparseCPSpec(pattern="topk", k=4, seq=1024, block=32, world=4, heads=2, kv_heads=1)
    q, k = _same_inputs(spec)
    plan = plan_striped(block_topk(pool_blocks(q, 32), pool_blocks(k, 32), 32, k=4), 4)
    expected = hierarchical_traffic(plan, 2, BLOCK_KIB * 1024)
    assert hierarchy == {"node_size": 2, "nodes": 2, "inter_T": expected.inter_T, "intra_T": expected.intra_T,
                         "flat_inter": expected.flat_inter, "flat_intra": expected.flat_intra}  # fmt: skip
    text = flat(result.output)
    assert "W=4 (2 nodes × 2)" in text
    inter_kib = sum(expected.inter_T) / 1024
    assert f"hierarchical 2 nodes × 2: inter-node {inter_kib:.1f} KiB" in text, text
    assert "hierarchical ring, per node offset" in text
    rows = re.findall(r"^\s*(\d)\s+([0-9.]+ \S+)\s+([0-9.]+ \S+)\s*$", result.output, re.M)
    assert [r[0] for r in rows] == ["0", "1"], result.output
    assert rows[0][1] == "0 B" and rows[1][1] == f"{expected.inter_T[1] / 1024:.1f} KiB"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--seq", "1000", "--block", "64", "--world", "4"],
         ["--seq 1000 must be a multiple of --block × --world = 64 × 4 = 256", "use --seq 768 or 1024"]),
        (["--seq", "1024", "--world", "4", "--node-size", "3"],
         ["--node-size 3 must divide --world 4", "use one of 1, 2, 4"]),
        (["--pattern", "dilated"], ["--pattern dilated is not one of window, strided, topk, vertical_slash"]),
        (["--pattern", "window", "--inputs", "planted"], ["--inputs planted applies to topk and vertical_slash"]),
        (["--heads", "6", "--kv-heads", "4"], ["--heads 6 must be a multiple of --kv-heads 4"]),
        (["--mass", "0.5", "--verticals", "3", "--slashes", "2"], ["either --mass or --verticals"]),
    ],
)  # fmt: skip
def test_bad_arguments_exit_2_naming_value_rule_and_fix(args, expected, tmp_path):
    result = invoke("bench", "sparse-cp", *args, "--plot", str(tmp_path / "plots"))
    assert result.exit_code == 2, result.output
    text = flat(result.output)
    assert text.startswith("error:")
    for part in expected:
        assert part in text, text
    assert not (tmp_path / "plots").exists()  # nothing drawn


def test_several_bad_arguments_are_listed_together():
    result = invoke("bench", "sparse-cp", "--seq", "1000", "--node-size", "3")
    assert result.exit_code == 2
    text = flat(result.output)
    assert "bad arguments: - --seq 1000 must be" in text and "- --node-size 3 must divide --world 4" in text


def test_the_installed_command_runs_outside_the_checkout(tmp_path):
    """From another directory, as a process: the command needs nothing of benchmarks/ (not installed)."""
    command = [sys.executable, "-m", "sparsetron.cli", "bench", "sparse-cp", "--pattern", "strided", *SMALL]
    ok = subprocess.run(command, env=clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert ok.returncode == 0, ok.stderr
    assert "density" in ok.stdout and "per ring step" in ok.stdout
    bad = subprocess.run([*command, "--world", "3"], env=clean_env(), cwd=tmp_path, capture_output=True, text=True,
                         timeout=240)  # fmt: skip
    assert bad.returncode == 2 and "--seq 1024 must be a multiple of" in bad.stderr
