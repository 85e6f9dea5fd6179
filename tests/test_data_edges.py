"""Pretraining-data edges a mutation sweep of ``flyer.data.shards`` / ``corpus`` / ``prepare`` found unpinned: the
shard header's checks, the dtype boundary, the writer's names and bounds, the walk's order and hidden files, the
split's targets and location independence, the cache key's fields, the unigram baseline by hand, FIM's per-document
draws; and three defects (a cache served for another root's split, underscores beside non-ASCII letters deleted, a
negative FIM seed failing in numpy after the tokenizer was trained). Oracles: bytes, sizes and arithmetic by hand,
blake2b, numpy's generator."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flyer.data import TokenShards, prepare_data, write_shard
from flyer.data import shards
from flyer.data.corpus import Document, clean_markdown, find_documents, split_documents
from flyer.data.prepare import unigram_cross_entropy, unigram_from_counts
from flyer.data.shards import HEADER, ShardWriter
from flyer.errors import DataError, FieldError


def _corpus(d: Path, n: int = 6) -> Path:
    d.mkdir(parents=True)
    for i in range(n):
        (d / f"f{i}.txt").write_text("".join(f"line {j} of file {i} with some words\n" for j in range(60)))
    return d


def _rewrite(path: Path, **fields) -> None:
    """Rewrite header fields of shard ``path`` and its checksum with them (a file that is consistent, but says so)."""
    raw = path.read_bytes()
    magic, ver, isz, n, v, _ = HEADER.unpack(raw[:64])
    vals = {**dict(magic=magic, ver=ver, isz=isz, n=n, v=v), **fields}
    head = HEADER.pack(vals["magic"], vals["ver"], vals["isz"], vals["n"], vals["v"], b"")[:32]
    path.write_bytes(head + hashlib.blake2b(head + raw[64:], digest_size=32).digest() + raw[64:])


def _docs(sizes: dict[str, int]) -> list[Document]:
    """Documents by name and size (the split reads nothing else unless one document is cut)."""
    return [Document(Path(f"/nowhere/{n}"), n, s) for n, s in sizes.items()]


# ---- shards ----------------------------------------------------------------------------------------------------
def test_the_largest_id_of_a_16_bit_vocabulary_takes_two_bytes(tmp_path):
    p = write_shard(tmp_path / "a.bin", [65535], 65536)
    assert p.stat().st_size == 64 + 2 and TokenShards([p]).read(0, 1).tolist() == [65535]


@pytest.mark.parametrize("tokens", [[10], [-1], np.zeros((2, 2), int), [1.7, 2.9]],
                         ids=["vocab", "negative", "2-d", "float"])
def test_a_shard_refuses_ids_outside_the_vocabulary_and_other_shapes(tmp_path, tokens):
    with pytest.raises(ValueError):
        write_shard(tmp_path / "b.bin", tokens, 10)


def test_a_header_of_another_version_size_or_length_is_refused(tmp_path):
    """Each with a checksum that matches: the header's own checks."""
    for field, value, problem in (("ver", 0, "format version 0"), ("isz", 3, "unknown token size 3")):
        p = write_shard(tmp_path / "c.bin", [1, 2, 3], 10)
        _rewrite(p, **{field: value})
        with pytest.raises(DataError, match=problem):
            TokenShards([p])
    p = write_shard(tmp_path / "d.bin", [1, 2, 3], 10)
    p.write_bytes(p.read_bytes() + b"\0\0")
    with pytest.raises(DataError, match="truncated or corrupt"):
        TokenShards([p])


def test_shards_of_several_vocabularies_read_as_the_largest(tmp_path):
    s = TokenShards([write_shard(tmp_path / "e.bin", np.array([], int), 100), write_shard(tmp_path / "f.bin",
                                                                                          [5, 150], 200)])
    assert len(s) == 2 and s.vocab_size == 200 and s.read(0, 2).tolist() == [5, 150]
    for start, length in ((-1, 1), (0, -1)):
        with pytest.raises(IndexError):
            s.read(start, length)
    assert s.read(np.int64(1), np.int32(1)).tolist() == [150]
    for start, length in ((0, 1.5), (0.5, 1)):
        with pytest.raises(TypeError):
            s.read(start, length)


