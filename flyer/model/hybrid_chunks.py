"""Query-chunked evaluation of DeepSeek-V4's hybrid attention (``flyer.model.hybrid``) for long sequences.

Query t sees the window's tokens (t - W, t] and the compressed entries i < (t + 1) // r. So the C queries
[s, s + C) of a chunk need only the band of tokens [s - W + 1, s + C) and the first (s + C) // r entries: their
scores are (B, H, C, C + W - 1 + N_c) instead of the whole sequence's (B, H, T, T + N), and CSA's indexer scores
(B, C, index heads, N_c) instead of (B, T, index heads, N).

A CSA chunk whose queries may see more than ``GATHER_OVER`` x index_topk entries does not score them all to mask
the unselected: it gathers each query's k picks ((B, C, k, d) from the entries (B, N, d); its visibility a
``Gathered``: the band's mask and the picks' indices) and scores [band (B, H, C, C + W - 1) | picks (B, H, C, k) |
sink] in one softmax, so CSA's attention costs O(T k), not O(T N) (its indexer still scores every entry: it must,
to choose).

``chunked_attention`` runs a per-chunk attention function (``HybridAttention.attend``: one implementation of the
maths, masked or gathered) chunk by chunk. With one chunk it is that function on the whole sequence, the eager
computation and the oracle (masked); without gradient it loops; under autograd ``_Recompute`` keeps only the
inputs (q, the tokens' keys, the entries) and each chunk's visibility (a mask, or a band mask and picks), and
recomputes a chunk's scores in backward (a gathering chunk's gather too): saved state O(T (H d + W + C + N)), or
O(T (H d + W + C + k)) where CSA chunks gather, rather than O(H T (T + N)).

Shapes: B batch, T tokens, H heads, d head_dim, W window, r compress ratio, N entries (T // r), C chunk rows,
k entries a CSA query keeps (index_topk).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

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
# A CSA chunk gathers its queries' entries once it may see more than this many times index_topk: below it, one
# GEMM over all the chunk's entries costs less than the gather and the per-query products (docs/performance.md).
GATHER_OVER = 4
# Copies of a gathering chunk's (B, C, k, d) entries alive at once with autograd: the gathered ones, their gradient.
GATHERED_COPIES = 2


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
                rows: int = CHUNK_ROWS, budget_bytes: int = SCORE_BUDGET_BYTES, topk: int = 0,
                head_dim: int = 0) -> int:
    """Query rows per chunk: ``rows`` (the window if wider), at most T, and at most the largest C whose score
    tensors, ``LIVE_SCORE_COPIES`` FP32 copies of the attention's (B, H, C, C + W + N) and the indexer's
    (B, C, index_heads, N), fit ``budget_bytes`` (a quadratic in C: a C^2 + b C <= budget); at least 1.
    ``topk`` > 0 (a CSA layer whose last chunks gather, ``gathers``): the attention scores at most
    ``GATHER_OVER`` topk entries per query (the chunks that still mask see no more, the gathering ones topk),
    plus ``GATHERED_COPIES`` FP32 copies of the gathered (B, C, topk, ``head_dim``) entries."""
    scored = min(n_entries, GATHER_OVER * topk) if topk else n_entries
    a = LIVE_SCORE_COPIES * 4 * batch * n_heads
    b = (LIVE_SCORE_COPIES * 4 * batch * (n_heads * (window + scored) + index_heads * n_entries)
         + GATHERED_COPIES * 4 * batch * topk * head_dim)
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


def gathers(n_entries: int, topk: int) -> bool:
    """Whether queries that may see ``n_entries`` entries, of which an indexer keeps ``topk`` (0: every one),
    gather their picks rather than mask the others: past ``GATHER_OVER`` topk."""
    return topk > 0 and n_entries > GATHER_OVER * topk


@dataclass(frozen=True)
class Gathered:
    """A gathering chunk's visibility (B rows, C queries): ``band`` bool (B, C, n_keys) over its band's tokens,
    ``picks`` int32 (B, C, k) the entries each query attends to (``entry_picks``; -1: an empty slot)."""

    band: torch.Tensor
    picks: torch.Tensor


def entry_picks(selected_BCN: torch.Tensor, k: int) -> torch.Tensor:
    """int32 (B, C, k): the indices of each query's selected entries (a ``select_topk`` mask, at most k True
    per row), ascending, then -1 in the slots a query seeing fewer than k entries leaves empty."""
    N = selected_BCN.shape[-1]
    order = torch.where(selected_BCN, torch.arange(N, device=selected_BCN.device), N)
    picks = order.topk(min(k, N), dim=-1, largest=False, sorted=True).values
    picks = F.pad(picks, (0, k - picks.shape[-1]), value=N)
    return picks.masked_fill(picks == N, -1).int()


def gather_entries(entries_BNd: torch.Tensor, picks_BCk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(each query's picked entries (B, C, k, d), which slots hold one: bool (B, C, k)); an empty slot holds
    entry 0, for ``attend`` to mask (its probability 0, so it adds nothing, nor gets a gradient)."""
    b = torch.arange(entries_BNd.shape[0], device=entries_BNd.device).view(-1, 1, 1)
    return entries_BNd[b, picks_BCk.clamp(min=0).long()], picks_BCk >= 0


