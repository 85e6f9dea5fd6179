"""FP8 training: the linear autograd function, FP8 modules, and ``convert_to_fp8``.

The three GEMMs of a linear layer ``y = x W^T`` (x (M, K), W (N, K)), all E4M3 by default
(DeepSeek-V3 report, figure 6):

* forward  ``y  = x  . W^T``:  x in 1x128 tiles, W in 128x128 blocks.
* dgrad    ``dx = dy . W``:    dy in 1x128 tiles (never 128x128: block-wise activation
  gradients made a 16B MoE diverge), W^T in 128x128 blocks (the forward's blocks, transposed).
* wgrad    ``dW = dy^T . x``:  both re-tiled 128x1, i.e. 1x128 tiles along the token dimension
  M, which is this GEMM's reduction dimension.

The master weight stays FP32 (it is the same ``nn.Parameter``), and so does its gradient. Backward keeps the
layer input as the forward GEMM quantized it (1x128 tiles: about a byte an element, the report's FP8 activation
cache) and re-tiles it 128x1 for wgrad, or, with ``FP8Recipe.activation_cache='input'``, the input in its own
precision. Outputs are in the autocast dtype when autocast is on, else in the input's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from flyer.fp8.gemm import BACKENDS, EMULATIONS, cuda_fp8_supported, fp8_gemm_nt
from flyer.fp8.quant import (AMAX_FLOOR, FP8_DTYPES, TILE, Quantized, dequantize, dequantize_blocks_batched,
                             quantize_blocks, quantize_blocks_batched, quantize_tiles, quantize_tiles_t)
from flyer.model.lowp import gemm_dtype, group_rows, ungroup_rows
from flyer.model.experts import MLP, Experts, padded_layout, swiglu

ACTIVATION_CACHES = ("fp8", "input")  # FP8Recipe.activation_cache


@dataclass(frozen=True)
class FP8Recipe:
    """fmt: operands of the forward GEMM and the weights; grad_fmt: activation gradients (E4M3 in
    DeepSeek-V3; 'e5m2' for the comparison). pow2_scales: round scales up to powers of two
    (UE8M0). backend: 'auto' | 'emulate' | 'cuda'; emulation: 'dequant' (fast) | 'blocks'
    (the per-128-block oracle), see ``flyer.fp8.gemm``. activation_cache: what backward keeps of a layer's input
    for wgrad: 'fp8' (the report's: the forward's 1x128 tiles, re-tiled 128x1 from their values, which adds one
    rounding unless the scales are powers of two, when it is exact above E4M3's smallest normal) or 'input' (the
    input in its own precision, quantized 128x1 once)."""

    fmt: str = "e4m3"
    grad_fmt: str = "e4m3"
    pow2_scales: bool = False
    backend: str = "auto"
    emulation: str = "dequant"
    activation_cache: str = "fp8"

    def __post_init__(self) -> None:
        for name in ("fmt", "grad_fmt"):
            if getattr(self, name) not in FP8_DTYPES:
                raise ValueError(f"FP8Recipe.{name} '{getattr(self, name)}' not supported "
                                 f"(choose from: {', '.join(FP8_DTYPES)})")
        if self.backend not in BACKENDS:
            raise ValueError(f"FP8Recipe.backend '{self.backend}' not supported (choose from: {', '.join(BACKENDS)})")
        if self.emulation not in EMULATIONS:
            raise ValueError(f"FP8Recipe.emulation '{self.emulation}' not supported "
                             f"(choose from: {', '.join(EMULATIONS)})")
        if self.activation_cache not in ACTIVATION_CACHES:
            raise ValueError(f"FP8Recipe.activation_cache '{self.activation_cache}' not supported "
                             f"(choose from: {', '.join(ACTIVATION_CACHES)})")

    def gemm(self, a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype) -> torch.Tensor:
        return fp8_gemm_nt(a, a_scale, b, b_scale, out_dtype, self.backend, self.emulation)

    def dequant_emulation(self, device: torch.device) -> bool:
        """True when GEMMs on ``device`` are emulated in 'dequant' mode: grouped GEMMs may then
        dequantise each operand once for all experts instead of once per expert (same values)."""
        cuda = self.backend == "cuda" or (self.backend == "auto" and device.type == "cuda"
                                          and cuda_fp8_supported(device))
        return not cuda and self.emulation == "dequant"


output_dtype = gemm_dtype  # the dtype a high-precision linear would return here


def _cache_input(x_MK: torch.Tensor, qx: Quantized, r: FP8Recipe) -> tuple[torch.Tensor, ...]:
    """What backward keeps of a layer input x (M, K) for wgrad: its forward tiles (data, scale) or x itself."""
    return (qx.data, qx.scale) if r.activation_cache == "fp8" else (x_MK,)


def _cached_input(cached: tuple[torch.Tensor, ...], K: int) -> torch.Tensor:
    """x (M, K) back from ``_cache_input``'s tensors: the tiles dequantized (float32), or x as kept."""
    return dequantize(*cached)[:, :K] if len(cached) == 2 else cached[0]


