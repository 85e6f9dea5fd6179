"""Request-parsing bounds and rules of ``flyer.serve.schema``, ``flyer.serve.request`` and ``flyer.serve.tools``
pinned at their limits, with OpenAI's documented bounds, llguidance's acceptance of calls blocks and hand-computed
values as the oracles."""

import json

import llguidance
import pytest
from pydantic import ValidationError

from flyer.errors import FieldError
from flyer.infer.cli import ByteTokenizer
from flyer.serve.grammar import _limits, llg_tokenizer
from flyer.serve.request import Limits, SamplingOptions
from flyer.serve.schema import ChatBody, CompletionBody, ResponseFormat
from flyer.serve.grammar import MAX_SCHEMA_CHARS
from flyer.serve.tools import DEEPSEEK_V31 as F31
from flyer.serve.tools import MAX_TOOL_CALLS, ToolCall, content_end, parse_tool_calls, tool_grammar

CHAT = dict(model="m", messages=[{"role": "user", "content": "x"}])
TEXT = dict(model="m", prompt="x")
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def _invalid(field, make):
    with pytest.raises(ValidationError) as e:
        make()
    assert any(err["loc"][0] == field for err in e.value.errors()), e.value


def _refused(field, make):
    with pytest.raises(FieldError) as e:
        make()
    assert e.value.field == field, e.value


def _accepts(grammar: str, text: str) -> bool:
    m = llguidance.LLMatcher(llg_tokenizer(ByteTokenizer(), 1024), grammar, log_level=0, limits=_limits())
    ids = list(text.encode())
    return m.try_consume_tokens(ids) == len(ids) and m.is_accepting()


def test_top_logprobs_takes_0_to_20_as_openai_documents():
    """Chat top_logprobs: an integer between 0 and 20 (OpenAI's API reference), 21 refused naming it."""
    for k in (0, 20):
        ChatBody(**CHAT, logprobs=True, top_logprobs=k).check_fields()
    _invalid("top_logprobs", lambda: ChatBody(**CHAT, logprobs=True, top_logprobs=21))
    _invalid("top_logprobs", lambda: ChatBody(**CHAT, logprobs=True, top_logprobs=-1))


def test_temperature_and_top_p_ranges_as_openai_documents():
    """temperature in [0, 2] and top_p in (0, 1]: the ends taken, just past them refused naming the field."""
    ChatBody(**CHAT, temperature=2.0, top_p=1.0)
    ChatBody(**CHAT, temperature=0.0, top_p=1e-9)
    _invalid("temperature", lambda: ChatBody(**CHAT, temperature=2.01))
    _invalid("top_p", lambda: ChatBody(**CHAT, top_p=1.01))
    _invalid("top_p", lambda: ChatBody(**CHAT, top_p=0.0))


def test_n_takes_1_to_128():
    """n: 1 to 128 choices (OpenAI's bound), 0 and 129 refused naming n."""
    for n in (1, 128):
        assert CompletionBody(**TEXT, n=n).n == n
    for n in (0, 129):
        _invalid("n", lambda n=n: CompletionBody(**TEXT, n=n))


def test_max_tokens_defaults_and_chat_minimum():
    """Completions' max_tokens defaults to 16 (OpenAI's documented default); chat's max_tokens 0 is refused."""
    assert CompletionBody(**TEXT).max_tokens == 16
    assert ChatBody(**CHAT).max_tokens is None
    _invalid("max_tokens", lambda: ChatBody(**CHAT, max_tokens=0))
    _invalid("max_completion_tokens", lambda: ChatBody(**CHAT, max_completion_tokens=0))


def test_response_format_json_schema_only_with_its_type():
    """json_schema given with type text or json_object is refused; json_schema without a schema is any JSON ({})."""
    for kind in ("text", "json_object"):
        _invalid("json_schema", lambda kind=kind: ResponseFormat.model_validate(
            {"type": kind, "json_schema": {"name": "s"}}))
    rf = ResponseFormat.model_validate({"type": "json_schema", "json_schema": {"name": "s"}})
    assert rf.schema_or_object() == {}
    assert ResponseFormat(type="json_object").schema_or_object() is None


def test_unknown_fields_refused_unless_null_and_min_tokens_only_at_0():
    """An unknown field at null is taken, else refused naming it; vLLM's min_tokens is refused at any value but 0."""
    CompletionBody(**TEXT, some_option=None).check_fields()
    _refused("some_option", lambda: CompletionBody(**TEXT, some_option=0).check_fields())
    CompletionBody(**TEXT, min_tokens=0).check_fields()
    _refused("min_tokens", lambda: CompletionBody(**TEXT, min_tokens=1).check_fields())


def test_chat_template_kwargs_keys_must_be_whole_identifiers():
    """A key that starts as an identifier but holds another character ("a-b") is no template variable name."""
    ChatBody(**CHAT, chat_template_kwargs={"a_b1": True}).check_fields()
    for key in ("a-b", "a b", "thinking!"):
        _refused("chat_template_kwargs", lambda key=key: ChatBody(**CHAT, chat_template_kwargs={key: 1}).check_fields())


