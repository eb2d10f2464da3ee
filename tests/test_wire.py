"""Wire format: exact round trips for both index codings, size of the rice coding, rejection of bad input."""

from __future__ import annotations

import dataclasses
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsetron.parallel.data.wire import (
    RAW_VALUE_DTYPES,
    CompressedTensor,
    DenseTensor,
    WireFormatError,
    decode,
    encode,
    index_bits,
    payload_stats,
)

_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _sorted_indices(
    rng: np.random.Generator, num_chunks: int, k: int, chunk: int, pattern: str
) -> np.ndarray:
    """int64 [num_chunks, k] distinct sorted rows: random, the first k, or the last k positions."""
    if pattern == "first":
        return np.tile(np.arange(k), (num_chunks, 1))
    if pattern == "last":
        return np.tile(np.arange(chunk - k, chunk), (num_chunks, 1))
    return np.sort(np.argsort(rng.random((num_chunks, chunk)), axis=1)[:, :k], axis=1)


def _compressed(
    rng: np.random.Generator,
    name: str,
    chunk: int,
    k: int,
    num_chunks: int,
    bits: int,
    pattern: str = "random",
) -> CompressedTensor:
    """A valid random CompressedTensor whose shape fills between num_chunks-1 and num_chunks chunks."""
    numel = int(rng.integers((num_chunks - 1) * chunk + 1, num_chunks * chunk + 1))
    if bits in RAW_VALUE_DTYPES:  # the values themselves, no codebook
        codes_NK = torch.from_numpy(rng.standard_normal((num_chunks, k)).astype(np.float32))
        codes_NK, codebook = codes_NK.to(RAW_VALUE_DTYPES[bits][0]), torch.zeros(0)
    else:
        codes_NK = torch.from_numpy(rng.integers(0, 1 << bits, (num_chunks, k), dtype=np.uint8))
        codebook = torch.from_numpy(rng.standard_normal(1 << bits).astype(np.float32))
    return CompressedTensor(
        name=name,
        shape=(1, numel),
        chunk=chunk,
        indices_NK=torch.from_numpy(_sorted_indices(rng, num_chunks, k, chunk, pattern)).to(
            [torch.int16, torch.int32, torch.int64][int(rng.integers(3))]
        ),
        codes_NK=codes_NK,
        codebook=codebook,
        bits=bits,
    )


