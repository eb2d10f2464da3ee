"""DDP vs DiLoCo vs SparseLoCo over a slow link: two CPU replicas in two network namespaces.

Every algorithm trains the same small MoE on the same tokens with ``parallel.dp_replicate=2`` (one rank per
replica, one replica per "host") twice: over a veth link shaped with ``tc tbf`` (default 100 Mbit/s) and
over the unshaped link. The network share of an algorithm is ``1 - T_unshaped / T_shaped``, where T is
its training time (the sum of the steps' ``step_time_s``; process start-up and the final checkpoint are
left out because they are the same on both links). Needs root (see ``netns_link.py``)::

    python benchmarks/sparseloco_wan.py --algorithms ddp --steps 30
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import typer
from netns_link import LinkError, ShapedLink, measure_throughput, run_pair

from sparsetron.cli import _load
from sparsetron.config import default_run_config, write_resolved

ALGORITHMS = ("ddp", "diloco", "sparseloco")
# ~3.7 M parameters (15 MB fp32, so one dense all-reduce takes over a second at 100 Mbit/s) and ~0.3 s
# per CPU step on one thread at 1024 tokens per replica.
MODEL_OVERRIDES = (
    "model.preset=null",
    "model.dim=256",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.num_experts=4",
    "model.expert_ffn_dim=512",
    "model.shared_expert_ffn_dim=0",
)
TAIL_LINES = 15


def run_overrides(algorithm: str, steps: int, inner_steps: int, run_dir: Path) -> list[str]:
    """Overrides of one run: two one-rank replicas, ``algorithm``, a fresh run dir, no mid-run checkpoints."""
    overrides = [
        "parallel.dp_replicate=2",
        "parallel.dp_shard=1",
        "parallel.cp=1",
        "parallel.ep=1",
        "cluster.nodes=2",
        "cluster.procs_per_node=1",
        "cluster.device=cpu",
        f"train.dp.algorithm={algorithm}",
        f"train.steps={steps}",
        "train.warmup_steps=3",
        "train.seq_len=256",
        "train.global_batch_tokens=2048",
        "train.micro_batch_size=4",  # one forward/backward per step per replica
        "train.log_every=5",
        f"train.run_dir={run_dir}",
        # 0 saves only at the end; there is no setting that saves nothing.
        "checkpoint.interval=0",
    ]
    if algorithm != "ddp":
        overrides.append(f"train.dp.inner_steps={inner_steps}")
    return overrides


def resolve_config(config: str, overrides: list[str], run_dir: Path) -> Path:
    """Resolve ``config`` + ``overrides`` exactly as ``sparsetron train`` does; returns the written YAML."""
    cfg = _load([config, *overrides])
    return write_resolved(cfg, run_dir)


def resolve_all(args: argparse.Namespace, root: Path) -> dict[tuple[str, str], Path]:
    """Resolved config of every (algorithm, link label) run, written before any link is set up."""
    resolved = {}
    for label in (args.rate, "unshaped"):
        for algorithm in args.algorithms:
            run_dir = root / f"{algorithm}-{label}"
            # The trainer resumes from a checkpoint in its run dir, which would skip the steps to time.
            if (run_dir / "checkpoints").exists():
                raise ValueError(f"{run_dir} holds checkpoints of an earlier run; pick a fresh --run-root")
            overrides = run_overrides(algorithm, args.steps, args.inner_steps, run_dir)
            resolved[algorithm, label] = resolve_config(
                args.config, overrides + args.model_overrides, run_dir
            )
    return resolved


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    text = path.read_text(errors="replace").strip() if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def failure_report(result) -> str:
    """Exit codes plus the output tails of the ranks that did not exit 0 (why the run failed)."""
    why = "timed out" if result.timed_out else "failed"
    parts = [f"{why}, exit codes {result.returncodes}"]
    for rank, (rc, (out, err)) in enumerate(zip(result.returncodes, result.logs, strict=True)):
        if rc == 0:
            continue
        # The trainer prints its own errors to stdout and tracebacks go to stderr: show both.
        for name, path in (("stdout", out), ("stderr", err)):
            tail = _tail(path)
            if tail:
                parts.append(f"--- rank {rank} {name} ({path}) ---\n{tail}")
    return "\n".join(parts)


def summarize_metrics(run_dir: Path) -> dict:
    """Training time, tokens/s, final loss and comm bytes per replica from rank 0's ``metrics.jsonl``."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    if not records:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} holds no steps")
    train_s = sum(r["step_time_s"] for r in records)
    return {
        "steps": records[-1]["step"],
        "train_s": train_s,
        "tokens": records[-1]["tokens"],
        "tokens_per_s": records[-1]["tokens"] / train_s,
        "final_loss": records[-1]["loss"],
        "comm_bytes": sum(r["comm_bytes"] for r in records),
        # DiLoCo/SparseLoCo measure their own blocking on the outer collectives.
        "outer_wait_s": sum(r.get("outer_wait_s", 0.0) for r in records),
    }


