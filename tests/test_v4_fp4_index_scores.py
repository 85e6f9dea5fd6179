"""DeepSeek-V4's FP4 index keys (``--cache-dtype fp8``) scored in place (``kernels.index_scores_fp4``, through
``HybridCache.index_scores``) against the oracle that unpacks every key to FP32 (``hybrid_index_fp4.unpack_rows``,
``HybridCache.read_entries``) and runs ``Indexer.scores`` on them.

The kernel decodes each row into its FP32 tile as the eager tables do, so a key's values are bit for bit the
unpacked ones: one-hot queries read every channel of rows holding every code byte in every position and scale bytes
2^-127 .. 2^125, exactly. The scores then sum the same FP32 products as the oracle's in another order, so each is
within 2 gamma_{K+H+2} d^-0.5 sum_h |w_h| sum_i |q_hi k_i| of it (``index_score_bound``, the bound of
``tests/test_dsa_index_scores.py``: K products, the scale, H weighted ReLUs, each side within gamma of the exact
score). A decode cache, contiguous (``flyer generate``) and paged over shuffled blocks (``flyer serve``), selects the
oracle's entries and attends bit for bit as it does, prefill chunk and decode steps alike; a BF16 or FP32 cache's
keys, scored in place by V3.2's ``kernels.index_scores``, likewise. Mutations fail: scores one
slot on (1e3 x the bound), rows read with their nibbles swapped. Mutation checks run by hand on the kernel (nibbles
swapped, tile 0's scale for every tile, the sign bit dropped, a run's last row read from the next slot) and on
``HybridCache.index_scores`` (block tables ignored, queries not FP4-rounded, scale 1) each fail a test here. CPU;
skipped where the kernels are not built."""

import pytest
import torch
from bounds import FP32_U

from flyer import kernels
from flyer.config import preset
from flyer.infer import hybrid_index_fp4
from flyer.infer.cache_fp8 import FP8
from flyer.infer.hybrid_cache import HybridCache, hybrid_attention, hybrid_rows, hybrid_tables
from flyer.model.hybrid import HybridAttention, select_topk

pytestmark = pytest.mark.skipif(kernels.cpu_ops() is None, reason="flyer's CPU kernels are not built")


