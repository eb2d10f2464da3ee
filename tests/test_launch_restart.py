"""Restart from checkpoint: a rank killed mid-run under `sparsetron launch` with cluster.max_restarts makes
torchrun restart the job, which resumes from the last complete checkpoint and ends with the same final loss
as an uninterrupted run (fp32 on the CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from launch_env import REPO, clean_env

DEMO = str(REPO / "configs" / "train" / "demo.yaml")
TRAIN = ["model.preset=tiny", "train.seq_len=128", "train.global_batch_tokens=1024", "train.steps=8",
         "train.warmup_steps=1", "parallel.dp_replicate=1", "checkpoint.interval=2", "checkpoint.keep_last=4"]  # fmt: skip
_TIMEOUT_S = 240


def _cluster(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "cluster:\n  scheduler: local\n  nodes: 1\n  procs_per_node: 2\n  device: cpu\n"
        "  network_profile: loopback\n  max_restarts: 1\n"
    )
    return path


def _launch(tmp_path: Path, run_dir: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "sparsetron.cli", "launch", str(_cluster(tmp_path)), "--", "train", DEMO,
            *TRAIN, f"train.run_dir={run_dir}"]  # fmt: skip
    return subprocess.Popen(
        argv, env=clean_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


def _worker_pid(config: Path, rank: int) -> int | None:
    """The pid of the training worker of ``rank`` running ``config`` (read from /proc), if any."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # exited meanwhile, or not ours to read
            continue
        ours = b"sparsetron.train.worker" in cmdline and str(config).encode() in cmdline
        if ours and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def _kill_rank_after_checkpoint(run_dir: Path, step: int, rank: int, deadline: float) -> None:
    checkpoint = run_dir / "checkpoints" / f"step-{step:08d}"
    while not checkpoint.is_dir():  # a complete checkpoint: the rename is the commit
        assert time.monotonic() < deadline, f"no checkpoint {checkpoint} appeared"
        time.sleep(0.02)
    pid = _worker_pid(run_dir / "config.yaml", rank)
    assert pid is not None, f"rank {rank}'s worker process was not found"
    os.kill(pid, signal.SIGKILL)


def test_a_killed_rank_restarts_from_the_last_checkpoint_and_ends_with_the_same_loss(tmp_path):
    straight_dir = tmp_path / "straight"
    straight = _launch(tmp_path, straight_dir)
    out, _ = straight.communicate(timeout=_TIMEOUT_S)
    assert straight.returncode == 0, out[-4000:]

    killed_dir = tmp_path / "killed"
    killed = _launch(tmp_path, killed_dir)
    try:
        _kill_rank_after_checkpoint(killed_dir, 4, 1, time.monotonic() + _TIMEOUT_S)
        out, _ = killed.communicate(timeout=_TIMEOUT_S)
    finally:
        killed.kill()
    assert killed.returncode == 0, out[-4000:]

    # torchrun restarted the worker group once; the second attempt resumed from a checkpoint.
    attempts = sorted(p.name for p in (killed_dir / "logs").glob("*/attempt_*"))
    assert attempts == ["attempt_0", "attempt_1"], attempts
    resumed = next((killed_dir / "logs").glob("*/attempt_1/0/stdout.log")).read_text()
    assert "resumed from" in resumed and "step-0000000" in resumed
    expected, got = _losses(straight_dir), _losses(killed_dir)
    assert sorted(got) == list(range(1, 9))
    assert got[8] == expected[8], (got, expected)
