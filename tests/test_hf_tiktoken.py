"""tiktoken-format tokenizers (Kimi K2 / K2-Thinking / K2.5: ``tiktoken.model``, special tokens in
tokenizer_config.json, the Han-aware ``pat_str`` in the remote ``tokenization_kimi.py``), read by
``flyer.data.tiktoken_file``: encodes as ``tiktoken.Encoding`` (what Kimi's remote tokenizer runs) and as
transformers' converter and AutoTokenizer; generate, export (the directory's tokenizer files as they are, which
transformers' converter reads as flyer does) and train's data path read it; bad files are one-line errors naming
file and line. Tiny vocabularies trained here, nothing downloaded."""

import base64
import json

import pytest
import tiktoken
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter, bytes_to_unicode

from flyer.cli import main
from flyer.data.chat_data import prepare_chat
from flyer.data.chat_template import chat_renderer, read_chat_template
from flyer.data.prepare import prepare_data
from flyer.data.tiktoken_file import DEFAULT_PATTERN, bpe_from_ranks
from flyer.errors import CheckpointError
from flyer.interop.export import export
from flyer.interop.hf import load_hf
from flyer.interop.hf_tokenizer import load_tokenizer
from flyer.interop.load import init_source
from flyer.serve.api import Api, ChatBody
from tests.test_hf_kimi_k25 import build

