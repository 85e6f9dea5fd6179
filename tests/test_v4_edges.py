"""DeepSeek-V4 interop edges a mutation sweep of ``flyer.interop.v4_quant`` / ``hf_config_v4`` found unpinned:
FP4 in each dtype it is packed in, a held FP8 weight whose rows move inside their blocks, and a V4 config read
as transformers' own ``DeepseekV4Config`` reads it: the legacy compress-rate scalars, YaRN's attention factor, the
indexer of a model without CSA layers, and RoPE scaling given as a flat ``rope_parameters``, which was dropped."""

import gc
import re
import weakref

import pytest
import torch
from test_v4_counts import checkpoint_tensors
from transformers import DeepseekV4Config

from flyer.config import preset
from flyer.errors import ConfigError
from flyer.interop.hf_config_v4 import _CSA, _HCA, from_v4_config
from flyer.interop.v4_quant import (FP4_DTYPES, dequantize_fp4_e2m1, dequantize_ue8m0_blocks, held_e4m3_blocks,
                                    published_format, quantize_fp4_e2m1, quantize_ue8m0_blocks, quantized_items,
                                    stored_format)


def test_fp4_packed_in_any_of_its_dtypes_is_fp4():
    keys = {"layers.0.ffn.experts.0.w1.weight", "layers.0.ffn.experts.0.w1.scale"}
    packed, scale = quantize_fp4_e2m1(torch.randn(4, 64, generator=torch.Generator().manual_seed(0)))
    want = dequantize_fp4_e2m1(packed, scale)
    assert torch.uint8 in FP4_DTYPES and torch.int8 in FP4_DTYPES
    for dt in FP4_DTYPES:
        assert stored_format("layers.0.ffn.experts.0.w1.weight", keys, dt) == "fp4", dt
        assert torch.equal(dequantize_fp4_e2m1(packed.view(dt), scale), want), dt


