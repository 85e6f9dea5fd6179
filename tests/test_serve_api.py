"""``flyer serve`` over HTTP: the official ``openai`` client against a server on a free loopback
port started inside the test; greedy text == ``generate`` on each prompt alone under concurrent
streaming and non-streaming requests; chat templates as transformers renders them; OpenAI-shaped
errors with their statuses (raw HTTP); cancellation on disconnect; the CLI's ready line and drain."""

import http.client
import json
import re
import threading
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
from child_env import child_env
from hf_models import make_tokenizer
from served import EngineServer, gone_mid_request
from trained import counting_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer

from flyer.cli import main
from flyer.config import preset
from flyer.data.tokenizer import train_bpe
from flyer.errors import FieldError
from flyer.infer import GenerationConfig, generate
from flyer.infer.cli import ByteTokenizer
from flyer.model.counts import param_counts
from flyer.model.transformer import Transformer
from flyer.interop.hf import TextTokenizer, load_tokenizer
from flyer.data.chat_template import chat_renderer
from flyer.serve.api import Api, ChatBody
from flyer.serve.choice import Choice
from flyer.serve.body_limit import MAX_BODY_BYTES
from flyer.data.chat_template import read_chat_template
from flyer.serve.cli import bind, http_url, open_warning
from flyer.serve.engine import Engine, EngineConfig, TokenEvent
from flyer.train.checkpoint import save_checkpoint

V = 64
ROOT = Path(__file__).resolve().parents[1]




class _Running(EngineServer):
    """A tiny engine with byte tokens and its API on 127.0.0.1:<free port> (``served.EngineServer``)."""

    def __init__(self, model, api_key=None, start_engine=True, max_body_bytes=MAX_BODY_BYTES, api_tokenizer=None,
                 **engine_over):
        cfg = dict(kv_cache_bytes=64 * 4 * 384 * 2, block_size=4, cache_dtype=torch.float32, prefill_chunk=8)
        super().__init__(Engine(model, EngineConfig(**{**cfg, **engine_over}), tokenizer=ByteTokenizer()),
                         lambda link: Api(link, api_tokenizer or ByteTokenizer(), "tiny-test", api_key), start_engine,
                         max_body_bytes=max_body_bytes)


@pytest.fixture(scope="module")
def model():
    return counting_model(V)


@pytest.fixture(scope="module")
def served(model):
    s = _Running(model)
    yield s
    s.close()


@pytest.fixture(scope="module")
def served_bytes():
    """Random weights with a vocabulary that holds every byte (text prompts, chat)."""
    torch.manual_seed(0)
    s = _Running(Transformer(preset("tiny")).eval(), kv_cache_bytes=64 * 4 * 384 * 2)
    yield s
    s.close()


def _prog(start, step, n):
    return [(start + step * i) % V for i in range(n)]


def _alone(model, prompt, n):
    return generate(model, [prompt], GenerationConfig(max_new_tokens=n, cache_dtype=torch.float32)).tokens[0]


def test_health_and_models(served):
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}
    client = served.client()
    assert [m.id for m in client.models.list().data] == ["tiny-test"]
    assert client.models.retrieve("tiny-test").model_dump() == client.models.list().data[0].model_dump()
    with pytest.raises(openai.NotFoundError, match="`gpt-4o` does not exist") as e:
        client.models.retrieve("gpt-4o")
    assert e.value.code == "model_not_found"


def test_every_answer_names_its_request(served):
    """``x-request-id`` on every answer, as OpenAI's API sends it (the official client's ``_request_id``): a new
    ``req_`` id per request, or the client's own ``X-Request-Id`` echoed; on a stream, an error and ``/health`` too;
    an unusable one sent (too long, a space) is replaced, never echoed."""
    c = served.client()
    a, b = (c.completions.create(model="tiny-test", prompt=[1, 2, 3], max_tokens=2) for _ in range(2))
    assert re.fullmatch(r"req_[0-9a-f]{32}", a._request_id) and a._request_id != b._request_id
    mine = c.completions.create(model="tiny-test", prompt=[1, 2, 3], max_tokens=2,
                                extra_headers={"X-Request-Id": "trace-42/a"})
    assert mine._request_id == "trace-42/a"
    with c.completions.with_streaming_response.create(model="tiny-test", prompt=[1, 2], max_tokens=2,
                                                      stream=True) as r:
        assert r.headers["x-request-id"].startswith("req_") and list(r.iter_lines())
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="nope", prompt=[1], max_tokens=1, extra_headers={"X-Request-Id": "t1"})
    assert e.value.request_id == "t1"
    for sent in ("x" * 129, "a b", ""):
        got = httpx.get(served.url + "/health", headers={"X-Request-Id": sent}).headers["x-request-id"]
        assert re.fullmatch(r"req_[0-9a-f]{32}", got), sent


@pytest.fixture(scope="module")
def served_text(tmp_path_factory):
    """Random weights with a Hugging Face byte-level BPE on the API's side (``hf_models.make_tokenizer``: a BOS added,
    special ``</s>``, which decoding drops): text prompts as a checkpoint's tokenizer encodes them."""
    path = tmp_path_factory.mktemp("bpe")
    make_tokenizer(path)
    (path / "config.json").write_text("{}")
    torch.manual_seed(0)
    s = _Running(Transformer(preset("tiny")).eval(), api_tokenizer=load_tokenizer(path))
    yield s
    s.close()


@pytest.fixture(scope="module")
def served_fixed(model):
    """``served`` with every step in fixed shapes (``--cuda-graphs on``; on the CPU, run eagerly)."""
    s = _Running(model, cuda_graphs=True)
    yield s
    s.close()


@pytest.mark.parametrize("fixed", [False, True])
def test_concurrent_greedy_completions_equal_generate_alone(request, model, fixed):
    """Concurrent streaming and non-streaming requests through the official client, with a shared prefix: each
    one's tokens are generate's on its prompt alone, with the engine's steps packed or in fixed shapes (what a GPU
    replays from CUDA graphs: ``/metrics`` counts them)."""
    served = request.getfixturevalue("served_fixed" if fixed else "served")
    head = _prog(3, 2, 13)
    prompts = [head + _prog(5, 3, n) for n in (3, 17, 1)] + [_prog(7, 1, n) for n in (1, 30, 6)]
    tok = ByteTokenizer()
    client = served.client()

    def ask(i):
        p = prompts[i]
        if i % 2:  # streaming
            chunks = list(client.completions.create(model="tiny-test", prompt=p, max_tokens=10, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}))
            assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage.prompt_tokens == len(p)
            # as OpenAI's: usage null on every chunk before the usage chunk (asked for), not left out
            assert all("usage" in c.model_fields_set and (c.usage is None) == bool(c.choices) for c in chunks)
            return "".join(c.choices[0].text for c in chunks if c.choices)
        r = client.completions.create(model="tiny-test", prompt=p, max_tokens=10, temperature=0)
        assert r.usage.prompt_tokens == len(p) and r.usage.completion_tokens == 10
        assert r.choices[0].finish_reason == "length"
        return r.choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        texts = list(pool.map(ask, range(len(prompts))))
    assert texts == [tok.decode(_alone(model, p, 10)) for p in prompts]
    # a list of prompts: one choice each, in order
    r = client.completions.create(model="tiny-test", prompt=prompts[:2], max_tokens=10, temperature=0)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == texts[:2]
    assert served.engine.alloc.used == 0
    fixed_steps = re.search(r'^flyer_fixed_shape_steps_total\{how="eager"\} (\S+)$',
                            httpx.get(served.url + "/metrics").text, re.M)
    assert (fixed_steps is not None and float(fixed_steps.group(1)) > 10) == fixed


