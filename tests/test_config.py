"""Config validation, DeepSeek/HF JSON loading, presets and their counts."""

import json
from pathlib import Path

import pytest

from flyer.cli import main
from flyer.config import PRESETS, ConfigError, ModelConfig, preset, resolve_config
from flyer.errors import FieldError
from flyer.limits import SIZE_LIMITS
from flyer.model.counts import kv_cache_bytes_per_token, mtp_params_stored, param_counts, training_flops_per_token
from flyer.model.info import meta_counts


@pytest.mark.parametrize("field,value,words", [
    ("n_limited_groups", 9, "n_limited_groups"),
    ("n_routed_experts", 250, "divisible by n_expert_groups"),
    ("n_activated_experts", 129, "n_activated_experts"),
    ("score_func", "relu", "score_func"),
    ("attn", "linear", "attn"),
    ("dim", 0, "dim"),
    ("qk_rope_head_dim", 63, "qk_rope_head_dim"),
])
def test_validation_names_the_field(field, value, words):
    with pytest.raises(ConfigError) as e:
        preset("dsv3", **{field: value})
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", list(SIZE_LIMITS))
def test_sizes_past_any_published_model_are_one_line(name):
    """n_layers 1e8 built a meta model for minutes (flyer info) or looped in Python (flyer train) before any check."""
    with pytest.raises(ConfigError, match=f"^config field '{name}': must be at most {SIZE_LIMITS[name]:,} "):
        preset("tiny", **{name: SIZE_LIMITS[name] + 1})


def test_every_preset_is_far_within_the_size_limits():
    for name in PRESETS:
        cfg = preset(name)
        assert all(getattr(cfg, f) * 8 <= most for f, most in SIZE_LIMITS.items()), name


def test_hf_layer_count_is_bounded_before_its_per_layer_lists():
    d = {"model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 10**7, "num_attention_heads": 2,
         "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 300, "intermediate_size": 64}
    with pytest.raises(ConfigError, match="field 'num_hidden_layers': must be at most 4,096"):
        ModelConfig.from_dict(d)


def test_topk_larger_than_allowed_groups():
    with pytest.raises(ConfigError, match="allowed groups"):
        preset("tiny", n_routed_experts=16, n_expert_groups=4, n_limited_groups=1, n_activated_experts=5)


def test_unknown_field_and_bad_type():
    with pytest.raises(ConfigError, match="unknown config field 'bogus'"):
        ModelConfig.from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match="'dim': expected int"):
        ModelConfig.from_dict({"dim": "big"})


