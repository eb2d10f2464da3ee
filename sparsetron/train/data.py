"""Training data: the zarr v3 token store, packed windows over it, the per-step loader and source selection.

Token store (a zarr v3 group, ``format_version`` 1)::

    tokens       1-D uint16 when vocab_size ≤ 65536, else uint32; 64 Ki-token chunks in 1 Mi-token shards
    doc_offsets  1-D int64, n_docs + 1 entries: 0, end of document 0, ..., n_tokens
    attrs        format, format_version, tokenizer, vocab_size, n_tokens, n_docs, text_sha256

Documents lie back to back with no separator token; ``doc_offsets`` alone marks their boundaries. Input
files are one document each; empty documents are skipped. A store is written by one process into a hidden
temporary directory, its attributes last, then renamed into place, so an interrupted prepare never leaves
anything at the output path, and its leftover temporary directory fails validation.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypedDict

import numpy as np
import torch
import zarr
import zarr.errors

from sparsetron.config import DataConfig, TrainConfig
from sparsetron.train.corpus import corpus_documents
from sparsetron.train.tokenizer import Tokenizer, load_tokenizer

IGNORE_INDEX = -100
"""Target value that adds no loss (the default ``ignore_index`` of ``torch.nn.functional.cross_entropy``)."""
STORE_FORMAT = "sparsetron-token-store"
STORE_VERSION = 1
CHUNK_TOKENS = 1 << 16
"""Tokens per zarr chunk: the unit of decompression, sized for sequential reads of a few windows."""
SHARD_TOKENS = 1 << 20
"""Tokens per shard file (16 chunks); the writer appends whole shards so each shard file is written once."""
UINT16_VOCAB_LIMIT = 1 << 16
SOURCES = ("synthetic", "corpus", "zarr")
TASKS = ("passkey", "associative_recall")
CORPUS_STORE_NAME = "corpus.zarr"
_STORE_ATTRS = ("tokenizer", "vocab_size", "n_tokens", "n_docs", "text_sha256")


class StoreError(ValueError):
    """A token store that is missing, malformed or inconsistent; the message names the path and the problem."""


class Sample(TypedDict):
    """One training sequence of S = seq_len tokens; every entry is an int64 tensor of shape (S,).

    ``tokens_S`` input ids; ``targets_S`` the next token of each input, IGNORE_INDEX where no loss is taken;
    ``positions_S`` position inside its document (restarts at 0 at every document start);
    ``doc_ids_S`` equal for tokens of one document, different across documents (attention must not cross).
    """

    tokens_S: torch.Tensor
    targets_S: torch.Tensor
    positions_S: torch.Tensor
    doc_ids_S: torch.Tensor


class Source(Protocol):
    """Maps a sample index to one :class:`Sample` of exactly ``seq_len`` tokens."""

    seq_len: int
    vocab_size: int
    num_samples: int | None
    """Number of valid indices, or None for an infinite source (every index ≥ 0 is valid)."""
    identity: str
    """A description of the source that changes whenever its samples would (checked on resume)."""
    has_accuracy: bool
    """Whether samples have exact answers to score (synthetic tasks: ``sample_correct(model_fn, indices)``)."""

    def __getitem__(self, index: int) -> Sample: ...


def derive_seed(*keys: int) -> int:
    """A well-mixed 64-bit seed from non-negative ints (numpy ``SeedSequence``), e.g. ``derive_seed(seed, epoch)``."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0])


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size ≤ 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= UINT16_VOCAB_LIMIT else np.uint32)


def text_sha256(documents: Iterable[str]) -> str:
    """SHA-256 of a sequence of documents (each one's UTF-8 followed by a 0x1E record separator)."""
    digest = hashlib.sha256()
    for text in documents:
        _feed(digest, text)
    return digest.hexdigest()


def _feed(digest: Any, text: str) -> None:
    digest.update(text.encode("utf-8") + b"\x1e")


