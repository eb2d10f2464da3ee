"""``sparsetron launch``: preflight a job against its cluster, then run or submit it (or print it: dry run).

:func:`plan_launch` merges the cluster YAML and the training config, builds the layout for
``nodes × procs_per_node`` with the trainer's own preflight (``sparsetron.dist.preflight.check_job``) and
the cluster's own rules, and refuses with every problem and its fix before anything starts or is submitted.
:func:`execute` then runs the plan on its scheduler.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sparsetron.config import ClusterConfig, Config, Scheduler, load_config, to_yaml, write_resolved
from sparsetron.dist.errors import LayoutError
from sparsetron.dist.preflight import check_job
from sparsetron.launch.network import (
    interface_ipv4,
    is_local_ipv4,
    is_loopback,
    network_env,
    network_problems,
    resolve_ipv4,
)
from sparsetron.launch.render import mpirun_argv, sbatch_script, shell_join, torchrun_argv


class LaunchError(ValueError):
    """A job that must not start: every problem with its fix, one per line."""


@dataclass
class LaunchPlan:
    """What a launch runs: the resolved config, where it is written, the ranks' environment, the commands."""

    config: Config
    config_path: Path
    env: dict[str, str]
    #: scheduler → what it runs: argv lists, or for Slurm the batch script text.
    commands: list[list[str]]
    sbatch: str | None

    @property
    def world_size(self) -> int:
        cluster = self.config.cluster
        return cluster.nodes * cluster.procs_per_node


def _cluster_problems(cfg: Config) -> list[str]:
    cluster = cfg.cluster
    problems = network_problems(cluster)
    if cluster.nodes < 1 or cluster.procs_per_node < 1:
        problems.append(
            f"cluster.nodes={cluster.nodes} and cluster.procs_per_node={cluster.procs_per_node} must be ≥ 1"
        )
    if cluster.scheduler == Scheduler.local and cluster.nodes != 1:
        problems.append(
            f"cluster.scheduler=local runs on this machine only, but cluster.nodes={cluster.nodes}; use "
            "torchrun (with cluster.hosts), slurm or mpi"
        )
    if cluster.scheduler == Scheduler.torchrun and cluster.nodes > 1 and len(cluster.hosts) != cluster.nodes:
        problems.append(
            f"cluster.scheduler=torchrun on {cluster.nodes} nodes needs cluster.hosts listing them "
            f"(the first hosts the rendezvous); got {cluster.hosts or 'none'}"
        )
    if cluster.scheduler == Scheduler.mpi and cluster.hosts and len(cluster.hosts) != cluster.nodes:
        problems.append(f"cluster.hosts lists {len(cluster.hosts)} hosts for cluster.nodes={cluster.nodes}")
    if cluster.slurm_tasks not in ("node", "process"):
        problems.append(f"cluster.slurm_tasks={cluster.slurm_tasks!r} must be node or process")
    if cluster.mpi not in ("openmpi", "mpich"):
        problems.append(f"cluster.mpi={cluster.mpi!r} must be openmpi or mpich")
    if not 0 <= cluster.rdzv_port < 65536 or (
        cluster.rdzv_port == 0 and cluster.scheduler == Scheduler.torchrun
    ):
        problems.append(
            f"cluster.rdzv_port={cluster.rdzv_port} is not a TCP port (1–65535; 0, from the job id, only under "
            "Slurm)"
        )
    if cluster.max_restarts > 0 and cfg.checkpoint.interval == 0:
        problems.append(
            f"cluster.max_restarts={cluster.max_restarts} restarts from the last checkpoint, but "
            "checkpoint.interval=0 saves only at the end; set checkpoint.interval (e.g. 50)"
        )
    return problems


@dataclass(frozen=True)
class TorchrunNode:
    """What one node of a multi-node torchrun job must tell torchrun about itself."""

    #: This node's IPv4 address on ``cluster.network_interface``: advertised to the other nodes.
    local_addr: str
    #: Whether ``cluster.hosts[0]`` is this node, which then serves the rendezvous store.
    is_host: bool


def torchrun_node(cluster: ClusterConfig) -> TorchrunNode | str:
    """This node's part in a multi-node torchrun job, looked up here; a problem with its fix when it cannot be.

    torchrun would otherwise resolve its own host name for both, which goes wrong whenever that name maps
    to loopback or to another namespace's address: the nodes' workers get a MASTER_ADDR they cannot reach,
    or no node serves the store at ``hosts[0]`` and the rendezvous times out.
    """
    if not cluster.network_interface:
        return (
            f"cluster.scheduler=torchrun on {cluster.nodes} nodes needs cluster.network_interface (the NIC the "
            "nodes reach each other on, e.g. eth0; `ip -4 -br addr` lists them): each node advertises its "
            "address on it"
        )
    try:
        local_addr = interface_ipv4(cluster.network_interface)
    except LookupError as exc:
        return f"cluster.network_interface={cluster.network_interface}: {exc}"
    try:
        rendezvous = resolve_ipv4(cluster.hosts[0])
    except LookupError as exc:
        return f"cluster.hosts[0]={cluster.hosts[0]}: {exc}"
    if any(is_loopback(a) for a in rendezvous):
        return (
            f"cluster.hosts[0]={cluster.hosts[0]} resolves to loopback ({', '.join(rendezvous)}), which the "
            "other nodes cannot reach; list the first node by an address on cluster.network_interface "
            f"(this node's is {local_addr})"
        )
    return TorchrunNode(local_addr, is_host=any(is_local_ipv4(a) for a in rendezvous))


