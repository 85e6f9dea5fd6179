"""Pipeline parallelism: the model split into stages, run by ``torch.distributed.pipelining``.

Stages (``flyer.parallel.stages``): the blocks cut into contiguous stages by training FLOPs and placed on
the pipeline ranks, loop style (1F1B, interleaved) or V style (ZBV, DualPipeV: the first and the last stage on rank 0,
so the MTP modules use *the* embedding and output head); with loop placement the last stage holds a mirror of the
embedding (MTP's input; the head too when tied), whose gradient is summed with the original's (``sync_mirrors``)
and counted once in the norm.

Schedules come from PyTorch (``Schedule1F1B``, ``ScheduleInterleaved1F1B``,
``ScheduleZBVZeroBubble``, ``ScheduleDualPipeV``); flyer adds only what DeepSeek's layout needs:
the losses on the last stage (next-token, MTP), the MoE sequence-balance loss of every stage
(``AttachAux``: each stage's aux loss enters backward through the hidden state it sends on, since
the schedule backpropagates only the last stage's loss), and ``overlap``: DualPipeV's paired
forward and backward chunks (``OVERLAP_F_B``) run concurrently, so one's EP all-to-all hides
behind the other's compute (``flyer.parallel.overlap``).

DeepSeek-V4. Stages pass the whole residual: with hyper-connections its ``hc_mult`` streams
(B, T, N, D) (the first stage expands the embeddings into them; the last stage's loss collapses them
through ``hc_head`` before the final norm, after V4's MTP modules have read them). Every stage gets
the micro-batch's token ids as the schedule's keyword argument ``tokens_BT`` (PyTorch splits it by
micro-batch and hands it to each stage's forward, no transfer): the hash-routed MoE layers route by
them, wherever the split puts them. Each layer rotates with its own kind's rope table (``layer_rope_tables``).

LongCat-Flash (``shortcut_moe``): blocks 2i and 2i+1 share one MoE, which block 2i computes and block 2i+1 adds
(``Block.pair``), so stages start at even blocks only (``split_layers`` counts pairs) and each stage links its pairs
(``link_pairs``); a stage's balance loss sums its shortcut MoEs'.

Gradients: every micro-batch's loss is divided by the number of micro-batches here (the schedules'
own ``scale_grads`` would divide a parameter shared by two local stages twice), so after a step
each gradient is that of one process on the concatenation of the micro-batches.

Chat data (``flyer.data.chat_data``; ``train_step``'s ``target_totals``): a micro-batch's next-token and MTP
means are weighted by its share of the step's trained targets (``_target_weight``), as one process with
gradient accumulation weights them; its rows pad x with ids < 0, which every stage (each gets the micro-batch's
ids, ``tokens_BT``) reads as the mask of positions its MoE layers count (``counting_only``), its MTP modules too.
Packed rows (``flyer train --pack``): the micro-batch's document ids reach every stage the same way
(``documents_BT``), so each stage's blocks attend per document at positions from 0, its MoE layers count and
balance per document, and the last stage's MTP modules and target shares keep to each document (``depth_targets``);
a micro-batch's balance loss (a mean over its documents) weighs its share of the step's documents, as
``Trainer._local_step`` weighs it.

DSA indexer training (``flyer train --indexer-train``): each stage's DSA layers' L_I (the last stage's MTP blocks' too;
DeepSeek-V4's CSA layers' alike, ``flyer.model.hybrid_indexer_loss``)
enter backward as the balance losses do, 1/M each as one process with gradient accumulation weighs them (text data),
or, chat data, each micro-batch's by its share of the step's real queries at its depth (padding and, packed, an MTP
query past its document count in none; ``query_totals``); their inputs are detached, so the gradient reaches only
the indexers.
"""

from __future__ import annotations

import collections

import torch
import torch.distributed as dist
from torch import nn

from flyer.config import ModelConfig
from flyer.errors import FieldError
from flyer.model.documents import Documents, depth_targets, query_count
from flyer.model.indexer_loss import indexer_attentions, indexer_losses, real_queries
from flyer.model.moe import MoE, counting_only
from flyer.model.transformer import OutputHeads, Transformer, layer_rope_tables, link_pairs, shared_selection
from flyer.parallel.grads import MIRROR
from flyer.parallel.stages import (chunks_per_rank, held_modules, needs_embedding, require_torch_for, split_layers,
                                   stage_ranks, validate_pipeline)


