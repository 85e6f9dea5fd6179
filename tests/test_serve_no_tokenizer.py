"""An engine started without a tokenizer (``Engine(model, cfg)``: it masks no logits with a grammar) behind an API that
has one: a request that needs a grammar (``response_format`` json_object / json_schema on either route,
``tool_choice`` "required" or a named function, a ``strict`` function under "auto"), streamed or not, answers 400
naming its field in one line, before the engine hears of it; it never answers 500. What the HTTP side does with its
own tokenizer needs nothing of the engine's and is served (200): ``response_format`` text, tools under "auto" and
"none", stop strings, ``chat_template_kwargs``, the reasoning parser, logprobs, echo."""


import openai
import pytest
import torch
from served import EngineServer

from flyer.config import preset
from flyer.infer.cli import ByteTokenizer
from flyer.model.transformer import Transformer
from flyer.serve.api import Api
from flyer.serve.engine import Engine, EngineConfig

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
    "a": {"type": "integer"}}}}}]
STRICT = [{"type": "function", "function": {**TOOLS[0]["function"], "strict": True}}]  # held to its schema: a grammar
MSG = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "boolean"}}}
LETTERS = {str(t): 100 for t in range(ord("a"), ord("z") + 1)}  # a random model's greedy text in letters


@pytest.fixture(scope="module")
def bare():
    """A random tiny model's engine without a tokenizer, served by an ``Api`` with byte tokens and the deepseek
    reasoning parser on a free loopback port (``served.EngineServer``)."""
    torch.manual_seed(0)
    engine = Engine(Transformer(preset("tiny")).eval(), EngineConfig(
        kv_cache_bytes=64 * 4 * 384 * 2, block_size=4, cache_dtype=torch.float32, prefill_chunk=8))
    assert engine.tokenizer is None
    s = EngineServer(engine, lambda link: Api(link, ByteTokenizer(), "tiny-test", reasoning_parser="deepseek"))
    yield s
    s.close()


def _refused(call, field: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        call()
    assert e.value.status_code == 400 and e.value.param == field, (e.value.status_code, e.value.param)
    message = e.value.body["message"]
    assert message.startswith(f"{field}: ") and "tokenizer" in message and "\n" not in message, message


def test_grammar_requests_answer_400_naming_the_field(bare):
    c = bare.client()
    for stream in (False, True):
        for fmt in (SCHEMA, {"type": "json_object"}):
            _refused(lambda: c.chat.completions.create(model="tiny-test", messages=MSG, max_tokens=4, stream=stream,
                                                       response_format=fmt), "response_format")
            _refused(lambda: c.completions.create(model="tiny-test", prompt="x", max_tokens=4, stream=stream,
                                                  extra_body={"response_format": fmt}), "response_format")
        for choice in ("required", {"type": "function", "function": {"name": "f"}}):
            _refused(lambda: c.chat.completions.create(model="tiny-test", messages=MSG, max_tokens=4, stream=stream,
                                                       tools=TOOLS, tool_choice=choice), "tool_choice")
        _refused(lambda: c.chat.completions.create(model="tiny-test", messages=MSG, max_tokens=4, stream=stream,
                                                   tools=STRICT), "tools")
    refused = bare.api.metrics.rejected
    assert refused.labels("400")._value.get() == 14 and refused.labels("500")._value.get() == 0
    assert bare.api.engine.last_sent == -1  # refused before any was sent to the engine


def test_what_the_api_does_with_its_own_tokenizer_is_served(bare):
    c = bare.client()
    kw = dict(model="tiny-test", messages=MSG, max_tokens=4, temperature=0, logit_bias=LETTERS)
    r = c.chat.completions.create(response_format={"type": "text"}, **kw)
    assert r.choices[0].finish_reason == "length"
    for choice in ("auto", "none"):
        r = c.chat.completions.create(tools=TOOLS, tool_choice=choice, **kw)
        assert r.choices[0].finish_reason == "length" and not r.choices[0].message.tool_calls
    free = c.chat.completions.create(**kw).choices[0].message.content
    assert len(free) == 4
    cut = c.chat.completions.create(stop=[free[2:]], **kw).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == free[:free.find(free[2:])]
    r = c.chat.completions.create(extra_body={"chat_template_kwargs": {"thinking": True}}, logprobs=True,
                                  top_logprobs=2, **kw)
    assert len(r.choices[0].logprobs.content) == 4
    r = c.completions.create(model="tiny-test", prompt="ab", max_tokens=3, temperature=0, echo=True, logprobs=1)
    assert r.choices[0].text.startswith("ab") and len(r.choices[0].logprobs.tokens) == 5
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(stream=True, **kw)
                       if ch.choices)
    assert streamed == free
    assert bare.api.metrics.rejected.labels("500")._value.get() == 0
