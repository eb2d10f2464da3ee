"""Block attention on one GPU: ours (``block_attention_forward/backward``) vs torch's flash and cuDNN SDPA ops.

    PYTHONPATH=$PWD python3 benchmarks/attention_kernels.py [--seq 8192 16384 32768 65536] [--out FILE]

bf16, B=1, Hq=32 with Hkv=32 (MHA) and 8 (GQA), D=128, causal and full, S×S on one GPU. The anchors are the raw
ops ``aten._scaled_dot_product_{flash,cudnn}_attention`` and their ``_backward`` (LSE out of the forward fed to
the backward, as autograd does), on K/V already expanded to 32 heads; ours gets the 8-head K/V and expands
inside, returns fp32 out/LSE, and takes the fp32 global out/LSE in backward, with fp32 dq/dk/dv.

FLOPs (FlashAttention convention): forward = 4·B·Hq·Sq·Sk·D, halved for causal; backward = 2.5 × forward, so
forward + backward = 3.5 × forward. TFLOP/s = FLOPs / median time (CUDA events, after warm-up).

Also measured: flash vs cuDNN on smaller square pairs (the ``auto`` rule in ``attention_sdpa``), and ours on
the whole sequence in zigzag all-gather order for 4 ranks (7 runs a side, several kernel calls merged in
fp32; same causal FLOPs) to show what the run decomposition costs.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

import torch
from cuda_timing import median_seconds

from sparsetron.kernels import attention_sdpa
from sparsetron.kernels.attention import (
    block_attention_backward,
    block_attention_forward,
    index_runs,
    plan_block,
)

HQ, D = 32, 128
SCALE = D**-0.5
aten = torch.ops.aten


def fwd_flops(seq_q: int, seq_k: int, causal: bool) -> float:
    return 4 * HQ * seq_q * seq_k * D * (0.5 if causal else 1.0)


def make_inputs(seq: int, hkv: int, seed: int = 0):
    """q, k, v, dout as [B, S, H, D] bf16, random (never zeros: they time faster than real data)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(1, seq, HQ, D), (1, seq, hkv, D), (1, seq, hkv, D), (1, seq, HQ, D)]
    return [torch.randn(s, device="cuda", dtype=torch.bfloat16, generator=g) for s in shapes]


def _bhsd(x_BSHD):
    return x_BSHD.transpose(1, 2)


def flash_steps(q, k, v, dout, causal):
    """(forward, forward+backward) closures of the raw flash ops."""
    qt, kt, vt, dt = map(_bhsd, (q, k, v, dout))
    seq_q, seq_k = qt.shape[2], kt.shape[2]

    def fwd():
        return aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, causal, False, scale=SCALE)

    def fwd_bwd():
        out, lse, cq, ck, _, _, seed, offset, _ = fwd()
        aten._scaled_dot_product_flash_attention_backward(
            dt, qt, kt, vt, out, lse, cq, ck, seq_q, seq_k, 0.0, causal, seed, offset, scale=SCALE
        )

    return fwd, fwd_bwd


def cudnn_steps(q, k, v, dout, causal):
    """(forward, forward+backward) closures of the raw cuDNN ops."""
    qt, kt, vt, dt = map(_bhsd, (q, k, v, dout))
    seq_q, seq_k = qt.shape[2], kt.shape[2]

    def fwd():
        return aten._scaled_dot_product_cudnn_attention(
            qt, kt, vt, None, True, 0.0, causal, False, scale=SCALE
        )

    def fwd_bwd():
        out, lse, cq, ck, _, _, seed, offset, _ = fwd()
        aten._scaled_dot_product_cudnn_attention_backward(
            dt, qt, kt, vt, out, lse, seed, offset, None, cq, ck, seq_q, seq_k, 0.0, causal, scale=SCALE
        )

    return fwd, fwd_bwd


def ours_steps(q, k, v, dout, causal, index_S):
    """(forward, forward+backward) closures of block_attention_forward/backward (indices on the CPU)."""

    def fwd():
        return block_attention_forward(q, k, v, index_S, index_S, scale=SCALE, causal=causal)

    def fwd_bwd():
        out, lse = fwd()
        block_attention_backward(dout, q, k, v, out, lse, index_S, index_S, scale=SCALE, causal=causal)

    return fwd, fwd_bwd


