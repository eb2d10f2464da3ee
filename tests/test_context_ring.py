"""Ring and hybrid context-parallel attention against the fp64 single-process reference; the public API's
checks (tier 1). Same case matrix as the Ulysses/all-gather tests (tests/cp_reference.py)."""

from __future__ import annotations

import itertools
from functools import partial

import pytest
import torch
import torch.distributed as dist
from cp_reference import LAYOUT_BLOCK, MASKS, TOLERANCE, errors_vs_reference, problem, run_sharded

from sparsetron.dist import ParallelDims
from sparsetron.parallel.context import ContextParallelError, context_attention
from sparsetron.parallel.context.hybrid import hybrid_attention
from sparsetron.parallel.context.patterns import sliding_window_sinks
from sparsetron.parallel.context.ring import ring_attention

HEADS_CASES = ("mha8/8", "gqa8/2", "mqa8/1")
WORLDS = (2, 4, 8)
RING_CASES = list(itertools.product(LAYOUT_BLOCK, MASKS, HEADS_CASES))
# (world, Ulysses degree): a ring of world / degree Ulysses groups.
HYBRIDS = ((4, 2), (8, 2), (8, 4))


def _run(method: str, inputs, layout: str, mask_kwargs: dict, ulysses: int | None):
    if method == "ring":
        fn = ring_attention
    else:
        mesh = ParallelDims(
            dist.get_world_size(), dp_shard=1, cp=dist.get_world_size(), cp_ulysses=ulysses
        ).build_mesh("cpu")
        fn = partial(_hybrid, ring_group=mesh.group("cp_ring"), ulysses_group=mesh.group("cp_ulysses"))
    return run_sharded(
        fn, inputs, group=dist.group.WORLD, layout=layout, block=LAYOUT_BLOCK[layout], **mask_kwargs
    )


def _hybrid(q, k, v, *, group, ring_group, ulysses_group, **kwargs):
    # cp rank = ring rank × U + Ulysses rank = world rank, so the world's layout indices apply unchanged.
    return hybrid_attention(q, k, v, ring_group=ring_group, ulysses_group=ulysses_group, **kwargs)


@pytest.fixture(scope="module")
def errors_of(ranks):
    measured: dict[tuple, dict[str, float]] = {}

    def errors(world: int, method: str, layout: str, mask: str, heads: str, ulysses: int | None = None):
        key = (world, method, layout, mask, heads, ulysses)
        if key not in measured:
            inputs, reference, mask_kwargs = problem(mask, heads)
            per_rank = ranks.run(world, _run, method, inputs, layout, mask_kwargs, ulysses)
            measured[key] = errors_vs_reference(
                per_rank, reference, layout=layout, block=LAYOUT_BLOCK[layout]
            )
        return measured[key]

    return errors


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize(("layout", "mask", "heads"), RING_CASES)
def test_ring_matches_fp64_reference(errors_of, world, layout, mask, heads):
    errors = errors_of(world, "ring", layout, mask, heads)
    assert max(errors.values()) <= TOLERANCE, errors


@pytest.mark.parametrize(("layout", "mask", "heads"), RING_CASES)
def test_ring_error_does_not_grow_with_world(errors_of, layout, mask, heads):
    at_2, at_8 = errors_of(2, "ring", layout, mask, heads), errors_of(8, "ring", layout, mask, heads)
    for field in at_2:
        assert at_8[field] <= 4 * at_2[field] + 1e-7, (field, at_2, at_8)


@pytest.mark.parametrize(("world", "ulysses"), HYBRIDS)
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("heads", HEADS_CASES)
def test_hybrid_matches_fp64_reference(errors_of, world, ulysses, mask, heads):
    errors = errors_of(world, "hybrid", "zigzag", mask, heads, ulysses)
    assert max(errors.values()) <= TOLERANCE, errors


def _api_error(kwargs: dict) -> str:
    q = torch.zeros(1, 8, 4, 8)
    k = torch.zeros(1, 8, 2, 8)
    if kwargs.get("pattern") == "window4":
        kwargs = {**kwargs, "pattern": sliding_window_sinks(1, 2, 16, 4, window_blocks=1)}
    try:
        context_attention(q, k, k, group=dist.group.WORLD, **kwargs)
    except (ContextParallelError, ValueError) as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"method": "sparse_ring"}, "method='sparse_ring' needs pattern=BlockPattern"),
        ({"method": "sparse_ring", "pattern": "window4"}, "needs layout='striped' with block=4"),
        ({"method": "ring", "pattern": object()}, "pattern= only applies to method='sparse_ring'"),
        (
            {"method": "ulysses", "node_size": 2},
            "node_size= only applies to method='sparse_ring'; method='ulysses'",
        ),
        (
            {"method": "sparse_ring", "pattern": "window4", "layout": "striped", "block": 4, "node_size": 3},
            "node_size dividing the group's 2 ranks (whole nodes), got node_size=3",
        ),
        ({"method": "ring", "window": 4, "causal": False}, "window=4 needs causal=True"),
        ({"method": "hybrid"}, "method='hybrid' needs group=(ring_group, ulysses_group)"),
        ({"method": "ulysses_ring"}, "method='ulysses_ring' is not one of ring, ulysses, hybrid, allgather"),
        ({"method": "ring", "layout": "zigzag", "block": 1}, "no error"),
        ({"method": "ring", "layout": "striped", "block": 3}, "is not divisible by cp × block = 2 × 3"),
    ],
)
def test_context_attention_rejects_bad_arguments_clearly(ranks, kwargs, fragment):
    messages = ranks.run(2, _api_error, kwargs)
    assert all(fragment in m for m in messages), messages


def _bad_shapes() -> list[str]:
    out = []
    group = dist.group.WORLD
    for q, k in (((1, 8, 4, 8), (1, 8, 3, 8)), ((1, 8, 4, 8), (1, 6, 2, 8)), ((8, 4, 8), (8, 2, 8))):
        try:
            context_attention(torch.zeros(q), torch.zeros(k), torch.zeros(k), group=group)
        except ContextParallelError as exc:
            out.append(str(exc))
    return out


def test_bad_shapes_name_the_values(ranks):
    messages = ranks.run(2, _bad_shapes)[0]
    assert "Hq=4 must be a multiple of key/value heads Hkv=3" in messages[0]
    assert "must agree on B, S_local and D" in messages[1]
    assert "expected q [B, S_local, Hq, D]" in messages[2]
