"""compressed-tensors and HF-name edges a mutation sweep of ``flyer.interop.compressed`` / ``hf_config_quant`` /
``hf_names`` found unpinned, and zero points of at most 8 rows (one packed word a group), which crashed the decoder.
Oracles: compressed-tensors (its compressors, ``pack_to_int32`` / ``unpack_from_int32``, ``QuantizationArgs``'
defaults, ``apply_quantization_config``'s matching), the format's definition w = (q - z[g]) s[g], and transformers'
logits (within ``logit_tolerance``)."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs
from safetensors.torch import save_file
from torch import nn
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from flyer.config import ModelConfig
from flyer.errors import CheckpointError, ConfigError
from flyer.infer.weights import FP8
from flyer.interop.compressed import (compressed_shape, dequantize, module_classes, read_compressed, scheme_of,
                                      unpack_int32)
from flyer.interop.hf import load_hf
from flyer.interop.hf_config import from_hf_config
from flyer.interop.hf_config_quant import CompressedConfig, CompressedScheme, compressed_scheme
from flyer.interop.hf_names import hf_names
from flyer.interop.tensorfile import header
from tests.hf_models import _COMMON, FAMILIES, plain_twin, save_tiny
from tests.test_hf_compressed import NAIVE, PACK, build, combo_config, compress
from tests.test_hf_compressed_groups import library_groups
from tests.test_hf_fp8_weights import _inputs
from tests.test_hf_mistral4 import logit_tolerance
from tests.test_hf_nvfp4 import library_config, library_mxfp4, library_nvfp4
from tests.test_qwen3 import rel

STEM = "model.layers.0.self_attn.o_proj"


def _write(tmp_path, parts: dict[str, torch.Tensor]):
    """(files, headers) of one safetensors file holding ``STEM``'s ``parts`` (suffix -> tensor)."""
    p = tmp_path / "model.safetensors"
    save_file({f"{STEM}.{k}": v.contiguous() for k, v in parts.items()}, str(p), metadata={"format": "pt"})
    return {f"{STEM}.{k}": p for k in parts}, {}


def _decode(tmp_path, parts, combo, group=16):
    files, headers = _write(tmp_path, parts)
    config = compressed_scheme({"quantization_config": combo_config(*combo, group)})
    name = f"{STEM}.weight_packed" if f"{STEM}.weight_packed" in files else f"{STEM}.weight"
    shape = compressed_shape(name, files, headers, config)
    w = read_compressed(header(headers, files[name]), name, files, headers, config, torch.float32)
    return shape, w


# --- compressed.py ------------------------------------------------------------------------------------------------

