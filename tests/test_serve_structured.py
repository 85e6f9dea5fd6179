"""Structured outputs in ``flyer serve`` (``response_format``: json_object, json_schema; ``flyer.serve.grammar``):
a random tiny model's outputs under bounded schemas always parse and validate (without the schema they do not);
greedy constrained tokens equal the model's logits masked by an enumerated allowed set, argmax (a mask one step
late does not); seeded sampling reproduces, n = 2, streaming gives the same text; a row without a grammar beside
grammar rows is unchanged; bad schemas and types answer 400 naming response_format; ``--speculative mtp`` leaves
a grammar row and a plain row in one batch as speculation off does; DeepSeek-V4 with an HF tokenizer.

Token comparisons are exact, as ``tests/test_serve_engine.py`` makes them: the engine's batched paged path and
the references differ by FP32 summation order only, and the greedy reference asserts each step's margin over
that bound (``_tolerance``)."""

import json
import math

import openai
import pytest
import torch
from bounds import FP32_U
from hf_models import build
from test_serve_api import _Running
from trained import counting_model

from flyer.config import preset
from flyer.errors import FieldError
from flyer.infer.cli import ByteTokenizer
from flyer.interop.hf import load_hf
from flyer.model.transformer import Transformer
from flyer.serve.engine import Engine, EngineConfig, SamplingOptions
from flyer.serve.grammar import MAX_SCHEMA_CHARS, GrammarMasks, json_grammar
from flyer.serve.schema import ResponseFormat

COLOR = {"enum": ["red", "green", "blue"]}
SCHEMAS = [
    COLOR,
    {"type": "boolean"},
    {"type": "integer", "minimum": -3, "maximum": 12},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 4},
    {"type": "object", "properties": {"color": COLOR, "ok": {"type": "boolean"},
                                      "n": {"type": "integer", "minimum": 0, "maximum": 99},
                                      "xs": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
     "required": ["color", "ok", "n", "xs"], "additionalProperties": False},
]
MAX_TOKENS = 100  # bytes: every output of SCHEMAS (compact JSON) is shorter


def _valid(x, s: dict) -> bool:
    """x matches s, for the keywords of SCHEMAS: enum, boolean, integer ranges, arrays (maxItems), objects."""
    if "enum" in s:
        return x in s["enum"]
    kind = s["type"]
    if kind == "boolean":
        return isinstance(x, bool)
    if kind == "integer":
        return type(x) is int and s.get("minimum", -math.inf) <= x <= s.get("maximum", math.inf)
    if kind == "array":
        return isinstance(x, list) and len(x) <= s.get("maxItems", math.inf) and all(_valid(v, s["items"]) for v in x)
    return (isinstance(x, dict) and set(s["required"]) <= set(x) <= set(s["properties"])
            and all(_valid(v, s["properties"][k]) for k, v in x.items()))


