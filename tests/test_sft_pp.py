"""Supervised fine-tuning on chat data under pipeline parallelism (``flyer train --data chats.jsonl --pp 2``):
a PP2 step (1F1B, DualPipeV) on padded chat micro-batches of unequal assistant-token counts gives the loss,
gradients and validation loss of one process with grad_accum = micro-batches on the same batches, and its MoE
layers on both stages (the MTP module's too) count no padding in the bias update's loads.

Tolerance: as ``tests/test_sft.py::test_grad_accum_is_token_weighted`` derives it (the same terms summed in
another order: per entry, the layers' dot products and the loss's means, n u each, over the sum of the rows'
own gradient norms). Mutants, run through the same pipeline: each micro-batch's mean weighted 1/M (the text
path) is far outside it; counting the padding changes the loads.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from flyer.data.chat_data import IGNORE_INDEX
from flyer.data.chat_sampler import chat_rows
from flyer.model.moe import MoE, moe_layers
from flyer.parallel import pipeline
from flyer.train.config import TrainConfig
from flyer.train.trainer import Trainer
from tests.bounds import FP32_U
from tests.ranks import needs_split_backward, run_ranks
from tests.test_sft import CHATS, row_grads

T = 64
# 4 micro-batches of 2 conversations (DualPipeV on 2 ranks runs 4 at least), every one with padding
ROWS = [[0, 2], [3, 6], [9, 4], [15, 7]]  # 9, 28, 26 and 21 assistant targets; 0, 3, 9, 15 padded


def write_chats(path: Path) -> Path:
    """chats.jsonl of ``tests/test_sft.py``'s CHATS in ``path``, beside a tiny V3 directory's tokenizer.json."""
    from tests.hf_models import build  # transformers: imported here, not by the ranks that import this module

    build("v3", path / "v3")
    (path / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    return path / "chats.jsonl"


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    return write_chats(tmp_path_factory.mktemp("sft-pp"))


def _trainer(chats: str, root: Path, rank: int, **kw) -> Trainer:
    """The ``tiny`` preset (MoE layers 1-3, an MTP module, balance loss) on CHATS with the V3 directory's tokenizer
    and flyer's default chat template; ``kw``: TrainConfig fields over these."""
    tokenizer = str(Path(chats).parent / "v3" / "tokenizer.json")
    tc = TrainConfig(**{**dict(preset="tiny", tokenizer=tokenizer, data=chats, data_cache=str(root / "cache"),
                               out=str(root / f"run{rank}"), seq_len=T, batch_size=2, eval_batches=2,
                               precision="fp32", device="cpu", threads=1, plots=False, progress=False,
                               collective_timeout_s=120), **kw})
    return Trainer(tc, log=lambda m: None)


def _state(t: Trainer, terms: dict[str, float]) -> dict:
    """The step's loss terms, every gradient held here and every MoE layer's token counts (cleared for the next
    step)."""
    out = {"terms": terms, "grads": {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None},
           "counts": {n: m.tokens_per_expert.clone() for n, m in t.model.named_modules() if isinstance(m, MoE)}}
    t.optimizer.zero_grad(set_to_none=True)
    for m in moe_layers(t.model):
        m.tokens_per_expert.zero_()
    return out


def _mean_of_means(self, loss, targets_BT, k):
    """The mutant weighting: each micro-batch's mean 1/M, whatever its share of the targets."""
    return torch.where((targets_BT >= 0).sum() > 0, loss, 0.0)


def _counting_padding(model, valid_BT, documents_BT=None):
    """The mutant mask: every position counted."""
    return contextlib.nullcontext()