# Kimi K2's pat_str as its tokenization_kimi.py spells it: Han runs alone; letter runs split at a lower-to-upper
# case change (Kimi's, not cl100k's); digits by three
KIMI_PARTS = [
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n]*""", r"""\s*[\r\n]+""", r"""\s+(?!\S)""", r"""\s+"""]
KIMI_PATTERN = "|".join(KIMI_PARTS)
# a remote-code module as Kimi's names its pattern (only what flyer reads of it: the class's pat_str, and a
# pre_tokenizer_process that leaves the text as it is)
REMOTE = '''import tiktoken

class TikTokenTokenizer:
    num_reserved_special_tokens = 256
    pat_str = "|".join(
        [
{parts}
        ]
    )

    def pre_tokenizer_process(self, text):
        """The text, unsplit."""
        return [text]
'''
# Kimi K2's special tokens, at their offsets from the end of the ranks (163584 + offset in the release)
KIMI_SPECIAL = {0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
                6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>",
                11: "<|tool_calls_section_begin|>", 12: "<|tool_calls_section_end|>", 13: "<|tool_call_begin|>",
                14: "<|tool_call_argument_begin|>", 15: "<|tool_call_end|>", 17: "<|im_middle|>", 254: "[UNK]",
                255: "[PAD]"}
TEMPLATE = ("{%- for m in messages -%}<|im_{{ m.role }}|>{{ m.role }}<|im_middle|>{{ m.content }}<|im_end|>"
            "{%- endfor -%}{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}")
CORPUS = ["The quick brown fox jumps over the lazy dog's back; it's 2024 and we're 12345 strong!",
          "中文分词测试：我们今天去北京大学看看。汉字和English混合的 text 在这里。",
          "日本語のテキストと한국어 문장도 있어요.",
          "def tokenize(text):\n    return [t for t in text.split()]  # a comment\r\n\t\tindented",
          "HelloWorld CamelCaseWords ALLCAPS iPhone McDonald's DON'T I'M you'LL", "emoji 🙂🚀👍🏽 café naïve Ünïcödé",
          "numbers 3.14159 1,000,000 0x1F 2026-12-04", "    spaces     and\n\n\nnewlines\t\ttabs  \u3000ideographic"]
TEXTS = CORPUS + ["", " ", "x" * 200, "ǅungla ǈ Ǳ ﬁne", "e\u0301 \u0301abc", "Ω≈ç√∫µ≤≥÷", "\r\n\r\n  \n", "1234567890",
                  "Αθήνα Москва القاهرة", "中文English中文123中文", "WordsInCamelCase ABCdef abcDEF"]
# words the vocabulary lacks whole, so that BPE merges them (a whole piece in the vocabulary skips merging)
_WORDS = " ".join(CORPUS).split()
NOVEL = [a + b for a, b in zip(_WORDS, _WORDS[1:])] + [w[::-1] for w in _WORDS] + ["北京大学中文汉字分词测试混合"]
# special tokens inside text: each is one token, as tiktoken's allowed_special="all" (Kimi's encode) takes it
SPECIAL_TEXTS = ["[BOS]hello<|im_end|>", "<|im_user|>user<|im_middle|>你好<|im_end|><|im_assistant|>",
                 "a[EOS]b [PAD]", "<|reserved_token_{r}|> and <|im_end"]


def _train(vocab_size: int) -> list[bytes]:
    """Token bytes in rank order of a byte-level BPE trained on ``CORPUS`` (ids are merge order: tiktoken's ranks)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    byte = {c: b for b, c in bytes_to_unicode().items()}
    return [bytes(byte[c] for c in s) for s, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]


def write_dir(out, tokens: list[bytes], special: dict[int, str], remote: bool = True, config: dict | None = None):
    """A Kimi-style tokenizer directory: ``tiktoken.model``, tokenizer_config.json (``special`` at len(tokens) +
    offset, Kimi's bos/eos, the chat template; ``remote``: auto_map naming tokenization_kimi.py, written beside)
    and generation_config.json (<|im_end|> ends generation, as Kimi's)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "tiktoken.model").write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)))
    n = len(tokens)
    tc = {"tokenizer_class": "TikTokenTokenizer", "bos_token": "[BOS]", "eos_token": "[EOS]",
          "chat_template": TEMPLATE, "added_tokens_decoder": {
              str(n + k): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                           "single_word": False, "special": True} for k, s in special.items()}}
    if remote:
        tc["auto_map"] = {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]}
        parts = "\n".join(f'            r"""{p}""",' for p in KIMI_PARTS)
        (out / "tokenization_kimi.py").write_text(REMOTE.replace("{parts}", parts))
    (out / "tokenizer_config.json").write_text(json.dumps({**tc, **(config or {})}))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": n, "eos_token_id": n + 2}))
    return out


@pytest.fixture(scope="module")
def ranks():
    return _train(640)


@pytest.fixture(scope="module")
def kimi(ranks, tmp_path_factory):
    return write_dir(tmp_path_factory.mktemp("kimi"), ranks, KIMI_SPECIAL)


def _tiktoken(ranks, pattern: str, special: dict[int, str]) -> tiktoken.Encoding:
    """The encoding Kimi's tokenization_kimi.py builds: ``special`` at len(ranks) + offset, reserved names between."""
    n = len(ranks)
    names = {k: special.get(k, f"<|reserved_token_{n + k}|>") for k in range(max(special) + 1)}
    return tiktoken.Encoding("kimi", pat_str=pattern, mergeable_ranks={t: i for i, t in enumerate(ranks)},
                             special_tokens={s: n + k for k, s in names.items()})


def _converted(out) -> PreTrainedTokenizerFast:
    """transformers' tokenizer of the Kimi-style directory ``out`` as its remote code builds it: TikTokenConverter
    of its tiktoken.model with Kimi's pattern and the special tokens at their ids, its chat template, BOS and EOS
    (the test's remote module is no tokenizer transformers can run)."""
    tc = json.loads((out / "tokenizer_config.json").read_text())
    n = sum(1 for line in (out / "tiktoken.model").read_text().splitlines() if line.strip())
    named = {int(k): v["content"] for k, v in tc["added_tokens_decoder"].items()}
    names = [named.get(i, f"<|reserved_token_{i}|>") for i in range(n, max(named) + 1)]
    conv = TikTokenConverter(vocab_file=str(out / "tiktoken.model"), pattern=KIMI_PATTERN, extra_special_tokens=names)
    return PreTrainedTokenizerFast(tokenizer_object=conv.converted(), chat_template=tc["chat_template"],
                                   bos_token=tc["bos_token"], eos_token=tc["eos_token"])


def _texts(n: int) -> list[str]:
    return TEXTS + [" ".join(NOVEL)] + [t.replace("{r}", str(n + 5)) for t in SPECIAL_TEXTS]


def test_the_release_pattern_as_tiktoken_encodes(kimi, ranks):
    """flyer's tokenizer of a Kimi directory (pat_str read from tokenization_kimi.py, the special tokens at their
    ids) gives tiktoken.Encoding's ids, as Kimi's remote tokenizer computes them, on every text (special tokens in
    it each one token) and its text back; the settings' BOS / EOS ids; the texts tell the two patterns apart, and
    special tokens apart from their neighbours."""
    tok = load_tokenizer(kimi, {})
    n = len(ranks)
    enc = _tiktoken(ranks, KIMI_PATTERN, KIMI_SPECIAL)
    for text in _texts(n):
        ids = tok.encode_ids(text)
        assert ids == enc.encode(text, allowed_special="all"), text
        assert tok.tok.decode(ids, skip_special_tokens=False) == enc.decode(ids) == text
    assert (tok.bos_id(), tok.eos_id(), tok.token(n + 17), tok.token(n + 5)) == (
        n, n + 2, "<|im_middle|>", f"<|reserved_token_{n + 5}|>")
    assert tok.tok.get_vocab_size() == n + 256 and tok.decode(tok.encode_ids("[BOS]hi<|im_end|>")) == "hi"
    cl100k = _tiktoken(ranks, DEFAULT_PATTERN, KIMI_SPECIAL)
    assert sum(cl100k.encode(t, allowed_special="all") != enc.encode(t, allowed_special="all") for t in TEXTS) >= 3


def test_equals_transformers_converter_and_autotokenizer(kimi, ranks, tmp_path):
    """The vocabulary and merges are transformers' TikTokenConverter's, the whole tokenizer its converted one with
    Kimi's pattern; a directory naming no pattern reads with transformers' default, as AutoTokenizer (no remote
    code) reads it: the same ids, special tokens included, and the same text back without them."""
    conv = TikTokenConverter(vocab_file=str(kimi / "tiktoken.model"))
    assert bpe_from_ranks(ranks) == conv.extract_vocab_merges_from_model(str(kimi / "tiktoken.model"))
    n = len(ranks)
    names = [KIMI_SPECIAL.get(k, f"<|reserved_token_{n + k}|>") for k in range(256)]
    want = TikTokenConverter(vocab_file=str(kimi / "tiktoken.model"), pattern=KIMI_PATTERN,
                             extra_special_tokens=names).converted()
    assert json.loads(load_tokenizer(kimi, {}).tok.to_str()) == json.loads(want.to_str())

    plain = write_dir(tmp_path / "plain", ranks, KIMI_SPECIAL, remote=False)
    (plain / "config.json").write_text(json.dumps({"model_type": "kimi_k25"}))
    ref, tok = AutoTokenizer.from_pretrained(plain), load_tokenizer(plain)
    for text in _texts(n):
        ids = tok.encode_ids(text)
        assert ids == ref.encode(text) == _tiktoken(ranks, DEFAULT_PATTERN, KIMI_SPECIAL).encode(
            text, allowed_special="all"), text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)


