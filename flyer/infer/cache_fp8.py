"""The FP8 latent-cache format of MLA (``--cache-dtype fp8``; ``flyer.infer.cache.Fp8LatentCache`` holds it),
in DeepSeek's own per-token layout.

Per token and layer a row of ``token_bytes(C, R)`` bytes (V3: C = kv_lora_rank = 512, R = qk_rope_head_dim = 64:
656 bytes, against BF16's 1,152):

    [ C float8_e4m3fn codes of the latent c_KV | ceil(C/128) FP32 scales, one per 128 codes | R BF16 rope-key values ]

the layout of FlashMLA's FP8 KV cache ("FP8 with scale", vLLM's "fp8_ds_mla"; FlashMLA README "FP8 KV Cache" and
``flash_mla/flash_mla_interface.py``: first 512 bytes the quantized NoPE part, then 4 float32 scales, the first
for the first 128 values, then 64 bfloat16 RoPE values, not quantized "for accuracy"). Read at
github:deepseek-ai/FlashMLA 9241ae3.

The scale rule is DeepSeek's released code's: FlashMLA ``tests/quant.py`` ``quantize_k_cache`` (the cache's
reference quantizer) takes a tile's scale as amax / 448 (E4M3's largest finite value), clamped below at 1e-4 and
rounded UP to a power of two (UE8M0: ``2^ceil(log2(.))``), and stores codes = round_to_nearest_even(x / scale).
DeepSeek-V3.2-Exp's ``inference/kernel.py`` ``act_quant`` with ``scale_fmt: "ue8m0"`` (its released config;
the indexer's FP8 keys and queries, ``flyer.infer.indexer_fp8``) rounds its scales the same way but clamps amax,
not amax / 448, at 1e-4 (``floor_on_amax``): a tile of amax below 0.0448 gets a smaller scale there (finer codes);
its amax * (1/448) in FP32 rounds up to the same power of two as amax / 448 does. Sources that use plain amax / 448
scales (vLLM's per-tensor FP8 caches) are not followed. A power-of-two scale makes dequantization exact: a code
times its scale is the stored value with no rounding, so a cached latent is off from the written one only by the
E4M3 rounding of x / scale: at most 2^-4 of |x| (3 mantissa bits, round to nearest) where x / scale is normal
(>= 2^-6), at most 2^-10 scale (half the subnormal step) below.

A tile is 128 channels; a latent whose width is not a multiple of 128 (the tiny test presets) has a shorter last
tile. The FP32 scales sit at byte offset C, so C must be a multiple of 4.

Absorbed decoding reads the rows in place: the fused CPU kernel (``kernels.mla_decode``) decodes each slot it
reads into its FP32 tile (a code times its tile's scale, the rope part widened from BF16), the values
``unpack_rows`` gives, and runs its BF16 cache's maths on them. Elsewhere (kernels off or not built, another
device, DSA's selected slots) the gathered rows are dequantized to the compute dtype (``unpack_rows``) before the
eager attention, the kernel's oracle. DSA's indexer keys (V3.2, GLM-5) are kept beside the latent rows as DeepSeek's
released inference code keeps them: Hadamard-rotated, E4M3 codes and one FP32 scale per key (132 bytes at
index_head_dim 128 against BF16's 256; ``flyer.infer.indexer_fp8``).

The on-disk prefix cache (``flyer.infer.prefix_cache``; ``flyer generate`` and ``flyer serve``'s disk tier) stores
an FP8 cache's rows as they are, no re-quantization: per token and layer the C codes (float8_e4m3fn), the scales
(FP32) and the R rope values (BF16), the cache's three views of a row, 656 bytes at V3's dims against 1,152 in
BF16, and with DSA the index keys' codes and scales as they are. Its entries are keyed
(``flyer.infer.generate.open_prefix_cache``'s fingerprint) by the cache dtype and by ``ROWS_LAYOUT``, this
module's row layout and scale rule (the index keys' too): an FP8 run never finds a BF16 run's entries (a miss, as
any other model or config's), and a restored row is the written one bit for bit.
"""

from __future__ import annotations

import math

import torch

from flyer.config import ModelConfig
from flyer.errors import FieldError

FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
TILE = 128  # latent channels per scale
SCALE_FLOOR = 1e-4  # amax / 448 is clamped below at this (FlashMLA's quantize_k_cache)
# what an FP8 cache's prefix-cache entries hold: a change to the layout or the scale rule must make them miss
ROWS_LAYOUT = ("fp8_ds_mla: codes e4m3 | fp32 ue8m0 scale per 128 | bf16 rope; "
               "dsa index keys: hadamard-rotated e4m3 + fp32 ue8m0 scale per key (act_quant)")


def n_tiles(C: int, tile: int = TILE) -> int:
    return math.ceil(C / tile)


def token_bytes(C: int, R: int) -> int:
    """Bytes of one token's latent row per layer: C codes, 4 per scale, 2 per BF16 rope value (V3: 656)."""
    return C + 4 * n_tiles(C) + 2 * R


def latent_scales(c_NC: torch.Tensor, floor_on_amax: bool = False, tile: int = TILE) -> torch.Tensor:
    """(..., ceil(C/tile)) FP32: each ``tile``-channel tile's scale, amax / 448 clamped at 1e-4 (``floor_on_amax``:
    max(amax, 1e-4) / 448, act_quant's rule) and rounded up to a power of two. The rounding is exact (frexp),
    where ``2^ceil(log2(.))`` in FP32 may misround near a power. ``tile``: 128 here, 64 in DeepSeek-V4's rows
    (``flyer.infer.hybrid_fp8``)."""
    C = c_NC.shape[-1]
    x = torch.nn.functional.pad(c_NC.float(), (0, n_tiles(C, tile) * tile - C))
    amax = x.unflatten(-1, (-1, tile)).abs().amax(-1)
    s = amax.clamp(min=SCALE_FLOOR) / E4M3_MAX if floor_on_amax else (amax / E4M3_MAX).clamp(min=SCALE_FLOOR)
    m, e = torch.frexp(s)  # s = m 2^e, m in [0.5, 1): a power of two exactly when m == 0.5
    return torch.ldexp(torch.ones_like(s), e - (m == 0.5).to(e.dtype))


