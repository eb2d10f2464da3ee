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

Estimation is done under ``torch.no_grad`` (the pattern is a constant for the gradients) with ties broken by
index, so it is deterministic: block top-k in fp32; vertical-slash scores keys in chunks, accumulating in fp64
and rounding to fp32, so that the order of its sums (chunks, context-parallel ranks) does not show. Under
context parallelism (:mod:`.pattern_estimation`) block top-k runs on the gathered pooled blocks and
vertical-slash on each rank's own keys, its scores summed over the ranks; every layout gets the same pattern.
On CUDA the two vertical-slash passes run fused (:mod:`sparsetron.kernels.attention_mass`: scores, softmax
statistics and the group mean in one kernel, fp32 probabilities out) and only the sums over them stay in fp64
torch; each score is computed by the same instructions on every rank and layout, so that argument holds there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsetron.kernels import attention_mass


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


#: fp64 scores of one key chunk, ``B·Hq·L·N`` elements. On a GPU 512 MiB (the bytes of 2^27 fp32 logits): few,
#: large kernels (on an H200 at S = 512K, 2^24 took 9% and 2^22 86% longer). On a CPU 4 MiB: chunks that stay
#: in cache (3x faster than 2^26 at S = 64K).
_CHUNK_ELEMENTS = 2**26
_CPU_CHUNK_ELEMENTS = 2**19


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
    key_chunk: int | None = None,
) -> BlockPattern:
    """MInference's vertical-slash pattern, estimated from the last ``L`` queries ``[B, L, Hq, D]`` (the final
    positions of the sequence) against all keys ``[B, S, Hkv, D]``.

    The causal attention of those queries, averaged over each KV group's query heads, scores every key column
    (vertical: summed over the queries) and every diagonal offset ``i − j`` (slash). Either fixed budgets
    (``verticals`` columns, ``slashes`` diagonals) or ``mass``: the fewest columns and diagonals whose scores
    reach that share of the total each. Verticals become bars (whole key columns); a slash at offset ``o``
    activates, for every query block, the key blocks holding positions ``i − o``. Sinks and the local window
    are always active.

    Keys are scored ``key_chunk`` at a time (default: ``2^26 / (B·Hq·L)`` on a GPU, 512 MiB of fp64 scores;
    ``2^19 / (B·Hq·L)`` on a CPU), so memory stays bounded at any ``S``; scores are accumulated in fp64 and
    rounded to fp32 before selection.
    """
    _check_options(k_BSHD.shape[1], block, verticals, slashes, mass)
    vertical_BHS, slash_BHS = _vertical_slash_scores(q_last_BLHD, k_BSHD, scale, key_chunk)
    return _vertical_slash_pattern(
        vertical_BHS.float(),
        slash_BHS.float(),
        block,
        verticals=verticals,
        slashes=slashes,
        mass=mass,
        sink_blocks=sink_blocks,
        window_blocks=window_blocks,
    )


