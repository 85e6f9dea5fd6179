"""rednote's dots.llm1 checkpoints (``dots1``: DeepseekV3's MoE, with its sigmoid router, correction bias, group
limit, shared experts and dense first layers, on Qwen3's attention: per-head q/k RMSNorm, whole heads rotating, no
bias, no MTP layer): flyer's logits and routing, ``flyer generate``'s and the serving engine's greedy tokens equal
transformers' Dots1ForCausalLM; the export (as glm4_moe) computes the same bit for bit; ``flyer info --config``
counts what transformers builds; sliding layers are read as Dots1Config slides them, missing expert counts are
one-line errors. Tiny random models, FP32, CPU."""

import json

import pytest
import torch
from transformers import Dots1Config, Dots1ForCausalLM, Glm4MoeForCausalLM

from flyer.config import ModelConfig
from flyer.interop.hf import load_hf
from flyer.interop.hf_config import from_hf_config
from tests.hf_models import VOCAB, save_tiny
from tests.test_glm4_moe import logit_tolerance
from tests.test_qwen3 import _config_error, check_round_trip, info_json, rel, train_init_then_export
# Qwen3's end-to-end tests (flyer generate's and the serving engine's greedy tokens), run on this module's src
from tests.test_qwen3 import test_cli_greedy_tokens_equal_transformers  # noqa: F401
from tests.test_qwen3 import test_serving_engine_greedy_equals_flyer_generate  # noqa: F401
from tests.test_qwen3_moe import check_logits_and_routes

# dots.llm1's shape, scaled down: a dense first layer, then 8 experts top-2 from 1 of 2 groups, two shared
# experts, scaling 2.5, not renormalised (Dots1Config's default, which GLM-4.5's is not); GQA 4/2 heads of
# head_dim 24 (not dim / n_heads)
TINY = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=24, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
            n_group=2, topk_group=1, n_shared_experts=2, routed_scaling_factor=2.5, first_k_dense_replace=1,
            max_position_embeddings=256)
