"""Publish byte payloads to colocated processes through POSIX shared memory: one writer, many readers.

Each version's payload lives in its own segment ``{name}.v{version}``, written once and never modified.
A small control segment ``{name}`` says which one is current::

    offset  0  seq      u64   seqlock counter: odd while the writer updates the fields below
            8  version  i64
           16  size     u64   payload bytes
           24  crc      u32   CRC32 of the payload
           28  flags    u32   bit 0: the publisher has closed
           32  namelen  u16, then the payload segment's name (at most NAME_BYTES bytes)

A reader copies the fields between two reads of ``seq`` and retries while the writer is mid-update (odd
or changed counter), then copies the payload out and checks the CRC: that catches a read that raced the
writer in a way the seqlock cannot see from Python (on CPUs with weak memory ordering the control fields
may become visible before the payload bytes). The writer unlinks all but the newest ``keep`` payload
segments; a reader that finds its segment already gone simply re-reads the control segment and tries
the newer version (an open segment stays readable after unlink, so only opening can lose that race).

Resource tracker: on Python < 3.13 every ``SharedMemory(name)`` attach registers the segment with
``multiprocessing``'s resource tracker, which unlinks it when the attaching process's tracker exits (a
subscriber exiting would destroy the publisher's data) and warns about "leaked" segments (gh-82300).
The usual fix, unregistering after attaching, is wrong when publisher and subscriber share a tracker
(same process, or children started by one parent): the tracker keeps a set of names, so the
subscriber's unregister also drops the publisher's registration and the publisher's own unlink then
makes the tracker print a KeyError traceback. So readers never go through the tracker at all: on
Python >= 3.13 they attach with ``track=False``; before that they map the segment read-only without
``SharedMemory``. Only the publisher registers its segments, which keeps the tracker's crash cleanup:
if the publisher dies, its segments are unlinked when its tracker exits.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import sys
import time
import zlib
from collections import deque
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory

from sparsetron.sync.errors import SyncError

log = logging.getLogger(__name__)

_CONTROL = struct.Struct("<QqQIIH")
NAME_BYTES = 94
CONTROL_BYTES = _CONTROL.size + NAME_BYTES
_CLOSED = 1
#: How often a reader re-reads before giving up on a writer that keeps changing under it.
READ_ATTEMPTS = 1000


@dataclass(frozen=True)
class _State:
    version: int
    size: int
    crc: int
    closed: bool
    segment: str


class _ReadOnlySegment:
    """A read-only mapping of an existing segment that the resource tracker never hears about."""

    def __init__(self, name: str):
        if sys.version_info >= (3, 13):
            self._shm = shared_memory.SharedMemory(name, track=False)
            self._mmap = None
            self.buf = self._shm.buf
        else:
            import _posixshmem  # what SharedMemory itself uses; public API would register the name

            self._shm = None
            fd = _posixshmem.shm_open("/" + name, os.O_RDONLY, mode=0o600)
            try:
                self._mmap = mmap.mmap(fd, os.fstat(fd).st_size, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            self.buf = memoryview(self._mmap)

    def close(self) -> None:
        self.buf.release()
        if self._shm is not None:
            self._shm.close()
        else:
            self._mmap.close()


def _unlink(segment: shared_memory.SharedMemory) -> None:
    """Unlink one of the publisher's segments, tolerating one that someone else already removed."""
    try:
        segment.unlink()
    except FileNotFoundError:
        # Typically a reader that attached with plain SharedMemory on Python < 3.13: its resource tracker
        # unlinked the segment when it exited. Our own tracker entry must still go.
        resource_tracker.unregister(segment._name, "shared_memory")
        log.warning(
            "shm publisher: segment %r was already unlinked by another process; attach readers with "
            "ShmSubscriber (not plain SharedMemory), or they destroy segments when they exit",
            segment.name,
        )


