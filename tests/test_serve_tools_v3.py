"""Tool calling in DeepSeek-V3-0324 / R1's format (``DEEPSEEK_V3``: ``function<｜tool▁sep｜>NAME`` then a fenced json
block), chosen per checkpoint from its chat template; and "auto" served over HTTP in both formats.

The format is read off the template (``tool_format``); the parser on hand-written texts (the fence and the type are
required: a V3.1 text is no V3 call, and the reverse); a tiny random DeepSeek-V3 checkpoint whose (test-written)
V3-0324-style template renders tools and an assistant's calls: the prompt's text and ids equal transformers'
``apply_chat_template``, and the calls in it are ``DEEPSEEK_V3.render``'s text; "required" / named calls through
the openai client parse and validate, streamed or not; each format's grammar accepts the block its template
writes and not the other format's, nor one without the fence; with byte tokens (no marker tokens) the grammar writes the
markers as text. "auto" over HTTP with an engine stand-in that writes a scripted output (a random model calls
nothing by itself): content, then the calls, parsed in the template's format; a stream's content deltas then one
chunk with the calls and finish_reason "tool_calls", equal to the whole answer; ``parallel_tool_calls`` false
keeps the first call; a tokenizer without the markers as tokens (bytes) parses the same."""

import asyncio
import contextlib
import itertools
import json

import httpx
import llguidance
import pytest
import torch
from served import EngineServer, serving
from test_serve_tools import (ASK, LIGHT, SCHEMA, TEMPLATE as TEMPLATE_V31, TOOLS, _check_calls,
                              _rendered_by_transformers, _Served, _stream_calls, tool_checkpoint)
from transformers import AutoTokenizer

from flyer.config import preset
from flyer.infer.cli import ByteTokenizer
from flyer.interop.hf_tokenizer import load_tokenizer
from flyer.model.transformer import Transformer
from flyer.serve.api import Api
from flyer.serve.engine import Engine, EngineConfig
from flyer.serve.grammar import llg_tokenizer
from flyer.serve.link import Submitted
from flyer.serve.request import Limits, TokenEvent
from flyer.serve.schema import ChatBody
from flyer.serve.tools import (DEEPSEEK_V3 as F3, DEEPSEEK_V31 as F31, ToolCall, marker_ids, parse_tool_calls,
                               tool_format, tool_grammar)

# a template of this test's own in DeepSeek-V3-0324's shape: its users and assistants, an assistant's content then
# its calls (the type, the name after the sep, the arguments in a fenced json block, a newline between calls), a
# tool's answer between the output markers; and, unlike the released one, the tools listed up front
TEMPLATE_V3 = (
    "{{ bos_token }}{% if tools %}## Tools\n{% for t in tools %}### {{ t['function']['name'] }}\n"
    "{{ t['function']['description'] or '' }}\nParameters: {{ t['function']['parameters'] | tojson }}\n{% endfor %}"
    "{% endif %}{% for m in messages %}{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '<｜Assistant｜>' + (m['content'] or '') }}{% if m['tool_calls'] %}"
    "{{ '<｜tool▁calls▁begin｜>' }}{% for c in m['tool_calls'] %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<｜tool▁call▁begin｜>' + c['type'] + '<｜tool▁sep｜>' + c['function']['name'] + '\\n' + '```json' + '\\n' "
    "+ c['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>' }}{% endfor %}{{ '<｜tool▁calls▁end｜>' }}"
    "{% endif %}{{ eos_token }}{% elif m['role'] == 'tool' %}"
    "{{ '<｜tool▁output▁begin｜>' + m['content'] + '<｜tool▁output▁end｜>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}")
CALLS = [("get_weather", '{"city":"oslo","celsius":true,"days":2}'), ("set_light", '{"on":false,"level":3}')]
FOLLOW_UP = ASK + [
    {"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"id": f"call_{k}", "type": "function", "function": {"name": n, "arguments": a}}
        for k, (n, a) in enumerate(CALLS)]},
    {"role": "tool", "tool_call_id": "call_0", "content": "sunny"},
    {"role": "tool", "tool_call_id": "call_1", "content": "done"}]


# ---- the format, read off the template; the parser ---------------------------------------------------------------

