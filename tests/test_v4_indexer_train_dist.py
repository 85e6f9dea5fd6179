"""DeepSeek-V4's CSA indexer training (``flyer train --indexer-train warmup|sparse``, ``tiny-v4``: CSA layers 1 and 3)
under expert and pipeline parallelism, against one process on the same rows.

- ``--ep 2`` (two ranks, each a data-parallel replica, on 2 of the 4 rows, T 96: 24 entries, the CSA layers select
  16): one ``train_step`` in each mode gives one process's loss terms, indexer_loss, clipping norms (sparse: the
  main model's and the indexers' apart), clipped gradients (each rank's expert slice) and weights after the AdamW
  step; the warm-up moves nothing but the indexers, on both ranks.
- ``--pp 2`` interleaved (rank 0's stages: layers 0 and 2, window and HCA, no indexer) with ``--indexer-train
  sparse`` on packed chat rows (``tests.test_sft_pack_pp``'s 4 micro-batches of 6, 2, 4 and 3 conversations, 192
  wide: the CSA layers' L_I a mean over each micro-batch's real queries within their documents, weighted by its
  share of the step's): the same of one process with --pack and grad_accum 4 (1F1B and DualPipeV measured alike);
  the last stage's L_I dropped is far off. The text path under --pp, both modes: tests/test_v4_indexer_train.py
  (``test_pipeline_collects_the_csa_losses``).
- ``--ep 2 --pp 2`` (4 ranks), sparse: one process's loss terms and clipping norms (its stages hold unequal numbers
  of MoE layers, which the trainer's traffic counts once mismatched in a collective).
- The warm-up on a layout leaving a pipeline rank no CSA layer (nothing to train there) is refused naming --pp.

Tolerances: ``tests.test_sft.reorder_bound`` (the same terms summed in another order: relative to the loss, a
gradient's to the sum of the rows' own gradient norms, a norm's to itself), at tiny-v4's widths (no dense FFN: the
experts' inter dim); a weight's after the step: AdamW's first step moves w by lr g / (|g| + eps) (m and v bias
corrected), so two runs' weights differ by lr |f(g) - f(g')|, f(g) = g / (|g| + eps), for their clipped gradients g,
g', plus each run's roundings of the step and of w. Mutants (run by hand, each failing a test): the ranks' real
query counts not summed over the job (``Trainer._local_step``), L_I a mean over B T rather than the real queries,
every micro-batch's L_I weighted 1/M under the pipeline (``Stage._query_weight``), the last stage's L_I skipped
(``Stage.forward``), the refusal checking the last rank only, ``set_indexer_training`` refusing sparse training
on a rank without indexers, the traffic counts reduced per layer over the world.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from flyer.cli import main
from flyer.data.chat_data import IGNORE_INDEX, PAD_ID
from flyer.errors import FieldError
from flyer.model.indexer_loss import indexer_losses
from flyer.parallel import pipeline, stages
from flyer.train.trainer import Trainer
from tests import test_sft_pack_pp
from tests.bounds import FP32_U
from tests.ranks import run_ranks
from tests.test_indexer_train import _tc
from tests.test_sft import reorder_bound, row_grads
from tests.test_sft_pp import _state, _worst

T, ROWS = 96, 4  # 24 entries at CSA ratio 4: past index_topk 16, the sparse CSA layers select
LR = 3e-3


def _bound_cfg():
    """tiny-v4 as ``reorder_bound`` reads it: its FFN sums run over the experts' inter dim (no dense layer)."""
    from flyer.config import preset

    cfg = preset("tiny-v4", vocab_size=300)
    assert cfg.n_dense_layers == 0
    return cfg.replace(inter_dim=cfg.moe_inter_dim)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small generated text and a cache for its tokenizer and shards."""
    root = tmp_path_factory.mktemp("v4-indexer-dist")
    words = "latent window entry indexer query selection head score layer token".split()
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(8 + i % 5)) for i in range(600)]
    (root / "text.txt").write_text("\n".join(lines) + "\n")
    return root / "text.txt", root / "cache"


def _train_step(t: Trainer, batches: list) -> dict:
    """One ``t.train_step()`` on ``batches`` (its micro-batches): the record, the gradients the update reads
    (synced and clipped) and every weight before and after it."""
    out = {"before": {n: p.detach().clone() for n, p in t.model.named_parameters()}}
    step = t.optimizer.step

    def keep_grads(*a, **kw):
        out["grads"] = {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}
        return step(*a, **kw)

    t.optimizer.step = keep_grads
    t.sampler.next_batch = iter(batches).__next__
    out["record"] = t.train_step()
    out["after"] = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.optimizer.step = step
    return out


def _ep_steps(rank: int, corpus: tuple, tokens: torch.Tensor) -> dict:
    """For each mode (sparse, warmup): ``_train_step`` of tiny-v4 on rank ``rank``'s share of ``tokens`` (B, T+1)
    with ``--ep WORLD_SIZE``, and the rank's EP index (one process: all rows, and each row's own gradients first,
    the scale of the terms)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rows = tokens.chunk(world)[rank]
    result = {}
    for mode in ("sparse", "warmup"):
        root = corpus[0].parent / f"{mode}-ep{world}"
        t = Trainer(_tc(root / f"run{rank}", (corpus[0], root / "cache"), preset="tiny-v4", indexer_train=mode,
                        ep=world, batch_size=rows.shape[0], seq_len=T, precision="fp32", threads=1, lr=LR,
                        collective_timeout_s=120), log=lambda m: None)
        rows_grads = row_grads(t.model, *_split(rows)) if world == 1 else None
        t.model.zero_grad(set_to_none=True)
        result[mode] = {**_train_step(t, [_split(rows)]), "experts": t.mesh.ep_rank, "rows": rows_grads}
        t.close()
        if mode == "warmup":
            t.mesh.destroy()
    return result


