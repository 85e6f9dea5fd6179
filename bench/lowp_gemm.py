"""BF16 GEMMs as flyer runs them (``flyer.model.lowp``) against ATen's BF16 and FP32 GEMMs, same run.

On a CPU without BF16 hardware (AVX2, or AVX-512 without BF16: ``bf16_gemm`` "reference" or
"widened") flyer widens the BF16 operands to FP32, runs the FP32 kernel and rounds the result to
BF16; with BF16 hardware ``lowp.mm`` is ATen's BF16 GEMM itself. For the
small preset's GEMM shapes (an expert's up-projection, a dense FFN layer, a logits chunk) this
prints one JSON object: per shape the median time (ms) of ATen's BF16 GEMM, flyer's BF16 GEMM and
ATen's FP32 GEMM, interleaved, and ``speedup_vs_aten_bf16`` = ATen BF16 / flyer BF16.

    python bench/lowp_gemm.py [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from flyer.model import lowp
from flyer.runtime import bf16_gemm_kind
from flyer.train.metrics import median_seconds

SHAPES = {  # name: (M, K, N)
    "expert_up (320x384x512)": (320, 384, 512),
    "dense_ffn (2048x384x1152)": (2048, 384, 1152),
    "logits_chunk (512x384x8192)": (512, 384, 8192),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    out = {"bf16_gemm": bf16_gemm_kind("cpu"), "emulated": lowp.emulated("cpu", torch.bfloat16),
           "threads": torch.get_num_threads(), "shapes": {}}
    for name, (M, K, N) in SHAPES.items():
        a32, b32 = torch.randn(M, K, generator=g), torch.randn(K, N, generator=g)
        a, b = a32.bfloat16(), b32.bfloat16()
        runs = {"aten_bf16": lambda: torch.mm(a, b), "flyer_bf16": lambda: lowp.mm(a, b),
                "aten_fp32": lambda: torch.mm(a32, b32)}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.rounds):  # interleaved: machine load hits all three alike
            for k, fn in runs.items():
                times[k].append(median_seconds(fn) * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        exact = a.double() @ b.double()
        err = {k: ((runs[k]().double() - exact).norm() / exact.norm()).item() for k in ("aten_bf16", "flyer_bf16")}
        out["shapes"][name] = {**{f"{k}_ms": round(v, 3) for k, v in med.items()},
                               "flyer_bf16_gflop_s": round(2 * M * K * N / med["flyer_bf16"] / 1e6, 1),
                               "speedup_vs_aten_bf16": round(med["aten_bf16"] / med["flyer_bf16"], 2),
                               "rel_error_aten_bf16": err["aten_bf16"], "rel_error_flyer_bf16": err["flyer_bf16"]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
