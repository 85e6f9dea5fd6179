"""Kimi's cut of long runs before tiktoken (``flyer.data.presplit``): a Kimi directory whose remote
tokenization_kimi.py defines ``_split_whitespaces_or_nonwhitespaces`` encodes as its ``encode`` does, checked
against tiktoken.Encoding (Kimi's pattern and special tokens) run on a reference cut written here from the spec,
piece by piece, on the segments between special tokens transformers hands that encode: long non-whitespace and
whitespace runs, a run a special token ends, text over 400,000 characters, mixed text; ordinary text as plain
tiktoken; the pretraining and chat data builds as encode_ids.
Tiny vocabularies trained here, nothing downloaded."""

import json
import random
import re

import numpy as np
import pytest

from flyer.data import find_documents, prepare_data
from flyer.data.chat_data import encode_conversation, prepare_chat
from flyer.data.chat_encode import encode_conversations, token_splitter
from flyer.data.chat_template import chat_renderer
from flyer.data.presplit import PreSplit, encode_batch, presplit_of, set_presplit
from flyer.data.tokenizer import load_tokenizer as load_tokenizer_file
from flyer.errors import CheckpointError
from flyer.interop.hf_tokenizer import load_tokenizer
from tests.test_hf_tiktoken import KIMI_PATTERN, KIMI_SPECIAL, TEXTS, _texts, _tiktoken, _train, write_dir

# what flyer reads of Kimi's encode: the cutting method's name and the two limits, locals of its encode (the
# bodies here are stand-ins; flyer never runs remote code)
CUT = '''
    def encode(self, text, allow_special_tokens=True, **kwargs):
        TIKTOKEN_MAX_ENCODE_CHARS = {max_chars}
        MAX_NO_WHITESPACES_CHARS = {max_run}
        return []

    @staticmethod
    def _split_whitespaces_or_nonwhitespaces(s, max_consecutive_slice_len):
        """Stand-in."""
        yield s
'''


def kimi_pieces(text: str, max_chars: int = 400_000, max_run: int = 25_000, specials=()) -> list[str]:
    """The reference cut, a character at a time from the spec: the text cut at ``specials`` first (transformers'
    added-token split, the longest at each position), each special a piece; each segment between them cut as Kimi's
    encode cuts: chunks of ``max_chars``; in each, a new piece wherever the run of whitespace / non-whitespace
    characters (str.isspace) would pass ``max_run``, the count restarting at a cut and at each flip."""
    if specials:
        parts = re.split("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")", text)
        return [p for i, part in enumerate(parts) if part
                for p in ([part] if i % 2 else kimi_pieces(part, max_chars, max_run))]
    out = []
    for c in range(0, len(text), max_chars):
        chunk = text[c:c + max_chars]
        start, count, space = 0, 0, None
        for i, ch in enumerate(chunk):
            if ch.isspace() != space:
                count, space = 1, ch.isspace()
                continue
            count += 1
            if count > max_run:
                out.append(chunk[start:i])
                start, count = i, 1
        out.append(chunk[start:])
    return out


def write_kimi(out, ranks, special=KIMI_SPECIAL, max_chars=400_000, max_run=25_000):
    d = write_dir(out, ranks, special)
    p = d / "tokenization_kimi.py"
    p.write_text(p.read_text() + CUT.format(max_chars=max_chars, max_run=max_run))
    return d


@pytest.fixture(scope="module")
def ranks():
    return _train(640)


@pytest.fixture(scope="module")
def kimi(ranks, tmp_path_factory):
    return write_kimi(tmp_path_factory.mktemp("kimi"), ranks)


@pytest.fixture(scope="module")
def enc(ranks):
    return _tiktoken(ranks, KIMI_PATTERN, KIMI_SPECIAL)


def oracle(enc, text: str, **limits) -> list[int]:
    return [i for p in kimi_pieces(text, **limits, specials=enc.special_tokens_set)
            for i in enc.encode(p, allowed_special="all")]


