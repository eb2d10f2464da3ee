"""Block-sparse attention patterns as block work lists: which key blocks each query block attends to.

A pattern is a :class:`BlockPattern`: for every (batch, KV head, query block) the set of active key blocks, as a
boolean bitmap ``active_BHQK`` ``[B, Hkv, Sq/block, Sk/block]`` (query heads of a group share their KV head's
pattern, as in GQA kernels), plus optional individual key columns ("bars") ``bars_BHS`` ``[B, Hkv, Sk]`` that
every query at or after them attends to. :meth:`BlockPattern.lists` gives the sorted per-row key-block lists
(CSR) a kernel or a ring planner walks; :meth:`BlockPattern.token_mask` expands the pattern to the token mask
the reference attention (``sparsetron.kernels.attention_ref``) takes, causal masking included.

Patterns:

* static: :func:`sliding_window_sinks` (local window plus the first blocks), :func:`strided` (per-head
  strided shards, S2-attention), :func:`from_block_mask` (any user bitmap);
* :func:`block_topk` (MoBA / NSA style): each query block keeps the ``k`` key blocks whose mean-pooled keys score
  highest against its mean-pooled queries, plus its local blocks;
* :func:`vertical_slash` (MInference / MTraining): from the attention of the last ``last_q`` queries, the key
  columns (verticals) and diagonals (slashes) carrying the most mass, within a fixed budget or until a
  cumulative mass threshold is reached; sinks and the local window are always kept.

Estimation is done under ``torch.no_grad`` (the pattern is a constant for the gradients) in fp32 with ties
broken by index, so it is deterministic. Under context parallelism every rank estimates from the same global,
gathered inputs (pooled blocks and the last queries are small), so every layout computes the same pattern.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockPattern:
    """Active key blocks per (batch, KV head, query block), plus optional vertical key columns.

    ``active_BHQK`` bool ``[B, Hkv, nQ, nK]``; ``bars_BHS`` bool ``[B, Hkv, Sk]`` or None; ``block`` tokens per
    block; ``causal``: the pattern lives under a causal mask (key blocks after the query block are never active).
    """

    active_BHQK: torch.Tensor
    block: int
    causal: bool = True
    bars_BHS: torch.Tensor | None = None

    def density(self) -> float:
        """Active blocks over the blocks dense attention computes (the causal triangle when causal)."""
        n_q, n_k = self.active_BHQK.shape[-2:]
        per_head = int(_causal_blocks(n_q, n_k, "cpu").sum()) if self.causal else n_q * n_k
        return float(self.active_BHQK.sum()) / (
            per_head * self.active_BHQK.shape[0] * self.active_BHQK.shape[1]
        )

    def lists(self) -> tuple[torch.Tensor, torch.Tensor]:
        """CSR of the active blocks: ``offsets`` int64 ``[B·Hkv·nQ + 1]`` and ``key_blocks`` int64, sorted per row."""
        flat = self.active_BHQK.reshape(-1, self.active_BHQK.shape[-1])
        counts = flat.sum(dim=1)
        offsets = torch.zeros(flat.shape[0] + 1, dtype=torch.int64, device=flat.device)
        offsets[1:] = torch.cumsum(counts, 0)
        return offsets, flat.nonzero()[:, 1]  # nonzero is row-major: sorted within each row

    def token_mask(self, heads_per_group: int = 1) -> torch.Tensor:
        """bool ``[B, Hq, Sq, Sk]``: the pattern (and the causal mask) per token, query heads expanded."""
        b = self.block
        mask = self.active_BHQK.repeat_interleave(b, dim=2).repeat_interleave(b, dim=3)
        if self.bars_BHS is not None:
            mask = mask | self.bars_BHS[:, :, None, :]
        if self.causal:
            sq, sk = mask.shape[-2:]
            mask = mask & torch.ones(sq, sk, dtype=torch.bool, device=mask.device).tril()
        return mask.repeat_interleave(heads_per_group, dim=1)


def _causal_blocks(n_q: int, n_k: int, device) -> torch.Tensor:
    """bool ``[nQ, nK]``: key blocks at or before each query block."""
    return torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril()


def _blocks(seq: int, block: int, what: str) -> int:
    if block < 1 or seq % block:
        raise ValueError(
            f"{what} length {seq} must be a multiple of the block size {block} (pad the sequence)"
        )
    return seq // block


def sliding_window_sinks(
    batch: int, kv_heads: int, seq: int, block: int, *, window_blocks: int, sink_blocks: int = 1, device=None
) -> BlockPattern:
    """Causal: each query block sees its ``window_blocks`` most recent key blocks (itself included) and the first
    ``sink_blocks`` (attention sinks)."""
    n = _blocks(seq, block, "sequence")
    q = torch.arange(n, device=device)[:, None]
    k = torch.arange(n, device=device)[None, :]
    active = (k <= q) & ((q - k < window_blocks) | (k < sink_blocks))
    return BlockPattern(active.expand(batch, kv_heads, n, n).clone(), block)


def strided(
    batch: int, kv_heads: int, seq: int, block: int, *, stride: int, local_blocks: int = 1, device=None
) -> BlockPattern:
    """Causal per-head strided shards (S2-attention): KV head ``h`` sees key blocks ``k ≡ h (mod stride)`` plus
    its ``local_blocks`` most recent blocks, so the heads together cover every block."""
    n = _blocks(seq, block, "sequence")
    q = torch.arange(n, device=device)[None, :, None]
    k = torch.arange(n, device=device)[None, None, :]
    h = torch.arange(kv_heads, device=device)[:, None, None]
    active = (k <= q) & (((k - h) % stride == 0) | (q - k < local_blocks))
    return BlockPattern(active.expand(batch, kv_heads, n, n).clone(), block)


def from_block_mask(active_BHQK: torch.Tensor, block: int, *, causal: bool = True) -> BlockPattern:
    """A user's bitmap ``[B, Hkv, nQ, nK]`` (causal: blocks after the diagonal are dropped)."""
    if active_BHQK.dim() != 4 or active_BHQK.dtype != torch.bool:
        raise ValueError(
            f"block mask must be bool [B, Hkv, nQ, nK], got {active_BHQK.dtype} {tuple(active_BHQK.shape)}"
        )
    active = active_BHQK
    if causal:
        active = active & _causal_blocks(*active.shape[-2:], active.device)
    return BlockPattern(active.clone(), block, causal)


