"""MoE layer speed on GPUs: grouped experts and the whole layer vs a dense GEMM of the same FLOPs; EP=2 traffic.

    python3 benchmarks/moe_layer.py [--tokens 16384] [--layers qwen3 deepseek mixtral]
    torchrun --standalone --nproc-per-node 2 benchmarks/moe_layer.py --ep [--tokens 16384]

bf16, forward + backward. Routing is skewed the way trained routers are (a Zipf-like preference over experts
through a constant feature plus token-dependent noise), not forced balance; the table reports the measured
max/mean expert load. FLOPs count what the layer must compute: experts 3 GEMMs × 2·M·d·f forward, 3× that
for forward + backward (M = kept token copies), plus router and shared expert. The anchor is a dense GEMM
chain of the same shapes (x@W_gate, x@W_up, h@W_down with all M rows, forward + backward) timed in the same
run: expert ratio = expert TFLOP/s ÷ dense TFLOP/s; layer ratio = layer TFLOP/s ÷ dense TFLOP/s.

With ``--ep`` (2 GPUs, NCCL): the layer with experts split over both GPUs; the all-to-all bandwidth of the
dispatch (off-rank bytes ÷ time of the same all-to-all alone) against NCCL's equal-split all-to-all of
256 MiB; and the exposed share of EP communication, from a profiler trace: the time NCCL kernels run while
no compute kernel does, over the layer time.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from cuda_timing import median_seconds

from sparsetron.kernels.grouped_gemm import grouped_swiglu
from sparsetron.parallel.expert import MoE

# name: (dim, ffn, experts, top_k, shared ffn, router, router options, skew α)
LAYERS = {
    "qwen3": (2048, 768, 128, 8, 0, "softmax_topk", {}, 0.1),
    # DeepSeek-V3 at half width (d 7168 -> 3584, f 2048 -> 1024), 256 experts, top-8 of 4 node groups out of 8.
    "deepseek": (3584, 1024, 256, 8, 1024, "sigmoid_bias", {"n_groups": 8, "topk_groups": 4}, 0.1),
    "mixtral": (4096, 14336, 8, 2, 0, "softmax_topk", {}, 0.4),
}


def make_moe(spec: tuple, device: str | torch.device, dtype: torch.dtype) -> MoE:
    """The MoE layer of a :data:`LAYERS`-style ``spec`` on ``device``: seed 0 (the same on every rank),
    weights in ``dtype`` (buffers such as the fp32 expert bias keep theirs), router skewed; not sharded."""
    dim, ffn, experts, top_k, shared, router, options, skew = spec
    torch.manual_seed(0)
    with torch.device(device):
        moe = MoE(
            dim,
            ffn,
            experts,
            top_k,
            router=router,
            shared_ffn_dim=shared,
            shared_gate=False,
            aux_loss="switch",
            router_options=options,
        )
    for param in moe.parameters():
        param.data = param.data.to(dtype)
    skew_router(moe, skew)
    return moe


def build_layer(name: str, ep_mesh=None, chunks: int = 1) -> MoE:
    moe = make_moe(LAYERS[name], "cuda", torch.bfloat16)
    if ep_mesh is not None:
        moe.enable_expert_parallel(ep_mesh, overlap_chunks=chunks)
    return moe


@torch.no_grad()
def skew_router(moe: MoE, alpha: float) -> None:
    """Zipf-like expert preference on feature 0 (tokens set it to 1): expert rank r gets logit −α·ln(r+1).

    α is chosen per layer so the measured max/mean load is about 2 (fine-grained) or 1.6 (Mixtral), what
    trained routers show per batch.
    """
    experts = moe.num_experts
    preference_E = -alpha * torch.log(
        torch.randperm(experts, generator=torch.Generator().manual_seed(1)) + 1.0
    )
    weight = moe.router.weight
    weight.normal_(0.0, 0.02)
    weight[:, 0] = preference_E.to(weight.device, weight.dtype)


def make_tokens(tokens: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(1, tokens, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    x[..., 0] = 1.0
    return x


def layer_flops(moe: MoE, kept_rows: int, tokens: int) -> float:
    dim, ffn = moe.experts.w_down.shape[2:0:-1]
    flops = 3 * 3 * 2 * kept_rows * dim * ffn + 3 * 2 * tokens * dim * moe.num_experts
    if moe.shared_expert is not None:
        flops += 3 * 3 * 2 * tokens * dim * moe.shared_expert.gate_proj.out_features
    return flops


def dense_gemms(rows: int, dim: int, ffn: int):
    """The anchor: the 9 plain GEMMs of an FFN's forward + backward at the experts' shapes, all rows dense.

    Forward x@W_g, x@W_u, h@W_d; backward dh = dy@W_dᵀ, dW_d = hᵀ@dy, dx = dg@W_gᵀ + du@W_uᵀ (two GEMMs),
    dW_g = xᵀ@dg, dW_u = xᵀ@du. Same FLOPs as the experts' 18·M·d·f, no elementwise work, no grouping.
    """
    g = torch.Generator(device="cuda").manual_seed(2)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)

    x, dy, h, dg, du = rand(rows, dim), rand(rows, dim), rand(rows, ffn), rand(rows, ffn), rand(rows, ffn)
    w_g, w_u, w_d = rand(dim, ffn), rand(dim, ffn), rand(ffn, dim)

    def run():
        torch.mm(x, w_g), torch.mm(x, w_u), torch.mm(h, w_d)
        torch.mm(dy, w_d.T), torch.mm(h.T, dy)
        torch.mm(dg, w_g.T), torch.mm(du, w_u.T), torch.mm(x.T, dg), torch.mm(x.T, du)

    return run


def single_gpu(name: str, tokens: int, reps: int) -> dict:
    moe = build_layer(name)
    dim, ffn = moe.experts.w_down.shape[2:0:-1]
    x = make_tokens(tokens, dim, seed=3)
    with torch.no_grad():
        _, stats = moe(x)
    load_E = stats.tokens_per_expert_E
    kept = int(load_E.sum())
    skew = float(load_E.max() / load_E.mean())

    # Experts alone on the dispatched rows (what the grouped GEMM sees after permutation).
    route = moe.router(x.view(tokens, dim))
    order = torch.argsort(route.expert_N, stable=True)
    rows = x.view(tokens, dim)[route.token_N[order]].detach().requires_grad_()
    counts = torch.bincount(route.expert_N, minlength=moe.num_experts)
    dy = torch.randn_like(rows)
    w = [p.detach().requires_grad_() for p in (moe.experts.w_gate_up, moe.experts.w_down)]
    out = {"layer": name, "tokens": tokens, "kept_rows": kept, "load_max_over_mean": skew}
    expert_flops = 3 * 3 * 2 * kept * dim * ffn
    for backend in ("torch", "triton"):

        def experts_step(backend=backend):
            for leaf in (rows, *w):
                leaf.grad = None  # as after optimizer.zero_grad(set_to_none=True): no accumulation pass
            grouped_swiglu(rows, *w, counts, backend=backend).backward(dy)

        try:
            out[f"experts_{backend}_tflops"] = (
                expert_flops / median_seconds(experts_step, reps, warmup=3) / 1e12
            )
        except (ValueError, RuntimeError) as error:
            out[f"experts_{backend}_error"] = str(error)[:200]
    out["dense_tflops"] = expert_flops / median_seconds(dense_gemms(kept, dim, ffn), reps, warmup=3) / 1e12

    x_grad = x.detach().requires_grad_()
    dy_layer = torch.randn_like(x)

    def layer_step():
        moe.zero_grad(set_to_none=True)
        x_grad.grad = None
        y, s = moe(x_grad)
        torch.autograd.backward([y, s.aux_loss], [dy_layer, torch.ones_like(s.aux_loss)])

    out["layer_tflops"] = layer_flops(moe, kept, tokens) / median_seconds(layer_step, reps, warmup=3) / 1e12
    out["expert_ratio"] = (
        max(out.get("experts_torch_tflops", 0), out.get("experts_triton_tflops", 0)) / out["dense_tflops"]
    )
    out["layer_ratio"] = out["layer_tflops"] / out["dense_tflops"]
    return out


def nccl_all_to_all_busbw(group, nbytes: int = 256 << 20) -> float:
    """NCCL equal-split all-to-all bus bandwidth (GB/s, nccl-tests convention: algbw · (n−1)/n)."""
    world = dist.get_world_size(group)
    x = torch.empty(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    seconds = median_seconds(lambda: dist.all_to_all_single(y, x, group=group), 10, barrier=True, warmup=3)
    return nbytes / seconds * (world - 1) / world / 1e9


def exposed_comm_share(step, reps: int = 3) -> tuple[float, float]:
    """(exposed NCCL seconds, layer seconds) per step from a profiler trace of ``reps`` steps."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    kernels = [
        e for e in prof.events() if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start
    ]
    nccl = [(e.time_range.start, e.time_range.end) for e in kernels if "nccl" in e.name.lower()]
    compute = [(e.time_range.start, e.time_range.end) for e in kernels if "nccl" not in e.name.lower()]
    start = min(s for s, _ in nccl + compute)
    end = max(e for _, e in nccl + compute)
    exposed = _measure(_subtract(_union(nccl), _union(compute)))
    return exposed / 1e6 / reps, (end - start) / 1e6 / reps


