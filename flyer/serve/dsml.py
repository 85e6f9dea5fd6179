"""Tool calls in DSML, the markup DeepSeek-V3.2 and V4 write them in (``flyer.serve.tools`` holds the V3 / V3.1
formats and picks this one for a checkpoint rendered by their encodings, ``flyer.data.deepseek_encoding``; V4's
block is named ``tool_calls``, V3.2's ``function_calls``):

    \\n\\n<｜DSML｜function_calls>
    <｜DSML｜invoke name="get_weather">
    <｜DSML｜parameter name="city" string="true">Seoul</｜DSML｜parameter>
    <｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜function_calls>

A parameter with string="true" holds its string raw (no quotes, no escapes), with string="false" a JSON value;
OpenAI's ``arguments`` is the JSON object of the parameters in order. The block opens with "\\n\\n" as the release's
encoder writes it after an assistant's content (and its parser reads it): the content is the text before.

    DsmlFormat, DSML_V32, DSML_V4       the formats (``flyer.serve.tools.TOOL_PARSERS["deepseek_v32"]``, ...)
    parse_dsml_calls(text, fmt, ...)    generated text -> (content, calls), or None: serve it as content
    dsml_grammar(tools, name, ...)      "required" / named / strict: the llguidance grammar of a calls block
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from flyer.data.deepseek_encoding import CALLS_BLOCK, CALLS_BLOCK_V4, DSML
from flyer.errors import FieldError
from flyer.serve.choice import calls_content, cut_inside, json_at, skip_space


@dataclass(frozen=True)
class DsmlFormat:
    """DSML calls in a block named ``block``; ``calls_begin`` / ``calls_end`` are the block's open (with the
    blank line before it) and close; ``markers`` what ``flyer.serve.tools.marker_ids`` looks up (none are one
    token in DeepSeek's tokenizer: they are read as text)."""

    name: str
    block: str

    @property
    def calls_begin(self) -> str:
        return f"\n\n<{DSML}{self.block}>"

    @property
    def calls_end(self) -> str:
        return f"</{DSML}{self.block}>"

    @property
    def markers(self) -> tuple[str, ...]:
        return self.calls_begin, self.calls_end


DSML_V32 = DsmlFormat("deepseek-v3.2", CALLS_BLOCK)
DSML_V4 = DsmlFormat("deepseek-v4", CALLS_BLOCK_V4)  # the same calls in a block named "tool_calls"
INVOKE, INVOKE_END = f"<{DSML}invoke", f"</{DSML}invoke>"
_INVOKE = re.compile(rf'\s*{INVOKE} name="([^"\n]+)">')
_PARAM = re.compile(rf'\s*<{DSML}parameter name="([^"\n]+)" string="(true|false)">')
_INVOKE_END = re.compile(rf"\s*{INVOKE_END}")
PARAM_END = f"</{DSML}parameter>"


def parse_dsml_calls(text: str, fmt: DsmlFormat = DSML_V32, parallel: bool = True,
                     cut: bool = False) -> tuple[str | None, list[tuple[str, str]]] | None:
    """``text`` (the content generated, after any reasoning) -> (the content before the block, None when
    blank; its calls, which ``flyer.serve.tools`` makes ``ToolCall``s), or None when it holds no well-formed block: no
    ``calls_begin``, a block left open, an invoke or parameter not in the shape above, a string="false" value
    that is not JSON, a parameter named twice, no invoke, text after the block. Whitespace between the tags is
    allowed. Not ``parallel``: the first call only (as ``flyer.serve.tools.parse_tool_calls``). ``cut``: the
    output was cut short; a block not whole gives its well-formed invokes before the first that is not (as
    ``parse_tool_calls``). A call is (name, arguments JSON text)."""
    start = text.find(fmt.calls_begin)
    if start < 0:
        return None
    pos, calls = start + len(fmt.calls_begin), []
    while m := _INVOKE.match(text, pos):
        if (call := _invoke_at(text, m)) is None:
            break
        calls.append(call[0])
        pos = call[1]
    rest = text[pos:].lstrip()
    whole = calls and rest.startswith(fmt.calls_end) and not rest[len(fmt.calls_end):].strip()
    if not (whole or cut and cut_inside(rest, INVOKE, INVOKE_END, fmt.calls_end)):
        return None
    return calls_content(text[:start]), calls if parallel else calls[:1]


def _invoke_at(text: str, m: re.Match) -> tuple[tuple[str, str], int] | None:
    """The call whose invoke tag ``m`` matched and the position past its close tag; None when it is not
    well-formed (or cut)."""
    pos, args = m.end(), {}
    while p := _PARAM.match(text, pos):
        key, value = p[1], _param_value(text, p.end(), p[2] == "true")
        if key in args or value is None:
            return None
        args[key], pos = value
    end = _INVOKE_END.match(text, pos)
    return None if end is None else ((m[1], json.dumps(args, ensure_ascii=False)), end.end())


def _param_value(text: str, at: int, raw: bool) -> tuple[object, int] | None:
    """A parameter's value from ``text[at]`` and the position past its close tag: a string parameter's text up to
    the first close tag (its grammar's lexeme ends there), a JSON one's value where its JSON ends (its strings may
    spell the tag), then the tag; None when it is not one."""
    if raw:
        end = text.find(PARAM_END, at)
        return None if end < 0 else (text[at:end], end + len(PARAM_END))
    got = json_at(text, at)
    end = None if got is None else skip_space(text, got[1])
    return (got[0], end + len(PARAM_END)) if end is not None and text.startswith(PARAM_END, end) else None


def _lark(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a lark string literal


# a string parameter's raw text and its close tag as one lexeme (any text up to the first close tag): a value
# lexeme apart would be matched greedily past the tag's start, and the tag after it never completes
_END = re.escape(PARAM_END).replace("/", "\\/")
STRING_VALUE = f"STRING_VALUE: /(?s:.*){_END}/ & ~/(?s:.*){_END}(?s:.+)/"
PARAM_NAME = "PARAM_NAME: /[A-Za-z0-9_.-]{1,64}/"  # a schema without properties: names a model may write
AS_STRING, AS_JSON, NL = '" string="true">', '" string="false">', "\n"
MAX_ANY_PARAMS = 16
# a JSON value as the encoder writes one (Python's json.dumps: ", " and ": "), so the model writes what it learnt
JSON_VALUES = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _regex(pattern: str) -> str:
    """A JSON schema ``pattern`` as a lark regex body matching a whole raw string: matched anywhere in it, as JSON
    schema reads a pattern, unless a leading ``^`` / trailing ``$`` anchors it (stripped: they are no regex of
    llguidance's; an alternation such as ``^a|b$`` then holds whole, a subset of what it allows, so every value
    written still matches). Bare slashes escaped for lark; other anchors are refused by llguidance (400)."""
    body, esc, head, tail = [], False, "(?s:.*)", "(?s:.*)"
    for ch in pattern:
        body.append("\\/" if ch == "/" and not esc else ch)
        esc = ch == "\\" and not esc
    text = "".join(body)
    if text.startswith("^"):
        text, head = text[1:], ""
    if text.endswith("$") and not _escaped(text, len(text) - 1):
        text, tail = text[:-1], ""
    return f"{head}(?:{text}){tail}"


def _escaped(text: str, i: int) -> bool:
    """Whether ``text[i]`` is escaped (an odd number of backslashes before it)."""
    return (i - len(text[:i].rstrip("\\"))) % 2 == 1


# JSON schema's string formats that llguidance's JSON path enforces (its 1.9 set), as regexes of a whole value
# written from their RFCs: 3339 (date, time with its offset, date-time with "T" or "t", its appendix A's duration),
# 1123 host names (labels of 1 to 63), email as llguidance reads it (RFC 5322's dot-atom local part, a host name of
# any label length or an [IPv4]), 3986's IPv6 without an embedded IPv4 (as llguidance's), 3986's URI (below),
# 4122 UUIDs in hex of either case; "unknown" is llguidance's name for any text. Checked against llguidance's JSON
# grammar value by value (tests/test_serve_dsml_strings.py); Python's ``re`` reads them too (an enum filtered by
# its format).
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_LABEL = "[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
_LONG_LABEL = "[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_ATOM = "[a-zA-Z0-9!#$%&'*+/=?^_`{|}~-]+"  # RFC 5322's atext
_H16 = "[0-9a-fA-F]{1,4}"
_TAILS = [*(f"(?:{_H16}:){{{n}}}{_H16}:{_H16}" for n in range(5, 1, -1)), f"{_H16}:{_H16}:{_H16}",
          f"{_H16}:{_H16}", _H16, ""]  # RFC 3986's forms after "::", fewest groups before it first
_IPV6 = "|".join([f"(?:{_H16}:){{6}}{_H16}:{_H16}", f"::{_TAILS[0]}"] +
                 [f"(?:(?:{_H16}:){{0,{j - 1}}}{_H16})?::{t}" for j, t in enumerate(_TAILS) if j > 0])
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:(?:[0-5][0-9]|60)(?:\.[0-9]+)?(?:[zZ]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_DATE = "[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])"
_DUR_TIME = "T(?:[0-9]+H(?:[0-9]+M(?:[0-9]+S)?)?|[0-9]+M(?:[0-9]+S)?|[0-9]+S)"
# RFC 3986's URI: scheme ":" hier-part ["?" query] ["#" fragment] (a fragment allowed, as llguidance's "uri"),
# ASCII only (an IRI's other characters percent-encoded); its IP-literal's IPv6 without an embedded IPv4, as
# llguidance's; an IPv4address is a reg-name too, so the host is an IP-literal or a reg-name
_SUB = r"a-zA-Z0-9\-._~!$&'()*+,;="  # unreserved and sub-delims, as a character class's body
_PCT = "%[0-9a-fA-F]{2}"
_PCHAR = f"(?:[{_SUB}:@]|{_PCT})"
_PATH = f"{_PCHAR}+(?:/{_PCHAR}*)*"  # path-rootless: a first segment not empty
_AUTHORITY = rf"(?:(?:[{_SUB}:]|{_PCT})*@)?(?:\[(?:{_IPV6}|v[0-9a-fA-F]+\.[{_SUB}:]+)\]|(?:[{_SUB}]|{_PCT})*)" \
             "(?::[0-9]*)?"
_URI = (rf"[a-zA-Z][a-zA-Z0-9+\-.]*:(?://{_AUTHORITY}(?:/{_PCHAR}*)*|/(?:{_PATH})?|{_PATH}|)"
        rf"(?:\?(?:[{_SUB}:@/?]|{_PCT})*)?(?:#(?:[{_SUB}:@/?]|{_PCT})*)?")
FORMATS = {
    "date": _DATE, "time": _TIME, "date-time": f"{_DATE}[tT]{_TIME}",
    "duration": f"P(?:(?:[0-9]+D|[0-9]+M(?:[0-9]+D)?|[0-9]+Y(?:[0-9]+M(?:[0-9]+D)?)?)(?:{_DUR_TIME})?|{_DUR_TIME}"
                "|[0-9]+W)",
    "email": rf"{_ATOM}(?:\.{_ATOM})*@(?:{_LONG_LABEL}(?:\.{_LONG_LABEL})*|\[{_IPV4}\])",
    "hostname": rf"{_LABEL}(?:\.{_LABEL})*", "ipv4": _IPV4, "ipv6": _IPV6,
    "uri": _URI, "uuid": "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    "unknown": "(?s:.*)",
}


def _string_checks(sub: dict[str, Any], field: str) -> list[str]:
    """Regexes of a whole value (Python's and llguidance's syntax) a string parameter's schema asks of it: its
    ``format`` (``FORMATS``; another one is a ``FieldError`` naming ``field``: never ignored) and its ``pattern``
    (``_regex``); its lengths are apart (``_raw_string``, ``_enum_values``)."""
    checks = []
    if "format" in sub:
        if sub["format"] not in FORMATS:
            raise FieldError(field, f"format {sub['format']!r} cannot be enforced in a DSML raw string; the formats "
                                    f"enforced are {', '.join(FORMATS)}")
        checks.append(f"(?:{FORMATS[sub['format']]})".replace("/", "\\/"))  # (lark's regex delimiter)
    if isinstance(sub.get("pattern"), str):
        checks.append(_regex(sub["pattern"]))
    return checks


def _enum_values(sub: dict[str, Any], enum: list[str], field: str) -> list[str]:
    """The values of a string parameter's ``enum`` that its ``format``, ``pattern`` (JSON schema's reading: found
    anywhere unless anchored) and lengths allow, as llguidance's JSON path intersects them; ``FieldError`` naming
    ``field`` when none is left (no call could be written)."""
    lo, hi = sub.get("minLength", 0), sub.get("maxLength")
    checks = [re.compile(c.replace("\\/", "/")) for c in _string_checks(sub, field)]
    kept = [v for v in enum if all(c.fullmatch(v) for c in checks) and lo <= len(v) <= (len(v) if hi is None else hi)]
    if not kept:
        raise FieldError(field, "none of its enum values matches its "
                                + "/".join(k for k in ("format", "pattern", "minLength", "maxLength") if k in sub))
    return kept


def _raw_string(sub: dict[str, Any], name: str, field: str) -> str | None:
    """The lark terminal ``name`` of a string parameter's raw text and close tag under its schema's ``format``,
    ``pattern``, ``minLength`` and ``maxLength`` (characters), as ``STRING_VALUE`` (one lexeme, the first close tag
    its end) intersected with each; None when it has none of them (``STRING_VALUE`` serves). ``FieldError`` naming
    ``field`` for a format it cannot enforce."""
    parts = [f"/{c}{_END}/" for c in _string_checks(sub, field)]
    lo, hi = sub.get("minLength", 0), sub.get("maxLength")
    if lo or hi is not None:  # a bad bound (not an integer) leaves a regex llguidance refuses: 400 naming tools
        parts.append(f"/(?s:.{{{lo},{'' if hi is None else hi}}}){_END}/")
    return f"{name}: " + " & ".join([*parts, f"~/(?s:.*){_END}(?s:.+)/"]) if parts else None


def _string_values(sub: dict[str, Any], name: str, field: str) -> tuple[str, list[str]] | None:
    """The raw text (string="true") a parameter's schema lets a string value take, as a lark expression through the
    close tag, with the terminals it defines (named from ``name``); None when the schema admits no string. The
    release's encoder writes every string value raw whatever the schema, so a schema that admits strings beside
    other values (a type list, an enum, ``const`` or ``anyOf`` / ``oneOf`` branches mixing them, or no type at all)
    takes its strings raw too: its enum's strings, a branch's strings, else any text its string keywords allow."""
    if "const" in sub or isinstance(sub.get("enum"), list):
        values = [sub["const"]] if "const" in sub else sub["enum"]
        strings = [v for v in values if isinstance(v, str)]
        if not strings:
            return None
        try:
            kept = _enum_values(sub, strings, field)
        except FieldError:
            if len(strings) == len(values):  # nothing left to write at all
                raise
            return None  # the other members are still written as JSON
        return "(" + " | ".join(_lark(v) for v in kept) + f") {_lark(PARAM_END)}", []
    types = sub.get("type")
    if types is None and any(k in sub for k in ("anyOf", "oneOf")):
        branches = sub.get("anyOf", sub.get("oneOf"))
        branches = [b for b in branches if isinstance(b, dict)] if isinstance(branches, list) else []
        found = [f for n, b in enumerate(branches) if (f := _string_values(b, f"{name}_{n}", field)) is not None]
        return ("(" + " | ".join(v for v, _ in found) + ")", [r for _, rs in found for r in rs]) if found else None
    if types is None and any(k in sub for k in ("allOf", "$ref", "not")):
        return None  # composed otherwise: JSON only
    if types is not None and "string" not in ([types] if isinstance(types, str) else types):
        return None
    constrained = _raw_string(sub, name, field)
    return (name, [constrained]) if constrained else ("STRING_VALUE", [])


def dsml_grammar(tools: list[dict[str, Any]], name: str | None, parallel: bool, max_calls: int,
                 fmt: DsmlFormat = DSML_V32) -> str:
    """The lark grammar text of a calls block in ``fmt``: one invoke of function ``name`` (a named
    ``tool_choice``), else 1 to ``max_calls`` (one when not ``parallel``) of any of ``tools`` (OpenAI's function
    definitions). Each invoke writes its ``parameters``' properties in the schema's order, the required ones
    always: a property whose schema's type is "string" as raw text (string="true"; any text without the close
    tag; one of its ``enum``, else matching its ``pattern``, ``minLength`` and ``maxLength``: ``_raw_string``), as
    is a property with an ``enum`` of strings only, any other as compact JSON matching its schema
    (string="false"), or raw where it is one of the strings the schema admits (``_string_values``). A schema
    without properties that allows more (absent: OpenAI's "no parameters" taken as any object, as
    ``flyer.serve.tools.tool_grammar`` takes it) takes up to ``MAX_ANY_PARAMS`` named ones; with
    ``additionalProperties`` false, none."""
    x = {"x-guidance": JSON_VALUES}
    chosen = [(i, f) for i, f in enumerate(tools) if name is None or f["name"] == name]
    rules = []
    for k, (i, f) in enumerate(chosen):
        schema = f.get("parameters") or {}
        props, required = schema.get("properties") or {}, set(schema.get("required") or ())
        params = []
        for j, (key, sub) in enumerate(props.items()):
            sub = sub if isinstance(sub, dict) else {}
            enum = sub.get("enum") if isinstance(sub.get("enum"), list) else None
            field = f"tools[{i}].function.parameters.properties.{key}"
            if not key or '"' in key or "\n" in key:  # written raw in name="...", as the encoder writes it
                raise FieldError(field, "a DSML parameter's name must be non-empty, without a double quote or a line "
                                        "break (the call could not be read back)")
            opened, strings, values = f'<{DSML}parameter name="{key}', _string_values(sub, f"STRING_{k}_{j}", field), []
            if strings is not None:
                rules += strings[1]
                values.append(f"{_lark(opened + AS_STRING)} {strings[0]}")
            if not (sub.get("type") == "string" or enum and all(isinstance(v, str) for v in enum)):
                values.append(f"{_lark(opened + AS_JSON)} %json {json.dumps({**sub, **x})} {_lark(PARAM_END)}")
            rules.append(f"param_{k}_{j}: ({' | '.join(values)}) {_lark(NL)}")
            params.append(f"param_{k}_{j}" + ("" if key in required else "?"))
        if not props and schema.get("additionalProperties", True) is not False:
            opened = _lark(f'<{DSML}parameter name="')
            rules.append(f"any_{k}: {opened} PARAM_NAME {_lark(AS_STRING)} STRING_VALUE {_lark(NL)} | {opened} "
                         f"PARAM_NAME {_lark(AS_JSON)} %json {json.dumps(x)} {_lark(PARAM_END)} {_lark(NL)}")
            params = [f"({_lark(NL)} | any_{k}{{1,{MAX_ANY_PARAMS}}})"]
        elif params and not required & set(props):  # none written: the encoder's empty line (or the optional ones)
            params = [f"({_lark(NL)} | {' '.join(params)})"]
        body = " ".join(params) or _lark("\n")  # no parameters: the encoder's empty line
        invoke = f'{INVOKE} name="{f["name"]}">\n'
        rules.append(f"invoke_{k}: {_lark(invoke)} {body} {_lark(INVOKE_END + NL)}")
    # each invoke ends with its line's end: a "\n" lexeme apart would be a prefix of the block's close ("\n</...")
    # and the greedy lexer would take the close's start for it
    repeat = f"{{1,{max_calls}}}" if parallel and name is None else ""
    start = [f"start: {_lark(fmt.calls_begin + NL)} invoke{repeat} {_lark(fmt.calls_end)}",
             "invoke: " + " | ".join(f"invoke_{k}" for k in range(len(chosen)))]
    return "\n".join(start + rules + [STRING_VALUE, PARAM_NAME])
