"""OpenAI's Responses API in ``flyer serve`` (``POST /v1/responses``, ``GET /v1/responses/{id}``;
``flyer.serve.responses``) through the official openai client's ``client.responses``.

A tiny random DeepSeek-V3 checkpoint with DeepSeek-V3.1's tool markers and a chat template (``test_serve_tools``):
greedy output equals ``/v1/chat/completions`` on the same messages token for token (text and token counts), with
``instructions`` a system message first, message items with text parts, and ``previous_response_id`` continuing a
stored conversation; a stream's events come in Responses' order with sequence numbers 0, 1, ..., their deltas
concatenate to the completed response's text, which equals the unstreamed one; a required function call comes as a
``function_call`` item whose arguments match the tool's schema, and its ``function_call_output`` renders as chat's
tool message; ``text.format`` json_schema holds; unimplemented fields answer 400 naming them, unknown ids 404 (as a
previous_response_id 400, as OpenAI's).
A scripted engine (``test_serve_tools_v3._Scripted``) writes reasoning, the end marker, an answer and calls: with
the deepseek reasoning parser they become a ``reasoning`` item, a message and ``function_call`` items, streamed or
not, and ``reasoning.effort`` opens the template's think block (``effort_kwargs``' ``enable_thinking``)."""

import dataclasses
import json

import httpx
import pytest
from served import client, serving
from test_serve_api import _error
from test_serve_reasoning import REASONING, _ids
from test_serve_reasoning import ckpt as reasoning_ckpt  # noqa: F401 (a fixture)
from test_serve_structured import _valid
from test_serve_tools import ASK, LIGHT, SCHEMA, TOOLS, _Served, tool_checkpoint
from test_serve_tools import TEMPLATE as TOOLS_TEMPLATE
from test_serve_tools_v3 import CALLS, _Scripted

from flyer.data.deepseek_encoding import ENCODINGS
from flyer.interop.hf_tokenizer import load_tokenizer
from flyer.serve.api import Api
from flyer.serve.reasoning import DEEPSEEK
from flyer.serve.link import Submitted
from flyer.serve.request import Limits, TokenEvent
from flyer.serve.responses import ResponseStore, Stored
from flyer.serve.responses_schema import ResponsesBody
from flyer.serve.schema import ChatBody
from flyer.serve.tools import DEEPSEEK_V31 as F31

FLAT_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]  # Responses' flat shape
# the reasoning test's template, its think block opened by ``enable_thinking`` (what reasoning.effort sets)
THINK_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
                  "{% elif m['role'] == 'assistant' %}<｜Assistant｜></think>{{ m['content'] }}{{ eos_token }}"
                  "{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% if enable_thinking %}<think>"
                  "{% else %}</think>{% endif %}{% endif %}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    s = _Served(tool_checkpoint(tmp_path_factory.mktemp("responses") / "v3", TOOLS_TEMPLATE, 1024))
    yield s
    s.close()


def _chat(c, messages, n: int, **kw):
    r = c.chat.completions.create(model="tiny-test", messages=messages, max_tokens=n, temperature=0, **kw)
    return r.choices[0], r.usage


def _same_as_chat(c, r, messages, n: int):
    """Response ``r`` (greedy, ``n`` tokens at most) is chat's answer to ``messages``: text, tokens, status."""
    choice, usage = _chat(c, messages, n)
    assert r.output_text == choice.message.content and r.output[-1].type == "message"
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == \
        (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    # chat's prompt is the response's, just computed: its full blocks (but for the last token) come from the cache
    bs = 16  # ``_Served``'s block_size (test_serve_tools)
    assert r.usage.input_tokens_details.cached_tokens <= usage.prompt_tokens_details.cached_tokens == \
        (usage.prompt_tokens - 1) // bs * bs
    assert r.status == ("incomplete" if choice.finish_reason == "length" else "completed")
    assert (r.incomplete_details is not None) == (choice.finish_reason == "length")
    assert (r.completed_at is None) == (r.status == "incomplete")  # "present only when status is completed"


def test_greedy_text_is_chat_token_for_token(served):
    c = served.client()
    for n in (1, 12):
        r = c.responses.create(model="tiny-test", input="hello world", max_output_tokens=n, temperature=0)
        assert r.object == "response" and r.id.startswith("resp_") and r.model == "tiny-test"
        _same_as_chat(c, r, ASK, n)
        assert r.output[0].role == "assistant" and r.output[0].content[0].type == "output_text"
    # instructions come first as a system message; message items with text parts; a developer message
    items = [{"role": "developer", "content": "be brief"},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello "},
                                                             {"type": "input_text", "text": "world"}]}]
    r = c.responses.create(model="tiny-test", instructions="You are terse.", input=items, max_output_tokens=12,
                           temperature=0, metadata={"k": "v"}, user="u1")
    _same_as_chat(c, r, [{"role": "system", "content": "You are terse."}, {"role": "developer", "content": "be brief"},
                         {"role": "user", "content": "hello world"}], 12)
    assert r.instructions == "You are terse." and r.metadata == {"k": "v"} and r.user == "u1"
    # the instructions change the prompt (a check that they are not dropped)
    without = c.responses.create(model="tiny-test", input=items, max_output_tokens=1)
    assert r.usage.input_tokens > without.usage.input_tokens


