"""Optimizer state in the single-process layout, so a checkpoint resumes on another process layout.

Each rank's optimizer holds the state of the parameters it steps: every one without sharding, the ones it owns
under ZeRO-1 (``flyer.parallel.zero``), its slice of each expert stack under EP, its stages' under pipelining. The
single-process layout names a state tensor ``{parameter}/{key}`` (``layers.1.ffn.experts.w1/exp_avg``) with the
shape of the parameter in a one-process model (expert stacks whole), as ``model.safetensors`` holds the weights:
``full_optimizer_state`` assembles it on rank 0, and ``load_full_optimizer_state`` gives each rank of any layout
the part its optimizer steps. AdamW's and Muon's state (moments, momentum, step counts) is per parameter and
elementwise in the parameter's shape, so a slice of the whole is the state a sharded run would have held.

A checkpoint holds that state as one file (``OPTIMIZER_FILE``: a one-process run's, or one whose ranks do not share
the checkpoint folder) or as every rank's part of it (``part_name``: the tensors it holds a copy of, an expert stack
by its rows) with ``INDEX_FILE`` naming where each tensor's rows lie: then no rank holds more than its own state,
as a model of hundreds of billions of parameters needs. ``SavedState`` reads either as the one layout.
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from flyer.parallel.grads import MIRROR, expert_param_names, expert_ranges

SEP = "/"  # between a parameter's name and its state key (parameter names are dotted)
OPTIMIZER_FILE = "optimizer.safetensors"
INDEX_FILE = "optimizer.index.json"
_PART = re.compile(r"optimizer-(\d{5,})-of-(\d{5,})\.safetensors")


def part_name(rank: int, world: int) -> str:
    """The file of rank ``rank``'s part of the optimizer state in a run of ``world`` ranks."""
    return f"optimizer-{rank:05d}-of-{world:05d}.safetensors"


def local_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers holding this rank's state (a ZeRO-1 optimizer's shards, else ``optimizer`` itself)."""
    return optimizer.local_optimizers() if hasattr(optimizer, "local_optimizers") else [optimizer]


def _named(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def _holds_copy(name: str, experts: set[str], mesh, sharded: bool) -> bool:
    """Whether this rank sends its state of ``name``: one copy of each (replicas hold equal state, a ZeRO-1 shard's
    owner the only one); the caller skips pipeline mirrors (the first stage's embedding is the original)."""
    if sharded:
        return True
    return mesh.dp_rank < mesh.ep if name in experts else mesh.dp_rank == 0


def optimizer_part(model: nn.Module, optimizer, mesh) -> dict[str, tuple[torch.Tensor, int | None, int]]:
    """The optimizer state this rank holds the saved copy of: ``{name}/{key}`` -> (CPU tensor, its first row in the
    single-process tensor for an expert stack's slice else None, the single-process first dimension); 0-dim step
    counts are whole (one per stack, not per expert)."""
    names, sharded = _named(model), hasattr(optimizer, "local_optimizers")
    experts, ranges = expert_param_names(model), expert_ranges(model, mesh)
    mirrors = {n for n, p in model.named_parameters() if getattr(p, MIRROR, False)}
    mine: dict[str, tuple[torch.Tensor, int | None, int]] = {}
    for opt in local_optimizers(optimizer):
        for p, state in opt.state.items():
            name = names[id(p)]
            if name in mirrors or not _holds_copy(name, experts, mesh, sharded):
                continue
            first, _, n_full = ranges.get(name, (None, None, None))
            for key, value in state.items():
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"optimizer state {name}/{key} is a {type(value).__name__}, not a tensor")
                t = value.detach().cpu()
                sliced = first is not None and t.dim() > 0 and t.shape[0] != n_full  # EP 1 holds a stack whole
                mine[f"{name}{SEP}{key}"] = (t, first, n_full) if sliced else (t, None, t.shape[0] if t.dim() else 0)
    return mine


def _spans(key: str, parts: list[tuple[int, int]], n_full: int) -> None:
    """``RuntimeError`` unless the row ranges ``parts`` of ``key``'s expert stack cover its ``n_full`` rows once."""
    at = 0
    for lo, hi in sorted(parts):
        if lo != at:
            break
        at = hi
    if at != n_full or sum(hi - lo for lo, hi in parts) != n_full:
        raise RuntimeError(f"optimizer state {key}: expert rows {sorted(parts)} gathered, {n_full} in the stack")


