"""Lossless codec for sparse weight deltas: the trainer publishes versions, rollout workers apply them.

Between RL optimizer steps most bf16 weights keep their exact bits, so a delta lists only the changed
elements: their flat positions and new bit patterns. Everything works on bit patterns (same-width integer
views, :func:`bits_view`), so NaN payloads, -0.0, ±Inf and subnormals round-trip exactly and the codec does
not care about the dtype beyond its width.

Layout (all integers little-endian)::

    preamble  magic b"STSD" | format version u16 | flags u8 (bit 0: anchor) | version u64
              | base version u64 (all ones: none) | tensor count u32 | total length u64 | header length u32
    records   one per tensor: name length u16 | utf-8 name | dtype id u8 | ndim u8 | dims u64 × ndim
              | dense u8 | element count M u64 | digest u64 | bucket count u32
              | per bucket: first element ordinal u64 | element count u64 | index coding u8 | value coding u8
                | index compressor u8 | value compressor u8 | index raw bytes u64 | value raw bytes u64
                | index stored bytes u64 | value stored bytes u64 | CRC32 of the stored bytes u32
    header CRC32 u32 over every header byte before it
    bodies    per tensor, per bucket, in record order: stored index stream | stored value stream

The M elements are cut into buckets of ``bucket_elements``, each coded and compressed on its own, so buckets
can be (de)compressed in parallel and a corrupt one is named. Index streams (sparse tensors only) use
whichever coding is exactly smallest for the bucket:

* ``gaps``: LEB128 varints: the first index relative to the previous bucket's last + 1, then
  differences − 1.
* ``elias_fano``: that first-index varint, the low-bit width L u8, the low L bits of every offset from the
  bucket's first index (LSB-first, :mod:`sparsetron.parallel.data.bitpack`), then the high parts in unary
  (offset ``i``'s high part ``h`` sets bit ``h + i``).
* ``bitmap``: that first-index varint, then one bit per position from the first index to the last.

Value streams hold ``raw`` bit patterns or the ``diff`` new − base (wrapping in the element width, zig-zag
mapped, so a few ulps become small integers), byte-plane shuffled (every element's low byte, then the next
byte …) because the high planes are near-constant. Each stream is zstd-compressed only when that shrinks it.

Encoding does its per-element work (gaps, varints, Elias–Fano, bitmaps, zig-zag, byte planes) in torch on the
update's own device, so from a GPU only the coded streams cross to the host, where zstd runs. Decoding is numpy.
"""

from __future__ import annotations

import itertools
import struct
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import astuple, dataclass
from functools import partial

import numpy as np
import torch
import zstandard

from sparsetron.binary import encode_name
from sparsetron.kernels import delta_coding
from sparsetron.parallel.data.bitpack import pack_bits, packed_len
from sparsetron.sync import host_kernels

MAGIC = b"STSD"
FORMAT_VERSION = 1
#: Wire dtype id = position in this tuple.
DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool,
)  # fmt: skip
INDEX_CODINGS = ("none", "gaps", "elias_fano", "bitmap")
VALUE_CODINGS = ("raw", "diff")
COMPRESSORS = ("none", "zstd")

_IDX_NONE, _IDX_GAPS, _IDX_EF, _IDX_BITMAP = range(4)
_VAL_RAW, _VAL_DIFF = range(2)
_STORED, _ZSTD = range(2)
_FLAG_ANCHOR = 1
_NO_BASE_VERSION = (1 << 64) - 1
_U64_MAX = (1 << 64) - 1
# Elias–Fano low parts go through bitpack, which packs up to 32 bits; wider would only pay off below 1e-9
# density, where the unary part is a handful of bytes anyway.
_MAX_LOW_BITS = 32

_PREAMBLE = struct.Struct("<4sHBQQIQI")
_VERSION_PREFIX = struct.Struct("<4sH")
_TENSOR = struct.Struct("<BQQI")
_BUCKET = struct.Struct("<QQBBBBQQQQI")
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

_BITS_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_SIGNED_DTYPES = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_NP_SIGNED = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}
_NP_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
# A non-negative int64 needs 1 + (number of these it is ≥) varint bytes (2**63 and up do not fit int64).
_VARINT_STEPS = tuple(1 << (7 * k) for k in range(1, 9))


class DeltaFormatError(ValueError):
    """A payload that cannot be decoded: corrupt, truncated, foreign, from a newer format, or inconsistent."""


@dataclass
class TensorUpdate:
    """New bit patterns for ``M`` elements of one tensor.

    ``indices`` int64 [M] strictly increasing flat positions, or None for a dense update (M = numel).
    ``values`` [M] the new bit patterns as the same-width integer dtype (uint8, int16, int32, int64; see
    :func:`bits_view`); ``base`` [M] the receiver's current bit patterns there (enables diff coding).
    ``digest`` is an unsigned 64-bit digest of the whole resulting tensor, carried verbatim.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    indices: torch.Tensor | None
    values: torch.Tensor
    base: torch.Tensor | None = None
    digest: int = 0


@dataclass
class DeltaHeader:
    """Payload-level fields: the version it produces, the version it applies to (None: any), anchor flag."""

    version: int
    base_version: int | None
    anchor: bool
    count: int


@dataclass
class PendingUpdate:
    """A sparse tensor's decoded change whose diff-coded values still wait for the receiver's current bits.

    ``indices`` int64 [M] strictly increasing; ``values`` [M] same-width integers: the new bit patterns,
    except inside the ``relative`` element ranges (``(start, end)``, the diff-coded buckets), where they are
    the wrapped differences new − current. Applying it reads each changed element's current bits once, at the
    moment it is written (:mod:`sparsetron.sync.swap`). ``digest`` is the tensor's digest after the change.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    indices: torch.Tensor
    values: torch.Tensor
    relative: list[tuple[int, int]]
    digest: int


@dataclass
class _Checked:
    """A validated update, still on its device: contiguous int64 indices or None, same-width bit patterns."""

    name: str
    dtype_id: int
    shape: tuple[int, ...]
    indices: torch.Tensor | None
    values: torch.Tensor
    base: torch.Tensor | None
    digest: int


@dataclass
class _Coded:
    """One bucket's uncompressed streams on the host: index (None when dense), raw values, diff values.

    With diff values, the bucket's raw values stay on the update's device (``raw_on_device``) and are
    shuffled and copied over only if the diff stream does not clearly win, which for few-ulp changes is never.
    """

    first: int
    count: int
    index_coding: int
    index: memoryview | None
    raw: memoryview | None
    diff: memoryview | None
    raw_on_device: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None  # set when the streams are still being copied from a GPU

    def wait(self) -> None:
        """Block until the streams are on the host."""
        if self.ready is not None:
            self.ready.synchronize()

    def raw_bytes(self) -> memoryview:
        """The raw value stream on the host."""
        if self.raw is None:
            self.raw = memoryview(_byte_planes(self.raw_on_device, None).cpu().numpy())
        return self.raw