@dataclass(frozen=True)
class StoreStats:
    """What :func:`write_store` wrote; ``str()`` is a one-line summary for the CLI."""

    path: Path
    tokenizer: str
    vocab_size: int
    dtype: str
    n_docs: int
    n_tokens: int
    skipped_empty: int
    seconds: float

    def __str__(self) -> str:
        skipped = f"; skipped {self.skipped_empty} empty documents" if self.skipped_empty else ""
        return (
            f"wrote {self.path}: {self.n_docs:,} documents, {self.n_tokens:,} tokens "
            f"({self.dtype}, tokenizer {self.tokenizer}, vocab {self.vocab_size:,}) in {self.seconds:.2f} s{skipped}"
        )


class TokenStore:
    """A validated, read-only token store; build it with :func:`open_store`.

    ``doc_offsets_D`` is the int64 tensor of document boundaries, shape (n_docs + 1,), held in memory.
    """

    def __init__(self, path: Path, tokens: zarr.Array, doc_offsets_D: torch.Tensor, attrs: dict) -> None:
        self.path = path
        self._tokens = tokens
        self.doc_offsets_D = doc_offsets_D
        self.tokenizer: str = attrs["tokenizer"]
        self.vocab_size: int = attrs["vocab_size"]
        self.text_sha256: str = attrs["text_sha256"]
        self.n_tokens = int(tokens.shape[0])
        self.n_docs = len(doc_offsets_D) - 1

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Tokens ``[start, stop)`` of the stream as an int64 tensor of shape (stop - start,)."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"token range [{start}, {stop}) is outside [0, {self.n_tokens}) of {self.path}")
        return torch.from_numpy(self._tokens[start:stop].astype(np.int64))

    def document(self, index: int) -> torch.Tensor:
        """Tokens of document ``index`` as an int64 tensor."""
        if not 0 <= index < self.n_docs:
            raise IndexError(f"document {index} is outside [0, {self.n_docs}) of {self.path}")
        return self.read(int(self.doc_offsets_D[index]), int(self.doc_offsets_D[index + 1]))


