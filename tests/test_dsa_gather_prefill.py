"""DeepSeek Sparse Attention prefill chunks through the decode cache over gathered latents (``dsa_gathered`` in
sub-chunks of queries): a chunk of T new tokens per row, each query reading and scoring its ``index_topk`` selected
latents only, ``sub_chunk`` queries' picks gathered at a time, against every slot read with the unselected masked
(``dsa_masked``, the oracle; in the compute-bound form the tiny models' chunks take). Both lie within
``mla_attention_bound`` (FP32 sums in any order) of the exact attention over the same selection, for the contiguous
and the paged cache, every sub-chunk size 1..T, rows of different lengths and starts (the server's batches), some
queries seeing fewer than index_topk slots; the default sub-chunk keeps ``GATHER_BUDGET``. ``dsa_gather_pays``
gathers V3.2-shaped prefill chunks over long prompts, not short ones. The decoder's logits of a chunked prefill then
decode, gathered and masked, agree within ``decode_tolerance`` on the tiny V3.2 and GLM-5 models (GLM-5's shared
layers reuse their full layer's slots); greedy ``generate`` gives the same tokens gathered as masked (a prompt
shorter than index_topk: no selection, nothing gathered); the serving engine's chunked prefill gathers through
block tables and equals ``generate``. The tiny models never pay for gathering by the rule, so these tests switch
the path by hand. Mutations (slots shifted by one, every sub-chunk attending to the first sub-chunk's picks) land
far outside the bounds. FP32, CPU."""

import pytest
import torch
from bounds import mla_attention_bound

from flyer.infer import attention
from flyer.infer.attention import Rows, dsa_gathered, dsa_gathered_core, dsa_masked, gather_rows, dsa_gather_pays
from flyer.infer.decoder import Decoder
from flyer.infer.generate import GenerationConfig, generate
from flyer.serve.paged import PagedCache
from tests.hf_models import VOCAB
from tests.test_deepseek_v32_decode import _alone, _engine, _run, decode_tolerance, selection_margin
from tests.test_dsa_gather_decode import TOPK, _caches, _queries, _selection_rows, _shape, _worst
from tests.test_dsa_gather_decode import glm5, v32  # noqa: F401  the tiny V3.2 and GLM-5 models (fixtures)


def _first_picks(attn, q_nope, q_rope, rows: Rows, cache, n: int) -> torch.Tensor:
    """The mutation of a sub-chunked gather: every sub-chunk of n queries attends to the first sub-chunk's picks."""
    slots, valid = rows.selected_slots(attn.index_topk)
    T, outs = q_nope.shape[1], []
    for s in range(0, T, n):
        t = min(n, T - s)
        outs.append(dsa_gathered_core(attn, q_nope[:, s:s + t], q_rope[:, s:s + t],
                                      cache.gather_packed(0, slots[:, :t], torch.float32), valid[:, :t]))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("first", [0, 1])
