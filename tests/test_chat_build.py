"""The chat cache's fast build (``flyer.data.chat_encode``: each token encoded once, a prefix's tokens read off
the whole conversation's; runs of lines encoded together, ids and mask written as they come) against the plain
path it replaced (``encode_conversation`` per conversation, every array saved at the end, the key of commit
8587a0f): the same bytes on test_sft's conversations and on many-turn ones, under a template with plain-text
turn headers and a DeepSeek-like one whose headers are special tokens; transformers' ids and assistant masks on
the many-turn ones; the same errors for the same line and turn, the first bad line of a run of lines encoded
together; the plain path wherever the tokenizer model does not hold, and for the conversations of a run the fast
path cannot check; the property of tokenizers the fast path rests on; the build's memory flat in the number of
conversations."""

import errno
import gc
import hashlib
import json
import os
import random
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from jinja2 import TemplateError
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer

from flyer.data import chat_data
from flyer.data.chat_data import CHAT_VERSION, MAX_LINE_BYTES, VAL_EVERY, encode_conversation, prepare_chat
from flyer.data.chat_encode import REASONING_MARK, encode_conversation_fast, reasoning_unshown, token_splitter
from flyer.data.chat_template import chat_renderer
from flyer.errors import FieldError
from flyer.interop.hf_tokenizer import TextTokenizer, load_tokenizer
from tests.hf_models import make_tokenizer
from tests.test_sft import CHATS, TEMPLATE, TOOLS, WORDS

# DeepSeek-V3's shape: turn headers and the assistant's end are special tokens (here the tokenizer's <s> and </s>
# and two added ones), so every prefix ends on a special token and encodes no tail.
DEEPSEEK = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
            "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
            "{% elif m['role'] == 'tool' %}<｜User｜>tool: {{ m['content'] }}"
            "{% else %}<｜Assistant｜>{% generation %}{{ m['content'] or '' }}"
            "{% for c in m['tool_calls'] or [] %}call {{ c['function']['name'] }} {{ c['function']['arguments'] }}"
            "{% endfor %}{{ eos_token }}{% endgeneration %}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}")


