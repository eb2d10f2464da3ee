"""Data pipeline: tokenizers, the zarr token store, packing, the step loader, synthetic tasks (tier 0)."""

from __future__ import annotations

import itertools
import json
import random
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsetron.config import DataConfig, TrainConfig
from sparsetron.train import data
from sparsetron.train.corpus import corpus_documents, public_domain_texts
from sparsetron.train.corpus.generator import filler_sentences, number_words
from sparsetron.train.data import (
    IGNORE_INDEX,
    PackedSource,
    StepLoader,
    StoreError,
    build_source,
    open_store,
    prepare_cli,
    prepare_corpus,
    prepare_store,
    write_store,
)
from sparsetron.train.synthetic import (
    HELDOUT_START,
    AssociativeRecallSource,
    PasskeySource,
    accuracy,
    answer_positions,
    heldout_indices,
)
from sparsetron.train.tokenizer import ByteTokenizer, TokenizerUnavailableError, load_tokenizer

BYTES = ByteTokenizer()
DOCS = [
    "The first document.\n\nIt has two paragraphs.",
    "Zweites Dokument: Grüße, ümlaut and 中文 characters.",
    "x",
    "A third, longer document " * 20,
]
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class WideTokenizer:
    """A stand-in for a tokenizer whose vocabulary needs uint32 ids (each character → 65000 + code point)."""

    name = "wide-test"
    vocab_size = 70_000
    eos_id = None

    def encode(self, text: str) -> list[int]:
        return [65_000 + ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i - 65_000) for i in ids)


def write_files(folder: Path, texts: list[str]) -> list[Path]:
    paths = []
    for number, text in enumerate(texts):
        path = folder / f"doc{number}.txt"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


@pytest.fixture
def small_shards(monkeypatch):
    """Shrink chunks and shards so that a few hundred tokens span several shard files."""
    monkeypatch.setattr(data, "CHUNK_TOKENS", 16)
    monkeypatch.setattr(data, "SHARD_TOKENS", 64)


# ---------------------------------------------------------------- tokenizers


@FAST
@given(st.text())
def test_byte_tokenizer_round_trips_any_text(text):
    ids = BYTES.encode(text)
    assert ids == list(text.encode("utf-8")) and all(0 <= i < 256 for i in ids)
    assert BYTES.decode(ids) == text


def test_byte_decode_replaces_a_split_character():
    ids = BYTES.encode("é")[:1]
    assert BYTES.decode(ids) == "\ufffd"
    assert (BYTES.vocab_size, BYTES.name, BYTES.eos_id) == (256, "bytes", None)


def test_missing_hf_tokenizer_is_a_clear_error():
    pytest.importorskip("transformers")
    with pytest.raises(
        TokenizerUnavailableError, match=r"'sparsetron-tests/no-such-tokenizer' is not available locally"
    ):
        load_tokenizer("sparsetron-tests/no-such-tokenizer")


def test_hf_tokenizer_from_a_local_directory(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    words = ["[UNK]", "<eos>", "the", "pass", "key", "is", "remember", "it"]
    backend = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]")
    )
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.decoder = tokenizers.decoders.WordPiece()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", eos_token="<eos>"
    ).save_pretrained(tmp_path / "tok")
    tokenizer = load_tokenizer(str(tmp_path / "tok"))
    assert (tokenizer.vocab_size, tokenizer.eos_id, tokenizer.name) == (8, 1, str(tmp_path / "tok"))
    assert tokenizer.encode("the pass key is banana") == [2, 3, 4, 5, 0]  # no BOS/EOS added
    assert tokenizer.decode([2, 3, 4]) == "the pass key"
    stats = prepare_store(write_files(tmp_path, ["the key", "it is"]), tmp_path / "s.zarr", tokenizer)
    store = open_store(stats.path)
    assert store.tokenizer == tokenizer.name and store.read(0, 4).tolist() == [2, 4, 7, 5]


# ---------------------------------------------------------------- token store


