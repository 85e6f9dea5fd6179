"""Prompt text to token ids on the HTTP side, fit to run on a thread beside the event loop (``asyncio.to_thread``).

Hugging Face's ``Tokenizer.encode`` holds the GIL for the whole text (a 6 MB prompt: 3 s in which no other request
is served), ``encode_batch`` lets go of it while Rust encodes: ``Encoder`` encodes as the tokenizer's ``encode_ids``
does, through the latter. No bound on characters per token holds for every tokenizer (an unknown token of a
Unigram or WordPiece model covers a whole run of text), so a prompt is encoded whole, off the loop, before its
length is checked against the context.
"""

from __future__ import annotations

from flyer.data.presplit import encode, presplit_of
from flyer.interop.hf_tokenizer import TextTokenizer


class Encoder:
    """``tok``'s ``encode_ids`` (and ``fim_tokens``: ``flyer.data.fim.fim_prompt`` takes an ``Encoder``) letting go
    of the GIL while a Hugging Face tokenizer encodes; ``starts`` gives the tokens' places in the text too."""

    def __init__(self, tok):
        self.tok = tok

    def fim_tokens(self):
        return self.tok.fim_tokens()

    def encode_ids(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """The ids ``tok.encode_ids(text, add_special_tokens)`` gives."""
        if not isinstance(self.tok, TextTokenizer):
            return self.tok.encode_ids(text, add_special_tokens)  # byte tokens: str.encode, a few ms a megabyte
        return self._encoding(text, add_special_tokens).ids

    def starts(self, text: str, add_special_tokens: bool | None = None) -> tuple[list[int], list[int] | None]:
        """(the ids ``encode_ids`` gives, where each token starts in ``text``: its first character's index, a token
        that covers none (a BOS or EOS the tokenizer adds) where the one before it ends); None for the places of a
        tokenizer without offsets (byte tokens: their decode is the text)."""
        if not isinstance(self.tok, TextTokenizer):
            return self.tok.encode_ids(text, add_special_tokens), None
        enc = self._encoding(text, add_special_tokens)
        out, end = [], 0
        for a, b in enc.offsets:
            out.append(a if b > a else end)
            end = max(end, b)
        return enc.ids, out

    def _encoding(self, text: str, add_special_tokens: bool | None):
        tok = self.tok
        special = tok.add_special_tokens if add_special_tokens is None else add_special_tokens
        # a pre-split text (Kimi's) is encode_batch's already, as ``encode`` cuts it; else one text in a batch
        return encode(tok.tok, text, special) if presplit_of(tok.tok) is not None else \
            tok.tok.encode_batch([text], add_special_tokens=special)[0]
