"""Weight-delta codec: bit-exact round trips, index-coding choice, size at 1% change, malformed payloads."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsetron.sync import codec
from sparsetron.sync.codec import (
    DTYPES,
    INDEX_CODINGS,
    DeltaFormatError,
    TensorUpdate,
    bits_view,
    decode,
    encode,
    from_bits,
    payload_stats,
)

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _random_bits(rng: np.random.Generator, dtype: torch.dtype, count: int) -> torch.Tensor:
    """[count] uniformly random bit patterns in ``dtype``'s carrier int dtype (floats: NaNs, Infs included)."""
    carrier = bits_view(torch.zeros(1, dtype=dtype)).dtype
    np_dtype = torch.empty(0, dtype=carrier).numpy().dtype
    low, high = (0, 1) if dtype == torch.bool else (np.iinfo(np_dtype).min, np.iinfo(np_dtype).max)
    return torch.from_numpy(rng.integers(low, high, size=count, endpoint=True, dtype=np_dtype))


def _special_bits(dtype: torch.dtype) -> torch.Tensor:
    """Bit patterns of NaNs with several payloads and signs, ±Inf, ±0, subnormals and extremes of ``dtype``."""
    if dtype not in _FLOATS:
        info = torch.iinfo(dtype) if dtype != torch.bool else None
        values = [0, 1] if info is None else [info.min, info.max, 0, -1 if info.min < 0 else 1]
        return bits_view(torch.tensor(values, dtype=dtype))
    finfo = torch.finfo(dtype)
    plain = torch.tensor(
        [
            float("nan"),
            float("inf"),
            -float("inf"),
            -0.0,
            0.0,
            finfo.smallest_normal / 4,
            finfo.max,
            finfo.tiny,
        ],
        dtype=torch.float64,
    ).to(dtype)
    bits = bits_view(plain).clone()
    nan, sign = bits[:1], bits_view(torch.tensor([-0.0], dtype=dtype))
    payloads = torch.cat([nan + 1, nan + 3, nan ^ sign, (nan + 1) ^ sign, bits[5:6] ^ sign])
    return torch.cat([bits, payloads])


def _update(
    rng: np.random.Generator,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    density: float | None,
    with_base: bool,
) -> tuple[TensorUpdate, torch.Tensor]:
    """(update, receiver's current tensor): ``density`` None = dense; values mix near-base and random bits."""
    numel = int(np.prod(shape, dtype=np.int64))
    old_bits = _random_bits(rng, dtype, numel)
    if density is None:
        indices, count = None, numel
    else:
        count = int(rng.binomial(numel, density)) if numel else 0
        indices = torch.from_numpy(np.sort(rng.choice(numel, size=count, replace=False)).astype(np.int64))
    base = old_bits if indices is None else old_bits[indices]
    new = _random_bits(rng, dtype, count)
    near = torch.from_numpy(rng.random(count) < 0.7)
    new[near] = base[near] + torch.from_numpy(rng.integers(-3, 4, size=int(near.sum()))).to(base.dtype)
    special = _special_bits(dtype)
    new[: min(count, special.numel())] = special[:count]
    if dtype == torch.bool:
        new &= 1  # only 0 and 1 are valid bools
    current = from_bits(old_bits, dtype, shape)
    update = TensorUpdate("w", dtype, shape, indices, new, base.clone() if with_base else None, digest=7)
    return update, current


def _roundtrip(updates: list[TensorUpdate], current: dict[str, torch.Tensor], **kwargs) -> bytes:
    """Encode, decode, and assert every field comes back bit-exact; returns the payload."""
    base_version = 4 if any(u.base is not None for u in updates) else None
    payload = encode(updates, version=5, base_version=base_version, **kwargs)
    header, decoded = decode(memoryview(payload), current=current)
    assert (header.version, header.base_version, header.count) == (5, base_version, len(updates))
    for sent, got in zip(updates, decoded, strict=True):
        assert (got.name, got.dtype, got.shape, got.digest, got.base) == (
            sent.name, sent.dtype, sent.shape, sent.digest, None,
        )  # fmt: skip
        if sent.indices is None:
            assert got.indices is None
        else:
            assert torch.equal(got.indices, sent.indices)
        assert got.values.dtype == sent.values.dtype and torch.equal(got.values, sent.values)
    return payload


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(0, 12), max_size=3).map(tuple),
    density=st.sampled_from([None, 1e-5, 1e-3, 0.01, 0.1, 0.5, 1.0]),
    with_base=st.booleans(),
    bucket_elements=st.sampled_from([1, 7, 64, 1 << 22]),
    seed=st.integers(0, 2**32 - 1),
)
def test_roundtrip_property(dtype, shape, density, with_base, bucket_elements, seed):
    update, current = _update(np.random.default_rng(seed), dtype, shape, density, with_base)
    _roundtrip([update], {"w": current}, bucket_elements=bucket_elements)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [1e-5, 1e-3, 1.0, None])
