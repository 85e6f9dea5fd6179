"""DeepSeek-V4's MTP module under expert parallelism against one process: ``tests/test_ep_v4.py``'s model, harness
and tolerances with ``mtp_depth`` 1, on EP 2 (FP32 wire, the trainer's hierarchical dispatcher, STEPS steps) and
PP 2 x EP 2 (1F1B over the steps; DualPipeV with its chunks overlapped, as the trainer runs it with EP > 1, one step).

What the MTP module adds to an EP step: its block's MoE (window-only attention, routed by score with a bias: the
block is layer n_layers, past every hash layer, as in DeepSeek's V4 ``MTPBlock``; ``ModelConfig`` keeps
n_hash_layers <= n_layers, so no MTP block routes by token id) dispatches its tokens over the EP ranks as the main
layers' do, each rank holding half its experts (checked on the ranks); its loss joins the step's as
``mtp_loss_weight`` times the mean over depths (under pipelining on the last stage, a micro-batch's share of the
step), its balance loss beside the main layers'; its tokens (T - 1 per sequence) count in its router's load, summed
over the replicas before the bias update. The comparison is test_ep_v4's: per step the loss terms (``mtp_loss``
among them) and every gradient against one process at the same weights (the hyper-connection heads' ``fn``,
``scale`` and ``base``, whose gradients cancel, the MTP head's most, within the bound their sums' conditioning
gives: ``test_ep_v4._step_errors``), after the steps every parameter within ``adamw_bound`` and every buffer (the
MTP router's bias among them, which moves) within FP32_TOL of the one-process trajectory.

That the comparison is tight (mutation checks, each failing here): the MTP block built without the EP dispatcher
(its expert stacks then disagree with the EP ranks'), its loss escaping the pipeline's 1/M share, its balance loss
dropped, its counts left out of the bias update or not summed over the replicas.
"""

from __future__ import annotations

import functools

import pytest
import torch

from flyer.model.moe import MoE
from flyer.model.mtp import HyperMTPModule
from flyer.model.transformer import Transformer
from flyer.parallel.stages import min_micro_batches
from ranks import needs_split_backward, run_ranks
from test_ep_v4 import _cfg, _step_errors, _table_failures, _trajectory, _worker
from test_pipeline import STEPS, check_trajectory

MTP = 1
# test_ep_v4's case tuples: (world, pp, ep, dispatcher, fp8 dispatch, steps, mutant, schedule, micro-batches)
CASES = {
    "ep2": (2, 1, 2, "hierarchical", False, STEPS, None, None, 2),
    "pp2-ep2-1f1b": (4, 2, 2, "hierarchical", False, STEPS, None, "1f1b", 2),
    "pp2-ep2-dualpipev": (4, 2, 2, "hierarchical", False, 1, None, "dualpipev", min_micro_batches("dualpipev", 2)),
}


def _mtp_moe(model: torch.nn.Module) -> dict:
    """The MTP blocks' MoE layers this rank holds: dispatcher class, local experts, hash-routed."""
    return {"mtp_moe": {n: (type(m.dispatcher).__name__, m.experts.w1.shape[0], m.hash_routed)
                        for n, m in model.named_modules() if isinstance(m, MoE) and "mtp." in n}}


@functools.cache
def _results(world: int) -> list[dict]:
    return run_ranks(_worker, world, CASES, MTP, _mtp_moe)


def _results_of(name: str) -> list[dict]:
    return [r[name] for r in _results(CASES[name][0])]


# ---- tests ---------------------------------------------------------------------------------------
def test_the_mtp_block_is_a_score_routed_moe():
    """What the comparison exercises: one MTP module (V4's, reading the streams) whose block is an MoE layer routed
    by score, with a bias, over 8 experts (4 on each EP rank)."""
    cfg = _cfg(MTP)
    with torch.device("meta"):
        mtp = Transformer(cfg).mtp
    assert len(mtp) == 1 and isinstance(mtp[0], HyperMTPModule) and isinstance(mtp[0].block.ffn, MoE)
    ffn = mtp[0].block.ffn
    assert not ffn.hash_routed and ffn.gate.bias is not None and ffn.experts.w1.shape[0] == 8


@pytest.mark.parametrize("name", ["ep2", "pp2-ep2-1f1b"])
def test_steps_with_mtp_match_single_process(name):
    """Loss terms (``mtp_loss`` and the balance loss among them) and every gradient at each step, the weights and
    buffers (the MTP router's bias) after the steps; the MTP block's experts split over the EP ranks."""
    results = _results_of(name)
    assert not _table_failures(results), _table_failures(results)
    failures = [f for step in range(STEPS) for f in _step_errors(results, step)[0]]
    assert not failures, "\n".join(failures[:20])
    _check_mtp_moe(results)
    assert all(r["steps"][0]["terms"]["mtp_loss"] > 0 for r in results)
    ref = _trajectory(MTP)
    final = results[0]["final"]
    assert set(final) == set(ref["state"])
    check_trajectory(final, ref, name)
    # the MTP router's bias moved (by its load, summed over the replicas): within FP32_TOL of one process's above
    assert ref["state"]["mtp.0.block.ffn.gate.bias"].abs().max() > 0


@needs_split_backward
def test_pp2_ep2_dualpipev_with_mtp_matches_single_process():
    """PP 2 x EP 2 under DualPipeV, its paired chunks overlapped (the trainer's default with EP > 1; the MTP module
    on the last stage, rank 0's second chunk): one step's loss terms and every gradient within the per-step bounds."""
    results = _results_of("pp2-ep2-dualpipev")
    assert not _table_failures(results), _table_failures(results)
    failures, _ = _step_errors(results, 0)
    assert not failures, "\n".join(failures[:20])
    _check_mtp_moe(results)
    assert all(r["overlapped"] > 0 for r in results)


def _check_mtp_moe(results: list[dict]) -> None:
    """The MTP block's MoE on the ranks holding it: dispatched over the EP ranks (4 of its 8 experts each), routed
    by score; on some rank of each EP pair."""
    held = [r["mtp_moe"] for r in results if r["mtp_moe"]]
    assert held and all(moe == {"mtp.0.block.ffn": ("HierarchicalDispatcher", 4, False)} for moe in held), held
    assert {r["ep_rank"] for r in results if r["mtp_moe"]} == {0, 1}
