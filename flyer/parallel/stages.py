"""Pipeline stages: how the model is cut into stages and which pipeline rank holds each.

The ``n_layers`` blocks are cut into ``S = pp x chunks`` contiguous stages (one chunk per
rank for 1F1B, two for the others), each with at least one block, by the split that minimises the
largest stage's training FLOPs (``split_layers``): the embedding sits on the first stage, the final
norm, the output head and the MTP modules on the last, whose FLOPs count there. Placement
(``stage_ranks``): loop style for 1F1B and interleaved 1F1B (stage s on pipeline rank s mod pp);
V style for zero-bubble (ZBV) and DualPipeV (rank r holds stages r and S-1-r), so the first and the
last stage share rank 0 and the MTP modules use *the* embedding and output head of the main model,
as the DeepSeek-V3 report describes. With loop placement the last stage holds a mirror of the
embedding (MTP's input; the head too when tied), whose gradient is summed with the original's
(``flyer.parallel.pipeline.PipelineModel.sync_mirrors``) and counted once in the norm.

These are plain functions of the config, without ``torch.distributed.pipelining``: ``flyer plan`` and
``flyer.parallel.memory`` plan layouts from them, and ``flyer.parallel.pipeline`` runs them.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.torch_version import TorchVersion

from flyer.config import ModelConfig
from flyer.errors import FieldError
from flyer.model.counts import head_flops_per_token, layer_flops_per_token, mtp_training_flops_per_token
from flyer.model.transformer import Transformer

PP_SCHEDULES = ("1f1b", "interleaved", "zb", "dualpipev")
V_SCHEDULES = ("zb", "dualpipev")  # V placement: rank r holds stages r and 2 pp - 1 - r
SPLIT_SCHEDULES = ("zb", "dualpipev")  # each backward split into its input and weight parts (zero bubble)
SPLIT_TORCH = "2.13"  # the first torch whose split weight backward runs flyer's model (``split_backward_runs``)


def chunks_per_rank(schedule: str, pp: int) -> int:
    """Stages each pipeline rank holds (1 without pipelining)."""
    return 1 if pp == 1 or schedule == "1f1b" else 2


def stage_ranks(schedule: str, pp: int) -> list[int]:
    """The pipeline rank of every stage, by stage index."""
    n = pp * chunks_per_rank(schedule, pp)
    if schedule in V_SCHEDULES and pp > 1:
        return [s if s < pp else n - 1 - s for s in range(n)]
    return [s % pp for s in range(n)]


def min_micro_batches(schedule: str, pp: int) -> int:
    """The fewest micro-batches ``schedule`` runs on ``pp`` ranks (PyTorch's schedules refuse fewer)."""
    return pp * chunks_per_rank(schedule, pp)


def validate_pipeline(cfg: ModelConfig, pp: int, schedule: str, micro_batches: int, grad_accum: int = 1) -> None:
    """One-line ``FieldError`` for a pipeline layout that cannot run, before any work."""
    if schedule not in PP_SCHEDULES:
        raise FieldError("pp_schedule", f"must be one of {', '.join(PP_SCHEDULES)} (got {schedule!r})")
    if pp == 1:
        return
    n = pp * chunks_per_rank(schedule, pp)
    if cfg.n_layers < n:
        raise FieldError("pp", f"{schedule} on {pp} ranks cuts the model into {n} stages of at least one layer; "
                               f"the model has {cfg.n_layers} layers (got {pp})")
    if cfg.shortcut_moe and cfg.n_layers // 2 < n:  # a stage holds whole pairs (``split_layers``)
        raise FieldError("pp", f"{schedule} on {pp} ranks cuts the model into {n} stages of whole block pairs "
                               f"(shortcut_moe: blocks 2i and 2i+1 share one MoE); the model has {cfg.n_layers // 2} "
                               f"pairs (got {pp})")
    full = sum(map(cfg.has_indexer, range(cfg.n_layers)))
    if cfg.indexer_types and full < n:  # a stage starts at a full layer (``split_layers``)
        raise FieldError("pp", f"{schedule} on {pp} ranks cuts the model into {n} stages, each starting at a layer "
                               f"with its own DSA indexer; indexer_types marks {full} 'full' (got {pp})")
    need = min_micro_batches(schedule, pp)
    if micro_batches < need:
        raise FieldError("micro_batches", f"{schedule} on {pp} ranks needs at least {need} micro-batches "
                                          f"(got {micro_batches})")
    if schedule == "interleaved" and micro_batches % pp:
        raise FieldError("micro_batches", f"interleaved 1F1B needs a multiple of {{pp}} = {pp} (got {micro_batches})",
                         ("pp",))
    if grad_accum != 1:
        raise FieldError("grad_accum", f"must be 1 with pipelining: {{micro_batches}} sets the micro-batches of a "
                                       f"step (got {grad_accum})", ("micro_batches",))


def check_indexer_stages(cfg: ModelConfig, pp: int, schedule: str, seq_len: int, mode: str) -> None:
    """One-line ``FieldError`` naming ``pp`` where ``--indexer-train warmup`` (the indexers alone train) would leave a
    pipeline rank nothing to train: its stages (``split_layers`` at ``seq_len``, ``stage_ranks``) hold no layer with
    a lightning indexer. DeepSeek-V4's CSA layers are some layers only (V3.2's DSA: every layer, MTP blocks too)."""
    if mode != "warmup" or pp == 1:
        return
    n = pp * chunks_per_rank(schedule, pp)
    split, placement = split_layers(cfg, n, seq_len, mode), stage_ranks(schedule, pp)
    for rank in range(pp):
        layers = [i for s in range(n) if placement[s] == rank for i in split[s]]
        mtp = range(cfg.n_layers, cfg.n_layers + cfg.mtp_depth) if placement[-1] == rank else range(0)
        if not any(cfg.has_indexer(i) or cfg.is_csa(i) for i in [*layers, *mtp]):
            raise FieldError("pp", f"{{indexer_train}} warmup trains the lightning indexers only, and {schedule} on "
                                   f"{pp} ranks leaves rank {rank} layers {layers} without one (got {pp})",
                             ("indexer_train",))


def split_backward_runs() -> bool:
    """Whether this torch runs ``SPLIT_SCHEDULES``: before 2.13 (seen on 2.11 and 2.12.1) its weight
    backward (``pipelining._backward.stage_backward_weight``) fails on custom autograd Functions
    ("Attribute '_input_metadata' is invalid"); 2.11 also sums a multi-output node's gradients into one."""
    return TorchVersion(torch.__version__) >= SPLIT_TORCH


def require_torch_for(schedule: str, pp: int) -> None:
    """One-line ``FieldError`` where this torch cannot run ``schedule`` (a layout check apart from
    ``validate_pipeline``: ``flyer plan`` validates layouts for other machines)."""
    if pp > 1 and schedule in SPLIT_SCHEDULES and not split_backward_runs():
        raise FieldError("pp_schedule", f"{schedule} needs torch >= {SPLIT_TORCH} (this is {torch.__version__}, whose "
                                        f"split weight backward fails on custom autograd Functions); 1f1b and "
                                        f"interleaved run on it")


def end_flops(cfg: ModelConfig, seq_len: int, indexer_train: str = "off") -> float:
    """Training FLOPs per token the last stage adds: the output head's and ``hc_head``'s GEMMs (with
    hyper-connections; ``head_flops_per_token``) and the MTP modules' (``mtp_training_flops_per_token``), as
    ``indexer_train`` trains them."""
    return head_flops_per_token(cfg, indexer_train) + mtp_training_flops_per_token(cfg, seq_len, indexer_train)


def split_layers(cfg: ModelConfig, n_stages: int, seq_len: int = 4096, indexer_train: str = "off") -> list[range]:
    """The contiguous split of the blocks into ``n_stages`` non-empty stages whose largest training
    FLOPs (the last stage's head and MTP included; DSA indexers as ``indexer_train`` trains them, whose warm-up
    leaves the rest forward only: ``layer_flops_per_token``) is smallest; ties keep later stages lighter. A stage
    starts at a layer with its own DSA indexer (GLM-5's shared layers stay with the full layer whose
    selection they reuse: it never crosses stages), so a model with fewer full layers than stages is refused;
    with ``shortcut_moe`` (LongCat-Flash) at a pair's first block (even), so the stages hold whole pairs and
    the split counts pairs."""
    L = cfg.n_layers
    if not 1 <= n_stages <= L:
        raise FieldError("pp", f"{n_stages} stages of at least one layer need at least {n_stages} layers "
                               f"(the model has {L})")
    # where a stage may begin: a pair's second block adds the MoE output its first leaves (``Block.pair``)
    starts = [i for i in range(1, L) if (cfg.has_indexer(i) or not cfg.indexer_types)
              and not (cfg.shortcut_moe and i % 2)]
    if cfg.shortcut_moe and len(starts) < n_stages - 1:
        raise FieldError("pp", f"{n_stages} stages of whole block pairs (shortcut_moe) need {n_stages} pairs "
                               f"(the model has {L // 2})")
    if len(starts) < n_stages - 1:
        raise FieldError("pp", f"{n_stages} stages each starting at a layer with its own DSA indexer need "
                               f"{n_stages} such layers (indexer_types marks {len(starts) + 1} 'full')")
    after = {e: len(starts) - 1 - k for k, e in enumerate(starts)}  # stage starts past each one
    cost = [layer_flops_per_token(cfg, seq_len, i, True, indexer_train) for i in range(L)]
    prefix = [0.0]
    for c in cost:
        prefix.append(prefix[-1] + c)
    tail = end_flops(cfg, seq_len, indexer_train)

    @functools.cache
    def best(s: int, start: int) -> tuple[float, tuple[int, ...]]:
        """Stages s.. over layers start..L-1: (largest stage cost, the cut points)."""
        if s == n_stages - 1:
            return prefix[L] - prefix[start] + tail, ()
        out = None
        later = n_stages - 2 - s  # cuts still to place after this stage's end
        for end in (e for e in starts if e > start and after[e] >= later):
            rest, cuts = best(s + 1, end)
            cand = (max(prefix[end] - prefix[start], rest), (end,) + cuts)
            if out is None or cand[0] <= out[0]:  # <=: the later cut wins a tie
                out = cand
        return out

    cuts = (0,) + best(0, 0)[1] + (L,)
    return [range(a, b) for a, b in zip(cuts, cuts[1:])]


def needs_embedding(model: Transformer, first: bool, last: bool) -> bool:
    """The first stage looks tokens up; the last one needs the embedding for MTP or a tied head."""
    return first or (last and (len(model.mtp) > 0 or model.cfg.tie_embeddings))



def held_modules(model: Transformer, pp: int, pp_rank: int, schedule: str, seq_len: int,
                 indexer_train: str = "off") -> dict[str, nn.Module]:
    """What pipeline rank ``pp_rank`` holds (its stages: ``split_layers`` at ``seq_len`` and ``indexer_train``), by
    the one-process model's attribute names and in the order ``PipelineModel`` registers them: its ``layers`` (keyed
    by global layer id), the ``embed``ding (the first stage's, or the last stage's mirror for MTP or a tied head),
    and on the last stage ``norm``, ``head``, ``hc_head`` (hyper-connections) and ``mtp``.
    ``flyer.parallel.memory`` plans from the same."""
    n = pp * chunks_per_rank(schedule, pp)
    split, placement = split_layers(model.cfg, n, seq_len, indexer_train), stage_ranks(schedule, pp)
    local = [s for s in range(n) if placement[s] == pp_rank]
    out: dict[str, nn.Module] = {"layers": nn.ModuleDict({str(i): model.layers[i] for s in local for i in split[s]})}
    last = n - 1 in local
    if needs_embedding(model, 0 in local, last):
        out["embed"] = model.embed
    if last:
        out.update(norm=model.norm, head=model.head)
        if model.cfg.hc_mult > 1:
            out["hc_head"] = model.hc_head
        out["mtp"] = model.mtp
    return out
