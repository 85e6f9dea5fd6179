"""Serving engine: paged attention == the contiguous cache (FP32 bound), and each request's greedy
tokens under continuous batching, chunked prefill, prefix sharing and preemption == ``generate``
on its prompt alone; seeded sampling, cancellation, admission limits."""

import contextlib
import math
import os
import subprocess
import sys
import time

import pytest
import torch
from bounds import mla_attention_bound
from child_env import ROOT, child_env
from trained import counting_model

from flyer import kernels
from flyer.config import preset
from flyer.errors import FieldError
from flyer.infer import GenerationConfig, generate
from flyer.infer.generate import open_prefix_cache
from flyer.infer.attention import Rows, causal_slot_mask, dense_prefill_pays, mla_absorbed_cached, mla_absorbed_core
from flyer.infer.cache import LatentCache
from flyer.infer.decoder import Decoder
from flyer.infer.prefix_cache import chain_keys
from flyer.infer.sampling import adjust_logits, prompt_seen
from flyer.infer.weights import hold_weights
from flyer.model.transformer import Transformer
from flyer.serve.disk_tier import open_disk_prefix_cache
from flyer.serve.engine import Engine, EngineConfig, QueueFull, SamplingOptions
from flyer.serve.paged import BlockAllocator, make_paged_cache

V = 64


@pytest.fixture(scope="module")
def trained():
    return counting_model(V)


def _engine(model, blocks=64, block_size=4, **over) -> Engine:
    bpt = LatentCache(model.cfg.n_layers, 1, 1, model.cfg.kv_lora_rank, model.cfg.qk_rope_head_dim,
                      torch.float32, "meta").bytes_per_token() if model.cfg.attn == "mla" else \
        2 * model.cfg.n_layers * model.cfg.n_kv_heads * model.cfg.head_dim * 4
    cfg = EngineConfig(kv_cache_bytes=blocks * block_size * bpt, block_size=block_size, cache_dtype=torch.float32,
                       **over)
    return Engine(model, cfg)


def _run(eng: Engine, prompts, opts: SamplingOptions | list[SamplingOptions]) -> list[list[int]]:
    outs = [[] for _ in prompts]
    opts = opts if isinstance(opts, list) else [opts] * len(prompts)
    for i, (p, o) in enumerate(zip(prompts, opts)):
        eng.submit(p, o, lambda e, i=i: outs[i].append(e.token))
    eng.run_until_idle()
    return outs


def _alone(model, prompts, max_new):
    return [generate(model, [p], GenerationConfig(max_new_tokens=max_new, cache_dtype=torch.float32)).tokens[0]
            for p in prompts]


def _progression(start, step, n):
    return [(start + step * i) % V for i in range(n)]


def test_paged_attention_equals_contiguous_cache_within_fp32_bound():
    """The same latents in a contiguous cache and scattered over shuffled blocks: both reads give
    attention outputs within the FP32 bound of the exact sums."""
    model = Transformer(preset("tiny")).eval()
    attn = model.layers[0].attn
    B, S, T, bs = 2, 37, 5, 4
    C, R = attn.kv_lora_rank, attn.qk_rope_head_dim
    kv = torch.randn(B, S, C + R)
    contiguous = LatentCache(1, B, S, C, R, torch.float32)
    paged = make_paged_cache(model.cfg, 1, 1 + 2 * 10, bs, torch.float32)
    paged.tables = torch.randperm(20).add(1).view(B, 10)  # shuffled blocks, 10 per row
    pos = torch.arange(S).expand(B, S)
    for cache in (contiguous, paged):
        cache.write(0, pos, latent=kv[..., :C], rope_key=kv[..., C:])
    q_nope, q_rope = torch.randn(B, T, attn.n_heads, attn.qk_nope_head_dim), torch.randn(B, T, attn.n_heads, R)
    mask = causal_slot_mask(torch.arange(S - T, S).expand(B, T), S)
    exact, bound = mla_attention_bound(attn, q_nope, q_rope, kv, mask)
    rows = Rows(torch.arange(S - T, S).expand(B, T), None, None, S, mask)
    for cache in (contiguous, paged):
        got = mla_absorbed_core(attn, q_nope, q_rope, cache.read_packed(0, S, torch.float32), mask)
        assert ((got.double() - exact).abs() <= bound).all()
        for on in (True, False):  # read in place by the fused kernel; gathered for the eager core
            with contextlib.nullcontext() if on else kernels.disabled():
                got = mla_absorbed_cached(attn, q_nope, q_rope, cache, 0, rows)
            assert ((got.double() - exact).abs() <= bound).all()
    assert torch.equal(paged.read_packed(0, S, torch.float32), kv)  # the gather itself is exact


def test_greedy_equals_generate_alone_under_concurrency(trained):
    # shared prefixes (prefix sharing), long and short prompts (chunked prefill), a small pool
    # (preemption) and a small batch (admission waits)
    head = _progression(3, 2, 13)
    prompts = [head + _progression(5, 3, n) for n in (3, 17, 1, 9)] + [_progression(7, 1, n) for n in (1, 30, 6)]
    ref = _alone(trained, prompts, 12)
    for blocks, batch, chunk in ((64, 8, 64), (14, 5, 8), (64, 2, 3)):
        eng = _engine(trained, blocks=blocks, max_batch_size=batch, prefill_chunk=chunk)
        assert _run(eng, prompts, SamplingOptions(max_tokens=12)) == ref, (blocks, batch, chunk)
        assert eng.alloc.used == 0  # every block released
    assert eng.metrics.preemptions._value.get() == 0
    small = _engine(trained, blocks=14, max_batch_size=5, prefill_chunk=8)
    _run(small, prompts, SamplingOptions(max_tokens=12))
    assert small.metrics.preemptions._value.get() > 0
    assert small.alloc.hit_rate > 0


