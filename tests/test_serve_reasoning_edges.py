"""Edges of the reasoning parser (``flyer.serve.reasoning``) and of ``Choice``'s incremental text a mutation sweep
found unpinned (each assertion fails on the mutant it names), and one defect it found: with the markers as single
tokens (DeepSeek's tokenizers) whitespace before a leading ``<think>`` made the whole output content, where the
text path (and vLLM's ``deepseek_r1``, which finds the marker anywhere) reads the reasoning.

The outputs are toy tokens (a piece of text per id, a marker one id where ``special`` says so), read as the API reads
them: ``Choice`` decodes incrementally, ``Reasoning.split`` / ``delta`` after each token, ``message`` at the end.
"""

import pytest

from flyer.serve.choice import Choice, held_back
from flyer.serve.reasoning import DEEPSEEK, KIMI_K2, EndWatch, Reasoning
from flyer.serve.request import TokenEvent


class _Pieces:
    """A tokenizer of given pieces: id k decodes to ``pieces[k]`` (str, or bytes decoded as UTF-8 with U+FFFD)."""

    def __init__(self, pieces):
        self.pieces = list(pieces)

    def decode(self, ids):
        got = [self.pieces[i] for i in ids]
        return b"".join(got).decode("utf-8", errors="replace") if got and isinstance(got[0], bytes) else "".join(got)

    def encode_ids(self, text, add_special_tokens=False):
        return [ord(ch) for ch in text]


def _read(pieces, opened=False, special=(), stops=(), finish="stop"):
    """(message, the stream's deltas, reasoning tokens) of an output of ``pieces``, one token each; ``special``: the
    markers held as one token."""
    think = Reasoning(DEEPSEEK, None, opened)
    for name, marker in (("begin_id", DEEPSEEK.begin), ("end_id", DEEPSEEK.end)):
        if marker in special:
            setattr(think, name, pieces.index(marker) if marker in pieces else 10**6)
    c = Choice(_Pieces(pieces), list(stops))
    deltas = []
    for k in range(len(pieces)):
        c.add(TokenEvent(k, finish_reason=finish if k == len(pieces) - 1 else None))
        s = think.split(c.text, c.ids, c.kept(), c.starts, c.finish_reason is not None, 1)
        c.delta(s.safe if s.content is None else None)
        if d := think.delta(c.text, c.sent, s):
            deltas.append(d)
        if c.finish_reason is not None:
            break
    s = think.split(c.text, c.ids, c.kept(), c.starts, True, 1)  # one key, as the API's choice keeps its own
    m = think.message(c.text, s)
    return (m["reasoning_content"], m["content"]), deltas, think.reasoning_tokens(s, c.kept())


@pytest.mark.parametrize("special", [(), (DEEPSEEK.begin, DEEPSEEK.end)], ids=["text", "tokens"])
def test_whitespace_before_a_leading_begin_marker(special):
    got, deltas, n = _read(["\n", DEEPSEEK.begin, "ab", DEEPSEEK.end, "cd"], special=special)
    assert got == ("ab", "cd") and n == 4
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "ab"
    assert "".join(d.get("content", "") for d in deltas) == "cd"


def test_a_begin_marker_not_first_is_content():
    text = ["Hi", DEEPSEEK.begin, "ab", DEEPSEEK.end, "cd"]
    assert _read(text, special=(DEEPSEEK.begin, DEEPSEEK.end))[0::2] == ((None, "".join(text)), 0)


def test_decided_at_the_end_whatever_was_held():
    # a stop string cutting the output at 0 (token markers): decided, content empty; an output that ends on a begin
    # marker's prefix (text markers, the length limit): that prefix is content
    assert _read(["STOPx"], special=(DEEPSEEK.begin, DEEPSEEK.end), stops=["STOP"])[0] == (None, "")
    got, deltas, _ = _read(["<th", "i"], finish="length")
    assert got == (None, "<thi") and "".join(d.get("content", "") for d in deltas) == "<thi"


def test_stream_deltas_carry_reasoning_only_with_its_text():
    _, deltas, _ = _read(["ab", "</th", "ink>", "cd"], opened=True)
    assert all(d.get("reasoning_content", "x") for d in deltas), deltas
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "ab"
    _, deltas, _ = _read(["<th", "ink>ab</think>cd"])  # one chunk holding reasoning, the marker and content
    assert deltas == [{"reasoning_content": "ab", "content": "cd"}]


