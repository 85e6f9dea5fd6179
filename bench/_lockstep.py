"""Training steps of one model in lockstep under several choices of what backward recomputes (one step each in
turn, so machine-load drift hits them alike), BF16 autocast: what each keeps and how long its steps take."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from flyer.parallel.memory import held_bytes

MIB = 2**20


def add_step_args(ap: argparse.ArgumentParser, steps: int) -> None:
    """What every lockstep bench takes: a batch of ``--batch`` x ``--seq`` tokens, ``--steps`` paired steps, torch's
    ``--threads``."""
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--threads", type=int, default=2)


def batch_tokens(args: argparse.Namespace, vocab_size: int) -> torch.Tensor:
    """``add_step_args``' batch of random tokens, with torch on its threads and the model's seed (0) set."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return torch.randint(0, vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))


def compare(model: torch.nn.Module, tokens: torch.Tensor, choices: dict[str, Callable[[], None]], steps: int,
            peer: str) -> dict:
    """``choices``: name -> a call that switches the model to it; ``peer``: the one the others are timed against.
    Returns ``held_mib_<choice>`` (what one training forward keeps alive for backward, ``held_bytes``),
    ``step_time_ratio_<choice>`` (the median of the paired steps' ratios to the peer's) and ``same_gradients``
    (every gradient equal bit for bit across the choices). The last choice stays switched on."""
    def step() -> tuple[float, dict]:
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16):
            loss = model.compute_loss(tokens, tokens).loss
        loss.backward()
        return time.perf_counter() - t0, {n: p.grad for n, p in model.named_parameters()}

    times: dict[str, list[float]] = {c: [] for c in choices}
    grads, out = {}, {}
    for _ in range(steps):
        for c, use in choices.items():
            use()
            t, grads[c] = step()
            times[c].append(t)
    for c, use in choices.items():
        use()
        with torch.autocast("cpu", torch.bfloat16):
            out[f"held_mib_{c}"] = round(held_bytes(lambda: model.compute_loss(tokens, tokens), model) / MIB, 2)
    out["same_gradients"] = all(torch.equal(grads[peer][n], grads[c][n]) for c in choices if c != peer
                                for n in grads[peer] if grads[peer][n] is not None)
    for c in choices:
        if c != peer:
            out[f"step_time_ratio_{c}"] = round(statistics.median(a / b for a, b in zip(times[c], times[peer])), 3)
    return out
