"""Process discovery (torchrun, Slurm, MPI, single), Slurm hostlists, and joining the group (tier 0 and 1).

Discovery is tested on explicit environment dicts; two tests start real launchers (``mpiexec -n 3`` and
``torchrun --nproc-per-node 2``) in subprocesses and check that every rank discovers the same world and can
all-reduce in it. The pytest process itself never imports ``mpi4py.MPI`` (that would initialise MPI here)
and never joins a process group.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from launch_env import clean_env, is_launcher_var

from sparsetron.dist import DistEnvError, ProcessEnv, discover, init_distributed
from sparsetron.dist.env import default_backend, expand_hostlist, resolve_device_type

REPO = Path(__file__).resolve().parents[1]
MPIEXEC = Path(sys.executable).parent / "mpiexec"
SUBPROCESS_TIMEOUT_S = 120

# -- environments -------------------------------------------------------------------------------------

TORCHRUN = {
    "RANK": "5",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "4",
    "MASTER_ADDR": "node0.cluster",
    "MASTER_PORT": "29400",
    "GROUP_RANK": "1",
    "TORCHELASTIC_RUN_ID": "run-42",
}

# Task 3 of an srun step of 4 tasks, 2 per node, on gpu07 and gpu08.
SLURM = {
    "SLURM_JOB_ID": "123456",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "3",
    "SLURM_NTASKS": "4",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_STEP_NODELIST": "gpu[07-08]",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
}
SLURM_PORT = 20000 + 123456 % 20000  # 23456: every task derives it from the job id alone

MASTER = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29555"}


@pytest.fixture
def no_mpi4py(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``from mpi4py import MPI`` fail, so discovery takes the environment-variable path (and MPI is never
    initialised in the pytest process)."""
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    monkeypatch.delitem(sys.modules, "mpi4py.MPI", raising=False)


# -- torchrun -----------------------------------------------------------------------------------------


def test_torchrun_full_environment() -> None:
    penv = discover(TORCHRUN)
    assert penv == ProcessEnv(
        rank=5,
        world_size=8,
        local_rank=1,
        local_world_size=4,
        master_addr="node0.cluster",
        master_port=29400,
        launcher="torchrun",
        node_rank=1,
    )
    assert penv.num_nodes == 2


