"""DeepSeekMoE: shared experts plus fine-grained routed experts, sigmoid gate, group-limited
routing, aux-loss-free bias balancing and the complementary sequence-wise balance loss; and
DeepSeek-V4's additions: sqrt(softplus) scores, hash-routed layers (experts fixed per token id) and
the clamped SwiGLU (``swiglu_limit``); LongCat-Flash's zero-computation (identity) experts (``zero_experts``).

Shapes: T tokens (batch flattened), D model dim, F expert hidden dim, E routed experts,
K activated experts per token, G expert groups, N = T*K routed token copies.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from flyer.config import ConfigError, ModelConfig
from flyer.model.dispatch import Dispatcher, LocalDispatcher
from flyer.model.experts import MLP, Experts
from flyer.model.init import init_deferred
from flyer.model.lowp import as_dtype, gemm_dtype
from flyer.model.transient import Transients


_FIXED_SHAPES: contextvars.ContextVar[bool] = contextvars.ContextVar("fixed_shapes", default=False)


@contextlib.contextmanager
def fixed_shapes():
    """Within it every MoE's forward (inference, this process holding every routed expert) has shapes that its
    input's alone fix and reads nothing back to the host: expert loads counted by a scatter (not ``bincount``,
    whose length is the largest id's), the routed experts through ``Experts.routed_fixed``. What a CUDA graph
    needs of a serving step (``flyer.serve.graphs``)."""
    token = _FIXED_SHAPES.set(True)
    try:
        yield
    finally:
        _FIXED_SHAPES.reset(token)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return as_dtype(t, torch.float32)


@functools.cache
def _fp32_scalar(value: float) -> torch.Tensor:
    """``value`` as a 0-dim FP32 CPU tensor. As an operand of FP32 tensors (any device) it gives what
    the Python float gives, bit for bit, without the conversion ops a Python float costs per call."""
    with torch.inference_mode(False):  # also saved for backward: no inference tensor
        return torch.tensor(value, dtype=torch.float32, device="cpu")


def _sigmoid(logits_TE: torch.Tensor) -> torch.Tensor:
    return logits_TE.sigmoid()


def _softmax(logits_TE: torch.Tensor) -> torch.Tensor:
    return logits_TE.softmax(dim=-1)


def _sqrtsoftplus(logits_TE: torch.Tensor) -> torch.Tensor:
    # softplus at torch's defaults (beta 1, threshold 20): transformers' ACT2FN["sqrtsoftplus"], DeepSeek-V4's code
    return F.softplus(logits_TE).sqrt()


SCORE_FUNCS = {"sigmoid": _sigmoid, "softmax": _softmax, "sqrtsoftplus": _sqrtsoftplus}  # Gate's scores by score_func


class Gate(nn.Module):
    """Router. Scores (``score_func`` of the logits: sigmoid, softmax or sqrt(softplus)) are computed
    in FP32 (the FP8 recipe keeps the router in high precision).

    Selection uses ``scores + bias`` (the aux-loss-free balancing bias); the gate values use the
    unbiased scores. With G > 1 groups, a group's score is the sum of its top-2 biased scores
    (max score when there is no bias, as in DeepSeek-V2), only the best ``n_limited_groups``
    groups stay eligible, and the top-K experts are chosen among them.

    ``hash_routed`` (DeepSeek-V4's first ``n_hash_layers`` MoE layers): the experts of token id t are
    the fixed ``tid2eid[t]`` (a persistent int64 (vocab_size, K) buffer, random distinct experts until a
    checkpoint fills it; no bias), weighted by the unbiased scores gathered there, normalised and scaled as above.
    """

    def __init__(self, cfg: ModelConfig, hash_routed: bool = False):
        super().__init__()
        self.cfg = cfg
        if cfg.score_func not in SCORE_FUNCS:
            raise ConfigError(f"config field 'score_func' is '{cfg.score_func}' "
                              f"(choose from: {', '.join(SCORE_FUNCS)})")
        self.score_fn = SCORE_FUNCS[cfg.score_func]
        self.hash_routed = hash_routed
        self.weight = nn.Parameter(torch.empty(cfg.n_route_columns, cfg.dim))  # zero experts' columns last
        if hash_routed:  # the checkpoints' hash layers carry ffn.gate.tid2eid and no gate.bias
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, cfg.n_activated_experts, dtype=torch.int64))
            self.bias = None
        elif cfg.router_bias:
            self.register_buffer("bias", torch.zeros(cfg.n_route_columns, dtype=torch.float32))
        else:
            self.bias = None
        if not init_deferred():
            self.reset_parameters()

    def _apply(self, fn, recurse: bool = True):
        """As ``nn.Module._apply``, the balancing bias kept FP32 whatever dtype the model moves to (as checkpoints
        store it): its updates of ``bias_update_speed`` (1e-3) are below BF16's resolution past 0.25."""
        return apply_keeping_fp32(self, ("bias",), super()._apply, fn, recurse)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """N(0, init_std) router weights; the balancing bias is left alone. A hash table gets K distinct random
        experts per token id (a fresh model's; a checkpoint brings its own): zeros would send every token's K
        copies to expert 0."""
        self.weight.normal_(0.0, self.cfg.init_std, generator=generator)
        if self.hash_routed and self.tid2eid.device.type != "meta":
            V, E = self.tid2eid.shape[0], self.cfg.n_routed_experts
            r = torch.rand(V, E, generator=generator, device=generator.device if generator else "cpu")
            self.tid2eid.copy_(r.topk(self.cfg.n_activated_experts, dim=-1).indices)

    def forward(self, x_TD: torch.Tensor, tokens_T: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_TD (T, D), tokens_T (T,) token ids (hash-routed gates only) -> (weights_TK fp32,
        topk_ids_TK int64, scores_TE fp32)."""
        cfg = self.cfg
        dev = x_TD.device.type
        x, w = _fp32(x_TD), _fp32(self.weight)
        if torch.is_autocast_enabled(dev):
            with torch.autocast(dev, enabled=False):
                logits = F.linear(x, w)
        else:  # the same GEMM without entering a context (a few us a layer when decoding)
            logits = F.linear(x, w)
        scores = self.score_fn(logits)
        if self.hash_routed:
            if tokens_T is None:
                raise ValueError("Gate.forward: a hash-routed gate needs the token ids (argument 'tokens_T')")
            topk_ids = self.tid2eid[tokens_T.reshape(-1)]
        else:
            topk_ids = self._select(scores)
        weights = scores.gather(1, topk_ids)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + _fp32_scalar(1e-20))
        return weights * _fp32_scalar(cfg.route_scale), topk_ids, scores

    def _select(self, scores: torch.Tensor) -> torch.Tensor:
        """topk_ids_TK: the top-K experts by biased score among each token's allowed groups."""
        cfg, bias = self.cfg, self.bias
        choice = scores.detach() if torch.is_grad_enabled() else scores  # selection is not differentiated
        if bias is not None:
            choice = choice + bias
        T, E = choice.shape
        G = cfg.n_expert_groups
        if G > 1 and cfg.n_limited_groups < G:
            grouped = choice.view(T, G, E // G)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1) if bias is not None else grouped.amax(-1)
            keep = group_scores.topk(cfg.n_limited_groups, dim=-1).indices
            drop = torch.ones(T, G, dtype=torch.bool, device=scores.device).scatter_(1, keep, False)
            # in place where choice is a new tensor (scores + bias), not the scores themselves
            fill = grouped.masked_fill_ if bias is not None else grouped.masked_fill
            choice = fill(drop.unsqueeze(-1), float("-inf")).view(T, E)
        return choice.topk(cfg.n_activated_experts, dim=-1).indices


def apply_keeping_fp32(module: nn.Module, names: tuple[str, ...], apply, fn, recurse: bool) -> nn.Module:
    """``apply(fn, recurse)`` (``nn.Module._apply``), ``module``'s FP32 buffers ``names`` kept FP32 with their values:
    moved as ``fn`` moves them, not cast (a cast to BF16 and back would round them)."""
    kept = {n: b for n in names if (b := getattr(module, n, None)) is not None and b.dtype == torch.float32}
    apply(fn, recurse)
    for n, old in kept.items():
        new = getattr(module, n)
        if new.dtype != torch.float32:
            setattr(module, n, new.float() if old.is_meta or new.is_meta else old.to(new.device, torch.float32))
    return module


class MoE(Transients, nn.Module):
    """Shared experts + routed experts. The dispatcher moves routed token copies to the experts
    (locally, ``flyer.model.dispatch``, or across ranks, ``flyer.parallel.dispatch``) and combines
    the weighted outputs back.

    ``path``, how the copies reach the experts: 'fused_local' where one process holds every expert,
    no wire rounding is emulated and the experts run 'fused' (dispatch, experts and combine as one
    function, ``Experts.routed_local``); 'dispatched' otherwise (dispatcher -> experts -> combine;
    ``fuse_local=False`` forces it: the oracle of the other). ``experts_impl`` names the experts'
    implementation (``flyer.model.experts.EXPERT_IMPLS``).

    State read by the trainer: ``tokens_per_expert`` (E,) accumulated since the last bias update,
    ``last_counts`` (E,) of the last forward, ``aux_loss`` (scalar, sequence-wise balance loss of
    the last training forward, already times alpha; None for hash-routed layers, whose routing is fixed).

    ``hash_routed``: the gate routes by token id (``Gate``), so ``forward`` needs the token ids.
    """

    TRANSIENT = ("aux_loss",)

    def __init__(self, cfg: ModelConfig, dispatcher: Dispatcher | None = None, experts_impl: str = "auto",
                 fuse_local: bool = True, hash_routed: bool = False):
        super().__init__()
        self.cfg = cfg
        self.hash_routed = hash_routed
        self.gate = Gate(cfg, hash_routed=hash_routed)
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatcher(cfg.n_routed_experts)
        first, n_local = self.dispatcher.local_experts()
        self.experts = Experts(n_local, cfg.dim, cfg.moe_inter_dim, first=first, impl=experts_impl,
                               init_std=cfg.init_std, swiglu_limit=cfg.swiglu_limit)
        self.shared = (MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim, limit=cfg.swiglu_limit)
                       if cfg.n_shared_experts > 0 else None)
        # per routing column: the zero experts' loads too, which the balancing bias steers as any expert's
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_route_columns), persistent=False)
        self.register_buffer("last_counts", torch.zeros(cfg.n_route_columns), persistent=False)
        self.aux_loss: torch.Tensor | None = None
        self.counted_BT: torch.Tensor | None = None  # the positions the statistics count (``counting_only``)
        self.documents_BT: torch.Tensor | None = None  # packed rows' document ids (``counting_only``)
        # whether dispatch and combine may fuse with the experts: decided by the dispatcher, once
        self.fuse_local = (fuse_local and isinstance(self.dispatcher, LocalDispatcher)
                           and not self.dispatcher.emulates_wire)

    @property
    def path(self) -> str:
        """'fused_local' or 'dispatched': the dispatcher's choice, made when the MoE was built, and
        the experts' implementation, resolved when they were built or moved, or set by their
        conversion (``convert_to_fp8``: 'fp8'). Derived, not stored, so it cannot go stale when the
        experts are replaced."""
        return "fused_local" if self.fuse_local and self.experts.impl == "fused" else "dispatched"

    def _apply(self, fn, recurse: bool = True):
        """As ``nn.Module._apply``, the expert-load counts kept FP32 (in BF16, counts past 256 round: the bias step
        takes the sign of mean - load, which a rounded count can flip)."""
        return apply_keeping_fp32(self, ("tokens_per_expert", "last_counts"), super()._apply, fn, recurse)

    def forward(self, x_BTD: torch.Tensor, tokens_BT: torch.Tensor | None = None) -> torch.Tensor:
        """x_BTD (B, T, D) -> (B, T, D); tokens_BT (B, T) the token ids, needed by hash-routed layers."""
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        if self.hash_routed and tokens_BT is None:
            raise ValueError("MoE.forward: a hash-routed MoE layer needs the token ids (argument 'tokens_BT')")
        weights_TK, topk_ids_TK, scores_TE = self.gate(x_TD, tokens_BT)
        fixed = _FIXED_SHAPES.get()
        if fixed and (self.training or not self.fuse_local):
            raise ValueError("fixed_shapes: the MoE must be in eval mode with every routed expert in this process")
        ids = topk_ids_TK.flatten()
        counts = torch.zeros_like(self.last_counts, dtype=ids.dtype).index_add_(0, ids, torch.ones_like(ids)) \
            if fixed else torch.bincount(ids, minlength=self.cfg.n_route_columns)
        self.last_counts.copy_(counts)
        if self.training:
            # an MTP module's T - k positions: position i reads token i + k, the last T - k columns
            valid_BT = None if self.counted_BT is None else self.counted_BT[:, self.counted_BT.shape[1] - T:]
            segments_BT = n_docs = None
            if self.documents_BT is not None:  # packed: i counts where token i + k is real and in i's document
                docs, k = self.documents_BT, self.documents_BT.shape[1] - T
                segments_BT = docs[:, :T].masked_fill((docs[:, :T] != docs[:, k:]) | (docs[:, k:] < 0), -1)
                valid_BT = segments_BT >= 0
                # every document of the rows (ids 0, 1, ... per row), those of <= k tokens too: alone, each is a row
                # whose MTP block k has no position, which adds 0 to that block's mean over the rows
                n_docs = (docs.amax(1) + 1).clamp(min=0).sum()
            self.tokens_per_expert += counts if valid_BT is None else torch.bincount(
                topk_ids_TK[valid_BT.reshape(B * T)].flatten(), minlength=self.cfg.n_route_columns)
            balance = self.cfg.seq_aux_alpha > 0 and not self.hash_routed  # fixed routing: nothing to balance
            self.aux_loss = sequence_balance_loss(scores_TE.view(B, T, -1), topk_ids_TK.view(B, T, -1),
                                                  self.cfg, valid_BT, segments_BT, n_docs) if balance else None
        x_in = as_dtype(x_TD, gemm_dtype(x_TD))  # gather/send the rows in the compute dtype, cast once
        identity_TD = None
        if self.cfg.n_zero_experts:  # identity picks stay in topk_ids_TK: the routed experts give them no row
            identity_TD = zero_experts(x_TD, weights_TK, topk_ids_TK, self.cfg.n_routed_experts)
            counts = counts[:self.cfg.n_routed_experts]
        if fixed:
            y_TD = self.experts.routed_fixed(x_in, weights_TK, topk_ids_TK)
        elif self.path == "fused_local":
            y_TD = self.experts.routed_local(x_in, weights_TK, topk_ids_TK, counts)
        else:
            x_sorted, local_counts, ctx = self.dispatcher.dispatch(x_in, topk_ids_TK)
            y_TD = self.dispatcher.combine(self.experts(x_sorted, local_counts), weights_TK, ctx)
        if identity_TD is not None:
            y_TD = y_TD + identity_TD
        y_TD = as_dtype(y_TD, x_BTD.dtype)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_in)
        return y_TD.view(B, T, D)