def _stream(c, **kw):
    """(the events, the completed response) of a streamed response; sequence numbers count from 0."""
    events = list(c.responses.create(model="tiny-test", stream=True, **kw))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[1].type == "response.in_progress"
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert events[-1].type in ("response.completed", "response.incomplete")
    return events, events[-1].response


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
def test_an_explicit_null_is_the_fields_default(served, path):
    """OpenAI types its optional fields "X or null", and clients send unset options as null (LangChain, LiteLLM): a
    null is the field's default, the same answer as without it (chat's logprobs, n, stream, ... and the Responses
    body's stream answered 400 "Input should be a valid boolean")."""
    if path == "/v1/responses":
        base = {"model": "tiny-test", "input": "hello world", "max_output_tokens": 6, "temperature": 0}
        nulls = ("stream", "top_p", "parallel_tool_calls", "store", "include", "top_logprobs", "tools", "text")
    else:
        base = {"model": "tiny-test", "messages": ASK, "max_tokens": 6, "temperature": 0}
        nulls = ("top_p", "n", "stream", "frequency_penalty", "presence_penalty", "seed", "stop", "logprobs",
                 "top_logprobs", "parallel_tool_calls", "max_completion_tokens", "tools", "tool_choice",
                 "response_format", "logit_bias")
    want = httpx.post(served.url + path, json=base)
    nulled = httpx.post(served.url + path, json={**base, **{f: None for f in nulls}})
    assert want.status_code == nulled.status_code == 200, nulled.text
    key = "output" if path == "/v1/responses" else "choices"

    def strip(items: list[dict]) -> list[dict]:  # a Response's items have ids of their own
        return [{k: v for k, v in o.items() if k != "id"} for o in items]

    assert strip(nulled.json()[key]) == strip(want.json()[key])


def test_stream_events_and_deltas(served):
    c = served.client()
    kw = dict(input="hello world", max_output_tokens=12, temperature=0)
    events, done = _stream(c, **kw)
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * len(deltas),
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     kinds[-1]]
    assert len(deltas) > 1  # streamed as it came
    item = done.output[0]
    assert {e.item_id for e in events[2:-1] if hasattr(e, "item_id")} == {item.id} == {events[2].item.id}
    assert "".join(e.delta for e in deltas) == events[-4].text == done.output_text
    whole = c.responses.create(model="tiny-test", **kw)
    assert done.output_text == whole.output_text and done.usage == whole.usage and done.status == whole.status
    assert c.responses.retrieve(done.id).output_text == done.output_text  # a stream's response is stored too


