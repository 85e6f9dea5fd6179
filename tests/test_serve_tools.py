"""Tool calling in ``flyer serve`` (``tools``, ``tool_choice``, ``tool_calls``; ``flyer.serve.tools``) in
DeepSeek-V3.1's format: the parser on hand-written texts; a tiny random DeepSeek-V3 checkpoint whose tokenizer
holds the tool markers as added special tokens and whose (test-written) chat template renders tools and tool
messages: the prompt equals transformers' ``apply_chat_template(..., tools=...)``; with tool_choice "required" or
a named function the random model's calls always parse and their arguments validate against the tool's bounded
schema (without the grammar they do not), streamed or not; a follow-up conversation is served; bad tool
definitions and choices answer 400 naming the field; "none" parses nothing."""

import json

import httpx
import pytest
import torch
from hf_models import build
from served import EngineServer, client, serving
from test_serve_api import _error, _Running
from test_serve_structured import _valid
from tokenizers import AddedToken, Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from flyer.config import preset
from flyer.infer.cli import ByteTokenizer
from flyer.interop.hf import load_hf
from flyer.interop.hf_tokenizer import load_tokenizer
from flyer.model.transformer import Transformer
from flyer.serve.api import Api
from flyer.data.chat_template import read_chat_template
from flyer.serve.engine import Engine, EngineConfig
from flyer.serve.request import Limits
from flyer.serve.schema import ChatBody
from flyer.serve.tools import (DEEPSEEK_V31 as F, MAX_TOOL_CALLS, TOOL_PARSERS, ToolCall, content_end, marked_text,
                               parse_tool_calls)

MARKERS = [*F.markers, "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"]
# a minimal template of this test's own in DeepSeek-V3.1's shape: tools listed in the system part, an assistant's
# calls written in the calls format, a tool's answer between the output markers
TEMPLATE = (
    "{{ bos_token }}{% if tools %}Tools:\n{% for t in tools %}{{ t['function']['name'] }}: "
    "{{ t['function']['description'] or '' }} {{ t['function']['parameters'] | tojson }}\n{% endfor %}{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<A>{{ m['content'] or '' }}{% if m['tool_calls'] %}"
    + F.calls_begin + "{% for c in m['tool_calls'] %}" + F.call_begin + "{{ c['function']['name'] }}" + F.sep
    + "{{ c['function']['arguments'] }}" + F.call_end + "{% endfor %}" + F.calls_end + "{% endif %}{{ eos_token }}"
    "{% elif m['role'] == 'tool' %}" + MARKERS[5] + "{{ m['content'] }}" + MARKERS[6] +
    "{% else %}<{{ m['role'] }}>{{ m['content'] }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<A>{% endif %}")

WEATHER = {"type": "object", "properties": {"city": {"enum": ["paris", "oslo"]}, "celsius": {"type": "boolean"},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "celsius", "days"], "additionalProperties": False}
LIGHT = {"type": "object", "properties": {"on": {"type": "boolean"}, "level": {"type": "integer", "minimum": 0,
                                                                                "maximum": 9}},
         "required": ["on", "level"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "forecast", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "set_light", "parameters": LIGHT}}]
SCHEMA = {"get_weather": WEATHER, "set_light": LIGHT}
ASK = [{"role": "user", "content": "hello world"}]
FOLLOW_UP = ASK + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city":"oslo","celsius":true,"days":2}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]


# ---- the parser ---------------------------------------------------------------------------------------------

SPELL_SCHEMA = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"],
                "additionalProperties": False}
FLAG = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}


