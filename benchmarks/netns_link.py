"""Two "hosts" on one machine: Linux network namespaces joined by a veth link, optionally rate-limited.

:class:`ShapedLink` creates two namespaces, moves one end of a veth pair into each and shapes both ends'
egress with ``tc tbf`` (tbf shapes only egress, so a symmetric link needs both). :func:`measure_throughput`
times a plain TCP transfer each way, and :func:`run_pair` starts a 2-rank torch.distributed job with one
rank per namespace, so all of its traffic crosses the shaped link. Needs root and iproute2; see
``/work/shared/CLUSTER-LAB.md`` section 2 for the measured recipe (netem is not available there, tbf is).

Run alone, it sets up a link, prints its measured throughput both ways and tears it down::

    python benchmarks/netns_link.py --rate 100mbit
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# tc's bit-rate units are decimal (tc(8): "kbit" is 1000 bit/s).
_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
# burst 32kbit measured below the set rate; 1mb reaches it (CLUSTER-LAB.md section 2).
_TBF_BURST = "1mb"
_TBF_LATENCY = "400ms"
_MIB = 1 << 20

# Receiver: prints its port, then after EOF the bytes and seconds counted once `warm` bytes arrived,
# so tbf's initial bucket (burst) and TCP slow start do not inflate the rate.
_RECEIVER = """
import json, socket, sys, time
warm = int(sys.argv[2])
srv = socket.create_server((sys.argv[1], 0))
srv.settimeout(30)
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.settimeout(30)
buf = bytearray(1 << 20)
got, start, base = 0, None, 0
while n := conn.recv_into(buf):
    got += n
    if start is None and got >= warm:
        start, base = time.perf_counter(), got
print(json.dumps({"bytes": got - base, "seconds": time.perf_counter() - start}))
"""
_SENDER = """
import socket, sys
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
chunk = bytes(1 << 20)
for _ in range(int(sys.argv[3])):
    conn.sendall(chunk)
conn.close()
"""
_FREE_PORT = """
import socket, sys
with socket.socket() as s:
    s.bind((sys.argv[1], 0))
    print(s.getsockname()[1])
"""


class LinkError(RuntimeError):
    """The link cannot be set up (not root, a tool missing, a command failed); the message says why."""


def parse_rate(rate: str) -> float:
    """Bits per second of a tc rate such as ``100mbit`` or ``1gbit``."""
    match = re.fullmatch(r"([0-9.]+)\s*([a-z]+)", rate.strip().lower())
    if not match or match.group(2) not in _RATE_UNITS:
        raise LinkError(f"rate {rate!r} is not a tc bit rate; write e.g. 100mbit, 1gbit or 500kbit.")
    return float(match.group(1)) * _RATE_UNITS[match.group(2)]


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LinkError(f"`{' '.join(cmd)}` failed (rc={proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


@dataclass(frozen=True)
class Host:
    """One end of the link: its namespace, its veth device and that device's address."""

    ns: str
    dev: str
    ip: str

    def exec(self, *argv: str) -> list[str]:
        """The command line that runs ``argv`` inside this host's namespace."""
        return ["ip", "netns", "exec", self.ns, *argv]


