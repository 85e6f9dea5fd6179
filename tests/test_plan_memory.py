"""ZeRO-1 under pipelining in real runs (4 gloo ranks): ``memory.json`` (each rank's measured
bytes of parameters, gradients and optimizer state) equals ``flyer plan``'s per-rank numbers byte
for byte; a checkpoint resumes onto the uninterrupted run's loss trajectory, refuses another
layout in one line, and loads in one process for inference."""

import json
import shutil

import pytest
import torch

from flyer.config import ModelConfig
from flyer.interop.load import load_pretrained
from flyer.model.transformer import Transformer
from flyer.cli import main
from flyer.errors import CheckpointError, ConfigError
from flyer.parallel.memory import KEYS
from flyer.parallel.optim_state import SavedState
from flyer.train import checkpoint as ckpt
from flyer.train.metrics import read_metrics
from flyer.train.config import TrainConfig
from flyer.train.trainer import Trainer
from ranks import needs_split_backward, run_ranks

SEQ = 32


def _train(rank: int, out: str, cache: str, pp: int, ep: int, zero: int, schedule: str, steps: int,
           resume: bool = False, grad_accum: int = 1):
    tc = TrainConfig(preset="tiny", steps=steps, batch_size=2, seq_len=SEQ, warmup=1, eval_every=1000,
                     eval_batches=1, ckpt_every=2, threads=1, progress=False, plots=False, data_cache=cache, out=out,
                     device="cpu", pp=pp, ep=ep, zero=zero, pp_schedule=schedule, resume=resume, grad_accum=grad_accum,
                     collective_timeout_s=120)
    try:
        return Trainer(tc, log=lambda m: None).run()
    except (CheckpointError, ConfigError) as e:
        return str(e)


def _plan(capsys, run, pp: int, ep: int, schedule: str) -> dict:
    cfg = json.loads((ckpt.resolve_checkpoint_path(run) / "config.json").read_text())
    argv = ["plan", "--preset", "tiny", "--gpus", "4", "--pp", str(pp), "--ep", str(ep), "--zero", "1",
            "--pp-schedule", schedule, "--seq-len", str(SEQ), "--vocab-size", str(cfg["vocab_size"]), "--precision",
            "fp32", "--json"]
    capsys.readouterr()
    rc = main(argv)
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


def _assert_plan_equals_run(capsys, run, pp: int, ep: int, schedule: str) -> dict:
    measured = json.loads((run / "memory.json").read_text())
    planned = _plan(capsys, run, pp, ep, schedule)
    for k in KEYS:
        assert measured[f"{k}_per_rank"] == planned[f"{k}_per_rank"], k
        assert measured[f"max_{k}_per_rank"] == planned[f"max_{k}_per_rank"], k
    assert len(planned["activation_bytes_per_rank_estimate"]) == 4
    return measured


@pytest.mark.slow
@needs_split_backward
def test_pp2_ep2_dualpipev_zero1_memory_is_the_plan(tmp_path, data_cache, capsys):
    """PP 2 x EP 2 (DualPipeV: rank 0 holds the first and last stage): dense state sharded over
    the stage's 2 ranks, each EP rank's experts whole (ep == dp: one replica)."""
    run = tmp_path / "run"
    run_ranks(_train, 4, str(run), data_cache, 2, 2, 1, "dualpipev", 1)
    m = _assert_plan_equals_run(capsys, run, 2, 2, "dualpipev")
    assert m["layout"] == {"world": 4, "pp": 2, "dp": 2, "ep": 2, "zero": 1, "pp_schedule": "dualpipev"}


def _saved(step) -> dict:
    with SavedState(step) as f:
        return f.read_all()


def _assert_every_parameters_state(step, saved: dict) -> None:
    """The optimizer state file ``saved`` of checkpoint ``step`` holds AdamW's state of every parameter of the
    one-process model (expert stacks whole), each tensor its parameter's shape."""
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_dict(json.loads((step / "config.json").read_text())))
    params = dict(model.named_parameters())
    assert {k.rpartition("/")[0] for k in saved} == set(params)
    for name, p in params.items():
        assert saved[f"{name}/exp_avg"].shape == saved[f"{name}/exp_avg_sq"].shape == p.shape, name
        assert saved[f"{name}/step"].shape == ()


def _resave(rank: int, out: str, cache: str, ep: int, zero: int, grad_accum: int) -> int:
    """Resume ``out`` on one pipeline stage (``ep``, ``zero``; ``grad_accum`` batches a step) and checkpoint at once."""
    tc = TrainConfig(preset="tiny", steps=4, batch_size=2, seq_len=SEQ, warmup=1, eval_every=1000, eval_batches=1,
                     ckpt_every=2, threads=1, progress=False, plots=False, data_cache=cache, out=out, device="cpu",
                     ep=ep, zero=zero, grad_accum=grad_accum, resume=True, collective_timeout_s=120)
    trainer = Trainer(tc, log=lambda m: None)
    try:
        trainer.save()
    finally:
        trainer.close()
    return trainer.step