def _fmt(schema: dict | None) -> dict:
    return {"type": "json_object"} if schema is None else \
        {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def served():
    """Random weights (tiny preset: 2048 ids, of which 0-255 the bytes), byte tokens."""
    torch.manual_seed(0)
    s = _Running(Transformer(preset("tiny")).eval(), kv_cache_bytes=64 * 4 * 384 * 4)
    yield s
    s.close()


def test_the_validator_refuses_what_the_schemas_refuse():
    obj = SCHEMAS[4]
    assert _valid({"color": "red", "ok": True, "n": 3, "xs": []}, obj)
    for bad in ({"color": "pink", "ok": True, "n": 3, "xs": []}, {"color": "red", "ok": 1, "n": 3, "xs": []},
                {"color": "red", "ok": True, "n": 100, "xs": []}, {"color": "red", "ok": True, "n": 3},
                {"color": "red", "ok": True, "n": 3, "xs": [True] * 4}, {**{"color": "red", "ok": True, "n": 3,
                                                                           "xs": []}, "z": 1}):
        assert not _valid(bad, obj), bad


def test_json_schema_outputs_parse_and_validate_greedy_sampled_n_choices(served):
    c = served.client()
    for schema in SCHEMAS:
        for temperature, n in ((0, 1), (1.0, 3)):
            r = c.chat.completions.create(model="tiny-test", messages=[{"role": "user", "content": "give me json"}],
                                          max_tokens=MAX_TOKENS, temperature=temperature, seed=5, n=n,
                                          response_format=_fmt(schema))
            assert len(r.choices) == n
            for ch in r.choices:
                assert ch.finish_reason == "stop", (schema, ch.message.content)
                assert _valid(json.loads(ch.message.content), schema), (schema, ch.message.content)
    # the same model without a schema: not JSON (what the grammar did)
    free = c.completions.create(model="tiny-test", prompt="give me json", max_tokens=20, temperature=0).choices[0]
    with pytest.raises(ValueError):
        json.loads(free.text)


def test_json_object_is_an_object_and_max_tokens_cuts_a_prefix(served):
    """json_object: "{" first even where a bias makes "}" the model's choice, then "}" as soon as the grammar
    allows it (stop); a limit reached before the end answers "length" with a prefix of an object."""
    c = served.client()
    bias = {str(ord("}")): 100}
    done = c.completions.create(model="tiny-test", prompt="obj", max_tokens=20, temperature=0, logit_bias=bias,
                                extra_body={"response_format": _fmt(None)}).choices[0]
    assert (done.text, done.finish_reason) == ("{}", "stop")
    assert json.loads(done.text) == {}
    free = c.completions.create(model="tiny-test", prompt="obj", max_tokens=3, temperature=0,
                                logit_bias=bias).choices[0]
    assert free.text.startswith("}")  # the bias alone
    cut = c.completions.create(model="tiny-test", prompt="obj", max_tokens=4, temperature=0,
                               extra_body={"response_format": _fmt(None)}).choices[0]
    assert cut.finish_reason == "length" and cut.text.startswith("{")


def _tolerance(model, logits_V: torch.Tensor, T: int) -> float:
    """How far a logit of an FP32 evaluation in another summation order can move (``tests/test_qwen3.py``'s
    logit_tolerance: each of L layers sums dim, inter_dim and T terms, n u each), times the largest logit."""
    cfg = model.cfg
    return cfg.n_layers * (cfg.dim + cfg.inter_dim + T) * FP32_U * float(logits_V.abs().max())


def _enum_reference(model, prompt: list[int], values: list[str], late: bool = False) -> list[int]:
    """Greedy tokens of a top-level enum of strings from plain logits: at each step the allowed bytes are those
    that keep the text a prefix of one of the values' JSON; the highest allowed logit wins; done once the text is
    a whole value. ``late``: each step masked with the previous step's allowed set (a mutant)."""
    texts = [json.dumps(v).encode() for v in values]
    out, prev = [], None
    while bytes(out) not in texts:
        partial = bytes(out)
        allowed = sorted({t[len(partial)] for t in texts if t.startswith(partial) and len(t) > len(partial)})
        if not allowed:  # the mutant left every value
            break
        use, prev = (prev or allowed) if late else allowed, allowed
        with torch.no_grad():
            logits = model(torch.tensor([prompt + out]))[0, -1]
        vals = logits[use].sort(descending=True).values
        if not late and len(use) > 1:  # the step is decided by more than rounding
            assert float(vals[0] - vals[1]) > 2 * _tolerance(model, logits, len(prompt) + len(out))
        out.append(use[int(logits[use].argmax())])
        if len(out) > 12:
            break
    return out


def test_greedy_equals_masked_argmax_of_plain_logits(served):
    values = ["red", "rose", "ruby", "blue", "black", "brown", "green"]
    c = served.client()
    model = served.engine.model
    for prompt in ("colour:", "the sky is", "x"):
        ids = list(prompt.encode())
        r = c.completions.create(model="tiny-test", prompt=prompt, max_tokens=12, temperature=0,
                                 extra_body={"response_format": _fmt({"enum": values})}).choices[0]
        ref = _enum_reference(model, ids, values)
        assert (list(r.text.encode()), r.finish_reason) == (ref, "stop")
        assert list(r.text.encode()) != _enum_reference(model, ids, values, late=True)


def test_seeded_sampling_reproduces_and_streaming_gives_the_same_text(served):
    c = served.client()
    kw = dict(model="tiny-test", messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_TOKENS,
              temperature=1.0, seed=11, n=2, response_format=_fmt(SCHEMAS[4]))
    a, b = (c.chat.completions.create(**kw) for _ in range(2))
    texts = [ch.message.content for ch in a.choices]
    assert texts == [ch.message.content for ch in b.choices]
    assert texts[0] != texts[1]  # seed and seed + 1
    streamed = ["", ""]
    for chunk in c.chat.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            streamed[ch.index] += ch.delta.content or ""
    assert streamed == texts
    # a stop string cuts the constrained text as any other
    cut = c.chat.completions.create(**{**kw, "n": 1}, stop=[","]).choices[0]
    assert (cut.message.content, cut.finish_reason) == (texts[0].split(",")[0], "stop")


def test_bad_schemas_and_types_answer_400_naming_response_format(served):
    c = served.client()
    msg = [{"role": "user", "content": "hi"}]
    bad = [{"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": "a"}}},
           {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "sometimes"}}},
           {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}},
           {"type": "json_schema", "json_schema": {"name": "x",
                                                   "schema": {"enum": ["a" * (MAX_SCHEMA_CHARS + 1)]}}},
           {"type": "json_schema"}, {"type": "xml"},
           {"type": "json_object", "json_schema": {"name": "x", "schema": {}}}]
    for fmt in bad:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="tiny-test", messages=msg, max_tokens=2, response_format=fmt)
        assert e.value.param.startswith("response_format"), (fmt, e.value.param)
        assert "response_format" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny-test", prompt="x", max_tokens=2, extra_body={"response_format": bad[1]})
    assert e.value.param == "response_format"
    ok = c.chat.completions.create(model="tiny-test", messages=msg, max_tokens=2, response_format={"type": "text"})
    assert ok.choices[0].finish_reason == "length"
    # a json_schema without its schema (optional in OpenAI's API): any JSON value
    assert ResponseFormat.model_validate({"type": "json_schema", "json_schema": {"name": "x"}}).schema_or_object() == {}
    c.chat.completions.create(model="tiny-test", messages=msg, max_tokens=2,
                              response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    # an engine without a tokenizer refuses a grammar, naming the field
    bare = Engine(served.engine.model, EngineConfig(kv_cache_bytes=1 << 20, block_size=4))
    with pytest.raises(FieldError, match="response_format"):
        bare.submit([1, 2], SamplingOptions(grammar=json_grammar(None)), lambda e: None)


# required all the way down: it compiles, and its first token's forced text never ends (past LIMITS' items)
ENDLESS = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}


