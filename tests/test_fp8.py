"""FP8 recipe: quantisation bounds, saturation, promoted GEMM, accumulation experiment, linear and
grouped-expert autograd, convert_to_fp8, LogFMT. CUDA checks (``_scaled_mm`` vs emulation) are
marked ``cuda`` and skip without an FP8-capable GPU."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from bounds import assert_fp32_gemm
from bounds import rel_error as rel

from flyer.config import preset
from flyer.fp8 import (FP8Experts, FP8Linear, FP8Recipe, convert_to_fp8, emulated_gemm_nt, fake_quantize, fp8_gemm_nt,
                       fp8_grouped_linear, fp8_linear, fp8_modules, quantize_blocks, quantize_tiles)
from flyer.fp8.gemm import accumulation_experiment, cuda_fp8_supported, cuda_gemm_path, round_mantissa
from flyer.fp8.linear import FP8GroupedLinearFunction, FP8MLP, FP8SwiGLUDownFunction
from flyer.fp8.logfmt import logfmt_decode, logfmt_encode, logfmt_roundtrip
from flyer.fp8.quant import (FP8_MAX, TILE, ceil_pow2, dequantize, dequantize_blocks_batched, fp8_to_float,
                             quantize_blocks_batched, quantize_tiles_t)
from flyer.model.lowp import Linear, emulation
from flyer.model.experts import MLP, Experts, swiglu
from flyer.model.moe import Gate
from flyer.model.transformer import Transformer
from flyer.parallel.memory import saved_bytes

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
# half an ulp relative to the value (normal range) for 3 / 2 mantissa bits
HALF_ULP = {E4M3: 2.0 ** -4, E5M2: 2.0 ** -3}
# smallest subnormal spacing (in units of the scale): 2^-9 for E4M3, 2^-16 for E5M2
SUB_ULP = {E4M3: 2.0 ** -9, E5M2: 2.0 ** -16}


def wide_range(R: int, C: int) -> torch.Tensor:
    """Gaussian values with per-column magnitudes over 6 decades (tiles with very different amax)."""
    return torch.randn(R, C) * torch.logspace(-3, 3, C)


# ---- quantisation ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 128), (5, 200), (3, 300), (130, 64)])
@pytest.mark.parametrize("fmt", [E4M3, E5M2])
@pytest.mark.parametrize("pow2", [False, True])
def test_tile_roundtrip_error_bound(shape, fmt, pow2):
    x = wide_range(*shape)
    q = quantize_tiles(x, fmt, pow2)
    Cp = -(-shape[1] // TILE) * TILE
    assert q.data.dtype == fmt and q.data.shape == (shape[0], Cp) and q.scale.shape == (shape[0], Cp // TILE)
    s = q.scale.repeat_interleave(TILE, 1)[:, : shape[1]]
    err = (q.dequantize() - x).abs()
    # per element: half an ulp of the value (normal) or of the subnormal spacing, times the tile scale
    bound = torch.maximum(x.abs() * HALF_ULP[fmt], s * SUB_ULP[fmt] / 2) * (1 + 1e-6)
    assert torch.all(err <= bound)
    # per tile: the scale maps amax onto (or, with UE8M0, just below) the format's max
    amax = F.pad(x, (0, Cp - shape[1])).abs().view(shape[0], -1, TILE).amax(-1)
    assert torch.all(amax / q.scale <= FP8_MAX[fmt] * (1 + 1e-6))
    if pow2:
        assert torch.all(torch.log2(q.scale) == torch.round(torch.log2(q.scale)))
        assert torch.all(amax / q.scale > FP8_MAX[fmt] / 2)
    else:
        torch.testing.assert_close(amax / q.scale, torch.full_like(amax, FP8_MAX[fmt]))
    assert torch.all(q.data[:, shape[1]:].float() == 0)  # padding is zeros


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("shape", [(0, 7), (1, 1), (200, 96), (257, 300)])
def test_transposed_tiles_equal_tiles_of_the_transpose(fmt, shape):
    """quantize_tiles_t(x) (the wgrad operands, tiled without an FP32 transpose) is
    quantize_tiles(x.t()) bit for bit, NaN and Inf included, for both scale kinds."""
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(*shape, generator=g) * torch.logspace(-20, 20, shape[1])).to(dtype)
        if x.numel() > 2:
            x.view(-1)[:2] = torch.tensor([float("inf"), float("nan")])
        for pow2 in (False, True):
            a, b = quantize_tiles_t(x, fmt, pow2), quantize_tiles(x.t(), fmt, pow2)
            assert a.cols == b.cols and torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8))
            assert torch.equal(a.scale.isnan(), b.scale.isnan())
            assert torch.equal(a.scale.nan_to_num(), b.scale.nan_to_num())


def test_block_quantisation_shapes_and_bound():
    w = wide_range(300, 200)
    q = quantize_blocks(w)
    assert q.data.shape == (300, 256) and q.scale.shape == (3, 2)
    blocks_amax = F.pad(w, (0, 56, 0, 84)).abs().view(3, 128, 2, 128).amax(dim=(1, 3))
    torch.testing.assert_close(q.scale, blocks_amax / 448)
    err = (q.dequantize() - w).abs()
    s = q.scale.repeat_interleave(TILE, 0)[:300].repeat_interleave(TILE, 1)[:, :200]
    assert torch.all(err <= torch.maximum(w.abs() / 16, s * 2.0 ** -10) * (1 + 1e-6))
    d, sc = quantize_blocks_batched(torch.stack([w, 2 * w, w[:, :]]))
    for e in range(3):
        qe = quantize_blocks([w, 2 * w, w][e])
        assert torch.equal(d[e].view(torch.uint8), qe.data.view(torch.uint8)) and torch.equal(sc[e], qe.scale)


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saturation_no_nan_or_inf(fmt, dtype):
    big = torch.finfo(dtype).max
    x = torch.zeros(4, 256, dtype=dtype)
    x[0, :5] = torch.tensor([big, -big, 1.0, 1e-30, -1e-38], dtype=dtype)
    x[1, 128:] = torch.finfo(dtype).tiny  # tile of the smallest normals
    x[2, :] = 1e-44 if dtype == torch.float32 else 0.0  # subnormal / zero tiles
    # row 3 stays all zeros
    for q in (quantize_tiles(x, fmt), quantize_tiles(x, fmt, pow2_scales=True), quantize_blocks(x, fmt)):
        deq = q.dequantize()
        assert torch.isfinite(q.scale).all() and (q.scale > 0).all()
        assert torch.isfinite(deq).all()
        assert not torch.isnan(fp8_to_float(q.data)).any()
        assert torch.all(deq[3] == 0)
    deq = quantize_tiles(x, fmt).dequantize()
    assert float(deq[0, 0]) == pytest.approx(big, rel=1e-6) and float(deq[0, 1]) == pytest.approx(-big, rel=1e-6)
    # a value just above what rounds to 448 would become NaN in E4M3 without the clamp
    y = torch.full((1, 128), 1.0)
    y[0, 0] = 449.0 / 448.0
    assert torch.isfinite(quantize_tiles(y, fmt, pow2_scales=True).dequantize()).all()


def test_fp8_decode_table_is_exact():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    for fmt in (E4M3, E5M2):
        v = codes.view(fmt)
        a, b = fp8_to_float(v), v.float()
        same = (a == b) | (torch.isnan(a) & torch.isnan(b))
        assert same.all()


# ---- GEMM --------------------------------------------------------------------------------------

@pytest.mark.parametrize("M,N,K", [(7, 9, 100), (64, 130, 384), (33, 256, 1000)])
@pytest.mark.parametrize("b_gran", ["block", "tile"])
def test_gemm_against_fp64(M, N, K, b_gran):
    a = wide_range(M, K)
    b = torch.randn(N, K) * torch.logspace(-1, 1, N).unsqueeze(1)
    qa = quantize_tiles(a)
    qb = quantize_blocks(b) if b_gran == "block" else quantize_tiles(b)
    # oracle 1: the FP64 product of the same FP8 operands -> only FP32 accumulation error remains
    ref_q = qa.dequantize().double() @ qb.dequantize().double().t()
    out = fp8_gemm_nt(qa.data, qa.scale, qb.data, qb.scale, torch.float32, backend="emulate", emulation="blocks")
    assert out.shape == (M, N)
    assert rel(out, ref_q) < 1e-6
    fast = emulated_gemm_nt(qa.data, qa.scale, qb.data, qb.scale, torch.float32, emulation="dequant")
    assert rel(fast, ref_q) < 1e-6
    # oracle 2: the FP64 product of the unquantised inputs -> FP8 quantisation error (~2-4%)
    ref = a.double() @ b.double().t()
    assert rel(out, ref) < 0.06
    bf = fp8_gemm_nt(qa.data, qa.scale, qb.data, qb.scale, torch.bfloat16, backend="emulate")
    assert bf.dtype == torch.bfloat16 and rel(bf, ref_q) < 1e-2


def test_gemm_rejects_bad_arguments():
    qa, qb = quantize_tiles(torch.randn(4, 128)), quantize_blocks(torch.randn(8, 256))
    with pytest.raises(ValueError, match="K mismatch"):
        fp8_gemm_nt(qa.data, qa.scale, qb.data, qb.scale)
    with pytest.raises(ValueError, match="backend"):
        fp8_gemm_nt(qa.data, qa.scale, qa.data, qa.scale, backend="tpu")
    with pytest.raises(ValueError, match="scale shape"):
        fp8_gemm_nt(qa.data, qa.scale[:, :0], qa.data, qa.scale)


def test_round_mantissa():
    x = torch.tensor([1.0 + 2.0 ** -13 + 2.0 ** -20, -(1.0 + 2.0 ** -14), 3.0, 0.0])
    t = round_mantissa(x, 13)
    assert t.tolist() == [1.0 + 2.0 ** -13, -1.0, 3.0, 0.0]
    n = round_mantissa(torch.tensor([1.0 + 2.0 ** -14 + 2.0 ** -20]), 13, "nearest")
    assert n.item() == 1.0 + 2.0 ** -13
    assert torch.equal(round_mantissa(x, 23), x)


def test_accumulation_experiment_promotion_fixes_error():
    r = accumulation_experiment(K=4096, M=8, N=8)
    # 13-bit accumulator over K=4096 loses percent-level accuracy; promotion every 128 fixes it
    assert r["accum_err_no_promotion"] > 1e-2
    assert r["accum_err_promotion"] < 2e-3
    assert r["accum_err_no_promotion"] > 10 * r["accum_err_promotion"]
    assert r["accum_err_fp32"] < 1e-5


# ---- FP8 linear --------------------------------------------------------------------------------

def _grads(fn, x, w, dy, dtype):
    xx = x.to(dtype).detach().requires_grad_()
    ww = w.to(dtype).detach().requires_grad_()
    y = fn(xx, ww)
    y.backward(dy.to(y.dtype))
    return y.detach().double(), xx.grad.double(), ww.grad.double()


@pytest.mark.parametrize("recipe", [FP8Recipe(), FP8Recipe(pow2_scales=True), FP8Recipe(emulation="blocks")])
def test_fp8_linear_gradients_close_to_bf16(recipe):
    """Stated bound: output, dgrad and wgrad within 6% (relative Frobenius) of the BF16 linear and
    of FP64; BF16 itself is within 0.5% of FP64. E4M3 keeps 3 mantissa bits (~3.6% per element
    RMS for a product of two rounded operands)."""
    x = torch.randn(3, 100, 200)  # leading dims, M=300 and K=200 not multiples of 128
    w = torch.randn(150, 200) * 0.05
    dy = torch.randn(3, 100, 150)
    ref = _grads(lambda a, b: a @ b.t(), x, w, dy, torch.float64)
    bf = _grads(F.linear, x, w, dy, torch.bfloat16)
    f8 = _grads(lambda a, b: fp8_linear(a, b, recipe=recipe), x, w, dy, torch.float32)
    for name, r8, rb, r in zip(("y", "dx", "dw"), f8, bf, ref):
        assert rel(rb, r) < 5e-3, name
        assert rel(r8, r) < 0.06, name
        assert rel(r8, rb) < 0.06, name
        assert r8.shape == r.shape


@pytest.mark.parametrize("cache", ["fp8", "input"])
def test_fp8_linear_matches_its_recipe_exactly(cache):
    """Each of the three GEMMs uses exactly the stated tiling: x 1x128 . W 128x128; dy 1x128 . W
    128x128 (transposed); dy 128x1 . x 128x1, x's 128x1 tiles taken from its kept 1x128 tiles (the FP8
    activation cache) or from x itself."""
    x = torch.randn(200, 160, requires_grad=True)
    w = torch.randn(96, 160, requires_grad=True)
    dy = torch.randn(200, 96)
    y = fp8_linear(x, w, recipe=FP8Recipe(activation_cache=cache))
    y.backward(dy)
    fq = lambda t, g: fake_quantize(t, g).double()  # noqa: E731
    kept = fake_quantize(x.detach(), "tile") if cache == "fp8" else x.detach()
    # FP32 sums in the BLAS's order, each product scaled twice (block promotion): within the
    # worst-case rounding bound; another tiling moves the operands by ~2^-4, far outside it
    assert_fp32_gemm(y, fq(x, "tile"), fq(w, "block").t(), extra_roundings=2)
    assert_fp32_gemm(x.grad, fq(dy, "tile"), fq(w, "block"), extra_roundings=2)
    assert_fp32_gemm(w.grad, fq(dy.t(), "tile"), fq(kept.t(), "tile").t(), extra_roundings=2)
    assert w.grad.dtype == torch.float32


def _normal_after_retiling(M: int, K: int) -> torch.Tensor:
    """(M, K): rows of magnitudes in [1, 2) times 2^0..2^4, so that every value scaled by its 128x1 tile's
    power-of-two scale stays an E4M3 normal (>= 2^-6) and re-tiling a 1x128 copy loses nothing."""
    return (1 + torch.rand(M, K)) * torch.randn(M, K).sign() * 2.0 ** torch.randint(0, 5, (M, 1))


@pytest.mark.parametrize("grouped", [False, True])
def test_fp8_activation_cache_is_exact_with_power_of_two_scales(grouped):
    """The report's reason for UE8M0 scales on re-tiled activations: with power-of-two scales the kept 1x128 tiles
    re-tiled 128x1 give the codes a 128x1 quantization of the input gives (each code times a power of two), so
    wgrad is bit for bit what keeping the input gives; with amax/448 scales it takes one more rounding."""
    counts = [130, 70]
    x = _normal_after_retiling(sum(counts), 160)
    w = torch.randn(len(counts), 96, 160) * 0.1
    dy = torch.randn(sum(counts), 96)
    for pow2 in (True, False):
        dws = {}
        for cache in ("fp8", "input"):
            recipe = FP8Recipe(activation_cache=cache, pow2_scales=pow2)
            wr = (w if grouped else w[0]).clone().requires_grad_()
            y = (fp8_grouped_linear(x, wr, torch.tensor(counts), recipe) if grouped
                 else fp8_linear(x, wr, recipe=recipe))
            y.backward(dy)
            dws[cache] = wr.grad
        assert torch.equal(dws["fp8"], dws["input"]) == pow2


@pytest.mark.parametrize("cache", ["fp8", "input"])
def test_fp8_layers_keep_their_input_as_the_recipe_says(cache):
    """What backward keeps besides the weights' FP8 blocks: the input's 1x128 tiles (a byte an element and a scale
    a tile) with the FP8 activation cache, or the input itself; the experts' w1 and w3 share one quantized copy."""
    recipe = FP8Recipe(activation_cache=cache)
    stored = lambda *ts: sum(t.untyped_storage().nbytes() for t in ts)  # noqa: E731
    x = torch.randn(300, 200, requires_grad=True)  # K = 200: tiles padded to 256 columns
    lin = FP8Linear(200, 96, bias=False, recipe=recipe)
    weights = stored(*quantize_blocks(lin.weight.detach())[:2])
    kept = stored(*quantize_tiles(x.detach())[:2]) if cache == "fp8" else x.nbytes
    assert kept < x.nbytes / 3 or cache == "input"
    assert saved_bytes(lambda: lin(x), lin) == weights + kept
    ex = FP8Experts.from_experts(Experts(2, 200, 128), recipe)
    counts = torch.tensor([120, 180])
    weights = sum(stored(*quantize_blocks_batched(w.detach())) for w in (ex.w1, ex.w2, ex.w3))
    h_tiles = stored(*quantize_tiles(torch.zeros(300, 128))[:2])
    # FP8: h1's and h3's tiles (the SwiGLU's output recomputed from them); else h1, silu(h1) and h3 in FP32 for the
    # SwiGLU's backward, and its output's tiles for w2's wgrad
    swiglu_kept = 2 * h_tiles if cache == "fp8" else 3 * 300 * 128 * 4 + 300 * 128 * 4
    assert saved_bytes(lambda: ex(x, counts), ex) == weights + kept + swiglu_kept