def _pp_rank(rank: int, chats: str, schedule: str) -> dict:
    """Rank ``rank`` of PP2 (``schedule``, 4 micro-batches): one ``_pipeline_step`` on ROWS, the validation loss,
    then the step again under each mutant."""
    t = _trainer(chats, Path(chats).parent / f"pp-{schedule}", rank, pp=2, pp_schedule=schedule,
                 micro_batches=len(ROWS))
    batches = [chat_rows(t.data.train, r, T) for r in ROWS]
    t.sampler.next_batch = iter(batches * 3).__next__
    out = {"step": _state(t, t._pipeline_step()), "val": t.evaluate()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline.Stage, "_target_weight", _mean_of_means)
        out["mean_of_means"] = _state(t, t._pipeline_step())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "counting_only", _counting_padding)
        out["padding_counted"] = _state(t, t._pipeline_step())
    t.close()
    t.mesh.destroy()
    return out


@pytest.fixture(scope="module")
def reference(chats):
    """One process, grad_accum 4 on ROWS: the step's state, the validation loss, each row's own gradients (the
    scale of the terms an entry sums), and the tolerance factor c."""
    t = _trainer(str(chats), chats.parent / "one", 0, grad_accum=len(ROWS))
    batches = [chat_rows(t.data.train, r, T) for r in ROWS]
    counts = [int((y != IGNORE_INDEX).sum()) for _, y in batches]
    assert len(set(counts)) > 1 and all(bool((x < 0).any()) for x, _ in batches)
    t.sampler.next_batch = iter(batches).__next__
    out = {"step": _state(t, t._local_step()), "val": t.evaluate()}
    out["rows"] = [g for x, y in batches for g in row_grads(t.model, x, y)]
    cfg = t.cfg
    out["c"] = (cfg.n_layers * (cfg.dim + cfg.inter_dim + 64) + 4 * 64 + 8) * FP32_U
    t.close()
    return out


def _worst(got: dict, want: dict, rows: list[dict]) -> float:
    """The largest gradient difference over its scale (the rows' own gradient norms), over the names in ``got``."""
    worst = 0.0
    for n, g in got.items():
        scale = sum(float(r[n].norm()) for r in rows if n in r) + 1e-30
        worst = max(worst, float((g - want[n]).norm()) / scale)
    return worst


@pytest.mark.parametrize("schedule", ["1f1b", pytest.param("dualpipev", marks=needs_split_backward)])
def test_pp_chat_step_equals_grad_accum(chats, reference, schedule):
    """Loss terms, gradients (the embedding's: both copies, summed) and validation loss of PP2 equal one process
    with grad_accum 4 on the same micro-batches; every MoE layer's loads (both stages, the MTP module's) are the
    one process's, which counts no padding. The mutants are far off: means weighted 1/M by >100x the gradients'
    tolerance, padding counted in other loads."""
    ranks = run_ranks(_pp_rank, 2, str(chats), schedule)
    ref, c = reference["step"], reference["c"]
    held = [set(r["step"]["grads"]) for r in ranks]
    assert held[0] | held[1] == set(ref["grads"])  # every parameter is on some stage
    for r in ranks:
        for k in ("loss", "main_loss", "mtp_loss", "aux_loss"):  # every term, summed over the stages
            assert abs(r["step"]["terms"][k] - ref["terms"][k]) <= c * ref["terms"][k], k
        assert abs(r["val"] - reference["val"]) <= c * reference["val"]
        assert _worst(r["step"]["grads"], ref["grads"], reference["rows"]) <= c
        mutant = r["mean_of_means"]
        assert _worst(mutant["grads"], ref["grads"], reference["rows"]) > 100 * c
        assert r["step"]["counts"] and all(torch.equal(v, ref["counts"][n]) for n, v in r["step"]["counts"].items())
        assert all(not torch.equal(v, ref["counts"][n]) for n, v in r["padding_counted"]["counts"].items())
    # at initialisation every token's loss is near log V: the weighting moves the loss less than the gradients
    assert abs(ranks[0]["mean_of_means"]["terms"]["loss"] - ref["terms"]["loss"]) > 10 * c * ref["terms"]["loss"]
    # MoE layers on both stages, the MTP module's on the last: none missed
    assert {n for r in ranks for n in r["step"]["counts"]} == set(ref["counts"])
