"""DeepSeek-V4's checkpoint tensor formats, decoded exactly and encoded back.

* **fp8_ue8m0**: ``<stem>.weight`` float8_e4m3fn (N, K) with ``<stem>.scale`` float8_e8m0fnu
  (ceil(N/128), ceil(K/128)), one power-of-two scale per 128x128 block (a partial last block of
  rows or columns shares its block's scale); the data is not padded.
* **fp4**: routed experts' ``<stem>.weight`` int8 (N, K/2) holding FP4 E2M1 codes, two per byte,
  the low nibble first (column 2j in the low nibble, 2j+1 in the high one), with ``<stem>.scale``
  float8_e8m0fnu (N, K/32): one scale per 32 consecutive input channels of a row.
* **plain**: everything else (BF16/FP32, no scale).

A UE8M0 byte b is the scale 2**(b - 127); 0xFF is NaN. Every E4M3 or E2M1 value times a power of
two is exact in FP32 (for scales up to 2**119 resp. 2**125; a product that overflows is refused),
so dequantizing into FP32 is exact. BF16 has FP32's exponent range and 8 significant bits (E4M3
needs 4, E2M1 2), so the BF16 output is the exact value too, except for products below BF16's
smallest normal 2**-126 (scale bytes under 10, never seen in a checkpoint), which round.

The encoders choose scales as DeepSeek's quantizers (and transformers' for FP8) do:
2**ceil(log2(amax / max_code)) per block, computed exactly (amax / 448 for E4M3, amax / 6 for
E2M1), then round to nearest, ties to even, saturating at the largest code. An all-zero block
gets scale 1, as in transformers (DeepSeek's activation quantizer floors amax at 1e-4 instead). The E2M1
rounding and the exponent rule are ``flyer.fp8.fp4``'s, the codec FP4 QAT (``flyer train --fp4-experts``)
trains through, so an export stores the FP4 values its training forward multiplied by.

Re-encoding a decoded checkpoint tensor reproduces its bytes except in blocks whose largest
|code| is the bottom of the top binade (224 for E4M3, 3 for E2M1; about 5% of FP8 blocks and a
quarter of FP4 groups of random weights): they hold the same values as max code 448 resp. 6 at
half the scale, which the ceil rule picks, so the bytes differ (codes doubled, scale byte one
less) though the values do not. Pass the checkpoint's ``scale`` to the encoders to reproduce
every byte.

Which tensors a V4 checkpoint stores in which format is DeepSeek's choice, by name
(``published_format``; tests/test_v4_counts.py reproduces V4-Flash's published index by it), and
``quantized_items`` writes one that way (``flyer export --dtype fp8``).
"""

from __future__ import annotations

import math
import re
from typing import Callable

import torch
import torch.nn.functional as F

from flyer.fp8.fp4 import E2M1_MAX, E2M1_VALUES, FP4_GROUP, UE8M0_BIAS, ceil_log2, e2m1_codes, pack_e2m1, unpack_e2m1
from flyer.kernels import fp8_to_float

FP8_BLOCK = 128  # rows and columns of an E4M3 weight's scale block
E4M3_MAX = 448.0
_E8M0_NAN = 0xFF
_BIAS = UE8M0_BIAS
_ceil_log2 = ceil_log2  # the scale rule, one name to swap for a variant (tests/test_v4_quant.py)

# 2**(b - 127) for every UE8M0 byte b (2**-127 is an FP32 subnormal, still exact); 0xFF is NaN
_E8M0_VALUES = torch.tensor([math.ldexp(1.0, b - _BIAS) for b in range(255)] + [math.nan], dtype=torch.float32)


FP4_DTYPES = (torch.int8, torch.uint8) + ((torch.float4_e2m1fn_x2,) if hasattr(torch, "float4_e2m1fn_x2") else ())


def stored_format(name: str, keys, dtype: torch.dtype) -> str:
    """How the V4 tensor ``name`` (of ``dtype``) is stored, given every key of the checkpoint:
    "fp8_ue8m0" or "fp4" for a ``<stem>.weight`` beside a ``<stem>.scale`` (FP4 is packed in
    int8), else "plain". A ``<stem>.scale`` itself is consumed with its weight, not loaded."""
    if not (name.endswith(".weight") and name.removesuffix(".weight") + ".scale" in keys):
        return "plain"
    if dtype == torch.float8_e4m3fn:
        return "fp8_ue8m0"
    if dtype in FP4_DTYPES:
        return "fp4"
    raise ValueError(f"{name}: a {dtype} weight with a block scale (expected float8_e4m3fn, or int8 for FP4)")


