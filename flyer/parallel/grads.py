"""Data parallelism around expert parallelism: replicas, gradient sums, full-layout weights.

Every parameter is either an expert stack (``Experts.w1/w2/w3``, sharded over the EP group,
replicated over ``expert_dp_group``) or a dense parameter (replicated over the ``dp`` ranks of its
pipeline stage: every rank without pipelining). Gradients are summed explicitly after backward
(DDP's arithmetic without its wrapper), so the two kinds can be reduced over different groups, in
a few flat buckets:

    dense:  g <- sum over dp_group / dp
    expert: g <- sum over expert_dp_group / dp

A parameter marked as a pipeline mirror (``MIRROR``: the last stage's copy of the embedding, for
MTP or a tied head) is summed with its original by the pipeline (``flyer.parallel.pipeline``) and
counted once in the gradient norm.

Each rank's loss is the mean over its own batch; the expert owner already received, through the
backward of combine and dispatch, the gradient of every EP-group rank's loss. So after the sums
every gradient equals that of one process on the concatenation of all batches with
loss = mean of the per-rank losses.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

from flyer.model.experts import Experts
from flyer.model.transformer import Transformer, init_module

BUCKET_BYTES = 64 << 20
MIRROR = "_flyer_pipeline_mirror"  # attribute set on a parameter that copies one of another stage


def expert_param_names(model: nn.Module) -> set[str]:
    """State-dict names of the routed-expert stacks (``...ffn.experts.w1`` etc.)."""
    return {f"{name}.{w}" for name, m in model.named_modules() if isinstance(m, Experts) for w in ("w1", "w2", "w3")}


def _split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    experts = expert_param_names(model)
    dense, expert = [], []
    for name, p in model.named_parameters():  # deduplicates tied weights
        (expert if name in experts else dense).append(p)
    return dense, expert


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive runs of one dtype and device, each up to BUCKET_BYTES."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if not out or out[-1][0].dtype != t.dtype or out[-1][0].device != t.device or size + nbytes > BUCKET_BYTES:
            out.append([])
            size = 0
        out[-1].append(t)
        size += nbytes
    return out


def _coalesced(tensors: list[torch.Tensor], op) -> None:
    """Apply the in-place collective ``op(flat)`` to the tensors, a bucket at a time."""
    for bucket in _buckets(tensors):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        op(flat)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


@torch.no_grad()
def broadcast_parameters(model: nn.Module, mesh) -> None:
    """Make replicas identical: dense parameters and buffers from the stage's first rank (rank 0 without a
    pipeline), expert stacks from the rank with the same EP rank in the stage's first EP group.

    Note: a model built with the same seed on every rank holds *the same values* in every EP
    rank's expert shard; ``init_like_single_process`` gives each shard its own slice of the
    single-process initialisation instead.
    """
    if mesh is None or mesh.world == 1:
        return
    experts = expert_param_names(model)
    dense = [t for n, t in model.state_dict(keep_vars=True).items() if n not in experts]
    dense = list({id(t): t for t in dense}.values())  # tied weights once
    _coalesced([t.data for t in dense], lambda f: dist.broadcast(f, src=mesh.pp_rank * mesh.dp, group=mesh.dp_group))
    if mesh.expert_dp_group is not None:
        _, expert = _split_params(model)
        src = mesh.pp_rank * mesh.dp + mesh.ep_rank  # this EP rank in the stage's first EP group
        _coalesced([p.data for p in expert], lambda f: dist.broadcast(f, src=src, group=mesh.expert_dp_group))


@torch.no_grad()
def sync_gradients(model: nn.Module, mesh) -> None:
    """After backward on each rank's own batch: gradients of the single-process model on all
    batches with loss = mean of per-rank losses (see the module docstring). Parameters without a
    gradient get zeros, so every rank runs the same collectives."""
    if mesh is None or mesh.world == 1:
        return
    dense, expert = _split_params(model)
    for p in dense + expert:
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    world = mesh.dp

    def allreduce(group):
        def op(flat):
            dist.all_reduce(flat, group=group)
            flat.div_(world)
        return op

    if world > 1:
        _coalesced([p.grad for p in dense if p.requires_grad], allreduce(mesh.dp_group))
    expert_grads = [p.grad for p in expert if p.requires_grad]
    if mesh.expert_dp_group is not None:
        _coalesced(expert_grads, allreduce(mesh.expert_dp_group))
    else:
        for g in expert_grads:
            g.div_(world)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, mesh) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for an EP model, after ``sync_gradients``: the norm of
    the full single-process gradient (each expert shard counted once, summed over the EP group
    and the pipeline's stages), identical on every rank so replicas stay identical. Returns the
    total norm (FP32)."""
    dense, expert = _split_params(model)
    mirrors = [p.grad for p in dense if p.grad is not None and getattr(p, MIRROR, False)]
    dense_g = [p.grad for p in dense if p.grad is not None and not getattr(p, MIRROR, False)]
    expert_g = [p.grad for p in expert if p.grad is not None]
    device = next(model.parameters()).device
    d, e = torch.zeros((), device=device), torch.zeros((), device=device)
    for g in dense_g:
        d += g.float().pow(2).sum()
    for g in expert_g:
        e += g.float().pow(2).sum()
    if mesh is not None and mesh.ep > 1:
        dist.all_reduce(e, group=mesh.ep_group)
    total = d + e
    if mesh is not None and mesh.pp > 1:
        dist.all_reduce(total, group=mesh.pp_group)
    total = total.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in dense_g + expert_g + mirrors:
        g.mul_(coef.to(g.dtype))
    return total