def test_store_round_trip(tmp_path):
    inputs = write_files(tmp_path, [DOCS[0], "", *DOCS[1:]])
    stats = prepare_store(inputs, tmp_path / "store.zarr", BYTES)
    store = open_store(tmp_path / "store.zarr")
    expected = [BYTES.encode(text) for text in DOCS]  # the empty file is skipped
    assert (store.n_docs, stats.n_docs, stats.skipped_empty) == (len(DOCS), len(DOCS), 1)
    assert [store.document(i).tolist() for i in range(store.n_docs)] == expected
    assert store.doc_offsets_D.tolist() == np.cumsum([0, *map(len, expected)]).tolist()
    assert store.read(0, store.n_tokens).tolist() == list(itertools.chain(*expected))
    assert store.read(3, 5).dtype == torch.int64
    group = zarr.open_group(tmp_path / "store.zarr", mode="r")
    assert group["tokens"].dtype == np.uint16 and group["doc_offsets"].dtype == np.int64
    assert group["tokens"].shards is not None
    assert dict(group.attrs) | {"text_sha256": None} == {
        "format": "sparsetron-token-store",
        "format_version": 1,
        "tokenizer": "bytes",
        "vocab_size": 256,
        "n_tokens": store.n_tokens,
        "n_docs": len(DOCS),
        "text_sha256": None,
    }
    summary = str(stats)
    assert (
        f"{len(DOCS)} documents" in summary
        and f"{store.n_tokens:,} tokens" in summary
        and "uint16" in summary
    )


def test_store_uses_uint32_when_the_vocabulary_needs_it(tmp_path):
    write_store(["héllo", "wörld"], tmp_path / "wide.zarr", WideTokenizer())
    store = open_store(tmp_path / "wide.zarr")
    assert zarr.open_group(tmp_path / "wide.zarr", mode="r")["tokens"].dtype == np.uint32
    assert WideTokenizer().decode(store.document(1).tolist()) == "wörld"


def test_store_spanning_several_shards_round_trips(tmp_path, small_shards):
    texts = [f"document {i}: " + "abcdefghij" * (i % 7) for i in range(40)]
    store = open_store(write_store(texts, tmp_path / "s.zarr", BYTES).path)
    assert store.read(0, store.n_tokens).tolist() == BYTES.encode("".join(texts))
    shard_files = list((tmp_path / "s.zarr" / "tokens" / "c").iterdir())
    assert len(shard_files) == -(-store.n_tokens // 64) > 3


def test_tokenizer_ids_outside_the_vocabulary_are_refused(tmp_path):
    class Broken(ByteTokenizer):
        vocab_size = 100

    with pytest.raises(ValueError, match=r"outside its vocabulary \[0, 100\)"):
        write_store(["é"], tmp_path / "s.zarr", Broken())
    assert not (tmp_path / "s.zarr").exists()


def corrupt_version(group):
    group.attrs["format_version"] = 99


def corrupt_offsets(group):
    group["doc_offsets"][2] = 1


def truncate_tokens(group):
    group["tokens"].resize((group["tokens"].shape[0] - 5,))


def drop_attributes(group):
    group.attrs["format"] = None


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (corrupt_version, r"format version 99, but this sparsetron reads version 1"),
        (corrupt_offsets, r"non-decreasing, but doc_offsets\[2\]=1 < doc_offsets\[1\]=\d+"),
        (truncate_tokens, r"last document ends at token \d+, but 'tokens' holds \d+ tokens \(truncated"),
        (drop_attributes, r"not a complete sparsetron token store"),
    ],
)
def test_corrupted_store_is_refused_with_a_clear_message(tmp_path, corrupt, message):
    path = write_store(DOCS, tmp_path / "s.zarr", BYTES).path
    corrupt(zarr.open_group(path, mode="r+"))
    with pytest.raises(StoreError, match=re.escape(str(path)) + ".*" + message):
        open_store(path)


def test_store_with_a_missing_shard_is_refused(tmp_path, small_shards):
    path = write_store(["0123456789" * 30], tmp_path / "s.zarr", BYTES).path
    (path / "tokens" / "c" / "1").unlink()
    with pytest.raises(StoreError, match="shard files of 'tokens' are missing"):
        open_store(path)


