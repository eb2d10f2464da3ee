"""Change detection on the trainer: which elements' bits differ from the last published version.

The tracker keeps a copy of every published tensor's bit pattern on the tensor's own device and, per publish,
compares bitwise (so ``-0.0`` vs ``0.0`` and NaN payloads count as changes, and a value that changed and
changed back does not). It takes two passes over the weights: the first counts the changed elements of every
tensor, read with a single host sync for all tensors; the second compacts each tensor's changed positions
(sorted) and gathers their new and old bits at the now-known sizes, so no pass waits on the host per tensor.
On CUDA both passes are Triton kernels (:mod:`sparsetron.kernels.bit_diff`) that stream the two copies
without materialising a mask; elsewhere torch ops with ``nonzero_static``.
"""

from __future__ import annotations

import torch

from sparsetron.kernels.bit_diff import changed_counts, changed_elements, kernels_apply
from sparsetron.sync.codec import TensorUpdate, bits_view
from sparsetron.sync.digest import tensor_digest, updated_digest


class ChangeTracker:
    """The last published bits of named tensors and their digests; :meth:`changes` then :meth:`commit`.

    ``tensors``: name → live tensor (any device, any dtype the codec knows). Memory: one copy of every
    tensor's bits on its device.
    """

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.published = {name: bits_view(t).clone() for name, t in tensors.items()}
        self.meta = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
        self.digests = {name: tensor_digest(bits) for name, bits in self.published.items()}

    def _check(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors.keys() != self.published.keys():
            missing = sorted(self.published.keys() - tensors.keys())[:5]
            extra = sorted(tensors.keys() - self.published.keys())[:5]
            raise ValueError(
                f"published tensors changed: missing {missing}, new {extra}; start a new publisher (anchor)"
            )
        for name, t in tensors.items():
            if (t.dtype, tuple(t.shape)) != self.meta[name]:
                raise ValueError(
                    f"tensor {name!r} is {t.dtype} {tuple(t.shape)} but was published as "
                    f"{self.meta[name][0]} {self.meta[name][1]}; start a new publisher (anchor)"
                )

    @torch.no_grad()
    def changes(self, tensors: dict[str, torch.Tensor]) -> list[TensorUpdate]:
        """Per tensor with changes: sorted flat positions, new and old bits, and the digest after the change.

        ``tensors`` must hold the same names, dtypes and shapes as at construction. Results stay on the
        tensors' devices; nothing is committed until :meth:`commit`.
        """
        updates = []
        for name, indices, new, old in self.find_changes(tensors):
            dtype, shape = self.meta[name]
            digest = updated_digest(self.digests[name], indices, old, new)
            updates.append(TensorUpdate(name, dtype, shape, indices, new, old, digest))
        return updates

    def find_changes(self, tensors: dict[str, torch.Tensor]) -> list[tuple]:
        """Detection only: ``(name, positions int64 ascending, new bits, old bits)`` per changed tensor."""
        self._check(tensors)
        if not tensors:
            return []
        pairs = {
            n: (bits_view(tensors[n]).reshape(-1), self.published[n].reshape(-1)) for n in self.published
        }
        first = next(iter(pairs.values()))[0]
        return self._changed_fused(pairs) if kernels_apply(first) else self._changed_torch(pairs)

    @staticmethod
    def _changed_torch(pairs: dict) -> list[tuple]:
        """Compare, count (one host sync for all tensors), compact with ``nonzero_static``, gather."""
        sums = [(current != published).sum() for current, published in pairs.values()]
        # Moving a CPU scalar to the GPU does not sync; reading the stacked vector is the one sync.
        counts = torch.stack([c.to(sums[0].device) for c in sums]).tolist()
        found = []
        for (name, (current, published)), count in zip(pairs.items(), counts, strict=True):
            if count:
                indices = torch.nonzero_static(current != published, size=count).squeeze(1)
                found.append((name, indices, current[indices], published[indices]))
        return found

    @staticmethod
    def _changed_fused(pairs: dict) -> list[tuple]:
        """The Triton passes of :mod:`sparsetron.kernels.bit_diff`: count per block, one sync, compact."""
        block_counts = {name: changed_counts(*pair) for name, pair in pairs.items()}
        totals = torch.stack([c.sum(dtype=torch.int64) for c in block_counts.values()]).tolist()
        found = []
        for (name, (current, published)), total in zip(pairs.items(), totals, strict=True):
            if total:
                found.append((name, *changed_elements(current, published, block_counts[name], total)))
        return found

    @torch.no_grad()
    def commit(self, updates: list[TensorUpdate]) -> None:
        """Make ``updates`` (from :meth:`changes`) the published state."""
        for update in updates:
            self.published[update.name][update.indices] = update.values
            self.digests[update.name] = update.digest

    def snapshot(self) -> list[TensorUpdate]:
        """Every published tensor dense (indices None), with its digest: the content of an anchor."""
        return [
            TensorUpdate(name, *self.meta[name], None, bits, None, self.digests[name])
            for name, bits in self.published.items()
        ]