def test_a_failure_while_admitting_ends_that_request_too(trained, monkeypatch):
    """A step that fails while a request is being admitted (its blocks partly taken) ends it with "error" with the
    others (``safe_step``), each request heard once, and every block comes back."""
    eng = _engine(trained)
    heard = [[] for _ in range(3)]
    for i in range(3):
        eng.submit(_progression(1 + i, 2, 9), SamplingOptions(max_tokens=4), heard[i].append)
    allocate, calls = eng.alloc.allocate, []

    def failing():
        calls.append(1)
        if len(calls) == 5:  # the second request's second block (3 blocks a prompt)
            raise RuntimeError("injected")
        return allocate()
    monkeypatch.setattr(eng.alloc, "allocate", failing)
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):  # its traceback
        eng.safe_step()
    assert [[e.finish_reason for e in h] for h in heard] == [["error"]] * 3
    assert not eng.busy and eng.alloc.used == 0


def test_a_request_preempted_while_it_prefills_counts_its_prompt_once(trained):
    """In the prompt tokens and in the prefix hit rate (prompts with nothing in common: 0, though the readmitted
    request finds its own blocks again), as in usage's cached_tokens."""
    eng = _engine(trained, blocks=12, prefill_chunk=8)  # 11 blocks besides the null block
    a = eng.submit(_progression(1, 1, 4), SamplingOptions(max_tokens=36), lambda e: None)
    while len(a.blocks) < 3:
        eng.step()
    eng.submit(_progression(2, 3, 32), SamplingOptions(max_tokens=2), lambda e: None)
    eng.run_until_idle()
    assert eng.metrics.preemptions._value.get() > 0
    assert eng.metrics.prompt_tokens._value.get() == 4 + 32
    assert eng.prefix_blocks == (4 - 1) // 4 + (32 - 1) // 4 and eng.prefix_hit_rate == 0


@pytest.mark.parametrize("held", [torch.bfloat16, torch.float8_e4m3fn])
def test_greedy_with_held_weights_equals_generate_alone(trained, held):
    """Weights held in BF16 or FP8 (flyer.infer.weights), FP32 compute: the same contract, with MTP
    drafts too (the MTP module's weights held alike)."""
    model = Transformer(trained.cfg).eval()
    model.load_state_dict(trained.state_dict())
    hold_weights(model, held)
    prompts = [_progression(3, 2, n) for n in (2, 11, 5, 19)]
    ref = _alone(model, prompts, 10)
    assert _run(_engine(model, prefill_chunk=8), prompts, SamplingOptions(max_tokens=10)) == ref
    spec = _engine(model, prefill_chunk=8, speculative="mtp", draft_tokens=2)
    assert _run(spec, prompts, SamplingOptions(max_tokens=10)) == ref and spec.accepted > 0


def test_gqa_model_pages_its_kv(trained):
    torch.manual_seed(1)
    model = Transformer(preset("tiny", vocab_size=V, attn="gqa", n_kv_heads=2, head_dim=32)).eval()
    prompts = [_progression(1, 1, n) for n in (2, 11, 23)]
    eng = _engine(model, blocks=20, prefill_chunk=8)
    ref = _alone(model, prompts, 8)
    assert _run(eng, prompts, SamplingOptions(max_tokens=8)) == ref
    spec = _engine(model, blocks=40, prefill_chunk=8, speculative="mtp")  # its MTP cache pages K/V, shifted a slot
    assert _one_by_one(spec, prompts[::-1], 8)[0] == ref[::-1] and spec.alloc.hits == 2  # the 11-token prompt


def test_requests_with_a_common_prompt_prefill_it_once(trained):
    """Copies of a prompt (OpenAI's n) and a burst with a common header, submitted together: the first
    prefills the blocks they share, the others wait for them and take them from the prefix index
    rather than computing them again; greedy tokens still equal generate alone."""
    p = _progression(3, 2, 41)  # 10 blocks of 4 before its last token
    prompts = [p, p, p, p[:28] + _progression(9, 1, 6)]  # the last shares 7 blocks
    eng = _engine(trained, prefill_chunk=16)  # the first prompt takes 3 steps
    assert _run(eng, prompts, SamplingOptions(max_tokens=6)) == _alone(trained, prompts, 6)
    assert eng.alloc.hits == 10 + 10 + 7 and eng.alloc.used == 0
    assert eng.prefix_hit_rate == (10 + 10 + 7) / (3 * 10 + 8)  # of every prompt's blocks, not up to a miss


