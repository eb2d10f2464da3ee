"""Host memory an apply's temporary arrays come from, kept between applies so its pages stay mapped.

A rollout worker decodes tens of millions of changes per version, and every array it fills for the first time
costs a page fault per 4 KiB. On the CPU machines measured here that is about 1 ns per byte: for the 12 bytes
a change needs (its position, its value, the overwritten bits) as much as decoding it. A :class:`Scratch` hands
out arrays from chunks it keeps, so from the second version on the memory is already mapped; it holds what the
largest version needed (O(changed elements)).
"""

from __future__ import annotations

import threading

import numpy as np

#: Smallest chunk: large enough that a version takes few, small enough not to hold much beyond its need.
_MIN_CHUNK = 64 << 20
_ALIGN = 64  # a cache line: every array starts on its own


class Scratch:
    """A thread-safe bump allocator over kept byte chunks; :meth:`release` makes all of it free again.

    Arrays from :meth:`take` stay valid until the next :meth:`release`; the caller must not use them after.
    """

    def __init__(self) -> None:
        self._chunks: list[np.ndarray] = []
        self._used: list[int] = []
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes held (mapped) across applies."""
        return sum(chunk.nbytes for chunk in self._chunks)

    def take(self, count: int, dtype: np.dtype | type) -> np.ndarray:
        """An uninitialised 1-D array of ``count`` elements of ``dtype``, valid until :meth:`release`."""
        dtype = np.dtype(dtype)
        size = -(-count * dtype.itemsize // _ALIGN) * _ALIGN
        with self._lock:
            for index, chunk in enumerate(self._chunks):
                if self._used[index] + size <= chunk.nbytes:
                    break
            else:
                self._chunks.append(np.empty(max(_MIN_CHUNK, size), dtype=np.uint8))
                self._used.append(0)
                index = len(self._chunks) - 1
            start = self._used[index]
            self._used[index] += size
        return self._chunks[index][start : start + count * dtype.itemsize].view(dtype)

    def release(self) -> None:
        """Free every array taken so far (their memory is handed out again)."""
        with self._lock:
            self._used = [0] * len(self._chunks)
