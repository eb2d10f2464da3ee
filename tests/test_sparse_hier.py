"""Hierarchical sparse ring on gloo ranks acting as nodes × ranks per node (4 = 2 × 2, 2 = 2 × 1 and 1 × 2,
4 = 4 × 1 and 1 × 4): output, LSE and gradients equal single-process masked attention (fp32, relative error
≤ 1e-5), and the bytes each rank sends across and within nodes are exactly the K/V blocks the pattern
references, counted here from the token mask, independently of the planner."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from sparse_reference import (
    BATCH,
    BLOCK,
    BLOCK_BYTES,
    HKV,
    KERNEL_BLOCK,
    KERNEL_D,
    inputs,
    masked_attention,
    needs_interpreter,
    pattern_of,
    rel,
    stripe,
)

from sparsetron.parallel.context.patterns import BlockPattern, from_block_mask
from sparsetron.parallel.context.sparse_hier import (
    HierarchicalRingStats,
    hierarchical_sparse_ring_attention,
    hierarchy_groups,
)
from sparsetron.parallel.context.sparse_ring import sparse_ring_attention


def _node_local(seq: int, world: int, node_size: int) -> BlockPattern:
    """Causal; each query block sees only key blocks that live on its own node (striped: block i on i mod W)."""
    n = seq // BLOCK
    node = (torch.arange(n) % world) // node_size
    same = node[:, None] == node[None, :]
    return from_block_mask(same.expand(BATCH, HKV, n, n).clone(), BLOCK)


def _pattern(kind: str, q, k, world: int = 4, node_size: int = 2) -> BlockPattern:
    if kind == "node_local":
        return _node_local(q.shape[1], world, node_size)
    return pattern_of(kind, q, k)


def _run(kind: str, seq: int, seed: int, node_size: int, prebuilt: bool):
    world, rank = dist.get_world_size(), dist.get_rank()
    q, k, v, dout = inputs(seq, seed)
    pattern = _pattern(kind, q, k, world, node_size)
    groups = hierarchy_groups(node_size) if prebuilt else None
    idx = stripe(seq, world, rank)
    ql, kl, vl = (t[:, idx].clone().requires_grad_() for t in (q, k, v))
    stats = HierarchicalRingStats()
    out, lse = hierarchical_sparse_ring_attention(
        ql, kl, vl, pattern, node_size=node_size, groups=groups, stats=stats
    )
    (out * dout[:, idx]).sum().backward()
    flat_out, flat_lse = sparse_ring_attention(*(t[:, idx] for t in (q, k, v)), pattern)
    return {"idx": idx, "out": out.detach(), "lse": lse, "dq": ql.grad, "dk": kl.grad, "dv": vl.grad,
            "stats": stats, "flat_out": flat_out, "flat_lse": flat_lse}  # fmt: skip


def _reference(kind: str, seq: int, seed: int, world: int, node_size: int):
    q, k, v, dout = inputs(seq, seed)
    pattern = _pattern(kind, q, k, world, node_size)
    return pattern, masked_attention(q, k, v, dout, pattern)


def _referenced(pattern: BlockPattern) -> torch.Tensor:
    """bool ``[nQ, nK]``: some token of query block q attends to some token of key block k (any batch, head)."""
    mask = pattern.token_mask()  # [B, Hkv, S, S], causal and bars included
    b, h, s, _ = mask.shape
    n = s // BLOCK
    return mask.reshape(b, h, n, BLOCK, n, BLOCK).any(dim=(0, 1, 3, 5))


def _expected_bytes(pattern: BlockPattern, world: int, node_size: int):
    """Per rank: (inter-node bytes per offset t, intra-node bytes per [t][u]) the schedule must send."""
    refs = _referenced(pattern)
    n = refs.shape[0]
    owner = torch.arange(n) % world
    nodes = world // node_size

    def count(readers: torch.Tensor, source: int) -> int:
        """Blocks of rank ``source`` referenced by a query block owned by any rank in ``readers``."""
        rows = torch.isin(owner, readers)
        return int(refs[rows][:, owner == source].any(dim=0).sum())

    expected = []
    for rank in range(world):
        node, local = divmod(rank, node_size)
        inter = [0] + [
            count(torch.arange(node_size) + (node + t) % nodes * node_size, rank) * BLOCK_BYTES
            for t in range(1, nodes)
        ]
        intra = [
            [0]
            + [
                count(
                    torch.tensor([node * node_size + (local + u) % node_size]),
                    (node - t) % nodes * node_size + local,
                )
                * BLOCK_BYTES
                for u in range(1, node_size)
            ]
            for t in range(nodes)
        ]
        expected.append((inter, intra))
    return expected


def _check(ranks, kind: str, world: int, node_size: int, prebuilt: bool = True, seq: int = 16 * BLOCK):
    seed = 5
    per_rank = ranks.run(world, _run, kind, seq, seed, node_size, prebuilt, timeout=120)
    pattern, expected = _reference(kind, seq, seed, world, node_size)
    got = {name: torch.zeros_like(expected[name]) for name in expected}
    for result in per_rank:
        idx = result["idx"]
        for name in ("out", "dq", "dk", "dv"):
            got[name][:, idx] = result[name]
        got["lse"][:, :, idx] = result["lse"]
        # The flat sparse ring and the hierarchical one merge the same partials in another order.
        assert rel(result["out"], result["flat_out"]) <= 1e-5
    for name in expected:
        err = rel(got[name], expected[name])
        assert err <= 1e-5, (kind, world, node_size, name, err)
    expected_bytes = _expected_bytes(pattern, world, node_size)
    nodes = world // node_size
    for rank, result in enumerate(per_rank):
        stats, (inter, intra) = result["stats"], expected_bytes[rank]
        assert stats.forward_inter == inter, (rank, stats.forward_inter, inter)
        assert stats.forward_intra == intra, (rank, stats.forward_intra, intra)
        # The backward returns fp32 gradients of exactly what this rank received, to where it came from:
        # at offset t from the same local rank of node n − t, at inner step u from local rank l − u.
        node, local = divmod(rank, node_size)
        back_inter = [expected_bytes[(node - t) % nodes * node_size + local][0][t] for t in range(nodes)]
        back_intra = [
            [expected_bytes[node * node_size + (local - u) % node_size][1][t][u] for u in range(node_size)]
            for t in range(nodes)
        ]
        assert stats.backward_inter == back_inter, (rank, stats.backward_inter, back_inter)
        assert stats.backward_intra == back_intra, (rank, stats.backward_intra, back_intra)
    return pattern, per_rank


@pytest.mark.parametrize(("world", "node_size"), [(4, 2), (2, 1), (2, 2)])
@pytest.mark.parametrize("kind", ["window", "strided", "topk", "vertical_slash"])
def test_hierarchical_ring_equals_masked_attention(ranks, kind, world, node_size):
    _, per_rank = _check(ranks, kind, world, node_size)
    inter = sum(sum(r["stats"].forward_inter) for r in per_rank)
    if world == node_size:
        assert inter == 0
    else:  # blocks do cross nodes, but fewer than every rank's whole shard to every other node
        shard = 16 // world * BLOCK_BYTES
        assert 0 < inter < world * (world // node_size - 1) * shard


@pytest.mark.parametrize(("world", "node_size"), [(4, 1), (4, 4)])
def test_hierarchical_ring_degenerate_hierarchies(ranks, world, node_size):
    """One rank per node (the outer ring alone) and one node (the inner ring alone)."""
    _check(ranks, "topk", world, node_size)


def test_hierarchical_ring_builds_its_own_groups(ranks):
    _check(ranks, "window", 4, 2, prebuilt=False)


def test_node_local_pattern_sends_nothing_across_nodes(ranks):
    _, per_rank = _check(ranks, "node_local", 4, 2)
    for result in per_rank:
        assert result["stats"].forward_inter == [0, 0]
        assert result["stats"].backward_inter == [0, 0]
        assert sum(result["stats"].forward_intra[0]) > 0  # the inner ring still moves the node's blocks


def _run_kernel(seq: int, seed: int, node_size: int):
    world, rank = dist.get_world_size(), dist.get_rank()
    q, k, v, dout = inputs(seq, seed, KERNEL_D)
    pattern = pattern_of("vertical_slash", q, k, KERNEL_BLOCK)
    idx = stripe(seq, world, rank, KERNEL_BLOCK)
    ql, kl, vl = (t[:, idx].clone().requires_grad_() for t in (q, k, v))
    out, lse = hierarchical_sparse_ring_attention(ql, kl, vl, pattern, node_size=node_size, backend="triton")
    (out * dout[:, idx]).sum().backward()
    return {"idx": idx, "out": out.detach(), "lse": lse, "dq": ql.grad, "dk": kl.grad, "dv": vl.grad}


@needs_interpreter
def test_hierarchical_ring_with_the_triton_kernel(ranks):
    """2 nodes × 2 ranks, each inner step's math in the block-sparse Triton kernel (vertical-slash: bars)."""
    seq, seed = 16 * KERNEL_BLOCK, 5
    per_rank = ranks.run(4, _run_kernel, seq, seed, 2, timeout=240)
    q, k, v, dout = inputs(seq, seed, KERNEL_D)
    expected = masked_attention(q, k, v, dout, pattern_of("vertical_slash", q, k, KERNEL_BLOCK))
    got = {name: torch.zeros_like(expected[name]) for name in expected}
    for result in per_rank:
        for name in ("out", "dq", "dk", "dv"):
            got[name][:, result["idx"]] = result[name]
        got["lse"][:, :, result["idx"]] = result["lse"]
    for name in expected:
        assert rel(got[name], expected[name]) <= 1e-5, (name, rel(got[name], expected[name]))