def run_one(link: ShapedLink, resolved: Path, timeout: float) -> dict:
    """Train the run of config ``resolved`` over ``link``; status ``ok`` and its metrics, or ``failed`` and why."""
    run_dir = resolved.parent
    argv = [sys.executable, "-m", "sparsetron.train.worker", str(resolved)]
    result = run_pair(link, argv, env={}, log_dir=run_dir / "logs", timeout=timeout)
    record = {"run_dir": str(run_dir), "wall_s": result.seconds, "returncodes": result.returncodes}
    if not result.ok:
        return record | {"status": "failed", "error": failure_report(result)}
    try:
        return record | {"status": "ok"} | summarize_metrics(run_dir)
    except (OSError, ValueError, KeyError) as exc:
        return record | {"status": "failed", "error": f"unreadable metrics: {exc}"}


def run_link(rate: str | None, resolved: dict[tuple[str, str], Path], timeout: float) -> dict:
    """Measure one link (shaped to ``rate``, or unshaped) and train every algorithm over it."""
    label = rate or "unshaped"
    with ShapedLink(rate=rate) as link:
        print(f"link {link.describe()}", flush=True)
        throughput = measure_throughput(link)
        print("  measured " + ", ".join(f"{k} {v:,.1f} Mbit/s" for k, v in throughput.items()), flush=True)
        runs = {}
        for (algorithm, run_label), config in resolved.items():
            if run_label != label:
                continue
            print(f"  {algorithm} on {label} ...", flush=True)
            runs[algorithm] = run_one(link, config, timeout)
            if runs[algorithm]["status"] != "ok":
                print(f"  {algorithm} on {label} {runs[algorithm]['error']}", file=sys.stderr, flush=True)
    return {"rate": rate, "measured_mbit_s": throughput, "runs": runs}


def network_share(shaped: dict, unshaped: dict) -> float | None:
    """``1 - T_unshaped / T_shaped`` over training time, or None unless both runs succeeded."""
    if shaped["status"] != "ok" or unshaped["status"] != "ok":
        return None
    return 1 - unshaped["train_s"] / shaped["train_s"]


def table(links: list[dict], shares: dict[str, float | None]) -> str:
    """A plain-text table of every run, the network share on the shaped rows."""
    header = (
        f"{'algorithm':<11}{'link':<10}{'Mbit/s':>9}{'wall s':>8}{'train s':>9}{'tok/s':>8}"
        f"{'loss':>8}{'comm MB':>9}{'outer wait s':>13}{'net share':>11}"
    )
    rows = [header, "-" * len(header)]
    for link in links:
        label = link["rate"] or "unshaped"
        mbit = min(link["measured_mbit_s"].values())
        for algorithm, run in link["runs"].items():
            if run["status"] != "ok":
                rows.append(
                    f"{algorithm:<11}{label:<10}{mbit:>9,.1f}  FAILED (exit codes {run['returncodes']})"
                )
                continue
            share = shares.get(algorithm) if link["rate"] else None
            rows.append(
                f"{algorithm:<11}{label:<10}{mbit:>9,.1f}{run['wall_s']:>8.1f}{run['train_s']:>9.1f}"
                f"{run['tokens_per_s']:>8,.0f}{run['final_loss']:>8.3f}{run['comm_bytes'] / 1e6:>9.1f}"
                f"{run['outer_wait_s']:>13.2f}" + (f"{share:>11.0%}" if share is not None else f"{'':>11}")
            )
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags of the driver."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
    parser.add_argument("--steps", type=int, default=30, help="Optimizer steps; a multiple of --inner-steps.")
    parser.add_argument("--inner-steps", type=int, default=15, help="DiLoCo/SparseLoCo H.")
    parser.add_argument("--rate", default="100mbit", help="tc rate of the shaped link.")
    parser.add_argument("--config", default=str(default_run_config()), help="Base run YAML.")
    parser.add_argument(
        "--model-overrides",
        nargs="+",
        default=list(MODEL_OVERRIDES),
        help="key=value overrides that replace the default model (any config key is accepted).",
    )
    parser.add_argument("--timeout", type=float, default=600, help="Seconds before a run is killed.")
    parser.add_argument("--run-root", help="Directory for the run dirs (default: a new temp dir).")
    parser.add_argument("--out", help="JSON summary path (default: RUN_ROOT/sparseloco_wan.json).")
    args = parser.parse_args(argv)
    if args.steps % args.inner_steps:
        parser.error(f"--steps {args.steps} is not a multiple of --inner-steps {args.inner_steps}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every algorithm over the shaped and the unshaped link; print a table and write the JSON summary."""
    args = parse_args(argv)
    root = Path(args.run_root or tempfile.mkdtemp(prefix="sparseloco-wan-"))
    try:
        resolved = resolve_all(args, root)
    except typer.Exit as exc:  # _load already printed the config error
        return exc.exit_code
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        links = [run_link(rate, resolved, args.timeout) for rate in (args.rate, None)]
    except LinkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; links torn down, partial runs in {root}", file=sys.stderr)
        return 130
    shaped, unshaped = (link["runs"] for link in links)
    shares = {a: network_share(shaped[a], unshaped[a]) for a in args.algorithms}
    summary = {
        "steps": args.steps,
        "inner_steps": args.inner_steps,
        "model_overrides": args.model_overrides,
        "links": links,
        "network_share": shares,
    }
    out = Path(args.out or root / "sparseloco_wan.json")
    out.write_text(json.dumps(summary, indent=2))
    print(f"\nruns in {root}; summary {out}\n")
    print(table(links, shares))
    return 0 if all(run["status"] == "ok" for link in links for run in link["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