@pytest.mark.parametrize("limit", [0.0, 1.5])
def test_fp8_swiglu_down_recomputes_from_its_fp8_inputs(limit):
    """``FP8SwiGLUDownFunction``: the forward of the SwiGLU then w2's grouped FP8 GEMM, bit for bit; backward that
    of the same two run on the SwiGLU inputs' 1x128 tiles dequantized (the output recomputed from them, w2's wgrad
    operand kept as it is), bit for bit: the report's cached SwiGLU inputs."""
    counts = [130, 0, 70]
    h1, h3 = (torch.randn(sum(counts), 200) for _ in range(2))
    w2 = torch.randn(len(counts), 96, 200) * 0.1
    dy = torch.randn(sum(counts), 96)
    grads = []
    for fused in (True, False):
        w = w2.clone().requires_grad_()
        a, b = ((h1, h3) if fused else (fake_quantize(h1, "tile"), fake_quantize(h3, "tile")))
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        if fused:
            y = FP8SwiGLUDownFunction.apply(a, b, w, counts, FP8Recipe(), torch.float32, limit)
        else:
            y = fp8_grouped_linear(swiglu(a, b, limit), w, counts, FP8Recipe(activation_cache="input"))
        y.backward(dy)
        grads.append((a.grad, b.grad, w.grad))
    for ours, ref in zip(*grads):
        assert torch.equal(ours, ref)
    y_ref = fp8_grouped_linear(swiglu(h1, h3, limit), w2, counts)
    assert torch.equal(FP8SwiGLUDownFunction.apply(h1, h3, w2, counts, FP8Recipe(), torch.float32, limit), y_ref)


