"""Edges of the request bodies (``flyer.serve.schema``) and the engine's grammar side (``flyer.serve.grammar``) a
mutation sweep found unpinned (each assertion fails on the mutant it names): every bound at its limit and one past
it, fields that need another, and four engine paths: an end marker of two tokens spelled in other tokens, a token
that ends the reasoning and completes the grammar with the text it carries, a grammar that refused the begin
marker's first token while the output wrote it, and a tokenizer with two end-of-text ids."""

import json

import pytest
import torch
from pydantic import ValidationError
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from flyer.errors import FieldError
from flyer.infer.cli import ByteTokenizer
from flyer.interop.hf_tokenizer import TextTokenizer
from flyer.serve.grammar import MAX_SCHEMA_CHARS, GrammarMasks, Matcher, json_grammar, schema_json
from flyer.serve.request import Request, SamplingOptions
from flyer.serve.schema import (MAX_STOP_CHARS, MAX_STOPS, MAX_TEMPLATE_KWARGS_CHARS, ChatBody, CompletionBody,
                                ResponseFormat, Tool)
from flyer.serve.tools import tool_grammar

CHAT = dict(model="m", messages=[{"role": "user", "content": "x"}])
TEXT = dict(model="m", prompt="x")


def _refused(field, make):
    with pytest.raises(FieldError) as e:
        make()
    assert e.value.field == field, e.value


def test_stop_strings_at_their_bounds():
    assert len(CompletionBody(**TEXT, stop=["x"] * MAX_STOPS).stop_strings()) == MAX_STOPS
    assert CompletionBody(**TEXT, stop="x" * MAX_STOP_CHARS).stop_strings() == ["x" * MAX_STOP_CHARS]
    for stop in (["x"] * (MAX_STOPS + 1), "x" * (MAX_STOP_CHARS + 1), ["a", ""]):  # an empty one after another
        _refused("stop", lambda stop=stop: CompletionBody(**TEXT, stop=stop).stop_strings())


def test_names_as_openai_bounds_them():
    """A json_schema's and a function's name: up to 64 of letters, digits, "_" and "-"."""
    for name in ("a" * 64, "my-schema_2"):
        assert ResponseFormat.model_validate({"type": "json_schema", "json_schema": {"name": name}})
        assert Tool.model_validate({"type": "function", "function": {"name": name}})
    for name in ("a" * 65, "my schema"):
        with pytest.raises(ValidationError):
            ResponseFormat.model_validate({"type": "json_schema", "json_schema": {"name": name}})
        with pytest.raises(ValidationError):
            Tool.model_validate({"type": "function", "function": {"name": name}})


def test_fields_that_need_another():
    """stream_options (even {}) needs stream; top_logprobs (even 0) needs logprobs; max_tokens 0 needs echo (with
    logprobs too: nothing to score)."""
    _refused("stream_options", lambda: ChatBody(**CHAT, stream_options={}).check_fields())
    _refused("top_logprobs", lambda: ChatBody(**CHAT, top_logprobs=0).check_fields())
    _refused("max_tokens", lambda: CompletionBody(**TEXT, max_tokens=0, logprobs=1).check_fields())
    CompletionBody(**TEXT, max_tokens=0, logprobs=1, echo=True).check_fields()
    ChatBody(**CHAT, stream=True, stream_options={}).check_fields()


def test_chat_template_kwargs_at_their_bounds():
    """Keys must be template variable names (not starting with a digit); the JSON text at most
    ``MAX_TEMPLATE_KWARGS_CHARS`` long."""
    _refused("chat_template_kwargs", lambda: ChatBody(**CHAT, chat_template_kwargs={"1x": True}).check_fields())
    at = {"a": "x" * (MAX_TEMPLATE_KWARGS_CHARS - len(json.dumps({"a": ""})))}
    assert len(json.dumps(at)) == MAX_TEMPLATE_KWARGS_CHARS
    ChatBody(**CHAT, chat_template_kwargs=at).check_fields()
    _refused("chat_template_kwargs",
             lambda: ChatBody(**CHAT, chat_template_kwargs={"a": at["a"] + "x"}).check_fields())


def test_an_empty_tools_list_is_no_tools():
    """``tools: []`` calls nothing (vLLM's reading; OpenAI's API refuses an empty list), and legacy ``functions:
    []`` changes nothing."""
    assert ChatBody(**CHAT, tools=[]).tool_mode() == ("none", None)
    ChatBody(**CHAT, functions=[]).check_fields()
    _refused("functions", lambda: ChatBody(**CHAT, functions=[{"name": "f"}]).check_fields())


