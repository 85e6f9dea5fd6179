"""The request bodies of the OpenAI routes (pydantic), checked as OpenAI's API checks them: a field of
the wrong type or out of range answers 400 naming it (FastAPI validates the body before a route runs),
and ``check_fields`` refuses the combinations and the unimplemented fields the types cannot express.

    Body            the fields both routes share: model, sampling options, stop strings, n, stream
    CompletionBody  POST /v1/completions: prompt (text, texts, token ids, lists of token ids), logprobs, echo,
                    suffix (fill-in-the-middle: ``flyer.data.fim``), best_of (candidates per prompt, n returned)
    ChatBody        POST /v1/chat/completions: messages (text content or text parts), logprobs, top_logprobs,
                    chat_template_kwargs (more variables for the chat template, as vLLM takes them),
                    reasoning_effort (OpenAI's; to the template as vLLM passes it, V4's levels mapped)
    ResponseFormat  both routes' ``response_format``: text, json_object, json_schema (``flyer.serve.grammar``)
    Tool, ToolChoice, MessageToolCall   chat's ``tools``, ``tool_choice`` and an assistant message's ``tool_calls``
                    (``flyer.serve.tools``)
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationInfo, field_validator

from flyer.errors import FieldError
from flyer.parse import check_unicode, is_token_id

MAX_LOGPROBS = 20
MAX_CHOICES = 128  # n, as OpenAI bounds it
# stop strings (OpenAI takes 4) and stop_token_ids: each streamed token checks every stop string, on the HTTP
# process's one event loop, and every stop id, on the engine's thread
MAX_STOPS, MAX_STOP_CHARS, MAX_STOP_IDS = 16, 256, 1024
MAX_TEMPLATE_KWARGS_CHARS = 16384  # chat_template_kwargs as JSON text: template switches, not a second prompt

# OpenAI's and vLLM's fields that change what is generated and that flyer serve does not implement, with the
# values that change nothing (a client may send those): any other value is refused, never silently ignored
# (best_of: chat's, which OpenAI's chat route lacks; completions implement it, ``CompletionBody.best_of``)
NOT_IMPLEMENTED = {"best_of": (1,), "functions": ([],), "use_beam_search": (False,), "length_penalty": (1.0,),
                   "min_tokens": (0,), "ignore_eos": (False,), "include_stop_str_in_output": (False,),
                   "skip_special_tokens": (True,), "spaces_between_special_tokens": (True,),
                   "allowed_token_ids": ([],), "bad_words": ([],), "truncate_prompt_tokens": (),
                   "guided_json": (), "guided_regex": (), "guided_choice": (), "guided_grammar": (),
                   "structured_outputs": (), "logits_processors": ([],), "continue_final_message": (False,),
                   "return_tokens_as_token_ids": (False,), "echo": (False,), "add_generation_prompt": (True,),
                   "modalities": (["text"],)}
# OpenAI's and vLLM's fields that change nothing flyer serve answers (who asks, what is stored, what is billed or
# scheduled how): accepted at any value. A route refuses any other field it does not define unless it is null, as
# OpenAI refuses an unrecognized argument: a typo (max_token) or an option it lacks would otherwise go unseen
ACCEPTED = ("user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier", "prediction",
            "request_id", "priority")

# the names pydantic gives a union's members in an error's ``loc`` (``prompt.str``, ``stop.list[str]``,
# ``tool_choice.NamedToolChoice``): a type, never an OpenAI field (snake_case) or a key the body holds there
_UNION_TAG = re.compile(r"[A-Z]|.*\[|(str|int|float|bool|bytes|none)$")


def refuse_unimplemented(extra: dict[str, Any], not_implemented: dict[str, tuple], known: tuple | None = None) -> None:
    """``FieldError`` for a body's key its model does not define (``extra``) that ``not_implemented`` lists, at a
    value other than its neutral ones; with ``known`` (the keys that change nothing), for any other key too, at a
    value other than null: a key the route would otherwise ignore."""
    for name, value in extra.items():
        neutral = not_implemented.get(name)
        if neutral is not None and value is not None and value not in neutral:
            raise FieldError(name, f"flyer serve does not implement it (got {value!r}): leave it out"
                                   + (f" or send {neutral[0]!r}" if neutral else ""))
        if neutral is None and known is not None and name not in known and value is not None:
            raise FieldError(name, f"is not a parameter flyer serve implements (got {str(value)[:40]!r}): leave it out")


def error_field(loc: tuple, body: Any) -> list:
    """The path a pydantic error's ``loc`` (into the request ``body``, the JSON it validated) names, as the body
    spells it (``field_name`` writes it): its keys and indices, without the names pydantic gives a union's members
    (``prompt.str``: the prompt is not a string, ``messages.0.content.list[ContentPart]``: nor a list of parts),
    which name no field. A part is a key (or index) where the body holds it there, else a member's
    name where it reads as a type, else a field the body lacks (missing, or its default checked)."""
    out = []
    for x in loc:
        if isinstance(body, dict) and x in body or isinstance(body, list) and isinstance(x, int):
            out.append(x)
            body = body[x] if isinstance(body, dict) or 0 <= x < len(body) else None
        elif not (isinstance(x, str) and _UNION_TAG.match(x)):
            out.append(x)
            body = None
    return out


def field_name(path: list) -> str:
    """A field's path (keys and indices) as OpenAI's errors name it: ``messages[0].content[1].type``."""
    return "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in path).lstrip(".")


class RequestModel(BaseModel):
    """A request body, or a part of one, read as OpenAI's API reads it: a value of the wrong type is refused, not
    converted (strict: "2" is no max_tokens, true no logprobs count, "yes" no tool's strict; an integer is a
    number), and NaN and the infinities are no numbers."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False)


