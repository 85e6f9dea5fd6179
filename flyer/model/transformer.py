"""The DeepSeek-V3-style decoder: embedding, blocks (MLA/GQA + dense FFN or DeepSeekMoE),
final norm, output head, and D multi-token-prediction modules.

Shapes: B batch, T tokens, D model dim, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
from torch import nn

from flyer.config import ModelConfig
from flyer.model.lowp import Linear
from flyer.model.norm import RMSNorm
from flyer.model.attention import Selection, build_attention
from flyer.model.loss import linear_cross_entropy
from flyer.model.dispatch import Dispatcher
from flyer.model.documents import Documents, depth_targets
from flyer.model.counts import compress_ratio
from flyer.model.experts import Experts
from flyer.model.hybrid import HybridAttention, hybrid_rope_config
from flyer.model.hyper import HyperConnection, HyperHead, init_hyper
from flyer.model.indexer_loss import indexer_losses
from flyer.model.init import deferred_init
from flyer.model.moe import MLP, Gate, MoE
from flyer.model.mtp import HyperMTPModule, MTPModule
from flyer.model.rope import rope_cos_sin


class Block(nn.Module):
    """Attention then FFN, each pre-normed, around the residual: one stream x (B, T, D), or with
    hyper-connections (``hc_mult`` > 1, DeepSeek-V4) ``hc_mult`` streams (B, T, N, D) that ``hc_attn`` /
    ``hc_ffn`` collapse into each block's input and mix with its output (``flyer.model.hyper``)."""

    def __init__(self, cfg: ModelConfig, layer_id: int, make_dispatcher: Callable[[int], Dispatcher] | None = None,
                 experts_impl: str = "auto"):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, autocast_output=True)  # feeds only GEMMs
        self.attn = HybridAttention(cfg, layer_id) if cfg.attn == "hybrid" else build_attention(cfg, layer_id)
        self.ffn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.hash_routed = layer_id < cfg.n_hash_layers  # its MoE routes by token id (DeepSeek-V4)
        if layer_id < cfg.n_dense_layers or cfg.n_routed_experts == 0 or cfg.shortcut_moe:
            self.ffn = MLP(cfg.dim, cfg.inter_dim)
        else:
            self.ffn = MoE(cfg, make_dispatcher(layer_id) if make_dispatcher else None, experts_impl,
                           hash_routed=self.hash_routed)
        # LongCat-Flash's shortcut MoE (``cfg.shortcut_moe``): the pair's first block computes it from its FFN input
        # and leaves it in ``pair``, a list the pair shares (``link_pairs``), for the second to add to its output
        self.shortcut = (MoE(cfg, make_dispatcher(layer_id) if make_dispatcher else None, experts_impl)
                         if cfg.has_shortcut_moe(layer_id) else None)
        self.pair: list[torch.Tensor] = []
        if cfg.hc_mult > 1:
            self.hc_attn, self.hc_ffn = HyperConnection(cfg), HyperConnection(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                tokens_BT: torch.Tensor | None = None, selection: Selection | None = None,
                docs: Documents | None = None) -> torch.Tensor:
        """x (B, T, D), or (B, T, N, D) streams with hyper-connections; ``tokens_BT``: the token ids, which a
        hash-routed MoE needs; ``selection``: DSA's selection handed between layers (``shared_selection``);
        ``docs``: packed rows' documents, each attending to itself (``flyer.model.documents``)."""
        args = () if selection is None else (selection,)  # GQA and hybrid attention take none
        kw = {} if docs is None else {"docs": docs}
        return self.residual(x, lambda a: self.attn(a, cos, sin, *args, **kw), tokens_BT)

    def residual(self, x: torch.Tensor, attend, tokens_BT: torch.Tensor | None = None) -> torch.Tensor:
        """The block around ``attend`` (normed input -> attention output; the decode cache's, or the training
        path's): the residual, or the streams mixed by ``hc_attn`` / ``hc_ffn``, and the FFN."""
        ffn = partial(self.ffn, tokens_BT=tokens_BT) if self.hash_routed else self.ffn
        if x.dim() == 4:
            post, comb, a = self.hc_attn(x)
            x = HyperConnection.expand(x, attend(self.attn_norm(a)), post, comb)
            post, comb, f = self.hc_ffn(x)
            return HyperConnection.expand(x, ffn(self.ffn_norm(f)), post, comb)
        x = x + attend(self.attn_norm(x))
        return self.ffn_residual(x, ffn)

    def ffn_residual(self, x: torch.Tensor, ffn=None) -> torch.Tensor:
        """x + FFN(ffn_norm(x)) (B, T, D); with the shortcut MoE, the pair's first block also computes it from the
        same normed input into ``pair``, and the second adds it last: h + mlp(.) + shortcut, transformers' order."""
        f = self.ffn_norm(x)
        if self.shortcut is not None:
            self.pair[:] = [self.shortcut(f)]
            return x + (ffn or self.ffn)(f)
        out = x + (ffn or self.ffn)(f)
        return out + self.pair.pop() if self.pair else out


