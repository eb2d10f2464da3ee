"""What the publisher keeps and what it sends a subscriber at version ``have``.

Retained: the last ``keep`` versions' changes (positions and new bits, on the host) with their encoded delta
payloads. A subscriber

- at the latest version gets nothing;
- one version behind gets that version's delta (values diff-coded against the bits it holds);
- several versions behind, within the retained window, gets one merged delta (the union of positions with
  their newest bits), built on demand and cached;
- new, or behind the window, gets an anchor: a full snapshot of the latest version, built on demand from the
  publisher's copy and cached until the next version. Anchors cost O(model) to encode, so none is made
  unless someone needs one.

Every payload names its base version, so a subscriber applies only what fits what it holds.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparsetron.sync.codec import TensorUpdate, encode


@dataclass
class RetainedVersion:
    """One published version: its changes (host tensors, by name) and its encoded delta from the previous."""

    version: int
    changes: dict[str, TensorUpdate]
    payload: memoryview


def merge_changes(chain: list[dict[str, TensorUpdate]]) -> list[TensorUpdate]:
    """Union of consecutive versions' changes, each position taking its newest bits (raw, no base)."""
    by_name: dict[str, list[TensorUpdate]] = {}
    for changes in chain:
        for name, update in changes.items():
            by_name.setdefault(name, []).append(update)
    merged = []
    for name, updates in by_name.items():
        if len(updates) == 1:
            only = updates[0]
            merged.append(
                TensorUpdate(name, only.dtype, only.shape, only.indices, only.values, None, only.digest)
            )
            continue
        indices = torch.cat([u.indices for u in updates])
        values = torch.cat([u.values for u in updates])
        # Stable sort keeps versions in order within a position; the last of each run is the newest.
        order = torch.sort(indices, stable=True).indices
        indices, values = indices[order], values[order]
        last = torch.ones_like(indices, dtype=torch.bool)
        last[:-1] = indices[1:] != indices[:-1]
        newest = updates[-1]
        merged.append(
            TensorUpdate(name, newest.dtype, newest.shape, indices[last], values[last], None, newest.digest)
        )
    return merged


class VersionStore:
    """Thread-safe store of retained versions; :meth:`plan` answers subscribers.

    ``snapshot()`` returns ``(version, dense updates)`` of the publisher's latest version, consistently
    (the publisher takes them under its own lock). ``keep``: versions whose changes are retained (a
    subscriber further behind is re-anchored). ``level`` / ``threads``: zstd settings of merges and anchors.
    """

    def __init__(
        self,
        snapshot: Callable[[], tuple[int, list[TensorUpdate]]],
        *,
        first_version: int = 0,
        keep: int = 8,
        level: int = 3,
        threads: int = 0,
    ) -> None:
        if keep < 1:
            raise ValueError(
                f"keep={keep} must be ≥ 1 (versions of changes retained for lagging subscribers)"
            )
        self.snapshot, self.keep, self.level, self.threads = snapshot, keep, level, threads
        self._lock = threading.Lock()
        self._versions: OrderedDict[int, RetainedVersion] = OrderedDict()
        self._anchor: tuple[int, memoryview] | None = None
        self._merged: dict[tuple[int, int], memoryview] = {}
        self.latest = first_version

    def add(self, retained: RetainedVersion) -> None:
        """Append the next version (``latest + 1``); drops versions beyond ``keep`` and stale merges."""
        with self._lock:
            if retained.version != self.latest + 1:
                raise ValueError(f"version {retained.version} does not follow the latest {self.latest}")
            self._versions[retained.version] = retained
            self.latest = retained.version
            while len(self._versions) > self.keep:
                self._versions.popitem(last=False)
            self._merged.clear()  # every merge ended at the previous latest

    def plan(self, have: int | None) -> list[memoryview]:
        """Payloads that take a subscriber at ``have`` (None: nothing yet) to the latest version, in order."""
        with self._lock:
            latest = self.latest
            if have is not None and have > latest:
                raise ValueError(
                    f"subscriber claims version {have} but the publisher's latest is {latest}: the trainer "
                    "restarted with a fresh history; the subscriber must re-anchor (pull with have=None)"
                )
            if have == latest:
                return []
            if have is not None and self._retained_from(have):
                return [self._delta(have, latest)]
            if self._anchor is not None and self._anchor[0] == latest:
                return [self._anchor[1]]
        # Encoding a snapshot is O(model): done outside the lock, so publishing and other pulls go on.
        version, dense = self.snapshot()
        payload = encode(
            dense, version=version, base_version=None, anchor=True, level=self.level, threads=self.threads
        )
        with self._lock:
            if self._anchor is None or self._anchor[0] < version:
                self._anchor = (version, payload)
        return [payload]

    def _retained_from(self, have: int) -> bool:
        return all(v in self._versions for v in range(have + 1, self.latest + 1))

    def _delta(self, have: int, latest: int) -> memoryview:
        if have == latest - 1:
            return self._versions[latest].payload
        key = (have, latest)
        if key not in self._merged:
            chain = [self._versions[v].changes for v in range(have + 1, latest + 1)]
            self._merged[key] = encode(
                merge_changes(chain),
                version=latest,
                base_version=have,
                level=self.level,
                threads=self.threads,
            )
        return self._merged[key]
