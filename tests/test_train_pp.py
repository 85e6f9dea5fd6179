"""`flyer train` with pipeline parallelism under torchrun (gloo, CPU): PP2 x EP2 with DualPipeV
on 4 ranks against EP2 with grad_accum = M on 2 ranks (the same batches: each data-parallel
replica draws its own sample stream), a kill -9 mid-run and --resume, a resume without the pipeline, the
checkpoint in one process, and two torchrun agents as two nodes over loopback.

Launchers. The killed run and the two-node runs need torchrun (its agent tears the job down; c10d
rendezvous across agents); the other runs call ``flyer train`` in-process on ranks forked from the
tests' forkserver (``ranks.run_ranks``: the environment torchrun gives, without each rank's seconds
of imports). The same ranks, threads and arguments give the same numbers under either launcher: the
resumed run's records, half from torchrun's killed run, equal the forked uninterrupted run's exactly.

Tolerance of the loss comparisons. The learning rate is tiny (``LR``), so the two runs' weights
stay within a known distance and the losses compare tightly at every step, not only the first
(at the same weights they differ by the FP32 summation order alone: FP32_TOL relative). Adam moves
each element by at most lr per step (Kingma & Ba, sec. 2.1: |step| <= lr when 1 - beta1 <=
sqrt(1 - beta2); here 0.1 <= 0.22), weight decay by lr * wd * |w| more; so after k steps two runs'
weights differ by at most d = 2 k lr (1 + wd max|w|) per element, and a loss by at most
||grad||_1 d <= sqrt(N) ||grad||_2 d (N parameters). ||grad||_2 is the logged grad_norm (over so
small a distance the gradient does not change: curvature x d is 1e-7 of it); we take twice the
largest logged one. Routing could flip a token whose two expert scores tie within 1e-7: with a few
thousand routing decisions per step that has probability ~1e-4 and is not modelled.
"""

from __future__ import annotations

import contextlib
import functools
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

import pytest
from child_env import child_env
from ranks import needs_split_backward, run_ranks

from flyer.interop.load import load_pretrained
from flyer.parallel.launch import job_store
from flyer.train import checkpoint as ckpt
from flyer.train.metrics import read_metrics

FP32_TOL = 1e-4
LR, WD, STEPS, M = 1e-8, 0.1, 4, 4  # WD: the trainer's default weight decay


def _env() -> dict[str, str]:
    """The ranks' environment, read when they start (the session's TMPDIR is set after this module is imported)."""
    return child_env(OMP_NUM_THREADS="1")


TIMEOUT_S = 600


def _torchrun(nproc: int, *launch: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launch, "--nproc-per-node", str(nproc), "-m", "flyer",
            "train"]


def _train_args(out: Path, cache: str, *extra: str) -> list[str]:
    return ["--preset", "tiny", "--vocab-size", "512", "--batch-size", "2", "--seq-len", "32", "--steps", str(STEPS),
            "--lr", str(LR), "--warmup", "0", "--schedule", "constant",
            "--precision", "fp32", "--eval-every", "2", "--eval-batches", "1", "--ckpt-every", "2", "--threads", "1",
            "--no-progress", "--no-plots", "--data-cache", cache, "--out", str(out), "--device", "cpu",
            "--collective-timeout", "120", *extra]


PP_ARGS = ("--pp", "2", "--ep", "2", "--pp-schedule", "dualpipev", "--micro-batches", str(M))


def _cli_rank(rank: int, argv: list[str]) -> tuple[int, str]:
    """``flyer train`` in this (forked) rank: its exit code and what it wrote to stderr."""
    from flyer.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["train", *argv])
    return rc, err.getvalue()