class ShapedLink:
    """Context manager: two namespaces joined by a veth pair, both ends shaped to ``rate`` (None: unshaped).

    Names carry this process's id and a counter, so parallel runs and leftovers of aborted ones do not
    clash. The namespaces (and with them the veths) are deleted on exit, also on KeyboardInterrupt and on
    SIGTERM, which is turned into SystemExit while the link is up.
    """

    _count = itertools.count()

    def __init__(self, rate: str | None = "100mbit", names=("h1", "h2"), subnet: str = "10.99.0"):
        if rate is not None:
            parse_rate(rate)  # refuse a bad rate before touching the system
        self.rate = rate
        self.names = tuple(names)
        tag = f"{os.getpid()}-{next(self._count)}"
        # veth names must fit IFNAMSIZ (15 characters): v1-<pid>-<n> does for pids up to 2^22.
        self.hosts = tuple(
            Host(f"{name}-{tag}", f"v{i + 1}-{tag}", f"{subnet}.{i + 1}") for i, name in enumerate(names)
        )
        self._previous_sigterm = None

    def __enter__(self) -> ShapedLink:
        self._check_prerequisites()
        self._trap_sigterm()
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_prerequisites(self) -> None:
        if os.geteuid() != 0:
            raise LinkError("network namespaces need root; run this as root (e.g. sudo).")
        tools = ["ip", "tc"] if self.rate else ["ip"]
        missing = [t for t in tools if shutil.which(t) is None]
        if missing:
            raise LinkError(f"{', '.join(missing)} not found; install iproute2 (apt-get install iproute2).")

    def _trap_sigterm(self) -> None:
        # SIGTERM's default action ends Python without running `finally`, which would leak the namespaces.
        def _exit(signum, frame):
            raise SystemExit(128 + signum)

        self._previous_sigterm = signal.signal(signal.SIGTERM, _exit)

    def _setup(self) -> None:
        a, b = self.hosts
        for host in self.hosts:
            _run(["ip", "netns", "add", host.ns])
        _run(["ip", "link", "add", a.dev, "type", "veth", "peer", "name", b.dev])
        for host in self.hosts:
            _run(["ip", "link", "set", host.dev, "netns", host.ns])
            _run(["ip", "-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", host.dev])
            _run(["ip", "-n", host.ns, "link", "set", host.dev, "up"])
            # Each namespace has its own loopback, down until raised; Gloo and torch's store may use it.
            _run(["ip", "-n", host.ns, "link", "set", "lo", "up"])
            if self.rate:
                tbf = ["tbf", "rate", self.rate, "burst", _TBF_BURST, "latency", _TBF_LATENCY]
                _run(["tc", "-n", host.ns, "qdisc", "add", "dev", host.dev, "root", *tbf])

    def close(self) -> None:
        """Delete both namespaces (which removes the veth pair) and restore the SIGTERM handler."""
        for host in self.hosts:
            subprocess.run(["ip", "netns", "del", host.ns], capture_output=True)
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    def describe(self) -> str:
        """One line naming the link, e.g. ``h1-42-0 (10.99.0.1) <-> h2-42-0 (10.99.0.2), tbf 100mbit``."""
        a, b = self.hosts
        return f"{a.ns} ({a.ip}) <-> {b.ns} ({b.ip}), " + (f"tbf {self.rate}" if self.rate else "unshaped")


