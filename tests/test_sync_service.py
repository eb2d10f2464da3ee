"""Weight sync end to end on the CPU: publisher → (in process, or TCP) → subscribers stay bit-exact over many
versions for every dtype and special bit pattern, whether current, lagging or new; faults leave a subscriber
on its version with nothing half-applied; eight subscribers pull concurrently; a real bf16 AdamW workload."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from sparsetron.sync.codec import DeltaFormatError, PayloadReader, bits_view, current_bits, decode
from sparsetron.sync.errors import AuthenticationError, ConnectionLost, IntegrityError
from sparsetron.sync.publisher import DeltaPublisher
from sparsetron.sync.subscriber import DeltaSubscriber, VersionGap, fetch_payloads
from sparsetron.sync.tcp import SyncClient, SyncServer

SECRET = b"a test secret of enough length"
DTYPES = [
    torch.bfloat16, torch.float16, torch.float32, torch.float64,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
]  # fmt: skip
SPECIAL = {
    torch.bfloat16: [0x7FC1, 0xFFFF, 0x7F80, 0xFF80, 0x8000, 0x0001],  # NaNs, ±Inf, -0.0, subnormal
    torch.float16: [0x7E01, 0x7C00, 0xFC00, 0x8000, 0x0001],
    torch.float32: [0x7FC00001, 0x7F800000, -0x800000, -(2**31), 1],
}


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for i, dtype in enumerate(DTYPES):
        shape = [(64, 33), (1000,), (3, 5, 7), (1,), ()][i % 5]
        raw = torch.randint(0, 256, (max(1, int(torch.Size(shape).numel())) * torch.empty(0, dtype=dtype).element_size(),),
                            generator=generator, dtype=torch.uint8)  # fmt: skip
        tensor = raw.view(dtype if dtype != torch.bool else torch.uint8)[: torch.Size(shape).numel()].reshape(
            shape
        )
        state[f"t{i}.{str(dtype).removeprefix('torch.')}"] = (
            (tensor % 2 == 1) if dtype == torch.bool else tensor.clone()
        )
    return state


def _mutate(state: dict[str, torch.Tensor], generator: torch.Generator, density: float) -> None:
    """Random sparse changes of the bit patterns, special values included."""
    for tensor in state.values():
        bits = bits_view(tensor).reshape(-1)
        count = max(1, int(density * bits.numel()))
        where = torch.randint(0, bits.numel(), (count,), generator=generator)
        if tensor.dtype == torch.bool:
            bits[where] = 1 - bits[where]
            continue
        noise = torch.randint(-3, 4, (count,), generator=generator).to(bits.dtype)
        bits[where] = bits[where] + noise
        specials = SPECIAL.get(tensor.dtype)
        if specials:
            values = torch.tensor(specials, dtype=torch.int64).to(bits.dtype)
            bits[torch.randint(0, bits.numel(), (len(specials),), generator=generator)] = values


def _same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(bits_view(a[k]), bits_view(b[k])) for k in a)


def _fresh_like(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in state.items()}


def test_subscribers_current_lagging_and_new_stay_bit_exact():
    state = _state()
    publisher = DeltaPublisher(state, keep=6)
    generator = torch.Generator().manual_seed(1)
    current = DeltaSubscriber(_fresh_like(state))
    lagging = {lag: DeltaSubscriber(_fresh_like(state)) for lag in (2, 3, 7)}
    for version in range(1, 25):
        _mutate(state, generator, density=0.01 if version % 4 else 0.5)
        report = publisher.publish()
        assert report.version == version
        current.apply(publisher.payloads_for(current.version), publisher.id)
        assert current.version == version and _same_bits(current.tensors, state)
        for lag, subscriber in lagging.items():
            if version % lag == 0:
                subscriber.apply(publisher.payloads_for(subscriber.version), publisher.id)
                assert subscriber.version == version and _same_bits(subscriber.tensors, state), lag
        if version % 6 == 0:  # a new subscriber joins (anchor + merged delta)
            new = DeltaSubscriber({})
            new.apply(publisher.payloads_for(None), publisher.id)
            assert new.version == version and _same_bits(new.tensors, state)
    current.verify()


def test_corrupt_payloads_and_version_gaps_change_nothing():
    state = _state(2)
    publisher = DeltaPublisher(state)
    subscriber = DeltaSubscriber(_fresh_like(state))
    subscriber.apply(publisher.payloads_for(None), publisher.id)
    generator = torch.Generator().manual_seed(3)
    _mutate(state, generator, 0.05)
    publisher.publish()
    before = {k: v.clone() for k, v in subscriber.tensors.items()}
    (payload,) = publisher.payloads_for(subscriber.version)
    corrupt = bytearray(payload)
    corrupt[len(corrupt) // 2] ^= 0x40
    with pytest.raises(DeltaFormatError):
        subscriber.apply([bytes(corrupt)], publisher.id)
    with pytest.raises(DeltaFormatError):
        subscriber.apply([payload[: len(payload) - 7]], publisher.id)
    _mutate(state, generator, 0.05)
    publisher.publish()
    with pytest.raises(VersionGap, match="applies to version 1, but the subscriber holds 0"):
        subscriber.apply(publisher.payloads_for(1), publisher.id)
    assert subscriber.version == 0 and _same_bits(subscriber.tensors, before)
    # Weights changed behind sync's back: the full check names the tensor.
    bits_view(subscriber.tensors["t0.bfloat16"]).reshape(-1)[0] += 1
    with pytest.raises(IntegrityError, match="'t0.bfloat16' no longer matches version 0"):
        subscriber.verify()
    subscriber.apply(publisher.payloads_for(None), publisher.id)  # re-anchoring repairs it
    assert subscriber.version == 2 and _same_bits(subscriber.tensors, state)


@pytest.fixture
def served():
    state = _state(4)
    publisher = DeltaPublisher(state, keep=4)
    with SyncServer(publisher.handler, secret=SECRET) as server:
        yield state, publisher, server


def test_tcp_pull_faults_leave_the_version_intact(served, caplog):
    state, publisher, server = served
    host, port = server.address
    subscriber = DeltaSubscriber(_fresh_like(state))
    assert subscriber.pull(SyncClient(host, port, secret=SECRET)).to_version == 0
    _mutate(state, torch.Generator().manual_seed(5), 0.02)
    publisher.publish()
    before = {k: v.clone() for k, v in subscriber.tensors.items()}
    with pytest.raises(AuthenticationError):
        subscriber.pull(SyncClient(host, port, secret=b"not the secret, but long enough"), retries=1)
    assert subscriber.version == 0 and _same_bits(subscriber.tensors, before)

    # A handler that dies mid-stream (trainer crash while serving): the stream ends early.
    def dying(request):
        stream = publisher.handler(request)
        yield next(stream)
        yield next(stream)
        raise ConnectionResetError("trainer died")

    with (
        SyncServer(dying, secret=SECRET) as broken,
        caplog.at_level(logging.WARNING),
        pytest.raises(Exception, match="trainer died|ended|lost"),
    ):
        subscriber.pull(SyncClient(*broken.address, secret=SECRET), retries=2, backoff_s=0.01)
    assert "sync attempt 1/2 failed at version 0" in caplog.text
    assert subscriber.version == 0 and _same_bits(subscriber.tensors, before)

    report = subscriber.pull(SyncClient(host, port, secret=SECRET))
    assert report.to_version == 1 and _same_bits(subscriber.tensors, state)


def test_trainer_restart_makes_subscribers_re_anchor(served):
    state, _, server = served
    subscriber = DeltaSubscriber(_fresh_like(state))
    subscriber.pull(SyncClient(*server.address, secret=SECRET))
    _mutate(state, torch.Generator().manual_seed(6), 0.3)
    restarted = DeltaPublisher(state)  # a new history at version 0 with other weights
    with SyncServer(restarted.handler, secret=SECRET) as again:
        report = subscriber.pull(SyncClient(*again.address, secret=SECRET))
    assert report.anchored and subscriber.publisher == restarted.id and _same_bits(subscriber.tensors, state)


def test_eight_concurrent_subscribers_stay_bit_exact(served):
    state, publisher, server = served
    subscribers = [DeltaSubscriber(_fresh_like(state)) for _ in range(8)]
    generator = torch.Generator().manual_seed(7)
    failures: list[Exception] = []

    def pull(subscriber):
        try:
            subscriber.pull(SyncClient(*server.address, secret=SECRET))
        except Exception as exc:  # collected and reported by the assertion below
            failures.append(exc)

    for _ in range(3):
        _mutate(state, generator, 0.05)
        publisher.publish()

        threads = [threading.Thread(target=pull, args=(s,)) for s in subscribers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not failures, failures
        assert all(_same_bits(s.tensors, state) and s.version == publisher.version for s in subscribers)


def test_fetch_reports_a_truncated_stream(served):
    _, publisher, _ = served

    def short(request):
        for chunk in publisher.handler(request):
            yield chunk[: max(1, len(chunk) // 2)]

    with (
        SyncServer(short, secret=SECRET) as broken,
        pytest.raises((ConnectionLost, IntegrityError, ValueError)),
    ):
        fetch_payloads(SyncClient(*broken.address, secret=SECRET), None, None)


def test_chained_diff_coded_deltas_apply_in_one_batch():
    """Payload 2 is diff-coded against version 1, which only exists staged while the batch is applied."""
    state = _state(7)
    publisher = DeltaPublisher(state)
    subscriber = DeltaSubscriber(_fresh_like(state))
    subscriber.apply(publisher.payloads_for(None), publisher.id)
    generator = torch.Generator().manual_seed(8)
    chain = []
    for version in (1, 2, 3):
        _mutate(state, generator, 0.05)
        publisher.publish()
        chain += publisher.payloads_for(version - 1)  # each the single diff-coded delta of one step
    report = subscriber.apply(chain, publisher.id)
    assert report.to_version == 3 and _same_bits(subscriber.tensors, state)


class _ChunkedClient:
    """A SyncClient stand-in that hands the publisher's stream to the sink in chunks of random sizes."""

    def __init__(self, publisher: DeltaPublisher, seed: int, largest: int) -> None:
        self.publisher = publisher
        self.generator = torch.Generator().manual_seed(seed)
        self.largest = largest
        self.fed = 0

    def request(self, message: dict, sink) -> None:
        stream = b"".join(self.publisher.handler(message))
        self.total = len(stream)
        while self.fed < len(stream):
            size = int(torch.randint(1, self.largest + 1, (1,), generator=self.generator))
            sink(bytearray(stream[self.fed : self.fed + size]))
            self.fed += size


