"""Each fused CPU kernel (flyer/kernels) against the eager PyTorch code it replaces, same run.

Prints one JSON object: per kernel, the eager and kernel times (ms, median of interleaved rounds)
and ``speedup`` = eager / kernel, on the small preset's shapes (2048 tokens, dim 384, 32 experts
of width 256 with top-4 routing padded to 64 rows, a 512 x 8192 logits chunk, a 2048 x 1152 FP8
activation in 1x128 tiles).

    python bench/cpu_kernels.py [--rounds 7] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from flyer import kernels
from flyer.fp8.quant import dequantize, quantize_tiles
from flyer.model.norm import rms_norm
from flyer.runtime import tune_malloc


def _time(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def cases(ops) -> dict:
    """name: (eager, kernel) callables on the small preset's shapes."""
    g = torch.Generator().manual_seed(0)
    bf = torch.bfloat16
    T, K, D, Fd, n_pad, V = 2048, 4, 384, 256, 9280, 8192
    logits = (3 * torch.randn(512, V, generator=g)).to(bf)
    tgt = torch.randint(0, V, (512,), generator=g)

    def xent_eager():
        logp = torch.log_softmax(logits, -1, dtype=torch.float32)
        lt = logp.gather(1, tgt[:, None])
        return logp.exp_().scatter_(1, tgt[:, None], torch.expm1(lt)).to(bf)

    h13 = torch.randn(n_pad, 2 * Fd, generator=g).to(bf)
    da = torch.randn(n_pad, Fd, generator=g).to(bf)

    def swiglu_bwd_eager():
        h1, h3 = h13[:, :Fd], h13[:, Fd:]
        out = torch.empty_like(h13)
        torch.ops.aten.silu_backward.grad_input(da * h3, h1, grad_input=out[:, :Fd])
        torch.mul(da, F.silu(h1), out=out[:, Fd:])
        return out

    src = torch.full((n_pad,), T)
    src[torch.randperm(n_pad, generator=g)[:T * K]] = torch.arange(T).repeat_interleave(K)
    y = torch.randn(n_pad, D, generator=g).to(bf)
    w = torch.rand(n_pad, generator=g)
    offsets, rows = kernels.token_rows(src, T)
    gT = torch.randn(T, D, generator=g)
    gather, pad_rows = src.clamp(max=T - 1), (src == T).nonzero().squeeze(1)

    def combine_bwd_eager():
        gg = gT.index_select(0, gather)
        d_w = gg.mul(y.float()).sum(1)
        return gg.mul_(w[:, None]).to(bf).index_fill_(0, pad_rows, 0), d_w

    x = torch.randn(T, D, generator=g, requires_grad=True)
    nw = torch.ones(D, requires_grad=True)
    gn = torch.randn(T, D, generator=g)

    def norm_fwd_bwd():
        out = rms_norm(x, nw, 1e-6)
        return torch.autograd.grad(out, (x, nw), gn)

    q = quantize_tiles(torch.randn(T, 1152, generator=g))  # an FP8 activation: 2048 x 1152 in 1x128 tiles

    return {
        "xent_chunk": (xent_eager, lambda: ops.xent_chunk(logits, tgt, True)),
        "swiglu": (lambda: F.silu(h13[:, :Fd]) * h13[:, Fd:], lambda: ops.swiglu(h13)),
        "swiglu_backward": (swiglu_bwd_eager, lambda: ops.swiglu_backward(da, h13)),
        "combine": (lambda: y.new_zeros(T + 1, D, dtype=torch.float32).index_add_(0, src, y.float().mul_(w[:, None])),
                    lambda: ops.combine(y, w, offsets, rows)),
        "combine_backward": (combine_bwd_eager, lambda: ops.combine_backward(gT, y, w, src, True)),
        "segment_sum": (lambda: y.new_zeros(T + 1, D).index_add_(0, src, y), lambda: ops.segment_sum(y, offsets, rows)),
        "rms_norm_fwd_bwd": ("disabled", norm_fwd_bwd),  # the same call with the kernels off and on
        "fp8_dequantize": ("disabled", lambda: dequantize(q.data, q.scale)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    ops = kernels.cpu_ops()
    if ops is None:
        raise SystemExit("bench/cpu_kernels.py: flyer's CPU kernels are not built here (no C++ compiler?)")
    out = {"threads": torch.get_num_threads(), "kernels": {}}
    for name, (eager, fused) in cases(ops).items():
        times = {"eager": [], "kernel": []}
        for _ in range(args.rounds):  # interleaved: drift on a shared host hits both alike
            if eager == "disabled":
                with kernels.disabled():
                    times["eager"].append(_time(fused, args.reps))
            else:
                times["eager"].append(_time(eager, args.reps))
            times["kernel"].append(_time(fused, args.reps))
        e, k = statistics.median(times["eager"]), statistics.median(times["kernel"])
        out["kernels"][name] = {"eager_ms": round(e, 3), "kernel_ms": round(k, 3), "speedup": round(e / k, 2)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