def _tokens() -> torch.Tensor:
    """ROWS rows of T + 1 random tokens, the first two (rank 0's under --ep 2) padded after 70 and 50 tokens (x
    PAD_ID, y IGNORE_INDEX, as chat rows): the ranks hold unequal numbers of real queries and targets, so their
    L_I and LM means are weighted by the job's counts, summed over the ranks."""
    tokens = torch.randint(0, 300, (ROWS, T + 1), generator=torch.Generator().manual_seed(11))
    for b, n in enumerate((70, 50)):
        tokens[b, n:] = PAD_ID
    return tokens


def _split(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of rows of T + 1 tokens: padding's targets ignored."""
    return tokens[:, :-1], tokens[:, 1:].masked_fill(tokens[:, 1:] < 0, IGNORE_INDEX)


def _slice(want: torch.Tensor, got: torch.Tensor, name: str, ep_index: int) -> torch.Tensor:
    """``want`` (one process's) cut to a rank's share: its experts' contiguous slice of an expert stack."""
    if ".experts.w" not in name:
        return want
    E = got.shape[0]
    return want[ep_index * E:(ep_index + 1) * E]


def _adam_move(g: torch.Tensor) -> torch.Tensor:
    """AdamW's first step direction g / (|g| + eps) (bias-corrected m = g, v = g^2), in FP64."""
    g = g.double()
    return g / (g.abs() + 1e-8)


def _check_step(got: dict, want: dict, rows: list[dict], c: float, lr: float, experts: int = 0) -> None:
    """A rank's ``_train_step`` (``got``) is one process's (``want``) on the parameters it holds (``experts``: its
    EP index, for the expert stacks' slices): every clipped gradient within c x the rows' own gradient norms
    (``rows``), every weight after the step within AdamW's move for the two gradients (lr x |f(g) - f(g')|) and
    each run's roundings (its m, v, square root, bias corrections, eps, division, lr, decay and subtraction: 8 of
    lr and of |w| at most); a weight without gradient (frozen, or a warm-up's main model) untouched, bit for bit."""
    def cut(t: torch.Tensor, n: str, like: torch.Tensor) -> torch.Tensor:
        return _slice(t, like, n, experts)

    assert set(got["grads"]) <= set(want["grads"])
    for n, g in got["grads"].items():
        scale = sum(float(row[n].norm()) for row in rows if n in row) + 1e-30
        assert float((g - cut(want["grads"][n], n, g)).norm()) <= c * scale, n
    for n, w in got["after"].items():
        w0 = got["before"][n]
        assert torch.equal(w0, cut(want["before"][n], n, w)), n  # the same start
        if n not in got["grads"]:
            assert n not in want["grads"] and torch.equal(w, w0), n
            continue
        g, g1 = got["grads"][n], cut(want["grads"][n], n, w)
        bound = lr * (_adam_move(g) - _adam_move(g1)).abs() + 16 * FP32_U * (w0.abs() + lr)
        assert ((w - cut(want["after"][n], n, w)).abs() <= bound).all(), n
        assert ".indexer." not in n or not torch.equal(w, w0), n  # every trained indexer moves


def _check_record(got: dict, want: dict, c: float, keys: tuple[str, ...]) -> None:
    """The step's logged terms and clipping norms: within c of one process's, relative to each; sparse training
    logs indexer_grad_norm (the indexers clipped apart), the warm-up does not."""
    assert ("indexer_grad_norm" in got) == ("indexer_grad_norm" in want)
    assert not got.get("skipped") and want["indexer_loss"] > 0
    for k in keys:
        if k in want:
            assert abs(got[k] - want[k]) <= c * abs(want[k]), (k, got[k], want[k])


@pytest.mark.slow
def test_two_expert_parallel_ranks_equal_one_process(corpus):
    """--ep 2, both modes: the loss terms and indexer_loss (equal on both ranks), the clipping norms, the clipped
    gradients (the indexers' and, sparse, the main model's; each rank's expert slice) and the weights after the step
    of two ranks equal one process on all 4 rows within the bounds above; the warm-up leaves every non-indexer
    weight as it was, bit for bit, on every rank, and moves every indexer."""
    tokens = _tokens()
    ranks = run_ranks(_ep_steps, 2, corpus, tokens)
    whole = _ep_steps(0, corpus, tokens)
    c = reorder_bound(_bound_cfg(), ROWS, T)
    keys = ("loss", "main_loss", "mtp_loss", "aux_loss", "indexer_loss", "grad_norm", "indexer_grad_norm")
    for mode, want in whole.items():
        indexers = [n for n in want["grads"] if ".indexer." in n]
        assert indexers and bool(set(want["grads"]) - set(indexers)) == (mode == "sparse")
        for r in (r[mode] for r in ranks):
            assert r["grads"].keys() == want["grads"].keys()
            assert all(r["record"][k] == ranks[0][mode]["record"][k] for k in keys if k in want["record"])
            _check_record(r["record"], want["record"], c, keys)
            _check_step(r, want, want["rows"], c, LR, r["experts"])


chats = test_sft_pack_pp.chats  # the module-scoped fixture: CHATS beside a tiny V3 directory's tokenizer
M = test_sft_pack_pp.M


def _chat_trainer(chats: str, root: Path, rank: int, **kw) -> Trainer:
    """``test_sft_pack_pp``'s packed chat trainer (rows of 192: 48 entries, the CSA layers select 16) on tiny-v4,
    ``--indexer-train sparse``, lr LR."""
    return test_sft_pack_pp._trainer(chats, root, rank, preset="tiny-v4", indexer_train="sparse", lr=LR, **kw)


def _without_layer_3(layers) -> list:
    """Mutant ``indexer_losses``: the last stage's CSA layer's (layer 3's) L_I dropped, layer 1's kept."""
    return [] if any(getattr(b, "layer_id", None) == 3 for b in layers.modules()) else indexer_losses(layers)


def _pp_rank(rank: int, chats: str, schedule: str) -> dict:
    """Rank ``rank`` of PP2 (``schedule``, M packed micro-batches): a ``_pipeline_step`` with layer 3's L_I dropped
    (``_without_layer_3``), gradients then cleared, then ``_train_step``."""
    t = _chat_trainer(chats, Path(chats).parent / f"pp-v4-{schedule}", rank, pp=2, pp_schedule=schedule,
                      micro_batches=M)
    batches = test_sft_pack_pp._batches(t)
    t.sampler.next_batch = iter(batches).__next__
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "indexer_losses", _without_layer_3)
        out = {"dropped": _state(t, t._pipeline_step())}
    out.update(_train_step(t, batches))
    t.close()
    t.mesh.destroy()
    return out


