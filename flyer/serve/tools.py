"""Tool calling (OpenAI's ``tools``, ``tool_choice``, ``tool_calls``) in DeepSeek-V3.1 / V3.2's format.

The chat template renders ``tools`` and the tool messages of a conversation (the checkpoint's template decides the
prompt); this module reads the calls a model writes and, for ``tool_choice`` "required" or a named function, builds
the llguidance grammar that makes it write one (``flyer.serve.grammar`` masks the logits with it). The format:

    <｜tool▁calls▁begin｜>                                     then per call
    <｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGUMENTS_JSON<｜tool▁call▁end｜>   then
    <｜tool▁calls▁end｜>

(DeepSeek-V3-0324's format, ``function<｜tool▁sep｜>NAME`` then a fenced JSON block, differs in the call's body:
it would be a format of its own beside ``DEEPSEEK_V31``, with its parser and grammar.) A checkpoint's tokenizer
holds the markers as added tokens: one id each, which a decoder that skips special tokens drops, so the text
parsed is decoded with them written out (``marked_text``).

Modes (``tool_choice``): "none" renders the tools and parses nothing; "auto" (the default with tools) generates
freely and parses the calls if the model writes the format; "required" and a named function constrain the output
to a calls block. A choice whose text parses answers ``tool_calls`` with finish_reason "tool_calls" and content the
text before the block (null when blank); one that does not (no block, one left open) answers its text as content.
Streaming (``flyer.serve.api``) is the simplest correct one: content deltas up to the block, then, once the whole
output is parsed at the end, one chunk with every call's ``tool_calls`` delta (index, id, type, name, the whole
arguments) and finish_reason "tool_calls".

    ToolFormat / DEEPSEEK_V31       the markers; ``TOOL_FORMAT`` the one flyer serve speaks
    parse_tool_calls(text)          generated text -> (content before the calls, calls), or None: serve it as content
    tool_grammar(tools, ...)        "required" / named: an llguidance grammar of a calls block whose arguments match
                                    the tool's ``parameters`` schema; ``FieldError`` naming tools
    marked_text(tok, ids)           ids decoded with the markers kept
    content_end(text)               how much of a streamed text is content (before a calls block)
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import llguidance

from flyer.errors import FieldError
from flyer.interop.hf_tokenizer import TextTokenizer
from flyer.serve.grammar import JSON_DEFAULTS, MAX_SCHEMA_CHARS, compilable


@dataclass(frozen=True)
class ToolFormat:
    """A model family's tool-call markers: a calls block is ``calls_begin`` (``call_begin`` NAME ``sep``
    ARGUMENTS ``call_end``)+ ``calls_end``."""

    name: str
    calls_begin: str
    calls_end: str
    call_begin: str
    sep: str
    call_end: str

    @property
    def markers(self) -> tuple[str, ...]:
        return self.calls_begin, self.calls_end, self.call_begin, self.sep, self.call_end

    def render(self, calls: list[tuple[str, str]]) -> str:
        """The calls block of (name, arguments JSON text) pairs, as the model writes it."""
        body = "".join(f"{self.call_begin}{n}{self.sep}{a}{self.call_end}" for n, a in calls)
        return f"{self.calls_begin}{body}{self.calls_end}"


DEEPSEEK_V31 = ToolFormat("deepseek-v3.1", calls_begin="<｜tool▁calls▁begin｜>", calls_end="<｜tool▁calls▁end｜>",
                          call_begin="<｜tool▁call▁begin｜>", sep="<｜tool▁sep｜>", call_end="<｜tool▁call▁end｜>")
TOOL_FORMAT = DEEPSEEK_V31  # DeepSeek-V3.1 and V3.2 write it
# the most calls a constrained output holds ("required" with parallel calls): a model that never chooses to end
# the block (an untrained one, greedy) still ends within a few hundred tokens
MAX_TOOL_CALLS = 8


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: the function's name and its arguments' JSON text (an object), as the model wrote them."""

    name: str
    arguments: str

    def openai(self) -> dict:
        """OpenAI's ``tool_calls`` entry, with a fresh id."""
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def parse_tool_calls(text: str, fmt: ToolFormat = TOOL_FORMAT) -> tuple[str | None, list[ToolCall]] | None:
    """``text`` (generated, markers written out) -> (the content before the calls block, None when blank; its
    calls), or None when it holds no well-formed block: no ``calls_begin``, a block left open (a limit reached),
    a call without a name or whose arguments are not a JSON object, text after the block. Whitespace between
    the markers is allowed."""
    start = text.find(fmt.calls_begin)
    if start < 0:
        return None
    rest, calls = text[start + len(fmt.calls_begin):].lstrip(), []
    while rest.startswith(fmt.call_begin):
        head, sep, tail = rest[len(fmt.call_begin):].partition(fmt.sep)
        args, end, rest = tail.partition(fmt.call_end)
        name = head.strip()
        if not sep or not end or not name or any(m in head or m in args for m in fmt.markers):
            return None
        try:
            if not isinstance(json.loads(args), dict):
                return None
        except ValueError:
            return None
        calls.append(ToolCall(name, args.strip()))
        rest = rest.lstrip()
    if not calls or not rest.startswith(fmt.calls_end) or rest[len(fmt.calls_end):].strip():
        return None
    content = text[:start]
    return (content if content.strip() else None), calls


