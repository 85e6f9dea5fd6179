"""Wire formats for token rows moved between ranks.

FP8 dispatch (DeepSeek-V3 / DeepEP): each row of D channels travels as E4M3 values with one FP32
scale per 128 channels (scale = max(amax, 1e-4) / 448, as DeepEP's), packed into one uint8 row of
``D + 4 * ceil(D/128)`` bytes, because collectives (gloo in particular) do not take float8 tensors.
"""

from __future__ import annotations

import torch

from flyer.fp8.quant import TILE, dequantize, pad_cols, quantize_tiles

FP8_DTYPE = torch.float8_e4m3fn


def fp8_row_bytes(dim: int) -> int:
    """Bytes of one packed FP8 row: 1 per element plus a 4-byte scale per 128 channels."""
    return dim + 4 * -(-dim // TILE)


def fp8_encode_rows(x_ND: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """(N, D) float -> (N, fp8_row_bytes(D)) uint8: E4M3 payload (1x128 tiles, as the FP8 recipe
    quantises activations), then the FP32 tile scales (``pow2``: powers of two, the report's for this activation,
    which FP8 experts with power-of-two scales take without a second rounding)."""
    D = x_ND.shape[1]
    q = quantize_tiles(x_ND, FP8_DTYPE, pow2)
    return torch.cat([q.data[:, :D].view(torch.uint8), q.scale.contiguous().view(torch.uint8)], dim=1)


def fp8_decode_rows(b_NB: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``fp8_encode_rows``: (N, bytes) uint8 -> (N, dim) ``dtype``."""
    data = pad_cols(b_NB[:, :dim].contiguous().view(FP8_DTYPE).view(torch.uint8)).view(FP8_DTYPE)
    scale = b_NB[:, dim:].contiguous().view(torch.float32)
    return dequantize(data, scale)[:, :dim].to(dtype)


def fp8_round_trip(x_ND: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """What the receiver of an FP8 row sees (no autograd)."""
    return fp8_decode_rows(fp8_encode_rows(x_ND, pow2), x_ND.shape[1], x_ND.dtype)


class RoundGrad(torch.autograd.Function):
    """Identity forward; backward rounds the gradient through ``dtype`` (a wire emulation)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ctx.dtype = dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g.to(ctx.dtype).to(g.dtype), None


class FakeFp8Rows(torch.autograd.Function):
    """FP8 round trip of rows with a straight-through gradient (the single-process twin of FP8
    dispatch, whose backward, a sum of the copies' gradients, moves them in the combine dtype, not in FP8)."""

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, pow2: bool = False) -> torch.Tensor:
        return fp8_round_trip(x_ND, pow2)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, None


class Fp8RoundGrad(torch.autograd.Function):
    """Identity forward; backward rounds each gradient row through the FP8 wire (1x128 E4M3 tiles): the
    single-process twin of combine's backward under FP8 dispatch, which sends each token's output gradient to its
    experts as dispatch sends its input (DeepSeek-V3 report, section 3.3.2: the activation gradient before the MoE
    down-projections)."""

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, pow2: bool = False) -> torch.Tensor:
        ctx.pow2 = pow2
        return x_ND.view_as(x_ND)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return fp8_round_trip(g, ctx.pow2), None

