"""Wire format for SparseLoCo payloads: several tensors' top-k chunk data (or dense values) in one ``bytes``.

Layout (all integers little-endian)::

    preamble  magic b"STSL" | version u16 | index coding u8 | reserved u8 (0) | item count u32
              | total length u64 | header length u32
    records   one per item: kind u8 | bits-or-dtype u8 | chunk u32 | k u32 | num_chunks u64 | rice param u8
              | index bytes u64 | code bytes u64 | codebook bytes u64 | dense bytes u64 | body CRC32 u32
              | name length u16 | utf-8 name | ndim u8 | dims u64 × ndim
    header CRC32 u32 over every header byte before it
    bodies    per item, in record order: indices | codes | codebook (compressed) or raw values (dense)

Indices are coded either as ``index_bits(C)`` bits each (``"packed12"``: 12 bits for C = 4096) or, per row,
as gaps (first index, then differences − 1) Golomb-Rice coded (``"rice"``). Rice codewords are split into two
streams, the fixed-width remainders followed by the unary quotients, so both directions vectorise: the
quotients are the distances between the zero bits of the unary stream. Codes are packed ``bits`` per code
(1–8, against the item's fp32 codebook); ``bits`` 16 or 32 send the selected values themselves (bf16 or fp32
little-endian, no codebook). Bit streams are LSB-first within each byte (:mod:`.bitpack`, which packs on the
tensors' device, so a GPU payload crosses to the host already packed).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from sparsetron.binary import encode_name
from sparsetron.parallel.data.bitpack import pack_bits, packed_len, unpack_bits

MAGIC = b"STSL"
VERSION = 1
MAX_CHUNK = 65536
INDEX_CODINGS = ("packed12", "rice")

_PREAMBLE = struct.Struct("<4sHBBIQI")
_RECORD = struct.Struct("<BBIIQBQQQQI")
_U16 = struct.Struct("<H")
_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_KIND_COMPRESSED = 0
_KIND_DENSE = 1
_INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)
# Dense values travel as same-width integers so the byte order is explicit (numpy '<') on any host.
_DENSE_DTYPES = {
    0: (torch.float32, torch.int32, "<i4"),
    1: (torch.bfloat16, torch.int16, "<i2"),
    2: (torch.float16, torch.int16, "<i2"),
    3: (torch.float64, torch.int64, "<i8"),
}
#: ``bits`` values that send the selected values themselves instead of codes: (dtype, same-width int, numpy).
RAW_VALUE_DTYPES = {16: (torch.bfloat16, torch.int16, "<i2"), 32: (torch.float32, torch.int32, "<i4")}
_DENSE_DTYPE_IDS = {torch_dtype: dtype_id for dtype_id, (torch_dtype, _, _) in _DENSE_DTYPES.items()}


class WireFormatError(ValueError):
    """A payload that cannot be decoded: corrupt, truncated, from another version, or semantically invalid."""


@dataclass
class CompressedTensor:
    """One tensor's top-k chunk data: ``indices_NK`` in-chunk positions, ``codes_NK`` into ``codebook``.

    With ``bits`` 16 or 32, ``codes_NK`` holds the selected values themselves (bf16 / fp32) and ``codebook``
    is an empty float32 tensor.
    """

    name: str
    shape: tuple[int, ...]
    chunk: int
    indices_NK: torch.Tensor
    codes_NK: torch.Tensor
    codebook: torch.Tensor
    bits: int


@dataclass
class DenseTensor:
    """A small tensor sent raw (fp32/bf16/fp16/fp64, any shape)."""

    name: str
    values: torch.Tensor


@dataclass
class _Record:
    """One item's header record as parsed; section lengths in bytes."""

    kind: int
    bits_or_dtype: int
    chunk: int
    k: int
    num_chunks: int
    rice_param: int
    index_bytes: int
    code_bytes: int
    codebook_bytes: int
    dense_bytes: int
    body_crc: int
    name: str
    shape: tuple[int, ...]

    @property
    def body_bytes(self) -> int:
        """Total body length in bytes."""
        return self.index_bytes + self.code_bytes + self.codebook_bytes + self.dense_bytes


