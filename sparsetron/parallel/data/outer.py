"""The outer step of DiLoCo and SparseLoCo across data-parallel replicas (``dp_replicate``).

Every replica trains ``H`` inner steps from the same global parameters ``θ``, then the outer step forms the
pseudo-gradient ``Δ = θ − θ_local`` per tensor, combines the replicas' ``Δ`` and moves ``θ`` with an outer SGD:

- **DiLoCo**: ``Δ`` all-reduced (mean over replicas, fp32, one flat buffer), outer SGD with Nesterov momentum
  (lr 0.7, μ 0.9).
- **SparseLoCo**: each replica compresses ``Δ`` with error feedback (:mod:`.compress`) and encodes all its
  tensors into one wire payload (:mod:`.wire`: packed or Rice-coded indices, packed codes, CRCs); payloads
  are all-gathered and every replica decodes them and sums them in replica order, so all replicas compute
  bit-identical updates; outer SGD without momentum (lr 1.0). Tensors with fewer than ``dense_below``
  elements travel dense (fp32) and are counted.

With ``overlap`` the exchange of phase ``t``'s pseudo-gradients runs in the background during phase ``t+1``
(one-phase-delayed application, as in Streaming DiLoCo's overlapped / eager outer updates): at the boundary
after phase ``t+1`` the replicas wait for it, apply it to ``θ`` (identically everywhere), start phase ``t+1``'s
exchange, and continue from ``θ`` plus their own latest progress. :meth:`OuterStep.finish` drains the pipeline
with one synchronous exchange, so every replica ends on the same ``θ``.

Each rank works on its own shard: with FSDP the parameters are DTensors sharded inside a replica and the
replicas exchange matching shards over the ``dp_replicate`` group. Nothing else communicates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from sparsetron.parallel.data import wire
from sparsetron.parallel.data.compress import CompressedChunks, ErrorFeedback, from_chunks

# torch 2.13 renames all_gather_into_tensor to all_gather_single (the old name warns); 2.11 has the old name only.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

#: Overlap state: whether a combined pseudo-gradient is waiting to be applied (saved in checkpoints).
PENDING_FLAG = "pending_valid"


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@dataclass
class OuterStats:
    """What this rank's replica exchanged in the last outer step.

    ``payload_bytes``: the encoded pseudo-gradient this rank contributes (its upload, once);
    ``sent_bytes`` / ``received_bytes``: what the collective actually moved for this rank (ring all-gather:
    ``R − 1`` padded payloads each way; ring all-reduce: ``2(R−1)/R`` of the buffer each way);
    ``dense_fp32_bytes`` / ``dense_bf16_bytes``: the same tensors dense, for the compression ratio;
    ``wait_s``: time blocked on the network (collective waits).
    """

    payload_bytes: int = 0
    sent_bytes: int = 0
    received_bytes: int = 0
    dense_fp32_bytes: int = 0
    dense_bf16_bytes: int = 0
    dense_tensors: int = 0
    compressed_tensors: int = 0
    wait_s: float = 0.0
    encode_s: float = 0.0
    decode_s: float = 0.0
    per_tensor: dict[str, int] = field(default_factory=dict)

    @property
    def ratio_vs_fp32(self) -> float:
        return self.dense_fp32_bytes / self.payload_bytes if self.payload_bytes else float("inf")

    @property
    def ratio_vs_bf16(self) -> float:
        return self.dense_bf16_bytes / self.payload_bytes if self.payload_bytes else float("inf")


class _Exchange:
    """An in-flight combination of pseudo-gradients; :meth:`wait` returns the replica mean per tensor."""

    def __init__(self, finish, works=()):
        self._finish = finish
        self._works = list(works)

    def wait(self, stats: OuterStats) -> dict[str, torch.Tensor]:
        started = time.perf_counter()
        for work in self._works:
            work.wait()
        stats.wait_s += time.perf_counter() - started
        return self._finish()


class OuterStep:
    """Holds the global parameters ``θ`` (fp32 copies of this rank's shards) and applies outer steps.

    ``algorithm``: ``diloco`` or ``sparseloco``. ``group``: the ``dp_replicate`` process group (None: one
    replica). :meth:`step` (and at the end :meth:`finish`) must be called by every rank of every replica at
    the same inner step. ``bits`` 16 / 32 send the selected values as bf16 / fp32 (no codebook).
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
        index_coding: str = "packed12",
        overlap: bool = False,
    ) -> None:
        if algorithm not in ("diloco", "sparseloco"):
            raise ValueError(
                f"outer algorithm {algorithm!r} must be diloco or sparseloco (train.dp.algorithm)."
            )
        if index_coding not in wire.INDEX_CODINGS:
            raise ValueError(
                f"index coding {index_coding!r} must be one of {wire.INDEX_CODINGS} (train.dp.index_coding)."
            )
        self.algorithm = algorithm
        self.group = group
        self.replicas = dist.get_world_size(group) if group is not None else 1
        sparse = algorithm == "sparseloco"
        self.lr = lr if lr is not None else (1.0 if sparse else 0.7)
        self.momentum = momentum if momentum is not None else (0.0 if sparse else 0.9)
        self.dense_below = dense_below
        self.index_coding = index_coding
        self.overlap = overlap
        self.params = named_params
        self._param_by_name = dict(named_params)
        self.global_params = {name: _local(p).detach().float().clone() for name, p in named_params}
        self.velocity = (
            {name: torch.zeros_like(t) for name, t in self.global_params.items()} if self.momentum else {}
        )
        # With overlap each replica's phase starts from θ plus its own last progress, not from θ.
        self.start = {name: t.clone() for name, t in self.global_params.items()} if overlap else {}
        self.compressor = (
            ErrorFeedback(chunk=chunk, topk=topk, bits=bits, decay=error_decay) if sparse else None
        )
        if self.compressor is not None:
            for name, theta in self.global_params.items():
                if self._compressed(theta):
                    self.compressor.buffer(name, theta)
        self._pending: _Exchange | None = None
        self._pending_combined: dict[str, torch.Tensor] | None = None
        self.stats = OuterStats()

    def _compressed(self, t: torch.Tensor) -> bool:
        return self.compressor is not None and t.numel() >= self.dense_below

    @torch.no_grad()
    def step(self) -> OuterStats:
        """One outer step (see the module docstring); returns what this rank exchanged."""
        self.stats = OuterStats()
        if not self.overlap:
            combined = self._start(self._deltas(self.global_params)).wait(self.stats)
            self._apply(combined)
            self._reset_locals()
            return self.stats
        deltas = self._deltas(self.start)
        previous = self._take_pending()
        if previous is not None:
            self._apply(previous)
        self._pending = self._start(deltas)
        for name, param in self.params:
            # Rebase this replica's latest progress onto the new θ: its own Δ stands in for the replicas'
            # mean until the exchange lands one phase later.
            local = _local(param)
            new_start = self.global_params[name] - deltas[name]
            self.start[name] = new_start
            local.copy_(new_start.to(local.dtype))
        return self.stats

    @torch.no_grad()
    def finish(self) -> OuterStats:
        """Synchronise now: apply anything in flight and the progress since the last step; every replica then
        holds the same ``θ``. Call at the end of training (or before evaluation of the global model)."""
        if not self.overlap:
            return self.step()
        self.stats = OuterStats()
        deltas = self._deltas(self.start)
        previous = self._take_pending()
        if previous is not None:
            self._apply(previous)
        self._apply(self._start(deltas).wait(self.stats))
        self._reset_locals()
        self.start = {name: t.clone() for name, t in self.global_params.items()}
        return self.stats

    def _take_pending(self) -> dict[str, torch.Tensor] | None:
        if self._pending_combined is not None:
            combined, self._pending_combined = self._pending_combined, None
            return combined
        if self._pending is None:
            return None
        combined = self._pending.wait(self.stats)
        self._pending = None
        return combined

    def _deltas(self, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: reference[name] - _local(param).float() for name, param in self.params}

    def _reset_locals(self) -> None:
        for name, param in self.params:
            local = _local(param)
            local.copy_(self.global_params[name].to(local.dtype))

    def _start(self, deltas: dict[str, torch.Tensor]) -> _Exchange:
        for delta in deltas.values():
            self.stats.dense_fp32_bytes += delta.numel() * 4
            self.stats.dense_bf16_bytes += delta.numel() * 2
        if self.compressor is None:
            return self._start_dense(deltas)
        return self._start_sparse(deltas)

    def _start_dense(self, deltas: dict[str, torch.Tensor]) -> _Exchange:
        """DiLoCo: one flat fp32 all-reduce of every pseudo-gradient, averaged over replicas."""
        names = list(deltas)
        flat = torch.cat([deltas[n].reshape(-1) for n in names]) if names else torch.zeros(0)
        self.stats.payload_bytes += flat.numel() * 4
        works = []
        if self.group is not None and self.replicas > 1:
            works.append(dist.all_reduce(flat, group=self.group, async_op=True))
            ring = int(2 * flat.numel() * 4 * (self.replicas - 1) / self.replicas)
            self.stats.sent_bytes += ring
            self.stats.received_bytes += ring

        def finish() -> dict[str, torch.Tensor]:
            mean = flat / self.replicas
            out, offset = {}, 0
            for n in names:
                size = deltas[n].numel()
                out[n] = mean[offset : offset + size].view(deltas[n].shape)
                offset += size
            return out

        return _Exchange(finish, works)

    def _start_sparse(self, deltas: dict[str, torch.Tensor]) -> _Exchange:
        """SparseLoCo: compress with error feedback, encode one payload, all-gather payloads over replicas."""
        started = time.perf_counter()
        items: list[wire.CompressedTensor | wire.DenseTensor] = []
        sent = self.compressor.compress_many({n: d for n, d in deltas.items() if self._compressed(d)})
        for name, delta in deltas.items():
            if name in sent:
                chunks = sent[name]
                items.append(
                    wire.CompressedTensor(
                        name=name, shape=tuple(delta.shape), chunk=chunks.chunking.chunk,
                        indices_NK=chunks.indices_NK, codes_NK=chunks.codes_NK, codebook=chunks.codebook,
                        bits=chunks.bits,
                    )
                )  # fmt: skip
                self.stats.compressed_tensors += 1
            else:
                items.append(wire.DenseTensor(name=name, values=delta))
                self.stats.dense_tensors += 1
        payload = wire.encode(items, index_coding=self.index_coding)
        self.stats.encode_s += time.perf_counter() - started
        self.stats.payload_bytes += len(payload)
        device = next(iter(deltas.values())).device if deltas else torch.device("cpu")
        buffers, works = [payload], []
        if self.group is not None and self.replicas > 1:
            buffers, works = self._all_gather_bytes(payload, device)

        def finish() -> dict[str, torch.Tensor]:
            decode_started = time.perf_counter()
            combined = self._sum_payloads(buffers, deltas, sent)
            self.stats.decode_s += time.perf_counter() - decode_started
            return {name: total / self.replicas for name, total in combined.items()}

        return _Exchange(finish, works)

    def _all_gather_bytes(self, payload: bytes, device: torch.device) -> tuple[list, list]:
        """Start the all-gather of every replica's payload (lengths first, synchronously, then the bytes)."""
        lengths = torch.zeros(self.replicas, dtype=torch.int64, device=device)
        mine = torch.tensor([len(payload)], dtype=torch.int64, device=device)
        started = time.perf_counter()
        _all_gather_single(lengths, mine, group=self.group)
        self.stats.wait_s += time.perf_counter() - started
        lengths = lengths.tolist()
        padded = max(lengths)
        buffer = torch.zeros(padded, dtype=torch.uint8, device=device)
        buffer[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
        gathered = torch.empty(self.replicas * padded, dtype=torch.uint8, device=device)
        work = _all_gather_single(gathered, buffer, group=self.group, async_op=True)
        moved = (padded + 8) * (self.replicas - 1)
        self.stats.sent_bytes += moved
        self.stats.received_bytes += moved
        views = [(gathered, r * padded, n) for r, n in enumerate(lengths)]
        return views, [work]

    def _sum_payloads(
        self, buffers: list, deltas: dict[str, torch.Tensor], sent: dict[str, CompressedChunks]
    ) -> dict[str, torch.Tensor]:
        """Decode every replica's payload and sum them in replica order (bit-identical on every replica)."""
        totals: dict[str, torch.Tensor] = {}
        for replica, buffer in enumerate(buffers):
            if isinstance(buffer, bytes):
                payload = buffer
            else:
                gathered, offset, length = buffer
                payload = gathered[offset : offset + length].cpu().numpy().tobytes()
            items = wire.decode(payload)
            self._check_items(replica, items, deltas, sent)
            for item in items:
                delta = deltas[item.name]
                if isinstance(item, wire.DenseTensor):
                    values = item.values.to(device=delta.device, dtype=torch.float32)
                    totals[item.name] = values if item.name not in totals else totals[item.name] + values
                    continue
                chunking = sent[item.name].chunking
                if item.name not in totals:
                    totals[item.name] = torch.zeros(
                        chunking.num_chunks, chunking.chunk, dtype=torch.float32, device=delta.device
                    )
                values = CompressedChunks(chunking, item.indices_NK, item.codes_NK, item.codebook, item.bits)
                # Indices are distinct within a row, so each position gets one add per replica, in order.
                totals[item.name].scatter_add_(
                    1, item.indices_NK.to(delta.device), values.values_NK().to(delta.device)
                )
        return {
            name: from_chunks(total, sent[name].chunking) if name in sent else total
            for name, total in totals.items()
        }

    @staticmethod
    def _check_items(replica: int, items: list, deltas: dict[str, torch.Tensor], sent: dict) -> None:
        """A replica's payload must carry exactly our tensors, shapes and compression settings."""
        names = [item.name for item in items]
        if names != list(deltas):
            raise wire.WireFormatError(
                f"replica {replica} sent tensors {names[:4]}… but this replica has {list(deltas)[:4]}…; every "
                "replica must run the same model, layout and train.dp settings"
            )
        for item in items:
            ours = sent.get(item.name)
            compressed = isinstance(item, wire.CompressedTensor)
            mismatch = (compressed != (ours is not None)) or (
                compressed
                and (
                    tuple(item.shape) != ours.chunking.shape
                    or item.chunk != ours.chunking.chunk
                    or item.bits != ours.bits
                    or tuple(item.indices_NK.shape) != tuple(ours.indices_NK.shape)
                )
            )
            if not compressed and tuple(item.values.shape) != tuple(deltas[item.name].shape):
                mismatch = True
            if mismatch:
                raise wire.WireFormatError(
                    f"replica {replica} sent tensor {item.name!r} with other shape or compression settings "
                    "than this replica; every replica must use the same train.dp settings and layout"
                )

    def _apply(self, gradient_by_name: dict[str, torch.Tensor]) -> None:
        for name, gradient in gradient_by_name.items():
            theta = self.global_params[name]
            if self.momentum:
                velocity = self.velocity[name]
                velocity.mul_(self.momentum).add_(gradient)
                gradient = gradient + self.momentum * velocity  # Nesterov
            theta.sub_(self.lr * gradient)

    # -- checkpoint state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Outer state in the parameters' own layout (DTensors like the parameters when they are DTensors).

        Keys: ``global.<name>`` (θ), ``velocity.<name>`` (with momentum), ``start.<name>`` and
        ``pending.<name>`` + :data:`PENDING_FLAG` (with overlap; an in-flight exchange is completed first),
        ``error.<name>`` (SparseLoCo error buffers of compressed tensors).
        """
        state: dict[str, torch.Tensor] = {}
        for name, _ in self.params:
            state[f"global.{name}"] = self._like_param(name, self.global_params[name])
            if self.momentum:
                state[f"velocity.{name}"] = self._like_param(name, self.velocity[name])
        if self.overlap:
            if self._pending is not None:
                self._pending_combined = self._take_pending()
            pending = self._pending_combined
            state[PENDING_FLAG] = torch.tensor(float(pending is not None))
            for name, _ in self.params:
                state[f"start.{name}"] = self._like_param(name, self.start[name])
                value = pending[name] if pending is not None else torch.zeros_like(self.global_params[name])
                state[f"pending.{name}"] = self._like_param(name, value)
        if self.compressor is not None:
            for name, error in self.compressor.state_dict().items():
                state[f"error.{name}"] = self._like_param(name, error)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`state_dict`'s keys (tensors or DTensors of this layout, e.g. filled by DCP)."""
        missing = sorted(set(self.state_dict_keys()) - set(state))
        if missing:
            raise KeyError(f"outer state lacks {missing[:5]}; it was saved with other train.dp settings")
        for name, _ in self.params:
            self.global_params[name] = _local(state[f"global.{name}"]).float().clone()
            if self.momentum:
                self.velocity[name] = _local(state[f"velocity.{name}"]).float().clone()
        if self.overlap:
            self.start = {name: _local(state[f"start.{name}"]).float().clone() for name, _ in self.params}
            self._pending = None
            self._pending_combined = None
            if float(state[PENDING_FLAG]):
                self._pending_combined = {
                    name: _local(state[f"pending.{name}"]).float().clone() for name, _ in self.params
                }
        if self.compressor is not None:
            self.compressor.load_state_dict(
                {key[len("error.") :]: _local(t) for key, t in state.items() if key.startswith("error.")}
            )

    def state_dict_keys(self) -> list[str]:
        keys = [f"global.{name}" for name, _ in self.params]
        if self.momentum:
            keys += [f"velocity.{name}" for name, _ in self.params]
        if self.overlap:
            keys += [
                PENDING_FLAG,
                *(f"{kind}.{name}" for kind in ("start", "pending") for name, _ in self.params),
            ]
        if self.compressor is not None:
            keys += [f"error.{name}" for name in self.compressor.errors]
        return keys

    def _like_param(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """``local`` (this rank's shard of parameter ``name``) as a DTensor placed like the parameter."""
        param = self._param_by_name[name]
        if not hasattr(param, "device_mesh"):
            return local
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
        )
