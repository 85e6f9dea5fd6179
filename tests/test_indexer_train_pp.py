"""DSA indexer training under pipeline parallelism (``flyer train --indexer-train sparse --pp 2``): a PP2 step (1F1B,
DualPipeV) on text micro-batches gives the loss terms, the logged indexer_loss (a mean over the DSA layers, the MTP
block's included), the indexers' and the main model's gradients and the clipping norms (apart) of one process with
grad_accum = micro-batches on the same micro-batches.

Tolerance: ``tests.test_sft.reorder_bound`` (the same terms summed in another order; relative to the loss, a
gradient's to the sum of the rows' own gradient norms, a norm's to itself), as the expert-parallel test in
``tests/test_indexer_train.py`` takes it. Mutant: the second stage's L_I dropped (its layers' and the MTP block's).
"""

from __future__ import annotations

import pytest
import torch

from flyer.model.indexer_loss import clip_gradients, indexer_attentions
from flyer.parallel import pipeline
from flyer.train.trainer import Trainer
from tests.ranks import needs_split_backward, run_ranks
from tests.test_dsa_gather_train import CFG, TOPK
from tests.test_indexer_train import _tc, corpus  # noqa: F401 (corpus: the fixture)
from tests.test_sft import reorder_bound

T, M = 48, 4  # past index_topk: sparse attention selects; DualPipeV on 2 ranks runs 4 micro-batches at least
TERMS = ("loss", "main_loss", "mtp_loss", "aux_loss", "indexer_loss")


def _trainer(text: tuple, root, config: str, **kw) -> Trainer:
    """``tiny`` with DSA indexers (``config``) on ``text`` (the corpus), one row per micro-batch, FP32; ``kw``:
    TrainConfig fields (indexer_train among them)."""
    return Trainer(_tc(root, (text[0], root.parent / "cache"), config=config, batch_size=1, seq_len=T,
                       precision="fp32", threads=1, collective_timeout_s=120, **kw), log=lambda m: None)


def _state(t: Trainer, sums: dict[str, float]) -> dict:
    """The step's sums, every gradient held here, then the clipping norms (main, indexers'); gradients cleared."""
    out = {"sums": sums, "grads": {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}}
    out["norms"] = clip_gradients(t.model, t.mesh.clip_grad_norm_, t.tc.clip, t.tc.indexer_train)
    t.optimizer.zero_grad(set_to_none=True)
    return out


def _pp_rank(rank: int, text: tuple, config: str, batches: list, schedule: str, mode: str) -> dict:
    """Rank ``rank`` of PP2 (``schedule``, M micro-batches, ``--indexer-train mode``): one ``_pipeline_step`` on
    ``batches``, then (1F1B, sparse) the step again with the stage after the first dropping its DSA layers' L_I."""
    t = _trainer(text, text[0].parent / f"pp-{schedule}-{mode}" / f"run{rank}", config, pp=2, pp_schedule=schedule,
                 micro_batches=M, indexer_train=mode)
    t.sampler.next_batch = iter(batches * 2).__next__
    out = {"step": _state(t, t._pipeline_step())}
    if (schedule, mode) == ("1f1b", "sparse"):
        with pytest.MonkeyPatch.context() as mp:
            if t.pipeline.stages[0].index == 1:
                mp.setattr(pipeline, "indexer_losses", lambda model: [])
            out["dropped"] = _state(t, t._pipeline_step())
    t.close()
    t.mesh.destroy()
    return out


