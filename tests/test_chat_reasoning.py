"""Thinking-mode chat data (``flyer.data.chat_data``): assistant turns carry ``reasoning_content``, the template
sees ``chat_template_kwargs`` (the build's, a line's own over them), and a conversation whose reasoning a later user
turn drops is cut in pieces, each trained turn in the context inference shows it.

Outside oracle: transformers' ``apply_chat_template(return_assistant_tokens_mask=True)`` under a Qwen3-style template
(reasoning shown after the last user turn only, ``{% generation %}`` markers) on a tokenizer built here: each piece's
ids, and its mask with the turns before the piece's start zeroed (transformers masks every assistant turn). DeepSeek-
V3.2 / V4's encodings in thinking mode: the mask is exactly each trained turn's reasoning, ``</think>``, content, calls
and EOS, found by character offsets in the encoder's text. The plain and fast paths agree on pieces (ids, masks,
errors); validation keeps a conversation's pieces together; the cache key holds the kwargs; refusals are one line;
``flyer train --chat-template-kwargs`` runs, packed and not."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from flyer.cli import build_parser, main
from flyer.data import chat_data
from flyer.data.chat_data import encode_conversation, prepare_chat
from flyer.data.chat_encode import encode_conversation_fast, token_splitter
from flyer.data.chat_pieces import pieces
from flyer.data.chat_template import DEFAULT_CHAT_TEMPLATE, chat_renderer
from flyer.data.deepseek_encoding import CALLS_BLOCK, CALLS_BLOCK_V4, END_THINK, ENCODINGS, EOS, dsml_calls
from flyer.errors import DataError, FieldError
from flyer.interop.hf_tokenizer import TextTokenizer, load_tokenizer
from flyer.serve.tools import DEEPSEEK_V31, ToolCall, parse_tool_calls
from flyer.train.checkpoint import saved_state
from flyer.train.cli import build_train_config
from flyer.train.config import RESUME_KEEPS, TrainConfig
from tests.hf_models import make_tokenizer
from tests.test_chat_deepseek_v32 import CALL, TOOLS as V32_TOOLS
from tests.test_serve_dsml import v32_checkpoint
from tests.test_chat_build import MANY
from tests.test_sft import CHATS as SFT_CHATS, TEMPLATE, TOOLS

# Qwen3's shape: reasoning rendered for assistant turns after the last user turn only, so a later user turn drops it
QWEN3 = (
    "{%- if tools %}{{- '<|im_start|>system\\n# Tools\\n' }}{%- for t in tools %}{{- t | tojson + '\\n' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- set ns = namespace(last=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}{%- generation %}"
    "{%- if loop.index0 > ns.last and m.reasoning_content %}"
    "{{- '<think>\\n' + m.reasoning_content.strip('\\n') + '\\n</think>\\n\\n' }}{%- endif %}"
    "{{- m.content or '' }}"
    "{%- for c in m.tool_calls or [] %}{{- '<tool_call>' + c.function.name + ' ' + c.function.arguments }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}{%- endgeneration %}"
    "{%- elif m.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>' + m.content + '</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
WEATHER = {"type": "function", "function": {"name": "weather", "arguments": json.dumps({"city": "oslo"})}}


def _u(text):
    return {"role": "user", "content": text}


def _a(content, reasoning=None, calls=None):
    return {"role": "assistant", "content": content, "reasoning_content": reasoning,
            **({"tool_calls": calls} if calls else {})}


# several reasoning turns, a tool call, a turn without reasoning; one single-turn; one without any reasoning; two cuts
CHATS = [
    {"tools": TOOLS, "messages": [
        {"role": "system", "content": "be brief"}, _u("the weather in oslo"),
        _a(None, "need the tool first", [WEATHER]), {"role": "tool", "content": "sunny"},
        _a("sunny in oslo", "the tool said sunny"), _u("and tomorrow"), _a("the same", "no change expected"),
        _u("thanks"), _a("hello")]},
    {"messages": [_u("hello world"), _a("the quick fox", "a greeting")]},
    {"messages": [_u("hello"), _a("world"), _u("the lazy dog"), _a("jumps over", "")]},
    {"messages": [_u("quick"), _a("brown fox", "colors"), _u("lazy"), _a("dog", "animals"), _u("bye")]},
]
CUTS = [[(5, 0), (7, 5), (9, 7)], [(2, 0)], [(4, 0)], [(2, 0), (4, 2)]]  # the last's third piece trains nothing


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    """A byte-level BPE whose turn and think markers are added special tokens, with QWEN3 as its template."""
    path = tmp_path_factory.mktemp("qwen")
    make_tokenizer(path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<think>", "</think>"])
    tok.save(str(path / "tokenizer.json"))
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": QWEN3}))
    return path


@pytest.fixture(scope="module")
def v32(tmp_path_factory) -> Path:
    return v32_checkpoint(tmp_path_factory.mktemp("v32") / "v32")


def _tok(path: Path) -> TextTokenizer:
    return load_tokenizer(path, config={})


def _write(path: Path, chats) -> Path:
    path.write_text("".join(json.dumps(c) + "\n" for c in chats))
    return path


def _samples(data) -> list[tuple[list[int], list[int]]]:
    """Every sample of a build, training's then validation's (ids, mask)."""
    return [tuple(a.tolist() for a in s.conversation(j)) for s in (data.train, data.val)
            for j in range(s.n_conversations)]


def _zero_runs(mask: list[int], k: int) -> list[int]:
    """``mask`` with its first ``k`` runs of 1s zeroed: transformers' mask of every assistant turn, less the piece's
    context turns (one run each under {% generation %})."""
    out, runs = list(mask), 0
    for j, m in enumerate(mask):
        if m and (j == 0 or not mask[j - 1]):
            runs += 1
        if m and runs <= k:
            out[j] = 0
    return out


def test_pieces_equal_transformers(qwen, tmp_path):
    """Each piece's ids and mask (the build's, file order, the last conversation held out) are transformers' on
    the piece's messages, its context turns' mask zeroed; a piece after a cut shows no earlier reasoning."""
    ref = AutoTokenizer.from_pretrained(qwen)
    tok = _tok(qwen)
    assert [pieces(c["messages"], c.get("tools"), _render(QWEN3, tok)) for c in CHATS] == CUTS
    assert token_splitter(tok.tok) is not None  # the fast path is the one measured
    data = prepare_chat(_write(tmp_path / "c.jsonl", CHATS), tmp_path / "cache", tok, QWEN3)
    got = _samples(data)
    want_pieces = [(c, end, first) for c, cuts in enumerate(CHATS) for end, first in CUTS[c]]
    assert len(got) == len(want_pieces) == 7 and data.val.n_conversations == 2
    for (c, end, first), (ids, mask) in zip(want_pieces, got):
        msgs = CHATS[c]["messages"][:end]
        want = ref.apply_chat_template(msgs, tools=CHATS[c].get("tools"), tokenize=True, return_dict=True,
                                       return_assistant_tokens_mask=True)
        context = sum(m["role"] == "assistant" for m in msgs[:first])
        assert ids == list(want["input_ids"]) and mask == _zero_runs(list(want["assistant_masks"]), context), (c, end)
        assert sum(mask) > 0
        text = tok.tok.decode(ids, skip_special_tokens=False)
        trained = tok.tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
        for m in msgs:
            if m["role"] == "assistant" and m.get("reasoning_content"):
                shown = m["reasoning_content"] in text
                assert shown == (m in msgs[first:]) and shown == (m["reasoning_content"] in trained), (c, end)


@pytest.mark.parametrize("key", ["reasoning", "thinking"])
def test_reasoning_under_its_other_names_trains_alike(qwen, tmp_path, key):
    """A reasoning sent as ``reasoning`` or ``thinking`` (vLLM's clients send one, gpt-oss's templates read the
    other) is the message's reasoning_content, as transformers 5 aliases it: the build equals reasoning_content's
    (it trained an empty think block)."""
    tok = _tok(qwen)
    renamed = [{**c, "messages": [{key if k == "reasoning_content" else k: v for k, v in m.items()}
                                  for m in c["messages"]]} for c in CHATS]
    want = _samples(prepare_chat(_write(tmp_path / "a.jsonl", CHATS), tmp_path / "cache", tok, QWEN3))
    assert _samples(prepare_chat(_write(tmp_path / "b.jsonl", renamed), tmp_path / "cache", tok, QWEN3)) == want


def test_keys_set_to_null_reach_the_template_as_transformers_passes_them(qwen, tmp_path):
    """transformers 5 leaves a message's null keys out: a template asking ``'tool_calls' in m`` (Llama 3.1's) renders
    the turn as one without calls, where the key's None refused the line."""
    tpl = ("{% for m in messages %}<|im_start|>{{ m.role }}{% if 'tool_calls' in m %} {{ m.tool_calls | length }} "
           "calls{% endif %}{{ '\\n' }}{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    msgs = [_u("hello"), {"role": "assistant", "content": "hi there", "tool_calls": None}]
    want = AutoTokenizer.from_pretrained(qwen).apply_chat_template(msgs, chat_template=tpl, tokenize=False)
    assert chat_renderer(tpl)(msgs, add_generation_prompt=False) == want
    tok = _tok(qwen)
    (ids, mask), = _samples(prepare_chat(_write(tmp_path / "c.jsonl", [{"messages": msgs}] * 20), tmp_path / "cache",
                                         tok, tpl))[:1]
    assert tok.tok.decode(ids, skip_special_tokens=False) == want
    assert tok.tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == "hi there<|im_end|>"


def test_default_template_writes_tools_and_calls_as_serve_reads_them():
    """flyer's default template shows the tools (as JSON) and an assistant's calls in DeepSeek-V3.1's format, the one
    ``flyer serve`` parses from a model without a template; a call's null content renders as no text (not "None")."""
    render = chat_renderer(None, {"bos_token": "<s>"})
    msgs = [_u("the weather in oslo"), _a(None, None, [WEATHER, {**WEATHER, "function": {
        "name": "weather", "arguments": {"city": "bergen"}}}]), {"role": "tool", "content": "sunny"}, _a("sunny")]
    text = render(msgs, TOOLS, add_generation_prompt=False)
    assert text.startswith(f"<s><|tools|>\n{json.dumps(TOOLS)}\n<|user|>\nthe weather in oslo\n<|assistant|>\n")
    assert "None" not in text and text.endswith("<|tool|>\nsunny\n<|assistant|>\nsunny\n")
    turn = text.split("<|assistant|>\n")[1].split("\n<|tool|>")[0]
    assert parse_tool_calls(turn, DEEPSEEK_V31) == (None, [ToolCall("weather", '{"city": "oslo"}'),
                                                          ToolCall("weather", '{"city": "bergen"}')])
    assert render(msgs[:1], None) == "<s><|user|>\nthe weather in oslo\n<|assistant|>\n"  # no tools: as before


def _deepseek_chats(tools: bool) -> list[dict]:
    w = {"tools": V32_TOOLS} if tools else {}
    return [{**w, "messages": [_u("weather in oslo"), _a("let me look", "I need the tool", [CALL]),
                               {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                               _a("sunny for two days", "the tool answered"), _u("and then"),
                               _a("rain", "the forecast turns")]} if tools else
            {"messages": [_u("hello"), _a("world", "a greeting"), _u("the lazy dog"), _a("jumps over", "a fable"),
                          _u("again"), _a("jumps over", "the same fable")]},
            {**w, "messages": [_u("quick"), _a("brown fox", "colors")]}]


@pytest.mark.parametrize("name", ["deepseek_v32", "deepseek_v4"])
@pytest.mark.parametrize("tools", [False, True], ids=["chat", "tools"])
def test_deepseek_thinking_mask_is_each_trained_turns_text(v32, tmp_path, name, tools):
    """Thinking mode: each piece's mask is exactly its trained turns' reasoning + </think> + content (+ calls) +
    EOS in the encoder's text, by the tokens' character offsets; an earlier piece's reasoning is not in a later
    piece (V4 with tools drops none: its trace is one piece, every turn trained where inference shows it)."""
    enc = ENCODINGS[name]
    tok = _tok(v32)
    chats = _deepseek_chats(tools)
    data = prepare_chat(_write(tmp_path / "c.jsonl", chats), tmp_path / "cache", tok, enc, {"thinking": True})
    got = _samples(data)
    want_pieces = [(c, e, f) for c, chat in enumerate(chats)
                   for e, f in pieces(chat["messages"], chat.get("tools"), enc.render, {"thinking": True})]
    # V4 with tools drops no reasoning: its trace is one piece
    assert len(got) == len(want_pieces) == (3 if not tools else 1 if name == "deepseek_v4" else 2) + 1
    block = CALLS_BLOCK_V4 if name == "deepseek_v4" else CALLS_BLOCK
    for (c, end, first), (ids, mask) in zip(want_pieces, got):
        msgs = chats[c]["messages"][:end]
        whole = enc.render(msgs, chats[c].get("tools"), False, {"thinking": True})
        spans, at = [], 0
        for m in msgs[first:]:
            if m["role"] != "assistant":
                continue
            calls = [(x["function"]["name"], json.loads(x["function"]["arguments"])) for x in m.get("tool_calls", [])]
            text = (m["reasoning_content"] + END_THINK + m["content"] + ("\n\n" + dsml_calls(calls, block) if calls
                                                                          else "") + EOS)
            start = whole.index(text, at)
            spans.append((start, start + len(text)))
            at = start + len(text)
        e = tok.tok.encode(whole, add_special_tokens=False)
        assert ids == e.ids
        assert mask == [int(any(a <= s and t <= b for a, b in spans)) for s, t in e.offsets], (name, c, end)
        for m in msgs[:first]:  # context: reasoning dropped
            if m["role"] == "assistant":
                assert m["reasoning_content"] not in whole


def _render(template, tok):
    return chat_renderer(template, tok.special_tokens())


def _outcome(f):
    try:
        return f()
    except Exception as e:
        return type(e), str(e)


@pytest.mark.parametrize("which", ["qwen", "v32-thinking", "v32-chat", "bot"])
def test_plain_and_fast_paths_agree_on_pieces(qwen, v32, which):
    """ids, masks and errors of every piece, plain path (the oracle) and fast twin: pieces that train, reasoning
    the template does not render (chat mode), a generation prompt that is not the turn's header."""
    if which in ("qwen", "bot"):
        tok = _tok(qwen)
        template = QWEN3 if which == "qwen" else QWEN3.replace("{%- if add_generation_prompt %}{{- '<|im_start|>assis",
                                                               "{%- if add_generation_prompt %}{{- '<|im_start|>bot")
        render, chats, extra = _render(template, tok), CHATS, None
    else:
        tok = _tok(v32)
        render, chats = ENCODINGS["deepseek_v32"].render, _deepseek_chats(True) + _deepseek_chats(False)
        extra = {"thinking": True} if which == "v32-thinking" else None
    split = token_splitter(tok.tok)
    outcomes = []
    for c in chats:
        for end, first in pieces(c["messages"], c.get("tools"), render, extra):
            args = (c["messages"][:end], c.get("tools"), render)
            want = _outcome(lambda: encode_conversation(*args, lambda t: tok.encode_ids(t, add_special_tokens=False),
                                                        first, extra))
            assert _outcome(lambda: encode_conversation_fast(*args, split, tok.tok, first, extra)) == want
            outcomes.append(want)
    errors = [o[1] for o in outcomes if isinstance(o[0], type)]
    if which in ("qwen", "v32-thinking"):
        assert not errors
    else:
        words = "reasoning_content: the chat template does not render it" if which == "v32-chat" else \
            "rendered with the generation prompt"
        assert errors and all(words in e for e in errors), errors


def test_validation_keeps_a_conversations_pieces_together(qwen, tmp_path):
    """Conversation 19 of 24 (held out: VAL_EVERY) is cut in 3 pieces: validation is those 3, training the other
    23 conversations' pieces, in file order; the cache records each sample's conversation."""
    assert chat_data.VAL_EVERY == 20
    chats = [CHATS[1 + c % 3] for c in range(24)]
    chats[19] = CHATS[0]
    tok = _tok(qwen)
    data = prepare_chat(_write(tmp_path / "c.jsonl", chats), tmp_path / "cache", tok, QWEN3)
    render, plain = _render(QWEN3, tok), lambda t: tok.encode_ids(t, add_special_tokens=False)

    def encoded(chat):
        return [encode_conversation(chat["messages"][:e], chat.get("tools"), render, plain, f)
                for e, f in pieces(chat["messages"], chat.get("tools"), render)]

    val = [tuple(a.tolist() for a in data.val.conversation(j)) for j in range(data.val.n_conversations)]
    train = [tuple(a.tolist() for a in data.train.conversation(j)) for j in range(data.train.n_conversations)]
    assert val == [tuple(p) for p in encoded(CHATS[0])]
    assert train == [tuple(p) for c, chat in enumerate(chats) if c != 19 for p in encoded(chat)]
    owner = np.load(data.cache_dir / "conversation.npy")
    assert len(owner) == len(train) + len(val) and owner[-1] == 23 and (np.diff(owner) >= 0).all()
    assert json.loads((data.cache_dir / "meta.json").read_text())["conversations"] == 24


def test_kwargs_key_the_cache_and_a_lines_own_override_them(v32, tmp_path):
    """The build's kwargs are in the cache key (none: the key without them); a line's own chat_template_kwargs
    override the build's for that line only: thinking on for one line of a chat-mode build trains its reasoning,
    off for one line of a thinking build renders it in chat mode."""
    tok, enc = _tok(v32), ENCODINGS["deepseek_v32"]
    think, plain = _deepseek_chats(False)[1], {"messages": [_u("hello world"), _a("the quick fox")]}
    thinking = _write(tmp_path / "t.jsonl", _deepseek_chats(False))
    dirs = {prepare_chat(thinking, tmp_path / "cache", tok, enc, kw).cache_dir
            for kw in ({"thinking": True}, {"thinking": True, "reasoning_effort": "high"})}
    with pytest.raises(DataError, match="t.jsonl:1: messages.1..reasoning_content: the chat template does not"):
        prepare_chat(thinking, tmp_path / "cache", tok, enc)  # chat mode: refused, never dropped
    chats = _write(tmp_path / "c.jsonl", [think, plain])
    with pytest.raises(DataError, match=r"c.jsonl:2: messages\[1\]: in thinking mode .* needs reasoning_content"):
        prepare_chat(chats, tmp_path / "cache", tok, enc, {"thinking": True})  # the release refuses the plain line
    both = [{**think, "chat_template_kwargs": {"thinking": True}}, plain]
    data = prepare_chat(_write(tmp_path / "own.jsonl", both), tmp_path / "cache", tok, enc)
    dirs.add(data.cache_dir)
    ids, mask = _samples(data)[0]
    trained = tok.tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert trained == "colors</think>brown fox" + EOS
    assert _samples(data)[1][0] == tok.encode_ids(enc.render(plain["messages"], None, False), add_special_tokens=False)
    flipped = [think, {**plain, "chat_template_kwargs": {"thinking": False}}]
    data = prepare_chat(_write(tmp_path / "flip.jsonl", flipped), tmp_path / "cache", tok, enc, {"thinking": True})
    dirs.add(data.cache_dir)
    assert _samples(data)[1][0] == tok.encode_ids(enc.render(plain["messages"], None, False), add_special_tokens=False)
    assert len(dirs) == 4


@pytest.mark.parametrize("line, words", [
    ({"messages": [_u("x"), _a("y", 3)]}, "messages[1].reasoning_content: expected an assistant's string or null, "
                                          "got int"),
    ({"messages": [{**_u("x"), "reasoning_content": "r"}, _a("y")]}, "messages[0].reasoning_content: expected"),
    ({"messages": [_u("x"), _a("y")], "chat_template_kwargs": [1]}, "chat_template_kwargs: expected an object"),
    ({"messages": [_u("x"), _a("y")], "chat_template_kwargs": {"tools": 1}},
     "chat_template_kwargs: ['tools'] are the template's own variables"),
    ({"messages": [_u("x"), _a("y", " unseen ")]}, "messages[1].reasoning_content: the chat template does not render"),
])
def test_bad_lines_are_one_line_errors(qwen, tmp_path, line, words):
    """A bad reasoning_content, a line's kwargs that are no object or shadow the template's variables, a reasoning
    the template (test_sft's: content only) does not render: one line naming the file's line and the field."""
    chats = _write(tmp_path / "c.jsonl", [CHATS[2], line])  # no reasoning: rendered whole
    with pytest.raises(DataError) as e:
        prepare_chat(chats, tmp_path / "cache", _tok(qwen), TEMPLATE)
    assert str(e.value).startswith(f"{chats}:2: ") and words in str(e.value) and "\n" not in str(e.value), e.value


def _train_argv(v32, tmp_path, chats, *extra) -> list[str]:
    argv = ["train", "--init", str(v32), "--data", str(chats), "--steps", "2", "--batch-size", "2", "--seq-len", "64",
            "--eval-batches", "1", "--data-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "run"),
            "--no-plots", "--no-progress", "--threads", "1", "--device", "cpu", "--precision", "fp32", *extra]
    return argv


@pytest.mark.parametrize("flag, words", [
    ("{bad", "--chat-template-kwargs: not valid JSON"),
    ("[1]", "--chat-template-kwargs: expected a JSON object, got list"),
    ('{"a b": 1}', "--chat-template-kwargs: keys must be template variable names"),
    ('{"messages": 1}', "--chat-template-kwargs: ['messages'] are the template's own variables"),
    ('{"thinking": 1}', "--chat-template-kwargs: thinking must be true or false"),
])
def test_bad_flag_is_one_line_exit_2(qwen, v32, tmp_path, capsys, flag, words):
    """Bad JSON, not an object, not variable names, a name the template sets itself, a value the encoding refuses:
    exit 2, one line naming the flag (the last two found by the build's first render)."""
    chats = _write(tmp_path / "c.jsonl", CHATS)
    argv = _train_argv(v32, tmp_path, chats, "--chat-template-kwargs", flag)
    if "messages" in flag:  # a Jinja template: flyer's default, with the Qwen tokenizer
        i = argv.index("--init")
        argv[i:i + 2] = ["--tokenizer", str(qwen / "tokenizer.json"), "--preset", "tiny"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"flyer: error: {words}"), err


@pytest.mark.parametrize("pack", [False, True], ids=["rows", "packed"])
def test_flyer_train_thinking(v32, tmp_path, pack):
    """``flyer train --init V32 --chat-template-kwargs '{"thinking": true}'`` on multi-turn reasoning: 2 steps, a
    row or a packed document per piece; the run records the kwargs."""
    chats = _write(tmp_path / "c.jsonl", _deepseek_chats(False) * 3)
    argv = _train_argv(v32, tmp_path, chats, "--chat-template-kwargs", '{"thinking": true}', *["--pack"] * pack)
    assert main(argv) == 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    state = saved_state(tmp_path / "run" / "checkpoints" / "step_00000002")
    assert state["train_config"]["chat_template_kwargs"] == {"thinking": True}  # what a resume must keep
    assert state["sampler"]["n_conversations"] == 3 * 3 + 2  # training's samples: 3 + 1 pieces a pair, the last out


def test_template_kwargs_is_a_config_field(tmp_path):
    """A TOML ``[train]`` table sets chat_template_kwargs, the flag wins over it; a resume keeps it; on text data
    it is refused, naming the field."""
    toml = tmp_path / "c.toml"
    toml.write_text('[train]\ndata = "c.jsonl"\ntokenizer = "t.json"\nchat_template_kwargs = { thinking = true }\n')
    args = build_parser().parse_args(["train", "--config", str(toml)])
    assert build_train_config(args).chat_template_kwargs == {"thinking": True}
    args = build_parser().parse_args(["train", "--config", str(toml), "--chat-template-kwargs", '{"x": 1}'])
    tc = build_train_config(args)
    assert tc.chat_template_kwargs == {"x": 1}
    tc.validate()
    assert "chat_template_kwargs" in RESUME_KEEPS
    with pytest.raises(FieldError) as e:
        TrainConfig(chat_template_kwargs={"thinking": True}, data="text.txt").validate()
    assert e.value.field == "chat_template_kwargs"


# flyer's default template before it wrote reasoning_content (with the EOS that ends an assistant's turn since)
OLD_DEFAULT = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
               "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
               "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def test_default_template_writes_reasoning_as_r1(qwen):
    """flyer's default template: every render without reasoning_content (absent, null, empty) or tools is the old
    template's byte for byte (test_sft's and test_chat_build's conversations, every prefix, with and without the
    generation prompt); with it, R1's ``<think>`` block before the content after the last user turn, so pieces
    train it: each piece's trained text is its own turn's block, content, EOS and line end."""
    assert DEFAULT_CHAT_TEMPLATE != OLD_DEFAULT
    special = {"bos_token": "<s>", "eos_token": "</s>"}
    old, new = chat_renderer(OLD_DEFAULT, special), chat_renderer(None, special)
    for c in SFT_CHATS + MANY[:20]:
        if c.get("tools") or any(m.get("tool_calls") for m in c["messages"]):  # the old one wrote no tools or calls
            continue
        for k in range(1, len(c["messages"]) + 1):
            for r in ("absent", None, ""):
                msgs = [m if r == "absent" else {**m, "reasoning_content": r} for m in c["messages"][:k]]
                for g in (True, False):
                    assert new(msgs, c.get("tools"), g) == old(msgs, c.get("tools"), g)
    tok = _tok(qwen)
    render, plain = chat_renderer(None, tok.special_tokens()), lambda t: tok.encode_ids(t, add_special_tokens=False)
    msgs = CHATS[3]["messages"]
    trained, texts = [], []
    for end, first in pieces(msgs, None, render):
        ids, mask = encode_conversation(msgs[:end], None, render, plain, first)
        texts.append(tok.tok.decode(ids, skip_special_tokens=False))
        split = token_splitter(tok.tok)
        assert encode_conversation_fast(msgs[:end], None, render, split, tok.tok, first) == (ids, mask)
        trained.append(tok.tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False))
    eos = tok.token(tok.eos_id())
    assert trained == [f"<think>\ncolors\n</think>\n\nbrown fox{eos}\n", f"<think>\nanimals\n</think>\n\ndog{eos}\n"]
    assert "colors" not in texts[1]  # the second piece's context: the first turn without its reasoning
