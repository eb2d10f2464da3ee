"""What the publisher keeps and what it sends a subscriber at version ``have``.

Retained: the last ``keep`` versions' changes (positions and new bits, on the host) with their encoded delta
payloads, and the newest anchor (a full snapshot, encoded). A subscriber

- at the latest version gets nothing;
- one version behind gets that version's delta (values diff-coded against the bits it holds);
- several versions behind, within the retained window, gets one merged delta (the union of positions with
  their newest bits), built on demand and cached;
- new, or behind the window, gets the anchor plus a merged delta from the anchor to the latest version.

Every payload names its base version, so a subscriber applies only what fits what it holds.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from sparsetron.sync.codec import TensorUpdate, encode


@dataclass
class RetainedVersion:
    """One published version: its changes (host tensors, by name) and its encoded delta from the previous."""

    version: int
    changes: dict[str, TensorUpdate]
    payload: bytes


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
    """Thread-safe store of retained versions and the newest anchor; :meth:`plan` answers subscribers.

    ``keep``: versions whose changes are retained (a subscriber further behind is re-anchored).
    ``level`` / ``threads``: zstd settings for merged payloads.
    """

    def __init__(self, *, keep: int = 8, level: int = 3, threads: int = 0) -> None:
        if keep < 1:
            raise ValueError(
                f"keep={keep} must be ≥ 1 (versions of changes retained for lagging subscribers)"
            )
        self.keep, self.level, self.threads = keep, level, threads
        self._lock = threading.Lock()
        self._versions: OrderedDict[int, RetainedVersion] = OrderedDict()
        self._anchor: tuple[int, bytes] | None = None
        self._merged: dict[tuple[int, int], bytes] = {}
        self.latest: int | None = None

    def set_anchor(self, version: int, payload: bytes) -> None:
        """Record the full snapshot of ``version`` (must be the latest version)."""
        with self._lock:
            if self.latest is not None and version != self.latest:
                raise ValueError(f"anchor of version {version} but the latest is {self.latest}")
            self._anchor = (version, payload)
            self.latest = version

    def add(self, retained: RetainedVersion) -> None:
        """Append the next version (``latest + 1``); drops versions beyond ``keep`` and stale merges."""
        with self._lock:
            if self.latest is None or retained.version != self.latest + 1:
                raise ValueError(f"version {retained.version} does not follow the latest {self.latest}")
            self._versions[retained.version] = retained
            self.latest = retained.version
            while len(self._versions) > self.keep:
                self._versions.popitem(last=False)
            self._merged.clear()  # every merge ended at the previous latest

    @property
    def anchor_version(self) -> int | None:
        return self._anchor[0] if self._anchor else None

    def plan(self, have: int | None) -> list[bytes]:
        """Payloads that take a subscriber at ``have`` (None: nothing yet) to the latest version, in order."""
        with self._lock:
            latest = self.latest
            if latest is None:
                return []
            if have is not None and have > latest:
                raise ValueError(
                    f"subscriber claims version {have} but the publisher's latest is {latest}: the trainer "
                    "restarted with a fresh history; the subscriber must re-anchor (pull with have=None)"
                )
            if have == latest:
                return []
            if have is not None and self._retained_from(have):
                return [self._delta(have, latest)]
            if self._anchor is None:
                raise RuntimeError("no anchor published yet; publish one before serving new subscribers")
            anchor_version, anchor = self._anchor
            if anchor_version == latest:
                return [anchor]
            if not self._retained_from(anchor_version):
                raise RuntimeError(
                    f"the anchor (version {anchor_version}) is older than the retained window; anchor more "
                    "often than every `keep` versions"
                )
            return [anchor, self._delta(anchor_version, latest)]

    def _retained_from(self, have: int) -> bool:
        return all(v in self._versions for v in range(have + 1, self.latest + 1))

    def _delta(self, have: int, latest: int) -> bytes:
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
