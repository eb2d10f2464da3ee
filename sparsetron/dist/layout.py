"""``ParallelDims``: every parallel degree of a job, validated, and the device meshes built from it.

Rank order is row-major over ``(dp_replicate, dp_shard, cp_ring, cp_ulysses)``, so the innermost axes
hold neighbouring ranks: with one process per GPU and ranks numbered node-major, the Ulysses all-to-all
and expert groups stay inside a node and the ring and replica traffic crosses nodes.

Expert parallelism is *folded* (torchtitan, Megatron "parallel folding"): attention and dense weights
use ``dp_shard × cp`` ranks; the same ranks are re-read as ``edp × ep`` for experts, with ``ep`` innermost.
So with dp_shard=2, cp=2, ep=2 the ep groups are {0,1},{2,3} (the cp groups) and expert weights are
sharded by FSDP over edp = {0,2},{1,3}.

Validation is pure Python and needs no process group: the launcher and ``sparsetron config check`` run it
on a login node before anything starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsetron.dist.errors import LayoutError

#: Axes of the dense (attention) mesh, outermost first.
DENSE_AXES = ("dp_replicate", "dp_shard", "cp_ring", "cp_ulysses")
#: Axes of the expert mesh over the same ranks, outermost first.
EXPERT_AXES = ("dp_replicate", "edp", "ep")
#: Flattened axes, each made of consecutive dense axes: name -> the dense axes it spans.
FLAT_AXES = {
    "cp": ("cp_ring", "cp_ulysses"),
    "dp": ("dp_replicate", "dp_shard"),
    "dp_shard_cp": ("dp_shard", "cp_ring", "cp_ulysses"),
}


def _degree_problems(name: str, value: object, *, allow_auto: bool = False) -> list[str]:
    if isinstance(value, bool) or not isinstance(value, int):
        return [f"{name}={value!r} must be an integer"]
    if value >= 1 or (allow_auto and value == -1):
        return []
    rule = (
        "a positive integer, or -1 to fill what the world size leaves" if allow_auto else "a positive integer"
    )
    return [f"{name}={value} must be {rule}"]


def layout_problems(
    world_size: object,
    dp_replicate: object = 1,
    dp_shard: object = -1,
    cp: object = 1,
    ep: object = 1,
    cp_ulysses: object = 1,
) -> list[str]:
    """Every rule these degrees break (empty when valid); pure Python, no process group."""
    degrees = {
        "world_size": world_size,
        "dp_replicate": dp_replicate,
        "cp": cp,
        "ep": ep,
        "cp_ulysses": cp_ulysses,
    }
    out = [p for name, value in degrees.items() for p in _degree_problems(name, value)]
    out += _degree_problems("dp_shard", dp_shard, allow_auto=True)
    if out:
        return out
    assert isinstance(world_size, int) and isinstance(dp_replicate, int) and isinstance(dp_shard, int)
    assert isinstance(cp, int) and isinstance(ep, int) and isinstance(cp_ulysses, int)
    if dp_shard == -1:
        fixed = dp_replicate * cp
        if world_size % fixed:
            return [
                f"world_size={world_size} is not divisible by dp_replicate × cp = {dp_replicate} × {cp} = {fixed}, "
                "so dp_shard=-1 cannot fill it"
            ]
        dp_shard = world_size // fixed
    product = dp_replicate * dp_shard * cp
    if product != world_size:
        out.append(
            f"dp_replicate × dp_shard × cp = {dp_replicate} × {dp_shard} × {cp} = {product} must equal world_size={world_size}"
        )
    if cp % cp_ulysses:
        out.append(f"cp_ulysses={cp_ulysses} must divide cp={cp}")
    folded = dp_shard * cp
    if folded % ep:
        out.append(
            f"ep={ep} must divide dp_shard × cp = {dp_shard} × {cp} = {folded} (ep folds over those ranks)"
        )
    return out


@dataclass(frozen=True)
class ParallelDims:
    """Parallel degrees of one job; validated on construction.

    Args:
        world_size: total number of processes.
        dp_replicate: data-parallel replicas (DDP all-reduce or DiLoCo/SparseLoCo outer loop).
        dp_shard: FSDP2 shard degree inside a replica; -1 fills ``world_size // (dp_replicate * cp)``.
        cp: context-parallel degree (ranks splitting one sequence).
        ep: expert-parallel degree, folded over ``dp_shard * cp``.
        cp_ulysses: the Ulysses part of ``cp`` (1 = pure ring / all-gather, cp = pure Ulysses, between = hybrid).

    Raises:
        LayoutError: naming the world size, every degree, each broken rule and valid alternatives.
    """

    world_size: int
    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    ep: int = 1
    cp_ulysses: int = 1

    def __post_init__(self) -> None:
        problems = layout_problems(
            self.world_size, self.dp_replicate, self.dp_shard, self.cp, self.ep, self.cp_ulysses
        )
        if problems:
            raise LayoutError(self._describe(problems))
        if self.dp_shard == -1:
            object.__setattr__(self, "dp_shard", self.world_size // (self.dp_replicate * self.cp))

    def _describe(self, problems: list[str]) -> str:
        lines = [
            f"invalid parallel layout for world_size={self.world_size}: dp_replicate={self.dp_replicate}, "
            f"dp_shard={self.dp_shard}, cp={self.cp}, ep={self.ep}, cp_ulysses={self.cp_ulysses}"
        ]
        lines += [f"  - {p}" for p in problems]
        if isinstance(self.world_size, int) and self.world_size >= 1:
            alts = suggest_layouts(
                self.world_size, self.dp_replicate, self.dp_shard, self.cp, self.ep, self.cp_ulysses
            )
            if alts:
                lines.append(f"  valid layouts for world_size={self.world_size} closest to this one:")
                lines += [f"    {a.as_overrides()}" for a in alts]
        return "\n".join(lines)

    # -- derived sizes ------------------------------------------------------------------------------

    @property
    def cp_ring(self) -> int:
        """Ranks of the ring part of cp (cp / cp_ulysses)."""
        return self.cp // self.cp_ulysses

    @property
    def edp(self) -> int:
        """Expert data-parallel degree: the dp_shard × cp ranks not used by ep, which shard expert weights."""
        return self.dp_shard * self.cp // self.ep

    @property
    def dp(self) -> int:
        """Ranks that see different data (dp_replicate × dp_shard); cp ranks share a sequence."""
        return self.dp_replicate * self.dp_shard

    def as_overrides(self) -> str:
        """The layout as CLI overrides, e.g. ``parallel.dp_shard=2 parallel.cp=2``."""
        parts = [
            f"parallel.dp_replicate={self.dp_replicate}",
            f"parallel.dp_shard={self.dp_shard}",
            f"parallel.cp={self.cp}",
        ]
        parts.append(f"parallel.ep={self.ep}")
        if self.cp_ulysses not in (1, self.cp):
            parts.append(f"parallel.ulysses_degree={self.cp_ulysses}")
        return " ".join(parts)

    def dense_shape(self) -> tuple[int, ...]:
        """Mesh shape over :data:`DENSE_AXES`."""
        return (self.dp_replicate, self.dp_shard, self.cp_ring, self.cp_ulysses)

    def expert_shape(self) -> tuple[int, ...]:
        """Mesh shape over :data:`EXPERT_AXES`."""
        return (self.dp_replicate, self.edp, self.ep)

    def rank_grid(self, axes: str = "dense") -> torch.Tensor:
        """Global ranks laid out on the dense or expert mesh (row-major; independent of any process group)."""
        shape = self.dense_shape() if axes == "dense" else self.expert_shape()
        return torch.arange(self.world_size).view(*shape)

    def groups_of(self, axis: str) -> list[list[int]]:
        """All rank groups along ``axis`` (a dense, expert or flattened axis name), computed without a process group."""
        if axis in EXPERT_AXES and axis not in DENSE_AXES:
            grid, names = self.rank_grid("expert"), EXPERT_AXES
            spans: tuple[str, ...] = (axis,)
        else:
            grid, names = self.rank_grid("dense"), DENSE_AXES
            spans = FLAT_AXES.get(axis, (axis,))
        if not set(spans) <= set(names):
            raise KeyError(f"unknown mesh axis '{axis}'; known: {', '.join(mesh_axis_names())}")
        dims = [names.index(a) for a in spans]
        others = [d for d in range(grid.dim()) if d not in dims]
        moved = grid.permute(*others, *dims).reshape(
            -1, int(torch.tensor([grid.shape[d] for d in dims]).prod())
        )
        return [row.tolist() for row in moved]

    def build_mesh(self, device_type: str) -> ParallelMesh:
        """Create the dense and expert ``DeviceMesh`` objects; a collective over the default (world) group.

        Every rank must call this with the same ``ParallelDims``. The world group must already be initialised
        with ``world_size`` ranks.
        """
        import torch.distributed as dist
        from torch.distributed.device_mesh import DeviceMesh

        if not dist.is_initialized():
            raise RuntimeError(
                "build_mesh needs torch.distributed to be initialised first (sparsetron.dist.init_distributed)."
            )
        if dist.get_world_size() != self.world_size:
            raise LayoutError(
                f"ParallelDims(world_size={self.world_size}) but the process group has {dist.get_world_size()} ranks; "
                "build ParallelDims from dist.get_world_size()."
            )
        dense = DeviceMesh(device_type, self.rank_grid("dense"), mesh_dim_names=DENSE_AXES)
        # Slicing a flattened dim back out of the root mesh is deprecated from torch 2.11: keep them here.
        flat = {name: dense[spans]._flatten(name) for name, spans in FLAT_AXES.items()}
        expert = DeviceMesh(device_type, self.rank_grid("expert"), mesh_dim_names=EXPERT_AXES)
        # FSDP shards dense weights over dp_shard × cp (cp ranks hold the same weights) and replicates them
        # over dp_replicate: a 2-D mesh of its own, since a flattened dim cannot be re-sliced from the root.
        replicas = self.rank_grid("dense").view(self.dp_replicate, -1)
        fsdp = DeviceMesh(device_type, replicas, mesh_dim_names=("dp_replicate", "dp_shard_cp"))
        return ParallelMesh(dims=self, dense=dense, expert=expert, flat=flat, fsdp=fsdp)


def mesh_axis_names() -> list[str]:
    """Every axis name :meth:`ParallelMesh.group` accepts."""
    return list(dict.fromkeys([*DENSE_AXES, *FLAT_AXES, *EXPERT_AXES]))


@dataclass(frozen=True)
class ParallelMesh:
    """The device meshes of one layout, with groups handed out by axis name."""

    dims: ParallelDims
    dense: object  # torch.distributed.device_mesh.DeviceMesh over DENSE_AXES
    expert: object  # DeviceMesh over EXPERT_AXES
    flat: dict  # name in FLAT_AXES -> 1-D DeviceMesh flattened from the dense axes it spans
    fsdp: object  # 2-D DeviceMesh ("dp_replicate", "dp_shard_cp") over which dense weights are sharded

    def submesh(self, axis: str):
        """The 1-D ``DeviceMesh`` of ``axis`` that this rank belongs to."""
        if axis in ("edp", "ep"):
            return self.expert[axis]
        if axis in FLAT_AXES:
            return self.flat[axis]
        if axis in DENSE_AXES:
            return self.dense[axis]
        raise KeyError(f"unknown mesh axis '{axis}'; known: {', '.join(mesh_axis_names())}")

    def group(self, axis: str):
        """The ``ProcessGroup`` of ``axis`` that this rank belongs to."""
        return self.submesh(axis).get_group()

    def coordinate(self, axis: str) -> int:
        """This rank's index along ``axis`` (0 .. size-1)."""
        return self.submesh(axis).get_local_rank()


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def all_layouts(world_size: int) -> list[ParallelDims]:
    """Every valid layout for ``world_size`` (used to suggest alternatives and by property tests)."""
    out = []
    for dp_replicate in _divisors(world_size):
        rest = world_size // dp_replicate
        for cp in _divisors(rest):
            dp_shard = rest // cp
            for cp_ulysses in _divisors(cp):
                for ep in _divisors(dp_shard * cp):
                    out.append(ParallelDims(world_size, dp_replicate, dp_shard, cp, ep, cp_ulysses))
    return out


def suggest_layouts(
    world_size: int,
    dp_replicate: object,
    dp_shard: object,
    cp: object,
    ep: object,
    cp_ulysses: object,
    *,
    accept=None,
    limit: int = 3,
) -> list[ParallelDims]:
    """Valid layouts closest to the requested degrees (fewest changed degrees first).

    ``accept`` is an optional predicate that further filters candidates (e.g. model-fit rules).
    """
    import math

    wanted = {
        "dp_replicate": dp_replicate,
        "dp_shard": dp_shard,
        "cp": cp,
        "ep": ep,
        "cp_ulysses": cp_ulysses,
    }

    def distance(dims: ParallelDims) -> tuple[int, float]:
        changed, spread = 0, 0.0
        for name, want in wanted.items():
            if name == "dp_shard" and want == -1:
                continue
            have = getattr(dims, name)
            if not isinstance(want, int) or isinstance(want, bool) or want < 1:
                changed += 1
                continue
            if have != want:
                changed += 1
                spread += abs(math.log2(have) - math.log2(want))
        return changed, spread

    candidates = [d for d in all_layouts(world_size) if accept is None or accept(d)]
    candidates.sort(key=distance)
    return candidates[:limit]