def test_tiles_and_blocks_floor_amax_as_deepseeks_quantizers():
    """DeepSeek's act_quant (DeepSeek-V3 inference/kernel.py) and DeepGEMM's casts: s = max(amax, 1e-4) / 448 per
    tile or block, a zero one included, and the codes x / s: re-implemented here, equal bit for bit."""
    x = torch.randn(4, 256) * torch.tensor([1.0, 3e-5, 0.0, 2e-4])[:, None]  # amax above, below the floor, zero
    for q, amax, expand in (
            (quantize_tiles(x), x.abs().view(4, 2, 128).amax(-1), lambda s: s.repeat_interleave(128, 1)),
            (quantize_blocks(x), x.abs().view(1, 4, 2, 128).amax((1, 3)),
             lambda s: s.repeat_interleave(128, 0)[:4].repeat_interleave(128, 1))):
        s = amax.clamp(min=1e-4) / 448.0
        assert torch.equal(q.scale, s)
        assert torch.equal(q.data.view(torch.uint8), (x / expand(s)).to(torch.float8_e4m3fn).view(torch.uint8))


@pytest.mark.parametrize("grouped", [False, True])
def test_gradients_are_quantized_without_the_floor(grouped):
    """A gradient's tiles may be far below 1e-4: quantized without the floor, dx and dW of dy / 2^40 are those of dy
    over 2^40 exactly (power-of-two scaling commutes with each tile's scale); floored, they would lose bits."""
    x = torch.randn(130, 160)
    w = torch.randn(96, 160) * 0.1
    dy = torch.randn(130, 96)
    grads = []
    for d in (dy, dy * 2.0 ** -40):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8_grouped_linear(xr, wr[None], torch.tensor([130])) if grouped else fp8_linear(xr, wr)
        y.backward(d)
        grads.append((xr.grad, wr.grad))
    (dx, dw), (dx_small, dw_small) = grads
    assert torch.equal(dx_small, dx * 2.0 ** -40) and torch.equal(dw_small, dw * 2.0 ** -40)


