"""DeepSeek-V3.2 decoding (DeepSeek Sparse Attention against the decode caches): every layer caches each
token's indexer key, and past ``index_topk`` slots each query attends to the keys the training path
selects. The decoder's logits (absorbed and naive, prefill chunks then single tokens, the MTP block's
too, its cache shifted as the server's) equal ``model(tokens)`` within FP32 rounding with the same
selected keys; greedy ``generate`` equals transformers' ``generate``, speculative MTP decoding the plain
greedy tokens; the serving engine (prefix sharing of blocks past ``index_topk``, MTP drafts) gives each
request's ``generate`` tokens; the on-disk prefix cache stores and loads the index keys; the allocated
caches' bytes per token are ``flyer info``'s. The tiny "v32" family (index_topk 8) on 29 to 42 tokens,
FP32 caches, CPU."""

import contextlib

import pytest
import torch
from bounds import FP32_U

from flyer.infer import attention
from flyer.infer.cache import make_cache
from flyer.infer.decoder import Decoder
from flyer.infer.generate import GenerationConfig, generate, open_prefix_cache
from flyer.interop.hf import load_hf
from flyer.model.counts import kv_cache_bytes_per_token
from flyer.serve.engine import Engine, EngineConfig, SamplingOptions
from flyer.serve.paged import blocks_for_memory, make_paged_cache
from tests.hf_models import VOCAB, add_mtp_layer, build

TOPK = 8


@pytest.fixture(scope="module")
def v32(tmp_path_factory):
    """(flyer's model with its MTP layer, transformers' model of the same main weights)."""
    path = tmp_path_factory.mktemp("v32")
    ref = build("v32", path)
    add_mtp_layer(ref, path)
    model, cfg, _ = load_hf(path)
    assert (cfg.index_topk, cfg.mtp_depth) == (TOPK, 1)
    return model, ref


def _tokens(T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


def decode_tolerance(cfg, T: int) -> float:
    """Bound on max|decode - training| / max|logit| with FP32 weights and caches (``test_infer``: an FP32
    cache matches the training path to float rounding), to first order as ``logit_tolerance`` bounds it:
    each of the L layers (and the MTP block) sums at most dim, inter_dim, q_lora_rank, kv_lora_rank + rope
    (absorbed scores) and T (attention) terms in another order, n u each, the terms' absolute sum taken as
    the logit scale; the same rope tables on both sides."""
    sums = cfg.dim + cfg.inter_dim + cfg.q_lora_rank + cfg.kv_lora_rank + cfg.qk_rope_head_dim + T
    return (cfg.n_layers + cfg.mtp_depth) * sums * FP32_U


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def selection_margin(model, seq: list[int]) -> float:
    """The smallest gap between a query's index_topk-th and next index score over every layer with an indexer
    (GLM-5: its full ones) and query of ``seq`` (training path), relative to the query's largest. Two keys
    tied at the boundary (all indexer heads' ReLUs 0 for both: a score of exactly 0, which the tiny model's 8
    heads make common) leave the choice to top-k's order, which a batch's shape changes: the greedy
    comparisons below use tokens without such ties."""
    scores = []
    full = [layer for layer in model.layers if hasattr(layer.attn, "indexer")]
    for layer in full:
        def record(*args, _orig=layer.attn.indexer.scores):
            scores.append(_orig(*args))
            return scores[-1]
        layer.attn.indexer.scores = record
    try:
        with torch.no_grad():
            model(torch.tensor([seq]))
    finally:
        for layer in full:
            del layer.attn.indexer.scores
    k = model.cfg.index_topk
    causal = torch.ones(len(seq), len(seq), dtype=torch.bool).tril()
    top = torch.stack(scores)[:, 0].masked_fill(~causal, float("-inf")).topk(k + 1, dim=-1).values[:, k:]
    return float(((top[..., k - 1] - top[..., k]) / top[..., 0].abs()).min())


@contextlib.contextmanager
def _selections(blocks):
    """Every ``Indexer.select`` result of ``blocks`` (MLA blocks), as (block index, mask (B, T, S)) in call order."""
    calls = []
    for i, block in enumerate(blocks):
        def select(scores, visible, _orig=block.attn.indexer.select, _i=i):
            calls.append((_i, _orig(scores, visible)))
            return calls[-1][1]
        block.attn.indexer.select = select
    try:
        yield calls
    finally:
        for block in blocks:
            del block.attn.indexer.select


def _as_full(calls, chunks: list[tuple[int, int]], n_blocks: int, B: int, T: int):
    """Per block, the (B, T, T) keys each position attends to, from the decode calls' selections over
    the slots from ``Rows.first`` of the chunks (start, length) in order; positions no call selected for (a
    chunk whose queries see at most index_topk slots) keep every causal key, as ``select`` would."""
    full = [torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T).clone() for _ in range(n_blocks)]
    it = iter(calls)
    for s, c in chunks:
        for _ in range(n_blocks if s + c > TOPK else 0):  # the last query sees s + c slots
            i, sel = next(it)
            full[i][:, s:s + c, :sel.shape[-1]] = sel
    assert next(it, None) is None
    return full


