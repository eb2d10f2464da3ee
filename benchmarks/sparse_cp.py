"""Sparse context parallelism on W GPUs: the sparse ring vs our dense zigzag ring vs PyTorch's ``context_parallel``.

    torchrun --standalone --nproc-per-node 2 benchmarks/sparse_cp.py [--seq 262144 524288] [--density 0.05]

bf16, causal, B=1, Hq=32 over Hkv=8 (GQA), D=128, forward + backward. The sparse ring runs on the striped layout
with 128-token blocks, the Triton block-sparse kernel per step, and two patterns estimated from the (seeded,
random) inputs under context parallelism, their budgets calibrated to the target block density: block top-k
and vertical-slash (plus ``S/512`` vertical key columns, which add work but no blocks). Its time counts the
pattern estimation and the planning as well as the attention (each also timed alone). Dense anchors on the
same sequence: ours (``method="ring"``, zigzag, cuDNN blocks) and torch's ``context_parallel`` (K/V repeated to
32 heads, its supported path). Also reported: the planner's worst per-step work max/mean over ranks, and the
K/V bytes the forward sent (counted by the ring) against the bytes of the K/V blocks the other rank's queries
reference (counted here from the pattern, independently of the planner). Accuracy: the bf16 sparse ring against
the fp32 reference ring on a short sequence.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from context_parallel import make_inputs, ours_step, torch_cp_time
from cuda_timing import median_seconds
from sparse_inputs import calibrated, estimate

from sparsetron.parallel.context import shard_sequence
from sparsetron.parallel.context.sparse_plan import plan_striped
from sparsetron.parallel.context.sparse_ring import SparseRingStats, sparse_ring_attention

HQ, HKV, D, BLOCK = 32, 8, 128, 128
KINDS = ("block_topk", "vertical_slash")


def referenced_bytes(pattern, world: int) -> int:
    """Bytes (K and V, bf16) of the key blocks each rank's queries reference on other ranks, summed over ranks:
    from the block pattern and the bars, independently of :func:`plan_striped`."""
    n = pattern.active_BHQK.shape[-1]
    seen = pattern.active_BHQK.any(dim=(0, 1))  # [nQ, nK]
    if pattern.bars_BHS is not None:
        bar_blocks = pattern.bars_BHS.reshape(*pattern.bars_BHS.shape[:2], n, BLOCK).any(dim=(0, 1, 3))
        seen = seen | (bar_blocks[None, :] & torch.ones(n, n, dtype=torch.bool, device=seen.device).tril())
    owner = torch.arange(n, device=seen.device) % world
    blocks = 0
    for rank in range(world):
        wanted = seen[owner == rank].any(dim=0) & (owner != rank)
        blocks += int(wanted.sum())
    return blocks * 2 * BLOCK * HKV * D * 2


def sparse_step(q, k, v, dout, pattern, plan, group, stats=None):
    def run():
        ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
        out, _ = sparse_ring_attention(ql, kl, vl, pattern, group, plan=plan, stats=stats)
        out.backward(dout)
        return out, ql.grad, kl.grad, vl.grad

    return run


def seconds_of(fn, reps: int) -> float:
    """Median wall seconds of a host-synchronising step (estimation, planning), all ranks lined up."""
    times = []
    for i in range(reps + 1):
        dist.barrier()
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if i:  # the first is warm-up
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def accuracy(group, seq: int = 16384) -> float:
    """Worst relative error of the bf16 sparse ring (Triton) over out, dq, dk, dv against the fp32 reference
    ring (exact masked attention per step), vertical-slash pattern with bars."""
    q, k, v, dout = (
        shard_sequence(t, 1, group, "striped", BLOCK) for t in make_inputs(seq, HKV, torch.float32, 3)
    )
    pattern, _ = calibrated("vertical_slash", q, k, BLOCK, 0.1, verticals=32, group=group)
    worst = torch.zeros(1, device="cuda")
    results = []
    for dtype, backend in ((torch.float32, "reference"), (torch.bfloat16, "triton")):
        ql, kl, vl = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
        out, _ = sparse_ring_attention(ql, kl, vl, pattern, group, backend=backend)
        out.backward(dout.to(dtype))
        results.append([out.detach().float(), ql.grad.float(), kl.grad.float(), vl.grad.float()])
    for got, ref in zip(results[1], results[0], strict=True):
        worst = torch.maximum(worst, (got - ref).abs().max().reshape(1) / ref.abs().max())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    return worst.item()


def measure_sparse(kind: str, seq: int, shards, group, args, dense: float) -> dict:
    """One pattern's row: calibrate it, time estimation, planning and the ring, count bytes."""
    q, k, v, dout = shards
    world = dist.get_world_size(group)
    verticals = seq // 512
    pattern, budget = calibrated(kind, q, k, BLOCK, args.density, verticals, group=group)
    est = seconds_of(lambda: estimate(kind, q, k, BLOCK, budget, verticals, group), args.reps)
    plan_s = seconds_of(lambda: plan_striped(pattern, world), args.reps)
    plan = plan_striped(pattern, world)
    stats = SparseRingStats()
    sparse_step(q, k, v, dout, pattern, plan, group, stats)()
    sent = torch.tensor([sum(stats.forward_bytes)], device="cuda", dtype=torch.float64)
    dist.all_reduce(sent, group=group)
    attn = median_seconds(sparse_step(q, k, v, dout, pattern, plan, group), args.reps, barrier=True)
    return {
        "seq": seq, "pattern": kind, "budget": budget, "density": pattern.density(),
        "estimate_s": est, "plan_s": plan_s, "attention_s": attn, "total_s": est + plan_s + attn,
        "dense_ring_s": dense, "imbalance": plan.imbalance(), "sent_bytes": int(sent.item()),
        "referenced_bytes": referenced_bytes(pattern, world),
        "dense_ring_bytes": (world - 1) * 2 * seq * HKV * D * 2,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, nargs="+", default=[262144, 524288])
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip-torch", action="store_true", help="leave out torch's context_parallel")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("cpu:gloo,cuda:nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cuda", (world,), mesh_dim_names=("cp",))
    group = mesh.get_group("cp")
    rows = []
    for seq in args.seq:
        full = make_inputs(seq, HKV)
        zigzag = [shard_sequence(t, 1, group, "zigzag") for t in full]
        dense = median_seconds(ours_step(*zigzag, group), max(2, args.reps - 1), warmup=1, barrier=True)
        del zigzag
        q, k, v, dout = (shard_sequence(t, 1, group, "striped", BLOCK) for t in full)
        del full
        torch.cuda.empty_cache()
        for kind in KINDS:
            rows.append(measure_sparse(kind, seq, (q, k, v, dout), group, args, dense))
            if rank == 0:  # as it goes: a later failure (memory, the anchor) keeps what was measured
                print(json.dumps(rows[-1]), flush=True)
        del q, k, v, dout
        torch.cuda.empty_cache()
        theirs = float("nan")
        if not args.skip_torch:
            try:
                theirs = torch_cp_time(seq, HKV, mesh, max(2, args.reps - 1))
            except Exception as exc:  # report the anchor's failure instead of losing the run
                if rank == 0:
                    print(f"torch context_parallel failed at S={seq}: {str(exc).splitlines()[0]}")
            torch.cuda.empty_cache()
        for row in rows:
            if row["seq"] == seq:
                row["torch_cp_s"] = theirs
    error = accuracy(group)
    if rank == 0:
        report = {"device": torch.cuda.get_device_name(), "world": world, "torch": torch.__version__,
                  "rows": rows, "bf16_vs_fp32_error": error}  # fmt: skip
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)
        print(f"{world}× {report['device']}, torch {report['torch']}: bf16 causal GQA 32/8 D=128, fwd+bwd")
        print(f"{'S':>7} {'pattern':>14} {'dens':>6} {'total':>7} {'attn':>7} {'est%':>5} {'dense':>7} "
              f"{'torchCP':>7} {'×dense':>7} {'×torch':>7} {'imbal':>6} {'sent/ref':>8} {'sent/dense':>10}")  # fmt: skip
        for r in rows:
            print(
                f"{r['seq'] // 1024:>6}K {r['pattern']:>14} {r['density']:6.2%} {r['total_s']:7.3f} "
                f"{r['attention_s']:7.3f} {(r['estimate_s'] + r['plan_s']) / r['attention_s']:5.1%} "
                f"{r['dense_ring_s']:7.3f} {r['torch_cp_s']:7.3f} {r['dense_ring_s'] / r['total_s']:7.2f} "
                f"{r['torch_cp_s'] / r['total_s']:7.2f} {r['imbalance']:6.3f} "
                f"{r['sent_bytes'] / max(r['referenced_bytes'], 1):8.3f} {r['sent_bytes'] / r['dense_ring_bytes']:10.3f}"
            )
        print(f"bf16 sparse ring (Triton) vs fp32 reference ring, S=16K: max relative error {error:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
