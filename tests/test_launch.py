"""`sparsetron launch`: preflight refusals, the exact commands rendered for every scheduler (dry runs of the
example cluster files), network profiles, and a real local launch with per-rank logs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from launch_env import REPO, clean_env
from typer.testing import CliRunner

from sparsetron.cli import app
from sparsetron.config import ClusterConfig, NetworkProfile
from sparsetron.launch import LaunchError, plan_launch
from sparsetron.launch import plan as launch_plan
from sparsetron.launch.network import interface_ipv4, is_local_ipv4, network_env

CLUSTERS = REPO / "configs" / "cluster"
DEMO = str(REPO / "configs" / "train" / "demo.yaml")
QUICK = ["model.preset=tiny", "train.seq_len=128", "train.global_batch_tokens=1024", "train.steps=2",
         "train.warmup_steps=1"]  # fmt: skip


def _plan(cluster: str, tmp_path: Path, *overrides: str):
    return plan_launch(CLUSTERS / cluster, ["train", DEMO, f"train.run_dir={tmp_path / 'run'}", *overrides])


def test_slurm_script_rendezvous_on_the_first_allocated_host(tmp_path):
    plan = _plan("slurm-multinode.yaml", tmp_path, "parallel.dp_replicate=4", "parallel.dp_shard=2",
                 "parallel.cp=4", "checkpoint.interval=50")  # fmt: skip
    script = plan.sbatch
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=my-account", "#SBATCH --time=04:00:00",
                 "#SBATCH --signal=B:USR1@120", "#SBATCH --requeue",
                 "export NCCL_IB_HCA=mlx5_0,mlx5_1,mlx5_2,mlx5_3", "export NCCL_SOCKET_IFNAME=ib0",
                 "source /shared/envs/sparsetron/bin/activate", "RDZV_PORT=29500",
                 "export MASTER_ADDR=$RDZV_HOST MASTER_PORT=$RDZV_PORT"):  # fmt: skip
        assert line in script.splitlines(), line
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in script
    assert '[[ "$RDZV_HOST" == 127.* ]]' in script and "exit 1" in script  # never a silent localhost
    assert "scontrol requeue" in script and script.rstrip().endswith("wait $!")
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert srun.startswith(
        "srun --nodes=4 --ntasks-per-node=1 --kill-on-bad-exit=1 /shared/envs/sparsetron/bin/python"
    )
    for part in ('"--rdzv-endpoint=$RDZV_HOST:$RDZV_PORT"', '"--rdzv-id=$SLURM_JOB_ID"', "--rdzv-backend=c10d",
                 "--nnodes=4", "--nproc-per-node=8", "--max-restarts=2", "-m sparsetron.train.worker",
                 str(tmp_path / "run" / "config.yaml")):  # fmt: skip
        assert part in srun, part
    assert plan.commands == [["sbatch", "--parsable", str(tmp_path / "run" / "launch" / "job.sbatch")]]
    bash = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert bash.returncode == 0, bash.stderr  # the script parses


def test_slurm_port_zero_is_derived_from_the_job_id(tmp_path):
    plan = _plan("slurm-multinode.yaml", tmp_path, "cluster.rdzv_port=0", "parallel.dp_replicate=4",
                 "parallel.dp_shard=2", "parallel.cp=4", "checkpoint.interval=50")  # fmt: skip
    assert "RDZV_PORT=$((20000 + SLURM_JOB_ID % 20000))" in plan.sbatch.splitlines()
    with pytest.raises(LaunchError, match="0, from the job id, only under Slurm"):
        _plan("torchrun-two-hosts.yaml", tmp_path, "cluster.rdzv_port=0")


def test_slurm_process_mode_runs_one_task_per_rank_without_torchrun(tmp_path):
    plan = _plan("slurm-multinode.yaml", tmp_path, "cluster.slurm_tasks=process", "parallel.dp_replicate=4",
                 "parallel.dp_shard=2", "parallel.cp=4", "checkpoint.interval=50")  # fmt: skip
    srun = next(line for line in plan.sbatch.splitlines() if line.startswith("srun "))
    assert "--ntasks-per-node=8" in srun and "torch.distributed.run" not in srun
    assert srun.endswith(f"-m sparsetron.train.worker {tmp_path / 'run' / 'config.yaml'} &")
    assert "#SBATCH --ntasks-per-node=8" in plan.sbatch


@pytest.mark.parametrize(
    ("flavour", "expected"),
    [
        ("openmpi", ["mpirun", "-np", "4", "--map-by", "ppr:2:node", "--bind-to", "none", "--host",
                     "node1:2,node2:2"]),
        ("mpich", ["mpirun", "-n", "4", "-ppn", "2", "-hosts", "node1,node2"]),
    ],
)  # fmt: skip
def test_mpirun_lines(tmp_path, flavour, expected):
    plan = _plan("mpi-cpu.yaml", tmp_path, f"cluster.mpi={flavour}")
    (argv,) = plan.commands
    assert Path(argv[0]).name == "mpirun" and argv[1 : len(expected)] == expected[1:]
    assert argv[-3:] == ["-m", "sparsetron.train.worker", str(tmp_path / "run" / "config.yaml")]
    passed = "-x GLOO_SOCKET_IFNAME=eth0" if flavour == "openmpi" else "-genv GLOO_SOCKET_IFNAME eth0"
    assert passed in " ".join(argv)


@pytest.fixture
def node_at(monkeypatch):
    """Make this machine the node whose cluster.network_interface has ``address`` (and only that address)."""

    def place(address: str) -> None:
        monkeypatch.setattr(launch_plan, "interface_ipv4", lambda interface: address)
        monkeypatch.setattr(launch_plan, "is_local_ipv4", lambda other: other == address)

    return place


@pytest.mark.parametrize(("address", "is_host"), [("10.0.0.1", "true"), ("10.0.0.2", "false")])
def test_torchrun_nodes_rendezvous_at_the_first_host(tmp_path, node_at, address, is_host):
    node_at(address)
    (argv,) = _plan("torchrun-two-hosts.yaml", tmp_path).commands
    assert argv[1:3] == ["-m", "torch.distributed.run"]
    for part in ("--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.1:29400",
                 "--rdzv-id=sparsetron", f"--log-dir={tmp_path / 'run' / 'logs'}",
                 # Each node advertises its own address; only the first serves the rendezvous store.
                 f"--local-addr={address}", f"--rdzv-conf=is_host={is_host}"):  # fmt: skip
        assert part in argv, part
    (local,) = _plan("local-cpu.yaml", tmp_path).commands
    assert "--standalone" in local and "--nproc-per-node=4" in local
    assert not any(a.startswith(("--local-addr", "--rdzv-conf")) for a in local)


def test_torchrun_node_without_the_interface_is_refused(tmp_path):
    with pytest.raises(LaunchError, match="there is no network interface 'sthnone0' on this node"):
        _plan("torchrun-two-hosts.yaml", tmp_path, "cluster.network_interface=sthnone0")


def test_torchrun_interface_without_ipv4_is_refused_with_the_fix(tmp_path, monkeypatch):
    def no_ipv4(interface: str) -> str:
        raise LookupError(f"network interface {interface!r} has no IPv4 address on this node")

    monkeypatch.setattr(launch_plan, "interface_ipv4", no_ipv4)
    with pytest.raises(LaunchError, match="refusing to launch(.|\n)*'eth0' has no IPv4 address"):
        _plan("torchrun-two-hosts.yaml", tmp_path)


def test_torchrun_rendezvous_on_loopback_is_refused(tmp_path, node_at):
    node_at("10.0.0.2")
    with pytest.raises(LaunchError, match="hosts\\[0\\]=127.0.0.1 resolves to loopback"):
        _plan("torchrun-two-hosts.yaml", tmp_path, "cluster.hosts=[127.0.0.1,10.0.0.2]")


def test_torchrun_across_nodes_needs_an_interface_on_every_profile(tmp_path):
    with pytest.raises(LaunchError, match="each node advertises its address on it"):
        _plan(
            "torchrun-two-hosts.yaml",
            tmp_path,
            "cluster.network_profile=ib",
            "cluster.network_interface=null",
        )


def test_interface_ipv4_reads_the_kernel():
    assert interface_ipv4("lo") == "127.0.0.1"
    assert is_local_ipv4("127.0.0.1")
    assert not is_local_ipv4("198.51.100.254")  # TEST-NET-2: for documentation, assigned to no machine


def test_dry_run_prints_config_env_and_commands_and_writes_nothing(tmp_path):
    result = CliRunner().invoke(
        app, ["launch", str(CLUSTERS / "mpi-cpu.yaml"), "--dry-run", "--", "train", DEMO,
              f"train.run_dir={tmp_path / 'run'}"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = result.output
    assert "# scheduler: mpi, 2 node(s) × 2 process(es) = world size 4" in out
    assert "scheduler: mpi" in out and "NCCL_IB_DISABLE=1" in out and "mpirun -np 4" in out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("cluster", "overrides", "messages"),
    [
        ("local-cpu.yaml", ["cluster.procs_per_node=3"], ["world_size=3", "valid layouts"]),
        ("local-cpu.yaml", ["cluster.nodes=2"], ["cluster.scheduler=local runs on this machine only"]),
        ("torchrun-two-hosts.yaml", ["cluster.hosts=[a]"], ["needs cluster.hosts listing them"]),
        ("torchrun-two-hosts.yaml", ["cluster.network_interface=null"], ["needs cluster.network_interface"]),
        ("mpi-cpu.yaml", ["cluster.network_profile=loopback"], ["loopback cannot join 2 nodes"]),
        ("local-cpu.yaml", ["cluster.max_restarts=1", "checkpoint.interval=0"],
         ["checkpoint.interval=0 saves only at the end"]),
        ("local-cpu.yaml", ["parallel.dp_replicate=1", "parallel.dp_shard=4", "parallel.ep=4", "model.num_experts=6"],
         ["model.num_experts=6 must be divisible by ep=4"]),
        ("local-cpu.yaml", ["cluster.procs_per_node=3", "cluster.rdzv_port=70000"],
         ["world_size=3", "not a TCP port"]),
    ],
)  # fmt: skip
def test_invalid_jobs_are_refused_before_anything_runs(tmp_path, cluster, overrides, messages):
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["launch", str(CLUSTERS / cluster), "--", "train", DEMO, f"train.run_dir={run_dir}", *overrides]
    )
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "refusing to launch" in text
    for message in messages:
        assert message in text, message
    assert not run_dir.exists()


def test_the_command_after_the_separator_must_be_train(tmp_path):
    with pytest.raises(LaunchError, match="expected `-- train CONFIG"):
        plan_launch(CLUSTERS / "local-cpu.yaml", ["convert", DEMO])


@pytest.mark.parametrize("profile", list(NetworkProfile))
def test_network_profiles(profile):
    cluster = ClusterConfig(network_profile=profile, network_interface="eth1", env={"NCCL_DEBUG": "INFO"})
    env = network_env(cluster)
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3" and env["NCCL_DEBUG"] == "INFO"  # cluster.env wins
    expected = {
        NetworkProfile.loopback: {
            "NCCL_SOCKET_IFNAME": "lo",
            "GLOO_SOCKET_IFNAME": "lo",
            "NCCL_IB_DISABLE": "1",
        },
        NetworkProfile.socket: {
            "NCCL_SOCKET_IFNAME": "eth1",
            "GLOO_SOCKET_IFNAME": "eth1",
            "NCCL_IB_DISABLE": "1",
        },
        NetworkProfile.ib: {"NCCL_IB_DISABLE": "0", "NCCL_IB_HCA": "mlx5"},
        NetworkProfile.roce: {"NCCL_IB_GID_INDEX": "3", "NCCL_IB_HCA": "mlx5"},
        NetworkProfile.efa: {"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1"},
    }[profile]
    assert expected.items() <= env.items()
    assert "TORCH_FR_DUMP_TEMP_FILE" not in env
    traced = network_env(ClusterConfig(flight_recorder_dir="/tmp/fr/"))
    assert traced["TORCH_FR_DUMP_TEMP_FILE"] == "/tmp/fr/nccl_trace_rank_"


def test_local_launch_trains_with_per_rank_logs(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "sparsetron.cli", "launch", str(CLUSTERS / "local-cpu.yaml"), "--", "train", DEMO,
         *QUICK, f"train.run_dir={run_dir}"],
        capture_output=True, text=True, timeout=300, env=clean_env(), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    topology = json.loads((run_dir / "topology.json").read_text())
    assert sorted(r["rank"] for r in topology["ranks"]) == [0, 1, 2, 3] and topology["launcher"] == "torchrun"
    rank_logs = sorted(p.parent.name for p in (run_dir / "logs").rglob("stdout.log"))
    assert rank_logs == ["0", "1", "2", "3"]
    assert "GLOO_SOCKET_IFNAME: lo" not in proc.stdout  # env goes to the ranks, not printed
