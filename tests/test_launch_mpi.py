"""`sparsetron launch` with a real MPI: mpich's mpirun (from the venv, the MPI mpi4py loads) starts 4 ranks on
this machine, which find their rank, node and rendezvous from MPI alone, then train the quick demo job."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from launch_env import REPO, clean_env

DEMO = str(REPO / "configs" / "train" / "demo.yaml")
QUICK = ["model.preset=tiny", "train.seq_len=128", "train.global_batch_tokens=1024", "train.steps=2",
         "train.warmup_steps=1", "parallel.dp_replicate=2", "parallel.dp_shard=2"]  # fmt: skip
TIMEOUT_S = 90


def _missing_mpi() -> str | None:
    """Why a real MPI launch cannot run here (a skip reason), or None when it can."""
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed; install the extra: pip install 'sparsetron[mpi]' (mpich + mpi4py)"
    # The launch uses the mpirun beside the nodes' python first, then PATH's (render.mpi_launcher).
    if not (Path(sys.executable).parent / "mpirun").exists() and shutil.which("mpirun") is None:
        return f"no mpirun beside {sys.executable} nor on PATH; pip install mpich"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_missing_mpi() is not None, reason=f"{_missing_mpi()}")]


def test_mpich_launch_trains_on_four_ranks(tmp_path):
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(
        "cluster:\n  scheduler: mpi\n  mpi: mpich\n  nodes: 1\n  procs_per_node: 4\n  device: cpu\n"
        "  network_profile: loopback\n"
    )
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "sparsetron.cli", "launch", str(cluster), "--", "train", DEMO, *QUICK,
         f"train.run_dir={run_dir}"],
        capture_output=True, text=True, timeout=TIMEOUT_S, env=clean_env(), cwd=tmp_path,
    )  # fmt: skip
    # mpirun gathers every rank's output into its own stdout/stderr.
    output = f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, output
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2, output
    topology = json.loads((run_dir / "topology.json").read_text())
    assert topology["launcher"] == "mpi", topology
    ranks = sorted((r["rank"], r["local_rank"], r["host"]) for r in topology["ranks"])
    assert [r[0] for r in ranks] == [0, 1, 2, 3], ranks
    # One node: MPI's shared-memory split holds all 4 ranks, so local ranks are 0..3 on one host.
    assert [r[1] for r in ranks] == [0, 1, 2, 3] and len({r[2] for r in ranks}) == 1, ranks
