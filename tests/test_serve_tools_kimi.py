"""Tool calling in Kimi K2's format (``KIMI_K2``, ``flyer.serve.tools_kimi``; vLLM's ``kimi_k2`` parser):
``<|tool_calls_section_begin|>``, per call ``<|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>ARGS
<|tool_call_end|>``, ``<|tool_calls_section_end|>``, each marker one added token of Kimi's tiktoken tokenizer.

The format is read off a template that writes the section marker, or forced with ``--tool-call-parser kimi_k2``;
the parser on hand-written texts (the id's shape, the last colon, malformed blocks); a tiny Kimi tokenizer directory
(``tests.test_hf_tiktoken``'s, Kimi's special tokens at their offsets) with a chat template of this test's own in
Kimi K2's shape. "auto" over HTTP with an engine stand-in writing a scripted output: content then the calls, whose
``id`` is the ``functions.NAME:IDX`` the model wrote, streamed or not alike; a follow-up carrying the returned calls
and the tools' answers is the prompt transformers' ``apply_chat_template`` gives on the same messages. "required" /
named with a random model (a real engine) write calls whose arguments match the schema and whose IDX continues the
conversation's count; the grammar accepts the block the template writes with that count and no other."""

import dataclasses
import json

import llguidance
import pytest
import torch
from served import EngineServer, client, handed_to_http, serving
from test_deepseek_prompt_sections import _Recording
from test_serve_structured import _valid
from test_serve_tools import ASK, SCHEMA, TEMPLATE as TEMPLATE_V31, TOOLS, _stream_mismatches, prefix_cases
from test_serve_tools_v3 import CALLS, _Scripted
from transformers import AutoTokenizer

from flyer.cli import main
from flyer.config import preset
from flyer.errors import FieldError
from flyer.infer.cli import ByteTokenizer
from flyer.interop.hf_tokenizer import load_tokenizer
from flyer.model.transformer import Transformer
from flyer.serve.api import Api
from flyer.serve.engine import Engine, EngineConfig
from flyer.serve.grammar import llg_tokenizer
from flyer.serve.request import Limits
from flyer.serve.schema import ChatBody
from flyer.serve.tools import (DEEPSEEK_V31 as F31, KIMI_K2 as K, MAX_TOOL_CALLS, TOOL_PARSERS, ToolCall,
                               chosen_format, content_end, marked_text, marker_ids, parse_tool_calls, tool_format,
                               tool_grammar)
from flyer.serve.tools_kimi import calls_so_far
from tests.test_hf_tiktoken import KIMI_SPECIAL, _train, write_dir

# a template of this test's own in Kimi K2's shape: the tools as compact JSON in a tool_declare turn, a default
# system turn, role headers; an assistant's content then its calls (each call's id between the call's marker and
# the argument marker), a tool's answer as "## Return of {tool_call_id}"; every turn closed by <|im_end|>
TEMPLATE = (
    "{%- if tools -%}<|im_system|>tool_declare<|im_middle|>{{ tools | tojson(separators=(',', ':')) }}<|im_end|>"
    "{%- endif -%}{%- for m in messages -%}{%- if loop.first and m['role'] != 'system' -%}"
    "<|im_system|>system<|im_middle|>You are Kimi.<|im_end|>{%- endif -%}"
    "{%- if m['role'] == 'user' -%}<|im_user|>user<|im_middle|>{%- elif m['role'] == 'assistant' -%}"
    "<|im_assistant|>assistant<|im_middle|>{%- else -%}<|im_system|>{{ m['role'] }}<|im_middle|>{%- endif -%}"
    "{%- if m['role'] == 'assistant' and m.get('tool_calls') -%}{{ m['content'] or '' }}<|tool_calls_section_begin|>"
    "{%- for c in m['tool_calls'] -%}<|tool_call_begin|>{{ c['id'] }}<|tool_call_argument_begin|>"
    "{{ c['function']['arguments'] }}<|tool_call_end|>{%- endfor -%}<|tool_calls_section_end|>"
    "{%- elif m['role'] == 'tool' -%}## Return of {{ m['tool_call_id'] }}\n{{ m['content'] }}"
    "{%- else -%}{{ m['content'] }}{%- endif -%}<|im_end|>{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}")
