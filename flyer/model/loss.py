"""Fused, chunked output head + cross-entropy: ``mean CE(h W^T, targets)`` without the N x V logits.

The reference is ``F.cross_entropy(F.linear(h, W).float(), targets)`` (the oracle in the tests).
Rows are processed ``chunk_rows`` at a time; because the loss is a scalar, each chunk's gradients
are computed eagerly in forward (softmax minus one-hot), so backward only scales two saved tensors.
This avoids the FP32 copy of the logits, the zero-filled N x V gradient of ``nll_loss`` and the
``log_softmax`` backward pass that the reference pays for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flyer import kernels
from flyer.model import lowp
from flyer.model.lowp import mm

# Rows per chunk, by device: the fastest measured against the unfused loss (CPU: larger chunks
# fault fresh pages per chunk; accelerators: smaller ones leave the device launch-bound).
CPU_CHUNK_ROWS = 512
ACCELERATOR_CHUNK_ROWS = 2048


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Mean cross-entropy of ``h_ND @ weight_VD^T`` against ``targets_N``; see ``linear_cross_entropy``."""

    @staticmethod
    def forward(ctx, h_ND, weight_VD, targets_N, chunk_rows: int, ignore_index: int,
                dtype: torch.dtype, grad_enabled: bool):
        need_h = grad_enabled and ctx.needs_input_grad[0]
        need_w = grad_enabled and ctx.needs_input_grad[1]
        acc_dtype = torch.promote_types(dtype, torch.float32)  # log-sum-exp and sums: at least FP32
        N = h_ND.shape[0]
        valid_N = targets_N != ignore_index
        n_valid = valid_N.sum()  # a tensor: no host sync on accelerators
        safe_N = torch.where(valid_N, targets_N, 0)
        logp_t_N1 = torch.empty((N, 1), dtype=acc_dtype, device=h_ND.device)  # log p(target) per row
        grad_h = torch.empty(h_ND.shape, dtype=h_ND.dtype, device=h_ND.device) if need_h else None
        grad_w = None
        with torch.autocast(h_ND.device.type, enabled=False):
            w = lowp.operand(weight_VD, dtype)  # used by two GEMMs per chunk
            x = h_ND.to(dtype)
            if need_h or need_w:
                # d(mean loss)/dlogits = (softmax - onehot) * scale, scale = 1/n on valid rows and 0
                # on ignored ones (also when all are: zero gradients, as F.cross_entropy). The row
                # scale is applied to the (N, D) sides of the GEMMs, not to the (N, V) dlogits.
                scale_N1 = (valid_N.to(acc_dtype) / n_valid.clamp(min=1).to(acc_dtype))[:, None]
                x_scaled = (h_ND * scale_N1).to(dtype) if need_w else None
            for s in range(0, N, chunk_rows):
                e = min(s + chunk_rows, N)
                logits = mm(x[s:e], w.t())  # (n, V)
                dlogits = kernels.xent_chunk(logits, safe_N[s:e], need_h or need_w, logp_t_N1[s:e])
                del logits
                if dlogits is None:
                    continue
                if need_h:
                    torch.mul(mm(dlogits, w), scale_N1[s:e], out=grad_h[s:e])
                if need_w:
                    # dW accumulates across chunks in the reduction dtype (FP32): summing the chunks'
                    # partials in BF16 would round again at every chunk
                    if grad_w is None:
                        grad_w = mm(dlogits.t(), x_scaled[s:e]).to(acc_dtype)
                    elif dtype == acc_dtype:
                        grad_w.addmm_(dlogits.t(), x_scaled[s:e])
                    else:
                        grad_w += mm(dlogits.t(), x_scaled[s:e])
        if need_w and grad_w is None:  # N == 0
            grad_w = torch.zeros(weight_VD.shape, dtype=acc_dtype, device=weight_VD.device)
        loss_sum = -torch.where(valid_N[:, None], logp_t_N1, 0).sum()
        loss = loss_sum / n_valid.to(acc_dtype)  # nan when every row is ignored, as F.cross_entropy
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight_VD.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        # grad_out is a 0-dim FP32 tensor: the products keep the saved gradients' dtypes
        grad_h = None if grad_h is None else grad_h * grad_out
        grad_w = None if grad_w is None else grad_w * grad_out
        return grad_h, grad_w, None, None, None, None, None


def linear_cross_entropy(h_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                         chunk_rows: int | None = None, ignore_index: int = -100) -> torch.Tensor:
    """``F.cross_entropy(F.linear(h_ND, weight_VD).float(), targets_N, ignore_index=ignore_index)``,
    computed ``chunk_rows`` rows at a time (default: ``CPU_CHUNK_ROWS`` on CPU, else
    ``ACCELERATOR_CHUNK_ROWS``).

    h_ND (N, D) and weight_VD (V, D): any float dtype. The logits GEMMs (forward, dgrad, wgrad) run
    in the autocast dtype when autocast is on for h's device, else in the inputs' dtype; the
    log-sum-exp, the loss and the dW accumulation in at least FP32. targets_N (N,) int64 class ids,
    or ``ignore_index`` for rows that take no part (the mean is over the other rows).

    Returns the mean loss, a 0-dim tensor in FP32 (FP64 for FP64 inputs); nan when every row is
    ignored, with zero gradients. Gradients come back in h's and weight's dtypes. Under
    ``torch.no_grad()`` (or when neither input requires grad) no gradient work is done.
    """
    if h_ND.dim() != 2 or weight_VD.dim() != 2 or h_ND.shape[1] != weight_VD.shape[1]:
        raise ValueError(f"linear_cross_entropy: h (N, D) and weight (V, D) expected, "
                         f"got {tuple(h_ND.shape)} and {tuple(weight_VD.shape)}")
    if targets_N.shape != h_ND.shape[:1]:
        raise ValueError(f"linear_cross_entropy: targets ({h_ND.shape[0]},) expected, got {tuple(targets_N.shape)}")
    if chunk_rows is None:
        chunk_rows = CPU_CHUNK_ROWS if h_ND.device.type == "cpu" else ACCELERATOR_CHUNK_ROWS
    if chunk_rows < 1:
        raise ValueError(f"linear_cross_entropy: chunk_rows must be >= 1, got {chunk_rows}")
    dtype = lowp.gemm_dtype(h_ND, weight_VD)
    return LinearCrossEntropyFunction.apply(h_ND, weight_VD, targets_N, chunk_rows, ignore_index, dtype,
                                            torch.is_grad_enabled())


def reference_cross_entropy(h_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                            ignore_index: int = -100) -> torch.Tensor:
    """The unfused oracle: full logits, FP32 cross-entropy."""
    return F.cross_entropy(F.linear(h_ND, weight_VD).float(), targets_N, ignore_index=ignore_index)
