"""Structured outputs under MTP speculation (``flyer.serve.speculation`` with ``flyer.serve.grammar``): a grammar
row drafts under its grammar and its verified logits are masked at every position with the grammar's state after
the accepted prefix.

- greedy grammar rows (K = 1 and 2; the counting MLA model and tiny-v4 trained a few steps: ``tests/trained.py``,
  ``tests/test_v4_speculative.py``) give exactly the tokens of the engine without speculation, validate against
  their schemas, and keep drafts (the old behaviour, grammar rows drafting none, keeps none);
- seeded sampling reproduces and validates, and keeps drafts;
- a grammar completed by a draft before the row's last ends the row there ("stop"), nothing after it kept;
- a plain row beside grammar rows gives the tokens (and top logprobs' ids) it gives beside none;
- mutations: the verify pass's logits left unmasked at the draft positions, or the matcher not rolled back after
  a rejection: the tokens differ from the reference (or the row ends in "error").

Tolerance: exact tokens, as ``tests/test_serve_structured.py`` and ``tests/test_serve_spec_cutoff.py`` compare
them: the verify pass and the batched paged path compute the same FP32 sums in other orders, and a masked greedy
token differs only where two allowed logits lie within that difference (the counting model's margins are clear,
random FP32 weights make a near-tie improbable); the mutations change tokens by choice, not by rounding."""

import json

import llguidance.numpy as llg_np
import pytest
import torch
from test_serve_structured import _tokens, _valid, run_all

from flyer.infer.cli import ByteTokenizer
from flyer.infer.hybrid_cache import HybridCache
from flyer.serve.engine import Engine, EngineConfig, SamplingOptions
from flyer.serve.grammar import GrammarMasks, Matcher, json_grammar, marker_ends
from flyer.serve.paged_hybrid import make_mtp_hybrid_cache
from flyer.serve.request import Request
from flyer.serve.speculation import MtpSpeculator
from test_v4_speculative import PATTERN, pattern_trained
from trained import counting_model

V4_BS = 16  # the least block size tiny-v4's ratios 4 and 16 divide
# the counting model's 64 ids hold the digits, '"', ',' and '-' of these schemas' JSON
MLA_SCHEMAS = [{"type": "integer", "minimum": 0, "maximum": 500000}, {"enum": ["12", "34567", "6", "345678"]},
               {"enum": ["1234", "1290"]}]
COLOR = {"enum": ["red", "green", "blue"]}
V4_SCHEMAS = [{"type": "object", "properties": {"color": COLOR, "ok": {"type": "boolean"},
                                                "n": {"type": "integer", "minimum": 0, "maximum": 99}},
               "required": ["color", "ok", "n"], "additionalProperties": False},
              {"enum": ["alpha beta", "alpine", "gamma"]}]


@pytest.fixture(scope="module")
def models():
    return {"mla": counting_model(64), "v4": pattern_trained()}


def _engine(kind: str, model, **over) -> Engine:
    if kind == "mla":
        cfg = EngineConfig(kv_cache_bytes=1 << 22, block_size=4, cache_dtype=torch.float32, prefill_chunk=8, **over)
    else:
        probe = HybridCache.paged(model.cfg, 1, 1, V4_BS, torch.float32, "meta")
        slot = probe.window_bytes() + make_mtp_hybrid_cache(model.cfg, 1, torch.float32, "meta").window_bytes()
        cfg = EngineConfig(kv_cache_bytes=5 * slot + 60 * probe.block_bytes(), block_size=V4_BS, max_batch_size=5,
                           cache_dtype=torch.float32, **over)
    return Engine(model, cfg, tokenizer=ByteTokenizer())


def _run(kind: str, model, requests, **over) -> tuple[list[list], Engine]:
    return run_all(_engine(kind, model, **over), requests)