def _scale_exponents(scale: torch.Tensor, shape: tuple[int, int], name: str, layout: str) -> torch.Tensor:
    """(shape) int32 exponents e (scale 2**e) of a UE8M0 scale tensor, checked."""
    if scale.dtype not in (torch.float8_e8m0fnu, torch.uint8):
        raise ValueError(f"{name}: scale dtype {scale.dtype} is not float8_e8m0fnu (UE8M0) or its uint8 bytes")
    if tuple(scale.shape) != shape:
        raise ValueError(f"{name}: scale shape {tuple(scale.shape)} does not match the data: expected {shape} "
                         f"({layout})")
    raw = scale.view(torch.uint8)
    if nan := int(raw.eq(_E8M0_NAN).sum()):
        raise ValueError(f"{name}: {nan} of its UE8M0 scale bytes are 0xFF (NaN)")
    return raw.int() - _BIAS


def _scale_values(exponents: torch.Tensor) -> torch.Tensor:
    return _E8M0_VALUES.to(exponents.device)[(exponents + _BIAS).long()]


def _check_finite(out: torch.Tensor, name: str, nan_codes: int = 0) -> None:
    if not bool(torch.isfinite(out).all()):
        if nan_codes:
            raise ValueError(f"{name}: {nan_codes} of its FP8 codes are NaN (a corrupt checkpoint, or NaN weights)")
        raise ValueError(f"{name}: codes times scales overflow FP32 (scale bytes too large)")