def _vertical_slash_scores(
    q_last_BLHD: torch.Tensor, k_BSHD: torch.Tensor, scale: float | None, key_chunk: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 ``[B, Hkv, S]`` column scores and diagonal-offset scores of the last queries ``[B, L, Hq, D]``
    against the whole sequence's keys ``[B, S, Hkv, D]``: two passes over the key chunks (softmax
    denominators, then the normalized attention), never more than one chunk of scores in memory."""
    seq = k_BSHD.shape[1]
    positions_S = torch.arange(seq)
    q_BHGLD = _grouped_queries(q_last_BLHD, k_BSHD.shape[2], scale)
    chunks = _key_chunks(positions_S, key_chunk or _default_key_chunk(q_BHGLD))
    lse_BHGL = _log_normalizer(q_BHGLD, k_BSHD, positions_S, seq, chunks)
    return _attention_mass(q_BHGLD, k_BSHD, positions_S, seq, lse_BHGL, chunks)


def _check_options(
    seq: int, block: int, verticals: int | None, slashes: int | None, mass: float | None
) -> None:
    """Raise before any scoring unless ``block`` divides ``seq`` and exactly one selection rule is given:
    budgets (``verticals`` and ``slashes``) or ``mass``."""
    _blocks(seq, block, "sequence")
    if (mass is None) == (verticals is None or slashes is None):
        raise ValueError("pass either verticals= and slashes= (budgets) or mass= (a share in (0, 1])")
    if mass is not None and not 0 < mass <= 1:
        raise ValueError(f"mass={mass} must be in (0, 1]")


def _grouped_queries(q_last_BLHD: torch.Tensor, kv_heads: int, scale: float | None) -> torch.Tensor:
    """fp64 ``[B, Hkv, G, L, D]``: the queries times the softmax scale, query heads grouped by KV head."""
    bsz, last, hq, d = q_last_BLHD.shape
    scale = scale if scale is not None else d**-0.5
    q = q_last_BLHD.double().reshape(bsz, last, kv_heads, hq // kv_heads, d).permute(0, 2, 3, 1, 4)
    return (q * scale).contiguous()


def _default_key_chunk(q_BHGLD: torch.Tensor) -> int:
    """Keys per chunk that keep one chunk's fp64 scores ``[B, Hkv, G, L, N]`` at the device's element budget."""
    bsz, hkv, group, last, _ = q_BHGLD.shape
    elements = _CPU_CHUNK_ELEMENTS if q_BHGLD.device.type == "cpu" else _CHUNK_ELEMENTS
    return max(1, elements // (bsz * hkv * group * last))


def _key_chunks(positions_S: torch.Tensor, key_chunk: int) -> list[tuple[int, int]]:
    """Local ranges ``[start, stop)`` of keys whose global positions (int64 ``[S_local]``, CPU, increasing) fall
    in one window of ``key_chunk`` positions: at most ``key_chunk`` keys spanning at most ``key_chunk``
    positions, which bounds both the score chunk and the diagonal buffer of :func:`_diagonal_sums`."""
    _, counts = torch.unique_consecutive(positions_S // key_chunk, return_counts=True)
    stops = counts.cumsum(0).tolist()
    return list(zip([0, *stops[:-1]], stops, strict=True))


def _chunk_logits(
    q_BHGLD: torch.Tensor, k_BNHD: torch.Tensor, positions_N: torch.Tensor, seq: int
) -> torch.Tensor:
    """fp64 ``[B, Hkv, G, L, N]`` scaled logits of the last ``L`` queries of a length-``seq`` sequence against
    keys ``[B, N, Hkv, D]`` at global positions ``positions_N`` (CPU int64), −inf where causality masks them."""
    group, last = q_BHGLD.shape[2:4]
    # One [G·L, D] × [D, N] product per KV head, so k is never repeated over the group.
    logits = (q_BHGLD.flatten(2, 3) @ k_BNHD.double().permute(0, 2, 3, 1)).unflatten(2, (group, last))
    if int(positions_N[-1]) > seq - last:  # only keys among the last L positions can follow a query
        keys = positions_N.to(logits.device)[None, :]
        queries = torch.arange(seq - last, seq, device=logits.device)[:, None]
        logits.masked_fill_(keys > queries, float("-inf"))
    return logits


def _fused(q_BHGLD: torch.Tensor, k_BSHD: torch.Tensor) -> bool:
    """Whether the scores go through the fused Triton passes (:mod:`sparsetron.kernels.attention_mass`): on
    CUDA when they can run; the CPU keeps the fp64 torch path (the reference they are tested against)."""
    return k_BSHD.is_cuda and attention_mass.unsupported_reason(q_BHGLD, k_BSHD) is None


def _log_normalizer(
    q_BHGLD: torch.Tensor,
    k_BSHD: torch.Tensor,
    positions_S: torch.Tensor,
    seq: int,
    chunks: list[tuple[int, int]],
) -> torch.Tensor:
    """fp64 ``[B, Hkv, G, L]``: log of each query's softmax denominator over the keys ``[B, S_local, Hkv, D]``
    at ``positions_S`` (−inf for a query that sees none of them), accumulated over key chunks."""
    if _fused(q_BHGLD, k_BSHD):
        return attention_mass.log_normalizer(q_BHGLD, k_BSHD, positions_S, seq)
    lse = torch.full(q_BHGLD.shape[:4], float("-inf"), dtype=torch.float64, device=q_BHGLD.device)
    for start, stop in chunks:
        logits = _chunk_logits(q_BHGLD, k_BSHD[:, start:stop], positions_S[start:stop], seq)
        lse = torch.logaddexp(lse, logits.logsumexp(dim=-1))
    return lse


def _attention_mass(
    q_BHGLD: torch.Tensor,
    k_BSHD: torch.Tensor,
    positions_S: torch.Tensor,
    seq: int,
    lse_BHGL: torch.Tensor,
    chunks: list[tuple[int, int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention of the last queries on the keys ``[B, S_local, Hkv, D]`` at ``positions_S``, normalized
    by the global ``lse_BHGL`` and averaged over each group's query heads, summed per key column (vertical)
    and per diagonal offset ``o = i − j`` (slash): fp64 ``[B, Hkv, seq]`` each, indexed by global position and
    by offset, zero where these keys contribute nothing (other ranks' columns)."""
    bsz, hkv, _, last, _ = q_BHGLD.shape
    device = q_BHGLD.device
    positions_on_device = positions_S.to(device)  # once, not a host-to-device copy per chunk
    vertical = torch.zeros(bsz, hkv, seq, dtype=torch.float64, device=device)
    # Indexed by r = j + (L − 1 − l) = seq − 1 − o; r ≥ seq are masked pairs (o < 0), whose mass is zero.
    reversed_slash = torch.zeros(bsz, hkv, seq + last - 1, dtype=torch.float64, device=device)
    fused = _fused(q_BHGLD, k_BSHD)
    if fused:  # every local key at once, fp32 and averaged over the group: 1/(2G) of the chunked scores
        probs_all = attention_mass.attention_probabilities(q_BHGLD, k_BSHD, positions_S, seq, lse_BHGL)
    for start, stop in chunks:
        if fused:
            probs_BHLN = probs_all[..., start:stop].double()
        else:
            logits = _chunk_logits(q_BHGLD, k_BSHD[:, start:stop], positions_S[start:stop], seq)
            probs_BHLN = logits.sub_(lse_BHGL[..., None]).exp_().mean(dim=2)
        positions_N = positions_on_device[start:stop]
        vertical.index_copy_(2, positions_N, probs_BHLN.sum(dim=2))
        first, span = int(positions_S[start]), int(positions_S[stop - 1] - positions_S[start]) + 1
        diagonals = _diagonal_sums(probs_BHLN, positions_N - first, span)
        reversed_slash[..., first : first + diagonals.shape[-1]] += diagonals
    return vertical, reversed_slash[..., :seq].flip(-1)


