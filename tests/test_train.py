"""Trainer: exact resume (also after kill -9), checkpoint verification and fallback, NaN-step
skipping, CLI errors, and a short end-to-end run."""

import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from flyer.interop.load import load_pretrained
from flyer.cli import main
from flyer.config import preset
from flyer.parallel.optim_state import OPTIMIZER_FILE
from flyer.train import checkpoint as ckpt
from flyer.train.metrics import read_metrics
from flyer.model.transformer import Transformer
from flyer.parallel.mesh import LocalMesh
from flyer.train.metrics import TENSORBOARD_TAGS
from flyer.train.config import TrainConfig, batches_through, check_resume_settings, grad_accum_at, lr_at
from flyer.train.metrics import progress_postfix
from flyer.errors import CheckpointError, FieldError
from flyer.train import batches as batches_module
from flyer.train.batches import data_fingerprint
from flyer.train.trainer import Trainer, TrainingError
from flyer.data.chat_data import ChatSplit
from flyer.data.shards import TokenShards, write_shard
from tests.interrupted import stop_after
from flyer.train.build import build_model, build_optimizer


def tc_for(out, data_cache, **kw):
    base = dict(preset="tiny", steps=6, batch_size=2, seq_len=32, eval_every=3, eval_batches=2, ckpt_every=2,
                out=str(out), data_cache=data_cache, seed=3, progress=False, plots=False, warmup=2, lr=3e-3,
                device="cpu")  # the exactness tests are CPU properties
    base.update(kw)
    return TrainConfig(**base)


def losses(out):
    return {r["step"]: r["loss"] for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r}


def quiet(_msg):
    pass


def test_resume_equals_uninterrupted(tmp_path, data_cache):
    full = Trainer(tc_for(tmp_path / "full", data_cache), log=quiet).run()
    # interrupted: 3 steps, a checkpoint, then a fresh process-like Trainer resumes
    stop_after(tc_for(tmp_path / "cut", data_cache), 3)
    resumed = Trainer(tc_for(tmp_path / "cut", data_cache, resume=True), log=quiet)
    assert resumed.step == 3
    resumed.run()
    a, b = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert all(a[s] == b[s] for s in a), (a, b)  # bit-identical on CPU
    assert full["val_loss"] is not None
    last = read_metrics(tmp_path / "full" / "metrics.jsonl")[-1]  # the summary's losses: the last step's
    assert (full["final_loss"], full["final_main_loss"]) == (last["loss"], last["main_loss"])
    assert full["final_main_loss"] < full["final_loss"]  # the objective adds MTP and balance terms to it


def _rewrite(step: Path, name: str, data: bytes | None) -> None:
    """Replace (None: remove) checkpoint file ``name`` and its manifest entry, as if it had been written so."""
    manifest = json.loads((step / "manifest.json").read_text())
    if data is None:
        (step / name).unlink()
        del manifest["files"][name]
    else:
        (step / name).write_bytes(data)
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (step / "manifest.json").write_text(json.dumps(manifest))


def test_a_checkpoint_with_the_optimizer_per_rank_resumes_at_its_layout(tmp_path, data_cache):
    """Checkpoints written before the optimizer's state was saved whole hold each rank's own (``optimizer.pt``: its
    ``state_dict()``): one resumes bit for bit on the layout that wrote it, and on another is refused in one line
    (its shards fit that layout only)."""
    Trainer(tc_for(tmp_path / "full", data_cache), log=quiet).run()
    t = Trainer(tc_for(tmp_path / "cut", data_cache), log=quiet)
    for _ in range(3):
        t.train_step()
    step = t.save()
    t.close()
    _rewrite(step, OPTIMIZER_FILE, None)
    buf = io.BytesIO()
    torch.save(t.optimizer.state_dict(), buf)
    _rewrite(step, "optimizer.pt", buf.getvalue())
    shutil.copytree(tmp_path / "cut", tmp_path / "moved")
    Trainer(tc_for(tmp_path / "cut", data_cache, resume=True), log=quiet).run()
    a, b = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert [s for s in b if s > 3] == [4, 5, 6] and all(a[s] == b[s] for s in b if s > 3), (a, b)

    moved = tmp_path / "moved" / "checkpoints" / step.name
    state = json.loads((moved / "state.json").read_text())
    _rewrite(moved, "state.json", json.dumps({**state, "layout": {**state["layout"], "zero": 1}}).encode())
    with pytest.raises(CheckpointError, match=r"saved with zero=1; this run has zero=0 \(its optimizer state is per"):
        Trainer(tc_for(tmp_path / "moved", data_cache, resume=True), log=quiet)