def _weight_reused(stage: Stage) -> bool:
    """Whether ``stage`` uses a weight twice on one path: the embedding read again by a second MTP module (after
    the first's nodes), or tied to the head the MTP module writes through. torch's split weight backward
    (``stage_backward_weight``) frees each parameter group's graph as it goes, so a later group's path through
    those nodes fails ("backward through the graph a second time")."""
    cfg = stage.cfg
    return stage.last and (cfg.mtp_depth > 1 or (cfg.mtp_depth > 0 and cfg.tie_embeddings))


def _whole_backward():
    """A ``dw_builder`` for such a stage: its input step runs the whole backward (weights included), so its weight
    step has nothing left to do (``PipelineStage`` runs a stage with a builder so)."""
    return lambda: None


class AttachAux(torch.autograd.Function):
    """Identity on the hidden state whose backward also seeds ``aux`` (a scalar loss term) with
    ``scale``: the stage's balance loss reaches backward through the activation it sends on. A
    copy, not a view: the schedules detach stage outputs in place."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_shape = aux.shape
        return h.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.full(ctx.aux_shape, ctx.scale, dtype=torch.float32, device=grad.device), None


def residual_shape(cfg: ModelConfig, B: int, T: int) -> tuple[int, ...]:
    """The residual one stage hands the next: (B, T, D), or with hyper-connections the streams (B, T, N, D)."""
    return (B, T, cfg.hc_mult, cfg.dim) if cfg.hc_mult > 1 else (B, T, cfg.dim)


class Stage(OutputHeads, nn.Module):
    """Blocks ``layers`` of the model, with the embedding on the first stage and the final norm,
    head, ``hc_head`` and MTP modules on the last. Its forward takes tokens (first stage) or the
    residual of the previous stage (``residual_shape``), the token ids tokens_BT (B, T) for the
    hash-routed layers and packed rows' document ids documents_BT (B, T) (``flyer.model.documents``); it
    returns the residual (``residual_shape``), the last stage's too: ``loss`` turns that into the training
    loss (collapsing the streams after DeepSeek-V4's MTP modules read them)."""

    def __init__(self, model: Transformer, index: int, layers: range, n_stages: int, micro_batches: int):
        super().__init__()
        self.cfg = model.cfg
        self.index, self.first, self.last = index, index == 0, index == n_stages - 1
        self.micro_batches, self.scale = micro_batches, 1.0 / micro_batches
        self.layers = nn.ModuleList(model.layers[i] for i in layers)
        self.layer_ids = list(layers)
        if self.cfg.shortcut_moe and (layers.start % 2 or layers.stop % 2):  # ``split_layers`` never cuts a pair
            raise ValueError(f"stage {index}: layers {layers.start}..{layers.stop - 1} cut a shortcut-MoE pair")
        link_pairs(self.layers)  # each pair's blocks share the list that hands the MoE output on
        if needs_embedding(model, self.first, self.last):
            self.embed = model.embed
        if self.last:
            self.norm, self.head, self.mtp = model.norm, model.head, model.mtp
            if self.cfg.hc_mult > 1:
                self.hc_head = model.hc_head
        self.totals: dict[str, list[torch.Tensor]] = {"main_loss": [], "mtp_loss": [], "aux_loss": [],
                                                      "indexer_loss": []}  # L_I: summed over the layers
        # chat data, for one step: the step's trained targets per MTP depth (``PipelineModel.train_step``)
        self.target_totals: list[float] | None = None
        self.document_total: float | None = None  # packed rows: the step's documents (``PipelineModel.train_step``)
        self.query_totals: list[float] | None = None  # chat data, trained indexers: the step's real queries per depth
        # the last stage's (ids, valid, documents, balance weight) for ``loss``
        self.pending: collections.deque = collections.deque()

    def forward(self, x: torch.Tensor, tokens_BT: torch.Tensor | None = None,
                documents_BT: torch.Tensor | None = None) -> torch.Tensor:
        if tokens_BT is None and self.first:  # the first stage's input is the token ids
            tokens_BT = x
        valid_BT = None
        docs = None if documents_BT is None else Documents(documents_BT)
        weight = self._balance_weight(docs)
        if self.target_totals is not None:  # chat rows: padding (ids < 0) is fed as token 0 and counted nowhere
            valid_BT, tokens_BT = tokens_BT >= 0, tokens_BT.clamp(min=0)
            if self.last:  # the MTP modules read the ids; a micro-batch's loss follows its forward
                self.pending.append((tokens_BT, valid_BT, docs, weight))
        h = self.streams(self.embed(x)) if self.first else x
        tables = layer_rope_tables(self.cfg, self.layer_ids, h.shape[1], h.device)
        if docs is not None:  # packed rows: each document's positions from 0
            tables = docs.layer_tables(tables, h.shape[1])
        aux = []
        selection = shared_selection(self.cfg)  # a stage starts at a full layer (``split_layers``)
        # packed: the documents replace valid_BT in the routing statistics; L_I over the real queries either way
        with counting_only(self.layers, valid_BT, documents_BT), real_queries(self.layers, valid_BT):
            for layer, (cos, sin) in zip(self.layers, tables):
                h = layer(h, cos, sin, tokens_BT, selection, docs=docs)
                if self.training:  # the FFN's MoE, or the pair's shortcut MoE (LongCat-Flash: a block's dense FFN)
                    aux += [m.aux_loss for m in (layer.ffn, layer.shortcut) if getattr(m, "aux_loss", None) is not None]
        if aux:
            total = torch.stack(aux).sum()
            self.totals["aux_loss"].append(total.detach() * weight)
            h = AttachAux.apply(h, total, self.scale * weight)
        kl = indexer_losses(self.layers) if self.training else []
        if kl:  # the DSA indexers' L_I (``--indexer-train``): their inputs are detached, only the indexers learn
            w = self._query_weight(valid_BT, documents_BT, 0)
            total = torch.stack(kl).sum()
            self.totals["indexer_loss"].append(total.detach() * w)
            h = AttachAux.apply(h, total, self.scale * w)
        return h

    def _query_weight(self, valid_BT: torch.Tensor | None, documents_BT: torch.Tensor | None, k: int) -> float:
        """M x this micro-batch's share of the step's real queries at MTP depth k (0: the main layers'; chat data,
        ``query_totals``), the weight of its indexers' L_I (each a mean over its real queries), as
        ``Trainer._local_step`` weighs it; 1.0 for text (every micro-batch has as many)."""
        if self.query_totals is None:
            return 1.0
        n = query_count(valid_BT, documents_BT, k)
        total = self.query_totals[k]
        return n * self.micro_batches / total if total else 0.0

    def _balance_weight(self, docs: Documents | None) -> float:
        """M x this micro-batch's share of the step's documents (packed rows; ``scale`` then leaves the share), the
        weight of its balance loss (a mean over its documents); 1.0 unpacked (every micro-batch has as many rows)."""
        if docs is None or not self.document_total:
            return 1.0
        return sum(len(g) for g in docs.gathers) * self.micro_batches / self.document_total  # a row per document

    def loss(self, h: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
        """The last stage's loss of one micro-batch over the number of micro-batches: next-token,
        MTP (its inputs are the targets shifted: token t_{i+1} is target i; chat data: the ids its forward
        kept, as targets there are ``IGNORE_INDEX`` off the assistant's) and the MTP blocks' balance losses.
        Chat data: each mean weighted by the micro-batch's share of the step's targets (``_target_weight``); packed
        rows: MTP targets within each document (``depth_targets``), as the forward's documents say."""
        weight, valid_BT, ids = 1.0, None, None  # the MTP blocks' balance loss's (``_balance_weight``); text: no mask
        if self.target_totals is None:
            tokens = torch.cat([targets_BT[:, :1], targets_BT[:, :-1]], dim=1)  # tokens[:, 1:] = targets[:, :-1]
            main, mtp_losses = self.output_losses(h, tokens, targets_BT)
        else:
            tokens, valid_BT, docs, weight = self.pending.popleft()
            ids = None if docs is None else docs.ids
            with counting_only(self.mtp, valid_BT, ids), real_queries(self.mtp, valid_BT):
                main, mtp_losses = self.output_losses(h, tokens, targets_BT, docs)
            main, *mtp_losses = [self._target_weight(loss_k, depth_targets(targets_BT, ids, k), k)
                                 for k, loss_k in enumerate([main, *mtp_losses])]
        loss = main
        self.totals["main_loss"].append(main.detach())
        if mtp_losses:
            mtp = torch.stack(mtp_losses).mean()
            self.totals["mtp_loss"].append(mtp.detach())
            loss = loss + self.cfg.mtp_loss_weight * mtp
        if self.training:
            for m in self.mtp.modules():
                if isinstance(m, MoE) and m.aux_loss is not None:
                    self.totals["aux_loss"].append(m.aux_loss.detach() * weight)
                    loss = loss + m.aux_loss * weight
            # the MTP blocks' DSA indexers' L_I (``--indexer-train``), module k's weighted by its depth's share
            kl = [loss_k * self._query_weight(valid_BT, ids, k) for k, mod in enumerate(self.mtp, start=1)
                  for loss_k in indexer_losses(mod)]
            if kl:
                total = torch.stack(kl).sum()
                self.totals["indexer_loss"].append(total.detach())
                loss = loss + total
        return loss * self.scale

    def _target_weight(self, loss: torch.Tensor, targets_BT: torch.Tensor, k: int) -> torch.Tensor:
        """``loss``, the mean over this micro-batch's trained targets at MTP depth k (0: next-token), times
        M x its share of the step's (``target_totals[k]``): ``scale`` (1/M) then leaves the share. Trained
        targets are token ids; the ignored ones (``IGNORE_INDEX``, -100) are negative. No target here: 0, not nan."""
        n = (targets_BT >= 0).sum()  # a tensor: no host sync per micro-batch
        total = self.target_totals[k]
        share = n * (self.micro_batches / total) if total else n * 0.0
        return torch.where(n > 0, loss, 0.0) * share


def _no_loss(_output: torch.Tensor, _target: torch.Tensor) -> torch.Tensor:
    raise AssertionError("only the last stage computes the loss")


def _pipelining():
    """``torch.distributed.pipelining``, imported when a pipeline is built: importing it (with dynamo and
    DTensor) takes seconds, which every ``flyer train`` start would pay, pipelined or not."""
    from torch.distributed import pipelining

    return pipelining


class PipelineModel(nn.Module):
    """This rank's stages of a ``Transformer``. Its parameters and state-dict names are those of
    the one-process model restricted to the stages held here (``layers.<id>`` keeps the global
    layer id), so ``Mesh.full_state_dict`` assembles the single-process checkpoint.

    ``indexer_train``: the run's ``--indexer-train``, which the stages' split weighs (``split_layers``).
    ``overlap``: run DualPipeV's paired forward and backward chunks concurrently (``OverlapFB``);
    None: on for DualPipeV with EP > 1 (the exchanges it hides), off otherwise. Every rank must
    pass the same value (it creates process groups).
    """

    def __init__(self, model: Transformer, mesh, schedule: str, micro_batches: int, batch_size: int, seq_len: int,
                 overlap: bool | None = None, indexer_train: str = "off"):
        super().__init__()
        if overlap and schedule != "dualpipev":
            raise FieldError("overlap", f"pairs the chunks of DualPipeV only (got schedule {schedule})")
        validate_pipeline(model.cfg, mesh.pp, schedule, micro_batches)
        require_torch_for(schedule, mesh.pp)
        self.cfg = model.cfg
        self.schedule_name = schedule
        self.micro_batches = micro_batches
        self.mesh = mesh
        n = mesh.pp * chunks_per_rank(schedule, mesh.pp)
        self.split = split_layers(model.cfg, n, seq_len, indexer_train)
        self.placement = stage_ranks(schedule, mesh.pp)
        local = [s for s in range(n) if self.placement[s] == mesh.pp_rank]
        stages = [Stage(model, s, self.split[s], n, micro_batches) for s in local]
        self._stages = stages  # not submodules: the same weights are registered below by their model names
        for name, module in held_modules(model, mesh.pp, mesh.pp_rank, schedule, seq_len, indexer_train).items():
            if any(p.is_meta for p in module.parameters()):
                raise ValueError(f"{name}: on the meta device, built for another pipeline layout (build_model's "
                                 f"stages must be ({schedule!r}, {seq_len}, {indexer_train!r}))")
            setattr(self, name, module)
        self.mirrors = hasattr(self, "embed") and 0 not in local  # the last stage's copy of the embedding
        if self.mirrors:
            setattr(self.embed.weight, MIRROR, True)
        self._mirror_group = None
        if self.placement[0] != self.placement[-1] and (len(model.mtp) or model.cfg.tie_embeddings):
            dp = mesh.dp
            first, last = self.placement[0] * dp, self.placement[-1] * dp
            for d in range(dp):  # every rank creates every group, in order
                g = dist.new_group([first + d, last + d])
                if mesh.dp_rank == d and mesh.pp_rank in (self.placement[0], self.placement[-1]):
                    self._mirror_group = g
        # Static shapes: PyTorch's dynamic shape inference would run an extra real forward and
        # backward (counting expert loads and MoE traffic) on the first step.
        # requires_grad: a stage's input gradient is what it sends back.
        pipe = _pipelining()
        residual = torch.empty(residual_shape(model.cfg, batch_size, seq_len), device="meta", requires_grad=True)
        tokens = torch.empty(batch_size, seq_len, dtype=torch.long, device="meta")
        self.pipe_stages = [pipe.PipelineStage(st, st.index, n, mesh.device,
                                               input_args=tokens if st.first else residual,
                                               output_args=residual, group=mesh.pp_group,
                                               dw_builder=_whole_backward if _weight_reused(st) else None)
                            for st in stages]
        self.overlap = (schedule == "dualpipev" and mesh.ep > 1) if overlap is None else overlap
        self.schedule = self._build_schedule()
        if self.overlap and mesh.pp > 1:
            mesh.add_backward_groups()  # the backward's exchanges get their own groups (see overlap.py)
            from flyer.parallel.overlap import OverlapFB  # heavy: imports torch.distributed.pipelining

            self.schedule.register_custom_function(pipe.schedules.OVERLAP_F_B, OverlapFB())

    @property
    def stages(self) -> list[Stage]:
        return self._stages

    def _build_schedule(self):
        last = next((st for st in self._stages if st.last), None)
        # every rank passes a loss function: PyTorch's schedules run backward only where one is given
        loss_fn = last.loss if last is not None else _no_loss
        kind, M = self.schedule_name, self.micro_batches
        pipe = _pipelining()
        kw = dict(loss_fn=loss_fn, scale_grads=False)
        if kind == "1f1b":
            return pipe.Schedule1F1B(self.pipe_stages[0], M, **kw)
        cls = {"interleaved": pipe.ScheduleInterleaved1F1B, "zb": pipe.ScheduleZBVZeroBubble,
               "dualpipev": pipe.ScheduleDualPipeV}[kind]
        return cls(self.pipe_stages, M, **kw)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, target_totals: list[float] | None = None,
                   documents_BT: torch.Tensor | None = None, document_total: float | None = None,
                   query_totals: list[float] | None = None) -> dict[str, float]:
        """Forward and backward of the micro-batches of ``x``/``y`` (M x batch rows) through the
        schedule; returns this rank's summed loss terms over the micro-batches (0 where a term is
        computed on another rank): main_loss, mtp_loss, aux_loss, each a mean over micro-batches, and indexer_loss,
        the L_I of the DSA indexers held here summed over them (``--indexer-train``; 0 when off), with
        indexer_layers, how many they are (so the trainer's sum over ranks gives the mean over layers).

        target_totals: chat data (``flyer.data.chat_data``): per MTP depth k (0: next-token) the step's trained
        targets (y[:, k:] not ``IGNORE_INDEX``) of one data-parallel replica, the mean over replicas (their
        gradients are averaged). Each micro-batch's means are then weighted by their share of it (main_loss and
        mtp_loss: means over the step's targets), and x's ids < 0 (padding) count in no routing statistic.
        None (text): every micro-batch's mean weighs 1/M.

        documents_BT: packed rows' document ids (M x batch, T) (``flyer.model.documents``; chat data only, its
        target_totals counted by ``depth_targets``), handed to every stage as the token ids are; None: unpacked.
        document_total: then the step's documents of one replica (the mean over replicas), each micro-batch's balance
        loss weighted by its share of them (``Stage._balance_weight``).
        query_totals: chat data with trained DSA indexers (``--indexer-train``): per MTP depth k the step's real
        queries of one replica (x[:, k:] >= 0; packed: ``depth_queries``), the mean over replicas; each micro-batch's
        L_I (a mean over its real queries) then weighs its share of them (``Stage._query_weight``)."""
        if target_totals is not None and self._trained_indexers() and query_totals is None:
            raise ValueError("indexer_train: chat data under pipelining needs query_totals (each micro-batch's L_I "
                             "weighs its share of the real queries)")
        for st in self._stages:
            st.totals = {k: [] for k in st.totals}
            st.target_totals, st.document_total = target_totals, document_total
            st.query_totals = query_totals if target_totals is not None else None
            st.pending.clear()
        first = any(st.first for st in self._stages)
        last = any(st.last for st in self._stages)
        # contiguous: the schedule splits rows into micro-batches, and torch 2.11's stages refuse an
        # input whose strides differ from the contiguous ones they expect (x = tokens[:, :-1] does)
        chat = target_totals is not None  # chat rows' padding (ids < 0) enters as token 0
        args = ((x.clamp(min=0) if chat else x).contiguous(),) if first else ()
        # every stage gets the token ids (split by micro-batch like the inputs): the hash-routed layers need them,
        # and under chat data the padding mask is x >= 0; packed rows' document ids travel alike
        docs = {} if documents_BT is None else {"documents_BT": documents_BT.contiguous()}
        try:
            self.schedule.step(*args, target=y.contiguous() if last else None, return_outputs=False,
                               tokens_BT=x.contiguous(), **docs)
        finally:
            for st in self._stages:
                st.target_totals = st.document_total = st.query_totals = None
                st.pending.clear()
        out = dict.fromkeys(("main_loss", "mtp_loss", "aux_loss", "indexer_loss"), 0.0)
        for st in self._stages:
            for k, v in st.totals.items():
                out[k] += float(sum(t.float() for t in v)) / self.micro_batches if v else 0.0
        out["indexer_layers"] = float(len(self._trained_indexers()))
        return out

    def _trained_indexers(self) -> list[nn.Module]:
        """The attention modules held here whose DSA indexer trains (``set_indexer_training``)."""
        return [m for m in indexer_attentions(self) if getattr(m, "index_train", "off") != "off"]  # V4's CSA too

    @torch.no_grad()
    def sync_mirrors(self) -> None:
        """Sum the embedding's gradient with its mirror's (after the data-parallel sums); none where it is frozen
        (``--indexer-train warmup``: both copies alike)."""
        if self._mirror_group is None or not self.embed.weight.requires_grad:
            return
        w = self.embed.weight
        if w.grad is None:
            w.grad = torch.zeros_like(w)
        dist.all_reduce(w.grad, group=self._mirror_group)

    @torch.no_grad()
    def forward_loss(self, x: torch.Tensor, y: torch.Tensor, documents_BT: torch.Tensor | None = None) -> float:
        """The main (next-token) loss of one batch, forward only, stage after stage (evaluation);
        the value on the ranks holding the last stage, 0.0 elsewhere. ``documents_BT``: packed rows' document ids."""
        mesh, h = self.mesh, x
        for s, rank in enumerate(self.placement):
            prev = self.placement[s - 1] if s else rank
            if rank != mesh.pp_rank:
                if prev == mesh.pp_rank:  # hand the activations to the stage's rank
                    dist.send(h.float().contiguous(), dst=mesh.pp_ranks[rank], group=mesh.pp_group)
                continue
            st = next(st for st in self._stages if st.index == s)
            if s and prev != rank:
                h = torch.empty(residual_shape(self.cfg, *x.shape), device=mesh.device)
                dist.recv(h, src=mesh.pp_ranks[prev], group=mesh.pp_group)
            h = st(h, x, documents_BT)
        last = next((st for st in self._stages if st.last), None)
        return float(last.head_loss(last.norm(last.collapse(h)), y)) if last is not None else 0.0

    def train(self, mode: bool = True) -> PipelineModel:
        super().train(mode)
        for st in self._stages:  # not submodules (see __init__), so set here
            st.train(mode)
        return self
