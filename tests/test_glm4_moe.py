"""GLM-4.5 / 4.6 MoE checkpoints (GQA with q/k/v biases, optional per-head q/k norms and partial rotary:
each head's first channels rotate in rotate-half pairs, the rest pass; then dense layers first and
DeepseekV3's router: sigmoid scores, correction bias, group limit, scaling, a shared expert; DeepSeek's
MTP layers): flyer's logits and routing, its MTP module, ``flyer generate``'s and the serving engine's
greedy tokens equal transformers' Glm4MoeForCausalLM; import -> export -> transformers gives the same
tensors and logits; a native flyer GQA + sigmoid-routed model and a ``train --init`` step export as
glm4_moe; what flyer cannot read or export is one line naming the field. Tiny random models, FP32, CPU."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Glm4MoeConfig, Glm4MoeForCausalLM

from flyer.config import ModelConfig, preset
from flyer.errors import ConfigError
from flyer.infer.generate import GenerationConfig, generate
from flyer.interop.export_config import hf_model_type
from flyer.interop.hf import load_hf
from flyer.model.transformer import Transformer
from tests.bounds import FP32_U
from tests.hf_models import VOCAB, add_mtp_layer, build, reference_mtp_logits
from tests.test_interop_export import tensors
from tests.test_qwen3 import _config_error, check_round_trip, info_json, rel, train_init_then_export
# Qwen3's end-to-end tests, collected here too: run on this module's ``src`` (the GLM-4.5 directory, MTP included)
from tests.test_qwen3 import test_cli_greedy_tokens_equal_transformers  # noqa: F401
from tests.test_qwen3 import test_serving_engine_greedy_equals_flyer_generate  # noqa: F401
from tests.test_qwen3_moe import check_logits_and_routes, trained_step_exports
from tests.test_qwen3_moe import logit_tolerance as moe_tolerance


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    """A tiny random GLM-4.5 directory (``tests.hf_models`` ``glm4_moe``: biases, head norms, 12 of head_dim 24
    rotating, layer 0 dense, 8 experts top-2 from 1 of 2 groups, a shared expert) with one MTP layer as the
    hub checkpoints store it: (path, transformers' model of it, the MTP weights, transformers' MTP block)."""
    path = tmp_path_factory.mktemp("glm4_moe")
    w, layer = add_mtp_layer(build("glm4_moe", path), path)
    return path, AutoModelForCausalLM.from_pretrained(path).eval(), w, layer


@pytest.fixture(scope="module")
def src(glm):
    return glm[:2]


@pytest.fixture(scope="module")
def air(tmp_path_factory):
    """GLM-4.5-Air's kind (``glm4_moe-air``: no head norms, 8 of head_dim 32 rotating, 2 of 4 groups, not
    renormalised, tied embeddings), no MTP layer."""
    path = tmp_path_factory.mktemp("glm4_moe_air")
    build("glm4_moe-air", path)
    return path, AutoModelForCausalLM.from_pretrained(path).eval()


def logit_tolerance(cfg: ModelConfig, T: int) -> float:
    """``tests.test_qwen3_moe.logit_tolerance`` (attention with head norms, the experts' softmax-free sums
    counted as its E + K terms) plus, per layer, the shared expert's moe_inter_dim-term sums and its add
    to the routed output, n u each. A q/k/v bias is one rounding more inside its projection's dim terms."""
    return moe_tolerance(cfg, T) + cfg.n_layers * (cfg.n_shared_experts * cfg.moe_inter_dim + 1) * FP32_U


def _mutant(model, cfg: ModelConfig, drop=lambda name: False, **change) -> Transformer:
    """``model``'s weights (less those whose names ``drop``) in a model of ``cfg`` changed by ``change``."""
    other = Transformer(cfg.replace(**change)).eval()
    other.load_state_dict({k: v for k, v in model.state_dict().items() if not drop(k)})
    return other


