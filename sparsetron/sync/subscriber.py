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
safe. The common case, a single delta (a subscriber one version behind, or a merged delta), skips reading
the current bits before the pause: its sparse tensors are written in one pass that keeps the overwritten bits
(:mod:`.swap`), their digests are checked right after, and any mismatch restores every tensor before the
apply raises — still all or nothing, and each changed element's memory is touched once instead of twice. :meth:`DeltaSubscriber.pull` fetches through a :class:`~sparsetron.sync.tcp.SyncClient` with retries.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from sparsetron.sync import host_kernels
from sparsetron.sync.codec import (
    DeltaFormatError,
    PayloadReader,
    PendingUpdate,
    TensorUpdate,
    bits_view,
    from_bits,
)
from sparsetron.sync.digest import tensor_digest, updated_digest
from sparsetron.sync.errors import ConnectionLost, IntegrityError, SyncError
from sparsetron.sync.scratch import Scratch
from sparsetron.sync.swap import restore, swap_in
from sparsetron.sync.versions import merge_changes

log = logging.getLogger(__name__)
_LENGTH = struct.Struct("<Q")
_MAX_HEAD = 1 << 16
_U64 = (1 << 64) - 1


class VersionGap(SyncError):
    """A delta's base version is not the version held: pull again (the publisher re-plans)."""


@dataclass
class ApplyReport:
    """One successful apply: versions, bytes, changed elements and where the time went.

    ``decode_s`` / ``verify_s`` add up every tensor's decode and verification time; they run in a thread pool
    while later bytes are still on the wire, so they overlap the transfer and each other. ``ready_s`` is what
    was left after the last byte arrived (for :meth:`DeltaSubscriber.apply`, its whole run) until everything
    was decoded and (but for a single delta's sparse tensors) verified; ``pause_s`` the write (the rollout
    pause), which for a single delta includes checking its sparse tensors' digests.
    """

    from_version: int | None
    to_version: int
    payload_bytes: int
    changed: int
    anchored: bool
    decode_s: float
    verify_s: float
    ready_s: float
    pause_s: float
    transfer_s: float = 0.0  # request to last byte received (set by pull)


def module_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Name → the live tensor of every parameter and buffer of ``module`` (writes land in the module)."""
    return {name: t.data for name, t in module.state_dict(keep_vars=True).items()}


def _old_bits(current: torch.Tensor, indices: torch.Tensor, overlay: TensorUpdate | None) -> torch.Tensor:
    """Bits at ``indices`` as they will be once ``overlay`` (earlier payloads of this batch) is applied."""
    # Gather on the tensor's device, move only the M gathered bits (index_select: ~2x indexing on the CPU).
    old = current.index_select(0, indices.to(current.device)).cpu()
    if overlay is not None and overlay.indices.numel():
        slot = torch.searchsorted(overlay.indices, indices).clamp_max(overlay.indices.numel() - 1)
        hit = overlay.indices[slot] == indices
        old[hit] = overlay.values[slot[hit]]
    return old


def _merge(overlay: TensorUpdate | None, update: TensorUpdate) -> TensorUpdate:
    """``update`` on top of earlier payloads' changes of the same tensor (newest bits per position)."""
    return update if overlay is None else merge_changes([{update.name: overlay}, {update.name: update}])[0]


def _default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


