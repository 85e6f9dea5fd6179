"""``--weight-dtype auto`` of a compressed-tensors or ModelOpt checkpoint (``flyer.interop.load.stored_weight_dtype``):
the smallest held dtype that is lossless for its quantized weights, decided from config and headers alone.

For each layout the tiny checkpoints of the format tests (tests/test_hf_fp8_weights.py, test_hf_nvfp4.py,
test_hf_compressed.py) are loaded with auto's choice and in FP32, and every held weight compared bit for bit with the
FP32 load's (FP8: its codes times its tiles' scales); the next smaller dtype is shown to lose values, so the choice is
the smallest. FP8 with BF16 scales is the one case the two differ: held FP8 keeps each code x scale exactly (12
significant bits), where the decoding rounds it to BF16, as compressed-tensors does; the held value so rounded is the
FP32 load's."""

import argparse
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from flyer.infer.cli import STORED, resolve_weight_dtype
from flyer.infer.weights import WEIGHT_DTYPES
from flyer.interop.hf import load_hf, weight_files
from flyer.interop.load import stored_weight_dtype
from flyer.interop.tensorfile import TensorFile
from tests import test_hf_compressed as ct_int, test_hf_fp8_weights as ct_fp8, test_hf_nvfp4 as fp4
from tests.hf_models import FAMILIES
from tests.test_v4_held_fp8 import _held_values

pytest.importorskip("compressed_tensors")  # the builders' oracle: pyproject's test extra

INT4 = ("pack-quantized", 4, True, "group", None)
INT8_ASYM = ("naive-quantized", 8, False, "channel", None)


def _fp32_scales(path) -> None:
    """Every quantized weight's ``weight_scale`` stored in FP32 (the same values), as some exporters write them."""
    ct_fp8._rewrite(path, lambda t: t.update({k: v.float() for k, v in t.items() if k.endswith(".weight_scale")}))


def _rope_across_tiles(path) -> None:
    """Per-tensor FP8 (BF16 scales) of a DeepseekV3 in rotate-half rope layout whose ``q_b_proj`` has a head's rope
    rows on both sides of row 128 (4 heads of 36 + 8 rows: rows 124..131): permuted to flyer's interleaved layout,
    they leave their 128-row tile, so that weight's codes cannot be kept (``hf._hold_codes``): decoded instead."""
    cls, config_cls, kw = FAMILIES["v3-tied-half"]
    FAMILIES["v3-rope-across-tiles"] = (cls, config_cls, {**kw, "qk_nope_head_dim": 36})
    try:
        ct_fp8.build(path, ct_fp8.CT, "FP8", family="v3-rope-across-tiles")
    finally:
        del FAMILIES["v3-rope-across-tiles"]


# (id, builder of the tiny checkpoint at a path, auto's choice)
CASES = [
    ("fp8-tensor-bf16", lambda p: ct_fp8.build(p, ct_fp8.CT, "FP8"), "fp8"),
    ("fp8-tensor-fp32", lambda p: ct_fp8.build(p, ct_fp8.CT, "FP8", family="llama", scale_dtype=torch.float32),
     "fp8"),
    ("fp8-block128", lambda p: ct_fp8.build(p, ct_fp8.NAIVE, "FP8_BLOCK", family="qwen3_moe"), "fp8"),
    ("fp8-modelopt", lambda p: ct_fp8.build(p, ct_fp8.MODELOPT, family="llama"), "fp8"),
    ("fp8-tensor-rope-across-tiles", _rope_across_tiles, "bf16"),
    ("fp8-channel-bf16", lambda p: ct_fp8.build(p, ct_fp8.CT, "FP8_DYNAMIC"), "bf16"),
    ("fp8-block24x40-bf16", lambda p: ct_fp8.build(p, ct_fp8.CT, "FP8_BLOCK", [24, 40], "llama"), "bf16"),
    ("fp8-channel-fp32", lambda p: ct_fp8.build(p, ct_fp8.CT, "FP8_DYNAMIC", scale_dtype=torch.float32), "fp32"),
    ("int4-group", lambda p: ct_int.build(p, INT4), "bf16"),
    ("int8-asym-channel", lambda p: ct_int.build(p, INT8_ASYM, "v3"), "bf16"),
    ("int4-fp32-scales", lambda p: (ct_int.build(p, INT4), _fp32_scales(p)), "fp32"),
    ("mxfp4", lambda p: fp4.build(p, fp4.MX), "bf16"),
    ("nvfp4", lambda p: fp4.build(p, fp4.CT), "fp32"),
    ("nvfp4-modelopt", lambda p: fp4.build(p, fp4.MODELOPT, "qwen3_moe"), "fp32"),
]
SMALLER = {"fp32": "bf16", "bf16": "fp8"}