def write_store(documents: Iterable[str], out: Path, tokenizer: Tokenizer) -> StoreStats:
    """Tokenise ``documents`` (one string each) into a new token store at ``out``; atomic (temp dir + rename).

    Raises FileExistsError when ``out`` exists (also when a concurrent writer published it first),
    ValueError when the documents hold no tokens or the tokenizer yields ids outside its vocabulary.
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"token store {out} already exists; delete it or choose another output path.")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    started = time.perf_counter()
    try:
        n_docs, n_tokens, skipped = _write_group(documents, partial, tokenizer)
        _publish(partial, out)
    finally:
        # After a successful rename there is nothing left here; after a failure this removes the debris.
        shutil.rmtree(partial, ignore_errors=True)
    return StoreStats(
        path=out,
        tokenizer=tokenizer.name,
        vocab_size=tokenizer.vocab_size,
        dtype=token_dtype(tokenizer.vocab_size).name,
        n_docs=n_docs,
        n_tokens=n_tokens,
        skipped_empty=skipped,
        seconds=time.perf_counter() - started,
    )


def _write_group(documents: Iterable[str], path: Path, tokenizer: Tokenizer) -> tuple[int, int, int]:
    """Write the arrays, then the attributes that make the group a valid store; returns (docs, tokens, skipped)."""
    dtype = token_dtype(tokenizer.vocab_size)
    group = zarr.open_group(path, mode="w-", zarr_format=3)
    # write_empty_chunks: a chunk of token id 0 equals the fill value, and zarr would otherwise skip writing
    # it — indistinguishable from a shard lost in a partial copy, which open_store must refuse.
    tokens = group.create_array(
        "tokens",
        shape=(0,),
        dtype=dtype,
        chunks=(CHUNK_TOKENS,),
        shards=(SHARD_TOKENS,),
        config={"write_empty_chunks": True},
    )
    digest = hashlib.sha256()
    ends: list[int] = []
    pending: list[np.ndarray] = []
    pending_len = skipped = 0
    for number, text in enumerate(documents):
        _feed(digest, text)
        ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
        if ids.size == 0:
            skipped += 1
            continue
        if ids.min() < 0 or ids.max() >= tokenizer.vocab_size:
            raise ValueError(
                f"tokenizer '{tokenizer.name}' produced id {int(ids.max())} or {int(ids.min())} for document {number}, "
                f"outside its vocabulary [0, {tokenizer.vocab_size})."
            )
        pending.append(ids.astype(dtype))
        pending_len += ids.size
        ends.append((ends[-1] if ends else 0) + ids.size)
        if pending_len >= SHARD_TOKENS:
            # Append only whole shards so that every shard file is written exactly once (zarr rewrites a
            # whole shard on any write into it).
            buffer = np.concatenate(pending)
            whole = len(buffer) // SHARD_TOKENS * SHARD_TOKENS
            tokens.append(buffer[:whole])
            pending, pending_len = [buffer[whole:]], len(buffer) - whole
    if not ends:
        raise ValueError(f"no tokens to store in {path.name}: every one of the {skipped} documents is empty.")
    if pending_len:
        tokens.append(np.concatenate(pending))
    offsets = np.asarray([0, *ends], dtype=np.int64)
    group.create_array("doc_offsets", data=offsets, chunks=(CHUNK_TOKENS,), shards=(SHARD_TOKENS,))
    group.attrs.update(
        {
            "format": STORE_FORMAT,
            "format_version": STORE_VERSION,
            "tokenizer": tokenizer.name,
            "vocab_size": tokenizer.vocab_size,
            "n_tokens": ends[-1],
            "n_docs": len(ends),
            "text_sha256": digest.hexdigest(),
        }
    )
    return len(ends), ends[-1], skipped


def _publish(partial: Path, out: Path) -> None:
    try:
        os.rename(partial, out)
    except OSError as exc:
        if out.exists():
            raise FileExistsError(
                f"token store {out} was created by another process while this one was being written."
            ) from exc
        raise


def open_store(path: str | Path) -> TokenStore:
    """Open and validate the token store at ``path``; raises :class:`StoreError` saying what is wrong.

    Checks: zarr v3 group, format name and version, attributes present, ``tokens`` 1-D of the dtype its
    vocabulary needs, ``doc_offsets`` 1-D int64 starting at 0, non-decreasing and ending at ``len(tokens)``,
    counts equal to the attributes, and no shard file of ``tokens`` missing.
    """
    path = Path(path)
    if not path.is_dir():
        raise StoreError(
            f"token store {path} does not exist; create it with `sparsetron data prepare TEXT... --out {path}`."
        )
    try:
        group = zarr.open_group(path, mode="r", zarr_format=3)
    except (zarr.errors.BaseZarrError, FileNotFoundError, ValueError) as exc:
        raise StoreError(f"token store {path} is not a zarr v3 group ({exc}).") from exc

    def fail(problem: str) -> StoreError:
        return StoreError(f"token store {path}: {problem}")

    attrs = dict(group.attrs)
    if attrs.get("format") != STORE_FORMAT:
        raise fail(
            f"not a complete sparsetron token store (attribute format={attrs.get('format')!r}, expected "
            f"{STORE_FORMAT!r}); an interrupted prepare leaves this state. Delete it and prepare again."
        )
    if attrs.get("format_version") != STORE_VERSION:
        raise fail(
            f"format version {attrs.get('format_version')!r}, but this sparsetron reads version {STORE_VERSION}; "
            "prepare the store again."
        )
    missing = [key for key in _STORE_ATTRS if key not in attrs]
    if missing:
        raise fail(f"attributes {missing} are missing; prepare the store again.")
    tokens = _array(group, "tokens", fail)
    offsets = _array(group, "doc_offsets", fail)
    expected = token_dtype(attrs["vocab_size"])
    if tokens.ndim != 1 or tokens.dtype != expected:
        raise fail(
            f"array 'tokens' must be 1-D {expected} for vocab_size {attrs['vocab_size']}, "
            f"found {tokens.ndim}-D {tokens.dtype}."
        )
    if offsets.ndim != 1 or offsets.dtype != np.int64:
        raise fail(f"array 'doc_offsets' must be 1-D int64, found {offsets.ndim}-D {offsets.dtype}.")
    offsets_D = np.asarray(offsets[:])
    _check_offsets(offsets_D, int(tokens.shape[0]), fail)
    if attrs["n_tokens"] != tokens.shape[0] or attrs["n_docs"] != len(offsets_D) - 1:
        raise fail(
            f"attributes say {attrs['n_tokens']} tokens in {attrs['n_docs']} documents, but the arrays hold "
            f"{tokens.shape[0]} tokens in {len(offsets_D) - 1} documents."
        )
    if tokens.nchunks_initialized < tokens.nchunks:
        # zarr would silently read a missing shard as zeros.
        raise fail("shard files of 'tokens' are missing (a partial copy?); copy or prepare the store again.")
    return TokenStore(path, tokens, torch.from_numpy(offsets_D), attrs)


def _array(group: zarr.Group, name: str, fail) -> zarr.Array:
    try:
        member = group[name]
    except KeyError:
        raise fail(f"array '{name}' is missing; prepare the store again.") from None
    if not isinstance(member, zarr.Array):
        raise fail(f"'{name}' must be an array, found a group.")
    return member


def _check_offsets(offsets_D: np.ndarray, n_tokens: int, fail) -> None:
    if len(offsets_D) < 2:
        raise fail(f"doc_offsets must hold at least 2 entries (one document), found {len(offsets_D)}.")
    if offsets_D[0] != 0:
        raise fail(f"doc_offsets must start at 0, starts at {offsets_D[0]}.")
    decreasing = np.flatnonzero(np.diff(offsets_D) < 0)
    if decreasing.size:
        i = int(decreasing[0])
        raise fail(
            f"doc_offsets must be non-decreasing, but doc_offsets[{i + 1}]={offsets_D[i + 1]} < "
            f"doc_offsets[{i}]={offsets_D[i]}."
        )
    if offsets_D[-1] != n_tokens:
        raise fail(
            f"the last document ends at token {offsets_D[-1]}, but 'tokens' holds {n_tokens} tokens "
            "(truncated or mismatched arrays); prepare the store again."
        )


def prepare_store(inputs: list[Path], out: Path, tokenizer: Tokenizer) -> StoreStats:
    """Tokenise UTF-8 text files ``inputs`` (one document per file, in the given order) into a store at ``out``."""
    paths = [Path(p) for p in inputs]
    if not paths:
        raise ValueError("no input files given; pass one or more UTF-8 text files (one document each).")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"input files not found: {', '.join(missing)}")
    return write_store((_read_text(p) for p in paths), out, tokenizer)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); convert it to UTF-8 first."
        ) from exc


def prepare_cli(inputs: list[str], out: str, tokenizer: str) -> StoreStats:
    """``sparsetron data prepare INPUT... --out STORE --tokenizer NAME``; ``str(result)`` is the summary."""
    return prepare_store([Path(p) for p in inputs], Path(out), load_tokenizer(tokenizer))


def prepare_corpus(run_dir: str | Path, tokenizer: Tokenizer) -> TokenStore:
    """The shipped corpus as a store at ``<run_dir>/corpus.zarr``: prepared on first use, reused afterwards.

    Safe when several ranks call it at once: each writes its own temporary store and the first rename wins;
    the others discard theirs and open the winner's (identical) store. A store prepared with another
    tokenizer or from another version of the corpus is refused rather than silently reused.
    """
    path = Path(run_dir) / CORPUS_STORE_NAME
    documents = corpus_documents()
    if not path.exists():
        # A concurrent rank may publish first; its store has the same content, so use that one.
        with contextlib.suppress(FileExistsError):
            write_store(documents, path, tokenizer)
    store = open_store(path)
    if store.tokenizer != tokenizer.name or store.text_sha256 != text_sha256(documents):
        raise StoreError(
            f"token store {path} holds a corpus tokenised with '{store.tokenizer}' (text digest "
            f"{store.text_sha256[:12]}), but this run uses tokenizer '{tokenizer.name}' and corpus digest "
            f"{text_sha256(documents)[:12]}; delete {path} to prepare it again, or use another train.run_dir."
        )
    return store


class PackedSource:
    """Consecutive windows of ``seq_len + 1`` tokens of a store's stream (documents back to back, no padding).

    Window ``i`` covers stream tokens ``[i*S, i*S + S]``: the first S are the inputs and the last S the
    targets, so neighbouring windows share one token and every stream token but the final one is an input
    exactly once. ``positions_S`` count from 0 at the window start and at every document start inside the
    window (so they stay below S however long a document is); ``doc_ids_S`` are global document indices; a
    target that is the first token of the next document is IGNORE_INDEX.
    """

    has_accuracy = False

    def __init__(self, store: TokenStore, seq_len: int, heldout: int = 0) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be ≥ 1, got {seq_len}")
        windows = (store.n_tokens - 1) // seq_len
        if windows < 1:
            raise ValueError(
                f"token store {store.path} holds {store.n_tokens} tokens, fewer than the seq_len + 1 = "
                f"{seq_len + 1} one sequence needs; lower train.seq_len or add text."
            )
        if not 0 <= heldout < windows:
            raise ValueError(
                f"data.heldout_windows={heldout} must be in [0, {windows}) for this store at seq_len={seq_len} "
                f"({windows} windows; training needs at least one); lower it."
            )
        self.store = store
        self.seq_len = seq_len
        self.vocab_size = store.vocab_size
        self.windows = windows
        self.num_samples: int | None = windows - heldout
        self.identity = (
            f"packed(tokens={store.n_tokens}, docs={store.n_docs}, tokenizer={store.tokenizer}, "
            f"text_sha256={store.text_sha256[:12]}, seq_len={seq_len}, heldout={heldout})"
        )

    def __len__(self) -> int:
        """Training windows (the held-out ones follow them)."""
        return self.num_samples

    def heldout_indices(self) -> range:
        """Indices of the held-out windows: the last ``heldout`` of the stream, never trained on."""
        return range(self.num_samples, self.windows)

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.windows:
            raise IndexError(f"window {index} is outside [0, {self.windows})")
        seq_len, offsets_D = self.seq_len, self.store.doc_offsets_D
        start = index * seq_len
        window_W = self.store.read(start, start + seq_len + 1)  # W = S + 1
        stream_pos_S = torch.arange(start, start + seq_len)
        # right=True skips empty documents: the owner is the last document starting at or before a token.
        doc_S = torch.searchsorted(offsets_D, stream_pos_S, right=True) - 1
        targets_S = window_W[1:].clone()
        targets_S[offsets_D[doc_S + 1] == stream_pos_S + 1] = IGNORE_INDEX
        positions_S = stream_pos_S - offsets_D[doc_S].clamp(min=start)
        return Sample(tokens_S=window_W[:-1], targets_S=targets_S, positions_S=positions_S, doc_ids_S=doc_S)


@dataclass(frozen=True)
class MicroBatch:
    """B = micro_batch_size sequences of S tokens; every field is int64.

    ``tokens_BS``, ``targets_BS``, ``positions_BS``, ``doc_ids_BS`` as in :class:`Sample`, stacked, and
    ``sample_indices_B``, the source indices the rows came from.
    """

    tokens_BS: torch.Tensor
    targets_BS: torch.Tensor
    positions_BS: torch.Tensor
    doc_ids_BS: torch.Tensor
    sample_indices_B: torch.Tensor

    @classmethod
    def stack(cls, samples: list[Sample], sample_indices_B: torch.Tensor) -> MicroBatch:
        """Stack ``samples`` (each of length S) into (B, S) tensors."""
        return cls(
            tokens_BS=torch.stack([s["tokens_S"] for s in samples]),
            targets_BS=torch.stack([s["targets_S"] for s in samples]),
            positions_BS=torch.stack([s["positions_S"] for s in samples]),
            doc_ids_BS=torch.stack([s["doc_ids_S"] for s in samples]),
            sample_indices_B=sample_indices_B,
        )


class StepLoader:
    """This data-parallel rank's micro-batches for any optimizer step, as a pure function of the step.

    The global batch of step s is ``order[s*G : (s+1)*G]`` (G = global_batch_seqs). For a finite source of
    N samples, ``order`` concatenates one permutation of ``range(N)`` per epoch, drawn from
    ``derive_seed(seed, epoch)`` (the identity when ``shuffle`` is false); for an infinite source it is
    ``0, 1, 2, ...``. Rank r takes the contiguous slice ``[r*G/dp, (r+1)*G/dp)`` and splits it, in order,
    into micro-batches of ``micro_batch_size``. So the union over ranks of a step's batches is the same set
    of sequences for every dp_size, and resuming only needs the step (:meth:`state_dict`).
    """

    def __init__(
        self,
        source: Source,
        *,
        seq_len: int,
        global_batch_seqs: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool = True,
    ) -> None:
        if source.seq_len != seq_len:
            raise ValueError(f"the source makes sequences of {source.seq_len} tokens, but seq_len={seq_len}.")
        for name, value in (
            ("global_batch_seqs", global_batch_seqs),
            ("micro_batch_size", micro_batch_size),
            ("dp_size", dp_size),
        ):
            if value < 1:
                raise ValueError(f"{name} must be ≥ 1, got {value}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must lie in [0, dp_size={dp_size}).")
        if seed < 0:
            raise ValueError(f"seed must be ≥ 0, got {seed}")
        per_step = dp_size * micro_batch_size
        if global_batch_seqs % per_step:
            raise ValueError(
                f"global_batch_seqs={global_batch_seqs} is not divisible by dp_size × micro_batch_size = "
                f"{dp_size} × {micro_batch_size} = {per_step}, so the ranks cannot get whole micro-batches; "
                f"make it a multiple of {per_step} (train.global_batch_tokens = global_batch_seqs × train.seq_len)."
            )
        self.source = source
        self.global_batch_seqs = global_batch_seqs
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.next_step = 0
        self._orders: dict[int, torch.Tensor] = {}

    @property
    def seqs_per_rank(self) -> int:
        """Sequences this rank processes per optimizer step (G / dp_size)."""
        return self.global_batch_seqs // self.dp_size

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches per rank per step (the gradient-accumulation count)."""
        return self.seqs_per_rank // self.micro_batch_size

    def global_indices(self, step: int) -> torch.Tensor:
        """Source indices of step ``step``'s whole global batch, over all ranks: int64, shape (G,)."""
        if step < 0:
            raise ValueError(f"step must be ≥ 0, got {step}")
        flat_G = step * self.global_batch_seqs + torch.arange(self.global_batch_seqs)
        n = self.source.num_samples
        if n is None:
            return flat_G
        epoch_G, within_G = flat_G // n, flat_G % n
        if not self.shuffle:
            return within_G
        indices_G = torch.empty_like(flat_G)
        for epoch in epoch_G.unique().tolist():
            in_epoch = epoch_G == epoch
            indices_G[in_epoch] = self._order(epoch)[within_G[in_epoch]]
        return indices_G

    def _order(self, epoch: int) -> torch.Tensor:
        order = self._orders.get(epoch)
        if order is None:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            order = torch.randperm(self.source.num_samples, generator=generator)
            # Steps advance, so only the epoch in progress and its predecessor are worth keeping.
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = order
        return order

    def batch(self, step: int) -> list[MicroBatch]:
        """This rank's micro-batches for step ``step`` (each (B, S) with B = micro_batch_size), in order.

        Also records ``step + 1`` as the next step for :meth:`state_dict`.
        """
        first = self.dp_rank * self.seqs_per_rank
        indices_R = self.global_indices(step)[first : first + self.seqs_per_rank]
        samples = [self.source[i] for i in indices_R.tolist()]
        size = self.micro_batch_size
        micro_batches = [
            MicroBatch.stack(samples[k : k + size], indices_R[k : k + size])
            for k in range(0, len(samples), size)
        ]
        self.next_step = step + 1
        return micro_batches

    def state_dict(self) -> dict:
        """JSON-serialisable resume state: the next step plus what must match on resume."""
        return {
            "next_step": self.next_step,
            "seed": self.seed,
            "global_batch_seqs": self.global_batch_seqs,
            "shuffle": self.shuffle,
            "source": self.source.identity,
            "num_samples": self.source.num_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state['next_step']``; raises ValueError naming every field that differs from this loader."""
        current = self.state_dict()
        mismatched = [
            f"{key}: saved {state.get(key)!r}, now {current[key]!r}"
            for key in current
            if key != "next_step" and state.get(key) != current[key]
        ]
        if mismatched:
            raise ValueError(
                "the saved data-loader state does not belong to this data; resuming would feed different "
                "sequences. Mismatched: " + "; ".join(mismatched)
            )
        self.next_step = int(state["next_step"])


def build_source(data_cfg: DataConfig, train_cfg: TrainConfig, run_dir: str | Path) -> Source:
    """The source ``data_cfg`` names, making sequences of ``train_cfg.seq_len`` tokens seeded by ``train_cfg.seed``.

    ``synthetic``: the task ``data.task``; ``zarr``: packed windows of the store at ``data.path`` (its
    tokenizer must be ``data.tokenizer``); ``corpus``: packed windows of the shipped corpus, prepared into
    ``<run_dir>/corpus.zarr`` on first use. Checking ``source.vocab_size`` against the model is the caller's job.
    """
    # synthetic builds on this module (Sample, IGNORE_INDEX, derive_seed), so import it here, not at the top.
    from sparsetron.train.synthetic import AssociativeRecallSource, PasskeySource

    seq_len, seed = train_cfg.seq_len, train_cfg.seed
    if data_cfg.source == "synthetic":
        tokenizer = load_tokenizer(data_cfg.tokenizer)
        if data_cfg.task == "passkey":
            return PasskeySource(seq_len, data_cfg.passkey_digits, seed, tokenizer)
        if data_cfg.task == "associative_recall":
            return AssociativeRecallSource(seq_len, data_cfg.recall_pairs, seed, tokenizer)
        raise ValueError(
            f"data.task={data_cfg.task!r} is not a synthetic task; valid tasks: {', '.join(TASKS)}."
        )
    if data_cfg.source == "zarr":
        if not data_cfg.path:
            raise ValueError("data.source=zarr needs data.path, the directory of a prepared token store.")
        store = open_store(data_cfg.path)
        if store.tokenizer != data_cfg.tokenizer:
            raise StoreError(
                f"token store {store.path} was tokenised with '{store.tokenizer}', but data.tokenizer is "
                f"'{data_cfg.tokenizer}'; set data.tokenizer={store.tokenizer}."
            )
        return PackedSource(store, seq_len, data_cfg.heldout_windows)
    if data_cfg.source == "corpus":
        corpus = prepare_corpus(run_dir, load_tokenizer(data_cfg.tokenizer))
        return PackedSource(corpus, seq_len, data_cfg.heldout_windows)
    raise ValueError(f"data.source={data_cfg.source!r} is unknown; valid sources: {', '.join(SOURCES)}.")
