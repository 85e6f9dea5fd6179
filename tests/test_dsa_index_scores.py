"""DSA decode's indexer scores read in place (``dsa_index_scores`` on ``kernels.index_scores``: the index keys of the
contiguous or the paged cache, BF16 or FP32, scored where they lie) against the oracle that copies every key into
FP32 and runs ``Indexer.scores``. Both sum the same FP32 products in other orders, so each score is within
``index_score_bound`` of the other; the selections are the oracle's except where its scores tie within that bound at
the top-k cut. Rows of different lengths, several new tokens, the MTP cache's shifted slots, keys whose width is
not a multiple of 8 and slot counts that are not either (the kernel's scalar tails). Mutations (a slot shifted by
one, the scale squared) land far outside the bound. CPU; skipped where the kernels are not built."""

import pytest
import torch
from bounds import FP32_U

from flyer import kernels
from flyer.config import preset
from flyer.infer.attention import Rows, causal_slot_mask, dsa_index_scores, dsa_selection
from flyer.infer.cache import LatentCache
from flyer.model.attention import MLA, _apply_partial_rope
from flyer.model.rope import rope_cos_sin
from flyer.serve.paged import make_paged_cache

pytestmark = pytest.mark.skipif(kernels.cpu_ops() is None, reason="flyer's CPU kernels are not built")

TOPK = 8


def _attn(index_head_dim: int, index_n_heads: int = 4, **fields) -> MLA:
    cfg = preset("tiny", index_n_heads=index_n_heads, index_head_dim=index_head_dim, index_topk=TOPK, **fields)
    torch.manual_seed(0)
    attn = MLA(cfg, layer_id=0).eval()
    for p in attn.indexer.parameters():  # LayerNorm's unit gain leaves every key the same scale: spread them
        p.data.normal_(0, 0.3)
    return attn


def _rows(cfg, ends: list[int], T: int, first: int) -> Rows:
    pos = torch.tensor(ends).view(-1, 1) - T + torch.arange(T)
    slots = pos + first
    S = int(slots.max()) + 1
    cos, sin = rope_cos_sin(cfg.qk_rope_head_dim, S, cfg)
    return Rows(slots, cos[pos], sin[pos], S, causal_slot_mask(slots, S, first), first)


def _caches(attn: MLA, B: int, n_slots: int, dtype: torch.dtype, bs: int = 8):
    """A contiguous cache and a paged one over shuffled blocks, the same random index keys in both."""
    cfg, K = attn.cfg, attn.indexer.head_dim
    n = -(-n_slots // bs)
    flat = LatentCache(1, B, n * bs, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype, index_dim=K)
    flat.tensors["index_key"].normal_(generator=torch.Generator().manual_seed(3))
    paged = make_paged_cache(cfg, 1, 1 + B * n, bs, dtype)
    paged.tables = torch.randperm(B * n, generator=torch.Generator().manual_seed(1)).add(1).view(B, n)
    blocks = paged.pool.tensors["index_key"][0]
    blocks[paged.tables.flatten()] = flat.tensors["index_key"][0].reshape(B * n, bs, K)
    return flat, paged


def _inputs(attn: MLA, B: int, T: int):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, T, attn.cfg.dim, generator=g)
    return x, attn.query_latent(x)


def index_score_bound(attn: MLA, x: torch.Tensor, q_latent: torch.Tensor, keys_BSK: torch.Tensor,
                      rows: Rows) -> torch.Tensor:
    """(B, T, S) bound on |in place - oracle|: each side sums a head's K products (then the scale's rounding) and
    its H weighted ReLUs in some order, so it is within gamma_{K+H+2} scale sum_h |w_h| sum_i |q_hi k_i| of the
    exact score (ReLU is 1-Lipschitz); twice that between the two. gamma_n = n u / (1 - n u)."""
    ix = attn.indexer
    B, T, _ = x.shape
    H, K = ix.n_heads, ix.head_dim
    q = ix.wq_b(q_latent).view(B, T, H, K)
    q = _apply_partial_rope(q, rows.cos, rows.sin, ix.rope_dim).double()
    w = (x.double() @ ix.weights_proj.weight.double().t()) * H ** -0.5  # (B, T, H)
    A = q.abs() @ keys_BSK.double().abs().transpose(-1, -2).unsqueeze(1)  # (B, T, H, S)
    n = K + H + 2
    return 2 * n * FP32_U / (1 - n * FP32_U) * K ** -0.5 * (w.abs().unsqueeze(-1) * A).sum(2)


