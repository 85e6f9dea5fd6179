"""Reasoning markers written in other tokens than their encoding: with a tokenizer that holds no ``</think>`` token,
``Reasoning.end_ids`` is the marker's encoding (``</`` ``think`` ``>``), but a model may write ``</th`` ``ink>``; the
grammar deferred until the end marker (``flyer.serve.grammar``) then holds from where the output's text holds the
marker (``flyer.serve.reasoning.EndWatch``), the place ``reasoning_content`` ends, and not never.

A byte-level BPE of this test's own (64 ids) whose ids are laid out along the counting model's progressions
(``tests/trained.py``: PROMPT [6, 8, 10] continues 12, 14, 16, ...; [40, 41, 42] continues 43, 44, ...), so that the
model's own greedy tokens write each script below, and its MTP drafts write the marker too:

- ``a`` ``</th`` ``ink>`` then ``b`` (which the grammar forbids): the grammar holds after ``ink>`` (const 12: the
  content is ``12``, finish "stop"); before the fix the output ran free to max_tokens;
- ``</thi`` ``nk>1``: the token ending the marker carries content, which the grammar takes as its own (it then
  allows only ``2``: content ``12``, not ``112``); ``</t`` ``hink>\\n\\n``: leading whitespace is not the grammar's
  (content ``\\n\\n12``); ``</thin`` ``k>x``: text the grammar refuses ends the request with "error";
- the output opening reasoning itself (``grammar_open`` the begin marker's encoding ``<`` ``think`` ``>``, which the
  mask lets it write): reasoning ``e``, the end marker as ``</`` ``think>``, then the grammar's; a model preferring
  ``<thin`` ``k>`` cannot write it (the mask allows the grammar's tokens and the encoding's next one only), so the
  answer is the grammar's and the parser finds no reasoning either;
- ``--speculative mtp`` (K = 1, 2) answers each the same with drafts kept (drafts are cut before one that completes
  the marker: ``EndWatch.would_end``).

Each answer is also read by the API's parser (``Reasoning.split`` over ``Choice``'s incremental decoding): its
content is what the grammar produced. Through the openai client (a scripted engine), ``reasoning_content`` and
``content`` split where the text holds the marker, whole and streamed, whichever tokens write it, and calls whose
block begins in the token that ends ``</think>`` parse (``Reasoning.content_head``). ``grammar_open`` ids outside
the vocabulary are a ``FieldError`` naming it; the API leaves out a begin marker the model cannot write
(``grammar_markers``). Token comparisons are exact: the counting model's greedy margins are clear
(``tests/test_serve_grammar_spec.py``).
"""

import json

import pytest
from test_serve_reasoning import THINK, _agree, _serving
from test_serve_structured import _run, _tokens
from test_serve_tools import TOOLS
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from trained import counting_model

from flyer.errors import FieldError
from flyer.interop.hf_tokenizer import TextTokenizer
from flyer.serve.choice import Choice
from flyer.serve.engine import Engine, EngineConfig, SamplingOptions
from flyer.serve.grammar import json_grammar
from flyer.serve.reasoning import DEEPSEEK, EndWatch, Reasoning
from flyer.serve.tools import DEEPSEEK_V31 as F31

# id -> token (byte-level: "Ċ" is "\n"); the unlisted ids are fillers
LAYOUT = {0: "</s>", 1: "/", 2: "t", 3: "h", 4: "i", 5: "n", 7: "k", 9: "1", 11: "2", 13: "x", 15: "Ċ",
          12: "a", 14: "</th", 16: "ink>", 18: "b",  # [6, 8, 10] ->
          20: "<", 21: "think", 22: ">", 23: "e", 24: "</", 25: "think>", 26: "f", 27: "th", 28: "in", 29: "ink",
          33: "</thin", 34: "k>x",  # [30, 31, 32] ->
          36: "<thin", 37: "k>", 38: "g",  # [33, 34, 35] ->
          43: "</thi", 44: "nk>1", 45: "c",  # [40, 41, 42] ->
          53: "</t", 54: "hink>ĊĊ", 55: "d"}  # [50, 51, 52] ->
MERGES = [("<", "/"), ("t", "h"), ("i", "n"), ("in", "k"), ("th", "ink")]  # "</think>": "</" "think" ">"
CONST = {"const": 12}


@pytest.fixture(scope="module")
def tok():
    vocab = {LAYOUT.get(i, f"q{i}"): i for i in range(64)}
    t = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens([AddedToken("</s>", special=True)])
    return TextTokenizer(t, eos=0)


@pytest.fixture(scope="module")
def counting():
    return counting_model(64)