def pool_blocks(x_BSHD: torch.Tensor, block: int) -> torch.Tensor:
    """fp32 ``[B, S/block, H, D]`` mean of each block of ``x`` (what :func:`block_topk` scores with).

    Blocks are pooled locally, so under context parallelism each rank pools its own shard's blocks and the
    gathered result is identical to pooling the whole sequence.
    """
    b, s, h, d = x_BSHD.shape
    return x_BSHD.float().reshape(b, _blocks(s, block, "sequence"), block, h, d).mean(dim=2)


def _top_by_score(score: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """bool like ``score``: per row the ``k`` highest allowed entries, ties broken by the lower index."""
    n = score.shape[-1]
    # Deterministic: order by (score desc, index asc) with a stable sort, never by topk's tie order.
    keyed = torch.where(allowed, score, torch.full_like(score, float("-inf")))
    order = torch.sort(keyed, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(n, device=score.device).expand_as(order))
    return (rank < k) & allowed


@torch.no_grad()
def block_topk(
    q_pooled_BNHD: torch.Tensor, k_pooled_BNHD: torch.Tensor, block: int, *, k: int, local_blocks: int = 1
) -> BlockPattern:
    """Causal MoBA/NSA-style pattern from pooled queries ``[B, nQ, Hq, D]`` and keys ``[B, nK, Hkv, D]``.

    Scores are ``q̄·k̄`` summed over the query heads of each KV group; each query block keeps its
    ``local_blocks`` most recent key blocks and the ``k`` best-scoring earlier ones.
    """
    bsz, n_q, hq, d = q_pooled_BNHD.shape
    hkv, n_k = k_pooled_BNHD.shape[2], k_pooled_BNHD.shape[1]
    group = hq // hkv
    q = q_pooled_BNHD.float().reshape(bsz, n_q, hkv, group, d)
    score = torch.einsum("bqhgd,bkhd->bhqk", q, k_pooled_BNHD.float())
    qi = torch.arange(n_q, device=score.device)[:, None]
    ki = torch.arange(n_k, device=score.device)[None, :]
    local = (ki <= qi) & (qi - ki < local_blocks)
    earlier = ki <= qi - local_blocks
    chosen = _top_by_score(score, earlier.expand_as(score), k)
    return BlockPattern(chosen | local, block)


@torch.no_grad()
def vertical_slash(
    q_last_BLHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    block: int,
    *,
    verticals: int | None = None,
    slashes: int | None = None,
    mass: float | None = None,
    sink_blocks: int = 1,
    window_blocks: int = 1,
    scale: float | None = None,
) -> BlockPattern:
    """MInference's vertical-slash pattern, estimated from the last ``L`` queries ``[B, L, Hq, D]`` (the final
    positions of the sequence) against all keys ``[B, S, Hkv, D]``.

    The causal attention of those queries, averaged over each KV group's query heads, scores every key column
    (vertical: summed over the queries) and every diagonal offset ``i − j`` (slash). Either fixed budgets
    (``verticals`` columns, ``slashes`` diagonals) or ``mass``: the fewest columns and diagonals whose scores
    reach that share of the total each. Verticals become bars (whole key columns); a slash at offset ``o``
    activates, for every query block, the key blocks holding positions ``i − o``. Sinks and the local window
    are always active.
    """
    if (mass is None) == (verticals is None or slashes is None):
        raise ValueError("pass either verticals= and slashes= (budgets) or mass= (a share in (0, 1])")
    bsz, last, hq, d = q_last_BLHD.shape
    seq, hkv = k_BSHD.shape[1], k_BSHD.shape[2]
    n = _blocks(seq, block, "sequence")
    group = hq // hkv
    scale = scale if scale is not None else d**-0.5
    q = q_last_BLHD.float().reshape(bsz, last, hkv, group, d)
    logits = torch.einsum("blhgd,bshd->bhgls", q, k_BSHD.float()) * scale
    positions = torch.arange(seq - last, seq, device=k_BSHD.device)[:, None]
    keys = torch.arange(seq, device=k_BSHD.device)[None, :]
    logits = logits.masked_fill(keys > positions, float("-inf"))
    probs = logits.softmax(dim=-1).mean(dim=2)  # [B, Hkv, L, S]: a group shares its KV head's pattern
    vertical_score = probs.sum(dim=2)  # per key column
    offsets = (positions - keys).clamp(min=0)  # diagonal offset of each (query, key)
    slash_score = torch.zeros(bsz, hkv, seq, device=probs.device).scatter_add_(
        2, offsets.expand(bsz, hkv, last, seq).reshape(bsz, hkv, -1), probs.reshape(bsz, hkv, -1)
    )
    if mass is not None:
        vertical_mask = _smallest_share(vertical_score, mass)
        slash_mask = _smallest_share(slash_score, mass)
    else:
        everything = torch.ones_like(vertical_score, dtype=torch.bool)
        vertical_mask = _top_by_score(vertical_score, everything, verticals)
        slash_mask = _top_by_score(slash_score, everything, slashes)
    qb = torch.arange(n, device=probs.device)
    kb = torch.arange(n, device=probs.device)
    base = (kb[None, :] <= qb[:, None]) & (
        (qb[:, None] - kb[None, :] < window_blocks) | (kb[None, :] < sink_blocks)
    )
    active = base.expand(bsz, hkv, n, n).clone()
    # A slash at offset o touches, from query block qb (positions qb·B … qb·B+B−1), key positions i − o, i.e.
    # key blocks floor((qb·B − o)/B) … floor((qb·B + B − 1 − o)/B): at most two per query block.
    b_idx, h_idx, o_idx = slash_mask.nonzero(as_tuple=True)
    for first in (0, block - 1):
        key_pos = qb[None, :] * block + first - o_idx[:, None]
        valid = key_pos >= 0
        key_block = key_pos.clamp(min=0) // block
        rows = torch.nonzero(valid, as_tuple=True)
        active[b_idx[rows[0]], h_idx[rows[0]], qb[rows[1]], key_block[rows]] = True
    active &= _causal_blocks(n, n, active.device)
    return BlockPattern(active, block, bars_BHS=vertical_mask)


def _smallest_share(score: torch.Tensor, share: float) -> torch.Tensor:
    """bool like ``score`` ``[..., N]``: the fewest highest entries whose sum reaches ``share`` of the row's sum."""
    if not 0 < share <= 1:
        raise ValueError(f"mass={share} must be in (0, 1]")
    order = torch.sort(score, dim=-1, descending=True, stable=True)
    cumulative = order.values.cumsum(dim=-1)
    total = cumulative[..., -1:]
    # Keep an entry while the mass before it is still short of the target.
    keep_sorted = (cumulative - order.values) < share * total
    keep = torch.zeros_like(keep_sorted)
    keep.scatter_(-1, order.indices, keep_sorted)
    return keep