def test_the_format_is_the_templates():
    assert tool_format(TEMPLATE_V3) is F3
    assert tool_format(TEMPLATE_V31) is F31 and tool_format(None) is F31 and tool_format("") is F31
    # a fenced json block elsewhere in a template (a system prompt's example) is not its call rendering
    assert tool_format("Answer in ```json blocks. " + TEMPLATE_V31) is F31


def test_the_v3_parser_on_hand_written_texts():
    one = ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
           '{"city":"paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>')  # as the released templates write it
    assert F3.render([("get_weather", '{"city":"paris"}')]) == one
    assert parse_tool_calls(one, F3) == (None, [ToolCall("get_weather", '{"city":"paris"}')])
    two = F3.render(CALLS)
    assert "```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function" in two  # a newline between calls
    want = [ToolCall(n, a) for n, a in CALLS]
    assert parse_tool_calls("Let me look.\n" + two, F3) == ("Let me look.\n", want)
    assert parse_tool_calls(two, F3, parallel=False) == (None, want[:1])
    spaced = (f"{F3.calls_begin}\n{F3.call_begin} function {F3.sep} f \n```json\n {{}} \n``` \n{F3.call_end}\n"
              f"{F3.calls_end}")
    assert parse_tool_calls(spaced, F3) == (None, [ToolCall("f", "{}")])
    # the wrong format for the text parses nothing: V3.1's text is no V3 call, nor the reverse
    assert parse_tool_calls(F31.render(CALLS), F3) is None and parse_tool_calls(two, F31) is None
    fence = '\n```json\n{"a":1}\n```'
    for bad in (one.replace("```json\n", ""), one.replace("\n```<", "<"), one.replace("```json", "```"),
                one.replace(">function<", ">tool<"), one.replace(">function<", "><"),
                F3.render([("", "{}")]), F3.render([("f", "[1]")]), F3.render([("f", "{oops")]),
                one[:-len(F3.calls_end)], one + "more",
                F3.calls_begin + F3.call_begin + "function" + fence + F3.call_end + F3.calls_end,
                F3.calls_begin + F3.call_begin + "function" + F3.sep + "f" + F3.sep + fence + F3.call_end
                + F3.calls_end):
        assert parse_tool_calls(bad, F3) is None, bad


# ---- a V3-0324-style checkpoint: the template renders the calls, the grammar writes them -----------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """``tool_checkpoint`` with ``TEMPLATE_V3``; a context of 2048: "required" may write 8 fenced calls."""
    return tool_checkpoint(tmp_path_factory.mktemp("tools_v3") / "v3", TEMPLATE_V3, 2048)


@pytest.fixture(scope="module")
def served(ckpt):
    s = _Served(ckpt)
    yield s
    s.close()


