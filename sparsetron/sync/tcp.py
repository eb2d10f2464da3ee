"""Request/response over TCP, authenticated with a shared secret, with streamed and MAC-checked responses.

Protocol (all integers big-endian)::

    handshake
      server -> client   MAGIC "STSYNC/1" | nonce_s (32 random bytes)
      client -> server   HMAC(secret, "client" | nonce_s) | nonce_c (32 random bytes)
      server             verifies the client's proof in constant time; on mismatch it logs the peer,
                         sends the byte 0 and closes (the client raises AuthenticationError)
      server -> client   1 | HMAC(secret, "server" | nonce_c | frame_bytes u32) | frame_bytes u32
      client             verifies the server's proof, so an impostor server is rejected as well
      both               session key = HMAC(secret, nonce_s | nonce_c)

    frames, in both directions
      kind u8 | length u32 | payload | HMAC(session key, seq u64 | kind u8 | length u32 | payload)

      ``seq`` counts the frames each side has sent on this connection (0, 1, ...). It is not sent; both
      ends track it, so a replayed, reordered or dropped frame fails the MAC. Kinds are one-directional
      (REQUEST client -> server; DATA, END, ERROR server -> client), so reflecting a frame back at its
      sender fails too. The server's proof binds ``frame_bytes``, the largest payload it will send, so
      the client bounds every allocation before it has read (and verified) a frame.

    one exchange
      client: REQUEST (a JSON object, at most MAX_REQUEST_BYTES)
      server: DATA* (the handler's chunks re-framed to at most frame_bytes each), then END, or ERROR
              whose payload is the handler's exception text (the client raises RemoteError)

Connections are keep-alive: a client sends its next request on the same connection, reconnecting if
the server has closed it (idle longer than the server's ``timeout``, or after any transport error).
The server writes each chunk as the handler yields it, so its memory is bounded by the handler's chunk
size; a client with a ``sink`` holds at most one frame. Payload bytes are sent straight from the
handler's buffers (``sendmsg`` on memoryviews) and received straight into the frame buffer.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sparsetron.sync.errors import AuthenticationError, ConnectionLost, IntegrityError, RemoteError, SyncError

log = logging.getLogger(__name__)

#: Environment variable holding the shared secret when no secret file is given.
SECRET_ENV = "SPARSETRON_SYNC_SECRET"
MIN_SECRET_BYTES = 16


def load_secret(secret_file: str | os.PathLike | None = None) -> bytes:
    """The shared secret from ``secret_file`` (stripped) or ``$SPARSETRON_SYNC_SECRET``.

    Raises ValueError naming both sources when the secret is missing or shorter than 16 bytes.
    """
    if secret_file is not None:
        with open(secret_file, "rb") as handle:
            secret = handle.read().strip()
    else:
        secret = os.environ.get(SECRET_ENV, "").encode()
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(
            f"weight sync needs a shared secret of ≥ {MIN_SECRET_BYTES} bytes: pass --secret-file FILE or set "
            f"{SECRET_ENV} (the same value on the trainer and every rollout worker)"
        )
    return secret


Handler = Callable[[dict], Iterable[bytes]]
Sink = Callable[[bytes], None]

MAGIC = b"STSYNC/1"
NONCE_BYTES = 32
MAC_BYTES = 32
#: Requests are small JSON objects; the cap keeps an unauthenticated length field from allocating much.
MAX_REQUEST_BYTES = 1 << 20
#: Handler exception text beyond this is cut, so an error frame always fits.
MAX_ERROR_BYTES = 16 << 10

REQUEST, DATA, END, ERROR = 1, 2, 3, 4
_KIND_NAMES = {REQUEST: "REQUEST", DATA: "DATA", END: "END", ERROR: "ERROR"}
_HEADER = struct.Struct("!BI")
_SEQ = struct.Struct("!Q")
_U32 = struct.Struct("!I")
_DONE = object()  # end-of-handler sentinel (a handler may yield anything bytes-like, even falsy)


def _hmac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


class _Channel:
    """A connected, authenticated socket: sends and receives MAC-checked frames, one sequence per direction."""

    def __init__(self, sock: socket.socket, peer: str, session_key: bytes, timeout: float):
        self.sock = sock
        self.peer = peer
        self._timeout = timeout
        # Keyed once; each frame MAC starts from a copy, which skips re-deriving the HMAC pads.
        self._mac_base = hmac.new(session_key, digestmod=hashlib.sha256)
        self._send_seq = 0
        self._recv_seq = 0

    def _mac(self, seq: int, header: bytes, payload) -> bytes:
        mac = self._mac_base.copy()
        mac.update(_SEQ.pack(seq))
        mac.update(header)
        mac.update(payload)
        return mac.digest()

    def send_frame(self, kind: int, payload: bytes | memoryview = b"") -> int:
        """Send one frame; returns the bytes written to the socket."""
        header = _HEADER.pack(kind, len(payload))
        mac = self._mac(self._send_seq, header, payload)
        self._send_seq += 1
        self._io(_send_parts, self.sock, [header, payload, mac])
        return len(header) + len(payload) + len(mac)

    def recv_frame(self, kinds: tuple[int, ...], max_length: int) -> tuple[int, bytearray]:
        """Receive one frame of one of ``kinds`` with at most ``max_length`` payload bytes, MAC verified."""
        header = self._recv_exact(_HEADER.size)
        kind, length = _HEADER.unpack(header)
        if kind not in kinds or length > max_length:
            # Both fields are unauthenticated here; refusing before reading bounds what a forged header costs.
            raise IntegrityError(
                f"bad frame header from {self.peer}: kind {kind}, length {length} (expected kind in "
                f"{[_KIND_NAMES[k] for k in kinds]}, length <= {max_length}); the stream is corrupt or "
                "tampered with: check the network path and that both ends run the same protocol version"
            )
        payload = self._recv_exact(length)
        mac = self._recv_exact(MAC_BYTES)
        if not hmac.compare_digest(mac, self._mac(self._recv_seq, header, payload)):
            raise IntegrityError(
                f"frame {self._recv_seq} from {self.peer} failed its MAC check ({_KIND_NAMES[kind]}, "
                f"{length} bytes): corrupted, replayed or reordered in transit; retry the request and check "
                "the network path"
            )
        self._recv_seq += 1
        return kind, payload

    def _recv_exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        self._io(_recv_into, self.sock, memoryview(buf))
        return buf

    def _io(self, fn, *args) -> None:
        """Run a socket operation, turning socket failures into :class:`ConnectionLost` that name the peer."""
        try:
            fn(*args)
        except TimeoutError as exc:
            raise ConnectionLost(
                f"no progress with {self.peer} for {self._timeout:g}s; the peer is stuck or the network is "
                "down: retry, or raise the timeout for very slow links"
            ) from exc
        except EOFError as exc:
            raise ConnectionLost(
                f"{self.peer} closed the connection in the middle of a frame; the peer crashed or was "
                "stopped: retry once it is back"
            ) from exc
        except OSError as exc:
            raise ConnectionLost(f"connection to {self.peer} failed ({exc}); retry once it is back") from exc


def _send_parts(sock: socket.socket, parts: list) -> None:
    """``sendall`` for several buffers at once, without joining them (one syscall per frame, usually)."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        sent = sock.sendmsg(views)
        while sent:
            if sent >= len(views[0]):
                sent -= len(views.pop(0))
            else:
                views[0] = views[0][sent:]
                sent = 0


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    while view:
        n = sock.recv_into(view)
        if n == 0:
            raise EOFError
        view = view[n:]