def test_tool_choice_rules():
    """Unset or "auto" without tools is "none"; duplicate names, a named function with response_format json_object,
    and a named function missing from tools are refused naming the field; a tool message needs tool_call_id."""
    assert ChatBody(**CHAT).tool_mode() == ("none", None)
    assert ChatBody(**CHAT, tool_choice="auto").tool_mode() == ("none", None)
    assert ChatBody(**CHAT, tools=[TOOL]).tool_mode() == ("auto", None)
    named = {"type": "function", "function": {"name": "f"}}
    assert ChatBody(**CHAT, tools=[TOOL], tool_choice=named).tool_mode() == ("named", "f")
    _refused("tools", lambda: ChatBody(**CHAT, tools=[TOOL, TOOL]).check_fields())
    _refused("response_format", lambda: ChatBody(**CHAT, tools=[TOOL], tool_choice=named,
                                                 response_format={"type": "json_object"}).check_fields())
    _refused("tool_choice", lambda: ChatBody(**CHAT, tool_choice=named).check_fields())
    ChatBody(**CHAT, tools=[TOOL], tool_choice="auto", response_format={"type": "json_object"}).check_fields()
    _invalid("messages", lambda: ChatBody(model="m", messages=[{"role": "tool", "content": "r"}]))


def test_limits_seed_range_and_context_edge():
    """seed in [-2**63, 2**64); prompt + max_tokens = context + 1 refused; room = min(context, capacity * block)."""
    lim = Limits(vocab_size=10, max_seq_len=8, block_size=4, capacity=100, max_queue=1)
    for seed in (-(1 << 63), (1 << 63), (1 << 64) - 1):
        lim.check([1], SamplingOptions(max_tokens=1, seed=seed))
    for seed in (-(1 << 63) - 1, 1 << 64):
        _refused("seed", lambda seed=seed: lim.check([1], SamplingOptions(max_tokens=1, seed=seed)))
    lim.check([1, 2], SamplingOptions(max_tokens=6))
    _refused("max_tokens", lambda: lim.check([1, 2], SamplingOptions(max_tokens=7)))
    assert lim.room == 8
    assert Limits(vocab_size=10, max_seq_len=1000, block_size=4, capacity=3, max_queue=1).room == 12


def test_limits_grammar_markers_and_no_grammar_engine():
    """Negative grammar_after / grammar_at ids are refused naming them; a grammar on an engine without grammars
    is refused naming response_format."""
    lim = Limits(vocab_size=10, max_seq_len=100, block_size=4, capacity=100, max_queue=1)
    for name in ("grammar_after", "grammar_at"):
        _refused(name, lambda name=name: lim.check([1], SamplingOptions(max_tokens=1, **{name: (-1,)})))
    off = Limits(vocab_size=10, max_seq_len=100, block_size=4, capacity=100, max_queue=1, grammars=False)
    _refused("response_format", lambda: off.check([1], SamplingOptions(max_tokens=1, grammar="{}")))


def test_tool_grammar_allows_at_most_max_tool_calls():
    """A "required" calls block takes MAX_TOOL_CALLS calls, not one more; not parallel, exactly one."""
    tools = [{"name": "f", "parameters": {"type": "object"}}]
    g = tool_grammar(tools, ByteTokenizer())
    assert _accepts(g, F31.render([("f", "{}")] * MAX_TOOL_CALLS))
    assert not _accepts(g, F31.render([("f", "{}")] * (MAX_TOOL_CALLS + 1)))
    one = tool_grammar(tools, ByteTokenizer(), parallel=False)
    assert _accepts(one, F31.render([("f", "{}")])) and not _accepts(one, F31.render([("f", "{}")] * 2))


def test_tool_call_ids_and_parse_rules():
    """A call's own id is kept (Kimi's); not parallel keeps the first call; text after a block or non-object
    arguments are no calls; content_end finds a marker straddling the streamed position."""
    assert ToolCall("f", "{}", "functions.f:0").openai()["id"] == "functions.f:0"
    assert ToolCall("f", "{}").openai()["id"].startswith("call_")
    block = F31.render([("f", '{"a":1}'), ("g", "{}")])
    assert [c.name for c in parse_tool_calls("hi" + block, F31, parallel=False)[1]] == ["f"]
    assert parse_tool_calls(block + " more", F31) is None
    assert parse_tool_calls(F31.render([("f", "[1]")]), F31) is None
    text = "ab" + F31.calls_begin
    assert content_end(text, 4, F31) == 2
    assert json.loads(parse_tool_calls(block, F31)[1][0].arguments) == {"a": 1}


def test_tool_schemas_past_the_served_size_are_refused_naming_tools():
    """Parameters schemas of MAX_SCHEMA_CHARS characters in all compile; one character more is refused naming
    tools (the size found by growing a description one character at a time past the bound)."""
    def tools(pad: int) -> list[dict]:
        return [{"name": "f", "parameters": {"type": "object", "description": "x" * pad}}]

    pad = MAX_SCHEMA_CHARS - 200
    while True:  # the first pad refused: its schema holds MAX_SCHEMA_CHARS + 1 characters
        try:
            tool_grammar(tools(pad), ByteTokenizer())
        except FieldError as e:
            assert e.field == "tools" and f"hold {MAX_SCHEMA_CHARS + 1} characters" in str(e), e
            break
        pad += 1
    assert pad > MAX_SCHEMA_CHARS - 200


def test_a_grammar_llguidance_cannot_parse_is_refused_naming_tools(monkeypatch):
    """Where llguidance refuses the calls grammar's text itself (ValueError), the request is refused naming tools."""
    def refuse(lark):
        raise ValueError("bad grammar")

    monkeypatch.setattr(llguidance.LLMatcher, "grammar_from_lark", staticmethod(refuse))
    _refused("tools", lambda: tool_grammar([{"name": "f", "parameters": {"type": "object"}}], ByteTokenizer()))
