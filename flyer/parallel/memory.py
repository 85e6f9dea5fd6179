"""Per-rank bytes of the training state (parameters, gradients, optimizer state), measured on a
running rank and planned from the model config, so that the two agree to the byte.

Measured (``measure_state_bytes``): each parameter this rank holds once (a pipeline's mirror of
the embedding included: it is allocated), its gradient, and every tensor of this rank's optimizer
state (AdamW: ``exp_avg``, ``exp_avg_sq`` and the ``step`` scalar; Muon: one ``momentum_buffer`` for
its matrices, AdamW's for the rest; under ZeRO-1 only this rank's shard).

Planned (``plan_state_bytes``): the same sums from a ``Transformer`` built on the ``meta``
device, cut as the run cuts it: the layers and ends of each pipeline rank (``held_modules``, the
rule ``PipelineModel`` follows), the expert stacks sliced ``ep`` ways, and ZeRO-1's partition
(``flyer.parallel.zero.partition``), gradients and optimizer state for the parameters that train only (DSA
indexers frozen or trained alone as ``--indexer-train`` sets them: ``set_indexer_training``). Activations are an
estimate beside them (``activation_bytes``), and ``saved_bytes`` measures what autograd keeps while a forward runs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from flyer.cluster.costs import (activation_bytes_per_token_layer, expert_weights_saved_bytes, head_saved_bytes,
                                 indexer_loss_saved_bytes_per_token)
from flyer.config import ModelConfig
from flyer.model.counts import has_routed_experts
from flyer.model.indexer_loss import set_indexer_training
from flyer.model.transformer import Transformer
from flyer.parallel.grads import expert_param_names
from flyer.parallel.stages import chunks_per_rank, held_modules, split_layers, stage_ranks
from flyer.parallel.zero import partition, shard_kinds, shard_rank, trained_kinds
from flyer.optim.muon import OPTIMIZERS, muon_param_ids, optimizer_groups, state_bytes

STEP_BYTES = 4  # AdamW's per-parameter ``step``: an FP32 scalar tensor (fused and foreach alike)
KEYS = ("param_bytes", "grad_bytes", "optimizer_bytes")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def measure_state_bytes(model: nn.Module, optimizer) -> dict[str, int]:
    """This rank's param_bytes, grad_bytes and optimizer_bytes; call after an optimizer step and
    before ``zero_grad`` (gradients and state both exist then). ``optimizer``: a torch optimizer
    or ``flyer.parallel.zero.ShardedOptimizer`` (its local shards are counted)."""
    params = [p for _, p in model.named_parameters()]  # each tensor once
    local = optimizer.local_optimizers() if hasattr(optimizer, "local_optimizers") else [optimizer]
    state = sum(_nbytes(v) for o in local for s in o.state.values() for v in s.values() if torch.is_tensor(v))
    return {"param_bytes": sum(_nbytes(p) for p in params),
            "grad_bytes": sum(_nbytes(p.grad) for p in params if p.grad is not None),
            "optimizer_bytes": state}


def _holder(model: Transformer, pp: int, pp_rank: int, schedule: str, seq_len: int, indexer_train: str) -> nn.Module:
    """The modules pipeline rank ``pp_rank`` holds (``flyer.parallel.stages.held_modules``), registered in
    ``PipelineModel``'s order so ``named_parameters`` lists them as the run does; the whole model
    without pipelining."""
    if pp == 1:
        return model
    holder = nn.Module()
    for name, module in held_modules(model, pp, pp_rank, schedule, seq_len, indexer_train).items():
        setattr(holder, name, module)
    return holder


class _Made(TorchDispatchMode):
    """Every storage the ops under it create: data pointer -> (weak reference, bytes)."""

    def __init__(self):
        super().__init__()
        self.made: dict[int, tuple[Any, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # a view or an in-place result shares an input's storage: made here only if that input was
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                s = t.untyped_storage()
                if s.data_ptr() in inputs:
                    continue
                old = self.made.get(s.data_ptr())
                if old is None or torch.UntypedStorage._expired(old[0]):  # new, or a freed one's address again
                    if old is not None:
                        torch.UntypedStorage._free_weak_ref(old[0])
                    self.made[s.data_ptr()] = (s._weak_ref(), s.nbytes())
        return out


def held_bytes(fn, skip: nn.Module | None = None) -> int:
    """Bytes of the storages the ops of ``fn()`` create that are still alive when it returns (its result held):
    what a training forward keeps for backward, ``skip``'s parameters left out. Unlike ``saved_bytes`` it sees what
    ``torch.utils.checkpoint`` keeps outside autograd's saved tensors (a region's inputs, a selective policy's
    saved outputs: ``flyer.model.recompute``)."""
    params = {p.untyped_storage().data_ptr() for p in skip.parameters()} if skip is not None else set()
    with _Made() as mode:
        out = fn()
    alive = sum(n for ptr, (ref, n) in mode.made.items()
                if ptr not in params and not torch.UntypedStorage._expired(ref))
    for ref, _ in mode.made.values():
        torch.UntypedStorage._free_weak_ref(ref)
    del out
    return alive


def saved_bytes(fn, skip: nn.Module | None = None) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs
    (``torch.autograd.graph.saved_tensors_hooks``), ``skip``'s parameters (a model's state) left out."""
    params = {p.untyped_storage().data_ptr() for p in skip.parameters()} if skip is not None else set()
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def activation_bytes(cfg: ModelConfig, pp: int, pp_rank: int, schedule: str, seq_len: int, micro_batch: int,
                     precision: str, ep: int = 1, recompute: str = "none", activation_cache: str = "fp8",
                     indexer_train: str = "off", packed: bool = False) -> int:
    """An estimate of what pipeline rank ``pp_rank`` saves for backward at its peak: every block's
    saved activations (``activation_bytes_per_token_layer``: ``recompute`` "mla" leaves out the dense MLA layers'
    per-head q, k and v and normed latents, ``flyer.model.recompute``, else nothing is recomputed; under FP8 the
    FFNs' FP8 activation cache, unless ``activation_cache`` is 'input'; the MTP modules' blocks on the last stage,
    module k's over the T - k tokens it reads) and its routed experts' GEMM weights (``expert_weights_saved_bytes``:
    this rank's ``1/ep`` of them, in FP8 a byte an element: the FP8 experts keep their weights' FP8 blocks) for the
    micro-batches in flight on each of its stages (stage s of n holds up to n - s of them in a 1F1B-style schedule;
    one without pipelining), plus what the main and MTP heads' losses keep on the last stage (``head_saved_bytes``).
    ``indexer_train`` adds what each indexer's L_I keeps (``indexer_loss_saved_bytes_per_token``); its warm-up
    freezes all the rest, which then keeps nothing. ``packed``: the rows are packed documents (``flyer train
    --pack``), whose DSA layers run each document as a row of its own."""
    warm = indexer_train == "warmup"
    element = 4 if precision == "fp32" else 2
    n = pp * chunks_per_rank(schedule, pp)
    split, placement = split_layers(cfg, n, seq_len, indexer_train), stage_ranks(schedule, pp)
    tokens = micro_batch * seq_len
    fp8_cache = precision == "fp8" and activation_cache == "fp8"
    weight_element = 1 if precision == "fp8" else element  # FP8 experts keep their three weights' FP8 blocks
    expert = cfg.n_routed_experts // ep * expert_weights_saved_bytes(cfg, weight_element) if micro_batch else 0
    total = 0.0
    for s in (s for s in range(n) if placement[s] == pp_rank):
        blocks = [*split[s], *(range(cfg.n_layers, cfg.n_layers + cfg.mtp_depth) if s == n - 1 else ())]
        kept = 0.0
        for i in blocks:
            reads = seq_len - max(0, i - cfg.n_layers + 1)  # MTP module k reads T - k tokens
            per_token = indexer_loss_saved_bytes_per_token(cfg, i, indexer_train, element, reads, fp8_cache)
            if not warm:
                per_token += activation_bytes_per_token_layer(cfg, has_routed_experts(cfg, i), recompute=False,
                                                              bytes_per_element=element, layer_id=i,
                                                              # a DSA layer training its indexer keeps its own
                                                              mla_recompute=recompute == "mla" and (
                                                                  indexer_train == "off" or not cfg.has_indexer(i)),
                                                              fp8_cache=fp8_cache,
                                                              seq_len=reads, packed=packed)
            kept += micro_batch * reads * per_token
        weights = 0 if warm else expert * sum(has_routed_experts(cfg, i) for i in blocks)
        total += (n - s) * (kept + weights)
        if s == n - 1 and not warm:
            total += head_saved_bytes(cfg, tokens)
    return int(total)


