"""The fused MLA decode kernel (``kernels.mla_decode``) reads an FP8 latent cache's rows in place: each slot decoded
into its FP32 tile exactly as the eager path dequantizes it (``unpack_rows``), so its output is the kernel's over
the dequantized rows bit for bit, and within FP32's summation bound of the eager path's (dequantize, then attend);
a decoder with a wrong scale tile or rope offset lands far outside. ``flyer generate`` and the serving engine give
the same tokens with the kernels on and off."""

import contextlib

import pytest
import torch
from bounds import FP32_U, latent_attention_bound
from test_cache_fp8 import _decode_logits, _dense_model, _engine, _progression, _served
from trained import counting_model

from flyer import kernels
from flyer.infer import GenerationConfig, generate
from flyer.infer.cache_fp8 import FP8, dequantize_latent, n_tiles, pack_rows, token_bytes, unpack_rows

V = 64


@pytest.fixture
def ops():
    if kernels.cpu_ops() is None:
        pytest.skip("flyer's fused CPU kernels are not built here (no C++ compiler?)")
    return kernels.cpu_ops()


def _fp8_pool(B, T, H, C, R, bs, nb, seed=0):
    """Queries (B, H*T, C + R), a pool of shuffled FP8-row blocks (nb per row, some unused) whose 128-channel tiles
    span magnitudes 1e-2 .. 1e2 (each its own scale) and rope keys of their mean size, the tables, and T
    consecutive positions per row, each row at its own (its last block partly filled)."""
    g = torch.Generator().manual_seed(seed)
    N = B * nb + 3
    tiles = torch.logspace(-2, 2, 9)[torch.randint(0, 9, (N, bs, n_tiles(C)), generator=g)]
    latent = torch.randn(N, bs, C, generator=g) * tiles.repeat_interleave(128, -1)[..., :C]
    typical = float(tiles.mean())
    pool = pack_rows(latent, torch.randn(N, bs, R, generator=g) * typical)  # the rope key weighs as the latent
    tables = torch.randperm(N, generator=g)[:B * nb].view(B, nb)
    last = torch.randint(T - 1, nb * bs - 1, (B, 1), generator=g)
    pos = last - T + 1 + torch.arange(T)
    q = torch.randn(B, H * T, C + R, generator=g) * 2 / ((C + R) ** 0.5 * typical)  # scores of a few units
    return q, pool, tables, pos