def _keys(band_BS1d: torch.Tensor, entries_BNd: torch.Tensor) -> torch.Tensor:
    """The band's keys, then the entries' (if any) as keys of the one head."""
    return torch.cat([band_BS1d, entries_BNd.unsqueeze(2)], dim=1) if entries_BNd.shape[1] else band_BS1d


# attend(q (B, C, H, d), shared keys (B, S, 1, d), their mask (B, C, S)[, picked entries (B, C, k, d), their
# slots' validity (B, C, k)]) -> (B, C, H, d)
Attend = Callable[..., torch.Tensor]
Visible = torch.Tensor | Gathered


def chunk_attention(attend: Attend, q_BCHd: torch.Tensor, band_BS1d: torch.Tensor, entries_BNd: torch.Tensor,
                    visible: Visible) -> torch.Tensor:
    """``attend`` of one chunk's queries given its band's keys, the entries it may see and its visibility: a mask
    (B, C, n_keys + n_entries) over the band then the entries, or a ``Gathered`` (the entries gathered per query)."""
    if isinstance(visible, Gathered):
        return attend(q_BCHd, band_BS1d, visible.band, *gather_entries(entries_BNd, visible.picks))
    return attend(q_BCHd, _keys(band_BS1d, entries_BNd), visible)


def chunked_attention(attend: Attend, plan: list[Span], q_BTHd: torch.Tensor, kv_BT1d: torch.Tensor,
                      entries_BNd: torch.Tensor, visible: list[Visible],
                      params: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """(B, T, H, d): ``chunk_attention`` of each chunk of ``plan`` (its queries of q, its band of the tokens' keys
    kv, its first n_entries entries, its visibility in ``visible``), concatenated. ``params``: the tensors
    ``attend`` uses besides its arguments (the sinks), for their gradients. One chunk: ``attend`` on the whole
    sequence, as it is (the eager oracle); under autograd, several chunks are recomputed in backward
    (``_Recompute``)."""
    def run(s: Span, m: Visible) -> torch.Tensor:
        return chunk_attention(attend, q_BTHd[:, s.start:s.stop], kv_BT1d[:, s.key_start:s.stop],
                               entries_BNd[:, :s.n_entries], m)

    if len(plan) == 1:
        return run(plan[0], visible[0])
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q_BTHd, kv_BT1d, entries_BNd, *params)):
        layout = [isinstance(m, Gathered) for m in visible]
        flat = [t for m in visible for t in ((m.band, m.picks) if isinstance(m, Gathered) else (m,))]
        return _Recompute.apply(attend, plan, layout, len(params), q_BTHd, kv_BT1d, entries_BNd, *params, *flat)
    return torch.cat([run(s, m) for s, m in zip(plan, visible)], dim=1)


def _unflatten(layout: list[bool], flat: list[torch.Tensor]) -> list[Visible]:
    """The chunks' visibilities from ``chunked_attention``'s flat list (``layout``: which chunks gather)."""
    out, it = [], iter(flat)
    for gathered in layout:
        out.append(Gathered(next(it), next(it)) if gathered else next(it))
    return out


class _Recompute(torch.autograd.Function):
    """``chunked_attention`` under autograd: forward runs the chunks without a graph and saves its inputs and the
    visibilities (masks; a gathering chunk's band mask and picks); backward recomputes one chunk at a time (under
    the forward's autocast state) and accumulates the gradients of q, the tokens' keys (the bands overlap by W - 1
    tokens), the entries (a gathering chunk's through its gather) and ``params``."""

    @staticmethod
    def forward(ctx, attend: Attend, plan: list[Span], layout: list[bool], n_params: int, q, kv, entries, *rest):
        params, flat = rest[:n_params], rest[n_params:]
        ctx.attend, ctx.plan, ctx.layout, ctx.params = attend, plan, layout, params
        dev = q.device.type
        ctx.autocast = dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)
        ctx.save_for_backward(q, kv, entries, *flat)
        return torch.cat([chunk_attention(attend, q[:, s.start:s.stop], kv[:, s.key_start:s.stop],
                                          entries[:, :s.n_entries], m)
                          for s, m in zip(plan, _unflatten(layout, flat))], dim=1)

    @staticmethod
    def backward(ctx, grad_BTHd):
        q, kv, entries, *flat = ctx.saved_tensors
        visible = _unflatten(ctx.layout, flat)
        need_q, need_kv, need_e = ctx.needs_input_grad[4:7]
        need_p = ctx.needs_input_grad[7:7 + len(ctx.params)]
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
                o = chunk_attention(ctx.attend, q_c, kv_c, e_c, m)
            # (input of the recomputation, its gradient's buffer, the rows it covers there; None: all)
            parts = [(q_c, g_q, slice(s.start, s.stop)), (kv_c, g_kv, slice(s.key_start, s.stop)),
                     (e_c, g_e, slice(0, s.n_entries))] + [(p, g, None) for p, g in zip(ctx.params, g_p)]
            parts = [part for part in parts if part[1] is not None]
            grads = torch.autograd.grad(o, [t for t, _, _ in parts], grad_BTHd[:, s.start:s.stop], allow_unused=True)
            for (_, g, rows), dt in zip(parts, grads):
                if dt is not None:
                    (g if rows is None else g[:, rows]).add_(dt)
        return None, None, None, None, g_q, g_kv, g_e, *g_p, *[None] * len(flat)
