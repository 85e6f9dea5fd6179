"""Token logprobs on OpenAI's Responses API (``include: ["message.output_text.logprobs"]``, ``top_logprobs``;
``flyer.serve.responses``) through the official openai client.

The counting model (``trained.counting_model``) with byte tokens and a template that writes the messages' text alone
(a prompt of digits stays inside its 64-token vocabulary; every token it writes is one ASCII byte): an output_text's
logprobs are chat's ``logprobs.content`` for the same request (tokens, values, top alternatives), streamed and not;
the delta events' logprobs concatenate to the done event's and the completed response's; each token's bytes join to
the text; a stored response returns them; refused values answer 400 naming the field. A scripted engine writing
reasoning, the end marker, text and calls: the output_text carries the logprobs of the text's tokens only, exactly (by
the chat route's token span), a character split over byte tokens included."""

import httpx
import pytest
import torch
from openai.types.responses import ResponseOutputText, ResponseTextDeltaEvent
from served import EngineServer, client, serving
from test_serve_api import _error
from test_serve_reasoning import REASONING, _ids
from test_serve_reasoning import ckpt as reasoning_ckpt  # noqa: F401 (a fixture)
from test_serve_responses import FLAT_TOOLS, THINK_TEMPLATE
from test_serve_responses import tok as reasoning_tok  # noqa: F401 (a fixture)
from test_serve_tools_v3 import CALLS, _Scripted
from trained import counting_model

from flyer.infer.cli import ByteTokenizer
from flyer.serve.api import Api
from flyer.serve.engine import Engine, EngineConfig
from flyer.serve.link import Submitted
from flyer.serve.reasoning import DEEPSEEK
from flyer.serve.request import Limits, TokenEvent
from flyer.serve.responses_schema import LOGPROBS
from flyer.serve.tools import DEEPSEEK_V31 as F31

V = 64
TEXT_ONLY = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
PROMPT = "0246"  # bytes 48-54: inside the vocabulary; the counting model continues the progression


@pytest.fixture(scope="module")
def served():
    # prefix sharing off: each request prefills its whole prompt in the same chunks, so chat's and the response's
    # FP32 forwards run the same ops in the same order and their logprobs agree bit for bit
    cfg = EngineConfig(kv_cache_bytes=64 * 4 * 384 * 2, block_size=4, cache_dtype=torch.float32, prefill_chunk=8,
                       prefix_sharing=False)
    s = EngineServer(Engine(counting_model(V), cfg, tokenizer=ByteTokenizer()),
                     lambda link: Api(link, ByteTokenizer(), "tiny-test", chat_template=TEXT_ONLY))
    yield s
    s.close()


def _chat_logprobs(c, n: int, top: int) -> list[dict]:
    r = c.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": PROMPT}], max_tokens=n,
                                  temperature=0, logprobs=True, top_logprobs=top)
    return [e.model_dump() for e in r.choices[0].logprobs.content]


def _joined_bytes(entries) -> str:
    return b"".join(bytes(e.bytes) for e in entries).decode()


def test_logprobs_are_chats(served):
    c = served.client()
    for n, top in ((6, 3), (1, 0)):
        r = c.responses.create(model="tiny-test", input=PROMPT, max_output_tokens=n, temperature=0,
                               include=[LOGPROBS], top_logprobs=top)
        part = r.output[0].content[0]
        assert isinstance(part, ResponseOutputText) and len(part.logprobs) == r.usage.output_tokens == n
        assert [e.model_dump() for e in part.logprobs] == _chat_logprobs(c, n, top)
        assert all(len(e.top_logprobs) == top for e in part.logprobs) and r.top_logprobs == top
        assert _joined_bytes(part.logprobs) == part.text == r.output_text
        assert c.responses.retrieve(r.id).model_dump() == r.model_dump()  # stored as returned
    # without the include: none, as OpenAI answers
    plain = c.responses.create(model="tiny-test", input=PROMPT, max_output_tokens=4, temperature=0)
    assert plain.output[0].content[0].logprobs == [] and plain.top_logprobs == 0


