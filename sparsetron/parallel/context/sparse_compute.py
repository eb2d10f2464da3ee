"""One rank's share of a sparse ring step: attention of its query blocks to the key blocks the step brought.

The rings (:mod:`.sparse_ring`, :mod:`.sparse_hier`) decide what moves where; :class:`StepAttention` does the
local math for each step, through one of two backends:

* ``triton``: the block-sparse flash-attention kernels of :mod:`sparsetron.kernels.block_sparse` over the
  step's work lists (bars included); the forward merges each step into the running fp32 ``(out, lse)`` in
  place; the backward adds into an fp32 ``dq`` and writes the received blocks' ``dk``/``dv``.
* ``reference``: masked fp32 attention per KV head (:mod:`sparsetron.kernels.attention_ref`), exact, on any
  device and dtype; the CPU path and the oracle the kernel is tested against.

``auto`` picks ``triton`` for CUDA tensors the kernel takes, else ``reference``.
"""

from __future__ import annotations

import torch

from sparsetron.kernels import block_sparse
from sparsetron.kernels.attention_ref import attention_backward_ref, attention_forward_ref, merge_partials
from sparsetron.parallel.context.patterns import BlockPattern

BACKENDS = ("auto", "triton", "reference")


def token_index(blocks: torch.Tensor, block: int) -> torch.Tensor:
    """Token positions ``[len(blocks)·block]`` covered by ``blocks`` (any block ids, in the given order)."""
    return (blocks[:, None] * block + torch.arange(block, device=blocks.device)[None, :]).reshape(-1)


