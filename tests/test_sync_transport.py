"""Weight-sync transports: TCP request/response (auth, streaming, failures), shared memory, torch broadcast."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from pathlib import Path

import numpy as np
import pytest

from sparsetron.sync import shm
from sparsetron.sync.errors import AuthenticationError, ConnectionLost, IntegrityError, RemoteError, SyncError
from sparsetron.sync.shm import ShmPublisher, ShmSubscriber
from sparsetron.sync.tcp import SyncClient, SyncServer

SECRET = b"a shared secret for the tests"
MB = 1 << 20
SHM_DIR = Path("/dev/shm")


def _blob(nbytes: int) -> bytes:
    """Distinct content at every 4-byte offset, so a dropped or reordered frame cannot go unnoticed."""
    return np.arange(nbytes // 4, dtype=np.uint32).tobytes() + b"\x07" * (nbytes % 4)


def _chunked(data: bytes, sizes: list[int]):
    """A handler: ``data`` in chunks of the given sizes (the last one repeating), regardless of frame size."""

    def handler(request: dict):
        view, i, k = memoryview(data), 0, 0
        while i < len(view):
            n = sizes[min(k, len(sizes) - 1)]
            yield view[i : i + n]
            i, k = i + n, k + 1

    return handler


@pytest.fixture(scope="module")
def big() -> bytes:
    return _blob(200 * MB + 3)


# ------------------------------------------------------------------------------------------------ TCP


def test_small_round_trip_keeps_the_connection():
    def echo(request: dict):
        yield repr(sorted(request.items())).encode()
        yield b""  # empty chunks are legal and send nothing

    with SyncServer(echo, secret=SECRET) as server, SyncClient(*server.address, secret=SECRET) as client:
        assert client.request({"op": "pull", "have": 3}) == b"[('have', 3), ('op', 'pull')]"
        got = []
        assert client.request({"x": 1}, sink=got.append) is None
        assert b"".join(got) == b"[('x', 1)]"
        stats = server.stats
    assert (stats.connections, stats.requests, stats.auth_failures) == (1, 2, 0)
    assert stats.bytes_sent > 0


def test_200mb_response_whole_and_streamed(big):
    frame = 1 * MB
    handler = _chunked(big, [7 * MB + 5, 300, 64 * MB])  # chunk sizes unrelated to the frame size
    with (
        SyncServer(handler, secret=SECRET, frame_bytes=frame) as server,
        SyncClient(*server.address, secret=SECRET) as client,
    ):
        assert client.request({}) == big

        digest, sizes = hashlib.sha256(), []

        def sink(chunk):
            sizes.append(len(chunk))
            digest.update(chunk)

        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            assert client.request({}, sink=sink) is None
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
    assert digest.digest() == hashlib.sha256(big).digest()
    assert max(sizes) <= frame and sum(sizes) == len(big)
    # The sink path holds about one frame at a time (plus a little per-frame overhead), not the response.
    assert peak < 4 * frame, f"peak {peak / MB:.1f} MiB while streaming"


def test_wrong_secret_is_rejected_and_logged_and_others_are_served(caplog):
    with SyncServer(_chunked(b"ok", [2]), secret=SECRET) as server:
        with caplog.at_level(logging.WARNING, logger="sparsetron.sync.tcp"):
            with pytest.raises(AuthenticationError, match="rejected our shared secret"):
                SyncClient(*server.address, secret=b"wrong").request({})
            deadline = time.monotonic() + 5
            while not caplog.records and time.monotonic() < deadline:
                time.sleep(0.01)
        assert SyncClient(*server.address, secret=SECRET).request({}) == b"ok"
        assert server.stats.auth_failures == 1
    (record,) = caplog.records
    assert "wrong shared secret" in record.getMessage() and "127.0.0.1:" in record.getMessage()


def test_impostor_server_is_rejected():
    """A listener that speaks the protocol but does not know the secret fails the client's check."""
    with SyncServer(_chunked(b"ok", [2]), secret=b"another secret") as server:
        # The real server would reject us first; an impostor accepts anything, so fake its accept message.
        listener = socket.create_server(("127.0.0.1", 0))

        def impostor():
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"STSYNC/1" + os.urandom(32))
                conn.recv(64)
                conn.sendall(b"\x01" + os.urandom(32) + (4 * MB).to_bytes(4, "big"))
                conn.recv(1)

        thread = threading.Thread(target=impostor, daemon=True)
        thread.start()
        with pytest.raises(AuthenticationError, match="could not prove"):
            SyncClient(*listener.getsockname()[:2], secret=SECRET).request({})
        thread.join(5)
        listener.close()
        assert server.stats.connections == 0