def test_previous_response_id_continues_and_store(served):
    c = served.client()
    first = c.responses.create(model="tiny-test", input="hello world", max_output_tokens=8, temperature=0)
    assert c.responses.retrieve(first.id).model_dump() == first.model_dump()
    second = c.responses.create(model="tiny-test", input="and again", previous_response_id=first.id,
                                max_output_tokens=8, temperature=0, instructions="terse")
    assert second.previous_response_id == first.id
    _same_as_chat(c, second, [{"role": "system", "content": "terse"}, *ASK,
                              {"role": "assistant", "content": first.output_text},
                              {"role": "user", "content": "and again"}], 8)
    # a third turn: the second's instructions are not carried over (as OpenAI's), its conversation is
    third = c.responses.create(model="tiny-test", input="once more", previous_response_id=second.id,
                               max_output_tokens=4, temperature=0)
    _same_as_chat(c, third, [*ASK, {"role": "assistant", "content": first.output_text},
                             {"role": "user", "content": "and again"},
                             {"role": "assistant", "content": second.output_text},
                             {"role": "user", "content": "once more"}], 4)
    gone = c.responses.create(model="tiny-test", input="hi", max_output_tokens=1, store=False)
    for rid in (gone.id, "resp_unknown"):
        _error(httpx.get(f"{served.url}/v1/responses/{rid}"), 404)
        err = _error(httpx.post(served.url + "/v1/responses", json=dict(model="tiny-test", input="x",
                                                                        previous_response_id=rid)), 400,
                     "previous_response_id")
        assert err["code"] == "previous_response_not_found"  # OpenAI's: clients resend the conversation on it


def test_the_store_keeps_the_last_ones():
    store = ResponseStore(capacity=2)
    for k in "abc":
        store.put(k, Stored({"id": k}, []))
        if k == "b":
            store.get("a")  # used: "b" is now the oldest
    assert store.get("a").response == {"id": "a"} and store.get("c").response == {"id": "c"}
    with pytest.raises(Exception, match="not found"):
        store.get("b")
    # and their bytes: a conversation that grew past what is left pushes the oldest out; one past all of it is gone
    big = Stored({"id": "d"}, [{"role": "user", "content": "x" * 100}])
    store = ResponseStore(capacity=10, max_bytes=2 * len(json.dumps([big.response, big.messages, []])))
    for k in "def":
        store.put(k, dataclasses.replace(big, response={"id": k}))
    assert list(store.items) == ["e", "f"] and store.held <= store.max_bytes
    store.delete("e")
    store.put("g", Stored({"id": "g"}, [{"role": "user", "content": "x" * 1000}]))
    assert list(store.items) == [] and store.held == 0
    store.put("h", Stored({"id": "h"}, [], inputs=[{"type": "message", "text": "x" * 5000}]))  # its listed items
    assert list(store.items) == [] and store.held == 0


def test_function_call_round_trip(served):
    c = served.client()
    kw = dict(model="tiny-test", tools=FLAT_TOOLS, max_output_tokens=300, temperature=0)
    r = c.responses.create(input="hello world", tool_choice="required", parallel_tool_calls=False, **kw)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and r.status == "completed" and r.tool_choice == "required" and not r.parallel_tool_calls
    for call in calls:
        assert call.call_id.startswith("call_") and _valid(json.loads(call.arguments), SCHEMA[call.name])
    chat, _ = _chat(c, ASK, 300, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    assert [(o.name, o.arguments) for o in calls] == [(t.function.name, t.function.arguments)
                                                     for t in chat.message.tool_calls]
    # a named function; streamed: the call's events, the same call
    named = c.responses.create(input="hello world", tool_choice={"type": "function", "name": "set_light"}, **kw)
    assert [o.name for o in named.output if o.type == "function_call"] == ["set_light"]
    events, done = _stream(c, input="hello world", tool_choice={"type": "function", "name": "set_light"},
                           **{k: v for k, v in kw.items() if k != "model"})
    assert [(o.name, o.arguments) for o in done.output] == [(o.name, o.arguments) for o in named.output]
    kinds = [e.type for e in events]
    assert kinds[2:-1] == ["response.output_item.added", "response.function_call_arguments.delta",
                           "response.function_call_arguments.done", "response.output_item.done"]
    assert json.loads(events[4].arguments) == json.loads(done.output[0].arguments)
    # the calls' outputs sent back (items copied from the output): rendered as chat's tool messages
    outputs = [{"type": "function_call_output", "call_id": o.call_id, "output": "sunny"} for o in calls]
    back = c.responses.create(input=[{"role": "user", "content": "hello world"}, *[o.model_dump() for o in calls],
                                     *outputs], **{**kw, "max_output_tokens": 10})
    chat_calls = [{"id": o.call_id, "type": "function", "function": {"name": o.name, "arguments": o.arguments}}
                  for o in calls]
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": chat_calls},
                *[{"role": "tool", "tool_call_id": o.call_id, "content": "sunny"} for o in calls]]
    want, usage = _chat(c, messages, 10, tools=TOOLS)
    assert back.output_text == want.message.content and back.usage.input_tokens == usage.prompt_tokens
    # the same through previous_response_id
    cont = c.responses.create(input=outputs, previous_response_id=r.id, **{**kw, "max_output_tokens": 10})
    assert cont.output_text == back.output_text and cont.usage.input_tokens == back.usage.input_tokens
    # the calls sent again beside previous_response_id: refused, as OpenAI refuses a duplicate item
    again = httpx.post(served.url + "/v1/responses", json=dict(
        input=[*[o.model_dump() for o in calls], *outputs], previous_response_id=r.id, **kw))
    assert "previous_response_id" in _error(again, 400, "input[0]")["message"]


