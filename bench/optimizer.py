"""Muon (``flyer train --optimizer muon``, DeepSeek-V4's recipe) against AdamW, the peer, on the same
model, data and seed: how fast each approaches the source's loss floor, and what Muon's optimizer step
costs (its Newton-Schulz iterations) relative to fused AdamW's.

Per preset (tiny, tiny-v4) two copies of one initialised model train side by side, steps
interleaved so machine load affects both alike, on one stream of fresh batches (no batch repeats:
the training loss is a held-out loss) from a fixed random first-order Markov source over VOCAB
tokens: each token is followed by one of its 4 drawn successors (uniformly; a successor drawn twice
counts twice) with probability 0.9, by a uniform token with probability 0.1. Both optimizers come from
the trainer's builder (``build_optimizer``, its betas, weight decay 0.1) with the same constant
learning rate (the paper's point: Muon's update RMS 0.18 reuses AdamW's rate); both train on the
trainer's loss (next-token + 0.3 MTP + balance), and the next-token loss is reported.

The floor: the source is first-order Markov and each sequence starts from a uniform token, so the
best next-token loss at position t is the conditional entropy H(X_{t+1} | X_t) = sum_i p_t(i) H(P_i)
(P the transition matrix, p_0 uniform, p_t = p_0 P^t), exact from P; ``loss_floor`` is its mean over
the sequence's positions (``entropy_rate``, the stationary chain's, beside it). Reported per
optimizer: the next-token loss at a few steps (each the mean of the 5 steps ending there), the
first step at which that 5-step mean reaches floor + 1 nat (null: not within the run), and the
median optimizer-step time (forward and backward are the same work for both and are not timed), with
the ratios Muon / AdamW. Prints one JSON object.

    python bench/optimizer.py [--steps 200] [--batch-size 4] [--seq-len 64] [--lr 3e-3] [--threads N]
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
from flyer.train.config import TrainConfig
from flyer.train.build import build_model, build_optimizer

PRESETS = ("tiny", "tiny-v4")
VOCAB = 512
SUCCESSORS, NOISE = 4, 0.1  # each token's drawn successors; the probability of a uniform token instead
WINDOW = 5  # steps averaged into each reported loss
CHECKPOINTS = (25, 50, 100)  # and the last step
MARGIN = 1.0  # "reached": the WINDOW-step mean next-token loss within this many nats of the floor


def markov_source(seed: int = 0) -> tuple[torch.Tensor, torch.Generator]:
    """The source's successor table (VOCAB, SUCCESSORS) and the generator that then draws its batches."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (VOCAB, SUCCESSORS), generator=g), g


def transition_matrix(succ: torch.Tensor) -> torch.Tensor:
    """P (VOCAB, VOCAB), FP64: P[i, j] = (1 - NOISE) (times j is among i's successors) / SUCCESSORS + NOISE / VOCAB."""
    P = torch.full((VOCAB, VOCAB), NOISE / VOCAB, dtype=torch.float64)
    P.scatter_add_(1, succ, torch.full(succ.shape, (1 - NOISE) / SUCCESSORS, dtype=torch.float64))
    return P


def loss_floor(succ: torch.Tensor, seq_len: int) -> dict[str, float]:
    """The best expected next-token loss (nats) on this source's sequences of ``seq_len`` targets
    (``loss_floor``: the positions' mean of H(X_{t+1} | X_t), X_0 uniform), and the stationary
    chain's entropy rate (``entropy_rate``)."""
    P = transition_matrix(succ)
    row_entropy = -(P * P.log()).sum(1)  # H(P_i): every entry is > 0 (the noise)
    p = torch.full((VOCAB,), 1.0 / VOCAB, dtype=torch.float64)
    per_position = []
    for _ in range(seq_len):
        per_position.append(float(p @ row_entropy))
        p = p @ P
    evals, evecs = torch.linalg.eig(P.T)  # the stationary distribution: P^T's eigenvector of eigenvalue 1
    pi = evecs[:, evals.real.argmax()].real
    pi = pi / pi.sum()
    return {"loss_floor": statistics.mean(per_position), "entropy_rate": float(pi @ row_entropy)}


