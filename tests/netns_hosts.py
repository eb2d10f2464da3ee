"""Two "hosts" on this machine for tests: network namespaces joined by a veth pair, each with its own host name.

:class:`NetnsHosts` creates the namespaces (``sth-a-<pid>-<n>`` / ``sth-b-…``, so parallel test runs and leftovers
of aborted ones do not clash), gives the veth ends 10.98.0.1/24 and 10.98.0.2/24, brings up both loopbacks and
deletes everything on exit. :meth:`NetnsHost.command` runs a command inside one namespace under its own UTS
host name (``unshare --uts``), which does not resolve anywhere: nothing may rely on resolving it. Needs root
and iproute2 (see /work/shared/CLUSTER-LAB.md section 2 for the recipe this follows).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass

from launch_env import REPO

# The namespace pair itself is the one the benchmarks measure shaped links with.
sys.path.insert(0, str(REPO / "benchmarks"))
from netns_link import ShapedLink

SUBNET = "10.98.0"


def missing_prerequisites() -> str | None:
    """Why namespaces cannot be built here (a reason for pytest.skip), or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "unshare") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found (install iproute2 / util-linux)"
    return None


@dataclass(frozen=True)
class NetnsHost:
    """One fake host: its namespace, veth device (inside the namespace), address and UTS host name."""

    ns: str
    dev: str
    ip: str
    hostname: str

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host's namespace, with this host's name (``hostname`` there says it)."""
        # sh sets the name in the fresh UTS namespace, then becomes the command: signals reach it directly.
        set_name_then_exec = 'hostname "$0" && exec "$@"'
        return ["ip", "netns", "exec", self.ns, "unshare", "--uts", "sh", "-c", set_name_then_exec,
                self.hostname, *argv]  # fmt: skip


class NetnsHosts:
    """Context manager: two namespaces joined by an unshaped veth pair; deleted on exit, also on failure.

    The pair is the benchmarks' :class:`netns_link.ShapedLink` without shaping; on top, each host gets its own
    UTS host name and everything still running in a namespace is killed before it is deleted.
    """

    def __init__(self) -> None:
        self.link = ShapedLink(rate=None, names=("sth-a", "sth-b"), subnet=SUBNET)
        self.hosts = tuple(
            NetnsHost(h.ns, h.dev, h.ip, f"sth-node{i}") for i, h in enumerate(self.link.hosts)
        )

    def __enter__(self) -> NetnsHosts:
        self.link.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill what still runs in the namespaces, then delete them (and so the veth pair). Safe to call twice."""
        for host in self.hosts:
            kill_namespace_processes(host.ns)
        self.link.close()


def kill_namespace_processes(ns: str) -> None:
    """SIGKILL every process in namespace ``ns``: all were started by this test there.

    Process groups are not enough: torchrun starts each worker in a session of its own. SIGKILL, not SIGTERM:
    a trainer treats SIGTERM as preemption and would wait on its dead peers.
    """
    listed = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30)
    for pid in listed.stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s process group (it must lead one: ``start_new_session=True``) and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
