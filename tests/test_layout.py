"""ParallelDims validation (tier 0, property-based) and real meshes on 1-8 gloo ranks (tier 1)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsetron.dist import LayoutError, ParallelDims
from sparsetron.dist.layout import (
    DENSE_AXES,
    EXPERT_AXES,
    FLAT_AXES,
    all_layouts,
    layout_problems,
    mesh_axis_names,
)


def oracle_group(
    shape: tuple[int, ...], names: tuple[str, ...], axes: tuple[str, ...], rank: int
) -> list[int]:
    """Ranks sharing ``rank``'s coordinates on every axis not in ``axes``, on ``torch.arange(world).view(shape)``.

    Written independently of ParallelDims.groups_of (coordinates, not permute/reshape).
    """
    grid = torch.arange(int(torch.tensor(shape).prod())).view(*shape)
    coords = {
        int(r): c for c, r in zip(itertools.product(*map(range, shape)), grid.flatten().tolist(), strict=True)
    }
    fixed = [i for i, n in enumerate(names) if n not in axes]
    mine = coords[rank]
    return sorted(r for r, c in coords.items() if all(c[i] == mine[i] for i in fixed))


def layouts(max_world: int = 16):
    return st.integers(1, max_world).flatmap(lambda w: st.sampled_from(all_layouts(w)))


# -- tier 0: validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "resolved_dp_shard"),
    [
        ({"world_size": 1}, 1),
        ({"world_size": 8}, 8),
        ({"world_size": 8, "cp": 2}, 4),
        ({"world_size": 8, "dp_replicate": 2, "cp": 2, "ep": 2}, 2),
        ({"world_size": 8, "dp_shard": 2, "cp": 4, "ep": 8}, 2),
        ({"world_size": 12, "dp_replicate": 3, "cp": 2, "ep": 4, "cp_ulysses": 2}, 2),
    ],
)
def test_valid_layouts_resolve_dp_shard(kwargs, resolved_dp_shard):
    dims = ParallelDims(**kwargs)
    assert dims.dp_shard == resolved_dp_shard
    assert dims.dp_replicate * dims.dp_shard * dims.cp == dims.world_size


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        (
            {"world_size": 6, "cp": 4},
            ["world_size=6", "cp=4", "dp_replicate × cp = 1 × 4 = 4", "parallel.cp=2", "parallel.cp=3"],
        ),
        ({"world_size": 8, "dp_shard": 3, "cp": 2}, ["1 × 3 × 2 = 6 must equal world_size=8"]),
        (
            {"world_size": 8, "dp_shard": 2, "cp": 2, "ep": 8, "dp_replicate": 2},
            ["ep=8 must divide dp_shard × cp = 2 × 2 = 4"],
        ),
        ({"world_size": 4, "cp": 4, "cp_ulysses": 3}, ["cp_ulysses=3 must divide cp=4"]),
        ({"world_size": 4, "cp": 0}, ["cp=0 must be a positive integer"]),
        ({"world_size": 4, "dp_shard": -2}, ["dp_shard=-2 must be a positive integer, or -1"]),
        ({"world_size": 4, "ep": 1.5}, ["ep=1.5 must be an integer"]),
        ({"world_size": 4, "cp": True}, ["cp=True must be an integer"]),
        ({"world_size": 0}, ["world_size=0 must be a positive integer"]),
    ],
)
def test_invalid_layouts_name_every_factor(kwargs, fragments):
    with pytest.raises(LayoutError) as info:
        ParallelDims(**kwargs)
    message = str(info.value)
    for degree in ("dp_replicate=", "dp_shard=", "cp=", "ep=", "cp_ulysses="):
        assert degree in message
    for fragment in fragments:
        assert fragment in message


def test_suggestions_are_valid_and_fix_the_problem():
    with pytest.raises(LayoutError) as info:
        ParallelDims(6, cp=4)
    suggested = [
        line.strip() for line in str(info.value).splitlines() if line.strip().startswith("parallel.")
    ]
    assert len(suggested) == 3
    for line in suggested:
        degrees = dict(item.removeprefix("parallel.").split("=") for item in line.split())
        dims = ParallelDims(6, **{k: int(v) for k, v in degrees.items()})
        assert dims.world_size == 6


@settings(max_examples=300, deadline=None)
@given(
    world=st.integers(1, 64),
    dp_replicate=st.integers(-1, 9),
    dp_shard=st.integers(-2, 9),
    cp=st.integers(-1, 9),
    ep=st.integers(0, 9),
    cp_ulysses=st.integers(0, 5),
)
def test_validation_agrees_with_the_rules(world, dp_replicate, dp_shard, cp, ep, cp_ulysses):
    """A layout constructs iff it obeys every rule, written out independently here."""
    positive = all(x >= 1 for x in (dp_replicate, cp, ep, cp_ulysses)) and (dp_shard >= 1 or dp_shard == -1)
    ok = positive
    if ok:
        shard = world // (dp_replicate * cp) if dp_shard == -1 else dp_shard
        ok = (
            dp_replicate * shard * cp == world
            and (dp_shard != -1 or world % (dp_replicate * cp) == 0)
            and cp % cp_ulysses == 0
            and (shard * cp) % ep == 0
        )
    assert (layout_problems(world, dp_replicate, dp_shard, cp, ep, cp_ulysses) == []) == ok
    if ok:
        dims = ParallelDims(world, dp_replicate, dp_shard, cp, ep, cp_ulysses)
        assert dims.edp * dims.ep == dims.dp_shard * dims.cp
        assert dims.cp_ring * dims.cp_ulysses == dims.cp
    else:
        with pytest.raises(LayoutError):
            ParallelDims(world, dp_replicate, dp_shard, cp, ep, cp_ulysses)


@settings(max_examples=150, deadline=None)
@given(dims=layouts(), data=st.data())
def test_groups_match_the_arange_oracle(dims, data):
    rank = data.draw(st.integers(0, dims.world_size - 1))
    for axis in mesh_axis_names():
        if axis in EXPERT_AXES and axis not in DENSE_AXES:
            shape, names, spans = dims.expert_shape(), EXPERT_AXES, (axis,)
        else:
            shape, names, spans = dims.dense_shape(), DENSE_AXES, FLAT_AXES.get(axis, (axis,))
        expected = oracle_group(shape, names, spans, rank)
        groups = dims.groups_of(axis)
        mine = [g for g in groups if rank in g]
        assert len(mine) == 1 and sorted(mine[0]) == expected, (axis, dims)
        assert sorted(r for g in groups for r in g) == list(range(dims.world_size))


@settings(max_examples=100, deadline=None)
@given(dims=layouts())
def test_ep_groups_lie_inside_dp_shard_cp_groups(dims):
    """Folding: an expert group never spans two replicas, so experts never leave their replica."""
    replica_of = {r: i for i, g in enumerate(dims.groups_of("dp_shard_cp")) for r in g}
    for group in dims.groups_of("ep"):
        assert len({replica_of[r] for r in group}) == 1


def test_all_layouts_enumerates_each_valid_layout_once():
    found = all_layouts(8)
    assert len(found) == len(set(found))
    brute = {
        (r, s, c, e, u)
        for r, s, c, e, u in itertools.product(range(1, 9), repeat=5)
        if not layout_problems(8, r, s, c, e, u)
    }
    assert {(d.dp_replicate, d.dp_shard, d.cp, d.ep, d.cp_ulysses) for d in found} == brute


def test_unknown_axis_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown mesh axis 'tp'; known: dp_replicate"):
        ParallelDims(4).groups_of("tp")


# -- tier 1: real meshes on gloo ranks ----------------------------------------------------------------


def _mesh_groups(layout: dict) -> dict:
    """On every rank: build the mesh, report each axis's group ranks, coordinate and an all-reduce over it."""
    dims = ParallelDims(world_size=dist.get_world_size(), **layout)
    mesh = dims.build_mesh("cpu")
    out = {}
    for axis in mesh_axis_names():
        group = mesh.group(axis)
        total = torch.tensor([float(dist.get_rank())])
        dist.all_reduce(total, group=group)
        out[axis] = {
            "ranks": sorted(dist.get_process_group_ranks(group)),
            "coordinate": mesh.coordinate(axis),
            "sum": total.item(),
        }
    return out


