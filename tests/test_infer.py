"""Decode path: absorbed MLA == training path, cache sizes == ``flyer info``, batched prompts,
sampling, and MTP speculative decoding == plain greedy."""

import math

import pytest
import torch
from bounds import binomial_halfwidth, decode_logit_bound, mla_attention_bound
from trained import counting_model as train_counting_model

from flyer import kernels
from flyer.config import preset
from flyer.infer import attention
from flyer.infer.attention import causal_slot_mask, dense_prefill_pays, mla_absorbed_core, mla_dense_core
from flyer.infer import Decoder, GenerationConfig, generate, make_cache
from flyer.infer.cache import _SlotCache
from flyer.infer.decoder import Group
from flyer.errors import FieldError
from flyer.infer.sampling import SamplingParams, probabilities, sample
from flyer.infer.speculative import accept_drafts
from flyer.model.counts import kv_cache_bytes_per_token
from flyer.model.transformer import Transformer

GQA = dict(attn="gqa", n_kv_heads=2, head_dim=32)
# Against the training path (FP32 weights and compute) an FP32 cache matches to float rounding.
ATOL_FP32 = 1e-4


def _model(**over) -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny", **over)).eval()


def _incremental_logits(model, tokens, mode, dtype, n_prefill):
    B, T = tokens.shape
    dec = Decoder(model, B, T, mode, dtype)
    out = [dec.logits(dec.forward(tokens[:, :n_prefill], torch.zeros(B, dtype=torch.long)))]
    for t in range(n_prefill, T):
        out.append(dec.logits(dec.forward(tokens[:, t:t + 1], torch.full((B,), t))))
    return torch.cat(out, 1)


@pytest.mark.parametrize("over,mode", [({}, "absorbed"), ({}, "naive"), (GQA, "absorbed")])
def test_cached_logits_equal_training_path(over, mode):
    model = _model(**over)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        ref = model(tokens)
    got = _incremental_logits(model, tokens, mode, torch.float32, n_prefill=10)
    torch.testing.assert_close(got, ref, atol=ATOL_FP32, rtol=0)
    # a BF16 cache only rounds each entry to BF16: an FP32 cache holding the rounded entries gives its logits to FP32
    # rounding (against the training path the rounding has no bound: it re-routes tokens' experts, ~5e-2 here)
    got_bf16 = _incremental_logits(model, tokens, mode, torch.bfloat16, n_prefill=10)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_SlotCache, "encode", lambda self, v: {k: t.bfloat16().to(self.dtype) for k, t in v.items()})
        rounded = _incremental_logits(model, tokens, mode, torch.float32, n_prefill=10)
    torch.testing.assert_close(got_bf16, rounded, atol=ATOL_FP32, rtol=0)


def test_groups_in_one_pass_equal_their_separate_forwards():
    """``forward_groups``: a decode batch and a right-padded prefill batch, each with its own
    cache, through one pass (MoE over the packed real tokens) give what each gives alone."""
    model = _model()
    V = model.cfg.vocab_size
    ctx = torch.randint(0, V, (4, 6))

    def caches():
        decs = [Decoder(model, 2, 32, "absorbed", torch.float32) for _ in range(2)]
        for d, rows in zip(decs, (ctx[:2], ctx[2:])):
            d.forward(rows, torch.zeros(2, dtype=torch.long))
        return decs

    dec_tok, dec_start = torch.randint(0, V, (2, 1)), torch.tensor([6, 3])
    pre_tok, pre_start, lengths = torch.randint(0, V, (2, 5)), torch.tensor([2, 6]), [3, 5]
    a, b = caches()
    ref = a.forward(dec_tok, dec_start), b.forward(pre_tok, pre_start)
    a2, b2 = caches()
    got = a2.forward_groups([Group(dec_tok, dec_start, cache=a2.cache),
                             Group(pre_tok, pre_start, lengths, cache=b2.cache)])
    torch.testing.assert_close(got[0], ref[0], atol=ATOL_FP32, rtol=0)
    for i, n in enumerate(lengths):  # past a row's length: padding, whatever it holds
        torch.testing.assert_close(got[1][i, :n], ref[1][i, :n], atol=ATOL_FP32, rtol=0)
    for (d_ref, d_got), start, ns in (((a, a2), dec_start, [1, 1]), ((b, b2), pre_start, lengths)):
        for i, n in enumerate(ns):
            end = int(start[i]) + n
            torch.testing.assert_close(d_got.cache.packed[:, i, :end], d_ref.cache.packed[:, i, :end],
                                       atol=ATOL_FP32, rtol=0)


