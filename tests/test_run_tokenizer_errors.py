"""A flyer run's ``tokenizer.json`` that is not a tokenizer (not JSON, JSON of something else,
truncated, empty, not UTF-8, a directory, unreadable) stops every command that loads it with one
line naming the file (exit 2), never a traceback.

The checkpoint manifest catches a file changed after the checkpoint was written (checksum
mismatch); these cases get past it: a bad file written with the checkpoint (so the manifest vouches
for it), or one the manifest does not list. All loads go through ``flyer.data.tokenizer.load_tokenizer``.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

import flyer.serve.cli as serve_cli
from flyer.cli import main
from flyer.config import preset
from flyer.data import prepare_data
from flyer.data.tokenizer import load_tokenizer, train_bpe
from flyer.errors import CheckpointError, DataError
from flyer.interop import hf
from flyer.model.transformer import Transformer
from flyer.train import checkpoint as ckpt

TEXT = "the quick brown fox jumps over the lazy dog\n"


@pytest.fixture(scope="module")
def parts():
    """(model config, state dict, tokenizer JSON) of a tiny run."""
    cfg = preset("tiny", vocab_size=300)
    tok = train_bpe([TEXT] * 20, vocab_size=300)
    return cfg, Transformer(cfg).state_dict(), json.loads(tok.to_str())


def write_run(root: Path, parts, tokenizer) -> Path:
    """A run directory whose one checkpoint was written with ``tokenizer`` as its tokenizer.json
    (the manifest vouches for it); returns the step directory."""
    cfg, weights, _ = parts
    return ckpt.save_checkpoint(root / "checkpoints", 5, {"model.safetensors": weights, "config.json": cfg.to_dict(),
                                                          "tokenizer.json": tokenizer})


def reseal(step: Path) -> None:
    """Rewrite the manifest for tokenizer.json as it is now (listed when a readable file, else not
    listed): a checkpoint written with this tokenizer.json from the start, or one whose manifest
    skips it."""
    manifest = json.loads((step / "manifest.json").read_text())
    tok = step / "tokenizer.json"
    manifest["files"].pop("tokenizer.json", None)
    if tok.is_file() and os.access(tok, os.R_OK):
        data = tok.read_bytes()
        manifest["files"]["tokenizer.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step / "manifest.json").write_text(json.dumps(manifest))


def one_error_line(capsys, argv) -> str:
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err and "\n" not in err and err.startswith("flyer: error: "), err
    return err


def _directory(p: Path) -> None:
    p.unlink()
    p.mkdir()


def _symlink_loop(p: Path) -> None:  # unreadable even by root: open() fails with ELOOP
    p.unlink()
    p.symlink_to(p.name)


CORRUPT = {
    "not JSON": lambda p: p.write_text("this is not json {"),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "empty": lambda p: p.write_bytes(b""),
    "blank": lambda p: p.write_text("\n  \n"),
    "not UTF-8": lambda p: p.write_bytes(b"\xff\xfe{\x00garbage"),
    "JSON of something else": lambda p: p.write_text(json.dumps({"vocab": [1, 2, 3]})),
    "a directory": _directory,
    "a symlink loop": _symlink_loop,
}
WHY = {"empty": "empty file", "blank": "empty file", "not UTF-8": "not UTF-8", "a directory": "not a file",
       "a symlink loop": "cannot read"}


def check_commands(capsys, tmp_path, run: Path, step: Path, why: str) -> None:
    """generate (run and step directory), serve and export refuse ``run`` in one line naming
    ``step``'s tokenizer.json and ``why``; export writes nothing."""
    named = str(step / "tokenizer.json")
    gen = ["--prompt", "the quick", "--max-new-tokens", "1", "--device", "cpu"]
    for where in (run, step):
        err = one_error_line(capsys, ["generate", "--ckpt", str(where), *gen])
        assert err.startswith("flyer: error: --ckpt: ") and named in err and why in err, err
    err = one_error_line(capsys, ["serve", "--ckpt", str(run), "--port", "0", "--device", "cpu"])
    assert named in err and why in err, err
    out = tmp_path / "hf-out"
    err = one_error_line(capsys, ["export", str(run), "--out", str(out)])
    assert named in err and why in err, err
    assert not out.exists()


@pytest.fixture(autouse=True)
def no_server(monkeypatch):
    """A serve that got past loading would listen forever: fail instead."""
    def reached(*a, **k):
        raise AssertionError("flyer serve loaded a corrupt checkpoint")
    monkeypatch.setattr(serve_cli, "Engine", reached)


@pytest.mark.parametrize("kind", list(CORRUPT))
def test_corrupt_tokenizer_the_manifest_vouches_for(kind, parts, tmp_path, capsys):
    step = write_run(tmp_path / "run", parts, parts[2])
    CORRUPT[kind](step / "tokenizer.json")
    reseal(step)
    ckpt.verify_checkpoint(step)  # verification passes: only the load can tell
    check_commands(capsys, tmp_path, tmp_path / "run", step, WHY.get(kind, "not a valid tokenizer.json"))


