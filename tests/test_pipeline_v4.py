"""Pipeline parallelism with a DeepSeek-V4 model (``tiny-v4`` shrunk: hyper-connections, hash-routed MoE layers,
hybrid attention with window-only, CSA and HCA layers) against one process, on 2 gloo ranks under every schedule
(``PP_SCHEDULES``), over several AdamW steps. ``tests/test_pipeline.py`` is the harness (its sizes, oracles and
tolerances); what V4 adds:

- the stages hand on the ``hc_mult`` streams (B, T, N, D), the first expanding them; the last stage's MTP module
  (V4's: window-only, its own ``hc_head``) reads them before the loss collapses them;
- the hash-routed layers route by the micro-batch's token ids, which every stage gets (the schedule's keyword
  argument); the splits below put a hash layer on a stage past the first under every schedule (checked);
- each layer rotates with its kind's rope table (window-only and compressed layers at other bases).

Tolerances, as ``tests/test_pipeline.py`` derives them (FP32 throughout; only the summation order differs from one
process): per step the loss terms and every gradient at the same weights within FP32_TOL relative to the oracle
tensor's largest magnitude; after the steps every parameter within ``adamw_bound`` of the one-process trajectory,
and the buffers (router biases, hash tables) within FP32_TOL. The evaluation path (``forward_loss``) at the final
weights: the one-process next-token loss within FP32_TOL relative.

That the comparison is tight: a stage past the first that routes its hash layers by token id 0, or that receives
stream 0 in place of every stream, misses it by orders of magnitude (``MUTANTS``). Last, ``flyer train --preset
tiny-v4 --pp 2`` under torchrun against one process with grad_accum (tests/test_train_pp.py's pattern and bound).
"""

from __future__ import annotations

import contextlib
import functools
import math
from pathlib import Path

import pytest
import torch

from flyer.cli import main
from flyer.config import preset
from flyer.model.counts import param_counts
from flyer.model.moe import update_router_bias
from flyer.model.transformer import Transformer
from flyer.parallel.grads import init_like_single_process
from flyer.parallel.memory import plan_state_bytes
from flyer.parallel.mesh import init_distributed
from flyer.parallel.pipeline import PipelineModel, Stage, residual_shape
from flyer.parallel.stages import PP_SCHEDULES, SPLIT_SCHEDULES, chunks_per_rank, split_layers
from flyer.train.metrics import read_metrics
from flyer.train.build import build_model
from oracle_cache import by_state
from ranks import needs_split_backward, run_schedules
from test_pipeline import (ADAM_EPS, CLIP, FP32_TOL, LR, SEED, STEPS, B, M, _rel, accumulate, adamw_trajectory,
                           check_trajectory, term_failures)
from test_train_pp import _run, _torchrun  # the torchrun command and its subprocess check

WORLD = PP = 2
T = 16  # test_pipeline's 12 would leave the HCA layer (ratio 8) one entry
# tiny-v4 shrunk, with its MTP module: layers 0-3 hash-routed (some past the first stage under every split: 1F1B's
# puts the MTP block's cost beside layer 3), the MTP block routed by score with a bias; window 4 < T so the
# compressed entries matter; top-2 of the CSA layers' entries
V4 = dict(vocab_size=256, dim=64, n_heads=2, head_dim=32, q_lora_rank=32, qk_rope_head_dim=8, window_size=4,
          compress_ratios=(0, 4, 8, 4), o_groups=2, o_lora_rank=16, index_topk=2, index_n_heads=2, index_head_dim=16,
          moe_inter_dim=32, n_routed_experts=8, n_activated_experts=2, n_hash_layers=4, max_seq_len=64,
          original_seq_len=64)
MUTANTS = ("tokens-zero", "stream-0")  # deliberately wrong stages (``_mutant``), run under 1F1B for one step
CASES = {**{s: (s, None) for s in PP_SCHEDULES}, **{m: ("1f1b", m) for m in MUTANTS}}


def _cfg():
    return preset("tiny-v4", **V4)


def _batch(step: int):
    """The batch of a step: M micro-batches of B sequences."""
    g = torch.Generator().manual_seed(100 + step)
    data = torch.randint(0, 256, (M * B, T + 1), generator=g)
    return data[:, :-1], data[:, 1:]


# ---- ranks --------------------------------------------------------------------------------------
@contextlib.contextmanager
def _mutant(kind: str | None):
    """Stages past the first get wrong inputs: token ids all 0 ("tokens-zero"), or stream 0 in every stream."""
    if kind is None:
        yield
        return
    right = Stage.forward

    def wrong(self, x, tokens_BT):
        if not self.first:
            if kind == "tokens-zero":
                tokens_BT = torch.zeros_like(tokens_BT)
            else:
                x = x[:, :, :1].expand_as(x)
        return right(self, x, tokens_BT)

    Stage.forward = wrong
    try:
        yield
    finally:
        Stage.forward = right


