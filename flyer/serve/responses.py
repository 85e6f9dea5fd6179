"""OpenAI's Responses API over the chat route (``flyer.serve.api``), in the shapes the official ``openai`` client reads.

    POST /v1/responses        ``flyer.serve.responses_schema.ResponsesBody``: the input items (after ``instructions``
                              as a system message, and the conversation of ``previous_response_id``) become chat
                              messages, rendered and generated as ``/v1/chat/completions`` does them; the answer's
                              reasoning (with a reasoning parser), text and tool calls become ``reasoning``,
                              ``message`` (``output_text``) and ``function_call`` output items
    GET  /v1/responses/{id}   a stored response
    DELETE /v1/responses/{id} forgets it (``response.deleted``)
    GET  /v1/responses/{id}/input_items
                              the items it was generated from (its ``previous_response_id``'s, the input and output
                              items of that conversation, then its own ``input``; not ``instructions``) in OpenAI's
                              item shapes, a page of them: ``limit`` (1-100, default 20), ``order`` (asc, desc: the
                              last item first, the default), ``after`` (an id)

A stream is Responses' named events (``response.created`` ... ``response.completed``, each with its
``sequence_number``), made from the chat route's chunks as they come. Finished responses (``store``, OpenAI's default
true) are kept in memory, the last ``MAX_STORED`` of them and ``MAX_STORED_BYTES`` of their JSON (least recently used
out): a ``previous_response_id`` no longer there answers 400 ``previous_response_not_found``, as OpenAI's.
``usage.input_tokens_details.cached_tokens`` is chat's
``prompt_tokens_details.cached_tokens``: the prompt tokens the engine took from its prefix cache.

With ``include: ["message.output_text.logprobs"]`` (and ``top_logprobs``, 0-20) the output text carries chat's
``logprobs.content`` entries (token, logprob, bytes, top_logprobs) of its tokens (``text_logprobs``); a stream's
``response.output_text.delta`` events carry those of the delta's tokens.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from flyer.errors import FieldError
from flyer.serve.api_error import ApiError, sse_event
from flyer.serve.responses_schema import NamedFunction, ResponsesBody, input_items, input_messages
from flyer.serve.schema import ChatBody, error_field, field_name

if TYPE_CHECKING:  # the type only: ``flyer.serve.app`` registers these routes
    from flyer.serve.api import Api

MAX_STORED = 1024  # finished responses kept for GET and previous_response_id
# and their bytes (as JSON): each holds its conversation whole, which a chain of previous_response_ids grows
MAX_STORED_BYTES = 256 << 20
MAX_LISTED = 100  # input items per page of ``GET /v1/responses/{id}/input_items`` (OpenAI's bound)

# chat's field names in the errors of the chat machinery, as the Responses body names them
_FIELDS = {"messages": "input", "prompt": "input", "max_tokens": "max_output_tokens",
           "max_completion_tokens": "max_output_tokens", "response_format": "text.format",
           "reasoning_effort": "reasoning.effort"}


def _responses_field(err: FieldError, origins: list | None = None) -> FieldError:
    """``err`` naming the Responses body's field where it names chat's: a tool's ``tools[0].function.name`` is
    ``tools[0].name``, and with ``origins`` (per chat message: ``instructions``, ``previous_response_id`` or its
    input item and its calls' items, ``input_messages``) a message's field names its item's (``messages[3].role``:
    ``input[2].role``; ``messages[3].tool_calls[1].function.arguments``: ``input[4].arguments``)."""
    field = err.field
    tool = re.fullmatch(r"tools(?:\.|\[)(\d+)\]?\.function\.(\w+)", field)
    message = re.fullmatch(r"messages(?:\.|\[)(\d+)\]?(?:\.tool_calls(?:\.|\[)(\d+)\]?\.function)?(.*)", field)
    if tool:
        field = f"tools[{tool[1]}].{tool[2]}"
    elif message and origins is not None and int(message[1]) < len(origins):
        at = origins[int(message[1])]
        if isinstance(at, str):  # the instructions, or a turn of the stored conversation
            field = at
        elif message[2] is not None and int(message[2]) < len(at[1]):
            field = f"input[{at[1][int(message[2])]}]{message[3]}"
        else:
            field = f"input[{at[0]}]{message[3]}" if at[0] is not None else "input"
    else:
        head, rest = re.fullmatch(r"([A-Za-z_]*)(.*)", field).groups()
        field = _FIELDS[head] + rest if head in _FIELDS else field
    return err if field == err.field else type(err)(field, err.problem)  # its kind too (ContextLengthError)


@dataclass
class Stored:
    response: dict  # the Response object
    messages: list[dict]  # its conversation as chat messages, its answer included, its instructions not
    inputs: list[dict] = field(default_factory=list)  # the items it was generated from, as ``input_items`` lists them


class ResponseStore:
    """The last ``capacity`` stored responses by id, of ``max_bytes`` as JSON at most, least recently used out."""

    def __init__(self, capacity: int = MAX_STORED, max_bytes: int = MAX_STORED_BYTES):
        self.capacity, self.max_bytes, self.items = capacity, max_bytes, OrderedDict()
        self.sizes: dict[str, int] = {}
        self.held = 0  # bytes of the items

    def put(self, rid: str, stored: Stored) -> None:
        if rid in self.items:
            self._drop(rid)
        self.items[rid] = stored
        self.sizes[rid] = len(json.dumps([stored.response, stored.messages, stored.inputs]))
        self.held += self.sizes[rid]
        while len(self.items) > self.capacity or self.held > self.max_bytes:
            self._drop(next(iter(self.items)))

    def _drop(self, rid: str) -> None:
        del self.items[rid]
        self.held -= self.sizes.pop(rid)

    def get(self, rid: str, param: str | None = None) -> Stored:
        """The response ``rid``; when it is not (or no longer) kept, an ``ApiError`` in OpenAI's shape: 404
        ``not_found`` for the id of a route's path, 400 ``previous_response_not_found`` naming ``param`` for a
        request's ``previous_response_id``, as OpenAI answers it (clients match that code to send the whole
        conversation instead)."""
        stored = self.items.get(rid)
        if stored is None:
            kept = (f"this server keeps the last {self.capacity} stored responses, {self.max_bytes >> 20} MiB of "
                    "them, in memory")
            if param == "previous_response_id":
                raise ApiError(400, f"Previous response with id '{rid}' not found ({kept})", param=param,
                               code="previous_response_not_found")
            raise ApiError(404, f"Response with id '{rid}' not found ({kept})", param=param, code="not_found")
        self.items.move_to_end(rid)
        return stored

    def delete(self, rid: str) -> None:
        """Forget the response ``rid``; ``get``'s 404 when it is not kept."""
        self.get(rid)
        self._drop(rid)


