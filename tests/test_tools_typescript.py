"""Kimi K2.5's TypeScript tool declarations (``flyer.data.tools_typescript``): the text its tokenizer wrapper hands the
chat template as ``tools_ts_str``, and a template that reads it rendered by flyer as transformers renders it with
the variables the wrapper passes (sorted tools, the declaration, ``thinking`` / ``preserve_thinking`` defaults);
schemas the release's encoder refuses fall back to the tools' JSON. The first two expected texts are another
implementation's test vectors (a Rust port of the release's encoder); the others are written out by hand from the
release's rules."""

import json

import pytest
from transformers import PreTrainedTokenizerFast

from flyer.data import tools_typescript
from flyer.data.chat_template import chat_renderer
from flyer.data.tools_typescript import chat_kwargs, deep_sorted, typescript_tools
from tests.hf_models import make_tokenizer


def fn(name: str, parameters: dict | None = None, description: str | None = None) -> dict:
    f = {"name": name, **({"parameters": parameters} if parameters is not None else {}),
         **({"description": description} if description else {})}
    return {"type": "function", "function": f}


def wrapped(*functions: str) -> str:
    return "# Tools\n\n## functions\nnamespace functions {\n" + "\n".join(functions) + "\n}\n"


def test_outside_vectors():
    """A nested object (required first, optional ``?``, integer as number) and an enum, as another port renders."""
    user = {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name"]}}, "required": ["user"]}
    assert typescript_tools([fn("create_user", user, "Create a new user record.")]) == (
        "# Tools\n\n## functions\nnamespace functions {\n// Create a new user record.\ntype create_user = (_: {\n"
        "  user: {\n    name: string,\n    age?: number\n  }\n}) => any;\n}\n")
    status = {"type": "object", "properties": {"status": {"enum": ["active", "paused", "done"]}},
              "required": ["status"]}
    assert typescript_tools([fn("set_status", status)]) == (
        "# Tools\n\n## functions\nnamespace functions {\ntype set_status = (_: {\n"
        '  status: "active" | "paused" | "done"\n}) => any;\n}\n')


SEARCH = {
    "type": "object",
    "properties": {  # "where" first: fields are ordered by name, not as given
        "where": {"anyOf": [{"type": "string"}, {"$ref": "#/$defs/Point"}]},
        "query": {"type": "string", "description": "What to find", "minLength": 1, "maxLength": 200},
        "limit": {"type": "integer", "minimum": 1, "maximum": 50, "default": 10},
        "safe": {"type": "boolean", "default": True},
        "lang": {"type": ["string", "null"], "description": "ISO code"},
        "tags": {"type": "array", "items": {"type": "string", "description": "a tag"}, "maxItems": 5},
        "ids": {"type": "array", "items": {"type": "integer"}},
        "any_list": {"type": "array"},
        "mode": {"enum": ["fast", "deep", None], "type": ["string", "null"], "default": "fast"},
        "meta": {"type": "object", "additionalProperties": {"type": "number"}},
        "strict": {"type": "object", "properties": {"a": {}}, "additionalProperties": False},
    },
    "required": ["query", "where"],
    "$defs": {"Point": {"type": "object", "description": "A place.",
                        "properties": {"x": {"type": "number"}, "y": {"type": "number"}}, "required": ["x", "y"]}},
}
SEARCH_TS = "\n".join([
    "// A place.",
    "interface Point {",
    "  x: number,",
    "  y: number",
    "}",
    "// Search the web.",
    "",
    "// Returns links.",
    "type search = (_: {",
    "  // What to find",
    "  // maxLength: 200, minLength: 1",
    "  query: string,",
    "  where: string | Point,",
    "  any_list?: Array<any>,",
    "  ids?: Array<number>,",
    "  // ISO code",
    "  lang?: string | null,",
    "  // maximum: 50, minimum: 1",
    "  // Default: 10",
    "  limit?: number,",
    "  meta?: {",
    "    [k: string]: number",
    "  },",
    '  // Default: "fast"',
    '  mode?: "fast" | "deep" | None,',
    "  // Default: True",
    "  safe?: boolean,",
    "  strict?: {",
    "    a?: any,",
    "    [k: string]: never",
    "  },",
    "  // maxItems: 5",
    "  tags?: Array<",
    "    // a tag",
    "    string",
    "  >",
    "}) => any;"])
TREE = {"type": "object", "properties": {"value": {"type": "string"}, "children": {"type": "array",
                                                                                      "items": {"$ref": "#"}}},
        "required": ["value"]}


def test_every_rule():
    """Descriptions (a blank line stays blank), constraints by name, defaults (Python's repr for numbers and booleans,
    JSON otherwise), unions, arrays (an item's comments inside the brackets), additionalProperties, $defs as
    interfaces, a function without parameters, other tool types skipped."""
    tools = [fn("search", SEARCH, "Search the web.\n\nReturns links."), {"type": "_plugin", "_plugin": {"x": 1}},
             fn("now")]
    assert typescript_tools(tools) == wrapped(SEARCH_TS, "type now = (_: {}) => any;")
    assert typescript_tools([{"type": "_plugin"}]) == typescript_tools([]) == ""


def test_self_reference():
    """A schema that refers to itself ("#") declares its root as ``interface parameters``, fields in their order
    (after ``deep_sorted``, by name)."""
    assert typescript_tools([fn("tree", TREE)]) == wrapped(
        "interface parameters {\n  value: string,\n  children?: Array<parameters>\n}\n"
        "type tree = (_: parameters) => any;")
    assert typescript_tools(deep_sorted([fn("tree", TREE)])) == wrapped(
        "interface parameters {\n  children?: Array<parameters>,\n  value: string\n}\n"
        "type tree = (_: parameters) => any;")


REFUSED = {
    "a $ref to no $defs": {"type": "object", "properties": {"p": {"$ref": "#/$defs/Nope"}}},
    "an enum value of another type": {"type": "object", "properties": {"p": {"enum": [1, "a"], "type": "string"}}},
    "an enum of two types": {"type": "object", "properties": {"p": {"enum": [1], "type": ["string", "integer"]}}},
    "an unknown type in a list": {"type": "object", "properties": {"p": {"type": ["string", "date"]}}},
    "additionalProperties not a schema": {"type": "object", "additionalProperties": "yes"},
    "a property that is no schema": {"type": "object", "properties": {"p": 5}},
    "a schema with no type": {"type": "object", "properties": {"p": {"description": "x"}}},
}


@pytest.mark.parametrize("name", REFUSED)
def test_refused_schemas_fall_back_to_json(name):
    """What the release's encoder raises on, flyer raises on too, and the wrapper then declares the JSON."""
    tools = [fn("f", REFUSED[name])]
    with pytest.raises(tools_typescript.UNRENDERED):
        typescript_tools(tools)
    sorted_tools, kwargs = chat_kwargs(tools, None)
    assert "tools_ts_str" not in kwargs and sorted_tools == deep_sorted(tools)


def test_chat_kwargs():
    """Sorted tools, the declaration, the wrapper's defaults under the caller's own values; no declaration without
    tools; a caller's ``tools_ts_str`` replaced when there are tools, as the wrapper replaces it."""
    tools = [fn("tree", TREE)]
    got_tools, kwargs = chat_kwargs(tools, {"thinking": False, "tools_ts_str": "mine"})
    assert json.dumps(got_tools) == json.dumps(deep_sorted(tools)) != json.dumps(tools)
    assert kwargs == {"thinking": False, "preserve_thinking": False, "tools_ts_str": typescript_tools(got_tools)}
    assert chat_kwargs(None, None) == (None, {"thinking": True, "preserve_thinking": False})
    assert chat_kwargs([], {"tools_ts_str": "mine"})[1]["tools_ts_str"] == "mine"


# Kimi K2.5 / K2.6's shape: the declaration turn (TypeScript when given, else compact JSON), a default system turn,
# thinking switched off only by thinking=false, history reasoning dropped unless preserve_thinking is set
KIMI_TEMPLATE = (
    "{%- if tools -%}<|im_system|>tool_declare<|im_middle|>{%- if tools_ts_str is defined -%}{{ tools_ts_str }}"
    "{%- else -%}{{ tools | tojson(separators=(',', ':')) }}{%- endif -%}<|im_end|>{%- endif -%}"
    "{%- for m in messages -%}<|im_{{ m.role }}|>{{ m.role }}<|im_middle|>"
    "{%- if m.role == 'assistant' -%}{%- if thinking is defined and thinking is false and preserve_thinking is false"
    " -%}<think></think>{%- else -%}<think>{{ m.reasoning_content or '' }}</think>{%- endif -%}{%- endif -%}"
    "{{ m.content }}<|im_end|>{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>"
    "{%- if thinking is defined and thinking is false -%}<think></think>{%- else -%}<think>{%- endif -%}{%- endif -%}")
MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "reasoning_content": "r"},
            {"role": "user", "content": "more"}]


