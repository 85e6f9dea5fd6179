"""DSA's indexer under ``--cache-dtype fp8`` (``flyer.infer.indexer_fp8``) against oracles written here from
DeepSeek-V3.2-Exp's released ``inference/model.py`` and ``kernel.py``: the Hadamard matrix (scipy's, else
Sylvester's construction in numpy) applied in FP64 to the channels in the checkpoint's order, ``act_quant``'s
UE8M0 rule with its own bit arithmetic, ``fp8_index``'s formula in FP64.

Exact where flyer and the oracle round the same values (the quantizer; the formula's terms are exact products);
elsewhere within bounds derived from FP32 and E4M3 rounding: flyer's FP32 rotation is within (d + 1) u d^-0.5
sum|x| of the exact one, so each code is act_quant's of some value in that interval; the FP8 scores are within
the E4M3 bound (2^-4 relative per code, 2^-10 scale absolute below the normal range) of the BF16 path's. The
decoder's cache holds E4M3 keys and one FP32 scale each; ``flyer generate --cache-dtype fp8`` gives the greedy
tokens of an eager reference selecting with the oracle's scores, the serving pool the same tokens with the
smaller keys counted, the prefix cache restores the keys bit for bit and keeps the layouts apart. Decode-shaped
calls score the cached codes in place (``kernels.index_scores``), contiguous or paged, within ``fp8_index``'s FP32
bound of the exact scores as the eager gather is. Mutations (no rotation, scales not UE8M0, the query scale dropped,
the key scale dropped, in the eager formula or the kernel, BF16 keys in the pool) fail."""

import json

import numpy as np
import pytest
import torch
from bounds import FP32_U

from flyer import kernels
from flyer.cli import main
from flyer.config import preset
from flyer.errors import FieldError
from flyer.infer import indexer_fp8
from flyer.infer.attention import Rows, causal_slot_mask, dsa_index_scores
from flyer.infer.cache import Fp8LatentCache, make_cache
from flyer.infer.cache_fp8 import FP8, latent_scales, pack_rows, token_bytes, unpack_rows
from flyer.infer.decoder import Decoder
from flyer.infer.generate import GenerationConfig, generate, open_prefix_cache, prefill
from flyer.interop.hf import load_hf
from flyer.interop.hf_names import rope_permutation
from flyer.model.attention import MLA, Indexer
from flyer.model.counts import kv_cache_bytes_per_token, kv_cache_bytes_per_token_fp8
from flyer.model.rope import rope_cos_sin
from flyer.model.transformer import Transformer
from flyer.serve.engine import Engine, EngineConfig, SamplingOptions
from flyer.serve.paged import blocks_for_memory, make_paged_cache
from tests.hf_models import build
from tests.test_dsa_index_scores import _rows

TOPK = 8
E4M3_U = 2.0**-4  # E4M3's unit roundoff: 3 mantissa bits, round to nearest
E4M3_SUB = 2.0**-10  # half E4M3's subnormal step (2^-9), in units of the scale


# ---- the oracle ---------------------------------------------------------------------------------------------

def _hadamard(d: int) -> np.ndarray:
    try:
        from scipy.linalg import hadamard  # fast_hadamard_transform's reference multiplies by this matrix
        return hadamard(d).astype(np.float64)
    except ImportError:
        h = np.ones((1, 1))
        while h.shape[0] < d:
            h = np.block([[h, h], [h, -h]])
        return h


def _rotate(cfg, x: torch.Tensor) -> torch.Tensor:
    """FP64 ``rotate_activation`` of flyer indexer vectors x (..., d): back to the checkpoint's channel order (V3.2:
    the rope rows rotate-half, as the import permutes them), then H x / sqrt(d)."""
    d, R = cfg.index_head_dim, cfg.qk_rope_head_dim
    perm = torch.arange(d)
    if not cfg.indexer_types:
        perm[:R] = rope_permutation(R)  # flyer channel j is the checkpoint's perm[j]
    ckpt = x.double()[..., torch.argsort(perm)]
    return ckpt @ torch.from_numpy(_hadamard(d)).t() * d ** -0.5


