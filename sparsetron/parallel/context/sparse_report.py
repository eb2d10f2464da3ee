"""What a sparse context-parallel ring would do with one pattern, computed on the CPU without running it: the
numbers behind ``sparsetron bench sparse-cp``.

:class:`SparseCPSpec` names a pattern (``window``: sliding window plus sinks; ``strided``: per-head strided
shards; ``topk``: MoBA-style top-k key blocks from pooled queries and keys; ``vertical_slash``: MInference's
verticals and slashes from the last queries), its inputs (seeded random, or planted ones whose answer is known:
``topk`` a few hot key blocks every query block should pick, ``vertical_slash`` a few key columns every query
attends to and one diagonal offset), the sequence, block and ring size, and the K/V shape the traffic is
counted for (bf16). :func:`sparse_cp_report` builds the pattern, plans it with
:func:`~sparsetron.parallel.context.sparse_plan.plan_striped` and returns a :class:`SparseCPReport`: density,
per-step work and imbalance, idle steps, the sparse ring's bytes per step against a dense ring's, and with a
node size the hierarchical ring's (:mod:`.sparse_hier`) inter- and intra-node bytes next to the flat ring's
bytes that would cross nodes under the same node-major numbering.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

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

PATTERNS = ("window", "strided", "topk", "vertical_slash")
INPUTS = ("random", "planted")
BF16_BYTES = 2
#: ``vertical_slash`` without a budget keeps the columns and diagonals carrying this share of the attention.
DEFAULT_MASS = 0.9


@dataclass(frozen=True)
class SparseCPSpec:
    """One sparse-ring scenario; field ``x_y`` is the command's option ``--x-y`` (see the module docstring)."""

    pattern: str = "vertical_slash"
    inputs: str = "random"
    #: Tokens in the sequence.
    seq: int = 8192
    #: Tokens per block (the pattern's and the striped layout's).
    block: int = 64
    #: Ranks W of the ring.
    world: int = 4
    #: Ranks per node of the hierarchical ring (None: only the flat ring).
    node_size: int | None = None
    batch: int = 1
    heads: int = 8
    kv_heads: int = 2
    #: Of the inputs and of the traffic (K and V of ``head_dim`` per KV head, bf16).
    head_dim: int = 128
    seed: int = 0
    #: window: recent key blocks kept.
    window_blocks: int = 4
    #: window / vertical_slash: first key blocks kept.
    sink_blocks: int = 1
    #: strided: KV head h keeps key blocks ≡ h (mod stride).
    stride: int = 4
    #: strided / topk: most recent key blocks kept.
    local_blocks: int = 1
    #: topk: best-scoring earlier key blocks kept per query block.
    k: int = 8
    #: vertical_slash budgets (both, or neither and ``mass``).
    verticals: int | None = None
    slashes: int | None = None
    #: vertical_slash: attention share kept, in (0, 1] (:data:`DEFAULT_MASS` without budgets).
    mass: float | None = None
    #: vertical_slash: last queries the pattern is estimated from.
    last_q: int = 64
    #: The KV head a plot draws.
    kv_head: int = 0

    def problems(self) -> list[str]:
        """Every rule the spec breaks, each naming the option, its value, the rule and a value that works."""
        out = [
            f"--{name.replace('_', '-')} {getattr(self, name)} must be ≥ 1"
            for name in ("seq", "block", "world", "batch", "heads", "kv_heads", "head_dim")
            if getattr(self, name) < 1
        ]
        if self.pattern not in PATTERNS:
            out.append(f"--pattern {self.pattern} is not one of {', '.join(PATTERNS)}")
        if self.inputs not in INPUTS:
            out.append(f"--inputs {self.inputs} is not one of {', '.join(INPUTS)}")
        if out:
            return out
        unit = self.block * self.world
        if self.seq % unit:
            lower, upper = self.seq // unit * unit, (self.seq // unit + 1) * unit
            fix = f"--seq {upper}" if lower == 0 else f"--seq {lower} or {upper}"
            out.append(
                f"--seq {self.seq} must be a multiple of --block × --world = {self.block} × {self.world} = {unit} "
                f"(the striped layout deals whole blocks round-robin to the ranks); use {fix}"
            )
        if self.node_size is not None and (self.node_size < 1 or self.world % self.node_size):
            divisors = [str(n) for n in range(1, self.world + 1) if self.world % n == 0]
            out.append(
                f"--node-size {self.node_size} must divide --world {self.world} (every node of the hierarchical "
                f"ring holds the same number of whole ranks); use one of {', '.join(divisors)}"
            )
        if self.heads % self.kv_heads:
            out.append(
                f"--heads {self.heads} must be a multiple of --kv-heads {self.kv_heads} (query heads share KV heads "
                f"in equal groups); e.g. --heads {self.kv_heads * max(1, self.heads // self.kv_heads)}"
            )
        if not 0 <= self.kv_head < self.kv_heads:
            out.append(
                f"--kv-head {self.kv_head} must be in [0, --kv-heads {self.kv_heads}); e.g. --kv-head 0"
            )
        if self.inputs == "planted" and self.pattern not in ("topk", "vertical_slash"):
            out.append(
                f"--inputs planted applies to topk and vertical_slash; --pattern {self.pattern} is static: drop "
                "--inputs"
            )
        if self.inputs == "planted" and self.head_dim % 4:
            out.append(f"--inputs planted needs --head-dim a multiple of 4, got {self.head_dim}; e.g. 128")
        if self.pattern == "vertical_slash":
            if not 0 < self.last_q <= self.seq:
                out.append(f"--last-q {self.last_q} must be in [1, --seq {self.seq}]; e.g. --last-q 64")
            if self.mass is not None and (self.verticals is not None or self.slashes is not None):
                out.append("pass either --mass or --verticals with --slashes, not both")
            elif (self.verticals is None) != (self.slashes is None):
                out.append(
                    f"--verticals and --slashes go together (or pass --mass, or neither for mass {DEFAULT_MASS})"
                )
        return out

    def block_bytes(self) -> int:
        """Bytes of one key block on the wire: K and V of every batch row and KV head, bf16."""
        return 2 * self.batch * self.kv_heads * self.block * self.head_dim * BF16_BYTES

    def describe(self) -> str:
        """One line: the pattern, sizes and the K/V shape the bytes are counted for."""
        return (
            f"{self.pattern}: seq {self.seq}, block {self.block}, W={self.world}"
            + (f" ({self.world // self.node_size} nodes × {self.node_size})" if self.node_size else "")
            + f", B={self.batch}, Hq={self.heads}, Hkv={self.kv_heads}, D={self.head_dim} bf16"
        )


