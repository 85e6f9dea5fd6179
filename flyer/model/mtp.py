"""Multi-token prediction (DeepSeek-V3 report, section 2.2).

MTP module k (1..D) at position i combines the previous depth's representation h^{k-1}_i with
the embedding of token t_{i+k}, runs one transformer block, and predicts token t_{i+k+1} through
the shared output head. The embedding and the head are the main model's (shared, not owned
here). The sequence shrinks by one position per depth, so every prediction has a target.

The paper writes M_k [RMSNorm(h^{k-1}_i); RMSNorm(Emb(t_{i+k}))] with h^0 the main model's
output. DeepSeek's released checkpoints (and transformers / vLLM, which run them) feed
``eh_proj`` with ``[enorm(Emb); hnorm(h)]`` and take h^0 *after* the main model's final norm;
flyer follows the checkpoints, so their MTP weights work as they are. Deeper modules (and
chained drafts) take the previous module's output before its own norm, as vLLM does.
"""

from __future__ import annotations

import torch
from torch import nn

from flyer.config import ModelConfig
from flyer.model.lowp import Linear
from flyer.model.norm import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, block: nn.Module):
        super().__init__()
        self.hnorm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.enorm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.eh_proj = Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = block
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)  # before the shared head

    def forward(self, h_prev_BTD: torch.Tensor, emb_next_BTD: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        """h_prev: h^{k-1} at positions 0..T-1 (h^0: after the main model's final norm);
        emb_next: Emb(t_{i+k}) at the same positions. Returns h^k (B, T, D) before the final norm."""
        return self.block(self.project(h_prev_BTD, emb_next_BTD), cos, sin)

    def project(self, h_prev_BTD: torch.Tensor, emb_next_BTD: torch.Tensor) -> torch.Tensor:
        """eh_proj([enorm(emb); hnorm(h)]) (B, T, D): the checkpoints' order (module doc)."""
        return self.eh_proj(torch.cat([self.enorm(emb_next_BTD), self.hnorm(h_prev_BTD)], dim=-1))
