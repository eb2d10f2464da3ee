"""The per-element loops of weight-sync decoding on the host, compiled by numba (``nogil``: threads run them
in parallel).

A rollout worker decodes tens of millions of changed positions per version on a few cores while the bytes
are still arriving, so every element's work matters. Written as numpy passes, Elias–Fano decoding alone took
~26 ns per position (unpacking, a ``nonzero`` over the unary bits, temporaries); these single-pass loops take a
few. The loops are branch-free where the bits are random (unary and bitmap scans write every step and
advance by the bit), because mispredicted branches also stall the cache misses of the gathers around them.

Every decoder writes into ``out`` (int64, one slot longer than the positions expected, as scratch for the
branch-free writes) and returns a status (:data:`OK` or an error code the caller turns into a message naming
the bucket) and how many positions it found; positions are checked to increase strictly and stay below
``limit``. Inputs are trusted to be the right dtypes (the codec builds them); streams are untrusted bytes.
"""

from __future__ import annotations

import numpy as np
from numba import njit, uint64

OK, COUNT_MISMATCH, OVERFLOW, NOT_INCREASING, TRAILING_BYTES = range(5)
#: What each status means, for the caller's error message.
PROBLEMS = {
    COUNT_MISMATCH: "holds a different number of positions than its header says",
    OVERFLOW: "has a position or gap beyond 2**62",
    NOT_INCREASING: "has positions that are not strictly increasing within the tensor",
    TRAILING_BYTES: "has trailing bytes after its last position",
}
_POSITION_LIMIT = 1 << 62


@njit(nogil=True, cache=True)
def decode_gaps(stream, count, previous, limit, out):  # pragma: no cover - compiled
    """LEB128 gaps: position = previous + 1 + gap, one varint each. Returns (status, positions found)."""
    found = 0
    value = 0
    shift = 0
    for byte in stream:
        if shift > 63 or (shift == 63 and byte & 0x7F):  # ≥ 2**63: beyond any position
            return OVERFLOW, found
        value |= (np.int64(byte) & 0x7F) << shift
        if byte < 0x80:
            if found == count:
                return COUNT_MISMATCH, found + 1
            if value >= _POSITION_LIMIT - previous - 1:
                return OVERFLOW, found
            previous += 1 + value
            out[found] = previous
            found += 1
            value = 0
            shift = 0
        else:
            shift += 7
    if shift != 0:
        return COUNT_MISMATCH, found  # an unterminated varint at the end
    if found != count:
        return COUNT_MISMATCH, found
    if count and previous >= limit:
        return NOT_INCREASING, found
    return OK, found


@njit(nogil=True, cache=True)
def _scan_ones(bits, start, count, base, minus_rank, out):  # pragma: no cover - compiled
    """``out[i] = base + j - minus_rank · i`` for the i-th one, at bit j of the LSB-first ``bits[start:]``.

    Bitmaps take positions ``base + j``; Elias–Fano unary parts take high parts ``j - i`` (the zeros before
    the one). Returns (ones, bit index of the last one rounded up to its byte's end).
    """
    ones = 0
    end = 0
    for at in range(start, bits.size):
        byte = np.int64(bits[at])
        for bit in range(8):
            one = (byte >> bit) & 1
            out[min(ones, count)] = base + (at - start) * 8 + bit - minus_rank * ones
            ones += one
        if byte:
            end = (at - start + 1) * 8
    return ones, end


@njit(nogil=True, cache=True)
def decode_bitmap(stream, start, count, first, limit, out):  # pragma: no cover - compiled
    """One bit per position from ``first``: bit j of the bits from ``stream[start]`` set ⇔ first + j changed."""
    ones, end = _scan_ones(stream, start, count, first, 0, out)
    if ones != count:
        return COUNT_MISMATCH, ones
    if end // 8 != stream.size - start:
        return TRAILING_BYTES, ones
    if count and out[count - 1] >= limit:
        return NOT_INCREASING, ones
    return OK, ones


@njit(nogil=True, cache=True)
def decode_elias_fano(stream, start, count, first, limit, out):  # pragma: no cover - compiled
    """Elias–Fano offsets from ``first``: at ``stream[start]`` the low width L, the low parts packed
    LSB-first, then the high parts in unary (offset i's high part h sets bit h + i)."""
    if start >= stream.size:
        return COUNT_MISMATCH, 0
    low = np.int64(stream[start])
    if low > 32:
        return OVERFLOW, 0
    lows_at = start + 1
    unary_at = lows_at + (count * low + 7) // 8
    if unary_at > stream.size:
        return COUNT_MISMATCH, 0
    ones, end = _scan_ones(stream, unary_at, count, 0, 1, out)
    if ones != count:
        return COUNT_MISMATCH, ones
    if end // 8 != stream.size - unary_at:
        return TRAILING_BYTES, ones
    if count and out[count - 1] >= (_POSITION_LIMIT >> low) - first:
        return OVERFLOW, ones
    mask = (np.int64(1) << low) - 1
    previous = first - 1
    for i in range(count):
        bit = i * low
        at = lows_at + (bit >> 3)
        word = np.int64(0)
        for k in range(((bit & 7) + low + 7) >> 3):  # ≤ 5 bytes hold ≤ 32 bits at any bit offset
            word |= np.int64(stream[at + k]) << (8 * k)
        position = first + ((out[i] << low) | ((word >> (bit & 7)) & mask))
        if position <= previous:
            return NOT_INCREASING, ones
        out[i] = position
        previous = position
    if count and previous >= limit:
        return NOT_INCREASING, ones
    return OK, ones


