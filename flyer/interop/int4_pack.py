"""compressed-tensors' pack-quantized INT4 weights (Kimi-K2-Thinking, Kimi-K2.5), encoded as the export writes them
(dtype "int4", ``flyer.interop.export``; ``quantize_int4``: the library's own quantizer); loading decodes them, and
the library's other integer schemes, in ``flyer.interop.compressed``.

A quantized linear ``<stem>`` (R output rows, C input columns) is stored as three tensors instead of ``<stem>.weight``
(compressed-tensors 0.20, ``PackedQuantizationCompressor`` and ``pack_to_int32`` / ``unpack_from_int32``):

* ``<stem>.weight_packed`` int32 (R, ceil(C/8)): eight 4-bit codes per word, column 8w + j in bits 4j..4j+3 of word
  w (the lowest nibble first); each code is the signed value q in [-8, 7] plus 8 (stored unsigned);
* ``<stem>.weight_scale`` (R, C/g), the model's float dtype (BF16 in Kimi's): one scale per g consecutive columns
  of a row (g: the config's ``group_size``; C a multiple of g, as compressed-tensors requires);
* ``<stem>.weight_shape`` integer (2,): (R, C).

Symmetric, no zero point: w = q * scale. compressed-tensors' ``dequantize`` computes that product in the scale's
dtype (``x_q.to(scale.dtype) * scale``), which is what transformers loads and vLLM's W4A16 kernels multiply by, so
it is rounded here once to the scale's dtype too (exact in FP32, then one rounding: PyTorch's BF16 multiply rounds
its FP32 product once) and then cast to the model's dtype; FP32 and BF16 models hold the library's values exactly.
"""

from __future__ import annotations

from typing import Callable

import torch

from flyer.interop.compressed import PACKED, SCALE, SHAPE, dequantize, unpack_int32

CODES_PER_WORD = 8  # 32 bits / 4
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # nibble j of a word: bits 4j..4j+3


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """(R, cols) int8 signed codes q in [-8, 7] from ``packed`` (R, ceil(cols/8)) int32 (module docstring)."""
    return unpack_int32(packed, 4, cols)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(R, ceil(C/8)) int32 words of ``q`` (R, C) signed codes in [-8, 7] (module docstring: ``unpack_int4``'s
    inverse, compressed-tensors' ``pack_to_int32``); the last word's unused nibbles are zero."""
    u = (q.to(torch.int64) + 8).flatten(1)
    u = torch.nn.functional.pad(u, (0, -u.shape[1] % CODES_PER_WORD)).unflatten(1, (-1, CODES_PER_WORD))
    words = (u << _SHIFTS.to(u.device, torch.int64)).sum(-1)  # disjoint nibbles: the sum is their OR
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)  # the top nibble's sign bit


def quantize_int4(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype = torch.bfloat16,
                  name: str = "weight") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight_packed, weight_scale, weight_shape) of ``w`` (R, C) float, C a multiple of ``group_size`` (else
    ValueError naming ``name``): symmetric round-to-nearest per ``group_size`` consecutive columns of a row, as
    compressed-tensors 0.20 quantizes the scheme (``calculate_qparams``: scale = absmax / 7.5, its half range
    (7 - (-8)) / 2, a zero scale replaced by FP32's eps; then ``quantize``: clamp to [-8, 7], round half to
    even), the scale rounded to ``scale_dtype`` (Kimi's BF16) before the codes are taken against it, so they
    decode (``dequantize_int4``) against the stored scale. Computed in FP32 on the weight's exact values: the
    library divides in the weight's dtype, which for a BF16 weight rounds each ratio to BF16 before rounding it
    to a code. weight_shape is int32, as Kimi's."""
    if w.dim() != 2 or not w.dtype.is_floating_point or w.shape[1] % group_size:
        raise ValueError(f"{name}: INT4 groups of {group_size} input columns need a 2-D float weight whose columns "
                         f"are a multiple of {group_size} (got {w.dtype} {tuple(w.shape)})")
    groups = w.float().unflatten(1, (-1, group_size))  # (R, C/g, g)
    scale = groups.abs().amax(-1) / 7.5
    scale = torch.where(scale == 0, torch.finfo(torch.float32).eps, scale).to(scale_dtype)
    # a scale that flushed to zero in scale_dtype would divide by zero: its group is zeros' worth anyway
    scale = torch.where(scale == 0, torch.finfo(scale_dtype).eps, scale)
    q = torch.round(torch.clamp(groups / scale.float().unsqueeze(-1), -8, 7)).to(torch.int8).flatten(1)
    return pack_int4(q), scale, torch.tensor(tuple(w.shape), dtype=torch.int32)


def packed_items(name: str, shape: tuple[int, int], get: Callable[[], torch.Tensor], group_size: int,
                 scale_dtype: torch.dtype = torch.bfloat16, own: Callable[[], tuple] | None = None
                 ) -> list[tuple[str, tuple[int, ...], torch.dtype, Callable]]:
    """The (name, shape, dtype, make) items ``flyer.interop.export`` writes for the weight ``name``
    (``<stem>.weight``; ``get``: its (R, C) values) pack-quantized (``quantize_int4``): ``<stem>.weight_packed``,
    ``.weight_scale``, ``.weight_shape``; ``own``: the maker of a source checkpoint's three in this format,
    written as they are. The weight is encoded once, when its codes are written; its scale and shape are kept
    until they are."""
    rows, cols = shape
    made: list[torch.Tensor] = []

    def make(i: int) -> torch.Tensor:
        if not made:
            made.extend(own() if own is not None else quantize_int4(get(), group_size, scale_dtype, name))
        t = made[i] if i < 2 else made[i].to(torch.int32)  # the library writes int64 shapes, Kimi int32
        if i == 2:
            made.clear()
        return t

    stem = name.removesuffix(".weight")
    return [(stem + PACKED, (rows, -(-cols // CODES_PER_WORD)), torch.int32, lambda: make(0)),
            (stem + SCALE, (rows, cols // group_size), scale_dtype, lambda: make(1)),
            (stem + SHAPE, (2,), torch.int32, lambda: make(2))]


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, shape: torch.Tensor,
                    out_dtype: torch.dtype = torch.float32, name: str = "weight") -> torch.Tensor:
    """(R, C) ``out_dtype`` weight from a pack-quantized ``packed`` (R, ceil(C/8)) int32, ``scale`` (R, C/g)
    float and ``shape`` (2,) integer (R, C): each code times its group's scale, rounded to the scale's dtype
    (``flyer.interop.compressed.dequantize``). Inconsistent shapes or dtypes: ValueError naming ``name``."""
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"{name}: packed codes must be 2-D int32 (got {packed.dtype} {tuple(packed.shape)})")
    if shape.dtype.is_floating_point or shape.dtype == torch.bool or shape.numel() != 2:
        raise ValueError(f"{name}: weight_shape must be 2 integers (got {shape.dtype} {tuple(shape.shape)})")
    R, C = (int(v) for v in shape.reshape(-1).tolist())
    if R != packed.shape[0] or -(-C // CODES_PER_WORD) != packed.shape[1]:
        raise ValueError(f"{name}: weight_shape ({R}, {C}) does not match the packed codes {tuple(packed.shape)} "
                         f"(8 codes per int32)")
    return dequantize(unpack_int4(packed, C), scale, out_dtype=out_dtype, name=name)


__all__ = ["CODES_PER_WORD", "PACKED", "SCALE", "SHAPE", "dequantize_int4", "pack_int4", "packed_items",
           "quantize_int4", "unpack_int4"]