def many_turns(n: int, seed: int = 0) -> list[dict]:
    """n conversations of 1-30 user/assistant pairs (a long tail), a system turn in some, tool calls in some."""
    rng = random.Random(seed)
    say = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    out = []
    for c in range(n):
        msgs = [{"role": "system", "content": say(rng.randint(1, 6))}] if c % 4 == 0 else []
        for _ in range(min(30, int(rng.paretovariate(0.8)))):
            msgs.append({"role": "user", "content": say(rng.randint(1, 12))})
            if rng.random() < 0.2:
                call = {"type": "function", "function": {"name": "weather", "arguments": json.dumps({"city": say(1)})}}
                msgs += [{"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "content": say(2)}]
            msgs.append({"role": "assistant", "content": say(rng.randint(1, 25))})
        out.append({"messages": msgs, **({"tools": TOOLS} if c % 3 == 0 else {})})
    return out


MANY = many_turns(60)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A directory with test_sft's byte-level BPE (<s>, </s>: special) plus DeepSeek's two header tokens."""
    path = tmp_path_factory.mktemp("tok")
    make_tokenizer(path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.add_special_tokens(["<｜User｜>", "<｜Assistant｜>"])
    tok.save(str(path / "tokenizer.json"))
    return path


def _tok(hf_dir: Path) -> TextTokenizer:
    return load_tokenizer(hf_dir, config={})


def _render(tok: TextTokenizer, template: str):
    return chat_renderer(template, tok.special_tokens())


def _plain(tok: TextTokenizer):
    return lambda t: tok.encode_ids(t, add_special_tokens=False)


def old_cache(chats: Path, root: Path, tok: TextTokenizer, template: str) -> Path:
    """The cache as commit 8587a0f wrote it (its key, ``encode_conversation`` per line, ``np.save``)."""
    special = tok.special_tokens()
    key_src = {"version": CHAT_VERSION, "file": hashlib.blake2b(chats.read_bytes(), digest_size=16).hexdigest(),
               "max_line": MAX_LINE_BYTES, "val_every": VAL_EVERY,
               "tokenizer": hashlib.blake2b(tok.tok.to_str().encode(), digest_size=16).hexdigest(),
               "template": template, "special": special}
    out = root / f"chat-{hashlib.blake2b(json.dumps(key_src, sort_keys=True).encode(), digest_size=8).hexdigest()}"
    out.mkdir(parents=True)
    render, plain = _render(tok, template), _plain(tok)
    got = [encode_conversation(c["messages"], c.get("tools"), render, plain) for c in map(json.loads, chats.open())]
    np.save(out / "ids.npy", np.concatenate([np.asarray(i, dtype=np.int64) for i, _ in got]))
    np.save(out / "mask.npy", np.concatenate([np.asarray(m, dtype=np.uint8) for _, m in got]))
    np.save(out / "offsets.npy", np.cumsum([0] + [len(i) for i, _ in got]).astype(np.int64))
    meta = {"source": str(chats), "conversations": len(got), "tokens": sum(len(i) for i, _ in got),
            "eos_id": tok.eos_id()}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return out


FILES = ("ids.npy", "mask.npy", "offsets.npy", "meta.json")


@pytest.mark.parametrize("template", [TEMPLATE, DEEPSEEK], ids=["plain-headers", "deepseek"])
@pytest.mark.parametrize("which", ["test_sft", "many"])
def test_build_writes_the_old_builds_bytes_under_the_old_key(hf_dir, tmp_path, monkeypatch, template, which):
    """prepare_chat's files are byte for byte the old build's, in the directory of the old key, and its splits
    are the old reader's; a cache the old build wrote is reused (nothing rendered)."""
    tok = _tok(hf_dir)
    assert token_splitter(tok.tok) is not None  # the fast path is the one measured
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps(c) + "\n" for c in (CHATS if which == "test_sft" else MANY)))
    want = old_cache(chats, tmp_path / "old", tok, template)
    data = prepare_chat(chats, tmp_path / "new", tok, template)
    assert data.cache_dir.name == want.name
    assert all((data.cache_dir / f).read_bytes() == (want / f).read_bytes() for f in FILES)
    ids, mask, offsets = (np.load(want / f"{n}.npy") for n in ("ids", "mask", "offsets"))
    for split, v in ((data.train, False), (data.val, True)):  # the splits, gathered as the old reader did
        convs = [c for c, held in enumerate(chat_data.held_out(len(offsets) - 1)) if held == v]
        assert np.array_equal(split.ids, np.concatenate([ids[offsets[c]:offsets[c + 1]] for c in convs]))
        assert np.array_equal(split.mask, np.concatenate([mask[offsets[c]:offsets[c + 1]] for c in convs]))
        assert np.array_equal(split.offsets, np.cumsum([0] + [offsets[c + 1] - offsets[c] for c in convs]))
        assert (split.ids.dtype, split.mask.dtype, split.offsets.dtype) == (np.int64, np.uint8, np.int64)
    monkeypatch.setattr(chat_data, "_build", None)
    again = prepare_chat(chats, tmp_path / "old", tok, template)
    assert again.cache_dir == want and np.array_equal(again.train.ids, data.train.ids)