def test_fp8_linear_dtypes_with_and_without_autocast():
    lin = FP8Linear(64, 32, bias=True)
    x = torch.randn(5, 64)
    assert lin(x).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
    assert lin.weight.grad.dtype == torch.float32 and lin.bias.grad is not None
    xb = torch.randn(5, 64, dtype=torch.bfloat16, requires_grad=True)
    yb = lin(xb)
    assert yb.dtype == torch.bfloat16
    yb.float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16


def test_e5m2_gradients_are_coarser():
    x, w, dy = torch.randn(256, 256), torch.randn(128, 256) * 0.05, torch.randn(256, 128)
    ref = _grads(lambda a, b: a @ b.t(), x, w, dy, torch.float64)
    e4 = _grads(lambda a, b: fp8_linear(a, b), x, w, dy, torch.float32)
    e5 = _grads(lambda a, b: fp8_linear(a, b, recipe=FP8Recipe(grad_fmt="e5m2")), x, w, dy, torch.float32)
    assert rel(e5[0], ref[0]) == pytest.approx(rel(e4[0], ref[0]))  # forward unchanged
    assert rel(e5[1], ref[1]) > rel(e4[1], ref[1])


def test_recipe_validation():
    with pytest.raises(ValueError, match="fmt"):
        FP8Recipe(fmt="e3m4")
    with pytest.raises(ValueError, match="backend"):
        FP8Recipe(backend="gpu")