def plan_state_bytes(cfg: ModelConfig, pp: int, dp: int, ep: int, zero: int, schedule: str = "1f1b",
                     seq_len: int = 4096, micro_batch: int = 1, precision: str = "bf16",
                     optimizer: str = "adamw", recompute: str = "none",
                     activation_cache: str = "fp8", indexer_train: str = "off") -> dict[str, Any]:
    """Per global rank (stage-major: rank = pp_rank * dp + dp_rank, as ``flyer.parallel.mesh``; ``recompute`` and
    ``activation_cache``: ``flyer train --recompute`` and ``--fp8-activation-cache``, the activation estimate's;
    ``indexer_train``: ``--indexer-train``, which sets what trains and the stages' split weighs):
    ``param_bytes_per_rank``, ``grad_bytes_per_rank``, ``optimizer_bytes_per_rank`` (exact, for a
    run of ``cfg`` on that layout with FP32 parameters and ``optimizer``, 'adamw' or 'muon': the
    routing of ``flyer.optim.muon``), each with its ``max_...``, and
    ``activation_bytes_per_rank_estimate``. The layout is assumed valid
    (``flyer.parallel.mesh.validate_layout``, ``flyer.parallel.stages.validate_pipeline``)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)} (got {optimizer!r})")
    with torch.device("meta"):
        model = Transformer(cfg)
    set_indexer_training(model, indexer_train)  # what the run trains: gradients and state for those only
    muon = muon_param_ids(model) if optimizer == "muon" else {}
    experts = expert_param_names(model)
    out: dict[str, list[int]] = {f"{k}_per_rank": [] for k in KEYS}
    acts = []
    for pp_rank in range(pp):
        named = list(_holder(model, pp, pp_rank, schedule, seq_len, indexer_train).named_parameters())
        numel = {id(p): p.numel() // ep if n in experts else p.numel() for n, p in named}
        elsize = {id(p): p.element_size() for _, p in named}
        params = sum(numel[id(p)] * elsize[id(p)] for _, p in named)
        grads = sum(numel[id(p)] * elsize[id(p)] for _, p in named if p.requires_grad)  # zeros where unused

        def state(ps: list[nn.Parameter]) -> int:
            return sum(state_bytes(optimizer, id(p) in muon, numel[id(p)], elsize[id(p)], STEP_BYTES) for p in ps)

        # what trains, as ShardedOptimizer partitions it: the state is made at a parameter's first gradient, and a
        # frozen one (never any) holds none
        kinds = trained_kinds(named, experts)
        shards = {}  # kind -> optimizer bytes of each of its group's ranks
        for kind, replicas in (shard_kinds(dp, ep) if zero else [("all", 1)]):
            groups = [g["params"] for g in optimizer_groups(optimizer, kinds[kind], muon, 0.0)]
            owned = partition([[numel[id(p)] for p in g] for g in groups], replicas)
            shards[kind] = [sum(state([g[i] for i in idx]) for g, idx in zip(groups, mine)) for mine in owned]
        act = activation_bytes(cfg, pp, pp_rank, schedule, seq_len, micro_batch, precision, ep,  # replicas alike
                               recompute, activation_cache, indexer_train)
        for dp_rank in range(dp):
            opt = sum(per[shard_rank(kind, dp_rank, ep) if len(per) > 1 else 0] for kind, per in shards.items())
            out["param_bytes_per_rank"].append(params)
            out["grad_bytes_per_rank"].append(grads)
            out["optimizer_bytes_per_rank"].append(opt)
            acts.append(act)
    res: dict[str, Any] = dict(out)
    for k in KEYS:
        res[f"max_{k}_per_rank"] = max(out[f"{k}_per_rank"])
    res["activation_bytes_per_rank_estimate"] = acts
    return res


__all__ = ["KEYS", "activation_bytes", "held_bytes", "measure_state_bytes", "plan_state_bytes"]