def dequantize_ue8m0_blocks(data: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype = torch.float32,
                            name: str = "weight") -> torch.Tensor:
    """(N, K) ``out_dtype``: each E4M3 code of ``data`` (N, K) times its 128x128 block's UE8M0
    scale ``scale`` (ceil(N/128), ceil(K/128)); exact in FP32. ``name`` labels errors: a scale of
    the wrong shape, a NaN scale byte, NaN codes."""
    if data.dtype != torch.float8_e4m3fn or data.dim() != 2:
        raise ValueError(f"{name}: data must be a 2-D float8_e4m3fn tensor, got {data.dtype} {tuple(data.shape)}")
    N, K = data.shape
    shape = (-(-N // FP8_BLOCK), -(-K // FP8_BLOCK))
    s_NKb = _scale_values(_scale_exponents(scale, shape, name, "ceil(N/128), ceil(K/128)")).repeat_interleave(
        FP8_BLOCK, dim=0)[:N]
    w = fp8_to_float(data)  # exact, fresh: scaled in place
    full = K // FP8_BLOCK * FP8_BLOCK
    if full:
        w[:, :full].unflatten(1, (-1, FP8_BLOCK)).mul_(s_NKb[:, : full // FP8_BLOCK, None])
    if full < K:  # the partial last block of columns
        w[:, full:].mul_(s_NKb[:, -1:])
    _check_finite(w, name, int((data.view(torch.uint8) & 0x7F).eq(0x7F).sum()))
    return w.to(out_dtype)


def dequantize_fp4_e2m1(packed: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype = torch.float32,
                        name: str = "weight") -> torch.Tensor:
    """(N, K) ``out_dtype`` from FP4 E2M1 codes ``packed`` (N, K/2) int8 (two per byte, low nibble
    = even column) and UE8M0 scales ``scale`` (N, K/32), one per 32 input channels; exact in FP32.
    ``name`` labels errors: a scale of the wrong shape, a NaN scale byte."""
    if packed.dtype not in FP4_DTYPES or packed.dim() != 2:
        raise ValueError(f"{name}: FP4 data must be a 2-D int8 tensor of packed nibbles, got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    N, K = packed.shape[0], 2 * packed.shape[1]
    if K % FP4_GROUP:
        raise ValueError(f"{name}: FP4 row of {K} values is not a multiple of {FP4_GROUP} (one scale each)")
    s_NG = _scale_values(_scale_exponents(scale, (N, K // FP4_GROUP), name, "N, K/32 for packed (N, K/2)"))
    values = E2M1_VALUES.to(packed.device)[_fp4_codes(packed).long()]  # (N, K)
    out = values.view(N, K // FP4_GROUP, FP4_GROUP).mul_(s_NG.unsqueeze(-1)).view(N, K)
    _check_finite(out, name)
    return out.to(out_dtype)


def _fp4_codes(packed: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 codes 0..15 from (N, K/2) packed bytes: the low nibble holds the even column."""
    return unpack_e2m1(packed)


def _encode_exponents(amax: torch.Tensor, max_code: float, scale: torch.Tensor | None, name: str,
                      layout: str) -> torch.Tensor:
    """int32 exponents e (scale 2**e) per block: the given ``scale``'s, else ceil(log2(amax / max_code))."""
    if not bool(torch.isfinite(amax).all()):
        raise ValueError(f"{name}: non-finite values cannot be quantized")
    if scale is not None:
        return _scale_exponents(scale, tuple(amax.shape), name, layout)
    return _ceil_log2(amax / max_code)


def _e8m0_bytes(exponents: torch.Tensor) -> torch.Tensor:
    return (exponents + _BIAS).to(torch.uint8).view(torch.float8_e8m0fnu)


def quantize_ue8m0_blocks(w: torch.Tensor, scale: torch.Tensor | None = None,
                          name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (N, K) as E4M3 codes (N, K) and UE8M0 scales (ceil(N/128), ceil(K/128)) float8_e8m0fnu,
    the scales chosen as DeepSeek's quantizer does (module docstring), or ``scale`` itself when
    given (re-export of a checkpoint tensor, byte for byte); values beyond 448 * scale saturate."""
    if w.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D weight, got shape {tuple(w.shape)}")
    N, K = w.shape
    Nb, Kb = -(-N // FP8_BLOCK), -(-K // FP8_BLOCK)
    # zero padding to whole blocks changes no block's amax
    blocks = F.pad(w.float(), (0, Kb * FP8_BLOCK - K, 0, Nb * FP8_BLOCK - N)).view(Nb, FP8_BLOCK, Kb, FP8_BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))
    exponents = _encode_exponents(amax, E4M3_MAX, scale, name, "ceil(N/128), ceil(K/128)")
    inverse = torch.ldexp(torch.ones_like(amax), -exponents)  # 2**-e, exact: dividing by the scale
    codes = (blocks * inverse[:, None, :, None]).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return codes.view(Nb * FP8_BLOCK, Kb * FP8_BLOCK)[:N, :K].contiguous(), _e8m0_bytes(exponents)


def quantize_fp4_e2m1(w: torch.Tensor, scale: torch.Tensor | None = None,
                      name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (N, K), K a multiple of 32, as packed FP4 E2M1 codes (N, K/2) int8 (low nibble = even
    column) and UE8M0 scales (N, K/32) float8_e8m0fnu, chosen as DeepSeek's quantizer does (module
    docstring), or ``scale`` itself when given; values beyond 6 * scale saturate. Rounding is to
    nearest, ties to the even code (what the hardware cast does); negative values that round to
    zero keep their sign (code 8, -0)."""
    if w.dim() != 2 or w.shape[1] % FP4_GROUP:
        raise ValueError(f"{name}: expected a 2-D weight with a multiple of {FP4_GROUP} columns, "
                         f"got shape {tuple(w.shape)}")
    N, K = w.shape
    groups = w.float().view(N, K // FP4_GROUP, FP4_GROUP)
    amax = groups.abs().amax(dim=-1)
    exponents = _encode_exponents(amax, E2M1_MAX, scale, name, "N, K/32")
    code = e2m1_codes(groups, exponents).view(N, K)  # the codec FP4 QAT trains through (flyer.fp8.fp4)
    packed = pack_e2m1(code)
    return packed.view(torch.int8), _e8m0_bytes(exponents)


def held_e4m3_blocks(kind: str, data: torch.Tensor, scale: torch.Tensor, name: str = "weight",
                     order: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight ``data`` with its UE8M0 ``scale``, stored in format ``kind`` ("fp8_ue8m0" or "fp4"), as E4M3
    codes (N, K) and FP32 scales (ceil(N/128), ceil(K/128)), one power of two per 128x128 block, whose products
    (``flyer.kernels.dequantize_held``, what a model holding FP8 computes with) are its values bit for bit.
    ``order``: (N,) the rows to take, row i being row ``order[i]`` (a rope permutation), else as stored.

    E4M3 with UE8M0 scales: its own codes and scales (2**e in FP32 is exact, even 2**-127), rows permuted with
    their codes where each keeps its 128-row block (else re-blocked as FP4 is). FP4: each block's scale is
    2**S, S = ceil(log2(amax / 448)) (the smallest that does not overflow; any larger only coarsens the grid),
    and a value v is held exactly iff v / 2**S is an E4M3 value: |v| <= 448 * 2**S by the choice of S, and a
    value of at most 4 significant bits (E2M1's have 2) is one iff it is a multiple of 2**(S - 9), E4M3's
    smallest subnormal 2**-9 times the scale. A group of scale 2**s holds c * 2**s, c a multiple of 0.5: exact
    whatever its codes iff s >= S - 8. As amax <= 6 * 2**smax (smax: the block's largest group scale),
    S <= smax - 6: a block whose nonzero groups' scales span at most 15 binades (each >= 2**(smax - 14); 12
    without E4M3's subnormals) is always exact, and an all-zero group is whatever its scale. A block not held
    exactly is a ValueError naming the weight: never rounded."""
    values = (dequantize_ue8m0_blocks if kind == "fp8_ue8m0" else dequantize_fp4_e2m1)(data, scale, name=name)
    rows = torch.arange(values.shape[0])
    if kind == "fp8_ue8m0" and (order is None or torch.equal(order // FP8_BLOCK, rows // FP8_BLOCK)):
        codes = data if order is None else data.view(torch.uint8)[order].view(data.dtype)
        return codes, _scale_values(_scale_exponents(scale, tuple(scale.shape), name, ""))
    if order is not None:
        values = values[order]
    codes, ue8m0 = quantize_ue8m0_blocks(values, name=name)
    N, K = values.shape
    lost = (dequantize_ue8m0_blocks(codes, ue8m0, name=name) != values).float()
    lost_blocks = F.pad(lost, (0, -K % FP8_BLOCK, 0, -N % FP8_BLOCK)).unflatten(0, (-1, FP8_BLOCK)).unflatten(
        2, (-1, FP8_BLOCK)).amax(dim=(1, 3))
    if bad := int(lost_blocks.sum()):
        r, c = (int(i) for i in lost_blocks.nonzero()[0])
        raise ValueError(f"{name}: {bad} of its 128x128 blocks (the first: rows {r * FP8_BLOCK}+, columns "
                         f"{c * FP8_BLOCK}+) span more binades than E4M3 holds under one power-of-two scale "
                         f"(FP4 experts: group scales over 2**14 apart), so FP8 cannot hold them exactly: hold the "
                         f"weights in BF16 (--weight-dtype bf16)")
    return codes, _scale_values(ue8m0.view(torch.uint8).int() - _BIAS)


# what DeepSeek's V4 checkpoints store as FP8 (attention projections, the indexer's queries, the shared expert and the
# MTP layer's e_proj / h_proj; not the compressors, the indexer's weights_proj or the router) and as FP4 (routed
# experts); everything else is plain: BF16, or FP32 (sinks, ape, hyper-connections, router bias), int64 hash tables
_FP8_NAMES = re.compile(r"(^|\.)attn\.(wq_a|wq_b|wkv|wo_a|wo_b|indexer\.wq_b)\.weight$"
                        r"|\.shared_experts\.w[123]\.weight$|(^|\.)(e_proj|h_proj)\.weight$")
_FP4_NAMES = re.compile(r"\.experts\.\d+\.w[123]\.weight$")


def published_format(name: str) -> str:
    """How DeepSeek's published V4 checkpoints store the tensor ``name`` (hub spelling): "fp8_ue8m0", "fp4"
    or "plain" (``stored_format``'s kinds)."""
    return "fp8_ue8m0" if _FP8_NAMES.search(name) else "fp4" if _FP4_NAMES.search(name) else "plain"


def quantized_shapes(kind: str, shape: tuple[int, int]) -> tuple[tuple[tuple[int, int], torch.dtype], ...]:
    """((data shape, dtype), (scale shape, dtype)) a (N, K) weight is stored as in format ``kind``."""
    N, K = shape
    if kind == "fp8_ue8m0":
        return ((N, K), torch.float8_e4m3fn), ((-(-N // FP8_BLOCK), -(-K // FP8_BLOCK)), torch.float8_e8m0fnu)
    return ((N, K // 2), torch.int8), ((N, K // FP4_GROUP), torch.float8_e8m0fnu)


Make = Callable[[], torch.Tensor]


def quantized_items(name: str, shape: tuple[int, int], kind: str, get: Make,
                    own: tuple[Make, Make] | None = None) -> list[tuple[str, tuple[int, ...], torch.dtype, Make]]:
    """The (name, shape, dtype, make) items of the weight ``name`` (``get``: its (N, K) values) stored in format
    ``kind`` ("fp8_ue8m0" or "fp4"): ``<stem>.weight`` and ``<stem>.scale``. ``own``: makers of a source
    checkpoint's codes and scale in that format, written as they are (nothing is rounded twice). Each is made
    once when written, the weight before its scale: the scale the weight's encoding gave is kept until then."""
    (data_shape, data_dtype), (scale_shape, scale_dtype) = quantized_shapes(kind, shape)
    encode = quantize_ue8m0_blocks if kind == "fp8_ue8m0" else quantize_fp4_e2m1
    pair: list[tuple[torch.Tensor, torch.Tensor]] = []

    def make(i: int) -> torch.Tensor:
        if own is not None:
            return own[i]()
        if not pair:
            pair.append(encode(get(), name=name))
        return pair.pop()[1] if i == 1 else pair[0][0]

    stem = name.removesuffix(".weight")
    return [(name, data_shape, data_dtype, lambda: make(0)),
            (stem + ".scale", scale_shape, scale_dtype, lambda: make(1))]


__all__ = ["FP8_BLOCK", "FP4_GROUP", "E4M3_MAX", "E2M1_MAX", "FP4_DTYPES", "stored_format",
           "dequantize_ue8m0_blocks", "dequantize_fp4_e2m1", "quantize_ue8m0_blocks", "quantize_fp4_e2m1",
           "held_e4m3_blocks",
           "published_format", "quantized_items", "quantized_shapes"]
