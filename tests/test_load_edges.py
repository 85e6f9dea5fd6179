"""Edges of loading for inference (``flyer.interop.load``, ``flyer.infer.weights``) and of DeepSeek-V3.2's encoder
(``flyer.data.deepseek_encoding``) a mutation sweep found unpinned (each assertion fails on the mutant it names):
the indexer's weights kept in FP32 when the rest is held, held weights refused off the CPU, a plain run carrying
no Hugging Face settings, a bad config.json in a checkpoint, ``--weight-dtype auto`` on what a checkpoint quantizes
(not what it announces), an FP4 expert named by its index, and a developer turn as V3.2's last user turn in
thinking mode."""

import json
import re

import pytest
import torch

from flyer.config import preset
from flyer.errors import CheckpointError
from flyer.data.deepseek_encoding import ENCODINGS
from flyer.infer.weights import FP8, empty_held, hold_weights
from flyer.interop.export import export_model
from flyer.interop.load import expert_stack_keys, fp4_expert_values, init_source, settings_dir, stored_weight_dtype
from flyer.model.transformer import Transformer
from flyer.train.checkpoint import save_checkpoint
from safetensors.torch import load_file, save_file

from tests import test_hf_fp8_weights as ct_fp8
from tests.test_infer_weights import _saved, _word_tokenizer


@pytest.mark.parametrize("held", [torch.bfloat16, FP8])
def test_the_indexers_head_weights_stay_fp32_when_held(held):
    """DSA's ``weights_proj`` (the indexer's per-head weights, in FP32 as DeepSeek computes them) is not held."""
    m = Transformer(preset("tiny", index_topk=8, index_n_heads=4, index_head_dim=32)).eval()
    hold_weights(m, held)
    kept = {n: p.dtype for n, p in m.named_parameters() if n.endswith("weights_proj.weight")}
    assert kept and set(kept.values()) == {torch.float32}


def test_held_weights_run_on_the_cpu_only():
    with pytest.raises(ValueError, match="held weights run on flyer's CPU kernels"):
        empty_held(preset("tiny"), torch.bfloat16, "meta")


def test_a_plain_run_carries_no_hugging_face_settings(tmp_path):
    _saved(Transformer(preset("tiny")), tmp_path, "run")
    assert settings_dir(tmp_path) is None


@pytest.mark.parametrize("change", [{"no_such_field": 1}, {"dim": "wide"}, {"n_layers": -3}])
def test_a_bad_config_in_a_checkpoint_is_one_checkpoint_error(tmp_path, change):
    """An unknown field, a wrong type, a bad value in a checksummed config.json: ``flyer train --init`` says
    "bad config.json" naming the checkpoint, not a raw ValueError."""
    cfg = {**preset("tiny").to_dict(), **change}
    save_checkpoint(tmp_path / "checkpoints", 1, {"model.safetensors": {"x": torch.zeros(1)}, "config.json": cfg,
                                                  "tokenizer.json": json.loads(_word_tokenizer().tok.to_str())})
    with pytest.raises(CheckpointError, match="bad config.json"):
        init_source(tmp_path)


def test_auto_keeps_fp32_unquantized_weights(tmp_path):
    """compressed-tensors FP8 (BF16 scales) whose unquantized weights are FP32: auto holds FP32, not BF16."""
    ct_fp8.build(tmp_path, ct_fp8.CT, "FP8_DYNAMIC")
    ct_fp8._rewrite(tmp_path, lambda t: t.update({k: v.float() for k, v in t.items()
                                                  if v.dtype == torch.bfloat16 and not k.endswith("weight_scale")}))
    assert stored_weight_dtype(tmp_path) == "fp32"


def test_auto_reads_what_is_quantized_not_what_is_announced(tmp_path):
    """compressed-tensors groups that match no weight (every weight plain BF16), and a stray ``weight_scale_inv``
    beside a BF16 weight: nothing is FP8, so auto holds BF16 (FP8 would round the weights)."""
    ct_fp8.build(tmp_path / "ct", ct_fp8.CT, "FP8_DYNAMIC")

    def plain(t):
        for k in [k for k in t if k.endswith(".weight_scale")]:
            stem = k[:-len(".weight_scale")]
            t[stem + ".weight"] = (t[stem + ".weight"].float() * t.pop(k).float()).bfloat16()
    ct_fp8._rewrite(tmp_path / "ct", plain)
    c = json.loads((tmp_path / "ct" / "config.json").read_text())
    for g in c["quantization_config"]["config_groups"].values():
        g["targets"] = ["re:.*no_such_module$"]
    (tmp_path / "ct" / "config.json").write_text(json.dumps(c))
    assert stored_weight_dtype(tmp_path / "ct") == "bf16"
    export_model(Transformer(preset("tiny")), _word_tokenizer(), tmp_path / "hf", "bf16")
    f = load_file(tmp_path / "hf" / "model.safetensors")
    f["model.layers.0.self_attn.q_a_proj.weight_scale_inv"] = torch.ones(1, 1)
    save_file(f, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    assert stored_weight_dtype(tmp_path / "hf") == "bf16"


def test_an_fp4_expert_that_cannot_be_held_is_named_with_its_index():
    m = empty_held(preset("tiny"), FP8)
    key = sorted(expert_stack_keys(m))[0]
    dest = m.state_dict()[key]
    master = torch.randn(dest.shape) * 1e-3
    master[1, :, :16] *= 1e-30  # expert 1: group scales 150 binades apart in one block
    master[1, :, 16:32] *= 1e15
    with pytest.raises(ValueError, match=re.escape(f"{key}[1]")):
        fp4_expert_values(m, key, dest, master)


def test_v32_a_developer_turn_is_the_last_user_turn():
    """As the release's ``find_last_user_index``: in thinking mode the assistant turn before a last developer turn is
    an earlier one (its reasoning dropped, ``</think>``), and the developer turn opens the reasoning."""
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "A"},
            {"role": "developer", "content": "b"}]
    text = ENCODINGS["deepseek_v32"].render(msgs, extra={"thinking": True})
    assert text.endswith("# The user's message is: b<｜Assistant｜><think>") and "<｜Assistant｜></think>A" in text
