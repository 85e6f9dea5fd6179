"""Reasoning the output opens itself, under a grammar: with ``--reasoning-parser deepseek`` and a prompt that neither
opens nor closes reasoning (R1's original template, whose model writes ``<think>`` first), the grammar of
``tool_choice`` "required" / named or ``response_format`` holds from the first token, but the first token(s) may
be the begin marker instead (``SamplingOptions.grammar_open``, ``flyer.serve.grammar.Matcher.opening``); an output
that opens reasoning reasons free until ``</think>`` and its grammar holds after it, as a prompt-opened one's.
Also ``--speculative mtp`` with reasoning first and a grammar, through the openai client: greedy answers equal
speculation off's.

- ``GrammarMasks`` alone (byte tokens): the first mask is the grammar's plus the marker's first token; a marker
  of several tokens that the grammar refuses allows only the marker's next token once begun, one that the grammar
  allows keeps both; abandoning a refused marker is an error, abandoning an allowed one leaves the grammar's state.
- Engine level, the counting model (``tests/trained.py``; PROMPT continues 12, 14, ..., 22, 24, ...): the marker
  (12,) or (12, 14) is the model's own first token(s), so it opens; the tokens up to the end marker (22,) are the
  model's unmasked ones (no mask filled), those after it valid JSON, MTP speculation (K = 1, 2) gives the same
  tokens. A marker the
  model does not choose ((61,)) leaves the answer the grammar's from the first token. The first token's reported
  logprobs are the masked distribution's (its alternatives the grammar's or the marker).
- Through the openai client (an R1-style template; the model steered as ``tests/test_serve_reasoning_grammar.py``
  steers it): ``<think>``, reasoning, ``</think>``, then JSON / calls: split into ``reasoning_content`` and the
  constrained part, streamed and whole; steered without ``<think>``: JSON from the first token.

Token comparisons are exact (the steering bonus dwarfs these random FP32 models' logits; the counting model's
greedy margins are clear, ``tests/test_serve_grammar_spec.py``; the MTP comparison is of one model's greedy tokens
through two paths whose verify logits equal plain decoding's up to FP32 summation order, and its margins are
checked against that bound with ``tests/bounds.py``)."""

import json

import llguidance.numpy as llg_np
import pytest
import torch
from bounds import FP32_U, logit_scale
from hf_models import add_mtp_layer, build
from served import EngineServer
from test_serve_reasoning import ASK, _agree
from test_serve_reasoning import TEMPLATE as V31_TEMPLATE
from test_serve_reasoning import ckpt as v31_ckpt  # noqa: F401  (a fixture)
from test_serve_reasoning_grammar import JSON_TEXT, OBJ, REASONING, STEER, _script, _steer
from test_serve_structured import _fmt, _run, _tokens, _valid
from test_serve_tools import MARKERS, SCHEMA, TOOLS, _check_calls
from tokenizers import AddedToken
from trained import counting_model
from transformers import PreTrainedTokenizerFast

from flyer.data.chat_template import read_chat_template
from flyer.infer.cli import ByteTokenizer
from flyer.interop.hf import load_hf
from flyer.serve.api import Api
from flyer.serve.engine import Engine, EngineConfig, SamplingOptions
from flyer.serve.grammar import GrammarMasks, Matcher, json_grammar
from flyer.serve.reasoning import DEEPSEEK
from flyer.serve.tools import DEEPSEEK_V31 as F31

# R1's original template: the generation prompt is the assistant's tag alone (its model writes <think> itself)
R1_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
               "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}{{ eos_token }}{% endif %}"
               "{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}")


# ---- GrammarMasks alone ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def masks():
    return GrammarMasks(ByteTokenizer(), 300, torch.device("cpu"))


def _opening(masks, schema, marker: bytes) -> Matcher:
    m = masks.matcher(json_grammar(schema))
    return Matcher(m.llg, list(marker), m.llg.deep_copy())


