"""DeepSeekMoE: shared experts plus fine-grained routed experts, sigmoid gate, group-limited
routing, aux-loss-free bias balancing and the complementary sequence-wise balance loss.

Shapes: T tokens (batch flattened), D model dim, F expert hidden dim, E routed experts,
K activated experts per token, G expert groups, N = T*K routed token copies.
"""

from __future__ import annotations

import contextlib
import contextvars
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from flyer import kernels
from flyer.config import ModelConfig
from flyer.model import lowp
from flyer.model.lowp import Linear, gemm_dtype, mm


_DEFER_INIT = contextvars.ContextVar("flyer_defer_init", default=False)


@contextlib.contextmanager
def deferred_init():
    """Gate and Experts built inside leave their weights as allocated, for an owner that initialises
    every parameter right afterwards (``Transformer.init_weights``): building then draws nothing
    from the RNG, so a seed gives the same model with or without their own initialisation."""
    token = _DEFER_INIT.set(True)
    try:
        yield
    finally:
        _DEFER_INIT.reset(token)


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x). Dense FFN layers and shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = Linear(dim, inter_dim, bias=False)
        self.w2 = Linear(inter_dim, dim, bias=False)
        self.w3 = Linear(dim, inter_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(gemm_dtype(x))  # once, not once per up-projection (autocast casts per call)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Gate(nn.Module):
    """Router. Scores are computed in FP32 (the FP8 recipe keeps the router in high precision).

    Selection uses ``scores + bias`` (the aux-loss-free balancing bias); the gate values use the
    unbiased scores. With G > 1 groups, a group's score is the sum of its top-2 biased scores
    (max score when there is no bias, as in DeepSeek-V2), only the best ``n_limited_groups``
    groups stay eligible, and the top-K experts are chosen among them.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        if cfg.router_bias:
            self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        else:
            self.bias = None
        if not _DEFER_INIT.get():
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """N(0, init_std) router weights; the balancing bias (a buffer) is left alone."""
        self.weight.normal_(0.0, self.cfg.init_std, generator=generator)

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (weights_TK fp32, topk_ids_TK int64, scores_TE fp32)."""
        cfg = self.cfg
        with torch.autocast(x_TD.device.type, enabled=False):
            logits = F.linear(x_TD.float(), self.weight.float())
        scores = logits.sigmoid() if cfg.score_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores.detach() if self.bias is None else scores.detach() + self.bias
        T, E = choice.shape
        G = cfg.n_expert_groups
        if G > 1 and cfg.n_limited_groups < G:
            grouped = choice.view(T, G, E // G)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1) if self.bias is not None else grouped.amax(-1)
            keep = group_scores.topk(cfg.n_limited_groups, dim=-1).indices
            drop = torch.ones(T, G, dtype=torch.bool, device=x_TD.device).scatter_(1, keep, False)
            choice = grouped.masked_fill(drop.unsqueeze(-1), float("-inf")).view(T, E)
        topk_ids = choice.topk(cfg.n_activated_experts, dim=-1).indices
        weights = scores.gather(1, topk_ids)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * cfg.route_scale, topk_ids, scores


def expert_ffn_loop(x_ND: torch.Tensor, counts_E: torch.Tensor, w1_EFD: torch.Tensor, w2_EDF: torch.Tensor,
                    w3_EFD: torch.Tensor) -> torch.Tensor:
    """Reference grouped SwiGLU: each expert on its contiguous slice of the expert-sorted tokens,
    differentiated by autograd. The oracle for the fast paths below."""
    counts = counts_E.tolist()
    # unbind, not w[e]: backward stacks the expert gradients once instead of materialising a full
    # (E, F, D) gradient per expert
    ws = zip(w1_EFD.unbind(0), w2_EDF.unbind(0), w3_EFD.unbind(0))
    outs = [F.linear(F.silu(F.linear(xs, w1)) * F.linear(xs, w3), w2)
            for xs, n, (w1, w2, w3) in zip(x_ND.split(counts), counts, ws) if n]
    return torch.cat(outs) if outs else x_ND.new_zeros(0, w2_EDF.shape[1])


def expert_ffn_grouped_mm(x_ND: torch.Tensor, counts_E: torch.Tensor, w1_EFD: torch.Tensor,
                          w2_EDF: torch.Tensor, w3_EFD: torch.Tensor) -> torch.Tensor:
    """Same as ``expert_ffn_loop`` with ``torch._grouped_mm`` (bf16; the CUDA fast path)."""
    offs = counts_E.cumsum(0).to(torch.int32)
    x = x_ND.to(torch.bfloat16)
    h1 = torch._grouped_mm(x, w1_EFD.to(torch.bfloat16).transpose(-2, -1), offs=offs)
    h3 = torch._grouped_mm(x, w3_EFD.to(torch.bfloat16).transpose(-2, -1), offs=offs)
    return torch._grouped_mm(F.silu(h1) * h3, w2_EDF.to(torch.bfloat16).transpose(-2, -1), offs=offs)


def _padded_layout(counts: list[int], row_multiple: int) -> tuple[list[int], list[int], int]:
    """Each expert's rows padded to a multiple of ``row_multiple``: (padded counts, starts, total)."""
    padded = [n + (-n % row_multiple) for n in counts]
    starts = [0, *accumulate(padded)]
    return padded, starts[:-1], starts[-1]


def _padded_rows(counts: list[int], padded: list[int], starts: list[int], device) -> torch.Tensor:
    """Row of each expert-sorted copy in the padded layout (N,)."""
    N = sum(counts)
    shift = torch.tensor([s - f for s, f in zip(starts, [0, *accumulate(counts)])])
    return (torch.arange(N) + shift.repeat_interleave(torch.tensor(counts), output_size=N)).to(device)


def _pack_weights(w1_EFD, w2_EDF, w3_EFD, dtype):
    """w1|w3 stacked as (E, 2F, D) and w2 (E, D, F), cast to ``dtype`` in the same pass (then
    widened to FP32 where ``dtype`` GEMMs are emulated: see ``lowp.operand``)."""
    E, F_, D = w1_EFD.shape
    w13 = w1_EFD.new_empty((E, 2 * F_, D), dtype=dtype)  # one up-projection GEMM per expert
    w13[:, :F_].copy_(w1_EFD)
    w13[:, F_:].copy_(w3_EFD)
    return lowp.operand(w13, dtype), lowp.operand(w2_EDF, dtype)


def _swiglu_forward(x, w13, w2, rows: list[int], F_):
    """Expert e on the next ``rows[e]`` rows of x (padded layout): returns (y, h13, a). Per-expert
    views come from one ``split``/``unbind`` each rather than a Python slice per GEMM operand."""
    h13 = x.new_empty(x.shape[0], 2 * F_)
    y = x.new_empty(x.shape[0], w2.shape[1])
    live = [e for e, p in enumerate(rows) if p]
    xs, hs, w13t = x.split(rows), h13.split(rows), w13.transpose(1, 2).unbind(0)
    for e in live:
        mm(xs[e], w13t[e], out=hs[e])
    a = kernels.swiglu(h13)
    as_, ys, w2t = a.split(rows), y.split(rows), w2.transpose(1, 2).unbind(0)
    for e in live:
        mm(as_[e], w2t[e], out=ys[e])
    return y, h13, a


def _swiglu_backward(dy, x, w13, w2, h13, a, rows: list[int], F_, need_x: bool, need_w: bool, w_dtype):
    """Gradients of ``_swiglu_forward``: (dx or None, (dw1, dw2, dw3) or Nones). dx is in the compute
    dtype, the weight gradients in ``w_dtype`` (the weights' storage dtype).

    Each expert's weight-gradient GEMM writes into one small scratch buffer that is converted into
    the expert's slice of dw1/dw3 (dw2) straight away, while it is still in cache: a packed
    (E, 2F, D) gradient in the compute dtype, converted afterwards, would cross memory twice more.
    """
    live = [e for e, p in enumerate(rows) if p]
    E, D = w2.shape[0], w2.shape[1]
    da = x.new_empty(a.shape)
    dw1 = dw2 = dw3 = None
    if need_w:
        dw1, dw3 = (w13.new_empty((E, F_, D), dtype=w_dtype) for _ in range(2))
        dw2 = w2.new_empty(w2.shape, dtype=w_dtype)
        for e in (e for e, p in enumerate(rows) if not p):  # no rows, no GEMM: a zero gradient
            for t in (dw1, dw2, dw3):
                t[e].zero_()
        s13, s2 = x.new_empty((2 * F_, D)), x.new_empty((D, F_))
        s1, s3 = s13[:F_], s13[F_:]
    dys, das, w2s = dy.split(rows), da.split(rows), w2.unbind(0)
    if need_w:
        as_ = a.split(rows)
    for e in live:
        mm(dys[e], w2s[e], out=das[e])
        if need_w:
            dw2[e].copy_(mm(dys[e].t(), as_[e], out=s2))
    dh13 = kernels.swiglu_backward(da, h13)
    dx = x.new_empty(x.shape) if need_x else None
    dhs = dh13.split(rows)
    if need_x:
        dxs, w13s = dx.split(rows), w13.unbind(0)
    if need_w:
        xs = x.split(rows)
    for e in live:
        if need_x:
            mm(dhs[e], w13s[e], out=dxs[e])
        if need_w:
            mm(dhs[e].t(), xs[e], out=s13)
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
    rows, so GEMM shapes repeat from step to step. That matters where every new shape costs a
    kernel JIT: oneDNN's bf16 GEMMs on CPU take ~2.7 ms for a new shape against ~0.15 ms for a
    cached one.
    """

    @staticmethod
    def forward(ctx, x_ND, w1_EFD, w2_EDF, w3_EFD, counts: list[int], row_multiple: int, dtype: torch.dtype):
        N, D = x_ND.shape
        F_ = w1_EFD.shape[1]
        padded, starts, n_pad = _padded_layout(counts, row_multiple)
        pos = None
        x = x_ND.to(dtype).contiguous()
        if n_pad != N:  # destination row of each expert-sorted copy in the padded layout
            pos = _padded_rows(counts, padded, starts, x.device)
            x = x.new_zeros(n_pad, D).index_copy_(0, pos, x)
        w13, w2 = _pack_weights(w1_EFD, w2_EDF, w3_EFD, dtype)
        y, h13, a = _swiglu_forward(x, w13, w2, padded, F_)
        ctx.save_for_backward(x, w13, w2, h13, a, pos)
        ctx.rows, ctx.F, ctx.x_dtype, ctx.w_dtype = padded, F_, x_ND.dtype, w1_EFD.dtype
        return y if pos is None else y.index_select(0, pos)

    @staticmethod
    def backward(ctx, dy_ND):
        x, w13, w2, h13, a, pos = ctx.saved_tensors
        F_ = ctx.F
        dy = dy_ND.to(x.dtype).contiguous()
        if pos is not None:
            dy = dy.new_zeros(x.shape).index_copy_(0, pos, dy)
        need_w = any(ctx.needs_input_grad[1:4])
        dx, dws = _swiglu_backward(dy, x, w13, w2, h13, a, ctx.rows, F_, ctx.needs_input_grad[0], need_w, ctx.w_dtype)
        if dx is not None:
            dx = (dx if pos is None else dx.index_select(0, pos)).to(ctx.x_dtype)
        return (dx, *dws, None, None, None)


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
    """

    @staticmethod
    def forward(ctx, x_TD, weights_TK, w1_EFD, w2_EDF, w3_EFD, topk_ids_TK, counts: list[int],
                row_multiple: int, dtype: torch.dtype):
        T, D = x_TD.shape
        K, F_ = topk_ids_TK.shape[1], w1_EFD.shape[1]
        order = torch.argsort(topk_ids_TK.flatten(), stable=True)
        padded, starts, n_pad = _padded_layout(counts, row_multiple)
        pos = _padded_rows(counts, padded, starts, x_TD.device)
        src = torch.full((n_pad,), T, dtype=torch.long, device=x_TD.device)  # T: pad row
        src[pos] = order // K  # the token each padded row holds
        acc_dtype = torch.promote_types(dtype, torch.float32)  # the combine sums in FP32 (FP64 for FP64)
        w_pad = weights_TK.new_zeros(n_pad, dtype=acc_dtype)
        w_pad[pos] = weights_TK.flatten()[order].to(acc_dtype)
        x = x_TD.to(dtype)
        index = kernels.token_index(src, T, x, w_pad)
        x = x.index_select(0, index.gather).index_fill_(0, index.pad_rows, 0)
        w13, w2 = _pack_weights(w1_EFD, w2_EDF, w3_EFD, dtype)
        y, h13, a = _swiglu_forward(x, w13, w2, padded, F_)
        ctx.save_for_backward(x, w13, w2, h13, a, y, w_pad, pos, order)
        ctx.rows, ctx.F, ctx.x_dtype, ctx.w_dtype, ctx.w_gate_dtype = padded, F_, x_TD.dtype, w1_EFD.dtype, weights_TK.dtype
        ctx.index = index
        return kernels.combine(y, w_pad, index)

    @staticmethod
    def backward(ctx, g_TD):
        x, w13, w2, h13, a, y, w_pad, pos, order = ctx.saved_tensors
        T = g_TD.shape[0]
        need_dw = ctx.needs_input_grad[1]
        dy, d_pad = kernels.combine_backward(g_TD, y, w_pad, ctx.index, need_dw)
        d_weights = None
        if need_dw:
            d_weights = d_pad.new_empty(order.shape).index_copy_(0, order, d_pad[pos])
            d_weights = d_weights.view(T, -1).to(ctx.w_gate_dtype)
        need_w = any(ctx.needs_input_grad[2:5])
        dx, dws = _swiglu_backward(dy, x, w13, w2, h13, a, ctx.rows, ctx.F, ctx.needs_input_grad[0], need_w, ctx.w_dtype)
        if dx is not None:  # each token's copies summed
            dx = kernels.segment_sum(dx, ctx.index).to(ctx.x_dtype)
        return (dx, d_weights, *dws, None, None, None, None)


def expert_ffn_fused(x_ND: torch.Tensor, counts_E: torch.Tensor, w1_EFD: torch.Tensor, w2_EDF: torch.Tensor,
                     w3_EFD: torch.Tensor, row_multiple: int = 1, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Same as ``expert_ffn_loop`` through ``_GroupedSwiGLU``, computed in ``dtype`` (default: x's);
    the output is in ``dtype``, each gradient in its input's dtype."""
    return _GroupedSwiGLU.apply(x_ND, w1_EFD, w2_EDF, w3_EFD, counts_E.tolist(), row_multiple, dtype or x_ND.dtype)


CPU_LOWP_ROW_MULTIPLE = 64


class Experts(nn.Module):
    """Routed experts ``[first, first + n_local)`` stored stacked: w1/w3 (E, F, D), w2 (E, D, F).

    ``use_grouped_mm`` selects ``torch._grouped_mm`` on CUDA (None = automatic); elsewhere
    ``expert_ffn_fused`` runs (faster than the CPU grouped_mm fallback); ``expert_ffn_loop`` is the
    oracle for both.
    """

    def __init__(self, n_local: int, dim: int, inter_dim: int, first: int = 0, use_grouped_mm: bool | None = None,
                 init_std: float = 0.02):
        super().__init__()
        self.first, self.n_local, self.init_std = first, n_local, init_std
        self.w1 = nn.Parameter(torch.empty(n_local, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_local, dim, inter_dim))
        self.w3 = nn.Parameter(torch.empty(n_local, inter_dim, dim))
        self.use_grouped_mm = use_grouped_mm
        if not _DEFER_INIT.get():
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """N(0, init_std) for w1, w2, w3, in that order."""
        for w in (self.w1, self.w2, self.w3):
            w.normal_(0.0, self.init_std, generator=generator)

    def grouped_mm(self, x_ND: torch.Tensor) -> bool:
        """Whether ``forward`` takes the ``torch._grouped_mm`` path for input like x_ND."""
        if self.use_grouped_mm is None:
            return x_ND.is_cuda and hasattr(torch, "_grouped_mm")
        return self.use_grouped_mm

    @staticmethod
    def row_multiple(x_ND: torch.Tensor, dtype: torch.dtype) -> int:
        """bf16/fp16 CPU GEMMs on oneDNN JIT a kernel per new shape: bucket the per-expert row counts
        (not where they run through the FP32 kernel, ``lowp.emulated``: padding would only add work)."""
        oneDNN = x_ND.device.type == "cpu" and dtype in lowp.LOWP and not lowp.emulated("cpu", dtype)
        return CPU_LOWP_ROW_MULTIPLE if oneDNN else 1

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        if self.grouped_mm(x_ND):
            return expert_ffn_grouped_mm(x_ND, counts_E, self.w1, self.w2, self.w3).to(x_ND.dtype)
        dtype = gemm_dtype(x_ND)
        return expert_ffn_fused(x_ND, counts_E, self.w1, self.w2, self.w3, row_multiple=self.row_multiple(x_ND, dtype),
                                dtype=dtype)

    def fuses_local(self, x_ND: torch.Tensor) -> bool:
        """Whether ``routed_local`` computes what ``forward`` does for input like x_ND: not where
        ``forward`` takes ``torch._grouped_mm``, nor in a subclass that replaces ``forward`` (FP8Experts)."""
        return type(self).forward is Experts.forward and not self.grouped_mm(x_ND)

    def routed_local(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor,
                     counts_E: torch.Tensor) -> torch.Tensor:
        """Dispatch, experts and combine in one pass when this process holds every expert (see
        ``_LocalRoutedExperts``); the same values as ``LocalDispatcher`` around ``forward``. FP32 (T, D)."""
        dtype = gemm_dtype(x_TD)
        return _LocalRoutedExperts.apply(x_TD, weights_TK, self.w1, self.w2, self.w3, topk_ids_TK, counts_E.tolist(),
                                         self.row_multiple(x_TD, dtype), dtype)


class MoE(nn.Module):
    """Shared experts + routed experts. The dispatcher moves routed token copies to the experts
    (locally or across ranks, see ``flyer.parallel.dispatch``) and combines weighted outputs back.

    State read by the trainer: ``tokens_per_expert`` (E,) accumulated since the last bias update,
    ``last_counts`` (E,) of the last forward, ``aux_loss`` (scalar, sequence-wise balance loss of
    the last training forward, already times alpha).
    """

    def __init__(self, cfg: ModelConfig, dispatcher=None):
        super().__init__()
        from flyer.parallel.dispatch import LocalDispatcher

        self.cfg = cfg
        self.gate = Gate(cfg)
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatcher(cfg.n_routed_experts)
        # one process, no wire roundings: dispatch + experts + combine as one function (False: the
        # composed seam, the oracle)
        self.fused_local = isinstance(self.dispatcher, LocalDispatcher) and self.dispatcher.plain
        first, n_local = self.dispatcher.local_experts()
        self.experts = Experts(n_local, cfg.dim, cfg.moe_inter_dim, first=first, init_std=cfg.init_std)
        self.shared = MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts > 0 else None
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.register_buffer("last_counts", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        weights_TK, topk_ids_TK, scores_TE = self.gate(x_TD)
        counts = torch.bincount(topk_ids_TK.flatten(), minlength=self.cfg.n_routed_experts)
        self.last_counts.copy_(counts)
        if self.training:
            self.tokens_per_expert += counts
            self.aux_loss = sequence_balance_loss(scores_TE.view(B, T, -1), topk_ids_TK.view(B, T, -1),
                                                  self.cfg) if self.cfg.seq_aux_alpha > 0 else None
        x_in = x_TD.to(gemm_dtype(x_TD))  # gather/send the rows in the compute dtype, cast once
        if self.fused_local and self.experts.fuses_local(x_in):
            y_TD = self.experts.routed_local(x_in, weights_TK, topk_ids_TK, counts).to(x_BTD.dtype)
        else:
            x_sorted, local_counts, ctx = self.dispatcher.dispatch(x_in, topk_ids_TK)
            y_sorted = self.experts(x_sorted, local_counts)
            y_TD = self.dispatcher.combine(y_sorted, weights_TK, ctx).to(x_BTD.dtype)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_in)
        return y_TD.view(B, T, D)


def sequence_balance_loss(scores_BTE: torch.Tensor, topk_ids_BTK: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Complementary sequence-wise balance loss (V3 report eq. 17-20), times alpha.

    f_i = E / (K T) * #tokens of the sequence routed to i; P_i = mean_t of normalised scores.
    """
    B, T, E = scores_BTE.shape
    K = topk_ids_BTK.shape[-1]
    probs = scores_BTE / scores_BTE.sum(-1, keepdim=True)
    P = probs.mean(dim=1)  # (B, E)
    hits = torch.zeros(B, E, device=scores_BTE.device).scatter_add_(
        1, topk_ids_BTK.reshape(B, T * K), torch.ones(B, T * K, device=scores_BTE.device))
    f = hits * (E / (K * T))
    return cfg.seq_aux_alpha * (f * P).sum(-1).mean()


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


@torch.no_grad()
def update_router_bias(model: nn.Module, group=None) -> dict[str, float]:
    """Aux-loss-free balancing step, applied once per optimizer step.

    For each MoE layer: bias_i += gamma * sign(mean_load - load_i) over the tokens counted since
    the last update (all micro-batches; summed over ``group`` when given, so every data-parallel
    replica applies the same update). Returns load statistics (max/mean load, bias range).
    """
    stats = {"load_imbalance": 0.0, "bias_min": 0.0, "bias_max": 0.0}
    layers = moe_layers(model)
    imbalance = []
    for moe in layers:
        counts = moe.tokens_per_expert
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(counts, group=group)
        mean = counts.mean()
        if mean > 0:
            imbalance.append(float(counts.max() / mean))
            if moe.gate.bias is not None:
                moe.gate.bias += moe.cfg.bias_update_speed * torch.sign(mean - counts)
        counts.zero_()
    if layers:
        biases = [m.gate.bias for m in layers if m.gate.bias is not None]
        if biases:
            b = torch.stack(biases)
            stats.update(bias_min=float(b.min()), bias_max=float(b.max()))
        stats["load_imbalance"] = max(imbalance) if imbalance else 0.0
    return stats
