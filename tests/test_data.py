"""Data pipeline: corpus, tokenizer, shards, sampler, prepare_data cache, unigram baseline."""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import pytest
import torch

from flyer.config import ConfigError, preset
from flyer.errors import FieldError
from flyer.data import (
    EOS_TOKEN, BatchSampler, DataError, ShardWriter, TokenShards, clean_markdown, eval_batches,
    find_documents, prepare_data, split_documents, train_bpe, write_shard,
)

SAMPLE = "Now is the winter of our discontent\nMade glorious summer by this sun of York; — naïve 🎭 café\n"


# The training tests' vocabulary (the tiny preset's) in their cache: the suite builds the Shakespeare BPE once
# per worker, not once more here at 8192 (35 s of CPU for the same code path).
VOCAB = preset("tiny").vocab_size


@pytest.fixture(scope="session")
def shakespeare(data_cache):
    t0 = time.perf_counter()
    data = prepare_data(None, data_cache, vocab_size=VOCAB)
    return data, data_cache, time.perf_counter() - t0


def _text_dir(root, n_files=6):
    words = ("thou art more lovely and more temperate rough winds do shake the darling buds of may "
             "and summer's lease hath all too short a date").split()
    rng = np.random.default_rng(0)
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    texts = {}
    for i in range(n_files):
        rel = ["a.txt", "b.md", "sub/c.txt", "sub/deeper/d.txt", "sub/e.TXT", "f.txt"][i]
        text = "\n".join(" ".join(rng.choice(words, 12)) for _ in range(150)) + "\n"
        (root / rel).write_text(text)
        texts[rel] = text
    (root / "notes.py").write_text("print('not text')\n")
    (root / ".hidden" / "x.txt").write_text("hidden\n")
    return texts


def _shards(tmp_path, tokens, shard_tokens, vocab=1000):
    w = ShardWriter(tmp_path, "t", vocab, shard_tokens)
    w.add(tokens)
    return TokenShards(w.close())


# ---- tokenizer ----------------------------------------------------------------------------

def test_tokenizer_round_trip():
    tok = train_bpe([SAMPLE * 20, "The quick brown fox jumps over the lazy dog.\n" * 20], vocab_size=300)
    assert tok.token_to_id(EOS_TOKEN) is not None
    assert tok.get_vocab_size() <= 300
    for text in (SAMPLE, "unseen 漢字 bytes \x00\t ~", ""):
        assert tok.decode(tok.encode(text).ids) == text


def test_bpe_training_sees_long_runs_cut(monkeypatch):
    """A run of thousands of characters without a space (a minified line, a base64 blob) reaches the BPE trainer in
    words of at most TRAIN_WORD_CHARS (one whole, each merge would rescan it: quadratic); other text as it is, and
    the tokenizer still encodes the whole run and decodes it back."""
    from tokenizers import Tokenizer

    from flyer.data.tokenizer import TRAIN_WORD_CHARS

    seen = []
    train = Tokenizer.train_from_iterator
    monkeypatch.setattr(Tokenizer, "train_from_iterator",
                        lambda self, it, trainer: train(self, seen.extend(it) or seen, trainer=trainer))
    blob = "".join(chr(97 + (i * 7919) % 26) for i in range(10_000))
    tok = train_bpe(["plain words here\n" * 50, "head " + blob + " tail"], 400)
    assert seen[0] == "plain words here\n" * 50
    assert "".join(seen[1:]) == "head " + blob + " tail"
    assert max(len(w) for t in seen for w in t.split()) == TRAIN_WORD_CHARS
    assert tok.decode(tok.encode(blob).ids) == blob


def test_clean_markdown():
    md = ("# Play\n\n### SCENE I. A room.\n\n_Enter IAGO_\n\n**IAGO**  \nI--God bless\\--the mark! __\\[Aside]_  \n"
          "snake_case stays\n\n\n\nEnd")
    out = clean_markdown(md)
    assert out == ("Play\n\nSCENE I. A room.\n\nEnter IAGO\n\nIAGO\nI--God bless--the mark! [Aside]\n"
                   "snake_case stays\n\nEnd\n")


# ---- shards -------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab", [1000, 70000])  # uint16 and uint32 payloads
def test_shard_round_trip(tmp_path, vocab):
    tokens = np.random.default_rng(1).integers(0, vocab, 5000)
    path = write_shard(tmp_path / "s.bin", tokens, vocab)
    assert path.stat().st_size == 64 + 5000 * (2 if vocab <= 65536 else 4)
    shards = TokenShards([path])
    assert len(shards) == 5000 and shards.vocab_size == vocab
    got = shards.read(0, 5000)
    assert got.dtype == np.int64 and np.array_equal(got, tokens)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic write left no temp


def test_corrupt_shard_detected(tmp_path):
    path = write_shard(tmp_path / "s.bin", np.arange(1000) % 500, 500)
    raw = bytearray(path.read_bytes())
    raw[64 + 777] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="failed its checksum") as e:
        TokenShards([path])
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    TokenShards([path], verify=False)  # the map itself still opens
    path.write_bytes(bytes(raw[:-3]))
    with pytest.raises(DataError, match="truncated"):
        TokenShards([path])
    path.write_bytes(b"NOTASHRD" + bytes(raw[8:]))
    with pytest.raises(DataError, match="bad magic"):
        TokenShards([path])


