"""DSML edges a mutation sweep of ``flyer.serve.dsml`` found unpinned: what the parser refuses (text after the
block, a parameter named twice), a named ``tool_choice`` writing one invoke even with parallel calls on (the
release's encoder writes the blocks), and string parameters' ``pattern`` escapes and lengths, where llguidance's
JSON grammar of the same schema is the oracle (``_agree``)."""

import json
import re

import pytest
from test_deepseek_encoding import D, E, _accepts, _call
from test_serve_dsml_strings import _agree

from flyer.data.deepseek_encoding import encode_v32
from flyer.infer.cli import ByteTokenizer
from flyer.serve.dsml import DSML, DSML_V32, MAX_ANY_PARAMS, _enum_values, parse_dsml_calls
from flyer.serve.tools import tool_grammar


def _invoke(name: str, value) -> str:
    return (f'<{DSML}invoke name="{name}">\n<{DSML}parameter name="a" string="true">{value}</{DSML}parameter>\n'
            f'</{DSML}invoke>\n')


def test_text_after_the_block_or_a_parameter_named_twice_is_no_call():
    block = DSML_V32.calls_begin + "\n" + _invoke("f", 1) + _invoke("g", 2) + DSML_V32.calls_end
    assert parse_dsml_calls("hi" + block) == ("hi", [("f", '{"a": "1"}'), ("g", '{"a": "2"}')])
    assert parse_dsml_calls("hi" + block, parallel=False) == ("hi", [("f", '{"a": "1"}')])
    assert parse_dsml_calls("hi" + block + " more") is None
    twice = _invoke("f", 1).replace(f"</{DSML}invoke>", f'<{DSML}parameter name="a" string="true">3</{DSML}parameter>'
                                                        f'\n</{DSML}invoke>')
    assert parse_dsml_calls(DSML_V32.calls_begin + "\n" + twice + DSML_V32.calls_end) is None


def test_a_named_tool_choice_is_one_invoke_even_with_parallel_calls():
    tools = [{"name": "f", "parameters": {"type": "object", "properties": {"s": {"type": "string"}},
                                          "required": ["s"]}}]
    text = encode_v32([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [
        _call(0, "f", json.dumps({"s": "a"})), _call(1, "f", json.dumps({"s": "b"}))]}],
        [{"type": "function", "function": tools[0]}])
    two = text[text.index("\n\n<" + D + "function_calls>"):-len(E)]
    assert two.count(f"<{DSML}invoke ") == 2
    assert _accepts(tool_grammar(tools, ByteTokenizer(), None, True, DSML_V32), two)
    assert not _accepts(tool_grammar(tools, ByteTokenizer(), "f", True, DSML_V32), two)


@pytest.mark.parametrize("pattern, values", [
    (r"^a\$", ["a$", "a$b", "ba$", "a"]),  # an escaped "$" is a character, not the anchor
    (r"^a\\$", ["a\\", "a\\b", "a"]),  # an escaped backslash, then the anchor
    (r"a\\/b", ["a\\/b", "xa\\/by", "a/b"]),  # the "/" after an escaped backslash is bare: lark needs it escaped
    (r"a\/b", ["a/b", "xa/by", "ab"]),
])
def test_a_patterns_escapes_read_as_the_json_grammar_reads_them(pattern, values):
    assert _agree({"type": "string", "pattern": pattern}, values) == [re.search(pattern, v) is not None
                                                                      for v in values]


def test_min_length_alone_bounds_a_raw_string_and_is_inclusive():
    assert _agree({"type": "string", "minLength": 3}, ["ab", "abc", "abcd"]) == [False, True, True]
    assert _enum_values({"minLength": 2}, ["a", "ab", "abc"], "f") == ["ab", "abc"]


def _encoded_block(tool: dict, arguments: list[dict]) -> str:
    """The calls block the release's encoder writes for calls of ``tool`` with ``arguments``."""
    text = encode_v32([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [
        _call(k, tool["name"], json.dumps(a)) for k, a in enumerate(arguments)]}],
        [{"type": "function", "function": tool}])
    return text[text.index("\n\n<" + D + "function_calls>"):-len(E)]


@pytest.mark.parametrize("schema", [{"type": "object"}, None])  # None: OpenAI's "no parameters"
def test_a_schema_without_properties_takes_up_to_sixteen_named_parameters(schema):
    tool = {"name": "f", **({} if schema is None else {"parameters": schema})}
    grammar = tool_grammar([tool], ByteTokenizer(), None, True, DSML_V32)
    assert MAX_ANY_PARAMS == 16
    assert _accepts(grammar, _encoded_block(tool, [{}]))
    assert _accepts(grammar, _encoded_block(tool, [{"city": "Seoul", "days": 3}]))
    assert _accepts(grammar, _encoded_block(tool, [{f"k{i}": i for i in range(16)}]))
    assert not _accepts(grammar, _encoded_block(tool, [{f"k{i}": i for i in range(17)}]))
    closed = {**tool, "parameters": {"type": "object", "additionalProperties": False}}
    assert not _accepts(tool_grammar([closed], ByteTokenizer(), None, True, DSML_V32), _encoded_block(tool, [{"k": 1}]))


def test_required_names_outside_the_properties_leave_every_property_optional():
    tool = {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string"}},
                                        "required": ["b"]}}
    grammar = tool_grammar([tool], ByteTokenizer(), None, True, DSML_V32)
    assert _accepts(grammar, _encoded_block(tool, [{}]))  # the encoder's empty line
    assert _accepts(grammar, _encoded_block(tool, [{"a": "x"}]))


def test_a_json_parameter_is_written_with_the_encoders_separators():
    tool = {"name": "f", "parameters": {"type": "object", "properties": {
        "xs": {"type": "array", "items": {"type": "integer"}},
        "o": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}},
        "required": ["xs", "o"]}}
    grammar = tool_grammar([tool], ByteTokenizer(), None, True, DSML_V32)
    block = _encoded_block(tool, [{"xs": [1, 2, 3], "o": {"a": 1, "b": 2}}])
    assert "[1, 2, 3]" in block and '{"a": 1, "b": 2}' in block  # Python's json.dumps, as the release's encoder
    assert _accepts(grammar, block)


def _block(*invokes: dict[str, int]) -> str:
    """A DSML block of one invoke of ``f`` per dict, its parameters written as JSON values."""
    def invoke(params):
        lines = "".join(f'<{DSML}parameter name="{k}" string="false">{v}</{DSML}parameter>\n'
                        for k, v in params.items())
        return f'<{DSML}invoke name="f">\n{lines}</{DSML}invoke>\n'
    return DSML_V32.calls_begin + "\n" + "".join(map(invoke, invokes)) + DSML_V32.calls_end


def test_required_parameters_are_written_optional_ones_may_be_left_out_and_a_block_calls_once_at_least():
    """Under "required" the grammar writes every required parameter, may leave the optional ones out, and holds at
    least one invoke: an empty block is no call (``parse_dsml_calls`` reads none)."""
    tools = [{"name": "f", "parameters": {"type": "object", "required": ["a"], "properties": {
        "a": {"type": "integer"}, "b": {"type": "integer"}}}}]
    grammar = tool_grammar(tools, ByteTokenizer(), None, True, DSML_V32)
    assert _accepts(grammar, _block({"a": 1})) and _accepts(grammar, _block({"a": 1, "b": 2}))
    assert _accepts(grammar, _block({"a": 1}, {"a": 2}))
    assert not _accepts(grammar, _block({"b": 2}))
    assert not _accepts(grammar, _block())
