"""transformers' ``config.json`` for a flyer model: the architecture that computes what it does
(``hf_model_type``, or a ``ConfigError`` naming the field none computes) and that architecture's fields
(``hf_config``, transformers-5 spelling), for ``flyer.interop.export``."""

from __future__ import annotations

import math
from dataclasses import replace

from flyer.config import ModelConfig
from flyer.errors import ConfigError, FieldError
from flyer.interop.hf_names import is_mixtral
from flyer.interop.hf_config import GQA_MODEL_TYPES, balance_scale
from flyer.interop.hf_config_quant import KIMI_GROUP_SIZE, kimi_int4_config
from flyer.interop.nvfp4_pack import nvfp4_config
from flyer.interop.hf_config_longcat import check_longcat, to_longcat_config
from flyer.interop.hf_config_mistral4 import check_mistral4, to_mistral4_config
from flyer.interop.hf_config_v4 import to_v4_config
from flyer.interop.hf_rope import partial_rotary_factor, yarn_mscale
from flyer.interop.hf_tokenizer import TextTokenizer
from flyer.interop.v4_quant import FP4_GROUP


def hf_model_type(cfg: ModelConfig) -> str:
    """The transformers architecture that computes what ``cfg`` does, or a ``ConfigError`` saying why none does."""
    if cfg.attn == "hybrid":
        _check_v4(cfg)
        return "deepseek_v4"
    if cfg.shortcut_moe or cfg.n_zero_experts:  # only LongCat-Flash has either
        check_longcat(cfg)
        return "longcat_flash"
    if cfg.attn == "gqa":
        if cfg.rope_type == "yarn" and cfg.rope_factor > 1 and cfg.mscale:
            raise ConfigError("config field 'mscale': transformers' GQA architectures do not scale the softmax for "
                              "YaRN (needs 0)")
        # GLM-4.5 (glm4_moe): the one with partial rotary, and the one routing GQA experts as DeepseekV3 does
        if cfg.rope_dim < cfg.head_dim or (cfg.is_moe and cfg.score_func == "sigmoid" and cfg.router_bias):
            _check_glm4_moe(cfg)
            _check_sliding(cfg, "GLM-4.5 (glm4_moe)", every=False)
            return "glm4_moe"
        if cfg.qk_norm and cfg.attn_bias:  # Qwen3's attention_bias would put one on o_proj too
            raise ConfigError("config fields 'qk_norm'/'attn_bias': no transformers architecture has head norms "
                              "(Qwen3) and a bias on q/k/v alone (Qwen2)")
        if cfg.is_moe:  # no head norms and no dense layer: Mixtral; else Qwen3-MoE, the one that has either
            mixtral = is_mixtral(cfg)
            _check_gqa_moe(cfg, mixtral)
            _check_sliding(cfg, "Mixtral" if mixtral else "Qwen3-MoE", every=True)
            return "mixtral" if mixtral else "qwen3_moe"
        if cfg.qk_norm or cfg.attn_bias:
            return "qwen3" if cfg.qk_norm else "qwen2"
        _check_sliding(cfg, "Llama or Mistral (Qwen2, with attn_bias, and Qwen3, with qk_norm, slide some)", every=True)
        return "mistral" if cfg.sliding_layers else "llama"
    if cfg.n_routed_experts == 0:
        raise ConfigError("config field 'n_routed_experts': an MLA model without experts has no transformers twin")
    if cfg.llama4_attn_beta:  # Llama 4's query temperature: only Mistral 4 has it (and no DSA indexer)
        check_mistral4(cfg)
        return "mistral4"
    if cfg.score_func == "sigmoid" and cfg.router_bias:  # GLM-5: the layout indexer_types lists (flyer.config)
        return ("glm_moe_dsa" if cfg.indexer_types else "deepseek_v32") if cfg.index_topk else "deepseek_v3"
    if cfg.index_topk:
        raise ConfigError("config field 'index_topk': transformers' architectures with the DSA indexer "
                          "(deepseek_v32, glm_moe_dsa) route with sigmoid scores and a correction bias")
    if cfg.score_func == "softmax" and not cfg.router_bias and cfg.norm_topk_prob:
        check_mistral4(cfg)  # the softmax router renormalised: Mistral 4's
        return "mistral4"
    if cfg.score_func == "softmax" and not cfg.router_bias and not cfg.norm_topk_prob:
        return "deepseek_v2"
    raise ConfigError(f"config fields 'score_func'/'router_bias'/'norm_topk_prob': no transformers architecture "
                      f"routes with {cfg.score_func}, bias {cfg.router_bias}, norm_topk_prob {cfg.norm_topk_prob}")