def link_pairs(layers) -> None:
    """Give each shortcut-MoE pair of ``layers`` (blocks 2i, 2i+1 by ``layer_id``) one shared ``pair`` list; blocks
    without a partner among ``layers`` keep their own (and a second block alone adds nothing: never built so, as
    ``ModelConfig`` and the pipeline refuse splitting a pair)."""
    by_id = {b.layer_id: b for b in layers}
    for b in layers:
        if b.shortcut is not None and b.layer_id + 1 in by_id:
            by_id[b.layer_id + 1].pair = b.pair


@dataclass
class LossOutput:
    loss: torch.Tensor  # what to backpropagate: main + mtp_weight * mean(mtp) + balance loss
    main_loss: torch.Tensor
    mtp_losses: list[torch.Tensor] = field(default_factory=list)
    aux_loss: torch.Tensor | None = None
    # each DSA indexer's L_I when trained (``flyer.model.indexer_loss``); ``loss`` adds their sum
    indexer_losses: list[torch.Tensor] = field(default_factory=list)


class OutputHeads:
    """Rope tables, the residual's streams, the MTP chain and the head losses, for a module holding ``cfg``,
    ``embed``, ``norm``, ``head``, ``mtp`` (and ``hc_head`` with hyper-connections): the whole ``Transformer``,
    or a pipeline stage (``flyer.parallel.pipeline``: the first expands the streams, the last collapses them
    and computes the same losses from the hidden states it receives)."""

    def rope_tables(self, T: int, device, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rope_cos_sin(self.cfg.rope_dim, start + T, self.cfg, device)
        return cos[start:], sin[start:]

    def streams(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """The residual the blocks take: the embeddings x, or with hyper-connections hc_mult streams (B, T, N, D),
        each starting as x."""
        return x_BTD.unsqueeze(2).expand(-1, -1, self.cfg.hc_mult, -1).contiguous() if self.cfg.hc_mult > 1 else x_BTD

    def collapse(self, h: torch.Tensor) -> torch.Tensor:
        """The last block's residual as hidden states (B, T, D): ``hc_head``'s collapse of the streams."""
        return self.hc_head(h) if self.cfg.hc_mult > 1 else h

    def mtp_hidden(self, h: torch.Tensor, tokens_BT: torch.Tensor,
                   docs: Documents | None = None) -> list[torch.Tensor]:
        """h^1..h^D from the main model's last residual h: its hidden states before the final norm (B, T, D), as
        ``hidden`` returns, or under DeepSeek-V4 (attn "hybrid") the streams before ``hc_head`` (B, T, N, D), as
        ``last_residual`` returns. h^k has T-k positions and (after ``head_input`` and the head) predicts token
        t_{i+k+1}. V3's first module sees the main model's normed output, V4's the streams as they are
        (DeepSeek's checkpoints; see ``flyer.model.mtp``). ``docs``: a packed batch's documents (position i of
        h^k sits in i's document: its positions and segments are the first T-k of the main model's)."""
        if not len(self.mtp):
            return []
        out = []
        h = h if self.cfg.attn == "hybrid" else self.norm(h)
        for k, mod in enumerate(self.mtp, start=1):
            T_k = tokens_BT.shape[1] - k
            (cos, sin), = layer_rope_tables(self.cfg, [mod.block.layer_id], T_k, tokens_BT.device)
            if docs is None:
                h = mod(h[:, :T_k], self.embed(tokens_BT[:, k:]), cos, sin)
            else:
                h = mod(h[:, :T_k], self.embed(tokens_BT[:, k:]), *docs.rope(cos, sin, T_k), docs=docs.first(T_k))
            out.append(h)
        return out

    def head_loss(self, x_BTD: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the output head on normed hidden states x_BTD; FP32 scalar."""
        return linear_cross_entropy(x_BTD.flatten(0, 1), self.head.weight, targets_BT.flatten())

    def output_losses(self, h: torch.Tensor, tokens_BT: torch.Tensor, targets_BT: torch.Tensor,
                      docs: Documents | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The next-token loss and the MTP losses (module k predicts targets_BT[:, k:], within its document when
        ``docs`` packs the rows: ``depth_targets``) from the main hidden states before the final norm (B, T, D), or
        the last residual's streams (B, T, N, D), collapsed here."""
        main = self.head_loss(self.norm(self.collapse(h) if h.dim() == 4 else h), targets_BT)
        ids = None if docs is None else docs.ids
        mtp_losses = [self.head_loss(mod.head_input(h_k), depth_targets(targets_BT, ids, k))
                      for k, (mod, h_k) in enumerate(zip(self.mtp, self.mtp_hidden(h, tokens_BT, docs)), start=1)]
        return main, mtp_losses


def layer_rope_tables(cfg: ModelConfig, layer_ids: list[int], T: int,
                      device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(cos, sin) at positions 0..T-1 for each block in ``layer_ids``: one table for all, or under hybrid
    attention (DeepSeek-V4) the table of each layer's kind (``hybrid_rope_config``: compressed and window-only
    layers rotate at other bases), each kind's built once. ``Transformer.hidden`` and every pipeline stage
    take their layers' tables here."""
    if cfg.attn != "hybrid":
        return [rope_cos_sin(cfg.rope_dim, T, cfg, device)] * len(layer_ids)
    by_kind: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}
    for i in layer_ids:
        kind = compress_ratio(cfg, i) > 0  # an MTP block's (n_layers onward): window-only
        if kind not in by_kind:
            by_kind[kind] = rope_cos_sin(cfg.rope_dim, T, hybrid_rope_config(cfg, i), device)
    return [by_kind[compress_ratio(cfg, i) > 0] for i in layer_ids]


def shared_selection(cfg: ModelConfig) -> Selection | None:
    """A fresh ``Selection`` for one forward of a model whose layers share DSA selections (GLM-5's
    ``indexer_types`` with a "shared" layer), else None: every layer selects alone."""
    return Selection() if "shared" in cfg.indexer_types else None


@torch.no_grad()
def init_module(m: nn.Module, std: float, generator: torch.Generator | None = None) -> None:
    """``m``'s own weights as ``Transformer.init_weights`` sets them (which calls this for every
    module, in order; ``flyer.parallel.grads`` replays it one module at a time)."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        m.weight.normal_(0.0, std, generator=generator)
        if getattr(m, "bias", None) is not None:
            m.bias.zero_()
    elif isinstance(m, (Gate, Experts)):
        m.reset_parameters(generator)
    elif isinstance(m, nn.RMSNorm):
        m.weight.fill_(1.0)
    elif isinstance(m, nn.LayerNorm):  # the DSA indexer's key norm
        m.weight.fill_(1.0)
        m.bias.zero_()
    elif isinstance(m, (HyperConnection, HyperHead)):
        init_hyper(m, std, generator)
    elif isinstance(m, HybridAttention):  # its own parameters; its linears and norms come as modules
        m.reset_parameters()


class Transformer(OutputHeads, nn.Module):
    """``make_dispatcher(layer_id)`` supplies each MoE layer's dispatcher (default: local);
    ``experts_impl`` names the routed experts' implementation (``flyer.model.experts.EXPERT_IMPLS``)."""

    def __init__(self, cfg: ModelConfig, make_dispatcher: Callable[[int], Dispatcher] | None = None,
                 experts_impl: str = "auto"):
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"cfg: a ModelConfig, e.g. flyer.config.preset('tiny') (got {type(cfg).__name__})")
        super().__init__()
        self.cfg = cfg
        with deferred_init():  # init_weights below sets every weight
            self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
            self.layers = nn.ModuleList(Block(cfg, i, make_dispatcher, experts_impl) for i in range(cfg.n_layers))
            link_pairs(self.layers)
            self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
            self.head = Linear(cfg.dim, cfg.vocab_size, bias=False)
            if cfg.tie_embeddings:
                self.head.weight = self.embed.weight
            if cfg.hc_mult > 1:
                self.hc_head = HyperHead(cfg)
            # MTP blocks use the layer type of the model's last layer (MoE for V3; V4: window-only attention)
            mtp_module = HyperMTPModule if cfg.attn == "hybrid" else MTPModule
            self.mtp = nn.ModuleList(
                mtp_module(cfg, Block(cfg, cfg.n_layers + k, make_dispatcher, experts_impl))
                for k in range(cfg.mtp_depth))
        if self.embed.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Every weight as a fresh model's, and every buffer (router biases, expert loads) zero, as a fresh model's
        start: a model built on the meta device and moved with ``to_empty`` holds uninitialised memory there."""
        for b in self.buffers():
            b.zero_()
        for m in self.modules():
            init_module(m, self.cfg.init_std, generator)

    def hidden(self, tokens_BT: torch.Tensor, docs: Documents | None = None) -> torch.Tensor:
        """Final hidden states before the last norm (B, T, D)."""
        return self.collapse(self.last_residual(tokens_BT, docs))

    def last_residual(self, tokens_BT: torch.Tensor, docs: Documents | None = None) -> torch.Tensor:
        """The last block's residual: (B, T, D), or with hyper-connections the streams (B, T, N, D) before
        ``hc_head`` (what DeepSeek-V4's MTP reads). ``docs``: packed rows (``flyer.model.documents``), each
        document attending to itself at positions from 0."""
        if tokens_BT.dim() != 2 or tokens_BT.is_floating_point() or tokens_BT.dtype == torch.bool:
            raise ValueError(f"tokens_BT: (B, T) integer token ids (got a {tuple(tokens_BT.shape)} {tokens_BT.dtype} "
                             "tensor; one sequence is tokens[None])")
        h = self.streams(self.embed(tokens_BT))
        tables = layer_rope_tables(self.cfg, [layer.layer_id for layer in self.layers], tokens_BT.shape[1],
                                   tokens_BT.device)
        selection = shared_selection(self.cfg)
        if docs is None:
            for layer, (cos, sin) in zip(self.layers, tables):
                h = layer(h, cos, sin, tokens_BT, selection)
            return h
        for layer, (cos, sin) in zip(self.layers, docs.layer_tables(tables, tokens_BT.shape[1])):  # positions from 0
            h = layer(h, cos, sin, tokens_BT, selection, docs=docs)
        return h

    def forward(self, tokens_BT: torch.Tensor, documents_BT: torch.Tensor | None = None) -> torch.Tensor:
        """Main-model logits (B, T, V), FP32; ``documents_BT``: packed rows' document ids (``Documents``)."""
        docs = None if documents_BT is None else Documents(documents_BT)
        return self.head(self.norm(self.hidden(tokens_BT, docs))).float()

    def compute_loss(self, tokens_BT: torch.Tensor, targets_BT: torch.Tensor,
                     documents_BT: torch.Tensor | None = None) -> LossOutput:
        """Cross-entropy of next-token prediction, MTP losses and the sequence balance loss.

        targets_BT[:, i] is the token after tokens_BT[:, i] (i.e. t_{i+1}). The head and the
        cross-entropy are fused (``linear_cross_entropy``): same values as
        ``F.cross_entropy(self.head(...).float(), ...)`` without materialising the logits.
        ``documents_BT`` (B, T) int64: packed rows' document ids (``flyer.model.documents``; the targets across a
        boundary already ``IGNORE_INDEX``); None: one sequence per row.
        """
        docs = None if documents_BT is None else Documents(documents_BT)
        main, mtp_losses = self.output_losses(self.last_residual(tokens_BT, docs), tokens_BT, targets_BT, docs)
        loss = main
        if mtp_losses:
            loss = loss + self.cfg.mtp_loss_weight * torch.stack(mtp_losses).mean()
        aux = [m.aux_loss for m in self.modules() if isinstance(m, MoE) and m.aux_loss is not None]
        aux_loss = torch.stack(aux).sum() if aux and self.training else None
        if aux_loss is not None:
            loss = loss + aux_loss
        kl = indexer_losses(self)
        if kl:
            loss = loss + torch.stack(kl).sum()
        return LossOutput(loss, main, mtp_losses, aux_loss, kl)
