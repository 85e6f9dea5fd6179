"""The request body of OpenAI's Responses API (``POST /v1/responses``, pydantic), checked as ``flyer.serve.schema``
checks the chat body: a field of the wrong type or out of range answers 400 naming it, and ``check_fields`` refuses
the fields that would change the output and that flyer serve does not implement (``NOT_IMPLEMENTED``).

    ResponsesBody   input (a string, or message / function_call / function_call_output items), instructions,
                    max_output_tokens, temperature, top_p, stream, tools (function tools, Responses' flat shape),
                    tool_choice, parallel_tool_calls, text.format, reasoning.effort, store, previous_response_id,
                    metadata, user, include (``LOGPROBS`` only), top_logprobs
    input_messages  the items as chat messages (``flyer.serve.schema.ChatMessage``'s dicts)
    input_items     the items as ``GET /v1/responses/{id}/input_items`` lists them
"""

from __future__ import annotations

from typing import Any, Callable, Literal

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, ValidationInfo, field_validator

from flyer.errors import FieldError
from flyer.parse import check_unicode
from flyer.serve.schema import MAX_LOGPROBS, OpenAIBody, RequestModel, error_field, field_name, refuse_unimplemented

# fields that change what is generated (or what a response holds) and that flyer serve does not implement, with the
# values that change nothing: any other value is refused, never silently ignored
NOT_IMPLEMENTED = {"background": (False,), "conversation": (None,), "prompt": (None,),
                   "max_tool_calls": (None,), "truncation": ("disabled",),
                   "context_management": ([],), "moderation": (None,), "access_programs": (None,)}
# Responses parameters that change nothing flyer serve generates (routing, billing, caching hints, safety ids,
# stream framing, image options without image input); any other key at a value but null is refused
ACCEPTED = ("service_tier", "safety_identifier", "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options",
            "stream_options", "background_options", "image")
MAX_METADATA_KEYS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512  # as OpenAI bounds ``metadata``
LOGPROBS = "message.output_text.logprobs"  # the one ``include`` value implemented: the output text's token logprobs


class TextPart(RequestModel):
    """A message's content part: ``input_text`` (a prompt's) or ``output_text`` (an earlier answer's); other kinds
    (images, files, audio) are refused: a text model would answer as if they were not there."""

    model_config = ConfigDict(extra="allow")  # output_text's annotations and logprobs: nothing to render
    type: Literal["input_text", "output_text"]
    text: str


_TEXT_PARTS = TypeAdapter(list[TextPart])


def _parts_as_a_list(content, handler):
    # a list is checked as parts only: the union would first report it as "not a string", hiding the part's error
    return _TEXT_PARTS.validate_python(content) if isinstance(content, list) else handler(content)


class InputItem(RequestModel):
    """What every input item may carry back from an earlier response: its ``id`` (a string, as OpenAI's ids and the
    client's types are: input_items lists it and its ``after`` names it) and ``status``."""

    model_config = ConfigDict(extra="allow")
    id: str | None = Field(default=None, min_length=1)
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    def sent(self) -> dict[str, str]:
        """The id and status it was sent with."""
        return self.model_dump(include={"id", "status"}, exclude_none=True)


class MessageItem(InputItem):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[TextPart]
    _parts = field_validator("content", mode="wrap")(_parts_as_a_list)

    @field_validator("content")
    @classmethod
    def _parts_of_the_role(cls, content, info: ValidationInfo):
        """An assistant's parts are output_text, the others' input_text (as OpenAI refuses them otherwise; listed
        back, the client's types would refuse them)."""
        want = "output_text" if info.data.get("role") == "assistant" else "input_text"
        for k, part in enumerate(content if isinstance(content, list) else []):
            if part.type != want:
                raise ValueError(f"part {k}: a {info.data.get('role')} message's parts are {want} (got {part.type})")
        return content

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(InputItem):
    """An earlier answer's call (``ResponseFunctionToolCall``), sent back before its output."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str  # JSON text, as the model wrote it


class FunctionCallOutputItem(InputItem):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[TextPart]
    _parts = field_validator("output", mode="wrap")(_parts_as_a_list)

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


class ReasoningItem(InputItem):
    """An earlier answer's reasoning sent back: chat templates drop the reasoning of earlier turns, so does this."""

    type: Literal["reasoning"]
    summary: list[dict[str, Any]] = []  # as the client's ResponseReasoningItem: listed back, it must read


ITEMS = {"message": MessageItem, "function_call": FunctionCallItem, "function_call_output": FunctionCallOutputItem,
         "reasoning": ReasoningItem}


