"""Reasoning first, then the constrained output: with ``--reasoning-parser deepseek`` and a prompt that opens
reasoning (thinking mode), a request's grammar (``tool_choice`` "required" / named, ``response_format``) holds only
after ``</think>`` (``SamplingOptions.grammar_after``, ``flyer.serve.grammar``); chat mode, or no parser: from the
first token, as before.

- Through the openai client against the real engine (a V3.1-template checkpoint: ``tests/test_serve_reasoning.py``'s;
  a V3.2 DSML one: ``tests/test_serve_dsml.py``'s), the model steered (a large bonus on the logit of a scripted
  token at each output position; the grammar's mask comes after it, so a masked token stays -inf) towards
  reasoning, ``</think>``, then a calls block / JSON: ``reasoning_content`` is the reasoning, the calls parse
  (finish "tool_calls"), the JSON validates, streamed and not. The reasoning's first characters are ones the
  grammar forbids at its start, so a mask applied before the marker changes the answer.
- Steered towards the same script in chat mode (the prompt ends with ``</think>``), or with no parser: the output
  is the grammar's from the first token (valid JSON, not the script's reasoning).
- Random weights, sampled, n = 3 (a bias on ``</think>`` so that it comes within max_tokens): what follows the
  marker validates against the schema; the stream gives the same answers.
- Engine level, the counting model (``tests/trained.py``) with a one- and a two-token marker: no mask is filled
  before the marker, one per token after it; the tokens before it are the model's unmasked ones, those after it
  valid JSON; MTP speculation (K = 1, 2) gives the tokens of speculation off and keeps drafts.

Token comparisons are exact: the steering bonus (``STEER``) dwarfs every logit of these random FP32 models, and the
counting model's greedy margins are clear (``tests/test_serve_grammar_spec.py`` argues the same bound)."""

import json

import httpx
import llguidance.numpy as llg_np
import pytest
from served import EngineServer
from test_serve_dsml import CALLS, CALLS_TEXT
from test_serve_dsml import ckpt as v32_ckpt  # noqa: F401  (a fixture)
from test_serve_grammar_spec import MLA_SCHEMAS
from test_serve_reasoning import ASK, _agree
from test_serve_reasoning import ckpt as v31_ckpt  # noqa: F401  (a fixture)
from test_serve_structured import SCHEMAS, _fmt, _run, _tokens, _valid
from test_serve_tools import SCHEMA, TOOLS, _check_calls
from trained import counting_model

from flyer.data.chat_template import read_chat_template
from flyer.interop.hf import load_hf
from flyer.serve.api import Api
from flyer.serve.dsml import DSML_V32
from flyer.serve.engine import Engine, EngineConfig, SamplingOptions
from flyer.serve.grammar import json_grammar
from flyer.serve.reasoning import DEEPSEEK
from flyer.serve.tools import DEEPSEEK_V31 as F31

STEER = 1000.0  # added to the scripted token's logit: far above any logit of these models
OBJ = SCHEMAS[4]
REASONING, JSON_TEXT = "weigh it", '{"color":"red","ok":true,"n":7,"xs":[false]}'
THINK, CHAT = {"thinking": True}, {"thinking": False}
WEATHER_ARGS, LIGHT_ARGS = '{"city":"oslo","celsius":true,"days":2}', '{"on":false,"level":3}'
NAMED = {"type": "function", "function": {"name": "set_light"}}


def _serve(path, parser: str | None = "deepseek") -> EngineServer:
    model, _, tok = load_hf(path)
    assert model.cfg.vocab_size > tok.tok.token_to_id(DEEPSEEK.end)
    s = EngineServer(Engine(model, EngineConfig(kv_cache_bytes=1 << 24, block_size=16), tokenizer=tok),
                     lambda link: Api(link, tok, "tiny-test", chat_template=read_chat_template(str(path)),
                                      reasoning_parser=parser))
    s.tok = tok
    return s


@pytest.fixture(scope="module")
def v31(v31_ckpt):  # noqa: F811
    s = _serve(v31_ckpt)
    yield s
    s.close()


@pytest.fixture(scope="module")
def v32(v32_ckpt):  # noqa: F811
    s = _serve(v32_ckpt)
    yield s
    s.close()


def _script(tok, *parts: str) -> list[int]:
    """The parts' ids, each encoded apart (``</think>`` one token), then EOS."""
    return [i for p in parts for i in tok.encode_ids(p, add_special_tokens=False)] + [tok.eos_id()]


def _steer(monkeypatch, script: list[int]) -> None:
    """Every request's logits steered towards ``script``: ``STEER`` on the logit of ``script[k]`` at output
    position k (drafts counted), through the engine's logit adjustments (before the grammar's mask)."""
    def adjust(self, logits_V, generated, prompt=()):
        if len(generated) < len(script):
            logits_V[script[len(generated)]] += STEER
        return logits_V
    monkeypatch.setattr(SamplingOptions, "adjusts", property(lambda self: True))
    monkeypatch.setattr(SamplingOptions, "adjust", adjust)