def markov_batches(succ: torch.Tensor, g: torch.Generator, steps: int, batch: int, seq_len: int):
    """``steps`` (x, y) batches (batch, seq_len) drawn from the source (y: x shifted by one)."""
    out = []
    for _ in range(steps):
        tok = torch.randint(0, VOCAB, (batch,), generator=g)
        seq = [tok]
        for _ in range(seq_len):
            pick = succ[tok, torch.randint(0, SUCCESSORS, (batch,), generator=g)]
            noise = torch.randint(0, VOCAB, (batch,), generator=g)
            tok = torch.where(torch.rand(batch, generator=g) < NOISE, noise, pick)
            seq.append(tok)
        data = torch.stack(seq, 1)
        out.append((data[:, :-1], data[:, 1:]))
    return out


def summarize(losses: list[float], floor: float) -> dict:
    """The WINDOW-step mean loss at each checkpoint and the last step, and the first step whose
    WINDOW-step mean is within MARGIN of ``floor`` (None: never)."""
    means = [statistics.mean(losses[max(0, i + 1 - WINDOW):i + 1]) for i in range(len(losses))]
    at = {str(s): means[s - 1] for s in (*CHECKPOINTS, len(losses)) if s <= len(losses)}
    reached = next((i + 1 for i, m in enumerate(means) if i + 1 >= WINDOW and m <= floor + MARGIN), None)
    return {"loss_at": at, "steps_to_floor_plus_margin": reached}


def run(name: str, steps: int, batch: int, seq_len: int, lr: float) -> dict:
    cfg = preset(name, vocab_size=VOCAB, max_seq_len=max(seq_len, 64), original_seq_len=max(seq_len, 64))
    mesh = LocalMesh(torch.device("cpu"))
    succ, g = markov_source()
    floor = loss_floor(succ, seq_len)
    runs = {}
    for kind in ("adamw", "muon"):
        model = build_model(cfg, mesh, "fp32", seed=0)
        tc = TrainConfig(lr=lr, optimizer=kind)
        runs[kind] = {"model": model, "opt": build_optimizer(model, tc), "losses": [], "times": []}
    t_run = time.perf_counter()
    for x, y in markov_batches(succ, g, steps, batch, seq_len):
        for r in runs.values():
            out = r["model"].compute_loss(x, y)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(r["model"].parameters(), 1.0)
            t0 = time.perf_counter()
            r["opt"].step()
            r["times"].append(time.perf_counter() - t0)
            r["opt"].zero_grad(set_to_none=True)
            r["losses"].append(out.main_loss.item())
    res: dict = {**floor, "first_loss": runs["adamw"]["losses"][0], "seconds": time.perf_counter() - t_run}
    for kind, r in runs.items():
        res[kind] = summarize(r["losses"], floor["loss_floor"])
        res[kind]["step_ms"] = 1e3 * statistics.median(r["times"][2:])  # the first ones allocate and warm up
        res[kind]["first_steps_ms"] = [round(1e3 * t, 1) for t in r["times"][:2]]
    last = str(steps)
    res["final_loss_ratio_muon_over_adamw"] = res["muon"]["loss_at"][last] / res["adamw"]["loss_at"][last]
    res["step_time_ratio_muon_over_adamw"] = res["muon"]["step_ms"] / res["adamw"]["step_ms"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kernels.cpu_ops()  # build or load the fused CPU kernels before timing (a first build takes minutes)
    res = {"steps": args.steps, "batch": [args.batch_size, args.seq_len], "lr": args.lr,
           "threads": torch.get_num_threads(), "margin_nats": MARGIN}
    for name in PRESETS:
        res[name] = run(name, args.steps, args.batch_size, args.seq_len, args.lr)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
