"""Conversations' ids and assistant masks with each token encoded once: the fast twin of
``flyer.data.chat_data.encode_conversation`` (same ids, mask and errors; that function is its oracle).

The plain path encodes the conversation up to every assistant turn: O(n^2) tokens for n turns. Here a batch of
conversations is rendered (the whole F, and per assistant turn the prefixes H the plain path renders), and one
``Tokenizer.encode_batch`` call (parallel in Rust) encodes each F whole and, of each H, only the tail after its
last added-token match: F's ids are exactly the plain path's; only the mask's bounds, len(encode(H)), are derived.

Why a tail suffices. A Hugging Face ``tokenizers.Tokenizer`` first cuts a text at its added tokens' matches (the
non-normalized ones, found left to right, leftmost-longest), each match becoming its token, then normalizes,
pre-tokenizes and encodes every piece between them on its own (``PreTokenizedString`` splits are processed one by
one), so a text's ids are its pieces' ids concatenated (shown on the tests' tokenizers by
``test_pieces_concatenate_to_the_whole``). A rendered prefix H of F (a string prefix) whose last match in F ends at
b <= len(H) has F's pieces before b (a leftmost-longest scan of H finds F's matches that end by len(H), the same up
to b), so ``encode(H) = encode(F)[:k_b] + encode(H[b:])``, k_b the tokens of F's pieces and matches before b.
Under DeepSeek's template, whose turn headers and ends are special tokens, the tail is empty; under one with
plain-text headers, it is one turn.

What is checked, per conversation. k_b is read off F's own encoding: the match ending at b must be one token
spanning exactly the match (``char_to_token``, ``token_to_chars``), else the tokenizer did not cut F there and
``encode_conversations`` gives None for the conversation (the caller takes the plain path). Each prefix's tokens,
``encode(F)[:k_b] + encode(H[b:])``, must be a prefix of F's ids, as the plain path requires (the tail compared
with F's tokens after k_b), else the plain path's ``ValueError``. What is not re-checked: that a piece encodes
alone as inside F, the tokenizers pipeline above; it fails for tokenizers with truncation or padding, BPE
dropout, ``encode_special_tokens`` (no cut at special tokens), added tokens that strip whitespace or match whole
words only (``lstrip``, ``rstrip``, ``single_word`` look past the match) and Metaspace's ``prepend_scheme="first"``
(it prepends to the piece at offset 0 only): ``token_splitter`` gives None for those, and the build takes the plain
path. A Kimi tokenizer's cut of long runs (``flyer.data.presplit``) counts a run from where it starts in F, not in a
tail: a conversation whose F it cuts takes the plain path (one it leaves whole has no cut in any prefix or tail).

A piece of a conversation (``chat_pieces.pieces``) plans only its trained turns, from message ``first`` on, and each
is checked as the plain path checks it, its reasoning too (``reasoning_unshown``), in the same order; given the
piece's text and its turns' lengths (``chat_pieces.cut_conversation``), neither it nor a turn's own text is rendered
again, only the turns' prompts.
"""

from __future__ import annotations

import bisect
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import tokenizers

from flyer.data.presplit import encode_batch, presplit_of


def token_splitter(tok: tokenizers.Tokenizer) -> re.Pattern | None:
    """A pattern whose ``finditer`` finds the matches ``tok`` cuts a text at first (module doc), or None when the
    model does not hold for ``tok``."""
    if (tok.truncation is not None or tok.padding is not None or tok.encode_special_tokens
            or getattr(tok.model, "dropout", None) or '"prepend_scheme":"first"' in _compact(tok)):
        return None
    added = [t for t in tok.get_added_tokens_decoder().values() if not t.normalized and t.content]
    if not added or any(t.lstrip or t.rstrip or t.single_word for t in added):
        return None
    # longest first: at each position Python's alternation takes the first that matches, i.e. the longest
    return re.compile("|".join(re.escape(c) for c in sorted({t.content for t in added}, key=len, reverse=True)))


def _compact(tok: tokenizers.Tokenizer) -> str:
    return json.dumps(json.loads(tok.to_str()), separators=(",", ":")).lower()


