"""Kimi's cut of long character runs before tiktoken: the remote ``tokenization_kimi.py`` of Kimi K2 / K2.5
encodes a text piece by piece, not whole. It cuts the text into chunks of ``max_chars`` (400,000)
characters, then each chunk wherever a run of consecutive whitespace (``str.isspace``) or non-whitespace
characters would pass ``max_run`` (25,000) characters (its ``_split_whitespaces_or_nonwhitespaces``, a guard
against a tiktoken stack overflow): the run counter starts at the chunk's start and at each whitespace /
non-whitespace flip, and restarts at a cut, so a run from s to e is cut at s + max_run, s + 2 max_run, ... < e;
a piece is everything from one cut to the next. Each piece is encoded on its own, so a cut in a pre-tokenizer
match (a base64 blob, minified code, long whitespace) changes the ids there.

Which text that ``encode`` sees: transformers' (``tokenizer(text)``, ``encode(text, add_special_tokens=...)``,
``apply_chat_template(tokenize=True)``, and so vLLM's and SGLang's servers, which pass such arguments) hands Kimi's
class a text cut at its added tokens first (transformers' ``PreTrainedTokenizer.tokenize``), each segment between
two special tokens to that ``encode``: a special token ends a run and restarts the count, and the 400,000-character
chunks start at each segment. flyer follows transformers (``PreSplit.specials``). Only ``encode(text)`` called with
no argument at all counts a run through a special-token string; the two differ only where such a run passes
``max_run``.

``PreSplit`` is recorded on the ``tokenizers.Tokenizer`` of such a directory (``flyer.data.tiktoken_file``);
``encode`` / ``encode_batch`` here are the tokenizer's own, piece by piece where it has one. A ``tokenizer.json``
cannot carry the cut: a tokenizer saved from it encodes long runs whole, so flyer's checkpoints and exports of
such a tokenizer carry its directory's files instead (``flyer.data.tokenizer_copy``).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass

from tokenizers import Encoding, Tokenizer

_ATTR = "flyer_presplit"  # the attribute of a tokenizers.Tokenizer holding its PreSplit


@functools.lru_cache(maxsize=8)
def _long_runs(max_run: int) -> re.Pattern:
    """Runs of over ``max_run`` whitespace or non-whitespace characters, each matched from its start only: the
    lookbehind fails inside a run at once, so a scan is linear in the text (a bare ``\\S{n,}`` re-scans each
    shorter run from every position in it). Python's ``\\s`` on str is ``str.isspace`` on every code point."""
    n = max_run + 1
    return re.compile(rf"(?<!\S)\S{{{n},}}|(?<!\s)\s{{{n},}}")


@dataclass(frozen=True)
class PreSplit:
    """The two limits of Kimi's ``encode`` (module doc), in characters."""
    max_chars: int = 400_000  # TIKTOKEN_MAX_ENCODE_CHARS
    max_run: int = 25_000  # MAX_NO_WHITESPACES_CHARS
    specials: tuple[str, ...] = ()  # the added tokens' strings, where transformers cuts a text first (``set_presplit``)

    def spans(self, text: str) -> list[tuple[int, int]]:
        """[start, end) of each piece of ``text``, in order; [] for "" (Kimi's encode gives no piece). The cuts that
        change an encoding only: a special token's edges, where the tokenizer cuts anyway, are none."""
        n = len(text)
        if n <= min(self.max_chars, self.max_run):  # no chunk cut, and no run can pass the limit
            return [(0, n)] if n else []
        cuts = {0}
        for a, b in _segments(text, self.specials):  # each segment between special tokens: Kimi's encode alone
            # (a segment's start is a cut already: the tokenizer encodes a special token apart from its neighbours)
            for c in range(a, b, self.max_chars):
                cuts.add(c if c > a else 0)
                for m in _long_runs(self.max_run).finditer(text[c:min(c + self.max_chars, b)]):  # a run's count
                    s, e = m.span()  # starts in its chunk
                    cuts.update(range(c + s + self.max_run, c + e, self.max_run))
        cuts = sorted(cuts)
        return list(zip(cuts, cuts[1:] + [n]))


