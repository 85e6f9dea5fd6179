"""Where transformers reads a Hugging Face directory otherwise than flyer did, found by differential fuzzing of
random tiny configs against transformers' own models (each silently gave other logits): ``rope_scaling`` beside
``rope_parameters`` (transformers 5 takes ``rope_scaling``), tied embeddings beside a checkpoint head of other values
(transformers leaves them untied), and YaRN at factor 1 with an ``attention_factor`` (the export wrote 'default').
Oracle: transformers' logits on the same files, FP32; the tolerance is FP32 reordering over a few layers."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, \
    Qwen2ForCausalLM

from flyer.interop.export import export_model
from flyer.interop.hf import load_hf
from tests.hf_models import make_tokenizer

SMALL = dict(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1, bos_token_id=1, eos_token_id=2)
TOL = 1e-4  # of the logits' scale: FP32 reordering is ~1e-6; each defect was 0.13 or more


def _rel(a, b) -> float:
    return float((a.detach() - b).abs().max() / b.abs().max())


def _save(model, out, **config_edits):
    model.save_pretrained(out)
    make_tokenizer(out)
    p = out / "config.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), **config_edits}))


def _ids():
    return torch.randint(3, 300, (1, 20), generator=torch.Generator().manual_seed(0))


def _logits_match(path, cls) -> None:
    ref = cls.from_pretrained(path).eval()
    model, _, _ = load_hf(path, dtype=torch.float32)  # as transformers runs the FP32 config
    with torch.no_grad():
        assert _rel(model(_ids()), ref(_ids()).logits) < TOL


def test_rope_scaling_beside_rope_parameters_wins_as_in_transformers(tmp_path):
    torch.manual_seed(0)
    _save(LlamaForCausalLM(LlamaConfig(**SMALL)).eval(), tmp_path, rope_scaling={"type": "linear", "factor": 2.0})
    assert json.loads((tmp_path / "config.json").read_text())["rope_parameters"]["rope_type"] == "default"
    assert LlamaConfig.from_pretrained(tmp_path).rope_parameters["rope_type"] == "linear"
    _logits_match(tmp_path, LlamaForCausalLM)


@pytest.mark.filterwarnings("ignore:.*ties the embeddings")  # asserted on the first load, repeated by the second
@pytest.mark.parametrize("same", [False, True, "other_dtype"])
def test_tied_embeddings_beside_a_head_of_other_values_are_read_untied(tmp_path, same):
    """transformers ties them only where the checkpoint's head equals the embedding (its values: an FP32 copy of a
    BF16 embedding too); flyer dropped the head."""
    torch.manual_seed(0)
    _save(LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=False)).eval(), tmp_path,
          tie_word_embeddings=True)
    if same:  # both in the file, equal: tied, as the config says
        w = load_file(tmp_path / "model.safetensors")
        embed = w["model.embed_tokens.weight"].bfloat16() if same == "other_dtype" else w["model.embed_tokens.weight"]
        head = embed.float() if same == "other_dtype" else embed.clone()
        save_file({**w, "model.embed_tokens.weight": embed, "lm_head.weight": head}, tmp_path / "model.safetensors",
                  metadata={"format": "pt"})
        same = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, cfg, _ = load_hf(tmp_path)
    assert cfg.tie_embeddings is same
    assert any("lm_head.weight differs" in str(w.message) for w in caught) is not same
    _logits_match(tmp_path, LlamaForCausalLM)


def _yarn_at_factor_one_round_trip(tmp_path, cls, model) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    _save(model, src, rope_parameters={"rope_type": "yarn", "factor": 1.0, "attention_factor": 1.3,
                                       "rope_theta": 10000.0, "original_max_position_embeddings": 64})
    _logits_match(src, cls)
    flyer_model, _, tok = load_hf(src)
    export_model(flyer_model, tok, out, dtype="fp32", source=src)
    assert json.loads((out / "config.json").read_text())["rope_parameters"]["attention_factor"] == 1.3
    with torch.no_grad():
        back, want = (cls.from_pretrained(d).eval()(_ids()).logits for d in (out, src))
        assert _rel(back, want) < TOL


def test_yarn_at_factor_one_keeps_its_attention_factor_on_export_gqa(tmp_path):
    torch.manual_seed(0)
    _yarn_at_factor_one_round_trip(tmp_path, Qwen2ForCausalLM, Qwen2ForCausalLM(Qwen2Config(**SMALL)).eval())


def test_yarn_at_factor_one_keeps_its_attention_factor_on_export_mla(tmp_path):
    torch.manual_seed(0)
    mla = {k: v for k, v in SMALL.items() if k != "num_key_value_heads"}
    _yarn_at_factor_one_round_trip(tmp_path, DeepseekV3ForCausalLM, DeepseekV3ForCausalLM(DeepseekV3Config(
        **mla, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, q_lora_rank=None,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
        first_k_dense_replace=1, n_group=2, topk_group=1)).eval())
