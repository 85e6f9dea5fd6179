"""DeepSeek-V4 interop edges a mutation sweep of ``flyer.interop.v4_quant`` / ``hf_config_v4`` found unpinned:
FP4 in each dtype it is packed in, a held FP8 weight whose rows move inside their blocks, and a V4 config read
as transformers' own ``DeepseekV4Config`` reads it: the legacy compress-rate scalars, YaRN's attention factor, the
indexer of a model without CSA layers, and RoPE scaling given as a flat ``rope_parameters``, which was dropped."""

import pytest
import torch
from transformers import DeepseekV4Config

from flyer.interop.hf_config_v4 import from_v4_config
from flyer.interop.v4_quant import (FP4_DTYPES, dequantize_fp4_e2m1, dequantize_ue8m0_blocks, held_e4m3_blocks,
                                    quantize_fp4_e2m1, stored_format)


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