def test_torchrun_derives_local_and_node_rank_when_absent() -> None:
    env = {"RANK": "6", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", **MASTER}
    penv = discover(env)
    assert (penv.local_rank, penv.node_rank, penv.num_nodes) == (2, 1, 2)
    single_node = discover({"RANK": "3", "WORLD_SIZE": "4", **MASTER})
    assert (single_node.local_rank, single_node.local_world_size, single_node.num_nodes) == (3, 4, 1)


def test_torchrun_wins_over_slurm() -> None:
    """torchrun started inside an srun step: torchrun's own variables describe this process, Slurm's the agent."""
    penv = discover({**SLURM, **TORCHRUN})
    assert penv.launcher == "torchrun"
    assert (penv.rank, penv.world_size, penv.local_rank, penv.local_world_size) == (5, 8, 1, 4)
    assert (penv.master_addr, penv.master_port, penv.node_rank) == ("node0.cluster", 29400, 1)


def test_torchrun_wins_over_mpi(no_mpi4py: None) -> None:
    penv = discover({"PMI_RANK": "0", "PMI_SIZE": "2", **TORCHRUN})
    assert (penv.launcher, penv.rank, penv.world_size) == ("torchrun", 5, 8)


@pytest.mark.parametrize(
    ("drop", "match"),
    [
        (
            ("MASTER_ADDR",),
            r"TORCHELASTIC_RUN_ID, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_PORT set "
            r"but MASTER_ADDR missing",
        ),
        (("MASTER_ADDR", "MASTER_PORT"), r"set but MASTER_ADDR, MASTER_PORT missing"),
        (("WORLD_SIZE",), r"set but WORLD_SIZE missing"),
        (("RANK",), r"set but RANK missing"),
    ],
)
def test_torchrun_incomplete_names_missing_variables(drop: tuple[str, ...], match: str) -> None:
    env = {k: v for k, v in TORCHRUN.items() if k not in drop}
    with pytest.raises(DistEnvError, match=match) as info:
        discover(env)
    assert "torchrun" in str(info.value)  # the fix: start with torchrun, or set all four


def test_torchrun_rank_only() -> None:
    with pytest.raises(DistEnvError, match=r"RANK set but WORLD_SIZE, MASTER_ADDR, MASTER_PORT missing"):
        discover({"RANK": "0"})


def test_torchrun_run_id_only_names_it() -> None:
    with pytest.raises(DistEnvError, match=r"TORCHELASTIC_RUN_ID set but RANK, WORLD_SIZE, MASTER_ADDR"):
        discover({"TORCHELASTIC_RUN_ID": "run-42"})


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"RANK": "8"}, r"torchrun: RANK=8 is outside 0\.\.7 \(WORLD_SIZE=8\)"),
        ({"RANK": "-1"}, r"RANK=-1 is outside 0\.\.7"),
        ({"WORLD_SIZE": "0", "RANK": "0"}, r"WORLD_SIZE=0 must be at least 1"),
        ({"LOCAL_RANK": "4"}, r"LOCAL_RANK=4 is outside 0\.\.3 \(LOCAL_WORLD_SIZE=4\)"),
        ({"GROUP_RANK": "2"}, r"GROUP_RANK=2 is outside 0\.\.1"),
        ({"RANK": "zero"}, r"RANK='zero' is not an integer"),
        ({"WORLD_SIZE": "8.0"}, r"WORLD_SIZE='8\.0' is not an integer"),
        ({"MASTER_PORT": "http"}, r"MASTER_PORT='http' is not an integer"),
        (
            {"LOCAL_WORLD_SIZE": "3", "LOCAL_RANK": "1"},
            r"WORLD_SIZE=8 is not a multiple of LOCAL_WORLD_SIZE=3",
        ),
    ],
)
def test_torchrun_inconsistent(override: dict[str, str], match: str) -> None:
    with pytest.raises(DistEnvError, match=match):
        discover({**TORCHRUN, **override})


def test_torchrun_zero_local_world_size_without_local_rank() -> None:
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "0", **MASTER}
    with pytest.raises(DistEnvError, match=r"LOCAL_WORLD_SIZE=0 must be at least 1"):
        discover(env)


def test_discover_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [k for k in os.environ if is_launcher_var(k)]:
        monkeypatch.delenv(name)
    for name, value in TORCHRUN.items():
        monkeypatch.setenv(name, value)
    assert discover() == discover(TORCHRUN)


# -- Slurm --------------------------------------------------------------------------------------------


def test_slurm_step() -> None:
    penv = discover(SLURM)
    assert penv == ProcessEnv(
        rank=3,
        world_size=4,
        local_rank=1,
        local_world_size=2,
        master_addr="gpu07",
        master_port=SLURM_PORT,
        launcher="slurm",
        node_rank=1,
        nnodes=2,
    )
    assert penv.num_nodes == 2


def test_slurm_port_differs_between_jobs() -> None:
    assert discover({**SLURM, "SLURM_JOB_ID": "123457"}).master_port == SLURM_PORT + 1
    assert discover({**SLURM, "SLURM_JOB_ID": "20000"}).master_port == 20000


def test_slurm_master_overrides() -> None:
    penv = discover({**SLURM, "MASTER_ADDR": "gpu08-ib", "MASTER_PORT": "31000"})
    assert (penv.master_addr, penv.master_port, penv.launcher) == ("gpu08-ib", 31000, "slurm")
    only_port = discover({**SLURM, "MASTER_PORT": "31000"})
    assert (only_port.master_addr, only_port.master_port) == ("gpu07", 31000)


def test_slurm_falls_back_to_job_nodelist_and_tasks_per_node() -> None:
    env = {k: v for k, v in SLURM.items() if not k.startswith("SLURM_STEP_") or k == "SLURM_STEP_ID"}
    env |= {"SLURM_JOB_NODELIST": "cn[100-101]", "SLURM_TASKS_PER_NODE": "2(x2)"}
    penv = discover(env)
    assert (penv.master_addr, penv.local_world_size, penv.num_nodes) == ("cn100", 2, 2)


