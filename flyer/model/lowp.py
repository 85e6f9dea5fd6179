"""BF16/FP16 GEMMs on CPUs that have no native kernels for them.

ATen sends a CPU BF16/FP16 GEMM to oneDNN where the CPU has kernels for it (x86 with AVX-512 or
AMX, Arm with BF16 instructions). Elsewhere, an AVX2-only x86 CPU for one, it runs a scalar
reference kernel: 1.9 GFLOP/s in BF16 against 100 GFLOP/s in FP32 on 2 cores of an AMD EPYC
(Zen 3), so a BF16 (or FP8-recipe) training step spends nearly all its time there.

On such a CPU flyer runs the same GEMMs through the FP32 kernel: the inputs rounded to the low
precision dtype, widened (exactly) to FP32, multiplied and summed in FP32, and the result rounded to
the low precision dtype. A native BF16 GEMM computes the same thing (it accumulates in FP32 too), up
to the order of the sum. Every GEMM in flyer's model goes through ``linear``, ``mm`` or
``scaled_dot_product_attention`` here; on any other device or dtype they are the torch calls.

``emulation(True)`` forces this path (the tests run it on every machine), ``emulation(False)``
turns it off, ``FLYER_LOWP_EMULATION=0/1`` does the same for a process.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from flyer.runtime import native_gemm

LOWP = (torch.bfloat16, torch.float16)
_forced: bool | None = None


@contextlib.contextmanager
def emulation(enabled: bool | None):
    """True: emulate every CPU BF16/FP16 GEMM through FP32; False: never; None: where not native."""
    global _forced
    before, _forced = _forced, enabled
    try:
        yield
    finally:
        _forced = before


@functools.cache
def _native(dtype: torch.dtype, mkldnn_enabled: bool) -> bool:
    return native_gemm("cpu", dtype)


def emulated(device_type: str, dtype: torch.dtype) -> bool:
    """Whether a ``dtype`` GEMM on ``device_type`` runs through FP32 here."""
    if device_type != "cpu" or dtype not in LOWP:
        return False
    forced = _forced
    if forced is None:
        env = os.environ.get("FLYER_LOWP_EMULATION")
        forced = None if env is None else env != "0"
    if forced is not None:
        return forced
    return not _native(dtype, torch.backends.mkldnn.enabled)


def gemm_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype a GEMM on ``tensors`` runs in: autocast's when it is on for their device (autocast
    leaves FP64 alone), else their promoted dtype."""
    dev = tensors[0].device.type
    if torch.is_autocast_enabled(dev) and all(t.dtype != torch.float64 for t in tensors):
        return torch.get_autocast_dtype(dev)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def mm(a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.mm(a, b, out=out)`` on operands in one dtype, ``b`` possibly from ``operand``
    (not differentiable: for the hand-written forwards and backwards)."""
    if not emulated(a.device.type, a.dtype):
        return torch.mm(a, b, out=out)
    with torch.autocast("cpu", enabled=False):  # in an autograd.Function's forward it would cast back
        r = torch.mm(a.float(), b.float())
    return r.to(a.dtype) if out is None else out.copy_(r)


def operand(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` rounded to ``dtype`` as an operand of ``mm``; where emulated also widened to FP32 here,
    once, so that several GEMMs on it (a weight used per chunk or per expert) do not widen it again.
    ``mm`` takes its dtype from its first operand, which stays in ``dtype``."""
    t = t.to(dtype)
    return t.float() if emulated(t.device.type, dtype) else t


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` as autocast would compute it (differentiable); emulated where it applies.

    The gradients round as the native GEMMs' do: dx and dW come out of their GEMMs in the compute
    dtype, then go back to x's and the weight's dtypes."""
    dtype = gemm_dtype(x)
    if not emulated(x.device.type, dtype):
        return F.linear(x, weight, bias)
    with torch.autocast(x.device.type, enabled=False):
        b = None if bias is None else bias.to(dtype).float()
        return F.linear(x.to(dtype).float(), weight.to(dtype).float(), b).to(dtype)


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention``; where emulated, computed in FP32 on the rounded inputs and
    rounded back (the fused kernel's own intermediate roundings are not reproduced)."""
    dtype = gemm_dtype(q)
    if not emulated(q.device.type, dtype):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = (t.to(dtype).float() for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, **kwargs).to(dtype)


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is ``linear`` above (same parameters, state-dict keys and init)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
