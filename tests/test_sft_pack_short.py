"""Packed rows holding documents too short for the MTP module (a 1-token document: MTP depth 1 has no position in
it): a packed training step gives each MoE layer's balance loss (the MTP block's too), the step's balance loss and
its gradients of the same documents in padded rows of their own (``tiny``: MLA, MoE layers 1-3, one MTP module).
Alone, a row without an MTP position adds 0 to the MTP block's mean over the rows; packed, the block's mean is over
the micro-batch's documents likewise (``flyer.model.moe.sequence_balance_loss``'s ``n_segments``), so the share
the trainer weighs it by (its documents: ``flyer.train.batches.sequences``) is that mean's count. Mutant: the
mean over the documents with an MTP position only, the MTP block's loss 5/3 of the unpacked one's. Under --pp 2
(1F1B, each packed row a micro-batch: 3 and 2 documents, each micro-batch's balance loss weighted by its share,
``Stage._balance_weight``) the step's balance loss and gradients are the unpacked step's too; the mutant moves the
balance loss far off.

Tolerance: ``tests.test_sft.reorder_bound`` (the same sums in another order), relative to the loss; a gradient's to
the sum of the rows' own gradient norms."""

from pathlib import Path

import pytest
import torch

from flyer.model import moe
from flyer.model.moe import moe_layers
from tests import test_sft
from tests.ranks import run_ranks
from tests.test_sft import reorder_bound
from tests.test_sft_pack import IGNORE_INDEX, _step, _trainer
from tests.test_sft_pp import _state, _worst, write_chats
from tests.test_sft_pp import _trainer as pp_trainer

hf = test_sft.hf  # a tiny DeepSeek-V3 directory with a chat template, and chats.jsonl
W = 32
LENGTHS = [[1, 12, 1], [20, 5]]  # two packed rows; the 1-token documents have no MTP position


def _batches(V: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, torch.Tensor]]:
    """(packed (x, y, documents) (2, W), unpacked (x, y) (5, W)): every next token in a document trained."""
    g = torch.Generator().manual_seed(5)
    docs = [torch.randint(1, V, (n,), generator=g) for row in LENGTHS for n in row]
    x, y, d = torch.full((2, W), -1), torch.full((2, W), IGNORE_INDEX), torch.full((2, W), -1)
    xu, yu = torch.full((len(docs), W), -1), torch.full((len(docs), W), IGNORE_INDEX)
    i = 0
    for b, row in enumerate(LENGTHS):
        o = 0
        for j, n in enumerate(row):
            c = docs[i]
            x[b, o:o + n], d[b, o:o + n], y[b, o:o + n - 1] = c, j, c[1:]
            xu[i, :n], yu[i, :n - 1] = c, c[1:]
            o, i = o + n, i + 1
    return (x, y, d), (xu, yu)


def _used_only(scores, topk, cfg, valid=None, segments=None, n_segments=None):
    """Mutant: the packed balance loss a mean over the documents with a position here (the MTP block's too)."""
    return _sequence_balance_loss(scores, topk, cfg, valid, segments)


_sequence_balance_loss = moe.sequence_balance_loss


def _rows(t, plain_b) -> list[dict]:
    """Each unpacked row's own gradients (the scale of the terms a gradient entry sums; a 1-token row's left out,
    which compute_loss cannot run without an MTP position: a smaller scale, a tighter bound)."""
    out = []
    for b in range(len(plain_b[0])):
        n = int((plain_b[0][b] >= 0).sum())
        if n < 2:
            continue
        t.model.compute_loss(plain_b[0][b:b + 1, :n], plain_b[1][b:b + 1, :n]).loss.backward()
        out.append({k: p.grad.clone() for k, p in t.model.named_parameters() if p.grad is not None})
        t.model.zero_grad(set_to_none=True)
    return out


def test_short_documents_balance_as_rows_of_their_own(hf, tmp_path, monkeypatch):
    packed_t = _trainer(hf, tmp_path / "p", batch_size=2, pack=True, seq_len=W)
    plain_t = _trainer(hf, tmp_path / "u", batch_size=5, seq_len=W)
    cfg = packed_t.cfg
    assert cfg.mtp_depth == 1 and cfg.seq_aux_alpha > 0 and len(moe_layers(packed_t.model)) == 4
    packed_b, plain_b = _batches(cfg.vocab_size)
    packed, plain = _step(packed_t, packed_b), _step(plain_t, plain_b)
    c = reorder_bound(cfg, 5, W)
    assert len(packed[3]) == len(plain[3]) == 4  # the main model's 3 MoE layers, then the MTP block's
    for a, b in zip(packed[3], plain[3]):
        assert abs(a - b) <= c * b, (packed[3], plain[3])
    for k in ("loss", "aux_loss"):
        assert abs(packed[0][k] - plain[0][k]) <= c * plain[0][k], k
    worst = _worst(packed[1], plain[1], _rows(plain_t, plain_b))
    assert worst <= c, (worst, c)
    monkeypatch.setattr(moe, "sequence_balance_loss", _used_only)
    mutant = _step(packed_t, packed_b)
    assert abs(mutant[3][-1] / plain[3][-1] - 5 / 3) <= 10 * c and mutant[3][:3] == packed[3][:3]


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    return write_chats(tmp_path_factory.mktemp("sft-pack-short"))


def _pp_rank(rank: int, chats: str) -> dict:
    """Rank ``rank`` of PP2 1F1B over the packed rows, one micro-batch each; then the step again under the mutant."""
    t = pp_trainer(chats, Path(chats).parent / "pp", rank, seq_len=W, batch_size=1, eval_batches=1, pack=True, pp=2,
                   pp_schedule="1f1b", micro_batches=2)
    (x, y, d), _ = _batches(t.cfg.vocab_size)
    t.sampler.next_batch = iter([(x[:1], y[:1], d[:1]), (x[1:], y[1:], d[1:])] * 2).__next__
    out = {"step": _state(t, t._pipeline_step())}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(moe, "sequence_balance_loss", _used_only)
        out["mutant"] = _state(t, t._pipeline_step())
    t.close()
    t.mesh.destroy()
    return out


def test_pp_short_documents_balance_as_rows_of_their_own(chats, tmp_path):
    one = pp_trainer(str(chats), tmp_path, 0, seq_len=W, batch_size=5, eval_batches=1)
    _, plain_b = _batches(one.cfg.vocab_size)
    sums, grads, _, _ = _step(one, plain_b)
    rows, c = _rows(one, plain_b), reorder_bound(one.cfg, 5, W)
    one.close()
    for r in run_ranks(_pp_rank, 2, str(chats)):
        terms = r["step"]["terms"]
        for k in ("loss", "aux_loss"):  # summed over the stages
            assert abs(terms[k] - sums[k]) <= c * sums[k], (k, terms[k], sums[k])
        assert _worst(r["step"]["grads"], grads, rows) <= c
        assert abs(r["mutant"]["terms"]["aux_loss"] - sums["aux_loss"]) > 100 * c * sums["aux_loss"]
