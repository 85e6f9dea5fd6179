"""Attention against a decode cache: absorbed MLA, naive MLA and GQA.

All three take the normed block input ``x`` (B, T, D) of T new tokens per row and their
``Rows`` (positions ``pos`` (B, T), row b at ``start_b .. start_b + T - 1``, with their rope
tables and causal mask, made once per forward), write what they cache at those slots, and attend
causally over slots ``[0, pos]``. The training path (``MLA.forward`` / ``GQA.forward``,
full causal attention without a cache) is the oracle they are tested against.

Absorbed MLA (DeepSeek-V2 section 2.1.3): with ``wkv_b`` viewed as (H, nope + v, C),
    score_hts = (q_nope_h W_UK_h) . c_s + q_rope_h . k_rope_s
    out_h     = W_UV_h^T (sum_s p_hts c_s)
so keys and values are never up-projected: the query absorbs W_UK, the output W_UV, and the
only per-token state is (c_s, k_rope_s), shared by every head.

Prefill chunks take the compute-bound form instead (DeepSeek-V3 serves that way): the latents
of every attended slot are up-projected to per-head keys and values and one fused attention
(SDPA) runs over them, never materialising (H x T x S) FP32 scores; the latents are cached all
the same. ``dense_prefill_pays`` picks the form by arithmetic, once per call.

Softmax probabilities below FP32's smallest normal are set to zero: over long contexts many
underflow into subnormals, and a GEMM with subnormal operands runs tens of times slower on x86
(``bench/denormals.py``). Each such probability adds less than 2^-126 |c| to a sum of normal
terms, below their rounding, so the results are unchanged (``tests/test_infer.py``).

DeepSeek Sparse Attention (V3.2, ``dsa_absorbed`` / ``dsa_naive``): each token's indexer key is
cached with its latent (or keys and values); once some query of a call sees more than
``index_topk`` slots, the indexer scores the attended slots' cached keys for the new tokens and each
query attends to its ``index_topk`` best only, as ``MLA.forward`` does on the whole sequence. Below
that every query keeps all its slots, and the call runs as dense MLA's. GLM-5's shared layers
(``MLA.shares_selection``) cache no indexer key and attend to the selection the last full layer of
the same forward left in ``Rows.selected``. Where it costs less (``dsa_gather_pays``: decode steps past a
short context, prefill chunks over a long prompt) each query reads and scores its k selected latents only, gathered
from the cache by slot (``dsa_gathered``: k per query, not S), a prefill chunk's queries in sub-chunks within
``GATHER_BUDGET`` bytes; other calls attend over every slot with the unselected masked (``dsa_masked``, the oracle,
in the form ``dense_prefill_pays`` picks).
The indexer of a decode-shaped call on the CPU scores the cached index keys where they lie, BF16, FP32 or FP8
(``dsa_index_scores``), rather than a new FP32 copy of them.

GQA (``gqa_cached``) scores a decode step (one new token) eagerly; more new tokens (prefill chunks, MTP drafts) run one
fused attention reading the KV heads grouped (``_fused_grouped``), never (H x T x S) FP32 scores: a whole prompt in
one forward costs memory in T, not T^2 (``bench/gqa_prefill.py``). A sliding GQA layer past its window reads each
row's last window + T - 1 slots alone (``Rows.window_read``), so its decode step costs the window, not the context
(``bench/window_decode.py``).

Shapes: B rows, T new tokens, S attended slots, H heads, C kv_lora_rank, R rope dim.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from flyer import kernels
from flyer.infer import indexer_fp8
from flyer.infer.cache import KVCache, LatentCache
from flyer.infer.cache_fp8 import FP8
from flyer.model.attention import causal_attention, windowed_attention
from flyer.model.dsa_chunks import absorbed_attend, absorbed_weight
from flyer.model.hybrid_chunks import entry_picks
from flyer.model.lowp import as_dtype

FP32_TINY = torch.finfo(torch.float32).tiny  # smallest normal FP32, 2^-126


def causal_slot_mask(pos_BT: torch.Tensor, n_slots: int, first: int = 0) -> torch.Tensor:
    """(B, 1, T, S) bool: slot s is visible to the query in slot p iff first <= s <= p."""
    slots = torch.arange(n_slots, device=pos_BT.device)
    visible = slots.view(1, 1, -1) <= pos_BT.unsqueeze(-1)
    return (visible & (slots >= first) if first else visible).unsqueeze(1)


@dataclass
class Rows:
    """Where a batch's new tokens sit, shared by every layer of one forward: their cache slots
    ``pos`` (B, T), the rope tables at their positions (B, T, 1, R), the slots attended (``n_slots``
    = max slot + 1) and the causal mask (B, 1, T, n_slots; made on first use where not given: a whole prompt's
    first chunk needs none, its fused attention applies it, and T x n_slots bools grow as the square of a long
    prompt). A slot is the token's position, or the
    position + ``first`` in a cache whose first ``first`` slots hold nothing (the server's MTP
    cache: ``flyer.serve.speculation``, ``flyer.serve.graphs``). ``selected``: DSA's selection
    (``dsa_selection``) of the last layer with an indexer in this forward, which GLM-5's shared layers after it
    attend to."""

    pos: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    n_slots: int
    given_mask: torch.Tensor | None = None
    first: int = 0
    selected: torch.Tensor | None = None
    _picks: tuple = field(default=(), init=False, repr=False, compare=False)  # (selected, slots, valid)
    _windows: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # window -> its mask

    @property
    def mask(self) -> torch.Tensor:
        """(B, 1, T, n_slots) bool: the one given, else slot s visible to the query in slot p iff first <= s <= p."""
        if self.given_mask is None:
            self.given_mask = causal_slot_mask(self.pos, self.n_slots, self.first)
        return self.given_mask

    def selected_slots(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``selected`` as each query's slots (B, T, k) int64, ascending, and which of them hold a selected
        one (B, T, k) bool: exactly the mask's set, ties included. A query seeing fewer than k slots leaves
        the rest empty, naming its own slot (written, so finite) for the attention to mask. Derived once per
        selection: GLM-5's shared layers reuse their full layer's."""
        if not self._picks or self._picks[0] is not self.selected:
            picks = entry_picks(self.selected[:, 0], k)  # from slot ``first`` on; -1: empty
            valid = picks >= 0
            slots = torch.where(valid, picks.long() + self.first, self.pos.unsqueeze(-1))
            self._picks = (self.selected, slots, valid)
        return self._picks[1], self._picks[2]

    @functools.cached_property
    def from_slot_zero(self) -> bool:
        """Whether every row's T tokens sit in slots 0 .. T - 1 (a prompt's first chunk, nothing
        cached before it): the mask is then plain causal attention's, which ATen's fused kernel
        applies by skipping the blocks above the diagonal, with the same bits. Once per forward,
        not per layer."""
        T = self.pos.shape[1]
        return self.first == 0 and self.n_slots == T and not bool(self.pos[:, 0].any())

    def window_mask(self, window: int) -> torch.Tensor:
        """``mask`` less the slots ``window`` or more before each query's (a sliding-window layer's: slot s visible
        iff p - window < s <= p); made once per forward, the layers of one window sharing it."""
        if window not in self._windows:
            slots = torch.arange(self.n_slots, device=self.pos.device)
            self._windows[window] = self.mask & (slots.view(1, 1, -1) > self.pos.unsqueeze(-1) - window).unsqueeze(1)
        return self._windows[window]

    def window_read(self, window: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A sliding layer's read, where narrower than every slot from ``first``: (slots (B, S_w) int64, mask
        (B, 1, T, S_w)), row b reading the S_w = window + T - 1 slots from its first query's window on (from
        ``first`` where that is later), so a decode step costs the window, not the context. A row's positions run
        on from its first, as ``Decoder`` makes them (its padding clamped at the end), so each query's whole window
        lies in its row's span; a span slot past ``n_slots`` (a row whose padding runs to the end) is read clamped and
        masked. None where the span is no narrower (``window_mask`` over every slot). Made once per forward."""
        if ("read", window) not in self._windows:
            T, first = self.pos.shape[1], self.first
            width = window + T - 1
            span = None
            if width < self.n_slots - first:
                lo_B = (self.pos.amin(dim=1) - window + 1).clamp(min=first)
                slots = lo_B.view(-1, 1) + torch.arange(width, device=self.pos.device)
                s, p = slots.view(-1, 1, 1, width), self.pos.view(-1, 1, T, 1)
                # the causal mask's and the window's rule from the positions, no mask over every slot made (lo_B >=
                # first; a slot past n_slots is past every query's own)
                span = slots, (s <= p) & (s > p - window)
            self._windows["read", window] = span
        return self._windows["read", window]

    def attended(self, kv: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``kv`` (slots on ``dim``) and the mask from slot ``first`` on. The slots before hold
        nothing; leaving them out of the sums, not just masking them, keeps the sums' shapes, so
        their bits: a masked extra key changes how an SIMD softmax groups the others (AVX2)."""
        return self.own(kv, dim), self.attended_mask

    @property
    def attended_mask(self) -> torch.Tensor:
        """``attended``'s mask alone: from slot ``first`` on."""
        return self.mask[..., self.first:]

    def own(self, kv: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """``attended``'s ``kv`` alone (no mask made)."""
        return kv.narrow(dim, self.first, kv.shape[dim] - self.first)


def _softmax(scores_BHTS: torch.Tensor, mask_B1TS: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Masked FP32 softmax, subnormal probabilities flushed to zero (see the module docstring)."""
    # where, not masked_fill: the same values, and 1.6-3x faster on CPUs with the mask broadcast over heads
    p = torch.where(mask_B1TS, as_dtype(scores_BHTS, torch.float32), float("-inf")).softmax(dim=-1)
    if p.device.type == "cpu":  # subnormal arithmetic is slow on CPUs, not on GPUs
        p.masked_fill_(p < FP32_TINY, 0.0)
    return as_dtype(p, dtype)


def dense_prefill_pays(attn: nn.Module, T: int) -> bool:
    """True when T queries cost fewer multiply-adds in the compute-bound form than absorbed: per
    attended slot, dense up-projects once (C (nope + v) H) and attends T (nope + R + v) H; absorbed
    attends T (2C + R) H (scores against [c | k_rope], then p @ c)."""
    C, nope, v, R = attn.kv_lora_rank, attn.qk_nope_head_dim, attn.v_head_dim, attn.qk_rope_head_dim
    return T > 1 and C * (nope + v) + T * (nope + R + v) < T * (2 * C + R)


# multiply-adds' worth of the dozen small ops that pick and gather the slots (``Rows.selected_slots``, the gather,
# the per-query layout): a CPU core spends ~110 us more on them than on the masked path's, what it takes for
# 2M multiply-adds of attention (bench/decode.py --dsa-only; measured crossover S ~ 730 + 1.2 k at B = 1); paid
# once per sub-chunk of a gathered prefill chunk
GATHER_FIXED = 2_000_000
# bytes a gathered sub-chunk's per-query tensors may take (its k latents, k (C + R) in the compute dtype, and FP32
# scores and probabilities, 2 H k): all 256 queries of a V3.2 prefill chunk at once would take 1.7 GB in FP32, and
# a sub-chunk that stays in the last-level cache between the gather and the products reading it runs faster: the
# bench model's 256 queries (28 MiB) 1.25x slower than 32-64 (3.5-7 MiB; 4 queries: 2x slower, GATHER_FIXED each)
# on a 32 MiB-L3 core (bench/decode.py --dsa-prefill, docs/performance.md)
GATHER_BUDGET = 8 << 20
# a multiply-add of the compute-bound form's fused attention (SDPA over up-projected keys) costs about a third of a
# gathered one's (per-query (H, C + R) @ (C + R, k) products, the picks' layout): one layer's prefill chunk on a CPU
# core, the bench model's, crossed over at S ~ 1,050 for T = 128 and ~ 1,450 for 256, ratios 3.1 and 3.6
DENSE_OVER_GATHERED = 3


def gather_rows(attn: nn.Module, B: int, itemsize: int) -> int:
    """Queries per sub-chunk of a gathered call (``dsa_gathered``) of B rows gathering latents of ``itemsize``
    bytes: as many as ``GATHER_BUDGET`` holds, at least one."""
    per_query = B * attn.index_topk * ((attn.kv_lora_rank + attn.qk_rope_head_dim) * itemsize + 8 * attn.n_heads)
    return max(1, GATHER_BUDGET // per_query)


def dsa_gather_pays(attn: nn.Module, B: int, T: int, S: int, itemsize: int = 4) -> bool:
    """True when B x T queries against the decode cache (a decode step or a prefill chunk) with a DSA selection over
    S attended slots cost fewer multiply-adds reading their ``index_topk`` (k) slots gathered (``dsa_gathered``, in
    sub-chunks of ``gather_rows`` queries, latents of ``itemsize`` bytes) than what ``dsa_masked`` runs for T:
    gathered, k ((2C + R) H + C + R) per query (scores, p @ c, the gather's copy) plus ``GATHER_FIXED`` per
    sub-chunk; masked, in the compute-bound form (``dense_prefill_pays``) S H (C (nope + v) + T (nope + R + v)) per
    row (the up-projection of every slot, then fused attention over all S) at ``DENSE_OVER_GATHERED`` times the
    gathered multiply-adds' speed, else absorbed S (2C + R) H per query."""
    C, R, H, k = attn.kv_lora_rank, attn.qk_rope_head_dim, attn.n_heads, attn.index_topk
    sub_chunks = -(-T // gather_rows(attn, B, itemsize))
    gathered = B * T * k * ((2 * C + R) * H + C + R) + sub_chunks * GATHER_FIXED
    if dense_prefill_pays(attn, T):
        nope, v = attn.qk_nope_head_dim, attn.v_head_dim
        return DENSE_OVER_GATHERED * gathered < B * S * H * (C * (nope + v) + T * (nope + R + v))
    return gathered < B * T * S * (2 * C + R) * H


def mla_absorbed(attn: nn.Module, x_BTD: torch.Tensor, rows: Rows, cache: LatentCache, layer: int) -> torch.Tensor:
    """MLA against latents: absorbed (decode) or compute-bound (prefill chunks, by
    ``dense_prefill_pays``); either way the new tokens' latents are written to ``cache``.
    Returns (B, T, D)."""
    B, T, _ = x_BTD.shape
    q_nope, q_rope = attn.queries(x_BTD, rows.cos, rows.sin)  # (B,T,H,nope), (B,T,H,R)
    c_kv, k_rope = attn.latents(x_BTD, rows.cos, rows.sin)  # (B,T,C), (B,T,R)
    cache.write(layer, rows.pos, latent=c_kv, rope_key=k_rope)
    o = _latent_attention(attn, q_nope, q_rope, rows, cache, layer)
    return attn.wo(o.reshape(B, T, attn.n_heads * attn.v_head_dim))


def _latent_attention(attn: nn.Module, q_nope: torch.Tensor, q_rope: torch.Tensor, rows: Rows, cache,
                      layer: int) -> torch.Tensor:
    """Causal attention (B, T, H, v) of the queries over the latents ``rows`` see in ``cache``, in
    the form ``dense_prefill_pays`` picks."""
    if dense_prefill_pays(attn, q_nope.shape[1]):
        kv_BSK = rows.own(cache.read_packed(layer, rows.n_slots, q_nope.dtype))  # [c | k_rope]
        return mla_dense_core(attn, q_nope, q_rope, kv_BSK, None if rows.from_slot_zero else rows.attended_mask)
    return mla_absorbed_cached(attn, q_nope, q_rope, cache, layer, rows)


def dsa_absorbed(attn: nn.Module, x_BTD: torch.Tensor, rows: Rows, cache: LatentCache, layer: int) -> torch.Tensor:
    """``mla_absorbed`` with DeepSeek Sparse Attention (``attn.indexer``): the new tokens' indexer keys
    are cached with their latents, and where some query sees more than ``index_topk`` slots each
    query attends to its selected ones only (``dsa_selection``): their latents gathered
    (``dsa_gathered``, in sub-chunks of queries) where ``dsa_gather_pays``, decode steps and prefill chunks
    alike, else every slot read and the rest masked (``dsa_masked``). Returns (B, T, D)."""
    B, T, _ = x_BTD.shape
    q_latent = attn.query_latent(x_BTD)  # (B, T, q_lora_rank): MLA's queries and the indexer's
    q_nope, q_rope = attn.queries(x_BTD, rows.cos, rows.sin, q_latent)
    c_kv, k_rope = attn.latents(x_BTD, rows.cos, rows.sin)
    cache.write(layer, rows.pos, latent=c_kv, rope_key=k_rope)
    if _selected(attn, x_BTD, q_latent, rows, cache) is None:
        o = _latent_attention(attn, q_nope, q_rope, rows, cache, layer)
    elif dsa_gather_pays(attn, B, T, rows.n_slots - rows.first, q_nope.element_size()):
        o = dsa_gathered(attn, q_nope, q_rope, rows, cache, layer)
    else:
        o = dsa_masked(attn, q_nope, q_rope, rows, cache, layer)
    return attn.wo(o.reshape(B, T, attn.n_heads * attn.v_head_dim))


def dsa_gathered(attn: nn.Module, q_nope: torch.Tensor, q_rope: torch.Tensor, rows: Rows, cache, layer: int,
                 sub_chunk: int | None = None) -> torch.Tensor:
    """Attention (B, T, H, v) of each query over the latents of its selected slots only (``rows.selected``):
    [c | k_rope] (B, t, k, C + R) gathered by slot from ``cache`` (contiguous or paged) for ``sub_chunk`` queries
    at a time (None: ``gather_rows``, within ``GATHER_BUDGET``), each sub-chunk only its own queries' picks, then
    ``dsa_gathered_core``. ``dsa_masked`` is its oracle."""
    B, T = q_nope.shape[:2]
    slots_BTk, valid_BTk = rows.selected_slots(attn.index_topk)
    n = sub_chunk or gather_rows(attn, B, q_nope.element_size())
    w_HXC = absorbed_weight(attn, q_nope.dtype)  # once for every sub-chunk
    outs = [dsa_gathered_core(attn, q_nope[:, s:s + n], q_rope[:, s:s + n],
                              cache.gather_packed(layer, slots_BTk[:, s:s + n], q_nope.dtype), valid_BTk[:, s:s + n],
                              w_HXC)
            for s in range(0, T, n)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def dsa_masked(attn: nn.Module, q_nope: torch.Tensor, q_rope: torch.Tensor, rows: Rows, cache,
               layer: int) -> torch.Tensor:
    """Attention (B, T, H, v) over every attended slot with the unselected masked (``rows.selected``), in the
    form ``dense_prefill_pays`` picks (the fused kernel ``mla_absorbed_cached`` takes no mask)."""
    kv_BSK = rows.own(cache.read_packed(layer, rows.n_slots, q_nope.dtype))
    core = mla_dense_core if dense_prefill_pays(attn, q_nope.shape[1]) else mla_absorbed_core
    return core(attn, q_nope, q_rope, kv_BSK, rows.selected)


def dsa_gathered_core(attn: nn.Module, q_nope: torch.Tensor, q_rope: torch.Tensor, kv_BTkK: torch.Tensor,
                      valid_BTk: torch.Tensor, w_HXC: torch.Tensor | None = None) -> torch.Tensor:
    """``mla_absorbed_core`` with keys per query: q_nope (B,T,H,nope), q_rope (B,T,H,R), each query's own
    [c | k_rope] (B, T, k, C + R), of which ``valid`` (B, T, k) bool are attended. Returns (B, T, H, v). The
    training path's sparse MLA (``flyer.model.dsa_chunks.absorbed_attend``), subnormal probabilities flushed on
    the CPU as ``_softmax`` does; ``w_HXC``: its ``absorbed_weight``, cast once by a caller of several calls."""
    return absorbed_attend(attn, torch.cat([q_nope, q_rope], dim=-1), kv_BTkK, valid_BTk,
                           flush=q_nope.device.type == "cpu", w_HXC=w_HXC)


def _selected(attn: nn.Module, x_BTD: torch.Tensor, q_latent_BTR: torch.Tensor, rows: Rows,
              cache) -> torch.Tensor | None:
    """The DSA layer's selection: a shared layer's the one ``rows`` holds; a full layer caches the new tokens'
    indexer keys (its row ``attn.index_row``), selects (``dsa_selection``) and leaves it in ``rows``."""
    if attn.shares_selection:
        return rows.selected
    cache.write(attn.index_row, rows.pos, index_key=attn.indexer.keys(x_BTD, rows.cos, rows.sin))
    rows.selected = dsa_selection(attn, x_BTD, q_latent_BTR, rows, cache)
    return rows.selected


def dsa_selection(attn: nn.Module, x_BTD: torch.Tensor, q_latent_BTR: torch.Tensor, rows: Rows,
                  cache) -> torch.Tensor | None:
    """DeepSeek Sparse Attention's mask over the attended slots (``Rows.attended``): (B, 1, T, S) bool,
    causal and among each query's ``index_topk`` slots of highest index score, scored against the
    indexer keys in ``cache`` (row ``attn.index_row``, written for the new tokens already) as
    ``MLA.sparse_mask`` scores them. None when no query sees more than ``index_topk`` slots: each keeps
    all of them, the causal mask."""
    if rows.n_slots - rows.first <= attn.index_topk:
        return None
    scores_BTS = dsa_index_scores(attn, x_BTD, q_latent_BTR, rows, cache)
    return attn.indexer.select(scores_BTS, rows.mask[:, 0, :, rows.first:]).unsqueeze(1)


def dsa_index_scores(attn: nn.Module, x_BTD: torch.Tensor, q_latent_BTR: torch.Tensor, rows: Rows,
                     cache) -> torch.Tensor:
    """The indexer's scores (B, T, S) of the new tokens against the attended slots' cached keys (``Rows.attended``),
    unmasked. A decode-shaped call (not ``dense_prefill_pays``) on the CPU scores the keys in place, BF16 or FP32,
    through the cache's blocks (``kernels.index_scores``); else, and as its oracle, every key is copied into a new
    FP32 tensor and ``Indexer.scores`` runs on it. The two differ only in the order of FP32 sums. A cache of FP8
    index keys (``cache.index_rotation``: ``--cache-dtype fp8``) scores as DeepSeek's released inference code
    (``flyer.infer.indexer_fp8``): rotated, quantized queries over the keys' codes and scales, read in place by the
    same kernel under the same rule, else (the oracle) gathered into FP32 values."""
    fp8 = cache.index_rotation is not None
    pool, tables = _index_key_blocks(cache, attn.index_row)
    if dense_prefill_pays(attn, x_BTD.shape[1]) or not kernels.index_scores_usable(pool):
        if fp8:
            keys_BSK = rows.own(cache.read(attn.index_row, "index_key", rows.n_slots, FP8))
            scales_BS = rows.own(cache.read(attn.index_row, "index_key_scale", rows.n_slots, torch.float32))
            q, w = indexer_fp8.index_queries(attn.indexer, x_BTD, q_latent_BTR, rows.cos, rows.sin,
                                             cache.index_rotation)
            return indexer_fp8.index_scores(q, w, keys_BSK, scales_BS.squeeze(-1))
        keys_BSK = rows.own(cache.read(attn.index_row, "index_key", rows.n_slots, torch.float32))
        return attn.indexer.scores(x_BTD, q_latent_BTR, keys_BSK, rows.cos, rows.sin)
    if fp8:  # index_queries' weights carry d^-0.5: the kernel's scale is 1
        q, w = indexer_fp8.index_queries(attn.indexer, x_BTD, q_latent_BTR, rows.cos, rows.sin, cache.index_rotation)
        scales = _index_key_blocks(cache, attn.index_row, "index_key_scale")[0]
        return kernels.index_scores(q, w, pool, tables, rows.first, rows.n_slots, 1.0, scales)
    q, w = attn.indexer.queries(x_BTD, q_latent_BTR, rows.cos, rows.sin)
    return kernels.index_scores(q, w, pool, tables, rows.first, rows.n_slots, attn.indexer.head_dim ** -0.5)


def _index_key_blocks(cache, row: int, name: str = "index_key") -> tuple[torch.Tensor, torch.Tensor]:
    """Indexer row ``row``'s keys (``name``: or an FP8 cache's key scales, "index_key_scale") as blocks and block
    tables, as ``kernels.index_scores`` reads them: a contiguous cache's (B, max_len, ...), each row one block
    (table [b]), or a paged one's (``PagedCache.index_key_blocks``)."""
    if isinstance(cache, (LatentCache, KVCache)):
        keys = cache.tensors[name][row]
        return keys, torch.arange(keys.shape[0], device=keys.device).view(-1, 1)
    return cache.index_key_blocks(row, name)


def _absorbed_queries(attn: nn.Module, q_nope: torch.Tensor, q_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q (B, H*T, C + R): [q_nope W_UK | q_rope] per head and token, row h*T + t; wkv_b as (H, nope + v, C))."""
    B, T, H, nope = q_nope.shape
    C = attn.kv_lora_rank
    w_HXC = absorbed_weight(attn, q_nope.dtype)  # as wkv_b's GEMMs see it: an FP8 layer's dequantized blocks
    # W_UK absorbed into the query: one GEMM per head, batched (torch.einsum's planning of the same
    # bmm cost a decode step's 12 calls 30-40 us each on 2 cores)
    q_abs = torch.bmm(q_nope.reshape(B * T, H, nope).transpose(0, 1), w_HXC[:, :nope]).view(H, B, T, C)
    return torch.cat([q_abs.transpose(0, 1), q_rope.transpose(1, 2)], dim=-1).reshape(B, H * T, -1), w_HXC


def _absorbed_output(attn: nn.Module, o_lat_BMC: torch.Tensor, w_HXC: torch.Tensor, T: int) -> torch.Tensor:
    """Latent-space outputs (B, H*T, C) to per-head outputs (B, T, H, v): W_UV absorbed into the output."""
    B, M, C = o_lat_BMC.shape
    H = M // T
    o_HRC = o_lat_BMC.view(B, H, T, C).transpose(0, 1).reshape(H, B * T, C)
    o = torch.bmm(o_HRC, w_HXC[:, attn.qk_nope_head_dim:].transpose(1, 2))  # (H, B*T, v): one GEMM per head
    return o.view(H, B, T, -1).permute(1, 2, 0, 3)


def mla_absorbed_core(attn: nn.Module, q_nope: torch.Tensor, q_rope: torch.Tensor, kv_BSK: torch.Tensor,
                      mask_B1TS: torch.Tensor) -> torch.Tensor:
    """Per-head attention outputs (B, T, H, v) with W_UK absorbed into the query and W_UV into the
    output: scores and weighted sums run in latent space. q_nope (B,T,H,nope), q_rope (B,T,H,R),
    kv_BSK = [c | k_rope] (B, S, C + R), mask (B, 1, T, S) bool. The eager path, on gathered slots,
    and the oracle of the fused kernel (``mla_absorbed_cached``)."""
    B, T, H, _ = q_nope.shape
    S, C = kv_BSK.shape[1], attn.kv_lora_rank
    q_BMK, w_HXC = _absorbed_queries(attn, q_nope, q_rope)  # M = H*T
    scores = torch.bmm(q_BMK, kv_BSK.transpose(1, 2)).view(B, H, T, S)  # q_abs.c + q_rope.k_rope
    p = _softmax(scores * attn.softmax_scale, mask_B1TS, q_nope.dtype)
    o_lat = torch.bmm(p.view(B, H * T, S), kv_BSK[..., :C])  # attention in latent space
    return _absorbed_output(attn, o_lat, w_HXC, T)


def mla_absorbed_cached(attn: nn.Module, q_nope: torch.Tensor, q_rope: torch.Tensor, cache, layer: int,
                        rows: Rows) -> torch.Tensor:
    """``mla_absorbed_core`` over the slots ``rows`` see in ``cache`` (a latent cache, contiguous or
    paged). Where the fused kernel takes them (FP32 queries, an FP32, BF16 or FP8 cache on the CPU),
    it reads the cache's blocks in place, in one pass (``kernels.mla_decode``; FP8 rows decoded as read);
    else the slots are gathered (FP8 rows dequantized) into a new tensor and the eager core runs on them."""
    pool, tables = cache.blocks(layer)
    if q_nope.dtype == torch.float32 and kernels.mla_decode_usable(pool):
        q_BMK, w_HXC = _absorbed_queries(attn, q_nope, q_rope)
        o_lat = kernels.mla_decode(q_BMK, pool, tables, rows.pos, attn.kv_lora_rank, attn.softmax_scale, rows.first)
        return _absorbed_output(attn, o_lat, w_HXC, q_nope.shape[1])
    return mla_absorbed_core(attn, q_nope, q_rope, *rows.attended(cache.read_packed(layer, rows.n_slots, q_nope.dtype)))


def mla_dense_core(attn: nn.Module, q_nope: torch.Tensor, q_rope: torch.Tensor, kv_BSK: torch.Tensor,
                   mask_B1TS: torch.Tensor | None) -> torch.Tensor:
    """``mla_absorbed_core`` in the compute-bound form: the S latents up-projected to per-head
    keys and values, then one fused attention (the training path's ``causal_attention``; no mask:
    plain causal, T == S)."""
    B, S, _ = kv_BSK.shape
    H, nope, v, C = attn.n_heads, attn.qk_nope_head_dim, attn.v_head_dim, attn.kv_lora_rank
    k_nope, val = attn.wkv_b(kv_BSK[..., :C]).view(B, S, H, nope + v).split([nope, v], dim=-1)
    k_rope = kv_BSK[..., C:].unsqueeze(2).expand(B, S, H, attn.qk_rope_head_dim)
    return causal_attention(torch.cat([q_nope, q_rope], dim=-1), torch.cat([k_nope, k_rope], dim=-1), val,
                            attn.softmax_scale, mask_B1TS)


def mla_naive(attn: nn.Module, x_BTD: torch.Tensor, rows: Rows, cache: KVCache, layer: int) -> torch.Tensor:
    """MLA as a plain multi-head attention: per-head keys/values up-projected and cached."""
    q_nope, q_rope = attn.queries(x_BTD, rows.cos, rows.sin)
    key, val = _naive_keys_values(attn, x_BTD, rows)
    cache.write(layer, rows.pos, key=key, value=val)
    return _per_head_attention(torch.cat([q_nope, q_rope], dim=-1), cache, layer, rows, attn.softmax_scale, 1,
                               wo=attn.wo)


def dsa_naive(attn: nn.Module, x_BTD: torch.Tensor, rows: Rows, cache: KVCache, layer: int) -> torch.Tensor:
    """``mla_naive`` with DeepSeek Sparse Attention: the indexer keys cached beside the per-head keys
    and values, the causal mask narrowed to each query's selected slots (``dsa_selection``). It stays
    masked (every slot read and scored, the unselected masked): the naive layout is the peer measured
    against, not a path to speed up; ``dsa_absorbed`` gathers."""
    q_latent = attn.query_latent(x_BTD)
    q_nope, q_rope = attn.queries(x_BTD, rows.cos, rows.sin, q_latent)
    key, val = _naive_keys_values(attn, x_BTD, rows)
    cache.write(layer, rows.pos, key=key, value=val)
    selected = _selected(attn, x_BTD, q_latent, rows, cache)
    return _per_head_attention(torch.cat([q_nope, q_rope], dim=-1), cache, layer, rows, attn.softmax_scale, 1,
                               wo=attn.wo, mask_B1TS=selected)


def _naive_keys_values(attn: nn.Module, x_BTD: torch.Tensor, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head keys (B, T, H, nope + R) and values (B, T, H, v) up-projected from the new tokens' latents."""
    B, T, _ = x_BTD.shape
    H, nope, v = attn.n_heads, attn.qk_nope_head_dim, attn.v_head_dim
    c_kv, k_rope = attn.latents(x_BTD, rows.cos, rows.sin)
    k_nope, val = attn.wkv_b(c_kv).view(B, T, H, nope + v).split([nope, v], dim=-1)
    return torch.cat([k_nope, k_rope.unsqueeze(2).expand(B, T, H, attn.qk_rope_head_dim)], dim=-1), val


def gqa_cached(attn: nn.Module, x_BTD: torch.Tensor, rows: Rows, cache: KVCache, layer: int) -> torch.Tensor:
    """Grouped-query attention against a per-KV-head cache (queries and keys as the training path
    makes them: ``GQA.queries`` / ``GQA.keys_values``, head norms included; a sliding layer's ``window``).
    A decode step (T = 1) runs the eager core; more tokens (prefill chunks, MTP drafts) one fused attention
    (``_fused_grouped``), never (H x T x S) FP32 scores: a whole prompt's first chunk causal as ATen applies it, or
    a sliding layer's in windowed chunks as training runs it (``windowed_attention``)."""
    q = attn.queries(x_BTD, rows.cos, rows.sin)
    key, val = attn.keys_values(x_BTD, rows.cos, rows.sin)
    cache.write(layer, rows.pos, key=key, value=val)
    group, T, W = attn.n_heads // attn.n_kv_heads, x_BTD.shape[1], attn.window
    span = rows.window_read(W) if W else None
    if span is not None:  # a sliding layer past its window reads the slots its queries' windows cover
        slots, mask = span
        k, v = (cache.read_slots(layer, name, slots, q.dtype, heads_first=True) for name in ("key", "value"))
    else:
        k, v = (rows.own(cache.read(layer, name, rows.n_slots, q.dtype, heads_first=True), dim=2)
                for name in ("key", "value"))
        if T > 1 and rows.from_slot_zero:  # the cached slots are the T new tokens' own: no mask made
            if W and W < T:
                k, v = (t.transpose(1, 2).repeat_interleave(group, dim=2) for t in (k, v))  # (B, T, H, d)
                return attn.wo(windowed_attention(q, k, v, attn.softmax_scale, W).flatten(2))
            return attn.wo(_fused_grouped(q, k, v, None, attn.softmax_scale, group))
        # a sliding layer keeps every slot cached and masks those out of its window
        mask = rows.window_mask(W)[..., rows.first:] if W else rows.attended_mask
    if T == 1:
        return _grouped_attention(q, k, v, mask, attn.softmax_scale, group, attn.wo)
    return attn.wo(_fused_grouped(q, k, v, mask, attn.softmax_scale, group))


def _fused_grouped(q_BTHK: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_B1TS: torch.Tensor | None,
                   scale: float, group: int) -> torch.Tensor:
    """(B, T, H * dv): queries (B, T, H, dk) against keys (B, Hkv, S, dk) and values (B, Hkv, S, dv), each KV head
    serving ``group`` query heads, in one fused attention (``mask_B1TS`` None: causal, T == S). Where the expert
    threads split heads (``kernels.attention_splits``), or on CUDA with a mask (the memory-efficient kernel, which
    takes masks, reads no grouped heads; SDPA would fall back to its math path's scores), each head gets its KV
    head's copy; else SDPA reads them grouped."""
    q = q_BTHK.transpose(1, 2)
    if group > 1 and (mask_B1TS is not None and q.is_cuda or kernels.attention_splits(q, k, v)):
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if k.shape[1] == q.shape[1]:
        o = kernels.attention(q, k, v, scale, mask_B1TS)
    else:
        how = dict(is_causal=True) if mask_B1TS is None else dict(attn_mask=mask_B1TS)
        o = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True, **how)
    return o.transpose(1, 2).flatten(2)


def _per_head_attention(q_BTHK: torch.Tensor, cache: KVCache, layer: int, rows: Rows, scale: float,
                        group: int, wo: nn.Module, mask_B1TS: torch.Tensor | None = None) -> torch.Tensor:
    """``wo``: the output projection; ``mask_B1TS``: the attended slots' mask when not the causal one (DSA's
    selection)."""
    S = rows.n_slots
    k, mask = rows.attended(cache.read(layer, "key", S, q_BTHK.dtype, heads_first=True), dim=2)  # (B, Hkv, S', dk)
    v, _ = rows.attended(cache.read(layer, "value", S, q_BTHK.dtype, heads_first=True), dim=2)  # (B, Hkv, S', dv)
    return _grouped_attention(q_BTHK, k, v, mask if mask_B1TS is None else mask_B1TS, scale, group, wo)


def _grouped_attention(q_BTHK: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                       group: int, wo: nn.Module) -> torch.Tensor:
    """Queries (B, T, H, dk) against keys (B, Hkv, S, dk) and values (B, Hkv, S, dv) under ``mask`` (B, 1, T, S),
    then ``wo``."""
    B, T, H, _ = q_BTHK.shape
    S = k.shape[2]
    # queries of one KV group share its keys: (B, Hkv, group*T, dk) against (B, Hkv, S, dk)
    Hkv = H // group
    q = q_BTHK.view(B, T, Hkv, group, -1).permute(0, 2, 3, 1, 4).reshape(B, Hkv, group * T, -1)
    scores = torch.matmul(q, k.transpose(-1, -2)).view(B, Hkv * group, T, S)
    p = _softmax(scores * scale, mask, q_BTHK.dtype)
    o = torch.matmul(p.view(B, Hkv, group * T, S), v)  # (B, Hkv, group*T, dv)
    o = o.view(B, Hkv, group, T, -1).permute(0, 3, 1, 2, 4).reshape(B, T, -1)
    return wo(o)
