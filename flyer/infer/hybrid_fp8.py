"""DeepSeek-V4's FP8 KV rows (``--cache-dtype fp8`` for attn "hybrid"; ``flyer.infer.hybrid_cache.HybridCache``
holds them): the sliding window's keys (k = v) and the compressed CSA / HCA entries, per token or entry a row of
``row_bytes(d, R)`` bytes (V4: head_dim d = 512, rope R = 64: 584 bytes against BF16's 1,024):

    [ d - R float8_e4m3fn codes of the NoPE channels | R BF16 rope values | one UE8M0 scale byte per 64 codes,
      zero padded to a multiple of 8 ]

What DeepSeek's released V4 inference code does (``inference/model.py``, read in the vendored copies
github:Nicooo-Wang/DeepSeek-V4-Pro-code 20746603 and github:patrickbdevaney/deepseek-v4-flash-0731-cuda 4b162fa5,
``train/_model/model.py``): ``Attention.forward`` runs ``act_quant(kv[..., :-rd], 64, scale_fmt, scale_dtype,
inplace=True)`` on the window key before it is attended to and cached, and ``Compressor.forward`` the same on
each compressed entry ("FP8-simulate non-rope dims to match QAT; rope dims stay bf16"): the NoPE channels in
tiles of 64, each an E4M3 code times a power-of-two scale (config ``scale_fmt: "ue8m0"``, ``scale_dtype``
float8_e8m0fnu), the rope channels BF16. The released code keeps the round-tripped values in a BF16 buffer ("kv
could also use fp8 format, though current implementation uses bf16"); FlashMLA's V4 sparse layout
(github:deepseek-ai/FlashMLA 9241ae3, ``tests/quant.py`` ``FP8KVCacheLayout.MODEL1_FP8Sparse``: d 512, 448 NoPE,
64 rope, tile 64, 7 tiles) stores exactly those bytes: per token 448 E4M3 codes, 64 BF16 rope values and 7
float8_e8m0fnu scales plus one pad byte, 584 bytes. FlashMLA puts a block's scale bytes after all its tokens'
codes and rope values (its kernel loads them apart); here each row carries its own 8 scale bytes, the same bytes
per token, so a window slot, an entry and a block are addressed as the BF16 cache's are. vLLM's DeepSeek-V4 support
(``DeepseekV4MLAAttention``, read through the code index) serves V4 only with this FlashMLA cache ("fp8_ds_mla",
576-byte aligned blocks) and its own FP8 indexer cache; the released code comes first here.

The scale rule is the release's ``act_quant`` (``kernel.py``): max(amax, 1e-4) / 448 rounded up to a power of two
(``cache_fp8.latent_scales(floor_on_amax=True)``, one scale per 64 channels), codes round-to-nearest-even.
FlashMLA's ``quantize_k_cache`` clamps amax / 448 at 1e-4 instead; the two differ only for tiles of amax below
0.0448 (released code followed: those tiles keep finer codes). Dequantization is exact (a code times a power of
two; the value fits BF16 as well), so a cached NoPE value is off from the written one by E4M3's rounding only: at
most 2^-4 |x| where x / scale is normal (>= 2^-6), 2^-10 scale below; the rope values are the BF16 cache's.

The new tokens' keys are attended to as the cache returns them (``round_trip``; ``HybridCache.stored_and_values``
packs them once for both), as the release quantizes ``kv`` in place before its attention: a key reads the same
from the current forward as from the cache, so a prompt prefilled in chunks decodes as one prefilled whole. The
compressors' FP32 partial states are not quantized.

The CSA indexer's keys are cached as the release leaves them, Hadamard-rotated and FP4 (``fp4_act_quant``,
32-value tiles, UE8M0 scales): 68-byte rows at V4's index_head_dim 128, and the indexer's queries rotated and
FP4-rounded the same way before scoring (``flyer.infer.hybrid_index_fp4``, which lays the rows out). A BF16 cache
keeps transformers' indexer (no rotation, no FP4: ``flyer.model.hybrid.Indexer``). ``flyer info dsv4-flash``
prints "KV cache / token   3,514.25 bytes (--cache-dtype fp8: ...)" (``kv_cache_bytes_per_token_fp8``; BF16: 6,880;
4,501.25 when the index keys stayed BF16).

The on-disk prefix cache (``flyer.infer.prefix_cache_hybrid``) stores the rows as they are (uint8), keyed by the
cache dtype and ``ROWS_LAYOUT``: a BF16 run never finds FP8 entries, and a restored row is the written one bit for
bit.

Shapes: N rows (any leading dims), d head_dim, R rope channels, n = ceil((d - R) / 64) scale tiles.
"""

