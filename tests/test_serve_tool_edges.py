"""Edges of the tool-call formats a mutation sweep of ``flyer.serve.tools``, ``dsml``, ``tools_kimi`` and ``choice``
found unpinned (each assertion fails on the mutant it names), and one defect it found: a DSML parameter whose name
holds a double quote was written by the "required" grammar but could not be read back (the forced call served as
content); such a schema is now a 400 naming the property.

- the parsers: a V3.1 / V3 call whose name holds a marker, an empty DSML invoke name, a Kimi id without its index
  are malformed (content); V3's fence with spaces around it, whitespace before a DSML JSON value's close tag, and a
  raw string's own whitespace are read as written (vLLM's and DeepSeek's encoders keep raw strings verbatim);
- the format a template writes: of named templates the "tool_use" one (transformers picks it when tools are given);
  a V3.1 template that mentions a json fence after its calls is V3.1's;
- the grammars: a tokenizer without the markers writes them as text; a function without ``parameters`` takes an
  object only (OpenAI: no parameters); DSML's ``minLength`` without ``maxLength``, an enum value exactly
  ``minLength`` long, an escaped slash in a ``pattern``, the encoder's empty line for an all-optional function, and a
  named ``tool_choice`` writing one call though ``parallel_tool_calls`` is on; an oversize schema names ``tools``;
- ``held_back`` holds back only a tail that can start the marker.
"""

import json

import llguidance
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from flyer.data.deepseek_encoding import dsml_calls
from flyer.errors import FieldError
from flyer.infer.cli import ByteTokenizer
from flyer.interop.hf_tokenizer import TextTokenizer
from flyer.serve.choice import held_back
from flyer.serve.dsml import DSML, DSML_V32, PARAM_END, parse_dsml_calls
from flyer.serve.grammar import _limits, llg_tokenizer
from flyer.serve.tools import DEEPSEEK_V3 as F3, DEEPSEEK_V31 as F31, marker_ids, parse_tool_calls, tool_format, \
    tool_grammar
from flyer.serve.tools_kimi import KIMI_K2 as K

V31_CALLS = ("{% for m in messages %}{% if m['tool_calls'] %}" + F31.calls_begin + "{% for c in m['tool_calls'] %}"
             + F31.call_begin + "{{ c['function']['name'] }}" + F31.sep + "{{ c['function']['arguments'] }}"
             + F31.call_end + "{% endfor %}" + F31.calls_end + "{% endif %}{% endfor %}")
V3_CALLS = ("{% for c in m['tool_calls'] %}" + F3.call_begin + "function" + F3.sep + "{{ c['function']['name'] }}"
            "\n```json\n{{ c['function']['arguments'] }}\n```" + F3.call_end + "{% endfor %}")


def _accepts(grammar: str, text: str) -> bool:
    """Whether ``grammar`` takes ``text`` whole, written in byte tokens."""
    m = llguidance.LLMatcher(llg_tokenizer(ByteTokenizer(), 1024), grammar, log_level=0, limits=_limits())
    ids = list(text.encode())
    return m.try_consume_tokens(ids) == len(ids) and m.is_accepting()


def _dsml(*params: tuple[str, str, bool], name: str = "f") -> str:
    """A DSML block calling ``name`` with (key, value text, raw) parameters, as the encoder lays it out."""
    body = "".join(f'<{DSML}parameter name="{k}" string="{"true" if raw else "false"}">{v}{PARAM_END}\n'
                   for k, v, raw in params)
    return f'{DSML_V32.calls_begin}\n<{DSML}invoke name="{name}">\n{body or chr(10)}</{DSML}invoke>\n' \
           f'{DSML_V32.calls_end}'


def _fn(props: dict, required: list | None = None, name: str = "f") -> dict:
    return {"name": name, "parameters": {"type": "object", "properties": props,
                                         "required": list(props) if required is None else required}}


def test_malformed_heads_are_content():
    for fmt in (F31, F3):  # a call's end before its sep: one "name" holding markers
        head = fmt.call_begin + ("function" + fmt.sep if fmt is F3 else "")
        text = (fmt.calls_begin + head + "get_weather" + fmt.call_end + fmt.render([("set_light", "{}")])
                [len(fmt.calls_begin):])
        assert parse_tool_calls(text, fmt) is None, fmt.name
    assert parse_dsml_calls("Hm." + _dsml(name="")) is None  # an empty invoke name
    one = K.render([("get_weather", '{"city":"paris"}')])
    assert parse_tool_calls(one, K) is not None and parse_tool_calls(one.replace(":0", ":"), K) is None


def test_written_values_are_read_as_written():
    for fence in ("f ```json {} ```", "f\n```json {}\n```"):
        text = F3.calls_begin + F3.call_begin + "function" + F3.sep + fence + F3.call_end + F3.calls_end
        assert parse_tool_calls(text, F3) == (None, [parse_tool_calls(F3.render([("f", "{}")]), F3)[1][0]]), fence
    assert parse_dsml_calls(_dsml(("n", "3\n", False))) == (None, [("f", '{"n": 3}')])
    code = "    return 1\n"
    assert parse_dsml_calls(_dsml(("code", code, True))) == (None, [("f", json.dumps({"code": code}))])


