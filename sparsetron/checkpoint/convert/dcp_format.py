"""sparsetron's own DCP checkpoints (``torch.distributed.checkpoint``) as a conversion source and target.

A training checkpoint (``RUN/checkpoints/step-<step>/``, see :mod:`sparsetron.checkpoint.dcp`) holds the model
under ``model.<canonical name>`` (``replica-<r>.model.`` for DiLoCo/SparseLoCo runs), its optimizer state, and
a ``manifest.json`` with the resolved config. DCP stores every tensor with its global shape and the boxes each
rank saved, so :class:`DCPReader` reads whole tensors whatever layout saved them (ep, dp_shard, cp), one group
at a time, in one process. :class:`DCPWriter` writes a model-only checkpoint in the same layout of keys, which
``checkpoint.init_from`` starts a training run from at any layout. Conversions to and from other formats are
model-only: optimizer state is resharded only DCP → DCP, by the trainer's own resume.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf

from sparsetron.checkpoint.convert.neutral import (
    ConversionError,
    TensorGroup,
    atomic_directory,
    check_group,
    expected_specs,
    group_names,
    group_of,
    tensor_hash,
    write_manifest,
)
from sparsetron.config import Config, ModelConfig, to_yaml

#: What a model-only checkpoint's manifest says it is (the trainer's checkpoints have a ``step``).
MODEL_ONLY = "sparsetron-model-only"


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """DCP warns that it runs without a process group; one process reading or writing is what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def model_config_of(path: Path) -> ModelConfig:
    """The ModelConfig recorded in checkpoint ``path``'s ``manifest.json`` (its resolved run config)."""
    manifest_path = path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        resolved = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(manifest["config_yaml"]))
    except (OSError, ValueError, KeyError) as exc:
        raise ConversionError(
            f"{manifest_path}: cannot read the run config from the checkpoint manifest ({exc}); point at a "
            "complete step-<step> directory written by sparsetron"
        ) from exc
    model = OmegaConf.to_object(resolved).model
    assert isinstance(model, ModelConfig)
    return model


class DCPReader:
    """A sparsetron DCP checkpoint directory read as neutral groups (whole tensors, any saved layout).

    ``replica``: which replica's model to read from a DiLoCo/SparseLoCo checkpoint (None: a DDP checkpoint).
    """

    format = "dcp"

    def __init__(self, path: str | Path, replica: int | None = None) -> None:
        self.path = Path(path)
        if not (self.path / ".metadata").is_file():
            raise ConversionError(
                f"{self.path}: no DCP .metadata file; point at a complete checkpoint directory (step-<step>)"
            )
        self.prefix = "model." if replica is None else f"replica-{replica:05d}.model."
        self.metadata = dcp.FileSystemReader(self.path).read_metadata().state_dict_metadata
        self.cfg = model_config_of(self.path)

    def model_config(self) -> ModelConfig:
        return self.cfg

    def describe(self) -> dict:
        return {"format": self.format, "path": str(self.path), "torch": torch.__version__}

    def groups(self) -> Iterator[TensorGroup]:
        specs = expected_specs(self.cfg)
        for name in group_names(self.cfg):
            keys = [k for k in specs if group_of(k) == name]
            state = {}
            for key in keys:
                stored = self.metadata.get(self.prefix + key)
                if stored is None or not hasattr(stored, "size"):
                    raise ConversionError(
                        f"{self.path}: tensor {self.prefix + key} is not in the checkpoint (replica "
                        f"prefix {self.prefix!r}); it does not hold this model"
                    )
                state[self.prefix + key] = torch.empty(stored.size, dtype=stored.properties.dtype)
            with single_process():
                dcp.load(
                    state,
                    storage_reader=dcp.FileSystemReader(self.path),
                    planner=dcp.DefaultLoadPlanner(allow_partial_load=True),
                )
            group = TensorGroup(name, {k.removeprefix(self.prefix): v for k, v in state.items()})
            check_group(self.cfg, group, str(self.path))
            yield group


class DCPWriter:
    """Writes a model-only DCP checkpoint (keys ``model.<canonical name>``) with a manifest naming its config.

    DCP writes one metadata file for the whole checkpoint, so the groups are gathered before the single
    ``dcp.save``: this writer holds the whole model (``--max-memory`` still bounds each group read).
    """

    format = "dcp"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def write(self, cfg: ModelConfig, groups: Iterable[TensorGroup], manifest: dict) -> dict[str, str]:
        state: dict[str, torch.Tensor] = {}
        for group in groups:
            check_group(cfg, group, "DCP writer input")
            state.update({f"model.{k}": v.contiguous() for k, v in group.tensors.items()})
        hashes = {k.removeprefix("model."): tensor_hash(v) for k, v in state.items()}
        with atomic_directory(self.path) as scratch:
            with single_process():
                dcp.save(state, storage_writer=dcp.FileSystemWriter(scratch))
            run_config = Config(model=cfg)
            (scratch / "manifest.json").write_text(
                json.dumps({"kind": MODEL_ONLY, "config_yaml": to_yaml(run_config)}, indent=2) + "\n"
            )
            write_manifest(scratch, manifest, hashes)
        return hashes
