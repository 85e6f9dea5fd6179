"""Weights held in BF16 for inference, computed in FP32.

A decode step is bound by the bytes of weights it reads (the routed experts, the dense layers and
the head: ``bench/serve.py``'s ``weight_mb_per_token``), and published checkpoints are BF16 (or
FP8) already. ``hold_weights(model, torch.bfloat16)`` stores the GEMM weights of an FP32 model in
BF16: half the memory and half the bytes per step, while the activations, norms, attention and
every sum stay FP32. The kernels widen each weight exactly as they read it
(``kernels.grouped_mm`` / ``kernels.linear_held``), so the result is the FP32 model's on the
BF16-rounded weights up to the order of its sums: lossless for a BF16 checkpoint loaded in FP32.

Left in their dtype: the embedding (a gather reads a few rows, not the matrix), the norms and the
router (small, and the router picks experts), and MLA's ``wkv_b``, which the absorbed attention
splits into its per-head blocks and multiplies in einsums (0.2 MB a layer in the small preset).
"""

from __future__ import annotations

import torch
from torch import nn

from flyer.model.experts import Experts, packed_w13
from flyer.model.lowp import Linear
from flyer.model.transformer import Transformer

WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
KEEP = ("wkv_b",)  # Linear names whose weights stay as they are (see the module docstring)


@torch.no_grad()
def hold_weights(model: Transformer, dtype: torch.dtype) -> int:
    """Store ``model``'s GEMM weights in ``dtype`` in place (inference only: they no longer take
    gradients); the model computes in its own dtype. Returns the bytes it saves (FP32 to BF16: half
    of those weights'). FP32 is a no-op; BF16 needs an FP32 model on the CPU (the kernels' case; or
    on the meta device, to count bytes)."""
    if dtype == torch.float32:
        return 0
    if dtype != torch.bfloat16:
        raise ValueError(f"weights can be held in float32 or bfloat16 (got {dtype})")
    if model.embed.weight.dtype != torch.float32 or model.embed.weight.device.type not in ("cpu", "meta"):
        raise ValueError(f"BF16-held weights need an FP32 model on the CPU (this one is "
                         f"{model.embed.weight.dtype} on {model.embed.weight.device.type})")
    saved = 0
    tied = model.head.weight if model.cfg.tie_embeddings else None
    for name, m in model.named_modules():
        if type(m) is Experts:  # not FP8Experts: FP8 weights are held as FP8
            m.pack_w13_()  # w1|w3 as one tensor: held as one too, so the kernel reads them in one call
            w13 = packed_w13(m.w1, m.w3)
            saved += _hold(m, "w2", dtype)
            half = m.w1.shape[1]
            held = w13.to(dtype)
            saved += w13.numel() * (w13.element_size() - held.element_size())
            m.w1, m.w3 = (nn.Parameter(held[:, :half], requires_grad=False),
                          nn.Parameter(held[:, half:], requires_grad=False))
        elif isinstance(m, Linear) and m.weight is not tied and name.rsplit(".", 1)[-1] not in KEEP:
            saved += _hold(m, "weight", dtype)
    return saved


def _hold(m: nn.Module, attr: str, dtype: torch.dtype) -> int:
    w = getattr(m, attr)
    held = w.detach().to(dtype)
    setattr(m, attr, nn.Parameter(held, requires_grad=False))
    return w.numel() * (w.element_size() - held.element_size())


__all__ = ["WEIGHT_DTYPES", "hold_weights"]
