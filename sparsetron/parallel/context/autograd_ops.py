"""Differentiable context-parallel attention: collectives paired with their adjoints, and one autograd Function.

A collective context-parallel method is two linear *redistributions* over its process group:

- ``q_map`` (Q) takes this rank's query tokens to where they are attended; outputs come back through its
  adjoint. In every method here Q is a permutation (Qᵀ = Q⁻¹), so ``Q(dout)`` is exactly the gradient of the
  redistributed output;
- ``kv_map`` (KV) brings keys and values to those queries; its adjoint returns dK/dV to the ranks that own the
  tokens, summing the contribution of every rank that used them.

:class:`RedistributedAttention` runs one local block attention between them, for every method alike::

    forward:  q', k', v' = Q(q), KV(k), KV(v);   out', lse = attention(q', k', v');   out = Qᵀ(out')
    backward: do' = Q(dout);   dq', dk', dv' = attention_backward(do', q', k', v', out', lse)
              dq, dk, dv = Qᵀ(dq'), KVᵀ(dk'), KVᵀ(dv')

Ulysses is Q = KV = :class:`SeqToHeads` (all-to-all, sequence-sharded ↔ head-sharded); all-gather attention
is Q = :class:`LocalTokens` (identity) and KV = :class:`AllGatherSequence`.

Numerics: ``out'`` and ``lse`` stay fp32 for the backward; dq/dk/dv come out of the kernel in fp32 and are
cast to the input dtype only once nothing is summed any more: an adjoint that sums partial gradients across
ranks (all-gather's reduce-scatter, Ulysses' replicated KV heads) communicates and sums in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from sparsetron.kernels.attention import block_attention_backward, block_attention_forward

# torch 2.13 renamed these (the old names warn); torch 2.11 has only the old ones. Same signatures.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _gather_flat(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """Every rank's ``x`` flattened and concatenated in group-rank order: ``[W · x.numel()]``.

    Flat buffers because gloo accepts only outputs concatenated along dim 0, not stacked ``[W, ...]`` ones.
    """
    gathered = x.new_empty(world * x.numel())
    _all_gather_single(gathered, x.contiguous().view(-1), group=group)
    return gathered


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype partial gradients are summed in: fp32, or fp64 for fp64 inputs (never narrower than the input)."""
    return torch.promote_types(dtype, torch.float32)