def test_seed_stop_echo_and_logprobs(served, model):
    client = served.client()
    p = _prog(4, 3, 9)
    kw = dict(model="tiny-test", prompt=p, max_tokens=12, temperature=1.0, seed=5)
    a, b = (client.completions.create(**kw).choices[0].text for _ in range(2))
    assert a == b
    ref = ByteTokenizer().decode(_alone(model, p, 12))
    stop = ref[4:6]
    r = client.completions.create(model="tiny-test", prompt=p, max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].text == ref[:ref.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny-test", prompt=p, max_tokens=12, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == ref[:ref.index(stop)]
    r = client.completions.create(model="tiny-test", prompt=p, max_tokens=2, temperature=0, echo=True, logprobs=3)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(ByteTokenizer().decode(p))
    assert len(lp.tokens) == len(p) + 2 and lp.token_logprobs[0] is None
    with torch.no_grad():
        ref_lp = model(torch.tensor([p])).log_softmax(-1)[0, torch.arange(len(p) - 1), torch.tensor(p[1:])]
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:len(p)]), ref_lp, atol=1e-4, rtol=0)
    assert all(len(t) <= 3 for t in lp.top_logprobs[1:])


def test_echo_with_max_tokens_0_scores_the_prompt_alone(served, model):
    """``echo`` with ``max_tokens: 0``, as evaluation harnesses score a text (lm-eval's loglikelihood, OpenAI's
    legacy API, vLLM): the prompt back with its logprobs and no token; without echo, 0 is refused naming it."""
    client = served.client()
    p = _prog(5, 7, 11)
    with torch.no_grad():
        ref_lp = model(torch.tensor([p])).log_softmax(-1)[0, torch.arange(len(p) - 1), torch.tensor(p[1:])]
    kw = dict(model="tiny-test", prompt=p, max_tokens=0, temperature=0, echo=True)
    r = client.completions.create(**kw, logprobs=2, n=2)
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(p)
    for c in r.choices:
        assert c.text == ByteTokenizer().decode(p) and c.finish_reason == "length"
        assert len(c.logprobs.tokens) == len(p) and c.logprobs.token_logprobs[0] is None
        torch.testing.assert_close(torch.tensor(c.logprobs.token_logprobs[1:]), ref_lp, atol=1e-4, rtol=0)
    chunks = [c for c in client.completions.create(**kw, logprobs=2, stream=True) if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    streamed = chunks[0].choices[0].logprobs.token_logprobs  # with the echoed text, in the first chunk
    assert len(streamed) == len(p) and streamed[0] is None
    torch.testing.assert_close(torch.tensor(streamed[1:]), ref_lp, atol=1e-4, rtol=0)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert client.completions.create(**kw).choices[0].text == r.choices[0].text  # echo alone: no scores asked
    with pytest.raises(openai.BadRequestError, match="0 generates nothing") as e:
        client.completions.create(model="tiny-test", prompt=p, max_tokens=0)
    assert e.value.body["param"] == "max_tokens"


def test_chat_default_template_streaming_and_usage(served_bytes):
    client = served_bytes.client()
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "count"}]
    r = client.chat.completions.create(model="tiny-test", messages=msgs, max_tokens=6, temperature=0)
    rendered = chat_renderer(None)(msgs)
    assert rendered == "<|system|>\nbe brief\n<|user|>\ncount\n<|assistant|>\n"
    assert r.usage.prompt_tokens == len(rendered.encode()) and r.usage.completion_tokens == 6
    assert r.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny-test", messages=msgs, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all("usage" in c.model_fields_set and (c.usage is None) == bool(c.choices) for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    unasked = list(client.chat.completions.create(model="tiny-test", messages=msgs, max_tokens=2, stream=True))
    assert not any("usage" in c.model_fields_set for c in unasked)
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens and chunks[-2].choices[0].finish_reason == "length"
    r = client.chat.completions.create(model="tiny-test", messages=msgs, max_tokens=3, temperature=0,
                                       logprobs=True, top_logprobs=2)
    assert len(r.choices[0].logprobs.content) == 3 and len(r.choices[0].logprobs.content[0].top_logprobs) == 2


def test_chat_template_renders_as_transformers(tmp_path):
    make_tokenizer(tmp_path)
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n"
                "{% elif m['role'] == 'system' %}{{ m['content'] }}\n\n{% else %}Assistant: {{ m['content'] }}"
                "{{ eos_token }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert read_chat_template(tmp_path) == template
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"}]
    hf = AutoTokenizer.from_pretrained(tmp_path)
    expect = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert chat_renderer(template, {"bos_token": "<s>", "eos_token": "</s>"})(msgs) == expect


