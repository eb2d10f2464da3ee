"""Exact commands a launch runs: per-node torchrun lines, the sbatch script and its srun line, mpirun.

Pure functions of the cluster config, the resolved job config's path and the environment, so
``sparsetron launch --dry-run`` prints precisely what a real launch executes and tests can check them.
Every rank runs ``python -m sparsetron.train.worker <run_dir>/config.yaml``; how it learns its rank is the
launcher's business (torchrun's env, ``SLURM_PROCID``, the MPI env), read by ``sparsetron.dist.discover``.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from sparsetron.config import ClusterConfig, Device

WORKER_MODULE = "sparsetron.train.worker"


def python_on_nodes(cluster: ClusterConfig) -> str:
    """The interpreter every node runs: the venv's when one is configured."""
    if cluster.venv:
        return f"{cluster.venv.rstrip('/')}/bin/python"
    return cluster.python or sys.executable


def worker_argv(cluster: ClusterConfig, config_path: Path) -> list[str]:
    """One rank's command (under srun in process mode, or mpirun)."""
    return [python_on_nodes(cluster), "-m", WORKER_MODULE, str(config_path)]


def torchrun_argv(
    cluster: ClusterConfig,
    config_path: Path,
    log_dir: Path,
    *,
    endpoint: str | None,
    run_id: str,
    local_addr: str | None = None,
    is_host: bool | None = None,
) -> list[str]:
    """One node's torchrun: all its processes, c10d rendezvous at ``endpoint`` (None: a standalone node).

    Per-rank stdout/stderr go to files under ``log_dir`` (and to the console); ``cluster.max_restarts``
    restarts the whole worker group after a failure, and the workers resume from the last checkpoint.
    ``local_addr`` is the address this node advertises to the others (its workers' MASTER_ADDR when it is the
    rendezvous's rank 0); without it torchrun takes its host name, which may resolve to an address the
    other nodes cannot reach (loopback, another network namespace). ``is_host`` says whether this node
    serves the rendezvous store at ``endpoint``; without it torchrun guesses from its host name, the same way.
    """
    argv = [
        python_on_nodes(cluster), "-m", "torch.distributed.run",
        f"--nnodes={cluster.nodes}", f"--nproc-per-node={cluster.procs_per_node}",
        f"--max-restarts={cluster.max_restarts}", f"--log-dir={log_dir}", "--redirects=3", "--tee=3",
    ]  # fmt: skip
    if endpoint is None:
        argv.append("--standalone")
    else:
        argv += ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={run_id}"]
        if is_host is not None:
            argv.append(f"--rdzv-conf=is_host={str(is_host).lower()}")
        if local_addr is not None:
            argv.append(f"--local-addr={local_addr}")
    return [*argv, "-m", WORKER_MODULE, str(config_path)]


def shell_join(argv: list[str]) -> str:
    """``argv`` as one shell line; arguments holding ``$VARIABLES`` are double-quoted so they expand."""
    return " ".join(f'"{a}"' if "$" in a else shlex.quote(a) for a in argv)


def srun_argv(cluster: ClusterConfig, command: list[str]) -> list[str]:
    """The job step: one task per node (torchrun inside) or one per process."""
    per_node = 1 if cluster.slurm_tasks == "node" else cluster.procs_per_node
    argv = ["srun", f"--nodes={cluster.nodes}", f"--ntasks-per-node={per_node}", "--kill-on-bad-exit=1"]
    if cluster.container_image:
        argv += [f"--container-image={cluster.container_image}", "--container-mounts=$PWD:$PWD"]
    return [*argv, *command]


def _sbatch_options(cluster: ClusterConfig, run_dir: Path) -> list[str]:
    options = [
        f"--job-name={cluster.job_name}",
        f"--nodes={cluster.nodes}",
        f"--ntasks-per-node={1 if cluster.slurm_tasks == 'node' else cluster.procs_per_node}",
        f"--output={run_dir}/slurm-%j.out",
        "--open-mode=append",  # a requeued job adds to its output instead of erasing the first run's
        "--requeue",
    ]
    if cluster.device == Device.cuda:
        options.append(f"--gpus-per-node={cluster.procs_per_node}")
    for flag, value in (
        ("partition", cluster.partition),
        ("account", cluster.account),
        ("time", cluster.time),
        ("qos", cluster.qos),
        ("constraint", cluster.constraint),
    ):
        if value:
            options.append(f"--{flag}={value}")
    if cluster.time:
        # USR1 to the batch shell 2 minutes before the limit: it requeues the job, which resumes from the
        # last complete checkpoint when it starts again.
        options.append("--signal=B:USR1@120")
    return options


