"""Serving edges a mutation sweep of ``flyer.serve.api`` / ``link`` / ``request`` found unpinned, through the
official openai client where a client sees them: the room filled exactly (and by an echo scoring a full window, which
was refused), top_p alone, response_format text, echo with n choices of several prompts, logprobs of held-back and
cut text, the engine host's reports and refusals, the limits' block count. Oracles: OpenAI's documented semantics,
the engine's own bound."""

from __future__ import annotations

import socket
import threading

import openai
import pytest

from flyer.errors import FieldError
from flyer.serve.link import EngineHost, _Frames, _frame
from flyer.serve.request import Limits, SamplingOptions
from tests.test_serve_api import V, model, served, served_bytes  # noqa: F401 (the fixtures of the servers used here)


def _prog(start, step, n):
    return [(start + step * i) % V for i in range(n)]


def test_a_tiny_top_p_samples_the_greedy_tokens(served_bytes):  # noqa: F811 (the fixture)
    """top_p alone (OpenAI's nucleus sampling): a nucleus of mass 1e-9 holds the most likely token only, so sampling
    at temperature 1 gives the greedy text (kills A14)."""
    def text(**kw):
        return served_bytes.client().completions.create(model="tiny-test", prompt="The quick brown", max_tokens=12,
                                                        **kw).choices[0].text
    greedy = text(temperature=0)
    assert text(temperature=1.0, seed=3) != greedy  # sampling differs here
    assert text(temperature=1.0, seed=3, top_p=1e-9) == greedy


def test_chat_logprobs_end_with_the_content_a_stop_string_cuts(served_bytes):  # noqa: F811 (the fixture)
    """A stop string cuts the content before it: the choice's logprobs.content are those of the content's tokens
    (each token's text starts before the cut: ``Choice.kept``), not of the stop string's (kills A32)."""
    c = served_bytes.client()
    kw = dict(model="tiny-test", messages=[{"role": "user", "content": "count"}], max_tokens=6, temperature=0,
              logprobs=True, logit_bias={"97": 100})  # byte tokens: "aaaaaa"
    full = c.chat.completions.create(**kw).choices[0]
    assert full.message.content == "a" * 6 and len(full.logprobs.content) == 6
    cut = c.chat.completions.create(**kw, stop=["aa"]).choices[0]
    assert (cut.message.content, cut.finish_reason) == ("", "stop")
    assert cut.logprobs.content == []