def test_max_tokens_0_prefills_the_prompt_and_ends_without_a_token(trained):
    """``max_tokens=0`` (echo's scoring): the prompt is prefilled, scored when asked and cached, and the request ends
    "length" with no token, also on a whole-prompt prefix hit and under MTP speculation; a later request reuses its
    blocks."""
    p = _progression(3, 2, 13)  # 3 full blocks of 4
    for over in ({}, {"speculative": "mtp"}):
        eng = _engine(trained, prefill_chunk=8, **over)
        for scored in (True, False, False):  # the third: every block of the prompt in the prefix index
            events = []
            eng.submit(p, SamplingOptions(max_tokens=0, logprobs=0 if scored else None, prompt_logprobs=scored),
                       events.append)
            eng.run_until_idle()
            assert [(e.token, e.finish_reason) for e in events] == [(None, "length")]
            assert (len(events[0].prompt_logprobs) == len(p)) if scored else events[0].prompt_logprobs is None
        assert eng.alloc.used == 0 and eng.alloc.hits == 2 * 3
        assert _run(eng, [p], SamplingOptions(max_tokens=4)) == _alone(trained, [p], 4)
        assert eng.alloc.hits == 3 * 3


def test_a_burst_is_prefilled_in_fewer_steps(trained):
    eng = _engine(trained, prefill_chunk=4)
    for start in (1, 2, 3):  # nothing in common (a common prompt is prefilled once: the test above)
        eng.submit(_progression(start, 1, 9), SamplingOptions(max_tokens=2), lambda e: None)
    eng.admit()
    assert eng.prefill_budget() == 12  # three prompts wait, none decodes: a chunk for each
    steps = 0
    while any(r.generated == 0 for r in eng.running):
        eng.step()
        steps += 1
    assert steps == 4  # budgets 12, 8 (two wait, one decodes), 4, 4: not seven steps of 4 tokens
    assert eng.prefill_budget() == 4


def test_requests_join_at_the_next_step_and_prefill_is_chunked(trained):
    eng = _engine(trained, prefill_chunk=4)
    a, b = [], []
    eng.submit(_progression(1, 1, 3), SamplingOptions(max_tokens=20), lambda e: a.append(e.token))
    for _ in range(3):
        eng.step()
    assert len(a) >= 2
    eng.submit(_progression(2, 1, 17), SamplingOptions(max_tokens=2), lambda e: b.append(e.token))
    n = len(a)
    passes, real = [], eng.dec.forward_groups
    eng.dec.forward_groups = lambda groups: passes.append([g.tokens.shape for g in groups]) or real(groups)
    eng.step()
    assert len(eng.running) == 2 and len(a) == n + 1  # b joined; a still decoded this step
    assert passes == [[(1, 1), (1, 4)]]  # a's token and b's first chunk in one pass over the model
    for _ in range(3):  # b's 17-token prompt takes 5 chunks of 4: a gets a token every step meanwhile
        eng.step()
        assert not b
    assert len(a) == n + 4
    eng.run_until_idle()
    assert len(b) == 2 and len(a) == 20


@pytest.mark.parametrize("speculative,drafts", [(None, 1), ("mtp", 1), ("mtp", 3)])
def test_a_prompt_at_the_end_of_the_context_prefills_beside_a_longer_chunk(trained, speculative, drafts):
    """A prompt's last chunk, a few tokens before the end of the context, shares a step with a new
    prompt's longer chunk: its padding runs past the context (the step raised, and every request
    ended in an error, before padding positions were clamped). Then it decodes to the last
    position of the context, drafting no further. Greedy tokens == alone."""
    ctx = trained.cfg.max_seq_len
    long, short = _progression(3, 1, ctx - 6), _progression(5, 3, 40)
    eng = _engine(trained, blocks=2 * ctx // 16, block_size=16, prefill_chunk=100, speculative=speculative,
                  draft_tokens=drafts)
    outs = [[], []]
    eng.submit(long, SamplingOptions(max_tokens=6), lambda e: outs[0].append(e.token))
    while not eng.running or len(long) - eng.running[0].n_cached > 30:
        eng.step()
    eng.submit(short, SamplingOptions(max_tokens=4), lambda e: outs[1].append(e.token))
    eng.step()  # the long prompt's last 18 tokens (from position ctx - 24) and the short one's 40
    assert [r.n_cached for r in eng.running] == [ctx - 6, 40]
    eng.run_until_idle()
    assert outs == [_alone(trained, [long], 6)[0], _alone(trained, [short], 4)[0]]


