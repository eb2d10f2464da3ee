"""Preflight: does a job config fit a world size? Pure Python, no process group, no GPU.

``sparsetron config check``, ``sparsetron train`` and the launcher run :func:`check_job` before any
process starts, so an impossible layout fails on the login node with one message listing every broken rule
and valid alternatives, instead of after the allocation starts.
"""

from __future__ import annotations

from sparsetron.config import Config, CPLayout, CPMethod
from sparsetron.dist.errors import LayoutError
from sparsetron.dist.layout import ParallelDims, layout_problems, suggest_layouts


def cp_ulysses_degree(cfg: Config) -> int:
    """The Ulysses share of cp implied by ``parallel.cp_method`` (and ``ulysses_degree`` for hybrid)."""
    p = cfg.parallel
    if p.cp_method == CPMethod.ulysses:
        return p.cp
    if p.cp_method == CPMethod.hybrid:
        return p.ulysses_degree
    return 1


def cp_node_size(cfg: Config) -> int:
    """cp ranks per node of the hierarchical sparse ring implied by ``parallel.cp_node_size`` (``parallel.cp``:
    the flat ring).

    ``cp_node_size=0`` takes it from the launch: ranks are numbered node-major with ``cluster.procs_per_node``
    per node and a cp group is ``cp`` consecutive ranks, so when ``procs_per_node`` divides ``cp`` every cp
    group spans ``cp / procs_per_node`` whole nodes; otherwise (one node, a cp group inside a node, or groups
    straddling nodes unevenly) the flat ring.
    """
    p, cluster = cfg.parallel, cfg.cluster
    if p.cp_node_size > 0:
        return p.cp_node_size
    per_node = cluster.procs_per_node
    if (
        p.cp_method == CPMethod.sparse_ring
        and cluster.nodes > 1
        and 1 <= per_node < p.cp
        and p.cp % per_node == 0
    ):
        return per_node
    return p.cp


def _method_problems(cfg: Config) -> list[str]:
    p = cfg.parallel
    out = []
    if p.cp_method == CPMethod.hybrid:
        if not 1 < p.ulysses_degree < p.cp or p.cp % p.ulysses_degree:
            out.append(
                f"parallel.cp_method=hybrid needs 1 < parallel.ulysses_degree < parallel.cp with ulysses_degree dividing cp; "
                f"got ulysses_degree={p.ulysses_degree}, cp={p.cp} (e.g. cp=4 ulysses_degree=2)"
            )
    elif p.ulysses_degree != 1:
        out.append(
            f"parallel.ulysses_degree={p.ulysses_degree} only applies to cp_method=hybrid "
            f"(cp_method={p.cp_method.value}); remove it or set parallel.cp_method=hybrid"
        )
    sparse = cfg.model.attention_pattern != "dense"
    if p.cp_method == CPMethod.sparse_ring and not sparse:
        out.append(
            "parallel.cp_method=sparse_ring needs a sparse model.attention_pattern (window, strided, block_topk or "
            "vertical_slash); dense attention takes parallel.cp_method=ring"
        )
    if sparse and p.cp > 1 and p.cp_method != CPMethod.sparse_ring:
        out.append(
            f"model.attention_pattern={cfg.model.attention_pattern} with parallel.cp={p.cp} needs "
            "parallel.cp_method=sparse_ring (with cp_layout=striped and cp_block = model.sparse_block)"
        )
    if p.cp_method == CPMethod.sparse_ring and p.cp_block != cfg.model.sparse_block:
        out.append(
            f"parallel.cp_block={p.cp_block} must equal model.sparse_block={cfg.model.sparse_block}: the sparse "
            "ring stripes whole pattern blocks"
        )
    if p.cp_method == CPMethod.sparse_ring and p.cp_layout != CPLayout.striped:
        out.append(
            f"parallel.cp_method=sparse_ring balances work per ring step only on the striped layout; "
            f"got cp_layout={p.cp_layout.value}: set parallel.cp_layout=striped"
        )
    node_size = p.cp_node_size
    if node_size < 0:
        out.append(
            f"parallel.cp_node_size={node_size} must be ≥ 0: n > 0 puts n cp ranks on each node of the "
            "hierarchical sparse ring, 0 takes cluster.procs_per_node from the launch"
        )
    elif node_size > 0 and p.cp_method != CPMethod.sparse_ring:
        out.append(
            f"parallel.cp_node_size={node_size} only applies to cp_method=sparse_ring (cp_method="
            f"{p.cp_method.value}); remove it or set parallel.cp_method=sparse_ring"
        )
    elif node_size > 0 and p.cp % node_size:
        divisors = ", ".join(str(n) for n in range(1, p.cp + 1) if p.cp % n == 0)
        out.append(
            f"parallel.cp_node_size={node_size} must divide parallel.cp={p.cp} (every node of the hierarchical "
            f"sparse ring holds the same number of cp ranks); use one of {divisors} ({p.cp}: the flat ring)"
        )
    if p.cp_layout == CPLayout.striped and p.cp_block < 1:
        out.append(f"parallel.cp_block={p.cp_block} must be a positive number of tokens")
    return out


