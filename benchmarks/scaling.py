"""Scaling on W GPUs of one host: dense and sparse context parallelism, expert parallelism, the whole model.

    torchrun --standalone --nproc-per-node 8 benchmarks/scaling.py [--parts dense sparse ep e2e] [--out FILE]
    torchrun --standalone --nproc-per-node 4 benchmarks/scaling.py --out scaling-4.json
    torchrun --standalone --nproc-per-node 2 benchmarks/scaling.py --out scaling-2.json
    python -m torch.distributed.run --standalone --nproc-per-node 8 benchmarks/scaling.py --cpu

GPU runs use NCCL and bf16; every part prints one markdown table on rank 0 at the end and ``--out`` writes
every number as JSON. Times are rank 0's median over ``--reps`` repetitions (all ranks line up at a barrier
before each; rings and all-to-alls keep them in step, so rank 0 finishes with the slowest).

**dense** (``--tokens-per-gpu``, default 8K and 32K): causal attention, B=1, Hq=32 over Hkv=8 (GQA), D=128,
forward + backward, on the zigzag layout of S = W × tokens per GPU, for our ring, Ulysses and every hybrid a×b
(a ring ranks × b Ulysses ranks, a, b ≥ 2: 2×2 at W=4, 2×4 and 4×2 at W=8, none at W=2). ``TFLOP/s/GPU`` =
FLOPs / W / time, FLOPs = 3.5 × 4·Hq·S²·D / 2 (``context_parallel.fwd_bwd_flops``). ``efficiency`` =
single-GPU time of the whole S-token problem (rank 0, cuDNN SDPA: the kernel our blocks use from 1K tokens up)
÷ (W × CP time); targets ≥ 93% at 8K per GPU and ≥ 96% at 32K. ``× torch CP`` = PyTorch's ``context_parallel``
ring time on the same sequence in the same run ÷ ours.

**sparse** (``--sparse-seq``, default 1M tokens; ``--density``, default 0.05): block top-k and vertical-slash
patterns estimated from the inputs under CP (``sparse_inputs.calibrated``), 128-token blocks, striped layout;
the flat sparse ring (``sparse_cp.measure_sparse``) and the hierarchical one with 2 groups of W/2 ranks (inner
rings inside a group, the outer ring across the two; at W=2 the outer ring alone). ``× dense`` = our dense
zigzag ring on the same sequence ÷ sparse total (estimation + planning + attention); ``imbalance`` = worst
step's max/mean work over ranks (target ≤ 1.10); ``sent/ref`` = forward K/V bytes sent ÷ bytes of the blocks
other ranks' queries reference (1.0 for the flat ring; the hierarchical ring relays blocks inside a group, so
more); ``cross/flat`` = bytes crossing between the two groups ÷ what the flat ring sends across them;
``est+plan`` = pattern estimation and planning time ÷ attention time.

**ep** (``--layers``, default the Qwen3- and DeepSeek-like layers of ``moe_layer.py``, skewed routing,
``--ep-tokens`` per GPU): EP = W, forward + backward. ``a2a GB/s`` = the dispatch all-to-all with this
routing's split sizes, timed alone: the busiest rank's off-rank bytes (larger direction; links are full
duplex) ÷ the slowest rank's time; ``NCCL`` = NCCL's equal-split all-to-all of 256 MiB (same bus-bandwidth
convention); ``exposed`` = NCCL kernel time during which no compute kernel runs ÷ layer time, on the busiest
EP rank (profiler trace). ``rank load`` = max/mean of the token copies each EP rank's experts receive; per
balancer after ``--balance-steps`` forward passes on fresh batches (each followed by the router's balance
update from the all-reduced load; ``aux_loss`` also takes an Adam step on the switch loss), measured on a
held-out batch.

**e2e**: the reference decoder (``sparsetron.model.Transformer``, ``--e2e-preset`` shape with ``--e2e-layers``
layers, byte vocabulary of the passkey task) trained in-process by ``sparsetron.train.trainer.train`` with
cp = ep = W folded over the W GPUs (ring attention, zigzag), S = W × ``--e2e-tokens-per-gpu``; ``tokens/s``
and ``MFU`` are medians from the run's metrics.jsonl after the first two steps. The run directory (with the
trainer's final checkpoint, ~15 GB for the default 2 layers) lives under $TMPDIR and is removed afterwards.

``--cpu`` (gloo, float32, tiny sizes) runs each part once and checks it against a single-process reference
instead of timing it: dense outputs and gradients vs causal SDPA (fp64), flat and hierarchical sparse rings vs
the tests' masked attention (``tests/sparse_reference.py``), every balancer's EP layer vs the same layer
unsharded, and the end-to-end run's losses vs the same model and batches trained without context or expert
parallelism (FSDP over dp_shard = W). A mismatch above 1e-4 (relative) raises; each passing check prints an
"ok" row.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from context_parallel import HQ, D, fwd_bwd_flops, make_inputs, ours_step, single_gpu_step, torch_cp_time
from cuda_timing import median_seconds
from moe_layer import (
    LAYERS,
    build_layer,
    dispatch_bandwidth,
    exposed_comm_share,
    layer_flops,
    make_moe,
    make_tokens,
    nccl_all_to_all_busbw,
)
from sparse_cp import BLOCK, HKV, KINDS, measure_sparse, sparse_step
from sparse_inputs import calibrated, estimate
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.attention import SDPBackend

from sparsetron.config import ConfigError, load_config
from sparsetron.dist.errors import LayoutError
from sparsetron.dist.layout import ParallelDims
from sparsetron.dist.preflight import check_job
from sparsetron.parallel.context import context_attention, shard_sequence
from sparsetron.parallel.context.sparse_hier import (
    HierarchicalRingStats,
    hierarchical_sparse_ring_attention,
    hierarchy_groups,
)
from sparsetron.parallel.context.sparse_plan import StripedPlan, plan_striped
from sparsetron.parallel.context.ulysses import check_ulysses_heads
from sparsetron.parallel.expert import MoE
from sparsetron.train.trainer import train

PARTS = ("dense", "sparse", "ep", "e2e")
TOLERANCE = 1e-4
#: Dense efficiency targets by tokens per GPU (issue 11).
EFFICIENCY_TARGETS = {8192: 0.93, 32768: 0.96}
IMBALANCE_TARGET = 1.10
#: Steps of an e2e run left out of its medians (start-up, allocator and kernel-choice warm-up).
E2E_WARMUP_STEPS = 2


@dataclass(frozen=True)
class Shape:
    """Attention sizes of a run: query heads, KV heads, head dim, sparse block (tokens), dtype, device."""

    hq: int
    hkv: int
    d: int
    block: int
    dtype: torch.dtype
    device: str


#: The GPU benchmark's sizes are the helpers' own (context_parallel.HQ/D, sparse_cp.HKV/BLOCK).
GPU_SHAPE = Shape(HQ, HKV, D, BLOCK, torch.bfloat16, "cuda")
#: CPU checks: 8 query heads so that Ulysses splits them over 8 ranks; GQA kept (2 KV heads).
CPU_SHAPE = Shape(8, 2, 16, 8, torch.float32, "cpu")

#: Per-mode defaults of the size options (None on the command line means "this mode's default").
DEFAULTS = {
    "gpu": {
        "tokens_per_gpu": [8192, 32768],
        "sparse_seq": 1 << 20,
        "ep_tokens": 16384,
        "balance_steps": 200,
        "e2e_tokens_per_gpu": 16384,
        "e2e_steps": 6,
    },
    "cpu": {
        "tokens_per_gpu": [64],
        "sparse_seq": 512,
        "ep_tokens": 32,
        "balance_steps": 2,
        "e2e_tokens_per_gpu": 32,
        "e2e_steps": 3,
    },
}

#: Balancers of the MoE router: name -> (router, options added to the layer's, trained on the switch loss).
BALANCERS = {
    "none": ("softmax_topk", {}, False),
    "aux_loss": ("softmax_topk", {}, True),
    "aux_free_bias": ("sigmoid_bias", {}, False),
    "sinkhorn": ("sinkhorn", {}, False),
    "quantile": ("quantile", {}, False),
    "expert_choice": ("expert_choice", {"capacity_factor": 1.0}, False),
}


# -- arguments ------------------------------------------------------------------------------------------


def parse_args(world: int, rank: int) -> argparse.Namespace:
    """Command-line options, mode defaults filled in and checked against the launch's ``world`` ranks."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--cpu", action="store_true", help="gloo, float32, tiny sizes: check, do not time")
    parser.add_argument("--out", help="write every result as JSON here (rank 0)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per measurement")
    parser.add_argument("--tokens-per-gpu", type=int, nargs="+", help="dense: default 8192 32768 (CPU 64)")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=("ring", "ulysses", "hybrid"),
        default=["ring", "ulysses", "hybrid"],
        help="dense methods (hybrid: every a×b)",
    )
    parser.add_argument("--sparse-seq", type=int, help="sparse: total tokens, default 1048576 (CPU 512)")
    parser.add_argument("--density", type=float, default=0.05, help="sparse: target block density")
    parser.add_argument("--patterns", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--layers", nargs="+", choices=list(LAYERS), default=["qwen3", "deepseek"])
    parser.add_argument("--ep-tokens", type=int, help="ep: tokens per GPU, default 16384 (CPU 32)")
    parser.add_argument("--balancers", nargs="+", choices=list(BALANCERS), default=list(BALANCERS))
    parser.add_argument(
        "--balance-steps", type=int, help="ep: forward passes per balancer, default 200 (CPU 2)"
    )
    parser.add_argument("--balance-lr", type=float, default=1e-2, help="ep: Adam lr of the aux-loss router")
    parser.add_argument("--e2e-preset", default="qwen3-30b-a3b", help="e2e: model preset (configs/model/)")
    parser.add_argument("--e2e-layers", type=int, default=2, help="e2e: decoder layers of the preset")
    parser.add_argument("--e2e-tokens-per-gpu", type=int, help="e2e: default 16384 (CPU 32)")
    parser.add_argument("--e2e-steps", type=int, help="e2e: optimizer steps, default 6 (CPU 3)")
    args = parser.parse_args()
    for key, value in DEFAULTS["cpu" if args.cpu else "gpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    problem = first_problem(args, world)
    if problem:
        if rank:  # one message, from rank 0, instead of W copies
            sys.exit(2)
        parser.error(problem)
    return args


def first_problem(args: argparse.Namespace, world: int) -> str | None:
    """The first option that cannot run on ``world`` ranks, as a message naming the value and the fix."""
    if world == 0:
        return (
            "WORLD_SIZE is not set: run under torchrun --standalone --nproc-per-node W benchmarks/scaling.py"
        )
    if world < 2:
        return f"W={world}: nothing to scale; launch with torchrun --nproc-per-node 2, 4 or 8"
    if args.reps < 1:
        return f"--reps {args.reps} must be at least 1"
    checks = {"dense": dense_problem, "sparse": sparse_problem, "ep": ep_problem, "e2e": e2e_problem}
    for part in args.parts:
        problem = checks[part](args, world)
        if problem:
            return problem
    return None


def dense_problem(args: argparse.Namespace, world: int) -> str | None:
    """Why the dense part cannot run (zigzag chunks, Ulysses head splits), or None."""
    for tokens in args.tokens_per_gpu:
        if tokens < 2 or tokens % 2:
            return (
                f"--tokens-per-gpu {tokens}: the zigzag layout cuts S = W × tokens into 2W chunks, so tokens "
                "per GPU must be a positive even number (e.g. 8192)"
            )
    shape = CPU_SHAPE if args.cpu else GPU_SHAPE
    for method in dense_methods(world, args.methods):
        if method.ulysses == 1:
            continue
        try:
            check_ulysses_heads(shape.hq, shape.hkv, method.ulysses)
        except ValueError as exc:
            others = " ".join(m for m in ("ring", "ulysses", "hybrid") if m != method.method)
            return f"dense {method.label} at W={world}: {exc}; or leave it out with --methods {others}"
    return None


def sparse_problem(args: argparse.Namespace, world: int) -> str | None:
    """Why the sparse part cannot run (two equal groups, whole striped blocks, density), or None."""
    block = (CPU_SHAPE if args.cpu else GPU_SHAPE).block
    if world % 2:
        return (
            f"W={world}: the hierarchical sparse ring runs 2 groups of W/2 ranks; launch an even number of "
            "ranks (2, 4, 8) or leave sparse out (--parts dense ep e2e)"
        )
    stripe = world * block
    if args.sparse_seq < 512 or args.sparse_seq % stripe:
        fits = -(-max(args.sparse_seq, 512) // stripe) * stripe
        return (
            f"--sparse-seq {args.sparse_seq}: the striped layout needs whole {block}-token blocks on each of "
            f"W={world} ranks and vertical-slash keeps S/512 key columns, so use a multiple of {stripe} of "
            f"at least 512, e.g. --sparse-seq {fits}"
        )
    if not 0 < args.density < 1:
        return f"--density {args.density}: a block density lies strictly between 0 and 1 (e.g. 0.05)"
    return None


def ep_problem(args: argparse.Namespace, world: int) -> str | None:
    """Why the ep part cannot run (whole experts per rank, tokens, steps), or None."""
    for name in args.layers:
        experts = layer_spec(name, args.cpu)[2]
        if experts % world:
            return (
                f"ep: EP = W = {world} must divide the {experts} experts of the {name} layer; launch with "
                f"--nproc-per-node dividing {experts} or leave {name} out (--layers)"
            )
    if args.ep_tokens < 1 or args.balance_steps < 1:
        return f"--ep-tokens {args.ep_tokens} and --balance-steps {args.balance_steps} must be at least 1"
    return None


def e2e_problem(args: argparse.Namespace, world: int) -> str | None:
    """Why the e2e run cannot start (the trainer's own preflight on its config), or None."""
    if args.e2e_layers < 1:
        return f"--e2e-layers {args.e2e_layers}: the model needs at least one decoder layer (default 2)"
    fewest = 1 if args.cpu else E2E_WARMUP_STEPS + 1
    if args.e2e_steps < fewest:
        return (
            f"--e2e-steps {args.e2e_steps}: run at least {fewest} (GPU medians leave out the first "
            f"{E2E_WARMUP_STEPS} steps as warm-up)"
        )
    try:
        check_job(e2e_config(args, world, "unused"), world)
    except (ConfigError, LayoutError) as exc:
        return f"e2e (cp = ep = W = {world}, S = {world * args.e2e_tokens_per_gpu}): {exc}"
    return None


# -- shared helpers -------------------------------------------------------------------------------------


def attention_inputs(seq: int, shape: Shape, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q ``[1, S, Hq, D]``, k, v ``[1, S, Hkv, D]`` and dout ``[1, S, Hq, D]``, identical on every rank.

    GPU: ``context_parallel.make_inputs`` (bf16); CPU: fp32 from a seeded CPU generator.
    """
    if shape.device == "cuda":
        return make_inputs(seq, shape.hkv, seed=seed)
    g = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(1, seq, h, shape.d, generator=g) for h in (shape.hq, shape.hkv, shape.hkv, shape.hq)
    )


def shards_of(tensors, layout: str, block: int = 1) -> list[torch.Tensor]:
    """This rank's shard (sequence dim 1) of each tensor over the whole world in ``layout``."""
    return [shard_sequence(t, 1, dist.group.WORLD, layout, block) for t in tensors]


def subgroup(rank_lists: list[list[int]]):
    """This rank's group among ``rank_lists``; collective over the world (every rank creates every group)."""
    mine, _ = dist.new_subgroups_by_enumeration(rank_lists)
    return mine


def max_rel_error(got, want) -> float:
    """Worst ``max|a − b| / max|b|`` over pairs of tensors, b in fp64."""
    return max(
        float((a.detach().double() - b.detach().double()).abs().max() / b.detach().double().abs().max())
        for a, b in zip(got, want, strict=True)
    )


def checked(part: str, case: str, got, want) -> dict:
    """An "ok" row once every rank's ``got`` matches ``want`` within :data:`TOLERANCE`; raises otherwise.

    The error is all-reduced (max) over the world (gloo, CPU tensor), so every rank raises together.
    """
    error = torch.tensor([max_rel_error(got, want)], dtype=torch.float64)
    dist.all_reduce(error, op=dist.ReduceOp.MAX)
    if not error.item() <= TOLERANCE:
        raise AssertionError(f"{part} {case}: max relative error {error.item():.3e} > {TOLERANCE:g}")
    return {"part": part, "case": case, "max_rel_error": error.item(), "result": "ok"}


def free_memory() -> None:
    """Return cached device memory between measurements (no-op on the CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# -- dense context parallelism --------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """A dense CP method: its label, ``context_attention``'s method, the Ulysses degree (1 = pure ring)."""

    label: str
    method: str
    ulysses: int


def dense_methods(world: int, chosen) -> list[Method]:
    """Ring, Ulysses over all W, and hybrid a×b (a ring ranks × b Ulysses ranks) for every a, b ≥ 2."""
    methods = []
    if "ring" in chosen:
        methods.append(Method("ring", "ring", 1))
    if "ulysses" in chosen:
        methods.append(Method("ulysses", "ulysses", world))
    if "hybrid" in chosen:
        for b in range(world // 2, 1, -1):
            if world % b == 0 and world // b >= 2:
                methods.append(Method(f"hybrid {world // b}×{b}", "hybrid", b))
    return methods


def method_group(method: Method, world: int):
    """The group ``context_attention`` takes for ``method``: the world, or for hybrid the pair (ring group,
    Ulysses group) of ``ParallelDims``' rank order (Ulysses innermost); collective over the world."""
    if method.method != "hybrid":
        return dist.group.WORLD
    dims = ParallelDims(world, dp_shard=1, cp=world, cp_ulysses=method.ulysses)
    return subgroup(dims.groups_of("cp_ring")), subgroup(dims.groups_of("cp_ulysses"))


def cp_step(shards, group, method: Method):
    """Forward + backward of ``method`` on zigzag shards ``(q, k, v, dout)``; returns a closure giving this
    rank's ``(out, dq, dk, dv)``. The ring is ``context_parallel.ours_step``; communicates over ``group``."""
    if method.method == "ring":
        return ours_step(*shards, group)
    q, k, v, dout = shards

    def run():
        ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
        out = context_attention(ql, kl, vl, group=group, layout="zigzag", method=method.method)
        out.backward(dout)
        return out, ql.grad, kl.grad, vl.grad

    return run


def single_gpu_seconds(full, reps: int) -> tuple[float, str]:
    """Rank 0's time of SDPA fwd+bwd on the whole sequence and the kernel that ran: cuDNN (what our ring's
    full and causal blocks run from 1K tokens up), or flash where cuDNN refuses the shape (the row says)."""
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            return median_seconds(single_gpu_step(*full, backend), reps), name
        except RuntimeError as exc:  # a backend that refuses this shape: say so, try the next
            print(f"single-GPU {name} unavailable at S={full[0].shape[1]}: {str(exc).splitlines()[0]}")
    return float("nan"), "none"


def torch_cp_seconds(seq: int, mesh, reps: int) -> float:
    """``context_parallel.torch_cp_time``, NaN (reported) when PyTorch's ring fails on this shape."""
    try:
        return torch_cp_time(seq, HKV, mesh, reps)
    except Exception as exc:  # the anchor's failure must not lose the run
        if dist.get_rank() == 0:
            print(f"torch context_parallel failed at S={seq}: {str(exc).splitlines()[0]}")
        return float("nan")


def dense_timed(args: argparse.Namespace, world: int) -> list[dict]:
    """Dense part on GPUs: one row per (tokens per GPU, method); the NCCL groups come from the world."""
    methods = dense_methods(world, args.methods)
    groups = {m.label: method_group(m, world) for m in methods}
    mesh = init_device_mesh("cuda", (world,), mesh_dim_names=("cp",))
    rows = []
    for tokens in args.tokens_per_gpu:
        seq = world * tokens
        full = make_inputs(seq, HKV)
        single, kernel = single_gpu_seconds(full, args.reps) if dist.get_rank() == 0 else (float("nan"), "")
        shards = shards_of(full, "zigzag")
        del full
        times = {
            m.label: median_seconds(cp_step(shards, groups[m.label], m), args.reps, barrier=True)
            for m in methods
        }
        del shards
        free_memory()
        theirs = torch_cp_seconds(seq, mesh, args.reps)
        free_memory()
        flops = fwd_bwd_flops(seq, HQ)
        for m in methods:
            rows.append(
                {
                    "tokens_per_gpu": tokens,
                    "seq": seq,
                    "method": m.label,
                    "time_s": times[m.label],
                    "tflops_per_gpu": flops / world / times[m.label] / 1e12,
                    "single_gpu_s": single,
                    "single_gpu_kernel": kernel,
                    "efficiency": single / (world * times[m.label]),
                    "efficiency_target": EFFICIENCY_TARGETS.get(tokens),
                    "torch_cp_s": theirs,
                    "speedup_vs_torch_cp": theirs / times[m.label],
                }
            )
    return rows


def dense_checked(args: argparse.Namespace, world: int) -> list[dict]:
    """Dense part on CPUs: every method's out, dq, dk, dv vs fp64 causal SDPA on the whole sequence."""
    methods = dense_methods(world, args.methods)
    groups = {m.label: method_group(m, world) for m in methods}
    rows = []
    for tokens in args.tokens_per_gpu:
        full = attention_inputs(world * tokens, CPU_SHAPE)
        reference = single_gpu_step(*(t.double() for t in full), SDPBackend.MATH)()
        want = shards_of(reference, "zigzag")
        shards = shards_of(full, "zigzag")
        for m in methods:
            got = cp_step(shards, groups[m.label], m)()
            rows.append(checked("dense", f"{m.label}, {tokens} tokens/rank", got, want))
    return rows


# -- sparse context parallelism -------------------------------------------------------------------------


def verticals_of(seq: int) -> int:
    """Key columns of the vertical-slash pattern: S/512, as ``sparse_cp.measure_sparse`` keeps them."""
    return seq // 512


def hier_step(q, k, v, dout, pattern, plan: StripedPlan, groups, stats=None):
    """Forward + backward of the hierarchical sparse ring on striped shards; a closure giving this rank's
    ``(out, dq, dk, dv)``. Communicates over ``groups.node`` (inner rings) and ``groups.cross`` (outer)."""

    def run():
        ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
        out, _ = hierarchical_sparse_ring_attention(
            ql, kl, vl, pattern, node_size=groups.node_size, groups=groups, plan=plan, stats=stats
        )
        out.backward(dout)
        return out, ql.grad, kl.grad, vl.grad

    return run


def hier_imbalance(plan: StripedPlan, node_size: int) -> float:
    """Worst max/mean over ranks of the work at one step ``(t, u)`` of the hierarchical ring, from the plan.

    Rank ``(n, l)`` attends at node offset t, inner step u to the blocks of rank ``(n − t, l − u)``, which is
    flat-ring step ``(r − source) mod W`` of ``plan.work_RS``. Steps where no rank works count as 1.
    """
    world = plan.world
    nodes = world // node_size
    worst = 1.0
    for t in range(nodes):
        for u in range(node_size):
            work = []
            for rank in range(world):
                node, local = divmod(rank, node_size)
                source = (node - t) % nodes * node_size + (local - u) % node_size
                work.append(int(plan.work_RS[rank, (rank - source) % world]))
            mean = sum(work) / world
            if mean:
                worst = max(worst, max(work) / mean)
    return worst


def cross_group_bytes(plan: StripedPlan, node_size: int, block_bytes: int) -> int:
    """K/V bytes the flat sparse ring's forward sends between ranks of different groups of ``node_size``."""
    world = plan.world
    blocks = sum(
        len(plan.needed[step][rank])
        for step in range(1, world)
        for rank in range(world)
        if (rank - step) % world // node_size != rank // node_size
    )
    return blocks * block_bytes


def hier_row(flat: dict, shards, pattern, plan: StripedPlan, groups, reps: int) -> dict:
    """The hierarchical ring's row next to the flat ring's ``flat`` (same pattern, estimation and plan)."""
    stats = HierarchicalRingStats()
    hier_step(*shards, pattern, plan, groups, stats)()
    sent = torch.tensor(
        [sum(stats.forward_inter), sum(map(sum, stats.forward_intra))], dtype=torch.float64, device="cuda"
    )
    dist.all_reduce(sent)
    attention = median_seconds(hier_step(*shards, pattern, plan, groups), reps, barrier=True)
    shared = [
        "seq",
        "pattern",
        "budget",
        "density",
        "estimate_s",
        "plan_s",
        "dense_ring_s",
        "referenced_bytes",
        "dense_ring_bytes",
        "flat_cross_group_bytes",
    ]
    return {
        **{key: flat[key] for key in shared},
        "ring": f"hier 2×{groups.node_size}",
        "attention_s": attention,
        "total_s": flat["estimate_s"] + flat["plan_s"] + attention,
        "imbalance": hier_imbalance(plan, groups.node_size),
        "sent_bytes": int(sent.sum().item()),
        "cross_group_bytes": int(sent[0].item()),
    }


def sparse_timed(args: argparse.Namespace, world: int) -> list[dict]:
    """Sparse part on GPUs: flat and hierarchical rows per pattern, against our dense ring on the same S."""
    seq, node_size = args.sparse_seq, world // 2
    groups = hierarchy_groups(node_size)
    full = make_inputs(seq, HKV)
    zigzag, shards = shards_of(full, "zigzag"), shards_of(full, "striped", BLOCK)
    del full  # both layouts are copies: the whole sequence need not outlive them (20 GiB at 1M tokens)
    free_memory()
    dense = median_seconds(
        ours_step(*zigzag, dist.group.WORLD), max(2, args.reps - 1), warmup=1, barrier=True
    )
    del zigzag
    free_memory()
    block_bytes = 2 * BLOCK * HKV * D * 2  # K and V of one block, bf16, B=1 (sparse_cp's convention)
    rows = []
    for kind in args.patterns:
        flat = measure_sparse(kind, seq, shards, dist.group.WORLD, args, dense)
        # The estimate is deterministic: the same budget gives measure_sparse's pattern again.
        pattern = estimate(
            kind, shards[0], shards[1], BLOCK, flat["budget"], verticals_of(seq), dist.group.WORLD
        )
        plan = plan_striped(pattern, world)
        cross = cross_group_bytes(plan, node_size, block_bytes)
        flat |= {"ring": "flat", "cross_group_bytes": cross, "flat_cross_group_bytes": cross}
        rows += [flat, hier_row(flat, shards, pattern, plan, groups, args.reps)]
        free_memory()
    return rows


def sparse_checked(args: argparse.Namespace, world: int) -> list[dict]:
    """Sparse part on CPUs: flat and hierarchical rings vs masked attention on the whole sequence (the
    reference of tests/test_sparse_ring.py and tests/test_sparse_hier.py), patterns estimated under CP."""
    # The tests' own oracle (written from the token mask, not through the kernels it judges), not a copy.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from sparse_reference import masked_attention

    seq, block = args.sparse_seq, CPU_SHAPE.block
    groups = hierarchy_groups(world // 2)
    full = attention_inputs(seq, CPU_SHAPE, seed=3)
    shards = shards_of(full, "striped", block)
    rows = []
    for kind in args.patterns:
        pattern, _ = calibrated(
            kind, shards[0], shards[1], block, args.density, verticals_of(seq), group=dist.group.WORLD
        )
        reference = masked_attention(*full, pattern)
        want = shards_of([reference[name] for name in ("out", "dq", "dk", "dv")], "striped", block)
        plan = plan_striped(pattern, world)
        flat = sparse_step(*shards, pattern, plan, dist.group.WORLD)()
        rows.append(checked("sparse", f"{kind} flat, density {pattern.density():.3f}", flat, want))
        hier = hier_step(*shards, pattern, plan, groups)()
        rows.append(checked("sparse", f"{kind} hier 2×{world // 2}", hier, want))
    return rows


# -- expert parallelism ---------------------------------------------------------------------------------


def layer_spec(name: str, cpu: bool) -> tuple:
    """``moe_layer.LAYERS[name]``; on the CPU the same routing (router, options, skew) at tiny sizes."""
    if not cpu:
        return LAYERS[name]
    _, _, _, _, shared, router, options, skew = LAYERS[name]
    return 16, 24, 16, 4, 24 if shared else 0, router, options, skew


def ep_mesh(world: int, device: str):
    """The 1-D EP mesh over all ranks (ep = W folded over dp_shard = W); collective over the world."""
    return ParallelDims(world, dp_shard=world, ep=world).build_mesh(device).submesh("ep")


def balancer_moe(spec: tuple, balancer: str, shape: Shape) -> MoE:
    """The layer of ``spec`` with ``balancer``'s router, built by ``moe_layer.make_moe`` (same seed on every
    rank, parameters in ``shape.dtype``, buffers kept, router skewed); not yet sharded."""
    dim, ffn, experts, top_k, shared, _, options, skew = spec
    router, extra, _ = BALANCERS[balancer]
    # Group-limited routing is a top-k rule; expert choice has no per-token groups.
    options = ({} if router == "expert_choice" else dict(options)) | extra
    return make_moe((dim, ffn, experts, top_k, shared, router, options, skew), shape.device, shape.dtype)


def token_batch(tokens: int, dim: int, seed: int, shape: Shape) -> torch.Tensor:
    """``[1, tokens, dim]`` tokens with feature 0 = 1 (what the skewed routers key on):
    ``moe_layer.make_tokens`` on GPUs (bf16), fp32 from a seeded CPU generator on CPUs."""
    if shape.device == "cuda":
        return make_tokens(tokens, dim, seed)
    x = torch.randn(1, tokens, dim, generator=torch.Generator().manual_seed(seed))
    x[..., 0] = 1.0
    return x


def layer_step(moe: MoE, x: torch.Tensor, dy: torch.Tensor):
    """Forward + backward of the layer (output and balance loss) on ``x`` (a leaf requiring grad); a closure
    giving ``(y, dx)``. With EP it communicates over the layer's EP group (all-to-alls)."""

    def run():
        moe.zero_grad(set_to_none=True)
        x.grad = None
        y, stats = moe(x)
        torch.autograd.backward([y, stats.aux_loss], [dy, torch.ones_like(stats.aux_loss)])
        return y, x.grad

    return run


def rank_load(load_E: torch.Tensor, world: int) -> float:
    """max/mean of the token copies each EP rank's experts get (``E/W`` contiguous experts per rank)."""
    per_rank = load_E.view(world, -1).sum(dim=1)
    return float(per_rank.max() / per_rank.mean())


def global_load(moe: MoE, x: torch.Tensor, group, *, grad: bool = False):
    """(``[E]`` kept token copies per expert over every rank of ``group``, the layer's MoEStats) of one
    forward of ``x``; the counts are all-reduced over ``group``."""
    with torch.set_grad_enabled(grad):
        _, stats = moe(x)
    load_E = stats.tokens_per_expert_E.clone()
    dist.all_reduce(load_E, group=group)
    return load_E, stats


def balance(spec: tuple, balancer: str, mesh, args: argparse.Namespace, shape: Shape) -> dict:
    """Rank load of the EP layer under ``balancer``: on the first batch, and on a held-out batch after
    ``args.balance_steps`` forward passes on fresh batches, each followed by the router's balance update
    from the all-reduced load (the trainer's ``update_router_balance``) and, for ``aux_loss``, an Adam step
    on the switch loss with gradients averaged over the EP group (what data parallelism would do)."""
    group, world, rank = mesh.get_group(), mesh.size(), dist.get_rank()
    moe = balancer_moe(spec, balancer, shape)
    moe.enable_expert_parallel(mesh)
    trained = BALANCERS[balancer][2]
    optimizer = torch.optim.Adam(moe.router.parameters(), lr=args.balance_lr) if trained else None
    first, routed = None, 0.0
    for step in range(args.balance_steps):
        x = token_batch(args.ep_tokens, spec[0], 1000 + step * world + rank, shape)
        load_E, stats = global_load(moe, x, group, grad=trained)
        first = first if first is not None else rank_load(load_E, world)
        routed = float(load_E.sum())
        if optimizer is not None:
            stats.aux_loss.backward()
            for param in moe.router.parameters():
                dist.all_reduce(param.grad, group=group)
                param.grad /= world
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        moe.router.update_balance(load_E)
    held_out = token_batch(args.ep_tokens, spec[0], 99 * world + rank, shape)
    load_E, _ = global_load(moe, held_out, group)
    return {
        "rank_load_first": first,
        "rank_load": rank_load(load_E, world),
        "expert_load": float(load_E.max() / load_E.mean()),
        "routed_copies": routed,
    }


def ep_row(name: str, mesh, nccl: float, args: argparse.Namespace) -> dict:
    """One layer at EP = W: time, TFLOP/s per GPU, dispatch bandwidth vs NCCL, exposed communication, rank
    load as built; collective over the EP group. ``moe_layer.expert_parallel`` measures the same for 2 ranks
    (its splits name the peer as ``1 − rank``); this is its W-rank form, from the same helpers."""
    group, world = mesh.get_group(), mesh.size()
    moe = build_layer(name, ep_mesh=mesh)
    dim = moe.experts.w_down.shape[2]
    x = make_tokens(args.ep_tokens, dim, seed=10 + dist.get_rank()).requires_grad_()
    step = layer_step(moe, x, torch.randn_like(x))
    seconds = median_seconds(step, args.reps, barrier=True, warmup=3)
    load_E, _ = global_load(moe, x, group)
    busbw = dispatch_bandwidth(moe, x, group, args.reps)
    exposed, traced = exposed_comm_share(step)
    shares = torch.zeros(world, device="cuda")
    shares[dist.get_rank(group)] = exposed / traced
    dist.all_reduce(shares, group=group)
    busiest = int(load_E.view(world, -1).sum(dim=1).argmax())
    return {
        "layer": name,
        "ep": world,
        "tokens_per_gpu": args.ep_tokens,
        "layer_s": seconds,
        "layer_tflops_per_gpu": layer_flops(moe, int(load_E.sum()) // world, args.ep_tokens) / seconds / 1e12,
        "a2a_busbw_gbs": busbw,
        "nccl_a2a_busbw_gbs": nccl,
        "a2a_vs_nccl": busbw / nccl,
        "exposed_comm_busiest_rank": float(shares[busiest]),
        "exposed_comm_max": float(shares.max()),
        "rank_load": rank_load(load_E, world),
        "expert_load": float(load_E.max() / load_E.mean()),
    }


def ep_timed(args: argparse.Namespace, world: int) -> list[dict]:
    """EP part on GPUs: one row per layer, with every balancer's rank load."""
    mesh = ep_mesh(world, "cuda")
    nccl = nccl_all_to_all_busbw(mesh.get_group())
    rows = []
    for name in args.layers:
        row = ep_row(name, mesh, nccl, args)
        free_memory()
        row["balancers"] = {}
        for balancer in args.balancers:
            row["balancers"][balancer] = balance(layer_spec(name, False), balancer, mesh, args, GPU_SHAPE)
            free_memory()
        rows.append(row)
    return rows


def ep_checked(args: argparse.Namespace, world: int) -> list[dict]:
    """EP part on CPUs: for each layer and balancer router, the EP layer's output and input gradient vs the
    same layer unsharded on this rank's tokens (routing is token-local, as tests/test_expert_parallel.py
    relies on); then the balancing loop, whose all-reduced load must count every routed copy (dropless)."""
    mesh = ep_mesh(world, "cpu")
    rank = dist.get_rank()
    rows = []
    for name in args.layers:
        spec = layer_spec(name, True)
        for balancer in args.balancers:
            base = balancer_moe(spec, balancer, CPU_SHAPE)
            sharded = copy.deepcopy(base)
            sharded.enable_expert_parallel(mesh)
            x = token_batch(args.ep_tokens, spec[0], 10 + rank, CPU_SHAPE)
            dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
            got = layer_step(sharded, x.clone().requires_grad_(), dy)()
            want = layer_step(base, x.clone().requires_grad_(), dy)()
            rows.append(checked("ep", f"{name} {balancer}: y, dx", got, want))
            loads = balance(spec, balancer, mesh, args, CPU_SHAPE)
            router = base.router
            copies = (
                router.num_experts * router.capacity(args.ep_tokens)
                if balancer == "expert_choice"
                else args.ep_tokens * router.top_k
            )
            counted = torch.tensor([loads["routed_copies"]], dtype=torch.float64)
            expected = torch.tensor([float(copies * world)], dtype=torch.float64)
            rows.append(
                checked("ep", f"{name} {balancer}: balancing load counts every copy", [counted], [expected])
            )
    return rows


# -- end to end -----------------------------------------------------------------------------------------


def e2e_config(args: argparse.Namespace, world: int, run_dir: str, *, reference: bool = False):
    """The trainer config of the e2e run: cp = ep = W (dp_shard 1) on the synthetic passkey task (byte
    tokens), S = W × tokens per GPU; one sequence per step on GPUs. On CPUs a step holds W sequences, so
    that the ``reference`` layout (cp = ep = 1, dp_shard = W ranks with a sequence each) sees the same
    batches."""
    cp, ep = (1, 1) if reference else (world, world)
    seq = world * args.e2e_tokens_per_gpu
    sequences = world if args.cpu else 1
    overrides = [
        "data.source=synthetic",
        "data.task=passkey",
        f"train.seq_len={seq}",
        f"train.global_batch_tokens={seq * sequences}",
        f"train.steps={args.e2e_steps}",
        "train.warmup_steps=1",
        "train.log_every=1",
        "train.eval_samples=0",
        "checkpoint.interval=0",
        "checkpoint.resume=false",
        f"train.run_dir={run_dir}",
        "parallel.dp_replicate=1",
        f"parallel.dp_shard={world // cp}",
        f"parallel.cp={cp}",
        f"parallel.ep={ep}",
        "parallel.cp_method=ring",
        "parallel.cp_layout=zigzag",
        f"cluster.procs_per_node={world}",
        # The task's byte tokens: a preset's 152K-way LM head would spend the memory on logits, and its FLOPs
        # are not in the MFU's count anyway.
        "model.vocab_size=256",
        f"model.max_seq_len={seq}",
    ]
    if args.cpu:
        overrides += ["model.preset=tiny", f"model.num_experts={2 * world}", "cluster.device=cpu"]
    else:
        overrides += [
            f"model.preset={args.e2e_preset}",
            f"model.n_layers={args.e2e_layers}",
            "train.activation_checkpointing=true",
            "cluster.device=cuda",
        ]
    return load_config(None, overrides)


def shared_run_dir() -> Path:
    """A fresh directory under $TMPDIR made by rank 0 and named to every rank (one host: --standalone)."""
    name = [tempfile.mkdtemp(prefix="sparsetron-scaling-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(name, src=0)
    return Path(name[0])


def trained(args: argparse.Namespace, world: int, device: str, *, reference: bool = False) -> list[dict]:
    """Train the e2e config in-process (collective over the world) and return rank 0's metrics.jsonl records
    (empty on other ranks); the run directory, final checkpoint included, is removed afterwards."""
    run_dir = shared_run_dir()
    cfg = e2e_config(args, world, str(run_dir), reference=reference)
    train(cfg, check_job(cfg, world).build_mesh(device), device)
    records = []
    if dist.get_rank() == 0:
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(run_dir)
    return records


def median(values: list[float]) -> float:
    """The middle value (upper median), NaN for none."""
    return sorted(values)[len(values) // 2] if values else float("nan")


def e2e_timed(args: argparse.Namespace, world: int) -> list[dict]:
    """e2e on GPUs: tokens/s and MFU of the cp = ep = W run, medians after the warm-up steps."""
    records = trained(args, world, "cuda")
    if dist.get_rank():
        return []
    steady = records[E2E_WARMUP_STEPS:]
    rate = median([r["tokens_per_s"] for r in steady])
    return [
        {
            "model": args.e2e_preset,
            "layers": args.e2e_layers,
            "seq": world * args.e2e_tokens_per_gpu,
            "cp": world,
            "ep": world,
            "steps": len(records),
            "tokens_per_s": rate,
            "tokens_per_s_per_gpu": rate / world,
            "mfu": median([r["mfu"] for r in steady if r["mfu"] is not None]),
            "last_loss": records[-1]["loss"],
            "ep_rank_load_max_over_mean": median([r["ep_rank_load_max_over_mean"] for r in steady]),
        }
    ]


def e2e_checked(args: argparse.Namespace, world: int) -> list[dict]:
    """e2e on CPUs: the cp = ep = W run's losses vs the same model and batches at cp = ep = 1 (FSDP over
    dp_shard = W, one sequence per rank), the trainer's layout invariance."""
    ours = trained(args, world, "cpu")
    reference = trained(args, world, "cpu", reference=True)
    pair = [
        [torch.tensor([r["loss"] for r in ours], dtype=torch.float64)],
        [torch.tensor([r["loss"] for r in reference], dtype=torch.float64)],
    ]
    if dist.get_rank():  # the records live on rank 0; the others join the error's all-reduce with none
        pair = [[torch.ones(1)], [torch.ones(1)]]
    case = f"cp×ep {world}×{world} losses vs dp_shard {world} over {args.e2e_steps} steps"
    return [checked("e2e", case, *pair)]


# -- report ---------------------------------------------------------------------------------------------


def tokens_label(count: int) -> str:
    """A token count as 512, 8K, 1M."""
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if count >= size and count % size == 0:
            return f"{count // size}{unit}"
    return str(count)


def fmt(value, spec: str = ".3g") -> str:
    """A table cell: numbers formatted with ``spec``, NaN/None as "–"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def markdown(columns, rows: list[dict]) -> str:
    """A markdown table: one line per row, one cell per ``(header, cell(row) -> str)`` column."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows])


DENSE_COLUMNS = (
    ("tokens/GPU", lambda r: tokens_label(r["tokens_per_gpu"])),
    ("method", lambda r: r["method"]),
    ("ms", lambda r: fmt(r["time_s"] * 1e3, ".1f")),
    ("TFLOP/s/GPU", lambda r: fmt(r["tflops_per_gpu"], ".1f")),
    ("efficiency", lambda r: fmt(r["efficiency"], ".1%")),
    ("target", lambda r: fmt(r["efficiency_target"] and f"≥ {r['efficiency_target']:.0%}")),
    ("torch CP ms", lambda r: fmt(r["torch_cp_s"] * 1e3, ".1f")),
    ("× torch CP", lambda r: fmt(r["speedup_vs_torch_cp"], ".2f")),
)
SPARSE_COLUMNS = (
    ("S", lambda r: tokens_label(r["seq"])),
    ("pattern", lambda r: r["pattern"]),
    ("ring", lambda r: r["ring"]),
    ("density", lambda r: fmt(r["density"], ".2%")),
    ("total s", lambda r: fmt(r["total_s"], ".3f")),
    ("attn s", lambda r: fmt(r["attention_s"], ".3f")),
    ("× dense", lambda r: fmt(r["dense_ring_s"] / r["total_s"], ".2f")),
    (f"imbalance (≤ {IMBALANCE_TARGET:.2f})", lambda r: fmt(r["imbalance"], ".3f")),
    ("sent/ref", lambda r: fmt(r["sent_bytes"] / max(r["referenced_bytes"], 1), ".3f")),
    ("cross/flat", lambda r: fmt(r["cross_group_bytes"] / max(r["flat_cross_group_bytes"], 1), ".3f")),
    ("est+plan", lambda r: fmt((r["estimate_s"] + r["plan_s"]) / r["attention_s"], ".1%")),
)
EP_COLUMNS = (
    ("layer", lambda r: r["layer"]),
    ("ms", lambda r: fmt(r["layer_s"] * 1e3, ".2f")),
    ("TFLOP/s/GPU", lambda r: fmt(r["layer_tflops_per_gpu"], ".0f")),
    ("a2a GB/s", lambda r: fmt(r["a2a_busbw_gbs"], ".0f")),
    ("NCCL GB/s", lambda r: fmt(r["nccl_a2a_busbw_gbs"], ".0f")),
    ("a2a/NCCL", lambda r: fmt(r["a2a_vs_nccl"], ".2f")),
    ("exposed", lambda r: fmt(r["exposed_comm_busiest_rank"], ".0%")),
    ("rank load", lambda r: fmt(r["rank_load"], ".2f")),
)
E2E_COLUMNS = (
    ("model", lambda r: r["model"]),
    ("layers", lambda r: fmt(r["layers"], "d")),
    ("S", lambda r: tokens_label(r["seq"])),
    ("cp×ep", lambda r: f"{r['cp']}×{r['ep']}"),
    ("tokens/s", lambda r: fmt(r["tokens_per_s"], ",.0f")),
    ("tokens/s/GPU", lambda r: fmt(r["tokens_per_s_per_gpu"], ",.0f")),
    ("MFU", lambda r: fmt(r["mfu"], ".1%")),
    ("EP rank load", lambda r: fmt(r["ep_rank_load_max_over_mean"], ".2f")),
    ("loss", lambda r: fmt(r["last_loss"], ".3f")),
)
CHECK_COLUMNS = (
    ("part", lambda r: r["part"]),
    ("case", lambda r: r["case"]),
    ("max rel error", lambda r: fmt(r["max_rel_error"], ".1e")),
    ("result", lambda r: r["result"]),
)


def balancer_column(name: str):
    """An EP table column: the rank load under balancer ``name``, first batch → held-out batch."""

    def cell(row: dict) -> str:
        loads = row["balancers"][name]
        return f"{fmt(loads['rank_load_first'], '.2f')} → {fmt(loads['rank_load'], '.2f')}"

    return name, cell


def ep_table(rows: list[dict]) -> str:
    balancers = [balancer_column(name) for name in (rows[0]["balancers"] if rows else ())]
    legend = (
        "rank load: EP-rank max/mean as built; per balancer, first batch → held-out batch after the steps"
    )
    return markdown((*EP_COLUMNS, *balancers), rows) + "\n\n" + legend


TABLES = {
    "dense": lambda rows: markdown(DENSE_COLUMNS, rows),
    "sparse": lambda rows: markdown(SPARSE_COLUMNS, rows),
    "ep": ep_table,
    "e2e": lambda rows: markdown(E2E_COLUMNS, rows),
}
RUNS = {
    "dense": (dense_timed, dense_checked),
    "sparse": (sparse_timed, sparse_checked),
    "ep": (ep_timed, ep_checked),
    "e2e": (e2e_timed, e2e_checked),
}


def report(args: argparse.Namespace, world: int, results: dict[str, list[dict]]) -> None:
    """Rank 0: one markdown table per part, and the JSON file."""
    device = "cpu (gloo, float32)" if args.cpu else torch.cuda.get_device_name()
    print(f"\n{world}× {device}, torch {torch.__version__}")
    for part, rows in results.items():
        print(f"\n### {part}\n")
        print(markdown(CHECK_COLUMNS, rows) if args.cpu else TABLES[part](rows))
    if args.out:
        document = {
            "world": world,
            "device": device,
            "torch": torch.__version__,
            "args": vars(args),
            "results": results,
        }
        Path(args.out).write_text(json.dumps(document, indent=2))


def main() -> None:
    world, rank = int(os.environ.get("WORLD_SIZE", "0")), int(os.environ.get("RANK", "0"))
    args = parse_args(world, rank)
    if args.cpu:
        dist.init_process_group("gloo")
    else:
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on the lent machines
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("cpu:gloo,cuda:nccl")
    results = {}
    for part in args.parts:
        timed, check = RUNS[part]
        results[part] = (check if args.cpu else timed)(args, world)
        free_memory()
    if rank == 0:
        report(args, world, results)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
