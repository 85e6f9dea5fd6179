"""``flyer generate`` and its prefix cache under hostile input: foreign files in the cache
directory, a changed model, a corrupt shared stats file, a full disk, out-of-range flags, and
ids from a tokenizer or generation_config.json that do not fit the model."""

import errno
import importlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from flyer import kernels
from flyer.cli import main
from flyer.config import preset
from flyer.errors import FieldError
from flyer.infer import GenerationConfig, PrefixCache, generate
from flyer.infer import cli as infer_cli
from flyer.infer import prefix_cache as prefix_cache_mod
from flyer.infer.generate import open_prefix_cache
from flyer.model.transformer import Transformer
from tests.bounds import decode_logit_bound

generate_mod = importlib.import_module("flyer.infer.generate")  # flyer.infer.generate is also the function

BASE = ["generate", "--preset", "tiny", "--max-new-tokens", "3"]


def _model(seed=0, **over):
    torch.manual_seed(seed)
    return Transformer(preset("tiny", **over)).eval()


def _one_line_error(capsys, argv, flag):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"flyer: error: {flag}:") and "\n" not in err, err
    return err


# ---- 1. the cache touches only its own files --------------------------------------------------
def test_prefix_cache_refuses_a_directory_that_is_not_one(capsys, tmp_path):
    docs = tmp_path / "mydocs"
    (docs / "drafts").mkdir(parents=True)
    (docs / "models").mkdir()
    draft, weights = docs / "drafts" / "report.tmp", docs / "models" / "weights.blk"
    draft.write_text("my report")
    weights.write_bytes(b"w" * 8192)
    old = time.time() - 3600
    os.utime(draft, (old, old))
    _one_line_error(capsys, BASE + ["--prompt", "x" * 40, "--prefix-block", "16", "--prefix-cache", str(docs),
                                    "--prefix-cache-size", "4K"], "--prefix-cache")
    assert draft.read_text() == "my report" and weights.stat().st_size == 8192


def _tensors(i):
    return {"kv": torch.full((2, 4, 8), float(i))}


def test_eviction_spares_foreign_files_inside_a_cache(tmp_path):
    pc = PrefixCache(tmp_path, "fp", block_size=4, max_bytes=1 << 20)
    keys = [f"{i:064x}" for i in range(4)]
    for i, k in enumerate(keys):
        assert pc.store(k, [i] * 4, _tensors(i))
    sub = pc.path(keys[0]).parent
    foreign = [sub / "notes.tmp", sub / "weights.blk", sub / ("A" * 64 + ".blk"), tmp_path / "zz" / "x.blk"]
    foreign[-1].parent.mkdir()
    old = time.time() - 3600
    for f in foreign:
        f.write_bytes(b"f" * 4096)
        os.utime(f, (old, old))  # the oldest files there: first in line if they counted
    pc.max_bytes = 1
    assert pc.evict() == 4 and not any(pc.path(k).exists() for k in keys)
    assert all(f.stat().st_size == 4096 for f in foreign)
    # a cache written before the marker existed (its own names only) is still adopted
    (tmp_path / ".flyer-prefix-cache").unlink(missing_ok=True)
    for f in foreign:
        f.unlink()
    (tmp_path / "zz").rmdir()
    PrefixCache(tmp_path, "fp", block_size=4)


# ---- 2. the fingerprint covers every weight ---------------------------------------------------
def test_a_model_changed_outside_any_sample_misses(tmp_path):
    a = _model()
    prompt = torch.randint(0, 2048, (19,)).tolist()
    pc = open_prefix_cache(a, tmp_path, cache_dtype=torch.float32, block_size=8)
    gen = GenerationConfig(max_new_tokens=6, cache_dtype=torch.float32)
    generate(a, [prompt], GenerationConfig(max_new_tokens=6, cache_dtype=torch.float32, prefix_cache=pc))
    b = _model()
    with torch.no_grad():  # every embedding value of the prompt's tokens but one in 64 (the old sample)
        w = b.embed.weight.view(-1)
        keep = torch.zeros_like(w, dtype=torch.bool)
        keep[::64] = True
        for t in set(prompt):
            row = slice(t * b.cfg.dim, (t + 1) * b.cfg.dim)
            w[row] = torch.where(keep[row], w[row], torch.randn_like(w[row]))
    cold = generate(b, [prompt], gen)
    pc_b = open_prefix_cache(b, tmp_path, cache_dtype=torch.float32, block_size=8)
    assert pc_b.fingerprint != pc.fingerprint
    warm = generate(b, [prompt], GenerationConfig(max_new_tokens=6, cache_dtype=torch.float32, prefix_cache=pc_b))
    assert warm.prefix["hits"] == 0 and warm.tokens == cold.tokens
    torch.testing.assert_close(warm.first_logits, cold.first_logits, atol=decode_logit_bound(b, len(prompt)), rtol=0)


