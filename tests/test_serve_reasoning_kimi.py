"""Kimi K2-Thinking / K2.5 reasoning (``flyer serve --reasoning-parser kimi_k2``, ``flyer.serve.reasoning.KIMI_K2``):
``<think>`` ... ``</think>`` as DeepSeek's, and a tool-calls section (``<|tool_calls_section_begin|>``) opened inside
the reasoning without ``</think>`` ends the reasoning there, the section the content's, so its calls parse (vLLM's
``kimi_k2`` reasoning parser's reading).

A template of this test's own in K2.5's shape (``tests.test_serve_tools_kimi``'s, the generation prompt ending with
``<think>``, with ``<think></think>`` when ``chat_template_kwargs.thinking`` is false, with neither when it is
"model": K2-Thinking's, whose model writes ``<think>`` itself) over Kimi's tiny tokenizer (``<think>`` and
``</think>`` special tokens beside the calls markers) and over byte tokens (every marker text). An engine stand-in
writes scripted outputs, through the official openai client, whole and streamed alike (``_agree``): reasoning,
``</think>``, content, calls; calls inside the reasoning; no end marker (all reasoning, content null); the chat-mode
prompt ``<think></think>`` (all content); an output that opens ``<think>`` itself; the deepseek parser on the same
output leaves the section in the reasoning, unparsed. The grammar of "required" / named calls, engine side
(``GrammarMasks`` on a request, tokens fed by hand): free during the reasoning, from the calls marker on when the
model opens the section inside it (``SamplingOptions.grammar_at``), after ``</think>`` otherwise; the marker as one
token and as text. Then a real engine (a tiny random model steered towards a script whose call id has the wrong
running index) writes the calls the grammar allows right after the marker inside the reasoning."""

import dataclasses
import json

import pytest
import torch
from served import EngineServer, client, handed_to_http, serving
from test_serve_reasoning import ASK, REASONING, _agree, _ids, _whole
from test_serve_reasoning_grammar import _steer
from test_serve_tools import TOOLS
from test_serve_tools_kimi import TEMPLATE as TOOLS_TEMPLATE
from test_serve_tools_v3 import CALLS, _Scripted

from flyer.cli import main
from flyer.config import preset
from flyer.infer.cli import ByteTokenizer
from flyer.interop.hf_tokenizer import load_tokenizer
from flyer.model.transformer import Transformer
from flyer.serve.api import Api
from flyer.serve.engine import Engine, EngineConfig
from flyer.serve.grammar import GrammarMasks
from flyer.serve.reasoning import DEEPSEEK, KIMI_K2, PARSERS, Reasoning
from flyer.serve.request import Limits, Request, SamplingOptions
from flyer.serve.tools import KIMI_K2 as K, tool_grammar
from tests.test_hf_tiktoken import KIMI_SPECIAL, _train, write_dir

_GEN = "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"
assert TOOLS_TEMPLATE.endswith(_GEN)
TEMPLATE = TOOLS_TEMPLATE[:-len(_GEN)] + (
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- if thinking is not defined or "
    "thinking == true -%}<think>{%- elif thinking == false -%}<think></think>{%- endif -%}{%- endif -%}")
LIMITS = Limits(vocab_size=1 << 20, max_seq_len=4096, block_size=16, capacity=256, max_queue=8)
ANSWER, BEFORE = "The answer is 4.", "Let me check."
CHAT, MODEL_OPENS = {"thinking": False}, {"thinking": "model"}
FUNCTIONS = [t["function"] for t in TOOLS]
# (name, arguments) of CALLS: the block the model writes inside its reasoning, ids functions.NAME:0, :1
BLOCK = K.render(CALLS)


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    """Kimi's tiny tokenizer directory (``tests.test_serve_tools_kimi``'s) with ``<think>`` / ``</think>`` as special
    tokens too (this test's offsets), ``TEMPLATE`` its chat template."""
    path = write_dir(tmp_path_factory.mktemp("kimi_think"), _train(600),
                     {**KIMI_SPECIAL, 22: KIMI_K2.begin, 23: KIMI_K2.end}, remote=False,
                     config={"chat_template": TEMPLATE})
    (path / "config.json").write_text(json.dumps({"model_type": "kimi_k25"}))
    return path


def _tokenizers(kimi):
    tok = load_tokenizer(kimi)
    for m in (KIMI_K2.begin, KIMI_K2.end, KIMI_K2.calls):  # one token each, which decoding skips
        ids = tok.encode_ids(m, add_special_tokens=False)
        assert len(ids) == 1 and tok.decode(ids) == "", m
    return [("kimi", tok), ("bytes", ByteTokenizer())]


