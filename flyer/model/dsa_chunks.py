"""DeepSeek Sparse Attention (V3.2 / GLM-5) in query chunks over gathered keys: training and whole-sequence forwards
(``MLA.forward``; the decode cache's prefill chunks and decode steps gather too: ``infer.attention.dsa_gathered``).

``MLA.forward``'s masked form scores every causal key of every query and masks all but the indexer's
``index_topk`` (k): O(T^2) scores and a (B, 1, T, T) mask per layer, however small k. Past ``dsa_gathers``' length
the layer instead runs in chunks of C queries (``query_chunk``'s rule): the chunk [s, e) runs the indexer on its own
rows against the first e keys ((B, C, index heads, e) scores, not the whole sequence's (B, T, index heads, T)) and
selects with ``Indexer.select``, which is the whole sequence's selection row for row: keys past e are invisible to
every query of the chunk (never selected nor counted) and ties at the cut go to the earliest keys, a prefix's.
Each query then attends to its k picks only (``entry_picks``: indices, -1 for the empty slots of a query seeing
fewer), in DeepSeek's sparse MLA form: absorbed into the latent space (the queries times W_UK, scores against the
gathered [c_KV | k_rope] (B, C, k, kv_lora_rank + rope), p @ c, then W_UV), O(T k H (2 kv_lora_rank + rope)).

The chunks reuse ``flyer.model.hybrid_chunks``: a chunk is a ``Span`` with no band of tokens whose e "entries" are
the first e tokens' latents, its visibility a ``Gathered`` (an empty band mask and the picks), and
``chunked_attention`` runs them, under autograd recomputing each chunk in backward (``_Recompute``: saved state q,
the latents and the picks, O(T (H d + kv_lora_rank + k)), rather than the masked form's O(H T T)).

Shapes: B batch, T tokens, H heads, C chunk rows, k index_topk, L = kv_lora_rank + qk_rope_head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flyer.model.hybrid_chunks import GATHER_OVER, Gathered, Span, chunked_attention, entry_picks, query_chunk
from flyer.model.lowp import einsum, matmul


# Under autograd gathering pays later: the recomputation and the gathered latents' gradient (a scatter-add) add
# more to it than backward adds to the masked form's fused attention. bench/dsa_attention.py, forward + backward,
# k = 256: masked / gathered 0.79 at T = 2048, 1.17 at 3072 (forward alone: 1.59 at 2048), crossover ~2.5x later.
GATHER_OVER_TRAINING = 10


def dsa_gathers(attn, T: int, training: bool = False) -> bool:
    """Whether the DSA layer ``attn`` (an ``MLA``, or its ``ModelConfig``: the fields read are the same) gathers its
    T queries' picks rather than masking: a query's masked attention costs T (nope + rope + v) multiply-adds per
    head, its gathered one k (2 kv_lora_rank + rope) (absorbed: scores over [c | k_rope], then p @ c); gather once
    the first passes ``GATHER_OVER`` times the second, ``GATHER_OVER_TRAINING`` times with ``training`` (autograd
    recording): bench/dsa_attention.py measured the crossovers near there (docs/performance.md)."""
    C, R = attn.kv_lora_rank, attn.qk_rope_head_dim
    masked = T * (attn.qk_nope_head_dim + R + attn.v_head_dim)
    over = GATHER_OVER_TRAINING if training else GATHER_OVER
    return attn.index_topk > 0 and masked > over * attn.index_topk * (2 * C + R)


@dataclass(frozen=True)
class SparseChunks:
    """A DSA layer's selection in query chunks, which GLM-5's shared layers reuse: ``plan`` the chunks (``Span``:
    queries [start, stop) see the first ``n_entries`` = stop tokens), ``visible`` each chunk's ``Gathered`` (an
    empty (B, C, 0) band mask; picks int32 (B, C, k), -1 for an empty slot)."""

    plan: list[Span]
    visible: list[Gathered]


def chunk_plan(B: int, T: int, attn: nn.Module, chunk: int | None = None) -> list[Span]:
    """The chunks of ``chunk`` query rows (None: ``query_chunk``'s rule for these shapes, which counts a band of C
    keys per query that DSA has not: an overestimate) covering T queries; each sees the keys up to its last."""
    if chunk is None:
        chunk = query_chunk(B, T, attn.n_heads, 0, T, attn.indexer.n_heads, topk=attn.index_topk,
                            head_dim=attn.kv_lora_rank + attn.qk_rope_head_dim)
    if chunk < 1:
        raise ValueError(f"chunk: query rows per chunk must be >= 1 (got {chunk})")
    return [Span(s, min(s + chunk, T), min(s + chunk, T), min(s + chunk, T)) for s in range(0, T, chunk)]


@torch.no_grad()  # the indexer gets no gradient (see ``Indexer``)
def select_chunks(attn: nn.Module, x_BTD: torch.Tensor, q_latent_BTR: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, chunk: int | None = None) -> SparseChunks:
    """The full DSA layer ``attn``'s selection of T queries (tokens x, query latents, at cos/sin's positions) chunk
    by chunk: each chunk's indexer scores against the keys it may see, ``Indexer.select`` (causal), its picks."""
    B, T, _ = x_BTD.shape
    plan, visible = chunk_plan(B, T, attn, chunk), []
    keys_BTK = attn.indexer.keys(x_BTD, cos, sin)
    for s in plan:
        rows = slice(s.start, s.stop)
        causal = (torch.arange(s.stop, device=x_BTD.device).view(1, -1)
                  <= torch.arange(s.start, s.stop, device=x_BTD.device).view(-1, 1)).expand(B, -1, -1)
        scores = attn.indexer.scores(x_BTD[:, rows], q_latent_BTR[:, rows], keys_BTK[:, :s.stop], cos[rows],
                                     sin[rows])
        band = torch.zeros(B, s.stop - s.start, 0, dtype=torch.bool, device=x_BTD.device)  # no band: 0 bytes
        visible.append(Gathered(band, entry_picks(attn.indexer.select(scores, causal), attn.index_topk)))
    return SparseChunks(plan, visible)


