"""DeepSeek-V3.2's and V4's chat encodings (``flyer.data.deepseek_encoding``) and their DSML tool calls
(``flyer.serve.dsml``):
prompts written out by hand from the released encoder's format (BOS; system, user, assistant and tool turns; the
tools section; earlier calls in DSML; tool results; thinking vs chat mode, earlier reasoning dropped); a whole
conversation whose prefixes render as its prompts (what the chat data mask relies on); refusals naming the field;
which checkpoints get the encoding; the DSML parser on hand-written texts (string="true" raw, "false" JSON,
malformed blocks served as content) and the grammar (it accepts what the encoder writes for calls matching the
schema, and refuses the others; a raw string's pattern and lengths as the JSON path holds them)."""

import json
import re

import llguidance
import pytest

from flyer.data.chat_template import chat_renderer, read_chat_template
from flyer.data.deepseek_encoding import (ASSISTANT, BOS, ENCODINGS, EOS, RESPONSE_FORMAT, USER, ChatEncoding,
                                         encode_v4, encode_v32, tools_section)
from flyer.errors import FieldError
from flyer.infer.cli import ByteTokenizer
from flyer.serve.dsml import DSML_V4, DSML_V32, parse_dsml_calls
from flyer.serve.grammar import json_grammar, llg_tokenizer
from flyer.serve.tools import DEEPSEEK_V31, TOOL_PARSERS, ToolCall, chosen_format, parse_tool_calls, tool_grammar

B, E = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
U, A = "<｜User｜>", "<｜Assistant｜>"
D = "｜DSML｜"
WEATHER = {"type": "object", "properties": {"location": {"type": "string"}, "days": {"type": "integer"}},
           "required": ["location"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER}}]


def _call(k: int, name: str, arguments: str) -> dict:
    return {"id": f"c{k}", "type": "function", "function": {"name": name, "arguments": arguments}}


TOOL_TURNS = [
    {"role": "user", "content": "Weather in Seoul?"},
    {"role": "assistant", "content": "", "reasoning_content": "need the tool",
     "tool_calls": [_call(1, "get_weather", '{"location": "Seoul", "days": 3}'),
                    _call(2, "get_time", '{"zone": "42", "ids": [1, 2]}')]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "c2", "content": "09:00"},
    {"role": "assistant", "content": "Sunny at 9.", "reasoning_content": "done"}]
# the two calls as DeepSeek-V3.2 writes them, by hand: a string raw ("42" stays text), others JSON
CALLS_TEXT = (f'\n\n<{D}function_calls>\n<{D}invoke name="get_weather">\n'
              f'<{D}parameter name="location" string="true">Seoul</{D}parameter>\n'
              f'<{D}parameter name="days" string="false">3</{D}parameter>\n</{D}invoke>\n'
              f'<{D}invoke name="get_time">\n<{D}parameter name="zone" string="true">42</{D}parameter>\n'
              f'<{D}parameter name="ids" string="false">[1, 2]</{D}parameter>\n</{D}invoke>\n</{D}function_calls>')
RESULTS = "\n\n<function_results>\n<result>sunny</result>\n<result>09:00</result>\n</function_results>\n\n"


def test_plain_system_and_multi_turn_prompts():
    assert encode_v32([{"role": "user", "content": "hi"}]) == f"{B}{U}hi{A}</think>"
    assert encode_v32([{"role": "user", "content": "hi"}], thinking=True) == f"{B}{U}hi{A}<think>"
    assert encode_v32([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]) == \
        f"{B}Be brief.{U}hi{A}</think>"
    turns = [{"role": "user", "content": "hello"},
             {"role": "assistant", "content": "Hi.", "reasoning_content": "a greeting"},
             {"role": "user", "content": "1+1=?"}]
    # the earlier turn's reasoning is dropped, its user turn closes the think block; the last one opens it
    assert encode_v32(turns, thinking=True) == f"{B}{U}hello{A}</think>Hi.{E}{U}1+1=?{A}<think>"
    assert encode_v32(turns) == f"{B}{U}hello{A}</think>Hi.{E}{U}1+1=?{A}</think>"
    # after the last user turn the answer keeps its reasoning (thinking mode), not in chat mode
    done = turns + [{"role": "assistant", "content": "2", "reasoning_content": "add"}]
    assert encode_v32(done, thinking=True) == f"{B}{U}hello{A}</think>Hi.{E}{U}1+1=?{A}<think>add</think>2{E}"
    assert encode_v32(done) == f"{B}{U}hello{A}</think>Hi.{E}{U}1+1=?{A}</think>2{E}"
    dev = [{"role": "developer", "content": "rules"}, *turns]
    assert encode_v32(dev) == f"{B}{U}\n\n# The user's message is: rules{A}</think>" + encode_v32(turns)[len(B):]
    # thinking mode drops a developer turn before the last user turn, as the release's drop_thinking does
    assert encode_v32(dev, thinking=True) == encode_v32(turns, thinking=True)
    # a developer turn's own tools come before its content, as encoding_dsv32.py's render_message writes them
    section = encode_v32([{"role": "user", "content": "x"}], TOOLS)[len(B):-len(f"{U}x{A}</think>")]
    assert encode_v32([{**dev[0], "tools": TOOLS}, *turns]).startswith(
        f"{B}{U}{section}\n\n# The user's message is: rules{A}</think>")


