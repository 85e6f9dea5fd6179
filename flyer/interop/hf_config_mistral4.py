"""Mistral 4's ``config.json`` (``model_type`` ``mistral4``) <-> flyer model fields (no torch).

As transformers' Mistral4 computes it: DeepseekV3's MLA and MoE with DeepseekV2's softmax router (renormalised by
``norm_topk_prob``, scaled by ``routed_scaling_factor``, no correction bias; it scores expert groups by their top-2
sum, which flyer's softmax router does not: a group limit is refused), Llama 4's attention temperature on every
query (``rope_parameters.llama_4_scaling_beta``, period ``original_max_position_embeddings``: flyer's
``llama4_attn_beta`` and ``original_seq_len``) and YaRN over the rope head only (``partial_rotary_factor`` of
qk_nope + qk_rope; its other RoPE types do not run in transformers). No MTP layer. Mistral4Config's defaults
(Mistral Small 4's values) fill missing fields. Its routed experts are stored fused (``flyer.interop.hf_names``).
"""

from __future__ import annotations

from typing import Any

from flyer.errors import ConfigError
from flyer.interop.hf_rope import partial_rotary_factor, rope_dict


def _bad(where: str, field: str, problem: str) -> ConfigError:
    return ConfigError(f"{where}: field '{field}': {problem}")


# Mistral4Config's defaults (Mistral Small 4's values) where they differ from what flyer reads a missing field as
MISTRAL4_DEFAULTS = {
    "vocab_size": 131072, "hidden_size": 4096, "intermediate_size": 12288, "moe_intermediate_size": 2048,
    "num_hidden_layers": 36, "num_attention_heads": 32, "n_shared_experts": 1, "n_routed_experts": 128,
    "routed_scaling_factor": 1.0, "kv_lora_rank": 256, "q_lora_rank": 1024, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 64, "num_experts_per_tok": 4, "max_position_embeddings": 1048576}
# Mistral4Config's RoPE when a file gives none (its own max_position_embeddings ignored: transformers reads the
# model's); partial_rotary_factor is derived per file
MISTRAL4_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 128.0,
                 "original_max_position_embeddings": 8192, "beta_fast": 32.0, "beta_slow": 1.0,
                 "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1}


def mistral4_fields(d: dict[str, Any], where: str) -> dict[str, Any]:
    """Mistral 4's router and query temperature (module doc), its RoPE checked as transformers' Mistral4 runs it:
    YaRN over int((qk_nope + qk_rope) * partial_rotary_factor) channels, which must be the rope head's.
    transformers' Mistral4 routes in the weights' dtype, flyer (as DeepSeek's) in FP32: the same on FP32 weights;
    on BF16 ones a near tie between experts may go the other way."""
    key, rp = rope_dict(d)
    rope_type = rp.get("rope_type", rp.get("type", "default")) or "default"
    if rope_type != "yarn":  # Mistral4's own default RoPE rotates the whole qk head: a shape error in transformers
        raise _bad(where, f"{key}.rope_type", f"only 'yarn' is supported for mistral4 (got {rope_type!r}): "
                                              f"transformers' Mistral4 rotates the rope head with YaRN only")
    head = d["qk_nope_head_dim"] + d["qk_rope_head_dim"]
    factor = rp.get("partial_rotary_factor", d.get("partial_rotary_factor", d["qk_rope_head_dim"] / head))
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or int(head * factor) != d["qk_rope_head_dim"]:
        raise _bad(where, "partial_rotary_factor", f"rotates int({head} * {factor!r:.20}) channels of each "
                                                   f"{head}-channel head: only qk_rope_head_dim "
                                                   f"({d['qk_rope_head_dim']}) is supported")
    beta = rp.get("llama_4_scaling_beta")
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or beta < 0:
        raise _bad(where, f"{key}.llama_4_scaling_beta", f"expected a number >= 0 (got {beta!r:.40}): transformers' "
                                                         f"Mistral4 scales every query by it")
    # the temperature's period (YaRN's would default); a top-level key stands in (flyer.interop.hf_rope)
    if not (d.get("original_max_position_embeddings") or rp.get("original_max_position_embeddings")):
        raise _bad(where, f"{key}.original_max_position_embeddings", "required for mistral4: the period of its "
                                                                     "query temperature")
    n_group, topk_group = d.get("n_group") or 1, d.get("topk_group") or 1
    if topk_group < n_group:
        raise _bad(where, "topk_group", f"{topk_group} of n_group {n_group}: Mistral 4's group-limited routing (groups "
                                        f"scored by their top-2 softmax sum) is not supported (topk_group = n_group)")
    return dict(score_func="softmax", router_bias=False, norm_topk_prob=bool(d.get("norm_topk_prob", True)),
                n_expert_groups=1, n_limited_groups=1, mtp_depth=0, llama4_attn_beta=beta)


def check_mistral4(cfg: Any) -> None:
    """MLA with a renormalised softmax router or Llama 4's query temperature computes as transformers' Mistral4
    only with its router (softmax, no bias, no group limit: it scores groups by their top-2 sum) and YaRN (its
    other RoPE types do not run there: ``flyer.interop.hf_config``)."""
    grouped = cfg.n_expert_groups > 1 and cfg.n_limited_groups < cfg.n_expert_groups
    checks = (("score_func", cfg.score_func == "softmax", "'softmax'"), ("router_bias", not cfg.router_bias, "false"),
              ("n_limited_groups", not grouped, "n_expert_groups (no group limit)"),
              ("rope_type", cfg.rope_type == "yarn" or cfg.rope_factor == 1.0, "'yarn' (or no scaling)"))
    for field, ok, need in checks:
        if not ok:
            raise ConfigError(f"config field '{field}': an MLA model with a renormalised softmax router or "
                              f"llama4_attn_beta exports as Mistral 4 (mistral4), which needs {need} "
                              f"(got {getattr(cfg, field)!r})")


def to_mistral4_config(cfg: Any, rope_parameters: dict) -> dict[str, Any]:
    """Mistral 4's own fields for ``cfg`` (a ``ModelConfig`` that ``check_mistral4`` passed), beside DeepseekV3's
    MLA ones: YaRN over the rope head (factor 1: no scaling) with the query temperature; ``rope_parameters``:
    the export's (``flyer.interop.export``) for cfg's frequencies."""
    factor = partial_rotary_factor(cfg.qk_rope_head_dim, cfg.qk_head_dim)
    rp = {**rope_parameters, "rope_type": "yarn", "factor": cfg.rope_factor,
          "original_max_position_embeddings": cfg.original_seq_len, "llama_4_scaling_beta": cfg.llama4_attn_beta,
          "partial_rotary_factor": factor}
    return dict(rope_parameters=rp, n_group=1, topk_group=1, rope_interleave=True, output_router_logits=False)


__all__ = ["MISTRAL4_DEFAULTS", "MISTRAL4_ROPE", "check_mistral4", "mistral4_fields", "to_mistral4_config"]
