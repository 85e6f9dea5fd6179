"""Kimi K2.5 and later: tools declared to the model as TypeScript, as Moonshot's tokenizer wrapper declares them.

Kimi K2.5's (and K2.6's, K2.7's) ``tokenization_kimi.py`` overrides ``apply_chat_template``: it sorts the keys of
the tools at every depth, renders them as a TypeScript namespace (its ``tool_declaration_ts.py``) and hands the
template that text as ``tools_ts_str``, which the template writes in its ``tool_declare`` turn instead of the
tools' JSON; when its encoder cannot render a schema it passes nothing and the template falls back to the JSON. It
also passes ``thinking=True`` and ``preserve_thinking=False`` unless the caller sets them (the templates test
``thinking is false`` / ``preserve_thinking is false``, which an undefined variable fails). ``chat_kwargs`` does the
same for a template that reads ``tools_ts_str`` (``flyer.data.chat_template.chat_renderer``), so a prompt is the
text transformers renders with the release's remote code. The text, per function::

    interface NAME {...}          one per ``$defs`` entry ("interface parameters" first when a schema refers to "#")
    // description                the function's, one comment line per line
    type NAME = (_: {             its parameters: required fields first, then optional ones (``?``), each by name;
      // field description          a field's description, its constraints (``maxLength: 9, minLength: 1``) and
      // Default: "x"               default on comment lines above it
      field?: string              integer -> number; enum -> "a" | "b"; anyOf / a list of types -> a | b;
    }) => any;                    arrays -> Array<T>; additionalProperties -> [k: string]: T; $ref -> its name

wrapped in ``# Tools\\n\\n## functions\\nnamespace functions {\\n`` ... ``\\n}\\n``.

    deep_sorted(obj)       dicts' keys sorted at every depth (lists keep their order)
    typescript_tools(tools) OpenAI's tool list -> the declaration ("" without a function); ``UNRENDERED`` errors
    chat_kwargs(tools, extra) the (sorted) tools and the template variables Kimi's wrapper passes with them
"""

from __future__ import annotations

import json
from typing import Any

INDENT = "  "
# what the release's encoder raises on a schema it cannot render (its wrapper catches any error and declares JSON)
UNRENDERED = (ValueError, TypeError, KeyError, AttributeError, RecursionError)
# constraints written above a field, by its type
_CONSTRAINTS = {"string": ("maxLength", "minLength", "pattern"), "number": ("maximum", "minimum"),
                "integer": ("maximum", "minimum")}
# a list of types ("type": ["string", "null"]): each as TypeScript
_UNION = {"string": "string", "number": "number", "integer": "number", "boolean": "boolean", "null": "null",
          "object": "{}", "array": "Array<any>"}
# the template variables Kimi's apply_chat_template passes unless the caller sets them
WRAPPER_DEFAULTS = {"thinking": True, "preserve_thinking": False}