def test_a_prompt_closing_reasoning_with_a_newline_after():
    prompt = "<｜User｜>hi<｜Assistant｜></think>\n"
    assert Reasoning.closes(DEEPSEEK, prompt)
    think = Reasoning(DEEPSEEK, None, Reasoning.opens(DEEPSEEK, prompt))
    assert think.grammar_markers(_Pieces([]), prompt, 1000) == ((), ())


def test_a_one_token_calls_marker_and_a_text_end_marker_do_not_mix():
    think = Reasoning(KIMI_K2, None, True)
    think.calls_id = 7
    after = think.end_ids(_Pieces([]))
    assert len(after) > 1 and think.grammar_at(_Pieces([]), after, KIMI_K2.calls) == ()


def test_a_draft_completing_a_long_text_marker_ends_the_reasoning():
    w = EndWatch(_Pieces(["x<|tool_calls_sec", "tion_begin|>"]), "<think>", "</think>", "<|tool_calls_section_begin|>")
    w.add(0)
    assert w.would_end([1])


def test_held_back_restarts_after_a_failed_candidate():
    assert held_back("xaab", "abac") == 2
    c = Choice(_Pieces(["xaab", "ac"]), ["abac"])
    c.add(TokenEvent(0))
    streamed = c.delta()
    c.add(TokenEvent(1, finish_reason="length"))
    assert streamed + c.delta() == c.text == "xa"


def test_token_starts_when_two_ids_decode_together():
    c = Choice(_Pieces([b"a\xe2\x82", b"\xac", b"b"]), [])
    for k in range(3):
        c.add(TokenEvent(k))
    assert (c.text, c.starts) == ("a€b", [0, 1, 2])


def test_a_stop_string_that_cuts_into_the_end_marker_leaves_it_reasoning():
    """The end marker found at an earlier token, then a stop string beginning inside it cuts it (vLLM applies stop
    strings before its reasoning parser): what is left is reasoning, and the stream, which skipped the marker's text,
    sends it at the end (it ended with "ab")."""
    got, deltas, _ = _read(["ab</think>", "zz"], opened=True, stops=["k>zz"])
    assert got == ("ab</thin", None) and not any("content" in d for d in deltas)
    assert [d["reasoning_content"] for d in deltas] == ["ab", "</thin"]


def test_the_content_head_of_a_last_token_carrying_text_past_the_end_marker():
    """The end marker's last token carries the content's first characters ("ink>{"): the content head is that text,
    whether the token is the last one decoded or not."""
    think = Reasoning(DEEPSEEK, None, True)
    text, starts = "ab</think>{", [0, 5]  # tokens "ab</th", "ink>{": the content's first token is not yet written
    s = think.split(text, [0, 1], 2, starts, True)
    assert (s.content, s.token) == (10, 2) and Reasoning.content_head(text, starts, 2, s) == "{"
    s = Reasoning(DEEPSEEK, None, True).split(text + '"a"}', [0, 1, 2], 3, starts + [11], True)
    assert Reasoning.content_head(text + '"a"}', starts + [11], 3, s) == "{"


def test_only_a_calls_grammar_waits_for_the_calls_marker():
    """A grammar that starts with the tool-calls marker waits for its token after reasoning; no grammar, or another
    one, does not."""
    think = Reasoning(KIMI_K2, None, True)
    think.calls_id = 7
    assert think.grammar_at(None, (5,), KIMI_K2.calls) == (7,)
    assert think.grammar_at(None, (5,), None) == () and think.grammar_at(None, (5,), "<tool_call>") == ()


def test_a_begin_token_after_a_token_of_whitespace_and_text_is_content():
    """The begin marker's token leads the output only where it starts right after the leading whitespace: after a
    token holding whitespace and text ("\nHi"), the marker's token is content, as in the text path."""
    pieces = ["\nHi", DEEPSEEK.begin, "ab", DEEPSEEK.end, "cd"]
    for special in ((), (DEEPSEEK.begin, DEEPSEEK.end)):
        got, _, n = _read(pieces, special=special)
        assert (got, n) == ((None, "".join(pieces)), 0), special


def test_the_engines_end_watch_reads_the_output_as_opened_reasoning():
    """The engine's watch for a text end marker reads the output as reasoning from its first token (the grammar is
    deferred only where the reasoning is open): an output without a leading begin marker stays reasoning until the
    end marker is whole, then gives the text after it."""
    w = EndWatch(_Pieces(["ab", "</th", "ink>", "{"]), DEEPSEEK.begin, DEEPSEEK.end)
    assert [w.add(k) for k in range(4)] == [None, None, "", "{"]