SMALL_SPECIAL = {k: s for k, s in KIMI_SPECIAL.items() if k <= 17}  # 300 + 18 tokens fit the model's 320


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Kimi K2.5 (vocab 320) whose tokenizer is a tiktoken one: 300 ranks, then Kimi's special tokens up to
    <|im_middle|>."""
    path = tmp_path_factory.mktemp("k25")
    ref = build(path, "published")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / name).unlink(missing_ok=True)
    write_dir(path, _train(300), SMALL_SPECIAL)
    return path, ref


def test_generate_export_and_train_read_it(model_dir, tmp_path, capsys):
    """``flyer generate --ckpt DIR`` tokenizes the prompt with the tiktoken tokenizer (transformers' greedy tokens on
    those ids); the chat template renders Kimi's markers as their special ids; ``flyer export`` writes a
    directory whose tokenizer files are the source's (auto_map kept: transformers runs its remote code), which
    transformers' converter encodes as Kimi's pattern does, and its chat prompt is flyer serve's; ``flyer train
    --init``'s data path tokenizes with it."""
    path, ref = model_dir
    tok = load_hf(path)[2]
    ranks = _train(300)
    n = len(ranks)
    text = "the quick brown fox 中文 jumps"
    ids = tok.encode_ids(text)
    assert ids == _tiktoken(ranks, KIMI_PATTERN, SMALL_SPECIAL).encode(text)
    want = ref.generate(input_ids=torch.tensor([ids]), do_sample=False, max_new_tokens=8, eos_token_id=None,
                        pad_token_id=0)[0, len(ids):].tolist()
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(path), "--prompt", text, "--max-new-tokens", "8", "--cache-dtype", "fp32",
                 "--eos-id", "-1", "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == [want]

    chat = chat_renderer(read_chat_template(path), tok.special_tokens())([{"role": "user", "content": "hi"}])
    ids = tok.encode_ids(chat, add_special_tokens=False)
    assert ids == [n + 3, *tok.encode_ids("user"), n + 17, *tok.encode_ids("hi"), n + 2, n + 4,
                   *tok.encode_ids("assistant"), n + 17]
    assert tok.eos_ids() == (n + 2,) and tok.special_tokens()["eos_token"] == "[EOS]"

    export(path, tmp_path / "out", "fp32")
    tc = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert tc["auto_map"] == json.loads((path / "tokenizer_config.json").read_text())["auto_map"]
    assert tc["chat_template"] == TEMPLATE and not (tmp_path / "out" / "tokenizer.json").exists()
    for name in ("tiktoken.model", "tokenization_kimi.py"):
        assert (tmp_path / "out" / name).read_bytes() == (path / name).read_bytes()
    back = _converted(tmp_path / "out")
    for t in _texts(n):
        assert back.encode(t) == tok.encode_ids(t) == load_hf(tmp_path / "out")[2].encode_ids(t), t
    # flyer serve's chat prompt of the source is transformers' of the export
    msgs = [{"role": "system", "content": "你是Kimi"}, {"role": "user", "content": "hello 世界 <|im_end|>"}]
    served = Api(None, tok, "m", chat_template=read_chat_template(path))._chat_prompt(ChatBody(model="m",
                                                                                                  messages=msgs))
    assert served == list(back.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True,
                                                   return_dict=False))

    _, tok_file = init_source(path)
    (tmp_path / "docs").mkdir()
    for i, doc in enumerate(CORPUS):
        (tmp_path / "docs" / f"{i}.txt").write_text(doc)
    data = prepare_data(tmp_path / "docs", tmp_path / "cache", tokenizer=tok_file, val_fraction=0.5)
    assert tok_file.name == "tiktoken.model" and data.tokenizer.to_str() == tok.tok.to_str()
    assert (data.vocab_size, data.eos_id) == (n + 18, n + 1)  # documents end with [EOS]: no token added