def long_texts() -> dict[str, str]:
    """Texts whose cut changes tiktoken's ids (the test asserts it), each cut somewhere in a pre-tokenizer match."""
    rng = random.Random(0)  # a blob of words the vocabulary holds, so that a cut in one changes its tokens
    blob = "".join(rng.choice(["The", "quick", "brown", "Words", "In", "Camel", "Case", "123", "+/", "fox", "the"])
                   for _ in range(15_000))
    return {
        "non-whitespace 60k": "the" * 20_000,  # cut at 25,000 and 50,000: inside a "the"
        "blob 55k": "data:" + blob + "== end",
        "whitespace 30k": "x\n" + " " * 30_000 + "y",  # the newline's own match ends before the cut
        "mixed whitespace": "a" + "\r\n    " * 5_000 + "b",
        "ideographic spaces and Han": "x" + "\u3000" * 26_001 + "文" + "中文" * 15_000,
        "run after a special token": "the" * 6_000 + "<|im_end|>" + "xy" + "the" * 9_000,  # its count starts after it
        "over 400k, cut mid-word": ("The quick brown fox, " * 20_000)[:410_000],  # 400,000 is inside "brown"
        "mixed": " ".join(TEXTS) + "-" * 26_000 + " ".join(TEXTS) + "\r\n    " * 5_000 + "the" * 9_000 + "[BOS]"
                 + "\t" * 25_000 + "z",
    }


def test_spans_are_the_reference_cut_on_random_text():
    """``PreSplit.spans`` (a regex over run starts) cuts as the reference loop does, with small limits so that
    every case is hit: runs of exactly the limit and one over it, runs across a chunk's start, empty text; special
    tokens (adjacent, overlapping, at either end) each a piece, the segments between them cut alone."""
    rng = random.Random(1)
    for _ in range(3000):
        specials = rng.choice(((), ("<s>",), ("<s>", "<s>x", "y")))
        ps = PreSplit(max_chars=rng.randint(1, 40), max_run=rng.randint(1, 9), specials=specials)
        text = "".join(rng.choice(("a", "b", " ", "\t", "\n", "\u3000", "中", "<s>", "x", "y"))
                       * rng.choice((1, 1, 3, 8)) for _ in range(rng.randint(0, 20)))
        spans = ps.spans(text)
        assert [a for a, _ in spans[1:]] == [b for _, b in spans[:-1]] and (not spans or spans[-1][1] == len(text))
        pieces = kimi_pieces(text, ps.max_chars, ps.max_run, specials)
        edges = {0, len(text)} | {i for m in re.finditer("|".join(map(re.escape, sorted(specials, key=len,
                                                                                      reverse=True))) or "$^", text)
                                 for i in m.span()}  # where the tokenizer cuts anyway
        want = {sum(map(len, pieces[:k])) for k in range(len(pieces))} - edges
        assert {a for a, _ in spans} - edges == want, (text, ps)


@pytest.mark.parametrize("name", list(long_texts()))
def test_long_runs_encode_as_kimis_encode(kimi, enc, name):
    """flyer's tokenizer of the directory gives Kimi's ids (its cut, then tiktoken per piece), which differ from
    tiktoken's on the whole text; the text decodes back."""
    text = long_texts()[name]
    tok = load_tokenizer(kimi, {})
    assert presplit_of(tok.tok).max_chars == 400_000 and presplit_of(tok.tok).max_run == 25_000
    want = oracle(enc, text)
    assert want != enc.encode(text, allowed_special="all")  # the cut matters here
    ids = tok.encode_ids(text)
    assert ids == want
    assert tok.encode_ids(text, add_special_tokens=False) == want
    assert tok.tok.decode(ids, skip_special_tokens=False) == enc.decode(want)


