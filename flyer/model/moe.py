"""DeepSeekMoE: shared experts plus fine-grained routed experts, sigmoid gate, group-limited
routing, aux-loss-free bias balancing and the complementary sequence-wise balance loss.

Shapes: T tokens (batch flattened), D model dim, F expert hidden dim, E routed experts,
K activated experts per token, G expert groups, N = T*K routed token copies.
"""

from __future__ import annotations

from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from flyer.config import ModelConfig


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype GEMMs on ``x`` run in: autocast's when it is on for x's device, else x's own."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x). Dense FFN layers and shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(compute_dtype(x))  # once, not once per up-projection (autocast casts per call)
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
    outs = [F.linear(F.silu(F.linear(xs, w1)) * F.linear(xs, w3), w2)
            for xs, n, w1, w2, w3 in zip(x_ND.split(counts_E.tolist()), counts_E.tolist(), w1_EFD, w2_EDF, w3_EFD)
            if n]
    return torch.cat(outs) if outs else x_ND.new_zeros(0, w2_EDF.shape[1])


def expert_ffn_grouped_mm(x_ND: torch.Tensor, counts_E: torch.Tensor, w1_EFD: torch.Tensor,
                          w2_EDF: torch.Tensor, w3_EFD: torch.Tensor) -> torch.Tensor:
    """Same as ``expert_ffn_loop`` with ``torch._grouped_mm`` (bf16; the CUDA fast path)."""
    offs = counts_E.cumsum(0).to(torch.int32)
    x = x_ND.to(torch.bfloat16)
    h1 = torch._grouped_mm(x, w1_EFD.to(torch.bfloat16).transpose(-2, -1), offs=offs)
    h3 = torch._grouped_mm(x, w3_EFD.to(torch.bfloat16).transpose(-2, -1), offs=offs)
    return torch._grouped_mm(F.silu(h1) * h3, w2_EDF.to(torch.bfloat16).transpose(-2, -1), offs=offs)