def quantize_latent(c_NC: torch.Tensor, floor_on_amax: bool = False,
                    tile: int = TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (..., C) (any float dtype) to (codes (..., C) float8_e4m3fn, scales (..., ceil(C/tile)) FP32):
    codes = round_to_nearest_even(c / scale) of the tile's ``latent_scales``; |c / scale| <= 448."""
    scales = latent_scales(c_NC, floor_on_amax, tile)
    codes = (c_NC.float() / _per_channel(scales, c_NC.shape[-1], tile)).to(FP8)
    return codes, scales


def dequantize_latent(codes_NC: torch.Tensor, scales_Nn: torch.Tensor, dtype: torch.dtype,
                      tile: int = TILE) -> torch.Tensor:
    """(..., C) in ``dtype``: codes (float8_e4m3fn) times their tile's scale (exact in FP32: the scales are powers
    of two)."""
    C = codes_NC.shape[-1]
    x = _code_values(codes_NC.view(torch.uint8))
    if C % tile == 0:
        x.unflatten(-1, (-1, tile)).mul_(scales_Nn.unsqueeze(-1))
    else:
        x.mul_(_per_channel(scales_Nn, C, tile))
    return x.to(dtype)


E4M3_VALUES = torch.arange(256, dtype=torch.uint8).view(FP8).float()  # every code's value, by its byte


def _code_values(codes_u8: torch.Tensor) -> torch.Tensor:
    """(...) FP32 values of E4M3 codes given as their bytes. On the CPU PyTorch converts float8 one element at a
    time (17x slower than BF16 to FP32, measured on one thread); a look-up in the 256-entry table is exact and
    vectorized."""
    if codes_u8.device.type != "cpu":
        return codes_u8.view(FP8).float()
    return E4M3_VALUES.index_select(0, codes_u8.reshape(-1).int()).view(codes_u8.shape)


def code_values(codes: torch.Tensor) -> torch.Tensor:
    """(...) FP32 values of float8_e4m3fn ``codes`` (exact; on the CPU by ``_code_values``' table)."""
    return _code_values(codes.view(torch.uint8))


def _per_channel(scales_Nn: torch.Tensor, C: int, tile: int = TILE) -> torch.Tensor:
    """(..., C): each channel's tile scale."""
    return scales_Nn.repeat_interleave(tile, dim=-1)[..., :C]


def pack_rows(c_NC: torch.Tensor, k_rope_NR: torch.Tensor) -> torch.Tensor:
    """(..., token_bytes(C, R)) uint8: latents (..., C) and rope keys (..., R) as DeepSeek's FP8 rows."""
    codes, scales = quantize_latent(c_NC)
    return torch.cat([codes.view(torch.uint8), scales.contiguous().view(torch.uint8),
                      k_rope_NR.to(torch.bfloat16).contiguous().view(torch.uint8)], dim=-1)


def unpack_rows(raw_NW: torch.Tensor, C: int, dtype: torch.dtype) -> torch.Tensor:
    """(..., C + R) in ``dtype``: [latent | rope key] of FP8 rows (..., token_bytes(C, R)) uint8."""
    aligned = raw_NW.stride(-1) == 1 and raw_NW.storage_offset() % 4 == 0  # the FP32 scales' view needs it
    raw = raw_NW if aligned else raw_NW.clone(memory_format=torch.contiguous_format)  # contiguous() may keep it
    n = n_tiles(C)
    R = (raw.shape[-1] - C - 4 * n) // 2
    out = torch.empty(*raw.shape[:-1], C + R, dtype=dtype, device=raw.device)
    out[..., :C] = dequantize_latent(raw[..., :C].view(FP8), raw[..., C:C + 4 * n].view(torch.float32), dtype)
    out[..., C:] = raw[..., C + 4 * n:].view(torch.bfloat16)
    return out


def fp8_cache_problem(cfg: ModelConfig, attention: str = "absorbed") -> str | None:
    """Why ``cfg`` cannot take an FP8 cache (a one-line problem for the field cache_dtype), or None: the FP8
    cache is MLA's absorbed latent cache (DeepSeek-V2/V3/V3.2, GLM's MLA presets) or DeepSeek-V4's hybrid cache in
    its own rows (``flyer.infer.hybrid_fp8``; ``attention`` does not apply to it)."""
    if cfg.attn == "hybrid":  # V4's rows: [e4m3 nope | bf16 rope | scales]; the rope values need an even offset
        nope, di = cfg.head_dim - cfg.rope_dim, cfg.index_head_dim
        if nope % 2:
            return f"fp8 rows keep BF16 rope values after head_dim - qk_rope_head_dim = {nope} codes: it must be even"
        if any(map(cfg.is_csa, range(cfg.n_layers))) and (di % 32 or di & (di - 1)):  # ``hybrid_index_fp4``
            return (f"fp8 index keys are Hadamard-rotated FP4 in tiles of 32: index_head_dim={di} must be a power of "
                    f"two >= 32")
        return None
    if cfg.attn != "mla":
        return f"fp8 covers MLA and DeepSeek-V4 caches only (this model uses {cfg.attn.upper()}): use bf16 or fp32"
    if attention != "absorbed":
        return f"fp8 is the absorbed latent cache; attention {attention!r} caches per-head keys: use bf16 or fp32"
    if cfg.kv_lora_rank % 4:
        return f"fp8 rows keep FP32 scales after kv_lora_rank={cfg.kv_lora_rank} bytes: it must be a multiple of 4"
    d = cfg.index_head_dim
    if cfg.index_topk and (d > TILE or d & (d - 1)):  # DeepSeek's fp8_index: one scale per key, a Hadamard size
        return f"fp8 index keys take one scale per key: index_head_dim={d} must be a power of two <= {TILE}"
    return None


def check_fp8_cache(cfg: ModelConfig, attention: str = "absorbed") -> None:
    """``FieldError`` naming cache_dtype when ``cfg`` cannot take an FP8 cache (``fp8_cache_problem``)."""
    if (problem := fp8_cache_problem(cfg, attention)) is not None:
        raise FieldError("cache_dtype", problem)


def check_fp8_cache_flags(cfg: ModelConfig, dtype: torch.dtype, attention: str) -> None:
    """``FieldError`` naming cache_dtype where an FP8 cache (``dtype``) does not cover the run: a model or
    attention path without MLA's latent cache (``check_fp8_cache``). Both commands' flags and the library's entry
    points (``generate``, the serving ``Engine``) check it."""
    if dtype == FP8:
        check_fp8_cache(cfg, attention)