def test_seeded_sampling_is_reproducible_in_any_batch(trained):
    p = _progression(4, 3, 9)
    opts = SamplingOptions(max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    alone = _run(_engine(trained), [p], opts)[0]
    mixed = _run(_engine(trained, prefill_chunk=4), [_progression(1, 1, 20), p, p[:3]],
                 [SamplingOptions(max_tokens=5), opts, SamplingOptions(max_tokens=7, temperature=0.5)])
    assert mixed[1] == alone
    assert _run(_engine(trained), [p], SamplingOptions(max_tokens=10, temperature=1.0, seed=8))[0] != alone


def test_adjust_logits_is_openais_definition():
    logits = torch.zeros(5)
    adjust_logits(logits, [1, 1, 2], ((0, 1.5), (3, -100.0)), frequency=0.5, presence=0.25)
    assert logits.tolist() == [1.5, -1.25, -0.75, -100.0, 0.0]  # 1: 2 x 0.5 + 0.25; 2: 0.5 + 0.25


def test_repetition_penalty_is_transformers_over_the_prompt_and_the_output():
    """vLLM's repetition penalty is transformers' ``RepetitionPenaltyLogitsProcessor`` over the prompt and the
    output (positive logits divided, negative multiplied), after the bias and before the OpenAI penalties; the
    prompt as its ids or its mask."""
    from transformers import RepetitionPenaltyLogitsProcessor  # heavy: only here

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, generator=g)
    prompt, out = [3, 5, 5, 9], [9, 12, 3, 30]
    for penalty in (1.3, 0.7):
        want = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prompt + out]), logits.clone()[None])[0]
        got = adjust_logits(logits.clone(), out, repetition=penalty, prompt=prompt)
        seen = prompt_seen(prompt, 40)  # a request's prompt as its mask, built once
        assert torch.equal(got, want) and torch.equal(adjust_logits(logits.clone(), out, (), 0, 0, penalty, seen), want)
        assert torch.equal(seen, prompt_seen(prompt, 40))  # left as it was
    got = adjust_logits(logits.clone(), out, ((9, 2.0),), presence=0.5, repetition=1.3, prompt=prompt)
    assert got[9] == (logits[9] + 2.0) / 1.3 - 0.5 and torch.equal(adjust_logits(logits.clone(), out), logits)


def test_a_repetition_penalty_near_zero_fails_no_request(trained):
    """A repetition penalty that overflows a seen token's logit (1e-300: 0 in FP32; 1e-39: subnormal) makes that
    token the sampler's certain choice, not a NaN distribution that failed the step and every request in it: the
    request beside it decodes what it decodes alone; greedy logprobs stay finite."""
    p = _progression(7, 1, 6)
    alone = _run(_engine(trained), [p], SamplingOptions(max_tokens=8))[0]
    for penalty in (1e-300, 1e-39):
        eng, events = _engine(trained), [[], [], []]
        opts = [SamplingOptions(max_tokens=8), SamplingOptions(max_tokens=4, temperature=1.0, seed=0,
                                                               repetition_penalty=penalty),
                SamplingOptions(max_tokens=4, logprobs=2, repetition_penalty=penalty)]
        for i, o in enumerate(opts):
            eng.submit(p, o, events[i].append)
        eng.run_until_idle()
        assert [e.token for e in events[0]] == alone and events[0][-1].finish_reason == "length"
        assert [e.finish_reason for e in events[1] + events[2]].count("length") == 2
        assert all(math.isfinite(e.logprob) for e in events[2])
        assert events[1][0].token in p and events[2][0].token in p  # a seen token's logit, overflowed: the choice


def test_logit_bias_and_penalties_in_any_batch_and_with_drafts(trained):
    """Each request's greedy tokens under logit_bias and frequency / presence penalties are the argmax of
    its adjusted logits from a full forward over its tokens so far (the oracle), in one batch with
    requests without them, plain and verifying MTP drafts (the row after drafts d[:j] counts them)."""
    p = _progression(7, 1, 6)
    over = [dict(logit_bias=((40, 8.0),)), dict(logit_bias=((40, 8.0),), presence_penalty=2.0),
            dict(logit_bias=((40, 8.0),), frequency_penalty=1.0), dict(logit_bias=((13, -100.0),)),
            dict(logit_bias=((40, 8.0),), repetition_penalty=3.0), {}]
    opts = [SamplingOptions(max_tokens=10, **o) for o in over]
    outs = _run(_engine(trained), [p] * len(opts), opts)
    # every option changes the tokens; the penalties end the repeats (the counting model is the same on every CPU)
    assert len({tuple(o) for o in outs}) == 6 and outs[0][4:] == [40] * 6
    with torch.no_grad():
        for o, out in zip(opts, outs):
            for k, y in enumerate(out):
                logits = trained(torch.tensor([p + out[:k]]))[0, -1]
                adjust_logits(logits, out[:k], o.logit_bias, o.frequency_penalty, o.presence_penalty,
                              o.repetition_penalty, p)
                assert y == int(logits.argmax()), (o, k)
    for k in (1, 2):
        eng = _engine(trained, speculative="mtp", draft_tokens=k)
        assert _run(eng, [p] * len(opts), opts) == outs and eng.accepted > 0
    eng = _engine(trained)
    for o, match in ((dict(frequency_penalty=2.5), "frequency_penalty"), (dict(logit_bias=((V, 1.0),)), "token ids"),
                     (dict(logit_bias=((0, 101.0),)), "values must be")):
        with pytest.raises(FieldError, match=match):
            eng.submit(p, SamplingOptions(**o), lambda e: None)


def test_generate_applies_logit_bias_and_penalties_as_the_engine_does(trained):
    """``flyer generate``'s adjustments (``GenerationConfig``'s logit_bias and penalties): the engine's
    tokens for the same prompt and options, batched with another prompt, plain and with MTP drafts."""
    p, q = _progression(7, 1, 6), _progression(3, 2, 9)
    over = [dict(logit_bias=((40, 8.0),), presence_penalty=2.0), dict(logit_bias=((40, 8.0),), frequency_penalty=1.0),
            dict(logit_bias=((13, -100.0), (40, 3.0)), presence_penalty=-0.5)]
    for o in over:
        want = _run(_engine(trained), [p, q], SamplingOptions(max_tokens=10, **o))
        for spec in ({}, dict(speculative="mtp", draft_tokens=2)):
            gen = GenerationConfig(max_new_tokens=10, cache_dtype=torch.float32, **o, **spec)
            assert generate(trained, [p, q], gen).tokens == want, (o, spec)
    with pytest.raises(FieldError, match="token ids must be in"):
        generate(trained, [p], GenerationConfig(logit_bias=((V, 1.0),)))
    with pytest.raises(FieldError, match="presence_penalty: must be in"):
        GenerationConfig(presence_penalty=-2.5).validate()