def test_pp_packed_chat_equals_one_process(chats):
    """--pp 2, interleaved (rank 0: stages of layers 0 and 2, window and HCA, no indexer; rank 1: layers 1 and 3,
    the CSA layers, and the MTP block) with --indexer-train sparse on packed chat micro-batches of unequal real
    queries: the logged terms (indexer_loss: the mean over the two CSA layers), the clipping norms, the indexers'
    and the main model's clipped gradients and the weights after the step equal one process with --pack and
    grad_accum M within the bounds above (1F1B and DualPipeV measured alike; not run here, for time); with layer
    3's L_I dropped, its indexer's gradients and indexer_loss are far off and layer 1's indexer's are not."""
    one = _chat_trainer(str(chats), chats.parent / "one-v4", 0, grad_accum=M)
    batches = test_sft_pack_pp._batches(one)
    rows = [g for batch in batches for g in row_grads(one.model, *batch)]
    one.model.zero_grad(set_to_none=True)
    want = _train_step(one, batches)
    one.close()
    c = reorder_bound(_bound_cfg(), M * batches[0][0].shape[0], batches[0][0].shape[1])
    ranks = run_ranks(_pp_rank, 2, str(chats), "interleaved")
    assert {n.split(".attn.")[0] for n in want["grads"] if ".indexer." in n} == {"layers.1", "layers.3"}
    assert not any(".indexer." in n for n in ranks[0]["grads"])  # rank 0 holds no CSA layer
    assert set(ranks[0]["grads"]) | set(ranks[1]["grads"]) == set(want["grads"])
    for r in ranks:
        _check_record(r["record"], want["record"], c, ("loss", "main_loss", "mtp_loss", "aux_loss", "indexer_loss",
                                                       "grad_norm", "indexer_grad_norm"))
        _check_step(r, want, rows, c, LR)
    dropped = ranks[1]["dropped"]
    for layer, off in (("layers.1.", False), ("layers.3.", True)):
        grads = {n: g for n, g in dropped["grads"].items() if ".indexer." in n and n.startswith(layer)}
        assert grads and (_worst(grads, want["grads"], rows) > 100 * c) == off, layer
    kl = want["record"]["indexer_loss"]
    assert abs(dropped["terms"]["indexer_loss"] - kl) > 100 * c * kl