def grammar_accepts(fmt, text: str, tools: list[dict] | None = None, content: dict | None = None,
                    text_first: bool = False) -> bool:
    """Whether the calls grammar of ``tools`` (default: one function ``f`` of ``SPELL_SCHEMA``) in ``fmt``, written
    by a byte tokenizer (markers as text, as a tokenizer without them writes them), takes ``text`` whole."""
    import llguidance

    from flyer.serve.grammar import _limits, llg_tokenizer
    from flyer.serve.tools import tool_grammar
    tools = tools or [{"name": "f", "parameters": SPELL_SCHEMA}]
    grammar = tool_grammar(tools, ByteTokenizer(), None, True, fmt, content=content, text_first=text_first)
    m = llguidance.LLMatcher(llg_tokenizer(ByteTokenizer(), 1024), grammar, log_level=0, limits=_limits())
    ids = list(text.encode())
    return m.try_consume_tokens(ids) == len(ids) and m.is_accepting()


def test_arguments_whose_strings_spell_markers_parse_in_every_format():
    """A "required" call's grammar lets a JSON string spell any marker in ordinary tokens (the text a marker token
    decodes to), but the parser split the call at the first marker and refused it (V3.1's ``sep``, Kimi's section
    end, DSML's parameter close tag): the required call was served as content. The arguments end where their JSON
    does (vLLM's parsers return these calls too); a marker outside the JSON still ends or breaks the call."""
    from flyer.serve.dsml import DSML_V32, PARAM_END, parse_dsml_calls
    from flyer.serve.tools import DEEPSEEK_V3
    from flyer.serve.tools_kimi import KIMI_K2

    for fmt in (F, DEEPSEEK_V3, KIMI_K2):
        for marker in fmt.markers:
            args = json.dumps({"q": f"a{marker}b"}, ensure_ascii=False, separators=(",", ":"))
            text = fmt.render([("f", args)])
            assert grammar_accepts(fmt, text), (fmt.name, marker)
            (content, [call]) = parse_tool_calls(text, fmt)
            assert (content, call.name, call.arguments) == (None, "f", args), (fmt.name, marker)
        broken = fmt.render([("f", '{"q":"a"}')]).replace('"}', '"' + fmt.sep + "}")  # outside the JSON
        assert parse_tool_calls(broken, fmt) is None, fmt.name
    # DSML: a string parameter is raw text up to its close tag; a JSON one (string="false") ends where its JSON does
    inner = json.dumps({"q": f"x{PARAM_END}y"}, ensure_ascii=False)  # as DSML writes JSON values
    text = _dsml_call(inner)
    assert grammar_accepts(DSML_V32, text, NESTED)
    assert parse_dsml_calls(text, DSML_V32) == (None, [("f", json.dumps({"o": json.loads(inner)}, ensure_ascii=False))])
    assert parse_dsml_calls(text.replace(f"}}{PARAM_END}", f"}}{PARAM_END}{PARAM_END}"), DSML_V32) is None


NESTED = [{"name": "f", "parameters": {"type": "object", "properties": {"o": SPELL_SCHEMA}, "required": ["o"]}}]


def _dsml_call(value: str) -> str:
    """A DSML block calling ``f`` of ``NESTED`` with parameter ``o`` = ``value`` (JSON text)."""
    from flyer.serve.dsml import DSML_V32, PARAM_END
    return (f'{DSML_V32.calls_begin}\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="o" string="false">'
            f'{value}{PARAM_END}\n</｜DSML｜invoke>\n{DSML_V32.calls_end}')


def test_auto_with_a_response_format_is_its_json_or_a_calls_block_in_every_format():
    from flyer.serve.dsml import DSML_V32
    from flyer.serve.tools import DEEPSEEK_V3
    from flyer.serve.tools_kimi import KIMI_K2
    for fmt in (F, DEEPSEEK_V3, KIMI_K2, DSML_V32):
        dsml = fmt is DSML_V32
        block = _dsml_call('{"q": "a"}') if dsml else fmt.render([("f", '{"q":"a"}')])
        for out, ok in ((block, True), ('{"ok":true}', True), ('{"ok":1}', False), ("plain", False),
                        (block + '{"ok":true}', False)):
            assert grammar_accepts(fmt, out, NESTED if dsml else None, content=FLAG) == ok, (fmt.name, out)


