"""A model fine-tuned or exported from a tiktoken directory (Kimi's) keeps its tokenizer: the run's checkpoints
and ``flyer export`` carry ``tiktoken.model`` and the remote code as they are (``flyer.data.tokenizer_copy``), so
the result encodes as the source does, Kimi's cut of long runs included, over the chain init -> train -> export ->
init -> export and a resumed run; a tokenizer.json source keeps writing a tokenizer.json. Tiny models and
vocabularies built here, nothing downloaded."""

import json
import shutil

import pytest
from transformers import AutoTokenizer

from flyer.cli import main
from flyer.data.prepare import prepare_data
from flyer.data.presplit import PreSplit, presplit_of
from flyer.data.tiktoken_file import tokenizer_files
from flyer.data.tokenizer import load_tokenizer as load_tokenizer_file
from flyer.errors import CheckpointError
from flyer.interop import export as export_module
from flyer.interop.hf_tokenizer import load_tokenizer
from flyer.interop.load import load_pretrained, read_settings
from flyer.train.checkpoint import inference_checkpoint, resolve_checkpoint_path
from flyer.train.config import tokenizer_settings
from tests.test_hf_kimi_k25 import build
from tests.test_hf_tiktoken import CORPUS, KIMI_PARTS, SMALL_SPECIAL, TEMPLATE, _train, write_dir

MAX_RUN = 40  # the cut's limit in the test's remote code (Kimi's is 25,000): short texts pass it
LONG = "the" * 30 + " 中文 " + " " * 50 + "quick" * 20 + "<|im_end|>" + "x" * 45  # runs over MAX_RUN
TOKENIZER = ("tiktoken.model", "tokenization_kimi.py", "tool_declaration_ts.py")  # what a copy must hold
# A remote-code tokenizer transformers runs (trust_remote_code), written here to the spec of Kimi's: tiktoken with
# the pattern, special tokens from the settings, each segment between them cut into chunks, then where a run of
# whitespace / non-whitespace passes the limit; like Kimi K2.5's it imports a module beside it.
REMOTE = '''import tiktoken
from tiktoken.load import load_tiktoken_bpe
from transformers import PreTrainedTokenizer

from .tool_declaration_ts import BYTES


class TikTokenTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tiktoken.model"}
    model_input_names = ["input_ids", "attention_mask"]
    pat_str = "|".join([{parts}])

    def __init__(self, vocab_file, added_tokens_decoder=None, **kwargs):
        ranks = load_tiktoken_bpe(vocab_file)
        named = {int(i): str(t) for i, t in (added_tokens_decoder or {}).items()}
        special = {named.get(i, f"<|reserved_token_{i}|>"): i for i in range(len(ranks), max(named) + 1)}
        self.model = tiktoken.Encoding("kimi", pat_str=self.pat_str, mergeable_ranks=ranks, special_tokens=special)
        self.decoder = {i: "".join(BYTES[b] for b in t) for t, i in ranks.items()}
        self.decoder |= {i: s for s, i in special.items()}
        self.encoder = {s: i for i, s in self.decoder.items()}
        super().__init__(added_tokens_decoder=added_tokens_decoder, **kwargs)

    @property
    def vocab_size(self):
        return self.model.n_vocab

    def get_vocab(self):
        return dict(self.encoder)

    def _tokenize(self, text, **kwargs):
        TIKTOKEN_MAX_ENCODE_CHARS = 400_000
        MAX_NO_WHITESPACES_CHARS = {max_run}
        ids = []
        for c in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in self._split_whitespaces_or_nonwhitespaces(text[c:c + TIKTOKEN_MAX_ENCODE_CHARS],
                                                                   MAX_NO_WHITESPACES_CHARS):
                ids += self.model.encode(piece, allowed_special="all")
        return [self.decoder[i] for i in ids]

    @staticmethod
    def _split_whitespaces_or_nonwhitespaces(s, limit):
        start, count, space = 0, 0, None
        for i, ch in enumerate(s):
            if ch.isspace() != space:
                count, space = 1, ch.isspace()
                continue
            count += 1
            if count > limit:
                yield s[start:i]
                start, count = i, 1
        yield s[start:]

    def _convert_token_to_id(self, token):
        return self.encoder[token]

    def _convert_id_to_token(self, index):
        return self.decoder[index]

    def convert_tokens_to_string(self, tokens):
        byte = {c: b for b, c in enumerate(BYTES)}
        return bytes(byte[c] for c in "".join(tokens)).decode("utf-8", errors="replace")
'''
SIDE = ("from transformers.convert_slow_tokenizer import bytes_to_unicode\n\n"
        "BYTES = [bytes_to_unicode()[b] for b in range(256)]\n")


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    """A tiny Kimi K2.5 whose tokenizer is a tiktoken one with Kimi's cut at ``MAX_RUN`` (300 ranks, then Kimi's
    special tokens up to <|im_middle|>: 318 of the model's 320), the chat template, and its remote code."""
    path = tmp_path_factory.mktemp("k25")
    build(path, "published")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / name).unlink(missing_ok=True)
    write_dir(path, _train(300), SMALL_SPECIAL)
    parts = ", ".join(f'r"""{p}"""' for p in KIMI_PARTS)
    (path / "tokenization_kimi.py").write_text(REMOTE.replace("{parts}", parts).replace("{max_run}", str(MAX_RUN)))
    (path / "tool_declaration_ts.py").write_text(SIDE)
    return path


