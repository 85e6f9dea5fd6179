"""A conversation's ids and assistant mask without re-encoding the text its prefixes share: the fast twin of
``flyer.data.chat_data.encode_conversation`` (same ids, mask and errors; that function is its oracle).

The plain path encodes the conversation up to every assistant turn: O(n^2) tokens for n turns. A Hugging Face
``tokenizers.Tokenizer`` first cuts the text at its added tokens' matches (the non-normalized ones, found left to
right, leftmost-longest), then normalizes, pre-tokenizes and encodes each piece on its own, so a text's ids are
its pieces' ids concatenated. A rendered prefix H of the whole conversation's text F (a string prefix) whose last
added-token match in F ends at b <= len(H) has F's pieces before b (a leftmost-longest scan of H finds F's
matches that end by len(H), the same up to b), so ``encode(H) = encode(F)[:k_b] + encode(H[b:])``, k_b the
tokens of F's pieces before b. Only each prefix's tail H[b:] is encoded: nothing under DeepSeek's template,
whose turn headers and ends are special tokens; one turn under a template with plain-text headers.

The model holds for tokenizers with neither truncation nor padding whose non-normalized added tokens neither
strip whitespace nor match whole words only (``lstrip``, ``rstrip``, ``single_word`` look past the match):
``token_splitter`` gives None otherwise and the caller takes the plain path. Each conversation is checked too:
F's pieces' ids, concatenated, must be F's ids, else ``encode_conversation_fast`` gives None.
"""

from __future__ import annotations

import bisect
import itertools
import json
import re

import tokenizers


def token_splitter(tok: tokenizers.Tokenizer) -> re.Pattern | None:
    """A pattern whose ``finditer`` finds the matches ``tok`` cuts a text at first (module doc), or None when the
    model does not hold for ``tok``."""
    if tok.truncation is not None or tok.padding is not None or '"prepend_scheme":"first"' in _compact(tok):
        return None  # Metaspace's "first" prepends to the piece at offset 0 only: a piece alone is not as in F
    added = [t for t in tok.get_added_tokens_decoder().values() if not t.normalized and t.content]
    if not added or any(t.lstrip or t.rstrip or t.single_word for t in added):
        return None
    # longest first: at each position Python's alternation takes the first that matches, i.e. the longest
    return re.compile("|".join(re.escape(c) for c in sorted({t.content for t in added}, key=len, reverse=True)))


def _compact(tok: tokenizers.Tokenizer) -> str:
    return json.dumps(json.loads(tok.to_str()), separators=(",", ":")).lower()


def encode_conversation_fast(messages: list[dict], tools: list | None, render, split: re.Pattern,
                             encode_batch) -> tuple[list[int], list[int]] | None:
    """``chat_data.encode_conversation``'s (ids, mask), or its ``ValueError`` or render error for the same turn,
    with ``split`` (``token_splitter``) and ``encode_batch(texts)`` -> a list of ids per text, one call per
    conversation; None when the pieces' ids do not concatenate to the whole's (the caller takes the plain path)."""
    whole = render(messages, tools, add_generation_prompt=False)
    turns, failed = [], None
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:  # the plain path checks every earlier turn before it renders this one: so do we, then raise
            turns.append((i, render(messages[:i], tools, add_generation_prompt=True),
                          render(messages[:i + 1], tools, add_generation_prompt=False)))
        except Exception as e:
            failed = e
            break
    matches = list(split.finditer(whole))
    ends = [m.end() for m in matches]
    cuts = sorted({0, len(whole), *(i for m in matches for i in m.span())})
    pieces = [whole[a:b] for a, b in zip(cuts, cuts[1:])]

    def tail(text: str) -> tuple[int, str]:
        """(the cut b where the text's own encoding starts, -1 when it is not a prefix of F, the text to encode)."""
        if not whole.startswith(text):
            return -1, text
        b = ends[bisect.bisect_right(ends, len(text)) - 1] if ends and ends[0] <= len(text) else 0
        return b, text[b:]

    tails = [(tail(h), tail(u)) for _, h, u in turns]
    jobs = list(dict.fromkeys([whole, *pieces, *(t for pair in tails for _, t in pair)]))
    enc = dict(zip(jobs, encode_batch(jobs)))
    ids = enc[whole]
    if list(itertools.chain.from_iterable(enc[p] for p in pieces)) != ids:
        return None
    before = dict(zip(cuts, itertools.accumulate((len(enc[p]) for p in pieces), initial=0)))  # F's tokens by cut
    mask = [0] * len(ids)
    for (i, _, _), pair in zip(turns, tails):
        head_upto = []
        for name, (b, text) in zip(("with the generation prompt", "through it"), pair):
            k, p = before.get(b, 0), enc[text]
            if not (k + len(p) <= len(ids) and ids[k:k + len(p)] == p):
                raise ValueError(f"messages[{i}]: the conversation rendered {name} does not encode to a prefix "
                                 "of the whole conversation's tokens (the template or tokenizer merges across turns)")
            head_upto.append(k + len(p))
        head, upto = head_upto
        mask[head:upto] = [1] * max(0, upto - head)
    if failed is not None:
        raise failed
    return ids, mask
