"""Chat data with an MTP model under expert parallelism (``flyer train --data chats.jsonl --ep 2 --grad-accum 2``):
each EP rank is a data-parallel replica of the dense part with rows of its own, so every micro-batch on every rank
trains a different number of next-token and MTP targets. ``Trainer._local_step`` weighs each micro-batch's mean
losses by its share of the job's targets (``flyer.train.batches.counts``, averaged over the replicas), so one EP 2
step gives the loss terms and gradients of one process on all the rows in one micro-batch (where every share is
1). ``tiny`` preset (MLA, MoE, MTP depth 1), FP32, CPU, gloo."""

import os
from pathlib import Path

import pytest

from flyer.config import resolve_config
from flyer.data.chat_data import IGNORE_INDEX
from flyer.data.chat_sampler import chat_rows
from flyer.train.config import TrainConfig
from flyer.train.trainer import Trainer
from tests import test_sft
from tests.ranks import run_ranks
from tests.test_sft import reorder_bound

hf = test_sft.hf  # a tiny DeepSeek-V3 directory (its tokenizer.json) and chats.jsonl
T = 128  # no conversation cut (53 to 85 tokens)
# [rank][micro-batch]: conversations whose assistant targets (next-token and MTP alike: position 0's target is
# never an assistant token) are 4+11, 20+23 on rank 0 and 17+19, 10+8 on rank 1: shares 15/56, 43/56, 36/56, 18/56
MICRO = [[[0, 3], [4, 7]], [[1, 6], [9, 15]]]


def _ep_mtp_step(rank: int, hf_dir: str, chats: str) -> dict:
    """One ``_local_step`` of ``tiny``: rank ``rank`` of 2 expert-parallel ranks accumulating its two micro-batches
    of ``MICRO`` (rows trimmed as the sampler trims them), or one process (no torchrun) on all 8 rows in one
    micro-batch, which also gives each row's own gradients (the scale of the terms). The sums, every gradient (an EP
    rank's expert stacks: its slice of the experts), the EP rank and each micro-batch's MTP target count."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro = MICRO[rank] if world > 1 else [[c for r in MICRO for m in r for c in m]]
    root = Path(chats).parent / f"ep-mtp{world}"
    tc = TrainConfig(preset="tiny", tokenizer=f"{hf_dir}/tokenizer.json", data=chats, data_cache=str(root / "cache"),
                     out=str(root / f"run{rank}"), seq_len=T, batch_size=len(micro[0]), grad_accum=len(micro),
                     precision="fp32", device="cpu", threads=1, plots=False, progress=False, ep=world,
                     collective_timeout_s=120)
    t = Trainer(tc, log=lambda m: None)
    batches = [chat_rows(t.data.train, m, T, trim=t.sampler.trim) for m in micro]
    t.sampler.next_batch = iter(batches).__next__
    sums = t._local_step()
    out = {"sums": sums, "grads": {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None},
           "ep_rank": t.mesh.ep_rank, "mtp_targets": [int((y[:, 1:] != IGNORE_INDEX).sum()) for _, y in batches]}
    if world == 1:
        (x, y), = batches
        out["rows"] = test_sft.row_grads(t.model, x, y)
    t.close()
    t.mesh.destroy()
    return out


@pytest.mark.slow  # two gloo ranks, as its neighbours in test_sft.py and test_sft_pack.py (about 10 s)
def test_ep2_chat_mtp_shares_equal_one_process(hf):
    """--ep 2 --grad-accum 2 on chat rows with unequal target counts per micro-batch and per rank: the loss, its
    next-token, MTP and balance terms and every gradient (replicated parameters', and each rank's slice of the
    expert stacks) equal one process's on all the rows in one micro-batch, within ``reorder_bound`` (relative to
    the loss; a gradient's, to the sum of the rows' own gradient norms; measured: under 1e-3 of it). Weighing the MTP
    loss by 1/grad_accum instead of its share misses it (the MTP module's gradients by about 80x, its loss by 5x),
    as do MTP shares of the replica's own targets (not the job's: 7x) or counting the MTP targets' padding (50x)."""
    path, _, chats = hf
    ranks = run_ranks(_ep_mtp_step, 2, str(path), str(chats))
    whole = _ep_mtp_step(0, str(path), str(chats))
    assert [r["mtp_targets"] for r in ranks] == [[17, 47], [39, 20]] and whole["mtp_targets"] == [123]
    assert sorted(r["ep_rank"] for r in ranks) == [0, 1]
    c = reorder_bound(resolve_config("tiny", None, {}), 8, T)
    for k in ("loss", "main_loss", "mtp_loss", "aux_loss"):
        assert ranks[0]["sums"][k] == ranks[1]["sums"][k], k  # the job's, on every rank
        assert abs(ranks[0]["sums"][k] - whole["sums"][k]) <= c * abs(whole["sums"][k]), (k, ranks[0]["sums"][k],
                                                                                            whole["sums"][k], c)
    assert whole["sums"]["mtp_loss"] > 0
    for r in ranks:
        assert set(r["grads"]) == set(whole["grads"])
        for n, g in whole["grads"].items():
            if ".experts.w" in n:  # this rank's experts: a contiguous slice of the stack
                E = r["grads"][n].shape[0]
                g = g[r["ep_rank"] * E:(r["ep_rank"] + 1) * E]
            scale = sum(float(row[n].norm()) for row in whole["rows"] if n in row) + 1e-30
            err = float((r["grads"][n] - g).norm())
            assert err <= c * scale, (n, err / scale, c)
    assert any(n.startswith("mtp.") and ".experts.w" in n for n in whole["grads"])  # the MTP block's experts too
