"""Expert parallelism with a DeepSeek-V4 model (``tiny-v4`` shrunk as in ``tests/test_pipeline_v4.py``: 4 streams of
hyper-connections, hash-routed MoE in layers 0-2, window-only, CSA and HCA layers, 8 routed experts) against one
process: EP 2 on 2 gloo ranks (FP32 wire, and FP8 dispatch), and PP 2 x EP 2 on 4 under every pipeline schedule
(1F1B over the steps; interleaved 1F1B, ZBV zero bubble and DualPipeV, its forward and backward chunks overlapped as
the trainer runs it with EP > 1, one step each: their four stages of one layer each want 4 micro-batches).

Every rank builds its model as the trainer does (``build_model``: the one-process initialisation replayed, each EP
rank keeping its experts), so the hash tables (``tid2eid``) come from that replay: every rank must hold the one-process
tables (checked), or the hash layers would route a token to other experts on one rank than on another.

A step: each data-parallel replica runs M micro-batches of B sequences (gradient accumulation, or the pipeline's
micro-batches), gradients summed over the replicas, global-norm clipping, router-bias update, AdamW. The oracle is
one process accumulating over the dp x M micro-batches in replica order (``tests/test_pipeline.py``'s). Tolerances,
as the harnesses derive them:

- FP32 wire (``tests/test_pipeline.py``): per step the loss terms at the same weights within FP32_TOL of one
  process, every gradient within FP32_TOL of the exact (FP64) one, plus the one-process FP32 run's own error there
  (``_step_errors``: the hyper-connection head's gradients cancel; its ``fn``, ``scale`` and ``base`` also within
  the bound their sums' conditioning gives), both relative to the tensor's largest magnitude;
  after the steps (cases of STEPS steps) every parameter within ``adamw_bound`` of the one-process trajectory, the
  buffers (router biases, hash tables) within FP32_TOL.
- FP8 dispatch (flat, BF16 combine; ``tests/test_ep_model.py``): one step against the one-process model with the
  same wire roundings, normwise within ``wire_bound(FLIP_SHARE)`` of the wire's whole effect on that tensor.

That the comparison is tight: a rank whose hash tables are zero (every token's copies to expert 0, as
``init_like_single_process`` left them on pipeline ranks before its fix) misses it by orders of magnitude and fails
the table check. (Before that fix an EP rank kept its constructor's tables, drawn after expert stacks a half the size:
the check named layers 1 and 2 on both ranks.) Under the overlapped DualPipeV, stages past the first routing their
hash layers by token id 0 miss it by orders of magnitude too.
Last, ``flyer train --preset tiny-v4 --ep 2`` under torchrun against one process drawing the same rows (--grad-accum 2,
tests/test_train_ep_longcat.py's ``TwoStreams``), tests/test_train_pp.py's bound.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from flyer.config import preset
from flyer.model.counts import param_counts
from flyer.model.hyper import HyperHead, _unit_rms
from flyer.model.moe import update_router_bias
from flyer.model.transformer import Transformer
from flyer.parallel.dispatch import dispatcher_factory
from flyer.parallel.grads import expert_param_names
from flyer.parallel.mesh import init_distributed
from flyer.parallel.pipeline import PipelineModel
from flyer.parallel.stages import PP_SCHEDULES, SPLIT_SCHEDULES, min_micro_batches, split_backward_runs
from flyer.train.build import build_model
from oracle_cache import by_state
from ranks import needs_split_backward, run_ranks
from test_ep_model import FLIP_SHARE, _nrel, wire_bound
from test_pipeline import (ADAM_EPS, CLIP, FP32_TOL, LR, SEED, STEPS, B, _rel, accumulate, adamw_trajectory,
                           check_trajectory, term_failures)
from test_pipeline_v4 import CLI_LR, CLI_STEPS, CLI_WD, MUTANTS, V4, T, _mutant
from test_pipeline_v4 import _cfg as _pipeline_cfg
from test_train_ep_longcat import one_process
from test_train_pp import _records, _run, _torchrun

def _cfg(mtp_depth: int = 0):
    """test_pipeline_v4's model, layers 0-2 hash-routed and 3 by score (with a bias); without its MTP module unless
    ``mtp_depth`` (``tests/test_ep_v4_mtp.py`` runs these cases with it)."""
    return _pipeline_cfg().replace(mtp_depth=mtp_depth, n_hash_layers=3)


M, DP = 2, 2  # micro-batches per replica and step; replicas (every case: 2 EP ranks, or 2 per pipeline stage)
# name: (world, pp, ep, dispatcher, fp8 dispatch, steps, mutant, pipeline schedule, micro-batches per replica)
CASES = {
    "ep2": (2, 1, 2, "hierarchical", False, STEPS, None, None, M),  # the trainer's default dispatcher
    "ep2-fp8": (2, 1, 2, "flat", True, 1, None, None, M),  # FP8 payload, BF16 combine (--fp8-dispatch)
    "ep2-tid2eid-zero": (2, 1, 2, "flat", False, 1, "tid2eid-zero", None, M),  # rank 1's hash tables zero
    "pp2-ep2-1f1b": (4, 2, 2, "hierarchical", False, STEPS, None, "1f1b", M),
    # two stages per rank (4 of one layer each): min_micro_batches' 4 micro-batches; one step (the step's bounds)
    **{f"pp2-ep2-{s}": (4, 2, 2, "hierarchical", False, 1, None, s, min_micro_batches(s, 2))
       for s in PP_SCHEDULES if s != "1f1b"},
    # DualPipeV's stages past the first route their hash layers by token id 0 (``test_pipeline_v4._mutant``)
    "pp2-ep2-dualpipev-tokens-zero": (4, 2, 2, "hierarchical", False, 1, "tokens-zero", "dualpipev", 4),
}


def _batch(step: int, m: int = M):
    """The global batch of a step: DP x m micro-batches of B sequences, replica-major."""
    g = torch.Generator().manual_seed(100 + step)
    data = torch.randint(0, V4["vocab_size"], (DP * m * B, T + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def _tables(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The hash tables this rank holds (a pipeline rank: its stages' only)."""
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith("tid2eid") and not b.is_meta}


