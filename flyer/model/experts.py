"""Routed experts: the module holding them, its implementations, and the one-process fused path; and the SwiGLU
``MLP`` of dense layers and shared experts.

Shapes: D model dim, F expert hidden dim, E (local) experts, N expert-sorted token copies,
T tokens, K activated experts per token.

Implementations of the expert SwiGLU FFN over expert-sorted rows, one chosen per ``Experts``
module when it is built or moved (``EXPERT_IMPLS``, ``resolve_experts_impl``):

- ``expert_ffn_loop``: per-expert ``F.linear``, differentiated by autograd: the oracle;
- ``expert_ffn_fused`` ('fused'): the hand-written grouped SwiGLU; the CPU fast path and the
  default off CUDA;
- ``expert_ffn_grouped_mm`` ('grouped_mm'): ``torch._grouped_mm`` in BF16; the CUDA default where the
  GEMMs run in BF16 (an FP32 model's experts stay FP32: 'fused' when training, grouped_mm in FP32 without
  gradients).

``Experts.routed_local`` runs dispatch, the fused experts and combine as one function where one
process holds every expert (``_LocalRoutedExperts``; ``MoE.path`` says when).

Every implementation takes ``swiglu_limit`` (DeepSeek-V4): > 0 clamps the gate projection above and
the up-projection both ways before the activation (``swiglu``, ``kernels.clamp_gate_up``); 0 runs
the unclamped ops, unchanged.
"""

from __future__ import annotations

import functools
from itertools import accumulate
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from flyer import kernels
from flyer.config import ConfigError
from flyer.model import lowp
from flyer.model.init import init_deferred
from flyer.model.lowp import gemm_dtype, mm
from flyer.model.recompute import recomputed_if_recorded

EXPERT_IMPLS = ("auto", "fused", "grouped_mm")


def resolve_experts_impl(impl: str, device: torch.device) -> str:
    """The implementation experts with weights on ``device`` run: 'auto' is 'grouped_mm' on CUDA
    (where torch has it; ``Experts.forward`` runs it in BF16 for BF16 GEMMs, in FP32 for FP32 ones without
    gradients, and 'fused' for FP32 training) and 'fused' elsewhere; 'fused' and 'grouped_mm' run as named."""
    if impl not in EXPERT_IMPLS:
        raise ConfigError(f"experts_impl '{impl}' is unknown (choose from: {', '.join(EXPERT_IMPLS)})")
    if impl != "auto":
        return impl
    return "grouped_mm" if device.type == "cuda" and hasattr(torch, "_grouped_mm") else "fused"


def swiglu(h1_NF: torch.Tensor, h3_NF: torch.Tensor, limit: float = 0.0) -> torch.Tensor:
    """silu(h1) * h3 (N, F); ``limit`` > 0: silu(min(h1, limit)) * clamp(h3, -limit, limit), as
    DeepSeek-V4's checkpoints and transformers' DeepseekV4 clamp. Differentiated by autograd: the
    oracle of the packed ``kernels.swiglu`` / ``kernels.swiglu_backward``."""
    if limit > 0:
        h1_NF, h3_NF = h1_NF.clamp(max=limit), h3_NF.clamp(min=-limit, max=limit)
    return F.silu(h1_NF) * h3_NF


