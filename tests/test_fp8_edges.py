"""FP8 GEMM and layer edges a mutation sweep of ``flyer.fp8.gemm`` / ``flyer.fp8.linear`` found unpinned: argument
checks, the recipe's E5M2 gradients and power-of-two scales reaching every quantization, the bias, the CUDA backend
refused on CPU tensors, the one-block and grouped emulations bit for bit, the limited accumulator against the exact
emulation. Oracles: FP64 products of ``fake_quantize``'s operands, within the FP32 sum bound (``bounds``)."""

from __future__ import annotations

import copy

import pytest
import torch

from bounds import assert_fp32_gemm
from flyer.fp8 import (FP8Experts, FP8Linear, FP8Recipe, convert_to_fp8, emulated_gemm_nt, fake_quantize, fp8_gemm_nt,
                       fp8_grouped_linear, fp8_linear, quantize_blocks, quantize_tiles)
from flyer.fp8.fp4 import fp4_experts
from flyer.fp8.gemm import limited_accumulator_gemm, round_mantissa
from flyer.fp8.linear import FP8SwiGLUDownFunction
from flyer.model.experts import MLP, Experts, swiglu

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


class _Holder(torch.nn.Module):
    def __init__(self, child: torch.nn.Module):
        super().__init__()
        self.child = child


def test_round_mantissa_nearest_and_its_bounds():
    """To nearest adds half a dropped ulp (a whole one rounded 1 + 2^-20 up); 23 bits keep FP32 as it is."""
    x = torch.tensor([1.0 + 2.0 ** -20, 1.0 + 2.0 ** -14, -(1.0 + 2.0 ** -14), 1.0 + 2.0 ** -14 - 2.0 ** -20])
    assert round_mantissa(x, 13, "nearest").tolist() == [1.0, 1.0 + 2.0 ** -13, -(1.0 + 2.0 ** -13), 1.0]
    assert torch.equal(round_mantissa(x, 23, "nearest"), x)
    for bad in (-1, 24):
        with pytest.raises(ValueError, match="mantissa_bits"):
            round_mantissa(x, bad)