def _transfer_mbit(src: Host, dst: Host, nbytes: int) -> float:
    """Mbit/s of one TCP transfer of ``nbytes`` from ``src`` to ``dst``, past the first 2 MiB."""
    warm = 2 * _MIB  # beyond tbf's 1 MB bucket
    receiver = subprocess.Popen(
        dst.exec(sys.executable, "-c", _RECEIVER, dst.ip, str(warm)), stdout=subprocess.PIPE, text=True
    )
    try:
        port = receiver.stdout.readline().strip()
        _run(src.exec(sys.executable, "-c", _SENDER, dst.ip, port, str(nbytes // _MIB)))
        out, _ = receiver.communicate(timeout=60)
    finally:
        receiver.kill()
        receiver.wait()
    result = json.loads(out)
    return result["bytes"] * 8 / result["seconds"] / 1e6


def measure_throughput(link: ShapedLink, nbytes: int | None = None) -> dict[str, float]:
    """Measured Mbit/s each way over ``link``: ``{"h1->h2": ..., "h2->h1": ...}`` (keys use ``names``).

    By default sends about 1.5 s worth at the set rate (at least 20 MiB), or 256 MiB when unshaped.
    """
    if nbytes is None:
        nbytes = max(20 * _MIB, int(parse_rate(link.rate) * 1.5 / 8)) if link.rate else 256 * _MIB
    (a, b), (name_a, name_b) = link.hosts, link.names
    return {
        f"{name_a}->{name_b}": _transfer_mbit(a, b, nbytes),
        f"{name_b}->{name_a}": _transfer_mbit(b, a, nbytes),
    }


@dataclass
class PairResult:
    """Outcome of :func:`run_pair`: wall-clock seconds, each rank's exit code and where its output went."""

    seconds: float
    returncodes: list[int]
    timed_out: bool
    logs: list[tuple[Path, Path]]  # (stdout, stderr) per rank

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(rc == 0 for rc in self.returncodes)


def _free_port(host: Host) -> int:
    return int(_run(host.exec(sys.executable, "-c", _FREE_PORT, host.ip)))


def _kill(proc: subprocess.Popen) -> None:
    # SIGKILL, not SIGTERM: a trainer treats SIGTERM as preemption and would wait on its dead peer to
    # checkpoint. Each rank leads its own process group, so this also ends anything it started.
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _wait_pair(procs: list[subprocess.Popen], deadline: float) -> bool:
    """Wait until both ranks exit, one fails, or ``deadline`` passes; True when it timed out."""
    while True:
        codes = [p.poll() for p in procs]
        if all(rc is not None for rc in codes):
            return False
        # A failed rank leaves its peer blocked in a collective until Gloo's timeout (minutes): stop waiting.
        if any(rc not in (None, 0) for rc in codes):
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.1)


def run_pair(
    link: ShapedLink, argv: list[str], env: dict[str, str], log_dir: str | Path, timeout: float
) -> PairResult:
    """Run ``argv`` once in each namespace of ``link`` as ranks 0 and 1 of a torch.distributed job.

    Each rank gets RANK, WORLD_SIZE=2, LOCAL_RANK=0, LOCAL_WORLD_SIZE=1, MASTER_ADDR (the first host's veth
    address: a namespace's loopback is its own), a free MASTER_PORT, GLOO_SOCKET_IFNAME (its veth) and
    OMP_NUM_THREADS=1, then ``env`` on top. Output goes to ``log_dir/rank<r>.out`` and ``.err``. Both ranks
    are killed when one fails or after ``timeout`` seconds, so this never hangs.
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    master = link.hosts[0]
    common = {
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": master.ip,
        "MASTER_PORT": str(_free_port(master)),
        "OMP_NUM_THREADS": "1",
    }
    logs = [(log_dir / f"rank{r}.out", log_dir / f"rank{r}.err") for r in range(2)]
    procs: list[subprocess.Popen] = []
    start = time.monotonic()
    try:
        for rank, host in enumerate(link.hosts):
            rank_env = os.environ | common | {"RANK": str(rank), "GLOO_SOCKET_IFNAME": host.dev} | env
            with open(logs[rank][0], "w") as out, open(logs[rank][1], "w") as err:
                procs.append(
                    subprocess.Popen(
                        host.exec(*argv), env=rank_env, stdout=out, stderr=err, start_new_session=True
                    )
                )
        timed_out = _wait_pair(procs, start + timeout)
    finally:
        for proc in procs:
            _kill(proc)
    return PairResult(
        seconds=time.monotonic() - start,
        returncodes=[p.returncode for p in procs],
        timed_out=timed_out,
        logs=logs,
    )


def main(argv: list[str] | None = None) -> int:
    """Set up a link, print its measured throughput both ways, tear it down."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", default="100mbit", help="tc rate of both ends, or 'none' for unshaped.")
    parser.add_argument("--mbytes", type=int, help="MiB to send each way (default: about 1.5 s at the rate).")
    args = parser.parse_args(argv)
    rate = None if args.rate.lower() == "none" else args.rate
    try:
        with ShapedLink(rate=rate) as link:
            print(link.describe())
            nbytes = args.mbytes * _MIB if args.mbytes else None
            for direction, mbit in measure_throughput(link, nbytes).items():
                print(f"  {direction}: {mbit:,.1f} Mbit/s")
    except LinkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
