"""Input a user can get wrong (sizes past any tokenizer, unbounded config files, names the system cannot hold, a
full disk or a directory where the run writes a file) is refused in one line and exit 2, before anything trains."""

import errno
import json
import os
import pathlib

import pytest

from flyer.cli import main
from flyer.data.corpus import find_documents
from flyer.data.tokenizer import check_vocab_size, load_tokenizer
from flyer.errors import DataError, FieldError
from flyer.limits import SIZE_LIMITS
from flyer.train import rundir
from flyer.train.config import TrainConfig
from flyer.train.metrics import truncate_metrics

LONG = "a" * 300  # past a file name's 255 bytes: stat() raises ENAMETOOLONG rather than answering "missing"


@pytest.fixture
def nothing_trains(monkeypatch):
    """Input that gets as far as data preparation was not refused (the BPE trainer would abort on some of it)."""
    def refuse(*_a, **_k):
        raise AssertionError("reached data preparation: the input was not refused")
    monkeypatch.setattr("flyer.train.trainer.prepare_run_data", refuse)


def argv(tmp_path, *extra, unset=()):
    """``flyer train`` args for a one-step tiny run in ``tmp_path``; ``unset``: fields left to a config file."""
    paths = {"out": str(tmp_path / "run"), "data_cache": str(tmp_path / "cache")}
    return ["train", "--preset", "tiny", "--steps", "1", "--batch-size", "2", "--seq-len", "32", "--no-plots",
            "--no-progress", "--threads", "1", "--device", "cpu",
            *(a for name, v in paths.items() if name not in unset for a in ("--" + name.replace("_", "-"), v)),
            *extra]


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flyer: error: "), err
    return err[0]


# ---- 6: vocab_size past any tokenizer ---------------------------------------------------------------------------

def test_a_vocab_size_past_the_limit_is_one_line(tmp_path, capsys, nothing_trains):
    assert main(argv(tmp_path, "--vocab-size", "2147483648")) == 2  # was: the BPE trainer aborted (exit 134)
    line = one_line(capsys)
    assert "vocab-size" in line and str(SIZE_LIMITS["vocab_size"]) in line


def test_vocab_size_is_bounded_by_the_model_limit():
    limit = SIZE_LIMITS["vocab_size"]
    TrainConfig(vocab_size=limit).validate()
    with pytest.raises(FieldError) as e:
        TrainConfig(vocab_size=limit + 1).validate()
    assert e.value.field == "vocab_size"
    assert check_vocab_size(limit) == limit
    with pytest.raises(DataError, match="vocab_size"):
        check_vocab_size(limit + 1)


# ---- 7: a config file read without bound ------------------------------------------------------------------------

def test_a_config_that_is_no_regular_file_is_not_read(tmp_path, capsys, monkeypatch):
    read_text = pathlib.Path.read_text

    def bounded(self, *a, **k):  # keeps this test from eating the machine's memory where the check is missing
        assert str(self) != "/dev/zero", "read /dev/zero whole"
        return read_text(self, *a, **k)
    monkeypatch.setattr(pathlib.Path, "read_text", bounded)
    assert main(argv(tmp_path, "--config", "/dev/zero")) == 2
    assert one_line(capsys) == "flyer: error: --config: cannot read config file /dev/zero: not a regular file"
    for cmd in (["info"], ["plan", "--preset", "tiny"]):  # named as the flag, as a flag's other problems are
        assert main([*cmd, "--config", str(tmp_path / "missing.toml")]) == 2
        assert one_line(capsys).startswith(f"flyer: error: --config: cannot read config file {tmp_path}/missing.toml")


def test_a_config_larger_than_the_bound_is_not_read(tmp_path, capsys):
    big = tmp_path / "big.toml"
    with open(big, "wb") as f:
        f.truncate(64 << 20)  # sparse: no disk used
    assert main(argv(tmp_path, "--config", str(big))) == 2
    line = one_line(capsys)
    assert "config file" in line and "larger than 16 MiB" in line


# ---- 8: collective timeout --------------------------------------------------------------------------------------