IDS = [K.call_id(n, k) for k, (n, _) in enumerate(CALLS)]  # functions.get_weather:0, functions.set_light:1
FOLLOW_UP = ASK + [
    {"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"id": i, "type": "function", "function": {"name": n, "arguments": a}} for i, (n, a) in zip(IDS, CALLS)]},
    {"role": "tool", "tool_call_id": IDS[0], "content": "sunny"},
    {"role": "tool", "tool_call_id": IDS[1], "content": "done"}]
LIMITS = Limits(vocab_size=1 << 20, max_seq_len=4096, block_size=16, capacity=256, max_queue=8)
NAMED = {"type": "function", "function": {"name": "set_light"}}


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    """A Kimi tokenizer directory (600 ranks, Kimi's special tokens: the five markers at ranks + 11..15, special as
    Kimi's tokenizer_config lists them), ``TEMPLATE`` its chat template; transformers reads it without remote
    code (``config.json``'s model_type)."""
    path = write_dir(tmp_path_factory.mktemp("kimi_tools"), _train(600), KIMI_SPECIAL, remote=False,
                     config={"chat_template": TEMPLATE})
    (path / "config.json").write_text(json.dumps({"model_type": "kimi_k25"}))
    return path


# ---- the format: read off the template, forced by name; the parser --------------------------------------------------

def test_the_format_is_the_templates_or_the_named_one():
    assert tool_format(TEMPLATE) is K and chosen_format("auto", TEMPLATE) is K
    assert chosen_format("kimi_k2", TEMPLATE_V31) is K is TOOL_PARSERS["kimi_k2"]
    assert chosen_format("kimi_k2", None) is K
    assert tool_format(TEMPLATE_V31) is F31 and chosen_format("deepseek_v31", TEMPLATE) is F31
    with pytest.raises(FieldError, match="tool_call_parser") as e:
        chosen_format("kimi", TEMPLATE)
    assert "'kimi_k2'" in str(e.value) and "\n" not in str(e.value)


def test_the_parser_on_hand_written_texts():
    one = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
           '{"city":"paris"}<|tool_call_end|><|tool_calls_section_end|>')  # as the template writes it
    assert K.render([("get_weather", '{"city":"paris"}')]) == one
    assert parse_tool_calls(one, K) == (None, [ToolCall("get_weather", '{"city":"paris"}', "functions.get_weather:0")])
    want = [ToolCall(n, a, i) for i, (n, a) in zip(IDS, CALLS)]
    assert parse_tool_calls("Let me look.\n" + K.render(CALLS), K) == ("Let me look.\n", want)
    assert parse_tool_calls(K.render(CALLS), K, parallel=False) == (None, want[:1])
    # an IDX continuing the conversation, a name holding a colon (the last one ends it), whitespace around parts
    assert parse_tool_calls(K.render(CALLS, first_index=7), K)[1][1] == ToolCall(*CALLS[1], "functions.set_light:8")
    assert parse_tool_calls(K.render([("ns:f", "{}")]), K) == (None, [ToolCall("ns:f", "{}", "functions.ns:f:0")])
    spaced = f"{K.calls_begin}\n{K.call_begin} functions.f:12 {K.sep} {{}} {K.call_end}\n{K.calls_end}\n"
    assert parse_tool_calls(spaced, K) == (None, [ToolCall("f", "{}", "functions.f:12")])
    # the id served is the one written, a call without one gets a fresh id
    assert want[1].openai() == {"id": "functions.set_light:1", "type": "function",
                                "function": {"name": "set_light", "arguments": CALLS[1][1]}}
    assert ToolCall("f", "{}").openai()["id"].startswith("call_")
    for bad in (one.replace("functions.", ""), one.replace(":0", ""), one.replace(":0", ":x"),
                one.replace("get_weather", ""), one.replace("get_weather", "get weather"),
                K.render([("f", "[1]")]), K.render([("f", "{oops")]), one[:-len(K.calls_end)], one + "more",
                one.replace(K.sep, ""), one.replace(K.sep, K.sep + "{}" + K.sep),
                one.replace(K.call_end, K.call_begin + K.call_end), K.calls_begin + K.calls_end,
                K.render([("f" + K.calls_begin, "{}")]),
                F31.render(CALLS), "plain text"):
        assert parse_tool_calls(bad, K) is None, bad
    # the V3.1 parser reads no Kimi block; content streams up to the section marker
    assert parse_tool_calls(one, F31) is None
    for text, n in (("abc" + one, 3), ("ab" + K.calls_begin[:5], 2), ("a<b", 3)):
        assert content_end(text, fmt=K) == n, text


