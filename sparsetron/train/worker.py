"""Per-rank entry point of ``sparsetron train``: ``python -m sparsetron.train.worker <resolved config.yaml>``.

Started once per process by torchrun (``sparsetron train --nproc N``), srun or mpirun. It discovers its
place in the job, joins the process group, builds the layout's meshes and verifies them with real
collectives on every axis, then reports the topology.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist
from rich.console import Console
from rich.table import Table

from sparsetron.config import Config, load_config
from sparsetron.dist import discover, init_distributed
from sparsetron.dist.env import resolve_device_type
from sparsetron.dist.health import gather_topology, verify_mesh
from sparsetron.dist.layout import DENSE_AXES, EXPERT_AXES, mesh_axis_names
from sparsetron.dist.preflight import check_job

TRAINER_PENDING = (
    "The training loop is not available yet: it lands with the trainer issue (model, data, FSDP2, checkpoints). "
    "This run checked the process topology only."
)


def _topology_table(topology: list[dict]) -> Table:
    axes = [*DENSE_AXES, *(a for a in EXPERT_AXES if a not in DENSE_AXES)]
    table = Table(title="process topology (mesh coordinate of each rank)")
    for column in ("rank", "host", "local", *axes):
        table.add_column(column, justify="right")
    for row in topology:
        table.add_row(
            str(row["rank"]), row["host"], str(row["local_rank"]), *(str(row["coords"][a]) for a in axes)
        )
    return table


def main(argv: list[str] | None = None) -> int:
    """``python -m sparsetron.train.worker RESOLVED_CONFIG.yaml``: run this rank of the job."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m sparsetron.train.worker RESOLVED_CONFIG.yaml", file=sys.stderr)
        return 2
    return run(load_config(argv[0]))


def run(cfg: Config) -> int:
    """Run this process's rank of the job described by ``cfg`` (collective over the whole world)."""
    penv = discover()
    device_type = resolve_device_type(cfg.cluster.device.value)
    init_distributed(penv, device_type=device_type)
    try:
        dims = check_job(cfg, penv.world_size)
        mesh = dims.build_mesh(device_type)
        groups = verify_mesh(mesh, device=device_type)
        topology = gather_topology(mesh, penv.local_rank)
        if penv.rank == 0:
            console = Console()
            console.print(f"[bold]layout[/bold] {dims} via {penv.launcher}, backend {dist.get_backend()}")
            console.print(_topology_table(topology))
            for axis in mesh_axis_names():
                console.print(f"  {axis:>12}: groups {dims.groups_of(axis)}")
            run_dir = Path(cfg.train.run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            report = {
                "layout": dims.__dict__,
                "groups": {a: dims.groups_of(a) for a in mesh_axis_names()},
                "ranks": topology,
                "rank0_groups": groups,
                "launcher": penv.launcher,
            }
            (run_dir / "topology.json").write_text(json.dumps(report, indent=2))
            console.print(
                f"all {len(mesh_axis_names())} mesh axes verified with all-gathers; wrote {run_dir / 'topology.json'}"
            )
            console.print(TRAINER_PENDING)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