def _case(rank: int, name: str) -> dict:
    schedule, mutant = CASES[name]
    cfg = _cfg()
    mesh = init_distributed(cfg, pp=PP, timeout_s=120)
    pm = PipelineModel(build_model(cfg, mesh, "fp32", seed=SEED, stages=(schedule, T)), mesh, schedule, M, B, T)
    planned = plan_state_bytes(cfg, PP, 1, 1, 0, schedule, seq_len=T)["param_bytes_per_rank"][mesh.pp_rank]
    held = sum(p.numel() * p.element_size() for p in pm.parameters())
    opt = torch.optim.AdamW(pm.parameters(), lr=LR, weight_decay=0.1, eps=ADAM_EPS)
    steps = []
    for step in range(1 if mutant else STEPS):
        before = mesh.full_state_dict(pm)  # the whole model on rank 0
        x, y = _batch(step)
        with _mutant(mutant):
            terms = pm.train_step(x, y)
        mesh.sync_gradients(pm)
        pm.sync_mirrors()
        terms = {k: v * PP for k, v in mesh.mean(terms).items()}  # as the trainer: each term lives on one stage
        grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}  # not the frozen indexers
        mesh.clip_grad_norm_(pm, CLIP)
        update_router_bias(pm, group=mesh.dp_group)
        opt.step()
        opt.zero_grad()
        steps.append(dict(state=before if rank == 0 else None, terms=terms, grads=grads))
    pm.eval()
    x, y = _batch(STEPS)
    val = pm.forward_loss(x[:B], y[:B])  # the evaluation path: stage after stage, plain send/recv
    pm.train()
    return dict(steps=steps, final=mesh.full_state_dict(pm), val=mesh.mean({"v": val})["v"] * PP,
                planned=planned, held=held)


@functools.cache
def _results() -> list[dict]:
    return run_schedules(_case, {name: schedule for name, (schedule, _) in CASES.items()}, WORLD)


# ---- single-process oracles -----------------------------------------------------------------------
def _accumulate(ref: Transformer, step: int) -> dict[str, float]:
    return accumulate(ref, *_batch(step))


@by_state  # the cases ask it about the same weights (their first step at least)
def _oracle_at(state: dict, step: int) -> tuple[dict, dict]:
    """(loss terms, gradients) of one process at the weights ``state`` on step ``step``'s batch."""
    ref = Transformer(_cfg())
    ref.load_state_dict(state)
    terms = _accumulate(ref, step)
    return terms, {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}


@functools.cache
def _trajectory() -> dict:
    return adamw_trajectory(_cfg(), _accumulate)


def _step_errors(results: list[dict], step: int) -> tuple[list[str], float]:
    """(where the pipeline's loss terms and gradients of ``step`` miss one process's, the largest gradient error)."""
    terms, grads = _oracle_at(results[0]["steps"][step]["state"], step)
    failures, worst = [], 0.0
    for rank, res in enumerate(results):
        got = res["steps"][step]
        failures += term_failures(got["terms"], terms, f"step {step} rank {rank}")
        for pname, g in got["grads"].items():
            err = _rel(g, grads[pname])
            worst = max(worst, err)
            if not err <= FP32_TOL:
                failures.append(f"step {step} rank {rank} grad {pname}: {err:.2e}")
    held = set().union(*(r["steps"][step]["grads"] for r in results))
    if held != set(grads):
        failures.append(f"step {step}: gradients of {sorted(held ^ set(grads))[:5]} missing or extra")
    return failures, worst


# ---- no processes -------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", PP_SCHEDULES)
def test_splits_put_a_hash_layer_past_the_first_stage(schedule):
    """What the comparison exercises: a hash-routed layer on a stage past the first (it needs the token ids
    handed to it), window-only, CSA and HCA layers, and 4-stream residuals between stages."""
    cfg = _cfg()
    split = split_layers(cfg, PP * chunks_per_rank(schedule, PP), T)
    assert any(i < cfg.n_hash_layers for stage in split[1:] for i in stage), split
    assert set(cfg.compress_ratios) == {0, cfg.csa_ratio, 8} and cfg.hc_mult == 4 and cfg.mtp_depth == 1
    assert residual_shape(cfg, B, T) == (B, T, 4, cfg.dim)