def test_a_special_token_restarts_the_count(kimi, enc):
    """transformers hands Kimi's encode the text between special tokens, so a run's count starts after one: not
    where ``encode(text)`` alone, counting through it, would cut."""
    text = long_texts()["run after a special token"]
    through = [i for p in kimi_pieces(text) for i in enc.encode(p, allowed_special="all")]
    assert load_tokenizer(kimi, {}).encode_ids(text) == oracle(enc, text) != through


def test_ordinary_text_is_one_piece_as_plain_tiktoken(kimi, ranks, enc):
    tok = load_tokenizer(kimi, {})
    for text in _texts(len(ranks)) + [" ".join(TEXTS) * 100]:  # the last: 60,000 characters of short runs
        assert len(kimi_pieces(text)) <= 1
        assert tok.encode_ids(text) == enc.encode(text, allowed_special="all"), text


def test_limits_are_read_from_the_remote_code(ranks, tmp_path):
    """The limits are the remote module's constants (here 300 and 7); a directory whose remote code has no cut,
    or a tokenizer.json, encodes whole; a cut whose limits flyer cannot read is a one-line error."""
    small = load_tokenizer(write_kimi(tmp_path / "small", ranks, max_chars=300, max_run=7), {})
    enc = _tiktoken(ranks, KIMI_PATTERN, KIMI_SPECIAL)
    assert (presplit_of(small.tok).max_chars, presplit_of(small.tok).max_run) == (300, 7)
    assert set(presplit_of(small.tok).specials) == enc.special_tokens_set
    rng = random.Random(2)
    words = " ".join(TEXTS).split(" ")
    for _ in range(200):
        text = "".join(rng.choice(words) + rng.choice(["", " ", "  \n\t  ", "<|im_end|>"]) for _ in range(60))
        assert small.encode_ids(text) == oracle(enc, text, max_chars=300, max_run=7), text

    plain = write_dir(tmp_path / "plain", ranks, KIMI_SPECIAL)  # test_hf_tiktoken's remote code: no cut
    assert presplit_of(load_tokenizer(plain, {}).tok) is None
    small.tok.save(str(tmp_path / "tokenizer.json"))
    assert presplit_of(load_tokenizer_file(tmp_path / "tokenizer.json")) is None

    bad = write_kimi(tmp_path / "bad", ranks)
    p = bad / "tokenization_kimi.py"
    p.write_text(p.read_text().replace("MAX_NO_WHITESPACES_CHARS = 25000", "MAX_NO_WHITESPACES_CHARS = limit"))
    with pytest.raises(CheckpointError) as e:
        load_tokenizer(bad, {})
    assert "MAX_NO_WHITESPACES_CHARS is not one positive integer" in str(e.value) and "\n" not in str(e.value)


def test_batch_encodings_have_the_whole_texts_offsets(kimi):
    """``encode_batch`` of texts cut in pieces: each text's ids are encode_ids', its offsets the pieces' shifted to
    where each starts, ``char_to_token`` of a piece's start its first token."""
    tok = load_tokenizer(kimi, {}).tok
    texts = list(long_texts().values())[:4] + ["", "short text"]
    encs = encode_batch(tok, texts, add_special_tokens=False)
    ps = presplit_of(tok)
    for text, e in zip(texts, encs):
        assert e.ids == load_tokenizer(kimi, {}).encode_ids(text)
        offsets, firsts = [], []
        for a, b in ps.spans(text):
            firsts.append(len(offsets))
            offsets += [(a + s, a + t) for s, t in tok.encode(text[a:b], add_special_tokens=False).offsets]
        assert e.offsets == offsets
        assert [e.char_to_token(a) for a, _ in ps.spans(text)] == firsts