# ---- grouped experts ---------------------------------------------------------------------------

@pytest.mark.parametrize("emulation", ["dequant", "blocks"])
def test_grouped_linear_equals_per_expert_linear(emulation):
    """The grouped path (operands quantised once for all experts, wgrad re-tiled inside each
    expert's 128-aligned segment) equals one FP8 linear per expert."""
    recipe = FP8Recipe(emulation=emulation)
    counts = [0, 5, 130, 0, 260, 1]
    E, Fo, K = len(counts), 72, 96
    x = torch.randn(sum(counts), K)
    w = torch.randn(E, Fo, K) * 0.1
    dy = torch.randn(sum(counts), Fo)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    yg = fp8_grouped_linear(xg, wg, torch.tensor(counts), recipe)
    yg.backward(dy)
    start = 0
    for e, n in enumerate(counts):
        xe = x[start:start + n].clone().requires_grad_()
        we = w[e].clone().requires_grad_()
        if n:
            ye = fp8_linear(xe, we, recipe=recipe)
            ye.backward(dy[start:start + n])
            torch.testing.assert_close(yg[start:start + n], ye, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(xg.grad[start:start + n], xe.grad, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(wg.grad[e], we.grad, rtol=1e-5, atol=1e-5)
        else:
            assert torch.all(wg.grad[e] == 0)
        start += n


def test_fp8_experts_close_to_experts():
    ex = Experts(4, 64, 48)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.1)
    f8 = FP8Experts.from_experts(copy.deepcopy(ex))
    counts = torch.tensor([10, 0, 33, 7])
    x = torch.randn(50, 64)
    y_ref, y8 = ex(x, counts), f8(x, counts)
    assert rel(y8, y_ref) < 0.08
    y8.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in f8.parameters())


# ---- convert_to_fp8 ----------------------------------------------------------------------------

def _tiny(**kw):
    return preset("tiny", vocab_size=256, n_layers=2, max_seq_len=64, original_seq_len=64, **kw)


class _Holder(torch.nn.Module):
    def __init__(self, mlp: torch.nn.Module):
        super().__init__()
        self.mlp = mlp


@pytest.mark.parametrize("limit", [0.0, 1.5])
def test_fp8_mlp_recomputes_its_swiglu_from_fp8_inputs(limit):
    """Dense FFN layers and shared experts under the FP8 activation cache (``FP8MLP``): the forward of the MLP of
    three FP8 layers bit for bit (FP32 and BF16 autocast); the gradients, bit for bit, of that MLP with the SwiGLU
    fed its inputs' 1x128 tiles dequantized (straight through) and w2 keeping its own input, the routed experts'
    cache (``FP8SwiGLUDownFunction``); and what backward keeps: the weights' blocks, the input's tiles once for
    w1 and w3, and the SwiGLU inputs' tiles (the three layers with w2 keeping its input keep two copies of the
    input's tiles, h1, h3 and the SwiGLU output: ``kept_swiglu`` recomputes SiLU's output). The gradients'
    reference runs the same one-group FP8 GEMMs (``FP8GroupedLinearFunction``) as ``FP8MLP``: the FP8 layers' own 2D
    GEMMs sum over the padded K in another layout, which MKL rounds alike on Intel CPUs and not on AMD ones."""
    torch.manual_seed(0)
    D, F_ = 200, 300
    mlp = MLP(D, F_, limit=limit)
    fast = convert_to_fp8(_Holder(copy.deepcopy(mlp))).mlp
    plain = convert_to_fp8(_Holder(copy.deepcopy(mlp)), recipe=FP8Recipe(activation_cache="input")).mlp
    ref = _Holder(copy.deepcopy(mlp))  # w2 keeps its input, w1 and w3 their input's tiles
    convert_to_fp8(ref, lambda n, _: n.endswith("w2"), FP8Recipe(activation_cache="input"))
    ref = convert_to_fp8(ref).mlp
    assert type(fast) is FP8MLP and type(plain) is MLP and type(ref) is MLP
    x, dy = torch.randn(2, 70, D), torch.randn(2, 70, D)
    for autocast in (False, True):
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            assert torch.equal(fast(x), plain(x))
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    fast(xf).backward(dy)
    tiles = lambda h: h + (fake_quantize(h.detach(), "tile") - h).detach()  # noqa: E731
    r, rows, n = fast.w2.recipe, xr.view(-1, D), [x.shape[0] * x.shape[1]]
    w1, w2, w3 = (getattr(ref, k).weight.unsqueeze(0) for k in ("w1", "w2", "w3"))
    with torch.no_grad():
        qx = quantize_tiles(rows, r.fmt, r.pow2_scales)  # once for w1 and w3, as FP8MLP
    h1, h3 = (FP8GroupedLinearFunction.apply(rows, w, n, r, torch.float32, qx) for w in (w1, w3))
    keep = dataclasses.replace(r, activation_cache="input")  # w2 keeps its own input
    FP8GroupedLinearFunction.apply(swiglu(tiles(h1), tiles(h3), limit), w2, n, keep, torch.float32).backward(
        dy.view(-1, D))
    assert torch.equal(xf.grad, xr.grad)
    for n in ("w1", "w2", "w3"):
        assert torch.equal(getattr(fast, n).weight.grad, getattr(ref, n).weight.grad), n
    stored = lambda *ts: sum(t.untyped_storage().nbytes() for t in ts)  # noqa: E731
    blocks = sum(stored(*quantize_blocks_batched(m.weight.detach().unsqueeze(0))) for m in (fast.w1, fast.w2, fast.w3))
    x_tiles, h_tiles = (stored(*quantize_tiles(torch.zeros(140, c))[:2]) for c in (D, F_))
    assert saved_bytes(lambda: fast(x), fast) == blocks + x_tiles + 2 * h_tiles
    assert saved_bytes(lambda: ref(x), ref) == blocks + 2 * x_tiles + 3 * 4 * 140 * F_


