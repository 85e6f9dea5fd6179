"""ZeRO-1: an optimizer (AdamW or Muon) whose state is sharded over the data-parallel replicas of each
parameter.

A dense parameter is replicated over its stage's ``dp`` ranks (``mesh.dp_group``), an expert
stack over the ``dp / ep`` ranks holding the same experts (``mesh.expert_dp_group``), so the two
kinds are sharded by two ``torch.distributed.optim.ZeroRedundancyOptimizer`` instances, one per
process group (one instance takes a single group). With ``ep == 1`` both groups are the stage's
replicas and one instance holds every parameter; a kind with a single replica (``ep == dp``, or
``dp == 1``) keeps a plain optimizer.

Each instance assigns whole parameters to its ranks, largest first, each to the rank with the
fewest elements so far (``partition``, the same rule, so a plan can count a rank's state without
running); the owner steps it and broadcasts the new values. AdamW is elementwise, and Muon
orthogonalises each whole parameter on its own (``flyer.optim.muon``), so either way every parameter
ends bit-identical to the unsharded optimizer's.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from flyer.parallel.grads import expert_param_names
from flyer.optim.muon import muon_param_ids, optimizer_class, optimizer_groups


def zero_redundancy_optimizer() -> type:
    """``torch.distributed.optim.ZeroRedundancyOptimizer``, imported when a sharded optimizer is built:
    that package (FSDP, DTensor) takes seconds to import, which every ``flyer train`` start would pay."""
    with warnings.catch_warnings():  # its functional optimizers call torch.jit.script at import: 66 deprecation notices
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.distributed.optim import ZeroRedundancyOptimizer
    return ZeroRedundancyOptimizer


def partition(groups: list[list[int]], world: int) -> list[list[list[int]]]:
    """``ZeroRedundancyOptimizer``'s assignment of parameters to the ranks of its group.

    groups: per parameter group, the element counts of its parameters in order. Returns, per rank,
    per group, the indices (into that group) of the parameters the rank owns. Within a group the
    parameters go largest first (a stable sort), each to the rank holding the fewest elements so
    far over all groups (the lowest such rank on a tie).
    """
    sizes = [0] * world
    out: list[list[list[int]]] = [[] for _ in range(world)]
    for numels in groups:
        mine: list[list[int]] = [[] for _ in range(world)]
        for i in sorted(range(len(numels)), key=lambda i: numels[i], reverse=True):
            r = sizes.index(min(sizes))
            mine[r].append(i)
            sizes[r] += numels[i]
        for r in range(world):
            out[r].append(mine[r])
    return out


def shard_kinds(dp: int, ep: int) -> list[tuple[str, int]]:
    """The parts of the optimizer as (kind, replicas of each of its parameters): ``all`` when one
    group holds every parameter (ep == 1), else ``dense`` (over the stage's ``dp`` ranks) and
    ``expert`` (over the ``dp / ep`` ranks with the same experts). A part with one replica is a
    plain optimizer."""
    return [("all", dp)] if ep == 1 else [("dense", dp), ("expert", dp // ep)]


def shard_rank(kind: str, dp_rank: int, ep: int) -> int:
    """This rank's index inside the process group of part ``kind`` (``mesh.dp_group`` ranks are
    the stage's in order; ``mesh.expert_dp_group``'s are every ``ep``-th of them)."""
    return dp_rank // ep if kind == "expert" else dp_rank


def trained_kinds(named: list[tuple[str, nn.Parameter]], experts: set[str]) -> dict[str, list[nn.Parameter]]:
    """The parameters of ``named`` that train (``requires_grad``), all, dense and experts' (``experts``' names): what
    the sharded optimizer steps. A frozen one (the indexers without ``--indexer-train``, all but them in its warm-up)
    never changes, and a ``ZeroRedundancyOptimizer`` broadcasts every parameter it holds at every step."""
    trained = [(n, p) for n, p in named if p.requires_grad]
    return {"all": [p for _, p in trained], "dense": [p for n, p in trained if n not in experts],
            "expert": [p for n, p in trained if n in experts]}


class ShardedOptimizer:
    """The optimizer ``kind`` ('adamw' or 'muon', ``flyer.optim.muon.optimizer_groups``) for
    ``model`` on ``mesh`` with ZeRO-1 state sharding; the optimizer interface the trainer uses:
    ``param_groups`` (every part's, for the learning-rate schedule), ``step``, ``zero_grad``, and
    ``state_dict`` / ``load_state_dict`` of this rank's shard only."""

    def __init__(self, model: nn.Module, mesh, lr: float, betas: tuple[float, float], weight_decay: float,
                 eps: float = 1e-8, kind: str = "adamw"):
        experts = expert_param_names(model)
        named = list(model.named_parameters())  # deduplicates tied weights
        params = trained_kinds(named, experts)
        muon = muon_param_ids(model) if kind == "muon" else {}
        fused = named[0][1].device.type in ("cpu", "cuda")
        hyper = dict(lr=lr, betas=betas, eps=eps, fused=fused)
        cls = optimizer_class(kind)
        self.parts: list[torch.optim.Optimizer] = []
        for part, replicas in shard_kinds(mesh.dp, mesh.ep):
            if not params[part]:
                continue
            groups = optimizer_groups(kind, params[part], muon, weight_decay)
            group = mesh.expert_dp_group if part == "expert" else mesh.dp_group
            if replicas == 1:
                self.parts.append(cls(groups, **hyper))
            else:
                sharded = zero_redundancy_optimizer()
                self.parts.append(sharded(groups, cls, process_group=group, **hyper))

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for part in self.parts for g in part.param_groups]

    def step(self) -> None:
        """Each owner updates its shard, then broadcasts it to the group (a collective)."""
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def local_optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers stepping this rank's parameters (its shards; a ZeroRedundancyOptimizer's ``optim``)."""
        return [getattr(p, "optim", p) for p in self.parts]

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard: one optimizer state dict per part."""
        return {"parts": [o.state_dict() for o in self.local_optimizers()]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        parts = sd.get("parts")
        mine = self.local_optimizers()
        if not isinstance(parts, list) or len(parts) != len(mine):
            raise ValueError(f"optimizer state has {len(parts) if isinstance(parts, list) else 'no'} parts, "
                             f"this ZeRO-1 optimizer {len(mine)}")
        for o, s in zip(mine, parts):
            o.load_state_dict(s)


__all__ = ["ShardedOptimizer", "partition", "shard_kinds", "shard_rank", "zero_redundancy_optimizer"]
