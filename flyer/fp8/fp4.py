"""FP4 (MXFP4) weights: the E2M1 / UE8M0 codec and DeepSeek-V4's FP4 quantization-aware training of routed experts.

The format is the one DeepSeek-V4's checkpoints store routed experts in (``flyer.interop.v4_quant`` packs it two
codes to a byte and decodes it): a weight (N, K) is cut, row by row, into groups of 32 consecutive input channels;
group g of row n gets the UE8M0 (power-of-two) scale 2**e, e = ceil(log2(amax / 6)) (the smallest with
amax / 2**e <= 6, E2M1's largest magnitude; an all-zero group gets 2**0), and each value becomes the E2M1 code
nearest to v / 2**e (ties to the even code, saturating at +-6). The decoded value, code times scale, is exact in
FP32 (and in BF16: an E2M1 magnitude has 2 significant bits).

QAT (DeepSeek-V4 report, late-stage training): the FP32 master weights of the routed experts (never the shared
expert's) are quantized afresh at every forward, scales from the current master weight; the GEMMs multiply by the
decoded FP4 values and the gradient with respect to them goes straight to the master weight (straight-through
estimator, ``FP4WeightFunction``). Inference then runs on exactly those FP4 values: a QAT run's checkpoint records
the flag, and ``flyer generate`` / ``serve`` / ``export`` load its routed experts through the round trip
(``flyer.interop.load``; ``export --dtype fp8`` encodes the masters with the same rule), so they run what the last
training forward saw.

With the FP8 recipe the FP4 values go into 128x128 E4M3 blocks, as DeepSeek's FP8 GEMMs take them. That is
lossless under power-of-two (UE8M0) block scales: a block's scale 2**S has S = ceil(log2(amax / 448)) <= smax - 6
(amax <= 6 * 2**smax, smax its largest group exponent), and a group value c * 2**s (c a multiple of 0.5, at most
2 significant bits) is an E4M3 code times 2**S whenever s >= S - 8, i.e. whenever the block's group scales span at
most 14 binades (``flyer.interop.v4_quant.held_e4m3_blocks`` states the bound), which trained weights never
approach. An amax / 448 scale (flyer's default FP8 recipe) is not lossless: 448 / 6 is not a power of two, so
most FP4 values land between E4M3 codes (half of them, measured). ``fp4_experts`` therefore gives FP8 experts
UE8M0 scales (their activation tiles too: one recipe per module, and DeepSeek-V4's scales are all UE8M0).

Under expert parallelism each rank quantizes its own slice of the (E, out, in) stacks: groups run along a row's
input channels, inside one expert, so every slice quantizes as the whole stack does and nothing more is needed.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from flyer.fp8.linear import FP8Experts
from flyer.model.experts import Experts

FP4_GROUP = 32  # consecutive input channels of a row sharing one UE8M0 scale
E2M1_MAX = 6.0
UE8M0_BIAS = 127  # a UE8M0 byte b is the scale 2**(b - 127)


def _e2m1(code: int) -> float:
    """The value of a 4-bit E2M1 code: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0."""
    sign = -1.0 if code & 8 else 1.0
    exponent, mantissa = (code >> 1) & 3, code & 1
    magnitude = mantissa * 0.5 if exponent == 0 else (1 + mantissa / 2) * 2.0 ** (exponent - 1)
    return sign * magnitude


E2M1_VALUES = torch.tensor([_e2m1(c) for c in range(16)], dtype=torch.float32)  # -0.0 at code 8
# midpoints between the 8 magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6: rounding thresholds
_E2M1_MIDPOINTS = (E2M1_VALUES[1:8] + E2M1_VALUES[:7]) / 2


def ceil_log2(x: torch.Tensor) -> torch.Tensor:
    """int32 ceil(log2(x)) for x > 0, 0 for x == 0, clamped to UE8M0's [-127, 127]; exact (frexp, not a float
    log2). ``ceil_log2(amax / max_code)`` is the exponent of DeepSeek's power-of-two scale of a block."""
    mantissa, exponent = torch.frexp(x)  # x = mantissa * 2**exponent, mantissa in [0.5, 1)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return torch.where(x > 0, exponent, 0).clamp(-UE8M0_BIAS, UE8M0_BIAS).int()


def fp4_groups(w: torch.Tensor) -> torch.Tensor:
    """(..., N, K) -> (..., N, K/32, 32) float32 view of the scale groups (K a multiple of 32)."""
    return w.float().contiguous().unflatten(-1, (-1, FP4_GROUP))


def fp4_exponents(groups: torch.Tensor) -> torch.Tensor:
    """(..., G) int32 exponents e (scale 2**e) of FP4 groups (..., G, 32): ceil(log2(amax / 6)), 0 if all zero."""
    return ceil_log2(groups.abs().amax(dim=-1) / E2M1_MAX)


