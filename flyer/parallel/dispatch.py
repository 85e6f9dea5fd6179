"""Dispatchers: move routed token copies to their experts and combine the outputs back.

The seam every MoE layer calls (torchtitan-style):

    x_sorted_ND, counts_local_E, ctx = dispatcher.dispatch(x_TD, topk_ids_TK)
    y_sorted_ND = experts(x_sorted_ND, counts_local_E)   # tokens sorted by local expert
    y_TD = dispatcher.combine(y_sorted_ND, weights_TK, ctx)

``local_experts()`` returns (first expert id, number of experts) held by this process.
Both directions are differentiable (autograd through the index ops, or custom functions for the
collective versions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LocalContext:
    token_idx_N: torch.Tensor  # source token of each sorted copy
    order_N: torch.Tensor  # permutation of the flattened (T*K) copies into expert order
    n_tokens: int


class LocalDispatcher:
    """One process holds every expert: a stable sort of token copies by expert id."""

    def __init__(self, n_experts: int):
        self.n_experts = n_experts

    def local_experts(self) -> tuple[int, int]:
        return 0, self.n_experts

    def dispatch(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor):
        K = topk_ids_TK.shape[1]
        flat = topk_ids_TK.flatten()
        order = torch.argsort(flat, stable=True)
        token_idx = order // K
        counts = torch.bincount(flat, minlength=self.n_experts)
        return x_TD[token_idx], counts, LocalContext(token_idx, order, x_TD.shape[0])

    def combine(self, y_ND: torch.Tensor, weights_TK: torch.Tensor, ctx: LocalContext) -> torch.Tensor:
        w = weights_TK.flatten()[ctx.order_N].unsqueeze(1)
        out = y_ND.new_zeros(ctx.n_tokens, y_ND.shape[1], dtype=torch.float32)
        return out.index_add(0, ctx.token_idx_N, (y_ND.float() * w))