def _rotation_error(x: torch.Tensor) -> torch.Tensor:
    """(..., 1): bound on |FP32 rotation - exact| per channel: d + 1 roundings (the sum, the rounded d^-0.5) of
    terms of absolute sum d^-0.5 sum|x|."""
    d = x.shape[-1]
    return (d + 1) * FP32_U * d ** -0.5 * x.double().abs().sum(-1, keepdim=True)


def _ue8m0(amax: torch.Tensor) -> torch.Tensor:
    """act_quant's scale of FP32 amax: max(amax, 1e-4) * fp8_max_inv in FP32, then fast_round_scale's bit rule
    (the exponent, plus one where the mantissa is not zero)."""
    s = amax.float().clamp(min=1e-4) * torch.tensor(1 / 448.0, dtype=torch.float32)
    bits = s.view(torch.int32)
    e = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).int()
    return ((e + 127) << 23).view(torch.float32)


def _act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """kernel.py ``act_quant(x, 128, "ue8m0")`` of x (..., d), d <= 128 (one group): (codes E4M3, scale (..., 1))."""
    scale = _ue8m0(x.float().abs().amax(-1, keepdim=True))
    return (x.float() / scale).clamp(-448, 448).to(FP8), scale


def _assert_codes(codes: torch.Tensor, scale: torch.Tensor, exact: torch.Tensor, err: torch.Tensor) -> None:
    """``codes`` (..., d) and ``scale`` (..., 1) are act_quant's of some values within ``err`` of ``exact`` (FP64):
    the scale that of an amax in [amax - e, amax + e], each code a round to nearest of a value in [x - e, x + e]
    over that scale."""
    amax, e = exact.abs().amax(-1, keepdim=True), err.amax(-1, keepdim=True) * (1 + 1e-6)
    assert ((_ue8m0((amax - e).clamp(min=0)) <= scale) & (scale <= _ue8m0(amax + e))).all(), "scale"
    lo = ((exact - err) / scale).clamp(-448, 448).float().to(FP8).float()
    hi = ((exact + err) / scale).clamp(-448, 448).float().to(FP8).float()
    got = codes.float()
    assert ((lo <= got) & (got <= hi)).all(), f"{int(((got < lo) | (got > hi)).sum())} codes off"


