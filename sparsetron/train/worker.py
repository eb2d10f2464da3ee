"""Per-rank entry point of ``sparsetron train``: ``python -m sparsetron.train.worker <resolved config.yaml>``.

Started once per process by torchrun (``sparsetron train --nproc N``), srun or mpirun. It discovers its
place in the job, joins the process group, builds the layout's meshes and verifies them with real
collectives on every axis, reports the topology, and trains.
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
from sparsetron.train.trainer import TrainingDiverged, TrainResult, train


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


def _summary(result: TrainResult) -> str:
    lines = ["[bold]run summary[/bold]"]
    if result.first_loss is not None:
        lines.append(
            f"  loss        {result.first_loss:.4f} -> {result.last_loss:.4f} over steps trained this run"
        )
    lines.append(
        f"  steps       {result.steps_done}"
        + ("  (stopped by a signal; rerun to resume)" if result.preempted else "")
    )
    lines.append(f"  throughput  {result.mean_tokens_per_s:,.0f} tokens/s (mean over steps)")
    if result.eval_accuracy is not None:
        lines.append(f"  eval        accuracy {result.eval_accuracy:.1%}")
    lines.append(
        f"  run dir     {result.run_dir}  (metrics.jsonl, config.yaml; `sparsetron report {result.run_dir}`)"
    )
    lines.append(f"  checkpoint  {result.checkpoint}")
    return "\n".join(lines)


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
        console = Console(soft_wrap=True)
        run_dir = Path(cfg.train.run_dir)
        if penv.rank == 0:
            console.print(f"[bold]layout[/bold] {dims} via {penv.launcher}, backend {dist.get_backend()}")
            console.print(_topology_table(topology))
            run_dir.mkdir(parents=True, exist_ok=True)
            report = {
                "layout": dims.__dict__,
                "groups": {a: dims.groups_of(a) for a in mesh_axis_names()},
                "ranks": topology,
                "rank0_groups": groups,
                "launcher": penv.launcher,
            }
            (run_dir / "topology.json").write_text(json.dumps(report, indent=2))
        try:
            result = train(cfg, mesh, device_type)
        except TrainingDiverged as exc:
            if penv.rank == 0:
                console.print(f"[bold red]error:[/bold red] {exc}", highlight=False)
            return 1
        if penv.rank == 0:
            console.print(_summary(result))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