def _segments(text: str, specials: tuple[str, ...]) -> list[tuple[int, int]]:
    """[start, end) of the text between the ``specials`` found in ``text`` (the longest at each position first, as
    transformers' trie matches them), in order."""
    if not specials:
        return [(0, len(text))]
    out, at = [], 0
    for m in _specials_pattern(specials).finditer(text):
        out.append((at, m.start()))
        at = m.end()
    return out + [(at, len(text))]


@functools.lru_cache(maxsize=8)
def _specials_pattern(specials: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))


def set_presplit(tok: Tokenizer, presplit: PreSplit | None) -> Tokenizer:
    """``tok``, recorded to encode piece by piece as ``presplit`` cuts (None: whole), its added tokens the
    ``specials`` a text is cut at first."""
    added = tuple(sorted({t.content for t in tok.get_added_tokens_decoder().values() if t.content}))
    setattr(tok, _ATTR, None if presplit is None else dataclasses.replace(presplit, specials=added))
    return tok


def presplit_of(tok: Tokenizer) -> PreSplit | None:
    """The ``PreSplit`` ``tok`` encodes with, or None (a text is one piece)."""
    return getattr(tok, _ATTR, None)


def tokenizer_key(tok: Tokenizer) -> bytes:
    """What identifies how ``tok`` encodes (a data cache's key): its tokenizer.json, and its ``PreSplit``."""
    ps = presplit_of(tok)
    return tok.to_str().encode() + (b"" if ps is None else f"\npresplit {ps.max_chars} {ps.max_run}".encode())


def encode_batch(tok: Tokenizer, texts: list[str], add_special_tokens: bool = True) -> list[Encoding]:
    """``tok.encode_batch(texts, add_special_tokens)`` with ``tok``'s ``PreSplit``: a text of several pieces is
    its pieces' encodings (one ``encode_batch`` call for all) merged, offsets shifted to the text's, then
    post-processed as ``Tokenizer.encode`` post-processes a whole text; ``char_to_token`` / ``token_to_chars``
    index the whole text."""
    ps = presplit_of(tok)
    spans = [ps.spans(t) for t in texts] if ps is not None else []
    if all(len(s) <= 1 for s in spans):  # also the tokenizer without a cut
        return tok.encode_batch(texts, add_special_tokens=add_special_tokens)
    pieces = [t[a:b] for t, s in zip(texts, spans) for a, b in s]
    encs, out = iter(tok.encode_batch(pieces, add_special_tokens=False)), []
    for s in spans:
        # growing_offsets shifts each piece's by the last token's end so far: the piece's start, as byte-level
        # tokens cover every character
        merged = Encoding.merge([next(encs) for _ in s], growing_offsets=True) if s else \
            tok.encode("", add_special_tokens=False)
        out.append(tok.post_process(merged, add_special_tokens=add_special_tokens))
    return out


def encode(tok: Tokenizer, text: str, add_special_tokens: bool = True) -> Encoding:
    """``tok.encode(text, add_special_tokens)`` with ``tok``'s ``PreSplit`` (``encode_batch``). Through
    ``Tokenizer.encode_batch``, which lets go of the GIL while Rust encodes (``encode`` holds it for the whole text:
    a 6 MB prompt stopped flyer serve's event loop for 3 s)."""
    ps = presplit_of(tok)
    if ps is None or len(text) <= min(ps.max_chars, ps.max_run):
        return tok.encode_batch([text], add_special_tokens=add_special_tokens)[0]
    return encode_batch(tok, [text], add_special_tokens)[0]


__all__ = ["PreSplit", "encode", "encode_batch", "presplit_of", "set_presplit", "tokenizer_key"]
