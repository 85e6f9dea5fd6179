"""A Hugging Face checkpoint directory's tokenizer: ``tokenizer.json`` (or Kimi's ``tiktoken.model``,
``flyer.data.tiktoken_file``) with the special-token ids and names that transformers' ``AutoTokenizer`` and
``generate`` would take from the directory's settings files (``tokenizer_config.json``,
``special_tokens_map.json``, ``generation_config.json``, ``config.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tokenizers import AddedToken, Tokenizer

from flyer.data.fim import FimTokens, fim_tokens, text_tokenizer
from flyer.data.presplit import encode
from flyer.data.tiktoken_file import read_json_object
from flyer.data.tokenizer import load_tokenizer as load_tokenizer_file, tokenizer_file
from flyer.errors import CheckpointError

_EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<｜end▁of▁sentence｜>", "[EOS]")


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with the end-of-sequence id and special-token policy of its
    checkpoint: HF directories encode as ``AutoTokenizer`` does (the tokenizer.json's post-processor,
    e.g. a BOS), flyer's own tokenizers without special tokens. One exception, kept on purpose: a SentencePiece
    BPE file (Llama 2's, Mistral's: a ``Prepend("▁")`` normalizer) whose ``tokenizer_class`` is a Llama one is
    encoded as written, as SentencePiece and transformers 4 encode it; transformers 5 rebuilds its normalizer as
    ``Metaspace`` and writes one "▁" where they write two before a text that starts with a space."""

    def __init__(self, tok: Tokenizer, eos: int | Sequence[int] | None = None, add_special_tokens: bool = False,
                 bos: int | None = None, named: dict[str, str] | None = None):
        """``eos``: the end-of-sequence id, or the checkpoint's list of them (Llama 3's
        ``[128001, 128009]``: each ends generation); None or empty: the first of ``_EOS_NAMES`` in the
        vocabulary. ``named``: an HF directory's named special tokens (``_named_special_tokens``)."""
        self.tok, self.add_special_tokens, self.bos, self.named = tok, add_special_tokens, bos, named
        ids = (eos,) if isinstance(eos, int) else tuple(eos or ())
        if not ids:
            ids = tuple(i for i in map(tok.token_to_id, _EOS_NAMES) if i is not None)[:1]
        self.eos_all = ids
        self.eos = ids[0] if ids else None

    def encode_ids(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """``add_special_tokens``: None for the checkpoint's policy; False for text that holds its own
        (a rendered chat template). A Kimi tiktoken directory's text is cut first as its ``encode`` cuts it
        (``flyer.data.presplit``)."""
        special = self.add_special_tokens if add_special_tokens is None else add_special_tokens
        return encode(self.tok, text, add_special_tokens=special).ids

    def encode_text(self, text: str) -> list[int]:
        """``text`` as text, nothing added: a special token or FIM marker it spells is its characters
        (``flyer.data.fim.text_tokenizer``, made once)."""
        if getattr(self, "_text_tok", None) is None:
            self._text_tok = text_tokenizer(self.tok)
        return encode(self._text_tok, text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def eos_id(self) -> int | None:
        """The end-of-sequence id (of a list, the first): the one written, e.g. a chat template's eos_token."""
        return self.eos

    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends generation (``eos_id()`` first); () when there is none."""
        return self.eos_all

    def bos_id(self) -> int | None:
        return self.bos

    def fim_tokens(self) -> FimTokens | None:
        """The fill-in-the-middle markers the vocabulary holds (``flyer.data.fim``), or None."""
        return fim_tokens(self.tok)

    def token(self, i: int | None) -> str | None:
        return None if i is None else self.tok.id_to_token(i)

    def special_tokens(self) -> dict[str, str]:
        """The named special tokens a chat template sees (transformers' ``special_tokens_map``): an HF
        directory's as its tokenizer files name them, which need not be the first EOS id (Llama 3.1's
        eos_token is <|eot_id|>, its generation_config's first id <|end_of_text|>); else BOS and EOS."""
        if self.named is not None:
            return dict(self.named)
        pairs = (("bos_token", self.token(self.bos)), ("eos_token", self.token(self.eos)))
        return {k: t for k, t in pairs if t is not None}


def read_json(path: Path) -> dict:
    """A checkpoint's settings file: a JSON object, or a one-line ``CheckpointError`` naming the file."""
    return read_json_object(path, CheckpointError)


_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _content(e) -> str | None:
    """A special token as tokenizer_config.json writes it: its text, or an AddedToken object's content."""
    e = e.get("content") if isinstance(e, dict) else e
    return e if isinstance(e, str) and e else None


def _named_special_tokens(path: Path, tc: dict) -> dict[str, str]:
    """The named special tokens transformers' tokenizer for the directory has (``_SPECIAL_NAMES``):
    tokenizer_config.json's (``tc``); one saved without ``added_tokens_decoder`` (older transformers) has
    special_tokens_map.json's over them, as transformers 5 loads them."""
    named = {k: v for k in _SPECIAL_NAMES if (v := _content(tc.get(k)))}
    if "added_tokens_decoder" not in tc and (path / "special_tokens_map.json").is_file():
        legacy = read_json(path / "special_tokens_map.json")
        named.update({k: v for k in _SPECIAL_NAMES if (v := _content(legacy.get(k)))})
    return named


def _special_ids(path: Path, gen: dict, config: dict, named: dict[str, str], tok: Tokenizer,
                 kind: str) -> tuple[int, ...]:
    """generation_config.json's ``{kind}_token_id`` (``gen``: an id or a list of ids), else config.json's,
    else the tokenizer's named ``{kind}_token`` (``named``: ``_named_special_tokens``); () when none
    names one. A list keeps its order, less repeats. An id no tokenizer has (negative, past 31 bits) is a
    ``CheckpointError`` naming the file."""
    for name, d in (("generation_config.json", gen), ("config.json", config)):
        e = d.get(f"{kind}_token_id")
        ids = [i for i in (e if isinstance(e, list) else [e]) if isinstance(i, int) and not isinstance(i, bool)]
        if bad := [i for i in ids if not 0 <= i < 2**31]:  # the tokenizer's ids are 32-bit
            raise CheckpointError(f"{path / name}: {kind}_token_id {bad[0]!s:.40} is not a token id")
        if ids:
            return tuple(dict.fromkeys(ids))
    i = tok.token_to_id(named[f"{kind}_token"]) if f"{kind}_token" in named else None
    return () if i is None else (i,)


_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")  # an AddedToken's, as configs list them


def _with_config_tokens(tok: Tokenizer, tc: dict) -> Tokenizer:
    """``tok`` with the entries of tokenizer_config.json's ``added_tokens_decoder`` (``tc``'s: id -> content, flags)
    that differ from its own added token at that id added over it, as transformers 5 re-adds them when it loads the
    directory: where the two files disagree (a config edited by hand), the config's flags win (a token special there
    alone is skipped when decoding; an ``rstrip`` there alone takes the spaces after it)."""
    entries = tc.get("added_tokens_decoder")
    if not isinstance(entries, dict):
        return tok
    have = tok.get_added_tokens_decoder()
    differ = []
    for k, e in sorted(((int(k), e) for k, e in entries.items() if k.isdigit()), key=lambda kv: kv[0]):
        if isinstance(e, dict) and isinstance(e.get("content"), str):
            token = AddedToken(e["content"], **{f: e[f] for f in _TOKEN_FLAGS if isinstance(e.get(f), bool)})
            if repr(token) != repr(have.get(k)):
                differ.append(token)
    if differ:
        tok.add_tokens(differ)
    return tok


def load_tokenizer(path: str | Path, config: dict | None = None) -> TextTokenizer:
    """The directory's ``tokenizer.json`` (its added tokens as tokenizer_config.json flags them:
    ``_with_config_tokens``), or its ``tiktoken.model`` when it has only that (``flyer.data.tiktoken_file``, which
    builds its special tokens from the config), with its BOS and EOS ids (``_special_ids``) and named special tokens,
    each settings file read once."""
    path = Path(path)
    if path.is_dir() and not tokenizer_file(path).exists():  # weights saved alone (``model.save_pretrained``)
        raise CheckpointError(f"{tokenizer_file(path)}: does not exist (a model directory needs its tokenizer beside "
                              f"the weights: transformers' tokenizer.save_pretrained({str(path)!r}) writes it)")
    tok = load_tokenizer_file(tokenizer_file(path), CheckpointError)
    tc = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    if tokenizer_file(path).name == "tokenizer.json":
        tok = _with_config_tokens(tok, tc)
    # special-token text in a text is plain text, as transformers encodes it for such a config
    tok.encode_special_tokens = tc.get("split_special_tokens") is True
    config = config if config is not None else read_json(path / "config.json")
    gen = read_json(path / "generation_config.json") if (path / "generation_config.json").is_file() else {}
    named = _named_special_tokens(path, tc)
    bos = _special_ids(path, gen, config, named, tok, "bos")
    return TextTokenizer(tok, _special_ids(path, gen, config, named, tok, "eos"), add_special_tokens=True,
                         bos=bos[0] if bos else None, named=named)


__all__ = ["TextTokenizer", "load_tokenizer", "read_json"]