class ShmPublisher:
    """The one writer of the payloads published under ``name``."""

    def __init__(self, name: str, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.name = name
        self._keep = keep
        self._seq = 0
        self._segments: deque[tuple[int, shared_memory.SharedMemory]] = deque()
        try:
            self._control: shared_memory.SharedMemory | None = shared_memory.SharedMemory(
                name, create=True, size=CONTROL_BYTES
            )
        except FileExistsError as exc:
            raise SyncError(
                f"shared memory {name!r} already exists: another publisher uses this name, or a crashed one "
                f"left it behind; pick another name or remove /dev/shm/{name} and its '{name}.v*' segments"
            ) from exc
        self._write_control(_State(-1, 0, 0, False, ""))

    @property
    def latest(self) -> int | None:
        """The newest version put, or None."""
        return self._segments[-1][0] if self._segments else None

    def put(self, version: int, payload: bytes | memoryview) -> None:
        """Publish ``payload`` as ``version`` (which must exceed every earlier one); readers see it at once."""
        if self._control is None:
            raise SyncError(f"publisher {self.name!r} is closed")
        if self._segments and version <= self._segments[-1][0]:
            raise ValueError(f"versions must strictly increase: {version} after {self._segments[-1][0]}")
        view = memoryview(payload).cast("B")
        segment_name = f"{self.name}.v{version}"
        if len(segment_name.encode()) > NAME_BYTES:
            raise ValueError(
                f"segment name {segment_name!r} is longer than {NAME_BYTES} bytes; use a shorter name"
            )
        # Size 0 is not a valid mapping, so an empty payload still gets one byte.
        segment = shared_memory.SharedMemory(segment_name, create=True, size=max(1, len(view)))
        segment.buf[: len(view)] = view
        self._segments.append((version, segment))
        self._write_control(_State(version, len(view), zlib.crc32(view), False, segment_name))
        while len(self._segments) > self._keep:
            _, old = self._segments.popleft()
            old.close()
            _unlink(old)

    def close(self, unlink: bool = True) -> None:
        """Unlink every segment and tell readers the channel is closed; idempotent.

        With ``unlink=False`` the segments outlive this process and readers keep seeing the last version
        (the segments are also taken off the resource tracker, which would unlink them at exit); whoever
        takes over must unlink them.
        """
        if self._control is None:
            return
        if unlink:
            newest = self._segments[-1][0] if self._segments else -1
            self._write_control(_State(newest, 0, 0, True, ""))
        for _, segment in (*self._segments, (None, self._control)):
            segment.close()
            if unlink:
                _unlink(segment)
            else:
                resource_tracker.unregister(segment._name, "shared_memory")
        self._segments.clear()
        self._control = None

    def __enter__(self) -> ShmPublisher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write_control(self, state: _State) -> None:
        buf = self._control.buf
        name = state.segment.encode()
        # Seqlock: an odd counter tells readers that the fields after it are being rewritten.
        self._seq += 1
        struct.pack_into("<Q", buf, 0, self._seq)
        flags = _CLOSED if state.closed else 0
        _CONTROL.pack_into(buf, 0, self._seq, state.version, state.size, state.crc, flags, len(name))
        buf[_CONTROL.size : _CONTROL.size + len(name)] = name
        self._seq += 1
        struct.pack_into("<Q", buf, 0, self._seq)


class ShmSubscriber:
    """A reader of the payloads published under ``name``; attaches lazily, so it may start first."""

    def __init__(self, name: str):
        self.name = name
        self._control: _ReadOnlySegment | None = None
        #: Reads repeated because the writer changed something underneath (observability; races are normal).
        self.retries = 0

    def latest(self) -> int | None:
        """The newest published version (reads only the control segment), or None if there is none."""
        state = self._state()
        return None if state is None else state.version

    def get(self, min_version: int | None = None) -> tuple[int, bytes] | None:
        """``(version, payload)`` of the newest version if it is newer than ``min_version``, else None.

        The payload is copied out of shared memory and CRC-checked. Raises :class:`SyncError` only if
        the writer keeps replacing versions faster than one can be copied, READ_ATTEMPTS times in a row.
        """
        for attempt in range(READ_ATTEMPTS):
            state = self._state()
            if state is None or (min_version is not None and state.version <= min_version):
                return None
            try:
                segment = _ReadOnlySegment(state.segment)
            except FileNotFoundError:
                # The writer published `keep` newer versions since we read the control segment.
                self._retry(attempt)
                continue
            try:
                with segment.buf[: state.size] as view:
                    data = bytes(view)
            finally:
                segment.close()
            if zlib.crc32(data) == state.crc and len(data) == state.size:
                return state.version, data
            self._retry(attempt)
        raise SyncError(
            f"could not read a consistent payload from {self.name!r} in {READ_ATTEMPTS} attempts: the "
            "publisher replaces versions faster than they can be copied; raise its `keep` or publish less often"
        )

    def close(self) -> None:
        """Detach from the control segment (never unlinks anything: the publisher owns the segments)."""
        if self._control is not None:
            self._control.close()
            self._control = None

    def __enter__(self) -> ShmSubscriber:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _retry(self, attempt: int) -> None:
        self.retries += 1
        # Spin briefly (a writer finishes an update in microseconds), then stop competing for its CPU.
        time.sleep(0 if attempt < 10 else 0.001)

    def _state(self) -> _State | None:
        """The control fields from a consistent (seqlock-checked) read; None if nothing is published."""
        for attempt in range(READ_ATTEMPTS):
            if self._control is None:
                try:
                    self._control = _ReadOnlySegment(self.name)
                except FileNotFoundError:
                    return None
            buf = self._control.buf
            seq, version, size, crc, flags, name_len = _CONTROL.unpack_from(buf, 0)
            name = bytes(buf[_CONTROL.size : _CONTROL.size + min(name_len, NAME_BYTES)])
            (seq_after,) = struct.unpack_from("<Q", buf, 0)
            if seq % 2 == 0 and seq == seq_after:
                if flags & _CLOSED:
                    # This publisher is gone; a new one may later create the name afresh.
                    log.info("shm subscriber %r: the publisher closed; waiting for a new one", self.name)
                    self.close()
                    return None
                if seq == 0 or version < 0:  # created but not yet initialised, or nothing published yet
                    return None
                return _State(version, size, crc, False, name.decode())
            self._retry(attempt)
        raise SyncError(
            f"the control segment {self.name!r} stayed mid-update for {READ_ATTEMPTS} reads: the publisher "
            "probably died while writing it; restart the publisher"
        )