def test_tools_calls_and_results():
    section = encode_v32([{"role": "user", "content": "x"}], TOOLS)[len(B):-len(f"{U}x{A}</think>")]
    assert section.startswith("\n\n## Tools\nYou have access to a set of tools you can use to answer the user's "
                              f'question.\nYou can invoke functions by writing a "<{D}function_calls>" block')
    assert section.endswith(
        'Here are the functions available in JSONSchema format:\n<functions>\n{"name": "get_weather", "description": '
        '"Forecast", "parameters": {"type": "object", "properties": {"location": {"type": "string"}, "days": '
        '{"type": "integer"}}, "required": ["location"]}}\n</functions>\n')
    assert f'<{D}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{D}parameter>' in section
    # a system message takes the section after its content; without one, an empty one is put first
    sys = [{"role": "system", "content": "Be brief."}, *TOOL_TURNS]
    chat = encode_v32(sys, TOOLS)
    assert chat == (f"{B}Be brief.{section}{U}Weather in Seoul?{A}</think>{CALLS_TEXT}{E}{RESULTS}</think>"
                    f"Sunny at 9.{E}")
    assert encode_v32(TOOL_TURNS, TOOLS) == chat.replace("Be brief.", "")
    thinking = encode_v32(sys, TOOLS, thinking=True)
    assert thinking == (f"{B}Be brief.{section}{U}Weather in Seoul?{A}<think>need the tool</think>{CALLS_TEXT}{E}"
                        f"{RESULTS}<think>done</think>Sunny at 9.{E}")
    # a prompt after the results (thinking): the model thinks about them
    assert encode_v32(sys[:-1], TOOLS, thinking=True).endswith(f"</{D}function_calls>{E}{RESULTS}<think>")
    # a later user turn drops the reasoning before it and closes the think blocks
    later = encode_v32([*sys, {"role": "user", "content": "ok"}], TOOLS, thinking=True)
    assert later.endswith(f"{A}</think>{CALLS_TEXT}{E}{RESULTS}</think>Sunny at 9.{E}{U}ok{A}<think>")
    # arguments given as an object render as the same text
    objs = [dict(m) for m in TOOL_TURNS]
    objs[1] = {**objs[1], "tool_calls": [{"function": {**c["function"], "arguments": json.loads(
        c["function"]["arguments"])}} for c in TOOL_TURNS[1]["tool_calls"]]}
    assert encode_v32(objs, TOOLS) == encode_v32(TOOL_TURNS, TOOLS)


