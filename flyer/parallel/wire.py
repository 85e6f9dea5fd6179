"""Wire formats for token rows moved between ranks.

FP8 dispatch (DeepSeek-V3 / DeepEP): each row of D channels travels as E4M3 values with one FP32
scale per 128 channels (scale = amax / 448), packed into one uint8 row of ``D + 4 * ceil(D/128)``
bytes, because collectives (gloo in particular) do not take float8 tensors.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
CHANNEL_BLOCK = 128


def fp8_row_bytes(dim: int) -> int:
    """Bytes of one packed FP8 row: 1 per element plus a 4-byte scale per 128 channels."""
    return dim + 4 * -(-dim // CHANNEL_BLOCK)


def fp8_encode_rows(x_ND: torch.Tensor) -> torch.Tensor:
    """(N, D) float -> (N, fp8_row_bytes(D)) uint8: E4M3 payload, then the FP32 block scales."""
    N, D = x_ND.shape
    nb = -(-D // CHANNEL_BLOCK)
    x = x_ND.float()
    if D % CHANNEL_BLOCK:
        x = torch.nn.functional.pad(x, (0, nb * CHANNEL_BLOCK - D))
    xb = x.view(N, nb, CHANNEL_BLOCK)
    scale_NB = xb.abs().amax(-1).clamp(min=1e-12) / FP8_MAX
    q = (xb / scale_NB.unsqueeze(-1)).to(FP8_DTYPE).view(N, nb * CHANNEL_BLOCK)[:, :D]
    return torch.cat([q.view(torch.uint8), scale_NB.contiguous().view(torch.uint8)], dim=1)


def fp8_decode_rows(b_NB: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``fp8_encode_rows``: (N, bytes) uint8 -> (N, dim) ``dtype``."""
    N = b_NB.shape[0]
    nb = -(-dim // CHANNEL_BLOCK)
    q = b_NB[:, :dim].contiguous().view(FP8_DTYPE).float()
    scale_NB = b_NB[:, dim:].contiguous().view(torch.float32)
    if dim % CHANNEL_BLOCK:
        q = torch.nn.functional.pad(q, (0, nb * CHANNEL_BLOCK - dim))
    x = (q.view(N, nb, CHANNEL_BLOCK) * scale_NB.view(N, nb, 1)).view(N, nb * CHANNEL_BLOCK)[:, :dim]
    return x.to(dtype)


def fp8_round_trip(x_ND: torch.Tensor) -> torch.Tensor:
    """What the receiver of an FP8 row sees (no autograd)."""
    return fp8_decode_rows(fp8_encode_rows(x_ND), x_ND.shape[1], x_ND.dtype)


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
    dispatch, whose backward moves gradients in the combine dtype, not in FP8)."""

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor) -> torch.Tensor:
        return fp8_round_trip(x_ND)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g