def _usage(chat_usage: dict) -> dict:
    details = chat_usage.get("completion_tokens_details") or {}
    prompt = chat_usage.get("prompt_tokens_details") or {}
    return {"input_tokens": chat_usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": prompt.get("cached_tokens", 0),
                                     "cache_write_tokens": prompt.get("cache_write_tokens", 0)},
            "output_tokens": chat_usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": details.get("reasoning_tokens", 0)},
            "total_tokens": chat_usage["total_tokens"]}


def _check_unique(items: list[dict], n_past: int) -> None:
    """``FieldError`` naming ``input[k]`` for an item whose id an earlier one holds (the first ``n_past``: the
    conversation ``previous_response_id`` carries): OpenAI refuses it ("Duplicate item found"), which would put the
    item in the prompt twice and leave ``input_items``' ``after`` ambiguous."""
    first: dict[str, int] = {}
    for k, item in enumerate(items):
        if item["id"] in first:
            earlier = ", which previous_response_id's conversation holds: send the new items only" \
                if first[item["id"]] < n_past else ""
            raise FieldError(f"input[{k - n_past}]", f"repeats item {item['id']!r}{earlier}")
        first[item["id"]] = k


def _item_id(kind: str) -> str:
    return f"{kind}_{uuid.uuid4().hex}"