def test_a_strict_function_reaches_chat_strict():
    """Responses' flat function tools keep ``strict`` in chat's shape (it holds "auto" calls to their schemas)."""
    body = ResponsesBody.model_validate({"model": "m", "input": "x", "tools": [{**FLAT_TOOLS[1], "strict": True},
                                                                                FLAT_TOOLS[0]]})
    tools = ChatBody.model_validate({"model": "m", "messages": ASK, "tools": body.chat_tools()}).tools
    assert [t.function.strict for t in tools] == [True, None]
    assert tools[0].function.parameters == LIGHT and tools[1].function.name == "get_weather"


def test_defaults_are_echoed_as_openai_sets_them(served):
    r = served.client().responses.create(model="tiny-test", input="hello world", max_output_tokens=2)
    assert (r.parallel_tool_calls, r.store, r.tool_choice, r.temperature, r.top_p) == (True, True, "auto", 1.0, 1.0)


def test_calls_and_outputs_render_as_chat_messages_in_any_order(served):
    """Consecutive function_call items are one assistant message (parallel calls), a call after a tool message a
    new one: the prompt is chat's, token for token (its length), either way."""
    c = served.client()
    calls = [{"type": "function_call", "call_id": f"c{k}", "name": n, "arguments": a}
             for k, (n, a) in enumerate([("get_weather", '{"city":"oslo","celsius":true,"days":2}'),
                                         ("set_light", '{"on":true,"level":3}')])]
    outs = [{"type": "function_call_output", "call_id": f"c{k}", "output": "done"} for k in range(2)]

    def chat_call(item):
        return {"id": item["call_id"], "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]}}

    def tool(item):
        return {"role": "tool", "tool_call_id": item["call_id"], "content": "done"}

    for items, messages in (
            ([*calls, *outs], [{"role": "assistant", "content": None, "tool_calls": [chat_call(i) for i in calls]},
                               *map(tool, outs)]),
            ([calls[0], outs[0], calls[1], outs[1]],
             [m for i, o in zip(calls, outs) for m in ({"role": "assistant", "content": None,
                                                        "tool_calls": [chat_call(i)]}, tool(o))])):
        r = c.responses.create(model="tiny-test", input=[ASK[0], *items], tools=FLAT_TOOLS, max_output_tokens=1)
        _, usage = _chat(c, [*ASK, *messages], 1, tools=TOOLS)
        assert r.usage.input_tokens == usage.prompt_tokens


def test_a_listed_reasoning_item_has_its_summary(served):
    from openai.types.responses import ResponseItemList

    r = served.client().responses.create(model="tiny-test", input=[{"type": "reasoning", "id": "rs_1"}, ASK[0]],
                                         max_output_tokens=1)
    page = httpx.get(f"{served.url}/v1/responses/{r.id}/input_items").json()
    listed = ResponseItemList.model_validate(page)
    assert listed.data[-1].type == "reasoning" and listed.data[-1].summary == []


def test_json_schema_output(served):
    """text.format is chat's response_format: the same greedy answer, JSON that matches the schema."""
    c = served.client()
    for fmt, chat_fmt in (({"type": "json_schema", "name": "light", "schema": LIGHT, "strict": True},
                           {"type": "json_schema", "json_schema": {"name": "light", "schema": LIGHT, "strict": True}}),
                          ({"type": "json_object"}, {"type": "json_object"})):
        r = c.responses.create(model="tiny-test", input="hello world", max_output_tokens=60, temperature=0,
                               text={"format": fmt})
        want, _ = _chat(c, ASK, 60, response_format=chat_fmt)
        assert r.output_text == want.message.content and r.output_text.startswith("{")
        assert r.text.format.type == fmt["type"]
        if fmt["type"] == "json_schema":
            assert r.status == "completed" and _valid(json.loads(r.output_text), LIGHT)


def test_bad_requests_answer_400(served):
    url = served.url + "/v1/responses"
    ok = dict(model="tiny-test", input="hello world", max_output_tokens=2)
    for over, param in ((dict(background=True), "background"), (dict(include=["file_search_call.results"]),
                                                                  "include"),
                        (dict(tools=[{"type": "web_search"}]), "tools[0].type"),
                        (dict(tools=FLAT_TOOLS, tool_choice={"type": "web_search_preview"}), "tool_choice"),
                        (dict(tools=FLAT_TOOLS, tool_choice={"type": "function", "name": "nope"}), "tool_choice"),
                        (dict(tool_choice="required"), "tool_choice"),
                        (dict(max_output_tokens=0), "max_output_tokens"),
                        (dict(max_output_tokens=5000), "max_output_tokens"),
                        (dict(temperature=3), "temperature"), (dict(truncation="auto"), "truncation"),
                        (dict(top_logprobs=3), "top_logprobs"), (dict(reasoning={"summary": "auto"}),
                                                                 "reasoning.summary"),
                        (dict(reasoning={"effort": "huge"}), "reasoning.effort"),
                        (dict(text={"format": {"type": "json_schema", "name": "x"}}), "text.format"),
                        (dict(text={"format": {"type": "json_schema", "schema": {"type": "object"}}}), "text.format"),
                        (dict(text={"verbosity": "low"}), "text.verbosity"),
                        (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]),
                         "input[0].content[0].type"),
                        (dict(input=[{"type": "item_reference", "id": "x"}]), "input[0].type"),
                        (dict(input=[{"type": "function_call_output", "output": "x"}]), "input[0].call_id"),
                        # an output answering no call (OpenAI: "No tool call found for function call output")
                        (dict(input=[{"role": "user", "content": "a"},
                                     {"type": "function_call_output", "call_id": "c9", "output": "x"}]),
                         "input[1].call_id"),
                        (dict(input=[]), "input"), (dict(model="other"), "model"),
                        # keys the route would ignore (chat's, vLLM's, unknown; nested too) and bounds OpenAI sets
                        (dict(seed=7), "seed"), (dict(max_tokens=2), "max_tokens"), (dict(stop=["o"]), "stop"),
                        (dict(n=2), "n"), (dict(foo=1), "foo"), (dict(access_programs={"x": 1}), "access_programs"),
                        (dict(reasoning={"effort": "low", "mode": "x"}), "reasoning.mode"),
                        (dict(text={"format": {"type": "text"}, "foo": 1}), "text.foo"),
                        (dict(tools=[{**FLAT_TOOLS[0], "defer_loading": True}]), "tools[0].defer_loading"),
                        (dict(text={"format": {"type": "json_object", "name": "x"}}), "text.format"),
                        (dict(text={"format": {"type": "text", "strict": True}}), "text.format"),
                        (dict(metadata={"k" * 65: "v"}), "metadata"), (dict(metadata={"k": "v" * 513}), "metadata"),
                        (dict(input=[{"id": "msg_x", "role": "user", "content": "a"},
                                     {"id": "msg_x", "role": "user", "content": "b"}]), "input[1]"),
                        # parts of another role's kind, a reasoning's summary that is no list: listed back, the
                        # client's types would refuse them
                        (dict(input=[{"role": "assistant", "content": [{"type": "input_text", "text": "a"}]}]),
                         "input[0].content"),
                        (dict(input=[{"role": "user", "content": [{"type": "output_text", "text": "a"}]}]),
                         "input[0].content"),
                        (dict(input=[{"type": "reasoning", "summary": "thinking"}]), "input[0].summary"),
                        # an output answering no call as the first item too; a tool_choice of another type with a
                        # function's name; OpenAI's 16 metadata keys at most
                        (dict(input=[{"type": "function_call_output", "call_id": "c9", "output": "x"},
                                     {"role": "user", "content": "a"}]), "input[0].call_id"),
                        (dict(tools=FLAT_TOOLS, tool_choice={"type": "web_search_preview", "name": "get_weather"}),
                         "tool_choice"),
                        (dict(metadata={f"k{i}": "v" for i in range(17)}), "metadata")):
        resp = httpx.post(url, json={**ok, **over})
        _error(resp, 404 if param == "model" else 400, param)
    # an item repeated within the new input alone: no previous_response_id in the message
    twice = [{"id": "msg_x", "role": "user", "content": "a"}, {"id": "msg_x", "role": "user", "content": "b"}]
    assert "previous_response_id" not in _error(httpx.post(url, json={**ok, "input": twice}), 400)["message"]
    neutral = dict(service_tier="auto", safety_identifier="u1", prompt_cache_key="k", stream_options=None,
                   foo=None, tools=[{**FLAT_TOOLS[0], "defer_loading": False}], metadata={"k" * 64: "v" * 512})
    assert httpx.post(url, json={**ok, **neutral}).status_code == 200
    stored = httpx.post(url, json=ok).json()["id"]
    _error(httpx.get(f"{url}/{stored}", params={"stream": "true"}), 400, "stream")
    # routes flyer does not serve (docs: Not implemented) answer in OpenAI's error shape, not Starlette's
    _error(httpx.post(f"{url}/{stored}/cancel"), 404)  # only background responses cancel, and those are refused
    _error(httpx.post(f"{url}/input_tokens", json=ok), 405)  # counting: the route /v1/responses/{id} is GET/DELETE
    assert 'flyer_rejected_requests_total{status="400"}' in httpx.get(served.url + "/metrics").text
    assert "flyer_generation_tokens_total" in httpx.get(served.url + "/metrics").text


