"""Prefix sharing under MTP speculation for DeepSeek-V4 in the serving engine: a snapshot at a block boundary P
(``flyer.serve.paged_hybrid.BoundarySnapshots``) holds the request's MTP slot and the main hidden streams of
position P - 1 beside its main slot, and a request resuming from it writes the MTP entry of P - 1 with token P.
Requests sharing a 32-token system prompt (block 16; one resumes one token past the boundary and drafts at once,
one takes a snapshot left one token before its leaver's last token), 2 drafts a step:

- greedy tokens with sharing on equal those with it off and plain greedy ``generate`` alone (a sequence and a
  burst), with a positive hit rate;
- greedy tokens do not depend on the drafts, so each request's drafts and accepted counts are compared too (equal
  with sharing on and off), and each decode step's first-draft MTP logits (within the tolerance of sharing off's);
  a snapshot without its MTP slot or without the hidden streams of P - 1 (the mutations) puts those logits far
  outside it, and an untrained model (whose drafts follow its MTP keys closely) then drafts other tokens;
- seeded sampling gives the same text with sharing on and off (and other text under a mutation);
- preemption and snapshot eviction under a small pool keep every request's tokens.

Tiny-v4 (window 8, ratios 0 / 4 / 16 / 4, CSA top-4) trained a few steps so that its MTP module's drafts are kept
some of the time (``tests/test_v4_speculative.py``), FP32, CPU.

Tolerance: tokens and drafts exactly, as ``tests/test_serve_v4_speculative.py`` and ``tests/test_serve_v4_prefix.py``
ask: sharing on and off compute the same sums (main model and MTP block) in other chunks, so a greedy token or
draft (an argmax) differs only where two logits lie within that difference, and a sampled one only where a uniform
draw lands within it of a bucket's edge, which random FP32 weights make improbable. The draft logits: ``rel`` (max
error over max logit) within ``v4_tolerance`` of the main model and the MTP block as one more layer (measured:
2e-7, the tolerance 6e-4); the mutations' are above 10 times it (measured: 8e-3 to 0.9)."""

from collections import defaultdict
from dataclasses import replace

import pytest
import torch

from flyer.infer.generate import GenerationConfig, generate
from flyer.infer.hybrid_cache import HybridCache
from flyer.model.transformer import Transformer
from flyer.serve.engine import Engine, EngineConfig, SamplingOptions
from flyer.serve.paged_hybrid import BoundarySnapshots, make_mtp_hybrid_cache
from tests.test_deepseek_v4 import v4_tolerance
from tests.test_qwen3 import rel
from tests.test_v4_speculative import PATTERN, _config, pattern_trained

BS, K = 16, 2  # the least block size the ratios divide; 2 drafts a step (rejections roll back)
SEQ = PATTERN * 5