def test_prefixes_render_as_the_prompts():
    """Chat mode (the chat data build's): the conversation up to each assistant turn with the generation prompt,
    and through it, are prefixes of the whole; between them exactly the turn's text and its end."""
    render = ChatEncoding("deepseek_v32").render
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
             {"role": "assistant", "content": "Hi.", "reasoning_content": "r"}, *TOOL_TURNS]
    whole = render(turns, TOOLS, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(turns):
        if m["role"] == "assistant":
            head, upto = render(turns[:i], TOOLS, True), render(turns[:i + 1], TOOLS, False)
            assert whole.startswith(head) and whole.startswith(upto)
            spans.append(upto[len(head):])
    assert spans == [f"Hi.{E}", f"{CALLS_TEXT}{E}", f"Sunny at 9.{E}"]
    # thinking mode: one user turn, so the prompt's <think> stays in the whole conversation
    whole = render(TOOL_TURNS, TOOLS, False, {"thinking": True})
    assert whole.startswith(render(TOOL_TURNS[:1], TOOLS, True, {"thinking": True}))
    assert whole.startswith(render(TOOL_TURNS[:4], TOOLS, True, {"thinking": True}))


def test_refusals_name_the_field():
    render = chat_renderer(ENCODINGS["deepseek_v32"])
    for messages, extra, field in (
            ([{"role": "tool", "tool_call_id": "c", "content": "x"}], None, "messages[0]"),
            (TOOL_TURNS[:1] + [{**TOOL_TURNS[1], "tool_calls": TOOL_TURNS[1]["tool_calls"][:1]}] + TOOL_TURNS[2:4],
             None, "messages[3]"),
            ([TOOL_TURNS[0], {"role": "assistant", "tool_calls": [_call(1, "f", "[1]")]}], None,
             "messages[1].tool_calls[0].function.arguments"),
            ([TOOL_TURNS[0], {"role": "assistant", "tool_calls": [_call(1, "f", "{oops")]}], None,
             "messages[1].tool_calls[0].function.arguments"),
            ([TOOL_TURNS[0], {"role": "assistant", "content": "no reasoning"}], {"thinking": True}, "messages[1]"),
            ([{"role": "narrator", "content": "x"}], None, "messages[0].role"),
            (TOOL_TURNS[:1], {"thinking": "yes"}, "chat_template_kwargs")):
        with pytest.raises(FieldError) as e:
            render(messages, None, True, extra)
        assert e.value.field == field, (messages, e.value)
    assert render(TOOL_TURNS[:1], None, True, {"other": 1}) == f"{B}{U}Weather in Seoul?{A}</think>"


@pytest.mark.parametrize("model_type, template, want", [
    ("deepseek_v32", None, ENCODINGS["deepseek_v32"]),
    ("deepseek_v32", "{{ messages }}", "{{ messages }}"),  # V3.2-Exp ships a template: it is kept
    ("deepseek_v3", None, None)])
def test_which_checkpoints_get_the_encoding(tmp_path, model_type, template, want):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template} if template else {}))
    assert read_chat_template(tmp_path) == want
    fmt = chosen_format("auto", read_chat_template(tmp_path))
    assert fmt is (DSML_V32 if want == ENCODINGS["deepseek_v32"] else DEEPSEEK_V31)
    assert TOOL_PARSERS["deepseek_v32"] is DSML_V32


