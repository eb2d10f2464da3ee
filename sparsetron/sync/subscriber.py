"""The rollout worker's side of weight sync: apply published versions atomically, verified, in place.

A :class:`DeltaSubscriber` holds live tensors (any device; e.g. an HF model's ``state_dict()``), the version
they hold, the publisher it follows and every tensor's digest (:mod:`.digest`). :meth:`DeltaSubscriber.apply`
takes the payloads a publisher planned for it and

1. decodes all of them (CRCs, structure: :class:`~sparsetron.sync.codec.DeltaFormatError` on any problem);
2. checks the chain: a delta's base version must be what the subscriber (or the previous payload) holds;
3. verifies every tensor's digest after the change *before writing*: for a delta from the changed
   elements only (the digest is linear), for an anchor from the whole snapshot;
4. only then writes: delta values into the live tensors' bits at their positions (memory O(changed)), or a
   snapshot over whole tensors. The time of this step alone is the rollout pause.

Anything failing in 1–3 raises with nothing written, so the previous version stays intact and a retry is
safe. :meth:`DeltaSubscriber.pull` fetches through a :class:`~sparsetron.sync.tcp.SyncClient` with retries.
"""

from __future__ import annotations

import io
import json
import logging
import struct
import time
from dataclasses import dataclass

import torch

from sparsetron.sync.codec import DeltaFormatError, TensorUpdate, bits_view, decode, from_bits
from sparsetron.sync.digest import tensor_digest, updated_digest
from sparsetron.sync.errors import ConnectionLost, IntegrityError, SyncError
from sparsetron.sync.versions import merge_changes

log = logging.getLogger(__name__)
_LENGTH = struct.Struct("<Q")


class VersionGap(SyncError):
    """A delta's base version is not the version held: pull again (the publisher re-plans)."""


@dataclass
class ApplyReport:
    """One successful apply: versions, bytes, changed elements and where the time went."""

    from_version: int | None
    to_version: int
    payload_bytes: int
    changed: int
    anchored: bool
    decode_s: float
    verify_s: float
    pause_s: float
    transfer_s: float = 0.0  # request to last byte received (set by pull)


def module_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Name → the live tensor of every parameter and buffer of ``module`` (writes land in the module)."""
    return {name: t.data for name, t in module.state_dict(keep_vars=True).items()}


def _old_bits(current: torch.Tensor, indices: torch.Tensor, overlay: TensorUpdate | None) -> torch.Tensor:
    """Bits at ``indices`` as they will be once ``overlay`` (earlier payloads of this batch) is applied."""
    # Gather on the tensor's device, move only the M gathered bits.
    old = current[indices.to(current.device)].cpu()
    if overlay is not None and overlay.indices.numel():
        slot = torch.searchsorted(overlay.indices, indices).clamp_max(overlay.indices.numel() - 1)
        hit = overlay.indices[slot] == indices
        old[hit] = overlay.values[slot[hit]]
    return old


def _merge(overlay: TensorUpdate | None, update: TensorUpdate) -> TensorUpdate:
    """``update`` on top of earlier payloads' changes of the same tensor (newest bits per position)."""
    return update if overlay is None else merge_changes([{update.name: overlay}, {update.name: update}])[0]


