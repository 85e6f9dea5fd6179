"""Pipeline parallelism with GQA attention and routed experts, against one process: three tiny models
of the kinds flyer imports (Qwen3-MoE: head norms, softmax router renormalised, no shared expert, a
dense layer first; Mixtral: every layer MoE, no head norms; GLM-4.5: partial rotary, q/k/v biases,
DeepSeek's sigmoid router with correction bias and groups, a shared expert and an MTP module) on 2
gloo ranks, PP 2 under the default schedule (1F1B) and DualPipeV, over several AdamW steps.
``tests/test_pipeline.py`` covers every schedule and PP x EP x DP layout on the DeepSeek (MLA) model;
this is its harness on the GQA architectures.

All cases run in one spawn of 2 ranks (cached; each case builds its own mesh, in the same order on
every rank). Each pipeline step runs M micro-batches of B sequences; the oracle is the one-process
model with gradient accumulation over the M micro-batches.

Tolerances, as ``tests/test_pipeline.py`` derives them (FP32 throughout; only the summation order
differs from one process):

- Per step, the loss terms (next-token, MTP, balance) and every gradient equal the one-process values
  *at the same weights* (the pipeline's, gathered before the step) within FP32_TOL relative to the
  oracle tensor's largest magnitude, as in ``test_ep_model``.
- After the steps every parameter equals the one-process trajectory within ``adamw_bound`` (the
  gradients' tolerance carried through AdamW), and GLM's router biases within FP32_TOL.

That the comparison is tight: the same pipeline results against a one-process model changed in
nothing but its rotary width or its router (the same weights) fail it.
"""

from __future__ import annotations

import functools

import pytest
import torch

from flyer.config import preset
from flyer.model.moe import update_router_bias
from flyer.model.transformer import Transformer
from flyer.parallel.mesh import init_distributed
from flyer.parallel.pipeline import PipelineModel
from flyer.parallel.stages import SPLIT_SCHEDULES
from flyer.train.build import build_model
from ranks import needs_split_backward, run_schedules
from test_pipeline import (ADAM_EPS, CLIP, FP32_TOL, LR, SEED, STEPS, B, M, T, _rel, accumulate,
                           adamw_trajectory, check_trajectory, term_failures)

# test_pipeline's sizes: B sequences per micro-batch of T tokens, M micro-batches per step (the fewest DualPipeV
# on pp 2 runs), its STEPS of AdamW (LR, CLIP, ADAM_EPS) and tolerance
WORLD = PP = 2

_GQA = dict(vocab_size=256, n_layers=4, max_seq_len=64, original_seq_len=64, attn="gqa", n_kv_heads=2, head_dim=32,
            n_routed_experts=8, n_activated_experts=2, rope_factor=1.0, rope_type="default")
_SOFTMAX_ROUTER = dict(score_func="softmax", router_bias=False, norm_topk_prob=True, route_scale=1.0,
                       n_shared_experts=0, n_expert_groups=1, n_limited_groups=1, mtp_depth=0)
MODELS = {
    "qwen3_moe": dict(_GQA, **_SOFTMAX_ROUTER, qk_norm=True, n_dense_layers=1),
    "mixtral": dict(_GQA, **_SOFTMAX_ROUTER, qk_norm=False, n_dense_layers=0),
    "glm4_moe": dict(_GQA, rotary_dim=16, attn_bias=True, score_func="sigmoid", router_bias=True, norm_topk_prob=True,
                     route_scale=2.5, n_shared_experts=1, n_expert_groups=4, n_limited_groups=2, n_dense_layers=1,
                     mtp_depth=1),
}
# the same weights, computed otherwise: each must fail the comparison
MUTANTS = {"qwen3_moe": dict(norm_topk_prob=False), "mixtral": dict(score_func="sigmoid"),
           "glm4_moe": dict(rotary_dim=0)}
SCHEDULES = ("1f1b", "dualpipev")  # the trainer's default and DualPipeV
CASES = {f"{m}-{s}": (m, s) for m in MODELS for s in SCHEDULES}


def _cfg(model: str, **change):
    return preset("tiny", **{**MODELS[model], **change})


def _batch(step: int):
    """The batch of a step: M micro-batches of B sequences."""
    g = torch.Generator().manual_seed(100 + step)
    data = torch.randint(0, 256, (M * B, T + 1), generator=g)
    return data[:, :-1], data[:, 1:]