def test_cancel_frees_blocks_and_stop_tokens_end_a_request(trained):
    eng = _engine(trained)
    got = []
    req = eng.submit(_progression(1, 1, 10), SamplingOptions(max_tokens=50), got.append)
    eng.step()
    eng.step()
    assert eng.alloc.used > 0
    eng.cancel(req)
    eng.step()
    assert eng.alloc.used == 0 and not eng.running and got[-1].finish_reason == "cancelled"
    ref = _alone(trained, [_progression(1, 1, 10)], 6)[0]
    out = _run(eng, [_progression(1, 1, 10)], SamplingOptions(max_tokens=50, stop_ids=(ref[5],)))[0]
    assert out == ref[:ref.index(ref[5]) + 1]


def test_logprobs_of_prompt_and_tokens(trained):
    p = _progression(3, 1, 9)
    events = []
    eng = _engine(trained, prefill_chunk=4)
    eng.submit(p, SamplingOptions(max_tokens=3, logprobs=2, prompt_logprobs=True), events.append)
    eng.run_until_idle()
    with torch.no_grad():
        logp = trained(torch.tensor([p + [e.token for e in events[:2]]])).log_softmax(-1)[0]
    plp = events[0].prompt_logprobs
    assert plp[0] is None and len(plp) == len(p)
    torch.testing.assert_close(torch.tensor([lp for lp, _ in plp[1:]]), logp[torch.arange(8), torch.tensor(p[1:])],
                               atol=1e-4, rtol=0)
    assert all(len(top) == 2 for _, top in plp[1:])
    assert abs(events[1].logprob - float(logp[9, events[1].token])) < 1e-4
    assert len(events[1].top_logprobs) == 2 and max(events[1].top_logprobs.values()) >= events[1].logprob


def test_admission_limits(trained):
    eng = _engine(trained, blocks=6, max_queue=2)
    with pytest.raises(FieldError, match="cache blocks"):
        eng.check(_progression(1, 1, 10), SamplingOptions(max_tokens=20))  # 30 tokens > 5 blocks of 4
    with pytest.raises(FieldError, match="context"):
        eng.check([1] * 10, SamplingOptions(max_tokens=trained.cfg.max_seq_len))
    with pytest.raises(FieldError, match=r"\[0, 64\)"):
        eng.check([64], SamplingOptions())
    for _ in range(2):
        eng.submit([1, 2], SamplingOptions(max_tokens=2), lambda e: None)
    with pytest.raises(QueueFull):
        eng.submit([1, 2], SamplingOptions(max_tokens=2), lambda e: None)
    eng.run_until_idle()


def test_block_allocator_shares_and_evicts_least_recently_used():
    """Released blocks stay cached, least recently used evicted first, and of a released table its tail first:
    the head of a chain keeps the rest of it reachable (vLLM frees in reverse order for the same reason)."""
    alloc = BlockAllocator(4, 2)  # blocks 1..3
    a = [alloc.allocate(), alloc.allocate()]
    keys = chain_keys([1, 2, 3, 4], 2)
    for b, k in zip(a, keys):
        alloc.register(b, k)
    got, _ = alloc.match([1, 2, 3, 4, 5], 2)
    assert got == a and alloc.refs[a[0]] == 2
    alloc.release(a)
    alloc.release(got)
    assert alloc.available == 3 and len(alloc.lru) == 2
    assert alloc.allocate() not in a  # the free block first
    assert alloc.allocate() == a[1]  # then the least recently used cached one, the chain's tail, dropped from the index
    assert alloc.match([1, 2, 3, 4], 2)[0] == [a[0]]  # its head still found


def test_on_disk_prefix_cache_is_a_second_tier(trained, tmp_path):
    p = _progression(2, 3, 30)
    ref = _alone(trained, [p], 8)
    first = _engine(trained, prefix_cache=open_disk_prefix_cache(trained, tmp_path, torch.float32, 4))
    assert _run(first, [p], SamplingOptions(max_tokens=8)) == ref
    assert first.cfg.prefix_cache.stats.hits == 0
    pc = open_disk_prefix_cache(trained, tmp_path, torch.float32, 4)  # a new server, the same directory
    second = _engine(trained, prefix_cache=pc)
    assert _run(second, [p, p[:13] + [1]], SamplingOptions(max_tokens=8)) == ref + _alone(trained, [p[:13] + [1]], 8)
    # the first prompt's 29 // 4 blocks come from disk; the second's 3 from memory (loaded by the first)
    assert pc.stats.hits == 7 and second.alloc.hits == 3
    assert second.prefix_hit_rate == 1.0  # both tiers count
    assert second.alloc.used == 0