def test_streamed_logprobs_are_the_unstreamed(served):
    c = served.client()
    kw = dict(model="tiny-test", input=PROMPT, max_output_tokens=6, temperature=0, include=[LOGPROBS], top_logprobs=2)
    whole = c.responses.create(**kw)
    events = list(c.responses.create(stream=True, **kw))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and all(isinstance(e, ResponseTextDeltaEvent) for e in deltas)
    for e in deltas:  # each delta carries its own tokens
        assert e.logprobs and _joined_bytes(e.logprobs) == e.delta
    want = [e.model_dump() for e in whole.output[0].content[0].logprobs]
    assert [lp.model_dump() for e in deltas for lp in e.logprobs] == want
    done = next(e for e in events if e.type == "response.output_text.done")
    part = next(e for e in events if e.type == "response.content_part.done").part
    final = events[-1].response
    assert [e.model_dump() for e in done.logprobs] == want
    assert [e.model_dump() for e in part.logprobs] == want
    assert [e.model_dump() for e in final.output[0].content[0].logprobs] == want
    assert c.responses.retrieve(final.id).model_dump() == final.model_dump()


def test_refused_values_answer_400(served):
    url = served.url + "/v1/responses"
    ok = dict(model="tiny-test", input=PROMPT, max_output_tokens=2)
    for over, param in ((dict(include=["file_search_call.results"]), "include"),
                        (dict(include=[LOGPROBS, "reasoning.encrypted_content"]), "include"),
                        (dict(include=LOGPROBS), "include"),
                        (dict(top_logprobs=3), "top_logprobs"),
                        (dict(include=[LOGPROBS], top_logprobs=21), "top_logprobs"),
                        (dict(include=[LOGPROBS], top_logprobs=-1), "top_logprobs")):
        err = _error(httpx.post(url, json={**ok, **over}), 400, param)
        if param == "include" and isinstance(over["include"], list):
            assert LOGPROBS in err["message"]  # says which value is accepted
    # the neutral values pass
    for over in (dict(include=[]), dict(top_logprobs=0), dict(include=[LOGPROBS], top_logprobs=20)):
        assert httpx.post(url, json={**ok, **over}).status_code == 200


class _Numbered(_Scripted):
    """The script with token k's logprob -(k + 1): which tokens' logprobs an item holds is read off their values."""

    def submit(self, prompt, opts, emit):
        r, n = Submitted(next(self.ids), emit), min(len(self.script), opts.max_tokens)
        for k in range(n):
            emit(TokenEvent(self.script[k], logprob=-(k + 1.0), top_logprobs={self.script[k]: -(k + 1.0)},
                            finish_reason=("stop" if n == len(self.script) else "length") if k == n - 1 else None))
        r.done = True
        return r


# the second reasoning holds the answer's text: its tokens must not be taken for the answer's
@pytest.mark.parametrize("reasoning", [REASONING, "Sure. I would say Sure."])
def test_reasoning_and_calls_carry_none(reasoning_tok, reasoning):  # noqa: F811 (the fixture imported)
    tok = reasoning_tok
    head = _ids(tok, reasoning, DEEPSEEK.end)
    text = _ids(tok, "Sure.")
    script = head + text + _ids(tok, F31.render(CALLS)) + [tok.eos_id()]
    limits = Limits(vocab_size=1 << 20, max_seq_len=4096, block_size=16, capacity=256, max_queue=8)
    api = Api(_Numbered(limits, script), tok, "tiny-test", chat_template=THINK_TEMPLATE, reasoning_parser="deepseek")
    with serving(api) as url:
        c = client(url)
        kw = dict(model="tiny-test", input="what is 2+2?", tools=FLAT_TOOLS, reasoning={"effort": "high"},
                  include=[LOGPROBS], top_logprobs=1)
        r = c.responses.create(**kw)
        assert [o.type for o in r.output] == ["reasoning", "message", "function_call", "function_call"]
        lps = r.output[1].content[0].logprobs
        # the text's tokens are the script's len(head) .. len(head) + len(text) - 1
        assert [e.logprob for e in lps] == [-(k + 1.0) for k in range(len(head), len(head) + len(text))]
        assert _joined_bytes(lps) == r.output_text == "Sure."
        assert [e.top_logprobs[0].logprob for e in lps] == [e.logprob for e in lps]
        events = list(c.responses.create(stream=True, **{k: v for k, v in kw.items() if k != "model"}))
        deltas = [lp.model_dump() for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
        assert deltas == [e.model_dump() for e in lps]
        final = events[-1].response
        assert [e.model_dump() for e in final.output[1].content[0].logprobs] == deltas


def test_a_trailing_eos_is_chats_streamed_or_not(reasoning_tok):  # noqa: F811 (the fixture imported)
    """A text then EOS (no reasoning parser): the EOS's logprob is the text's as chat's ``logprobs.content`` holds it;
    a stream sends it in a last delta without text (as chat's last chunk), with tools offered (none called) too."""
    tok = reasoning_tok
    script = _ids(tok, "hello there") + [tok.eos_id()]
    limits = Limits(vocab_size=1 << 20, max_seq_len=4096, block_size=16, capacity=256, max_queue=8)
    api = Api(_Numbered(limits, script), tok, "tiny-test", chat_template=THINK_TEMPLATE)
    with serving(api) as url:
        c = client(url)
        chat = c.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "hi"}],
                                         logprobs=True, top_logprobs=1)
        want = [e.model_dump() for e in chat.choices[0].logprobs.content]
        assert len(want) == len(script)
        for tools in (None, FLAT_TOOLS):
            kw = dict(input="hi", include=[LOGPROBS], top_logprobs=1, **({"tools": tools} if tools else {}))
            r = c.responses.create(model="tiny-test", **kw)
            assert r.output_text == chat.choices[0].message.content
            assert [e.model_dump() for e in r.output[0].content[0].logprobs] == want
            events = list(c.responses.create(model="tiny-test", stream=True, **kw))
            deltas = [e for e in events if e.type == "response.output_text.delta"]
            assert [lp.model_dump() for e in deltas for lp in e.logprobs] == want
            assert [e.model_dump() for e in events[-1].response.output[0].content[0].logprobs] == want


