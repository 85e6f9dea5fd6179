"""DeepSeek-V4's hybrid attention (attn "hybrid"): full-sequence path (training / prefill, no decode cache).

Every layer is multi-query attention with ONE shared key/value head (k = v) of ``head_dim`` channels, the last
``qk_rope_head_dim`` of each head rotating (layout [nope | rope]). Each query sees:

- the last ``window_size`` tokens, itself included (the sliding window);
- with ``compress_ratios[layer] = r > 0``, compressed entries: entry i pools the tokens of window i (i r ..
  i r + r - 1) by a softmax gate per channel (``Compressor``), and query t sees it once the window is complete
  (i < (t + 1) // r). HCA (r != ``csa_ratio``) sees every such entry; CSA (r = ``csa_ratio``) pools
  overlapping windows (entry i also takes window i - 1, through a second series of channels) and sees only
  the ``index_topk`` entries a lightning indexer (``Indexer``) scores highest.

Scores are softmaxed with a learned per-head sink logit (a column dropped after the softmax), so a head can
attend to nothing. Since values carry RoPE too (k = v), the output's rope channels are rotated back by the
query's position before the grouped low-rank output projection (``wo_a`` per head group, then ``wo_b``).

Numerics follow transformers' ``DeepseekV4Attention`` (no cache, eager attention); names and shapes are
DeepSeek's checkpoint's (``attn.wq_a``, ``attn.compressor.ape``, ``attn.indexer.compressor.wkv``, ...).
Long sequences run in chunks of queries (``flyer.model.hybrid_chunks``): a chunk scores only the band of tokens
its window reaches and the entries it may see, and under autograd is recomputed in backward, so neither the
(B, H, T, T + T / r) scores nor the indexer's (B, T, index heads, T / r) are formed. One chunk is the eager
whole-sequence computation, the oracle. Among several chunks, a CSA chunk past ``GATHER_OVER`` x index_topk
entries gathers each query's selected entries and scores only those (``Gathered``), rather than scoring all it
may see and masking the rest (``gather=False``: the same chunks masked, the oracle of that).

Shapes: B batch, T tokens, D model dim, H heads, d head_dim, N compressed entries (T // r), R q_lora_rank.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from flyer import kernels
from flyer.config import ModelConfig
from flyer.model.attention import select_topk
from flyer.model.counts import compress_ratio
from flyer.model.hybrid_chunks import (Gathered, chunked_attention, entry_picks, gathers, query_chunk, span_visible,
                                      spans)
from flyer.model.hybrid_indexer_loss import csa_indexer_kl
from flyer.model.indexer_loss import per_document_loss
from flyer.model.lowp import Linear, as_dtype, matmul
from flyer.model.transient import Transients
from flyer.model.norm import RMSNorm
from flyer.model.recompute import recomputed_if_recorded
from flyer.model.rope import apply_rope


def hybrid_rope_config(cfg: ModelConfig, layer_id: int) -> ModelConfig:
    """The config whose ``rope_cos_sin`` tables layer ``layer_id`` rotates with: window-only layers at
    ``rope_theta`` unscaled, compressed layers at ``compress_rope_theta`` with the config's scaling (YaRN).
    No cos/sin factor either way: V4's checkpoints do not scale them (transformers forces attention_factor 1)."""
    if compress_ratio(cfg, layer_id) == 0:
        return cfg.replace(rope_factor=1.0, rope_attn_factor=1.0)
    return cfg.replace(rope_theta=cfg.compress_rope_theta, rope_attn_factor=1.0)


def _head_scale(q_BTHd: torch.Tensor, eps: float) -> torch.Tensor:
    """(B, T, H, 1) in q's dtype: each head's 1 / rms, computed in FP32 (transformers' q_b_norm, no weight)."""
    q32 = as_dtype(q_BTHd, torch.float32)
    return as_dtype(torch.rsqrt(q32.square().mean(-1, keepdim=True) + eps), q_BTHd.dtype)


def rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rope`` on the last cos.shape[-1] channels of each head of x (B, T, H, d), the others as they are."""
    rd = cos.shape[-1]
    nope, pe = x.split([x.shape[-1] - rd, rd], dim=-1)  # one op, not two slices
    return torch.cat([nope, apply_rope(pe, cos, sin)], dim=-1)


class Compressor(nn.Module):
    """One entry of ``head_dim`` channels per ``ratio`` tokens: entry i = norm(sum_j softmax_j(gate_j + ape_j) kv_j)
    over the window's tokens j (softmax per channel, in FP32), then RoPE at position i * ratio.

    ``overlap`` (CSA): ``wkv`` / ``wgate`` / ``ape`` have 2 head_dim channels, two series a | b per token;
    entry i pools series b of window i with series a of window i - 1 (2 ratio slots; window 0 has no
    predecessor: those slots weigh 0)."""

    def __init__(self, dim: int, head_dim: int, ratio: int, overlap: bool, eps: float):
        super().__init__()
        self.head_dim, self.ratio, self.overlap = head_dim, ratio, overlap
        c = 2 if overlap else 1
        self.wkv = Linear(dim, c * head_dim, bias=False)
        self.wgate = Linear(dim, c * head_dim, bias=False)
        self.ape = nn.Parameter(torch.zeros(ratio, c * head_dim, dtype=torch.float32))  # per-slot gate bias
        self.norm = RMSNorm(head_dim, eps=eps)

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Entries (B, N, head_dim) of the N = T // ratio complete windows of x; cos/sin: tables at the tokens'
        positions 0..T-1 (the entries take rows 0, ratio, 2 ratio, ...)."""
        B, T, _ = x_BTD.shape
        r, d = self.ratio, self.head_dim
        N = T // r
        x = x_BTD[:, : N * r]  # an incomplete last window makes no entry
        kv = self.wkv(x).view(B, N, r, -1)
        gate = self.wgate(x).view(B, N, r, -1) + self.ape
        if self.overlap:  # slots [a of window i - 1 | b of window i]; window 0's a slots: kv 0, gate -inf
            kv = torch.cat([F.pad(kv[:, :-1, :, :d], (0, 0, 0, 0, 1, 0)), kv[..., d:]], dim=2)
            gate = torch.cat([F.pad(gate[:, :-1, :, :d], (0, 0, 0, 0, 1, 0), value=float("-inf")), gate[..., d:]],
                             dim=2)
        return self.pool(kv, gate, cos[: N * r : r], sin[: N * r : r])

    def pool(self, kv_BNSd: torch.Tensor, gate_BNSd: torch.Tensor, cos: torch.Tensor,
             sin: torch.Tensor) -> torch.Tensor:
        """Entries (B, N, head_dim) from each window's slots (kv and gate, ``ape`` added, overlap laid out): the
        per-channel softmax over slots (FP32) weighting kv, normalised, RoPE at the entries' cos/sin rows. The
        training path and the decode cache (``flyer.infer.hybrid_cache``) both pool here."""
        w = as_dtype(gate_BNSd.softmax(dim=2, dtype=torch.float32), kv_BNSd.dtype)
        entries = self.norm((kv_BNSd * w).sum(dim=2))
        return rope_tail(entries.unsqueeze(2), cos, sin).squeeze(2)