def _operands(per_row: bool = False, K: int = 512):
    """E4M3 tiles of [0, 1) activations and weights; per-block magnitudes over four decades unless ``per_row`` (one
    scale per row: every block's largest pinned to 1)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.rand(5, K, generator=g), torch.rand(3, K, generator=g)
    if per_row:
        x[:, ::128] = w[:, ::128] = 1.0
    else:
        x = x * torch.logspace(-2, 2, K // 128).repeat_interleave(128)
    return quantize_tiles(x), quantize_tiles(w)


@pytest.mark.parametrize("promote_every", [64, 128, None])
def test_limited_accumulator_with_an_fp32_register_is_the_emulation(promote_every):
    """With 23 mantissa bits the limited accumulator is an FP32 one: the exact emulation's GEMM within the FP32 sum
    bound, whatever the promotion interval (the scales of each block applied to its own products)."""
    qa, qb = _operands(per_row=promote_every is None)
    out = limited_accumulator_gemm(qa.data, qa.scale, qb.data, qb.scale, mantissa_bits=23, promote_every=promote_every)
    assert_fp32_gemm(out, qa.dequantize(), qb.dequantize().t(), extra_roundings=2)


def test_limited_accumulator_refuses_intervals_spanning_scale_blocks():
    """An interval of 256 spanned two scale blocks but took the last one's scales for both (79% off); intervals must
    divide 128 now, and no promotion needs one scale per row."""
    qa, qb = _operands()
    for every in (256, 384, 96, 0):
        with pytest.raises(ValueError, match="promote_every must divide 128"):
            limited_accumulator_gemm(qa.data, qa.scale, qb.data, qb.scale, promote_every=every)
    with pytest.raises(ValueError, match="same scale for every K-block"):
        limited_accumulator_gemm(qa.data, qa.scale, qb.data, qb.scale, promote_every=None)


def test_fp8_linear_adds_its_bias():
    lin = FP8Linear(200, 96, bias=True)
    torch.nn.init.normal_(lin.bias)
    x = torch.randn(7, 200)
    assert torch.equal(lin(x), fp8_linear(x, lin.weight) + lin.bias)


@pytest.mark.parametrize("grouped", [False, True])
def test_e5m2_gradients_leave_the_inputs_in_e4m3(grouped):
    """``grad_fmt="e5m2"``: the output gradient in E5M2 tiles, the weight's blocks and the cached activations in E4M3,
    for the plain and the grouped GEMMs."""
    r = FP8Recipe(grad_fmt="e5m2")
    x = torch.randn(200, 160, requires_grad=True)
    w = (torch.randn(96, 160) * 0.1).requires_grad_()
    dy = torch.randn(200, 96)
    (fp8_grouped_linear(x, w[None], [200], r) if grouped else fp8_linear(x, w, recipe=r)).backward(dy)
    fq = fake_quantize
    assert_fp32_gemm(x.grad, fq(dy, "tile", E5M2), fq(w.detach(), "block", E4M3), extra_roundings=2)
    kept = fq(x.detach(), "tile")
    assert_fp32_gemm(w.grad, fq(dy.t(), "tile", E5M2), fq(kept.t(), "tile", E4M3).t(), extra_roundings=2)


@pytest.mark.parametrize("grouped", [False, True])
def test_power_of_two_scales_reach_the_weights(grouped):
    r = FP8Recipe(pow2_scales=True)
    x, w = torch.randn(200, 160), torch.randn(96, 160) * 0.1
    y = fp8_grouped_linear(x, w[None], [200], r) if grouped else fp8_linear(x, w, recipe=r)
    want = fake_quantize(x, "tile", pow2_scales=True), fake_quantize(w, "block", pow2_scales=True).t()
    assert_fp32_gemm(y, *want, extra_roundings=2)


def test_power_of_two_scales_reach_every_expert_gemm():
    """FP8 experts under a power-of-two recipe, either activation cache: the three grouped GEMMs of that recipe, bit
    for bit (the input quantized once for w1 and w3 as each GEMM would quantize it)."""
    ex = Experts(2, 160, 200)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.1)
    counts, x, r = [70, 130], torch.randn(200, 160), FP8Recipe(pow2_scales=True)
    h1, h3 = (fp8_grouped_linear(x, getattr(ex, w).detach(), counts, r) for w in ("w1", "w3"))
    want = fp8_grouped_linear(swiglu(h1, h3), ex.w2.detach(), counts, r)
    for cache in ("fp8", "input"):
        got = FP8Experts.from_experts(ex, FP8Recipe(pow2_scales=True, activation_cache=cache))(x, torch.tensor(counts))
        assert torch.equal(got, want), cache


def test_swiglu_down_recomputes_from_power_of_two_tiles():
    """The fused SwiGLU-down's backward, under power-of-two scales, equals the unfused one on the same tiles."""
    r, counts = FP8Recipe(pow2_scales=True), [130, 70]
    h1, h3, w2, dy = torch.randn(200, 200), torch.randn(200, 200), torch.randn(2, 96, 200) * 0.1, torch.randn(200, 96)
    grads = []
    for fused in (True, False):
        a, b = (h1, h3) if fused else (fake_quantize(h, "tile", pow2_scales=True) for h in (h1, h3))
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        y = (FP8SwiGLUDownFunction.apply(a, b, w2, counts, r, torch.float32, 0.0) if fused else
             fp8_grouped_linear(swiglu(a, b), w2, counts, FP8Recipe(pow2_scales=True, activation_cache="input")))
        y.backward(dy)
        grads.append((a.grad, b.grad))
    for ours, ref in zip(*grads):
        assert torch.equal(ours, ref)


def test_fp8_mlp_uses_its_layers_recipe():
    mlp = MLP(200, 300)
    fast = convert_to_fp8(_Holder(copy.deepcopy(mlp)), recipe=FP8Recipe(pow2_scales=True)).child
    plain = convert_to_fp8(_Holder(copy.deepcopy(mlp)),
                           recipe=FP8Recipe(pow2_scales=True, activation_cache="input")).child
    x = torch.randn(70, 200)
    assert torch.equal(fast(x), plain(x))


def test_cuda_backend_refuses_cpu_tensors():
    r = FP8Recipe(backend="cuda")
    with pytest.raises(RuntimeError, match="CUDA"):
        fp8_linear(torch.randn(4, 128), torch.randn(8, 128), recipe=r)
    with pytest.raises(RuntimeError, match="CUDA"):
        fp8_grouped_linear(torch.randn(4, 128), torch.randn(1, 8, 128), [4], r)


def test_experts_limit_their_swiglu_with_either_cache():
    ex = Experts(2, 128, 256, swiglu_limit=0.5)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.1)
    counts, x = torch.tensor([30, 20]), torch.randn(50, 128)
    ys = [FP8Experts.from_experts(ex, FP8Recipe(activation_cache=c))(x, counts) for c in ("fp8", "input")]
    assert torch.equal(ys[0], ys[1])


def test_recipe_and_gemm_refuse_unknown_names():
    for kw in (dict(activation_cache="bf16"), dict(emulation="exact")):
        with pytest.raises(ValueError):
            FP8Recipe(**kw)
    qa = quantize_tiles(torch.randn(4, 256))
    with pytest.raises(ValueError):
        emulated_gemm_nt(qa.data, qa.scale, qa.data, qa.scale, emulation="exact")


