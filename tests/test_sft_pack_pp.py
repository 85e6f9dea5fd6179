"""Packed chat rows under pipeline parallelism (``flyer train --data chats.jsonl --pack --pp 2``): every stage gets
each micro-batch's document ids (``documents_BT``, as the token ids travel), so a PP2 step (1F1B, DualPipeV;
interleaved 1F1B and ZBV marked slow) on packed micro-batches of 6, 2, 4 and 3 conversations gives the loss terms
(next-token, MTP, and the balance loss: per document, each micro-batch's weighted by its share of the step's
documents), gradients, routing loads, tokens, FLOPs and validation loss of one process with ``--pack`` and
grad_accum = micro-batches on the same rows.

Tolerance: ``tests.test_sft.reorder_bound`` for the step's M x B rows (the same terms summed in another order: per
entry the layers' dot products and attention's sums over at most T keys, then the loss's means, n u each), relative
to the loss, and for a gradient to the sum of the packed rows' own gradient norms; the loads exactly. Mutants, run
through the same pipeline: the document ids dropped on every stage after the first (its blocks and MTP module
attend across conversations, at row positions) or on the MTP path alone (the last stage's loss: its module attends
across conversations, its targets cross them) move the gradients about 105-110x the tolerance (asserted: over 30x;
at initialisation attention is near uniform, so attending across conversations moves them less than it will later).
The PP2 steps are within 2e-5 of the tolerance.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flyer.data.chat_pack import document_lengths, packed_rows
from flyer.parallel import pipeline
from flyer.train.metrics import model_flops_per_token
from flyer.train.trainer import Trainer
from tests.ranks import needs_split_backward, run_ranks
from tests.test_sft import reorder_bound, row_grads
from tests.test_sft_pp import _state, _worst, write_chats
from tests.test_sft_pp import _trainer as sft_pp_trainer

T = 512  # up to three of CHATS' conversations (53 to 85 tokens; 265 with tools in the default template) per row
B, M = 2, 4  # rows per micro-batch; micro-batches (DualPipeV on 2 ranks runs 4 at least)


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    return write_chats(tmp_path_factory.mktemp("sft-pack-pp"))


def _trainer(chats: str, root: Path, rank: int, **kw) -> Trainer:
    """``test_sft_pp``'s trainer (the ``tiny`` preset: MLA; MoE layers 1-3, an MTP module, balance loss) on CHATS
    packed (``--pack``) into rows of T (unless ``kw`` sets seq_len)."""
    return sft_pp_trainer(chats, root, rank, **{"seq_len": T, "batch_size": B, "eval_batches": 1, "pack": True, **kw})


# each micro-batch's rows: 6, 2, 4 and 3 conversations (the balance loss weighs each micro-batch's mean by its share)
ROWS = [[[0, 15, 20], [35, 3, 9]], [[1], [2]], [[4, 5], [6, 7]], [[8], [10, 11]]]


def _batches(t: Trainer, rows_of: list = ROWS) -> list[tuple[torch.Tensor, ...]]:
    """The packed micro-batches of a step (``rows_of``, by default ``ROWS``: M), each conversation's first position
    also trained (its target the conversation's second token: the MTP target of the previous one's last position,
    were it not ``depth_targets``'s to drop; CHATS trains no second token)."""
    out = []
    for rows in rows_of:
        x, y, d = packed_rows(t.data.train, rows, T)
        starts = (d >= 0) & torch.cat([torch.ones_like(d[:, :1], dtype=torch.bool), d[:, 1:] != d[:, :-1]], 1)
        y[:, :-1][starts[:, :-1]] = x[:, 1:][starts[:, :-1]]
        out.append((x, y, d))
    return out


_FORWARD = pipeline.Stage.forward  # the schedules call it through the module: a patched one runs


def _later_stages_without_documents(self, x, tokens_BT=None, documents_BT=None):
    """Mutant ``Stage.forward``: the document ids dropped on every stage but the first."""
    return _FORWARD(self, x, tokens_BT, documents_BT if self.first else None)


def _mtp_without_documents(self, x, tokens_BT=None, documents_BT=None):
    """Mutant ``Stage.forward``: the last stage's loss (its MTP modules, their targets and loads) without the
    micro-batch's documents (``loss`` itself is bound into the schedule when it is built: not patchable)."""
    h = _FORWARD(self, x, tokens_BT, documents_BT)
    if self.last:
        tokens, valid, _, weight = self.pending.pop()
        self.pending.append((tokens, valid, None, weight))
    return h


MUTANTS = {"later_stages": _later_stages_without_documents, "mtp": _mtp_without_documents}


def _pp_rank(rank: int, chats: str, schedule: str, mutants: bool) -> dict:
    """Rank ``rank`` of PP2 (``schedule``, M micro-batches): one ``_pipeline_step`` on ``_batches``, the validation
    loss, then (``mutants``) the step again under each mutant."""
    t = _trainer(chats, Path(chats).parent / f"pp-{schedule}", rank, pp=2, pp_schedule=schedule, micro_batches=M)
    t.sampler.next_batch = iter(_batches(t) * 3).__next__
    out = {"step": _state(t, t._pipeline_step()), "val": t.evaluate()}
    for name, mutant in MUTANTS.items() if mutants else ():
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(pipeline.Stage, "forward", mutant)
            out[name] = _state(t, t._pipeline_step())
    t.close()
    t.mesh.destroy()
    return out


@pytest.fixture(scope="module")
def reference(chats):
    """``one_process`` of ``tiny`` (MLA, MoE, MTP)."""
    return one_process(_trainer(str(chats), chats.parent / "one", 0, grad_accum=M))


def one_process(t: Trainer) -> dict:
    """One process (``t``: --pack, grad_accum M) on ``_batches``: the step's state, the validation loss, each packed
    row's own gradients (the scale of the terms an entry sums) and the tolerance factor c; ``t`` closed."""
    batches = _batches(t)
    assert all(bool((d < 0).any()) for _, _, d in batches)  # padded
    assert [len(document_lengths(d)) for _, _, d in batches] == [6, 2, 4, 3]
    t.sampler.next_batch = iter(batches).__next__
    out = {"step": _state(t, t._local_step()), "val": t.evaluate()}
    out["rows"] = [g for batch in batches for g in row_grads(t.model, *batch)]
    lengths = [n for _, _, d in batches for n in document_lengths(d)]
    out["tokens"], out["flops"] = sum(lengths), sum(n * model_flops_per_token(t.cfg, n) for n in lengths)
    out["c"] = reorder_bound(t.cfg, M * B, T)
    t.close()
    return out


@pytest.mark.parametrize("schedule", [
    "1f1b", pytest.param("dualpipev", marks=needs_split_backward),
    pytest.param("interleaved", marks=pytest.mark.slow),  # two stages per rank, loop placement
    pytest.param("zb", marks=[pytest.mark.slow, needs_split_backward]),
])
def test_pp_packed_step_equals_grad_accum(chats, reference, schedule):
    """Loss terms, gradients (the embedding's: both copies, summed), every MoE layer's loads (both stages, the MTP
    module's), tokens, FLOPs and validation loss of PP2 with --pack equal one process with --pack and grad_accum M on
    the same packed micro-batches. Dropping the document ids after the first stage, or on the MTP path alone, moves
    the gradients over 30x the tolerance; the latter changes the MTP module's loads (1F1B and DualPipeV)."""
    mutants = schedule in ("1f1b", "dualpipev")  # loop and V placement; the slow ones check the step alone
    ranks = run_ranks(_pp_rank, 2, str(chats), schedule, mutants)
    ref, c = reference["step"], reference["c"]
    assert set(ranks[0]["step"]["grads"]) | set(ranks[1]["step"]["grads"]) == set(ref["grads"])
    assert {n for r in ranks for n in r["step"]["counts"]} == set(ref["counts"])  # none missed
    for r in ranks:
        sums = r["step"]["terms"]
        for k in ("loss", "main_loss", "mtp_loss", "aux_loss"):  # every term, summed over the stages
            assert abs(sums[k] - ref["terms"][k]) <= c * ref["terms"][k], k
        assert sums["tokens"] == ref["terms"]["tokens"] == reference["tokens"]
        assert sums["flops"] == pytest.approx(reference["flops"], rel=1e-12)
        assert ref["terms"]["flops"] == pytest.approx(reference["flops"], rel=1e-12)
        assert abs(r["val"] - reference["val"]) <= c * reference["val"]
        assert _worst(r["step"]["grads"], ref["grads"], reference["rows"]) <= c
        assert all(torch.equal(v, ref["counts"][n]) for n, v in r["step"]["counts"].items())
    if not mutants:
        return
    # the mutants' gradients from both ranks (the later stages and the MTP module sit on rank 1 under 1F1B, on both
    # ranks or rank 0 under V placement)
    later = {n: g for r in ranks for n, g in r["later_stages"]["grads"].items()}
    assert _worst(later, ref["grads"], reference["rows"]) > 30 * c
    mtp = {n: g for r in ranks for n, g in r["mtp"]["grads"].items() if n.startswith("mtp.")}
    assert mtp and _worst(mtp, ref["grads"], reference["rows"]) > 30 * c
    mtp_loads = [(n, v) for r in ranks for n, v in r["mtp"]["counts"].items() if n.startswith("mtp.")]
    assert mtp_loads and all(not torch.equal(v, ref["counts"][n]) for n, v in mtp_loads)
