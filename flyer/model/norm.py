"""RMSNorm with a hand-written backward.

PyTorch's CPU ``rms_norm`` is a composite of about twenty element-wise passes with FP32 upcasts in
forward and backward; ``kernels.rms_norm`` upcasts once, computes in FP32 and rounds once, and its
backward is the closed form. Same values as ``torch.nn.functional.rms_norm`` (FP32 arithmetic, one
rounding to the output dtype).
"""

import torch
import torch.nn.functional as F
from torch import nn

from flyer import kernels


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
        y, r = kernels.rms_norm(x, weight, eps, out_dtype)
        ctx.save_for_backward(x, weight, r)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, weight, r = ctx.saved_tensors
        return (*kernels.rms_norm_backward(g, x, weight, r, *ctx.needs_input_grad[:2]), None, None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """RMS norm over the last dim times ``weight``; output in ``out_dtype`` (default: ``x``'s),
    rounded once from the FP32 result; the gradient comes back in ``x``'s dtype."""
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        # nothing to differentiate (decoding): the Function's own cost is most of a small norm's
        if x.device.type != "cpu" and weight.dtype == x.dtype:
            # a GPU's decode step is launch-bound: torch's fused norm (one kernel, FP32 inside) where the
            # formula's ops launch seven
            y = F.rms_norm(x, weight.shape, weight, eps)
            return y if out_dtype in (None, y.dtype) else y.to(out_dtype)
        return kernels.rms_norm(x, weight, eps, out_dtype or x.dtype)[0]
    return _RMSNormFunction.apply(x, weight, eps, out_dtype or x.dtype)


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (same parameters and state dict) over the last dim, through ``rms_norm``.

    ``autocast_output=True``: under autocast the output is rounded to the autocast dtype here, in
    the same pass, for a norm that only feeds GEMMs (the attention input): autocast would round it
    to the same values, once per consuming GEMM, each a separate pass with its own cast back in
    backward.
    """

    def __init__(self, *args, autocast_output: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.autocast_output = autocast_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or len(self.normalized_shape) != 1:
            return super().forward(x)
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if self.autocast_output and torch.is_autocast_enabled(dev) else None
        return rms_norm(x, self.weight, self.eps if self.eps is not None else torch.finfo(x.dtype).eps, out_dtype)
