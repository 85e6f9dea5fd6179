"""flyer held equal to transformers on Hugging Face checkpoints it imports: logits, greedy tokens,
MTP, tokenizer and EOS, and one-line errors on bad input. Tiny random models, FP32, CPU."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flyer.cli import main
from flyer.errors import CheckpointError
from flyer.infer.generate import GenerationConfig, generate
from flyer.interop.hf import load_hf
from flyer.interop.hf_names import permute_rope, rope_permutation
from flyer.interop.load import load_pretrained
from tests.hf_models import FAMILIES, add_mtp_layer, build, reference_mtp_logits

# DeepSeek-V4 has no decode cache (greedy tokens): its logits and spellings are tests/test_deepseek_v4.py's
CASES = [(name, spelling) for name in FAMILIES if name != "v4" for spelling in (5, 4)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b).abs().max() / b.abs().max())


def greedy(model, prompt: list[int], n: int) -> list[int]:
    gen = GenerationConfig(max_new_tokens=n, temperature=0.0, cache_dtype=torch.float32, eos_id=None)
    return generate(model, [prompt], gen).tokens[0]


@pytest.mark.parametrize("name, spelling", CASES)
def test_logits_and_greedy_tokens_equal_transformers(tmp_path, name, spelling):
    build(name, tmp_path, spelling)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # reads the same config.json spelling
    model, cfg, _ = load_hf(tmp_path)
    tokens = torch.randint(3, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(tokens).logits
    assert rel(model(tokens), want) < 1e-4
    prompt = tokens[0, :7]
    out = ref.generate(prompt[None], do_sample=False, max_new_tokens=12, eos_token_id=None, pad_token_id=0)
    assert greedy(model, prompt.tolist(), 12) == out[0, 7:].tolist()


def test_bf16_checkpoint_held_in_bf16_computes_like_transformers_in_fp32(tmp_path, capsys):
    """A BF16 checkpoint with ``--weight-dtype bf16``: FP32 compute on the file's own values, the GEMM
    weights held at half the bytes; logits and greedy tokens as transformers' FP32 model on it."""
    build("v3", tmp_path).to(torch.bfloat16).save_pretrained(tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    model, cfg, _ = load_pretrained(tmp_path, dtype=torch.float32, held=torch.bfloat16)  # held as it loads
    assert model.layers[-1].ffn.experts.w2.dtype == torch.bfloat16 and model.embed.weight.dtype == torch.float32
    tokens = torch.randint(3, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel(model(tokens), ref(tokens).logits) < 1e-4
    prompt = tokens[0, :7]
    out = ref.generate(prompt[None], do_sample=False, max_new_tokens=12, eos_token_id=None, pad_token_id=0)[0, 7:]
    assert greedy(model, prompt.tolist(), 12) == out.tolist()
    ids = AutoTokenizer.from_pretrained(tmp_path)("hello world")["input_ids"]
    want = ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(tmp_path), "--prompt", "hello world", "--max-new-tokens", "6",
                 "--weight-dtype", "bf16", "--device", "cpu", "--eos-id", "-1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["token_ids"] == [want[0, len(ids):].tolist()] and res["cache_dtype"] == "fp32"


def test_both_spellings_give_one_config(tmp_path):
    build("v3", tmp_path / "t5", 5)
    build("v3", tmp_path / "t4", 4)
    a, b = load_hf(tmp_path / "t5")[1], load_hf(tmp_path / "t4")[1]
    assert a == b and a.rope_factor == 4.0 and a.mscale == 0.6 and a.mtp_depth == 0  # no MTP weights saved
    assert math.isclose(a.rope_attn_factor, (0.08 * math.log(4) + 1) / (0.06 * math.log(4) + 1))


def test_rope_permutation_round_trips():
    assert rope_permutation(8).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    w = torch.randn(2 * 12, 5)
    back = permute_rope(permute_rope(w, (12, 4, 8)), (12, 4, 8), inverse=True)
    assert torch.equal(back, w) and torch.equal(permute_rope(w, (12, 4, 8))[:4], w[:4])


def test_mtp_on_deepseek_layout_equals_reference_and_speculation_keeps_greedy(tmp_path):
    ref = build("v3", tmp_path)
    w, layer = add_mtp_layer(ref, tmp_path)
    model, cfg, _ = load_hf(tmp_path)
    assert cfg.mtp_depth == 1
    tokens = torch.randint(3, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    want = reference_mtp_logits(ref, w, layer, tokens)
    with torch.no_grad():
        h1 = model.mtp_hidden(model.hidden(tokens), tokens)[0]
        got = model.head(model.mtp[0].norm(h1))
    assert rel(got, want) < 1e-4
    prompt = tokens[0, :6].tolist()
    plain = greedy(model, prompt, 16)
    for k in (1, 2):
        gen = GenerationConfig(max_new_tokens=16, cache_dtype=torch.float32, speculative="mtp", draft_tokens=k)
        assert generate(model, [prompt], gen).tokens[0] == plain


def test_cli_generate_hf_dir_uses_its_tokenizer_and_eos(tmp_path, capsys):
    build("llama", tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path)
    capsys.readouterr()
    ids = tok("hello world")["input_ids"]
    assert ids[0] == 1  # the BOS of the tokenizer's post-processor
    _, _, ftok = load_pretrained(tmp_path)
    assert ftok.encode_ids("hello world") == ids and ftok.eos_id() == 2
    out = ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=10, pad_token_id=0)[0, len(ids):].tolist()
    assert main(["generate", "--ckpt", str(tmp_path), "--prompt", "hello world", "--max-new-tokens", "10",
                 "--temperature", "0", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["token_ids"] == [out] and res["cache_dtype"] == "fp32"
    assert res["text"] == tok.decode([t for t in out if t != 2], skip_special_tokens=True)


def _cli_error(capsys, path) -> str:
    capsys.readouterr()  # transformers' progress bars
    assert main(["generate", "--ckpt", str(path), "--prompt", "x", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flyer: error: --ckpt: ") and "\n" not in err
    return err


def test_bad_checkpoints_are_one_line_errors(tmp_path, capsys):
    ref = build("v3", tmp_path)
    add_mtp_layer(ref, tmp_path)
    (tmp_path / "model-mtp.safetensors").rename(tmp_path / "gone.safetensors")
    with pytest.raises(CheckpointError, match="shard model-mtp.safetensors .*holding tensor model.layers.3"):
        load_hf(tmp_path)
    assert "model-mtp.safetensors" in _cli_error(capsys, tmp_path)
    (tmp_path / "gone.safetensors").rename(tmp_path / "model-mtp.safetensors")

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "kv_lora_rank": 12}))
    err = _cli_error(capsys, tmp_path)
    assert "model-main.safetensors: tensor model.layers.0.self_attn.kv_a_layernorm.weight has shape (16,)" in err

    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 2, "first_k_dense_replace": 1}))
    err = _cli_error(capsys, tmp_path)
    assert "tensor model.layers.2." in err and "not expected by the config" in err

    for change, field in (({"model_type": "gemma"}, "model_type"), ({"hidden_act": "gelu"}, "hidden_act")):
        (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
        err = _cli_error(capsys, tmp_path)
        assert f"config.json: field '{field}'" in err

    (tmp_path / "config.json").write_text(json.dumps(cfg))
    del index["weight_map"]["model.layers.0.self_attn.o_proj.weight"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "missing tensor model.layers.0.self_attn.o_proj.weight" in _cli_error(capsys, tmp_path)
