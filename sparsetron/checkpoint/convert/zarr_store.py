"""The ``zarr`` format: a neutral checkpoint as a zarr v3 group, one array per canonical tensor.

Layout (a zarr v3 directory store, ``format_version`` 1)::

    zarr.json                       group; attributes: format, format_version, mapping_version, model_config
    embed/weight/                   array of canonical tensor ``embed.weight``
    layers/0/moe/experts/w_gate_up/ array of ``layers.0.moe.experts.w_gate_up`` ([E, D, 2F])
    ...
    sparsetron-conversion.json      the conversion manifest (per-tensor hashes)

An array's path is its canonical name with ``.`` replaced by ``/`` (:func:`array_path`), so each layer is a
zarr sub-group (``layers/<i>``) and the mapping is one-to-one (canonical names have no empty components and
no ``/``). Every array carries the attribute ``dtype``, the torch dtype name (``float32``, ``bfloat16`` …).
dtypes numpy lacks (bfloat16, float8) are stored as unsigned integers of the same width holding the bit
patterns, and the ``dtype`` attribute says how to view them; all other dtypes are stored natively.

Chunks: with a ``shard_layout`` (canonical name → box, e.g. a stacked expert tensor's per-rank shard
``(E // ep, D, 2F)``) an array is chunked by its box, so each rank of that layout reads exactly its chunk
files; otherwise the whole tensor is one chunk unless it exceeds :data:`DEFAULT_CHUNK_BYTES`, when leading
dimensions are split. Chunks are compressed with zstd (level 1) and carry a CRC32C checksum, and empty
(all-zero) chunks are written too, so a truncated, damaged or missing chunk file is an error, never zeros.

The group's attributes are written last, after every array, into a temporary directory renamed into place
(:func:`~sparsetron.checkpoint.convert.neutral.atomic_directory`), so a failed write leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import zarr
import zarr.errors
from zarr.codecs import Crc32cCodec, ZstdCodec

from sparsetron.checkpoint.convert.neutral import (
    MAPPING_VERSION,
    ConversionError,
    TensorGroup,
    atomic_directory,
    check_group,
    expected_specs,
    group_names,
    group_of,
    read_manifest,
    tensor_hash,
    write_manifest,
)
from sparsetron.config import ModelConfig

#: Value of the group attribute ``format``.
STORE_FORMAT = "sparsetron-neutral"
#: Version of this layout; a reader refuses any other.
FORMAT_VERSION = 1
#: Largest chunk (bytes) written when no shard layout names the tensor.
DEFAULT_CHUNK_BYTES = 64 * 2**20

#: torch dtypes numpy lacks → the unsigned integer dtype holding their bit patterns.
_BIT_PATTERN: dict[torch.dtype, np.dtype] = {
    torch.bfloat16: np.dtype(np.uint16),
    torch.float8_e4m3fn: np.dtype(np.uint8),
    torch.float8_e5m2: np.dtype(np.uint8),
}
#: torch dtypes stored natively → their numpy dtype.
_NATIVE: dict[torch.dtype, np.dtype] = {
    torch.float64: np.dtype(np.float64),
    torch.float32: np.dtype(np.float32),
    torch.float16: np.dtype(np.float16),
    torch.int64: np.dtype(np.int64),
    torch.int32: np.dtype(np.int32),
    torch.int16: np.dtype(np.int16),
    torch.int8: np.dtype(np.int8),
    torch.uint8: np.dtype(np.uint8),
    torch.bool: np.dtype(np.bool_),
}
#: torch dtype name (the ``dtype`` attribute) → torch dtype.
_BY_NAME: dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in (*_BIT_PATTERN, *_NATIVE)}


def array_path(name: str) -> str:
    """The zarr array path of canonical tensor ``name`` (``layers.0.attn.q_proj.weight`` → ``layers/0/attn/q_proj/weight``)."""
    return name.replace(".", "/")


def canonical_name(path: str) -> str:
    """The canonical tensor name of zarr array ``path`` (inverse of :func:`array_path`)."""
    return path.strip("/").replace("/", ".")


def dtype_name(dtype: torch.dtype) -> str:
    """The ``dtype`` attribute of an array holding ``dtype`` tensors."""
    return str(dtype).removeprefix("torch.")


def config_to_dict(cfg: ModelConfig) -> dict:
    """``cfg`` as a JSON-able dict (enums by value)."""
    return {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in dataclasses.asdict(cfg).items()}


def config_from_dict(data: object, source: str) -> ModelConfig:
    """The ModelConfig ``data`` (from :func:`config_to_dict`) describes; ConversionError when it is not one."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    fix = "the store is damaged or was not written by sparsetron; convert the checkpoint to zarr again"
    if not isinstance(data, dict):
        raise ConversionError(
            f"{source}: group attribute model_config must be a mapping, found {type(data).__name__}; {fix}"
        )
    missing = sorted({f.name for f in dataclasses.fields(ModelConfig)} - data.keys())
    if missing:
        raise ConversionError(f"{source}: group attribute model_config lacks keys {missing}; {fix}")
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), data))
    except (OmegaConfBaseException, ValueError, TypeError, KeyError) as exc:
        detail = str(exc).splitlines()[0]
        raise ConversionError(f"{source}: group attribute model_config is invalid ({detail}); {fix}") from exc
    assert isinstance(cfg, ModelConfig)
    return cfg