@pytest.mark.parametrize("which", ["glm4_moe", "air"])
def test_logits_and_routing_equal_transformers(glm, air, which):
    """Within ``logit_tolerance`` of transformers, from the training path and the decode cache; each MoE
    layer picks the same experts with the same (scaled) weights. The same weights with the whole head
    rotating, without the q/k/v biases, without the correction bias, without the group limit or (GLM-4.5)
    without the head norms are far outside the tolerance."""
    path, ref = glm[:2] if which == "glm4_moe" else air
    model, cfg, _ = load_hf(path)
    want_cfg = ((True, 12, 24, 1, 8, 1, 2, 1, 2.5, True) if which == "glm4_moe"
                else (False, 8, 32, 1, 8, 1, 4, 2, 1.0, False))
    assert (cfg.attn, cfg.attn_bias, cfg.score_func, cfg.router_bias) == ("gqa", True, "sigmoid", True)
    assert (cfg.qk_norm, cfg.rotary_dim, cfg.head_dim, cfg.n_dense_layers, cfg.n_routed_experts, cfg.n_shared_experts,
            cfg.n_expert_groups, cfg.n_limited_groups, cfg.route_scale, cfg.norm_topk_prob) == want_cfg
    assert cfg.head_dim != cfg.dim // cfg.n_heads
    tokens, want, tol, routes = check_logits_and_routes(model, cfg, ref, logit_tolerance)
    for ids, w in routes:
        if cfg.norm_topk_prob:  # renormalised top-k, then scaled
            assert torch.allclose(w.sum(-1), torch.full((len(w),), cfg.route_scale))
        groups = ids // (cfg.n_routed_experts // cfg.n_expert_groups)
        assert max(len(set(g.tolist())) for g in groups) <= cfg.n_limited_groups
    with torch.no_grad():
        mutants = {"whole head rotating": _mutant(model, cfg, rotary_dim=0),
                   "no q/k/v bias": _mutant(model, cfg, lambda k: ".attn.w" in k and k.endswith(".bias"),
                                            attn_bias=False),
                   "no correction bias": _mutant(model, cfg, lambda k: k.endswith("gate.bias"), router_bias=False),
                   "no group limit": _mutant(model, cfg, n_limited_groups=cfg.n_expert_groups)}
        if cfg.qk_norm:
            mutants["no head norms"] = _mutant(model, cfg, lambda k: "head_norm" in k, qk_norm=False)
        for what, other in mutants.items():
            assert rel(other(tokens), want) > 100 * tol, what


def test_mtp_layer_equals_reference_and_speculation_keeps_greedy(glm):
    """The hub checkpoint's MTP layer (layer n_layers, DeepSeek's layout with a GLM-4.5 decoder layer:
    biases, head norms, partial rotary, routed experts) loads as flyer's MTP module: its logits are a
    plain-PyTorch reference's on transformers' modules, within the tolerance of one layer more and the
    eh_proj sum; speculative decoding with it keeps the greedy tokens."""
    path, ref, w, layer = glm
    model, cfg, _ = load_hf(path)
    assert cfg.mtp_depth == 1
    tokens = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    want = reference_mtp_logits(ref, w, layer, tokens)
    with torch.no_grad():
        got = model.head(model.mtp[0].norm(model.mtp_hidden(model.hidden(tokens), tokens)[0]))
    tol = logit_tolerance(cfg.replace(n_layers=cfg.n_layers + 1), 20) + 2 * cfg.dim * FP32_U
    assert rel(got, want) <= tol
    prompt = tokens[0, :6].tolist()
    greedy = dict(max_new_tokens=12, temperature=0.0, cache_dtype=torch.float32, eos_id=None)
    plain = generate(model, [prompt], GenerationConfig(**greedy))
    spec = GenerationConfig(**greedy, speculative="mtp", draft_tokens=2)
    assert generate(model, [prompt], spec).tokens == plain.tokens


