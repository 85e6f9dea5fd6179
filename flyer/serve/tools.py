"""Tool calling (OpenAI's ``tools``, ``tool_choice``, ``tool_calls``) in the DeepSeek formats: V3.1 / V3.2-Exp's,
V3-0324 / R1 / R1-0528's, and V3.2 / V4's DSML (``flyer.serve.dsml``: the functions below hand it a ``DsmlFormat``);
and Kimi K2's (``flyer.serve.tools_kimi``: a ``KimiFormat``, whose calls carry the ids the model writes).

The chat template renders ``tools`` and the tool messages of a conversation (the checkpoint's template decides the
prompt, an assistant's earlier calls included); this module reads the calls a model writes and, for ``tool_choice``
"required" or a named function, builds the llguidance grammar that makes it write one (``flyer.serve.grammar``
masks the logits with it). A calls block, in either format:

    <｜tool▁calls▁begin｜>  CALL (BETWEEN CALL)*  <｜tool▁calls▁end｜>
    DEEPSEEK_V31  CALL = <｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGUMENTS_JSON<｜tool▁call▁end｜>, BETWEEN = ""
    DEEPSEEK_V3   CALL = <｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGUMENTS_JSON\n```
                         <｜tool▁call▁end｜> (one line), BETWEEN = "\n"

A checkpoint's format is chosen once from its chat template (``tool_format``: KIMI_K2 when it writes Kimi's
``<|tool_calls_section_begin|>``; DEEPSEEK_V3 when the template writes
a fenced json block in its call rendering; DSML_V32 / DSML_V4 for DeepSeek-V3.2's / V4's encoding or a template
writing their DSML; DEEPSEEK_V31 otherwise, the default), or forced by name (``flyer serve --tool-call-parser``,
vLLM's names: ``TOOL_PARSERS``) for a template it misreads. A checkpoint's tokenizer holds
the markers as added tokens: one id each, which a decoder that skips special tokens drops, so the text parsed is
decoded with them written out (``marked_text``); a tokenizer without them writes and reads them as text.

Modes (``tool_choice``): "none" renders the tools and parses nothing; "auto" (the default with tools) generates
freely (with a ``response_format``: its JSON or a calls block; with a ``strict`` function: text, then at most a
block whose calls match their schemas) and parses the calls if the model writes the format; "required" and a
named function constrain the output to a calls block. A choice whose text parses answers ``tool_calls`` with
finish_reason "tool_calls" and content the text before the block (null when blank); one that does not (no block,
a malformed one, one a stop string left open) answers its text as content. A block the length limit cut answers
the content before it and the calls before the cut (none, if it cut the first: the partial call's text is
dropped), with finish_reason "length".
``parallel_tool_calls`` false: the grammar allows one call; under "auto" the parse keeps the first.
Streaming (``flyer.serve.api``) is the simplest correct one: content deltas up to the block (none while the text so
far is blank, which a whole answer serves as null: ``flyer.serve.choice.calls_content``, one rule for both), then,
once the whole output is parsed at the end, one chunk with every call's ``tool_calls`` delta (index, id, type, name,
the whole arguments), then a chunk of finish_reason "tool_calls" ("length" for a block the limit cut) alone, as
OpenAI streams them.

    ToolFormat, DEEPSEEK_V31, DEEPSEEK_V3   the formats; ``TOOL_FORMAT`` the default (``KIMI_K2``: tools_kimi)
    tool_format(chat_template)      the format a checkpoint's template writes calls in
    chosen_format(parser, template) ``TOOL_PARSERS``' format by name, or "auto": ``tool_format``
    parse_tool_calls(text, fmt)     generated text -> (content before the calls, calls), or None: serve it as content
    tool_grammar(tools, ...)        "required" / named / strict: an llguidance grammar of a calls block whose
                                    arguments match the tool's ``parameters`` schema; ``FieldError`` naming tools
    marked_text(tok, ids)           ids decoded with the markers kept
    content_end(text)               how much of a streamed text is content (before a calls block)
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

import llguidance

from flyer.data.deepseek_encoding import DSML, ChatEncoding, ChatTemplate
from flyer.errors import FieldError
from flyer.interop.hf_tokenizer import TextTokenizer
from flyer.serve.choice import calls_content, cut_inside, held_back, json_at, skip_space
from flyer.serve.dsml import DSML_V4, DSML_V32, NL, DsmlFormat, dsml_grammar, parse_dsml_calls
from flyer.serve.grammar import JSON_DEFAULTS, MAX_SCHEMA_CHARS, compilable, schema_json
from flyer.serve.tools_kimi import KIMI_K2, KimiFormat, kimi_grammar_rules


@dataclass(frozen=True)
class ToolFormat:
    """A model family's tool-call text: a calls block is ``calls_begin`` CALL (``between`` CALL)* ``calls_end``,
    a CALL ``call_begin`` NAME ``sep`` ARGUMENTS ``call_end``, or with ``call_type`` (V3-0324)
    ``call_begin`` TYPE ``sep`` NAME ``args_open`` ARGUMENTS ``args_close`` ``call_end``."""

    name: str
    calls_begin: str
    calls_end: str
    call_begin: str
    sep: str
    call_end: str
    call_type: str | None = None  # written before ``sep``, the name after it (then ``args_open`` ends the name)
    args_open: str = ""  # around the arguments (V3-0324: a fenced json block)
    args_close: str = ""
    between: str = ""  # what the chat template writes between two calls

    @property
    def markers(self) -> tuple[str, ...]:
        return self.calls_begin, self.calls_end, self.call_begin, self.sep, self.call_end

    def call(self, name: str, arguments: str) -> str:
        """One call as the model writes it."""
        head = f"{self.call_type}{self.sep}{name}" if self.call_type is not None else f"{name}{self.sep}"
        return f"{self.call_begin}{head}{self.args_open}{arguments}{self.args_close}{self.call_end}"

    def render(self, calls: list[tuple[str, str]]) -> str:
        """The calls block of (name, arguments JSON text) pairs, as the model writes it."""
        return self.calls_begin + self.between.join(self.call(n, a) for n, a in calls) + self.calls_end

    def split_head(self, text: str, at: int) -> tuple[str, None, int] | None:
        """A call's head from ``text[at]`` (just past ``call_begin``) to where its arguments start -> (name, None:
        no id, that position); None when it is not one (no ``sep``, another type, the fence missing, a marker in
        it). Whitespace around the parts is allowed."""
        opens = self.sep if self.call_type is None else self.args_open.strip()  # V3-0324: the fence ends the name
        end = text.find(opens, at)
        if end < 0:
            return None
        head = text[at:end]
        if head.count(self.sep) != (self.call_type is not None) or any(m in head for m in self.markers
                                                                         if m != self.sep):
            return None
        kind, _, name = head.rpartition(self.sep)
        if kind.strip() != (self.call_type or ""):
            return None
        return name.strip(), None, end + len(opens)


_CALLS_BEGIN, _CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
_CALL_BEGIN, _SEP, _CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"
DEEPSEEK_V31 = ToolFormat("deepseek-v3.1", _CALLS_BEGIN, _CALLS_END, _CALL_BEGIN, _SEP, _CALL_END)  # and V3.2-Exp
DEEPSEEK_V3 = ToolFormat("deepseek-v3", _CALLS_BEGIN, _CALLS_END, _CALL_BEGIN, _SEP, _CALL_END,  # V3-0324, R1
                         call_type="function", args_open="\n```json\n", args_close="\n```", between="\n")
TOOL_FORMAT = DEEPSEEK_V31  # the default: a template that does not show V3-0324's
# the formats by ``--tool-call-parser`` name, vLLM's for the same formats
TOOL_PARSERS = {"deepseek_v3": DEEPSEEK_V3, "deepseek_v31": DEEPSEEK_V31, "deepseek_v32": DSML_V32,
                "deepseek_v4": DSML_V4, "kimi_k2": KIMI_K2}
# a chat encoding's format (``flyer.data.deepseek_encoding.ENCODINGS``' names)
ENCODING_FORMATS = {"deepseek_v32": DSML_V32, "deepseek_v4": DSML_V4}
# the most calls a constrained output holds ("required" with parallel calls): a model that never chooses to end
# the block (an untrained one, greedy) still ends within a few hundred tokens
MAX_TOOL_CALLS = 8


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: the function's name and its arguments' JSON text (an object), as the model wrote them; its
    ``id`` where the format has the model write one (Kimi K2's ``functions.NAME:IDX``)."""

    name: str
    arguments: str
    id: str | None = None

    def openai(self) -> dict:
        """OpenAI's ``tool_calls`` entry: its ``id``, else a fresh one."""
        return {"id": self.id or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def tool_format(chat_template: ChatTemplate) -> ToolFormat | DsmlFormat | KimiFormat:
    """The format a checkpoint's chat template (of named ones, the "tool_use" one, else the "default") writes an
    assistant's calls in: a chat encoding's own
    (``ENCODING_FORMATS``); ``KIMI_K2`` for a template holding its ``calls_begin`` (Kimi K2 / K2-Thinking / K2.5's);
    ``DSML_V32`` / ``DSML_V4`` for a template that writes their DSML block;
    ``DEEPSEEK_V3`` when a fenced json block follows a ``sep`` before the next ``call_end`` (V3-0324 / R1 /
    R1-0528's templates), else ``DEEPSEEK_V31`` (V3.1 / V3.2-Exp's, and the default without a template)."""
    if isinstance(chat_template, ChatEncoding):
        return ENCODING_FORMATS[chat_template.name]
    if isinstance(chat_template, dict):
        chat_template = chat_template.get("tool_use", chat_template["default"])
    if KIMI_K2.calls_begin in (chat_template or ""):
        return KIMI_K2
    for fmt in (DSML_V32, DSML_V4):
        if f"{DSML}{fmt.block}" in (chat_template or ""):
            return fmt
    t, fmt = chat_template or "", DEEPSEEK_V3
    for m in re.finditer(re.escape(fmt.sep), t):
        end = t.find(fmt.call_end, m.end())
        if fmt.args_open.strip() in t[m.end():end if end >= 0 else len(t)]:
            return fmt
    return DEEPSEEK_V31


def chosen_format(parser: str, chat_template: ChatTemplate) -> ToolFormat | DsmlFormat | KimiFormat:
    """The format calls are written and read in: ``TOOL_PARSERS[parser]``, or for "auto" the template's
    (``tool_format``). ``FieldError`` naming ``tool_call_parser`` for another name."""
    if parser == "auto":
        return tool_format(chat_template)
    if parser not in TOOL_PARSERS:
        raise FieldError("tool_call_parser", f"must be one of {['auto', *TOOL_PARSERS]} (got {parser!r})")
    return TOOL_PARSERS[parser]


def parse_tool_calls(text: str, fmt: ToolFormat | DsmlFormat | KimiFormat = TOOL_FORMAT, parallel: bool = True,
                     cut: bool = False) -> tuple[str | None, list[ToolCall]] | None:
    """``text`` (generated, markers written out) -> (the content before the calls block, None when blank; its
    calls), or None when it holds no well-formed block in ``fmt``: no ``calls_begin``, a block left open (a limit
    reached), a call without a name, not in ``fmt``'s shape or whose arguments are not a JSON object, text after
    the block. The arguments end where their JSON does, so their strings may spell markers (a grammar lets them).
    Whitespace between the markers is allowed. Not ``parallel``: only the first call is kept (under "auto" the
    output is free: a block is parsed whole, so a stream and a whole answer agree, and the calls past the first
    dropped; stopping at the first ``call_end`` would leave the block open, as a limit does). ``cut``: the output
    was cut short (finish_reason "length"): a block that is not whole gives its well-formed calls before the first
    that is not (the one cut: ``flyer.serve.choice.cut_inside``; maybe none), the rest dropped, as vLLM's parsers
    do. DSML: ``flyer.serve.dsml.parse_dsml_calls``; Kimi K2's calls keep the ids the model wrote
    (``KimiFormat.split_head``)."""
    if isinstance(fmt, DsmlFormat):
        got = parse_dsml_calls(text, fmt, parallel, cut)
        return None if got is None else (got[0], [ToolCall(*c) for c in got[1]])
    start = text.find(fmt.calls_begin)
    if start < 0:
        return None
    pos, calls = skip_space(text, start + len(fmt.calls_begin)), []
    while text.startswith(fmt.call_begin, pos) and (call := _call_at(text, pos, fmt)) is not None:
        calls.append(call[0])
        pos = call[1]
    whole = calls and text.startswith(fmt.calls_end, pos) and not text[pos + len(fmt.calls_end):].strip()
    if not (whole or cut and cut_inside(text[pos:], fmt.call_begin, fmt.call_end, fmt.calls_end)):
        return None
    return calls_content(text[:start]), calls if parallel else calls[:1]


def _call_at(text: str, pos: int, fmt: ToolFormat | KimiFormat) -> tuple[ToolCall, int] | None:
    """The call whose ``call_begin`` is at ``text[pos]`` and the position past its ``call_end`` (and the whitespace
    after); None when it is not well-formed there (or cut)."""
    head = fmt.split_head(text, pos + len(fmt.call_begin))
    got = None if head is None or not head[0] else json_at(text, head[2])
    if got is None or not isinstance(got[0], dict):
        return None
    name, call_id, at = head
    arguments, pos = text[skip_space(text, at):got[1]], skip_space(text, got[1])
    for close in (fmt.args_close.strip(), fmt.call_end):
        if not text.startswith(close, pos):
            return None
        pos = skip_space(text, pos + len(close))
    return ToolCall(name, arguments, call_id), pos


def marker_ids(tok, fmt: ToolFormat | DsmlFormat | KimiFormat = TOOL_FORMAT) -> dict[str, int]:
    """marker -> its token id, for the markers ``tok`` holds as one token (a checkpoint's added tokens); {} for
    a tokenizer without (bytes: the markers are then written as text)."""
    if not isinstance(tok, TextTokenizer):
        return {}
    ids = {m: tok.tok.token_to_id(m) for m in fmt.markers}
    return {m: i for m, i in ids.items() if i is not None}


def marked_text(tok, ids: list[int], fmt: ToolFormat | DsmlFormat | KimiFormat = TOOL_FORMAT) -> str:
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
                 fmt: ToolFormat | DsmlFormat | KimiFormat = TOOL_FORMAT, first_index: int = 0,
                 content: dict[str, Any] | None = None, text_first: bool = False) -> str:
    """The llguidance grammar (JSON text) of a calls block in ``fmt`` (between calls, its ``between``; around
    the arguments, its fence): one call of function ``name`` (a named
    ``tool_choice``), else 1 to ``MAX_TOOL_CALLS`` calls (one when not ``parallel``) of any of ``tools``
    (OpenAI's function definitions: ``{"name", "description", "parameters"}``), each call's arguments compact
    JSON matching its function's ``parameters`` (absent: any object). Markers are ``tok``'s token ids where it
    holds them (``marker_ids``), else their text. Nothing may precede the block; the output ends after it.
    ``FieldError`` naming ``tools`` for schemas too large (``MAX_SCHEMA_CHARS`` in all) or that llguidance
    cannot compile. DSML: ``flyer.serve.dsml.dsml_grammar``'s block (its markers are text). Kimi K2: the calls'
    ids ``functions.NAME:IDX`` with IDX from ``first_index`` on (``tools_kimi.calls_so_far`` of the request).
    ``content`` (tool_choice "auto" with a ``response_format``): the JSON schema the output matches instead when it
    is not a calls block, as OpenAI's structured outputs rule the reply, not whether a tool is called.
    ``text_first`` (tool_choice "auto" with a ``strict`` function): any text without the block's begin marker,
    then optionally the block, so that the calls the model chooses to write match their schemas."""
    ids = marker_ids(tok, fmt)

    def marker(m: str) -> str:
        return f"<[{ids[m]}]>" if m in ids else _lark_string(m)

    chosen = [f for f in tools if name is None or f["name"] == name]
    params = [f.get("parameters") or {"type": "object"} for f in chosen]  # OpenAI: absent, no parameters
    schemas = [_guided_json(p) for p in params]
    if sum(map(len, schemas)) > MAX_SCHEMA_CHARS:
        raise FieldError("tools", f"the parameters schemas hold {sum(map(len, schemas))} characters; at most "
                                  f"{MAX_SCHEMA_CHARS} are served")
    begin = fmt.calls_begin + NL if isinstance(fmt, DsmlFormat) else fmt.calls_begin  # the start rule's first item
    text = (begin, ids.get(begin), fmt.calls_begin) if text_first else None
    if isinstance(fmt, DsmlFormat):
        return _compiled(dsml_grammar(tools, name, parallel, MAX_TOOL_CALLS, fmt), content, text)  # (fields by index)
    n_calls = MAX_TOOL_CALLS if parallel and name is None else 1
    if isinstance(fmt, KimiFormat):
        rules = kimi_grammar_rules([f["name"] for f in chosen], marker, n_calls, first_index, fmt)
        return _compiled("\n".join(rules + [f"args_{k}: %json {schema}" for k, schema in enumerate(schemas)]),
                         content, text)
    more = f" ({_lark_string(fmt.between)} call)" if fmt.between else " call"
    repeat = f"{more}{{0,{n_calls - 1}}}" if n_calls > 1 else ""
    rules = [f"start: {marker(fmt.calls_begin)} call{repeat} {marker(fmt.calls_end)}",
             "call: " + " | ".join(f"call_{k}" for k in range(len(chosen)))]
    for k, (f, schema) in enumerate(zip(chosen, schemas)):
        fn = _lark_string(f["name"])
        head = f"{fn} {marker(fmt.sep)}" if fmt.call_type is None else \
            f"{_lark_string(fmt.call_type)} {marker(fmt.sep)} {fn}"
        args = " ".join([_lark_string(fmt.args_open)] * bool(fmt.args_open) + [f"args_{k}"]
                        + [_lark_string(fmt.args_close)] * bool(fmt.args_close))
        rules += [f"call_{k}: {marker(fmt.call_begin)} {head} {args} {marker(fmt.call_end)}",
                  f"args_{k}: %json {schema}"]
    return _compiled("\n".join(rules), content, text)


