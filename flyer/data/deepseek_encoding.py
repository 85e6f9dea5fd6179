"""DeepSeek-V3.2's and V4's chat encodings: the prompt text their releases render with Python code, not a Jinja
template.

DeepSeek-V3.2 (``model_type`` "deepseek_v32", the December 2025 release; V3.2-Exp ships a template and keeps it)
has no chat template: its repository's ``encoding/encoding_dsv32.py`` renders a conversation, and its model
writes tool calls in DSML (``flyer.serve.dsml``). ``ChatEncoding`` stands where a template string would
(``flyer.data.chat_template.read_chat_template`` gives one for such a checkpoint; ``chat_renderer`` renders with
it), so ``flyer serve`` and ``flyer train``'s chat data take it as they take a template. The text, BOS first:

    system      CONTENT, then "\\n\\n" + the tools section when the request has tools, then "\\n\\n" + the
                response format section when it has a response_format (``RESPONSE_FORMAT`` + its JSON)
    user        <｜User｜>CONTENT<｜Assistant｜> then <think> (the last user turn, thinking mode) or </think>
    developer   as a user, CONTENT written ["\\n\\n" + response format section] "\\n\\n# The user's message is: CONTENT"
    assistant   [REASONING</think>] CONTENT ["\\n\\n" DSML calls block] <｜end▁of▁sentence｜>
                (the reasoning only after the last user turn, thinking mode: earlier reasoning is dropped)
    tool        the k-th answer to the assistant's calls: "\\n\\n<function_results>" before the first,
                "\\n<result>CONTENT</result>" each, "\\n</function_results>\\n\\n" + <think> / </think> after the
                last (<think> in thinking mode when no user turn follows)

Thinking mode is ``extra={"thinking": True}`` (a request's ``chat_template_kwargs``, vLLM's spelling); chat mode
otherwise. The tools (OpenAI's definitions) and the request's ``response_format`` (json_object / json_schema as
OpenAI's API takes it, its fields in that order; "text" writes nothing) go on the first message when it is a
system message, on one added before it when it is not (vLLM adds one always; the release's examples carry them
on the conversation's system message); a system or developer message's own ``response_format`` (the release's
message field) is written too. The releases' encoders read it off a message only (vLLM's server passes a request's
tools there, not its response_format); flyer puts the request's there as it puts the tools, so the prompt states
the format the grammar holds the output to.
A user or tool turn always ends with the assistant's header, so ``add_generation_prompt`` changes nothing: a
conversation's prefix ending at a user turn renders as its prompt, except that in thinking mode the last user
turn opens ``<think>`` and earlier ones close it (the chat data build renders with the build's and the line's
chat_template_kwargs: chat mode unless they set thinking).

DeepSeek-V4 (``model_type`` "deepseek_v4", ``encoding/encoding_dsv4.py``) differs (``encode_v4``): its tools section
is another text; calls are a ``tool_calls`` block; tool results are merged into a user turn (consecutive user
turns too) as ``<tool_result>CONTENT</tool_result>`` parts joined by a blank line, in the calls' order; a user turn
writes <｜Assistant｜> and the think token only where an assistant's turn follows (or none does); with tools in the
conversation no reasoning is dropped (every user turn opens ``<think>`` in thinking mode); in thinking mode
``extra={"reasoning_effort": "high" | "max"}`` puts its prompt first ("low", the default, puts nothing; the three
levels of the later encoders, V4-Flash-0731's and Flash-Vision-Exp's: the first V4-Pro / V4-Flash encoder writes its
one prompt, the "high" text here, for "max" only, and nothing for "high"; a request's top-level OpenAI
``reasoning_effort`` maps onto them: ``ChatEncoding.effort_kwargs``);
a developer turn (its CONTENT required, as the release asserts) writes its own tools section and response format
section after its CONTENT; the ``latest_reminder`` role (date, locale, ...: context,
never an answer) is ``<｜latest_reminder｜>CONTENT``, and a user turn before it ends with the assistant's header as
before an assistant turn (the release's transition rule; its test conversation puts the reminder between the
system message and the first user turn).

Not rendered: V4's task tokens (``<｜action｜>``, ``<｜query｜>``, ``<｜title｜>``, ...), which the release appends for
a message's ``task`` field: its code calls them tokens "for internal classification tasks" (its README: search
routing, search queries, conversation titles, which URLs to read, i.e. DeepSeek's own app pipeline, not a chat
request's), so neither serve nor train offers them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from flyer.errors import FieldError

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"  # V4's
THINK, END_THINK = "<think>", "</think>"
DSML = "｜DSML｜"
CALLS_BLOCK = "function_calls"  # V3.2's name of the calls block
CALLS_BLOCK_V4 = "tool_calls"
# both releases' response format section, before the format's JSON (their ``response_format_template``)
RESPONSE_FORMAT = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
ROLES = {"deepseek_v32": ("system", "user", "developer", "assistant", "tool"),
         "deepseek_v4": ("system", "user", "developer", "assistant", "tool", "latest_reminder")}

# the release's tools section, word for word (the model was trained on it)
_TOOLS_SECTION = """## Tools
You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a "<{D}function_calls>" block like the following as part of your reply to the user:
<{D}function_calls>
<{D}invoke name="$FUNCTION_NAME">
<{D}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{D}parameter>
...
</{D}invoke>
<{D}invoke name="$FUNCTION_NAME2">
...
</{D}invoke>
</{D}function_calls>
String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects \
should use JSON format. The "string" attribute should be set to "true" for string type parameters and "false" for \
other types (numbers, booleans, arrays, objects).
If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking \
block. Here is an example:
<{D}function_calls>
...
</{D}function_calls>
<function_results>
...
</function_results>
{THINK}...thinking about results{END_THINK}
Here are the functions available in JSONSchema format:
<functions>
{schemas}
</functions>
"""


# V4's, word for word
_TOOLS_SECTION_V4 = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a \
"<{D}tool_calls>" block like the following:

<{D}tool_calls>
<{D}invoke name="$TOOL_NAME">
<{D}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{D}parameter>
...
</{D}invoke>
<{D}invoke name="$TOOL_NAME2">
...
</{D}invoke>
</{D}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, \
arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {THINK}), you MUST output your complete reasoning inside \
{THINK}...{END_THINK} BEFORE any tool calls or final response.

Otherwise, output directly after {END_THINK} with tool calls or final response.

### Available Tool Schemas

{schemas}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""
# V4's reasoning effort prompts (thinking mode, first in the prompt); "low" is the default and adds nothing
REASONING_EFFORT = {
    "low": "",
    "high": "Reasoning Effort: Absolute maximum with no shortcuts permitted.\nYou MUST be very thorough in your "
            "thinking and comprehensively decompose the problem to resolve the root cause, rigorously stress-testing "
            "your logic against all potential paths, edge cases, and adversarial scenarios.\nExplicitly write out "
            "your entire deliberation process, documenting every intermediate step, considered alternative, and "
            "rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n",
    "max": "Reasoning Effort: Beyond maximum — exhaustive, relentless, and uncompromising.\nYou MUST reason with the "
           "utmost depth and rigor, leaving absolutely nothing to chance: exhaustively decompose the problem into its "
           "most fundamental components, trace every causal chain to its root, and resolve the underlying cause "
           "rather than any surface symptom.\nDo not stop reasoning until you have independently verified the "
           "solution from multiple angles and are certain that no assumption remains unchecked and no error remains "
           "undiscovered.\n\n"}
# OpenAI's top-level reasoning_effort on V4 -> (thinking, REASONING_EFFORT level): "none" is chat mode, the release's
# own level names are thinking mode at that level; minimal / medium / xhigh name no level of the release and are
# refused (vLLM's V4 tokenizer rounds them to low / low / high: an effort the client did not ask for)
OPENAI_EFFORT_V4 = {"none": (False, None), "low": (True, "low"), "high": (True, "high"), "max": (True, "max")}


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)  # the release's: Python's default separators, text unescaped


def tools_section(tools: list[dict], v4: bool = False) -> str:
    """The system prompt's tools section of OpenAI's tool definitions (each ``{"type", "function"}``): V3.2's,
    or ``v4``'s."""
    schemas = "\n".join(_json(t["function"]) for t in tools)
    return (_TOOLS_SECTION_V4 if v4 else _TOOLS_SECTION).format(D=DSML, THINK=THINK, END_THINK=END_THINK,
                                                                 schemas=schemas)