def _api(tok, script: list[int], parser: str = "kimi_k2") -> Api:
    return Api(_Scripted(LIMITS, script), tok, "tiny-test", chat_template=TEMPLATE, reasoning_parser=parser)


def _kw(thinking: dict | None = None, **kw) -> dict:
    extra = {} if thinking is None else {"extra_body": {"chat_template_kwargs": thinking}}
    return dict(tools=TOOLS, **extra, **kw)


def test_the_parser_and_the_prompts():
    assert PARSERS["kimi_k2"] is KIMI_K2 and PARSERS["deepseek"] is DEEPSEEK and DEEPSEEK.calls is None
    assert KIMI_K2.calls == K.calls_begin
    prompt = "<|im_assistant|>assistant<|im_middle|>"
    assert Reasoning.opens(KIMI_K2, prompt + "<think>") and not Reasoning.closes(KIMI_K2, prompt + "<think>")
    closed = prompt + "<think></think>"
    assert Reasoning.closes(KIMI_K2, closed) and not Reasoning.opens(KIMI_K2, closed)
    assert not Reasoning.opens(KIMI_K2, prompt) and not Reasoning.closes(KIMI_K2, prompt)


def _gathered(c, **kw) -> tuple:
    """A stream's (reasoning, content, finish_reason, tool calls) joined from its deltas."""
    reasoning, content, finish, calls = "", "", None, []
    for chunk in c.chat.completions.create(model="tiny-test", messages=ASK, stream=True, **kw):
        d = chunk.choices[0].delta
        reasoning, content = reasoning + (getattr(d, "reasoning_content", None) or ""), content + (d.content or "")
        calls += [(t.function.name, t.function.arguments) for t in d.tool_calls or []]
        finish = chunk.choices[0].finish_reason or finish
    return reasoning or None, content or None, finish, calls


def test_whole_and_streamed_answers(kimi):
    """Each case whole and streamed alike (``_agree``), markers as special tokens and as text."""
    for kind, tok in _tokenizers(kimi):
        cases = [  # (chat_template_kwargs, the output's parts, max_tokens cut, want: reasoning, content, finish, calls)
            (None, [REASONING, KIMI_K2.end, BEFORE, BLOCK], 0, (REASONING, BEFORE, "tool_calls", CALLS)),
            (None, [REASONING, BLOCK], 0, (REASONING, None, "tool_calls", CALLS)),  # calls inside the reasoning
            # the first marker ends it: </think> after the section is the content's, which then parses no block
            (None, [REASONING, BLOCK, KIMI_K2.end, ANSWER], 0,
             (REASONING, tok.decode(_ids(tok, BLOCK, KIMI_K2.end, ANSWER)), "stop", [])),
            (None, [REASONING, KIMI_K2.end, ANSWER], len(_ids(tok, REASONING)), (REASONING, None, "length", [])),
            (None, [REASONING, KIMI_K2.end, ANSWER], 0, (REASONING, ANSWER, "stop", [])),
            (CHAT, [ANSWER], 0, (None, ANSWER, "stop", [])),  # the prompt closes it: all content
            (CHAT, [BLOCK], 0, (None, None, "tool_calls", CALLS)),
            (MODEL_OPENS, [KIMI_K2.begin, REASONING, BLOCK], 0, (REASONING, None, "tool_calls", CALLS)),
            (MODEL_OPENS, [ANSWER], 0, (None, ANSWER, "stop", [])),  # no think block: no reasoning
        ]
        for thinking, parts, cut, want in cases:
            script = _ids(tok, *parts)
            with serving(_api(tok, script)) as url:
                kw = _kw(thinking, max_tokens=cut or len(script))
                if KIMI_K2.end in (want[1] or ""):  # (``_agree``'s stream check refuses a marker in any delta)
                    usage = _whole(client(url), **kw)[4]
                    assert _whole(client(url), **kw)[:4] == (*want[:3], []) == _gathered(client(url), **kw)
                else:
                    usage = _agree(client(url), *want, **kw)
            # the tokens before the content: up to </think> included, or up to the calls marker (the content's)
            ended = parts.index(BLOCK) if BLOCK in parts and want[0] is not None else None
            if KIMI_K2.end in parts and (ended is None or parts.index(KIMI_K2.end) < ended):
                ended = parts.index(KIMI_K2.end) + 1
            before = cut or (0 if ended is None else len(_ids(tok, *parts[:ended])))
            assert usage.completion_tokens_details.reasoning_tokens == before, (kind, parts)


