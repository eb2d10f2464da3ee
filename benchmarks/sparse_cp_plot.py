"""See a sparse context-parallel ring: draw a head's block pattern and the striped plan's per-rank × per-step work.

    python benchmarks/sparse_cp_plot.py --pattern vertical_slash --inputs planted --seq 16384 --block 128 \\
        --world 8 --out plots/

Builds a pattern (``window``: sliding window plus sinks; ``strided``: per-head strided shards; ``topk``: MoBA
style top-k key blocks from pooled queries and keys; ``vertical_slash``: MInference's verticals and slashes from
the last queries), from seeded random inputs or from planted ones whose answer is known (``topk``: a few hot key
blocks every query block should pick; ``vertical_slash``: a few key columns every query attends to and one
diagonal offset), plans it with :func:`~sparsetron.parallel.context.sparse_plan.plan_striped` on ``--world``
ranks, writes ``pattern.png`` and ``work.png`` into ``--out``, and prints the density, the worst step's max/mean,
the idle steps, and per step the bytes the sparse ring sends next to a dense ring's (K and V in bf16 of
``--head-dim`` per KV head). Runs on the CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from sparsetron.parallel.context.patterns import (
    BlockPattern,
    block_topk,
    pool_blocks,
    sliding_window_sinks,
    strided,
    vertical_slash,
)
from sparsetron.parallel.context.sparse_plan import StripedPlan, plan_striped
from sparsetron.parallel.context.sparse_plot import plot_pattern, plot_work

PATTERNS = ("window", "strided", "topk", "vertical_slash")
BF16_BYTES = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pattern", choices=PATTERNS, default="vertical_slash")
    p.add_argument("--inputs", choices=("random", "planted"), default="random", help="topk / vertical_slash")
    p.add_argument("--seq", type=int, default=8192, help="tokens")
    p.add_argument("--block", type=int, default=64, help="tokens per block")
    p.add_argument("--world", type=int, default=4, help="ring size W")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128, help="of the inputs and of the traffic estimate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window-blocks", type=int, default=4, help="window: recent key blocks kept")
    p.add_argument("--sink-blocks", type=int, default=1, help="window / vertical_slash: first blocks kept")
    p.add_argument("--stride", type=int, default=4, help="strided: head h sees blocks ≡ h (mod stride)")
    p.add_argument("--local-blocks", type=int, default=1, help="strided / topk: recent blocks kept")
    p.add_argument("--k", type=int, default=8, help="topk: key blocks kept per query block")
    p.add_argument("--verticals", type=int, default=None, help="vertical_slash budget (with --slashes)")
    p.add_argument("--slashes", type=int, default=None, help="vertical_slash budget (with --verticals)")
    p.add_argument("--mass", type=float, default=None, help="vertical_slash: attention share kept (0, 1]")
    p.add_argument("--last-q", type=int, default=64, help="vertical_slash: last queries estimated from")
    p.add_argument("--kv-head", type=int, default=0, help="the KV head drawn")
    p.add_argument("--out", type=Path, default=Path("sparse_cp_plots"), help="directory for the PNGs")
    args = p.parse_args(argv)
    if args.pattern == "vertical_slash" and args.mass is None and None in (args.verticals, args.slashes):
        if args.verticals is None and args.slashes is None:
            args.mass = 0.9
        else:
            p.error("--verticals and --slashes go together (or pass --mass)")
    if args.mass is not None and (args.verticals is not None or args.slashes is not None):
        p.error("pass either --mass or --verticals/--slashes, not both")
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    if args.inputs == "planted" and args.head_dim % 4:
        p.error(f"planted inputs need --head-dim a multiple of 4, got {args.head_dim}")
    if args.pattern == "vertical_slash" and not 0 < args.last_q <= args.seq:
        p.error(f"--last-q {args.last_q} must be in [1, --seq]")
    if not 0 <= args.kv_head < args.kv_heads:
        p.error(f"--kv-head {args.kv_head} must be below --kv-heads {args.kv_heads}")
    return args


def planted_topk_inputs(args, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Random q, k ``[B, S, H, D]`` plus one shared direction in every query and, strongly, in a few hot key
    blocks: every query block's top-k should hold the hot blocks before it."""
    q, k = random_qk(args, args.seq, g)
    n = args.seq // args.block
    hot = sorted(torch.randperm(n - 1, generator=g)[: max(1, args.k // 2)].add(1).tolist())
    direction = torch.randn(args.head_dim, generator=g)
    direction /= direction.norm()
    q += 2.0 * direction
    for block in hot:
        k[:, block * args.block : (block + 1) * args.block] += 4.0 * direction
    return q, k, hot


def planted_vertical_slash_inputs(
    args, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, list[int], int]:
    """Last queries and keys whose attention peaks on a few key columns (verticals) and on one diagonal offset
    (a slash); returns the last queries ``[B, L, Hq, D]``, the keys ``[B, S, Hkv, D]``, the planted columns and
    the planted offset.

    The first half of the head dimension holds sinusoidal position codes with ``q_i·k_j = Σ cos(ω (i − j − o))``,
    which peaks at ``i − j = o``; the second half a direction shared by every query and the planted columns.
    The strengths give, at head dim 128, the slash and the columns about half of the last queries' attention
    each, over small Gaussian noise.
    """
    d, half = args.head_dim, args.head_dim // 2
    freqs = torch.rand(half // 2, generator=g) * 2.5 + 0.3
    offset = args.block * 3 + args.block // 2

    def codes(p: torch.Tensor) -> torch.Tensor:
        angles = p[:, None] * freqs[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=-1)  # [len(p), half]

    key_pos = torch.arange(args.seq, dtype=torch.float32)
    query_pos = key_pos[-args.last_q :]
    k = 0.3 * torch.randn(args.batch, args.seq, args.kv_heads, d, generator=g)
    q = 0.3 * torch.randn(args.batch, args.last_q, args.heads, d, generator=g)
    k[..., :half] += 2.2 * codes(key_pos)[None, :, None, :]
    q[..., :half] += 2.2 * codes(query_pos - offset)[None, :, None, :]
    direction = torch.randn(d - half, generator=g)
    direction /= direction.norm()
    columns = torch.randperm(args.seq - args.last_q, generator=g)[:4]
    q[..., half:] += 8.0 * direction
    k[:, columns, :, half:] += 16.0 * direction
    return q, k, sorted(columns.tolist()), offset


def random_qk(args, seq: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.randn(args.batch, seq, args.heads, args.head_dim, generator=g)
    k = torch.randn(args.batch, seq, args.kv_heads, args.head_dim, generator=g)
    return q, k


def build_pattern(args) -> tuple[BlockPattern, str]:
    """The pattern ``args`` describe (random inputs from ``--seed``) and a line on what its inputs were."""
    g = torch.Generator().manual_seed(args.seed)
    if args.pattern == "window":
        pattern = sliding_window_sinks(
            args.batch,
            args.kv_heads,
            args.seq,
            args.block,
            window_blocks=args.window_blocks,
            sink_blocks=args.sink_blocks,
        )
        return pattern, f"static: window {args.window_blocks} blocks, {args.sink_blocks} sink blocks"
    if args.pattern == "strided":
        pattern = strided(
            args.batch,
            args.kv_heads,
            args.seq,
            args.block,
            stride=args.stride,
            local_blocks=args.local_blocks,
        )
        return pattern, f"static: stride {args.stride}, {args.local_blocks} local blocks"
    if args.pattern == "topk":
        if args.inputs == "planted":
            q, k, hot = planted_topk_inputs(args, g)
            note = f"planted hot key blocks {hot}"
        else:
            q, k = random_qk(args, args.seq, g)
            note = f"random inputs, seed {args.seed}"
        pattern = block_topk(
            pool_blocks(q, args.block), pool_blocks(k, args.block), args.block, k=args.k,
            local_blocks=args.local_blocks,
        )  # fmt: skip
        return pattern, f"{note}; top {args.k} key blocks + {args.local_blocks} local"
    if args.inputs == "planted":
        q_last, k, columns, offset = planted_vertical_slash_inputs(args, g)
        note = f"planted key columns {columns}, slash offset {offset}"
    else:
        q, k = random_qk(args, args.seq, g)
        q_last = q[:, -args.last_q :]
        note = f"random inputs, seed {args.seed}"
    budget = (
        f"mass {args.mass}"
        if args.mass is not None
        else f"{args.verticals} verticals, {args.slashes} slashes"
    )
    pattern = vertical_slash(
        q_last,
        k,
        args.block,
        verticals=args.verticals,
        slashes=args.slashes,
        mass=args.mass,
        sink_blocks=args.sink_blocks,
    )
    return pattern, f"{note}; {budget} from the last {args.last_q} queries"


def block_bytes(args) -> int:
    """Bytes of one key block on the wire: K and V, every batch row and KV head, bf16."""
    return 2 * args.batch * args.kv_heads * args.block * args.head_dim * BF16_BYTES


def table(pattern: BlockPattern, plan: StripedPlan, nbytes: int) -> str:
    """The summary lines and the per-step table the script prints."""
    per_step = plan.step_imbalance()
    sent = plan.bytes_per_step(nbytes)
    dense = plan.dense_bytes_per_step(nbytes)
    idle = plan.idle_steps()
    sparse_total = int(sent.sum())
    dense_total = dense * (plan.world - 1)
    versus = f" vs dense ring {_mib(dense_total)} ({sparse_total / dense_total:.1%})" if dense_total else ""
    lines = [
        f"density             {pattern.density():.4f}",
        f"worst-step max/mean {plan.imbalance():.3f} (step {int(per_step.argmax())})",
        f"idle steps          {', '.join(map(str, idle)) if idle else 'none'}",
        f"bytes sent          {_mib(sparse_total)}{versus}",
        "",
        f"{'step':>4}  {'work':>10}  {'max/mean':>8}  {'sparse MiB':>10}  {'dense MiB':>10}  {'ratio':>6}",
    ]
    for s in range(plan.world):
        dense_s = dense if s else 0
        ratio = f"{int(sent[s]) / dense_s:.1%}" if dense_s else "-"
        lines.append(
            f"{s:>4}  {int(plan.work_RS[:, s].sum()):>10}  {float(per_step[s]):>8.3f}  "
            f"{int(sent[s]) / 2**20:>10.3f}  {dense_s / 2**20:>10.3f}  {ratio:>6}"
        )
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.3f} MiB"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        pattern, note = build_pattern(args)
        plan = plan_striped(pattern, args.world)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    pattern_png = plot_pattern(pattern, args.out / "pattern.png", kv_head=args.kv_head)
    work_png = plot_work(plan, args.out / "work.png")
    print(
        f"{args.pattern}: seq {args.seq}, block {args.block}, W={args.world}, B={args.batch}, "
        f"Hkv={args.kv_heads}, D={args.head_dim} bf16"
    )
    print(note)
    print(table(pattern, plan, block_bytes(args)))
    print(f"wrote {pattern_png} and {work_png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