class OpenAIBody(RequestModel):
    """A request body (``RequestModel``) whose explicit null in an optional field whose type has no null of its own
    means its default, as OpenAI types them ("number or null": clients send unset options as null). A field that
    takes null keeps it (completions' max_tokens: the rest of the context)."""

    model_config = ConfigDict(extra="allow")  # refused in check_fields but what changes nothing

    @field_validator("*", mode="before")
    @classmethod
    def _null_is_the_default(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields[info.field_name]
        if value is None and not field.is_required() and type(None) not in get_args(field.annotation):
            return field.get_default(call_default_factory=True)
        return value


class JsonSchema(RequestModel):
    """``response_format.json_schema`` as OpenAI defines it: the output matches ``schema`` (``strict`` or not:
    flyer always constrains the tokens to it; none: any JSON value, ``schema_or_object``)."""

    model_config = ConfigDict(populate_by_name=True)
    name: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # BaseModel has a ``schema`` of its own
    strict: bool | None = None


class ResponseFormat(RequestModel):
    """``response_format``: "text" (any output), "json_object" (a JSON object), "json_schema" (JSON matching
    ``json_schema.schema``)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = Field(default=None, validate_default=True)

    @field_validator("json_schema")
    @classmethod
    def _schema_for_its_type(cls, value: JsonSchema | None, info: ValidationInfo) -> JsonSchema | None:
        if (value is not None) != (info.data.get("type") == "json_schema"):
            raise ValueError("json_schema is given with type json_schema and only then")
        return value

    def schema_or_object(self) -> dict[str, Any] | None:
        """The JSON schema the output matches: json_schema's ({}: any JSON value, for one without a schema, which
        OpenAI's API takes), or for json_object None (any JSON object)."""
        if self.json_schema is None:
            return None
        return {} if self.json_schema.schema_ is None else self.json_schema.schema_


class FunctionDefinition(RequestModel):
    """A tool's function: ``parameters`` a JSON schema of its arguments (an object; absent: none). Other fields
    reach the chat template as sent."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")  # as OpenAI bounds it
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(RequestModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    """``tool_choice`` naming the function the model must call."""

    type: Literal["function"]
    function: FunctionName


class CalledFunction(RequestModel):
    name: str
    arguments: str  # JSON text, as the model wrote it


class MessageToolCall(RequestModel):
    """One call of an assistant message's ``tool_calls`` (a conversation going on after the call)."""

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class Body(OpenAIBody):
    """The fields both routes share; a subclass adds its prompt's."""

    def check_fields(self) -> None:
        """``FieldError`` for a string that is no Unicode text (``check_unicode``), a ``NOT_IMPLEMENTED`` field at a
        value that would change the output, and a field that needs another one set (as OpenAI's API refuses them)."""
        check_unicode(self.model_dump(by_alias=True))
        refuse_unimplemented(self.model_extra or {}, NOT_IMPLEMENTED, ACCEPTED)
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "only allowed with stream: true")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    # the sampling fields unset (None): the server's defaults (``flyer.serve.sampling_defaults``), else OpenAI's
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)  # OpenAI's range
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None  # its range checked once, by the engine (``Engine.check``)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)  # choices per prompt
    # ranges checked once, by the engine (``Engine.check``), as for its other sampling options
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None  # token id (a JSON key) -> added to its logit
    # vLLM's sampling fields (``flyer.infer.sampling``): top_k -1 or 0 for all tokens; the stop_token_ids end the
    # output as an EOS does, their text kept unless a special token's (vLLM's rule)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP_IDS)
    response_format: ResponseFormat | None = None  # structured outputs (``flyer.serve.grammar``)

    def token_bias(self) -> tuple[tuple[int, float], ...]:
        """``logit_bias`` as (token id, bias) pairs, one per token ("7" and "07" are one key: the last
        wins); ``FieldError`` for a key that is not a token id."""
        out = {}
        for k, v in (self.logit_bias or {}).items():
            if not is_token_id(k):
                raise FieldError("logit_bias", f"keys must be token ids (got {k!r})")
            out[int(k)] = v
        return tuple(out.items())

    def stop_strings(self) -> list[str]:
        """``stop`` as a list; ``FieldError`` for an empty one, or past ``MAX_STOPS`` / ``MAX_STOP_CHARS``."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise FieldError("stop", "stop strings must not be empty")
        if len(stops) > MAX_STOPS or max(map(len, stops), default=0) > MAX_STOP_CHARS:
            raise FieldError("stop", f"at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters (got "
                                     f"{len(stops)}, the longest {max(map(len, stops))})")
        return stops


class CompletionBody(Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)  # 0 with echo: the prompt alone, scored (evaluation harnesses)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None  # the text after the one generated (FIM); None or "": a plain completion
    # candidates per prompt, of which the n best are returned (``flyer.serve.generation.best_candidates``); unset: n
    best_of: int | None = Field(default=None, ge=1, le=MAX_CHOICES)

    def candidates(self) -> int:
        """Candidates generated per prompt: ``best_of``, or ``n`` when it is unset."""
        return self.n if self.best_of is None else self.best_of

    def check_fields(self) -> None:
        """Also refuses best_of below n and, above n, with stream (the best are known only once all have ended: OpenAI
        refuses it too); a suffix with token-id prompts, whose layout (BOS, markers) is the client's own, and
        with echo: the model reads prompt and suffix in FIM markers, not the prompt alone, to echo and score."""
        super().check_fields()
        if self.max_tokens == 0 and not self.echo:
            raise FieldError("max_tokens", "0 generates nothing: send echo true to have the prompt back (scored "
                                           "with logprobs), or max_tokens >= 1")
        if self.candidates() < self.n:
            raise FieldError("best_of", f"must be >= n ({self.n}) (got {self.best_of})")
        if self.stream and self.candidates() > self.n:
            raise FieldError("best_of", f"cannot be streamed above n (got best_of {self.best_of}, n {self.n}): the "
                                        f"best are known only at the end; send stream false or best_of = n")
        if not self.suffix:
            return
        if self.echo:
            raise FieldError("suffix", "cannot be combined with echo (the model reads the prompt and suffix in "
                                       "fill-in-the-middle markers, not the prompt alone): send echo false")
        if isinstance(self.prompt, list) and self.prompt and not isinstance(self.prompt[0], str):
            raise FieldError("suffix", "needs a text prompt (token ids carry their own layout: send the "
                                       "fill-in-the-middle prompt's ids, markers included, as the prompt)")


class ContentPart(RequestModel):
    """One part of a message's content in OpenAI's list form: a text part, whose ``text`` is the
    prompt's. Other kinds (images, audio) are refused: a text model would answer as if they were not
    there."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = Field(default=None, validate_default=True)

    @field_validator("type")
    @classmethod
    def _text_only(cls, kind: str) -> str:
        if kind != "text":
            raise ValueError(f"{kind!r} parts are not supported: this model reads text parts only")
        return kind

    @field_validator("text")
    @classmethod
    def _text_part_has_text(cls, text: str | None, info: ValidationInfo) -> str | None:
        if text is None and info.data.get("type") == "text":
            raise ValueError("a text part's text must be a string")
        return text


