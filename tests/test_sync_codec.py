"""Weight-delta codec: bit-exact round trips, index-coding choice, size at 1% change, malformed payloads."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
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
        decode(payload + b"\0")
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


@pytest.mark.parametrize(
    ("steps", "match"),
    [
        ([5, (3 - 5 - 1) % (1 << 64)], "not strictly increasing"),  # indices 5, 3 (a wrapped gap)
        ([5, 200], "not strictly increasing within \\[0, 100\\)"),  # second index 206 ≥ numel
        ([5], "holds 1 complete values, expected 2"),
    ],
)
def test_bad_index_streams_with_valid_crcs_are_rejected(monkeypatch, steps, match):
    # The encoder writes whatever the index coder returns and CRCs it, so this crafts a well-formed payload
    # that carries bad indices.
    gaps = INDEX_CODINGS.index("gaps")
    monkeypatch.setattr(codec, "_encode_indices", lambda indices, prev_last: (gaps, _varints(steps)))
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