def e2m1_codes(groups: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """(..., G, 32) uint8 E2M1 codes 0..15 of ``groups`` (..., G, 32) under scales 2**``exponents`` (..., G):
    round to nearest, ties to the even code (the hardware cast), saturating at +-6; a negative value that
    rounds to zero keeps its sign (code 8, -0)."""
    scaled = groups * torch.ldexp(torch.ones_like(groups[..., 0]), -exponents).unsqueeze(-1)  # exact: 2**-e
    magnitude = scaled.abs().clamp_(max=E2M1_MAX)
    mids = _E2M1_MIDPOINTS.to(groups.device)
    below = torch.bucketize(magnitude, mids, out_int32=True)  # midpoints < |x|
    at_or_below = torch.bucketize(magnitude, mids, out_int32=True, right=True)  # midpoints <= |x|
    # a tie sits at midpoint `below`, between codes below and below + 1: take the even one
    code = torch.where(below % 2 == 1, at_or_below, below) + 8 * torch.signbit(scaled).int()
    return code.to(torch.uint8)


def e2m1_decode(codes: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """(..., G, 32) float32: each E2M1 code of ``codes`` (..., G, 32) times its group's 2**``exponents`` (exact)."""
    values = E2M1_VALUES.to(codes.device)[codes.long()]
    return values.mul_(torch.ldexp(torch.ones_like(values[..., 0]), exponents).unsqueeze(-1))


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """(..., K / 2) uint8: E2M1 codes (..., K) uint8 0..15 two to a byte, channel 2j in the low nibble and 2j + 1
    in the high one (``float4_e2m1fn_x2``'s order, DeepSeek's checkpoints' and kernels')."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """(..., K) uint8 codes 0..15 of ``pack_e2m1``'s bytes (..., K / 2) (uint8 or int8)."""
    u8 = packed.view(torch.uint8)
    return torch.stack((u8 & 0xF, u8 >> 4), dim=-1).flatten(-2)


def fp4_round_trip(w: torch.Tensor) -> torch.Tensor:
    """``w`` (..., N, K), K a multiple of 32, as its FP4 values (float32, same shape): every row's groups of 32
    inputs encoded with their own scale and decoded, as ``flyer.interop.v4_quant`` writes and reads them, bit
    for bit (without packing the codes). No finiteness check: QAT runs this at every forward, where a check
    would synchronise the device per stack, and a non-finite master weight shows as a non-finite loss, which
    the trainer skips (the export's encoder checks, ``flyer.interop.v4_quant``)."""
    if w.dim() < 2 or w.shape[-1] % FP4_GROUP:
        raise ValueError(f"FP4 weights need a multiple of {FP4_GROUP} input channels, got shape {tuple(w.shape)}")
    groups = fp4_groups(w)
    exponents = fp4_exponents(groups)
    return e2m1_decode(e2m1_codes(groups, exponents), exponents).flatten(-2)


class FP4WeightFunction(torch.autograd.Function):
    """The weight (..., N, K) as FP4 QAT's GEMMs see it (``fp4_round_trip``, float32); the gradient goes straight
    through to the master weight (STE), in its dtype."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor) -> torch.Tensor:
        ctx.w_dtype = weight.dtype
        with torch.autocast(weight.device.type, enabled=False):
            return fp4_round_trip(weight)

    @staticmethod
    def backward(ctx, dw: torch.Tensor):
        return dw.to(ctx.w_dtype)


def fp4_weight(weight: torch.Tensor) -> torch.Tensor:
    """``FP4WeightFunction.apply(weight)``: the FP4 values, differentiable straight through."""
    return FP4WeightFunction.apply(weight)


def fp4_experts(model: nn.Module) -> list[str]:
    """Turn on FP4 QAT, in place, for every routed-experts module of ``model`` (``Experts``: not the shared
    experts, which are ``MLP``s, nor any other weight): their GEMMs multiply by ``fp4_weight`` of w1/w2/w3
    (``Experts.gemm_weights``). FP8 experts get power-of-two block scales, under which the FP4 values are
    held exactly (module docstring). Parameters, state-dict keys and the optimizer are unchanged. Returns the
    modules' names; a ValueError names a stack whose rows are not whole groups of 32 inputs."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, Experts):
            continue
        for w in (module.w1, module.w2, module.w3):
            if w.shape[-1] % FP4_GROUP:
                raise ValueError(f"{name}: FP4 experts need a multiple of {FP4_GROUP} input channels per row, "
                                 f"got {w.shape[-1]}")
        module.weight_quant = fp4_weight
        if isinstance(module, FP8Experts) and not module.recipe.pow2_scales:
            module.recipe = dataclasses.replace(module.recipe, pow2_scales=True)
        names.append(name)
    return names


__all__ = ["FP4_GROUP", "E2M1_MAX", "UE8M0_BIAS", "E2M1_VALUES", "ceil_log2", "fp4_groups", "fp4_exponents",
           "e2m1_codes", "e2m1_decode", "pack_e2m1", "unpack_e2m1", "fp4_round_trip", "FP4WeightFunction", "fp4_weight",
           "fp4_experts"]
