"""Hugging Face RoPE parameters -> flyer's RoPE fields (no torch): ``rope_parameters`` (transformers 5) or
``rope_theta`` + ``rope_scaling`` (transformers 4, DeepSeek's files); ``default``, ``yarn``, ``llama3`` and
``linear`` scaling, as transformers computes each (``flyer.model.rope``)."""

from __future__ import annotations

import math
from typing import Any

from flyer.errors import ConfigError

# RoPE frequency scalings (transformers' rope_type names; ModelConfig.rope_type): none, YaRN
# (DeepSeek), Llama 3.1's frequency bands, position interpolation (every frequency / factor).
ROPE_TYPES = ("default", "yarn", "llama3", "linear")


def _bad(where: str, field: str, problem: str) -> ConfigError:
    return ConfigError(f"{where}: field '{field}': {problem}")


def yarn_attention_factor(factor: float, mscale: float | None, mscale_all_dim: float | None) -> float:
    """transformers' YaRN ``attention_factor`` (scales cos and sin, hence the rope part of q.k twice):
    m(mscale) / m(mscale_all_dim) when both are given, else m(1), with m(s) = 0.1 s ln(factor) + 1."""
    if mscale and mscale_all_dim:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return yarn_mscale(factor)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1 * mscale * ln(factor) + 1 (1 when not extended)."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def rope_dict(d: dict[str, Any]) -> tuple[str, Any]:
    """(its key, the RoPE dict) of a config: ``rope_scaling`` when set, over ``rope_parameters``, as transformers 5
    reads a file that holds both (``convert_rope_params_to_dict``: a transformers-5 file a user added the classic
    block to, as long-context instructions tell), else ``rope_parameters``; ({} when neither)."""
    key = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    return key, d.get(key) or {}


def _rope_number(rp: dict[str, Any], where: str, key: str, name: str, rope_type: str,
                 required: bool = True) -> float | None:
    """``rp[name]``, a number transformers requires for ``rope_type`` (it raises a KeyError without one); one it
    does not require is None when missing."""
    v = rp.get(name)
    if v is None:
        if not required:
            return None
        raise _bad(where, f"{key}.{name}", f"required with rope_type {rope_type!r}")
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise _bad(where, f"{key}.{name}", f"expected a number (got {v!r:.40})")
    return v


def rope_fields(d: dict[str, Any], where: str = "config.json", mla: bool = False,
                partial: bool = False) -> dict[str, Any]:
    """flyer's RoPE fields from ``rope_parameters`` (transformers 5) or ``rope_theta`` +
    ``rope_scaling`` (transformers 4, DeepSeek's files). ``mla``: a DeepSeek config, whose
    transformers attention scales the softmax by ``mscale_all_dim`` for any scaled type. ``partial``:
    the architecture rotates part of each head (GLM-4.5; ``partial_rotary_factor``, read by the caller)."""
    key, rp = rope_dict(d)
    if not isinstance(rp, dict):
        raise _bad(where, key, f"expected an object (got {rp!r})")
    if set(rp) & {"full_attention", "sliding_attention"}:
        raise _bad(where, key, "per-layer-type RoPE parameters are not supported")
    theta = rp.get("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = rp.get("rope_type", rp.get("type", "default")) or "default"
    max_pos = d.get("max_position_embeddings", 4096)
    if not partial and rp.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
        raise _bad(where, "partial_rotary_factor", "only 1.0 (RoPE on the whole rope head) is supported")
    if rope_type not in ROPE_TYPES:
        supported = ", ".join(ROPE_TYPES)
        raise _bad(where, f"{key}.rope_type", f"unsupported RoPE type {rope_type!r} (supported: {supported})")
    out: dict[str, Any] = {"rope_theta": theta, "rope_type": rope_type}
    # the pretraining context of YaRN and llama3: a top-level key comes first (transformers' standardize_rope_params
    # sets it over the RoPE dict's: Phi-3 and others keep it there), then the dict's, then max_position_embeddings
    orig = d.get("original_max_position_embeddings") or rp.get("original_max_position_embeddings") or max_pos
    if rope_type == "default":
        return {**out, "rope_factor": 1.0, "original_seq_len": max_pos, "mscale": 1.0, "rope_attn_factor": 1.0}
    if rope_type in ("llama3", "linear"):
        if mla and rp.get("mscale_all_dim"):  # flyer's softmax correction is YaRN's alone
            raise _bad(where, f"{key}.mscale_all_dim", f"only supported with rope_type 'yarn' (not {rope_type!r})")
        out.update(rope_factor=_rope_number(rp, where, key, "factor", rope_type), original_seq_len=max_pos,
                   mscale=0.0, rope_attn_factor=1.0)  # transformers' attention factor for both is 1
        if rope_type == "llama3":
            out.update(original_seq_len=orig,
                       low_freq_factor=_rope_number(rp, where, key, "low_freq_factor", rope_type),
                       high_freq_factor=_rope_number(rp, where, key, "high_freq_factor", rope_type))
        return out
    if rp.get("truncate", True) is not True:
        raise _bad(where, f"{key}.truncate", "only true (integer YaRN correction range) is supported")
    factor, mscale, mscale_all_dim, attn_factor, beta_fast, beta_slow = (
        _rope_number(rp, where, key, name, rope_type, required=False)
        for name in ("factor", "mscale", "mscale_all_dim", "attention_factor", "beta_fast", "beta_slow"))
    factor = factor or max_pos / orig
    return {**out, "rope_factor": factor, "original_seq_len": orig, "beta_fast": beta_fast or 32,
            "beta_slow": beta_slow or 1,
            # transformers scales the softmax by m(mscale_all_dim)^2 only when mscale_all_dim is set
            "mscale": mscale_all_dim or 0.0,
            "rope_attn_factor": attn_factor if attn_factor is not None
            else yarn_attention_factor(factor, mscale, mscale_all_dim)}


def partial_rotary_factor(rotated: int, head: int) -> float:
    """The ``partial_rotary_factor`` transformers reads back as ``rotated`` channels of a ``head``-channel head: it
    truncates head * factor, so a factor that falls short by rounding is nudged up to the next float."""
    factor = rotated / head
    return factor if int(head * factor) == rotated else math.nextafter(factor, 1.0)


__all__ = ["ROPE_TYPES", "partial_rotary_factor", "rope_dict", "rope_fields", "yarn_attention_factor", "yarn_mscale"]
