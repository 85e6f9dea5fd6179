"""BF16/FP16 GEMMs through the FP32 kernel on CPUs without BF16 hardware.

Where a CPU has no BF16 dot-product instructions (``runtime.bf16_gemm_kind``), ATen's BF16 GEMMs
are slow: oneDNN widens them to FP32 inside (AVX-512 without BF16), or ATen runs a scalar
reference kernel (AVX2 only). There flyer runs the same GEMMs through the FP32 kernel: the inputs
rounded to the low-precision dtype, widened (exactly) to FP32, multiplied and summed in FP32, and
the result rounded to the low-precision dtype. A native BF16 GEMM computes the same thing (it
accumulates in FP32 too), up to the order of the sum. Every GEMM in flyer's model goes through
``linear``, ``mm``, ``matmul``, ``einsum``, ``grouped_linear`` or ``scaled_dot_product_attention`` here, or runs in FP32
with autocast off; on any other device or dtype they are the torch calls.

``emulation(True)`` forces this path, ``emulation(False)`` turns it off (tests run both on every
machine); ``FLYER_LOWP_EMULATION=0/1`` does the same for a process.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from flyer import kernels
from flyer.runtime import CPU_KINDS, bf16_gemm_kind, cpu_kind, native_gemm

LOWP = (torch.bfloat16, torch.float16)
_forced: contextvars.ContextVar[bool | None] = contextvars.ContextVar("flyer_lowp_emulation", default=None)


@contextlib.contextmanager
def emulation(enabled: bool | None):
    """True: emulate every CPU BF16/FP16 GEMM through FP32; False: never; None: where not in hardware."""
    token = _forced.set(enabled)
    try:
        yield
    finally:
        _forced.reset(token)


def emulated(device_type: str, dtype: torch.dtype) -> bool:
    """Whether a ``dtype`` GEMM on ``device_type`` runs through FP32 here: forced by ``emulation``
    or the environment, else on a CPU without BF16 hardware (FP16: without oneDNN FP16 kernels)."""
    if device_type != "cpu" or dtype not in LOWP:
        return False
    forced = _forced.get()
    if forced is None:
        env = os.environ.get("FLYER_LOWP_EMULATION")
        forced = None if env is None else env != "0"
    if forced is not None:
        return forced
    return _emulated_by_default(dtype, cpu_kind(), torch.backends.mkldnn.enabled)


@functools.cache
def _emulated_by_default(dtype: torch.dtype, kind: str, mkldnn_enabled: bool) -> bool:
    """Per GEMM call otherwise: the hardware answer depends only on these."""
    if dtype == torch.bfloat16:
        return CPU_KINDS[kind] != "hardware"
    return not native_gemm("cpu", dtype)


def precision_note(precision: str, device: str | torch.device) -> str | None:
    """A one-line note when ``precision`` asks ``device`` for BF16 GEMMs it has no BF16 hardware for."""
    device = torch.device(device)
    kind = bf16_gemm_kind(device)
    if precision not in ("bf16", "fp8") or kind == "hardware":
        return None
    if device.type != "cpu":
        how = "are emulated"
    elif emulated("cpu", torch.bfloat16):
        how = "run through the FP32 kernel on BF16-rounded operands (flyer.model.lowp), slower than fp32"
    elif kind == "widened":
        how = "run on oneDNN's kernels that widen to FP32 inside (FLYER_LOWP_EMULATION=0), slower than fp32"
    else:
        how = "run on ATen's scalar reference kernel (FLYER_LOWP_EMULATION=0), tens of times slower than fp32"
    return (f"note: {device.type} has no BF16 matrix hardware (on a CPU: AVX512-BF16, AMX or Arm BF16): "
            f"{precision}'s BF16 GEMMs {how}; precision auto picks fp32 here")


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, with no op where it already is: a no-op ``.to`` is still a dispatch, a few us each,
    and a decode step would make dozens."""
    return t if t.dtype == dtype else t.to(dtype)


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


def mm(a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor | None = None,
       emulate: bool | None = None) -> torch.Tensor:
    """``torch.mm(a, b, out=out)`` in ``a``'s dtype (not differentiable: for the hand-written
    forwards and backwards). ``emulate``: the choice an autograd Function made in its forward
    (None: ``emulated`` now). A ``b`` widened by ``operand`` carries that choice too, so a GEMM on
    it never mixes BF16 and FP32 operands."""
    widened = a.dtype in LOWP and b.dtype == torch.float32
    if not (widened or (emulated(a.device.type, a.dtype) if emulate is None else emulate)):
        return torch.mm(a, b, out=out)
    with torch.autocast("cpu", enabled=False):  # in an autograd.Function's forward it would cast back
        r = torch.mm(a.float(), b.float())
    return r.to(a.dtype) if out is None else out.copy_(r)