def _union(intervals):
    merged = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return merged


def _subtract(a, b):
    out, j = [], 0
    for s, e in a:
        cur = s
        while j < len(b) and b[j][1] <= cur:
            j += 1
        k = j
        while k < len(b) and b[k][0] < e:
            if b[k][0] > cur:
                out.append((cur, b[k][0]))
            cur = max(cur, b[k][1])
            k += 1
        if cur < e:
            out.append((cur, e))
    return out


def _measure(intervals) -> float:
    return sum(e - s for s, e in intervals)


def dispatch_bandwidth(moe: MoE, x: torch.Tensor, group, reps: int) -> float:
    """GB/s of the dispatch all-to-all alone, with this routing's split sizes: the busiest rank's off-rank
    bytes (the larger direction; links are full duplex) over the slowest rank's median time."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    tokens, dim = x.shape[1], x.shape[2]
    with torch.no_grad():
        route = moe.router(x.view(tokens, dim))
        send = torch.bincount(route.expert_N, minlength=moe.num_experts).view(world, -1).sum(dim=1)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)
    send_splits, recv_splits = send.tolist(), recv.tolist()
    payload = x.detach().view(tokens, dim)[route.token_N]
    received = payload.new_empty(sum(recv_splits), dim)
    seconds = median_seconds(
        lambda: dist.all_to_all_single(received, payload, recv_splits, send_splits, group=group),
        reps,
        barrier=True,
        warmup=3,
    )
    off_rank = max(sum(send_splits) - send_splits[rank], sum(recv_splits) - recv_splits[rank])
    worst = torch.tensor([off_rank * dim * x.element_size(), seconds], dtype=torch.float64, device=x.device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    return float(worst[0] / worst[1]) / 1e9


def expert_parallel(name: str, tokens: int, reps: int, mesh, chunks: int) -> dict:
    group = mesh.get_group()
    rank = dist.get_rank()
    moe = build_layer(name, ep_mesh=mesh, chunks=chunks)
    dim = moe.experts.w_down.shape[2]
    x = make_tokens(tokens, dim, seed=10 + rank).requires_grad_()
    dy = torch.randn_like(x)

    def step():
        moe.zero_grad(set_to_none=True)
        x.grad = None
        y, s = moe(x)
        torch.autograd.backward([y, s.aux_loss], [dy, torch.ones_like(s.aux_loss)])

    layer_s = median_seconds(step, reps, barrier=True, warmup=3)
    with torch.no_grad():
        _, stats = moe(x)
    kept = stats.tokens_per_expert_E.clone()
    dist.all_reduce(kept, group=group)
    skew = float(kept.max() / kept.mean())
    busbw = dispatch_bandwidth(moe, x, group, reps)
    exposed_s, traced_s = exposed_comm_share(step)
    # NCCL kernels on the less-loaded rank also spin while the busier rank still computes (load imbalance,
    # not transfer); the busier rank's exposed share is the communication the layer really waits for.
    local_rows = kept.view(2, -1).sum(1)
    shares = [torch.zeros(1, device="cuda") for _ in range(2)]
    dist.all_gather(shares, torch.tensor([exposed_s / traced_s], device="cuda"), group=group)
    busier = int(local_rows.argmax())
    return {
        "layer": name,
        "chunks": chunks,
        "tokens_per_gpu": tokens,
        "load_max_over_mean": skew,
        "rank_load_max_over_mean": float(local_rows.max() / local_rows.float().mean()),
        "layer_ms": layer_s * 1e3,
        "layer_tflops_per_gpu": layer_flops(moe, int(kept.sum()) // 2, tokens) / layer_s / 1e12,
        "a2a_busbw_gbs": busbw,
        "exposed_comm_busier_rank": float(shares[busier]),
        "exposed_comm_other_rank": float(shares[1 - busier]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--ep", action="store_true", help="expert parallelism over the torchrun ranks")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2], help="EP overlap chunks to compare")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    results = []
    if args.ep:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl")
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cuda", (dist.get_world_size(),), mesh_dim_names=("ep",))["ep"]
        nccl = nccl_all_to_all_busbw(mesh.get_group())
        for name in args.layers:
            for chunks in args.chunks:
                row = expert_parallel(name, args.tokens, args.reps, mesh, chunks)
                row["nccl_a2a_busbw_gbs"] = nccl
                row["a2a_vs_nccl"] = row["a2a_busbw_gbs"] / nccl
                results.append(row)
                torch.cuda.empty_cache()
    else:
        for name in args.layers:
            results.append(single_gpu(name, args.tokens, args.reps))
            torch.cuda.empty_cache()
    if not dist.is_initialized() or dist.get_rank() == 0:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
        for row in results:
            print(" | ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
