"""Publishing from inside ``sparsetron train``: rank 0 serves versions of the weights while training.

Every ``sync.every`` optimizer steps (and after the last) every rank takes part in gathering the full
parameters and buffers (``DTensor.full_tensor``: all-gathers over each parameter's own mesh, in the same order
on every rank); rank 0 copies them into its publishing copy and publishes the next version through a
:class:`~sparsetron.sync.publisher.DeltaPublisher` served by a :class:`~sparsetron.sync.tcp.SyncServer`.
Rank 0 holds two full copies of the model on its device (the current one and the tracker's published bits);
for models that do not fit, serve from checkpoints with ``sparsetron sync serve``.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from sparsetron.config import SyncConfig
from sparsetron.sync.publisher import DeltaPublisher, PublishReport
from sparsetron.sync.tcp import SyncServer, load_secret


@torch.no_grad()
def gather_full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Name → full tensor of every parameter and buffer; collective (DTensors are all-gathered on their mesh)."""
    state = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        state[name] = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.detach()
    return state


class LivePublisher:
    """Serves the training model's weights as versions from rank 0; :meth:`after_step` on every rank."""

    def __init__(self, model: torch.nn.Module, cfg: SyncConfig, log) -> None:
        if cfg.every < 1:
            raise ValueError(f"sync.every={cfg.every} must be ≥ 1 (optimizer steps between versions)")
        self.model, self.cfg, self.log = model, cfg, log
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.secret = load_secret()  # before any training step: a missing secret fails at once
        self.publisher: DeltaPublisher | None = None
        self.server = None

    def after_step(self, step: int, is_last: bool) -> PublishReport | None:
        """Collective: publish after optimizer step ``step`` (1-based) when due; rank 0 returns the report."""
        if not is_last and step % self.cfg.every:
            return None
        state = gather_full_state(self.model)
        if self.rank != 0:
            return None
        if self.publisher is None:
            self._start({name: t.clone() for name, t in state.items()}, step)
            return None
        for name, tensor in state.items():
            self.publisher.tensors[name].copy_(tensor)
        return self.publisher.publish()

    def _start(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        self.publisher = DeltaPublisher(tensors, keep=self.cfg.keep)
        self.server = SyncServer(
            self.publisher.handler, secret=self.secret, host=self.cfg.host, port=self.cfg.port
        )
        self.server.start()
        host, port = self.server.address
        self.log(f"weight sync: serving the weights after step {step} as version 0 on {host}:{port}")

    def close(self, linger_s: float = 0.0) -> None:
        """Stop serving (rank 0), after ``linger_s`` seconds so rollout workers can fetch the last version."""
        if self.server is not None:
            if linger_s > 0:
                self.log(f"weight sync: serving the final version for {linger_s:.0f} s more")
                time.sleep(linger_s)
            self.server.close()
            self.server = None
