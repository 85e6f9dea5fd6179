"""Training DeepSeek-V4's CSA lightning indexer by its KL loss (``flyer train --indexer-train warmup|sparse``).

DeepSeek's V4 release has no indexer training code (its inference code, as transformers' port, runs the indexer
frozen), and the V4 report's CSA section (2.3.1) defines the indexer's scores and top-k but, as far as flyer could
check, no loss of its own; so flyer carries V3.2's L_I (``flyer.model.indexer_loss``, the V3.2 report's section 2.1)
over to the compressed entries a CSA query chooses among. For query t and the entries S_t it attends to:

    L_I = mean_t KL(p_t,S_t || softmax(I_t,S_t)),

p_t,i each head's probability of entry i in the layer's own softmax (over [window tokens | entries | sink], as
``HybridAttention.attend``), summed over the heads and L1-normalised over S_t, without gradient; I_t,i the index
score. The whole softmax rather than one over the entries alone: it is the attention's own distribution on them,
so a head that mostly reads its window weighs less in the target (which entries it gets matters less to it).

- ``warmup``: S_t = every complete entry (attention dense over them, no selection), every parameter but the
  indexers' frozen;
- ``sparse``: S_t = the query's top-k selection (its chunk's mask, or its gathered picks ``Gathered``), the
  indexer's inputs (the layer's input x and its query latent) detached: the indexer learns from L_I alone, the rest
  of the model from the LM loss alone.

As V3.2's (followed where the reports are silent): the mean over the B T queries (or the real ones, ``valid_BT``;
a query that sees no entry yet, t < ratio - 1, adds 0), computed in FP32 (FP64 for FP64 inputs), in the attention's
own query chunks (``flyer.model.hybrid_chunks``: each chunk scores its band and the entries it may see, or its
picks), each under ``torch.utils.checkpoint`` so backward recomputes a chunk's indexer scores rather than keeping
the whole sequence's (B, T, index heads, N).

Shapes: B batch, T tokens, H heads, d head_dim, C chunk rows, S a chunk's band of tokens, n its entries (or k
picks per query), di index_head_dim.
"""

from __future__ import annotations

import torch
from torch import nn

from flyer.model.hybrid_chunks import Gathered, Span, gather_entries
from flyer.model.recompute import recomputed


def csa_indexer_kl(attn: nn.Module, x_BTD: torch.Tensor, q_latent_BTR: torch.Tensor, q_BTHd: torch.Tensor,
                   kv_BT1d: torch.Tensor, entries_BNd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   plan: list[Span], visible: list, valid_BT: torch.Tensor | None = None) -> torch.Tensor:
    """L_I of the CSA layer ``attn`` (a ``HybridAttention`` with an indexer) for one forward: a scalar, the mean
    over the B T queries of KL(p_t || softmax(I_t)) over the entries S_t query t attends to. Its inputs are the
    forward's: x (B, T, D) and the query latent (B, T, R) (the indexer's, detached here), the queries (B, T, H, d),
    the tokens' keys (B, T, 1, d) and the entries (B, N, d) (the target's, without gradient), cos / sin (T, 1, rope)
    and the attention's chunks ``plan`` with each one's visibility (a mask (B, C, S + n) over its band then its
    entries, or a ``Gathered``). ``valid_BT`` (B, T' >= T) bool: the mean is over the queries where its last T
    columns are True (``real_queries``); None: over all B T. The loss's gradient reaches the indexer only."""
    wide = torch.promote_types(x_BTD.dtype, torch.float32)  # a BF16 softmax's p is no distribution
    with torch.autocast(x_BTD.device.type, enabled=False):
        # kept until backward in the forward's own dtype (a BF16 forward's would be twice the bytes in FP32): the
        # keys and each chunk widen what they read, and are recomputed from it
        x, q_latent, q, kv, entries = (t.detach() for t in (x_BTD, q_latent_BTR, q_BTHd, kv_BT1d, entries_BNd))
        B, T, _ = x.shape
        valid = None if valid_BT is None else valid_BT[:, valid_BT.shape[1] - T:].to(x.device)
        ind = attn.indexer
        chunks = [(s, m) for s, m in zip(plan, visible) if s.n_entries > 0]
        if not chunks:  # no query sees an entry (T < ratio): 0, on the indexer's graph so a warm-up backward runs
            return sum(p.sum() for p in ind.parameters()) * 0.0
        keys = recomputed(_keys, ind, x, cos.to(wide), sin.to(wide), selective=False)  # (B, N, di), with its gradient
        total = x.new_zeros((), dtype=wide)
        for s, m in chunks:
            rows = slice(s.start, s.stop)
            inputs = (x[:, rows], q_latent[:, rows], cos[rows].to(wide), sin[rows].to(wide), q[:, rows],
                      kv[:, s.key_start:s.stop], entries[:, :s.n_entries], keys[:, :s.n_entries],
                      None if valid is None else valid[:, rows])
            if isinstance(m, Gathered):
                fn, vis = _gathered_chunk, (m.band, m.picks)
            else:
                fn, vis = _masked_chunk, (m[..., :s.n_keys], m[..., s.n_keys:])
            # one chunk: as it is; several: each recomputed in backward, so their indexer scores are not all kept
            part = fn(attn, *inputs, *vis) if len(plan) == 1 else recomputed(fn, attn, *inputs, *vis, selective=False)
            total = total + part
        return total / (B * T if valid is None else valid.sum().clamp(min=1))  # no real query: 0