def _check_glm4_moe(cfg: ModelConfig) -> None:
    """A GQA model with partial rotary (or DeepseekV3's router) computes as GLM-4.5 only with its MoE: routed
    experts past the dense layers, DeepseekV3's router (sigmoid, correction bias) and a shared expert."""
    checks = (("n_routed_experts", cfg.is_moe, "routed experts past the n_dense_layers dense layers"),
              ("score_func", cfg.score_func == "sigmoid", "'sigmoid'"), ("router_bias", cfg.router_bias, "true"),
              ("n_shared_experts", cfg.n_shared_experts >= 1, ">= 1"))
    for field, ok, need in checks:
        if not ok:
            raise ConfigError(f"config field '{field}': a GQA model with partial rotary or sigmoid-routed experts "
                              f"exports as GLM-4.5 (glm4_moe), which needs {need} (got {getattr(cfg, field)!r})")


def _check_sliding(cfg: ModelConfig, name: str, every: bool) -> None:
    """``cfg``'s sliding layers as architecture ``name`` slides them: every layer or none (``every``), or none."""
    slides = len(cfg.sliding_layers)
    if slides and (not every or slides < cfg.n_layers):
        raise ConfigError(f"config field 'sliding_layers': a GQA model of this kind exports as {name}, which slides "
                          f"{'every layer or none' if every else 'no layer'} (got {slides} of {cfg.n_layers})")


def _sliding_keys(cfg: ModelConfig, mt: str) -> dict:
    """The config keys with which transformers' ``mt`` slides ``cfg.sliding_layers`` (none: they say so)."""
    window = cfg.window_size or None
    if mt in ("llama", "glm4_moe"):
        return {}
    if mt in ("mistral", "mixtral"):
        return {"sliding_window": window}
    keys = {"use_sliding_window": bool(window), "sliding_window": window}
    if mt in ("qwen2", "qwen3"):  # layer_types rules in transformers 5; max_window_layers where it says the same
        keys["layer_types"] = ["sliding_attention" if cfg.window(i) else "full_attention" for i in range(cfg.n_layers)]
        first = cfg.sliding_layers[0] if window else cfg.n_layers
        if list(cfg.sliding_layers) == list(range(first, cfg.n_layers)):
            keys["max_window_layers"] = first
    return keys


def _check_v4(cfg: ModelConfig) -> None:
    """Hybrid attention computes as transformers' DeepseekV4 only with the rest of V4: hyper-connections, routed
    experts in every layer with one shared expert, its router (a correction bias, no group limit, renormalised)."""
    checks = (("hc_mult", cfg.hc_mult > 1, "> 1"), ("n_dense_layers", cfg.n_dense_layers == 0, "0"),
              ("n_routed_experts", cfg.n_routed_experts > 0, "> 0"),
              ("n_shared_experts", cfg.n_shared_experts == 1, "1"),
              ("router_bias", cfg.router_bias, "true"), ("norm_topk_prob", cfg.norm_topk_prob, "true"),
              ("n_limited_groups", cfg.n_limited_groups == cfg.n_expert_groups, "n_expert_groups (no group limit)"),
              ("swiglu_limit", cfg.swiglu_limit > 0, "> 0"))
    for field, ok, need in checks:
        if not ok:
            raise ConfigError(f"config field '{field}': hybrid attention exports as DeepSeek-V4 (deepseek_v4), "
                              f"which needs {need} (got {getattr(cfg, field)!r})")


