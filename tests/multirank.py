"""Run a function on N gloo ranks and get every rank's result back: the tier-1 test harness.

Start-up dominates small multi-rank tests on a 2-core machine (a 4-rank torchrun costs 6-7 s), so ranks
live in a :class:`RankPool` that is reused across tests: processes are forked from a forkserver that has
already imported torch, join one gloo group once, then execute tasks sent over pipes. A pool is torn down
and rebuilt after any failure, so one broken test cannot poison the next.

A task is a module-level function (pickled by reference) plus arguments; inside it the default process
group is the pool's world group. Results come back in rank order. If a rank raises, its traceback is
re-raised here as :class:`RankFailure`; if ranks do not finish within ``timeout`` seconds, the stacks of
the stuck ranks are dumped (faulthandler) and :class:`RankTimeout` says which ranks hung and where.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import multiprocessing as mp
import os
import signal
import tempfile
import time
import traceback
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

# Forked ranks must not fight over 2 cores with OpenMP pools (torchrun sets the same).
_WORKER_THREADS = 1
#: After the first rank fails, how long the others get to finish before they are presumed stuck.
FAILURE_GRACE_S = 3.0


class RankFailure(RuntimeError):
    """A rank raised (or died); the message holds its rank and traceback."""


class RankTimeout(TimeoutError):
    """Some ranks did not finish in time; the message names them and shows where they were stuck."""


def _worker_main(
    rank: int,
    world_size: int,
    store_port: int,
    prefix: str,
    conn: Connection,
    dump_path: str,
    pg_timeout_s: float,
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(_WORKER_THREADS)
    dump = open(dump_path, "w")  # noqa: SIM115 - lives as long as the process; faulthandler writes here on SIGUSR1
    faulthandler.register(signal.SIGUSR1, file=dump, all_threads=True)
    store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group(
        "gloo",
        store=dist.PrefixStore(prefix, store),
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=pg_timeout_s),
    )
    conn.send(("ready", rank, 1))
    while True:
        task = conn.recv()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            result = ("ok", fn(*args, **kwargs))
        except BaseException as exc:
            result = ("err", "".join(traceback.format_exception(exc)))
        try:
            conn.send((*result, _live_group_count()))
        except Exception as exc:  # the result itself did not pickle
            conn.send(("err", f"rank {rank}: result of {fn.__name__} could not be sent back: {exc!r}", 0))
    dist.destroy_process_group()


#: Every DeviceMesh a task builds creates a dozen gloo groups, each with its own threads, and DeviceMesh caches
#: them, so they cannot be destroyed behind its back. A pool whose ranks hold more groups than this is retired
#: after the task and rebuilt on the next call (about a second) instead of crawling under thousands of threads.
MAX_GROUPS_PER_RANK = 100
#: Idle pools are not free: each group's gloo event-loop thread keeps waking, and on a 2-core CI machine a few
#: idle pools with hundreds of groups left the running test a fraction of the CPU (load average above 70).
#: Before a task runs, other pools whose ranks hold more groups than this are closed.
MAX_IDLE_GROUPS_PER_RANK = 16


def _live_group_count() -> int:
    """Process groups alive in this process, the world's included (torch keeps them in its group map)."""
    import torch.distributed.distributed_c10d as c10d

    return len(c10d._world.pg_map)