def test_the_format_is_read_off_the_template_that_renders_tools():
    plain = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert tool_format({"default": plain, "tool_use": V3_CALLS}) is F3
    assert tool_format({"default": plain, "tool_use": K.calls_begin + "{{ x }}" + K.calls_end}) is K
    assert tool_format(V31_CALLS + "{% if response_format %}Answer in a ```json block.{% endif %}") is F31


def test_a_tokenizer_without_the_markers_writes_them_as_text():
    vocab = {chr(c): c - 32 for c in range(32, 127)}
    raw = Tokenizer(models.WordLevel({**vocab, "[UNK]": len(vocab)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = TextTokenizer(raw)
    assert marker_ids(tok, F31) == {}
    fn = [_fn({"a": {"type": "integer"}})]  # matched here byte by byte: the markers are text in the grammar
    assert _accepts(tool_grammar(fn, tok, None, True, F31), F31.render([("f", '{"a":1}')]))


def test_a_function_without_parameters_takes_an_object():
    grammar = tool_grammar([{"name": "ping"}], ByteTokenizer())
    assert [_accepts(grammar, F31.render([("ping", a)])) for a in ("{}", "1", "[]")] == [True, False, False]


def test_dsml_string_lengths_patterns_and_optional_parameters():
    def accepts(tools, text, name=None, parallel=True):
        return _accepts(tool_grammar(tools, ByteTokenizer(), name, parallel, DSML_V32), text)

    short = [_fn({"s": {"type": "string", "minLength": 3}})]  # no maxLength: enforced all the same
    assert [accepts(short, _dsml(("s", v, True))) for v in ("", "ab", "abc")] == [False, False, True]
    enum = [_fn({"s": {"type": "string", "enum": ["ab", "abc", "a"], "minLength": 2}})]
    assert [accepts(enum, _dsml(("s", v, True))) for v in ("ab", "abc", "a")] == [True, True, False]
    slash = [_fn({"s": {"type": "string", "pattern": r"^a\\/b$"}})]
    assert accepts(slash, _dsml(("s", "a\\/b", True))) and not accepts(slash, _dsml(("s", "a/b", True)))
    optional = [_fn({"a": {"type": "integer"}}, required=[])]
    assert accepts(optional, "\n\n" + dsml_calls([("f", {})])) and accepts(optional, "\n\n" + dsml_calls(
        [("f", {"a": 1})]))
    two = "\n\n" + dsml_calls([("f", {"a": 1}), ("f", {"a": 2})])
    required = [_fn({"a": {"type": "integer"}}), _fn({}, name="g")]
    assert accepts(required, two) and not accepts(required, two, name="f")  # named: one call, parallel or not


@pytest.mark.parametrize("key", ['a"b', "a\nb", ""])
def test_a_dsml_parameter_name_that_cannot_be_read_back_names_the_property(key):
    text = _dsml((key, "1", False))
    assert parse_dsml_calls(text) is None  # what the grammar would have let the model write
    with pytest.raises(FieldError) as e:
        tool_grammar([_fn({"x": {"type": "integer"}}), _fn({key: {"type": "integer"}})], ByteTokenizer(), None,
                     True, DSML_V32)
    assert e.value.field == f"tools[1].function.parameters.properties.{key}" and "double quote" in e.value.problem


def test_an_oversize_schema_names_tools():
    big = {"type": "object", "properties": {f"p{k}": {"type": "string", "description": "x" * 100}
                                            for k in range(2000)}}
    with pytest.raises(FieldError) as e:
        tool_grammar([{"name": "f", "parameters": big}], ByteTokenizer())
    assert e.value.field == "tools"


def test_held_back_keeps_only_a_tail_that_can_start_the_marker():
    assert held_back("a < b and c < d", K.calls_begin) == 0
    assert held_back("a < b and c <|tool", K.calls_begin) == len("<|tool")


def test_a_functions_own_x_guidance_overrides_the_compact_default():
    """A function whose parameters ask for flexible whitespace (their "x-guidance", as a response_format's) gets
    it; the others stay compact."""
    params = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    flexible = [{"name": "f", "parameters": {**params, "x-guidance": {"whitespace_flexible": True}}}]
    compact = [{"name": "f", "parameters": params}]
    spaced, tight = F3.render([("f", '{"a": 1}')]), F3.render([("f", '{"a":1}')])
    assert _accepts(tool_grammar(flexible, ByteTokenizer(), "f", fmt=F3), spaced)
    assert not _accepts(tool_grammar(compact, ByteTokenizer(), "f", fmt=F3), spaced)
    assert _accepts(tool_grammar(compact, ByteTokenizer(), "f", fmt=F3), tight)