def test_missing_store_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(
        StoreError, match=r"nowhere.zarr does not exist; create it with `sparsetron data prepare"
    ):
        open_store(tmp_path / "nowhere.zarr")


def test_interrupted_prepare_leaves_nothing(tmp_path):
    def documents():
        yield "one"
        yield "two"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_store(documents(), tmp_path / "s.zarr", BYTES)
    assert list(tmp_path.iterdir()) == []


def test_killed_prepare_leaves_no_valid_looking_store(tmp_path):
    # os._exit skips every cleanup, as SIGKILL would; several shards are already on disk by then.
    script = f"""
import os
from pathlib import Path
from sparsetron.train import data
from sparsetron.train.tokenizer import ByteTokenizer
data.CHUNK_TOKENS, data.SHARD_TOKENS = 16, 64
def documents():
    for i in range(50):
        yield "some text " * 10
    os._exit(9)
data.write_store(documents(), Path({str(tmp_path / "s.zarr")!r}), ByteTokenizer())
"""
    assert subprocess.run([sys.executable, "-c", script], check=False).returncode == 9
    assert not (tmp_path / "s.zarr").exists()
    (leftover,) = tmp_path.iterdir()
    assert leftover.name.startswith(".s.zarr.partial-") and any((leftover / "tokens" / "c").iterdir())
    with pytest.raises(StoreError, match="an interrupted prepare leaves this state"):
        open_store(leftover)


def test_prepare_refuses_existing_output_missing_inputs_and_non_utf8(tmp_path):
    inputs = write_files(tmp_path, DOCS)
    prepare_store(inputs, tmp_path / "s.zarr", BYTES)
    with pytest.raises(FileExistsError, match="already exists"):
        prepare_store(inputs, tmp_path / "s.zarr", BYTES)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        prepare_store([*inputs, tmp_path / "nope.txt"], tmp_path / "t.zarr", BYTES)
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8"):
        prepare_store([tmp_path / "latin1.txt"], tmp_path / "t.zarr", BYTES)
    assert not (tmp_path / "t.zarr").exists()


def test_a_store_published_meanwhile_wins_and_the_loser_cleans_up(tmp_path):
    out = tmp_path / "s.zarr"

    def documents():
        yield "mine"
        write_store(["theirs"], out, BYTES)  # a concurrent writer publishes first
        yield "more of mine"

    with pytest.raises(FileExistsError, match="created by another process"):
        write_store(documents(), out, BYTES)
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]
    assert open_store(out).read(0, 6).tolist() == BYTES.encode("theirs")


def test_prepare_cli_returns_a_printable_summary(tmp_path):
    stats = prepare_cli([str(p) for p in write_files(tmp_path, DOCS)], str(tmp_path / "s.zarr"), "bytes")
    assert str(stats).startswith(f"wrote {tmp_path / 's.zarr'}: {len(DOCS)} documents")


# ---------------------------------------------------------------- packing