class RankPool:
    """``world_size`` persistent gloo ranks; :meth:`run` executes one function on all of them."""

    def __init__(self, world_size: int, *, pg_timeout_s: float = 120.0, start_timeout_s: float = 120.0):
        import torch.distributed as dist

        self.world_size = world_size
        self.groups = 1  # process groups each rank held after the last task (the world's included)
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed"])
        # The parent owns the rendezvous store, so the port is picked by the OS and never collides.
        self._store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        self._dump_dir = Path(tempfile.mkdtemp(prefix=f"rankpool{world_size}-"))
        self._conns: list[Connection] = []
        self._procs = []
        prefix = f"pool-{os.getpid()}-{time.monotonic_ns()}"
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main,
                args=(
                    rank,
                    world_size,
                    self._store.port,
                    prefix,
                    child,
                    str(self._dump_path(rank)),
                    pg_timeout_s,
                ),
                daemon=True,
                name=f"rank{rank}of{world_size}",
            )
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        replies = self._collect(start_timeout_s, "start")
        bad = [r for r, (kind, *_) in replies.items() if kind != "ready"]
        if bad:
            self.close()
            raise RankFailure(f"ranks {bad} of a {world_size}-rank pool failed to start: {replies}")

    def _dump_path(self, rank: int) -> Path:
        return self._dump_dir / f"rank{rank}.stack"

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def run(self, fn, *args: Any, timeout: float = 60.0, **kwargs: Any) -> list[Any]:
        """Call ``fn(*args, **kwargs)`` on every rank; return the results in rank order.

        Raises:
            RankFailure: a rank raised or died (the first failing rank's traceback is in the message).
            RankTimeout: ranks still running after ``timeout`` seconds (their stacks are in the message).
        """
        for conn in self._conns:
            conn.send((fn, args, kwargs))
        replies = self._collect(timeout, fn.__name__)
        self.groups = max(groups for _, _, groups in replies.values())
        if self.groups > MAX_GROUPS_PER_RANK:
            self.close()
        return [replies[r][1] for r in range(self.world_size)]

    def _collect(self, timeout: float, what: str) -> dict[int, tuple[str, Any, int]]:
        """Replies ``(kind, payload, live groups)`` per rank, raising on failure or timeout."""
        replies: dict[int, tuple[str, Any, int]] = {}
        deadline = time.monotonic() + timeout
        failed_at = None
        while len(replies) < self.world_size:
            now = time.monotonic()
            limit = deadline if failed_at is None else min(deadline, failed_at + FAILURE_GRACE_S)
            if now >= limit:
                break
            waiting = {c: r for r, c in enumerate(self._conns) if r not in replies}
            sentinels = {self._procs[r].sentinel: r for r in waiting.values()}
            for ready in wait([*waiting, *sentinels], timeout=limit - now):
                if ready in waiting:
                    rank = waiting[ready]
                    try:
                        replies[rank] = ready.recv()
                    except EOFError:
                        continue  # the sentinel reports the death
                else:
                    rank = sentinels[ready]
                    if rank not in replies:
                        self._procs[rank].join(1)
                        replies[rank] = (
                            "err",
                            f"rank {rank} died (exit code {self._procs[rank].exitcode})",
                            0,
                        )
                if replies.get(rank, ("ok",))[0] == "err" and failed_at is None:
                    failed_at = time.monotonic()

        errors = {r: p for r, (k, p, _) in replies.items() if k == "err"}
        pending = [r for r in range(self.world_size) if r not in replies]
        if errors:
            first = min(errors)
            stuck = f"; ranks {pending} were still running and were stopped" if pending else ""
            self.close()
            raise RankFailure(
                f"{what}: rank {first} of {self.world_size} failed{stuck}. Rank {first}'s traceback:\n{errors[first]}"
                + "".join(f"\nrank {r} also failed:\n{errors[r]}" for r in sorted(errors) if r != first)
            )
        if pending:
            stacks = self._dump_stacks(pending)
            self.close()
            raise RankTimeout(
                f"{what}: ranks {pending} of {self.world_size} did not finish within {timeout:.0f}s "
                f"(finished: {sorted(replies)}). Their stacks:\n{stacks}"
            )
        return replies

    def _dump_stacks(self, ranks: list[int]) -> str:
        for r in ranks:
            if self._procs[r].is_alive():
                os.kill(self._procs[r].pid, signal.SIGUSR1)
        time.sleep(0.5)
        return "\n".join(f"--- rank {r} ---\n{self._dump_path(r).read_text()}" for r in ranks)

    def close(self) -> None:
        """Stop every rank (politely, then by force) and forget them."""
        for conn in self._conns:
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send(None)
        deadline = time.monotonic() + 2.0
        for proc in self._procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []


class RankPools:
    """One live :class:`RankPool` per world size, rebuilt on demand after a failure."""

    def __init__(self) -> None:
        self._pools: dict[int, RankPool] = {}

    def run(self, world_size: int, fn, *args: Any, timeout: float = 60.0, **kwargs: Any) -> list[Any]:
        """Run ``fn`` on a ``world_size``-rank pool (see :meth:`RankPool.run`)."""
        for size, other in list(self._pools.items()):
            if size != world_size and other.groups > MAX_IDLE_GROUPS_PER_RANK:
                other.close()
                del self._pools[size]
        pool = self._pools.get(world_size)
        if pool is None or not pool.alive:
            pool = self._pools[world_size] = RankPool(world_size)
        return pool.run(fn, *args, timeout=timeout, **kwargs)

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
