"""Sampling with MTP speculation, and the engine's sampling, against what sampling means rather than against
flyer's own runs.

- Speculative sampling keeps the target distribution exactly (Leviathan et al. 2023, Thm 1): with target rows
  p_0..p_K fixed and drafts d_j ~ q_j, an output reaching position j has out[j] ~ p_j (an accept with min(1, p/q) or
  a draw from the residual max(p - q, 0), or after K kept drafts the bonus token from p_K). Each (position, token)
  frequency must lie within 6 standard deviations sqrt(p (1 - p) / n) of p (a false failure below 1e-7 over the
  cells; the generators are seeded).
- The target side honours the request's parameters: temperature 1 with top_k 1, or a top_p so small that only the
  most likely token is kept, is greedy decoding (one-hot on the argmax), so ``flyer generate`` and ``flyer serve``
  with MTP drafts give plain greedy's tokens under them. An untrained model's flat distributions would make a target
  that ignored them sample another token at almost every step.
- ``accepted`` counts kept drafts (not the target's own token each step adds): at most ``drafted``, and generate
  and serve count alike for one prompt.
- The engine's first sampled token follows softmax(logits / T), top_k applied, for a temperature below 1 too (the
  logits the model's own forward gives), within the same bound over 300 seeded requests.
"""

import math

import pytest
import torch

from flyer.config import preset
from flyer.infer import GenerationConfig, generate
from flyer.infer.cache import LatentCache
from flyer.infer.sampling import SamplingParams
from flyer.infer.speculative import accept_drafts
from flyer.model.transformer import Transformer
from flyer.serve.engine import Engine, EngineConfig, SamplingOptions


V, N = 64, 300  # vocabulary; seeded requests of the distribution test


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=V)).eval()


def _prompts():
    return [[(3 + 5 * i) % V for i in range(n)] for n in (5, 11)]


def _engine(model, kv_cache_tokens: int = 256, **over):
    bpt = LatentCache(model.cfg.n_layers, 1, 1, model.cfg.kv_lora_rank, model.cfg.qk_rope_head_dim,
                      torch.float32, "meta").bytes_per_token()
    return Engine(model, EngineConfig(kv_cache_bytes=kv_cache_tokens * bpt, block_size=4, cache_dtype=torch.float32,
                                      **over))


def _run(eng, prompts, opts):
    outs = [[] for _ in prompts]
    for i, p in enumerate(prompts):
        eng.submit(p, opts, lambda e, i=i: outs[i].append(e.token))
    eng.run_until_idle()
    return outs


@pytest.mark.parametrize("k", [1, 2])
def test_generate_speculative_sampling_with_tiny_top_p_is_greedy(model, k):
    prompts = _prompts()
    greedy = generate(model, prompts, GenerationConfig(max_new_tokens=12, cache_dtype=torch.float32)).tokens
    gen = GenerationConfig(max_new_tokens=12, cache_dtype=torch.float32, temperature=1.0, top_p=1e-6, seed=0)
    assert generate(model, prompts, gen).tokens == greedy  # plain sampling: the oracle holds
    spec = generate(model, prompts, GenerationConfig(**{**gen.__dict__, "speculative": "mtp", "draft_tokens": k}))
    assert spec.tokens == greedy and spec.drafted > 0


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("over", [dict(top_k=1), dict(top_p=1e-6)])
def test_engine_speculative_sampling_with_top_k_1_or_tiny_top_p_is_greedy(model, k, over):
    prompts = _prompts()
    greedy = _run(_engine(model), prompts, SamplingOptions(max_tokens=12))
    opts = SamplingOptions(max_tokens=12, temperature=1.0, seed=0, **over)
    assert _run(_engine(model), prompts, opts) == greedy  # plain sampling: the oracle holds
    eng = _engine(model, speculative="mtp", draft_tokens=k)
    assert _run(eng, prompts, opts) == greedy and eng.drafted > 0




@pytest.mark.parametrize("k", [1, 2])
def test_accepted_drafts_never_exceed_drafted_and_generate_counts_as_serve(model, k):
    prompt = [(3 + 5 * i) % V for i in range(7)]
    res = generate(model, [prompt], GenerationConfig(max_new_tokens=12, cache_dtype=torch.float32,
                                                     speculative="mtp", draft_tokens=k))
    assert res.drafted > 0 and 0 <= res.accepted <= res.drafted and 0 <= res.acceptance_rate <= 1
    eng = _engine(model, speculative="mtp", draft_tokens=k)
    out = []
    eng.submit(prompt, SamplingOptions(max_tokens=12), lambda e: out.append(e.token))
    eng.run_until_idle()
    assert out == res.tokens[0]
    assert 0 <= eng.accepted <= eng.drafted
    assert (eng.drafted, eng.accepted) == (res.drafted, res.accepted)