@pytest.mark.parametrize("template", [TEMPLATE, DEEPSEEK], ids=["plain-headers", "deepseek"])
def test_many_turns_equal_transformers(hf_dir, tmp_path, template):
    """The fast path's ids and assistant mask are transformers' ``apply_chat_template`` ones on many-turn chats."""
    cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    for f in ("tokenizer.json", "special_tokens_map.json"):
        if (hf_dir / f).is_file():
            (ref_dir / f).write_bytes((hf_dir / f).read_bytes())
    cfg.pop("added_tokens_decoder", None)
    (ref_dir / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    ref = AutoTokenizer.from_pretrained(ref_dir)
    tok = _tok(hf_dir)
    render = _render(tok, template)
    for c in MANY[:20]:
        ids, mask = encode_conversation_fast(c["messages"], c.get("tools"), render, token_splitter(tok.tok), tok.tok)
        want = ref.apply_chat_template(c["messages"], tools=c.get("tools"), tokenize=True, return_dict=True,
                                       return_assistant_tokens_mask=True)
        assert ids == list(want["input_ids"]) and mask == list(want["assistant_masks"])


def _outcome(f):
    try:
        return f()
    except Exception as e:
        return type(e), str(e)


LONG = "{% if add_generation_prompt and messages | length > 5 %}{{ raise_exception('long') }}{% endif %}"


BOT = ("{% if add_generation_prompt %}<|assistant|>", "{% if add_generation_prompt %}<|bot|>")


@pytest.mark.parametrize("base, mutant, words", [
    # a system turn's text changed (same length) before the prefix's last special token: not a string prefix
    (DEEPSEEK, [("{{ m['content'] }}{% elif m['role'] == 'user' %}", "{{ m['content'] | upper if "
                 "add_generation_prompt else m['content'] }}{% elif m['role'] == 'user' %}")],
     "rendered with the generation prompt"),
    (TEMPLATE, [BOT], "rendered with the generation prompt"),  # the head's tail is not the whole's
    # a string prefix whose last " " is a token, where the whole has " the"
    (TEMPLATE, [("{{ eos_token }}{% endgeneration %}", "{{ eos_token }} {% endgeneration %}"),
                ("{% else %}<|{{ m['role'] }}|>", "{% else %}the {{ m['role'] }}:")], "rendered through it"),
    (TEMPLATE, [("{% for m in messages %}", LONG + "{% for m in messages %}")], "long"),  # a later prefix's render
    # both: an earlier turn's prefix error comes first
    (TEMPLATE, [("{% for m in messages %}", LONG + "{% for m in messages %}"), BOT], "rendered with the generation"),
])
def test_errors_are_the_plain_paths(hf_dir, base, mutant, words):
    """A template the plain path refuses (a prefix that does not encode to a prefix, a render error) gives the
    fast path the same error for the same turn: the earliest turn's, prefix checks before a later render."""
    tok = _tok(hf_dir)
    template = base
    for old, new in mutant:
        assert old in template
        template = template.replace(old, new)
    render, plain = _render(tok, template), _plain(tok)
    split = token_splitter(tok.tok)
    errors = []
    for c in CHATS + MANY:
        args = (c["messages"], c.get("tools"), render)
        want = _outcome(lambda: encode_conversation(*args, plain))
        assert _outcome(lambda: encode_conversation_fast(*args, split, tok.tok)) == want
        errors += [want[1]] if isinstance(want[0], type) else []
    assert errors and all(words in e for e in errors), errors[:3]


def test_plain_path_where_the_model_does_not_hold(hf_dir, tmp_path):
    """No splitter for a tokenizer with truncation, an added token that strips or matches whole words,
    ``encode_special_tokens``, BPE dropout or Metaspace's prepend-to-the-first-piece; a splitter that cuts where
    the tokenizer does not (a match that is not one token of the whole) gives None: the build takes the plain
    path, and its bytes are the old build's."""
    tok = _tok(hf_dir)
    for change in (lambda t: t.enable_truncation(8),
                   lambda t: t.add_tokens([AddedToken("<x>", rstrip=True, normalized=False)]),
                   lambda t: t.add_tokens([AddedToken("<y>", single_word=True, normalized=False)]),
                   lambda t: setattr(t, "encode_special_tokens", True), lambda t: setattr(t.model, "dropout", 0.1)):
        t = Tokenizer.from_str(tok.tok.to_str())
        change(t)
        assert token_splitter(t) is None
    meta = Tokenizer(models.BPE())
    meta.add_special_tokens(["</s>"])
    meta.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    assert token_splitter(meta) is None
    meta.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    assert token_splitter(meta) is not None
    render, plain = _render(tok, TEMPLATE), _plain(tok)
    wrong = re.compile("e|</s>")  # cuts inside words: BPE pieces differ
    c = CHATS[1]
    assert encode_conversation_fast(c["messages"], None, render, wrong, tok.tok) is None
    assert encode_conversation_fast(c["messages"], None, render, token_splitter(tok.tok), tok.tok) == \
        encode_conversation(c["messages"], None, render, plain)
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps(c) + "\n" for c in CHATS[:6]))
    tok.tok.add_tokens([AddedToken("<x>", rstrip=True, normalized=False)])  # the plain path, through prepare_chat
    want = old_cache(chats, tmp_path / "old", tok, TEMPLATE)
    data = prepare_chat(chats, tmp_path / "new", tok, TEMPLATE)
    assert all((data.cache_dir / f).read_bytes() == (want / f).read_bytes() for f in FILES)


