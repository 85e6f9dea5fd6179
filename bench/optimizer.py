"""Muon (``flyer train --optimizer muon``, DeepSeek-V4's recipe) against AdamW, the peer, on the same
model, data and seed: the loss each reaches after N steps and what Muon's optimizer step costs
(its Newton-Schulz iterations) relative to fused AdamW's.

Per preset (tiny, tiny-v4) two copies of one initialised model train side by side, steps
interleaved so machine load affects both alike, on one stream of batches from a fixed random
first-order Markov source (each token has 4 likely successors: a structure worth learning). Both use
the trainer's optimizer builder (``build_optimizer``) with its betas, weight decay 0.1 and the same
constant learning rate (the paper's point: Muon's update RMS 0.18 reuses AdamW's rate). Reported: the
mean loss of the last 5 steps of each, their ratio (Muon / AdamW: below 1 is Muon ahead), and the
median optimizer-step time of each and their ratio (forward and backward are the same work for both
and are not timed). Prints one JSON object.

    python bench/optimizer.py [--steps 25] [--batch-size 4] [--seq-len 64] [--lr 3e-3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from flyer import kernels
from flyer.config import preset
from flyer.parallel.mesh import LocalMesh
from flyer.train.trainer import TrainConfig, build_model, build_optimizer

PRESETS = ("tiny", "tiny-v4")
VOCAB = 512


def markov_batches(steps: int, batch: int, seq_len: int, seed: int = 0):
    """``steps`` (x, y) batches (batch, seq_len) of a fixed random Markov chain over VOCAB tokens."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, VOCAB, (VOCAB, 4), generator=g)  # each token's 4 likely successors
    out = []
    for _ in range(steps):
        tok = torch.randint(0, VOCAB, (batch,), generator=g)
        seq = [tok]
        for _ in range(seq_len):
            pick = succ[tok, torch.randint(0, 4, (batch,), generator=g)]
            noise = torch.randint(0, VOCAB, (batch,), generator=g)
            tok = torch.where(torch.rand(batch, generator=g) < 0.1, noise, pick)
            seq.append(tok)
        data = torch.stack(seq, 1)
        out.append((data[:, :-1], data[:, 1:]))
    return out


def run(name: str, steps: int, batch: int, seq_len: int, lr: float) -> dict:
    cfg = preset(name, vocab_size=VOCAB, max_seq_len=max(seq_len, 64), original_seq_len=max(seq_len, 64))
    mesh = LocalMesh(torch.device("cpu"))
    runs = {}
    for kind in ("adamw", "muon"):
        model = build_model(cfg, mesh, "fp32", seed=0)
        tc = TrainConfig(lr=lr, optimizer=kind)
        runs[kind] = {"model": model, "opt": build_optimizer(model, tc), "losses": [], "times": []}
    for x, y in markov_batches(steps, batch, seq_len):
        for r in runs.values():
            loss = r["model"].compute_loss(x, y).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(r["model"].parameters(), 1.0)
            t0 = time.perf_counter()
            r["opt"].step()
            r["times"].append(time.perf_counter() - t0)
            r["opt"].zero_grad(set_to_none=True)
            r["losses"].append(loss.item())
    out = {}
    for kind, r in runs.items():
        out[f"{kind}_final_loss"] = statistics.mean(r["losses"][-5:])
        out[f"{kind}_step_ms"] = 1e3 * statistics.median(r["times"][2:])  # the first ones allocate and warm up
    out["loss_ratio_muon_over_adamw"] = out["muon_final_loss"] / out["adamw_final_loss"]
    out["step_time_ratio_muon_over_adamw"] = out["muon_step_ms"] / out["adamw_step_ms"]
    out["first_loss"] = runs["adamw"]["losses"][0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kernels.cpu_ops()  # build or load the fused CPU kernels before timing (a first build takes minutes)
    res = {"steps": args.steps, "batch": [args.batch_size, args.seq_len], "lr": args.lr,
           "threads": torch.get_num_threads()}
    for name in PRESETS:
        res[name] = run(name, args.steps, args.batch_size, args.seq_len, args.lr)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
