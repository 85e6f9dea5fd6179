"""``flyer serve`` on a DeepSeek-V3.2 checkpoint without a chat template (as the release ships it): prompts from
DeepSeek-V3.2's encoding (``flyer.data.deepseek_encoding``), tool calls in DSML (``flyer.serve.dsml``).

A tiny random V3.2 directory (model_type deepseek_v32; a byte-level BPE holding DeepSeek's turn tokens as added
special tokens; no template): the served prompt is the encoder's text, thinking mode through
chat_template_kwargs; through the openai client, tool_choice "required" and a named function give parsed calls
whose arguments validate against the tool's schema, streamed or not; the answer's calls sent back with the tool
results render in DSML in the next prompt. With an engine stand-in writing a scripted DSML answer (V3.2's, and
V4's ``tool_calls`` block under V4's encoding): "auto" parses it (content, then the calls; a stream's content
deltas then one chunk of calls), a block cut by a limit is content; with the reasoning parser, thinking mode's
output splits at </think> and chat mode's is all content."""

import json

import httpx
import pytest
from hf_models import build
from served import EngineServer, serving
from test_serve_tools import SCHEMA, TOOLS, _check_calls, _stream_calls, _stream_mismatches, prefix_cases
from test_serve_tools_v3 import _Scripted, _serving, _sse_chunks
from transformers import AddedToken, PreTrainedTokenizerFast

from flyer.data.chat_template import read_chat_template
from flyer.data.deepseek_encoding import ASSISTANT, BOS, ENCODINGS, EOS, END_THINK, THINK, USER, encode_v32
from flyer.interop.hf import load_hf
from flyer.interop.hf_tokenizer import load_tokenizer
from flyer.serve.api import Api
from flyer.serve.dsml import DSML_V4, DSML_V32
from flyer.serve.engine import Engine, EngineConfig
from flyer.serve.request import Limits
from flyer.serve.schema import ChatBody

ASK = [{"role": "user", "content": "hello world"}]
TURN_TOKENS = [BOS, EOS, USER, ASSISTANT, THINK, END_THINK]
CALLS = [("get_weather", {"city": "oslo", "celsius": True, "days": 2}), ("set_light", {"on": False, "level": 3})]
CALLS_TEXT = ('\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="get_weather">\n'
              '<｜DSML｜parameter name="city" string="true">oslo</｜DSML｜parameter>\n'
              '<｜DSML｜parameter name="celsius" string="false">true</｜DSML｜parameter>\n'
              '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
              '<｜DSML｜invoke name="set_light">\n'
              '<｜DSML｜parameter name="on" string="false">false</｜DSML｜parameter>\n'
              '<｜DSML｜parameter name="level" string="false">3</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
              '</｜DSML｜function_calls>')


def v32_checkpoint(path):
    """A random tiny DeepSeek-V3.2 directory at ``path`` without a chat template, its tokenizer holding
    ``TURN_TOKENS`` as added special tokens (BOS and EOS DeepSeek's), context 4096."""
    build("v32", path)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v32"
    (path / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 4096}))  # the tools' prompt
    hf = PreTrainedTokenizerFast.from_pretrained(path)
    hf.add_tokens([AddedToken(t, special=True, normalized=False) for t in TURN_TOKENS], special_tokens=True)
    hf.bos_token, hf.eos_token = BOS, EOS
    hf.save_pretrained(path)
    assert "chat_template" not in json.loads((path / "tokenizer_config.json").read_text())
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return v32_checkpoint(tmp_path_factory.mktemp("v32") / "v32")


def v32_server(ckpt) -> EngineServer:
    """A server of the V3.2 directory ``ckpt`` (its release's encoding), its tokenizer as ``tok``."""
    model, _, tok = load_hf(ckpt)
    assert model.cfg.vocab_size > max(tok.tok.token_to_id(t) for t in TURN_TOKENS)
    s = EngineServer(Engine(model, EngineConfig(kv_cache_bytes=1 << 25, block_size=16), tokenizer=tok),
                     lambda link: Api(link, tok, "tiny-test", chat_template=read_chat_template(str(ckpt))))
    s.tok = tok
    return s


@pytest.fixture(scope="module")
def served(ckpt):
    s = v32_server(ckpt)
    yield s
    s.close()