def _opts(tok, opened: bool = True, **kw) -> SamplingOptions:
    """A request whose grammar (const 12) follows reasoning, the markers' ids as the API gives them."""
    think = Reasoning(DEEPSEEK, tok, opened)
    return SamplingOptions(**{**dict(max_tokens=12, grammar=json_grammar(CONST), grammar_after=think.end_ids(tok),
                                     grammar_open=() if opened else think.begin_ids(tok)), **kw})


def _read(tok, events, opened: bool = True) -> tuple[str | None, str | None]:
    """(reasoning_content, content) as the API's parser reads the answer."""
    c = Choice(tok, [])
    for e in events:
        c.add(e)
    think = Reasoning(DEEPSEEK, tok, opened)
    m = think.message(c.text, think.split(c.text, c.ids, c.kept(), c.starts, True))
    return m["reasoning_content"], m["content"]


def test_the_markers_encodings_are_not_the_models_tokens(tok):
    assert Reasoning(DEEPSEEK, tok, True).end_ids(tok) == (24, 21, 22)
    assert Reasoning(DEEPSEEK, tok, False).begin_ids(tok) == (20, 21, 22)
    for alt in ((14, 16), (43, 44), (53, 54), (33, 34), (24, 25)):
        assert tok.decode(list(alt)).startswith(DEEPSEEK.end)


@pytest.mark.parametrize("prompt, marker, content, reason", [
    ([6, 8, 10], [12, 14, 16], "12", "stop"),  # "a" "</th" "ink>", then the grammar's
    ([40, 41, 42], [43, 44], "12", "stop"),  # "</thi" "nk>1": the grammar took the "1"
    ([50, 51, 52], [53, 54], "\n\n12", "stop"),  # "</t" "hink>\n\n": the whitespace not the grammar's
    ([30, 31, 32], [33, 34], "x", "error"),  # "</thin" "k>x": text the grammar refuses
], ids=["split", "carries-content", "carries-whitespace", "carries-refused"])
def test_the_grammar_holds_where_the_text_ends_the_reasoning(counting, tok, prompt, marker, content, reason):
    (events,), _ = _run(counting, [(prompt, _opts(tok))], tokenizer=tok)
    out = _tokens(events)
    assert out[:len(marker)] == marker and events[-1].finish_reason == reason, out
    reasoning, got = _read(tok, events)
    assert got == content and reasoning + DEEPSEEK.end + got == tok.decode(out), (reasoning, got)
    if reason == "stop":
        assert json.loads(got) == 12


def test_the_output_opens_reasoning_in_text_tokens(counting, tok):
    """``<`` ``think`` ``>`` (the encoding: the mask allows its next token), reasoning ``e``, ``</`` ``think>``, then
    the grammar's; a model preferring ``<thin`` ``k>`` writes the encoding instead."""
    (events,), _ = _run(counting, [([17, 18, 19], _opts(tok, opened=False))], tokenizer=tok)
    assert _tokens(events)[:6] == [20, 21, 22, 23, 24, 25] and events[-1].finish_reason == "stop"
    assert _read(tok, events, opened=False) == ("e", "12")
    # the model's first choice, "<thin", masked: its best allowed one is the encoding's "<" (then as above)
    (events,), _ = _run(counting, [([33, 34, 35], _opts(tok, opened=False))], tokenizer=tok)
    assert _tokens(events)[:6] == [20, 21, 22, 23, 24, 25] and _read(tok, events, opened=False) == ("e", "12")


@pytest.mark.parametrize("prompt, opened", [([6, 8, 10], True), ([17, 18, 19], False), ([40, 41, 42], True)])
def test_speculation_answers_the_same(counting, tok, prompt, opened):
    (off,), _ = _run(counting, [(prompt, _opts(tok, opened))], tokenizer=tok)
    for k in (1, 2):
        (on,), eng = _run(counting, [(prompt, _opts(tok, opened))], tokenizer=tok, speculative="mtp", draft_tokens=k)
        assert _tokens(on) == _tokens(off) and on[-1].finish_reason == "stop" and eng.accepted > 0


def test_drafts_that_would_complete_the_marker(tok):
    w = EndWatch(tok, "", DEEPSEEK.end)
    assert w.add(12) is None and w.add(14) is None  # "a" "</th"
    assert w.would_end([16]) and w.would_end([29, 22]) and w.would_end([13, 24, 25])
    assert not w.would_end([29]) and not w.would_end([13]) and not w.would_end([22])
    assert w.add(29) is None and w.add(22) == ""  # "ink" ">": whole, no content yet