@torch.no_grad()
def test_prefill_chunk_gathered_in_sub_chunks_is_within_the_fp32_bound(v32, first, monkeypatch):  # noqa: F811
    """A prefill chunk of T = 7 new tokens per row, rows ending at positions 9, 20 and 41 (different starts, as the
    server batches them; the first row's early queries see fewer than index_topk slots), ``first`` empty slots
    before position 0: over the contiguous cache and shuffled paged blocks, gathered in sub-chunks of every size
    1..T (and more) and masked each lie within ``mla_attention_bound`` of the exact attention over the selected
    slots; each sub-chunk gathers only its own queries' picks. Slots shifted by one, or every sub-chunk attending
    to the first sub-chunk's picks, land far outside it."""
    attn = v32.layers[0].attn
    C, R, T = attn.kv_lora_rank, attn.qk_rope_head_dim, 7
    ends = [9, 20, 41]
    B = len(ends)
    rows, _ = _selection_rows(ends, T, first)
    S = rows.n_slots
    slots_BTk, valid_BTk = rows.selected_slots(TOPK)
    assert not valid_BTk[0, 0].all() and valid_BTk[2].all()  # some queries see fewer than index_topk slots
    q_nope, q_rope = _queries(attn, B, T)
    kv = torch.randn(B, S + 1, C + R, generator=torch.Generator().manual_seed(3))  # slot S: past every row
    exact, bound = mla_attention_bound(attn, q_nope, q_rope, kv[:, first:S], rows.selected)
    for cache in _caches(v32.cfg, B, S + 1):
        cache.write(0, torch.arange(S + 1).expand(B, S + 1), latent=kv[..., :C], rope_key=kv[..., C:])
        assert _worst(dsa_masked(attn, q_nope, q_rope, rows, cache, 0), exact, bound) <= 1
        gathers = []
        orig = cache.gather_packed
        monkeypatch.setattr(cache, "gather_packed", lambda layer, s, dtype: gathers.append(s.clone()) or
                            orig(layer, s, dtype))
        for n in range(1, T + 2):
            gathers.clear()
            assert _worst(dsa_gathered(attn, q_nope, q_rope, rows, cache, 0, sub_chunk=n), exact, bound) <= 1, n
            assert len(gathers) == -(-T // n) and torch.equal(torch.cat(gathers, dim=1), slots_BTk)
        monkeypatch.undo()
        shifted = dsa_gathered_core(attn, q_nope, q_rope, cache.gather_packed(0, slots_BTk + 1, torch.float32),
                                    valid_BTk)
        assert _worst(shifted, exact, bound) > 1e3
        assert _worst(_first_picks(attn, q_nope, q_rope, rows, cache, 3), exact, bound) > 1e3


@torch.no_grad()
def test_default_sub_chunks_keep_the_byte_budget(v32, monkeypatch):  # noqa: F811
    """``gather_rows``: V3.2's shape (2048 picks of 576 channels, FP32 scores of 128 heads: 6.8 MB FP32, 4.5 MB BF16)
    gathers one query at a time within ``GATHER_BUDGET``, the bench model's 73. With a budget of 3 of the tiny
    model's queries, ``dsa_gathered``'s default sub-chunks of a 7-token chunk gather 3, 3 and 1 queries' picks for
    one row, one at a time for two."""
    v32_shape = _shape("dsv32")
    bench = _shape("small", n_heads=16, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, kv_lora_rank=64,
                   index_topk=256)
    assert (gather_rows(v32_shape, 1, 4), gather_rows(v32_shape, 1, 2), gather_rows(bench, 1, 4)) == (1, 1, 73)
    attn = v32.layers[0].attn
    C, R = attn.kv_lora_rank, attn.qk_rope_head_dim
    monkeypatch.setattr(attention, "GATHER_BUDGET", 3 * TOPK * ((C + R) * 4 + 8 * attn.n_heads))
    for ends, sizes in (([20], [3, 3, 1]), ([20, 30], [1] * 7)):
        rows, _ = _selection_rows(ends, 7, 0)
        cache = _caches(v32.cfg, len(ends), rows.n_slots)[0]
        gathers = []
        orig = cache.gather_packed
        cache.gather_packed = lambda layer, s, dtype: gathers.append(s.shape[1]) or orig(layer, s, dtype)
        dsa_gathered(attn, *_queries(attn, len(ends), 7), rows, cache, 0)
        assert gathers == sizes


def test_gathered_pays_for_prefill_chunks_over_long_prompts():
    """``dsa_gather_pays`` for prefill chunks: V3.2's shape (k 2048) gathers 256 queries (compute-bound masked
    form: 832 multiply-adds per slot, query and head, ``DENSE_OVER_GATHERED`` times faster than gathered ones) past
    S ~ 8,130 slots, 1024 past ~ 15,090, 128 (absorbed masked form) past 2,071 as a decode step; the bench model's
    (16 heads, latent 64, k 256) 256 past ~ 1,250 (measured: ~ 1,450)."""
    v32_shape = _shape("dsv32")
    bench = _shape("small", n_heads=16, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, kv_lora_rank=64,
                   index_topk=256)  # bench/decode.py's DSA model
    assert attention.dense_prefill_pays(v32_shape, 256) and not attention.dense_prefill_pays(v32_shape, 128)
    assert dsa_gather_pays(v32_shape, 1, 256, 8130) and not dsa_gather_pays(v32_shape, 1, 256, 8120)
    assert dsa_gather_pays(v32_shape, 1, 1024, 15100) and not dsa_gather_pays(v32_shape, 1, 1024, 15080)
    assert dsa_gather_pays(v32_shape, 1, 128, 2071) and not dsa_gather_pays(v32_shape, 1, 128, 2070)
    assert dsa_gather_pays(v32_shape, 4, 256, 65536) and dsa_gather_pays(bench, 1, 256, 1260)
    assert not dsa_gather_pays(bench, 1, 256, 1245)
    assert dsa_gather_pays(v32_shape, 1, 1, 2071) and not dsa_gather_pays(v32_shape, 1, 1, 2070)


def _force(monkeypatch, on: bool) -> None:
    """Every DSA call with a selection gathered (``dsa_gathered``) or masked (``dsa_masked``), whatever its size."""
    monkeypatch.setattr(attention, "dsa_gather_pays", lambda *args: on)


def _gathered_shapes(monkeypatch) -> list[tuple[int, int]]:
    """(B, T) of every ``dsa_gathered`` call from now on (monkeypatched, passed on)."""
    calls, orig = [], attention.dsa_gathered

    def spy(attn, q_nope, *args, **kw):
        calls.append(tuple(q_nope.shape[:2]))
        return orig(attn, q_nope, *args, **kw)
    monkeypatch.setattr(attention, "dsa_gathered", spy)
    return calls


def _prefill_logits(model, prompts: list[list[int]], chunks: list[int], steps: list[list[int]]) -> torch.Tensor:
    """Logits (B, P + len(steps), V) of ``prompts`` (right-padded to P) prefilled through a decoder in ``chunks``
    (each row's real tokens only), then one token per row per step at each row's own position."""
    B, P = len(prompts), max(map(len, prompts))
    dec = Decoder(model, B, P + len(steps) + 1, "absorbed", torch.float32)
    tokens = torch.tensor([p + [0] * (P - len(p)) for p in prompts])
    lengths = [len(p) for p in prompts]
    out, s = [], 0
    for c in chunks:
        real = [max(0, min(c, n - s)) for n in lengths]
        out.append(dec.logits(dec.forward(tokens[:, s:s + c], torch.full((B,), s), real)))
        s += c
    assert s == P
    for i, step in enumerate(steps):
        out.append(dec.logits(dec.forward(torch.tensor(step).view(B, 1), torch.tensor(lengths) + i)))
    return torch.cat(out, 1)


def _compare_prefill(model, monkeypatch) -> None:
    """Prompts of 3 and 22 tokens prefilled in chunks of 6, 9 and 7 (the later ones over more than index_topk slots),
    then 4 decode steps, gathered in sub-chunks of 2 queries (a budget of 2 queries' bytes) and masked: the real
    tokens' logits within ``decode_tolerance``; the chunks gathered; slots shifted by one are far outside."""
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (3, 22)]
    steps = torch.randint(3, VOCAB, (4, 2), generator=g).tolist()
    attn = model.layers[0].attn
    monkeypatch.setattr(attention, "GATHER_BUDGET", 2 * 2 * TOPK * ((attn.kv_lora_rank + attn.qk_rope_head_dim) * 4
                                                                    + 8 * attn.n_heads))
    calls = _gathered_shapes(monkeypatch)
    _force(monkeypatch, True)
    got = _prefill_logits(model, prompts, [6, 9, 7], steps)
    assert (2, 9) in calls and (2, 7) in calls and (2, 6) not in calls  # the first chunk sees 6 slots: no selection
    _force(monkeypatch, False)
    want = _prefill_logits(model, prompts, [6, 9, 7], steps)
    real = torch.tensor([[t < len(p) for t in range(22)] + [True] * 4 for p in prompts])  # (B, 26): not padding
    err = float((got - want).abs()[real].max() / want.abs()[real].max())
    tol = decode_tolerance(model.cfg, 22 + 4)
    assert err <= tol, f"{err:.3g} > {tol:.3g}"
    _force(monkeypatch, True)
    orig = Rows.selected_slots
    monkeypatch.setattr(Rows, "selected_slots", lambda self, k: (orig(self, k)[0] + 1, orig(self, k)[1]))
    wrong = _prefill_logits(model, prompts, [6, 9, 7], steps)
    assert float((wrong - want).abs()[real].max() / want.abs()[real].max()) > 100 * tol


