"""A run's layout and memory under ``--indexer-train``.

- Stages: ``split_layers`` balances the training FLOPs the run does, its DSA/CSA indexers as the mode trains them
  (``flyer.model.counts.layer_flops_per_token``; the warm-up leaves the rest of the model forward only and attends
  densely), and every user of the split (``build_model``'s held modules, ``PipelineModel``, ``flyer plan``'s
  per-rank memory) cuts alike.
- Memory: gradients and optimizer state exist for what trains only (indexers frozen in "off", trained alone in
  "warmup"): ``flyer plan``'s per-rank bytes and the trainer's pre-run bound count those.

Oracles: every contiguous split tried (``tests.test_pipeline.brute_force_best``), over per-stage costs that add up to
the MFU count (``training_flops_per_token`` + ``mtp_training_flops_per_token``, held to torch's FLOP counter in
``tests/test_counts_indexer*.py``); the run's ``memory.json`` (the bytes each rank measures) against ``flyer plan``;
a meta-device model's parameters with ``set_indexer_training`` applied.
"""

from __future__ import annotations

import json

import pytest
import torch

from flyer.cli import main
from flyer.config import preset
from flyer.model.counts import indexer_param_total, mtp_training_flops_per_token, training_flops_per_token
from flyer.model.indexer_loss import set_indexer_training
from flyer.model.transformer import Transformer
from flyer.optim.muon import muon_param_ids
from flyer.parallel.memory import KEYS, STEP_BYTES, activation_bytes, plan_state_bytes
from flyer.parallel.stages import check_indexer_stages, split_layers
from flyer.train.build import training_memory_bytes
from flyer.train.config import TrainConfig
from flyer.train.trainer import Trainer
from ranks import run_ranks
from test_indexer_train import _tc, corpus  # noqa: F401 (corpus: the fixture)
from test_memory_estimate import _indexer_row_bytes
from test_pipeline import brute_force_best, stage_costs

MODES = ("off", "sparse", "warmup")
T = 96  # 24 entries at CSA ratio 4: past tiny-v4's index_topk 16, the CSA layers select
RATIOS = (4, 4, 16)  # CSA, CSA, HCA: the CSA layers' indexer terms move the 2-stage cut
V4 = dict(n_layers=3, compress_ratios=RATIOS, mtp_depth=0, vocab_size=300)  # the trainer's vocabulary
TOML = f"[model]\nn_layers = 3\ncompress_ratios = {list(RATIOS)}\nmtp_depth = 0\n"
DSA = dict(index_topk=8, index_n_heads=4, index_head_dim=32)
DSA_TOML = "[model]\n" + "".join(f"{k} = {v}\n" for k, v in DSA.items())
INDEXED = [("tiny", DSA), ("tiny", dict(DSA, mtp_depth=2, indexer_types=("full", "shared", "full", "shared"))),
           ("tiny-v4", {}), ("tiny-v4", V4)]


def _meta(cfg, mode: str) -> Transformer:
    """A meta-device model of ``cfg`` with ``--indexer-train mode``'s parameters trainable."""
    with torch.device("meta"):
        model = Transformer(cfg)
    set_indexer_training(model, mode)
    return model


@pytest.mark.parametrize("name,kw,seq", [("tiny-v4", V4, T),
                                         ("tiny-v4", {}, T), ("dsv32", {}, 131072), ("dsv4-flash", {}, 131072)])
def test_stage_costs_add_up_to_the_mfu_count(name, kw, seq):
    """In each mode, the blocks' costs and the last stage's head and MTP (``end_flops``) add up to the trainer's
    FLOPs per token (main model + MTP) exactly: the split weighs what MFU counts."""
    cfg = preset(name, **kw)
    for mode in MODES:
        split = [range(0, cfg.n_layers)]
        want = training_flops_per_token(cfg, seq, True, mode) + mtp_training_flops_per_token(cfg, seq, mode)
        assert sum(stage_costs(cfg, split, seq, mode)) == pytest.approx(want, rel=1e-14), mode