@pytest.mark.parametrize("seconds", ["1e15", "1e-7", "0.5", "604801"])
def test_a_collective_timeout_out_of_range_is_one_line(tmp_path, capsys, nothing_trains, seconds):
    assert main(argv(tmp_path, "--collective-timeout", seconds)) == 2  # 1e15: overflow, 1e-7: 0 ms, per rank
    assert "collective" in (line := one_line(capsys)) and "[1, 604800] seconds" in line


def test_collective_timeout_bounds_are_accepted():
    TrainConfig(collective_timeout_s=1).validate()
    TrainConfig(collective_timeout_s=7 * 86400).validate()


# ---- 9: a full disk at the run lock -----------------------------------------------------------------------------

def test_a_full_disk_at_the_lock_is_one_line_and_releases_it(tmp_path, capsys, monkeypatch, nothing_trains):
    real_open = open

    class FullDisk:  # the lock file, on a disk with no room for its PID
        def __init__(self, f):
            self._f = f

        def __getattr__(self, name):
            return getattr(self._f, name)

        def write(self, _text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rundir, "open", lambda *a, **k: FullDisk(real_open(*a, **k)), raising=False)
    assert main(argv(tmp_path)) == 2
    line = one_line(capsys)
    assert "--out: cannot write the run's lock file" in line and "No space left on device" in line
    monkeypatch.undo()
    lock = rundir.RunLock(tmp_path / "run")  # released by the failed run; held again, and exclusive
    try:
        assert (tmp_path / "run" / rundir.LOCK_NAME).read_text() == f"{os.getpid()}\n"
        with pytest.raises(FieldError, match="in use by another run"):
            rundir.RunLock(tmp_path / "run")
    finally:
        lock.close()


# ---- 10: a directory in the metrics temporary's place -----------------------------------------------------------

def test_a_directory_in_the_metrics_temporary_place_is_one_error(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(f'{{"step": {s}, "loss": 1.0}}\n' for s in (1, 2, 3)))
    kept = log.read_bytes()
    (tmp_path / "metrics.tmp").mkdir()
    with pytest.raises(DataError, match=r"metrics\.jsonl: cannot rewrite it to step 2 \(Is a directory: "
                                        r"metrics\.tmp\)"):
        truncate_metrics(log, 2)
    assert log.read_bytes() == kept and (tmp_path / "metrics.tmp").is_dir()


# ---- 11: names too long, a NUL in a path ------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--data", "--tokenizer", "--init"])
def test_a_path_too_long_is_one_line(tmp_path, capsys, nothing_trains, flag):
    assert main(argv(tmp_path, flag, str(tmp_path / LONG))) == 2
    assert one_line(capsys).startswith(f"flyer: error: {flag}: names a path longer than the system allows")


@pytest.mark.parametrize("field", ["out", "data", "tokenizer", "init", "data_cache"])
def test_a_nul_in_a_train_path_is_one_line(tmp_path, capsys, nothing_trains, field):
    config = tmp_path / "nul.toml"
    config.write_text(f'[train]\n{field} = "{tmp_path}/nul\\u0000run"\n')
    assert main(argv(tmp_path, "--config", str(config), unset=(field,))) == 2
    line = one_line(capsys)
    assert f"'{field}'" in line and "without a NUL character" in line


def test_the_data_and_tokenizer_readers_name_a_path_too_long(tmp_path):
    with pytest.raises(DataError, match="cannot be read.*too long"):
        find_documents(str(tmp_path / LONG))
    with pytest.raises(DataError, match="cannot read.*too long"):
        load_tokenizer(tmp_path / LONG)