# ---- ranks --------------------------------------------------------------------------------------
def _case(rank: int, name: str, cases: dict, mtp_depth: int, probe) -> dict:
    _, pp, ep, kind, fp8, steps, mutant, schedule, m = cases[name]
    cfg = _cfg(mtp_depth)
    mesh = init_distributed(cfg, ep=ep, pp=pp, timeout_s=120)
    base = build_model(cfg, mesh, "fp32", seed=SEED, dispatcher=kind, fp8_dispatch=fp8,
                       stages=(schedule, T) if pp > 1 else None)
    if mutant == "tid2eid-zero" and rank == 1:
        for n, b in base.named_buffers():
            if n.endswith("tid2eid"):
                b.zero_()
    tables = _tables(base)
    model = PipelineModel(base, mesh, schedule, m, B, T) if pp > 1 else base  # DualPipeV with EP: overlapped
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, eps=ADAM_EPS)
    rows = slice(mesh.dp_rank * m * B, (mesh.dp_rank + 1) * m * B)
    out = []
    for step in range(steps):
        # the whole model (on rank 0 under pipelining); without pipelining its CPU tensors are the live ones
        before = {k: v.clone() for k, v in mesh.full_state_dict(model).items()}
        x, y = _batch(step, m)
        if pp > 1:
            with _mutant(mutant if mutant in MUTANTS else None):
                terms = model.train_step(x[rows], y[rows])
            mesh.sync_gradients(model)
            model.sync_mirrors()
            terms = {k: v * pp for k, v in mesh.mean(terms).items()}  # as the trainer: each term on one stage
        else:
            terms = accumulate(model, x[rows], y[rows])  # the trainer's grad_accum over M micro-batches
            mesh.sync_gradients(model)
            terms = mesh.mean(terms)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}  # not the indexers
        mesh.clip_grad_norm_(model, CLIP)
        update_router_bias(model, group=mesh.dp_group)
        opt.step()
        opt.zero_grad()
        out.append(dict(state=before if rank == 0 else None, terms=terms, grads=grads))
    overlapped = sum(getattr(f, "runs", 0) for f in getattr(getattr(model, "schedule", None),
                                                             "_comp_type_to_function_map", {}).values())
    return dict(steps=out, final=mesh.full_state_dict(model), tables=tables, ep_rank=mesh.ep_rank,
                experts=expert_param_names(model), micro_batches=m, overlapped=overlapped, mtp_depth=mtp_depth,
                **(probe(model) if probe else {}))