class DeltaSubscriber:
    """Applies published versions to ``tensors`` (name → live, contiguous tensor of the published dtype/shape).

    Starts at no version: the first apply must begin with an anchor. With ``tensors`` empty, the first
    anchor allocates host tensors for everything it holds (a subscriber writing to disk). ``threads``: how
    many tensors are decoded and verified at once. Not thread-safe: one applier.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], *, threads: int | None = None) -> None:
        self.allocate = not tensors
        for name, t in tensors.items():
            if not t.is_contiguous():
                raise ValueError(f"tensor {name!r} is not contiguous; sync writes its storage in place")
        if threads is not None and threads < 1:
            raise ValueError(f"threads={threads} must be ≥ 1 (or None: up to 4, by core count)")
        self.tensors = tensors
        self.threads = threads or _default_threads()
        host_kernels.warm_up()  # the first pull would otherwise load the decoding kernels (~0.15 s)
        self.scratch = Scratch()  # a single delta's arrays; kept mapped between versions
        self.version: int | None = None
        self.publisher: str | None = None
        self._reanchor = False  # the next pull asks for an anchor, keeping the held version until it lands
        self.digests: dict[str, int] = {}

    def _pool(self) -> ThreadPoolExecutor:
        """Workers that decode and verify tensors; with several, each runs torch single-threaded."""
        # Several workers each fanning out torch's intra-op threads oversubscribe the cores (measured: 2
        # workers × 2 intra-op threads on 2 cores ran a pull 1.5x slower than 2 workers × 1).
        single = (1,) if self.threads > 1 else (torch.get_num_threads(),)
        return ThreadPoolExecutor(
            self.threads, thread_name_prefix="sync-apply", initializer=torch.set_num_threads, initargs=single
        )

    def target_bits(self, name: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """The flat bit view of live tensor ``name``, checked to match the payload's dtype and size."""
        target = self.tensors.get(name)
        if target is None:
            raise DeltaFormatError(
                f"payload updates {name!r}, which this subscriber does not hold; subscribe with the "
                "publisher's tensor names"
            )
        if target.dtype != dtype or target.numel() != numel:
            raise DeltaFormatError(
                f"tensor {name!r}: payload has {dtype} with {numel} elements, the subscriber holds "
                f"{target.dtype} {tuple(target.shape)}"
            )
        return bits_view(target)

    def apply(self, payloads: list[bytes | memoryview], publisher: str | None = None) -> ApplyReport | None:
        """Apply ``payloads`` (in order) atomically; None when there is nothing to apply. See the module doc."""
        if not payloads:
            return None
        try:
            with self._pool() as pool:  # leaving it waits for every job, so nothing still uses the scratch
                application = _Application(self, pool, expected=len(payloads))
                for payload in payloads:
                    application.add(PayloadReader(payload), len(payload))
                return application.finish(publisher)
        finally:
            self.scratch.release()

    def _write(
        self,
        snapshot: dict[str, torch.Tensor] | None,
        overlays: dict[str, TensorUpdate],
        pending: dict[str, PendingUpdate],
        pool: ThreadPoolExecutor,
    ) -> None:
        """Write the version into the live tensors, one tensor per worker (scatters are independent).

        ``pending`` tensors go first, swapped in and checked against their digests; if any fails, all of them
        are restored and IntegrityError raised before the (already verified) snapshot and overlays are written.
        """
        if pending:
            self._swap_verified(pending, pool)

        @torch.no_grad()
        def write(name: str) -> None:
            bits = bits_view(self.tensors[name]).reshape(-1)
            if snapshot is not None:
                bits.copy_(bits_view(snapshot[name]).reshape(-1).to(bits.device, non_blocking=True))
            overlay = overlays.get(name)
            if overlay is not None:
                bits[overlay.indices.to(bits.device)] = overlay.values.to(bits.device)

        list(pool.map(write, self.tensors))  # re-raises the first failure

    def _swap_verified(self, pending: dict[str, PendingUpdate], pool: ThreadPoolExecutor) -> None:
        """Swap every pending update in; restore them all unless every digest matches."""
        undo: dict[str, torch.Tensor] = {}
        failed: list[str] = []

        def swap(update: PendingUpdate) -> None:
            bits = bits_view(self.tensors[update.name]).reshape(-1)
            undo[update.name], delta = swap_in(bits, update, self.scratch.take)
            if (self.digests[update.name] + delta) & _U64 != update.digest:
                failed.append(update.name)

        def unswap(name: str) -> None:
            restore(bits_view(self.tensors[name]).reshape(-1), pending[name].indices, undo[name])

        futures = [pool.submit(swap, update) for update in pending.values()]
        errors = [future.exception() for future in futures]
        error = next((e for e in errors if e is not None), None)
        if error is None and not failed:
            return
        list(pool.map(unswap, undo))
        if error is not None:
            raise error
        raise IntegrityError(
            f"tensor {sorted(failed)[0]!r} ({len(failed)} of {len(pending)}): the result of the version's delta "
            "does not match the publisher's digest (corrupt payload, or this subscriber's weights differ from "
            "the base); every tensor was restored, nothing applied"
        )

    def verify(self) -> None:
        """Full check: every live tensor still matches the digest of the version held (O(model))."""
        for name, target in self.tensors.items():
            if tensor_digest(bits_view(target)) != self.digests.get(name):
                raise IntegrityError(
                    f"tensor {name!r} no longer matches version {self.version}'s digest (changed outside sync)"
                )

    def pull(self, client, *, retries: int = 3, backoff_s: float = 0.5) -> ApplyReport | None:
        """Fetch what the publisher behind ``client`` plans for this version and apply it, retrying failures.

        ``client``: a :class:`~sparsetron.sync.tcp.SyncClient`. Each tensor is decoded and verified as soon as
        its bytes are in, while the rest is still on the wire; nothing is written until all of it verified.
        Each failure is logged with its reason and leaves the held version intact; the last one is re-raised.
        """
        for attempt in range(1, retries + 1):
            try:
                report = self._pull_once(client)
                self._reanchor = False
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

    def _pull_once(self, client) -> ApplyReport | None:
        have = None if self._reanchor else self.version
        request = {"op": "pull", "have": have, "publisher": None if self._reanchor else self.publisher}
        try:
            with self._pool() as pool:  # leaving it waits for every job, so nothing still uses the scratch
                application = _Application(self, pool, expected=None)  # the stream's head line says how many
                stream = _PullStream(application)
                requested = time.perf_counter()
                client.request(request, sink=stream.feed)
                transfer_s = time.perf_counter() - requested
                publisher = stream.finish()
                if publisher != self.publisher and self.publisher is not None:
                    log.info("publisher changed (%s -> %s): re-anchoring", self.publisher, publisher)
                report = application.finish(publisher) if stream.payloads else None
        finally:
            self.scratch.release()
        if report is not None:
            report.transfer_s = transfer_s
        return report


