"""Block-sparse attention on one GPU: our Triton kernel vs flex_attention given the same block mask.

    PYTHONPATH=$PWD python3 benchmarks/sparse_kernel.py [--seq 65536] [--density 0.05] [--sweep] [--out FILE]

bf16, causal, B=1, Hq=32 over Hkv=8 (GQA), D=128, block 128, forward + backward. Patterns: block top-k and
vertical-slash (plus ``S/512`` vertical key columns), estimated from seeded random inputs with the budget
calibrated to the target block density (:mod:`sparse_inputs`). Both kernels get the pattern prebuilt (our
work lists; flex's ``BlockMask`` with full blocks below the diagonal and the diagonal and bar blocks partial),
so only attention is timed. Dense causal SDPA (torch's pick of kernel) on the same tensors is the baseline of
the speed-ups. Accuracy: each kernel's bf16 output and gradients against the other's, and ours against an
fp32 reference on a short sequence. ``--sweep`` first times the forward and the backward of the block top-k
pattern under each candidate tile configuration (how ``block_sparse._tiles`` was tuned) and prints them.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from cuda_timing import median_seconds
from sparse_inputs import calibrated, flex_block_mask

from sparsetron.kernels import block_sparse
from sparsetron.kernels.block_sparse import (
    attention_delta,
    block_sparse_attention,
    block_sparse_backward,
    block_sparse_forward,
    sparse_lists,
)

HQ, HKV, D, BLOCK = 32, 8, 128, 128


def inputs(seq: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = lambda h: (1, seq, h, D)  # noqa: E731
    return [
        torch.randn(shape(h), generator=g, device="cuda", dtype=torch.bfloat16) for h in (HQ, HKV, HKV, HQ)
    ]


def ours_step(q, k, v, dout, pattern):
    every = torch.arange(pattern.active_BHQK.shape[-1], device="cuda")
    lists = sparse_lists(pattern, every, every)

    def run():
        ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
        out, _ = block_sparse_attention(ql, kl, vl, pattern, lists=lists)
        if torch.is_grad_enabled():
            out.backward(dout)
        return out, ql.grad, kl.grad, vl.grad

    return run


def flex_step(q, k, v, dout, pattern):
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    mask = flex_block_mask(pattern, HQ)

    def run():
        ql, kl, vl = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
        out = compiled(ql, kl, vl, block_mask=mask, enable_gqa=True)
        if torch.is_grad_enabled():
            out.backward(dout.transpose(1, 2))
        return (x.transpose(1, 2) for x in (out, ql.grad, kl.grad, vl.grad))

    return run


def dense_step(q, k, v, dout):
    def run():
        ql, kl, vl = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
        out = F.scaled_dot_product_attention(ql, kl, vl, is_causal=True, enable_gqa=True)
        out.backward(dout.transpose(1, 2))

    return run


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max()).item()


def fp32_error(kind: str, density: float) -> float:
    """Worst relative error of ours (bf16) over out, dq, dk, dv against fp32 masked attention at S=4096."""
    q, k, v, dout = (t.float() for t in inputs(4096, seed=1))
    pattern, _ = calibrated(kind, q, k, BLOCK, density, verticals=8)
    mask = pattern.token_mask(heads_per_group=HQ // HKV)
    ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
    ke, ve = (t.repeat_interleave(HQ // HKV, dim=2) for t in (kl, vl))
    logits = torch.einsum("bqhd,bkhd->bhqk", ql, ke) * D**-0.5
    out = torch.einsum("bhqk,bkhd->bqhd", logits.masked_fill(~mask, float("-inf")).softmax(-1), ve)
    out.backward(dout)
    reference = (out.detach(), ql.grad, kl.grad, vl.grad)
    ours = ours_step(*(t.bfloat16() for t in (q, k, v, dout)), pattern)()
    return max(rel(a, b) for a, b in zip(ours, reference, strict=True))


def _candidates():
    """Tile configurations to sweep: the forward's, then the backward kernels' (dq and dk/dv together)."""
    base = block_sparse._tiles(BLOCK, D)
    for n in (64, 128):
        for warps in (4, 8):
            for stages in (2, 3, 4):
                yield "fwd", {**base, "fwd": {"BLOCK_N": n, "num_warps": warps, "num_stages": stages}}
    for n in (32, 64):
        for m in (32, 64):
            for warps in (4, 8):
                for stages in (1, 2, 3):
                    yield (
                        "bwd",
                        {
                            **base,
                            "dq": {"BLOCK_N": n, "num_warps": warps, "num_stages": stages},
                            "dkdv": {"BLOCK_M": m, "num_warps": warps, "num_stages": stages},
                        },
                    )


def sweep(q, k, v, dout, density: float, reps: int) -> None:
    """Forward and backward times of block top-k under each candidate tile configuration."""
    pattern, _ = calibrated("block_topk", q, k, BLOCK, density, verticals=0)
    every = torch.arange(pattern.active_BHQK.shape[-1], device="cuda")
    lists = sparse_lists(pattern, every, every)
    scale = D**-0.5
    out, lse = block_sparse_forward(q, k, v, lists, scale, out_dtype=q.dtype)
    delta = attention_delta(dout, out)
    dq = torch.zeros_like(q)
    dkv = torch.empty((2, *k.shape), dtype=k.dtype, device="cuda")
    chosen = block_sparse._tiles
    results = []
    for part, tiles in _candidates():
        block_sparse._tiles = lambda block, d, tiles=tiles: tiles
        try:
            if part == "fwd":
                seconds = median_seconds(
                    lambda: block_sparse_forward(q, k, v, lists, scale, out_dtype=q.dtype), reps
                )
            else:
                seconds = median_seconds(
                    lambda: block_sparse_backward(dout, q, k, v, lse, delta, lists, scale, dq, dkv), reps
                )
        except Exception as exc:  # a configuration that does not fit (shared memory, registers)
            seconds = float("nan")
            print(
                f"{part} {tiles[part] if part == 'fwd' else (tiles['dq'], tiles['dkdv'])}: {type(exc).__name__}"
            )
        results.append((part, tiles, seconds))
    block_sparse._tiles = chosen
    for part in ("fwd", "bwd"):
        ranked = sorted((r for r in results if r[0] == part and r[2] == r[2]), key=lambda r: r[2])
        print(f"{part}: best 5 of {sum(r[0] == part for r in results)} (ms)")
        for _, tiles, seconds in ranked[:5]:
            shown = tiles["fwd"] if part == "fwd" else {"dq": tiles["dq"], "dkdv": tiles["dkdv"]}
            print(f"  {seconds * 1e3:7.2f}  {shown}")
        current = block_sparse._tiles(BLOCK, D)
        now = [
            r[2]
            for r in results
            if r[0] == part and all(r[1][key] == current[key] for key in ("fwd", "dq", "dkdv"))
        ]
        print(f"  current config: {now[0] * 1e3 if now else float('nan'):7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=65536)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=None)
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    q, k, v, dout = inputs(args.seq)
    if args.sweep:
        sweep(q, k, v, dout, args.density, args.reps)
    dense = median_seconds(dense_step(q, k, v, dout), args.reps)
    rows = []
    for kind in ("block_topk", "vertical_slash"):
        pattern, budget = calibrated(kind, q, k, BLOCK, args.density, verticals=args.seq // 512)
        ours_run, flex_run = ours_step(q, k, v, dout, pattern), flex_step(q, k, v, dout, pattern)
        agreement = max(rel(a, b) for a, b in zip(ours_run(), flex_run(), strict=True))
        ours, flex = median_seconds(ours_run, args.reps), median_seconds(flex_run, args.reps)
        with torch.no_grad():  # forward alone
            ours_fwd, flex_fwd = median_seconds(ours_run, args.reps), median_seconds(flex_run, args.reps)
        rows.append({
            "pattern": kind, "budget": budget, "density": pattern.density(), "ours_ms": ours * 1e3, "ours_fwd_ms": ours_fwd * 1e3, "flex_fwd_ms": flex_fwd * 1e3,
            "flex_ms": flex * 1e3, "dense_ms": dense * 1e3, "ours_vs_flex": flex / ours,
            "ours_vs_dense": dense / ours, "flex_vs_dense": dense / flex, "ours_flex_rel_diff": agreement,
            "ours_fp32_error": fp32_error(kind, args.density),
        })  # fmt: skip
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "seq": args.seq,
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    print(
        f"{report['device']}, torch {report['torch']}, S={args.seq}, bf16 fwd+bwd, GQA 32/8, D=128, block 128"
    )
    print(f"{'pattern':>15} {'density':>8} {'ours ms':>8} {'flex ms':>8} {'fwd ours':>8} {'fwd flex':>8} "
          f"{'dense ms':>9} {'÷flex':>6} {'ours×dense':>10} {'flex×dense':>10} {'vs flex':>8} {'vs fp32':>8}")  # fmt: skip
    for r in rows:
        print(
            f"{r['pattern']:>15} {r['density']:8.3%} {r['ours_ms']:8.2f} {r['flex_ms']:8.2f} {r['ours_fwd_ms']:8.2f} "
            f"{r['flex_fwd_ms']:8.2f} {r['dense_ms']:9.2f} {r['ours_vs_flex']:6.2f} {r['ours_vs_dense']:10.2f} "
            f"{r['flex_vs_dense']:10.2f} {r['ours_flex_rel_diff']:8.1e} {r['ours_fp32_error']:8.1e}"
        )


if __name__ == "__main__":
    main()