def sbatch_script(cluster: ClusterConfig, config_path: Path, run_dir: Path, env: dict[str, str]) -> str:
    """The batch script ``sbatch`` runs: environment, rendezvous host check, requeue trap, the srun step.

    The rendezvous host is the first of ``scontrol show hostnames``, resolved to an IPv4 address; a name that
    does not resolve, or resolves to loopback on a multi-node job, stops the job with a message instead of
    letting every node form a world of its own.
    """
    if cluster.slurm_tasks == "node":
        step = torchrun_argv(
            cluster, config_path, run_dir / "logs" / "$SLURM_JOB_ID",
            endpoint="$RDZV_HOST:$RDZV_PORT", run_id="$SLURM_JOB_ID",
        )  # fmt: skip
    else:
        step = worker_argv(cluster, config_path)
    lines = ["#!/bin/bash", *(f"#SBATCH {o}" for o in _sbatch_options(cluster, run_dir)), "set -euo pipefail"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    if cluster.venv:
        lines.append(f"source {shlex.quote(cluster.venv.rstrip('/') + '/bin/activate')}")
    lines += [
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "RDZV_HOST=$(getent ahostsv4 \"$head_node\" | awk 'NR == 1 { print $1 }')",
        # A loopback address is only right when every rank is on this one node.
        'if [ -z "$RDZV_HOST" ] || { [[ "$RDZV_HOST" == 127.* ]] && [ "$SLURM_JOB_NUM_NODES" -gt 1 ]; }; then',
        "  echo \"error: rendezvous host $head_node resolves to '${RDZV_HOST:-nothing}', not an address the"
        ' other nodes reach; fix its /etc/hosts or DNS entry" >&2',
        "  exit 1",
        "fi",
        # rdzv_port 0: a port from the job id, so jobs sharing a node do not collide on one port.
        f"RDZV_PORT={cluster.rdzv_port or '$((20000 + SLURM_JOB_ID % 20000))'}",
        "export MASTER_ADDR=$RDZV_HOST MASTER_PORT=$RDZV_PORT",
        'echo "rendezvous at $RDZV_HOST:$RDZV_PORT on $SLURM_JOB_NUM_NODES node(s): $SLURM_JOB_NODELIST"',
        'trap \'echo "time limit near: requeueing $SLURM_JOB_ID"; scontrol requeue "$SLURM_JOB_ID"\' USR1',
        # In the background so the shell can take USR1 while the step runs.
        shell_join(srun_argv(cluster, step)) + " &",
        "wait $!",
    ]
    return "\n".join(lines) + "\n"


def mpi_launcher(cluster: ClusterConfig) -> str:
    """The ``mpirun`` beside the nodes' python (a venv's MPI, the one its mpi4py is built on), else PATH's."""
    beside = Path(python_on_nodes(cluster)).parent / "mpirun"
    return str(beside) if beside.exists() else "mpirun"


def mpirun_argv(cluster: ClusterConfig, config_path: Path, env: dict[str, str]) -> list[str]:
    """mpirun for every rank (Open MPI or MPICH spelling), passing ``env`` to all of them."""
    total = cluster.nodes * cluster.procs_per_node
    hosts = ",".join(f"{h}:{cluster.procs_per_node}" for h in cluster.hosts)
    launcher = mpi_launcher(cluster)
    if cluster.mpi == "mpich":
        argv = [launcher, "-n", str(total), "-ppn", str(cluster.procs_per_node)]
        if cluster.hosts:
            argv += ["-hosts", ",".join(cluster.hosts)]
        for key, value in sorted(env.items()):
            argv += ["-genv", key, value]
    else:
        argv = [
            launcher,
            "-np",
            str(total),
            "--map-by",
            f"ppr:{cluster.procs_per_node}:node",
            "--bind-to",
            "none",
        ]
        if cluster.hosts:
            argv += ["--host", hosts]
        for key, value in sorted(env.items()):
            argv += ["-x", f"{key}={value}"]
    return [*argv, *worker_argv(cluster, config_path)]
