"""LogFMT-nBit (ISCA 2025 "Insights into DeepSeek-V3", section on low-precision communication).

Per 1x128 tile: take log2 of the magnitudes, find the tile's min and max over nonzero elements,
and place 2^(n-1) - 1 levels uniformly in log space between them. A code is a sign bit plus
n-1 magnitude bits; magnitude code 0 is exact zero, codes 1..2^(n-1)-1 are the levels
``2^(min + (c - 1) * step)`` with ``step = (max - min) / (2^(n-1) - 2)``. Rounding picks the
nearer of the two neighbouring levels in *linear* space (not log space), which is unbiased for
the values being summed downstream. As in the paper, min is clamped to at least max - 32
(a dynamic range of 2^32, like E5M2's), so a value far below the tile's top may round to zero.

Evaluated (not deployed) as a communication format: at 8 bits it is more accurate than E4M3
and E5M2, at 10 bits close to BF16.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from flyer.fp8.quant import TILE, pad_cols


class LogFMT(NamedTuple):
    """codes (R, Cp) int16: sign * magnitude code (0 = zero); log_min, step (R, Cp/128) float32
    per tile (log2 units); cols: the unpadded C; bits: n."""

    codes: torch.Tensor
    log_min: torch.Tensor
    step: torch.Tensor
    cols: int
    bits: int


def logfmt_encode(x: torch.Tensor, bits: int = 8, max_log2_range: float = 32.0) -> LogFMT:
    """Encode a 2-D tensor ``x (R, C)`` per 1x128 tile with ``bits`` bits per element (3..16)."""
    if not 3 <= bits <= 16:
        raise ValueError(f"bits must be in [3, 16], got {bits}")
    R, C = x.shape
    tiles = pad_cols(x.float()).view(R, -1, TILE)
    mag = tiles.abs()
    nonzero = mag > 0
    log_mag = torch.where(nonzero, torch.log2(torch.where(nonzero, mag, 1.0)), 0.0)
    log_max = torch.where(nonzero, log_mag, -torch.inf).amax(dim=-1)  # -inf for all-zero tiles
    log_min = torch.where(nonzero, log_mag, torch.inf).amin(dim=-1)
    empty = ~torch.isfinite(log_max)
    log_max = torch.where(empty, 0.0, log_max)
    log_min = torch.where(empty, 0.0, torch.maximum(log_min, log_max - max_log2_range))
    levels = 2 ** (bits - 1) - 1  # magnitude codes 1..levels
    step = (log_max - log_min) / (levels - 1)
    step = torch.where(step > 0, step, torch.ones_like(step))  # one distinct magnitude: code 1 = 2^min
    # neighbouring levels below/above each value, then the nearer one in linear space
    t = (log_mag - log_min.unsqueeze(-1)) / step.unsqueeze(-1)
    lo = torch.floor(t).clamp(-1, levels - 1)  # -1: below the lowest level (its lower neighbour is zero)
    hi = (lo + 1).clamp(max=levels - 1)
    v_lo = torch.where(lo >= 0, torch.exp2(log_min.unsqueeze(-1) + lo * step.unsqueeze(-1)), 0.0)
    v_hi = torch.exp2(log_min.unsqueeze(-1) + hi * step.unsqueeze(-1))
    pick_hi = (v_hi - mag) < (mag - v_lo)
    code = torch.where(pick_hi, hi, lo) + 1  # 0 = zero
    code = torch.where(nonzero, code, 0.0).to(torch.int16)
    codes = torch.where(tiles < 0, -code, code).view(R, -1)
    return LogFMT(codes, log_min, step, C, bits)


def logfmt_decode(enc: LogFMT) -> torch.Tensor:
    """(R, C) float32 from ``logfmt_encode``'s output."""
    R = enc.codes.shape[0]
    c = enc.codes.view(R, -1, TILE)
    mag_code = c.abs().float()
    mag = torch.exp2(enc.log_min.unsqueeze(-1) + (mag_code - 1) * enc.step.unsqueeze(-1))
    out = torch.where(mag_code > 0, mag, 0.0) * torch.sign(c.float())
    return out.view(R, -1)[:, : enc.cols]


def logfmt_roundtrip(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Encode and decode (float32, same shape as the 2-D ``x``)."""
    return logfmt_decode(logfmt_encode(x, bits))


__all__ = ["LogFMT", "logfmt_encode", "logfmt_decode", "logfmt_roundtrip"]
