"""`flyer train --fim-rate R`: each train document, with probability R, rewritten as fill-in-the-middle in the
PSM layout (begin prefix hole suffix end middle, then the document's EOS) before tokenization; split points
drawn at the character level; R = 0 changes nothing; refusals are one line, exit 2."""

import json
import random
from collections import Counter

import numpy as np
import pytest

from flyer.cli import build_parser, check_numbers, main
from flyer.data import find_documents, prepare_data, train_bpe
from flyer.data.fim import DEEPSEEK, QWEN, draw_split, fim_document
from flyer.train import checkpoint as ckpt
from flyer.train.cli import build_train_config
from flyer.train.config import TrainConfig
from tests.bounds import binomial_halfwidth

WORDS = "latent rope key shared expert group node plane tile block scale router bias token layer é 木".split()
# The markers as DeepSeek's tokenizer spells them (U+FF5C, U+2581), written here apart from flyer.data.fim.
BEGIN, HOLE, END = "<\uff5cfim\u2581begin\uff5c>", "<\uff5cfim\u2581hole\uff5c>", "<\uff5cfim\u2581end\uff5c>"


def psm(text: str, i: int, j: int, begin: str = BEGIN, hole: str = HOLE, end: str = END) -> str:
    """The test's own PSM: prefix text[:i], middle text[i:j], suffix text[j:]."""
    return begin + text[:i] + hole + text[j:] + end + text[i:j]


def write_corpus(root, n_docs: int, lines: int = 3, seed: int = 0):
    root.mkdir(parents=True, exist_ok=True)
    r = random.Random(seed)
    for k in range(n_docs):
        text = "\n".join(" ".join(r.choice(WORDS) for _ in range(6)) for _ in range(lines)) + "\n"
        (root / f"doc{k:04d}.txt").write_text(text)
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """24 small documents (about 4 KB): a byte-level BPE of 300 trains on them in milliseconds."""
    return write_corpus(tmp_path_factory.mktemp("fim") / "docs", 24, lines=4)


def build(corpus, cache, **kw):
    return prepare_data(corpus, cache, vocab_size=300, **kw)


def files(d) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name.endswith((".bin", ".json"))
            and p.name != "meta.json"}


def documents(tokens: np.ndarray, eos_id: int) -> list[np.ndarray]:
    """A split's token stream cut after each EOS (every document ends in one)."""
    assert tokens[-1] == eos_id
    cuts = np.flatnonzero(tokens == eos_id) + 1
    return np.split(tokens, cuts)[:-1]


# ---- the transform ------------------------------------------------------------------------------
def test_transform_is_psm_at_the_drawn_split_points():
    r = random.Random(0)
    for k in range(300):
        text = "".join(r.choice("ab é木\n") for _ in range(r.randrange(0, 40)))  # multi-byte characters too
        out = fim_document(text, np.random.default_rng(k), 1.0, DEEPSEEK)
        again = np.random.default_rng(k)
        again.random()  # the Bernoulli draw comes first
        i, j = draw_split(len(text), again)
        assert 0 <= i <= j <= len(text)
        assert out == (psm(text, i, j) if text else "")
        assert fim_document(text, np.random.default_rng(k), 0.0, DEEPSEEK) == text
    assert fim_document("xyz", np.random.default_rng(1), 1.0, QWEN).startswith("<|fim_prefix|>")