def test_mtp_speculation_in_the_batch_keeps_greedy_tokens(trained):
    head = _progression(3, 2, 13)
    prompts = [head + _progression(5, 3, n) for n in (3, 17)] + [_progression(7, 1, n) for n in (1, 30, 6)]
    ref = _alone(trained, prompts, 12)
    for blocks, chunk in ((64, 64), (18, 8)):  # the second preempts (18 main-only blocks hold 14 with MTP)
        eng = _engine(trained, blocks=blocks, prefill_chunk=chunk, speculative="mtp")
        assert _run(eng, prompts, SamplingOptions(max_tokens=12)) == ref, (blocks, chunk)
        assert eng.alloc.used == 0 and eng.drafted > 0
    assert eng.metrics.preemptions._value.get() > 0
    big = _engine(trained, speculative="mtp")
    _run(big, prompts, SamplingOptions(max_tokens=12))
    # drafting in a batch proposes and keeps exactly what each prompt alone does (how well the module
    # drafts depends on the CPU kind it was trained on: 0.76-0.9 kept, against 1/64 for blind drafts)
    alone = [_engine(trained, speculative="mtp") for _ in prompts]
    for one, p in zip(alone, prompts):
        _run(one, [p], SamplingOptions(max_tokens=12))
    assert (big.drafted, big.accepted) == (sum(e.drafted for e in alone), sum(e.accepted for e in alone))
    assert big.accepted > big.drafted / 2
    # seeded sampling stays reproducible; every token still comes from the target's distribution
    opts = SamplingOptions(max_tokens=10, temperature=1.0, seed=3)
    assert _run(_engine(trained, speculative="mtp"), [prompts[0]], opts) == \
        _run(_engine(trained, speculative="mtp", prefill_chunk=4), [prompts[0]], opts)
    # a chunk that leaves one prompt token: that row decodes next and drafts from its last entry
    p9 = _progression(3, 2, 9)
    assert _run(_engine(trained, speculative="mtp", prefill_chunk=8), [p9], SamplingOptions(max_tokens=6)) == \
        _alone(trained, [p9], 6)
    with pytest.raises(FieldError, match="mtp_depth"):
        _engine(Transformer(preset("tiny", vocab_size=V, mtp_depth=0)), speculative="mtp")


def test_tokens_kept_from_drafts_share_their_steps_time_per_output_token(trained):
    """Each step takes >= 20 ms: its kept tokens' times per output token are its time over how
    many it kept (>= 10 ms here), not one interval of the whole step and ~0 for the others."""
    eng = _engine(trained, speculative="mtp")
    step = eng.step
    eng.step = lambda: (time.sleep(0.02), step())
    prompts = [_progression(3, 2, 13), _progression(7, 1, 6)]
    _run(eng, prompts, SamplingOptions(max_tokens=12))
    assert eng.accepted > 0
    samples = {s.labels.get("le"): s.value for s in eng.metrics.tpot.collect()[0].samples if s.name.endswith("_bucket")}
    assert samples["0.005"] == 0 and samples["+Inf"] == len(prompts) * (12 - 1)


def _draft_calls(monkeypatch) -> list[tuple[list[int], torch.Tensor | None]]:
    """Every ``accept_drafts`` call's drafts and draft distributions, in generate and the engine."""
    from flyer.infer import speculative
    from flyer.serve import speculation
    calls = []

    def recording(accept):
        return lambda p, q, drafts, *a: calls.append((list(drafts), q)) or accept(p, q, drafts, *a)

    monkeypatch.setattr(speculative, "accept_drafts", recording(speculative.accept_drafts))
    monkeypatch.setattr(speculation, "accept_drafts", recording(speculation.accept_drafts))
    return calls


@pytest.mark.parametrize("k", [2, 3])
def test_several_mtp_drafts_per_step(trained, monkeypatch, k):
    """``draft_tokens`` k: greedy tokens == generate alone, with and without preemption; each
    step's drafts, and with sampling their distributions, == ``flyer generate``'s chained drafts
    for that prompt alone (the engine drafts no more than a request has tokens left, so from its
    row's last step on they may differ); seeded sampling reproducible in any batch."""
    head = _progression(3, 2, 13)
    prompts = [head + _progression(5, 3, n) for n in (3, 17)] + [_progression(7, 1, n) for n in (1, 30, 6)]
    ref = _alone(trained, prompts, 12)
    for blocks, chunk in ((64, 64), (18, 8)):
        eng = _engine(trained, blocks=blocks, prefill_chunk=chunk, speculative="mtp", draft_tokens=k)
        assert _run(eng, prompts, SamplingOptions(max_tokens=12)) == ref, (blocks, chunk)
        assert eng.alloc.used == 0
    assert eng.metrics.preemptions._value.get() > 0
    assert (eng.metrics.draft_tokens._value.get(), eng.metrics.accepted_tokens._value.get()) == \
        (eng.drafted, eng.accepted)
    calls = _draft_calls(monkeypatch)
    compared = 0
    for p, temperature in [(p, 0.0) for p in prompts[1:]] + [(prompts[1], 1.0)]:  # not the 1-token prompt:
        calls.clear()                                    # the engine's first step has nothing to draft from
        generate(trained, [p], GenerationConfig(max_new_tokens=12, cache_dtype=torch.float32, speculative="mtp",
                                                draft_tokens=k, temperature=temperature, seed=5))
        theirs = list(calls)
        calls.clear()
        _run(_engine(trained, speculative="mtp", draft_tokens=k), [p],
             SamplingOptions(max_tokens=12, temperature=temperature, seed=5))
        assert len(calls[0][0]) == k
        for (d, q), (d_gen, q_gen) in zip(calls, theirs):
            assert d == d_gen[:len(d)]
            if q is not None:  # FP32 sums in another order move these by ~1e-7; a chained step from
                # the wrong position, or with the main model's final norm on its input, by 1e-4 to 1e-2
                torch.testing.assert_close(q, q_gen[:len(d)], atol=1e-5, rtol=0)
            if len(d) < k:
                break
            compared += 1
    assert compared >= 3 * len(prompts)
    opts = SamplingOptions(max_tokens=10, temperature=1.0, seed=3)
    alone = _run(_engine(trained, speculative="mtp", draft_tokens=k), [prompts[0]], opts)
    assert alone == _run(_engine(trained, speculative="mtp", draft_tokens=k, prefill_chunk=4),
                         [prompts[3], prompts[0]], [SamplingOptions(max_tokens=5), opts])[1:]


