"""MTP speculative decoding for DeepSeek-V4 in the serving engine (``flyer.serve.speculation``: the MTP block's
window in a pool of slots at the main slot ids; rejected drafts rolled back by a copy of the rows' main slots and a
re-feed of their kept tokens): each request's greedy tokens under continuous batching (prompts of different
lengths, late joiners, 7-token prefill chunks, 1 and 2 drafts) equal ``generate`` on its prompt alone; a module
trained a few steps gets drafts accepted, and rejects others (the rollback runs); with the restore skipped (the
mutation) the tokens differ; slots and blocks all come back; the MTP pool's slots are taken from
``kv_cache_bytes``; prefix sharing is on (tested in ``tests/test_serve_v4_share_spec.py``). Tiny-v4 (window 8,
ratios 0 / 4 / 16 / 4, CSA top-4) with its MTP module, FP32, CPU.

Tolerance: exact token equality, as ``tests/test_v4_speculative.py`` and ``tests/test_serve_v4.py`` ask: the
verify pass and the batched paged path compute the same sums as plain decoding alone in other orders
(``v4_tolerance`` bounds those), a greedy token differs only where two logits lie within that bound, which random
FP32 weights make improbable; the mutation's outputs differ by far more than one near-tie."""

import pytest
import torch

from flyer.infer.generate import GenerationConfig, generate
from flyer.infer.hybrid_cache import HybridCache
from flyer.serve.engine import Engine, EngineConfig, SamplingOptions
from flyer.serve.paged_hybrid import make_mtp_hybrid_cache
from tests.test_v4_speculative import PATTERN, pattern_trained

BS = 16  # the least block size the ratios 4 and 16 divide


@pytest.fixture(scope="module")
def trained_v4():
    """A tiny-v4 trained 4 AdamW steps on a repeating sequence (``tests/test_v4_speculative.py``'s), so its module
    drafts the sequence's next tokens some of the time."""
    return pattern_trained()


def _random(n: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# (prompt, max_tokens): the pattern (drafts mostly kept) and random tokens (mostly rejected), prompts under a
# window, across CSA (4) and HCA (16) boundaries and past a block; decoding crosses entries and blocks
PROMPTS = [((PATTERN * 4)[:13], 24), ((PATTERN * 4)[3:32], 20), (_random(9, 1), 18), ((PATTERN * 4)[:3], 26),
           (_random(21, 2), 15), ((PATTERN * 4)[5:45], 17)]


@pytest.fixture(scope="module")
def alone(trained_v4):
    return [generate(trained_v4, [p], GenerationConfig(max_new_tokens=n, cache_dtype=torch.float32)).tokens[0]
            for p, n in PROMPTS]


def _slot_bytes(model) -> int:
    """A request's main slot and MTP slot, from the pools' own tensors."""
    probe = HybridCache.paged(model.cfg, 1, 1, BS, torch.float32, "meta")
    return probe.window_bytes() + make_mtp_hybrid_cache(model.cfg, 1, torch.float32, "meta").window_bytes()


def _engine(model, K: int, blocks: int = 40, batch: int = 3, **over) -> Engine:
    probe = HybridCache.paged(model.cfg, 1, 1, BS, torch.float32, "meta")
    eng = Engine(model, EngineConfig(kv_cache_bytes=batch * _slot_bytes(model) + blocks * probe.block_bytes(),
                                     block_size=BS, max_batch_size=batch, cache_dtype=torch.float32,
                                     speculative="mtp", draft_tokens=K, **over))
    assert eng.alloc.n_blocks == blocks  # the MTP slots' bytes are taken before the blocks
    return eng


def _serve(eng: Engine, late_after: int = 4, late_from: int = 4) -> list[list[int]]:
    """Each request's tokens; those from ``late_from`` on are submitted after ``late_after`` steps."""
    outs = [[] for _ in PROMPTS]
    for i, (p, n) in enumerate(PROMPTS):
        if i == late_from:
            for _ in range(late_after):
                eng.step()
        eng.submit(p, SamplingOptions(max_tokens=n), lambda e, i=i: outs[i].append(e.token))
    eng.run_until_idle()
    return outs


@pytest.mark.parametrize("K", [1, 2])
def test_concurrent_speculation_equals_generate_alone(trained_v4, alone, K):
    """Three slots for six requests (the rest wait and join as others finish), two submitted after 4 steps."""
    eng = _engine(trained_v4, K, prefill_chunk=7)
    assert eng.sharing and eng.snapshots.mtp is eng.mtp_cache  # snapshots keep the MTP slots too
    rejected, fed = [0], _count_refed(eng)
    accept = eng.speculator.accept

    def counting(r, hv, logits, q, drafts, p):
        new = accept(r, hv, logits, q, drafts, p)
        rejected[0] += len(new) - 1 < len(drafts)
        return new
    eng.speculator.accept = counting
    got = _serve(eng)
    print(f"K={K}: accepted {eng.accepted} of {eng.drafted} drafts ({eng.accepted / eng.drafted:.2f}); "
          f"{rejected[0]} verifications rejected a draft, {fed[0]} rows rolled back")
    assert got == alone
    assert eng.accepted > 0 and rejected[0] > 0
    # K = 1: a rejected last draft needs no rollback (``MtpSpeculator.roll_back``); K = 2: earlier ones do
    assert (fed[0] > 0) == (K > 1)
    assert eng.alloc.used == 0 and eng.alloc.available == eng.alloc.capacity and eng.slots.available == 3


def _count_refed(eng: Engine) -> list[int]:
    """A one-item list counting the rows ``eng``'s speculator re-feeds (its rollbacks)."""
    fed, roll_back = [0], eng.speculator.roll_back

    def counting(rows, kept, drafts):
        fed[0] += sum(m < len(d) for m, d in zip(kept, drafts))
        roll_back(rows, kept, drafts)
    eng.speculator.roll_back = counting
    return fed


def test_skipping_the_rollback_changes_the_tokens(trained_v4, alone, monkeypatch):
    """The mutation (K = 2, where rollbacks happen): rejected drafts' keys and compressor states left in the rows'
    slots, the chained draft's key in the MTP window (measured: 35 tokens differ)."""
    monkeypatch.setattr(HybridCache, "restore_slots", lambda self, saved, slots, rows=None: None)
    got = _serve(_engine(trained_v4, 2, prefill_chunk=7))
    assert got != alone
    assert sum(a != b for t, w in zip(got, alone) for a, b in zip(t, w)) > 10  # far off, not one near-tie


def test_preemption_under_speculation(trained_v4, alone):
    """A pool of 6 usable blocks: requests preempted (slots and blocks given back) and recomputed, the drafts'
    blocks reserved too; every request still makes its alone tokens."""
    eng = _engine(trained_v4, 2, blocks=7, prefill_chunk=32)
    got = _serve(eng, late_after=0)
    assert eng.metrics.preemptions._value.get() > 0
    assert got == alone
    assert eng.alloc.available == eng.alloc.capacity == 6 and eng.slots.available == 3