@pytest.fixture(scope="module")
def tok(reasoning_ckpt):  # noqa: F811 (the fixture imported)
    return load_tokenizer(reasoning_ckpt)


def test_reasoning_and_calls_become_items(tok):
    """A scripted answer: reasoning, </think>, text, calls; ``reasoning.effort`` opens the think block."""
    script = _ids(tok, REASONING, DEEPSEEK.end, "Sure.", F31.render(CALLS)) + [tok.eos_id()]
    limits = Limits(vocab_size=1 << 20, max_seq_len=4096, block_size=16, capacity=256, max_queue=8)
    api = Api(_Scripted(limits, script), tok, "tiny-test", chat_template=THINK_TEMPLATE, reasoning_parser="deepseek")
    with serving(api) as url:
        c = client(url)
        kw = dict(model="tiny-test", input="what is 2+2?", tools=FLAT_TOOLS, reasoning={"effort": "high"})
        r = c.responses.create(**kw)
        assert [o.type for o in r.output] == ["reasoning", "message", "function_call", "function_call"]
        assert r.output[0].content[0].text == REASONING and r.output_text == "Sure."
        assert [(o.name, o.arguments) for o in r.output[2:]] == CALLS and r.reasoning.effort == "high"
        assert r.usage.output_tokens_details.reasoning_tokens == len(_ids(tok, REASONING, DEEPSEEK.end))
        assert r.usage.output_tokens == len(script)
        events, done = _stream(c, **{k: v for k, v in kw.items() if k != "model"})
        assert done.model_dump(exclude={"id", "created_at", "completed_at", "output"}) == \
            r.model_dump(exclude={"id", "created_at", "completed_at", "output"})
        assert [o.model_dump(exclude={"id", "call_id"}) for o in done.output] == \
            [o.model_dump(exclude={"id", "call_id"}) for o in r.output]
        thought = [e.delta for e in events if e.type == "response.reasoning_text.delta"]
        assert "".join(thought) == REASONING and len(thought) > 1
        kinds = [e.type for e in events if e.type.startswith("response.output_item")]
        assert kinds == ["response.output_item.added", "response.output_item.done"] * 4
        # without an effort the prompt does not open the think block: all of it is the answer
        plain = c.responses.create(model="tiny-test", input="what is 2+2?", max_output_tokens=len(script) - 1)
        assert plain.output[0].type == "message" and REASONING in plain.output_text and plain.status == "incomplete"
        # cut inside the reasoning: the reasoning item alone, incomplete, as OpenAI's (it came with an empty
        # message), streamed or not
        cut = {**kw, "max_output_tokens": 3}
        r = c.responses.create(**cut)
        assert [(o.type, o.status) for o in r.output] == [("reasoning", "incomplete")] and r.status == "incomplete"
        assert r.incomplete_details.reason == "max_output_tokens" and r.output_text == ""
        events, done = _stream(c, **{k: v for k, v in cut.items() if k != "model"})
        assert [o.model_dump(exclude={"id"}) for o in done.output] == [o.model_dump(exclude={"id"}) for o in r.output]
        assert [e.type for e in events if e.type.startswith("response.output_item")] == \
            ["response.output_item.added", "response.output_item.done"] and events[-1].type == "response.incomplete"