def _error(resp, status, param=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param:
        assert err["param"] == param
    return err


def test_bad_requests_answer_400_never_500(served, model):
    url = served.url + "/v1/completions"
    ok = dict(model="tiny-test", prompt=[1, 2, 3], max_tokens=2)
    for over, param in ((dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"),
                        (dict(top_p=0), "top_p"), (dict(prompt=[1, 64]), "prompt"), (dict(prompt=[]), "prompt"),
                        (dict(prompt=""), "prompt"), (dict(n=129), "n"), (dict(stop=[""]), "stop"),
                        (dict(logprobs=99), "logprobs"), (dict(max_tokens=model.cfg.max_seq_len), "max_tokens"),
                        (dict(temperature="hot"), "temperature"), (dict(prompt={"a": 1}), None),
                        # bounded: each streamed token checks every stop string on the event loop
                        (dict(stop=["x"] * 17), "stop"), (dict(stop="x" * 257), "stop"),
                        (dict(stop_token_ids=[1] * 1025), "stop_token_ids")):
        _error(httpx.post(url, json={**ok, **over}), 400, param)
    _error(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400)
    _error(httpx.post(url, json={"prompt": "x"}), 400, "model")
    _error(httpx.post(served.url + "/v1/chat/completions", json={"model": "tiny-test", "messages": []}), 400)
    _error(httpx.post(served.url + "/v1/chat/completions",
                      json={"model": "tiny-test", "messages": [{"role": "wizard", "content": "x"}]}), 400)
    _error(httpx.post(url, json={**ok, "stream_options": {"include_usage": True}}), 400, "stream_options")
    _error(httpx.post(served.url + "/v1/chat/completions", json={
        "model": "tiny-test", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}), 400, "top_logprobs")
    _error(httpx.post(url, json={**ok, "model": "gpt-4"}), 404, "model")
    _error(httpx.get(served.url + "/v1/nothing"), 404)
    with pytest.raises(openai.BadRequestError):
        served.client().completions.create(model="tiny-test", prompt=[1, 2], max_tokens=-1)
    assert 'flyer_rejected_requests_total{status="400"}' in httpx.get(served.url + "/metrics").text


def test_a_field_the_routes_do_not_implement_answers_400_naming_it(served_bytes):
    """A field neither route defines is refused unless null, as OpenAI refuses an unrecognized argument (a typo, or
    an option flyer lacks, answered 200 as if it were not there); the fields that change nothing are taken."""
    url, chat_url = served_bytes.url + "/v1/completions", served_bytes.url + "/v1/chat/completions"
    ok = dict(model="tiny-test", prompt=[1, 2, 3], max_tokens=2)
    chat = dict(model="tiny-test", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    for where, body, param in ((url, {**ok, "max_token": 3}, "max_token"),
                               (url, {**ok, "prompt_logprobs": 1}, "prompt_logprobs"),
                               (url, {**ok, "add_special_tokens": False}, "add_special_tokens"),
                               (chat_url, {**chat, "temprature": 0}, "temprature"),
                               (chat_url, {**chat, "echo": True}, "echo"),  # vLLM's: the last message echoed
                               (chat_url, {**chat, "add_generation_prompt": False}, "add_generation_prompt"),
                               (chat_url, {**chat, "chat_template": "{{ 1 }}"}, "chat_template"),
                               (chat_url, {**chat, "verbosity": "low"}, "verbosity"),
                               (chat_url, {**chat, "modalities": ["text", "audio"]}, "modalities")):
        _error(httpx.post(where, json=body), 400, param)
    taken = {"user": "u", "metadata": {"k": "v"}, "store": False, "service_tier": "auto", "prompt_cache_key": "p",
             "safety_identifier": "s", "verbosity": None}
    assert httpx.post(url, json={**ok, **taken}).status_code == 200
    took = httpx.post(chat_url, json={**chat, **taken, "echo": False, "add_generation_prompt": True,
                                      "modalities": ["text"]})
    assert took.status_code == 200, took.text


def test_a_body_that_is_no_json_object_says_how_to_send_one(served):
    url, ok = served.url + "/v1/completions", json.dumps(dict(model="tiny-test", prompt=[1, 2], max_tokens=1))
    for ctype in ("application/x-www-form-urlencoded", None):
        err = _error(httpx.post(url, content=ok, headers={"content-type": ctype} if ctype else {}), 400)
        assert "sent as Content-Type: application/json" in err["message"], err
        assert (ctype or "no Content-Type") in err["message"]
    for body in (b"", b"[1, 2]"):
        err = _error(httpx.post(url, content=body, headers={"content-type": "application/json"}), 400)
        assert err["message"] in ("the request body must be a JSON object", "the request body is not valid JSON")
    assert httpx.post(url, content=ok, headers={"content-type": "application/json; charset=utf-8"}).status_code == 200


def test_a_lone_surrogate_answers_400_naming_its_field_on_the_same_connection(served):
    """A lone UTF-16 surrogate ("\\ud800": valid JSON) is no text a tokenizer encodes: 400 naming the field (it was a
    500, after which uvicorn closed the connection under the client's next request), the connection kept."""
    url = httpx.URL(served.url)
    conn = http.client.HTTPConnection(url.host, url.port, timeout=60)
    ok = json.dumps(dict(model="tiny-test", prompt=[1, 2], max_tokens=1))
    try:
        for path, body, param in (
                ("/v1/completions", '{"prompt": "a\\ud800b"}', "prompt"),
                ("/v1/completions", '{"prompt": ["ok", "\\udfff"]}', "prompt[1]"),
                ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\udfffb"}]}',
                 "messages[0].content"),
                ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": '
                                         '"\\ud800"}]}]}', "messages[0].content[0].text")):
            conn.request("POST", path, '{"model": "tiny-test", "max_tokens": 1, ' + body[1:],
                         {"content-type": "application/json"})
            sock, r = conn.sock, conn.getresponse()
            err = json.loads(r.read())["error"]
            assert (r.status, err["param"], err["type"]) == (400, param, "invalid_request_error"), err
            assert "lone UTF-16 surrogate" in err["message"]
            conn.request("POST", "/v1/completions", ok, {"content-type": "application/json"})
            r = conn.getresponse()
            assert r.status == 200 and json.loads(r.read())["usage"]["completion_tokens"] == 1
            assert conn.sock is sock  # the same connection
    finally:
        conn.close()


def test_past_the_context_names_the_prompt_or_the_max_tokens_sent(served):
    """A prompt that leaves no room for a token names the prompt's field (chat: ``messages``, with or without
    max_tokens; it named a max_tokens of 1 the client never sent); one that fits names the max_tokens past the room
    (vLLM's split); both with OpenAI's code ``context_length_exceeded``."""
    room, url = served.engine.limits.room, served.url
    ids = [_prog(3, 1, room), _prog(3, 1, room - 4)]
    for path, body, param in (
            ("/v1/completions", dict(prompt=ids[0], max_tokens=1), "prompt"),
            ("/v1/completions", dict(prompt=[[1], ids[0]]), "prompt"),
            ("/v1/completions", dict(prompt=ids[1], max_tokens=5), "max_tokens"),
            ("/v1/completions", dict(prompt=ids[1]), "max_tokens"),  # its default, 16
            ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "a" * room}]), "messages"),
            ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "a" * room}], max_tokens=2),
             "messages"),
            ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "a"}], max_tokens=room), "max_tokens"),
            ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "a"}], max_completion_tokens=room),
             "max_completion_tokens")):
        err = _error(httpx.post(url + path, json={"model": "tiny-test", **body}), 400, param)
        assert err["code"] == "context_length_exceeded" and str(room) in err["message"], err
    assert "(unset: its default)" in _error(httpx.post(url + "/v1/completions", json={
        "model": "tiny-test", "prompt": ids[1]}), 400)["message"]


