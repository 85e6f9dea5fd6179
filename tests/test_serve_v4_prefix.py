"""Prefix sharing for DeepSeek-V4 in the serving engine (``flyer.serve.paged_hybrid.BoundarySnapshots``): requests
sharing a system prompt take its blocks and the slot snapshot at their end, and each request's greedy tokens still
equal ``generate`` on its prompt alone (block sizes 16 and 32, prompts ending on and off a block boundary,
sequential and concurrent, under preemption); the prompt tokens computed drop by the shared blocks; a copied
snapshot continues bit for bit as a fresh prefill with the same chunks; no snapshot copy, or another block's,
changes the outputs; blocks, slots and snapshots all come back. Tiny random model (``tests/hf_models.py``: window 8,
ratios 0 / 4 / 16 / 4, CSA top-4), FP32, CPU.

Tokens are compared exactly, as ``tests/test_serve_v4.py`` does (the batched paged path and the alone path differ
only by FP32 summation order); where the chunks and batch are the same the logprobs are compared exactly too."""

import pytest
import torch
from hf_models import VOCAB, build

from flyer.infer import GenerationConfig, generate
from flyer.infer.hybrid_cache import HybridCache
from flyer.interop.hf import load_hf
from flyer.serve.engine import Engine, EngineConfig, SamplingOptions
from flyer.serve.paged_hybrid import BoundarySnapshots


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    path = tmp_path_factory.mktemp("v4")
    build("v4", path)
    model, cfg, _ = load_hf(path)
    assert (cfg.window_size, cfg.compress_ratios) == (8, (0, 4, 16, 4))
    return model.eval(), cfg


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _engine(model, bs: int, blocks: int, batch: int = 3, **over) -> Engine:
    """An engine whose pool holds ``batch`` slots and ``blocks`` blocks (the null block included), FP32."""
    probe = HybridCache.paged(model.cfg, 1, 1, bs, torch.float32, "meta")
    eng = Engine(model, EngineConfig(kv_cache_bytes=batch * probe.window_bytes() + blocks * probe.block_bytes(),
                                     block_size=bs, max_batch_size=batch, cache_dtype=torch.float32, **over))
    assert eng.alloc.n_blocks == blocks and eng.snapshots is not None
    return eng


SYSTEM = _prompt(40, 100)  # the common head: 2 full blocks of 16, 1 of 32
# the system prompt then a user part: 64 tokens (ends on a block boundary), 49 (one past it), 53 (off it), 33 (the
# system prompt's first 32 and one: its last full block is the system prompt's), the first again (a repeat)
PROMPTS = [(SYSTEM + _prompt(24, 1), 10), (SYSTEM + _prompt(9, 2), 12), (SYSTEM + _prompt(13, 3), 8),
           (SYSTEM[:32] + _prompt(1, 4), 14)]
PROMPTS.append(PROMPTS[0])
# each request's tokens taken from the index when they run one after another (block counts of the match that have
# a snapshot): block 16: the first leaves one at 48 (its last full block), the second one at 32 (where its match
# ended) and at 48, the others take 32 and the repeat 48; block 32: the first leaves one at 32, all take it
SHARED = {16: [0, 0, 32, 32, 48], 32: [0, 32, 32, 32, 32]}


@pytest.fixture(scope="module")
def alone(v4):
    model, _ = v4
    return [generate(model, [p], GenerationConfig(max_new_tokens=n, cache_dtype=torch.float32)).tokens[0]
            for p, n in PROMPTS]


def _count_fed(eng: Engine) -> list[int]:
    """A one-item list that counts the real tokens ``eng`` feeds the model (prompt chunks and decode tokens)."""
    fed, forward = [0], eng.dec.forward_groups

    def counting(groups):
        fed[0] += sum(g.tokens.numel() if g.lengths is None else sum(g.lengths) for g in groups)
        return forward(groups)
    eng.dec.forward_groups = counting
    return fed


