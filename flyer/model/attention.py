"""Attention: Multi-head Latent Attention (MLA) and grouped-query attention (GQA/MHA).

MLA (DeepSeek-V2/V3) compresses keys and values into one latent per token,
``c_KV = RMSNorm(W_DKV x)`` of ``kv_lora_rank`` channels, plus one rope key of
``qk_rope_head_dim`` channels shared by all heads (decoupled RoPE). Per-head keys/values are
up-projected from the latent by ``wkv_b``. Queries are optionally low-rank (``q_lora_rank``).
At decode time only (c_KV, k_rope) is cached (with DSA, each token's indexer key too); see
``flyer.infer.cache`` for the absorbed path.

DeepSeek Sparse Attention (V3.2, ``index_topk > 0``): a lightning ``Indexer`` scores the causal
keys of each query and MLA attends to its ``index_topk`` best only. GLM-5 shares selections across
layers (``ModelConfig.indexer_types``): a "shared" layer has no indexer and attends to the keys the
nearest full layer before it selected, handed on in a ``Selection``. Long sequences (``dsa_gathers``) do not
mask a (B, 1, T, T) selection: queries run in chunks, each attending to its picks gathered
(``flyer.model.dsa_chunks``); ``gather=False`` keeps the masked form, their oracle.

Shapes: B batch, T query tokens, S key tokens, H heads, D model dim.
"""

from __future__ import annotations

import functools
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from flyer import kernels
from flyer.config import ModelConfig
from flyer.model.dsa_chunks import SparseChunks, dsa_gathers, select_chunks, sparse_attention
from flyer.model.indexer_loss import indexer_kl, per_document_loss
from flyer.model.lowp import Linear, scaled_dot_product_attention
from flyer.model.norm import RMSNorm
from flyer.model.recompute import recomputed
from flyer.model.transient import Transients
from flyer.model.rope import apply_rope

# The latent RMSNorms use 1e-6 whatever rms_norm_eps says: DeepSeek's reference and transformers do.
LORA_NORM_EPS = 1e-6