@dataclass
class _Bucket:
    """A bucket's header fields (lengths in bytes)."""

    first: int
    count: int
    index_coding: int
    value_coding: int
    index_compressor: int
    value_compressor: int
    index_raw: int
    value_raw: int
    index_stored: int
    value_stored: int
    crc: int


@dataclass
class _Record:
    """A tensor's header record as parsed, with where its bodies start in the payload."""

    name: str
    dtype_id: int
    shape: tuple[int, ...]
    dense: bool
    count: int
    digest: int
    buckets: list[_Bucket]
    body_offset: int

    @property
    def numel(self) -> int:
        """Elements in the full tensor."""
        return int(np.prod(self.shape, dtype=object))

    @property
    def end(self) -> int:
        """Payload offset just past this tensor's bodies."""
        return self.body_offset + sum(b.index_stored + b.value_stored for b in self.buckets)


def _bits_dtype(dtype: torch.dtype) -> torch.dtype:
    """The same-width integer dtype that carries ``dtype``'s bit patterns (bool → uint8)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype} is not supported; use one of {[str(d) for d in DTYPES]}")
    return _BITS_DTYPES[dtype.itemsize]


def bits_view(t: torch.Tensor) -> torch.Tensor:
    """Flat [numel] same-width integer view of ``t``'s bit patterns (uint8/int16/int32/int64; bool → uint8).

    ``t`` is any supported dtype and shape (0-d gives [1]); no copy when ``t`` is contiguous.
    """
    return t.reshape(-1).view(_bits_dtype(t.dtype))


def from_bits(bits: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`bits_view`: ``bits`` [numel] of the same-width int dtype → ``dtype`` tensor ``shape``."""
    expected = _bits_dtype(dtype)
    if bits.dtype != expected:
        raise ValueError(f"bits are {bits.dtype}, {dtype} needs {expected}; pass bits_view()'s output")
    return bits.reshape(-1).view(dtype).reshape(shape)


# ---------------------------------------------------------------------------------------------- varints


def _varint(value: int) -> bytes:
    """One non-negative int as a LEB128 varint."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _on_device(values: list[int], device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A small host list as a tensor on ``device`` without waiting for the device's queued work.

    ``torch.tensor(..., device=cuda)`` copies synchronously, which waits for every kernel queued before it; a
    non-blocking copy from host memory is staged at once and queued behind them instead.
    """
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _varint_lengths(v: torch.Tensor) -> torch.Tensor:
    """Bytes each of ``v`` (non-negative int64 [n]) takes as a LEB128 varint, int64 [n]."""
    return torch.searchsorted(_on_device(list(_VARINT_STEPS), v.device), v, right=True) + 1


def _varint_stream(v: torch.Tensor, lengths: torch.Tensor, total: int, longest: int) -> torch.Tensor:
    """uint8 [total]: ``v`` (non-negative int64 [n]) as concatenated LEB128 varints, on ``v``'s device.

    ``lengths`` from :func:`_varint_lengths`, ``total`` their sum and ``longest`` ≥ their max (host ints).
    Byte ``k`` of value ``i`` is scattered to its offset + ``k``; values shorter than ``k + 1`` bytes write
    into a spare last byte instead, which is dropped.
    """
    out = torch.empty(total + 1, dtype=torch.uint8, device=v.device)
    offsets = torch.cumsum(lengths, 0) - lengths
    for k in range(longest):
        group = (v >> (7 * k)) & 0x7F
        more = (lengths > k + 1).to(torch.int64) << 7
        target = torch.where(lengths > k, offsets + k, total)
        out[target] = (group | more).to(torch.uint8)
    return out[:total]


def _read_varint(buf: np.ndarray, where: str) -> tuple[int, int]:
    """(value, bytes used) of the canonical-width varint at the start of ``buf`` (uint8)."""
    value = 0
    for used, byte in enumerate(buf[:10].tolist(), start=1):
        value |= (byte & 0x7F) << (7 * (used - 1))
        if byte < 0x80:
            if value >> 64:
                break
            return value, used
    raise DeltaFormatError(f"{where}: unterminated or over-long varint; payload is corrupt")


# ----------------------------------------------------------------------------------------- index coding