def _check_v4_fp4(cfg: ModelConfig) -> None:
    """DeepSeek-V4's FP4 experts hold one scale per 32 inputs of a row: w1 / w3 have dim inputs, w2 moe_inter_dim."""
    for field in ("dim", "moe_inter_dim"):
        if getattr(cfg, field) % FP4_GROUP:
            raise ConfigError(f"config field '{field}': DeepSeek-V4's FP8 format stores routed experts in FP4 with "
                              f"one scale per {FP4_GROUP} inputs, so it needs a multiple of {FP4_GROUP} "
                              f"(got {getattr(cfg, field)})")


def _check_int4(cfg: ModelConfig, mt: str) -> None:
    """Kimi K2's INT4 format is a DeepseekV3 checkpoint's; its experts' inputs (dim for w1 / w3, moe_inter_dim for
    w2) come in whole groups of ``KIMI_GROUP_SIZE``."""
    if mt != "deepseek_v3":
        raise FieldError("dtype", f"int4 writes Kimi K2's INT4 routed experts, a DeepseekV3 (deepseek_v3, kimi_k2) "
                                  f"checkpoint's format; this model exports as {mt} (use bf16, fp32 or fp8)")
    for field in ("dim", "moe_inter_dim"):
        if getattr(cfg, field) % KIMI_GROUP_SIZE:
            raise ConfigError(f"config field '{field}': INT4 experts hold one scale per {KIMI_GROUP_SIZE} inputs, "
                              f"so it needs a multiple of {KIMI_GROUP_SIZE} (got {getattr(cfg, field)})")


def _check_gqa_moe(cfg: ModelConfig, mixtral: bool) -> None:
    """A GQA model with routed experts computes as Qwen3-MoE only with its head norms and its router: softmax
    over every expert, no bias, no groups, no scaling, no shared expert; as Mixtral (``mixtral``: no head norm,
    no dense layer) only with that router renormalised and no attention bias."""
    grouped = cfg.n_expert_groups > 1 and cfg.n_limited_groups < cfg.n_expert_groups
    checks = (("qk_norm", cfg.qk_norm or mixtral, "true"), ("score_func", cfg.score_func == "softmax", "'softmax'"),
              ("router_bias", not cfg.router_bias, "false"),
              ("n_limited_groups", not grouped, "n_expert_groups (no group limit)"),
              ("route_scale", cfg.route_scale == 1.0, "1"), ("n_shared_experts", cfg.n_shared_experts == 0, "0"),
              ("norm_topk_prob", cfg.norm_topk_prob or not mixtral, "true"),
              ("attn_bias", not cfg.attn_bias or not mixtral, "false"))
    name = "Mixtral (no head norms, no dense layer)" if mixtral else "Qwen3-MoE"
    for field, ok, need in checks:
        if not ok:
            raise ConfigError(f"config field '{field}': a GQA model with routed experts exports as {name}, "
                              f"which needs {need} (got {getattr(cfg, field)!r})")


def _rope_parameters(cfg: ModelConfig) -> dict:
    """transformers' ``rope_parameters`` computing ``cfg``'s frequencies (``flyer.model.rope``)."""
    if cfg.rope_factor <= 1.0 and cfg.rope_attn_factor == 1.0:  # rope_type 'default' has 1
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_factor <= 1.0:  # frequencies as they are, cos and sin scaled: YaRN at factor 1 (its ramp is a no-op)
        return {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": 1.0,
                "original_max_position_embeddings": cfg.original_seq_len, "attention_factor": cfg.rope_attn_factor}
    if cfg.rope_type == "linear":
        return {"rope_type": "linear", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor}
    if cfg.rope_type == "llama3":
        return {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
                "original_max_position_embeddings": cfg.original_seq_len, "low_freq_factor": cfg.low_freq_factor,
                "high_freq_factor": cfg.high_freq_factor}
    rp = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
          "original_max_position_embeddings": cfg.original_seq_len, "beta_fast": cfg.beta_fast,
          "beta_slow": cfg.beta_slow, "attention_factor": cfg.rope_attn_factor}
    if cfg.mscale:  # mscale too, so that DeepSeek's reading (m(mscale) / m(mscale_all_dim), no attention_factor:
        # vLLM's, SGLang's) gives transformers' factor: the one m(mscale) = attention_factor m(mscale_all_dim)
        ln_factor = math.log(cfg.rope_factor)
        mscale = (cfg.rope_attn_factor * yarn_mscale(cfg.rope_factor, cfg.mscale) - 1) / (0.1 * ln_factor)
        rp["mscale"], rp["mscale_all_dim"] = round(mscale, 12), cfg.mscale  # (12 digits: the inversion's rounding off)
    return rp


