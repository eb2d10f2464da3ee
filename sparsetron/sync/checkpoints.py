"""Model tensors of sparsetron checkpoints and safetensors directories, for publishing and pulling.

:func:`read_checkpoint_model` reads a DCP checkpoint's model tensors whole into host memory without a
process group (DiLoCo/SparseLoCo checkpoints: replica 0's weights, identical to every replica's at an outer
step). :class:`SafetensorsDir` holds a subscriber's tensors in ``model.safetensors`` plus ``sync_state.json``
(version, publisher, per-tensor digests), both replaced atomically (temp file + rename) after each apply.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

MODEL_PREFIXES = ("model.", "replica-00000.model.")
STATE_NAME = "sync_state.json"
WEIGHTS_NAME = "model.safetensors"


def read_checkpoint_model(path: str | Path) -> dict[str, torch.Tensor]:
    """Name (without the ``model.`` prefix) → full CPU tensor of every model tensor in checkpoint ``path``."""
    path = Path(path)
    metadata = dcp.FileSystemReader(path).read_metadata()
    for prefix in MODEL_PREFIXES:
        keys = {k: v for k, v in metadata.state_dict_metadata.items() if k.startswith(prefix)}
        if keys:
            break
    else:
        raise ValueError(f"checkpoint {path} holds no model tensors (keys starting with {MODEL_PREFIXES})")
    state = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in keys.items()}
    dcp.load(state, storage_reader=dcp.FileSystemReader(path), no_dist=True)
    return {k[len(prefix) :]: v for k, v in state.items()}


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete ``step-*`` checkpoint under ``directory`` (one with a manifest), or None."""
    found = sorted(p for p in Path(directory).glob("step-*") if (p / "manifest.json").is_file())
    return found[-1] if found else None


class SafetensorsDir:
    """A subscriber's weights on disk: ``DIR/model.safetensors`` and ``DIR/sync_state.json``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def load(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The tensors and sync state held (empty dict and {} for a fresh directory)."""
        weights, state = self.directory / WEIGHTS_NAME, self.directory / STATE_NAME
        if not weights.exists() or not state.exists():
            return {}, {}
        return {k: v.contiguous() for k, v in load_file(weights).items()}, json.loads(state.read_text())

    def save(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """Write both files atomically: a reader sees the old pair or the new one, never a mix of tensors."""
        self.directory.mkdir(parents=True, exist_ok=True)
        weights_tmp = self.directory / f".{WEIGHTS_NAME}.tmp"
        state_tmp = self.directory / f".{STATE_NAME}.tmp"
        save_file(tensors, weights_tmp, metadata={"sync_version": str(state.get("version"))})
        state_tmp.write_text(json.dumps(state))
        for tmp in (weights_tmp, state_tmp):
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        # The state names the version; it is renamed last, so a crash between leaves old state + new
        # weights, which the next pull detects (digests) and repairs by re-anchoring.
        os.replace(weights_tmp, self.directory / WEIGHTS_NAME)
        os.replace(state_tmp, self.directory / STATE_NAME)
