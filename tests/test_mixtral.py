"""Mixtral checkpoints (Mistral's GQA attention, no head norms; every layer a sparse MoE block: softmax over
every expert in FP32, top-k, renormalised, no shared expert, no dense layer): flyer's logits and routing,
``flyer generate``'s and the serving engine's greedy tokens equal transformers' MixtralForCausalLM;
import -> export -> transformers gives the same tensors and logits; a native flyer GQA + MoE model without
head norms or dense layers and a ``train --init`` step export as Mixtral, and the rule that picks Mixtral
over Qwen3-MoE is explicit; what flyer cannot run is one line naming the field. Tiny random models, FP32, CPU."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

from flyer.config import ModelConfig, preset
from flyer.errors import ConfigError
from flyer.interop.export_config import hf_model_type
from flyer.interop.hf import load_hf
from flyer.model.transformer import Transformer
from tests.bounds import FP32_U
from tests.hf_models import VOCAB, build
from tests.test_interop_export import tensors
from tests.test_qwen3 import _config_error, check_round_trip, info_json, rel, train_init_then_export
# Qwen3's end-to-end tests, collected here too: run on this module's ``src`` (the Mixtral directory)
from tests.test_qwen3 import test_cli_greedy_tokens_equal_transformers  # noqa: F401
from tests.test_qwen3 import test_serving_engine_greedy_equals_flyer_generate  # noqa: F401
from tests.test_qwen3_moe import check_logits_and_routes, check_softmax_router, trained_step_exports
from tests.test_rope_scaling import logit_tolerance as attention_tolerance


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A tiny random Mixtral directory (3 layers of 8 experts top-2; 2 KV heads of 4; head_dim 24 != 64 / 4
    heads) and transformers' model of it."""
    path = tmp_path_factory.mktemp("mixtral")
    build("mixtral", path)
    return path, AutoModelForCausalLM.from_pretrained(path).eval()


def logit_tolerance(cfg: ModelConfig, T: int) -> float:
    """``tests.test_rope_scaling.logit_tolerance`` (no head norms; its per-layer dim + inter_dim covers the
    router's and the experts' sums) plus, per layer, the softmax's sum over the E experts and the K weighted
    expert outputs, n u each (as ``tests.test_qwen3_moe.logit_tolerance``)."""
    return attention_tolerance(cfg, T) + cfg.n_layers * (cfg.n_routed_experts + cfg.n_activated_experts) * FP32_U


def test_logits_and_routing_equal_transformers(src):
    """Within ``logit_tolerance`` of transformers, from the training path and the decode cache; each layer
    picks the same experts with the same weights; the same weights routed without renormalising, with
    sigmoid scores, or with Qwen3-MoE's head norms are far outside the tolerance."""
    path, ref = src
    model, cfg, _ = load_hf(path)
    assert (cfg.attn, cfg.qk_norm, cfg.head_dim, cfg.n_kv_heads, cfg.n_dense_layers, cfg.n_routed_experts,
            cfg.n_activated_experts, cfg.moe_inter_dim, cfg.n_shared_experts, cfg.score_func, cfg.router_bias,
            cfg.norm_topk_prob, cfg.route_scale, cfg.norm_eps) == (
        "gqa", False, 24, 2, 0, 8, 2, 96, 0, "softmax", False, True, 1.0, 1e-5)
    tokens, want, tol, routes = check_logits_and_routes(model, cfg, ref, logit_tolerance)
    check_softmax_router(model, cfg, tokens, want, tol, routes)
    with torch.no_grad():
        normed = Transformer(cfg.replace(qk_norm=True)).eval()  # unit head-norm weights: still a normalisation
        assert normed.load_state_dict(model.state_dict(), strict=False).unexpected_keys == []
        assert rel(normed(tokens), want) > 100 * tol


def test_import_export_round_trip_loads_in_transformers(src, tmp_path, capsys):
    a = tensors(src[0])  # save_pretrained writes the published checkpoints' names: one tensor per expert
    assert {"model.layers.2.block_sparse_moe.gate.weight", "model.layers.2.block_sparse_moe.experts.7.w1.weight",
            "model.layers.2.block_sparse_moe.experts.7.w2.weight",
            "model.layers.2.block_sparse_moe.experts.7.w3.weight"} <= a.keys()
    assert not any(".mlp." in k for k in a)
    check_round_trip(src, tmp_path, capsys, "mixtral", MixtralForCausalLM,
                     {"architectures": ["MixtralForCausalLM"], "num_local_experts": 8, "num_experts_per_tok": 2,
                      "intermediate_size": 96, "head_dim": 24, "num_key_value_heads": 2, "sliding_window": None})


NATIVE = dict(vocab_size=VOCAB, attn="gqa", n_kv_heads=2, head_dim=16, qk_norm=False, n_dense_layers=0,
              n_shared_experts=0, n_routed_experts=8, n_activated_experts=2, n_expert_groups=1, n_limited_groups=1,
              score_func="softmax", router_bias=False, norm_topk_prob=True, route_scale=1.0, mtp_depth=0)


def test_native_gqa_moe_without_head_norms_or_dense_layers_exports_as_mixtral(src, tmp_path):
    """A flyer GQA + MoE model with no head norm, no dense layer, no shared expert and Mixtral's router
    trains a step and exports as a Mixtral transformers computes within the tolerance."""
    _, _, tok = load_hf(src[0])
    cfg = preset("tiny", **NATIVE)
    written = trained_step_exports(cfg, tok, tmp_path / "out", logit_tolerance, "mixtral")
    assert (written["intermediate_size"], written["num_local_experts"], written["head_dim"]) == (64, 8, 16)
    assert written["architectures"] == ["MixtralForCausalLM"]