def test_split_points_are_two_sorted_uniform_character_positions():
    """n = 3 characters: 4 positions, so (i, j) falls in each of the 10 sorted cells with probability 1/16 (i = j)
    or 2/16; every cell's count is inside Bernstein's bound (union over the cells, 1e-9 overall)."""
    n, draws = 3, 20000
    rng = np.random.default_rng(7)
    counts = Counter(draw_split(n, rng) for _ in range(draws))
    assert set(counts) == {(i, j) for i in range(n + 1) for j in range(i, n + 1)}
    for (i, j), c in counts.items():
        p = (1 if i == j else 2) / (n + 1) ** 2
        assert abs(c - draws * p) < binomial_halfwidth(draws, p, 1e-9 / 10), ((i, j), c, draws * p)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_rate_is_r_within_a_binomial_bound(rate):
    """Per-document streams (seed, index), as prepare_data draws them: the count of rewritten documents is
    Binomial(n, rate); Bernstein's inequality bounds how far a correct sampler strays (1e-9)."""
    n = 20000
    k = sum(fim_document("some text", np.random.default_rng((5, d)), rate, DEEPSEEK) != "some text"
            for d in range(n))
    assert abs(k - n * rate) < binomial_halfwidth(n, rate), (k, n * rate)


# ---- prepared data ------------------------------------------------------------------------------
def test_rate_zero_is_bit_identical_to_a_build_without_the_flag(corpus, tmp_path):
    plain = build(corpus, tmp_path / "a")
    zero = build(corpus, tmp_path / "b", fim_rate=0.0, seed=123)
    assert plain.cache_dir.name == zero.cache_dir.name  # same key: an existing cache is reused as it is
    assert files(plain.cache_dir) == files(zero.cache_dir)
    assert plain.tokenizer.token_to_id(BEGIN) is None


def test_shards_hold_each_document_as_psm_with_single_token_markers_and_eos_last(corpus, tmp_path):
    data = build(corpus, tmp_path, fim_rate=1.0, seed=3)
    tok = data.tokenizer
    ids = [tok.token_to_id(m) for m in (BEGIN, HOLE, END)]
    assert None not in ids and len(set(ids)) == 3
    meta = json.loads((data.cache_dir / "meta.json").read_text())
    by_name = {d.name: d for d in find_documents(corpus)}
    texts = [by_name[n].text() for n in meta["train_documents"]]
    docs = documents(data.train.read(0, len(data.train)), data.eos_id)
    assert len(docs) == len(texts) == meta["fim_train_documents"]
    for text, doc in zip(texts, docs):
        body = doc[:-1].tolist()  # the document's one EOS is its last token, after the middle
        assert data.eos_id not in body
        assert [t for t in body if t in ids] == ids and body[0] == ids[0]  # each marker once, in PSM order
        h, e = body.index(ids[1]), body.index(ids[2])
        prefix, suffix, middle = (tok.decode(body[a:b]) for a, b in ((1, h), (h + 1, e), (e + 1, len(body))))
        assert prefix + middle + suffix == text
        whole = psm(text, len(prefix), len(prefix) + len(middle))
        assert doc.tolist() == tok.encode(whole, add_special_tokens=False).ids + [data.eos_id]
    val = data.val.read(0, len(data.val))  # validation stays left to right
    assert not np.isin(val, ids).any()