def _reasoning_item(text: str, status: str = "completed", rid: str | None = None) -> dict:
    return {"type": "reasoning", "id": rid or _item_id("rs"), "summary": [],
            "content": [{"type": "reasoning_text", "text": text}] if text else [], "status": status}


def _text_part(text: str, logprobs: list[dict] | None = None) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def _message_item(text: str | None, status: str = "completed", mid: str | None = None,
                  logprobs: list[dict] | None = None) -> dict:
    return {"type": "message", "id": mid or _item_id("msg"), "role": "assistant", "status": status,
            "content": [] if text is None else [_text_part(text, logprobs)]}


def text_logprobs(choice: dict) -> list[dict] | None:
    """A chat choice's (or chunk's) entries of its content's tokens: chat's ``logprobs.content`` (every generated
    token kept, reasoning, its end marker and calls among them) cut to the route's ``content_span`` (``Api.chat_result``
    with ``spans``): the reasoning and call items carry none, as OpenAI's carry none. None without logprobs."""
    if not choice.get("logprobs"):
        return None
    lo, hi = choice["content_span"]
    return choice["logprobs"]["content"][lo:hi]


def _call_item(call: dict, status: str = "completed", arguments: str | None = None) -> dict:
    fn = call["function"]
    return {"type": "function_call", "id": _item_id("fc"), "call_id": call["id"], "name": fn["name"],
            "arguments": fn["arguments"] if arguments is None else arguments, "status": status}


def _output_items(choice: dict) -> list[dict]:
    """A chat choice's message as output items: its reasoning, its text (when it has some, or no calls; with its
    tokens' entries of chat's ``logprobs`` when given), its calls."""
    message, status = choice["message"], "incomplete" if choice["finish_reason"] == "length" else "completed"
    calls = message.get("tool_calls") or []
    if message.get("reasoning_content") and not message.get("content") and not calls and status == "incomplete":
        return [_reasoning_item(message["reasoning_content"], status)]  # cut inside the reasoning: it alone, as OpenAI
    out = [_reasoning_item(message["reasoning_content"])] if message.get("reasoning_content") else []
    if message.get("content") or not calls:
        text = message.get("content") or ""
        out.append(_message_item(text, status, logprobs=text_logprobs(choice)))
    return out + [_call_item(c) for c in calls]


def _answer_messages(output: list[dict]) -> list[dict]:
    """Output items as the chat messages a later turn renders (reasoning dropped, as chat templates drop it)."""
    text = "".join(p["text"] for item in output if item["type"] == "message" for p in item["content"])
    calls = [{"id": i["call_id"], "type": "function", "function": {"name": i["name"], "arguments": i["arguments"]}}
             for i in output if i["type"] == "function_call"]
    return [{"role": "assistant", "content": text or None, **({"tool_calls": calls} if calls else {})}]


def _check_outputs_answer_calls(messages: list[dict], first: int, origins: list) -> None:
    """A function_call_output item must answer a function call before it (this input's, or the conversation's
    ``previous_response_id`` carries), as OpenAI refuses it ("No tool call found for function call output"):
    ``FieldError`` naming the item. ``first``: where this input's messages start; ``origins``: their items."""
    calls: set[str] = set()
    for j, m in enumerate(messages):
        calls.update(c["id"] for c in m.get("tool_calls") or ())
        if m["role"] == "tool" and j >= first and m["tool_call_id"] not in calls:
            raise FieldError(f"input[{origins[j - first][0]}].call_id",
                             f"no function call with call_id {m['tool_call_id']!r} before this output")