def test_the_writer_names_its_shards_in_order_and_needs_a_size(tmp_path):
    with pytest.raises(ValueError):
        ShardWriter(tmp_path, "t", 10, 0)  # else every add() writes empty shards forever
    w = ShardWriter(tmp_path, "t", 10, 2)
    w.add(np.arange(5))
    assert [p.name for p in w.close()] == ["t-00000.bin", "t-00001.bin", "t-00002.bin"]


def test_a_failed_shard_write_leaves_no_temporary(tmp_path, monkeypatch):
    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shards.os, "replace", full)
    with pytest.raises(OSError):
        write_shard(tmp_path / "h.bin", [1, 2], 10)
    assert list(tmp_path.iterdir()) == []


# ---- corpus ----------------------------------------------------------------------------------------------------
def test_an_upper_case_md_suffix_is_cleaned(tmp_path):
    (tmp_path / "a.MD").write_text("# Title\n**X**\n")
    assert find_documents(tmp_path)[0].text() == "Title\nX\n"


def test_a_single_file_is_cut_at_the_line_before_its_tail(tmp_path):
    text = "".join(f"l{i}\n" for i in range(10))
    (tmp_path / "one.txt").write_text(text)
    train, val = split_documents(find_documents(tmp_path / "one.txt"), 0.2)
    assert train[0].text() == text[:24] and val[0].text() == "l8\nl9\n"


def test_the_walk_is_sorted_skips_hidden_files_and_keeps_a_files_first_name(tmp_path):
    for rel in ["b.txt", "a.txt", ".h.txt"] + [f"{d}/x.txt" for d in ["d3", "d0", "d5", "d1", "d4", "d2"]]:
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text("t\n")
    assert [d.name for d in find_documents(tmp_path)] == ["a.txt", "b.txt"] + [f"d{i}/x.txt" for i in range(6)]
    docs = find_documents([tmp_path / "d0", tmp_path])  # d0/x.txt reached twice: one document, its first name
    assert len(docs) == 8 and docs[0].name == "x.txt"


@pytest.mark.parametrize("md,out", [("a\n\n\nb", "a\n\nb\n"), ("# T\r\nx  \r\n", "T\nx\n"), ("\n\nx", "x\n"),
                                    ("naïve_flag, café_noir, x_été, snake_case, _emph_\n",
                                     "naïve_flag, café_noir, x_été, snake_case, emph\n")])
def test_clean_markdown_edges(md, out):
    """Blank runs, CRLF, leading blank lines; underscores inside words of any script are kept (those beside a
    non-ASCII letter were deleted: café_noir became cafénoir)."""
    assert clean_markdown(md) == out


def test_the_split_meets_its_target_and_keeps_a_train_document():
    assert len(split_documents(_docs({f"d{i}": 100 for i in range(4)}), 0.25)[1]) == 1  # the target exactly
    assert len(split_documents(_docs({f"d{i}": 100 for i in range(10)}), 0.15)[1]) == 2  # up to twice it
    first, last = sorted("ab", key=lambda n: hashlib.blake2b(n.encode(), digest_size=8).digest())
    train, val = split_documents(_docs({first: 1, last: 10}), 0.5)
    assert [d.name for d in train] == [last] and [d.name for d in val] == [first]


def test_the_split_depends_on_the_names_not_the_location():
    here = [Document(Path(f"/x/{i}.txt"), f"{i}.txt", 100) for i in range(8)]
    there = [Document(Path(f"/elsewhere/y/{i}.txt"), f"{i}.txt", 100) for i in range(8)]
    assert [d.name for d in split_documents(here, 0.2)[1]] == [d.name for d in split_documents(there, 0.2)[1]]