def _ask(thinking: dict, **kw) -> dict:
    """The openai client's keywords of a greedy request with ``TOOLS`` in thinking mode or not."""
    return dict(tools=TOOLS, extra_body={"chat_template_kwargs": thinking}, temperature=0, max_tokens=600, **kw)


def test_v31_reasons_then_calls_or_json(v31, monkeypatch):
    """Steered: reasoning, </think>, then a calls block ("required", named) or JSON: split and parsed, streamed and
    whole (``_agree``); the reasoning's first character is one no grammar here allows first."""
    tok, c = v31.tok, v31.client()
    assert not F31.calls_begin.startswith(REASONING[0]) and not JSON_TEXT.startswith(REASONING[0])
    cases = [("required", F31.render([("get_weather", WEATHER_ARGS)]), [("get_weather", WEATHER_ARGS)]),
             (NAMED, F31.render([("set_light", LIGHT_ARGS)]), [("set_light", LIGHT_ARGS)])]
    for choice, calls_text, calls in cases:
        _steer(monkeypatch, _script(tok, REASONING, DEEPSEEK.end, calls_text))
        usage = _agree(c, REASONING, None, "tool_calls", calls, **_ask(THINK, tool_choice=choice))
        # the reasoning's tokens and the marker (``_script``'s EOS stands in for the marker's one token)
        assert usage.completion_tokens_details.reasoning_tokens == len(_script(tok, REASONING))
    _steer(monkeypatch, _script(tok, REASONING, DEEPSEEK.end, JSON_TEXT))
    _agree(c, REASONING, JSON_TEXT, "stop", **_ask(THINK, response_format=_fmt(OBJ)))
    # n = 2 of one steered greedy request: both the same answer
    r = c.chat.completions.create(model="tiny-test", messages=ASK, n=2, **_ask(THINK, response_format=_fmt(OBJ)))
    assert [(ch.message.reasoning_content, ch.message.content) for ch in r.choices] == [(REASONING, JSON_TEXT)] * 2


def test_v32_reasons_then_dsml_calls_or_json(v32, monkeypatch):
    tok, c = v32.tok, v32.client()
    # each call of CALLS_TEXT alone in its block (shorter than both: a token per step on two cores)
    head, light = CALLS_TEXT.index("<｜DSML｜invoke"), CALLS_TEXT.index('<｜DSML｜invoke name="set_light">')
    weather_text, light_text = CALLS_TEXT[:light] + CALLS_TEXT[-len(DSML_V32.calls_end):], \
        CALLS_TEXT[:head] + CALLS_TEXT[light:]
    want = [(n, json.dumps(a)) for n, a in CALLS]
    for choice, calls_text, calls in (("required", weather_text, want[:1]), (NAMED, light_text, want[1:])):
        _steer(monkeypatch, _script(tok, REASONING, DEEPSEEK.end, calls_text))
        _agree(c, REASONING, None, "tool_calls", calls, **_ask(THINK, tool_choice=choice))
    _steer(monkeypatch, _script(tok, REASONING, DEEPSEEK.end, JSON_TEXT))
    _agree(c, REASONING, JSON_TEXT, "stop", **_ask(THINK, response_format=_fmt(OBJ)))


def test_chat_mode_and_no_parser_constrain_from_the_first_token(v31, v32, v31_ckpt, monkeypatch):  # noqa: F811
    """The same steering in chat mode (the prompt ends with </think>) or without a parser: the grammar holds from
    the first token, so the answer is JSON (the scripted reasoning and marker refused), with no reasoning."""
    no_parser = _serve(v31_ckpt, parser=None)
    try:
        for served, thinking in ((v31, CHAT), (v32, CHAT), (no_parser, THINK)):
            _steer(monkeypatch, _script(served.tok, REASONING, DEEPSEEK.end, JSON_TEXT))
            # tool_choice "none": under "auto" the format's grammar also allows a calls block (test_serve_tools)
            kw = dict(model="tiny-test", messages=ASK, tools=TOOLS, tool_choice="none", chat_template_kwargs=thinking,
                      temperature=0, max_tokens=120, response_format=_fmt(OBJ))
            for stream in (False, True):
                body = httpx.post(served.url + "/v1/chat/completions", json={**kw, "stream": stream}, timeout=60)
                if stream:
                    deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in body.text.splitlines()
                              if line.startswith("data: {")]
                    assert not any(d.get("reasoning_content") for d in deltas)
                    text = "".join(d.get("content") or "" for d in deltas)
                else:
                    m = body.json()["choices"][0]["message"]
                    assert m.get("reasoning_content") is None
                    text = m["content"]
                assert REASONING not in text and _valid(json.loads(text), OBJ), text
            tools = served.client().chat.completions.create(model="tiny-test", messages=ASK, parallel_tool_calls=False,
                                                           **{**_ask(thinking, tool_choice="required"),
                                                              "max_tokens": 400})
            assert tools.choices[0].finish_reason == "tool_calls" and tools.choices[0].message.content is None
    finally:
        no_parser.close()


