"""Dense context-parallel attention on W GPUs: ours vs PyTorch's ``context_parallel`` vs the best single GPU.

    torchrun --standalone --nproc-per-node 2 benchmarks/context_parallel.py [--seq 131072 262144] [--out FILE]

bf16, causal, B=1, D=128, Hq=32 with Hkv=32 (MHA) and 8 (GQA); forward + backward. FLOPs follow the
FlashAttention convention: forward = 4·B·Hq·S²·D / 2 (causal), backward = 2.5 × forward, so fwd+bwd = 3.5 ×.
Per-GPU TFLOP/s = FLOPs / W / time. Ring efficiency = single-GPU time on the whole problem / (W × CP time),
i.e. per-GPU CP throughput ÷ single-GPU throughput. The accuracy check compares bf16 outputs and gradients
with an fp32 reference at a smaller length, for ours and for the single-GPU kernel.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from cuda_timing import median_seconds
from torch.nn.attention import SDPBackend, sdpa_kernel

from sparsetron.parallel.context import context_attention, shard_sequence

D, HQ = 128, 32


def fwd_bwd_flops(seq: int, heads: int) -> float:
    return 3.5 * 4 * heads * seq * seq * D / 2


def make_inputs(seq: int, hkv: int, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, seq, HQ, D, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(1, seq, hkv, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(1, seq, hkv, D, device="cuda", dtype=dtype, generator=g)
    dout = torch.randn(1, seq, HQ, D, device="cuda", dtype=dtype, generator=g)
    return q, k, v, dout


def ours_step(q, k, v, dout, group):
    def run():
        ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
        out = context_attention(ql, kl, vl, group=group, layout="zigzag", method="ring")
        out.backward(dout)
        return out, ql.grad, kl.grad, vl.grad

    return run


def single_gpu_step(q, k, v, dout, backend):
    hkv = k.shape[2]

    def run():
        ql, kl, vl = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(ql, kl, vl, is_causal=True, enable_gqa=hkv != HQ)
        out.backward(dout.transpose(1, 2))
        return out.transpose(1, 2), ql.grad.transpose(1, 2), kl.grad.transpose(1, 2), vl.grad.transpose(1, 2)

    return run


def torch_cp_time(seq: int, hkv: int, mesh, reps: int) -> float:
    """PyTorch's ring (``context_parallel`` around SDPA, load-balanced). K/V are repeated to Hq heads because
    its sharding rules cover plain multi-head SDPA (that is how a user of it runs GQA)."""
    from torch.distributed.tensor.experimental import context_parallel

    q, k, v, dout = make_inputs(seq, hkv)
    q, k, v, dout = (t.transpose(1, 2).contiguous() for t in (q, k, v, dout))
    if hkv != HQ:
        k, v = (t.repeat_interleave(HQ // hkv, dim=1) for t in (k, v))
    # context_parallel shards its buffers in place, so they may only require grad once sharded.
    with context_parallel(
        mesh, buffers=[q, k, v, dout], buffer_seq_dims=[2, 2, 2, 2], no_restore_buffers={q, k, v, dout}
    ):
        for t in (q, k, v):
            t.requires_grad_()

        def run():
            for t in (q, k, v):
                t.grad = None
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            out.backward(dout)

        return median_seconds(run, reps, barrier=True)


def errors(results, reference) -> float:
    """Worst relative error over out, dq, dk, dv against the fp32 reference."""
    return max(
        ((a.float() - b).abs().max() / b.abs().max()).item() for a, b in zip(results, reference, strict=True)
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, nargs="+", default=[131072, 262144])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--accuracy-seq", type=int, default=4096)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("cpu:gloo,cuda:nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cuda", (world,), mesh_dim_names=("cp",))
    group = mesh.get_group("cp")
    rows = []
    for hkv in (HQ, 8):
        for seq in args.seq:
            q, k, v, dout = make_inputs(seq, hkv)
            single = {}
            if rank == 0:
                for name, backend in (
                    ("cudnn", SDPBackend.CUDNN_ATTENTION),
                    ("flash", SDPBackend.FLASH_ATTENTION),
                ):
                    try:
                        single[name] = median_seconds(single_gpu_step(q, k, v, dout, backend), args.reps)
                    except RuntimeError as exc:  # a backend that refuses this shape
                        single[name] = float("nan")
                        print(
                            f"single-GPU {name} unavailable for S={seq} Hkv={hkv}: {str(exc).splitlines()[0]}"
                        )
            shards = [shard_sequence(t, 1, group, "zigzag") for t in (q, k, v, dout)]
            del q, k, v, dout
            ours = median_seconds(ours_step(*shards, group), args.reps, barrier=True)
            del shards
            torch.cuda.empty_cache()
            try:
                theirs = torch_cp_time(seq, hkv, mesh, args.reps)
            except Exception as exc:  # report the anchor's failure instead of losing the whole run
                theirs = float("nan")
                if rank == 0:
                    print(f"torch context_parallel failed for S={seq} Hkv={hkv}: {str(exc).splitlines()[0]}")
            torch.cuda.empty_cache()
            if rank == 0:
                flops = fwd_bwd_flops(seq, HQ)
                finite = [t for t in single.values() if t == t]
                best_single = min(finite) if finite else float("nan")
                rows.append(
                    {
                        "seq": seq,
                        "hkv": hkv,
                        "world": world,
                        "ours_tflops_per_gpu": flops / world / ours / 1e12,
                        "torch_cp_tflops_per_gpu": flops / world / theirs / 1e12,
                        "single_gpu_tflops": {n: flops / t / 1e12 for n, t in single.items()},
                        "ratio_vs_torch_cp": theirs / ours,
                        "ring_efficiency": best_single / (world * ours),
                    }
                )
    accuracy = accuracy_check(args.accuracy_seq, group, rank)
    if rank == 0:
        report = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "rows": rows,
            "accuracy": accuracy,
        }
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)
        print(
            f"{'S':>7} {'Hkv':>4} {'ours':>7} {'torchCP':>8} {'cuDNN1':>7} {'flash1':>7} {'×torch':>7} {'eff':>6}  (TFLOP/s per GPU)"
        )
        for r in rows:
            s = r["single_gpu_tflops"]
            print(
                f"{r['seq']:>7} {r['hkv']:>4} {r['ours_tflops_per_gpu']:7.1f} {r['torch_cp_tflops_per_gpu']:8.1f} "
                f"{s.get('cudnn', float('nan')):7.1f} {s.get('flash', float('nan')):7.1f} {r['ratio_vs_torch_cp']:7.2f} "
                f"{r['ring_efficiency']:6.1%}"
            )
        print(
            f"bf16 error vs fp32 (S={args.accuracy_seq}): ours {accuracy['ours']:.2e}, single-GPU flash "
            f"{accuracy['single']:.2e}, ratio {accuracy['ours'] / accuracy['single']:.2f}"
        )
    dist.destroy_process_group()


def accuracy_check(seq: int, group, rank: int) -> dict:
    """bf16 error of our ring and of the single-GPU flash kernel against an fp32 (math) reference."""
    q32, k32, v32, dout32 = make_inputs(seq, 8, dtype=torch.float32, seed=1)
    with sdpa_kernel(SDPBackend.MATH):
        reference = single_gpu_step(q32, k32, v32, dout32, SDPBackend.MATH)()
    bf = [t.bfloat16() for t in (q32, k32, v32, dout32)]
    single = single_gpu_step(*bf, SDPBackend.FLASH_ATTENTION)()
    shards = [shard_sequence(t, 1, group, "zigzag") for t in bf]
    ours = ours_step(*shards, group)()
    ref_shards = [shard_sequence(t, 1, group, "zigzag") for t in reference]
    worst = torch.tensor([errors(ours, ref_shards)], device="cuda")
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    return {"ours": worst.item(), "single": errors(single, reference)}


if __name__ == "__main__":
    main()