def index_bits(chunk: int) -> int:
    """Bits needed for an in-chunk index, ceil(log2 ``chunk``): 12 for 4096, 0 for 1."""
    if not 1 <= chunk <= MAX_CHUNK:
        raise ValueError(f"chunk={chunk} must be in [1, {MAX_CHUNK}]; pick a chunk size in that range")
    return (chunk - 1).bit_length()


def _pack(values: np.ndarray | torch.Tensor, width: int) -> bytes:
    """``values`` (non-negative ints) packed ``width`` bits each, LSB-first, as host bytes."""
    tensor = torch.from_numpy(np.ascontiguousarray(values)) if isinstance(values, np.ndarray) else values
    return pack_bits(tensor, width).cpu().numpy().tobytes()


def _unpack(buf: bytes, count: int, width: int) -> np.ndarray:
    """Inverse of :func:`_pack`: int64 [count] from ``buf`` (which holds ≥ count·width bits)."""
    packed = torch.frombuffer(bytearray(buf), dtype=torch.uint8) if buf else torch.zeros(0, dtype=torch.uint8)
    return unpack_bits(packed, count, width).numpy()


def _rice_param(gaps_M: np.ndarray, max_param: int) -> int:
    """Rice parameter in [0, max_param] minimising the coded size of ``gaps_M`` (exact, not the estimate)."""
    # Cost is n·(r+1) + Σ(g >> r); ≤ 17 candidates, each one vectorised pass, so search instead of guessing.
    costs = [gaps_M.size * (r + 1) + int((gaps_M >> r).sum()) for r in range(max_param + 1)]
    return int(np.argmin(costs))


def _rice_encode(gaps_M: np.ndarray, param: int) -> bytes:
    """Golomb-Rice code ``gaps_M`` int64 [M] ≥ 0: fixed-width remainders, then the unary quotients."""
    remainders = _pack(gaps_M & ((1 << param) - 1), param)
    quotients_M = gaps_M >> param
    ends_M = np.cumsum(quotients_M + 1) - 1  # position of each codeword's terminating zero
    unary_bits = np.ones(int(ends_M[-1]) + 1, dtype=np.uint8)
    unary_bits[ends_M] = 0
    return remainders + np.packbits(unary_bits, bitorder="little").tobytes()


def _rice_decode(buf: bytes, count: int, param: int, name: str) -> np.ndarray:
    """Inverse of :func:`_rice_encode`: int64 [count] gaps; rejects missing or extra unary bits."""
    remainder_len = packed_len(count, param)
    if len(buf) < remainder_len:
        raise WireFormatError(f"item {name!r}: rice section has {len(buf)} bytes, needs ≥ {remainder_len}")
    remainders_M = _unpack(buf[:remainder_len], count, param)
    unary_bits = np.unpackbits(np.frombuffer(buf[remainder_len:], dtype=np.uint8), bitorder="little")
    ends = np.flatnonzero(unary_bits == 0)
    if ends.size < count:
        raise WireFormatError(
            f"item {name!r}: rice stream holds {ends.size} codewords, expected {count}; payload is corrupt"
        )
    ends_M = ends[:count]
    used_bytes = (int(ends_M[-1]) + 1 + 7) // 8
    if used_bytes != len(buf) - remainder_len or unary_bits[ends_M[-1] + 1 :].any():
        raise WireFormatError(
            f"item {name!r}: rice stream has {len(buf) - remainder_len} unary bytes, codewords use "
            f"{used_bytes}; payload is corrupt"
        )
    quotients_M = np.diff(ends_M, prepend=-1) - 1
    return (quotients_M << param) | remainders_M


