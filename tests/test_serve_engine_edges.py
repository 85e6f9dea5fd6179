"""Edges of the serving engine (``flyer.serve.engine``) and its block pool (``flyer.serve.paged``) a mutation sweep
found unpinned (each assertion fails on the mutant it names): the gauges and the generated-token counter, the batch
bound, which request is preempted and where it waits, cached tokens under MTP speculation, a prompt-logprobs
request beside a shared prefix, seeded sampling through a preemption under MTP, and a key two blocks computed."""

import pytest
import torch
from test_serve_engine import _engine, _progression
from trained import counting_model

from flyer.config import preset
from flyer.infer.prefix_cache import chain_keys
from flyer.model.transformer import Transformer
from flyer.serve.engine import SamplingOptions
from flyer.serve.paged import BlockAllocator

V = 64


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=V)).eval()


def _gauge(eng, name):
    return getattr(eng.metrics, name)._value.get()


def test_gauges_and_the_token_counter(model):
    """One row at a time, three requests: after a step one runs and two wait; at the end no block is in use (the
    prompts' blocks kept for reuse count as free), used + free is the pool, and every token emitted is counted."""
    eng = _engine(model, blocks=64, max_batch_size=1)
    for i in range(3):
        eng.submit(_progression(i + 1, 1, 9), SamplingOptions(max_tokens=3), lambda e: None)
    eng.step()
    assert (_gauge(eng, "running"), _gauge(eng, "waiting")) == (1, 2)
    eng.run_until_idle()
    assert eng.alloc.lru  # cached blocks, unreferenced
    assert (_gauge(eng, "blocks_used"), _gauge(eng, "blocks_free")) == (0, eng.alloc.capacity)
    assert _gauge(eng, "generation_tokens") == 9


def test_the_batch_holds_at_most_max_batch_size(model):
    eng = _engine(model, blocks=64, max_batch_size=2)
    for i in range(4):
        eng.submit(_progression(i + 1, 1, 5), SamplingOptions(max_tokens=2), lambda e: None)
    assert eng.admit() == 2


def test_the_latest_request_is_preempted_and_waits_first(model):
    """Blocks run out: the request admitted last gives its blocks back and goes to the head of the queue, before a
    request submitted after it."""
    eng = _engine(model, blocks=12, prefill_chunk=8, max_batch_size=2)
    a = eng.submit(_progression(1, 1, 4), SamplingOptions(max_tokens=30), lambda e: None)
    while len(a.blocks) < 3:
        eng.step()
    b = eng.submit(_progression(2, 3, 20), SamplingOptions(max_tokens=10), lambda e: None)
    c = eng.submit(_progression(5, 1, 4), SamplingOptions(max_tokens=2), lambda e: None)
    names, preempted, admitted, running = {a.id: "a", b.id: "b", c.id: "c"}, [], [], set()
    real = eng._preempt

    def spy(r):
        preempted.append(names[r.id])
        real(r)
    eng._preempt = spy
    while eng.busy:
        eng.step()
        now = {names[r.id] for r in eng.running}
        admitted += sorted(now - running)
        running = now
    assert preempted[:1] == ["b"] and admitted[:4] == ["a", "b", "b", "c"]


def test_cached_tokens_under_mtp_speculation(model):
    """The same 13-token prompt twice: the second reuses its 3 whole blocks before the last token, 12 tokens."""
    eng = _engine(model, speculative="mtp")
    told = []
    for _ in range(2):
        eng.submit(_progression(3, 2, 13), SamplingOptions(max_tokens=2), lambda e: told.append(e.cached_tokens))
        eng.run_until_idle()
    assert told == [0, None, 12, None]


