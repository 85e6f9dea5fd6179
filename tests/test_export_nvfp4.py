"""``flyer export --dtype nvfp4``: every linear but the head, routers and DSA's indexer head weights written as
compressed-tensors' NVFP4 (W4A16, llm-compressor's NVFP4A16), the rest BF16. The oracle is the compressed-tensors
library: ``quantize_nvfp4`` equals its compression of the same weight bit for bit (codes, FP8 block scales, global
scale), on edge cases too; the export's config is the library's own for the scheme; transformers loads the
directory through the library and its logits equal flyer's reading of the export within ``logit_tolerance``; flyer
reads its export back to the library's decompression. DeepSeek-V4 and widths off 16 are one-line errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from flyer.cli import main
from flyer.errors import FieldError
from flyer.interop.export import export
from flyer.interop.hf import load_hf
from flyer.interop.hf_config_quant import compressed_scheme
from flyer.interop.nvfp4_pack import NVFP4_IGNORE, nvfp4_config, nvfp4_items, quantize_nvfp4
from tests.hf_models import FAMILIES, build
from tests.test_hf_compressed import assert_logits_match, transformers_decompressed
from tests.test_hf_compressed_groups import library_groups, module_tree
from tests.test_hf_nvfp4 import library_config, library_nvfp4

pytest.importorskip("compressed_tensors")  # the oracle: pyproject's test extra


def _cases() -> list[torch.Tensor]:
    """Weights whose rows span 5 decades (small rows' block scales go subnormal in E4M3, or to its eps), an all-zero
    block, one outlier, values near FP32's smallest, an all-zero weight (its global scale not finite: 1), exact
    -0.0 entries."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 64, generator=g) * torch.logspace(-4, 1, 8).unsqueeze(1)
    zero_block, outlier = base.clone(), base.clone()
    zero_block[2, :16] = 0
    outlier[3, 5] = 1e4
    negative_zeros = base.clone()  # a pruned weight's (w * mask): the library's +0 code, not -0
    negative_zeros[base.abs() < base.abs().median()] = -0.0
    return [base, zero_block, outlier, base * 1e-30, torch.zeros(4, 32), negative_zeros]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_is_the_librarys(dtype):
    for w in _cases():
        parts, _ = library_nvfp4(w.to(dtype))
        packed, scale, g = quantize_nvfp4(w.to(dtype))
        assert torch.equal(packed, parts["weight_packed"])
        assert torch.equal(scale.view(torch.uint8), parts["weight_scale"].view(torch.uint8))
        assert torch.equal(g, parts["weight_global_scale"])


def test_config_is_the_librarys():
    """The export's ``quantization_config`` is compressed-tensors' serialisation of its NVFP4A16 scheme, and flyer
    reads it as such."""
    assert nvfp4_config() == library_config("NVFP4A16", NVFP4_IGNORE)
    assert compressed_scheme({"quantization_config": nvfp4_config()}).groups[0][2].format == "nvfp4-pack-quantized"


def _export(tmp_path, family: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the source's tensors, the NVFP4 export's) of a tiny random ``family`` model."""
    build(family, tmp_path / "src")
    export(tmp_path / "src", tmp_path / "out", "nvfp4")
    out = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        out.update(load_file(str(f)))
    return load_file(str(tmp_path / "src" / "model.safetensors")), out


@pytest.mark.parametrize("family", ["v2-lite", "qwen3_moe"])
def test_export_is_the_librarys_compression(tmp_path, family):
    """A DeepseekV2-Lite (MLA, dense MLP, shared and routed experts) or Qwen3-MoE (a Linear router, left BF16 by
    ``ignore``) exported in NVFP4: each linear's tensors the library's compression of the source's weight (as stored:
    FP32 here), the head and routers BF16, the library's config; flyer reads the export back to the library's
    decompression (a routed expert's too, bit for bit in FP32)."""
    src, out = _export(tmp_path, family)
    quantized = [k.removesuffix("_packed") for k in out if k.endswith(".weight_packed")]
    assert quantized and all(k not in out for k in quantized)
    want = {}
    for k in quantized:
        parts, want[k] = library_nvfp4(src[k])
        stem = k.removesuffix("weight")
        for part, t in parts.items():
            assert torch.equal(out[stem + part].view(torch.uint8), t.view(torch.uint8)), stem + part
    assert out["lm_head.weight"].dtype == torch.bfloat16
    assert all(out[k].dtype == torch.bfloat16 for k in out if k.endswith("mlp.gate.weight"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"] == nvfp4_config()
    # the modules the library's own matching quantizes under that config: exactly those written in NVFP4
    assert set(library_groups(module_tree(src, family), nvfp4_config())) == {k.removesuffix(".weight")
                                                                             for k in quantized}
    model = load_hf(tmp_path / "out", dtype=torch.float32)[0]
    expert = next(k for k in quantized if ".experts.0.gate_proj" in k)
    assert torch.equal(model.layers[int(expert.split(".")[2])].ffn.experts.w1[0], want[expert])


# transformers fuses MoE experts as it loads them, and its compressed-tensors route decodes NVFP4 expert stacks
# wrongly there (values ~1e3 where the library's decompression is ~0.1): its logits are checked on Llama
@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")  # run_compressed off, as asked
def test_export_logits_equal_transformers(tmp_path):
    """transformers' model of an NVFP4 Llama export (decompressed by the library as it loads) within
    ``logit_tolerance`` of flyer's reading of it, each weight the decoded value rounded once to BF16 on both."""
    _export(tmp_path, "llama")
    model, cfg, _ = load_hf(tmp_path / "out", dtype=torch.bfloat16)
    model.float()
    ref = transformers_decompressed(tmp_path / "out", FAMILIES["llama"][0])
    assert_logits_match(model, ref, cfg)


def test_what_nvfp4_cannot_write_is_one_line(tmp_path, capsys):
    """DeepSeek-V4 (its own FP4 experts: --dtype fp8): exit 2, one line naming --dtype, nothing written; a linear
    whose input width is no multiple of 16: ``FieldError`` naming dtype and the weight."""
    build("v4", tmp_path / "v4")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "v4"), "--out", str(tmp_path / "x"), "--dtype", "nvfp4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flyer: error: --dtype: ") and "\n" not in err and not (tmp_path / "x").exists()
    with pytest.raises(FieldError, match="multiple of 16: layers.0.w.weight has 24"):
        nvfp4_items("layers.0.w.weight", (4, 24), lambda: torch.zeros(4, 24))
