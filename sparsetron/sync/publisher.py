"""The trainer's side of weight sync: publish versions of named tensors as lossless sparse deltas.

:class:`DeltaPublisher` finds the changed elements since the last version (:mod:`.tracker`), encodes them
(:mod:`.codec`: positions gap / Elias–Fano / bitmap coded, values as bit-pattern differences, zstd), keeps the
last versions (:mod:`.versions`; snapshots for new subscribers are encoded on demand), and answers pulls through :meth:`handler` (for
:class:`~sparsetron.sync.tcp.SyncServer`), :meth:`payloads_for` (any transport) or shared memory.

Stream of a pull response (what :meth:`handler` yields): one JSON line ``{"publisher": id, "latest": v,
"payloads": n}`` terminated by ``\\n``, then ``n`` times an 8-byte little-endian length and the payload.
``publisher`` is random per publisher instance, so a subscriber notices a restarted trainer (a new history)
and re-anchors instead of applying deltas against another history's weights.
"""

from __future__ import annotations

import json
import secrets
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from sparsetron.sync.codec import TensorUpdate, encode
from sparsetron.sync.tracker import ChangeTracker
from sparsetron.sync.versions import RetainedVersion, VersionStore

_LENGTH = struct.Struct("<Q")


@dataclass
class PublishReport:
    """One published version: what changed, what it costs on the wire, how long it took."""

    version: int
    changed: int
    total: int
    payload_bytes: int
    dense_bf16_bytes: int
    detect_s: float
    encode_s: float

    @property
    def changed_fraction(self) -> float:
        return self.changed / self.total if self.total else 0.0

    @property
    def ratio_vs_bf16(self) -> float:
        return self.dense_bf16_bytes / self.payload_bytes if self.payload_bytes else float("inf")

    @property
    def bits_per_changed(self) -> float:
        return 8 * self.payload_bytes / self.changed if self.changed else 0.0


def _to_host(update: TensorUpdate, copy: bool = False) -> TensorUpdate:
    """``update`` with host tensors (``copy``: never aliasing the source, even when it is on the host)."""

    def host(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        return t.clone() if copy and t.device.type == "cpu" else t.cpu()

    return TensorUpdate(
        update.name,
        update.dtype,
        update.shape,
        host(update.indices),
        host(update.values),
        host(update.base),
        update.digest,
    )


class DeltaPublisher:
    """Publishes versions of ``tensors`` (name → live tensor; the trainer keeps updating them in place).

    The tensors as given are version ``first_version``. ``keep``: versions retained for lagging
    subscribers (a subscriber further behind, or a new one, gets an anchor: a snapshot of the latest
    version encoded on demand); ``level``/``threads``: zstd settings. Not collective: call it on the process
    that holds the full tensors. :meth:`publish` and pulls (from server threads) may run concurrently.
    """

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        *,
        keep: int = 8,
        level: int = 3,
        threads: int = 0,
        first_version: int = 0,
    ) -> None:
        self.tensors = tensors
        self.level, self.threads = level, threads
        self.id = secrets.token_hex(8)
        self.tracker = ChangeTracker(tensors)
        self.total = sum(t.numel() for t in tensors.values())
        self.version = first_version
        self._lock = threading.Lock()
        self.store = VersionStore(
            self._snapshot, first_version=first_version, keep=keep, level=level, threads=threads
        )

    def _snapshot(self) -> tuple[int, list[TensorUpdate]]:
        """The latest version, dense, on the host: copied under the lock so a concurrent publish cannot tear it."""
        with self._lock:
            return self.version, [_to_host(u, copy=True) for u in self.tracker.snapshot()]

    @torch.no_grad()
    def publish(self) -> PublishReport:
        """Publish the tensors' current bits as the next version; returns its costs."""
        started = time.perf_counter()
        updates = self.tracker.changes(self.tensors)
        detected = time.perf_counter()
        version = self.version + 1
        # Encoded where the changes live: on a GPU only the coded streams cross to the host.
        payload = encode(
            updates, version=version, base_version=self.version, level=self.level, threads=self.threads
        )
        encoded = time.perf_counter()
        # Retained on the host for merges, which send raw newest bits: the old bits are not kept.
        changes = {
            u.name: _to_host(TensorUpdate(u.name, u.dtype, u.shape, u.indices, u.values, None, u.digest))
            for u in updates
        }
        with self._lock:  # a snapshot for an anchor sees the versions before or after, never between
            self.tracker.commit(updates)
            self.store.add(RetainedVersion(version, changes, payload))
            self.version = version
        changed = sum(u.indices.numel() for u in updates)
        return PublishReport(
            version=version,
            changed=changed,
            total=self.total,
            payload_bytes=len(payload),
            dense_bf16_bytes=2 * self.total,
            detect_s=detected - started,
            encode_s=encoded - detected,
        )

    def payloads_for(self, have: int | None) -> list[memoryview]:
        """The payloads that take a subscriber at ``have`` (None: a new one) to the latest version."""
        return self.store.plan(have)

    def handler(self, request: dict) -> Iterator[bytes | memoryview]:
        """Answer a pull request ``{"op": "pull", "have": v | None, "publisher": id | None}`` as a stream.

        A subscriber that names another publisher id (a restarted trainer) gets the anchor path.
        """
        if request.get("op") != "pull":
            raise ValueError(f"unknown request op {request.get('op')!r}; expected 'pull'")
        have = request.get("have")
        if request.get("publisher") not in (None, self.id):
            have = None
        payloads = self.payloads_for(have)
        head = {"publisher": self.id, "latest": self.store.latest, "payloads": len(payloads)}
        yield json.dumps(head).encode() + b"\n"
        for payload in payloads:
            yield _LENGTH.pack(len(payload))
            yield payload