@pytest.mark.parametrize("schedule,pp,refused", [("interleaved", 2, 0), ("1f1b", 4, 0), ("1f1b", 2, None)])
def test_warmup_refuses_a_rank_without_indexers(tmp_path, capsys, schedule, pp, refused):
    """--indexer-train warmup trains the indexers alone: a pipeline layout leaving a rank no CSA layer (tiny-v4's
    layers 0 and 2 on rank 0 interleaved; layer 0 alone at --pp 4) is refused naming --pp, exit 2, before any
    work; 1F1B on 2 ranks (a CSA layer on each) is accepted. Sparse training runs such a layout (the test above).
    ``flyer plan`` of the run's memory on the layout says the same."""
    cfg = _bound_cfg()
    plan = ["plan", "--preset", "tiny-v4", "--gpus", str(pp), "--pp", str(pp), "--ep", "1", "--pp-schedule",
            schedule, "--seq-len", str(T), "--indexer-train", "warmup", "--json"]
    if refused is None:
        stages.check_indexer_stages(cfg, pp, schedule, T, "warmup")
        assert main(plan) == 0
        return
    stages.check_indexer_stages(cfg, pp, schedule, T, "sparse")
    with pytest.raises(FieldError, match=f"pp: indexer_train warmup .* rank {refused} "):
        stages.check_indexer_stages(cfg, pp, schedule, T, "warmup")
    argv = ["train", "--preset", "tiny-v4", "--indexer-train", "warmup", "--pp", str(pp), "--pp-schedule", schedule,
            "--steps", "1", "--out", str(tmp_path / "run"), "--no-progress", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("flyer: error: --pp: --indexer-train warmup") and f"rank {refused} " in err, err
    assert main(plan) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == err


def _ep_pp_rank(rank: int, corpus: tuple, tokens: torch.Tensor) -> dict:
    """Rank ``rank`` of --ep 2 --pp 2 (1F1B, 2 micro-batches of a row per replica, replica r on rows 2r, 2r + 1 of
    ``tokens``), --indexer-train sparse: one ``train_step``'s record."""
    root = corpus[0].parent / "ep-pp"
    t = Trainer(_tc(root / f"run{rank}", (corpus[0], root / "cache"), preset="tiny-v4", indexer_train="sparse",
                    ep=2, pp=2, pp_schedule="1f1b", micro_batches=2, batch_size=1, seq_len=T, precision="fp32",
                    threads=1, lr=LR, collective_timeout_s=120), log=lambda m: None)
    rows = tokens[2 * t.mesh.dp_rank:2 * t.mesh.dp_rank + 2]
    t.sampler.next_batch = iter([_split(r[None]) for r in rows]).__next__
    record = t.train_step()
    t.close()
    t.mesh.destroy()
    return record


@pytest.mark.slow
def test_expert_and_pipeline_parallel_equal_one_process(corpus):
    """--ep 2 --pp 2 (4 ranks; tiny-v4's stages hold 3 and 1 + MTP MoE layers, whose traffic counts the trainer
    sums per rank before summing over the ranks: a per-layer sum over the world mismatched) with sparse training:
    the loss terms, indexer_loss and clipping norms of one process with grad_accum 4 on the same rows, and the
    step's expert traffic counted."""
    tokens = torch.randint(0, 300, (ROWS, T + 1), generator=torch.Generator().manual_seed(13))  # text: no padding
    ranks = run_ranks(_ep_pp_rank, 4, corpus, tokens)
    one = Trainer(_tc(corpus[0].parent / "ep-pp-one", corpus, preset="tiny-v4", indexer_train="sparse", grad_accum=4,
                      batch_size=1, seq_len=T, precision="fp32", threads=1, lr=LR), log=lambda m: None)
    want = _train_step(one, [_split(r[None]) for r in tokens])["record"]
    one.close()
    c = reorder_bound(_bound_cfg(), ROWS, T)
    for r in ranks:
        _check_record(r, want, c, ("loss", "main_loss", "mtp_loss", "aux_loss", "indexer_loss", "grad_norm",
                                   "indexer_grad_norm"))
        assert r["intra_node_tokens"] == ranks[0]["intra_node_tokens"] > 0