def test_a_prompt_and_max_tokens_that_fill_the_room_exactly_are_served(served):  # noqa: F811 (the fixture)
    """prompt + max_tokens == room fits (the engine's own bound, ``Limits.check``: > ctx refused); one more token is
    400 (kills A06 and R06)."""
    room = served.engine.limits.room
    p = _prog(3, 1, room - 4)
    r = served.client().completions.create(model="tiny-test", prompt=p, max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as e:
        served.client().completions.create(model="tiny-test", prompt=p, max_tokens=5, temperature=0)
    assert e.value.body["param"] == "max_tokens"


def test_an_echo_scoring_a_full_window_is_served(served):  # noqa: F811 (the fixture)
    """echo with max_tokens 0 (an evaluation harness scoring a prompt's log-likelihood) of a prompt as long as the
    room asks for no new token: served, every prompt token but the first scored (it was refused as leaving no room
    for a new token, which the engine itself accepts); one token longer is refused naming the prompt."""
    room = served.engine.limits.room
    p = _prog(3, 1, room)
    r = served.client().completions.create(model="tiny-test", prompt=p, max_tokens=0, echo=True, logprobs=0)
    assert r.usage.prompt_tokens == room and r.usage.completion_tokens == 0
    assert len(r.choices[0].logprobs.tokens) == room
    with pytest.raises(openai.BadRequestError) as e:
        served.client().completions.create(model="tiny-test", prompt=p + [0], max_tokens=0, echo=True, logprobs=0)
    assert e.value.body["param"] == "prompt"


def test_response_format_text_constrains_nothing(served_bytes):  # noqa: F811 (the fixture)
    """OpenAI's response_format {"type": "text"} is the default: the greedy output is the one without it, not one held
    to JSON (kills A07)."""
    c = served_bytes.client()
    msgs = [{"role": "user", "content": "count"}]
    kw = dict(model="tiny-test", messages=msgs, max_tokens=8, temperature=0)
    plain = c.chat.completions.create(**kw).choices[0].message.content
    assert not plain.startswith("{")
    assert c.chat.completions.create(**kw, response_format={"type": "text"}).choices[0].message.content == plain


def test_echo_with_n_choices_of_several_text_prompts_echoes_each_choices_own_prompt(served_bytes):  # noqa: F811 (the fixture)
    """Choice k = i n + j is prompt i's (OpenAI's numbering): with echo, its text starts with prompt i as sent
    (kills A23)."""
    r = served_bytes.client().completions.create(model="tiny-test", prompt=["ab", "cd", "ef"], n=2, max_tokens=1,
                                                 temperature=0, echo=True)
    assert [c.index for c in r.choices] == list(range(6))
    assert [c.text[:2] for c in r.choices] == ["ab", "ab", "cd", "cd", "ef", "ef"]


def test_a_streamed_chunk_whose_text_is_held_back_has_null_logprobs(served):  # noqa: F811 (the fixture)
    """A token whose text a stop string's prefix holds back streams a chunk with "" and logprobs null; its token
    comes with the chunk that releases its text: over the stream, one logprobs entry per token, each with its text
    (kills A24)."""
    p = _prog(1, 1, 5)  # the counting model continues 6, 7, 8, ...
    chunks = [c for c in served.client().completions.create(model="tiny-test", prompt=p, max_tokens=4, temperature=0,
                                                            logprobs=1, stop=[chr(7) + chr(0)], stream=True)
              if c.choices]
    held = [c for c in chunks if c.choices[0].text == "" and c.choices[0].finish_reason is None]
    assert held, "the stop string's prefix held no text back"
    assert all(c.choices[0].logprobs is None for c in held)
    tokens = [t for c in chunks if c.choices[0].logprobs is not None for t in c.choices[0].logprobs.tokens]
    assert "".join(tokens) == "".join(c.choices[0].text for c in chunks) == "".join(map(chr, range(6, 10)))


class _FakeEngine:
    """What ``EngineHost`` reads of an engine: ``busy``, ``waiting``, ``submit`` (``refuse``: a ``FieldError``)."""

    def __init__(self, refuse: bool = False):
        self.busy, self.waiting, self.refuse = False, [], refuse

    def submit(self, prompt, opts, emit, bounded=True):
        if self.refuse:
            raise FieldError("prompt", "refused by the engine")
        self.waiting.append(prompt)
        return object()


def _host_answers(engine, *msgs):
    """The messages ``EngineHost(engine)`` sends back after hearing ``msgs`` (then the link closes)."""
    engine_end, http_end = socket.socketpair()
    host = threading.Thread(target=EngineHost(engine, engine_end).serve, daemon=True)
    host.start()
    for m in msgs:
        http_end.sendall(_frame(m))
    http_end.settimeout(3)
    frames, out = _Frames(), []
    try:
        while len(out) < len(msgs):
            out += frames.feed(http_end.recv(1 << 20))
    except socket.timeout:
        pass
    http_end.close()
    host.join(timeout=10)
    engine_end.close()
    return out


def test_the_host_reports_each_submission_it_has_even_without_events():
    """The engine's report carries its waiting count and the last submission it received, sent when they change even
    when no token came (else the HTTP side's queue bound, ``EngineClient.submit``, counts the request as unreceived and
    answers 429 to a server with an empty queue; kills L06 and L08)."""
    out = _host_answers(_FakeEngine(), ("submit", 0, [1, 2], SamplingOptions()), ("submit", 1, [3], SamplingOptions()))
    assert out and out[-1] == ("events", [], 2, 1)


def test_a_request_the_engine_refuses_ends_with_an_error_event():
    """A submission the engine refuses (``FieldError``) is answered with its final event "error" (the API's 500), not
    a normal end (kills L05)."""
    out = _host_answers(_FakeEngine(refuse=True), ("submit", 0, [1, 2], SamplingOptions()))
    assert len(out) == 1 and out[0][0] == "events"
    [(rid, e)] = out[0][1]
    assert rid == 0 and e.token is None and e.finish_reason == "error"


def test_limits_refuse_what_the_cache_can_never_hold_and_a_negative_max_tokens():
    """``Limits.check`` (what the engine refuses a library caller): blocks are ceil(tokens / block_size), so one token
    past capacity * block_size is refused (kills R07); max_tokens < 0 is refused naming it (kills R03)."""
    lim = Limits(vocab_size=10, max_seq_len=1000, block_size=4, capacity=3, max_queue=2)
    lim.check([1] * 11, SamplingOptions(max_tokens=1))  # 12 tokens: 3 blocks
    with pytest.raises(FieldError) as e:
        lim.check([1] * 12, SamplingOptions(max_tokens=1))  # 13 tokens: 4 blocks
    assert e.value.field == "max_tokens"
    with pytest.raises(FieldError) as e:
        lim.check([1, 2], SamplingOptions(max_tokens=-1))
    assert e.value.field == "max_tokens"


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 1}),
])
def test_a_model_name_with_a_lone_surrogate_is_an_unknown_model(served, path, body):  # noqa: F811 (the fixture)
    """The 404 quotes the name, and a lone surrogate (valid JSON's escape, no UTF-8) made its body unencodable: a
    500 and a closed connection. Its escape is quoted now, and the connection serves the next request."""
    import json

    import httpx
    with httpx.Client(base_url=served.url, timeout=60) as c:
        r = c.post(path, content=json.dumps({"model": "\ud800x", **body}), headers={"content-type": "application/json"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
        assert "`\\ud800x`" in r.json()["error"]["message"]
        assert c.get("/health").status_code == 200


def test_echo_offsets_of_a_three_byte_character_are_its_start(served_bytes):  # noqa: F811 (the fixture)
    """Echo's ``text_offset`` went backwards inside a 3-byte character ([0, 1, 2, 1, 2] for "a字b")."""
    r = served_bytes.client().completions.create(model="tiny-test", prompt="a字b", max_tokens=0, echo=True,
                                                 logprobs=0)
    assert r.choices[0].logprobs.text_offset == [0, 1, 1, 1, 2]