def _format_section(m: dict, shown: int) -> str:
    """"\\n\\n" + the response format section of message ``m``'s ``response_format`` (a JSON object), or "" without
    one; ``FieldError`` naming it (``shown``: the message's index; -1, the system message put first: the request's)."""
    fmt = m.get("response_format")
    if not fmt:  # the release writes none for a missing or empty one
        return ""
    if not isinstance(fmt, dict):
        raise FieldError("response_format" if shown < 0 else f"messages[{shown}].response_format",
                         f"must be a JSON object (got {type(fmt).__name__})")
    return "\n\n" + RESPONSE_FORMAT + _json(fmt)


def dsml_parameters(arguments: dict) -> str:
    """A call's arguments as DSML parameters, one a line: a string raw (string="true"), any other value as
    its JSON text (string="false")."""
    return "\n".join(f'<{DSML}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
                     f'{v if isinstance(v, str) else _json(v)}</{DSML}parameter>' for k, v in arguments.items())


def dsml_calls(calls: list[tuple[str, dict]], block: str = CALLS_BLOCK) -> str:
    """The calls block of (name, arguments) pairs, as the release renders an assistant's calls (and the model
    writes them)."""
    invokes = [f'<{DSML}invoke name="{name}">\n{dsml_parameters(args)}\n</{DSML}invoke>' for name, args in calls]
    return f"<{DSML}{block}>\n" + "\n".join(invokes) + f"\n</{DSML}{block}>"