def operand(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` rounded to ``dtype`` as an operand of ``mm``; where emulated also widened to FP32 here,
    once, so that several GEMMs on it (a weight used per chunk or per expert) do not widen it again.
    ``mm`` takes its dtype from its first operand, which stays in ``dtype``."""
    if t.dtype == dtype and dtype not in LOWP:  # nothing to round or widen (FP32 decoding: per layer)
        return t
    t = t.to(dtype)
    return t.float() if emulated(t.device.type, dtype) else t


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` as autocast would compute it (differentiable); emulated where it applies.

    The gradients round as the native GEMMs' do: dx and dW come out of their GEMMs in the compute
    dtype, then go back to x's and the weight's dtypes."""
    if x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type):
        if weight.dtype != torch.float32:  # held in BF16 for inference (flyer.infer.weights), computed in FP32
            return kernels.linear_held(x, weight, bias)
        if not torch.is_grad_enabled() and x.numel() > kernels.FEW_ROWS * x.shape[-1] and weight.device.type == "cpu" \
                and kernels.splits() and kernels.cpu_ops() is not None:
            # a prefill chunk's GEMM split over the expert threads, on 128-row blocks of the weight: F.linear's
            # sums within FP32 rounding, not its bits (the BLAS blocks K by the call's shape), so only where
            # the split pays; elsewhere F.linear, whose bits the autograd forward has
            return kernels.linear_held(x, weight, bias)
        return F.linear(x, weight, bias)  # never emulated: no lookups (~50 small GEMMs a decode step)
    dtype = gemm_dtype(x)
    if not emulated(x.device.type, dtype):
        return F.linear(x, weight, bias)
    with torch.autocast(x.device.type, enabled=False):
        b = None if bias is None else bias.to(dtype).float()
        return F.linear(x.to(dtype).float(), weight.to(dtype).float(), b).to(dtype)


def _product(fn, *operands: torch.Tensor) -> torch.Tensor:
    """``fn(*operands)``, a product autocast computes in its dtype; emulated where it applies (differentiable)."""
    dev = operands[0].device.type
    if all(t.dtype == torch.float32 for t in operands) and not torch.is_autocast_enabled(dev):
        return fn(*operands)  # no lookups: decode runs these per layer
    dtype = gemm_dtype(*operands)
    if not emulated(dev, dtype):
        return fn(*operands)
    with torch.autocast(dev, enabled=False):
        return fn(*(t.to(dtype).float() for t in operands)).to(dtype)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.matmul`` as autocast would compute it; emulated where it applies (attention's products on a
    shared key head or gathered latents, the hyper-connections' stream mix)."""
    return _product(torch.matmul, a, b)


def einsum(equation: str, *operands: torch.Tensor) -> torch.Tensor:
    """``torch.einsum`` as autocast would compute it (its batched products); emulated where it applies."""
    return _product(functools.partial(torch.einsum, equation), *operands)


def group_rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., G, K) as (G M, K), group-major: group g's M rows consecutive (the grouped GEMMs' layout)."""
    G, K = x.shape[-2:]
    return x.reshape(-1, G, K).transpose(0, 1).reshape(-1, K)


def ungroup_rows(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``group_rows``' inverse for a grouped GEMM's output y (G M, L): (..., G, L) with ``like``'s leading dims."""
    G = like.shape[-2]
    return y.view(G, -1, y.shape[-1]).transpose(0, 1).reshape(*like.shape[:-1], y.shape[-1])


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """(..., G, L): group g of x (..., G, K) times its own L = N / G rows of ``weight`` (N, K), a block-diagonal
    linear (DeepSeek-V4's grouped ``wo_a``). FP32 x on a weight held for inference (``flyer.infer.weights``:
    BF16, or FP8 codes with their 128x128 block ``scale``) runs ``kernels.grouped_mm``, each group's rows against
    its row block as held, as ``linear`` runs ``kernels.linear_held``; otherwise one batched product (``einsum``)."""
    G, K = x.shape[-2:]
    L = weight.shape[0] // G
    held = x.dtype == torch.float32 and weight.dtype != torch.float32 and not torch.is_autocast_enabled(x.device.type)
    if not held:
        return einsum("...gk,glk->...gl", x, weight.view(G, L, K))
    w = weight.view(G, L, K)
    if scale is not None and L % kernels.TILE:  # a scale block spans two groups: widened whole instead
        w, scale = kernels.dequantize_held(weight, scale).view(G, L, K), None
    elif scale is not None:
        scale = scale.view(G, L // kernels.TILE, scale.shape[-1])
    rows = group_rows(x)
    return ungroup_rows(kernels.grouped_mm(rows, [rows.shape[0] // G] * G, w, scale=scale), x)


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention``; where emulated, computed in FP32 on the rounded inputs and
    rounded back (the fused kernel's own intermediate roundings are not reproduced)."""
    dtype = gemm_dtype(q)
    if not emulated(q.device.type, dtype):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.is_floating_point():  # an additive mask (0 / -inf, a sliding window's) in q's dtype
        kwargs["attn_mask"] = mask.float()
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = (t.to(dtype).float() for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, **kwargs).to(dtype)


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is ``linear`` above (same parameters, state-dict keys and init)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """(..., G, out_features / G): ``grouped_linear`` of x (..., G, in_features) on this weight (no bias)."""
        return grouped_linear(x, self.weight)