class _Application:
    """One atomic apply in progress. Payloads are taken in order; a delta's tensors are decoded and verified
    in ``pool`` as their bytes complete (independent tensors, so in parallel), an anchor once all of it is in.
    State (version, digests, staged snapshot, overlays) is staged here and handed to the subscriber only by
    :meth:`finish`, after every payload verified. ``expected``: how many payloads this apply has (None until
    a pull's head line says); when it is one delta, its sparse tensors are kept as pending updates, verified
    while they are written (:mod:`.swap`).
    """

    def __init__(self, subscriber: DeltaSubscriber, pool: ThreadPoolExecutor, expected: int | None) -> None:
        self.subscriber = subscriber
        self.pool = pool
        self.expected = expected
        self.readers: list[PayloadReader] = []
        self.filled: list[int] = []
        self.version = subscriber.version
        self.digests = dict(subscriber.digests)
        self.snapshot: dict[str, torch.Tensor] | None = None
        self.overlays: dict[str, TensorUpdate] = {}
        self.pending: dict[str, PendingUpdate] = {}
        self.current = 0  # the payload being decoded; later ones wait for it (they build on its result)
        self.started_current = False
        self.jobs: list[Future] = []
        self.changed = 0
        self.decode_s = 0.0
        self.verify_s = 0.0
        self.times = threading.Lock()
        self.started = time.perf_counter()

    def add(self, reader: PayloadReader, available: int) -> int:
        """Append the next payload (its first ``available`` bytes in); returns its position."""
        self.readers.append(reader)
        self.filled.append(0)
        self.progress(len(self.readers) - 1, available)
        return len(self.readers) - 1

    def progress(self, position: int, available: int) -> None:
        """Payload ``position`` now has ``available`` bytes: start whatever became decodable."""
        self.filled[position] = available
        self._pump(wait=False)

    def finish(self, publisher: str | None) -> ApplyReport:
        """Every byte is in: wait for the decoding, then write everything and return the report."""
        received_at = time.perf_counter()
        self._pump(wait=True)
        verified_at = time.perf_counter()
        subscriber = self.subscriber
        subscriber._write(self.snapshot, self.overlays, self.pending, self.pool)
        written_at = time.perf_counter()
        report = ApplyReport(
            from_version=subscriber.version,
            to_version=self.version,
            payload_bytes=sum(len(r.data) for r in self.readers),
            changed=self.changed,
            anchored=self.snapshot is not None,
            decode_s=self.decode_s,
            verify_s=self.verify_s,
            ready_s=verified_at - max(received_at, self.started),
            pause_s=written_at - verified_at,
        )
        subscriber.version, subscriber.digests = self.version, self.digests
        if publisher is not None:
            subscriber.publisher = publisher
        return report

    def _pump(self, *, wait: bool) -> None:
        while self.current < len(self.readers):
            reader = self.readers[self.current]
            available = self.filled[self.current]
            if reader.header is not None and reader.header.anchor:
                # An anchor replaces everything: decoded and checked as a whole once it is all in.
                if available < len(reader.data):
                    return
                reader.advance(available)
                self._take_anchor(reader)
            else:
                ready = reader.advance(available)
                header = reader.header
                if header is None:
                    if wait:
                        raise DeltaFormatError("payload ended inside its header; resend it")
                    return
                if header.anchor:
                    continue  # parsed just now: take the anchor branch
                if not self.started_current:
                    self._check_base(header)
                    self.started_current = True
                # A single delta's sparse tensors wait for the pause to meet the live bits (see .swap).
                single = self.expected == 1 and self.snapshot is None
                for record in ready:
                    job = self._pending_job if single and not record.dense else self._delta_job
                    self.jobs.append(self.pool.submit(job, reader, record))
                if not reader.complete or not (wait or all(job.done() for job in self.jobs)):
                    return
                for job in self.jobs:
                    job.result()  # re-raises a tensor's failure: nothing has been written
                self.jobs = []
            self.version = reader.header.version
            self.current += 1
            self.started_current = False

    def _check_base(self, header) -> None:
        if header.base_version != self.version:
            raise VersionGap(
                f"payload of version {header.version} applies to version {header.base_version}, but "
                f"the subscriber holds {self.version}; pull again"
            )

    def _base_bits(self, name: str, dtype: torch.dtype, numel: int, indices: np.ndarray | None) -> np.ndarray:
        """The bits a diff-coded tensor applies to: the staged snapshot or live tensor, plus earlier payloads."""
        if self.snapshot is not None:
            staged = self.snapshot.get(name)
            if staged is None or staged.dtype != dtype or staged.numel() != numel:
                raise DeltaFormatError(
                    f"payload updates {name!r} as {dtype} with {numel} elements, which the anchor before it "
                    "does not hold"
                )
            source = bits_view(staged)
        else:
            source = self.subscriber.target_bits(name, dtype, numel)
        overlay = self.overlays.get(name)
        if indices is None and overlay is None:
            old = source.cpu()
        else:
            positions = torch.arange(numel) if indices is None else torch.from_numpy(indices)
            old = _old_bits(source, positions, overlay)
        unsigned = old.numpy()
        return unsigned.view(f"u{unsigned.itemsize}")

    def _delta_job(self, reader: PayloadReader, record) -> None:
        started = time.perf_counter()
        update = reader.decode(record, self._base_bits, return_base=True)
        decoded = time.perf_counter()
        self._verify_delta(update)
        with self.times:
            self.decode_s += decoded - started
            self.verify_s += time.perf_counter() - decoded
            self.changed += update.values.numel() if update.indices is None else update.indices.numel()

    def _pending_job(self, reader: PayloadReader, record) -> None:
        """Decode a single delta's sparse tensor without reading the live bits; checked when it is written."""
        started = time.perf_counter()
        update = reader.decode_pending(record, self.subscriber.scratch.take)
        self.subscriber.target_bits(update.name, update.dtype, math.prod(update.shape))
        if update.name not in self.digests:
            raise VersionGap(f"tensor {update.name!r} has no verified base here; pull from an anchor")
        with self.times:
            self.pending[update.name] = update
            self.digests[update.name] = (
                update.digest
            )  # staged: the subscriber's stay until the write verified
            self.decode_s += time.perf_counter() - started
            self.changed += update.indices.numel()

    def _take_anchor(self, reader: PayloadReader) -> None:
        started = time.perf_counter()
        updates = [reader.decode(record, self._base_bits) for record in reader.records]
        decoded = time.perf_counter()
        subscriber = self.subscriber
        names = {u.name for u in updates}
        if subscriber.allocate and not subscriber.tensors:
            for u in updates:
                subscriber.tensors[u.name] = from_bits(torch.zeros_like(u.values), u.dtype, u.shape)
        if names != subscriber.tensors.keys():
            raise DeltaFormatError(
                f"anchor holds {len(names)} tensors but the subscriber {len(subscriber.tensors)}: missing "
                f"{sorted(subscriber.tensors.keys() - names)[:5]}, unknown "
                f"{sorted(names - subscriber.tensors.keys())[:5]}"
            )
        snapshot = {}
        for update in updates:
            subscriber.target_bits(update.name, update.dtype, math.prod(update.shape))
            if update.indices is not None:
                raise DeltaFormatError(
                    f"anchor tensor {update.name!r} is sparse; anchors carry whole tensors"
                )
            if tensor_digest(update.values) != update.digest:
                raise IntegrityError(f"anchor tensor {update.name!r} does not match its digest; pull again")
            snapshot[update.name] = from_bits(update.values, update.dtype, update.shape)
        self.snapshot, self.digests = snapshot, {u.name: u.digest for u in updates}
        self.overlays.clear()
        self.decode_s += decoded - started
        self.verify_s += time.perf_counter() - decoded

    def _verify_delta(self, update: TensorUpdate) -> None:
        """Check ``update``'s result against its digest from the changed elements only; stage it if right."""
        if self.snapshot is None:
            self.subscriber.target_bits(update.name, update.dtype, math.prod(update.shape))
        elif update.name not in self.snapshot:
            raise DeltaFormatError(
                f"payload updates {update.name!r}, which the anchor before it does not hold"
            )
        if update.indices is None:  # dense fallback: the whole tensor
            if tensor_digest(update.values) != update.digest:
                raise IntegrityError(f"tensor {update.name!r} (dense) does not match its digest; pull again")
            update = TensorUpdate(
                update.name, update.dtype, update.shape,
                torch.arange(update.values.numel()), update.values, None, update.digest,
            )  # fmt: skip
        elif update.name not in self.digests:
            raise VersionGap(f"tensor {update.name!r} has no verified base here; pull from an anchor")
        else:
            base = update.base
            if base is None:  # raw-coded values: decode did not need (so did not read) the current bits
                base = torch.from_numpy(
                    self._base_bits(
                        update.name, update.dtype, math.prod(update.shape), update.indices.numpy()
                    )
                ).view(update.values.dtype)
            if (
                updated_digest(self.digests[update.name], update.indices, base, update.values)
                != update.digest
            ):
                raise IntegrityError(
                    f"tensor {update.name!r}: the result of version's delta would not match the publisher's "
                    "digest (corrupt payload, or this subscriber's weights differ from the base); nothing applied"
                )
        # Distinct tensors per payload, so concurrent jobs never touch the same keys.
        self.digests[update.name] = update.digest
        self.overlays[update.name] = _merge(self.overlays.get(update.name), update)