def _accepted_runs(p, q, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = q.shape[0]
    counts = torch.zeros(K + 1, p.shape[1], dtype=torch.float64)
    for _ in range(n):
        drafts = [int(torch.multinomial(q[j], 1, generator=g)) for j in range(K)]
        out = accept_drafts(p, q, drafts, SamplingParams(temperature=1.0), g)
        assert 1 <= len(out) <= K + 1
        assert out[:-1] == drafts[:len(out) - 1]  # every kept token but the last is an accepted draft
        for j, t in enumerate(out):
            counts[j, t] += 1
    return counts


def _check(counts, p):
    for j in range(counts.shape[0]):
        n = counts[j].sum().item()
        assert n > 500, (j, n)  # enough runs reach position j for the bound to bite
        for t in range(p.shape[1]):
            pj = p[j, t].item()
            sd = math.sqrt(pj * (1 - pj) / n)
            f = counts[j, t].item() / n
            assert abs(f - pj) <= 6 * sd, (j, t, f, pj, 6 * sd)


def test_two_drafts_every_position_follows_its_target_row():
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    q = torch.tensor([[0.3, 0.2, 0.3, 0.2], [0.5, 0.2, 0.2, 0.1]], dtype=torch.float64)
    _check(_accepted_runs(p, q, 12000), p)


def test_one_draft_bonus_token_follows_the_next_row():
    """K = 1: out[1] (present when the draft is kept) is drawn from p_1, not p_0."""
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]], dtype=torch.float64)
    q = torch.tensor([[0.1, 0.25, 0.25, 0.4]], dtype=torch.float64)
    _check(_accepted_runs(p, q, 8000), p)




def test_a_reasoning_end_marker_draft_keeps_the_markers_probability():
    """A request whose grammar waits for the reasoning end marker (``Request.deferred``) refused a draft that
    completed the marker and let the verify pass choose that position from p, while every other draft was accepted
    by q's ratio: a draft from q given "not the marker", judged as a draft from q. With a perfect drafter (q = p) the
    marker came out with probability p(m)^2 (0.13 here) instead of p(m) (0.36). The real ``MtpSpeculator.draft``
    and ``accept``, one row, its MTP and target logits stubbed to the same distribution: each token's frequency as
    the first kept token within 6 standard deviations of p, and nothing kept after a kept marker (the token after
    it is the grammar's)."""
    import types

    from flyer.serve.speculation import MtpSpeculator

    marker, runs = 2, 3000
    p = torch.softmax(torch.tensor([0.3, 0.0, 1.0, 0.5, -0.2]), 0)
    counter = types.SimpleNamespace(inc=lambda *a: None)
    spec = MtpSpeculator.__new__(MtpSpeculator)  # what draft and accept read, the model's passes stubbed
    spec.dec = types.SimpleNamespace(mtp_logits=lambda h: p.log().expand(h.shape[0], -1).clone())
    spec.cache = spec.graphs = spec.main = None
    spec.device, spec.drafted, spec.accepted = torch.device("cpu"), 0, 0
    spec.metrics = types.SimpleNamespace(draft_tokens=counter, accepted_tokens=counter)
    spec.catch_up = lambda rows: torch.zeros(len(rows), 4)
    spec.grammars = types.SimpleNamespace(ends_reasoning=lambda r, more: more[-1] == marker)
    opts = types.SimpleNamespace(params=SamplingParams(temperature=1.0))
    counts = torch.zeros(len(p))
    for seed in range(runs):
        row = types.SimpleNamespace(tokens=[1, 1], n_cached=1, h_prev=None, slot=None, blocks=[], opts=opts,
                                    matcher=None, deferred=object(), generated=1,
                                    generator=torch.Generator().manual_seed(seed))
        [(_, [q], [drafts], [params], _)] = spec.draft([row], [1])
        new = spec.accept(row, torch.zeros(2, 4), p.log().expand(2, -1).clone(), q, drafts, params)
        assert new[-1] == marker or marker not in new, new
        counts[new[0]] += 1
    for t, pt in enumerate(p.tolist()):
        assert abs(counts[t].item() / runs - pt) <= 6 * math.sqrt(pt * (1 - pt) / runs), (t, counts / runs, p)