@pytest.fixture(scope="module")
def kimi_tok(tmp_path_factory) -> PreTrainedTokenizerFast:
    path = tmp_path_factory.mktemp("kimi_tok")
    make_tokenizer(path)
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    tok.chat_template = KIMI_TEMPLATE
    return tok


@pytest.mark.parametrize("tools", [[fn("search", SEARCH, "Search the web.\n\nReturns links.")],
                                   [fn("f", REFUSED["a $ref to no $defs"])], None], ids=["typescript", "json", "none"])
@pytest.mark.parametrize("extra", [None, {"thinking": False}, {"thinking": False, "preserve_thinking": True}],
                         ids=["default", "no-thinking", "preserved"])
def test_rendered_as_the_release_renders(kimi_tok, tools, extra):
    """flyer's render equals transformers' apply_chat_template called as Kimi's wrapper calls it: the tools sorted,
    the declaration written out here by hand (absent where the encoder refuses), thinking=True and
    preserve_thinking=False unless the request sets them."""
    declared = {"tools_ts_str": wrapped(SEARCH_TS)} if tools and tools[0]["function"]["name"] == "search" else {}
    want = kimi_tok.apply_chat_template(MESSAGES, tools=deep_sorted(tools), tokenize=False, add_generation_prompt=True,
                                        **{"thinking": True, "preserve_thinking": False, **(extra or {}), **declared})
    got = chat_renderer(KIMI_TEMPLATE)(MESSAGES, tools, extra=extra)
    assert got == want
    assert ("namespace functions {" in got) == bool(declared) and ('"name":"f"' in got) == (tools is not None
                                                                                             and not declared)


def test_other_templates_untouched():
    """A template that does not read ``tools_ts_str`` sees the tools as given and no wrapper defaults."""
    template = "{{ tools | tojson }}|{{ thinking is defined }}"
    tools = [fn("tree", TREE)]
    assert chat_renderer(template)([], tools) == json.dumps(tools, ensure_ascii=False) + "|False"
