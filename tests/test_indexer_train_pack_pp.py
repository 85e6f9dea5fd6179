"""DSA indexer training on chat rows under pipeline parallelism (``flyer train --indexer-train sparse --pp 2``,
with and without ``--pack``): a PP2 step (1F1B, DualPipeV) on ``tests.test_sft_pack_pp``'s 4 packed micro-batches
(6, 2, 4 and 3 conversations, unequal numbers of real queries) of ``tiny`` with V3.2's indexers (the MTP block's
too) gives the loss terms (indexer_loss: the mean over the DSA layers), the gradients (the indexers' and the main
model's) and the routing loads of one process with --pack and grad_accum M on them
(``test_sft_pack_pp.one_process``): each micro-batch's L_I, a mean over its real queries (an MTP query's within its
document), weighs its share of the step's real queries at its depth, as ``Trainer._local_step`` weighs it.
Unpacked: ``tests.test_sft_pp``'s padded chat micro-batches under 1F1B, the padding no query of L_I. And packed rows
of thirty 3-token documents beside rows of one 96-token document, whose MTP block has a third fewer queries than the
main layers in the first kind (2 of 3 per document) and about as many in the second: its L_I's shares are its own.

Tolerance: the references' ``reorder_bound``, as test_sft_pack_pp and test_sft_pp (the steps differ by 3e-5 of it).
Mutants: packed, every micro-batch's L_I weighted 1/M (the text path's weighting, for which the pipeline refused chat
data: 60x the tolerance off; 8x on the padded micro-batches, whose shares are nearer 1/M); unpacked, L_I averaged
over the padding's queries too (82x); short documents, the MTP block's L_I weighted by the main layers' shares (37x).
Asserted: the indexers' gradients over 30x the tolerance off.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from flyer.data.chat_data import IGNORE_INDEX
from flyer.data.chat_sampler import chat_rows
from flyer.parallel import pipeline
from tests import test_sft_pack_pp, test_sft_pp
from tests.test_sft import reorder_bound, row_grads
from tests.ranks import needs_split_backward, run_ranks
from tests.test_sft_pp import _state, _worst

chats = test_sft_pack_pp.chats  # the same fixture (module-scoped)
M = test_sft_pack_pp.M
DSA = "[model]\nindex_topk = 8\nindex_n_heads = 4\nindex_head_dim = 32\n"  # fewer keys than most documents have
TERMS = ("loss", "main_loss", "mtp_loss", "aux_loss", "indexer_loss")


def _trainer(chats: str, root: Path, rank: int, packed: bool = True, **kw):
    """``test_sft_pack_pp``'s trainer (``packed``; else ``test_sft_pp``'s) on ``tiny`` with DSA indexers,
    ``--indexer-train sparse``."""
    config = Path(chats).parent / f"dsa-rank{rank}.toml"  # each rank its own: a rank rewriting a shared one raced
    config.write_text(DSA)  # another reading it (truncated: tiny's defaults)
    make = test_sft_pack_pp._trainer if packed else test_sft_pp._trainer
    return make(chats, root, rank, config=str(config), indexer_train="sparse", **kw)


SHORT_T = 192  # the short documents' rows: their share of each row sets how far the mutants stray


def _short_documents(t) -> list[tuple[torch.Tensor, ...]]:
    """M packed micro-batches of B rows of width SHORT_T, alternately thirty 3-token documents and one 96-token
    document per row (random tokens, every target trained but a document's last), the rest padding."""
    B, T, V = test_sft_pack_pp.B, SHORT_T, t.cfg.vocab_size
    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(M):
        d = torch.full((B, T), -1)
        if i % 2 == 0:
            d[:, :90] = torch.arange(30).repeat_interleave(3)
        else:
            d[:, :96] = 0
        x = torch.randint(1, V, (B, T), generator=g).masked_fill(d < 0, -1)  # padding: PAD_ID
        y = torch.full((B, T), IGNORE_INDEX)
        y[:, :-1] = x[:, 1:]
        y[:, :-1][d[:, :-1] != d[:, 1:]] = IGNORE_INDEX  # a document's last token: no target (``packed_rows``)
        out.append((x, y.masked_fill(d < 0, IGNORE_INDEX), d))
    return out


KINDS = {"packed": (True, test_sft_pack_pp._batches),  # kind -> (packed, the step's micro-batches of a trainer)
         "padded": (False, lambda t: [chat_rows(t.data.train, r, test_sft_pp.T) for r in test_sft_pp.ROWS]),
         "short": (True, _short_documents)}


def _width(kind: str) -> dict:
    """The trainer's row width for ``kind``: SHORT_T for the short documents, else the chats' own."""
    return {"seq_len": SHORT_T} if kind == "short" else {}


def _one_process(chats: Path, kind: str) -> dict:
    """One process, grad_accum M on ``kind``'s micro-batches: the step's state, each row's own gradients, c."""
    packed, batches_of = KINDS[kind]
    t = _trainer(str(chats), chats.parent / f"one-dsa-{kind}", 0, packed, grad_accum=M, **_width(kind))
    batches = batches_of(t)
    t.sampler.next_batch = iter(batches).__next__
    out = {"step": _state(t, t._local_step())}
    out["rows"] = [g for batch in batches for g in row_grads(t.model, *batch)]
    x = batches[-1][0]
    out["c"] = reorder_bound(t.cfg, M * x.shape[0], x.shape[1])
    t.close()
    return out


@pytest.fixture(scope="module")
def references(chats):
    """``_one_process`` of each kind, when first asked for (``test_sft_pack_pp.one_process`` for "packed")."""
    cache = {}

    def get(kind: str) -> dict:
        if kind not in cache:
            cache[kind] = (test_sft_pack_pp.one_process(_trainer(str(chats), chats.parent / "one-dsa", 0, grad_accum=M))
                           if kind == "packed" else _one_process(chats, kind))
        return cache[kind]
    return get


def _no_mask(model, valid_BT):
    """Mutant ``real_queries``: L_I over every query, padding's too."""
    return contextlib.nullcontext()


_QUERY_WEIGHT = pipeline.Stage._query_weight
# name -> (the kind of micro-batches it runs on, object, attribute, replacement)
MUTANTS = {"per_micro_batch": ("packed", pipeline.Stage, "_query_weight", lambda self, valid_BT, documents_BT, k: 1.0),
           "padding_queries": ("padded", pipeline, "real_queries", _no_mask),
           "main_shares": ("short", pipeline.Stage, "_query_weight",
                           lambda self, valid_BT, documents_BT, k: _QUERY_WEIGHT(self, valid_BT, documents_BT, 0))}


def _rank(rank: int, chats: str, schedule: str, kind: str) -> dict:
    """Rank ``rank`` of PP2 (``schedule``): one ``_pipeline_step`` on ``kind``'s micro-batches, then one under each of
    its ``MUTANTS``."""
    packed, batches_of = KINDS[kind]
    t = _trainer(chats, Path(chats).parent / f"pp-dsa-{schedule}-{kind}", rank, packed, **_width(kind), pp=2,
                 pp_schedule=schedule, micro_batches=M)
    t.sampler.next_batch = iter(batches_of(t) * 2).__next__
    out = {"step": _state(t, t._pipeline_step())}
    for name, (on, obj, attr, fn) in MUTANTS.items():
        if on != kind:
            continue
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(obj, attr, fn)
            out[name] = _state(t, t._pipeline_step())
    t.close()
    t.mesh.destroy()
    return out


@pytest.mark.parametrize("schedule,kind", [("1f1b", "packed"), ("1f1b", "padded"), ("1f1b", "short"),
                                           pytest.param("dualpipev", "packed", marks=needs_split_backward)])
def test_pp_chat_indexer_step_equals_one_process(chats, references, schedule, kind):
    """Every loss term, the gradients (the indexers' among them) and the loads of PP2 with --indexer-train sparse on
    chat rows (packed, padded, short documents) equal one process's; the mutants are over 30x the tolerance off."""
    ranks = run_ranks(_rank, 2, str(chats), schedule, kind)
    reference = references(kind)
    ref, c = reference["step"], reference["c"]
    assert ref["terms"]["indexer_loss"] > 0 and any(".indexer." in n for n in ref["grads"])
    assert set(ranks[0]["step"]["grads"]) | set(ranks[1]["step"]["grads"]) == set(ref["grads"])
    for r in ranks:
        for k in TERMS:
            assert abs(r["step"]["terms"][k] - ref["terms"][k]) <= c * ref["terms"][k], k
        assert _worst(r["step"]["grads"], ref["grads"], reference["rows"]) <= c
        assert all(torch.equal(v, ref["counts"][n]) for n, v in r["step"]["counts"].items())
    for name in MUTANTS:
        if name in ranks[0]:
            indexers = {n: g for r in ranks for n, g in r[name]["grads"].items() if ".indexer." in n}
            assert indexers and _worst(indexers, ref["grads"], reference["rows"]) > 30 * c, name
