"""JSON and TOML a user gives (config files, chat lines, flags, checkpoint manifests), parsed so that what Python
cannot hold is malformed input like any other: ``json`` and ``tomllib`` recurse once per level, so a file of
``[[[[...`` ends in a ``RecursionError``, and an integer longer than ``sys.get_int_max_str_digits()`` in a bare
``ValueError``. Each caller already turns its parser's decode error into its own one-line error; these raise that
same decode error for both.
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
from typing import Any

from flyer.errors import FieldError

# a JSON string (whose brackets do not nest) or one bracket
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


_SURROGATE = re.compile("[\ud800-\udfff]")  # in a str, a lone one: JSON's pair "\\ud83d\\ude00" is one character
_TEXTS = (str, dict, list)  # what may hold a string


def is_unicode(text: str) -> bool:
    """Whether ``text`` holds no lone UTF-16 surrogate (what a byte no UTF-8 decodes to under surrogateescape, as
    Python reads argv, or JSON's ``"\\ud800"``): Unicode text a tokenizer encodes."""
    return _SURROGATE.search(text) is None


def is_token_id(text: str) -> bool:
    """Whether ``text`` spells a token id: ASCII digits only (``int()`` would also take " 7", "+7", "7_0" and
    other scripts' digits), as OpenAI's ``logit_bias`` keys and ``--logit-bias ID=VALUE`` write one."""
    return text.isascii() and text.isdigit()


def check_unicode(value: Any, field: str = "") -> None:
    """``FieldError`` naming the first string in ``value`` (a request body as JSON data: objects, arrays, scalars;
    ``field``: its name), or object key, that holds a lone UTF-16 surrogate (``"\\ud800"``): valid JSON, but no
    Unicode text, which no tokenizer encodes and no JSON response carries. Walked without recursion: a body nests
    as deep as the JSON parser lets it."""
    todo = [(field, value)]
    while todo:
        name, v = todo.pop()
        if isinstance(v, str):
            if (bad := _SURROGATE.search(v)) is not None:
                raise FieldError(name or "body", f"holds a lone UTF-16 surrogate (U+{ord(bad[0]):04X} at character "
                                                 f"{bad.start()}), which is no Unicode text")
        elif isinstance(v, dict):
            for k in v:
                check_unicode(k, name)  # a key names no field of its own: its object's
            todo += reversed([(f"{name}.{k}" if name else str(k), x) for k, x in v.items() if isinstance(x, _TEXTS)])
        elif isinstance(v, list):  # (names made for what may hold text only: a prompt of a million ids makes none)
            todo += reversed([(f"{name}[{i}]", x) for i, x in enumerate(v) if isinstance(x, _TEXTS)])


def json_loads(text: str | bytes, **kw: Any) -> Any:
    """``json.loads(text, **kw)``; arrays and objects nested past Python's recursion limit, or an integer past its
    digit limit, raise ``json.JSONDecodeError`` (at the first of the deepest brackets, or at the integer)."""
    try:
        return json.loads(text, **kw)
    except RecursionError:
        doc = text if isinstance(text, str) else text.decode("utf-8", "replace")
        depth, at = deepest_bracket(doc)
        raise json.JSONDecodeError(f"nested too deeply ({depth} levels)", doc, at) from None
    except ValueError as e:
        doc = text if isinstance(text, str) else text.decode("utf-8", "replace")
        at = long_integer(doc)
        if isinstance(e, json.JSONDecodeError) or at is None:  # not the digit limit (a hook's own error, say)
            raise
        raise json.JSONDecodeError(f"an integer of more than {sys.get_int_max_str_digits()} digits", doc, at) from None


def toml_loads(text: str) -> dict[str, Any]:
    """``tomllib.loads(text)``; arrays and inline tables nested past Python's recursion limit, or an integer past its
    digit limit, raise ``tomllib.TOMLDecodeError``."""
    try:
        return tomllib.loads(text)
    except RecursionError:
        raise tomllib.TOMLDecodeError("arrays or inline tables nested too deeply") from None
    except ValueError as e:
        if isinstance(e, tomllib.TOMLDecodeError) or long_integer(text) is None:
            raise
        line = text.count("\n", 0, long_integer(text)) + 1
        raise tomllib.TOMLDecodeError(f"an integer of more than {sys.get_int_max_str_digits()} digits (at line "
                                      f"{line})") from None


def deepest_bracket(doc: str) -> tuple[int, int]:
    """(the deepest nesting of JSON ``doc``'s brackets outside strings, the index where it is first reached);
    run only once a parse has failed."""
    depth = best = at = 0
    for m in _JSON_TOKEN.finditer(doc):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > best:
                best, at = depth, m.start()
        elif c in "]}":
            depth -= 1
    return best, at


def nesting_depth(value: Any) -> int:
    """How deeply lists, tuples and dicts nest in ``value`` (0 for a scalar), walked without recursion."""
    depth, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = v.values()
        elif not isinstance(v, (list, tuple)):
            continue
        depth = max(depth, d)
        stack.extend((x, d + 1) for x in v)
    return depth


def long_integer(doc: str) -> int | None:
    """The index of the first run of digits longer than Python converts to an int, or None (no limit, or none)."""
    limit = sys.get_int_max_str_digits()
    m = re.search(rf"[0-9_]{{{limit + 1},}}", doc) if limit else None
    return m.start() if m else None


__all__ = ["json_loads", "nesting_depth", "toml_loads"]
