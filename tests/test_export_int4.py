"""``flyer export --dtype int4``: a DeepseekV3 model written as Moonshot released Kimi K2-Thinking, its routed experts
compressed-tensors' pack-quantized INT4 (symmetric, groups of 32 inputs, BF16 scales), the rest BF16. The oracle is
the compressed-tensors library (the ``test`` extra): flyer's packed codes, scales and shapes equal its own
compression of the same weights bit for bit; flyer reads the export back to its decompression bit for bit;
transformers loads the directory through the library and its logits equal flyer's within
``tests.test_hf_mistral4.logit_tolerance``. Other architectures and experts whose inputs are not whole groups are
one-line errors."""

import dataclasses
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from flyer.cli import main
from flyer.config import preset
from flyer.errors import ConfigError, FieldError
from flyer.interop.export import export
from flyer.interop.export_config import hf_config
from flyer.interop.hf import TextTokenizer, load_hf
from flyer.interop.hf_config_quant import compressed_scheme
from flyer.interop.hf_names import hf_names
from flyer.interop.int4_pack import dequantize_int4, pack_int4, packed_items, quantize_int4
from tests.hf_models import _COMMON, FAMILIES, VOCAB, make_tokenizer, trained_bias
from tests.test_export_streamed import _same_as_loaded
from tests.test_hf_int4 import (EXPERT, GROUP, KIMI_INT4, PARTS, SCHEME, assert_experts_equal, k2,  # noqa: F401 (k2: a fixture)
                                transformers_decompressed)
from tests.test_hf_mistral4 import logit_tolerance
from tests.test_qwen3 import rel

pytest.importorskip("compressed_tensors")  # the oracle: pyproject's test extra
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402


def build(family: str, out, **change) -> None:
    """A tiny random FP32 ``family`` model (``tests.hf_models.FAMILIES``) with ``change`` to its config, saved
    with a tokenizer under ``out``."""
    cls, cfg_cls, kw = FAMILIES[family]
    torch.manual_seed(0)
    model = cls(cfg_cls(**{**_COMMON, **kw, **change}))
    trained_bias(model)
    model.save_pretrained(out)
    make_tokenizer(out)