def _aux_coef(cfg: ModelConfig) -> float:
    """transformers' ``router_aux_loss_coef`` weighing its balance loss as ``seq_aux_alpha`` weighs flyer's."""
    return cfg.seq_aux_alpha / balance_scale(cfg.n_activated_experts, cfg.n_layers - cfg.n_dense_layers)


def exported(cfg: ModelConfig) -> ModelConfig:
    """What of ``cfg`` its transformers architecture holds: the GQA ones (Llama ... Mixtral) and Mistral 4 have no
    MTP module."""
    return replace(cfg, mtp_depth=0) if hf_model_type(cfg) in GQA_MODEL_TYPES + ("mistral", "mistral4") else cfg


def eos_token_id(tok: TextTokenizer) -> int | list[int] | None:
    """The ``eos_token_id`` transformers reads: the id, or the list when more than one ends generation."""
    ids = tok.eos_ids()
    return list(ids) if len(ids) > 1 else tok.eos_id()


def hf_config(cfg: ModelConfig, tok: TextTokenizer, dtype: str) -> dict:
    """transformers' ``config.json`` (transformers-5 spelling) for ``cfg``."""
    mt = hf_model_type(cfg)
    arch = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
            "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM",
            "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
            "glm4_moe": "Glm4MoeForCausalLM", "deepseek_v32": "DeepseekV32ForCausalLM",
            "glm_moe_dsa": "GlmMoeDsaForCausalLM", "deepseek_v4": "DeepseekV4ForCausalLM",
            "mistral4": "Mistral4ForCausalLM", "longcat_flash": "LongcatFlashForCausalLM"}[mt]
    d = {"architectures": [arch], "model_type": mt, "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
         "intermediate_size": cfg.inter_dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
         "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_seq_len, "initializer_range": cfg.init_std,
         "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "rope_parameters": _rope_parameters(cfg),
         "bos_token_id": tok.bos_id(), "eos_token_id": eos_token_id(tok),
         "dtype": "bfloat16" if dtype != "fp32" else "float32",
         "attention_bias": False, "mlp_bias": False}
    if dtype == "int4":  # the rest BF16, as Kimi-K2-Thinking's
        _check_int4(cfg, mt)
        d["quantization_config"] = kimi_int4_config(mtp=cfg.mtp_depth > 0)
    if dtype == "nvfp4":  # every architecture but DeepSeek-V4 (its own FP4 format: --dtype fp8)
        if mt == "deepseek_v4":
            raise FieldError("dtype", "nvfp4 writes compressed-tensors' NVFP4; DeepSeek-V4 exports its own FP4 "
                                      "experts with --dtype fp8")
        d["quantization_config"] = nvfp4_config()
    if dtype == "fp8":  # every architecture: without it transformers reads the codes as values, the scales as unused
        d["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                    "weight_block_size": [128, 128]}
    if mt == "deepseek_v4":  # its intermediate_size would alias moe_intermediate_size
        if dtype == "fp8":  # as DeepSeek's V4 config.json: UE8M0 scales, FP4 experts
            _check_v4_fp4(cfg)
            d["quantization_config"]["scale_fmt"] = "ue8m0"
            d["expert_dtype"] = "fp4"
        del d["intermediate_size"]
        d.update(to_v4_config(cfg))
        return d
    if mt == "longcat_flash":  # its own spelling: num_layers decoder layers of two blocks each
        for k in ("intermediate_size", "num_hidden_layers", "mlp_bias"):
            del d[k]
        d.update(to_longcat_config(cfg))
        return d
    if cfg.attn == "gqa":
        d.update(num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, **_sliding_keys(cfg, mt))
        if mt in ("qwen2", "mistral"):  # no attention_bias: Qwen2's q/k/v always have one, Mistral's never
            del d["attention_bias"], d["mlp_bias"]
        if mt in ("qwen3", "qwen3_moe"):
            del d["mlp_bias"]  # Qwen3's attention_bias (False) stays: it would bias q/k/v and o
        if mt == "qwen3_moe":  # dense layers first (mlp_only_layers), then a sparse block in every layer
            d.update(num_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.n_activated_experts,
                     moe_intermediate_size=cfg.moe_inter_dim, norm_topk_prob=cfg.norm_topk_prob,
                     decoder_sparse_step=1, mlp_only_layers=list(range(cfg.n_dense_layers)),
                     router_aux_loss_coef=_aux_coef(cfg), output_router_logits=False)
        if mt == "mixtral":  # a sparse block in every layer, its experts intermediate_size wide; no bias fields
            del d["attention_bias"], d["mlp_bias"]
            d.update(intermediate_size=cfg.moe_inter_dim, num_local_experts=cfg.n_routed_experts,
                     num_experts_per_tok=cfg.n_activated_experts, router_aux_loss_coef=_aux_coef(cfg),
                     router_jitter_noise=0.0, output_router_logits=False)
        if mt == "glm4_moe":  # attention_bias: q/k/v only; DeepseekV3's router; MTP layers as DeepSeek's
            del d["mlp_bias"]
            d["rope_parameters"]["partial_rotary_factor"] = partial_rotary_factor(cfg.rope_dim, cfg.head_dim)
            d.update(attention_bias=cfg.attn_bias, use_qk_norm=cfg.qk_norm, n_routed_experts=cfg.n_routed_experts,
                     num_experts_per_tok=cfg.n_activated_experts, moe_intermediate_size=cfg.moe_inter_dim,
                     n_shared_experts=cfg.n_shared_experts, first_k_dense_replace=cfg.n_dense_layers,
                     routed_scaling_factor=cfg.route_scale, n_group=cfg.n_expert_groups,
                     topk_group=cfg.n_limited_groups, norm_topk_prob=cfg.norm_topk_prob,
                     num_nextn_predict_layers=cfg.mtp_depth, output_router_logits=False)
        return d
    d.update(num_key_value_heads=cfg.n_heads, q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
             qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
             moe_intermediate_size=cfg.moe_inter_dim, n_routed_experts=cfg.n_routed_experts,
             n_shared_experts=cfg.n_shared_experts, num_experts_per_tok=cfg.n_activated_experts,
             first_k_dense_replace=cfg.n_dense_layers, routed_scaling_factor=cfg.route_scale,
             norm_topk_prob=cfg.norm_topk_prob, num_nextn_predict_layers=cfg.mtp_depth)
    grouped = cfg.n_expert_groups > 1 and cfg.n_limited_groups < cfg.n_expert_groups
    if mt == "mistral4":
        del d["num_nextn_predict_layers"], d["mlp_bias"]
        d.update(to_mistral4_config(cfg, _rope_parameters(cfg)))
    elif mt == "deepseek_v3":
        d.update(n_group=cfg.n_expert_groups, topk_group=cfg.n_limited_groups, rope_interleave=True,
                 topk_method="noaux_tc", scoring_func="sigmoid")
    elif mt in ("deepseek_v32", "glm_moe_dsa"):  # no rope_interleave: their MLA always rotates interleaved pairs
        d.update(n_group=cfg.n_expert_groups, topk_group=cfg.n_limited_groups, index_topk=cfg.index_topk,
                 index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim)
        if mt == "glm_moe_dsa":  # as save_pretrained writes it: the dense layers and indexers listed per layer
            d.update(indexer_types=list(cfg.indexer_types),
                     mlp_layer_types=["dense"] * cfg.n_dense_layers + ["sparse"] * (cfg.n_layers - cfg.n_dense_layers),
                     # said, as GLM-5.2's config does: vLLM reads the indexer's layout from it (default by version)
                     rope_interleave=True, indexer_rope_interleave=True)
    else:
        d.update(n_group=cfg.n_expert_groups if grouped else None, scoring_func="softmax",
                 topk_group=cfg.n_limited_groups if grouped else None,
                 topk_method="group_limited_greedy" if grouped else "greedy")
    return d


__all__ = ["eos_token_id", "exported", "hf_config", "hf_model_type"]
