"""Hugging Face / DeepSeek config.json spellings -> ModelConfig (transformers 4 and 5, hub files)."""

import json
import math

import pytest

from flyer.cli import main
from flyer.config import ModelConfig, preset
from flyer.errors import ConfigError
from flyer.interop.hf_config import yarn_attention_factor
from flyer.model.attention import MLA
from tests.test_config import DSV3_HF, _arch

V3_T4 = {  # transformers 4 / DeepSeek hub spelling
    "model_type": "deepseek_v3", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
    "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "n_routed_experts": 8,
    "n_group": 4, "topk_group": 2, "num_experts_per_tok": 2, "first_k_dense_replace": 1, "q_lora_rank": 16,
    "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8, "n_shared_experts": 1,
    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
    "rms_norm_eps": 1e-5, "max_position_embeddings": 128, "rope_theta": 5000.0,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 0.8,
                     "mscale_all_dim": 0.6, "beta_fast": 32, "beta_slow": 1},
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}}


def _t5(d):
    """The transformers-5 spelling of a transformers-4 dict: RoPE in rope_parameters, no gate keys."""
    d = {k: v for k, v in d.items() if k not in ("rope_theta", "rope_scaling", "topk_method", "scoring_func")}
    rs = dict(V3_T4["rope_scaling"])
    rs["rope_type"] = rs.pop("type")
    return {**d, "rope_parameters": {**rs, "rope_theta": 5000.0}}


def test_transformers_4_and_5_spellings_read_the_same():
    a, b = ModelConfig.from_dict(V3_T4), ModelConfig.from_dict(_t5(V3_T4))
    rs = dict(V3_T4["rope_scaling"])
    rs["rope_type"] = rs.pop("type")  # later transformers-4 files
    assert a == b == ModelConfig.from_dict({**V3_T4, "rope_scaling": rs})
    assert (a.score_func, a.router_bias, a.n_expert_groups, a.n_limited_groups) == ("sigmoid", True, 4, 2)
    assert (a.rope_theta, a.rope_factor, a.original_seq_len, a.mscale) == (5000.0, 4.0, 32, 0.6)
    assert math.isclose(a.rope_attn_factor, (0.08 * math.log(4) + 1) / (0.06 * math.log(4) + 1))
    assert math.isclose(a.softmax_scale, 12 ** -0.5 * (0.06 * math.log(4) + 1) ** 2)
    assert a.norm_eps == 1e-5 and MLA(a).kv_norm.eps == 1e-6 and MLA(a).q_norm.eps == 1e-6


def test_yarn_without_mscales_is_transformers_default():
    assert yarn_attention_factor(4.0, None, None) == 0.1 * math.log(4) + 1
    cfg = ModelConfig.from_dict({**_t5(V3_T4), "rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                                    "original_max_position_embeddings": 32}})
    assert cfg.mscale == 0.0 and cfg.softmax_scale == 12 ** -0.5


def test_deepseek_v2_gate_follows_topk_method():
    v2 = {**V3_T4, "model_type": "deepseek_v2", "topk_method": "group_limited_greedy", "scoring_func": "softmax"}
    cfg = ModelConfig.from_dict(v2)
    assert (cfg.score_func, cfg.router_bias, cfg.n_expert_groups, cfg.norm_topk_prob) == ("softmax", False, 4, False)
    assert ModelConfig.from_dict({**v2, "topk_method": "greedy"}).n_expert_groups == 1


def test_llama_and_qwen2():
    llama = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    cfg = ModelConfig.from_dict(llama)
    assert (cfg.attn, cfg.n_kv_heads, cfg.head_dim, cfg.attn_bias, cfg.rope_theta) == ("gqa", 2, 8, False, 1e6)
    assert ModelConfig.from_dict({**llama, "model_type": "qwen2"}).attn_bias


@pytest.mark.parametrize("change, field", [
    ({"model_type": "gemma"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"attention_bias": True}, "attention_bias"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"topk_method": "greedy"}, "topk_method"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type"),
])
def test_unsupported_values_are_one_line_errors(tmp_path, capsys, change, field):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({**V3_T4, **change}))
    with pytest.raises(ConfigError, match=f"config.json: field '{field}'"):
        ModelConfig.from_json(p)
    assert main(["info", "--config", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flyer: error: ") and str(p) in err and field in err and "\n" not in err


def test_yarn_applies_whatever_the_context():
    cfg = preset("dsv3", max_seq_len=4096)  # DeepSeek's reference switches YaRN off here; transformers does not
    assert cfg.softmax_scale == preset("dsv3").softmax_scale != 192 ** -0.5


DSV2_HUB = {  # deepseek-ai/DeepSeek-V2 config.json
    "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 5120, "intermediate_size": 12288,
    "moe_intermediate_size": 1536, "num_hidden_layers": 60, "num_attention_heads": 128, "num_key_value_heads": 128,
    "n_shared_experts": 2, "n_routed_experts": 160, "routed_scaling_factor": 16.0, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
    "topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3, "num_experts_per_tok": 6,
    "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": False, "scoring_func": "softmax",
    "aux_loss_alpha": 0.003, "seq_aux": True, "hidden_act": "silu", "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-06, "rope_theta": 10000, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"}}


def test_deepseek_hub_configs_are_the_presets():
    assert _arch(ModelConfig.from_dict(DSV2_HUB)) == _arch(preset("dsv2"))
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    v3 = {**DSV3_HF, "quantization_config": fp8}
    assert _arch(ModelConfig.from_dict(v3)) == _arch(preset("dsv3"))


# meta-llama/Llama-3.1-405B's config.json as published
LLAMA31_405B_HUB = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 16384, "initializer_range": 0.02,
    "intermediate_size": 53248, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 128, "num_hidden_layers": 126, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "vocab_size": 128256, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192, "rope_type": "llama3"}}


def test_llama_hub_config_is_the_preset():
    """The preset is Llama 3.1 405B as published, its llama3 RoPE scaling included."""
    assert _arch(ModelConfig.from_dict(LLAMA31_405B_HUB)) == _arch(preset("llama3.1-405b"))


@pytest.mark.parametrize("mscales", [(0.8, 0.6), (1.0, 1.0), (1.0, 0.707)])
def test_an_export_keeps_mscale_for_readers_without_attention_factor(mscales):
    """An export's YaRN parameters carry transformers' ``attention_factor`` and DeepSeek's ``mscale`` /
    ``mscale_all_dim``, which vLLM and SGLang read instead (m(mscale) / m(mscale_all_dim)): both give the source's
    factor (the export wrote no ``mscale``: such a reader took 1, 1.0512 against 1.0256 for (0.8, 0.6) at factor 4);
    DeepSeek-V3's and Kimi's (1, 1) comes back as it is."""
    from flyer.interop.export_config import _rope_parameters

    mscale, all_dim = mscales
    src = ModelConfig.from_dict({**V3_T4, "rope_scaling": {**V3_T4["rope_scaling"], "mscale": mscale,
                                                           "mscale_all_dim": all_dim}})
    rp = _rope_parameters(src)
    assert (rp["mscale"], rp["mscale_all_dim"]) == pytest.approx(mscales, rel=1e-12)
    assert rp["mscale"] == mscale or mscales != (1.0, 1.0)
    deepseek = yarn_attention_factor(rp["factor"], rp["mscale"], rp["mscale_all_dim"])
    assert deepseek == pytest.approx(rp["attention_factor"], rel=1e-12)
    assert ModelConfig.from_dict({**_t5(V3_T4), "rope_parameters": {**rp}}) == src
