"""Change detection on the trainer: which elements' bits differ from the last published version.

The tracker keeps a copy of every published tensor's bit pattern on the tensor's own device and, per publish,
compares bitwise (so ``-0.0`` vs ``0.0`` and NaN payloads count as changes, and a value that changed and
changed back does not). It takes two passes over the weights: the first counts the changed elements of every
tensor into one device vector, read with a single host sync; the second compacts each tensor's changed
positions with ``nonzero_static`` at the now-known size, so no pass waits on the host per tensor.
"""

from __future__ import annotations

import torch

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
        self._check(tensors)
        names = list(self.published)
        if not names:
            return []
        sums = [(bits_view(tensors[n]) != self.published[n]).sum() for n in names]
        # Moving a CPU scalar to the GPU does not sync; reading the stacked vector is the one sync.
        counts = torch.stack([c.to(sums[0].device) for c in sums]).tolist()
        updates = []
        for name, count in zip(names, counts, strict=True):
            if count == 0:
                continue
            current, published = bits_view(tensors[name]), self.published[name]
            indices = torch.nonzero_static(current != published, size=count).squeeze(1)
            new, old = current[indices], published[indices]
            dtype, shape = self.meta[name]
            digest = updated_digest(self.digests[name], indices, old, new)
            updates.append(TensorUpdate(name, dtype, shape, indices, new, old, digest))
        return updates

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