def test_the_deepseek_parser_leaves_the_section_in_the_reasoning(kimi):
    for kind, tok in _tokenizers(kimi):
        with serving(_api(tok, _ids(tok, REASONING, BLOCK), parser="deepseek")) as url:
            reasoning, content, finish, calls, _ = _whole(client(url), **_kw())
        assert reasoning.startswith(REASONING) and len(reasoning) > len(REASONING), kind
        assert (content, finish, calls) == (None, "stop", [])


def test_the_prompt_marks_the_grammar(kimi):
    """``grammar_at``: the calls marker's ids for a Kimi calls grammar that waits for ``</think>``; none for a JSON
    grammar, without a wait, or with the deepseek parser."""
    for kind, tok in _tokenizers(kimi):
        think = Reasoning(KIMI_K2, tok, True)
        after, opening = think.grammar_markers(tok, "<think>", 1 << 20)
        assert after == tuple(tok.encode_ids(KIMI_K2.end, add_special_tokens=False)) and not opening
        at = think.grammar_at(tok, after, K.calls_begin)
        assert at == tuple(tok.encode_ids(K.calls_begin, add_special_tokens=False)) and len(at) == (
            1 if kind == "kimi" else len(K.calls_begin))
        assert think.grammar_at(tok, after, None) == () == think.grammar_at(tok, (), K.calls_begin)
        assert Reasoning(DEEPSEEK, tok, True).grammar_at(tok, after, K.calls_begin) == ()


def _feed(tok, opts: SamplingOptions, parts: list[str]) -> tuple[Request, list[str | None], list[bool]]:
    """A request of ``opts`` fed the parts' tokens by hand as the engine feeds its chosen ones (``follow``): the
    request, each token's finish reason, and whether its grammar ruled it (a matcher, not deferred)."""
    masks = GrammarMasks(tok, 1 << 10, torch.device("cpu"))
    r = Request(0, [1], opts, emit=lambda e: None)
    r.matcher, r.deferred = masks.start(opts)
    reasons, ruled = [], []
    for t in _ids(tok, *parts):
        ruled.append(r.matcher is not None)
        r.tokens.append(t)
        reasons.append(masks.follow(r, t))
        if reasons[-1] is not None:
            break
    return r, reasons, ruled


def test_the_grammar_starts_at_the_calls_marker_inside_the_reasoning(kimi):
    """Engine side: the reasoning runs free, the calls marker is the grammar's first token(s), the block after it
    is held to the grammar (complete: "stop"; a wrong running index: "error"); without ``grammar_at`` the marker
    inside the reasoning leaves the grammar waiting. After ``</think>`` the grammar holds as DeepSeek's."""
    for kind, tok in _tokenizers(kimi):
        think = Reasoning(KIMI_K2, tok, True)
        after, _ = think.grammar_markers(tok, "<think>", 1 << 10)
        opts = SamplingOptions(max_tokens=999, grammar=tool_grammar(FUNCTIONS, tok, fmt=K), grammar_after=after,
                               grammar_at=think.grammar_at(tok, after, K.calls_begin))
        n_reasoning = len(_ids(tok, REASONING))
        r, reasons, ruled = _feed(tok, opts, [REASONING, BLOCK])
        assert reasons[-1] == "stop" and set(reasons[:-1]) == {None}
        assert len(reasons) == len(_ids(tok, REASONING, BLOCK))
        free = n_reasoning + len(_ids(tok, K.calls_begin))  # the marker chosen free, then consumed by the grammar
        assert not any(ruled[:free]) and all(ruled[free:]), kind
        assert r.deferred is None and r.matcher.llg.is_stopped()
        _, reasons, _ = _feed(tok, opts, [REASONING, BLOCK.replace(":1", ":7")])
        assert reasons[-1] == "error", kind
        # without grammar_at (the deepseek reading): the block inside the reasoning is free, the grammar still waits
        r, reasons, ruled = _feed(tok, dataclasses.replace(opts, grammar_at=()), [REASONING, BLOCK.replace(":1", ":7")])
        assert set(reasons) == {None} and not any(ruled) and r.deferred is not None
        # </think> ends it as before: the grammar holds from the token after the marker
        r, reasons, ruled = _feed(tok, opts, [REASONING, KIMI_K2.end, BLOCK])
        assert reasons[-1] == "stop" and r.deferred is None
        n_end = len(_ids(tok, REASONING, KIMI_K2.end))
        assert not any(ruled[:n_end]) and all(ruled[n_end:])
        # "auto" with a response_format: its JSON-or-calls grammar starts at the marker as well (the API passes it)
        either = dataclasses.replace(opts, grammar=tool_grammar(FUNCTIONS, tok, fmt=K, content={"type": "object"}))
        r, reasons, ruled = _feed(tok, either, [REASONING, BLOCK])
        assert reasons[-1] == "stop" and not any(ruled[:free]) and all(ruled[free:]), kind
        _, reasons, _ = _feed(tok, either, [REASONING, BLOCK.replace(":1", ":7")])
        assert reasons[-1] == "error", kind