def zero_experts(x_TD: torch.Tensor, weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor, E: int) -> torch.Tensor:
    """LongCat-Flash's zero-computation experts (ids E onward): identity_TD (T, D) FP32, the sum of each token's
    identity weights times its MoE input x_TD (T, D), as transformers' LongcatFlashMoE adds them. The routed experts
    skip those picks (``flyer.model.experts.routed_order``, ``LocalDispatcher``): transformers instead moves each to
    a routed expert with weight 0, whose output times 0 (+-0) changes no sum (``bench/zero_experts.py`` times both)."""
    w_TK = weights_TK.masked_fill(topk_ids_TK < E, 0.0)
    return x_TD.float() * w_TK.sum(-1, keepdim=True)


def sequence_balance_loss(scores_BTE: torch.Tensor, topk_ids_BTK: torch.Tensor, cfg: ModelConfig,
                          valid_BT: torch.Tensor | None = None, segments_BT: torch.Tensor | None = None,
                          n_segments: torch.Tensor | None = None) -> torch.Tensor:
    """Complementary sequence-wise balance loss (V3 report eq. 17-20), times alpha.

    f_i = E / (K T) * #tokens of the sequence routed to i (the experts routed, bias and group limit included, as
    DeepSeek's V2 gate counts its ``topk_idx``; eq. 18 writes the unbiased top-K); P_i = mean_t of normalised
    scores (each token's scores divided by their sum: every score function gives positive scores). ``valid_BT``
    (B, T) bool: only those positions are the sequence (T: their count; padding takes no part).
    ``segments_BT`` (B, T) int64: packed rows, each document (id >= 0; -1 takes no part) a sequence of its own,
    the loss their mean: what the documents give in rows of their own. ``n_segments`` (scalar): the mean's count,
    when documents without a position here count as 0 (an MTP block's, over documents of <= k tokens: as their rows
    of their own, which the ``valid_BT`` mean counts with 0); None: the documents with a position.
    """
    B, T, E = scores_BTE.shape
    K = topk_ids_BTK.shape[-1]
    probs = scores_BTE / scores_BTE.sum(-1, keepdim=True)
    if segments_BT is not None:
        keep = segments_BT >= 0
        n_seg = int(segments_BT.max()) + 1 if bool(keep.any()) else 1
        seg = (torch.arange(B, device=probs.device).unsqueeze(1) * n_seg + segments_BT)[keep]  # (N,) flat ids
        n_S = torch.bincount(seg, minlength=B * n_seg).to(probs.dtype)
        P = torch.zeros(B * n_seg, E, dtype=probs.dtype, device=probs.device).index_add_(0, seg, probs[keep])
        ones = torch.ones(seg.numel() * K, dtype=probs.dtype, device=probs.device)
        hits = torch.zeros(B * n_seg, E, dtype=probs.dtype, device=probs.device).index_put_(
            (seg.repeat_interleave(K), topk_ids_BTK[keep].flatten()), ones, accumulate=True)
        used = n_S > 0
        n_S1 = n_S[used].unsqueeze(1)
        per_doc = (hits[used] * (E / K) / n_S1 * P[used] / n_S1).sum(-1)
        if not per_doc.numel():  # rows of padding only: nothing to balance (0 / 0 was NaN, and reached every gradient)
            return cfg.seq_aux_alpha * per_doc.sum()
        return cfg.seq_aux_alpha * (per_doc.mean() if n_segments is None else per_doc.sum() / n_segments)
    if valid_BT is not None:
        w_BT = valid_BT.to(probs.dtype)
        n_B1 = w_BT.sum(1, keepdim=True).clamp(min=1)
        hits = torch.zeros(B, E, dtype=probs.dtype, device=probs.device).scatter_add_(
            1, topk_ids_BTK.reshape(B, T * K), w_BT.repeat_interleave(K, dim=1))
        P = (probs * w_BT[..., None]).sum(1) / n_B1
        return cfg.seq_aux_alpha * (hits * (E / K) / n_B1 * P).sum(-1).mean()
    P = probs.mean(dim=1)  # (B, E)
    hits = torch.zeros(B, E, dtype=probs.dtype, device=probs.device).scatter_add_(
        1, topk_ids_BTK.reshape(B, T * K), torch.ones(B, T * K, dtype=probs.dtype, device=probs.device))
    f = hits * (E / (K * T))
    return cfg.seq_aux_alpha * (f * P).sum(-1).mean()


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