def _lines(tokens):
    return [f"{base64.b64encode(t).decode()} {i}" for i, t in enumerate(tokens)]


@pytest.mark.parametrize("change, says", [
    (lambda ls: ls[:3] + ["QQ=="] + ls[4:], "tiktoken.model:4: expected 'base64-token rank', got 1 field"),
    (lambda ls: ls[:3] + ["@@@ 3"] + ls[4:], "tiktoken.model:4: the token is not base64"),
    (lambda ls: ls[:3] + [ls[3].split()[0] + " x"] + ls[4:], "tiktoken.model:4: the rank is not"),
    (lambda ls: ls[:3] + [ls[3].split()[0] + " 2"] + ls[4:], "tiktoken.model:4: rank 2 repeats"),
    (lambda ls: ls[:3] + ls[4:], "tiktoken.model:4: rank 4 skips"),
    (lambda ls: ls + [ls[300].split()[0] + f" {len(ls)}"], "repeats rank 300"),
    (lambda ls: [f"{t.split()[0]} {i}" for i, t in enumerate(ls[:1] + ls[2:])], "is not a token (1 of the 256"),
    (lambda ls: [""], "no tokens"),
    (lambda ls: ls[:5] + ["A" * 5000 + " 5"], "tiktoken.model:6: line longer than"),
])
def test_bad_tiktoken_files_are_one_line(kimi, ranks, tmp_path, change, says):
    bad = write_dir(tmp_path / "bad", ranks, KIMI_SPECIAL)
    (bad / "tiktoken.model").write_text("\n".join(change(_lines(ranks))) + "\n")
    with pytest.raises(CheckpointError) as e:
        load_tokenizer(bad, {})
    assert says in str(e.value) and str(bad / "tiktoken.model") in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("config, remote, says", [
    ({"auto_map": {"AutoTokenizer": ["tokenization_other.Tok", None]}}, None, "tokenization_other.py: cannot read"),
    ({"auto_map": {"AutoTokenizer": ["tokenization_kimi.Other", None]}}, None, "no class Other"),
    ({}, ("pat_str = ", "pattern = "), "TikTokenTokenizer has no pat_str"),
    ({}, ('"|".join(', "make_pattern("), "pat_str is not a string of constants"),
    ({}, ("return [text]", "return [text.lower()]"), "pre_tokenizer_process rewrites the text"),
    ({}, (r"[\p{Han}]+", r"[\p{Han}+"), "tokenization_kimi.py: its pre-tokenizer regex is unusable"),
    (lambda n: {"added_tokens_decoder": {str(n - 1): {"content": "<x>"}}}, None, "is one of the"),  # the last rank
    ({"added_tokens_decoder": {"700": {"content": "[BOS]"}, "701": {"content": "[BOS]"}}}, None, "more than one id"),
    ({"added_tokens_decoder": [1, 2]}, None, "added_tokens_decoder must be an object"),
])
def test_bad_settings_are_one_line(ranks, tmp_path, capsys, config, remote, says):
    """A pattern flyer cannot read or reproduce, special tokens over the ranks or named twice: one line naming the
    file; ``flyer generate`` exits 2 with it."""
    bad = write_dir(tmp_path / "bad", ranks, KIMI_SPECIAL, config=config(len(ranks)) if callable(config) else config)
    if remote:
        p = bad / "tokenization_kimi.py"
        p.write_text(p.read_text().replace(*remote))
    with pytest.raises(CheckpointError) as e:
        load_tokenizer(bad, {})
    assert says in str(e.value) and "\n" not in str(e.value)