def plan_launch(cluster_yaml: str | Path, train_args: list[str]) -> LaunchPlan:
    """Preflight and plan ``train CONFIG... key=value...`` on the cluster of ``cluster_yaml``.

    Raises LaunchError listing every problem (layout, model fit, cluster, network) with its fix.
    """
    if not train_args or train_args[0] != "train":
        raise LaunchError(
            f"expected `-- train CONFIG [key=value ...]` after the cluster file, got {train_args or 'nothing'}"
        )
    files = [a for a in train_args[1:] if "=" not in a]
    overrides = [a for a in train_args[1:] if "=" in a]
    # The cluster file outranks the training configs' own `cluster:` defaults; command-line overrides win.
    cfg = load_config([*files, cluster_yaml], overrides)
    problems = _cluster_problems(cfg)
    node: TorchrunNode | str | None = None
    if cfg.cluster.scheduler == Scheduler.torchrun and cfg.cluster.nodes > 1 and not problems:
        # Only a well-formed cluster is worth looking up (hosts listed, interface named).
        node = torchrun_node(cfg.cluster)
        if isinstance(node, str):
            problems.append(node)
    world = cfg.cluster.nodes * cfg.cluster.procs_per_node
    if world >= 1:
        try:
            check_job(cfg, world)
        except LayoutError as exc:
            problems.insert(0, str(exc))
    if problems:
        raise LaunchError(
            f"refusing to launch on {cfg.cluster.nodes} node(s) × {cfg.cluster.procs_per_node} process(es):\n"
            + "\n".join(f"- {p}" for p in problems)
        )
    run_dir = Path(cfg.train.run_dir).resolve()
    config_path = run_dir / "config.yaml"
    env = network_env(cfg.cluster)
    cluster = cfg.cluster
    sbatch = None
    if cluster.scheduler == Scheduler.slurm:
        sbatch = sbatch_script(cluster, config_path, run_dir, env)
        commands = [["sbatch", "--parsable", str(run_dir / "launch" / "job.sbatch")]]
    elif cluster.scheduler == Scheduler.mpi:
        commands = [mpirun_argv(cluster, config_path, env)]
    else:
        logs = run_dir / "logs"
        if isinstance(node, TorchrunNode):
            argv = torchrun_argv(
                cluster, config_path, logs, endpoint=f"{cluster.hosts[0]}:{cluster.rdzv_port}",
                run_id=cluster.job_name, local_addr=node.local_addr, is_host=node.is_host,
            )  # fmt: skip
        else:
            argv = torchrun_argv(cluster, config_path, logs, endpoint=None, run_id=cluster.job_name)
        commands = [argv]
    return LaunchPlan(cfg, config_path, env, commands, sbatch)


def describe(plan: LaunchPlan) -> str:
    """Everything a dry run prints: the resolved config, the environment and the exact commands."""
    cluster = plan.config.cluster
    parts = [
        f"# scheduler: {cluster.scheduler.value}, {cluster.nodes} node(s) × {cluster.procs_per_node} "
        f"process(es) = world size {plan.world_size}",
        f"# resolved config (written to {plan.config_path}):",
        to_yaml(plan.config).rstrip(),
        "# environment of every rank:",
        *(f"{k}={v}" for k, v in sorted(plan.env.items())),
    ]
    if plan.sbatch is not None:
        parts += [f"# batch script (written to {plan.commands[0][-1]}):", plan.sbatch.rstrip()]
    where = (
        "on every node; each looks up its own --local-addr and --rdzv-conf=is_host"
        if cluster.scheduler == Scheduler.torchrun and cluster.nodes > 1
        else "here"
    )
    parts += [f"# command ({where}):", *(shell_join(c) for c in plan.commands)]
    return "\n".join(parts) + "\n"


def execute(plan: LaunchPlan) -> int:
    """Write the resolved config and run the plan: a local/torchrun node, an mpirun, or an sbatch submission.

    Returns the exit code (for Slurm, sbatch's; the job id is printed).
    """
    write_resolved(plan.config, plan.config.train.run_dir)
    cluster = plan.config.cluster
    env = os.environ | plan.env
    if plan.sbatch is not None:
        script = Path(plan.commands[0][-1])
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(plan.sbatch)
        if shutil.which("sbatch") is None:
            raise LaunchError("sbatch is not on PATH; run on a Slurm login node (or --dry-run to inspect)")
        done = subprocess.run(plan.commands[0], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise LaunchError(f"sbatch failed ({done.returncode}): {done.stderr.strip()}")
        print(f"submitted Slurm job {done.stdout.strip().split(';')[0]} ({script})", flush=True)
        return 0
    if cluster.scheduler == Scheduler.mpi and shutil.which(plan.commands[0][0]) is None:
        raise LaunchError(
            "mpirun is not on PATH nor beside the nodes' python; install an MPI (`pip install mpich mpi4py`, "
            "or Open MPI) or use --dry-run to inspect"
        )
    return subprocess.run(plan.commands[0], env=env).returncode
