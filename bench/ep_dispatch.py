"""Flat versus hierarchical expert-parallel dispatch on 4 gloo ranks as 2 nodes x 2 (EP 4).

For each node limit M = 1..4 (``n_limited_groups`` with 4 expert groups, 2 per node, so a token's
experts lie on at most min(M, 2) nodes), every rank routes its tokens with the real router, then
dispatches them (FP8 by default), runs stand-in experts and combines (BF16), with the flat and the
hierarchical dispatcher in turn. Reported per step (one dispatch + combine of one MoE layer, all
ranks summed): inter- and intra-node bytes of both dispatchers and their time (median over
repeats, slowest rank), the bytes of a training step (``train_*``: the same and its backward, where
the gradients retrace both routes: combine's in FP8 as dispatch's rows, dispatch's in BF16 as
combine's), plus the bound the issue states:

    inter_hier <= inter_flat / (remote experts per token / remote nodes per token)

with both averages counted from the routing itself. Prints one JSON object; the top-level bytes
are those of the first limit in ``--limits`` that reaches both nodes (M = 2 by default).

    python bench/ep_dispatch.py [--tokens 512] [--dim 1024] [--experts 32] [--topk 8] [--no-fp8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

from flyer.config import preset
from flyer.model.moe import Gate
from flyer.parallel.dispatch import make_dispatcher
from flyer.parallel.launch import run_ranks
from flyer.parallel.mesh import destroy, init_distributed

WORLD, RANKS_PER_NODE = 4, 2


def _step(disp, x, ids, w) -> torch.Tensor:
    xs, counts, ctx = disp.dispatch(x, ids)
    return disp.combine(xs * 0.5, w, ctx)  # stand-in experts: routing cost only


def _training_step_bytes(disp, x, ids, w) -> dict:
    """Bytes of one dispatch + combine and their backward (a random upstream gradient): this rank's counters."""
    disp.counter.reset()
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = _step(disp, x, ids, w)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(0)))
    out = disp.counter.summary()
    disp.counter.reset()
    return out


def _worker(rank: int, args) -> dict:
    cfg = preset("tiny", dim=args.dim, n_routed_experts=args.experts, n_activated_experts=args.topk,
                 n_expert_groups=4, n_limited_groups=max(args.limits))
    mesh = init_distributed(cfg, ep=WORLD, ranks_per_node=RANKS_PER_NODE, timeout_s=120)
    per_node = args.experts // mesh.n_nodes
    out = []
    for limit in args.limits:
        cfg_m = cfg.replace(n_limited_groups=limit)
        torch.manual_seed(1234)  # same router everywhere; tokens differ per rank
        gate = Gate(cfg_m)
        torch.nn.init.normal_(gate.weight, std=cfg.dim ** -0.5)
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(args.tokens, args.dim, generator=g)
        with torch.no_grad():
            w, ids, _ = gate(x)
        nodes = ids // per_node
        remote = nodes != mesh.node
        remote_nodes = torch.zeros(args.tokens, mesh.n_nodes, dtype=torch.bool).scatter_(1, nodes, True)
        remote_nodes[:, mesh.node] = False
        routing = torch.tensor([float(remote.sum()), float(remote_nodes.sum()), float(args.tokens),
                                float(torch.zeros(args.tokens, mesh.n_nodes, dtype=torch.bool)
                                      .scatter_(1, nodes, True).sum(1).max())])
        dist.all_reduce(routing[:3])
        dist.all_reduce(routing[3:], op=dist.ReduceOp.MAX)
        row = {"limit": limit, "remote_experts_per_token": float(routing[0] / routing[2]),
               "remote_nodes_per_token": float(routing[1] / routing[2]), "max_nodes_per_token": int(routing[3])}
        for kind in ("flat", "hierarchical"):
            disp = make_dispatcher(kind, args.experts, mesh, fp8=not args.no_fp8)
            with torch.no_grad():
                _step(disp, x, ids, w)  # warm-up
                disp.counter.reset()
                _step(disp, x, ids, w)  # the step whose traffic is reported
                counters = disp.counter.summary()
                disp.counter.reset()
                times = []
                for _ in range(args.repeats):
                    dist.barrier()
                    t0 = time.perf_counter()
                    _step(disp, x, ids, w)
                    times.append(time.perf_counter() - t0)
            train = _training_step_bytes(disp, x, ids, w)
            t = torch.tensor([statistics.median(times)])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            c = torch.tensor([float(m[k]) for m in (counters, train)
                              for k in ("inter_node_bytes", "intra_node_bytes", "inter_node_meta_bytes")])
            dist.all_reduce(c)
            row.update({f"inter_node_bytes_{kind}": int(c[0]), f"intra_node_bytes_{kind}": int(c[1]),
                        f"inter_node_meta_bytes_{kind}": int(c[2]), f"time_s_{kind}": float(t),
                        f"train_inter_node_bytes_{kind}": int(c[3]), f"train_intra_node_bytes_{kind}": int(c[4]),
                        f"train_inter_node_meta_bytes_{kind}": int(c[5])})
        out.append(row)
    destroy(mesh)  # joins the groups' threads: one left at exit can abort the rank
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--limits", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-fp8", action="store_true", help="dispatch in FP32 instead of FP8")
    args = ap.parse_args()
    rows = run_ranks(_worker, WORLD, args)[0]
    for r in rows:
        ratio = r["remote_experts_per_token"] / max(r["remote_nodes_per_token"], 1e-12)
        r["bound_inter_node_bytes_hierarchical"] = r["inter_node_bytes_flat"] / ratio if ratio else 0.0
        r["bound_ok"] = r["inter_node_bytes_hierarchical"] <= r["bound_inter_node_bytes_hierarchical"] * (1 + 1e-9)
        r["inter_node_bytes_ratio_flat_over_hierarchical"] = (
            r["inter_node_bytes_flat"] / r["inter_node_bytes_hierarchical"]
            if r["inter_node_bytes_hierarchical"] else None)
        r["time_ratio_hierarchical_over_flat"] = r["time_s_hierarchical"] / r["time_s_flat"]
    head = next((r for r in rows if r["max_nodes_per_token"] > 1), rows[0])
    print(json.dumps({
        "layout": {"ranks": WORLD, "nodes": WORLD // RANKS_PER_NODE, "ep": WORLD, "backend": "gloo"},
        "tokens_per_rank": args.tokens, "dim": args.dim, "experts": args.experts, "topk": args.topk,
        "expert_groups": 4, "dispatch_dtype": "fp32" if args.no_fp8 else "fp8_e4m3", "combine_dtype":
            "fp32" if args.no_fp8 else "bf16", "combine_grad_dtype": "fp32" if args.no_fp8 else "fp8_e4m3",
        "note": "loopback gloo: every byte crosses the same memory bus, so times compare the two "
                "algorithms' overheads, not an InfiniBand/NVLink split; bytes are exact",
        "limit": head["limit"],
        "inter_node_bytes_flat": head["inter_node_bytes_flat"],
        "inter_node_bytes_hierarchical": head["inter_node_bytes_hierarchical"],
        "intra_node_bytes_flat": head["intra_node_bytes_flat"],
        "intra_node_bytes_hierarchical": head["intra_node_bytes_hierarchical"],
        "train_inter_node_bytes_flat": head["train_inter_node_bytes_flat"],
        "train_inter_node_bytes_hierarchical": head["train_inter_node_bytes_hierarchical"],
        "bound_ok": all(r["bound_ok"] for r in rows),
        "by_limit": rows,
    }, indent=1))


if __name__ == "__main__":
    main()
