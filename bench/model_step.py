"""Forward+backward step of a preset (default: small) in bf16 on this machine.

Prints one JSON object: tokens/s, achieved model FLOP/s, the FLOP/s of a bf16 GEMM of similar size
measured in the same run (the peer), their ratio ``mfu_vs_bf16_gemm``, and the share of step time
spent in GEMM kernels (torch.profiler).

    python bench/model_step.py [--preset small] [--batch-size 8] [--seq-len 256] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from flyer.config import preset
from flyer.model.transformer import Transformer
from flyer.train.metrics import measure_gemm_peak, model_flops_per_token

GEMM_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::_grouped_mm", "aten::baddbmm",
            "aten::_scaled_mm", "aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::_weight_int8pack_mm")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = preset(args.preset)
    model = Transformer(cfg)
    B, T = args.batch_size, args.seq_len
    x = torch.randint(0, cfg.vocab_size, (B, T + 1))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.compute_loss(x[:, :-1], x[:, 1:])
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    dt = sorted(times)[len(times) // 2]
    tokens_per_s = B * T / dt
    flops = model_flops_per_token(cfg, T) * tokens_per_s
    # the peer: the model's dense-FFN-shaped GEMM (tokens x dim x inter_dim) in bf16, same process
    peer = measure_gemm_peak(torch.bfloat16, shape=(B * T, cfg.dim, max(cfg.inter_dim, cfg.dim)), seconds=1.0)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev)
    gemm = sum(e.self_cpu_time_total for e in ev if e.key in GEMM_OPS)
    top = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:6]
    print(json.dumps({
        "preset": args.preset, "batch_size": B, "seq_len": T, "threads": torch.get_num_threads(),
        "step_time_s": dt, "tokens_per_s": tokens_per_s,
        "model_flops_per_token": model_flops_per_token(cfg, T), "achieved_flops_per_s": flops,
        "bf16_gemm_flops_per_s": peer, "mfu_vs_bf16_gemm": flops / peer,
        "gemm_time_fraction": gemm / total if total else 0.0,
        "top_ops": {e.key: round(e.self_cpu_time_total / total, 3) for e in top},
    }))


if __name__ == "__main__":
    main()