def test_v32_chunked_prefill_logits_gathered_equal_masked(v32, monkeypatch):  # noqa: F811
    _compare_prefill(v32, monkeypatch)


def test_glm5_chunked_prefill_shared_layers_reuse_the_full_layers_slots(glm5, monkeypatch):  # noqa: F811
    _compare_prefill(glm5, monkeypatch)


@pytest.mark.parametrize("family", ["v32", "glm5"])
def test_greedy_generate_gathered_prefill_equals_masked(family, request, monkeypatch):
    """Prompts of 5 (below index_topk: its prefill selects nothing) and 19 tokens, alone and batched, 12 new tokens
    each, sub-chunks of 2 queries: greedy ``generate`` (one prefill forward, then decode) gives the same tokens with
    every selection gathered as masked, on selections without near-ties; the short prompt's prefill gathers
    nothing."""
    model = request.getfixturevalue(family)
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 19)]
    gen = GenerationConfig(max_new_tokens=12, cache_dtype=torch.float32, eos_id=None)
    attn = model.layers[0].attn
    monkeypatch.setattr(attention, "GATHER_BUDGET", 2 * 2 * TOPK * ((attn.kv_lora_rank + attn.qk_rope_head_dim) * 4
                                                                    + 8 * attn.n_heads))
    calls = _gathered_shapes(monkeypatch)
    _force(monkeypatch, True)
    short = generate(model, prompts[:1], GenerationConfig(max_new_tokens=1, cache_dtype=torch.float32)).tokens
    assert not calls  # 5 slots: no query sees more than index_topk, nothing selected
    got = generate(model, prompts, gen).tokens
    assert (2, 19) in calls
    assert min(selection_margin(model, p + w) for p, w in zip(prompts, got)) > 1e-4
    _force(monkeypatch, False)
    assert generate(model, prompts, gen).tokens == got
    assert generate(model, prompts[:1], GenerationConfig(max_new_tokens=1, cache_dtype=torch.float32)).tokens == short


def test_engine_chunked_prefill_gathers_from_paged_blocks_as_generate(v32, monkeypatch):  # noqa: F811
    """The serving engine (paged cache of 4-slot blocks, prefill chunks of 8 tokens over all prefilling requests:
    rows of different starts in one chunk, prompts of 1 to 23 tokens) gathers each prefill chunk's picks through
    the block tables, and each request's greedy tokens are ``generate``'s on its prompt alone, gathered and
    masked."""
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (23, 1, 17, 11)]
    chunks = []
    orig = PagedCache.gather_packed
    monkeypatch.setattr(PagedCache, "gather_packed",
                        lambda self, layer, slots, dtype: chunks.append(slots.shape[1]) or orig(self, layer, slots,
                                                                                                  dtype))
    _force(monkeypatch, True)
    got = _run(_engine(v32, blocks=64, prefill_chunk=8), prompts, 12)
    assert max(chunks) > 1  # prefill chunks gathered, not only decode steps
    assert min(selection_margin(v32, p + w) for p, w in zip(prompts, got)) > 1e-4
    assert got == _alone(v32, prompts, 12)
    _force(monkeypatch, False)
    assert got == _alone(v32, prompts, 12)