MESH_CASES = [
    (1, {}),
    (2, {"cp": 2}),
    (2, {"dp_replicate": 2, "ep": 1}),
    (4, {"dp_shard": 2, "cp": 2, "ep": 2}),
    (4, {"cp": 4, "cp_ulysses": 2, "ep": 4}),
    (4, {"dp_replicate": 2, "cp": 2, "ep": 2}),
    (8, {"dp_replicate": 2, "dp_shard": 2, "cp": 2, "ep": 4}),
    (8, {"cp": 8, "cp_ulysses": 4, "ep": 2}),
]


@pytest.mark.parametrize(
    ("world", "layout"),
    MESH_CASES,
    ids=[f"w{w}-{'-'.join(f'{k}{v}' for k, v in case.items()) or 'dp'}" for w, case in MESH_CASES],
)
def test_mesh_groups_on_real_ranks(ranks, world, layout):
    dims = ParallelDims(world_size=world, **layout)
    results = ranks.run(world, _mesh_groups, layout)
    for rank, per_axis in enumerate(results):
        for axis, got in per_axis.items():
            if axis in EXPERT_AXES and axis not in DENSE_AXES:
                expected = oracle_group(dims.expert_shape(), EXPERT_AXES, (axis,), rank)
            else:
                expected = oracle_group(dims.dense_shape(), DENSE_AXES, FLAT_AXES.get(axis, (axis,)), rank)
            assert got["ranks"] == expected, (rank, axis)
            assert got["coordinate"] == expected.index(rank), (rank, axis)
            assert got["sum"] == float(sum(expected)), (rank, axis)


def _two_layouts() -> tuple[list[int], list[int]]:
    world = dist.get_world_size()
    a = ParallelDims(world, cp=2, ep=4).build_mesh("cpu")
    b = ParallelDims(world, dp_replicate=2, cp=2, ep=2).build_mesh("cpu")
    return sorted(dist.get_process_group_ranks(a.group("dp_shard"))), sorted(
        dist.get_process_group_ranks(b.group("dp_replicate"))
    )


def test_two_layouts_coexist_in_one_process(ranks):
    results = ranks.run(4, _two_layouts)
    assert results == [([0, 2], [0, 2]), ([1, 3], [1, 3]), ([0, 2], [0, 2]), ([1, 3], [1, 3])]


def _mesh_for_wrong_world() -> None:
    ParallelDims(dist.get_world_size() * 2).build_mesh("cpu")


def test_mesh_refuses_a_world_size_mismatch(ranks):
    from multirank import RankFailure

    with pytest.raises(RankFailure, match="ParallelDims\\(world_size=4\\) but the process group has 2 ranks"):
        ranks.run(2, _mesh_for_wrong_world)