@pytest.mark.parametrize("n", [2, 3])
def test_split_is_the_flop_optimal_one_in_each_mode(n):
    """tiny-v4 with layers CSA, CSA, HCA: in each mode the split's largest stage is the smallest over every
    contiguous split, at that mode's costs. On 2 stages the modes that train the indexers cut after the first CSA
    layer where the frozen indexers' cut after the second, and each split is heavier at the other's costs; the
    warm-up on 1F1B leaves each rank a CSA layer, so it is not refused."""
    cfg = preset("tiny-v4", **V4)
    splits = {}
    for mode in MODES:
        splits[mode] = split_layers(cfg, n, T, mode)
        worst = max(stage_costs(cfg, splits[mode], T, mode))
        assert worst == pytest.approx(brute_force_best(cfg, n, T, mode), rel=1e-12), (mode, splits[mode])
    if n == 2:
        assert [r.stop for r in splits["off"]] == [2, 3] and [r.stop for r in splits["sparse"]] == [1, 3]
        assert splits["warmup"] == splits["sparse"]
        # the warm-up's check of a rank left without an indexer reads its own split: the frozen indexers' would
        # leave rank 1 the HCA layer alone
        check_indexer_stages(cfg, 2, "1f1b", T, "warmup")
        for mode, other in (("off", "sparse"), ("sparse", "off")):
            ratio = max(stage_costs(cfg, splits[other], T, mode)) / max(stage_costs(cfg, splits[mode], T, mode))
            assert ratio > 1 + 1e-9, (mode, ratio)


def test_the_warmup_split_of_v4_flash_at_128k():
    """DeepSeek-V4-Flash's indexer warm-up at 128K tokens on 16 stages: its largest stage is the optimum's, where the
    split of the frozen indexers' costs leaves one over 1.5x heavier (the warm-up attends densely; the CSA layers
    cost most)."""
    cfg, seq = preset("dsv4-flash"), 131072
    costs = {mode: max(stage_costs(cfg, split_layers(cfg, 16, seq, mode), seq, "warmup")) for mode in ("off", "warmup")}
    assert costs["off"] > 1.5 * costs["warmup"], costs


def _pp_rank(rank: int, corpus: tuple, config: str, mode: str) -> list[str]:  # noqa: F811 (corpus: an argument)
    """Rank ``rank`` of --pp 2 (1F1B, 2 micro-batches), ``--indexer-train mode``: one step (memory.json written),
    then the layers it holds."""
    root = corpus[0].parent / f"split-{mode}"
    t = Trainer(_tc(root / "run", (corpus[0], root / "cache"), preset="tiny-v4", config=config, indexer_train=mode,
                    pp=2, pp_schedule="1f1b", micro_batches=2, batch_size=2, seq_len=T, precision="fp32", steps=1,
                    eval_every=1000, ckpt_every=1000, threads=1, collective_timeout_s=120), log=lambda m: None)
    t.train_step()
    layers = sorted(t.pipeline.layers.keys())
    t.close()
    t.mesh.destroy()
    return layers


def _plan(capsys, config: str, mode: str) -> dict:
    argv = ["plan", "--preset", "tiny-v4", "--config", config, "--gpus", "2", "--pp", "2", "--ep", "1", "--zero", "0",
            "--pp-schedule", "1f1b", "--seq-len", str(T), "--vocab-size", "300", "--precision", "fp32",
            "--indexer-train", mode, "--json"]
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_pp_run_holds_the_modes_split_and_plan_measures_it(corpus, tmp_path, capsys):  # noqa: F811 (the fixture)
    """--pp 2 --indexer-train sparse on tiny-v4 (CSA, CSA, HCA): each rank holds the sparse split's layers
    (build_model and PipelineModel cut alike: a module left on the meta device is refused), and ``memory.json``
    equals ``flyer plan --indexer-train sparse``'s per-rank bytes, which the frozen indexers' split would not give."""
    config = tmp_path / "v4.toml"
    config.write_text(TOML)
    ranks = run_ranks(_pp_rank, 2, corpus, str(config), "sparse")
    assert ranks == [["0"], ["1", "2"]]
    measured = json.loads((corpus[0].parent / "split-sparse" / "run" / "memory.json").read_text())
    plans = {mode: _plan(capsys, str(config), mode) for mode in ("sparse", "off")}
    for k in KEYS:
        assert measured[f"{k}_per_rank"] == plans["sparse"][f"{k}_per_rank"], k
    assert measured["param_bytes_per_rank"] != plans["off"]["param_bytes_per_rank"]


@pytest.mark.parametrize("name,kw", INDEXED)
def test_indexer_param_total_is_the_models_indexers(name, kw):
    """``indexer_param_total``: the parameters under every ``.indexer.`` of a meta-device model (MTP blocks', GLM-5's
    full layers only, V4's CSA layers), which "off" leaves frozen and the warm-up trains alone."""
    cfg = preset(name, **kw)
    indexers = sum(p.numel() for n, p in _meta(cfg, "off").named_parameters() if ".indexer." in n)
    assert indexers > 0 and indexer_param_total(cfg) == indexers
    for mode, trained in (("off", False), ("warmup", True)):
        params = list(_meta(cfg, mode).parameters())
        assert sum(p.numel() for p in params if p.requires_grad == trained) == indexers, mode