def test_a_schema_at_the_size_bound_compiles():
    """The bound counts the schema's compact JSON text, each character once: 30,000 "é" (six characters each as
    ``\\u`` escapes) are under it, as a function's parameters too."""
    at = {"enum": ["a" * (MAX_SCHEMA_CHARS - len(schema_json({"enum": [""]})))]}
    assert len(schema_json(at)) == MAX_SCHEMA_CHARS
    json_grammar(at)
    _refused("response_format", lambda: json_grammar({"enum": [at["enum"][0] + "a"]}))
    wide = {"enum": ["é" * 30_000]}
    assert len(json.dumps(wide)) > MAX_SCHEMA_CHARS
    json_grammar(wide)
    tool_grammar([{"name": "f", "parameters": {"type": "object", "properties": {"x": wide}}}], ByteTokenizer())


# ---- the engine's side ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE tokenizer with two end-of-text ids (Llama 3's turn end, then its text end) and ``</think>``'s
    pieces as added tokens: it encodes as ``</th`` ``ink>``, and ``</`` ``think>`` decodes to it too; ``ink>"a"``
    carries text past it."""
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(['{"a": 1}', "hello world", "true false"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|end_of_text|>", "<|eot_id|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.add_tokens([AddedToken(p, normalized=False) for p in ("</th", "ink>", "</", "think>", 'ink>"a"')])
    return TextTokenizer(t, eos=[t.token_to_id("<|eot_id|>"), t.token_to_id("<|end_of_text|>")])


def _feed(tok, opts, ids):
    """Each token's finish reason as the engine feeds its chosen ones (``GrammarMasks.follow``), and the request."""
    masks = GrammarMasks(tok, tok.tok.get_vocab_size(), torch.device("cpu"))
    r = Request(0, [1], opts, emit=lambda e: None)
    r.matcher, r.deferred = masks.start(opts)
    reasons = []
    for t in ids:
        r.tokens.append(t)
        reasons.append(masks.follow(r, t))
    return reasons, r


def test_an_end_marker_of_two_tokens_spelled_in_others(bpe):
    """The grammar waits for ``</think>`` (two ids): the model writing it as ``</`` ``think>`` ends the reasoning
    all the same (the output's text is watched), and a token carrying the whole answer past the marker completes
    the grammar: "stop"."""
    after = tuple(bpe.encode_ids("</think>", add_special_tokens=False))
    assert [bpe.tok.id_to_token(i) for i in after] == ["</th", "ink>"]
    opts = SamplingOptions(max_tokens=99, grammar=json_grammar({"enum": ["a"]}), grammar_after=after)
    hello, answer = (bpe.encode_ids(s, add_special_tokens=False) for s in ("hello", '"a"'))
    lt, think = bpe.tok.token_to_id("</"), bpe.tok.token_to_id("think>")
    reasons, r = _feed(bpe, opts, [*hello, lt, think, *answer])
    assert reasons[-1] == "stop" and r.deferred is None
    reasons, r = _feed(bpe, opts, [*hello, after[0], bpe.tok.token_to_id('ink>"a"')])
    assert reasons == [None] * len(hello) + [None, "stop"]


def test_a_grammar_that_refused_the_begin_markers_start():
    """The output may open reasoning (``<think>``, bytes); the grammar (a boolean) refused its ``<``: the output
    leaving the marker after ``<t`` (``<true``) is an error, though the grammar would take ``true``."""
    masks = GrammarMasks(ByteTokenizer(), 300, torch.device("cpu"))
    base = masks.matcher(json_grammar({"type": "boolean"}))
    m = Matcher(base.llg, tuple(b"<think>"), base.llg.deep_copy())
    assert [masks.consume(m, t) for t in b"<tr"] == [None, None, "error"]


def test_every_end_of_text_id_ends_a_complete_grammar(bpe):
    masks = GrammarMasks(bpe, bpe.tok.get_vocab_size(), torch.device("cpu"))
    m = masks.matcher(json_grammar({"enum": ["a"]}))
    ids = bpe.encode_ids('"a"', add_special_tokens=False)
    assert m.llg.try_consume_tokens(ids) == len(ids)
    allowed = masks.allowed([m])[0]
    assert allowed[list(bpe.eos_ids())].all() and int(allowed.sum()) == 2