def test_the_dsml_parser_on_hand_written_texts():
    calls = [ToolCall("get_weather", '{"location": "Seoul", "days": 3}'),
             ToolCall("get_time", '{"zone": "42", "ids": [1, 2]}')]  # "42" string="true": a string, not 42
    assert parse_tool_calls(CALLS_TEXT, DSML_V32) == (None, calls)
    assert parse_tool_calls("Let me check." + CALLS_TEXT + "\n", DSML_V32) == ("Let me check.", calls)
    assert parse_tool_calls(CALLS_TEXT, DSML_V32, parallel=False) == (None, calls[:1])
    raw = f'<{D}parameter name="q" string="true">a "b"\n</x> {{</{D}parameter>'
    one = f'\n\n<{D}function_calls>\n<{D}invoke name="f">\n{raw}\n</{D}invoke>\n</{D}function_calls>'
    assert parse_dsml_calls(one) == (None, [("f", json.dumps({"q": 'a "b"\n</x> {'}))])
    empty = f'\n\n<{D}function_calls>\n<{D}invoke name="f">\n\n</{D}invoke>\n</{D}function_calls>'
    assert parse_dsml_calls(empty) == (None, [("f", "{}")])
    for bad in ("plain text", CALLS_TEXT[:-5], CALLS_TEXT[:len(CALLS_TEXT) // 2], CALLS_TEXT + "more",
                CALLS_TEXT.replace("[1, 2]", "[1, 2"),  # string="false" that is no JSON
                CALLS_TEXT.replace("</｜DSML｜invoke>", "</｜DSML｜invok>", 1),  # a wrong closing tag
                CALLS_TEXT.replace('string="false"', 'string="maybe"', 1),
                CALLS_TEXT.replace('name="days"', 'name="location"'),  # a parameter named twice
                CALLS_TEXT.replace(f"<{D}invoke", f"<{D}call"),  # unknown markup
                f"\n\n<{D}function_calls>\n</{D}function_calls>",  # no invoke
                CALLS_TEXT.replace("\n\n", "", 1),  # the block's blank line, as the release's parser reads it
                CALLS_TEXT.replace("function_calls", "tool_calls")):  # V4's block name
        assert parse_tool_calls(bad, DSML_V32) is None, bad
        assert parse_tool_calls(bad, DEEPSEEK_V31) is None


def _accepts(grammar: str, text: str) -> bool:
    m = llguidance.LLMatcher(llg_tokenizer(ByteTokenizer(), 257), grammar)
    return all(m.consume_token(b) for b in text.encode()) and m.is_accepting()


def test_the_grammar_takes_what_the_encoder_writes_for_the_schema():
    schema = {"type": "object", "properties": {"city": {"enum": ["paris", "oslo"]}, "note": {"type": "string"},
                                               "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                               "at": {"type": "array", "items": {"type": "integer"}}},
              "required": ["city", "days"], "additionalProperties": False}
    fns = [{"name": "get_weather", "parameters": schema}, {"name": "anything"},
           {"name": "nothing", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}]
    tools = [{"type": "function", "function": f} for f in fns]

    def written(*calls) -> str:  # as the encoder renders an assistant's calls
        text = encode_v32([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [
            _call(k, n, json.dumps(a)) for k, (n, a) in enumerate(calls)]}], tools)
        return text[text.index("\n\n<" + D + "function_calls>"):-len(E)]

    ok = ("get_weather", {"city": "oslo", "note": 'a "quoted" </x>\nline', "days": 3, "at": [1, 2]})
    tok, grammar = ByteTokenizer(), tool_grammar(fns, ByteTokenizer(), fmt=DSML_V32)
    for calls in ([ok], [("get_weather", {"city": "paris", "days": 7})], [("anything", {"a": "x", "b": [1]})],
                  [("anything", {})], [("nothing", {})], [ok, ("nothing", {}), ok]):
        assert _accepts(grammar, written(*calls)), calls
        assert parse_tool_calls(written(*calls), DSML_V32)[1] == [ToolCall(n, json.dumps(a)) for n, a in calls]
    for calls in ([("get_weather", {"city": "rome", "days": 3})], [("get_weather", {"city": "oslo", "days": 9})],
                  [("get_weather", {"city": "oslo"})], [("get_weather", {"days": 3, "city": "oslo"})],
                  [("get_weather", {"city": "oslo", "days": "3"})], [("nothing", {"a": 1})], [("other", {})],
                  [("get_weather", {"city": "oslo", "days": 3, "extra": 1})]):
        assert not _accepts(grammar, written(*calls)), calls
    assert not _accepts(grammar, written(ok).replace(", 2]", ",2]"))  # JSON as the encoder spaces it
    assert not _accepts(grammar, written(ok).replace('</x>\nline', f"</{D}parameter>"))  # a string ends at its tag
    named = tool_grammar(fns, tok, "nothing", fmt=DSML_V32)
    assert _accepts(named, written(("nothing", {}))) and not _accepts(named, written(ok))
    single = tool_grammar(fns, tok, parallel=False, fmt=DSML_V32)
    assert _accepts(single, written(ok)) and not _accepts(single, written(ok, ok))


def test_raw_strings_keep_their_pattern_and_lengths_as_the_json_path_does():
    """A string parameter (string="true", raw) with ``pattern`` (matched anywhere unless anchored, as JSON schema
    reads it), ``minLength`` / ``maxLength`` (characters): the DSML grammar takes the encoder's call exactly when
    llguidance's JSON grammar takes the same value as JSON (the JSON path) and Python's ``re.search`` and ``len``
    agree; ``^a|b$`` is held whole (a subset of what it allows: nothing it refuses is written)."""
    cases = {"^[a-z]+-[0-9]{2}$": ["ab-12", "abc-12", "a-12", "abcd-12", "AB-12", "ab-123", "ab-1"],
             "[0-9]{3}": ["x123y", "123", "12", "1a2b3"],
             "^https?://[a-z]+$": ["https://x", "http://ab", "ftp://x", "https:/x"],
             "^cost\\$$": ["cost$", "cost", "cost$$"], "cost\\$": ["cost$", "a cost$ b", "cost"]}
    tok = ByteTokenizer()
    for schema, values in [({"pattern": p, "minLength": 5, "maxLength": 6} if p.startswith("^[a-z]") else
                            {"pattern": p}, vs) for p, vs in cases.items()] + \
            [({"minLength": 2, "maxLength": 3}, ["a", "ab", "é</x>"[:2], "ééé", "éééé", "a\nb"])]:
        schema = {"type": "string", **schema}
        grammar = tool_grammar([{"name": "f", "parameters": {"type": "object", "properties": {"s": schema},
                                                             "required": ["s"]}}], tok, fmt=DSML_V32)
        json_path = json_grammar(schema)
        for v in values:
            text = encode_v32([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [
                _call(0, "f", json.dumps({"s": v}))]}], [{"type": "function", "function": {"name": "f"}}])
            block = text[text.index("\n\n<" + D + "function_calls>"):-len(E)]
            assert 'string="true">' in block
            valid = (re.search(schema["pattern"], v) is not None if "pattern" in schema else True) and \
                schema.get("minLength", 0) <= len(v) <= schema.get("maxLength", len(v))
            as_json = json.dumps(v, ensure_ascii=False)
            assert _accepts(grammar, block) == _accepts(json_path, as_json) == valid, (schema, v)
    loose = tool_grammar([{"name": "f", "parameters": {"type": "object", "properties": {
        "s": {"type": "string", "pattern": "^a|b$"}}}}], tok, fmt=DSML_V32)
    for v, taken in (("a", True), ("b", True), ("ax", False), ("xb", False), ("xx", False)):
        block = f'\n\n<{D}function_calls>\n<{D}invoke name="f">\n<{D}parameter name="s" string="true">{v}' \
                f'</{D}parameter>\n</{D}invoke>\n</{D}function_calls>'
        assert _accepts(loose, block) == taken and (not taken or re.search("^a|b$", v)), v


