"""Ulysses and all-gather context-parallel attention against the fp64 single-process reference (tier 1).

Every case shards one unsharded problem over W gloo ranks with a layout, runs forward and backward, and compares
each rank's out/dq/dk/dv with its shard of the fp64 reference (tests/cp_reference.py).
"""

from __future__ import annotations

import itertools
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from cp_reference import (
    BATCH,
    HEAD_DIM,
    HEADS,
    LAYOUT_BLOCK,
    MASKS,
    SEQ,
    TOLERANCE,
    errors_vs_reference,
    make_inputs,
    problem,
    run_sharded,
    shard_for_rank,
)

from sparsetron.parallel.context.allgather import allgather_attention
from sparsetron.parallel.context.autograd_ops import AllGatherSequence, SeqToHeads
from sparsetron.parallel.context.layouts import ShardingError
from sparsetron.parallel.context.ulysses import check_ulysses_heads, ulysses_attention

METHODS = {"ulysses": ulysses_attention, "allgather": allgather_attention}
CASES = list(itertools.product(METHODS, LAYOUT_BLOCK, MASKS, HEADS))
WORLDS = (2, 4, 8)


def _run_method(method: str, inputs, layout: str, mask_kwargs: dict, group_size: int | None = None):
    """Rank side: this rank's result of ``method`` on its shard, over the world or over subgroups of
    ``group_size`` consecutive ranks (each subgroup running its own problem ``inputs[subgroup index]``)."""
    if group_size is None:
        return run_sharded(
            METHODS[method],
            inputs,
            group=dist.group.WORLD,
            layout=layout,
            block=LAYOUT_BLOCK[layout],
            **mask_kwargs,
        )
    group, subgroups = dist.new_subgroups(group_size)
    try:
        mine = inputs[dist.get_rank() // group_size]
        return run_sharded(
            METHODS[method], mine, group=group, layout=layout, block=LAYOUT_BLOCK[layout], **mask_kwargs
        )
    finally:
        for subgroup in subgroups:
            dist.destroy_process_group(subgroup)


@pytest.fixture(scope="module")
def errors_of(ranks):
    """``errors_of(world, method, layout, mask, heads)`` → worst relative error per field; each case runs once."""
    measured: dict[tuple, dict[str, float]] = {}

    def errors(world: int, method: str, layout: str, mask: str, heads: str) -> dict[str, float]:
        key = (world, method, layout, mask, heads)
        if key not in measured:
            inputs, reference, mask_kwargs = problem(mask, heads)
            per_rank = ranks.run(world, _run_method, method, inputs, layout, mask_kwargs)
            measured[key] = errors_vs_reference(
                per_rank, reference, layout=layout, block=LAYOUT_BLOCK[layout]
            )
        return measured[key]

    return errors


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize(("method", "layout", "mask", "heads"), CASES)
def test_matches_fp64_reference(errors_of, world, method, layout, mask, heads):
    errors = errors_of(world, method, layout, mask, heads)
    assert max(errors.values()) <= TOLERANCE, errors


@pytest.mark.parametrize(("method", "layout", "mask", "heads"), CASES)
def test_error_does_not_grow_with_world(errors_of, method, layout, mask, heads):
    at_2 = errors_of(2, method, layout, mask, heads)
    at_8 = errors_of(8, method, layout, mask, heads)
    for field in at_2:
        assert at_8[field] <= 4 * at_2[field] + 1e-7, (field, at_2, at_8)


@pytest.mark.parametrize("world", WORLDS)
def test_documents_span_rank_boundaries(world):
    """The doc-id cases only test something if documents cross shards: under the contiguous layout, some
    document holds the tokens on both sides of a rank boundary, and every row has more than one document."""
    inputs, _, _ = problem("causal+docs", "gqa8/2")
    shard_ends = torch.arange(1, world) * (SEQ // world)
    assert (inputs.doc_ids_BS[:, shard_ends - 1] == inputs.doc_ids_BS[:, shard_ends]).any()
    assert (inputs.doc_ids_BS[:, 1:] != inputs.doc_ids_BS[:, :-1]).any(dim=1).all()


@pytest.mark.parametrize("method", METHODS)
def test_bf16_inputs_give_bf16_results_near_reference(ranks, method):
    inputs, reference, mask_kwargs = problem("causal+docs", "gqa8/2", dtype=torch.bfloat16)
    per_rank = ranks.run(4, _run_method, method, inputs, "zigzag", mask_kwargs)
    for result in per_rank:
        assert {t.dtype for t in (result.out_BSHD, result.dq_BSHD, result.dk_BSHD, result.dv_BSHD)} == {
            torch.bfloat16
        }
    errors = errors_vs_reference(per_rank, reference, layout="zigzag")
    assert max(errors.values()) <= 1e-2, errors


@pytest.mark.parametrize("method", METHODS)
def test_each_subgroup_attends_only_its_own_sequence(ranks, method):
    """Two CP groups of 2 inside 4 ranks, different data: the group passed in is the only one used."""
    problems = [problem("causal+docs", "gqa8/2", seed=seed) for seed in (1, 2)]
    mask_kwargs = problems[0][2]
    per_rank = ranks.run(
        4, _run_method, method, [inputs for inputs, _, _ in problems], "zigzag", mask_kwargs, 2
    )
    for index, (_, reference, _) in enumerate(problems):
        errors = errors_vs_reference(per_rank[2 * index : 2 * index + 2], reference, layout="zigzag")
        assert max(errors.values()) <= TOLERANCE, (index, errors)


def _run_without_cpu_backend(method: str, inputs, mask_kwargs: dict):
    """Rank side: ``method`` as if its group had no CPU backend (pure NCCL), so indices travel via q's device."""
    with mock.patch.object(dist, "get_backend_config", lambda group=None: "cuda:nccl"):
        return run_sharded(METHODS[method], inputs, layout="striped", block=2, **mask_kwargs)


@pytest.mark.parametrize("method", METHODS)
def test_indices_gather_through_the_device_when_the_group_has_no_cpu_backend(ranks, method):
    inputs, reference, mask_kwargs = problem("causal+docs", "gqa8/2")
    per_rank = ranks.run(4, _run_without_cpu_backend, method, inputs, mask_kwargs)
    errors = errors_vs_reference(per_rank, reference, layout="striped", block=2)
    assert max(errors.values()) <= TOLERANCE, errors


def _redistribution_facts(kind: str, heads: int):
    """Rank side: the map's output for a known input (contiguous shards, so group-rank order = token order) and
    the two sides of the adjoint identity <M x, y> = <x, Mᵀ y>, summed over ranks."""
    world, rank = dist.get_world_size(), dist.get_rank()
    x_full = torch.arange(BATCH * SEQ * heads * HEAD_DIM, dtype=torch.float64).reshape(
        BATCH, SEQ, heads, HEAD_DIM
    )
    x = shard_for_rank(x_full, rank, world, "contiguous")
    redistribution = (
        SeqToHeads(dist.group.WORLD, heads) if kind == "seq_to_heads" else AllGatherSequence(dist.group.WORLD)
    )
    mapped = redistribution.forward(x)
    y = torch.randn(mapped.shape, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    sides = torch.stack([(mapped * y).sum(), (x * redistribution.adjoint(y, torch.float64)).sum()])
    dist.all_reduce(sides)
    return mapped, sides


@pytest.mark.parametrize(("kind", "heads"), [("seq_to_heads", h) for h in (1, 2, 4, 8)] + [("all_gather", 2)])
def test_redistributions_route_tokens_and_their_adjoints_are_transposes(ranks, kind, heads):
    world = 4
    x_full = torch.arange(BATCH * SEQ * heads * HEAD_DIM, dtype=torch.float64).reshape(
        BATCH, SEQ, heads, HEAD_DIM
    )
    for rank, (mapped, sides) in enumerate(ranks.run(world, _redistribution_facts, kind, heads)):
        if kind == "all_gather":
            expected = x_full
        elif heads >= world:
            per_rank = heads // world
            expected = x_full[:, :, rank * per_rank : (rank + 1) * per_rank]
        else:
            # Fewer heads than ranks: only the single head rank r's query heads read, r // (W / H).
            head = rank // (world // heads)
            expected = x_full[:, :, head : head + 1]
        assert torch.equal(mapped, expected), (rank, mapped.shape, expected.shape)
        torch.testing.assert_close(sides[0], sides[1], rtol=1e-12, atol=0)


def _ulysses_wire(heads: str):
    """Rank side: (dtype, elements) of every all_to_all_single send buffer in one bf16 forward + backward."""
    sent = []
    original = dist.all_to_all_single

    def recording(output, send, *args, **kwargs):
        sent.append((send.dtype, send.numel()))
        return original(output, send, *args, **kwargs)

    inputs, _, mask_kwargs = problem("causal", heads, dtype=torch.bfloat16)
    with mock.patch.object(dist, "all_to_all_single", recording):
        run_sharded(ulysses_attention, inputs, layout="zigzag", **mask_kwargs)
    return sent


@pytest.mark.parametrize("heads", ["gqa8/2", "mqa8/1", "mha8/8"])
def test_ulysses_sends_each_kv_head_only_where_it_is_read(ranks, heads):
    """With W=4: KV heads cross the wire once per rank that reads them (never expanded to Hq); gradients of
    replicated KV heads travel in fp32 (they are summed), everything else in the input dtype."""
    world = 4
    q_heads, kv_heads = HEADS[heads]
    tokens = BATCH * (SEQ // world) * HEAD_DIM  # elements per head of one rank's shard
    kv_sent = tokens * max(kv_heads, world)
    replicated = kv_heads < world
    grad_dtype = torch.float32 if replicated else torch.bfloat16
    expected = [
        (torch.bfloat16, tokens * q_heads),  # q
        (torch.bfloat16, kv_sent),  # k
        (torch.bfloat16, kv_sent),  # v
        (torch.bfloat16, tokens * q_heads),  # out
        (torch.bfloat16, tokens * q_heads),  # dout
        (torch.bfloat16, tokens * q_heads),  # dq
        (grad_dtype, kv_sent),  # dk
        (grad_dtype, kv_sent),  # dv
    ]
    assert ranks.run(world, _ulysses_wire, heads) == [expected] * world


@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "world", "hybrid"),
    [
        (24, 6, 8, "Ulysses degree that divides the heads: [2]"),
        (12, 3, 4, "no hybrid Ulysses degree"),
        (6, 6, 4, "[2]"),
    ],
)
def test_unsplittable_heads_name_the_counts_and_the_alternatives(q_heads, kv_heads, world, hybrid):
    with pytest.raises(ValueError) as info:
        check_ulysses_heads(q_heads, kv_heads, world)
    message = str(info.value)
    for part in (
        f"Hq={q_heads}",
        f"Hkv={kv_heads}",
        f"W={world}",
        "method='ring'",
        "method='allgather'",
        hybrid,
    ):
        assert part in message, (part, message)


@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "world"), [(8, 8, 8), (8, 2, 4), (8, 1, 8), (8, 4, 2), (4, 4, 1)]
)
def test_splittable_heads_pass(q_heads, kv_heads, world):
    check_ulysses_heads(q_heads, kv_heads, world)