def _check_compressed(item: CompressedTensor, error: type[ValueError]) -> None:
    """Raise ``error`` naming the field, rule and fix if ``item`` is not a valid compressed tensor.

    Checks run where the tensors live (a handful of scalar reads), so a GPU payload is not copied to validate.
    """
    name = item.name
    encode_name(name, error)
    if len(item.shape) > 255 or any(not isinstance(d, int) or d < 0 for d in item.shape):
        raise error(f"item {name!r}: shape={item.shape} must be ≤ 255 non-negative ints; pass tensor.shape")
    if not isinstance(item.bits, int) or not (1 <= item.bits <= 8 or item.bits in RAW_VALUE_DTYPES):
        raise error(
            f"item {name!r}: bits={item.bits!r} must be an int in [1, 8] (codes) or 16/32 (raw bf16/fp32 "
            "values); use e.g. bits=2"
        )
    if not isinstance(item.chunk, int) or not 1 <= item.chunk <= MAX_CHUNK:
        raise error(f"item {name!r}: chunk={item.chunk!r} must be an int in [1, {MAX_CHUNK}]; use e.g. 4096")
    indices_NK, codes_NK = item.indices_NK, item.codes_NK
    if indices_NK.dtype not in _INDEX_DTYPES or indices_NK.dim() != 2:
        raise error(
            f"item {name!r}: indices_NK is {indices_NK.dtype} {tuple(indices_NK.shape)}, must be a 2-D "
            "int16/int32/int64 tensor [num_chunks, k]; reshape/cast it"
        )
    num_chunks, k = indices_NK.shape
    raw = item.bits in RAW_VALUE_DTYPES
    code_dtype = RAW_VALUE_DTYPES[item.bits][0] if raw else torch.uint8
    if codes_NK.dtype != code_dtype or tuple(codes_NK.shape) != (num_chunks, k):
        raise error(
            f"item {name!r}: codes_NK is {codes_NK.dtype} {tuple(codes_NK.shape)}, must be {code_dtype} "
            f"{(num_chunks, k)} like indices_NK for bits={item.bits}; cast/reshape it"
        )
    if num_chunks < 1 or not 1 <= k <= item.chunk:
        raise error(
            f"item {name!r}: num_chunks={num_chunks}, k={k} must satisfy num_chunks ≥ 1 and 1 ≤ k ≤ chunk="
            f"{item.chunk}; send empty tensors dense"
        )
    levels = 0 if raw else 1 << item.bits
    if item.codebook.dtype != torch.float32 or tuple(item.codebook.shape) != (levels,):
        raise error(
            f"item {name!r}: codebook is {item.codebook.dtype} {tuple(item.codebook.shape)}, must be float32 "
            f"[{levels}] for bits={item.bits}; pass one fp32 level per code (none for raw values)"
        )
    numel = int(np.prod(item.shape, dtype=object))
    if numel > num_chunks * item.chunk:
        raise error(
            f"item {name!r}: shape={item.shape} has {numel} elements > num_chunks·chunk = {num_chunks}·"
            f"{item.chunk}; send ceil(numel / chunk) rows"
        )
    low, high = (int(v) for v in torch.aminmax(indices_NK.detach()))
    if low < 0 or high >= item.chunk:
        raise error(
            f"item {name!r}: indices span [{low}, {high}], must lie in [0, chunk={item.chunk}); "
            "use in-chunk positions"
        )
    if k > 1 and not bool((indices_NK[:, 1:] > indices_NK[:, :-1]).all()):
        raise error(
            f"item {name!r}: indices must be strictly increasing per row; sort each row, drop duplicates"
        )
    if not raw:
        max_code = int(codes_NK.max())
        if max_code >= levels:
            raise error(f"item {name!r}: code {max_code} ≥ 2**bits = {levels}; raise bits or clamp codes")


def _check_dense(item: DenseTensor, error: type[ValueError]) -> None:
    """Raise ``error`` if ``item`` is not a valid dense tensor."""
    encode_name(item.name, error)
    if not isinstance(item.values, torch.Tensor) or item.values.dtype not in _DENSE_DTYPE_IDS:
        found = item.values.dtype if isinstance(item.values, torch.Tensor) else type(item.values).__name__
        raise error(
            f"item {item.name!r}: dense values are {found}, must be a float32/bfloat16/float16/float64 "
            "tensor; cast it"
        )
    if item.values.dim() > 255:
        raise error(f"item {item.name!r}: {item.values.dim()} dims exceed 255; reshape it")


def _shape_bytes(shape: tuple[int, ...]) -> bytes:
    """ndim u8 then each dim u64."""
    return _U8.pack(len(shape)) + b"".join(_U64.pack(d) for d in shape)