def test_v3_schedule_is_the_reports_stages():
    """``--schedule v3`` at DeepSeek-V3's settings (lr 2.2e-4, min_lr_ratio 0.1, 2K warmup steps; 14,800 steps, one
    per 1B of its 14.8T tokens) gives the report's rates: 2.2e-4 to 10T, a cosine to 2.2e-5 by 14.3T (its midpoint
    1.21e-4), 2.2e-5 for 333B tokens, 7.3e-6 for the last 167B."""
    tc = TrainConfig(preset="tiny", steps=14800, lr=2.2e-4, min_lr_ratio=0.1, warmup=2000, schedule="v3")
    def at(tokens_t):
        return lr_at(tc, round(tokens_t * 1000))

    assert at(1.0) == pytest.approx(1.1e-4) and at(2.0) == at(5.0) == at(10.0) == 2.2e-4
    assert at(12.15) == pytest.approx(1.21e-4) and at(11.0) > at(12.15) > at(13.0)
    assert at(14.3) == at(14.5) == at(14.633) == pytest.approx(2.2e-5)
    assert at(14.634) == at(14.8) == pytest.approx(7.3e-6)


def test_batch_ramp_grows_linearly_and_v3_stages_count_its_batches():
    """``ramp_grad_accum`` micro-batches at step 1, growing linearly to grad_accum over ``ramp_steps`` steps (to the
    nearest micro-batch); the
    v3 schedule's stages fall at their shares of the run's batches (tokens), which the ramp's small first steps move
    later in steps: V3's ramp, 3072 -> 15360 sequences (1 -> 5 micro-batches of 3072) over its first 469B of 14.8T
    tokens (4K each: 37,273 micro-batches over 12,424 steps), puts the end of the stable stage (10T tokens) at the
    step whose micro-batches reach 10/14.8 of the run's."""
    tc = TrainConfig(preset="tiny", steps=12, grad_accum=5, ramp_grad_accum=1, ramp_steps=8)
    assert [grad_accum_at(tc, s) for s in range(1, 13)] == [1, 2, 2, 3, 3, 4, 4, 5, 5, 5, 5, 5]
    assert batches_through(tc, 12) == sum(grad_accum_at(tc, s) for s in range(1, 13)) == 44
    micro = 3072 * 4096  # tokens a micro-batch
    ramp, total = 12424, 12424 + round((14.8e12 - 469e9) / (5 * micro))
    tc = TrainConfig(preset="tiny", steps=total, grad_accum=5, ramp_grad_accum=1, ramp_steps=ramp, lr=2.2e-4,
                     min_lr_ratio=0.1, warmup=2000, schedule="v3")
    assert abs(batches_through(tc, ramp) * micro - 469e9) < 5 * micro  # the report's ramp, to a step
    drawn, stable_end, run = 0, None, batches_through(tc, total)
    for s in range(1, total + 1):  # the step at which 10T of the run's 14.8T tokens are drawn, counted apart
        drawn += min(5, 1 + round(4 * (s - 1) / ramp))  # (no step lands on a half)
        if drawn / run * 14.8 > 10.0:
            stable_end = s
            break
    assert lr_at(tc, stable_end - 1) == 2.2e-4 > lr_at(tc, stable_end)
    assert stable_end > round(10 / 14.8 * total)  # steps alone would end it sooner
    assert lr_at(tc, total) == pytest.approx(7.3e-6)


def test_a_batch_ramp_run_trains_on_its_micro_batches_and_resumes_exactly(tmp_path, data_cache):
    """A ramp from 1 to 3 micro-batches over 4 steps: each step trains on ``grad_accum_at``'s (its record says how
    many; the sampler has drawn their sum), its first step is, bit for bit, a run's without a ramp at 1, and a run
    stopped mid-ramp resumes onto the uninterrupted one bit for bit."""
    ramp = dict(grad_accum=3, ramp_grad_accum=1, ramp_steps=4)
    full = Trainer(tc_for(tmp_path / "full", data_cache, **ramp), log=quiet)
    full.run()
    records = [r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "loss" in r]
    assert [r["grad_accum"] for r in records] == [1, 2, 2, 3, 3, 3] and full.sampler.position == 14
    Trainer(tc_for(tmp_path / "one", data_cache), log=quiet).run()
    one = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "loss" in r]
    assert (one[0]["loss"], one[0]["grad_norm"]) == (records[0]["loss"], records[0]["grad_norm"])
    assert one[1]["loss"] != records[1]["loss"]  # (the same weights, another batch: two micro-batches)
    stop_after(tc_for(tmp_path / "cut", data_cache, **ramp), 3)
    Trainer(tc_for(tmp_path / "cut", data_cache, resume=True, **ramp), log=quiet).run()
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    for change, field in ((dict(ramp_steps=5), "ramp_steps"), (dict(ramp_grad_accum=2), "ramp_grad_accum"),
                          (dict(ramp_grad_accum=None, ramp_steps=0), "ramp_steps")):
        with pytest.raises(FieldError, match=f"^{field}: ") as e:  # a resumed run keeps its ramp
            Trainer(tc_for(tmp_path / "full", data_cache, resume=True, steps=8, **{**ramp, **change}), log=quiet)
        assert "\n" not in str(e.value)