def test_a_held_weight_whose_rows_stay_in_their_blocks_keeps_the_checkpoints_codes():
    """A rope permutation inside each 128-row block keeps the codes (permuted) and scales byte for byte; encoding
    again would change blocks whose largest code is 224 (their scale halved, codes doubled)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 128, generator=g)
    codes = (w / w.abs().amax() * 224).to(torch.float8_e4m3fn)
    scale = torch.tensor([[130], [125]], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    order = torch.cat([torch.randperm(128, generator=g), 128 + torch.randperm(128, generator=g)])
    got, s = held_e4m3_blocks("fp8_ue8m0", codes, scale, order=order)
    assert torch.equal(got.view(torch.uint8), codes.view(torch.uint8)[order])
    assert s.tolist() == [[2.0 ** 3], [2.0 ** -2]]
    assert torch.equal(got.float() * s.repeat_interleave(128, 0), dequantize_ue8m0_blocks(codes, scale)[order])


_YARN = {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536, "beta_fast": 32,
         "beta_slow": 1}


@pytest.mark.parametrize("d", [
    {"num_hidden_layers": 6},  # transformers' defaults: layer pattern, hash layers, 64/512 rope dims, one MTP
    {"num_hidden_layers": 6, "compress_rate_csa": 8, "compress_rate_hca": 64},  # the legacy scalars
    {"num_hidden_layers": 4, "compress_ratios": [128, 4, 0, 4, 0], "num_hash_layers": 2},
    {"num_hidden_layers": 4, "num_hash_layers": 9, "num_nextn_predict_layers": 0},  # hash layers capped at n
    {"num_hidden_layers": 4, "rope_scaling": {**_YARN, "attention_factor": 0.9}},  # the file's attention_factor
    {"num_hidden_layers": 4, "rope_scaling": dict(_YARN)},  # 1 unless given
    {"num_hidden_layers": 4, "rope_parameters": dict(_YARN)},  # transformers 5's flat spelling (was dropped)
    {"num_hidden_layers": 4, "rope_parameters": {**_YARN, "factor": 8.0}, "rope_scaling": dict(_YARN)},
])
def test_a_v4_config_reads_as_transformers_config_reads_it(d):
    c, f = DeepseekV4Config(**{k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}), from_v4_config(d)
    assert f["compress_ratios"] == tuple(0 if t == "sliding_attention" else c.compress_rates[t] for t in c.layer_types)
    assert f["csa_ratio"] == c.compress_rates["compressed_sparse_attention"]
    assert f["n_hash_layers"] == c.mlp_layer_types.count("hash_moe")
    assert f["qk_rope_head_dim"] == c.qk_rope_head_dim and f["mtp_depth"] == c.num_nextn_predict_layers
    comp = c.rope_parameters["compress"]
    assert (f["rope_theta"], f["compress_rope_theta"]) == (c.rope_parameters["main"]["rope_theta"], comp["rope_theta"])
    assert f["rope_type"] == comp["rope_type"]
    if comp["rope_type"] == "yarn":
        assert (f["rope_factor"], f["rope_attn_factor"], f["original_seq_len"]) == (
            comp["factor"], comp["attention_factor"], comp["original_max_position_embeddings"])


def test_a_model_without_csa_layers_has_no_indexer():
    d = {"num_hidden_layers": 3, "compress_ratios": [128, 0, 128]}
    assert from_v4_config(d)["index_topk"] == 0
    assert from_v4_config({**d, "compress_ratios": [128, 4, 128]})["index_topk"] == 512


@pytest.mark.parametrize("change, field", [
    ({"compress_rates": {_CSA: 4, _HCA: 4}}, "compress_rates"),  # one ratio would read as both kinds
    ({"compress_rate_csa": 16, "compress_rate_hca": 16}, "compress_rates"),  # the legacy scalars
    ({"mlp_layer_types": ["moe", "hash_moe", "moe", "moe"]}, "mlp_layer_types"),  # flyer hashes the first
    ({"rope_parameters": {"main": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0},
                          "compress": {"rope_type": "default", "rope_theta": 1.6e5}}}, "rope_parameters.main"),
])
def test_a_v4_config_flyer_cannot_compute_is_refused_naming_the_field(change, field):
    with pytest.raises(ConfigError, match=re.escape(f"field '{field}")) as e:
        from_v4_config({"num_hidden_layers": 4, **change})
    assert "\n" not in str(e.value)


def test_quantized_items_write_the_encoding_and_then_let_it_go():
    w = torch.randn(130, 200, generator=torch.Generator().manual_seed(0))
    calls = []
    (_, _, _, make_w), (_, _, _, make_s) = quantized_items("x.weight", (130, 200), "fp8_ue8m0",
                                                           lambda: calls.append(1) or w)
    codes = make_w()
    want_codes, want_scale = quantize_ue8m0_blocks(w)
    assert torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8))
    held = weakref.ref(codes)
    del codes
    assert torch.equal(make_s().view(torch.uint8), want_scale.view(torch.uint8)) and calls == [1]
    gc.collect()
    assert held() is None  # an export streams tensor by tensor: a written weight's codes are not kept


def test_published_format_names_every_tensor_of_the_v4_flash_manifest():
    """The published V4-Flash checkpoint's tensors (tests/test_v4_counts.py's manifest, main model and mtp.0): an
    F8_E4M3 weight is fp8_ue8m0, an I8 one fp4, everything else plain."""
    kinds = {"F8_E4M3": "fp8_ue8m0", "I8": "fp4"}
    names = {n: kinds.get(dtype, "plain") for n, dtype, _, _ in checkpoint_tensors(preset("dsv4-flash"), mtp=True)
             if not n.endswith(".scale")}
    assert "mtp.0.h_proj.weight" in names and "mtp.0.e_proj.weight" in names
    assert {n: published_format(n) for n in names} == names