def test_the_first_mask_adds_the_markers_next_token(masks):
    plain = masks.allowed([masks.matcher(json_grammar(OBJ))])[0]
    m = _opening(masks, OBJ, b"<t>")
    first = masks.allowed([m])[0]
    want = plain.clone()
    want[ord("<")] = True
    assert not plain[ord("<")] and torch.equal(first, want)
    # begun: the grammar refused "<", so only the marker goes on, until it is whole (opened)
    assert masks.consume(m, ord("<")) is None and m.refused
    assert torch.nonzero(masks.allowed([m])[0]).flatten().tolist() == [ord("t")]
    assert not masks.hold(m, ord("t"))  # no drafts while the output may still open reasoning
    masks.consume(m, ord("t"))
    masks.consume(m, ord(">"))
    assert m.opened
    # a refused marker abandoned: an error (the grammar never saw the marker's tokens written)
    m = _opening(masks, OBJ, b"<t>")
    masks.consume(m, ord("<"))
    assert masks.consume(m, ord("{")) == "error"


def test_a_marker_the_grammar_allows_keeps_both(masks):
    """A marker whose first token the grammar allows ("{"): after it, the grammar's tokens and the marker's next;
    abandoned there, the grammar goes on from its state after "{" (the answer is valid JSON)."""
    m = _opening(masks, {"type": "object"}, b"{!")
    assert masks.consume(m, ord("{")) is None and not m.refused and m.opening == (ord("!"),)
    allowed = masks.allowed([m])[0]
    assert allowed[ord("!")] and allowed[ord("}")] and allowed[ord('"')] and not allowed[ord("{")]
    # no drafts while the marker may go on, even one the grammar takes: its verify pass chooses it under this mask
    assert not masks.hold(m, ord('"')) and not m.held
    assert masks.consume(m, ord("}")) == "stop" and not m.opening and not m.opened


# ---- engine level ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def counting():
    return counting_model(64)


PROMPT = [6, 8, 10]  # the counting model continues 12, 14, 16, 18, 20, 22, ...
SCHEMA0 = {"type": "integer", "minimum": 0, "maximum": 500000}  # digits (48-57), which the model never picks first


# a one-token begin marker (DeepSeek's <think>) and a two-token one (a marker as text): its second token is chosen
# at a decode step, where the row drafts nothing until the marker is whole
@pytest.mark.parametrize("opening", [(12,), (12, 14)], ids=["one-token", "two-token"])
def test_engine_output_opens_reasoning_then_its_grammar_holds(counting, opening, monkeypatch):
    opts = SamplingOptions(max_tokens=30, grammar=json_grammar(SCHEMA0), grammar_after=(22,), grammar_open=opening,
                           logprobs=3)
    fills, fill = [], llg_np.fill_next_token_bitmask
    monkeypatch.setattr(llg_np, "fill_next_token_bitmask", lambda *a: fills.append(1) or fill(*a))
    (events,), _ = _run(counting, [(PROMPT, opts)])
    monkeypatch.undo()
    out = _tokens(events)
    cut = out.index(22) + 1
    assert out[:cut] == [12, 14, 16, 18, 20, 22]  # opened, then the model's own tokens (the grammar forbids them)
    assert events[-1].finish_reason == "stop" and _valid(json.loads(bytes(out[cut:])), SCHEMA0), out
    # one fill per marker token (the grammar's and the marker's), none while reasoning, one per token after it
    assert len(fills) == len(opening) + len(out) - cut
    # the first token's alternatives: the grammar's (digits) or the marker, from the masked distribution
    first = events[0]
    assert set(first.top_logprobs) <= {12, *range(48, 58)} and first.top_logprobs[12] == first.logprob
    assert sum(torch.tensor(list(first.top_logprobs.values())).exp()) <= 1 + 1e-6
    for k in (1, 2):
        (on,), eng = _run(counting, [(PROMPT, opts)], speculative="mtp", draft_tokens=k)
        assert _tokens(on) == out and on[-1].finish_reason == "stop" and eng.accepted > 0