def _run_forked(nproc: int, args: list[str]) -> str:
    """``flyer train`` on ``nproc`` forked ranks (module docstring): rank 0's stderr; every rank must succeed."""
    res = run_ranks(_cli_rank, nproc, args)
    assert all(rc == 0 for rc, _ in res), [err[-4000:] for _, err in res]
    return res[0][1]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=_env())
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def _records(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


@functools.lru_cache(maxsize=None)
def _pp_run(root: str, cache: str) -> dict[int, dict]:
    """The uninterrupted PP2 x EP2 DualPipeV run on 4 ranks (shared by the tests below)."""
    out = Path(root) / "pp"
    err = _run_forked(4, _train_args(out, cache, *PP_ARGS))
    assert "layout: 4 ranks on 1 node(s) of 4: PP 2 x DP 2, EP 2, dualpipev over 4 micro-batches" in err, err[-3000:]
    return _records(out)


@pytest.fixture(scope="module")
def pp_run(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("pp")
    return root, _pp_run(str(root), data_cache)


def _loss_bound(a: dict, b: dict, step: int, key: str) -> float:
    """How far two runs' ``key`` may lie apart at ``step`` (module docstring)."""
    n_params = 1.7e6 * 1.05  # the tiny preset at vocab 512 ("1.7M params" in the log), rounded up
    grad = 2 * max(max(r["grad_norm"] for r in x.values() if r["step"] <= step) for x in (a, b))
    drift = math.sqrt(n_params) * grad * 2 * (step - 1) * LR * (1 + WD)
    return FP32_TOL * abs(b[step][key]) + drift


@pytest.mark.slow
@needs_split_backward
def test_pp_ep_dualpipev_equals_ep_with_grad_accum(pp_run, data_cache):
    root, pp = pp_run
    ref_out = root / "ep"
    _run_forked(2, _train_args(ref_out, data_cache, "--ep", "2", "--grad-accum", str(M)))
    ref = _records(ref_out)
    assert sorted(pp) == sorted(ref) == list(range(1, STEPS + 1))
    losses = [ref[s]["main_loss"] for s in ref]
    # the batches differ from step to step by far more than the bound: a wrong batch would show
    assert max(losses) - min(losses) > 10 * _loss_bound(pp, ref, STEPS, "main_loss")
    for step in ref:
        for key in ("loss", "main_loss", "mtp_loss", "aux_loss") + (("val_loss",) if "val_loss" in ref[step] else ()):
            bound = _loss_bound(pp, ref, step, key)
            assert abs(pp[step][key] - ref[step][key]) <= bound, (step, key, pp[step][key], ref[step][key], bound)
        assert pp[step]["mtp_loss"] > 0 and pp[step]["aux_loss"] > 0  # every term is computed and gathered


@pytest.mark.slow
@needs_split_backward
def test_a_pipeline_checkpoint_resumes_without_the_pipeline(pp_run, data_cache):
    """The PP2 x EP2 run's step-2 checkpoint resumed on EP2 alone with grad_accum M (as many batches a step): each
    rank loads its part of the optimizer's state, saved whole, and its replica's sampler; steps 3-4 stay on the
    pipeline run's trajectory (a replica drawing another's batches would leave it: see the test above)."""
    root, pp = pp_run
    out = root / "unpiped"
    shutil.copytree(root / "pp", out)
    shutil.rmtree(out / "checkpoints" / ckpt.step_dir_name(STEPS))
    err = _run_forked(2, _train_args(out, data_cache, "--ep", "2", "--grad-accum", str(M), "--resume"))
    assert "at step 2; world 4 -> 2; pp 2 -> 1; pp_schedule dualpipev -> None" in err, err[-3000:]
    got = _records(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        for key in ("loss", "main_loss", "mtp_loss", "aux_loss"):
            bound = _loss_bound(got, pp, step, key)
            assert abs(got[step][key] - pp[step][key]) <= bound, (step, key, got[step][key], pp[step][key], bound)


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (Linux /proc)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for k in kids:
            out += [k, *_children(k)]
    return out


def _rank_pid(agent: int, rank: int) -> int | None:
    for pid in _children(agent):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
    return None


@pytest.mark.slow
@needs_split_backward
def test_kill_9_mid_run_and_resume_continues_the_same_trajectory(pp_run, data_cache):
    root, pp = pp_run
    out = root / "killed"
    cmd = _torchrun(4, "--standalone") + _train_args(out, data_cache, *PP_ARGS)
    job = subprocess.Popen(cmd + ["--steps", "40"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env=_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (out / "checkpoints" / ckpt.step_dir_name(2) / "manifest.json").exists():
            assert job.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.05)
        victim = _rank_pid(job.pid, 3)  # a rank of the last pipeline stage, in the middle of step 3
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        err = job.communicate(timeout=TIMEOUT_S)[1]
        assert job.returncode != 0, err[-2000:]  # torchrun tore the other ranks down
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert "resumed from" in _run_forked(4, _train_args(out, data_cache, *PP_ARGS, "--resume"))
    got = _records(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:  # same layout, same order of every sum: the same numbers
        for key in ("loss", "main_loss", "mtp_loss", "aux_loss", "grad_norm"):
            assert got[step][key] == pp[step][key], (step, key, got[step][key], pp[step][key])
    model, cfg, _ = load_pretrained(out)  # the one-process layout
    assert len(model.layers) == cfg.n_layers and model.layers[1].ffn.experts.w1.shape[0] == cfg.n_routed_experts
    assert len(model.mtp) == cfg.mtp_depth


@pytest.mark.slow
@needs_split_backward
def test_two_torchrun_agents_as_two_nodes(pp_run, data_cache, tmp_path):
    """Two agents on loopback, c10d rendezvous, 2 ranks each: each pipeline stage on its own node
    (LOCAL_WORLD_SIZE = 2 ranks per node), EP inside the node; losses equal the one-node run's."""
    _, pp = pp_run
    out = tmp_path / "two-nodes"
    store = job_store()  # the rendezvous's, held here while the agents run: neither binds a port only checked free
    jobs = []
    try:
        for node in (0, 1):
            launch = ("--nnodes", "2", "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint",
                      f"127.0.0.1:{store.port}", "--rdzv-id", "flyer-test", "--rdzv-conf", "is_host=0")
            cmd = _torchrun(2, *launch) + _train_args(out, data_cache, *PP_ARGS, "--steps", "2")
            jobs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                                         start_new_session=True))
        outs = [job.communicate(timeout=TIMEOUT_S) for job in jobs]
    finally:
        for job in jobs:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()
    for job, (_, err) in zip(jobs, outs):
        assert job.returncode == 0, err[-4000:]
    # rank 0 (on either agent) logs the nodes it found: LOCAL_WORLD_SIZE ranks each
    assert "layout: 4 ranks on 2 node(s) of 2: PP 2 x DP 2, EP 2" in outs[0][1] + outs[1][1]
    got = _records(out)
    assert sorted(got) == [1, 2]
    summaries = [json.loads(line) for o, _ in outs for line in o.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["steps"] == 2, summaries  # rank 0's alone
    for step in got:  # the same layout and ranks as on one node: only the transport differs
        for key in ("loss", "main_loss", "mtp_loss"):
            assert abs(got[step][key] - pp[step][key]) <= FP32_TOL * abs(pp[step][key]), (step, key)


# ---- layouts that cannot run: one line naming the flag, exit 2, before any work -------------------
BAD_LAYOUTS = {  # extra flags (tiny preset: 4 layers), environment (a torchrun world), the line's start
    "more stages than layers": (["--pp", "4", "--pp-schedule", "dualpipev"], {},
                                "--pp: dualpipev on 4 ranks cuts the model into 8 stages"),
    "pp does not divide the world": (["--pp", "2"], {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_WORLD_SIZE": "3"},
                                     "--pp: must divide the world size 3"),
    "too few micro-batches": (["--pp", "2", "--pp-schedule", "dualpipev", "--micro-batches", "2"], {},
                              "--micro-batches: dualpipev on 2 ranks needs at least 4 micro-batches (got 2)"),
    "interleaved micro-batches": (["--pp", "2", "--pp-schedule", "interleaved", "--micro-batches", "5"], {},
                                  "--micro-batches: interleaved 1F1B needs a multiple of --pp = 2 (got 5)"),
    "micro-batches without pp": (["--micro-batches", "4"], {},
                                 "--micro-batches: needs pipelining (--pp > 1); without it use --grad-accum"),
    "grad-accum with pp": (["--pp", "2", "--grad-accum", "2"], {},
                           "--grad-accum: must be 1 with pipelining: --micro-batches sets"),
    "unknown schedule": (["--pp", "2", "--pp-schedule", "gpipe"], {}, "--pp-schedule: must be one of 1f1b, "),
    "pp without a launch": (["--pp", "2"], {}, "--pp: 2 needs a multi-process launch"),
    "stage replicas across nodes": (["--pp", "3"], {"WORLD_SIZE": "6", "RANK": "0", "LOCAL_WORLD_SIZE": "3"},
                                    "--pp: each of the 3 stages has 2 ranks, which must be whole nodes or lie inside "
                                    "one node of 3 ranks"),
    # byte-level BPE needs 257 tokens: said by the config check, not by data preparation after rendezvous
    "vocab below the tokenizer's": (["--pp", "2", "--vocab-size", "256"],
                                    {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_WORLD_SIZE": "2"},
                                    "--vocab-size: must be >= 257"),
    "ep larger than a stage": (["--pp", "2", "--ep", "4"], {"WORLD_SIZE": "4", "RANK": "0", "LOCAL_WORLD_SIZE": "4"},
                               "--ep: must divide the 2 data-parallel ranks of a stage (world 4 / pp 2)"),
}


@pytest.mark.parametrize("case", list(BAD_LAYOUTS))
def test_bad_layout_is_one_line_before_any_work(case, tmp_path, monkeypatch, capsys):
    from flyer.cli import main

    extra, env, start = BAD_LAYOUTS[case]
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "run"
    cache = tmp_path / "cache"
    assert main(["train", "--preset", "tiny", "--out", str(out), "--data-cache", str(cache), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"flyer: error: {start}"), err
    assert not out.exists() and not cache.exists()  # no run directory, no data prepared


@pytest.mark.parametrize("version,schedule,start", [
    ("2.12.1", "dualpipev", "--pp-schedule: dualpipev needs torch >= 2.13 (this is 2.12.1, "),
    ("2.11.0", "zb", "--pp-schedule: zb needs torch >= 2.13 (this is 2.11.0, "),
    ("2.12.1", "interleaved", "--pp: 2 needs a multi-process launch"),  # runs there: the next check speaks
    ("2.13.0", "dualpipev", "--pp: 2 needs a multi-process launch")])
def test_split_backward_schedules_need_torch_2_13(version, schedule, start, tmp_path, monkeypatch, capsys):
    """zb and dualpipev on an older torch (a GPU machine's image has 2.11): one line, before any work."""
    import torch
    from torch.torch_version import TorchVersion

    from flyer.cli import main

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(torch, "__version__", TorchVersion(version))
    out, cache = tmp_path / "run", tmp_path / "cache"
    assert main(["train", "--preset", "tiny", "--out", str(out), "--data-cache", str(cache), "--pp", "2",
                 "--pp-schedule", schedule]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"flyer: error: {start}"), err
    assert not out.exists() and not cache.exists()