def test_absorbed_equals_naive_with_yarn_and_no_query_compression():
    # V2-Lite style: q_lora_rank 0, YaRN scaling (softmax mscale) active
    model = _model(q_lora_rank=0, rope_factor=4.0, original_seq_len=16, max_seq_len=64)
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 40))
    with torch.no_grad():
        ref = model(tokens)
    for mode in ("absorbed", "naive"):
        torch.testing.assert_close(_incremental_logits(model, tokens, mode, torch.float32, 33), ref,
                                   atol=ATOL_FP32, rtol=0)


def test_absorbed_cache_holds_only_latents_and_rope_keys():
    dec = Decoder(_model(), batch=2, max_len=8)
    assert set(dec.cache.tensors) == {"latent", "rope_key"}
    assert dec.cache.tensors["latent"].shape == (4, 2, 8, 32)
    assert dec.cache.tensors["rope_key"].shape == (4, 2, 8, 16)


@pytest.mark.parametrize("name", ["tiny", "small", "dsv2-lite", "dsv3", "qwen2.5-72b"])
def test_cache_bytes_per_token_equal_info(name):
    cfg = preset(name)
    for mode, absorbed in (("absorbed", True), ("naive", False)):
        cache = make_cache(cfg, cfg.n_layers, batch=1, max_len=1, mode=mode, device="meta")
        assert cache.bytes_per_token() == kv_cache_bytes_per_token(cfg, absorbed=absorbed)
    if name == "dsv3":
        assert make_cache(cfg, cfg.n_layers, 1, 1, device="meta").bytes_per_token() == 70_272


def test_generate_reports_cache_bytes_of_flyer_info():
    model = _model()
    res = generate(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=2))
    assert res.cache_bytes_per_token == kv_cache_bytes_per_token(model.cfg) == 384
    res = generate(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=2, attention="naive"))
    assert res.cache_bytes_per_token == kv_cache_bytes_per_token(model.cfg, absorbed=False)


def test_batched_prompts_of_different_lengths_match_single():
    model = _model()
    prompts = [torch.randint(0, 2048, (n,)).tolist() for n in (3, 11, 7)]
    gen = GenerationConfig(max_new_tokens=12, cache_dtype=torch.float32)
    batched = generate(model, prompts, gen)
    for i, p in enumerate(prompts):
        single = generate(model, [p], gen)
        assert single.tokens[0] == batched.tokens[i]
        torch.testing.assert_close(single.first_logits[0], batched.first_logits[i], atol=decode_logit_bound(model, 11),
                                   rtol=0)
    # and the greedy tokens are the training path's argmax, one step at a time
    seq = list(prompts[1])
    for tok in batched.tokens[1][:4]:
        with torch.no_grad():
            assert int(model(torch.tensor([seq]))[0, -1].argmax()) == tok
        seq.append(tok)


def test_eos_stops_a_row_and_is_kept():
    model = _model()
    prompts = [[5, 6, 7], [9]]
    free = generate(model, prompts, GenerationConfig(max_new_tokens=10, cache_dtype=torch.float32))
    eos = free.tokens[0][3]
    res = generate(model, prompts, GenerationConfig(max_new_tokens=10, cache_dtype=torch.float32, eos_id=eos))
    assert res.tokens[0] == free.tokens[0][:free.tokens[0].index(eos) + 1]
    assert all(len(t) <= 10 for t in res.tokens)


