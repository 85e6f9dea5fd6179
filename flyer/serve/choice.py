"""One choice of a completion as text (``flyer.serve.api``): its tokens decoded incrementally, cut at a stop string,
and what of it may stream yet (not what could still become a stop string, nor an incomplete UTF-8 sequence); the
content it reports before a tool-calls block (``calls_content``)."""

from __future__ import annotations

import bisect
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from flyer.serve.request import TokenEvent


def held_back(text: str, marker: str, end: int | None = None) -> int:
    """How many characters before ``end`` (default: the end) of ``text`` could be the start of ``marker``: a stream
    holds them back until the next token says (a stop string, a tool-call or reasoning marker)."""
    end = len(text) if end is None else end
    # only where the marker's first character is: the earliest such start that it goes on from is the longest
    i = text.find(marker[:1], max(0, end - len(marker) + 1), end) if marker else -1
    while i >= 0 and not marker.startswith(text[i:end]):
        i = text.find(marker[0], i + 1, end)
    return end - i if i >= 0 else 0


def calls_content(before: str) -> str | None:
    """The content a choice whose text holds a tool-calls block reports: the text ``before`` the block as written,
    None (null) when blank. One rule for a whole answer (``flyer.serve.tools.parse_tool_calls``) and a stream, whose
    content deltas join to it: a stream sends none of a content while this is None of it (``flyer.serve.api``)."""
    return before if before.strip() else None


_SPACE = re.compile(r"\s*")
_JSON = json.JSONDecoder()


def cut_inside(rest: str, call_begin: str, call_end: str, calls_end: str) -> bool:
    """Whether ``rest``, what follows a calls block's last well-formed call (whitespace skipped), is a call or the
    block's close cut short: nothing, the start of a marker, or a call begun whose end marker never came. Text
    after a call or a block that ended was no cut (the block is malformed: served as content). A character the cut
    split (byte tokens) decodes to U+FFFD."""
    rest = rest.rstrip("\ufffd")
    return not rest or any(m.startswith(rest) for m in (call_begin, calls_end)) or (
        rest.startswith(call_begin) and call_end not in rest and calls_end not in rest)


def skip_space(text: str, pos: int) -> int:
    """The position of the first character from ``pos`` on in ``text`` that is not whitespace."""
    return _SPACE.match(text, pos).end()


def json_at(text: str, pos: int) -> tuple[Any, int] | None:
    """(the JSON value starting at ``text[pos]`` after any whitespace, the position past it), or None: where a
    tool call's arguments end (their strings may spell any marker)."""
    try:
        return _JSON.raw_decode(text, skip_space(text, pos))
    except ValueError:
        return None


@dataclass
class Choice:
    """One prompt's generation as text: decoded incrementally, cut at a stop string."""

    tokenizer: Any
    stops: list[str]
    ids: list[int] = field(default_factory=list)
    text: str = ""  # the decoded text so far, up to any stop string
    sent: int = 0  # characters already streamed
    finish_reason: str | None = None
    events: list[TokenEvent] = field(default_factory=list)
    # ids[prefix:read] decode to the end of ``text``: the context the next tokens are decoded with
    prefix: int = 0
    read: int = 0
    starts: list[int] = field(default_factory=list)  # per id: where its text starts in ``text``
    cut: int | None = None  # where a stop string cut ``text``
    tokens_sent: int = 0  # ids whose logprobs are already streamed

    def _decode_new(self, final: bool) -> str:
        """Text of ids[read:], decoded after ids[prefix:read] (a decoder may render a token
        differently at the start of a sequence, e.g. SentencePiece's leading space): each token
        costs a decode of a few ids, where decoding every id per token is quadratic in the
        generation. Held back (until ``final``) while it ends inside a UTF-8 sequence (in U+FFFD, as vLLM holds it:
        text alone cannot tell an unfinished sequence from a byte none finishes, or the character itself)."""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]

    def add(self, e: TokenEvent) -> None:
        self.events.append(e)
        start = len(self.text)
        if e.token is not None:
            self.ids.append(e.token)
            self.starts.append(start)
        prefix, read = self.prefix, self.read
        self.text += self._decode_new(final=e.finish_reason is not None)
        if self.read > read + 1:  # ids held back came out together: each one's own start (``_held_starts``)
            self._held_starts(prefix, read, start)
        # only where the new text could complete a stop string; the earliest match of any cuts
        found = [i for s in self.stops if (i := self.text.find(s, max(0, start - len(s) + 1))) >= 0]
        if found:
            self.cut = min(found)
            self.text, self.finish_reason = self.text[:self.cut], "stop"
            return
        if e.finish_reason is not None:
            self.finish_reason = e.finish_reason

    def _held_starts(self, prefix: int, read: int, start: int) -> None:
        """Starts of ids[read + 1:self.read], decoded together with ids[read] from ``start`` on: id k starts where
        the decodes through k - 1 and through k part, so a byte that never completes a character (its U+FFFD
        stays) puts the next id after it, and one completed by id k puts k at the character's start; an id that
        adds no character to a decode ending in U+FFFD goes on with the sequence that U+FFFD stands for, and starts
        where it does (a 3- or 4-byte character's middle bytes: Python's and byte-level BPE's decoders write one
        U+FFFD for an unfinished sequence). SentencePiece's byte fallback writes one a byte, so the start is also
        no later than where the decode through k - 1 parts from the text decoded (the character those bytes
        finish). Starts stay sorted, as ``kept`` and ``delta_tokens`` read them."""
        base = len(self.tokenizer.decode(self.ids[prefix:read]))
        through = [self.tokenizer.decode(self.ids[prefix:j]) for j in range(read + 1, self.read + 1)]  # k - 1, k ..
        whole = through[-1]
        for k, a, b in zip(range(read + 1, self.read), through, through[1:]):
            at = len(os.path.commonprefix([a, b]))
            if at == len(a) == len(b) and a.endswith("\ufffd") and self.tokenizer.decode(self.ids[k:k + 1]):
                at -= 1  # (a token of no text of its own, a skipped special one, adds nothing: after it)
            at = min(at, len(os.path.commonprefix([a, whole])))
            self.starts[k] = max(start + at - base, self.starts[k - 1])  # (sorted even where a decoder rewrites)

    def kept(self) -> int:
        """How many of ``ids`` the text holds: after a stop string's cut, those whose text starts
        before it (a token partly cut stays); else all."""
        return len(self.ids) if self.cut is None else bisect.bisect_left(self.starts, self.cut)

    def delta_tokens(self) -> range:
        """Indices into ``ids`` of the tokens whose text starts in the text ``delta`` streamed since the
        last call (at the end, every kept one left): the tokens a chunk's logprobs report."""
        end = self.kept() if self.finish_reason is not None else bisect.bisect_left(self.starts, self.sent)
        out, self.tokens_sent = range(self.tokens_sent, end), end
        return out

    def delta(self, upto: int | None = None) -> str:
        """New text safe to stream: held back while it could still be the start of a stop string
        or ends in an incomplete UTF-8 sequence; before the end, none past ``upto`` (a tool call's start)."""
        end = len(self.text) if upto is None or self.finish_reason is not None else min(upto, len(self.text))
        if self.finish_reason is None:
            if self.text.endswith("\ufffd"):
                end -= 1
            for s in self.stops:
                end -= held_back(self.text, s, end)
        end = max(end, self.sent)
        out, self.sent = self.text[self.sent:end], end
        return out
