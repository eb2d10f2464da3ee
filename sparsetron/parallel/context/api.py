"""``context_attention``: one entry point for every context-parallel attention method, and the model core."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from sparsetron.parallel.context.layouts import check_shardable, global_token_index

if TYPE_CHECKING:
    from sparsetron.parallel.context.sparse_hier import HierarchyGroups

METHODS = ("ring", "ulysses", "hybrid", "allgather", "sparse_ring")


class ContextParallelError(ValueError):
    """Arguments no context-parallel method can run with; the message names the values and a valid choice."""


def _cp_rank_world(group, method: str) -> tuple[int, int]:
    if method == "hybrid":
        if not (isinstance(group, tuple) and len(group) == 2):
            raise ContextParallelError(
                "method='hybrid' needs group=(ring_group, ulysses_group): the ring across nodes and the Ulysses "
                "all-to-all inside a node (ParallelMesh.group('cp_ring'), ParallelMesh.group('cp_ulysses'))"
            )
        ring, ulysses = group
        size = dist.get_world_size(ulysses)
        # cp rank = ring coordinate × Ulysses degree + Ulysses coordinate (row-major, as ParallelDims lays it out)
        return dist.get_rank(ring) * size + dist.get_rank(ulysses), dist.get_world_size(ring) * size
    return dist.get_rank(group), dist.get_world_size(group)


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ContextParallelError(
            f"expected q [B, S_local, Hq, D] and k, v [B, S_local, Hkv, D]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ContextParallelError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on B, S_local and D"
        )
    if q.shape[2] % k.shape[2]:
        raise ContextParallelError(
            f"query heads Hq={q.shape[2]} must be a multiple of key/value heads Hkv={k.shape[2]} (GQA groups)"
        )
    if doc_ids is not None and tuple(doc_ids.shape) != tuple(q.shape[:2]):
        raise ContextParallelError(
            f"doc_ids must be [B, S_local] = {tuple(q.shape[:2])}, got {tuple(doc_ids.shape)}"
        )


def context_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group,
    layout: str = "zigzag",
    method: str = "ring",
    causal: bool = True,
    doc_ids: torch.Tensor | None = None,
    window: int | None = None,
    pattern=None,
    scale: float | None = None,
    block: int = 1,
    node_size: int | None = None,
    node_groups: HierarchyGroups | None = None,
) -> torch.Tensor:
    """Exact attention over a sequence sharded across a context-parallel group; returns this rank's output.

    q: [B, S_local, Hq, D]; k, v: [B, S_local, Hkv, D], sharded with ``shard_sequence(..., layout, block)``;
    doc_ids: this rank's shard of document ids [B, S_local] (tokens attend only within their document);
    window: sliding window in tokens (causal only). Differentiable. Communicates over ``group`` — a
    ProcessGroup, or for ``method="hybrid"`` the pair ``(ring_group, ulysses_group)``.

    ``method="sparse_ring"`` attends within ``pattern`` (a global BlockPattern, the same on every rank) on the
    striped layout. With ``node_size`` below the group's size it runs the hierarchical sparse ring
    (``sparse_hier``): ``group`` is numbered node-major with ``node_size`` ranks per node, an inner ring runs
    over each node's ranks and an outer one across nodes; ``node_groups`` are its node-local and cross-node
    groups (``sparse_hier.HierarchyGroups``), built once by the caller — without them each call builds them,
    which only works when ``group`` is the whole job. Otherwise (``node_size`` None or the group's size) the
    flat sparse ring runs over ``group``.
    """
    if method not in METHODS:
        raise ContextParallelError(f"method={method!r} is not one of {', '.join(METHODS)}")
    if method == "sparse_ring":
        return _sparse_ring(q, k, v, group=group, layout=layout, causal=causal, doc_ids=doc_ids, window=window,
                            pattern=pattern, scale=scale, block=block, node_size=node_size,
                            node_groups=node_groups)  # fmt: skip
    sparse_only = {"pattern": pattern, "node_size": node_size, "node_groups": node_groups}
    given = [f"{name}=" for name, value in sparse_only.items() if value is not None]
    if given:
        raise ContextParallelError(
            f"{' and '.join(given)} only {'applies' if len(given) == 1 else 'apply'} to method='sparse_ring'; "
            f"method={method!r} is dense: drop {'it' if len(given) == 1 else 'them'}"
        )
    if window is not None and (not causal or window < 1):
        raise ContextParallelError(
            f"window={window} needs causal=True and a positive size (a sliding window looks back window tokens)"
        )
    _check_shapes(q, k, v, doc_ids)
    rank, world = _cp_rank_world(group, method)
    check_shardable(q.shape[1] * world, world, layout, block)
    # Host-side indices: the kernels plan their block decomposition on the CPU without device syncs.
    q_index = global_token_index(q.shape[1] * world, rank, world, layout, block)
    kwargs = {"q_index_S": q_index, "causal": causal, "doc_ids_BS": doc_ids, "window": window, "scale": scale}
    if method == "ring":
        from sparsetron.parallel.context.ring import ring_attention

        return ring_attention(q, k, v, group=group, **kwargs)
    if method == "ulysses":
        from sparsetron.parallel.context.ulysses import ulysses_attention

        return ulysses_attention(q, k, v, group=group, **kwargs)
    if method == "allgather":
        from sparsetron.parallel.context.allgather import allgather_attention

        return allgather_attention(q, k, v, group=group, **kwargs)
    from sparsetron.parallel.context.hybrid import hybrid_attention

    return hybrid_attention(q, k, v, ring_group=group[0], ulysses_group=group[1], **kwargs)


def _sparse_ring(q, k, v, *, group, layout, causal, doc_ids, window, pattern, scale, block, node_size,
                 node_groups) -> torch.Tensor:  # fmt: skip
    """:func:`context_attention` with ``method='sparse_ring'``: checks, then the flat or hierarchical sparse
    ring's output."""
    from sparsetron.parallel.context.patterns import BlockPattern
    from sparsetron.parallel.context.sparse_hier import hierarchical_sparse_ring_attention
    from sparsetron.parallel.context.sparse_ring import sparse_ring_attention

    if not isinstance(pattern, BlockPattern):
        raise ContextParallelError(
            "method='sparse_ring' needs pattern=BlockPattern (sparsetron.parallel.context.patterns: e.g. "
            "block_topk or vertical_slash estimated from gathered inputs), the same on every rank"
        )
    problems = []
    if layout != "striped" or block != pattern.block:
        problems.append(
            f"layout='striped' with block={pattern.block} (the pattern's), got {layout!r}/{block}"
        )
    if not causal or not pattern.causal:
        problems.append("causal=True and a causal pattern")
    if doc_ids is not None or window is not None:
        problems.append("no doc_ids/window (fold them into the pattern: sliding_window_sinks, a block mask)")
    world = dist.get_world_size(group)
    if node_size is not None and (node_size < 1 or world % node_size):
        problems.append(
            f"node_size dividing the group's {world} ranks (whole nodes), got node_size={node_size}"
        )
    if node_groups is not None and node_size is None:
        problems.append("node_size= with node_groups= (the ranks per node they were built for)")
    if problems:
        raise ContextParallelError("method='sparse_ring' needs " + "; ".join(problems))
    _check_shapes(q, k, v, None)
    if node_size is None or node_size == world:
        return sparse_ring_attention(q, k, v, pattern, group, scale=scale)[0]
    return hierarchical_sparse_ring_attention(q, k, v, pattern, group, node_size=node_size, scale=scale,
                                              groups=node_groups)[0]  # fmt: skip


class ContextParallelAttention(nn.Module):
    """Model attention core (see ``Transformer.set_attention_core``) that runs :func:`context_attention`.

    The model then sees only this rank's shard of every sequence (tokens, RoPE positions and doc ids sharded
    with the same layout). No parameters.
    """

    def __init__(
        self,
        group,
        *,
        method: str = "ring",
        layout: str = "zigzag",
        block: int = 1,
        window: int | None = None,
    ):
        super().__init__()
        self.group, self.method, self.layout, self.block, self.window = group, method, layout, block, window

    def forward(
        self,
        q_BSHD: torch.Tensor,
        k_BSHD: torch.Tensor,
        v_BSHD: torch.Tensor,
        *,
        doc_ids_BS: torch.Tensor | None = None,
        positions_BS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return context_attention(
            q_BSHD,
            k_BSHD,
            v_BSHD,
            group=self.group,
            layout=self.layout,
            method=self.method,
            doc_ids=doc_ids_BS,
            window=self.window,
            block=self.block,
        )

    def extra_repr(self) -> str:
        return f"method={self.method}, layout={self.layout}, block={self.block}, window={self.window}"
