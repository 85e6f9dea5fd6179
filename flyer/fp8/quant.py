"""Fine-grained FP8 quantisation (DeepSeek-V3 report, section 3.3.2).

Two granularities, both along the GEMM reduction dimension K (the last dimension):

* **tile** (1x128): one scale per row and per 128 consecutive channels. Activations and
  activation gradients. ``x (R, C)`` gives ``data (R, Cp)`` and ``scale (R, Cp/128)``.
* **block** (128x128): one scale per 128x128 block. Weights. ``w (R, C)`` gives
  ``data (R, Cp)`` and ``scale (ceil(R/128), Cp/128)``.

``Cp`` is C rounded up to a multiple of 128; the padding is zeros, which add nothing to a GEMM
along K, so any C is accepted. Rows are not padded (a block scale covers the last, partial
block of rows). The online scale of a tile is ``amax / fp8_max`` (448 for E4M3, 57344 for
E5M2), optionally rounded up to a power of two (UE8M0, what Blackwell's MX formats store), and
capped so that ``fp8_max * scale`` stays finite in FP32;
``x ~= data.float() * scale``. The cast saturates: values are clamped to +-fp8_max before
conversion, and an all-zero tile gets scale 1 (with no amax floor: gradients) or floor / fp8_max (activations and
weights, floor 1e-4), so no finite input yields NaN or Inf.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from flyer import kernels
from flyer.kernels import fp8_to_float

TILE = 128  # N_C: tile width, block size and promotion interval along K

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


class Quantized(NamedTuple):
    """An FP8 tensor with its FP32 scales; unpacks as the (tensor, scales) pair a GEMM takes.

    data: (R, Cp) float8, C zero-padded to a multiple of 128.
    scale: (R, Cp/128) for 1x128 tiles or (ceil(R/128), Cp/128) for 128x128 blocks, float32.
    cols: the unpadded C.
    """

    data: torch.Tensor
    scale: torch.Tensor
    cols: int

    @property
    def block_rows(self) -> int:
        """Rows covered by one scale: 1 (tiles) or 128 (blocks)."""
        return block_rows(self.data, self.scale)

    def dequantize(self) -> torch.Tensor:
        """(R, C) float32: every element times its tile's scale (exact: FP8 x FP32-scale)."""
        return dequantize(self.data, self.scale)[:, : self.cols]


def resolve_fp8_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in FP8_DTYPES:
            raise ValueError(f"fp8 format '{dtype}' not supported (choose from: {', '.join(FP8_DTYPES)})")
        return FP8_DTYPES[dtype]
    if dtype not in FP8_MAX:
        raise ValueError(f"fp8 dtype {dtype} not supported (choose from: {', '.join(map(str, FP8_MAX))})")
    return dtype


def pad_cols(x: torch.Tensor, multiple: int = TILE) -> torch.Tensor:
    """Zero-pad the last dimension up to a multiple of ``multiple``."""
    pad = -x.shape[-1] % multiple
    return F.pad(x, (0, pad)) if pad else x