def test_markers_are_single_tokens_and_decode_kept(kimi):
    """Kimi's tokenizer holds each marker as one special token at its release offset; ``decode`` drops them and
    ``marked_text`` writes them out, which parses."""
    tok = load_tokenizer(kimi)
    n = len(_train(600))
    assert marker_ids(tok, K) == {m: n + k for m, k in zip(K.markers, (11, 12, 13, 14, 15))}
    assert all(KIMI_SPECIAL[k] == m for m, k in zip(K.markers, (11, 12, 13, 14, 15)))
    text = "hi " + K.render(CALLS)
    ids = tok.encode_ids(text, add_special_tokens=False)
    assert sum(i in marker_ids(tok, K).values() for i in ids) == 2 + 3 * len(CALLS)
    assert K.calls_begin not in tok.decode(ids) and marked_text(tok, ids, K) == text


# ---- "auto" over HTTP: the ids round-trip through the template ------------------------------------------------------

def _stream(c, **kw) -> tuple[str, list[dict], str | None, int]:
    """A streamed answer's (content, tool_calls deltas as dicts, finish_reason, content chunks)."""
    content, calls, finish, pieces = "", [], None, 0
    for chunk in c.chat.completions.create(stream=True, **kw):
        d = chunk.choices[0].delta
        content, pieces = content + (d.content or ""), pieces + bool(d.content)
        calls += [t.model_dump(exclude_none=True) for t in d.tool_calls or []]
        finish = chunk.choices[0].finish_reason or finish
    return content, calls, finish, pieces


def test_auto_serves_the_written_ids_and_the_follow_up_is_transformers(kimi):
    tok = load_tokenizer(kimi)
    content = "Sure, let me check both."
    script = tok.encode_ids(content + K.render(CALLS), add_special_tokens=False) + [tok.eos_id()]
    engine = _Recording(LIMITS, script)
    with serving(Api(engine, tok, "tiny-test", chat_template=TEMPLATE)) as url:
        c = client(url)
        kw = dict(model="tiny-test", messages=ASK, tools=TOOLS, max_tokens=len(script))
        whole = c.chat.completions.create(**kw).choices[0]
        assert whole.finish_reason == "tool_calls" and whole.message.content == content
        calls = [t.model_dump() for t in whole.message.tool_calls]
        assert calls == [{"id": i, "type": "function", "function": {"name": n, "arguments": a}}
                         for i, (n, a) in zip(IDS, CALLS)]
        # the stream: content as it comes, then one chunk with every call, ids included, as the whole answer's
        streamed, deltas, finish, pieces = _stream(c, **kw)
        assert (streamed, finish) == (content, "tool_calls") and pieces > 3
        assert deltas == [{"index": k, **call} for k, call in enumerate(calls)]
        first = c.chat.completions.create(parallel_tool_calls=False, **kw).choices[0]
        assert [t.id for t in first.message.tool_calls] == IDS[:1]
        # the calls and the tools' answers sent back render as transformers renders the same messages
        messages = ASK + [whole.message.model_dump(exclude_none=True)] + [
            {"role": "tool", "tool_call_id": t.id, "content": a} for t, a in zip(whole.message.tool_calls,
                                                                                ("sunny", "done"))]
        assert messages == FOLLOW_UP[:1] + [{**FOLLOW_UP[1], "content": content}] + FOLLOW_UP[2:]
        engine.prompts.clear()
        c.chat.completions.create(**{**kw, "messages": messages})
        hf = AutoTokenizer.from_pretrained(kimi)
        want = hf.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
        want_ids = hf.apply_chat_template(messages, tools=TOOLS, tokenize=True, add_generation_prompt=True,
                                          return_dict=False)
        assert engine.prompts == [want_ids] == [tok.encode_ids(want, add_special_tokens=False)]
        assert content + K.render(CALLS) + "<|im_end|>" in want and f"## Return of {IDS[1]}\ndone" in want
        assert set(marker_ids(tok, K).values()) <= set(want_ids)