# ---- 3. a corrupt shared stats file -----------------------------------------------------------
@pytest.mark.parametrize("stats", ['{"hits": null}', '{"hits": "x", "lookups": 2.5}', '{"lookups": true}',
                                   '[1, 2]', '{"hits": 1e999}'])
def test_corrupt_stats_file_counts_as_absent(capsys, tmp_path, stats):
    argv = BASE + ["--prompt", "x" * 40, "--prefix-block", "16", "--prefix-cache", str(tmp_path), "--json"]
    assert main(argv) == 0  # makes the cache
    capsys.readouterr()
    (tmp_path / "stats.json").write_text(stats)
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["new_tokens"] == 3 and out["prefix_cache_total"]["lookups"] == 2
    assert out["prefix_cache_total"]["hits"] == 2
    assert json.loads((tmp_path / "stats.json").read_text())["lookups"] == 2


# ---- 4. a write failure of the cache ----------------------------------------------------------
def test_a_full_disk_warns_once_and_keeps_the_output(capsys, tmp_path, monkeypatch):
    real = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, b):
            raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(prefix_cache_mod.os, "fdopen", lambda fd, *a, **k: Full(real(fd, *a, **k)))
    argv = BASE + ["--prompt", "x" * 40, "--prompt", "y" * 40, "--prefix-block", "16", "--prefix-cache", str(tmp_path)]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2  # both texts
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("flyer: warning: prefix cache") and "File too large" in err
    assert "0 stored" in err
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".tmp", ".blk")]


# ---- 5. --seed ----------------------------------------------------------------------------------
def test_seed_out_of_range_is_one_line(capsys):
    _one_line_error(capsys, BASE + ["--prompt", "hi", "--seed", str(2**64)], "--seed")
    _one_line_error(capsys, BASE + ["--prompt", "hi", "--seed", str(2**64), "--temperature", "1"], "--seed")
    assert main(BASE + ["--prompt", "hi", "--seed", str(2**64 - 1), "--temperature", "1"]) == 0
    with pytest.raises(FieldError, match="seed"):
        GenerationConfig(seed=-1).validate()


# ---- 6. --draft-tokens and the cache's length ---------------------------------------------------
def test_draft_tokens_beyond_max_new_tokens_are_refused(capsys):
    _one_line_error(capsys, BASE + ["--prompt", "hi", "--speculative", "mtp", "--draft-tokens", "10"],
                    "--draft-tokens")
    _one_line_error(capsys, BASE + ["--prompt", "hi", "--speculative", "mtp", "--draft-tokens", "100000000"],
                    "--draft-tokens")


def test_drafts_stay_inside_max_seq_len(monkeypatch):
    """A prompt and max_new_tokens filling the context exactly: the drafts are clamped to what is
    left, the cache never outgrows max_seq_len, and the tokens are plain greedy decoding's."""
    model = _model(max_seq_len=32, original_seq_len=32)
    prompts = [torch.randint(0, 2048, (24,)).tolist(), torch.randint(0, 2048, (20,)).tolist()]
    plain = generate(model, prompts, GenerationConfig(max_new_tokens=8, eos_id=None))
    lens = []
    real = generate_mod.Decoder

    def recording(model, batch, max_len, *a, **k):
        lens.append(max_len)
        return real(model, batch, max_len, *a, **k)

    monkeypatch.setattr(generate_mod, "Decoder", recording)
    cfg = GenerationConfig(max_new_tokens=8, speculative="mtp", draft_tokens=8)
    spec = generate(model, prompts, cfg)
    assert spec.tokens == plain.tokens
    # each row drafts what it would alone: at most the tokens it has left, less one
    assert spec.drafted == sum(generate(model, [p], cfg).drafted for p in prompts) <= 2 * (6 + 5 + 4 + 3 + 2 + 1)
    sampled = generate(model, prompts, GenerationConfig(max_new_tokens=8, speculative="mtp", draft_tokens=8,
                                                        temperature=1.0, seed=3))
    assert [len(t) for t in sampled.tokens] == [8, 8]
    two = generate(model, prompts, GenerationConfig(max_new_tokens=2, speculative="mtp", draft_tokens=2))
    assert two.tokens == [t[:2] for t in plain.tokens] and two.drafted == 0  # its one step has nothing to draft
    assert lens and max(lens) <= 32
    with pytest.raises(FieldError, match="max_new_tokens"):
        generate(model, prompts, GenerationConfig(max_new_tokens=9, speculative="mtp", draft_tokens=2))


# ---- 7. --expert-threads ------------------------------------------------------------------------
def test_expert_threads_above_the_cap_are_refused(capsys, tmp_path):
    too_many = str(infer_cli.max_expert_threads() + 1) if hasattr(infer_cli, "max_expert_threads") \
        else str(4 * (os.cpu_count() or 1) + 1)
    try:
        _one_line_error(capsys, BASE + ["--prompt", "hi", "--expert-threads", too_many], "--expert-threads")
        # the flag is checked before the model loads: a missing checkpoint would name --ckpt
        _one_line_error(capsys, ["serve", "--ckpt", str(tmp_path / "nowhere"), "--expert-threads", too_many],
                        "--expert-threads")
    finally:
        kernels.set_expert_threads(1)


