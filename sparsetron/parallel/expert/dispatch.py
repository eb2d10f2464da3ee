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


@dataclass
class Exchange:
    """One all-to-all of rows over ``group`` and its reverse in backward, split into start and wait nodes.

    ``in_splits``/``out_splits``: rows sent to / received from each member (None = equal splits).
    """

    group: object
    in_rows: int
    out_rows: int
    in_splits: list[int] | None
    out_splits: list[int] | None
    forward_work: object = None
    backward_work: object = None
    backward_buffers: tuple = ()


class _StartAllToAll(torch.autograd.Function):
    """Launches the all-to-all (asynchronous) and returns its output buffer, to be read after the wait node.

    Its backward runs after :class:`_WaitAllToAll`'s, which launched the reverse exchange: it only waits for
    it. Autograd runs ready nodes latest-created first, so the backward of whatever was computed between the
    two nodes in forward (the experts of another chunk, the shared expert) runs while the reverse transfer is
    in flight.
    """

    @staticmethod
    def forward(ctx, x, exchange: Exchange):
        out = x.new_empty((exchange.out_rows, *x.shape[1:]))
        exchange.forward_work = dist.all_to_all_single(
            out, x.contiguous(), exchange.out_splits, exchange.in_splits, group=exchange.group, async_op=True
        )
        ctx.exchange = exchange
        return out

    @staticmethod
    def backward(ctx, grad_out):
        exchange = ctx.exchange
        exchange.backward_work.wait()
        grad_in, _ = exchange.backward_buffers
        exchange.backward_buffers = ()
        return grad_in, None


class _WaitAllToAll(torch.autograd.Function):
    """Waits for the forward all-to-all; in backward, launches the reverse all-to-all and returns at once."""

    @staticmethod
    def forward(ctx, out, exchange: Exchange):
        exchange.forward_work.wait()
        exchange.forward_work = None
        ctx.exchange = exchange
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        exchange = ctx.exchange
        grad_out = grad_out.contiguous()
        grad_in = grad_out.new_empty((exchange.in_rows, *grad_out.shape[1:]))
        exchange.backward_work = dist.all_to_all_single(
            grad_in, grad_out, exchange.in_splits, exchange.out_splits, group=exchange.group, async_op=True
        )
        exchange.backward_buffers = (grad_in, grad_out)  # alive until the transfer is waited for
        return grad_out, None


def start_all_to_all(x: torch.Tensor, exchange: Exchange) -> torch.Tensor:
    """Differentiable asynchronous all-to-all of the rows of ``x``; read the result via :func:`wait_all_to_all`."""
    return _StartAllToAll.apply(x, exchange)


def wait_all_to_all(out: torch.Tensor, exchange: Exchange) -> torch.Tensor:
    """Finish the all-to-all started with ``exchange``; ``out`` is what :func:`start_all_to_all` returned."""
    return _WaitAllToAll.apply(out, exchange)


@dataclass
class DispatchedRows:
    """One chunk of this rank's tokens on its way to the experts and back.

    ``rows``: after :meth:`ExpertDispatcher.wait`, the rows this rank's experts compute on, grouped by local
    expert (activation dtype); ``counts_G`` int64 rows per local expert (device) on the dropless path; on the
    capacity path ``rows`` is ``[E_local, ep·C, D]`` (padded slots are zero) and ``counts_G`` None.
    ``tokens``: the chunk's token range.
    """

    rows: torch.Tensor
    counts_G: torch.Tensor | None
    tokens: tuple[int, int]
    state: dict