def marker_ids(tok, fmt: ToolFormat = TOOL_FORMAT) -> dict[str, int]:
    """marker -> its token id, for the markers ``tok`` holds as one token (a checkpoint's added tokens); {} for
    a tokenizer without (bytes: the markers are then written as text)."""
    if not isinstance(tok, TextTokenizer):
        return {}
    ids = {m: tok.tok.token_to_id(m) for m in fmt.markers}
    return {m: i for m, i in ids.items() if i is not None}


def marked_text(tok, ids: list[int], fmt: ToolFormat = TOOL_FORMAT) -> str:
    """``ids`` decoded with each marker token written out: ``tok.decode`` skips special tokens, which the
    markers may be. The text between markers decodes as one piece."""
    by_id = {i: m for m, i in marker_ids(tok, fmt).items()}
    out, piece = [], []
    for t in ids:
        if t in by_id:
            out += [tok.decode(piece), by_id[t]]
            piece = []
        else:
            piece.append(t)
    return "".join(out) + tok.decode(piece)


def _lark_string(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a lark string literal


def tool_grammar(tools: list[dict[str, Any]], tok, name: str | None = None, parallel: bool = True,
                 fmt: ToolFormat = TOOL_FORMAT) -> str:
    """The llguidance grammar (JSON text) of a calls block in ``fmt``: one call of function ``name`` (a named
    ``tool_choice``), else 1 to ``MAX_TOOL_CALLS`` calls (one when not ``parallel``) of any of ``tools``
    (OpenAI's function definitions: ``{"name", "description", "parameters"}``), each call's arguments compact
    JSON matching its function's ``parameters`` (absent: any object). Markers are ``tok``'s token ids where it
    holds them (``marker_ids``), else their text. Nothing may precede the block; the output ends after it.
    ``FieldError`` naming ``tools`` for schemas too large (``MAX_SCHEMA_CHARS`` in all) or that llguidance
    cannot compile."""
    ids = marker_ids(tok, fmt)

    def marker(m: str) -> str:
        return f"<[{ids[m]}]>" if m in ids else _lark_string(m)

    chosen = [f for f in tools if name is None or f["name"] == name]
    params = [f.get("parameters") or {"type": "object"} for f in chosen]  # OpenAI: absent, no parameters
    # compact JSON unless the schema's own "x-guidance" says otherwise, as ``json_grammar``'s
    schemas = [json.dumps({**p, "x-guidance": {**JSON_DEFAULTS, **p.get("x-guidance", {})}}) for p in params]
    if sum(map(len, schemas)) > MAX_SCHEMA_CHARS:
        raise FieldError("tools", f"the parameters schemas hold {sum(map(len, schemas))} characters; at most "
                                  f"{MAX_SCHEMA_CHARS} are served")
    repeat = f"{{1,{MAX_TOOL_CALLS}}}" if parallel and name is None else ""
    rules = [f"start: {marker(fmt.calls_begin)} call{repeat} "
             f"{marker(fmt.calls_end)}",
             "call: " + " | ".join(f"call_{k}" for k in range(len(chosen)))]
    for k, (f, schema) in enumerate(zip(chosen, schemas)):
        rules += [f"call_{k}: {marker(fmt.call_begin)} {_lark_string(f['name'])} {marker(fmt.sep)} args_{k} "
                  f"{marker(fmt.call_end)}", f"args_{k}: %json {schema}"]
    try:
        grammar = llguidance.LLMatcher.grammar_from_lark("\n".join(rules))
    except ValueError as e:
        raise FieldError("tools", f"the parameters cannot be compiled ({e})") from None
    return compilable(grammar, "tools", "the parameters")


def content_end(text: str, start: int = 0, fmt: ToolFormat = TOOL_FORMAT) -> int:
    """How much of ``text`` (generated so far) may stream as content: up to a ``calls_begin`` in it, less a
    tail that could still become one. ``start``: how much already streamed (searched from there on)."""
    at = text.find(fmt.calls_begin, max(0, start - len(fmt.calls_begin)))
    if at >= 0:
        return at
    for k in range(min(len(fmt.calls_begin) - 1, len(text)), 0, -1):
        if text.endswith(fmt.calls_begin[:k]):
            return len(text) - k
    return len(text)