def test_a_prompt_logprobs_request_scores_its_whole_prompt(model):
    """Its prompt's blocks cached by an earlier request: it computes them anyway, scoring every position."""
    eng = _engine(model)
    p = _progression(3, 2, 13)
    eng.submit(p, SamplingOptions(max_tokens=2), lambda e: None)
    eng.run_until_idle()
    ev = []
    eng.submit(p, SamplingOptions(max_tokens=2, logprobs=0, prompt_logprobs=True), ev.append)
    eng.run_until_idle()
    assert len(ev[0].prompt_logprobs) == len(p) and ev[0].cached_tokens == 0


def test_seeded_sampling_through_a_preemption_under_mtp():
    """A seeded request preempted after it has generated (recomputed: its last token fed as a decoding row) draws
    what it draws never preempted, under MTP speculation too."""
    trained = counting_model(V)

    def run(blocks, **spec):
        eng = _engine(trained, blocks=blocks, prefill_chunk=8, **spec)
        outs = [[], []]
        a = eng.submit(_progression(1, 1, 4), SamplingOptions(max_tokens=26, temperature=1.0, seed=5),
                       lambda e: outs[0].append(e.token))
        while len(a.blocks) < 3:
            eng.step()
        eng.submit(_progression(2, 3, 24), SamplingOptions(max_tokens=10, temperature=1.0, seed=7),
                   lambda e: outs[1].append(e.token))
        eng.run_until_idle()
        return outs, _gauge(eng, "preemptions")

    for blocks, spec in ((12, {}), (17, {"speculative": "mtp"})):
        free, none = run(64, **spec)
        tight, some = run(blocks, **spec)
        assert none == 0 < some and tight == free, spec


def test_a_key_two_blocks_computed_is_one_blocks():
    """Two requests computed the same block (one asked prompt logprobs, so shared nothing): the key stays the
    first's, and evicting both leaves the pool whole."""
    alloc = BlockAllocator(4, 2)
    k = chain_keys([1, 2], 2)[0]
    a, b = alloc.allocate(), alloc.allocate()
    assert alloc.register(a, k) and not alloc.register(b, k)
    alloc.release([a])
    alloc.release([b])
    assert sorted(alloc.allocate() for _ in range(3)) == [1, 2, 3] and alloc.available == 0


@pytest.mark.parametrize("name", ["tiny", "tiny-v4"])
def test_a_seeded_request_under_mtp_writes_the_same_text_whatever_its_prefill_chunks(name):
    """Under MTP speculation a prompt whose prefill chunks left one token decoded it with drafts, so its first token
    was drawn by acceptance after the drafts' draws, where a prefill to the prompt's end samples it: a seeded
    request's text hung on its chunks, and so on the requests beside it (a burst's prefill budget) and, for V4, on
    prefix sharing (its prefill ends at a snapshot's boundary). No drafts before a request's first token (found by
    a fuzz)."""
    from flyer.serve.engine import Engine, EngineConfig
    torch.manual_seed(0)
    model = Transformer(preset(name, vocab_size=320, init_std=0.06,
                               **(dict(window_size=8, index_topk=4) if name == "tiny-v4" else {}))).eval()
    prompt = torch.randint(3, 250, (33,), generator=torch.Generator().manual_seed(33)).tolist()

    def text(chunk: int, sharing: bool = False, beside: tuple[int, ...] = ()) -> list[int]:
        eng = Engine(model, EngineConfig(kv_cache_bytes=64 << 20, block_size=16, max_batch_size=4, prefill_chunk=chunk,
                                         cache_dtype=torch.float32, speculative="mtp", draft_tokens=2,
                                         prefix_sharing=sharing))
        out = []
        for n in beside:
            eng.submit(torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(n)).tolist(),
                       SamplingOptions(max_tokens=8), lambda e: None)
        eng.submit(prompt, SamplingOptions(max_tokens=8, temperature=0.9, top_p=0.95, seed=1000),
                   lambda e: out.append(e.token) if e.token is not None else None)
        eng.run_until_idle()
        return out
    whole = text(64)
    assert text(16) == text(32) == text(32, beside=(30, 7)) == text(64, sharing=True) == whole
