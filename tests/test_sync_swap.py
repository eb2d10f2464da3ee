"""The one-pass apply of a single delta: swap new bits in with an undo log, check digests, restore on failure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsetron.sync import subscriber as subscriber_module
from sparsetron.sync.codec import PendingUpdate, bits_view, encode
from sparsetron.sync.digest import tensor_digest, updated_digest
from sparsetron.sync.errors import IntegrityError
from sparsetron.sync.publisher import DeltaPublisher
from sparsetron.sync.scratch import Scratch
from sparsetron.sync.subscriber import DeltaSubscriber
from sparsetron.sync.swap import restore, swap_in

WIDTH_DTYPES = [torch.uint8, torch.int16, torch.int32, torch.int64]


def _pending(bits: torch.Tensor, generator: torch.Generator, relative: list[tuple[int, int]]):
    """A random change of ``bits`` as a PendingUpdate, with the expected new bits at its positions."""
    numel = bits.numel()
    indices = torch.randperm(numel, generator=generator)[: numel // 3].sort().values
    old = bits[indices]
    new = torch.randint(-(2**62), 2**62, (indices.numel(),), generator=generator).to(bits.dtype)
    # Wrap-around at the ends of the width (0 − 1, all-ones + 1) must come out exact.
    new[:2] = torch.tensor([-1, 0], dtype=torch.int64).to(bits.dtype)
    old[:2] = torch.tensor([0, -1], dtype=torch.int64).to(bits.dtype)
    bits[indices[:2]] = old[:2]
    values = new.clone()
    for start, end in relative:
        values[start:end] = new[start:end] - old[start:end]  # wrapping, as the encoder's differences
    return PendingUpdate("w", bits.dtype, (numel,), indices, values, relative, 0), new


@pytest.mark.parametrize("dtype", WIDTH_DTYPES)
@pytest.mark.parametrize("relative", [[], [(0, 40)], [(5, 20), (30, 60)]])
def test_swap_writes_new_bits_returns_old_and_the_digest_delta(dtype, relative):
    generator = torch.Generator().manual_seed(len(relative))
    bits = torch.randint(-(2**62), 2**62, (200,), generator=generator).to(dtype)
    update, new = _pending(bits, generator, relative)
    before = bits.clone()
    undo, delta = swap_in(bits, update)
    assert torch.equal(bits[update.indices], new)
    assert torch.equal(undo, before[update.indices])
    assert (tensor_digest(before) + delta) & ((1 << 64) - 1) == tensor_digest(bits)
    assert delta == updated_digest(0, update.indices, undo, new)
    restore(bits, update.indices, undo)
    assert torch.equal(bits, before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", WIDTH_DTYPES)
def test_swap_on_the_gpu_matches_the_host(dtype):
    generator = torch.Generator().manual_seed(7)
    bits = torch.randint(-(2**62), 2**62, (5000,), generator=generator).to(dtype)
    update, _ = _pending(bits, generator, [(10, 900)])
    host_bits, gpu_bits = bits.clone(), bits.cuda()
    host_undo, host_delta = swap_in(host_bits, update)
    gpu_undo, gpu_delta = swap_in(gpu_bits, update)
    assert gpu_delta == host_delta
    assert torch.equal(gpu_bits.cpu(), host_bits) and torch.equal(gpu_undo.cpu(), host_undo)


def _published(seed: int):
    generator = torch.Generator().manual_seed(seed)
    state = {f"w{i}": torch.randn(4000, generator=generator).bfloat16() for i in range(4)}
    publisher = DeltaPublisher(state)
    subscriber = DeltaSubscriber({k: torch.zeros_like(v) for k, v in state.items()}, threads=2)
    subscriber.apply(publisher.payloads_for(None), publisher.id)
    for tensor in state.values():
        bits = bits_view(tensor)
        bits[torch.randint(0, bits.numel(), (50,), generator=generator)] += 1
    publisher.publish()
    return state, publisher, subscriber


def test_a_single_delta_that_fails_its_digest_is_rolled_back_whole():
    state, publisher, subscriber = _published(0)
    # The version's changes raw-coded (no base), so the result depends on the bits the subscriber holds;
    # a weight the delta changes was changed outside sync: the swap reads those bits and the digest tells.
    changes = list(publisher.store._versions[1].changes.values())
    payload = encode(changes, version=1, base_version=0)
    changed = int(changes[2].indices[0])
    bits_view(subscriber.tensors["w2"])[changed] += 7
    before = {k: v.clone() for k, v in subscriber.tensors.items()}
    with pytest.raises(IntegrityError, match="'w2' \\(1 of 4\\).*every tensor was restored"):
        subscriber.apply([payload], publisher.id)
    assert subscriber.version == 0
    assert all(torch.equal(bits_view(before[k]), bits_view(v)) for k, v in subscriber.tensors.items())
    subscriber.apply(publisher.payloads_for(None), publisher.id)  # re-anchoring repairs it
    assert all(torch.equal(bits_view(state[k]), bits_view(v)) for k, v in subscriber.tensors.items())


def test_a_failure_while_swapping_restores_the_tensors_already_written(monkeypatch):
    _, publisher, subscriber = _published(1)
    before = {k: v.clone() for k, v in subscriber.tensors.items()}
    calls = []

    def failing_on_the_third(bits, update, alloc):
        calls.append(update.name)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return swap_in(bits, update, alloc)

    monkeypatch.setattr(subscriber_module, "swap_in", failing_on_the_third)
    with pytest.raises(RuntimeError, match="device lost"):
        subscriber.apply(publisher.payloads_for(subscriber.version), publisher.id)
    assert len(calls) == 4 and subscriber.version == 0
    assert all(torch.equal(bits_view(before[k]), bits_view(v)) for k, v in subscriber.tensors.items())


def test_scratch_hands_out_disjoint_arrays_and_reuses_them_after_release():
    scratch = Scratch()
    first = scratch.take(1000, np.int64)
    second = scratch.take(10, np.uint16)
    first[:] = 1
    second[:] = 2
    assert (first == 1).all() and first.dtype == np.int64 and second.dtype == np.uint16
    assert first.ctypes.data % 64 == second.ctypes.data % 64  # each starts on its own cache line
    huge = scratch.take((80 << 20) // 8, np.int64)  # beyond the first chunk: a new one
    held = scratch.nbytes
    assert huge.size == (80 << 20) // 8 and held >= (64 << 20) + (80 << 20)
    scratch.release()
    again = scratch.take(1000, np.int64)
    assert again.ctypes.data == first.ctypes.data and scratch.nbytes == held