def _held(path, weight_dtype: str) -> dict[str, torch.Tensor]:
    """Each held GEMM weight's FP32 values (FP8: codes x tile scales) of ``path`` loaded holding ``weight_dtype``."""
    model = load_hf(path, dtype=torch.float32, held=WEIGHT_DTYPES[weight_dtype])[0]
    if weight_dtype == "fp8":
        return _held_values(model)
    return {k: v.float() for k, v in model.state_dict().items() if v.dtype == WEIGHT_DTYPES[weight_dtype]}


@pytest.mark.parametrize("build, choice", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_auto_is_the_smallest_lossless_dtype(tmp_path, monkeypatch, build, choice):
    build(tmp_path)
    reads, read = Counter(), TensorFile.read
    monkeypatch.setattr(TensorFile, "read", lambda tf, name, *a, **k: reads.update([name]) or read(tf, name, *a, **k))
    assert stored_weight_dtype(tmp_path) == choice
    assert not reads, reads  # config and headers only
    monkeypatch.undo()
    ref = load_hf(tmp_path, dtype=torch.float32)[0].state_dict()
    if choice == "fp32":  # nothing held: the FP32 load itself
        held = ref
    else:
        held = _held(tmp_path, choice)
        assert len(held) > 5
        rounded = {k: v.bfloat16().float() if _bf16_scaled_fp8(tmp_path, choice) else v for k, v in held.items()}
        assert [k for k, v in rounded.items() if not torch.equal(v, ref[k])] == []
    if choice in SMALLER:  # one size down loses values of some quantized weight
        assert any(not torch.equal(v, ref[k]) for k, v in _held(tmp_path, SMALLER[choice]).items())


def _bf16_scaled_fp8(path, choice: str) -> bool:
    """Held FP8 codes whose scales are BF16: the held value is code x scale exactly, the decoding's is it rounded to
    BF16 (module docstring)."""
    if choice != "fp8":
        return False
    return any(TensorFile(f).dtype(n) == torch.bfloat16 for n, f in weight_files(path).items()
               if n.endswith(".weight_scale"))


def test_fp8_held_values_are_the_exact_products(tmp_path):
    """BF16-scaled FP8 held as its codes: each value is code x scale computed exactly (FP64), which the FP32 load
    rounds to BF16 as the library does; some values do round (the choice keeps more than the decoding)."""
    ct_fp8.build(tmp_path, ct_fp8.CT, "FP8")
    held = _held(tmp_path, "fp8")
    ref = load_hf(tmp_path, dtype=torch.float32)[0].state_dict()
    t = load_file(str(tmp_path / "model.safetensors"))
    key, stem = "layers.1.attn.wo.weight", "model.layers.1.self_attn.o_proj"
    exact = t[stem + ".weight"].double() * t[stem + ".weight_scale"].double()
    assert torch.equal(held[key].double(), exact)
    assert torch.equal(exact.bfloat16().float(), ref[key]) and not torch.equal(held[key], ref[key])


def test_cli_auto_takes_the_choice_on_the_cpu_only(tmp_path):
    """``resolve_weight_dtype``: auto of a quantized checkpoint is ``stored_weight_dtype``'s on the CPU; elsewhere the
    checkpoint's own dtype, not held."""
    ct_int.build(tmp_path, INT4)
    args = argparse.Namespace(weight_dtype="auto", precision="bf16", ckpt=str(tmp_path))
    assert resolve_weight_dtype(args, torch.device("cpu")) == "bf16"
    assert resolve_weight_dtype(args, torch.device("meta")) == STORED