def _target(attn: nn.Module, q_BCHd: torch.Tensor, band_BS1d: torch.Tensor, band_BCS: torch.Tensor,
            own: torch.Tensor, own_BCn: torch.Tensor, equation: str) -> torch.Tensor:
    """p (B, C, n): each head's probability of the entries ``own`` (shared (B, n, d) or per query (B, C, k, d), as
    ``equation`` contracts them with q) in the softmax of [band keys | entries | sink] (``band_BCS`` and ``own_BCn``
    bool: which ones each query sees), summed over the heads and L1-normalised over the entries (0 for a query
    seeing none)."""
    B, C, H, _ = q_BCHd.shape
    band = torch.einsum("bchd,bsd->bchs", q_BCHd, band_BS1d[:, :, 0]) * attn.softmax_scale
    entry = torch.einsum(equation, q_BCHd, own) * attn.softmax_scale  # (B, C, H, n)
    sink = attn.attn_sink.detach().to(q_BCHd.dtype).view(1, 1, H, 1).expand(B, C, H, 1)
    p = torch.cat([band.masked_fill(~band_BCS.unsqueeze(2), float("-inf")),
                   entry.masked_fill(~own_BCn.unsqueeze(2), float("-inf")), sink], dim=-1).softmax(-1)
    p = p[..., band.shape[-1]:-1].sum(2)
    return p / p.sum(-1, keepdim=True).clamp(min=torch.finfo(p.dtype).tiny)


def _logits(ind: nn.Module, x_BCD, q_latent_BCR, cos, sin, keys: torch.Tensor, equation: str) -> torch.Tensor:
    """Index scores (B, C, n) of C queries against ``keys`` (shared (B, n, di) or per query (B, C, k, di)), as
    ``Indexer.scores``: sum_h w_h relu(q_h . K) / sqrt(di)."""
    q, w = ind.queries(x_BCD, q_latent_BCR, cos, sin)
    s = torch.relu(torch.einsum(equation, q.to(w.dtype), keys.to(w.dtype))) * ind.head_dim ** -0.5
    return torch.einsum("bch,bchn->bcn", w, s)


def _kl(p: torch.Tensor, logits: torch.Tensor, visible: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """sum over rows of KL(p || softmax(logits)) over each row's ``visible`` entries (p is 0 elsewhere, and on a
    row seeing none); ``rows`` (B, C) bool: only those rows (None: all)."""
    open_ = visible | ~visible.any(-1, keepdim=True)  # a row seeing no entry: any finite log q (its p is 0)
    log_q = logits.masked_fill(~open_, float("-inf")).log_softmax(-1).masked_fill(~visible, 0.0)
    kl = (torch.xlogy(p, p) - p * log_q).sum(-1)
    return kl.sum() if rows is None else kl.masked_fill(~rows, 0.0).sum()


def _wide(dtype: torch.dtype, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` in ``dtype`` (the loss's, cos / sin's): a chunk's rows of what ``csa_indexer_kl`` keeps in the
    forward's dtype."""
    return tuple(t.to(dtype) for t in tensors)


def _keys(indexer: nn.Module, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The index keys (B, N, di) of x widened as cos / sin are: recomputed in backward, so that x is kept in the
    forward's dtype and the compressor's wide projections are not kept at all."""
    return indexer.keys(x_BTD.to(cos.dtype), cos, sin)


def _masked_chunk(attn: nn.Module, x_BCD, q_latent_BCR, cos, sin, q_BCHd, band_BS1d, entries_BnD, keys_Bnk, rows_BC,
                  band_BCS, entries_BCn) -> torch.Tensor:
    """Summed KL of a chunk's queries (those of ``rows_BC``; None: all) over the entries its mask lets each see."""
    x_BCD, q_latent_BCR, q_BCHd, band_BS1d, entries_BnD = _wide(cos.dtype, x_BCD, q_latent_BCR, q_BCHd, band_BS1d,
                                                                entries_BnD)
    with torch.no_grad():
        p = _target(attn, q_BCHd, band_BS1d, band_BCS, entries_BnD, entries_BCn, "bchd,bnd->bchn")
    logits = _logits(attn.indexer, x_BCD, q_latent_BCR, cos, sin, keys_Bnk, "bchd,bnd->bchn")
    return _kl(p, logits, entries_BCn.expand_as(p), rows_BC)


def _gathered_chunk(attn: nn.Module, x_BCD, q_latent_BCR, cos, sin, q_BCHd, band_BS1d, entries_BnD, keys_Bnk,
                    rows_BC, band_BCS, picks_BCk) -> torch.Tensor:
    """Summed KL of a gathering chunk's queries (those of ``rows_BC``; None: all) over their k picks
    (``entry_picks``: -1 for an empty slot)."""
    x_BCD, q_latent_BCR, q_BCHd, band_BS1d, entries_BnD = _wide(cos.dtype, x_BCD, q_latent_BCR, q_BCHd, band_BS1d,
                                                                entries_BnD)
    with torch.no_grad():
        picked, valid = gather_entries(entries_BnD, picks_BCk)
        p = _target(attn, q_BCHd, band_BS1d, band_BCS, picked, valid, "bchd,bckd->bchk")
    keys, _ = gather_entries(keys_Bnk, picks_BCk)  # (B, C, k, di), with the indexer's gradient
    return _kl(p, _logits(attn.indexer, x_BCD, q_latent_BCR, cos, sin, keys, "bchd,bckd->bchk"), valid, rows_BC)