def test_random_weights_validate_after_the_marker(v31):
    """Sampled from random weights (a bias on </think> so that it comes within max_tokens): the reasoning is the
    model's free text (its first characters ones the grammar forbids at its start), what follows the marker
    validates; the stream's answers are the same."""
    c, end = v31.client(), v31.tok.tok.token_to_id(DEEPSEEK.end)
    kw = dict(model="tiny-test", messages=ASK, n=3, seed=11, temperature=1.0, max_tokens=150,
              logit_bias={str(end): 4}, extra_body={"chat_template_kwargs": THINK}, response_format=_fmt(OBJ))
    whole = c.chat.completions.create(**kw).choices
    reached = [ch for ch in whole if ch.message.content is not None]
    assert len(reached) >= 2, [ch.message for ch in whole]
    for ch in reached:
        assert ch.finish_reason == "stop" and _valid(json.loads(ch.message.content), OBJ), ch.message
    assert any(ch.message.reasoning_content and not ch.message.reasoning_content.startswith("{") for ch in reached)
    streamed = {}
    for chunk in c.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            r, t = streamed.setdefault(ch.index, ["", ""]), ch.delta
            r[0] += getattr(t, "reasoning_content", None) or ""
            r[1] += t.content or ""
    assert [tuple(streamed[k]) for k in range(3)] == \
        [(ch.message.reasoning_content or "", ch.message.content or "") for ch in whole]
    # "required": the calls after the marker parse and validate against their tools' schemas
    del kw["response_format"]
    calls = c.chat.completions.create(tools=TOOLS, tool_choice="required", parallel_tool_calls=False, **kw).choices
    reached = [ch for ch in calls if ch.finish_reason != "length"]
    assert len(reached) >= 2, [ch.message for ch in calls]
    for ch in reached:
        _check_calls(ch, set(SCHEMA), single=True)
        assert ch.message.content is None and not ch.message.reasoning_content.startswith(F31.calls_begin)


# ---- engine level: where the masks start, and MTP speculation ------------------------------------------------

@pytest.fixture(scope="module")
def counting():
    return counting_model(64)


PROMPT = [6, 8, 10]  # the counting model continues 12, 14, 16, 18, 20, 22, ...


# the marker's last token, 22, is one the MTP module drafts (after pending 20, K = 1 and 2): its drafts are cut there
@pytest.mark.parametrize("marker", [(22,), (20, 22)], ids=["one-token", "two-token"])
def test_engine_masks_only_after_the_marker_and_speculation_agrees(counting, marker, monkeypatch):
    schema = MLA_SCHEMAS[0]
    opts = SamplingOptions(max_tokens=30, grammar=json_grammar(schema), grammar_after=marker)
    reqs = [(PROMPT, opts), ([3, 6, 9], SamplingOptions(max_tokens=30, grammar=json_grammar(schema)))]
    fills, fill = [], llg_np.fill_next_token_bitmask
    monkeypatch.setattr(llg_np, "fill_next_token_bitmask", lambda *a: fills.append(1) or fill(*a))
    (off, plain), _ = _run(counting, reqs)
    monkeypatch.undo()
    out = _tokens(off)
    cut = out.index(22) + 1
    assert out[:cut] == [12, 14, 16, 18, 20, 22]  # the model's own tokens, unmasked (the grammar forbids 12 first)
    assert off[-1].finish_reason == "stop" and _valid(json.loads(bytes(out[cut:])), schema), out
    # one fill per token after the marker, none before (plus the grammar-from-the-start row's one per token)
    assert len(fills) == len(out) - cut + len(_tokens(plain))
    assert _tokens(plain)[0] in range(48, 58)  # the row without grammar_after: a digit first
    for k in (1, 2):
        (on, on_plain), eng = _run(counting, reqs, speculative="mtp", draft_tokens=k)
        assert (_tokens(on), _tokens(on_plain)) == (out, _tokens(plain)) and on[-1].finish_reason == "stop"
        assert eng.accepted > 0


def test_engine_without_the_marker_runs_free_to_its_limit(counting):
    opts = SamplingOptions(max_tokens=8, grammar=json_grammar(MLA_SCHEMAS[0]), grammar_after=(63,))
    (events,), _ = _run(counting, [([6, 8, 10], opts)])
    (free,), _ = _run(counting, [([6, 8, 10], SamplingOptions(max_tokens=8))])
    assert _tokens(events) == _tokens(free) == list(range(12, 28, 2)) and events[-1].finish_reason == "length"