def _oracle(attn, x, q_latent, rows, cache) -> torch.Tensor:
    with kernels.disabled():
        return dsa_index_scores(attn, x, q_latent, rows, cache)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("K, ends, T, first", [(64, [70, 41, 90], 1, 0), (64, [83, 57], 3, 1), (36, [45, 61], 2, 0)])
@torch.no_grad()
def test_in_place_scores_within_bound_of_copy(dtype, K, ends, T, first):
    attn = _attn(K)
    rows = _rows(attn.cfg, ends, T, first)
    x, q_latent = _inputs(attn, len(ends), T)
    keys_BSK = None
    for cache in _caches(attn, len(ends), rows.n_slots, dtype):
        ref = _oracle(attn, x, q_latent, rows, cache)
        got = dsa_index_scores(attn, x, q_latent, rows, cache)
        if keys_BSK is None:
            keys_BSK = rows.attended(cache.read(0, "index_key", rows.n_slots, torch.float32))[0]
            bound = index_score_bound(attn, x, q_latent, keys_BSK, rows)
        assert got.shape == ref.shape == (len(ends), T, rows.n_slots - first)
        err = (got.double() - ref.double()).abs()
        assert bool((err <= bound).all()), float((err - bound).max())
        # mutations: the keys one slot on, the scale squared
        shifted = torch.cat([got[..., 1:], got[..., :1]], dim=-1)
        assert float(((shifted.double() - ref.double()).abs() / bound).amax()) > 1e3
        wrong = kernels.index_scores
        try:
            kernels.index_scores = lambda q, w, pool, tables, f, n, scale: wrong(q, w, pool, tables, f, n, scale ** 2)
            bad = dsa_index_scores(attn, x, q_latent, rows, cache)
        finally:
            kernels.index_scores = wrong
        assert float(((bad.double() - ref.double()).abs() / bound).amax()) > 1e3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@torch.no_grad()
def test_selection_is_the_oracles_but_for_ties_within_the_bound(dtype):
    attn = _attn(64)
    ends, T, first = [60, 33, 95, 12], 2, 0
    rows = _rows(attn.cfg, ends, T, first)
    x, q_latent = _inputs(attn, len(ends), T)
    for cache in _caches(attn, len(ends), rows.n_slots, dtype):
        ref_scores = _oracle(attn, x, q_latent, rows, cache)
        keys_BSK = rows.attended(cache.read(0, "index_key", rows.n_slots, torch.float32))[0]
        bound = index_score_bound(attn, x, q_latent, keys_BSK, rows)
        with kernels.disabled():
            ref = dsa_selection(attn, x, q_latent, rows, cache)[:, 0]
        got = dsa_selection(attn, x, q_latent, rows, cache)[:, 0]
        visible = rows.mask[:, 0, :, first:]
        kth = ref_scores.masked_fill(~visible, float("-inf")).topk(TOPK, dim=-1).values[..., -1:]
        differ = got != ref
        near_cut = (ref_scores - kth).abs() <= 2 * bound
        assert bool((~differ | near_cut).all())
        assert torch.equal(got.sum(-1), ref.sum(-1))  # as many per query


def test_prefill_chunks_keep_the_copy(monkeypatch):
    """A call in the compute-bound form (``dense_prefill_pays``) scores a new FP32 copy (the kernel is not called)."""
    attn = _attn(64, kv_lora_rank=64)
    T = 80  # dense_prefill_pays from T = 65 on at latent 64
    rows = _rows(attn.cfg, [100], T, 0)
    x, q_latent = _inputs(attn, 1, T)
    cache = _caches(attn, 1, rows.n_slots, torch.bfloat16)[0]
    monkeypatch.setattr(kernels, "index_scores", lambda *a: pytest.fail("kernel called for a prefill chunk"))
    with torch.no_grad():
        assert dsa_index_scores(attn, x, q_latent, rows, cache).shape == (1, T, rows.n_slots)