class DeltaSubscriber:
    """Applies published versions to ``tensors`` (name → live, contiguous tensor of the published dtype/shape).

    Starts at no version: the first apply must begin with an anchor. With ``tensors`` empty, the first
    anchor allocates host tensors for everything it holds (a subscriber writing to disk). Not thread-safe:
    one applier.
    """

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.allocate = not tensors
        for name, t in tensors.items():
            if not t.is_contiguous():
                raise ValueError(f"tensor {name!r} is not contiguous; sync writes its storage in place")
        self.tensors = tensors
        self.version: int | None = None
        self.publisher: str | None = None
        self._reanchor = False  # the next pull asks for an anchor, keeping the held version until it lands
        self.digests: dict[str, int] = {}

    def _check_update(self, update: TensorUpdate) -> torch.Tensor:
        target = self.tensors.get(update.name)
        if target is None:
            raise DeltaFormatError(
                f"payload updates {update.name!r}, which this subscriber does not hold; subscribe with the "
                "publisher's tensor names"
            )
        if (target.dtype, tuple(target.shape)) != (update.dtype, tuple(update.shape)):
            raise DeltaFormatError(
                f"tensor {update.name!r}: payload has {update.dtype} {tuple(update.shape)}, the subscriber holds "
                f"{target.dtype} {tuple(target.shape)}"
            )
        return bits_view(target)

    def apply(self, payloads: list[bytes | memoryview], publisher: str | None = None) -> ApplyReport | None:
        """Apply ``payloads`` (in order) atomically; None when there is nothing to apply. See the module doc."""
        if not payloads:
            return None
        started = time.perf_counter()
        version, digests = self.version, dict(self.digests)
        snapshot: dict[str, torch.Tensor] | None = None
        overlays: dict[str, TensorUpdate] = {}
        changed, decode_s = 0, 0.0
        for payload in payloads:
            # Diff-coded values decode against the bits they apply to: the staged snapshot, if any.
            decode_started = time.perf_counter()
            header, updates = decode(
                payload, current=snapshot if snapshot is not None else self.tensors, return_base=True
            )
            decode_s += time.perf_counter() - decode_started
            if header.anchor:
                snapshot = self._verify_anchor(updates)
                digests = {u.name: u.digest for u in updates}
                overlays.clear()
            else:
                if header.base_version != version:
                    raise VersionGap(
                        f"payload of version {header.version} applies to version {header.base_version}, but "
                        f"the subscriber holds {version}; pull again"
                    )
                for update in updates:
                    changed += update.indices.numel()
                    self._verify_delta(update, digests, snapshot, overlays)
            version = header.version
        verified_at = time.perf_counter()
        self._write(snapshot, overlays)
        written_at = time.perf_counter()
        report = ApplyReport(
            from_version=self.version,
            to_version=version,
            payload_bytes=sum(len(p) for p in payloads),
            changed=changed,
            anchored=snapshot is not None,
            decode_s=decode_s,
            verify_s=verified_at - started - decode_s,
            pause_s=written_at - verified_at,
        )
        self.version, self.digests = version, digests
        if publisher is not None:
            self.publisher = publisher
        return report

    def _verify_anchor(self, updates: list[TensorUpdate]) -> dict[str, torch.Tensor]:
        names = {u.name for u in updates}
        if self.allocate and not self.tensors:
            for u in updates:
                self.tensors[u.name] = from_bits(torch.zeros_like(u.values), u.dtype, u.shape)
        if names != self.tensors.keys():
            raise DeltaFormatError(
                f"anchor holds {len(names)} tensors but the subscriber {len(self.tensors)}: missing "
                f"{sorted(self.tensors.keys() - names)[:5]}, unknown {sorted(names - self.tensors.keys())[:5]}"
            )
        snapshot = {}
        for update in updates:
            self._check_update(update)
            if update.indices is not None:
                raise DeltaFormatError(
                    f"anchor tensor {update.name!r} is sparse; anchors carry whole tensors"
                )
            if tensor_digest(update.values) != update.digest:
                raise IntegrityError(f"anchor tensor {update.name!r} does not match its digest; pull again")
            snapshot[update.name] = from_bits(update.values, update.dtype, update.shape)
        return snapshot

    def _verify_delta(
        self,
        update: TensorUpdate,
        digests: dict[str, int],
        snapshot: dict[str, torch.Tensor] | None,
        overlays: dict[str, TensorUpdate],
    ) -> None:
        target_bits = self._check_update(update)
        if update.indices is None:  # dense fallback: the whole tensor
            if tensor_digest(update.values) != update.digest:
                raise IntegrityError(f"tensor {update.name!r} (dense) does not match its digest; pull again")
            update = TensorUpdate(
                update.name, update.dtype, update.shape,
                torch.arange(update.values.numel()), update.values, None, update.digest,
            )  # fmt: skip
        elif update.name not in digests:
            raise VersionGap(f"tensor {update.name!r} has no verified base here; pull from an anchor")
        else:
            overlay = overlays.get(update.name)
            if update.base is not None and overlay is None:
                base = update.base  # decode already read these bits to undo the diff coding
            else:
                current = bits_view(snapshot[update.name]) if snapshot is not None else target_bits
                base = _old_bits(current.reshape(-1), update.indices, overlay)
            if updated_digest(digests[update.name], update.indices, base, update.values) != update.digest:
                raise IntegrityError(
                    f"tensor {update.name!r}: the result of version's delta would not match the publisher's "
                    "digest (corrupt payload, or this subscriber's weights differ from the base); nothing applied"
                )
        digests[update.name] = update.digest
        overlays[update.name] = _merge(overlays.get(update.name), update)

    @torch.no_grad()
    def _write(self, snapshot: dict[str, torch.Tensor] | None, overlays: dict[str, TensorUpdate]) -> None:
        for name, target in self.tensors.items():
            bits = bits_view(target).reshape(-1)
            if snapshot is not None:
                bits.copy_(bits_view(snapshot[name]).reshape(-1).to(bits.device, non_blocking=True))
            overlay = overlays.get(name)
            if overlay is not None:
                bits[overlay.indices.to(bits.device)] = overlay.values.to(bits.device)

    def verify(self) -> None:
        """Full check: every live tensor still matches the digest of the version held (O(model))."""
        for name, target in self.tensors.items():
            if tensor_digest(bits_view(target)) != self.digests.get(name):
                raise IntegrityError(
                    f"tensor {name!r} no longer matches version {self.version}'s digest (changed outside sync)"
                )

    def pull(self, client, *, retries: int = 3, backoff_s: float = 0.5) -> ApplyReport | None:
        """Fetch what the publisher behind ``client`` plans for this version and apply it, retrying failures.

        ``client``: a :class:`~sparsetron.sync.tcp.SyncClient`. Each failure is logged with its reason and
        leaves the held version intact; the last one is re-raised.
        """
        for attempt in range(1, retries + 1):
            try:
                have = None if self._reanchor else self.version
                requested = time.perf_counter()
                publisher, payloads = fetch_payloads(client, have, None if self._reanchor else self.publisher)
                transfer_s = time.perf_counter() - requested
                if publisher != self.publisher and self.publisher is not None:
                    log.info("publisher changed (%s -> %s): re-anchoring", self.publisher, publisher)
                report = self.apply(payloads, publisher)
                self._reanchor = False
                if report is not None:
                    report.transfer_s = transfer_s
                return report
            except (SyncError, DeltaFormatError) as exc:
                log.warning(
                    "sync attempt %d/%d failed at version %s: %s", attempt, retries, self.version, exc
                )
                if attempt == retries:
                    raise
                if isinstance(exc, (VersionGap, IntegrityError)):
                    # Our base may be what differs (e.g. weights changed outside sync): start from an anchor.
                    self._reanchor = True
                time.sleep(backoff_s * attempt)
        return None