def test_a_grammar_that_fails_while_generating_answers_400_naming_its_field(served):
    """A schema that compiles but whose grammar fails on its first token (``ENDLESS``: past ``LIMITS``; a bare
    ``$ref`` to itself: llguidance's own error at the first mask) is the client's input: 400 naming the field it
    came from, a stream's error chunk or failed response saying the same; never the engine's 500, nor the empty
    "stop" the bare ``$ref`` answered."""
    c = served.client()
    msg = [{"role": "user", "content": "hi"}]
    for schema in (ENDLESS, {"$ref": "#"}):
        for kw in ({}, {"stream": True}):
            with pytest.raises(openai.BadRequestError if not kw else openai.APIError) as e:
                list(c.chat.completions.create(model="tiny-test", messages=msg, max_tokens=8, response_format=_fmt(
                    schema), **kw) if kw else [c.chat.completions.create(
                        model="tiny-test", messages=msg, max_tokens=8, response_format=_fmt(schema))])
            assert e.value.type == "invalid_request_error" and "grammar limits" in e.value.message, schema
            if not kw:
                assert e.value.param == "response_format"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny-test", prompt="x", max_tokens=8, extra_body={"response_format": _fmt(ENDLESS)})
    assert e.value.param == "response_format"
    tool = {"type": "function", "function": {"name": "f", "parameters": ENDLESS}}
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny-test", messages=msg, max_tokens=8, tools=[tool], tool_choice="required")
    assert e.value.param == "tools"
    fmt = {"format": {"type": "json_schema", "name": "x", "schema": ENDLESS}}
    events = list(c.responses.create(model="tiny-test", input="hi", max_output_tokens=8, stream=True, text=fmt))
    assert events[-1].type == "response.failed" and events[-1].response.error.code == "invalid_prompt"
    with pytest.raises(openai.BadRequestError) as e:  # the Responses body's own name of the field
        c.responses.create(model="tiny-test", input="hi", max_output_tokens=8, text=fmt)
    assert e.value.param == "text.format"
    ok = c.chat.completions.create(model="tiny-test", messages=msg, max_tokens=2, response_format=_fmt(COLOR))
    assert ok.choices[0].finish_reason in ("length", "stop")  # the server goes on


def test_a_token_the_grammar_refuses_is_the_engines_failure():
    """``failed`` tells a refused token (llguidance's error names it: ``REFUSED``) or text (``begun``: no error
    set), which a mask should have prevented, from a grammar that failed by itself."""
    from flyer.serve.grammar import failed
    masks = GrammarMasks(ByteTokenizer(), 300, torch.device("cpu"))
    m = masks.matcher(json_grammar({"type": "object"}))
    assert not m.llg.consume_token(ord("x")) and failed(m, "x") == "error"
    assert masks.begun(masks.matcher(json_grammar({"type": "object"})), "x") == "error"  # text after </think>
    m = masks.matcher(json_grammar(ENDLESS))
    assert masks.allowed([m])[0, ord("{")]  # the mask first, as the engine computes it
    assert not m.llg.consume_token(ord("{")) and failed(m, "{") == "grammar"


# ---- engine level: batches with and without grammars, speculation, DeepSeek-V4 -------------------------------