def _requests(kind: str, temperature: float = 0.0, seed: int | None = None) -> list:
    if kind == "mla":
        prompts, schemas = [[6, 8, 10], [3, 6, 9], [50, 51, 52, 53], [34, 49, 50]], [*MLA_SCHEMAS, MLA_SCHEMAS[0]]
    else:
        prompts, schemas = [(PATTERN * 3)[:13], (PATTERN * 3)[4:10], (PATTERN * 3)[2:21]], [*V4_SCHEMAS, V4_SCHEMAS[0]]
    return [(p, SamplingOptions(max_tokens=40, temperature=temperature, seed=None if seed is None else seed + i,
                                grammar=json_grammar(s), logprobs=2)) for i, (p, s) in enumerate(zip(prompts, schemas))]


def _check_valid(events, schema) -> None:
    text = bytes(_tokens(events))
    assert events[-1].finish_reason == "stop", text
    assert _valid(json.loads(text), schema), text


def _schemas(kind: str) -> list[dict]:
    return [*MLA_SCHEMAS, MLA_SCHEMAS[0]] if kind == "mla" else [*V4_SCHEMAS, V4_SCHEMAS[0]]


@pytest.mark.parametrize("kind, K", [("mla", 1), ("mla", 2), ("v4", 1), ("v4", 2)])
def test_greedy_grammar_rows_draft_and_equal_the_engine_without_speculation(models, kind, K, monkeypatch):
    """Also the cost: one bitmask fill per grammar row and verified position (its drafts + 1 a verify pass, its
    first token after the prompt): the drafts' masks are the verify pass's."""
    model, reqs = models[kind], _requests(kind)
    off, _ = _run(kind, model, reqs)
    fills, verified, fill = [], [], llg_np.fill_next_token_bitmask
    accept = MtpSpeculator.accept
    monkeypatch.setattr(llg_np, "fill_next_token_bitmask", lambda *a: fills.append(1) or fill(*a))
    monkeypatch.setattr(MtpSpeculator, "accept", lambda self, r, hv, lg, q, d, p: verified.append(len(d) + 1)
                        or accept(self, r, hv, lg, q, d, p))
    on, eng = _run(kind, model, reqs, speculative="mtp", draft_tokens=K)
    monkeypatch.undo()
    assert len(fills) == sum(verified) + len(reqs)
    print(f"{kind} K={K}: accepted {eng.accepted} of {eng.drafted} grammar drafts")
    assert [_tokens(e) for e in on] == [_tokens(e) for e in off]
    # the logprobs of the masked distribution that chose each token, as without speculation (ids: exact)
    assert [[sorted(e.top_logprobs) for e in ev if e.token is not None] for ev in on] == \
        [[sorted(e.top_logprobs) for e in ev if e.token is not None] for ev in off]
    for events, s in zip(on, _schemas(kind)):
        _check_valid(events, s)
    assert eng.accepted > 0  # grammar rows only: drafts theirs, kept


@pytest.mark.parametrize("kind", ["mla", "v4"])
def test_seeded_sampling_reproduces_validates_and_keeps_drafts(models, kind):
    model, reqs = models[kind], _requests(kind, temperature=1.0, seed=7)
    a, eng = _run(kind, model, reqs, speculative="mtp", draft_tokens=2)
    b, _ = _run(kind, model, reqs, speculative="mtp", draft_tokens=2)
    assert [_tokens(e) for e in a] == [_tokens(e) for e in b]
    for events, s in zip(a, _schemas(kind)):
        _check_valid(events, s)
    assert eng.accepted > 0


def test_a_grammar_completed_mid_draft_ends_the_row_there(models, monkeypatch):
    """K = 3 over enums whose values the drafts complete before their third: the drafting stops at the completing
    token (fewer drafts than asked), the row ends "stop" at it and emits nothing after it."""
    model = models["mla"]
    seen = []  # (drafts asked, drafts made, the grammar complete after them) per grammar row and step
    draft = MtpSpeculator.draft

    def spy(self, rows, ks):
        groups = draft(self, rows, ks)
        made = {id(r): (len(d), r.matcher.llg.is_stopped()) for g in groups for r, d in zip(g[0], g[2])}
        seen.extend((k, *made[id(r)]) for r, k in zip(rows, ks))
        return groups
    monkeypatch.setattr(MtpSpeculator, "draft", spy)
    reqs = [([6, 8, 10], SamplingOptions(max_tokens=30, grammar=json_grammar({"enum": ["12", "6"]}))),
            ([3, 6, 9], SamplingOptions(max_tokens=30, grammar=json_grammar(MLA_SCHEMAS[2])))]
    on, _ = _run("mla", model, reqs, speculative="mtp", draft_tokens=3)
    monkeypatch.undo()
    off, _ = _run("mla", model, reqs)
    assert any(made < asked and done for asked, made, done in seen), seen
    for e_on, e_off, s in zip(on, off, [{"enum": ["12", "6"]}, MLA_SCHEMAS[2]]):
        assert _tokens(e_on) == _tokens(e_off)
        _check_valid(e_on, s)
        assert [e.finish_reason for e in e_on[:-1]] == [None] * (len(e_on) - 1)


