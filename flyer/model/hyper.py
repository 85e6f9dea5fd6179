"""Manifold-constrained hyper-connections (mHC; DeepSeek-V4), as transformers' DeepseekV4 computes them.

The residual is ``hc_mult`` = N streams, h (B, T, N, D). Around each attention and FFN block a
``HyperConnection`` reads all streams (RMS-normalised, flattened) and produces three maps: ``pre`` (N)
collapses the streams into the block's input, ``post`` (N) spreads the block's output back over the
streams, and ``comb`` (N, N) mixes the streams themselves, projected towards a doubly stochastic matrix
by Sinkhorn-Knopp iterations so that stacking layers cannot blow the residual up:

    h' = post * block(sum_j pre_j h_j) + comb^T h

``HyperHead`` collapses the streams once more before the final norm. Both compute in FP32 (their
parameters stay FP32: DeepSeek's checkpoints store them so). With autograd, a block's mix is recomputed in
backward from the streams, which are kept anyway (``_recomputed_mix``), as the mHC paper's training recomputes:
what it saves (the normalised FP32 streams, or under BF16 autocast an FP32 copy of the streams and the GEMM's
BF16 copy of the normalised ones, N D each a token) would cost a block more than its streams themselves; torch's
recomputation stops before the mix's GEMM (only its inputs are saved), so it is elementwise. The maps' Sinkhorn
iterations, a few hundred FP32 values a token whatever D, are kept: recomputing them too made a tiny-v4 step on
two CPU cores 1.17x as long (``bench/mhc_recompute.py``). ``HyperHead``'s mix is not recomputed: the last
pipeline stage's loss collapses the stage's output streams, which torch's pipelining detaches in place in its
backward (a recomputation could not read them back), and there is one per head.
"""

from __future__ import annotations

import torch
from torch import nn

from flyer.config import ModelConfig
from flyer.model.lowp import as_dtype, matmul
from flyer.model.recompute import recomputed_if_recorded


def _unit_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim, with no weight (FP32 in, FP32 out)."""
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def _mix(h_BTND: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """(B, T, M): the N streams flattened to N D in FP32, ``_unit_rms``, times ``fn`` (M, N D)^T; ``lowp.matmul``:
    emulated under BF16 autocast where the CPU has no BF16 hardware, else torch's product (not ``lowp.linear``,
    whose prefill split over expert threads would put these M rows on one thread)."""
    B, T, N, D = h_BTND.shape
    x = _unit_rms(as_dtype(h_BTND.reshape(B, T, N * D), torch.float32), eps)
    return matmul(x, as_dtype(fn, torch.float32).t())


def _recomputed_mix(h_BTND: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """``_mix``, with autograd recomputed in backward from h (which the collapse and the streams' update keep
    anyway): what it saves (the normalised streams, the FP32 copy of lower-precision ones) is not kept."""
    return recomputed_if_recorded(_mix, h_BTND, fn, eps)


class HyperConnection(nn.Module):
    """The maps around one block: ``fn`` (N (N + 2), N D), ``base`` (N (N + 2)), ``scale`` (3), the
    names of DeepSeek's checkpoint (``hc_attn_fn`` / ``hc_ffn_fn`` ...)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        N = cfg.hc_mult
        self.n, self.iters, self.eps, self.norm_eps = N, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.norm_eps
        self.fn = nn.Parameter(torch.empty(N * (N + 2), N * cfg.dim, dtype=torch.float32))
        self.base = nn.Parameter(torch.empty(N * (N + 2), dtype=torch.float32))
        self.scale = nn.Parameter(torch.empty(3, dtype=torch.float32))

    def forward(self, h_BTND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(post (B, T, N) FP32, comb (B, T, N, N) FP32, the block's input (B, T, D) in h's dtype)."""
        pre, post, comb = self._maps(h_BTND)
        collapsed = as_dtype((pre.unsqueeze(-1) * h_BTND).sum(dim=2), h_BTND.dtype)
        return post, comb, collapsed

    def _maps(self, h_BTND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pre (B, T, N), post (B, T, N), comb (B, T, N, N)), FP32, from the streams h."""
        B, T, N, D = h_BTND.shape
        mix = _recomputed_mix(h_BTND, self.fn, self.norm_eps)
        pre_w, post_w, comb_w = mix.split([N, N, N * N], dim=-1)
        pre_b, post_b, comb_b = self.base.split([N, N, N * N])
        pre = torch.sigmoid(pre_w * self.scale[0] + pre_b) + self.eps
        post = 2 * torch.sigmoid(post_w * self.scale[1] + post_b)
        comb = torch.softmax(comb_w.view(B, T, N, N) * self.scale[2] + comb_b.view(N, N), dim=-1) + self.eps
        comb = comb / (comb.sum(-2, keepdim=True) + self.eps)  # columns first, then rows and columns in turn
        for _ in range(self.iters - 1):
            comb = comb / (comb.sum(-1, keepdim=True) + self.eps)
            comb = comb / (comb.sum(-2, keepdim=True) + self.eps)
        return pre, post, comb

    @staticmethod
    def expand(h_BTND: torch.Tensor, out_BTD: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """The streams after a block: post * out + comb^T h (comb is not symmetric: stream j feeds stream k
        by comb[j, k]), in h's dtype."""
        dtype = h_BTND.dtype
        return as_dtype(post, dtype).unsqueeze(-1) * out_BTD.unsqueeze(-2) + matmul(
            as_dtype(comb, dtype).transpose(-1, -2), h_BTND)


class HyperHead(nn.Module):
    """The last collapse of the streams, before the final norm: ``fn`` (N, N D), ``base`` (N), ``scale`` (1)
    (DeepSeek's ``hc_head_fn`` / ``hc_head_base`` / ``hc_head_scale``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        N = cfg.hc_mult
        self.eps, self.norm_eps = cfg.hc_eps, cfg.norm_eps
        self.fn = nn.Parameter(torch.empty(N, N * cfg.dim, dtype=torch.float32))
        self.base = nn.Parameter(torch.empty(N, dtype=torch.float32))
        self.scale = nn.Parameter(torch.empty(1, dtype=torch.float32))

    def forward(self, h_BTND: torch.Tensor) -> torch.Tensor:
        pre = torch.sigmoid(_mix(h_BTND, self.fn, self.norm_eps) * self.scale + self.base) + self.eps
        return as_dtype((pre.unsqueeze(-1) * h_BTND).sum(dim=2), h_BTND.dtype)


@torch.no_grad()
def init_hyper(m: nn.Module, std: float, generator: torch.Generator | None = None) -> None:
    """transformers' init: N(0, std) projections, zero biases, unit scales."""
    m.fn.normal_(0.0, std, generator=generator)
    m.base.zero_()
    m.scale.fill_(1.0)