@pytest.mark.parametrize("body,param", [
    (dict(prompt=None), "prompt"), (dict(prompt=[[1, "a"]]), "prompt[0][1]"),
    (dict(prompt=[1], stop=["a", 3]), "stop[1]"), (dict(prompt=[1], stop=5), "stop"),
    (dict(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    (dict(messages=[{"role": "user", "content": "x"}], tool_choice={"type": "function"}), "tool_choice.function")])
def test_a_union_fields_error_names_the_field_not_the_union_member(served, body, param):
    """pydantic names a union's members in an error's location (``prompt.str``, ``stop.list[str]``): the param is the
    field's path in the body, the deepest of the union's errors."""
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    err = _error(httpx.post(served.url + path, json={"model": "tiny-test", **body}), 400, param)
    assert err["message"].startswith(param + ": ")


def test_an_explicit_null_is_the_fields_default(served):
    """OpenAI types its optional fields "X or null", and clients send unset options as null (LangChain, LiteLLM): a
    null is the field's default, the same answer as without it (they answered 400 "Input should be a valid
    number"); completions' max_tokens, whose null is the rest of the context, keeps it."""
    base = {"model": "tiny-test", "prompt": [1, 2, 3], "max_tokens": 4, "seed": 5}  # sampled (temperature 1)
    nulls = ("temperature", "top_p", "n", "stream", "frequency_penalty", "presence_penalty", "stop", "logit_bias",
             "top_k", "min_p", "repetition_penalty", "echo", "logprobs", "suffix", "best_of")
    want = httpx.post(served.url + "/v1/completions", json=base)
    nulled = httpx.post(served.url + "/v1/completions", json={**base, **{f: None for f in nulls}})
    assert want.status_code == nulled.status_code == 200, nulled.text
    assert nulled.json()["choices"] == want.json()["choices"]
    room = httpx.post(served.url + "/v1/completions", json={**base, "max_tokens": None, "temperature": 0}).json()
    assert room["usage"]["completion_tokens"] > 16 or room["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", dict(prompt=[1], max_tokens="2"), "max_tokens"),
    ("/v1/completions", dict(prompt=[1], logprobs=True), "logprobs"),
    ("/v1/completions", dict(prompt=[1], n=2.0), "n"), ("/v1/completions", dict(prompt=[1], echo=1), "echo"),
    ("/v1/completions", dict(prompt=[1], temperature="0"), "temperature"),
    ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "a"}], logprobs="true"), "logprobs"),
    ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "a"}], stream=0), "stream"),
    ("/v1/responses", dict(input="a", max_output_tokens="4"), "max_output_tokens"),
    ("/v1/chat/completions", dict(messages=[{"role": "user"}]), "messages[0].content"),
    ("/v1/chat/completions", dict(messages=[{"role": "system", "content": None}, {"role": "user", "content": "a"}]),
     "messages[0].content"),
    ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "a"}],  # inside an object too
                                  tools=[{"type": "function", "function": {"name": "f", "strict": "yes"}}]),
     "tools[0].function.strict"),
    ("/v1/responses", dict(input="a", tools=[{"type": "function", "name": "f", "strict": "1"}]), "tools[0].strict")])
def test_a_value_of_the_wrong_type_is_refused_not_converted(served, path, body, param):
    """As OpenAI's API answers "Invalid type for 'max_tokens': expected an integer, but got a string": a string, a
    boolean or a decimal where an integer goes (and the reverse) answers 400 naming the field; they were converted
    ("2" generated two tokens, true was 1 logprob). An integer is still a number (temperature 0). A message but an
    assistant's needs content, as OpenAI's API requires."""
    _error(httpx.post(served.url + path, json={"model": "tiny-test", **body}), 400, param)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_a_number_that_is_not_finite_is_named_so(served, value):
    """Python's JSON reads NaN and the infinities: a temperature of NaN answered "should be less than or equal to
    2", true of no number and misleading; it is "a finite number"."""
    body = '{"model": "tiny-test", "prompt": [1], "temperature": %s}' % value
    err = _error(httpx.post(served.url + "/v1/completions", content=body,
                            headers={"content-type": "application/json"}), 400, "temperature")
    assert "finite number" in err["message"], err


def test_a_stop_string_finish_counts_as_stop_not_cancelled(served, model, monkeypatch):
    """The HTTP side ends the engine request at a stop string it matched: /metrics counts it under "stop" (it was
    "cancelled", the count of clients gone)."""
    def finished() -> dict[str, float]:
        text = httpx.get(served.url + "/metrics").text
        return {k: float(v) for k, v in re.findall(r'^flyer_requests_total\{finish_reason="(\w+)"\} (\S+)$', text,
                                                   re.M)}

    step = served.engine.step
    monkeypatch.setattr(served.engine, "step", lambda: (time.sleep(0.02), step()))  # the cancel lands before the end
    p = _prog(4, 3, 9)
    ref = ByteTokenizer().decode(_alone(model, p, 40))
    before = finished()
    r = served.client().completions.create(model="tiny-test", prompt=p, max_tokens=40, temperature=0, stop=ref[3:5])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == ref[:ref.index(ref[3:5])]
    for _ in range(100):
        after = finished()
        if after != before:
            break
        time.sleep(0.05)
    assert after.get("stop", 0) == before.get("stop", 0) + 1
    assert after.get("cancelled", 0) == before.get("cancelled", 0)


