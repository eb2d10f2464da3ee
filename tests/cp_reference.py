"""Shared helpers for context-parallel attention tests: inputs, the fp64 oracle, sharding, errors.

Every context-parallel method (ring, Ulysses, all-gather, hybrid, ...) is checked the same way, against one
single-process reference (DESIGN: each parallel algorithm has one):

1. :func:`make_inputs` draws q/k/v, optional doc ids and an output cotangent for the UNSHARDED sequence;
2. :func:`reference_attention` runs plain masked attention on them in fp64 with autograd. It is written from
   the mask rule directly, not through the kernels it judges;
3. on every rank, :func:`run_sharded` shards the inputs with a layout, runs the method forward and backward
   and returns this rank's ``out, dq, dk, dv`` (a method is any function with the common signature
   ``fn(q, k, v, *, group, q_index_S, causal, doc_ids_BS, window, scale)``);
4. :func:`errors_vs_reference` compares every rank's result with the same shard of the reference
   (:func:`shard_for_rank`) as a max relative error (:func:`max_rel_error`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sparsetron.parallel.context.layouts import global_token_index


@dataclass(frozen=True)
class AttentionInputs:
    """Unsharded inputs: ``q_BSHD [B,S,Hq,D]``, ``k_BSHD``/``v_BSHD [B,S,Hkv,D]``, the output cotangent
    ``dout_BSHD [B,S,Hq,D]`` (all one float dtype) and ``doc_ids_BS`` (int64 ``[B,S]`` or None)."""

    q_BSHD: torch.Tensor
    k_BSHD: torch.Tensor
    v_BSHD: torch.Tensor
    dout_BSHD: torch.Tensor
    doc_ids_BS: torch.Tensor | None = None


@dataclass(frozen=True)
class AttentionResult:
    """Output and gradients (of ``sum(out * dout)``): ``out``/``dq`` ``[B,S,Hq,D]``, ``dk``/``dv``
    ``[B,S,Hkv,D]``; either for the whole sequence (reference) or one rank's shard."""

    out_BSHD: torch.Tensor
    dq_BSHD: torch.Tensor
    dk_BSHD: torch.Tensor
    dv_BSHD: torch.Tensor