def ceil_pow2(x: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= x, for x > 0 (UE8M0 scales). Exact: uses frexp, not log2."""
    mantissa, exponent = torch.frexp(x)  # x = mantissa * 2**exponent, mantissa in [0.5, 1)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return torch.ldexp(torch.ones_like(x), exponent)


# DeepSeek's quantizers floor a tile's or block's amax at 1e-4 before scaling (DeepSeek-V3's inference/kernel.py
# act_quant, DeepGEMM's per_token_cast_to_fp8 and per_block_cast_to_fp8): their codes and scales, bit for bit.
# Gradients are quantized without it: their tiles are often smaller, and no published quantizer sets theirs.
AMAX_FLOOR = 1e-4


def amax_to_scale(amax: torch.Tensor, fp8_dtype: torch.dtype, pow2: bool, floor: float = AMAX_FLOOR) -> torch.Tensor:
    """scale = max(amax, floor) / fp8_max (float32); with ``floor`` 0, all-zero (or underflowing) tiles get
    scale 1."""
    scale = amax.float().clamp(min=floor) / FP8_MAX[fp8_dtype]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if pow2:
        scale = ceil_pow2(scale)
    # near float32's max, fp8_max * scale would overflow on dequantisation: cap the scale (the
    # top values of such a tile saturate instead)
    return scale.clamp(max=_max_scale(fp8_dtype, pow2))


@functools.lru_cache(maxsize=None)
def _max_scale(fp8_dtype: torch.dtype, pow2: bool) -> float:
    cap = torch.finfo(torch.float32).max / FP8_MAX[fp8_dtype]
    return 2.0 ** math.floor(math.log2(cap)) if pow2 else float(torch.nextafter(torch.tensor(cap), torch.tensor(0.0)))


def _absmax(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """max |t| over ``dims`` as max(max t, -min t): two reductions, no |t| temporary (faster on CPU)."""
    return torch.maximum(t.amax(dim=dims), -t.amin(dim=dims))


def _cast(x_scaled: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    fmax = FP8_MAX[fp8_dtype]
    return x_scaled.clamp_(-fmax, fmax).to(fp8_dtype)  # saturate: E4M3 has no Inf, E5M2 would overflow


def quantize_tiles(x: torch.Tensor, fp8_dtype: torch.dtype | str = torch.float8_e4m3fn,
                   pow2_scales: bool = False, amax_floor: float = AMAX_FLOOR) -> Quantized:
    """1x128 tiles of a 2-D tensor ``x (R, C)`` (any float dtype): per row, per 128 channels."""
    fp8_dtype = resolve_fp8_dtype(fp8_dtype)
    R, C = x.shape
    xp = pad_cols(x.float()).contiguous()  # tiles of a transposed input: reduce over contiguous memory
    tiles = xp.view(R, xp.shape[1] // TILE, TILE)  # explicit sizes: R may be 0
    scale = amax_to_scale(_absmax(tiles, (-1,)), fp8_dtype, pow2_scales, amax_floor)  # (R, Cp/128)
    data = _cast(tiles / scale.unsqueeze(-1), fp8_dtype).view(R, xp.shape[1])
    return Quantized(data, scale, C)


def quantize_tiles_t(x: torch.Tensor, fp8_dtype: torch.dtype | str = torch.float8_e4m3fn,
                     pow2_scales: bool = False, amax_floor: float = AMAX_FLOOR) -> Quantized:
    """``quantize_tiles(x.t())`` bit for bit (1x128 tiles of x's transpose: 128x1 tiles of x, the
    wgrad operands), without transposing x in FP32: each column's 128-row blocks are reduced and
    cast in place and only the one-byte codes are transposed, a quarter of the traffic."""
    fp8_dtype = resolve_fp8_dtype(fp8_dtype)
    R, C = x.shape
    xf = x.float()
    rpad = -R % TILE
    blocks = (F.pad(xf, (0, 0, 0, rpad)) if rpad else xf).view(-1, TILE, C)  # (Rb, 128, C)
    scale = amax_to_scale(_absmax(blocks, (1,)), fp8_dtype, pow2_scales, amax_floor)  # (Rb, C)
    data = _cast(blocks / scale.unsqueeze(1), fp8_dtype).view(-1, C)  # (Rp, C)
    return Quantized(data.view(torch.uint8).t().contiguous().view(fp8_dtype), scale.t().contiguous(), R)


def quantize_blocks(w: torch.Tensor, fp8_dtype: torch.dtype | str = torch.float8_e4m3fn,
                    pow2_scales: bool = False, amax_floor: float = AMAX_FLOOR) -> Quantized:
    """128x128 blocks of a 2-D tensor ``w (R, C)``; a partial last block of rows is allowed."""
    fp8_dtype = resolve_fp8_dtype(fp8_dtype)
    R, C = w.shape
    wp = pad_cols(w.float())
    rpad = -R % TILE
    wb = F.pad(wp, (0, 0, 0, rpad)) if rpad else wp
    blocks = wb.view(wb.shape[0] // TILE, TILE, -1, TILE)  # (Rb, 128, Cb, 128)
    scale = amax_to_scale(_absmax(blocks, (1, 3)), fp8_dtype, pow2_scales, amax_floor)  # (Rb, Cb)
    data = _cast(blocks / scale[:, None, :, None], fp8_dtype).view(wb.shape)[:R]
    return Quantized(data, scale, C)


def quantize_blocks_batched(w_ERC: torch.Tensor, fp8_dtype: torch.dtype | str = torch.float8_e4m3fn,
                            pow2_scales: bool = False, amax_floor: float = AMAX_FLOOR
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """128x128 blocks of a stack of matrices ``w (E, R, C)`` in one pass (grouped expert weights).

    Returns data (E, R, Cp) float8 and scale (E, ceil(R/128), Cp/128) float32; expert e's pair
    equals ``quantize_blocks(w[e])``.
    """
    fp8_dtype = resolve_fp8_dtype(fp8_dtype)
    E, R, C = w_ERC.shape
    wp = pad_cols(w_ERC.float())
    rpad = -R % TILE
    wb = F.pad(wp, (0, 0, 0, rpad)) if rpad else wp
    blocks = wb.view(E, wb.shape[1] // TILE, TILE, -1, TILE)
    scale = amax_to_scale(_absmax(blocks, (2, 4)), fp8_dtype, pow2_scales, amax_floor)
    data = _cast(blocks / scale[:, :, None, :, None], fp8_dtype).view(wb.shape)[:, :R]
    return data, scale


def block_rows(data: torch.Tensor, scale: torch.Tensor) -> int:
    """1 when ``scale`` has one row per data row (tiles), else 128 (blocks)."""
    return 1 if scale.shape[0] == data.shape[0] else TILE


def expand_scale(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-row scales (R, Kb) for either granularity (block scales repeated over their rows)."""
    if block_rows(data, scale) == 1:
        return scale
    return scale.repeat_interleave(TILE, dim=0)[: data.shape[0]]


def dequantize(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(R, Cp) float32 from a (tensor, scales) pair of either granularity."""
    return kernels.fp8_dequantize(data, scale, block_rows(data, scale))


def dequantize_blocks_batched(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(E, R, Cp) float32 from ``quantize_blocks_batched``'s (data, scale)."""
    E, R, Cp = data.shape
    if R % TILE == 0:  # whole blocks of rows: the stack is one tall matrix of blocks
        return kernels.fp8_dequantize(data.reshape(E * R, Cp), scale.reshape(-1, scale.shape[-1]), TILE).view(E, R, Cp)
    s = scale.repeat_interleave(TILE, dim=1)[:, :R]  # (E, R, Cp/128)
    return (fp8_to_float(data).view(E, R, Cp // TILE, TILE) * s.unsqueeze(-1)).view(E, R, Cp)


def fake_quantize(x: torch.Tensor, granularity: str = "tile", fp8_dtype: torch.dtype | str = torch.float8_e4m3fn,
                  pow2_scales: bool = False) -> torch.Tensor:
    """Quantise and dequantise a 2-D tensor (float32, same shape): what the GEMM sees."""
    if granularity not in ("tile", "block"):
        raise ValueError(f"granularity '{granularity}' not supported (choose from: tile, block)")
    q = (quantize_tiles if granularity == "tile" else quantize_blocks)(x, fp8_dtype, pow2_scales)
    return q.dequantize()


__all__ = ["TILE", "FP8_DTYPES", "FP8_MAX", "Quantized", "resolve_fp8_dtype", "pad_cols", "ceil_pow2", "AMAX_FLOOR",
           "amax_to_scale", "quantize_tiles", "quantize_tiles_t", "quantize_blocks", "quantize_blocks_batched",
           "block_rows", "expand_scale", "fp8_to_float", "dequantize", "dequantize_blocks_batched", "fake_quantize"]
