"""Packed chat rows under DualPipeV with its overlap on (``flyer train --pack --pp 2 --ep 2 --pp-schedule dualpipev``):
PP 2 x EP 2 on 4 gloo ranks, the paired forward and backward chunks running concurrently (``flyer.parallel.overlap``,
asserted to have run), against one process with --pack and grad_accum M (``tests.test_sft_pack_pp``'s ``reference``).
Each data-parallel replica runs that fixture's 4 packed micro-batches (6, 2, 4 and 3 conversations), replica 1
rotated by one, so the two replicas' tokens meeting in the EP all-to-all at a schedule slot are different documents and
the job's step is the reference's: loss terms, gradients (an EP rank's expert stacks: its slice), every MoE layer's
loads (each replica counts its own tokens, all four micro-batches), tokens, FLOPs and validation loss.

Tolerance: the reference's ``reorder_bound`` (the same terms summed in another order; EP combines each token's K
experts in another order too, a sum of K <= dim terms, inside the bound's per-layer dim), as test_sft_pack_pp.

RoPE restarting at 0 per document cannot show in the losses: within a document only relative positions reach the
scores (row positions change them by rounding alone). So every block's (cos, sin) is checked as given
(``RopeWatch``: the tables at each document's positions from 0, exactly), on every stage and the MTP module's.

Mutants, run through the same ranks: the overlapped forward chunks without their document ids, or with the document
ids of the backward chunk they are paired with, move the gradients 55-107x the tolerance (asserted: over 30x) and
change the loads; stage 1 rotating at row positions fails ``RopeWatch`` (its gradients move by rounding alone,
1e-4 of the tolerance). The overlapped step's gradients differ by 1e-4 of the tolerance, its loss terms by 2e-4.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from flyer.model.documents import Documents, document_positions
from flyer.model.transformer import Block, layer_rope_tables
from flyer.parallel import overlap, pipeline
from tests import test_sft_pack_pp
from tests.ranks import needs_split_backward, run_ranks
from tests.test_sft_pp import _state, _worst

chats, reference = test_sft_pack_pp.chats, test_sft_pack_pp.reference  # the same fixtures (module-scoped)
M, PP, EP = test_sft_pack_pp.M, 2, 2


class RopeWatch:
    """Forward pre-hooks on every ``Block`` of ``model`` (main layers and MTP modules') that record how far the cos
    table a block is given lies from its layer's table at each real position's offset in its document
    (``document_positions``), exactly: the same rows of the same table. ``pop()``: the largest such distance since the
    last call (inf: a block got no documents)."""

    def __init__(self, model: torch.nn.Module, cfg):
        self.cfg, self.worst, self.calls = cfg, 0.0, 0
        self._lock = threading.Lock()  # the overlapped forward runs in a worker thread
        for m in model.modules():
            if isinstance(m, Block):
                m.register_forward_pre_hook(self._check, with_kwargs=True)

    def _check(self, block: Block, args: tuple, kwargs: dict) -> None:
        cos, docs = args[1], kwargs.get("docs")
        err = float("inf")
        if docs is not None:
            ids = docs.ids
            table = layer_rope_tables(self.cfg, [block.layer_id], ids.shape[1], ids.device)[0][0]
            want = table[document_positions(ids)]  # (B, T, 1, d)
            real = ids >= 0  # padding's positions reach nothing
            err = float((cos.expand_as(want) - want)[real].abs().max())
        with self._lock:
            self.worst, self.calls = max(self.worst, err), self.calls + 1

    def pop(self, ran: bool = True) -> float:
        assert self.calls or not ran, "no block ran"
        out, self.worst, self.calls = self.worst, 0.0, 0
        return out


# ---- mutants -------------------------------------------------------------------------------------
_CALL = overlap.OverlapFB.__call__
_FORWARD = pipeline.Stage.forward
_TABLES = Documents.layer_tables


def _overlapped_forward_with(self, action, ctx, documents):
    """Run the overlapped pair with the forward chunk's keyword arguments changed by ``documents(kw, ctx, bwd_mb)``
    (restored after: the micro-batch's other forwards keep theirs)."""
    fwd, bwd = action.sub_actions
    kw = ctx.kwarg_mbs[fwd.microbatch_index]
    ctx.kwarg_mbs[fwd.microbatch_index] = documents(kw, ctx, bwd.microbatch_index)
    try:
        _CALL(self, action, ctx)
    finally:
        ctx.kwarg_mbs[fwd.microbatch_index] = kw


def _dropped(self, action, ctx):
    """Mutant ``OverlapFB.__call__``: the forward chunk without its document ids."""
    _overlapped_forward_with(self, action, ctx, lambda kw, c, b: {k: v for k, v in kw.items() if k != "documents_BT"})


def _swapped(self, action, ctx):
    """Mutant ``OverlapFB.__call__``: the forward chunk with the paired backward chunk's document ids."""
    _overlapped_forward_with(self, action, ctx, lambda kw, c, b: {**kw, "documents_BT": c.kwarg_mbs[b]["documents_BT"]})


_ROW_POSITIONS = threading.local()  # set while stage 1's forward runs (in whichever thread)


def _stage1_flagged(self, x, tokens_BT=None, documents_BT=None):
    _ROW_POSITIONS.on = self.index == 1
    try:
        return _FORWARD(self, x, tokens_BT, documents_BT)
    finally:
        _ROW_POSITIONS.on = False


def _row_tables(self, tables, T):
    """Mutant ``Documents.layer_tables`` on stage 1: the tables at row positions 0..T-1, not restarting per document."""
    if getattr(_ROW_POSITIONS, "on", False):
        return [(cos[:T], sin[:T]) for cos, sin in tables]
    return _TABLES(self, tables, T)


# name -> [(object, attribute, replacement)]
MUTANTS = {"dropped": [(overlap.OverlapFB, "__call__", _dropped)],
           "swapped": [(overlap.OverlapFB, "__call__", _swapped)],
           "row_rope": [(pipeline.Stage, "forward", _stage1_flagged), (Documents, "layer_tables", _row_tables)]}


# ---- ranks ---------------------------------------------------------------------------------------
def mutant_steps(t, mutants: dict, watch: RopeWatch) -> dict:
    """Per mutant name: the pipeline step's state (``test_sft_pp._state``) and RoPE reading with its patches
    ``(object, attribute, replacement)`` applied."""
    out = {}
    for name, patches in mutants.items():
        with pytest.MonkeyPatch.context() as mp:
            for obj, attr, fn in patches:
                mp.setattr(obj, attr, fn)
            out[name] = _state(t, t._pipeline_step())
        out[name]["rope"] = watch.pop()
    return out


def _overlap_counters(t) -> tuple[int, int]:
    """(overlapped actions run, most chunks computing at once) of the schedule's ``OverlapFB``."""
    fb = [f for f in t.pipeline.schedule._comp_type_to_function_map.values() if isinstance(f, overlap.OverlapFB)]
    return sum(f.runs for f in fb), max([f.max_concurrent for f in fb], default=0)


def _rank(rank: int, chats: str) -> dict:
    """Rank ``rank`` of PP 2 x EP 2 (DualPipeV, overlap on by default): one ``_pipeline_step`` on the reference's
    packed micro-batches (rotated by the replica), the validation loss, then the step under each mutant."""
    t = test_sft_pack_pp._trainer(chats, Path(chats).parent / "pp-ep-overlap", rank, pp=PP, ep=EP,
                                  pp_schedule="dualpipev", micro_batches=M)
    assert t.pipeline.overlap and t.mesh.dp == EP
    batches = test_sft_pack_pp._batches(t)
    r = t.mesh.dp_rank
    t.sampler.next_batch = iter((batches[r:] + batches[:r]) * (5 + len(MUTANTS))).__next__  # every step: the same M
    watch = RopeWatch(t.model, t.cfg)
    out = {"step": _state(t, t._pipeline_step()), "val": t.evaluate()}
    out["rope"] = watch.pop()
    # evidence of overlap: the chunks computing at the same moment, which a loaded host (4 ranks on 2 cores) can miss
    # in one step's few overlapped actions; a few more steps (as tests/test_pipeline_overlap.py), gradients taken
    for _ in range(3):
        lowest = torch.tensor([_overlap_counters(t)[1]])
        dist.all_reduce(lowest, op=dist.ReduceOp.MIN)  # every rank steps again, or none: the stages talk
        if int(lowest) == 2:
            break
        _state(t, t._pipeline_step())
    out["overlapped"], out["concurrent"] = _overlap_counters(t)
    watch.pop(ran=False)
    out.update(mutant_steps(t, MUTANTS, watch))
    out["ep_rank"] = t.mesh.ep_rank
    t.close()
    t.mesh.destroy()
    return out


def _share(full: dict, got: dict, ep_rank: int) -> dict:
    """``full``'s entries for the names in ``got``, an expert stack sliced to EP rank ``ep_rank``'s experts."""
    out = {}
    for n, g in got.items():
        w = full[n]
        out[n] = w if w.shape == g.shape else w[ep_rank * g.shape[0]:(ep_rank + 1) * g.shape[0]]
    return out


@needs_split_backward
def test_overlapped_packed_step_equals_one_process(chats, reference):
    """PP 2 x EP 2 DualPipeV with its overlap on, packed rows: the loss terms, gradients, loads, tokens, FLOPs and
    validation loss of one process with --pack (``reference``); every block rotates at its document's positions.
    The overlapped forward chunks without their documents, or with their paired backward chunk's, move the gradients
    over 30x the tolerance; stage 1 at row positions fails the positions' check."""
    ranks = run_ranks(_rank, PP * EP, str(chats))
    ref, c = reference["step"], reference["c"]
    for i, r in enumerate(ranks):
        assert r["overlapped"] > 0 and r["concurrent"] == 2, (i, r["overlapped"], r["concurrent"])
    assert {n for r in ranks for n in r["step"]["grads"]} == set(ref["grads"])
    assert {n for r in ranks for n in r["step"]["counts"]} == set(ref["counts"])  # none missed
    for r in ranks:
        sums = r["step"]["terms"]
        for k in ("loss", "main_loss", "mtp_loss", "aux_loss"):
            assert abs(sums[k] - ref["terms"][k]) <= c * ref["terms"][k], k
        assert sums["tokens"] == EP * ref["terms"]["tokens"] == EP * reference["tokens"]  # the job's: both replicas'
        assert sums["flops"] == pytest.approx(EP * reference["flops"], rel=1e-12)
        assert abs(r["val"] - reference["val"]) <= c * reference["val"]
        got = r["step"]["grads"]
        rows = [_share(row, got, r["ep_rank"]) for row in reference["rows"]]
        assert _worst(got, _share(ref["grads"], got, r["ep_rank"]), rows) <= c
        assert all(torch.equal(v, ref["counts"][n]) for n, v in r["step"]["counts"].items())
        assert r["rope"] == 0.0
    for name in ("dropped", "swapped"):
        worst = max(_worst(r[name]["grads"], _share(ref["grads"], r[name]["grads"], r["ep_rank"]),
                           [_share(row, r[name]["grads"], r["ep_rank"]) for row in reference["rows"]])
                    for r in ranks)
        assert worst > 30 * c, (name, worst / c)
        assert any(not torch.equal(v, ref["counts"][n]) for r in ranks for n, v in r[name]["counts"].items()), name
    assert max(r["row_rope"]["rope"] for r in ranks) > 0.1