def _encode_compressed(item: CompressedTensor, coding: str) -> tuple[bytes, bytes]:
    """(record, body) for a validated compressed item; packed12 indices and codes are packed on its device."""
    num_chunks, k = item.indices_NK.shape
    width = index_bits(item.chunk)
    rice_param = 0
    if coding == "rice":
        indices_NK = item.indices_NK.detach().cpu().to(torch.int64).numpy()
        gaps_M = (np.diff(indices_NK, axis=1, prepend=-1) - 1).reshape(-1)
        rice_param = _rice_param(gaps_M, width)
        index_section = _rice_encode(gaps_M, rice_param)
    else:
        index_section = _pack(item.indices_NK.detach().reshape(-1), width)
    if item.bits in RAW_VALUE_DTYPES:
        _, int_dtype, np_dtype = RAW_VALUE_DTYPES[item.bits]
        ints = item.codes_NK.detach().contiguous().view(int_dtype).cpu().numpy()
        code_section = ints.astype(np_dtype).tobytes()
    else:
        code_section = _pack(item.codes_NK.detach().reshape(-1), item.bits)
    codebook_section = item.codebook.detach().cpu().numpy().astype("<f4").tobytes()
    body = index_section + code_section + codebook_section
    record = _RECORD.pack(
        _KIND_COMPRESSED, item.bits, item.chunk, k, num_chunks, rice_param, len(index_section),
        len(code_section), len(codebook_section), 0, zlib.crc32(body),
    )  # fmt: skip
    name = item.name.encode("utf-8")
    return record + _U16.pack(len(name)) + name + _shape_bytes(tuple(item.shape)), body


def _encode_dense(item: DenseTensor) -> tuple[bytes, bytes]:
    """(record, body) for a validated dense item."""
    dtype_id = _DENSE_DTYPE_IDS[item.values.dtype]
    _, int_dtype, np_dtype = _DENSE_DTYPES[dtype_id]
    values = item.values.detach().cpu().contiguous()
    body = values.view(int_dtype).numpy().astype(np_dtype).tobytes()
    record = _RECORD.pack(_KIND_DENSE, dtype_id, 0, 0, 0, 0, 0, 0, 0, len(body), zlib.crc32(body))
    name = item.name.encode("utf-8")
    return record + _U16.pack(len(name)) + name + _shape_bytes(tuple(values.shape)), body


def encode(items: list[CompressedTensor | DenseTensor], *, index_coding: str = "packed12") -> bytes:
    """Serialise ``items`` into one payload; raises ValueError (naming item and rule) on invalid input.

    Compressed items need ``indices_NK`` int16/32/64 [N, k] strictly increasing per row in [0, chunk),
    ``codes_NK`` uint8 [N, k] < 2**bits, ``codebook`` float32 [2**bits]. ``index_coding`` is ``"packed12"``
    (``index_bits(chunk)`` bits per index) or ``"rice"`` (gap Golomb-Rice, ~7.5 bits/index at k=64, C=4096).
    """
    if index_coding not in INDEX_CODINGS:
        raise ValueError(f"index_coding={index_coding!r} is unknown; use one of {INDEX_CODINGS}")
    records, bodies = [], []
    for item in items:
        if isinstance(item, CompressedTensor):
            _check_compressed(item, ValueError)
            record, body = _encode_compressed(item, index_coding)
        elif isinstance(item, DenseTensor):
            _check_dense(item, ValueError)
            record, body = _encode_dense(item)
        else:
            raise ValueError(f"item of type {type(item).__name__} is not CompressedTensor or DenseTensor")
        records.append(record)
        bodies.append(body)
    header_len = _PREAMBLE.size + sum(len(r) for r in records) + _U32.size
    total_len = header_len + sum(len(b) for b in bodies)
    preamble = _PREAMBLE.pack(
        MAGIC, VERSION, INDEX_CODINGS.index(index_coding), 0, len(items), total_len, header_len
    )
    header = preamble + b"".join(records)
    return header + _U32.pack(zlib.crc32(header)) + b"".join(bodies)


class _Reader:
    """Sequential little-endian reader over the header that raises WireFormatError on overrun."""

    def __init__(self, data: bytes, offset: int) -> None:
        self.data = data
        self.offset = offset

    def take(self, fmt: struct.Struct) -> tuple:
        """Unpack ``fmt`` at the cursor and advance."""
        return fmt.unpack(self.raw(fmt.size))

    def raw(self, size: int) -> bytes:
        """Next ``size`` bytes; the header length said they exist, so running out means corruption."""
        if self.offset + size > len(self.data):
            raise WireFormatError("header records overrun the header length; payload is corrupt")
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk


def _parse_header(payload: bytes) -> tuple[int, list[_Record], int]:
    """(index coding id, records, header length) after checking magic, version, lengths and header CRC."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise WireFormatError(f"payload is {type(payload).__name__}, must be bytes; pass encode()'s output")
    payload = bytes(payload)
    if len(payload) < _PREAMBLE.size:
        raise WireFormatError(
            f"payload of {len(payload)} bytes is truncated (preamble needs {_PREAMBLE.size})"
        )
    magic, version, coding, reserved, count, total_len, header_len = _PREAMBLE.unpack_from(payload)
    if magic != MAGIC:
        raise WireFormatError(f"bad magic {magic!r}, expected {MAGIC!r}; this is not a sparsetron payload")
    if version != VERSION:
        raise WireFormatError(
            f"unsupported format version {version}; this reader handles {VERSION}, upgrade it"
        )
    if header_len > len(payload) or header_len < _PREAMBLE.size + _U32.size:
        raise WireFormatError(
            f"header length {header_len} does not fit the {len(payload)}-byte payload; it is truncated or corrupt"
        )
    (header_crc,) = _U32.unpack_from(payload, header_len - _U32.size)
    if zlib.crc32(payload[: header_len - _U32.size]) != header_crc:
        raise WireFormatError("header CRC32 mismatch; the payload was corrupted in transit, resend it")
    if total_len > len(payload):
        raise WireFormatError(f"payload is truncated: {len(payload)} bytes, header says {total_len}")
    if total_len < len(payload):
        raise WireFormatError(f"trailing garbage: {len(payload)} bytes, header says {total_len}; strip extra")
    if coding >= len(INDEX_CODINGS) or reserved != 0:
        raise WireFormatError(f"unknown index coding id {coding} (reserved={reserved}); upgrade the reader")
    reader = _Reader(payload[: header_len - _U32.size], _PREAMBLE.size)
    records = [_read_record(reader) for _ in range(count)]
    if reader.offset != header_len - _U32.size:
        raise WireFormatError("header has bytes beyond its records; payload is corrupt")
    if header_len + sum(r.body_bytes for r in records) != total_len:
        raise WireFormatError("item body lengths do not add up to the total length; payload is corrupt")
    return coding, records, header_len


def _read_record(reader: _Reader) -> _Record:
    """Parse one item record at the reader's cursor."""
    fields = reader.take(_RECORD)
    (name_len,) = reader.take(_U16)
    try:
        name = reader.raw(name_len).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireFormatError(f"item name is not valid utf-8 ({exc}); payload is corrupt") from exc
    (ndim,) = reader.take(_U8)
    shape = tuple(reader.take(_U64)[0] for _ in range(ndim))
    return _Record(*fields, name=name, shape=shape)