def test_auto_with_a_strict_function_is_text_or_text_then_a_valid_calls_block_in_every_format():
    """``strict`` functions under "auto": any text without the begin marker, then at most one block whose calls
    match the schemas (the marker written as text: the text lexeme ends at its first occurrence). No marker in the
    text before the block: the parser reads from the first, so a bare one there (DSML's without its line break)
    served the block's valid calls as content."""
    from flyer.serve.dsml import DSML_V32
    from flyer.serve.tools import DEEPSEEK_V3
    from flyer.serve.tools_kimi import KIMI_K2
    for fmt in (F, DEEPSEEK_V3, KIMI_K2, DSML_V32):
        dsml = fmt is DSML_V32
        block, bad = ((_dsml_call('{"q": "a"}'), _dsml_call('{"q": 1}')) if dsml else
                      (fmt.render([("f", '{"q":"a"}')]), fmt.render([("f", '{"q":1}')])))
        unknown = block.replace('"f"', '"g"') if dsml else fmt.render([("g", '{"q":"a"}')])
        for out, ok in (("plain <text>\n", True), ("", True), (block, True), ("I will call. " + block, True),
                        ("x" + bad, False), (unknown, False), (block + "more", False), (block + block, False),
                        ("x" + fmt.calls_begin + "oops", False), ("x" + fmt.calls_begin + "y" + block, False),
                        ("x" + fmt.calls_begin + bad[len(fmt.calls_begin):].lstrip("\n") + block, False)):
            assert grammar_accepts(fmt, out, NESTED if dsml else None, text_first=True) == ok, (fmt.name, out)