def test_an_init_it_may_not_read_is_one_line(tmp_path, capsys, monkeypatch, nothing_trains):
    """A path the process may not read (EACCES: a directory of mode 000, which root reads anyway, so the stat is
    made to fail as it fails for anyone else) is one line naming it, not a traceback."""
    init = tmp_path / "model"
    init.mkdir()
    stat = pathlib.Path.stat

    def denied(self, *a, **k):
        if str(self).startswith(str(init)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return stat(self, *a, **k)
    monkeypatch.setattr(pathlib.Path, "stat", denied)
    assert main(argv(tmp_path, "--init", str(init))) == 2
    assert one_line(capsys) == f"flyer: error: {init}: permission denied"


@pytest.mark.parametrize("extra, says", [
    (["--grad-accum", "3", "--ramp-grad-accum", "3", "--ramp-steps", "4"],
     "--ramp-grad-accum: must be in [1, --grad-accum) (--grad-accum 3: "),
    (["--grad-accum", "3", "--ramp-grad-accum", "1"],
     "--ramp-steps: must be a positive integer with --ramp-grad-accum"),
    (["--ramp-steps", "4"], "--ramp-steps: needs --ramp-grad-accum"),
])
def test_a_batch_ramp_that_cannot_run_is_one_line(tmp_path, capsys, nothing_trains, extra, says):
    assert main(argv(tmp_path, *extra)) == 2
    assert one_line(capsys).startswith(f"flyer: error: {says}")


def test_a_batch_ramp_needs_a_step_without_pipelining():
    with pytest.raises(FieldError, match="^ramp_grad_accum: needs a step without pipelining"):
        TrainConfig(preset="tiny", grad_accum=2, ramp_grad_accum=1, ramp_steps=2, pp=2).validate()


def test_an_init_checkpoint_flyer_cannot_read_is_named_as_init(tmp_path, capsys, nothing_trains):
    """A checkpoint's own problem (a config value flyer does not compute, no valid checkpoint in a folder) is one
    line naming ``--init``, as ``generate --ckpt`` and ``export PATH`` name theirs (it began with the file's path)."""
    from tests.hf_models import build

    src = tmp_path / "v3"
    build("v3", src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    (tmp_path / "empty").mkdir()
    for init, says in ((src, "hidden_act"), (tmp_path / "empty", "no valid checkpoint")):
        capsys.readouterr()
        assert main(argv(tmp_path, "--init", str(init))) == 2
        line = one_line(capsys)
        assert line.startswith(f"flyer: error: --init: cannot load checkpoint '{init}': ") and says in line, line


def test_a_seq_len_past_the_init_checkpoints_context_is_said(tmp_path, data_cache):
    """``--seq-len`` past ``--init``'s max_position_embeddings trains (the run's model takes the longer context,
    as its export says) but the log says so, with the RoPE scaling that stays as it was; within it, nothing."""
    from flyer.train.trainer import Trainer
    from tests.hf_models import build

    build("v3", tmp_path / "v3")  # max_position_embeddings 256; YaRN, factor 4 of 64
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    for seq in (300, 256):
        said = []
        t = Trainer(TrainConfig(init=str(tmp_path / "v3"), data=str(text), seq_len=seq, batch_size=1, steps=1,
                                out=str(tmp_path / f"run{seq}"), data_cache=data_cache, device="cpu", threads=1,
                                progress=False, plots=False), log=said.append)
        t.close()
        assert t.cfg.max_seq_len == max(seq, 256)
        past = [m for m in said if "--seq-len" in m]
        assert past == ([f"--seq-len 300 is past {tmp_path / 'v3'}'s context of 256 tokens: the run's model (and its "
                         "export's max_position_embeddings) takes 300, its RoPE unchanged (yarn scaling, factor 4 "
                         "of 64)"] if seq == 300 else [])


def test_errors_word_the_other_fields_they_name_as_flags(tmp_path, capsys, nothing_trains):
    """A field named inside another field's error is worded as its flag on the command line, and stays a field
    name for a library caller; the same word used as a common noun is left alone."""
    chat = tmp_path / "chats.jsonl"
    chat.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    assert main(argv(tmp_path, "--data", str(chat))) == 2
    line = one_line(capsys)
    assert line.startswith("flyer: error: --data: a .jsonl chat file needs --init (") and " or --tokenizer (" in line
    assert "its tokenizer and chat template" in line and "(a tokenizer.json;" in line
    with pytest.raises(FieldError, match=r"^data: a \.jsonl chat file needs init \(.* or tokenizer \(a tokenizer"):
        TrainConfig(preset="tiny", data=str(chat)).validate()
