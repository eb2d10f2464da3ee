"""Hierarchical sparse ring attention: an inner sparse ring over the ranks of a node, an outer one across nodes,
each inter-node transfer hidden behind the inner ring's compute.

Layout and semantics are the flat sparse ring's (:mod:`.sparse_ring`): block ``i`` of the sequence lives on
rank ``i mod W``, the pattern is global and identical on every rank, so every rank derives the whole schedule
from the :class:`~.sparse_plan.StripedPlan` without exchanging metadata; the output and LSE are those of
masked attention over the whole sequence, merged exactly in fp32.

Ranks are numbered node-major: rank ``r = n·L + l`` is local rank ``l`` of node ``n``, with ``L`` ranks per
node (``node_size``, from the job's layout; 4 CPU ranks can act as 2 nodes × 2) and ``N = W / L`` nodes.
Write ``refs(x, y)`` for the blocks of rank ``y`` that the queries of rank ``x`` reference, and
``refs(node n, y)`` for their union over the ranks of node ``n``.

Schedule of rank ``(n, l)``, for node offsets ``t = 0 … N−1`` (source node ``m = (n − t) mod N``):

* **outer step** ``t``: rank ``(n, l)`` *carries* ``C_t = refs(node n, (m, l))``: the blocks of its peer with
  the same local index on node ``m`` that any rank of node ``n`` references. At ``t = 0`` that peer is the
  rank itself (no transfer); for ``t > 0`` they came over the inter-node link ``(m, l) → (n, l)``. Each
  referenced block crosses between two nodes once, whichever and however many ranks of the node need it,
  and the ``L`` links of a node pair run in parallel. Blocks no rank of node ``n`` references never leave
  node ``m``; a node offset with none sends nothing.
* **prefetch**: before the inner ring of offset ``t`` runs, every rank posts (non-blocking isend/irecv on its
  cross-node group) the transfer of offset ``t + 1``: it sends ``refs(node n + t + 1, (n, l))`` of its own
  blocks to ``(n + t + 1, l)`` and receives ``C_{t+1}`` from ``(n − t − 1, l)``. It waits on them after that
  inner ring, so the inter-node transfer overlaps a whole inner ring of compute (double buffering: at most
  one carried set in flight besides the one in use).
* **inner step** ``u = 0 … L−1`` of offset ``t``: rank ``(n, l)`` receives from ``(n, l − u)`` exactly
  ``refs((n, l), (m, l − u))`` (a subset of what that rank carries) and sends ``(n, l + u)`` the part of its
  own ``C_t`` that rank references, over the node-local group; it then merges the attention of its queries
  to those blocks into its running ``(out, lse)``. ``u = 0`` is local; steps with nothing to move are skipped.

The backward runs the same schedule: each inner step recomputes its share of the gradients from the global
output and LSE (FlashAttention-2 style) and returns the K/V gradients of received blocks to their holder over
the reverse intra-node link; the holder sums them into the gradient of its carried set and returns that to
the owner over the reverse inter-node link, non-blocking, waited on after the next offset's inner ring.

Process groups: :func:`hierarchy_groups` builds the node-local and cross-node groups once (collective over the
default group, like every ``new_group``); pass them as ``groups=``. Without it each call builds them again,
which only works when ``group`` is the whole job and every rank of it calls (fine for tests, wasteful in
training).

Each step's local math is :class:`~.sparse_compute.StepAttention` (the block-sparse Triton kernels on CUDA,
the exact fp32 reference elsewhere), as in the flat ring; it keeps the K/V blocks it carried and received for
the backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from sparsetron.parallel.context.patterns import BlockPattern
from sparsetron.parallel.context.sparse_compute import StepAttention, resolve_backend, token_index
from sparsetron.parallel.context.sparse_plan import StripedPlan
from sparsetron.parallel.context.sparse_ring import _exchange, _local_positions, _post, checked_plan


@dataclass(frozen=True)
class HierarchyGroups:
    """The sub-groups of a hierarchical ring, as seen by one rank (see :func:`hierarchy_groups`)."""

    #: This rank's node: ``node_size`` ranks, group rank = local index.
    node: dist.ProcessGroup
    #: The ranks with this rank's local index on every node: ``world / node_size`` ranks, group rank = node.
    cross: dist.ProcessGroup
    node_size: int
    #: Ranks of the whole context-parallel group.
    world: int


def hierarchy_groups(node_size: int, group: dist.ProcessGroup | None = None) -> HierarchyGroups | None:
    """Build the node-local and cross-node groups of ``group`` (node-major numbering, ``node_size`` per node).

    Collective over the default process group: every rank of the job calls it, in the same order relative to
    its other ``new_group`` calls. Returns None on ranks outside ``group``.
    """
    group = group or dist.group.WORLD
    members = dist.get_process_group_ranks(group)
    world = len(members)
    if node_size < 1 or world % node_size:
        raise ValueError(f"node_size={node_size} must divide the group's {world} ranks (whole nodes)")
    me = dist.get_rank()
    node_group = cross_group = None
    for node in range(world // node_size):
        ranks = members[node * node_size : (node + 1) * node_size]
        created = dist.new_group(ranks)
        if me in ranks:
            node_group = created
    for local in range(node_size):
        ranks = members[local::node_size]
        created = dist.new_group(ranks)
        if me in ranks:
            cross_group = created
    if node_group is None or cross_group is None:
        return None
    return HierarchyGroups(node_group, cross_group, node_size, world)


@dataclass
class HierarchicalRingStats:
    """K/V bytes (gradients in the backward) this rank sent: inter-node per node offset ``t`` (0 at ``t = 0``)
    and intra-node per ``[t][u]`` inner step (0 at ``u = 0``)."""

    forward_inter: list[int] = field(default_factory=list)
    forward_intra: list[list[int]] = field(default_factory=list)
    backward_inter: list[int] = field(default_factory=list)
    backward_intra: list[list[int]] = field(default_factory=list)


def _refs(plan: StripedPlan, reader: int, owner: int) -> torch.Tensor:
    """Sorted global blocks of rank ``owner`` that rank ``reader``'s queries reference."""
    return plan.needed[(reader - owner) % plan.world][reader]


