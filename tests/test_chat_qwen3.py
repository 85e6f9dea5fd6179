"""Thinking-mode chat data under Qwen3's real chat template (``tests/data/qwen3_chat_template.jinja``: Qwen/Qwen3-0.6B's
``tokenizer_config.json`` ``chat_template``, as llama.cpp's ``models/templates/Qwen-Qwen3-0.6B.jinja`` copies it).

That template writes an empty ``<think>\\n\\n</think>\\n\\n`` on the last assistant turn when it has no reasoning, and
nothing once more turns follow; it drops reasoning before the last user query. So a turn's own text (the
conversation through it, as inference wrote it) is not how later turns see it, and ``chat_pieces.pieces`` cuts there.

Outside oracle: transformers' ``apply_chat_template`` on a tokenizer built here (Qwen2's pre-tokenizer split, its
added tokens): for every trained turn, the piece's text starts with transformers' prompt for that turn (the
conversation before it with the generation prompt, ``enable_thinking`` as given) followed by the turn as the last
message; the piece's ids are transformers'; its mask is exactly the trained turns' text, found by the tokens'
character offsets; every assistant turn is trained exactly once. Also: plain and fast paths agree; what cannot be
trained faithfully (reasoning with ``enable_thinking: false``) is a one-line refusal naming the message; the
reasoning check is exact (a reasoning equal to, or inside, the content is refused where the template drops it); a
DeepSeek-V3.2 thinking-mode trace with a plain answer stays refused (``chat_pieces``' module doc)."""

import json
from pathlib import Path

import pytest
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from flyer.data.chat_data import encode_conversation, prepare_chat
from flyer.data.chat_encode import encode_conversation_fast, token_splitter
from flyer.data.chat_pieces import pieces
from flyer.data.chat_template import chat_renderer
from flyer.data.deepseek_encoding import ENCODINGS
from flyer.errors import DataError
from flyer.interop.hf_tokenizer import load_tokenizer
from tests.test_chat_reasoning import _a, _u, _write, v32  # noqa: F401 (v32: a fixture)
from tests.test_sft import TEMPLATE as CONTENT_ONLY, TOOLS

QWEN3 = (Path(__file__).parent / "data" / "qwen3_chat_template.jinja").read_text()
# Qwen2's (and Qwen3's) pre-tokenizer split: newlines are their own pieces, so "</think>\n\n" ends a piece
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")


def _call(name, **args):
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def _tool(text):
    return {"role": "tool", "content": text}