def _eager(q_BMK, kv_BSK, pos_BT, C, scale):
    """The eager path's maths (``mla_absorbed_core`` in latent space) in FP32 on gathered, dequantized slots."""
    S, T = kv_BSK.shape[1], pos_BT.shape[1]
    visible = torch.arange(S).view(1, 1, S) <= pos_BT.repeat(1, q_BMK.shape[1] // T).unsqueeze(-1)
    p = (torch.bmm(q_BMK, kv_BSK.transpose(1, 2)) * scale).masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.bmm(p, kv_BSK[..., :C])


def _gathered(rows_NbK, tables, pos):
    return rows_NbK[tables].flatten(1, 2)[:, :int(pos.max()) + 1]


def _wrong_scale_tile(pool, C):
    """A decoder's mutation: each tile's codes times the next tile's scale."""
    n = n_tiles(C)
    rows = unpack_rows(pool, C, torch.float32)
    rows[..., :C] = dequantize_latent(pool[..., :C].view(FP8), pool[..., C:C + 4 * n].view(torch.float32).roll(1, -1),
                                      torch.float32)
    return rows


def _wrong_rope_offset(pool, C):
    """A decoder's mutation: the rope key read one BF16 value early (from the last scale's high half)."""
    rows = unpack_rows(pool, C, torch.float32)
    start = C + 4 * n_tiles(C) - 2
    rows[..., C:] = pool[..., start:start + 2 * (rows.shape[-1] - C)].contiguous().view(torch.bfloat16).float()
    return rows


@pytest.mark.parametrize("B,T,H,C,R,bs,nb", [
    (3, 1, 4, 512, 64, 16, 6),  # V3's widths: four scale tiles, rows ending in partly filled blocks
    (2, 2, 6, 512, 64, 5, 20),  # two new tokens per row (MTP verification), blocks of 5: runs split across blocks
    (2, 3, 3, 36, 8, 4, 20),  # the tiny presets' shape: one short tile (a vector, then the table for the tail)
    (2, 2, 10, 260, 8, 3, 30),  # 20 query rows: past MLA_FEW_QUERY_ROWS (the BLAS); a last tile of 4 codes
])
@pytest.mark.parametrize("narrower", [False, True])  # True: any number of query rows on the register blocks
def test_kernel_over_fp8_rows_is_the_eager_dequantization_within_fp32_bound(ops, monkeypatch, narrower, B, T, H, C,
                                                                           R, bs, nb):
    """The rows decoded in the kernel's tile are ``unpack_rows``'s values exactly (codes by the table times a
    power-of-two scale, the rope key widened from BF16), so the output is bit for bit the kernel's over an FP32 pool
    of the dequantized rows. Against the eager path (dequantize, gather, attend): both are FP32 evaluations of the
    same exact attention over those values, each within ``latent_attention_bound`` of it, so within twice that of
    each other. A decoder taking a neighbouring tile's scale, or the rope key one value off, lands > 10x out."""
    monkeypatch.setattr(kernels, "blas_narrower", lambda: narrower)
    q, pool, tables, pos = _fp8_pool(B, T, H, C, R, bs, nb)
    assert pool.shape[-1] == token_bytes(C, R) and kernels.mla_decode_usable(pool)
    scale = 0.9
    got = kernels.mla_decode(q, pool, tables, pos, C, scale)
    rows = unpack_rows(pool, C, torch.float32)
    assert torch.equal(got, kernels.mla_decode(q, rows, tables, pos, C, scale))
    kv = _gathered(rows, tables, pos)
    exact, bound = latent_attention_bound(q, kv, pos, C, scale)
    err = (got.double() - _eager(q, kv, pos, C, scale).double()).abs()
    assert (err <= 2 * bound).all(), f"max error / bound {(err / (2 * bound)).max():.3g}"
    assert ((got.double() - exact).abs() <= bound).all()
    for mutant in (_wrong_scale_tile, _wrong_rope_offset):
        if mutant is _wrong_scale_tile and n_tiles(C) == 1:
            continue  # one tile: no other scale to take
        wrong = _eager(q, _gathered(mutant(pool, C), tables, pos), pos, C, scale)
        assert float(((got.double() - wrong.double()).abs() / (2 * bound)).max()) > 10, mutant.__name__


@pytest.mark.parametrize("isa", ["native", "AVX2"])
def test_fp8_rows_decode_bitwise_on_each_isa(ops, isa):
    """The AVX2 build's decoding (its FP8 widening and vectors of 8) on an AVX-512 CPU too: each ISA's kernel over
    the FP8 rows is its kernel over the dequantized FP32 rows, bit for bit (C = 260: three tiles, the last 4 codes
    through the table)."""
    if isa == "AVX2":
        if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
            pytest.skip("AVX2 code needs an x86 CPU with AVX2")
        ops = kernels.build("AVX2")
    q, pool, tables, pos = _fp8_pool(2, 2, 5, 260, 8, 3, 30, seed=1)
    rows = unpack_rows(pool, 260, torch.float32)
    for few in (kernels.MLA_FEW_QUERY_ROWS, 4):  # 10 query rows on the register blocks, then on the BLAS
        assert torch.equal(ops.mla_decode(q, pool, tables, pos, 260, 0.7, 0, few),
                           ops.mla_decode(q, rows, tables, pos, 260, 0.7, 0, few))


def test_kernel_reads_fp8_rows_in_place_only_where_built(ops):
    pool = pack_rows(torch.randn(2, 4, 36), torch.randn(2, 4, 8))
    assert kernels.mla_decode_usable(pool)
    with kernels.disabled():
        assert not kernels.mla_decode_usable(pool)
    q = torch.randn(1, 2, 44)
    tables, pos = torch.tensor([[0, 1]]), torch.tensor([[5]])
    with pytest.raises(RuntimeError, match=r"pool slots of 56 bytes \(FP8 rows of C 36 codes"):
        kernels.mla_decode(q, pool[..., :-4].contiguous(), tables, pos, 36, 1.0)  # a row missing two rope values
    with pytest.raises(RuntimeError, match="C a multiple of 4"):
        kernels.mla_decode(torch.randn(1, 2, 42), pool, tables, pos, 34, 1.0)


def _spy(monkeypatch) -> list:
    """The pool dtypes ``kernels.mla_decode`` is called with from now on (the calls go through)."""
    calls, real = [], kernels.mla_decode

    def spy(q, pool, *args, **kw):
        calls.append(pool.dtype)
        return real(q, pool, *args, **kw)

    monkeypatch.setattr(kernels, "mla_decode", spy)
    return calls


def test_decode_logits_equal_the_eager_fp8_path_within_fp32_bound(ops, monkeypatch):
    """The whole decoder (a prefill of 12 tokens, then 6 single-token steps) over an FP8 cache, kernel against eager:
    the same dequantized values in both, so they differ by FP32 rounding alone, within the FP32 decode tolerance
    (``test_decode_logits_within_the_e4m3_bound``'s, derived as ``logit_tolerance``)."""
    model = _dense_model()
    cfg = model.cfg
    tol = cfg.n_layers * (cfg.dim + cfg.inter_dim + cfg.q_lora_rank + cfg.kv_lora_rank + cfg.qk_rope_head_dim + 18) \
        * FP32_U
    calls = _spy(monkeypatch)
    fused = _decode_logits(model, FP8)
    monkeypatch.undo()
    assert calls and set(calls) == {torch.uint8}
    with kernels.disabled():
        eager = _decode_logits(model, FP8)
    err = float((fused - eager).abs().max() / eager.abs().max())
    assert err <= tol, (err, tol)


@pytest.fixture(scope="module")
def trained():
    return counting_model(V)


@pytest.mark.parametrize("speculative", [None, "mtp"])
def test_generate_and_serve_tokens_equal_with_kernels_on_and_off(trained, ops, monkeypatch, speculative):
    """Greedy tokens of ``generate`` and of the engine (paged pool of blocks of 4, chunked prefill, MTP drafts
    verified two tokens at a time) over FP8 caches: the kernel reading the rows in place gives the eager path's."""
    prompts = [_progression(3, 2, 9) + _progression(5, 3, n) for n in (3, 14)] + [_progression(7, 1, 22)]
    gen = GenerationConfig(max_new_tokens=10, cache_dtype=FP8, speculative=speculative)
    in_place = _spy(monkeypatch)
    out = {}
    for on in (True, False):
        with contextlib.nullcontext() if on else kernels.disabled():
            out[on] = ([generate(trained, [p], gen).tokens[0] for p in prompts],
                       _served(_engine(trained, FP8, prefill_chunk=8, speculative=speculative), prompts, 10))
        if on:
            assert in_place and set(in_place) == {torch.uint8}
            in_place.clear()
    assert not in_place  # kernels off: the eager path
    assert out[True][0] == out[True][1] == out[False][0] == out[False][1]
