"""Packed chat rows under pipeline parallelism on a dense GQA model (``flyer train --pack --pp 2`` on a tiny
Qwen2-style config: grouped-query attention with q/k/v biases, SwiGLU MLPs only, the head tied to the embedding, no
MTP): a PP2 step under 1F1B (loop placement: the last stage's mirror of the embedding is the tied head) and DualPipeV
(V placement: the first and last stage on rank 0) on ``tests.test_sft_pack_pp``'s 4 packed micro-batches (6, 2, 4 and
3 conversations) gives the loss, gradients (the embedding's: both copies, summed), tokens, FLOPs and validation loss
of one process with --pack and grad_accum M on them (``test_sft_pack_pp.one_process``).

Tolerance: that reference's ``reorder_bound`` (the same terms summed in another order), as test_sft_pack_pp. Every
block rotates at its document's positions from 0 (``RopeWatch``: the losses cannot show it, see
test_sft_pack_pp_overlap). Mutants, run through the same ranks: the document ids dropped after the first stage
move the gradients far outside the tolerance (asserted: over 30x); stage 1 at row positions fails ``RopeWatch``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flyer.parallel import pipeline
from tests import test_sft_pack_pp
from tests.ranks import needs_split_backward, run_ranks
from tests.test_sft_pack_pp_overlap import MUTANTS as OVERLAP_MUTANTS
from tests.test_sft_pack_pp_overlap import RopeWatch, mutant_steps
from tests.test_sft_pp import _state, _worst

chats = test_sft_pack_pp.chats  # the same fixture (module-scoped)
M = test_sft_pack_pp.M
QWEN2 = """[model]
attn = "gqa"
n_kv_heads = 2
head_dim = 32
attn_bias = true
tie_embeddings = true
n_dense_layers = 4
mtp_depth = 0
rope_theta = 1e6
"""
MUTANTS = {"later_stages": [(pipeline.Stage, "forward", test_sft_pack_pp._later_stages_without_documents)],
           "row_rope": OVERLAP_MUTANTS["row_rope"]}


def _trainer(chats: str, root: Path, rank: int, **kw):
    """``test_sft_pack_pp``'s trainer on the Qwen2-style model (QWEN2 over ``tiny``: 4 dense layers)."""
    config = Path(chats).parent / f"qwen2-rank{rank}.toml"  # each rank its own: a rank rewriting a shared one raced
    config.write_text(QWEN2)  # another reading it (truncated: tiny's defaults)
    return test_sft_pack_pp._trainer(chats, root, rank, config=str(config), **kw)


@pytest.fixture(scope="module")
def reference(chats):
    """``test_sft_pack_pp.one_process`` on the Qwen2-style model."""
    return test_sft_pack_pp.one_process(_trainer(str(chats), chats.parent / "one-gqa", 0, grad_accum=M))


def _rank(rank: int, chats: str, schedule: str) -> dict:
    """Rank ``rank`` of PP2 (``schedule``): one ``_pipeline_step`` on the packed micro-batches, the validation loss,
    then the step under each mutant."""
    t = _trainer(chats, Path(chats).parent / f"pp-gqa-{schedule}", rank, pp=2, pp_schedule=schedule, micro_batches=M)
    assert t.cfg.attn == "gqa" and t.cfg.tie_embeddings and not t.cfg.mtp_depth
    t.sampler.next_batch = iter(test_sft_pack_pp._batches(t) * (1 + len(MUTANTS))).__next__
    watch = RopeWatch(t.model, t.cfg)
    out = {"step": _state(t, t._pipeline_step()), "val": t.evaluate(), "rope": watch.pop()}
    out.update(mutant_steps(t, MUTANTS, watch))
    t.close()
    t.mesh.destroy()
    return out


@pytest.mark.parametrize("schedule", ["1f1b", pytest.param("dualpipev", marks=needs_split_backward)])
def test_pp_packed_gqa_step_equals_one_process(chats, reference, schedule):
    """Loss terms, gradients, tokens, FLOPs and validation loss of PP2 with --pack on the dense GQA model equal one
    process's; every block rotates at its document's positions. The documents dropped after the first stage move the
    gradients over 30x the tolerance; stage 1 at row positions fails the positions' check."""
    ranks = run_ranks(_rank, 2, str(chats), schedule)
    ref, c = reference["step"], reference["c"]
    assert set(ranks[0]["step"]["grads"]) | set(ranks[1]["step"]["grads"]) == set(ref["grads"])
    assert any(n.endswith("attn.wq.bias") for n in ref["grads"]) and "head.weight" not in ref["grads"]  # Qwen2's
    for r in ranks:
        sums = r["step"]["terms"]
        for k in ("loss", "main_loss", "mtp_loss", "aux_loss"):  # no MTP, no balance loss: 0 on both sides
            assert abs(sums[k] - ref["terms"][k]) <= c * ref["terms"][k], k
        assert sums["tokens"] == ref["terms"]["tokens"] == reference["tokens"]
        assert sums["flops"] == pytest.approx(reference["flops"], rel=1e-12)
        assert abs(r["val"] - reference["val"]) <= c * reference["val"]
        assert _worst(r["step"]["grads"], ref["grads"], reference["rows"]) <= c
        assert r["rope"] == 0.0
    later = {n: g for r in ranks for n, g in r["later_stages"]["grads"].items()}
    assert _worst(later, ref["grads"], reference["rows"]) > 30 * c
    assert max(r["row_rope"]["rope"] for r in ranks) > 0.1