@pytest.mark.parametrize("kind", ["mla", "v4"])
def test_plain_rows_beside_grammar_rows_are_unchanged(models, kind):
    model = models[kind]
    prompts = ([5, 7, 9, 11], [1, 2, 3]) if kind == "mla" else ((PATTERN * 3)[:9], (PATTERN * 3)[5:16])
    plain = [(prompts[0], SamplingOptions(max_tokens=14, logprobs=2)),
             (prompts[1], SamplingOptions(max_tokens=14, temperature=1.0, seed=3, logprobs=2))]
    grammar = _requests(kind)[:3]
    mixed, eng = _run(kind, model, [grammar[0], plain[0], grammar[1], plain[1], grammar[2]], speculative="mtp",
                      draft_tokens=2)
    alone, _ = _run(kind, model, plain, speculative="mtp", draft_tokens=2)
    for got, ref in zip([mixed[1], mixed[3]], alone):
        assert _tokens(got) == _tokens(ref) and len(_tokens(ref)) == 14
        assert [sorted(e.top_logprobs) for e in got] == [sorted(e.top_logprobs) for e in ref]
    for events, s in zip([mixed[0], mixed[2], mixed[4]], _schemas(kind)):
        _check_valid(events, s)


def _unmasked_drafts(self, rows, ks):
    """The mutant: the verify pass's logits at the draft positions (all but the first) left unmasked."""
    groups = _draft(self, rows, ks)
    for g in groups:
        for a in g[4]:
            if a is not None:
                a[1:] = True
    return groups


_draft = MtpSpeculator.draft


@pytest.mark.parametrize("mutant", ["unmasked", "no_rollback"])
def test_mutations_change_the_tokens(models, monkeypatch, mutant):
    kind, model, reqs = "mla", models["mla"], _requests("mla")
    off, _ = _run(kind, model, reqs)
    if mutant == "unmasked":
        monkeypatch.setattr(MtpSpeculator, "draft", _unmasked_drafts)
    else:
        monkeypatch.setattr(GrammarMasks, "settle", staticmethod(lambda m, kept: None))
    bad, eng = _run(kind, model, reqs, speculative="mtp", draft_tokens=2)
    assert eng.drafted > eng.accepted  # rejections happened (what the rollback undoes)
    wrong = [ev for ev, ref in zip(bad, off) if _tokens(ev) != _tokens(ref) or ev[-1].finish_reason != "stop"]
    assert wrong, mutant


def _byte_masks(vocab_size: int = 300) -> GrammarMasks:
    return GrammarMasks(ByteTokenizer(), vocab_size, torch.device("cpu"))


def test_marker_ends_counts_only_a_written_marker():
    """An empty marker is never written; a marker counts only within the output's own tokens (not the prompt's
    tail), and only at its end."""
    assert not marker_ends([1, 2, 3], 3, ())
    assert marker_ends([1, 2, 3], 2, (2, 3)) and not marker_ends([1, 2, 3], 1, (2, 3))
    assert not marker_ends([1, 2, 3], 3, (1, 2))