def kept_swiglu(h1_NF: torch.Tensor, h3_NF: torch.Tensor, limit: float = 0.0) -> torch.Tensor:
    """``swiglu`` whose backward recomputes SiLU's output (and the clamped projections) from h1 and h3 rather than
    keeping them: a gradient keeps h1, h3 and the product, as the fused expert kernels do (``kernels.swiglu``),
    not 4 (clamped: 6) tensors of the width. Bit for bit the same gradients."""
    return recomputed_if_recorded(swiglu, h1_NF, h3_NF, limit)


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x). Dense FFN layers and shared experts. ``limit`` > 0
    (DeepSeek-V4's ``swiglu_limit``): w1 x clamped above and w3 x to +-limit first."""

    def __init__(self, dim: int, inter_dim: int, limit: float = 0.0):
        super().__init__()
        self.w1 = lowp.Linear(dim, inter_dim, bias=False)
        self.w2 = lowp.Linear(inter_dim, dim, bias=False)
        self.w3 = lowp.Linear(dim, inter_dim, bias=False)
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = lowp.as_dtype(x, gemm_dtype(x))  # once, not once per up-projection (autocast casts per call)
        return self.w2(kept_swiglu(self.w1(x), self.w3(x), self.limit))

    def extra_repr(self) -> str:
        return f"limit={self.limit}" if self.limit > 0 else ""


def expert_ffn_loop(x_ND: torch.Tensor, counts_E: torch.Tensor, w1_EFD: torch.Tensor, w2_EDF: torch.Tensor,
                    w3_EFD: torch.Tensor, swiglu_limit: float = 0.0) -> torch.Tensor:
    """Reference grouped SwiGLU: each expert on its contiguous slice of the expert-sorted tokens,
    differentiated by autograd. The oracle for the fast paths below."""
    counts = counts_E.tolist()
    # unbind, not w[e]: backward stacks the expert gradients once instead of materialising a full
    # (E, F, D) gradient per expert
    ws = zip(w1_EFD.unbind(0), w2_EDF.unbind(0), w3_EFD.unbind(0))
    outs = [F.linear(swiglu(F.linear(xs, w1), F.linear(xs, w3), swiglu_limit), w2)
            for xs, n, (w1, w2, w3) in zip(x_ND.split(counts), counts, ws) if n]
    return torch.cat(outs) if outs else x_ND.new_zeros(0, w2_EDF.shape[1])


def expert_ffn_grouped_mm(x_ND: torch.Tensor, counts_E: torch.Tensor, w1_EFD: torch.Tensor,
                          w2_EDF: torch.Tensor, w3_EFD: torch.Tensor, swiglu_limit: float = 0.0,
                          fp32: bool = False) -> torch.Tensor:
    """Same as ``expert_ffn_loop`` with ``torch._grouped_mm``: in BF16 (the CUDA fast path), or with ``fp32`` in FP32
    (FP32 weights; torch runs a GEMM per expert, each what ``torch.mm`` gives its rows, from one call instead of a
    Python loop of them: inference on CUDA, whose steps are launch-bound; w1|w3 packed, ``Experts.pack_w13_``,
    as one GEMM)."""
    offs = counts_E.cumsum(0).to(torch.int32)
    if fp32:
        x, F_, w13 = x_ND.float(), w1_EFD.shape[1], packed_w13(w1_EFD, w3_EFD)
        if w13 is not None:
            h13 = torch._grouped_mm(x, w13.transpose(-2, -1), offs=offs)
            h1, h3 = h13[:, :F_], h13[:, F_:]
        else:
            h1, h3 = (torch._grouped_mm(x, w.transpose(-2, -1), offs=offs) for w in (w1_EFD, w3_EFD))
        return torch._grouped_mm(kept_swiglu(h1, h3, swiglu_limit), w2_EDF.transpose(-2, -1), offs=offs)
    x = x_ND.to(torch.bfloat16)
    h1 = torch._grouped_mm(x, w1_EFD.to(torch.bfloat16).transpose(-2, -1), offs=offs)
    h3 = torch._grouped_mm(x, w3_EFD.to(torch.bfloat16).transpose(-2, -1), offs=offs)
    return torch._grouped_mm(kept_swiglu(h1, h3, swiglu_limit), w2_EDF.to(torch.bfloat16).transpose(-2, -1),
                             offs=offs)


@functools.cache
def fp32_grouped_mm(device: torch.device) -> bool:
    """Whether this torch runs ``torch._grouped_mm`` in FP32 on ``device`` (its per-group fallback, since 2.9; older
    versions take BF16 only): tried once per device, on two groups of one row."""
    try:
        x, w = torch.ones(2, 16, device=device), torch.ones(2, 16, 8, device=device)
        return torch._grouped_mm(x, w, offs=torch.tensor([1, 2], dtype=torch.int32, device=device)).dtype == x.dtype
    except (RuntimeError, AttributeError):
        return False


@functools.cache
def grouped_mm_reads_offsets(device: torch.device) -> bool:
    """Whether ``torch._grouped_mm`` in BF16 on ``device`` loops over the groups on the host, reading the offsets back
    (which a CUDA graph's capture forbids): on CUDA but where its CUTLASS kernels run, compute capability 9.x and
    10.x (torch's ``_grouped_mm_fallback`` elsewhere, an A100's included)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] not in (9, 10)


class PaddedLayout(NamedTuple):
    """Expert-sorted rows with each expert's slice padded with zero rows to a multiple of
    ``row_multiple`` rows: per expert, its rows (``counts``), padded rows and first row; the total."""

    counts: list[int]
    padded: list[int]
    starts: list[int]
    total: int

    def positions(self, device) -> torch.Tensor:
        """(N,) int64: the padded row of each expert-sorted row."""
        N = sum(self.counts)
        shift = torch.tensor([s - f for s, f in zip(self.starts, [0, *accumulate(self.counts)])], dtype=torch.long)
        repeats = torch.tensor(self.counts, dtype=torch.long)
        return (torch.arange(N) + shift.repeat_interleave(repeats, output_size=N)).to(device)


def padded_layout(counts: list[int], row_multiple: int) -> PaddedLayout:
    """The layout of ``counts`` rows per expert with each slice padded to a multiple of ``row_multiple``."""
    padded = [n + (-n % row_multiple) for n in counts]
    starts = [0, *accumulate(padded)]
    return PaddedLayout(counts, padded, starts[:-1], starts[-1])


def packed_w13(w1_EFD: torch.Tensor, w3_EFD: torch.Tensor) -> torch.Tensor | None:
    """The (E, 2F, D) stack w1|w3 as a view when w1 and w3 already are its two halves (after
    ``Experts.pack_w13_``), else None."""
    E, F_, D = w1_EFD.shape
    stride = (2 * F_ * D, D, 1)
    if (w1_EFD.stride() != stride or w3_EFD.stride() != stride or w1_EFD.dtype != w3_EFD.dtype
            or w1_EFD.untyped_storage().data_ptr() != w3_EFD.untyped_storage().data_ptr()
            or w3_EFD.storage_offset() != w1_EFD.storage_offset() + F_ * D):
        return None
    return w1_EFD.as_strided((E, 2 * F_, D), stride)


def _pack_weights(w1_EFD, w2_EDF, w3_EFD, dtype):
    """w1|w3 stacked as (E, 2F, D) and w2 (E, D, F), cast to ``dtype`` in the same pass (then
    widened to FP32 where ``dtype`` GEMMs are emulated: see ``lowp.operand``). Weights packed in
    place (``Experts.pack_w13_``) in ``dtype`` are not copied at all."""
    w13 = packed_w13(w1_EFD, w3_EFD)
    if w13 is not None and w13.dtype == dtype:
        return lowp.operand(w13, dtype), lowp.operand(w2_EDF, dtype)
    if w13 is not None and dtype == torch.float32 and w13.dtype == torch.bfloat16 and not w13.requires_grad:
        return w13, w2_EDF  # held in BF16 for inference (flyer.infer.weights): grouped_mm widens as it reads
    E, F_, D = w1_EFD.shape
    w13 = w1_EFD.new_empty((E, 2 * F_, D), dtype=dtype)  # one up-projection GEMM per expert
    w13[:, :F_].copy_(w1_EFD)
    w13[:, F_:].copy_(w3_EFD)
    return lowp.operand(w13, dtype), lowp.operand(w2_EDF, dtype)


def _swiglu_forward(x, w13, w2, rows_E: list[int], F_, rows_E_tensor: torch.Tensor | None = None,
                    limit: float = 0.0):
    """Expert e on the next ``rows_E[e]`` rows of x (padded layout): returns (y, h13, a), h13 the
    projections before ``limit``'s clamp (the backward's mask is where they were clamped). Per-expert
    views come from one ``split``/``unbind`` each rather than a Python slice per GEMM operand.
    FP32 (nothing emulated) goes through ``kernels.grouped_mm``: one call per projection, the
    kernel when every expert has a few rows (decoding), else BLAS GEMMs on 128-row blocks of each expert's
    weight (the per-expert ``torch.mm``'s sums within FP32 rounding, not its bits) (``rows_E_tensor``: ``rows_E``
    as an int64 tensor, where the caller has one)."""
    if x.dtype == torch.float32 and w13.dtype in kernels.HELD_DTYPES and w2.dtype in kernels.HELD_DTYPES:
        h13 = kernels.grouped_mm(x, rows_E, w13, rows_E_tensor)
        a = kernels.swiglu(h13, limit)
        return kernels.grouped_mm(a, rows_E, w2, rows_E_tensor), h13, a
    h13 = x.new_empty(x.shape[0], 2 * F_)
    y = x.new_empty(x.shape[0], w2.shape[1])
    live = [e for e, p in enumerate(rows_E) if p]
    xs, hs, w13t = x.split(rows_E), h13.split(rows_E), w13.transpose(1, 2).unbind(0)
    for e in live:
        mm(xs[e], w13t[e], out=hs[e])
    a = kernels.swiglu(h13, limit)
    as_, ys, w2t = a.split(rows_E), y.split(rows_E), w2.transpose(1, 2).unbind(0)
    for e in live:
        mm(as_[e], w2t[e], out=ys[e])
    return y, h13, a


def _swiglu_backward(dy, x, w13, w2, h13, a, rows_E: list[int], F_, need_x: bool, need_w: bool, w_dtype,
                     emulate: bool | None = None, limit: float = 0.0):
    """Gradients of ``_swiglu_forward`` (with its ``limit``): (dx or None, (dw1, dw2, dw3) or Nones);
    ``emulate`` is the forward's ``lowp`` choice, so every GEMM of the backward takes the same path.
    dx is in the compute dtype, the weight gradients in ``w_dtype`` (the weights' storage dtype).

    Each expert's weight-gradient GEMM writes into one small scratch buffer that is converted into
    the expert's slice of dw1/dw3 (dw2) straight away, while it is still in cache: a packed
    (E, 2F, D) gradient in the compute dtype, converted afterwards, would cross memory twice more.
    """
    live = [e for e, p in enumerate(rows_E) if p]
    E, D = w2.shape[0], w2.shape[1]
    da = x.new_empty(a.shape)
    dw1 = dw2 = dw3 = None
    if need_w:
        dw1, dw3 = (w13.new_empty((E, F_, D), dtype=w_dtype) for _ in range(2))
        dw2 = w2.new_empty(w2.shape, dtype=w_dtype)
        for e in (e for e, p in enumerate(rows_E) if not p):  # no rows, no GEMM: a zero gradient
            for t in (dw1, dw2, dw3):
                t[e].zero_()
        s13, s2 = x.new_empty((2 * F_, D)), x.new_empty((D, F_))
        s1, s3 = s13[:F_], s13[F_:]
    dys, das, w2s = dy.split(rows_E), da.split(rows_E), w2.unbind(0)
    if need_w:
        as_ = a.split(rows_E)
    for e in live:
        mm(dys[e], w2s[e], out=das[e], emulate=emulate)
        if need_w:
            dw2[e].copy_(mm(dys[e].t(), as_[e], out=s2, emulate=emulate))
    dh13 = kernels.swiglu_backward(da, h13, limit)
    dx = x.new_empty(x.shape) if need_x else None
    dhs = dh13.split(rows_E)
    if need_x:
        dxs, w13s = dx.split(rows_E), w13.unbind(0)
    if need_w:
        xs = x.split(rows_E)
    for e in live:
        if need_x:
            mm(dhs[e], w13s[e], out=dxs[e], emulate=emulate)
        if need_w:
            mm(dhs[e].t(), xs[e], out=s13, emulate=emulate)
            dw1[e].copy_(s1)
            dw3[e].copy_(s3)
    return dx, (dw1, dw2, dw3)


class _GroupedSwiGLU(torch.autograd.Function):
    """Grouped SwiGLU experts with a hand-written backward (the CPU fast path).

    Same maths as ``expert_ffn_loop``, but each expert's GEMMs write into slices of one buffer
    (``torch.mm(..., out=)``) and the activation runs once over all experts: no per-expert pads,
    splits, cats or autograd nodes. The weights come in their storage dtype and are cast to the
    compute ``dtype`` while being packed (w1|w3 into one stack: one pass, not a cast and then a
    cat); their gradients go back in the storage dtype. ``row_multiple`` > 1 lays each expert's
    slice out padded with zero rows (which add nothing to any gradient) to a multiple of that many
    rows, so GEMM shapes repeat from step to step: each new shape costs a kernel JIT where the
    GEMMs run on oneDNN (bf16 on CPU).
    """

    @staticmethod
    def forward(ctx, x_ND, w1_EFD, w2_EDF, w3_EFD, counts: list[int], row_multiple: int, dtype: torch.dtype,
                limit: float = 0.0):
        N, D = x_ND.shape
        F_ = w1_EFD.shape[1]
        layout = padded_layout(counts, row_multiple)
        pos = None
        x = x_ND.to(dtype).contiguous()
        if layout.total != N:  # destination row of each expert-sorted copy in the padded layout
            pos = layout.positions(x.device)
            x = x.new_zeros(layout.total, D).index_copy_(0, pos, x)
        w13, w2 = _pack_weights(w1_EFD, w2_EDF, w3_EFD, dtype)
        y, h13, a = _swiglu_forward(x, w13, w2, layout.padded, F_, limit=limit)
        ctx.save_for_backward(x, w13, w2, h13, a, pos)
        ctx.rows_E, ctx.F, ctx.x_dtype, ctx.w_dtype = layout.padded, F_, x_ND.dtype, w1_EFD.dtype
        ctx.limit = limit
        ctx.emulate = lowp.emulated(x.device.type, dtype)  # the backward's GEMMs take the forward's path
        return y if pos is None else y.index_select(0, pos)

    @staticmethod
    def backward(ctx, dy_ND):
        x, w13, w2, h13, a, pos = ctx.saved_tensors
        F_ = ctx.F
        dy = dy_ND.to(x.dtype).contiguous()
        if pos is not None:
            dy = dy.new_zeros(x.shape).index_copy_(0, pos, dy)
        need_w = any(ctx.needs_input_grad[1:4])
        dx, dws = _swiglu_backward(dy, x, w13, w2, h13, a, ctx.rows_E, F_, ctx.needs_input_grad[0], need_w, ctx.w_dtype,
                                   ctx.emulate, ctx.limit)
        if dx is not None:
            dx = (dx if pos is None else dx.index_select(0, pos)).to(ctx.x_dtype)
        return (dx, *dws, None, None, None, None)


class _LocalRoutedExperts(torch.autograd.Function):
    """Dispatch, grouped SwiGLU experts and weighted combine in one function (one process holds
    every expert): what ``LocalDispatcher.dispatch`` + ``_GroupedSwiGLU`` + ``LocalDispatcher.combine``
    compute, without the expert-sorted copy in between.

    The token rows are gathered once, straight into the padded per-expert layout (pad rows are
    zero), and the weighted outputs are summed from that layout into the tokens in FP32, pad rows
    going to a discarded extra row. The composed path gathers, pads, unpads and combines: three
    more passes over the N x D copies each way. Rounding is the composed path's (the tests check
    bitwise equality): outputs in the compute dtype, weighted and summed in FP32 (FP64 for FP64);
    gradients of a token's copies summed in FP32 in the same (expert) order and rounded once to the
    compute dtype. On the CPU the combine and its gradients run as fused kernels
    (``flyer.kernels``: the same sums, bit for bit, except the gate weights' gradient dot
    products, whose FP32 terms are added in another order).

    Picks of ids >= E (LongCat-Flash's zero-computation experts, ``routed_order``) get no row: a
    token has K rows or fewer, and their gate weights' gradient is 0.
    """

    @staticmethod
    def forward(ctx, x_TD, weights_TK, w1_EFD, w2_EDF, w3_EFD, topk_ids_TK, counts: list[int],
                row_multiple: int, dtype: torch.dtype, limit: float = 0.0):
        T = x_TD.shape[0]
        K, F_ = topk_ids_TK.shape[1], w1_EFD.shape[1]
        order = routed_order(topk_ids_TK, counts)
        layout = padded_layout(counts, row_multiple)
        pos = layout.positions(x_TD.device)
        src = torch.full((layout.total,), T, dtype=torch.long, device=x_TD.device)  # T: pad row
        src[pos] = order // K  # the token each padded row holds
        acc_dtype = kernels.acc_dtype(dtype)  # the combine sums in FP32 (FP64 for FP64)
        w_pad = weights_TK.new_zeros(layout.total, dtype=acc_dtype)
        w_pad[pos] = weights_TK.flatten()[order].to(acc_dtype)
        x = x_TD.to(dtype)
        index = kernels.token_index(src, T, x, w_pad)
        x = x.index_select(0, index.gather).index_fill_(0, index.pad_rows, 0)
        w13, w2 = _pack_weights(w1_EFD, w2_EDF, w3_EFD, dtype)
        y, h13, a = _swiglu_forward(x, w13, w2, layout.padded, F_, limit=limit)
        ctx.save_for_backward(x, w13, w2, h13, a, y, w_pad, pos, order)
        ctx.rows_E, ctx.F, ctx.x_dtype, ctx.w_dtype = layout.padded, F_, x_TD.dtype, w1_EFD.dtype
        ctx.limit = limit
        ctx.w_gate_dtype, ctx.n_picks = weights_TK.dtype, weights_TK.numel()
        ctx.index = index
        ctx.emulate = lowp.emulated(x.device.type, dtype)  # the backward's GEMMs take the forward's path
        return kernels.combine(y, w_pad, index)

    @staticmethod
    def backward(ctx, g_TD):
        x, w13, w2, h13, a, y, w_pad, pos, order = ctx.saved_tensors
        T = g_TD.shape[0]
        need_dw = ctx.needs_input_grad[1]
        dy, d_pad = kernels.combine_backward(g_TD, y, w_pad, ctx.index, need_dw)
        d_weights = None
        if need_dw:  # identity picks (not in order) took no part: gradient 0
            new = d_pad.new_empty if order.numel() == ctx.n_picks else d_pad.new_zeros
            d_weights = new(ctx.n_picks).index_copy_(0, order, d_pad[pos])
            d_weights = d_weights.view(T, -1).to(ctx.w_gate_dtype)
        need_w = any(ctx.needs_input_grad[2:5])
        dx, dws = _swiglu_backward(dy, x, w13, w2, h13, a, ctx.rows_E, ctx.F, ctx.needs_input_grad[0], need_w,
                                   ctx.w_dtype, ctx.emulate, ctx.limit)
        if dx is not None:  # each token's copies summed
            dx = kernels.segment_sum(dx, ctx.index).to(ctx.x_dtype)
        return (dx, d_weights, *dws, None, None, None, None, None)


def local_routed_no_grad(x_TD, weights_TK, topk_ids_TK, counts: list[int], counts_E: torch.Tensor,
                         dtype: torch.dtype, ffn) -> torch.Tensor:
    """``_LocalRoutedExperts.forward`` without pad rows (``row_multiple`` 1) and with nothing kept
    for a backward (decoding): the same values from a third of its ops. With no pad rows the
    padded layout is the expert-sorted order itself and every token has exactly K rows, or fewer
    where it picked ids >= E (zero-computation experts, ``routed_order``).
    ``ffn(x_sorted, counts, counts_E)``: the experts on their rows (held weights bring their own)."""
    T, K = topk_ids_TK.shape
    order = routed_order(topk_ids_TK, counts)
    src = order // K  # the token each expert-sorted row holds
    w_rows = weights_TK.flatten().index_select(0, order)
    acc_dtype = kernels.acc_dtype(dtype)  # the combine sums in FP32 (FP64 for FP64)
    w_rows = w_rows if w_rows.dtype == acc_dtype else w_rows.to(acc_dtype)
    x = x_TD if x_TD.dtype == dtype else x_TD.to(dtype)
    index = kernels.token_index(src, T, x, w_rows, per_token=K if order.numel() == T * K else None)
    return kernels.combine(ffn(x.index_select(0, src), counts, counts_E), w_rows, index)


def routed_order(topk_ids_TK: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """(N,) int64: the flat (t * K + k) picks of the E experts counted in ``counts`` (E,), sorted by expert
    (stable: by token within one), N = sum(counts). Picks of ids >= E, LongCat-Flash's zero-computation
    (identity) experts that ``flyer.model.moe`` adds apart, sort after them and are left out: they run no FFN."""
    order = torch.argsort(topk_ids_TK.flatten(), stable=True)
    n = sum(counts)
    return order if n == order.numel() else order[:n]


def expert_ffn_fused(x_ND: torch.Tensor, counts_E: torch.Tensor, w1_EFD: torch.Tensor, w2_EDF: torch.Tensor,
                     w3_EFD: torch.Tensor, row_multiple: int = 1, dtype: torch.dtype | None = None,
                     swiglu_limit: float = 0.0) -> torch.Tensor:
    """Same as ``expert_ffn_loop`` through ``_GroupedSwiGLU``, computed in ``dtype`` (default: x's);
    the output is in ``dtype``, each gradient in its input's dtype."""
    return _GroupedSwiGLU.apply(x_ND, w1_EFD, w2_EDF, w3_EFD, counts_E.tolist(), row_multiple, dtype or x_ND.dtype,
                                swiglu_limit)


CPU_LOWP_ROW_MULTIPLE = 64


class Experts(nn.Module):
    """Routed experts ``[first, first + n_local)`` stored stacked: w1/w3 (E, F, D), w2 (E, D, F).

    ``impl`` names the implementation (``EXPERT_IMPLS``); ``self.impl`` is the one ``forward`` runs,
    resolved against the weights' device when the module is built and again whenever it is moved
    (``.to``, ``.cuda``): 'auto' follows the weights, so a model built on the CPU and moved to CUDA
    runs ``torch._grouped_mm`` there. ``swiglu_limit`` > 0: every implementation clamps the SwiGLU's
    inputs (``swiglu``; DeepSeek-V4). ``weight_quant`` (None: off): what every implementation's GEMMs multiply
    by instead of each stack, e.g. its FP4 values with a straight-through gradient (``flyer.fp8.fp4.fp4_experts``,
    DeepSeek-V4's FP4 QAT); set once, before training.
    """

    def __init__(self, n_local: int, dim: int, inter_dim: int, first: int = 0, impl: str = "auto",
                 init_std: float = 0.02, swiglu_limit: float = 0.0):
        super().__init__()
        self.first, self.n_local, self.init_std = first, n_local, init_std
        self.swiglu_limit = swiglu_limit
        self.w1 = nn.Parameter(torch.empty(n_local, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_local, dim, inter_dim))
        self.w3 = nn.Parameter(torch.empty(n_local, inter_dim, dim))
        self.requested_impl = impl
        self.impl = self.resolve_impl()
        self.weight_quant: Callable[[torch.Tensor], torch.Tensor] | None = None
        if not init_deferred():
            self.reset_parameters()

    def resolve_impl(self) -> str:
        """The implementation ``forward`` runs for the weights where they are now."""
        return resolve_experts_impl(self.requested_impl, self.w1.device)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.impl = self.resolve_impl()  # moved: the weights' device may have changed
        return self

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """N(0, init_std) for w1, w2, w3, in that order."""
        for w in (self.w1, self.w2, self.w3):
            w.normal_(0.0, self.init_std, generator=generator)

    @torch.no_grad()
    def pack_w13_(self) -> None:
        """Re-store w1 and w3 as the two halves of one (E, 2F, D) tensor (same values, same
        parameters), so each forward's up-projection GEMMs read them without first stacking a
        copy (decoding, where the weights do not change and that copy costs as much as the
        experts' GEMMs). A later ``.to()`` or ``load_state_dict`` into new tensors undoes it."""
        if packed_w13(self.w1, self.w3) is not None:
            return
        F_ = self.w1.shape[1]
        w13 = torch.cat([self.w1, self.w3], dim=1)
        self.w1.data, self.w3.data = w13[:, :F_], w13[:, F_:]

    def gemm_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """w1 (E, F, D), w2 (E, D, F), w3 (E, F, D) as the GEMMs multiply by them: the parameters, or each
        through ``weight_quant`` (its gradient reaches the parameter through it)."""
        if self.weight_quant is None:
            return self.w1, self.w2, self.w3
        return self.weight_quant(self.w1), self.weight_quant(self.w2), self.weight_quant(self.w3)

    @staticmethod
    def row_multiple(x_ND: torch.Tensor, dtype: torch.dtype) -> int:
        """Rows each expert's slice is padded to a multiple of: oneDNN's bf16/fp16 CPU GEMMs build a
        kernel per new shape, so bucket the shapes (not where they run through the FP32 kernel,
        ``lowp.emulated``: padding would only add work)."""
        oneDNN = x_ND.device.type == "cpu" and dtype in lowp.LOWP and not lowp.emulated("cpu", dtype)
        return CPU_LOWP_ROW_MULTIPLE if oneDNN else 1

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_ND (N, D) rows sorted by local expert, counts_E (E,) rows per expert -> (N, D): in x's
        dtype for 'grouped_mm', in the GEMM dtype (autocast's or x's) for 'fused'."""
        w1, w2, w3 = self.gemm_weights()
        dtype = gemm_dtype(x_ND)
        # 'auto' takes grouped_mm (BF16) where the model computes in BF16 only: an FP32 model keeps FP32 experts,
        # which without gradients (serving) run grouped too, in FP32
        if self.grouped_bf16(dtype):
            return expert_ffn_grouped_mm(x_ND, counts_E, w1, w2, w3, self.swiglu_limit).to(x_ND.dtype)
        if self.impl == "grouped_mm" and dtype == torch.float32 and all(w.dtype == dtype for w in (w1, w2, w3)) \
                and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x_ND, w1, w2, w3))) \
                and fp32_grouped_mm(x_ND.device):
            return expert_ffn_grouped_mm(x_ND, counts_E, w1, w2, w3, self.swiglu_limit, fp32=True)
        return expert_ffn_fused(x_ND, counts_E, w1, w2, w3, row_multiple=self.row_multiple(x_ND, dtype),
                                dtype=dtype, swiglu_limit=self.swiglu_limit)

    def routed_local(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor,
                     counts_E: torch.Tensor) -> torch.Tensor:
        """Dispatch, the 'fused' experts and combine in one pass when this process holds every
        expert (see ``_LocalRoutedExperts``): the values ``LocalDispatcher`` around ``forward`` gives.
        x_TD (T, D), weights_TK (T, K), topk_ids_TK (T, K) (ids >= E: identity picks, no row), counts_E (E,)
        -> (T, D) in the combine's dtype (FP32; FP64 for FP64). With nothing to differentiate and no pad rows, its
        forward runs without the Function (``local_routed_no_grad``)."""
        dtype = gemm_dtype(x_TD)
        counts, row_multiple = counts_E.tolist(), self.row_multiple(x_TD, dtype)
        w1, w2, w3 = self.gemm_weights()
        if row_multiple == 1 and not (torch.is_grad_enabled() and any(
                t.requires_grad for t in (x_TD, weights_TK, w1, w2, w3))):
            def ffn(x_sorted, counts, counts_E):
                w13, w2_ = _pack_weights(w1, w2, w3, dtype)
                return _swiglu_forward(x_sorted, w13, w2_, counts, w1.shape[1], counts_E, self.swiglu_limit)[0]

            return local_routed_no_grad(x_TD, weights_TK, topk_ids_TK, counts, counts_E, dtype, ffn)
        return _LocalRoutedExperts.apply(x_TD, weights_TK, w1, w2, w3, topk_ids_TK, counts, row_multiple, dtype,
                                         self.swiglu_limit)

    def grouped_bf16(self, dtype: torch.dtype) -> bool:
        """Whether GEMMs in ``dtype`` run as ``torch._grouped_mm`` in BF16 ('auto': for BF16 GEMMs only)."""
        return self.impl == "grouped_mm" and (self.requested_impl == "grouped_mm" or dtype == torch.bfloat16)

    def fixed_grouped(self, dtype: torch.dtype) -> bool:
        """Whether ``routed_fixed`` runs ``torch._grouped_mm`` (``grouped_bf16``, where it reads nothing back to the
        host: ``grouped_mm_reads_offsets``) rather than every expert over every token."""
        return self.grouped_bf16(dtype) and not grouped_mm_reads_offsets(self.w1.device)

    def dense_flops_per_token(self, dtype: torch.dtype) -> int:
        """FLOPs a token costs ``routed_fixed`` in ``dtype``: every local expert's three projections where it runs
        them all (not ``fixed_grouped``), else 0 (what its picks cost too, as in any other form)."""
        return 0 if self.fixed_grouped(dtype) else 2 * self.n_local * self.w1.shape[1] * self.w1.shape[2] * 3

    def routed_fixed(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor) -> torch.Tensor:
        """``routed_local``'s values (T, D), in the combine's dtype (FP32; FP64 for FP64), from shapes that x's alone
        fix and nothing read back to the host, so that a CUDA graph can capture them (``flyer.model.moe.fixed_shapes``).
        Where ``forward`` takes ``torch._grouped_mm`` (BF16 on CUDA) and it reads nothing back (``fixed_grouped``):
        every pick a row in expert order, the offsets a device tensor. Else every expert over every token, one batched
        GEMM per projection, each token's outputs weighted by its gate weights (0 where it did not pick): each expert's
        weights read once, E / K times the picked FLOPs, for the decode batches of models whose steps are launch-bound.
        Inference only (nothing kept for a backward)."""
        w1, w2, w3 = self.gemm_weights()
        dtype, (T, K), E = gemm_dtype(x_TD), topk_ids_TK.shape, self.n_local
        acc = kernels.acc_dtype(dtype)
        local = topk_ids_TK - self.first
        mine = (local >= 0) & (local < E)  # picks of other ranks' or zero-computation experts: no row here
        if self.fixed_grouped(dtype):
            ids = torch.where(mine, local, E).flatten()  # the picks with no row sort last, past the offsets
            order = torch.argsort(ids, stable=True)
            counts = torch.zeros(E + 1, dtype=torch.int32, device=ids.device).index_add_(
                0, ids, torch.ones_like(ids, dtype=torch.int32))
            y = expert_ffn_grouped_mm(x_TD.index_select(0, order // K), counts[:E], w1, w2, w3, self.swiglu_limit)
            y_TKD = torch.empty_like(y).index_copy_(0, order, y).view(T, K, -1)
            # rows past the offsets are never written: where, not a product with weight 0, keeps them out
            y_TKD = torch.where(mine.unsqueeze(-1), y_TKD.to(acc), 0.0)
            return (weights_TK.to(acc).unsqueeze(-1) * y_TKD).sum(1)
        w_TE = torch.zeros(T, E + 1, dtype=acc, device=x_TD.device).scatter_add_(
            1, torch.where(mine, local, E), weights_TK.to(acc))[:, :E]
        w13, w2_ = _pack_weights(w1, w2, w3, dtype)
        x = lowp.operand(x_TD, dtype)
        h13 = torch.matmul(x, w13.to(x.dtype).transpose(1, 2))  # (E, T, 2F); held BF16 weights widened
        a = swiglu(*h13.to(dtype).chunk(2, dim=-1), self.swiglu_limit)
        y = torch.matmul(lowp.operand(a, dtype), w2_.to(x.dtype).transpose(1, 2)).to(dtype)  # (E, T, D)
        return torch.einsum("te,etd->td", w_TE, y.to(acc))

    def extra_repr(self) -> str:
        limit = f", swiglu_limit={self.swiglu_limit}" if self.swiglu_limit > 0 else ""
        quant = f", weight_quant={getattr(self.weight_quant, '__name__', 'on')}" if self.weight_quant else ""
        return f"n_local={self.n_local}, first={self.first}, impl={self.impl}{limit}{quant}"


__all__ = ["EXPERT_IMPLS", "MLP", "Experts", "PaddedLayout", "expert_ffn_fused", "expert_ffn_grouped_mm",
           "expert_ffn_loop", "local_routed_no_grad", "packed_w13", "padded_layout", "resolve_experts_impl",
           "routed_order", "swiglu"]
