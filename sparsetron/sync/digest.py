"""A position-weighted digest of a tensor's bit patterns that updates in O(changed elements).

Each element's bits are cut into 16-bit limbs ``w`` (1 limb for bf16/fp16/int16 and bytes, 2 for fp32, 4 for
fp64). The digest is the pair of sums ``Σ w · m_p(position, limb) mod p`` for the two Mersenne-like primes
``p ∈ {2³¹ − 1, 2³¹ − 19}`` with pseudo-random multipliers per position, packed into one 62-bit integer.
Because it is linear in the limbs, a receiver that trusts its current digest verifies a delta *before*
applying it: ``digest_after = digest_before + Σ_changed (w_new − w_old) · m mod p``, touching only the changed
elements; a full pass (:func:`tensor_digest`) is needed only for snapshots. All arithmetic stays below 2⁶³
in int64, so it is exact and identical on CPU and GPU.

Any single changed limb changes the digest (``m`` is never 0 mod p); distinct multi-element changes collide
with probability about 2⁻⁶². It detects corruption and mistakes, not adversaries (transports carry HMACs).
"""

from __future__ import annotations

import torch

_PRIMES = (2**31 - 1, 2**31 - 19)
_SEEDS = (0x9E3779B1, 0x85EBCA77)
#: Elements per block: bounds scratch memory (a few int64 temporaries of the block) and keeps each block's
#: sum of terms (each < 2³¹, ≤ 4 limbs per element) far below 2⁶³.
_BLOCK = 1 << 22
_LIMB = 1 << 16


def limbs(bits: torch.Tensor) -> torch.Tensor:
    """int64 ``[M, L]`` 16-bit limbs of an integer bit-pattern view ``bits`` [M] (uint8/int16/int32/int64)."""
    width = bits.element_size() * 8
    values = bits.reshape(-1).to(torch.int64)
    if width <= 16:
        return (values & ((1 << width) - 1)).unsqueeze(1)
    shifts = torch.arange(0, width, 16, device=bits.device, dtype=torch.int64)
    return (values.unsqueeze(1) >> shifts) & (_LIMB - 1)


def _multipliers(positions: torch.Tensor, limb_count: int, prime: int, seed: int) -> torch.Tensor:
    """``[M, L]`` multipliers in [1, p): a hash of (position, limb) reduced mod p, never 0."""
    slots = positions.unsqueeze(1) * limb_count + torch.arange(limb_count, device=positions.device)
    # Two rounds of multiply–xorshift on values kept below 2^31, so products stay below 2^62.
    x = (slots % prime) ^ seed
    x = (x * 48271) % prime
    x = (x ^ (x >> 13)) * 16807 % prime
    return x % (prime - 1) + 1


def _block_sums(positions: torch.Tensor, limb_values: torch.Tensor) -> tuple[int, int]:
    """``Σ limb · m`` mod each prime over one block (``limb_values`` [M, L], may be negative: differences)."""
    parts = []
    for prime, seed in zip(_PRIMES, _SEEDS, strict=True):
        m = _multipliers(positions, limb_values.shape[1], prime, seed)
        parts.append(int(((limb_values % prime) * m % prime).sum()) % prime)
    return parts[0], parts[1]


def _combine(*sums: tuple[int, int]) -> int:
    high = sum(s[0] for s in sums) % _PRIMES[0]
    low = sum(s[1] for s in sums) % _PRIMES[1]
    return high << 31 | low


def _split(digest: int) -> tuple[int, int]:
    return digest >> 31, digest & (2**31 - 1)


def tensor_digest(bits: torch.Tensor) -> int:
    """Digest of a whole tensor given as its integer bit-pattern view (any shape; see :func:`limbs`).

    Reads the tensor once, in blocks of :data:`_BLOCK` elements (bounded scratch memory).
    """
    flat = bits.reshape(-1)
    sums = []
    for start in range(0, flat.numel(), _BLOCK):
        block = flat[start : start + _BLOCK]
        positions = torch.arange(start, start + block.numel(), device=flat.device, dtype=torch.int64)
        sums.append(_block_sums(positions, limbs(block)))
    return _combine(*sums) if sums else 0


def updated_digest(digest: int, indices: torch.Tensor, old_bits: torch.Tensor, new_bits: torch.Tensor) -> int:
    """The digest after replacing the elements at ``indices`` (int64 [M]) from ``old_bits`` to ``new_bits``.

    O(M): only the changed elements are read. ``old_bits``/``new_bits`` are [M] integer bit patterns.
    """
    sums = [_split(digest)]
    for start in range(0, indices.numel(), _BLOCK):
        block = slice(start, start + _BLOCK)
        difference = limbs(new_bits[block]) - limbs(old_bits[block])
        sums.append(_block_sums(indices[block].to(torch.int64), difference))
    return _combine(*sums)
