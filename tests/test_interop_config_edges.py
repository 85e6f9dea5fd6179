"""Edges of the Hugging Face config reader (``flyer.interop.hf_config``) a mutation sweep found unpinned (each
assertion fails on the mutant it names): which layers slide or are dense where transformers says so, an untyped
file's router, DeepSeek-V2's sequence-wise auxiliary loss, a layer frequency flyer cannot build, and errors that
name the file's own field."""

import json

import pytest
from tokenizers import Tokenizer
from transformers import Glm4MoeConfig, GlmMoeDsaConfig, Qwen2Config

from flyer.config import ModelConfig, preset
from flyer.errors import ConfigError
from flyer.interop.export_config import hf_config, hf_model_type
from flyer.interop.hf_config import from_hf_config
from flyer.interop.hf_tokenizer import TextTokenizer
from tests.hf_models import make_tokenizer
from tests.test_interop_config import DSV2_HUB, V3_T4

QWEN2 = {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}


@pytest.mark.parametrize("layers, window_layers", [(26, None), (4, 3), (4, 4), (4, 0)])
def test_qwen2_slides_the_layers_transformers_slides(layers, window_layers):
    """``use_sliding_window`` slides layers ``max_window_layers`` (default 28) and up, as transformers' layer_types
    list them (none of 26 layers without the field)."""
    d = {**QWEN2, "num_hidden_layers": layers, "use_sliding_window": True, "sliding_window": 16}
    if window_layers is not None:
        d["max_window_layers"] = window_layers
    types = Qwen2Config(**{k: v for k, v in d.items() if k != "model_type"}).layer_types
    sliding = tuple(i for i, t in enumerate(types) if t != "full_attention")
    read = from_hf_config(d)
    assert read["n_layers"] == layers and read.get("sliding_layers", ()) == sliding
    assert read.get("window_size", 0) == (16 if sliding else 0)


def test_glm4_moe_dense_layers_past_the_model_are_all_of_it():
    """``first_k_dense_replace`` past the layer count: every layer dense, as transformers builds it."""
    d = {"model_type": "glm4_moe", **{k: v for k, v in QWEN2.items() if k != "model_type"}, "head_dim": 8,
         "num_hidden_layers": 2, "first_k_dense_replace": 5, "n_routed_experts": 4, "num_experts_per_tok": 2,
         "moe_intermediate_size": 16}
    cfg = Glm4MoeConfig(**{k: v for k, v in d.items() if k != "model_type"})
    dense = sum(i < cfg.first_k_dense_replace for i in range(cfg.num_hidden_layers))
    assert ModelConfig.from_dict(d).n_dense_layers == dense == 2


def test_an_untyped_sigmoid_router_is_deepseek_v3():
    """A file without ``model_type`` or ``topk_method`` whose ``scoring_func`` is sigmoid is DeepSeek-V3's router
    (V2's is softmax only)."""
    d = {k: v for k, v in V3_T4.items() if k not in ("model_type", "topk_method")}
    assert from_hf_config(d)["score_func"] == "sigmoid"


def test_deepseek_v2_reads_its_sequence_wise_aux_loss():
    assert ModelConfig.from_dict(DSV2_HUB).seq_aux_alpha == DSV2_HUB["aux_loss_alpha"] == 0.003


def test_a_moe_layer_frequency_flyer_cannot_build_is_refused():
    """DeepSeek's modeling makes every ``moe_layer_freq``-th layer MoE; flyer builds 1 only."""
    with pytest.raises(ConfigError, match="field 'moe_layer_freq'"):
        from_hf_config({**V3_T4, "moe_layer_freq": 2})


@pytest.mark.parametrize("field, value, problem", [("max_position_embeddings", 0, "must be >= 1"),
                                                   ("hidden_size", 32.5, "expected an integer")])
def test_a_bad_size_names_the_files_field(field, value, problem):
    """Refused by the reader, naming config.json's field, not the ModelConfig field it would become."""
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict({**V3_T4, field: value})
    assert str(e.value).startswith(f"config.json: field '{field}': {problem}"), str(e.value)