def test_engine_output_that_does_not_open_is_the_grammars(counting):
    """The marker (61,) is not the model's choice: the answer is the grammar's from the first token, as without a
    marker (speculation on or off), and the first token's alternatives leave room only for the marker's."""
    grammar = json_grammar(SCHEMA0)
    (plain,), _ = _run(counting, [(PROMPT, SamplingOptions(max_tokens=12, grammar=grammar, logprobs=11))])
    opts = SamplingOptions(max_tokens=12, grammar=grammar, grammar_after=(22,), grammar_open=(61,), logprobs=11)
    for cfg in ({}, dict(speculative="mtp", draft_tokens=2)):
        (events,), _ = _run(counting, [(PROMPT, opts)], **cfg)
        assert _tokens(events) == _tokens(plain) and _tokens(plain)[0] in range(48, 58)
        assert set(events[0].top_logprobs) == {61, *range(48, 58)}
        assert set(plain[0].top_logprobs) == set(range(48, 58))
        _valid(json.loads(bytes(_tokens(events))), SCHEMA0)


# ---- through the openai client --------------------------------------------------------------------------------

def _serve(path, template: str | None = None, **cfg) -> EngineServer:
    model, _, tok = load_hf(path)
    s = EngineServer(Engine(model, EngineConfig(kv_cache_bytes=1 << 24, block_size=16, **cfg), tokenizer=tok),
                     lambda link: Api(link, tok, "tiny-test", chat_template=template or read_chat_template(str(path)),
                                      reasoning_parser="deepseek"))
    s.tok = tok
    return s


@pytest.fixture(scope="module")
def r1(v31_ckpt):  # noqa: F811
    s = _serve(v31_ckpt, R1_TEMPLATE)
    yield s
    s.close()


def _ask(**kw) -> dict:
    return {**dict(tools=TOOLS, temperature=0, max_tokens=600), **kw}


def test_r1_output_opens_reasoning_then_json_or_calls(r1, monkeypatch):
    """Steered: <think>, reasoning, </think>, then JSON / calls (required, single): split, parsed, streamed."""
    tok, c = r1.tok, r1.client()
    _steer(monkeypatch, _script(tok, DEEPSEEK.begin, REASONING, DEEPSEEK.end, JSON_TEXT))
    usage = _agree(c, REASONING, JSON_TEXT, "stop", **_ask(response_format=_fmt(OBJ)))
    assert usage.completion_tokens_details.reasoning_tokens == len(_script(tok, DEEPSEEK.begin, REASONING))
    args = '{"city":"oslo","celsius":true,"days":2}'
    _steer(monkeypatch, _script(tok, DEEPSEEK.begin, REASONING, DEEPSEEK.end, F31.render([("get_weather", args)])))
    _agree(c, REASONING, None, "tool_calls", [("get_weather", args)], **_ask(tool_choice="required"))


def test_r1_output_without_the_marker_is_constrained_from_the_first_token(r1, monkeypatch):
    """Steered towards reasoning without <think>: the answer is JSON from the first token (no reasoning)."""
    tok, c = r1.tok, r1.client()
    _steer(monkeypatch, _script(tok, REASONING, DEEPSEEK.end, JSON_TEXT))
    r = c.chat.completions.create(model="tiny-test", messages=ASK,  # "none": "auto" would allow a calls block too
                                  **_ask(response_format=_fmt(OBJ), max_tokens=120, tool_choice="none"))
    m = r.choices[0].message
    assert m.reasoning_content is None and REASONING not in m.content and _valid(json.loads(m.content), OBJ), m
    calls = c.chat.completions.create(model="tiny-test", messages=ASK, parallel_tool_calls=False,
                                      **_ask(tool_choice="required", max_tokens=400)).choices[0]
    _check_calls(calls, set(SCHEMA), single=True)
    assert calls.message.reasoning_content is None


# ---- --speculative mtp with reasoning first, through the openai client ----------------------------------------

