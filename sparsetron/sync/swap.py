"""Apply a single delta in one pass over the changed elements: write, keep what was overwritten, verify.

A rollout worker one version behind gets one delta. Verifying it before writing needs every changed element's
current bits (the digest is updated from old and new bits, and diff-coded values are differences to them),
so a verify-then-write apply touches each changed element's cache line twice, the second time after the
whole version has flushed it. Swapping reads and writes each element together instead, keeping the old bits
as an undo log (O(changed) memory): the caller checks every tensor's digest after the pass and restores the
undo logs if any fails, so the version still lands whole or not at all, inside the same pause.
"""

from __future__ import annotations

import numpy as np
import torch

from sparsetron.sync import host_kernels
from sparsetron.sync.codec import Alloc, PendingUpdate
from sparsetron.sync.digest import updated_digest

_NP_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _segments(update: PendingUpdate) -> list[tuple[int, int, bool]]:
    """``(start, end, relative)`` runs covering the update's M elements in order."""
    runs, at = [], 0
    for start, end in update.relative:
        if start > at:
            runs.append((at, start, False))
        runs.append((start, end, True))
        at = end
    if at < update.indices.numel():
        runs.append((at, update.indices.numel(), False))
    return runs


@torch.no_grad()
def swap_in(bits: torch.Tensor, update: PendingUpdate, alloc: Alloc = np.empty) -> tuple[torch.Tensor, int]:
    """Write ``update`` into ``bits`` and return ``(undo, digest delta)``.

    ``bits``: flat same-width integer view of the live tensor (``codec.bits_view``), any device. ``undo`` [M]
    holds the overwritten bits on ``bits``' device (for :func:`restore`; on the host from ``alloc``, see
    ``codec.Alloc``); the digest delta is
    ``Σ (u_new − u_old) · m(position) mod 2⁶⁴``, so the tensor's new digest is the old one plus it.
    """
    if bits.device.type == "cpu":
        unsigned = _NP_UNSIGNED[bits.element_size()]
        target, values = bits.numpy().view(unsigned), update.values.numpy().view(unsigned)
        positions = update.indices.numpy()
        undo = alloc(positions.size, unsigned)
        delta = 0
        for start, end, relative in _segments(update):
            part = slice(start, end)
            delta += int(host_kernels.swap_in(target, positions[part], values[part], relative, undo[part]))
        return torch.from_numpy(undo.view(update.values.numpy().dtype)), delta & ((1 << 64) - 1)
    indices = update.indices.to(bits.device)
    old = bits.index_select(0, indices)
    new = update.values.to(bits.device)
    for start, end in update.relative:
        new[start:end] += old[start:end]  # integer addition wraps in the width, as the encoder's subtraction
    bits[indices] = new
    return old, updated_digest(0, indices, old, new)


@torch.no_grad()
def restore(bits: torch.Tensor, indices: torch.Tensor, undo: torch.Tensor) -> None:
    """Undo :func:`swap_in`: write ``undo`` back at ``indices`` (int64 [M]) of ``bits``."""
    bits[indices.to(bits.device)] = undo
