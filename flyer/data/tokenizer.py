"""Byte-level BPE tokenizer: trained locally with Hugging Face ``tokenizers``, or loaded from
any ``tokenizer.json``. Either way the vocabulary holds ``<|endoftext|>``, the end-of-document
token placed after every document in the token shards."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from flyer.errors import DataError

EOS_TOKEN = "<|endoftext|>"
# End-of-document tokens of common tokenizers, used when a given tokenizer lacks EOS_TOKEN.
_OTHER_EOS = ("<|end_of_text|>", "</s>", "<eos>", "<｜end▁of▁sentence｜>")
MIN_VOCAB = 257  # 256 byte symbols + <|endoftext|>


def check_vocab_size(vocab_size: object) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise DataError(f"vocab_size must be an integer >= {MIN_VOCAB} (256 byte symbols + {EOS_TOKEN}); "
                        f"got {vocab_size!r}")
    if vocab_size > 2**32:
        raise DataError(f"vocab_size must be <= 2**32 (got {vocab_size})")
    return vocab_size


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE on ``texts``. All 256 bytes are in the alphabet, so
    any string round-trips through encode/decode. The vocabulary may come out smaller than
    ``vocab_size`` when the text runs out of pairs to merge."""
    check_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json``; ``DataError`` names the file if it is missing or invalid."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"tokenizer file '{path}' does not exist")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises bare Exception subclasses
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"tokenizer file '{path}' is not a valid tokenizer.json: {msg}") from None


def ensure_eos(tok: Tokenizer) -> int:
    """Return the id of the end-of-document token, adding ``<|endoftext|>`` if the tokenizer
    has none of the usual ones."""
    for name in (EOS_TOKEN, *_OTHER_EOS):
        i = tok.token_to_id(name)
        if i is not None:
            return i
    tok.add_special_tokens([EOS_TOKEN])
    return tok.token_to_id(EOS_TOKEN)