def test_the_prompt_with_calls_is_transformers(ckpt, served):
    """flyer renders a conversation with tools, an assistant's content and two calls, and the tools' answers, to
    transformers' text and ids; the calls in it are ``DEEPSEEK_V3``'s text (the template writes the format)."""
    assert served.api.tool_format is F3
    hf = AutoTokenizer.from_pretrained(ckpt)
    for messages in (ASK, FOLLOW_UP):
        want = _rendered_by_transformers(ckpt, messages, TOOLS)
        ids = hf.apply_chat_template(messages, tools=TOOLS, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if not isinstance(ids, list) else ids
        body = ChatBody(model="tiny-test", messages=messages, tools=TOOLS)
        prompt = served.api._chat_prompt(body)
        assert prompt == ids == served.tok.encode_ids(want, add_special_tokens=False)
        assert "### get_weather\nforecast\nParameters: " + json.dumps(SCHEMA["get_weather"]) in want
    assert "<｜Assistant｜>Let me look." + F3.render(CALLS) in want
    assert F31.render(CALLS) not in want
    assert {served.tok.tok.token_to_id(m) for m in F3.markers} <= set(prompt)  # each marker one token
    assert len(prompt) + 800 <= 2048, len(prompt)  # the calls test's room


def test_required_and_named_calls_in_the_v3_format(served):
    c = served.client()
    kw = dict(model="tiny-test", messages=FOLLOW_UP, tools=TOOLS, max_tokens=800)  # 8 calls fit
    for choice, allowed in (("required", set(SCHEMA)), ({"type": "function", "function": {"name": "set_light"}},
                                                         {"set_light"})):
        r = c.chat.completions.create(tool_choice=choice, temperature=1.0, seed=3, n=3, **kw)
        for ch in r.choices:
            assert ch.message.content is None
            _check_calls(ch, allowed, single=choice != "required")
        whole = _check_calls(c.chat.completions.create(tool_choice=choice, temperature=1.0, seed=7, **kw).choices[0],
                             allowed)
        assert _stream_calls(c, tool_choice=choice, temperature=1.0, seed=7, **kw) == (whole, "tool_calls", "")
    for ch in c.chat.completions.create(tool_choice="required", temperature=1.0, seed=1, n=3,
                                        parallel_tool_calls=False, **kw).choices:
        _check_calls(ch, set(SCHEMA), single=True)


def test_the_grammar_accepts_the_templates_calls(ckpt):
    """A "required" grammar in each format accepts the calls block its template writes (markers as tokens or as
    text) and none in the other format, without the fence or the newline between calls; not parallel, one call."""
    functions = [t["function"] for t in TOOLS]
    for tok in (load_tokenizer(ckpt), ByteTokenizer()):
        llg_tok = llg_tokenizer(tok, 512 if isinstance(tok, ByteTokenizer) else tok.tok.get_vocab_size())

        def accepts(grammar: str, text: str) -> bool:
            m = llguidance.LLMatcher(llg_tok, grammar, log_level=0)
            return all(m.consume_token(t) for t in tok.encode_ids(text, add_special_tokens=False)) and \
                m.is_accepting()
        for fmt, other in ((F3, F31), (F31, F3)):
            grammar, single = tool_grammar(functions, tok, fmt=fmt), tool_grammar(functions, tok, parallel=False,
                                                                                  fmt=fmt)
            assert accepts(grammar, fmt.render(CALLS)) and accepts(single, fmt.render(CALLS[:1]))
            assert not accepts(grammar, other.render(CALLS)) and not accepts(single, fmt.render(CALLS))
            if fmt is F3:
                assert not accepts(grammar, fmt.render(CALLS).replace("```<", "<").replace("```json\n", ""))
                assert not accepts(grammar, fmt.render(CALLS).replace(">\n<", "><"))


def test_byte_tokens_write_the_v3_markers_as_text():
    """A tokenizer without the markers (bytes) and a V3-0324-style template: the grammar writes the markers, the
    type and the fence as text, which is parsed as well."""
    torch.manual_seed(0)
    engine = Engine(Transformer(preset("tiny")).eval(), EngineConfig(kv_cache_bytes=64 * 4 * 384 * 8, block_size=4,
                                                                     cache_dtype=torch.float32, prefill_chunk=8),
                    tokenizer=ByteTokenizer())
    with EngineServer(engine, lambda link: Api(link, ByteTokenizer(), "tiny-test", chat_template=TEMPLATE_V3)) as s:
        api, url = s.api, s.url
        assert api.tool_format is F3
        body = dict(model="tiny-test", messages=ASK, tools=TOOLS[1:], max_tokens=300, temperature=1.0, seed=1,
                    tool_choice={"type": "function", "function": {"name": "set_light"}})
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120).json()
        r = r["choices"][0] if "choices" in r else pytest.fail(str(r))
        assert r["finish_reason"] == "tool_calls" and r["message"]["content"] is None
        [call] = r["message"]["tool_calls"]
        assert call["function"]["name"] == "set_light"
        assert set(json.loads(call["function"]["arguments"])) == set(LIGHT["properties"])


# ---- "auto" over HTTP: an engine stand-in writes content then calls ---------------------------------------------

class _Scripted:
    """An engine stand-in on the API's side of the link (``EngineClient``'s methods): every request generates
    ``script`` (token ids), one event a token on the event loop, the last with finish_reason "stop" (as an EOS
    would), or "length" at its ``max_tokens``."""

    def __init__(self, limits: Limits, script: list[int]):
        self.limits, self.script, self.on_lost, self.ids = limits, script, None, itertools.count()

    async def connect(self):
        pass

    def close(self):
        pass

    def end_all(self, reason: str = "shutdown") -> None:
        """A drain out of time (``EngineClient.end_all``): a test's requests have ended by then."""

    async def render_metrics(self) -> bytes:
        return b""

    def check(self, prompt, opts):
        self.limits.check(prompt, opts)

    def submit(self, prompt, opts, emit) -> Submitted:
        r, n = Submitted(next(self.ids), emit), min(len(self.script), opts.max_tokens)
        loop = asyncio.get_running_loop()

        def send(k: int):
            if r.done:  # cancelled
                return
            r.done = k == n - 1
            reason = ("stop" if n == len(self.script) else "length") if r.done else None
            emit(TokenEvent(self.script[k], logprob=-1.0, finish_reason=reason))
            if not r.done:
                loop.call_soon(send, k + 1)
        loop.call_soon(send, 0)
        return r

    def cancel(self, r: Submitted, reason: str = "cancelled"):
        r.done = True


