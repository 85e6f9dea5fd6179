"""Reasoning output (``flyer serve --reasoning-parser deepseek|kimi_k2``): a chat answer's text split into
``reasoning_content`` (what the model writes between ``<think>`` and ``</think>``) and ``content`` (the rest), as
DeepSeek's API and vLLM / SGLang's "deepseek_r1" / "deepseek_v3" parsers return it.

DeepSeek-R1-0528's template ends the generation prompt with ``<think>\\n``, V3.1 / V3.2's with ``<think>`` in thinking
mode (``chat_template_kwargs: {"thinking": true}``) and ``</think>`` otherwise; R1 may write ``<think>`` itself. So a
choice's output is read as:

    the prompt ends with the begin marker (whitespace after it aside)  the output starts in reasoning
    else the output starts with the begin marker                       reasoning starts after it
    else                                                               no reasoning: all content

Reasoning runs to the end marker, content from after it (the markers are in neither); without an end marker (the
output cut by ``max_tokens``) all of it is reasoning and content is null, as vLLM's parser answers. A stream's deltas
carry ``reasoning_content`` until the end marker, then ``content``; a tail that could still become a marker is held
back. The markers are found as token ids where the tokenizer holds them as one token (DeepSeek's do), else in the
text (byte tokens). Tool calls (``flyer.serve.tools``) are parsed from the content's tokens only; logprobs stay per
token, reasoning's included. ``reasoning_tokens`` counts the output's tokens before the content, markers included.

Kimi K2-Thinking / K2.5 (``KIMI_K2``; K2.5's template ends the generation prompt with ``<think>``, or
``<think></think>`` with thinking off; K2-Thinking's model writes ``<think>`` itself) may open a tool-calls section
inside the reasoning without ``</think>``: its begin marker (``ReasoningParser.calls``) ends the reasoning too,
whichever comes first, and the content starts at it (the marker the content's, so the calls parse), as vLLM's
``kimi_k2`` parser reads it. vLLM's parser takes an output with neither marker as all reasoning, having no prompt to
read; flyer reads the prompt, as for DeepSeek, so a model that does not open a think block answers content.

A grammar (``tool_choice`` "required" / named, ``response_format``) holds after the end marker when the prompt
opens reasoning (``end_ids``: the engine waits for that token, or, a marker in text tokens, for the output's text
to hold it as ``split`` finds it: ``EndWatch``, ``flyer.serve.grammar``), so the model reasons first. When the
prompt neither opens nor closes it (R1's original template, whose model writes ``<think>`` itself) the grammar
holds from the first token, but the output may start with the begin marker instead (``begin_ids``) and then reasons
first as well; when the prompt closes it (chat mode) or without a parser, the
grammar holds from the first token alone. A calls grammar whose block starts with the parser's calls marker waits for
that marker too (``grammar_at``): a section the model opens inside the reasoning is the grammar's from its marker on.

    ReasoningParser, PARSERS    the markers of a model family; ``PARSERS`` by ``--reasoning-parser`` name
    Reasoning                   a request's split (per its prompt); ``Reasoning(None)``: off, all content
    Split                       where one choice's text splits (``Reasoning.split``)
    EndWatch                    the engine's reading of where an output's reasoning ends (a marker in text tokens)
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import NamedTuple

from flyer.interop.hf_tokenizer import TextTokenizer
from flyer.serve.choice import Choice, held_back
from flyer.serve.request import TokenEvent


@dataclass(frozen=True)
class ReasoningParser:
    """A family's reasoning markers: reasoning is written between ``begin`` and ``end``; ``calls``: a tool-calls
    section's begin marker that ends the reasoning too, where it comes first (the section is the content's, its
    marker included, so that the tool parser reads it)."""

    name: str
    begin: str
    end: str
    calls: str | None = None


DEEPSEEK = ReasoningParser("deepseek", "<think>", "</think>")  # R1, R1-0528, V3.1, V3.2 (thinking)
# K2-Thinking, K2.5 (its template's generation prompt ends with <think>, or <think></think> without thinking): they
# may open a tool-calls section inside the reasoning without writing </think> (vLLM's kimi_k2 parser ends it there)
KIMI_K2 = ReasoningParser("kimi_k2", "<think>", "</think>", calls="<|tool_calls_section_begin|>")
PARSERS = {p.name: p for p in (DEEPSEEK, KIMI_K2)}
_SPACE = re.compile(r"\s*")


class Split(NamedTuple):
    """Where a choice's ``text`` splits: reasoning ``text[r0:r1]`` (none when not ``reasoning``), content
    ``text[content:]`` (None: not begun, i.e. no end marker yet), ``token`` the index of the content's first token;
    ``safe``: how much of the text may stream now (a possible marker's start held back)."""

    reasoning: bool
    r0: int
    r1: int
    content: int | None
    token: int
    safe: int


def _marker_id(tok, marker: str) -> int | None:
    return tok.tok.token_to_id(marker) if isinstance(tok, TextTokenizer) else None


class Reasoning:
    """One request's reasoning split with ``parser`` (None: off, every choice all content). ``opened``: the
    prompt ends inside a think block (``opens``), so the output starts in reasoning."""

    def __init__(self, parser: ReasoningParser | None, tok=None, opened: bool = False):
        self.parser, self.opened = parser, opened
        # choice -> (where its reasoning ends or None: a token index, or (text index, marker); how far searched)
        self._scanned: dict[int, tuple] = {}
        self._told: dict[int, tuple] = {}  # choice -> where its streamed reasoning, and content (None: none), end
        self.begin_id = _marker_id(tok, parser.begin) if parser else None
        self.end_id = _marker_id(tok, parser.end) if parser else None
        self.calls_id = _marker_id(tok, parser.calls) if parser and parser.calls else None

    @staticmethod
    def opens(parser: ReasoningParser | None, prompt_text: str) -> bool:
        """Whether a prompt's text (the rendered chat template) ends inside a think block."""
        return parser is not None and prompt_text.rstrip().endswith(parser.begin)

    @staticmethod
    def closes(parser: ReasoningParser | None, prompt_text: str) -> bool:
        """Whether a prompt's text ends with the end marker (a template's "no reasoning": V3.1's chat mode)."""
        return parser is not None and prompt_text.rstrip().endswith(parser.end)

    def end_ids(self, tok) -> tuple[int, ...]:
        """The end marker's ids in ``tok``: its one token where the tokenizer holds it (DeepSeek's), else its
        text's encoding (byte tokens: its bytes), which the engine decodes to find the marker in the output's text
        whatever tokens the model writes it in (``EndWatch``)."""
        return self._ids(tok, self.end_id, self.parser.end)

    def begin_ids(self, tok) -> tuple[int, ...]:
        """The begin marker's ids in ``tok``, as ``end_ids``."""
        return self._ids(tok, self.begin_id, self.parser.begin)

    def grammar_markers(self, tok, prompt_text: str, vocab_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``SamplingOptions``' (``grammar_after``, ``grammar_open``) of a request with a grammar and this prompt:
        none without a parser or when the prompt closes reasoning (the grammar holds from the first token); the end
        marker's ids when the prompt opens it; both markers' when neither (the output may open it), but none when
        the model cannot write the begin marker's ids (a tokenizer larger than the model's ``vocab_size``)."""
        if self.parser is None or self.closes(self.parser, prompt_text):
            return (), ()
        if self.opened:
            return self.end_ids(tok), ()
        begin = self.begin_ids(tok)
        return ((), ()) if max(begin) >= vocab_size else (self.end_ids(tok), begin)

    def grammar_at(self, tok, after: tuple[int, ...], first: str | None) -> tuple[int, ...]:
        """``SamplingOptions.grammar_at`` of a request whose grammar waits for ``after`` (``grammar_markers``) and
        may open with the marker ``first`` (a calls grammar's section marker, "auto"'s JSON-or-calls grammar's
        too; None: a JSON grammar): the parser's calls marker's ids when it is ``first``, so that a section the model
        opens inside the reasoning ends the reasoning and is the grammar's from its marker on, as the split reads
        it; else ().
        Also () where the two markers are not both one token or both text (the engine reads both alike)."""
        p = self.parser
        if not after or p is None or p.calls is None or p.calls != first:
            return ()
        at = self._ids(tok, self.calls_id, p.calls)
        return at if (len(at) == 1) == (len(after) == 1) else ()

    @staticmethod
    def _ids(tok, one: int | None, text: str) -> tuple[int, ...]:
        return (one,) if one is not None else tuple(tok.encode_ids(text, add_special_tokens=False))

    def split(self, text: str, ids: list[int], kept: int, starts: list[int], final: bool, key: int = 0) -> Split:
        """Where ``text`` splits; ``ids[:kept]`` the tokens it decodes from, ``starts`` where each one's text starts in
        it; ``final``: the output has ended (nothing held back). ``key``: which choice (the search for the end
        marker resumes where that choice's last call left it: a stream asks after every token)."""
        n = len(text)
        if self.parser is None:
            return Split(False, 0, 0, 0, 0, n)
        p = self.parser
        # where reasoning starts: after a leading begin marker, else at 0 when the prompt opened it
        ws = _SPACE.match(text).end()  # leading whitespace (not text.lstrip(): a copy per token)
        if self.begin_id is not None:
            k = bisect.bisect_left(starts, ws, 0, kept)  # the first token past the whitespace, as the text path
            if ws == n and k == kept and not final:
                return Split(False, 0, 0, None, 0, 0)  # undecided (nothing, or whitespace only, so far)
            led = k < kept and starts[k] == ws and ids[k] == self.begin_id
            r0, t0 = (starts[k + 1] if k + 1 < kept else n, k + 1) if led else (0, 0)
        else:
            head = text[ws:ws + len(p.begin)]
            if not final and p.begin.startswith(head) and len(head) < len(p.begin):
                return Split(False, 0, 0, None, 0, 0)  # undecided
            led = head == p.begin
            r0 = ws + len(p.begin) if led else 0
            t0 = bisect.bisect_left(starts, r0) if led else 0
        if not (led or self.opened):
            return Split(False, 0, 0, 0, 0, n)
        # where it ends: the end marker's token or text (or the calls marker's: the content starts at it, not
        # after), searched from where the last call stopped
        if self.end_id is not None:
            j, searched = self._scanned.get(key, (None, t0))
            if j is None:
                j = next((k for k in range(max(searched, t0), kept) if ids[k] in (self.end_id, self.calls_id)), None)
                self._scanned[key] = (j, kept)
            if j is not None and j < kept and ids[j] == self.calls_id:
                return Split(True, r0, max(r0, starts[j]), max(r0, starts[j]), j, n)
            if j is not None and j < kept:
                at = starts[j + 1] if j + 1 < len(starts) else n
                return Split(True, r0, max(r0, starts[j]), min(at, n), j + 1, n)
            return Split(True, r0, n, None, kept, n)
        # (a calls marker in text only where the end marker is: a tokenizer holding one as a token holds both)
        markers = (p.end, p.calls) if p.calls and self.calls_id is None else (p.end,)
        found, searched = self._scanned.get(key, (None, r0))
        if found is None:
            back = max(map(len, markers))
            hits = [(at, m) for m in markers if (at := text.find(m, max(r0, searched - back))) >= 0]
            found = min(hits) if hits else None
            self._scanned[key] = (found, n)
        if found is not None and found[0] + len(found[1]) <= n:  # (a stop string may have cut the text since)
            at, m = found
            content = at if m == p.calls else at + len(m)
            return Split(True, r0, at, content, bisect.bisect_left(starts, content), n)
        held = max(held_back(text, m) for m in markers)
        return Split(True, r0, n, None, kept, n if final else max(r0, n - held))

    def message(self, text: str, s: Split, content: str | None = None, calls: list | None = None) -> dict:
        """A whole answer's message: ``content`` (given: tool calls' content, else the text's) and, with a
        parser, ``reasoning_content`` (null when the output had none)."""
        if calls is None:
            content = None if s.content is None else text[s.content:]
        out = {"role": "assistant", "content": content}
        if self.parser is not None:
            out["reasoning_content"] = text[s.r0:s.r1] if s.reasoning else None
        if calls:
            out["tool_calls"] = calls
        return out

    def delta(self, text: str, after: int, s: Split, content: str | None = None, key: int = 0) -> dict:
        """A stream chunk's ``delta`` for ``text`` streamed up to ``after``: its reasoning part, then its content part
        (``content`` given: that instead); the markers between them in neither. ``key``: which choice (as
        ``split``'s): its reasoning and its content each go on from where their last part ended, not from what the
        stream passed, so that a marker skipped, then cut by a stop string (no marker after all: the whole answer's
        reasoning or content keeps its text), is sent as such."""
        out = {}
        told, said = self._told.get(key, (s.r0, None))
        start, end = max(s.r0, told), min(after, s.r1)
        if s.reasoning and end > start:
            out["reasoning_content"], told = text[start:end], end
        lo = s.content if s.content is None or said is None else max(said, s.content)
        if content is None and lo is not None and after > lo:
            content, said = text[lo:after], after
        if content:
            out["content"] = content
        self._told[key] = (told, said)
        return out

    @staticmethod
    def content_head(text: str, starts: list[int], kept: int, s: Split) -> str:
        """The content's text inside the token that ends the end marker (a marker in text tokens, one carrying
        text past it: ``ink>{``), which the content's tokens (from ``s.token``) leave out; "" otherwise."""
        if s.content is None:
            return ""
        return text[s.content:starts[s.token] if s.token < kept else len(text)]

    @staticmethod
    def reasoning_tokens(s: Split, kept: int) -> int:
        """Of a choice's ``kept`` output tokens, those before its content (all when it has none)."""
        return min(s.token, kept) if s.reasoning else 0


class EndWatch:
    """Where an output's reasoning ends, as the engine reads it for a grammar deferred until an end marker of
    several tokens (``flyer.serve.grammar``): the output decoded as the API decodes it (``Choice``) and split by
    the parser's text rule (``Reasoning.split``, the output's reasoning opened: by the prompt, or by ``begin`` at
    its start), so the grammar holds from where ``reasoning_content`` ends, whichever tokens the model writes the
    marker in (``</`` ``think`` ``>`` or ``</th`` ``ink>``)."""

    def __init__(self, tok, begin: str, end: str, calls: str = ""):
        self.tok, self.markers = tok, (end, calls) if calls else (end,)
        self.choice = Choice(tok, [])
        self.reasoning = Reasoning(ReasoningParser("engine", begin, end, calls or None), None, opened=True)

    def add(self, token: int) -> str | None:
        """``token`` written: the output's text after the end marker (the content begun: a token may carry text
        past the marker), or from the calls marker on (``calls``: it ended the reasoning), once the marker is whole,
        else None."""
        c = self.choice
        c.add(TokenEvent(token))
        s = self.reasoning.split(c.text, c.ids, len(c.ids), c.starts, False)
        return None if s.content is None else c.text[s.content:]

    def would_end(self, more: list[int]) -> bool:
        """Whether tokens ``more`` (drafts) after the output's would complete the end marker or the calls marker
        (the tail the text so far could begin one with, and their text, decoded after the tokens not yet in it)."""
        c, n = self.choice, max(map(len, self.markers)) - 1
        new = self.tok.decode(c.ids[c.prefix:] + list(more))[len(self.tok.decode(c.ids[c.prefix:c.read])):]
        tail = c.text[max(0, len(c.text) - n):] + new
        return any(m in tail for m in self.markers)