def _run(eng: Engine, prompts, sequential: bool, logprobs: int | None = None) -> list[list]:
    """Each request's events' (token, logprob, top logprobs); one after another or all submitted at once."""
    outs = [[] for _ in prompts]
    for i, (p, n) in enumerate(prompts):
        eng.submit(p, SamplingOptions(max_tokens=n, logprobs=logprobs),
                   lambda e, i=i: outs[i].append((e.token, e.logprob, e.top_logprobs)))
        if sequential:
            eng.run_until_idle()
    eng.run_until_idle()
    return outs


def _tokens(outs) -> list[list[int]]:
    return [[t for t, _, _ in o] for o in outs]


def _all_back(eng: Engine) -> None:
    """Nothing is held once the requests are done, and draining the pool (every block allocated) evicts every
    cached block and snapshot; then all blocks are free."""
    snaps, alloc = eng.snapshots, eng.alloc
    assert alloc.used == 0 and eng.metrics.blocks_used._value.get() == 0
    assert eng.slots.available == eng.cfg.max_batch_size and not snaps.plans
    assert all(b in alloc.lru for held in snaps.blocks_of.values() for b in held)  # cached, counted as available
    held = [alloc.allocate() for _ in range(alloc.capacity)]
    assert None not in held and alloc.allocate() is None
    assert not snaps.blocks_of and not snaps.key_of and not alloc.block_of and not alloc.lru
    alloc.release(held)
    assert len(alloc.free) == alloc.capacity