def _one_by_one(eng: Engine, prompts, n: int) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Each prompt run alone, in turn (later ones find the earlier ones' blocks): the tokens, and
    the MTP drafts proposed and kept for each."""
    outs, counts = [], []
    for p in prompts:
        before = eng.drafted, eng.accepted
        outs += _run(eng, [p], SamplingOptions(max_tokens=n))
        counts.append((eng.drafted - before[0], eng.accepted - before[1]))
    return outs, counts


def _registered(eng: Engine) -> dict[int, list[torch.Tensor]]:
    """Each keyed block's main and MTP cache entries, copied."""
    pools = [*eng.cache.pool.tensors.values(), *eng.mtp_cache.pool.tensors.values()]
    return {b: [t[:, b].clone() for t in pools] for b in eng.alloc.key_of}


@pytest.mark.parametrize("read", ["kernel", "gathered"])
def test_mtp_speculation_shares_prefix_blocks(trained, tmp_path, monkeypatch, read):
    """With MTP drafts, prompts share their common head's blocks, the MTP module's entries with
    them (position p in slot p + 1: a block's entries are set by its own chain key): each
    request's greedy tokens == generate alone, and each proposes and keeps the same drafts as
    with nothing shared (wrong MTP entries would keep the tokens but change the drafts).
    Shared blocks are never written; the on-disk tier stores the MTP entries too. ``read``: decode
    attention reads the cache in place (``kernels.mla_decode``) or gathers it (the eager path, CUDA's)."""
    if read == "gathered":
        monkeypatch.setattr(kernels, "mla_decode_usable", lambda pool: False)
    head = _progression(3, 2, 13)
    prompts = [head + _progression(5, 3, n) for n in (3, 17, 6)] + [head[:9]]
    ref = _alone(trained, prompts, 12)
    for chunk in (64, 5):
        apart = _engine(trained, speculative="mtp", prefill_chunk=chunk, prefix_sharing=False)
        ref_out, ref_counts = _one_by_one(apart, prompts, 12)
        assert ref_out == ref and apart.alloc.hits == 0
        eng = _engine(trained, speculative="mtp", prefill_chunk=chunk)
        out, counts = _one_by_one(eng, prompts[:1], 12)
        kept = _registered(eng)
        more, more_counts = _one_by_one(eng, prompts[1:], 12)
        assert out + more == ref and counts + more_counts == ref_counts, chunk
        assert eng.alloc.hits >= 3 + 3 + 2  # the head's 3 full blocks before each prompt's last token
        now = _registered(eng)
        assert all(all(torch.equal(a, b) for a, b in zip(kept[k], now[k])) for k in kept)  # never written
    # a new engine on the same directory loads the blocks, MTP entries included, from disk
    first = _engine(trained, speculative="mtp", prefix_cache=open_disk_prefix_cache(trained, tmp_path, torch.float32,
                                                                                      4))
    _one_by_one(first, prompts[:1], 12)
    pc = open_disk_prefix_cache(trained, tmp_path, torch.float32, 4)
    second = _engine(trained, speculative="mtp", prefix_cache=pc)
    assert _one_by_one(second, prompts[1:2], 12) == (ref[1:2], ref_counts[1:2])
    assert pc.stats.hits == 4  # prompts[0], a prefix of prompts[1], stored its 4 blocks
    # the same files serve ``flyer generate --prefix-cache`` on this model (its blocks hold MTP entries)
    gen = open_prefix_cache(trained, tmp_path, cache_dtype=torch.float32, block_size=4)
    res = generate(trained, [prompts[2]], GenerationConfig(max_new_tokens=12, cache_dtype=torch.float32,
                                                           prefix_cache=gen, speculative="mtp"))
    assert res.tokens[0] == ref[2] and gen.stats.hits == 4


@pytest.mark.parametrize("aten", ["native", "avx2"])
@pytest.mark.parametrize("read", ["kernel", "gathered"])
def test_mtp_cache_shifted_by_one_slot_attends_the_same(monkeypatch, request, read, aten):
    """The MTP module against a cache that keeps position p in slot p + 1 (the server's; slot 0
    holds large values, which would swamp any sum that attended it) == against one that keeps it
    in slot p, bit for bit: a prefill chunk in the dense form, one absorbed, then decode steps
    (absorbed: in place or gathered). With ATen's vectors 8 wide (AVX2, forced in a process of its
    own where this CPU has wider ones), a masked slot 0 in the softmax moved the others' bits."""
    if aten == "avx2" and os.environ.get("ATEN_CPU_CAPABILITY") != "avx2":
        if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
            pytest.skip("AVX2 code needs an x86 CPU with AVX2")
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid],
                             cwd=ROOT, env=child_env(ATEN_CPU_CAPABILITY="avx2"), capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
        return
    if aten == "avx2":
        assert torch.backends.cpu.get_cpu_capability() == "AVX2"
    if read == "gathered":
        monkeypatch.setattr(kernels, "mla_decode_usable", lambda pool: False)
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=V, kv_lora_rank=64)).eval()  # random weights: bits, not tokens
    assert dense_prefill_pays(model.mtp[0].block.attn, 70) and not dense_prefill_pays(model.mtp[0].block.attn, 9)
    plain, shifted = (Decoder(model, 2, 96, cache_dtype=torch.float32, with_mtp=True) for _ in range(2))
    shifted.mtp_cache.packed[:, :, 0] = 1e3
    g = torch.Generator().manual_seed(0)
    D = model.cfg.dim
    start = torch.tensor([0, 0])
    for T in (70, 9, 1, 1):
        h, nxt = torch.randn(2, T, D, generator=g), torch.randint(0, V, (2, T), generator=g)
        want = plain.mtp_forward(h, nxt, start)
        got = shifted.mtp_forward(h, nxt, start, shift=1)
        assert torch.equal(got, want), (T, (got - want).abs().max())
        start = start + T


