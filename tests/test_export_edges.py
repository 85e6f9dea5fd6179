"""Edges of ``flyer export`` (``flyer.interop.export``) a mutation sweep found unpinned (each assertion fails on the
mutant it names): DeepSeek's MTP copies of the embedding and head, the index's ``total_size`` and the shard split
as huggingface_hub makes them, ``model_max_length``, FP8 re-exports whose RoPE rows cross a block (their codes
cannot move) or whose scales are UE8M0, and a Kimi INT4 source in another scale dtype."""

import json

import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import load_file, save_file

import tests.hf_models as hf_models
from flyer.interop.export import export, export_model, write_weights
from flyer.interop.hf import load_hf
from tests.hf_models import add_mtp_layer, build
from tests.test_hf_int4 import build_k2
from tests.test_interop_errors import pow2_fp8
from tests.test_interop_export import tensors

TILE = 128


@pytest.fixture(scope="module")
def v3_mtp(tmp_path_factory):
    """A tiny DeepseekV3 (untied embedding and head) with a DeepSeek-layout MTP layer, and its FP32 export in shards
    of 40 KB."""
    root = tmp_path_factory.mktemp("export-edges")
    add_mtp_layer(build("v3", root / "src"), root / "src")
    model, cfg, tok = load_hf(root / "src")
    export_model(model, tok, root / "fp32", "fp32", "40KB")
    return cfg, root / "fp32"


def test_the_mtp_layers_copies_are_the_embedding_and_head(v3_mtp):
    """DeepSeek's V3 MTP layer carries the shared embedding and output head (``embed_tokens``, ``shared_head.head``):
    the main model's, each under its own name, in the export's dtype (FP32 here: exact)."""
    cfg, out = v3_mtp
    w, pre = tensors(out), f"model.layers.{cfg.n_layers}."
    assert not cfg.tie_embeddings and not torch.equal(w["model.embed_tokens.weight"], w["lm_head.weight"])
    for copy, main in ((pre + "embed_tokens.weight", "model.embed_tokens.weight"),
                       (pre + "shared_head.head.weight", "lm_head.weight")):
        assert w[copy].dtype == torch.float32 and torch.equal(w[copy], w[main]), copy


def test_shards_and_index_as_huggingface_hub_makes_them(v3_mtp, tmp_path):
    """The index's ``total_size`` is its tensors' bytes; tensors go to shards as huggingface_hub's splitter puts
    them (a shard closes before a tensor that would take it past the limit, not at it)."""
    cfg, out = v3_mtp
    index = json.loads((out / "model.safetensors.index.json").read_text())
    w = tensors(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in w.values())
    assert len(set(index["weight_map"].values())) > 1
    for sizes, limit in (((25, 25), 200), ((25, 26), 200), ((10, 40, 10), 160), ((60, 10), 200)):
        state = {f"w{i}": torch.ones(n) for i, n in enumerate(sizes)}  # FP32: 4 bytes each
        items = [(k, tuple(v.shape), v.dtype, lambda v=v: v) for k, v in state.items()]
        d = tmp_path / f"{sizes}-{limit}"
        d.mkdir()
        files = write_weights(items, d, limit)
        hub = split_torch_state_dict_into_shards(state, max_shard_size=limit)
        assert len(files) == len(hub.filename_to_tensors), (sizes, limit, files)
        ours = [sorted(load_file(d / f)) for f in files]
        assert ours == [sorted(t) for t in hub.filename_to_tensors.values()], (sizes, limit)


def test_the_tokenizer_config_says_the_context(v3_mtp):
    cfg, out = v3_mtp
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == cfg.max_seq_len


@pytest.fixture
def rope_across_a_block(tmp_path, monkeypatch):
    """An FP8 export of a DeepseekV3 whose ``kv_a_proj_with_mqa`` RoPE rows (124..131) cross row 128, a block's
    edge, its config then saying rotate-half (so that a re-export reorders those rows): the directory."""
    cls, config_cls, kw = hf_models.FAMILIES["v3-tied-half"]
    monkeypatch.setitem(hf_models.FAMILIES, "v3-tied-half", (cls, config_cls, {**kw, "kv_lora_rank": 124}))
    build("v3-tied-half", tmp_path / "src")
    model, _, tok = load_hf(tmp_path / "src")
    export_model(model, tok, tmp_path / "fp8", "fp8")
    return tmp_path / "fp8"


def _say(path, **quant):
    d = json.loads((path / "config.json").read_text())
    d["rope_interleave"] = False
    d["quantization_config"].update(quant)
    (path / "config.json").write_text(json.dumps(d))


KV_A = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"


def test_rope_rows_that_cross_a_block_are_quantized_again(rope_across_a_block, tmp_path):
    """Reordered rows that cross a 128-row block cannot keep their codes (each block has its own scale): the
    re-export quantizes them again from the exact values, off by at most E4M3's rounding at the block's scale
    (amax / 448): half its largest step (32) is amax / 28. Moved with their old blocks' scales they are off by
    far more."""
    _say(rope_across_a_block)
    export(rope_across_a_block, tmp_path / "again", "fp8")
    a = load_hf(rope_across_a_block, dtype=torch.float32)[0].state_dict()
    b = load_hf(tmp_path / "again", dtype=torch.float32)[0].state_dict()
    key = next(k for k in a if "wkv_a" in k and a[k].ndim == 2)
    assert a[key].shape[0] > TILE
    assert (a[key] - b[key]).abs().max() <= a[key].abs().max() / 28


def test_ue8m0_scales_stay_powers_of_two_when_quantized_again(rope_across_a_block, tmp_path):
    """A source whose scales are UE8M0 (``scale_fmt``, V3.1's): the blocks quantized again (the RoPE rows crossing a
    block) get power-of-two scales too, as the exported config still says."""
    pow2_fp8(rope_across_a_block)
    _say(rope_across_a_block, scale_fmt="ue8m0")
    export(rope_across_a_block, tmp_path / "again", "fp8")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]["scale_fmt"] == "ue8m0"
    s = tensors(tmp_path / "again")[KV_A + "_scale_inv"]
    assert torch.equal(s, torch.exp2(torch.log2(s).round()))


def test_a_kimi_int4_source_with_other_scales_is_quantized_again(tmp_path):
    """Kimi K2's INT4 experts with FP16 group scales (Kimi's are BF16): not its codes' format, so the INT4 export
    quantizes them again, writing BF16 scales, where reusing them wrote scales unlike those announced."""
    (tmp_path / "k2").mkdir()
    build_k2(tmp_path / "k2")
    f = tmp_path / "k2" / "model.safetensors"
    src = load_file(f)
    scales = [k for k in src if k.endswith("weight_scale")]
    assert scales
    save_file({k: v.half() if k in scales else v for k, v in src.items()}, str(f), metadata={"format": "pt"})
    export(tmp_path / "k2", tmp_path / "out", "int4")
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert {out[k].dtype for k in scales} == {torch.bfloat16}
