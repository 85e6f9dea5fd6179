"""DSML raw strings (string="true", ``flyer.serve.dsml``) under a string schema's ``format`` and an ``enum`` with
``pattern`` / lengths / ``format``, held as llguidance's JSON path holds the same schema:

- each format llguidance's JSON path enforces (``FORMATS``): the DSML grammar takes the encoder's call with a value
  exactly when llguidance's JSON grammar of the same schema takes the value as JSON, over values on both sides of
  each format's edges (and format with pattern: both);
- an enum with a pattern, format or lengths: only the values they allow can be written (``re.search`` and ``len``
  say which), as the JSON path; an enum left empty is a ``FieldError`` naming the property (400 through the
  openai client), as is a format the DSML grammar cannot enforce ("regex", llguidance's "uri-reference"): never
  ignored.
"""

import json
import re

import openai
import pytest
from test_deepseek_encoding import D, E, _accepts, _call
from test_serve_dsml import ckpt as v32_ckpt  # noqa: F401  (a fixture)
from test_serve_reasoning import ASK
from test_serve_reasoning_grammar import _serve

from flyer.data.deepseek_encoding import encode_v32
from flyer.errors import FieldError
from flyer.infer.cli import ByteTokenizer
from flyer.serve.dsml import DSML_V32, FORMATS
from flyer.serve.grammar import json_grammar
from flyer.serve.tools import tool_grammar

# values on both sides of each format's edges (llguidance's JSON grammar says which are in)
VALUES = {
    "date": ["2024-02-29", "2024-12-31", "2024-13-01", "2024-1-01", "2024-01-32", "2024-00-10", "20240101",
             "2024-01-01T00:00:00Z"],
    "time": ["12:30:00Z", "23:59:60+01:00", "00:00:00.123z", "24:00:00Z", "12:30:00", "12:30Z", "12:30:00+1:00",
             "12:60:00Z", "12:30:00.Z"],
    "date-time": ["2024-01-01T12:30:00Z", "2024-01-01t12:30:00.5-05:30", "2024-01-01 12:30:00Z",
                  "2024-01-01T12:30:00", "2024-01-01T12:30:00+24:00"],
    "duration": ["P1Y2M3DT4H5M6S", "PT0S", "P3W", "P1Y", "P1M", "P2D", "PT1H", "PT5M7S", "P", "PT", "P1Y2W",
                 "P1DT", "P1H", "PT1H30S", "P1D2M", "p1D"],
    "email": ["a@b.co", "a.b@c-d.org", "x+y@sub.example.com", "a..b@c.org", ".a@b.c", "a@-b.com", "a b@c.d",
              "a@[192.168.0.1]", "a@[256.1.1.1]", "a@b", "@b.c", "a@b.c.", "a@b@c.d", "é@b.c",
              "a!#$%&'*+/=?^_`{|}~-b@x.y", "a(b@x.y", 'a"b@x.y', "a,b@x.y", "a.@x.y", "a@x_y.z",
              "a@" + "b" * 70 + ".c"],
    "hostname": ["example.com", "a", "a-b.c", "-a.com", "a-.com", "a" * 63 + ".com", "a" * 64 + ".com", "a..b",
                 "ex_ample.com", "a.b.", "1.2.3.4"],
    "ipv4": ["192.168.0.1", "0.0.0.0", "255.255.255.255", "256.1.1.1", "01.1.1.1", "1.1.1", "1.1.1.1.1", "1.1.1.a"],
    "ipv6": ["::", "::1", "1::", "2001:db8::8a2e:370:7334", "1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7::", "::2:3:4:5:6:7:8",
             "1:2:3:4:5:6::7:8", "1:2:3:4:5:6:7:8:9", "1::2::3", "::ffff:1.2.3.4", "12345::1", "1:2:3:4:5:6:7",
             "ABCD:ef01::", "1:2:3:4:5::6:7", "1:2:3:4:5:6::7", "1:2::4:5:6:7:8", "1::3:4:5:6:7:8:9",
             "::2:3:4:5:6:7:8:9", "1:2:3::5:6:7:8:9"],
    # RFC 3986's URI (llguidance's reading: IP-literals without an embedded IPv4, a fragment allowed, ASCII only)
    "uri": ["http://example.com", "https://u:p@[::1]:8080/a/b?q=1&r=%2F#frag", "mailto:a@b.c", "urn:isbn:0451450523",
            "a:", "file:///etc/hosts", "x://", "x:/", "x:/a//b", "x://a:/p", "http://[v1.x:y]/", "http://1.2.3.4:80",
            "http://[1:2:3:4:5:6:7::]", "http://[::2:3:4:5:6:7:8]", "news:comp.infosystems.www.servers.unix",
            "h+-.x:y?a/b?c", "http://[::ffff:1.2.3.4]/", "http://[1::2::3]/", "http://[1:2:3:4:5:6:7:8:9]",
            "http://[v1.]/", "http://[vg.x]/", "1http://x", "//example.com", "/path", "http://exa mple.com",
            "http://a/%4", "http://a/%zz", "http://a:b:c/", "http://a?b#c#d", "ht_tp://x", "http://ü.de",
            "a:b[c]", "a:b{c}", "a:b\\c", "a:b|c", "a:^", "a:b\"c", "http://a@b@c", "http://a:8x", ":x", ""],
    "uuid": ["123e4567-e89b-12d3-a456-426614174000", "123E4567-E89B-12D3-A456-426614174000",
             "123e4567e89b12d3a456426614174000", "123e4567-e89b-12d3-a456-42661417400g",
             "{123e4567-e89b-12d3-a456-426614174000}"],
    "unknown": ["anything", "", "x\ny"],
}