def test_generate_says_which_line(model_dir, tmp_path, capsys):
    """``flyer generate --ckpt DIR`` with a broken tiktoken.model: exit 2, one line naming the file and line."""
    import shutil
    path = shutil.copytree(model_dir[0], tmp_path / "k25")
    lines = (path / "tiktoken.model").read_text().splitlines()
    (path / "tiktoken.model").write_text("\n".join(lines[:9] + lines[10:]) + "\n")
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(path), "--prompt", "hi", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{path / 'tiktoken.model'}:10: rank 10 skips" in err and "\n" not in err


def test_data_cache_keys_on_the_directory_settings(ranks, tmp_path):
    """The data cache of a tiktoken tokenizer keys on the tokenizer built (its directory's special tokens
    included), not only on tiktoken.model's bytes: another special token, another build."""
    src = write_dir(tmp_path / "tok", ranks, SMALL_SPECIAL, remote=False)
    (tmp_path / "docs").mkdir()
    for i, doc in enumerate(CORPUS[:2]):
        (tmp_path / "docs" / f"{i}.txt").write_text(doc)
    first = prepare_data(tmp_path / "docs", tmp_path / "cache", tokenizer=src / "tiktoken.model", val_fraction=0.5)
    write_dir(src, ranks, {**SMALL_SPECIAL, 18: "<think>"}, remote=False)
    again = prepare_data(tmp_path / "docs", tmp_path / "cache", tokenizer=src / "tiktoken.model", val_fraction=0.5)
    assert first.cache_dir != again.cache_dir and again.vocab_size == first.vocab_size + 1


