"""Nothing lost, nothing mixed: checkpoint retention, one process per run directory, resume that
finds no valid checkpoint, fresh runs beside old files, and signals that checkpoint and stop."""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from child_env import child_env

from flyer.interop.load import load_pretrained
from flyer.cli import main
from flyer.errors import CheckpointError, FieldError
from flyer.train import checkpoint as ckpt
from flyer.train import training_state
from flyer.train.metrics import MetricsLog, read_metrics
from flyer.train.config import TrainConfig
from flyer.train.rundir import LOCK_NAME, RunLock
from flyer.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def tc_for(out, data_cache, **kw):
    base = dict(preset="tiny", steps=4, batch_size=2, seq_len=32, eval_every=2, eval_batches=1, ckpt_every=2,
                out=str(out), data_cache=data_cache, seed=3, progress=False, plots=False, warmup=1, lr=3e-3,
                device="cpu", threads=1)
    base.update(kw)
    return TrainConfig(**base)


def quiet(_msg):
    pass


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (but the lock, whose content is its owner's PID) and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def steps_logged(out) -> list[int]:
    return [r["step"] for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r]


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flyer: error: "), err
    return err[0]


def last_line(capsys) -> str:
    """The error line after a run's own lines."""
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("flyer: error: "), line
    return line


def train_argv(out, data_cache, *extra):
    return ["train", "--preset", "tiny", "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--eval-every",
            "2", "--eval-batches", "1", "--ckpt-every", "2", "--seed", "3", "--data-cache", data_cache, "--out",
            str(out), "--no-plots", "--no-progress", "--threads", "1", "--device", "cpu", *extra]


# ---- data loss ---------------------------------------------------------------------------------
def test_a_resume_says_the_switches_it_changes(tmp_path, data_cache):
    """Switches a resume may change but that change what the remaining steps compute (FP4 QAT, the FP8 activation
    cache, the thread count CPU sums depend on) were taken without a word: the resume's line names each."""
    Trainer(tc_for(tmp_path, data_cache, threads=1), log=quiet).run()
    said = []
    Trainer(tc_for(tmp_path, data_cache, resume=True, threads=2, fp8_activation_cache="input"), log=said.append)
    line = next(m for m in said if m.startswith("resumed from"))
    assert "; fp8_activation_cache fp8 -> input" in line and "; threads 1 -> 2" in line
    assert "fp4_experts" not in line


def test_a_step_directory_renamed_or_copied_is_not_resumed_as_its_name(tmp_path, data_cache, capsys):
    """A copy of step 2 named step 30 was resumed silently ("resumed from step_00000030 at step 2"), the newer valid
    step 4 ignored, and generate and export took its weights as the run's newest: its manifest's step must be its
    name's, else it is passed over with a warning, as any invalid checkpoint."""
    assert main(train_argv(tmp_path, data_cache)) == 0
    root = tmp_path / "checkpoints"
    shutil.copytree(root / ckpt.step_dir_name(2), root / ckpt.step_dir_name(30))
    with pytest.raises(CheckpointError, match="its manifest says step 2, its directory's name another"):
        ckpt.verify_checkpoint(root / ckpt.step_dir_name(30))
    assert ckpt.newest_valid_checkpoint(root)[0] == root / ckpt.step_dir_name(4)
    capsys.readouterr()
    assert main(train_argv(tmp_path, data_cache, "--steps", "6", "--resume")) == 0
    assert steps_logged(tmp_path) == [1, 2, 3, 4, 5, 6]


def test_keep_never_prunes_the_valid_checkpoints_for_an_invalid_newer_one(tmp_path, data_cache):
    Trainer(tc_for(tmp_path, data_cache), log=quiet).run()
    root = tmp_path / "checkpoints"
    (root / ckpt.step_dir_name(99)).mkdir()  # invalid (no manifest), numbered above everything
    Trainer(tc_for(tmp_path, data_cache, steps=6, keep=1, resume=True), log=quiet).run()
    names = [p.name for p in ckpt.list_checkpoints(root)]
    assert names == [ckpt.step_dir_name(s) for s in (99, 6, 4)]  # 6 just written, 4 resumed from
    ckpt.verify_checkpoint(root / ckpt.step_dir_name(6))
    with pytest.warns(UserWarning):  # the invalid step_00000099 is skipped
        model, cfg, tok = load_pretrained(tmp_path)


def test_prune_keeps_the_newest_valid_and_protected(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (1, 2, 3, 4):
        ckpt.save_checkpoint(root, s, {"config.json": {"s": s}})
    (root / ckpt.step_dir_name(5) / "manifest.json").parent.mkdir()
    (root / ckpt.step_dir_name(5) / "manifest.json").write_text("{")  # corrupt
    ckpt.prune(root, keep=2, protect=(root / ckpt.step_dir_name(1),))
    assert [p.name for p in ckpt.list_checkpoints(root)] == [ckpt.step_dir_name(s) for s in (5, 4, 3, 1)]


def test_two_trainers_never_share_a_run_directory(tmp_path, data_cache, capsys):
    first = Trainer(tc_for(tmp_path, data_cache), log=quiet)
    with pytest.raises(FieldError) as e:
        Trainer(tc_for(tmp_path, data_cache), log=quiet)
    assert e.value.field == "out" and f"pid {os.getpid()}" in str(e.value)
    assert main(train_argv(tmp_path, data_cache)) == 2
    assert f"--out: {tmp_path} is in use by another run (pid {os.getpid()})" in one_line(capsys)
    first.run()  # the owner is unaffected, and releases the directory at its end
    assert steps_logged(tmp_path) == [1, 2, 3, 4]
    Trainer(tc_for(tmp_path, data_cache, steps=5, resume=True), log=quiet).run()
    assert steps_logged(tmp_path) == [1, 2, 3, 4, 5]


def test_the_run_lock_holds_when_its_file_is_deleted(tmp_path):
    """The lock file deleted while a run holds it (its lock goes with the inode): a second run still finds the
    directory held (the directory itself is locked too), and gets it once the first lets go."""
    first = RunLock(tmp_path)
    (tmp_path / LOCK_NAME).unlink()
    with pytest.raises(FieldError, match="is in use by another run"):
        RunLock(tmp_path)
    first.close()
    RunLock(tmp_path).close()


@pytest.mark.slow
def test_a_second_process_on_the_same_out_is_refused(tmp_path, data_cache):
    env = child_env()
    owner = Trainer(tc_for(tmp_path, data_cache), log=quiet)
    res = subprocess.run([sys.executable, "-m", "flyer", *train_argv(tmp_path, data_cache)], capture_output=True,
                         text=True, timeout=300, env=env)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"flyer: error: --out: {tmp_path} is in use by another run "
                                               f"(pid {os.getpid()}); wait for it to end or use another run directory"]
    owner.close()


def test_resume_with_only_corrupt_checkpoints_stops_and_changes_nothing(tmp_path, data_cache, capsys):
    Trainer(tc_for(tmp_path, data_cache), log=quiet).run()
    for d in ckpt.list_checkpoints(tmp_path / "checkpoints"):
        with open(d / "model.safetensors", "r+b") as f:
            f.truncate(100)
    (tmp_path / "checkpoints" / ".tmp-step_00000006-1").mkdir()  # a dead writer's leftovers stay too
    before = snapshot(tmp_path)
    assert main(train_argv(tmp_path, data_cache, "--steps", "6", "--resume")) == 2
    line = one_line(capsys)
    assert "none of the 2 checkpoint(s)" in line and "is valid" in line and "nothing was changed" in line
    assert snapshot(tmp_path) == before
    assert (tmp_path / "checkpoints" / ".tmp-step_00000006-1").is_dir()


@pytest.mark.parametrize("stray", ["file", "link"])
def test_an_entry_in_a_checkpoints_place_is_refused_before_training(tmp_path, data_cache, capsys, stray):
    root = tmp_path / "checkpoints"
    root.mkdir()
    (tmp_path / "elsewhere").mkdir()
    if stray == "file":  # not ours: a save that replaced it would fail there, after training the step
        (root / "step_00000002").write_text("notes")
    else:
        (root / "step_00000002").symlink_to(tmp_path / "elsewhere")
    before = snapshot(tmp_path)
    assert main(train_argv(tmp_path, data_cache)) == 2
    assert "step_00000002 is named as a checkpoint but is not a checkpoint directory" in one_line(capsys)
    assert snapshot(tmp_path) == before and not (tmp_path / "metrics.jsonl").exists()


def test_a_fresh_run_never_appends_to_old_metrics(tmp_path, data_cache, capsys):
    old = '{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.0}\n'
    (tmp_path / "metrics.jsonl").write_text(old)
    assert main(train_argv(tmp_path, data_cache)) == 2
    line = one_line(capsys)
    assert "--resume: not set, but" in line and "already holds a run (metrics.jsonl)" in line
    assert (tmp_path / "metrics.jsonl").read_text() == old
    # resuming a run that died before its first checkpoint starts it over, its old records dropped
    assert main(train_argv(tmp_path, data_cache, "--resume")) == 0
    recs = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and 9.0 not in [r["loss"] for r in recs]


def test_resume_rules_seed_and_finished_runs(tmp_path, data_cache, capsys):
    Trainer(tc_for(tmp_path, data_cache), log=quiet).run()
    capsys.readouterr()
    before = snapshot(tmp_path)
    assert main(train_argv(tmp_path, data_cache, "--resume", "--seed", "4")) == 2
    assert "--seed: 4 differs from the run's seed 3" in one_line(capsys)
    assert snapshot(tmp_path) == before
    # the run's own settings (tc_for's): a resume refuses changed ones
    assert main(train_argv(tmp_path, data_cache, "--resume", "--lr", "0.003", "--warmup", "1")) == 0
    err = capsys.readouterr().err
    assert "already at step 4 (steps 4): nothing to do" in err
    assert snapshot(tmp_path) == before


def test_diverging_run_exits_2_without_claiming_a_checkpoint(tmp_path, data_cache, capsys, monkeypatch):
    from flyer.train import trainer

    # every step's gradient norm non-finite (--lr is bounded, so no longer the way to diverge)
    monkeypatch.setattr(trainer, "clip_gradients", lambda *a, **k: (float("nan"), None))
    assert main(train_argv(tmp_path, data_cache, "--steps", "30", "--ckpt-every", "20")) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after the run's own lines and warnings
    assert line.startswith("flyer: error: ")
    assert "consecutive steps with non-finite" in line and "no checkpoint was written" in line
    assert ckpt.list_checkpoints(tmp_path / "checkpoints") == []


def test_failed_checkpoint_write_leaves_the_previous_one_and_no_temporaries(tmp_path, data_cache, monkeypatch):
    root = tmp_path / "checkpoints"
    t = Trainer(tc_for(tmp_path, data_cache), log=quiet)
    t.train_step()
    first = t.save()

    def disk_full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", disk_full)  # a run's tensors: weights, optimizer state, RNG
    t.train_step()
    with pytest.raises(CheckpointError, match="No space left on device.*earlier checkpoints are intact"):
        t.save()
    assert ckpt.list_checkpoints(root) == [first] and not list(root.glob(".tmp-*"))
    ckpt.verify_checkpoint(first)
    monkeypatch.undo()  # space freed: the run resumes from the intact checkpoint
    t.close()
    assert Trainer(tc_for(tmp_path, data_cache, resume=True), log=quiet).step == 1


@pytest.mark.parametrize("damage", ["bytes", "list", "step"])
def test_a_damaged_metrics_log_does_not_block_resume(tmp_path, data_cache, capsys, damage):
    """Lines that are no record (bytes that are no UTF-8, JSON of another kind, a step that is no number) are passed
    over and dropped by the resume's rewrite, which keeps every record up to its checkpoint."""
    assert main(train_argv(tmp_path, data_cache)) == 0
    capsys.readouterr()
    log = tmp_path / "metrics.jsonl"
    kept = log.read_bytes()
    log.write_bytes(kept + {"bytes": b"\xff\xfe{\n", "list": b"[1, 2]\n", "step": b'{"step": "x"}\n'}[damage])
    assert main(train_argv(tmp_path, data_cache, "--steps", "6", "--resume")) == 0
    assert steps_logged(tmp_path) == [1, 2, 3, 4, 5, 6] and log.read_bytes().startswith(kept)


@pytest.mark.parametrize("damage", ["step key", "short row"])
def test_a_record_damaged_inside_ends_the_run_with_plots_said_not_a_trace(tmp_path, data_cache, capsys, damage):
    """A byte hit in a record's "step" key made it a record of step 0, and an expert_load row cut short made numpy
    raise: the run, saved, ended in a stack trace (exit 1) drawing its plots, and so did every resume. The first is
    no record now; the second is said in a line, the plots left out, and the run ends 0 and resumes."""
    argv = [a for a in train_argv(tmp_path, data_cache) if a != "--no-plots"]
    assert main(argv) == 0
    capsys.readouterr()
    log = tmp_path / "metrics.jsonl"
    lines = log.read_text().splitlines()
    first = json.loads(lines[0])
    if damage == "step key":
        lines[0] = json.dumps({"stap" if k == "step" else k: v for k, v in first.items()})
    else:
        lines[0] = json.dumps({**first, "expert_load": [row[:-1] for row in first["expert_load"]]})
    log.write_text("\n".join(lines) + "\n")
    assert main([*argv[:argv.index("--steps") + 1], "6", *argv[argv.index("--steps") + 2:], "--resume"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert ("cannot draw the plots" in err) == (damage == "short row")
    assert steps_logged(tmp_path)[-1] == 6


def test_a_plot_stopped_while_drawn_leaves_the_old_one_whole(tmp_path, monkeypatch):
    """The plots were drawn straight into their files: a run stopped meanwhile (a second signal, a kill) left a
    torn PNG in place of the last good one. Now a plot is whole or the old one stays, with no temporary beside it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from flyer.train import plots

    path = tmp_path / "loss.png"
    path.write_bytes(b"the last good plot")
    real = FigureCanvasAgg.print_png

    def torn(self, where, **kw):  # writes part of the image where it was told to, then is stopped
        whole = io.BytesIO()
        real(self, whole, **{k: kw[k] for k in ("metadata", "pil_kwargs") if k in kw})
        with contextlib.ExitStack() as stack:
            f = stack.enter_context(open(where, "wb")) if isinstance(where, (str, os.PathLike)) else where
            f.write(whole.getvalue()[:64])
        raise KeyboardInterrupt

    records = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5, "val_loss": 2.6}]
    monkeypatch.setattr(FigureCanvasAgg, "print_png", torn)
    with pytest.raises(KeyboardInterrupt):
        plots.plot_loss(records, path)
    assert path.read_bytes() == b"the last good plot" and os.listdir(tmp_path) == ["loss.png"]
    monkeypatch.setattr(FigureCanvasAgg, "print_png", real)
    mask = os.umask(0o022)
    try:
        plots.plot_loss(records, path)
    finally:
        os.umask(mask)
    assert path.read_bytes().startswith(b"\x89PNG") and os.listdir(tmp_path) == ["loss.png"]
    assert path.stat().st_mode & 0o777 == 0o644  # as open() makes it (the temporary file's own mode is 0600)


def test_each_rank_resumes_only_the_checkpoint_rank_0_verified(tmp_path, data_cache, monkeypatch):
    """Only rank 0 chose and verified the checkpoint; another node's copy of it (its own disk) was loaded unchecked:
    a damaged one trained on silently, one of another step resumed that rank at another step (mismatched
    collectives, then "another rank stopped answering"). A copy with another manifest is refused now, and the first
    rank on a copy of its own verifies its checksums; a rank reading rank 0's very files does not hash them again."""
    Trainer(tc_for(tmp_path / "run", data_cache), log=quiet).run()
    root = tmp_path / "run" / "checkpoints"
    ours = root / "step_00000004"

    class Rank1:
        rank, world = 1, 2

    def views(theirs):
        return [training_state._view(ours), training_state._view(theirs)]

    hashed = []
    monkeypatch.setattr(training_state, "verify_checkpoint", lambda p: hashed.append(p) or ckpt.verify_checkpoint(p))
    training_state.same_checkpoint(ours, Rank1, views(ours))  # the same files: trusted
    assert hashed == []
    other = tmp_path / "node1" / "step_00000004"
    shutil.copytree(root / "step_00000002", other)
    with pytest.raises(CheckpointError, match="rank 1's copy is not rank 0's .another manifest"):
        training_state.same_checkpoint(other, Rank1, views(other))
    shutil.rmtree(other)
    shutil.copytree(ours, other)
    training_state.same_checkpoint(other, Rank1, views(other))  # an intact copy: verified, and taken
    assert hashed == [other]
    training_state.same_checkpoint(other, Rank1, [None, training_state._view(other)])  # rank 0's unreadable
    assert hashed == [other, other]  # (rank 0 says why); this copy verified, not a TypeError
    weights = other / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        training_state.same_checkpoint(other, Rank1, views(other))


def test_a_metrics_log_that_is_a_directory_is_one_line(tmp_path, data_cache, capsys):
    assert main(train_argv(tmp_path, data_cache)) == 0
    capsys.readouterr()
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "metrics.jsonl").mkdir()
    assert main(train_argv(tmp_path, data_cache, "--steps", "6", "--resume")) == 2
    assert "metrics.jsonl: not a file (the run's metrics log)" in last_line(capsys)


def disk_full_at(monkeypatch, step: int) -> list[dict]:
    """metrics.jsonl's write of ``step``'s record fails as on a full disk, a line cut short left behind; returns the
    list the refused records go to."""
    write, refused = MetricsLog.write, []

    def full(self, record):
        if record["step"] == step:
            refused.append(json.loads(json.dumps(record)))
            self._f.write('{"step": 3, "lo')  # what fitted
            raise OSError(28, "No space left on device")
        write(self, record)
    monkeypatch.setattr(MetricsLog, "write", full)
    return refused


def test_a_log_that_cannot_be_written_saves_the_step_reached(tmp_path, data_cache, capsys, monkeypatch):
    """A full disk under metrics.jsonl mid-run: the step reached is checkpointed, then one line and exit 2; the run
    resumes from it once there is room."""
    refused = disk_full_at(monkeypatch, 3)
    assert main(train_argv(tmp_path, data_cache, "--ckpt-every", "4")) == 2
    line = last_line(capsys)
    assert "cannot write the run's logs after step 3 (No space left on device)" in line
    assert "step_00000003 saved" in line
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step_00000003"]
    monkeypatch.undo()
    assert main(train_argv(tmp_path, data_cache, "--ckpt-every", "4", "--resume")) == 0
    # step 3's record, which the disk refused, is the checkpoint's: the resume writes it (it was lost)
    assert steps_logged(tmp_path) == [1, 2, 3, 4]
    assert read_metrics(tmp_path / "metrics.jsonl")[2] == refused[0] and refused[0]["loss"] > 0


def test_a_full_disk_on_resume_leaves_the_log_as_it_was(tmp_path, data_cache, capsys, monkeypatch):
    assert main(train_argv(tmp_path, data_cache)) == 0
    capsys.readouterr()
    before = snapshot(tmp_path)

    def disk_full(self, *_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    assert main(train_argv(tmp_path, data_cache, "--steps", "6", "--resume")) == 2
    assert "cannot rewrite it to step 4 (No space left on device)" in last_line(capsys)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("manifest", ["list", "empty", "unlisted"])
def test_a_manifest_that_does_not_cover_its_checkpoint_is_invalid(tmp_path, data_cache, manifest):
    """A manifest whose files are no mapping, or which leaves a file out, verifies nothing: the checkpoint is
    invalid (resume falls back past it), not loaded unchecked."""
    Trainer(tc_for(tmp_path, data_cache), log=quiet).run()
    last = ckpt.list_checkpoints(tmp_path / "checkpoints")[0]
    m = json.loads((last / "manifest.json").read_text())
    if manifest == "list":
        m["files"] = list(m["files"])
    elif manifest == "empty":
        m["files"] = {}
    else:
        m["files"].pop("model.safetensors")
    (last / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="malformed manifest" if manifest == "list" else "not in its manifest"):
        ckpt.verify_checkpoint(last)
    assert ckpt.newest_valid_checkpoint(tmp_path / "checkpoints")[0].name == "step_00000002"


def test_interrupted_checkpoint_write_leaves_no_temporaries(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt  # Ctrl-C outside the training loop's own handling

    monkeypatch.setattr(ckpt, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(root, 1, {"config.json": {"a": 1}, "model.safetensors": {}})
    assert list(root.iterdir()) == []


# ---- signals ------------------------------------------------------------------------------------
def _signal_run_argv(out, data_cache) -> list[str]:
    return train_argv(out, data_cache, "--steps", "12", "--ckpt-every", "100", "--eval-every", "6")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_cache):
    """The uninterrupted run each signal's run must reproduce (one for all the signals): its losses
    by step and its summary's val_loss. In this process: only the signalled run needs one of its own."""
    out = tmp_path_factory.mktemp("signals") / "ref"
    with contextlib.redirect_stdout(io.StringIO()) as summary:
        assert main(_signal_run_argv(out, data_cache)) == 0
    losses = {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}
    return losses, json.loads(summary.getvalue())["val_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_checkpoints_stops_and_resumes_exactly(tmp_path, data_cache, sig, uninterrupted, capsys):
    env = child_env()
    run = tmp_path / "x"
    args = _signal_run_argv(run, data_cache)
    proc = subprocess.Popen([sys.executable, "-m", "flyer", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.time() + 300
    while len(steps_logged(run)) < 3:
        assert proc.poll() is None and time.time() < deadline, "run ended before its third step"
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, err
    saved = ckpt.list_checkpoints(run / "checkpoints")
    assert len(saved) == 1 and not list((run / "checkpoints").glob(".tmp-*"))
    step = int(saved[0].name.removeprefix("step_"))
    assert 3 <= step < 12 and f"{sig.name}: stopped after step {step}; checkpoint {saved[0]} saved" in err
    if sig != signal.SIGTERM:  # one handler for every signal: the checkpoint it saved resumes alike (SIGTERM's)
        return
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0  # the resume needs no process of its own
    a, val_loss = uninterrupted
    b = {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}
    assert sorted(b) == list(range(1, 13)) and a == b  # bit-identical to the uninterrupted run
    assert json.loads(capsys.readouterr().out)["val_loss"] == val_loss


# a run whose final plot is signalled midway (in a process of its own: before, the signal ended it)
_SIGNAL_IN_PLOTS = """
import os, signal, sys
from flyer.cli import main
from flyer.train import plots
plot_loss = plots.plot_loss
def signalled(*a, **k):
    os.kill(os.getpid(), signal.SIGTERM)
    plot_loss(*a, **k)
plots.plot_loss = signalled
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_signal_after_the_last_step_lets_the_run_finish(tmp_path, data_cache):
    argv = [a for a in train_argv(tmp_path, data_cache) if a != "--no-plots"]
    res = subprocess.run([sys.executable, "-c", _SIGNAL_IN_PLOTS, *argv], capture_output=True, text=True,
                         timeout=300, env=child_env())
    assert res.returncode == 0, res.stderr
    assert "SIGTERM: received after the last step; the run is complete" in res.stderr
    assert (tmp_path / "loss.png").is_file() and (tmp_path / "expert_load.png").is_file()
    assert json.loads(res.stdout)["steps"] == 4 and steps_logged(tmp_path) == [1, 2, 3, 4]


# ---- resources ----------------------------------------------------------------------------------
def test_sizes_that_cannot_fit_are_refused_before_allocating(tmp_path, data_cache, capsys):
    assert main(train_argv(tmp_path, data_cache, "--batch-size", "100000", "--seq-len", "2048")) == 2
    line = one_line(capsys)
    assert line.startswith("flyer: error: --batch-size: training ") and "at batch 100000 x 2048 needs about" in line
    assert "GiB available" in line and not (tmp_path / "metrics.jsonl").exists()
    assert main(["generate", "--preset", "dsv3", "--prompt", "hi"]) == 2  # 671B parameters: 2.5 TiB in FP32
    assert "--preset: dsv3 (671.0B parameters in FP32) needs about" in one_line(capsys)


def test_training_memory_estimate_is_a_lower_bound_of_the_usual_runs(data_cache):
    from flyer.config import preset
    from flyer.train.build import training_memory_bytes

    small = training_memory_bytes(preset("small"), TrainConfig(), "bf16")
    assert 0.5 * 2**30 < small < 4 * 2**30  # the default run: about 1.3 GiB
    moe = preset("tiny")
    assert training_memory_bytes(moe, TrainConfig(), "fp32", ep=4) < training_memory_bytes(moe, TrainConfig(), "fp32")


def test_collective_timeout_is_a_flag_with_a_default(monkeypatch):
    from flyer.config import ConfigError
    from flyer.parallel import mesh

    assert TrainConfig().collective_timeout_s == 300
    with pytest.raises(ConfigError, match="collective_timeout_s"):
        TrainConfig(collective_timeout_s=float("nan")).validate()
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(mesh, "init_distributed", lambda *a, **kw: seen.update(kw))
    mesh.init_mesh(None, timeout_s=7.5)
    assert seen["timeout_s"] == 7.5


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGSTOP, signal.SIGKILL])
def test_a_stopped_rank_is_named_after_the_collective_timeout(tmp_path, data_cache, how):
    """A rank that stops answering (SIGSTOP) is named once the collective timeout passes; one that dies (SIGKILL:
    its connections close) at once, in one line, where the survivor printed gloo's trace ("Connection reset by
    peer")."""
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "flyer",
            *train_argv(run, data_cache, "--steps", "400", "--ep", "2", "--collective-timeout", "4",
                        "--ckpt-every", "1000", "--eval-every", "1000")]
    env = child_env(OMP_NUM_THREADS="1")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    guard = threading.Timer(300, os.killpg, (proc.pid, signal.SIGKILL))  # a hung job ends the test
    try:
        deadline = time.time() + 300
        while len(steps_logged(run)) < 2:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.05)
        rank1 = next(int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _is_rank(int(pid), 1, run))
        os.kill(rank1, how)
        guard.start()
        err = ""
        for line in proc.stderr:  # until rank 0 names the silent rank
            err += line
            if "flyer: error: rank 0:" in line:
                break
        # torchrun then gives the stopped rank 30 s to answer its SIGTERM before a SIGKILL: send it now
        with contextlib.suppress(ProcessLookupError):
            os.kill(rank1, signal.SIGKILL)
        err += proc.stderr.read()
        proc.wait(timeout=300)
    finally:
        guard.cancel()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the stopped rank, if torchrun left it
    if how == signal.SIGSTOP:
        assert "rank(s) 1 stopped answering" in err, err[-3000:]
        assert "flyer: error: rank 0: a collective got no answer within 4 s" in err
    else:
        assert "flyer: error: rank 0: a collective's connection closed after step" in err, err[-3000:]
        assert "rank(s) 1 ended (its own lines say why)" in err and "[rank0]: Traceback" not in err


def _torchrun(argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """``flyer`` ``argv`` on 2 gloo ranks."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "flyer", *argv], capture_output=True, text=True,
                          env=env or child_env(OMP_NUM_THREADS="1"), timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["corrupt", "precision", "config"])
def test_an_error_every_rank_raises_is_said_once(tmp_path, data_cache, case):
    """A resume refused alike on every rank (its only checkpoint corrupt; another precision, which each rank checks
    of its copy; a config file's value, which rank 0 checks) printed the line once per rank (hundreds of copies on a
    cluster, and two ranks' lines could run together). Rank 0 alone says it now, in one write."""
    run = tmp_path / "run"
    first = train_argv(run, data_cache, "--steps", "2", "--precision", "bf16")
    if case == "corrupt":
        assert main(first) == 0
        weights = run / "checkpoints" / "step_00000002" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-8])
    else:
        assert _torchrun(first).returncode == 0
    extra = {"corrupt": ("--precision", "bf16"), "precision": ("--precision", "fp32"), "config": ("--precision", "bf16",
                                                                                             "--config", "ga.toml")}
    (tmp_path / "ga.toml").write_text("[train]\ngrad_accum = 2\n")
    argv = train_argv(run, data_cache, "--steps", "4", "--resume", *extra[case])
    argv = [str(tmp_path / a) if a == "ga.toml" else a for a in argv]
    done = _torchrun(argv)
    lines = [line for line in done.stderr.splitlines() if "flyer: error:" in line]
    want = {"corrupt": "none of the 1 checkpoint(s)", "precision": "--precision: fp32", "config": "config field "
            "'grad_accum'"}[case]
    assert len(lines) == 1 and lines[0].startswith(f"flyer: error: {want}"), done.stderr[-3000:]
    assert "{" not in lines[0]  # a config field's message names the other fields, not their placeholders


# rank 1's view of the run's checkpoints/ is read-only (a node that mounted it so): its writes there fail
_READ_ONLY_RANK1 = """
import builtins, errno, io, os
_open = builtins.open
def _guarded(file, mode="r", *a, **k):
    if os.environ.get("RANK") == "1" and "/checkpoints/" in str(file) and any(c in mode for c in "wax+"):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
    return _open(file, mode, *a, **k)
builtins.open = io.open = _guarded
"""


@pytest.mark.slow
def test_a_rank_that_cannot_write_the_checkpoints_is_refused_before_training(tmp_path, data_cache):
    """Each rank writes its part of a checkpoint into the shared folder; one whose view of it is read-only failed
    the first save, after --ckpt-every steps were trained (all lost). The ranks try a write at the start now."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_READ_ONLY_RANK1)
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "flyer",
            *train_argv(run, data_cache, "--steps", "4", "--ckpt-every", "4", "--ep", "2")]  # rank 1 writes experts
    env = child_env(OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(hook), env["PYTHONPATH"]])
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in done.stderr.splitlines() if "flyer: error:" in line]
    assert lines == [f"flyer: error: rank 1 cannot write in {run / 'checkpoints'} (Read-only file system), where "
                     "every rank writes its part of each checkpoint: nothing was trained"], done.stderr[-3000:]
    assert not (run / "metrics.jsonl").exists() or steps_logged(run) == []


def _is_rank(pid: int, rank: int, run: Path) -> bool:
    """Whether process ``pid`` is rank ``rank`` of the flyer run writing to ``run``."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return f"RANK={rank}".encode() in environ and str(run).encode() in cmdline and b"torch.distributed.run" \
        not in cmdline


# ---- checkpoint directories as users and other systems leave them ------------------------------------------------

def test_a_step_named_entry_without_a_number_is_not_a_checkpoint(tmp_path):
    """A user's ``step_latest`` folder is neither listed nor refused, and listing does not fail on its name."""
    root = tmp_path / "checkpoints"
    good = ckpt.save_checkpoint(root, 1, {"config.json": {"a": 1}})
    (root / "step_latest").mkdir()
    assert ckpt.list_checkpoints(root) == [good]
    ckpt.check_step_names(root)
    assert ckpt.find_valid_checkpoint(root, log=lambda m: None) == good


def test_hidden_files_with_a_read_suffix_are_not_the_checkpoints(tmp_path):
    """macOS's AppleDouble ``._config.json`` or a hidden ``.notes.json`` is no reader's file: the checkpoint stays
    valid."""
    step = ckpt.save_checkpoint(tmp_path / "checkpoints", 1, {"config.json": {"a": 1}})
    (step / "._config.json").write_bytes(b"\x00\x05\x16\x07")
    (step / ".notes.json").write_text("{}")
    ckpt.verify_checkpoint(step)


def test_a_checkpoint_with_one_just_written_file_is_hashed_again(tmp_path, monkeypatch):
    """Verified stamps are remembered only when every file is older than the mtime granularity: a file written just
    now (the others old) could change again within its mtime tick, so it is hashed at each verification."""
    step = ckpt.save_checkpoint(tmp_path / "checkpoints", 1, {"config.json": {"a": 1}, "state.json": {"step": 1}})
    old = time.time() - 60
    os.utime(step / "config.json", (old, old))
    hashed = []
    real = ckpt.sha256_file
    monkeypatch.setattr(ckpt, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    ckpt.verify_checkpoint(step)
    ckpt.verify_checkpoint(step)
    assert hashed.count("state.json") == 2


def test_a_manifest_entry_without_its_size_is_malformed(tmp_path):
    """An entry with its SHA-256 but no size is a ``CheckpointError`` naming the manifest, not a ``KeyError``."""
    step = ckpt.save_checkpoint(tmp_path / "checkpoints", 1, {"config.json": {"a": 1}})
    m = json.loads((step / "manifest.json").read_text())
    del m["files"]["config.json"]["bytes"]
    (step / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="malformed manifest"):
        ckpt.verify_checkpoint(step)


def test_a_listed_file_that_is_gone_falls_back_to_the_previous_checkpoint(tmp_path):
    """A newest checkpoint missing a file its manifest lists is reported and passed over."""
    root = tmp_path / "checkpoints"
    first = ckpt.save_checkpoint(root, 1, {"config.json": {"a": 1}, "state.json": {"step": 1}})
    second = ckpt.save_checkpoint(root, 2, {"config.json": {"a": 2}, "state.json": {"step": 2}})
    (second / "state.json").unlink()
    path, problems = ckpt.newest_valid_checkpoint(root)
    assert path == first and "missing file state.json" in problems[0]


def test_check_layout_names_a_field_only_this_run_has(tmp_path):
    """A checkpoint with its optimizer state per rank: a layout field it lacks (saved before the field existed) and
    this run sets is refused, not ignored."""
    (tmp_path / "state.json").write_text(json.dumps({"step": 1, "layout": {"world": 1, "pp": 1}}))
    training_state.check_layout(tmp_path, {"world": 1, "pp": 1})
    with pytest.raises(CheckpointError, match="zero=None; this run has zero=1"):
        training_state.check_layout(tmp_path, {"world": 1, "pp": 1, "zero": 1})


def test_start_metrics_keeps_a_stale_log_and_trims_a_resumed_one(tmp_path):
    """A fresh run in a directory with a log (its checkpoints moved away) keeps that log under the next free
    ``metrics.jsonl.N``; a resumed run's log loses the records past its checkpoint's step."""
    from flyer.train.rundir import METRICS_NAME, start_metrics

    log = tmp_path / METRICS_NAME
    said = []
    start_metrics(tmp_path, None, said.append)  # no log: nothing to do
    assert not log.exists() and said == []
    write = lambda steps: log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in steps))  # noqa: E731
    write(range(1, 6))
    start_metrics(tmp_path, 3, said.append)
    assert [r["step"] for r in read_metrics(log)] == [1, 2, 3] and said == []
    for n in (1, 2):
        write(range(1, 5))
        start_metrics(tmp_path, None, said.append)
        assert not log.exists() and [r["step"] for r in read_metrics(tmp_path / f"{METRICS_NAME}.{n}")] == [1, 2, 3, 4]
    assert said == [f"the earlier {METRICS_NAME} is now {METRICS_NAME}.{n}" for n in (1, 2)]


def test_a_resume_that_moves_the_last_step_says_what_the_learning_rate_does(tmp_path, data_cache):
    """--steps may grow or shrink on resume; the cosine decay then ends at the new last step, so the next step's
    rate jumps: the log gives it before and after."""
    from flyer.train.config import lr_at

    Trainer(tc_for(tmp_path, data_cache, ckpt_every=4), log=quiet).run()
    for steps in (8, 6):
        said = []
        t = Trainer(tc_for(tmp_path, data_cache, steps=steps, resume=True), log=said.append)
        t.close()
        old, new = lr_at(tc_for(tmp_path, data_cache), 5), lr_at(t.tc, 5)
        assert old != new
        assert said[-1].endswith(f"at step 4; steps 4 -> {steps} (the learning rate of step 5: {old:.3g} -> {new:.3g})")


def test_a_start_that_fails_after_the_mesh_tears_it_down(tmp_path, data_cache, monkeypatch):
    """An error once the process group exists (here: no text in the data folder) releases the run directory and
    destroys the mesh before it propagates: a rank left to exit with its group (and its heartbeat thread) alive
    sometimes aborted ("terminate called without an active exception", SIGABRT under torchrun) instead of exiting 2."""
    from flyer.train import trainer as trainer_mod

    destroyed = []
    real = trainer_mod.init_mesh

    def spied(*a, **kw):
        m = real(*a, **kw)
        monkeypatch.setattr(m, "destroy", lambda: destroyed.append(True), raising=False)
        return m
    monkeypatch.setattr(trainer_mod, "init_mesh", spied)
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="contains no .txt or .md files"):
        Trainer(tc_for(tmp_path / "run", data_cache, data=str(tmp_path / "empty")), log=quiet)
    assert destroyed == [True]
    RunLock(tmp_path / "run").close()  # free again


def test_a_refused_start_takes_away_what_it_made_and_nothing_else(tmp_path, data_cache, monkeypatch):
    """A start refused once the run directory exists (no text in the data folder) leaves no empty run directory,
    lock or checkpoints/ behind; a directory that was there before keeps what it held."""
    (tmp_path / "empty").mkdir()
    bad = {"data": str(tmp_path / "empty"), "tensorboard": str(tmp_path / "tb" / "run")}
    with pytest.raises(Exception, match="contains no .txt or .md files"):
        Trainer(tc_for(tmp_path / "new" / "run", data_cache, **bad), log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]

    kept = tmp_path / "kept"
    (kept / "notes").mkdir(parents=True)
    (kept / "notes" / "a.txt").write_text("mine")
    with pytest.raises(Exception, match="contains no .txt or .md files"):
        Trainer(tc_for(kept, data_cache, **bad), log=quiet)
    assert sorted(str(p.relative_to(kept)) for p in kept.rglob("*")) == ["notes", "notes/a.txt"]

    from flyer.train import trainer as trainer_mod
    others = []

    def raced(out):  # another run makes and takes the directory after this one looked: its lock file stays
        others.append(RunLock(out))
        return RunLock(out)
    monkeypatch.setattr(trainer_mod, "RunLock", raced)
    try:
        with pytest.raises(FieldError, match="in use by another run"):
            Trainer(tc_for(tmp_path / "raced", data_cache), log=quiet)
        assert (tmp_path / "raced" / LOCK_NAME).exists()
    finally:
        others[0].close()