@pytest.mark.parametrize("speculative", [None, "mtp"])
def test_finished_rows_leave_the_batch(monkeypatch, speculative):
    """A row that reaches EOS stops being computed (the decode batch shrinks, its caches with it),
    and every row's tokens stay those it gets on its own."""
    model = _model()
    prompts = [[5, 6, 7], [9], [40, 41, 42, 43]]
    gen = dict(max_new_tokens=10, cache_dtype=torch.float32, speculative=speculative)
    eos = generate(model, prompts[:1], GenerationConfig(**gen)).tokens[0][2]  # row 0 stops at its 3rd token
    sizes = []
    forward = Decoder.forward
    monkeypatch.setattr(Decoder, "forward", lambda self, t, *a: sizes.append(t.shape[0]) or forward(self, t, *a))
    res = generate(model, prompts, GenerationConfig(**gen, eos_id=eos))
    monkeypatch.undo()
    assert sizes[0] == 3 and sizes[-1] < 3 and sizes == sorted(sizes, reverse=True), sizes
    for p, toks in zip(prompts, res.tokens):
        assert toks == generate(model, [p], GenerationConfig(**gen, eos_id=eos)).tokens[0]
    assert res.tokens[0][-1] == eos and res.cache_bytes_per_token > 0


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.8))
    torch.testing.assert_close(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    assert probabilities(logits, SamplingParams(temperature=1.0, top_p=0.5))[0, 0] == 1.0
    assert probabilities(logits, SamplingParams()).argmax() == 0  # greedy: one-hot


def test_min_p_top_k_and_top_p_are_transformers_warpers_in_vllms_order():
    """Temperature, min-p, top-k, top-p, each on what the one before kept (vLLM's sampler's order), equal transformers'
    warpers applied in that order; ties with the k-th token stay, as both keep them; top_k past the vocabulary and
    min_p 0 change nothing; a bad value is one FieldError naming it."""
    from transformers import (MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,  # heavy: only here
                              TopPLogitsWarper)

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g) * 3
    logits[0, :4] = logits[0].max() + 1  # four tied top tokens
    for t, min_p, k, top_p in ((1.0, 0.1, 0, 1.0), (0.7, 0.0, 5, 1.0), (1.3, 0.05, 8, 0.9), (1.0, 0.3, 3, 0.5),
                               (1.0, 0.0, 2, 1.0), (1.0, 0.0, 60, 1.0)):
        want = TemperatureLogitsWarper(t)(None, logits.clone())
        for warper, on in ((lambda: MinPLogitsWarper(min_p), min_p > 0), (lambda: TopKLogitsWarper(k), 0 < k < 50),
                           (lambda: TopPLogitsWarper(top_p), top_p < 1)):  # transformers refuses their off values
            want = warper()(None, want) if on else want
        got = probabilities(logits, SamplingParams(temperature=t, top_p=top_p, top_k=k, min_p=min_p))
        torch.testing.assert_close(got, want.softmax(-1), rtol=0, atol=1e-6)
    assert (probabilities(logits[:1], SamplingParams(temperature=1.0, top_k=2))[0, :4] > 0).all()
    for kw, field in ((dict(top_k=-1), "top_k"), (dict(top_k=1.5), "top_k"), (dict(min_p=1.5), "min_p")):
        with pytest.raises(FieldError, match=f"^{field}: "):
            SamplingParams(temperature=1.0, **kw)


def test_vanishing_temperature_and_top_p_sample_the_top_token():
    """A temperature or top_p that rounds to 0 in FP32 (1e-300, 1e-320) is the greedy limit, not NaNs
    (which failed the sampling step, and with it every request of the server's batch)."""
    logits = torch.tensor([[2.0, 3.0, 3.0, -1.0], [0.5, 0.25, 4.0, 1.0]])
    for t in (1e-300, 1e-40):  # tied top tokens share the mass
        p = probabilities(logits, SamplingParams(temperature=t))
        assert p.tolist() == [[0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0]]
    p = probabilities(logits[1:], SamplingParams(temperature=1.0, top_p=1e-320))
    assert p.tolist() == [[0.0, 0.0, 1.0, 0.0]]
    for params in (SamplingParams(temperature=1e-300), SamplingParams(temperature=1.0, top_p=1e-320)):
        assert sample(logits[1:], params, torch.Generator().manual_seed(0)).tolist() == [2]
    with pytest.raises(FieldError, match="temperature"):
        SamplingParams(temperature=math.inf)


