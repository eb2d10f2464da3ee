"""`sparsetron launch` on a real Slurm (tests/slurm_lab.py): sbatch submission, the rendered batch script,
torchrun c10d rendezvous or one task per rank, on one host and on two fake hosts in network namespaces."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from launch_env import REPO, clean_env
from slurm_lab import SlurmLab, skip_reason, slurm_cluster

_SKIP = skip_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

DEMO = str(REPO / "configs" / "train" / "demo.yaml")
QUICK = ["model.preset=tiny", "train.seq_len=128", "train.global_batch_tokens=1024", "train.steps=2",
         "train.warmup_steps=1"]  # fmt: skip
JOB_TIMEOUT_S = 150


def _cluster_yaml(path: Path, lab: SlurmLab, **extra: object) -> Path:
    """A cluster file for ``lab``: Slurm, its partition, CPU ranks, ``extra`` keys (nodes, profile ...)."""
    keys = {"scheduler": "slurm", "partition": lab.partition, "device": "cpu", **extra}
    path.write_text("cluster:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in keys.items()))
    return path


def _launch_and_wait(lab: SlurmLab, cluster_yaml: Path, run_dir: Path, *overrides: str) -> dict[str, str]:
    """Submit the quick demo through ``sparsetron launch``; wait for the job; its ``scontrol`` fields.

    Fails with the job's output, the ranks' logs and the daemons' log tails unless it COMPLETED.
    """
    proc = subprocess.run(
        [sys.executable, "-m", "sparsetron.cli", "launch", str(cluster_yaml), "--", "train", DEMO, *QUICK,
         f"train.run_dir={run_dir}", *overrides],
        capture_output=True, text=True, timeout=120, env=clean_env() | {"SLURM_CONF": str(lab.conf)},
        cwd=run_dir.parent,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = re.search(r"submitted Slurm job (\d+) \((.+)\)", proc.stdout)
    assert found, f"no job id in the launch output:\n{proc.stdout}\n{proc.stderr}"
    job_id = found.group(1)
    assert Path(found.group(2)) == run_dir / "launch" / "job.sbatch"
    try:
        info = lab.wait_job(job_id, JOB_TIMEOUT_S)
    except TimeoutError as exc:
        pytest.fail(f"{exc}\n{_job_output(run_dir, job_id)}")
    if info.get("JobState") != "COMPLETED":
        brief = {k: info.get(k) for k in ("JobState", "Reason", "ExitCode", "NodeList", "RunTime")}
        pytest.fail(
            f"Slurm job {job_id} did not complete: {brief}\n{_job_output(run_dir, job_id)}\n{lab.log_tails()}"
        )
    assert info.get("ExitCode") == "0:0", info
    return info


def _job_output(run_dir: Path, job_id: str, chars: int = 4000) -> str:
    """The batch output file and the ranks' log files of a job, for failure messages."""
    files = [run_dir / f"slurm-{job_id}.out", *sorted((run_dir / "logs").rglob("*.log"))]
    return "\n".join(
        f"--- {f} ---\n{f.read_text(errors='replace')[-chars:]}" if f.exists() else f"--- {f}: missing ---"
        for f in files
    )


def _topology(run_dir: Path) -> dict:
    return json.loads((run_dir / "topology.json").read_text())


def _metric_lines(run_dir: Path) -> int:
    return len((run_dir / "metrics.jsonl").read_text().splitlines())