def test_auto_serves_malformed_blocks_as_content(kimi):
    tok = load_tokenizer(kimi)
    for text in ("Hm." + K.render(CALLS).replace('"oslo"', "oslo"),  # arguments not JSON
                 "Hm." + K.render(CALLS).replace("functions.", "")):  # ids without the prefix
        script = tok.encode_ids(text, add_special_tokens=False) + [tok.eos_id()]
        with serving(Api(_Scripted(LIMITS, script), tok, "tiny-test", chat_template=TEMPLATE)) as url:
            kw = dict(model="tiny-test", messages=ASK, tools=TOOLS, max_tokens=len(script))
            ch = client(url).chat.completions.create(**kw).choices[0]
            assert ch.finish_reason == "stop" and not ch.message.tool_calls
            assert ch.message.content.startswith("Hm.")
            streamed, deltas, finish, _ = _stream(client(url), **kw)
            assert (streamed, deltas, finish) == (ch.message.content, [], ch.finish_reason)


def test_a_block_cut_by_max_tokens_answers_its_whole_calls(kimi):
    """``max_tokens`` cutting a calls section: the content before it and the calls the cut left whole (none when it
    cut the first), the cut one dropped, finish_reason "length", streamed alike. It was served as content: the
    markers, special tokens, dropped and the calls' ids and arguments glued to the text."""
    tok = load_tokenizer(kimi)
    rendered = K.render(CALLS)
    script = tok.encode_ids("Hm." + rendered, add_special_tokens=False) + [tok.eos_id()]

    def upto(at: int) -> int:
        return len(tok.encode_ids("Hm." + rendered[:at], add_special_tokens=False))

    whole = [{"id": i, "type": "function", "function": {"name": n, "arguments": a}} for i, (n, a) in zip(IDS, CALLS)]
    with serving(Api(_Scripted(LIMITS, script), tok, "tiny-test", chat_template=TEMPLATE)) as url:
        for n, kept in ((len(script) - 2, 2), (upto(rendered.index('"level"')), 1),
                        (upto(rendered.index('"days"')), 0)):
            kw = dict(model="tiny-test", messages=ASK, tools=TOOLS, max_tokens=n)
            ch = client(url).chat.completions.create(**kw).choices[0]
            assert ch.finish_reason == "length" and ch.message.content == "Hm.", (n, ch)
            assert [t.model_dump() for t in ch.message.tool_calls or []] == whole[:kept]
            streamed, deltas, finish, _ = _stream(client(url), **kw)
            assert (streamed, finish) == ("Hm.", "length")
            assert [{k: d[k] for k in ("id", "type", "function")} for d in deltas] == whole[:kept]


def test_streamed_content_is_the_whole_answers_around_the_calls(kimi):
    """Each prefix before a calls section (and before none): the whole answer's content is the prefix, null when
    blank, and the stream's content deltas join to exactly it; its calls are the whole answer's."""
    tok = load_tokenizer(kimi)
    cases = prefix_cases(K.render(CALLS), CALLS)
    engine = _Scripted(LIMITS, [])
    with serving(Api(engine, tok, "tiny-test", chat_template=TEMPLATE)) as url:
        wrong = _stream_mismatches(url, engine, tok, [tok.eos_id()], cases, model="tiny-test", messages=ASK,
                                   tools=TOOLS)
    assert not wrong, "\n".join(wrong)


# ---- "required" / named: the grammar writes calls whose IDX continues the conversation ------------------------------

def _accepts(tok, grammar: str, text: str) -> bool:
    vocab = 512 if isinstance(tok, ByteTokenizer) else tok.tok.get_vocab_size()
    m = llguidance.LLMatcher(llg_tokenizer(tok, vocab), grammar, log_level=0)
    return all(m.consume_token(t) for t in tok.encode_ids(text, add_special_tokens=False)) and m.is_accepting()


def test_the_grammar_accepts_the_templates_block_with_the_running_index(kimi):
    """With the markers as tokens or as text (bytes): the block the template writes for calls continuing a count
    of 2, and no block with other ids (another count, out of order, no prefix) nor in another format; one call when
    not parallel or named."""
    functions = [t["function"] for t in TOOLS]
    for tok in (load_tokenizer(kimi), ByteTokenizer()):
        grammar = tool_grammar(functions, tok, fmt=K, first_index=2)
        assert _accepts(tok, grammar, K.render(CALLS, 2)) and _accepts(tok, grammar, K.render(CALLS[:1] * 8, 2))
        for other in (K.render(CALLS), K.render(CALLS, 3), K.render(CALLS[:1] * 9, 2), F31.render(CALLS),
                      K.render(CALLS, 2).replace(":3", ":9"), K.render(CALLS, 2).replace("functions.", "")):
            assert not _accepts(tok, grammar, other), other
        single = tool_grammar(functions, tok, parallel=False, fmt=K, first_index=2)
        named = tool_grammar(functions, tok, "set_light", fmt=K, first_index=2)
        assert _accepts(tok, single, K.render(CALLS[:1], 2)) and not _accepts(tok, single, K.render(CALLS, 2))
        assert _accepts(tok, named, K.render(CALLS[1:], 2)) and not _accepts(tok, named, K.render(CALLS[:1], 2))