def test_the_parser_on_hand_written_texts():
    one = F.render([("get_weather", '{"city":"paris"}')])
    assert parse_tool_calls(one) == (None, [ToolCall("get_weather", '{"city":"paris"}')])
    two = F.render([("a", "{}"), ("b", '{"x": [1, 2]}')])
    assert parse_tool_calls(two) == (None, [ToolCall("a", "{}"), ToolCall("b", '{"x": [1, 2]}')])
    assert parse_tool_calls("Let me look.\n" + one) == ("Let me look.\n", [ToolCall("get_weather", '{"city":"paris"}')])
    assert parse_tool_calls("  \n" + one + "\n")[0] is None  # blank content is null; whitespace after the block
    spaced = f"{F.calls_begin}\n{F.call_begin} f {F.sep} {{}} {F.call_end}\n{F.calls_end}"
    assert parse_tool_calls(spaced) == (None, [ToolCall("f", "{}")])
    # not a well-formed block: the caller serves the text as content
    for bad in ("plain text", one[:-len(F.calls_end)], one[:len(one) // 2], F.calls_begin + F.calls_end,
                F.render([("f", "[1]")]), F.render([("f", "{oops")]), F.render([("", "{}")]), one + "more",
                F.calls_begin + F.call_begin + "f" + F.call_end + F.calls_end):
        assert parse_tool_calls(bad) is None, bad
    # cut by a length limit: the calls before the cut one (maybe none), its text dropped; a whole block as it is
    from flyer.serve.dsml import DSML_V32, PARAM_END
    from flyer.serve.tools import DEEPSEEK_V3
    from flyer.serve.tools_kimi import KIMI_K2

    dsml = (f'{DSML_V32.calls_begin}\n<｜DSML｜invoke name="a">\n</｜DSML｜invoke>\n<｜DSML｜invoke name="b">\n'
            f'<｜DSML｜parameter name="x" string="false">[1, 2]{PARAM_END}\n</｜DSML｜invoke>\n{DSML_V32.calls_end}')
    for fmt in (F, DEEPSEEK_V3, KIMI_K2, DSML_V32):
        text = "Hm." + (dsml if fmt is DSML_V32 else fmt.render([("a", "{}"), ("b", '{"x": [1, 2]}')]))
        calls = parse_tool_calls(text, fmt)[1]  # Kimi's with the ids written
        assert [(c.name, c.arguments) for c in calls] == [("a", "{}"), ("b", '{"x": [1, 2]}')]
        second, first = text.rindex('"x"'), len("Hm.") + len(fmt.calls_begin) + 2
        for at, kept in ((len(text), 2), (len(text) - 3, 2), (second, 1), (second - 3, 1), (first, 0)):
            assert parse_tool_calls(text[:at], fmt, cut=True) == ("Hm.", calls[:kept]), (fmt.name, at)
            assert parse_tool_calls(text[:at], fmt, parallel=False, cut=True) == ("Hm.", calls[:min(kept, 1)])
            assert (parse_tool_calls(text[:at], fmt) is None) == (at < len(text)), (fmt.name, at)
        assert parse_tool_calls("no block", fmt, cut=True) is None
        # text after a call or a block that ended is no cut: such a block is malformed, content as without the cut
        bad = fmt.render([("a", "{}"), ("f", "{oops}")]) if fmt is not DSML_V32 else \
            dsml.replace("[1, 2]", "[1, 2").replace(PARAM_END, "", 1)
        for after in (text + "\nand now the answer", text + "</think>The answer is", "Hm." + bad + " and so on"):
            assert parse_tool_calls(after, fmt, cut=True) is None, (fmt.name, after)
    # what streams as content: the text before a block, less a tail that may begin one
    for text, n in (("abc", 3), ("abc" + one, 3), ("ab" + F.calls_begin[:4], 2), ("a<b", 3), ("", 0)):
        assert content_end(text) == n, text
    c = ToolCall("f", "{}").openai()
    assert c["id"].startswith("call_") and c["type"] == "function" and c["function"] == {"name": "f", "arguments": "{}"}


# ---- a checkpoint whose tokenizer holds the markers ------------------------------------------------------------

def tool_checkpoint(path, template: str, context: int):
    """A random DeepSeek-V3 directory at ``path`` (context raised to ``context``: the tools' schemas are in the
    prompt) whose tokenizer.json holds ``MARKERS`` as added special tokens and whose tokenizer_config.json holds
    ``template``."""
    build("v3", path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": context}))
    hf = PreTrainedTokenizerFast.from_pretrained(path)
    hf.add_tokens([AddedToken(m, special=True, normalized=False) for m in MARKERS], special_tokens=True)
    hf.chat_template = template
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tool_checkpoint(tmp_path_factory.mktemp("tools") / "v3", TEMPLATE, 1024)


class _Served(EngineServer):
    """``ckpt`` served on a free loopback port (``served.EngineServer``)."""

    def __init__(self, path):
        model, _, self.tok = load_hf(path)
        assert model.cfg.vocab_size > max(self.tok.tok.token_to_id(m) for m in MARKERS)
        super().__init__(Engine(model, EngineConfig(kv_cache_bytes=1 << 24, block_size=16), tokenizer=self.tok),
                         lambda link: Api(link, self.tok, "tiny-test", chat_template=read_chat_template(str(path))))


@pytest.fixture(scope="module")
def served(ckpt):
    s = _Served(ckpt)
    yield s
    s.close()


def test_markers_are_single_tokens_and_decode_kept(ckpt):
    """The markers encode as one id each (added tokens); ``decode`` skips them (special) where ``marked_text``
    writes them out; a tokenizer holding them as plain added tokens decodes the same text."""
    _, _, tok = load_hf(ckpt)
    text = "hi " + F.render([("f", '{"a":1}')])
    ids = tok.encode_ids(text, add_special_tokens=False)
    marker_ids = {tok.tok.token_to_id(m) for m in F.markers}
    assert sum(i in marker_ids for i in ids) == 5 and None not in marker_ids
    assert F.calls_begin not in tok.decode(ids)  # what the content would hold: no markers
    assert marked_text(tok, ids) == text
    assert parse_tool_calls(marked_text(tok, ids)) == ("hi ", [ToolCall("f", '{"a":1}')])
    d = json.loads(tok.tok.to_str())
    for t in d["added_tokens"]:
        t["special"] = t["special"] and t["content"] not in F.markers
    tok.tok = Tokenizer.from_str(json.dumps(d))
    assert tok.decode(ids) == marked_text(tok, ids) == text


def _rendered_by_transformers(ckpt, messages, tools) -> str:
    return AutoTokenizer.from_pretrained(ckpt).apply_chat_template(messages, tools=tools, tokenize=False,
                                                                   add_generation_prompt=True)


def test_the_prompt_with_tools_is_transformers(ckpt, served):
    for messages in (ASK, FOLLOW_UP):
        want = _rendered_by_transformers(ckpt, messages, TOOLS)
        body = ChatBody(model="tiny-test", messages=messages, tools=TOOLS)
        assert served.api.tok.decode(served.api._chat_prompt(body)) == served.tok.decode(
            served.tok.encode_ids(want, add_special_tokens=False))
        assert served.api._chat_prompt(body) == served.tok.encode_ids(want, add_special_tokens=False)
        assert "get_weather: forecast" in want and json.dumps(LIGHT) in want  # the tools are in it
        assert want != _rendered_by_transformers(ckpt, messages, None)
    ids = served.api._chat_prompt(ChatBody(model="tiny-test", messages=FOLLOW_UP, tools=TOOLS))
    assert {served.tok.tok.token_to_id(m) for m in MARKERS} <= set(ids)  # each marker one token


def _check_calls(choice, names: set[str], single: bool = False) -> list[tuple[str, dict]]:
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert calls and len(calls) <= (1 if single else MAX_TOOL_CALLS)
    out = []
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_") and c.function.name in names
        args = json.loads(c.function.arguments)
        assert _valid(args, SCHEMA[c.function.name]), (c.function.name, args)
        out.append((c.function.name, args))
    return out


def _stream_calls(client, **kw) -> tuple[list[tuple[str, dict]], str | None, str]:
    """The calls, finish reason and content of a streamed choice 0, gathered from its deltas."""
    calls, finish, content = {}, None, ""
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for d in ch.delta.tool_calls or []:
                assert d.id.startswith("call_") and d.type == "function"
                calls[d.index] = (d.function.name, json.loads(d.function.arguments))
            finish = ch.finish_reason or finish
    return [calls[k] for k in sorted(calls)], finish, content


def test_required_and_named_calls_parse_and_validate(served):
    c = served.client()
    kw = dict(model="tiny-test", messages=ASK, tools=TOOLS, max_tokens=400)
    names = set(SCHEMA)
    for choice, allowed in (("required", names), *(({"type": "function", "function": {"name": n}}, {n})
                                                   for n in sorted(names))):
        for temperature, n in ((0, 1), (1.0, 3)):
            r = c.chat.completions.create(tool_choice=choice, temperature=temperature, seed=3, n=n, **kw)
            assert len(r.choices) == n
            for ch in r.choices:
                assert ch.message.content is None
                _check_calls(ch, allowed, single=choice != "required")
        # the stream gives the calls the same seeded request gives whole
        whole = _check_calls(c.chat.completions.create(tool_choice=choice, temperature=1.0, seed=7, **kw).choices[0],
                             allowed)
        assert _stream_calls(c, tool_choice=choice, temperature=1.0, seed=7, **kw) == (whole, "tool_calls", "")
        # the SDK's stream helper rebuilds the whole answer: content null (a forced call's first chunk says so, as
        # OpenAI's; its "" had made it ''), and closes each call's arguments with a done event (it never did while
        # the calls and the finish came in one chunk: the helper reads a chunk's finish before its calls)
        with c.chat.completions.stream(tool_choice=choice, temperature=1.0, seed=7, **kw) as stream:
            done = [(e.name, e.arguments) for e in stream if e.type == "tool_calls.function.arguments.done"]
            final = stream.get_final_completion().choices[0]
        assert final.message.content is None and _check_calls(final, allowed) == whole
        assert done == [(t.function.name, t.function.arguments) for t in final.message.tool_calls]
    one = c.chat.completions.create(tool_choice="required", temperature=1.0, seed=1, n=4, parallel_tool_calls=False,
                                    **kw)
    for ch in one.choices:
        _check_calls(ch, names, single=True)
    # without the grammar ("auto", "none") the random model calls nothing
    for choice in ("auto", "none"):
        free = c.chat.completions.create(tool_choice=choice, temperature=0, **{**kw, "max_tokens": 30}).choices[0]
        assert free.finish_reason == "length" and not free.message.tool_calls and free.message.content


def test_none_serves_a_calls_block_as_content(served):
    """"none": a block the model writes (here a bias forces its first marker) is text, never parsed; "auto"
    parses what "none" serves as text."""
    c = served.client()
    begin = served.tok.tok.token_to_id(F.calls_begin)
    kw = dict(model="tiny-test", messages=ASK, tools=TOOLS, max_tokens=6, temperature=0,
              logit_bias={str(begin): 100})
    none = c.chat.completions.create(tool_choice="none", **kw).choices[0]
    assert none.finish_reason == "length" and not none.message.tool_calls
    r = httpx.post(served.url + "/v1/chat/completions", json={**kw, "tool_choice": "auto"}, timeout=60).json()
    assert r["choices"][0]["finish_reason"] == "length" and "tool_calls" not in r["choices"][0]["message"]


def test_auto_with_strict_functions_holds_the_calls_the_model_writes_to_their_schemas(served):
    """OpenAI's ``strict``: under "auto" the model chooses whether to call, and a call it writes matches the
    schema. flyer had taken ``strict`` and held nothing: the random model forced into a block (a bias on its
    first marker) wrote one that did not parse, served as text. Now the calls parse and validate, whole and
    streamed, and text without a call is still served as content."""
    c = served.client()
    begin = served.tok.tok.token_to_id(F.calls_begin)
    strict = [{**t, "function": {**t["function"], "strict": True}} for t in TOOLS]
    kw = dict(model="tiny-test", messages=ASK, max_tokens=400, temperature=1.0, seed=5, logit_bias={str(begin): 100})
    loose = c.chat.completions.create(tools=TOOLS, **kw).choices[0]
    assert not loose.message.tool_calls  # the same request without strict
    for n in (1, 3):
        for ch in c.chat.completions.create(tools=strict, n=n, **kw).choices:
            assert ch.message.content is None
            _check_calls(ch, set(SCHEMA))
    whole = _check_calls(c.chat.completions.create(tools=strict, **kw).choices[0], set(SCHEMA))
    assert _stream_calls(c, tools=strict, **kw) == (whole, "tool_calls", "")
    free = c.chat.completions.create(tools=strict, **{**kw, "max_tokens": 30, "logit_bias": {str(begin): -100}})
    assert free.choices[0].finish_reason == "length" and free.choices[0].message.content
    assert not free.choices[0].message.tool_calls


def test_auto_with_a_response_format_can_still_call(served):
    """OpenAI's structured outputs rule the reply, not whether a tool is called: under "auto" the response_format's
    grammar held from the first token and masked the calls marker, so a model that chose to call (a bias forces
    its marker here) answered JSON content instead. The output is now the format's JSON or a calls block."""
    c = served.client()
    begin = served.tok.tok.token_to_id(F.calls_begin)
    formats = ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "flag", "schema": FLAG}})
    kw = dict(model="tiny-test", messages=ASK, tools=TOOLS, max_tokens=400, temperature=0)
    for fmt in formats:
        called = c.chat.completions.create(response_format=fmt, logit_bias={str(begin): 100}, **kw).choices[0]
        _check_calls(called, set(SCHEMA))
        assert called.message.content is None
    reply = c.chat.completions.create(response_format=formats[1], logit_bias={str(begin): -100}, **kw).choices[0]
    assert reply.finish_reason == "stop" and not reply.message.tool_calls
    assert _valid(json.loads(reply.message.content), FLAG)