def test_errors_of_the_chat_machinery_name_the_responses_item(tok):
    """An error the chat machinery raises names the Responses body's field: a tool's name (chat's
    ``tools[0].function.name``), and a call's arguments by its input item, whatever the instructions and the merging
    of calls into one chat message shift (DeepSeek-V3.2's encoding checks them: ``input[k].arguments``)."""
    limits = Limits(vocab_size=1 << 20, max_seq_len=4096, block_size=16, capacity=256, max_queue=8)
    api = Api(_Scripted(limits, _ids(tok, "ok")), tok, "tiny-test", chat_template=ENCODINGS["deepseek_v32"])
    call = dict(type="function_call", call_id="c1", name=FLAT_TOOLS[0]["name"], arguments="{}")
    with serving(api) as url:
        def param(**kw):
            r = httpx.post(url + "/v1/responses", json={"model": "tiny-test", "tools": FLAT_TOOLS, **kw})
            assert r.status_code == 400, r.text
            return r.json()["error"]["param"]

        assert param(input="hi", tools=[{**FLAT_TOOLS[0], "name": "get weather"}]) == "tools[0].name"
        ask, out = {"role": "user", "content": "hi"}, {"type": "function_call_output", "call_id": "c1", "output": "x"}
        assert param(instructions="be brief", input=[ask, {**call, "arguments": "[1]"}, out]) == "input[1].arguments"
        assert param(input=[ask, call, {**call, "call_id": "c2", "arguments": "nope"}, out]) == "input[2].arguments"