def causal_attention(q_BTHK: torch.Tensor, k_BTHK: torch.Tensor, v_BTHV: torch.Tensor, scale: float,
                     mask_B1TS: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, causal) v, returned as (B, T, H, V). Keys may be S >= T long when
    ``mask_B1TS`` (bool, True = visible) says which each query sees (a prefill chunk after cached
    context); without it, query t sees keys [0, t].

    When the value head dim differs from the query/key head dim (MLA: 192 vs 128 in V3), values
    are zero-padded to the same width so SDPA can take its fused (flash) kernel instead of the
    math path that materialises T x T scores; the padding columns are sliced off the output.
    """
    dk, dv = q_BTHK.shape[-1], v_BTHV.shape[-1]
    v = F.pad(v_BTHV, (0, dk - dv)) if dv < dk else v_BTHV
    if dv > dk:  # zero columns leave q.k unchanged
        q_BTHK, k_BTHK = F.pad(q_BTHK, (0, dv - dk)), F.pad(k_BTHK, (0, dv - dk))
    q, k, v = q_BTHK.transpose(1, 2), k_BTHK.transpose(1, 2), v.transpose(1, 2)
    if kernels.attention_splits(q, k, v):  # inference on the CPU: heads split over the expert threads
        o = kernels.attention(q, k, v, scale, mask_B1TS)
    else:
        how = dict(is_causal=True) if mask_B1TS is None else dict(attn_mask=mask_B1TS)
        o = scaled_dot_product_attention(q, k, v, scale=scale, **how)
    return o.transpose(1, 2)[..., :dv]


class Indexer(nn.Module):
    """DSA's lightning indexer, as transformers' DeepseekV32 computes it (it differs from DeepSeek's
    reference, which Hadamard-rotates q and k and scores in FP8: orthogonal, and a precision choice, which
    ``--cache-dtype fp8`` makes: ``flyer.infer.indexer_fp8``).

    Per token one key k = LayerNorm(wk x) of ``index_head_dim`` channels; per query ``index_n_heads``
    heads q_h = wq_b(q_latent) (MLA's normalised query latent) and weights w = weights_proj(x) / sqrt(H).
    The first ``qk_rope_head_dim`` channels of q and k rotate with MLA's cos/sin (laid out in
    interleaved pairs here; the checkpoints' rotate-half rows are permuted on import). The score of key
    t for query s is sum_h w_h relu(q_h . k_t) / sqrt(index_head_dim), in FP32.

    Frozen unless trained: as transformers, it runs without gradient and its parameters are frozen (``requires_grad``
    False: the optimizer, weight decay and gradient sync leave them as loaded). DeepSeek trains it by a KL loss
    against the main attention (``flyer.model.indexer_loss``: ``flyer train --indexer-train warmup|sparse``), which
    unfreezes it and has its ``MLA`` compute that loss each forward with autograd."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.rope_dim = cfg.qk_rope_head_dim
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = Linear(cfg.dim, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=LORA_NORM_EPS)  # with a bias, unlike MLA's norms
        self.weights_proj = Linear(cfg.dim, self.n_heads, bias=False)
        self.requires_grad_(False)

    def keys(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The indexer keys of tokens x (B, T, D) at cos/sin's positions: (B, T, index_head_dim)."""
        k = self.k_norm(self.wk(x_BTD)).unsqueeze(2)
        return _apply_partial_rope(k, cos, sin, self.rope_dim).squeeze(2)

    def queries(self, x_BTD: torch.Tensor, q_latent_BTR: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                weights_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """FP32 (rotated queries (B, T, H, index_head_dim), head weights (B, T, H)) of T queries (tokens x, MLA
        query latents q_latent, at cos/sin's positions): what ``scores`` (and the decode kernel,
        ``flyer.infer.attention.dsa_index_scores``) score keys with. The head weights weights_proj(x) H^-0.5 in
        FP32, as transformers computes them; ``weights_dtype`` BF16: rounded to it and scaled in it, as DeepSeek's
        inference code computes them (a Linear of the model's dtype: ``flyer.infer.indexer_fp8``)."""
        B, T, _ = x_BTD.shape
        q = self.wq_b(q_latent_BTR).view(B, T, self.n_heads, self.head_dim)
        q = _apply_partial_rope(q, cos, sin, self.rope_dim).float()
        with torch.autocast(x_BTD.device.type, enabled=False):  # FP32 under autocast too
            w = F.linear(x_BTD.float(), self.weights_proj.weight.float())
        return q, (w.to(weights_dtype) * self.n_heads ** -0.5).float()

    def scores(self, x_BTD: torch.Tensor, q_latent_BTR: torch.Tensor, k_BSK: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> torch.Tensor:
        """Index scores (B, T, S) in FP32 of T queries (``queries``) against S keys (``keys``), unmasked."""
        q, w = self.queries(x_BTD, q_latent_BTR, cos, sin)
        # (B, T, H, K) @ (B, 1, K, S): each head's dot products, scaled, then ReLU (scale > 0: either order); FP32
        # even under autocast, as the V4 indexer's (BF16 scores would tie in the top-k)
        with torch.autocast(x_BTD.device.type, enabled=False):
            s = torch.relu(torch.matmul(q, k_BSK.float().transpose(-1, -2).unsqueeze(1)) * self.head_dim ** -0.5)
            return torch.matmul(w.unsqueeze(-2), s).squeeze(-2)

    def select(self, scores_BTS: torch.Tensor, visible_BTS: torch.Tensor) -> torch.Tensor:
        """Bool (B, T, S): ``select_topk`` of ``index_topk`` keys."""
        return select_topk(scores_BTS, visible_BTS, self.topk)


def select_topk(scores_BTS: torch.Tensor, visible_BTS: torch.Tensor, k: int) -> torch.Tensor:
    """Bool (B, T, S): per query the ``k`` visible keys of highest score (all of them when fewer are
    visible), and only visible ones: DSA's selection (V3.2's keys, V4's compressed entries). Keys tied at
    the cut go to the earliest slots: a key every head's ReLU zeroes scores exactly 0, and which of such
    keys top-k returns depends on the tensor's shape, so a request would select otherwise batched than alone."""
    scores = scores_BTS.masked_fill(~visible_BTS, float("-inf"))
    k = min(k, scores.shape[-1])
    kth = scores.topk(k, dim=-1).values[..., -1:]
    above, tied = scores > kth, scores == kth
    room = k - above.sum(-1, keepdim=True)
    return (above | (tied & (tied.cumsum(-1, dtype=torch.int32) <= room))) & visible_BTS


class Selection:
    """DSA's selection handed from layer to layer within one forward: the keys the last layer with an indexer
    selected, which the shared layers after it attend to (GLM-5), as ``mask`` (``MLA.sparse_mask``'s (B, 1, T, S)
    bool; None: every causal key) or, where that layer gathered, ``chunks`` (its chunk plan and picks,
    ``SparseChunks``; then ``mask`` is None). A forward (or a pipeline stage, which starts at a full layer) makes
    one. Packed rows (``flyer.model.documents.Documents.each``) select per group of documents: ``group(i)``, the
    selection group i hands between its layers."""

    __slots__ = ("mask", "chunks", "groups")

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self.chunks: SparseChunks | None = None
        self.groups: dict[int, Selection] = {}

    def group(self, i: int) -> Selection:
        """Group i's own ``Selection`` (made on first use, then the same for every later layer of the forward)."""
        return self.groups.setdefault(i, Selection())


class MLA(Transients, nn.Module):
    """Multi-head latent attention of block ``layer_id``; with DSA its own ``indexer``, or (``shares_selection``:
    a GLM-5 "shared" layer) none, attending to the selection a ``Selection`` hands it. ``index_row``: the layer's
    row among a decode cache's indexer keys (``flyer.infer.cache``: full layers only; an MTP block's own cache
    has one row)."""

    TRANSIENT = ("index_loss",)

    def __init__(self, cfg: ModelConfig, layer_id: int = 0):
        super().__init__()
        self.cfg = cfg
        H = cfg.n_heads
        self.n_heads = H
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.qk_head_dim = cfg.qk_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.softmax_scale = cfg.softmax_scale
        self.query_scaled = cfg.llama4_attn_beta > 0  # the rope tables' cos carries each query's scale, last
        if cfg.q_lora_rank == 0:
            self.wq = Linear(cfg.dim, H * self.qk_head_dim, bias=False)
        else:
            self.wq_a = Linear(cfg.dim, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, eps=LORA_NORM_EPS)
            self.wq_b = Linear(cfg.q_lora_rank, H * self.qk_head_dim, bias=False)
        self.wkv_a = Linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, eps=LORA_NORM_EPS)
        self.wkv_b = Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = Linear(H * cfg.v_head_dim, cfg.dim, bias=False)
        if cfg.has_indexer(layer_id):  # chosen once: without it the same modules, and state dict, as dense MLA
            self.indexer = Indexer(cfg)
        self.index_topk = cfg.index_topk
        # L_I (flyer.model.indexer_loss.set_indexer_training): "off", "warmup" (dense attention) or "sparse"
        self.index_train, self.index_loss = "off", None
        self.index_valid_BT: torch.Tensor | None = None  # the queries L_I averages over (``real_queries``; None: all)
        self.shares_selection = cfg.index_topk > 0 and not cfg.has_indexer(layer_id)
        self.index_row = sum(map(cfg.has_indexer, range(layer_id))) if layer_id < cfg.n_layers else 0
        self.recompute = False  # DeepSeek-V3's recomputation of the up-projections (flyer.model.recompute)

    def query_latent(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """The normalised query latent (B, T, q_lora_rank) that ``wq_b`` (and the DSA indexer) project."""
        return self.q_norm(self.wq_a(x_BTD))

    def queries(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                q_latent_BTR: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_nope (B,T,H,nope), q_rope (B,T,H,rope)) with RoPE applied to the rope part; ``q_latent``:
        ``query_latent(x)`` when the caller has it already. With Llama 4's temperature (``query_scaled``) both
        parts are then scaled by the position's factor, cos's last channel, rounded to q's dtype as transformers'
        Mistral4 rounds it."""
        B, T, _ = x_BTD.shape
        if self.q_lora_rank == 0:
            q = self.wq(x_BTD)
        else:
            q = self.wq_b(self.query_latent(x_BTD) if q_latent_BTR is None else q_latent_BTR)
        q = q.view(B, T, self.n_heads, self.qk_head_dim)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        if self.query_scaled:
            scale = cos[..., -1:].to(q.dtype)  # (T, 1, 1) or (B, T, 1, 1): broadcasts over heads and channels
            return q_nope * scale, apply_rope(q_rope, cos[..., :-1], sin) * scale
        return q_nope, apply_rope(q_rope, cos, sin)

    def latents(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What MLA caches: (normalised latent c_KV (B,T,kv_lora_rank), rope key (B,T,rope))."""
        return self._latent_parts(self.wkv_a(x_BTD), cos, sin)

    def _latent_parts(self, kv: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``latents`` from ``wkv_a``'s output."""
        c_kv, k_rope = kv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        if self.query_scaled:  # keys are not scaled: drop the queries' channel
            cos = cos[..., :-1]
        k_rope = apply_rope(k_rope.unsqueeze(2), cos, sin).squeeze(2)
        return self.kv_norm(c_kv), k_rope

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, selection: Selection | None = None,
                gather: bool = True, chunk: int | None = None, docs=None, recompute: bool = True) -> torch.Tensor:
        """Training / prefill path (causal): per-head keys and values up-projected from the latent; with
        the DSA indexer each query sees its selected keys only, which ``selection`` takes on; a shared layer
        attends to the keys ``selection`` holds (required), in the form its full layer chose. ``gather``: past
        ``dsa_gathers``' length (longer with autograd recording) a full layer selects and attends in chunks of
        ``chunk`` queries (None: ``query_chunk``'s rule), each to its picks gathered (``flyer.model.dsa_chunks``);
        False: the masked form (``sparse_mask``, every causal key scored), the oracle. ``docs``: packed rows'
        ``flyer.model.documents.Documents``, each attending to itself (cos / sin at the packed positions, (B, T, 1, d));
        with DSA each group of documents runs this forward unpacked (``per_document``), without the recomputation
        (``recompute`` False): its regions, one per group, would cast a weight each under autocast where the forward
        without them casts it once, which sums its gradient in another order."""
        if docs is not None and self.index_topk > 0:
            return self.per_document(x_BTD, cos, sin, selection, gather, chunk, docs)
        B, T, _ = x_BTD.shape
        # DeepSeek-V3's recomputation (set_recompute); a DSA layer's not while its indexer trains, whose L_I reads
        # the attention's queries and keys
        if self.recompute and recompute and torch.is_grad_enabled() and self.index_train == "off":
            q_in, kv = self.wq_a(x_BTD) if self.q_lora_rank else x_BTD, self.wkv_a(x_BTD)
            mask = chunks = q_latent = None
            if self.index_topk:  # a full layer's indexer reads the query latent as the path below makes it (made
                # without autograd, a GPU's FP32 norm takes another kernel, whose roundings could move a pick)
                q_latent = None if self.shares_selection else self.q_norm(q_in)
                mask, chunks = self._selection(x_BTD, None if q_latent is None else q_latent.detach(), cos, sin,
                                               selection, gather, chunk)
            if chunks is None:  # dense, or masked: the mask, made without autograd, kept as the region's input
                o = recomputed(self._attend_latents, q_in, kv, cos, sin, docs, mask)
            else:  # gathered: the chunks recompute in backward already
                q_nope, q_rope = self.queries(x_BTD, cos, sin, self.q_norm(q_in) if q_latent is None else q_latent)
                o = sparse_attention(self, q_nope, q_rope, *self._latent_parts(kv, cos, sin), chunks)
            return self.wo(o.reshape(B, T, self.n_heads * self.v_head_dim))
        q_latent = self.query_latent(x_BTD) if self.q_lora_rank else None
        q_nope, q_rope = self.queries(x_BTD, cos, sin, q_latent)
        c_kv, k_rope = self.latents(x_BTD, cos, sin)
        mask = chunks = None
        if self.index_topk:
            mask, chunks = self._selection(x_BTD, q_latent, cos, sin, selection, gather, chunk)
            if not self.shares_selection and self.index_train != "off":  # evaluation (no autograd) computes none
                self.index_loss = indexer_kl(self, x_BTD, q_latent, q_nope, q_rope, c_kv, k_rope, cos, sin, mask,
                                             chunks, chunk, self.index_valid_BT) if torch.is_grad_enabled() else None
        if chunks is not None:
            o = sparse_attention(self, q_nope, q_rope, c_kv, k_rope, chunks)
        else:
            o = self._attend(q_nope, q_rope, c_kv, k_rope, mask, docs)
        return self.wo(o.reshape(B, T, self.n_heads * self.v_head_dim))

    def _selection(self, x_BTD: torch.Tensor, q_latent_BTR: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   selection: Selection | None, gather: bool, chunk: int | None):
        """A DSA layer's (mask, chunks) for ``forward`` (either or both None): a shared layer's from ``selection``,
        a full layer's made here (and handed on in ``selection``)."""
        T = x_BTD.shape[1]
        if self.shares_selection:
            if selection is None:
                raise ValueError("a shared DSA layer attends to the keys a full layer before it selected: pass the "
                                 "forward's Selection")
            return selection.mask, selection.chunks
        # a query with at most index_topk causal keys keeps them all: up to that length DSA is dense MLA
        mask = chunks = None
        selects = T > self.index_topk > 0 and self.index_train != "warmup"  # the indexer's dense warm-up: none
        if selects and gather and dsa_gathers(self, T, torch.is_grad_enabled()):
            chunks = select_chunks(self, x_BTD, q_latent_BTR, cos, sin, chunk)
        elif selects:
            mask = self.sparse_mask(x_BTD, q_latent_BTR, cos, sin)
        if selection is not None:
            selection.mask, selection.chunks = mask, chunks
        return mask, chunks

    def _attend(self, q_nope: torch.Tensor, q_rope: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor,
                mask: torch.Tensor | None, docs) -> torch.Tensor:
        """Dense attention (B, T, H, v) of the queries to the keys and values up-projected from the latents."""
        B, T, _ = c_kv.shape
        kv = self.wkv_b(c_kv).view(B, T, self.n_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(B, T, self.n_heads, self.qk_rope_head_dim)], dim=-1)
        return (causal_attention(q, k, v, self.softmax_scale, mask) if docs is None else  # packed: per document
                docs.attend(lambda *qkv: causal_attention(*qkv, self.softmax_scale), q, k, v))

    def _attend_latents(self, q_in: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        docs, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``_attend`` from ``wq_a``'s output (the input itself without a query LoRA) and ``wkv_a``'s: the region
        ``recomputed`` runs again in backward."""
        q_nope, q_rope = self.queries(q_in, cos, sin, self.q_norm(q_in) if self.q_lora_rank else None)
        return self._attend(q_nope, q_rope, *self._latent_parts(kv, cos, sin), mask, docs)

    def per_document(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, selection: Selection | None,
                     gather: bool, chunk: int | None, docs) -> torch.Tensor:
        """DSA on packed rows: ``forward`` unpacked on each group of ``docs`` (``Documents.each``: each document a row
        of its own at positions from 0), so a query selects among its own document's causal keys only; a shared
        layer takes its group's selection (``Selection.group``). L_I: the mean over the real queries of every group
        (the slots of ``Documents.each``'s real, within ``index_valid_BT``'s), as the documents alone give."""
        return per_document_loss(self, lambda i, x, c, s: self.forward(
            x, c, s, None if selection is None else selection.group(i), gather, chunk, recompute=False), x_BTD, cos,
            sin, docs)

    @torch.no_grad()  # as transformers: the indexer gets no gradient (see ``Indexer``)
    def sparse_mask(self, x_BTD: torch.Tensor, q_latent_BTR: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor) -> torch.Tensor:
        """Bool (B, 1, T, T), True = visible: causal and among the query's ``index_topk`` selected keys."""
        B, T, _ = x_BTD.shape
        causal = torch.ones(T, T, dtype=torch.bool, device=x_BTD.device).tril().expand(B, T, T)
        k = self.indexer.keys(x_BTD, cos, sin)
        return self.indexer.select(self.indexer.scores(x_BTD, q_latent_BTR, k, cos, sin), causal).unsqueeze(1)


WINDOW_CHUNK = 256  # queries per call of a sliding window: each reads its chunk and the window before


@functools.lru_cache(maxsize=8)
def _band(window: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(1, 1, WINDOW_CHUNK, WINDOW_CHUNK + window - 1) (its rows padded to a multiple of 16 columns): query j of a
    chunk sees key columns j .. j + window - 1 (the window ending at its own); shorter chunks take a corner. Bool, or
    additive (0 / -inf) in ``dtype``: SDPA saves a float copy of a bool mask for backward on each call, where one
    shared tensor (chunks and layers alike) is kept once; CUDA's memory-efficient kernel likewise pads a mask whose
    row stride is not a multiple of 16. Made only for rows longer than the window, as large as one chunk's scores
    for a head."""
    rows, width = WINDOW_CHUNK, -(-(WINDOW_CHUNK + window - 1) // 16) * 16
    with torch.inference_mode(False):  # kept for backward by later calls: no inference tensor
        j, m = torch.arange(rows, device=device).view(-1, 1), torch.arange(width, device=device)
        seen = ((m >= j) & (m < j + window)).view(1, 1, rows, width)
        return seen if dtype == torch.bool else torch.where(seen, 0.0, float("-inf")).to(dtype)


def windowed_attention(q_BTHK: torch.Tensor, k_BTHK: torch.Tensor, v_BTHV: torch.Tensor, scale: float,
                       window: int) -> torch.Tensor:
    """``causal_attention`` where query t sees keys t - window + 1 .. t (transformers' sliding window: key s
    visible iff s > t - window). Queries run in chunks of ``WINDOW_CHUNK``, each against its keys and the
    ``window - 1`` before them, so the cost grows as T x (window + chunk), not T^2; a query's keys all sit in its
    chunk's call, so its softmax is the whole one."""
    T = q_BTHK.shape[1]
    if T <= window:  # nothing slides out
        return causal_attention(q_BTHK, k_BTHK, v_BTHV, scale)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q_BTHK, k_BTHK, v_BTHV))
    band = _band(window, q_BTHK.dtype if grad else torch.bool, q_BTHK.device)
    outs = []
    for s in range(0, T, WINDOW_CHUNK):
        e, first = min(s + WINDOW_CHUNK, T), max(0, s - window + 1)
        lead = s - first  # keys before the chunk: window - 1, fewer at the start
        mask = band[..., :e - s, window - 1 - lead:window - 1 + e - s]
        outs.append(causal_attention(q_BTHK[:, s:e], k_BTHK[:, first:e], v_BTHV[:, first:e], scale, mask))
    # one chunk's output is what wo reads; several are copied into one, which backward keeps beside them
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def window_chunks(window: int, T: int) -> bool:
    """Whether ``windowed_attention`` runs T queries in more than one chunk (its output then a copy of theirs)."""
    return 0 < window < T and T > WINDOW_CHUNK


def _apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """``apply_rope`` on the first ``rotary_dim`` channels of each head of x (B, T, H, d), the rest as they are;
    cos/sin: ``rope_cos_sin``'s tables of ``rotary_dim`` channels."""
    rot, rest = x.split([rotary_dim, x.shape[-1] - rotary_dim], dim=-1)
    return torch.cat([apply_rope(rot, cos, sin), rest], dim=-1)


class GQA(nn.Module):
    """Grouped-query attention (multi-head when n_kv_heads == n_heads), RoPE on the whole head or,
    with ``rotary_dim`` (GLM-4.5's partial rotary), on each head's first ``rotary_dim`` channels only:
    the others pass through unrotated. ``attn_bias`` (Qwen2, GLM-4.5): biases on q, k and v.

    ``qk_norm`` (Qwen3): each head's query and key are RMS-normalised over its head_dim channels
    (``q_head_norm`` / ``k_head_norm``, one weight per channel shared by the heads) before RoPE.
    Without it the two are identities, and the state dict has no such weights. A layer of ``cfg.sliding_layers``
    attends to its last ``window_size`` keys only (``windowed_attention``)."""

    def __init__(self, cfg: ModelConfig, layer_id: int = 0):
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window = cfg.window(layer_id)  # 0: every causal key
        self.softmax_scale = cfg.softmax_scale
        self.wq = Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.attn_bias)
        self.wk = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attn_bias)
        self.wv = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attn_bias)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        if cfg.qk_norm:
            self.q_head_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
            self.k_head_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        else:  # chosen once: the same ops, and the same state dict, as before the option existed
            self.q_head_norm = self.k_head_norm = nn.Identity()
        # chosen once: a model rotating whole heads runs the one apply_rope op
        full = cfg.rope_dim == cfg.head_dim
        self.rope = apply_rope if full else partial(_apply_partial_rope, rotary_dim=cfg.rope_dim)

    def queries(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Queries (B, T, n_heads, head_dim), head-normed (``qk_norm``), with RoPE applied."""
        B, T, _ = x_BTD.shape
        return self.rope(self.q_head_norm(self.wq(x_BTD).view(B, T, self.n_heads, self.head_dim)), cos, sin)

    def keys_values(self, x_BTD: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What GQA caches: k (head-normed, rotated), v, each of shape (B, T, n_kv_heads, head_dim)."""
        B, T, _ = x_BTD.shape
        k = self.rope(self.k_head_norm(self.wk(x_BTD).view(B, T, self.n_kv_heads, self.head_dim)), cos, sin)
        return k, self.wv(x_BTD).view(B, T, self.n_kv_heads, self.head_dim)

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, docs=None) -> torch.Tensor:
        """Causal attention of x (B, T, D); ``docs``: packed rows' ``flyer.model.documents.Documents``, each
        attending to itself."""
        B, T, _ = x_BTD.shape
        q = self.queries(x_BTD, cos, sin)
        k, v = self.keys_values(x_BTD, cos, sin)
        rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
        attend = (partial(windowed_attention, scale=self.softmax_scale, window=self.window) if self.window else
                  partial(causal_attention, scale=self.softmax_scale))
        o = attend(q, k, v) if docs is None else docs.attend(attend, q, k, v)  # packed: per document
        return self.wo(o.reshape(B, T, self.n_heads * self.head_dim))


def build_attention(cfg: ModelConfig, layer_id: int = 0) -> nn.Module:
    return MLA(cfg, layer_id) if cfg.attn == "mla" else GQA(cfg, layer_id)