def test_grammar_open_ids_outside_the_vocabulary_name_the_field(counting, tok):
    eng = Engine(counting, EngineConfig(kv_cache_bytes=1 << 22, block_size=4), tokenizer=tok)
    for bad in ((20, 64), (-1,), (1 << 40,)):
        with pytest.raises(FieldError) as e:
            eng.submit([6, 8, 10], _opts(tok, opened=False, grammar_open=bad), lambda e: None)
        assert e.value.field == "grammar_open" and "[0, 64)" in e.value.problem
    with pytest.raises(FieldError) as e:
        eng.submit([6, 8, 10], _opts(tok, grammar_after=(24, -1)), lambda e: None)
    assert e.value.field == "grammar_after"
    assert not eng.busy


def test_grammar_markers_leave_out_a_begin_marker_the_model_cannot_write(tok):
    """The API's markers: none when the prompt closes reasoning; the begin marker's only when its ids are the
    model's (a tokenizer larger than the model: the output cannot open reasoning, its grammar holds from the start)."""
    opens, neither = Reasoning(DEEPSEEK, tok, True), Reasoning(DEEPSEEK, tok, False)
    assert opens.grammar_markers(tok, "<think>", 64) == ((24, 21, 22), ())
    assert neither.grammar_markers(tok, "hi", 64) == ((24, 21, 22), (20, 21, 22))
    assert neither.grammar_markers(tok, "hi", 22) == ((), ())
    assert neither.grammar_markers(tok, "</think>", 64) == ((), ()) == Reasoning(None).grammar_markers(tok, "hi", 64)


def test_calls_after_a_marker_whose_token_carries_the_calls_begin():
    """Through the openai client (the API over a scripted engine): ``</th`` ``ink><｜tool▁calls▁begin｜>`` (one
    token of a byte-level BPE holding the tool markers as text), then the call: the calls parse from the content's
    text, the part of that token after the marker included (``Reasoning.content_head``), streamed and whole."""
    spell = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)  # text -> its byte-level spelling
    extra = ["".join(p for p, _ in spell.pre_tokenize_str(s)) for s in ("</th", "ink>" + F31.calls_begin)]
    t = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()) + extra)},
                             merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens([AddedToken("</s>", special=True)])
    wide = TextTokenizer(t)
    args = '{"city":"oslo","days":2}'
    call = F31.render([("get_weather", args)])
    assert call.startswith(F31.calls_begin)
    script = wide.encode_ids("hm") + [t.token_to_id(e) for e in extra] + \
        wide.encode_ids(call[len(F31.calls_begin):]) + [wide.eos_id()]
    with _serving(wide, script) as (_, _, c):
        _agree(c, "hm", None, "tool_calls", [("get_weather", args)], tools=TOOLS,
               extra_body={"chat_template_kwargs": THINK})


def _byte_level_with(*words: str) -> tuple[TextTokenizer, list[int]]:
    """(a byte-level BPE of every byte plus ``words`` as tokens of their own (no merges: text encodes byte by byte),
    ``</s>`` its EOS; the words' ids)."""
    spell = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)  # text -> its byte-level spelling
    extra = ["".join(p for p, _ in spell.pre_tokenize_str(w)) for w in words]
    t = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()) + extra)},
                             merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens([AddedToken("</s>", special=True)])
    return TextTokenizer(t, eos=t.token_to_id("</s>")), [t.token_to_id(w) for w in extra]


@pytest.mark.parametrize("marker, after, content, reasoning_tokens", [
    (("</th", "ink>"), "42", "42", 4),  # h m </th ink>
    (("</thi", "nk>1"), "2", "12", 4),  # the token ending the marker carries content: counted as reasoning's
    (("</t", "hink>\n\n"), "ok", "\n\nok", 4),
    (("</", "thi", "nk>"), "", "", 5),  # nothing after the marker: content "" (the marker was written)
], ids=["split", "carries-content", "carries-whitespace", "three-tokens"])
def test_the_openai_client_reads_a_marker_split_over_tokens(marker, after, content, reasoning_tokens):
    """Through the openai client (the API over a scripted engine, ``test_serve_reasoning``'s): a prompt opening
    reasoning, then ``hm``, ``</think>`` written in tokens that are not its encoding (``</`` ``think`` ``>``: none
    of them is), then the answer: ``reasoning_content`` is ``hm`` and ``content`` the text after the marker, whole
    and streamed alike (the stream's reasoning in deltas before the content's, no delta holding a marker);
    ``reasoning_tokens`` counts the tokens up to the one ending the marker."""
    wide, ids = _byte_level_with(*marker)
    assert wide.decode(ids).startswith(DEEPSEEK.end)
    assert not set(ids) & set(wide.encode_ids(DEEPSEEK.end, add_special_tokens=False))
    script = wide.encode_ids("hm") + ids + wide.encode_ids(after) + [wide.eos_id()]
    with _serving(wide, script) as (_, _, c):
        usage = _agree(c, "hm", content, "stop", extra_body={"chat_template_kwargs": THINK})
    assert usage.completion_tokens_details.reasoning_tokens == reasoning_tokens
