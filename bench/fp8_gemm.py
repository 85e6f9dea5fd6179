"""FP8 block-scaled GEMMs and linear layers against bf16, side by side on one device.

For each shape (M tokens, K in, N out; DeepSeek-V3's by default) it times, in the same process:
the bf16 GEMM (the peer), ``fp8_gemm_nt`` on 1x128-tile x 128x128-block scaled E4M3 operands
(with the path it took: one block-scaled ``scaled_mm`` call, or row-wise calls promoted per
128-block), the same including the quantisation of both operands, and a whole FP8 linear layer
forward + backward (fprop, dgrad, wgrad in FP8) against bf16 ``F.linear``. Errors are relative
Frobenius errors against the FP32 product of the unquantised inputs. Prints one JSON object.

    python bench/fp8_gemm.py --device cuda          # V3 shapes
    python bench/fp8_gemm.py --shapes 256x512x384   # CPU emulation: small shapes only
"""

from __future__ import annotations

import argparse
import json

import torch

from flyer.fp8 import FP8Recipe, fp8_gemm_nt, fp8_linear, quantize_blocks, quantize_tiles
from flyer.fp8.gemm import cuda_fp8_supported, cuda_gemm_path
from flyer.model.lowp import linear, mm
from flyer.train.metrics import median_seconds

# (M, K, N): V3's attention output projection, a dense FFN up-projection, a routed expert's
# down-projection (K = moe_inter_dim) and the MLA query up-projection
V3_SHAPES = ((4096, 16384, 7168), (4096, 7168, 18432), (4096, 2048, 7168), (4096, 1536, 24576))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


def measure(M: int, K: int, N: int, device: torch.device, seconds: float) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(M, K, generator=g).to(device)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(device)
    ref = x @ w.t()
    xb, wb = x.bfloat16(), w.bfloat16()
    qx, qw = quantize_tiles(x), quantize_blocks(w)
    flops = 2.0 * M * K * N
    # the bf16 peer as flyer's model runs it (lowp: through the FP32 kernel on a CPU without native
    # BF16 GEMMs, where ATen's own BF16 GEMM is a scalar reference kernel)
    t_bf16 = median_seconds(lambda: mm(xb, wb.t()), device, seconds)
    t_fp8 = median_seconds(lambda: fp8_gemm_nt(qx.data, qx.scale, qw.data, qw.scale, torch.bfloat16), device, seconds)

    def quantised_gemm():
        a, b = quantize_tiles(xb), quantize_blocks(wb)
        return fp8_gemm_nt(a.data, a.scale, b.data, b.scale, torch.bfloat16)

    t_fp8_q = median_seconds(quantised_gemm, device, seconds)
    out_fp8 = fp8_gemm_nt(qx.data, qx.scale, qw.data, qw.scale, torch.bfloat16)
    row = {"M": M, "K": K, "N": N,
           "bf16_tflops": flops / t_bf16 / 1e12, "fp8_tflops": flops / t_fp8 / 1e12,
           "fp8_speedup": t_bf16 / t_fp8, "fp8_with_quant_speedup": t_bf16 / t_fp8_q,
           "bf16_rel_err": rel_err(mm(xb, wb.t()), ref), "fp8_rel_err": rel_err(out_fp8, ref)}
    if device.type == "cuda":
        row["fp8_path"] = cuda_gemm_path(device)

    # a whole linear layer, forward + backward: 3 GEMMs each side
    xr = xb.clone().requires_grad_()
    wr = wb.clone().requires_grad_()
    dy = torch.randn(M, N, generator=g).to(device).bfloat16()
    recipe = FP8Recipe()

    def layer(fn):
        def run():
            xr.grad = wr.grad = None
            fn(xr, wr).backward(dy)
        return run

    t_lin_bf16 = median_seconds(layer(linear), device, seconds)
    t_lin_fp8 = median_seconds(layer(lambda a, b: fp8_linear(a, b, recipe=recipe)), device, seconds)
    row.update(linear_fwd_bwd_bf16_tflops=3 * flops / t_lin_bf16 / 1e12,
               linear_fwd_bwd_fp8_tflops=3 * flops / t_lin_fp8 / 1e12,
               linear_fwd_bwd_fp8_speedup=t_lin_bf16 / t_lin_fp8)
    return row


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        M, K, N = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be MxKxN, e.g. 4096x7168x2048 (got {text!r})") from None
    return M, K, N


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", nargs="+", type=parse_shape, default=None,
                    help="MxKxN shapes (default: V3's on CUDA, one small shape on CPU)")
    ap.add_argument("--seconds", type=float, default=0.5, help="timing window per measurement")
    args = ap.parse_args()
    device = torch.device(args.device)
    shapes = args.shapes or (V3_SHAPES if device.type == "cuda" else ((512, 1024, 768),))
    rows = [measure(M, K, N, device, args.seconds) for M, K, N in shapes]
    print(json.dumps({
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "fp8_backend": "cuda" if device.type == "cuda" and cuda_fp8_supported(device) else "emulate",
        "shapes": rows,
    }))


if __name__ == "__main__":
    main()