def test_gemm_refuses_operands_that_do_not_fit():
    qa, qb = quantize_tiles(torch.randn(200, 256)), quantize_blocks(torch.randn(8, 256))
    qblocks = quantize_blocks(torch.randn(200, 256))
    bad = [(qa.data[:, :100], qa.scale[:, :0], qb.data[:, :100], qb.scale[:, :0]),  # K not a multiple of 128
           (qa.data, qa.scale[:3], qb.data, qb.scale),  # a's scale rows fit neither layout
           (qblocks.data, qblocks.scale, qb.data, qb.scale),  # a in 128x128 blocks
           (qa.data, qa.scale, qb.data[:, :128], qb.scale[:, :1]),  # a longer than b
           (qa.data, qa.scale, qb.data, torch.ones(3, 2))]  # b's scale fits nothing
    for args in bad:
        with pytest.raises(ValueError):
            fp8_gemm_nt(*args, backend="emulate")


@pytest.mark.parametrize("K", [384, 17 * 128])  # 17 blocks: a second chunk of one block
def test_gemm_defaults_and_long_k(K):
    g = torch.Generator().manual_seed(0)
    qa = quantize_tiles(torch.randn(6, K, generator=g) * torch.logspace(-3, 3, K))
    qb = quantize_blocks(torch.randn(5, K, generator=g))
    out = fp8_gemm_nt(qa.data, qa.scale, qb.data, qb.scale, torch.float32, backend="emulate")
    assert_fp32_gemm(out, qa.dequantize(), qb.dequantize().t(), extra_roundings=2)
    assert torch.equal(out, emulated_gemm_nt(qa.data, qa.scale, qb.data, qb.scale, torch.float32, "blocks"))
    assert fp8_gemm_nt(qa.data, qa.scale, qb.data, qb.scale, backend="emulate").dtype == torch.bfloat16


def test_emulated_gemm_ignores_an_outer_autocast():
    qa, qb = quantize_tiles(torch.randn(6, 384)), quantize_blocks(torch.randn(5, 384))
    for em in ("blocks", "dequant"):
        want = fp8_gemm_nt(qa.data, qa.scale, qb.data, qb.scale, torch.float32, "emulate", em)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(fp8_gemm_nt(qa.data, qa.scale, qb.data, qb.scale, torch.float32, "emulate", em), want)


def test_grouped_blocks_emulation_is_per_expert_bit_for_bit():
    r, counts = FP8Recipe(emulation="blocks"), [130, 70]
    x, w, dy = torch.randn(200, 256), torch.randn(2, 96, 256) * 0.1, torch.randn(200, 96)
    wg = w.clone().requires_grad_()
    yg = fp8_grouped_linear(x, wg, counts, r)
    yg.backward(dy)
    start = 0
    for e, n in enumerate(counts):
        we = w[e].clone().requires_grad_()
        ye = fp8_linear(x[start:start + n], we, recipe=r)
        ye.backward(dy[start:start + n])
        assert torch.equal(yg[start:start + n], ye) and torch.equal(wg.grad[e], we.grad)
        start += n


def test_swiglu_down_gives_h3_its_gradient_alone():
    h1, h3 = torch.randn(130, 200), torch.randn(130, 200, requires_grad=True)
    FP8SwiGLUDownFunction.apply(h1, h3, torch.randn(1, 96, 200) * 0.1, [130], FP8Recipe(), torch.float32,
                                0.0).sum().backward()
    assert h3.grad is not None and torch.isfinite(h3.grad).all() and h3.grad.abs().sum() > 0


def test_conversion_keeps_the_mode_and_the_fp4_weights():
    assert not FP8Linear.from_linear(torch.nn.Linear(128, 64).eval()).training
    assert not FP8Experts.from_experts(Experts(2, 128, 64).eval()).training
    ex = Experts(2, 128, 64)
    fp4_experts(_Holder(ex))
    assert FP8Experts.from_experts(ex).weight_quant is ex.weight_quant is not None


def test_default_recipe_is_the_dequantized_product_and_one_block_emulations_agree():
    x, w = torch.randn(200, 256) * torch.logspace(-3, 3, 256), torch.randn(96, 256)
    assert torch.equal(fp8_linear(x, w), quantize_tiles(x).dequantize() @ quantize_blocks(w).dequantize().t())
    qa, qb = quantize_tiles(torch.randn(64, 100) * torch.logspace(-3, 3, 100)), quantize_blocks(torch.randn(200, 100))
    assert torch.equal(emulated_gemm_nt(qa.data, qa.scale, qb.data, qb.scale, torch.float32, "dequant"),
                       emulated_gemm_nt(qa.data, qa.scale, qb.data, qb.scale, torch.float32, "blocks"))