def test_int8_stored_codes_of_fewer_bits_stay_in_their_range(tmp_path):
    """A 4-bit naive-quantized weight whose int8 code holds 100, or a zero point 9: refused, not decoded to a weight
    12x the format's largest (the library checks neither)."""
    q = torch.randint(-8, 8, (16, 32), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    parts = {"weight": q, "weight_scale": torch.ones(16, 2, dtype=torch.bfloat16)}
    _decode(tmp_path, parts, ("naive-quantized", 4, True, "group", None))
    wide = q.clone()
    wide[3, 5] = 100
    for bad in ({"weight": wide}, {"weight_zero_point": torch.full((16, 2), 9, dtype=torch.int8)}):
        with pytest.raises(ValueError, match=r"4-bit (codes|zero points) lie outside \[-8, 7\]"):
            _decode(tmp_path, {**parts, **bad}, ("naive-quantized", 4, "weight_zero_point" not in bad, "group", None))


def test_packed_errors_name_the_tensor_at_fault(tmp_path):
    """Float zero points beside int32 codes named the codes' dtype; a weight_shape whose width the packed words
    allow but g_idx does not blamed g_idx."""
    q = torch.randint(-8, 8, (16, 32), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    packed = {"weight_packed": pack_to_int32(q, 4), "weight_shape": torch.tensor([16, 32], dtype=torch.int32),
              "weight_scale": torch.ones(16, 2, dtype=torch.bfloat16)}
    zero = {"weight_zero_point": pack_to_int32(torch.zeros(16, 2, dtype=torch.int8), 4, packed_dim=0).float()}
    with pytest.raises(ValueError, match=r"packed zero points must be int32 \(got torch.float32\)"):
        _decode(tmp_path, {**packed, **zero}, ("pack-quantized", 4, False, "group", None))
    g_idx = {"weight_g_idx": (torch.arange(32) // 16).to(torch.int32),
             "weight_shape": torch.tensor([16, 29], dtype=torch.int32)}
    with pytest.raises(ValueError, match=r"weight_shape \[16, 29\] does not match weight_g_idx's 32 columns"):
        _decode(tmp_path, {**packed, **g_idx}, ("pack-quantized", 4, True, "group", "group"))



def test_negative_g_idx_is_refused():  # kills C10
    """A g_idx entry < 0 names no group: refused, never read as a group counted from the end."""
    q = torch.tensor([[3, -2, 7, 0]], dtype=torch.int8)
    scale, zero = torch.tensor([[0.5, 2.0]]), torch.tensor([[1, -3]], dtype=torch.int8)
    with pytest.raises(ValueError, match="w.up"):
        dequantize(q, scale, zero, torch.tensor([-1, 0, 0, 1]), name="w.up")


def test_3bit_packed_rows_with_padding_decode_as_the_library(tmp_path):  # kills C27
    """3-bit codes whose row (48 columns: 144 bits) does not fill its last word: the weight is 48 columns wide, as
    the scales say (the packed words would say 53), equal to the library's decompression."""
    w = torch.randn(8, 48, generator=torch.Generator().manual_seed(0)).bfloat16()
    combo = (PACK, 3, True, "group", None)
    parts, want = compress(w, *combo, torch.Generator().manual_seed(1))
    shape, got = _decode(tmp_path, parts, combo)
    assert shape == (8, 48) and torch.equal(got, want.float())


def test_actorder_groups_of_a_ragged_width(tmp_path):  # kills C14
    """actorder "group" on 40 columns in groups of 16: ceil(40/16) = 3 scales a row, column j's by g_idx[j]
    (the format's definition: w = (q - z[g]) * s[g], rounded once to the scales' dtype)."""
    g = torch.Generator().manual_seed(0)
    R, C, G, bits = 16, 40, 3, 4
    q = torch.randint(-8, 8, (R, C), generator=g, dtype=torch.int8)
    z = torch.randint(-8, 8, (R, G), generator=g, dtype=torch.int8)
    s = (torch.rand(R, G, generator=g) + 0.1).bfloat16()
    g_idx = (torch.randperm(C, generator=g) // 16).to(torch.int32)
    parts = {"weight_packed": pack_to_int32(q, bits), "weight_shape": torch.tensor([R, C], dtype=torch.int32),
             "weight_scale": s, "weight_zero_point": pack_to_int32(z, bits, packed_dim=0), "weight_g_idx": g_idx}
    assert torch.equal(unpack_from_int32(parts["weight_packed"], bits, torch.Size([R, C])), q)  # the library's stream
    shape, got = _decode(tmp_path, parts, (PACK, bits, False, "group", "group"))
    gl = g_idx.long()
    want = ((q.float() - z[:, gl].float()) * s[:, gl].float()).bfloat16().float()
    assert shape == (R, C) and torch.equal(got, want)


def _shape_of_9_rows(parts):
    parts["weight_shape"] = torch.tensor([9, 32], dtype=parts["weight_shape"].dtype)


def _int64_zero_points(parts):
    parts["weight_zero_point"] = parts["weight_zero_point"].to(torch.int64)


def _uint8_codes(parts):
    parts["weight"] = parts["weight"].view(torch.uint8)


@pytest.mark.parametrize("rows, combo, change, problem", [
    (8, (PACK, 4, True, "group", None), _shape_of_9_rows, "weight_shape"),  # its rows disagree with the codes'
    (16, (PACK, 4, False, "group", None), _int64_zero_points, "int32"),  # not read as twice the bytes
    (8, (NAIVE, 4, True, "group", None), _uint8_codes, "int8"),  # the signed codes' bytes, not decoded as 0..255
], ids=["weight_shape", "zero-int64", "naive-uint8"])
def test_tensors_of_another_shape_or_dtype_are_refused(tmp_path, rows, combo, change, problem):
    w = torch.randn(rows, 32, generator=torch.Generator().manual_seed(0)).bfloat16()
    parts, _ = compress(w, *combo, torch.Generator().manual_seed(1))
    change(parts)
    with pytest.raises(ValueError, match=problem):
        _decode(tmp_path, parts, combo)


# --- hf_config_quant.py: the library's matching and defaults -------------------------------------------------------

def _library_groups(names: dict[str, type], q: dict) -> dict[str, str]:
    root = nn.Module()
    for full, cls in names.items():
        *path, leaf = full.split(".")
        parent = root
        for p in path:
            if not hasattr(parent, p):
                parent.add_module(p, nn.Module())
            parent = getattr(parent, p)
        parent.add_module(leaf, nn.Embedding(8, 4) if cls is nn.Embedding else nn.Linear(4, 4, bias=False))
    return library_groups(root, q)


def _group(targets):
    return {"targets": targets, "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                            "group_size": 16}, "format": PACK}


@pytest.mark.parametrize("groups, ignore", [
    ({"group_0": _group(["re:.*self_attn"])}, []),  # a regex matches a prefix (re.match), kills Q01
    ({"group_0": _group(["Linear"])}, ["re:.*self_attn"]),  # likewise in ignore
    ({"group_0": _group(["re:.*"]), "group_1": _group(["vision.proj"])}, []),  # exact before regex, kills Q03
    ({"group_0": _group(["Embedding"]), "group_1": _group(["Linear"])}, []),  # embed_tokens by its class, C21
])
def test_each_module_is_in_the_library_group_by_its_name(groups, ignore):
    names = {"model.embed_tokens": nn.Embedding, "model.layers.0.self_attn.q_proj": nn.Linear,
             "vision.proj": nn.Linear, "model.layers.0.mlp.down_proj": nn.Linear}
    q = {"quant_method": "compressed-tensors", "format": "mixed-precision", "quantization_status": "compressed",
         "config_groups": groups, "ignore": ignore}
    want = _library_groups(names, q)
    config = compressed_scheme({"quantization_config": q})
    got = {}
    for n in names:
        found = config.scheme_of(n, module_classes(n))  # the classes flyer gives a checkpoint's module
        if found is not None:
            got[n] = found[0]
    assert got == want


def test_embedding_scheme_of_by_class():  # kills C21
    config = CompressedConfig((("g", ("Embedding",), CompressedScheme(16)),))
    assert scheme_of("model.embed_tokens.weight_packed", "model.embed_tokens", config, "f")
    config = CompressedConfig((("g", ("Linear",), CompressedScheme(16)),))
    with pytest.raises(CheckpointError, match="no group"):
        scheme_of("model.embed_tokens.weight_packed", "model.embed_tokens", config, "f")


def test_omitted_weight_fields_take_the_librarys_defaults():  # kills Q08, Q09
    q = combo_config(PACK, 4, True, "group", None)
    w = q["config_groups"]["group_0"]["weights"]
    del w["num_bits"], w["symmetric"]
    scheme = compressed_scheme({"quantization_config": q}).groups[0][2]
    args = QuantizationArgs(**{k: v for k, v in w.items() if k != "observer"})
    assert (scheme.num_bits, scheme.symmetric) == (args.num_bits, args.symmetric) == (8, True)


def test_fp8_inputs_without_a_type_are_int8_and_refused():  # kills Q15
    """input_activations {num_bits: 8} without "type" are INT8 activations (QuantizationArgs' default): refused."""
    q = _inputs()
    q["config_groups"]["group_0"]["input_activations"].pop("type")
    assert QuantizationArgs(**q["config_groups"]["group_0"]["input_activations"]).type == "int"
    with pytest.raises(ConfigError, match="input_activations.type"):
        compressed_scheme({"quantization_config": q})


@pytest.mark.parametrize("status", ["frozen", "calibration", "initialized"])
def test_only_compressed_checkpoints_are_read(status):  # kills Q16
    """A status other than "compressed" stores the weights unpacked (fake-quantized floats): refused."""
    q = {**combo_config(PACK, 4, True, "group", None), "quantization_status": status}
    with pytest.raises(ConfigError, match="quantization_status"):
        compressed_scheme({"quantization_config": q})


# --- hf_names.py ---------------------------------------------------------------------------------------------------

def test_mla_without_q_lora_in_rotate_half_layout_equals_transformers(tmp_path):  # kills N07
    """DeepseekV3 with q_lora_rank null (q_proj) and rope_interleave false: q_proj's rope rows are permuted too."""
    kw = {**FAMILIES["v3-tied-half"][2], "q_lora_rank": None}
    torch.manual_seed(0)
    ref = DeepseekV3ForCausalLM(DeepseekV3Config(**{**_COMMON, **kw})).eval()
    save_tiny(ref, tmp_path, "v3")
    model, cfg, _ = load_hf(tmp_path)
    x = torch.randint(3, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel(model(x), ref(x).logits) <= logit_tolerance(cfg, 16)


def test_mtp_modules_beyond_the_first_are_decoder_layers_after_it():  # kills N20
    """MTP module k is decoder layer n_layers + k, every one of its tensors (a second module included)."""
    from tests.hf_models import _COMMON, FAMILIES
    d = {**_COMMON, **FAMILIES["v3"][2], "model_type": "deepseek_v3", "num_nextn_predict_layers": 2}
    cfg = ModelConfig(**from_hf_config(d))
    assert cfg.mtp_depth == 2
    for name, slot in hf_names(cfg, rope_half=False).items():
        if slot.key.startswith("mtp."):
            k = int(slot.key.split(".")[1])
            assert name.startswith(f"model.layers.{cfg.n_layers + k}."), (name, slot.key)


def test_mxfp4_scales_of_another_group_count_are_refused_from_the_headers(tmp_path):  # kills C24
    """An MXFP4 weight whose scales are per 16 columns (not 32): CheckpointError from the headers, naming it."""
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    parts, _ = library_mxfp4(w)
    parts["weight_scale"] = parts["weight_scale"].repeat_interleave(2, dim=1)  # (8, 4): a scale per 16 columns
    files, headers = _write(tmp_path, parts)
    config = compressed_scheme({"quantization_config": library_config("MXFP4A16", [], "mxfp4-pack-quantized")})
    with pytest.raises(CheckpointError, match="weight_packed"):
        compressed_shape(f"{STEM}.weight_packed", files, headers, config)


@pytest.mark.parametrize("rows", [8, 16])
def test_zero_points_of_one_packed_word_a_group(tmp_path, rows):
    """An asymmetric 4-bit linear of 8 rows has its zero points packed in one int32 word a group, which the decoder
    reads transposed, (G, 1) with strides (1, G): viewing that as bytes raised a raw RuntimeError. Decoded now as
    the format defines, w = (q - z[g]) s[g] in the scales' dtype, as with 16 rows (two words)."""
    g = torch.Generator().manual_seed(0)
    G = 3
    z = torch.randint(-8, 8, (rows, G), generator=g, dtype=torch.int8)
    packed = pack_to_int32(z, 4, packed_dim=0)
    assert torch.equal(unpack_int32(packed.T, 4, rows).T, z)
    q = torch.randint(-8, 8, (rows, 48), generator=g, dtype=torch.int8)
    s = (torch.rand(rows, G, generator=g) + 0.1).bfloat16()
    parts = {"weight_packed": pack_to_int32(q, 4), "weight_shape": torch.tensor([rows, 48], dtype=torch.int32),
             "weight_scale": s, "weight_zero_point": packed}
    shape, got = _decode(tmp_path, parts, (PACK, 4, False, "group", None))
    col = torch.arange(48) // 16
    want = ((q.float() - z[:, col].float()) * s[:, col].float()).bfloat16().float()
    assert shape == (rows, 48) and torch.equal(got, want)


def test_dequantize_refuses_scales_of_another_row_count():
    """One scale row per weight row: a (1, G) scale would broadcast over every row, silently."""
    q = torch.tensor([[1, 2, 3, 4], [5, 6, 7, -8]], dtype=torch.int8)
    with pytest.raises(ValueError, match="w.down: weight_scale"):
        dequantize(q, torch.ones(1, 2), name="w.down")


def test_a_weight_shape_wider_than_the_packed_codes_is_refused(tmp_path):
    """weight_shape (8, 64) beside 4-bit group codes of 32 columns (4 words a row): the packed words hold 32 codes,
    so the shape is refused, not decoded from the 32 the words have."""
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0)).bfloat16()
    combo = (PACK, 4, True, "group", None)
    parts, _ = compress(w, *combo, torch.Generator().manual_seed(1))
    parts["weight_shape"] = torch.tensor([8, 64], dtype=parts["weight_shape"].dtype)
    with pytest.raises(ValueError, match="weight_shape"):
        _decode(tmp_path, parts, combo)


def test_zero_points_of_another_packed_shape_are_refused_from_the_headers(tmp_path):
    """Asymmetric 4-bit codes of 16 rows pack their zero points in two int32 rows a group: a third is refused from
    the headers (CheckpointError), never decoded from the first 16 codes the words hold."""
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0)).bfloat16()
    combo = (PACK, 4, False, "group", None)
    parts, _ = compress(w, *combo, torch.Generator().manual_seed(1))
    assert parts["weight_zero_point"].shape == (2, 2)
    parts["weight_zero_point"] = torch.cat([parts["weight_zero_point"], parts["weight_zero_point"][:1]])
    with pytest.raises(CheckpointError, match="not a 4-bit weight"):
        _decode(tmp_path, parts, combo)


def test_packed_codes_load_into_a_model_holding_fp8(tmp_path):
    """A pack-quantized (int4) checkpoint loaded into a model that holds its weights as FP8: the packed codes are
    decoded, then quantized as held (no FP8 codes to keep), exactly as the library's decompression saved plain."""
    want = build(tmp_path / "q", (PACK, 4, True, "group", None))
    plain_twin(tmp_path / "q", want, tmp_path / "plain")
    got = load_hf(tmp_path / "q", dtype=torch.float32, held=FP8)[0].state_dict()
    ref = load_hf(tmp_path / "plain", dtype=torch.float32, held=FP8)[0].state_dict()
    assert got.keys() == ref.keys() and any(t.dtype == FP8 for t in got.values())
    for k, t in got.items():
        assert t.dtype == ref[k].dtype and torch.equal(*(x.view(torch.uint8) if x.dtype == FP8 else x
                                                        for x in (t, ref[k]))), k


def test_an_nvfp4_global_scale_of_two_values_is_refused_from_the_headers(tmp_path):
    """A compressed-tensors NVFP4 weight has one global scale: a weight_global_scale of two values is refused from
    the headers (CheckpointError naming the tensor), while the library's own tensors pass."""
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0)).bfloat16()
    parts = {k: v for k, v in library_nvfp4(w)[0].items() if k in ("weight_packed", "weight_scale",
                                                                     "weight_global_scale")}
    config = compressed_scheme({"quantization_config": library_config("NVFP4A16", ["lm_head"])})
    files, headers = _write(tmp_path, parts)
    assert compressed_shape(f"{STEM}.weight_packed", files, headers, config) == (8, 32)
    parts["weight_global_scale"] = parts["weight_global_scale"].reshape(1).repeat(2)
    files, headers = _write(tmp_path, parts)
    with pytest.raises(CheckpointError, match=f"{STEM}.weight_packed .* not an NVFP4 weight"):
        compressed_shape(f"{STEM}.weight_packed", files, headers, config)
