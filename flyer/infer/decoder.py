"""The model run incrementally against a cache.

``Decoder.forward(tokens_BT, start_B)`` feeds T new tokens per row at positions
``start_b .. start_b + T - 1`` (each row has its own position, so prompts of different lengths
batch together without left padding), writes their cache entries and returns the hidden states
before the final norm. It reuses the model's own modules (norms, projections, MoE) and only
replaces the attention core, so the training path ``Transformer.forward`` is its oracle.

The first MTP module gets its own one-layer cache (its block attends over earlier positions too):
``mtp_forward(h_BTD, next_tokens_BT, start_B)`` computes h^1_i from the main model's h_i and the
token t_{i+1}, as in training.

``forward_groups`` runs several such batches (``Group``s, e.g. the server's decoding rows and its
prefill chunks) as one pass: attention per group, everything else (embedding, norms, the MoE with
its routed experts' weights) once over all groups' real tokens, so a step reads the weights once.

DeepSeek-V4 (attn "hybrid") decodes against ``flyer.infer.hybrid_cache.HybridCache`` (windows and
compressed entries), its layers run as ``Block.forward`` runs them: hyper-connection streams around
each sub-block, hash-routed MoE layers given the token ids. With MTP its hidden states are the last
residual's streams (B, T, N, D), before ``hc_head`` (what ``HyperMTPModule`` reads; ``logits`` collapses
them), and the MTP block's window-only layer gets a one-layer ``HybridCache``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Collection

import torch

from flyer.infer.attention import Rows, dsa_absorbed, dsa_naive, gqa_cached, mla_absorbed, mla_naive
from flyer.infer.cache import make_cache
from flyer.infer.hybrid_cache import HybridCache, hybrid_attention, hybrid_rows, hybrid_tables
from flyer.model.experts import Experts
from flyer.model.hybrid import hybrid_rope_config
from flyer.model.rope import rope_cos_sin
from flyer.model.transformer import Block, Transformer


@dataclass
class Group:
    """One batch of ``Decoder.forward_groups``: ``tokens`` (B, T) at positions start_b + t;
    ``lengths``: each row's real tokens (the rest of the row is padding, which attention computes
    and everything else skips; None: all T); ``cache``: the cache its rows live in (a paged
    cache's view with their block tables; None: the decoder's own)."""

    tokens: torch.Tensor
    start: torch.Tensor
    lengths: list[int] | None = None
    cache: object = None


class _Pack:
    """A group's place in the packed sequence: its real tokens are rows [off, off + n)."""

    def __init__(self, g: Group, rows: Rows, cache):
        B, T = g.tokens.shape
        self.rows, self.cache, self.B, self.T, self.off = rows, cache, B, T, 0
        flat = g.tokens.reshape(-1)
        if g.lengths is None or min(g.lengths) == T:
            self.real = self.src = None
            self.token_ids, self.n = flat, B * T
            return
        dev = g.tokens.device
        lengths = torch.tensor(g.lengths, device=dev)
        keep = (torch.arange(T, device=dev) < lengths.view(-1, 1)).reshape(-1)
        self.real = keep.nonzero().view(-1)  # the padded position of each real token
        # the packed row of each position; right padding reads its row's last real token
        self.src = torch.cumsum(keep, 0).sub_(1).clamp_(min=0)
        self.token_ids, self.n = flat.index_select(0, self.real), int(self.real.numel())

    def unpack(self, x_ND: torch.Tensor) -> torch.Tensor:
        """Packed rows (n, D) -> the group's (B, T, D)."""
        return (x_ND if self.src is None else x_ND.index_select(0, self.src)).view(self.B, self.T, -1)

    def pack(self, y_BTD: torch.Tensor) -> torch.Tensor:
        """The group's (B, T, D) -> its real tokens' rows (n, D)."""
        y = y_BTD.reshape(self.B * self.T, -1)
        return y if self.real is None else y.index_select(0, self.real)


