"""Reasoning output (``flyer serve --reasoning-parser deepseek``; ``flyer.serve.reasoning``) and
``chat_template_kwargs``.

A V3.1-like chat template of this test's own ends the generation prompt with ``<think>`` when the request's
``chat_template_kwargs`` set ``thinking`` (``</think>`` otherwise); the rendered prompt equals transformers'
``apply_chat_template(messages, thinking=...)``. An engine stand-in (``_Scripted``: a random model writes no
markers by itself) writes a scripted output: reasoning, ``</think>``, the answer (and tool calls), through the
official openai client: ``message.reasoning_content`` holds the reasoning exactly, ``content`` the answer exactly
(the marker in neither), a stream's deltas agree with the whole answer (reasoning deltas, then content deltas);
an output cut before ``</think>`` is all reasoning with null content; a prompt not opening a think block and an
output without ``<think>`` is all content; calls after the reasoning parse, a calls block inside the reasoning
does not; logprobs stay one per token; ``usage.completion_tokens_details.reasoning_tokens`` counts the tokens up to
the marker. Each for markers as plain added tokens (DeepSeek's), as special tokens (skipped by decoding) and as
text (bytes). Bad ``chat_template_kwargs`` answer 400 naming the field. Mutations (the split one token off, the
marker leaking into content) fail the checks."""

import contextlib

import httpx
import pytest
from served import client, serving
from test_serve_api import _error
from test_serve_tools import TOOLS, tool_checkpoint
from test_serve_tools_v3 import CALLS, _Scripted, _sse_chunks
from tokenizers import AddedToken
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from flyer.infer.cli import ByteTokenizer
from flyer.interop.hf_tokenizer import load_tokenizer
from flyer.serve.api import Api
from flyer.serve.reasoning import DEEPSEEK, Reasoning, Split
from flyer.serve.request import Limits
from flyer.serve.schema import ChatBody
from flyer.serve.tools import DEEPSEEK_V31 as F31

# V3.1's shape, this test's own: earlier answers after </think>, the generation prompt opening a think block or not
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
            "{% elif m['role'] == 'assistant' %}<｜Assistant｜></think>{{ m['content'] }}{{ eos_token }}{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% if thinking %}<think>{% else %}</think>"
            "{% endif %}{% endif %}")
