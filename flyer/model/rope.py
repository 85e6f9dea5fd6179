"""Rotary position embedding, its frequencies scaled for a longer context by YaRN (DeepSeek-V2/V3),
Llama 3.1's frequency bands (``llama3``) or position interpolation (``linear``), as transformers
computes each (``modeling_rope_utils``).

Pairs are interleaved (channels 2i, 2i+1 rotate together), as in DeepSeek's reference code.
Checkpoints laid out for rotate-half RoPE (Llama, Qwen2, DeepseekV3 with ``rope_interleave:
false``) have their rope rows permuted on import (``flyer.interop.hf_names``).
"""

from __future__ import annotations

import math

import torch

from flyer.config import ModelConfig


def _correction_dim(n_rot: float, dim: int, base: float, max_seq_len: int) -> float:
    return dim * math.log(max_seq_len / (n_rot * 2 * math.pi)) / (2 * math.log(base))


def _yarn(freqs: torch.Tensor, rope_dim: int, cfg: ModelConfig) -> torch.Tensor:
    """YaRN keeps high frequencies (wavelength < original context / beta_fast) as they are, divides
    low frequencies (wavelength > original / beta_slow) by ``rope_factor``, and ramps linearly in
    between, over dimension indices."""
    fast, slow = (_correction_dim(beta, rope_dim, cfg.rope_theta, cfg.original_seq_len)
                  for beta in (cfg.beta_fast, cfg.beta_slow))
    low, high = max(math.floor(fast), 0), min(math.ceil(slow), rope_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1 for high-frequency dims (kept), 0 for low-frequency dims (interpolated)
    return freqs / cfg.rope_factor * (1 - keep) + freqs * keep


def _llama3(freqs: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Llama 3.1's bands, by how many turns s_0 = original_seq_len / wavelength a frequency makes
    over the original context: more than ``high_freq_factor`` (wavelength < original / high) are kept,
    fewer than ``low_freq_factor`` divided by ``rope_factor``, and between the two mixed,
    f ((1 - s) / rope_factor + s) with s = (s_0 - low) / (high - low) (s clamped to [0, 1] gives
    exactly the two outer bands)."""
    turns = cfg.original_seq_len * freqs / (2 * math.pi)
    s = ((turns - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)).clamp(0, 1)
    return freqs / cfg.rope_factor * (1 - s) + freqs * s


def rope_frequencies(rope_dim: int, cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (rope_dim/2,) in FP32, computed in FP64, scaled by ``cfg.rope_type`` when
    ``rope_factor > 1``: ``yarn`` (``_yarn``), ``llama3`` (``_llama3``) or ``linear`` (all divided
    by ``rope_factor``: positions interpolated). Scaling applies whenever ``rope_factor > 1``
    (transformers; DeepSeek's reference applies YaRN only when ``max_seq_len > original_seq_len``:
    see ``ModelConfig.softmax_scale``).
    """
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim))
    if cfg.rope_factor > 1.0:
        if cfg.rope_type == "yarn":
            freqs = _yarn(freqs, rope_dim, cfg)
        elif cfg.rope_type == "llama3":
            freqs = _llama3(freqs, cfg)
        elif cfg.rope_type == "linear":
            freqs = freqs / cfg.rope_factor
    return freqs.float()


def rope_cos_sin(rope_dim: int, seq_len: int, cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (seq_len, 1, rope_dim) in FP32 for ``apply_rope``: each pair's cos in both of
    its channels, its sin as (-sin, sin); times ``rope_attn_factor`` (YaRN's: transformers scales
    cos/sin, so the rope part of q.k by its square; 1 in DeepSeek's checkpoints). The 1 broadcasts
    over heads.

    With ``llama4_attn_beta`` (Mistral 4's MLA) cos carries one more channel, last: the query scale at each
    position (``llama4_query_scale``), so that every table indexed by position (a decode row's, a packed
    document's) carries it too; ``MLA`` splits it off."""
    inv = rope_frequencies(rope_dim, cfg).to(device)
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    ang = torch.outer(t, inv)
    cos, sin = ang.cos(), ang.sin()
    if cfg.rope_attn_factor != 1.0:
        cos, sin = cos * cfg.rope_attn_factor, sin * cfg.rope_attn_factor
    cos = cos.repeat_interleave(2, -1)
    if cfg.llama4_attn_beta:
        cos = torch.cat([cos, llama4_query_scale(t, cfg).unsqueeze(-1)], dim=-1)
    return cos.unsqueeze(1), torch.stack((-sin, sin), -1).flatten(-2).unsqueeze(1)


def llama4_query_scale(pos: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Llama 4's attention temperature at FP32 positions ``pos``: 1 + beta ln(1 + floor(pos / original_seq_len)),
    1 within the original context; in FP32 and in transformers' order (``get_llama_4_attn_scale``), so its bits."""
    return 1 + cfg.llama4_attn_beta * torch.log(1 + torch.floor(pos / cfg.original_seq_len))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs, (x0, x1) -> (x0 c - x1 s, x1 c + x0 s), as x cos + swap(x) sin with
    ``rope_cos_sin``'s tables (the same products and sums, so the same bits, in six ops where the
    pairwise form takes thirteen: it runs twice per layer in every decode step). x: (B, T, H, d);
    cos/sin: (T, 1, d), or (B, T, 1, d) at each row's own positions."""
    dtype = x.dtype
    fp32 = dtype == torch.float32  # no casts, not even no-op ones
    xf = x if fp32 else x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0) in each pair
    out = xf * cos + swapped * sin
    return out if fp32 else out.to(dtype)