class Indexer(nn.Module):
    """CSA's lightning indexer: its own overlapping ``Compressor`` at ``index_head_dim`` gives the keys K_i;
    ``index_n_heads`` queries per token q_h = wq_b(q_latent) (the attention's normalised query latent), RoPE
    on their last ``qk_rope_head_dim`` channels; weights w_h = weights_proj(x) / sqrt(heads). Entry i scores
    sum_h w_h relu(q_h . K_i) / sqrt(index_head_dim) (FP32), and each query keeps its ``index_topk`` best.

    It only chooses entries (a discrete top-k, ``select``: without autograd), so no gradient of the model's loss
    reaches it: frozen unless trained by its KL loss against the attention (``flyer.model.hybrid_indexer_loss``:
    ``flyer train --indexer-train warmup|sparse``), as flyer's V3.2 ``Indexer``. DeepSeek's V4 reference
    Hadamard-rotates q and K and rounds them to FP4, as an FP8 decode cache does (``flyer.infer.hybrid_index_fp4``);
    transformers, followed here, does neither: the rotation is orthogonal, the FP4 a precision choice."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.weights_proj = Linear(cfg.dim, self.n_heads, bias=False)
        self.compressor = Compressor(cfg.dim, self.head_dim, cfg.csa_ratio, overlap=True, eps=cfg.norm_eps)
        self.requires_grad_(False)

    def keys(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The entries' keys (B, T // ratio, index_head_dim) of tokens x at positions 0..T-1 (cos/sin's)."""
        return self.compressor(x_BTD, cos, sin)

    def queries(self, x_BTD: torch.Tensor, q_latent_BTR: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the RoPE'd queries (B, T, heads, di) in the projection's dtype, the head weights (B, T, heads) in FP32 or
        wider) of queries x (tokens at cos/sin's positions) with the attention's query latents."""
        B, T, _ = x_BTD.shape
        q = rope_tail(self.wq_b(q_latent_BTR).view(B, T, self.n_heads, self.head_dim), cos, sin)
        dt = kernels.acc_dtype(x_BTD.dtype)
        with torch.autocast(x_BTD.device.type, enabled=False):
            return q, F.linear(as_dtype(x_BTD, dt), as_dtype(self.weights_proj.weight, dt)) * self.n_heads ** -0.5

    def scores(self, x_BTD: torch.Tensor, q_latent_BTR: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, keys_BNK: torch.Tensor | None = None,
               queries: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Index scores (B, T, N) in FP32 (FP64 for FP64 x) of queries x (tokens at cos/sin's positions) against
        every entry, unmasked; ``keys``: the entries' keys (``keys``, a decode cache's, or the first N of them for a
        chunk of queries), else compressed from x (then x must be the whole sequence from position 0). ``queries``:
        maps the RoPE'd queries (B, T, heads, di) to the form the keys are in (an FP8 decode cache's rotated FP4
        keys: ``HybridCache.index_queries``); None: as they are."""
        keys = self.keys(x_BTD, cos, sin) if keys_BNK is None else keys_BNK  # (B, N, di)
        q, w = self.queries(x_BTD, q_latent_BTR, cos, sin)
        q = q if queries is None else queries(q)
        with torch.autocast(x_BTD.device.type, enabled=False):  # FP32 even under autocast: BF16 scores would tie
            s = torch.relu(torch.matmul(as_dtype(q, w.dtype), as_dtype(keys, w.dtype).transpose(-1, -2).unsqueeze(1)))
            return (s * self.head_dim ** -0.5 * w.unsqueeze(-1)).sum(dim=2)  # (B, T, heads, N) -> (B, T, N)

    @torch.no_grad()  # a discrete choice: no gradient (the KL loss trains the indexer, not this)
    def select(self, x_BTD: torch.Tensor, q_latent_BTR: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               visible_TN: torch.Tensor, keys_BNK: torch.Tensor | None = None) -> torch.Tensor:
        """Bool (B, T, N): the ``index_topk`` best of the entries ``visible_TN`` lets each query see (``scores``'
        arguments). A chunk of queries given the first N keys selects as the whole sequence does: an entry it
        cannot see is never selected nor counted (``select_topk``)."""
        scores = self.scores(x_BTD, q_latent_BTR, cos, sin, keys_BNK)
        return select_topk(scores, visible_TN.expand_as(scores), self.topk)


class HybridAttention(Transients, nn.Module):
    """DeepSeek-V4 attention of layer ``layer_id``, by ``cfg.compress_ratios[layer_id]``: 0 = sliding window
    only, ``csa_ratio`` = CSA, any other r > 0 = HCA (see the module docstring); an MTP block's (``n_layers``
    onward) attends by the window only, as DeepSeek-V4's (``flyer.model.counts.compress_ratio``)."""

    TRANSIENT = ("index_loss",)

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        H, d, D, R = cfg.n_heads, cfg.head_dim, cfg.dim, cfg.q_lora_rank
        self.n_heads, self.head_dim, self.o_groups = H, d, cfg.o_groups
        self.window, self.ratio, self.eps = cfg.window_size, compress_ratio(cfg, layer_id), cfg.norm_eps
        self.softmax_scale = cfg.softmax_scale
        self.wq_a = Linear(D, R, bias=False)
        self.q_norm = RMSNorm(R, eps=cfg.norm_eps)
        self.wq_b = Linear(R, H * d, bias=False)
        self.wkv = Linear(D, d, bias=False)
        self.kv_norm = RMSNorm(d, eps=cfg.norm_eps)
        self.wo_a = Linear(H * d // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, bias=False)  # per group: see output
        self.wo_b = Linear(cfg.o_groups * cfg.o_lora_rank, D, bias=False)
        self.attn_sink = nn.Parameter(torch.zeros(H, dtype=torch.float32))
        # chosen once: a window-only layer has neither submodule, so its state dict is the checkpoint's
        self.compressor = (Compressor(D, d, self.ratio, overlap=cfg.is_csa(layer_id), eps=cfg.norm_eps)
                           if self.ratio > 0 else None)
        self.indexer = Indexer(cfg) if cfg.is_csa(layer_id) else None
        # CSA's L_I (flyer.model.indexer_loss.set_indexer_training): "off", "warmup" (every complete entry attended)
        # or "sparse"; the queries it averages over (``real_queries``; None: all)
        self.index_train, self.index_loss = "off", None
        self.index_valid_BT: torch.Tensor | None = None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """This module's own parameters as initialised: sinks 0 (their softmax column starts at logit 0) and
        the compressors' gate biases 0; the linears and norms are initialised as modules of their own."""
        self.attn_sink.zero_()
        for m in self.modules():
            if isinstance(m, Compressor):
                m.ape.zero_()

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, chunk: int | None = None,
                gather: bool = True, docs=None) -> torch.Tensor:
        """x (B, T, D) at positions 0..T-1 -> (B, T, D); cos/sin: ``rope_cos_sin`` tables (T, 1, qk_rope_head_dim)
        of ``hybrid_rope_config(cfg, layer_id)``. ``chunk``: queries per chunk (``flyer.model.hybrid_chunks``);
        None: ``query_chunk``'s rule from the shapes (128 rows or the window if wider, fewer where a memory budget
        binds); T or more: one chunk, the eager whole-sequence computation (masked). ``gather``: with several
        chunks, CSA chunks past ``GATHER_OVER`` x index_topk entries attend to their queries' picks gathered
        (``Gathered``); False: they score every entry they may see and mask the unselected ones (the same maths,
        the oracle). ``docs``: packed rows' ``flyer.model.documents.Documents`` (cos / sin then at the packed
        positions, (B, T, 1, d)): each group of documents runs this forward as rows of their own, so windows,
        compression blocks and selection start at each document's first token (``Documents.each``)."""
        if docs is not None and self.indexer is not None and self.index_train != "off":
            return self.per_document(x_BTD, cos, sin, chunk, gather, docs)
        if docs is not None:
            return docs.each(lambda i, x, c, s, real: self.forward(x, c, s, chunk, gather), x_BTD, cos, sin)
        B, T, _ = x_BTD.shape
        q_latent, q = self.queries(x_BTD, cos, sin)
        kv = self.shared_kv(x_BTD, cos, sin)
        N = T // self.ratio if self.ratio else 0
        entries = self.compressor(x_BTD, cos, sin) if N > 0 else kv.new_zeros(B, 0, self.head_dim)  # (B, N, d)
        trains = self.indexer is not None and self.index_train != "off"
        # else every complete entry is kept (the indexer's dense warm-up, V3.2's recipe: attention over all of them)
        indexed = self.indexer is not None and N > self.indexer.topk and self.index_train != "warmup"
        with torch.no_grad():  # the selection is discrete: no graph
            index_keys = self.indexer.keys(x_BTD, cos, sin) if indexed else None
        topk = self.indexer.topk if indexed and gather and gathers(N, self.indexer.topk) else 0  # 0: none gathers
        if chunk is None:
            chunk = query_chunk(B, T, self.n_heads, self.window, N, self.indexer.n_heads if indexed or trains else 0,
                                topk=topk, head_dim=self.head_dim)
        plan = spans(T, chunk, self.window, self.ratio)
        topk = topk if len(plan) > 1 else 0  # one chunk: the eager whole-sequence computation, masked
        visible = []
        for s in plan:
            v = span_visible(s, self.window, self.ratio, x_BTD.device).expand(B, -1, -1)
            if indexed and s.n_entries > self.indexer.topk:  # a chunk seeing fewer keeps them all, as select would
                rows = slice(s.start, s.stop)
                chosen = self.indexer.select(x_BTD[:, rows], q_latent[:, rows], cos[rows], sin[rows],
                                             v[..., s.n_keys:], index_keys[:, :s.n_entries])
                if gathers(s.n_entries, topk):
                    band = v[0, :, :s.n_keys].clone().expand(B, -1, -1)  # its own storage: saved for backward
                    visible.append(Gathered(band, entry_picks(chosen, topk)))
                    continue
                v = torch.cat([v[..., :s.n_keys], chosen], dim=-1)
            visible.append(v)
        if trains:  # evaluation (no autograd) computes none
            self.index_loss = csa_indexer_kl(self, x_BTD, q_latent, q, kv, entries, cos, sin, plan, visible,
                                             self.index_valid_BT) if torch.is_grad_enabled() else None
        o = chunked_attention(self.attend, plan, q, kv, entries, visible, params=(self.attn_sink,))
        return self.output(o, cos, sin)

    def per_document(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, chunk: int | None,
                     gather: bool, docs) -> torch.Tensor:
        """``forward`` on packed rows: each group of ``docs`` as rows of their own (``Documents.each``). A trained
        CSA indexer's L_I: the mean over the real queries of every group (the slots of ``Documents.each``'s real,
        within ``index_valid_BT``'s), as the documents alone give."""
        return per_document_loss(self, lambda i, x, c, s: self.forward(x, c, s, chunk, gather), x_BTD, cos, sin,
                                 docs)

    def queries(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the normalised query latent (B, T, R), which the indexer projects too; the queries (B, T, H, d): each
        head RMS-normalised without a weight, the scale in FP32 (transformers' q_b_norm), then RoPE). Under
        autograd the scale is recomputed in backward from q, which the product keeps anyway: the FP32 copy of a BF16
        q that its square saved (4 H d bytes a token) is not kept."""
        B, T, _ = x_BTD.shape
        q_latent = self.q_norm(self.wq_a(x_BTD))
        q = self.wq_b(q_latent).view(B, T, self.n_heads, self.head_dim)
        return q_latent, rope_tail(q * recomputed_if_recorded(_head_scale, q, self.eps), cos, sin)

    def shared_kv(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The one key/value head (B, T, 1, d) of tokens x: k = v, normalised, RoPE on its last channels."""
        return rope_tail(self.kv_norm(self.wkv(x_BTD)).unsqueeze(2), cos, sin)

    def attend(self, q_BTHd: torch.Tensor, kv_BS1d: torch.Tensor, visible_BTS: torch.Tensor,
               picked_BTkd: torch.Tensor | None = None, picked_BTk: torch.Tensor | None = None) -> torch.Tensor:
        """softmax([q k^T * scale | sink_h]) without the sink's column, times v = k: (B, T, H, d), for queries q,
        the shared keys kv (the window's tokens then the compressed entries) and what each query sees
        (bool, True = visible). Softmax in FP32; a query always sees itself, so no row is empty. ``picked``: k
        keys of each query's own (a CSA chunk's gathered entries, (B, T, k, d)) and which of its slots count
        (bool (B, T, k)), scored after the shared keys in the same softmax: [shared | picked | sink]."""
        B, T, H, d = q_BTHd.shape
        S = kv_BS1d.shape[1]
        # the heads folded into one GEMM's rows against the one shared key head: a (B, H, T, d) @ (B, 1, d, S)
        # broadcast would copy the keys once per head and run a matrix-vector product per head at decode (T = 1)
        q, kv = q_BTHd.transpose(1, 2).reshape(B, H * T, d), kv_BS1d.reshape(B, S, d)
        scores = as_dtype(matmul(q, kv.transpose(-1, -2)) * self.softmax_scale, torch.float32).view(B, H, T, S)
        scores = torch.where(visible_BTS.unsqueeze(1), scores, float("-inf"))  # masked_fill would need ~visible too
        cols = [scores]
        if picked_BTkd is not None:  # per query (batched over B, T): (H, d) @ (d, k)
            own = as_dtype(matmul(q_BTHd, picked_BTkd.transpose(-1, -2)) * self.softmax_scale,
                           torch.float32)  # (B, T, H, k)
            cols.append(torch.where(picked_BTk.unsqueeze(2), own, float("-inf")).transpose(1, 2))
        sink = as_dtype(self.attn_sink, torch.float32).view(1, H, 1, 1).expand(B, H, T, 1)
        p = torch.cat([*cols, sink], dim=-1).softmax(dim=-1)
        o = matmul(as_dtype(p[..., :S], kv.dtype).reshape(B, H * T, S), kv).view(B, H, T, d)
        if picked_BTkd is not None:  # (B, T, H, k) @ (B, T, k, d)
            p_own = as_dtype(p[..., S:-1].transpose(1, 2), picked_BTkd.dtype)
            o = o + matmul(p_own, picked_BTkd).transpose(1, 2)
        return o.transpose(1, 2)

    def output(self, o_BTHd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """(B, T, D) from the heads' outputs: their rope channels rotated back by the query's position (values
        carried RoPE: k = v), then head group g through its o_lora_rank rows of ``wo_a``, then ``wo_b``."""
        B, T, H, d = o_BTHd.shape
        G = self.o_groups
        o = rope_tail(o_BTHd, cos, -sin).reshape(B, T, G, H * d // G)
        return self.wo_b(self.wo_a.grouped(o).flatten(2))  # wo_a's module: plain, held or FP8 (``grouped``)