def _arguments(m: dict, i: int) -> list[tuple[str, dict]]:
    """An assistant message's calls as (name, arguments object); ``FieldError`` naming the message's field."""
    out = []
    for k, c in enumerate(m.get("tool_calls") or []):
        fn = c.get("function") or {}
        args = fn.get("arguments")
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            args = None
        if not isinstance(args, dict):
            raise FieldError(f"messages[{i}].tool_calls[{k}].function.arguments", "must be a JSON object")
        out.append((fn.get("name"), args))
    return out


def _with_request(messages: list[dict], tools: list[dict] | None,
                  response_format: dict | None) -> list[tuple[int, dict]]:
    """(index in ``messages``, message) pairs, the request's tools and response_format on the first message when it
    is a system one, else on a system message put first (index -1; the request's response_format replaces the
    message's own)."""
    msgs = list(enumerate(messages))  # errors name the caller's index
    if tools or response_format:
        if not messages or messages[0].get("role") != "system":
            msgs.insert(0, (-1, {"role": "system", "content": ""}))
        head = {**msgs[0][1], **({"tools": tools} if tools else {})}
        msgs[0] = (msgs[0][0], {**head, "response_format": response_format} if response_format else head)
    return msgs


def encode_v32(messages: list[dict], tools: list[dict] | None = None, thinking: bool = False,
               response_format: dict | None = None) -> str:
    """``messages`` (OpenAI chat messages: role, content, an assistant's ``tool_calls`` and
    ``reasoning_content``), ``tools`` and the request's ``response_format`` (None: none) -> DeepSeek-V3.2's prompt
    text (module doc). ``FieldError`` naming messages for a conversation the release refuses (a tool answer without
    a call to answer, an assistant turn after the last user turn with neither reasoning nor calls in thinking
    mode)."""
    msgs = _with_request(messages, tools, response_format)
    # thinking mode drops a developer turn before the last user turn (the release's drop_thinking, which its V3.2
    # encode_messages then indexes past: an error there; V4's renders the kept turns, as flyer does for both)
    if thinking:
        last = _last_user([m for _, m in msgs])
        msgs = [(k, m) for n, (k, m) in enumerate(msgs) if m.get("role") != "developer" or n >= last]
    seq = [m for _, m in msgs]
    last_user = _last_user(seq)
    return BOS + "".join(_render(seq, n, last_user, thinking, k) for n, (k, _) in enumerate(msgs))


def _last_user(msgs: list[dict]) -> int:
    return max((i for i, m in enumerate(msgs) if m.get("role") in ("user", "developer")), default=-1)


def _render(msgs: list[dict], i: int, last_user: int, thinking: bool, shown: int) -> str:
    """Message ``i``'s text (``shown``: its index in the caller's messages, for errors)."""
    m = msgs[i]
    role, content = m.get("role"), m.get("content") or ""
    opens = THINK if thinking and i >= last_user else END_THINK  # the reasoning of the turn that answers
    if role == "system":
        return content + ("\n\n" + tools_section(m["tools"]) if m.get("tools") else "") + _format_section(m, shown)
    if role == "user":
        return f"{USER}{content}{ASSISTANT}{opens}"
    if role == "developer":  # its own tools, then its format, before the content (as a system message's)
        tools = "\n\n" + tools_section(m["tools"]) if m.get("tools") else ""
        return f"{USER}{tools}{_format_section(m, shown)}\n\n# The user's message is: {content}{ASSISTANT}{opens}"
    if role == "assistant":
        calls = _arguments(m, shown)
        think = ""
        if thinking and i > last_user:
            if not (m.get("reasoning_content") or calls):
                raise FieldError(f"messages[{shown}]", "in thinking mode an assistant turn after the last user turn "
                                                       "needs reasoning_content or tool_calls")
            think = (m.get("reasoning_content") or "") + END_THINK
        return think + content + ("\n\n" + dsml_calls(calls) if calls else "") + EOS
    if role == "tool":
        a = i - 1
        while a >= 0 and msgs[a].get("role") == "tool":
            a -= 1
        order, called = i - a, (msgs[a].get("tool_calls") or []) if a >= 0 and msgs[a].get("role") == "assistant" \
            else []
        if order > len(called):
            raise FieldError(f"messages[{shown}]", "a tool answer follows no assistant call left to answer")
        text = ("\n\n<function_results>" if order == 1 else "") + f"\n<result>{content}</result>"
        if order == len(called):
            text += "\n</function_results>\n\n" + (THINK if thinking and i >= last_user else END_THINK)
        return text
    raise FieldError(f"messages[{shown}].role", f"DeepSeek-V3.2's encoding renders system, user, developer, "
                                                f"assistant and tool turns (got {role!r})")