def _fp8_index(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor, k_s: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """kernel.py ``fp8_index`` in FP64 of code values q (B, T, H, d), weights w (B, T, H), key codes k (B, S, d),
    key scales k_s (B, S): (scores (B, T, S), bound on any FP32 evaluation's error): each head sums d exact
    products, the heads H weighted ReLUs (1-Lipschitz), then one exact power-of-two scale: gamma_{d+H+2} of the
    absolute terms."""
    dots = q.double() @ k.double().transpose(-1, -2).unsqueeze(1)  # (B, T, H, S)
    A = q.double().abs() @ k.double().abs().transpose(-1, -2).unsqueeze(1)
    n = q.shape[-1] + q.shape[-2] + 2
    ks = k_s.double().unsqueeze(1)
    score = (w.double().unsqueeze(-1) * dots.relu()).sum(2) * ks
    return score, n * FP32_U / (1 - n * FP32_U) * (w.double().abs().unsqueeze(-1) * A).sum(2) * ks


def _oracle_scores(ix: Indexer, cfg, x, q_latent, k_BSK, cos, sin) -> torch.Tensor:
    """The released indexer's scores (B, T, S) in FP64: rotate, act_quant, fp8_index, from flyer's (transformers')
    queries, weights and keys."""
    q, w = ix.queries(x, q_latent, cos, sin)
    qc, qs = _act_quant(_rotate(cfg, q).float())
    kc, ks = _act_quant(_rotate(cfg, k_BSK).float())
    return _fp8_index(qc.float(), w * qs.squeeze(-1) * ix.head_dim ** -0.5, kc.float(), ks.squeeze(-1))[0]


# ---- the pieces -------------------------------------------------------------------------------------------------

def _cfg(**over):
    return preset("tiny", **{"vocab_size": 64, "index_topk": TOPK, "index_n_heads": 4, "index_head_dim": 32, **over})


@pytest.mark.parametrize("types", [(), ("full", "shared", "full", "shared")])  # V3.2's rope rows; GLM-5's
def test_rotation_is_the_normalized_hadamard_in_the_checkpoints_order(types):
    cfg = _cfg(indexer_types=types)
    x = torch.randn(64, cfg.index_head_dim, generator=torch.Generator().manual_seed(0)) * 3
    got = indexer_fp8.rotate(x, indexer_fp8.rotation(cfg))
    err = (got.double() - _rotate(cfg, x)).abs()
    assert (err <= _rotation_error(x)).all()
    plain = x.double() @ torch.from_numpy(_hadamard(cfg.index_head_dim)) * cfg.index_head_dim ** -0.5
    assert ((got.double() - plain).abs() > 1e3 * _rotation_error(x)).any() == (not types)  # V3.2: permuted
    assert (x.double() - _rotate(cfg, x)).abs().max() > 1e3 * _rotation_error(x).max()  # mutation: no rotation


def _quantizer_inputs() -> torch.Tensor:
    """Rows of 32 or 128 values: magnitudes 1e-6 .. 1e3; amax exactly 448 2^k (the power's edge) and one float
    either side; amax in [1e-4, 0.0448) (act_quant's floor on amax, not on amax / 448); all zero."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 128, generator=g) * torch.logspace(-6, 3, 40).view(-1, 1)
    edge = torch.tensor(448.0 * 2.0**-6)
    for i, a in enumerate((edge, torch.nextafter(edge, torch.tensor(0.0)), torch.nextafter(edge, torch.tensor(1e9)))):
        x[i] = x[i].clamp(-1e-3, 1e-3)
        x[i, 5] = a
    x[3] = x[3].clamp(-0.01, 0.01)
    x[4] = 0
    return x


@pytest.mark.parametrize("d", [32, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantizer_is_act_quant_ue8m0(d, dtype):
    x = _quantizer_inputs()[:, :d].to(dtype)
    codes, scale = indexer_fp8.quantize(x)
    want_codes, want_scale = _act_quant(x)
    assert scale.shape == (40, 1) and torch.equal(scale, want_scale)
    assert torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8))
    # mutations: FlashMLA's floor on amax / 448 (row 3), no power-of-two rounding
    assert not torch.equal(latent_scales(x), want_scale)
    assert not torch.equal(x.float().abs().amax(-1, keepdim=True).clamp(min=1e-4) / 448, want_scale)


def _attn(cfg) -> MLA:
    torch.manual_seed(0)
    attn = MLA(cfg, layer_id=0).eval()
    for p in attn.indexer.parameters():  # LayerNorm's unit gain leaves every key the same scale: spread them
        p.data.normal_(0, 0.3)
    return attn


def _inputs(attn: MLA, B: int, S: int, T: int):
    """(x of every slot (B, S, D), its query latents, cos, sin): the last T slots are the new tokens."""
    x = torch.randn(B, S, attn.cfg.dim, generator=torch.Generator().manual_seed(2))
    cos, sin = rope_cos_sin(attn.cfg.qk_rope_head_dim, S, attn.cfg)
    return x, attn.query_latent(x), cos, sin


def _filled(attn: MLA, B: int, S: int, T: int):
    """An FP8 cache holding S slots' index keys, and the ``Rows`` of the last T."""
    cfg = attn.cfg
    x, q_latent, cos, sin = _inputs(attn, B, S, T)
    cache = make_cache(cfg, 1, B, S, "absorbed", FP8)
    pos = torch.arange(S).expand(B, S)
    keys = attn.indexer.keys(x, cos, sin)
    cache.write(0, pos, index_key=keys)
    new = pos[:, S - T:]
    rows = Rows(new, cos[new], sin[new], S, causal_slot_mask(new, S, 0), 0)
    return cache, rows, x[:, S - T:], q_latent[:, S - T:], keys


@torch.no_grad()
def test_cached_keys_queries_and_scores_are_deepseeks():
    """The cache's keys: act_quant of the rotated keys (within the rotation's FP32 error); the queries the same,
    their weights weights_proj(x) H^-0.5 q_scale d^-0.5; the scores ``fp8_index`` of those codes."""
    cfg = _cfg()
    attn = _attn(cfg)
    B, S, T = 2, 21, 3
    cache, rows, x, q_latent, keys = _filled(attn, B, S, T)
    assert isinstance(cache, Fp8LatentCache)
    kc, ks = cache.tensors["index_key"][0], cache.tensors["index_key_scale"][0]
    assert kc.dtype == FP8 and ks.dtype == torch.float32 and ks.shape == (B, S, 1)
    _assert_codes(kc, ks, _rotate(cfg, keys), _rotation_error(keys))
    ix = attn.indexer
    q, w = ix.queries(x, q_latent, rows.cos, rows.sin)
    qc, weights = indexer_fp8.index_queries(ix, x, q_latent, rows.cos, rows.sin, cache.index_rotation)
    qs = weights / (w * ix.head_dim ** -0.5)  # the query scale each head's weight carries: a power of two
    assert torch.equal(torch.frexp(qs)[0].abs(), torch.full_like(qs, 0.5)), "weights without q_scale"
    _assert_codes(qc, qs.unsqueeze(-1), _rotate(cfg, q), _rotation_error(q))
    exact_w = w.double() * qs.double() * ix.head_dim ** -0.5
    assert ((weights.double() - exact_w).abs() <= 2 * FP32_U * exact_w.abs()).all()
    got = dsa_index_scores(attn, x, q_latent, rows, cache)
    want, bound = _fp8_index(qc, weights, kc.float(), ks.squeeze(-1))
    assert got.shape == (B, T, S) and ((got.double() - want).abs() <= bound).all()
    # mutation: the key scale not applied
    unscaled = _fp8_index(qc, weights, kc.float(), torch.ones_like(ks.squeeze(-1)))[0]
    assert ((unscaled - want).abs() > 1e3 * bound).any()


def test_head_weights_are_a_bf16_linears_in_a_bf16_model():
    """DeepSeek's ``weights_proj`` is a Linear of the model's dtype: in a BF16 model the FP8 path's head weights are
    weights_proj(x) rounded to BF16 and scaled by H^-0.5 in it (its BF16 Linear's, within one rounding: the FP32
    sums' order), then by the query scale and d^-0.5; the BF16 path keeps transformers' FP32 weights."""
    cfg = _cfg()
    attn = _attn(cfg).to(torch.bfloat16)
    ix = attn.indexer
    x = torch.randn(2, 5, cfg.dim, generator=torch.Generator().manual_seed(3)).bfloat16()
    cos, sin = rope_cos_sin(cfg.qk_rope_head_dim, 5, cfg)
    q_latent = attn.query_latent(x)
    _, w32 = ix.queries(x, q_latent, cos, sin)
    _, wb = ix.queries(x, q_latent, cos, sin, torch.bfloat16)
    official = (torch.nn.functional.linear(x, ix.weights_proj.weight) * ix.n_heads ** -0.5).float()
    assert torch.equal(wb, wb.bfloat16().float()) and not torch.equal(wb, w32)
    assert ((wb - official).abs() <= 2.0**-8 * official.abs()).all()
    _, weights = indexer_fp8.index_queries(ix, x, q_latent, cos, sin, indexer_fp8.rotation(cfg))
    qs = weights / (wb * ix.head_dim ** -0.5)  # the query scale, a power of two, on the BF16 weights
    assert torch.equal(torch.frexp(qs)[0].abs(), torch.full_like(qs, 0.5))


def _exact_scores(ix: Indexer, cfg, x, q_latent, keys, cos, sin, quantized: bool):
    """(FP64 scores of the BF16 path's formula on unrotated q and k, bound on |FP8 or rotated path - them|). The
    rotated vectors are off by e (``_rotation_error``); quantized, each also by 2^-4 of itself plus 2^-10 of its
    scale. A head's dot moves by sum_j |dq_j| |k_j| + |q_j| |dk_j| + |dq_j| |dk_j| (ReLU is 1-Lipschitz), the
    score by sum_h |w_h| d^-0.5 of that, plus both sides' FP32 sums: gamma_{d+H+2} of the absolute terms each."""
    q, w = ix.queries(x, q_latent, cos, sin)
    qr, kr = _rotate(cfg, q), _rotate(cfg, keys)
    eq, ek = _rotation_error(q), _rotation_error(keys)
    if quantized:
        eq = eq + E4M3_U * (qr.abs() + eq) + E4M3_SUB * _ue8m0(qr.abs().amax(-1, keepdim=True) + eq)
        ek = ek + E4M3_U * (kr.abs() + ek) + E4M3_SUB * _ue8m0(kr.abs().amax(-1, keepdim=True) + ek)
    qa, ka = qr.abs(), kr.abs().transpose(-1, -2).unsqueeze(1)
    ekt = ek.expand_as(kr).transpose(-1, -2).unsqueeze(1)
    dot_err = eq.expand_as(qr) @ ka + qa @ ekt + eq.expand_as(qr) @ ekt  # (B, T, H, S)
    A = qa @ ka + (qa + eq) @ (ka + ekt)
    n = ix.head_dim + ix.n_heads + 2
    wd = w.double().abs().unsqueeze(-1) * ix.head_dim ** -0.5
    exact = (w.double().unsqueeze(-1) * (q.double() @ keys.double().transpose(-1, -2).unsqueeze(1)).relu()).sum(2)
    return exact * ix.head_dim ** -0.5, (wd * (dot_err + n * FP32_U / (1 - n * FP32_U) * A)).sum(2)


@torch.no_grad()
def test_rotation_alone_leaves_the_scores_within_fp32_rounding():
    cfg = _cfg()
    attn = _attn(cfg)
    x, q_latent, cos, sin = _inputs(attn, 2, 21, 21)
    ix = attn.indexer
    keys = ix.keys(x, cos, sin)
    rot = indexer_fp8.rotation(cfg)
    exact, bound = _exact_scores(ix, cfg, x, q_latent, keys, cos, sin, quantized=False)
    rotated = ix.scores(x, q_latent, indexer_fp8.rotate(keys, rot), cos, sin)  # keys rotated ...
    q, w = ix.queries(x, q_latent, cos, sin)
    s = torch.relu(torch.matmul(indexer_fp8.rotate(q, rot), indexer_fp8.rotate(keys, rot).transpose(-1, -2)
                                .unsqueeze(1)) * ix.head_dim ** -0.5)  # ... and queries
    got = torch.matmul(w.unsqueeze(-2), s).squeeze(-2)
    assert ((got.double() - exact).abs() <= bound).all()
    assert ((rotated.double() - exact).abs() > 1e3 * bound).any()  # one side rotated: not the same scores


@torch.no_grad()
def test_fp8_scores_within_the_e4m3_bound_of_the_bf16_path():
    cfg = _cfg()
    attn = _attn(cfg)
    B, S, T = 2, 21, 5
    cache, rows, x, q_latent, keys = _filled(attn, B, S, T)
    exact, bound = _exact_scores(attn.indexer, cfg, x, q_latent, keys, rows.cos, rows.sin, quantized=True)
    got = dsa_index_scores(attn, x, q_latent, rows, cache)
    err = (got.double() - exact).abs()
    assert (err <= bound).all(), float((err / bound).max())
    assert float((err / bound).max()) > 1e-3  # the bound is not vacuous: FP8 moves the scores
    oracle = _oracle_scores(attn.indexer, cfg, x, q_latent, keys, rows.cos, rows.sin)
    assert ((oracle - exact).abs() <= bound).all()


# ---- the in-place kernel ----------------------------------------------------------------------------------------

needs_kernels = pytest.mark.skipif(kernels.cpu_ops() is None, reason="flyer's CPU kernels are not built")


def _fp8_caches(attn: MLA, B: int, n_slots: int, bs: int):
    """A contiguous FP8 cache and a paged one over shuffled blocks of ``bs`` slots, the same key codes and scales in
    both; the keys' magnitudes spread over 1e-3 .. 1e3, so neighbouring slots' scales differ."""
    K, n = attn.indexer.head_dim, -(-n_slots // bs)
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(B, n * bs, K, generator=g) * torch.logspace(-3, 3, n * bs)[torch.randperm(n * bs, generator=g)]\
        .view(1, -1, 1)
    flat = make_cache(attn.cfg, 1, B, n * bs, "absorbed", FP8)
    flat.write(0, torch.arange(n * bs).expand(B, -1), index_key=keys)
    paged = make_paged_cache(attn.cfg, 1, 1 + B * n, bs, FP8)
    paged.tables = torch.randperm(B * n, generator=torch.Generator().manual_seed(1)).add(1).view(B, n)
    for name in ("index_key", "index_key_scale"):  # as bytes: index_put has no float8 kernel on the CPU
        blocks = paged.pool.tensors[name][0].view(torch.uint8)
        blocks[paged.tables.flatten()] = flat.tensors[name][0].view(torch.uint8).reshape(B * n, bs, -1)
    return flat, paged


def _kernel_bound(attn, x, q_latent, rows, cache) -> tuple[torch.Tensor, torch.Tensor]:
    """``_fp8_index`` (FP64 scores, bound on any FP32 evaluation) of the queries and the cached codes and scales."""
    q, w = indexer_fp8.index_queries(attn.indexer, x, q_latent, rows.cos, rows.sin, cache.index_rotation)
    kc = rows.attended(cache.read(0, "index_key", rows.n_slots, FP8))[0].float()
    ks = rows.attended(cache.read(0, "index_key_scale", rows.n_slots, torch.float32))[0].squeeze(-1)
    return _fp8_index(q, w, kc, ks)


@needs_kernels
@pytest.mark.parametrize("K, bs, ends, T, first", [(32, 8, [70, 41, 90], 1, 0), (32, 5, [83, 57], 3, 1),
                                                   (64, 16, [45, 61], 2, 0), (128, 64, [130, 9], 1, 1)])
@torch.no_grad()
def test_fp8_keys_scored_in_place_as_the_gathered_oracle(K, bs, ends, T, first, monkeypatch):
    """Decode-shaped calls score the FP8 keys where they lie (``kernels.index_scores``: codes decoded as read, times
    their scales), contiguous or paged; the kernels off, the eager gather (``indexer_fp8.index_scores``). Both are
    FP32 evaluations of ``fp8_index`` on the same codes: each within ``_fp8_index``'s bound of the exact scores.
    Mutation: the kernel given unit key scales lands far outside it."""
    cfg = _cfg(index_head_dim=K)
    attn = _attn(cfg)
    rows = _rows(cfg, ends, T, first)
    x = torch.randn(len(ends), T, cfg.dim, generator=torch.Generator().manual_seed(2))
    q_latent = attn.query_latent(x)
    real, calls = kernels.index_scores, []

    def spy(*args):
        calls.append(args)
        return real(*args)

    def unit_scales(q, w, pool, tables, first_, n_slots, scale, key_scale):
        return real(q, w, pool, tables, first_, n_slots, scale, torch.ones_like(key_scale))

    for cache in _fp8_caches(attn, len(ends), rows.n_slots, bs):
        monkeypatch.setattr(kernels, "index_scores", spy)
        with kernels.disabled():
            ref = dsa_index_scores(attn, x, q_latent, rows, cache)
            ref_exact, ref_bound = _kernel_bound(attn, x, q_latent, rows, cache)
        assert not calls
        got = dsa_index_scores(attn, x, q_latent, rows, cache)
        assert len(calls) == 1 and calls.pop()[2].dtype == FP8  # the kernel, on the cache's own FP8 blocks
        exact, bound = _kernel_bound(attn, x, q_latent, rows, cache)
        assert got.shape == ref.shape == (len(ends), T, rows.n_slots - first)
        assert ((got.double() - exact).abs() <= bound).all(), float(((got.double() - exact).abs() / bound).max())
        assert ((ref.double() - ref_exact).abs() <= ref_bound).all()
        assert torch.equal(exact, ref_exact)  # the same queries either way: the two paths score the same formula
        monkeypatch.setattr(kernels, "index_scores", unit_scales)
        unscaled = dsa_index_scores(attn, x, q_latent, rows, cache)
        assert ((unscaled.double() - exact).abs() > 1e3 * bound).any()
    pool, tables = cache.index_key_blocks(0)
    with pytest.raises(ValueError, match="FP8 keys take their scales"):
        real(torch.zeros(1, 1, 1, K), torch.zeros(1, 1, 1), pool, tables[:1], 0, 1, 1.0)


@needs_kernels
def test_fp8_prefill_chunks_keep_the_gather(monkeypatch):
    """A call in the compute-bound form (``dense_prefill_pays``) scores gathered FP8 values: the kernel is not
    called."""
    cfg = _cfg(kv_lora_rank=64)  # dense_prefill_pays from T = 65 on
    attn = _attn(cfg)
    T = 80
    rows = _rows(cfg, [100], T, 0)
    x = torch.randn(1, T, cfg.dim, generator=torch.Generator().manual_seed(2))
    cache = _fp8_caches(attn, 1, rows.n_slots, 8)[1]
    monkeypatch.setattr(kernels, "index_scores", lambda *a: pytest.fail("kernel called for a prefill chunk"))
    with torch.no_grad():
        assert dsa_index_scores(attn, x, attn.query_latent(x), rows, cache).shape == (1, T, rows.n_slots)


# ---- generate, serve, prefix cache ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def v32(tmp_path_factory):
    """A tiny random DeepSeek-V3.2 checkpoint (transformers' layout: the indexer's rope rows rotate-half) and flyer's
    model of it."""
    path = tmp_path_factory.mktemp("v32fp8")
    build("v32", path)
    model, cfg, _ = load_hf(path)
    return path, model


def _fp8_rows(c: torch.Tensor) -> torch.Tensor:
    return unpack_rows(pack_rows(c, torch.zeros(*c.shape[:-1], 0)), c.shape[-1], c.dtype)


def _eager_greedy(model: Transformer, prompt: list[int], n: int) -> tuple[list[int], float]:
    """Greedy tokens of the training path (whole sequence each step) with the FP8 cache's rounding of what MLA
    caches (latents as FP8 rows, rope keys BF16) and the indexer's scores the oracle's; and the smallest margin,
    relative to the largest value, of any step's choices: a query's index_topk-th against its next score (where
    the two differ: keys tied exactly go to the earliest slot on both paths) and the greedy logit against the
    runner-up. The decode path computes in another order (and a CPU kind in another still); a margin far above
    FP32 rounding keeps that from flipping a choice."""
    cfg = model.cfg
    latents, scores = MLA.latents, Indexer.scores
    margins = []

    def fp8_latents(self, x, cos, sin):
        c, k_rope = latents(self, x, cos, sin)
        return _fp8_rows(c), k_rope.to(torch.bfloat16).to(k_rope.dtype)

    def oracle(self, x, q_latent, k, cos, sin):
        s = _oracle_scores(self, cfg, x, q_latent, k, cos, sin).float()
        T, k = s.shape[-1], cfg.index_topk
        if T > k:  # query t sees t + 1 keys: a choice from t = k on
            top = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).topk(k + 1).values[:, k:]
            gap = (top[..., k - 1] - top[..., k]) / top[..., 0].abs()
            margins.append(float(gap[gap > 0].min()) if bool((gap > 0).any()) else 1.0)
        return s

    MLA.latents, Indexer.scores = fp8_latents, oracle
    try:
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(n):
                logits = model(torch.tensor([seq]))[0, -1]
                two = logits.topk(2).values
                margins.append(float((two[0] - two[1]) / logits.abs().max()))
                seq.append(int(logits.argmax()))
    finally:
        MLA.latents, Indexer.scores = latents, scores
    return seq[len(prompt):], min(margins)


PROMPT = [(5 + 7 * i) % 50 + 3 for i in range(17)]


def test_generate_fp8_caches_fp8_index_keys_and_greedy_is_the_oracles(v32, capsys):
    path, model = v32
    cfg = model.cfg
    per_layer = token_bytes(cfg.kv_lora_rank, cfg.qk_rope_head_dim) + cfg.index_head_dim + 4
    assert kv_cache_bytes_per_token_fp8(cfg) == cfg.n_layers * per_layer
    dec = Decoder(model, 1, 8, "absorbed", FP8)
    assert dec.cache.tensors["index_key"].dtype == FP8 and dec.cache.bytes_per_token() == cfg.n_layers * per_layer
    assert main(["generate", "--ckpt", str(path), "--prompt", "hello world", "--max-new-tokens", "2",
                 "--cache-dtype", "fp8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cache_bytes_per_token"] == cfg.n_layers * per_layer
    got = generate(model, [PROMPT], GenerationConfig(max_new_tokens=8, cache_dtype=FP8)).tokens[0]
    want, margin = _eager_greedy(model, PROMPT, 8)
    assert got == want and margin > 1e-4, margin
    assert got != generate(model, [PROMPT], GenerationConfig(max_new_tokens=8, cache_dtype=torch.float32)).tokens[0]


def test_serve_pool_holds_fp8_index_keys_and_equals_generate(v32):
    _, model = v32
    cfg = model.cfg
    big, real = 64 * 2**30, preset("dsv32")
    ratio = blocks_for_memory(real, big, 64, FP8) / blocks_for_memory(real, big, 64, torch.bfloat16)
    assert abs(ratio - kv_cache_bytes_per_token(real, 2) / kv_cache_bytes_per_token_fp8(real)) < 1e-3, ratio
    bpt = kv_cache_bytes_per_token_fp8(cfg)
    eng = Engine(model, EngineConfig(kv_cache_bytes=40 * 4 * bpt, block_size=4, cache_dtype=FP8, prefill_chunk=8))
    pool = eng.cache.pool
    assert eng.alloc.n_blocks == 40 and pool.tensors["index_key"].dtype == FP8
    assert pool.tensors["index_key_scale"].shape == (cfg.n_layers, 40, 4, 1)
    assert_engine_is_generate(eng, model, [PROMPT, PROMPT[:9] + [4, 9, 11], [7] * 3], 6)


def assert_engine_is_generate(eng: Engine, model: Transformer, prompts: list[list[int]], n: int) -> None:
    """``eng``'s greedy tokens for ``prompts``, submitted together, are ``generate``'s for each alone, both with an
    FP8 cache (also DeepSeek-V4's: tests/test_v4_fp8_cache.py)."""
    want = [generate(model, [p], GenerationConfig(max_new_tokens=n, cache_dtype=FP8)).tokens[0] for p in prompts]
    outs = [[] for _ in prompts]
    for i, p in enumerate(prompts):
        eng.submit(p, SamplingOptions(max_tokens=n), lambda e, i=i: outs[i].append(e.token))
    eng.run_until_idle()
    assert outs == want


def test_prefix_cache_restores_fp8_index_keys_bit_for_bit_and_keeps_layouts_apart(v32, tmp_path):
    _, model = v32
    prompt = PROMPT + PROMPT[:7]  # 24 tokens: 3 blocks of 8

    def filled(dtype):
        dec = Decoder(model, 1, 32, "absorbed", dtype)
        pc = open_prefix_cache(model, tmp_path, cache_dtype=dtype, block_size=8)
        prefill(dec, [prompt], pc)
        return dec, pc

    cold, pc = filled(FP8)
    assert (pc.stats.hits, pc.stats.stored) == (0, 3)
    hot, pc = filled(FP8)
    assert pc.stats.hits == 3
    expect = {k: ((t.shape[0], 8, *t.shape[3:]), t.dtype) for k, t in cold.cache.tensors.items()}
    entry = pc.load(pc.block_keys(prompt)[1], prompt[8:16], expect)  # the stored entry itself
    for name in ("index_key", "index_key_scale"):
        a, b = (d.cache.tensors[name][:, 0, :24] for d in (cold, hot))
        assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)), name
        assert torch.equal(entry[name].contiguous().view(torch.uint8), a[:, 8:16].contiguous().view(torch.uint8))
    _, pc = filled(torch.bfloat16)
    assert pc.stats.hits == 0  # a BF16 run misses the FP8 run's entries


def test_glm5_shared_layers_keep_no_fp8_index_keys():
    """GLM-5 (``indexer_types``: its indexer rotates interleaved pairs, the plain transform): FP8 index keys for
    the full layers only, and generation runs."""
    cfg = _cfg(indexer_types=("full", "shared", "full", "shared"))
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    cache = make_cache(cfg, cfg.n_layers, 1, 4, "absorbed", FP8)
    assert cache.tensors["index_key"].shape == (2, 1, 4, cfg.index_head_dim)
    plain = torch.from_numpy(_hadamard(cfg.index_head_dim)).float() * cfg.index_head_dim ** -0.5
    assert torch.equal(cache.index_rotation, plain)
    assert len(generate(model, [PROMPT], GenerationConfig(max_new_tokens=4, cache_dtype=FP8)).tokens[0]) == 4


def test_fp8_refuses_index_heads_it_cannot_hold():
    """DeepSeek's fp8_index takes one scale per key and the transform a power of two: a FieldError naming
    cache_dtype."""
    with pytest.raises(FieldError, match="index_head_dim=96"):
        make_cache(_cfg(index_head_dim=96), 1, 1, 1, "absorbed", FP8)