# dots.llm1.base's config.json fields that shape the model (the hub's, written before layer_types existed)
HUB = dict(model_type="dots1", architectures=["Dots1ForCausalLM"], vocab_size=152064, hidden_size=4096,
           intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=62, num_attention_heads=32,
           num_key_value_heads=32, head_dim=128, n_routed_experts=128, num_experts_per_tok=6, n_shared_experts=2,
           first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5, max_position_embeddings=32768,
           rope_theta=10000000, sliding_window=None, max_window_layers=62, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("dots1")
    torch.manual_seed(0)
    model = Dots1ForCausalLM(Dots1Config(**TINY)).eval()
    save_tiny(model, path)  # per-channel head norms (dots1's): a wrong channel order would pass with ones
    return path, model


def test_logits_and_routing_equal_transformers(src):
    """Head norms, the whole head rotating, a dense layer then MoE, no MTP: flyer's logits within the GLM-4.5
    bound (training path and decode cache), the same experts per token."""
    path, ref = src
    model, cfg, _ = load_hf(path)
    assert (cfg.attn, cfg.score_func, cfg.router_bias, cfg.qk_norm, cfg.rotary_dim, cfg.n_dense_layers,
            cfg.mtp_depth, cfg.head_dim, cfg.n_shared_experts, cfg.attn_bias, cfg.norm_topk_prob) == \
        ("gqa", "sigmoid", True, True, 0, 1, 0, 24, 2, False, False)
    check_logits_and_routes(model, cfg, ref, logit_tolerance)


def test_hub_config_counts_as_transformers_builds_it(tmp_path, capsys):
    """``flyer info --config`` of dots.llm1's own config (no layer_types, a null window), of the same as
    transformers saves it, and of one leaving first_k_dense_replace to Dots1Config's default (none dense): the
    parameters transformers builds from it (meta device)."""
    for hub in (HUB, {k: v for k, v in HUB.items() if k != "first_k_dense_replace"}):
        with torch.device("meta"):
            hf = Dots1ForCausalLM(Dots1Config(**{k: v for k, v in hub.items()
                                                 if k not in ("model_type", "architectures")}))
        want = sum(t.numel() for t in hf.parameters())
        assert info_json(tmp_path, capsys, hub)["total_params"] == want
        assert info_json(tmp_path, capsys, hf.config.to_dict())["total_params"] == want


def test_missing_fields_read_as_dots1config_defaults():
    """A config.json naming only the expert counts (which Dots1Config leaves unset) reads every other field as
    Dots1Config builds it, and never an MTP layer (GLM-4.5's default has one)."""
    counts = {k: HUB[k] for k in ("n_routed_experts", "n_shared_experts", "num_experts_per_tok")}
    got, ref = from_hf_config({"model_type": "dots1", **counts}), Dots1Config(**counts)
    assert (got["vocab_size"], got["dim"], got["n_layers"], got["n_heads"], got["n_kv_heads"], got["head_dim"],
            got["inter_dim"], got["moe_inter_dim"], got["norm_eps"], got["max_seq_len"], got["rope_theta"],
            got["n_dense_layers"], got["norm_topk_prob"], got["route_scale"], got["n_expert_groups"],
            got["n_limited_groups"], got["attn_bias"]) == \
        (ref.vocab_size, ref.hidden_size, ref.num_hidden_layers, ref.num_attention_heads, ref.num_key_value_heads,
         ref.hidden_size // ref.num_attention_heads, ref.intermediate_size, ref.moe_intermediate_size,
         ref.rms_norm_eps, ref.max_position_embeddings, ref.rope_parameters["rope_theta"], ref.first_k_dense_replace,
         ref.norm_topk_prob, ref.routed_scaling_factor, ref.n_group, ref.topk_group, ref.attention_bias)
    assert (got["mtp_depth"], got["qk_norm"], got["rotary_dim"]) == (0, True, 0)


def test_export_is_glm4_moe_that_transformers_computes_bit_for_bit(src, tmp_path, capsys):
    """flyer exports a dots1 model as GLM-4.5 with head norms, full rotary, no bias and no MTP layer
    (Glm4MoeForCausalLM loads the same tensor names): every tensor back as the file has it, the same logits bit
    for bit."""
    written = {"first_k_dense_replace": 1, "use_qk_norm": True, "num_nextn_predict_layers": 0, "head_dim": 24,
               "attention_bias": False, "n_shared_experts": 2}
    check_round_trip(src, tmp_path, capsys, "glm4_moe", Glm4MoeForCausalLM, written)


def test_what_flyer_cannot_read_is_one_line(tmp_path, capsys):
    """A malformed max_window_layers, sliding layers listed beside a null window (transformers cannot build their
    mask), a missing expert count (Dots1Config has no default), an attention bias (Qwen3's covers o_proj): one line
    naming the field, exit 2. Sliding layers by Dots1Config's rule, or listed, are read as its class slides them."""
    for change, field in (({"max_window_layers": "all"}, "max_window_layers"),
                          ({"layer_types": ["full_attention"] * 61 + ["sliding_attention"], "sliding_window": None},
                           "layer_types"),
                          ({"n_routed_experts": None}, "n_routed_experts"), ({"n_shared_experts": None},
                                                                               "n_shared_experts"),
                          ({"num_experts_per_tok": None}, "num_experts_per_tok"), ({"attention_bias": True},
                                                                                   "attention_bias")):
        _config_error(tmp_path, capsys, {**HUB, **change}, field)
    # a window no layer uses reads: layers 62 and up would slide, and there are 62
    windowed = info_json(tmp_path, capsys, {**HUB, "sliding_window": 4096})
    assert windowed["total_params"] == info_json(tmp_path, capsys, HUB)["total_params"]
    assert windowed["sliding_layers"] == 0
    for change, layers in (({"sliding_window": 1024, "max_window_layers": 60}, 2),
                           ({"sliding_window": 1024, "layer_types": ["full_attention"] * 61 + ["sliding_attention"]},
                            1)):
        (tmp_path / "config.json").write_text(json.dumps({**HUB, **change}))
        want = [i for i, t in enumerate(Dots1Config.from_dict({**HUB, **change}).layer_types) if t != "full_attention"]
        assert ModelConfig.from_json(tmp_path / "config.json").sliding_layers == tuple(want) and len(want) == layers
        shown = info_json(tmp_path, capsys, {**HUB, **change})
        assert (shown["sliding_window"], shown["sliding_layers"]) == (1024, layers)


def test_train_init_from_dots1_then_export(src, tmp_path, capsys):
    """``train --init`` from the dots1 directory, one step, then export: transformers loads it (as glm4_moe)
    and its logits are the run's within the tolerance; the router learned."""
    model, cfg, back = train_init_then_export(src, tmp_path, capsys, "glm4_moe")
    assert cfg.n_dense_layers == 1 and cfg.rotary_dim == 0 and cfg.qk_norm and cfg.mtp_depth == 0
    before = load_hf(src[0])[0]
    assert not torch.equal(model.layers[1].ffn.gate.weight, before.layers[1].ffn.gate.weight)  # the router learned
    x = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel(model(x), back(x).logits) <= logit_tolerance(cfg, 24)