ASK = [{"role": "user", "content": "what is 2+2?"}]
REASONING, ANSWER = "The user asks for 2+2. Adding: 4.", "\n\nThe answer is 4."
THINK = {"thinking": True}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny DeepSeek-V3 directory with the tool markers, ``<think>`` and ``</think>`` as plain added tokens (as
    DeepSeek's tokenizers hold them) and ``TEMPLATE``."""
    path = tool_checkpoint(tmp_path_factory.mktemp("reasoning") / "v3", TEMPLATE, 1024)
    hf = PreTrainedTokenizerFast.from_pretrained(path)
    hf.add_tokens([AddedToken(m, special=False, normalized=False) for m in (DEEPSEEK.begin, DEEPSEEK.end)])
    hf.save_pretrained(path)
    return path


def _tokenizers(ckpt):
    """(kind, tokenizer, EOS id or None): the markers as plain tokens, as special tokens (decoding skips them),
    as text (bytes)."""
    plain, special = load_tokenizer(ckpt), load_tokenizer(ckpt)
    special.tok.add_special_tokens([AddedToken(m, special=True, normalized=False)
                                    for m in (DEEPSEEK.begin, DEEPSEEK.end)])
    assert DEEPSEEK.end in plain.decode(plain.encode_ids(DEEPSEEK.end, add_special_tokens=False))
    assert special.decode(special.encode_ids(DEEPSEEK.end, add_special_tokens=False)) == ""
    return [("plain", plain, plain.eos_id()), ("special", special, special.eos_id()), ("bytes", ByteTokenizer(), None)]


def _ids(tok, *parts: str) -> list[int]:
    """The parts' ids, each encoded apart (a marker is its own token where the tokenizer holds it)."""
    return [i for p in parts for i in tok.encode_ids(p, add_special_tokens=False)]


@contextlib.contextmanager
def _serving(tok, script: list[int], parser: str | None = "deepseek"):
    """``Api`` with the deepseek reasoning parser over ``_Scripted(script)``, on a free loopback port while in the
    block: (the api, its URL, an openai client)."""
    limits = Limits(vocab_size=1 << 20, max_seq_len=4096, block_size=16, capacity=256, max_queue=8)
    api = Api(_Scripted(limits, script), tok, "tiny-test", chat_template=TEMPLATE, reasoning_parser=parser)
    with serving(api) as url:
        yield api, url, client(url)


def _whole(client, **kw):
    """(reasoning_content, content, finish_reason, tool calls as (name, arguments), usage) of choice 0."""
    r = client.chat.completions.create(model="tiny-test", messages=ASK, **kw)
    ch = r.choices[0]
    assert ch.message.model_extra["reasoning_content"] == ch.message.reasoning_content  # an extra attribute
    calls = [(c.function.name, c.function.arguments) for c in ch.message.tool_calls or []]
    return ch.message.reasoning_content, ch.message.content, ch.finish_reason, calls, r.usage


def _streamed(client, **kw):
    """``_whole``'s fields gathered from a stream's deltas (usage from its usage chunk); reasoning deltas all come
    before the first content delta, and no delta holds a marker."""
    reasoning, content, finish, calls, usage, phase = [], [], None, [], None, "reasoning"
    for chunk in client.chat.completions.create(model="tiny-test", messages=ASK, stream=True,
                                                stream_options={"include_usage": True}, **kw):
        usage = chunk.usage or usage
        for ch in chunk.choices:
            r, c = getattr(ch.delta, "reasoning_content", None), ch.delta.content
            for piece in (r or "", c or ""):
                assert DEEPSEEK.end not in piece and DEEPSEEK.begin not in piece, piece
            if r:
                assert phase == "reasoning", "reasoning after content"
                reasoning.append(r)
            if c:
                phase = "content"
                content.append(c)
            calls += [(d.function.name, d.function.arguments) for d in ch.delta.tool_calls or []]
            finish = ch.finish_reason or finish
    return ("".join(reasoning) or None), "".join(content), finish, calls, usage, len(reasoning)


def _agree(client, want_reasoning, want_content, want_finish, want_calls=(), **kw):
    """The whole answer is the wanted one; the stream's agrees (its content "" where the whole's is null)."""
    whole = _whole(client, **kw)
    assert whole[:4] == (want_reasoning, want_content, want_finish, list(want_calls)), whole
    streamed = _streamed(client, **kw)
    assert streamed[:4] == (want_reasoning, want_content or "", want_finish, list(want_calls)), streamed
    assert streamed[4].completion_tokens_details.reasoning_tokens == whole[4].completion_tokens_details.reasoning_tokens
    assert want_reasoning is None or streamed[5] > 1  # reasoning streamed as it came, not at the end
    return whole[4]


def test_which_prompts_open_reasoning():
    """R1-0528's generation prompt (``<think>\\n``) and V3.1's in thinking mode (``<think>``) open a think block;
    V3.1's otherwise (``</think>``), one that mentions <think> before more text, and no parser do not."""
    for prompt, opened in (("<｜User｜>hi<｜Assistant｜><think>\n", True), ("<｜Assistant｜><think>", True),
                           ("<｜Assistant｜></think>", False), ("say <think> twice<｜Assistant｜>", False)):
        assert Reasoning.opens(DEEPSEEK, prompt) is opened, prompt
    assert not Reasoning.opens(None, "<think>")


def test_reasoning_then_content(ckpt):
    for kind, tok, eos in _tokenizers(ckpt):
        thought, marker = _ids(tok, REASONING), _ids(tok, DEEPSEEK.end)
        script = thought + marker + _ids(tok, ANSWER) + ([eos] if eos else [])
        assert len(marker) == (len(DEEPSEEK.end) if kind == "bytes" else 1)
        with _serving(tok, script) as (api, url, client):
            # the prompt opens a think block: the output starts in reasoning
            usage = _agree(client, REASONING, ANSWER, "stop", extra_body={"chat_template_kwargs": THINK})
            assert usage.completion_tokens_details.reasoning_tokens == len(thought) + len(marker), kind
            assert usage.completion_tokens == len(script)
            # logprobs stay one per token, reasoning's and the marker's included
            r = client.chat.completions.create(model="tiny-test", messages=ASK, logprobs=True,
                                               extra_body={"chat_template_kwargs": THINK})
            assert len(r.choices[0].logprobs.content) == len(script)  # the EOS too, as without the parser
            # cut by max_tokens before the end marker: all reasoning, content null; at the marker: content ""
            for cut, (reasoning, content) in ((len(thought), (REASONING, None)), (len(thought) + len(marker),
                                                                                   (REASONING, ""))):
                _agree(client, reasoning, content, "length", max_tokens=cut, extra_body={"chat_template_kwargs": THINK})
            # one token short of the marker (bytes: a marker's prefix, held back while streaming, then reasoning)
            _agree(client, REASONING + tok.decode(marker[:-1]), None, "length",
                   max_tokens=len(thought) + len(marker) - 1, extra_body={"chat_template_kwargs": THINK})
            # without the parser: everything is content, as before
        with _serving(tok, script, parser=None) as (api, url, client):
            r = client.chat.completions.create(model="tiny-test", messages=ASK,
                                               extra_body={"chat_template_kwargs": THINK})
            assert r.choices[0].message.content == tok.decode(script) and "reasoning_content" not in \
                r.choices[0].message.model_extra


def test_where_reasoning_starts(ckpt):
    """Not opened by the prompt (thinking off): an output without <think> is all content, reasoning_content null;
    an output that starts with <think> (R1 writing it itself) reasons until </think>."""
    for kind, tok, eos in _tokenizers(ckpt):
        plain = _ids(tok, ANSWER) + ([eos] if eos else [])
        with _serving(tok, plain) as (api, url, client):
            usage = _agree(client, None, ANSWER, "stop")
            assert usage.completion_tokens_details.reasoning_tokens == 0
            _agree(client, None, ANSWER, "stop", extra_body={"chat_template_kwargs": {"thinking": False}})
        led = _ids(tok, DEEPSEEK.begin, REASONING, DEEPSEEK.end, ANSWER) + ([eos] if eos else [])
        with _serving(tok, led) as (api, url, client):
            _agree(client, REASONING, ANSWER, "stop")
            _agree(client, REASONING, None, "length", max_tokens=len(_ids(tok, DEEPSEEK.begin, REASONING)))


def test_tool_calls_after_the_reasoning(ckpt):
    """Calls after </think> parse (content: the text between the marker and the block); a calls block written
    inside the reasoning is reasoning, not a call."""
    for kind, tok, eos in _tokenizers(ckpt):
        script = _ids(tok, REASONING, DEEPSEEK.end, "Sure.", F31.render(CALLS)) + ([eos] if eos else [])
        with _serving(tok, script) as (api, url, client):
            _agree(client, REASONING, "Sure.", "tool_calls", CALLS, tools=TOOLS,
                   extra_body={"chat_template_kwargs": THINK})
            # the same over raw SSE: the chunk with the calls, then the finish in a chunk of its own
            chunks = [c["choices"][0] for c in _sse_chunks(url, dict(model="tiny-test", messages=ASK, tools=TOOLS,
                                                                     chat_template_kwargs=THINK))]
            assert chunks[-1]["finish_reason"] == "tool_calls" and chunks[-1]["delta"] == {}
            assert chunks[-2]["finish_reason"] is None and len(chunks[-2]["delta"]["tool_calls"]) == 2
        inside = _ids(tok, F31.render(CALLS), DEEPSEEK.end, ANSWER) + ([eos] if eos else [])
        with _serving(tok, inside) as (api, url, client):
            whole = _whole(client, tools=TOOLS, extra_body={"chat_template_kwargs": THINK})
            assert whole[1:4] == (ANSWER, "stop", []), whole
            assert "get_weather" in whole[0]


def test_a_stop_string_inside_the_end_marker(ckpt):
    """A stop string that cuts into the end marker: streamed and whole answers agree. The marker one token (plain):
    its token ends the reasoning; its text cut into after the marker was found whole (bytes): reasoning to the cut,
    as vLLM's parser reads a text that has no marker (the stream had skipped the marker's text: it sends it at the
    end); a stop string that completes inside the marker: the marker never whole; the marker decoded to nothing
    (special): no stop string sees it."""
    cut = REASONING + DEEPSEEK.end[:-3]
    want = {("plain", "k>zz"): (REASONING, ""), ("plain", "nk>"): (REASONING, ""),
            ("special", "k>zz"): (REASONING, "zz" + ANSWER), ("special", "nk>"): (REASONING, "zz" + ANSWER),
            ("bytes", "k>zz"): (cut + "n", None), ("bytes", "nk>"): (cut, None)}
    for kind, tok, eos in _tokenizers(ckpt):
        script = _ids(tok, REASONING, DEEPSEEK.end, "zz", ANSWER) + ([eos] if eos else [])
        with _serving(tok, script) as (api, url, client):
            for stop in ("k>zz", "nk>"):
                _agree(client, *want[kind, stop], "stop", stop=[stop], extra_body={"chat_template_kwargs": THINK})


@pytest.mark.parametrize("reasoning,stop", [("", ">\n"), ("", "> "), ("é", ">\n")])
def test_a_stop_string_from_a_markers_last_character_cuts_it_alike_streamed(reasoning, stop):
    """Byte tokens (markers in text): a stop string starting at a marker's last character cuts a marker the stream
    had found whole and skipped. The stream sent nothing of it where nothing came before it: with no reasoning
    streamed yet, its reasoning (the end marker's text, now the whole answer's reasoning) was lost; and an output
    that opened reasoning itself lost its content (the begin marker's text, cut: no reasoning after all)."""
    tok = ByteTokenizer()
    answer = ANSWER if stop != "> " else " zz" + ANSWER
    with _serving(tok, _ids(tok, reasoning, DEEPSEEK.end, answer)) as (api, url, client):
        kw = dict(stop=[stop], extra_body={"chat_template_kwargs": THINK})
        whole, streamed = _whole(client, **kw), _streamed(client, **kw)
        assert whole[:3] == (reasoning + DEEPSEEK.end[:-1], None, "stop")  # no whole marker: all reasoning
        assert streamed[:3] == (whole[0], "", "stop")
    with _serving(tok, _ids(tok, DEEPSEEK.begin, "ab", DEEPSEEK.end, "cd")) as (api, url, client):
        kw = dict(stop=["k>a"])  # thinking off: the output opens reasoning itself, then the stop cuts its marker
        whole, streamed = _whole(client, **kw), _streamed(client, **kw)
        assert whole[:3] == (None, DEEPSEEK.begin[:-2], "stop") and streamed[:3] == whole[:3]


def test_mutations_fail_the_checks(ckpt, monkeypatch):
    """The marker leaking into the content or the reasoning, or the split one token early or late, fails the
    checks (``_agree`` and the reasoning token count)."""
    tok = load_tokenizer(ckpt)
    thought = _ids(tok, REASONING)
    script = thought + _ids(tok, DEEPSEEK.end, ANSWER) + [tok.eos_id()]
    right = Reasoning.split

    def check(client):
        usage = _agree(client, REASONING, ANSWER, "stop", extra_body={"chat_template_kwargs": THINK})
        assert usage.completion_tokens_details.reasoning_tokens == len(thought) + 1

    def at(starts, k, n):
        return starts[k] if k < len(starts) else n
    mutants = {  # (a split whose end marker was found, the tokens' starts, the text's length) -> a wrong split
        "marker in the content": lambda s, st, n: s._replace(content=s.r1),
        "marker in the reasoning": lambda s, st, n: s._replace(r1=s.content),
        "a token early": lambda s, st, n: s._replace(r1=st[s.token - 2], content=st[s.token - 1], token=s.token - 1),
        "a token late": lambda s, st, n: s._replace(r1=st[s.token], content=at(st, s.token + 1, n), token=s.token + 1),
    }
    for name, mutate in mutants.items():
        def split(self, text, ids, kept, starts, final, key=0, _mutate=mutate) -> Split:
            s = right(self, text, ids, kept, starts, final, key)
            return s if s.content is None or s.token + 1 >= len(starts) else _mutate(s, starts, len(text))
        monkeypatch.setattr(Reasoning, "split", split)
        with _serving(tok, script) as (api, url, client):
            with pytest.raises(AssertionError):
                check(client)
    monkeypatch.setattr(Reasoning, "split", right)
    with _serving(tok, script) as (api, url, client):
        check(client)


def test_chat_template_kwargs_reach_the_template(ckpt):
    """The prompt rendered with ``chat_template_kwargs`` is transformers' ``apply_chat_template(**kwargs)``'s."""
    hf = AutoTokenizer.from_pretrained(ckpt)
    tok = load_tokenizer(ckpt)
    with _serving(tok, [1]) as (api, url, client):
        conversation = ASK + [{"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}]
        for kwargs in ({"thinking": True}, {"thinking": False}, {}, {"thinking": True, "unused": [1, {"a": None}]}):
            want = hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True, **kwargs)
            body = ChatBody(model="tiny-test", messages=conversation, chat_template_kwargs=kwargs)
            assert api._chat_text(body) == want
            assert api._chat_prompt(body) == tok.encode_ids(want, add_special_tokens=False)
            assert want.endswith("<｜Assistant｜><think>" if kwargs.get("thinking") else "<｜Assistant｜></think>")


def test_bad_chat_template_kwargs_answer_400(ckpt):
    tok = load_tokenizer(ckpt)
    with _serving(tok, [1]) as (api, url, client):
        ok = dict(model="tiny-test", messages=ASK, max_tokens=1)
        assert httpx.post(url + "/v1/chat/completions", json={**ok, "chat_template_kwargs": THINK}).status_code == 200
        for bad in ({"messages": []}, {"add_generation_prompt": False}, {"tools": None}, {"bos_token": "x"},
                    {"eos_token": ""}, {"raise_exception": 1}, {"bad key": 1}, {"": 1}, [1], "thinking",
                    {"thinking": "x" * 20000}):
            r = httpx.post(url + "/v1/chat/completions", json={**ok, "chat_template_kwargs": bad})
            err = _error(r, 400, "chat_template_kwargs")
            assert "chat_template_kwargs" in err["message"] or isinstance(bad, (list, str)), err
