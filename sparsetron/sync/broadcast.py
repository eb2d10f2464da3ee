"""Ship one byte payload to every rank of a process group: the in-cluster weight-sync path."""

from __future__ import annotations

import torch
import torch.distributed as dist


def broadcast_bytes(
    payload: bytes | bytearray | memoryview | None,
    src: int,
    group: dist.ProcessGroup | None = None,
    device: torch.device | None = None,
) -> bytes:
    """Broadcast ``payload`` from rank ``src`` to every rank of ``group``; every rank returns the bytes.

    Collective over ``group`` (the default world group when None); every rank of it must call. ``src`` is a
    global rank, as in :func:`torch.distributed.broadcast`; it passes the payload, the others pass None.
    Two broadcasts: the length as an int64 tensor of shape ``(1,)``, then (unless it is 0) the payload as
    a uint8 tensor of shape ``(length,)``. Both live on ``device``: it defaults to the current CUDA device
    for an NCCL group and to the CPU otherwise (gloo), so pass it only to override that.
    """
    if device is None:
        nccl = dist.get_backend(group) == dist.Backend.NCCL
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    is_src = dist.get_rank() == src
    if is_src and payload is None:
        raise ValueError(f"rank {src} is the source of broadcast_bytes and must pass the payload")
    length = torch.tensor(
        [len(memoryview(payload).cast("B")) if is_src else 0], dtype=torch.int64, device=device
    )
    dist.broadcast(length, src, group=group)
    n = int(length.item())
    if n == 0:
        return b""
    if is_src:
        view = memoryview(payload).cast("B")
        # torch.frombuffer warns on read-only buffers (bytes): copy those once, share writable ones as is.
        data = torch.frombuffer(view if not view.readonly else bytearray(view), dtype=torch.uint8).to(device)
    else:
        data = torch.empty(n, dtype=torch.uint8, device=device)
    dist.broadcast(data, src, group=group)
    if is_src:
        return payload if isinstance(payload, bytes) else bytes(view)
    return data.cpu().numpy().tobytes()