def _decode(model, tokens, mode: str, chunks: list[int]):
    """Logits (B, T, V) of ``tokens`` fed in ``chunks`` through a decoder, and its selected keys (None:
    the indexer never selected)."""
    B, T = tokens.shape
    dec = Decoder(model, B, T, mode, torch.float32)
    spans = [(sum(chunks[:i]), c) for i, c in enumerate(chunks)]
    with _selections(model.layers) as calls:
        out = [dec.logits(dec.forward(tokens[:, s:s + c], torch.full((B,), s))) for s, c in spans]
    return torch.cat(out, 1), _as_full(calls, spans, len(model.layers), B, T) if calls else None


@pytest.mark.parametrize("mode, dense", [("absorbed", False), ("absorbed", True), ("naive", False)])
def test_decoded_logits_and_selected_keys_equal_the_training_path(v32, mode, dense, monkeypatch):
    """A 5-token prefill then one token at a time, and chunks of 6, 4, 3 (straddling index_topk), 17 and
    10: logits within ``decode_tolerance`` of ``model(tokens)`` and every layer's selected keys the
    training path's. ``dense``: every chunk in the compute-bound form (its masked SDPA), which this
    model's small latent never pays for (``dense_prefill_pays``). The same decode without the selection
    (dense MLA over the cache) is far outside the bound."""
    model, _ = v32
    if dense:
        monkeypatch.setattr(attention, "dense_prefill_pays", lambda attn, T: T > 1)
    T = 40
    tokens = _tokens(T)
    with torch.no_grad(), _selections(model.layers) as calls:
        want = model(tokens)
    trained = [sel for _, sel in calls]
    assert len(trained) == model.cfg.n_layers
    tol = decode_tolerance(model.cfg, T)
    for chunks in ([5] + [1] * (T - 5), [6, 4, 3, 17, 10]):
        got, selected = _decode(model, tokens, mode, chunks)
        err = _rel(got, want)
        assert err <= tol, f"{chunks[:5]}: {err:.3g} > {tol:.3g}"
        for layer, (a, b) in enumerate(zip(selected, trained)):
            assert torch.equal(a, b), f"layer {layer}: the decoder selects other keys than the training path"
    monkeypatch.setattr(attention, "dsa_selection", lambda *args: None)
    assert _rel(_decode(model, tokens, mode, [6, 4, 3, 17, 10])[0], want) > 100 * tol


@pytest.mark.parametrize("shift", [0, 1])
def test_mtp_block_decodes_as_the_training_path(v32, shift):
    """The MTP block (an indexer of its own, its one-layer cache; ``shift`` 1: position p in slot p + 1,
    the server's layout) fed in chunks: its logits and selected keys are ``mtp_hidden``'s."""
    model, _ = v32
    T = 36
    tokens = _tokens(T, 1)
    mtp = [model.mtp[0].block]
    with torch.no_grad(), _selections(mtp) as calls:
        h = model.hidden(tokens)
        want = model.head(model.mtp[0].norm(model.mtp_hidden(h, tokens)[0])).float()
    trained = calls[0][1]
    cache = make_cache(model.cfg, 1, 2, T + shift, "absorbed", torch.float32)
    dec = Decoder(model, 2, T, "absorbed", torch.float32, with_mtp=True, mtp_cache=cache)
    spans = [(0, 7), (7, 3), (10, 1), (11, 14), (25, 1), (26, 9)]  # the T - 1 MTP positions
    with _selections(mtp) as calls:
        got = torch.cat([dec.mtp_logits(dec.mtp_forward(h[:, s:s + c], tokens[:, s + 1:s + 1 + c],
                                                        torch.full((2,), s), shift=shift)) for s, c in spans], 1)
    assert _rel(got, want) <= decode_tolerance(model.cfg, T)
    assert torch.equal(_as_full(calls, spans, 1, 2, T - 1)[0], trained)