def _recv_handshake(sock: socket.socket, n: int, peer: str) -> bytes:
    buf = bytearray(n)
    try:
        _recv_into(sock, memoryview(buf))
    except (EOFError, OSError) as exc:
        raise ConnectionLost(
            f"handshake with {peer} failed ({exc!r}); is a sparsetron sync endpoint listening there?"
        ) from exc
    return bytes(buf)


@dataclass(frozen=True)
class ConnectionStats:
    """Counters of one open connection."""

    peer: str
    requests: int
    bytes_sent: int


@dataclass(frozen=True)
class ServerStats:
    """A consistent snapshot of a server's counters (totals since start, plus the open connections)."""

    connections: int
    auth_failures: int
    requests: int
    bytes_sent: int
    active: tuple[ConnectionStats, ...]


class _ConnRecord:
    """Mutable counters of one connection; only touched under the server's lock."""

    def __init__(self, peer: str, sock: socket.socket):
        self.peer = peer
        self.sock = sock
        self.requests = 0
        self.bytes_sent = 0


class SyncServer:
    """Serves requests with ``handler`` (request dict -> iterable of byte chunks) to authenticated clients.

    One thread per connection, at most ``max_clients`` at once: further clients wait in the listen
    backlog until a slot frees (and time out on their side if none does). Binds to loopback unless the
    caller passes another ``host``.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        secret: bytes,
        host: str = "127.0.0.1",
        port: int = 0,
        frame_bytes: int = 4 << 20,
        max_clients: int = 64,
        timeout: float = 60.0,
    ):
        if not secret:
            raise ValueError("secret must be a non-empty byte string shared with the clients")
        if not 0 < frame_bytes < 1 << 32:
            raise ValueError(f"frame_bytes must be in [1, 2**32), got {frame_bytes}")
        self._handler = handler
        self._secret = bytes(secret)
        self._bind = (host, port)
        self._frame_bytes = frame_bytes
        self._timeout = timeout
        self._slots = threading.BoundedSemaphore(max_clients)
        self._lock = threading.Lock()
        self._conns: dict[int, _ConnRecord] = {}
        self._threads: set[threading.Thread] = set()
        self._totals = {"connections": 0, "auth_failures": 0, "requests": 0, "bytes_sent": 0}
        self._closing = threading.Event()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self.address: tuple[str, int] = ("", 0)

    def start(self) -> SyncServer:
        """Bind, listen and start accepting in a background thread; returns ``self``."""
        self._listener = socket.create_server(self._bind, backlog=128)
        # accept() wakes up this often to notice close(); closing the socket alone does not wake it.
        self._listener.settimeout(0.2)
        self.address = self._listener.getsockname()[:2]
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"sync-accept-{self.address[1]}", daemon=True
        )
        self._accept_thread.start()
        log.info("sync server listening on %s:%d", *self.address)
        return self

    def close(self) -> None:
        """Stop accepting, cut open connections (their handlers are closed) and wait for their threads."""
        self._closing.set()
        if self._accept_thread is not None:
            self._accept_thread.join()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            socks = [rec.sock for rec in self._conns.values()]
            threads = list(self._threads)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(timeout=self._timeout)

    def __enter__(self) -> SyncServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def stats(self) -> ServerStats:
        """A snapshot of the counters, taken under the server's lock."""
        with self._lock:
            active = tuple(ConnectionStats(r.peer, r.requests, r.bytes_sent) for r in self._conns.values())
            return ServerStats(**self._totals, active=active)

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            if not self._slots.acquire(timeout=0.2):
                continue
            try:
                sock, addr = self._listener.accept()
            except TimeoutError:
                self._slots.release()
                continue
            except OSError as exc:  # e.g. out of file descriptors: back off instead of spinning
                self._slots.release()
                log.warning("sync server on %s:%d: accept failed: %s", *self.address, exc)
                time.sleep(0.1)
                continue
            thread = threading.Thread(
                target=self._serve, args=(sock, f"{addr[0]}:{addr[1]}"), name="sync-conn", daemon=True
            )
            with self._lock:
                self._threads.add(thread)
            thread.start()

    def _serve(self, sock: socket.socket, peer: str) -> None:
        rec = _ConnRecord(peer, sock)
        with self._lock:
            self._conns[id(rec)] = rec
            self._totals["connections"] += 1
        try:
            sock.settimeout(self._timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            chan = self._handshake(sock, peer)
            while chan is not None and not self._closing.is_set():
                try:
                    _, body = chan.recv_frame((REQUEST,), MAX_REQUEST_BYTES)
                except ConnectionLost as exc:
                    # Between requests this is the normal end of a keep-alive connection (or an idle one).
                    log.debug("sync server: connection from %s ended: %s", peer, exc)
                    break
                self._respond(chan, rec, body)
        except SyncError as exc:
            if not self._closing.is_set():
                log.warning("sync server: connection from %s failed: %s", peer, exc)
        finally:
            sock.close()
            with self._lock:
                del self._conns[id(rec)]
                self._threads.discard(threading.current_thread())
            self._slots.release()

    def _handshake(self, sock: socket.socket, peer: str) -> _Channel | None:
        """Authenticate the client and prove ourselves; ``None`` (after logging) if its proof is wrong."""
        nonce_s = os.urandom(NONCE_BYTES)
        try:
            sock.sendall(MAGIC + nonce_s)
        except OSError as exc:
            raise ConnectionLost(f"handshake with {peer} failed ({exc!r})") from exc
        answer = _recv_handshake(sock, MAC_BYTES + NONCE_BYTES, peer)
        proof, nonce_c = answer[:MAC_BYTES], answer[MAC_BYTES:]
        if not hmac.compare_digest(proof, _hmac(self._secret, b"client", nonce_s)):
            log.warning(
                "sync server: rejected %s: wrong shared secret (check that trainer and rollout workers "
                "are configured with the same secret)",
                peer,
            )
            with self._lock:
                self._totals["auth_failures"] += 1
            with contextlib.suppress(OSError):
                sock.sendall(b"\x00")
            return None
        limit = _U32.pack(self._frame_bytes)
        try:
            sock.sendall(b"\x01" + _hmac(self._secret, b"server", nonce_c, limit) + limit)
        except OSError as exc:
            raise ConnectionLost(f"handshake with {peer} failed ({exc!r})") from exc
        return _Channel(sock, peer, _hmac(self._secret, nonce_s, nonce_c), self._timeout)

    def _respond(self, chan: _Channel, rec: _ConnRecord, body: bytearray) -> None:
        """Run the handler on one request and stream its chunks; handler failures become an ERROR frame.

        Only the handler's own failures are reported to the client; a failed send (a transport error)
        propagates, since nothing more can be said on this connection.
        """
        with self._lock:
            rec.requests += 1
            self._totals["requests"] += 1
        chunks = None
        try:
            try:
                request = json.loads(body)
                if not isinstance(request, dict):
                    raise ValueError(f"a request must be a JSON object, got {type(request).__name__}")
                chunks = iter(self._handler(request))
            except Exception as exc:
                self._send_error(chan, rec, exc)
                return
            while True:
                try:
                    chunk = next(chunks, _DONE)
                    view = None if chunk is _DONE else memoryview(chunk).cast("B")
                except Exception as exc:
                    self._send_error(chan, rec, exc)
                    return
                if view is None:
                    break
                for start in range(0, len(view), self._frame_bytes):
                    self._send(chan, rec, DATA, view[start : start + self._frame_bytes])
        finally:
            if chunks is not None and hasattr(chunks, "close"):
                chunks.close()  # lets a generator handler release what it holds when the client is gone
        self._send(chan, rec, END)

    def _send_error(self, chan: _Channel, rec: _ConnRecord, exc: Exception) -> None:
        log.error("sync server: handler failed on a request from %s", chan.peer, exc_info=exc)
        text = f"{type(exc).__name__}: {exc}".encode(errors="replace")
        self._send(chan, rec, ERROR, text[: min(MAX_ERROR_BYTES, self._frame_bytes)])

    def _send(self, chan: _Channel, rec: _ConnRecord, kind: int, payload: bytes | memoryview = b"") -> None:
        n = chan.send_frame(kind, payload)
        with self._lock:
            rec.bytes_sent += n
            self._totals["bytes_sent"] += n


class SyncClient:
    """Sends requests to a :class:`SyncServer` over one keep-alive connection (opened on first use).

    Requests are serialised by a lock, so one client may be shared by threads, but they take turns.
    """

    def __init__(self, host: str, port: int, *, secret: bytes, timeout: float = 60.0):
        if not secret:
            raise ValueError("secret must be a non-empty byte string shared with the server")
        self._addr = (host, port)
        self._peer = f"{host}:{port}"
        self._secret = bytes(secret)
        self._timeout = timeout
        self._lock = threading.Lock()
        self._chan: _Channel | None = None
        self._frame_bytes = 0

    def request(self, message: dict, sink: Sink | None = None) -> bytes | None:
        """Send ``message`` and receive the response.

        With ``sink``, each verified chunk (a ``bytearray`` of at most the server's ``frame_bytes``, which
        the sink may keep) is passed to it as it arrives and ``None`` is returned; on an error the sink may
        already have seen part of the response. Without, the whole response is returned.

        Raises:
            AuthenticationError: the server rejected our secret, or could not prove it knows it.
            ConnectionLost: cannot connect, the server vanished, or no progress for ``timeout`` seconds.
            IntegrityError: a frame failed its MAC or length check.
            RemoteError: the server's handler raised (the message is its exception text).
        """
        body = json.dumps(message).encode()
        if len(body) > MAX_REQUEST_BYTES:
            raise ValueError(f"request is {len(body)} bytes of JSON; at most {MAX_REQUEST_BYTES} are allowed")
        with self._lock:
            chan = self._connection()
            parts: list[bytearray] = []
            try:
                chan.send_frame(REQUEST, body)
                while True:
                    kind, payload = chan.recv_frame((DATA, END, ERROR), self._frame_bytes)
                    if kind == DATA:
                        if sink is None:
                            parts.append(payload)
                        else:
                            sink(payload)
                    elif kind == END:
                        return b"".join(parts) if sink is None else None
                    else:
                        raise RemoteError(
                            f"the server at {self._peer} failed on request {message!r}: "
                            f"{payload.decode(errors='replace')}; see the server's log"
                        )
            except RemoteError:
                raise  # the exchange completed cleanly, so the connection stays usable
            except BaseException:
                self._drop()  # mid-response: the stream cannot be resynchronised
                raise

    def close(self) -> None:
        """Close the connection (a later request reconnects)."""
        with self._lock:
            self._drop()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _drop(self) -> None:
        if self._chan is not None:
            self._chan.sock.close()
            self._chan = None

    def _connection(self) -> _Channel:
        if self._chan is not None:
            # A keep-alive socket with something to read between exchanges was closed by the server (idle
            # timeout, shutdown): reconnect rather than fail the request on it.
            readable, _, _ = select.select([self._chan.sock], [], [], 0)
            if readable:
                self._drop()
        if self._chan is None:
            self._chan = self._connect()
        return self._chan

    def _connect(self) -> _Channel:
        try:
            sock = socket.create_connection(self._addr, timeout=self._timeout)
        except OSError as exc:
            raise ConnectionLost(
                f"cannot connect to the sync server at {self._peer} ({exc}); is it running and reachable?"
            ) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hello = _recv_handshake(sock, len(MAGIC) + NONCE_BYTES, self._peer)
            if hello[: len(MAGIC)] != MAGIC:
                raise ConnectionLost(
                    f"{self._peer} is not a sparsetron sync server (greeting {hello[:8]!r}); check the port"
                )
            nonce_s, nonce_c = hello[len(MAGIC) :], os.urandom(NONCE_BYTES)
            try:
                sock.sendall(_hmac(self._secret, b"client", nonce_s) + nonce_c)
            except OSError as exc:
                raise ConnectionLost(f"handshake with {self._peer} failed ({exc!r})") from exc
            status = _recv_handshake(sock, 1, self._peer)
            if status != b"\x01":
                raise AuthenticationError(
                    f"the sync server at {self._peer} rejected our shared secret; configure the client "
                    "with the secret the server was started with"
                )
            answer = _recv_handshake(sock, MAC_BYTES + _U32.size, self._peer)
            proof, limit = answer[:MAC_BYTES], answer[MAC_BYTES:]
            if not hmac.compare_digest(proof, _hmac(self._secret, b"server", nonce_c, limit)):
                raise AuthenticationError(
                    f"the server at {self._peer} could not prove it knows the shared secret: it is "
                    "misconfigured or an impostor; check the address and the secret"
                )
        except BaseException:
            sock.close()
            raise
        (self._frame_bytes,) = _U32.unpack(limit)
        return _Channel(sock, self._peer, _hmac(self._secret, nonce_s, nonce_c), self._timeout)