def test_a_dense_mla_model_has_no_transformers_twin():
    """An MLA model without routed experts: refused by name, not exported as a DeepseekV3 with none."""
    with pytest.raises(ConfigError, match="config field 'n_routed_experts'"):
        hf_model_type(preset("tiny", n_routed_experts=0, n_dense_layers=4))


def test_a_group_limited_deepseek_v2_router_exports_as_group_limited_greedy(tmp_path):
    """DeepSeek-V2's group limit is on only with topk_method 'group_limited_greedy' (transformers and flyer's reader
    ignore n_group under 'greedy'): the export says it, and reads back with the groups; without a limit, 'greedy'."""
    cfg = preset("tiny", score_func="softmax", router_bias=False, norm_topk_prob=False)
    assert hf_model_type(cfg) == "deepseek_v2" and (cfg.n_expert_groups, cfg.n_limited_groups) == (4, 2)
    make_tokenizer(tmp_path)
    tok = TextTokenizer(Tokenizer.from_file(str(tmp_path / "tokenizer.json")))
    d = hf_config(cfg, tok, "fp32")
    assert (d["topk_method"], d["n_group"], d["topk_group"]) == ("group_limited_greedy", 4, 2)
    back = ModelConfig(**from_hf_config(json.loads(json.dumps(d))))
    assert (back.n_expert_groups, back.n_limited_groups, back.score_func) == (4, 2, "softmax")
    ungrouped = hf_config(cfg.replace(n_limited_groups=4), tok, "fp32")
    assert (ungrouped["topk_method"], ungrouped["n_group"], ungrouped["topk_group"]) == ("greedy", None, None)


def test_a_v4_model_without_a_swiglu_clamp_is_not_exported_as_deepseek_v4():
    """DeepSeek-V4's export needs its SwiGLU clamp: hybrid attention with swiglu_limit 0 (no clamp) is refused
    naming the field; the preset's own limit exports as deepseek_v4."""
    cfg = preset("tiny-v4")
    assert cfg.swiglu_limit > 0 and hf_model_type(cfg) == "deepseek_v4"
    with pytest.raises(ConfigError, match="'swiglu_limit'"):
        hf_model_type(preset("tiny-v4", swiglu_limit=0.0))


def test_a_glm_moe_dsa_export_lists_its_dense_layers_as_transformers_does(tmp_path):
    """GLM-5's config lists each layer's MLP: the export's ``mlp_layer_types`` is what transformers' own
    ``GlmMoeDsaConfig`` derives from ``first_k_dense_replace``, dense layers first."""
    cfg = preset("tiny", index_topk=8, index_n_heads=16, index_head_dim=32, n_dense_layers=1,
                 indexer_types=("full", "shared", "full", "shared"))
    make_tokenizer(tmp_path)
    d = hf_config(cfg, TextTokenizer(Tokenizer.from_file(str(tmp_path / "tokenizer.json"))), "fp32")
    want = GlmMoeDsaConfig(num_hidden_layers=cfg.n_layers, first_k_dense_replace=cfg.n_dense_layers).mlp_layer_types
    assert d["mlp_layer_types"] == want == ["dense", "sparse", "sparse", "sparse"]


def test_a_model_without_a_query_lora_exports_q_lora_rank_null(tmp_path):
    """MLA without a query LoRA (DeepSeek-V2-Lite's layout): ``q_lora_rank`` is written null, which transformers reads
    as a plain query projection (a 0 would ask for a rank-0 LoRA)."""
    make_tokenizer(tmp_path)
    tok = TextTokenizer(Tokenizer.from_file(str(tmp_path / "tokenizer.json")))
    assert hf_config(preset("tiny", q_lora_rank=0), tok, "fp32")["q_lora_rank"] is None
    assert hf_config(preset("tiny"), tok, "fp32")["q_lora_rank"] == preset("tiny").q_lora_rank