@torch.no_grad()
def full_state_dict(model: nn.Module, mesh, only_rank0: bool = False) -> dict[str, torch.Tensor]:
    """The single-process state dict on CPU: expert stacks gathered over the EP group to their
    full (E, ...) first dimension, names as in a model without EP; under pipelining, every stage's
    part gathered on rank 0 (the other ranks get theirs only). ``only_rank0`` (a checkpoint's, which rank 0
    writes): the stacks gathered on the stages' first ranks only, the other ranks get nothing, so no rank but
    those holds every expert's weights. Collective: all ranks call. Tensors not gathered are the model's own
    on the CPU (no copy: a checkpoint writes them at once), so they change with the next optimizer step; clone
    what must outlive it."""
    sd = model.state_dict()
    experts = expert_param_names(model) if mesh is not None and mesh.ep > 1 else set()
    if only_rank0 and mesh is not None and mesh.dp_rank >= mesh.ep:  # no part in rank 0's copy (ep 1: dp_rank > 0)
        return {}
    lead = not only_rank0 or mesh is None or mesh.dp_rank == 0  # the stage's first rank: it keeps what it gathers
    out = {}
    for name, t in sd.items():
        if name in experts:
            parts = [torch.empty_like(t) for _ in range(mesh.ep)] if lead else None
            if only_rank0:
                dist.gather(t.contiguous(), parts, dst=mesh.ep_ranks[0], group=mesh.ep_group)
            else:
                dist.all_gather(parts, t.contiguous(), group=mesh.ep_group)
            t = torch.cat(parts, 0) if lead else t
        if lead:
            out[name] = t.detach().cpu()
    if not lead:
        return {}
    if mesh is not None and mesh.pp > 1:  # one replica's pipeline holds every weight once
        mirrors = {n for n, p in model.named_parameters() if getattr(p, MIRROR, False)}
        if mesh.dp_rank == 0:
            parts = [None] * mesh.pp if mesh.rank == 0 else None
            mine = {n: t for n, t in out.items() if n not in mirrors}
            dist.gather_object(mine, parts, dst=0, group=mesh.pp_group)
        if mesh.rank == 0:
            out = {n: t for part in parts for n, t in part.items()}
    return out


@torch.no_grad()
def weight_part(model: nn.Module, mesh) -> dict[str, torch.Tensor]:
    """This rank's share of ``full_state_dict``'s tensors (same names and shapes, on CPU), for a checkpoint each rank
    writes a part of: its stage's dense tensors on the stage's first rank, and each expert stack gathered whole over
    the EP group onto one of its ranks in turn (the stage's k-th stack onto its (k mod ep)-th rank), so no rank holds
    more than its share of the experts. Every tensor is in exactly one rank's part. Collective: all ranks call."""
    if mesh.dp_rank >= mesh.ep:  # a later replica: the first holds the same weights
        return {}
    sd = {n: t for n, t in model.state_dict().items() if not t.is_meta}  # meta: another stage's
    experts = expert_param_names(model) & sd.keys() if mesh.ep > 1 else set()
    out = {}
    for k, name in enumerate(sorted(experts)):  # the same order on every rank of the group
        dst, t = mesh.ep_ranks[k % mesh.ep], sd[name].contiguous()
        parts = [torch.empty_like(t) for _ in range(mesh.ep)] if mesh.rank == dst else None
        dist.gather(t, parts, dst=dst, group=mesh.ep_group)
        if parts is not None:
            out[name] = torch.cat(parts, 0).cpu()
    if mesh.dp_rank == 0:
        mirrors = {n for n, p in model.named_parameters() if getattr(p, MIRROR, False)}  # another stage's to write
        out.update({n: t.detach().cpu() for n, t in sd.items() if n not in experts and n not in mirrors})
    return out


@torch.no_grad()
def load_full_state_dict(model: nn.Module, full_sd: dict[str, torch.Tensor], mesh) -> None:
    """Load a single-process state dict, keeping this rank's slice of each expert stack (and,
    under pipelining, only the weights of this rank's stages)."""
    own = model.state_dict()
    sd = {n: t for n, t in full_sd.items() if n in own} if mesh is not None and mesh.pp > 1 else dict(full_sd)
    model.load_state_dict(_expert_slices(expert_ranges(model, mesh), sd))