class ExpertDispatcher:
    """Moves kept assignments to the EP ranks owning their experts and back (``group``: the EP group).

    Experts are laid out contiguously: EP rank ``r`` owns experts ``[r·E_local, (r+1)·E_local)``. With
    ``group`` None (or of size 1) everything is local and nothing communicates.

    Usage: ``parts = dispatch(x_TD, a, chunks=c)``; compute what overlaps (the shared expert); per part
    ``wait(d)``, run the experts on ``d.rows``, ``combine_start(y, d)``; then ``combine_finish(d)`` per part
    gives its tokens' outputs in order. With ``chunks > 1`` (dropless, top-k routing) the tokens are split so
    one chunk's all-to-alls overlap another chunk's expert GEMMs, forward and backward. Communicates over
    ``group``: the per-expert counts (one exchange for all chunks), then each chunk's rows both ways.
    """

    def __init__(self, num_experts: int, group=None, chunks: int = 1) -> None:
        self.group = group if group is not None and dist.get_world_size(group) > 1 else None
        self.ep = dist.get_world_size(self.group) if self.group is not None else 1
        if num_experts % self.ep:
            raise ValueError(
                f"num_experts={num_experts} must be divisible by the EP degree {self.ep} (each EP rank owns "
                "num_experts/ep experts); change model.num_experts or parallel.ep."
            )
        if chunks < 1:
            raise ValueError(f"chunks={chunks} must be ≥ 1 (parallel.ep_overlap_chunks).")
        self.num_experts = num_experts
        self.local_experts = num_experts // self.ep
        self.chunks = chunks
        # Bytes this rank sent to other EP ranks in forward all-to-alls since the last reset (the backward
        # moves the same volume again); read and zeroed by the trainer for ``comm_bytes``.
        self.sent_bytes = 0

    # -- dropless ---------------------------------------------------------------------------------------------

    def dispatch(
        self, x_TD: torch.Tensor, a: Assignments, capacity: int | None = None
    ) -> list[DispatchedRows]:
        """Start moving the kept token copies of ``a`` to their experts' ranks (asynchronous when EP > 1)."""
        if capacity is not None:
            return [self._dispatch_capacity(x_TD, a, capacity)]
        tokens = x_TD.shape[0]
        chunks = self.chunks if self.group is not None and a.per_token is not None else 1
        chunks = max(1, min(chunks, tokens))
        bounds = [(tokens * c // chunks, tokens * (c + 1) // chunks) for c in range(chunks)]
        parts = [self._sort_chunk(x_TD, a, start, end, chunks > 1) for start, end in bounds]
        if self.group is not None:
            self._exchange_rows(parts)
        return parts

    def _sort_chunk(
        self, x_TD: torch.Tensor, a: Assignments, start: int, end: int, sliced: bool
    ) -> DispatchedRows:
        if sliced:  # token-major, K per token: the chunk's assignments are a contiguous slice
            k = a.per_token
            a = Assignments(
                a.token_N[start * k : end * k] - start,
                a.expert_N[start * k : end * k],
                a.weight_N[start * k : end * k],
                a.keep_N[start * k : end * k],
                None,
                (end - start) * k,
                k,
            )
            x_TD = x_TD[start:end]
        num_experts = self.num_experts
        key_N = torch.where(a.keep_N, a.expert_N, num_experts)  # dropped sort last, outside every group
        order_N = torch.argsort(key_N, stable=True)
        counts_E = torch.zeros(num_experts + 1, dtype=torch.int64, device=x_TD.device)
        counts_E.scatter_add_(0, key_N, torch.ones_like(key_N))
        counts_E = counts_E[:num_experts]
        state = {"order_N": order_N, "a": a, "T": x_TD.shape[0], "counts_E": counts_E}
        if a.per_token is not None:
            inverse_N = _inverse(order_N)
            state["inverse_N"] = inverse_N
            rows_ND = _GatherCopies.apply(x_TD, a.token_N[order_N], inverse_N, a.per_token)
        else:
            rows_ND = x_TD[a.token_N[order_N]]
        return DispatchedRows(rows_ND, counts_E, (start, end), state)

    def _exchange_rows(self, parts: list[DispatchedRows]) -> None:
        ep, local, chunks = self.ep, self.local_experts, len(parts)
        send_RCG = torch.stack([d.counts_G.view(ep, local) for d in parts], dim=1).contiguous()
        recv_RCG = torch.empty_like(send_RCG)
        dist.all_to_all_single(recv_RCG, send_RCG, group=self.group)
        # The one host sync of the dropless EP path: all_to_all_single takes its split sizes as ints.
        sizes = torch.cat([send_RCG.sum(2).T.reshape(-1), recv_RCG.sum(2).T.reshape(-1)]).tolist()
        me = dist.get_rank(self.group)
        for c, d in enumerate(parts):
            send_splits = sizes[c * ep : (c + 1) * ep]
            recv_splits = sizes[(chunks + c) * ep : (chunks + c + 1) * ep]
            sent, received = sum(send_splits), sum(recv_splits)
            row_bytes = d.rows.shape[1] * d.rows.element_size()
            self.sent_bytes += (sent - send_splits[me] + received - recv_splits[me]) * row_bytes
            exchange = Exchange(self.group, sent, received, send_splits, recv_splits)
            d.state |= {"dispatch": exchange, "recv_counts_RG": recv_RCG[:, c], "rows_N": d.rows.shape[0]}
            d.rows = start_all_to_all(d.rows[:sent], exchange)
            d.counts_G = recv_RCG[:, c].sum(0)

    def wait(self, d: DispatchedRows) -> DispatchedRows:
        """Finish ``d``'s dispatch all-to-all and group the received rows by local expert."""
        exchange = d.state.get("dispatch")
        if exchange is None:
            return d
        d.rows = wait_all_to_all(d.rows, exchange)
        if "capacity" in d.state:
            return d
        # Received rows are ordered (source rank, local expert); the grouped GEMM wants (local expert, source).
        recv_counts_RG = d.state["recv_counts_RG"]
        ep, local = recv_counts_RG.shape
        expert_of_row = torch.repeat_interleave(
            torch.arange(local, device=d.rows.device).repeat(ep),
            recv_counts_RG.reshape(-1),
            output_size=d.rows.shape[0],
        )
        regroup_M = torch.argsort(expert_of_row, stable=True)
        inverse_M = _inverse(regroup_M)
        d.state |= {"regroup_M": regroup_M, "inverse_M": inverse_M}
        d.rows = _Permute.apply(d.rows, regroup_M, inverse_M)
        return d

    def combine_start(self, y_rows: torch.Tensor, d: DispatchedRows) -> None:
        """Start sending the expert outputs ``y_rows`` (grouped as ``d.rows``) back to their tokens' ranks."""
        d.state["y_rows"] = y_rows
        exchange = d.state.get("dispatch")
        if exchange is None:
            return
        if "capacity" in d.state:
            capacity, dim = d.state["capacity"], y_rows.shape[-1]
            y_SD = (
                y_rows.view(self.local_experts, self.ep, capacity, dim)
                .transpose(0, 1)
                .reshape(self.num_experts * capacity, dim)
            )
        else:
            y_SD = _Permute.apply(y_rows, d.state["inverse_M"], d.state["regroup_M"])
        back = Exchange(
            self.group, exchange.out_rows, exchange.in_rows, exchange.out_splits, exchange.in_splits
        )
        d.state["combine"] = back
        d.state["y_rows"] = start_all_to_all(y_SD, back)

    def combine_finish(self, d: DispatchedRows) -> torch.Tensor:
        """The chunk's outputs ``y_TD = Σ_kept weight · expert_output`` (activation dtype), in token order."""
        y_rows = d.state["y_rows"]
        if "combine" in d.state:
            y_rows = wait_all_to_all(y_rows, d.state["combine"])
        if "capacity" in d.state:
            return self._combine_capacity(y_rows, d)
        state = d.state
        a, order_N = state["a"], state["order_N"]
        rows_N = state.get("rows_N", y_rows.shape[0])
        if y_rows.shape[0] < rows_N:
            # Dropped copies were sorted last and never sent: their outputs are zero.
            y_rows = torch.cat([y_rows, y_rows.new_zeros(rows_N - y_rows.shape[0], y_rows.shape[1])])
        if a.per_token is not None:
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
        if self.group is not None:
            # Dispatch and combine each move (ep − 1)/ep of the buffer off this rank.
            self.sent_bytes += 2 * buffer_SD.numel() * buffer_SD.element_size() * (self.ep - 1) // self.ep
            exchange = Exchange(self.group, slots, slots, None, None)
            state["dispatch"] = exchange
            buffer_SD = start_all_to_all(buffer_SD, exchange)
        return DispatchedRows(buffer_SD, None, (0, x_TD.shape[0]), state)

    def padded_rows(self, d: DispatchedRows) -> torch.Tensor:
        """Capacity path: the received buffer as ``[E_local, ep·C, D]`` (after :meth:`wait`)."""
        capacity, dim = d.state["capacity"], d.rows.shape[1]
        # Received layout: [source rank, local expert, slot] -> experts first.
        return (
            d.rows.view(self.ep, self.local_experts, capacity, dim)
            .transpose(0, 1)
            .reshape(self.local_experts, self.ep * capacity, dim)
        )

    def _combine_capacity(self, y_rows: torch.Tensor, d: DispatchedRows) -> torch.Tensor:
        state = d.state
        capacity, a = state["capacity"], state["a"]
        dim = y_rows.shape[-1]
        if "combine" not in state:  # local: still grouped [E, C, D]
            y_rows = y_rows.reshape(self.num_experts * capacity, dim)
        y_SD = torch.cat([y_rows, y_rows.new_zeros(1, dim)])  # the spare row of dropped assignments
        y_ND = y_SD[state["slot_N"]] * (a.weight_N * a.keep_N)[:, None].to(y_SD.dtype)
        return y_ND.new_zeros(state["T"], dim).index_add(0, a.token_N, y_ND)
