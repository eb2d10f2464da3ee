"""A real Slurm cluster for tests: munged, slurmctld and slurmd(s) under a tmp dir, stopped by PID on exit.

Two shapes (recipes measured in /work/shared/CLUSTER-LAB.md sections 1 and 1b):

- ``nodes=1``: one slurmd on this host, in the root network namespace.
- ``nodes=2``: fake hosts ``n1`` and ``n2``, each a network namespace with its own UTS hostname, joined by a
  bridge in the root namespace where slurmctld runs. ``/etc/netns/<ns>/hosts`` (bind-mounted over /etc/hosts
  by ``ip netns exec``) resolves both node names inside every namespace.

Every cluster has its own munge key and socket, its own slurm.conf (``SLURM_CONF`` in :attr:`SlurmLab.env`)
and free TCP ports, so it neither needs nor touches a system Slurm. On exit it cancels its jobs, stops every
process it started (and any job process left in its namespaces) by PID, deletes its namespaces, links and
``/etc/netns`` files.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

#: Programs the lab needs; a missing one skips the tests that use it.
REQUIRED_PROGRAMS = (
    "munged",
    "slurmctld",
    "slurmd",
    "sbatch",
    "squeue",
    "scontrol",
    "sinfo",
    "ip",
    "unshare",
)
PARTITION = "debug"
#: Interface name of each fake node's veth, inside its namespace.
NODE_INTERFACE = "eth0"
_TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
    "PREEMPTED", "SPECIAL_EXIT",
}  # fmt: skip


def skip_reason() -> str | None:
    """Why a real Slurm cannot be started here (None when it can): root is needed, and the programs."""
    if os.geteuid() != 0:
        return "a real Slurm lab needs root (daemons, network namespaces)"
    missing = [p for p in REQUIRED_PROGRAMS if shutil.which(p) is None]
    if missing:
        return (
            f"Slurm lab needs {', '.join(missing)} (apt-get install -y slurm-wlm munge libpmix-dev iproute2)"
        )
    return None


@dataclass
class SlurmLab:
    """A running cluster: where its files are and the environment its clients (sbatch, squeue) need."""

    root: Path
    conf: Path
    env: dict[str, str]
    nodes: list[str]
    partition: str = PARTITION
    #: The NIC the nodes reach each other on (None on the single-node cluster: loopback).
    interface: str | None = None
    logs: list[Path] = field(default_factory=list)

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A Slurm client command against this cluster."""
        done = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=30)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as key → value (``JobState``, ``ExitCode``, ``Reason``, ``NodeList`` ...)."""
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_job(self, job_id: str, timeout: float) -> dict[str, str]:
        """Wait until the job has left the queue in a final state; its ``scontrol`` fields.

        Raises TimeoutError with the job's fields and the daemons' log tails when it is still there.
        """
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            queued = self.run("squeue", "-h", "-j", job_id, check=False).stdout.strip()
            info = self.job_info(job_id)
            if not queued and info.get("JobState") in _TERMINAL_STATES:
                return info
            time.sleep(0.5)
        raise TimeoutError(
            f"Slurm job {job_id} still queued after {timeout:.0f} s: {info}\n{self.log_tails()}"
        )

    def log_tails(self, lines: int = 25) -> str:
        """The last lines of every daemon's log, for error messages."""
        return "\n".join(f"--- {p.name} ---\n{_tail(p, lines)}" for p in self.logs)


def _tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a file, or why there are none."""
    if not path.exists():
        return "(no log written)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _free_port() -> int:
    """A TCP port nobody listens on now in this namespace (kept free by the OS for a while after close)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _sh(*argv: str) -> None:
    """Run a setup command; fail with its stderr."""
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")