def fetch_payloads(client, have: int | None, publisher: str | None) -> tuple[str, list[memoryview]]:
    """One pull through ``client`` (a SyncClient): the publisher id and the payloads, fully received."""
    reader = _StreamReader()
    client.request({"op": "pull", "have": have, "publisher": publisher}, sink=reader.feed)
    return reader.finish()


class _StreamReader:
    """Parses the publisher's pull stream (a JSON head line, then length-prefixed payloads) from chunks."""

    def __init__(self) -> None:
        self.buffer = io.BytesIO()

    def feed(self, chunk: bytes) -> None:
        self.buffer.write(chunk)

    def finish(self) -> tuple[str, list[memoryview]]:
        data = self.buffer.getbuffer()
        end = bytes(data[: 1 << 16]).find(b"\n")
        if end < 0:
            raise ConnectionLost("pull response has no header line; the stream ended early")
        head = json.loads(bytes(data[:end]))
        offset, payloads = end + 1, []
        for _ in range(head["payloads"]):
            if offset + _LENGTH.size > len(data):
                raise ConnectionLost("pull response ended inside a payload length; pull again")
            (length,) = _LENGTH.unpack_from(data, offset)
            offset += _LENGTH.size
            if offset + length > len(data):
                raise ConnectionLost(
                    f"pull response ended {offset + length - len(data)} bytes early; pull again"
                )
            payloads.append(data[offset : offset + length])  # a view: payloads can be 100s of MB
            offset += length
        if offset != len(data):
            raise IntegrityError(f"pull response has {len(data) - offset} bytes after its last payload")
        return head["publisher"], payloads