@contextlib.contextmanager
def _serving(engine, tok, template: str):
    """``Api`` over ``engine`` with ``tok`` and ``template``, served on a free loopback port while in the block:
    (the api, its URL)."""
    api = Api(engine, tok, "tiny-test", chat_template=template)
    with serving(api) as url:
        yield api, url


def _sse_chunks(url: str, body: dict) -> list[dict]:
    """The chunks of a streamed chat completion, read off the HTTP stream."""
    chunks = []
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: "):]))
    return chunks


def _tokenizers(ckpt):
    """(name, tokenizer, EOS id or None): the checkpoint's (markers as single tokens) and bytes (markers as text)."""
    tok = load_tokenizer(ckpt)
    return [("markers", tok, tok.eos_id()), ("bytes", ByteTokenizer(), None)]


@pytest.mark.parametrize("template", [TEMPLATE_V3, TEMPLATE_V31], ids=["v3-0324", "v3.1"])
def test_auto_streams_content_then_the_calls_as_the_whole_answer(ckpt, template):
    fmt = tool_format(template)
    content = "Sure, let me check both."
    for kind, tok, eos in _tokenizers(ckpt):
        script = tok.encode_ids(content + fmt.render(CALLS), add_special_tokens=False) + ([eos] if eos else [])
        # the markers as single tokens, or spelt out
        assert len(set(marker_ids(tok, fmt).values()) & set(script)) == (5 if kind == "markers" else 0)
        limits = Limits(vocab_size=1 << 20, max_seq_len=4096, block_size=16, capacity=256, max_queue=8)
        with _serving(_Scripted(limits, script), tok, template) as (api, url):
            assert api.tool_format is fmt
            body = dict(model="tiny-test", messages=ASK, tools=TOOLS, max_tokens=len(script))
            for parallel in (True, False):
                want = CALLS if parallel else CALLS[:1]
                ask = {**body, "parallel_tool_calls": parallel}
                whole = httpx.post(url + "/v1/chat/completions", json=ask, timeout=60).json()["choices"][0]
                assert whole["finish_reason"] == "tool_calls" and whole["message"]["content"] == content, kind
                calls = whole["message"]["tool_calls"]
                assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == want
                assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
                # the stream: the role, content deltas (one a token), one chunk with every call, then the end in a
                # chunk of its own (as OpenAI's: the SDK's stream helper closes the calls' arguments on it)
                chunks = [ch["choices"][0] for ch in _sse_chunks(url, ask)]
                assert chunks[0]["delta"] == {"role": "assistant", "content": ""}
                *deltas, called, last = chunks[1:]
                assert "".join(d["delta"].get("content", "") for d in deltas) == content
                assert sum("content" in d["delta"] for d in deltas) > 3  # streamed as it came, not at the end
                assert all(d["finish_reason"] is None and "tool_calls" not in d["delta"] for d in deltas)
                assert last["finish_reason"] == "tool_calls" and last["delta"] == {}
                assert called["finish_reason"] is None and "content" not in called["delta"]
                streamed = called["delta"]["tool_calls"]
                assert [c["index"] for c in streamed] == list(range(len(want)))
                assert ([{k: c[k] for k in ("type", "function")} for c in streamed]
                        == [{k: c[k] for k in ("type", "function")} for c in calls])
            # the block cut by a limit: its whole calls, finish "length" (the answer is incomplete)
            r = httpx.post(url + "/v1/chat/completions", json={**body, "max_tokens": len(script) - 2},
                           timeout=60).json()["choices"][0]
            assert r["finish_reason"] == "length" and r["message"]["content"] == content
            assert [(c["function"]["name"], c["function"]["arguments"]) for c in r["message"]["tool_calls"]] == CALLS
            # the other format's template: the block is no call of its own format, served as content
            other = F31 if fmt is F3 else F3
            api.tool_format = other
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
            assert r["finish_reason"] == "stop" and "tool_calls" not in r["message"]
            assert r["message"]["content"].startswith(content)