def _paged(rows_BNW: torch.Tensor, bs: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool (1 + B n, bs, W), tables (B, n)): rows (B, N, W) in blocks of bs slots, each row's blocks shuffled over
    the pool (block 0 unused, as a null block), the last block's tail zero."""
    B, N, W = rows_BNW.shape
    n = -(-N // bs)
    padded = torch.cat([rows_BNW, rows_BNW.new_zeros(B, n * bs - N, W)], dim=1)
    tables = torch.randperm(B * n, generator=torch.Generator().manual_seed(seed)).add(1).view(B, n)
    pool = rows_BNW.new_zeros(1 + B * n, bs, W)
    pool[tables.flatten()] = padded.view(B * n, bs, W)
    return pool, tables


def _oracle(q_BTHK: torch.Tensor, w_BTH: torch.Tensor, keys_BNK: torch.Tensor, scale: float) -> torch.Tensor:
    """``Indexer.scores``' arithmetic on unpacked keys (FP32)."""
    s = torch.relu(torch.matmul(q_BTHK, keys_BNK.transpose(-1, -2).unsqueeze(1)))
    return (s * scale * w_BTH.unsqueeze(-1)).sum(dim=2)


def index_score_bound(q_BTHK: torch.Tensor, w_BTH: torch.Tensor, keys_BNK: torch.Tensor) -> torch.Tensor:
    """(B, T, N) bound on |in place - oracle| (module docstring): each side sums a head's K exact-operand products
    (then the scale's rounding) and its H weighted ReLUs in some order, within gamma_{K+H+2} of the exact score
    (ReLU is 1-Lipschitz); twice that between the two. gamma_n = n u / (1 - n u)."""
    H, K = q_BTHK.shape[-2:]
    A = q_BTHK.double().abs() @ keys_BNK.double().abs().transpose(-1, -2).unsqueeze(1)  # (B, T, H, N)
    n = K + H + 2
    return 2 * n * FP32_U / (1 - n * FP32_U) * K ** -0.5 * (w_BTH.double().abs().unsqueeze(-1) * A).sum(2)


@torch.no_grad()
def test_every_code_and_scale_byte_decodes_exactly():
    """T = K one-hot queries, head 0 +e_t and head 1 -e_t weighted +1 and -1: score(t, s) = relu(k_st) - relu(-k_st)
    = k_st exactly (one non-zero product per sum), every channel of every row as the kernel decoded it."""
    K, B, N = 128, 3, 85  # 255 rows: each code byte at each of the 64 positions, scale bytes 0 .. 252
    r = torch.arange(B * N).view(-1, 1)
    codes = ((torch.arange(K // 2) + 64 * r) % 256).to(torch.uint8)
    scales = ((torch.arange(K // 32) + 4 * r) % 253).to(torch.uint8)
    rows = torch.cat([codes, scales], dim=-1).view(B, N, -1)
    pool, tables = _paged(rows, bs=16)
    eye = torch.eye(K)
    q = torch.stack([eye, -eye], dim=1).expand(B, K, 2, K)  # (B, T = K, H = 2, K)
    w = torch.tensor([1.0, -1.0]).expand(B, K, 2)
    got = kernels.index_scores_fp4(q, w, pool, tables, 0, N, 1.0)  # (B, K, N)
    want = hybrid_index_fp4.unpack_rows(rows, K, torch.float32)  # (B, N, K)
    assert got.shape == (B, K, N) and torch.equal(got.transpose(1, 2), want)
    # a kernel reading channel 2j from the high nibble reads these rows as the correct one reads them swapped
    swapped = torch.cat([(codes >> 4) | (codes << 4), scales], dim=-1).view(B, N, -1)
    assert not torch.equal(kernels.index_scores_fp4(q, w, *_paged(swapped, bs=16), 0, N, 1.0), got)


@pytest.mark.parametrize("K, H, T, N, first", [(128, 16, 1, 203, 0), (64, 4, 3, 45, 5), (32, 8, 2, 9, 0)])
@torch.no_grad()
def test_scores_are_the_unpacking_oracles_within_the_bound(K, H, T, N, first):
    """Keys of rotated random rows at tile scales 2^-10 .. 2^10, FP4-rounded queries, random head weights; slot counts
    and block sizes that are not multiples of the kernel's 8-key groups (its scalar tails)."""
    B = 3
    g = torch.Generator().manual_seed(K + T)
    rot = hybrid_index_fp4.rotation(K)
    x = torch.randn(B, N, K, generator=g) * torch.pow(2.0, torch.randint(-10, 11, (B, N, 1), generator=g).float())
    rows = hybrid_index_fp4.pack_rows(x, rot)
    pool, tables = _paged(rows, bs=7)
    q = hybrid_index_fp4.round_trip(torch.randn(B, T, H, K, generator=g), rot)
    w = torch.randn(B, T, H, generator=g) * H ** -0.5
    keys = hybrid_index_fp4.unpack_rows(rows, K, torch.float32)[:, first:]
    got = kernels.index_scores_fp4(q, w, pool, tables, first, N, K ** -0.5)
    ref = _oracle(q, w, keys, K ** -0.5)
    bound = index_score_bound(q, w, keys)
    assert got.shape == ref.shape == (B, T, N - first)
    err = (got.double() - ref.double()).abs()
    assert bool((err <= bound).all()), float((err / bound).max())
    assert torch.equal(select_topk(got, torch.ones_like(got, dtype=torch.bool), 4),
                       select_topk(ref, torch.ones_like(ref, dtype=torch.bool), 4))
    # mutation: the keys one slot on
    shifted = torch.cat([got[..., 1:], got[..., :1]], dim=-1)
    assert float(((shifted.double() - ref.double()).abs() / bound).amax()) > 1e3


def _cfg():
    return preset("tiny-v4", vocab_size=256, window_size=8, index_topk=4, index_head_dim=64, index_n_heads=8)


def _decode(attn: HybridAttention, cfg, x_BSD: torch.Tensor, chunks: list[int], paged: bool, in_place: bool,
            scores: list | None = None, dtype: torch.dtype = FP8):
    """hybrid_attention of x's tokens in ``chunks`` (a prefill chunk, then decode steps) over a fresh ``dtype`` cache
    (FP8: FP4 index keys, ``index_scores_fp4``; BF16 / FP32: V3.2's ``index_scores``), contiguous or ``paged`` over
    shuffled blocks of 16 tokens; ``in_place`` False: the index keys scored by the oracle. Returns (each call's
    output, the kernel's calls); ``scores`` collects (index scores, oracle's scores, bound) of every call."""
    B, S, _ = x_BSD.shape
    tables = hybrid_tables(cfg, S, "cpu")
    if paged:
        bs, n = 16, -(-S // 16)
        cache = HybridCache.paged(cfg, B, 1 + B * n, bs, dtype)
        blocks = torch.randperm(B * n, generator=torch.Generator().manual_seed(5)).add(1).view(B, n)
        cache = cache.view(blocks, torch.arange(B))
    else:
        cache = HybridCache(cfg, B, S, dtype)
    names = ("index_scores_fp4_usable", "index_scores_fp4") if dtype == FP8 else ("index_scores_usable",
                                                                                  "index_scores")
    (usable, kernel), real = (getattr(kernels, n) for n in names), cache.index_scores
    calls = []

    def counted(*args):
        calls.append(1)
        return kernel(*args)

    def recorded(layer, idx, x, q_latent, cos, sin, N):
        out = real(layer, idx, x, q_latent, cos, sin, N)
        if scores is not None:
            q, w = idx.queries(x, q_latent, cos, sin)
            keys = cache.read_entries(layer, "index_keys", N)
            ref = idx.scores(x, q_latent, cos, sin, keys, cache.index_queries)
            scores.append((out, ref, index_score_bound(cache.index_queries(q).float(), w, keys)))
        return out

    outs, start = [], 0
    cache.index_scores = recorded
    setattr(kernels, names[1], counted)
    if not in_place:
        setattr(kernels, names[0], lambda pool: False)
    try:
        for T in chunks:
            rows = hybrid_rows(tables, S, torch.full((B,), start), T)
            outs.append(hybrid_attention(attn, x_BSD[:, start:start + T], rows, cache, 1))
            start += T
    finally:
        setattr(kernels, names[0], usable)
        setattr(kernels, names[1], kernel)
    return outs, len(calls)


@pytest.mark.parametrize("dtype", [FP8, torch.bfloat16, torch.float32], ids=["fp8", "bf16", "fp32"])
@pytest.mark.parametrize("paged", [False, True])
@torch.no_grad()
def test_decode_selects_and_attends_as_the_oracle(paged, dtype):
    """A CSA layer over an FP8 (FP4 index keys), BF16 or FP32 cache: a 37-token prefill chunk (9 entries, 4
    selected), then three decode steps (a tenth entry completes): the in-place scores within the bound of the
    oracle's, the same selections, and so the attention's outputs bit for bit."""
    cfg = _cfg()
    assert cfg.is_csa(1)
    torch.manual_seed(0)
    attn = HybridAttention(cfg, 1).eval()
    for p in attn.indexer.parameters():  # spread the index scores: an initialised indexer scores near ties
        p.data.normal_(0, 0.3)
    x = torch.randn(2, 40, cfg.dim, generator=torch.Generator().manual_seed(2))
    chunks = [37, 1, 1, 1]
    scores: list = []
    got, calls = _decode(attn, cfg, x, chunks, paged, True, scores, dtype)
    want, no_calls = _decode(attn, cfg, x, chunks, paged, False, dtype=dtype)
    assert len(scores) == calls == len(chunks) and no_calls == 0
    for out, ref, bound in scores:
        err = (out.double() - ref.double()).abs()
        assert bool((err <= bound).all()), float((err / bound).max())
        visible = torch.ones_like(out, dtype=torch.bool)
        assert torch.equal(select_topk(out, visible, cfg.index_topk), select_topk(ref, visible, cfg.index_topk))
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