class FunctionTool(RequestModel):
    """A function tool in Responses' flat shape; built-in tools (web_search, file_search, ...) are refused."""

    model_config = ConfigDict(extra="allow")
    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(RequestModel):
    type: str
    name: str | None = None


class TextFormat(RequestModel):
    """``text.format``: text, json_object, or json_schema with ``name`` and ``schema`` (flat, as Responses sends it)."""

    model_config = ConfigDict(populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    def well_formed(self) -> bool:
        """json_schema with its name and schema; text and json_object without any of json_schema's keys."""
        if self.type == "json_schema":
            return self.schema_ is not None and self.name is not None
        return all(v is None for v in (self.name, self.schema_, self.description, self.strict))


class TextConfig(RequestModel):
    model_config = ConfigDict(extra="allow")
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(RequestModel):
    model_config = ConfigDict(extra="allow")
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    summary: str | None = None
    generate_summary: str | None = None


class ResponsesBody(OpenAIBody):  # extra fields: those clients send that change nothing (service_tier, ...)

    model: str | None = None
    input: str | list[dict[str, Any]]  # items checked by ``input_messages``, which names the one at fault
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    # None: the server's default (the checkpoint's generation_config, else OpenAI's 1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool = False
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    store: bool | None = None  # None: OpenAI's default, stored
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    include: list[str] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # as OpenAI bounds it

    def logprobs(self) -> bool:
        """Whether the output text carries its tokens' logprobs (``include`` holds ``LOGPROBS``)."""
        return LOGPROBS in (self.include or [])

    def check_fields(self) -> None:
        """``FieldError`` for a string that is no Unicode text (``check_unicode``), a ``NOT_IMPLEMENTED`` field at a
        value that would change the output, a built-in tool or tool choice, an unimplemented reasoning summary or text
        verbosity, an ``include`` other than ``LOGPROBS``, ``top_logprobs`` without it."""
        check_unicode(self.model_dump(by_alias=True))
        for value in self.include or []:
            if value != LOGPROBS:
                raise FieldError("include", f"only {LOGPROBS!r} is implemented (got {value!r})")
        # OpenAI takes top_logprobs without the include and answers empty logprobs, which users report as a bug
        # (community.openai.com "Are logprobs not yet supported in the Responses api?"); refused, as chat refuses
        # top_logprobs without logprobs
        if self.top_logprobs and not self.logprobs():
            raise FieldError("top_logprobs", f"needs include: [{LOGPROBS!r}]")
        refuse_unimplemented(self.model_extra or {}, NOT_IMPLEMENTED, ACCEPTED)
        for where, part in (("reasoning", self.reasoning), ("text", self.text),
                            *((f"tools[{i}]", t) for i, t in enumerate(self.tools or []))):
            for name, value in ((part.model_extra or {}) if part is not None else {}).items():
                if value not in (None, False):  # a tool's defer_loading, a reasoning's mode, ...: they would matter
                    raise FieldError(f"{where}.{name}", f"flyer serve does not implement it (got {str(value)[:40]!r}): "
                                                        "leave it out")
        for i, t in enumerate(self.tools or []):
            if t.type != "function":
                raise FieldError(f"tools[{i}].type", f"only function tools are implemented (got {t.type!r})")
            if not t.name:
                raise FieldError(f"tools[{i}].name", "a function tool needs a name")
        if isinstance(self.tool_choice, NamedFunction) and (self.tool_choice.type != "function"
                                                            or not self.tool_choice.name):
            raise FieldError("tool_choice", f"must be none, auto, required or {{'type': 'function', 'name': ...}} "
                                            f"(got {self.tool_choice.model_dump(exclude_none=True)})")
        if self.reasoning is not None and (self.reasoning.summary or self.reasoning.generate_summary):
            raise FieldError("reasoning.summary", "flyer serve does not implement reasoning summaries (the reasoning "
                                                  "itself is a reasoning item with a --reasoning-parser): leave it out")
        if self.text is not None and self.text.verbosity not in (None, "medium"):
            raise FieldError("text.verbosity", f"flyer serve does not implement it (got {self.text.verbosity!r}): "
                                               "leave it out or send 'medium'")
        fmt = self.text.format if self.text is not None else None
        if fmt is not None and not fmt.well_formed():
            raise FieldError("text.format", "name and schema (and description, strict) are given with type "
                                            "json_schema and only then")
        if len(self.metadata or {}) > MAX_METADATA_KEYS:
            raise FieldError("metadata", f"holds more than {MAX_METADATA_KEYS} keys")
        for k, v in (self.metadata or {}).items():
            if len(k) > MAX_METADATA_KEY or len(v) > MAX_METADATA_VALUE:
                raise FieldError("metadata", f"keys hold at most {MAX_METADATA_KEY} characters and values "
                                             f"{MAX_METADATA_VALUE} (got {len(k)} and {len(v)} for {k[:20]!r})")

    def response_format(self) -> dict | None:
        """``text.format`` in chat's ``response_format`` shape (``flyer.serve.schema.ResponseFormat``)."""
        fmt = self.text.format if self.text is not None else None
        if fmt is None:
            return None
        if fmt.type != "json_schema":
            return {"type": fmt.type}
        schema = {"name": fmt.name, "schema": fmt.schema_, "description": fmt.description, "strict": fmt.strict}
        return {"type": "json_schema", "json_schema": {k: v for k, v in schema.items() if v is not None}}

    def chat_tools(self) -> list[dict] | None:
        """``tools`` in chat's nested shape (``flyer.serve.schema.Tool``)."""
        if not self.tools:
            return None
        keep = ("name", "description", "parameters", "strict")
        return [{"type": "function", "function": t.model_dump(include=set(keep), exclude_none=True)}
                for t in self.tools]

    def chat_tool_choice(self) -> str | dict | None:
        if isinstance(self.tool_choice, NamedFunction):
            return {"type": "function", "function": {"name": self.tool_choice.name}}
        return self.tool_choice


def input_messages(items: str | list[dict[str, Any]], origins: list | None = None) -> list[dict]:
    """The ``input`` as chat messages: a string is one user message; a function_call item joins the assistant
    message before it (or opens one) as one of its ``tool_calls``, a function_call_output item is a tool message,
    a reasoning item is dropped. ``FieldError`` naming the item at fault. ``origins``, when given, gets per message
    the index of its item (None for a message of calls only) and its calls' items' indices, so that an error the
    chat machinery raises on a message names the item."""
    if isinstance(items, str):
        if origins is not None:
            origins.append((0, []))
        return [{"role": "user", "content": items}]
    out: list[dict] = []
    origins = [] if origins is None else origins
    for i, raw in enumerate(items):
        kind = raw.get("type", "message") if isinstance(raw, dict) else None
        model = ITEMS.get(kind) if isinstance(kind, str) else None  # (a list or object is no key)
        if model is None:
            raise FieldError(f"input[{i}].type", f"must be one of {sorted(ITEMS)} (got {kind!r})")
        try:
            item = model.model_validate(raw)
        except ValidationError as e:
            first = e.errors()[0]
            raise FieldError(field_name(["input", i, *error_field(first["loc"], raw)]), first["msg"]) from None
        if isinstance(item, MessageItem):
            out.append({"role": item.role, "content": item.text()})
            origins.append((i, []))
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name,
                                                                         "arguments": item.arguments}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
                origins.append((None, []))
            origins[-1][1].append(i)
        elif isinstance(item, FunctionCallOutputItem):
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
            origins.append((i, []))
    return out