def test_build_memory_is_flat_in_the_conversations(hf_dir, tmp_path, monkeypatch):
    """The build's peak Python/numpy allocation (tracemalloc) grows with the conversations by what their offsets
    hold, not with the tokens: per extra conversation (one sample each here) at most 64 bytes (a Python int and its
    list slot, the owner array's 8 bytes, the final int64 array's 8), plus 32 KiB for the peak's own noise (where
    the collector runs within a run: repeated builds of one file differ by up to ~18 KB). The old build, holding
    every array, grows by 10x that and more (about 9 bytes a token, ~430 tokens a conversation here). The lines
    are encoded in runs of ``BATCH_BYTES``, here the bytes of the 20 conversations the file repeats: every run
    holds the same 20."""
    tok = _tok(hf_dir)
    lines = [json.dumps(MANY[c % 20]) + "\n" for c in range(320)]
    monkeypatch.setattr(chat_data, "BATCH_BYTES", len("".join(lines[:20]).encode()))
    peaks = []
    for n in (80, 320):
        chats = tmp_path / f"chats{n}.jsonl"
        chats.write_text("".join(lines[:n]))
        out = tmp_path / f"out{n}"
        out.mkdir()
        chat_data._build(out, chats, tok, DEEPSEEK, tok.special_tokens())  # warm: the template compiled, caches
        gc.collect()  # garbage left by the warm build is not this build's
        tracemalloc.start()
        chat_data._build(out, chats, tok, DEEPSEEK, tok.special_tokens())
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        tokens = json.loads((out / "meta.json").read_text())["tokens"]
    allowed = 64 * 240 + 32 * 1024
    assert peaks[1] - peaks[0] < allowed, (peaks, tokens)
    assert tokens * 9 * 240 / 320 > 10 * allowed  # what the old build holds for the 240 more: far more


def test_column_writes_np_saves_bytes(tmp_path):
    """An incrementally written .npy (ids, mask: appended conversation by conversation) is np.save's file."""
    rng = np.random.default_rng(0)
    for dtype, n in ((np.int64, 0), (np.int64, 1), (np.uint8, 1000), (np.int64, 12345)):
        a = rng.integers(0, 200, size=n).astype(dtype)
        col = chat_data._Column(tmp_path / "a.npy", dtype)
        for part in np.array_split(a, 7):
            col.append(part.tolist())
        col.close()
        np.save(tmp_path / "b.npy", a)
        assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()


def _metaspace_tokenizer() -> Tokenizer:
    """A second model the module doc's argument covers: NFKC, Metaspace prepending to every piece, a BPE trained
    on WORDS, the same special tokens as hf_dir's."""
    from tokenizers import normalizers, trainers

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.normalizer = normalizers.NFKC()
    t.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    t.train_from_iterator([" ".join(WORDS)] * 4, trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "<｜User｜>", "<｜Assistant｜>"], show_progress=False))
    return t


@pytest.mark.parametrize("which", ["byte-level", "metaspace"])
def test_pieces_concatenate_to_the_whole(hf_dir, which):
    """The property the fast path rests on without re-checking it (chat_encode's module doc), on the tests'
    tokenizers: a text's ids are its pieces' (cut at the added tokens' matches) concatenated, and every rendered
    prefix that is a string prefix of the whole encodes to the whole's tokens before its last match plus its tail."""
    t = _tok(hf_dir).tok if which == "byte-level" else _metaspace_tokenizer()
    split = token_splitter(t)
    assert split is not None
    enc = lambda s: t.encode(s, add_special_tokens=False).ids  # noqa: E731
    special = {"bos_token": "<s>", "eos_token": "</s>"}
    checked = 0
    for template in (TEMPLATE, DEEPSEEK):
        render = chat_renderer(template, special)
        for c in CHATS[:20] + MANY[:16]:
            msgs, tools = c["messages"], c.get("tools")
            whole = render(msgs, tools, add_generation_prompt=False)
            cuts = sorted({0, len(whole), *(i for m in split.finditer(whole) for i in m.span())})
            ids = enc(whole)
            assert [i for a, b in zip(cuts, cuts[1:]) for i in enc(whole[a:b])] == ids
            ends = [m.end() for m in split.finditer(whole)]
            for k in range(1, len(msgs) + 1):
                for gen in (True, False):
                    h = render(msgs[:k], tools, add_generation_prompt=gen)
                    if whole.startswith(h):
                        b = max([e for e in ends if e <= len(h)], default=0)
                        assert enc(h) == enc(whole[:b]) + enc(h[b:])
                        assert enc(whole[:b]) == ids[:len(enc(whole[:b]))]
                        checked += 1
    assert checked > 500