def test_fields_that_would_change_the_output_are_refused_not_ignored(served):
    """Chat's best_of (OpenAI's chat route has none; completions implement it: tests/test_serve_best_of.py) and
    functions are not implemented: any value but their neutral one (which clients may send) answers 400 naming the
    field (response_format: tests/test_serve_structured.py; tools: tests/test_serve_tools.py; suffix, served with
    FIM tokens and refused without: tests/test_serve_fim.py)."""
    ok = dict(model="tiny-test", prompt=[1, 2, 3], max_tokens=2)
    chat = dict(model="tiny-test", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    for over, param in ((dict(best_of=2), "best_of"), (dict(functions=[{"name": "f", "parameters": {}}]), "functions")):
        err = _error(httpx.post(served.url + "/v1/chat/completions", json={**chat, **over}), 400, param)
        assert "does not implement" in err["message"]
    assert httpx.post(served.url + "/v1/completions", json={**ok, "best_of": 1, "suffix": "", "user": "u"}
                      ).status_code == 200
    ChatBody(**chat, tools=[], response_format={"type": "text"}).check_fields()  # no raise


def test_logit_bias_and_penalties_through_the_openai_client(served):
    """OpenAI's logit_bias (token ids as JSON keys) and penalties reach the engine (its oracle test:
    tests/test_serve_engine.py); out-of-range values answer 400."""
    c = served.client()
    def text(**kw):
        return c.completions.create(model="tiny-test", prompt=_prog(7, 1, 6), max_tokens=6, temperature=0,
                                    **kw).choices[0].text

    assert text(logit_bias={"40": 100}) == chr(40) * 6  # byte tokens
    assert text(logit_bias={"40": 100, "040": -100}) == text()  # one token, one bias: the last
    repeats, penalised = text(logit_bias={"40": 8}), text(logit_bias={"40": 8}, presence_penalty=2.0)
    assert repeats.endswith(chr(40) * 2) and penalised.count(chr(40)) < repeats.count(chr(40))
    url, ok = served.url + "/v1/completions", dict(model="tiny-test", prompt=[1, 2, 3], max_tokens=2)
    for over, param in ((dict(frequency_penalty=2.5), "frequency_penalty"),
                        (dict(presence_penalty=-3), "presence_penalty"),
                        (dict(logit_bias={"x": 1}), "logit_bias"), (dict(logit_bias={"64": 1}), "logit_bias"),
                        (dict(logit_bias={"1": 101}), "logit_bias"),
                        *((dict(logit_bias={k: 1}), "logit_bias") for k in (" 7", "+7", "7_0", "\u0667", "-1", ""))):
        _error(httpx.post(url, json={**ok, **over}), 400, param)


def test_vllms_sampling_fields_reach_the_sampler_and_the_rest_are_refused(served, served_bytes):
    """vLLM's top_k, min_p, repetition_penalty and stop_token_ids are served (their oracles: tests/test_infer.py,
    tests/test_serve_engine.py): top_k 1 or min_p 1 samples the greedy tokens, a stop token id ends the output
    after it; its other generation fields answer 400 naming them at any value that would change the output."""
    def text(s, **kw):
        return s.client().completions.create(model="tiny-test", prompt="The quick brown", max_tokens=12,
                                             **kw).choices[0].text

    greedy = text(served_bytes, temperature=0)
    assert text(served_bytes, temperature=1.0, seed=3) != greedy  # sampling differs here: the fields below matter
    for extra in (dict(top_k=1), dict(min_p=1.0), dict(top_k=1, min_p=0.2, top_p=0.5)):
        assert text(served_bytes, temperature=1.0, seed=3, extra_body=extra) == greedy
    c = served.client().completions.create(model="tiny-test", prompt=_prog(7, 1, 6), max_tokens=8, temperature=0,
                                           extra_body=dict(stop_token_ids=[14]))
    assert (c.choices[0].finish_reason, c.usage.completion_tokens) == ("stop", 2)  # 13, then 14
    def counting(**kw):
        return served.client().completions.create(model="tiny-test", prompt=_prog(7, 1, 6), max_tokens=6,
                                                  temperature=0, logit_bias={"40": 8}, **kw).choices[0].text

    repeats, penalised = counting(), counting(extra_body=dict(repetition_penalty=3.0))
    assert repeats.endswith(chr(40) * 2) and penalised.count(chr(40)) < repeats.count(chr(40))
    url, ok = served.url + "/v1/completions", dict(model="tiny-test", prompt=[1, 2, 3], max_tokens=2)
    for over, param in ((dict(top_k=-2), "top_k"), (dict(min_p=1.5), "min_p"),
                        (dict(repetition_penalty=0), "repetition_penalty"),
                        (dict(stop_token_ids=[V]), "stop_token_ids"), (dict(min_tokens=3), "min_tokens"),
                        (dict(ignore_eos=True), "ignore_eos"), (dict(guided_json={"type": "object"}), "guided_json"),
                        (dict(use_beam_search=True), "use_beam_search")):
        _error(httpx.post(url, json={**ok, **over}), 400, param)
    neutral = dict(top_k=-1, min_p=0.0, repetition_penalty=1.0, min_tokens=0, ignore_eos=False, guided_json=None)
    assert httpx.post(url, json={**ok, **neutral}).json()["choices"][0]["text"] == \
        httpx.post(url, json=ok).json()["choices"][0]["text"]


def test_n_choices_per_prompt(served, served_bytes):
    """n choices per prompt, numbered i n + j as OpenAI numbers them: greedy ones are the one choice's,
    seeded ones reproducible, choice j sampled as a request with seed + j alone; the prompt counted
    once; chat streams each choice's chunks under its index."""
    c = served.client()
    prompts = [_prog(1, 1, 5), _prog(3, 2, 5)]
    one = c.completions.create(model="tiny-test", prompt=prompts, max_tokens=4, temperature=0)
    two = c.completions.create(model="tiny-test", prompt=prompts, max_tokens=4, temperature=0, n=2)
    assert [ch.index for ch in two.choices] == [0, 1, 2, 3]
    assert [ch.text for ch in two.choices] == [one.choices[0].text] * 2 + [one.choices[1].text] * 2
    assert two.usage.prompt_tokens == one.usage.prompt_tokens == 10
    assert two.usage.completion_tokens == 2 * one.usage.completion_tokens
    kw = dict(model="tiny-test", prompt=prompts[0], max_tokens=6, temperature=1.5, seed=7)
    three = [ch.text for ch in c.completions.create(n=3, **kw).choices]
    assert three == [c.completions.create(**{**kw, "seed": 7 + j}).choices[0].text for j in range(3)]
    assert len(set(three)) > 1
    chat = dict(model="tiny-test", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=1.0,
                seed=3, n=2)
    whole = served_bytes.client().chat.completions.create(**chat)
    streamed = ["", ""]
    for chunk in served_bytes.client().chat.completions.create(**chat, stream=True):
        for ch in chunk.choices:
            streamed[ch.index] += ch.delta.content or ""
    assert streamed == [ch.message.content for ch in whole.choices] and len(whole.choices) == 2


def test_api_key_queue_full_and_draining(model):
    s = _Running(model, api_key="sekret", start_engine=False, max_queue=1)
    try:
        url, ok = s.url + "/v1/completions", dict(model="tiny-test", prompt=[1, 2], max_tokens=2)
        _error(httpx.post(url, json=ok), 401)
        _error(httpx.post(url, json={"prompt": 5}), 401)  # the key before the body's validation
        # more choices than the queue holds can never run: 400, where a 429 would have clients retry
        _error(httpx.post(url, json={**ok, "n": 2}, headers={"authorization": "Bearer sekret"}), 400, "n")
        _error(httpx.post(url, json=ok, headers={"authorization": "Bearer wrong"}), 401)
        _error(httpx.post(url, json=ok, headers={"authorization": "Basic sekret"}), 401)
        for spelt in ("bearer sekret", "BEARER  sekret"):  # RFC 9110: the scheme in any case; blanks between
            _error(httpx.post(url, json={**ok, "n": 2}, headers={"authorization": spelt}), 400, "n")  # past the key
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        assert s.client(api_key="sekret").models.list().data[0].id == "tiny-test"
        # the engine hears nothing: one request fills the queue of one
        with httpx.stream("POST", url, json={**ok, "stream": True}, headers={"authorization": "Bearer sekret"}) as r:
            assert r.status_code == 200
            full = httpx.post(url, json=ok, headers={"authorization": "Bearer sekret"})
            _error(full, 429)
            assert full.headers["retry-after"] == "1"
        s.api.draining = True
        _error(httpx.post(url, json=ok, headers={"authorization": "Bearer sekret"}), 503)
        assert httpx.get(s.url + "/health").status_code == 503
    finally:
        s.close()


def test_disconnect_cancels_and_frees_blocks(served):
    with httpx.stream("POST", served.url + "/v1/completions", json=dict(
            model="tiny-test", prompt=_prog(1, 1, 5), max_tokens=200, temperature=0, stream=True), timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    for _ in range(100):  # bounded: the cancel lands within the engine's next steps
        if not served.engine.busy and served.engine.alloc.used == 0:
            break
        time.sleep(0.05)
    assert not served.engine.busy and served.engine.alloc.used == 0
    m = httpx.get(served.url + "/metrics").text
    assert 'flyer_requests_total{finish_reason="cancelled"}' in m and "flyer_cache_blocks_free" in m
    for name in ("flyer_time_to_first_token_seconds_bucket", "flyer_time_per_output_token_seconds_bucket",
                 "flyer_requests_running", "flyer_requests_waiting", "flyer_cache_blocks_used",
                 "flyer_prefix_cache_hit_rate", "flyer_prompt_tokens_total", "flyer_generation_tokens_total",
                 "flyer_spec_draft_tokens_total", "flyer_spec_accepted_tokens_total"):
        assert name in m


def test_cli_serves_a_checkpoint_like_generate_and_drains_on_sigterm(tmp_path, capsys):
    """Weights held in BF16 on both sides (``--weight-dtype bf16``), MTP speculation (two drafts a step) in the server,
    whose on-disk prefix cache ``flyer generate --prefix-cache`` then reads (MTP entries included)."""
    cfg = preset("tiny", vocab_size=300)
    torch.manual_seed(0)
    m = Transformer(cfg)
    tok = train_bpe(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300)
    save_checkpoint(tmp_path / "checkpoints", 5, {"model.safetensors": m.state_dict(), "config.json": cfg.to_dict(),
                                                  "tokenizer.json": json.loads(tok.to_str())})
    env = child_env()
    proc = subprocess.Popen([sys.executable, "-m", "flyer", "serve", "--ckpt", str(tmp_path), "--port", "0",
                             "--cache-dtype", "fp32", "--kv-cache-memory", "4M", "--threads", "1",
                             "--speculative", "mtp", "--draft-tokens", "2", "--weight-dtype", "bf16", "--device", "cpu",
                             "--prefix-cache", str(tmp_path / "prefixes"), "--block-size", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    long = "the lazy dog jumps over the quick brown fox " * 2
    try:
        capsys.readouterr()  # the reference while the server starts (one thread each)
        assert main(["generate", "--ckpt", str(tmp_path), "--prompt", "the quick", "--max-new-tokens", "8",
                     "--cache-dtype", "fp32", "--weight-dtype", "bf16", "--device", "cpu", "--json",
                     "--threads", "1"]) == 0
        ref = json.loads(capsys.readouterr().out)
        line = proc.stdout.readline()  # blocks until the ready line (or exit)
        assert line.startswith("flyer serve: ready on http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split()[4]
        assert httpx.get(url + "/health").status_code == 200
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        name = client.models.list().data[0].id
        r = client.completions.create(model=name, prompt="the quick", max_tokens=8, temperature=0)
        assert r.choices[0].text == ref["text"]
        served = client.completions.create(model=name, prompt=long, max_tokens=8, temperature=0).choices[0].text
        stream = client.completions.create(model=name, prompt="the quick", max_tokens=200, temperature=0,
                                           stream=True)
        chunks = [next(iter(stream))]
        proc.send_signal(signal.SIGTERM)  # drain: the request in flight finishes
        chunks += list(stream)
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")
        assert proc.wait(timeout=60) == 0
        assert "stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert main(["generate", "--ckpt", str(tmp_path), "--prompt", long, "--max-new-tokens", "8", "--cache-dtype",
                 "fp32", "--weight-dtype", "bf16", "--device", "cpu", "--json", "--prefix-cache",
                 str(tmp_path / "prefixes"), "--prefix-block", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"] == served and out["prefix_cache"]["hits"] >= 2


@pytest.mark.parametrize("argv,msg", [
    (["--preset", "tiny", "--kv-cache-memory", "lots"], "--kv-cache-memory: expected a size"),
    (["--preset", "tiny", "--kv-cache-memory", "1k"], "--kv-cache-memory: 1024 bytes hold 0 blocks"),
    (["--preset", "tiny", "--max-batch-size", "0"], "--max-batch-size: must be >= 1"),
    (["--preset", "tiny", "--expert-threads", "0"], "--expert-threads: must be >= 1"),
    (["--preset", "tiny", "--speculative", "mtp", "--draft-tokens", "0"], "--draft-tokens: must be >= 1"),
    (["--preset", "tiny", "--draft-tokens", "3"], "--draft-tokens: 3 drafts need speculative decoding"),
    (["--preset", "tiny", "--port", "70000"], "--port: must be in"),
    (["--preset", "tiny", "--ckpt", "x"], "exactly one"),
    (["--preset", "tiny-v4", "--cuda-graphs", "on", "--block-size", "16", "--kv-cache-memory", "64M"],
     "--cuda-graphs: this model cannot step in fixed shapes: DeepSeek-V4's hybrid attention selects"),
])
def test_cli_user_errors_are_one_line(capsys, argv, msg):
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1


def test_a_cache_larger_than_the_memory_is_refused_in_one_line(capsys, monkeypatch):
    """``--kv-cache-memory`` is allocated at start: more than the memory has beside the model is refused
    naming the flag, before the model loads, instead of a traceback from the allocator or an OOM kill."""
    model = 4 * param_counts(preset("tiny")).total  # built in FP32
    monkeypatch.setattr("flyer.runtime.available_memory", lambda device: model + (64 << 20))

    def engine(*_, **__):  # past the check: the server would start here
        raise FieldError("kv_cache_bytes", "checked")

    monkeypatch.setattr("flyer.serve.cli.Engine", engine)
    assert main(["serve", "--preset", "tiny", "--kv-cache-memory", "64M"]) == 2
    assert "--kv-cache-memory: checked" in capsys.readouterr().err
    assert main(["serve", "--preset", "tiny", "--kv-cache-memory", "65M"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flyer: error: --kv-cache-memory: ") and "\n" not in err, err
    assert "0.1 GiB of cache beside the model's" in err and "needs about" in err, err
    assert main(["serve", "--preset", "tiny", "--kv-cache-memory", "1000G"]) == 2
    assert capsys.readouterr().err.startswith("flyer: error: --kv-cache-memory: ")


def test_chat_without_max_tokens_fits_the_cache():
    torch.manual_seed(0)
    s = _Running(Transformer(preset("tiny")).eval(), kv_cache_bytes=12 * 4 * 384 * 2)  # 11 blocks of 4: 44 tokens
    try:
        msgs = [{"role": "user", "content": "a"}]  # "<|user|>\na\n<|assistant|>\n": 25 byte tokens
        r = s.client().chat.completions.create(model="tiny-test", messages=msgs, temperature=0)
        assert r.usage.prompt_tokens == 25 and r.usage.completion_tokens == 44 - 25
        assert r.choices[0].finish_reason == "length"
    finally:
        s.close()


def test_an_engine_failure_answers_500_in_openai_shape_and_the_engine_goes_on(model, monkeypatch, capsys):
    s = _Running(model)
    try:
        real = s.engine.dec.forward_groups
        monkeypatch.setattr(s.engine.dec, "forward_groups", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
        err = _error(httpx.post(s.url + "/v1/completions", json=dict(model="tiny-test", prompt=[1, 2], max_tokens=2),
                                timeout=60), 500)
        assert err["type"] == "server_error" and "Traceback" not in err["message"]
        monkeypatch.setattr(s.engine.dec, "forward_groups", real)
        r = s.client().completions.create(model="tiny-test", prompt=[1, 2], max_tokens=2, temperature=0)
        assert r.usage.completion_tokens == 2
        assert "boom" in capsys.readouterr().err  # the traceback goes to the server's log
        # streamed: the status is sent, so the stream ends with OpenAI's error event, which the client raises
        # (it ended with a chunk of finish_reason "error", not one of OpenAI's, that the client passed on)
        fail = {"n": 0}

        def second_step_fails(*a):
            fail["n"] += 1
            return real(*a) if fail["n"] < 2 else (_ for _ in ()).throw(RuntimeError("boom"))

        monkeypatch.setattr(s.engine.dec, "forward_groups", second_step_fails)
        stream = s.client().completions.create(model="tiny-test", prompt=[1, 2], max_tokens=5, temperature=0,
                                               stream=True)
        with pytest.raises(openai.APIError, match="the engine failed on this request"):
            list(stream)
        monkeypatch.setattr(s.engine.dec, "forward_groups", real)
        chunks = s.client().completions.create(model="tiny-test", prompt=[1, 2], max_tokens=2, stream=True)
        assert [c.choices[0].finish_reason for c in chunks] == [None, "length"]
    finally:
        s.close()


def test_extreme_sampling_values_are_served_or_refused_and_fail_no_other_request(served):
    """Temperatures and top_p that round to 0 in FP32 sample the top token (they failed the engine's
    step, and every request in it); seeds take torch's range, choice j seed + j mod 2**64; out of
    range answers 400 and leaves nothing running."""
    c, url = served.client(), served.url + "/v1/completions"
    body = dict(model="tiny-test", prompt=_prog(3, 1, 4), max_tokens=6)
    with httpx.stream("POST", url, json={**body, "max_tokens": 40, "temperature": 0, "stream": True},
                      timeout=60) as bystander:
        greedy = c.completions.create(**body, temperature=0).choices[0].text
        assert c.completions.create(**body, temperature=1e-300).choices[0].text == greedy
        assert c.completions.create(**body, temperature=1.0, top_p=1e-320).choices[0].text == greedy
        wrapped = c.completions.create(**body, temperature=1.0, seed=(1 << 64) - 1, n=2).choices
        assert wrapped[1].text == c.completions.create(**body, temperature=1.0, seed=0).choices[0].text
        for over in (dict(temperature=2.5), dict(seed=1 << 64), dict(seed=-(1 << 63) - 1)):
            _error(httpx.post(url, json={**body, **over}), 400, next(iter(over)))
        chunks = [json.loads(ln[6:]) for ln in bystander.iter_lines() if ln.startswith("data: {")]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and len(chunks) == 40
    for _ in range(100):
        if not served.engine.busy:
            break
        time.sleep(0.05)
    assert not served.engine.busy and served.engine.alloc.used == 0


def test_a_client_gone_cancels_a_non_streaming_request(model, monkeypatch):
    """A non-streaming response writes nothing until its end: the handler polls the connection
    (it generated every token for a client that had timed out)."""
    monkeypatch.setattr("flyer.serve.generation.DISCONNECT_POLL_S", 0.1)
    s = _Running(model)
    try:
        step = s.engine.step
        monkeypatch.setattr(s.engine, "step", lambda: (time.sleep(0.05), step()))  # >= 3 s for 60 tokens
        gone_mid_request(s, dict(model="tiny-test", prompt=[1, 2], max_tokens=60, temperature=0))
        for _ in range(100):
            if not s.engine.busy:
                break
            time.sleep(0.05)
        assert not s.engine.busy and s.engine.alloc.used == 0
        m = s.engine.metrics
        assert m.requests.labels("cancelled")._value.get() == 1 and m.generation_tokens._value.get() < 60
    finally:
        s.close()


def test_an_ipv6_address_is_bracketed_in_urls():
    assert http_url("::1", 8000) == "http://[::1]:8000" and http_url("127.0.0.1", 80) == "http://127.0.0.1:80"


def test_a_listening_error_names_the_host_or_the_port_at_fault(monkeypatch):
    """An address not of this machine, or a name that resolves to nothing, is the host's fault; an address in use the
    port's (every failure named --port)."""
    with pytest.raises(FieldError, match="cannot listen on 192.0.2.1:0") as e:  # TEST-NET-1: no local address
        bind("192.0.2.1", 0)
    assert e.value.field == "host", e.value
    with monkeypatch.context() as m:  # no lookup here (no network): the resolver's answer for a name it lacks
        m.setattr(socket.socket, "bind", lambda *_: (_ for _ in ()).throw(socket.gaierror(-2, "Name not known")))
        with pytest.raises(FieldError) as e:
            bind("no-such-host", 0)
        assert e.value.field == "host", e.value
    taken = bind("127.0.0.1", 0)
    try:
        with pytest.raises(FieldError) as e:
            bind("127.0.0.1", taken.getsockname()[1])
        assert e.value.field == "port"
    finally:
        taken.close()



@pytest.mark.parametrize("host,key,warned", [
    ("127.0.0.1", None, False), ("127.0.0.2", None, False), ("::1", None, False), ("::ffff:127.0.0.1", None, False),
    ("0.0.0.0", None, True), ("::", None, True), ("10.1.2.3", None, True), ("fe80::1%eth0", None, True),
    ("0.0.0.0", "k", False)])
def test_listening_beyond_loopback_without_a_key_is_said(host, key, warned):
    """``--host`` alone opens the model to whoever reaches the port: said in one line (the bound address, as
    ``getsockname`` gives it), not refused (a trusted network, or a proxy in front that checks keys)."""
    line = open_warning(host, key)
    assert (line is not None) == warned, line
    assert line is None or (line.startswith(f"flyer serve: warning: listening on {host},") and "--api-key" in line
                            and "\n" not in line)

# ---- streamed text: incremental detokenisation --------------------------------------------------

def _metaspace_tokenizer() -> TextTokenizer:
    """A SentencePiece-style tokenizer (Metaspace: a token renders its leading space only
    mid-sequence) with special tokens that decode to nothing."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog déjà vu"] * 20,
                            trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"]))
    return TextTokenizer(tok)


@pytest.mark.parametrize("kind", ["bytes", "metaspace"])
def test_streamed_text_equals_the_full_decode_at_linear_cost(kind):
    """Each token's text is decoded with a few tokens of context, not the whole generation again
    (quadratic: 2M ids decoded for 2,000 tokens); the text equals the decode of all the ids, with
    UTF-8 characters split across byte tokens and a decoder that renders a leading space only
    mid-sequence."""
    if kind == "bytes":
        tok = ByteTokenizer()
        ids = list(("héllo wörld 😀 " * 150).encode())[:2000]
    else:
        tok = _metaspace_tokenizer()
        ids = (tok.encode_ids("the quick brown fox déjà vu ") + [tok.tok.token_to_id("</s>")]) * 60
    decoded = []
    counting = SimpleNamespace(decode=lambda xs: decoded.append(len(xs)) or tok.decode(xs))
    choice, deltas = Choice(counting, stops=[]), []
    for i, t in enumerate(ids):
        choice.add(TokenEvent(t, finish_reason="length" if i == len(ids) - 1 else None))
        deltas.append(choice.delta())
    assert choice.text == "".join(deltas) == tok.decode(ids)
    assert sum(decoded) <= 8 * len(ids)


def test_stop_string_across_tokens_cuts_the_text():
    tok = ByteTokenizer()
    choice = Choice(tok, stops=["wör", "zz"])
    for t in "héllo wörld".encode():
        choice.add(TokenEvent(t))
        if choice.finish_reason:
            break
    assert (choice.text, choice.finish_reason) == ("héllo ", "stop")


@pytest.mark.parametrize("ids, starts", [
    ([104, 0x8C, 105, 106], [0, 1, 2, 3]),  # a lone continuation byte: its U+FFFD stays, 'i' starts after it
    (list("héllo".encode()), [0, 1, 1, 2, 3, 4]),  # é over two bytes: both at the character's start
    ([104, 0xC3, 0x8C, 0x8C, 105], [0, 1, 1, 2, 3]),  # 'Ì' then a lone byte, then 'i'
])
def test_text_offsets_follow_the_text_after_bytes_held_back(ids, starts):
    """A token's start (``text_offset``) is where its text begins: a byte that never completes a character was
    held back with the next token, which then started at the byte's U+FFFD instead of after it."""
    choice = Choice(ByteTokenizer(), stops=[])
    for i, t in enumerate(ids):
        choice.add(TokenEvent(t, finish_reason="length" if i == len(ids) - 1 else None))
    assert choice.text == ByteTokenizer().decode(ids)
    assert choice.starts == starts


def test_a_body_past_the_bound_answers_413_before_it_is_parsed(model):
    """A body over ``max_body_bytes`` answers 413 in OpenAI's shape, whether its Content-Length says so or its
    chunks (no length) pass the bound as they arrive; one at the bound is served, and so are requests after."""
    ok = json.dumps(dict(model="tiny-test", prompt=[1, 2, 3], max_tokens=2)).encode()
    s = _Running(model, max_body_bytes=len(ok))
    try:
        url, headers = s.url + "/v1/completions", {"content-type": "application/json"}
        assert httpx.post(url, content=ok, headers=headers).status_code == 200
        big = ok[:-1] + b" " * 64 + b"}"  # the same request, padded past the bound
        refused = httpx.post(url, content=big, headers={**headers, "x-request-id": "big-1"})
        err = _error(refused, 413)
        assert err["code"] == "request_too_large" and f"more than {len(ok):,} bytes" in err["message"]
        assert refused.headers["x-request-id"] == "big-1"  # named before its body is read

        def chunks():  # sent chunked: no Content-Length to refuse it by
            yield big[:len(ok) // 2]
            yield big[len(ok) // 2:]
        err = _error(httpx.post(url, content=chunks(), headers=headers), 413)
        assert err["code"] == "request_too_large"
        assert httpx.post(url, content=ok, headers=headers).json()["choices"][0]["finish_reason"] == "length"
        assert 'flyer_rejected_requests_total{status="413"} 2.0' in httpx.get(s.url + "/metrics").text
    finally:
        s.close()


# ---- text prompts on a checkpoint's tokenizer -------------------------------------------------------------------

def test_echo_returns_the_prompt_as_sent_with_offsets_into_it(served_text):
    """``echo`` returns the text prompt as sent (OpenAI's and vLLM's; it returned the ids' decode, without the text of
    special tokens), and ``text_offset`` indexes that text: the prompt's tokens where the tokenizer places them (the
    BOS it adds at 0), the generated ones after it; streamed alike."""
    prompt = "the fox</s>jumps"  # "</s>": one special token, which decoding drops
    client, tok = served_text.client(), served_text.api.tok
    kw = dict(model="tiny-test", prompt=prompt, max_tokens=3, temperature=0, logprobs=0)
    plain = client.completions.create(**kw).choices[0]
    whole = client.completions.create(**kw, echo=True).choices[0]
    assert whole.text == prompt + plain.text
    enc = tok.tok.encode(prompt)
    assert enc.offsets[0] == (0, 0) and len(enc.ids) == len(tok.encode_ids(prompt))  # the BOS, then the text's
    starts = [0] + [a for a, _ in enc.offsets[1:]]
    assert starts[4] == prompt.index("</s>")
    assert whole.logprobs.text_offset == starts + [len(prompt) + k for k in plain.logprobs.text_offset]
    chunks = [c.choices[0] for c in client.completions.create(**kw, echo=True, stream=True)]
    assert chunks[0].text == prompt and "".join(c.text for c in chunks) == whole.text
    assert [k for c in chunks if c.logprobs for k in c.logprobs.text_offset] == whole.logprobs.text_offset


def test_a_long_text_prompt_is_encoded_off_the_event_loop(served_text):
    """A text prompt far past the context (1.5 MB, under the body bound) is encoded before its length is known:
    other requests are served meanwhile (the encoding held the event loop, and /health waited for it, ~1 s here),
    and it is refused naming the prompt."""
    big, out = {"model": "tiny-test", "prompt": "the quick brown fox jumps " * 60_000, "max_tokens": 1}, {}

    def send():
        t0 = time.perf_counter()
        out["resp"] = httpx.post(served_text.url + "/v1/completions", json=big, timeout=120)
        out["s"] = time.perf_counter() - t0

    sender = threading.Thread(target=send)
    sender.start()
    waits = []
    while sender.is_alive():
        t0 = time.perf_counter()
        assert httpx.get(served_text.url + "/health", timeout=60).status_code == 200
        waits.append(time.perf_counter() - t0)
        time.sleep(0.01)
    sender.join()
    err = _error(out["resp"], 400, "prompt")
    assert err["code"] == "context_length_exceeded"
    # a loop held by the encoding answers the first /health only with the prompt's refusal: one or two answers in
    # all, where a free loop answers one every ~10 ms of the encoding's (~1 s here; 0.1 s would give several)
    assert len(waits) > 3, (out["s"], waits)