@torch.no_grad()
def load_state_file(model: nn.Module, files: dict[str, Path], mesh) -> None:
    """Load the single-process weights in safetensors ``files`` (name -> file: ``full_state_dict``'s in one file, or
    ``weight_part``'s in several) into this rank's model reading only its part: its slice of each expert stack (as
    rows of the file) and, under pipelining, its stages' weights (a rank holds its own share in memory, never the
    whole model). ``ValueError`` for a stack of another size, ``KeyError`` for a tensor the files lack."""
    ranges = expert_ranges(model, mesh)
    sd = {}
    with contextlib.ExitStack() as stack:
        opened = {}
        for name, t in model.state_dict().items():
            if t.is_meta:  # another stage's (build_model): nothing to read
                sd[name] = t
                continue
            path = files[name]
            if path not in opened:
                opened[path] = stack.enter_context(safe_open(str(path), framework="pt"))
            f = opened[path]
            if name in ranges:
                first, n_local, n_full = ranges[name]
                stored = f.get_slice(name)
                if stored.get_shape()[0] != n_full:
                    raise ValueError(f"{name}: checkpoint has {stored.get_shape()[0]} experts, the model {n_full}")
                sd[name] = stored[first:first + n_local]
            else:
                sd[name] = f.get_tensor(name)
    model.load_state_dict(sd)


def expert_ranges(model: nn.Module, mesh) -> dict[str, tuple[int, int, int]]:
    """Each expert stack's name -> (this rank's first expert, its count, the one-process count)."""
    ep = mesh.ep if mesh is not None else 1
    return {f"{name}.{w}": (m.first, m.n_local, m.n_local * ep)
            for name, m in model.named_modules() if isinstance(m, Experts) for w in ("w1", "w2", "w3")}


def _expert_slices(ranges: dict[str, tuple[int, int, int]], sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` (single-process names and shapes) with each expert stack cut to this rank's experts."""
    for key in ranges.keys() & sd.keys():
        first, n_local, n_full = ranges[key]
        if sd[key].shape[0] != n_full:
            raise ValueError(f"{key}: checkpoint has {sd[key].shape[0]} experts, the model {n_full}")
        sd[key] = sd[key][first:first + n_local]
    return sd


@torch.no_grad()
def init_like_single_process(model: nn.Module, mesh, seed: int) -> None:
    """Initialise ``model`` (any EP or PP layout) exactly as ``torch.manual_seed(seed);
    Transformer(model.cfg)`` would in one process, deterministically on every rank (no broadcast).
    Each rank replays that build's random draws, in order, on a copy built on the meta device,
    one module at a time, and keeps its slice of each: one module's weights beside its own model,
    not a second whole model (the constructors' draws first: ``nn.Linear`` and ``nn.Embedding``
    initialise themselves when built, then ``Transformer.init_weights`` draws every weight again).
    Parameters on the meta device (other pipeline stages) are skipped. Buffers of modules that own
    parameters are set too, as the build leaves them: zero, or what the init draws (a hash-routed gate's
    ``tid2eid``, DeepSeek-V4)."""
    # a pipeline rank's model holds the other stages on the meta device (build_model): nothing to set
    own = {n: p for n, p in model.named_parameters(remove_duplicate=False) if not p.is_meta}
    own_buffers = {n: b for n, b in model.named_buffers(remove_duplicate=False) if not b.is_meta}
    ranges = expert_ranges(model, mesh)  # once: the loop below visits every module
    done: set[str] = set()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device("meta"):
            ref = Transformer(model.cfg)
        # a tied weight (the head's, tie_embeddings) has one value, the last module's draw: a rank holding only one
        # of its names (the first pipeline stage: the embedding alone) takes it too
        by_id: dict[int, list[str]] = {}
        for n, p in ref.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), []).append(n)
        aliases = {n: names for names in by_id.values() for n in names}
        for m in ref.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                with _materialized(m):
                    m.reset_parameters()
        for prefix, m in ref.named_modules():
            if next(m.parameters(recurse=False), None) is None:
                continue
            with _materialized(m):
                # as built: what the init does not draw is zeros (buffers, a hybrid compressor's ape), not garbage
                for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)):
                    t.zero_()
                init_module(m, ref.cfg.init_std)
                part = {a: p for k, p in m.named_parameters(recurse=False) for a in aliases[f"{prefix}.{k}"]}
                for name, t in _expert_slices(ranges, {n: t for n, t in part.items() if n in own}).items():
                    own[name].copy_(t)
                    done.add(name)
                for k, b in m.named_buffers(recurse=False):
                    if f"{prefix}.{k}" in own_buffers:
                        own_buffers[f"{prefix}.{k}"].copy_(b)
    missed = set(own) - done
    if missed:
        raise RuntimeError(f"init_like_single_process: no one-process weights for {sorted(missed)[:5]}")


@contextlib.contextmanager
def _materialized(m: nn.Module):
    """``m``'s own parameters in (uninitialised) CPU memory inside the block, on meta again after."""
    m.to_empty(device="cpu", recurse=False)
    try:
        yield m
    finally:
        m.to_empty(device="meta", recurse=False)


__all__ = ["broadcast_parameters", "sync_gradients", "clip_grad_norm_", "full_state_dict", "load_full_state_dict",
           "load_state_file", "weight_part",
           "init_like_single_process", "expert_param_names", "expert_ranges"]
