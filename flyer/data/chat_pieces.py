"""Pieces of a conversation for chat data (``flyer.data.chat_data``): which assistant turns train together in one
sample, so that each is trained once, in the context inference shows it.

Inference generates assistant turn i after the conversation before it rendered with the generation prompt, and the
turn it wrote is what the template renders as the conversation's last message: ``render(messages[:i + 1])``, turn
i's own text (the mask's definition, ``encode_conversation``). Turns share a sample only where each later turn's own
text extends the earlier ones' (a string prefix): the template renders the earlier turns later as it rendered them
when each was the last. Templates break that in two known ways, each a cut here:
- a later user turn drops earlier reasoning (DeepSeek-V3.2 / V4 thinking mode without tools, Qwen3's, flyer's
  default): the turns before that user turn and the turns after it are pieces apart;
- the last assistant turn is rendered otherwise than the same turn with more after it (Qwen3's real template writes
  an empty ``<think>\\n\\n</think>\\n\\n`` on the last turn only, ``loop.last``): each such turn is a piece of its own,
  the next piece showing it as inference then does (without the empty block).
A template that keeps every turn as it was (V4 with tools: the release drops no reasoning then) leaves the
conversation one piece. What no piece makes faithful stays refused by the build: a generation prompt that is not the
turn's start (Qwen3's ``enable_thinking: false`` before a turn with reasoning), tokens merging across turns, a
reasoning the template does not show, and DeepSeek-V3.2's thinking-mode plain answer (below).

DeepSeek-V3.2 in thinking mode: the release's encoder refuses an assistant turn after the last user turn with
neither reasoning nor tool calls (``encoding_dsv32.py``'s assert, "invalid message"; ``flyer.data.deepseek_encoding``
mirrors it), and a trained turn is always after its piece's last user turn, so no thinking-mode piece renders a plain
answer and a trace mixing them is refused, naming it. A piece of its own in chat mode would render (``</think>``
after the user turn), but it is not what the line asks for, and the release calls such a message invalid rather
than a chat-mode turn: a plain answer in a thinking trace may be reasoning lost on the way (clients that drop
``reasoning_content``), which that would train silently. A line of plain answers trains in chat mode by its own
``"chat_template_kwargs": {"thinking": false}``.
"""

from __future__ import annotations


def pieces(messages: list[dict], tools: list | None, render, extra: dict | None = None) -> list[tuple[int, int]]:
    """(end, first) of each piece of a conversation (module doc), in order: ``messages[:end]`` is rendered, its
    assistant turns from message ``first`` on are trained (``first`` is the previous piece's ``end``, 0 for the
    first); every assistant turn is in exactly one piece. ``render(messages, tools, add_generation_prompt, extra)``
    -> text (``chat_template.chat_renderer``'s); its errors propagate. A piece ends at the latest message before the
    next piece's first assistant turn (the conversation's end for the last) whose render still extends its turns'
    texts, at least just after its last turn."""
    return cut_conversation(messages, tools, render, extra)[0]


def cut_conversation(messages: list[dict], tools: list | None, render, extra: dict | None = None
                     ) -> tuple[list[tuple[int, int]], dict[int, int], list[str]]:
    """(``pieces``, each assistant turn's text length, each piece's text): turn i's own text,
    ``render(messages[:i + 1])``, is the first ``len`` characters of its piece's text, so the build's fast path takes
    both from here, not rendering them again (renders are most of a build's time). Holds one turn's text at a time
    besides the pieces'."""
    out, lengths, wholes = [], {}, []
    first, last, last_text = 0, -1, ""  # the current piece's last turn and its text

    def close(limit: int) -> None:
        nonlocal first
        end, whole = last + 1, last_text
        for e in range(limit, last + 1, -1):
            text = render(messages[:e], tools, add_generation_prompt=False, extra=extra)
            if text.startswith(last_text):
                end, whole = e, text
                break
        out.append((end, first))
        wholes.append(whole)
        first = end

    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        text = render(messages[:i + 1], tools, add_generation_prompt=False, extra=extra)
        lengths[i] = len(text)
        # the prefix relation is transitive: extending the piece's last turn extends them all
        if last >= 0 and not text.startswith(last_text):
            close(i)
        last, last_text = i, text
    if last >= 0:
        close(len(messages))
    return out, lengths, wholes