def test_import_export_round_trip_loads_in_transformers(glm, air, tmp_path, capsys):
    """Every tensor back as the file has it (rope rows permuted back in the first rotary channels only; the
    MTP layer with its copies of the embedding and head); transformers computes the export bit for bit."""
    a = tensors(glm[0])
    assert {"model.layers.1.self_attn.q_proj.bias", "model.layers.1.mlp.gate.e_score_correction_bias",
            "model.layers.1.mlp.shared_experts.up_proj.weight", "model.layers.3.eh_proj.weight"} <= a.keys()
    written = {"architectures": ["Glm4MoeForCausalLM"], "head_dim": 24, "attention_bias": True, "use_qk_norm": True,
               "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1, "routed_scaling_factor": 2.5,
               "num_nextn_predict_layers": 1,
               "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}}
    (tmp_path / "glm").mkdir()
    (tmp_path / "air").mkdir()
    check_round_trip(glm[:2], tmp_path / "glm", capsys, "glm4_moe", Glm4MoeForCausalLM, written)
    written = {"head_dim": 32, "use_qk_norm": False, "norm_topk_prob": False, "tie_word_embeddings": True,
               "num_nextn_predict_layers": 0,
               "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}}
    check_round_trip(air, tmp_path / "air", capsys, "glm4_moe", Glm4MoeForCausalLM, written)


def test_native_gqa_sigmoid_moe_exports_as_glm4_moe(src, tmp_path):
    """A flyer GQA + MoE model with DeepSeek's router, no dense layer, no head norms and 30 of head_dim 44
    rotating (30 / 44 * 44 truncates to 29: the factor written is the next float up) trains a step and
    exports as a GLM-4.5 that transformers computes within the tolerance, its MTP module kept; flyer reads
    the export as the same model."""
    _, _, tok = load_hf(src[0])
    cfg = preset("tiny", vocab_size=VOCAB, attn="gqa", n_kv_heads=2, head_dim=44, rotary_dim=30, attn_bias=True,
                 n_dense_layers=0, n_routed_experts=8, n_activated_experts=2, n_expert_groups=4, n_limited_groups=2)

    def trained_bias(model):  # a trained balancing bias, not zeros
        for layer in model.layers:
            layer.ffn.gate.bias.uniform_(0.0, 0.1)

    written = trained_step_exports(cfg, tok, tmp_path / "out", logit_tolerance, "glm4_moe", trained_bias)
    factor = written["rope_parameters"]["partial_rotary_factor"]
    assert (written["first_k_dense_replace"], written["use_qk_norm"], written["num_nextn_predict_layers"]) == (
        0, False, 1)
    assert int(44 * factor) == 30 and factor != 30 / 44


def test_train_init_from_glm4_moe_then_export(src, tmp_path, capsys):
    """The run's logits are the export's in transformers (within the tolerance); the biases and router learn."""
    model, cfg, back = train_init_then_export(src, tmp_path, capsys, "glm4_moe")
    assert cfg.is_moe and cfg.attn_bias and cfg.rotary_dim == 12 and cfg.mtp_depth == 1
    before = load_hf(src[0])[0]
    assert not torch.equal(model.layers[1].attn.wq.bias, before.layers[1].attn.wq.bias)
    assert not torch.equal(model.layers[1].ffn.gate.weight, before.layers[1].ffn.gate.weight)
    x = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel(model(x), back(x).logits) <= logit_tolerance(cfg, 24)


def test_export_architecture_rule():
    """glm4_moe exactly where it is the one transformers architecture computing the model: a GQA model with
    partial rotary, or with experts routed as DeepseekV3 routes them (sigmoid and correction bias); partial
    rotary only with GLM-4.5's MoE (else one line naming the field); other GQA models export as before."""
    gqa = dict(attn="gqa", n_kv_heads=2, head_dim=32)
    glm = preset("tiny", **gqa, rotary_dim=16, attn_bias=True, qk_norm=True)
    assert hf_model_type(glm) == "glm4_moe"
    assert hf_model_type(glm.replace(rotary_dim=0)) == "glm4_moe"  # sigmoid-routed experts, the whole head rotating
    assert hf_model_type(glm.replace(rotary_dim=0, attn_bias=False, qk_norm=False, n_dense_layers=0)) == "glm4_moe"
    qwen3_moe = dict(qk_norm=True, score_func="softmax", router_bias=False, n_shared_experts=0, route_scale=1.0,
                     n_limited_groups=4)
    assert hf_model_type(preset("tiny", **gqa, **qwen3_moe)) == "qwen3_moe"
    assert hf_model_type(preset("tiny", **gqa, n_dense_layers=4)) == "llama"
    assert hf_model_type(preset("tiny", **gqa, n_dense_layers=4, attn_bias=True)) == "qwen2"
    with pytest.raises(ConfigError, match="'qk_norm': a GQA model with routed experts exports as Qwen3-MoE"):
        hf_model_type(preset("tiny", **gqa, router_bias=False))  # sigmoid without the correction bias: not GLM's
    for change, field in ((dict(n_dense_layers=4), "n_routed_experts"),  # partial rotary on a dense model
                          (dict(score_func="softmax", router_bias=False), "score_func"),
                          (dict(router_bias=False), "router_bias"), (dict(n_shared_experts=0), "n_shared_experts")):
        with pytest.raises(ConfigError) as e:
            hf_model_type(glm.replace(**change))
        assert str(e.value).startswith(f"config field '{field}': a GQA model with partial rotary") and \
            "\n" not in str(e.value)


def test_what_flyer_cannot_read_is_one_line(src, tmp_path, capsys):
    """An odd or zero number of rotating channels, a factor outside (0, 1], no routed or shared expert, a
    non-boolean switch; ``rotary_dim`` on MLA or past the head. A file without ``partial_rotary_factor``
    rotates half of each head, as Glm4MoeConfig reads it."""
    path, _ = src
    d = json.loads((path / "config.json").read_text())
    for change, field in ((dict(partial_rotary_factor=0.125), "partial_rotary_factor"),  # 3 of 24 channels
                          (dict(partial_rotary_factor=0.01), "partial_rotary_factor"),  # none
                          (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
                          (dict(partial_rotary_factor="half"), "partial_rotary_factor"),
                          (dict(n_routed_experts=0), "n_routed_experts"),
                          (dict(n_shared_experts=0), "n_shared_experts"),
                          (dict(use_qk_norm="yes"), "use_qk_norm")):
        rp = {k: v for k, v in d["rope_parameters"].items() if k != "partial_rotary_factor"}
        _config_error(tmp_path, capsys, {**d, "rope_parameters": rp, **change}, field)
    rp = {k: v for k, v in d["rope_parameters"].items() if k != "partial_rotary_factor"}
    assert Glm4MoeConfig.from_dict({**d, "rope_parameters": rp}).rope_parameters["partial_rotary_factor"] == 0.5
    assert ModelConfig.from_dict({**d, "rope_parameters": rp}).rotary_dim == 12
    whole = {**d, "rope_parameters": {**rp, "partial_rotary_factor": 1.0}}
    assert ModelConfig.from_dict(whole).rotary_dim == 0  # the whole head, as flyer writes it
    for bad in (dict(rotary_dim=8), dict(attn="gqa", n_kv_heads=2, head_dim=32, rotary_dim=34),
                dict(attn="gqa", n_kv_heads=2, head_dim=32, rotary_dim=7)):
        with pytest.raises(ConfigError) as e:
            preset("tiny", **bad)
        assert str(e.value).startswith("config field 'rotary_dim'") and "\n" not in str(e.value)


GLM_45_AIR = {  # zai-org/GLM-4.5-Air config.json (transformers 4 spelling)
    "architectures": ["Glm4MoeForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "pad_token_id": 151329,
    "eos_token_id": [151329, 151336, 151338], "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
    "partial_rotary_factor": 0.5, "initializer_range": 0.02, "intermediate_size": 10944,
    "max_position_embeddings": 131072, "model_type": "glm4_moe", "moe_intermediate_size": 1408, "norm_topk_prob": True,
    "num_attention_heads": 96, "n_group": 1, "topk_group": 1, "n_routed_experts": 128, "n_shared_experts": 1,
    "routed_scaling_factor": 1.0, "num_experts_per_tok": 8, "first_k_dense_replace": 1, "num_hidden_layers": 46,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 1000000,
    "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.54.0", "use_cache": True, "use_qk_norm": False, "vocab_size": 151552}


def test_hub_config_counts_as_transformers_builds_it(tmp_path, capsys):
    """``flyer info --config`` of a GLM-4.5-Air-shaped hub file: the parameters transformers' Glm4MoeForCausalLM
    has (meta device; it builds no MTP layer, which flyer counts apart), its K/V cache per token."""
    got = info_json(tmp_path, capsys, GLM_45_AIR)
    with torch.device("meta"):
        hf = Glm4MoeForCausalLM(Glm4MoeConfig.from_dict(GLM_45_AIR))
    assert got["total_params"] == sum(t.numel() for t in hf.parameters())
    assert got["kv_cache_bytes_per_token"] == 46 * 2 * 8 * 128 * 2 and got["mtp_params"] > 0
    assert ModelConfig.from_dict(GLM_45_AIR).rotary_dim == 64
