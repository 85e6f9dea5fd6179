"""The dispatcher seam of a MoE layer, and the dispatcher of one process holding every expert.

Every MoE layer moves its routed token copies through a dispatcher (torchtitan-style):

    x_sorted_ND, counts_local_E, ctx = dispatcher.dispatch(x_TD, topk_ids_TK)
    y_sorted_ND = experts(x_sorted_ND, counts_local_E)   # tokens sorted by local expert
    y_TD = dispatcher.combine(y_sorted_ND, weights_TK, ctx)

``local_experts()`` returns (first expert id, number of experts) held by this process.
``LocalDispatcher`` (here) holds every expert; the exchanging dispatchers, flat all-to-all and
hierarchical, live in ``flyer.parallel.dispatch``. ``DISPATCHER_KINDS`` names all of them.

Wire formats (``flyer.model.wire``): dispatch moves rows in the input dtype, or FP8 with
``fp8=True``. Combine moves rows in ``combine_dtype`` (BF16 by default when ``fp8=True``), else the expert
outputs in their own dtype and the hierarchical dispatcher's weighted partial sums in FP32 (DeepEP rounds those
to BF16), and sums in FP32. Gradients retrace the routes in the combine's dtypes: dispatch's, summed per token
on the way back, and combine's, each token's output gradient on its way to the experts; with ``fp8=True``
combine's travel as FP8 rows quantized once on the token's rank, as dispatch's inputs do (the report's FP8
gradient before the MoE down-projections, section 3.3.2, where combine stays BF16 both ways). ``LocalDispatcher``
applies the same roundings, so that one process is the oracle for the exchanging dispatchers (but for
hierarchical's partial sums under a ``combine_dtype``, which it cannot place: within that dtype's rounding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from flyer.config import ConfigError
from flyer.model.wire import FakeFp8Rows, Fp8RoundGrad, RoundGrad

DISPATCHER_KINDS = ("local", "flat", "hierarchical")  # the one list of dispatcher choices
_ALIASES = {"all_to_all": "flat", "alltoall": "flat", "a2a": "flat", "hier": "hierarchical"}


def dispatcher_kind(kind: str) -> str:
    """The registered name of dispatcher ``kind`` (aliases: 'all_to_all', 'alltoall', 'a2a' for
    'flat', 'hier' for 'hierarchical'); ConfigError naming the choices for any other."""
    kind = _ALIASES.get(kind, kind)
    if kind not in DISPATCHER_KINDS:
        raise ConfigError(f"dispatcher '{kind}' is unknown (choose from: {', '.join(DISPATCHER_KINDS)})")
    return kind


class Dispatcher(Protocol):
    def local_experts(self) -> tuple[int, int]: ...

    def dispatch(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]: ...

    def combine(self, y_ND: torch.Tensor, weights_TK: torch.Tensor, ctx: Any) -> torch.Tensor: ...


def match_wire_scales(model) -> None:
    """Each MoE layer's FP8 dispatch scales (``fp8_pow2``) as its experts' FP8 recipe takes its inputs: powers of
    two where they are (``pow2_scales``: FP4 QAT's, ``flyer.fp8.fp4.fp4_experts``), else amax / 448. The experts
    quantize the rows they receive again in the same 1x128 tiles, which gives back the wire's values only under the
    same rule (not always its codes: a tile may take half the scale and double codes); the other rounds them twice
    (26% of BF16 inputs moved)."""
    for m in model.modules():
        dispatcher, recipe = getattr(m, "dispatcher", None), getattr(getattr(m, "experts", None), "recipe", None)
        if dispatcher is not None and hasattr(dispatcher, "fp8_pow2"):
            dispatcher.fp8_pow2 = bool(getattr(recipe, "pow2_scales", False))


def combine_wire_dtype(fp8: bool, combine_dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype combine rows travel in: ``combine_dtype``, else BF16 with FP8 dispatch, else None
    (the expert output dtype)."""
    return combine_dtype if combine_dtype is not None else (torch.bfloat16 if fp8 else None)


@dataclass
class LocalContext:
    token_idx_N: torch.Tensor  # source token of each sorted copy
    order_N: torch.Tensor  # permutation of the flattened (T*K) copies into expert order
    n_tokens: int


class LocalDispatcher:
    """One process holds every expert: a stable sort of token copies by expert id.

    ``fp8`` / ``combine_dtype`` apply the same wire roundings as the exchanging dispatchers (FP8
    round trip of each token and of its output gradient, combine rows and dispatch's gradients rounded per copy).
    """

    def __init__(self, n_experts: int, fp8: bool = False, combine_dtype: torch.dtype | None = None):
        self.n_experts = n_experts
        self.fp8 = fp8
        self.fp8_pow2 = False  # power-of-two wire scales (``match_wire_scales``)
        self.combine_dtype = combine_wire_dtype(fp8, combine_dtype)

    def local_experts(self) -> tuple[int, int]:
        return 0, self.n_experts

    @property
    def emulates_wire(self) -> bool:
        """Whether dispatch or combine round as a wire would (else dispatch is a gather and combine
        a weighted FP32 sum)."""
        return self.fp8 or self.combine_dtype is not None

    def dispatch(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor):
        """x_TD (T, D), topk_ids_TK (T, K) -> (x_sorted (N, D) sorted by expert, counts (E,), ctx): N = T*K
        copies, less the picks of ids >= E (LongCat-Flash's identity experts, summed apart), which get none."""
        K = topk_ids_TK.shape[1]
        flat = topk_ids_TK.flatten()
        order = torch.argsort(flat, stable=True)  # ids >= E last, then cut off
        counts = torch.bincount(flat, minlength=self.n_experts)
        if counts.numel() > self.n_experts:
            counts = counts[:self.n_experts]
            order = order[:int(counts.sum())]
        token_idx = order // K
        if self.fp8:
            x_TD = FakeFp8Rows.apply(x_TD, self.fp8_pow2)
        x_sorted = x_TD.index_select(0, token_idx)  # backward is an index_add, not a sorting index_put
        if self.combine_dtype is not None and self.combine_dtype != x_sorted.dtype:
            x_sorted = RoundGrad.apply(x_sorted, self.combine_dtype)  # gradients return in the combine dtype
        return x_sorted, counts, LocalContext(token_idx, order, x_TD.shape[0])

    def combine(self, y_ND: torch.Tensor, weights_TK: torch.Tensor, ctx: LocalContext) -> torch.Tensor:
        """y_ND (N, D) in dispatch order, weights_TK (T, K) -> (T, D) FP32: the weighted sum of
        each token's expert outputs (identity picks: none, and their weights no gradient)."""
        if self.combine_dtype is not None:
            y_ND = y_ND.to(self.combine_dtype)
        w = weights_TK.flatten().index_select(0, ctx.order_N).unsqueeze(1)
        y_TD = weighted_sum(y_ND, w, ctx.token_idx_N, ctx.n_tokens)  # FP32 sum of the K weighted copies
        return Fp8RoundGrad.apply(y_TD, self.fp8_pow2) if self.fp8 else y_TD


class _WeightedSum(torch.autograd.Function):
    """``zeros(n, D).index_add(0, src, y.float() * w)`` keeping only y in its own dtype, w and src for backward
    (autograd would keep the FP32 weighted copy, and y's FP32 copy for w's gradient: four bytes per routed pick and
    channel where a BF16 y needs two). The same values and gradients."""

    @staticmethod
    def forward(ctx, y_ND: torch.Tensor, w_N1: torch.Tensor, src_N: torch.Tensor, n_out: int) -> torch.Tensor:
        ctx.save_for_backward(y_ND, w_N1, src_N)
        out = y_ND.new_zeros(n_out, y_ND.shape[1], dtype=torch.float32)
        return out.index_add_(0, src_N, y_ND.to(torch.float32, copy=True).mul_(w_N1))  # y itself is kept

    @staticmethod
    def backward(ctx, g_TD: torch.Tensor):
        y_ND, w_N1, src_N = ctx.saved_tensors
        g_ND = g_TD.index_select(0, src_N)
        dy = (g_ND * w_N1).to(y_ND.dtype) if ctx.needs_input_grad[0] else None
        dw = (g_ND * y_ND.float()).sum(1, keepdim=True).to(w_N1.dtype) if ctx.needs_input_grad[1] else None
        return dy, dw, None, None


def weighted_sum(y_ND: torch.Tensor, w_N1: torch.Tensor, src_N: torch.Tensor, n_out: int) -> torch.Tensor:
    """(n_out, D) float32: row r of y (N, D, any float dtype) times its gate weight w[r] (N, 1), summed into row
    src[r] (N,) in row order."""
    return _WeightedSum.apply(y_ND, w_N1, src_N, n_out)


__all__ = ["DISPATCHER_KINDS", "Dispatcher", "LocalContext", "LocalDispatcher", "combine_wire_dtype", "dispatcher_kind",
           "match_wire_scales", "weighted_sum"]