def _worker(rank: int, cases: dict | None = None, mtp_depth: int = 0, probe=None) -> dict:
    """The cases of this world size (``cases``: CASES) with ``_cfg(mtp_depth)``; ``probe(model)``: more of each
    case's results (a dict) after its steps."""
    world, cases = int(os.environ["WORLD_SIZE"]), cases or CASES
    out = {name: _case(rank, name, cases, mtp_depth, probe) for name, case in cases.items()
           if case[0] == world and (split_backward_runs() or case[7] not in SPLIT_SCHEDULES)}
    dist.destroy_process_group()
    return out


@functools.cache
def _results(world: int) -> list[dict]:
    return run_ranks(_worker, world)


def _case_results(name: str) -> list[dict]:
    return [r[name] for r in _results(CASES[name][0])]


# ---- single-process oracles -----------------------------------------------------------------------
@functools.cache
def _initial_state(mtp_depth: int = 0) -> dict:
    """The trainer's initialisation in one process."""
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        return Transformer(_cfg(mtp_depth)).state_dict()


def _oracle_at(state: dict, step: int, fp8: bool = False, dtype: torch.dtype = torch.float32,
               m: int = M, mtp_depth: int = 0, heads: dict | None = None) -> tuple[dict, dict]:
    """(loss terms, gradients) of one process at ``state`` on step ``step``'s batch of ``m`` micro-batches per
    replica; ``fp8``: with the FP8 wire's roundings (``LocalDispatcher``'s round trip and BF16 combine); ``dtype``
    float64: the exact gradients. ``heads``: filled with ``_head_terms``' conditioning of the heads' gradients."""
    terms, grads, conditioning = _oracle(state, step, fp8, dtype, m, mtp_depth, heads is not None)
    if heads is not None:
        heads.update(conditioning)
    return terms, grads


@by_state  # the cases ask it about the same weights (their first step at least)
def _oracle(state: dict, step: int, fp8: bool, dtype: torch.dtype, m: int, mtp_depth: int,
            with_heads: bool) -> tuple[dict, dict, dict]:
    """``_oracle_at``'s (terms, gradients) and, ``with_heads``, the heads' conditioning."""
    cfg = _cfg(mtp_depth)
    ref = Transformer(cfg, dispatcher_factory(cfg, None, "local", fp8, None)).to(dtype)
    ref.load_state_dict(state)
    heads: dict[str, float] = {}
    terms_of = _head_terms(ref) if with_heads else {}
    terms = accumulate(ref, *_batch(step, m))
    grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    for name, parts in terms_of.items():  # each head's |dL/dz|, |u| and |mix| over the step's positions P
        c, u, mix = (torch.cat([p[i].flatten(0, 1) for p in parts]).abs() for i in range(3))
        fn, scale, base = (grads[f"{name}.{k}"].abs().max() for k in ("fn", "scale", "base"))
        heads.update({
            f"{name}.fn": float((c.max() * u.sum(0) + u.max() * c.sum(0)[:, None]).max() / fn),
            f"{name}.scale": float((c.max() * mix.sum() + mix.max() * c.sum()) / scale),
            f"{name}.base": float(c.max() * c.shape[0] / base)})
    return terms, grads, heads


def _head_terms(ref: Transformer) -> dict[str, list]:
    """Hooks on ``ref``'s hyper-connection heads (``HyperHead``: z = mix * scale + base, mix = u fn^T, u the
    streams flattened and RMS-normalised, the streams' weights sigmoid(z)) that collect, per forward and backward,
    (c = dL/dz (B, T, N), u (B, T, N D), mix (B, T, N)): over the positions the gradient of ``fn`` is the sum of the
    outer products c u, of ``scale`` the sum of c * mix, of ``base`` the sum of c."""
    out: dict[str, list] = {}

    def hook(name, mod, inp, res):
        h = inp[0].detach()
        B, T, N, D = h.shape
        u = _unit_rms(h.reshape(B, T, N * D), mod.norm_eps)
        mix = F.linear(u, mod.fn.detach())
        s = torch.sigmoid(mix * mod.scale.detach() + mod.base.detach())
        res.register_hook(lambda g: out.setdefault(name, []).append(
            (torch.einsum("btd,btnd->btn", g, h) * s * (1 - s), u, mix)))

    for name, mod in ref.named_modules():
        if isinstance(mod, HyperHead):
            mod.register_forward_hook(functools.partial(hook, name))
    return out