@dataclass
class _Plan:
    """One conversation rendered: F, its matches' spans, and per trained assistant turn i the (cut b, text to
    encode) of its two prefixes (b = -1: not a string prefix of F, the text is the whole prefix) and its
    ``reasoning_unshown`` problem (None, a message, or its render's error); ``failed``: a later turn's render error,
    raised once the earlier turns pass their checks (the plain path's order)."""
    whole: str
    spans: list[tuple[int, int]]
    turns: list[tuple[int, tuple[int, str], tuple[int, str], str | Exception | None]]
    failed: Exception | None


# stands for a turn's reasoning in a second render: letters only, so a template's strip or escape keeps it whole
REASONING_MARK = "FlyerReasoningMark"


def reasoning_unshown(messages: list[dict], i: int, tools: list | None, render, extra: dict | None,
                      head: str) -> str | None:
    """Why assistant message i's non-empty ``reasoning_content`` is not in its rendered turn, or None: a trained
    reasoning the template drops would train the answer without it, so the line is refused instead. Exact: the
    conversation through message i is rendered again with its reasoning replaced by ``REASONING_MARK``, which must
    appear after ``head`` (the conversation before it with the generation prompt), so a reasoning that is also the
    turn's content, or part of it, is not taken for shown. ``render``, ``tools``, ``extra``: the caller's."""
    if not (messages[i].get("reasoning_content") or "").strip():  # templates strip it (Qwen3's): nothing to show
        return None
    marked = render(messages[:i] + [{**messages[i], "reasoning_content": REASONING_MARK}], tools,
                    add_generation_prompt=False, extra=extra)
    if REASONING_MARK in (marked[len(head):] if marked.startswith(head) else marked):
        return None
    return (f"messages[{i}].reasoning_content: the chat template does not render it in this turn, so it would not "
            "be trained (thinking mode off? set the template's switch in chat_template_kwargs, e.g. "
            "{\"thinking\": true})")


def prefix_problem(i: int, name: str, text: str | None, whole: str) -> str:
    """The refusal of assistant message i whose prefix rendered ``name`` does not encode to a prefix of the whole
    conversation's tokens: ``text``, that prefix's render where it is not the start of ``whole`` (the template
    writes the turn otherwise after it: where the two part is quoted), or None where it is (the tokenizer merged
    across the cut)."""
    if text is None:
        why = "the tokenizer merges across turns"
    else:
        k = len(os.path.commonprefix([text, whole]))
        why = (f"the template writes the turn otherwise after it: {text[k:k + 24]!r} where the conversation has "
               f"{whole[k:k + 24]!r}; e.g. a generation prompt that opens a <think> block the finished turns do not "
               "show (DeepSeek-R1's, its distills'), Qwen3's enable_thinking false before a turn with reasoning")
    return f"messages[{i}]: the conversation rendered {name} does not encode to a prefix of the whole conversation's " \
           f"tokens ({why})"


def _plan(messages: list[dict], tools: list | None, render, split: re.Pattern, first: int = 0,
          extra: dict | None = None, lengths: dict[int, int] | None = None, whole: str | None = None) -> _Plan:
    if whole is None:
        whole = render(messages, tools, add_generation_prompt=False, extra=extra)
    spans = [m.span() for m in split.finditer(whole)]
    ends = [e for _, e in spans]

    def tail(text: str) -> tuple[int, str]:
        if not whole.startswith(text):
            return -1, text
        j = bisect.bisect_right(ends, len(text))
        return (ends[j - 1], text[ends[j - 1]:]) if j else (0, text)

    turns, failed = [], None
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < first:
            continue
        try:  # through the last message is F itself, a turn of known length F's start: not rendered again
            head = render(messages[:i], tools, add_generation_prompt=True, extra=extra)
            upto = whole if i == len(messages) - 1 else whole[:lengths[i]] if lengths else \
                render(messages[:i + 1], tools, add_generation_prompt=False, extra=extra)
        except Exception as e:
            failed = e
            break
        try:  # its render error comes after the turn's prefix checks, as on the plain path
            unshown = reasoning_unshown(messages, i, tools, render, extra, head)
        except Exception as e:
            unshown = e
        turns.append((i, tail(head), tail(upto), unshown))
    return _Plan(whole, spans, turns, failed)


