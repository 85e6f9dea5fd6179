"""What a training step logs of its routers: each MoE layer's tokens per routed expert (``expert_load``) and
``update_router_bias``'s statistics (``load_imbalance``, ``bias_min``, ``bias_max``), for the whole job: summed over
the data-parallel replicas as the bias update sums them, and, under pipelining, gathered from every stage (a rank
holds its stages' MoE layers only)."""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from flyer.model.moe import MoE, moe_layers
from flyer.parallel.mesh import LocalMesh, Mesh


def router_stats(stats: dict[str, float], model: torch.nn.Module, mesh: Mesh | LocalMesh,
                 pipelined: bool) -> dict[str, float]:
    """``update_router_bias``'s ``stats`` for the whole model: under pipelining a rank's cover its stages' MoE
    layers only, so rank 0 takes the extremes over the ranks holding learned routers (others keep their own)."""
    if not pipelined:
        return stats
    mine = stats if any(not m.hash_routed for m in moe_layers(model)) else None
    every = [s for s in mesh.gather_object(mine) or [] if s is not None]
    if not every:
        return stats
    return {"load_imbalance": max(s["load_imbalance"] for s in every),
            "bias_min": min(s["bias_min"] for s in every), "bias_max": max(s["bias_max"] for s in every)}


def expert_loads(model: torch.nn.Module, mesh: Mesh | LocalMesh, pipelined: bool) -> list[list[float]]:
    """Tokens per routed expert of every MoE layer since the last bias update, in layer order, summed over the
    data-parallel replicas (in place: ``replicas_loads``; under pipelining gathered from every stage onto rank 0,
    other ranks get []). A collective on every rank."""
    loads = replicas_loads(moe_layers(model), mesh)  # every layer the bias update reads, summed in place
    if not pipelined:  # one read of every layer's counts
        flat = torch.cat(loads).tolist() if loads else []
        return [flat[end - len(x):end] for x, end in zip(loads, itertools.accumulate(map(len, loads)))]
    # a block's MoE: its FFN, or the shortcut MoE of a pair's first block (LongCat-Flash)
    held = [(blk.layer_id, m) for blk in model.modules()
            for m in (getattr(blk, "ffn", None), getattr(blk, "shortcut", None)) if isinstance(m, MoE)]
    mine = [(i, m.tokens_per_expert.tolist()) for i, m in held] if mesh.dp_rank == 0 else []
    every = mesh.gather_object(mine)
    return [counts for _, counts in sorted(x for part in every for x in part)] if every is not None else []


def replicas_loads(layers: list[MoE], mesh: Mesh | LocalMesh) -> list[torch.Tensor]:
    """``layers``' ``tokens_per_expert``, summed in place over this stage's replicas in one all-reduce (every replica
    of a stage holds the same layers), so the bias update that follows reads the job's counts and reduces none."""
    counts = [m.tokens_per_expert for m in layers]
    if mesh.dp == 1 or not counts:
        return counts
    flat = torch.cat(counts)
    dist.all_reduce(flat, group=mesh.dp_group)
    for c, summed in zip(counts, flat.split([len(c) for c in counts])):
        c.copy_(summed)
    return counts


__all__ = ["expert_loads", "replicas_loads", "router_stats"]
