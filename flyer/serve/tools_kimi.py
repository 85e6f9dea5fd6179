"""Tool calls in Kimi K2's format (K2, K2-Thinking, K2.5; vLLM's ``kimi_k2`` parser); ``flyer.serve.tools`` picks it
for a chat template that writes ``<|tool_calls_section_begin|>`` and hands it to the functions below:

    <|tool_calls_section_begin|>  CALL+  <|tool_calls_section_end|>
    CALL = <|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>ARGUMENTS_JSON<|tool_call_end|>

The text between ``<|tool_call_begin|>`` and ``<|tool_call_argument_begin|>`` is the call's id: Kimi's template
writes an assistant's ``tool_calls`` back with their ``id`` there, and a tool message as "## Return of
{tool_call_id}", so the OpenAI ``id`` served is that text as the model wrote it (a fresh one would tell the model
another story next turn). NAME is what lies between ``functions.`` and the last ``:``; IDX is a running index of the
tool calls in the conversation, from 0 (vLLM counts an assistant's earlier calls for it, ``get_history_tool_calls_cnt``;
Moonshot's tool_call_guidance names it a global counter). Each marker is one added token in Kimi's tokenizer.

    KimiFormat, KIMI_K2                   the format (``flyer.serve.tools.TOOL_PARSERS["kimi_k2"]``)
    kimi_grammar_rules(names, ...)        "required" / named: the lark rules of a calls block whose ids continue IDX
    calls_so_far(messages)                the IDX the next call takes: the assistants' calls in the conversation
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class KimiFormat:
    """Kimi K2's calls block: ``calls_begin`` (``call_begin`` ID ``sep`` ARGUMENTS ``call_end``)+ ``calls_end``,
    an ID ``id_prefix`` NAME ``:`` IDX, nothing between the markers (as the template writes them)."""

    name: str = "kimi-k2"
    calls_begin: str = "<|tool_calls_section_begin|>"
    calls_end: str = "<|tool_calls_section_end|>"
    call_begin: str = "<|tool_call_begin|>"
    sep: str = "<|tool_call_argument_begin|>"
    call_end: str = "<|tool_call_end|>"
    id_prefix: str = "functions."
    args_close: str = ""  # nothing after the arguments but ``call_end`` (``ToolFormat``'s fence)

    @property
    def markers(self) -> tuple[str, ...]:
        return self.calls_begin, self.calls_end, self.call_begin, self.sep, self.call_end

    def call_id(self, name: str, index: int) -> str:
        """The id Kimi writes for its ``index``-th call of the conversation, to ``name``."""
        return f"{self.id_prefix}{name}:{index}"

    def render(self, calls: list[tuple[str, str]], first_index: int = 0) -> str:
        """The calls block of (name, arguments JSON text) pairs, ids from ``first_index`` on, as the model writes it."""
        body = "".join(f"{self.call_begin}{self.call_id(n, first_index + k)}{self.sep}{a}{self.call_end}"
                       for k, (n, a) in enumerate(calls))
        return self.calls_begin + body + self.calls_end

    def split_head(self, text: str, at: int) -> tuple[str, str, int] | None:
        """A call's id from ``text[at]`` (just past ``call_begin``) to ``sep`` -> (name, the id stripped, where the
        arguments start); None when it is not one (no ``sep``, a marker in it, an id not ``name_of``'s shape). Read
        by ``flyer.serve.tools.parse_tool_calls``, as ``ToolFormat.split_head``."""
        end = text.find(self.sep, at)
        call_id = text[at:end].strip() if end >= 0 else ""
        name = None if any(m in call_id for m in self.markers) else self.name_of(call_id)
        return None if name is None else (name, call_id, end + len(self.sep))

    def name_of(self, call_id: str) -> str | None:
        """The function an id names (between ``id_prefix`` and the last ``:``, IDX digits after it); None when the
        id is not in that shape or the name is empty or holds whitespace."""
        m = re.fullmatch(rf"{re.escape(self.id_prefix)}(\S+):[0-9]+", call_id)
        return m[1] if m else None


KIMI_K2 = KimiFormat()


def kimi_grammar_rules(names: list[str], marker: Callable[[str], str], n_calls: int, first_index: int,
                       fmt: KimiFormat = KIMI_K2) -> list[str]:
    """The lark rules of a calls block of 1 to ``n_calls`` calls, each of one of ``names`` whose arguments are rule
    ``args_{k}`` (k: the name's position; the caller writes those); the j-th call's id is
    ``fmt.call_id(name, first_index + j)``, so the ids continue the conversation's count. ``marker(m)``: a marker
    as a lark term (its token id or its text)."""
    rules = []
    for j in range(n_calls):
        heads = " | ".join(f"{json.dumps(fmt.call_id(n, first_index + j))} {marker(fmt.sep)} args_{k}"
                           for k, n in enumerate(names))
        rules.append(f"call_{j}: {marker(fmt.call_begin)} ({heads}) {marker(fmt.call_end)}")
    # call_1 only after call_0, call_2 after call_1, ...: the ids' indices run in order
    tail = ""
    for j in reversed(range(1, n_calls)):
        tail = f"(call_{j}{' ' + tail if tail else ''})?"
    return [f"start: {marker(fmt.calls_begin)} call_0{' ' + tail if tail else ''} {marker(fmt.calls_end)}", *rules]


def calls_so_far(messages: list) -> int:
    """How many tool calls the assistant messages of a conversation hold (``flyer.serve.schema.ChatMessage``s): the
    IDX Kimi's next call takes."""
    return sum(len(m.tool_calls or []) for m in messages if m.role == "assistant")