def _finish(plan: _Plan, enc: tokenizers.Encoding, encoded: dict[str, list[int]]):
    """(ids, [(head, upto) token span per assistant turn]) from F's encoding ``enc`` and the tails' ids, or None
    when a match is not one token of F (module doc); the plain path's ValueError or render error otherwise."""
    ids = enc.ids
    before = {0: 0}  # F's tokens before each match's end
    for s, e in plan.spans:
        t = enc.char_to_token(s)
        if t is None or enc.token_to_chars(t) != (s, e):
            return None
        before[e] = t + 1
    spans = []
    for i, *pair, unshown in plan.turns:
        head_upto = []
        for name, (b, text) in zip(("with the generation prompt", "through it"), pair):
            k, p = before.get(b, 0), encoded[text]
            if ids[k:k + len(p)] != p:
                raise ValueError(prefix_problem(i, name, None if b >= 0 else text, plan.whole))
            head_upto.append(k + len(p))
        if unshown is not None:
            raise unshown if isinstance(unshown, Exception) else ValueError(unshown)
        spans.append(tuple(head_upto))
    if plan.failed is not None:
        raise plan.failed
    return ids, spans


class Conversation(NamedTuple):
    """What ``encode_conversations`` encodes of one sample: ``encode_conversation``'s arguments (the assistant turns
    from message ``first`` on are trained; ``extra`` the renderer's), its own ``render`` (None: the call's; a line's
    response_format, ``chat_data``), and where known its turns' text lengths and F (``chat_pieces.cut_conversation``'s:
    each turn's own render is F's start, neither rendered again)."""
    messages: list[dict]
    tools: list | None
    first: int = 0
    extra: dict | None = None
    render: Callable | None = None
    lengths: dict[int, int] | None = None
    whole: str | None = None


def encode_conversations(conversations: list[tuple], render, split: re.Pattern, tok: tokenizers.Tokenizer) -> list:
    """Per conversation a ``Conversation`` (or a tuple of its first fields), in order:
    ``(ids, spans)`` (F's ids and each trained assistant turn's [head, upto) token span,
    ``chat_data.encode_conversation``'s mask), None (take the plain path: module doc), or the exception the plain
    path raises for it (its ``ValueError``, a render error). ``render`` as
    ``encode_conversation``'s, ``split``: ``token_splitter(tok)``; one ``tok.encode_batch`` call for them all."""
    plans, presplit = [], presplit_of(tok)
    for c in conversations:
        try:
            c = Conversation(*c)
            plans.append(_plan(c.messages, c.tools, c.render or render, split, c.first, c.extra, c.lengths, c.whole))
        except Exception as e:  # the whole's render: the plain path's first call
            plans.append(e)
        # a Kimi tokenizer cuts a long run where its count began, before a tail's start: the plain path for one
        # whose F is cut (of F in one piece, every prefix and tail is one piece too)
        if presplit is not None and isinstance(plans[-1], _Plan) and len(presplit.spans(plans[-1].whole)) > 1:
            plans[-1] = None
    wholes = [p.whole for p in plans if isinstance(p, _Plan)]
    tails = list(dict.fromkeys(t for p in plans if isinstance(p, _Plan) for _, *pair, _ in p.turns for _, t in pair))
    encs = encode_batch(tok, wholes + tails, add_special_tokens=False)
    encoded = {t: e.ids for t, e in zip(tails, encs[len(wholes):])}
    out, whole_encs = [], iter(encs)
    for p in plans:
        if not isinstance(p, _Plan):
            out.append(p)
            continue
        try:
            out.append(_finish(p, next(whole_encs), encoded))
        except Exception as e:
            out.append(e)
    return out


def encode_conversation_fast(messages: list[dict], tools: list | None, render, split: re.Pattern,
                             tok: tokenizers.Tokenizer, first: int = 0,
                             extra: dict | None = None) -> tuple[list[int], list[int]] | None:
    """``encode_conversations`` of one conversation as ``encode_conversation`` gives it: (ids, mask), or its
    exception raised; None for the plain path."""
    got = encode_conversations([(messages, tools, first, extra)], render, split, tok)[0]
    if isinstance(got, Exception):
        raise got
    if got is None:
        return None
    ids, spans = got
    mask = [0] * len(ids)
    for head, upto in spans:
        mask[head:upto] = [1] * max(0, upto - head)
    return ids, mask