def default_chunks(shape: tuple[int, ...], itemsize: int, cap: int = DEFAULT_CHUNK_BYTES) -> tuple[int, ...]:
    """Whole-tensor chunk, with leading dimensions split until a chunk holds at most ``cap`` bytes."""
    chunks = [max(1, s) for s in shape]
    for d in range(len(chunks)):
        if math.prod(chunks) * itemsize <= cap:
            break
        inner = math.prod(chunks[d + 1 :]) * itemsize
        chunks[d] = max(1, min(chunks[d], cap // inner))
    return tuple(chunks)


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    t = tensor.detach().contiguous().cpu()
    if t.dtype in _BIT_PATTERN:
        signed = {2: torch.int16, 1: torch.int8}[t.element_size()]
        return t.view(signed).numpy().view(_BIT_PATTERN[t.dtype])
    return t.numpy()


def _from_numpy(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    array = np.ascontiguousarray(array)
    if dtype in _BIT_PATTERN:
        signed = {2: np.int16, 1: np.int8}[array.dtype.itemsize]
        return torch.from_numpy(array.view(signed)).view(dtype)
    return torch.from_numpy(array)


class ZarrWriter:
    """Writes neutral groups as a zarr v3 store at ``path`` (see the module docstring for the layout).

    ``shard_layout`` maps canonical names to chunk boxes (the save layout's per-rank shard); names it lacks
    get :func:`default_chunks`. A box must have the tensor's rank and 1 ≤ box[d] ≤ shape[d].
    """

    format = "zarr"

    def __init__(self, path: str | Path, shard_layout: dict[str, tuple[int, ...]] | None = None) -> None:
        self.path = Path(path)
        self.shard_layout = {k: tuple(int(b) for b in v) for k, v in (shard_layout or {}).items()}

    def _chunks(self, name: str, tensor: torch.Tensor) -> tuple[int, ...]:
        shape = tuple(tensor.shape)
        box = self.shard_layout.get(name)
        if box is None:
            return default_chunks(shape, tensor.element_size())
        if len(box) != len(shape) or any(not 1 <= b <= max(1, s) for b, s in zip(box, shape, strict=True)):
            raise ConversionError(
                f"shard layout box {box} of {name} does not fit its shape {shape}; a box needs the tensor's rank "
                "and 1 <= box[d] <= shape[d]"
            )
        return box

    def write(self, cfg: ModelConfig, groups: Iterable[TensorGroup], manifest: dict) -> dict[str, str]:
        """Write every group (one at a time) and the manifest; return canonical name → tensor_hash."""
        specs = expected_specs(cfg)
        unknown = sorted(self.shard_layout.keys() - specs.keys())
        if unknown:
            raise ConversionError(
                f"shard layout names tensors the model does not have: {unknown[:5]}; use canonical names"
            )
        order = group_names(cfg)
        hashes: dict[str, str] = {}
        with atomic_directory(self.path) as scratch:
            root = zarr.open_group(scratch, mode="w-", zarr_format=3)
            for position, group in enumerate(groups):
                expected = order[position] if position < len(order) else None
                if group.name != expected:
                    raise ConversionError(
                        f"zarr writer {self.path}: got group {group.name} at position {position}, expected "
                        f"{expected}; groups must come in the order embed, layers.0 … layers.{cfg.n_layers - 1}, head"
                    )
                check_group(cfg, group, f"zarr writer {self.path}")
                for name, tensor in group.tensors.items():
                    hashes[name] = self._write_tensor(root, name, tensor)
            if len(hashes) != len(specs):
                done = {group_of(k) for k in hashes}
                raise ConversionError(
                    f"zarr writer {self.path}: the input ended before groups {[g for g in order if g not in done]}; "
                    "the source checkpoint is incomplete"
                )
            root.attrs.update(
                {
                    "format": STORE_FORMAT,
                    "format_version": FORMAT_VERSION,
                    "mapping_version": MAPPING_VERSION,
                    "model_config": config_to_dict(cfg),
                }
            )
            record = {
                **manifest,
                "format": self.format,
                "format_version": FORMAT_VERSION,
                "zarr_version": zarr.__version__,
                "shard_layout": {k: list(v) for k, v in sorted(self.shard_layout.items())},
            }
            write_manifest(scratch, record, hashes)
        return hashes

    def _write_tensor(self, root: zarr.Group, name: str, tensor: torch.Tensor) -> str:
        if tensor.dtype not in _BY_NAME.values():
            raise ConversionError(
                f"tensor {name} has dtype {tensor.dtype}, which the zarr format does not store; supported: "
                f"{sorted(_BY_NAME)}"
            )
        data = _to_numpy(tensor)
        array = root.create_array(
            array_path(name),
            shape=data.shape,
            dtype=data.dtype,
            chunks=self._chunks(name, tensor),
            compressors=[ZstdCodec(level=1), Crc32cCodec()],
            fill_value=0,
            attributes={"dtype": dtype_name(tensor.dtype)},
            config={"write_empty_chunks": True},
        )
        array[...] = data
        return tensor_hash(tensor)


class ZarrReader:
    """Reads a store written by :class:`ZarrWriter` as neutral groups, one layer's arrays at a time.

    Opening checks the group attributes and that the store holds exactly the model's arrays; each group is
    then read when asked for, its dtypes restored from the ``dtype`` attributes, its shapes checked, and,
    when the store has a conversion manifest, every tensor's hash checked against it (``verify``).
    """

    format = "zarr"

    def __init__(self, path: str | Path, verify: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise ConversionError(f"zarr store {self.path} does not exist; check the path")
        try:
            self._root = zarr.open_group(self.path, mode="r", zarr_format=3)
        except (zarr.errors.BaseZarrError, FileNotFoundError, ValueError) as exc:
            raise ConversionError(
                f"{self.path} is not a zarr v3 group ({exc}); point at a store written by `sparsetron convert`"
            ) from exc
        attrs = dict(self._root.attrs)
        if attrs.get("format") != STORE_FORMAT or attrs.get("format_version") != FORMAT_VERSION:
            raise ConversionError(
                f"zarr store {self.path}: group attributes format={attrs.get('format')!r}, "
                f"format_version={attrs.get('format_version')!r}, expected {STORE_FORMAT!r} version "
                f"{FORMAT_VERSION}; the store is incomplete or from another tool, convert the checkpoint again"
            )
        if "model_config" not in attrs:
            raise ConversionError(
                f"zarr store {self.path}: group attribute model_config is missing; the store is damaged, convert "
                "the checkpoint to zarr again"
            )
        self._cfg = config_from_dict(attrs["model_config"], f"zarr store {self.path}")
        self._attrs = attrs
        self._specs = expected_specs(self._cfg)
        manifest = read_manifest(self.path) if verify else None
        self._hashes: dict[str, str] = (manifest or {}).get("tensors", {})
        self._check_arrays()

    def _check_arrays(self) -> None:
        with warnings.catch_warnings():
            # The manifest file sits beside the arrays; zarr warns that it is not a node.
            warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy")
            stored = {
                canonical_name(p)
                for p, node in self._root.members(max_depth=None)
                if isinstance(node, zarr.Array)
            }
        missing = [k for k in self._specs if k not in stored]
        if missing:
            raise ConversionError(
                f"zarr store {self.path}: array {array_path(missing[0])} (tensor {missing[0]}) is missing"
                f"{f' with {len(missing) - 1} more' if len(missing) > 1 else ''}; the store is incomplete, copy it "
                "again or convert the checkpoint again"
            )
        unknown = sorted(stored - self._specs.keys())
        if unknown:
            raise ConversionError(
                f"zarr store {self.path}: arrays {[array_path(k) for k in unknown[:5]]} are not tensors of its "
                "model_config; the config attribute does not match the arrays, convert the checkpoint again"
            )

    def model_config(self) -> ModelConfig:
        return self._cfg

    def describe(self) -> dict:
        return {
            "format": self.format,
            "path": str(self.path),
            "format_version": self._attrs["format_version"],
            "mapping_version": self._attrs.get("mapping_version"),
            "zarr_version": zarr.__version__,
        }

    def groups(self) -> Iterator[TensorGroup]:
        for group_name in group_names(self._cfg):
            group = TensorGroup(group_name)
            for name in self._specs:
                if group_of(name) == group_name:
                    group.tensors[name] = self.read_tensor(name)
            check_group(self._cfg, group, f"zarr store {self.path}")
            yield group

    def read_tensor(self, name: str) -> torch.Tensor:
        """Canonical tensor ``name``, read, dtype-restored and (with a manifest) hash-checked."""
        where = f"zarr store {self.path}: array {array_path(name)}"
        array = self._root[array_path(name)]
        assert isinstance(array, zarr.Array)
        attr = array.attrs.get("dtype")
        dtype = _BY_NAME.get(attr) if isinstance(attr, str) else None
        if dtype is None:
            raise ConversionError(
                f"{where} has dtype attribute {attr!r}, expected one of {sorted(_BY_NAME)}; the array's metadata is "
                "damaged, convert the checkpoint again"
            )
        stored = _BIT_PATTERN.get(dtype, _NATIVE.get(dtype))
        if array.dtype != stored:
            raise ConversionError(
                f"{where} stores {array.dtype} but its dtype attribute {attr!r} needs {stored}; the array's metadata "
                "is damaged, convert the checkpoint again"
            )
        if array.nchunks_initialized < array.nchunks:
            raise ConversionError(
                f"{where} has {array.nchunks - array.nchunks_initialized} of {array.nchunks} chunk files missing "
                "(a partial copy?); copy the store again or convert the checkpoint again"
            )
        try:
            data = array[...]
        except Exception as exc:  # codec errors (checksum, truncated zstd frame) surface as assorted types
            raise ConversionError(
                f"{where}: a chunk cannot be decoded ({exc}); the chunk file is truncated or damaged, copy the store "
                "again or convert the checkpoint again"
            ) from exc
        tensor = _from_numpy(np.asarray(data), dtype)
        expected = self._hashes.get(name)
        if expected is not None and tensor_hash(tensor) != expected:
            raise ConversionError(
                f"{where}: contents do not match the hash in the store's manifest; the data was changed after "
                "conversion, convert the checkpoint again"
            )
        return tensor
