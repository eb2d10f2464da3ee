"""What a checkpoint directory holds, how its entries are named, and the manifest that makes it complete.

A checkpoint directory ``<directory>/step-00000010/`` is *complete* iff it contains ``manifest.json``. The
manifest is written last, inside a scratch directory that is then renamed into place, so a complete-looking
directory never holds a partial write. Scratch directories (``.step-00000010.tmp-<hex>`` while saving,
``.step-00000010.del-<hex>`` while deleting) are hidden, never complete, and removed by the next save.

Everything here is process-local file handling: no process group is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import uuid
from datetime import datetime, timezone
from pathlib import Path

import torch

import sparsetron

#: Version of the manifest schema below; bumped when a field changes meaning.
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TRAINER_STATE_NAME = "trainer_state.json"
#: Steps are zero-padded so that names sort in step order.
STEP_DIGITS = 8

_STEP_DIR = re.compile(rf"^step-(\d{{{STEP_DIGITS}}})$")
_SCRATCH_DIR = re.compile(rf"^\.step-\d{{{STEP_DIGITS}}}\.(tmp|del)-[0-9a-f]+$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model; the message says which part."""


def step_dir_name(step: int) -> str:
    """The final directory name of the checkpoint of ``step`` (``step-00000010``)."""
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 10**STEP_DIGITS:
        raise ValueError(f"checkpoint step={step!r} must be an integer in [0, {10**STEP_DIGITS})")
    return f"step-{step:0{STEP_DIGITS}d}"


def scratch_dir_name(step: int, purpose: str) -> str:
    """A fresh hidden name for a checkpoint being written (``purpose="tmp"``) or deleted (``"del"``)."""
    return f".{step_dir_name(step)}.{purpose}-{uuid.uuid4().hex}"


def complete_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint under ``directory``, oldest step first."""
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and (entry / MANIFEST_NAME).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def remove_scratch_dirs(directory: Path) -> None:
    """Delete the scratch directories left under ``directory`` by saves or deletions that did not finish."""
    for entry in list(directory.iterdir()):
        if _SCRATCH_DIR.match(entry.name) and entry.is_dir():
            shutil.rmtree(entry)


def delete_checkpoint(path: Path) -> None:
    """Delete a complete checkpoint so that a crash half-way never leaves a complete-looking remnant.

    The directory is first renamed to a scratch name (atomic, so it stops being complete at once), then
    removed; if the removal is interrupted the next save finishes it.
    """
    step = int(_STEP_DIR.match(path.name).group(1))
    doomed = path.with_name(scratch_dir_name(step, "del"))
    path.rename(doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed)


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: object) -> None:
    """Write ``obj`` as indented JSON and fsync it."""
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def file_record(path: Path) -> dict:
    """The manifest entry of one file: its size and the sha256 of its bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a plain CPU tensor's bytes in row-major (contiguous) order."""
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy().data).hexdigest()


def tensor_record(tensor: torch.Tensor) -> dict:
    """The manifest entry of one full tensor: shape, dtype and sha256 of its bytes."""
    return {"shape": list(tensor.shape), "dtype": str(tensor.dtype), "sha256": tensor_sha256(tensor)}


def source_git_sha() -> str | None:
    """The commit of the git checkout sparsetron runs from, or None outside git (best effort, never raises)."""
    try:
        done = subprocess.run(
            ["git", "-C", str(Path(sparsetron.__file__).resolve().parent), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def build_manifest(
    *,
    step: int,
    world_size: int,
    layout: dict,
    config_yaml: str,
    tensors: dict[str, dict],
    files: dict[str, dict],
) -> dict:
    """The manifest of one checkpoint: versions, where and when it was made, per-tensor and per-file hashes."""
    return {
        "format_version": FORMAT_VERSION,
        "sparsetron_version": sparsetron.__version__,
        "torch_version": torch.__version__,
        "git_sha": source_git_sha(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "step": step,
        "world_size": world_size,
        "layout": layout,
        "config_yaml": config_yaml,
        "tensors": dict(sorted(tensors.items())),
        "files": dict(sorted(files.items())),
    }


def read_manifest(path: str | Path) -> dict:
    """Read the manifest of the checkpoint directory ``path``; process-local.

    Raises:
        CheckpointError: ``path`` is missing, is not a complete checkpoint, or its manifest is unreadable
            or of an unknown format version.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a directory)")
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise CheckpointError(
            f"checkpoint {path} is incomplete: it has no {MANIFEST_NAME} (the save that wrote it did not finish); "
            "resume from Checkpointer.latest() instead"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST_NAME} is unreadable: {exc}") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: {MANIFEST_NAME} has format_version={manifest.get('format_version')!r}, "
            f"this sparsetron reads format_version={FORMAT_VERSION}"
        )
    return manifest