class Responses:
    """The Responses routes over ``api``'s chat machinery, with their ``ResponseStore``."""

    def __init__(self, api: Api, capacity: int = MAX_STORED):
        self.api, self.store = api, ResponseStore(capacity)

    def add_routes(self, app: FastAPI) -> None:
        """The Responses routes on ``app`` (``flyer.serve.app.build_app``'s, with its OpenAI-shaped errors)."""
        @app.post("/v1/responses")
        async def create_response(request: Request, body: ResponsesBody):
            return await self.create(request, body)

        @app.get("/v1/responses/{response_id}")
        async def retrieve_response(request: Request, response_id: str):
            return self.retrieve(request, response_id)

        @app.delete("/v1/responses/{response_id}")
        async def delete_response(request: Request, response_id: str):
            return self.delete(request, response_id)

        @app.get("/v1/responses/{response_id}/input_items")
        async def list_input_items(request: Request, response_id: str):
            return self.input_items(request, response_id)

    def retrieve(self, request: Request, rid: str) -> dict:
        self.api.check_access(request)
        for name in ("stream", "starting_after"):  # a background response's replay, which flyer has none of
            if name in request.query_params and request.query_params[name] != "false":
                raise FieldError(name, "flyer serve keeps no background responses to stream: leave it out")
        return self.store.get(rid).response

    def delete(self, request: Request, rid: str) -> dict:
        self.api.check_access(request)
        self.store.delete(rid)
        return {"id": rid, "object": "response.deleted", "deleted": True}

    def input_items(self, request: Request, rid: str) -> dict:
        """A page of the stored response ``rid``'s input items (OpenAI's list object; ``after``: the items after that
        id in the ``order`` asked). ``FieldError`` naming a bad ``limit``, ``order`` or ``after``."""
        self.api.check_access(request)
        items = self.store.get(rid).inputs
        query = request.query_params
        limit = query.get("limit", "20")
        if not limit.isdigit() or not 1 <= int(limit) <= MAX_LISTED:
            raise FieldError("limit", f"must be an integer in [1, {MAX_LISTED}] (got {limit!r})")
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise FieldError("order", f"must be asc or desc (got {order!r})")
        items = items if order == "asc" else items[::-1]
        start, after = 0, query.get("after")
        if after is not None:
            start = next((i + 1 for i, item in enumerate(items) if item["id"] == after), None)
            if start is None:
                raise FieldError("after", f"response {rid!r} has no input item {after!r}")
        page = items[start:start + int(limit)]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": start + len(page) < len(items)}

    def _chat_body(self, body: ResponsesBody, messages: list[dict], origins: list | None = None) -> ChatBody:
        chat = {"model": body.model or self.api.model_name, "messages": messages, "stream": body.stream,
                "max_completion_tokens": body.max_output_tokens, "tools": body.chat_tools(),
                "tool_choice": body.chat_tool_choice(), "response_format": body.response_format(),
                "reasoning_effort": body.reasoning.effort if body.reasoning is not None else None}
        for name in ("temperature", "top_p", "parallel_tool_calls"):
            if getattr(body, name) is not None:
                chat[name] = getattr(body, name)
        if body.logprobs():
            chat.update(logprobs=True, top_logprobs=body.top_logprobs or 0)
        if body.stream:
            chat["stream_options"] = {"include_usage": True}  # the completed response's usage
        try:
            return ChatBody.model_validate({k: v for k, v in chat.items() if v is not None})
        except ValidationError as e:  # what the Responses body's own types let through
            first = e.errors()[0]
            loc = field_name(error_field(first["loc"], chat))
            raise _responses_field(FieldError(loc or "input", first["msg"]), origins) from None

    def _head(self, rid: str, body: ResponsesBody) -> dict:
        """The Response object's fields that the request sets, status in_progress and no output yet."""
        tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
        choice = body.tool_choice.model_dump(exclude_none=True) if isinstance(body.tool_choice, NamedFunction) \
            else body.tool_choice or "auto"
        fmt = body.text.format if body.text is not None else None
        sampling = self.api.sampling(body)  # what it samples with: the server's defaults where it sets none
        return {"id": rid, "object": "response", "created_at": int(time.time()), "status": "in_progress",
                "error": None, "incomplete_details": None, "instructions": body.instructions,
                "max_output_tokens": body.max_output_tokens, "model": self.api.model_name, "output": [],
                "parallel_tool_calls": body.parallel_tool_calls is not False,
                "previous_response_id": body.previous_response_id,
                "reasoning": {"effort": body.reasoning.effort if body.reasoning else None, "summary": None},
                "store": body.store is not False, "temperature": sampling["temperature"],
                "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
                "tool_choice": choice, "tools": tools, "top_p": sampling["top_p"],
                "truncation": "disabled", "usage": None, "user": body.user, "metadata": body.metadata or {},
                "top_logprobs": body.top_logprobs or 0}

    def _finish(self, head: dict, output: list[dict], usage: dict, messages: list[dict], store: bool,
                inputs: list[dict], finish: str | None) -> dict:
        """The finished Response object (stored when asked, with its ``inputs`` items): incomplete where the chat
        choice's ``finish`` was "length", whatever its items (a calls block cut after whole calls)."""
        incomplete = finish == "length" or any(i.get("status") == "incomplete" for i in output)
        # completed_at: "present only when status is completed" (OpenAI's Response object)
        response = {**head, "status": "incomplete" if incomplete else "completed",
                    "completed_at": None if incomplete else int(time.time()),
                    "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None, "output": output,
                    "usage": _usage(usage)}
        if store:
            self.store.put(head["id"], Stored(response, messages + _answer_messages(output), inputs))
        return response

    async def create(self, request: Request, body: ResponsesBody) -> Response:
        self.api.check_access(request, body.model)
        body.check_fields()
        past = self.store.get(body.previous_response_id, "previous_response_id") if body.previous_response_id else None
        origins: list = []
        messages = (past.messages if past else []) + input_messages(body.input, origins)
        _check_outputs_answer_calls(messages, len(messages) - len(origins), origins)
        # the conversation's items (the previous response's, its answer's output items among them), then its own
        new = input_items(body.input, _item_id)
        inputs = (past.inputs + past.response["output"] if past else []) + new
        _check_unique(inputs, len(inputs) - len(new))
        system = [{"role": "system", "content": body.instructions}] if body.instructions is not None else []
        origins = ["instructions"] * len(system) + ["previous_response_id"] * (len(messages) - len(origins)) + origins
        chat = self._chat_body(body, system + messages, origins)
        try:
            result = await self.api.chat_result(request, chat, spans=True)
        except FieldError as e:
            raise _responses_field(e, origins) from None
        except ApiError as e:  # a grammar's failure while generating names chat's field: the body's here
            e.param = _FIELDS.get(e.param, e.param)
            raise
        head = self._head(_item_id("resp"), body)
        if isinstance(result, dict):
            choice = result["choices"][0]
            output = _output_items(choice)
            return JSONResponse(self._finish(head, output, result["usage"], messages, body.store is not False, inputs,
                                             choice["finish_reason"]))
        return StreamingResponse(self._events(head, result, messages, body.store is not False, inputs),
                                 media_type="text/event-stream")

    async def _events(self, head: dict, chunks: AsyncIterator[dict], messages: list[dict],
                      store: bool, inputs: list[dict]) -> AsyncIterator[bytes]:
        """Responses' stream of events from the chat route's chunks (one choice; the usage chunk last)."""
        seq = 0
        output: list[dict] = []  # the items so far, each as it stands
        open_kind = None  # "reasoning" or "message": the item the deltas go to
        finish = None  # the choice's finish reason, once it came
        pending: list[dict] = []  # the content's logprobs entries no text delta has carried yet
        held: list[dict] = []  # chat's tool calls, whose finish (the next chunk's) says whether the text before was cut

        def event(kind: str, **fields) -> bytes:
            nonlocal seq
            seq += 1
            return sse_event({"type": kind, "sequence_number": seq - 1, **fields}, kind)

        def where() -> dict:
            return {"item_id": output[-1]["id"], "output_index": len(output) - 1, "content_index": 0}

        def open_item(item: dict, part: dict) -> Iterator[bytes]:
            nonlocal open_kind
            output.append(item)
            open_kind = item["type"]
            yield event("response.output_item.added", output_index=len(output) - 1, item={**item, "content": []})
            yield event("response.content_part.added", **where(), part=part)

        def close_item(status: str = "completed") -> Iterator[bytes]:
            nonlocal open_kind, pending
            item, kind = output[-1], open_kind
            open_kind = None
            item["status"] = status
            text = "".join(p["text"] for p in item["content"])
            if kind == "reasoning":
                yield event("response.reasoning_text.done", **where(), text=text)
                part = {"type": "reasoning_text", "text": text}
            else:
                if pending:
                    # the content's tokens without text left (an EOS): chat's last chunk carries them with an empty
                    # delta, so does this stream, and the text's logprobs hold them as unstreamed
                    item["content"][0]["logprobs"] += pending
                    yield event("response.output_text.delta", **where(), delta="", logprobs=pending)
                    pending = []
                lps = item["content"][0]["logprobs"]  # the deltas' (what was streamed is what the text holds)
                yield event("response.output_text.done", **where(), text=text, logprobs=lps)
                part = _text_part(text, lps)
            yield event("response.content_part.done", **where(), part=part)
            yield event("response.output_item.done", output_index=len(output) - 1, item=item)

        def add_text(kind: str, delta: str) -> Iterator[bytes]:
            nonlocal pending
            if open_kind != kind:
                if open_kind is not None:
                    yield from close_item()
                if kind == "reasoning":
                    yield from open_item(_reasoning_item("", "in_progress"), {"type": "reasoning_text", "text": ""})
                    output[-1]["content"] = [{"type": "reasoning_text", "text": ""}]
                else:
                    yield from open_item(_message_item("", "in_progress"), _text_part(""))
            output[-1]["content"][0]["text"] += delta
            if delta and kind == "reasoning":
                yield event("response.reasoning_text.delta", **where(), delta=delta)
            elif delta:
                lps, pending = pending, []  # a token of no text alone (a split character's first byte) comes later
                output[-1]["content"][0]["logprobs"] += lps
                yield event("response.output_text.delta", **where(), delta=delta, logprobs=lps)

        yield event("response.created", response=head)
        yield event("response.in_progress", response=head)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                if "error" in chunk:  # the request failed: the stream ends with the failed response
                    err = chunk["error"]  # its grammar's failure is the request's (Responses' codes have no other)
                    code = "invalid_prompt" if err["type"] == "invalid_request_error" else "server_error"
                    failed = {**head, "status": "failed", "output": output,
                              "error": {"code": code, "message": err["message"]}}
                    yield event("response.failed", response=failed)
                    return
                if not chunk["choices"]:  # the usage chunk, last
                    cut_reasoning = bool(output) and output[-1]["type"] == "reasoning" and \
                        output[-1]["status"] == "incomplete"  # it alone, as unstreamed
                    if not cut_reasoning and not any(i["type"] in ("message", "function_call") for i in output):
                        # an answer without text or calls is an empty message, as unstreamed
                        for b in (*add_text("message", ""), *close_item("incomplete" if finish == "length"
                                                                        else "completed")):
                            yield b
                    response = self._finish(head, output, chunk["usage"], messages, store, inputs, finish)
                    kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
                    yield event(kind, response=response)
                    return
                choice = chunk["choices"][0]
                delta, finish = choice["delta"], choice["finish_reason"] or finish
                pending += text_logprobs(choice) or []
                for kind, key in (("reasoning", "reasoning_content"), ("message", "content")):
                    if delta.get(key):
                        for b in add_text(kind, delta[key]):
                            yield b
                calls = held + (delta.get("tool_calls") or [])
                if calls and choice["finish_reason"] is None:
                    held = calls
                    continue
                held = []
                if (calls or choice["finish_reason"] is not None) and open_kind is not None:
                    # cut by max_output_tokens: the open message (calls after it or not: as unstreamed), or a
                    # reasoning no text or call followed
                    cut = choice["finish_reason"] == "length" and (open_kind == "message" or not calls)
                    for b in close_item("incomplete" if cut else "completed"):
                        yield b
                for call in calls:
                    item = _call_item(call, "in_progress", "")
                    output.append(item)
                    index = len(output) - 1
                    yield event("response.output_item.added", output_index=index, item=dict(item))
                    item["arguments"] = call["function"]["arguments"]
                    yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                                delta=item["arguments"])
                    yield event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                name=item["name"], arguments=item["arguments"])
                    item["status"] = "completed"
                    yield event("response.output_item.done", output_index=index, item=item)
