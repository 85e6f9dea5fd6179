"""Forward+backward step of a preset (default: small) on this machine, in bf16 by default.

Prints one JSON object: tokens/s, achieved model FLOP/s, and MFU against the fastest GEMM this
machine offers at the step's precision, measured in the same run (the peer; ``peer_gemm`` names
it): on a CPU a BF16 GEMM can run on oneDNN's kernels or through the FP32 kernel on BF16-rounded
operands (``flyer.model.lowp``), and which is faster depends on the CPU (``bf16_gemm``: "hardware"
with AVX512-BF16/AMX, "widened" on AVX-512 without BF16, "reference" on AVX2). ``mfu_vs_bf16_gemm``
is always against the fastest BF16 GEMM. Also the share of step time spent in GEMM kernels
(torch.profiler; on CUDA the share of GPU kernel time in GEMM and fused-attention kernels).

    python bench/model_step.py [--preset small] [--batch-size 8] [--seq-len 256] [--steps 5] [--device cuda]
                               [--precision bf16|fp32|auto]

``--precision auto`` takes bf16 where the device multiplies BF16 in hardware and fp32 elsewhere,
as ``flyer train`` does.
"""

from __future__ import annotations

import argparse
import json
import re
import time

import torch

from flyer.config import preset
from flyer.model.transformer import Transformer
from flyer.runtime import autocast, bf16_gemm_kind, resolve_precision, tune_malloc
from flyer.train.metrics import fastest_gemm, model_flops_per_token

GEMM_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_", "aten::_grouped_mm", "aten::baddbmm",
            "aten::_scaled_mm", "aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::_weight_int8pack_mm")
GEMM_KERNELS = re.compile(r"gemm|nvjet|xmma|cutlass|wgmma|flash|fmha|cublas", re.IGNORECASE)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--profile-steps", type=int, default=3, help="steps the GEMM share is taken over")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32", "auto"))
    args = ap.parse_args()
    tune_malloc()  # as flyer's CLI and Trainer do
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    precision = resolve_precision(args.precision, device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = preset(args.preset)
    model = Transformer(cfg).to(device)
    B, T = args.batch_size, args.seq_len
    x = torch.randint(0, cfg.vocab_size, (B, T + 1), device=device)

    def step():
        with autocast(precision, device):
            out = model.compute_loss(x[:, :-1], x[:, 1:])
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    step()
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    dt = sorted(times)[len(times) // 2]
    tokens_per_s = B * T / dt
    flops = model_flops_per_token(cfg, T) * tokens_per_s
    # the peer: the model's dense-FFN-shaped GEMM (tokens x dim x inter_dim), same process, the
    # fastest way this machine runs it in the step's precision
    shape = (B * T, cfg.dim, max(cfg.inter_dim, cfg.dim))
    bf16_peer, bf16_name = fastest_gemm(torch.bfloat16, device, shape=shape, seconds=1.0)
    peer, peer_name = ((bf16_peer, bf16_name) if dtype == torch.bfloat16
                       else fastest_gemm(dtype, device, shape=shape, seconds=1.0))

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(args.profile_steps):
            step()
        sync()
    if cuda:  # GPU kernels only
        ev = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        cost = {e.key: e.self_device_time_total for e in ev}
        gemm = sum(v for k, v in cost.items() if GEMM_KERNELS.search(k))
    else:
        cost = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
        gemm = sum(v for k, v in cost.items() if k in GEMM_OPS)
    total = sum(cost.values())
    top = sorted(cost, key=lambda k: -cost[k])[:6]
    print(json.dumps({
        "preset": args.preset, "device": str(device), "precision": precision,
        "bf16_gemm": bf16_gemm_kind(device), "batch_size": B, "seq_len": T,
        "threads": torch.get_num_threads(),
        "step_time_s": dt, "tokens_per_s": tokens_per_s,
        "model_flops_per_token": model_flops_per_token(cfg, T), "achieved_flops_per_s": flops,
        "peer_gemm": peer_name, "peer_gemm_flops_per_s": peer, "mfu_vs_peer_gemm": flops / peer,
        "bf16_peer_gemm": bf16_name, "bf16_gemm_flops_per_s": bf16_peer, "mfu_vs_bf16_gemm": flops / bf16_peer,
        "gemm_time_fraction": gemm / total if total else 0.0,
        "top_ops": {k[:80]: round(cost[k] / total, 3) for k in top},
    }))


if __name__ == "__main__":
    main()