# SLURM_STEP_TASKS_PER_NODE="3,1": tasks 0-2 on n1, task 3 on n2.
@pytest.mark.parametrize(
    ("procid", "nodeid", "localid", "local_world"),
    [(0, 0, 0, 3), (1, 0, 1, 3), (2, 0, 2, 3), (3, 1, 0, 1)],
)
def test_slurm_heterogeneous_tasks_per_node(procid: int, nodeid: int, localid: int, local_world: int) -> None:
    env = {
        **SLURM,
        "SLURM_PROCID": str(procid),
        "SLURM_NODEID": str(nodeid),
        "SLURM_LOCALID": str(localid),
        "SLURM_STEP_NODELIST": "n[1-2]",
        "SLURM_STEP_TASKS_PER_NODE": "3,1",
    }
    penv = discover(env)
    assert (penv.rank, penv.local_rank, penv.local_world_size, penv.node_rank) == (
        procid,
        localid,
        local_world,
        nodeid,
    )
    assert penv.master_addr == "n1"
    assert penv.num_nodes == 2  # the same on every node, though local world sizes differ


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"SLURM_PROCID": "4"}, r"Slurm: SLURM_PROCID=4 is outside 0\.\.3 \(SLURM_NTASKS=4\)"),
        ({"SLURM_PROCID": "x"}, r"SLURM_PROCID='x' is not an integer"),
        ({"SLURM_STEP_NODELIST": "gpu[07-09]"}, r"'gpu\[07-09\]' has 3 hosts but SLURM_STEP_NUM_NODES=2"),
        ({"SLURM_STEP_NUM_NODES": "3"}, r"'gpu\[07-08\]' has 2 hosts but SLURM_STEP_NUM_NODES=3"),
        ({"SLURM_STEP_TASKS_PER_NODE": "2,1"}, r"tasks per node \[2, 1\] sum to 3 but SLURM_NTASKS=4"),
        ({"SLURM_STEP_TASKS_PER_NODE": "2(x3)"}, r"SLURM_STEP_TASKS_PER_NODE='2\(x3\)' lists 3 nodes .*2"),
        ({"SLURM_STEP_TASKS_PER_NODE": "2(x)"}, r"SLURM_STEP_TASKS_PER_NODE='2\(x\)': cannot read '2\(x\)'"),
        ({"SLURM_STEP_TASKS_PER_NODE": "two"}, r"SLURM_STEP_TASKS_PER_NODE='two'.*expected N or N\(xM\)"),
        ({"SLURM_LOCALID": "2"}, r"SLURM_LOCALID=2 is outside 0\.\.1"),
        ({"SLURM_NODEID": "2"}, r"SLURM_NODEID=2 is outside 0\.\.1"),
        ({"SLURM_NODEID": "-1"}, r"SLURM_NODEID=-1 is outside 0\.\.1"),
        ({"SLURM_STEP_NODELIST": "gpu[07-"}, r"'gpu\[07-' has an unclosed '\['"),
        ({"SLURM_JOB_ID": "job"}, r"SLURM_JOB_ID='job' is not an integer"),
    ],
)
def test_slurm_inconsistent(override: dict[str, str], match: str) -> None:
    with pytest.raises(DistEnvError, match=match):
        discover({**SLURM, **override})


def test_slurm_without_nodelist() -> None:
    env = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}
    with pytest.raises(DistEnvError, match=r"SLURM_STEP_NODELIST / SLURM_JOB_NODELIST is not set"):
        discover(env)