class Decoder:
    """``model`` in eval mode; ``mode``: "absorbed" (latent cache) or "naive" (per-head K/V; GQA
    models always use their per-KV-head cache); a model with DSA's indexer (V3.2) caches its keys in
    either. ``with_mtp`` also allocates the MTP module's cache.
    ``cache`` / ``mtp_cache``: caches made elsewhere with the same interface (write / read /
    read_packed; the server's paged caches), used instead of preallocated ones. A hybrid model
    (``mode`` ignored) takes ``HybridCache``s (its MTP cache: one window-only layer)."""

    def __init__(self, model: Transformer, batch: int, max_len: int, mode: str = "absorbed",
                 cache_dtype: torch.dtype = torch.bfloat16, with_mtp: bool = False, cache=None, mtp_cache=None):
        self.model, self.cfg = model, model.cfg
        device = model.embed.weight.device
        if with_mtp and len(model.mtp) == 0:
            raise ValueError("speculative decoding with MTP needs a model with mtp_depth >= 1")
        self.streams_out = False  # hidden states are the streams (B, T, N, D): a hybrid model with MTP
        if self.cfg.attn == "hybrid":
            with_mtp = with_mtp or mtp_cache is not None
            self._init_hybrid(batch, max_len, cache_dtype, with_mtp, cache, device)
            if with_mtp and mtp_cache is None:
                mtp_cache = HybridCache(self.cfg, batch, max_len, cache_dtype, device, ratios=(0,))
        else:
            self.cache = cache or make_cache(self.cfg, self.cfg.n_layers, batch, max_len, mode, cache_dtype, device)
            self._new_rows, self._layers = self._rows, self._plain_layers
        if with_mtp and mtp_cache is None:
            mtp_cache = make_cache(self.cfg, 1, batch, max_len, mode, cache_dtype, device)
        self.mtp_cache = mtp_cache
        if self.cfg.attn == "hybrid":
            self._attend = hybrid_attention
        elif self.cfg.attn == "gqa":
            self._attend = gqa_cached
        elif self.cfg.index_topk:  # DSA (V3.2): the indexer keys cached and scored too, the MTP block's as well;
            # GLM-5's shared layers attend to the last full layer's selection, which each forward's Rows carries
            self._attend = dsa_absorbed if mode == "absorbed" else dsa_naive
        else:
            self._attend = mla_absorbed if mode == "absorbed" else mla_naive
        for m in model.modules():  # the routed experts' w1|w3 stacked once, not per forward
            if isinstance(m, Experts):
                m.pack_w13_()
        self.cos, self.sin = model.rope_tables(max_len, device)  # (max_len, 1, rope)
        self.max_len = max_len

    def _init_hybrid(self, batch: int, max_len: int, cache_dtype: torch.dtype, with_mtp: bool, cache,
                     device) -> None:
        self.cache = cache or HybridCache(self.cfg, batch, max_len, cache_dtype, device)
        tables = hybrid_tables(self.cfg, max_len, device)
        self._new_rows = functools.partial(hybrid_rows, tables, max_len)
        self._layers = self._hybrid_layers
        if with_mtp:  # the MTP block attends by the window only, rotating as the window-only layers do (their table)
            window = tables.get(False) or rope_cos_sin(self.cfg.rope_dim, max_len,
                                                       hybrid_rope_config(self.cfg, self.cfg.n_layers), device)
            self._mtp_rows = functools.partial(hybrid_rows, {False: window}, max_len)
            self.streams_out = True

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep batch rows ``rows`` of every cache (finished rows leave the batch)."""
        self.cache.keep_rows(rows)
        if self.mtp_cache is not None:
            self.mtp_cache.keep_rows(rows)

    def bytes_per_token(self) -> int:
        """Main-model cache bytes per token (what ``flyer info`` reports for a BF16 cache)."""
        return self.cache.bytes_per_token()

    def mtp_bytes_per_token(self) -> int:
        """The MTP module's cache bytes per token (speculation, a prefix cache's MTP rows): 0 without one."""
        return self.mtp_cache.bytes_per_token() if self.mtp_cache is not None else 0

    def _rows(self, start_B: torch.Tensor, T: int, shift: int = 0, lengths: list[int] | None = None) -> Rows:
        """Rows of T new tokens per row from ``start_B``, in cache slots ``shift`` past their positions.
        ``lengths``: each row's real tokens; the padding after them may run past ``max_len`` (a row
        near the end of the context batched with a longer one), so its positions are clamped to the
        last one: past the row's real tokens either way, where its writes are overwritten later."""
        pos = start_B.view(-1, 1) + torch.arange(T, device=start_B.device)
        if lengths is not None:
            ends = [s + n for s, n in zip(start_B.tolist(), lengths)]
            if max(ends) > self.max_len:
                raise ValueError(f"position {max(ends) - 1} exceeds the decoder's max_len {self.max_len}")
            if any(e == self.max_len and n < T for e, n in zip(ends, lengths)):
                raise ValueError(f"padding after position {self.max_len - 1} would overwrite a real token's slot")
            pos = pos.clamp(max=self.max_len - 1)
        S = int(pos.max()) + 1
        if S > self.max_len:
            raise ValueError(f"position {S - 1} exceeds the decoder's max_len {self.max_len}")
        return self._rows_at(pos, S + shift, shift)

    def decode_rows(self, start_B: torch.Tensor, n_slots: int, shift: int = 0) -> Rows:
        """Rows of one new token per row at positions ``start_B``, in slots ``shift`` past them (as ``_rows``),
        attending over ``n_slots`` slots, which the caller knows bound every slot (no maximum read back from the
        device: a step a CUDA graph replays, ``flyer.serve.graphs``); slots past a row's are masked as ever."""
        return self._rows_at(start_B.view(-1, 1), n_slots, shift)

    def _rows_at(self, pos_BT: torch.Tensor, n_slots: int, shift: int) -> Rows:
        slots = pos_BT + shift if shift else pos_BT
        return Rows(slots, self.cos[pos_BT], self.sin[pos_BT], n_slots, first=shift)  # its mask made where needed

    def _block(self, block: Block, x: torch.Tensor, cache, layer: int, rows: Rows) -> torch.Tensor:
        x = x + self._attend(block.attn, block.attn_norm(x), rows, cache, layer)
        return block.ffn_residual(x)

    @torch.inference_mode()
    def forward(self, tokens_BT: torch.Tensor, start_B: torch.Tensor, lengths: list[int] | None = None) -> torch.Tensor:
        """Hidden states (B, T, D) before the final norm; writes the cache at the T positions
        (``lengths``: each row's real tokens, as in ``Group``)."""
        return self.forward_groups([Group(tokens_BT, start_B, lengths)])[0]

    @torch.inference_mode()
    def forward_groups(self, groups: list[Group]) -> list[torch.Tensor]:
        """``forward`` of each group (its hidden states (B, T, D); positions past a row's length
        hold another token's state) in one pass: the groups' real tokens packed into one sequence
        for everything but attention."""
        packs = [_Pack(g, self._new_rows(g.start, g.tokens.shape[1], lengths=g.lengths), g.cache or self.cache)
                 for g in groups]
        off = 0
        for p in packs:
            p.off, off = off, off + p.n
        x = self.model.embed(torch.cat([p.token_ids for p in packs]) if len(packs) > 1 else packs[0].token_ids)
        x = x.unsqueeze(0)  # (1, N, D): the MoE and norms take a batch of sequences
        return self._layers(packs, x)

    def _plain_layers(self, packs: list[_Pack], x: torch.Tensor) -> list[torch.Tensor]:
        """MLA / GQA blocks over the packed embeddings x (1, N, D); each group's hidden states. A lone group
        without padding (a decode step) keeps its own (B, T, D) rows throughout (``lone_layers``)."""
        if len(packs) == 1 and packs[0].src is None:
            p = packs[0]
            return [self.lone_layers(x.view(p.B, p.T, -1), p.rows, p.cache)]
        for i, layer in enumerate(self.model.layers):
            a = layer.attn_norm(x)
            outs = [p.pack(self._attend(layer.attn, p.unpack(a[0, p.off:p.off + p.n]), p.rows, p.cache, i))
                    for p in packs]
            x = x + (torch.cat(outs) if len(outs) > 1 else outs[0])
            x = layer.ffn_residual(x)  # a shortcut MoE (LongCat-Flash) handed on within its pair
        return [p.unpack(x[0, p.off:p.off + p.n]) for p in packs]

    def lone_layers(self, x_BTD: torch.Tensor, rows: Rows, cache) -> torch.Tensor:
        """MLA / GQA blocks over one batch's embeddings (B, T, D), every row T real tokens: the same rows as the
        packed sequence, without slicing and reshaping around each layer's attention (four ops a layer)."""
        for i, layer in enumerate(self.model.layers):
            x_BTD = x_BTD + self._attend(layer.attn, layer.attn_norm(x_BTD), rows, cache, i)
            x_BTD = layer.ffn_residual(x_BTD)
        return x_BTD

    def _hybrid_layers(self, packs: list[_Pack], x: torch.Tensor) -> list[torch.Tensor]:
        """``_plain_layers`` for DeepSeek-V4: each layer's ``Block.residual`` (the training path's streams and
        hash-routed MoE) around the cached attention, between ``Transformer.streams`` and ``collapse``. A lone
        group without padding (a decode step) keeps its (B, T) rows throughout, as ``_plain_layers``' does."""
        lone = packs[0] if len(packs) == 1 and packs[0].src is None else None
        if lone is not None:
            tokens, x = lone.token_ids.view(lone.B, lone.T), x.view(lone.B, lone.T, -1)
        else:
            tokens = torch.cat([p.token_ids for p in packs]).unsqueeze(0)  # (1, N), as x
        h = self.model.streams(x)
        for i, layer in enumerate(self.model.layers):
            def attend(a, layer=layer, i=i):  # a: the normed block input (1, N, D), or a lone group's (B, T, D)
                if lone is not None:
                    return self._attend(layer.attn, a, lone.rows, lone.cache, i)
                outs = [p.pack(self._attend(layer.attn, p.unpack(a[0, p.off:p.off + p.n]), p.rows, p.cache, i))
                        for p in packs]
                return (torch.cat(outs) if len(outs) > 1 else outs[0]).unsqueeze(0)
            h = layer.residual(h, attend, tokens)
        if not self.streams_out:
            h = self.model.collapse(h)
        if lone is not None:
            return [h]
        if h.dim() == 4:  # streams: each position's N x D unpacked as one row
            return [p.unpack(h[0, p.off:p.off + p.n].flatten(-2)).unflatten(-1, h.shape[-2:]) for p in packs]
        return [p.unpack(h[0, p.off:p.off + p.n]) for p in packs]

    @torch.inference_mode()
    def logits(self, h_BTD: torch.Tensor) -> torch.Tensor:
        """FP32 logits (..., V) of hidden states (..., D) (``streams_out``: streams (..., N, D), collapsed)."""
        if self.streams_out and self.cfg.hc_mult > 1:
            h_BTD = _per_position(self.model.collapse, h_BTD)
        return self.model.head(self.model.norm(h_BTD)).float()

    @torch.inference_mode()
    def mtp_forward(self, h_BTD: torch.Tensor, next_tokens_BT: torch.Tensor, start_B: torch.Tensor,
                    from_main: bool = True, shift: int = 0, lengths: list[int] | None = None) -> torch.Tensor:
        """h^1 (B, T, D) at positions start_b + t from h_{i} and the token t_{i+1} (MTP module 1).
        ``from_main``: h is the main model's (before its final norm, which is applied here, as in
        training); False: h is a previous MTP output (chained drafts), taken as it is. ``shift``:
        the MTP cache keeps position p in slot p + shift (see ``Rows``); ``lengths`` as in ``Group``.
        DeepSeek-V4: h and the result are streams (B, T, N, D) (the main model's before ``hc_head``, or the
        module's own), ``from_main`` and ``shift`` unused."""
        mod = self.model.mtp[0]
        if self.cfg.attn == "hybrid":
            rows = self._mtp_rows(start_B, h_BTD.shape[1], lengths)
            x = mod.project(h_BTD, self.model.embed(next_tokens_BT))
            return mod.block.residual(x, lambda a: hybrid_attention(mod.block.attn, a, rows, self.mtp_cache, 0))
        return self.mtp_layer(h_BTD, next_tokens_BT, self._rows(start_B, h_BTD.shape[1], shift, lengths),
                              self.mtp_cache, from_main)

    def mtp_layer(self, h_BTD: torch.Tensor, next_tokens_BT: torch.Tensor, rows: Rows, cache,
                  from_main: bool = True) -> torch.Tensor:
        """``mtp_forward`` (MLA / GQA) on ``rows`` of ``cache``: what it runs once its rows are made (a fixed-shape
        step's own, ``flyer.serve.graphs``)."""
        mod = self.model.mtp[0]
        x = mod.project(self.model.norm(h_BTD) if from_main else h_BTD, self.model.embed(next_tokens_BT))
        return self._block(mod.block, x, cache, 0, rows)

    @torch.inference_mode()
    def mtp_logits(self, h1_BTD: torch.Tensor) -> torch.Tensor:
        """FP32 logits (..., V) of MTP outputs (..., D) (``streams_out``: (..., N, D), the module's ``hc_head``'s)."""
        mod = self.model.mtp[0]
        if self.streams_out and self.cfg.hc_mult > 1:
            h1_BTD = _per_position(mod.hc_head, h1_BTD)
        return self.model.head(mod.norm(h1_BTD)).float()


