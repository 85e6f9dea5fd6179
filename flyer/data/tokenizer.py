"""Byte-level BPE tokenizer: trained locally with Hugging Face ``tokenizers``, or loaded from
any ``tokenizer.json``. Either way the vocabulary holds an end-of-document token (its own, else
``<|endoftext|>`` is added), placed after every document in the token shards."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from flyer.data.presplit import tokenizer_key
from flyer.data.tiktoken_file import TIKTOKEN_FILE, read_tiktoken_dir
from flyer.errors import DataError
from flyer.limits import SIZE_LIMITS

EOS_TOKEN = "<|endoftext|>"
# End-of-document tokens of common tokenizers, used when a given tokenizer lacks EOS_TOKEN.
_OTHER_EOS = ("<|end_of_text|>", "</s>", "<eos>", "<｜end▁of▁sentence｜>", "[EOS]")  # [EOS]: Kimi K2's
MIN_VOCAB = 257  # 256 byte symbols + <|endoftext|>


def check_vocab_size(vocab_size: object) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise DataError(f"vocab_size must be an integer >= {MIN_VOCAB} (256 byte symbols + {EOS_TOKEN}); "
                        f"got {vocab_size!r}")
    if vocab_size > SIZE_LIMITS["vocab_size"]:  # the BPE trainer allocates for it up front (2**31: 141 GB, abort)
        raise DataError(f"vocab_size must be <= {SIZE_LIMITS['vocab_size']} (got {vocab_size})")
    return vocab_size


def train_bpe(texts: Iterable[str], vocab_size: int, extra_special: Sequence[str] = ()) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE on ``texts``. All 256 bytes are in the alphabet, so
    any string round-trips through encode/decode. The vocabulary may come out smaller than
    ``vocab_size`` when the text runs out of pairs to merge. ``extra_special``: special tokens
    (ids 1, 2, ... after ``<|endoftext|>``'s 0) each encoded as one token wherever it appears,
    e.g. the FIM markers (flyer.data.fim)."""
    check_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, *extra_special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_bounded_words(texts), trainer=trainer)
    return tok


# the longest run without whitespace the BPE trainer sees as one word: each merge rescans every word holding its
# pair, so one long word (a minified line, a base64 blob) makes training quadratic in its length (2 MB: past
# 3 minutes; cut, 2 s); encoding is not cut, and words this long are too rare in text to shape the merges
TRAIN_WORD_CHARS = 256
_LONG_RUN = re.compile(r"(\S{%d})" % TRAIN_WORD_CHARS)


def _bounded_words(texts: Iterable[str]) -> Iterator[str]:
    """``texts`` in pieces, each run of more than ``TRAIN_WORD_CHARS`` non-space characters cut at that length."""
    for text in texts:
        yield from filter(None, _LONG_RUN.split(text))


def load_tokenizer(path: str | Path, error: type[ValueError] = DataError) -> Tokenizer:
    """The tokenizer in the ``tokenizer.json`` file ``path``: the one guard every reader of one
    goes through (``--tokenizer``, the data cache, a flyer checkpoint, a Hugging Face directory).
    A path that is missing, not a file, unreadable, or does not hold a tokenizer (not JSON, JSON
    of something else, truncated, empty) raises ``error`` (``DataError``; ``CheckpointError`` for
    a checkpoint's) with one line naming the file. A ``tiktoken.model`` file is read with its
    directory's settings (``flyer.data.tiktoken_file``: Kimi K2's format)."""
    path = Path(path).expanduser()
    try:
        if path.exists() and not path.is_file():  # a directory; a FIFO would block the read
            raise error(f"{path}: not a file")
    except OSError as e:  # a name too long, a loop of links: exists() raises rather than answers
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    if path.name == TIKTOKEN_FILE and path.is_file():
        return read_tiktoken_dir(path, error)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: does not exist") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not a valid tokenizer.json (not UTF-8 text)") from None
    if not text.strip():
        raise error(f"{path}: not a valid tokenizer.json (empty file)")
    try:
        return Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception for text that is not a tokenizer
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise error(f"{path}: not a valid tokenizer.json ({why:.120})") from None


def tokenizer_file(directory: str | Path) -> Path:
    """The tokenizer file of a model directory: its ``tokenizer.json``, else its ``tiktoken.model`` when it has
    only that (Kimi K2's); the missing tokenizer.json when it has neither (``load_tokenizer`` says so)."""
    d = Path(directory)
    return d / TIKTOKEN_FILE if not (d / "tokenizer.json").exists() and (d / TIKTOKEN_FILE).is_file() else (
        d / "tokenizer.json")


def tokenizer_bytes(path: str | Path, tok: Tokenizer) -> bytes:
    """What identifies the tokenizer ``tok`` read from ``path`` (a data cache's key): the tokenizer.json's bytes;
    a tiktoken file's tokenizer as it was built (its directory's settings are part of it, its cut too:
    ``flyer.data.presplit.tokenizer_key``)."""
    path = Path(path).expanduser()
    return tokenizer_key(tok) if path.name == TIKTOKEN_FILE else path.read_bytes()


def ensure_eos(tok: Tokenizer) -> int:
    """Return the id of the end-of-document token, adding ``<|endoftext|>`` if the tokenizer
    has none of the usual ones."""
    for name in (EOS_TOKEN, *_OTHER_EOS):
        i = tok.token_to_id(name)
        if i is not None:
            return i
    tok.add_special_tokens([EOS_TOKEN])
    return tok.token_to_id(EOS_TOKEN)