SBATCH = {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"}


def test_sbatch_without_srun_refuses_to_train_alone() -> None:
    with pytest.raises(DistEnvError, match=r"SLURM_NTASKS=4 tasks but not started by srun.*`srun`"):
        discover(SBATCH)


def test_sbatch_single_task_is_a_single_process() -> None:
    penv = discover({**SBATCH, "SLURM_NTASKS": "1"})
    assert (penv.launcher, penv.rank, penv.world_size, penv.local_rank, penv.local_world_size) == (
        "single",
        0,
        1,
        0,
        1,
    )
    assert penv.master_addr == "127.0.0.1"
    assert 0 < penv.master_port < 65536


def test_sbatch_bad_ntasks() -> None:
    with pytest.raises(DistEnvError, match=r"SLURM_NTASKS='4x' is not an integer"):
        discover({**SBATCH, "SLURM_NTASKS": "4x"})


def test_mpiexec_inside_sbatch_is_mpi(no_mpi4py: None) -> None:
    """``mpiexec -n 4`` in an sbatch script: the MPI launcher started this process, not a lone ``python``."""
    env = {
        **SBATCH,
        "PMI_RANK": "2",
        "PMI_SIZE": "4",
        "MPI_LOCALRANKID": "0",
        "MPI_LOCALNRANKS": "2",
        **MASTER,
    }
    penv = discover(env)
    assert (penv.launcher, penv.rank, penv.world_size, penv.local_rank, penv.local_world_size) == (
        "mpi",
        2,
        4,
        0,
        2,
    )


def test_mpirun_inside_a_one_task_srun_step_is_mpi(no_mpi4py: None) -> None:
    """`srun -n1 mpirun -n 4 ...`: the inherited SLURM_NTASKS=1 must not make a world of one."""
    env = {
        "SLURM_JOB_ID": "77",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
        "SLURM_LOCALID": "0",
        "SLURM_STEP_NODELIST": "n1",
        "OMPI_COMM_WORLD_RANK": "3",
        "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_LOCAL_RANK": "3",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
        **MASTER,
    }
    penv = discover(env)
    assert (penv.launcher, penv.rank, penv.world_size) == ("mpi", 3, 4)


def test_srun_with_pmix_agreeing_sizes_is_slurm() -> None:
    """`srun --mpi=pmix -n 2`: Slurm and MPI variables agree, so Slurm's (no mpi4py needed) are used."""
    env = {
        "SLURM_JOB_ID": "77",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "1",
        "SLURM_NTASKS": "2",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_NODELIST": "n1",
        "PMI_RANK": "1",
        "PMI_SIZE": "2",
    }
    penv = discover(env)
    assert (penv.launcher, penv.rank, penv.world_size, penv.master_addr) == ("slurm", 1, 2, "n1")


def test_empty_environment_is_a_single_process() -> None:
    penv = discover({})
    assert (penv.launcher, penv.rank, penv.world_size, penv.num_nodes, penv.node_rank) == (
        "single",
        0,
        1,
        1,
        0,
    )


# -- Slurm hostlists ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "hosts"),
    [
        ("login1", ["login1"]),
        ("a,b,c", ["a", "b", "c"]),
        (" a , b ", ["a", "b"]),
        ("n[1-3]", ["n1", "n2", "n3"]),
        ("n[08-10]", ["n08", "n09", "n10"]),
        ("n[0-1]", ["n0", "n1"]),
        ("n[7]", ["n7"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("gpu[01-02,05],login1", ["gpu01", "gpu02", "gpu05", "login1"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("n[1-2]-ib", ["n1-ib", "n2-ib"]),
        ("r[1-2]n[01,03]-ib,x", ["r1n01-ib", "r1n03-ib", "r2n01-ib", "r2n03-ib", "x"]),
        ("node-1.cluster,node-2.cluster", ["node-1.cluster", "node-2.cluster"]),
    ],
)
def test_expand_hostlist(expr: str, hosts: list[str]) -> None:
    assert expand_hostlist(expr) == hosts


@pytest.mark.parametrize(
    ("expr", "match"),
    [
        ("n[1-", r"'n\[1-' has an unclosed '\['"),
        ("n[3-1]", r"range '3-1' runs backwards"),
        ("n[a]", r"range 'a' is not N or N-M"),
        ("n[]", r"range '' is not N or N-M"),
        ("n[1-2-3]", r"range '1-2-3' is not N or N-M"),
        ("n]", r"'n\]' has an unmatched '\]' at position 1"),
        ("n[1]]", r"unmatched '\]' at position 4"),
        ("", r"Slurm node list '' is empty"),
        (" , ", r"is empty"),
    ],
)
def test_expand_hostlist_malformed(expr: str, match: str) -> None:
    with pytest.raises(DistEnvError, match=match):
        expand_hostlist(expr)


_hosts = st.lists(
    st.tuples(
        st.sampled_from(["n", "gpu", "r1n", "node-", "a.b", ""]),
        st.integers(min_value=0, max_value=120),
        st.integers(min_value=1, max_value=4),
    ),
    min_size=1,
    max_size=25,
)


def _hostname(prefix: str, number: int, width: int) -> str:
    return f"{prefix}{number:0{width}d}"


def _hostlist_expr(hosts: list[tuple[str, int, int]], plain: list[bool]) -> str:
    """A Slurm hostlist for ``hosts`` in order: runs with one prefix share a bracket, consecutive numbers of
    one width become ``lo-hi`` ranges, and hosts flagged ``plain`` are written out without brackets."""
    items: list[str] = []
    run_prefix: str | None = None
    parts: list[list[int]] = []  # [lo, hi, width] within the current bracket

    def close() -> None:
        if run_prefix is not None:
            body = ",".join(f"{lo:0{w}d}" if lo == hi else f"{lo:0{w}d}-{hi:0{w}d}" for lo, hi, w in parts)
            items.append(f"{run_prefix}[{body}]")

    for (prefix, number, width), as_plain in zip(hosts, plain, strict=True):
        if as_plain:
            close()
            run_prefix, parts = None, []
            items.append(_hostname(prefix, number, width))
        elif prefix != run_prefix:
            close()
            run_prefix, parts = prefix, [[number, number, width]]
        elif parts[-1][1] + 1 == number and parts[-1][2] == width:
            parts[-1][1] = number
        else:
            parts.append([number, number, width])
    close()
    return ",".join(items)


@settings(max_examples=200, deadline=None)
@given(hosts=_hosts, data=st.data())
def test_expand_hostlist_round_trip(hosts: list[tuple[str, int, int]], data: st.DataObject) -> None:
    plain = data.draw(st.lists(st.booleans(), min_size=len(hosts), max_size=len(hosts)))
    expr = _hostlist_expr(hosts, plain)
    assert expand_hostlist(expr) == [_hostname(*h) for h in hosts], expr


def test_hostlist_expr_builder_makes_ranges() -> None:
    """The property test's builder really produces ranges and mixed lists (else it would test little)."""
    hosts = [("n", 8, 2), ("n", 9, 2), ("n", 10, 2), ("n", 12, 1), ("x", 1, 1)]
    assert _hostlist_expr(hosts, [False, False, False, False, True]) == "n[08-10,12],x1"


# -- MPI variables without mpi4py ---------------------------------------------------------------------

MPI_LAUNCHERS = {
    "openmpi": {
        "OMPI_COMM_WORLD_RANK": "3",
        "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    },
    "mpich": {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"},
    "pmix": {"PMIX_RANK": "3", "PMIX_SIZE": "4", "PMIX_LOCAL_RANK": "1", "PMIX_LOCAL_SIZE": "2"},
    "mvapich": {
        "MV2_COMM_WORLD_RANK": "3",
        "MV2_COMM_WORLD_SIZE": "4",
        "MV2_COMM_WORLD_LOCAL_RANK": "1",
        "MV2_COMM_WORLD_LOCAL_SIZE": "2",
    },
}


@pytest.mark.parametrize("flavour", sorted(MPI_LAUNCHERS))
def test_mpi_variables_with_master(flavour: str, no_mpi4py: None) -> None:
    penv = discover({**MPI_LAUNCHERS[flavour], **MASTER})
    assert penv == ProcessEnv(
        rank=3,
        world_size=4,
        local_rank=1,
        local_world_size=2,
        master_addr="10.0.0.1",
        master_port=29555,
        launcher="mpi",
        node_rank=1,
    )
    assert penv.num_nodes == 2


@pytest.mark.parametrize("flavour", sorted(MPI_LAUNCHERS))
def test_mpi_variables_without_master(flavour: str, no_mpi4py: None) -> None:
    rank_var = next(iter(MPI_LAUNCHERS[flavour]))
    with pytest.raises(
        DistEnvError, match=rf"\({rank_var}=3\).*mpi4py is not installed.*MASTER_ADDR"
    ) as info:
        discover(MPI_LAUNCHERS[flavour])
    assert "export MASTER_ADDR and MASTER_PORT" in str(info.value)
    with pytest.raises(DistEnvError, match=r"MASTER_ADDR/MASTER_PORT are not set"):
        discover({**MPI_LAUNCHERS[flavour], "MASTER_ADDR": "10.0.0.1"})


def test_mpi_without_local_variables_is_one_node(no_mpi4py: None) -> None:
    penvs = [discover({"PMI_RANK": str(r), "PMI_SIZE": "3", **MASTER}) for r in range(3)]
    assert [(p.rank, p.local_rank, p.local_world_size, p.node_rank, p.num_nodes) for p in penvs] == [
        (0, 0, 3, 0, 1),
        (1, 1, 3, 0, 1),
        (2, 2, 3, 0, 1),
    ]


def test_mpi_local_rank_from_local_size(no_mpi4py: None) -> None:
    penv = discover({"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALNRANKS": "2", **MASTER})
    assert (penv.local_rank, penv.local_world_size, penv.node_rank) == (1, 2, 1)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"PMI_RANK": "4"}, r"MPI: PMI_RANK=4 is outside 0\.\.3 \(PMI_SIZE=4\)"),
        ({"PMI_SIZE": None}, r"PMI_RANK is set but PMI_SIZE is not"),
        ({"PMI_SIZE": "four"}, r"PMI_SIZE='four' is not an integer"),
        ({"MPI_LOCALRANKID": "2"}, r"MPI_LOCALRANKID=2 is outside 0\.\.1 \(MPI_LOCALNRANKS=2\)"),
        ({"MPI_LOCALRANKID": None, "MPI_LOCALNRANKS": "0"}, r"MPI: MPI_LOCALNRANKS=0 must be at least 1"),
    ],
)
def test_mpi_variables_inconsistent(override: dict[str, str | None], match: str, no_mpi4py: None) -> None:
    env = {**MPI_LAUNCHERS["mpich"], **MASTER, **override}
    with pytest.raises(DistEnvError, match=match):
        discover({k: v for k, v in env.items() if v is not None})


# -- real launchers -----------------------------------------------------------------------------------

# Each rank discovers itself, joins the group with init_distributed (recording the init_method it passes),
# all-reduces its rank and writes one JSON file (files, because launchers interleave the ranks' stdout, even
# within a line).
RANK_SCRIPT = """
import datetime, json, sys
from pathlib import Path
import torch
import torch.distributed as dist
from sparsetron.dist.env import discover, init_distributed

init_methods = []
real_init = dist.init_process_group


def recording_init(*args, **kwargs):
    store = kwargs.get("store")
    init_methods.append(kwargs.get("init_method") or type(store).__name__)
    return real_init(*args, **kwargs)


dist.init_process_group = recording_init
penv = discover()
init_distributed(penv, timeout=datetime.timedelta(seconds=60))
total = torch.tensor([float(penv.rank)])
dist.all_reduce(total)
fields = ("rank", "world_size", "local_rank", "local_world_size", "launcher", "master_addr", "master_port", "node_rank")
result = {**{f: getattr(penv, f) for f in fields}, "sum": total.item(), "init_methods": init_methods}
Path(sys.argv[1], f"rank{penv.rank}.json").write_text(json.dumps(result))
dist.destroy_process_group()
"""


def _run_ranks(argv: list[str], tmp_path: Path) -> list[dict]:
    script, out = tmp_path / "rank_script.py", tmp_path / "results"
    script.write_text(RANK_SCRIPT)
    out.mkdir()
    proc = subprocess.run(
        [*argv, str(script), str(out)],
        env=clean_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"{argv} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return [json.loads(f.read_text()) for f in sorted(out.glob("rank*.json"))]


@pytest.mark.slow
def test_real_mpiexec(tmp_path: Path) -> None:
    if not MPIEXEC.exists():
        pytest.skip(f"no mpiexec next to {sys.executable}; install the extra: pip install 'sparsetron[mpi]'")
    results = _run_ranks([str(MPIEXEC), "-n", "3", sys.executable], tmp_path)
    assert sorted(r["rank"] for r in results) == [0, 1, 2]
    assert {r["launcher"] for r in results} == {"mpi"}
    assert {r["world_size"] for r in results} == {3}
    assert sorted(r["local_rank"] for r in results) == [0, 1, 2]  # one host: COMM_TYPE_SHARED holds all 3
    assert {r["local_world_size"] for r in results} == {3}
    assert {r["node_rank"] for r in results} == {0}  # one node: every rank's leader is leader 0
    addr, port = results[0]["master_addr"], results[0]["master_port"]
    assert {(r["master_addr"], r["master_port"]) for r in results} == {(addr, port)}  # rank 0's broadcast
    assert [r["init_methods"] for r in results] == [[f"tcp://{addr}:{port}"]] * 3
    assert {r["sum"] for r in results} == {0.0 + 1.0 + 2.0}


@pytest.mark.slow
def test_real_torchrun(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    results = _run_ranks(argv, tmp_path)
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert sorted(r["local_rank"] for r in results) == [0, 1]
    assert {r["launcher"] for r in results} == {"torchrun"}
    assert {(r["world_size"], r["local_world_size"]) for r in results} == {(2, 2)}
    assert len({(r["master_addr"], r["master_port"]) for r in results}) == 1
    # torchrun's MASTER_PORT is its agent's store: joined as a client under a per-attempt key prefix.
    assert [r["init_methods"] for r in results] == [["PrefixStore"]] * 2
    assert {r["sum"] for r in results} == {1.0}


# -- init_distributed and devices ---------------------------------------------------------------------


@pytest.fixture
def no_init(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test, instead of joining a group in the pytest process, if init_process_group is reached."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("init_distributed reached init_process_group; it should have refused earlier")

    monkeypatch.setattr(dist, "init_process_group", refuse)


def test_init_refuses_unresolvable_slurm_master(no_init: None) -> None:
    penv = discover({**SLURM, "MASTER_ADDR": "no-such-host.invalid"})
    with pytest.raises(DistEnvError, match=r"MASTER_ADDR='no-such-host\.invalid' \(slurm\) does not resolve"):
        init_distributed(penv)
    assert not dist.is_initialized()


def test_init_refuses_unresolvable_multinode_master(no_init: None) -> None:
    penv = discover({**TORCHRUN, "MASTER_ADDR": "no-such-host.invalid"})
    assert penv.num_nodes == 2
    with pytest.raises(
        DistEnvError, match=r"'no-such-host\.invalid' \(torchrun\) does not resolve.*Set MASTER_ADDR"
    ):
        init_distributed(penv)
    assert not dist.is_initialized()


def test_init_refuses_second_call(monkeypatch: pytest.MonkeyPatch, no_init: None) -> None:
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    with pytest.raises(DistEnvError, match=r"already initialised.*call init_distributed once"):
        init_distributed(discover({}))


def test_resolve_device_type(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device_type("auto") == "cpu"
    assert resolve_device_type("cpu") == "cpu"
    with pytest.raises(
        DistEnvError, match=r"cluster.device=cuda but torch finds no CUDA device.*cluster.device=cpu"
    ):
        resolve_device_type("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device_type("auto") == "cuda"


def test_cuda_unavailable_here() -> None:
    """On this CPU-only machine, the real check (not a patched one) refuses cuda."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(DistEnvError, match=r"no CUDA device"):
        resolve_device_type("cuda")


def test_default_backend() -> None:
    assert default_backend("cuda") == "cpu:gloo,cuda:nccl"
    assert default_backend("cpu") == "gloo"


def test_ipv6_rendezvous_address_is_bracketed(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: seen.update(kwargs))
    penv = ProcessEnv(0, 1, 0, 1, "::1", 29511, "mpi")
    init_distributed(penv)
    assert seen["init_method"] == "tcp://[::1]:29511"