# ---- 8. warnings and ids the user never typed --------------------------------------------------
def test_checkpoint_warning_has_one_prefix(capsys, tmp_path):
    from flyer.data.tokenizer import train_bpe
    from flyer.train import checkpoint as ckpt

    cfg = preset("tiny", vocab_size=300)
    model = Transformer(cfg)
    tok = train_bpe(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300)
    files = {"model.safetensors": model.state_dict(), "config.json": cfg.to_dict(),
             "tokenizer.json": json.loads(tok.to_str())}
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path / "checkpoints", step, files)
    newest = ckpt.list_checkpoints(tmp_path / "checkpoints")[0]
    (newest / "config.json").write_text((newest / "config.json").read_text() + " ")
    assert main(["generate", "--ckpt", str(tmp_path), "--prompt", "the quick", "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    warns = [line for line in err.splitlines() if "warning" in line]
    assert warns and all(line.startswith("flyer: warning: checkpoint") for line in warns), err
    assert len(warns) == len(set(warns))


def test_prompt_token_beyond_the_vocabulary_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(infer_cli.ByteTokenizer, "encode_ids", lambda self, text, add_special_tokens=None: [5000])
    _one_line_error(capsys, BASE + ["--prompt", "hi"], "--prompt")


def test_eos_from_generation_config_names_that_file(capsys, tmp_path, monkeypatch):
    from tests.hf_models import build

    build("llama", tmp_path)
    capsys.readouterr()  # transformers' progress bars
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 99999}))
    assert main(["generate", "--ckpt", str(tmp_path), "--prompt", "hello", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flyer: error:") and "\n" not in err
    assert "generation_config.json" in err and "--eos-id:" not in err
    assert main(["generate", "--ckpt", str(tmp_path), "--prompt", "hello", "--max-new-tokens", "2",
                 "--eos-id", "-1"]) == 0
    # flyer serve, which has no --eos-id, refuses it the same way before it serves (every stop id of a list)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 99999]}))
    capsys.readouterr()
    monkeypatch.setattr("flyer.serve.cli.Engine", lambda *a: pytest.fail("served past a stop id it cannot sample"))
    assert main(["serve", "--ckpt", str(tmp_path), "--port", "0", "--kv-cache-memory", "8M"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flyer: error:") and "\n" not in err, err
    assert "end-of-text id 99999" in err and "generation_config.json" in err and "fix its eos_token_id" in err


def test_hand_edited_hf_ids_and_depth_are_one_line(capsys, tmp_path):
    """An HF directory's settings edited out of range: each command that reads them says so in one line (an MTP
    depth of -1 was a StopIteration in export; a negative BOS id an OverflowError; an EOS id past the vocabulary
    was exported as it was)."""
    from tests.hf_models import build

    src = tmp_path / "v3"
    build("v3", src)
    capsys.readouterr()

    def edited(name, file, **fields):
        d = tmp_path / name
        shutil.copytree(src, d)
        path = d / file
        path.write_text(json.dumps({**(json.loads(path.read_text()) if path.is_file() else {}), **fields}))
        return str(d)

    def one_line(argv):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("flyer: error:") and "\n" not in err, err
        return err

    mtp = edited("mtp", "config.json", num_nextn_predict_layers=-1)
    assert "'num_nextn_predict_layers': must be >= 0 (got -1)" in one_line(["export", mtp, "--out", f"{mtp}-hf"])
    bos = edited("bos", "generation_config.json", bos_token_id=-5)
    err = one_line(["export", bos, "--out", f"{bos}-hf"])
    assert "generation_config.json: bos_token_id -5 is not a token id" in err
    assert "bos_token_id -5 is not a token id" in one_line(["generate", "--ckpt", bos, "--prompt", "hi"])
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    eos = edited("eos", "generation_config.json", eos_token_id=[1, vocab])  # the first id past it
    err = one_line(["export", eos, "--out", f"{eos}-hf"])
    assert f"eos_token_id {vocab} is outside the model's vocabulary [0, {vocab})" in err
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer

    n = Tokenizer.from_file(str(src / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    small = edited("small", "config.json", vocab_size=n - 1)  # the embedding and head cut past the tokenizer's
    for f in Path(small).glob("*.safetensors"):
        save_file({k: v[:n - 1] if v.shape[:1] == (vocab,) else v for k, v in load_file(f).items()}, f)
    err = one_line(["export", small, "--out", f"{small}-hf"])
    assert f"its tokenizer has {n} tokens, more than its model's vocab_size {n - 1}" in err
    assert not any(p.name.endswith("-hf") for p in tmp_path.iterdir())  # nothing written