def encode_v4(messages: list[dict], tools: list[dict] | None = None, thinking: bool = False,
              reasoning_effort: str = "low", response_format: dict | None = None) -> str:
    """``messages``, ``tools`` and the request's ``response_format`` -> DeepSeek-V4's prompt text (module doc);
    ``reasoning_effort`` one of ``REASONING_EFFORT``. ``FieldError`` naming messages for a tool answer without a
    call before it, or a rendered developer turn without content (the release asserts it; unlike V3.2's, it takes
    an assistant turn after the last user turn with neither reasoning nor calls in thinking mode: ``</think>``)."""
    merged: list[dict] = []  # tool answers and user turns merged into user turns of parts (text or a tool's result)
    order: dict[str, int] | None = None  # the last assistant's call ids, in its order (None: it called nothing)
    for k, m in _with_request(messages, tools, response_format):
        role = m.get("role")
        if role == "tool" and order is None:
            raise FieldError(f"messages[{k}]", "a tool answer follows no assistant call")
        if role in ("user", "tool"):
            part = ("text", m.get("content") or "") if role == "user" else \
                ("tool", m.get("content") or "", order.get(m.get("tool_call_id"), 0))
            if merged and merged[-1]["role"] == "user":
                merged[-1]["parts"].append(part)
            else:
                merged.append({"role": "user", "parts": [part], "k": k})
            continue
        if role == "assistant":
            calls = m.get("tool_calls") or []
            order = {c.get("id"): n for n, c in enumerate(calls) if c.get("id")} if calls else None
        merged.append({**m, "k": k})
    for m in merged:  # a turn's tool results in the order of the calls they answer (stable otherwise)
        if m["role"] == "user" and sum(p[0] == "tool" for p in m["parts"]) > 1:
            results = iter(sorted((p for p in m["parts"] if p[0] == "tool"), key=lambda p: p[2]))
            m["parts"] = [next(results) if p[0] == "tool" else p for p in m["parts"]]
    drop = thinking and not tools and not any(m.get("tools") for m in messages)  # the release keeps all with tools
    if drop:  # reasoning before the last user turn is dropped, and developer turns before it (as V3.2's)
        last = _last_user(merged)
        merged = [m for n, m in enumerate(merged) if m["role"] != "developer" or n >= last]
    last = _last_user(merged)
    out = [BOS]
    for i, m in enumerate(merged):
        role, content = m["role"], m.get("content") or ""
        text = REASONING_EFFORT[reasoning_effort] if i == 0 and thinking else ""
        if role == "system":
            text += content + ("\n\n" + tools_section(m["tools"], v4=True) if m.get("tools") else "") + \
                _format_section(m, m["k"])
        elif role == "developer":
            if not content:  # the release asserts a developer turn's content (after its drop: only kept ones)
                raise FieldError(f"messages[{m['k']}].content", "a developer turn needs content")
            # its own tools (the release's message field) go after its content, as a system message's do
            text += USER + content + ("\n\n" + tools_section(m["tools"], v4=True) if m.get("tools") else "") + \
                _format_section(m, m["k"])
        elif role == "latest_reminder":
            text += LATEST_REMINDER + content
        elif role == "user":
            text += USER + "\n\n".join(p[1] if p[0] == "text" else f"<tool_result>{p[1]}</tool_result>"
                                         for p in m["parts"])
        elif role == "assistant":
            calls = _arguments(m, m["k"])
            if thinking and (not drop or i > last):
                text += (m.get("reasoning_content") or "") + END_THINK
            text += content + ("\n\n" + dsml_calls(calls, CALLS_BLOCK_V4) if calls else "") + EOS
        else:
            raise FieldError(f"messages[{m['k']}].role", f"DeepSeek-V4's encoding renders system, user, developer, "
                                                         f"assistant, tool and latest_reminder turns (got {role!r})")
        following = merged[i + 1]["role"] if i + 1 < len(merged) else None
        # the assistant's turn comes (the release counts a reminder after the user turn as its start)
        if role in ("user", "developer") and following in (None, "assistant", "latest_reminder"):
            text += ASSISTANT + (THINK if thinking and (not drop or i >= last) else END_THINK)
        out.append(text)
    return "".join(out)