@functools.cache
def _trajectory(mtp_depth: int = 0) -> dict:
    return adamw_trajectory(_cfg(mtp_depth), lambda ref, step: accumulate(ref, *_batch(step)))


def _shard(want: torch.Tensor, got: torch.Tensor, res: dict, name: str) -> torch.Tensor:
    """The oracle gradient ``want`` cut to this rank's experts when ``name`` is an expert stack."""
    if name not in res["experts"]:
        return want
    n = got.shape[0]
    return want[res["ep_rank"] * n:(res["ep_rank"] + 1) * n]


def _step_errors(results: list[dict], step: int) -> tuple[list[str], float]:
    """(where the ranks' loss terms and gradients of ``step`` miss one process's, the largest gradient error).

    Loss terms: within FP32_TOL of the one-process FP32 run. Gradients: against the exact ones (FP64), within FP32_TOL
    plus the one-process FP32 run's own error on that tensor. Both runs are FP32 evaluations of the same exact
    gradient in other orders; where that gradient cancels (the hyper-connection head's ``base``: its FP32 value is
    7e-5 of its largest magnitude off the exact one), FP32_TOL against the other FP32 run would not hold for every
    order, against the exact one it holds for any evaluation as accurate as one process.

    The heads' ``fn``, ``scale`` and ``base`` gradients are sums over the positions of c = dL/dz (z = mix * scale +
    base, their logits; ``_head_terms``) times u (fn), mix (scale) or 1 (base). An evaluation whose c, u and mix are
    within FP32_TOL of their largest magnitude (what this check holds of every tensor) lands within FP32_TOL (max|c|
    sum|u| + max|u| sum|c|) of fn's, FP32_TOL (max|c| sum|mix| + max|mix| sum|c|) of scale's, FP32_TOL max|c| P of
    base's (P positions): where those sums cancel, many times FP32_TOL of the gradient (the MTP head's scale: 490 x
    at the first step, where a PP 2 x EP 2 step's FP32 value lands 1.9e-3 off the exact one against one process's
    7e-4). Their bound is the larger of the two."""
    state, m, d = results[0]["steps"][step]["state"], results[0]["micro_batches"], results[0]["mtp_depth"]
    terms, grads = _oracle_at(state, step, m=m, mtp_depth=d)
    heads: dict[str, float] = {}
    _, exact = _oracle_at(state, step, dtype=torch.float64, m=m, mtp_depth=d, heads=heads)
    failures, worst = [], 0.0
    for rank, res in enumerate(results):
        got = res["steps"][step]
        failures += term_failures(got["terms"], terms, f"step {step} rank {rank}")
        for pname, g in got["grads"].items():
            want, fp32 = (_shard(t[pname], g, res, pname) for t in (exact, grads))
            err, bound = _rel(g, want), max(FP32_TOL + _rel(fp32, want), FP32_TOL * heads.get(pname, 0.0))
            worst = max(worst, err)
            if not err <= bound:
                failures.append(f"step {step} rank {rank} grad {pname}: {err:.2e} > {bound:.2e}")
    held = set().union(*(r["steps"][step]["grads"] for r in results))
    if held != set(grads):
        failures.append(f"step {step}: gradients of {sorted(held ^ set(grads))[:5]} missing or extra")
    return failures, worst


def _table_failures(results: list[dict]) -> list[str]:
    """Hash tables a rank holds that differ from the one-process ones (or from another rank's), and tables no
    rank holds."""
    want = {k: v for k, v in _initial_state(results[0]["mtp_depth"]).items() if k.endswith("tid2eid")}
    failures = [f"rank {rank} {k}" for rank, r in enumerate(results) for k, t in r["tables"].items()
                if not torch.equal(t, want[k])]
    held = set().union(*(r["tables"] for r in results))
    return failures + [f"{k} on no rank" for k in sorted(set(want) - held)]


