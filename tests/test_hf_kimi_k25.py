"""Kimi K2.5 checkpoints (``kimi_k25``): a vision-language wrapper whose text model is DeepseekV3 (``text_config``,
``model_type`` deepseek_v3 or the hub's kimi_k2), its tensors under ``language_model.``. flyer reads the text model
and leaves the vision tower and projector: logits, routes, the decode cache and greedy tokens equal transformers'
Kimi_K25ForConditionalGeneration on text ids; the export is the text model as DeepseekV3 (the summary says what
was left out); ``flyer info --config`` counts the text model; one-line errors. Tiny random models, FP32, CPU."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3ForCausalLM, Kimi_K25Config, Kimi_K25ForConditionalGeneration

from flyer.config import ModelConfig
from flyer.infer.generate import GenerationConfig, generate
from flyer.interop.export import export
from flyer.interop.hf import load_hf
from tests.hf_models import _COMMON, VOCAB, make_tokenizer, trained_bias
from tests.test_hf_mistral4 import logit_tolerance
from tests.test_qwen3 import _config_error, info_json, rel
from tests.test_qwen3_moe import check_logits_and_routes

# DeepseekV3: layer 0 dense, then top-2 of 8 sigmoid experts from 2 of 4 groups, a shared expert, YaRN
TEXT = dict(_COMMON, model_type="kimi_k2", moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
            first_k_dense_replace=1, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            n_shared_experts=1, q_lora_rank=24, n_group=4, topk_group=2, routed_scaling_factor=2.5,
            rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                             "mscale": 0.8, "mscale_all_dim": 0.6, "rope_theta": 10000.0})
VISION = dict(num_attention_heads=2, num_hidden_layers=1, hidden_size=32, intermediate_size=48, pos_emb_height=4,
              pos_emb_width=4, pos_emb_time=2)


def build(out, layout: str, tied: bool = False) -> Kimi_K25ForConditionalGeneration:
    """Save a random tiny Kimi K2.5 (FP32; a trained-looking correction bias) with a tokenizer under ``out``, its
    files as transformers' save_pretrained writes them ("saved": decoder layers renamed "blocks") or as the hub's
    ("published": "layers", text model_type kimi_k2); return transformers' model of it."""
    torch.manual_seed(0)
    model = Kimi_K25ForConditionalGeneration(Kimi_K25Config(text_config=TEXT, vision_config=VISION,
                                                            projection_hidden_size=32, tie_word_embeddings=tied))
    trained_bias(model)
    model.save_pretrained(out)
    make_tokenizer(out)
    if layout == "published":
        w = load_file(str(out / "model.safetensors"))
        save_file({k.replace("language_model.model.blocks.", "language_model.model.layers."): v for k, v in w.items()},
                  str(out / "model.safetensors"), metadata={"format": "pt"})
        d = json.loads((out / "config.json").read_text())
        d["text_config"]["model_type"] = "kimi_k2"
        (out / "config.json").write_text(json.dumps(d))
    return Kimi_K25ForConditionalGeneration.from_pretrained(out).eval()


class TextModel:
    """transformers' wrapper seen as a causal LM over text ids (``check_logits_and_routes`` reads ``.model.layers``
    and calls it on ids)."""

    def __init__(self, ref):
        self.ref, self.model = ref, ref.model.language_model

    def __call__(self, ids):
        return self.ref(input_ids=ids)


@pytest.fixture(scope="module", params=["saved", "published"])
def src(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"kimi-{request.param}")
    return path, build(path, request.param)


def test_text_model_equals_transformers(src):
    """The text model's config, then logits within ``tests.test_hf_mistral4.logit_tolerance`` (MLA and MoE sums
    alike) from the training path and the decode cache, the same experts with the same weights per layer, and
    greedy tokens as transformers' on text ids; the vision tower's tensors are in the file and not read."""
    path, ref = src
    model, cfg, _ = load_hf(path)
    assert (cfg.attn, cfg.score_func, cfg.router_bias, cfg.n_expert_groups, cfg.n_limited_groups, cfg.route_scale,
            cfg.tie_embeddings, cfg.llama4_attn_beta) == ("mla", "sigmoid", True, 4, 2, 2.5, False, 0.0)
    assert any(k.startswith("vision_tower.") for k in load_file(str(path / "model.safetensors")))
    check_logits_and_routes(model, cfg, TextModel(ref), logit_tolerance)
    prompt = torch.randint(3, VOCAB, (8,), generator=torch.Generator().manual_seed(1)).tolist()
    want = ref.generate(input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=16, eos_token_id=None,
                        pad_token_id=0)[0, 8:].tolist()
    gen = GenerationConfig(max_new_tokens=16, temperature=0.0, cache_dtype=torch.float32, eos_id=None)
    assert generate(model, [prompt], gen).tokens[0] == want


def test_tied_as_the_wrapper_says(tmp_path):
    """transformers ties the head to the embedding by the wrapper's tie_word_embeddings (default true), whatever
    the text config says; flyer reads it so, and computes what transformers does."""
    ref = build(tmp_path, "saved", tied=True)
    assert ref.lm_head.weight is ref.model.language_model.embed_tokens.weight
    model, cfg, _ = load_hf(tmp_path)
    assert cfg.tie_embeddings and not json.loads((tmp_path / "config.json").read_text())["text_config"].get(
        "tie_word_embeddings", False)
    x = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel(model(x), ref(input_ids=x).logits) <= logit_tolerance(cfg, 24)


def test_exports_the_text_model_as_deepseek_v3(src, tmp_path):
    """``flyer export`` writes the text model as a DeepseekV3 directory transformers computes exactly as the
    wrapper's language model, and says it left the vision tower and projector out."""
    path, ref = src
    summary = export(path, tmp_path / "out", "fp32")
    assert summary["model_type"] == "deepseek_v3" and "vision tower" in summary["left_out"]
    back = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(back(x).logits, ref(input_ids=x).logits)
    assert load_hf(tmp_path / "out")[1] == load_hf(path)[1]


def test_info_counts_the_text_model(src, tmp_path, capsys):
    """``flyer info --config DIR/config.json``: the text model's parameters as transformers builds them (the
    wrapper's language model and head, meta device), not the vision tower's."""
    d = json.loads((src[0] / "config.json").read_text())
    got = info_json(tmp_path, capsys, d)
    with torch.device("meta"):
        hf = Kimi_K25ForConditionalGeneration(Kimi_K25Config.from_dict(d))
    text = sum(p.numel() for n, p in hf.named_parameters() if n.startswith(("model.language_model.", "lm_head.")))
    assert got["total_params"] == text < sum(p.numel() for p in hf.parameters())


def test_what_flyer_cannot_read_is_one_line(src, tmp_path, capsys):
    """One line naming the field: no text config, a text model other than DeepseekV3, quantized weights flyer
    cannot decode (AWQ; the hub's INT4 compressed-tensors experts it decodes: tests/test_hf_int4.py)."""
    d = json.loads((src[0] / "config.json").read_text())
    for change, field in ((dict(text_config=None), "text_config"),
                          (dict(text_config={**d["text_config"], "model_type": "qwen3"}), "text_config.model_type"),
                          (dict(quantization_config={"quant_method": "awq"}),
                           "quantization_config.quant_method")):
        _config_error(tmp_path, capsys, {**d, **change}, field)
    # the config names DeepseekV3Config's one MTP layer; save_pretrained writes none, and the load builds none
    assert ModelConfig.from_dict(d).replace(mtp_depth=0) == load_hf(src[0])[1]