def library_compress(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """compressed-tensors' compression of ``w`` (R, C) under Kimi's scheme: its min-max scales
    (``calculate_qparams``, of the exact values in FP32) stored in BF16, its ``PackedQuantizationCompressor``
    quantizing the FP32 values against them."""
    groups = w.float().unflatten(-1, (-1, GROUP))
    scale = calculate_qparams(groups.amin(-1), groups.amax(-1), SCHEME.weights)[0].to(torch.bfloat16)
    return PackedQuantizationCompressor.compress({"weight": w.float(), "weight_scale": scale}, SCHEME)


def assert_library_packing(packed: torch.Tensor, scale: torch.Tensor, shape: torch.Tensor, w: torch.Tensor) -> None:
    """flyer's (packed, scale, shape) of ``w`` are the library's, bit for bit (shape: Kimi's int32 of its int64)."""
    want = library_compress(w)
    assert packed.dtype == torch.int32 and torch.equal(packed, want["weight_packed"])
    assert scale.dtype == torch.bfloat16 and torch.equal(scale, want["weight_scale"])
    assert shape.dtype == torch.int32 and shape.tolist() == want["weight_shape"].tolist()


def test_quantize_and_pack_equal_the_librarys():
    """Random rows in FP32 and BF16, a group of zeros, an outlier, and a group whose scale is exactly 1 so that
    +-0.5, 1.5, 2.5, +-7.5 are ties (half to even) and the ends clamp to [-8, 7]: the library's codes, scales
    and shapes; decoded, the library's decompression; every nibble value in every word position packs as
    ``pack_to_int32`` does."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 4 * GROUP, generator=g)
    w[3, :GROUP] = 0
    w[5, 40] = 60.0
    w[7, :GROUP] = 0
    w[7, :10] = torch.tensor([7.5, -7.5, 0.5, -0.5, 1.5, 2.5, -2.5, 6.5, -6.5, 3.25])
    for x in (w, w.bfloat16()):
        packed, scale, shape = quantize_int4(x, GROUP)
        assert_library_packing(packed, scale, shape, x)
        assert float(scale[7, 0]) == 1.0
        want = PackedQuantizationCompressor.decompress(library_compress(x), SCHEME)["weight"]
        assert torch.equal(dequantize_int4(packed, scale, shape, torch.bfloat16), want)
    assert dequantize_int4(*quantize_int4(w, GROUP))[7, :10].tolist() == [7, -8, 0, 0, 2, 2, -2, 6, -6, 3]
    for cols in (64, 29):
        q = torch.randint(-8, 8, (16, cols), generator=g, dtype=torch.int8)
        assert torch.equal(pack_int4(q), pack_to_int32(q, 4))
    with pytest.raises(ValueError, match="experts.0.w2"):
        quantize_int4(torch.ones(4, 48), GROUP, name="experts.0.w2")


def test_packed_items_encode_each_weight_once_when_written():
    """The export's items of one weight announce the shapes and dtypes they make; the weight is read and encoded
    once, when its codes are written, not before (one weight in memory at a time)."""
    w = torch.randn(8, 2 * GROUP, generator=torch.Generator().manual_seed(1))
    reads = []
    items = packed_items("m.experts.3.up_proj.weight", (8, 2 * GROUP), lambda: reads.append(1) or w, GROUP)
    assert [(n, s, d) for n, s, d, _ in items] == [("m.experts.3.up_proj.weight_packed", (8, 8), torch.int32),
                                                   ("m.experts.3.up_proj.weight_scale", (8, 2), torch.bfloat16),
                                                   ("m.experts.3.up_proj.weight_shape", (2,), torch.int32)]
    assert not reads
    made = [make() for *_, make in items]
    assert len(reads) == 1 and [tuple(t.shape) for t in made] == [s for _, s, _, _ in items]
    assert_library_packing(*made, w)


@pytest.fixture(scope="module")
def exported_int4(tmp_path_factory):
    """A tiny random FP32 DeepseekV3 (every expert weight two groups of inputs wide) and its INT4 export."""
    root = tmp_path_factory.mktemp("export-int4")
    build("v3", root / "src", moe_intermediate_size=2 * GROUP)
    summary = export(root / "src", root / "out", "int4")
    return root / "src", root / "out", summary


def test_export_is_kimis_format_and_the_librarys_compression(exported_int4):
    """config.json carries Kimi-K2-Thinking's quantization_config; every routed expert weight (and only those) is
    a packed trio equal to the library's compression of the source weight; every other tensor is the source's in
    BF16 (the router's correction bias FP32, as in DeepSeek's and Kimi's checkpoints)."""
    src, out, summary = exported_int4
    d = json.loads((out / "config.json").read_text())
    assert summary["model_type"] == d["model_type"] == "deepseek_v3" and summary["dtype"] == "int4"
    assert d["quantization_config"] == KIMI_INT4 and d["dtype"] == "bfloat16"
    source = load_file(str(src / "model.safetensors"))
    written = load_file(str(out / "model.safetensors"))
    experts = {k for k in source if EXPERT.fullmatch(k)}
    assert len(experts) == 2 * 8 * 3
    for k, v in source.items():
        stem = k.removesuffix("weight")
        if k in experts:
            assert k not in written
            assert_library_packing(*(written[stem + p] for p in ("weight_packed", "weight_scale", "weight_shape")), v)
        else:
            keep = torch.float32 if k.endswith("e_score_correction_bias") else torch.bfloat16  # as DeepSeek's
            assert written[k].dtype == keep and torch.equal(written[k], v.to(keep)), k
    assert len(written) == len(source) + 2 * len(experts)


def test_read_back_by_flyer_and_transformers(exported_int4):
    """flyer reads the export's experts as the library's decompression, bit for bit (in BF16 and FP32);
    transformers (through compressed-tensors) loads the same expert values, and its FP32 logits equal flyer's
    within ``logit_tolerance``."""
    src, out, _ = exported_int4
    source = load_file(str(src / "model.safetensors"))
    want = {k: PackedQuantizationCompressor.decompress(library_compress(v), SCHEME)["weight"]
            for k, v in source.items() if EXPERT.fullmatch(k)}
    assert_experts_equal(load_hf(out)[0], want, torch.bfloat16)  # the export's own dtype
    model, cfg, _ = load_hf(out, dtype=torch.float32)
    assert_experts_equal(model, want, torch.float32)
    ref, loaded = transformers_decompressed(out)
    assert torch.equal(loaded["model.layers.2.mlp.experts.down_proj"][5],
                       want["model.layers.2.mlp.experts.5.down_proj.weight"])
    x = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel(model(x), ref(x).logits) <= logit_tolerance(cfg, 24)


def test_streamed_export_is_the_loaded_models(exported_int4, tmp_path):
    """Streamed from the directory, the INT4 export writes the bytes exporting the loaded model writes."""
    _same_as_loaded(exported_int4[0], tmp_path, "int4")


@pytest.mark.parametrize("family, change, problem", [
    ("qwen3_moe", {}, "--dtype: int4 .* exports as qwen3_moe"),
    ("v2-lite", {}, "--dtype: int4 .* exports as deepseek_v2"),
    ("v3", {"moe_intermediate_size": 48}, "config field 'moe_inter_dim'.* multiple of 32 .*got 48"),
], ids=["gqa-moe", "softmax-router", "partial-group"])
def test_what_int4_cannot_write_is_one_line(tmp_path, capsys, family, change, problem):
    """Another architecture, or an expert whose inputs are not whole groups of 32: exit 2, one line naming the
    flag or the config field, and nothing written."""
    build(family, tmp_path / "src", **change)
    with pytest.raises((FieldError, ConfigError)):
        export(tmp_path / "src", tmp_path / "out", "int4")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--dtype", "int4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flyer: error: ") and "\n" not in err
    assert re.search(problem, err), err
    assert not (tmp_path / "out").exists()


def test_kimi_source_keeps_its_codes(k2, tmp_path):  # noqa: F811 (k2: the fixture)
    """Exported from a Kimi K2-Thinking directory (INT4 experts whose scales are not absmax / 7.5 of what they
    encode, as quantization-aware training leaves them), the experts keep the source's packed codes and scales
    bit for bit (their shapes as int32): requantizing their values would change them."""
    path, _ = k2
    source = load_file(str(path / "model.safetensors"))
    for k in [k for k in source if k.endswith("weight_scale")]:  # scales absmax / 7.5 would not give back
        source[k] = (source[k].float() * 1.25).bfloat16()
    save_file(source, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    for f in path.iterdir():
        if f.name != "model.safetensors":
            (tmp_path / f.name).symlink_to(f)
    export(tmp_path, tmp_path / "out", "int4")
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    packed = [k for k in source if k.endswith(PARTS)]
    assert len(packed) == 3 * 2 * 8 * 3
    for k in packed:
        assert written[k].dtype == (torch.int32 if k.endswith("shape") else source[k].dtype), k
        assert torch.equal(written[k], source[k].to(written[k].dtype)), k


@pytest.mark.parametrize("mtp_depth", [0, 1])
def test_the_config_ignores_every_weight_left_unpacked(tmp_path, mtp_depth):
    """The export's ``quantization_config`` (read as flyer and compressed-tensors match it) ignores every linear weight
    the export writes unpacked and none it packs, an MTP layer's ``eh_proj`` and ``shared_head.head`` included; with
    no MTP layer, it is Kimi's published one."""
    cfg = dataclasses.replace(preset("tiny"), mtp_depth=mtp_depth, moe_inter_dim=2 * GROUP)
    tok = TextTokenizer(Tokenizer.from_file(str(_tokenizer(tmp_path))))
    scheme = compressed_scheme(hf_config(cfg, tok, "int4"))
    names = hf_names(cfg, rope_half=False)
    linears = [n.removesuffix(".weight") for n, slot in names.items() if n.endswith(".weight")
               and not re.search(r"norm|embed_tokens|mlp\.gate\.weight$", n)]
    assert any(".eh_proj" in n for n in linears) == (mtp_depth > 0)
    for module in linears:
        assert scheme.ignores(module) != bool(EXPERT.fullmatch(module + ".weight")), module
    if not mtp_depth:
        assert hf_config(cfg, tok, "int4")["quantization_config"] == KIMI_INT4


def _tokenizer(tmp_path):
    make_tokenizer(tmp_path)
    return tmp_path / "tokenizer.json"
