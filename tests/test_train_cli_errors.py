"""`flyer train` refuses what it cannot honour in one line (exit 2), before any work where it can:
changed settings on resume, a failed checkpoint write, wrong-typed config fields, seeds out of
range, a file in the way of the checkpoints, eval batches that cannot fit, symlink loops in --data."""

import os
import signal
from pathlib import Path

import pytest
from safetensors import SafetensorError

from flyer.cli import build_parser, main
from flyer.data import find_documents
from flyer.errors import CheckpointError
from flyer.runtime import resolve_precision
from flyer.train import checkpoint as ckpt
from flyer.train.cli import build_train_config

WORDS = "latent rope key shared expert group node plane tile block scale router bias token layer".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small generated text file (about 40 KB) and a cache for its tokenizer and shards."""
    root = tmp_path_factory.mktemp("train-cli")
    lines = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(8 + i % 5)) for i in range(600)]
    (root / "text.txt").write_text("\n".join(lines) + "\n")
    return root / "text.txt", root / "cache"


def argv(out, corpus, *extra):
    text, cache = corpus
    return ["train", "--preset", "tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-every", "2",
            "--eval-batches", "1", "--ckpt-every", "2", "--seed", "3", "--warmup", "1", "--lr", "0.003",
            "--vocab-size", "300", "--data", str(text), "--data-cache", str(cache), "--out", str(out), "--no-plots",
            "--no-progress", "--threads", "1", "--device", "cpu", *extra]


def last_error(capsys) -> str:
    """The error line of a refused run (after any lines the run logged), and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("flyer: error: "), err
    return line


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != ".lock"}


# ---- resume -------------------------------------------------------------------------------------
def test_resume_refuses_changed_trajectory_settings_and_names_the_flag(tmp_path, corpus, capsys):
    assert main(argv(tmp_path, corpus)) == 0
    capsys.readouterr()
    before = files(tmp_path)
    here = resolve_precision("auto", "cpu")  # what the run's "auto" trained in; the other precision is refused
    other = "fp32" if here == "bf16" else "bf16"
    for extra, words in [
        (["--lr", "0.5"], "--lr: 0.5 differs from the run's lr 0.003"),
        (["--grad-accum", "2"], "--grad-accum: 2 batches a step (1 data-parallel replicas x 2: --grad-accum x "
                                "--micro-batches under pipelining) differ from the run's 1 (1 x 1;"),
        (["--warmup", "0"], "--warmup: 0 differs from the run's warmup 1"),
        (["--schedule", "constant"], "--schedule: constant differs from the run's schedule cosine"),
        (["--precision", other], f"--precision: {other} is {other} here, but checkpoint "),
        (["--seq-len", "24"], "--seq-len: 24 differs from the run's seq_len 16"),
        (["--batch-size", "3"], "--batch-size: 3 differs from the run's batch_size 2"),
    ]:
        assert main(argv(tmp_path, corpus, "--resume", *extra)) == 2, extra
        line = last_error(capsys)
        assert words in line and "max_seq_len" not in line, line
        assert files(tmp_path) == before
    # what does not change the trajectory stays changeable: extend the run, log and save more often; "auto" set as
    # what it resolved to
    assert main(argv(tmp_path, corpus, "--resume", "--steps", "3", "--eval-every", "1", "--eval-batches", "2",
                     "--ckpt-every", "1", "--keep", "5", "--precision", here)) == 0
    assert ckpt.list_checkpoints(tmp_path / "checkpoints")[0].name == ckpt.step_dir_name(3)


# ---- checkpoint writes --------------------------------------------------------------------------
def test_a_failed_checkpoint_write_of_any_kind_is_one_line_and_keeps_earlier_ones(tmp_path, corpus, capsys,
                                                                                   monkeypatch):
    root = tmp_path / "checkpoints"
    first = ckpt.save_checkpoint(root, 1, {"config.json": {"a": 1}})

    def short_write(*_a, **_k):  # what torch.save raises when the disk fills mid-file
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0\nframe #0: ...")

    monkeypatch.setattr(ckpt.torch, "save", short_write)
    with pytest.raises(CheckpointError, match="unexpected pos 64 vs 0; the earlier checkpoints are intact$"):
        ckpt.save_checkpoint(root, 2, {"optimizer.pt": {"x": 1}})
    assert ckpt.list_checkpoints(root) == [first] and not list(root.glob(".tmp-*"))

    def full_disk(*_a, **_k):  # what safetensors raises when the disk fills mid-file
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                              'space left on device" })')

    monkeypatch.setattr(ckpt, "save_file", full_disk)  # a run's tensors: weights, optimizer state, RNG
    assert main(argv(tmp_path / "run", corpus)) == 2
    assert "cannot write checkpoint step_00000002" in last_error(capsys)
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