def _node_refs(plan: StripedPlan, node: int, owner: int, node_size: int) -> torch.Tensor:
    """Sorted global blocks of rank ``owner`` that any rank of ``node`` references."""
    parts = [_refs(plan, node * node_size + local, owner) for local in range(node_size)]
    return torch.unique(torch.cat(parts))  # sorted


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _wait(requests: list) -> None:
    for request in requests:
        request.wait()


class _HierarchicalSparseRing(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, q, k, v, pattern: BlockPattern, plan, groups: HierarchyGroups, rank, scale, stats, backend
    ):
        world, size = plan.world, groups.node_size
        nodes, (node, local) = world // size, divmod(rank, size)
        block, device = pattern.block, q.device
        my_q = torch.arange(rank, pattern.active_BHQK.shape[2], world, device=device)
        attend = StepAttention(pattern, my_q, scale, backend)
        kv_local = torch.stack([k, v])

        def shape(blocks: torch.Tensor) -> tuple[int, ...] | None:
            return (2, k.shape[0], len(blocks) * block, *k.shape[2:]) if len(blocks) else None

        def own(blocks: torch.Tensor) -> torch.Tensor | None:
            return kv_local[:, :, _local_positions(blocks.to(device), world, block)] if len(blocks) else None

        out = lse = None
        saved = []
        pending: tuple[list, torch.Tensor | None] = ([], None)
        for t in range(nodes):
            source = (node - t) % nodes
            carried = _node_refs(plan, node, source * size + local, size)
            kv_t = own(carried) if t == 0 else pending[1]
            if stats is not None and t == 0:
                stats.forward_inter.append(0)
            if t + 1 < nodes:  # prefetch the next offset's blocks behind this offset's inner ring
                to_node, from_node = (node + t + 1) % nodes, (node - t - 1) % nodes
                send = own(_node_refs(plan, to_node, rank, size))
                take = _node_refs(plan, node, from_node * size + local, size)
                pending = _post(send, shape(take), to_node, from_node, groups.cross, k)
                if stats is not None:
                    stats.forward_inter.append(_nbytes(send))
            intra, steps = [], []
            for u in range(size):
                src, dst = (local - u) % size, (local + u) % size
                want = _refs(plan, rank, source * size + src).to(device)
                if u == 0:
                    kv = kv_t[:, :, _carried_positions(carried, want, block)] if len(want) else None
                    sent = 0
                else:
                    give = _refs(plan, node * size + dst, source * size + local).to(device)
                    send = kv_t[:, :, _carried_positions(carried, give, block)] if len(give) else None
                    kv = _exchange(send, shape(want), dst, src, groups.node, k)
                    sent = _nbytes(send)
                intra.append(sent)
                steps.append((want, kv))
                if kv is not None:
                    out, lse = attend.forward(q, kv, want, out, lse)
            if stats is not None:
                stats.forward_intra.append(intra)
            saved.append((carried, steps))
            _wait(pending[0])  # the inter-node transfer ran while the inner ring computed
            pending = ([], pending[1])
        if out is None:  # no query of this rank sees any key
            out = torch.zeros(q.shape, dtype=torch.float32, device=device)
            lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), device=device)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.saved, ctx.pattern, ctx.plan, ctx.groups = saved, pattern, plan, groups
        ctx.rank, ctx.stats, ctx.attend = rank, stats, attend
        ctx.mark_non_differentiable(lse)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        pattern, plan, groups, rank, stats, attend = (
            ctx.pattern, ctx.plan, ctx.groups, ctx.rank, ctx.stats, ctx.attend,
        )  # fmt: skip
        world, size = plan.world, groups.node_size
        nodes, (node, local) = world // size, divmod(rank, size)
        block, device = pattern.block, q.device
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        dq = torch.zeros(q.shape, dtype=acc, device=device)
        dkv = torch.zeros((2, *k.shape), dtype=acc, device=device)

        def shape(blocks: torch.Tensor) -> tuple[int, ...] | None:
            return (2, k.shape[0], len(blocks) * block, *k.shape[2:]) if len(blocks) else None

        def settle(pending) -> None:
            requests, back, mine = pending
            _wait(requests)
            if back is not None:
                dkv[:, :, _local_positions(mine.to(device), world, block)] += back

        pending = ([], None, None)
        for t, (carried, steps) in enumerate(ctx.saved):
            source = (node - t) % nodes
            carried_dev = carried.to(device)
            grad_carried = torch.zeros((2, *k.shape[:1], len(carried) * block, *k.shape[2:]), dtype=acc,
                                       device=device)  # fmt: skip
            intra = []
            for u, (want, kv) in enumerate(steps):
                src, dst = (local - u) % size, (local + u) % size
                grads = None
                if kv is not None:
                    grads = attend.backward(dout, q, kv, want, out, lse, dq)
                if u == 0:
                    if grads is not None:
                        grad_carried[:, :, _carried_positions(carried_dev, want, block)] += grads
                    intra.append(0)
                    continue
                # Gradients of what we received go back to its holder (src); ours come back from dst.
                gave = _refs(plan, node * size + dst, source * size + local).to(device)
                back = _exchange(grads, shape(gave), src, dst, groups.node, dq)
                intra.append(_nbytes(grads))
                if back is not None:
                    grad_carried[:, :, _carried_positions(carried_dev, gave, block)] += back
            if stats is not None:
                stats.backward_intra.append(intra)
            settle(pending)  # the previous offset's inter-node gradients, overlapped with this inner ring
            if t == 0:
                if len(carried):
                    dkv[:, :, _local_positions(carried_dev, world, block)] += grad_carried
                pending = ([], None, None)
                if stats is not None:
                    stats.backward_inter.append(0)
                continue
            # The carried set's gradients go back to its owner (source node); ours come from node + t.
            to_node = (node + t) % nodes
            mine = _node_refs(plan, to_node, rank, size)
            send = grad_carried if len(carried) else None
            requests, back = _post(send, shape(mine), source, to_node, groups.cross, dq)
            pending = (requests, back, mine)
            if stats is not None:
                stats.backward_inter.append(_nbytes(send))
        settle(pending)
        return (
            dq.to(q.dtype),
            dkv[0].to(k.dtype),
            dkv[1].to(v.dtype),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _carried_positions(carried: torch.Tensor, blocks: torch.Tensor, block: int) -> torch.Tensor:
    """Token positions, in a carried buffer holding the sorted blocks ``carried``, of ``blocks`` (⊆ carried)."""
    return token_index(torch.searchsorted(carried.to(blocks.device), blocks), block)


def hierarchical_sparse_ring_attention(
    q_BSHD: torch.Tensor,
    k_BSHD: torch.Tensor,
    v_BSHD: torch.Tensor,
    pattern: BlockPattern,
    group: dist.ProcessGroup | None = None,
    *,
    node_size: int,
    scale: float | None = None,
    groups: HierarchyGroups | None = None,
    plan: StripedPlan | None = None,
    stats: HierarchicalRingStats | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention of this rank's striped blocks over a two-level ring: ``(out_BSHD, lse_BHS)``.

    Same inputs, layout and results as :func:`~.sparse_ring.sparse_ring_attention` (q ``[B, S_local, Hq, D]``,
    k/v ``[B, S_local, Hkv, D]``, global block ``t·W + rank`` at local block ``t``); ``group`` (default: the
    world) is numbered node-major with ``node_size`` ranks per node. ``groups``: :func:`hierarchy_groups` of
    ``group`` (built on the spot when absent, see the module docstring); ``plan``: :func:`plan_striped` of
    the pattern; ``stats`` (optional) records intra- and inter-node bytes per step; ``backend``: each step's
    local math (:mod:`.sparse_compute`). Differentiable in q, k, v.
    """
    group = group or dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if node_size < 1 or world % node_size:
        raise ValueError(f"node_size={node_size} must divide the group's {world} ranks (whole nodes)")
    if groups is None:
        if world != dist.get_world_size():
            raise ValueError(
                "group is a sub-group of the job: build its node and cross-node groups once on every rank "
                "with hierarchy_groups(node_size, group) and pass them as groups="
            )
        groups = hierarchy_groups(node_size, group)
    if groups.node_size != node_size or groups.world != world:
        raise ValueError(
            f"groups are for {groups.world} ranks of {groups.node_size} per node; the call has {world} ranks "
            f"of {node_size}"
        )
    if dist.get_rank(groups.node) != rank % node_size or dist.get_rank(groups.cross) != rank // node_size:
        raise ValueError(
            f"rank {rank} is local rank {dist.get_rank(groups.node)} of its node group and rank "
            f"{dist.get_rank(groups.cross)} of its cross-node group; node-major numbering needs "
            f"{rank % node_size} and {rank // node_size}"
        )
    plan = checked_plan(q_BSHD, k_BSHD, pattern, world, plan)
    scale = scale if scale is not None else q_BSHD.shape[-1] ** -0.5
    backend = resolve_backend(backend, q_BSHD, pattern.block)
    return _HierarchicalSparseRing.apply(
        q_BSHD, k_BSHD, v_BSHD, pattern, plan, groups, rank, scale, stats, backend
    )
