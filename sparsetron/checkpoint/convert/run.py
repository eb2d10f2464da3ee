"""Conversion as reader → neutral groups → writer, plus the checks that prove an output equals its source.

:func:`convert` streams one group at a time (bounded by ``max_memory``); :func:`check` re-reads two
checkpoints side by side and lists every difference in keys, shapes, dtypes and bits; :func:`compare`
reports each tensor's largest absolute difference. Formats are looked up by name (:data:`FORMATS`) and
detected from a path's files (:func:`detect_format`).
"""

from __future__ import annotations

import datetime
import importlib
from collections.abc import Iterator
from pathlib import Path

import torch

from sparsetron.checkpoint.convert.neutral import (
    ConversionError,
    Reader,
    TensorGroup,
    Writer,
    bounded,
    tensor_hash,
)

#: Format name → (module, reader class, writer class); modules are imported on use (their libraries are
#: optional: deepspeed, zarr).
FORMATS = {
    "hf": ("sparsetron.checkpoint.convert.hf", "HFReader", "HFWriter"),
    "dcp": ("sparsetron.checkpoint.convert.dcp_format", "DCPReader", "DCPWriter"),
    "zarr": ("sparsetron.checkpoint.convert.zarr_store", "ZarrReader", "ZarrWriter"),
    "deepspeed": ("sparsetron.checkpoint.convert.deepspeed_format", "DeepSpeedReader", "DeepSpeedWriter"),
    "megatron": ("sparsetron.checkpoint.convert.megatron_format", "MegatronReader", "MegatronWriter"),
}


def _format_class(name: str, role: int) -> type:
    if name not in FORMATS:
        raise ConversionError(f"unknown checkpoint format {name!r}; use one of {sorted(FORMATS)}")
    module, *classes = FORMATS[name]
    return getattr(importlib.import_module(module), classes[role])


def reader_for(name: str, path: str | Path, **options) -> Reader:
    """A reader of format ``name`` over ``path`` (``options``: the format's own, e.g. ``replica`` for dcp)."""
    return _format_class(name, 0)(path, **options)


def writer_for(name: str, path: str | Path, **options) -> Writer:
    """A writer of format ``name`` to ``path`` (``options``: e.g. ``model_type`` for hf)."""
    return _format_class(name, 1)(path, **options)


def detect_format(path: str | Path) -> str:
    """The format of the checkpoint at ``path``, from its files; ConversionError when none matches."""
    path = Path(path)
    if (path / ".metadata").is_file():
        return "megatron" if (path / "metadata.json").is_file() else "dcp"
    if (path / "zarr.json").is_file():
        return "zarr"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "hf"
    if (path / "latest").is_file() or any(path.glob("*/mp_rank_*_model_states.pt")):
        return "deepspeed"
    raise ConversionError(
        f"{path}: not a checkpoint this tool knows (no DCP .metadata, megatron metadata.json, zarr.json, HF "
        "config.json + *.safetensors or DeepSpeed 'latest'); pass --from FORMAT"
    )


def provenance(reader: Reader, writer_format: str) -> dict:
    """What every output's manifest records about how it was made."""
    from sparsetron import __version__

    return {
        "source": reader.describe(),
        "target_format": writer_format,
        "model_only": True,  # optimizer state is converted only DCP → DCP, by the trainer's own resume
        "sparsetron": __version__,
        "torch": torch.__version__,
        "converted_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def convert(reader: Reader, writer: Writer, *, max_memory: int | None = None) -> dict[str, str]:
    """Stream ``reader``'s groups into ``writer``; return canonical name → hash of what was written."""
    cfg = reader.model_config()
    return writer.write(cfg, bounded(reader.groups(), max_memory), provenance(reader, writer.format))


def _paired(a: Reader, b: Reader) -> Iterator[tuple[TensorGroup, TensorGroup]]:
    yield from zip(a.groups(), b.groups(), strict=True)


def check(source: Reader, output: Reader) -> list[str]:
    """Every difference between two checkpoints (model config, keys, shapes, dtypes, bits); empty when equal."""
    if source.model_config() != output.model_config():
        return [f"model configs differ: {source.model_config()} vs {output.model_config()}"]
    problems = []
    for mine, theirs in _paired(source, output):
        for key in sorted(mine.tensors.keys() ^ theirs.tensors.keys()):
            problems.append(f"{key}: only in {'the source' if key in mine.tensors else 'the output'}")
        for key in sorted(mine.tensors.keys() & theirs.tensors.keys()):
            a, b = mine.tensors[key], theirs.tensors[key]
            if (a.shape, a.dtype) != (b.shape, b.dtype):
                problems.append(f"{key}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}")
            elif tensor_hash(a) != tensor_hash(b):
                problems.append(f"{key}: bits differ (max abs diff {_max_abs_diff(a, b):.3g})")
    return problems


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def compare(a: Reader, b: Reader) -> list[tuple[str, float]]:
    """(canonical name, max |a − b| in fp64) for every tensor both hold, in checkpoint order."""
    rows = []
    for mine, theirs in _paired(a, b):
        for key in mine.tensors:
            if key not in theirs.tensors or mine.tensors[key].shape != theirs.tensors[key].shape:
                raise ConversionError(f"{key}: not comparable (missing or of another shape in the second)")
            rows.append((key, _max_abs_diff(mine.tensors[key], theirs.tensors[key])))
    return rows