def full_optimizer_state(model: nn.Module, optimizer, mesh) -> dict[str, torch.Tensor] | None:
    """Every parameter's optimizer state in the single-process layout, on rank 0 (None elsewhere): ``{name}/{key}``
    -> CPU tensor, expert stacks' state whole (E, ...) as each EP rank's slices put together; 0-dim step counts as
    they are. A collective: every rank of ``mesh`` calls it."""
    every = mesh.gather_object(optimizer_part(model, optimizer, mesh))
    if every is None:
        return None
    out: dict[str, torch.Tensor] = {}
    rows: dict[str, list[tuple[int, int]]] = {}  # an expert stack's rows put in: each once, or the state holds zeros
    for part in every:
        for key, (t, first, n_full) in part.items():
            if first is None:
                out.setdefault(key, t)
                continue
            whole = out.setdefault(key, torch.zeros((n_full, *t.shape[1:]), dtype=t.dtype))
            whole[first:first + t.shape[0]] = t
            rows.setdefault(key, []).append((first, first + t.shape[0]))
    for key, spans in rows.items():
        _spans(key, spans, out[key].shape[0])
    return out


def write_optimizer_part(path: Path, part: dict[str, tuple[torch.Tensor, int | None, int]]) -> dict[str, dict]:
    """Write ``part`` (``optimizer_part``'s) as the safetensors file ``path``; returns its ``INDEX_FILE`` entries:
    ``{name}/{key}`` -> {"shape": the single-process shape, "rows": [first, end] of an expert stack's slice, else
    absent}."""
    save_file({k: t.contiguous() for k, (t, _, _) in part.items()}, str(path))
    out = {}
    for key, (t, first, n_full) in part.items():
        entry: dict = {"shape": [n_full, *t.shape[1:]] if t.dim() else []}
        if first is not None:
            entry["rows"] = [first, first + t.shape[0]]
        out[key] = entry
    return out


def optimizer_index(parts: dict[str, dict[str, dict]]) -> dict:
    """``INDEX_FILE``'s content from each part file's entries (file name -> ``write_optimizer_part``'s): for each
    ``{name}/{key}``, its single-process shape and the parts that hold it ([file] whole, [file, first, end] rows of an
    expert stack). A tensor several parts hold whole is read from the first. ``RuntimeError`` for an expert stack's
    rows not covered exactly once."""
    tensors: dict[str, dict] = {}
    for file in sorted(parts):
        for key, e in parts[file].items():
            t = tensors.setdefault(key, {"shape": e["shape"], "parts": []})
            if "rows" in e:
                t["parts"].append([file, *e["rows"]])
            elif not t["parts"]:
                t["parts"].append([file])
    for key, t in tensors.items():
        if len(t["parts"][0]) == 3:
            _spans(key, [(lo, hi) for _, lo, hi in t["parts"]], t["shape"][0])
    return {"format": "flyer optimizer state parts", "tensors": tensors}