def brute_force_windows(documents: list[list[int]], seq_len: int) -> list[dict[str, list[int]]]:
    """Windows computed token by token from the raw documents, the way the packing rule is stated."""
    stream, doc_of, start_of = [], [], []
    for doc, ids in enumerate(d for d in documents if d):
        start_of += [len(stream)] * len(ids)
        doc_of += [doc] * len(ids)
        stream += ids
    windows = []
    for w in range((len(stream) - 1) // seq_len):
        span = range(w * seq_len, (w + 1) * seq_len)
        windows.append(
            {
                "tokens_S": [stream[j] for j in span],
                "targets_S": [stream[j + 1] if doc_of[j + 1] == doc_of[j] else IGNORE_INDEX for j in span],
                "positions_S": [j - max(start_of[j], w * seq_len) for j in span],
                "doc_ids_S": [doc_of[j] for j in span],
            }
        )
    return windows


@FAST
@given(
    documents=st.lists(st.lists(st.integers(0, 255), min_size=0, max_size=40), min_size=1, max_size=12),
    seq_len=st.integers(1, 24),
)
def test_packing_matches_a_brute_force_recomputation(documents, seq_len):
    if sum(map(len, documents)) < seq_len + 1:
        return
    texts = [bytes(ids).decode("latin-1") for ids in documents]

    class Latin1(ByteTokenizer):
        def encode(self, text):
            return list(text.encode("latin-1"))

    with tempfile.TemporaryDirectory() as folder:
        source = PackedSource(open_store(write_store(texts, Path(folder) / "s.zarr", Latin1()).path), seq_len)
        expected = brute_force_windows(documents, seq_len)
        assert len(source) == len(expected)
        for index, window in enumerate(expected):
            sample = source[index]
            assert {key: value.tolist() for key, value in sample.items()} == window
        # Every stream token (but those after the last full window) is an input exactly once, in order.
        inputs = torch.cat([source[i]["tokens_S"] for i in range(len(source))]).tolist()
        assert inputs == list(itertools.chain(*documents))[: len(source) * seq_len]


def test_packed_source_positions_and_documents_on_a_known_stream(tmp_path):
    store = open_store(write_store(["abc", "de", "fghij"], tmp_path / "s.zarr", BYTES).path)
    sample = PackedSource(store, 4)[1]  # stream tokens 4..8: e | f g h i (j is the last target)
    assert BYTES.decode(sample["tokens_S"].tolist()) == "efgh"
    assert sample["positions_S"].tolist() == [0, 0, 1, 2]
    assert sample["doc_ids_S"].tolist() == [1, 2, 2, 2]
    assert sample["targets_S"].tolist() == [IGNORE_INDEX, *BYTES.encode("ghi")]


def test_packed_source_needs_one_full_window(tmp_path):
    store = open_store(write_store(["abcd"], tmp_path / "s.zarr", BYTES).path)
    with pytest.raises(ValueError, match=r"holds 4 tokens, fewer than the seq_len \+ 1 = 5"):
        PackedSource(store, 4)
    with pytest.raises(IndexError):
        PackedSource(store, 3)[1]


# ---------------------------------------------------------------- step loader


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> PackedSource:
    path = tmp_path_factory.mktemp("packed") / "s.zarr"
    return PackedSource(open_store(write_store(DOCS * 3, path, BYTES).path), 16)


def loader(source, dp_rank=0, dp_size=1, micro=1, seed=7, global_batch=8, **kwargs) -> StepLoader:
    return StepLoader(
        source,
        seq_len=source.seq_len,
        global_batch_seqs=global_batch,
        micro_batch_size=micro,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=seed,
        **kwargs,
    )


def gathered(source, step, dp_size, micro) -> dict[str, torch.Tensor]:
    """One step's micro-batches of every rank, concatenated in rank order."""
    batches = [mb for r in range(dp_size) for mb in loader(source, r, dp_size, micro).batch(step)]
    return {
        name: torch.cat([getattr(mb, name) for mb in batches])
        for name in ("tokens_BS", "targets_BS", "positions_BS", "doc_ids_BS", "sample_indices_B")
    }


@pytest.mark.parametrize("source_kind", ["packed", "passkey"])
def test_global_batch_is_the_same_for_every_layout(packed, source_kind):
    source = packed if source_kind == "packed" else PasskeySource(96, 3, seed=1)
    for step in (0, 1, 5):
        reference = gathered(source, step, 1, 1)
        assert torch.equal(reference["sample_indices_B"], loader(source).global_indices(step))
        for dp_size, micro in ((2, 1), (2, 2), (4, 1), (4, 2), (1, 8)):
            got = gathered(source, step, dp_size, micro)
            assert all(torch.equal(got[name], reference[name]) for name in reference), (dp_size, micro)
    batches = loader(source, 1, 2, 2).batch(0)
    assert len(batches) == 2 and batches[0].tokens_BS.shape == (2, source.seq_len)
    assert batches[0].tokens_BS.dtype == torch.int64


def test_epochs_cover_every_sample_once_and_reshuffle(packed):
    n, global_batch = len(packed), 8
    steps = -(-3 * n // global_batch)
    flat = torch.cat([loader(packed).global_indices(s) for s in range(steps)]).tolist()
    epochs = [flat[e * n : (e + 1) * n] for e in range(3)]
    assert all(sorted(epoch) == list(range(n)) for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(n))
    assert (
        flat == torch.cat([loader(packed).global_indices(s) for s in range(steps)]).tolist()
    )  # deterministic
    assert set(flat[:global_batch]).isdisjoint(flat[global_batch : 2 * global_batch])
    assert loader(packed, seed=8).global_indices(0).tolist() != flat[:global_batch]
    assert loader(packed, shuffle=False).global_indices(1).tolist() == list(range(8, 16))


def test_infinite_sources_read_fresh_indices_in_order():
    source = AssociativeRecallSource(128, 2, seed=0)
    assert loader(source).global_indices(3).tolist() == list(range(24, 32))


def test_resume_from_state_dict_gives_the_same_batches(packed):
    first = loader(packed, dp_rank=1, dp_size=2, micro=2)
    for step in range(4):
        first.batch(step)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["next_step"] == 4
    resumed = loader(packed, dp_rank=1, dp_size=2, micro=2)
    resumed.load_state_dict(state)
    assert resumed.next_step == 4
    for step in range(4, 8):
        for a, b in zip(first.batch(step), resumed.batch(step), strict=True):
            assert torch.equal(a.tokens_BS, b.tokens_BS) and torch.equal(
                a.sample_indices_B, b.sample_indices_B
            )
    with pytest.raises(ValueError, match=r"seed: saved 7, now 8"):
        loader(packed, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match=r"num_samples: saved \d+, now None"):
        loader(PasskeySource(16 * 6, 1, 0)).load_state_dict(state)


def test_loader_validates_its_arguments(packed):
    with pytest.raises(
        ValueError, match=r"global_batch_seqs=6 is not divisible by dp_size × micro_batch_size = 4 × 1 = 4"
    ):
        loader(packed, dp_size=4, global_batch=6)
    with pytest.raises(ValueError, match=r"2 × 2 = 4"):
        loader(packed, dp_size=2, micro=2, global_batch=6)
    with pytest.raises(ValueError, match=r"dp_rank=2 must lie in \[0, dp_size=2\)"):
        loader(packed, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="sequences of 16 tokens, but seq_len=32"):
        StepLoader(packed, seq_len=32, global_batch_seqs=8, micro_batch_size=1, dp_rank=0, dp_size=1, seed=0)


# ---------------------------------------------------------------- synthetic tasks


def context_text(sample) -> str:
    return BYTES.decode(sample["tokens_S"].tolist())


def answer_text(sample) -> str:
    return BYTES.decode(sample["targets_S"][answer_positions(sample)].tolist())


def check_shape_and_targets(sample, seq_len: int, answer_len: int) -> None:
    assert all(t.shape == (seq_len,) and t.dtype == torch.int64 for t in sample.values())
    assert answer_positions(sample).tolist() == list(range(seq_len - answer_len, seq_len))
    # The answer is the continuation of the input: each answer target is the next input token.
    positions = answer_positions(sample)[:-1]
    assert torch.equal(sample["targets_S"][positions], sample["tokens_S"][positions + 1])
    assert sample["positions_S"].tolist() == list(range(seq_len))
    assert sample["doc_ids_S"].unique().numel() == 1


@FAST
@given(
    seq_len=st.integers(90, 600),
    digits=st.integers(1, 8),
    seed=st.integers(0, 2**31),
    index=st.integers(0, 2**41),
)
def test_passkey_samples(seq_len, digits, seed, index):
    source = PasskeySource(seq_len, digits, seed)
    sample = source[index]
    check_shape_and_targets(sample, seq_len, digits)
    key = answer_text(sample)
    assert re.fullmatch(rf"[1-9]\d{{{digits - 1}}}", key)
    assert f"The pass key is {key}. Remember it." in context_text(sample)
    assert context_text(sample).endswith("What is the pass key? The pass key is " + key[:-1])
    again = PasskeySource(seq_len, digits, seed)[index]
    assert all(torch.equal(sample[name], again[name]) for name in sample)


@FAST
@given(
    seq_len=st.integers(200, 700),
    pairs=st.integers(1, 6),
    seed=st.integers(0, 2**31),
    index=st.integers(0, 10**6),
)
def test_associative_recall_samples(seq_len, pairs, seed, index):
    sample = AssociativeRecallSource(seq_len, pairs, seed)[index]
    check_shape_and_targets(sample, seq_len, 2)
    text = context_text(sample)
    statements = re.findall(r"The value of ([a-z]{3}) is (\d\d)\.", text)
    assert len(statements) == pairs and len({key for key, _ in statements}) == pairs
    (query,) = re.findall(r"What is the value of ([a-z]{3})\?", text)
    assert (query, answer_text(sample)) in statements
    assert torch.equal(AssociativeRecallSource(seq_len, pairs, seed)[index]["tokens_S"], sample["tokens_S"])


def test_samples_differ_across_indices_and_seeds_and_the_haystack_varies():
    source = PasskeySource(2048, 5, seed=0)
    keys = {answer_text(source[i]) for i in range(20)}
    assert len(keys) > 15
    assert answer_text(PasskeySource(2048, 5, seed=1)[0]) != answer_text(source[0])
    sentences = re.split(r"(?<=[.?!\"]) ", context_text(source[0]))
    assert len(set(sentences)) > 0.8 * len(sentences) > 20
    depths = [context_text(source[i]).index("The pass key is") / 2048 for i in range(40)]
    assert min(depths) < 0.2 and max(depths) > 0.7


def test_heldout_indices_never_meet_training_indices():
    assert heldout_indices(3) == range(HELDOUT_START, HELDOUT_START + 3)
    assert HELDOUT_START > 10**12  # more sequences than any run trains on
    assert loader(PasskeySource(128, 5, 0)).global_indices(0).max() < HELDOUT_START


def test_too_short_a_sequence_is_refused_at_construction():
    needed = len(" The pass key is 12345. Remember it.") + len(" What is the pass key? The pass key is ") + 5
    with pytest.raises(
        ValueError, match=rf"seq_len=40 is too short for this task: .* use seq_len ≥ {needed - 1}\."
    ):
        PasskeySource(40, 5, 0)
    with pytest.raises(ValueError, match="digits must lie in"):
        PasskeySource(128, 0, 0)


def oracle(tokens_BS, positions_BS, doc_ids_BS):
    """Reads the answer out of the context (passkey or recall statement) and predicts every next token."""
    logits_BSV = torch.full((*tokens_BS.shape, 256), -1.0)
    for b, row in enumerate(tokens_BS.tolist()):
        text = BYTES.decode(row)
        query = re.search(r"What is the value of ([a-z]{3})\?", text)
        pattern = rf"The value of {query.group(1)} is (\d+)\." if query else r"The pass key is (\d+)\."
        answer = re.search(pattern, text).group(1)
        stream = [*row, BYTES.encode(answer)[-1]]
        logits_BSV[b, torch.arange(len(row)), torch.tensor(stream[1:])] = 1.0
    return logits_BSV


def random_digits(generator):
    def model_fn(tokens_BS, positions_BS, doc_ids_BS):
        logits_BSV = torch.full((*tokens_BS.shape, 256), -1e9)
        digits = list(BYTES.encode("0123456789"))
        logits_BSV[..., digits] = torch.rand((*tokens_BS.shape, 10), generator=generator)
        return logits_BSV

    return model_fn


def test_accuracy_of_an_oracle_is_one_and_of_guessing_is_chance():
    passkey, recall = PasskeySource(160, 1, 0), AssociativeRecallSource(256, 4, 0)
    assert accuracy(oracle, passkey, heldout_indices(40), batch_size=16) == 1.0
    assert accuracy(oracle, recall, range(40)) == 1.0
    assert recall.sample_correct(oracle, [0, 1]) == [True, True]
    guess = accuracy(random_digits(torch.Generator().manual_seed(0)), passkey, range(400))
    assert 0.05 < guess < 0.16  # one digit out of ten
    assert accuracy(random_digits(torch.Generator().manual_seed(0)), recall, range(200)) < 0.05
    assert accuracy(lambda t, p, d: torch.zeros((*t.shape, 256)), passkey, range(20)) == 0.0


def test_accuracy_is_exact_match_over_all_answer_tokens():
    source = PasskeySource(160, 4, 0)

    def last_digit_wrong(tokens_BS, positions_BS, doc_ids_BS):
        logits_BSV = oracle(tokens_BS, positions_BS, doc_ids_BS)
        logits_BSV[:, -1] = logits_BSV[:, -1].roll(1, dims=-1)
        return logits_BSV

    assert accuracy(last_digit_wrong, source, range(10)) == 0.0


# ---------------------------------------------------------------- corpus and build_source


def test_shipped_corpus_is_deterministic_sized_and_credited():
    documents = corpus_documents()
    assert documents == corpus_documents()
    assert 200_000 <= sum(len(d.encode("utf-8")) for d in documents) <= 500_000
    texts = public_domain_texts()
    assert "Four score and seven years ago" in texts["gettysburg_address.txt"]
    readme = (Path(data.__file__).parent / "corpus" / "README.md").read_text()
    assert all(name in readme for name in texts)
    sentences = filler_sentences(random.Random(0))
    assert not any(c.isdigit() for _ in range(500) for c in next(sentences))
    assert number_words(342) == "three hundred and forty-two" and number_words(40) == "forty"


def test_build_source_maps_every_config(tmp_path):
    train = TrainConfig(seq_len=128, seed=3)
    passkey = build_source(DataConfig(source="synthetic", task="passkey", passkey_digits=4), train, tmp_path)
    assert isinstance(passkey, PasskeySource) and (passkey.digits, passkey.seed, passkey.vocab_size) == (
        4,
        3,
        256,
    )
    recall = build_source(
        DataConfig(source="synthetic", task="associative_recall", recall_pairs=3), train, tmp_path
    )
    assert isinstance(recall, AssociativeRecallSource) and recall.num_pairs == 3 and recall.has_accuracy

    store = write_store(DOCS * 4, tmp_path / "s.zarr", BYTES).path
    packed = build_source(DataConfig(source="zarr", path=str(store)), train, tmp_path)
    assert isinstance(packed, PackedSource) and packed.store.path == store and not packed.has_accuracy
    with pytest.raises(ValueError, match="data.source=zarr needs data.path"):
        build_source(DataConfig(source="zarr"), train, tmp_path)
    with pytest.raises(StoreError, match="tokenised with 'bytes', but data.tokenizer is 'gpt2'"):
        build_source(DataConfig(source="zarr", path=str(store), tokenizer="gpt2"), train, tmp_path)
    with pytest.raises(ValueError, match="valid sources: synthetic, corpus, zarr"):
        build_source(DataConfig(source="web"), train, tmp_path)
    with pytest.raises(ValueError, match="valid tasks: passkey, associative_recall"):
        build_source(DataConfig(source="synthetic", task="sorting"), train, tmp_path)


def test_corpus_is_prepared_once_even_by_concurrent_ranks_and_then_reused(tmp_path):
    results, barrier = [], threading.Barrier(3)

    def rank():
        barrier.wait()
        results.append(build_source(DataConfig(source="corpus"), TrainConfig(seq_len=256), tmp_path))

    threads = [threading.Thread(target=rank) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3 and len({len(source) for source in results}) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["corpus.zarr"]
    store = results[0].store
    assert store.n_tokens == sum(len(BYTES.encode(d)) for d in corpus_documents())
    assert torch.equal(store.read(0, 64), torch.tensor(BYTES.encode(corpus_documents()[0])[:64]))
    stamp = (tmp_path / "corpus.zarr" / "zarr.json").stat().st_mtime_ns
    prepare_corpus(tmp_path, BYTES)
    assert (tmp_path / "corpus.zarr" / "zarr.json").stat().st_mtime_ns == stamp

    class Other(ByteTokenizer):
        name = "other"

    with pytest.raises(StoreError, match="tokenised with 'bytes'.*tokenizer 'other'.*delete"):
        prepare_corpus(tmp_path, Other())