@pytest.mark.parametrize("largest", [1, 7, 4096])
def test_pull_decodes_tensors_while_later_bytes_are_still_arriving(monkeypatch, largest):
    state = _state(9)
    publisher = DeltaPublisher(state)
    subscriber = DeltaSubscriber(_fresh_like(state), threads=2)
    subscriber.pull(_ChunkedClient(publisher, 0, largest))  # anchor
    _mutate(state, torch.Generator().manual_seed(10), 0.05)
    publisher.publish()
    client = _ChunkedClient(publisher, 1, largest)
    fed_at_decode = []

    def watching(original):
        def watched(reader, record, *args, **kwargs):
            fed_at_decode.append(client.fed)
            return original(reader, record, *args, **kwargs)

        return watched

    # A single delta's sparse tensors are decoded pending (no live bits read); dense ones with decode.
    monkeypatch.setattr(PayloadReader, "decode", watching(PayloadReader.decode))
    monkeypatch.setattr(PayloadReader, "decode_pending", watching(PayloadReader.decode_pending))
    report = subscriber.pull(client)
    assert report.to_version == 1 and _same_bits(subscriber.tensors, state)
    # Every changed tensor decoded once, the first ones before the stream ended.
    (delta,) = publisher.payloads_for(0)
    whole = PayloadReader(delta)
    assert len(fed_at_decode) == len(whole.advance(len(delta))) > 1
    assert fed_at_decode and min(fed_at_decode) < client.total


def test_payload_reader_releases_each_tensor_once_its_bytes_are_in():
    state = _state(11)
    publisher = DeltaPublisher(state)
    (anchor,) = publisher.payloads_for(None)
    reader = PayloadReader(anchor)
    released, ends = [], []
    for available in range(0, len(anchor) + 1, 97):
        for record in reader.advance(available):
            released.append(record.name)
            ends.append((record.end, available))
    released += [r.name for r in reader.advance(len(anchor))]
    assert released == list(state) and reader.complete
    assert all(end <= available < end + 97 for end, available in ends)
    _, expected = decode(anchor)
    for record, update in zip(reader.records, expected, strict=True):
        got = reader.decode(record, current_bits(None))
        assert torch.equal(got.values, update.values) and got.digest == update.digest