from __future__ import annotations

import torch

from flyer.infer.cache_fp8 import dequantize_latent, n_tiles, quantize_latent
from flyer.model.counts import V4_FP8_TILE, v4_fp8_row_bytes, v4_fp8_scale_bytes

FP8 = torch.float8_e4m3fn
TILE = V4_FP8_TILE  # NoPE channels per scale (the release's act_quant block size for the KV)
E8M0 = torch.float8_e8m0fnu  # a scale byte e is 2^(e - 127)
# what an FP8 hybrid cache's prefix-cache entries hold: a change to the layout or the scale rule must make them miss
ROWS_LAYOUT = ("v4_fp8: e4m3 nope | bf16 rope | ue8m0 scale byte per 64 (act_quant: max(amax,1e-4)/448 up to 2^k), "
               "padded to 8; index keys hadamard-rotated e2m1 two per byte low nibble first | ue8m0 byte per 32 "
               "(fp4_act_quant: max(amax,6*2^-126)/6 up to 2^k)")
row_bytes = v4_fp8_row_bytes  # (d, R) -> bytes of one row; the byte counts live with the model's other counts


def pack_rows(x_Nd: torch.Tensor, R: int) -> torch.Tensor:
    """(..., row_bytes(d, R)) uint8: keys (..., d) (any float dtype; layout [nope | rope]) as V4's FP8 rows."""
    d = x_Nd.shape[-1]
    codes, scales = quantize_latent(x_Nd[..., :d - R], floor_on_amax=True, tile=TILE)  # scales: powers of two
    exps = scales.to(E8M0).view(torch.uint8)  # exact: the scales are powers of two
    pad = exps.new_zeros(*exps.shape[:-1], v4_fp8_scale_bytes(d, R) - exps.shape[-1])
    return torch.cat([codes.view(torch.uint8), x_Nd[..., d - R:].to(torch.bfloat16).contiguous().view(torch.uint8),
                      exps, pad], dim=-1)


def unpack_rows(raw_NW: torch.Tensor, d: int, R: int, dtype: torch.dtype) -> torch.Tensor:
    """(..., d) in ``dtype``: the values of V4 FP8 rows (..., row_bytes(d, R)) uint8, each code times its tile's
    scale (exact) then the rope values."""
    raw = raw_NW if raw_NW.stride(-1) == 1 and raw_NW.storage_offset() % 2 == 0 else raw_NW.contiguous()
    C, n = d - R, n_tiles(d - R, TILE)
    scales = raw[..., d + R:d + R + n].view(E8M0).float()
    out = torch.empty(*raw.shape[:-1], d, dtype=dtype, device=raw.device)
    out[..., :C] = dequantize_latent(raw[..., :C].view(FP8), scales, dtype, tile=TILE)
    out[..., C:] = raw[..., C:C + 2 * R].view(torch.bfloat16)
    return out


def round_trip(x_Nd: torch.Tensor, R: int) -> torch.Tensor:
    """x (..., d) as the cache gives it back (pack then unpack), in x's dtype: what the release attends to."""
    return unpack_rows(pack_rows(x_Nd, R), x_Nd.shape[-1], R, x_Nd.dtype)
