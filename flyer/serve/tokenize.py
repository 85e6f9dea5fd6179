"""Where each token of an encoded prompt starts in its text (echo's ``text_offset``), and each token's own text and
bytes as OpenAI's logprobs show them (``TokenPieces``). The routes encode prompts on a
thread beside the event loop (``asyncio.to_thread``); ``flyer.data.presplit.encode`` lets go of the GIL while
Rust encodes, so other requests are served meanwhile. No bound on characters per token holds for every tokenizer
(an unknown token of a Unigram or WordPiece model covers a whole run of text), so a prompt is encoded whole, off
the loop, before its length is checked against the context.
"""

from __future__ import annotations

import threading
from typing import Callable

from flyer.data.presplit import encode
from flyer.errors import FieldError
from flyer.interop.hf_tokenizer import TextTokenizer
from flyer.serve.grammar import llg_tokenizer


def token_starts(tok, text: str, add_special_tokens: bool | None = None) -> tuple[list[int], list[int] | None]:
    """(the ids ``tok.encode_ids(text, add_special_tokens)`` gives, where each token starts in ``text``: its first
    character's index, a token that covers none (a BOS or EOS the tokenizer adds) where the one before it ends);
    None for the places of a tokenizer without offsets (byte tokens: their decode is the text)."""
    if not isinstance(tok, TextTokenizer):
        return tok.encode_ids(text, add_special_tokens), None
    enc = encode(tok.tok, text, tok.add_special_tokens if add_special_tokens is None else add_special_tokens)
    out, end = [], 0
    for a, b in enc.offsets:
        out.append(a if b > a else end)
        end = max(end, b)
    return enc.ids, out


class TokenPieces:
    """Each token's own bytes (the bytes it adds to the text, a byte-level or byte-fallback token's
    part of a UTF-8 character included; a special token's name) and its text as OpenAI's logprobs key it (``text``:
    those bytes as UTF-8, or ``bytes:\\xNN...`` where they hold part of a character, so two such tokens keep apart).
    A token decoded alone would give U+FFFD for each such part. Read off llguidance's view of the tokenizer (the one
    structured outputs use), made at the first use (~1 s for a 128k vocabulary); a tokenizer llguidance cannot read
    falls back to each token's decode."""

    def __init__(self, tok, vocab_size: Callable[[], int]):
        self.tok, self.vocab_size = tok, vocab_size  # the model's ids (asked at the first use: the engine's limits)
        self._llg, self._made = None, threading.Lock()

    def _view(self):
        """llguidance's view, made once (False: a tokenizer it cannot read)."""
        if self._llg is None:
            with self._made:  # routes run on threads too
                if self._llg is None:
                    try:
                        self._llg = llg_tokenizer(self.tok, self.vocab_size())
                    except FieldError:
                        self._llg = False
        return self._llg

    def of(self, t: int) -> tuple[str, bytes]:
        """(token ``t``'s text as logprobs key it, its bytes)."""
        llg = self._view()
        raw = llg.decode_bytes([t]) if llg else self.tok.decode([t]).encode()
        try:
            return raw.decode("utf-8"), raw
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw

    def text(self, t: int) -> str:
        return self.of(t)[0]


__all__ = ["TokenPieces", "token_starts"]