@pytest.mark.parametrize("tokenizer", [{"not": "a tokenizer"}, [1, 2], "text", None])
def test_checkpoint_saved_with_a_json_value_that_is_no_tokenizer(tokenizer, parts, tmp_path, capsys):
    step = write_run(tmp_path / "run", parts, tokenizer)
    check_commands(capsys, tmp_path, tmp_path / "run", step, "not a valid tokenizer.json")


def test_changed_tokenizer_is_caught_by_verification_first(parts, tmp_path, capsys):
    """Changed after the checkpoint was written: the checksum names tokenizer.json (a step directory
    refuses in one line; a run directory warns naming it, then finds no valid checkpoint)."""
    step = write_run(tmp_path / "run", parts, parts[2])
    (step / "tokenizer.json").write_text("{}")
    err = one_error_line(capsys, ["export", str(step), "--out", str(tmp_path / "out")])
    assert err == f"flyer: error: path: checkpoint {step}: checksum mismatch in tokenizer.json"
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in lines[-1]
    assert lines[0].startswith("flyer: warning: ") and "checksum mismatch in tokenizer.json" in lines[0]


def test_unreadable_tokenizer_at_verification(parts, tmp_path, capsys, monkeypatch):
    """A listed file this process may not read is a one-line CheckpointError, not a PermissionError
    traceback (simulated: root reads a mode-000 file)."""
    step = write_run(tmp_path / "run", parts, parts[2])
    real = ckpt.sha256_file

    def denied(path):
        if path.name == "tokenizer.json":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)
    monkeypatch.setattr(ckpt, "sha256_file", denied)
    err = one_error_line(capsys, ["export", str(step), "--out", str(tmp_path / "out")])
    assert err == f"flyer: error: path: checkpoint {step}: cannot read tokenizer.json (Permission denied)"


def test_mode_000_tokenizer(parts, tmp_path, capsys):
    step = write_run(tmp_path / "run", parts, parts[2])
    (step / "tokenizer.json").chmod(0)
    try:
        if os.access(step / "tokenizer.json", os.R_OK):
            pytest.skip("this process reads a mode-000 file (root)")
        reseal(step)  # unlisted: past verification, to the load
        check_commands(capsys, tmp_path, tmp_path / "run", step, "cannot read (Permission denied)")
    finally:
        (step / "tokenizer.json").chmod(0o644)


def test_train_init_from_a_run_with_a_bad_tokenizer(parts, tmp_path, capsys):
    """``flyer train --init RUN`` reads the run's tokenizer.json (a resume does not: it keeps the
    data cache's tokenizer, and the checkpoint's is only written)."""
    step = write_run(tmp_path / "run", parts, parts[2])
    (tmp_path / "text.txt").write_text(TEXT * 200)
    argv = ["train", "--init", str(tmp_path / "run"), "--steps", "1", "--batch-size", "1", "--seq-len", "8",
            "--eval-batches", "1", "--data", str(tmp_path / "text.txt"), "--data-cache", str(tmp_path / "cache"),
            "--out", str(tmp_path / "out"), "--no-plots", "--no-progress", "--device", "cpu"]
    for kind in ("not JSON", "a directory", "JSON of something else"):
        CORRUPT[kind](step / "tokenizer.json")
        reseal(step)
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert "Traceback" not in "".join(err) and err[-1].startswith("flyer: error: "), err
        assert str(step / "tokenizer.json") in err[-1] and WHY.get(kind, "not a valid tokenizer.json") in err[-1]
        if (step / "tokenizer.json").is_dir():
            shutil.rmtree(step / "tokenizer.json")
        (step / "tokenizer.json").write_text(json.dumps(parts[2]))


def test_one_guard_for_every_reader(tmp_path, capsys):
    """The loader raises DataError by default, CheckpointError for a checkpoint's; the data cache
    rebuilds past a corrupt cached tokenizer naming it; an HF directory's is refused the same way."""
    (tmp_path / "tokenizer.json").mkdir()
    with pytest.raises(DataError, match="tokenizer.json: not a file"):
        load_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(CheckpointError, match="tokenizer.json: not a file"):
        hf.load_tokenizer(tmp_path, {})
    with pytest.raises(CheckpointError, match="tokenizer.json: does not exist"):
        hf.load_tokenizer(tmp_path / "nowhere", {})
    (tmp_path / "weights_only").mkdir()  # a model saved without its tokenizer: the error says how to add it
    with pytest.raises(CheckpointError, match=r"tokenizer.json: does not exist \(a model directory needs its "
                                              r"tokenizer beside the weights: transformers' tokenizer.save_pretrained"):
        hf.load_tokenizer(tmp_path / "weights_only", {})

    (tmp_path / "text.txt").write_text(TEXT * 200)
    built = prepare_data(tmp_path / "text.txt", tmp_path / "cache", vocab_size=300)
    (built.cache_dir / "tokenizer.json").write_text("[")
    capsys.readouterr()
    again = prepare_data(tmp_path / "text.txt", tmp_path / "cache", vocab_size=300)
    err = capsys.readouterr().err
    assert f"rebuilding data cache {built.cache_dir}: {built.cache_dir / 'tokenizer.json'}: not a valid" in err, err
    assert again.tokenizer.get_vocab_size() == built.tokenizer.get_vocab_size()
