"""Optimizer state in the single-process layout, so a checkpoint resumes on another process layout.

Each rank's optimizer holds the state of the parameters it steps: every one without sharding, the ones it owns
under ZeRO-1 (``flyer.parallel.zero``), its slice of each expert stack under EP, its stages' under pipelining. The
single-process layout names a state tensor ``{parameter}/{key}`` (``layers.1.ffn.experts.w1/exp_avg``) with the
shape of the parameter in a one-process model (expert stacks whole), as ``model.safetensors`` holds the weights:
``full_optimizer_state`` assembles it on rank 0, and ``load_full_optimizer_state`` gives each rank of any layout
the part its optimizer steps. AdamW's and Muon's state (moments, momentum, step counts) is per parameter and
elementwise in the parameter's shape, so a slice of the whole is the state a sharded run would have held.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from flyer.parallel.grads import MIRROR, expert_param_names, expert_ranges

SEP = "/"  # between a parameter's name and its state key (parameter names are dotted)


def local_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers holding this rank's state (a ZeRO-1 optimizer's shards, else ``optimizer`` itself)."""
    return optimizer.local_optimizers() if hasattr(optimizer, "local_optimizers") else [optimizer]


def _named(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def _holds_copy(name: str, experts: set[str], mesh, sharded: bool) -> bool:
    """Whether this rank sends its state of ``name``: one copy of each (replicas hold equal state, a ZeRO-1 shard's
    owner the only one), none of a pipeline mirror (the first stage's embedding is the original)."""
    if sharded:
        return True
    return mesh.dp_rank < mesh.ep if name in experts else mesh.dp_rank == 0


def full_optimizer_state(model: nn.Module, optimizer, mesh) -> dict[str, torch.Tensor] | None:
    """Every parameter's optimizer state in the single-process layout, on rank 0 (None elsewhere): ``{name}/{key}``
    -> CPU tensor, expert stacks' state whole (E, ...) as each EP rank's slices put together; 0-dim step counts as
    they are. A collective: every rank of ``mesh`` calls it."""
    names, sharded = _named(model), hasattr(optimizer, "local_optimizers")
    experts, ranges = expert_param_names(model), expert_ranges(model, mesh)
    mirrors = {n for n, p in model.named_parameters() if getattr(p, MIRROR, False)}
    mine: dict[str, tuple[torch.Tensor, int | None, int | None]] = {}  # key -> (tensor, first expert, E)
    for opt in local_optimizers(optimizer):
        for p, state in opt.state.items():
            name = names[id(p)]
            if name in mirrors or not _holds_copy(name, experts, mesh, sharded):
                continue
            first, _, n_full = ranges.get(name, (None, None, None))
            for key, value in state.items():
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"optimizer state {name}/{key} is a {type(value).__name__}, not a tensor")
                scalar = value.dim() == 0  # a step count: one per stack, not per expert
                mine[f"{name}{SEP}{key}"] = (value.detach().cpu(), None if scalar else first, n_full)
    every = mesh.gather_object(mine)
    if every is None:
        return None
    out: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}  # an expert stack's rows put in: each once, or the state would hold zeros
    for part in every:
        for key, (t, first, n_full) in part.items():
            if first is None or t.shape[0] == n_full:  # not an expert stack's, or all of it (one EP rank)
                out.setdefault(key, t)
                continue
            whole = out.setdefault(key, torch.zeros((n_full, *t.shape[1:]), dtype=t.dtype))
            whole[first:first + t.shape[0]] = t
            rows[key] = rows.get(key, 0) + t.shape[0]
    for key, n in rows.items():
        if n != out[key].shape[0]:
            raise RuntimeError(f"optimizer state {key}: {n} expert rows gathered, {out[key].shape[0]} in the stack")
    return out


def load_full_optimizer_state(model: nn.Module, optimizer, mesh, path: Path) -> None:
    """Load the single-process optimizer state file ``path`` (``full_optimizer_state``'s, as safetensors) into this
    rank's optimizer: the state of each parameter it steps, an expert stack's cut to this rank's experts (read as a
    slice: a rank reads its part of the file, not the whole). A parameter without saved state starts without
    (it had taken no step: a parameter without a gradient yet). ``ValueError`` for state of a parameter the model
    lacks, of another shape, or missing some of what its group's parameters hold (``exp_avg`` without
    ``exp_avg_sq``)."""
    names, ranges = _named(model), expert_ranges(model, mesh)
    with safe_open(str(path), framework="pt") as f:
        keys: dict[str, list[str]] = {}
        for k in f.keys():
            name, _, key = k.rpartition(SEP)
            keys.setdefault(name, []).append(key)
        unknown = sorted(set(keys) - {n for n, _ in model.named_parameters()})
        if unknown and mesh.pp == 1:  # a pipeline rank's model has its stages only
            raise ValueError(f"optimizer state of {len(unknown)} parameter(s) the model lacks ({unknown[0]})")
        for opt in local_optimizers(optimizer):
            sd = opt.state_dict()  # this optimizer's groups (its parameters as indices, in order), no state yet
            state, index = {}, 0
            for group in opt.param_groups:
                held: dict[frozenset, str] = {}  # the state keys a group's parameters have -> one that has them
                for p in group["params"]:
                    name = names[id(p)]
                    entry = {}
                    for key in keys.get(name, ()):
                        stored = f.get_slice(f"{name}{SEP}{key}")
                        if name in ranges and stored.get_shape():
                            first, n_local, _ = ranges[name]
                            t = stored[first:first + n_local]
                        else:
                            t = f.get_tensor(f"{name}{SEP}{key}")
                        if t.dim() and t.shape != p.shape:
                            raise ValueError(f"optimizer state {name}/{key} has shape {tuple(t.shape)}, "
                                             f"the parameter {tuple(p.shape)}")
                        entry[key] = t
                    if entry:
                        state[index] = entry
                        held.setdefault(frozenset(entry), name)
                    index += 1
                if len(held) > 1:  # one optimizer steps a group: each parameter with state has all of it
                    (a, n), (b, m) = sorted(held.items(), key=lambda kv: len(kv[0]))[:2]
                    raise ValueError(f"optimizer state of {n} has {', '.join(sorted(a))}; of {m}, in its group, "
                                     f"{', '.join(sorted(b))}")
            sd["state"] = state
            opt.load_state_dict(sd)


__all__ = ["full_optimizer_state", "load_full_optimizer_state", "local_optimizers"]
