"""RMSNorm with a hand-written backward.

PyTorch's CPU ``rms_norm`` is a composite of about twenty element-wise passes with FP32 upcasts
in forward and backward: on a (2048, 384) bf16 activation it cost as much as a 2048x384x1152
GEMM. ``rms_norm`` here upcasts once, computes in FP32 with in-place ops and rounds once, and its
backward is the closed form (xhat = x * r, g' = g * w):

    dx = r * (g' - xhat * mean(g' * xhat)),    dw = sum over rows of g * xhat.

Same values as ``torch.nn.functional.rms_norm`` (FP32 arithmetic, one rounding to the input dtype).
On the CPU both passes run as fused kernels (``flyer.kernels``: one read and one write per row);
the eager code below is their fallback and oracle.
"""

import torch
from torch import nn

from flyer import kernels


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # FP32, or FP64 for FP64 inputs


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
        ctx.fused = kernels.usable(x, weight) and out_dtype in kernels.KERNEL_DTYPES
        if ctx.fused:  # one pass in, one out (flyer.kernels); FP32 arithmetic as below
            x2 = x.reshape(-1, x.shape[-1]).contiguous()
            y, r = kernels.cpu_ops().rms_norm(x2, weight, eps, out_dtype)
            ctx.save_for_backward(x2, weight, r)
            ctx.x_shape = x.shape
            return y.view(x.shape)
        xf = x.to(_acc_dtype(x))  # one vectorised upcast (mixed-dtype ops take a slow CPU path); none for FP32
        norm = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)
        r = torch.rsqrt(norm.square_().div_(x.shape[-1]).add_(eps))  # (..., 1)
        y = (xf * r if xf is x else xf.mul_(r)).mul_(weight.to(xf.dtype))  # never written: the caller's x
        ctx.save_for_backward(x, weight, r)
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, weight, r = ctx.saved_tensors
        if ctx.fused and kernels.usable(g):
            dx, dw = kernels.cpu_ops().rms_norm_backward(g.reshape(x.shape).contiguous(), x, weight, r,
                                                         ctx.needs_input_grad[0], ctx.needs_input_grad[1])
            return (None if dx is None else dx.view(ctx.x_shape),
                    None if dw is None else dw.to(weight.dtype), None, None)
        if ctx.fused:  # a gradient the kernels cannot take: the eager formulas on the saved rows
            x, r = x.view(ctx.x_shape), r.view(*ctx.x_shape[:-1], 1)
        xhat = x * r if x.dtype == r.dtype else x.to(r.dtype).mul_(r)
        gf = g.to(r.dtype)
        gw = gf * weight.to(r.dtype)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            c = torch.linalg.vecdot(gw, xhat).unsqueeze(-1).div_(x.shape[-1])
            dx = torch.addcmul(gw, xhat, c, value=-1).mul_(r).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = xhat.mul_(gf).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return dx, dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """RMS norm over the last dim times ``weight``; output in ``out_dtype`` (default: ``x``'s),
    rounded once from the FP32 result; the gradient comes back in ``x``'s dtype."""
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