def _diagonal_sums(probs_BHLN: torch.Tensor, offsets_N: torch.Tensor, span: int) -> torch.Tensor:
    """``[B, H, span + L − 1]`` (``probs``' dtype): entry ``t`` sums ``probs[..., l, c]`` over
    ``(L − 1 − l) + offsets_N[c] = t``, where ``offsets_N`` (int64 on ``probs``' device, increasing from 0 to
    ``span − 1``) place the keys.

    Skew instead of a scatter-add (whose atomics all collide on a few offsets on a GPU): row ``l`` is copied
    into a zeroed ``[L, width]`` buffer shifted right by ``L − 1 − l``, written through a view of row stride
    ``width − 1``, so that each diagonal becomes a column and one sum over the rows gives all of them.
    """
    bsz, heads, last, _ = probs_BHLN.shape
    width = span + last  # the view's row stride width − 1 ≥ span: shifted rows never overlap
    buffer = probs_BHLN.new_zeros(bsz, heads, last * width)
    shifted = buffer.as_strided(
        (bsz, heads, last, span), (heads * last * width, last * width, width - 1, 1), last - 1
    )
    if span == probs_BHLN.shape[-1]:  # consecutive positions (contiguous and zigzag shards): a plain copy
        shifted.copy_(probs_BHLN)
    else:
        shifted.index_copy_(3, offsets_N, probs_BHLN)
    return buffer.view(bsz, heads, last, width).sum(dim=2)[..., : span + last - 1]


def _vertical_slash_pattern(
    vertical_BHS: torch.Tensor,
    slash_BHS: torch.Tensor,
    block: int,
    *,
    verticals: int | None = None,
    slashes: int | None = None,
    mass: float | None = None,
    sink_blocks: int = 1,
    window_blocks: int = 1,
) -> BlockPattern:
    """The pattern from fp32 column scores and diagonal-offset scores ``[B, Hkv, S]`` (see :func:`vertical_slash`
    for the selection rules); ties are broken by the lower index."""
    seq = vertical_BHS.shape[-1]
    n = _blocks(seq, block, "sequence")
    if mass is not None:
        vertical_mask = _smallest_share(vertical_BHS, mass)
        slash_mask = _smallest_share(slash_BHS, mass)
    else:
        everything = torch.ones_like(vertical_BHS, dtype=torch.bool)
        vertical_mask = _top_by_score(vertical_BHS, everything, verticals)
        slash_mask = _top_by_score(slash_BHS, everything, slashes)
    qb = torch.arange(n, device=vertical_BHS.device)[:, None]
    kb = torch.arange(n, device=vertical_BHS.device)[None, :]
    base = (kb <= qb) & ((qb - kb < window_blocks) | (kb < sink_blocks))
    diagonals = _slash_block_diagonals(slash_mask, block)
    slashed = diagonals[:, :, (qb - kb).clamp(min=0)] & (kb <= qb)
    return BlockPattern(base | slashed, block, bars_BHS=vertical_mask)


def _slash_block_diagonals(slash_mask_BHS: torch.Tensor, block: int) -> torch.Tensor:
    """bool ``[B, Hkv, S/block]``: the block diagonals ``d = qb − kb`` the selected slashes touch.

    A slash at offset ``o = a·block + r`` maps query block ``qb`` (positions ``qb·block … qb·block + block − 1``)
    to key positions ``i − o``, i.e. key blocks ``qb − a`` and, when ``r > 0``, ``qb − a − 1``.
    """
    bsz, hkv, seq = slash_mask_BHS.shape
    by_block = slash_mask_BHS.reshape(bsz, hkv, seq // block, block)
    diagonals = by_block.any(dim=-1)
    diagonals[..., 1:] |= by_block[..., :-1, 1:].any(dim=-1)
    return diagonals


def _smallest_share(score: torch.Tensor, share: float) -> torch.Tensor:
    """bool like ``score`` ``[..., N]``: the fewest highest entries whose sum reaches ``share`` of the row's sum."""
    order = torch.sort(score, dim=-1, descending=True, stable=True)
    cumulative = order.values.cumsum(dim=-1)
    total = cumulative[..., -1:]
    # Keep an entry while the mass before it is still short of the target.
    keep_sorted = (cumulative - order.values) < share * total
    keep = torch.zeros_like(keep_sorted)
    keep.scatter_(-1, order.indices, keep_sorted)
    return keep
