"""DeepSeek-V4's CSA indexer keys under ``--cache-dtype fp8`` (``flyer.infer.hybrid_index_fp4``) against an oracle
written here from DeepSeek's released V4 ``inference/model.py`` and ``kernel_tilelang.py``: ``rotate_activation``
as the explicit Sylvester Hadamard matrix (numpy, FP64), ``fp4_act_quant(x, 32)`` by its own arithmetic (amax
floored at 6 2^-126, times FP32 1/6, ``fast_round_scale``'s exponent bits, E2M1 round to nearest even by step
arithmetic in numpy), the score sum_h w_h d^-0.5 relu(q_h . k) in FP64.

The quantizer is the oracle's exactly, at power-of-two edges, ties, all-zero and subnormal tiles; the rotation is
the explicit matrix's within FP32 rounding; the cache's rows hold the oracle's bytes (codes two to a byte, the even
channel in the low nibble, then the scale bytes); the scores from the cached rows are the oracle's within the
FP32 bound of their sums. ``tests/test_v4_fp8_cache.py`` runs generate, the serving pool, bytes per token and the
prefix cache with these rows. Mutations (no rotation, nibbles swapped, 64-channel tiles, the scale rounded down, the
queries left unquantized) fail."""

import numpy as np
import pytest
import torch
from bounds import FP32_U

from flyer.config import preset
from flyer.infer import hybrid_index_fp4, indexer_fp8
from flyer.infer.cache_fp8 import FP8
from flyer.infer.hybrid_cache import HybridCache, hybrid_tables
from flyer.model.counts import v4_index_fp4_row_bytes
from flyer.model.hybrid import HybridAttention, rope_tail

E2M1_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # codes 0..7; code + 8 is the negative


# ---- the oracle -------------------------------------------------------------------------------------------------

def ref_hadamard(d: int) -> np.ndarray:
    """(d, d) +-1 Sylvester Hadamard matrix, H_2n = [[H, H], [H, -H]] (fast_hadamard_transform's reference)."""
    h = np.ones((1, 1))
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return h


def ref_rotate(x: torch.Tensor) -> torch.Tensor:
    """rotate_activation of x (..., d) in FP64: H x / sqrt(d) (H symmetric), not rounded."""
    d = x.shape[-1]
    return x.double() @ torch.from_numpy(ref_hadamard(d)) * d ** -0.5