def test_sampling_is_seeded():
    model = _model()
    gen = GenerationConfig(max_new_tokens=8, temperature=0.9, top_p=0.9, seed=3)
    assert generate(model, [[1, 2]], gen).tokens == generate(model, [[1, 2]], gen).tokens


def test_speculative_acceptance_rule_preserves_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.7, 0.1, 0.1, 0.1]])
    counts = torch.zeros(4)
    n = 4000
    for _ in range(n):
        d = int(torch.multinomial(q[0], 1, generator=g))
        counts[accept_drafts(p, q, [d], SamplingParams(temperature=1.0), g)[0]] += 1
    # each token's count is Binomial(n, p_i) when the rule keeps the target distribution (``binomial_halfwidth``)
    assert all(abs(float(k) - n * float(pi)) < binomial_halfwidth(n, float(pi)) for k, pi in zip(counts, p[0]))


# ---- MTP speculative decoding ------------------------------------------------------------
@pytest.fixture(scope="module")
def counting_model():
    return train_counting_model()


def test_speculative_greedy_identical_on_untrained_model():
    model = _model()  # drafts almost always rejected: exercises the rollback path
    prompts = [torch.randint(0, 2048, (n,)).tolist() for n in (4, 13)]
    plain = generate(model, prompts, GenerationConfig(max_new_tokens=16, cache_dtype=torch.float32))
    for k in (1, 2):
        spec = generate(model, prompts, GenerationConfig(max_new_tokens=16, cache_dtype=torch.float32,
                                                         speculative="mtp", draft_tokens=k))
        assert spec.tokens == plain.tokens
        assert spec.drafted > 0


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_greedy_identical_on_trained_model(counting_model, k):
    prompts = [[5, 7, 9, 11], [1, 2, 3, 4, 5, 6, 7], [60, 61]]
    plain = generate(counting_model, prompts, GenerationConfig(max_new_tokens=30, cache_dtype=torch.float32))
    cfg = GenerationConfig(max_new_tokens=30, cache_dtype=torch.float32, speculative="mtp", draft_tokens=k)
    spec = generate(counting_model, prompts, cfg)
    assert spec.tokens == plain.tokens
    assert all(len(t) == 30 for t in spec.tokens)
    # a batch proposes and keeps the drafts each prompt alone does; how many the module gets right
    # depends on the CPU kind it was trained on (0.8-0.9 of single drafts, 0.4-0.6 of reapplied ones
    # on the kinds seen), far above the 1/64 of drafts blind to the context
    alone = [generate(counting_model, [p], cfg) for p in prompts]
    assert (spec.drafted, spec.accepted) == (sum(a.drafted for a in alone), sum(a.accepted for a in alone))
    assert spec.acceptance_rate > (0.5 if k == 1 else 0.25)
    # EOS inside an accepted run of drafts still stops the row there
    eos = plain.tokens[1][9]
    gen = dict(max_new_tokens=30, cache_dtype=torch.float32, eos_id=eos)
    assert (generate(counting_model, prompts, GenerationConfig(**gen, speculative="mtp", draft_tokens=k)).tokens
            == generate(counting_model, prompts, GenerationConfig(**gen)).tokens)


def test_speculative_needs_mtp():
    with pytest.raises(ValueError, match="mtp_depth"):
        generate(_model(mtp_depth=0), [[1]], GenerationConfig(max_new_tokens=2, speculative="mtp"))


# ---- prefill form and subnormal probabilities ---------------------------------------------
def test_dense_prefill_chunk_equals_training_path():
    # kv_lora_rank 64: a 90-token chunk takes the compute-bound form (dense_prefill_pays)
    model = _model(kv_lora_rank=64)
    assert dense_prefill_pays(model.layers[0].attn, 90) and not dense_prefill_pays(model.layers[0].attn, 2)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 100))
    with torch.no_grad():
        ref = model(tokens)
    torch.testing.assert_close(_incremental_logits(model, tokens, "absorbed", torch.float32, 90), ref,
                               atol=ATOL_FP32, rtol=0)