def test_handler_error_becomes_remote_error_and_the_connection_survives():
    def handler(request: dict):
        if request.get("fail") == "late":
            yield b"partial"
            raise KeyError("no such version 42")
        if request.get("fail") == "sync":  # a SyncError from the handler is its failure, not the transport's
            raise RemoteError("upstream trainer unreachable")
        yield b"fine"

    with SyncServer(handler, secret=SECRET) as server, SyncClient(*server.address, secret=SECRET) as client:
        with pytest.raises(RemoteError, match="KeyError: 'no such version 42'"):
            client.request({"fail": "late"})
        with pytest.raises(RemoteError, match="upstream trainer unreachable"):
            client.request({"fail": "sync"})
        with pytest.raises(RemoteError, match="JSON object"):
            client.request([1, 2])  # type: ignore[arg-type]
        assert client.request({}) == b"fine"
        assert server.stats.connections == 1


def _serve_then_die(conn) -> None:
    """Child process: serve a response that dies (SIGKILL) after a few chunks."""

    def handler(request: dict):
        for _ in range(3):
            yield b"x" * MB
        os.kill(os.getpid(), signal.SIGKILL)
        yield b"never sent"

    server = SyncServer(handler, secret=SECRET).start()
    conn.send(server.address)
    time.sleep(60)


def test_server_process_killed_mid_transfer():
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve_then_die, args=(child,), daemon=True)
    proc.start()
    try:
        assert parent.poll(30), "server process did not start"
        address = parent.recv()
        received = []
        with pytest.raises(ConnectionLost, match="closed the connection"):
            SyncClient(*address, secret=SECRET, timeout=10).request({}, sink=received.append)
        assert 0 < sum(map(len, received)) <= 3 * MB
    finally:
        proc.kill()
        proc.join()


class _Proxy:
    """Forwards one TCP connection; server-to-client bytes can be cut after, or flipped at, an offset."""

    def __init__(self, upstream: tuple[str, int], *, flip_at: int | None = None, cut_at: int | None = None):
        self._upstream, self._flip_at, self._cut_at = upstream, flip_at, cut_at
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = self._listener.getsockname()[:2]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        down, _ = self._listener.accept()
        up = socket.create_connection(self._upstream)
        threading.Thread(target=self._pump, args=(down, up, False), daemon=True).start()
        self._pump(up, down, True)

    def _pump(self, src: socket.socket, dst: socket.socket, tamper: bool) -> None:
        seen = 0
        with contextlib.suppress(OSError):
            while data := src.recv(256 << 10):
                data = bytearray(data)
                if tamper and self._flip_at is not None and seen <= self._flip_at < seen + len(data):
                    data[self._flip_at - seen] ^= 0x40
                if tamper and self._cut_at is not None and seen + len(data) >= self._cut_at:
                    dst.sendall(data[: self._cut_at - seen])
                    break
                dst.sendall(data)
                seen += len(data)
        # Abrupt end for both directions, as when a middlebox or the peer goes away.
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._listener.close()
        self._thread.join(5)