def _decode_compressed(record: _Record, body: bytes, coding: str) -> CompressedTensor:
    """Rebuild and validate a compressed item from its record and CRC-checked body."""
    name, bits, chunk = record.name, record.bits_or_dtype, record.chunk
    raw = bits in RAW_VALUE_DTYPES
    if not (1 <= bits <= 8 or raw) or not 1 <= chunk <= MAX_CHUNK or record.k < 1 or record.num_chunks < 1:
        raise WireFormatError(
            f"item {name!r}: bits={bits}, chunk={chunk}, k={record.k}, num_chunks={record.num_chunks} out of "
            "range; payload is corrupt"
        )
    count, width = record.num_chunks * record.k, index_bits(chunk)
    expected = (count * bits // 8, 0) if raw else (packed_len(count, bits), 4 << bits)
    if (record.code_bytes, record.codebook_bytes) != expected or record.dense_bytes != 0:
        raise WireFormatError(f"item {name!r}: section lengths disagree with k, num_chunks, bits; corrupt")
    index_section = body[: record.index_bytes]
    if coding == "rice":
        if record.rice_param > width:
            raise WireFormatError(f"item {name!r}: rice parameter {record.rice_param} > {width}; corrupt")
        gaps_M = _rice_decode(index_section, count, record.rice_param, name)
        indices_NK = np.cumsum(gaps_M.reshape(record.num_chunks, record.k) + 1, axis=1) - 1
    else:
        if record.index_bytes != packed_len(count, width):
            raise WireFormatError(
                f"item {name!r}: index section length disagrees with k, num_chunks; corrupt"
            )
        indices_NK = _unpack(index_section, count, width).reshape(record.num_chunks, record.k)
    code_section = body[record.index_bytes : record.index_bytes + record.code_bytes]
    if raw:
        torch_dtype, _, np_dtype = RAW_VALUE_DTYPES[bits]
        ints = np.frombuffer(code_section, dtype=np_dtype).astype(np_dtype[1:])
        codes_NK = torch.from_numpy(ints.copy()).view(torch_dtype)
    else:
        codes_NK = torch.from_numpy(_unpack(code_section, count, bits).astype(np.uint8))
    codebook = np.frombuffer(body[record.index_bytes + record.code_bytes :], dtype="<f4").astype(np.float32)
    item = CompressedTensor(
        name=name,
        shape=record.shape,
        chunk=chunk,
        indices_NK=torch.from_numpy(np.ascontiguousarray(indices_NK, dtype=np.int64)),
        codes_NK=codes_NK.reshape(record.num_chunks, record.k),
        codebook=torch.from_numpy(codebook.copy()),
        bits=bits,
    )
    _check_compressed(item, WireFormatError)
    return item


def _decode_dense(record: _Record, body: bytes) -> DenseTensor:
    """Rebuild a dense item from its record and CRC-checked body."""
    if record.bits_or_dtype not in _DENSE_DTYPES:
        raise WireFormatError(f"item {record.name!r}: unknown dense dtype id {record.bits_or_dtype}; corrupt")
    torch_dtype, _, np_dtype = _DENSE_DTYPES[record.bits_or_dtype]
    itemsize = np.dtype(np_dtype).itemsize
    numel = int(np.prod(record.shape, dtype=object))
    if numel * itemsize != len(body):
        raise WireFormatError(
            f"item {record.name!r}: shape {record.shape} needs {numel * itemsize} bytes, body has {len(body)}"
        )
    ints = np.frombuffer(body, dtype=np_dtype).astype(np_dtype[1:])  # native byte order for torch
    values = torch.from_numpy(ints.copy()).view(torch_dtype).reshape(record.shape)
    return DenseTensor(name=record.name, values=values)


def decode(payload: bytes) -> list[CompressedTensor | DenseTensor]:
    """Parse a payload from :func:`encode`; raises WireFormatError on any inconsistency, never partial results.

    Decoded indices are int64 [N, k], codes uint8 [N, k], codebooks float32 [2**bits]; dense values keep
    their dtype and shape.
    """
    coding_id, records, offset = _parse_header(payload)
    coding = INDEX_CODINGS[coding_id]
    payload = bytes(payload)
    items: list[CompressedTensor | DenseTensor] = []
    for record in records:
        body = payload[offset : offset + record.body_bytes]
        offset += record.body_bytes
        if zlib.crc32(body) != record.body_crc:
            raise WireFormatError(f"item {record.name!r}: body CRC32 mismatch; payload corrupted, resend it")
        if record.kind == _KIND_COMPRESSED:
            items.append(_decode_compressed(record, body, coding))
        elif record.kind == _KIND_DENSE:
            items.append(_decode_dense(record, body))
        else:
            raise WireFormatError(f"item {record.name!r}: unknown kind {record.kind}; upgrade the reader")
    return items


def payload_stats(payload: bytes) -> dict[str, float]:
    """Bytes per part (header, indices, codes, codebooks, dense, total), index count and bits per index.

    Reads only the (CRC-checked) header, so it is cheap; bodies are not verified.
    """
    _, records, header_len = _parse_header(payload)
    index_bytes = sum(r.index_bytes for r in records)
    num_indices = sum(r.num_chunks * r.k for r in records if r.kind == _KIND_COMPRESSED)
    return {
        "header": header_len,
        "indices": index_bytes,
        "codes": sum(r.code_bytes for r in records),
        "codebooks": sum(r.codebook_bytes for r in records),
        "dense": sum(r.dense_bytes for r in records),
        "total": len(payload),
        "num_indices": num_indices,
        "bits_per_index": 8 * index_bytes / num_indices if num_indices else 0.0,
    }