@pytest.mark.slow
def test_pp2_dp2_1f1b_zero1_memory_resume_and_layout(tmp_path, data_cache, capsys):
    """PP 2 x DP 2, 1F1B (the last stage holds the embedding's mirror for MTP): the plan equals
    the run; resuming step 2 without ZeRO replays steps 3-4 exactly (ZeRO-1's updates are the unsharded
    optimizer's, bit for bit); on one stage with EP 2 (grad_accum 2: the same batches a step) each rank
    loads its part of the optimizer's state and saving it again gives the same state, bit for bit, from which the
    pipeline replays steps 3-4 exactly; four replicas of one stage go on at as many batches a step (the two new
    ones on their own streams), and at more batches a step are refused in one line."""
    full, part, moved, wide = tmp_path / "full", tmp_path / "part", tmp_path / "moved", tmp_path / "wide"
    run_ranks(_train, 4, str(full), data_cache, 2, 1, 1, "1f1b", 4)
    measured = _assert_plan_equals_run(capsys, full, 2, 1, "1f1b")
    assert measured["param_bytes_per_rank"][0] != measured["param_bytes_per_rank"][2]  # two different stages
    # the weights: written by each stage's first rank, 2 of the 4, numbered without a gap
    written = sorted(p.name for p in (full / "checkpoints" / ckpt.step_dir_name(4)).glob("model-*"))
    assert written == [ckpt.weights_part_name(i, 2) for i in range(2)]

    for d in (part, moved, wide):
        shutil.copytree(full, d)
        shutil.rmtree(d / "checkpoints" / ckpt.step_dir_name(4))
    res = run_ranks(_train, 4, str(part), data_cache, 1, 1, 0, "1f1b", 4, True, 2)  # one stage: dp 4
    assert all("grad_accum: 8 batches a step (4 data-parallel replicas x 2" in r for r in res), res[0]
    # dp 4 at as many batches a step: replicas 0-1 go on with their streams, 2-3 start their own where they stood
    run_ranks(_train, 4, str(wide), data_cache, 1, 1, 0, "1f1b", 4, True, 1)
    samplers = [json.loads((wide / "checkpoints" / ckpt.step_dir_name(4) / f"state-rank{r}.json").read_text())[
        "sampler"] for r in range(4)]
    first = [json.loads((full / "checkpoints" / ckpt.step_dir_name(4) / f"state-rank{r}.json").read_text())[
        "sampler"]["seed"] for r in range(2)]
    assert [s["position"] for s in samplers] == [6] * 4  # 2 steps of 2 batches, then 2 of 1
    assert [s["seed"] for s in samplers[:2]] == first and len({s["seed"] for s in samplers}) == 4
    run_ranks(_train, 4, str(part), data_cache, 2, 1, 0, "1f1b", 4, True)
    want = [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(full / "metrics.jsonl")]
    got = [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(part / "metrics.jsonl")]
    assert [s for s, _, _ in got] == [1, 2, 3, 4]
    # the same arithmetic on the same inputs (weights, shards, sampler, RNG restored): equal, not close
    assert got == want

    step2 = moved / "checkpoints" / ckpt.step_dir_name(2)
    saved = _saved(step2)
    _assert_every_parameters_state(step2, saved)
    assert run_ranks(_resave, 2, str(moved), data_cache, 2, 1, 2) == [2, 2]
    again = _saved(step2)
    assert ckpt.saved_layout(step2) == {"world": 2, "pp": 1, "dp": 2, "ep": 2, "zero": 1, "pp_schedule": None}
    assert sorted(again) == sorted(saved) and all(torch.equal(again[k], saved[k]) for k in saved)
    run_ranks(_train, 4, str(moved), data_cache, 2, 1, 1, "1f1b", 4, True)  # back on the pipeline: the same steps
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(moved / "metrics.jsonl")] == want

    model, cfg, _ = load_pretrained(full)  # one process, single-process layout
    assert model.layers[cfg.n_layers - 1].ffn.experts.w1.shape[0] == cfg.n_routed_experts
    with torch.no_grad():
        assert torch.isfinite(model(torch.zeros(1, 4, dtype=torch.long))).all()


@pytest.mark.slow
def test_ep2_dp4_zero1_state_loads_whole_on_other_expert_layouts(tmp_path, data_cache):
    """EP 2 over DP 4 with ZeRO-1 (dense state sharded over 4 replicas, each expert slice's over the 2 holding it):
    the optimizer's state saved whole is the same bit for bit when EP 4 (every rank its own experts, each part
    sharded) and EP 1 without ZeRO (every rank all of it) load it and save it again."""
    run = tmp_path / "run"
    run_ranks(_train, 4, str(run), data_cache, 1, 2, 1, "1f1b", 2)
    step = run / "checkpoints" / ckpt.step_dir_name(2)
    saved = _saved(step)
    _assert_every_parameters_state(step, saved)
    for ep, zero in ((4, 1), (1, 0)):
        assert run_ranks(_resave, 4, str(run), data_cache, ep, zero, 1) == [2] * 4
        again = _saved(step)
        assert ckpt.saved_layout(step)["ep"] == ep
        assert sorted(again) == sorted(saved) and all(torch.equal(again[k], saved[k]) for k in saved), (ep, zero)


def test_plan_bad_layouts_are_one_line(capsys):
    for extra, flag in ((["--pp", "3"], "--pp"), (["--zero", "2"], "--zero"), (["--pp", "2", "--dp", "4"], "--dp"),
                        (["--pp", "2", "--pp-schedule", "vee"], "--pp-schedule")):
        rc = main(["plan", "--preset", "tiny", "--gpus", "4", *extra])
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and flag in lines[0], (extra, err)


def test_plan_splits_the_layers_once_per_stage_rank(monkeypatch):
    """The stage split (a dynamic program) runs once per pipeline rank, not once per rank: a stage's
    replicas hold the same activations (``flyer plan --preset dsv3 --zero 1``, 2,048 data-parallel
    ranks, took 20 s in it)."""
    from flyer.config import preset
    from flyer.parallel import memory, stages

    calls = []
    split = stages.split_layers
    monkeypatch.setattr(memory, "split_layers", lambda *a, **k: calls.append(a) or split(*a, **k))
    res = memory.plan_state_bytes(preset("tiny"), pp=2, dp=8, ep=1, zero=1)
    assert len(res["activation_bytes_per_rank_estimate"]) == 16
    assert len(calls) == 2