def _random(n: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


SYSTEM = SEQ[:32]  # two blocks
# (prompt, max_tokens), one after another: the first (33 tokens) leaves a snapshot at 32, one token before its
# last (its MTP ring then lacks the entry of 31); the second resumes there and continues the pattern (drafts
# mostly kept); the third resumes and decodes at once (its first draft writes the entry of 31); the fourth leaves
# one at 48 too; the last repeats the second. Every prompt ends within the MTP window (8) of 32 or 48, so the
# drafts read the snapshot's MTP keys.
PROMPTS = [(SYSTEM + _random(1, 1), 12), (SYSTEM + SEQ[32:35], 14), (SYSTEM + _random(1, 2), 12),
           (SYSTEM + SEQ[32:50], 10), (SYSTEM + SEQ[32:35], 9)]
SHARED = [0, 32, 32, 32, 32]  # tokens each takes from the index, one after another


@pytest.fixture(scope="module")
def trained_v4():
    return pattern_trained()


@pytest.fixture(scope="module")
def alone(trained_v4):
    """Plain greedy (no speculation) on each prompt alone."""
    return [generate(trained_v4, [p], GenerationConfig(max_new_tokens=n, cache_dtype=torch.float32)).tokens[0]
            for p, n in PROMPTS]


def _slot_bytes(model) -> tuple[int, int]:
    """(a request's main slot and MTP slot, one block), from the pools' own tensors."""
    probe = HybridCache.paged(model.cfg, 1, 1, BS, torch.float32, "meta")
    return probe.window_bytes() + make_mtp_hybrid_cache(model.cfg, 1, torch.float32, "meta").window_bytes(), \
        probe.block_bytes()


def _engine(model, sharing: bool, blocks: int = 80, batch: int = 3) -> Engine:
    """16-token chunks either way: the prompts' chunks, and so the steps a request drafts at, are the same with
    sharing on and off (a prompt one past a boundary ends on a decode step that drafts)."""
    slot, block = _slot_bytes(model)
    eng = Engine(model, EngineConfig(kv_cache_bytes=batch * slot + blocks * block, block_size=BS,
                                     max_batch_size=batch, cache_dtype=torch.float32, speculative="mtp",
                                     draft_tokens=K, prefix_sharing=sharing, prefill_chunk=16))
    assert eng.alloc.n_blocks == blocks and eng.sharing == sharing
    return eng


def _record(eng: Engine) -> tuple[dict, dict]:
    """Per request id: each verification's (position of its pending token, drafts, drafts kept), and each decode
    step's MTP logits (V,) of its first draft (from the MTP output at its last position)."""
    log, first = defaultdict(list), defaultdict(list)
    accept, draft, mtp_logits = eng.speculator.accept, eng.speculator.draft, eng.dec.mtp_logits
    drafting = []  # the rows of the draft under way, until its first logits

    def recording(r, hv, logits, q, drafts, p):
        at = r.n_cached
        new = accept(r, hv, logits, q, drafts, p)
        log[r.id].append((at, tuple(drafts), len(new) - 1))
        return new

    def drafting_rows(rows, ks):
        drafting[:] = [list(rows)]
        return draft(rows, ks)

    def first_logits(h1):
        out = mtp_logits(h1)
        for r, row in zip(drafting.pop() if drafting else (), out):  # a step's first call: every drafting row
            first[r.id].append(row)
        return out
    eng.speculator.accept, eng.speculator.draft, eng.dec.mtp_logits = recording, drafting_rows, first_logits
    return log, first


def _run(eng: Engine, sequential: bool, **opts) -> tuple[list[list[int]], list]:
    """Each request's tokens and the requests; one after another or all submitted at once."""
    outs, reqs = [[] for _ in PROMPTS], []
    for i, (p, n) in enumerate(PROMPTS):
        o = SamplingOptions(max_tokens=n, **{k: v + i if k == "seed" else v for k, v in opts.items()})
        reqs.append(eng.submit(p, o, lambda e, i=i: outs[i].append(e.token)))
        if sequential:
            eng.run_until_idle()
    eng.run_until_idle()
    return outs, reqs


def _all_back(eng: Engine) -> None:
    """Nothing held once the requests are done; every block free once the cached ones are drained."""
    assert eng.alloc.used == 0 and eng.slots.available == eng.cfg.max_batch_size and not eng.snapshots.plans
    held = [eng.alloc.allocate() for _ in range(eng.alloc.capacity)]
    assert None not in held and not eng.snapshots.blocks_of and not eng.alloc.block_of
    eng.alloc.release(held)


def _drop_mtp_part(eng: Engine, monkeypatch) -> None:
    """Mutation: the resuming request's MTP slot is not loaded (it keeps its last occupant's ring)."""
    monkeypatch.setattr(eng.mtp_cache, "set_slot_bytes", lambda slot, state: None)


def _drop_hidden(eng: Engine, monkeypatch) -> None:
    """Mutation: the hidden streams of P - 1 not kept (zeros): the MTP entry of P - 1 is another key."""
    begin = BoundarySnapshots.begin

    def zeroed(self, slot, keys, plan):
        hidden = begin(self, slot, keys, plan)
        return None if hidden is None else torch.zeros_like(hidden)
    monkeypatch.setattr(eng.snapshots, "begin", zeroed.__get__(eng.snapshots))


MUTATIONS = {"no MTP slot": _drop_mtp_part, "no hidden streams of P - 1": _drop_hidden}


def test_a_snapshot_counts_its_mtp_part(trained_v4):
    """Blocks per snapshot: the main slot, the MTP slot and one position's hidden streams (N, D) FP32 (14 blocks
    here, 13 without speculation)."""
    cfg = trained_v4.cfg
    eng = _engine(trained_v4, True)
    main = HybridCache.paged(cfg, 1, 1, BS, torch.float32, "meta")
    parts = main.window_bytes() + eng.mtp_cache.window_bytes() + cfg.hc_mult * cfg.dim * 4
    assert eng.snapshots.size == -(-parts // main.block_bytes()) > -(-main.window_bytes() // main.block_bytes())


@pytest.fixture(scope="module")
def models(trained_v4):
    """The trained tiny-v4, whose drafts are often kept (and so confident that a wrong MTP key seldom changes
    one), and the same model untrained (seed 0), whose drafts are seldom kept and follow its MTP keys closely."""
    torch.manual_seed(0)
    return {"trained": trained_v4, "random": Transformer(_config()).eval()}


@pytest.fixture(scope="module")
def unshared(models):
    """Per model: tokens, draft records and first-draft logits with sharing off, one after another (a request's
    drafts do not depend on the order: its own states only)."""
    out = {}
    for name, model in models.items():
        eng = _engine(model, False)
        log, first = _record(eng)
        outs, _ = _run(eng, sequential=True)
        out[name] = outs, dict(log), dict(first)
    return out


def _tolerance(cfg) -> float:
    """``v4_tolerance`` of the main model and the MTP block (one more window-only layer of the same sums) over
    the longest request's positions."""
    T = max(len(p) + n for p, n in PROMPTS)
    return v4_tolerance(replace(cfg, n_layers=cfg.n_layers + 1, compress_ratios=(*cfg.compress_ratios, 0)), T)


def _logit_errors(first: dict, want: dict) -> dict[int, float]:
    """Per request, the largest ``rel`` of its first-draft logits against ``want``'s, step by step."""
    return {i: max(rel(a, b) for a, b in zip(first[i], want[i], strict=True)) for i in want}


@pytest.mark.parametrize("sequential", [True, False])
def test_sharing_under_speculation_keeps_tokens_and_drafts(models, alone, unshared, sequential):
    """Sharing on: the same greedy tokens as sharing off and as plain greedy alone, the same drafts and accepted
    counts request by request, and draft logits within the tolerance of sharing off's; the shared tokens are
    taken (a burst: its siblings wait for the first's system prompt snapshot), the drafts are kept some of the
    time and rejected others."""
    eng = _engine(models["trained"], True)
    log, first = _record(eng)
    outs, reqs = _run(eng, sequential)
    want = unshared["trained"]
    errs, tol = _logit_errors(first, want[2]), _tolerance(eng.model.cfg)
    print(f"sequential={sequential}: accepted {eng.accepted} of {eng.drafted} drafts, hit rate "
          f"{eng.prefix_hit_rate:.2f}, shared {[r.n_shared for r in reqs]}; draft logits' errors "
          f"{[f'{e:.1e}' for e in errs.values()]} (tolerance {tol:.1e})")
    assert outs == want[0] == alone
    assert dict(log) == want[1]
    assert max(errs.values()) <= tol
    assert eng.prefix_hit_rate > 0
    if sequential:
        assert [r.n_shared for r in reqs] == SHARED
    else:
        assert sum(r.n_shared > 0 for r in reqs) >= 3
    assert 0 < eng.accepted < eng.drafted
    _all_back(eng)


RESUMING_NEAR = [1, 2, 4]  # requests resuming at 32 that draft within the MTP window of it (the fourth: 50 tokens)


@pytest.mark.parametrize("model", ["trained", "random"])
@pytest.mark.parametrize("mutation", MUTATIONS)
def test_a_snapshot_without_its_mtp_part_changes_the_drafts(models, alone, unshared, monkeypatch, mutation, model):
    """The mutations: greedy tokens stay plain greedy's (speculation keeps them whatever the drafts), but the
    draft logits of the requests resuming near the boundary land far outside the tolerance of sharing off's
    (measured: 8e-3 to 8e-2, the tolerance 6e-4), and without the MTP slot the random model drafts other tokens
    (measured: 5 of its verifications). Without the hidden streams of P - 1 its drafts' tokens stay (a request
    drafts from its second token on, past that entry's first use); the seeded text below shows that mutation."""
    eng = _engine(models[model], True)
    MUTATIONS[mutation](eng, monkeypatch)
    log, first = _record(eng)
    outs, _ = _run(eng, sequential=True)
    want = unshared[model]
    errs, tol = _logit_errors(first, want[2]), _tolerance(eng.model.cfg)
    differ = sum(a != b for i in want[1] for a, b in zip(log[i], want[1][i], strict=True))
    print(f"{model}, {mutation}: draft logits' errors {[f'{e:.1e}' for e in errs.values()]} (tolerance "
          f"{tol:.1e}); {differ} verifications drafted otherwise")
    assert outs == want[0]
    assert errs[0] <= tol and log[0] == want[1][0]  # the first resumes from nothing
    assert min(errs[i] for i in RESUMING_NEAR) > 10 * tol
    if model == "random" and mutation == "no MTP slot":
        assert differ > 0


@pytest.mark.parametrize("model, mutation", [("trained", None), ("random", None),
                                             ("trained", "no hidden streams of P - 1")])
def test_seeded_sampling_repeats_with_sharing(models, monkeypatch, model, mutation):
    """Temperature 0.8, a seed per request: the same text with sharing on and off (drafts sampled from the MTP
    distribution and accepted by the seeded generator); under the mutation that changes a draft outright (the
    third request's first, from a wrong entry of 31), other text. (The MTP slot's mutation moves the draft
    distributions by a few percent, which these few draws do not show: the logits test above catches it.)"""
    want, _ = _run(_engine(models[model], False), sequential=True, temperature=0.8, seed=7)
    eng = _engine(models[model], True)
    if mutation:
        MUTATIONS[mutation](eng, monkeypatch)
    got, reqs = _run(eng, sequential=True, temperature=0.8, seed=7)
    assert [r.n_shared for r in reqs] == SHARED
    assert got[0] == want[0]
    assert (got == want) == (mutation is None)


def test_preemption_and_eviction_under_speculation(trained_v4):
    """A pool of 18 usable blocks (a snapshot takes 14) for three requests needing up to 9 each with their drafts:
    requests are preempted and recomputed, a snapshot is evicted for blocks, shared ones are still taken; every
    request makes plain greedy's tokens alone, and everything comes back."""
    # the three that run together first decode long enough to outgrow the pool; the two waiting for a slot need
    # not (their plain greedy references are the test's largest cost)
    prompts = [(p, n + 90 * (i < 3)) for i, (p, n) in enumerate(PROMPTS)]
    want = [generate(trained_v4, [p], GenerationConfig(max_new_tokens=n, cache_dtype=torch.float32)).tokens[0]
            for p, n in prompts]
    eng = _engine(trained_v4, True, blocks=19)
    evicted, on_evict = [0], eng.alloc.on_evict

    def counting(block, key):
        evicted[0] += block in eng.snapshots.key_of
        on_evict(block, key)
    eng.alloc.on_evict = counting
    outs = [[] for _ in prompts]
    for i, (p, n) in enumerate(prompts):
        eng.submit(p, SamplingOptions(max_tokens=n), lambda e, i=i: outs[i].append(e.token))
    eng.run_until_idle()
    print(f"preemptions {eng.metrics.preemptions._value.get()}, snapshots evicted {evicted[0]}, "
          f"shared blocks {eng.prefix_found}")
    assert outs == want
    assert eng.metrics.preemptions._value.get() > 0 and evicted[0] > 0 and eng.prefix_found > 0
    _all_back(eng)


@pytest.mark.parametrize("k", [1, 2])
def test_a_prompt_ending_at_a_wanted_boundary_on_a_plainly_decoded_token(k):
    """A prompt whose chunks leave its last token decodes it plainly (no drafts before a request's first token),
    and under MTP its last block is keyed only once its MTP entries are written: where that token ends the prompt
    at a boundary its plan holds (a sibling sharing the whole prompt wants it), the snapshot indexed the keys past
    their end (IndexError in the engine's step; found by a fuzz). The boundary passes without a snapshot; the
    tokens are sharing off's and every block comes back."""
    from flyer.config import preset
    from flyer.model.transformer import Transformer
    torch.manual_seed(0)
    model = Transformer(preset("tiny-v4", vocab_size=320, init_std=0.06, window_size=8, index_topk=4)).eval()
    a = torch.randint(3, 250, (48,), generator=torch.Generator().manual_seed(48)).tolist()  # 3 blocks of 16
    prompts = (a, a + [7])  # the second shares a's 3 blocks: a's plan gets boundary 3, its prompt's end

    def run(sharing: bool) -> list[list[int]]:
        eng = Engine(model, EngineConfig(kv_cache_bytes=64 << 20, block_size=16, max_batch_size=2, prefill_chunk=3,
                                         cache_dtype=torch.float32, speculative="mtp", draft_tokens=k,
                                         prefix_sharing=sharing))
        outs = [[], []]
        for out, p in zip(outs, prompts):  # chunks of 3 end at 16, 32 (boundaries), then 35 ... 47: one token left
            eng.submit(p, SamplingOptions(max_tokens=4), lambda e, out=out: out.append(e.token)
                       if e.token is not None else None)
        eng.run_until_idle()
        assert eng.alloc.used == 0
        return outs
    assert run(True) == run(False)