def _fn(props: dict, name: str = "f") -> dict:
    return {"name": name, "parameters": {"type": "object", "properties": props, "required": list(props)}}


def _block(v) -> str:
    """The calls block the release's encoder writes for f(s=v): a string raw (string="true"), else JSON."""
    text = encode_v32([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [
        _call(0, "f", json.dumps({"s": v}))]}], [{"type": "function", "function": {"name": "f"}}])
    block = text[text.index("\n\n<" + D + "function_calls>"):-len(E)]
    assert ('string="true">' in block) == isinstance(v, str)
    return block


def _agree(schema: dict, values: list[str]) -> list[bool]:
    """Whether the DSML grammar takes each value as the JSON path does; returns what they take."""
    grammar = tool_grammar([_fn({"s": schema})], ByteTokenizer(), fmt=DSML_V32)
    json_path = json_grammar(schema)
    taken = []
    for v in values:
        taken.append(_accepts(json_path, json.dumps(v, ensure_ascii=False)))
        assert _accepts(grammar, _block(v)) == taken[-1], (schema, v)
    return taken


@pytest.mark.parametrize("fmt", sorted(VALUES))
def test_each_format_takes_what_the_json_path_takes(fmt):
    taken = _agree({"type": "string", "format": fmt}, VALUES[fmt])
    assert any(taken) and (fmt == "unknown" or not all(taken)), taken  # both sides of the edges
    assert [re.fullmatch(FORMATS[fmt], v, re.S) is not None for v in VALUES[fmt]] == taken  # the enum filter's reading


def test_format_with_pattern_and_lengths():
    values = ["2024-01-01", "2024-02-01", "2024-01-02", "x-01"]
    assert _agree({"type": "string", "format": "date", "pattern": "-01$"}, values) == [True, True, False, False]
    assert _agree({"type": "string", "format": "hostname", "maxLength": 5}, ["ab.cd", "abc.de", "a_b"]) == \
        [True, False, False]


def test_an_enum_keeps_the_values_its_pattern_format_and_lengths_allow():
    """Only the enum's values that match (``re.search`` for a pattern, ``len`` for lengths, the format) can be
    written, as the JSON path takes them; the others are refused though they are in the enum."""
    enum = ["ab-12", "xy", "ab-1", "2024-01-01", "zz-99"]
    for schema in ({"pattern": "^[a-z]+-[0-9]{2}$"}, {"pattern": "[0-9]"}, {"format": "date"},
                   {"minLength": 3, "maxLength": 5}, {"pattern": "-", "maxLength": 5}):
        schema = {"type": "string", "enum": enum, **schema}
        want = [v for v in enum if (re.search(schema["pattern"], v) if "pattern" in schema else True)
                and schema.get("minLength", 0) <= len(v) <= schema.get("maxLength", len(v))
                and (v == "2024-01-01" if "format" in schema else True)]
        assert 0 < len(want) < len(enum)
        assert [v for v, t in zip(enum, _agree(schema, enum)) if t] == want, schema
    # an enum of strings without a type is raw too
    assert _agree({"enum": ["ab", "cd"], "pattern": "^a"}, ["ab", "cd"]) == [True, False]