@pytest.mark.parametrize(
    ("offset", "error"),
    [(78, "bad frame header"), (2 * MB, "failed its MAC check")],  # first frame's length / a later payload
)
def test_flipped_byte_is_an_integrity_error(offset, error):
    data = _blob(3 * MB)
    with SyncServer(_chunked(data, [len(data)]), secret=SECRET, frame_bytes=MB) as server:
        proxy = _Proxy(server.address, flip_at=offset)
        with pytest.raises(IntegrityError, match=f"{error}.*127.0.0.1|127.0.0.1.*{error}"):
            SyncClient(*proxy.address, secret=SECRET, timeout=10).request({})
        proxy.close()


def test_truncated_stream_is_connection_lost():
    data = _blob(3 * MB)
    with SyncServer(_chunked(data, [len(data)]), secret=SECRET, frame_bytes=MB) as server:
        proxy = _Proxy(server.address, cut_at=2 * MB)
        with pytest.raises(ConnectionLost):
            SyncClient(*proxy.address, secret=SECRET, timeout=10).request({})
        proxy.close()


def test_stalled_server_times_out():
    release = threading.Event()

    def stall(request: dict):
        yield b"first"
        release.wait(10)
        yield b"late"

    with SyncServer(stall, secret=SECRET) as server:
        with pytest.raises(ConnectionLost, match="no progress"):
            SyncClient(*server.address, secret=SECRET, timeout=0.3).request({})
        release.set()


def test_client_reconnects_after_the_server_drops_an_idle_connection():
    with SyncServer(_chunked(b"ok", [2]), secret=SECRET, timeout=0.2) as server:
        client = SyncClient(*server.address, secret=SECRET)
        assert client.request({}) == b"ok"
        time.sleep(0.5)  # past the server's idle timeout: it has closed our keep-alive connection
        assert client.request({}) == b"ok"
        client.close()
        assert server.stats.connections == 2