def test_a_batch_ramp_keeps_its_replicas(tmp_path):
    """A ramp rounds each replica's micro-batches: 2 replicas ramping 1 -> 3 train steps 3-6 on 4, 6, 6, 6 in all,
    one process ramping 2 -> 6 on 4, 5, 6, 6 (and the v3 schedule counts them), so a resume with another number of
    replicas is refused in one line, at as many batches in all as it may be."""
    two = TrainConfig(preset="tiny", steps=6, grad_accum=3, ramp_grad_accum=1, ramp_steps=4)
    one = dataclasses.replace(two, grad_accum=6, ramp_grad_accum=2)
    assert [2 * grad_accum_at(two, s) for s in range(3, 7)] != [grad_accum_at(one, s) for s in range(3, 7)]
    (tmp_path / "state-rank0.json").write_text(json.dumps({"step": 2, "train_config": dataclasses.asdict(two),
                                                           "layout": {"world": 2, "dp": 2}}))
    check_resume_settings(two, tmp_path, dp=2)
    with pytest.raises(FieldError, match="^ramp_grad_accum: a run with a batch-size ramp resumes with its 2 "):
        check_resume_settings(one, tmp_path, dp=1)
    no_ramp = dataclasses.replace(two, ramp_grad_accum=None, ramp_steps=0)
    (tmp_path / "state-rank0.json").write_text(json.dumps({"step": 2, "train_config": dataclasses.asdict(no_ramp),
                                                           "layout": {"world": 2, "dp": 2}}))
    check_resume_settings(dataclasses.replace(no_ramp, grad_accum=6), tmp_path, dp=1)  # without a ramp it may


def test_a_resumed_run_may_change_its_stage_weights(tmp_path, data_cache):
    """The V3 report's stage switches: a run resumed with the MTP loss weight 0.3 -> 0.1 and the bias update speed
    (tiny's 0.01) -> 0 trains its next steps with them (loss = main + 0.1 mtp + aux, router biases still) and says so; a
    field of the model's shape still refuses the checkpoint."""
    ckpt_root = tmp_path / "run" / "checkpoints"
    Trainer(tc_for(tmp_path / "run", data_cache, steps=2), log=quiet).run()
    (tmp_path / "stage2.toml").write_text("[model]\nmtp_loss_weight = 0.1\nbias_update_speed = 0.0\n")
    said = []
    t = Trainer(tc_for(tmp_path / "run", data_cache, steps=4, resume=True, config=str(tmp_path / "stage2.toml")),
                log=said.append)
    assert t.step == 2 and any("mtp_loss_weight 0.3 -> 0.1; bias_update_speed 0.01 -> 0" in m for m in said)
    t.run()
    recs = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for r in recs:
        weight = 0.3 if r["step"] <= 2 else 0.1
        assert r["loss"] == pytest.approx(r["main_loss"] + weight * r["mtp_loss"] + r["aux_loss"], rel=1e-5)
    bias = lambda step: {k: v for k, v in ckpt.read_tensors(ckpt_root / ckpt.step_dir_name(step)  # noqa: E731
                                                            / "model.safetensors").items() if k.endswith("gate.bias")}
    assert bias(2) and all(torch.equal(bias(2)[k], bias(4)[k]) for k in bias(2))
    (tmp_path / "wider.toml").write_text("[model]\nmtp_loss_weight = 0.1\ninter_dim = 96\n")
    with pytest.raises(CheckpointError, match=r"fields differ: inter_dim\)$"):
        Trainer(tc_for(tmp_path / "run", data_cache, steps=6, resume=True, config=str(tmp_path / "wider.toml")),
                log=quiet)


def test_tied_embeddings_checkpoint_resume_and_load(tmp_path, data_cache):
    """A tied head and embedding share one tensor, which safetensors refuses to save twice: the
    checkpoint stores each name, and resuming and loading give the tied model back (saving used
    to raise on the first checkpoint)."""
    (tmp_path / "tied.toml").write_text("[model]\ntie_embeddings = true\n")
    cfg = dict(config=str(tmp_path / "tied.toml"), steps=4)
    full = Trainer(tc_for(tmp_path / "full", data_cache, **cfg), log=quiet)
    assert full.model.head.weight is full.model.embed.weight
    full.run()
    cut = Trainer(tc_for(tmp_path / "cut", data_cache, **{**cfg, "steps": 2}), log=quiet)
    cut.run()
    resumed = Trainer(tc_for(tmp_path / "cut", data_cache, **cfg, resume=True), log=quiet)
    assert resumed.step == 2 and resumed.model.head.weight is resumed.model.embed.weight
    resumed.run()
    assert losses(tmp_path / "full") == losses(tmp_path / "cut")
    model = load_pretrained(tmp_path / "cut")[0]
    assert model.cfg.tie_embeddings and torch.equal(model.head.weight, model.embed.weight)