@pytest.mark.parametrize("schema,taken,refused", [
    ({"type": ["string", "null"], "maxLength": 3}, ["abc", None], ["abcd", 3]),  # strict mode's optional field
    ({"type": ["string", "integer"], "pattern": "^a"}, ["ab", 7], ["ba", 1.5]),
    ({"enum": ["a", 1, None]}, ["a", 1, None], ["b", 2, "1"]),
    ({"enum": ["ab", "cd", 1], "pattern": "^a"}, ["ab", 1], ["cd"]),
    ({"const": "x"}, ["x"], ["y"]),
    ({"anyOf": [{"type": "string", "maxLength": 2}, {"type": "integer"}, {"enum": ["long one"]}]},
     ["ab", 5, "long one"], ["abc", True]),
    ({}, ["any text", 3, [1], None], []),
    ({"type": "integer"}, [3], ["3"]),
    ({"allOf": [{"type": "integer"}]}, [3], ["3"]),  # composed otherwise: JSON only
])
def test_strings_beside_other_values_are_written_raw(schema, taken, refused):
    """The release's encoder writes every string value raw (string="true"), whatever the schema: where the schema
    admits strings beside other values (a type list, a mixed enum, const, anyOf branches, no type), the grammar takes
    its strings raw and the rest as JSON, and no value outside the schema; the grammar forced such strings into JSON
    (string="false"), a form the model never learnt."""
    grammar = tool_grammar([_fn({"s": schema})], ByteTokenizer(), fmt=DSML_V32)
    assert [_accepts(grammar, _block(v)) for v in taken + refused] == [True] * len(taken) + [False] * len(refused)


def test_a_string_only_schema_takes_no_json_string():
    """A string schema's value is raw only, as the encoder writes it: the JSON form (string="false") is refused."""
    for schema in ({"type": "string"}, {"enum": ["a", "b"]}):
        grammar = tool_grammar([_fn({"s": schema})], ByteTokenizer(), fmt=DSML_V32)
        raw = _block("a")
        assert _accepts(grammar, raw)
        assert not _accepts(grammar, raw.replace('string="true">a<', 'string="false">"a"<'))


def test_an_empty_enum_or_a_format_it_cannot_enforce_names_the_field():
    tok = ByteTokenizer()
    other = _fn({"n": {"type": "integer"}}, "g")
    for sub, why in (({"type": "string", "enum": ["cd", "ef"], "pattern": "^a"}, "pattern"),
                     ({"enum": ["x"], "format": "email"}, "format"), ({"enum": ["abc"], "maxLength": 2}, "maxLength"),
                     ({"type": "string", "format": "uri-reference"}, "'uri-reference'"),
                     ({"type": "string", "format": "regex"}, "'regex'"),
                     ({"enum": ["a"], "format": "regex"}, "'regex'")):
        for name in (None, "f"):  # the field is the property's in the request's tools (index 1), named or not
            with pytest.raises(FieldError) as e:
                tool_grammar([other, _fn({"s": sub})], tok, name, fmt=DSML_V32)
            assert e.value.field == "tools[1].function.parameters.properties.s" and why in e.value.problem, e.value
    # a function not chosen (named tool_choice) is not compiled
    tool_grammar([other, _fn({"s": {"type": "string", "format": "regex"}})], tok, "g", fmt=DSML_V32)


def test_over_http_a_refused_schema_is_a_400_naming_the_field(v32_ckpt):  # noqa: F811
    s = _serve(v32_ckpt)
    try:
        tools = [{"type": "function", "function": _fn({"s": {"type": "string", "enum": ["cd"], "pattern": "^a"}})}]
        with pytest.raises(openai.BadRequestError) as e:
            s.client().chat.completions.create(model="tiny-test", messages=ASK, tools=tools, tool_choice="required",
                                               max_tokens=50)
        assert "tools[0].function.parameters.properties.s" in str(e.value), e.value
    finally:
        s.close()