def expand(x_BSHD):
    return x_BSHD.repeat_interleave(HQ // x_BSHD.shape[2], dim=2)


def measure(steps, flops: float, reps: int) -> dict:
    """TFLOP/s of forward and forward+backward; an error is reported as such, the run goes on."""
    fwd, fwd_bwd = steps
    try:
        t_fwd = median_seconds(fwd, reps)
        t_all = median_seconds(fwd_bwd, reps)
    except RuntimeError as err:  # e.g. a kernel that rejects a shape: say so in the table, keep measuring
        traceback.print_exc(file=sys.stderr)
        return {"error": str(err).splitlines()[0][:120]}
    return {"fwd_ms": t_fwd * 1e3, "fwd_bwd_ms": t_all * 1e3, "fwd_tflops": flops / t_fwd / 1e12,
            "fwd_bwd_tflops": 3.5 * flops / t_all / 1e12}  # fmt: skip


def reps_for(seq: int) -> int:
    return 5 if seq >= 16384 else 10


def bench_main(seqs, results):
    for hkv in (32, 8):
        for seq in seqs:
            q, k, v, dout = make_inputs(seq, hkv)
            k_wide, v_wide = expand(k), expand(v)
            index_S = torch.arange(seq)
            for causal in (True, False):
                flops = fwd_flops(seq, seq, causal)
                row = {"hkv": hkv, "seq": seq, "causal": causal,
                       "auto_picks": attention_sdpa.pick(attention_sdpa.runnable(q), seq, seq)}  # fmt: skip
                row["flash"] = measure(flash_steps(q, k_wide, v_wide, dout, causal), flops, reps_for(seq))
                row["cudnn"] = measure(cudnn_steps(q, k_wide, v_wide, dout, causal), flops, reps_for(seq))
                row["ours"] = measure(ours_steps(q, k, v, dout, causal, index_S), flops, reps_for(seq))
                results["main"].append(row)
                print(json.dumps(row), flush=True)
            del q, k, v, dout, k_wide, v_wide
            torch.cuda.empty_cache()


def bench_rule(results):
    """Flash vs cuDNN fwd+bwd on smaller square pairs, where per-call overheads start to matter."""
    for seq in (512, 1024, 2048, 4096):
        q, k, v, dout = make_inputs(seq, HQ)
        for causal in (True, False):
            flops = fwd_flops(seq, seq, causal)
            row = {"seq": seq, "causal": causal}
            row["flash"] = measure(flash_steps(q, k, v, dout, causal), flops, 20)
            row["cudnn"] = measure(cudnn_steps(q, k, v, dout, causal), flops, 20)
            results["rule"].append(row)
            print(json.dumps(row), flush=True)


def zigzag_order(seq: int, world: int = 4) -> torch.Tensor:
    """All of a zigzag-sharded sequence in rank order: chunks [0, 7, 1, 6, 2, 5, 3, 4] for 4 ranks."""
    chunk = seq // (2 * world)
    chunks = [c for r in range(world) for c in (r, 2 * world - 1 - r)]
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in chunks])


def bench_zigzag(seq: int, results):
    q, k, v, dout = make_inputs(seq, 8)
    index_S = zigzag_order(seq)
    pairs = sum(len(r.parts) for r in plan_block(index_S, index_S, causal=True, window=None, has_docs=False))
    runs = len(index_runs(index_S))
    row = {
        "seq": seq,
        "hkv": 8,
        "causal": True,
        "layout": f"zigzag order, {runs} runs",
        "pairs_computed": pairs,
    }
    row["ours"] = measure(ours_steps(q, k, v, dout, True, index_S), fwd_flops(seq, seq, True), reps_for(seq))
    results["zigzag"].append(row)
    print(json.dumps(row), flush=True)


def fmt(cell: dict, key: str) -> str:
    return f"{cell[key]:.0f}" if key in cell else "err"


def print_tables(results):
    print(
        f"\n{results['device']} | torch {results['torch']} | cuDNN {results['cudnn_version']} | bf16 B=1 Hq=32 D=128"
    )
    print(
        "TFLOP/s; FLOPs: fwd = 4·B·Hq·S²·D (×½ causal), fwd+bwd = 3.5 × fwd. GQA anchors run on expanded K/V."
    )
    print("\nauto rule: square pairs, fwd+bwd ms (flash | cuDNN)")
    for row in results["rule"]:
        f, c = row["flash"], row["cudnn"]
        mask = "causal" if row["causal"] else "full"
        print(
            f"  S={row['seq']:>5} {mask:<6} {f.get('fwd_bwd_ms', float('nan')):8.3f} | {c.get('fwd_bwd_ms', float('nan')):8.3f}"
        )
    for row in results["zigzag"]:
        o = row["ours"]
        print(f"\nours, {row['layout']} ({row['pairs_computed']} kernel pairs), S={row['seq']} GQA causal: "
              f"fwd {fmt(o, 'fwd_tflops')}, fwd+bwd {fmt(o, 'fwd_bwd_tflops')} TFLOP/s")  # fmt: skip
    print(
        "\n| heads | S | mask | auto | flash fwd | cuDNN fwd | ours fwd | flash f+b | cuDNN f+b | ours f+b | ours/best f+b |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in results["main"]:
        f, c, o = row["flash"], row["cudnn"], row["ours"]
        best = max(x.get("fwd_bwd_tflops", 0.0) for x in (f, c))
        ratio = f"{o['fwd_bwd_tflops'] / best:.2f}" if "fwd_bwd_tflops" in o and best else "-"
        heads = "32/32" if row["hkv"] == 32 else f"32/{row['hkv']}"
        mask = "causal" if row["causal"] else "full"
        cells = [fmt(x, "fwd_tflops") for x in (f, c, o)] + [fmt(x, "fwd_bwd_tflops") for x in (f, c, o)]
        print(
            f"| {heads} | {row['seq'] // 1024}K | {mask} | {row['auto_picks']} | {' | '.join(cells)} | {ratio} |"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--out", help="write every number as JSON here")
    args = parser.parse_args()
    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn_version": torch.backends.cudnn.version(),
        "main": [],
        "rule": [],
        "zigzag": [],
    }
    bench_rule(results)
    bench_zigzag(32768, results)
    bench_main(args.seq, results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print_tables(results)


if __name__ == "__main__":
    main()
