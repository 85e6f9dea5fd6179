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

DeepSeek-V4 (``HyperMTPModule``) changes the combination, per its released checkpoints and the engines that
run them (DeepSeek's V4 ``inference/model.py`` ``MTPBlock``, vLLM's ``deepseek_v4_mtp.py``): h^0 is the main
model's hc_mult residual streams (B, T, N, D) as the last block leaves them, before ``hc_head`` and the final
norm; each stream is normed by ``hnorm`` and projected by ``h_proj`` (D, D), and ``e_proj(enorm(Emb))`` is
added to every stream. The block (window-only attention, a learned-routed MoE, its hyper-connections) maps
streams to streams; the head reads the module's own ``hc_head`` collapse of them, then ``norm``. A deeper
module takes the previous module's streams, as vLLM chains its drafts.
"""

from __future__ import annotations

import torch
from torch import nn

from flyer.config import ModelConfig
from flyer.model.hyper import HyperHead
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
                sin: torch.Tensor, docs=None) -> torch.Tensor:
        """h_prev: h^{k-1} at positions 0..T-1 (h^0: after the main model's final norm);
        emb_next: Emb(t_{i+k}) at the same positions. Returns h^k (B, T, D) before the final norm. ``docs``: packed
        rows' ``flyer.model.documents.Documents`` of these positions, each attending to itself."""
        return self.block(self.project(h_prev_BTD, emb_next_BTD), cos, sin, docs=docs)

    def project(self, h_prev_BTD: torch.Tensor, emb_next_BTD: torch.Tensor) -> torch.Tensor:
        """eh_proj([enorm(emb); hnorm(h)]) (B, T, D): the checkpoints' order (module doc)."""
        return self.eh_proj(torch.cat([self.enorm(emb_next_BTD), self.hnorm(h_prev_BTD)], dim=-1))

    def head_input(self, h_BTD: torch.Tensor) -> torch.Tensor:
        """What the shared head reads of h^k (B, T, D): norm(h^k)."""
        return self.norm(h_BTD)


class HyperMTPModule(nn.Module):
    """DeepSeek-V4's MTP module (module doc): ``e_proj`` / ``h_proj`` (D, D), ``enorm`` / ``hnorm`` / ``norm``,
    its own ``hc_head`` (with hyper-connections), and a block attending by the sliding window only. The names
    are the checkpoint's under ``mtp.k`` (the block's as a decoder layer's: ``flyer.interop.hf_names``)."""

    def __init__(self, cfg: ModelConfig, block: nn.Module):
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.e_proj = Linear(cfg.dim, cfg.dim, bias=False)
        self.h_proj = Linear(cfg.dim, cfg.dim, bias=False)
        self.block = block
        if cfg.hc_mult > 1:
            self.hc_head = HyperHead(cfg)
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)  # after hc_head, before the shared head

    def forward(self, h_prev: torch.Tensor, emb_next_BTD: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, docs=None) -> torch.Tensor:
        """h_prev: h^{k-1} at positions 0..T-1, streams (B, T, N, D) (h^0: the main model's last residual, before
        ``hc_head``), or (B, T, D) with hc_mult 1; emb_next: Emb(t_{i+k}) (B, T, D). Returns h^k, h_prev's shape.
        ``docs``: packed rows' ``flyer.model.documents.Documents`` of these positions, each attending to itself."""
        return self.block(self.project(h_prev, emb_next_BTD), cos, sin, docs=docs)

    def project(self, h_prev: torch.Tensor, emb_next_BTD: torch.Tensor) -> torch.Tensor:
        """h_proj(hnorm(h)) per stream plus e_proj(enorm(emb)) added to every stream: h_prev's shape."""
        e = self.e_proj(self.enorm(emb_next_BTD))
        return self.h_proj(self.hnorm(h_prev)) + (e.unsqueeze(2) if h_prev.dim() == 4 else e)

    def head_input(self, h: torch.Tensor) -> torch.Tensor:
        """What the shared head reads of h^k: norm(hc_head(streams)) (B, T, D), or norm(h) with hc_mult 1."""
        return self.norm(self.hc_head(h) if h.dim() == 4 else h)