def _error_on_every_rank(method: str, inputs, layout: str):
    """Rank side: the ValueError ``method`` raises on this rank's shard, as (type name, message); None if none."""
    try:
        run_sharded(METHODS[method], inputs, layout=layout)
    except ValueError as exc:
        return type(exc).__name__, str(exc)
    return None


def test_ulysses_rejects_unsplittable_heads_on_every_rank_before_communicating(ranks):
    inputs = make_inputs(1, 16, 6, 3, HEAD_DIM)
    errors = ranks.run(4, _error_on_every_rank, "ulysses", inputs, "zigzag")
    assert None not in errors, errors
    assert {name for name, _ in errors} == {"ValueError"}
    assert all("Hq=6" in message and "Hkv=3" in message and "W=4" in message for _, message in errors)


@pytest.mark.parametrize("method", METHODS)
def test_uneven_sequence_raises_the_layouts_sharding_error(ranks, method):
    # 36 tokens split into 4 contiguous shards, but not into the 8 chunks zigzag needs on 4 ranks.
    inputs = make_inputs(1, 36, 8, 2, HEAD_DIM)
    errors = ranks.run(4, _error_on_every_rank, method, inputs, "zigzag")
    assert None not in errors, errors
    assert {name for name, _ in errors} == {ShardingError.__name__}
    assert all("sequence length 36" in message for _, message in errors)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("shapes", "match"),
    [
        ({"index": 3}, "q_index_S has shape"),
        ({"docs": (2, 4)}, "doc_ids_BS has shape"),
        ({"kv_heads": 4}, "must be a multiple of Hkv=4"),
        ({"kv_len": 2}, "must share B, S_local and D"),
    ],
)
def test_inconsistent_local_shapes_fail_before_any_communication(method, shapes, match):
    """Checked without a process group: nothing is sent before the shapes are known to be consistent."""
    q = torch.zeros(1, 4, 6, HEAD_DIM)
    kv = torch.zeros(1, shapes.get("kv_len", 4), shapes.get("kv_heads", 2), HEAD_DIM)
    docs = torch.zeros(shapes["docs"], dtype=torch.int64) if "docs" in shapes else None
    with pytest.raises(ValueError, match=match):
        METHODS[method](
            q, kv, kv, group=None, q_index_S=torch.arange(shapes.get("index", 4)), doc_ids_BS=docs
        )
