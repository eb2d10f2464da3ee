"""The outer step of DiLoCo and SparseLoCo across data-parallel replicas (``dp_replicate``).

Every replica trains ``H`` inner steps from the same global parameters ``θ``, then the outer step forms the
pseudo-gradient ``Δ = θ − θ_local`` per tensor, combines the replicas' ``Δ`` and moves ``θ`` with an outer SGD:

- **DiLoCo**: ``Δ`` all-reduced (mean over replicas, fp32), outer SGD with Nesterov momentum (lr 0.7, μ 0.9).
- **SparseLoCo**: each replica compresses ``Δ`` with error feedback (:mod:`.compress`); the compressed
  tensors are all-gathered and every replica decodes and averages them in replica order, so all replicas
  compute bit-identical updates; outer SGD without momentum (lr 1.0). Tensors with fewer elements than
  ``dense_below`` are sent dense (fp32) and counted.

Each rank works on its own shard: with FSDP the parameters are DTensors sharded inside a replica and the
replicas exchange matching shards over the ``dp_replicate`` group. Nothing else communicates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from sparsetron.parallel.data.compress import CompressedChunks, ErrorFeedback, dequantize, from_chunks


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@dataclass
class OuterStats:
    """Bytes this rank sent in the last outer step, and the same step's dense fp32/bf16 all-reduce sizes."""

    sent_bytes: int = 0
    dense_fp32_bytes: int = 0
    dense_bf16_bytes: int = 0
    dense_tensors: int = 0
    per_tensor: dict[str, int] = field(default_factory=dict)


class OuterStep:
    """Holds the global parameters ``θ`` (fp32 copies of this rank's shards) and applies outer steps.

    ``algorithm``: ``diloco`` or ``sparseloco``. ``group``: the ``dp_replicate`` process group (None: one
    replica). :meth:`step` must be called by every rank of every replica at the same inner step.
    """

    def __init__(
        self,
        named_params: list[tuple[str, torch.nn.Parameter]],
        algorithm: str,
        group=None,
        *,
        lr: float | None = None,
        momentum: float | None = None,
        chunk: int = 4096,
        topk: int = 64,
        bits: int = 2,
        error_decay: float = 0.95,
        dense_below: int = 4096,
    ) -> None:
        if algorithm not in ("diloco", "sparseloco"):
            raise ValueError(
                f"outer algorithm {algorithm!r} must be diloco or sparseloco (train.dp.algorithm)."
            )
        self.algorithm = algorithm
        self.group = group
        self.replicas = dist.get_world_size(group) if group is not None else 1
        sparse = algorithm == "sparseloco"
        self.lr = lr if lr is not None else (1.0 if sparse else 0.7)
        self.momentum = momentum if momentum is not None else (0.0 if sparse else 0.9)
        self.dense_below = dense_below
        self.params = named_params
        self.global_params = {name: _local(p).detach().float().clone() for name, p in named_params}
        self.velocity = {name: torch.zeros_like(t) for name, t in self.global_params.items()}
        self.compressor = (
            ErrorFeedback(chunk=chunk, topk=topk, bits=bits, decay=error_decay) if sparse else None
        )
        self.stats = OuterStats()

    @torch.no_grad()
    def step(self) -> OuterStats:
        """One outer step: combine pseudo-gradients over replicas, update ``θ``, reset every replica to it."""
        self.stats = OuterStats()
        for name, param in self.params:
            local = _local(param)
            delta = self.global_params[name] - local.float()
            combined = self._combine(name, delta)
            self._apply(name, combined)
            local.copy_(self.global_params[name].to(local.dtype))
        return self.stats

    def _combine(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        nbytes = delta.numel() * 4
        self.stats.dense_fp32_bytes += nbytes
        self.stats.dense_bf16_bytes += nbytes // 2
        if self.compressor is None or delta.numel() < self.dense_below:
            if self.compressor is not None:
                self.stats.dense_tensors += 1
            return self._mean_dense(name, delta)
        sent = self.compressor.compress(name, delta)
        return self._mean_sparse(name, sent)

    def _mean_dense(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return delta
        total = delta.clone()
        dist.all_reduce(total, group=self.group)
        # A ring all-reduce sends 2·(R−1)/R of the tensor per rank.
        self._count(name, int(2 * delta.numel() * 4 * (self.replicas - 1) / self.replicas))
        return total / self.replicas

    def _mean_sparse(self, name: str, sent: CompressedChunks) -> torch.Tensor:
        index_dtype = torch.int16 if sent.chunking.chunk <= 1 << 15 else torch.int32
        pieces = [sent.indices_NK.to(index_dtype), sent.codes_NK, sent.codebook]
        if self.group is None:
            gathered = [pieces]
        else:
            # One byte buffer per replica (gloo has no int16): indices, codes, codebook back to back.
            payload = torch.cat([p.contiguous().view(-1).view(torch.uint8) for p in pieces])
            buffers = [torch.empty_like(payload) for _ in range(self.replicas)]
            dist.all_gather(buffers, payload, group=self.group)
            self._count(name, payload.numel() * (self.replicas - 1))
            gathered = [_split_like(buffer, pieces) for buffer in buffers]
        chunking = sent.chunking
        total_NC = torch.zeros(
            chunking.num_chunks, chunking.chunk, dtype=torch.float32, device=sent.codes_NK.device
        )
        # Fixed replica order and a scatter-add per replica: every replica sums identically.
        for indices, codes, codebook in gathered:
            rows = torch.zeros_like(total_NC).scatter_(1, indices.long(), dequantize(codes, codebook))
            total_NC += rows
        return from_chunks(total_NC / self.replicas, chunking)

    def _count(self, name: str, nbytes: int) -> None:
        self.stats.sent_bytes += nbytes
        self.stats.per_tensor[name] = nbytes

    def _apply(self, name: str, gradient: torch.Tensor) -> None:
        theta = self.global_params[name]
        if self.momentum:
            velocity = self.velocity[name]
            velocity.mul_(self.momentum).add_(gradient)
            gradient = gradient + self.momentum * velocity  # Nesterov
        theta.sub_(self.lr * gradient)


def _split_like(buffer: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Cut a byte buffer back into tensors shaped and typed like ``like`` (the sender's layout)."""
    out, offset = [], 0
    for t in like:
        nbytes = t.numel() * t.element_size()
        out.append(buffer[offset : offset + nbytes].view(t.dtype).view(t.shape))
        offset += nbytes
    return out