def test_drafts_end_at_the_calls_marker(kimi):
    """MTP drafts of a waiting row end with a token that would complete either marker (``ends_reasoning``)."""
    for kind, tok in _tokenizers(kimi):
        think = Reasoning(KIMI_K2, tok, True)
        after, _ = think.grammar_markers(tok, "<think>", 1 << 10)
        opts = SamplingOptions(max_tokens=999, grammar=tool_grammar(FUNCTIONS, tok, fmt=K), grammar_after=after,
                               grammar_at=think.grammar_at(tok, after, K.calls_begin))
        r, _, _ = _feed(tok, opts, [REASONING])
        masks = GrammarMasks(tok, 1 << 10, torch.device("cpu"))
        for marker in (K.calls_begin, KIMI_K2.end):
            assert masks.ends_reasoning(r, _ids(tok, marker)), (kind, marker)
        assert not masks.ends_reasoning(r, _ids(tok, " more"))
        if kind == "bytes":  # a marker's last byte completes it, not its first ones
            assert not masks.ends_reasoning(r, _ids(tok, K.calls_begin[:-1]))


@pytest.fixture(scope="module")
def engine_server(kimi):
    """A tiny random model behind Kimi's tokenizer, ``TEMPLATE`` and the kimi_k2 parser (a real engine)."""
    torch.manual_seed(0)
    tok = load_tokenizer(kimi)
    model = Transformer(dataclasses.replace(preset("tiny"), max_seq_len=2048)).eval()
    engine = Engine(model, EngineConfig(kv_cache_bytes=1 << 24, block_size=16), tokenizer=tok)
    with EngineServer(engine, lambda link: Api(link, tok, "tiny-test", chat_template=TEMPLATE,
                                               reasoning_parser="kimi_k2")) as s:
        s.tok = tok
        yield s


def test_a_real_engine_calls_from_inside_the_reasoning(engine_server, monkeypatch):
    """Steered towards reasoning, the section inside it, a call whose id has the wrong running index (":7"): the
    grammar from the marker on writes ":0" instead; the answer's reasoning is the script's, its call the grammar's,
    streamed alike. Named: the named function."""
    tok, c = engine_server.tok, engine_server.client()
    for choice, (name, args) in (("required", CALLS[0]), ({"type": "function", "function": {"name": CALLS[1][0]}},
                                                          CALLS[1])):
        wrong = K.render([(name, args)]).replace(":0", ":7")
        _steer(monkeypatch, _ids(tok, REASONING, wrong) + [tok.eos_id()])
        want = (REASONING, None, "tool_calls", [(name, args)])
        kw = _kw(tool_choice=choice, temperature=0, max_tokens=200)
        _agree(c, *want, **kw)
        r = c.chat.completions.create(model="tiny-test", messages=ASK, **kw)
        assert [t.id for t in r.choices[0].message.tool_calls] == [K.call_id(name, 0)]
    # "auto" with a strict function: the section opened inside the reasoning is the grammar's from its marker on
    name, args = CALLS[0]
    _steer(monkeypatch, _ids(tok, REASONING, K.render([(name, args)]).replace(":0", ":7")) + [tok.eos_id()])
    strict = [{**t, "function": {**t["function"], "strict": True}} for t in TOOLS]
    kw = {**_kw(temperature=0, max_tokens=200), "tools": strict}
    _agree(c, REASONING, None, "tool_calls", [(name, args)], **kw)
    r = c.chat.completions.create(model="tiny-test", messages=ASK, **kw)
    assert [t.id for t in r.choices[0].message.tool_calls] == [K.call_id(name, 0)]


def test_the_flag_reaches_the_api_and_a_bad_name_is_one_line(monkeypatch, capsys):
    """``flyer serve --reasoning-parser kimi_k2``: the HTTP process's ``Api`` splits with ``KIMI_K2``; another name
    exits 2 with one line naming the flag and the choices."""
    limits, *args = handed_to_http(monkeypatch, "--reasoning-parser", "kimi_k2")
    assert Api(_Scripted(limits, []), *args).reasoning is KIMI_K2
    capsys.readouterr()
    assert main(["serve", "--preset", "tiny", "--reasoning-parser", "kimi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flyer: error: --reasoning-parser: invalid choice: 'kimi'") and err.count("\n") == 1
    assert "kimi_k2" in err and "deepseek" in err