_CONTENT_PARTS = TypeAdapter(list[ContentPart])


# the roles a chat template renders; DeepSeek-V4's encoding adds latest_reminder (``ChatEncoding.roles``)
JINJA_ROLES = ("system", "user", "assistant", "tool", "developer")


class ChatMessage(RequestModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer", "latest_reminder"]
    content: str | list[ContentPart] | None = Field(default=None, validate_default=True)  # null: an assistant's only
    tool_calls: list[MessageToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = Field(default=None, validate_default=True)  # a tool message's: the call it answers

    @field_validator("tool_call_id")
    @classmethod
    def _tool_answers_a_call(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None and info.data.get("role") == "tool":
            raise ValueError("a tool message names the call it answers (tool_call_id)")
        return value

    @field_validator("content", mode="wrap")
    @classmethod
    def _parts_as_a_list(cls, content, handler, info: ValidationInfo):
        if content is None and info.data.get("role", "assistant") != "assistant":  # as OpenAI's API refuses it
            raise ValueError(f"a {info.data['role']} message needs content")
        # a list is checked as parts only: the union would first report it as "not a string", hiding the part's error
        if isinstance(content, list):
            return _CONTENT_PARTS.validate_python(content)
        return handler(content)


class ChatBody(Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None  # rendered by the chat template (``flyer.serve.tools``)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # variables the chat template sees besides the messages (``flyer.data.chat_template``: V3.1's ``thinking``)
    chat_template_kwargs: dict[str, Any] | None = None
    # OpenAI's values (the openai client's ``ReasoningEffort``); what each means is the chat format's
    # (``flyer.data.chat_template.effort_kwargs``): another value answers 400 naming it
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None

    def check_fields(self) -> None:
        super().check_fields()
        kwargs = self.chat_template_kwargs or {}
        bad = [k for k in kwargs if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)]
        if bad:
            raise FieldError("chat_template_kwargs", f"keys must be template variable names (got {bad[0]!r})")
        if len(json.dumps(kwargs)) > MAX_TEMPLATE_KWARGS_CHARS:
            raise FieldError("chat_template_kwargs", f"holds more than {MAX_TEMPLATE_KWARGS_CHARS} characters as JSON")
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs", "needs logprobs: true")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) < len(names):
            raise FieldError("tools", f"function names must be distinct (got {names})")
        mode, name = self.tool_mode()
        if mode in ("required", "named") and not names:
            raise FieldError("tool_choice", f"{self.tool_choice!r} needs tools")
        if name is not None and name not in names:
            raise FieldError("tool_choice", f"names function {name!r}, which is not one of the tools {names}")
        if mode in ("required", "named") and self.response_format is not None and self.response_format.type != "text":
            raise FieldError("response_format", "cannot be combined with tool_choice required or a named function "
                                                "(the output is a tool call)")

    def tool_mode(self) -> tuple[str, str | None]:
        """("none" | "auto" | "required" | "named", the named function or None). Unset: "auto" with tools,
        "none" without (as OpenAI); "auto" without tools is "none" (nothing to call)."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named", self.tool_choice.function.name
        mode = self.tool_choice or "auto"
        return ("none" if mode == "auto" and not self.tools else mode), None