def test_writes_below_write_from_go_to_the_null_block():
    cfg = preset("tiny", vocab_size=V)
    paged = make_paged_cache(cfg, 1, 4, 2, torch.float32)
    view = paged.view(torch.tensor([[2, 3]]), write_from=torch.tensor([3]))
    K = cfg.kv_lora_rank
    latent = torch.arange(1.0, 5.0).view(1, 4, 1).expand(1, 4, K)
    view.write(0, torch.arange(4).view(1, 4), latent=latent, rope_key=torch.zeros(1, 4, cfg.qk_rope_head_dim))
    got = paged.pool.packed[0, :, :, 0]  # (blocks, slots) of the first latent channel
    assert got[2].tolist() == [0.0, 0.0] and got[3].tolist() == [0.0, 4.0]  # positions 0-2 not written here
    assert got[0].tolist() == [3.0, 2.0]  # but in the null block (positions 0 and 2 share slot 0; 2 came last)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_engine_greedy_equals_generate_alone(trained):
    """The engine on CUDA (paged cache on the GPU, the eager attention over its blocks): each
    request's greedy tokens under batching, chunked prefill, prefix sharing, preemption and MTP
    drafts == ``generate`` on CUDA alone == the CPU's tokens (the trained model's clear margins)."""
    gpu = Transformer(trained.cfg).eval()
    gpu.load_state_dict(trained.state_dict())
    gpu.cuda()
    head = _progression(3, 2, 13)
    prompts = [head + _progression(5, 3, n) for n in (3, 17, 1)] + [_progression(7, 1, n) for n in (30, 6)]
    ref = _alone(gpu, prompts, 12)
    assert ref == _alone(trained, prompts, 12)
    for blocks, chunk, spec in ((64, 64, None), (14, 8, None), (64, 8, "mtp"), (18, 8, "mtp")):
        eng = _engine(gpu, blocks=blocks, max_batch_size=5, prefill_chunk=chunk, speculative=spec)
        assert eng.cache.pool.lengths.is_cuda  # the pool lives on the GPU
        assert _run(eng, prompts, SamplingOptions(max_tokens=12)) == ref, (blocks, chunk, spec)
        assert eng.alloc.used == 0
    assert eng.metrics.preemptions._value.get() > 0 and eng.accepted > 0
    opts = SamplingOptions(max_tokens=10, temperature=1.0, seed=8)  # seeded sampling on a CUDA generator
    assert _run(_engine(gpu), [prompts[0]], opts) == _run(_engine(gpu, prefill_chunk=4), [prompts[0]], opts)


def test_step_seconds_count_every_step_and_its_time(trained, monkeypatch):
    """``flyer_step_seconds``: one observation a step, each the step's whole time (a forward slowed by 10 ms here
    gives no step under 10 ms), so that its sum over a stretch of wall time is the engine's busy share."""
    eng = _engine(trained)
    steps, forward = [], eng._forward
    monkeypatch.setattr(eng, "_forward", lambda *a: (steps.append(1), time.sleep(0.01), forward(*a)))
    _run(eng, [_progression(3, 2, 13), _progression(7, 1, 6)], SamplingOptions(max_tokens=5))
    samples = {(s.name, s.labels.get("le")): s.value for s in eng.metrics.step_seconds.collect()[0].samples}
    assert samples[("flyer_step_seconds_count", None)] == samples[("flyer_step_seconds_bucket", "+Inf")] == len(steps)
    assert samples[("flyer_step_seconds_bucket", "0.01")] == 0
    assert samples[("flyer_step_seconds_sum", None)] >= 0.01 * len(steps)