def _model_problems(cfg: Config) -> list[str]:
    """Rules of the model alone (no layout can fix them)."""
    m, t = cfg.model, cfg.train
    out = []
    if m.n_kv_heads < 1 or m.n_heads % m.n_kv_heads:
        out.append(
            f"model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={m.n_kv_heads} (GQA groups)"
        )
    if m.head_dim is None and m.dim % m.n_heads:
        out.append(
            f"model.dim={m.dim} is not divisible by model.n_heads={m.n_heads}; set model.head_dim explicitly"
        )
    if not 1 <= m.top_k <= m.num_experts:
        out.append(f"model.top_k={m.top_k} must be between 1 and model.num_experts={m.num_experts}")
    out += _routing_problems(m)
    if t.seq_len > m.max_seq_len:
        out.append(
            f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}; raise max_seq_len or shorten seq_len"
        )
    if t.global_batch_tokens % t.seq_len:
        out.append(
            f"train.global_batch_tokens={t.global_batch_tokens} is not a multiple of train.seq_len={t.seq_len} "
            "(a step holds whole sequences)"
        )
    return out


def _routing_problems(m) -> list[str]:
    """Router and dispatch options that cannot work for this model (checked again when the layer is built)."""
    out = []
    groups, chosen = m.router_groups, m.router_topk_groups
    if groups < 1 or m.num_experts % groups:
        out.append(
            f"model.router_groups={groups} must divide model.num_experts={m.num_experts} (equal contiguous "
            "expert groups); use a divisor such as parallel.ep"
        )
    elif not 1 <= chosen <= groups:
        out.append(f"model.router_topk_groups={chosen} must be between 1 and model.router_groups={groups}")
    elif m.top_k > chosen * (m.num_experts // groups):
        out.append(
            f"model.top_k={m.top_k} exceeds the {chosen * (m.num_experts // groups)} experts in "
            f"model.router_topk_groups={chosen} groups; raise router_topk_groups or lower top_k"
        )
    if m.capacity_factor is not None and m.capacity_factor <= 0:
        out.append(f"model.capacity_factor={m.capacity_factor} must be > 0, or null for dropless routing")
    if m.capacity_factor is not None and m.token_rounding.value != "off":
        out.append(
            "model.capacity_factor and model.token_rounding are both set; token rounding replaces the capacity "
            "cap: set model.token_rounding=off or model.capacity_factor=null"
        )
    if m.rounding_tile < 1:
        out.append(f"model.rounding_tile={m.rounding_tile} must be ≥ 1 (the grouped GEMM row tile, e.g. 128)")
    return out


def _dp_problems(cfg: Config) -> list[str]:
    """Rules of train.dp (DiLoCo / SparseLoCo settings)."""
    d = cfg.train.dp
    out = []
    if d.algorithm.value == "ddp":
        return out
    if d.inner_steps < 1:
        out.append(f"train.dp.inner_steps={d.inner_steps} must be ≥ 1 (DiLoCo/SparseLoCo use 15–100)")
    if not 1 <= d.chunk <= 65536:
        out.append(f"train.dp.chunk={d.chunk} must be in [1, 65536] (4096 = 64×64 tiles)")
    elif not 1 <= d.topk <= d.chunk:
        out.append(f"train.dp.topk={d.topk} must be in [1, chunk={d.chunk}] (the reference keeps 64 of 4096)")
    if not (1 <= d.bits <= 8 or d.bits in (16, 32)):
        out.append(
            f"train.dp.bits={d.bits} must be 1–8 (codebook) or 16/32 (raw values); the reference uses 2"
        )
    if not 0.0 <= d.error_decay <= 1.0:
        out.append(f"train.dp.error_decay={d.error_decay} must be within [0, 1] (the reference uses 0.95)")
    if d.outer_lr is not None and d.outer_lr <= 0:
        out.append(f"train.dp.outer_lr={d.outer_lr} must be > 0 (null: 0.7 for diloco, 1.0 for sparseloco)")
    if d.outer_momentum is not None and not 0.0 <= d.outer_momentum < 1.0:
        out.append(f"train.dp.outer_momentum={d.outer_momentum} must be within [0, 1)")
    if d.index_coding not in ("packed12", "rice"):
        out.append(f"train.dp.index_coding={d.index_coding!r} must be packed12 or rice")
    if d.dense_below < 1:
        out.append(f"train.dp.dense_below={d.dense_below} must be ≥ 1")
    return out


def _fit_problems(cfg: Config, dims: ParallelDims) -> list[str]:
    """Rules that tie the model, sequence and batch to the layout."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    out = []
    if m.num_experts % dims.ep:
        out.append(
            f"model.num_experts={m.num_experts} must be divisible by ep={dims.ep} (each EP rank holds whole experts)"
        )
    u = dims.cp_ulysses
    if u > 1:
        if m.n_heads % u:
            out.append(
                f"model.n_heads={m.n_heads} is not divisible by the Ulysses degree {u}; use cp_method=ring or allgather, "
                f"or a hybrid whose ulysses_degree divides {m.n_heads}"
            )
        if m.n_kv_heads % u and u % m.n_kv_heads:
            out.append(
                f"model.n_kv_heads={m.n_kv_heads} and the Ulysses degree {u} must divide one another "
                "(KV heads are split, or each replicated to exactly u / n_kv_heads ranks)"
            )
    if p.cp_layout == CPLayout.zigzag:
        unit, rule = 2 * dims.cp, f"2 × cp = {2 * dims.cp} (zigzag chunks r and 2·cp−1−r)"
    elif p.cp_layout == CPLayout.striped:
        unit, rule = (
            dims.cp * p.cp_block,
            f"cp × cp_block = {dims.cp} × {p.cp_block} (striped blocks round-robin)",
        )
    else:
        unit, rule = dims.cp, f"cp = {dims.cp} (contiguous chunks)"
    if t.seq_len % unit:
        out.append(f"train.seq_len={t.seq_len} must be divisible by {rule}")
    if t.global_batch_tokens % t.seq_len == 0:
        seqs = t.global_batch_tokens // t.seq_len
        per_step = dims.dp * t.micro_batch_size
        if seqs % per_step:
            out.append(
                f"train.global_batch_tokens / seq_len = {seqs} sequences must be divisible by "
                f"dp_replicate × dp_shard × micro_batch_size = {dims.dp_replicate} × {dims.dp_shard} × "
                f"{t.micro_batch_size} = {per_step} (each data-parallel rank takes whole micro-batches)"
            )
    return out


def check_job(cfg: Config, world_size: int) -> ParallelDims:
    """Validate ``cfg`` for ``world_size`` processes and return its :class:`ParallelDims`.

    Raises:
        LayoutError: one message listing every broken rule, each with its values and a fix, plus the
            valid layouts closest to the requested one that also satisfy the model and batch rules.
    """
    p = cfg.parallel
    u = cp_ulysses_degree(cfg)
    problems = _method_problems(cfg) + _model_problems(cfg) + _dp_problems(cfg)
    layout = layout_problems(world_size, p.dp_replicate, p.dp_shard, p.cp, p.ep, u)
    problems = layout + problems
    dims = None if layout else ParallelDims(world_size, p.dp_replicate, p.dp_shard, p.cp, p.ep, u)
    if dims is not None:
        problems += _fit_problems(cfg, dims)
    if not problems:
        assert dims is not None
        return dims

    def fits(candidate: ParallelDims) -> bool:
        same_method = {
            CPMethod.ulysses: candidate.cp_ulysses == candidate.cp,
            CPMethod.hybrid: 1 < candidate.cp_ulysses < candidate.cp,
        }.get(p.cp_method, candidate.cp_ulysses == 1)
        return same_method and not _fit_problems(cfg, candidate)

    lines = [
        f"config does not fit world_size={world_size}: dp_replicate={p.dp_replicate}, dp_shard={p.dp_shard}, "
        f"cp={p.cp}, ep={p.ep}, cp_method={p.cp_method.value}, cp_layout={p.cp_layout.value}"
        + (f", ulysses_degree={p.ulysses_degree}" if p.cp_method == CPMethod.hybrid else "")
    ]
    lines += [f"  - {x}" for x in problems]
    alternatives = suggest_layouts(world_size, p.dp_replicate, p.dp_shard, p.cp, p.ep, u, accept=fits)
    if alternatives:
        lines.append(f"  valid layouts for world_size={world_size} closest to this one (as overrides):")
        lines += [f"    {a.as_overrides()}" for a in alternatives]
    else:
        nearest = suggest_layouts(world_size, p.dp_replicate, p.dp_shard, p.cp, p.ep, u)
        lines.append(
            f"  no layout of world_size={world_size} also fits this model and batch; the nearest valid layouts and "
            "what each would still need:"
        )
        for alt in nearest:
            lines.append(f"    {alt.as_overrides()}")
            lines += [f"      needs: {x}" for x in _fit_problems(cfg, alt)]
    raise LayoutError("\n".join(lines))
