"""Where each token of an encoded prompt starts in its text (echo's ``text_offset``). The routes encode prompts on a
thread beside the event loop (``asyncio.to_thread``); ``flyer.data.presplit.encode`` lets go of the GIL while
Rust encodes, so other requests are served meanwhile. No bound on characters per token holds for every tokenizer
(an unknown token of a Unigram or WordPiece model covers a whole run of text), so a prompt is encoded whole, off
the loop, before its length is checked against the context.
"""

from __future__ import annotations

from flyer.data.presplit import encode
from flyer.interop.hf_tokenizer import TextTokenizer


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


__all__ = ["token_starts"]
