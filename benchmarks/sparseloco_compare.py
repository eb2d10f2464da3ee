"""DDP-AdamW vs DiLoCo vs SparseLoCo on the CPU: the same tokens, final held-out loss and bytes per replica.

Each run is ``sparsetron train --nproc R`` of the demo MoE with ``R`` replicas of one rank each
(``dp_replicate=R, dp_shard=1``), so every byte a rank sends is its replica's. Bytes come from the runs'
``metrics.jsonl``: ``comm_bytes`` (what the collectives moved per rank: the per-step gradient all-reduce for
DDP, the outer all-reduce / all-gather for DiLoCo / SparseLoCo) and ``outer_payload_bytes`` (the encoded
pseudo-gradient a replica contributes per outer step, i.e. its upload).

    python3 benchmarks/sparseloco_compare.py [--replicas 4] [--steps 240] [--inner-steps 15]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

RUNS = {
    "ddp": ["train.dp.algorithm=ddp"],
    "diloco": ["train.dp.algorithm=diloco"],
    "sparseloco": ["train.dp.algorithm=sparseloco", "train.dp.index_coding=packed12"],
    "sparseloco-rice": ["train.dp.algorithm=sparseloco", "train.dp.index_coding=rice"],
}


def run(name: str, args: argparse.Namespace) -> dict:
    """Train one configuration and summarise its metrics.jsonl."""
    run_dir = args.out_dir / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a resume
    overrides = [
        f"parallel.dp_replicate={args.replicas}",
        "parallel.dp_shard=1",
        f"cluster.procs_per_node={args.replicas}",
        f"train.steps={args.steps}",
        "train.seq_len=256",
        f"train.global_batch_tokens={args.replicas * 4 * 256}",
        "train.micro_batch_size=4",
        "train.warmup_steps=20",
        f"train.lr={args.lr}",
        f"train.dp.inner_steps={args.inner_steps}",
        "train.log_every=20",
        "train.eval_samples=32",
        "data.heldout_windows=32",
        "checkpoint.interval=0",
        f"train.run_dir={run_dir}",
        *RUNS[name],
    ]
    command = [sys.executable, "-m", "sparsetron.cli", "train", "configs/train/demo.yaml", *overrides]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    outer = [s for s in steps if "outer_payload_bytes" in s]
    return {
        "name": name,
        "wall_s": wall,
        "tokens": steps[-1]["tokens"],
        "train_loss": steps[-1]["loss"],
        "eval_loss": steps[-1]["eval_loss"],
        "comm_bytes": sum(s["comm_bytes"] for s in steps),
        "payload_bytes": sum(s["outer_payload_bytes"] for s in outer),
        "dense_fp32_bytes": sum(s["outer_dense_fp32_bytes"] for s in outer),
        "outer_steps": len(outer),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--inner-steps", type=int, default=15)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/sparseloco-compare"))
    args = parser.parse_args()
    results = {name: run(name, args) for name in args.runs.split(",")}
    (args.out_dir / "summary.json").write_text(json.dumps(results, indent=2))

    # DDP's per-step gradient (fp32) is what it uploads: its all-reduce moves 2(R−1)/R of it.
    ddp_fp32_payload = None
    if "ddp" in results:
        ddp_fp32_payload = results["ddp"]["comm_bytes"] * args.replicas / (2 * (args.replicas - 1))
    diloco_bf16_payload = results["diloco"]["payload_bytes"] / 2 if "diloco" in results else None
    base = results.get("diloco", {}).get("eval_loss")
    print(f"\n{args.replicas} replicas, {args.steps} steps, H={args.inner_steps}, demo MoE")
    print(
        "| run | eval loss | vs DiLoCo | on-wire bytes/replica | upload bytes/replica | ×DiLoCo-bf16 | ×DDP-fp32 | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        upload = r["payload_bytes"] if name != "ddp" else ddp_fp32_payload
        vs = f"{(r['eval_loss'] / base - 1):+.2%}" if base else "-"
        x_diloco = f"{diloco_bf16_payload / upload:,.3g}" if diloco_bf16_payload and upload else "-"
        x_ddp = f"{ddp_fp32_payload / upload:,.4g}" if ddp_fp32_payload and upload else "-"
        print(
            f"| {name} | {r['eval_loss']:.4f} | {vs} | {r['comm_bytes'] / 2**20:,.1f} MiB | "
            f"{upload / 2**20:,.2f} MiB | {x_diloco} | {x_ddp} | {r['wall_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