def joined_parts(message: dict, sep: str) -> dict:
    """``message`` with a content of OpenAI's text parts (``[{"type": "text", "text": ...}, ...]``) as their text
    joined with ``sep``; as it is otherwise."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    return {**message, "content": sep.join(p.get("text") or "" for p in content)}


@dataclass(frozen=True)
class ChatEncoding:
    """A chat format rendered by code (a checkpoint's release ships no template): ``name`` the config.json
    ``model_type`` it renders for. Stands where a template string stands (``chat_renderer``)."""

    name: str
    version: int = 4  # of flyer's rendering: the chat data cache key holds it (``flyer.data.chat_data``)

    @property
    def roles(self) -> tuple[str, ...]:
        """The message roles it renders."""
        return ROLES[self.name]

    def render(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
               extra: dict | None = None, response_format: dict | None = None) -> str:
        """``chat_renderer``'s contract; ``extra``: {"thinking": bool}, and V4's "reasoning_effort" (others are
        ignored, as a template ignores variables it does not read); ``response_format``: the request's, written
        into the system prompt (module doc). ``FieldError`` naming chat_template_kwargs for a thinking that is no
        bool or an effort not in ``REASONING_EFFORT``. A content of OpenAI's text parts is their text joined: V4's
        release joins a tool result's parts with "\n\n" (``merge_tool_messages``' blocks); the releases take a
        string elsewhere, which vLLM's server makes of the parts with "\n" (its "string" content format)."""
        v4_tool = "\n\n" if self.name == "deepseek_v4" else "\n"
        messages = [joined_parts(m, v4_tool if m.get("role") == "tool" else "\n") for m in messages]
        extra = extra or {}
        thinking = extra.get("thinking", False)
        if not isinstance(thinking, bool):
            raise FieldError("chat_template_kwargs", f"thinking must be true or false (got {thinking!r})")
        if self.name == "deepseek_v32":
            return encode_v32(messages, tools, thinking, response_format)
        effort = extra.get("reasoning_effort") or "low"
        if effort not in REASONING_EFFORT:
            raise FieldError("chat_template_kwargs", f"reasoning_effort must be one of {list(REASONING_EFFORT)} "
                                                     f"(got {effort!r})")
        return encode_v4(messages, tools, thinking, effort, response_format)

    def effort_kwargs(self, effort: str, extra: dict | None) -> dict:
        """``extra`` (a request's chat_template_kwargs) with OpenAI's top-level ``reasoning_effort`` ``effort``
        applied: V4's as ``OPENAI_EFFORT_V4`` maps it (``thinking`` and the release's level), V3.2's added as a
        variable its encoder does not read (it has no effort control: a template ignores a variable it does not
        read). ``FieldError`` naming reasoning_effort for a V4 value without a level, or one ``extra`` contradicts
        (its thinking or reasoning_effort): one of two differing requests would be silently dropped."""
        extra = dict(extra or {})
        if self.name != "deepseek_v4":
            return {**extra, "reasoning_effort": effort}
        if effort not in OPENAI_EFFORT_V4:
            raise FieldError("reasoning_effort", f"DeepSeek-V4 takes {list(OPENAI_EFFORT_V4)} (none: chat mode; the "
                                                 f"others its release's thinking levels); got {effort!r}")
        thinking, level = OPENAI_EFFORT_V4[effort]
        for key, want in (("thinking", thinking), ("reasoning_effort", level)):
            if key in extra and extra[key] != want:
                raise FieldError("reasoning_effort", f"{effort!r} contradicts chat_template_kwargs' {key} "
                                                     f"{extra[key]!r}: send one of them")
        return {**extra, "thinking": thinking, **({"reasoning_effort": level} if level else {})}


# model_type -> its encoding, for checkpoints without a chat template
ENCODINGS = {name: ChatEncoding(name) for name in ("deepseek_v32", "deepseek_v4")}
# what a checkpoint's chat comes as (``flyer.data.chat_template.read_chat_template``): a template, named templates
# (name -> template), an encoding, or none (flyer's default template)
ChatTemplate = str | dict[str, str] | ChatEncoding | None