def _kill(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM ``pid``, then SIGKILL after ``timeout``; a process already gone is fine."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def _stop_popen(proc: subprocess.Popen) -> None:
    """Stop a daemon started in the foreground (``-D``) and reap it."""
    _kill(proc.pid)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _pids_with_env(key: str, value: str) -> list[int]:
    """Processes whose environment holds ``key=value``: job steps and ranks our slurmd started.

    slurmstepd reparents away from slurmd, so this (with a unique SLURM_CONF path) is how leftovers of a
    failed test are found without touching anyone else's processes.
    """
    needle = f"{key}={value}".encode() + b"\0"
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
    return pids


def _start_munge(stack: contextlib.ExitStack, root: Path) -> Path:
    """Start munged with its own key and socket; return the socket path (stopped by PID on exit).

    The socket lives in a short directory of its own under /tmp: munged wants its directory executable by
    all (pytest's tmp dirs are 0700) and socket paths are limited to 108 bytes.
    """
    sock_dir = Path(tempfile.mkdtemp(prefix="stl-munge-"))
    stack.callback(shutil.rmtree, sock_dir, ignore_errors=True)
    sock_dir.chmod(0o755)
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    pid_file = sock_dir / "munged.pid"
    _sh(
        "munged", f"--key-file={key}", f"--socket={sock_dir}/munge.sock", f"--pid-file={pid_file}",
        f"--log-file={root / 'log' / 'munged.log'}", f"--seed-file={root / 'munged.seed'}",
    )  # fmt: skip
    # munged daemonizes itself: its PID is only in the pid file.
    stack.callback(lambda: _kill(int(pid_file.read_text().split()[0])) if pid_file.exists() else None)
    return sock_dir / "munge.sock"


def _slurm_conf(root: Path, munge_socket: Path, ctld_host: str, nodes: dict[str, str]) -> str:
    """slurm.conf: root daemons, no accounting or cgroups, per-node spool/pid/log/TmpFS (%n), free ports."""
    node_lines = [f"NodeName={n} NodeAddr={a} CPUs=2 RealMemory=2000 State=UNKNOWN" for n, a in nodes.items()]
    settings = [
        "ClusterName=stl",
        f"SlurmctldHost={ctld_host}",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        f"AuthInfo=socket={munge_socket}",
        "CredType=cred/munge",
        "MpiDefault=none",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "ReturnToService=2",
        f"MailProg={shutil.which('true')}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool-%n'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd-%n.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd-%n.log'}",
        # Each fake node needs its own TmpFS, else their job dirs collide.
        f"TmpFS={root / 'tmp-%n'}",
        *node_lines,
        f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
    ]
    return "\n".join(settings) + "\n"


def _pick_subnet() -> str:
    """A free 10.123.X.0/24 prefix (``10.123.X``), X from our PID so concurrent labs do not collide."""
    in_use = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    in_use += subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    for offset in range(100):
        prefix = f"10.123.{(os.getpid() + offset) % 200 + 20}"
        if f"{prefix}." not in in_use:
            return prefix
    raise RuntimeError(f"no free 10.123.X.0/24 subnet for the Slurm lab bridge:\n{in_use}")


def _make_network(stack: contextlib.ExitStack, tag: str, names: list[str]) -> dict[str, str]:
    """Bridge + one namespace per node (veth ``eth0`` inside), /etc/netns hosts files; node → address.

    ``tag`` makes every name unique (≤ 15 characters for links); the namespaces are ``<tag>-<node>``.
    """
    prefix = _pick_subnet()
    bridge = f"{tag}-br"
    _sh("ip", "link", "add", bridge, "type", "bridge")
    stack.callback(subprocess.run, ["ip", "link", "del", bridge], capture_output=True)
    _sh("ip", "addr", "add", f"{prefix}.254/24", "dev", bridge)
    _sh("ip", "link", "set", bridge, "up")
    addresses = {name: f"{prefix}.{i}" for i, name in enumerate(names, start=1)}
    hosts = "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in addresses.items())
    netns_etc = Path("/etc/netns")
    if not netns_etc.exists() or all(p.name.startswith("stl") for p in netns_etc.iterdir()):
        # Absent, or made by a concurrent lab (xdist) that may finish first: the last lab out removes it.
        stack.callback(_remove_if_empty, netns_etc)
    for name, address in addresses.items():
        ns = f"{tag}-{name}"
        _sh("ip", "netns", "add", ns)
        # Deleting the namespace deletes both ends of its veth.
        stack.callback(subprocess.run, ["ip", "netns", "del", ns], capture_output=True)
        stack.callback(_kill_namespace_processes, ns)
        etc = netns_etc / ns
        etc.mkdir(parents=True)
        stack.callback(shutil.rmtree, etc, ignore_errors=True)
        (etc / "hosts").write_text(hosts)
        host_end = f"{ns}h"
        _sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", NODE_INTERFACE, "netns", ns)
        _sh("ip", "link", "set", host_end, "master", bridge, "up")
        _sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", NODE_INTERFACE)
        _sh("ip", "-n", ns, "link", "set", NODE_INTERFACE, "up")
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
    addresses["ctld"] = f"{prefix}.254"
    return addresses


def _remove_if_empty(directory: Path) -> None:
    """rmdir ``directory`` unless something is (still, or again) in it."""
    with contextlib.suppress(OSError):
        directory.rmdir()


def _kill_namespace_processes(ns: str) -> None:
    """Stop whatever still runs in our namespace (job steps, ranks) before it is deleted."""
    done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    for pid in done.stdout.split():
        _kill(int(pid), timeout=5)


def _wait_idle(lab: SlurmLab, procs: list[subprocess.Popen], timeout: float) -> None:
    """Wait for ``sinfo`` to show every node idle; fail with the daemons' log tails if they do not."""
    deadline = time.monotonic() + timeout
    states = ""
    while time.monotonic() < deadline:
        dead = [p.args for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"Slurm daemon exited during startup: {dead}\n{lab.log_tails()}")
        states = lab.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
        idle = {line.split()[0] for line in states.splitlines() if line.split()[1:] == ["idle"]}
        if idle >= set(lab.nodes):
            return
        time.sleep(0.2)
    raise RuntimeError(
        f"Slurm nodes {lab.nodes} not idle after {timeout:.0f} s (sinfo: {states.strip() or 'nothing'})\n"
        + lab.log_tails()
    )


def _cancel_jobs(lab: SlurmLab, timeout: float = 20.0) -> None:
    """Cancel every job of this cluster and wait (bounded) until the queue is empty."""
    lab.run("scancel", "--user=root", check=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and lab.run("squeue", "-h", check=False).stdout.strip():
        time.sleep(0.5)


@contextlib.contextmanager
def slurm_cluster(tmp: Path, nodes: int = 1, startup_timeout: float = 30.0) -> Iterator[SlurmLab]:
    """Start a Slurm cluster under ``tmp`` (1 node: this host; 2 nodes: ``n1``, ``n2`` on namespaces).

    Everything started is stopped by PID on exit, and namespaces, links and /etc/netns files are removed,
    also when startup or the test fails.
    """
    if nodes not in (1, 2):
        raise ValueError(f"the Slurm lab has 1 or 2 nodes, not {nodes}")
    root = tmp / "slurm"
    for sub in ("state", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().split(".")[0]
    tag = f"stl{os.getpid() % 100000}"
    with contextlib.ExitStack() as stack:
        munge_socket = _start_munge(stack, root)
        if nodes == 1:
            names, ctld_host, node_addrs = [host], host, {host: host}
        else:
            names = ["n1", "n2"]
            node_addrs = _make_network(stack, tag, names)
            ctld_host = f"{host}({node_addrs.pop('ctld')})"
            # `ip netns exec` remounts sysfs, so slurmd cannot autodetect the cgroup version.
            (root / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")
        for name in names:
            (root / f"tmp-{name}").mkdir(exist_ok=True)
        conf = root / "slurm.conf"
        conf.write_text(_slurm_conf(root, munge_socket, ctld_host, node_addrs))
        env = {**os.environ, "SLURM_CONF": str(conf)}
        logs = [root / "log" / "munged.log", root / "log" / "slurmctld.log"]
        logs += [root / "log" / f"slurmd-{n}.log" for n in names]
        lab = SlurmLab(root, conf, env, names, interface=None if nodes == 1 else NODE_INTERFACE, logs=logs)
        # Job processes inherit SLURM_CONF: a unique path that finds leftovers (see _pids_with_env).
        stack.callback(lambda: [_kill(pid, timeout=5) for pid in _pids_with_env("SLURM_CONF", str(conf))])
        procs = [_daemon(stack, ["slurmctld", "-D", "-i"], env, root / "log" / "slurmctld.out")]
        for name in names:
            if nodes == 1:
                argv = ["slurmd", "-D"]
            else:
                argv = ["ip", "netns", "exec", f"{tag}-{name}", "unshare", "--uts", "sh", "-c",
                        f"hostname {name}; exec slurmd -D -N {name}"]  # fmt: skip
            procs.append(_daemon(stack, argv, env, root / "log" / f"slurmd-{name}.out"))
        # Registered last so it runs first: cancelling needs the daemons still up.
        stack.callback(_cancel_jobs, lab)
        lab.logs += [root / "log" / "slurmctld.out", *(root / "log" / f"slurmd-{n}.out" for n in names)]
        _wait_idle(lab, procs, startup_timeout)
        yield lab


def _daemon(stack: contextlib.ExitStack, argv: list[str], env: dict[str, str], out: Path) -> subprocess.Popen:
    """Start a foreground daemon with its output in ``out``; stopped by PID when ``stack`` closes."""
    with out.open("w") as sink:
        proc = subprocess.Popen(argv, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    stack.callback(_stop_popen, proc)
    return proc