@pytest.mark.parametrize("given", [False, True], ids=["flyer_bpe", "deepseek_style"])
@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_a_special_tokens_text_in_a_document_is_text(tmp_path, rate, given):
    """A document that writes "<|endoftext|>" or a FIM marker (code about tokenizers, a scraped page) keeps it as
    text: every document has one EOS, its last token, and under FIM each marker once, in PSM order, its pieces
    decoding to the document (they became control tokens: three EOS in one document, a second HOLE). Also with a
    given tokenizer holding the markers as DeepSeek's does, added tokens that are not special, which
    ``encode_special_tokens`` leaves matched: such documents held marker ids at rate 0 and two HOLEs under FIM; so
    are its chat tokens (``<｜User｜>``), and ``<think>`` elsewhere: text too. A non-special added token that spells
    text (DeepSeek-Coder's "õ", Gemma's "<table>"; "zq" and "<table>" here) is still how the tokenizer writes it."""
    line = "x = '<|endoftext|>' {HOLE} and {END}<|endoftext|> <\uff5cUser\uff5c> <think> zq <table> doc {k}\n"
    docs = write_corpus(tmp_path / "docs", 12, lines=2)
    for k in range(12):
        (docs / f"doc{k:04d}.txt").write_text(line.format(HOLE=HOLE, END=END, k=k))
    kw = {}
    controls = ["<\uff5cUser\uff5c>", "<think>"]
    if given:
        from tokenizers import AddedToken

        tok = train_bpe((p.read_text() for p in sorted(docs.iterdir())), 300)
        tok.add_special_tokens(["<|endoftext|>"])
        tok.add_tokens([AddedToken(m, special=False, normalized=False) for m in (BEGIN, HOLE, END, *controls,
                                                                                  "zq", "<table>")])
        (tmp_path / "tokenizer.json").write_text(tok.to_str())
        kw["tokenizer"] = tmp_path / "tokenizer.json"
    data = build(docs, tmp_path / "cache", fim_rate=rate, seed=2, **kw)
    tok = data.tokenizer
    ids = [tok.token_to_id(m) for m in (BEGIN, HOLE, END)]
    text = [line.format(HOLE=HOLE, END=END, k=k) for k in range(12)]
    if given:  # the chat tokens never come in as ids; the character does
        train = data.train.read(0, len(data.train))
        assert not np.isin(train, [tok.token_to_id(c) for c in controls]).any()
        n_train = len(json.loads((data.cache_dir / "meta.json").read_text())["train_documents"])
        if rate == 0:  # whole documents (a FIM split may cut through a word)
            assert (train == tok.token_to_id("zq")).sum() == (train == tok.token_to_id("<table>")).sum() == n_train
    meta = json.loads((data.cache_dir / "meta.json").read_text())
    for split, names in ((data.train, meta["train_documents"]), (data.val, meta["val_documents"])):
        got = documents(split.read(0, len(split)), data.eos_id)
        assert len(got) == len(names)
        for name, doc in zip(names, got):
            body = doc[:-1].tolist()
            assert data.eos_id not in body
            if rate == 0 or split is data.val:
                assert [t for t in body if t in ids] == [] and tok.decode(body) == text[int(name[3:7])]
                continue
            assert [t for t in body if t in ids] == ids and body[0] == ids[0]
            h, e = body.index(ids[1]), body.index(ids[2])
            prefix, suffix, middle = (tok.decode(body[a:b]) for a, b in ((1, h), (h + 1, e), (e + 1, len(body))))
            assert prefix + middle + suffix == text[int(name[3:7])]


def test_rate_on_prepared_documents_is_r_within_a_binomial_bound(tmp_path):
    n, rate = 200, 0.5
    data = build(write_corpus(tmp_path / "docs", n, lines=1), tmp_path / "cache", fim_rate=rate, seed=11)
    meta = json.loads((data.cache_dir / "meta.json").read_text())
    n_train = len(meta["train_documents"])
    k = int((data.train.read(0, len(data.train)) == data.tokenizer.token_to_id(BEGIN)).sum())
    assert k == meta["fim_train_documents"]
    assert abs(k - n_train * rate) < binomial_halfwidth(n_train, rate), (k, n_train)


def test_same_seed_same_shards_other_seed_or_rate_other_cache(corpus, tmp_path):
    a = build(corpus, tmp_path / "a", fim_rate=0.5, seed=1)
    b = build(corpus, tmp_path / "b", fim_rate=0.5, seed=1)
    assert a.cache_dir.name == b.cache_dir.name and files(a.cache_dir) == files(b.cache_dir)
    c = build(corpus, tmp_path / "a", fim_rate=0.5, seed=2)
    d = build(corpus, tmp_path / "a", fim_rate=1.0, seed=1)
    assert len({a.cache_dir, c.cache_dir, d.cache_dir}) == 3  # the key holds the rate and the seed
    train = {x.cache_dir: x.train.read(0, len(x.train)).tolist() for x in (a, c, d)}
    assert len({tuple(t) for t in train.values()}) == 3


