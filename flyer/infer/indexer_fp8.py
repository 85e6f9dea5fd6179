"""DSA's lightning indexer at DeepSeek's released inference precision: what ``--cache-dtype fp8`` scores with.

DeepSeek-V3.2-Exp's ``inference/model.py`` ``Indexer.forward`` (read at github:deepseek-ai/DeepSeek-V3.2-Exp 3b99a53,
whose indexer still rotated its RoPE as interleaved pairs: DeepSeek's later fix rotates halves, which transformers'
``DeepseekV32Indexer`` and vLLM follow, as flyer does) takes the indexer's queries q (after RoPE) and keys k (after
``k_norm`` and RoPE), both in the model's BF16, and

    q, k = rotate_activation(q), rotate_activation(k)      # fast_hadamard_transform(x, scale=d^-0.5), d = 128
    q_fp8, q_scale = act_quant(q, 128, "ue8m0")            # per head: one scale per 128 channels
    k_fp8, k_scale = act_quant(k, 128, "ue8m0")            # cached: k_cache (E4M3) + k_scale_cache (FP32)
    weights = weights_proj(x) * H^-0.5 * q_scale * d^-0.5  # weights_proj(x) * H^-0.5 in BF16 (a BF16 Linear)
    score[t, s] = k_scale[s] * sum_h weights[t, h] relu(q_fp8[t, h] . k_fp8[s])      # kernel.py fp8_index

``rotate_activation`` is the normalized Walsh-Hadamard transform in Sylvester's natural order (scipy's
``hadamard``, which fast_hadamard_transform's reference multiplies by), applied to the channels as the checkpoint
lays them out. Orthogonal, it leaves every q . k as it was; it spreads a key's outliers over all channels before
the per-key FP8 scale. flyer rotates its indexer's rope channels as interleaved pairs, and V3.2's checkpoints
store them rotate-half (permuted on import, ``flyer.interop.hf_names``): ``rotation`` puts the channels back in the
checkpoint's order inside the transform, so the rotated values, codes and scales are DeepSeek's own. GLM-5
(``indexer_types``) stores them interleaved: the plain transform. ``act_quant``'s scale rule is
``flyer.infer.cache_fp8.latent_scales`` with ``floor_on_amax`` (max(amax, 1e-4) / 448 rounded up to a power of
two; the codes round to nearest even); the rotation's output is rounded to the model's dtype first, as
fast_hadamard_transform returns its input's.

A key is cached as its ``index_head_dim`` E4M3 codes and one FP32 scale (DeepSeek's ``k_cache`` and
``k_scale_cache``: 132 bytes at d = 128 against BF16's 256). vLLM's DeepseekV32IndexerCache stores the same
bytes per token in one buffer, a block's codes then its scales; flyer keeps DeepSeek's two tensors, each in the
cache's (L, B, S, ...) or the pool's block layout. The scores are FP32 sums of exact code products: a code
times a code is exact, the scales are powers of two.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from flyer.config import ModelConfig
from flyer.infer.cache_fp8 import FP8, code_values, quantize_latent


@lru_cache(maxsize=None)
def _sylvester(d: int) -> torch.Tensor:
    """(d, d) FP32 +-1 Hadamard matrix, d a power of two, in Sylvester's order: H_2n = [[H, H], [H, -H]]."""
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


@lru_cache(maxsize=None)
def _rotation(d: int, rope_dim: int, rope_half: bool) -> torch.Tensor:
    perm = torch.arange(d)
    if rope_half:  # flyer's channel 2i is the checkpoint's i, 2i + 1 its i + rope_dim / 2 (``rope_permutation``)
        perm[:rope_dim] = torch.arange(rope_dim).view(2, -1).t().reshape(-1)
    return _sylvester(d)[perm] * d ** -0.5


def rotation(cfg: ModelConfig, device=None) -> torch.Tensor:
    """(d, d) FP32, d = index_head_dim: ``x @ rotation(cfg)`` is DeepSeek's ``rotate_activation`` of a flyer
    indexer query or key x (..., d), the normalized Hadamard transform of its channels in the checkpoint's order
    (V3.2's rope rows rotate-half; GLM-5's, with ``indexer_types``, interleaved as flyer's)."""
    return _rotation(cfg.index_head_dim, cfg.qk_rope_head_dim, not cfg.indexer_types).to(device)


def hadamard(d: int, device=None) -> torch.Tensor:
    """(d, d) FP32, d a power of two: ``x @ hadamard(d)`` is ``rotate_activation`` of x (..., d) whose channels lie
    in the checkpoint's order (DeepSeek-V4's indexer, its RoPE pairs interleaved as flyer's): the plain transform."""
    return _rotation(d, 0, False).to(device)


def rotate(x: torch.Tensor, rot_KK: torch.Tensor) -> torch.Tensor:
    """x (..., d) rotated (``rotation``), computed in FP32 and returned in x's dtype as fast_hadamard_transform
    returns it."""
    return (x.float() @ rot_KK).to(x.dtype)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """act_quant(x, 128, "ue8m0") of rotated x (..., d), d <= 128: (codes (..., d) float8_e4m3fn, scale (..., 1)
    FP32)."""
    return quantize_latent(x, floor_on_amax=True)


def index_keys(k_BTK: torch.Tensor, rot_KK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the cache keeps of indexer keys k (B, T, d) (``Indexer.keys``): (codes (B, T, d) E4M3, scales (B, T, 1)
    FP32) of the rotated keys."""
    return quantize(rotate(k_BTK, rot_KK))


def index_queries(indexer: nn.Module, x_BTD: torch.Tensor, q_latent_BTR: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, rot_KK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(query codes' values (B, T, H, d) FP32, weights (B, T, H) FP32) of T queries: the rotated queries quantized
    per head, weights = weights_proj(x) H^-0.5 (``Indexer.queries``: in x's dtype, as DeepSeek's ``weights_proj`` is a
    Linear of the model's dtype) times the head's query scale and d^-0.5."""
    q, w = indexer.queries(x_BTD, q_latent_BTR, cos, sin, x_BTD.dtype)  # FP32 of the model dtype's values
    codes, q_scale = quantize(rotate(q.to(x_BTD.dtype), rot_KK))
    return codes.float(), w * q_scale.squeeze(-1) * indexer.head_dim ** -0.5


def index_scores(q_BTHK: torch.Tensor, w_BTH: torch.Tensor, k_BSK: torch.Tensor,
                 k_scale_BS: torch.Tensor) -> torch.Tensor:
    """(B, T, S) FP32: k_scale[s] sum_h w[t, h] relu(q[t, h] . k[s]), DeepSeek's ``fp8_index``, of query codes
    (``index_queries``) over key codes k (B, S, d) (float8_e4m3fn, or their FP32 values) with scales (B, S)."""
    k = code_values(k_BSK) if k_BSK.dtype == FP8 else k_BSK.float()
    logits = torch.relu(torch.matmul(q_BTHK, k.transpose(-1, -2).unsqueeze(1)))  # (B, T, H, S)
    return torch.matmul(w_BTH.unsqueeze(-2), logits).squeeze(-2) * k_scale_BS.unsqueeze(1)