# ---- config fields ------------------------------------------------------------------------------
@pytest.mark.parametrize("toml,words", [
    ('lr = "0.1"', "config field 'lr': expected a number, got str '0.1'"),
    ("threads = 1.5", "config field 'threads': expected an integer, got float 1.5"),
    ("out = 5", "config field 'out': expected a string, got int 5"),
    ('resume = "no"', "config field 'resume': expected true or false, got str 'no'"),
    ("steps = true", "config field 'steps': expected an integer, got bool True"),
    ("tensorboard = 3", "config field 'tensorboard': expected true or false or a string, got int 3"),
])
def test_wrong_typed_config_fields_are_refused_before_any_work(tmp_path, corpus, capsys, toml, words):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[train]\n{toml}\n")
    assert main(argv(tmp_path / "run", corpus, "--config", str(cfg))) == 2
    assert words in last_error(capsys)
    assert not (tmp_path / "run").exists()


def test_a_config_int_is_a_good_float(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nlr = 1\nclip = 2\n")
    tc = build_train_config(build_parser().parse_args(["train", "--config", str(cfg)]))
    assert tc.lr == 1 and tc.clip == 2


# ---- seeds --------------------------------------------------------------------------------------
@pytest.mark.parametrize("how,words", [
    (["--seed", str(10**20)], "--seed: must be below 2**64 in magnitude (got a 21-digit number)"),  # flyer.cli's check
    ("seed = -5", "config field 'seed': must be an integer in [0, 2**64) (got -5)"),  # the file's field, no flag
])
def test_seeds_out_of_range_are_refused_at_startup(tmp_path, corpus, capsys, how, words):
    extra = how
    if isinstance(how, str):
        (tmp_path / "c.toml").write_text(f"[train]\n{how}\n")
        extra = ["--config", str(tmp_path / "c.toml")]
    assert main([a for a in argv(tmp_path / "run", corpus) if a not in ("--seed", "3")] + extra) == 2
    line = last_error(capsys)
    assert words in line and "-5000" not in line, line
    assert not (tmp_path / "run").exists()


# ---- the run directory and memory ---------------------------------------------------------------
def test_a_file_named_checkpoints_is_refused_at_start(tmp_path, corpus, capsys):
    (tmp_path / "checkpoints").write_text("not a directory")
    assert main(argv(tmp_path, corpus)) == 2
    assert f"--out: {tmp_path / 'checkpoints'} is a file, not a directory" in last_error(capsys)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_huge_eval_batches_are_refused_before_allocating(tmp_path, corpus, capsys):
    assert main(argv(tmp_path, corpus, "--eval-batches", str(10**12))) == 2
    line = last_error(capsys)
    assert line.startswith("flyer: error: --eval-batches: ") and "needs about" in line, line


def test_a_huge_seq_len_is_blamed_on_seq_len(tmp_path, corpus, capsys):
    assert main(argv(tmp_path, corpus, "--seq-len", "100000000", "--batch-size", "1")) == 2
    line = last_error(capsys)
    assert line.startswith("flyer: error: --seq-len: ") and "needs about" in line, line


# ---- data and other paths -----------------------------------------------------------------------
def test_data_with_symlink_loops_finishes(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "t.txt").write_text("some text\n")
    os.symlink(tmp_path / "a", tmp_path / "a" / "b" / "up")  # a -> b -> up -> a ...
    os.symlink(tmp_path / "a" / "b", tmp_path / "a" / "again")  # the same directory twice
    def endless(*_a):  # pytest.fail, not an OSError, which os.walk would swallow
        pytest.fail("find_documents walked the loop for 20 s")

    old = signal.signal(signal.SIGALRM, endless)
    signal.alarm(20)
    try:
        docs = find_documents(tmp_path / "a")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert [d.path for d in docs] == [(tmp_path / "a" / "b" / "t.txt").resolve()]


@pytest.mark.parametrize("extra,words", [
    (["--init", "/nonexistent/run"], "--init: /nonexistent/run does not exist"),
    (["--data", "/nonexistent/text"], "--data: /nonexistent/text does not exist"),
    (["--tokenizer", "/nonexistent/tokenizer.json"], "--tokenizer: /nonexistent/tokenizer.json does not exist"),
    (["--tokenizer", "/dev/null"], "--tokenizer: /dev/null is not a file (a tokenizer.json)"),
])
def test_path_and_device_flags_are_named(tmp_path, corpus, capsys, extra, words):
    """A path that is not there is named by its flag before the run directory is made (none is left behind)."""
    out = tmp_path / "new" / "run"
    assert main(argv(out, corpus, *extra)) == 2
    assert words in last_error(capsys)
    assert not (tmp_path / "new").exists()


def test_cuda_without_cuda_names_the_device_flag(tmp_path, corpus, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(argv(tmp_path, corpus, "--device", "cuda")) == 2
    assert "--device: cuda asked for, but CUDA is not available" in last_error(capsys)
