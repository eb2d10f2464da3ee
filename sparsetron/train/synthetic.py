"""Synthetic long-context tasks with exactly checkable answers: passkey retrieval and associative recall.

Both are infinite sources of fixed-length samples. Sample ``index`` (any int ≥ 0) is a pure function of
``(seed, index)``: everything random in it comes from a ``torch.Generator`` seeded with
``derive_seed(seed, index)``. Training reads indices 0, 1, 2, ... (the :class:`StepLoader` order for
infinite sources); held-out evaluation reads :func:`heldout_indices`, which start at ``HELDOUT_START =
2**40``, an index no training run reaches, so evaluation samples are never trained on.

A sample is S + 1 stream tokens (inputs: the first S, targets: the last S)::

    filler … needle … filler … [needle … filler …] question answer

The filler is digit-free generated prose (:func:`~sparsetron.train.corpus.generator.filler_sentences`);
needles sit at sentence boundaries at uniformly drawn depths; the answer ends the stream. Targets are
IGNORE_INDEX everywhere but on the answer tokens, so the loss trains retrieval alone. Pieces are tokenised
separately and concatenated, so the answer's tokens are the same whatever precedes them.
"""

from __future__ import annotations

import abc
import random
from collections.abc import Callable, Sequence
from string import ascii_lowercase

import torch

from sparsetron.train.corpus.generator import filler_sentences
from sparsetron.train.data import IGNORE_INDEX, Sample, Source, derive_seed
from sparsetron.train.tokenizer import ByteTokenizer, Tokenizer

HELDOUT_START = 2**40
"""First index of the held-out evaluation range (training reads indices from 0 upwards)."""
MAX_PASSKEY_DIGITS = 18
"""Passkeys are drawn as int64, so at most 18 digits."""
RECALL_KEY_LETTERS = 3
RECALL_KEYS = len(ascii_lowercase) ** RECALL_KEY_LETTERS

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``model_fn(tokens_BS, positions_BS, doc_ids_BS) -> logits_BSV`` (int64 inputs, float logits)."""


def heldout_indices(count: int) -> range:
    """The first ``count`` indices of the held-out range, disjoint from every training index."""
    return range(HELDOUT_START, HELDOUT_START + count)


def answer_positions(sample: Sample) -> torch.Tensor:
    """Input positions whose target is an answer token (the only targets that are not IGNORE_INDEX): int64 (A,)."""
    return (sample["targets_S"] != IGNORE_INDEX).nonzero().squeeze(-1)


def _index_generator(seed: int, index: int) -> torch.Generator:
    if index < 0:
        raise IndexError(f"synthetic sample indices are ≥ 0, got {index}")
    return torch.Generator().manual_seed(derive_seed(seed, index))


def _filler(tokenizer: Tokenizer, length: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """``length`` tokens of prose and the sentence boundaries inside them (0 and ``length`` included)."""
    ids: list[int] = []
    boundaries = [0]
    sentences = filler_sentences(rng)
    while len(ids) < length:
        sentence = next(sentences)
        ids.extend(tokenizer.encode(" " + sentence if ids else sentence))
        boundaries.append(min(len(ids), length))
    return ids[:length], boundaries


def _haystack_sample(
    tokenizer: Tokenizer,
    seq_len: int,
    generator: torch.Generator,
    needles: Sequence[str],
    question: str,
    answer: str,
) -> Sample:
    """Hide ``needles`` at random sentence boundaries of filler, end with ``question`` + ``answer``; S = seq_len."""
    needle_ids = [tokenizer.encode(needle) for needle in needles]
    question_ids, answer_ids = tokenizer.encode(question), tokenizer.encode(answer)
    fixed = sum(map(len, needle_ids)) + len(question_ids) + len(answer_ids)
    filler_len = seq_len + 1 - fixed
    if filler_len < 0:
        raise ValueError(
            f"seq_len={seq_len} is too short for this task: its needles, question and answer alone take {fixed} "
            f"tokens; use seq_len ≥ {fixed - 1}."
        )
    # Python's Random is much faster than torch for the many small choices of the prose; seed it from the
    # per-index generator so the sample stays a function of (seed, index).
    filler_rng = random.Random(int(torch.randint(2**62, (1,), generator=generator)))
    filler, boundaries = _filler(tokenizer, filler_len, filler_rng)
    boundaries_K = torch.tensor(boundaries)
    depths_N = torch.rand(len(needles), generator=generator) * filler_len
    cuts = boundaries_K[(boundaries_K[None, :] - depths_N[:, None]).abs().argmin(dim=1)].tolist()
    stream: list[int] = []
    previous = 0
    for cut, ids in sorted(zip(cuts, needle_ids, strict=True), key=lambda pair: pair[0]):
        stream += filler[previous:cut] + ids
        previous = cut
    stream += filler[previous:] + question_ids + answer_ids
    stream_W = torch.tensor(stream, dtype=torch.int64)  # W = S + 1
    targets_S = torch.full((seq_len,), IGNORE_INDEX, dtype=torch.int64)
    targets_S[seq_len - len(answer_ids) :] = stream_W[seq_len + 1 - len(answer_ids) :]
    return Sample(
        tokens_S=stream_W[:-1],
        targets_S=targets_S,
        positions_S=torch.arange(seq_len),
        doc_ids_S=torch.zeros(seq_len, dtype=torch.int64),
    )


class _HaystackTask(abc.ABC):
    """What both tasks share: validation, the infinite-source attributes and per-sample scoring."""

    has_accuracy = True
    num_samples: int | None = None

    def __init__(self, seq_len: int, seed: int, tokenizer: Tokenizer | None, task: str) -> None:
        if seed < 0:
            raise ValueError(f"seed must be ≥ 0, got {seed}")
        self.tokenizer = tokenizer or ByteTokenizer()
        self.seq_len = seq_len
        self.seed = seed
        self.vocab_size = self.tokenizer.vocab_size
        self.identity = f"{task}, seq_len={seq_len}, seed={seed}, tokenizer={self.tokenizer.name}"
        self[0]  # a seq_len too short for the task fails here, not in the middle of training

    @abc.abstractmethod
    def __getitem__(self, index: int) -> Sample:
        """Sample ``index`` (any int ≥ 0), a pure function of (seed, index)."""

    def sample_correct(self, model_fn: ModelFn, indices: Sequence[int]) -> list[bool]:
        """:func:`sample_correct` over this task's samples ``indices`` (use :func:`heldout_indices` to evaluate)."""
        return sample_correct(model_fn, self, indices)