def _train_run(init, out, tmp_path, steps=1, resume=()):
    (tmp_path / "text.txt").write_text("\n\n".join(CORPUS * 3) + "\n\n" + LONG)
    assert main(["train", "--init", str(init), "--steps", str(steps), "--batch-size", "2", "--seq-len", "16",
                 "--data", str(tmp_path / "text.txt"), "--data-cache", str(tmp_path / "cache"), "--out", str(out),
                 "--no-progress", "--no-plots", "--eval-every", "1", "--eval-batches", "1", "--ckpt-every", "1",
                 "--device", "cpu", "--threads", "1", *resume]) == 0


def _export(path, out):
    assert main(["export", str(path), "--out", str(out), "--dtype", "fp32"]) == 0
    return out


def _same_tokenizer(source, copy, want):
    """``copy`` (an export or a step directory) holds ``source``'s tokenizer files byte for byte, no tokenizer.json,
    and flyer reads it as the source: ``want`` (the source's ids of ``LONG``, its cut applied), the cut and the
    special tokens the same."""
    for name in TOKENIZER:
        assert (copy / name).read_bytes() == (source / name).read_bytes(), name
    assert not (copy / "tokenizer.json").exists()
    tok = load_tokenizer(copy, {})
    assert presplit_of(tok.tok) == presplit_of(load_tokenizer(source, {}).tok)
    assert tok.encode_ids(LONG) == want
    assert tok.special_tokens() == load_tokenizer(source, {}).special_tokens()


def test_the_chain_keeps_the_tokenizer(kimi, tmp_path, capsys):
    """init from Kimi -> one train step -> export -> init from the export -> export, and init from the first run:
    each checkpoint and export has the source's tokenizer files and auto_map, reads back with the cut (ids of a
    text with runs over the limit as the source's, which differ from encoding it whole), its chat template and EOS
    kept; resuming the run keeps them; generate and load_pretrained read the run's tokenizer with the cut."""
    src = load_tokenizer(kimi, {})
    want = src.encode_ids(LONG)
    assert presplit_of(src.tok) == PreSplit(max_run=MAX_RUN, specials=presplit_of(src.tok).specials)
    assert want != src.tok.encode(LONG).ids  # the cut changes these ids: a lost cut fails the test
    _train_run(kimi, tmp_path / "run", tmp_path)
    step = resolve_checkpoint_path(tmp_path / "run")
    _same_tokenizer(kimi, step, want)
    assert inference_checkpoint(step)[2].to_str() == src.tok.to_str()
    assert load_pretrained(tmp_path / "run")[2].encode_ids(LONG) == want

    out = _export(tmp_path / "run", tmp_path / "out")
    _same_tokenizer(kimi, out, want)
    tc = json.loads((out / "tokenizer_config.json").read_text())
    source_tc = json.loads((kimi / "tokenizer_config.json").read_text())
    assert tc["auto_map"] == source_tc["auto_map"] and tc["tokenizer_class"] == "TikTokenTokenizer"
    assert tc["chat_template"] == TEMPLATE and tc["added_tokens_decoder"] == source_tc["added_tokens_decoder"]
    assert load_tokenizer(out, {}).eos_ids() == src.eos_ids()

    # second hop, with a fresh data cache (the first's tokenizer read back from its cache below)
    (tmp_path / "hop2").mkdir()
    _train_run(out, tmp_path / "run2", tmp_path / "hop2")
    _same_tokenizer(kimi, resolve_checkpoint_path(tmp_path / "run2"), want)
    _same_tokenizer(kimi, _export(tmp_path / "run2", tmp_path / "out2"), want)

    # a run initialised from the first run directory
    (tmp_path / "hop3").mkdir()
    _train_run(tmp_path / "run", tmp_path / "run3", tmp_path / "hop3")
    _same_tokenizer(kimi, resolve_checkpoint_path(tmp_path / "run3"), want)

    # resumed for a second step, its data read back from the cache: the cut still there
    _train_run(kimi, tmp_path / "run", tmp_path, steps=2, resume=["--resume"])
    step = resolve_checkpoint_path(tmp_path / "run")
    assert step.name.endswith("2")
    _same_tokenizer(kimi, step, want)
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(tmp_path / "run"), "--prompt", LONG, "--max-new-tokens", "1",
                 "--device", "cpu", "--json", "--eos-id", "-1"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] == len(want)