@njit(nogil=True, cache=True)
def undo_diff(planes, base, out):  # pragma: no cover - compiled
    """New bit patterns from zig-zag differences in byte planes: out[i] = base[i] + unzigzag(value i).

    ``planes`` uint8 [width · n]: every value's byte 0, then every byte 1, …; ``out`` unsigned [n] of that
    width; ``base`` the same, or empty to write the differences themselves. Arithmetic wraps in the width
    (the encoder's subtraction did too).
    """
    count = out.size
    relative = base.size == 0
    width = planes.size // count if count else 0
    mask = uint64(0xFFFFFFFFFFFFFFFF) >> uint64(64 - 8 * out.itemsize)
    for i in range(count):
        coded = uint64(0)
        for k in range(width):
            coded |= uint64(planes[k * count + i]) << uint64(8 * k)
        diff = (coded >> uint64(1)) ^ (uint64(0) - (coded & uint64(1)))
        out[i] = diff & mask if relative else (uint64(base[i]) + diff) & mask


_GOLDEN = uint64(0x9E3779B97F4A7C15)
_MIX = uint64(0xBF58476D1CE4E5B9)
_MIX2 = uint64(0x94D049BB133111EB)
_LOW32 = uint64(0xFFFFFFFF)
_LOW35 = uint64((1 << 35) - 1)


@njit(nogil=True, cache=True, inline="always")
def _weighted_change(position, u_new, u_old, wide):  # pragma: no cover - compiled
    """``(u_new − u_old) · m(position) mod 2⁶⁴``; 64-bit patterns as two 32-bit limbs (see the digest)."""
    weight = (uint64(position) + _GOLDEN) * _GOLDEN
    weight = ((weight ^ (weight >> uint64(32))) * _MIX) | uint64(1)
    if not wide:
        return (u_new - u_old) * weight
    low = ((u_new & _LOW32) - (u_old & _LOW32)) * weight
    weight = ((weight ^ ((weight >> uint64(29)) & _LOW35)) * _MIX2) | uint64(1)
    return low + ((u_new >> uint64(32)) - (u_old >> uint64(32))) * weight


@njit(nogil=True, cache=True)
def digest_delta(positions, old, new):  # pragma: no cover - compiled
    """``Σ (u(new) − u(old)) · m(position) mod 2⁶⁴`` of :mod:`sparsetron.sync.digest`, as uint64.

    ``positions`` int64 [n]; ``old``/``new`` unsigned [n] bit patterns of one width.
    """
    total = uint64(0)
    wide = new.itemsize == 8
    for i in range(positions.size):
        total += _weighted_change(positions[i], uint64(new[i]), uint64(old[i]), wide)
    return total


@njit(nogil=True, cache=True)
def swap_in(target, positions, values, relative, undo):  # pragma: no cover - compiled
    """Write a change into ``target``, keeping what it overwrote; returns its digest delta.

    ``target`` unsigned [numel] bit patterns (the live tensor), ``positions`` int64 [n], ``values`` [n] of
    that width: new bits, or with ``relative`` wrapped differences to add to the current bits. ``undo`` [n]
    receives the overwritten bits. Reading and writing each element together touches its cache line once.
    The digest is a second, sequential pass: in the first, the only work between the scattered loads is the
    store, so many more of their cache misses overlap (measured 11 vs 17 ns per change with the hashing in
    the same loop).
    """
    mask = uint64(0xFFFFFFFFFFFFFFFF) >> uint64(64 - 8 * target.itemsize)
    for i in range(positions.size):
        position = positions[i]
        old = uint64(target[position])
        undo[i] = old
        target[position] = ((old + uint64(values[i])) & mask) if relative else (uint64(values[i]) & mask)
    total = uint64(0)
    wide = target.itemsize == 8
    for i in range(positions.size):
        old = uint64(undo[i])
        new = ((old + uint64(values[i])) & mask) if relative else (uint64(values[i]) & mask)
        total += _weighted_change(positions[i], new, old, wide)
    return total


def warm_up() -> None:
    """Load (or compile, the first time on a machine) every kernel for every width, so that the first
    version a subscriber decodes does not pay it: ~0.15 s in all from numba's on-disk cache, ~2 s compiling.

    The argument types are the codec's exactly (numba compiles one variant per signature; streams are
    read-only views of the payload), so nothing compiles later.
    """
    stream = np.frombuffer(bytes([0, 0, 0b1]), dtype=np.uint8)  # read-only, as payload streams are
    out = np.empty(2, dtype=np.int64)
    decode_gaps(stream[:1], 1, -1, 1, out)
    decode_elias_fano(stream, 1, 1, 0, 1, out)
    decode_bitmap(stream, 2, 1, 0, 1, out)
    for unsigned in (np.uint8, np.uint16, np.uint32, np.uint64):
        bits = np.zeros(1, dtype=unsigned)
        planes = np.frombuffer(bytes(bits.itemsize), dtype=np.uint8)
        undo_diff(planes, bits, bits.copy())
        undo_diff(planes, bits[:0], bits.copy())
        digest_delta(out[:1], bits, bits)
        swap_in(bits, out[:1] * 0, bits.copy(), True, bits.copy())
