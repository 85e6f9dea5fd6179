"""FP8 training: the linear autograd function, FP8 modules, and ``convert_to_fp8``.

The three GEMMs of a linear layer ``y = x W^T`` (x (M, K), W (N, K)), all E4M3 by default
(DeepSeek-V3 report, figure 6):

* forward  ``y  = x  . W^T``:  x in 1x128 tiles, W in 128x128 blocks.
* dgrad    ``dx = dy . W``:    dy in 1x128 tiles (never 128x128: block-wise activation
  gradients made a 16B MoE diverge), W^T in 128x128 blocks (the forward's blocks, transposed).
* wgrad    ``dW = dy^T . x``:  both re-tiled 128x1, i.e. 1x128 tiles along the token dimension
  M, which is this GEMM's reduction dimension.

The master weight stays FP32 (it is the same ``nn.Parameter``), and so does its gradient. The
layer input is saved in its own precision and re-quantised 128x1 in backward. Outputs are in the
autocast dtype when autocast is on, else in the input's dtype.
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
from flyer.model.experts import Experts, padded_layout, swiglu


@dataclass(frozen=True)
class FP8Recipe:
    """fmt: operands of the forward GEMM and the weights; grad_fmt: activation gradients (E4M3 in
    DeepSeek-V3; 'e5m2' for the comparison). pow2_scales: round scales up to powers of two
    (UE8M0). backend: 'auto' | 'emulate' | 'cuda'; emulation: 'dequant' (fast) | 'blocks'
    (the per-128-block oracle), see ``flyer.fp8.gemm``."""

    fmt: str = "e4m3"
    grad_fmt: str = "e4m3"
    pow2_scales: bool = False
    backend: str = "auto"
    emulation: str = "dequant"

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
        ctx.save_for_backward(x_MK, qw.data, qw.scale)
        ctx.recipe, ctx.x_shape, ctx.x_dtype, ctx.w_dtype = r, x.shape, x.dtype, weight.dtype
        return y.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_MK, w_data, w_scale = ctx.saved_tensors
        r = ctx.recipe
        N, K = w_data.shape[0], x_MK.shape[1]
        dx = dw = None
        with torch.autocast(dy.device.type, enabled=False):
            dy_MN = dy.reshape(-1, N)
            if ctx.needs_input_grad[0]:
                qdy = quantize_tiles(dy_MN, r.grad_fmt, r.pow2_scales, amax_floor=0.0)  # (M, Np)
                wt_data, wt_scale = _transpose_blocks(w_data, w_scale)  # (Kp, Np)
                dx = r.gemm(qdy.data, qdy.scale, wt_data, wt_scale, ctx.x_dtype)
                dx = dx[:, :K].reshape(ctx.x_shape)
            if ctx.needs_input_grad[1]:
                dw = _wgrad(dy_MN, x_MK, r).to(ctx.w_dtype)
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


class FP8GroupedLinearFunction(torch.autograd.Function):
    """Per-expert ``y_e = x_e W_e^T`` over expert-sorted tokens, in FP8.

    x (N_tok, K) sorted by expert, weight (E, F, K), counts: python list of E token counts.
    Activations are tiled once for all experts (1x128 tiles never cross tokens); the weights are
    block-quantised in one batched pass. For the wgrad, the tokens are laid out with every
    expert segment starting at a multiple of 128 (DeepGEMM's contiguous layout), so the 128x1
    tiles of one quantisation pass never straddle two experts.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, counts: list[int], recipe: FP8Recipe,
                out_dtype: torch.dtype):
        r = recipe
        E, Fo, K = weight.shape
        with torch.autocast(x.device.type, enabled=False):
            qx = quantize_tiles(x, r.fmt, r.pow2_scales)
            w_data, w_scale = quantize_blocks_batched(weight, r.fmt, r.pow2_scales)
            if r.dequant_emulation(x.device):
                xq, wq = dequantize(qx.data, qx.scale), dequantize_blocks_batched(w_data, w_scale)
                outs = [xs @ we.t() for xs, we, n in zip(xq.split(counts), wq.unbind(0), counts) if n]
                outs = [o.to(out_dtype) for o in outs]
            else:
                outs = [r.gemm(xd, xs, w_data[e], w_scale[e], out_dtype)
                        for e, (xd, xs) in enumerate(zip(qx.data.split(counts), qx.scale.split(counts))) if counts[e]]
            y = torch.cat(outs) if outs else x.new_zeros(0, Fo, dtype=out_dtype)
        ctx.save_for_backward(x, w_data, w_scale)
        ctx.counts, ctx.recipe, ctx.w_dtype = counts, r, weight.dtype
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w_data, w_scale = ctx.saved_tensors
        r, counts = ctx.recipe, ctx.counts
        Fo, K = w_data.shape[1], x.shape[1]
        dx = dw = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                qdy = quantize_tiles(dy, r.grad_fmt, r.pow2_scales, amax_floor=0.0)
            if ctx.needs_input_grad[0] and r.dequant_emulation(x.device):
                dyq, wq = dequantize(qdy.data, qdy.scale)[:, :Fo], dequantize_blocks_batched(w_data, w_scale)[:, :, :K]
                parts = [(ds @ we).to(x.dtype) for ds, we, n in zip(dyq.split(counts), wq.unbind(0), counts) if n]
                dx = torch.cat(parts) if parts else torch.zeros_like(x)
            elif ctx.needs_input_grad[0]:
                # W_e^T (Kp, Fp) in 128x128 blocks for every expert at once
                pad = -Fo % TILE
                wt_data = w_data.transpose(1, 2)
                if pad:
                    wt_data = F.pad(wt_data.view(torch.uint8), (0, pad)).view(w_data.dtype)
                wt_data, wt_scale = wt_data.contiguous(), w_scale.transpose(1, 2).contiguous()
                parts = [r.gemm(dd, ds, wt_data[e], wt_scale[e], x.dtype)[:, :K]
                         for e, (dd, ds) in enumerate(zip(qdy.data.split(counts), qdy.scale.split(counts)))
                         if counts[e]]
                dx = torch.cat(parts) if parts else torch.zeros_like(x)
            if ctx.needs_input_grad[1]:
                layout = padded_layout(counts, TILE)  # every expert's segment starts at a multiple of 128
                dest, n_rows = layout.positions(x.device), layout.total
                qdy_t = _retile_segments(dy, dest, n_rows, r.grad_fmt, r.pow2_scales, 0.0)  # (F, n_rows)
                qx_t = _retile_segments(x, dest, n_rows, r.fmt, r.pow2_scales)  # (K, n_rows)
                fast = r.dequant_emulation(x.device)
                if fast:
                    dyq_t, xq_t = dequantize(qdy_t.data, qdy_t.scale), dequantize(qx_t.data, qx_t.scale)[:K]
                dws = []
                for s, p in zip(layout.starts, layout.padded):
                    cols, tiles = slice(s, s + p), slice(s // TILE, (s + p) // TILE)
                    if p == 0:
                        dws.append(torch.zeros(Fo, K, dtype=torch.float32, device=x.device))
                    elif fast:
                        dws.append(dyq_t[:Fo, cols] @ xq_t[:, cols].t())
                    else:
                        dws.append(r.gemm(qdy_t.data[:, cols], qdy_t.scale[:, tiles], qx_t.data[:, cols],
                                          qx_t.scale[:, tiles], torch.float32))
                dw = torch.stack(dws).to(ctx.w_dtype)
        return dx, dw, None, None, None


def fp8_grouped_linear(x_NK: torch.Tensor, w_EFK: torch.Tensor, counts_E: torch.Tensor | list[int],
                       recipe: FP8Recipe = FP8Recipe()) -> torch.Tensor:
    """Grouped FP8 GEMM over expert-sorted tokens: rows of expert e times ``w_EFK[e]^T``.

    x (N, K) sorted by expert, w (E, F, K), counts (E,) tokens per expert (sum N).
    Returns (N, F) in the autocast dtype (autocast on) or x's dtype.
    """
    counts = counts_E.tolist() if isinstance(counts_E, torch.Tensor) else list(counts_E)
    counts = [int(c) for c in counts]
    return FP8GroupedLinearFunction.apply(x_NK, w_EFK, counts, recipe, output_dtype(x_NK))


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
        dtype = output_dtype(x_ND)
        x = x_ND.to(dtype)
        r = self.recipe
        w1, w2, w3 = self.gemm_weights()  # FP4 QAT: the FP4 values go into the 128x128 blocks (flyer.fp8.fp4)
        h1 = FP8GroupedLinearFunction.apply(x, w1, counts, r, dtype)
        h3 = FP8GroupedLinearFunction.apply(x, w3, counts, r, dtype)
        return FP8GroupedLinearFunction.apply(swiglu(h1, h3, self.swiglu_limit), w2, counts, r, dtype)

    def extra_repr(self) -> str:
        return f"n_local={self.n_local}, fp8={self.recipe.fmt}/{self.recipe.grad_fmt}"


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
    their implementation ('fp8'), so their MoE layers take the dispatcher seam. Returns ``model``.
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
    for name, new in swaps:
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)
    return model


def fp8_modules(model: nn.Module) -> list[str]:
    """Names of the submodules that run in FP8."""
    return [n for n, m in model.named_modules() if isinstance(m, (FP8Linear, FP8Experts))]


__all__ = ["FP8Recipe", "FP8LinearFunction", "FP8WeightFunction", "fp8_linear", "FP8Linear",
           "FP8GroupedLinearFunction", "fp8_grouped_linear", "FP8Experts", "default_module_filter", "convert_to_fp8",
           "fp8_modules", "output_dtype"]