class _GroupedSwiGLU(torch.autograd.Function):
    """Grouped SwiGLU experts with a hand-written backward (the CPU fast path).

    Same maths as ``expert_ffn_loop``, but each expert's GEMMs write into slices of one buffer
    (``torch.mm(..., out=)``) and the activation runs once over all experts: no per-expert pads,
    splits, cats or autograd nodes. The weights come in their storage dtype and are cast to the
    compute ``dtype`` while being packed (w1|w3 into one stack: one pass, not a cast and then a
    cat); their gradients go back in the storage dtype. ``row_multiple`` > 1 lays each expert's
    slice out padded with
    zero rows (which add nothing to any gradient) to a multiple of that many rows, so GEMM shapes
    repeat from step to step. That matters where every new shape costs a kernel JIT: oneDNN's bf16
    GEMMs on CPU take ~2.7 ms for a new shape against ~0.15 ms for a cached one.
    """

    @staticmethod
    def forward(ctx, x_ND, w1_EFD, w2_EDF, w3_EFD, counts: list[int], row_multiple: int, dtype: torch.dtype):
        N, D = x_ND.shape
        E, F_, _ = w1_EFD.shape
        padded = [n + (-n % row_multiple) for n in counts]
        starts = [0, *accumulate(padded)]
        n_pad = starts.pop()
        pos = None
        x = x_ND.to(dtype).contiguous()
        if n_pad != N:  # destination row of each expert-sorted copy in the padded layout
            shift = [s - f for s, f in zip(starts, [0, *accumulate(counts)])]
            pos = torch.arange(N) + torch.tensor(shift).repeat_interleave(torch.tensor(counts), output_size=N)
            pos = pos.to(x.device)
            x = x.new_zeros(n_pad, D).index_copy_(0, pos, x)
        w13 = w1_EFD.new_empty((E, 2 * F_, D), dtype=dtype)  # one up-projection GEMM per expert
        w13[:, :F_].copy_(w1_EFD)
        w13[:, F_:].copy_(w3_EFD)
        w2_EDF = w2_EDF.to(dtype)
        h13 = x.new_empty(n_pad, 2 * F_)
        y = x.new_empty(n_pad, D)
        spans = [(e, s, p) for e, (s, p) in enumerate(zip(starts, padded)) if p]
        for e, s, p in spans:
            torch.mm(x[s:s + p], w13[e].t(), out=h13[s:s + p])
        a = F.silu(h13[:, :F_]) * h13[:, F_:]
        for e, s, p in spans:
            torch.mm(a[s:s + p], w2_EDF[e].t(), out=y[s:s + p])
        ctx.save_for_backward(x, w13, w2_EDF, h13, a, pos)
        ctx.spans, ctx.F, ctx.x_dtype, ctx.w_dtype = spans, F_, x_ND.dtype, w1_EFD.dtype
        return y if pos is None else y.index_select(0, pos)

    @staticmethod
    def backward(ctx, dy_ND):
        x, w13, w2, h13, a, pos = ctx.saved_tensors
        spans, F_ = ctx.spans, ctx.F
        dy = dy_ND.to(x.dtype).contiguous()
        if pos is not None:
            dy = dy.new_zeros(x.shape).index_copy_(0, pos, dy)
        h1, h3 = h13[:, :F_], h13[:, F_:]
        da = x.new_empty(a.shape)
        need_w = any(ctx.needs_input_grad[1:4])
        dw2 = w2.new_zeros(w2.shape) if need_w else None
        for e, s, p in spans:
            torch.mm(dy[s:s + p], w2[e], out=da[s:s + p])
            if need_w:
                torch.mm(dy[s:s + p].t(), a[s:s + p], out=dw2[e])
        # the same element-wise ops autograd would run for silu(h1) * h3
        dh13 = torch.cat([torch.ops.aten.silu_backward(da * h3, h1), da * F.silu(h1)], dim=1)
        dx = x.new_empty(x.shape) if ctx.needs_input_grad[0] else None
        dw13 = w13.new_zeros(w13.shape) if need_w else None
        for e, s, p in spans:
            if dx is not None:
                torch.mm(dh13[s:s + p], w13[e], out=dx[s:s + p])
            if need_w:
                torch.mm(dh13[s:s + p].t(), x[s:s + p], out=dw13[e])
        if dx is not None:
            dx = (dx if pos is None else dx.index_select(0, pos)).to(ctx.x_dtype)
        dw1 = dw2_ = dw3 = None
        if need_w:  # back to the storage dtype (w1/w3 slices become contiguous in the same pass)
            dw1, dw2_, dw3 = (t.to(ctx.w_dtype) for t in (dw13[:, :F_], dw2, dw13[:, F_:]))
        return dx, dw1, dw2_, dw3, None, None, None


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

    def __init__(self, n_local: int, dim: int, inter_dim: int, first: int = 0, use_grouped_mm: bool | None = None):
        super().__init__()
        self.first, self.n_local = first, n_local
        self.w1 = nn.Parameter(torch.empty(n_local, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_local, dim, inter_dim))
        self.w3 = nn.Parameter(torch.empty(n_local, inter_dim, dim))
        self.use_grouped_mm = use_grouped_mm

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        grouped = self.use_grouped_mm
        if grouped is None:
            grouped = x_ND.is_cuda and hasattr(torch, "_grouped_mm")
        if grouped:
            return expert_ffn_grouped_mm(x_ND, counts_E, self.w1, self.w2, self.w3).to(x_ND.dtype)
        dtype = compute_dtype(x_ND)
        # bf16/fp16 CPU GEMMs JIT a kernel per new shape: bucket the per-expert row counts
        rows = CPU_LOWP_ROW_MULTIPLE if (x_ND.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)) else 1
        return expert_ffn_fused(x_ND, counts_E, self.w1, self.w2, self.w3, row_multiple=rows, dtype=dtype)


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
        first, n_local = self.dispatcher.local_experts()
        self.experts = Experts(n_local, cfg.dim, cfg.moe_inter_dim, first=first)
        self.shared = MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts > 0 else None
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.register_buffer("last_counts", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        weights_TK, topk_ids_TK, scores_TE = self.gate(x_TD)
        counts = torch.bincount(topk_ids_TK.flatten(), minlength=self.cfg.n_routed_experts).float()
        self.last_counts.copy_(counts)
        if self.training:
            self.tokens_per_expert += counts
            self.aux_loss = sequence_balance_loss(scores_TE.view(B, T, -1), topk_ids_TK.view(B, T, -1),
                                                  self.cfg) if self.cfg.seq_aux_alpha > 0 else None
        x_in = x_TD.to(compute_dtype(x_TD))  # gather/send the rows in the compute dtype, cast once
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