@pytest.mark.slow
def test_resume_after_kill_9(tmp_path, data_cache, capsys):
    args = ["train", "--preset", "tiny", "--steps", "14", "--batch-size", "2", "--seq-len", "32", "--eval-every", "7",
            "--eval-batches", "2", "--ckpt-every", "4", "--seed", "5", "--data-cache", data_cache, "--no-plots",
            "--no-progress", "--threads", "1", "--device", "cpu"]
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "flyer", *args, "--out", str(run)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / "checkpoints" / ckpt.step_dir_name(8)).exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its second checkpoint"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # the reference and the resume in this process: only the run to kill needs a process of its own
    assert main(args + ["--out", str(tmp_path / "ref")]) == 0
    capsys.readouterr()
    assert main(args + ["--out", str(run), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().err
    a, b = losses(tmp_path / "ref"), losses(run)
    assert sorted(b) == list(range(1, 15))
    assert all(a[s] == b[s] for s in a)


def test_corrupt_newest_checkpoint_falls_back(tmp_path, data_cache, capsys):
    Trainer(tc_for(tmp_path, data_cache, steps=4), log=quiet).run()
    root = tmp_path / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == [ckpt.step_dir_name(4), ckpt.step_dir_name(2)]
    weights = root / ckpt.step_dir_name(4) / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0xFF
    weights.write_bytes(bytes(raw))
    messages = []
    t = Trainer(tc_for(tmp_path, data_cache, steps=6, resume=True), log=messages.append)
    assert t.step == 2
    assert any("checksum mismatch" in m and "falling back" in m for m in messages)


def test_a_file_flyer_does_not_read_is_not_the_checkpoints(tmp_path, data_cache):
    """A note, an editor's swap file or NFS's .nfs file in the newest checkpoint leaves it valid (no reader reads it);
    an unlisted file of a kind flyer reads (JSON) makes it invalid (falling back); saving that step again keeps the
    files flyer did not write."""
    Trainer(tc_for(tmp_path, data_cache, steps=4), log=quiet).run()
    step = tmp_path / "checkpoints" / ckpt.step_dir_name(4)
    for name in ("NOTES.txt", ".nfs0000000012", ".config.json.swp"):
        (step / name).write_text("mine")
    assert Trainer(tc_for(tmp_path, data_cache, steps=4, resume=True), log=quiet).step == 4
    (step / "extra.json").write_text("{}")
    messages = []
    t = Trainer(tc_for(tmp_path, data_cache, steps=4, resume=True), log=messages.append)
    assert t.step == 2 and any("extra.json is not in its manifest" in m for m in messages)
    t.run()  # step 4 saved again
    assert (step / "NOTES.txt").read_text() == "mine" and (step / ".nfs0000000012").exists()
    assert not (step / "extra.json").exists() and ckpt.verify_checkpoint(step)


def test_a_resume_on_another_tokenizer_or_data_is_refused(tmp_path, data_cache, capsys):
    """The checkpoint records what it trained on: a tokenizer of the same size with two ids swapped, or data of the
    same size in another order (which the sampler's counts let through) are refused in one line naming the field."""
    Trainer(tc_for(tmp_path / "run", data_cache, steps=2), log=quiet).run()
    step = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")[0]
    tok = json.loads((step / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = [k for k, v in vocab.items() if v in (300, 301)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tmp_path / "swapped.json").write_text(json.dumps(tok))
    args = ["train", "--preset", "tiny", "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--eval-every", "3",
            "--eval-batches", "2", "--ckpt-every", "2", "--out", str(tmp_path / "run"), "--data-cache", data_cache,
            "--seed", "3", "--no-progress", "--no-plots", "--warmup", "2", "--lr", "3e-3", "--device", "cpu",
            "--resume"]
    capsys.readouterr()
    assert main([*args, "--tokenizer", str(tmp_path / "swapped.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flyer: error: --tokenizer: the run's tokenizer is not the one")
    with pytest.MonkeyPatch.context() as m:  # other data: a digest of other content (below)
        m.setattr(batches_module, "data_fingerprint", lambda split: "other")
        assert main(args) == 2
    assert capsys.readouterr().err.strip().startswith("flyer: error: --data: the run's training data is not the one")
    # the digest: conversations in another order, token shards of other tokens
    split = ChatSplit(np.arange(10), np.ones(10, np.uint8), np.array([0, 3, 10]))
    swapped = ChatSplit(np.r_[np.arange(3, 10), np.arange(3)], np.ones(10, np.uint8), np.array([0, 7, 10]))
    assert data_fingerprint(split) != data_fingerprint(swapped)
    shards = [write_shard(tmp_path / f"{i}.bin", np.array(t, np.uint16), 16) for i, t in enumerate(([1, 2], [2, 1]))]
    assert data_fingerprint(TokenShards([shards[0]])) != data_fingerprint(TokenShards([shards[1]]))


def test_reports_that_cannot_be_written_are_warnings(tmp_path, data_cache):
    """memory.json and the plots are reports: a directory in their place is said in the log, and the run (trained
    and saved) ends as done."""
    for name in ("memory.json", "loss.png"):
        (tmp_path / name).mkdir(parents=True)
    messages = []
    summary = Trainer(tc_for(tmp_path, data_cache, steps=2, plots=True), log=messages.append).run()
    assert summary["steps"] == 2 and ckpt.list_checkpoints(tmp_path / "checkpoints")
    assert any("cannot write" in m and "memory.json" in m for m in messages)
    assert any("cannot write the plots" in m for m in messages)


def test_a_checkpoint_whose_files_do_not_parse_is_one_line(tmp_path, data_cache):
    """The manifest vouches that a file is the one written, not that it was written well: a file that does not parse
    as what it holds (rewritten, its manifest entry too), or an optimizer state missing a moment, is a one-line
    ``CheckpointError`` naming the checkpoint, not a traceback at the first step; a manifest of another format version
    is not read as this one (the previous checkpoint is used)."""
    Trainer(tc_for(tmp_path, data_cache, steps=4), log=quiet).run()
    step = tmp_path / "checkpoints" / ckpt.step_dir_name(4)
    originals = {n: (step / n).read_bytes() for n in ("state.json", "optimizer.safetensors", "manifest.json")}

    def rewrite(name: str, data: bytes) -> None:
        (step / name).write_bytes(data)
        manifest = json.loads(originals["manifest.json"])
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (step / "manifest.json").write_text(json.dumps(manifest))

    state = json.loads(originals["state.json"])
    moments = safetensors.torch.load(originals["optimizer.safetensors"])
    partial = safetensors.torch.save({k: v for k, v in moments.items() if k != "embed.weight/exp_avg_sq"})
    for name, data, says in (("state.json", json.dumps({**state, "step": "six"}).encode(), "has no step count"),
                             ("state.json", b"{not json", "unreadable"),
                             ("optimizer.safetensors", b"garbage" * 10, "unreadable"),
                             ("optimizer.safetensors", partial, "state of embed.weight has exp_avg, step; of ")):
        rewrite(name, data)
        with pytest.raises(CheckpointError, match=f"checkpoint {step}: .*{says}") as e:
            Trainer(tc_for(tmp_path, data_cache, steps=6, resume=True), log=quiet)
        assert "\n" not in str(e.value)
        (step / name).write_bytes(originals[name])
    manifest = json.loads(originals["manifest.json"])
    (step / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    messages = []
    assert Trainer(tc_for(tmp_path, data_cache, steps=6, resume=True), log=messages.append).step == 2
    assert any("format version 99, this flyer reads 1" in m for m in messages)


def test_a_resume_without_checkpoints_keeps_the_earlier_log(tmp_path, data_cache):
    """--resume in a run directory whose checkpoints were moved away starts at step 0 and keeps the earlier
    metrics.jsonl beside it (it was truncated to nothing); a second such start keeps both."""
    Trainer(tc_for(tmp_path, data_cache, steps=2), log=quiet).run()
    for n in (1, 2):
        before = (tmp_path / "metrics.jsonl").read_text()
        shutil.rmtree(tmp_path / "checkpoints")
        Trainer(tc_for(tmp_path, data_cache, steps=2, resume=True), log=quiet).run()
        assert (tmp_path / f"metrics.jsonl.{n}").read_text() == before
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r] == [1, 2]


def test_a_finished_run_without_its_plots_draws_them_when_run_again(tmp_path, data_cache):
    """A run that ended before drawing its plots (stopped after its last step; or run without them) draws them when
    run again with nothing left to train."""
    Trainer(tc_for(tmp_path, data_cache, steps=2), log=quiet).run()
    assert not (tmp_path / "loss.png").exists()
    messages = []
    Trainer(tc_for(tmp_path, data_cache, steps=2, plots=True, resume=True), log=messages.append).run()
    assert any("nothing to do" in m for m in messages)
    assert (tmp_path / "loss.png").stat().st_size and (tmp_path / "expert_load.png").stat().st_size


def test_half_written_checkpoint_is_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    good = ckpt.save_checkpoint(root, 1, {"config.json": {"a": 1}})
    (root / ".tmp-step_00000002-123").mkdir()  # a crash mid-write
    (root / ckpt.step_dir_name(3)).mkdir()  # no manifest: never renamed into place by flyer
    assert ckpt.find_valid_checkpoint(root, log=quiet) == good
    ckpt.clean_temporaries(root)
    assert not (root / ".tmp-step_00000002-123").exists()
    with pytest.raises(ckpt.CheckpointError, match="no valid checkpoint"):
        ckpt.resolve_checkpoint_path(tmp_path / "elsewhere")


def poison_loss(t, calls=None):
    """Make ``t``'s training loss NaN on the given 1-based ``compute_loss`` calls (every call when None)."""
    real = t.model.compute_loss
    seen = {"n": 0}

    def poisoned(x, y, *documents):
        seen["n"] += 1
        out = real(x, y, *documents)
        if calls is None or seen["n"] in calls:  # the terms the trainer weights, and their total
            out.loss, out.main_loss = out.loss * float("nan"), out.main_loss * float("nan")
        return out

    t.model.compute_loss = poisoned


def test_nan_steps_are_skipped_and_never_checkpointed(tmp_path, data_cache):
    t = Trainer(tc_for(tmp_path / "a", data_cache, steps=5, ckpt_every=1), log=quiet)
    poison_loss(t, calls={3})  # the third training step
    t.run()
    recs = [r for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in recs if r.get("skipped")] == [3]
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    assert recs[-1]["skipped_total"] == 1

    t = Trainer(tc_for(tmp_path / "b", data_cache, steps=5, ckpt_every=1, max_bad_steps=2), log=quiet)
    poison_loss(t)
    with pytest.raises(TrainingError, match="2 consecutive steps"):
        t.run()
    assert ckpt.list_checkpoints(tmp_path / "b" / "checkpoints") == []


def test_a_run_ending_on_non_finite_steps_says_so(tmp_path, data_cache):
    """Fewer than max_bad_steps, but the last: the step reached is not checkpointed, and the run does not end as
    done (exit 0, a NaN validation loss) but names the checkpoint it has."""
    t = Trainer(tc_for(tmp_path, data_cache, steps=5, ckpt_every=2, eval_every=10), log=quiet)
    poison_loss(t, calls={5})  # the last training step (validation only after it)
    with pytest.raises(TrainingError, match=r"1 consecutive steps with non-finite loss or gradient norm up to step 5, "
                                            r"which is not checkpointed \(the last checkpoint is step_00000004\)"):
        t.run()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step_00000004", "step_00000002"]


def test_a_signal_during_a_skipped_step_saves_the_good_steps(tmp_path, data_cache):
    """SIGTERM during a skipped (non-finite) step: the weights are the last good step's, so the stop checkpoints
    them with its count of skipped steps (no good step lost); the resumed run goes on as the uninterrupted one, its
    count of consecutive skipped steps too (max_bad_steps 2: the next bad step ends it)."""
    t = Trainer(tc_for(tmp_path / "a", data_cache, steps=6, ckpt_every=10, max_bad_steps=2), log=quiet)
    poison_loss(t, calls={3})
    real = t.model.compute_loss

    def signalled(*a):
        out = real(*a)
        if t.step == 2:  # the call of step 3, poisoned
            os.kill(os.getpid(), signal.SIGTERM)
        return out
    t.model.compute_loss = signalled
    assert t.run()["signal"] == signal.SIGTERM
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "a" / "checkpoints")] == ["step_00000003"]
    again = Trainer(tc_for(tmp_path / "a", data_cache, steps=6, ckpt_every=10, max_bad_steps=2, resume=True),
                    log=quiet)
    assert (again.step, again.bad_steps, again.consecutive_bad) == (3, 1, 1)
    poison_loss(again, calls={1})  # step 4: a second consecutive one
    with pytest.raises(TrainingError, match="2 consecutive steps"):
        again.run()


def test_train_step_without_run_counts_consecutive_bad_steps(tmp_path, data_cache):
    """train_step() on its own (no run()) skips non-finite steps and stops after max_bad_steps."""
    t = Trainer(tc_for(tmp_path, data_cache, max_bad_steps=2), log=quiet)
    poison_loss(t)
    assert t.train_step()["skipped"] is True
    with pytest.raises(TrainingError, match="2 consecutive steps"):
        t.train_step()


def test_local_mesh_and_builders_outside_the_trainer(tmp_path, data_cache):
    """The one-process mesh's collectives are identities; build_model initialises as a seeded
    Transformer(cfg) does; build_optimizer decays matrices only."""
    mesh = LocalMesh(torch.device("cpu"))
    assert (mesh.rank, mesh.world, mesh.ep, mesh.world_group) == (0, 1, 1, None)
    assert mesh.mean({"a": 1.5}) == {"a": 1.5} and mesh.gather_object(7) == [7]
    t = Trainer(tc_for(tmp_path, data_cache), log=quiet)
    model = build_model(t.cfg, mesh, "fp32", seed=3)
    torch.manual_seed(3)
    ref = Transformer(t.cfg)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, t.model.state_dict()[k]) for k, v in model.state_dict().items())
    assert mesh.full_state_dict(model).keys() == ref.state_dict().keys()
    opt = build_optimizer(model, t.tc)
    assert [g["weight_decay"] for g in opt.param_groups] == [t.tc.weight_decay, 0.0]
    assert all(p.ndim >= 2 for p in opt.param_groups[0]["params"])


def test_progress_bar_shows_next_token_loss_beside_mtp(tmp_path, data_cache, capsys):
    rec = {"loss": 6.95, "main_loss": 5.47, "mtp_loss": 6.12, "tokens_per_s": 1234.4}
    assert progress_postfix(rec, 5.5) == {"loss": "5.470", "mtp": "6.120", "val": "5.500", "tok/s": "1234"}
    assert progress_postfix({**rec, "mtp_loss": 0.0}, None) == {"loss": "5.470", "tok/s": "1234"}  # no MTP
    Trainer(tc_for(tmp_path, data_cache, steps=2, eval_every=2, progress=True), log=quiet).run()
    last = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r][-1]
    err = capsys.readouterr().err
    assert f"loss={last['main_loss']:.3f}, mtp={last['mtp_loss']:.3f}, val={last['val_loss']:.3f}" in err


def test_tensorboard_scalars_equal_metrics(tmp_path, data_cache, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    argv = ["train", "--preset", "tiny", "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--eval-every", "2",
            "--eval-batches", "1", "--ckpt-every", "4", "--data-cache", data_cache, "--out", str(out),
            "--no-progress", "--no-plots", "--device", "cpu", "--tensorboard"]
    assert main(argv) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/total", "loss/main", "loss/mtp", "loss/val", "optim/lr", "optim/grad_norm", "speed/tokens_per_s",
            "speed/mfu", "moe/load_imbalance"} <= tags
    recs = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    for field, tag in TENSORBOARD_TAGS.items():
        want = {r["step"]: r[field] for r in recs if r.get(field) is not None}
        got = {e.step: e.value for e in events.Scalars(tag)} if tag in tags else {}
        assert got == pytest.approx(want, rel=1e-6), field
    assert sorted(e.step for e in events.Scalars("loss/val")) == [2, 4]
    # resumed to 6 steps: the series goes on from step 5, its first four kept (a purge from step 5 on only)
    assert main([*argv[:4], "6", *argv[5:], "--resume"]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    want = {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}
    assert {e.step: e.value for e in events.Scalars("loss/total")} == pytest.approx(want, rel=1e-6)
    assert sorted(want) == list(range(1, 7))
    assert main(argv[:-1] + ["--out", str(tmp_path / "other"), "--tensorboard", str(tmp_path / "tb")]) == 0
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_tensorboard_flag_without_the_package_is_one_line(tmp_path, data_cache, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when not installed
    rc = main(["train", "--preset", "tiny", "--out", str(tmp_path), "--data-cache", data_cache, "--tensorboard"])
    assert rc == 2
    assert "'tensorboard': needs the tensorboard package" in _err(capsys)
    assert not (tmp_path / "metrics.jsonl").exists()


def _err(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flyer: error: "), err
    return err[0]


@pytest.mark.parametrize("argv,words", [
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--steps", "0"], "--steps: must be >= 1 (got 0)"),
    (["--batch-size", "-2"], "--batch-size: must be >= 1 (got -2)"),
    (["--precision", "fp4"], "--precision: must be one of"),
    (["--data", "/nonexistent/corpus"], "/nonexistent/corpus"),
    (["--device", "tpu"], "--device: must be auto, cpu, cuda or cuda:N"),
    (["--device", "cuda:99"], "--device: cuda:99 asked for"),
])
def test_cli_errors_are_one_line(tmp_path, data_cache, capsys, argv, words):
    rc = main(["train", "--out", str(tmp_path), "--data-cache", data_cache, "--no-progress"] + argv)
    assert rc == 2
    assert words in _err(capsys)


def test_cli_bad_toml_field_and_config_mismatch(tmp_path, data_cache, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nn_limited_groups = 99\n")
    assert main(["train", "--preset", "tiny", "--config", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "n_limited_groups" in _err(capsys)
    bad.write_text("[train]\nstepz = 3\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "stepz" in _err(capsys)
    good = tmp_path / "good.toml"
    good.write_text("[model]\nn_layers = 3\n[train]\nsteps = 1\nbatch_size = 2\nseq_len = 16\neval_batches = 1\n")
    assert main(["train", "--preset", "tiny", "--config", str(good), "--data-cache", data_cache, "--out",
                 str(tmp_path / "toml-run"), "--no-progress", "--no-plots"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 1
    common = ["train", "--preset", "tiny", "--steps", "1", "--batch-size", "2", "--seq-len", "16",
              "--eval-batches", "1", "--data-cache", data_cache, "--out", str(tmp_path / "run"), "--no-progress",
              "--no-plots"]
    assert main(common) == 0
    capsys.readouterr()
    assert main(common) == 2  # checkpoints exist and --resume not given
    assert "--resume" in _err(capsys)
    other = tmp_path / "other.toml"
    other.write_text("[model]\ndim = 96\nn_heads = 3\n")
    assert main(common + ["--resume", "--config", str(other)]) == 2
    assert "different config" in _err(capsys)


@pytest.mark.parametrize("cpu", ["amx", "avx512", "avx2"])
def test_auto_precision_follows_bf16_hardware(tmp_path, data_cache, cpu, monkeypatch):
    """--precision auto (the default): bf16 where the device multiplies BF16 in hardware, else fp32,
    said in the run's first line; an explicit bf16 without BF16 hardware gets a note."""
    from flyer import runtime
    from flyer.train import trainer

    native = cpu == "amx"
    # the MFU denominator times the assumed CPU's BF16 GEMM on this one (ATen's scalar kernel where it has
    # no BF16 hardware: 20 s a test); this test is about the precision choice, not that rate
    monkeypatch.setattr(trainer, "fastest_gemm", lambda dtype, device: (1e12, f"{dtype} (stub)"))
    with runtime.assume_cpu(cpu):
        lines = []
        t = Trainer(tc_for(tmp_path / "auto", data_cache, steps=1, ckpt_every=5, eval_every=5), log=lines.append)
        assert t.precision == ("bf16" if native else "fp32") and not lines
        t.run()
        want = "bf16 (auto: BF16 in hardware)" if native else "fp32 (auto: no BF16 matrix hardware on this device)"
        assert want in lines[0]
        lines.clear()
        t = Trainer(tc_for(tmp_path / "bf16", data_cache, precision="bf16", steps=1), log=lines.append)
        assert t.precision == "bf16"
        assert any("no BF16 matrix hardware" in line for line in lines) is (not native)


def test_smoke_run_outputs(tmp_path, data_cache, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--preset", "tiny", "--steps", "4", "--batch-size", "2", "--seq-len", "32",
               "--eval-every", "2", "--eval-batches", "2", "--ckpt-every", "2", "--keep", "1",
               "--data-cache", data_cache, "--out", str(out), "--no-progress", "--grad-accum", "2"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 4
    recs = read_metrics(out / "metrics.jsonl")
    train = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "load_imbalance", "bias_min", "bias_max",
                "mtp_loss", "expert_load"):
        assert key in train[0]
    assert [r["step"] for r in recs if "val_loss" in r] == [2, 4]
    assert (out / "loss.png").stat().st_size > 1000 and (out / "expert_load.png").stat().st_size > 1000
    assert len(ckpt.list_checkpoints(out / "checkpoints")) == 1  # --keep 1
    model, cfg, text_tok = load_pretrained(out)
    tok = text_tok.tok
    assert cfg.vocab_size == tok.get_vocab_size()
    x = torch.tensor([tok.encode("To be, or not to be").ids])
    assert model(x).shape == (1, x.shape[1], cfg.vocab_size)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_checkpoints_resume_and_load_on_cpu(tmp_path, data_cache, capsys):
    common = ["train", "--preset", "tiny", "--batch-size", "4", "--seq-len", "64", "--eval-every", "4",
              "--eval-batches", "2", "--ckpt-every", "2", "--data-cache", data_cache, "--out", str(tmp_path / "gpu"),
              "--no-progress", "--no-plots", "--device", "cuda"]
    assert main(common + ["--steps", "4"]) == 0
    assert main(common + ["--steps", "6", "--resume"]) == 0
    recs = read_metrics(tmp_path / "gpu" / "metrics.jsonl")
    loss = [r["loss"] for r in recs if "loss" in r]
    assert len(loss) == 6 and all(math.isfinite(v) for v in loss) and loss[-1] < loss[0]
    model, cfg, tok = load_pretrained(tmp_path / "gpu", device="cpu")
    assert next(model.parameters()).device.type == "cpu"


def test_a_verified_checkpoint_is_hashed_once_until_it_changes(tmp_path, monkeypatch):
    """Loading reads a checkpoint several times over (its config, its weights' header, its weights),
    each verified: files hashed once stay verified while unchanged, so ``flyer generate --ckpt``
    hashes each once; a file written since (or in the last two seconds, the mtime's granularity) is
    hashed again, and corruption is still caught."""
    model = Transformer(preset("tiny"))
    tok = {"model": {"type": "WordLevel", "vocab": {"<unk>": 0}, "unk_token": "<unk>"}}
    files = {"model.safetensors": model.state_dict(), "config.json": model.cfg.to_dict(), "tokenizer.json": tok}
    step = ckpt.save_checkpoint(tmp_path / "checkpoints", 1, files)
    hashed = []
    real = ckpt.sha256_file
    monkeypatch.setattr(ckpt, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    ckpt.verify_checkpoint(step)
    ckpt.verify_checkpoint(step)
    assert hashed.count("model.safetensors") == 2  # just written: not remembered
    old = time.time() - 60
    for f in step.iterdir():
        os.utime(f, (old, old))
    hashed.clear()
    assert main(["generate", "--ckpt", str(tmp_path), "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu",
                 "--json"]) == 0
    assert hashed.count("model.safetensors") == 1, hashed
    data = bytearray((step / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (step / "model.safetensors").write_bytes(bytes(data))  # the same size, a new mtime
    with pytest.raises(ckpt.CheckpointError, match="checksum mismatch"):
        ckpt.verify_checkpoint(step)


def test_fp8_activation_cache_setting_reaches_every_fp8_layer(tmp_path, data_cache):
    """``--fp8-activation-cache``: every FP8 layer of the trained model takes it; the first step's loss (a forward)
    is the same either way, the second differs (the first update's weight gradients came from re-tiled FP8 tiles
    or from the inputs themselves)."""
    from flyer.fp8 import FP8Experts, FP8Linear
    runs = {}
    for cache in ("fp8", "input"):
        t = Trainer(tc_for(tmp_path / cache, data_cache, precision="fp8", fp8_activation_cache=cache, steps=2,
                           eval_every=2, ckpt_every=2), log=quiet)
        recipes = {m.recipe.activation_cache for m in t.model.modules() if isinstance(m, (FP8Linear, FP8Experts))}
        assert recipes == {cache}
        t.run()
        runs[cache] = losses(tmp_path / cache)
    assert runs["fp8"][1] == runs["input"][1] and runs["fp8"][2] != runs["input"][2]