# ---- prepare ---------------------------------------------------------------------------------------------------
def test_the_same_files_under_another_root_are_their_own_split(tmp_path):
    """The names decide the split, and the same files reached from another root have other names: the cache of
    the first call was served to the second, its split not the one the second's names give."""
    root = tmp_path / "root"
    corpus = _corpus(root / "corpus", 8)
    a = prepare_data(corpus, tmp_path / "cache", vocab_size=300, val_fraction=0.2)
    b = prepare_data(root, tmp_path / "cache", vocab_size=300, val_fraction=0.2)
    assert a.cache_dir != b.cache_dir
    val = json.loads((b.cache_dir / "meta.json").read_text())["val_documents"]
    assert val == [d.name for d in split_documents(find_documents(root), 0.2)[1]]


def test_the_cache_key_holds_what_changes_the_shards(tmp_path):
    """Another validation share, a same-size edit: another cache; a given tokenizer: the vocabulary size is not
    part of it. A half is a share allowed."""
    c = _corpus(tmp_path / "c")
    a = prepare_data(c, tmp_path / "k", vocab_size=300, val_fraction=0.2)
    assert prepare_data(c, tmp_path / "k", vocab_size=300, val_fraction=0.4).cache_dir != a.cache_dir
    t1 = prepare_data(c, tmp_path / "k", tokenizer=a.tokenizer_path, vocab_size=300, val_fraction=0.25)
    assert prepare_data(c, tmp_path / "k", tokenizer=a.tokenizer_path, vocab_size=512,
                        val_fraction=np.float32(0.25)).cache_dir == t1.cache_dir  # a numpy float is a number
    assert len(prepare_data(c, tmp_path / "k", tokenizer=a.tokenizer_path, val_fraction=0.5).val) > 0
    f = c / "f0.txt"
    st = f.stat()
    f.write_text(f.read_text().replace("line", "LINE"))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    assert prepare_data(c, tmp_path / "k", vocab_size=300, val_fraction=0.2).cache_dir != a.cache_dir


def test_fim_arguments_are_refused_before_any_work(tmp_path):
    """A boolean rate, a tokenizer without FIM markers, a negative seed (numpy's own error, after the tokenizer had
    been trained and written): one line naming the field, and no cache directory."""
    c = _corpus(tmp_path / "c")
    a = prepare_data(c, tmp_path / "k", vocab_size=300)  # flyer's BPE without FIM has no markers
    for kw, field in ((dict(vocab_size=300, fim_rate=True), "fim_rate"),
                      (dict(tokenizer=a.tokenizer_path, fim_rate=0.5), "fim_rate"),
                      (dict(vocab_size=300, fim_rate=0.5, seed=-1), "seed")):
        with pytest.raises(FieldError, match=field):
            prepare_data(c, tmp_path / "k2", **kw)
        assert not (tmp_path / "k2").exists()


def test_the_unigram_baseline_by_hand(tmp_path):
    """Add-one smoothed train counts, (count + 1) / (N + V), scored on the validation tokens; none: 0."""
    train = TokenShards([write_shard(tmp_path / "t.bin", [0, 0, 0, 1], 3)])
    val = TokenShards([write_shard(tmp_path / "v.bin", [0, 1, 2], 3)])
    assert unigram_cross_entropy(train, val, 3) == pytest.approx(-np.log(np.array([4, 2, 1]) / 7).mean(), rel=1e-12)
    assert unigram_from_counts(np.ones(3), np.zeros(3)) == 0.0


def test_each_train_document_draws_its_fim_rewrite_from_the_seed_and_its_index(tmp_path):
    c = tmp_path / "c"
    c.mkdir()
    for k in range(40):
        (c / f"d{k:02d}.txt").write_text(f"document {k} holds a few words of text\n" * 3)
    data = prepare_data(c, tmp_path / "k", vocab_size=300, val_fraction=0.1, fim_rate=0.5, seed=5)
    n = len(json.loads((data.cache_dir / "meta.json").read_text())["train_documents"])
    begin = data.tokenizer.token_to_id("<\uff5cfim\u2581begin\uff5c>")
    tokens = data.train.read(0, len(data.train))
    docs = np.split(tokens, np.flatnonzero(tokens == data.eos_id) + 1)[:-1]
    assert [bool(d[0] == begin) for d in docs] == [np.random.default_rng((5, i)).random() < 0.5 for i in range(n)]


