"""Pipeline parallelism on LongCat-Flash's layout (``shortcut_moe``: blocks 2i and 2i+1 share one MoE, which block 2i
computes from its FFN input and block 2i+1 adds to its output; zero-computation experts in the router's columns),
against one process: every schedule flyer offers on 2 gloo ranks (1F1B; interleaved 1F1B, ZBV and DualPipeV, whose
four stages are chunks), over ``test_pipeline``'s STEPS of AdamW with router-bias updates.

Stages hold whole pairs: ``split_layers`` cuts only before even blocks (it counts pairs), each stage links its pairs
(``link_pairs``), and a layout with more stages than pairs is refused naming pp. 10 blocks (5 pairs): the
FLOP-optimal split without the pair rule would cut a pair on every schedule here (``test_split_counts_pairs``), so
cutting one would show. Apart (no processes): a stage links the pairs it is handed, and the planners
(``flyer plan``'s ``memory_per_gpu``, the saved activations) count one MoE a pair.

Tolerances as ``tests/test_pipeline.py`` derives them (FP32; only the summation order differs from one process):
each step's loss terms and every gradient at the pipeline's weights within FP32_TOL relative to the oracle's largest
magnitude, the weights after the steps within ``adamw_bound`` and the router biases (the zero experts' columns
included) within FP32_TOL. The oracle is the one-process model with gradient accumulation over the M micro-batches,
itself held to transformers' LongcatFlash in ``tests/test_hf_longcat_flash.py``.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import replace

import pytest
import torch

from flyer.cluster.costs import Layout, activation_bytes_per_token_layer, memory_per_gpu
from flyer.cluster.costs import validate_layout as costs_layout
from flyer.config import preset
from flyer.errors import FieldError
from flyer.model.counts import layer_flops_per_token, param_counts
from flyer.model.moe import update_router_bias
from flyer.model.transformer import Transformer
from flyer.parallel.mesh import init_distributed
from flyer.parallel.pipeline import PipelineModel, Stage
from flyer.parallel.stages import (PP_SCHEDULES, SPLIT_SCHEDULES, chunks_per_rank, end_flops, split_layers,
                                   stage_ranks, validate_pipeline)
from flyer.train.config import TrainConfig
from flyer.train.build import build_model, training_memory_bytes
from oracle_cache import by_state
from ranks import needs_split_backward, run_schedules
from test_pipeline import (ADAM_EPS, CLIP, FP32_TOL, LR, SEED, STEPS, B, M, T, _rel, accumulate,
                           adamw_trajectory, check_trajectory, term_failures)

WORLD = PP = 2
E, Z = 8, 4  # routed and zero-computation experts
SCHEDULES = PP_SCHEDULES  # 1F1B: 2 stages; the others: 4 chunks


def _cfg(**change):
    """A tiny LongCat-Flash (the shapes of tests/test_hf_longcat_flash.py's): 10 MLA blocks, each with a dense FFN,
    5 shortcut MoEs, softmax router with a correction bias over E routed and Z identity experts, not renormalised."""
    return preset("tiny", **{**dict(
        vocab_size=256, dim=64, n_layers=10, n_heads=4, inter_dim=96, q_lora_rank=16, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, moe_inter_dim=32, n_routed_experts=E,
        n_zero_experts=Z, n_activated_experts=3, n_dense_layers=0, shortcut_moe=True, score_func="softmax",
        router_bias=True, norm_topk_prob=False, n_expert_groups=1, n_limited_groups=1, n_shared_experts=0,
        route_scale=1.5, mtp_depth=0, max_seq_len=64, original_seq_len=64), **change})


def _batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    data = torch.randint(0, 256, (M * B, T + 1), generator=g)
    return data[:, :-1], data[:, 1:]


# ---- ranks --------------------------------------------------------------------------------------
def _case(rank: int, schedule: str) -> dict:
    cfg = _cfg()
    mesh = init_distributed(cfg, pp=PP, timeout_s=120)
    pm = PipelineModel(build_model(cfg, mesh, "fp32", seed=SEED, stages=(schedule, T)), mesh, schedule, M, B, T)
    # each stage's pairs: both blocks held there, sharing one list that no other pair uses
    pairs = [(st.index, [b.layer_id for b in st.layers],
              all(b.pair is st.layers[j - 1].pair for j, b in enumerate(st.layers) if j % 2),
              len({id(b.pair) for b in st.layers})) for st in pm.stages]
    opt = torch.optim.AdamW(pm.parameters(), lr=LR, weight_decay=0.1, eps=ADAM_EPS)
    steps = []
    for step in range(STEPS):
        before = mesh.full_state_dict(pm)
        terms = pm.train_step(*_batch(step))
        mesh.sync_gradients(pm)
        terms = {k: v * PP for k, v in mesh.mean(terms).items()}  # as the trainer: each term lives on one stage
        grads = {n: p.grad.clone() for n, p in pm.named_parameters()}
        mesh.clip_grad_norm_(pm, CLIP)
        update_router_bias(pm, group=mesh.dp_group)
        opt.step()
        opt.zero_grad()
        steps.append(dict(state=before if rank == 0 else None, terms=terms, grads=grads))
    return dict(steps=steps, final=mesh.full_state_dict(pm), pairs=pairs)


@functools.cache
def _results() -> list[dict]:
    return run_schedules(_case, {s: s for s in SCHEDULES}, WORLD)


# ---- single-process oracles ---------------------------------------------------------------------
def _accumulate(ref: Transformer, step: int) -> dict[str, float]:
    return accumulate(ref, *_batch(step))


@functools.cache
def _trajectory() -> dict:
    return adamw_trajectory(_cfg(), _accumulate)


@by_state  # the schedules ask it about the same weights (their first step at least)
def _oracle_at(state: dict, step: int) -> tuple[dict, dict]:
    """(loss terms, gradients) of one process at the weights ``state`` on step ``step``'s batch."""
    ref = Transformer(_cfg())
    ref.load_state_dict(state)
    terms = _accumulate(ref, step)
    return terms, {n: p.grad for n, p in ref.named_parameters()}


def _step_failures(results: list[dict], step: int) -> list[str]:
    terms, grads = _oracle_at(results[0]["steps"][step]["state"], step)
    failures = []
    for rank, res in enumerate(results):
        got = res["steps"][step]
        failures += term_failures(got["terms"], terms, f"step {step} rank {rank}")
        failures += [f"step {step} rank {rank} grad {n}: {_rel(g, grads[n]):.2e}" for n, g in got["grads"].items()
                     if not _rel(g, grads[n]) <= FP32_TOL]
    held = set().union(*(r["steps"][step]["grads"] for r in results))
    if held != set(grads):
        failures.append(f"step {step}: gradients of {sorted(held ^ set(grads))[:5]} missing or extra")
    return failures


@pytest.mark.parametrize("schedule", [pytest.param(s, marks=[needs_split_backward] if s in SPLIT_SCHEDULES else [])
                                      for s in SCHEDULES])
def test_pipeline_steps_match_single_process(schedule):
    """Every stage holds whole, linked pairs; loss terms (the shortcut MoEs' balance loss included) and every
    gradient at each step, then the weights and router biases after the steps, equal one process's."""
    results = [r[schedule] for r in _results()]
    placement = stage_ranks(schedule, PP)
    split = split_layers(_cfg(), len(placement), T)
    for rank, res in enumerate(results):
        assert [s for s, _, _, _ in res["pairs"]] == [s for s, r in enumerate(placement) if r == rank]
        for s, ids, linked, lists in res["pairs"]:
            assert ids == list(split[s]) and ids[0] % 2 == 0 and len(ids) % 2 == 0, (s, ids)
            assert linked and lists == len(ids) // 2, (s, ids)
    failures = [f for step in range(STEPS) for f in _step_failures(results, step)]
    assert not failures, "\n".join(failures[:20])
    assert all(r["steps"][0]["terms"]["aux_loss"] > 0 for r in results)  # every stage's shortcut MoEs balance
    ref = _trajectory()
    final = results[0]["final"]
    assert set(final) == set(ref["state"])
    biases = [k for k in final if k.endswith("gate.bias")]
    assert len(biases) == 5 and all(final[k][E:].abs().max() > 0 for k in biases)  # zero experts' columns moved
    check_trajectory(final, ref, schedule)


# ---- the split and the refusals (no processes) ----------------------------------------------------
def _best_over(cfg, n_stages: int, seq_len: int, cut_points) -> float:
    """The smallest largest-stage cost over the contiguous splits cut at ``cut_points`` only."""
    cost = [layer_flops_per_token(cfg, seq_len, i) for i in range(cfg.n_layers)]
    best = float("inf")
    for cuts in itertools.combinations(cut_points, n_stages - 1):
        bounds = (0, *cuts, cfg.n_layers)
        stages = [sum(cost[a:b]) for a, b in zip(bounds, bounds[1:])]
        stages[-1] += end_flops(cfg, seq_len)
        best = min(best, max(stages))
    return best


def test_split_counts_pairs():
    """``split_layers`` of a shortcut-MoE model: the FLOP-optimal split among those that cut between pairs only;
    on every layout the pipeline test runs, the optimum over all cuts would cut a pair (so that test would see it)."""
    cfg = _cfg()
    L = cfg.n_layers
    for n in range(1, L // 2 + 1):
        split = split_layers(cfg, n, T)
        assert [i for r in split for i in r] == list(range(L)) and all(r.start % 2 == 0 == len(r) % 2 for r in split)
        got = max(sum(layer_flops_per_token(cfg, T, i) for i in r) + (end_flops(cfg, T) if s == n - 1 else 0)
                  for s, r in enumerate(split))
        assert got == pytest.approx(_best_over(cfg, n, T, range(2, L, 2)), rel=1e-12), (n, split)
    for schedule in SCHEDULES:
        n = PP * chunks_per_rank(schedule, PP)
        assert _best_over(cfg, n, T, range(1, L)) < _best_over(cfg, n, T, range(2, L, 2)), schedule


@pytest.mark.parametrize("n_layers,schedule", [(6, "dualpipev"), (6, "interleaved"), (2, "1f1b")])
def test_more_stages_than_pairs_is_one_line_naming_pp(n_layers, schedule):
    cfg = _cfg(n_layers=n_layers)
    with pytest.raises(FieldError, match=r"^pp: .*stages of whole block pairs.*pairs \(got 2\)$") as e:
        validate_pipeline(cfg, PP, schedule, 4)
    assert "\n" not in str(e.value)
    with pytest.raises(FieldError, match=r"^pp: .*whole block pairs"):
        split_layers(cfg, PP * chunks_per_rank(schedule, PP), T)
    validate_pipeline(_cfg(n_layers=2 * PP * chunks_per_rank(schedule, PP)), PP, schedule, 4)  # enough pairs: runs


def test_a_stage_links_the_pairs_it_holds():
    """A stage links its pairs itself (``link_pairs``), whatever lists its blocks come with: blocks handed over
    unlinked (each its own list; the second block of a pair then adds nothing) compute as the linked model does."""
    model = Transformer(_cfg(n_layers=4)).eval()
    x = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = model.last_residual(x)
        for b in model.layers:
            b.pair = []
        assert not torch.equal(model.last_residual(x), want)  # unlinked, the shortcut MoEs' outputs are lost
        got = Stage(model, 0, range(4), 1, 1).eval()(x)
    assert torch.equal(got, want)


def test_estimates_count_one_shortcut_moe_a_pair():
    """The planners see a pair as a dense FFN per block and one MoE: ``flyer plan``'s per-GPU parameters at PP 1 are
    the model's (not an MoE in every block), its stages whole pairs (PP at most the pairs, one line naming pp); a
    block saves for backward its dense FFN's activations, a pair's first the MoE's too (their normed input once)."""
    cfg = _cfg()
    assert memory_per_gpu(cfg, Layout(gpus=1), T, 80)["params_per_gpu"] == param_counts(cfg).total
    assert memory_per_gpu(cfg, Layout(gpus=5, pp=5), T, 80)["layers_per_stage"] == 2
    with pytest.raises(FieldError, match=r"^pp: must be <= the model's 5 block pairs \(shortcut_moe; got 6\)$"):
        costs_layout(cfg, Layout(gpus=6, pp=6))
    plain, el = cfg.replace(shortcut_moe=False), 4
    for recompute in (False, True):
        saved = [activation_bytes_per_token_layer(cfg, True, recompute, el, i) for i in (0, 1, None)]
        dense_block, moe_block = (activation_bytes_per_token_layer(plain, moe, recompute, el) for moe in (False, True))
        # a dense FFN's saved elements: its norm's input and output, both projections and the product (with
        # recomputation the FP8 caches alone, no norm's)
        normed = 0 if recompute else 2 * cfg.dim
        dense = 0.5 * (cfg.dim + 2 * cfg.inter_dim) if recompute else 2 * cfg.dim + 3 * cfg.inter_dim
        assert saved[1] == dense_block  # attention and the dense FFN
        assert saved[0] - saved[1] == moe_block - dense_block + (dense - normed) * el  # the MoE's, the norm's once
        assert saved[2] == saved[0]  # no layer named: the heavier block
    # the trainer's pre-flight lower bound: per row, each block's own (not the heavier one's ten times), the MTP
    # module's (a dense FFN, over the T - 1 tokens it reads) and the heads' hidden-state gradients
    tc, cfg = TrainConfig(seq_len=T), cfg.replace(mtp_depth=1)
    per_row = training_memory_bytes(cfg, replace(tc, batch_size=2 * tc.batch_size), "fp32")
    per_row = (per_row - training_memory_bytes(cfg, tc, "fp32")) / tc.batch_size
    pair = sum(activation_bytes_per_token_layer(cfg, True, False, el, i) for i in (0, 1))
    mtp = activation_bytes_per_token_layer(cfg, True, False, el, cfg.n_layers)
    assert mtp == activation_bytes_per_token_layer(plain, False, False, el)  # a dense block
    assert per_row == T * (cfg.n_layers // 2 * pair + 2 * cfg.dim * 4) + (T - 1) * mtp  # 2 heads' FP32 gradients
