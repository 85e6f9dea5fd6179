"""Sliding-window attention at long sequences: flyer's ``windowed_attention`` (queries in chunks of
``WINDOW_CHUNK`` against their own window, ``flyer.model.attention``) against its peer, SDPA over the whole
sequence with a (T, T) additive band mask (what transformers' SDPA path runs with a sliding window's mask), and
against full causal attention (the cost of no window).

One layer's attention core of ``--heads`` heads of ``--head-dim`` channels, batch 1, ``--window`` keys, at each
``--seq-lens``, FP32 or ``--dtype bf16``. Per length: the outputs' largest difference from the peer, forward +
backward medians (interleaved rounds) and their ratios (peer / flyer, causal / flyer), and the bytes autograd saves
for backward (distinct storages). One JSON line each.

    python bench/window_attention.py [--seq-lens 2048 4096 8192] [--window 512] [--steps 5] [--threads N]
    python bench/window_attention.py --device cuda --dtype bf16 --seq-lens 8192 32768 --window 4096
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from flyer.model.attention import WINDOW_CHUNK, causal_attention, windowed_attention
from flyer.parallel.memory import saved_bytes
from flyer.runtime import tune_malloc


def band(T: int, window: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """(1, 1, T, T) additive: key s visible to query t iff t - window < s <= t."""
    t = torch.arange(T, device=device)
    seen = (t.view(1, -1) <= t.view(-1, 1)) & (t.view(1, -1) > t.view(-1, 1) - window)
    return torch.where(seen, 0.0, float("-inf")).to(dtype).view(1, 1, T, T)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    scale = args.head_dim ** -0.5
    for T in args.seq_lens:
        g = torch.Generator().manual_seed(T)
        q, k, v = (torch.randn(1, T, args.heads, args.head_dim, generator=g).to(args.device, dtype).requires_grad_()
                   for _ in range(3))
        mask = band(T, args.window, dtype, args.device)
        calls = {"flyer": lambda: windowed_attention(q, k, v, scale, args.window),
                 "peer": lambda: causal_attention(q, k, v, scale, mask),
                 "causal": lambda: causal_attention(q, k, v, scale)}
        with torch.no_grad():
            diff = float((calls["flyer"]() - calls["peer"]()).abs().max())
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.steps + 1):  # the first round warms up
            for name, call in calls.items():
                sync()
                t0 = time.perf_counter()
                call().float().square().sum().backward()
                sync()
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(ts[1:]) for name, ts in times.items()}
        saved = {name: saved_bytes(call) for name, call in calls.items()}
        print(json.dumps({
            "seq_len": T, "window": args.window, "chunk": WINDOW_CHUNK, "heads": args.heads,
            "head_dim": args.head_dim, "dtype": args.dtype, "device": args.device, "threads": torch.get_num_threads(),
            "max_abs_diff_vs_peer": diff,
            **{f"{name}_fwd_bwd_ms": round(1e3 * t, 2) for name, t in med.items()},
            "peer_over_flyer": round(med["peer"] / med["flyer"], 2),
            "causal_over_flyer": round(med["causal"] / med["flyer"], 2),
            **{f"{name}_saved_bytes": b for name, b in saved.items()},
        }), flush=True)


if __name__ == "__main__":
    main()