class PasskeySource(_HaystackTask):
    """Passkey retrieval: recall a ``digits``-digit number stated once at a random depth of ``seq_len`` tokens.

    Needle: " The pass key is 48213. Remember it."; question: " What is the pass key? The pass key is ";
    answer: the digits, the only targets. Infinite: any index ≥ 0 gives a sample.
    """

    def __init__(self, seq_len: int, digits: int, seed: int, tokenizer: Tokenizer | None = None) -> None:
        if not 1 <= digits <= MAX_PASSKEY_DIGITS:
            raise ValueError(f"passkey digits must lie in [1, {MAX_PASSKEY_DIGITS}], got {digits}")
        self.digits = digits
        super().__init__(seq_len, seed, tokenizer, f"passkey digits={digits}")

    def __getitem__(self, index: int) -> Sample:
        generator = _index_generator(self.seed, index)
        key = str(int(torch.randint(10 ** (self.digits - 1), 10**self.digits, (1,), generator=generator)))
        return _haystack_sample(
            self.tokenizer,
            self.seq_len,
            generator,
            needles=[f" The pass key is {key}. Remember it."],
            question=" What is the pass key? The pass key is ",
            answer=key,
        )


class AssociativeRecallSource(_HaystackTask):
    """Multi-key associative recall: ``num_pairs`` statements "The value of kqz is 47." scattered through
    ``seq_len`` tokens of prose (distinct 3-letter keys, 2-digit values), then a query of one key; the value's
    tokens are the only targets. Infinite: any index ≥ 0 gives a sample.
    """

    def __init__(self, seq_len: int, num_pairs: int, seed: int, tokenizer: Tokenizer | None = None) -> None:
        if not 1 <= num_pairs <= RECALL_KEYS:
            raise ValueError(f"num_pairs must lie in [1, {RECALL_KEYS}], got {num_pairs}")
        self.num_pairs = num_pairs
        super().__init__(seq_len, seed, tokenizer, f"associative_recall num_pairs={num_pairs}")

    def __getitem__(self, index: int) -> Sample:
        generator = _index_generator(self.seed, index)
        codes = torch.randperm(RECALL_KEYS, generator=generator)[: self.num_pairs].tolist()
        keys = [
            "".join(ascii_lowercase[code // 26**i % 26] for i in range(RECALL_KEY_LETTERS)) for code in codes
        ]
        values = torch.randint(10, 100, (self.num_pairs,), generator=generator).tolist()
        query = int(torch.randint(self.num_pairs, (1,), generator=generator))
        return _haystack_sample(
            self.tokenizer,
            self.seq_len,
            generator,
            needles=[f" The value of {key} is {value}." for key, value in zip(keys, values, strict=True)],
            question=f" What is the value of {keys[query]}? The value of {keys[query]} is ",
            answer=str(values[query]),
        )


def sample_correct(
    model_fn: ModelFn, source: Source, indices: Sequence[int], *, batch_size: int = 16
) -> list[bool]:
    """Per sample of ``indices``: do the greedy, teacher-forced predictions match every answer token?

    The prediction at a position is the argmax of ``model_fn``'s logits there; the answer positions are the
    targets that are not IGNORE_INDEX (a sample without any counts as wrong). Runs under ``torch.no_grad``.
    """
    correct: list[bool] = []
    with torch.no_grad():
        for first in range(0, len(indices), batch_size):
            samples = [source[i] for i in indices[first : first + batch_size]]
            targets_BS = torch.stack([s["targets_S"] for s in samples])
            logits_BSV = model_fn(
                torch.stack([s["tokens_S"] for s in samples]),
                torch.stack([s["positions_S"] for s in samples]),
                torch.stack([s["doc_ids_S"] for s in samples]),
            )
            correct += answers_correct(logits_BSV, targets_BS)
    return correct


def answers_correct(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> list[bool]:
    """Per row: does the argmax of ``logits_BSV`` match every target that is not IGNORE_INDEX (and is there one)?"""
    scored_BS = targets_BS != IGNORE_INDEX
    hit_BS = (logits_BSV.argmax(dim=-1).to(targets_BS.device) == targets_BS) | ~scored_BS
    return (hit_BS.all(dim=1) & scored_BS.any(dim=1)).tolist()


def accuracy(model_fn: ModelFn, source: Source, indices: Sequence[int], *, batch_size: int = 16) -> float:
    """Exact-match accuracy in [0, 1] of greedy, teacher-forced answers over samples ``indices`` of ``source``.

    ``model_fn(tokens_BS, positions_BS, doc_ids_BS) -> logits_BSV``; see :func:`sample_correct`.
    """
    if len(indices) == 0:
        raise ValueError("accuracy needs at least one sample index")
    correct = sample_correct(model_fn, source, indices, batch_size=batch_size)
    return sum(correct) / len(correct)
