"""Edges of the trainer (``flyer.train.trainer``) a mutation sweep found unpinned (each assertion fails on the mutant
it names), and three defects it found: a checkpoint a crash left moved aside was put back only after the resume had
chosen an older one (or, the only one, step 0: the run restarted); a checkpoint due at a skipped step waited for the
next one on schedule, where the next good step saves it; a log that could not be written was not said when a
signal came in the same step."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flyer.config import preset
from flyer.errors import CheckpointError, TrainingError
from flyer.train import checkpoint as ckpt
from flyer.train.config import lr_at
from flyer.train.metrics import read_metrics
from flyer.train.trainer import Trainer
from flyer.train.training_state import STAGE_FIELDS, _weights_index, load_training
from tests.test_run_safety import disk_full_at
from tests.test_train import poison_loss, quiet, tc_for


def _records(out):
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def _checkpoints(out):
    return sorted(p.name for p in ckpt.list_checkpoints(out / "checkpoints"))


def test_the_last_step_evaluates_and_saves_and_each_step_has_its_rate(tmp_path, data_cache):
    """steps 5, eval and checkpoints every 2: validation at 2, 4 and the last step, a checkpoint at the last step
    too; the learning rate a step trains at (and logs) is the schedule's at that step (warmup from step 1)."""
    tc = tc_for(tmp_path, data_cache, steps=5, eval_every=2, ckpt_every=2, keep=5)
    summary = Trainer(tc, log=quiet).run()
    recs = _records(tmp_path)
    assert [r["step"] for r in recs if r.get("val_loss") is not None] == [2, 4, 5]
    assert summary["val_loss"] == recs[-1]["val_loss"]
    assert _checkpoints(tmp_path) == ["step_00000002", "step_00000004", "step_00000005"]
    assert [r["lr"] for r in recs] == pytest.approx([lr_at(tc, s) for s in range(1, 6)])
    assert recs[0]["lr"] > 0


def test_a_skipped_steps_routing_is_not_counted(tmp_path, data_cache):
    """A non-finite step is undone, its experts' token counts too: the next step's ``expert_load`` (which moves the
    router's bias) counts its own tokens, as every good step does."""
    t = Trainer(tc_for(tmp_path, data_cache, steps=5, ckpt_every=10, eval_every=10), log=quiet)
    poison_loss(t, calls={3})
    t.run()
    totals = {r["step"]: sum(map(sum, r["expert_load"])) for r in _records(tmp_path) if not r.get("skipped")}
    assert sorted(totals) == [1, 2, 4, 5] and len(set(totals.values())) == 1, totals


def test_a_checkpoint_due_at_a_skipped_step_is_the_next_good_steps(tmp_path, data_cache):
    t = Trainer(tc_for(tmp_path, data_cache, steps=7, ckpt_every=4, eval_every=10, keep=5), log=quiet)
    poison_loss(t, calls={4})
    t.run()
    assert _checkpoints(tmp_path) == ["step_00000005", "step_00000007"]


@pytest.mark.parametrize("keep", [1, 3])
def test_a_resume_starts_from_a_checkpoint_a_crash_moved_aside(tmp_path, data_cache, keep):
    """A crash between a re-save's two renames leaves the step's checkpoint as ``.tmp-step_N-PID-replaced`` (and a
    half-written ``.tmp-`` directory): the resume puts it back, then starts from it (the only checkpoint, with
    keep 1: it had started from step 0, its metrics set aside); the stage fields unchanged, none is said changed."""
    Trainer(tc_for(tmp_path, data_cache, steps=4, eval_every=10, keep=keep), log=quiet).run()
    root = tmp_path / "checkpoints"
    os.replace(root / "step_00000004", root / ".tmp-step_00000004-99999-replaced")
    (root / ".tmp-step_00000006-99999").mkdir()
    said = []
    t = Trainer(tc_for(tmp_path, data_cache, steps=6, eval_every=10, keep=keep, resume=True), log=said.append)
    try:
        assert t.step == 4 and (root / "step_00000004").is_dir()
        assert not any(p.name.startswith(".tmp-") for p in root.iterdir())
        assert not any(f"{k} " in m for k in STAGE_FIELDS for m in said), said
    finally:
        t.close()


def test_a_log_that_fails_with_a_signal_in_its_step_is_said(tmp_path, data_cache, monkeypatch):
    """A full disk and SIGTERM in one step: the step is saved, and the run ends on the disk's error (a resume would
    fail the same way), not as stopped by the signal."""
    disk_full_at(monkeypatch, 3)
    t = Trainer(tc_for(tmp_path, data_cache, steps=6, ckpt_every=10, eval_every=10), log=quiet)
    real = t.model.compute_loss

    def signalled(*a):
        if t.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a)
    t.model.compute_loss = signalled
    with pytest.raises(TrainingError, match=r"cannot write the run's logs after step 3 \(No space left on device\); "
                                            r"checkpoint .*step_00000003 saved"):
        t.run()
    assert _checkpoints(tmp_path) == ["step_00000003"]
    assert torch.isfinite(torch.tensor([r["loss"] for r in _records(tmp_path)])).all()


def _saved_run(tmp_path, data_cache) -> tuple[Path, Trainer]:
    """A 2-step run's checkpoint, and a Trainer built to resume it (the caller closes it)."""
    Trainer(tc_for(tmp_path, data_cache, steps=2, eval_every=10), log=quiet).run()
    return tmp_path / "checkpoints" / "step_00000002", Trainer(tc_for(tmp_path, data_cache, steps=4, eval_every=10,
                                                                      resume=True), log=quiet)


def _load(t: Trainer, path: Path) -> dict:
    return load_training(path, model=t.model, optimizer=t.optimizer, sampler=t.sampler, mesh=t.mesh, cfg=t.cfg,
                         layout=t.layout)


def test_a_resume_restores_the_saved_cpu_rng_state(tmp_path, data_cache):
    """Loading a checkpoint sets torch's CPU generator to the state it saved, whatever it is before (a CPU run draws
    nothing after its seed, so the resume tests' losses cannot tell)."""
    path, t = _saved_run(tmp_path, data_cache)
    try:
        saved = load_file(path / "rng.safetensors")["torch_cpu"]
        torch.manual_seed(12345)
        assert not torch.equal(torch.get_rng_state(), saved)
        assert _load(t, path)["step"] == 2 and torch.equal(torch.get_rng_state(), saved)
    finally:
        t.close()


@pytest.mark.parametrize("step", [-1, True])
def test_a_state_whose_step_is_negative_or_a_bool_is_refused(tmp_path, data_cache, step):
    """A checkpoint whose state says step -1 or true has no step count: refused (CheckpointError), not resumed."""
    path, t = _saved_run(tmp_path, data_cache)
    try:
        state = json.loads((path / "state.json").read_text())
        (path / "state.json").write_text(json.dumps({**state, "step": step}))
        with pytest.raises(CheckpointError, match="no step count"):
            _load(t, path)
    finally:
        t.close()


def test_the_weights_index_refuses_a_tensor_in_two_parts():
    """Two ranks' weight parts that both hold a tensor: the index refuses, naming both files."""
    parts = [{"file": f, "index": {"shapes": {"embed.weight": [4, 4]}, "bytes": 64}} for f in ("w-1.st", "w-2.st")]
    with pytest.raises(CheckpointError, match="in both w-1.st and w-2.st"):
        _weights_index(preset("tiny"), parts)