def test_a_first_draft_may_end_the_reasoning():
    """A request that has generated nothing yet, its grammar waiting for a one-token end marker: a draft of that
    marker would end the reasoning (``ends_reasoning``), another draft would not."""
    masks = _byte_masks()
    opts = SamplingOptions(max_tokens=9, grammar=json_grammar({"type": "boolean"}), grammar_after=(ord("#"),))
    r = Request(0, [1, 2], opts, emit=lambda e: None, tokens=[1, 2])
    r.matcher, r.deferred = masks.start(opts)
    assert r.matcher is None and r.deferred is not None
    assert masks.ends_reasoning(r, [ord("#")]) and not masks.ends_reasoning(r, [ord("x")])


def test_text_after_the_end_marker_starts_the_grammar():
    """The text a token carries past the reasoning end marker is the grammar's: leading whitespace skipped, a
    completing answer "stop", a refused one "error", whitespace alone nothing yet."""
    masks = _byte_masks()
    grammar = json_grammar({"enum": ["a"]})
    assert masks.begun(masks.matcher(grammar), '\n\n"a"') == "stop"
    assert masks.begun(masks.matcher(grammar), '"') is None
    assert masks.begun(masks.matcher(grammar), "x") == "error"
    assert masks.begun(masks.matcher(grammar), "\n ") is None


def test_a_row_whose_grammar_allows_no_model_id_allows_them_all():
    """A grammar whose next byte lies past the model's vocabulary (200 ids; the euro sign's lead byte is 226)
    allows none of the model's ids: ``allowed`` lets them all through rather than a row of -inf, and the token
    chosen then ends the grammar ("error")."""
    masks = _byte_masks(200)
    m = masks.matcher(json_grammar({"const": "\u20ac"}))
    assert masks.consume(m, ord('"')) is None
    assert masks.allowed([m])[0].all()
    assert masks.consume(m, ord("a")) == "error"


def test_drafts_are_not_held_while_the_output_may_open_reasoning():
    """While the output may still open reasoning itself, a draft is not consumed tentatively (``hold`` False,
    nothing held); the token is then consumed as chosen."""
    masks = _byte_masks()
    base = masks.matcher(json_grammar({"type": "boolean"}))
    m = Matcher(base.llg, tuple(b"<think>"), base.llg.deep_copy())
    assert not GrammarMasks.hold(m, ord("t")) and m.held == []
    assert masks.consume(m, ord("t")) is None and m.opening == ()


def test_only_the_last_held_draft_completes_the_grammar():
    """Drafts held tentatively up to the grammar's end: consuming the kept ones one by one, only the last is
    "stop" (the matcher's state is already at the end while drafts are held)."""
    masks = _byte_masks()
    m = masks.matcher(json_grammar({"enum": ["a"]}))
    assert all(GrammarMasks.hold(m, t) for t in b'"a"')
    assert [masks.consume(m, t) for t in b'"a"'] == [None, None, "stop"]


def test_matchers_of_one_grammar_are_independent():
    """Two requests with the same grammar (n choices) get matchers of their own: one consuming leaves the other
    at the start."""
    masks = _byte_masks()
    grammar = json_grammar({"enum": ["a"]})
    first, second = masks.matcher(grammar), masks.matcher(grammar)
    assert [masks.consume(first, t) for t in b'"a"'] == [None, None, "stop"]
    assert masks.consume(second, ord('"')) is None and not second.llg.is_stopped()


def test_the_grammar_after_an_opened_reasoning_starts_fresh():
    """While the output may still open reasoning, the running matcher follows the begin marker's tokens (a grammar
    may take its text: here ``<think>x``, or ``y``); once the whole marker is written, the grammar after the
    reasoning starts at its start, not where the marker's tokens left the running one."""
    import llguidance
    masks = _byte_masks()
    opts = SamplingOptions(max_tokens=9, grammar=llguidance.LLMatcher.grammar_from_lark('start: "<think>x" | "y"'),
                           grammar_after=tuple(b"</think>"), grammar_open=tuple(b"<think>"))
    m, deferred = masks.start(opts)
    assert deferred is None and m.opening == tuple(b"<think>")
    assert [masks.consume(m, t) for t in b"<think>"] == [None] * 7 and m.opened
    assert m.fresh.try_consume_tokens(list(b"y")) == 1 and m.fresh.is_accepting()