def ref_fp4(x: torch.Tensor, tile: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """fp4_act_quant(x, tile) of x (..., d) (its values, any float dtype): (E2M1 codes (..., d) 0..15, scale
    exponents (..., d / tile))."""
    t = x.detach().double().numpy().reshape(*x.shape[:-1], -1, tile)
    amax = np.maximum(np.abs(t).max(-1), 6 * 2.0**-126).astype(np.float32)
    bits = (amax * np.float32(1 / 6)).view(np.uint32)  # FP32 product, as the kernel's amax * fp4_max_inv
    e = ((bits >> 23) & 0xFF).astype(np.int64) - 127 + ((bits & 0x7FFFFF) != 0)  # fast_log2_ceil
    v = np.clip(t / np.ldexp(1.0, e)[..., None], -6, 6)
    m = np.abs(v)
    step = np.where(m < 2, 0.5, np.where(m < 4, 1.0, 2.0))  # E2M1's spacing in each binade
    r = np.round(m / step) * step  # half to even multiple of the step: the even code
    code = np.searchsorted(E2M1_GRID, r) + 8 * np.signbit(v)
    return code.reshape(x.shape).astype(np.uint8), e


def ref_values(codes: np.ndarray, exps: np.ndarray, tile: int = 32) -> torch.Tensor:
    """FP64 values: each code's E2M1 value times its tile's 2^e."""
    val = np.where(codes >= 8, -1.0, 1.0) * E2M1_GRID[codes % 8]
    return torch.from_numpy((val.reshape(*exps.shape, tile) * np.ldexp(1.0, exps)[..., None]).reshape(codes.shape))


def ref_rows(x: torch.Tensor) -> torch.Tensor:
    """The row bytes of already-rotated x (..., d): codes 2j | 2j + 1 << 4, then the scale bytes e + 127."""
    codes, exps = ref_fp4(x)
    return torch.from_numpy(np.concatenate([codes[..., 0::2] | (codes[..., 1::2] << 4),
                                            (exps + 127).astype(np.uint8)], -1))


def ref_index_round(x: torch.Tensor) -> torch.Tensor:
    """x (..., d) as the release scores it: rotated (rounded to x's dtype, as rotate_activation returns), then
    fp4_act_quant's values, in x's dtype."""
    return ref_values(*ref_fp4(ref_rotate(x).to(x.dtype))).to(x.dtype)


# ---- the quantizer, the rotation, the rows ---------------------------------------------------------------------

def _edge_inputs() -> torch.Tensor:
    """(6, 128): tiles of 32 at amax 6 2^-3 exactly (scale 2^-3), one FP32 step above (2^-2) and below (2^-3),
    3 2^-3 (the top binade's bottom: 2^-4); an all-zero tile (2^-126, byte 1), one below the amax floor, one of
    E2M1 ties at scale 1 (0.25 .. 5, both signs); then tiles whose magnitudes differ by 2^-12 .. 2^12."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 128, generator=g) * 2 - 1
    edge = torch.tensor(6 * 2.0**-3)
    for j, a in enumerate((edge, torch.nextafter(edge, torch.tensor(9.0)), torch.nextafter(edge, torch.tensor(0.0)),
                           torch.tensor(3 * 2.0**-3))):
        x[0, 32 * j:32 * j + 32] *= 0.1
        x[0, 32 * j + 7] = -a
    x[1, :32] = 0
    x[1, 32:64] = torch.linspace(-1, 1, 32) * 1e-40  # subnormal: under 6 2^-126, floored
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    x[1, 64:96] = torch.cat([ties, -ties, ties / 2, -ties / 4])
    x[2:] *= torch.pow(2.0, torch.randint(-12, 13, (4, 4), generator=g).float()).repeat_interleave(32, -1)
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantizer_is_the_releases_fp4_act_quant(dtype):
    x = _edge_inputs().to(dtype)
    codes, exps = hybrid_index_fp4.quantize(x)
    want_codes, want_exps = ref_fp4(x)
    assert torch.equal(exps, torch.from_numpy(want_exps).int())
    assert torch.equal(codes, torch.from_numpy(want_codes))
    if dtype == torch.float32:
        assert exps[0].tolist() == [-3, -2, -3, -4] and exps[1, :2].tolist() == [-126, -126]
    assert exps[1, 2] == 0 and codes[1, 64:72].tolist() == [0, 2, 2, 4, 4, 6, 6, 7]  # ties to the even code
    # what the oracle tells apart: 64-channel tiles, scales rounded down
    assert not np.array_equal(ref_fp4(x, 64)[0], want_codes)
    floor = np.floor(np.log2(np.maximum(np.abs(x.double().numpy().reshape(6, 4, 32)).max(-1), 6 * 2.0**-126) / 6))
    assert not np.array_equal(floor, want_exps)


def test_rotation_is_the_explicit_sylvester_hadamard():
    for d in (32, 128):
        rot = hybrid_index_fp4.rotation(d)
        assert torch.equal(rot, torch.from_numpy(ref_hadamard(d) * d ** -0.5).float())
        x = torch.randn(64, d, generator=torch.Generator().manual_seed(d)) * 3
        err = (indexer_fp8.rotate(x, rot).double() - ref_rotate(x)).abs()
        # d + 1 roundings (the sum and the rounded d^-0.5) of terms of absolute sum d^-0.5 sum|x|, then the output's
        bound = (d + 2) * FP32_U * d ** -0.5 * x.double().abs().sum(-1, keepdim=True)
        assert (err <= bound).all()
        assert ((x.double() - ref_rotate(x)).abs() > 1e3 * bound).any()  # mutation: no rotation


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_hold_the_oracles_bytes_and_read_back_its_values(dtype):
    x = _edge_inputs().to(dtype).view(2, 3, 128)
    rot = hybrid_index_fp4.rotation(128)
    raw = hybrid_index_fp4.pack_rows(x, rot)
    assert raw.dtype == torch.uint8 and raw.shape == (2, 3, 68) == (2, 3, v4_index_fp4_row_bytes(128))
    rotated = indexer_fp8.rotate(x, rot)
    assert torch.equal(raw, ref_rows(rotated))
    assert torch.equal(hybrid_index_fp4.unpack_rows(raw, 128, torch.float64), ref_values(*ref_fp4(rotated)))
    assert torch.equal(hybrid_index_fp4.round_trip(x, rot), ref_values(*ref_fp4(rotated)).to(dtype))
    assert not torch.equal(raw, ref_rows(x))  # the rows are of the rotated keys


# ---- the cached keys scored ---------------------------------------------------------------------------------------

def _cfg():
    return preset("tiny-v4", vocab_size=256, window_size=8, index_topk=4, head_dim=112)


@torch.no_grad()
def test_scores_from_the_cached_rows_are_the_oracles():
    """A CSA layer's index keys written to an FP8 cache and read back, scored as ``hybrid_attention`` scores them
    (``Indexer.scores`` with ``HybridCache.index_queries``): within the FP32 bound of the oracle's FP64 scores of
    the rotated, fp4_act_quant'ed queries and keys. Each head's dot sums di exact products; the weight is a D-term
    dot and a rounded H^-0.5; then d^-0.5, the weight's product, the sum over H heads: gamma_{di + D + H + 3} of
    the absolute terms."""
    cfg = _cfg()
    torch.manual_seed(0)
    attn = HybridAttention(cfg, 1).eval()
    idx = attn.indexer
    assert cfg.is_csa(1) and idx is not None
    B, S = 2, 40
    x = torch.randn(B, S, cfg.dim, generator=torch.Generator().manual_seed(1))
    cos, sin = (t[:S] for t in hybrid_tables(cfg, S, "cpu")[True])
    q_latent, _ = attn.queries(x, cos, sin)
    keys = idx.keys(x, cos, sin)  # (B, N, di)
    N, di, H, D = keys.shape[1], idx.head_dim, idx.n_heads, cfg.dim
    cache = HybridCache(cfg, B, S, FP8)
    b, i = (t.flatten() for t in torch.meshgrid(torch.arange(B), torch.arange(N), indexing="ij"))
    cache.write_entries(1, "index_keys", b, i, keys[b, i])
    raw = cache.layers[1]["index_keys"][:, :N]
    assert raw.dtype == torch.uint8 and torch.equal(raw, ref_rows(indexer_fp8.rotate(keys, cache.index_rotation)))
    read = cache.read_entries(1, "index_keys", N)
    got = idx.scores(x, q_latent, cos, sin, read, cache.index_queries)

    q = rope_tail(idx.wq_b(q_latent).view(B, S, H, di), cos, sin)  # the BF16 path's queries, before the release's
    qv = ref_values(*ref_fp4(indexer_fp8.rotate(q, cache.index_rotation)))
    kv = ref_values(*ref_fp4(indexer_fp8.rotate(keys, cache.index_rotation)))
    assert torch.equal(read.double(), kv)
    W = idx.weights_proj.weight.double()
    w, w_abs = x.double() @ W.t() * H ** -0.5, x.double().abs() @ W.abs().t() * H ** -0.5  # (B, S, H)

    def scores(qv, kv):
        return (w.unsqueeze(-1) * (qv @ kv.transpose(-1, -2).unsqueeze(1)).relu()).sum(2) * di ** -0.5

    exact = scores(qv, kv)
    n = di + D + H + 3
    A = (w_abs.unsqueeze(-1) * (qv.abs() @ kv.abs().transpose(-1, -2).unsqueeze(1))).sum(2) * di ** -0.5
    bound = n * FP32_U / (1 - n * FP32_U) * A
    err = (got.double() - exact).abs()
    assert got.shape == (B, S, N) and (err <= bound).all(), float((err / bound).max())
    # mutations: the queries unquantized (rotated only), the rotation dropped on both sides
    rotated_q = indexer_fp8.rotate(q, cache.index_rotation).double()
    assert ((scores(rotated_q, kv) - exact).abs() > 100 * bound).any()
    unrotated = scores(ref_values(*ref_fp4(q)), ref_values(*ref_fp4(keys)))
    assert ((unrotated - exact).abs() > 100 * bound).any()
    assert torch.equal(HybridCache(cfg, B, S, torch.bfloat16).index_queries(q), q)  # BF16: transformers' indexer


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rows_read_back_every_code_byte_and_scale_byte(dtype):
    # unpack_rows decodes by byte tables (the indexer reads every key per decode step): each of the 256 code bytes
    # in every position, each scale byte 0..252 (2^-127 .. 2^125; 6 2^126 would pass FP32's range), against the
    # oracle's nibbles and 2^e, exactly
    r = np.arange(255)[:, None]
    codes = ((np.arange(64) + 64 * r) % 256).astype(np.uint8)
    scales = ((np.arange(4) + 4 * r) % 253).astype(np.uint8)
    raw = torch.from_numpy(np.concatenate([codes, scales], -1)).view(5, 51, 68)
    nibbles = np.stack([codes & 15, codes >> 4], -1).reshape(255, 128)
    want = ref_values(nibbles, scales.astype(np.int64) - 127).view(5, 51, 128)
    got = hybrid_index_fp4.unpack_rows(raw, 128, dtype)
    assert got.dtype == dtype and torch.equal(got.double(), want)