def sparse_attention(attn: nn.Module, q_nope: torch.Tensor, q_rope: torch.Tensor, c_kv_BTC: torch.Tensor,
                     k_rope_BTR: torch.Tensor, chunks: SparseChunks) -> torch.Tensor:
    """(B, T, H, v): each query of q_nope (B, T, H, nope), q_rope (B, T, H, R) attends to its picks (``chunks``)
    among the latents c_KV (B, T, kv_lora_rank) and rope keys (B, T, R), absorbed (``absorbed_attend``), chunk by
    chunk; under autograd each chunk is recomputed in backward (gradients of q, the latents and ``wkv_b``)."""
    B = q_nope.shape[0]
    q = torch.cat([q_nope, q_rope], dim=-1)
    latents = torch.cat([c_kv_BTC, k_rope_BTR], dim=-1)  # what each pick gathers
    no_band = latents.new_zeros(B, 0, 1, 0)

    def attend(q_BCHd, _band, _band_mask, picked_BCkL, valid_BCk):
        return absorbed_attend(attn, q_BCHd, picked_BCkL, valid_BCk)

    return chunked_attention(attend, chunks.plan, q, no_band, latents, chunks.visible, params=(attn.wkv_b.weight,))


def absorption_weight(wkv_b: nn.Module) -> torch.Tensor:
    """``wkv_b``'s weight (H (nope + v), kv_lora_rank) as its own GEMMs see it, for the absorbed products: an FP8
    layer's (``flyer.fp8.FP8Linear.dequantized_weight``: its 128x128 blocks quantized and dequantized, gradient
    straight to the master weight), as DeepSeek's sparse MLA absorbs the weight dequantized from its FP8 blocks;
    any other layer's weight as it is."""
    fp8 = getattr(wkv_b, "dequantized_weight", None)  # duck-typed: flyer.fp8 builds on this package
    return wkv_b.weight if fp8 is None else fp8()


def absorbed_weight(attn: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """W_UK | W_UV (H, nope + v, kv_lora_rank) in ``dtype`` (a weight held in BF16: the queries' dtype), from
    ``absorption_weight``; the activations stay in their dtype under FP8 too: DeepSeek's absorbed attention is
    BF16 / FP32, not FP8 GEMMs."""
    H, nope, v, C = attn.n_heads, attn.qk_nope_head_dim, attn.v_head_dim, attn.kv_lora_rank
    return absorption_weight(attn.wkv_b).view(H, nope + v, C).to(dtype)


def absorbed_attend(attn: nn.Module, q_BCHd: torch.Tensor, picked_BCkL: torch.Tensor, valid_BCk: torch.Tensor,
                    flush: bool = False, w_HXC: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(scale q . k) v of queries q = [q_nope | q_rope] (B, C, H, nope + R) over each one's own keys, the
    gathered latents [c | k_rope] (B, C, k, L) of which ``valid`` (B, C, k) count, in the latent space: q_nope
    W_UK (per head, from ``wkv_b``: ``absorption_weight``) scores against c, q_rope against k_rope; the FP32
    softmax's p @ c, then W_UV. Returns (B, C, H, v). Per query the products are (H, L) @ (L, k): DeepSeek's
    sparse MLA (decode's too, ``flyer.infer.attention.dsa_gathered_core``). ``flush``: subnormal probabilities to
    zero (CPU decode: their arithmetic is slow there; 2^-126 of weight each). ``w_HXC``: ``absorbed_weight``,
    when the caller attends in several calls (one cast, or FP8 quantization, of the weight for all)."""
    nope, C = attn.qk_nope_head_dim, attn.kv_lora_rank
    w_HXC = absorbed_weight(attn, q_BCHd.dtype) if w_HXC is None else w_HXC
    q_nope, q_rope = q_BCHd.split([nope, q_BCHd.shape[-1] - nope], dim=-1)
    q_abs = einsum("bchn,hnl->bchl", q_nope, w_HXC[:, :nope])  # W_UK absorbed into the query
    q_lat = torch.cat([q_abs, q_rope.to(q_abs.dtype)], dim=-1)
    picked = picked_BCkL.to(q_lat.dtype)
    scores = matmul(q_lat, picked.transpose(-1, -2)).float() * attn.softmax_scale  # (B, C, H, k)
    p = torch.where(valid_BCk.unsqueeze(2), scores, float("-inf")).softmax(dim=-1)
    if flush:
        p = p.masked_fill(p < torch.finfo(torch.float32).tiny, 0.0)
    o_lat = matmul(p.to(picked.dtype), picked[..., :C])  # (B, C, H, kv_lora_rank)
    return einsum("bchl,hvl->bchv", o_lat, w_HXC[:, nope:])  # W_UV absorbed into the output