# (conversation, its pieces under the real template): a plain call then a reasoned answer in one user turn (the
# empty think block cuts them), reasoning dropped by later user turns (a piece keeps the tool answer after its last
# turn, not the user turn), parallel calls, a trailing user turn; the last trains only turns without reasoning
# (enable_thinking false accepts it)
CHATS = [
    ({"tools": TOOLS, "messages": [
        {"role": "system", "content": "be brief"}, _u("the weather in oslo"),
        _a("", None, [_call("weather", city="oslo")]), _tool("sunny"), _a("sunny in oslo", "the tool said sunny"),
        _u("and tomorrow"), _a("the same", "no change expected"), _u("thanks"), _a("hello")]},
     [(3, 0), (5, 3), (7, 5), (9, 7)]),
    ({"tools": TOOLS, "messages": [_u("quick"), _a("brown fox", "colors", [_call("weather", city="oslo")]),
                                   _tool("red"), _u("lazy"), _a("dog", "animals"), _u("bye")]},
     [(3, 0), (5, 3)]),
    ({"tools": TOOLS, "messages": [
        _u("oslo and bergen"), _a("", "two cities", [_call("weather", city="oslo"), _call("weather", city="bergen")]),
        _tool("sunny"), _tool("rain"), _a("", "compare them", [_call("weather", city="paris")]), _tool("fog"),
        _a("oslo wins", "sunny beats rain and fog")]},
     [(7, 0)]),
    ({"tools": TOOLS, "messages": [
        _u("the weather in oslo"), _a("let me see", None, [_call("weather", city="oslo")]), _tool("sunny"),
        _a("sunny"), _u("hello world"), _a("the quick fox")]},
     [(2, 0), (4, 2), (6, 4)]),
]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> Path:
    """A byte-level BPE with Qwen3's special and added tokens and pre-tokenizer, QWEN3 as its template."""
    path = tmp_path_factory.mktemp("qwen3")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    text = [json.dumps(c) for c, _ in CHATS] * 4
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                                      "<|im_end|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in
                    ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.save_pretrained(path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": QWEN3}))
    return path


def _kwargs(thinking):
    return None if thinking is None else {"enable_thinking": thinking}


def _expected(ref, chat, end, first, kw):
    """transformers' (ids, mask) of a piece: each trained turn must be in the context inference shows it."""
    msgs, tools = chat["messages"][:end], chat.get("tools")
    text = ref.apply_chat_template(msgs, tools=tools, tokenize=False, **kw)
    spans = []
    for i in range(first, end):
        if msgs[i]["role"] != "assistant":
            continue
        prompt = ref.apply_chat_template(msgs[:i], tools=tools, tokenize=False, add_generation_prompt=True, **kw)
        turn = ref.apply_chat_template(msgs[:i + 1], tools=tools, tokenize=False, **kw)
        assert turn.startswith(prompt) and text.startswith(turn), (i, end)  # the context inference shows
        spans.append((len(prompt), len(turn)))
    enc = ref(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = ref.apply_chat_template(msgs, tools=tools, tokenize=True, return_dict=True, **kw)["input_ids"]
    assert list(ids) == enc["input_ids"]
    return list(ids), [int(any(a <= s and t <= b for a, b in spans)) for s, t in enc["offset_mapping"]]


@pytest.mark.parametrize("thinking", [None, True, False], ids=["default", "thinking", "no-thinking"])
def test_pieces_are_what_inference_shows(qwen3, tmp_path, thinking):
    """Each conversation's pieces (the build's, file order) equal transformers' renders: ids, and a mask of exactly
    the piece's own turns, each after transformers' prompt for it; every assistant turn is trained once. With
    enable_thinking false only the conversation without reasoning is built (the others are refused: below)."""
    ref, tok = AutoTokenizer.from_pretrained(qwen3), load_tokenizer(qwen3, config={})
    assert token_splitter(tok.tok) is not None  # the fast path is the one measured
    chats = CHATS if thinking is not False else [CHATS[3]] * 2
    render = chat_renderer(QWEN3, tok.special_tokens())
    for chat, cuts in chats:
        assert pieces(chat["messages"], chat.get("tools"), render, _kwargs(thinking)) == cuts
        trained = [i for end, first in cuts for i in range(first, end) if chat["messages"][i]["role"] == "assistant"]
        assert trained == [i for i, m in enumerate(chat["messages"]) if m["role"] == "assistant"]
    data = prepare_chat(_write(tmp_path / "c.jsonl", [c for c, _ in chats]), tmp_path / "cache", tok, QWEN3,
                        _kwargs(thinking))
    got = [tuple(a.tolist() for a in s.conversation(j)) for s in (data.train, data.val)
           for j in range(s.n_conversations)]
    kw = {} if thinking is None else {"enable_thinking": thinking}
    want = [_expected(ref, chat, end, first, kw) for chat, cuts in chats for end, first in cuts]
    assert got == want
    for (ids, mask), (chat, end) in zip(got, [(c, e) for c, cuts in chats for e, _ in cuts]):
        shown = tok.tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
        last = chat["messages"][end - 1] if chat["messages"][end - 1]["role"] == "assistant" else None
        if last is not None and not last.get("reasoning_content") and thinking is not False:
            assert shown.startswith("<think>\n\n</think>\n\n")  # the empty block: what Qwen3 writes in thinking mode


@pytest.mark.parametrize("thinking", [None, False], ids=["default", "no-thinking"])
def test_plain_and_fast_paths_agree(qwen3, thinking):
    """ids, masks and errors of every piece, the plain path (the oracle) and the fast twin."""
    tok = load_tokenizer(qwen3, config={})
    render, split = chat_renderer(QWEN3, tok.special_tokens()), token_splitter(tok.tok)
    outcomes = []
    for chat, cuts in CHATS:
        for end, first in cuts:
            args = (chat["messages"][:end], chat.get("tools"), render)
            try:
                want = encode_conversation(*args, lambda t: tok.encode_ids(t, add_special_tokens=False), first,
                                           _kwargs(thinking))
            except ValueError as e:
                want = str(e)
            try:
                got = encode_conversation_fast(*args, split, tok.tok, first, _kwargs(thinking))
            except ValueError as e:
                got = str(e)
            assert got == want
            outcomes.append(want)
    assert sum(isinstance(o, str) for o in outcomes) == (5 if thinking is False else 0)


def test_reasoning_with_thinking_off_is_refused(qwen3, tmp_path):
    """enable_thinking false: the prompt ends in an empty think block, so a turn with reasoning cannot follow it;
    one line naming the file's line and the message."""
    tok = load_tokenizer(qwen3, config={})
    path = _write(tmp_path / "c.jsonl", [CHATS[3][0], CHATS[1][0]])
    with pytest.raises(DataError) as e:
        prepare_chat(path, tmp_path / "cache", tok, QWEN3, {"enable_thinking": False})
    assert str(e.value).startswith(f"{path}:2: messages[1]: the conversation rendered with the generation prompt")
    # the prompt's empty think block where the turn's reasoning goes: the two quoted where they part
    assert ("(the template writes the turn otherwise after it: '\\n</think>\\n\\n' where the conversation has "
            "'colors\\n</think>\\n\\nbrown f'; e.g. ") in str(e.value) and "\n" not in str(e.value)


# DeepSeek-R1's (and its distills') template: the generation prompt opens a think block; a finished turn shows none
R1_STYLE = ("{% for m in messages %}{% if m['role'] == 'user' %}<|im_start|>user\n{{ m['content'] }}<|im_end|>\n"
            "{% else %}<|im_start|>assistant\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")


def test_a_generation_prompt_opening_a_think_block_refuses_plain_answers_naming_it(qwen3, tmp_path):
    """No render of a finished turn extends R1's prompt (it ends in "<think>\n"): every line is refused, plain
    answers too (docs/training.md says so), and the refusal quotes the prompt's "<think>\n" against the turn."""
    tok = load_tokenizer(qwen3, config={})
    path = _write(tmp_path / "c.jsonl", [{"messages": [_u("the dog"), _a("jumps over the fox")]}])
    with pytest.raises(DataError) as e:
        prepare_chat(path, tmp_path / "cache", tok, R1_STYLE)
    assert "after it: '<think>\\n' where the conversation has 'jumps over the fox<|im_e'; e.g. a generation " \
           "prompt that opens a <think> block" in str(e.value)


@pytest.mark.parametrize("content, reasoning", [("42", "42"), ("the answer is 42", "answer is")])
def test_reasoning_check_is_exact(qwen3, tmp_path, content, reasoning):
    """A reasoning equal to its content, or part of it, under a template that shows no reasoning (content only) is
    refused, naming the message, on both paths; under Qwen3's, which shows it, it trains (no false refusal)."""
    tok = load_tokenizer(qwen3, config={})
    chat = {"messages": [_u("what is six times seven"), _a(content, reasoning)]}
    path = _write(tmp_path / "c.jsonl", [CHATS[3][0], chat])
    with pytest.raises(DataError, match=r"c.jsonl:2: messages\[1\].reasoning_content: the chat template does not"):
        prepare_chat(path, tmp_path / "cache", tok, CONTENT_ONLY)
    render = chat_renderer(CONTENT_ONLY, tok.special_tokens())
    with pytest.raises(ValueError, match="reasoning_content: the chat template does not render it"):
        encode_conversation_fast(chat["messages"], None, render, token_splitter(tok.tok), tok.tok)
    with pytest.raises(ValueError, match="reasoning_content: the chat template does not render it"):
        encode_conversation(chat["messages"], None, render, lambda t: tok.encode_ids(t, add_special_tokens=False))
    data = prepare_chat(path, tmp_path / "cache", tok, QWEN3)
    ids, mask = (a.tolist() for a in data.val.conversation(0))
    trained = tok.tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert trained == f"<think>\n{reasoning}\n</think>\n\n{content}<|im_end|>\n"


def test_v32_plain_answer_in_a_thinking_trace_is_refused(v32, tmp_path):  # noqa: F811 (the fixture)
    """DeepSeek-V3.2 thinking mode: a plain answer (no reasoning, no calls) after reasoned turns is refused in one
    line naming it, as the release's encoder refuses it; the reasoned turns before it alone build."""
    tok, enc = load_tokenizer(v32, config={}), ENCODINGS["deepseek_v32"]
    mixed = {"messages": [_u("hello"), _a("world", "a greeting"), _u("again"), _a("world again")]}
    with pytest.raises(DataError) as e:
        prepare_chat(_write(tmp_path / "m.jsonl", [CHATS[1][0], mixed]), tmp_path / "cache", tok, enc,
                     {"thinking": True})
    assert str(e.value).endswith("m.jsonl:2: messages[3]: in thinking mode an assistant turn after the last user "
                                 "turn needs reasoning_content or tool_calls") and "\n" not in str(e.value)
    reasoned = {"messages": mixed["messages"][:2]}
    data = prepare_chat(_write(tmp_path / "r.jsonl", [CHATS[1][0], reasoned]), tmp_path / "cache", tok, enc,
                        {"thinking": True})
    assert data.val.n_conversations == 1