def test_export_rule_mixtral_or_qwen3_moe():
    """A softmax-routed GQA model with experts is Mixtral exactly when it has no head norms and no dense
    layer (Qwen3-MoE has head norms and may have dense layers; Mixtral has neither); else Qwen3-MoE's checks
    apply. Each of Mixtral's router conditions, and no attention bias, is one line naming the field."""
    cfg = preset("tiny", **NATIVE)
    assert hf_model_type(cfg) == "mixtral"
    assert hf_model_type(cfg.replace(qk_norm=True)) == "qwen3_moe"
    assert hf_model_type(cfg.replace(qk_norm=True, norm_topk_prob=False, n_dense_layers=1)) == "qwen3_moe"
    with pytest.raises(ConfigError, match="^config field 'qk_norm': .* exports as Qwen3-MoE"):
        hf_model_type(cfg.replace(n_dense_layers=1))  # dense layers: only Qwen3-MoE has them
    assert hf_model_type(cfg.replace(n_expert_groups=4, n_limited_groups=4)) == "mixtral"  # no group limit
    for change, field in ((dict(norm_topk_prob=False), "norm_topk_prob"), (dict(attn_bias=True), "attn_bias"),
                          (dict(n_shared_experts=1), "n_shared_experts"), (dict(router_bias=True), "router_bias"),
                          (dict(route_scale=2.5), "route_scale"),
                          (dict(n_expert_groups=4, n_limited_groups=2), "n_limited_groups")):
        with pytest.raises(ConfigError) as e:
            hf_model_type(cfg.replace(**change))
        msg = str(e.value)
        assert msg.startswith(f"config field '{field}': a GQA model with routed experts exports as Mixtral"), msg
        assert "\n" not in msg


def test_train_init_from_mixtral_then_export(src, tmp_path, capsys):
    """The run's logits are the export's in transformers (within the tolerance); the router learns too."""
    model, cfg, back = train_init_then_export(src, tmp_path, capsys, "mixtral")
    assert cfg.is_moe and not cfg.qk_norm and cfg.n_dense_layers == 0 and cfg.n_shared_experts == 0
    assert isinstance(back, MixtralForCausalLM)
    assert not torch.equal(model.layers[0].ffn.gate.weight, load_hf(src[0])[0].layers[0].ffn.gate.weight)
    x = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel(model(x), back(x).logits) <= logit_tolerance(cfg, 24)


def test_what_flyer_cannot_run_is_one_line(src, tmp_path, capsys):
    """Router jitter (training noise flyer does not apply), no experts, a window below 1; a sliding window slides
    every layer (as Mistral's), even one past every position (a longer row would slide), none is full attention,
    and an attention_bias Mixtral's attention does not read changes nothing."""
    path, _ = src
    d = json.loads((path / "config.json").read_text())
    for change, field in ((dict(sliding_window=0), "sliding_window"),
                          (dict(router_jitter_noise=0.01), "router_jitter_noise"),
                          (dict(num_local_experts=0), "num_local_experts")):
        _config_error(tmp_path, capsys, {**d, **change}, field)
    cfg = load_hf(path)[1]
    for window in (64, 1 << 20):
        assert ModelConfig.from_dict({**d, "sliding_window": window}) == cfg.replace(
            window_size=window, sliding_layers=tuple(range(cfg.n_layers)))
    for change in (dict(sliding_window=None), dict(attention_bias=True)):
        assert ModelConfig.from_dict({**d, **change}) == cfg, change
    with torch.device("meta"):
        attn = MixtralForCausalLM(MixtralConfig.from_dict({**d, "attention_bias": True})).model.layers[0].self_attn
    assert attn.q_proj.bias is None and attn.o_proj.bias is None


MIXTRAL_8X7B = {  # mistralai/Mixtral-8x7B-v0.1 config.json (transformers 4 spelling)
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32, "num_experts_per_tok": 2,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
    "rms_norm_eps": 1e-05, "rope_theta": 1e6, "router_aux_loss_coef": 0.02, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0",
    "use_cache": True, "vocab_size": 32000}


def test_hub_config_counts_as_transformers_builds_it(tmp_path, capsys):
    """``flyer info --config`` of Mixtral-8x7B's hub file: the parameters transformers' MixtralForCausalLM
    has (meta device); a file without the fields whose MixtralConfig defaults differ from other families'
    (rms_norm_eps, rope_theta, max_position_embeddings, experts) reads as MixtralConfig fills them."""
    got = info_json(tmp_path, capsys, MIXTRAL_8X7B)
    with torch.device("meta"):
        hf = MixtralForCausalLM(MixtralConfig.from_dict(MIXTRAL_8X7B))
    assert got["total_params"] == sum(t.numel() for t in hf.parameters())
    assert got["kv_cache_bytes_per_token"] == 32 * 2 * 8 * 128 * 2
    dropped = ("rms_norm_eps", "rope_theta", "max_position_embeddings", "num_local_experts", "num_experts_per_tok")
    bare = {k: v for k, v in MIXTRAL_8X7B.items() if k not in dropped}
    mine, theirs = ModelConfig.from_dict(bare), MixtralConfig.from_dict(bare)
    assert (mine.norm_eps, mine.rope_theta, mine.max_seq_len, mine.n_routed_experts, mine.n_activated_experts) == (
        theirs.rms_norm_eps, theirs.rope_parameters["rope_theta"], theirs.max_position_embeddings,
        theirs.num_local_experts, theirs.num_experts_per_tok)