def test_a_chunk_from_slot_zero_attends_as_plain_causal_attention(monkeypatch):
    """Rows whose T tokens all sit in slots 0 .. T - 1 (a prompt's first chunk) take the dense
    core without a mask: ATen's causal kernel skips the blocks above the diagonal and gives the
    masked call's bits, on torch's thread and split over the expert threads. Other rows (a start
    past 0, padding clamped at the context's end, a shifted cache) keep their mask."""
    attn = _model().layers[0].attn
    T = 130
    q_nope, q_rope, kv, _ = _attention_inputs(attn, T=T, S=T)
    zero = torch.zeros(2, dtype=torch.long)
    dec = Decoder(_model(), 2, T)
    rows = dec._rows(zero, T)
    assert rows.from_slot_zero
    mask = rows.attended(kv)[1]
    masked = mla_dense_core(attn, q_nope, q_rope, kv, mask)
    assert torch.equal(mla_dense_core(attn, q_nope, q_rope, kv, None), masked)
    monkeypatch.setattr(kernels, "splits", lambda: True)
    with torch.no_grad():  # split, both calls: each split's GEMMs have other row counts than the whole call's,
        # which some BLAS kernels round by (AVX2's MKL)
        assert kernels.attention_splits(q_nope, q_nope, q_nope)
        split_masked = mla_dense_core(attn, q_nope, q_rope, kv, mask)
        assert torch.equal(mla_dense_core(attn, q_nope, q_rope, kv, None), split_masked)
    assert not dec._rows(torch.tensor([0, 3]), T - 3).from_slot_zero  # row 1 from slot 3
    assert not dec._rows(torch.tensor([0, 2]), T, lengths=[T, T - 3]).from_slot_zero  # padding clamped
    assert not dec._rows(zero, T - 1, shift=1).from_slot_zero  # the MTP cache's shifted slots


def _attention_inputs(attn, B=2, T=24, S=40, spread=1.0):
    H, nope, R, C = attn.n_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.kv_lora_rank
    q_nope, q_rope = torch.randn(B, T, H, nope) * spread, torch.randn(B, T, H, R) * spread
    kv = torch.randn(B, S, C + R)
    pos = torch.arange(S - T, S).expand(B, T).clone()
    pos[1] -= 5  # rows at different positions: per-row causal masks
    return q_nope, q_rope, kv, causal_slot_mask(pos, S)


def test_dense_and_absorbed_cores_agree_within_fp32_bound():
    """Both forms against FP64, each within the bound of its sums (``bounds.mla_attention_bound``)."""
    attn = _model().layers[0].attn
    q_nope, q_rope, kv, mask = _attention_inputs(attn)
    exact, bound = mla_attention_bound(attn, q_nope, q_rope, kv, mask)
    for core in (mla_absorbed_core, mla_dense_core):
        err = (core(attn, q_nope, q_rope, kv, mask).double() - exact).abs()
        assert (err <= bound).all(), f"{core.__name__}: max error / bound {(err / bound).max():.3g}"


def test_flushing_subnormal_probabilities_changes_nothing(monkeypatch):
    attn = _model().layers[0].attn
    q_nope, q_rope, kv, mask = _attention_inputs(attn, S=400, T=4, spread=30.0)  # peaked: many subnormals
    scores = torch.randn(2, 4, 4, 400) * 60
    p = attention._softmax(scores, mask, torch.float32)
    monkeypatch.setattr(attention, "FP32_TINY", 0.0)
    p_kept = attention._softmax(scores, mask, torch.float32)
    assert ((p_kept > 0) & (p_kept < torch.finfo(torch.float32).tiny)).any()  # there were subnormals
    assert (p == 0).sum() > (p_kept == 0).sum()
    assert torch.equal(p @ kv[:, None, :, :32], p_kept @ kv[:, None, :, :32])
    out_kept = attention.mla_absorbed_core(attn, q_nope, q_rope, kv, mask)
    monkeypatch.setattr(attention, "FP32_TINY", torch.finfo(torch.float32).tiny)
    assert torch.equal(attention.mla_absorbed_core(attn, q_nope, q_rope, kv, mask), out_kept)