@pytest.mark.parametrize("temperature,top_k", [(0.5, 0), (1.0, 3)])
def test_engine_first_tokens_follow_the_tempered_top_k_distribution(model, temperature, top_k):
    prompt = [(3 + 5 * i) % V for i in range(6)]
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0, -1].double()
    target = (logits / temperature).softmax(-1)
    if top_k:
        keep = target >= target.topk(top_k).values[-1]
        target = torch.where(keep, target, 0.0)
        target = target / target.sum()
    assert target.max() < 0.8  # the check can tell sampling from greedy
    eng, firsts = _engine(model, kv_cache_tokens=256), []
    for s in range(N):  # in waves: the engine's queue is bounded
        eng.submit(prompt, SamplingOptions(max_tokens=1, temperature=temperature, top_k=top_k, seed=s),
                   lambda e: firsts.append(e.token) if e.token is not None else None)
        if (s + 1) % 100 == 0:
            eng.run_until_idle()
    eng.run_until_idle()
    assert len(firsts) == N
    counts = torch.bincount(torch.tensor(firsts), minlength=V).double()
    for t in range(V):
        p = target[t].item()
        sd = math.sqrt(p * (1 - p) / N)
        assert abs(counts[t].item() / N - p) <= 6 * sd + 1e-12, (t, counts[t].item() / N, p)


@pytest.mark.parametrize("k", [1, 2])
def test_generate_speculative_seeded_rows_draw_the_same_beside_others(model, k):
    """A batch drafts as many tokens as its busiest row can keep; a row with fewer left pads, and its padding drafts
    drew from its own generator, so a seeded prompt's tokens changed when a batch-mate still drafted (13 of 60
    seeds differed at K = 1). Padding draws nothing now: over 30 seeds, prompt 0 beside another is prompt 0 alone."""
    a, b = [1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11]
    for seed in range(30):
        gen = GenerationConfig(max_new_tokens=6, temperature=1.0, cache_dtype=torch.float32, seed=seed,
                               speculative="mtp", draft_tokens=k)
        assert generate(model, [a], gen).tokens[0] == generate(model, [a, b], gen).tokens[0], seed


@pytest.mark.parametrize("k", [0, 1, 2])
def test_engine_seeded_requests_draw_the_same_when_preempted(model, k):
    """A request preempted and recomputed chose its next token in its last prefill chunk, plainly, where it would
    have drafted: its generator's stream moved, and under MTP a seeded output depended on whether other requests
    crowded it out (14 of 20 seeds differed at K = 1). Recomputation now stops before the last token, which the next
    step feeds as a decoding row's: 12 seeded requests beside 4 others in a pool that preempts give their tokens
    alone (k = 0: without speculation)."""
    spec = dict(speculative="mtp", draft_tokens=k) if k else {}
    opts = [SamplingOptions(max_tokens=10, temperature=1.0, seed=s) for s in range(12)]
    alone = [_run(_engine(model, 256, **spec), [[1, 2, 3, 4, 5, 6]], o)[0] for o in opts]
    eng = _engine(model, 56, **spec)
    outs = [[] for _ in range(16)]
    others = [([(7 * j + i) % V for i in range(5 + 3 * j)], SamplingOptions(max_tokens=12, temperature=1.0,
                                                                            seed=100 + j)) for j in range(4)]
    for i, (p, o) in enumerate(others + [([1, 2, 3, 4, 5, 6], o) for o in opts]):
        eng.submit(p, o, lambda e, i=i: outs[i].append(e.token))
    eng.run_until_idle()
    assert eng.metrics.preemptions._value.get() > 0
    assert outs[4:] == alone


@pytest.mark.parametrize("speculative", [None, "mtp"])
def test_generate_seeds_each_prompt_apart(model, speculative):
    """``generate(seed=s)``: prompt b draws from its own generator seeded s + b, so its tokens are the ones it gets
    alone with seed s + b, whatever else the batch holds (one generator for the batch moved a prompt's draws
    when another was added); without speculation, prompt 0's are the engine's for the same seed."""
    prompts = _prompts()
    gen = GenerationConfig(max_new_tokens=10, cache_dtype=torch.float32, temperature=1.0, seed=7,
                           speculative=speculative)
    together = generate(model, prompts, gen).tokens
    alone = [generate(model, [p], GenerationConfig(**{**gen.__dict__, "seed": 7 + b})).tokens[0]
             for b, p in enumerate(prompts)]
    assert together == alone
    assert together[0] != together[1][:len(together[0])]  # not one stream of draws shared
    if speculative is None:
        assert _run(_engine(model), prompts[:1], SamplingOptions(max_tokens=10, temperature=1.0, seed=7)) == \
            together[:1]
