"""`flyer train --ep 2` on a tiny LongCat-Flash (``shortcut_moe``, zero-computation experts) under torchrun (gloo,
CPU) against one process on the same rows, over two steps: the loss terms, the expert loads (identity columns too),
the router statistics, and the checkpoint (its weights, and `flyer generate` on it); and `--pp 2 --ep 2` on 4 ranks
against one process the same way (the checkpoint aside).

EP 2 on 2 ranks is DP 2: rank r draws the sample stream (seed, r). The one-process run is `flyer train --grad-accum 2`
whose sampler hands out micro-batch r of each step from stream r (``TwoStreams``, ``one_process``, in this process):
the same rows, the same shares of the loss. PP 2 x EP 2 on 4 ranks is DP 2 as well, replica r's pipeline running M
micro-batches of stream r a step; with --grad-accum EP x M the one-process run's draw i of a step is batch i // EP
of stream i % EP, so a step holds each stream's next M batches: the same rows again. Tolerances as
tests/test_train_pp_longcat.py derives them (the tiny learning rate keeps the weights within 2 k lr (1 + wd |w|) of
each other after k steps); the checkpoint's weights within that distance plus one FP32 rounding of each step's update.
"""

from __future__ import annotations

import pytest
import torch
from test_train_pp import LR, WD, _records, _run, _torchrun
from test_train_pp_longcat import BATCH, MODEL, SEQ_LEN, STEPS, M, _args, _toml, check_steps

import flyer.train.batches
from flyer.cli import main
from flyer.data.sampler import BatchSampler

EP = 2


class TwoStreams:
    """A ``BatchSampler`` stand-in whose i-th batch is batch i // EP of stream (seed + i % EP): with --grad-accum EP,
    micro-batch r of each step is what EP rank r draws (the trainer seeds rank r's stream seed * 1000 + r)."""

    def __init__(self, tokens, batch_size: int, seq_len: int, seed: int):
        self.streams = [BatchSampler(tokens, batch_size, seq_len, seed + r) for r in range(EP)]
        self.drawn = 0

    def next_batch(self):
        batch = self.streams[self.drawn % EP].next_batch()
        self.drawn += 1
        return batch

    def state_dict(self) -> dict:
        return self.streams[0].state_dict()


def one_process(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    """The one-process reference: `flyer train` (in this process) drawing the EP ranks' rows in turn."""
    monkeypatch.setattr(flyer.train.batches, "BatchSampler", TwoStreams)  # where the trainer's samplers are chosen
    assert main(["train", *args]) == 0


def test_ep2_equals_one_process_on_the_same_rows(tmp_path, data_cache, monkeypatch):
    config = _toml(tmp_path / "longcat.toml")
    err = _run(_torchrun(EP, "--standalone") + _args(tmp_path / "ep", data_cache, config, "--ep", str(EP))).stderr
    assert "PP 1 x DP 2, EP 2" in err, err[-3000:]
    one_process(monkeypatch, _args(tmp_path / "one", data_cache, config, "--grad-accum", str(EP)))
    ep, one = _records(tmp_path / "ep"), _records(tmp_path / "one")
    check_steps(ep, one)
    # both ranks' rows counted: each step's loads sum to EP x batch x seq_len tokens x K picks, per layer
    assert all(sum(x) == EP * 2 * 32 * MODEL["n_activated_experts"] for r in ep.values() for x in r["expert_load"])

    from flyer.interop.load import load_pretrained

    (got, cfg, _), (ref, _, _) = load_pretrained(tmp_path / "ep"), load_pretrained(tmp_path / "one")
    assert cfg.shortcut_moe and cfg.n_zero_experts == MODEL["n_zero_experts"]
    ref_state = ref.state_dict()
    for name, w in got.state_dict().items():  # every rank's experts back in their one-process places
        r = ref_state[name]
        bound = STEPS * (2 * LR * (1 + WD * r.abs()) + torch.finfo(torch.float32).eps * r.abs())
        assert ((w - r).abs() <= bound).all(), (name, (w - r).abs().max().item())
    assert main(["generate", "--ckpt", str(tmp_path / "ep"), "--prompt", "hello world", "--max-new-tokens", "4",
                 "--device", "cpu"]) == 0


def test_pp2_ep2_equals_one_process_on_the_same_rows(tmp_path, data_cache, monkeypatch):
    config = _toml(tmp_path / "longcat.toml")
    err = _run(_torchrun(4, "--standalone") + _args(tmp_path / "pp", data_cache, config, "--pp", "2", "--ep", str(EP),
                                                    "--micro-batches", str(M))).stderr
    assert f"PP 2 x DP 2, EP 2, 1f1b over {M} micro-batches" in err, err[-3000:]
    one_process(monkeypatch, _args(tmp_path / "one", data_cache, config, "--grad-accum", str(EP * M)))
    pp, one = _records(tmp_path / "pp"), _records(tmp_path / "one")
    check_steps(pp, one)  # each pair's shortcut MoE on its stage, its experts split over the stage's EP group
    # both replicas' micro-batches counted: per layer EP x M x batch x seq_len tokens x K picks
    picks = EP * M * BATCH * SEQ_LEN * MODEL["n_activated_experts"]
    assert all(sum(x) == picks for r in pp.values() for x in r["expert_load"])