def test_runs_fall_back_conversation_by_conversation(hf_dir, tmp_path):
    """A run where the fast path gives None for some conversations (a splitter that also cuts at a word, which
    the tokenizer does not: its token is " checkpoints") writes the plain path's ids and mask for every
    conversation, in order."""
    tok = _tok(hf_dir)
    render, plain = _render(tok, TEMPLATE), _plain(tok)
    convs = CHATS[:10] + MANY[:10]
    run = [(n + 1, json.dumps(c).encode()) for n, c in enumerate(convs)]
    split = re.compile(token_splitter(tok.tok).pattern + "|checkpoints")
    fast = chat_data.encode_conversations([(c["messages"], c.get("tools")) for c in convs], render, split, tok.tok)
    assert None in fast and any(f is not None for f in fast)  # both routes in one run
    ids, mask, lengths, _ = chat_data._encode_run(run, tmp_path / "x.jsonl", render, split, tok.tok, plain)
    want = [encode_conversation(c["messages"], c.get("tools"), render, plain) for c in convs]
    assert lengths == [len(i) for i, _ in want]
    assert ids.tolist() == [x for i, _ in want for x in i] and mask.tolist() == [x for _, m in want for x in m]


@pytest.mark.parametrize("lines, bad", [
    (["ok", "long", "ok", "json"], 2),  # a template error before a bad line in the same run
    (["ok", "json", "long", "ok"], 2),  # a bad line before a template error
    (["ok", "ok", "long", "huge"], 3),  # a template error before a line over MAX_LINE_BYTES
    (["ok", "ok", "ok", "huge"], 4),
])
def test_a_runs_first_bad_line_is_named(hf_dir, tmp_path, lines, bad):
    """Lines are encoded in runs (``BATCH_BYTES``); the error is the first bad line's in file order, as when each
    line is encoded alone."""
    tok = _tok(hf_dir)
    template = LONG + TEMPLATE
    text = {"ok": json.dumps(CHATS[1]), "long": json.dumps(MANY[2]), "json": "{not json",
            "huge": "x" * (MAX_LINE_BYTES + 1)}
    assert len(MANY[2]["messages"]) > 5 >= len(CHATS[1]["messages"])  # LONG raises on "long" only
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(text[k] + "\n" for k in lines))
    with pytest.raises(chat_data.DataError, match=rf"chats.jsonl:{bad}: "):
        prepare_chat(chats, tmp_path / "cache", tok, template)


def test_no_splitter_for_an_added_token_that_strips_left_or_a_padding_tokenizer():
    """The fast path splits on added tokens only where they match as written: an added token that strips its left
    whitespace, or a tokenizer that pads, takes the plain path (no splitter)."""
    def tok():
        t = Tokenizer(models.BPE())
        t.add_special_tokens(["</s>"])
        return t
    assert token_splitter(tok()) is not None
    left = tok()
    left.add_tokens([AddedToken("<z>", lstrip=True, normalized=False)])
    assert token_splitter(left) is None
    padded = tok()
    padded.enable_padding(length=8)
    assert token_splitter(padded) is None


def _drop_reasoning(messages, tools, add_generation_prompt=False, extra=None):
    """A template that renders only each message's content (never its reasoning)."""
    return "".join(f"<{m['role']}>{m.get('content') or ''}" for m in messages) + ("<assistant>" if add_generation_prompt
                                                                                   else "")