def test_fp8_mlp_without_gradients_is_the_plain_mlp_and_bare_layers():
    """Without gradients (evaluation, ``flyer generate --precision fp8``) ``FP8MLP`` runs the MLP of its FP8 layers,
    bit for bit even where the grouped emulation sums a one-tile K in another order (D = 128), and quantizes no
    SwiGLU input for a backward that will not come. ``convert_to_fp8`` swaps layers in place: a bare MLP gets its
    FP8 layers (no child named "", as a swap of the root registered), a bare linear layer is refused in one line."""
    torch.manual_seed(0)
    mlp = MLP(128, 256)
    fast = convert_to_fp8(_Holder(copy.deepcopy(mlp))).mlp
    plain = convert_to_fp8(_Holder(copy.deepcopy(mlp)), recipe=FP8Recipe(activation_cache="input")).mlp
    x = torch.randn(3, 128)
    with torch.no_grad():
        assert torch.equal(fast(x), plain(x))
    bare = convert_to_fp8(copy.deepcopy(mlp))
    assert type(bare) is MLP and [n for n, _ in bare.named_children()] == ["w1", "w2", "w3"]
    assert all(isinstance(m, FP8Linear) for m in bare.children())
    with pytest.raises(ValueError, match="in place"):
        convert_to_fp8(torch.nn.Linear(128, 128))


def test_convert_swaps_recipe_modules_and_keeps_parameters():
    model = Transformer(_tiny())
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    assert convert_to_fp8(model) is model
    assert {n: id(p) for n, p in model.named_parameters()} == {n: id(p) for n, p in params.items()}
    assert list(model.state_dict()) == keys
    names = fp8_modules(model)
    for must in ("layers.0.attn.wq_a", "layers.0.attn.wkv_b", "layers.0.attn.wo", "layers.0.ffn.w1",
                 "layers.1.ffn.experts", "layers.1.ffn.shared.w2", "mtp.0.eh_proj"):
        assert must in names
    assert isinstance(model.layers[1].ffn.experts, FP8Experts)
    # dense FFN and shared experts keep their SwiGLU inputs in FP8 as the routed experts do
    assert type(model.layers[0].ffn) is FP8MLP and type(model.layers[1].ffn.shared) is FP8MLP
    # high precision: embedding, head, router, norms
    assert type(model.head) is Linear and type(model.embed) is torch.nn.Embedding  # flyer.model.lowp.Linear
    assert type(model.layers[1].ffn.gate) is Gate
    assert not any(n.endswith(("norm", "head", "gate", "embed")) for n in names)
    convert_to_fp8(model)  # idempotent
    assert fp8_modules(model) == names


def test_converted_moe_runs_its_fp8_experts():
    """A MoE whose experts were converted to FP8 must run FP8Experts.forward, not the bf16 fused
    single-process path that plain Experts take: same output as the dispatcher seam around the
    FP8 experts, and different from the unconverted bf16 experts."""
    cfg = _tiny()
    torch.manual_seed(0)
    ref = Transformer(cfg)
    f8 = convert_to_fp8(copy.deepcopy(ref))
    x = torch.randn(2, 24, cfg.dim)
    moe_ref, moe_f8 = ref.layers[1].ffn, f8.layers[1].ffn
    assert moe_ref.path == "fused_local" and moe_f8.path == "dispatched"  # re-chosen by the conversion
    assert moe_f8.experts.impl == "fp8" and moe_f8.to("cpu").path == "dispatched"  # a move keeps it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_f8 = moe_f8(x)
        x_TD = x.view(-1, cfg.dim)  # the seam by hand: dispatcher -> FP8Experts.forward -> combine
        weights, ids, _ = moe_f8.gate(x_TD)
        x_sorted, counts, ctx = moe_f8.dispatcher.dispatch(x_TD.bfloat16(), ids)
        y_seam = (moe_f8.dispatcher.combine(moe_f8.experts(x_sorted, counts), weights, ctx)
                  + moe_f8.shared(x_TD.bfloat16()))
        y_bf16 = moe_ref(x)
    assert torch.equal(y_f8, y_seam.view_as(y_f8))
    assert not torch.equal(y_f8, y_bf16)