DSV3_OFFICIAL = {  # DeepSeek-V3 inference/configs/config_671B.json
    "vocab_size": 129280, "dim": 7168, "inter_dim": 18432, "moe_inter_dim": 2048, "n_layers": 61,
    "n_dense_layers": 3, "n_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
    "n_activated_experts": 8, "n_expert_groups": 8, "n_limited_groups": 4, "route_scale": 2.5,
    "score_func": "sigmoid", "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "dtype": "fp8"}

DSV3_HF = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128,
    "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1,
    "first_k_dense_replace": 3, "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu",
    "max_position_embeddings": 163840, "initializer_range": 0.02, "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "aux_loss_alpha": 0.001}

DSV2_LITE_HF = {
    "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
    "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
    "n_shared_experts": 2, "n_routed_experts": 64, "routed_scaling_factor": 1.0, "kv_lora_rank": 512,
    "q_lora_rank": None, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
    "topk_method": "greedy", "n_group": 1, "topk_group": 1, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
    "norm_topk_prob": False, "scoring_func": "softmax", "aux_loss_alpha": 0.001, "max_position_embeddings": 163840,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"}}


def _arch(cfg):
    d = cfg.to_dict()
    for k in ("init_std", "seq_aux_alpha", "mtp_loss_weight", "bias_update_speed", "max_seq_len"):
        d.pop(k)
    return d


def test_official_and_hf_configs_load_to_the_preset(tmp_path):
    (tmp_path / "config_671B.json").write_text(json.dumps(DSV3_OFFICIAL))
    (tmp_path / "config.json").write_text(json.dumps(DSV3_HF))
    official = ModelConfig.from_json(tmp_path / "config_671B.json")
    hf = ModelConfig.from_json(tmp_path / "config.json")
    assert _arch(official) == _arch(preset("dsv3"))
    assert _arch(hf) == _arch(preset("dsv3"))
    (tmp_path / "lite.json").write_text(json.dumps(DSV2_LITE_HF))
    lite = ModelConfig.from_json(tmp_path / "lite.json")
    assert _arch(lite) == _arch(preset("dsv2-lite"))
    assert param_counts(lite).total == param_counts(preset("dsv2-lite")).total


# DeepSeek-V3's inference/configs: V2-Lite's and V2's leave out what ModelArgs defaults (V2-Lite's values: softmax
# routing, no groups); V3.1's and V3.2-Exp's name V3's routing, V3.2-Exp's its indexer
DS_16B = {"vocab_size": 102400, "dim": 2048, "inter_dim": 10944, "moe_inter_dim": 1408, "n_layers": 27,
          "n_dense_layers": 1, "n_heads": 16, "n_routed_experts": 64, "n_shared_experts": 2, "n_activated_experts": 6,
          "route_scale": 1.0, "q_lora_rank": 0, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
          "v_head_dim": 128, "mscale": 0.707}
DS_236B = {"vocab_size": 102400, "dim": 5120, "inter_dim": 12288, "moe_inter_dim": 1536, "n_layers": 60,
           "n_dense_layers": 1, "n_heads": 128, "n_routed_experts": 160, "n_shared_experts": 2,
           "n_activated_experts": 6, "n_expert_groups": 8, "n_limited_groups": 3, "route_scale": 16.0,
           "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
           "v_head_dim": 128}
DS_V31 = {**DSV3_OFFICIAL, "scale_fmt": "ue8m0"}
DS_V32 = {**DS_V31, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048}


@pytest.mark.parametrize("d, name, differs", [
    (DS_16B, "dsv2-lite", {}), (DS_V31, "dsv3", {}), (DS_V32, "dsv32", {}),
    # config_236B.json gives no mscale: DeepSeek's model.py scales V2's softmax by ModelArgs' 1.0, where V2's
    # Hugging Face config (and so the preset) says 0.707; the file is read as DeepSeek's code reads it
    (DS_236B, "dsv2", {"mscale": 1.0})])
def test_deepseek_inference_configs_read_as_model_args_reads_them(tmp_path, d, name, differs):
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert _arch(ModelConfig.from_json(tmp_path / "config.json")) == _arch(preset(name, **differs))


def test_deepseek_config_without_yarn_context(tmp_path):
    """model.py applies YaRN (frequencies and mscale) only when max_seq_len passes original_seq_len."""
    (tmp_path / "config.json").write_text(json.dumps({**DS_16B, "max_seq_len": 4096}))
    cfg = ModelConfig.from_json(tmp_path / "config.json")
    assert cfg.rope_factor == 1.0 and cfg.max_seq_len == 4096
    assert cfg.softmax_scale == cfg.qk_head_dim ** -0.5


def test_toml_overrides_and_errors(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[model]\ndim = 96\nn_heads = 3\n")
    cfg = resolve_config("tiny", p)
    assert cfg.dim == 96 and cfg.n_heads == 3 and cfg.n_layers == preset("tiny").n_layers
    p.write_text("dim = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve_config("tiny", p)
    with pytest.raises(ConfigError, match="cannot read config file"):
        resolve_config("tiny", tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        resolve_config("huge")


def test_unknown_preset_is_one_field_error(capsys):
    with pytest.raises(FieldError, match="^preset: unknown preset 'huge' \\(choose from: tiny, small,") as e:
        preset("huge")
    assert e.value.field == "preset"
    assert main(["generate", "--preset", "huge", "--prompt", "x"]) == 2
    assert capsys.readouterr().err.startswith("flyer: error: --preset: unknown preset 'huge'")


@pytest.mark.parametrize("name", list(PRESETS))
def test_closed_form_counts_match_meta_model(name):
    cfg = preset(name)
    assert param_counts(cfg) == meta_counts(cfg)


def test_published_figures():
    v3 = preset("dsv3")
    pc = param_counts(v3)
    assert abs(pc.total / 1e9 - 671) < 1.0
    assert abs(pc.activated / 1e9 - 37) < 1.0
    assert 11e9 < pc.mtp < 12e9  # the module's own parameters; as released, with its embedding and head copies:
    assert abs(mtp_params_stored(v3) / 1e9 - 14) < 1 and abs((pc.total + mtp_params_stored(v3)) / 1e9 - 685) < 1
    assert kv_cache_bytes_per_token(v3) == 61 * (512 + 64) * 2 == 70272
    assert abs(training_flops_per_token(v3, 4096) / 1e9 - 250) < 2.5
    assert abs(training_flops_per_token(v3, 4096, causal=False) / 1e9 - 281) < 3
    assert kv_cache_bytes_per_token(preset("qwen2.5-72b")) == 327680
    assert kv_cache_bytes_per_token(preset("llama3.1-405b")) == 516096
    assert abs(param_counts(preset("dsv2")).total / 1e9 - 236) < 1
    assert abs(param_counts(preset("dsv2-lite")).total / 1e9 - 15.7) < 0.1
    assert abs(param_counts(preset("qwen2.5-72b")).total / 1e9 - 72.7) < 0.1
    assert abs(param_counts(preset("llama3.1-405b")).total / 1e9 - 405.9) < 0.1
    tiny, small = param_counts(preset("tiny")), param_counts(preset("small"))
    assert 1e6 < tiny.total < 10e6
    assert 50e6 < small.total + small.mtp < 200e6 and 32 <= preset("small").n_routed_experts <= 64


def test_info_cli_json(capsys):
    assert main(["info", "dsv3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kv_cache_bytes_per_token"] == 70272
    assert {"total_params", "activated_params", "mtp_params"} <= out.keys()
    # DeepSeek's 37B leaves the embedding (a lookup) out: flyer's activated count has it
    assert out["activated_params_without_embedding"] == out["activated_params"] - out["embedding_params"]
    assert round(out["activated_params_without_embedding"] / 1e9) == 37 != round(out["activated_params"] / 1e9)


def test_info_names_a_dense_models_ffns(capsys):
    """A model without routed experts is said to have dense FFNs (it read "0 routed experts (top-0)")."""
    assert main(["info", "llama3.1-405b"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "llama3.1-405b: GQA, 126 layers, dense FFNs"
    assert main(["info", "tiny"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "tiny: MLA, 4 layers, 16 routed experts (top-4)"


def test_info_takes_preset_as_a_flag_too(capsys):
    """``flyer info --preset NAME`` as train, generate and plan take it (it was refused: only ``info NAME``)."""
    outs = []
    for argv in (["info", "tiny", "--json"], ["info", "--preset", "tiny", "--json"]):
        assert main(argv) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0] == outs[1] and outs[0]["preset"] == "tiny"
    assert main(["info", "small", "--preset", "tiny"]) == 2
    assert capsys.readouterr().err.strip().endswith("--preset: tiny differs from PRESET small: give one")


def test_info_reads_a_model_directory_as_its_config_json(tmp_path, capsys):
    """``--config DIR`` (a Hugging Face model's directory) reads ``DIR/config.json``; a directory without one is
    refused in one line saying so."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(DSV3_HF))
    assert main(["info", "--config", str(tmp_path / "model"), "--json"]) == 0
    by_dir = json.loads(capsys.readouterr().out)
    assert main(["info", "--config", str(tmp_path / "model" / "config.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == by_dir
    assert main(["info", "--config", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().endswith("not a regular file (a directory without config.json)")


def test_toml_top_level_model_fields_beside_a_train_table(tmp_path):
    from flyer.config import read_config_sections

    p = tmp_path / "run.toml"
    p.write_text("dim = 96\nn_heads = 3\n[train]\nsteps = 7\n")
    model, train = read_config_sections(p)
    assert model == {"dim": 96, "n_heads": 3} and train == {"steps": 7}
    assert resolve_config("tiny", p).dim == 96  # the [train] table is not taken for a model field


@pytest.mark.parametrize("topk", [8, 64])
def test_the_docs_dsa_examples_are_tiny_with_an_indexer(topk):
    """docs/performance.md's DSA runs cite ``examples/tiny_dsa_topk{8,64}.toml``: tiny with an indexer selecting
    that many keys, every layer sparse."""
    root = Path(__file__).resolve().parents[1]
    cfg = resolve_config("tiny", root / "examples" / f"tiny_dsa_topk{topk}.toml")
    assert (cfg.index_topk, cfg.index_n_heads, cfg.index_head_dim) == (topk, 4, 32)
    assert cfg == preset("tiny", index_topk=topk, index_n_heads=4, index_head_dim=32)
    assert all(cfg.has_indexer(i) for i in range(cfg.n_layers))
