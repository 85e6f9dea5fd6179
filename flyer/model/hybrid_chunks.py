"""Query-chunked evaluation of DeepSeek-V4's hybrid attention (``flyer.model.hybrid``) for long sequences.

Query t sees the window's tokens (t - W, t] and the compressed entries i < (t + 1) // r. So the C queries
[s, s + C) of a chunk need only the band of tokens [s - W + 1, s + C) and the first (s + C) // r entries: their
scores are (B, H, C, C + W - 1 + N_c) instead of the whole sequence's (B, H, T, T + N), and CSA's indexer scores
(B, C, index heads, N_c) instead of (B, T, index heads, N).

``chunked_attention`` runs a per-chunk attention function (``HybridAttention.attend``: one implementation of the
maths) chunk by chunk. With one chunk it is that function on the whole sequence, the eager computation and the
oracle; without gradient it loops; under autograd ``_Recompute`` keeps only the inputs (q, the tokens' keys, the
entries) and each chunk's visibility mask, and recomputes a chunk's scores in backward: saved state
O(T (H d + W + C + N)) rather than O(H T (T + N)).

Shapes: B batch, T tokens, H heads, d head_dim, W window, r compress ratio, N entries (T // r), C chunk rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

# Query rows per chunk unless the window is wider or the memory budget binds: each query scores C + W - 1 band
# keys to see W of them, so wider chunks add work; narrower ones, per-chunk overhead. On 2 CPU cores at T = 4096
# (tiny-v4, 4 heads) 128 rows ran fastest of 32 .. 1024, CSA and HCA alike (docs/performance.md).
CHUNK_ROWS = 128
# Bytes the score tensors of one chunk may take: at T = 8192, 64 heads, window 128, CSA's 2048 entries and 64
# index heads it allows 235 queries for one batch row, 61 for four; the whole sequence's FP32 scores would take
# 21 GB per row and copy.
SCORE_BUDGET_BYTES = 1 << 30
# FP32 score-shaped tensors alive at once while a chunk is recomputed with autograd: the scores, the masked
# scores with the sink column, the probabilities and a gradient of them.
LIVE_SCORE_COPIES = 4


@dataclass(frozen=True)
class Span:
    """One chunk: queries [start, stop), which see the tokens [key_start, stop) and the entries [0, n_entries)."""

    start: int
    stop: int
    key_start: int
    n_entries: int

    @property
    def n_keys(self) -> int:
        """The band's tokens (the entries follow them in the chunk's keys)."""
        return self.stop - self.key_start


def query_chunk(batch: int, T: int, n_heads: int, window: int, n_entries: int, index_heads: int = 0,
                rows: int = CHUNK_ROWS, budget_bytes: int = SCORE_BUDGET_BYTES) -> int:
    """Query rows per chunk: ``rows`` (the window if wider), at most T, and at most the largest C whose score
    tensors, ``LIVE_SCORE_COPIES`` FP32 copies of the attention's (B, H, C, C + W + N) and the indexer's
    (B, C, index_heads, N), fit ``budget_bytes`` (a quadratic in C: a C^2 + b C <= budget); at least 1."""
    a = LIVE_SCORE_COPIES * 4 * batch * n_heads
    b = LIVE_SCORE_COPIES * 4 * batch * (n_heads * (window + n_entries) + index_heads * n_entries)
    fits = (math.isqrt(b * b + 4 * a * budget_bytes) - b) // (2 * a)
    return max(1, min(T, max(rows, window), fits))


def spans(T: int, chunk: int, window: int, ratio: int) -> list[Span]:
    """The chunks of ``chunk`` queries (the last one shorter) covering T positions, for a window of ``window``
    tokens and entries of ``ratio`` tokens (0: none). ValueError naming ``chunk`` when it is below 1."""
    if chunk < 1:
        raise ValueError(f"chunk: query rows per chunk must be >= 1 (got {chunk})")
    N = T // ratio if ratio else 0
    return [Span(s, min(s + chunk, T), max(0, s - window + 1), min(N, min(s + chunk, T) // ratio) if ratio else 0)
            for s in range(0, T, chunk)]


def span_visible(span: Span, window: int, ratio: int, device=None) -> torch.Tensor:
    """Bool (C, n_keys + n_entries), True = visible: query t sees token j of the band when t - window < j <= t,
    and entry i once its window is complete, i < (t + 1) // ratio."""
    t = torch.arange(span.start, span.stop, device=device).view(-1, 1)
    j = torch.arange(span.key_start, span.stop, device=device).view(1, -1)
    band = (j <= t) & (j > t - window)
    if span.n_entries == 0:
        return band
    complete = torch.arange(span.n_entries, device=device).view(1, -1) < (t + 1) // ratio
    return torch.cat([band, complete], dim=-1)


