"""Tokenizers behind one small interface: the built-in byte tokenizer and locally installed HF tokenizers.

Nothing is ever downloaded: an HF tokenizer must already be on disk (a directory, or a name in the local
Hugging Face cache). Documents are never joined with an end-of-text token; a token store keeps document
boundaries as offsets instead, so ``eos_id`` is informational.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BYTES = "bytes"


class TokenizerUnavailableError(ValueError):
    """The requested tokenizer is not installed locally (or its library is missing); the message says the fix."""


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer: text ↔ ids, the vocabulary size and a stable name."""

    name: str
    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no special tokens added."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; undecodable input becomes U+FFFD rather than an error."""
        ...


class ByteTokenizer:
    """Token id = UTF-8 byte (vocab 256); needs no files and round-trips every string exactly."""

    name = BYTES
    vocab_size = 256
    eos_id = None

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text`` as ints in [0, 256)."""
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """UTF-8 decode of the bytes ``ids``; a split multi-byte character decodes as U+FFFD."""
        return bytes(ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer loaded from local files, encoding without BOS/EOS so pieces concatenate."""

    def __init__(self, name: str, backend: PreTrainedTokenizerBase) -> None:
        self.name = name
        self._backend = backend
        # len() counts added special tokens too, which is the range the ids actually span.
        self.vocab_size = len(backend)
        self.eos_id = backend.eos_token_id

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return self._backend.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (the backend's own decoder)."""
        return self._backend.decode(list(ids))


def load_hf_tokenizer(name: str) -> HFTokenizer:
    """Load the HF tokenizer ``name`` (hub id or directory) from local files only; never downloads.

    Raises :class:`TokenizerUnavailableError` when transformers is not installed or the tokenizer is not on disk.
    """
    try:
        # transformers is an optional (dev) dependency; only users of HF tokenizers need it.
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise TokenizerUnavailableError(
            f"tokenizer '{name}' needs the transformers package, which is not installed; "
            "`pip install transformers`, or use tokenizer=bytes."
        ) from exc
    try:
        backend = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TokenizerUnavailableError(
            f"tokenizer '{name}' is not available locally: it is neither a directory holding tokenizer files "
            "nor a model id in the local Hugging Face cache, and nothing is downloaded at run time. "
            f"Download it once beforehand (e.g. `hf download {name}`), pass a local directory, "
            f"or use tokenizer=bytes. (transformers said: {str(exc).splitlines()[0]})"
        ) from exc
    return HFTokenizer(name, backend)


def load_tokenizer(name: str) -> Tokenizer:
    """``bytes`` → :class:`ByteTokenizer`; anything else → :func:`load_hf_tokenizer` (local files only)."""
    if name == BYTES:
        return ByteTokenizer()
    return load_hf_tokenizer(name)
