"""The neutral form every checkpoint format converts through: global tensors under sparsetron's names.

A checkpoint in neutral form is the model's :class:`~sparsetron.config.ModelConfig` plus its tensors,
unsharded, keyed exactly like ``sparsetron.model.Transformer(cfg).state_dict()`` (experts stacked on a global
expert axis: ``layers.{i}.moe.experts.w_gate_up`` ``[E, D, 2F]``, ``w_down`` ``[E, F, D]``), and streamed as
:class:`TensorGroup` s in a fixed order: ``embed``, then ``layers.0`` … ``layers.{n-1}``, then ``head`` (final
norm and the untied LM head). A :class:`Reader` yields groups one at a time and a :class:`Writer` consumes them,
so a conversion holds about one group in memory; :func:`bounded` enforces ``--max-memory`` on every group.

Hashes are SHA-256 over a tensor's dtype, shape and bytes (:func:`tensor_hash`), so equal hashes mean equal
bits.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from sparsetron.config import ModelConfig

#: Bumped whenever a format's name mapping changes; recorded in every output's manifest.
MAPPING_VERSION = 1


class ConversionError(ValueError):
    """A checkpoint that cannot be converted: names the file and key, the rule, and the fix."""


@dataclass
class TensorGroup:
    """One streamed unit of a checkpoint: ``name`` (``embed``, ``layers.<i>`` or ``head``) and its tensors."""

    name: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes the group's tensors hold."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def group_names(cfg: ModelConfig) -> list[str]:
    """The groups of a model, in streaming order."""
    return ["embed", *(f"layers.{i}" for i in range(cfg.n_layers)), "head"]


def group_of(key: str) -> str:
    """The group a canonical tensor name belongs to."""
    if key.startswith("layers."):
        return ".".join(key.split(".")[:2])
    return "embed" if key.startswith("embed.") else "head"


def expected_specs(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Canonical name → (shape, dtype) of every tensor of ``cfg``'s model, from a model built on meta."""
    from sparsetron.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def check_group(cfg: ModelConfig, group: TensorGroup, source: str) -> None:
    """Raise ConversionError unless ``group`` holds exactly the tensors ``cfg`` has in it, with their shapes."""
    specs = {k: v for k, v in expected_specs(cfg).items() if group_of(k) == group.name}
    missing, unknown = (
        sorted(specs.keys() - group.tensors.keys()),
        sorted(group.tensors.keys() - specs.keys()),
    )
    if missing or unknown:
        raise ConversionError(
            f"{source}: group {group.name} is missing {missing[:5]} and has unknown {unknown[:5]}; the checkpoint "
            "does not match its model config"
        )
    for key, (shape, _) in specs.items():
        got = tuple(group.tensors[key].shape)
        if got != shape:
            raise ConversionError(f"{source}: tensor {key} has shape {got}, the model config needs {shape}")


def bounded(groups: Iterable[TensorGroup], max_bytes: int | None) -> Iterator[TensorGroup]:
    """``groups``, refusing (ConversionError) any group larger than ``max_bytes`` before it is passed on."""
    for group in groups:
        if max_bytes is not None and group.nbytes > max_bytes:
            raise ConversionError(
                f"group {group.name} holds {group.nbytes / 2**20:.1f} MiB, more than --max-memory "
                f"{max_bytes / 2**20:.1f} MiB; raise --max-memory to at least the largest layer"
            )
        yield group


def tensor_hash(tensor: torch.Tensor) -> str:
    """SHA-256 of ``tensor``'s dtype, shape and bytes (equal hashes: equal bits)."""
    t = tensor.detach().contiguous().cpu()
    digest = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class Reader(Protocol):
    """A checkpoint in some format, read as neutral groups."""

    #: Format name (``hf``, ``dcp``, ``zarr`` …), as the CLI spells it.
    format: str

    def model_config(self) -> ModelConfig:
        """The model the checkpoint holds."""
        ...

    def groups(self) -> Iterator[TensorGroup]:
        """Every group in :func:`group_names` order, each read only when asked for."""
        ...

    def describe(self) -> dict:
        """What the manifest records about the source (format, versions of the writing library, paths)."""
        ...


class Writer(Protocol):
    """Writes neutral groups as a checkpoint of some format at its output path, atomically
    (:func:`atomic_directory`), with :data:`MANIFEST_FILE` (:func:`write_manifest`) inside."""

    format: str

    def write(self, cfg: ModelConfig, groups: Iterable[TensorGroup], manifest: dict) -> dict[str, str]:
        """Write every group (consumed one at a time); return canonical name → :func:`tensor_hash` of what was
        written. ``manifest`` (source description, tool versions) goes into the output's manifest."""
        ...


#: The file every converted output carries (directory formats): source, versions, mapping, per-tensor hashes.
MANIFEST_FILE = "sparsetron-conversion.json"


@contextlib.contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """A temporary sibling directory to write into, renamed to ``out`` only when the block succeeds.

    Refuses an existing ``out`` (ConversionError: nothing is overwritten). On failure the temporary
    directory is removed, so no half-written output is ever visible under ``out``.
    """
    out = Path(out)
    if out.exists():
        raise ConversionError(f"output {out} already exists; remove it or choose another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield scratch
        os.replace(scratch, out)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def write_manifest(directory: Path, manifest: dict, hashes: dict[str, str]) -> None:
    """Write :data:`MANIFEST_FILE` into ``directory``: ``manifest`` plus the per-tensor hashes."""
    record = {**manifest, "mapping_version": MAPPING_VERSION, "tensors": dict(sorted(hashes.items()))}
    (Path(directory) / MANIFEST_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_manifest(directory: Path) -> dict | None:
    """The conversion manifest of ``directory``, or None when it has none."""
    path = Path(directory) / MANIFEST_FILE
    return json.loads(path.read_text()) if path.exists() else None