def test_a_run_fine_tuned_from_it_keeps_it(model_dir, tmp_path, capsys):
    """``flyer train --init DIR`` (one step) trains on text its tiktoken tokenizer encodes, and its checkpoint reads
    back with that tokenizer and Kimi's settings; ``flyer export`` of the run gives a directory with the source's
    tokenizer files, which transformers' converter reads encoding as the source does."""
    path = model_dir[0]
    tok = load_tokenizer(path)
    (tmp_path / "text.txt").write_text("\n\n".join(CORPUS * 3))
    assert main(["train", "--init", str(path), "--steps", "1", "--batch-size", "2", "--seq-len", "16",
                 "--data", str(tmp_path / "text.txt"), "--data-cache", str(tmp_path / "cache"), "--out",
                 str(tmp_path / "run"), "--no-progress", "--no-plots", "--eval-every", "1", "--eval-batches", "1",
                 "--ckpt-every", "1", "--device", "cpu"]) == 0
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--dtype", "fp32"]) == 0
    back = _converted(tmp_path / "out")
    for t in _texts(len(_train(300))):
        assert back.encode(t) == tok.encode_ids(t) == load_tokenizer(tmp_path / "out", {}).encode_ids(t), t
    assert back.eos_token == "[EOS]" and "auto_map" in json.loads((tmp_path / "out" / "tokenizer_config.json")
                                                                   .read_text())


# Kimi's tokenization_kimi.py sorts the tools' keys before its template renders them (its apply_chat_template)
SORTING = REMOTE + '''
    def apply_chat_template(self, conversation, tools=None, **kwargs):
        tools = deep_sort_dict(tools)
        return super().apply_chat_template(conversation, tools=tools, **kwargs)
'''
TOOLS_TEMPLATE = ("{%- if tools -%}<|im_system|>tool_declare<|im_middle|>{{ tools | tojson(separators=(',', ':')) }}"
                  "<|im_end|>{%- endif -%}" + TEMPLATE)  # Kimi K2's: the tools as compact JSON
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "description": "City"}}, "required": ["city"]}}}]


def test_the_tools_are_sorted_where_the_remote_tokenizer_sorts_them(ranks, tmp_path):
    """A directory whose remote tokenizer's ``apply_chat_template`` sorts the tools' keys (``deep_sort_dict``, Kimi
    K2's) renders what transformers renders with it, the tools' keys sorted at every depth; one whose remote code does
    not, the tools as given; chat data renders each as its own (two caches)."""
    sorting = write_dir(tmp_path / "sorting", ranks, KIMI_SPECIAL, config={"chat_template": TOOLS_TEMPLATE})
    # named templates (a list in tokenizer_config.json): "tool_use" renders a request with tools, sorted alike
    named = write_dir(tmp_path / "named", ranks, KIMI_SPECIAL, config={"chat_template": [
        {"name": "default", "template": TEMPLATE}, {"name": "tool_use", "template": TOOLS_TEMPLATE}]})
    for path in (sorting, named):
        (path / "tokenization_kimi.py").write_text((path / "tokenization_kimi.py").read_text().replace(
            "        return [text]\n", "        return [text]\n" + SORTING.partition("return [text]\n")[2]))
    plain = write_dir(tmp_path / "plain", ranks, KIMI_SPECIAL, config={"chat_template": TOOLS_TEMPLATE})
    for path in (sorting, named, plain):  # a model directory (its weights are not read): Kimi K2's is V3's
        (path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
        (path / "model.safetensors").write_bytes(b"")
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    sorted_tools = json.loads(json.dumps(TOOLS, sort_keys=True))
    for path, tools in ((sorting, sorted_tools), (named, sorted_tools), (plain, TOOLS)):
        want = _converted(path).apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=True)
        assert chat_renderer(read_chat_template(path))(msgs, TOOLS) == want
    for path in (sorting, named):
        assert '"function":{"description":"Weather","name"' in chat_renderer(read_chat_template(path))(msgs, TOOLS)

    data = tmp_path / "chat.jsonl"
    line = json.dumps({"messages": msgs + [{"role": "assistant", "content": "Sunny."}], "tools": TOOLS})
    data.write_text(f"{line}\n{line}\n")  # one held out for validation
    dirs = {prepare_chat(data, tmp_path / "cache", load_tokenizer(p, {}), read_chat_template(p)).cache_dir
            for p in (sorting, plain)}
    assert len(dirs) == 2