def _check(choice, names: set[str], first: int, single: bool = False) -> list[tuple[str, str, dict]]:
    """A constrained choice's calls: (id, name, arguments), each valid under its schema, ids counting from
    ``first``."""
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
    calls = choice.message.tool_calls
    assert 1 <= len(calls) <= (1 if single else MAX_TOOL_CALLS)
    out = []
    for k, t in enumerate(calls):
        assert t.function.name in names and t.id == K.call_id(t.function.name, first + k), t
        args = json.loads(t.function.arguments)
        assert _valid(args, SCHEMA[t.function.name]), (t.function.name, args)
        out.append((t.id, t.function.name, args))
    return out


@pytest.fixture(scope="module")
def served(kimi):
    """A tiny random model behind the Kimi tokenizer and template (a real engine)."""
    torch.manual_seed(0)
    tok = load_tokenizer(kimi)
    model = Transformer(dataclasses.replace(preset("tiny"), max_seq_len=2048)).eval()  # the tools' JSON: ~500 tokens
    engine = Engine(model, EngineConfig(kv_cache_bytes=1 << 24, block_size=16), tokenizer=tok)
    with EngineServer(engine, lambda link: Api(link, tok, "tiny-test", chat_template=TEMPLATE)) as s:
        yield s


def test_required_and_named_calls_continue_the_count(served):
    c = served.client()
    assert served.api.tool_format is K
    for messages, first in ((ASK, 0), (FOLLOW_UP, 2)):
        assert calls_so_far(ChatBody(model="tiny-test", messages=messages).messages) == first
        kw = dict(model="tiny-test", messages=messages, tools=TOOLS, max_tokens=500, temperature=1.0)
        for choice, allowed in (("required", set(SCHEMA)), (NAMED, {"set_light"})):
            r = c.chat.completions.create(tool_choice=choice, seed=3, n=2, **kw)
            written = [_check(ch, allowed, first, single=choice is NAMED) for ch in r.choices]
            if choice == "required":  # parallel calls: the index past the first is exercised
                assert max(map(len, written)) >= 2, written
            whole = c.chat.completions.create(tool_choice=choice, seed=7, **kw).choices[0]
            calls = [t.model_dump(exclude_none=True) for t in whole.message.tool_calls]
            _check(whole, allowed, first)
            assert _stream(c, tool_choice=choice, seed=7, **kw)[1:3] == (
                [{"index": k, **t} for k, t in enumerate(calls)], "tool_calls")
    one = c.chat.completions.create(model="tiny-test", messages=FOLLOW_UP, tools=TOOLS, max_tokens=500,
                                    temperature=1.0, seed=1, n=2, tool_choice="required", parallel_tool_calls=False)
    for ch in one.choices:
        _check(ch, set(SCHEMA), 2, single=True)


# ---- the flag ------------------------------------------------------------------------------------------------------

def test_the_flag_reaches_the_api_and_a_bad_name_is_one_line(monkeypatch, capsys):
    """``flyer serve --tool-call-parser kimi_k2`` (the preset has no template: auto would be V3.1's): the HTTP
    process's ``Api`` reads calls in Kimi's format; another name exits 2 with one line naming the flag."""
    for parser, fmt in (("kimi_k2", K), ("auto", F31)):
        limits, *args = handed_to_http(monkeypatch, "--tool-call-parser", parser)
        assert Api(_Scripted(limits, []), *args).tool_format is fmt
    capsys.readouterr()
    assert main(["serve", "--preset", "tiny", "--tool-call-parser", "kimi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flyer: error: --tool-call-parser: invalid choice: 'kimi'") and err.count("\n") == 1
    assert "kimi_k2" in err