def test_a_vocabulary_just_past_16_bits_takes_four_bytes(tmp_path):
    """65,537 ids need 4 bytes a token: id 65,536 reads back as itself (2-byte storage would wrap it to 0)."""
    p = write_shard(tmp_path / "a.bin", [0, 65535, 65536], 65537)
    assert p.stat().st_size == 64 + 3 * 4 and TokenShards([p]).read(0, 3).tolist() == [0, 65535, 65536]


def test_the_unigram_baseline_counts_every_validation_shard(tmp_path):
    """The unigram baseline with add-one smoothing, its validation split over two shards: by hand, train [0, 2, 2]
    over 3 ids gives p = (2, 1, 3) / 6, and the validation tokens 0 and 1 cost -(log 2/6 + log 1/6) / 2."""
    train = TokenShards([write_shard(tmp_path / "t.bin", [0, 2, 2], 3)])
    val = TokenShards([write_shard(tmp_path / "v0.bin", [0], 3), write_shard(tmp_path / "v1.bin", [1], 3)])
    assert unigram_cross_entropy(train, val, 3) == pytest.approx(-(np.log(2 / 6) + np.log(1 / 6)) / 2, rel=1e-12)


def test_a_cache_whose_shards_are_of_another_vocabulary_is_rebuilt(tmp_path, capsys):
    """A cached build whose validation shards say another vocabulary than its tokenizer's is rebuilt, not used."""
    first = prepare_data(_corpus(tmp_path / "c"), tmp_path / "cache", vocab_size=300, val_fraction=0.2)
    for path in first.val.paths:
        write_shard(first.cache_dir / path.name, [1, 2, 3], first.vocab_size + 7)
    capsys.readouterr()
    again = prepare_data(tmp_path / "c", tmp_path / "cache", vocab_size=300, val_fraction=0.2)
    assert "rebuilding data cache" in capsys.readouterr().err
    assert again.val.vocab_size == again.train.vocab_size == again.vocab_size == first.vocab_size


# ---- a full disk while the cache is built ------------------------------------------------------------------------
def test_a_full_disk_while_building_the_cache_is_one_line_and_exit_2(tmp_path):
    """A real write failure, not a patched one: the file-size limit (RLIMIT_FSIZE; Python ignores SIGXFSZ, so the
    write fails with EFBIG in every library, as a full disk fails it) lets the tokenizer through and stops the first
    shard. The traceback and exit 1 it gave are now one line naming --data-cache and the cause, exit 2; no part of
    the build is taken as a cache (no meta.json, no temporary), and a run without the limit builds it."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):  # about 200 KB of text: shards of over 64 KiB, a 300-token tokenizer.json well under it
        (corpus / f"f{i}.txt").write_text("".join(f"line {j} of file {i}: {j * i * 7919} words\n" for j in range(700)))
    limit = 64 << 10

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cache = tmp_path / "cache"
    argv = ["train", "--preset", "tiny", "--data", str(corpus), "--vocab-size", "300", "--data-cache", str(cache),
            "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2", "--seq-len", "32", "--device", "cpu",
            "--threads", "1", "--no-plots", "--no-progress"]
    p = subprocess.run([sys.executable, "-m", "flyer", *argv], capture_output=True, text=True, preexec_fn=cap,
                       timeout=300, cwd=Path(__file__).resolve().parents[1])  # output to pipes: not capped
    build = next(cache.iterdir())
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1] == (f"flyer: error: --data-cache: cannot write the data cache {build} "
                                                 f"({os.strerror(errno.EFBIG)})"), p.stderr
    assert (build / "tokenizer.json").stat().st_size < limit  # what came before the failure was written
    assert not (build / "meta.json").exists() and not [f for f in build.iterdir() if f.name.endswith(".tmp")]
    assert not (tmp_path / "run").exists()
    data = prepare_data(corpus, cache, vocab_size=300)
    assert data.cache_dir == build and len(data.train) > limit // 2  # built whole: tokens of 2 bytes past the cap
