"""Resumable distributed checkpoints of model, optimizer, RNG and trainer state, through torch.distributed.checkpoint.

Model and optimizer state go through ``get_state_dict`` / ``set_state_dict`` and DCP, so FSDP2 (DTensor)
and plain modules both work and a checkpoint saved at one world size loads at another (DCP reshards).

A save is atomic: every rank writes into a scratch directory whose name rank 0 picks and broadcasts; the
ranks then read the tensors back and hash them (each rank a share of the keys, balanced by bytes, so no rank
ever holds the whole model); rank 0 writes ``trainer_state.json`` and ``manifest.json`` and renames the
scratch directory to ``step-<step, 8 digits>`` (e.g. ``step-00000010``). Only that rename makes a checkpoint complete.

Every rank's torch RNG states (CPU, and CUDA when available) are saved as tensors of the DCP checkpoint under
``rng.rank-<rank, 5 digits>.<device>``. A load at the world size of the save restores each rank's own states; a load at
another world size restores rank 0's states on every rank (there is no rank-to-rank correspondence then).

Steps that involve several ranks go through :func:`_on_every_rank` / :func:`_on_rank0`, which turn a failure
on any rank into a :class:`CheckpointError` on all ranks, so a bad path or a full disk never leaves some ranks
waiting in a collective.
"""

from __future__ import annotations

import heapq
import json
import os
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

# DCP's own flattening, so the keys validated before a load are exactly the keys DCP then reads.
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from sparsetron.checkpoint.manifest import (
    MANIFEST_NAME,
    TRAINER_STATE_NAME,
    CheckpointError,
    build_manifest,
    complete_checkpoints,
    delete_checkpoint,
    file_record,
    fsync_dir,
    read_manifest,
    remove_scratch_dirs,
    scratch_dir_name,
    step_dir_name,
    tensor_record,
    write_json,
)

#: Top-level keys of the DCP state dict.
MODEL_KEY, OPTIMIZER_KEY, EXTRA_KEY, RNG_KEY = "model", "optimizer", "extra", "rng"
#: Bytes of full tensors read back at once while hashing; bounds the extra memory a save needs per rank.
HASH_BATCH_BYTES = 256 << 20

#: What a failing step can raise: DCP's CheckpointException derives from BaseException, not Exception.
_FAILURES = (Exception, dcp.CheckpointException)

_T = TypeVar("_T")
TensorSpec = tuple[torch.Size, torch.dtype]