def _tools() -> list[dict]:
    return [ChatBody(model="m", messages=ASK, tools=TOOLS).tools[k].model_dump(exclude_none=True)
            for k in range(len(TOOLS))]


def test_the_prompt_is_the_encoders(served):
    api = served.api
    assert api.tool_format is DSML_V32
    for kwargs, opens in ((None, END_THINK), ({"thinking": False}, END_THINK), ({"thinking": True}, THINK)):
        body = ChatBody(model="tiny-test", messages=ASK, tools=TOOLS, chat_template_kwargs=kwargs)
        want = encode_v32(ASK, _tools(), thinking=bool(kwargs and kwargs["thinking"]))
        assert api._chat_text(body) == want and want.endswith(f"{USER}hello world{ASSISTANT}{opens}")
        ids = api._chat_prompt(body)
        assert ids == served.tok.encode_ids(want, add_special_tokens=False)
        assert {served.tok.tok.token_to_id(t) for t in (BOS, USER, ASSISTANT, opens)} <= set(ids)  # one token each
    r = httpx.post(served.url + "/v1/chat/completions", timeout=60, json=dict(
        model="tiny-test", messages=ASK, chat_template_kwargs={"thinking": "yes"}, max_tokens=1))
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"


def test_required_and_named_calls_parse_and_validate_and_round_trip(served):
    c = served.client()
    kw = dict(model="tiny-test", messages=ASK, tools=TOOLS, max_tokens=700, parallel_tool_calls=False)
    for ch in c.chat.completions.create(tool_choice="required", temperature=1.0, seed=3, n=2, **kw).choices:
        assert ch.message.content is None
        _check_calls(ch, set(SCHEMA), single=True)
    named = dict(tool_choice={"type": "function", "function": {"name": "set_light"}}, temperature=1.0, seed=7, **kw)
    forced = c.chat.completions.create(**named).choices[0]
    whole = _check_calls(forced, {"set_light"}, single=True)
    assert _stream_calls(c, **named) == (whole, "tool_calls", "")
    # the answer's calls and the tool's result, sent back: DSML in the next prompt, the result after it
    forced = forced.message
    (call,) = forced.tool_calls
    args = json.loads(call.function.arguments)
    follow = ASK + [forced.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": "done"}]
    text = served.api._chat_text(ChatBody(model="tiny-test", messages=follow, tools=TOOLS))
    params = "\n".join(f'<｜DSML｜parameter name="{k}" string="false">{json.dumps(v)}</｜DSML｜parameter>'
                       for k, v in args.items())
    assert text.endswith(f'{ASSISTANT}{END_THINK}\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="set_light">\n'
                         f'{params}\n</｜DSML｜invoke>\n</｜DSML｜function_calls>{EOS}\n\n<function_results>\n'
                         f'<result>done</result>\n</function_results>\n\n{END_THINK}')
    r = c.chat.completions.create(model="tiny-test", messages=follow, tools=TOOLS, max_tokens=1)
    assert r.usage.prompt_tokens == len(served.tok.encode_ids(text, add_special_tokens=False))


LIMITS = Limits(vocab_size=1 << 20, max_seq_len=8192, block_size=16, capacity=512, max_queue=8)


def _script(ckpt, text: str) -> tuple:
    """(the checkpoint's tokenizer, ``text``'s ids then EOS: what the engine stand-in writes)."""
    tok = load_tokenizer(ckpt)
    return tok, tok.encode_ids(text, add_special_tokens=False) + [tok.eos_id()]


@pytest.mark.parametrize("name, fmt", [("deepseek_v32", DSML_V32), ("deepseek_v4", DSML_V4)])
def test_auto_parses_a_dsml_answer_and_streams_content_first(ckpt, name, fmt):
    content, calls_text = "Sure, let me check both.", CALLS_TEXT.replace("function_calls", fmt.block)
    tok, script = _script(ckpt, content + calls_text)
    with _serving(_Scripted(LIMITS, script), tok, ENCODINGS[name]) as (api, url):
        assert api.tool_format is fmt
        body = dict(model="tiny-test", messages=ASK, tools=TOOLS, max_tokens=len(script))
        want = [(n, json.dumps(a)) for n, a in CALLS]
        for parallel in (True, False):
            ask = {**body, "parallel_tool_calls": parallel}
            whole = httpx.post(url + "/v1/chat/completions", json=ask, timeout=60).json()["choices"][0]
            assert whole["finish_reason"] == "tool_calls" and whole["message"]["content"] == content
            calls = whole["message"]["tool_calls"]
            assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == want[:2 if parallel else 1]
            chunks = [ch["choices"][0] for ch in _sse_chunks(url, ask)]
            *deltas, called, last = chunks[1:]  # the calls, then the finish in a chunk of its own (as OpenAI's)
            assert "".join(d["delta"].get("content", "") for d in deltas) == content
            assert sum("content" in d["delta"] for d in deltas) > 3  # streamed as it came
            assert last["finish_reason"] == "tool_calls" and last["delta"] == {} and called["finish_reason"] is None
            assert [c["function"] for c in called["delta"]["tool_calls"]] == [c["function"] for c in calls]
        # cut by max_tokens: the content and the calls the cut left whole, the cut one dropped, finish "length"
        in_second = calls_text.index('name="level"')  # the second call's last parameter
        for n, kept in ((len(script) - 4, want), (len(tok.encode_ids(content + calls_text[:in_second],
                                                                     add_special_tokens=False)), want[:1])):
            r = httpx.post(url + "/v1/chat/completions", json={**body, "max_tokens": n}, timeout=60).json()
            r = r["choices"][0]
            assert r["finish_reason"] == "length" and r["message"]["content"] == content
            assert [(c["function"]["name"], c["function"]["arguments"]) for c in r["message"]["tool_calls"]] == kept
            *deltas, called, last = [ch["choices"][0] for ch in _sse_chunks(url, {**body, "max_tokens": n})][1:]
            assert "".join(d["delta"].get("content", "") for d in deltas) == content
            assert last["finish_reason"] == "length" and last["delta"] == {}
            assert [c["function"] for c in called["delta"]["tool_calls"]] == [c["function"] for c in
                                                                             r["message"]["tool_calls"]]
        none = httpx.post(url + "/v1/chat/completions", json={**body, "tool_choice": "none"}, timeout=60).json()
        assert none["choices"][0]["message"]["content"] == content + calls_text


def test_thinking_mode_reasoning_then_calls(ckpt):
    """The reasoning parser: thinking mode's prompt ends with <think>, so the output is reasoning up to </think>;
    chat mode's ends with </think>, and the same output is all content."""
    tok, script = _script(ckpt, "weigh it" + END_THINK + "Here." + CALLS_TEXT)
    api = Api(_Scripted(LIMITS, script), tok, "tiny-test", chat_template=ENCODINGS["deepseek_v32"],
              reasoning_parser="deepseek")
    with serving(api) as url:
        body = dict(model="tiny-test", messages=ASK, tools=TOOLS, max_tokens=len(script))
        m = httpx.post(url + "/v1/chat/completions", timeout=60,
                       json={**body, "chat_template_kwargs": {"thinking": True}}).json()["choices"][0]["message"]
        assert m["reasoning_content"] == "weigh it" and m["content"] == "Here."
        assert [c["function"]["name"] for c in m["tool_calls"]] == ["get_weather", "set_light"]
        m = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]
        assert m.get("reasoning_content") is None and m["content"].startswith("weigh it")


@pytest.mark.parametrize("thinking", [False, True], ids=["chat", "thinking"])
def test_streamed_content_is_the_whole_answers_around_the_calls(ckpt, thinking):
    """Each prefix before a DSML block (whose open holds a blank line: blank text before it is content too, null as
    a whole when blank) and before no block, after reasoning in thinking mode (the reasoning parser): the whole
    answer's content is the text before the block's open, and the stream's content deltas join to exactly it."""
    tok = load_tokenizer(ckpt)
    think = "weigh it" + END_THINK if thinking else ""
    cases = prefix_cases(CALLS_TEXT, [(n, json.dumps(a)) for n, a in CALLS], think)
    engine = _Scripted(LIMITS, [])
    api = Api(engine, tok, "tiny-test", chat_template=ENCODINGS["deepseek_v32"], reasoning_parser="deepseek")
    with serving(api) as url:
        wrong = _stream_mismatches(url, engine, tok, [tok.eos_id()], cases, model="tiny-test", messages=ASK,
                                   tools=TOOLS, extra_body={"chat_template_kwargs": {"thinking": thinking}})
    assert not wrong, "\n".join(wrong)