@pytest.fixture(scope="module")
def mtp_ckpt(tmp_path_factory):
    """``tests/test_serve_reasoning.py``'s checkpoint (V3.1-shaped template, the markers as added tokens) with one
    MTP layer."""
    path = tmp_path_factory.mktemp("reasoning_mtp") / "v3"
    add_mtp_layer(build("v3", path), path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 1024}))
    hf = PreTrainedTokenizerFast.from_pretrained(path)
    hf.add_tokens([AddedToken(m, special=True, normalized=False) for m in MARKERS], special_tokens=True)
    hf.add_tokens([AddedToken(m, special=False, normalized=False) for m in (DEEPSEEK.begin, DEEPSEEK.end)])
    hf.chat_template = V31_TEMPLATE
    hf.save_pretrained(path)
    return path


def _greedy_margins_clear(model, choice, n_ctx: int) -> None:
    """Each greedy token's (masked) logprob beats the next alternative's by more than twice how far an FP32 logit
    moves in another summation order (``test_serve_structured._tolerance``'s bound, with ``logit_scale``): the
    verify pass and plain decoding then choose the same token."""
    cfg = model.cfg
    tol = cfg.n_layers * (cfg.dim + cfg.inter_dim + n_ctx) * FP32_U * logit_scale(model)
    for t in choice.logprobs.content:
        alts = sorted((a.logprob for a in t.top_logprobs), reverse=True)
        assert t.logprob == alts[0] and (len(alts) < 2 or alts[0] - alts[1] > 2 * tol), (t, tol)


def _answer(choice) -> tuple:
    """A choice's answer, less the calls' ids (random)."""
    m = choice.message
    calls = [(c.function.name, c.function.arguments) for c in m.tool_calls or []]
    return m.reasoning_content, m.content, calls, choice.finish_reason


# the bias on </think> that brings it after some reasoning (both within max_tokens), found by trying
@pytest.mark.parametrize("template, bias", [("v31-thinking", 1), ("r1", 1)])
def test_speculation_with_reasoning_first_equals_speculation_off(mtp_ckpt, template, bias, monkeypatch):
    """Greedy, thinking mode (the prompt opens reasoning) or R1's template (the output opens it: its first token
    steered to <think>, which MTP never drafts): random weights reason freely until </think> (a logit bias brings
    it), then the calls ("required") or JSON; ``--speculative mtp`` (K = 2) answers the same, drafts kept."""
    tpl = R1_TEMPLATE if template == "r1" else None
    spec, plain = _serve(mtp_ckpt, tpl, speculative="mtp", draft_tokens=2), _serve(mtp_ckpt, tpl)
    try:
        tok = plain.tok
        if template == "r1":  # the first token steered, then the request's own adjustments (its logit bias)
            begin, adjust = tok.tok.token_to_id(DEEPSEEK.begin), SamplingOptions.adjust
            monkeypatch.setattr(SamplingOptions, "adjust", lambda self, logits_V, generated, prompt=(): adjust(
                self, logits_V, generated, prompt) if generated else logits_V.index_add_(0, torch.tensor([begin]),
                                                                                 torch.tensor([STEER])))
        end = tok.tok.token_to_id(DEEPSEEK.end)
        kw = dict(model="tiny-test", messages=ASK, temperature=0, logprobs=True, top_logprobs=2, max_tokens=160,
                  logit_bias={str(end): bias}, extra_body={"chat_template_kwargs": {"thinking": True}})
        cases = [dict(response_format=_fmt(OBJ)), dict(tools=TOOLS, tool_choice="required", parallel_tool_calls=False)]
        for case in cases:
            want = plain.client().chat.completions.create(**kw, **case).choices[0]
            got = spec.client().chat.completions.create(**kw, **case).choices[0]
            assert len(want.message.reasoning_content) > 20 and want.finish_reason in ("stop", "tool_calls"), want
            if "tools" in case:
                _check_calls(want, set(SCHEMA), single=True)
            else:
                assert _valid(json.loads(want.message.content), OBJ)
            _greedy_margins_clear(plain.engine.model, want, 1024)
            assert _answer(got) == _answer(want)
            assert [t.token for t in got.logprobs.content] == [t.token for t in want.logprobs.content]
        assert spec.engine.accepted > 0
    finally:
        spec.close()
        plain.close()
