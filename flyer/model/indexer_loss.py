"""Training DSA's lightning indexer by its KL loss (DeepSeek-V3.2-Exp's continued pre-training, section 2.1).

Two stages (``INDEXER_TRAIN_MODES``, ``set_indexer_training``):

- ``warmup`` (dense warm-up): attention stays dense (no selection), every parameter but the indexers' is frozen,
  and each indexer learns L_I = mean_t KL(p_t,: || softmax(I_t,:)) over query t's causal keys, p_t,: the main
  attention's probabilities of query t summed over the heads and L1-normalised over the keys (their mean over
  heads), with no gradient.
- ``sparse`` (sparse training): the model attends to each query's top-k selection S_t as without this option, and
  L_I = mean_t KL(p_t,S_t || softmax(I_t,S_t)): p over S_t is the attention the sparse model computes (each head's
  softmax over S_t), summed over heads and L1-normalised. The indexer's inputs (the normed hidden states and MLA's
  query latent) are detached: the indexer learns from L_I alone, the rest of the model from the LM loss alone.

What the report leaves open, followed from Megatron-LM's DSA (``compute_dsa_indexer_loss``): KL per query summed
over keys, then the mean over the B T queries (the report writes sum_t; the mean keeps the scale independent of
batch and length, as the LM loss's), or over the real ones where the trainer knows which (``real_queries``: chat
rows' padding is no data); each layer's L_I enters the step's loss at weight 1 (the report gives none:
the indexer's gradient comes from L_I alone, so a weight would only rescale it), summed over the indexer layers
(each indexer's gradient is its own layer's L_I's). The logged ``indexer_loss`` is the mean over layers. The trainer
clips sparse training's indexer gradients apart from the model's (``clip_apart``): one global norm would let L_I
scale the main model's step.

Memory: the target is computed in query chunks (``query_chunk``'s rule, or the gathered path's chunks), each under
``torch.utils.checkpoint`` so that backward recomputes a chunk's indexer scores rather than keeping the whole
sequence's (B, T, index heads, T): a dense chunk scores (B, C, H, t) attention and (B, C, index heads, t) indexer
logits over its t causal keys, a sparse one only its k picks ((B, C, H, k), absorbed as ``absorbed_attend``).
What waits for backward stays in the forward's dtype (the chunks' inputs, the keys' input: the keys are recomputed
too), each chunk widening its rows to FP32: ``flyer.cluster.costs.indexer_loss_saved_bytes_per_token`` counts it.

DeepSeek-V4's CSA layers compute their own L_I over the compressed entries (``flyer.model.hybrid_indexer_loss``);
the switches, clipping and collection here serve both.

Shapes: B batch, T tokens, H heads, C chunk rows, k index_topk, L = kv_lora_rank + qk_rope_head_dim.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from flyer.config import INDEXER_TRAIN_MODES
from flyer.model.dsa_chunks import SparseChunks, absorbed_weight
from flyer.model.hybrid_chunks import entry_picks, gather_entries, query_chunk
from flyer.model.recompute import recomputed


def clip_apart(model: nn.Module, clip_grad_norm_, max_norm: float) -> tuple[float, float]:
    """Clip the main model's gradients and the indexers' each to ``max_norm`` apart, as DeepSeek optimizes them apart
    (one global norm would let L_I scale the main model's step); (main norm, indexers' norm) before clipping.
    ``clip_grad_norm_(model, max_norm)``: the mesh's, which clips the gradients it finds (a collective on every rank
    alike), so each part's are set aside while the other's are clipped."""
    ids = {id(p) for m in indexer_attentions(model) for p in m.indexer.parameters()}
    main = [p for p in model.parameters() if id(p) not in ids]
    indexer = [p for p in model.parameters() if id(p) in ids]
    norms = []
    for hidden in (indexer, main):
        kept = [p.grad for p in hidden]
        for p in hidden:
            p.grad = None
        norms.append(float(clip_grad_norm_(model, max_norm)))
        for p, g in zip(hidden, kept):
            p.grad = g
    return norms[0], norms[1]


def clip_gradients(model: nn.Module, clip_grad_norm_, max_norm: float, mode: str) -> tuple[float, float | None]:
    """Clip ``model``'s gradients to ``max_norm`` with ``clip_grad_norm_(model, max_norm)`` (the mesh's): (the norm
    before clipping, None), or in ``mode`` "sparse" the main model's and the indexers' apart (``clip_apart``), both
    norms."""
    if mode != "sparse":
        return float(clip_grad_norm_(model, max_norm)), None
    return clip_apart(model, clip_grad_norm_, max_norm)


def per_document_loss(attn: nn.Module, run, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      docs) -> torch.Tensor:
    """An attention module's forward on packed rows, each group of ``docs`` as rows of its own
    (``Documents.each``; ``run(i, x, cos, sin)``: the module's forward on group i), with its L_I
    (``attn.index_loss``) the mean over the real queries of every group (the slots of ``Documents.each``'s real,
    within ``attn.index_valid_BT``'s), as the documents alone give: each group's mean back to its sum, then one
    division."""
    outer = attn.index_valid_BT
    real = docs.real if outer is None else docs.real & outer[:, outer.shape[1] - x_BTD.shape[1]:].to(docs.real)
    sums, counts = [], []

    def alone(i, x_NLD, cos_L, sin_L, real_NL):
        attn.index_valid_BT = real_NL
        try:
            out = run(i, x_NLD, cos_L, sin_L)
        finally:
            attn.index_valid_BT = outer
        if attn.index_loss is not None:
            n = real_NL.sum()
            sums.append(attn.index_loss * n)
            counts.append(n)
        return out

    out = docs.each(alone, x_BTD, cos, sin, real)
    if counts:
        attn.index_loss = torch.stack(sums).sum() / torch.stack(counts).sum().clamp(min=1)
    return out


def indexer_attentions(model: nn.Module) -> list[nn.Module]:
    """The attention modules of ``model`` that own a lightning indexer (MLA's full DSA layers, MTP blocks' included;
    DeepSeek-V4's CSA layers, whose L_I ``flyer.model.hybrid_indexer_loss`` computes)."""
    return [m for m in model.modules() if isinstance(getattr(m, "indexer", None), nn.Module)]


def indexer_depths(model: nn.Module) -> list[int]:
    """Each indexer layer's depth, in ``indexer_attentions`` order: 0 the main model's, k MTP module k's (its queries
    the T - k positions reading tokens k..T-1)."""
    return [int(name.split(".")[1]) + 1 if name.startswith("mtp.") else 0 for name, m in model.named_modules()
            if isinstance(getattr(m, "indexer", None), nn.Module)]


def set_indexer_training(model: nn.Module, mode: str) -> None:
    """Switch ``model``'s DSA layers to ``mode`` (``INDEXER_TRAIN_MODES``): "off" leaves the model as built (indexers
    frozen, no L_I); "warmup" freezes every parameter but the indexers', which train, and attention runs dense;
    "sparse" unfreezes the indexers and leaves the rest as it is, so a part of a model without any (a pipeline rank's
    stages of DeepSeek-V4, whose CSA layers are some layers only) trains as without. ValueError naming
    ``indexer_train`` for a warm-up of a model (or part) without indexers: it would train nothing."""
    if mode not in INDEXER_TRAIN_MODES:
        raise ValueError(f"indexer_train: must be one of {', '.join(INDEXER_TRAIN_MODES)} (got {mode!r})")
    layers = indexer_attentions(model)
    if mode == "off":
        return
    if not layers and mode == "warmup":
        raise ValueError("indexer_train: warmup trains the lightning indexers only, and the model (or this pipeline "
                         "rank's part of it) has none (attn 'mla' with index_topk > 0, or 'hybrid' with CSA layers)")
    if mode == "warmup":
        model.requires_grad_(False)
    for attn in layers:
        attn.indexer.requires_grad_(True)
        attn.index_train = mode


@contextlib.contextmanager
def real_queries(model: nn.Module, valid_BT: torch.Tensor | None):
    """While entered, ``model``'s indexer layers average L_I over the queries where ``valid_BT`` (B, T) bool, the
    forward's batch shape, is True (an MTP module's T - k positions: its last T - k columns, the token each reads);
    None: over every query, as outside."""
    layers = indexer_attentions(model) if valid_BT is not None else []
    for m in layers:
        m.index_valid_BT = valid_BT
    try:
        yield
    finally:
        for m in layers:
            m.index_valid_BT = None


def indexer_losses(model: nn.Module) -> list[torch.Tensor]:
    """Each indexer layer's L_I from ``model``'s last forward with autograd (FP32 scalars; none when "off")."""
    return [m.index_loss for m in indexer_attentions(model) if getattr(m, "index_loss", None) is not None]


def _target(attn: nn.Module, q_BCHd: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor,
            equation: str) -> torch.Tensor:
    """p: the main attention's probabilities of C queries q = [q_nope | q_rope] over their keys (the latents
    [c_KV | k_rope] ``keys``, shared (B, t, L) or per query (B, C, k, L), as ``equation`` contracts them), each
    head's FP32 softmax over its ``visible`` (B, C, t or k) keys, summed over heads and L1-normalised: (B, C, t or k).
    Scored absorbed (q_nope W_UK against c_KV), as ``absorbed_attend``."""
    nope, w = attn.qk_nope_head_dim, absorbed_weight(attn, torch.float32)
    q = q_BCHd.float()
    q_lat = torch.cat([torch.einsum("bchn,hnl->bchl", q[..., :nope], w[:, :nope]), q[..., nope:]], dim=-1)
    scores = torch.einsum(equation, q_lat, keys.float()) * attn.softmax_scale  # (B, C, H, t or k)
    p = scores.masked_fill(~visible.unsqueeze(2), float("-inf")).softmax(-1).sum(2)
    return p / p.sum(-1, keepdim=True)


def _kl(p: torch.Tensor, logits: torch.Tensor, visible: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """sum over rows of KL(p || softmax(logits)) over each row's ``visible`` entries (p is 0 elsewhere); ``rows``
    (B, C) bool: only those rows (None: all)."""
    log_q = logits.masked_fill(~visible, float("-inf")).log_softmax(-1).masked_fill(~visible, 0.0)
    kl = torch.xlogy(p, p) - p * log_q
    return kl.sum() if rows is None else kl.sum(-1).masked_fill(~rows, 0.0).sum()


def _keys(indexer: nn.Module, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The indexer's keys (B, T, index_head_dim) of x widened to FP32: recomputed in backward, so that x is kept in
    the forward's dtype and the projection's FP32 input is not kept at all."""
    return indexer.keys(x_BTD.float(), cos, sin)


def _dense_chunk(attn: nn.Module, x_BCD, q_latent_BCR, keys_BtK, cos, sin, q_BCHd, latents_BtL, rows_BC,
                 start: int):
    """Summed KL of queries [start, start + C) (those of ``rows_BC``; None: all) over their causal keys (the first
    t = start + C)."""
    B, C, _ = x_BCD.shape
    t = keys_BtK.shape[1]
    visible = (torch.arange(t, device=x_BCD.device).view(1, -1)
               <= torch.arange(start, start + C, device=x_BCD.device).view(-1, 1)).expand(B, C, t)
    with torch.no_grad():
        p = _target(attn, q_BCHd, latents_BtL, visible, "bchl,btl->bcht")
    return _kl(p, attn.indexer.scores(x_BCD, q_latent_BCR.float(), keys_BtK, cos, sin), visible, rows_BC)


def _picked_chunk(attn: nn.Module, x_BCD, q_latent_BCR, keys_BtK, cos, sin, q_BCHd, latents_BtL, rows_BC,
                  picks_BCk):
    """Summed KL of C queries (those of ``rows_BC``; None: all) over their k picks (``entry_picks``: -1 for an
    empty slot)."""
    ind = attn.indexer
    with torch.no_grad():
        picked, valid = gather_entries(latents_BtL, picks_BCk)
        p = _target(attn, q_BCHd, picked, valid, "bchl,bckl->bchk")
    keys, _ = gather_entries(keys_BtK, picks_BCk)  # (B, C, k, index_head_dim), with the indexer's gradient
    q, w = ind.queries(x_BCD, q_latent_BCR.float(), cos, sin)
    s = torch.relu(torch.einsum("bchd,bckd->bchk", q, keys.float()) * ind.head_dim ** -0.5)
    return _kl(p, torch.einsum("bch,bchk->bck", w, s), valid, rows_BC)


def indexer_kl(attn: nn.Module, x_BTD: torch.Tensor, q_latent_BTR: torch.Tensor, q_nope: torch.Tensor,
               q_rope: torch.Tensor, c_kv_BTC: torch.Tensor, k_rope_BTR: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, mask_B1TT: torch.Tensor | None, chunks: SparseChunks | None,
               chunk: int | None = None, valid_BT: torch.Tensor | None = None) -> torch.Tensor:
    """L_I of the DSA layer ``attn`` (an ``MLA`` with an indexer) for one forward: FP32 scalar, the mean over the
    B T queries of KL(p_t || softmax(I_t)) over S_t, which is each query's selection (``mask`` (B, 1, T, T) of the
    masked form, or the gathered form's ``chunks``) or, with neither (dense attention: the warm-up, or T <=
    index_topk), every causal key. x and the query latent (the indexer's inputs) are detached, the target (from
    q_nope (B, T, H, nope), q_rope (B, T, H, R), the latents c_KV (B, T, kv_lora_rank) and rope keys (B, T, R)) has
    no gradient: the loss's gradient reaches the indexer's parameters only. ``chunk``: query rows per dense or
    masked chunk (None: ``query_chunk``'s rule). ``valid_BT`` (B, T' >= T) bool: the mean is over the queries
    where its last T columns are True (``real_queries``); None: over all B T."""
    with torch.autocast(x_BTD.device.type, enabled=False):  # FP32 throughout: a BF16 softmax's p is no distribution
        # kept until backward in the forward's own dtype (a BF16 forward's would be twice the bytes in FP32): the
        # keys and each chunk widen what they read, and are recomputed from it
        return _indexer_kl(attn, x_BTD.detach(), q_latent_BTR.detach(),
                           torch.cat([q_nope, q_rope], dim=-1).detach(),
                           torch.cat([c_kv_BTC, k_rope_BTR], dim=-1).detach(), cos.float(), sin.float(),
                           mask_B1TT, chunks, chunk, valid_BT)


def _indexer_kl(attn, x, q_latent, q, latents, cos, sin, mask_B1TT, chunks, chunk, valid_BT) -> torch.Tensor:
    """``indexer_kl`` on its detached inputs in the forward's dtype (widened to FP32 a chunk at a time): q =
    [q_nope | q_rope], latents = [c_KV | k_rope]."""
    B, T, _ = x.shape
    keys = recomputed(_keys, attn.indexer, x, cos, sin, selective=False)
    valid = None if valid_BT is None else valid_BT[:, valid_BT.shape[1] - T:].to(x.device)
    if chunks is not None:
        spans = [(s.start, s.stop) for s in chunks.plan]
    else:
        C = chunk or query_chunk(B, T, attn.n_heads, 0, T, attn.indexer.n_heads)
        spans = [(s, min(s + C, T)) for s in range(0, T, C)]
    total = x.new_zeros((), dtype=torch.float32)
    for i, (s, e) in enumerate(spans):
        rows = slice(s, e)
        if chunks is not None:
            fn, args = _picked_chunk, (chunks.visible[i].picks,)
        elif mask_B1TT is not None:
            fn, args = _picked_chunk, (entry_picks(mask_B1TT[:, 0, rows, :e], attn.index_topk),)
        else:
            fn, args = _dense_chunk, (s,)
        inputs = (x[:, rows], q_latent[:, rows], keys[:, :e], cos[rows], sin[rows], q[:, rows], latents[:, :e],
                  None if valid is None else valid[:, rows], *args)
        # one chunk: as it is; several: each recomputed in backward, so their indexer scores are not all kept
        part = fn(attn, *inputs) if len(spans) == 1 else recomputed(fn, attn, *inputs, selective=False)
        total = total + part
    return total / (B * T if valid is None else valid.sum().clamp(min=1))  # no real query: 0