def test_export_of_the_source_directory(kimi, tmp_path):
    """``flyer export`` of the Kimi directory itself carries the same files."""
    want = load_tokenizer(kimi, {}).encode_ids(LONG)
    _same_tokenizer(kimi, _export(kimi, tmp_path / "out"), want)


def test_transformers_reads_the_export_as_the_source(kimi, tmp_path):
    """transformers runs the exported remote code (trust_remote_code, its relative import copied with it) and
    encodes as the source directory and as flyer do, the cut included; the chat template renders the same ids."""
    out = _export(kimi, tmp_path / f"export-{tmp_path.name}")  # transformers caches remote code by directory name
    ref = AutoTokenizer.from_pretrained(kimi, trust_remote_code=True)
    back = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    tok = load_tokenizer(out, {})
    for text in (LONG, *CORPUS, "[BOS]hi<|im_end|>" + "-" * 90):
        assert back.encode(text) == ref.encode(text) == tok.encode_ids(text), text
    msgs = [{"role": "user", "content": "hello " + "a" * 50}]
    want = back.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert list(want) == tok.encode_ids(back.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                                        add_special_tokens=False)


def test_tokenizer_files_follow_relative_imports(kimi, tmp_path):
    """The copied files: tiktoken.model, the module auto_map names, the modules it imports from beside it (an
    optional one that is missing left out); none of the others (weights, configs)."""
    assert sorted(tokenizer_files(kimi, CheckpointError)) == sorted(TOKENIZER)
    assert set(TOKENIZER) <= set(read_settings(kimi))
    d = shutil.copytree(kimi, tmp_path / "k")
    remote = d / "tokenization_kimi.py"
    remote.write_text("try:\n    from .encoding_k3 import x\nexcept ImportError:\n    pass\n" + remote.read_text())
    (d / "tool_declaration_ts.py").write_text("from .more import z\n" + SIDE)
    (d / "more.py").write_text("z = 0\n")
    assert sorted(tokenizer_files(d, CheckpointError)) == sorted((*TOKENIZER, "more.py"))


def test_a_run_whose_tokenizer_differs_writes_a_tokenizer_json(kimi, capsys):
    """Carried files that do not build the run's tokenizer (a token added to it) are dropped, said in the log: the
    checkpoint holds the run's tokenizer.json; the same tokenizer keeps them."""
    settings, said = read_settings(kimi), []
    tok = load_tokenizer_file(kimi / "tiktoken.model")
    assert tokenizer_settings(settings, tok, said.append) == settings and not said
    tok.add_special_tokens(["<|endoftext|>"])
    kept = tokenizer_settings(settings, tok, said.append)
    assert not set(TOKENIZER) & set(kept) and "tokenizer_config.json" in kept and "tiktoken.model" in said[0]


def test_a_tokenizer_json_source_is_unchanged(tmp_path):
    """A source with a tokenizer.json: the run's checkpoint and the export write a tokenizer.json as before, and no
    tiktoken file."""
    build(tmp_path / "hf", "published")
    _train_run(tmp_path / "hf", tmp_path / "run", tmp_path)
    out = _export(tmp_path / "run", tmp_path / "out")
    for d in (resolve_checkpoint_path(tmp_path / "run"), out):
        assert (d / "tokenizer.json").is_file() and not (d / "tiktoken.model").exists()
    assert load_tokenizer(out, {}).tok.to_str() == load_tokenizer(tmp_path / "hf", {}).tok.to_str()


def test_the_data_cache_keeps_the_cut(kimi, tmp_path):
    """Pretraining data read back from its cache has the tokenizer with its cut (a tokenizer.json holds none)."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text(LONG)
    (tmp_path / "docs" / "b.txt").write_text(CORPUS[0])
    built, cached = (prepare_data(tmp_path / "docs", tmp_path / "cache", tokenizer=kimi / "tiktoken.model",
                                  val_fraction=0.5) for _ in range(2))
    assert cached.cache_dir == built.cache_dir and presplit_of(built.tokenizer) is not None
    assert presplit_of(cached.tokenizer) == presplit_of(built.tokenizer)


def test_an_export_whose_files_build_another_tokenizer_fails(kimi, tmp_path, monkeypatch):
    """The copied files are checked to build the exported tokenizer: a remote module with another cut fails the
    export in one line naming the source, and leaves nothing behind."""
    real = export_module.read_tokenizer_files

    def other_cut(root, error):
        files = real(root, error)
        return files | {"tokenization_kimi.py": files["tokenization_kimi.py"].replace(b"= 40\n", b"= 41\n")}
    monkeypatch.setattr(export_module, "read_tokenizer_files", other_cut)
    with pytest.raises(CheckpointError) as e:
        export_module.export(kimi, tmp_path / "out", "fp32")
    assert str(kimi) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())