def test_reads_span_shard_boundaries(tmp_path):
    tokens = np.arange(50) * 3 % 997
    shards = _shards(tmp_path, tokens, shard_tokens=7)
    assert len(shards.paths) == 8 and len(shards) == 50
    for start in range(0, 50):
        for length in (0, 1, 6, 7, 8, 15, 50 - start):
            if start + length <= 50:
                assert np.array_equal(shards.read(start, length), tokens[start:start + length])
    with pytest.raises(IndexError):
        shards.read(45, 6)


# ---- sampler ------------------------------------------------------------------------------

def test_sampler_determinism_and_resume(tmp_path):
    tokens = np.random.default_rng(2).integers(0, 1000, 3000)
    shards = _shards(tmp_path, tokens, shard_tokens=500)
    a = BatchSampler(shards, batch_size=4, seq_len=16, seed=7)
    batches = [a.next_batch() for _ in range(6)]
    x, y = batches[0]
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y):  # each row is a contiguous window of the stream
        s = int(np.flatnonzero(np.lib.stride_tricks.sliding_window_view(tokens, 16).__eq__(row_x.numpy()).all(1))[0])
        assert row_y[-1].item() == tokens[s + 16]

    b = BatchSampler(shards, 4, 16, seed=7)
    for bx, by in batches:
        cx, cy = b.next_batch()
        assert torch.equal(bx, cx) and torch.equal(by, cy)

    # resume at position 3 from a JSON round-tripped state
    c = BatchSampler(shards, 4, 16, seed=7)
    [c.next_batch() for _ in range(3)]
    state = json.loads(json.dumps(c.state_dict()))
    assert state["position"] == 3 and state["seed"] == 7
    d = BatchSampler(shards, 4, 16, seed=999)  # saved seed wins
    d.load_state_dict(state)
    for bx, _ in batches[3:]:
        assert torch.equal(d.next_batch()[0], bx)

    other = BatchSampler(shards, 4, 16, seed=8)
    assert not torch.equal(other.next_batch()[0], batches[0][0])

    with pytest.raises(DataError, match="batch_size=4"):
        BatchSampler(shards, 8, 16, seed=7).load_state_dict(state)
    with pytest.raises(FieldError, match="^seq_len: the training split has 3000 tokens"):
        BatchSampler(shards, 4, 3000, seed=7)


def test_eval_batches(tmp_path):
    tokens = np.arange(1000) % 997
    shards = _shards(tmp_path, tokens, shard_tokens=300)
    ev = eval_batches(shards, batch_size=3, seq_len=10, n_batches=4)
    again = eval_batches(shards, 3, 10, 4)
    assert len(ev) == 4 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ev, again))
    starts = torch.cat([x[:, 0] for x, _ in ev])
    assert starts[0] == 0 and starts[-1] == 1000 - 11  # evenly spaced from the start to the end
    assert torch.equal(ev[1][0][:, 1:], ev[1][1][:, :-1])
    with pytest.raises(FieldError, match=r"validation split has 1000 tokens, fewer than seq_len \+ 1 = 1001"):
        eval_batches(shards, 1, 1000, 1)


# ---- corpus, prepare_data, cache ----------------------------------------------------------

def test_custom_data_dir(tmp_path):
    texts = _text_dir(tmp_path / "corpus")
    docs = find_documents(tmp_path / "corpus")
    assert sorted(d.name for d in docs) == sorted(texts)  # .py and hidden files skipped
    train_docs, val_docs = split_documents(docs, 0.2)
    assert 1 <= len(val_docs) <= 2 and set(train_docs).isdisjoint(val_docs)

    t0 = time.perf_counter()
    data = prepare_data(tmp_path / "corpus", tmp_path / "cache", vocab_size=512, val_fraction=0.2)
    cold = time.perf_counter() - t0
    assert data.vocab_size == data.tokenizer.get_vocab_size() <= 512
    assert data.tokenizer.id_to_token(data.eos_id) == EOS_TOKEN
    assert data.tokenizer_path.is_file() and data.cache_dir.parent == tmp_path / "cache"
    # the shards decode back to the documents, each followed by <|endoftext|>
    ids = data.train.read(0, len(data.train)).tolist() + data.val.read(0, len(data.val)).tolist()
    assert sum(i == data.eos_id for i in ids) == len(texts)
    decoded = data.tokenizer.decode(ids, skip_special_tokens=False).split(EOS_TOKEN)
    assert sorted(decoded[:-1]) == sorted(texts.values())

    t0 = time.perf_counter()
    again = prepare_data(str(tmp_path / "corpus"), tmp_path / "cache", vocab_size=512, val_fraction=0.2)
    assert again.train.paths == data.train.paths and time.perf_counter() - t0 < max(cold, 0.5)

    # a given tokenizer.json is used as-is; shards match
    given = prepare_data(tmp_path / "corpus", tmp_path / "cache2", tokenizer=data.tokenizer_path, val_fraction=0.2)
    assert np.array_equal(given.train.read(0, len(given.train)), data.train.read(0, len(data.train)))

    # a changed source file gives a new cache key
    (tmp_path / "corpus" / "a.txt").write_text("something new entirely\n" * 50)
    changed = prepare_data(tmp_path / "corpus", tmp_path / "cache", vocab_size=512, val_fraction=0.2)
    assert changed.cache_dir != data.cache_dir

    # a corrupted cached shard is detected and rebuilt
    p = changed.train.paths[0]
    expected = changed.train.read(0, len(changed.train))
    raw = bytearray(p.read_bytes())
    raw[70] ^= 0xFF
    p.write_bytes(bytes(raw))
    rebuilt = prepare_data(tmp_path / "corpus", tmp_path / "cache", vocab_size=512, val_fraction=0.2)
    assert np.array_equal(rebuilt.train.read(0, len(rebuilt.train)), expected)
    TokenShards(rebuilt.train.paths)  # checksums verify again