def fetch_payloads(client, have: int | None, publisher: str | None) -> tuple[str, list[memoryview]]:
    """One pull through ``client`` (a SyncClient): the publisher id and the payloads, fully received."""
    stream = _PullStream(None)
    client.request({"op": "pull", "have": have, "publisher": publisher}, sink=stream.feed)
    publisher_id = stream.finish()
    return publisher_id, [memoryview(buffer) for buffer in stream.payloads]


class _PullStream:
    """Parses the publisher's pull stream (a JSON head line, then u64-length-prefixed payloads) from chunks.

    Each payload is received into its own buffer, allocated once its length is known; with an
    ``application``, every chunk is reported to it so decoding starts while later bytes are on the wire.
    """

    def __init__(self, application: _Application | None) -> None:
        self.application = application
        self.pending = bytearray()  # head line or a length prefix, until complete
        self.head: dict | None = None
        self.payloads: list[np.ndarray] = []
        self.filled = 0  # bytes in the last payload's buffer
        self.lengths_left = 0

    def feed(self, chunk: bytes | bytearray) -> None:
        view = memoryview(chunk)
        while view:
            if self.head is None:
                view = self._take_head(view)
            elif self.payloads and self.filled < len(self.payloads[-1]):
                view = self._take_body(view)
            elif self.lengths_left:
                view = self._take_length(view)
            else:
                raise IntegrityError(f"pull response has {len(view)} bytes after its last payload")

    def _take_head(self, view: memoryview) -> memoryview:
        room = _MAX_HEAD - len(self.pending)
        end = bytes(view[:room]).find(b"\n")
        if end < 0:
            if len(view) >= room:
                raise IntegrityError(f"pull response head line is longer than {_MAX_HEAD} bytes")
            self.pending += view
            return view[len(view) :]
        self.head = json.loads(bytes(self.pending) + bytes(view[:end]))
        self.pending.clear()
        self.lengths_left = int(self.head["payloads"])
        if self.application is not None:
            self.application.expected = self.lengths_left
        return view[end + 1 :]

    def _take_length(self, view: memoryview) -> memoryview:
        need = _LENGTH.size - len(self.pending)
        self.pending += view[:need]
        if len(self.pending) == _LENGTH.size:
            (length,) = _LENGTH.unpack(self.pending)
            self.pending.clear()
            self.lengths_left -= 1
            self.payloads.append(np.empty(length, dtype=np.uint8))
            self.filled = 0
            if self.application is not None:
                self.application.add(PayloadReader(memoryview(self.payloads[-1])), 0)
        return view[need:]

    def _take_body(self, view: memoryview) -> memoryview:
        buffer = self.payloads[-1]
        take = min(len(view), len(buffer) - self.filled)
        buffer[self.filled : self.filled + take] = view[:take]
        self.filled += take
        if self.application is not None:
            self.application.progress(len(self.payloads) - 1, self.filled)
        return view[take:]

    def finish(self) -> str:
        """The publisher's id, after checking the stream ended exactly after its last payload."""
        if self.head is None:
            raise ConnectionLost("pull response has no header line; the stream ended early")
        if self.lengths_left or self.pending:
            raise ConnectionLost("pull response ended inside a payload length; pull again")
        if self.payloads and self.filled < len(self.payloads[-1]):
            raise ConnectionLost(
                f"pull response ended {len(self.payloads[-1]) - self.filled} bytes early; pull again"
            )
        return self.head["publisher"]