class SavedState:
    """A checkpoint's optimizer state in the single-process layout, read a slice at a time: from ``OPTIMIZER_FILE``,
    or from the rank parts ``INDEX_FILE`` names (an expert stack's rows put together from the parts holding them).
    A context manager (its files stay open inside). ``ValueError`` for an index that does not describe its parts."""

    def __init__(self, ckpt: Path):
        self.ckpt = ckpt
        self._stack = ExitStack()
        self._open: dict[str, object] = {}
        self.whole = (ckpt / OPTIMIZER_FILE).is_file()
        if self.whole and (ckpt / INDEX_FILE).is_file():  # never written so: which one holds the state?
            raise ValueError(f"it holds both {OPTIMIZER_FILE} and {INDEX_FILE}")
        if self.whole:
            f = self._file(OPTIMIZER_FILE)
            self.tensors = {k: {"shape": f.get_slice(k).get_shape(), "parts": [[OPTIMIZER_FILE]]} for k in f.keys()}
        else:
            self.tensors = _read_index(ckpt / INDEX_FILE)

    def __enter__(self) -> "SavedState":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _file(self, name: str):
        if name not in self._open:
            named = name == OPTIMIZER_FILE if self.whole else bool(_PART.fullmatch(name))
            if not named or not (self.ckpt / name).is_file():
                raise ValueError(f"{INDEX_FILE} names {name!r:.80}, not a part file of the checkpoint")
            self._open[name] = self._stack.enter_context(safe_open(str(self.ckpt / name), framework="pt"))
        return self._open[name]

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key]["shape"])

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``key`` whole, or rows [lo, hi) of its first dimension."""
        t = self.tensors[key]
        parts = t["parts"]
        if len(parts[0]) == 1:  # held whole in one file
            f = self._file(parts[0][0])
            got = f.get_tensor(key) if rows is None else f.get_slice(key)[rows[0]:rows[1]]
            return self._checked(key, got, rows)
        lo, hi = rows if rows is not None else (0, t["shape"][0])
        pieces = [self._file(file).get_slice(key)[max(lo, a) - a:min(hi, b) - a]
                  for file, a, b in parts if a < hi and lo < b]
        return self._checked(key, torch.cat(pieces) if pieces else torch.empty(0), rows)

    def _checked(self, key: str, got: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
        shape = self.shape(key)
        want = shape if rows is None else (rows[1] - rows[0], *shape[1:])
        if tuple(got.shape) != tuple(want):
            raise ValueError(f"optimizer state {key}: its parts hold {tuple(got.shape)}, the index says {want}")
        return got

    def read_all(self) -> dict[str, torch.Tensor]:
        """Every tensor whole (what ``full_optimizer_state`` gathered)."""
        return {k: self.read(k) for k in self.tensors}


def has_saved_state(ckpt: Path) -> bool:
    """Whether checkpoint ``ckpt`` holds its optimizer state in the single-process layout (``SavedState``), not per
    rank for the layout that wrote it (``optimizer*.pt``, written before)."""
    return (ckpt / OPTIMIZER_FILE).is_file() or (ckpt / INDEX_FILE).is_file()


def _read_index(path: Path) -> dict[str, dict]:
    index = json.loads(path.read_text())
    tensors = index.get("tensors") if isinstance(index, dict) else None
    if not isinstance(tensors, dict):
        raise ValueError(f"{path.name} has no tensors table")
    for key, t in tensors.items():
        shape, parts = (t.get("shape"), t.get("parts")) if isinstance(t, dict) else (None, None)
        if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)
                or not isinstance(parts, list) or not parts
                or not all(isinstance(p, list) and len(p) in (1, 3) and isinstance(p[0], str)
                           and all(type(r) is int for r in p[1:]) for p in parts)
                or len({len(p) for p in parts}) != 1 or (len(parts) > 1 and len(parts[0]) == 1)):
            raise ValueError(f"{path.name}: bad entry for {key!r:.80}")
        if len(parts[0]) == 3:
            if not shape:
                raise ValueError(f"{path.name}: bad entry for {key!r:.80}")
            try:
                _spans(key, [(lo, hi) for _, lo, hi in parts], shape[0])
            except RuntimeError as e:
                raise ValueError(f"{path.name}: {e}") from None
    return tensors


def load_full_optimizer_state(model: nn.Module, optimizer, mesh, ckpt: Path) -> None:
    """Load checkpoint ``ckpt``'s optimizer state in the single-process layout (``SavedState``) into this rank's
    optimizer: the state of each parameter it steps, an expert stack's cut to this rank's experts (read as a slice:
    a rank reads its part of the state, not the whole). A parameter without saved state starts without
    (it had taken no step: a parameter without a gradient yet). ``ValueError`` for state of a parameter the model
    lacks, of another shape, or missing some of what its group's parameters hold (``exp_avg`` without
    ``exp_avg_sq``)."""
    names, ranges = _named(model), expert_ranges(model, mesh)
    with SavedState(ckpt) as f:
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
                        full = f"{name}{SEP}{key}"
                        if name in ranges and f.shape(full):
                            first, n_local, _ = ranges[name]
                            t = f.read(full, (first, first + n_local))
                        else:
                            t = f.read(full)
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


__all__ = ["INDEX_FILE", "OPTIMIZER_FILE", "SavedState", "full_optimizer_state", "has_saved_state",
           "load_full_optimizer_state", "local_optimizers", "optimizer_index", "optimizer_part", "part_name",
           "write_optimizer_part"]