@pytest.mark.parametrize("blank", ["\n\n", " "])
def test_blank_text_before_calls_is_no_message_streamed_or_not(tok, blank):
    """Blank text before the calls: no message item in the whole response (chat's content null), nor in the stream,
    whose items are the whole response's (the chat stream under it holds such text back: ``calls_content``)."""
    script = _ids(tok, blank, F31.render(CALLS)) + [tok.eos_id()]
    limits = Limits(vocab_size=1 << 20, max_seq_len=4096, block_size=16, capacity=256, max_queue=8)
    with serving(Api(_Scripted(limits, script), tok, "tiny-test", chat_template=THINK_TEMPLATE)) as url:
        c = client(url)
        r = c.responses.create(model="tiny-test", input="lights on", tools=FLAT_TOOLS)
        assert [o.type for o in r.output] == ["function_call", "function_call"]
        events, done = _stream(c, input="lights on", tools=FLAT_TOOLS)
        assert [o.model_dump(exclude={"id", "call_id"}) for o in done.output] == \
            [o.model_dump(exclude={"id", "call_id"}) for o in r.output]
        assert not [e for e in events if e.type == "response.output_text.delta"]


def test_reasoning_then_a_cut_calls_block(tok):
    """Reasoning, then a calls block ``max_output_tokens`` cut in its second call, no text: the reasoning
    (completed) and the whole call, the response incomplete, streamed or not; each streamed item's
    ``output_index`` is its place in the output."""
    rendered = F31.render(CALLS)
    script = _ids(tok, REASONING, DEEPSEEK.end, rendered) + [tok.eos_id()]
    n = len(_ids(tok, REASONING, DEEPSEEK.end, rendered[:rendered.index('"level"')]))
    limits = Limits(vocab_size=1 << 20, max_seq_len=4096, block_size=16, capacity=256, max_queue=8)
    api = Api(_Scripted(limits, script), tok, "tiny-test", chat_template=THINK_TEMPLATE, reasoning_parser="deepseek")
    with serving(api) as url:
        c = client(url)
        kw = dict(input="lights on", tools=FLAT_TOOLS, reasoning={"effort": "high"}, max_output_tokens=n)
        r = c.responses.create(model="tiny-test", **kw)
        assert r.status == "incomplete"
        assert [(o.type, o.status) for o in r.output] == [("reasoning", "completed"), ("function_call", "completed")]
        events, done = _stream(c, **kw)
        assert [o.model_dump(exclude={"id", "call_id"}) for o in done.output] == \
            [o.model_dump(exclude={"id", "call_id"}) for o in r.output] and done.status == "incomplete"
        ids = [o.id for o in done.output]
        placed = [(e.output_index, ids.index(e.item.id)) for e in events if e.type.startswith("response.output_item")]
        assert len(placed) == 4 and all(a == b for a, b in placed), placed


