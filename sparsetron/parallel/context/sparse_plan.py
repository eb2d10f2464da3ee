"""Planning a sparse ring: who computes which blocks at which step, and which KV blocks must travel.

The sequence is cut into blocks of ``pattern.block`` tokens and **striped** over the ``W`` ranks of the ring:
block ``i`` lives on rank ``i mod W``. At ring step ``s`` rank ``r`` pairs its query blocks with the key blocks
of rank ``(r − s) mod W``. Striping makes every step hand every rank the same slice of each diagonal of the
pattern, so diagonal-heavy patterns (local windows, slashes) are balanced per step, not only in total
(MTraining's step-level balance).

:func:`plan_striped` measures that: ``work_RS`` ``[W, W]`` counts the active (query block, key block) pairs each
rank computes at each step (summed over batch and KV heads), so ``max/mean`` per step is the imbalance a ring
waits on. It also lists, per step, which of the source's key blocks each rank actually references:
``needed[s][r]`` — only those are sent (a step with none sends nothing), instead of the source's whole KV shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsetron.parallel.context.patterns import BlockPattern


@dataclass
class StripedPlan:
    """The sparse ring's schedule for one pattern on ``world`` ranks (see the module docstring)."""

    world: int
    #: int64 ``[W, W]``: active block pairs rank ``r`` computes at step ``s`` (row r, column s).
    work_RS: torch.Tensor
    #: ``needed[s][r]``: int64 sorted global key blocks rank ``r`` receives at step ``s`` from rank ``(r−s) mod W``.
    needed: list[list[torch.Tensor]]
    #: Key blocks in the sequence.
    total_blocks: int

    def step_imbalance(self) -> torch.Tensor:
        """fp64 ``[W]``: max/mean of the work over ranks at each step (1.0 = perfectly balanced; idle steps 1.0)."""
        work = self.work_RS.double()
        mean = work.mean(dim=0)
        return torch.where(mean > 0, work.max(dim=0).values / mean.clamp(min=1e-30), torch.ones_like(mean))

    def imbalance(self) -> float:
        """Worst step's max/mean: what the slowest rank costs the whole ring."""
        return float(self.step_imbalance().max())

    def sent_blocks(self) -> torch.Tensor:
        """int64 ``[W, W]``: KV blocks rank ``r`` receives at step ``s`` (step 0 is local: nothing moves)."""
        return torch.tensor(
            [[len(self.needed[s][r]) if s else 0 for s in range(self.world)] for r in range(self.world)]
        )

    def bytes_per_step(self, block_bytes: int) -> torch.Tensor:
        """int64 ``[W]``: bytes on the wire at each step, all ranks together (K and V of one block = ``block_bytes``)."""
        return self.sent_blocks().sum(dim=0) * block_bytes

    def dense_bytes_per_step(self, block_bytes: int) -> int:
        """What a dense ring moves per step (after the first): every rank's whole KV shard."""
        return self.total_blocks * block_bytes

    def idle_steps(self) -> list[int]:
        """Steps at which no rank has work: a sparse ring skips them (no compute, no transfer)."""
        return [s for s in range(self.world) if int(self.work_RS[:, s].sum()) == 0]


def plan_striped(pattern: BlockPattern, world: int) -> StripedPlan:
    """The striped sparse ring's per-rank, per-step work and KV traffic for ``pattern`` on ``world`` ranks."""
    active = pattern.active_BHQK
    n_q, n_k = active.shape[-2:]
    if n_q % world or n_k % world:
        raise ValueError(
            f"{n_q} query and {n_k} key blocks must be multiples of the ring size {world} (stripes of whole "
            "blocks); pad the sequence or pick another block size"
        )
    pairs = active.sum(dim=(0, 1))  # [nQ, nK]: active pairs over batch and KV heads
    if pattern.bars_BHS is not None:
        # A bar makes its key block a (partial) participant for every later query block.
        bars = pattern.bars_BHS.reshape(*pattern.bars_BHS.shape[:2], n_k, -1).any(dim=-1)  # [B, H, nK]
        later = torch.ones(n_q, n_k, dtype=torch.bool, device=active.device).tril()
        pairs = (active | (bars[:, :, None, :] & later)).sum(dim=(0, 1))
    owner_q = torch.arange(n_q, device=pairs.device) % world
    owner_k = torch.arange(n_k, device=pairs.device) % world
    work = torch.zeros(world, world, dtype=torch.int64)
    needed: list[list[torch.Tensor]] = []
    for step in range(world):
        per_rank = []
        for rank in range(world):
            source = (rank - step) % world
            sub = pairs[owner_q == rank][:, owner_k == source]
            work[rank, step] = int(sub.sum())
            keys = torch.nonzero(owner_k == source).flatten()
            per_rank.append(keys[(sub > 0).any(dim=0)].cpu())
        needed.append(per_rank)
    return StripedPlan(world, work, needed, n_k)