def test_convert_module_filter_and_gqa():
    cfg = _tiny(attn="gqa", n_kv_heads=2, head_dim=32, q_lora_rank=0)
    model = Transformer(cfg)
    convert_to_fp8(model, module_filter=lambda name, m: name.endswith(("wk", "wv")))
    assert sorted({n.rsplit(".", 1)[-1] for n in fp8_modules(model)}) == ["wk", "wv"]
    tok = torch.randint(0, cfg.vocab_size, (2, 16))
    assert torch.isfinite(model(tok)).all()


@pytest.mark.parametrize("emulate", [True, False])
def test_fp8_model_grads_close_to_bf16(emulate):
    """The whole FP8 model's gradients near the BF16 model's, with the BF16 GEMMs emulated through FP32 or run
    natively (forced: the CPU's kind picks otherwise). Each FP8 GEMM is held to its own bound above; here E4M3's
    errors compound over ~40 GEMMs and flip a few top-k routing choices, so the check is statistical (the loss of a
    random model is not one: zeroing every FP8 weight moves it by 1e-3)."""
    cfg = _tiny()
    torch.manual_seed(1)
    ref = Transformer(cfg)
    f8 = convert_to_fp8(copy.deepcopy(ref))
    tok = torch.randint(0, cfg.vocab_size, (4, 33))
    out = {}
    for name, m in (("bf16", ref), ("fp8", f8)):
        with emulation(emulate):  # backward's GEMMs too
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = m.compute_loss(tok[:, :-1], tok[:, 1:])
            loss.loss.backward()
        out[name] = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
    g8, gb = out["fp8"], out["bf16"]
    assert rel(g8, gb) < 0.2
    assert float(F.cosine_similarity(g8, gb, dim=0)) > 0.98
    assert all(p.dtype == torch.float32 for p in f8.parameters())


@pytest.mark.slow
def test_fp8_training_tracks_bf16():
    """30 AdamW steps on a fixed batch set: the FP8 loss curve stays within 1% of BF16's. BF16's GEMMs run one way
    on every CPU (``lowp.emulation``: BF16-rounded operands, FP32 GEMMs; 0.2-0.35% apart), as flyer runs them where
    the CPU has no BF16 hardware: AMX's kernels put the curves 0.1% apart, oneDNN's AVX-512 kernels that widen BF16
    inside (FLYER_LOWP_EMULATION=0) 0.8-1.2%, near the bound."""
    cfg = _tiny()
    torch.manual_seed(2)
    base = Transformer(cfg)
    data = torch.randint(0, 64, (8, 4, 33))  # 64-token sub-vocabulary: learnable quickly
    curves = {}
    for name in ("bf16", "fp8"):
        m = copy.deepcopy(base)
        if name == "fp8":
            convert_to_fp8(m)
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
        losses = []
        for step in range(30):
            tok = data[step % len(data)]
            with torch.autocast("cpu", dtype=torch.bfloat16), emulation(True):
                loss = m.compute_loss(tok[:, :-1], tok[:, 1:])
            opt.zero_grad()
            with emulation(True):
                loss.loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.main_loss.detach()))
        curves[name] = losses
    assert curves["bf16"][-1] < curves["bf16"][0] - 1.0  # it learned
    last_bf16 = sum(curves["bf16"][-5:]) / 5
    last_fp8 = sum(curves["fp8"][-5:]) / 5
    assert abs(last_fp8 - last_bf16) / last_bf16 < 0.01


# ---- LogFMT ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 10])
def test_logfmt_bounds_and_zeros(bits):
    x = wide_range(6, 300)
    x[0] = 0.0
    x[1, :7] = 0.0
    enc = logfmt_encode(x, bits)
    assert enc.codes.abs().max() <= 2 ** (bits - 1) - 1
    y = logfmt_decode(enc)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert torch.all(y[x == 0] == 0) and torch.all(torch.sign(y) == torch.sign(x))
    # linear-space rounding between neighbours a and a*r: relative error <= (r - 1) / (r + 1)
    r = torch.exp2(enc.step).repeat_interleave(TILE, 1)[:, :300]
    bound = (r - 1) / (r + 1)
    nz = x != 0
    assert torch.all(((y - x).abs() / x.abs())[nz] <= bound[nz] * (1 + 1e-4))
    # each tile's largest magnitude is a level (exact up to exp2/log2 rounding)
    tiles_max = F.pad(x, (0, 84)).abs().view(6, -1, TILE).amax(-1)
    ymax = F.pad(y, (0, 84)).abs().view(6, -1, TILE).amax(-1)
    torch.testing.assert_close(ymax, tiles_max, rtol=1e-5, atol=0)


def test_logfmt_accuracy_ordering():
    x = torch.randn(64, 512)
    err = {b: rel(logfmt_roundtrip(x, b), x) for b in (8, 10)}
    e4m3, e5m2 = rel(fake_quantize(x, "tile", E4M3), x), rel(fake_quantize(x, "tile", E5M2), x)
    bf16 = rel(x.bfloat16().float(), x)
    assert err[8] < e4m3 < e5m2
    assert err[10] < 3 * bf16


# ---- CUDA: _scaled_mm against the emulation ------------------------------------------------------

needs_fp8_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and cuda_fp8_supported(torch.device("cuda"))),
                                    reason="needs a CUDA device with FP8 support (SM 8.9+)")