def make_inputs(
    batch: int,
    seq_len: int,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    *,
    num_docs: int = 0,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> AttentionInputs:
    """Random unsharded inputs (standard normal, ``dtype``), reproducible from ``seed``.

    ``num_docs > 0`` packs each batch row with that many documents whose boundaries are drawn at random
    (different per row), so documents start and end inside shards and cross rank boundaries (a test that
    relies on it should assert it for its sizes).
    """
    gen = torch.Generator().manual_seed(seed)

    def normal(heads: int) -> torch.Tensor:
        return torch.randn(batch, seq_len, heads, head_dim, generator=gen, dtype=torch.float64).to(dtype)

    q_BSHD, k_BSHD, v_BSHD, dout_BSHD = normal(q_heads), normal(kv_heads), normal(kv_heads), normal(q_heads)
    doc_ids_BS = None
    if num_docs > 0:
        starts_BS = torch.zeros(batch, seq_len, dtype=torch.int64)
        for row in range(batch):
            first_tokens = torch.randperm(seq_len - 1, generator=gen)[: num_docs - 1] + 1
            starts_BS[row, first_tokens] = 1
        doc_ids_BS = starts_BS.cumsum(dim=1)
    return AttentionInputs(q_BSHD, k_BSHD, v_BSHD, dout_BSHD, doc_ids_BS)


def reference_mask(
    seq_len: int, *, causal: bool, doc_ids_BS: torch.Tensor | None = None, window: int | None = None
) -> torch.Tensor:
    """Which unsharded query ``i`` sees key ``j``: bool ``[B or 1, S, S]``.

    Same rule as :func:`sparsetron.kernels.attention_ref.visible_mask`: ``j <= i`` if causal, same document,
    and ``i - j < window`` if a window is given.
    """
    i = torch.arange(seq_len)[:, None]
    j = torch.arange(seq_len)[None, :]
    allowed_QK = torch.ones(seq_len, seq_len, dtype=torch.bool)
    if causal:
        allowed_QK &= j <= i
    if window is not None:
        allowed_QK &= i - j < window
    allowed_BQK = allowed_QK[None]
    if doc_ids_BS is not None:
        allowed_BQK = allowed_BQK & (doc_ids_BS[:, :, None] == doc_ids_BS[:, None, :])
    return allowed_BQK


def reference_attention(
    inputs: AttentionInputs, *, causal: bool = True, window: int | None = None, scale: float | None = None
) -> AttentionResult:
    """Masked attention on the unsharded inputs in fp64 with autograd: out and the gradients of
    ``sum(out * dout)``, all fp64. Doc masking applies when ``inputs.doc_ids_BS`` is set; ``scale`` defaults to
    ``1/sqrt(D)``; a query that sees no key gets out = 0 (as the kernels define it)."""
    q_BSHD, k_BSHD, v_BSHD = (
        t.detach().to(torch.float64).requires_grad_() for t in (inputs.q_BSHD, inputs.k_BSHD, inputs.v_BSHD)
    )
    _, seq_len, q_heads, head_dim = q_BSHD.shape
    scale = head_dim**-0.5 if scale is None else scale
    # GQA: query head h reads KV head h // (Hq / Hkv).
    k_rep_BSHD = k_BSHD.repeat_interleave(q_heads // k_BSHD.shape[2], dim=2)
    v_rep_BSHD = v_BSHD.repeat_interleave(q_heads // v_BSHD.shape[2], dim=2)
    allowed_BQK = reference_mask(seq_len, causal=causal, doc_ids_BS=inputs.doc_ids_BS, window=window)
    allowed_B1QK = allowed_BQK[:, None]
    scores_BHQK = torch.einsum("bqhd,bkhd->bhqk", q_BSHD, k_rep_BSHD) * scale
    # Fully masked rows would softmax to NaN; give them finite scores and zero their probabilities after.
    has_key_B1Q1 = allowed_B1QK.any(dim=-1, keepdim=True)
    scores_BHQK = scores_BHQK.masked_fill(~allowed_B1QK & has_key_B1Q1, float("-inf"))
    probs_BHQK = torch.softmax(scores_BHQK, dim=-1) * allowed_B1QK
    out_BSHD = torch.einsum("bhqk,bkhd->bqhd", probs_BHQK, v_rep_BSHD)
    out_BSHD.backward(inputs.dout_BSHD.to(torch.float64))
    return AttentionResult(out_BSHD.detach(), q_BSHD.grad, k_BSHD.grad, v_BSHD.grad)


def shard_for_rank(
    x: torch.Tensor, rank: int, world: int, layout: str, block: int = 1, dim: int = 1
) -> torch.Tensor:
    """The tokens of ``x`` (sequence along ``dim``) that ``rank`` of ``world`` holds under ``layout``.

    Raises the layouts' ``ShardingError`` when the sequence does not split evenly.
    """
    index = global_token_index(x.shape[dim], rank, world, layout, block)
    return x.index_select(dim, index.to(x.device))


def run_sharded(
    attention_fn,
    inputs: AttentionInputs,
    *,
    group=None,
    layout: str,
    block: int = 1,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
) -> AttentionResult:
    """Run a context-parallel method on this rank's shard of ``inputs`` and back-propagate this rank's shard
    of ``dout``; returns this rank's ``out, dq, dk, dv`` in the input dtype. Every rank of ``group`` (None: the
    world) must call it; the method communicates over ``group``."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    seq_len = inputs.q_BSHD.shape[1]

    def shard(x: torch.Tensor) -> torch.Tensor:
        return shard_for_rank(x, rank, world, layout, block)

    q_BSHD, k_BSHD, v_BSHD = (
        shard(t).requires_grad_() for t in (inputs.q_BSHD, inputs.k_BSHD, inputs.v_BSHD)
    )
    doc_ids_BS = None if inputs.doc_ids_BS is None else shard(inputs.doc_ids_BS)
    out_BSHD = attention_fn(
        q_BSHD,
        k_BSHD,
        v_BSHD,
        group=group,
        q_index_S=global_token_index(seq_len, rank, world, layout, block),
        causal=causal,
        doc_ids_BS=doc_ids_BS,
        window=window,
        scale=scale,
    )
    # A non-contiguous cotangent, as real graphs produce: collective gradients have gone wrong on those before
    # (ENVIRONMENT.md §1).
    dout_BHSD = shard(inputs.dout_BSHD).transpose(1, 2).contiguous()
    out_BSHD.backward(dout_BHSD.transpose(1, 2))
    return AttentionResult(out_BSHD.detach(), q_BSHD.grad, k_BSHD.grad, v_BSHD.grad)


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual - expected| / max|expected|`` in fp64 (the absolute error when ``expected`` is all zero)."""
    diff = (actual.to(torch.float64) - expected.to(torch.float64)).abs().max().item()
    norm = expected.to(torch.float64).abs().max().item()
    return diff / norm if norm > 0 else diff


def errors_vs_reference(
    per_rank: list[AttentionResult], reference: AttentionResult, *, layout: str, block: int = 1
) -> dict[str, float]:
    """Worst relative error over ranks of each field (``out``, ``dq``, ``dk``, ``dv``): rank r's result is
    compared with rank r's shard of the unsharded ``reference``."""
    world = len(per_rank)
    errors: dict[str, float] = {}
    for field in dataclasses.fields(AttentionResult):
        name = field.name.removesuffix("_BSHD")
        errors[name] = max(
            max_rel_error(
                getattr(result, field.name),
                shard_for_rank(getattr(reference, field.name), rank, world, layout, block),
            )
            for rank, result in enumerate(per_rank)
        )
    return errors


# -- the case matrix shared by every method's tests -------------------------------------------------------

LAYOUT_BLOCK = {"contiguous": 1, "zigzag": 1, "striped": 2}
MASKS = {
    "causal": {"causal": True},
    "causal+docs": {"causal": True, "num_docs": 3},
    "causal+window": {"causal": True, "window": 6},
    "non-causal": {"causal": False},
}
HEADS = {"mha8/8": (8, 8), "gqa8/2": (8, 2), "mqa8/1": (8, 1)}
# S = 32 splits under every layout up to W = 8 (zigzag needs 2W | S, striped W·block | S).
BATCH, SEQ, HEAD_DIM = 2, 32, 8
TOLERANCE = 1e-5


def problem(mask: str, heads: str, *, dtype=torch.float32, seed: int = 0):
    """The unsharded inputs of one case (mask and heads named in MASKS / HEADS) and their fp64 reference."""
    q_heads, kv_heads = HEADS[heads]
    mask_kwargs = dict(MASKS[mask])
    inputs = make_inputs(
        BATCH,
        SEQ,
        q_heads,
        kv_heads,
        HEAD_DIM,
        num_docs=mask_kwargs.pop("num_docs", 0),
        dtype=dtype,
        seed=seed,
    )
    return inputs, reference_attention(inputs, **mask_kwargs), mask_kwargs