def _guided_json(schema: dict[str, Any]) -> str:
    """``schema``'s JSON text for a lark ``%json``: compact JSON unless its own "x-guidance" says otherwise, as
    ``json_grammar``'s."""
    return schema_json({**schema, "x-guidance": {**JSON_DEFAULTS, **schema.get("x-guidance", {})}})


def _regex_text(s: str) -> str:
    """``s`` matched literally inside a lark ``/.../`` regex (llguidance's syntax: ``\\n`` for a line break)."""
    return re.escape(s).replace("\\\n", "\\n").replace("/", "\\/")


def _compiled(lark: str, content: dict[str, Any] | None = None,
              text: tuple[str, int | None, str] | None = None) -> str:
    """``lark`` (a calls block from its ``start`` rule) compiled; with ``content``, a JSON value matching that
    schema (``json_grammar``'s whitespace) or the block. With ``text`` (the start rule's first item: its text, its
    token id or None, and the block's begin marker): text that never holds the marker, or text then the block."""
    if content is not None:
        schema = _guided_json(content)
        lark = "\n".join(["start: json_content | calls_block", f"json_content: %json {schema}",
                          re.sub(r"^start:", "calls_block:", lark, count=1, flags=re.M)])
    elif text is not None:
        first, token, marker = text
        free = f"TEXT: /(?s:.+)/ & ~/(?s:.*){_regex_text(marker)}(?s:.*)/"
        if token is not None:  # a special token no text lexeme can match: the block follows the text as it is
            lark = "\n".join(["start: TEXT? calls_block?", free,
                              re.sub(r"^start:", "calls_block:", lark, count=1, flags=re.M)])
        else:  # the text up to the marker's first occurrence as one lexeme (a greedy text lexeme apart would eat it)
            # no marker before the block's: DSML's first item is the marker and a line break, and the parser reads
            # from the marker's first occurrence, so an earlier bare marker would serve the calls as content
            after = "." * (len(first) - len(marker))
            head = f"TEXT_THEN_BLOCK: /(?s:.*){_regex_text(first)}/ & ~/(?s:.*){_regex_text(marker)}(?s:{after}.+)/"
            rest, n = re.subn(rf"^start: {re.escape(_lark_string(first))}( |$)", "calls_rest: ", lark, count=1,
                              flags=re.M)
            assert n == 1, "a calls block's start rule opens with its begin marker"
            lark = "\n".join(["start: TEXT? | TEXT_THEN_BLOCK calls_rest", free, head, rest])
    try:
        grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    except ValueError as e:
        raise FieldError("tools", f"the parameters cannot be compiled ({e})") from None
    return compilable(grammar, "tools", "the parameters")


def content_end(text: str, start: int = 0, fmt: ToolFormat | DsmlFormat | KimiFormat = TOOL_FORMAT) -> int:
    """How much of ``text`` (generated so far) may stream as content: up to a ``calls_begin`` in it, less a
    tail that could still become one. ``start``: how much already streamed (searched from there on)."""
    at = text.find(fmt.calls_begin, max(0, start - len(fmt.calls_begin)))
    if at >= 0:
        return at
    return len(text) - held_back(text, fmt.calls_begin)