def test_whitespace_only_reasoning_is_not_refused_when_the_template_drops_it():
    """A reasoning_content of only whitespace counts as empty (templates strip it): it is not refused as unshown,
    even by a template that never renders reasoning; a real reasoning there is refused."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "reasoning_content": " \n\t "}]
    head = _drop_reasoning(msgs[:1], None, add_generation_prompt=True)
    assert reasoning_unshown(msgs, 1, None, _drop_reasoning, None, head) is None
    msgs[1]["reasoning_content"] = "think"
    assert "does not render it" in reasoning_unshown(msgs, 1, None, _drop_reasoning, None, head)
    assert REASONING_MARK not in _drop_reasoning(msgs, None)


def test_reasoning_mark_counts_only_after_the_turns_head():
    """The reasoning check looks for the mark only after the conversation's head: a mark's text earlier in the
    conversation (here a user's message quoting it) does not make a dropped reasoning count as shown."""
    msgs = [{"role": "user", "content": REASONING_MARK},
            {"role": "assistant", "content": "yo", "reasoning_content": "r"}]
    head = _drop_reasoning(msgs[:1], None, add_generation_prompt=True)
    assert "does not render it" in reasoning_unshown(msgs, 1, None, _drop_reasoning, None, head)


@pytest.mark.parametrize("gen_prompt, want_type, words", [
    ("<|assistant|>", TemplateError, "no mark here"),  # the turn's prefixes pass: the render error itself
    ("<|bot|>", ValueError, "rendered with the generation prompt"),  # the turn's prefix check fails first
], ids=["render-error", "prefix-first"])
def test_a_render_error_of_the_reasoning_check_comes_as_on_the_plain_path(hf_dir, gen_prompt, want_type, words):
    """A template that fails only when rendering the reasoning check's mark: the fast path raises that render
    error itself (its type and message, not a ValueError of its text), and only after the turn's prefix checks
    (a head that is not a prefix is the ValueError raised), as the plain path does."""
    tok = _tok(hf_dir)
    old, prompt = "{% if m['role'] == 'assistant' %}<|assistant|>", "{% if add_generation_prompt %}<|assistant|>"
    assert old in TEMPLATE and prompt in TEMPLATE
    bad = "{% if m['reasoning_content'] == '" + REASONING_MARK + "' %}{{ raise_exception('no mark here') }}{% endif %}"
    template = TEMPLATE.replace(old, old + bad).replace(prompt, "{% if add_generation_prompt %}" + gen_prompt)
    render = _render(tok, template)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "reasoning_content": "think"}]
    want = _outcome(lambda: encode_conversation(msgs, None, render, _plain(tok)))
    assert want[0] is want_type and words in want[1]
    assert _outcome(lambda: encode_conversation_fast(msgs, None, render, token_splitter(tok.tok), tok.tok)) == want


def test_a_full_disk_while_building_is_one_line_naming_the_cache_and_leaves_nothing(hf_dir, tmp_path, monkeypatch):
    """The second run of lines' write fails for space, and so does the close that flushes it (as a full disk fails
    both): a ``FieldError`` naming --data-cache and the cause (it was the bare OSError: a traceback and exit 1), no
    column file left behind (discarding one whose close failed kept it), no meta.json; the build then runs whole."""
    monkeypatch.setattr(chat_data, "BATCH_BYTES", 1)  # a run a line: the second append is the second line's
    tok = _tok(hf_dir)
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps(c) + "\n" for c in MANY[:6]))
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    append, calls = chat_data._Column.append, []

    def fill(self, values):
        calls.append(self.path.name)
        if len(calls) <= 2:
            return append(self, values)
        real = self.f

        class Full:  # the file whose buffered bytes cannot be flushed
            def close(self):
                real.close()
                raise full
        self.f = Full()
        raise full

    with monkeypatch.context() as m:
        m.setattr(chat_data._Column, "append", fill)
        with pytest.raises(FieldError) as e:
            prepare_chat(chats, tmp_path / "cache", tok, TEMPLATE)
    out = next((tmp_path / "cache").iterdir())
    assert e.value.field == "data_cache" and str(e.value.problem) == (f"cannot write the data cache {out} "
                                                                      f"({os.strerror(errno.ENOSPC)})"), e.value
    assert sorted(f.name for f in out.iterdir()) == [".lock"]
    data = prepare_chat(chats, tmp_path / "cache", tok, TEMPLATE)
    assert data.cache_dir == out and len(data.train.offsets) + len(data.val.offsets) == 6 + 2