def test_pretraining_data_is_encode_ids(kimi, tmp_path):
    """``prepare_data`` with the directory's tiktoken.model writes each document as encode_ids gives it; its cache
    key tells the cut apart (the same ranks without it: another build)."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, text in enumerate([long_texts()["non-whitespace 60k"], "plain words here\n", long_texts()["blob 55k"],
                              "the" * 9_000 + " tail\n"]):
        (docs / f"{i}.txt").write_text(text)
    data = prepare_data(docs, tmp_path / "cache", tokenizer=kimi / "tiktoken.model", val_fraction=0.3)
    tok = load_tokenizer(kimi, {})
    meta = json.loads((data.cache_dir / "meta.json").read_text())
    by_name = {d.name: d for d in find_documents(docs)}
    for split, names in ((data.train, meta["train_documents"]), (data.val, meta["val_documents"])):
        want = [i for n in names for i in tok.encode_ids(by_name[n].text()) + [data.eos_id]]
        assert split.read(0, len(split)).tolist() == want
    plain = write_dir(tmp_path / "plain", _train(640), KIMI_SPECIAL)
    other = prepare_data(docs, tmp_path / "cache", tokenizer=plain / "tiktoken.model", val_fraction=0.3)
    assert other.cache_dir != data.cache_dir


# plain-text turn ends: a turn's tail after its last special token is encoded on its own by the fast build
PLAIN_ENDS = ("{%- for m in messages -%}<|im_{{ m.role }}|>{{ m.role }}<|im_middle|>{{ m.content }}\n{%- endfor -%}"
              "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}")
CHATS = [[{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello you"}],
         [{"role": "user", "content": "z" * 30_000}, {"role": "assistant", "content": "ok then"}],
         [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "xy" + "the" * 10_000}],
         [{"role": "user", "content": "a b c"}, {"role": "assistant", "content": "d e"},
          {"role": "user", "content": "f"}, {"role": "assistant", "content": "g h"}]]


def test_chat_data_is_encode_ids(kimi, enc, tmp_path):
    """The chat build's ids and masks are the plain path's (encode_ids of each render), its ids Kimi's; the fast
    twin leaves a conversation cut in pieces to the plain path (a tail's run count starts before the tail)."""
    tok = load_tokenizer(kimi, {})
    render = chat_renderer(PLAIN_ENDS, tok.special_tokens())
    split = token_splitter(tok.tok)
    assert split is not None
    fast = encode_conversations([(c, None) for c in CHATS], render, split, tok.tok)
    assert [f is None for f in fast] == [False, True, True, False]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    data = prepare_chat(path, tmp_path / "cache", tok, PLAIN_ENDS)
    ids, mask, offsets = (np.load(data.cache_dir / f"{n}.npy") for n in ("ids", "mask", "offsets"))
    assert len(offsets) == len(CHATS) + 1
    for c, msgs in enumerate(CHATS):
        whole = render(msgs, None, add_generation_prompt=False)
        want_ids, want_mask = encode_conversation(msgs, None, render, lambda t: tok.encode_ids(t, False))
        assert ids[offsets[c]:offsets[c + 1]].tolist() == want_ids == oracle(enc, whole)
        assert mask[offsets[c]:offsets[c + 1]].tolist() == want_mask and sum(want_mask) > 0
    long = render(CHATS[2], None, add_generation_prompt=False)
    assert oracle(enc, long) != enc.encode(long, allowed_special="all")  # the conversation the cut changes
    plain = load_tokenizer(write_dir(tmp_path / "plain", _train(640), KIMI_SPECIAL), {})  # the same, uncut
    assert prepare_chat(path, tmp_path / "cache", plain, PLAIN_ENDS).cache_dir != data.cache_dir


def test_set_presplit_none_encodes_whole(kimi, enc):
    """The recorded cut is what the encoders follow: cleared, the tokenizer encodes as tiktoken on the whole text."""
    tok = load_tokenizer(kimi, {})
    text = long_texts()["non-whitespace 60k"]
    set_presplit(tok.tok, None)
    assert tok.encode_ids(text) == enc.encode(text, allowed_special="all")
