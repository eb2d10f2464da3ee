"""Estimating a block-sparse pattern under context parallelism, identically on every rank and every layout.

Each rank holds a shard of q and k (``sparsetron.parallel.context.layouts``) and knows the global position of
every token it holds; all collectives run over the context-parallel group.

* ``block_topk``: each rank mean-pools its own blocks (a block never straddles ranks when the shard unit is a
  multiple of the block), all-gathers the pooled blocks (``1/block`` of q and k) and reorders them; the
  (deterministic, fp32) estimation then runs on the same global inputs on every rank.
* ``vertical_slash``: k is never gathered. Only the last ``last_q`` queries travel (an fp64 all-reduce of a
  ``[B, L, Hq, D]`` buffer in which each rank fills the rows of its own tokens: one nonzero term per entry, so
  an exact copy). Each rank scores them against its own keys in chunks; the softmax denominators are combined
  over the group (all-reduce MAX of the per-rank log-sum-exp, then SUM of the rescaled sums), and each rank's
  column scores (placed at their global positions, zero elsewhere) and diagonal-offset scores are summed over
  the group. Communication is ``O(B·Hkv·S)`` fp64 scores and ``O(B·L·Hq·D)`` queries instead of all of q and k.

Determinism: pooled blocks and gathered queries are exact copies and the block top-k code is the same on every
rank, so its pattern is bitwise the same for cp = 1, 2, 4 … and for zigzag, striped or contiguous shards. The
vertical-slash scores are sums whose order depends on the sharding and chunking (a column's score is exact:
other ranks add zeros, but denominators and diagonals gather terms from several ranks), so they are
accumulated in fp64 (logits, exponentials and sums, the cross-rank reductions included) and rounded to fp32
before selection (ties broken by index). Reordering moves the fp64 scores by ≲1e-15 relative (measured at
S = 16K over cp = 2, 4 and the three layouts), 10^8 times below an fp32 step, so a rounded score differs only
if it lies that close to an fp32 rounding boundary: ~1e-8 odds per score, a few percent per estimate of the
8M scores at S = 512K, Hkv = 8. Even then the pattern changes only if that score sits at the selection cut
within one fp32 step of its neighbour. Bitwise identity by construction would need exact arithmetic (the fp64
logits themselves depend on the GEMM's blocking). No gradient flows through estimation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from sparsetron.parallel.context.layouts import global_token_index
from sparsetron.parallel.context.patterns import (
    BlockPattern,
    _attention_mass,
    _check_options,
    _default_key_chunk,
    _grouped_queries,
    _key_chunks,
    _log_normalizer,
    _vertical_slash_pattern,
    block_topk,
    pool_blocks,
    vertical_slash,
)


def _gather_pooled(x_BSHD: torch.Tensor, block: int, group, layout: str, layout_block: int) -> torch.Tensor:
    """Global-order pooled blocks ``[B, S/block, H, D]`` from each rank's locally pooled shard."""
    world = dist.get_world_size(group)
    seq = x_BSHD.shape[1] * world
    index = global_token_index(seq, dist.get_rank(group), world, layout, layout_block)
    starts = index.reshape(-1, block)
    # Local blocks must be whole, contiguous global blocks, or pooling here would mix tokens of two blocks.
    if not torch.equal(starts, starts[:, :1] + torch.arange(block)) or bool((starts[:, 0] % block).any()):
        raise ValueError(
            f"pattern block {block} does not fit the {layout} shards (each rank's run of consecutive tokens must be "
            "a multiple of the block); pick a block dividing the shard unit"
        )
    pooled = pool_blocks(x_BSHD, block)
    if world == 1:
        return pooled
    parts = [torch.empty_like(pooled) for _ in range(world)]
    dist.all_gather(parts, pooled.contiguous(), group=group)
    blocks = torch.cat(
        [global_token_index(seq, r, world, layout, layout_block)[::block] // block for r in range(world)]
    )
    out = torch.empty(
        (pooled.shape[0], seq // block, *pooled.shape[2:]), dtype=pooled.dtype, device=pooled.device
    )
    out[:, blocks.to(pooled.device)] = torch.cat(parts, dim=1)
    return out


def _last_queries(
    q_BSHD: torch.Tensor, positions_S: torch.Tensor, seq: int, last: int, group
) -> torch.Tensor:
    """fp64 ``[B, L, Hq, D]``: the last ``L`` queries of the sequence in global order, on every rank.

    ``positions_S`` (CPU int64) are the global positions of this rank's tokens. Each rank writes its own rows
    into a zero buffer, which is all-reduced (SUM) over ``group``: every entry has exactly one nonzero term, so
    the result is an exact copy, and no rank needs to know how many of the last queries the others hold.
    """
    bsz, _, hq, d = q_BSHD.shape
    device = q_BSHD.device
    mine = (positions_S >= seq - last).nonzero().flatten()
    rows = (positions_S[mine] - (seq - last)).to(device)
    q_last_BLHD = torch.zeros(bsz, last, hq, d, dtype=torch.float64, device=device)
    q_last_BLHD[:, rows] = q_BSHD[:, mine.to(device)].double()
    dist.all_reduce(q_last_BLHD, group=group)
    return q_last_BLHD


def _all_reduce_log_normalizer(lse_BHGL: torch.Tensor, group) -> torch.Tensor:
    """fp64 ``[B, Hkv, G, L]``: log of the sum over ``group`` of each rank's softmax denominators ``exp(lse)``.

    All-reduce MAX (exact) for a shift that keeps the exponentials in range, then SUM of the shifted sums.
    """
    peak = lse_BHGL.clone()
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    total = (lse_BHGL - peak).exp()  # every row sees key 0 on some rank, so peak is finite
    dist.all_reduce(total, group=group)
    return peak + total.log()


def _vertical_slash_sharded(
    q_BSHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    block: int,
    group,
    layout: str,
    layout_block: int,
    *,
    last_q: int,
    scale: float | None = None,
    key_chunk: int | None = None,
    **selection,
) -> BlockPattern:
    """:func:`.patterns.vertical_slash` of the whole sequence from this rank's shards of q ``[B, S_local, Hq, D]``
    and k ``[B, S_local, Hkv, D]``, collective over ``group`` (see :func:`_vertical_slash_scores_sharded`)."""
    seq = k_BSHD.shape[1] * dist.get_world_size(group)
    _check_options(seq, block, selection.get("verticals"), selection.get("slashes"), selection.get("mass"))
    vertical_BHS, slash_BHS = _vertical_slash_scores_sharded(
        q_BSHD, k_BSHD, group, layout, layout_block, last_q, scale, key_chunk
    )
    return _vertical_slash_pattern(vertical_BHS.float(), slash_BHS.float(), block, **selection)


def _vertical_slash_scores_sharded(
    q_BSHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    group,
    layout: str,
    layout_block: int,
    last_q: int,
    scale: float | None,
    key_chunk: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 ``[B, Hkv, S]`` column and diagonal-offset scores of the whole sequence's last ``last_q`` queries,
    the same on every rank of ``group``, without gathering k.

    Collective over ``group``: fp64 all-reduces of the last queries ``[B, L, Hq, D]``, of the softmax
    statistics ``[B, Hkv, G, L]`` (MAX, then SUM) and of the two score vectors (SUM).
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    seq = k_BSHD.shape[1] * world
    positions_S = global_token_index(seq, rank, world, layout, layout_block)
    q_last_BLHD = _last_queries(q_BSHD, positions_S, seq, last_q, group)
    q_BHGLD = _grouped_queries(q_last_BLHD, k_BSHD.shape[2], scale)
    chunks = _key_chunks(positions_S, key_chunk or _default_key_chunk(q_BHGLD))
    lse_BHGL = _all_reduce_log_normalizer(_log_normalizer(q_BHGLD, k_BSHD, positions_S, seq, chunks), group)
    vertical_BHS, slash_BHS = _attention_mass(q_BHGLD, k_BSHD, positions_S, seq, lse_BHGL, chunks)
    dist.all_reduce(vertical_BHS, group=group)  # one nonzero term per column: exact
    dist.all_reduce(slash_BHS, group=group)
    return vertical_BHS, slash_BHS


@torch.no_grad()
def estimate_pattern(
    kind: str,
    q_BSHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    group=None,
    *,
    layout: str = "striped",
    layout_block: int = 1,
    block: int,
    **options,
) -> BlockPattern:
    """The global ``kind`` pattern (``block_topk`` or ``vertical_slash``) from this rank's shards of q
    ``[B, S_local, Hq, D]`` and k ``[B, S_local, Hkv, D]`` (any float dtype); collective over the
    context-parallel ``group`` (None: q and k hold whole sequences, nothing is communicated). ``options`` go to
    the estimator (``k``, ``local_blocks``; ``verticals``/``slashes``/``mass``, ``sink_blocks``,
    ``window_blocks``, ``scale``, ``key_chunk``, ``last_q`` …). Every rank returns the same pattern.

    ``block_topk`` all-gathers the pooled blocks (fp32 ``[B, S_local/block, H, D]`` per rank) over ``group``;
    ``vertical_slash`` all-reduces fp64 tensors of ``B·L·Hq·D``, ``B·Hq·L`` and twice ``B·Hkv·S`` elements.
    """
    world = 1 if group is None else dist.get_world_size(group)
    if world == 1:
        layout, layout_block = "contiguous", 1
    if kind == "block_topk":
        if world == 1:
            return block_topk(pool_blocks(q_BSHD, block), pool_blocks(k_BSHD, block), block, **options)
        q_pooled = _gather_pooled(q_BSHD, block, group, layout, layout_block)
        k_pooled = _gather_pooled(k_BSHD, block, group, layout, layout_block)
        return block_topk(q_pooled, k_pooled, block, **options)
    if kind == "vertical_slash":
        last_q = options.pop("last_q", 64)
        if not 0 < last_q <= q_BSHD.shape[1] * world:
            raise ValueError(
                f"last_q={last_q} must be in [1, {q_BSHD.shape[1] * world}] (the sequence length)"
            )
        if world == 1:
            return vertical_slash(q_BSHD[:, -last_q:], k_BSHD, block, **options)
        return _vertical_slash_sharded(
            q_BSHD, k_BSHD, block, group, layout, layout_block, last_q=last_q, **options
        )
    raise ValueError(f"kind={kind!r}: estimated patterns are block_topk and vertical_slash")
