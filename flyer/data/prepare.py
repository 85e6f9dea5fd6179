"""``prepare_data``: corpus -> tokenizer -> token shards -> unigram baseline, cached on disk.

Everything lands in ``{cache_dir}/data-{key}/``::

    tokenizer.json          the tokenizer the shards were built with
    train-00000.bin ...     training shards (see flyer.data.shards for the format)
    val-00000.bin ...       held-out validation shards
    meta.json               written last; its presence marks a complete build

``key`` hashes the format versions, every source file's resolved path, size and mtime, the
vocab size, the validation fraction, the bytes of a given ``tokenizer.json``, and (only when it is
above 0, so that a build without FIM keeps its key) the FIM rate and seed; any change builds a
fresh directory. Builds take an exclusive ``flock`` so concurrent ranks build once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import numbers
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers

from flyer.data.corpus import CLEAN_VERSION, Document, find_documents, split_documents
from flyer.data.fim import DEEPSEEK, FAMILIES, FimTokens, fim_split, fim_tokens, text_tokenizer
from flyer.data.presplit import PreSplit, encode_batch, presplit_of, set_presplit
from flyer.data.shards import VERSION as SHARD_VERSION
from flyer.data.shards import ShardWriter, TokenShards, atomic_write
from flyer.data.tokenizer import check_vocab_size, ensure_eos, load_tokenizer, tokenizer_bytes, train_bpe
from flyer.errors import DataError, FieldError

PIPELINE_VERSION = 3  # 2: a special token's text in a document is text (FIM markers and EOS inserted as ids); 3: so
# are FIM markers and tag-like tokens a tokenizer holds as added tokens that are not special (DeepSeek's)
SHARD_TOKENS = 1 << 20  # 2 MiB uint16 shards: the default corpus spans a few files
_ENCODE_DOCS = 16  # documents per encode_batch call


@dataclass
class PreparedData:
    tokenizer: tokenizers.Tokenizer
    tokenizer_path: Path
    train: TokenShards  # concatenation of the train shards
    val: TokenShards
    vocab_size: int  # tokenizer.get_vocab_size()
    eos_id: int
    unigram_val_loss: float  # nats/token
    cache_dir: Path  # the data-{key} directory holding the files above
    baseline: str = "unigram baseline (validation, nats/token):"  # how the log and plot name unigram_val_loss


def prepare_data(data: str | Path | list | None, cache_dir: str | Path, vocab_size: int = 8192,
                 tokenizer: str | Path | None = None, val_fraction: float = 0.05, fim_rate: float = 0.0,
                 seed: int = 0) -> PreparedData:
    """Build (or reuse from ``cache_dir``) the tokenizer, train / val shards and unigram baseline.

    ``data``: ``None`` for the installed Shakespeare plays, else file(s) / directories of
    ``.txt`` / ``.md`` text. ``vocab_size``: size of the byte-level BPE trained on the train
    split (ignored when ``tokenizer`` names a ``tokenizer.json`` to use instead).
    ``val_fraction``: share of the corpus (by bytes, whole documents) held out for validation.
    ``fim_rate``: probability that a train document is rewritten as fill-in-the-middle (PSM, flyer.data.fim)
    before tokenization, decided per document from ``seed``; the tokenizer must hold FIM markers (flyer's own
    BPE gets DeepSeek's). Validation documents stay left-to-right, so validation loss compares across rates.
    User errors raise ``DataError`` (``FieldError`` naming ``fim_rate``) with a one-line message.
    """
    if tokenizer is None:
        check_vocab_size(vocab_size)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, numbers.Real) or not 0.0 < val_fraction <= 0.5:
        raise DataError(f"val_fraction must be in (0, 0.5] (got {val_fraction!r})")
    if isinstance(fim_rate, bool) or not isinstance(fim_rate, numbers.Real) or not 0.0 <= fim_rate <= 1.0:
        raise FieldError("fim_rate", f"must be a number in [0, 1] (got {fim_rate!r})")
    if fim_rate > 0 and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0):
        raise FieldError("seed", f"must be an integer >= 0, which draws each document's FIM rewrite (got {seed!r})")
    docs = find_documents(data)
    tok_bytes = None
    if tokenizer is not None:
        given = load_tokenizer(tokenizer)  # fail early on a bad file
        if fim_rate > 0:
            fim_markers(given, tokenizer)
        tok_bytes = tokenizer_bytes(tokenizer, given)

    key_src = {
        "pipeline": PIPELINE_VERSION, "shard_format": SHARD_VERSION, "clean": CLEAN_VERSION,
        # each document's name too: the split is decided from the names (the same files under another root split
        # anew)
        "files": [[str(d.path), d.name, d.size, d.path.stat().st_mtime_ns] for d in docs],
        "vocab_size": None if tok_bytes else vocab_size,
        "tokenizer": hashlib.blake2b(tok_bytes, digest_size=16).hexdigest() if tok_bytes else None,
        "val_fraction": float(val_fraction), "shard_tokens": SHARD_TOKENS,
    }
    if fim_rate > 0:  # absent at 0: a build without FIM keeps the key (and cache) it always had
        key_src["fim"] = {"rate": float(fim_rate), "seed": int(seed)}
    key = hashlib.blake2b(json.dumps(key_src, sort_keys=True).encode(), digest_size=8).hexdigest()
    root = Path(cache_dir).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FieldError("data_cache", f"cannot create directory {root}: {e.strerror or e}") from None
    out = root / f"data-{key}"
    if not os.access(root, os.W_OK | os.X_OK):
        if (out / "meta.json").exists():  # a read-only shared cache holding this build: used as it is
            return _load(out)
        raise FieldError("data_cache", f"'{root}' is not writable, and holds no build of this data")
    out.mkdir(exist_ok=True)

    with _build_lock(out):
        if (out / "meta.json").exists():
            try:
                return _load(out)
            except DataError as e:
                print(f"flyer: rebuilding data cache {out}: {e}", file=sys.stderr)
        with cache_writes(out):
            return _build(out, docs, vocab_size, tokenizer, val_fraction, key_src, float(fim_rate), int(seed))


def fim_markers(tok: tokenizers.Tokenizer, where: str | Path) -> FimTokens:
    """The FIM markers of ``tok`` (``flyer.data.fim.fim_tokens``), else ``FieldError`` naming ``fim_rate``."""
    markers = fim_tokens(tok)
    if markers is None:
        families = " or ".join(f"{f.begin}, {f.hole}, {f.end}" for f in FAMILIES)
        raise FieldError("fim_rate", f"needs a tokenizer holding one family's three fill-in-the-middle tokens, each "
                                     f"one token ({families}); {where} has no such set")
    return markers


@contextmanager
def _build_lock(out: Path):
    """Exclusive advisory lock (flock) so concurrent ranks build once; a file system without
    locks (some network mounts) degrades to unlocked, still safe thanks to atomic writes."""
    try:
        f = open(out / ".lock", "a+")
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        f.close()  # releases the lock


@contextmanager
def cache_writes(out: Path):
    """A build's failed write (a full disk, a file-size limit) as a one-line error naming --data-cache: its reads
    raise ``DataError`` themselves, and no part of an unfinished build is used (``meta.json`` is written last)."""
    try:
        yield
    except OSError as e:
        raise FieldError("data_cache", f"cannot write the data cache {out} ({e.strerror or e})") from None


def _load(out: Path) -> PreparedData:
    try:
        meta = json.loads((out / "meta.json").read_text())
    except Exception as e:
        raise DataError(f"cached metadata in {out} is unreadable ({type(e).__name__})") from None
    tok = load_tokenizer(out / "tokenizer.json")  # a DataError naming the file: the cache is rebuilt
    if meta.get("presplit"):  # a Kimi tokenizer's cut, which its tokenizer.json cannot hold (the key has it)
        tok = set_presplit(tok, PreSplit(*meta["presplit"]))
    train = TokenShards([out / p for p in meta["train_shards"]])
    val = TokenShards([out / p for p in meta["val_shards"]])
    if not train.vocab_size == val.vocab_size == tok.get_vocab_size():  # shards of another tokenizer
        raise DataError(f"cached shards in {out} are for vocab {train.vocab_size}/{val.vocab_size}, its tokenizer "
                        f"has {tok.get_vocab_size()}")
    return PreparedData(
        tokenizer=tok,
        tokenizer_path=out / "tokenizer.json",
        train=train,
        val=val,
        vocab_size=tok.get_vocab_size(),
        eos_id=int(meta["eos_id"]),
        unigram_val_loss=float(meta["unigram_val_loss"]),
        cache_dir=out,
    )


def _build(out: Path, docs: list[Document], vocab_size: int, tokenizer: str | Path | None,
           val_fraction: float, key_src: dict, fim_rate: float, seed: int) -> PreparedData:
    t0 = time.perf_counter()
    train_docs, val_docs = split_documents(docs, val_fraction)
    if tokenizer is None:  # trained on the documents as written; FIM adds DeepSeek's markers as special tokens
        extra = (DEEPSEEK.begin, DEEPSEEK.hole, DEEPSEEK.end) if fim_rate > 0 else ()
        tok = train_bpe((d.text() for d in train_docs), vocab_size, extra)
    else:
        tok = load_tokenizer(tokenizer)
    markers = fim_markers(tok, tokenizer) if fim_rate > 0 else None
    eos_id = ensure_eos(tok)
    tok_path = out / "tokenizer.json"
    atomic_write(tok_path, [tok.to_str().encode()])
    n_vocab = tok.get_vocab_size()

    split_paths = {}
    n_fim = 0
    marker_ids = [tok.token_to_id(m) for m in (markers.begin, markers.hole, markers.end)] if markers else []
    text_tok = text_tokenizer(tok)  # a document's "<|endoftext|>" or FIM marker is its text: EOS and markers as ids
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        writer = ShardWriter(out, split, n_vocab, SHARD_TOKENS)
        n_tokens = 0
        for i in range(0, len(split_docs), _ENCODE_DOCS):
            texts = [d.text() for d in split_docs[i:i + _ENCODE_DOCS]]
            fim = markers is not None and split == "train"  # each document its own stream: (seed, its index)
            splits = [fim_split(t, np.random.default_rng((seed, i + k)), fim_rate) if fim else None
                      for k, t in enumerate(texts)]
            n_fim += sum(s is not None for s in splits)
            pieces = [p for t, s in zip(texts, splits) for p in (s or (t,))]
            encs = iter(encode_batch(text_tok, pieces, add_special_tokens=False))  # a Kimi tokenizer's cut kept
            for s in splits:
                ids = next(encs).ids if s is None else [  # PSM: BEGIN prefix HOLE suffix END middle
                    t for marker in marker_ids for t in (marker, *next(encs).ids)]
                if ids:
                    writer.add(np.append(np.asarray(ids, dtype=np.int64), eos_id))
                    n_tokens += len(ids) + 1
        if n_tokens == 0:
            raise DataError(f"data: the {split} split has no text after cleaning ({len(split_docs)} document(s))")
        split_paths[split] = writer.close()

    train = TokenShards(split_paths["train"], verify=False)  # just written; checksums are fresh
    val = TokenShards(split_paths["val"], verify=False)
    unigram = unigram_cross_entropy(train, val, n_vocab)
    meta = {
        "key": key_src,
        "tokenizer": "tokenizer.json",
        "presplit": (ps := presplit_of(tok)) and [ps.max_chars, ps.max_run],
        "eos_token": tok.id_to_token(eos_id),
        "eos_id": eos_id,
        "vocab_size": n_vocab,
        "train_shards": [p.name for p in split_paths["train"]],
        "val_shards": [p.name for p in split_paths["val"]],
        "train_documents": [d.name for d in train_docs],
        "val_documents": [d.name for d in val_docs],
        "train_tokens": len(train),
        "val_tokens": len(val),
        "unigram_val_loss": unigram,
        "build_seconds": round(time.perf_counter() - t0, 3),
    }
    if markers is not None:
        meta["fim_train_documents"] = n_fim  # of len(train_docs), rewritten as PSM
    atomic_write(out / "meta.json", [json.dumps(meta, indent=1).encode()])
    return PreparedData(tok, tok_path, train, val, n_vocab, eos_id, unigram, out)


def unigram_cross_entropy(train: TokenShards, val: TokenShards, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on ``val`` of a unigram model fitted on ``train`` with add-one
    smoothing: the loss a model reaches by learning token frequencies alone."""
    counts = np.zeros(vocab_size, dtype=np.float64)
    for chunk in train.iter_chunks():
        counts += np.bincount(chunk, minlength=vocab_size)[:vocab_size]
    val_counts = np.zeros(vocab_size, dtype=np.float64)
    for chunk in val.iter_chunks():
        val_counts += np.bincount(chunk, minlength=vocab_size)[:vocab_size]
    return unigram_from_counts(counts, val_counts)


def unigram_from_counts(train_counts: np.ndarray, val_counts: np.ndarray) -> float:
    """``unigram_cross_entropy`` of token counts (V,) float64: add-one smoothing fitted on ``train_counts``,
    nats per token of ``val_counts`` (0 tokens: 0)."""
    log_p = np.log(train_counts + 1.0) - math.log(train_counts.sum() + len(train_counts))
    return float(-(val_counts * log_p).sum() / max(val_counts.sum(), 1.0))
