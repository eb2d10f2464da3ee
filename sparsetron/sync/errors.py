"""Exception types shared by the weight-sync transports (TCP, shared memory)."""

from __future__ import annotations


class SyncError(RuntimeError):
    """Base class of every weight-sync transport failure."""


class AuthenticationError(SyncError):
    """The peers do not share the same secret (raised on whichever side detects it)."""


class ConnectionLost(SyncError):
    """The peer vanished, the stream ended early, or nothing arrived within the timeout."""


class IntegrityError(SyncError):
    """A frame's MAC, length or kind is wrong: the stream was tampered with or corrupted."""


class RemoteError(SyncError):
    """The server's handler raised; the message carries its exception text."""