def deep_sorted(obj: Any) -> Any:
    """``obj`` with every dict's keys in sorted order, at every depth; lists keep their order."""
    if isinstance(obj, dict):
        return {k: deep_sorted(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list):
        return [deep_sorted(x) for x in obj]
    return obj


def _comment(text: str, indent: str = "") -> str:
    """``text`` as // lines at ``indent``; an empty line stays empty (no //)."""
    return "\n".join(f"{indent}// {line}" if line else "" for line in text.split("\n"))


class _Defs:
    """The ``$defs`` seen so far (a ``$ref`` resolves only to one registered before it), and whether "#" is used."""

    def __init__(self):
        self.schemas: dict[str, Any] = {}
        self.self_ref = False


class _Type:
    """A schema node: its description and constraints (written above the field that has it) and its TypeScript."""

    def __init__(self, schema: dict, constraint_keys: tuple[str, ...] = ()):
        self.description = schema.get("description", "")
        self.constraints = {k: v for k, v in schema.items() if k in constraint_keys}

    def doc(self, indent: str) -> str:
        lines = [_comment(self.description, indent)] if self.description else []
        if self.constraints:
            lines.append(f"{indent}// " + ", ".join(f"{k}: {v}" for k, v in sorted(self.constraints.items())))
        return "".join(line + "\n" for line in lines)

    def ts(self, indent: str = "") -> str:
        raise NotImplementedError


class _Scalar(_Type):
    def __init__(self, kind, schema: dict | None = None):
        super().__init__(schema or {}, _CONSTRAINTS.get(kind, ()))
        self.kind = kind

    def ts(self, indent: str = "") -> str:
        return "number" if self.kind == "integer" else self.kind


class _Field:
    """An object's property: its name, type, whether it may be left out, its default."""

    def __init__(self, name: str, kind: _Type, optional: bool, default: Any):
        self.name, self.kind, self.optional, self.default = name, kind, optional, default

    def ts(self, indent: str) -> str:
        text = self.kind.doc(indent)
        if self.default is not None:
            shown = repr(self.default) if isinstance(self.default, (int, float, bool)) else \
                json.dumps(self.default, ensure_ascii=False)
            text += f"{indent}// Default: {shown}\n"
        return text + f"{indent}{self.name}{'?' if self.optional else ''}: {self.kind.ts(indent)}"


class _Object(_Type):
    def __init__(self, schema: dict, defs: _Defs):
        super().__init__(schema)
        self.fields: list[_Field] = []
        self.extra = None
        if not schema:
            return
        if schema.get("$defs"):
            defs.schemas.update(schema["$defs"].items())
        self.extra = schema.get("additionalProperties")
        if isinstance(self.extra, dict):
            self.extra = _parse(self.extra, defs)
        if "properties" not in schema:
            return
        optional = set(schema["properties"]) - set(schema.get("required", []))
        self.fields = [_Field(k, _parse(p, defs), k in optional, p.get("default") if isinstance(p, dict) else None)
                       for k, p in schema["properties"].items()]

    def ts(self, indent: str = "") -> str:
        ordered = sorted((f for f in self.fields if not f.optional), key=lambda f: f.name) + \
            sorted((f for f in self.fields if f.optional), key=lambda f: f.name)
        parts = [f.ts(indent + INDENT) for f in ordered]
        if self.extra is not None:
            if isinstance(self.extra, bool):
                value = "any" if self.extra else "never"
            elif isinstance(self.extra, _Type):
                value = self.extra.ts(indent + INDENT)
            else:
                raise ValueError(f"additionalProperties: {self.extra!r} is not a schema")
            parts.append(f"{indent}{INDENT}[k: string]: {value}")
        return "{\n" + ",\n".join(parts) + "\n" + indent + "}" if parts else "{}"


class _Array(_Type):
    def __init__(self, schema: dict, defs: _Defs):
        super().__init__(schema, ("minItems", "maxItems"))
        self.item = _parse(schema["items"], defs) if schema.get("items") else _Scalar("any")

    def ts(self, indent: str = "") -> str:
        doc = self.item.doc(indent + INDENT)
        if doc:  # the item's comments inside the brackets, on lines of their own
            return f"Array<\n{doc}{indent}{INDENT}{self.item.ts(indent + INDENT)}\n{indent}>"
        return f"Array<{self.item.ts(indent)}>"


class _Enum(_Type):
    def __init__(self, schema: dict):
        super().__init__(schema)
        self.values = schema["enum"]
        kind = schema.get("type")
        if isinstance(kind, list):  # one type, or one and "null"
            if len(kind) == 2 and "null" not in kind or len(kind) > 2 or not kind:
                raise ValueError(f"enum of types {kind} is not rendered")
            kind = kind[0] if len(kind) == 1 or kind[0] != "null" else kind[1]
        wanted = {"string": str, "number": (int, float), "integer": int, "boolean": bool}.get(kind)
        if wanted is not None and any(v is not None and not isinstance(v, wanted) for v in self.values):
            raise ValueError(f"an enum value is not a {kind}")

    def ts(self, indent: str = "") -> str:
        return " | ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in self.values)


class _AnyOf(_Type):
    def __init__(self, schema: dict, defs: _Defs):
        super().__init__(schema)
        self.options = [_parse(s, defs) for s in schema["anyOf"]]

    def ts(self, indent: str = "") -> str:
        return " | ".join(o.ts(indent) for o in self.options)


class _Union(_Type):
    def __init__(self, schema: dict):
        super().__init__(schema)
        self.names = [_UNION[t] for t in schema["type"]]

    def ts(self, indent: str = "") -> str:
        return " | ".join(self.names)


class _Ref(_Type):
    def __init__(self, schema: dict, defs: _Defs):
        super().__init__(schema)
        ref = schema["$ref"]
        if ref == "#":
            defs.self_ref, self.name = True, "parameters"
        elif ref.startswith("#/$defs/") and isinstance(defs.schemas.get(ref.split("/")[-1]), dict):
            self.name = ref.split("/")[-1]
        else:
            raise ValueError(f"$ref {ref!r} names no $defs schema seen before it")

    def ts(self, indent: str = "") -> str:
        return self.name


def _parse(schema: Any, defs: _Defs) -> _Type:
    """A JSON schema (a dict, or true / false) as a node; the first key of $ref, anyOf, enum, type decides."""
    if isinstance(schema, bool):
        return _Scalar("any" if schema else "null")
    if "$ref" in schema:
        return _Ref(schema, defs)
    if "anyOf" in schema:
        return _AnyOf(schema, defs)
    if "enum" in schema:
        return _Enum(schema)
    if "type" in schema:
        kind = schema["type"]
        if isinstance(kind, list):
            return _Union(schema)
        return _Object(schema, defs) if kind == "object" else _Array(schema, defs) if kind == "array" else \
            _Scalar(kind, schema)
    if schema == {}:
        return _Scalar("any")
    raise ValueError(f"{schema!r} is not a JSON schema the declaration renders")


def _function(function: dict) -> str:
    """One function's declaration: its interfaces, its description, its type."""
    defs = _Defs()
    root = _Object(function.get("parameters") or {}, defs)
    interfaces = []
    if defs.self_ref:  # the root is an interface of its own: its fields in their order, additionalProperties left out
        body = ",\n".join(f.ts(INDENT) for f in root.fields)
        interfaces.append("interface parameters {" + (f"\n{body}\n" if body else "") + "}")
    for name, schema in list(defs.schemas.items()):  # $defs met while rendering these are not declared
        text = _parse(schema, defs).ts()
        about = schema.get("description", "")
        interfaces.append((_comment(about) + "\n" if about else "") + f"interface {name} {text}")
    name = function.get("name", "function")
    signature = f"type {name} = (_: {'parameters' if defs.self_ref else root.ts()}) => any;"
    about = function.get("description")
    return "\n".join(x for x in ("\n".join(interfaces), _comment(about) if about else "", signature) if x)


def typescript_tools(tools: list[dict]) -> str:
    """OpenAI's ``tools`` (``{"type": "function", "function": {...}}`` each; other types skipped) declared as
    Kimi K2.5's wrapper declares them; "" when none is a function. Raises one of ``UNRENDERED`` for a schema the
    release's encoder does not render."""
    functions = [_function(t["function"]) for t in tools if t.get("type") == "function" and t.get("function")]
    if not functions:
        return ""
    return "# Tools\n\n## functions\nnamespace functions {\n" + "\n".join(functions) + "\n}\n"


def chat_kwargs(tools: list[dict] | None, extra: dict | None) -> tuple[list[dict] | None, dict]:
    """What Kimi's ``apply_chat_template`` hands its template: the tools with sorted keys, and ``extra`` (a request's
    chat_template_kwargs) over ``WRAPPER_DEFAULTS``, with ``tools_ts_str`` when there are tools and the encoder
    renders them."""
    tools = deep_sorted(tools)
    kwargs = {**WRAPPER_DEFAULTS, **(extra or {})}
    if tools:
        try:
            kwargs["tools_ts_str"] = typescript_tools(tools)
        except UNRENDERED:
            pass  # the template declares the tools' JSON, as the release's wrapper falls back
    return tools, kwargs