def _ef_layout(count: int, span: int) -> tuple[int, int]:
    """(low bits L, bytes of low + unary parts) minimising the Elias–Fano size of ``count`` offsets ≤ span."""
    # The size depends only on the count and the largest offset, so every L is tried exactly, in O(1) each.
    candidates = range(min(_MAX_LOW_BITS, span.bit_length()) + 1)
    sizes = [(packed_len(count, low) + (count + (span >> low) + 7) // 8, low) for low in candidates]
    size, low = min(sizes)
    return low, size


def _pack_bit_array(bits: torch.Tensor) -> torch.Tensor:
    """uint8 [n / 8]: LSB-first packing of ``bits`` (uint8 0/1 [n], n a multiple of 8)."""
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    return (bits.view(-1, 8) << shifts).sum(dim=1, dtype=torch.uint8)


def _gaps(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gaps int64 [M], their varint lengths int64 [M]) of increasing ``indices`` int64 [M].

    A bucket's first gap is relative to the previous bucket's last index, so the whole tensor's gaps are one
    difference with −1 before the first index.
    """
    gaps = torch.diff(indices, prepend=indices.new_full((1,), -1)) - 1
    return gaps, _varint_lengths(gaps)


def _index_summary(indices: torch.Tensor, bucket_elements: int) -> torch.Tensor:
    """int64 [4·B + 2] on the indices' device (B buckets, M ≥ 1 indices): every bucket's first index, then
    every last index, first gap and gap-stream bytes, then the longest varint and the smallest gap (< 0: the
    indices do not increase strictly). Queued without waiting; read back with every tensor's at once."""
    gaps, lengths = _gaps(indices)
    count = indices.numel()
    buckets = -(-count // bucket_elements)
    lasts = indices[bucket_elements - 1 :: bucket_elements]
    if lasts.numel() < buckets:  # a partial last bucket
        lasts = torch.cat([lasts, indices[-1:]])
    if buckets == 1:
        gap_bytes = lengths.sum().view(1)
    else:
        padded = torch.nn.functional.pad(lengths, (0, buckets * bucket_elements - count))
        gap_bytes = padded.view(buckets, bucket_elements).sum(dim=1)
    return torch.cat(
        [
            indices[::bucket_elements],
            lasts,
            gaps[::bucket_elements],
            gap_bytes,
            lengths.max().view(1),
            gaps.min().view(1),
        ]
    )


def _read_small(tensors: list[torch.Tensor | None]) -> list[list[int] | None]:
    """Small int64 device tensors as host lists: one wait per device for all of them."""
    by_device: dict[torch.device, list[int]] = {}
    for position, tensor in enumerate(tensors):
        if tensor is not None:
            by_device.setdefault(tensor.device, []).append(position)
    read: list = [None] * len(tensors)
    for positions in by_device.values():
        flat = torch.cat([tensors[p] for p in positions]).tolist()
        at = 0
        for position in positions:
            read[position], at = flat[at : at + tensors[position].numel()], at + tensors[position].numel()
    return read


class _LazyGaps:
    """The tensor's gaps and their varint lengths (:func:`_gaps`), computed the first time a bucket asks."""

    def __init__(self, indices: torch.Tensor) -> None:
        self.indices = indices
        self._computed: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, part: slice) -> tuple[torch.Tensor, torch.Tensor]:
        if self._computed is None:
            self._computed = _gaps(self.indices)
        gaps, lengths = self._computed
        return gaps[part], lengths[part]


def _encode_indices(
    indices: torch.Tensor, gaps: _LazyGaps, part: slice, longest: int, row: list[int]
) -> tuple[int, torch.Tensor]:
    """(coding id, uint8 stream on the indices' device) for one bucket's int64 [n ≥ 1] increasing indices.

    ``gaps(part)`` gives the bucket's gaps and varint lengths, ``row`` is its summary row. The coding whose
    exact size is smallest wins (ties: gaps, then Elias–Fano).
    """
    first_index, last_index, first_gap, gap_bytes = row
    count = indices.numel()
    prefix = _varint(first_gap)
    span = last_index - first_index
    low, ef_bytes = _ef_layout(count, span)
    sizes = [gap_bytes, len(prefix) + 1 + ef_bytes, len(prefix) + (span + 1 + 7) // 8]
    coding = (_IDX_GAPS, _IDX_EF, _IDX_BITMAP)[sizes.index(min(sizes))]
    if coding == _IDX_GAPS:
        return coding, _varint_stream(*gaps(part), gap_bytes, longest)
    device = indices.device
    if coding == _IDX_EF and delta_coding.kernels_apply(indices):
        low_bytes = packed_len(count, low)
        stream = delta_coding.elias_fano_bits(
            indices, first_index, low, [*prefix, low], low_bytes, len(prefix) + 1 + ef_bytes
        )
        return coding, stream
    offsets = indices - indices[:1]
    if coding == _IDX_EF:
        head = _on_device([*prefix, low], device, torch.uint8)
        return coding, torch.cat([head, _ef_encode(offsets, low, span)])
    bits = torch.zeros(-(-(span + 1) // 8) * 8, dtype=torch.uint8, device=device)
    bits[offsets] = 1
    head = _on_device(list(prefix), device, torch.uint8)
    return coding, torch.cat([head, _pack_bit_array(bits)])


def _ef_encode(offsets: torch.Tensor, low: int, span: int) -> torch.Tensor:
    """Low ``low`` bits of each offset (int64 [n], increasing, ≤ span) packed, then the unary high parts."""
    count = offsets.numel()
    low_part = pack_bits(offsets & ((1 << low) - 1), low)
    unary = torch.zeros(-(-(count + (span >> low)) // 8) * 8, dtype=torch.uint8, device=offsets.device)
    unary[(offsets >> low) + torch.arange(count, device=offsets.device)] = 1
    return torch.cat([low_part, _pack_bit_array(unary)])


def _decode_indices(
    coding: int, stream: np.ndarray, count: int, prev_last: int, numel: int, out: np.ndarray, where: str
) -> None:
    """One bucket's ``count`` positions into ``out`` (int64, ``count`` + 1 slots, the last one scratch).

    Checked to increase strictly from beyond ``prev_last`` (the previous bucket's last) and stay below
    ``numel``; raises DeltaFormatError naming what is wrong.
    """
    if coding == _IDX_GAPS:
        status, found = host_kernels.decode_gaps(stream, count, prev_last, numel, out)
    else:
        start_gap, used = _read_varint(stream, where)
        first = prev_last + 1 + start_gap
        if first >= numel:
            status, found = host_kernels.NOT_INCREASING, 0
        elif coding == _IDX_EF:
            status, found = host_kernels.decode_elias_fano(stream, used, count, first, numel, out)
        else:
            status, found = host_kernels.decode_bitmap(stream, used, count, first, numel, out)
    if status != host_kernels.OK:
        problem = host_kernels.PROBLEMS[status].replace("within the tensor", f"within [0, {numel})")
        raise DeltaFormatError(
            f"{where}: {INDEX_CODINGS[coding]} index stream {problem} (found {found} of {count} positions); "
            "payload is corrupt"
        )


# ----------------------------------------------------------------------------------------- value coding


def _byte_planes(values: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """uint8 byte planes of ``values`` (same-width int [n]), or of its zig-zag difference from ``base``."""
    if delta_coding.kernels_apply(values):
        return delta_coding.byte_planes(values, base)
    return _shuffle(values if base is None else _zigzag(values, base))


def _shuffle(bits: torch.Tensor) -> torch.Tensor:
    """uint8 byte planes of ``bits`` (contiguous same-width int [n]): every low byte first, then the next …

    Reads the tensor's memory as little-endian, as every torch device (x86, ARM, CUDA) stores it.
    """
    width = bits.element_size()
    return bits.view(torch.uint8).view(-1, width).t().reshape(-1)


def _unshuffle(buf: np.ndarray, count: int, width: int) -> np.ndarray:
    """Inverse of :func:`_shuffle`: native unsigned [count] of ``width`` bytes from uint8 planes."""
    planes = buf.reshape(width, count)
    out = planes[width - 1].astype(_NP_UNSIGNED[width])
    # Horner over the byte planes, high to low: contiguous passes, ~8x a strided transpose.
    for plane in planes[width - 2 :: -1]:
        out <<= 8
        out |= plane
    return out


def _zigzag(new: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """(new − base) wrapped in the width, zig-zag mapped so small ± differences become small unsigned ints."""
    signed = _SIGNED_DTYPES[new.element_size()]
    diff = new.view(signed) - base.view(signed)  # torch integer arithmetic wraps on overflow
    return (diff << 1) ^ (diff >> (8 * new.element_size() - 1))


def _compress(raw: memoryview, level: int) -> tuple[int, bytes | memoryview]:
    """(compressor id, stored bytes): zstd only when it is smaller than ``raw``."""
    if raw:
        packed = zstandard.ZstdCompressor(level=level).compress(raw)
        if len(packed) < len(raw):
            return _ZSTD, packed
    return _STORED, raw


def _code_tensor(update: _Checked, bucket_elements: int, summary: tuple | None) -> list[_Coded]:
    """Every bucket's uncompressed streams, coded on the update's device and copied to the host in one go.

    ``summary``: the tensor's (longest varint, bucket rows) from :func:`_summaries` (None when dense).
    On a GPU nothing here waits for the device: the copy to the host is queued, and each bucket's ``ready``
    event says when it is done.
    """
    count = update.values.numel()
    starts = _starts(update, bucket_elements)
    if not starts:
        return []
    indices, values, base = update.indices, update.values, update.base
    # Only gap coding needs the whole tensor's gaps; at sparse densities Elias–Fano wins and skips them.
    gaps = _LazyGaps(indices)
    pieces, layout = [], []
    for bucket, first in enumerate(starts):
        part = slice(first, min(first + bucket_elements, count))
        coding = _IDX_NONE
        if summary is not None:
            longest, rows = summary
            coding, stream = _encode_indices(indices[part], gaps, part, longest, rows[bucket])
            pieces.append(stream.to(values.device))
        pieces.append(_byte_planes(values[part], None if base is None else base[part]))
        layout.append((first, part.stop - first, coding, None if base is None else values[part]))
    on_host, ready = _to_host(torch.cat(pieces))
    host = memoryview(on_host.numpy())
    bounds = [0, *itertools.accumulate(p.numel() for p in pieces)]
    views = iter(host[a:b] for a, b in itertools.pairwise(bounds))
    coded = []
    for first, size, coding, raw_on_device in layout:
        index = None if coding == _IDX_NONE else next(views)
        values_view = next(views)
        raw, diff = (values_view, None) if raw_on_device is None else (None, values_view)
        coded.append(_Coded(first, size, coding, index, raw, diff, raw_on_device, ready))
    return coded


def _starts(update: _Checked, bucket_elements: int) -> list[int]:
    """First element ordinal of each of the update's buckets."""
    return list(range(0, update.values.numel(), bucket_elements))


def _to_host(streams: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """(uint8 ``streams`` on the host, event marking the copy done); from a GPU through page-locked memory
    (torch caches those blocks), copied asynchronously, so the next tensor's coding is queued meanwhile."""
    if streams.device.type != "cuda":
        return streams, None
    host = torch.empty(streams.shape, dtype=streams.dtype, pin_memory=True)
    host.copy_(streams, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


def _compress_bucket(coded: _Coded, level: int, width: int) -> tuple[_Bucket, bytes, bytes]:
    """Compress one coded bucket: (header fields, stored index stream, stored value stream).

    Values are sent diff-coded when a base was given and its stored stream is at most half the raw bytes, or
    else strictly smaller than the compressed raw stream; varint index streams are compressed, others stored.
    """
    coded.wait()
    index_raw, index_compressor, index_stored = 0, _STORED, b""
    if coded.index is not None:
        index_raw = len(coded.index)
        # Elias–Fano and bitmap streams are near their entropy already; only varint gaps are worth zstd.
        compressible = coded.index_coding == _IDX_GAPS
        index_compressor, index_stored = (
            _compress(coded.index, level) if compressible else (_STORED, coded.index)
        )
    if coded.diff is not None:
        diff = _compress(coded.diff, level)
        if 2 * len(diff[1]) <= coded.count * width:  # a clear win (the usual few-ulp case): raw is not tried
            value_coding, (value_compressor, value_stored) = _VAL_DIFF, diff
        else:
            value_coding, (value_compressor, value_stored) = _VAL_RAW, _compress(coded.raw_bytes(), level)
            if len(diff[1]) < len(value_stored):
                value_coding, (value_compressor, value_stored) = _VAL_DIFF, diff
    else:
        value_coding, (value_compressor, value_stored) = _VAL_RAW, _compress(coded.raw_bytes(), level)
    bucket = _Bucket(
        first=coded.first,
        count=coded.count,
        index_coding=coded.index_coding,
        value_coding=value_coding,
        index_compressor=index_compressor,
        value_compressor=value_compressor,
        index_raw=index_raw,
        value_raw=coded.count * width,
        index_stored=len(index_stored),
        value_stored=len(value_stored),
        crc=zlib.crc32(value_stored, zlib.crc32(index_stored)),
    )
    return bucket, index_stored, value_stored


# ------------------------------------------------------------------------------------------------ encode


def _check_shape(name: str, shape: object) -> tuple[int, ...]:
    """``shape`` as a tuple of ≤ 255 non-negative ints."""
    dims = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else None
    if dims is None or len(dims) > 255 or any(not isinstance(d, int) or d < 0 for d in dims):
        raise ValueError(f"tensor {name!r}: shape={shape!r} must be ≤ 255 non-negative ints; pass t.shape")
    return dims


def _checked_bits(name: str, field: str, t: object, bits_dtype: torch.dtype, count: int) -> torch.Tensor:
    """``t`` checked to be ``bits_dtype`` [count], detached and contiguous on its device."""
    if not isinstance(t, torch.Tensor) or t.dtype != bits_dtype or tuple(t.shape) != (count,):
        found = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(
            f"tensor {name!r}: {field} is {found}, must be {bits_dtype} [{count}]; pass bits_view(...) of the "
            "selected elements"
        )
    return t.detach().contiguous()


def _checked_indices(name: str, indices: object) -> torch.Tensor:
    """``indices`` checked to be an int64 [M] tensor (their values are checked by :func:`_summaries`)."""
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64 or indices.dim() != 1:
        found = f"{indices.dtype} {tuple(indices.shape)}" if isinstance(indices, torch.Tensor) else indices
        raise ValueError(f"tensor {name!r}: indices are {found}, must be int64 [M]; cast/flatten them")
    return indices.detach().contiguous()


def _summaries(checked: list[_Checked], bucket_elements: int) -> list[tuple | None]:
    """Per update: its indices checked, and (longest varint, bucket rows) of :func:`_index_summary` (None when
    dense or empty). Raises ValueError for indices that are not strictly increasing within the tensor.

    Both need a few numbers from the indices' device; reading every tensor's at once is encoding's only wait
    for the device (a wait per tensor cost ~0.8 ms each on an H100).
    """
    sparse = [u.indices is not None and u.indices.numel() > 0 for u in checked]
    read = _read_small(
        [
            _index_summary(u.indices, bucket_elements) if has else None
            for u, has in zip(checked, sparse, strict=True)
        ]
    )
    summaries = []
    for update, values in zip(checked, read, strict=True):
        if values is None:
            summaries.append(None)
            continue
        buckets = (len(values) - 2) // 4
        firsts, lasts, first_gaps, gap_bytes = (values[k * buckets : (k + 1) * buckets] for k in range(4))
        longest, smallest_gap = values[-2:]
        numel = int(np.prod(update.shape, dtype=object))
        if smallest_gap < 0 or lasts[-1] >= numel:
            raise ValueError(
                f"tensor {update.name!r}: indices must be strictly increasing flat positions in [0, {numel}); "
                "sort them and drop duplicates"
            )
        summaries.append(
            (longest, [list(row) for row in zip(firsts, lasts, first_gaps, gap_bytes, strict=True)])
        )
    return summaries


def _check_update(update: TensorUpdate, needs_self_contained: bool) -> _Checked:
    """Validate ``update`` (raising ValueError naming the field and fix); its tensors stay on their devices."""
    name = update.name
    encode_name(name)
    bits_dtype = _bits_dtype(update.dtype)
    shape = _check_shape(name, update.shape)
    numel = int(np.prod(shape, dtype=object))
    indices = None if update.indices is None else _checked_indices(name, update.indices)
    count = numel if indices is None else indices.numel()
    values = _checked_bits(name, "values", update.values, bits_dtype, count)
    base = None
    if update.base is not None:
        if needs_self_contained:
            raise ValueError(
                f"tensor {name!r}: base is set but the payload is an anchor or has no base_version, so the "
                "receiver's values are unknown; drop base or pass base_version"
            )
        base = _checked_bits(name, "base", update.base, bits_dtype, count).to(values.device)
    if not isinstance(update.digest, int) or not 0 <= update.digest <= _U64_MAX:
        raise ValueError(f"tensor {name!r}: digest={update.digest!r} must be an unsigned 64-bit int")
    return _Checked(name, DTYPES.index(update.dtype), shape, indices, values, base, update.digest)


def _record_bytes(update: _Checked, buckets: list[_Bucket]) -> bytes:
    """A tensor's header record."""
    name = update.name.encode("utf-8")
    dims = b"".join(_U64.pack(d) for d in update.shape)
    head = _U16.pack(len(name)) + name + _U8.pack(update.dtype_id) + _U8.pack(len(update.shape)) + dims
    fixed = _TENSOR.pack(update.indices is None, update.values.numel(), update.digest, len(buckets))
    rows = [_BUCKET.pack(*astuple(b)) for b in buckets]  # field order = wire order
    return head + fixed + b"".join(rows)


def _check_encode_args(
    count: int, version: int, base_version: int | None, level: int, bucket_elements: int, threads: int
) -> None:
    """Raise ValueError naming the argument and its valid range."""
    checks = [
        (count <= 0xFFFFFFFF, f"{count} updates exceed 2**32 - 1; split the payload"),
        (isinstance(version, int) and 0 <= version <= _U64_MAX, f"version={version!r} must be a u64"),
        (
            base_version is None or (isinstance(base_version, int) and 0 <= base_version < _NO_BASE_VERSION),
            f"base_version={base_version!r} must be None or an int in [0, 2**64 - 1)",
        ),
        (
            isinstance(level, int) and level <= zstandard.MAX_COMPRESSION_LEVEL,
            f"level={level!r} must be an int ≤ {zstandard.MAX_COMPRESSION_LEVEL}; 3 is a good default",
        ),
        (isinstance(bucket_elements, int) and bucket_elements >= 1, "bucket_elements must be an int ≥ 1"),
        (isinstance(threads, int) and threads >= 0, "threads must be an int ≥ 0 (0: no thread pool)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def encode(
    updates: list[TensorUpdate],
    *,
    version: int,
    base_version: int | None,
    anchor: bool = False,
    level: int = 3,
    bucket_elements: int = 1 << 22,
    threads: int = 0,
) -> memoryview:
    """Serialise ``updates`` (CPU or CUDA tensors) into one payload producing ``version`` from ``base_version``.

    The per-element coding runs in torch on each update's device; only the coded streams are copied to the
    host. ``base`` (the receiver's current bit patterns) is only allowed when ``base_version`` is given and
    ``anchor`` is False, since diff-coded values cannot be decoded without them. ``level`` is the zstd level;
    ``threads`` > 0 compresses buckets in a pool of that many threads (zstd releases the GIL), overlapping
    the coding of the next tensor. Returns the payload as a read-only byte buffer (``bytes(payload)``
    copies it). Raises ValueError on invalid input.
    """
    _check_encode_args(len(updates), version, base_version, level, bucket_elements, threads)
    checked = [_check_update(u, anchor or base_version is None) for u in updates]
    per_tensor: list[list] = []
    summaries = _summaries(checked, bucket_elements)
    with ThreadPoolExecutor(max_workers=threads) if threads > 0 else nullcontext() as pool:
        for update, summary in zip(checked, summaries, strict=True):
            compress = partial(_compress_bucket, level=level, width=update.values.element_size())
            coded = _code_tensor(update, bucket_elements, summary)
            per_tensor.append([compress(c) if pool is None else pool.submit(compress, c) for c in coded])
        if pool is not None:
            per_tensor = [[future.result() for future in parts] for parts in per_tensor]
        records = [
            _record_bytes(u, [b for b, _, _ in parts]) for u, parts in zip(checked, per_tensor, strict=True)
        ]
        bodies = [part for parts in per_tensor for _, index, value in parts for part in (index, value)]
        header_len = _PREAMBLE.size + sum(len(r) for r in records) + _U32.size
        total_len = header_len + sum(len(b) for b in bodies)
        flags = _FLAG_ANCHOR if anchor else 0
        wire_base = _NO_BASE_VERSION if base_version is None else base_version
        preamble = _PREAMBLE.pack(
            MAGIC, FORMAT_VERSION, flags, version, wire_base, len(updates), total_len, header_len
        )
        header = preamble + b"".join(records)
        return _assemble([header, _U32.pack(zlib.crc32(header)), *bodies], total_len, pool)


def _assemble(pieces: list, total: int, pool: ThreadPoolExecutor | None) -> memoryview:
    """``pieces`` (bytes-like) concatenated into one new read-only buffer of ``total`` bytes.

    The copy writes fresh memory, and on the VMs measured here first touches cost ~0.5 ns per byte (57 ms of
    a 101 MiB payload, a third of encoding it), so with a pool the pieces are copied by its threads at once.
    """
    out = np.empty(total, dtype=np.uint8)
    ends = list(itertools.accumulate(len(p) for p in pieces))

    def copy(index: int) -> None:
        end = ends[index]
        out[end - len(pieces[index]) : end] = np.frombuffer(pieces[index], dtype=np.uint8)

    if pool is None:
        for index in range(len(pieces)):
            copy(index)
    else:
        list(pool.map(copy, range(len(pieces))))
    return memoryview(out).toreadonly()


# ------------------------------------------------------------------------------------------------ decode


class _Reader:
    """Sequential little-endian reader over the CRC-checked header; running past it means corruption."""

    def __init__(self, data: memoryview, offset: int, end: int) -> None:
        self.data = data
        self.offset = offset
        self.end = end

    def take(self, fmt: struct.Struct) -> tuple:
        """Unpack ``fmt`` at the cursor and advance."""
        return fmt.unpack(self.raw(fmt.size))

    def raw(self, size: int) -> bytes:
        """The next ``size`` bytes."""
        if self.offset + size > self.end:
            raise DeltaFormatError("header records overrun the header length; payload is corrupt")
        chunk = bytes(self.data[self.offset : self.offset + size])
        self.offset += size
        return chunk


def _as_view(payload: object) -> memoryview:
    """``payload`` as a flat byte memoryview (no copy)."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise DeltaFormatError(f"payload is {type(payload).__name__}, must be bytes; pass encode()'s output")
    return memoryview(payload).cast("B")


def _parse(payload: object) -> tuple[memoryview, DeltaHeader, list[_Record], int]:
    """(bytes, header, records, header length) after checking magic, version, lengths, CRC and records."""
    data = _as_view(payload)
    parsed = _parse_header(data, len(data))
    assert parsed is not None  # every byte is available
    return (data, *parsed)


def _parse_header(data: memoryview, available: int) -> tuple[DeltaHeader, list[_Record], int] | None:
    """(header, records, header length) of the payload ``data`` whose first ``available`` bytes are in.

    None while the header is not complete yet. ``len(data)`` is the payload's full length (a receiver knows
    it from the transport's framing before the bytes arrive), so the length checks run up front.
    """
    seen = bytes(data[: min(available, len(MAGIC))])
    if seen != MAGIC[: len(seen)]:
        raise DeltaFormatError(
            f"bad magic {seen!r}, expected {MAGIC!r}; this is not a sparsetron weight delta"
        )
    if available < _VERSION_PREFIX.size:
        if available == len(data):
            raise DeltaFormatError(f"payload of {len(data)} bytes is truncated; resend it")
        return None
    _, fmt_version = _VERSION_PREFIX.unpack_from(data)
    if fmt_version > FORMAT_VERSION:
        raise DeltaFormatError(
            f"format version {fmt_version} is newer than this reader's {FORMAT_VERSION}; upgrade sparsetron on "
            "the receiver"
        )
    if fmt_version != FORMAT_VERSION:
        raise DeltaFormatError(f"unknown format version {fmt_version}; payload is corrupt")
    if len(data) < _PREAMBLE.size:
        raise DeltaFormatError(f"payload of {len(data)} bytes is truncated (preamble needs {_PREAMBLE.size})")
    if available < _PREAMBLE.size:
        return None
    _, _, flags, version, wire_base, count, total_len, header_len = _PREAMBLE.unpack_from(data)
    if header_len > len(data) or header_len < _PREAMBLE.size + _U32.size:
        raise DeltaFormatError(
            f"header length {header_len} does not fit the {len(data)}-byte payload; it is truncated or corrupt"
        )
    if available < header_len:
        return None
    crc_at = header_len - _U32.size
    if zlib.crc32(data[:crc_at]) != _U32.unpack_from(data, crc_at)[0]:
        raise DeltaFormatError("header CRC32 mismatch; the payload was corrupted in transit, resend it")
    if total_len != len(data):
        what = "truncated" if len(data) < total_len else "followed by trailing bytes"
        raise DeltaFormatError(f"payload is {what}: {len(data)} bytes, header says {total_len}; resend it")
    if flags & ~_FLAG_ANCHOR:
        raise DeltaFormatError(f"unknown flags {flags:#x}; upgrade sparsetron on the receiver")
    reader = _Reader(data, _PREAMBLE.size, crc_at)
    records, body_offset = [], header_len
    for _ in range(count):
        record = _read_record(reader, body_offset)
        records.append(record)
        body_offset = record.end
    if reader.offset != crc_at:
        raise DeltaFormatError("header has bytes beyond its records; payload is corrupt")
    if body_offset != total_len:
        raise DeltaFormatError("bucket lengths do not add up to the total length; payload is corrupt")
    base_version = None if wire_base == _NO_BASE_VERSION else wire_base
    return DeltaHeader(version, base_version, bool(flags & _FLAG_ANCHOR), count), records, header_len


def _read_record(reader: _Reader, body_offset: int) -> _Record:
    """Parse and check one tensor record at the reader's cursor."""
    (name_len,) = reader.take(_U16)
    try:
        name = reader.raw(name_len).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DeltaFormatError(f"tensor name is not valid utf-8 ({exc}); payload is corrupt") from exc
    dtype_id, ndim = reader.take(struct.Struct("<BB"))
    shape = tuple(reader.take(_U64)[0] for _ in range(ndim))
    dense, count, digest, num_buckets = reader.take(_TENSOR)
    if num_buckets > count:
        raise DeltaFormatError(f"tensor {name!r}: {num_buckets} buckets for {count} elements; corrupt")
    buckets = [_Bucket(*reader.take(_BUCKET)) for _ in range(num_buckets)]
    record = _Record(name, dtype_id, shape, bool(dense), count, digest, buckets, body_offset)
    if dtype_id >= len(DTYPES) or dense > 1:
        raise DeltaFormatError(f"tensor {name!r}: unknown dtype id {dtype_id} or dense flag {dense}; corrupt")
    if count > record.numel or (record.dense and count != record.numel):
        raise DeltaFormatError(
            f"tensor {name!r}: {count} elements do not fit shape {shape} ({'dense' if dense else 'sparse'}); "
            "payload is corrupt"
        )
    width = DTYPES[dtype_id].itemsize
    ordinal = 0
    for position, bucket in enumerate(buckets):
        _check_bucket(record, position, bucket, ordinal, width)
        ordinal += bucket.count
    if ordinal != count:
        raise DeltaFormatError(
            f"tensor {name!r}: buckets hold {ordinal} elements, record says {count}; corrupt"
        )
    return record


def _check_bucket(record: _Record, position: int, bucket: _Bucket, ordinal: int, width: int) -> None:
    """Raise unless ``bucket``'s header fields are consistent with its tensor and place."""
    # Bounds the index stream of any coding (varints ≤ 10 bytes each, bitmaps ≤ numel bits), so a corrupt
    # raw length cannot make decompression allocate without limit.
    index_limit = 16 * bucket.count + record.numel // 8 + 16
    problems = [
        (
            bucket.first != ordinal or bucket.count < 1,
            f"starts at {bucket.first} with {bucket.count} elements",
        ),
        (
            (bucket.index_coding == _IDX_NONE) != record.dense or bucket.index_coding >= len(INDEX_CODINGS),
            f"has index coding {bucket.index_coding}",
        ),
        (bucket.value_coding >= len(VALUE_CODINGS), f"has value coding {bucket.value_coding}"),
        (
            max(bucket.index_compressor, bucket.value_compressor) >= len(COMPRESSORS),
            f"has compressor ids {bucket.index_compressor}/{bucket.value_compressor}",
        ),
        (bucket.value_raw != bucket.count * width, f"has {bucket.value_raw} value bytes"),
        (
            bucket.index_raw > index_limit or (record.dense and bucket.index_raw),
            f"has {bucket.index_raw} index bytes",
        ),
        (
            (bucket.index_compressor == _STORED and bucket.index_stored != bucket.index_raw)
            or (bucket.value_compressor == _STORED and bucket.value_stored != bucket.value_raw),
            "has stored lengths that differ from its uncompressed lengths",
        ),
    ]
    for bad, what in problems:
        if bad:
            raise DeltaFormatError(f"tensor {record.name!r} bucket {position} {what}; payload is corrupt")


#: Where decoding takes its arrays: ``(count, dtype)`` → an uninitialised 1-D numpy array (``np.empty``, or
#: a subscriber's :class:`~sparsetron.sync.scratch.Scratch` whose pages stay mapped between versions).
Alloc = Callable[[int, "np.dtype | type"], np.ndarray]


def _read_only(array: np.ndarray) -> np.ndarray:
    """A read-only view: every stream reaches the compiled decoders as one type (one compiled variant)."""
    view = array.view()
    view.flags.writeable = False
    return view


def _unpack_stream(stored: memoryview, compressor: int, raw_len: int, where: str, alloc: Alloc) -> np.ndarray:
    """uint8 [raw_len] from a stored stream (decompressed into an array from ``alloc``)."""
    if compressor == _STORED:
        return _read_only(np.frombuffer(stored, dtype=np.uint8))
    if zstandard.frame_content_size(stored) != raw_len:
        raise DeltaFormatError(f"{where}: zstd frame size disagrees with the header; payload is corrupt")
    out = alloc(raw_len, np.uint8)
    filled = 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(stored) as reader:
            while filled < raw_len:
                got = reader.readinto(memoryview(out)[filled:])
                if not got:
                    break
                filled += got
    except zstandard.ZstdError as exc:
        raise DeltaFormatError(f"{where}: zstd stream is corrupt ({exc}); resend the payload") from exc
    if filled != raw_len:
        raise DeltaFormatError(f"{where}: decompressed {filled} bytes, header says {raw_len}; corrupt")
    return _read_only(out)


def _bucket_streams(data: memoryview, record: _Record, alloc: Alloc) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every bucket's (index stream, value stream) after CRC checks and decompression."""
    streams, offset = [], record.body_offset
    for position, bucket in enumerate(record.buckets):
        where = f"tensor {record.name!r} bucket {position}"
        index_stored = data[offset : offset + bucket.index_stored]
        value_stored = data[offset + bucket.index_stored : offset + bucket.index_stored + bucket.value_stored]
        offset += bucket.index_stored + bucket.value_stored
        if zlib.crc32(value_stored, zlib.crc32(index_stored)) != bucket.crc:
            raise DeltaFormatError(
                f"{where}: CRC32 mismatch; the payload was corrupted in transit, resend it"
            )
        index = _unpack_stream(index_stored, bucket.index_compressor, bucket.index_raw, where, alloc)
        value = _unpack_stream(value_stored, bucket.value_compressor, bucket.value_raw, where, alloc)
        streams.append((index, value))
    return streams


def _record_indices(
    record: _Record, streams: list[tuple[np.ndarray, np.ndarray]], alloc: Alloc
) -> np.ndarray:
    """int64 [M] indices of a sparse tensor, checked strictly increasing within [0, numel)."""
    # Each bucket decodes into its slice; its scratch slot is the next bucket's first, written after.
    out = alloc(record.count + 1, np.int64)
    prev_last = -1
    for position, (bucket, (stream, _)) in enumerate(zip(record.buckets, streams, strict=True)):
        part = out[bucket.first : bucket.first + bucket.count + 1]
        where = f"tensor {record.name!r} bucket {position}"
        _decode_indices(bucket.index_coding, stream, bucket.count, prev_last, record.numel, part, where)
        prev_last = int(part[bucket.count - 1])
    return out[: record.count]


#: Where diff-coded values find the receiver's current bits: ``(name, dtype, numel, indices)`` → numpy
#: unsigned [M] bit patterns at ``indices`` (int64 [M]; None: every element). Raises DeltaFormatError when
#: the receiver does not hold a matching tensor.
BaseBits = Callable[[str, torch.dtype, int, "np.ndarray | None"], np.ndarray]


def current_bits(current: Mapping[str, torch.Tensor] | None) -> BaseBits:
    """A :data:`BaseBits` gathering from ``current`` (name → tensor at the base version, any device)."""

    def gather(name: str, dtype: torch.dtype, numel: int, indices: np.ndarray | None) -> np.ndarray:
        tensor = None if current is None else current.get(name)
        if not isinstance(tensor, torch.Tensor):
            raise DeltaFormatError(
                f"tensor {name!r} is diff-coded against the receiver's values; pass "
                "decode(payload, current={name: tensor}) with the receiver's tensors at the base version"
            )
        if tensor.dtype != dtype or tensor.numel() != numel:
            raise DeltaFormatError(
                f"tensor {name!r}: current tensor is {tensor.dtype} {tuple(tensor.shape)}, payload needs "
                f"{dtype} with {numel} elements; pass the matching tensor"
            )
        bits = bits_view(tensor.detach())
        # Gather on the tensor's device so only the M needed elements cross to the host.
        selected = (
            bits if indices is None else bits.index_select(0, torch.from_numpy(indices).to(bits.device))
        )
        host = selected.cpu().numpy()
        return host.view(_NP_UNSIGNED[host.itemsize])

    return gather


def _record_values(
    record: _Record, streams: list[tuple[np.ndarray, np.ndarray]], base: np.ndarray | None, alloc: Alloc
) -> np.ndarray:
    """Unsigned [M] values of every bucket: raw buckets' bit patterns; diff buckets' new bit patterns given
    ``base`` (the current bits at the positions), or their wrapped differences when ``base`` is None."""
    width = DTYPES[record.dtype_id].itemsize
    unsigned = alloc(record.count, _NP_UNSIGNED[width])
    no_base = unsigned[:0]
    for bucket, (_, stream) in zip(record.buckets, streams, strict=True):
        part = slice(bucket.first, bucket.first + bucket.count)
        if bucket.value_coding == _VAL_DIFF:
            host_kernels.undo_diff(stream, no_base if base is None else base[part], unsigned[part])
        else:
            unsigned[part] = _unshuffle(stream, bucket.count, width)
    return unsigned


def _signed(unsigned: np.ndarray) -> torch.Tensor:
    """``unsigned`` bit patterns as the torch integer dtype of their width (bits_view's dtypes)."""
    width = unsigned.itemsize
    return torch.from_numpy(unsigned.view(_NP_SIGNED[width]) if width > 1 else unsigned)


def _decode_record(data: memoryview, record: _Record, base_bits: BaseBits, return_base: bool) -> TensorUpdate:
    """Rebuild one tensor's update from its checked record and bodies (``base``: see :func:`decode`)."""
    streams = _bucket_streams(data, record, np.empty)
    indices = None if record.dense else _record_indices(record, streams, np.empty)
    dtype = DTYPES[record.dtype_id]
    diff_coded = any(b.value_coding == _VAL_DIFF for b in record.buckets)
    base = base_bits(record.name, dtype, record.numel, indices) if diff_coded else None
    values = _signed(_record_values(record, streams, base, np.empty))
    return TensorUpdate(
        name=record.name,
        dtype=dtype,
        shape=record.shape,
        indices=None if indices is None else torch.from_numpy(indices),
        values=values,
        base=_signed(base) if return_base and base is not None else None,
        digest=record.digest,
    )


def _decode_pending(data: memoryview, record: _Record, alloc: Alloc) -> PendingUpdate:
    """One sparse tensor's change without reading the receiver's bits (see :class:`PendingUpdate`)."""
    if record.dense:
        raise ValueError(f"tensor {record.name!r} is dense; decode it with decode() and the current bits")
    streams = _bucket_streams(data, record, alloc)
    indices = _record_indices(record, streams, alloc)
    relative = [(b.first, b.first + b.count) for b in record.buckets if b.value_coding == _VAL_DIFF]
    return PendingUpdate(
        name=record.name,
        dtype=DTYPES[record.dtype_id],
        shape=record.shape,
        indices=torch.from_numpy(indices),
        values=_signed(_record_values(record, streams, None, alloc)),
        relative=relative,
        digest=record.digest,
    )


class PayloadReader:
    """Decodes one payload while it is still arriving: the header once it is in, then each tensor as it completes.

    ``buffer`` is the payload's full-length byte buffer (its length comes from the transport's framing), filled
    from the front; after each fill the receiver calls :meth:`advance` with the number of valid bytes, which
    returns the tensors' records whose bytes are now complete, in payload order. :meth:`decode` turns one into a
    :class:`TensorUpdate` and is safe to call from several threads at once (records are independent).
    Everything :func:`decode` checks is checked, header fields as soon as the header is in.
    """

    def __init__(self, buffer: bytes | bytearray | memoryview) -> None:
        self.data = _as_view(buffer)
        self.header: DeltaHeader | None = None
        self.records: list[_Record] = []
        self._released = 0

    def advance(self, available: int) -> list[_Record]:
        """Records newly complete now that the first ``available`` bytes are in (raises DeltaFormatError)."""
        if self.header is None:
            parsed = _parse_header(self.data, available)
            if parsed is None:
                return []
            self.header, self.records, _ = parsed
        done = self._released
        while done < len(self.records) and self.records[done].end <= available:
            done += 1
        ready, self._released = self.records[self._released : done], done
        return ready

    @property
    def complete(self) -> bool:
        """Whether every record has been released by :meth:`advance`."""
        return self.header is not None and self._released == len(self.records)

    def decode(self, record: _Record, base_bits: BaseBits, *, return_base: bool = False) -> TensorUpdate:
        """One tensor's update (see :func:`decode`); ``base_bits`` supplies diff-coded tensors' current bits."""
        return _decode_record(self.data, record, base_bits, return_base)

    def decode_pending(self, record: _Record, alloc: Alloc = np.empty) -> PendingUpdate:
        """A sparse tensor's change with diff-coded values left as differences (see :class:`PendingUpdate`):
        all of :func:`decode`'s checks but the digest, without touching the receiver's tensors. Its arrays
        come from ``alloc`` (see :data:`Alloc`)."""
        return _decode_pending(self.data, record, alloc)


def decode(
    payload: bytes | memoryview,
    *,
    current: Mapping[str, torch.Tensor] | None = None,
    return_base: bool = False,
) -> tuple[DeltaHeader, list[TensorUpdate]]:
    """Parse and fully validate a payload from :func:`encode`; raises DeltaFormatError, never partial results.

    Returns the header and one update per tensor: ``indices`` int64 [M] (None when dense), ``values`` [M] new
    bit patterns (uint8/int16/int32/int64 by width, CPU), ``base`` None. Diff-coded tensors need the
    receiver's current tensors at the base version, by name, in ``current`` (any device; only the changed
    elements are gathered to the host). ``return_base``: diff-coded tensors keep those gathered current bits
    as ``base`` (a receiver verifying the change then need not gather them again).
    """
    data, header, records, _ = _parse(payload)
    base_bits = current_bits(current)
    return header, [_decode_record(data, record, base_bits, return_base) for record in records]


def payload_stats(payload: bytes | memoryview) -> dict:
    """Sizes and coding choices read from the (CRC-checked) header; bodies are not verified.

    Keys: ``total_bytes``, ``header_bytes``, ``index_bytes``, ``value_bytes`` (stored, i.e. compressed),
    ``changed_elements`` (Σ M), ``bits_per_changed_element`` (8·(index + value bytes) / M),
    ``index_codings`` / ``value_codings`` / ``compressors`` (bucket counts per coding name; compressors
    count index and value streams).
    """
    _, _, records, header_len = _parse(payload)
    buckets = [b for r in records for b in r.buckets]
    index_bytes = sum(b.index_stored for b in buckets)
    value_bytes = sum(b.value_stored for b in buckets)
    changed = sum(r.count for r in records)
    compressors = [b.index_compressor for b in buckets if b.index_coding != _IDX_NONE]
    compressors += [b.value_compressor for b in buckets]
    return {
        "total_bytes": header_len + index_bytes + value_bytes,
        "header_bytes": header_len,
        "index_bytes": index_bytes,
        "value_bytes": value_bytes,
        "changed_elements": changed,
        "bits_per_changed_element": 8 * (index_bytes + value_bytes) / changed if changed else 0.0,
        "index_codings": {n: sum(b.index_coding == i for b in buckets) for i, n in enumerate(INDEX_CODINGS)},
        "value_codings": {n: sum(b.value_coding == i for b in buckets) for i, n in enumerate(VALUE_CODINGS)},
        "compressors": {n: compressors.count(i) for i, n in enumerate(COMPRESSORS)},
    }