@pytest.mark.parametrize("text", ["Sure.", ""])
def test_a_calls_block_cut_by_the_limit_is_incomplete_streamed_or_not(tok, text):
    """``max_output_tokens`` cutting a calls block inside its second call: chat answers the first call with
    finish_reason "length"; the response is "incomplete" (max_output_tokens) with that call, its message (when it has
    text) "incomplete", streamed or not. The stream said "completed", and so did both without text."""
    rendered = F31.render(CALLS)
    script = _ids(tok, text, rendered) + [tok.eos_id()]
    n = len(_ids(tok, text, rendered[:rendered.index('"level"')]))
    limits = Limits(vocab_size=1 << 20, max_seq_len=4096, block_size=16, capacity=256, max_queue=8)
    with serving(Api(_Scripted(limits, script), tok, "tiny-test", chat_template=THINK_TEMPLATE)) as url:
        c = client(url)
        chat = c.chat.completions.create(model="tiny-test", messages=ASK, tools=TOOLS, max_tokens=n).choices[0]
        assert chat.finish_reason == "length" and [t.function.name for t in chat.message.tool_calls] == [CALLS[0][0]]
        kw = dict(input="lights on", tools=FLAT_TOOLS, max_output_tokens=n)
        r = c.responses.create(model="tiny-test", **kw)
        assert (r.status, r.incomplete_details.reason) == ("incomplete", "max_output_tokens")
        assert [(o.type, o.status) for o in r.output] == [("message", "incomplete")] * bool(text) + \
            [("function_call", "completed")]
        assert (r.output_text, r.output[-1].name, r.output[-1].arguments) == (text, *CALLS[0])
        events, done = _stream(c, **kw)
        assert events[-1].type == "response.incomplete" and done.incomplete_details == r.incomplete_details
        assert [o.model_dump(exclude={"id", "call_id"}) for o in done.output] == \
            [o.model_dump(exclude={"id", "call_id"}) for o in r.output]


class _Failing(_Scripted):
    """The script's first two tokens, then the engine fails on the request."""

    def submit(self, prompt, opts, emit):
        r = Submitted(next(self.ids), emit)
        for t in self.script[:2]:
            emit(TokenEvent(t, logprob=-1.0))
        emit(TokenEvent(None, finish_reason="error"))
        r.done = True
        return r


def test_an_engine_failure_fails_the_response(tok):
    """Unstreamed: 500 in OpenAI's shape; streamed (the status is sent): the text so far, then response.failed."""
    limits = Limits(vocab_size=1 << 20, max_seq_len=4096, block_size=16, capacity=256, max_queue=8)
    api = Api(_Failing(limits, _ids(tok, "hello there, world")), tok, "tiny-test", chat_template=THINK_TEMPLATE)
    with serving(api) as url:
        err = _error(httpx.post(url + "/v1/responses", json=dict(model="tiny-test", input="hi")), 500)
        assert err["type"] == "server_error"
        events = list(client(url).responses.create(model="tiny-test", input="hi", stream=True))
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert events[-1].type == "response.failed" and events[-1].response.status == "failed"
        assert "engine failed" in events[-1].response.error.message
        assert events[-2].type == "response.output_text.delta"
        _error(httpx.get(f"{url}/v1/responses/{events[-1].response.id}"), 404)  # not stored
