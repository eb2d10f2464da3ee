"""Token dispatch for the MoE layer: capacity drops, token rounding, permutation and the EP all-to-all.

A router's :class:`~sparsetron.parallel.expert.router.Routing` is a flat list of ``N`` (token, expert,
weight) assignments. This module decides which assignments are kept (capacity, token rounding), moves the
kept token copies to the ranks that own their experts, hands each rank its rows grouped by local expert,
and brings the expert outputs back, weighted and summed per token.

Two dispatch paths, chosen by whether a capacity is set:

- **dropless** (default): variable per-expert counts. Rows are sorted by expert; the grouped GEMM reads the
  counts as a device tensor, so on one EP rank nothing syncs with the host. Across EP ranks the per-expert
  counts are exchanged as a tensor (``all_to_all_single``), and the split sizes that ``all_to_all_single``
  needs as Python ints are read in **one** host sync per layer forward (the backward reuses them).
  Every backend's variable-size all-to-all needs its output size on the host, which is why.
- **capacity**: every expert has ``C`` slots per source rank; the payload is a static ``[E·C, D]`` buffer,
  so the all-to-all has equal splits and the whole path is free of host syncs, at the cost of computing
  padded slots (batched GEMM over ``[E_local, ep·C, D]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sparsetron.kernels.moe_combine import weighted_combine

#: How capacity drops pick which assignments of an over-full expert to keep.
DROP_POLICIES = ("score", "position")
#: How token rounding rounds each expert's count to a multiple of the GEMM row tile.
ROUNDING_MODES = ("off", "up", "down", "nearest")


@dataclass
class Assignments:
    """Routed (token, expert) pairs after capacity and rounding decisions; ``N`` may exceed the router's.

    - ``token_N`` int64, ``expert_N`` int64 in ``[0, E)``, ``weight_N`` activation dtype (differentiable).
    - ``keep_N`` bool: False for dropped assignments (over capacity, rounded down) and unused rounding slots.
    - ``slot_N`` int64 or None: with a capacity, the position of each kept assignment among its expert's
      ``C`` slots (``rank within expert``); None on the dropless path.
    - ``routed``: the router's own assignment count (the first ``routed`` entries); later entries were added
      by token rounding.
    - ``per_token``: ``K`` when the assignments are exactly ``K`` per token, token-major
      (``token_N = arange(T).repeat_interleave(K)``), as top-k routers give; None otherwise. It lets the
      dispatcher sum a token's copies with a reshape instead of a scatter-add (no atomics).
    """

    token_N: torch.Tensor
    expert_N: torch.Tensor
    weight_N: torch.Tensor
    keep_N: torch.Tensor
    slot_N: torch.Tensor | None
    routed: int
    per_token: int | None = None

    def dropped(self) -> torch.Tensor:
        """Router assignments not kept (fp32 scalar, on device; no host sync)."""
        return (~self.keep_N[: self.routed]).sum().float()

    def added(self) -> torch.Tensor:
        """Assignments added by rounding up (fp32 scalar, on device)."""
        return self.keep_N[self.routed :].sum().float()


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert for ``num_tokens`` local tokens: ``ceil(T·k/E · capacity_factor)`` (GShard), ≥ 1."""
    if capacity_factor <= 0:
        raise ValueError(
            f"capacity_factor={capacity_factor} must be > 0 (1.0 = exactly the balanced share); "
            "use null for dropless routing."
        )
    return max(1, math.ceil(num_tokens * top_k / num_experts * capacity_factor))


def rank_within_expert(expert_N: torch.Tensor, priority_N: torch.Tensor, num_experts: int) -> torch.Tensor:
    """0-based position of each assignment among those of its expert, highest ``priority_N`` first.

    Ties keep the original order. int64 ``[N]``; device ops only (two stable sorts, no host sync).
    """
    by_priority = torch.argsort(priority_N, descending=True, stable=True)
    order = by_priority[torch.argsort(expert_N[by_priority], stable=True)]
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=expert_N.device)
    counts_E.scatter_add_(0, expert_N, torch.ones_like(expert_N))
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    position = torch.arange(expert_N.numel(), device=expert_N.device) - starts_E[expert_N[order]]
    return torch.empty_like(position).scatter_(0, order, position)