@contextlib.contextmanager
def counting_only(model: nn.Module, valid_BT: torch.Tensor | None, documents_BT: torch.Tensor | None = None):
    """While entered, ``model``'s MoE layers count routed tokens (``tokens_per_expert``: the bias update's
    loads) and compute the sequence balance loss over the positions where ``valid_BT`` (B, T) bool, the
    forward's batch shape, is True: padding is routed and computed as any token but moves no statistic.
    None: every position counts. ``documents_BT`` (B, T) int64: packed rows' document ids (-1: padding;
    ``flyer.model.documents``), which replace ``valid_BT``: the balance loss is per document (its mean over the
    documents), so a packed batch's equals the one of the same documents in rows of their own."""
    layers = moe_layers(model) if valid_BT is not None or documents_BT is not None else []
    for m in layers:
        m.counted_BT, m.documents_BT = valid_BT, documents_BT
    try:
        yield
    finally:
        for m in layers:
            m.counted_BT = m.documents_BT = None


@torch.no_grad()
def update_router_bias(model: nn.Module, group=None) -> dict[str, float]:
    """Aux-loss-free balancing step, applied once per optimizer step.

    For each MoE layer: bias_i += gamma * sign(mean_load - load_i) over the tokens counted since
    the last update (all micro-batches; summed over ``group`` when given, so every data-parallel
    replica applies the same update). Returns load statistics (max/mean load, bias range).
    Hash-routed layers (no bias, routing fixed by token id) are skipped: their counts are only reset.
    """
    stats = {"load_imbalance": 0.0, "bias_min": 0.0, "bias_max": 0.0}
    layers = []
    for moe in moe_layers(model):
        if moe.hash_routed:
            moe.tokens_per_expert.zero_()
        else:
            layers.append(moe)
    imbalance = []
    for moe in layers:
        counts = moe.tokens_per_expert
        if group is not None:
            dist.all_reduce(counts, group=group)
        mean = counts.mean()
        if mean > 0:
            imbalance.append(float(counts.max() / mean))
            if moe.gate.bias is not None:
                moe.gate.bias += moe.cfg.bias_update_speed * torch.sign(mean - counts)
        counts.zero_()
    if layers:
        biases = [m.gate.bias for m in layers if m.gate.bias is not None]
        if biases:
            b = torch.stack(biases)
            stats.update(bias_min=float(b.min()), bias_max=float(b.max()))
        stats["load_imbalance"] = max(imbalance) if imbalance else 0.0
    return stats
