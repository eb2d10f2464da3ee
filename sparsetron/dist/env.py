"""Find out who this process is (rank, local rank, world size, rendezvous address) and join the job.

Launchers are tried in a fixed order, the most specific first:

1. **torchrun** (``TORCHELASTIC_RUN_ID`` or ``RANK`` + ``WORLD_SIZE``): its variables are the truth, also when
   torchrun itself runs under Slurm or MPI.
2. **Slurm** (``SLURM_STEP_ID`` set by ``srun``): ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID``; the
   rendezvous host is the first host of ``SLURM_STEP_NODELIST`` and the port derives from the job id.
3. **MPI** (Open MPI's ``OMPI_COMM_WORLD_*``, MPICH/Hydra's ``PMI_*``, PMIx's ``PMIX_RANK``): rank and size from
   mpi4py's ``COMM_WORLD`` when it is installed, and rank 0's address and a free port broadcast over MPI.
4. Nothing set: a single process (world size 1).

An inconsistent environment (a rank past the world size, half of torchrun's variables, ``sbatch`` without
``srun`` for several tasks) raises :class:`DistEnvError` naming the variables; it never quietly becomes a
world of one.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from sparsetron.dist.errors import DistEnvError

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class ProcessEnv:
    """Identity of this process in the job, as discovered from its launcher's environment."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "mpi" | "single"
    node_rank: int = 0
    # The node count when the launcher states it: Slurm may place different task counts on different nodes
    # ("3,1"), and then world_size // local_world_size is wrong and differs from node to node.
    nnodes: int | None = None

    @property
    def num_nodes(self) -> int:
        if self.nnodes is not None:
            return self.nnodes
        return max(1, self.world_size // max(1, self.local_world_size))


def _int(env: Mapping[str, str], name: str) -> int:
    raw = env.get(name)
    if raw is None:
        raise DistEnvError(f"{name} is not set")
    try:
        return int(raw)
    except ValueError as exc:
        raise DistEnvError(
            f"{name}={raw!r} is not an integer; the launcher should set it to a rank or count"
        ) from exc


def _check_rank(launcher: str, rank_var: str, rank: int, size_var: str, size: int) -> None:
    if size < 1:
        raise DistEnvError(f"{launcher}: {size_var}={size} must be at least 1")
    if not 0 <= rank < size:
        raise DistEnvError(
            f"{launcher}: {rank_var}={rank} is outside 0..{size - 1} ({size_var}={size}); the launcher's variables "
            "disagree, so processes would form different worlds. Relaunch with one consistent launcher."
        )


# -- Slurm hostlists ----------------------------------------------------------------------------------

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_hostlist(expr: str) -> list[str]:
    """Expand a Slurm hostlist expression: ``"gpu[01-03,07],login1"`` -> ``["gpu01", "gpu02", "gpu03", "gpu07", "login1"]``.

    Zero padding is kept (``[08-10]`` -> ``08, 09, 10``), and several bracket groups in one name expand as a
    product in order (``r[1-2]n[1-2]`` -> ``r1n1, r1n2, r2n1, r2n2``), as ``scontrol show hostnames`` does.
    """
    hosts: list[str] = []
    for item in _split_top_level(expr.strip()):
        hosts.extend(_expand_one(item, expr))
    if not hosts:
        raise DistEnvError(f"Slurm node list {expr!r} is empty")
    return hosts


def _split_top_level(expr: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(expr):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise DistEnvError(f"Slurm node list {expr!r} has an unmatched ']' at position {i}")
        elif ch == "," and depth == 0:
            items.append(expr[start:i])
            start = i + 1
    if depth:
        raise DistEnvError(f"Slurm node list {expr!r} has an unclosed '['")
    items.append(expr[start:])
    return [s for s in (x.strip() for x in items) if s]


def _expand_one(item: str, whole: str) -> list[str]:
    open_at = item.find("[")
    if open_at < 0:
        return [item]
    close_at = item.index("]", open_at)
    prefix, body, rest = item[:open_at], item[open_at + 1 : close_at], item[close_at + 1 :]
    tails = _expand_one(rest, whole) if rest else [""]
    heads = []
    for part in body.split(","):
        m = _RANGE.match(part.strip())
        if not m:
            raise DistEnvError(f"Slurm node list {whole!r}: range {part!r} is not N or N-M")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise DistEnvError(f"Slurm node list {whole!r}: range {part!r} runs backwards")
        width = len(lo) if lo.startswith("0") else 0
        heads += [f"{prefix}{n:0{width}d}" for n in range(int(lo), int(hi) + 1)]
    return [h + t for h in heads for t in tails]


def _tasks_per_node(env: Mapping[str, str], nnodes: int, nnodes_from: str) -> list[int]:
    """Expand ``SLURM_STEP_TASKS_PER_NODE`` / ``SLURM_TASKS_PER_NODE`` (``"2(x3),1"`` -> ``[2, 2, 2, 1]``).

    ``nnodes_from`` names where ``nnodes`` came from, for the error message.
    """
    var = next((v for v in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE") if env.get(v)), None)
    if var is None:
        return []
    raw = env[var]
    counts: list[int] = []
    for part in raw.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise DistEnvError(f"Slurm: {var}={raw!r}: cannot read {part!r} (expected N or N(xM))")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if len(counts) != nnodes:
        raise DistEnvError(
            f"Slurm: {var}={raw!r} lists {len(counts)} nodes but the step has {nnodes} ({nnodes_from})"
        )
    return counts


def _slurm_port(env: Mapping[str, str]) -> int:
    if "MASTER_PORT" in env:
        return _int(env, "MASTER_PORT")
    # Every task of a job computes the same port without talking; different jobs sharing a node differ.
    return 20000 + _int(env, "SLURM_JOB_ID") % 20000


# -- discovery ----------------------------------------------------------------------------------------

_TORCHRUN_VARS = (
    "TORCHELASTIC_RUN_ID",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def _from_torchrun(env: Mapping[str, str]) -> ProcessEnv:
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in env]
    if missing:
        present = [v for v in _TORCHRUN_VARS if v in env]
        raise DistEnvError(
            f"torch.distributed environment is incomplete: {', '.join(present)} set but {', '.join(missing)} missing. "
            "Start with `torchrun`/`sparsetron train --nproc N`, or set all of RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT."
        )
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    _check_rank("torchrun", "RANK", rank, "WORLD_SIZE", world)
    local_world = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
    if local_world < 1:
        raise DistEnvError(f"torchrun: LOCAL_WORLD_SIZE={local_world} must be at least 1")
    local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank % local_world
    _check_rank("torchrun", "LOCAL_RANK", local_rank, "LOCAL_WORLD_SIZE", local_world)
    if world % local_world:
        raise DistEnvError(
            f"torchrun: WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local_world}"
        )
    node_rank = _int(env, "GROUP_RANK") if "GROUP_RANK" in env else rank // local_world
    _check_rank("torchrun", "GROUP_RANK", node_rank, "WORLD_SIZE/LOCAL_WORLD_SIZE", world // local_world)
    return ProcessEnv(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        master_addr=env["MASTER_ADDR"],
        master_port=_int(env, "MASTER_PORT"),
        launcher="torchrun",
        node_rank=node_rank,
    )


def _from_slurm(env: Mapping[str, str]) -> ProcessEnv:
    rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
    _check_rank("Slurm", "SLURM_PROCID", rank, "SLURM_NTASKS", world)
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise DistEnvError(
            "Slurm: SLURM_STEP_NODELIST / SLURM_JOB_NODELIST is not set, so the rendezvous host is unknown"
        )
    hosts = expand_hostlist(nodelist)
    nnodes = _int(env, "SLURM_STEP_NUM_NODES") if "SLURM_STEP_NUM_NODES" in env else len(hosts)
    if nnodes != len(hosts):
        raise DistEnvError(
            f"Slurm: node list {nodelist!r} has {len(hosts)} hosts but SLURM_STEP_NUM_NODES={nnodes}"
        )
    nnodes_from = (
        f"SLURM_STEP_NUM_NODES={nnodes}" if "SLURM_STEP_NUM_NODES" in env else f"node list {nodelist!r}"
    )
    per_node = _tasks_per_node(env, nnodes, nnodes_from)
    # The layout must add up before SLURM_NODEID indexes it; a bad count explains a bad local rank, not vice versa.
    if per_node and sum(per_node) != world:
        raise DistEnvError(
            f"Slurm: tasks per node {per_node} sum to {sum(per_node)} but SLURM_NTASKS={world}"
        )
    node_rank = _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0
    _check_rank("Slurm", "SLURM_NODEID", node_rank, "nodes in the step", nnodes)
    local_rank = _int(env, "SLURM_LOCALID")
    local_world = per_node[node_rank] if per_node else world // nnodes
    _check_rank("Slurm", "SLURM_LOCALID", local_rank, "tasks on this node", local_world)
    return ProcessEnv(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        master_addr=env.get("MASTER_ADDR", hosts[0]),
        master_port=_slurm_port(env),
        launcher="slurm",
        node_rank=node_rank,
        nnodes=nnodes,
    )


# (rank, size, local rank, local size) variables of each MPI launcher, tried in this order.
_MPI_VARS = (
    (
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    ),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),  # MPICH / Intel MPI (Hydra)
    ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK", "PMIX_LOCAL_SIZE"),
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE"),
)
_MPI_RANK_VARS = tuple(names[0] for names in _MPI_VARS)


def _mpi_env_rank(env: Mapping[str, str]) -> tuple[int, int, int, int] | None:
    """(rank, size, local_rank, local_size) from MPI launcher variables, or None when no MPI launcher is visible."""
    names = next((names for names in _MPI_VARS if names[0] in env), None)
    if names is None:
        return None
    rank_var, size_var, local_rank_var, local_size_var = names
    if size_var not in env:
        raise DistEnvError(f"MPI: {rank_var} is set but {size_var} is not; cannot tell the world size")
    rank, size = _int(env, rank_var), _int(env, size_var)
    _check_rank("MPI", rank_var, rank, size_var, size)
    local_size = _int(env, local_size_var) if local_size_var in env else size
    if local_size < 1:
        raise DistEnvError(f"MPI: {local_size_var}={local_size} must be at least 1")
    # Without a local rank, assume ranks are placed in blocks per node (one node when the local size is unknown
    # too), as torchrun does; a fixed 0 would put every rank of a node on the same GPU.
    local_rank = _int(env, local_rank_var) if local_rank_var in env else rank % local_size
    _check_rank("MPI", local_rank_var, local_rank, local_size_var, local_size)
    return rank, size, local_rank, local_size


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _from_mpi(env: Mapping[str, str], comm=None) -> ProcessEnv:
    if comm is None:
        try:
            from mpi4py import MPI
        except ImportError:
            MPI = None
        if MPI is not None:
            comm = MPI.COMM_WORLD
    if comm is None:
        from_env = _mpi_env_rank(env)
        if from_env is None:
            raise DistEnvError(
                "MPI discovery asked for, but no MPI variables are set and mpi4py is not installed"
            )
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            var = next(v for v in _MPI_RANK_VARS if v in env)
            raise DistEnvError(
                f"launched by MPI ({var}={env[var]}) but mpi4py is not installed and MASTER_ADDR/MASTER_PORT are not set, "
                "so ranks cannot agree on a rendezvous. `pip install 'sparsetron[mpi]'`, or export MASTER_ADDR and MASTER_PORT."
            )
        rank, size, local_rank, local_size = from_env
        addr, port = env["MASTER_ADDR"], _int(env, "MASTER_PORT")
    else:
        rank, size = comm.Get_rank(), comm.Get_size()
        _check_against_comm(env, rank, size)
        from mpi4py import MPI

        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        local_rank, local_size = local.Get_rank(), local.Get_size()
        # Node index = this node's leader's rank among all leaders: right for any placement (block,
        # round-robin, uneven), unlike rank // local_size.
        is_leader = local_rank == 0
        leaders = comm.Split(0 if is_leader else MPI.UNDEFINED, rank)
        node_rank = local.bcast(leaders.Get_rank() if is_leader else None, root=0)
        if is_leader:
            leaders.Free()
        local.Free()
        if rank == 0:
            addr = env.get("MASTER_ADDR") or socket.gethostname()
            port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else _free_port()
        else:
            addr, port = None, None
        addr, port = comm.bcast((addr, port), root=0)
        return ProcessEnv(rank, size, local_rank, local_size, addr, port, "mpi", node_rank=node_rank)
    return ProcessEnv(
        rank=rank,
        world_size=size,
        local_rank=local_rank,
        local_world_size=local_size,
        master_addr=addr,
        master_port=port,
        launcher="mpi",
        node_rank=rank // local_size,
    )


def _check_against_comm(env: Mapping[str, str], rank: int, size: int) -> None:
    """With mpi4py present, the launcher's variables (where set) must agree with ``COMM_WORLD``."""
    names = next((names for names in _MPI_VARS if names[0] in env), None)
    if names is None:
        return
    env_rank = _int(env, names[0])
    env_size = _int(env, names[1]) if names[1] in env else size
    if (env_rank, env_size) != (rank, size):
        raise DistEnvError(
            f"MPI variables say rank {env_rank} of {env_size} ({names[0]}) but mpi4py's COMM_WORLD says rank {rank} "
            f"of {size}; mpi4py is linked against a different MPI than the launcher. Use the mpiexec of the MPI "
            "that mpi4py loads."
        )


def _mpi_world_from_env(env: Mapping[str, str]) -> int | None:
    names = next((names for names in _MPI_VARS if names[0] in env), None)
    return _int(env, names[1]) if names is not None and names[1] in env else None


def discover(env: Mapping[str, str] | None = None, *, mpi_comm=None) -> ProcessEnv:
    """Read this process's identity from its launcher's environment (see the module docstring for the order).

    Args:
        env: the environment to read (default ``os.environ``); tests pass a dict.
        mpi_comm: an mpi4py communicator to use instead of ``MPI.COMM_WORLD``.

    Raises:
        DistEnvError: when the variables are incomplete or contradict each other.
    """
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" in env or any(v in env for v in ("RANK", "WORLD_SIZE")):
        return _from_torchrun(env)
    mpi_world = _mpi_world_from_env(env)
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        # `mpirun -n 8` inside a one-task srun step inherits SLURM_NTASKS=1: the MPI world is the real one.
        steps_world = env.get("SLURM_NTASKS")
        if mpi_world is None or steps_world is None or str(mpi_world) == steps_world:
            return _from_slurm(env)
        return _from_mpi(env, mpi_comm)
    # `mpiexec` in an sbatch script starts the tasks itself: its variables, not the allocation's, say who we are.
    mpi_launched = mpi_comm is not None or any(v in env for v in _MPI_RANK_VARS)
    if not mpi_launched and "SLURM_JOB_ID" in env and "SLURM_NTASKS" in env and _int(env, "SLURM_NTASKS") > 1:
        raise DistEnvError(
            f"inside a Slurm allocation of SLURM_NTASKS={env['SLURM_NTASKS']} tasks but not started by srun "
            "(no SLURM_STEP_ID), so this would train alone. Start each task with `srun`, or use `sparsetron launch`."
        )
    if mpi_launched:
        return _from_mpi(env, mpi_comm)
    return ProcessEnv(0, 1, 0, 1, "127.0.0.1", _free_port(), "single")


def default_backend(device_type: str) -> str:
    """``cpu:gloo,cuda:nccl`` for CUDA jobs (NCCL for GPU tensors, gloo for the CPU tensors and objects that
    checkpointing and bookkeeping exchange), ``gloo`` for CPU-only jobs."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def resolve_device_type(requested: str = "auto") -> str:
    """``cuda`` when asked or when ``auto`` finds a GPU, else ``cpu``; asking for cuda without one is an error."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise DistEnvError(
            "cluster.device=cuda but torch finds no CUDA device here; use cluster.device=cpu or auto"
        )
    return requested


def init_distributed(
    penv: ProcessEnv,
    *,
    device_type: str = "cpu",
    timeout: datetime.timedelta = datetime.timedelta(minutes=10),
) -> None:
    """Join the default process group described by ``penv`` (collective over the whole world).

    Uses NCCL for ``device_type="cuda"`` (and binds this process to ``cuda:<local_rank>``), gloo for the CPU.
    The rendezvous host must resolve: a multi-node job never falls back to localhost.
    """
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        raise DistEnvError(
            "torch.distributed is already initialised in this process; call init_distributed once"
        )
    if penv.num_nodes > 1 or penv.launcher == "slurm":
        try:
            socket.getaddrinfo(penv.master_addr, penv.master_port)
        except OSError as exc:
            raise DistEnvError(
                f"rendezvous host MASTER_ADDR={penv.master_addr!r} ({penv.launcher}) does not resolve from "
                f"{socket.gethostname()}: {exc}. Set MASTER_ADDR to an address every node can reach."
            ) from exc
    if device_type == "cuda":
        torch.cuda.set_device(penv.local_rank)
    host = (
        f"[{penv.master_addr}]" if ":" in penv.master_addr else penv.master_addr
    )  # IPv6 literals need brackets
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if penv.launcher == "torchrun" and restart is not None:
        # torchrun's agent serves the store at MASTER_PORT (TORCHELASTIC_USE_AGENT_STORE): join it as a
        # client. A restarted worker group reuses that store, whose keys still hold the dead attempt's Gloo
        # addresses (torch 2.13: attempt 1 connects to a port of attempt 0 and fails), so every attempt gets
        # its own key prefix.
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(
            penv.master_addr,
            penv.master_port,
            penv.world_size,
            is_master=not agent_store and penv.rank == 0,
            timeout=timeout,
        )
        dist.init_process_group(
            backend=default_backend(device_type),
            store=dist.PrefixStore(f"sparsetron/attempt_{restart}", store),
            rank=penv.rank,
            world_size=penv.world_size,
            timeout=timeout,
        )
        return
    dist.init_process_group(
        backend=default_backend(device_type),
        init_method=f"tcp://{host}:{penv.master_port}",
        rank=penv.rank,
        world_size=penv.world_size,
        timeout=timeout,
    )