def test_a_given_tokenizer_keeps_its_own_family_of_markers(corpus, tmp_path):
    tok = train_bpe((p.read_text() for p in sorted(corpus.iterdir())), 300)
    tok.add_special_tokens([QWEN.begin, QWEN.hole, QWEN.end])
    path = tmp_path / "tokenizer.json"
    path.write_text(tok.to_str())
    data = build(corpus, tmp_path / "cache", tokenizer=path, fim_rate=1.0)
    train = data.train.read(0, len(data.train))
    assert (train == tok.token_to_id(QWEN.begin)).sum() == json.loads(
        (data.cache_dir / "meta.json").read_text())["fim_train_documents"] > 0
    assert data.vocab_size == tok.get_vocab_size()


# ---- flyer train --------------------------------------------------------------------------------
def argv(out, data, cache, *extra):
    return ["train", "--preset", "tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-every", "2",
            "--eval-batches", "1", "--ckpt-every", "2", "--seed", "3", "--warmup", "1", "--vocab-size", "300",
            "--data", str(data), "--data-cache", str(cache), "--out", str(out), "--no-plots", "--no-progress",
            "--threads", "1", "--device", "cpu", *extra]


def last_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def test_train_with_fim_and_resume_keeps_the_rate(corpus, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(argv(tmp_path / "run", corpus, cache, "--fim-rate", "0.5")) == 0
    (built,) = cache.glob("data-*/meta.json")
    meta = json.loads(built.read_text())
    assert meta["key"]["fim"] == {"rate": 0.5, "seed": 3} and meta["fim_train_documents"] > 0
    capsys.readouterr()
    assert main(argv(tmp_path / "run", corpus, cache, "--fim-rate", "0.2", "--resume")) == 2
    saved = tmp_path / "run" / "checkpoints" / ckpt.step_dir_name(2)
    assert last_error(capsys) == ("flyer: error: --fim-rate: 0.2 differs from the run's fim_rate 0.5 (checkpoint "
                                  f"{saved}); a resumed run keeps the settings it started with")


def test_rate_zero_is_a_valid_flag_and_config_field():
    parser = build_parser()
    args = parser.parse_args(["train", "--fim-rate", "0"])
    check_numbers(parser, args)  # 0 is allowed (--fim-rate is in ZERO_OK)
    tc = build_train_config(args)
    tc.validate()
    assert tc.fim_rate == 0 and TrainConfig().fim_rate == 0


def test_refusals_are_one_line_exit_2(corpus, tmp_path, capsys):
    plain = tmp_path / "tokenizer.json"
    plain.write_text(train_bpe((p.read_text() for p in sorted(corpus.iterdir())), 300).to_str())
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    for extra, words in [
        (["--fim-rate", "1.5"], "--fim-rate: must be in [0, 1] (got 1.5)"),
        (["--fim-rate", "-0.1"], "--fim-rate: must be >= 0 (got -0.1)"),
        (["--fim-rate", "nan"], "--fim-rate: must be a finite number (got nan)"),
        (["--fim-rate", "0.1", "--data", str(chat), "--tokenizer", str(plain)],
         "--fim-rate: rewrites text documents as fill-in-the-middle; chat data (a .jsonl file) takes none (got 0.1)"),
        (["--fim-rate", "0.1", "--tokenizer", str(plain)],
         f"--fim-rate: needs a tokenizer holding one family's three fill-in-the-middle tokens, each one token "
         f"({BEGIN}, {HOLE}, {END} or <|fim_prefix|>, <|fim_suffix|>, <|fim_middle|>); {plain} has no such set"),
    ]:
        assert main(argv(tmp_path / "run", corpus, tmp_path / "cache", *extra)) == 2, extra
        assert last_error(capsys) == f"flyer: error: {words}", extra
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("data-*/meta.json"))