def resolve_backend(backend: str, q_BSHD: torch.Tensor, block: int) -> str:
    """The backend that will run (``triton`` or ``reference``) for ``backend`` on these inputs."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    reason = block_sparse.unsupported_reason(q_BSHD, block)
    if backend == "auto":
        return "triton" if q_BSHD.is_cuda and reason is None else "reference"
    if backend == "triton" and reason is not None:
        raise ValueError(
            f"backend='triton' cannot run these inputs: {reason}; use backend='auto' (falls back to the "
            "reference) or backend='reference'"
        )
    return backend


def _mask(
    pattern: BlockPattern, batch: int, kv_head: int, q_blocks: torch.Tensor, k_blocks: torch.Tensor
) -> torch.Tensor:
    """bool ``[B, Sq, Sk]``: which of the tokens of ``q_blocks`` see which of ``k_blocks`` for one KV head."""
    b = pattern.block
    active = pattern.active_BHQK[:, kv_head][:, q_blocks][:, :, k_blocks]
    mask = active.repeat_interleave(b, dim=1).repeat_interleave(b, dim=2)
    q_pos, k_pos = token_index(q_blocks, b), token_index(k_blocks, b)
    if pattern.bars_BHS is not None:
        mask = mask | pattern.bars_BHS[:, kv_head, k_pos][:, None, :]
    if pattern.causal:
        mask = mask & (k_pos[None, :] <= q_pos[:, None])[None]
    return mask.expand(batch, -1, -1)


class StepAttention:
    """The attention of a rank's query blocks ``my_q`` (int64 global ids, the order q holds them) to the key
    blocks of each ring step, within ``pattern``; local to the device (no communication)."""

    def __init__(self, pattern: BlockPattern, my_q: torch.Tensor, scale: float, backend: str):
        self.pattern, self.my_q, self.scale, self.backend = pattern, my_q, scale, backend
        self._delta: torch.Tensor | None = None
        # Work lists per step, built in the forward and reused by the backward (a ring keeps this object and
        # the steps' ``want`` tensors for it): each build costs a host sync.
        self._lists: dict[int, tuple[torch.Tensor, block_sparse.SparseLists]] = {}

    def _lists_of(self, want: torch.Tensor) -> block_sparse.SparseLists:
        cached = self._lists.get(id(want))
        if cached is None or cached[0] is not want:
            cached = self._lists[id(want)] = (want, block_sparse.sparse_lists(self.pattern, self.my_q, want))
        return cached[1]

    def forward(self, q_BSHD, kv_2BSHD, want, out_BSHD, lse_BHS):
        """Merge into ``(out, lse)`` (None: nothing yet) the attention of the queries to the key blocks
        ``want`` whose K/V are ``kv_2BSHD`` ``[2, B, len(want)·block, Hkv, D]``; returns the merged pair (fp32)."""
        if self.backend == "triton":
            lists = self._lists_of(want)
            return block_sparse.block_sparse_forward(
                q_BSHD, kv_2BSHD[0], kv_2BSHD[1], lists, self.scale, out_BSHD=out_BSHD, lse_BHS=lse_BHS
            )
        return self._forward_reference(q_BSHD, kv_2BSHD, want, out_BSHD, lse_BHS)

    def backward(self, dout_BSHD, q_BSHD, kv_2BSHD, want, out_BSHD, lse_BHS, dq_BSHD):
        """:meth:`forward`'s gradient from the global ``out`` and ``lse``: adds the queries' share into ``dq``
        and returns the K/V gradients of ``want`` ``[2, B, len(want)·block, Hkv, D]`` in ``dq``'s dtype."""
        if self.backend == "triton":
            if self._delta is None:  # one per backward: the same global out and dout for every step
                self._delta = block_sparse.attention_delta(dout_BSHD, out_BSHD)
            lists = self._lists_of(want)
            grads = torch.empty((2, *kv_2BSHD.shape[1:]), dtype=torch.float32, device=q_BSHD.device)
            block_sparse.block_sparse_backward(
                dout_BSHD, q_BSHD, kv_2BSHD[0], kv_2BSHD[1], lse_BHS, self._delta, lists, self.scale, dq_BSHD,
                grads,
            )  # fmt: skip
            return grads
        return self._backward_reference(dout_BSHD, q_BSHD, kv_2BSHD, want, out_BSHD, lse_BHS, dq_BSHD)

    def _forward_reference(self, q, kv, want, out, lse):
        batch, hq, hkv = q.shape[0], q.shape[2], kv.shape[3]
        groups = hq // hkv
        for h in range(hkv):
            heads = slice(h * groups, (h + 1) * groups)
            mask = _mask(self.pattern, batch, h, self.my_q, want)
            part, part_lse = attention_forward_ref(
                q[:, :, heads], kv[0][:, :, h : h + 1], kv[1][:, :, h : h + 1], mask, self.scale
            )
            if out is None:  # empty accumulators: zero output, -inf LSE (neutral in a merge)
                out = torch.zeros(*q.shape[:2], hq, q.shape[3], dtype=part.dtype, device=q.device)
                lse = torch.full((batch, hq, q.shape[1]), float("-inf"), dtype=part.dtype, device=q.device)
            # Merge only this group's heads: the others are untouched by these keys.
            out[:, :, heads], lse[:, heads] = merge_partials(out[:, :, heads], lse[:, heads], part, part_lse)
        return out, lse

    def _backward_reference(self, dout, q, kv, want, out, lse, dq):
        batch, hq, hkv = q.shape[0], q.shape[2], kv.shape[3]
        groups = hq // hkv
        grads = torch.zeros(kv.shape, dtype=dq.dtype, device=q.device)
        for h in range(hkv):
            heads = slice(h * groups, (h + 1) * groups)
            mask = _mask(self.pattern, batch, h, self.my_q, want)
            dq_h, dk_h, dv_h = attention_backward_ref(
                dout[:, :, heads], q[:, :, heads], kv[0][:, :, h : h + 1], kv[1][:, :, h : h + 1],
                out[:, :, heads], lse[:, heads], mask, self.scale,
            )  # fmt: skip
            dq[:, :, heads] += dq_h
            grads[0][:, :, h : h + 1] += dk_h
            grads[1][:, :, h : h + 1] += dv_h
        return grads