def test_a_follow_up_conversation_is_served(served):
    c = served.client()
    r = c.chat.completions.create(model="tiny-test", messages=FOLLOW_UP, tools=TOOLS, max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.prompt_tokens > 100
    forced = c.chat.completions.create(model="tiny-test", messages=FOLLOW_UP, tools=TOOLS, max_tokens=400, seed=2,
                                       tool_choice={"type": "function", "function": {"name": "set_light"}})
    _check_calls(forced.choices[0], {"set_light"}, single=True)


def test_bad_tools_and_choices_answer_400_naming_the_field(served):
    url = served.url + "/v1/chat/completions"
    ok = dict(model="tiny-test", messages=ASK, tools=TOOLS, max_tokens=2)
    fn = TOOLS[0]["function"]
    for over, param in (
            (dict(tools=[{"type": "code", "function": fn}]), "tools[0].type"),
            (dict(tools=[{"type": "function", "function": {**fn, "name": "no spaces"}}]), "tools[0].function.name"),
            (dict(tools=[{"type": "function", "function": {**fn, "parameters": [1]}}]), "tools[0].function.parameters"),
            (dict(tools=[TOOLS[0], TOOLS[0]]), "tools"),
            (dict(tools=[{"type": "function", "function": {**fn, "parameters": {"type": "nope"}}}],
                  tool_choice="required"), "tools"),
            (dict(tool_choice={"type": "function", "function": {"name": "get_time"}}), "tool_choice"),
            (dict(tool_choice="sometimes"), "tool_choice"),
            (dict(tools=None, tool_choice="required"), "tool_choice"),
            (dict(tool_choice="required", response_format={"type": "json_object"}), "response_format"),
            (dict(messages=[*ASK, {"role": "tool", "content": "x"}]), "messages[1].tool_call_id"),
            (dict(messages=[*ASK, {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f"}}]}]),
             "messages[1].tool_calls[0].function.arguments")):
        err = _error(httpx.post(url, json={**ok, **over}, timeout=60), 400)
        assert err["param"] == param or (err["param"] or "").startswith(param), (over, err)
    assert httpx.post(url, json=ok, timeout=60).status_code == 200


def test_byte_tokens_write_the_markers_as_text():
    """A tokenizer without the markers (a preset's bytes): the grammar writes them as text, which is parsed as
    well and never streamed as content."""
    torch.manual_seed(0)
    s = _Running(Transformer(preset("tiny")).eval(), kv_cache_bytes=3 * 64 * 4 * 384 * 4)  # the tools in the prompt
    try:
        kw = dict(model="tiny-test", messages=ASK, tools=TOOLS, max_tokens=360, temperature=1.0, seed=1,
                  tool_choice={"type": "function", "function": {"name": "set_light"}})
        whole = _check_calls(s.client().chat.completions.create(**kw).choices[0], {"set_light"}, single=True)
        assert _stream_calls(s.client(), **kw) == (whole, "tool_calls", "")
    finally:
        s.close()


# ---- a stream's content is the whole answer's, around the calls ---------------------------------------------------

# what a model may write before its calls: nothing, blank text (content null), text then blank text (kept as written)
PREFIXES = ["", "\n", "\n\n", " ", " \n\t", "Sure.\n\n", "\n Sure. "]


def prefix_cases(block: str, calls: list[tuple[str, str]], head: str = "") -> list[tuple[str, dict]]:
    """(text, what the whole answer holds) for each prefix after ``head`` (reasoning): before ``block`` (content the
    prefix, null when blank), before plain text (content all of it) and alone when blank (content the blank text)."""
    return [*((head + p + block, {"content": p if p.strip() else None, "calls": calls}) for p in PREFIXES),
            *((head + p + "done", {"content": p + "done", "calls": []}) for p in PREFIXES),
            *((head + p, {"content": p, "calls": []}) for p in PREFIXES if p and not p.strip())]


def _whole_and_streamed(c, **kw) -> tuple[dict, dict]:
    """Choice 0 of one request, answered whole and streamed (its deltas joined) through the openai client, as
    {content, reasoning, calls (name, arguments), finish}: OpenAI's contract is that the two are equal (a null
    content: no content text streamed)."""
    m = c.chat.completions.create(**kw).choices[0]
    whole = {"content": m.message.content, "reasoning": getattr(m.message, "reasoning_content", None),
             "calls": [(t.function.name, t.function.arguments) for t in m.message.tool_calls or []],
             "finish": m.finish_reason}
    content, reasoning, calls, finish = "", "", {}, None
    for chunk in c.chat.completions.create(stream=True, **kw):
        d = chunk.choices[0].delta
        content, reasoning = content + (d.content or ""), reasoning + (getattr(d, "reasoning_content", None) or "")
        calls.update({t.index: (t.function.name, t.function.arguments) for t in d.tool_calls or []})
        finish = chunk.choices[0].finish_reason or finish
    return whole, {"content": content or None, "reasoning": reasoning or None,
                   "calls": [calls[k] for k in sorted(calls)], "finish": finish}


def _stream_mismatches(url: str, engine, tok, eos: list[int], cases, **kw) -> list[str]:
    """For each (text, want) of ``cases``: the engine stand-in ``engine`` (served at ``url``) scripted to write
    ``text`` (``tok``'s ids) then ``eos``; the whole answer holds ``want`` (some of ``_whole_and_streamed``'s
    keys); returned: a line for each text whose stream differs from its whole answer (the keys that differ)."""
    wrong = []
    for text, want in cases:
        engine.script = tok.encode_ids(text, add_special_tokens=False) + eos
        whole, streamed = _whole_and_streamed(client(url), max_tokens=len(engine.script), **kw)
        assert {k: whole[k] for k in want} == want, (type(tok).__name__, text, whole)
        if streamed != whole:
            wrong.append(f"{type(tok).__name__} {text[:24]!r}: (streamed, whole) "
                         f"{ {k: (streamed[k], v) for k, v in whole.items() if streamed[k] != v} }")
    return wrong


@pytest.mark.parametrize("parser", ["deepseek_v31", "deepseek_v3"])
def test_streamed_content_is_the_whole_answers_around_the_calls(ckpt, parser):
    """Each prefix before a calls block (and before no block), markers as single tokens or spelt out in bytes: the
    whole answer's content is the prefix, null when blank, and the stream's content deltas join to exactly it."""
    from test_serve_tools_v3 import _Scripted  # (that module imports this one: read at run time)
    fmt, calls = TOOL_PARSERS[parser], [("get_weather", '{"city":"oslo"}'), ("set_light", '{"on":true}')]
    cases = prefix_cases(fmt.render(calls), calls)
    limits = Limits(vocab_size=1 << 20, max_seq_len=4096, block_size=16, capacity=256, max_queue=8)
    wrong, marked = [], load_tokenizer(ckpt)
    for tok, eos in ((marked, [marked.eos_id()]), (ByteTokenizer(), [])):  # markers as single tokens, as bytes
        engine = _Scripted(limits, [])
        with serving(Api(engine, tok, "tiny-test", chat_template=TEMPLATE, tool_call_parser=parser)) as url:
            wrong += _stream_mismatches(url, engine, tok, eos, cases, model="tiny-test", messages=ASK, tools=TOOLS)
    assert not wrong, "\n".join(wrong)