@pytest.mark.parametrize("tools", [None, FLAT_TOOLS])
def test_split_character_after_reasoning_is_the_texts(reasoning_tok, tools):  # noqa: F811 (the fixture imported)
    """Reasoning, the end marker, a text whose "é" the tokenizer writes as two byte tokens (each decodes alone to
    other text than its share of "é"), then calls (with tools): the output_text's logprobs are exactly the text's
    tokens' (chat's ``content_span``), streamed and not; chat's ``logprobs.content`` holds every token and its JSON
    no span."""
    tok = reasoning_tok
    head, text = _ids(tok, REASONING, DEEPSEEK.end), _ids(tok, "Sure, café.")
    assert any(tok.decode([t]) not in "Sure, café." for t in text)  # the case a match of token texts misses
    calls = _ids(tok, F31.render(CALLS)) if tools else []
    script = head + text + calls + [tok.eos_id()]
    # the text's tokens, and with no calls the EOS after them (chat's last entry, as for a text alone)
    want = [-(k + 1.0) for k in range(len(head), len(head) + len(text) + (0 if tools else 1))]
    limits = Limits(vocab_size=1 << 20, max_seq_len=4096, block_size=16, capacity=256, max_queue=8)
    api = Api(_Numbered(limits, script), tok, "tiny-test", chat_template=THINK_TEMPLATE, reasoning_parser="deepseek")
    with serving(api) as url:
        c = client(url)
        kw = dict(model="tiny-test", input="what is 2+2?", reasoning={"effort": "high"}, include=[LOGPROBS],
                  top_logprobs=1, **({"tools": tools} if tools else {}))
        r = c.responses.create(**kw)
        assert [o.type for o in r.output] == ["reasoning", "message"] + ["function_call"] * (2 if tools else 0)
        assert r.output_text == "Sure, café."
        lps = r.output[1].content[0].logprobs
        assert [e.logprob for e in lps] == want
        events = list(c.responses.create(stream=True, **kw))
        deltas = [e for e in events if e.type == "response.output_text.delta"]
        assert "".join(e.delta for e in deltas) == "Sure, café."
        assert [lp.model_dump() for e in deltas for lp in e.logprobs] == [e.model_dump() for e in lps]
        assert [e.model_dump() for e in events[-1].response.output[1].content[0].logprobs] == \
            [e.model_dump() for e in lps]
        body = {"model": "tiny-test", "messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                "reasoning_effort": "high", **({"tools": [{"type": "function", "function": {
                    k: v for k, v in t.items() if k != "type"}} for t in tools]} if tools else {})}
        chat = httpx.post(url + "/v1/chat/completions", json=body).json()["choices"][0]
        assert "content_span" not in chat and len(chat["logprobs"]["content"]) == len(script)
        for line in httpx.post(url + "/v1/chat/completions", json={**body, "stream": True}).text.splitlines():
            assert "content_span" not in line