def _random_qk(spec: SparseCPSpec, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """q ``[B, S, Hq, D]`` and k ``[B, S, Hkv, D]``, fp32 standard normal from ``g``."""
    q_BSHD = torch.randn(spec.batch, spec.seq, spec.heads, spec.head_dim, generator=g)
    k_BSHD = torch.randn(spec.batch, spec.seq, spec.kv_heads, spec.head_dim, generator=g)
    return q_BSHD, k_BSHD


def planted_topk_inputs(
    spec: SparseCPSpec, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Random q ``[B, S, Hq, D]``, k ``[B, S, Hkv, D]`` (fp32) plus one shared direction in every query and,
    strongly, in a few hot key blocks, which come back too: every query block's top-k should hold the hot
    blocks before it."""
    q_BSHD, k_BSHD = _random_qk(spec, g)
    n = spec.seq // spec.block
    hot = sorted(torch.randperm(n - 1, generator=g)[: max(1, spec.k // 2)].add(1).tolist())
    direction_D = torch.randn(spec.head_dim, generator=g)
    direction_D /= direction_D.norm()
    q_BSHD += 2.0 * direction_D
    for block in hot:
        k_BSHD[:, block * spec.block : (block + 1) * spec.block] += 4.0 * direction_D
    return q_BSHD, k_BSHD, hot


def planted_vertical_slash_inputs(
    spec: SparseCPSpec, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, list[int], int]:
    """Last queries and keys whose attention peaks on a few key columns (verticals) and on one diagonal offset
    (a slash); returns the last queries ``[B, L, Hq, D]``, the keys ``[B, S, Hkv, D]`` (fp32), the planted
    columns and the planted offset.

    The first half of the head dimension holds sinusoidal position codes with ``q_i·k_j = Σ cos(ω (i − j − o))``,
    which peaks at ``i − j = o``; the second half a direction shared by every query and the planted columns.
    The strengths give, at head dim 128, the slash and the columns about half of the last queries' attention
    each, over small Gaussian noise.
    """
    d, half = spec.head_dim, spec.head_dim // 2
    freqs = torch.rand(half // 2, generator=g) * 2.5 + 0.3
    offset = spec.block * 3 + spec.block // 2

    def codes(positions: torch.Tensor) -> torch.Tensor:
        angles = positions[:, None] * freqs[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=-1)  # [len(positions), half]

    key_pos = torch.arange(spec.seq, dtype=torch.float32)
    query_pos = key_pos[-spec.last_q :]
    k_BSHD = 0.3 * torch.randn(spec.batch, spec.seq, spec.kv_heads, d, generator=g)
    q_BLHD = 0.3 * torch.randn(spec.batch, spec.last_q, spec.heads, d, generator=g)
    k_BSHD[..., :half] += 2.2 * codes(key_pos)[None, :, None, :]
    q_BLHD[..., :half] += 2.2 * codes(query_pos - offset)[None, :, None, :]
    direction = torch.randn(d - half, generator=g)
    direction /= direction.norm()
    columns = torch.randperm(spec.seq - spec.last_q, generator=g)[:4]
    q_BLHD[..., half:] += 8.0 * direction
    k_BSHD[:, columns, :, half:] += 16.0 * direction
    return q_BLHD, k_BSHD, sorted(columns.tolist()), offset


def build_pattern(spec: SparseCPSpec) -> tuple[BlockPattern, str]:
    """The pattern ``spec`` describes (random inputs from ``spec.seed``) and a line on what its inputs were.

    Raises ValueError when the pattern's own arguments are out of range (e.g. a block count); check
    :meth:`SparseCPSpec.problems` first for the rest.
    """
    g = torch.Generator().manual_seed(spec.seed)
    if spec.pattern == "window":
        pattern = sliding_window_sinks(spec.batch, spec.kv_heads, spec.seq, spec.block,
                                       window_blocks=spec.window_blocks, sink_blocks=spec.sink_blocks)  # fmt: skip
        return pattern, f"static: window {spec.window_blocks} blocks, {spec.sink_blocks} sink blocks"
    if spec.pattern == "strided":
        pattern = strided(spec.batch, spec.kv_heads, spec.seq, spec.block, stride=spec.stride,
                          local_blocks=spec.local_blocks)  # fmt: skip
        return pattern, f"static: stride {spec.stride}, {spec.local_blocks} local blocks"
    if spec.pattern == "topk":
        if spec.inputs == "planted":
            q_BSHD, k_BSHD, hot = planted_topk_inputs(spec, g)
            note = f"planted hot key blocks {hot}"
        else:
            q_BSHD, k_BSHD = _random_qk(spec, g)
            note = f"random inputs, seed {spec.seed}"
        pattern = block_topk(pool_blocks(q_BSHD, spec.block), pool_blocks(k_BSHD, spec.block), spec.block,
                             k=spec.k, local_blocks=spec.local_blocks)  # fmt: skip
        return pattern, f"{note}; top {spec.k} key blocks + {spec.local_blocks} local"
    if spec.inputs == "planted":
        q_last_BLHD, k_BSHD, columns, offset = planted_vertical_slash_inputs(spec, g)
        note = f"planted key columns {columns}, slash offset {offset}"
    else:
        q_BSHD, k_BSHD = _random_qk(spec, g)
        q_last_BLHD = q_BSHD[:, -spec.last_q :]
        note = f"random inputs, seed {spec.seed}"
    mass = DEFAULT_MASS if spec.mass is None and spec.verticals is None else spec.mass
    budget = f"mass {mass}" if mass is not None else f"{spec.verticals} verticals, {spec.slashes} slashes"
    pattern = vertical_slash(q_last_BLHD, k_BSHD, spec.block, verticals=spec.verticals, slashes=spec.slashes,
                             mass=mass, sink_blocks=spec.sink_blocks)  # fmt: skip
    return pattern, f"{note}; {budget} from the last {spec.last_q} queries"


@dataclass(frozen=True)
class HierarchicalTraffic:
    """K/V bytes of the hierarchical sparse ring on ``nodes × node_size`` node-major ranks, all ranks together.

    ``inter_T[t]`` crosses nodes at node offset ``t`` (0 at ``t = 0``); ``intra_T[t]`` moves inside nodes during
    offset ``t``'s inner ring. ``flat_inter`` / ``flat_intra``: what the flat sparse ring sends across / within
    nodes under the same numbering (its step ``s`` link ``r − s → r`` crosses when the two ranks' nodes differ).
    """

    node_size: int
    nodes: int
    inter_T: list[int]
    intra_T: list[int]
    flat_inter: int
    flat_intra: int


def _refs(plan: StripedPlan, reader: int, owner: int) -> int:
    """How many of rank ``owner``'s key blocks rank ``reader``'s queries reference."""
    return len(plan.needed[(reader - owner) % plan.world][reader])


def _node_refs(plan: StripedPlan, node: int, owner: int, node_size: int) -> int:
    """How many of rank ``owner``'s key blocks any rank of ``node`` references (each crosses once per node)."""
    readers = range(node * node_size, (node + 1) * node_size)
    blocks = [plan.needed[(reader - owner) % plan.world][reader] for reader in readers]
    return len(torch.unique(torch.cat(blocks)))


def hierarchical_traffic(plan: StripedPlan, node_size: int, block_bytes: int) -> HierarchicalTraffic:
    """The bytes :func:`~.sparse_hier.hierarchical_sparse_ring_attention` moves for ``plan`` in its forward,
    with ``block_bytes`` per key block of K and V (the backward returns the gradients of the same blocks over
    the reverse links, in the gradient accumulation dtype)."""
    world = plan.world
    if node_size < 1 or world % node_size:
        raise ValueError(f"node_size={node_size} must divide the ring's {world} ranks (whole nodes)")
    nodes = world // node_size
    inter, intra = [], []
    for t in range(nodes):
        inter_blocks = intra_blocks = 0
        for node in range(nodes):
            source = (node - t) % nodes
            for local in range(node_size):
                rank = node * node_size + local
                if t:  # the peer with the same local index on the source node carries what this node reads
                    inter_blocks += _node_refs(plan, node, source * node_size + local, node_size)
                for u in range(1, node_size):  # u = 0 reads the carried set in place
                    intra_blocks += _refs(plan, rank, source * node_size + (local - u) % node_size)
        inter.append(inter_blocks * block_bytes)
        intra.append(intra_blocks * block_bytes)
    sent = plan.sent_blocks()  # [W, S]: blocks rank r receives at step s from rank r − s
    crossing = torch.tensor(
        [[(r // node_size) != ((r - s) % world) // node_size for s in range(world)] for r in range(world)]
    )
    flat_inter = int(sent[crossing].sum()) * block_bytes
    flat_intra = int(sent[~crossing].sum()) * block_bytes
    return HierarchicalTraffic(node_size, nodes, inter, intra, flat_inter, flat_intra)


@dataclass(frozen=True)
class SparseCPReport:
    """The numbers ``sparsetron bench sparse-cp`` prints (see the module docstring); bytes are all ranks'."""

    spec: SparseCPSpec
    #: What the pattern's inputs were (seed, planted blocks / columns).
    note: str
    density: float
    #: ``[W][W]``: active block pairs rank ``r`` computes at ring step ``s`` (:class:`StripedPlan`'s, as lists).
    work_RS: list[list[int]]
    #: Per step ``s``: the busiest rank's work, the mean over ranks, and their ratio (1.0 on idle steps).
    work_max_S: list[int]
    work_mean_S: list[float]
    imbalance_S: list[float]
    #: The step with the highest max/mean: the one the ring waits on longest.
    worst_step: int
    #: Steps without work on any rank: the sparse ring skips them.
    idle_steps: list[int]
    #: K and V of one block in bf16 (``SparseCPSpec.block_bytes``).
    block_bytes: int
    #: The flat sparse ring's bytes per step (step 0 is local: 0).
    sparse_bytes_S: list[int]
    #: A dense ring's bytes per step after the first: every rank's whole K/V shard.
    dense_step_bytes: int
    hierarchy: HierarchicalTraffic | None

    @property
    def sparse_bytes(self) -> int:
        return sum(self.sparse_bytes_S)

    @property
    def dense_bytes(self) -> int:
        return self.dense_step_bytes * (self.spec.world - 1)

    def as_dict(self) -> dict:
        """JSON-ready: every field, the totals, and the dense ring's bytes per step."""
        return {
            **dataclasses.asdict(self),
            "dense_bytes_S": [0] + [self.dense_step_bytes] * (self.spec.world - 1),
            "sparse_bytes": self.sparse_bytes,
            "dense_bytes": self.dense_bytes,
        }


def sparse_cp_report(spec: SparseCPSpec) -> tuple[BlockPattern, StripedPlan, SparseCPReport]:
    """Build ``spec``'s pattern, plan it on ``spec.world`` ranks and count its work and traffic (CPU only).

    Raises ValueError listing every problem of ``spec`` (see :meth:`SparseCPSpec.problems`), or the pattern's.
    """
    problems = spec.problems()
    if problems:
        raise ValueError("\n".join(problems))
    pattern, note = build_pattern(spec)
    plan = plan_striped(pattern, spec.world)
    block_bytes = spec.block_bytes()
    imbalance_S = plan.step_imbalance()
    report = SparseCPReport(
        spec=spec,
        note=note,
        density=pattern.density(),
        work_RS=plan.work_RS.tolist(),
        work_max_S=plan.work_RS.max(dim=0).values.tolist(),
        work_mean_S=plan.work_RS.double().mean(dim=0).tolist(),
        imbalance_S=imbalance_S.tolist(),
        worst_step=int(imbalance_S.argmax()),
        idle_steps=plan.idle_steps(),
        block_bytes=block_bytes,
        sparse_bytes_S=plan.bytes_per_step(block_bytes).tolist(),
        dense_step_bytes=plan.dense_bytes_per_step(block_bytes),
        hierarchy=hierarchical_traffic(plan, spec.node_size, block_bytes) if spec.node_size else None,
    )
    return pattern, plan, report