def _priority(policy: str, token_N: torch.Tensor, expert_N: torch.Tensor, scores_TE: torch.Tensor):
    if policy == "score":
        return scores_TE[token_N, expert_N]
    if policy == "position":
        return -token_N.to(torch.float32)  # earlier tokens first
    raise ValueError(f"drop policy {policy!r} is not one of {', '.join(DROP_POLICIES)}.")


def apply_capacity(
    token_N: torch.Tensor,
    expert_N: torch.Tensor,
    weight_N: torch.Tensor,
    scores_TE: torch.Tensor,
    capacity: int,
    policy: str = "score",
) -> Assignments:
    """Keep at most ``capacity`` assignments per expert; the rest are dropped.

    ``policy="score"`` keeps an over-full expert's highest-scoring assignments (Megatron's "probs" policy);
    ``"position"`` keeps its earliest tokens (GShard). Dropped assignments contribute nothing; a token whose
    every assignment is dropped passes through the residual (and the shared expert) only.
    """
    num_experts = scores_TE.shape[1]
    rank_N = rank_within_expert(expert_N, _priority(policy, token_N, expert_N, scores_TE), num_experts)
    keep_N = rank_N < capacity
    return Assignments(token_N, expert_N, weight_N, keep_N, rank_N, routed=token_N.numel())


def _rounded_targets(counts_E: torch.Tensor, tile: int, mode: str, num_tokens: int) -> torch.Tensor:
    if mode == "up":
        target_E = (counts_E + tile - 1) // tile * tile
    elif mode == "down":
        target_E = counts_E // tile * tile
    elif mode == "nearest":
        target_E = (counts_E + tile // 2) // tile * tile
    else:
        raise ValueError(f"token rounding mode {mode!r} is not one of {', '.join(ROUNDING_MODES)}.")
    # An expert cannot take more distinct tokens than there are.
    return target_E.clamp(max=num_tokens)


def round_to_tile(
    token_N: torch.Tensor,
    expert_N: torch.Tensor,
    weight_N: torch.Tensor,
    scores_TE: torch.Tensor,
    probs_TE: torch.Tensor,
    tile: int,
    mode: str = "nearest",
) -> Assignments:
    """Token rounding (SonicMoE): make every expert's token count a multiple of the GEMM row ``tile``.

    Each expert's count is rounded up, down, or to the nearer multiple (``mode``). Rounding down drops the
    expert's lowest-scoring assignments; rounding up adds the highest-scoring tokens not yet routed to it,
    weighted by their router probability ``probs_TE[t, e]`` (differentiable, no renormalisation). So the
    grouped GEMM runs full tiles only, and the routing moves by less than one tile per expert.

    Shapes stay static: up to ``min(tile − 1, T)`` candidate slots per expert are appended and the unused
    ones marked not kept. Device ops only.
    """
    num_tokens, num_experts = scores_TE.shape
    if tile < 1:
        raise ValueError(f"token rounding tile={tile} must be ≥ 1 (the grouped GEMM's row tile, e.g. 128).")
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=expert_N.device)
    counts_E.scatter_add_(0, expert_N, torch.ones_like(expert_N))
    target_E = _rounded_targets(counts_E, tile, mode, num_tokens)
    rank_N = rank_within_expert(expert_N, scores_TE[token_N, expert_N], num_experts)
    keep_N = rank_N < target_E[expert_N]

    extra = min(tile - 1, num_tokens)
    if extra == 0:
        return Assignments(token_N, expert_N, weight_N, keep_N, None, routed=token_N.numel())
    taken_TE = torch.zeros_like(scores_TE, dtype=torch.bool)
    taken_TE[token_N, expert_N] = True
    free_scores_ET = scores_TE.masked_fill(taken_TE, -math.inf).T
    cand_scores_EX, cand_token_EX = torch.topk(free_scores_ET, extra, dim=1)
    need_E = (target_E - counts_E).clamp(min=0)
    slot_X = torch.arange(extra, device=expert_N.device)
    cand_keep_EX = (slot_X < need_E[:, None]) & torch.isfinite(cand_scores_EX)
    cand_expert_EX = torch.arange(num_experts, device=expert_N.device)[:, None].expand(-1, extra)
    cand_weight_EX = probs_TE[cand_token_EX, cand_expert_EX].to(weight_N.dtype)
    return Assignments(
        token_N=torch.cat([token_N, cand_token_EX.reshape(-1)]),
        expert_N=torch.cat([expert_N, cand_expert_EX.reshape(-1)]),
        weight_N=torch.cat([weight_N, cand_weight_EX.reshape(-1)]),
        keep_N=torch.cat([keep_N, cand_keep_EX.reshape(-1)]),
        slot_N=None,
        routed=token_N.numel(),
    )


