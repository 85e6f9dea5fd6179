"""``flyer export --dtype fp8`` as transformers reads it, for every architecture flyer writes.

Without a GPU transformers dequantizes a fine-grained FP8 checkpoint (``quantization_config``
``quant_method: fp8``, 128x128 ``weight_scale_inv`` blocks) into BF16 weights as it loads it. The
oracle is the same checkpoint exported by flyer in BF16: flyer's dequantization (each code times
its block's scale, exact in FP32) rounded once to BF16. transformers rounds the same exact product
once, so every parameter and buffer of the two transformers models is equal, bit for bit."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from flyer.interop.export import export
from tests.hf_models import build
from tests.test_interop_export import tensors

FAMILIES = ["v3", "v2-lite", "llama", "qwen2", "qwen3", "qwen3_moe", "mixtral", "glm4_moe", "v32"]


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_reads_the_fp8_export_as_flyer_dequantizes_it(tmp_path, family):
    build(family, tmp_path / "src")
    export(tmp_path / "src", tmp_path / "fp8", "fp8")
    files = tensors(tmp_path / "fp8")
    codes = [k for k, t in files.items() if t.dtype == torch.float8_e4m3fn]
    assert codes and all(k.removesuffix("weight") + "weight_scale_inv" in files for k in codes)
    export(tmp_path / "fp8", tmp_path / "bf16", "bf16")  # the oracle: flyer's dequantization, rounded to BF16

    got = AutoModelForCausalLM.from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16).state_dict()
    want = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16).state_dict()
    assert got.keys() == want.keys()
    for name, w in want.items():
        assert torch.equal(got[name], w), f"{family}: transformers read {name} of the FP8 export as another value"