def _free_port() -> int:
    """A TCP port free on this host now."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> SlurmLab:
    """Slurm on fake hosts n1 and n2 (network namespaces), shared by the two-node tests."""
    with slurm_cluster(tmp_path_factory.mktemp("slurm2"), nodes=2) as lab:
        yield lab


def test_single_node_slurm_job_trains(tmp_path):
    with slurm_cluster(tmp_path, nodes=1) as lab:
        # A free rendezvous port: other tests may run torchrun on this host's 29500 at the same time.
        cluster = _cluster_yaml(tmp_path / "cluster.yaml", lab, nodes=1, procs_per_node=2,
                                network_profile="loopback", rdzv_port=_free_port())  # fmt: skip
        run_dir = tmp_path / "run"
        info = _launch_and_wait(lab, cluster, run_dir, "parallel.dp_replicate=1")
    assert info["NodeList"] == lab.nodes[0]
    assert _metric_lines(run_dir) == 2
    topology = _topology(run_dir)
    assert sorted(r["rank"] for r in topology["ranks"]) == [0, 1]
    assert topology["launcher"] == "torchrun"
    assert "rendezvous at 127.0.0.1:" in (run_dir / f"slurm-{info['JobId']}.out").read_text()


@pytest.mark.parametrize(("tasks", "launcher"), [("node", "torchrun"), ("process", "slurm")])
def test_two_node_slurm_job_trains_across_hosts(two_nodes, tmp_path, tasks, launcher):
    # rdzv_port 0: the script derives the port from the job id.
    cluster = _cluster_yaml(tmp_path / "cluster.yaml", two_nodes, nodes=2, procs_per_node=2,
                            network_profile="socket", network_interface=two_nodes.interface,
                            slurm_tasks=tasks, rdzv_port=0)  # fmt: skip
    run_dir = tmp_path / "run"
    info = _launch_and_wait(two_nodes, cluster, run_dir, "parallel.dp_replicate=2", "parallel.dp_shard=2")
    assert info["NodeList"] == "n[1-2]"
    assert _metric_lines(run_dir) == 2
    topology = _topology(run_dir)
    ranks = topology["ranks"]
    assert sorted(r["rank"] for r in ranks) == [0, 1, 2, 3]
    assert Counter(r["host"] for r in ranks) == {"n1": 2, "n2": 2}, ranks
    assert sorted((r["host"], r["local_rank"]) for r in ranks) == [("n1", 0), ("n1", 1), ("n2", 0), ("n2", 1)]
    assert topology["launcher"] == launcher, topology
    # The rendezvous host is n1's bridge address, resolved inside the namespace (not loopback).
    output = (run_dir / f"slurm-{info['JobId']}.out").read_text()
    assert re.search(r"rendezvous at 10\.123\.\d+\.1:\d+ on 2 node\(s\)", output), output


def test_usr1_before_the_time_limit_checkpoints_and_requeues(tmp_path):
    """What `--signal=B:USR1@120` does near the time limit, sent by hand: the batch shell requeues the job,
    Slurm's SIGTERM makes the ranks save a checkpoint, and the requeued job resumes from it and finishes."""
    with slurm_cluster(tmp_path, nodes=1) as lab:
        cluster = _cluster_yaml(tmp_path / "cluster.yaml", lab, nodes=1, procs_per_node=2,
                                network_profile="loopback", rdzv_port=_free_port())  # fmt: skip
        run_dir = tmp_path / "run"
        steps = ["train.steps=40", "checkpoint.interval=0", "parallel.dp_replicate=1"]  # only signal saves
        proc = subprocess.run(
            [sys.executable, "-m", "sparsetron.cli", "launch", str(cluster), "--", "train", DEMO, *QUICK, *steps,
             f"train.run_dir={run_dir}"],
            capture_output=True, text=True, timeout=120, env=clean_env() | {"SLURM_CONF": str(lab.conf)},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        job_id = re.search(r"submitted Slurm job (\d+)", proc.stdout).group(1)
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not metrics.exists() or len(metrics.read_text().splitlines()) < 3:
            assert time.monotonic() < deadline, _job_output(run_dir, job_id)
            time.sleep(0.1)
        lab.run("scancel", "--signal=USR1", "--batch", job_id)
        # Slurm holds a requeued job back for a while before it may start again; release it now.
        while (
            lab.job_info(job_id).get("Restarts") != "1" or lab.job_info(job_id).get("JobState") != "PENDING"
        ):
            assert time.monotonic() < deadline, f"{lab.job_info(job_id)}\n{_job_output(run_dir, job_id)}"
            time.sleep(0.2)
        lab.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
        info = lab.wait_job(job_id, JOB_TIMEOUT_S)
        brief = f"{info}\n{_job_output(run_dir, job_id)}"
    assert info.get("JobState") == "COMPLETED" and info.get("Restarts") == "1", brief
    # Both runs append to one output file: the first ends in the requeue, the second resumes.
    output = (run_dir / f"slurm-{job_id}.out").read_text()
    assert "time limit near: requeueing" in output, brief
    resumed = re.search(r"resumed from .*step-(\d{8}) at step (\d+)", output)
    assert resumed and 3 <= int(resumed.group(2)) < 40, brief  # the checkpoint the signal saved
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, 41))
