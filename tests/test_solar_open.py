"""Upstage's Solar Open checkpoints (``solar_open``: GLM-4.5's MoE, with DeepseekV3's sigmoid router, correction
bias, group limit and a shared expert, in every layer, on Llama attention: full rotary, no head norms, no MTP
layer): flyer's logits and routing, ``flyer generate``'s and the serving engine's greedy tokens equal
transformers' SolarOpenForCausalLM; the export (as glm4_moe) computes the same bit for bit; ``flyer info --config`` of
SolarOpenConfig's defaults counts what transformers builds. Tiny random models, FP32, CPU."""

import pytest
import torch
from transformers import Glm4MoeForCausalLM, SolarOpenConfig, SolarOpenForCausalLM

from flyer.interop.hf import load_hf
from tests.hf_models import VOCAB, save_tiny
from tests.test_glm4_moe import logit_tolerance
from tests.test_qwen3 import _config_error, check_round_trip, info_json, rel, train_init_then_export
# Qwen3's end-to-end tests (flyer generate's and the serving engine's greedy tokens), run on this module's src
from tests.test_qwen3 import test_cli_greedy_tokens_equal_transformers  # noqa: F401
from tests.test_qwen3 import test_serving_engine_greedy_equals_flyer_generate  # noqa: F401
from tests.test_qwen3_moe import check_logits_and_routes


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A tiny random Solar Open directory: 8 experts top-2 from 1 of 2 groups, a shared expert, a trained
    (non-zero) correction bias, GQA 4/2 heads of head_dim 24 (not dim / n_heads), scaling 2.5."""
    path = tmp_path_factory.mktemp("solar_open")
    torch.manual_seed(0)
    cfg = SolarOpenConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=24, moe_intermediate_size=32, n_routed_experts=8,
                          num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                          routed_scaling_factor=2.5, max_position_embeddings=256)
    model = SolarOpenForCausalLM(cfg).eval()
    save_tiny(model, path)
    return path, model


def test_logits_and_routing_equal_transformers(src):
    """Every layer MoE, the whole head rotating, no head norms, no MTP: flyer's logits within the GLM-4.5
    bound (training path and decode cache), the same experts per token."""
    path, ref = src
    model, cfg, _ = load_hf(path)
    assert (cfg.attn, cfg.score_func, cfg.router_bias, cfg.qk_norm, cfg.rotary_dim, cfg.n_dense_layers,
            cfg.mtp_depth, cfg.head_dim, cfg.n_shared_experts) == ("gqa", "sigmoid", True, False, 0, 0, 0, 24, 1)
    check_logits_and_routes(model, cfg, ref, logit_tolerance)


def test_default_config_counts_as_transformers_builds_it(tmp_path, capsys):
    """``flyer info --config`` of SolarOpenConfig's defaults, as transformers writes them (Solar-Open-100B's
    shape): the parameters transformers builds from it (meta device)."""
    with torch.device("meta"):
        hf = SolarOpenForCausalLM(SolarOpenConfig())
    want = sum(t.numel() for t in hf.parameters())
    full = SolarOpenConfig().to_dict()
    assert info_json(tmp_path, capsys, full)["total_params"] == want
    # a file naming only what differs from SolarOpenConfig's defaults (here: nothing past its shape's anchor)
    # reads the missing fields as transformers does
    sparse = {k: v for k, v in full.items() if k in ("model_type", "architectures", "hidden_size")}
    assert info_json(tmp_path, capsys, sparse)["total_params"] == want


def test_export_is_glm4_moe_that_transformers_computes_bit_for_bit(src, tmp_path, capsys):
    """flyer exports a Solar Open model as GLM-4.5 with no dense layer, full rotary, no head norms and no MTP
    layer (Solar Open's modeling is exactly that; Glm4MoeForCausalLM loads the same tensor names): every
    tensor back as the file has it, the same logits bit for bit."""
    written = {"first_k_dense_replace": 0, "use_qk_norm": False, "num_nextn_predict_layers": 0, "head_dim": 24}
    check_round_trip(src, tmp_path, capsys, "glm4_moe", Glm4MoeForCausalLM, written)


def test_what_flyer_cannot_read_is_one_line(tmp_path, capsys):
    """No routed or shared expert, a non-boolean switch: one line naming the field, exit 2."""
    d = SolarOpenConfig().to_dict()
    for change, field in (({"n_routed_experts": 0}, "n_routed_experts"), ({"n_shared_experts": 0}, "n_shared_experts"),
                          ({"attention_bias": "yes"}, "attention_bias")):
        _config_error(tmp_path, capsys, {**d, **change}, field)


def test_train_init_from_solar_open_then_export(src, tmp_path, capsys):
    """``train --init`` from the Solar Open directory, one step, then export: transformers loads it (as
    glm4_moe) and its logits are the run's within the tolerance; the router learned."""
    model, cfg, back = train_init_then_export(src, tmp_path, capsys, "glm4_moe")
    assert cfg.n_dense_layers == 0 and cfg.rotary_dim == 0 and not cfg.qk_norm and cfg.mtp_depth == 0
    before = load_hf(src[0])[0]
    assert not torch.equal(model.layers[0].ffn.gate.weight, before.layers[0].ffn.gate.weight)  # the router learned
    x = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel(model(x), back(x).logits) <= logit_tolerance(cfg, 24)