class _Permute(torch.autograd.Function):
    """``x[index]`` for a permutation ``index``; the backward gathers with ``inverse`` (no scatter-add)."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _GatherCopies(torch.autograd.Function):
    """Rows ``x_TD[token_N[order_N]]`` where every token has ``K`` token-major copies.

    The backward sums each token's ``K`` row gradients where they lie (:func:`weighted_combine` with unit
    weights), instead of the scatter-add (atomics, slow in bf16) that indexing's own backward would run.
    """

    @staticmethod
    def forward(ctx, x_TD, source_N, inverse_N, per_token):
        ctx.save_for_backward(inverse_N)
        ctx.per_token = per_token
        return x_TD.index_select(0, source_N)

    @staticmethod
    def backward(ctx, grad_ND):
        (inverse_N,) = ctx.saved_tensors
        position_TK = inverse_N.view(-1, ctx.per_token)
        ones_TK = torch.ones(position_TK.shape, dtype=torch.float32, device=grad_ND.device)
        return weighted_combine(grad_ND, position_TK, ones_TK), None, None, None


def _inverse(order: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with autograd; the forward is asynchronous, the backward the reverse exchange.

    The forward returns the output buffer at once and appends the work handle to ``pending``: the caller
    must ``wait()`` on it before reading the output (computation issued in between overlaps the transfer).
    """

    @staticmethod
    def forward(ctx, x, out_rows, out_splits, in_splits, group, pending):
        ctx.group, ctx.in_rows, ctx.out_splits, ctx.in_splits = group, x.shape[0], out_splits, in_splits
        out = x.new_empty((out_rows, *x.shape[1:]))
        pending.append(
            dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group, async_op=True)
        )
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_in = grad_out.new_empty((ctx.in_rows, *grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return grad_in, None, None, None, None, None


def all_to_all(x, out_rows: int, out_splits, in_splits, group, pending: list) -> torch.Tensor:
    """Differentiable asynchronous all-to-all of rows of ``x`` over ``group`` (see :class:`_AllToAll`).

    ``in_splits``/``out_splits``: rows sent to / received from each member (None = equal splits).
    """
    return _AllToAll.apply(x, out_rows, out_splits, in_splits, group, pending)


@dataclass
class DispatchedRows:
    """What the experts of this rank compute on, and what combining needs to bring their outputs back.

    ``rows_MD`` (activation dtype) grouped by local expert; ``counts_G`` int64 rows per local expert (device)
    on the dropless path; on the capacity path ``rows_MD`` is ``[E_local, ep·C, D]`` (padded slots are zero).
    """

    rows: torch.Tensor
    counts_G: torch.Tensor | None
    pending: list
    _state: dict


class ExpertDispatcher:
    """Moves kept assignments to the EP ranks owning their experts and back (``group``: the EP group).

    Experts are laid out contiguously: EP rank ``r`` owns experts ``[r·E_local, (r+1)·E_local)``. With
    ``group`` None (or of size 1) everything is local and nothing communicates.

    Usage: ``d = dispatch(x_TD, a)``; compute what overlaps (the shared expert); ``d = wait(d)``;
    ``y = experts(d)``; ``combine(y, d) -> y_TD``. Communicates over ``group`` in dispatch (counts, rows)
    and combine (rows); backward runs the reverse all-to-alls.
    """

    def __init__(self, num_experts: int, group=None) -> None:
        self.group = group if group is not None and dist.get_world_size(group) > 1 else None
        self.ep = dist.get_world_size(self.group) if self.group is not None else 1
        if num_experts % self.ep:
            raise ValueError(
                f"num_experts={num_experts} must be divisible by the EP degree {self.ep} (each EP rank owns "
                "num_experts/ep experts); change model.num_experts or parallel.ep."
            )
        self.num_experts = num_experts
        self.local_experts = num_experts // self.ep
        # Bytes this rank sent to other EP ranks in forward all-to-alls since the last reset (the backward
        # moves the same volume again); read and zeroed by the trainer for ``comm_bytes``.
        self.sent_bytes = 0

    # -- dropless ---------------------------------------------------------------------------------------------

    def dispatch(self, x_TD: torch.Tensor, a: Assignments, capacity: int | None = None) -> DispatchedRows:
        """Start moving the kept token copies of ``a`` to their experts' ranks (asynchronous when EP > 1)."""
        if capacity is not None:
            return self._dispatch_capacity(x_TD, a, capacity)
        num_experts = self.num_experts
        key_N = torch.where(a.keep_N, a.expert_N, num_experts)  # dropped sort last, outside every group
        order_N = torch.argsort(key_N, stable=True)
        counts_E = torch.zeros(num_experts + 1, dtype=torch.int64, device=x_TD.device)
        counts_E.scatter_add_(0, key_N, torch.ones_like(key_N))
        counts_E = counts_E[:num_experts]
        state = {"order_N": order_N, "a": a, "T": x_TD.shape[0]}
        if a.per_token is not None:
            inverse_N = _inverse(order_N)
            state["inverse_N"] = inverse_N
            rows_ND = _GatherCopies.apply(x_TD, a.token_N[order_N], inverse_N, a.per_token)
        else:
            rows_ND = x_TD[a.token_N[order_N]]
        if self.group is None:
            return DispatchedRows(rows_ND, counts_E, [], state)

        ep, local = self.ep, self.local_experts
        recv_counts_RG = torch.empty(ep, local, dtype=torch.int64, device=x_TD.device)
        dist.all_to_all_single(recv_counts_RG, counts_E.view(ep, local).contiguous(), group=self.group)
        # The one host sync of the dropless EP path: all_to_all_single takes its split sizes as ints.
        sizes = torch.cat([counts_E.view(ep, local).sum(1), recv_counts_RG.sum(1)]).tolist()
        send_splits, recv_splits = sizes[:ep], sizes[ep:]
        sent = sum(send_splits)
        me = dist.get_rank(self.group)
        row_bytes = rows_ND.shape[1] * rows_ND.element_size()
        self.sent_bytes += (sent - send_splits[me] + sum(recv_splits) - recv_splits[me]) * row_bytes
        pending: list = []
        received_MD = all_to_all(
            rows_ND[:sent], sum(recv_splits), recv_splits, send_splits, self.group, pending
        )
        state |= {"send_splits": send_splits, "recv_splits": recv_splits, "recv_counts_RG": recv_counts_RG}
        return DispatchedRows(received_MD, recv_counts_RG.sum(0), pending, state)

    @staticmethod
    def wait(d: DispatchedRows) -> DispatchedRows:
        """Finish the dispatch all-to-all and group the received rows by local expert."""
        for work in d.pending:
            work.wait()
        d.pending.clear()
        recv_counts_RG = d._state.get("recv_counts_RG")
        if recv_counts_RG is None or d._state.get("regrouped"):
            return d
        # Received rows are ordered (source rank, local expert); the grouped GEMM wants (local expert, source).
        ep, local = recv_counts_RG.shape
        expert_of_row = torch.repeat_interleave(
            torch.arange(local, device=d.rows.device).repeat(ep),
            recv_counts_RG.reshape(-1),
            output_size=d.rows.shape[0],
        )
        regroup_M = torch.argsort(expert_of_row, stable=True)
        inverse_M = _inverse(regroup_M)
        d._state |= {"regroup_M": regroup_M, "inverse_M": inverse_M, "regrouped": True}
        d.rows = _Permute.apply(d.rows, regroup_M, inverse_M)
        return d

    def combine(self, y_rows: torch.Tensor, d: DispatchedRows) -> torch.Tensor:
        """Expert outputs back to their tokens: ``y_TD = Σ_kept weight · expert_output`` (activation dtype)."""
        if "capacity" in d._state:
            return self._combine_capacity(y_rows, d)
        state = d._state
        a, order_N = state["a"], state["order_N"]
        if self.group is not None:
            y_received = _Permute.apply(y_rows, state["inverse_M"], state["regroup_M"])
            pending: list = []
            y_sent = all_to_all(
                y_received,
                sum(state["send_splits"]),
                state["send_splits"],
                state["recv_splits"],
                self.group,
                pending,
            )
            for work in pending:
                work.wait()
            # Dropped rows (sorted last) produce zeros.
            y_rows = torch.cat([y_sent, y_sent.new_zeros(order_N.numel() - y_sent.shape[0], y_sent.shape[1])])
        if a.per_token is not None:
            # Back to token-major order, then each token's K copies summed with their weights.
            # Each token's K weighted copies summed where the experts left them (one fused pass each way).
            position_TK = state["inverse_N"].view(state["T"], a.per_token)
            weight_TK = (a.weight_N * a.keep_N).view(state["T"], a.per_token)
            return weighted_combine(y_rows, position_TK, weight_TK)
        weight_N = (a.weight_N * a.keep_N)[order_N]
        y_ND = y_rows * weight_N[:, None].to(y_rows.dtype)
        return y_ND.new_zeros(state["T"], y_ND.shape[1]).index_add(0, a.token_N[order_N], y_ND)

    # -- capacity (static shapes, no host sync) -----------------------------------------------------------------

    def _dispatch_capacity(self, x_TD: torch.Tensor, a: Assignments, capacity: int) -> DispatchedRows:
        if a.slot_N is None:
            raise ValueError("capacity dispatch needs assignments from apply_capacity (they carry slots).")
        num_experts, dim = self.num_experts, x_TD.shape[1]
        slots = num_experts * capacity
        # Dropped assignments land in one spare row that is cut off.
        slot_N = torch.where(a.keep_N, a.expert_N * capacity + a.slot_N, slots)
        buffer_SD = x_TD.new_zeros(slots + 1, dim).index_add(0, slot_N, x_TD[a.token_N])[:slots]
        state = {"capacity": capacity, "slot_N": slot_N, "a": a, "T": x_TD.shape[0]}
        pending: list = []
        if self.group is not None:
            # Dispatch and combine each move (ep − 1)/ep of the buffer off this rank.
            self.sent_bytes += 2 * buffer_SD.numel() * buffer_SD.element_size() * (self.ep - 1) // self.ep
            buffer_SD = all_to_all(buffer_SD, slots, None, None, self.group, pending)
        return DispatchedRows(buffer_SD, None, pending, state)

    def padded_rows(self, d: DispatchedRows) -> torch.Tensor:
        """Capacity path: the received buffer as ``[E_local, ep·C, D]`` (after :meth:`wait`)."""
        capacity, dim = d._state["capacity"], d.rows.shape[1]
        # Received layout: [source rank, local expert, slot] -> experts first.
        return (
            d.rows.view(self.ep, self.local_experts, capacity, dim)
            .transpose(0, 1)
            .reshape(self.local_experts, self.ep * capacity, dim)
        )

    def _combine_capacity(self, y_GCD: torch.Tensor, d: DispatchedRows) -> torch.Tensor:
        state = d._state
        capacity, a = state["capacity"], state["a"]
        dim = y_GCD.shape[-1]
        y_SD = (
            y_GCD.view(self.local_experts, self.ep, capacity, dim)
            .transpose(0, 1)
            .reshape(self.num_experts * capacity, dim)
        )
        if self.group is not None:
            pending: list = []
            y_SD = all_to_all(y_SD, y_SD.shape[0], None, None, self.group, pending)
            for work in pending:
                work.wait()
        y_SD = torch.cat([y_SD, y_SD.new_zeros(1, dim)])  # the spare row of dropped assignments
        y_ND = y_SD[state["slot_N"]] * (a.weight_N * a.keep_N)[:, None].to(y_SD.dtype)
        return y_ND.new_zeros(state["T"], dim).index_add(0, a.token_N, y_ND)
