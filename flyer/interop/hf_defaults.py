"""What a Hugging Face ``config.json`` means by a field it leaves out: each transformers config class's own default
(``CLASS_DEFAULTS``, by the file's ``model_type``), for the fields flyer reads.

transformers builds a model from a file by filling every missing key with its class's default, and a hand-written
or trimmed file (a converter's, a test's) leaves many out: DeepseekV3Config's missing ``routed_scaling_factor`` is
2.5, its ``n_group`` / ``topk_group`` 8 / 4, GLM-4.5's ``rms_norm_eps`` 1e-5. Read any other way, the same weights
give other logits. A key present as null keeps its own meaning (transformers' post-init reads it: no query LoRA, as
many key-value heads as heads). Each table is tested against its class (tests/test_hf_config_defaults.py); Kimi K2's
remote code is DeepSeek-V3's ``DeepseekV3Config`` under ``model_type`` kimi_k2, so its table is DeepseekV3's (the
same text model inside Kimi K2.5's wrapper reads alike). Mistral 4 and LongCat-Flash keep theirs
beside their readers (``flyer.interop.hf_config_mistral4``, ``hf_config_longcat``), DeepSeek-V4 in
``hf_config_v4``.
"""

from __future__ import annotations

from typing import Any

_DEEPSEEK_V3 = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 128, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
    "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "first_k_dense_replace": 3, "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1,
    "num_experts_per_tok": 8, "routed_scaling_factor": 2.5, "n_group": 8, "topk_group": 4, "norm_topk_prob": True,
    "num_nextn_predict_layers": 1, "rope_theta": 10000.0}

CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v3": _DEEPSEEK_V3,
    # Kimi K2's config.json maps AutoConfig to its configuration_deepseek.DeepseekV3Config, DeepSeek-V3's own class;
    # Kimi K2.5 (kimi_k25) reads its text model (model_type kimi_k2 or deepseek_v3) as transformers' DeepseekV3Config
    "kimi_k2": _DEEPSEEK_V3,
    "deepseek_v2": {
        "vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "kv_lora_rank": 512,
        "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "first_k_dense_replace": 0, "moe_intermediate_size": 1407, "n_routed_experts": 64, "n_shared_experts": 2,
        "routed_scaling_factor": 1.0, "topk_method": "greedy", "rope_theta": 10000.0},
    # DeepseekV32Config's defaults are DeepSeek-V3.2-Exp's, without an MTP field; its first_k_dense_replace (3) is
    # flyer.interop.hf_config._mla_dense_layers', as mlp_layer_types overrides it
    "deepseek_v32": {**{k: v for k, v in _DEEPSEEK_V3.items()
                        if k not in ("first_k_dense_replace", "num_nextn_predict_layers")},
                     "max_position_embeddings": 163840, "index_topk": 2048, "index_n_heads": 64,
                     "index_head_dim": 128},
    # GlmMoeDsaConfig's are GLM-5's
    "glm_moe_dsa": {
        "vocab_size": 154880, "hidden_size": 6144, "intermediate_size": 12288, "moe_intermediate_size": 2048,
        "num_hidden_layers": 78, "num_attention_heads": 64, "n_shared_experts": 1, "n_routed_experts": 256,
        "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 2048, "qk_rope_head_dim": 64,
        "v_head_dim": 256, "qk_nope_head_dim": 192, "n_group": 1, "topk_group": 1, "num_experts_per_tok": 8,
        "max_position_embeddings": 202752, "rms_norm_eps": 1e-5, "index_topk": 2048, "index_n_heads": 32,
        "index_head_dim": 128},
    "glm4_moe_lite": {
        "vocab_size": 154880, "hidden_size": 2048, "intermediate_size": 10240, "num_hidden_layers": 47,
        "num_attention_heads": 20, "num_key_value_heads": 20, "rms_norm_eps": 1e-5, "max_position_embeddings": 202752,
        "kv_lora_rank": 512, "q_lora_rank": 768, "qk_nope_head_dim": 192, "qk_rope_head_dim": 64, "v_head_dim": 256,
        "moe_intermediate_size": 1536, "n_routed_experts": 64, "n_shared_experts": 1, "num_experts_per_tok": 4,
        "routed_scaling_factor": 1.8, "n_group": 1, "topk_group": 1, "norm_topk_prob": True, "rope_theta": 10000.0},
    "llama": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "rope_theta": 10000.0},
    # Mistral's window slides unless a file says null (or one no position reaches past)
    "mistral": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 131072, "sliding_window": 4096, "rope_theta": 10000.0},
    "mixtral": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072, "num_local_experts": 8, "num_experts_per_tok": 2,
        "router_aux_loss_coef": 0.001, "rope_theta": 1e6},
    "qwen2": {
        "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
        "rope_theta": 10000.0},
    "qwen3": {
        "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768, "rope_theta": 10000.0},
    "qwen3_moe": {
        "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24,
        "num_attention_heads": 32, "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
        "moe_intermediate_size": 768, "num_local_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": False,
        "decoder_sparse_step": 1, "router_aux_loss_coef": 0.001, "rope_theta": 10000.0},
    "glm4_moe": {
        "vocab_size": 151552, "hidden_size": 4096, "intermediate_size": 10944, "num_hidden_layers": 46,
        "num_attention_heads": 96, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072, "first_k_dense_replace": 1, "moe_intermediate_size": 1408,
        "n_routed_experts": 128, "n_shared_experts": 1, "num_experts_per_tok": 8, "routed_scaling_factor": 1.0,
        "n_group": 1, "topk_group": 1, "norm_topk_prob": True, "num_nextn_predict_layers": 1, "rope_theta": 10000.0},
    # Upstage's Solar Open: SolarOpenConfig's
    "solar_open": {
        "vocab_size": 196608, "hidden_size": 4096, "num_hidden_layers": 48, "num_attention_heads": 64,
        "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_theta": 1e6, "moe_intermediate_size": 1280, "num_experts_per_tok": 8, "n_shared_experts": 1,
        "n_routed_experts": 128, "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1, "norm_topk_prob": True},
    # rednote's dots.llm1: Dots1Config's, whose expert counts have none (transformers cannot build a model without
    # them: flyer asks for them)
    "dots1": {
        "vocab_size": 152064, "hidden_size": 4608, "intermediate_size": 10944, "moe_intermediate_size": 1408,
        "num_hidden_layers": 62, "num_attention_heads": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "first_k_dense_replace": 0, "norm_topk_prob": False, "routed_scaling_factor": 1.0,
        "n_group": 1, "topk_group": 1, "sliding_window": 4096, "max_window_layers": 62},
}


# each class's attribute_map: a file's alias names the field it maps to (DeepseekV3's num_local_experts is its
# n_routed_experts)
_V3_ALIASES = {"num_local_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers"}
CLASS_ALIASES: dict[str, dict[str, str]] = {
    "deepseek_v3": _V3_ALIASES, "glm4_moe": _V3_ALIASES, "deepseek_v2": {"num_experts": "n_routed_experts"},
    "deepseek_v32": {"num_local_experts": "n_routed_experts"}, "glm_moe_dsa": {"num_local_experts": "n_routed_experts"},
    "glm4_moe_lite": {"num_local_experts": "n_routed_experts", "head_dim": "qk_rope_head_dim"},
    "mixtral": {"num_experts": "num_local_experts"}, "qwen3_moe": {"num_experts": "num_local_experts"},
    "solar_open": {"num_local_experts": "n_routed_experts"}, "dots1": {"num_local_experts": "n_routed_experts"},
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {},
}


def with_class_defaults(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` as its ``model_type``'s class reads it: each alias under the name it maps to (``CLASS_ALIASES``; the
    field's own name first where a file has both), then each field it leaves out set to the class default
    (``CLASS_DEFAULTS``). A file without a model_type, or of a type without a class, as it is."""
    mt = d.get("model_type")
    aliases = CLASS_ALIASES.get(mt, {})
    out = {aliases.get(k, k): v for k, v in d.items() if k not in aliases or aliases[k] not in d}
    return {**CLASS_DEFAULTS.get(mt, {}), **out}


__all__ = ["CLASS_ALIASES", "CLASS_DEFAULTS", "with_class_defaults"]