def test_init_replay_draws_the_hash_tables():
    """A pipeline rank builds its stages on meta and zeroes their buffers (``build_model``); the replayed init
    must then draw each hash layer's token -> experts table as the one-process build does (zeros would send
    every token's copies to expert 0, and a stage routing by token id 0 would pass unnoticed)."""
    torch.manual_seed(SEED)
    ref = Transformer(_cfg())
    model = Transformer(_cfg())
    for b in model.buffers():
        b.zero_()
    init_like_single_process(model, None, SEED)
    tables = [k for k in ref.state_dict() if k.endswith("tid2eid")]
    assert len(tables) == _cfg().n_hash_layers and all(ref.state_dict()[k].any() for k in tables)
    for (name, a), b in zip(ref.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


# ---- the 2-rank runs ----------------------------------------------------------------------------------
def _params():
    return [pytest.param(s, marks=[needs_split_backward] if s in SPLIT_SCHEDULES else []) for s in PP_SCHEDULES]


@pytest.mark.parametrize("schedule", _params())
def test_pipeline_steps_match_single_process(schedule):
    """Loss terms and every gradient at each step, the weights and buffers after the steps, the evaluation
    loss at the final weights, and the planned parameter bytes of each rank."""
    results = [r[schedule] for r in _results()]
    failures = [f for step in range(STEPS) for f in _step_errors(results, step)[0]]
    assert not failures, "\n".join(failures[:20])
    grads = results[0]["steps"][0]["grads"] | results[1]["steps"][0]["grads"]
    assert "hc_head.fn" in grads and any(k.endswith("hc_attn.fn") for k in grads)  # the streams are trained
    assert all(r["steps"][0]["terms"]["aux_loss"] > 0 for r in results)  # the score-routed layer's balance loss

    ref = _trajectory()
    final = results[0]["final"]
    assert set(final) == set(ref["state"])
    check_trajectory(final, ref, schedule)

    model = Transformer(_cfg())
    model.load_state_dict(final)
    model.eval()
    with torch.no_grad():
        x, y = _batch(STEPS)
        want = model.compute_loss(x[:B], y[:B]).main_loss.item()
    assert all(abs(r["val"] - want) <= FP32_TOL * abs(want) for r in results), ([r["val"] for r in results], want)
    assert all(r["held"] == r["planned"] for r in results)  # flyer.parallel.memory plans the hc_head too


@pytest.mark.parametrize("mutant", MUTANTS)
def test_a_wrong_stage_input_fails_the_comparison(mutant):
    """Token ids dropped past the first stage (a hash layer routing by id 0) or only stream 0 handed on: the
    first step's gradients miss the one-process ones by more than 100 x the tolerance."""
    failures, worst = _step_errors([r[mutant] for r in _results()], 0)
    assert failures and worst > 100 * FP32_TOL, (failures[:5], worst)


# ---- flyer train --pp 2 under torchrun ----------------------------------------------------------------
CLI_LR, CLI_WD, CLI_STEPS, CLI_M = 1e-8, 0.1, 2, 2


def _train(out: Path, cache: str, *extra: str) -> dict[int, dict]:
    args = ["--preset", "tiny-v4", "--vocab-size", "512", "--batch-size", "2", "--seq-len", "32", "--steps",
            str(CLI_STEPS), "--lr", str(CLI_LR), "--warmup", "0", "--schedule", "constant", "--precision", "fp32",
            "--eval-every", str(CLI_STEPS), "--eval-batches", "1", "--ckpt-every", "100", "--threads", "1",
            "--no-progress", "--no-plots", "--data-cache", cache, "--out", str(out), "--device", "cpu", *extra]
    if "--pp" in extra:
        err = _run(_torchrun(WORLD, "--standalone") + args + ["--collective-timeout", "120"]).stderr
        assert "PP 2" in err, err[-3000:]
    else:  # one process: this one (a process start-up spared)
        assert main(["train", *args]) == 0
    return {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


def test_flyer_train_pp2_equals_one_process(tmp_path, data_cache):
    """``flyer train --preset tiny-v4 --pp 2`` (1F1B over 2 micro-batches) against one process with
    grad_accum 2 on the same batches. The bound is tests/test_train_pp.py's: the same weights at step 1 (only
    the summation order differs), then at most 2 k lr (1 + wd max|w|) apart per element after k steps, which moves
    a loss by at most sqrt(N) ||grad|| times that (||grad||: twice the largest logged grad_norm; max|w| < 1)."""
    pp = _train(tmp_path / "pp", data_cache, "--pp", "2", "--micro-batches", str(CLI_M))
    one = _train(tmp_path / "one", data_cache, "--grad-accum", str(CLI_M))
    assert sorted(pp) == sorted(one) == list(range(1, CLI_STEPS + 1))
    # the same weights at step 1: the gradient norm too (a hash layer routing otherwise would move it)
    assert abs(pp[1]["grad_norm"] - one[1]["grad_norm"]) <= FP32_TOL * one[1]["grad_norm"]
    n = param_counts(preset("tiny-v4", vocab_size=512)).total
    grad = 2 * max(r["grad_norm"] for x in (pp, one) for r in x.values())
    for step in one:
        drift = math.sqrt(n) * grad * 2 * (step - 1) * CLI_LR * (1 + CLI_WD)
        for key in ("loss", "main_loss", "aux_loss") + (("val_loss",) if "val_loss" in one[step] else ()):
            bound = FP32_TOL * abs(one[step][key]) + drift
            assert abs(pp[step][key] - one[step][key]) <= bound, (step, key, pp[step][key], one[step][key], bound)
    assert "val_loss" in pp[CLI_STEPS] and "val_loss" in one[CLI_STEPS]