@pytest.fixture(scope="module")
def setup(corpus, tmp_path_factory):  # noqa: F811 (corpus: the fixture)
    """The DSA config, M rows of T+1 tokens as micro-batches, and per mode (sparse, warmup) one process's step on
    them (grad_accum M) with each row's own gradients."""
    root = tmp_path_factory.mktemp("indexer-pp")
    (root / "dsa.toml").write_text(f"[model]\nindex_topk = {TOPK}\nindex_n_heads = 4\nindex_head_dim = 32\n")
    config = str(root / "dsa.toml")
    tokens = torch.randint(0, 300, (M, T + 1), generator=torch.Generator().manual_seed(5))
    batches = [(r[None, :-1], r[None, 1:]) for r in tokens]
    wants = {}
    for mode in ("sparse", "warmup"):
        t = _trainer(corpus, root / f"one-{mode}", config, grad_accum=M, indexer_train=mode)
        t.sampler.next_batch = iter(batches).__next__
        want = wants[mode] = _state(t, t._local_step())
        want["layers"], want["mtp_weight"] = len(indexer_attentions(t.model)), t.cfg.mtp_loss_weight
        want["rows"] = []
        for x, y in batches:
            t.model.zero_grad(set_to_none=True)
            t.model.compute_loss(x, y).loss.backward()
            want["rows"].append({n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None})
        t.close()
    return config, batches, wants


def _worst(got: dict, want: dict, rows: list[dict]) -> float:
    """The largest gradient difference over its scale (the rows' own gradient norms), over the names in ``want``;
    a gradient missing from ``got`` counts as zero."""
    worst = 0.0
    for n, g in want.items():
        scale = sum(float(r[n].norm()) for r in rows if n in r) + 1e-30
        worst = max(worst, float((got.get(n, torch.zeros_like(g)) - g).norm()) / scale)
    return worst


@pytest.mark.parametrize("schedule,mode", [("1f1b", "sparse"),
                                           pytest.param("dualpipev", "sparse", marks=needs_split_backward),
                                           ("1f1b", "warmup")])
def test_pp_indexer_step_equals_grad_accum(corpus, setup, schedule, mode):  # noqa: F811 (corpus: the fixture)
    """Every loss term (indexer_loss: the mean over the DSA layers), the gradients (both stages' together: every
    parameter's; sparse: the indexers' and the main model's, warm-up: the indexers' alone, the rest frozen) and the
    clipping norms (sparse: apart) of PP2 equal one process with grad_accum M, within ``reorder_bound``; the loss
    holds L_I's sum. With the second stage's L_I dropped, its indexers' gradients and indexer_loss are far off."""
    config, batches, wants = setup
    want = wants[mode]
    ranks = run_ranks(_pp_rank, 2, corpus, config, batches, schedule, mode)
    c = reorder_bound(CFG, M, T)
    assert want["sums"]["indexer_loss"] > 0 and any(".indexer." in n for n in want["grads"])
    held = [set(r["step"]["grads"]) for r in ranks]
    assert held[0] | held[1] == set(want["grads"])  # every parameter on some stage (the embedding: both, summed)
    for r in ranks:
        got = r["step"]["sums"]
        for k in TERMS:
            assert abs(got[k] - want["sums"][k]) <= c * abs(want["sums"][k]), (k, got)
        assert [a is None for a in r["step"]["norms"]] == [b is None for b in want["norms"]]
        assert all(abs(a - b) <= c * b for a, b in zip(r["step"]["norms"], want["norms"]) if b is not None)
        # the loss holds L_I's sum over the layers (below the bound above at initialisation): the float64 sum of
        # the terms, a few roundings of the loss
        rest = got["loss"] - got["main_loss"] - want["mtp_weight"] * got["mtp_loss"] - got["aux_loss"]
        assert abs(rest - want["layers"] * got["indexer_loss"]) <= 8 * 2.0 ** -53 * got["loss"], rest
    grads = {**ranks[0]["step"]["grads"], **ranks[1]["step"]["grads"]}
    main = [n for n in want["grads"] if ".indexer." not in n]
    assert bool(main) == (mode == "sparse")  # warm-up: the main model frozen, on both stages
    for names in ([n for n in want["grads"] if ".indexer." in n], main):
        assert _worst(grads, {n: want["grads"][n] for n in names}, want["rows"]) <= c
    if "dropped" in ranks[0]:
        dropped = {**ranks[0]["dropped"]["grads"], **ranks[1]["dropped"]["grads"]}
        assert _worst(dropped, want["grads"], want["rows"]) > 100 * c
        assert abs(ranks[0]["dropped"]["sums"]["indexer_loss"] - want["sums"]["indexer_loss"]) > 100 * c * abs(
            want["sums"]["indexer_loss"])