# ---- ranks --------------------------------------------------------------------------------------
def _case(rank: int, name: str) -> dict:
    model, schedule = CASES[name]
    cfg = _cfg(model)
    mesh = init_distributed(cfg, pp=PP, timeout_s=120)
    pm = PipelineModel(build_model(cfg, mesh, "fp32", seed=SEED, stages=(schedule, T)), mesh, schedule, M, B, T)
    opt = torch.optim.AdamW(pm.parameters(), lr=LR, weight_decay=0.1, eps=ADAM_EPS)
    steps = []
    for step in range(STEPS):
        before = mesh.full_state_dict(pm)  # the whole model on rank 0
        x, y = _batch(step)
        terms = pm.train_step(x, y)
        mesh.sync_gradients(pm)
        pm.sync_mirrors()
        terms = {k: v * PP for k, v in mesh.mean(terms).items()}  # as the trainer: each term lives on one stage
        grads = {n: p.grad.clone() for n, p in pm.named_parameters()}
        mesh.clip_grad_norm_(pm, CLIP)
        update_router_bias(pm, group=mesh.dp_group)
        opt.step()
        opt.zero_grad()
        steps.append(dict(state=before if rank == 0 else None, terms=terms, grads=grads))
    return dict(steps=steps, final=mesh.full_state_dict(pm))


@functools.cache
def _results() -> list[dict]:
    return run_schedules(_case, {name: schedule for name, (_, schedule) in CASES.items()}, WORLD)


# ---- single-process oracles -----------------------------------------------------------------------
def _accumulate(ref: Transformer, step: int) -> dict[str, float]:
    """``accumulate`` over the step's M micro-batches."""
    return accumulate(ref, *_batch(step))


def _oracle_at(cfg, state: dict, step: int) -> tuple[dict, dict]:
    """(loss terms, gradients) of one process at the weights ``state`` on step ``step``'s batch."""
    ref = Transformer(cfg)
    ref.load_state_dict(state)
    terms = _accumulate(ref, step)
    return terms, {n: p.grad for n, p in ref.named_parameters()}


@functools.cache
def _trajectory(model: str) -> dict:
    return adamw_trajectory(_cfg(model), _accumulate)


def _step_failures(cfg, results: list[dict], step: int) -> list[str]:
    """Where the pipeline's loss terms and gradients of ``step`` miss the one-process ones of ``cfg``."""
    terms, grads = _oracle_at(cfg, results[0]["steps"][step]["state"], step)
    failures = []
    for rank, res in enumerate(results):
        got = res["steps"][step]
        failures += term_failures(got["terms"], terms, f"step {step} rank {rank}")
        for pname, g in got["grads"].items():
            if not _rel(g, grads[pname]) <= FP32_TOL:
                failures.append(f"step {step} rank {rank} grad {pname}: {_rel(g, grads[pname]):.2e}")
    # every parameter's gradient is produced on some rank (the pipeline's ranks hold the whole model)
    held = set().union(*(r["steps"][step]["grads"] for r in results))
    if held != set(grads):
        failures.append(f"step {step}: gradients of {sorted(held ^ set(grads))[:5]} missing or extra")
    return failures


def _params():
    return [pytest.param(n, marks=[needs_split_backward] if s in SPLIT_SCHEDULES else [])
            for n, (_, s) in CASES.items()]


@pytest.mark.parametrize("name", _params())
def test_pipeline_steps_match_single_process(name):
    """Loss terms and every gradient at each step, then the weights and router biases after the steps."""
    model, _ = CASES[name]
    cfg = _cfg(model)
    results = [r[name] for r in _results()]
    failures = [f for step in range(STEPS) for f in _step_failures(cfg, results, step)]
    assert not failures, "\n".join(failures[:20])
    # what sets these models apart is held and trained by the pipeline
    grads = results[0]["steps"][0]["grads"] | results[1]["steps"][0]["grads"]
    assert any(k.endswith("attn.wq.bias") for k in grads) == cfg.attn_bias
    assert any(k.endswith("attn.q_head_norm.weight") for k in grads) == cfg.qk_norm
    assert any(k.startswith("mtp.") for k in grads) == (cfg.mtp_depth > 0)
    assert all(r["steps"][0]["terms"]["aux_loss"] > 0 for r in results)
    assert all((r["steps"][0]["terms"]["mtp_loss"] > 0) == (cfg.mtp_depth > 0) for r in results)

    ref = _trajectory(model)
    final = results[0]["final"]
    assert set(final) == set(ref["state"])
    biases = [k for k in final if k.endswith("gate.bias")]
    assert bool(biases) == cfg.router_bias and all(final[k].abs().max() > 0 for k in biases)  # moved, compared
    check_trajectory(final, ref, name)


@pytest.mark.parametrize("model", list(MODELS))
def test_a_different_rotary_or_router_fails_the_comparison(model):
    """The default schedule's first step against one process with the same weights and one change
    (``MUTANTS``: the whole head rotating, or another router): the comparison above must fail."""
    cfg = _cfg(model, **MUTANTS[model])
    assert cfg != _cfg(model)
    results = [r[f"{model}-{SCHEDULES[0]}"] for r in _results()]
    assert _step_failures(cfg, results, 0)
