"""Multi-token prediction (DeepSeek-V3 report, section 2.2).

MTP module k (1..D) at position i combines the previous depth's representation h^{k-1}_i with
the embedding of token t_{i+k}: h'_i = M_k [RMSNorm(h^{k-1}_i); RMSNorm(Emb(t_{i+k}))], runs one
transformer block, and predicts token t_{i+k+1} through the shared output head. The embedding
and the head are the main model's (shared, not owned here). The sequence shrinks by one position
per depth, so every prediction has a target.
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
        """h_prev: h^{k-1} at positions 0..T-1; emb_next: Emb(t_{i+k}) at the same positions.
        Returns h^k (B, T, D) before the final norm."""
        x = self.eh_proj(torch.cat([self.hnorm(h_prev_BTD), self.enorm(emb_next_BTD)], dim=-1))
        return self.block(x, cos, sin)
