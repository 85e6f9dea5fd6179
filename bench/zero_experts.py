"""LongCat-Flash's zero-computation (identity) experts: a MoE layer skipping the identity picks (flyer's path: they
get no FFN row) against moving each to a routed expert with weight 0 (transformers' way, flyer's before), timed in
one run: forward + backward and the no-grad forward, the ratio moved / skipped of each (> 1: skipping is faster).
A LongCat-shaped layer at small dims: E routed + Z zero experts, K picks, no shared expert, the router's softmax
over all E + Z columns (about Z / (E + Z) of the picks identities with random weights; the JSON says how many).

    python bench/zero_experts.py [--tokens 4096] [--dim 256] [--inter 256] [--experts 32] [--zero 16] [--k 6]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from flyer.config import preset
from flyer.model.moe import MoE


def moved_picks(moe: MoE) -> MoE:
    """The peer: a copy of ``moe`` whose experts get each identity pick moved to routed expert (id - E) E / Z with
    weight 0, so every token still sends K rows through them (the identity sum and statistics as ``moe``'s)."""
    peer = copy.deepcopy(moe)
    E, Z = moe.cfg.n_routed_experts, moe.cfg.n_zero_experts
    routed_local = peer.experts.routed_local

    def moved(x_TD, weights_TK, topk_ids_TK, counts_E):
        identity = topk_ids_TK >= E
        ids = torch.where(identity, (topk_ids_TK - E) * E // Z, topk_ids_TK)
        counts = torch.bincount(ids.flatten(), minlength=E)
        return routed_local(x_TD, weights_TK.masked_fill(identity, 0.0), ids, counts)

    peer.experts.routed_local = moved
    return peer


def _time_pair(fns: dict, steps: int) -> dict[str, float]:
    """Median seconds of each of ``fns``, run in turn each step (both see the same machine load)."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--inter", type=int, default=256)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--zero", type=int, default=16)
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = preset("tiny", dim=args.dim, moe_inter_dim=args.inter, n_routed_experts=args.experts,
                 n_zero_experts=args.zero, n_activated_experts=args.k, n_expert_groups=1, n_limited_groups=1,
                 n_shared_experts=0, score_func="softmax", norm_topk_prob=False, seq_aux_alpha=0.0)
    torch.manual_seed(0)
    moe = MoE(cfg).train()
    x = torch.randn(1, args.tokens, args.dim, requires_grad=True)
    g = torch.randn(1, args.tokens, args.dim)
    with torch.no_grad():
        ids = moe.gate(x[0])[1]
    out = {"tokens": args.tokens, "dim": args.dim, "inter": args.inter, "experts": args.experts, "zero": args.zero,
           "k": args.k, "path": moe.path, "threads": torch.get_num_threads(),
           "identity_pick_share": round(float((ids >= args.experts).float().mean()), 4)}
    peer = moved_picks(moe)
    assert peer.path == moe.path == "fused_local"
    with torch.no_grad():  # the same sums but for GEMM shapes (tests/test_zero_experts.py: bitwise where they agree)
        y, y_peer = moe(x), peer(x)
    out["max_rel_diff"] = float((y - y_peer).abs().max() / y_peer.abs().max())

    def train_step(m):
        m.zero_grad(set_to_none=True)
        (m(x) * g).sum().backward()

    def no_grad(m):
        with torch.no_grad():
            m(x)

    for kind, step in (("fwd_bwd", train_step), ("no_grad", no_grad)):
        peers = {"skipped": lambda step=step: step(moe), "moved": lambda step=step: step(peer)}
        for name, s in _time_pair(peers, args.steps).items():
            out[f"{name}_{kind}_s"] = round(s, 5)
    out["fwd_bwd_speedup"] = round(out["moved_fwd_bwd_s"] / out["skipped_fwd_bwd_s"], 3)
    out["no_grad_speedup"] = round(out["moved_no_grad_s"] / out["skipped_no_grad_s"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