def test_greedy_equals_transformers_and_mtp_speculation_keeps_it(v32):
    """Two prompts of 5 and 13 tokens batched, 24 new tokens each (past index_topk): transformers'
    greedy tokens; speculative MTP decoding with 1 and 2 drafts per step gives the same tokens."""
    model, ref = v32
    prompts = [_tokens(13, 5)[0, :5].tolist(), _tokens(13, 5)[1].tolist()]
    want = [ref.generate(torch.tensor([p]), do_sample=False, max_new_tokens=24, eos_token_id=None,
                         pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    assert min(selection_margin(model, p + w) for p, w in zip(prompts, want)) > 1e-4
    gen = dict(max_new_tokens=24, cache_dtype=torch.float32)
    assert generate(model, prompts, GenerationConfig(**gen)).tokens == want
    for k in (1, 2):
        res = generate(model, prompts, GenerationConfig(**gen, speculative="mtp", draft_tokens=k))
        assert res.tokens == want and res.drafted > 0, k


def _engine(model, blocks: int, block_size: int = 4, **over) -> Engine:
    bpt = make_cache(model.cfg, model.cfg.n_layers + 1, 1, 1, "absorbed", torch.float32, "meta").bytes_per_token()
    return Engine(model, EngineConfig(kv_cache_bytes=blocks * block_size * bpt, block_size=block_size,
                                      cache_dtype=torch.float32, **over))


def _run(eng: Engine, prompts, max_tokens: int) -> list[list[int]]:
    outs = [[] for _ in prompts]
    for i, p in enumerate(prompts):
        eng.submit(p, SamplingOptions(max_tokens=max_tokens), lambda e, i=i: outs[i].append(e.token))
    eng.run_until_idle()
    return outs


def _alone(model, prompts, max_new: int) -> list[list[int]]:
    return [generate(model, [p], GenerationConfig(max_new_tokens=max_new, cache_dtype=torch.float32)).tokens[0]
            for p in prompts]


@pytest.mark.parametrize("speculative", [None, "mtp"])
def test_engine_equals_generate_with_shared_prefix_blocks_past_index_topk(v32, speculative):
    """Four requests at once (chunked prefill beside decoding rows): two share a 12-token prefix (3 blocks
    of 4, past index_topk), which the second takes from the prefix index with its index keys; each
    request's greedy tokens are ``generate``'s on its prompt alone, with and without MTP drafts."""
    model, _ = v32
    head = _tokens(12, 6)[0].tolist()
    prompts = [head + [5, 6, 7], _tokens(9, 7)[0].tolist(), head + [9, 10, 11, 12, 13], [17]]
    want = _alone(model, prompts, 20)
    assert min(selection_margin(model, p + w) for p, w in zip(prompts, want)) > 1e-4
    eng = _engine(model, blocks=64, prefill_chunk=8, speculative=speculative)
    assert "index_key" in eng.cache.pool.tensors
    assert _run(eng, prompts, 20) == want
    assert eng.alloc.hits == 3 and eng.alloc.used == 0
    if speculative:
        assert "index_key" in eng.mtp_cache.pool.tensors and eng.drafted > 0


def test_on_disk_prefix_cache_stores_and_loads_index_keys(v32, tmp_path):
    """``generate`` with an on-disk prefix cache: the blocks stored hold every cache tensor, the index keys
    of the main model and of the MTP block among them; a second run loads them and gives the same tokens
    (the prompt 26 tokens, 3 blocks of 8). A block stored without index keys (another layout) is
    mismatched, not loaded; the naive layout has another fingerprint."""
    model, _ = v32
    prompt = _tokens(26, 6)[0].tolist()
    gen = dict(max_new_tokens=16, cache_dtype=torch.float32)
    cold = generate(model, [prompt], GenerationConfig(**gen)).tokens
    pc = open_prefix_cache(model, tmp_path, cache_dtype=torch.float32, block_size=8)
    assert generate(model, [prompt], GenerationConfig(**gen, prefix_cache=pc)).tokens == cold
    assert (pc.stats.hits, pc.stats.stored) == (0, 3)
    pc = open_prefix_cache(model, tmp_path, cache_dtype=torch.float32, block_size=8)
    hot = generate(model, [prompt], GenerationConfig(**gen, prefix_cache=pc))
    assert hot.tokens == cold and pc.stats.hits == 3 and pc.stats.tokens_loaded == 24
    key = pc.block_keys(prompt)[2]
    L, K = model.cfg.n_layers, model.cfg.index_head_dim
    expect = {"latent": ((L, 8, 16), torch.float32), "rope_key": ((L, 8, 8), torch.float32),
              "index_key": ((L, 8, K), torch.float32), "mtp.latent": ((1, 8, 16), torch.float32),
              "mtp.rope_key": ((1, 8, 8), torch.float32), "mtp.index_key": ((1, 8, K), torch.float32)}
    blk = pc.load(key, prompt[16:24], expect)
    assert blk is not None and blk["index_key"].abs().sum() > 0 and blk["mtp.index_key"].abs().sum() > 0
    pc.store(key, prompt[16:24], {k: v for k, v in blk.items() if "index_key" not in k})
    mismatched = pc.stats.mismatched
    assert pc.load(key, prompt[16:24], expect) is None and pc.stats.mismatched == mismatched + 1
    assert open_prefix_cache(model, tmp_path, attention="naive", cache_dtype=torch.float32,
                             block_size=8).fingerprint != pc.fingerprint


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cache_bytes_per_token_count_the_index_keys(v32, dtype):
    """Every cache a V3.2 model decodes with holds ``kv_cache_bytes_per_token`` (``flyer info``: the
    indexer key counted per layer) at the cache dtype's size; the paged pool's block count follows."""
    model, _ = v32
    cfg, size = model.cfg, dtype.itemsize
    per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.index_head_dim
    assert kv_cache_bytes_per_token(cfg, size) == cfg.n_layers * per_layer * size
    for mode, absorbed in (("absorbed", True), ("naive", False)):
        cache = make_cache(cfg, cfg.n_layers, 1, 1, mode, dtype, "meta")
        assert cache.tensors["index_key"].shape == (cfg.n_layers, 1, 1, cfg.index_head_dim)
        assert cache.bytes_per_token() == kv_cache_bytes_per_token(cfg, size, absorbed=absorbed)
    paged = make_paged_cache(cfg, cfg.n_layers, 3, 4, dtype, "meta")
    assert paged.bytes_per_token() == kv_cache_bytes_per_token(cfg, size)
    assert blocks_for_memory(cfg, 10 * 4 * kv_cache_bytes_per_token(cfg, size), 4, dtype) == 10
    res = generate(model, [[5, 6, 7]], GenerationConfig(max_new_tokens=1, cache_dtype=dtype))
    assert res.cache_bytes_per_token == kv_cache_bytes_per_token(cfg, size)


def test_finished_rows_keep_their_index_keys(v32):
    """``keep_rows`` (a finished row leaves the batch) keeps each remaining row's index keys with its latents."""
    model, _ = v32
    for mode in ("absorbed", "naive"):
        dec = Decoder(model, 3, 12, mode, torch.float32, with_mtp=True)
        dec.forward(torch.randint(3, VOCAB, (3, 12)), torch.zeros(3, dtype=torch.long))
        before = {k: t.clone() for k, t in dec.cache.tensors.items()}
        dec.keep_rows(torch.tensor([2, 0]))
        assert set(dec.cache.tensors) == set(before) and "index_key" in before
        for k, t in dec.cache.tensors.items():
            assert torch.equal(t, before[k][:, [2, 0]]), (mode, k)
        assert dec.mtp_cache.tensors["index_key"].shape[1] == 2