def test_roundtrip_every_dtype_and_density(dtype, density):
    rng = np.random.default_rng(0)
    update, current = _update(rng, dtype, (300, 401), density, with_base=True)
    _roundtrip([update], {"w": current}, bucket_elements=4096)
    # Applying the decoded bits reproduces the specials (NaN payloads, -0.0, subnormals) exactly.
    _, (decoded,) = decode(encode([update], version=1, base_version=0), current={"w": current})
    applied = bits_view(current).clone()
    applied[slice(None) if decoded.indices is None else decoded.indices] = decoded.values
    expected = bits_view(current).clone()
    expected[slice(None) if update.indices is None else update.indices] = update.values
    assert torch.equal(bits_view(from_bits(applied, dtype, current.shape)), expected)


@pytest.mark.parametrize(
    ("shape", "density"),
    [((), None), ((), 1.0), ((), 0.0), ((0, 5), None), ((0,), 1.0), ((3, 1, 7, 2), 0.3), ((1000,), 0.0)],
)
def test_roundtrip_odd_shapes_and_empty_changes(shape, density):
    update, current = _update(np.random.default_rng(1), torch.bfloat16, shape, density, with_base=True)
    _roundtrip([update], {"w": current}, bucket_elements=7)


def test_bucket_boundaries_and_many_tensors_with_threads():
    rng = np.random.default_rng(2)
    updates, current = [], {}
    for position, (dtype, density) in enumerate(
        [(torch.float32, 0.2), (torch.int8, None), (torch.bool, 0.5)]
    ):
        update, tensor = _update(rng, dtype, (10, 11), density, with_base=position != 1)
        update.name = f"t{position}"
        updates.append(update)
        current[update.name] = tensor
    payload = _roundtrip(updates, current, bucket_elements=7, threads=2)
    stats = payload_stats(payload)
    expected_buckets = sum(-(-u.values.numel() // 7) for u in updates)
    assert sum(stats["value_codings"].values()) == expected_buckets
    assert stats["index_codings"]["none"] == -(-110 // 7)
    assert stats["changed_elements"] == sum(u.values.numel() for u in updates)
    assert encode(updates, version=5, base_version=4, bucket_elements=7, threads=2) == payload


def test_bits_view_is_a_view_and_from_bits_inverts_it():
    t = torch.tensor([[1.5, -0.0], [float("nan"), float("inf")]], dtype=torch.bfloat16)
    bits = bits_view(t)
    assert bits.dtype == torch.int16 and bits.shape == (4,) and bits.data_ptr() == t.data_ptr()
    assert torch.equal(bits_view(from_bits(bits, torch.bfloat16, (2, 2))), bits)
    assert bits_view(torch.tensor(True)).dtype == torch.uint8
    with pytest.raises(ValueError, match="needs torch.int16"):
        from_bits(bits.to(torch.int32), torch.bfloat16, (2, 2))


def _index_codings(indices: np.ndarray, numel: int) -> dict[str, int]:
    """Bucket counts per index coding when sending ``indices`` of a ``numel`` bf16 tensor in one bucket."""
    count = indices.size
    values = torch.zeros(count, dtype=torch.int16)
    update = TensorUpdate("w", torch.bfloat16, (numel,), torch.from_numpy(indices.astype(np.int64)), values)
    payload = encode([update], version=1, base_version=None)
    _, (decoded,) = decode(payload)
    assert torch.equal(decoded.indices, update.indices)
    return payload_stats(payload)["index_codings"]


def test_uniform_sparse_indices_choose_elias_fano():
    rng = np.random.default_rng(3)
    indices = np.sort(rng.choice(1 << 20, size=1 << 13, replace=False))
    assert _index_codings(indices, 1 << 20)["elias_fano"] == 1


def test_clustered_sparse_indices_choose_gaps():
    # A few changed rows of a huge matrix: small gaps inside runs, but a span that makes Elias–Fano's low
    # parts wide and a bitmap enormous.
    rng = np.random.default_rng(4)
    starts = np.array([0, 10**9, 2 * 10**9, 3 * 10**9])
    indices = np.concatenate([s + np.sort(rng.choice(4096, size=1000, replace=False)) for s in starts])
    assert _index_codings(indices, 4 * 10**9)["gaps"] == 1


def test_dense_changes_choose_bitmap():
    rng = np.random.default_rng(5)
    indices = np.flatnonzero(rng.random(1 << 16) < 0.5)
    assert _index_codings(indices, 1 << 16)["bitmap"] == 1


def test_size_at_one_percent_few_ulp_changes():
    rng = np.random.default_rng(6)
    numel = 4 << 20
    old = bits_view(torch.randn(numel, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16))
    indices = torch.from_numpy(np.sort(rng.choice(numel, size=numel // 100, replace=False)))
    steps = rng.integers(1, 4, size=indices.numel()) * rng.choice([-1, 1], size=indices.numel())
    new = old[indices] + torch.from_numpy(steps).to(torch.int16)
    diff_update = TensorUpdate("w", torch.bfloat16, (numel,), indices, new, old[indices].clone())
    raw_update = TensorUpdate("w", torch.bfloat16, (numel,), indices, new)
    diff = payload_stats(_roundtrip([diff_update], {"w": from_bits(old, torch.bfloat16, (numel,))}))
    raw = payload_stats(_roundtrip([raw_update], {}))
    message = (
        f"diff: {diff['bits_per_changed_element']:.2f} bits/changed element "
        f"(indices {8 * diff['index_bytes'] / indices.numel():.2f}), raw: {raw['bits_per_changed_element']:.2f}"
    )
    print(message)
    assert diff["value_codings"] == {"raw": 0, "diff": 1}, message
    assert diff["bits_per_changed_element"] <= 16, message
    assert raw["bits_per_changed_element"] > diff["bits_per_changed_element"], message


@pytest.fixture(scope="module")
def payload() -> bytes:
    """Two tensors, the second in 3 buckets, both diff- and raw-coded buckets, about 1 KB."""
    rng = np.random.default_rng(7)
    first, _ = _update(rng, torch.float32, (64,), 0.5, with_base=False)
    second, second_current = _update(rng, torch.bfloat16, (50,), None, with_base=True)
    first.name, second.name = "first", "second"
    encoded = encode([first, second], version=9, base_version=8, bucket_elements=20)
    decode(encoded, current={"second": second_current})
    return encoded


def test_truncation_at_every_offset_is_rejected(payload):
    for end in range(len(payload)):
        with pytest.raises(DeltaFormatError, match="truncated|header length"):
            decode(payload[:end])


def test_any_flipped_header_byte_is_rejected(payload):
    header_len = payload_stats(payload)["header_bytes"]
    for offset in range(header_len):
        for mask in (0x01, 0x80):
            corrupt = bytearray(payload)
            corrupt[offset] ^= mask
            with pytest.raises(DeltaFormatError, match="magic|format version|header length|CRC32"):
                decode(bytes(corrupt))


def test_flipped_body_byte_names_tensor_and_bucket(payload):
    header_len = payload_stats(payload)["header_bytes"]
    for offset, where in [
        (header_len, "tensor 'first' bucket 0"),
        (len(payload) - 1, "tensor 'second' bucket 2"),
    ]:
        corrupt = bytearray(payload)
        corrupt[offset] ^= 0x10
        with pytest.raises(DeltaFormatError, match=f"{where}: CRC32 mismatch"):
            decode(bytes(corrupt))


def test_foreign_newer_and_padded_payloads_are_rejected(payload):
    with pytest.raises(DeltaFormatError, match="bad magic b'STSL'"):
        decode(b"STSL" + payload[4:])
    newer = bytearray(payload)
    struct.pack_into("<H", newer, 4, codec.FORMAT_VERSION + 1)
    with pytest.raises(DeltaFormatError, match="format version 2 is newer .* upgrade sparsetron"):
        decode(bytes(newer))
    with pytest.raises(DeltaFormatError, match="trailing bytes"):
        decode(bytes(payload) + b"\0")
    with pytest.raises(DeltaFormatError, match="must be bytes"):
        decode("STSD")


def _varints(values: list[int]) -> bytes:
    """LEB128 encoding of non-negative ints (test-side reference)."""
    out = bytearray()
    for value in values:
        while value >= 0x80:
            out.append(value & 0x7F | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out)


_LONG_BITMAP = [0] * 29 + [0x80]  # one set bit, 239 positions past the first


@pytest.mark.parametrize(
    ("coding", "stream", "match"),
    [
        ("gaps", _varints([5, (3 - 5 - 1) % (1 << 64)]), "beyond 2\\*\\*62"),  # indices 5, 3 (a wrapped gap)
        ("gaps", _varints([5, 200]), "not strictly increasing within \\[0, 100\\)"),  # 206 ≥ numel
        ("gaps", _varints([5]), "found 1 of 2 positions"),
        ("gaps", _varints([5, 1, 1]), "found 3 of 2 positions"),
        ("gaps", bytes([5, 0x81]), "found 1 of 2 positions"),  # the last varint never ends
        # Elias–Fano of offsets 0, 2 from 3 with one low bit: lows 0b00, high parts 0, 1 → unary bits 0, 2.
        ("elias_fano", bytes([3, 1, 0b00, 0b101, 0]), "trailing bytes"),
        ("elias_fano", bytes([3, 1, 0b00, 0b001]), "found 1 of 2 positions"),
        ("elias_fano", bytes([3, 1, 0b01, 0b011]), "not strictly increasing"),  # offsets 1, 0
        ("elias_fano", bytes([3, 40, 0, 0b101]), "beyond 2\\*\\*62"),  # low width > 32
        ("bitmap", bytes([3, 0b101, 0]), "trailing bytes"),
        ("bitmap", bytes([3, 0b001]), "found 1 of 2 positions"),
        ("bitmap", bytes([3, 1, *_LONG_BITMAP]), "not strictly increasing within \\[0, 100\\)"),
        ("bitmap", bytes([0xFF, 0xFF, 0xFF, 0xFF, 0xFF]), "unterminated or over-long varint"),
    ],
)
def test_bad_index_streams_with_valid_crcs_are_rejected(monkeypatch, coding, stream, match):
    # The encoder writes whatever the index coder returns and CRCs it, so this crafts a well-formed payload
    # that carries bad indices.
    coded = torch.tensor(list(stream), dtype=torch.uint8)
    monkeypatch.setattr(codec, "_encode_indices", lambda *args: (INDEX_CODINGS.index(coding), coded))
    update = TensorUpdate("w", torch.float32, (100,), torch.tensor([3, 5]), torch.zeros(2, dtype=torch.int32))
    payload = encode([update], version=1, base_version=None, level=1)
    with pytest.raises(DeltaFormatError, match=f"tensor 'w' bucket 0: .*{match}"):
        decode(payload)


def test_diff_payload_needs_the_receivers_tensors():
    update, current = _update(np.random.default_rng(8), torch.bfloat16, (1000,), 0.1, with_base=True)
    payload = encode([update], version=2, base_version=1)
    assert payload_stats(payload)["value_codings"]["diff"] == 1
    with pytest.raises(DeltaFormatError, match="pass decode\\(payload, current="):
        decode(payload)
    with pytest.raises(DeltaFormatError, match="current tensor is torch.float32"):
        decode(payload, current={"w": current.float()})


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"indices": torch.tensor([4, 2])}, "strictly increasing"),
        ({"indices": torch.tensor([1, 100])}, "strictly increasing"),
        ({"values": torch.zeros(2, dtype=torch.float32)}, "must be torch.int32 \\[2\\]"),
        ({"base": torch.zeros(3, dtype=torch.int32)}, "base is torch.int32 \\(3,\\)"),
        ({"dtype": torch.complex64}, "not supported"),
        ({"digest": -1}, "unsigned 64-bit"),
    ],
)
def test_invalid_updates_are_rejected(change, match):
    zeros = torch.zeros(2, dtype=torch.int32)
    fields = {"name": "w", "dtype": torch.float32, "shape": (10, 10), "indices": torch.tensor([1, 2])}
    fields |= {"values": zeros, "base": zeros} | change
    with pytest.raises(ValueError, match=match):
        encode([TensorUpdate(**fields)], version=1, base_version=0)


def test_anchor_must_be_self_contained():
    update, _ = _update(np.random.default_rng(9), torch.float32, (10,), None, with_base=True)
    with pytest.raises(ValueError, match="anchor"):
        encode([update], version=3, base_version=None, anchor=True)
    update.base = None
    header, _ = decode(encode([update], version=3, base_version=None, anchor=True))
    assert (header.anchor, header.base_version) == (True, None)


@pytest.mark.gpu
def test_cuda_inputs_roundtrip():
    update, current = _update(np.random.default_rng(10), torch.bfloat16, (1000,), 0.1, with_base=True)
    on_gpu = TensorUpdate(
        "w", update.dtype, update.shape, update.indices.cuda(), update.values.cuda(), update.base.cuda()
    )
    _, (decoded,) = decode(encode([on_gpu], version=2, base_version=1), current={"w": current.cuda()})
    assert torch.equal(decoded.indices, update.indices) and torch.equal(decoded.values, update.values)


# ------------------------------------------------------------------------ reference encoder (byte identity)
# Every stream written out from the format's definition (module docstring), one element at a time where that
# is clearest, to check that the vectorised torch encoder produces exactly these bytes.


def _ref_bits(bits: np.ndarray) -> bytes:
    """0/1 array → bytes, bit j = bit j % 8 of byte j // 8 (trailing bits of the last byte zero)."""
    return np.packbits(bits.astype(np.uint8), bitorder="little").tobytes()


def _ref_index_stream(indices: list[int], prev_last: int) -> tuple[int, bytes]:
    """(coding id, stream) of one bucket: all three codings built, the shortest wins (ties: earlier one)."""
    gaps = [b - a - 1 for a, b in zip([prev_last, *indices], indices, strict=False)]
    prefix = _varints(gaps[:1])
    offsets = np.array(indices, dtype=np.int64) - indices[0]
    count, span = len(indices), indices[-1] - indices[0]
    best_low, best_size = 0, None
    for low in range(min(32, span.bit_length()) + 1):  # low-part bytes + unary bytes, smallest low on ties
        size = -(-count * low // 8) + -(-(count + (span >> low)) // 8)
        if best_size is None or size < best_size:
            best_low, best_size = low, size
    sizes = [len(_varints(gaps)), len(prefix) + 1 + best_size, len(prefix) + (span + 8) // 8]
    coding = sizes.index(min(sizes))  # first shortest: ties go to gaps, then Elias–Fano; only it is built
    if coding == 0:
        return INDEX_CODINGS.index("gaps"), _varints(gaps)
    if coding == 1:
        low_bits = (offsets[:, None] >> np.arange(best_low)) & 1  # value i's bit b at stream bit i·L + b
        unary = np.zeros(count + (span >> best_low), dtype=np.uint8)
        unary[(offsets >> best_low) + np.arange(count)] = 1
        ef = bytes([best_low]) + _ref_bits(low_bits.reshape(-1)) + _ref_bits(unary)
        return INDEX_CODINGS.index("elias_fano"), prefix + ef
    bitmap = np.zeros(span + 1, dtype=np.uint8)
    bitmap[offsets] = 1
    return INDEX_CODINGS.index("bitmap"), prefix + _ref_bits(bitmap)


def _ref_planes(patterns: list[int], width: int) -> bytes:
    """Byte planes of unsigned ``width``-byte ints: every element's byte 0, then byte 1 …"""
    return bytes((p >> (8 * plane)) & 0xFF for plane in range(width) for p in patterns)


def _ref_compress(raw: bytes, level: int) -> tuple[int, bytes]:
    packed = zstandard.ZstdCompressor(level=level).compress(raw) if raw else raw
    return (1, packed) if raw and len(packed) < len(raw) else (0, raw)


def _ref_encode(
    updates: list[TensorUpdate], version: int, base_version: int | None, level: int, bucket: int
) -> bytes:
    """The payload, from the layout in the codec's module docstring."""
    records, bodies = [], []
    for update in updates:
        width = update.values.element_size()
        bits = 8 * width
        new = [v % (1 << bits) for v in update.values.tolist()]  # unsigned patterns
        base = None if update.base is None else [v % (1 << bits) for v in update.base.tolist()]
        indices = None if update.indices is None else update.indices.tolist()
        rows = []
        for first in range(0, len(new), bucket):
            end = min(first + bucket, len(new))
            index_coding, index_raw = 0, b""
            if indices is not None:
                prev_last = -1 if first == 0 else indices[first - 1]
                index_coding, index_raw = _ref_index_stream(indices[first:end], prev_last)
            index_compressor, index_stored = 0, index_raw  # Elias–Fano and bitmap streams are stored
            if index_coding == INDEX_CODINGS.index("gaps"):
                index_compressor, index_stored = _ref_compress(index_raw, level)
            value_raw = _ref_planes(new[first:end], width)
            diff = None
            if base is not None:
                diffs = [(n - b) % (1 << bits) for n, b in zip(new[first:end], base[first:end], strict=True)]
                signed = [d - (1 << bits) if d >= 1 << (bits - 1) else d for d in diffs]
                zigzag = [2 * d if d >= 0 else -2 * d - 1 for d in signed]
                diff = _ref_compress(_ref_planes(zigzag, width), level)
            if diff is not None and 2 * len(diff[1]) <= len(value_raw):
                value_coding, (value_compressor, value_stored) = 1, diff
            else:
                value_coding, (value_compressor, value_stored) = 0, _ref_compress(value_raw, level)
                if diff is not None and len(diff[1]) < len(value_stored):
                    value_coding, (value_compressor, value_stored) = 1, diff
            crc = zlib.crc32(index_stored + value_stored)
            fields = (first, end - first, index_coding, value_coding, index_compressor, value_compressor)
            lengths = (len(index_raw), len(value_raw), len(index_stored), len(value_stored))
            rows.append(struct.pack("<QQBBBBQQQQI", *fields, *lengths, crc))
            bodies += [index_stored, value_stored]
        name = update.name.encode()
        records.append(
            struct.pack("<H", len(name)) + name
            + struct.pack("<BB", DTYPES.index(update.dtype), len(update.shape))
            + b"".join(struct.pack("<Q", d) for d in update.shape)
            + struct.pack("<BQQI", indices is None, len(new), update.digest, len(rows)) + b"".join(rows)
        )  # fmt: skip
    header_len = struct.calcsize("<4sHBQQIQI") + sum(map(len, records)) + 4
    total = header_len + sum(map(len, bodies))
    wire_base = (1 << 64) - 1 if base_version is None else base_version
    header = struct.pack("<4sHBQQIQI", b"STSD", 1, 0, version, wire_base, len(updates), total, header_len)
    header += b"".join(records)
    return header + struct.pack("<I", zlib.crc32(header)) + b"".join(bodies)


def _assert_matches_reference(
    updates: list[TensorUpdate], bucket_elements: int, level: int = 3, threads: int = 0
):
    base_version = 4 if any(u.base is not None for u in updates) else None
    payload = encode(
        updates,
        version=5,
        base_version=base_version,
        level=level,
        bucket_elements=bucket_elements,
        threads=threads,
    )
    assert payload == _ref_encode(updates, 5, base_version, level, bucket_elements)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [1e-4, 1e-3, 0.01, 0.1, 0.5, 0.9, 1.0, None])
@pytest.mark.parametrize("bucket_elements", [1, 37, 4096])
def test_payload_bytes_match_reference(dtype, density, bucket_elements):
    rng = np.random.default_rng(11)
    update, _ = _update(rng, dtype, (1 << 14,), density, with_base=DTYPES.index(dtype) % 2 == 0)
    if bucket_elements == 1 and update.values.numel() > 2000:
        bucket_elements = 997  # keeps the per-element reference quick; 1 is covered at low densities
    _assert_matches_reference([update], bucket_elements)


def test_payload_bytes_match_reference_for_all_index_codings_and_threads():
    # Clustered far-apart runs (gaps win), uniform sparse (Elias–Fano), half dense (bitmap), varints of up
    # to 9 bytes, a dense tensor and an empty one, in one payload compressed by a pool.
    rng = np.random.default_rng(12)
    runs = [
        s + np.sort(rng.choice(3000, size=700, replace=False)) for s in (0, 10**6, 10**12, (1 << 62) - 4000)
    ]
    layouts = [
        (np.concatenate(runs), 1 << 62),
        (np.sort(rng.choice(1 << 20, size=3000, replace=False)), 1 << 20),
        (np.flatnonzero(rng.random(20000) < 0.5), 20000),
        (np.array([0, 127, 128 + 127, (1 << 40), (1 << 62) + 5]), (1 << 62) + 6),
    ]
    updates = []
    for position, (indices, numel) in enumerate(layouts):
        values = _random_bits(rng, torch.float32, indices.size)
        base = values + torch.from_numpy(rng.integers(-2, 3, size=indices.size).astype(np.int32))
        updates.append(
            TensorUpdate(
                f"t{position}",
                torch.float32,
                (numel,),
                torch.from_numpy(indices.astype(np.int64)),
                values,
                base,
            )
        )
    dense, _ = _update(rng, torch.bfloat16, (3, 50), None, with_base=True)
    empty, _ = _update(rng, torch.int8, (40,), 0.0, with_base=False)
    updates += [dense, empty]
    assert {INDEX_CODINGS[coding] for u in updates[:4] for coding in _ref_codings(u, 997)} == {
        "gaps",
        "elias_fano",
        "bitmap",
    }
    for threads in (0, 3):
        _assert_matches_reference(updates, bucket_elements=997, level=1, threads=threads)


def _ref_codings(update: TensorUpdate, bucket: int) -> list[int]:
    indices = update.indices.tolist()
    return [
        _ref_index_stream(indices[first : first + bucket], indices[first - 1] if first else -1)[0]
        for first in range(0, len(indices), bucket)
    ]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from(DTYPES),
    numel=st.integers(0, 3000),
    density=st.sampled_from([None, 1e-3, 0.05, 0.5, 1.0]),
    with_base=st.booleans(),
    bucket_elements=st.sampled_from([1, 5, 300, 1 << 22]),
    seed=st.integers(0, 2**32 - 1),
)
def test_payload_bytes_match_reference_property(dtype, numel, density, with_base, bucket_elements, seed):
    update, _ = _update(np.random.default_rng(seed), dtype, (numel,), density, with_base)
    _assert_matches_reference([update], bucket_elements)


def test_decode_can_return_the_bits_it_read_to_undo_diff_coding():
    """With ``return_base`` a diff-coded tensor comes back with the receiver's bits at its positions, so a
    subscriber verifying the change does not gather them a second time; raw-coded tensors carry none."""
    rng = np.random.default_rng(11)
    old_bits = bits_view(torch.randn(4096, dtype=torch.bfloat16))
    indices = torch.from_numpy(np.sort(rng.choice(4096, size=80, replace=False)))
    base = old_bits[indices]
    diffed = TensorUpdate("w", torch.bfloat16, (4096,), indices, base + 1, base.clone())  # one ulp each
    current = from_bits(old_bits, torch.bfloat16, (4096,))
    raw, _ = _update(rng, torch.float32, (300,), 0.1, with_base=False)
    raw.name = "raw"
    payload = encode([diffed, raw], version=2, base_version=1)
    _, (got_diffed, got_raw) = decode(payload, current={"w": current}, return_base=True)
    assert payload_stats(payload)["value_codings"]["diff"] >= 1
    assert torch.equal(got_diffed.base, diffed.base) and got_raw.base is None
    _, (plain, _) = decode(payload, current={"w": current})
    assert plain.base is None