def _per_position(collapse, h: torch.Tensor) -> torch.Tensor:
    """``collapse`` ((B, T, N, D) -> (B, T, D), e.g. ``hc_head``) of streams of any leading shape (..., N, D)."""
    N, D = h.shape[-2:]
    return collapse(h.reshape(-1, 1, N, D)).view(*h.shape[:-2], D)


def gather_rows(x_BT: torch.Tensor, idx_B: torch.Tensor) -> torch.Tensor:
    """x[b, idx_b] for every row: (B, T, ...) -> (B, ...)."""
    return x_BT[torch.arange(x_BT.shape[0], device=x_BT.device), idx_B]


# ---- batch bookkeeping shared by plain and speculative decoding ---------------------------------
@dataclass
class PrefillState:
    """What ``flyer.infer.generate.prefill`` leaves for the decode loop."""

    hidden: torch.Tensor  # (B, T, D) main hidden states of the prefill chunk (before the final norm)
    start: torch.Tensor  # (B,) position of hidden[:, 0]
    logits: torch.Tensor  # (B, V) at each prompt's last token
    hit_tokens: list[int]  # tokens loaded from the prefix cache, per row


def finished(tokens: list[int], max_new: int, stop_ids: Collection[int]) -> tuple[list[int], bool]:
    """Cut ``tokens`` at the first of any of ``stop_ids`` (kept) or at ``max_new``; True when the row is done."""
    cut = next((i for i, t in enumerate(tokens) if t in stop_ids), None)
    if cut is not None:
        return tokens[:cut + 1], True
    return tokens[:max_new], len(tokens) >= max_new


def shrink_batch(dec: Decoder, keep: list[int], live, *per_row: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Drop the rows of ``live`` (the batch's rows, by original index) not in ``keep`` from the
    decoder's caches and from each (B, ...) tensor of ``per_row``; unchanged when all stay."""
    live = list(live)
    if len(keep) == len(live):
        return per_row
    pos = {b: i for i, b in enumerate(live)}
    rows = torch.tensor([pos[b] for b in keep], dtype=torch.long, device=per_row[0].device)
    dec.keep_rows(rows)
    return tuple(t.index_select(0, rows) for t in per_row)