# ---- DeepSeek-V4 ----------------------------------------------------------------------------------------------

V4_CALLS = CALLS_TEXT.replace("function_calls", "tool_calls")


def test_v4_prompts():
    turns = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi.", "reasoning_content": "r"},
             {"role": "user", "content": "1+1=?"}]
    assert encode_v4(turns, thinking=True) == f"{B}{U}hello{A}</think>Hi.{E}{U}1+1=?{A}<think>"
    assert encode_v4(turns) == f"{B}{U}hello{A}</think>Hi.{E}{U}1+1=?{A}</think>"
    high = encode_v4(turns, thinking=True, reasoning_effort="high")
    assert high.startswith(f"{B}Reasoning Effort: Absolute maximum with no shortcuts permitted.\nYou MUST be very ")
    assert high.endswith("no assumption is left unchecked.\n\n" + encode_v4(turns, thinking=True)[len(B):])
    assert encode_v4(turns, reasoning_effort="max") == encode_v4(turns)  # chat mode: no effort prompt
    assert encode_v4(turns, thinking=True, reasoning_effort="max").startswith(
        f"{B}Reasoning Effort: Beyond maximum — exhaustive, relentless, and uncompromising.\n")
    # consecutive user turns are one, their texts a blank line apart; the header only before an answer
    assert encode_v4([{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                      {"role": "user", "content": "b"}]) == f"{B}S{U}a\n\nb{A}</think>"
    assert encode_v4([{"role": "user", "content": "a"}, {"role": "developer", "content": "d"},
                      {"role": "user", "content": "b"}]) == f"{B}{U}a{U}d{U}b{A}</think>"


def test_v4_tools_calls_and_results():
    # the results come back out of order: the prompt lists them in the calls' order, in one user turn
    turns = [*TOOL_TURNS[:2], TOOL_TURNS[3], TOOL_TURNS[2], TOOL_TURNS[4]]
    text = encode_v4(turns, TOOLS)
    section = text[len(B):text.index(U)]
    assert section.startswith("\n\n## Tools\n\nYou have access to a set of tools to help answer the user's question. "
                              f'You can invoke tools by writing a "<{D}tool_calls>" block like the following:\n\n')
    assert section.endswith('### Available Tool Schemas\n\n{"name": "get_weather", "description": "Forecast", '
                            '"parameters": {"type": "object", "properties": {"location": {"type": "string"}, '
                            '"days": {"type": "integer"}}, "required": ["location"]}}\n\nYou MUST strictly follow '
                            'the above defined tool name and parameter schemas to invoke tool calls.\n')
    results = f"{U}<tool_result>sunny</tool_result>\n\n<tool_result>09:00</tool_result>{A}"
    assert text == f"{B}{section}{U}Weather in Seoul?{A}</think>{V4_CALLS}{E}{results}</think>Sunny at 9.{E}"
    # thinking with tools: nothing is dropped, every turn's reasoning kept
    later = [*turns, {"role": "user", "content": "ok"}]
    assert encode_v4(later, TOOLS, thinking=True) == (
        f"{B}{section}{U}Weather in Seoul?{A}<think>need the tool</think>{V4_CALLS}{E}{results}<think>done</think>"
        f"Sunny at 9.{E}{U}ok{A}<think>")
    with pytest.raises(FieldError) as e:
        encode_v4([TOOL_TURNS[0], TOOL_TURNS[2]])
    assert e.value.field == "messages[1]"
    # the whole conversation's prefixes are its prompts, in chat mode and in thinking mode with tools
    render = ENCODINGS["deepseek_v4"].render
    for extra in (None, {"thinking": True}):
        whole = render(later, TOOLS, False, extra)
        for i, m in enumerate(later):
            if m["role"] == "assistant":
                assert whole.startswith(render(later[:i], TOOLS, True, extra))
                assert whole.startswith(render(later[:i + 1], TOOLS, False, extra))
    with pytest.raises(FieldError) as e:
        render(turns, None, True, {"reasoning_effort": "extreme"})
    assert e.value.field == "chat_template_kwargs"


def test_v4_what_the_release_refuses_and_takes():
    # encoding_dsv4.py's render_message asserts a developer turn's content; its drop (thinking, no tools) runs first,
    # so a developer turn it drops is never checked
    for content in ("", None):
        with pytest.raises(FieldError) as e:
            encode_v4([{"role": "user", "content": "a"}, {"role": "developer", "content": content}])
        assert e.value.field == "messages[1].content"
    assert encode_v4([{"role": "developer", "content": ""}, {"role": "user", "content": "b"}], thinking=True) == \
        f"{B}{U}b{A}<think>"
    # a developer turn's own tools and response_format follow its content; tools keep every turn's <think>
    fmt = {"type": "json_object"}
    dev = [{"role": "developer", "content": "d", "tools": TOOLS, "response_format": fmt}]
    body = f"{U}d\n\n{tools_section(TOOLS, v4=True)}\n\n{RESPONSE_FORMAT}{json.dumps(fmt)}{A}"
    assert encode_v4(dev) == f"{B}{body}</think>"
    assert encode_v4([*dev, {"role": "assistant", "content": "x"}, {"role": "user", "content": "u"}],
                     thinking=True) == f"{B}{body}<think></think>x{E}{U}u{A}<think>"
    # unlike V3.2's, V4's takes an answer after the last user turn with neither reasoning nor calls (thinking mode)
    assert encode_v4([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], thinking=True) == \
        f"{B}{U}a{A}<think></think>b{E}"


def test_v4_checkpoint_and_calls(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v4"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert read_chat_template(tmp_path) == ENCODINGS["deepseek_v4"]
    assert chosen_format("auto", ENCODINGS["deepseek_v4"]) is DSML_V4 is TOOL_PARSERS["deepseek_v4"]
    calls = parse_tool_calls(V4_CALLS, DSML_V4)[1]
    assert calls == parse_tool_calls(CALLS_TEXT, DSML_V32)[1] and len(calls) == 2
    assert parse_tool_calls(CALLS_TEXT, DSML_V4) is None and parse_tool_calls(V4_CALLS, DSML_V32) is None
    written = encode_v4([TOOL_TURNS[0], {**TOOL_TURNS[1], "tool_calls": TOOL_TURNS[1]["tool_calls"][:1]}])
    grammar = tool_grammar([TOOLS[0]["function"]], ByteTokenizer(), fmt=DSML_V4)
    assert _accepts(grammar, written[written.index("\n\n<"):-len(E)])


def test_v32_thinking_a_developer_turn_last_is_the_turn_answered():
    """Thinking mode counts a developer turn as a user turn: the last one is the turn answered (kept, and the
    assistant opens thinking after it), as the released encoder's rule."""
    b, u, a, e = BOS, USER, ASSISTANT, EOS
    dev = {"role": "developer", "content": "rules"}
    assert encode_v32([dev], thinking=True) == f"{b}{u}\n\n# The user's message is: rules{a}<think>"
    turns = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi.", "reasoning_content": "r"},
             dev]
    assert encode_v32(turns, thinking=True) == \
        f"{b}{u}hello{a}</think>Hi.{e}{u}\n\n# The user's message is: rules{a}<think>"