@pytest.mark.parametrize("name,kw", INDEXED)
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_the_pre_run_bound_and_the_plan_count_state_of_what_trains(name, kw, optimizer):
    """In each mode, the plan's gradients and optimizer state are those of the parameters that train (a meta-device
    model under ``set_indexer_training``: FP32 gradients, AdamW's two moments and step scalar, Muon's one momentum
    for its matrices), and the trainer's pre-run bound is the plan's state less what it leaves out: AdamW's step
    scalars, and under Muon the second moment of the parameters AdamW updates (it counts one moment each). The
    bound's batch adds the activation estimate, which in the warm-up (the frozen model keeps nothing for backward) is
    what the indexers' L_I keeps alone (held to a real forward's in ``test_memory_estimate.py``)."""
    cfg = preset(name, **kw)
    for mode in MODES:
        model = _meta(cfg, mode)
        params = list(model.parameters())
        muon = muon_param_ids(model) if optimizer == "muon" else {}
        trained = [p for p in params if p.requires_grad]
        adamw = [p for p in trained if id(p) not in muon]
        plan = plan_state_bytes(cfg, 1, 1, 1, 0, precision="fp32", optimizer=optimizer, indexer_train=mode)
        assert plan["param_bytes_per_rank"] == [4 * sum(p.numel() for p in params)]
        assert plan["grad_bytes_per_rank"] == [4 * sum(p.numel() for p in trained)], mode
        moments = sum(4 * p.numel() for p in trained) + sum(4 * p.numel() + STEP_BYTES for p in adamw)
        assert plan["optimizer_bytes_per_rank"] == [moments], mode
        state = sum(plan[f"max_{k}_per_rank"] for k in ("param_bytes", "grad_bytes", "optimizer_bytes"))
        tc = TrainConfig(batch_size=0, indexer_train=mode, optimizer=optimizer)
        left_out = sum((4 * p.numel() if muon else 0) + STEP_BYTES for p in adamw)
        assert state - training_memory_bytes(cfg, tc, "fp32") == left_out, mode
        batch = TrainConfig(batch_size=2, seq_len=T, indexer_train=mode, optimizer=optimizer)
        saved = training_memory_bytes(cfg, batch, "fp32") - training_memory_bytes(cfg, tc, "fp32")
        assert saved == activation_bytes(cfg, 1, 0, "1f1b", T, 2, "fp32", indexer_train=mode), mode
    warm = activation_bytes(cfg, 1, 0, "1f1b", T, 2, "fp32", indexer_train="warmup")
    assert warm == 2 * _indexer_row_bytes(cfg, "warmup", "fp32", T) > 0  # MTP module k over its T - k tokens


@pytest.mark.parametrize("mode", ["off", "warmup"])
def test_one_process_memory_is_the_plan_in_each_mode(corpus, tmp_path, capsys, mode):  # noqa: F811 (the fixture)
    """tiny with DSA indexers, one process: ``memory.json`` after a step (frozen indexers have no gradient nor
    state; the warm-up's frozen model neither) equals ``flyer plan --indexer-train``'s bytes exactly."""
    config = tmp_path / "dsa.toml"
    config.write_text(DSA_TOML)
    t = Trainer(_tc(tmp_path / "run", corpus, config=str(config), indexer_train=mode, precision="fp32", steps=1,
                    seq_len=48, eval_every=1000, ckpt_every=1000, threads=1), log=lambda m: None)
    t.train_step()
    t.close()
    measured = json.loads((tmp_path / "run" / "memory.json").read_text())
    argv = ["plan", "--preset", "tiny", "--config", str(config), "--gpus", "1", "--pp", "1", "--ep", "1", "--zero",
            "0", "--seq-len", "48", "--vocab-size", "300", "--precision", "fp32", "--indexer-train", mode, "--json"]
    capsys.readouterr()
    assert main(argv) == 0
    planned = json.loads(capsys.readouterr().out)
    for k in KEYS:
        assert measured[f"{k}_per_rank"] == planned[f"{k}_per_rank"], k
    assert measured["grad_bytes_per_rank"][0] < measured["param_bytes_per_rank"][0]