def test_single_file_is_split_by_tail(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("".join(f"line {i} of the only document\n" for i in range(400)))
    data = prepare_data(f, tmp_path / "cache", vocab_size=300, val_fraction=0.1)
    assert len(data.val) > 0 and len(data.train) > 5 * len(data.val)
    assert data.tokenizer.decode(data.val.read(0, len(data.val)).tolist()).startswith("line 36")


def test_user_errors(tmp_path):
    cache = tmp_path / "cache"
    cases = [
        (tmp_path / "missing", {}, "does not exist"),
        (tmp_path / "emptydir", {}, "contains no .txt or .md files"),
        (tmp_path / "blank", {}, "corpus is empty"),
        (tmp_path / "latin1.txt", {}, "not UTF-8"),
        (tmp_path / "blank", {"vocab_size": 100}, "vocab_size must be an integer >= 257"),
        (tmp_path / "ok.txt", {"val_fraction": 0.9}, "val_fraction"),
        (tmp_path / "ok.txt", {"tokenizer": tmp_path / "ok.txt"}, "not a valid tokenizer.json"),
        (tmp_path / "fifo.txt", {}, "fifo.txt' is not a regular file"),  # its read would wait for a writer
        (tmp_path / "withfifo", {}, "fifo.txt' is not a regular file"),
    ]
    os.mkfifo(tmp_path / "fifo.txt")
    (tmp_path / "withfifo").mkdir()
    os.mkfifo(tmp_path / "withfifo" / "fifo.txt")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "ok.txt").write_text("hello\n" * 10)
    for data, kw, msg in cases:
        with pytest.raises(DataError, match=msg) as e:
            prepare_data(data, cache, **kw)
        assert isinstance(e.value, ConfigError) and isinstance(e.value, ValueError)
        assert "\n" not in str(e.value)
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.txt"
        locked.write_text("secret\n")
        locked.chmod(0)
        with pytest.raises(DataError, match="not readable"):
            prepare_data(locked, cache)


# ---- default corpus -----------------------------------------------------------------------

def test_default_corpus(shakespeare):
    data, cache, _ = shakespeare
    assert data.vocab_size == VOCAB
    assert len(data.train) > 1_000_000 and len(data.val) > 20_000
    assert len(data.train.paths) >= 2  # the training stream spans shard files
    meta = json.loads((data.cache_dir / "meta.json").read_text())
    assert 1 <= len(meta["val_documents"]) < 5 and not set(meta["val_documents"]) & set(meta["train_documents"])
    text = data.tokenizer.decode(data.train.read(0, 2000).tolist())
    assert "**" not in text and "\\[" not in text and "ACT I" in text
    t0 = time.perf_counter()
    cached = prepare_data(None, cache, vocab_size=VOCAB)
    assert time.perf_counter() - t0 < 1.0 and cached.val.paths == data.val.paths


def test_unigram_baseline(shakespeare):
    data, _, _ = shakespeare
    assert 0.0 < data.unigram_val_loss < math.log(data.vocab_size)
    # a uniform model is worse, and the fitted unigram is close to the val split's own entropy
    counts = np.bincount(data.val.read(0, len(data.val)), minlength=data.vocab_size)
    p = counts[counts > 0] / counts.sum()
    val_entropy = float(-(p * np.log(p)).sum())
    assert val_entropy <= data.unigram_val_loss < val_entropy + 0.5


def test_given_tokenizer_without_eos_gets_one(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = tmp_path / "corpus"
    _text_dir(corpus)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([SAMPLE] * 5, trainers.BpeTrainer(vocab_size=280, show_progress=False,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    data = prepare_data(corpus, tmp_path / "cache", tokenizer=tmp_path / "tokenizer.json", val_fraction=0.2)
    assert data.vocab_size == tok.get_vocab_size() + 1
    assert data.tokenizer.id_to_token(data.eos_id) == EOS_TOKEN
    assert data.train.read(len(data.train) - 1, 1)[0] == data.eos_id