def run_all(eng: Engine, requests) -> tuple[list[list], Engine]:
    """Every (prompt, SamplingOptions) of ``requests`` submitted at once to ``eng``, run until idle; their events."""
    out = [[] for _ in requests]
    for (prompt, opts), events in zip(requests, out):
        eng.submit(prompt, opts, events.append)
    eng.run_until_idle()
    return out, eng


def _run(model, requests, tokenizer=ByteTokenizer(), **cfg) -> tuple[list[list], Engine]:
    """``run_all`` on a fresh engine of ``model``."""
    return run_all(Engine(model, EngineConfig(**{**dict(kv_cache_bytes=1 << 22, block_size=4, cache_dtype=torch.float32,
                                                        prefill_chunk=8), **cfg}), tokenizer=tokenizer), requests)


def _tokens(events) -> list[int]:
    return [e.token for e in events if e.token is not None]


@pytest.fixture(scope="module")
def counting():
    """Trained on progressions mod 64 (clear greedy margins; its MTP drafts mostly kept): byte tokens < 64
    hold digits and the quote, so digit schemas fit its vocabulary."""
    return counting_model(64)


DIGITS = [{"type": "integer", "minimum": 0, "maximum": 5000}, {"enum": ["12", "345", "6", "3456"]}]


def test_a_row_without_a_grammar_is_unchanged_beside_grammar_rows(counting):
    plain = [([5, 7, 9, 11], SamplingOptions(max_tokens=12, logprobs=2)),
             ([1, 2, 3], SamplingOptions(max_tokens=12, temperature=1.0, seed=3, logprobs=2))]
    grammar = [([10, 20, 30], SamplingOptions(max_tokens=12, grammar=json_grammar(s))) for s in DIGITS]
    grammar.append(([4, 8], SamplingOptions(max_tokens=12, temperature=1.0, seed=1, grammar=json_grammar(DIGITS[0]))))
    mixed, _ = _run(counting, [grammar[0], plain[0], grammar[1], plain[1], *grammar[2:]])
    alone, _ = _run(counting, plain)
    for got, ref in zip([mixed[1], mixed[3]], alone):
        assert _tokens(got) == _tokens(ref) and len(_tokens(ref)) == 12
        assert [sorted(e.top_logprobs) for e in got] == [sorted(e.top_logprobs) for e in ref]
    for events, s in zip([mixed[0], mixed[2], mixed[4]], [*DIGITS, DIGITS[0]]):
        assert events[-1].finish_reason == "stop"
        assert _valid(json.loads(bytes(_tokens(events))), s)


def test_speculation_leaves_a_grammar_row_and_a_plain_row_as_speculation_off(counting):
    reqs = [([5, 7, 9, 11], SamplingOptions(max_tokens=16)),
            ([6, 8, 10], SamplingOptions(max_tokens=16, grammar=json_grammar(DIGITS[0]))),
            ([3, 6, 9], SamplingOptions(max_tokens=16, grammar=json_grammar(DIGITS[1])))]
    off, _ = _run(counting, reqs)
    for k in (1, 2):
        on, eng = _run(counting, reqs, speculative="mtp", draft_tokens=k)
        assert [_tokens(e) for e in on] == [_tokens(e) for e in off]
        assert [e[-1].finish_reason for e in on] == [e[-1].finish_reason for e in off] == ["length", "stop", "stop"]
        assert eng.accepted > 0  # drafts kept (the grammar rows' own: tests/test_serve_grammar_spec.py)


def test_deepseek_v4_with_a_hugging_face_tokenizer(tmp_path):
    """The llguidance tokenizer from a ``tokenizers`` BPE (its EOS the checkpoint's); a DeepSeek-V4 model's
    outputs decode to JSON matching the schema, greedy and sampled, beside a plain row."""
    build("v4", tmp_path)
    model, cfg, tok = load_hf(tmp_path)
    assert cfg.attn == "hybrid" and tok.eos_ids()
    schema = SCHEMAS[4]
    prompt = tok.encode_ids("hello world")
    g = json_grammar(schema)
    reqs = [(prompt, SamplingOptions(max_tokens=60, grammar=g)),
            (prompt, SamplingOptions(max_tokens=60, temperature=1.0, seed=2, grammar=g)),
            (prompt, SamplingOptions(max_tokens=8))]
    out, _ = _run(model.eval(), reqs, tokenizer=tok, block_size=16, kv_cache_bytes=1 << 23)
    for events in out[:2]:
        text = tok.decode(_tokens(events))
        assert events[-1].finish_reason == "stop", text
        assert _valid(json.loads(text), schema), text
    plain, _ = _run(model.eval(), reqs[2:], tokenizer=tok, block_size=16, kv_cache_bytes=1 << 23)
    assert _tokens(out[2]) == _tokens(plain[0])