# ---- tests ---------------------------------------------------------------------------------------
def test_the_model_has_what_ep_must_carry():
    """Hash-routed layers, window-only, CSA and HCA layers, 4 streams, experts split 4 and 4 over 2 ranks."""
    cfg = _cfg()
    assert cfg.hc_mult == 4 and cfg.n_hash_layers == 3 and set(cfg.compress_ratios) == {0, cfg.csa_ratio, 8}
    assert cfg.n_routed_experts % 2 == 0 and cfg.n_activated_experts == 2
    tables = [v for k, v in _initial_state().items() if k.endswith("tid2eid")]
    # the one-process tables send a token's copies to experts on both ranks (4 experts each)
    assert len(tables) == 3 and all(((t < 4).any(1) & (t >= 4).any(1)).any() for t in tables)


@pytest.mark.parametrize("name", ["ep2", "pp2-ep2-1f1b"])
def test_steps_match_single_process(name):
    """Loss terms and every gradient at each step, the weights and buffers after the steps, and every rank's hash
    tables equal to the one-process ones."""
    results = _case_results(name)
    assert not _table_failures(results), _table_failures(results)
    failures = [f for step in range(STEPS) for f in _step_errors(results, step)[0]]
    assert not failures, "\n".join(failures[:20])
    grads = set().union(*(r["steps"][0]["grads"] for r in results))
    assert "hc_head.fn" in grads and any(k.endswith("hc_attn.fn") for k in grads)  # the streams are trained
    assert all(r["steps"][0]["terms"]["aux_loss"] > 0 for r in results)  # the score-routed layer's balance loss

    ref = _trajectory()
    final = results[0]["final"]
    assert set(final) == set(ref["state"])
    check_trajectory(final, ref, name)


@pytest.mark.parametrize("schedule", [pytest.param(s, marks=needs_split_backward if s in SPLIT_SCHEDULES else ())
                                      for s in PP_SCHEDULES if s != "1f1b"])
def test_pp2_ep2_schedules_match_single_process(schedule):
    """PP 2 x EP 2 under the schedules of two stages per rank (interleaved 1F1B; ZBV and DualPipeV, backward split
    into its input and weight parts; DualPipeV's paired chunks overlapped, the trainer's default with EP > 1): one
    step's loss terms and every gradient within the per-step bounds of ``_step_errors``, every rank's hash tables
    the one-process ones."""
    results = _case_results(f"pp2-ep2-{schedule}")
    assert not _table_failures(results), _table_failures(results)
    failures, _ = _step_errors(results, 0)
    assert not failures, "\n".join(failures[:20])
    grads = set().union(*(r["steps"][0]["grads"] for r in results))
    assert "hc_head.fn" in grads and any(k.endswith("hc_attn.fn") for k in grads)
    assert all(r["steps"][0]["terms"]["aux_loss"] > 0 for r in results)
    assert all((r["overlapped"] > 0) == (schedule == "dualpipev") for r in results)  # the chunks' pairs ran


@needs_split_backward
def test_dualpipev_stages_routing_by_token_zero_fail_the_comparison():
    """Under the overlapped DualPipeV, stages past the first routing their hash layers by token id 0: the first
    step's gradients miss one process's by more than 100 x the tolerance (the per-step bounds see the schedule)."""
    failures, worst = _step_errors(_case_results("pp2-ep2-dualpipev-tokens-zero"), 0)
    assert failures and worst > 100 * FP32_TOL, (failures[:5], worst)


def test_fp8_dispatch_matches_single_process_with_the_wire_roundings():
    """EP 2 with FP8 dispatch (BF16 combine): the loss terms and every gradient of the first step against one
    process with the same wire roundings, within ``wire_bound(FLIP_SHARE)`` of the wire's effect on each."""
    results = _case_results("ep2-fp8")
    assert not _table_failures(results), _table_failures(results)
    state = results[0]["steps"][0]["state"]
    terms, grads = _oracle_at(state, 0, fp8=True)
    plain_terms, plain = _oracle_at(state, 0)
    bound = wire_bound(FLIP_SHARE)
    failures, effects = [], []
    for rank, res in enumerate(results):
        got = res["steps"][0]
        for k in ("loss", "main_loss", "aux_loss"):
            effect = abs(terms[k] - plain_terms[k]) / abs(plain_terms[k])
            err = abs(got["terms"][k] - terms[k]) / abs(terms[k])
            if not err <= bound(effect):
                failures.append(f"rank {rank} {k}: {err:.2e} > {bound(effect):.2e}")
        for pname, g in got["grads"].items():
            want, base = (_shard(t[pname], g, res, pname) for t in (grads, plain))
            effects.append(_nrel(want, base))
            if not _nrel(g, want) <= bound(effects[-1]):
                failures.append(f"rank {rank} grad {pname}: {_nrel(g, want):.2e} > {bound(effects[-1]):.2e}")
    assert not failures, "\n".join(failures[:20])
    assert max(effects) > 10 * FP32_TOL  # the wire roundings are there: the comparison is not the FP32 one