@st.composite
def _items(draw: st.DrawFn) -> list[CompressedTensor | DenseTensor]:
    """Several compressed and dense items with random geometry."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    items: list[CompressedTensor | DenseTensor] = []
    for i in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            chunk = draw(st.one_of(st.sampled_from([16, 64, 256, 1024, 4096]), st.integers(16, 4096)))
            k = draw(st.integers(1, min(chunk, 128)))
            num_chunks = draw(st.integers(1, 20))
            bits = draw(st.sampled_from([1, 2, 4, 8, 16, 32]))
            pattern = draw(st.sampled_from(["random", "first", "last"]))
            items.append(_compressed(rng, f"layers.{i}.w", chunk, k, num_chunks, bits, pattern))
        else:
            dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
            shape = tuple(draw(st.lists(st.integers(0, 7), max_size=3)))
            items.append(DenseTensor(name=f"norm.{i}.ü", values=torch.randn(shape).to(dtype)))
    return items


def _assert_same(decoded: CompressedTensor | DenseTensor, original: CompressedTensor | DenseTensor) -> None:
    """Bit-for-bit equality; decoded indices must be int64."""
    assert type(decoded) is type(original) and decoded.name == original.name
    if isinstance(original, DenseTensor):
        assert decoded.values.dtype == original.values.dtype and decoded.values.shape == original.values.shape
        view = _INT_VIEW[original.values.dtype]
        assert torch.equal(decoded.values.view(view), original.values.view(view))
        return
    assert (decoded.shape, decoded.chunk, decoded.bits) == (
        tuple(original.shape),
        original.chunk,
        original.bits,
    )
    assert decoded.indices_NK.dtype == torch.int64
    assert torch.equal(decoded.indices_NK, original.indices_NK.to(torch.int64))
    assert decoded.codes_NK.dtype == original.codes_NK.dtype
    assert torch.equal(decoded.codes_NK, original.codes_NK)
    assert torch.equal(decoded.codebook.view(torch.int32), original.codebook.view(torch.int32))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=_items(), coding=st.sampled_from(["packed12", "rice"]))
def test_round_trip_is_exact(items: list[CompressedTensor | DenseTensor], coding: str) -> None:
    decoded = decode(encode(items, index_coding=coding))
    assert len(decoded) == len(items)
    for got, want in zip(decoded, items, strict=True):
        _assert_same(got, want)


def test_index_bits() -> None:
    assert [index_bits(c) for c in (1, 2, 16, 17, 4096, 4097, 65536)] == [0, 1, 4, 5, 12, 13, 16]
    with pytest.raises(ValueError, match="chunk=65537"):
        index_bits(65537)


def _bits_per_index(coding: str) -> float:
    """Measured index bits per index for k=64 of C=4096, random sorted, 256 chunks."""
    item = _compressed(np.random.default_rng(0), "w", 4096, 64, 256, 2)
    return payload_stats(encode([item], index_coding=coding))["bits_per_index"]


def test_rice_beats_packed_at_k64_c4096() -> None:
    packed, rice = _bits_per_index("packed12"), _bits_per_index("rice")
    assert packed == 12.0
    assert rice < packed and rice <= 8.2, f"rice coding spent {rice:.3f} bits/index"


def test_payload_stats_parts_add_up() -> None:
    rng = np.random.default_rng(1)
    items = [_compressed(rng, "w", 4096, 64, 4, 2), DenseTensor("b", torch.ones(10))]
    payload = encode(items)
    stats = payload_stats(payload)
    parts = ("header", "indices", "codes", "codebooks", "dense")
    assert sum(stats[p] for p in parts) == stats["total"] == len(payload)
    assert (stats["codes"], stats["codebooks"], stats["dense"]) == (4 * 64 * 2 // 8, 16, 40)


@pytest.fixture(params=["packed12", "rice"])
def payload(request: pytest.FixtureRequest) -> bytes:
    """A valid payload with two compressed items and a dense one."""
    rng = np.random.default_rng(2)
    items = [
        _compressed(rng, "a", 4096, 64, 3, 2),
        DenseTensor("d", torch.randn(3, 5).to(torch.bfloat16)),
        _compressed(rng, "c", 1000, 10, 2, 4),
    ]
    return encode(items, index_coding=request.param)


def _header_len(payload: bytes) -> int:
    return struct.unpack_from("<I", payload, 20)[0]


def test_truncated_payload_is_rejected(payload: bytes) -> None:
    for size in (0, 3, 10, 23, _header_len(payload) - 1, _header_len(payload), len(payload) - 1):
        with pytest.raises(WireFormatError, match="truncated"):
            decode(payload[:size])


def test_any_flipped_header_byte_is_rejected(payload: bytes) -> None:
    for position in range(_header_len(payload)):
        corrupt = bytearray(payload)
        corrupt[position] ^= 0x5A
        with pytest.raises(WireFormatError):
            decode(bytes(corrupt))


def test_flipped_body_byte_fails_crc(payload: bytes) -> None:
    for position in range(_header_len(payload), len(payload), 7):
        corrupt = bytearray(payload)
        corrupt[position] ^= 0x01
        with pytest.raises(WireFormatError, match="body CRC32 mismatch"):
            decode(bytes(corrupt))


def test_wrong_magic_version_and_trailing_garbage(payload: bytes) -> None:
    with pytest.raises(WireFormatError, match="bad magic"):
        decode(b"PK\x03\x04" + payload[4:])  # a zip archive, say
    with pytest.raises(WireFormatError, match="unsupported format version 2"):
        decode(payload[:4] + struct.pack("<H", 2) + payload[6:])
    with pytest.raises(WireFormatError, match="trailing garbage"):
        decode(payload + b"\x00")
    with pytest.raises(WireFormatError, match="must be bytes"):
        decode("not bytes")  # type: ignore[arg-type]


def test_decode_checks_semantics_behind_valid_crcs() -> None:
    # C=3000 packs indices in 12 bits, so 4000 fits the bits but not the chunk: only the range check catches it.
    item = CompressedTensor("w", (3000,), 3000, torch.tensor([[1, 2]]), torch.zeros(1, 2, dtype=torch.uint8),
                            torch.zeros(2), bits=1)  # fmt: skip
    payload = bytearray(encode([item]))
    header_len = _header_len(payload)
    payload[header_len : header_len + 3] = bytes([0xA0, 0x0F, 0x00])  # indices 4000, 0 (12 bits each)
    body_crc_at = 24 + struct.calcsize("<BBIIQBQQQQ")  # preamble, then the record up to its body CRC
    struct.pack_into("<I", payload, body_crc_at, zlib.crc32(bytes(payload[header_len:])))
    struct.pack_into("<I", payload, header_len - 4, zlib.crc32(bytes(payload[: header_len - 4])))
    with pytest.raises(WireFormatError, match=r"indices span \[0, 4000\]"):
        decode(bytes(payload))


def _valid() -> CompressedTensor:
    return _compressed(np.random.default_rng(3), "w", 64, 4, 2, 2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"indices_NK": torch.tensor([[3, 1, 5, 7], [0, 1, 2, 3]])}, "strictly increasing"),
        ({"indices_NK": torch.tensor([[1, 1, 5, 7], [0, 1, 2, 3]])}, "strictly increasing"),
        ({"indices_NK": torch.tensor([[1, 2, 5, 64], [0, 1, 2, 3]])}, "must lie in"),
        ({"indices_NK": torch.tensor([[-1, 2, 5, 6], [0, 1, 2, 3]])}, "must lie in"),
        ({"indices_NK": torch.zeros(2, 4)}, "int16/int32/int64"),
        ({"codes_NK": torch.full((2, 4), 4, dtype=torch.uint8)}, r"code 4 ≥ 2\*\*bits"),
        ({"codes_NK": torch.zeros(2, 4, dtype=torch.int64)}, "must be torch.uint8"),
        ({"bits": 16}, "must be torch.bfloat16"),
        ({"bits": 0}, "bits=0"),
        ({"bits": 9}, "bits=9"),
        ({"chunk": 0}, "chunk=0"),
        ({"chunk": 65537}, "chunk=65537"),
        ({"codebook": torch.zeros(3)}, "codebook is"),
        ({"codebook": torch.zeros(4, dtype=torch.float64)}, "codebook is"),
        ({"shape": (129,)}, "num_chunks·chunk"),
        ({"shape": (-1,)}, "non-negative"),
        ({"name": 7}, "must be a str"),
    ],
)
def test_encode_rejects_bad_compressed_input(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode([dataclasses.replace(_valid(), **change)])


def test_encode_rejects_bad_dense_and_options() -> None:
    with pytest.raises(ValueError, match="float32/bfloat16"):
        encode([DenseTensor("x", torch.zeros(3, dtype=torch.int32))])
    with pytest.raises(ValueError, match="index_coding='zip'"):
        encode([_valid()], index_coding="zip")
    with pytest.raises(ValueError, match="not CompressedTensor"):
        encode(["w"])  # type: ignore[list-item]