class Checkpointer:
    """Saves and loads the checkpoints of one run under ``directory``, keeping the newest ``keep_last``.

    Args:
        directory: where ``step-<step, 8 digits>/`` checkpoints live; must be visible to every rank (shared storage).
        keep_last: complete checkpoints to keep (>= 1); older ones are deleted after each successful save.
        layout: the parallel layout of the run (JSON-native dict), recorded in every manifest.
        config_yaml: the resolved run config, recorded in every manifest.
        replica: with local-SGD data parallelism (DiLoCo, SparseLoCo) the replicas' weights and optimizer
            states differ between outer steps, so each replica's go under its own prefix
            ``replica-<replica, 5 digits>.`` (resharded within the replica on load); None: one shared state.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        keep_last: int,
        layout: dict,
        config_yaml: str,
        replica: int | None = None,
    ):
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(
                f"keep_last={keep_last!r} must be an integer >= 1 (the newest checkpoint is always kept); "
                "set checkpoint.keep_last to 1 or more"
            )
        _check_json_dict(layout, "layout")
        if not isinstance(config_yaml, str):
            raise TypeError(f"config_yaml must be the resolved YAML text, got {type(config_yaml).__name__}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.layout = layout
        self.config_yaml = config_yaml
        self.replica = replica

    def _nest(self, state: dict) -> dict:
        """``state`` under this rank's replica prefix (unchanged without replicas)."""
        return state if self.replica is None else {replica_prefix(self.replica): state}

    def _unnest(self, state: dict) -> dict:
        return state if self.replica is None else state[replica_prefix(self.replica)]

    def latest(self) -> Path | None:
        """The newest complete checkpoint under the directory, or None; process-local (no process group)."""
        found = complete_checkpoints(self.directory)
        return found[-1][1] if found else None

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        trainer_state: dict,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write the checkpoint of ``step`` atomically and return its final directory on every rank.

        Collective over the default (world) process group: every rank calls it with its own shards.
        ``extra``: further tensors (plain or DTensor, e.g. the outer optimizer's state) saved next to the
        model, under the same replica prefix.
        ``trainer_state`` must be JSON-native (dicts with str keys, lists, str, int, float, bool, None);
        rank 0's copy is written. ``step`` must be newer than every complete checkpoint in the directory,
        so that :meth:`latest` always names the checkpoint of the current run.

        Raises:
            CheckpointError: on every rank, if any rank failed; the scratch directory is left for the next
                save to remove, and no complete checkpoint is changed.
        """
        _require_process_group("Checkpointer.save")
        # Argument errors are raised before the first collective, identically on every rank.
        step_dir_name(step)
        _check_json_dict(trainer_state, "trainer_state")
        scratch = self.directory / _on_rank0(lambda: self._make_scratch_dir(step))

        model_state, optimizer_state = get_state_dict(model, optimizer)
        rank_rng = {_rng_key(dist.get_rank(), device): state for device, state in _capture_rng().items()}
        ours = {MODEL_KEY: model_state, OPTIMIZER_KEY: optimizer_state}
        if extra:
            ours[EXTRA_KEY] = extra
        try:
            dcp.save(
                {**self._nest(ours), **rank_rng},
                storage_writer=dcp.FileSystemWriter(scratch),
            )
        except dcp.CheckpointException as exc:  # DCP raises it on every rank
            raise CheckpointError(f"writing step {step} into {scratch} failed: {_failure_text(exc)}") from exc

        tensors, files = _hash_checkpoint_spread(scratch)
        return _on_rank0(lambda: self._commit(step, scratch, tensors, files, trainer_state))

    def load(
        self,
        path: str | Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> dict:
        """Load checkpoint ``path`` into ``model`` and ``optimizer`` (resharding as needed); return trainer_state.

        ``extra``: tensors saved with :meth:`save`'s ``extra``, filled in place (shapes and dtypes must match).

        Collective over the default (world) process group. Keys, shapes and dtypes of every tensor are checked
        against the checkpoint before anything is written, so a checkpoint that does not fit leaves the model
        and optimizer as they were. RNG states are restored last (see the module docstring).

        Raises:
            CheckpointError: on every rank: ``path`` is missing or incomplete, a data file is missing or short,
                or the checkpoint's keys/shapes/dtypes differ from the model's (each difference is named).
        """
        _require_process_group("Checkpointer.load")
        path = Path(path)
        # get_optimizer_state_dict gives a fresh optimizer its (zero) state so that DCP has tensors to load into.
        ours = {
            MODEL_KEY: get_model_state_dict(model),
            OPTIMIZER_KEY: get_optimizer_state_dict(model, optimizer),
        }
        if extra:
            ours[EXTRA_KEY] = extra
        state = self._nest(ours)
        trainer_state, rng = _on_every_rank(lambda: _prepare_load(path, state))
        # Partial: non-tensor entries a newer torch adds to param_groups keep their defaults; tensors were
        # checked strictly above.
        _load_checked(
            path,
            state,
            "reading the data failed after validation passed; the model and optimizer may be partly "
            "overwritten, load again or rebuild them",
        )
        ours = self._unnest(state)
        set_state_dict(
            model, optimizer, model_state_dict=ours[MODEL_KEY], optim_state_dict=ours[OPTIMIZER_KEY]
        )
        _restore_rng(rng)
        return trainer_state

    def load_model(self, path: str | Path, model: nn.Module) -> None:
        """Load only the model weights of checkpoint ``path`` into ``model``, resharding to its layout.

        ``path`` is any sparsetron DCP checkpoint: a training checkpoint (``model.*``, or replica 0's
        ``replica-00000.model.*``) or a model-only one written by ``sparsetron convert``. Stored dtypes are
        converted to the model's (a bf16 conversion of an HF checkpoint into fp32 master weights). The router
        bias buffers of the aux-loss-free balancer may be absent (they start at zero). Collective over the
        default process group; every rank checks the same metadata, so all raise the same CheckpointError
        (listing every missing or misshapen tensor) before anything is written.
        """
        _require_process_group("Checkpointer.load_model")
        path = Path(path)
        specs = _tensor_specs(_read_metadata(path))
        prefix = "model." if any(k.startswith("model.") for k in specs) else f"{replica_prefix(0)}.model."
        ours = get_model_state_dict(model)
        problems = []
        for key, value in ours.items():
            saved = specs.get(prefix + key)
            if saved is None:
                if not key.endswith("expert_bias"):
                    problems.append(
                        f"'{prefix + key}' {_describe(value.shape, value.dtype)} is not in the checkpoint"
                    )
            elif tuple(saved[0]) != tuple(value.shape):
                problems.append(
                    f"'{prefix + key}' is {_describe(*saved)} in the checkpoint, {_describe(value.shape, value.dtype)} in the model"
                )
        if problems:
            raise CheckpointError(f"checkpoint {path} does not fit the model:\n  " + "\n  ".join(problems))
        # Destinations in the stored dtype with the model's placements (DTensor.to keeps them).
        staged = {prefix + k: v.to(specs[prefix + k][1]) for k, v in ours.items() if prefix + k in specs}
        _load_checked(path, staged, "reading the model failed")
        loaded = {k: staged[prefix + k] for k in ours if prefix + k in staged}
        set_model_state_dict(model, loaded, options=StateDictOptions(strict=False))

    def _make_scratch_dir(self, step: int) -> str:
        """Rank 0: remove crashed saves' leftovers, refuse to go back in steps, create the scratch directory."""
        self.directory.mkdir(parents=True, exist_ok=True)
        remove_scratch_dirs(self.directory)
        newest = complete_checkpoints(self.directory)
        if newest and newest[-1][0] >= step:
            raise CheckpointError(
                f"cannot save step {step} into {self.directory}: it already holds the checkpoint {newest[-1][1]} "
                f"(step {newest[-1][0]}), and resuming would pick the highest step. Save only newer steps, "
                "or move the newer checkpoints away before re-training from an older one"
            )
        name = scratch_dir_name(step, "tmp")
        (self.directory / name).mkdir()
        return name

    def _commit(
        self, step: int, scratch: Path, tensors: dict[str, dict], files: dict[str, dict], trainer_state: dict
    ) -> Path:
        """Rank 0: write trainer state and manifest, rename the scratch directory into place, prune old ones."""
        write_json(scratch / TRAINER_STATE_NAME, trainer_state)
        manifest = build_manifest(
            step=step,
            world_size=dist.get_world_size(),
            layout=self.layout,
            config_yaml=self.config_yaml,
            tensors=tensors,
            files={**files, TRAINER_STATE_NAME: file_record(scratch / TRAINER_STATE_NAME)},
        )
        write_json(scratch / MANIFEST_NAME, manifest)
        fsync_dir(scratch)
        final = self.directory / step_dir_name(step)
        os.rename(scratch, final)  # atomic: the checkpoint becomes complete here and nowhere else
        fsync_dir(self.directory)
        for _, old in complete_checkpoints(self.directory)[: -self.keep_last]:
            delete_checkpoint(old)
        return final


def verify(path: str | Path) -> None:
    """Re-read checkpoint ``path`` and compare every tensor's and every file's sha256 with its manifest.

    Process-local (no process group); reads the whole checkpoint, tensors in batches of
    :data:`HASH_BATCH_BYTES`. Tensors are checked first, so a changed byte of tensor data is reported by
    tensor name; a file whose tensors all read back intact but whose bytes differ (a header or padding)
    is reported by file name.

    Raises:
        CheckpointError: naming the tensor (and its files) whose data differs or cannot be read, or the
            file that is missing, short or altered.
    """
    path = Path(path)
    manifest = read_manifest(path)
    metadata = _read_metadata(path)
    _check_data_files(path, metadata)
    missing = sorted(name for name in manifest["files"] if not (path / name).is_file())
    if missing:
        raise CheckpointError(f"checkpoint {path}: files recorded in the manifest are missing: {missing}")
    specs = _tensor_specs(metadata)
    recorded = manifest["tensors"]
    if set(specs) != set(recorded):
        raise CheckpointError(
            f"checkpoint {path}: the manifest and the DCP metadata list different tensors: only in the manifest "
            f"{sorted(set(recorded) - set(specs))}, only in the data {sorted(set(specs) - set(recorded))}"
        )
    files = _files_by_key(metadata)
    actual = _hash_tensors(path, specs, files)
    for key in sorted(recorded):
        if actual[key] != recorded[key]:
            raise CheckpointError(
                f"checkpoint {path}: tensor '{key}' (stored in {files[key]}) does not match the manifest: "
                f"read {actual[key]}, manifest records {recorded[key]}"
            )
    for name, record in sorted(manifest["files"].items()):
        found = file_record(path / name)
        if found != record:
            raise CheckpointError(
                f"checkpoint {path}: file {name} does not match the manifest (read {found}, manifest records "
                f"{record}) although every tensor in it reads back intact: bytes outside tensor data changed"
            )


# -- collectives that fail together ---------------------------------------------------------------


def _require_process_group(what: str) -> None:
    if not dist.is_initialized():
        raise RuntimeError(
            f"{what} is a collective over the default process group; initialise torch.distributed first "
            "(a world of one rank is fine)"
        )


def _failure_text(exc: BaseException) -> str:
    """One readable line per underlying error (DCP's own text repeats every rank's traceback)."""
    if isinstance(exc, CheckpointError):
        return str(exc)
    if isinstance(exc, dcp.CheckpointException):
        return "; ".join(f"rank {rank}: {_failure_text(error)}" for rank, (error, _) in exc.failures.items())
    return f"{type(exc).__name__}: {exc}"


def _on_every_rank(fn: Callable[[], _T]) -> _T:
    """Run ``fn`` on every rank and return this rank's result; collective over the default (world) group.

    If ``fn`` raised on any rank, every rank raises :class:`CheckpointError` with the distinct failures.
    """
    failure: BaseException | None = None
    result = None
    try:
        result = fn()
    except _FAILURES as exc:
        failure = exc
    texts: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(texts, None if failure is None else _failure_text(failure))
    distinct = list(dict.fromkeys(t for t in texts if t is not None))
    if distinct:
        ranks = [r for r, t in enumerate(texts) if t is not None]
        raise CheckpointError(f"failed on ranks {ranks}: " + "\n".join(distinct)) from failure
    return result


def _on_rank0(fn: Callable[[], _T]) -> _T:
    """Run ``fn`` on rank 0 and hand its result to every rank; collective over the default (world) group.

    If ``fn`` raised, every rank raises :class:`CheckpointError` with rank 0's failure.
    """
    failure: BaseException | None = None
    box: list = [None, None]
    if dist.get_rank() == 0:
        try:
            box[0] = fn()
        except _FAILURES as exc:
            failure = exc
            box[1] = _failure_text(exc)
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise CheckpointError(box[1]) from failure
    return box[0]


# -- hashing full tensors from the files -----------------------------------------------------------


def _load_checked(path: Path, state: dict, failure: str) -> None:
    """``dcp.load`` of ``state`` (validated already; keys it lacks are left alone) from ``path``, collective;
    a failure becomes CheckpointError on every rank, prefixed by ``failure``."""
    try:
        dcp.load(
            state,
            storage_reader=dcp.FileSystemReader(path),
            planner=dcp.DefaultLoadPlanner(allow_partial_load=True),
        )
    except dcp.CheckpointException as exc:
        raise CheckpointError(f"checkpoint {path}: {failure}: {_failure_text(exc)}") from exc


def _read_metadata(path: Path) -> dcp.Metadata:
    try:
        return dcp.FileSystemReader(path).read_metadata()
    except _FAILURES as exc:
        raise CheckpointError(
            f"checkpoint {path}: the DCP metadata file is missing or unreadable: {exc}"
        ) from exc


def _tensor_specs(metadata: dcp.Metadata) -> dict[str, TensorSpec]:
    """Global shape and dtype of every tensor in the checkpoint, by DCP key."""
    return {
        key: (entry.size, entry.properties.dtype)
        for key, entry in metadata.state_dict_metadata.items()
        if isinstance(entry, dcp.TensorStorageMetadata)
    }


def _files_by_key(metadata: dcp.Metadata) -> dict[str, list[str]]:
    """The data files (relative paths) holding each key's chunks."""
    files = defaultdict(set)
    for index, info in metadata.storage_data.items():
        files[index.fqn].add(info.relative_path)
    return {key: sorted(names) for key, names in files.items()}


def _check_data_files(path: Path, metadata: dcp.Metadata) -> None:
    """Raise CheckpointError naming any data file that is missing or shorter than the metadata says."""
    needed: dict[str, int] = defaultdict(int)
    keys_in: dict[str, set[str]] = defaultdict(set)
    for index, info in metadata.storage_data.items():
        needed[info.relative_path] = max(needed[info.relative_path], info.offset + info.length)
        keys_in[info.relative_path].add(index.fqn)
    for name in sorted(needed):
        file = path / name
        size = file.stat().st_size if file.is_file() else None
        if size is None or size < needed[name]:
            state = "is missing" if size is None else f"has {size} bytes, needs {needed[name]}"
            some = sorted(keys_in[name])
            raise CheckpointError(
                f"checkpoint {path}: data file {name} {state}; it holds {len(some)} entries, e.g. {some[:5]}"
            )


def _spread_by_bytes(sizes: dict[str, int], world_size: int) -> list[list[str]]:
    """Assign every name to one rank, largest first onto the least-loaded rank; the same on every rank."""
    loads = [(0, rank) for rank in range(world_size)]
    owned: list[list[str]] = [[] for _ in range(world_size)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        load, rank = heapq.heappop(loads)
        owned[rank].append(name)
        heapq.heappush(loads, (load + sizes[name], rank))
    return owned


def _nbytes(spec: TensorSpec) -> int:
    shape, dtype = spec
    return shape.numel() * dtype.itemsize


def _batches(specs: dict[str, TensorSpec], limit: int) -> list[dict[str, TensorSpec]]:
    """Split keys into groups of at most ``limit`` bytes (a larger tensor forms a group of its own)."""
    out: list[dict[str, TensorSpec]] = [{}]
    used = 0
    for key in sorted(specs):
        if out[-1] and used + _nbytes(specs[key]) > limit:
            out.append({})
            used = 0
        out[-1][key] = specs[key]
        used += _nbytes(specs[key])
    return out


def _read_full_tensors(path: Path, specs: dict[str, TensorSpec]) -> dict[str, torch.Tensor]:
    """Read whole (global) tensors from the checkpoint into plain CPU tensors; process-local, no process group."""
    buffers = {key: torch.empty(shape, dtype=dtype) for key, (shape, dtype) in specs.items()}
    with warnings.catch_warnings():
        # no_dist=True is the point here (each rank reads its own share); DCP warns about it regardless.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(buffers, storage_reader=dcp.FileSystemReader(path), no_dist=True)
    return buffers


def _read_or_explain(
    path: Path, specs: dict[str, TensorSpec], files: dict[str, list[str]]
) -> dict[str, torch.Tensor]:
    """:func:`_read_full_tensors`, and on failure a CheckpointError naming the unreadable tensor and its files."""
    try:
        return _read_full_tensors(path, specs)
    except _FAILURES as exc:
        if len(specs) > 1:  # find the culprit; this raises at the first tensor that fails on its own
            for key in sorted(specs):
                _read_or_explain(path, {key: specs[key]}, files)
        keys = sorted(specs)
        where = sorted({name for key in keys for name in files.get(key, [])})
        raise CheckpointError(
            f"checkpoint {path}: tensor(s) {keys} in {where} cannot be read: {_failure_text(exc)}"
        ) from exc


def _hash_tensors(path: Path, specs: dict[str, TensorSpec], files: dict[str, list[str]]) -> dict[str, dict]:
    """Manifest records (shape, dtype, sha256) of the given keys, read back from the files; process-local."""
    records = {}
    for batch in _batches(specs, HASH_BATCH_BYTES):
        for key, tensor in _read_or_explain(path, batch, files).items():
            records[key] = tensor_record(tensor)
    return records


def _hash_checkpoint_spread(path: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """Records of every tensor and every file of the just-written checkpoint ``path``: (tensors, files).

    Each rank reads back and hashes a byte-balanced share of the tensors and of the files. Collective over
    the default (world) group; the result is complete on rank 0 (empty elsewhere). Hashing the bytes read
    back, rather than memory, also proves that the files hold what was written.
    """

    def hash_my_share() -> tuple[dict[str, dict], dict[str, dict]]:
        world_size, rank = dist.get_world_size(), dist.get_rank()
        metadata = _read_metadata(path)
        specs = _tensor_specs(metadata)
        my_keys = _spread_by_bytes({key: _nbytes(spec) for key, spec in specs.items()}, world_size)[rank]
        # At this point the directory holds exactly what DCP wrote: its data files and .metadata.
        sizes = {entry.name: entry.stat().st_size for entry in path.iterdir() if entry.is_file()}
        my_files = _spread_by_bytes(sizes, world_size)[rank]
        tensors = _hash_tensors(path, {key: specs[key] for key in my_keys}, _files_by_key(metadata))
        return tensors, {name: file_record(path / name) for name in my_files}

    mine = _on_every_rank(hash_my_share)
    shares: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, shares, dst=0)
    tensors: dict[str, dict] = {}
    files: dict[str, dict] = {}
    for share_tensors, share_files in shares or []:
        tensors.update(share_tensors)
        files.update(share_files)
    return tensors, files


# -- load validation --------------------------------------------------------------------------------


def _prepare_load(path: Path, state: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """Check that ``path`` is complete and fits ``state``; return (trainer_state, this rank's RNG states).

    Process-local; raises CheckpointError naming the path and every difference found.
    """
    manifest = read_manifest(path)
    metadata = _read_metadata(path)
    _check_fits(path, state, metadata)
    _check_data_files(path, metadata)
    try:
        trainer_state = json.loads((path / TRAINER_STATE_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path}: {TRAINER_STATE_NAME} is missing or unreadable: {exc}"
        ) from exc
    source = dist.get_rank() if manifest["world_size"] == dist.get_world_size() else 0
    specs = _tensor_specs(metadata)
    rng_specs = {key: specs[key] for key in (_rng_key(source, d) for d in ("cpu", "cuda")) if key in specs}
    if _rng_key(source, "cpu") not in rng_specs:
        raise CheckpointError(f"checkpoint {path}: the RNG state '{_rng_key(source, 'cpu')}' is missing")
    rng = _read_or_explain(path, rng_specs, _files_by_key(metadata))
    return trainer_state, {key.rsplit(".", 1)[1]: value for key, value in rng.items()}


def _check_fits(path: Path, state: dict, metadata: dcp.Metadata) -> None:
    """Raise CheckpointError listing every tensor key missing, unknown, or of another shape/dtype."""
    flat, _ = flatten_state_dict(state)
    ours = {key: value for key, value in flat.items() if isinstance(value, torch.Tensor)}
    # Only the sections this rank loads: its replica's (other replicas' are other ranks' business).
    saved = {key: spec for key, spec in _tensor_specs(metadata).items() if key.split(".", 1)[0] in state}
    problems = []
    for key in sorted(ours.keys() - saved.keys()):
        problems.append(f"'{key}' {_describe(ours[key].shape, ours[key].dtype)} is not in the checkpoint")
    for key in sorted(saved.keys() - ours.keys()):
        problems.append(f"'{key}' {_describe(*saved[key])} in the checkpoint is not in the model/optimizer")
    for key in sorted(ours.keys() & saved.keys()):
        have = (ours[key].shape, ours[key].dtype)
        if tuple(have[0]) != tuple(saved[key][0]) or have[1] != saved[key][1]:
            problems.append(
                f"'{key}' is {_describe(*saved[key])} in the checkpoint but {_describe(*have)} in the model/optimizer"
            )
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise CheckpointError(
            f"checkpoint {path} does not fit the model/optimizer being loaded (nothing was loaded):\n  "
            + "\n  ".join(shown)
        )


def _describe(shape: torch.Size, dtype: torch.dtype) -> str:
    return f"shape {list(shape)} {str(dtype).removeprefix('torch.')}"


# -- RNG and trainer state ---------------------------------------------------------------------------


def replica_prefix(replica: int) -> str:
    """Top-level key of one replica's model, optimizer and extra state (local-SGD checkpoints)."""
    return f"replica-{replica:05d}"


def _rng_key(rank: int, device: str) -> str:
    return f"{RNG_KEY}.rank-{rank:05d}.{device}"


def _capture_rng() -> dict[str, torch.Tensor]:
    """This rank's torch generator states: ``cpu``, and ``cuda`` (current device) when CUDA is available."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _restore_rng(states: dict[str, torch.Tensor]) -> None:
    """Set the generators captured by :func:`_capture_rng`."""
    torch.set_rng_state(states["cpu"])
    # A CUDA state saved on a GPU machine is skipped on a CPU-only one; a checkpoint without one (saved on a
    # CPU-only machine) leaves the CUDA generator as it is.
    if "cuda" in states and torch.cuda.is_available():
        # Before CUDA is initialised, set_rng_state is queued to run *before* any pending manual_seed, which
        # would then overwrite the restored state; initialising first applies both in program order.
        torch.cuda.init()
        torch.cuda.set_rng_state(states["cuda"])


def _check_json_dict(obj: object, where: str) -> None:
    """Raise TypeError unless ``obj`` is a dict that round-trips through JSON unchanged."""
    if not isinstance(obj, dict):
        raise TypeError(f"{where} must be a dict, got {type(obj).__name__}")
    _check_json_native(obj, where)


def _check_json_native(obj: object, where: str) -> None:
    """Raise TypeError naming the first value that would not round-trip through JSON unchanged."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has the non-str key {key!r}; JSON would turn it into a string")
            _check_json_native(value, f"{where}[{key!r}]")
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            _check_json_native(value, f"{where}[{i}]")
    elif obj is not None and not isinstance(obj, (str, int, float, bool)):
        raise TypeError(
            f"{where} is a {type(obj).__name__}; checkpoints store only JSON-native values "
            "(dict with str keys, list, str, int, float, bool, None)"
        )