def test_a_rank_with_zero_hash_tables_fails_the_comparison():
    """Rank 1's tid2eid zeroed (its hash layers send every token's copies to expert 0): the table check names its
    three tables, and the first step's gradients miss one process's by more than 100 x the tolerance."""
    results = _case_results("ep2-tid2eid-zero")
    assert sorted(_table_failures(results)) == [f"rank 1 layers.{i}.ffn.gate.tid2eid" for i in range(3)]
    failures, worst = _step_errors(results, 0)
    assert failures and worst > 100 * FP32_TOL, (failures[:5], worst)


# ---- flyer train --ep 2 under torchrun ------------------------------------------------------------
def _args(out: Path, cache: str, *extra: str) -> list[str]:
    return ["--preset", "tiny-v4", "--vocab-size", "512", "--batch-size", "2", "--seq-len", "32", "--steps",
            str(CLI_STEPS), "--lr", str(CLI_LR), "--warmup", "0", "--schedule", "constant", "--precision", "fp32",
            "--eval-every", str(CLI_STEPS), "--eval-batches", "1", "--ckpt-every", "100", "--threads", "1",
            "--no-progress", "--no-plots", "--data-cache", cache, "--out", str(out), "--device", "cpu", *extra]


def test_flyer_train_ep2_equals_one_process(tmp_path, data_cache, monkeypatch):
    """``flyer train --preset tiny-v4 --ep 2`` on 2 ranks (DP 2, rank r drawing the sample stream (seed, r)) against
    one process with --grad-accum 2 drawing micro-batch r of each step from stream r (``TwoStreams``, as
    tests/test_train_ep_longcat.py): the same rows, shares of the loss and one-process initialisation. The bound is
    tests/test_train_pp.py's: the same weights at step 1 (only the summation order differs), then at most
    2 k lr (1 + wd max|w|) apart per element after k steps, which moves a loss by at most sqrt(N) ||grad|| times
    that (||grad||: twice the largest logged grad_norm; max|w| < 1). The preset has its MTP module (V4's, a
    score-routed MoE block dispatched as the main layers'): its loss is compared with the others."""
    assert preset("tiny-v4", vocab_size=512).mtp_depth == 1
    err = _run(_torchrun(2, "--standalone") + _args(tmp_path / "ep", data_cache, "--ep", "2",
                                                    "--collective-timeout", "120")).stderr
    assert "layout: 2 ranks on 1 node(s) of 2: PP 1 x DP 2, EP 2" in err, err[-3000:]
    one_process(monkeypatch, _args(tmp_path / "one", data_cache, "--grad-accum", "2"))
    ep, one = (_records(tmp_path / d) for d in ("ep", "one"))
    assert sorted(ep) == sorted(one) == list(range(1, CLI_STEPS + 1))
    assert ep[1]["inter_node_bytes"] + ep[1]["intra_node_bytes"] > 0  # the experts' tokens travelled
    # the same weights at step 1: the gradient norm too (a rank routing its hash layers otherwise would move it)
    assert abs(ep[1]["grad_norm"] - one[1]["grad_norm"]) <= FP32_TOL * one[1]["grad_norm"]
    n = param_counts(preset("tiny-v4", vocab_size=512)).total
    grad = 2 * max(r["grad_norm"] for x in (ep, one) for r in x.values())
    for step in one:
        drift = math.sqrt(n) * grad * 2 * (step - 1) * CLI_LR * (1 + CLI_WD)
        assert ep[step]["mtp_loss"] > 0 and one[step]["mtp_loss"] > 0
        for key in ("loss", "main_loss", "mtp_loss", "aux_loss") + (("val_loss",) if "val_loss" in one[step] else ()):
            bound = FP32_TOL * abs(one[step][key]) + drift
            assert abs(ep[step][key] - one[step][key]) <= bound, (step, key, ep[step][key], one[step][key], bound)
    assert "val_loss" in ep[CLI_STEPS] and "val_loss" in one[CLI_STEPS]