def span_keys(span: Span, kv_BT1d: torch.Tensor, entries_BNd: torch.Tensor) -> torch.Tensor:
    """The chunk's keys (B, n_keys + n_entries, 1, d): its band of the tokens' keys, then its entries."""
    return _keys(kv_BT1d[:, span.key_start:span.stop], entries_BNd[:, :span.n_entries])


def _keys(band_BS1d: torch.Tensor, entries_BNd: torch.Tensor) -> torch.Tensor:
    """The band's keys, then the entries' (if any) as keys of the one head."""
    return torch.cat([band_BS1d, entries_BNd.unsqueeze(2)], dim=1) if entries_BNd.shape[1] else band_BS1d


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def chunked_attention(attend: Attend, plan: list[Span], q_BTHd: torch.Tensor, kv_BT1d: torch.Tensor,
                      entries_BNd: torch.Tensor, visible: list[torch.Tensor],
                      params: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """(B, T, H, d): ``attend(q, keys, visible)`` of each chunk of ``plan`` (its queries of q, ``span_keys``, its
    mask (B, C, n_keys + n_entries) in ``visible``), concatenated. ``params``: the tensors ``attend`` uses besides
    its arguments (the sinks), for their gradients. One chunk: ``attend`` on the whole sequence, as it is (the
    eager oracle); under autograd, several chunks are recomputed in backward (``_Recompute``)."""
    if len(plan) == 1:
        return attend(q_BTHd, span_keys(plan[0], kv_BT1d, entries_BNd), visible[0])
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q_BTHd, kv_BT1d, entries_BNd, *params)):
        return _Recompute.apply(attend, plan, len(params), q_BTHd, kv_BT1d, entries_BNd, *params, *visible)
    return torch.cat([attend(q_BTHd[:, s.start:s.stop], span_keys(s, kv_BT1d, entries_BNd), m)
                      for s, m in zip(plan, visible)], dim=1)


class _Recompute(torch.autograd.Function):
    """``chunked_attention`` under autograd: forward runs the chunks without a graph and saves its inputs and the
    masks; backward recomputes one chunk at a time (under the forward's autocast state) and accumulates the
    gradients of q, the tokens' keys (the bands overlap by W - 1 tokens), the entries and ``params``."""

    @staticmethod
    def forward(ctx, attend: Attend, plan: list[Span], n_params: int, q, kv, entries, *rest):
        params, visible = rest[:n_params], rest[n_params:]
        ctx.attend, ctx.plan, ctx.params = attend, plan, params
        dev = q.device.type
        ctx.autocast = dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)
        ctx.save_for_backward(q, kv, entries, *visible)
        return torch.cat([attend(q[:, s.start:s.stop], span_keys(s, kv, entries), m)
                          for s, m in zip(plan, visible)], dim=1)

    @staticmethod
    def backward(ctx, grad_BTHd):
        q, kv, entries, *visible = ctx.saved_tensors
        need_q, need_kv, need_e = ctx.needs_input_grad[3:6]
        need_p = ctx.needs_input_grad[6:6 + len(ctx.params)]
        g_q = torch.zeros_like(q) if need_q else None
        g_kv = torch.zeros_like(kv) if need_kv else None
        g_e = torch.zeros_like(entries) if need_e else None
        g_p = [torch.zeros_like(p) if need else None for p, need in zip(ctx.params, need_p)]
        dev, enabled, dtype = ctx.autocast
        for s, m in zip(ctx.plan, visible):
            q_c = q[:, s.start:s.stop].detach().requires_grad_(need_q)
            kv_c = kv[:, s.key_start:s.stop].detach().requires_grad_(need_kv)
            e_c = entries[:, :s.n_entries].detach().requires_grad_(need_e)
            with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
                o = ctx.attend(q_c, _keys(kv_c, e_c), m)
            # (input of the recomputation, its gradient's buffer, the rows it covers there; None: all)
            parts = [(q_c, g_q, slice(s.start, s.stop)), (kv_c, g_kv, slice(s.key_start, s.stop)),
                     (e_c, g_e, slice(0, s.n_entries))] + [(p, g, None) for p, g in zip(ctx.params, g_p)]
            parts = [part for part in parts if part[1] is not None]
            grads = torch.autograd.grad(o, [t for t, _, _ in parts], grad_BTHd[:, s.start:s.stop], allow_unused=True)
            for (_, g, rows), dt in zip(parts, grads):
                if dt is not None:
                    (g if rows is None else g[:, rows]).add_(dt)
        return None, None, None, g_q, g_kv, g_e, *g_p, *[None] * len(visible)