def _transpose_blocks(data: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (N, Kp) in 128x128 blocks -> W^T (Kp, Np) in 128x128 blocks: the same FP8 values and
    scales (a block's amax does not depend on orientation); N is zero-padded to a multiple of 128."""
    data_t = data.t()
    pad = -data_t.shape[1] % TILE
    if pad:
        data_t = F.pad(data_t.view(torch.uint8), (0, pad)).view(data.dtype)  # 0x00 is +0 in FP8
    return data_t.contiguous(), scale.t().contiguous()


def _wgrad(dy_MN: torch.Tensor, x_MK: torch.Tensor, r: FP8Recipe) -> torch.Tensor:
    """dW (N, K) float32 = dy^T . x with both operands in 128x1 tiles (1x128 along tokens)."""
    qdy_t = quantize_tiles_t(dy_MN, r.grad_fmt, r.pow2_scales, amax_floor=0.0)  # (N, Mp): a gradient
    qx_t = quantize_tiles_t(x_MK, r.fmt, r.pow2_scales)  # (K, Mp)
    return r.gemm(qdy_t.data, qdy_t.scale, qx_t.data, qx_t.scale, torch.float32)


class FP8LinearFunction(torch.autograd.Function):
    """``y = x W^T`` with FP8 forward, dgrad and wgrad GEMMs. x (..., K), weight (N, K)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, recipe: FP8Recipe, out_dtype: torch.dtype):
        r = recipe
        N, K = weight.shape
        with torch.autocast(x.device.type, enabled=False):
            x_MK = x.reshape(-1, K)
            qx = quantize_tiles(x_MK, r.fmt, r.pow2_scales)
            qw = quantize_blocks(weight, r.fmt, r.pow2_scales)
            y = r.gemm(qx.data, qx.scale, qw.data, qw.scale, out_dtype)
        ctx.save_for_backward(qw.data, qw.scale, *_cache_input(x_MK, qx, r))
        ctx.recipe, ctx.x_shape, ctx.x_dtype, ctx.w_dtype = r, x.shape, x.dtype, weight.dtype
        return y.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        w_data, w_scale, *cached = ctx.saved_tensors
        r = ctx.recipe
        N, K = w_data.shape[0], ctx.x_shape[-1]
        dx = dw = None
        with torch.autocast(dy.device.type, enabled=False):
            dy_MN = dy.reshape(-1, N)
            if ctx.needs_input_grad[0]:
                qdy = quantize_tiles(dy_MN, r.grad_fmt, r.pow2_scales, amax_floor=0.0)  # (M, Np)
                wt_data, wt_scale = _transpose_blocks(w_data, w_scale)  # (Kp, Np)
                dx = r.gemm(qdy.data, qdy.scale, wt_data, wt_scale, ctx.x_dtype)
                dx = dx[:, :K].reshape(ctx.x_shape)
            if ctx.needs_input_grad[1]:
                dw = _wgrad(dy_MN, _cached_input(cached, K), r).to(ctx.w_dtype)
        return dx, dw, None, None


class FP8WeightFunction(torch.autograd.Function):
    """The weight (N, K) as the forward GEMM sees it: its 128x128 blocks quantized and dequantized (float32); the
    gradient goes straight through to the master weight, as ``FP8LinearFunction``'s dW does."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, recipe: FP8Recipe) -> torch.Tensor:
        ctx.w_dtype = weight.dtype
        with torch.autocast(weight.device.type, enabled=False):
            return quantize_blocks(weight, recipe.fmt, recipe.pow2_scales).dequantize()

    @staticmethod
    def backward(ctx, dw: torch.Tensor):
        return dw.to(ctx.w_dtype), None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               recipe: FP8Recipe = FP8Recipe()) -> torch.Tensor:
    """Drop-in for ``F.linear`` with the FP8 recipe. x (..., K), weight (N, K), bias (N,) added in
    high precision. Returns (..., N) in the autocast dtype (autocast on) or x's dtype."""
    out_dtype = output_dtype(x)
    y = FP8LinearFunction.apply(x, weight, recipe, out_dtype)
    return y if bias is None else y + bias.to(out_dtype)


class FP8Linear(nn.Linear):
    """``nn.Linear`` whose GEMMs run in FP8; parameters, state-dict keys and init are unchanged."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, recipe: FP8Recipe = FP8Recipe(),
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe = recipe

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: FP8Recipe = FP8Recipe()) -> "FP8Linear":
        """Wrap an existing layer's parameters (the same Parameter objects, no copy)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, recipe=recipe, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias, self.recipe)

    def dequantized_weight(self) -> torch.Tensor:
        """(out_features, in_features) float32: the weight as this layer's GEMMs see it (``FP8WeightFunction``:
        128x128 blocks, gradient straight to the master weight), for a product taken outside the layer (DSA's
        absorbed W_UK / W_UV, ``flyer.model.dsa_chunks.absorption_weight``)."""
        return FP8WeightFunction.apply(self.weight, self.recipe)

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """(..., G, out_features / G): group g of x (..., G, in_features) times its own rows of the weight
        (``flyer.model.lowp.grouped_linear``, DeepSeek-V4's ``wo_a``), as FP8 grouped GEMMs: each group's row
        block quantized in 128x128 blocks (the whole weight's blocks where out_features / G is a multiple of
        128, as in DeepSeek-V4's checkpoints), its rows in 1x128 tiles (``fp8_grouped_linear``)."""
        G, K = x.shape[-2:]
        rows = group_rows(x)
        y = fp8_grouped_linear(rows, self.weight.view(G, -1, K), [rows.shape[0] // G] * G, self.recipe)
        return ungroup_rows(y, x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8={self.recipe.fmt}/{self.recipe.grad_fmt}"


# ---- grouped expert GEMMs ---------------------------------------------------------------------

def _retile_segments(t_NC: torch.Tensor, dest: torch.Tensor, n_rows: int, fmt: str, pow2: bool,
                     amax_floor: float = AMAX_FLOOR) -> Quantized:
    """``t`` re-tiled 128x1 inside each expert segment: the transpose (C, n_rows) of the
    segment-aligned layout in 1x128 tiles, so that no tile mixes two experts' tokens."""
    aligned = t_NC.new_zeros(n_rows, t_NC.shape[1]).index_copy_(0, dest, t_NC)
    return quantize_tiles_t(aligned, fmt, pow2, amax_floor)


def _grouped_gemm(qx: Quantized, w_data: torch.Tensor, w_scale: torch.Tensor, counts: list[int], r: FP8Recipe,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """(N, F) out_dtype: rows of expert e (qx: (N, Kp) in 1x128 tiles) times W_e^T (w: (E, Fp, Kp) in 128x128
    blocks)."""
    Fo = w_data.shape[1]
    if r.dequant_emulation(qx.data.device):
        xq, wq = dequantize(qx.data, qx.scale), dequantize_blocks_batched(w_data, w_scale)
        outs = [(xs @ we.t()).to(out_dtype) for xs, we, n in zip(xq.split(counts), wq.unbind(0), counts) if n]
    else:
        outs = [r.gemm(xd, xs, w_data[e], w_scale[e], out_dtype)
                for e, (xd, xs) in enumerate(zip(qx.data.split(counts), qx.scale.split(counts))) if counts[e]]
    return torch.cat(outs) if outs else qx.data.new_zeros(0, Fo, dtype=out_dtype)


def _grouped_dgrad(dy: torch.Tensor, w_data: torch.Tensor, w_scale: torch.Tensor, counts: list[int], r: FP8Recipe,
                   K: int, x_dtype: torch.dtype) -> torch.Tensor:
    """dx (N, K) x_dtype = dy_e . W_e per expert: dy (N, F) in 1x128 tiles, W_e^T in 128x128 blocks."""
    Fo = w_data.shape[1]
    qdy = quantize_tiles(dy, r.grad_fmt, r.pow2_scales, amax_floor=0.0)
    if r.dequant_emulation(dy.device):
        dyq, wq = dequantize(qdy.data, qdy.scale)[:, :Fo], dequantize_blocks_batched(w_data, w_scale)[:, :, :K]
        parts = [(ds @ we).to(x_dtype) for ds, we, n in zip(dyq.split(counts), wq.unbind(0), counts) if n]
    else:
        # W_e^T (Kp, Fp) in 128x128 blocks for every expert at once
        pad = -Fo % TILE
        wt_data = w_data.transpose(1, 2)
        if pad:
            wt_data = F.pad(wt_data.view(torch.uint8), (0, pad)).view(w_data.dtype)
        wt_data, wt_scale = wt_data.contiguous(), w_scale.transpose(1, 2).contiguous()
        parts = [r.gemm(dd, ds, wt_data[e], wt_scale[e], x_dtype)[:, :K]
                 for e, (dd, ds) in enumerate(zip(qdy.data.split(counts), qdy.scale.split(counts))) if counts[e]]
    return torch.cat(parts) if parts else dy.new_zeros(dy.shape[0], K, dtype=x_dtype)


def _grouped_wgrad(dy: torch.Tensor, x: torch.Tensor, counts: list[int], r: FP8Recipe) -> torch.Tensor:
    """dW (E, F, K) float32 = dy_e^T . x_e per expert, both re-tiled 128x1 inside each expert's segment, laid out
    with every segment starting at a multiple of 128 (DeepGEMM's contiguous layout), so that no tile of one
    quantization pass straddles two experts."""
    Fo, K, device = dy.shape[1], x.shape[1], dy.device
    layout = padded_layout(counts, TILE)
    dest, n_rows = layout.positions(device), layout.total
    qdy_t = _retile_segments(dy, dest, n_rows, r.grad_fmt, r.pow2_scales, 0.0)  # (F, n_rows)
    qx_t = _retile_segments(x, dest, n_rows, r.fmt, r.pow2_scales)  # (K, n_rows)
    fast = r.dequant_emulation(device)
    if fast:
        dyq_t, xq_t = dequantize(qdy_t.data, qdy_t.scale), dequantize(qx_t.data, qx_t.scale)[:K]
    dws = []
    for s, p in zip(layout.starts, layout.padded):
        cols, tiles = slice(s, s + p), slice(s // TILE, (s + p) // TILE)
        if p == 0:
            dws.append(torch.zeros(Fo, K, dtype=torch.float32, device=device))
        elif fast:
            dws.append(dyq_t[:Fo, cols] @ xq_t[:, cols].t())
        else:
            dws.append(r.gemm(qdy_t.data[:, cols], qdy_t.scale[:, tiles], qx_t.data[:, cols], qx_t.scale[:, tiles],
                              torch.float32))
    return torch.stack(dws)


class FP8GroupedLinearFunction(torch.autograd.Function):
    """Per-expert ``y_e = x_e W_e^T`` over expert-sorted tokens, in FP8.

    x (N_tok, K) sorted by expert, weight (E, F, K), counts: python list of E token counts; qx: x's 1x128 tiles
    when the caller quantized them already (one copy for the GEMMs that share an input). Activations are tiled
    once for all experts (1x128 tiles never cross tokens); the weights are block-quantised in one batched pass;
    wgrad re-tiles inside each expert's segment (``_grouped_wgrad``).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, counts: list[int], recipe: FP8Recipe,
                out_dtype: torch.dtype, qx: Quantized | None = None):
        r = recipe
        with torch.autocast(x.device.type, enabled=False):
            qx = quantize_tiles(x, r.fmt, r.pow2_scales) if qx is None else qx
            w_data, w_scale = quantize_blocks_batched(weight, r.fmt, r.pow2_scales)
            y = _grouped_gemm(qx, w_data, w_scale, counts, r, out_dtype)
        ctx.save_for_backward(w_data, w_scale, *_cache_input(x, qx, r))
        ctx.counts, ctx.recipe, ctx.w_dtype, ctx.x_meta = counts, r, weight.dtype, (x.shape[1], x.dtype)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        w_data, w_scale, *cached = ctx.saved_tensors
        r, counts = ctx.recipe, ctx.counts
        K, x_dtype = ctx.x_meta
        dx = dw = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                dx = _grouped_dgrad(dy, w_data, w_scale, counts, r, K, x_dtype)
            if ctx.needs_input_grad[1]:
                dw = _grouped_wgrad(dy, _cached_input(cached, K), counts, r).to(ctx.w_dtype)
        return dx, dw, None, None, None, None


class FP8SwiGLUDownFunction(torch.autograd.Function):
    """Per-expert ``y_e = swiglu(h1_e, h3_e) W2_e^T`` over expert-sorted tokens, keeping for backward only the SwiGLU
    inputs in FP8 1x128 tiles (DeepSeek-V3 report, section 3.3.3: "we cache the inputs of the SwiGLU operator and
    recompute its output in the backward pass"; FP8Recipe.activation_cache 'fp8'): about two bytes per expert
    channel, where autograd keeps h1, silu(h1), h3 and the product's tiles.

    h1, h3 (N, F), w2 (E, D, F), counts as ``FP8GroupedLinearFunction``. The forward is that of
    ``FP8GroupedLinearFunction(swiglu(h1, h3))``; backward evaluates the SwiGLU's gradient at the dequantized
    inputs and takes w2's wgrad operand from the output recomputed from them (float32)."""

    @staticmethod
    def forward(ctx, h1: torch.Tensor, h3: torch.Tensor, w2: torch.Tensor, counts: list[int], recipe: FP8Recipe,
                out_dtype: torch.dtype, limit: float = 0.0):
        r = recipe
        with torch.autocast(h1.device.type, enabled=False):
            a = swiglu(h1, h3, limit)
            qh1, qh3 = (quantize_tiles(h, r.fmt, r.pow2_scales) for h in (h1, h3))
            w_data, w_scale = quantize_blocks_batched(w2, r.fmt, r.pow2_scales)
            y = _grouped_gemm(quantize_tiles(a, r.fmt, r.pow2_scales), w_data, w_scale, counts, r, out_dtype)
        ctx.save_for_backward(w_data, w_scale, qh1.data, qh1.scale, qh3.data, qh3.scale)
        ctx.counts, ctx.recipe, ctx.limit, ctx.F = counts, r, limit, h1.shape[1]
        ctx.w_dtype, ctx.h_dtype = w2.dtype, h1.dtype
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        w_data, w_scale, h1_data, h1_scale, h3_data, h3_scale = ctx.saved_tensors
        r, counts, F_ = ctx.recipe, ctx.counts, ctx.F
        dh1 = dh3 = dw = None
        with torch.autocast(dy.device.type, enabled=False):
            h1, h3 = (dequantize(d, sc)[:, :F_].contiguous().requires_grad_()  # contiguous: SIMD silu, as forward's
                      for d, sc in ((h1_data, h1_scale), (h3_data, h3_scale)))
            with torch.enable_grad():
                a = swiglu(h1, h3, ctx.limit)  # recomputed from the kept tiles
            if ctx.needs_input_grad[2]:
                dw = _grouped_wgrad(dy, a.detach(), counts, r).to(ctx.w_dtype)
            if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
                da = _grouped_dgrad(dy, w_data, w_scale, counts, r, F_, torch.float32)
                dh1, dh3 = (g.to(ctx.h_dtype) for g in torch.autograd.grad(a, (h1, h3), da))
        return dh1, dh3, dw, None, None, None, None


def fp8_grouped_linear(x_NK: torch.Tensor, w_EFK: torch.Tensor, counts_E: torch.Tensor | list[int],
                       recipe: FP8Recipe = FP8Recipe()) -> torch.Tensor:
    """Grouped FP8 GEMM over expert-sorted tokens: rows of expert e times ``w_EFK[e]^T``.

    x (N, K) sorted by expert, w (E, F, K), counts (E,) tokens per expert (sum N).
    Returns (N, F) in the autocast dtype (autocast on) or x's dtype.
    """
    counts = counts_E.tolist() if isinstance(counts_E, torch.Tensor) else list(counts_E)
    counts = [int(c) for c in counts]
    return FP8GroupedLinearFunction.apply(x_NK, w_EFK, counts, recipe, output_dtype(x_NK))


def fp8_swiglu_ffn(x_ND: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, counts: list[int],
                   recipe: FP8Recipe, limit: float = 0.0) -> torch.Tensor:
    """(N, D) in ``output_dtype(x)``: each group's rows (x sorted by group, ``counts`` per group) through its
    ``w2(swiglu(w1 x, w3 x))`` (w1, w3 (E, F, D), w2 (E, D, F)) as FP8 grouped GEMMs. x is quantized once for w1
    and w3 (one FP8 copy kept for both wgrads); with ``recipe.activation_cache`` 'fp8' the SwiGLU inputs are kept in
    FP8 and its output recomputed in backward."""
    r, dtype = recipe, output_dtype(x_ND)
    x = x_ND.to(dtype)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        qx = quantize_tiles(x, r.fmt, r.pow2_scales)
    h1 = FP8GroupedLinearFunction.apply(x, w1, counts, r, dtype, qx)
    h3 = FP8GroupedLinearFunction.apply(x, w3, counts, r, dtype, qx)
    if r.activation_cache == "fp8":
        return FP8SwiGLUDownFunction.apply(h1, h3, w2, counts, r, dtype, limit)
    return FP8GroupedLinearFunction.apply(swiglu(h1, h3, limit), w2, counts, r, dtype)


class FP8Experts(Experts):
    """Routed experts whose three GEMMs (w1, w3, w2 per expert) run as FP8 grouped GEMMs, on every
    device (implementation 'fp8'). The SwiGLU itself stays in the working precision."""

    def __init__(self, *args, recipe: FP8Recipe = FP8Recipe(), **kwargs):
        super().__init__(*args, **kwargs)
        self.recipe = recipe

    def resolve_impl(self) -> str:
        return "fp8"  # its own FP8 grouped GEMMs, wherever the weights are

    @classmethod
    def from_experts(cls, experts: Experts, recipe: FP8Recipe = FP8Recipe()) -> "FP8Experts":
        """Wrap existing experts' parameters (the same Parameter objects, no copy)."""
        E, Fo, D = experts.w1.shape
        with torch.device("meta"):
            new = cls(E, D, Fo, first=experts.first, init_std=experts.init_std, recipe=recipe,
                      swiglu_limit=experts.swiglu_limit)
        new.w1, new.w2, new.w3 = experts.w1, experts.w2, experts.w3
        new.weight_quant = experts.weight_quant
        new.train(experts.training)
        return new

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        counts = [int(c) for c in counts_E.tolist()]
        w1, w2, w3 = self.gemm_weights()  # FP4 QAT: the FP4 values go into the 128x128 blocks (flyer.fp8.fp4)
        return fp8_swiglu_ffn(x_ND, w1, w2, w3, counts, self.recipe, self.swiglu_limit)

    def extra_repr(self) -> str:
        return f"n_local={self.n_local}, fp8={self.recipe.fmt}/{self.recipe.grad_fmt}"


class FP8MLP(MLP):
    """A SwiGLU MLP (dense FFN layer or shared experts) whose three projections are ``FP8Linear``s, run as the FP8
    experts run (``fp8_swiglu_ffn``, one group): its input quantized once for w1 and w3, and its SwiGLU inputs kept
    for backward in FP8 1x128 tiles, the SwiGLU's output recomputed from them. About D + 2 F bytes per token where
    the three layers keep 2 D + F in FP8 and autograd h1, silu(h1) and h3 in the working precision (in BF16,
    2 D + 7 F). The report names the SwiGLU in MoE (the shared experts); dense layers take the same cache, as
    flyer's memory model counts them (``flyer.cluster.costs``). The forward is ``MLP``'s (bit for bit but where a
    GEMM's K is one 128-tile: the grouped emulation sums it in another FP32 order); without gradients (evaluation,
    generation) it is ``MLP``'s own, which keeps nothing."""

    @classmethod
    def from_mlp(cls, mlp: MLP) -> "FP8MLP":
        """Wrap an MLP whose projections are FP8 already (the same modules and parameters, no copy)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.w1, new.w2, new.w3, new.limit = mlp.w1, mlp.w2, mlp.w3, mlp.limit
        new.train(mlp.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        rows = x.reshape(-1, x.shape[-1])
        w1, w2, w3 = (m.weight.unsqueeze(0) for m in (self.w1, self.w2, self.w3))
        y = fp8_swiglu_ffn(rows, w1, w2, w3, [rows.shape[0]], self.w2.recipe, self.limit)
        return y.view(*x.shape[:-1], y.shape[-1])


def _swiglu_cached(mlp: nn.Module) -> bool:
    """Whether ``mlp`` is a plain MLP whose three projections run in FP8 under one recipe that caches activations
    in FP8 (then ``FP8MLP`` keeps its SwiGLU inputs so)."""
    if type(mlp) is not MLP:
        return False
    layers = [mlp.w1, mlp.w2, mlp.w3]
    return (all(isinstance(m, FP8Linear) and m.bias is None and m.recipe == mlp.w2.recipe for m in layers)
            and mlp.w2.recipe.activation_cache == "fp8")


# ---- model conversion -------------------------------------------------------------------------

HIGH_PRECISION_NAMES = ("head",)  # output head; the embedding, router, norms are not nn.Linear


def default_module_filter(name: str, module: nn.Module) -> bool:
    """The DeepSeek-V3 recipe: every linear projection (attention wq/wq_a/wq_b/wkv_a/wkv_b/wo or
    wq/wk/wv/wo, dense FFN and shared experts w1/w2/w3, MTP eh_proj) and the routed experts go to
    FP8; the output head stays high precision (as do the embedding, the router ``Gate``, the
    norms and the attention core, which are not linear layers)."""
    if isinstance(module, Experts):
        return True
    return isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in HIGH_PRECISION_NAMES


def convert_to_fp8(model: nn.Module, module_filter: Callable[[str, nn.Module], bool] | None = None,
                   recipe: FP8Recipe | None = None) -> nn.Module:
    """Swap, in place, every ``nn.Linear`` / ``Experts`` submodule that ``module_filter(name,
    module)`` accepts for its FP8 twin (default: ``default_module_filter``). The twins hold the same
    Parameter objects, so call this before creating the optimizer or after: either way the
    optimizer, the FP32 master weights and the state-dict keys are unchanged. FP8 experts declare
    their implementation ('fp8'), so their MoE layers take the dispatcher seam. An MLP whose three projections went
    to FP8 becomes an ``FP8MLP`` when the recipe caches activations in FP8. Returns ``model``.
    """
    module_filter = module_filter or default_module_filter
    recipe = recipe or FP8Recipe()
    swaps = []
    for name, module in model.named_modules():
        if isinstance(module, (FP8Linear, FP8Experts)) or not module_filter(name, module):
            continue
        if isinstance(module, Experts):
            swaps.append((name, FP8Experts.from_experts(module, recipe)))
        elif isinstance(module, nn.Linear):
            swaps.append((name, FP8Linear.from_linear(module, recipe)))
    if any(not name for name, _ in swaps):
        raise ValueError(f"convert_to_fp8 swaps a model's layers in place; a bare {type(model).__name__} is one: "
                         "hold it in a module")
    for name, new in swaps:
        _swap(model, name, new)
    for name, module in list(model.named_modules()):
        if name and _swiglu_cached(module):  # (a bare MLP keeps its FP8 layers' own caches)
            _swap(model, name, FP8MLP.from_mlp(module))
    return model


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)


def fp8_modules(model: nn.Module) -> list[str]:
    """Names of the submodules that run in FP8."""
    return [n for n, m in model.named_modules() if isinstance(m, (FP8Linear, FP8Experts))]


__all__ = ["ACTIVATION_CACHES", "FP8Recipe", "FP8LinearFunction", "FP8WeightFunction", "fp8_linear", "FP8Linear",
           "FP8GroupedLinearFunction", "FP8SwiGLUDownFunction", "fp8_grouped_linear", "FP8Experts", "FP8MLP",
           "fp8_swiglu_ffn", "default_module_filter", "convert_to_fp8", "fp8_modules", "output_dtype"]