def input_items(items: str | list[dict[str, Any]], new_id: Callable[[str], str]) -> list[dict]:
    """The ``input`` (checked by ``input_messages``) in the shapes OpenAI lists a response's input items in (the
    openai client's ``ResponseItem``): messages with text parts (``input_text``; an assistant's ``output_text``),
    function calls and their outputs, reasoning; each with the id it was sent with, else ``new_id(prefix)``'s."""
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    out = []
    for raw in items:
        item = ITEMS[raw.get("type", "message")].model_validate(raw)
        sent = item.sent()
        if isinstance(item, MessageItem):
            kind = "output_text" if item.role == "assistant" else "input_text"
            parts = [TextPart(type=kind, text=item.content)] if isinstance(item.content, str) else item.content
            content = [{"annotations": [], **p.model_dump()} if p.type == "output_text" else p.model_dump()
                       for p in parts]
            out.append({"id": new_id("msg"), "type": "message", "role": item.role, "content": content,
                        "status": "completed", **sent})
        elif isinstance(item, FunctionCallItem):
            out.append({"id": new_id("fc"), "type": "function_call", "call_id": item.call_id, "name": item.name,
                        "arguments": item.arguments, "status": "completed", **sent})
        elif isinstance(item, FunctionCallOutputItem):
            out.append({"id": new_id("fco"), "type": "function_call_output", "call_id": item.call_id,
                        "output": item.output if isinstance(item.output, str) else
                        [p.model_dump() for p in item.output], "status": "completed", **sent})
        else:  # reasoning: as sent, with an id and a summary (the client's required fields)
            out.append({"summary": [], **raw, "id": item.id or new_id("rs")})
    return out