class Redistribution(Protocol):
    """A linear map of ``[B, S, H, D]`` tensors implemented with collectives over one process group."""

    def forward(self, x_BSHD: torch.Tensor) -> torch.Tensor:
        """This rank's tokens/heads → what this rank computes on."""
        ...

    def adjoint(self, g_BSHD: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The transpose map, returning ``dtype``; sums of partial results are taken in :func:`accumulate_dtype`."""
        ...


class LocalTokens:
    """The identity: the tokens stay where they are (all-gather attention's queries). No communication."""

    def forward(self, x_BSHD: torch.Tensor) -> torch.Tensor:
        """``x`` unchanged."""
        return x_BSHD

    def adjoint(self, g_BSHD: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``g`` cast to ``dtype``."""
        return g_BSHD.to(dtype)


class AllGatherSequence:
    """All-gather of the sequence over ``group``; the adjoint reduce-scatters (sums) gradients back.

    The reduce-scatter is ``reduce_scatter_single`` (``reduce_scatter_tensor`` on older torch) on one fp32
    ``[W, B, S/W, H, D]`` buffer. On NCCL it is the native ring reduce-scatter, half the traffic and 1/W of the
    output memory of all_reduce + slice. On gloo (torch 2.13, 2 cores, 2-8 ranks, 0.25-16 MiB per rank) it
    timed within noise of the list-form ``reduce_scatter`` and of all_reduce + slice, and gave the same sums.
    """

    def __init__(self, group) -> None:
        self.group = group
        self.world = dist.get_world_size(group)

    def forward(self, x_BSHD: torch.Tensor) -> torch.Tensor:
        """``[B, S/W, H, D]`` → ``[B, S, H, D]``: every rank's tokens, concatenated in group-rank order.

        Communicates over ``self.group`` (one all-gather, input dtype on the wire).
        """
        batch, local_len, heads, head_dim = x_BSHD.shape
        gathered_WBSHD = _gather_flat(x_BSHD, self.group, self.world).view(
            self.world, batch, local_len, heads, head_dim
        )
        return gathered_WBSHD.movedim(0, 1).reshape(batch, self.world * local_len, heads, head_dim)

    def adjoint(self, g_BSHD: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[B, S, H, D]`` gradient of the gathered tensor → ``[B, S/W, H, D]`` in ``dtype``: the sum over ranks
        of their gradients for this rank's tokens.

        Communicates over ``self.group`` (one reduce-scatter, in :func:`accumulate_dtype` so the sum is fp32).
        """
        batch, seq_len, heads, head_dim = g_BSHD.shape
        local_len = seq_len // self.world
        g_WBSHD = (
            g_BSHD.to(accumulate_dtype(dtype))
            .reshape(batch, self.world, local_len, heads, head_dim)
            .movedim(1, 0)
            .contiguous()
        )
        summed_flat = g_WBSHD.new_empty(g_WBSHD.numel() // self.world)
        _reduce_scatter_single(summed_flat, g_WBSHD.view(-1), group=self.group)
        return summed_flat.view(batch, local_len, heads, head_dim).to(dtype)


class SeqToHeads:
    """All-to-all over ``group`` from sequence-sharded ``[B, S/W, H, D]`` to head-sharded ``[B, S, H', D]``.

    Rank r receives the whole sequence (ranks' tokens concatenated in group-rank order) for its heads:
    - ``H % W == 0``: heads ``[r·H/W, (r+1)·H/W)``, ``H' = H/W``;
    - ``W % H == 0`` (GQA/MQA KV heads, fewer than ranks): the one head ``r // (W/H)``, ``H' = 1``. These are
      exactly the KV heads its query heads ``[r·Hq/W, (r+1)·Hq/W)`` read, because ``Hq/W`` divides ``Hq/H``.
      Each head is sent to its ``W/H`` ranks and no more; it is never repeated to query heads before sending.
    The adjoint sends gradients back and sums the ``W/H`` copies of a replicated head (in fp32).
    """

    def __init__(self, group, num_heads: int) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.num_heads = num_heads
        if num_heads % self.world == 0:
            self.replicas, self.heads_per_rank = 1, num_heads // self.world
        elif self.world % num_heads == 0:
            self.replicas, self.heads_per_rank = self.world // num_heads, 1
        else:
            raise ValueError(
                f"cannot split {num_heads} heads over {self.world} ranks: "
                f"need heads % ranks == 0 or ranks % heads == 0"
            )

    def forward(self, x_BSHD: torch.Tensor) -> torch.Tensor:
        """``[B, S/W, H, D]`` → ``[B, S, H', D]``. Communicates over ``self.group`` (one all_to_all_single, input
        dtype on the wire, ``B·S·H'·D`` elements received per rank)."""
        batch, local_len, heads, head_dim = x_BSHD.shape
        head_groups = heads // self.heads_per_rank
        # Destination rank = head_group·replicas + replica; one copy builds the [W, B, S/W, H', D] send buffer.
        send_WBSHD = (
            x_BSHD.reshape(batch, local_len, head_groups, 1, self.heads_per_rank, head_dim)
            .expand(batch, local_len, head_groups, self.replicas, self.heads_per_rank, head_dim)
            .permute(2, 3, 0, 1, 4, 5)
            .reshape(self.world, batch, local_len, self.heads_per_rank, head_dim)
            .contiguous()
        )
        recv_WBSHD = torch.empty_like(send_WBSHD)
        dist.all_to_all_single(recv_WBSHD, send_WBSHD, group=self.group)
        return recv_WBSHD.movedim(0, 1).reshape(batch, self.world * local_len, self.heads_per_rank, head_dim)

    def adjoint(self, g_BSHD: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[B, S, H', D]`` → ``[B, S/W, H, D]`` in ``dtype``. Communicates over ``self.group`` (one
        all_to_all_single): in ``dtype`` when every head has one owner (nothing left to sum), in
        :func:`accumulate_dtype` when replicated heads' gradients are summed here."""
        batch, seq_len, heads_per_rank, head_dim = g_BSHD.shape
        local_len = seq_len // self.world
        wire_dtype = accumulate_dtype(dtype) if self.replicas > 1 else dtype
        send_WBSHD = (
            g_BSHD.to(wire_dtype)
            .reshape(batch, self.world, local_len, heads_per_rank, head_dim)
            .movedim(1, 0)
            .contiguous()
        )
        recv_WBSHD = torch.empty_like(send_WBSHD)
        dist.all_to_all_single(recv_WBSHD, send_WBSHD, group=self.group)
        head_groups = self.num_heads // heads_per_rank
        grouped_GRBSHD = recv_WBSHD.reshape(
            head_groups, self.replicas, batch, local_len, heads_per_rank, head_dim
        )
        summed_GBSHD = grouped_GRBSHD.sum(dim=1) if self.replicas > 1 else grouped_GRBSHD[:, 0]
        return (
            summed_GBSHD.permute(1, 2, 0, 3, 4).reshape(batch, local_len, self.num_heads, head_dim).to(dtype)
        )


@dataclass(frozen=True, eq=False)
class Visibility:
    """Which redistributed query sees which redistributed key (the kernel's mask arguments).

    ``q_index_S``/``k_index_S``: global token indices (int64, on the CPU) of the rows of ``q'``/``k'``; ``q_doc_BS``/
    ``k_doc_BS``: their doc ids (or None); ``causal``, ``window`` as in
    :func:`sparsetron.kernels.attention_ref.visible_mask`.
    """

    q_index_S: torch.Tensor
    k_index_S: torch.Tensor
    q_doc_BS: torch.Tensor | None
    k_doc_BS: torch.Tensor | None
    causal: bool
    window: int | None

    def kernel_kwargs(self) -> dict:
        """Mask keyword arguments of ``block_attention_forward/backward``."""
        return {
            "causal": self.causal,
            "q_doc_BS": self.q_doc_BS,
            "k_doc_BS": self.k_doc_BS,
            "window": self.window,
        }


def gather_token_indices(index_S: torch.Tensor, *, group, device: torch.device) -> torch.Tensor:
    """Every rank's global token indices, ``[S/W] → [S]`` int64 on the CPU, concatenated in group-rank order.

    The kernels plan on host indices (a device tensor would cost a host sync per kernel call), so the result is
    on the CPU. Communicates over ``group``: one small all-gather, on the CPU when ``index_S`` is there and the
    group has a CPU backend (gloo, ``cpu:gloo,cuda:nccl``: no device sync at all); otherwise on ``device``,
    followed by one copy to the host.
    """
    world = dist.get_world_size(group)
    index_S = index_S.to(torch.int64)
    if index_S.device.type == "cpu" and "cpu:" in dist.get_backend_config(group):
        return _gather_flat(index_S, group, world)
    return _gather_flat(index_S.to(device), group, world).cpu()


def gather_doc_ids(doc_ids_BS: torch.Tensor | None, *, group, device: torch.device) -> torch.Tensor | None:
    """Every rank's doc ids, ``[B, S/W] → [B, S]`` int64 on ``device`` (where the kernels build their masks),
    concatenated in group-rank order; None stays None (and communicates nothing).

    Communicates over ``group``: one small all-gather on ``device``.
    """
    if doc_ids_BS is None:
        return None
    world = dist.get_world_size(group)
    local_BS = doc_ids_BS.to(device=device, dtype=torch.int64)
    gathered_WBS = _gather_flat(local_BS, group, world).view(world, *local_BS.shape)
    return gathered_WBS.movedim(0, 1).reshape(local_BS.shape[0], -1)


def check_local_inputs(
    q_BSHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor, q_index_S: torch.Tensor, doc_ids_BS
) -> None:
    """Raise ``ValueError`` naming the bad shape unless this rank's inputs fit the common CP attention signature:
    q ``[B, S_local, Hq, D]``, k/v ``[B, S_local, Hkv, D]`` with ``Hq % Hkv == 0``, ``q_index_S [S_local]``,
    ``doc_ids_BS [B, S_local]`` or None. No communication."""
    if q_BSHD.dim() != 4 or k_BSHD.dim() != 4 or k_BSHD.shape != v_BSHD.shape:
        raise ValueError(
            f"expected q [B, S_local, Hq, D] and k, v [B, S_local, Hkv, D]; got q {tuple(q_BSHD.shape)}, "
            f"k {tuple(k_BSHD.shape)}, v {tuple(v_BSHD.shape)}"
        )
    batch, local_len, q_heads, head_dim = q_BSHD.shape
    kv_batch, kv_len, kv_heads, kv_dim = k_BSHD.shape
    if (kv_batch, kv_len, kv_dim) != (batch, local_len, head_dim) or q_heads % kv_heads:
        raise ValueError(
            f"q {tuple(q_BSHD.shape)} and k, v {tuple(k_BSHD.shape)} must share B, S_local and D, "
            f"and Hq={q_heads} must be a multiple of Hkv={kv_heads}"
        )
    if tuple(q_index_S.shape) != (local_len,):
        raise ValueError(
            f"q_index_S has shape {tuple(q_index_S.shape)} but this rank holds {local_len} tokens; pass "
            f"global_token_index(seq_len, rank, world, layout) for this rank"
        )
    if doc_ids_BS is not None and tuple(doc_ids_BS.shape) != (batch, local_len):
        raise ValueError(
            f"doc_ids_BS has shape {tuple(doc_ids_BS.shape)}; expected this rank's shard [B, S_local] = "
            f"[{batch}, {local_len}]"
        )


class RedistributedAttention(torch.autograd.Function):
    """Exact attention of ``q`` over ``k, v`` after redistributing them with ``q_map`` and ``kv_map``.

    ``apply(q_BSHD, k_BSHD, v_BSHD, q_map, kv_map, visibility, scale) -> out_BSHD`` (q's dtype). Communicates
    over the maps' group: forward Q(q), KV(k), KV(v), Qᵀ(out'); backward Q(dout), Qᵀ(dq'), KVᵀ(dk'), KVᵀ(dv').
    Every rank of that group must call it, and run its backward, together. Tensors named ``*_here_*`` are the
    redistributed ones this rank computes on; ``out_here`` and ``lse_here`` are fp32 (fp64 for fp64 inputs).
    """

    @staticmethod
    def forward(
        ctx,
        q_BSHD: torch.Tensor,
        k_BSHD: torch.Tensor,
        v_BSHD: torch.Tensor,
        q_map: Redistribution,
        kv_map: Redistribution,
        visibility: Visibility,
        scale: float,
    ) -> torch.Tensor:
        q_here_BSHD, k_here_BSHD, v_here_BSHD = (
            q_map.forward(q_BSHD),
            kv_map.forward(k_BSHD),
            kv_map.forward(v_BSHD),
        )
        out_here_BSHD, lse_here_BHS = block_attention_forward(
            q_here_BSHD,
            k_here_BSHD,
            v_here_BSHD,
            visibility.q_index_S,
            visibility.k_index_S,
            scale=scale,
            **visibility.kernel_kwargs(),
        )
        ctx.save_for_backward(q_here_BSHD, k_here_BSHD, v_here_BSHD, out_here_BSHD, lse_here_BHS)
        ctx.q_map, ctx.kv_map, ctx.visibility, ctx.scale = q_map, kv_map, visibility, scale
        ctx.dtypes = (q_BSHD.dtype, k_BSHD.dtype, v_BSHD.dtype)
        return q_map.adjoint(out_here_BSHD, q_BSHD.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout_BSHD: torch.Tensor):
        q_here_BSHD, k_here_BSHD, v_here_BSHD, out_here_BSHD, lse_here_BHS = ctx.saved_tensors
        visibility = ctx.visibility
        # All three gradients always travel, even for inputs that need none: every rank of the group must issue
        # the same collectives, whatever its local requires_grad flags.
        dq_here_BSHD, dk_here_BSHD, dv_here_BSHD = block_attention_backward(
            ctx.q_map.forward(dout_BSHD),
            q_here_BSHD,
            k_here_BSHD,
            v_here_BSHD,
            out_here_BSHD,
            lse_here_BHS,
            visibility.q_index_S,
            visibility.k_index_S,
            scale=ctx.scale,
            **visibility.kernel_kwargs(),
        )
        q_dtype, k_dtype, v_dtype = ctx.dtypes
        return (
            ctx.q_map.adjoint(dq_here_BSHD, q_dtype),
            ctx.kv_map.adjoint(dk_here_BSHD, k_dtype),
            ctx.kv_map.adjoint(dv_here_BSHD, v_dtype),
            None,
            None,
            None,
            None,
        )