@pytest.mark.parametrize("bs", [16, 32])
def test_sequential_requests_share_the_system_prompt(v4, alone, bs):
    """One after another: each request computes its prompt past its shared tokens (``SHARED``) only, and makes its
    alone tokens; the hit rate counts the blocks taken of the full blocks before each prompt's last token."""
    model, _ = v4
    eng = _engine(model, bs, blocks=64, prefill_chunk=16)
    fed = _count_fed(eng)
    reqs = []
    submit = eng.submit
    eng.submit = lambda *a, **k: reqs.append(submit(*a, **k)) or reqs[-1]
    assert _tokens(_run(eng, PROMPTS, sequential=True)) == alone
    assert [r.n_shared for r in reqs] == SHARED[bs]
    assert fed[0] == sum(len(p) - s + n - 1 for (p, n), s in zip(PROMPTS, SHARED[bs]))
    limits = [(len(p) - 1) // bs for p, _ in PROMPTS]
    assert eng.prefix_hit_rate == sum(SHARED[bs]) / bs / sum(limits) > 0
    assert eng.metrics.prefix_hit_rate._value.get() == eng.prefix_hit_rate
    _all_back(eng)


@pytest.mark.parametrize("bs", [16, 32])
def test_concurrent_requests_share_and_equal_alone(v4, alone, bs):
    """All submitted at once, three slots, 16-token chunks: requests wait for a sibling's blocks and snapshot,
    then share them; fewer prompt tokens are computed than the prompts hold."""
    model, _ = v4
    eng = _engine(model, bs, blocks=64, prefill_chunk=16)
    fed = _count_fed(eng)
    assert _tokens(_run(eng, PROMPTS, sequential=False)) == alone
    assert eng.prefix_hit_rate > 0
    assert fed[0] - sum(n - 1 for _, n in PROMPTS) < sum(len(p) for p, _ in PROMPTS)
    _all_back(eng)


@pytest.mark.parametrize("wanted", [True, False])
def test_a_burst_takes_the_system_prompt_snapshot_its_first_request_leaves(v4, alone, monkeypatch, wanted):
    """Two requests submitted at once, block 16: the second waits while the first prefills their 2 common blocks,
    and the first leaves a snapshot where they end (``want``), though that is neither its fork nor its last full
    block: the second takes 32 tokens. Without ``want`` (the mutant) the wait buys nothing: it shares none."""
    model, _ = v4
    if not wanted:
        monkeypatch.setattr(BoundarySnapshots, "want", lambda self, slot, boundary: None)
    eng = _engine(model, 16, blocks=64, prefill_chunk=64)
    reqs, submit = [], eng.submit
    eng.submit = lambda *a, **k: reqs.append(submit(*a, **k)) or reqs[-1]
    assert _tokens(_run(eng, PROMPTS[:2], sequential=False)) == alone[:2]
    assert [r.n_shared for r in reqs] == ([0, 32] if wanted else [0, 0])
    _all_back(eng)


def _fork_then(eng: Engine, first, then) -> list:
    """``first`` run alone (it leaves a snapshot at 32), then ``then`` with its logprobs."""
    _run(eng, [first], sequential=True)
    return _run(eng, [then], sequential=True, logprobs=5)[0]


FIRST = (SYSTEM[:32] + _prompt(1, 5), 3)  # its last full block ends the system prompt's 32 tokens
THEN = (SYSTEM[:32] + _prompt(20, 6), 12)


def test_a_copied_snapshot_continues_as_a_fresh_prefill_bit_for_bit(v4):
    """Block 16, 32-token chunks: the second request takes 2 blocks and the first's snapshot at 32 and prefills
    [32, 48) and [48, 52); alone in a fresh engine it prefills [0, 32) then the same chunks. Same chunks, same
    batch: the same logprobs, exactly."""
    model, _ = v4
    shared = _engine(model, 16, blocks=64, prefill_chunk=32)
    got = _fork_then(shared, FIRST, THEN)
    assert shared.prefix_found == 2
    fresh = _engine(model, 16, blocks=64, prefill_chunk=32)
    want = _run(fresh, [THEN], sequential=True, logprobs=5)[0]
    assert fresh.prefix_found == 0
    assert got == want


@pytest.mark.parametrize("mutation", ["no copy", "another block's snapshot"])
def test_a_wrong_or_missing_snapshot_changes_the_outputs(v4, monkeypatch, mutation):
    """The mutation checks of the equalities above: the slot keeping the last request's state (no copy), or the
    snapshot after another block (the first request's last full block, 48) make other outputs."""
    model, _ = v4
    first = (SYSTEM + _prompt(9, 7), 3)  # leaves snapshots at 48 (its last full block) only
    fork = (SYSTEM[:32] + _prompt(1, 5), 3)  # matches 2 blocks, none with a snapshot: leaves one at 32
    fresh = _engine(model, 16, blocks=64, prefill_chunk=32)
    want = _run(fresh, [THEN], sequential=True, logprobs=5)[0]
    if mutation == "no copy":
        monkeypatch.setattr(HybridCache, "load_slot", lambda self, slot, blocks: None)
    else:
        begin = BoundarySnapshots.begin

        def other(self, slot, keys, plan):  # the same blocks, another boundary's snapshot
            if keys:
                wrong = next(k for k in self.blocks_of if k != keys[-1])
                self.blocks_of[keys[-1]], self.blocks_of[wrong] = self.blocks_of[wrong], self.blocks_of[keys[-1]]
            begin(self, slot, keys, plan)
        monkeypatch.setattr(BoundarySnapshots, "begin", other)
    eng = _engine(model, 16, blocks=64, prefill_chunk=32)
    _run(eng, [first, fork], sequential=True)
    assert len(eng.snapshots.blocks_of) == 2
    got = _run(eng, [THEN], sequential=True, logprobs=5)[0]
    assert eng.prefix_found == 2
    assert _tokens([got]) != _tokens([want])


def test_preemption_and_cancellation_under_a_small_pool(v4, alone):
    """Block 32 (a snapshot: 7 blocks), a pool of 13 usable blocks for three requests needing 5 to 6 each: requests are
    preempted (slot, plan and blocks given back) and recomputed, snapshots are evicted for blocks, shared ones
    are still taken; each request still makes its alone tokens, and everything comes back. A request cancelled while
    it prefills towards a boundary leaves no plan."""
    model, _ = v4
    eng = _engine(model, 32, blocks=14, prefill_chunk=64)
    # the three that run together first decode long enough to need more blocks; the two waiting for a slot need
    # not (their alone references are the test's largest cost)
    prompts = [(p, n + 100 * (i < 3)) for i, (p, n) in enumerate(PROMPTS)]
    want = [generate(model, [p], GenerationConfig(max_new_tokens=n, cache_dtype=torch.float32)).tokens[0]
            for p, n in prompts]
    assert _tokens(_run(eng, prompts, sequential=False)) == want
    assert eng.metrics.preemptions._value.get() > 0 and eng.prefix_found > 0
    _all_back(eng)
    events = []
    eng = _engine(model, 32, blocks=14, prefill_chunk=16)
    r = eng.submit(SYSTEM + _prompt(30, 8), SamplingOptions(max_tokens=4), events.append)
    eng.step()
    assert eng.snapshots.plans == {r.slot: {2}} and r.n_cached == 16
    eng.cancel(r)
    eng.step()
    assert events[-1].finish_reason == "cancelled" and not eng.busy
    _all_back(eng)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_a_dropped_snapshots_blocks_serve_as_fresh_ones(dtype):
    """A snapshot lies in pool blocks as raw bytes (a slot's FP32 rings, ``HybridCache.save_slot``): dropped, its
    blocks went to requests with those bytes, which in a BF16 or FP8 pool read as entries holding NaNs and
    infinities. A request batched beside a longer one reads its blocks' entries as far as the other's, those it has
    not completed at probability 0, and 0 x NaN is NaN: its logits turned NaN and greedy wrote token 0 on (found by
    a fuzz). The blocks are zeroed when the snapshot goes: every entry in the pool decodes finite, and such pairs of
    requests, in the pool's blocks in turn, write what they write in a fresh engine."""
    from flyer.config import preset
    from flyer.infer import hybrid_fp8
    from flyer.model.transformer import Transformer
    torch.manual_seed(0)
    model = Transformer(preset("tiny-v4", vocab_size=320, init_std=0.06, window_size=8, index_topk=4)).eval()
    probe = HybridCache.paged(model.cfg, 1, 1, 16, dtype, "meta")

    def engine(blocks: int) -> Engine:
        return Engine(model, EngineConfig(kv_cache_bytes=2 * probe.window_bytes() + blocks * probe.block_bytes(),
                                          block_size=16, max_batch_size=2, cache_dtype=dtype, prefill_chunk=64))
    size = engine(64).snapshots.size
    eng, greedy = engine(size + 6), SamplingOptions(max_tokens=4)
    eng.submit(_prompt(33, 7), greedy, lambda e: None)  # leaves a snapshot at 32
    eng.run_until_idle()
    held = next(iter(eng.snapshots.blocks_of.values()))
    taken = [eng.alloc.allocate() for _ in range(eng.alloc.available)]
    assert not eng.snapshots.blocks_of and set(held) <= set(taken)  # evicted, its blocks handed out
    cfg = model.cfg
    for state in eng.cache.layers:
        if "entries" in state:
            stored = state["entries"]
            values = hybrid_fp8.unpack_rows(stored, cfg.head_dim, cfg.rope_dim, torch.float32) if dtype != \
                torch.bfloat16 else stored
            assert torch.isfinite(values).all()
    eng.alloc.release(taken)

    def tokens(e: Engine) -> list[list[int]]:
        """A long and a short request in one batch: the short one reads its block's entries as far as the long
        one's, masked past its own."""
        outs = [[], []]
        for out, n in zip(outs, (45, 3)):
            e.submit(_prompt(n, n), greedy, lambda ev, out=out: out.append(ev.token) if ev.token is not None else None)
        e.run_until_idle()
        return outs
    fresh = tokens(engine(size + 6))
    assert [tokens(eng) for _ in taken[::4]] == [fresh] * len(taken[::4])  # the blocks taken in turn
