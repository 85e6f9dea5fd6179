"""GLM-4.7-Flash checkpoints (``glm4_moe_lite``: DeepseekV3's MLA, sigmoid router with correction bias,
groups and scaling, a shared expert, DeepSeek's MTP layer; its dense layers named by ``mlp_layer_types``,
which transformers reads instead of ``first_k_dense_replace``). The logits and greedy tokens of the
plain family are ``tests/test_interop_hf.py``'s (``FAMILIES``); here: the dense-layer pattern, the MTP
layer, export as DeepseekV3 that transformers computes alike, and one-line errors. Tiny random models,
FP32, CPU."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from flyer.errors import ConfigError
from flyer.infer.generate import GenerationConfig, generate
from flyer.interop.export import export
from flyer.interop.hf import load_hf
from tests.hf_models import FAMILIES, add_mtp_layer, build, reference_mtp_logits
from tests.test_interop_hf import rel


def _tokens(cfg, T: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed))


def test_dense_layers_follow_mlp_layer_types(tmp_path, monkeypatch):
    """Two leading dense layers named only by mlp_layer_types: flyer reads them as transformers does
    (its logits equal transformers'); ``first_k_dense_replace`` is not what transformers reads."""
    cls, cfg_cls, kw = FAMILIES["glm4_moe_lite"]
    two_dense = {**kw, "mlp_layer_types": ["dense"] * 2 + ["sparse"]}
    monkeypatch.setitem(FAMILIES, "glm4_moe_lite", (cls, cfg_cls, two_dense))
    ref = build("glm4_moe_lite", tmp_path)
    model, cfg, _ = load_hf(tmp_path)
    assert (cfg.attn, cfg.n_dense_layers, cfg.score_func, cfg.router_bias, cfg.n_expert_groups,
            cfg.n_limited_groups, cfg.route_scale) == ("mla", 2, "sigmoid", True, 2, 1, 1.8)
    tokens = _tokens(cfg)
    with torch.no_grad():
        assert rel(model(tokens), ref(tokens).logits) < 1e-4


def test_mtp_layer_equals_reference_and_speculation_keeps_greedy(tmp_path):
    ref = build("glm4_moe_lite", tmp_path)
    w, layer = add_mtp_layer(ref, tmp_path)
    model, cfg, _ = load_hf(tmp_path)
    assert cfg.mtp_depth == 1
    tokens = _tokens(cfg, 20, 1)
    want = reference_mtp_logits(ref, w, layer, tokens)
    with torch.no_grad():
        got = model.head(model.mtp[0].norm(model.mtp_hidden(model.hidden(tokens), tokens)[0]))
    assert rel(got, want) < 1e-4
    prompt = tokens[0, :6].tolist()
    plain = generate(model, [prompt], GenerationConfig(max_new_tokens=16, cache_dtype=torch.float32)).tokens[0]
    spec = GenerationConfig(max_new_tokens=16, cache_dtype=torch.float32, speculative="mtp")
    assert generate(model, [prompt], spec).tokens[0] == plain


def test_exports_as_deepseek_v3_that_transformers_computes_alike(tmp_path):
    """The export is a DeepseekV3 directory (the architecture that computes it; its MTP layer kept):
    transformers' DeepseekV3 on it gives the logits transformers' Glm4MoeLite gives on the source."""
    ref = build("glm4_moe_lite", tmp_path / "src")
    add_mtp_layer(ref, tmp_path / "src")
    export(tmp_path / "src", tmp_path / "out", "fp32")
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["model_type"] == "deepseek_v3" and out["first_k_dense_replace"] == 1
    assert out["num_nextn_predict_layers"] == 1
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = _tokens(load_hf(tmp_path / "src")[1])
    with torch.no_grad():
        assert rel(again(tokens).logits, ref(tokens).logits) < 1e-4
    assert load_hf(tmp_path / "out")[1] == load_hf(tmp_path / "src")[1]


@pytest.mark.parametrize("change, field", [
    ({"mlp_layer_types": ["sparse", "dense", "sparse"]}, "mlp_layer_types"),
    ({"mlp_layer_types": ["dense", "sparse"]}, "mlp_layer_types"),
    ({"mlp_layer_types": ["dense", "moe", "sparse"]}, "mlp_layer_types"),
    ({"first_k_dense_replace": 2}, "first_k_dense_replace"),
])
def test_dense_patterns_flyer_cannot_read_as_transformers_does_are_one_line(tmp_path, change, field):
    build("glm4_moe_lite", tmp_path)
    p = tmp_path / "config.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), **change}))
    with pytest.raises(ConfigError, match=f"field '{field}'") as e:
        load_hf(tmp_path)
    assert "\n" not in str(e.value)