def test_eight_concurrent_clients_get_identical_bytes():
    data = _blob(50 * MB + 1)
    expected = hashlib.sha256(data).digest()
    digests, errors = [], []

    def pull(address):
        try:
            digests.append(hashlib.sha256(SyncClient(*address, secret=SECRET).request({})).digest())
        except Exception as exc:
            errors.append(exc)

    with SyncServer(_chunked(data, [4 * MB]), secret=SECRET, max_clients=8) as server:
        threads = [threading.Thread(target=pull, args=(server.address,)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert server.stats.requests == 8
    assert not errors and digests == [expected] * 8


# --------------------------------------------------------------------------------------- shared memory


def _shm_name() -> str:
    return f"st-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _segments(name: str) -> list[str]:
    return sorted(p.name for p in SHM_DIR.glob(f"{name}*"))


def _payload(version: int) -> bytes:
    """Different size and content per version, so a mixed-up read cannot pass for a good one."""
    return version.to_bytes(4, "little") * (1000 + 997 * (version % 50))


def test_shm_publish_get_keep_and_close():
    name = _shm_name()
    sub = ShmSubscriber(name)
    assert sub.latest() is None and sub.get() is None  # no publisher yet
    with ShmPublisher(name, keep=2) as pub:
        assert sub.latest() is None
        pub.put(1, b"")
        assert sub.get() == (1, b"")
        for v in (2, 5, 9):
            pub.put(v, _payload(v))
        assert sub.latest() == 9
        assert sub.get() == (9, _payload(9))
        assert sub.get(min_version=9) is None
        assert sub.get(min_version=8) == (9, _payload(9))
        assert _segments(name) == [name, f"{name}.v5", f"{name}.v9"]
        with pytest.raises(ValueError, match="strictly increase"):
            pub.put(9, b"again")
    assert _segments(name) == []
    assert sub.latest() is None and sub.get() is None  # the publisher closed
    sub.close()


def test_shm_torn_control_read_is_retried():
    name = _shm_name()
    with ShmPublisher(name) as pub, ShmSubscriber(name) as sub:
        pub.put(1, _payload(1))
        buf = pub._control.buf
        (seq,) = np.frombuffer(buf, np.uint64, count=1)
        buf[:8] = int(seq + 1).to_bytes(8, "little")  # as if the writer stopped mid-update
        timer = threading.Timer(
            0.05, lambda: buf.__setitem__(slice(0, 8), int(seq + 2).to_bytes(8, "little"))
        )
        timer.start()
        assert sub.get() == (1, _payload(1))
        timer.join()
        assert sub.retries > 0


def test_shm_reader_losing_the_unlink_race_retries(monkeypatch):
    name = _shm_name()
    real = shm._ReadOnlySegment
    with ShmPublisher(name, keep=2) as pub, ShmSubscriber(name) as sub:
        pub.put(1, _payload(1))

        def racing(segment: str):
            if segment.endswith(".v1"):
                pub.put(2, _payload(2))  # the writer moves on twice between our control read and our open
                pub.put(3, _payload(3))
            return real(segment)

        monkeypatch.setattr(shm, "_ReadOnlySegment", racing)
        assert sub.get() == (3, _payload(3))
        assert sub.retries == 1


def test_shm_corrupt_payload_is_never_returned(monkeypatch):
    monkeypatch.setattr(shm, "READ_ATTEMPTS", 5)
    name = _shm_name()
    with ShmPublisher(name) as pub, ShmSubscriber(name) as sub:
        pub.put(1, _payload(1))
        pub._segments[-1][1].buf[10] ^= 0xFF
        with pytest.raises(SyncError, match="consistent payload"):
            sub.get()


def _publish_fast(name: str, last: int, done) -> None:
    """Child process: publish versions 1..last as fast as possible, then wait for the reader to finish."""
    with ShmPublisher(name, keep=2) as pub:
        for version in range(1, last + 1):
            pub.put(version, _payload(version))
        done.wait(30)


def test_shm_across_processes(capfd):
    name = _shm_name()
    ctx = mp.get_context("spawn")
    # An independent subscriber process (its own resource tracker) must not take the publisher's
    # segments with it when it exits, nor warn about them: a plain SharedMemory attach does both.
    with ShmPublisher(name) as pub:
        pub.put(7, _payload(7))
        code = (
            f"from sparsetron.sync.shm import ShmSubscriber as S; v, p = S({name!r}).get(); print(v, len(p))"
        )
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
        assert (child.stdout, child.stderr) == (f"7 {len(_payload(7))}\n", "")
        assert _segments(name) == [name, f"{name}.v7"]
        with ShmSubscriber(name) as sub:
            assert sub.get() == (7, _payload(7))
    assert _segments(name) == []

    # A reader racing a fast writer in another process sees only whole, increasing versions.
    last, done = 300, ctx.Event()
    writer = ctx.Process(target=_publish_fast, args=(name, last, done), daemon=True)
    writer.start()
    seen = []
    with ShmSubscriber(name) as sub:
        deadline = time.monotonic() + 30
        while (not seen or seen[-1] < last) and time.monotonic() < deadline:
            got = sub.get(min_version=seen[-1] if seen else None)
            if got is not None:
                assert got[1] == _payload(got[0])
                seen.append(got[0])
    done.set()
    writer.join(10)
    assert writer.exitcode == 0 and seen[-1] == last and seen == sorted(set(seen))
    assert _segments(name) == []
    assert "leaked shared_memory" not in capfd.readouterr().err


# ------------------------------------------------------------------------------------- torch broadcast


def _broadcast_sizes(sizes: list[int]) -> list[tuple[int, str]]:
    import torch.distributed as dist

    from sparsetron.sync.broadcast import broadcast_bytes

    out = []
    for i, size in enumerate(sizes):
        src = i % dist.get_world_size()
        payload = _blob(size) if dist.get_rank() == src else None
        got = broadcast_bytes(payload, src)
        out.append((len(got), hashlib.sha256(got).hexdigest()))
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_broadcast_bytes(ranks, world):
    sizes = [0, 1, 3, 24 * MB + 7]
    expected = [(n, hashlib.sha256(_blob(n)).hexdigest()) for n in sizes]
    assert ranks.run(world, _broadcast_sizes, sizes, timeout=60) == [expected] * world
