"""DeepSeek-V4's CSA indexer keys at the release's precision: what ``--cache-dtype fp8`` caches and scores with.

Each CSA layer's indexer keeps one key per compressed entry (``index_head_dim`` di channels, the indexer's own
compressor's output after its norm and RoPE). DeepSeek's released V4 inference code (``inference/model.py``, read
in the vendored copies github:Nicooo-Wang/DeepSeek-V4-Pro-code 20746603 and
github:patrickbdevaney/deepseek-v4-flash-0731-cuda 4b162fa5, ``train/_model/model.py``; the kernels in
``kernel.py`` / ``kernel_tilelang.py``) treats keys and queries alike:

    kv = rotate_activation(kv); fp4_act_quant(kv, 32, True)     # Compressor(rotate=True), after norm and RoPE
    q = rotate_activation(q);   fp4_act_quant(q, 32, True)      # Indexer.forward, after RoPE, per head
    weights = weights_proj(x) * (di^-0.5 * H^-0.5)
    score[t, s] = sum_h weights[t, h] relu(q[t, h] . kv[s])

``rotate_activation`` is the normalized Walsh-Hadamard transform of all di channels in Sylvester's order
(``indexer_fp8.hadamard``: V4's RoPE pairs are interleaved as flyer's, so the checkpoint's channel order is
flyer's), returned in the input's dtype. ``fp4_act_quant`` cuts each vector into tiles of 32 channels; a tile's
scale is 2^ceil(log2(max(amax, 6 2^-126) / 6)) (``fast_round_scale``: a float8_e8m0fnu byte), each value becomes
the E2M1 code nearest x / scale (clamped to +-6, ties to even: the hardware cast), and the in-place form writes
code times scale back, exact in BF16. The release keeps those values in a BF16 buffer ("kv could also use fp8
format, though current implementation uses bf16"); the FP4 codes and scale bytes hold them exactly, so the cache
stores those (vLLM's DeepseekV4IndexerCache with its MXFP4 option keeps the same bytes per key, a block's codes
then its scales). One row per key, ``row_bytes(di)`` bytes (V4: 68 against BF16's 256):

    [ di / 2 bytes: E2M1 codes, channel 2j in the low nibble, 2j + 1 in the high (``float4_e2m1fn_x2``'s order)
      | di / 32 UE8M0 scale bytes, tile t's 2^(byte - 127) ]

The queries are rotated and FP4-rounded the same way before scoring (``round_trip``; they are not cached). The
scores are flyer's indexer's FP32 formula (``flyer.model.hybrid.Indexer.scores``) on those values: each q . k
sums products of two E2M1 values (exact) times power-of-two scales, so only the FP32 sums round. The release
scores in BF16 (its einsum's output, the weights and the head sum); FP32 keeps near ties ordered as
DeepSeek's V3.2 ``fp8_index`` kernel and flyer's BF16 path do. On the CPU a decode step scores the rows where they
lie (``flyer.kernels.index_scores_fp4``, through ``HybridCache.index_scores``: each row decoded to these values as it
is read, bit for bit ``unpack_rows``'s); ``unpack_rows`` then ``Indexer.scores`` is its oracle and the path of other
devices. BF16 caches keep transformers' indexer (no rotation, no FP4). The codec is FP4 QAT's (``flyer.fp8.fp4``),
with the release's floor on amax: an all-zero tile gets scale 2^-126 (byte 1), where a weight's gets 1.

Shapes: N keys (any leading dims), di index_head_dim (a power of two, a multiple of 32).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from flyer.fp8.fp4 import E2M1_MAX, E2M1_VALUES, UE8M0_BIAS, ceil_log2, e2m1_codes, e2m1_decode, pack_e2m1
from flyer.infer.indexer_fp8 import hadamard, rotate
from flyer.model.counts import V4_INDEX_FP4_TILE, v4_index_fp4_row_bytes

TILE = V4_INDEX_FP4_TILE  # channels per UE8M0 scale: the release's fp4_block_size
AMAX_FLOOR = 6 * 2.0**-126  # fp4_act_quant's floor on a tile's amax: its smallest scale is 2^-126
row_bytes = v4_index_fp4_row_bytes  # (di) -> bytes of one row; the byte counts live with the model's other counts
rotation = hadamard  # (di, device) -> (di, di) FP32: ``x @ rotation(di)`` is the release's rotate_activation
# FP32 tables for reading rows: a code byte's two values (low nibble first) and a UE8M0 byte's scale 2^(byte - 127)
# (ldexp, as e2m1_decode scales). One look-up per byte (index_select) instead of splitting nibbles and a long index
# per code: off the CPU kernel the indexer reads every key each decode step; the same products come out bit for bit.
BYTE_VALUES = torch.stack([E2M1_VALUES[torch.arange(256) & 15], E2M1_VALUES[torch.arange(256) >> 4]], dim=-1)
SCALES = torch.ldexp(torch.ones(256), torch.arange(256, dtype=torch.int32) - UE8M0_BIAS)


@lru_cache(maxsize=None)
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``BYTE_VALUES`` and ``SCALES`` on ``device``, copied there once (not per decode step)."""
    return BYTE_VALUES.to(device), SCALES.to(device)


def quantize(x_Nd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's ``fp4_act_quant(x, 32)`` of x (..., di) (any float dtype): (E2M1 codes (..., di) uint8 0..15,
    scale exponents (..., di / 32) int32, scale 2^e)."""
    tiles = x_Nd.float().unflatten(-1, (-1, TILE))
    exps = ceil_log2(tiles.abs().amax(-1).clamp(min=AMAX_FLOOR) / E2M1_MAX)
    return e2m1_codes(tiles, exps).flatten(-2), exps


def pack_rows(k_Nd: torch.Tensor, rot_dd: torch.Tensor) -> torch.Tensor:
    """(..., row_bytes(di)) uint8: index keys k (..., di), as the indexer's compressor gives them, rotated
    (``rotation``; in k's dtype, as rotate_activation returns) and FP4-quantized into rows (module docstring)."""
    codes, exps = quantize(rotate(k_Nd, rot_dd))
    return torch.cat([pack_e2m1(codes), (exps + UE8M0_BIAS).to(torch.uint8)], dim=-1)


def unpack_rows(raw_NW: torch.Tensor, di: int, dtype: torch.dtype) -> torch.Tensor:
    """(..., di) in ``dtype``: the values of FP4 index rows (..., row_bytes(di)) uint8, each code times its tile's
    scale (exact in FP32 and BF16): the rotated keys as the release's fp4_act_quant leaves them."""
    lead, dev = raw_NW.shape[:-1], raw_NW.device
    codes, exps = raw_NW[..., :di // 2].reshape(-1), raw_NW[..., di // 2:di // 2 + di // TILE].reshape(-1)
    byte_values, byte_scales = _tables(dev)
    values = byte_values.index_select(0, codes.int()).view(*lead, di // TILE, TILE)
    scales = byte_scales.index_select(0, exps.int()).view(*lead, di // TILE, 1)
    return values.mul_(scales).flatten(-2).to(dtype)


def round_trip(x_Nd: torch.Tensor, rot_dd: torch.Tensor) -> torch.Tensor:
    """x (..., di) rotated and FP4-rounded (pack then unpack, without the bytes), in x's dtype: the release's
    ``fp4_act_quant(rotate_activation(x), 32, True)``; what the queries are scored as."""
    codes, exps = quantize(rotate(x_Nd, rot_dd))
    return e2m1_decode(codes.unflatten(-1, (-1, TILE)), exps).flatten(-2).to(x_Nd.dtype)
