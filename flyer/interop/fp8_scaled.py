"""FP8 E4M3 weights with a scale per tensor, per output channel or per block of rows x columns, as compressed-tensors
and NVIDIA ModelOpt store them (DeepSeek's own 128x128 ``weight_scale_inv`` blocks are ``flyer.interop.hf``'s):

* compressed-tensors' "float-quantized" (llm-compressor's FP8 / FP8_DYNAMIC / FP8_BLOCK presets; "naive-quantized"
  when the activations are not quantized): ``<stem>.weight`` float8_e4m3fn (R, C) and ``<stem>.weight_scale``
  (1,) / (R, 1) / (ceil(R/bh), ceil(C/bw)) for strategy "tensor" / "channel" / "block" (``block_structure``
  [bh, bw]), in the model's dtype as llm-compressor writes it. The library decompresses code x scale in the
  scale's dtype (``NaiveQuantizationCompressor.decompress``: the code cast exactly, the product rounded once).
* ModelOpt's ``quant_algo`` "FP8": ``<stem>.weight`` float8_e4m3fn and ``<stem>.weight_scale`` float32 (), one
  scale per tensor; code x scale in FP32.

Both are read as weight-only (W8A16): their FP8 activations' scales (``input_scale``, or dynamic ones) are not read,
as vLLM runs these checkpoints on GPUs without FP8 tensor cores (its Marlin FP8 kernels). Into a model holding its
weights as FP8 (128x128 block scales, ``flyer.infer.weights``), a weight whose every 128x128 tile lies in one of its
blocks (a tensor's scale; blocks of multiples of 128, FP8_BLOCK's) keeps its codes, each tile with its block's
scale in FP32 (``held_fp8``: code x scale exact, as DeepSeek's blocks are held); per-channel scales are decoded and
held anew.
"""

from __future__ import annotations

import math

import torch

from flyer.fp8.quant import TILE

CODES = torch.float8_e4m3fn  # the only FP8 type either library writes weights in


def scale_grid(rows: int, cols: int, block: tuple[int, int]) -> tuple[int, int]:
    """The (row blocks, column blocks) of scales an (R, C) weight has when each scale covers ``block`` (bh, bw)
    elements (a tensor: (R, C); a channel: (1, C))."""
    return -(-rows // block[0]), -(-cols // block[1])


def fits(scale: tuple[int, ...], grid: tuple[int, int]) -> bool:
    """Whether a scale tensor of shape ``scale`` is the ``grid`` of scales (one scale: any shape of one element,
    as a per-tensor scale is stored (1,) by compressed-tensors and () by ModelOpt)."""
    return tuple(scale) == grid or (grid == (1, 1) and len(scale) <= 2 and math.prod(scale) == 1)


def decode_fp8(codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], name: str) -> torch.Tensor:
    """(R, C) weight ``name`` in ``scale``'s dtype from ``codes`` (R, C) float8_e4m3fn and ``scale`` (the
    ``scale_grid`` of ``block``, float): each code times its block's scale, computed in FP32 (the code and a
    BF16 / FP16 scale exact in it) and rounded once to the scale's dtype, as compressed-tensors' ``dequantize``
    computes it. Bad dtypes or shapes, non-finite scales: ``ValueError`` naming ``name``."""
    scale = _checked(codes, scale, block, name)
    compute = torch.promote_types(scale.dtype, torch.float32)
    (R, C), (bh, bw) = codes.shape, block
    gr, gc = scale.shape
    v = codes.to(compute)  # exact: E4M3 has 3 mantissa bits
    if (gr * bh, gc * bw) != (R, C):  # a partial last block: padded, as the library pads before its blocks
        v = torch.nn.functional.pad(v, (0, gc * bw - C, 0, gr * bh - R))
    v = v.view(gr, bh, gc, bw) * scale.to(compute).reshape(gr, 1, gc, 1)
    return v.view(gr * bh, gc * bw)[:R, :C].to(scale.dtype)


def held_fp8(codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], name: str) -> torch.Tensor | None:
    """The FP32 scales of ``codes``' 128x128 tiles, (ceil(R/128), ceil(C/128)), each its block's scale (as
    ``decode_fp8`` reads ``codes`` and ``scale``), when every tile lies in one block (each side of ``block`` a
    multiple of 128 or the whole dimension); else None. Bad tensors: ``decode_fp8``'s ``ValueError``."""
    scale = _checked(codes, scale, block, name)
    if not tiles_in_blocks(tuple(codes.shape), block):
        return None
    (R, C), (bh, bw) = codes.shape, block
    rows, cols = (torch.arange(0, n, TILE) // b for n, b in ((R, bh), (C, bw)))  # each tile's block
    return scale.float()[rows][:, cols].contiguous()


def tiles_in_blocks(shape: tuple[int, ...], block: tuple[int, int]) -> bool:
    """Whether each 128x128 tile of a 2-D weight of ``shape`` lies in one ``block`` (each side of the block a multiple
    of 128 or the whole dimension), so that a model holding FP8 can keep its codes; known from a header alone."""
    (R, C), (bh, bw) = shape, block
    return (bh % TILE == 0 or bh >= R) and (bw % TILE == 0 or bw >= C)


def _checked(codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], name: str) -> torch.Tensor:
    """``scale`` as its (row blocks, column blocks) grid, after ``decode_fp8``'s checks of both tensors."""
    if codes.dtype != CODES or codes.dim() != 2:
        raise ValueError(f"{name}: FP8 codes must be a 2-D float8_e4m3fn tensor (got {codes.dtype} "
                         f"{tuple(codes.shape)})")
    R, C = codes.shape
    grid = scale_grid(R, C, block)
    if scale.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not fits(tuple(scale.shape), grid):
        raise ValueError(f"{name}: weight_scale {scale.dtype} {tuple(scale.shape)} is not one float scale per "
                         f"{block[0]}x{block[1]} block of a ({R}, {C}) weight {grid}")
    if not bool(torch.isfinite(scale).all()):
        raise ValueError(f"{name}: weight_scale holds non-finite values (NaN or inf)")
    if scale.numel() and scale.min() < 0:  # a block's sign flipped: no quantizer writes one
        raise ValueError(f"{name}: weight_scale holds negative values")
    return scale.reshape(grid)


__all__ = ["CODES", "decode_fp8", "fits", "held_fp8", "scale_grid", "tiles_in_blocks"]
