"""`sparsetron launch` on two hosts without a scheduler: the same torchrun launch run on each of two network
namespaces (each its own host name, which resolves nowhere), rendezvous over a veth link, one shared run
directory. It passes only if each node advertises its veth address (``--local-addr``) and the first node
knows to serve the rendezvous store (``--rdzv-conf=is_host``): torchrun's host-name guesses fail here."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch_env import REPO, clean_env
from netns_hosts import NetnsHost, NetnsHosts, kill_group, missing_prerequisites

DEMO = str(REPO / "configs" / "train" / "demo.yaml")
QUICK = ["model.preset=tiny", "train.seq_len=128", "train.global_batch_tokens=1024", "train.steps=2",
         "train.warmup_steps=1", "parallel.dp_replicate=2", "parallel.dp_shard=2"]  # fmt: skip
TIMEOUT_S = 90
# Rendezvous port on the first host: namespaces have their own ports, so a fixed one cannot clash.
RDZV_PORT = 29411

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(missing_prerequisites() is not None, reason=f"{missing_prerequisites()}"),
]


def _cluster_yaml(path: Path, hosts: NetnsHosts, interface: str) -> Path:
    """Cluster file of the two namespaces. Each veth end has its own name, so each node overrides it."""
    addresses = ", ".join(h.ip for h in hosts.hosts)
    path.write_text(
        "cluster:\n  scheduler: torchrun\n  nodes: 2\n  procs_per_node: 2\n  device: cpu\n"
        f"  hosts: [{addresses}]\n  network_profile: socket\n  network_interface: {interface}\n"
        f"  rdzv_port: {RDZV_PORT}\n"
    )
    return path


def _rank_logs(run_dir: Path) -> str:
    """Every rank's torchrun log (stdout and stderr), for assertion messages."""
    parts = []
    for log in sorted((run_dir / "logs").rglob("*.log")):
        parts.append(f"--- {log.relative_to(run_dir)}\n{log.read_text(errors='replace')[-3000:]}")
    return "\n".join(parts) or f"(no rank logs under {run_dir / 'logs'})"


def _wait_all(procs: list[subprocess.Popen], deadline: float) -> bool:
    """Wait until every node exits or ``deadline`` passes; True when it timed out.

    A failed node does not end the wait: its peer fails soon after (torchrun's rendezvous and the ranks'
    Gloo timeouts), and both outputs explain the failure better than one.
    """
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline:
            return True
        time.sleep(0.2)
    return False


def _launch_argv(cluster: Path, run_dir: Path, interface: str, *, dry_run: bool = False) -> list[str]:
    """One node's `sparsetron launch` of the quick demo job, on its own veth."""
    return [sys.executable, "-m", "sparsetron.cli", "launch", str(cluster), *(["--dry-run"] if dry_run else []),
            "--", "train", DEMO, *QUICK, f"train.run_dir={run_dir}",
            f"cluster.network_interface={interface}"]  # fmt: skip


def test_each_node_renders_its_own_address_and_only_the_first_hosts_the_store(tmp_path):
    with NetnsHosts() as hosts:
        cluster = _cluster_yaml(tmp_path / "cluster.yaml", hosts, hosts.hosts[0].dev)
        commands = []
        for host in hosts.hosts:
            argv = host.command(_launch_argv(cluster, tmp_path / "run", host.dev, dry_run=True))
            proc = subprocess.run(
                argv, env=clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120
            )
            assert proc.returncode == 0, proc.stdout + proc.stderr
            commands.append(
                next(line for line in proc.stdout.splitlines() if "torch.distributed.run" in line)
            )
    (first, second), (a, b) = commands, hosts.hosts
    assert f"--local-addr={a.ip}" in first and "--rdzv-conf=is_host=true" in first, first
    assert f"--local-addr={b.ip}" in second and "--rdzv-conf=is_host=false" in second, second
    for command in commands:
        assert f"--rdzv-endpoint={a.ip}:{RDZV_PORT}" in command, command


def _start(host: NetnsHost, argv: list[str], output: Path, cwd: Path) -> subprocess.Popen:
    """Start ``argv`` on ``host``, stdout and stderr to ``output``, leading a process group of its own."""
    with open(output, "w") as out:  # the child keeps its own handle
        return subprocess.Popen(
            host.command(argv), env=clean_env(), cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def test_two_namespace_hosts_train_over_torchrun(tmp_path):
    run_dir = tmp_path / "run"
    with NetnsHosts() as hosts:
        cluster = _cluster_yaml(tmp_path / "cluster.yaml", hosts, hosts.hosts[0].dev)
        outputs = [tmp_path / f"{host.hostname}.out" for host in hosts.hosts]
        procs = []
        try:
            for host, output in zip(hosts.hosts, outputs, strict=True):
                procs.append(_start(host, _launch_argv(cluster, run_dir, host.dev), output, tmp_path))
            timed_out = _wait_all(procs, time.monotonic() + TIMEOUT_S)
        finally:
            for proc in procs:
                kill_group(proc)
    node_output = "".join(
        f"=== {host.hostname} ({host.ip}) ===\n{output.read_text(errors='replace')[-4000:]}\n"
        for host, output in zip(hosts.hosts, outputs, strict=True)
    )
    report = f"{node_output}\n{_rank_logs(run_dir)}"
    assert not timed_out, f"the two nodes did not finish within {TIMEOUT_S} s\n{report}"
    assert [p.returncode for p in procs] == [0, 0], report
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2, report
    topology = json.loads((run_dir / "topology.json").read_text())
    assert topology["launcher"] == "torchrun"
    ranks = sorted((r["rank"], r["host"], r["local_rank"]) for r in topology["ranks"])
    assert [r[0] for r in ranks] == [0, 1, 2, 3], ranks
    by_host = {h: sorted(r[2] for r in ranks if r[1] == h) for h in {r[1] for r in ranks}}
    assert by_host == {h.hostname: [0, 1] for h in hosts.hosts}, ranks  # two ranks on each namespace host


def test_an_interface_without_ipv4_is_refused_before_anything_runs(tmp_path):
    """A node whose cluster.network_interface has no IPv4 address: refused with the fix, nothing started."""
    run_dir = tmp_path / "run"
    with NetnsHosts() as hosts:
        host = hosts.hosts[0]
        # The namespace's veth stays; its address goes, as on a node whose NIC is not configured yet.
        subprocess.run(["ip", "-n", host.ns, "addr", "flush", "dev", host.dev], check=True, timeout=30)
        cluster = _cluster_yaml(tmp_path / "cluster.yaml", hosts, host.dev)
        argv = _launch_argv(cluster, run_dir, host.dev)
        proc = subprocess.run(
            host.command(argv), env=clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
    text = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 2, text
    assert f"network interface '{host.dev}' has no IPv4 address" in text, text
    assert f"ip addr add ADDR/PREFIX dev {host.dev}" in text, text
    assert not run_dir.exists()