@pytest.mark.cuda
@needs_fp8_cuda
@pytest.mark.parametrize("b_gran", ["block", "tile"])
@pytest.mark.parametrize("M,N,K", [(64, 256, 512), (200, 136, 384)])
def test_cuda_gemm_matches_emulation(b_gran, M, N, K):
    a = wide_range(M, K).cuda()
    b = torch.randn(N, K, device="cuda")
    qa = quantize_tiles(a)
    qb = quantize_blocks(b) if b_gran == "block" else quantize_tiles(b)
    want = emulated_gemm_nt(qa.data.cpu(), qa.scale.cpu(), qb.data.cpu(), qb.scale.cpu(), torch.float32, "blocks")
    got = fp8_gemm_nt(qa.data, qa.scale, qb.data, qb.scale, torch.float32, backend="cuda")
    assert got.shape == (M, N)
    assert rel(got.cpu(), want) < 4e-3, cuda_gemm_path(a.device, b_gran == "tile")  # layout bugs give O(1)


@pytest.mark.cuda
@needs_fp8_cuda
def test_cuda_rowwise_fallback_matches_emulation():
    from flyer.fp8.gemm import _scaled_mm_rowwise_promoted

    qa, qb = quantize_tiles(wide_range(48, 384).cuda()), quantize_blocks(torch.randn(160, 384, device="cuda"))
    want = emulated_gemm_nt(qa.data.cpu(), qa.scale.cpu(), qb.data.cpu(), qb.scale.cpu(), torch.float32, "blocks")
    got = _scaled_mm_rowwise_promoted(qa.data, qa.scale, qb.data, qb.scale, torch.float32)
    assert rel(got.cpu(), want) < 4e-3  # BF16 block results on some builds


@pytest.mark.cuda
@needs_fp8_cuda
def test_cuda_fp8_linear_matches_cpu_emulation():
    x, w, dy = torch.randn(300, 200), torch.randn(150, 200) * 0.05, torch.randn(300, 150)
    cpu = _grads(lambda a, b: fp8_linear(a, b, recipe=FP8Recipe(backend="emulate")), x, w, dy, torch.float32)
    gpu = _grads(lambda a, b: fp8_linear(a, b, recipe=FP8Recipe(backend="cuda")), x.cuda(), w.cuda(), dy.cuda(),
                 torch.float32)
    for c, g in zip(cpu, gpu):
        assert rel(g.cpu(), c) < 4e-3


def test_cuda_backend_refuses_cpu_tensors():
    qa = quantize_tiles(torch.randn(4, 128))
    with pytest.raises(RuntimeError, match="CUDA"):
        fp8_gemm_nt(qa.data, qa.scale, qa.data, qa.scale, backend="cuda")
    assert math.isfinite(float(dequantize(qa.data, qa.scale).sum()))


def test_zero_row_tiles_round_trip():
    """A rank that receives no tokens quantises and dequantises an empty (0, D) tensor."""
    from flyer.fp8.quant import dequantize, quantize_tiles

    q = quantize_tiles(torch.zeros(0, 200))
    assert q.data.shape == (0, 256) and q.scale.shape == (0, 2)
    assert dequantize(q.data, q.scale).shape == (0, 256)


@pytest.mark.cuda
@needs_fp8_cuda
@pytest.mark.parametrize("M", [150, 7])
def test_cuda_gemm_rows_not_multiple_of_16(M):
    """cuBLAS has no block-scaled kernel for M % 16 != 0 (CUBLAS_STATUS_NOT_SUPPORTED on an H200,
    torch 2.11): the rows are padded, the result sliced; it used to raise in wgrad."""
    a = wide_range(M, 384).cuda()
    b = torch.randn(200, 384, device="cuda")
    for qb in (quantize_tiles(b), quantize_blocks(b)):
        qa = quantize_tiles(a)
        got = fp8_gemm_nt(qa.data, qa.scale, qb.data, qb.scale, torch.float32, backend="cuda")
        want = fp8_gemm_nt(qa.data.cpu(), qa.scale.cpu(), qb.data.cpu(), qb.scale.cpu(), torch.float32,
                           backend="emulate")
        assert got.shape == (M, 200)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))


def test_ceil_pow2_keeps_exact_powers_of_two():
    """The smallest power of two >= x is x itself for a power of two (frexp's mantissa 0.5 there): UE8M0 scales
    are DeepSeek's ceil(log2), not one bit too large for a tile whose amax is 448 times a power of two."""
    x = torch.tensor([2.0 ** -20, 0.25, 1.0, 1024.0, 3.0, 0.3, 1.0000001])
    assert torch.equal(ceil_pow2(x), torch.tensor([2.0 ** -20, 0.25, 1.0, 1024.0, 4.0, 0.5, 2.0]))
    t = torch.zeros(1, 128)
    t[0, 0] = 448.0 / 8
    q = quantize_tiles(t, "e4m3", pow2_scales=True)
    assert float(q.scale[0, 0]) == 2.0 ** -3 and float(q.data[0, 0].float()) == 448.0


def test_batched_block_dequantisation_with_a_partial_row_block():
    """``dequantize_blocks_batched`` with rows not a multiple of 128 (200: a whole block of rows and a partial one)
    equals each matrix's own block dequantisation."""
    w = torch.randn(3, 200, 130) * torch.logspace(-2, 2, 200)[None, :, None]
    got = dequantize_blocks_batched(*quantize_blocks_batched(w))
    for e in range(3):
        q = quantize_blocks(w[e])
        assert torch.equal(got[e], dequantize(q.data, q.scale))


def test_fp8_max_is_the_formats_largest_finite_value():
    """FP8_MAX, which the scale tests compare against, is each format's largest finite value (torch's finfo)."""
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        assert FP8_MAX[dtype] == torch.finfo(dtype).max
