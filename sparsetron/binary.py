"""Helpers shared by sparsetron's binary formats (the SparseLoCo wire format, weight-sync deltas)."""

from __future__ import annotations

#: Longest tensor name a record holds (its length is a u16).
MAX_NAME_BYTES = 0xFFFF


def encode_name(name: object, error: type[ValueError] = ValueError) -> bytes:
    """UTF-8 bytes of tensor ``name``; raises ``error`` unless it is a str of ≤ 65535 encoded bytes."""
    if not isinstance(name, str):
        raise error(f"name={name!r} must be a str; pass the parameter name")
    encoded = name.encode("utf-8")
    if len(encoded) > MAX_NAME_BYTES:
        raise error(f"name of {len(encoded)} utf-8 bytes exceeds 65535; shorten the parameter name")
    return encoded
