"""NVFP4 weights (``flyer.interop.nvfp4``) in compressed-tensors' "nvfp4-pack-quantized" layout and NVIDIA ModelOpt's.

The oracle of the first is the compressed-tensors library: it quantizes (global scale from ``generate_gparam``,
FP8 block scales from ``calculate_qparams``), packs and decompresses, and flyer's decoding equals its decompression
computed in FP32 bit for bit. ModelOpt's layout has no library here: its reference is the format as NVIDIA documents
it, decoded in FP64 from the bytes in plain Python (nibbles, E2M1's sign / exponent / mantissa, E4M3's), which
flyer's FP32 decoding meets within its two roundings."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from flyer.errors import CheckpointError, ConfigError
from flyer.interop.export import export
from flyer.interop.hf import load_hf, quant_scheme
from flyer.interop.hf_config_quant import NVFP4_GROUP, modelopt_config
from flyer.interop.nvfp4 import decode_nvfp4
from tests.hf_models import _COMMON, FAMILIES, plain_twin, save_bf16
from tests.test_hf_compressed import assert_logits_match, transformers_decompressed
from tests.test_qwen3 import _config_error

pytest.importorskip("compressed_tensors")  # the oracle: pyproject's test extra
from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor  # noqa: E402
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor  # noqa: E402
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import dequantize  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam  # noqa: E402

NVFP4_ARGS = PRESET_SCHEMES["NVFP4A16"]["weights"]  # llm-compressor's: FP8 block scales (scale_dtype) and all


def library_nvfp4(w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(compressed-tensors' stored tensors of the (R, C) weight ``w`` by suffix, its decompression in FP32)."""
    x = w.float().unflatten(-1, (-1, NVFP4_GROUP))
    g = generate_gparam(x.amin(), x.amax())
    scale, _ = calculate_qparams(x.amin(-1), x.amax(-1), NVFP4_ARGS, global_scale=g)
    scheme = QuantizationScheme(targets=["Linear"], weights=NVFP4_ARGS)
    parts = NVFP4PackedCompressor.compress({"weight": w, "weight_scale": scale, "weight_global_scale": g}, scheme)
    codes = unpack_fp4_from_uint8(parts["weight_packed"], *w.shape, dtype=torch.float32)
    want = dequantize(x_q=codes, scale=parts["weight_scale"].float(), args=NVFP4_ARGS,
                      global_scale=parts["weight_global_scale"], dtype=torch.float32)
    return parts, want


def _e2m1(nibble: int) -> float:
    magnitude = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0][nibble & 7]  # NVIDIA's E2M1 table
    return -magnitude if nibble & 8 else magnitude


def _e4m3(byte: int) -> float:
    """OCP E4M3 (bias 7, no infinities; 0x7F / 0xFF NaN)."""
    sign, exponent, mantissa = -1.0 if byte & 0x80 else 1.0, (byte >> 3) & 0xF, byte & 7
    if exponent == 0:
        return sign * mantissa / 8 * 2.0 ** -6
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


def modelopt_reference(packed: torch.Tensor, block: torch.Tensor, scale_2: float) -> list[list[float]]:
    """ModelOpt's NVFP4 weight in FP64, from its bytes: element 2j of a row in byte j's low nibble."""
    rows = []
    for r, (codes, scales) in enumerate(zip(packed.tolist(), block.view(torch.uint8).tolist())):
        nibbles = [n for byte in codes for n in (byte & 0xF, byte >> 4)]
        rows.append([_e2m1(n) * _e4m3(scales[j // NVFP4_GROUP]) * scale_2 for j, n in enumerate(nibbles)])
    return rows


@pytest.mark.parametrize("shape", [(24, 64), (7, 16), (3, 160)])
def test_compressed_tensors_layout_equals_the_library(shape):
    torch.manual_seed(0)
    w = (torch.randn(*shape) * torch.logspace(-3, 0, shape[0]).unsqueeze(1)).to(torch.bfloat16)  # rows' scales apart
    parts, want = library_nvfp4(w)
    got = decode_nvfp4(parts["weight_packed"], parts["weight_scale"], parts["weight_global_scale"], True, "w")
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_modelopt_layout_equals_the_format():
    """The library's codes and block scales with ModelOpt's tensor scale, amax / (6 x 448) (its global scale's
    reciprocal, rounded to FP32): each decoded value within two FP32 roundings (the scale product, then the code's:
    |error| <= 2 u |w| + u^2 |w|, u = 2^-24) of the FP64 product."""
    torch.manual_seed(1)
    w = (torch.randn(16, 48) * 0.02).to(torch.bfloat16)
    parts, _ = library_nvfp4(w)
    scale_2 = (1 / parts["weight_global_scale"].double()).float()
    got = decode_nvfp4(parts["weight_packed"], parts["weight_scale"], scale_2, False, "w").double()
    ref = torch.tensor(modelopt_reference(parts["weight_packed"], parts["weight_scale"], float(scale_2)),
                       dtype=torch.float64)
    u = 2.0 ** -24
    assert ((got - ref).abs() <= (2 * u + u * u) * ref.abs()).all()
    assert (ref != 0).float().mean() > 0.5  # most codes non-zero: the comparison is not vacuous


@pytest.mark.parametrize("bad, problem", [
    (lambda p, s, g: (p.to(torch.int8), s, g), "2-D uint8"),
    (lambda p, s, g: (p, s.float(), g), "float8_e4m3fn per 16"),
    (lambda p, s, g: (p, s[:, :-1], g), "float8_e4m3fn per 16"),
    (lambda p, s, g: (p, s, torch.ones(2)), "one float"),
])
def test_decode_refuses_inconsistent_tensors(bad, problem):
    parts, _ = library_nvfp4(torch.randn(4, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=f"^layer.w: .*{problem}"):
        decode_nvfp4(*bad(parts["weight_packed"], parts["weight_scale"], parts["weight_global_scale"]), True,
                     "layer.w")


@pytest.mark.parametrize("q, field", [
    ({"quant_algo": "W4A8_AWQ"}, "quant_algo"),
    ({"quant_algo": "NVFP4", "group_size": 32}, "group_size"),
    ({"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8"}, "kv_cache_quant_algo"),
    ({"quant_algo": "NVFP4", "exclude_modules": "lm_head"}, "exclude_modules"),
])
def test_modelopt_config_refusals_name_the_field(q, field):
    with pytest.raises(ConfigError, match=rf"^config.json: field 'quantization_config\.{field}': "):
        modelopt_config(q, "config.json")


def test_modelopt_exclusions_match_as_fnmatch():
    cfg = modelopt_config({"quant_algo": "nvfp4", "exclude_modules": ["lm_head", "model.layers.*.self_attn*"]},
                          "config.json")
    assert cfg.excluded("lm_head") and cfg.excluded("model.layers.3.self_attn.q_a_proj")
    assert not cfg.excluded("model.layers.3.mlp.experts.0.gate_proj")


# ---- whole checkpoints ---------------------------------------------------------------------------------------

CT, MODELOPT, MX = "compressed-tensors", "modelopt", "mxfp4"  # MX: compressed-tensors' MXFP4
MXFP4_ARGS = PRESET_SCHEMES["MXFP4A16"]["weights"]  # UE8M0 scales (uint8 exponents) per 32 columns


def library_mxfp4(w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(compressed-tensors' stored MXFP4 tensors of the (R, C) weight ``w``, its decompression: exact in FP32)."""
    x = w.float().unflatten(-1, (-1, MXFP4_ARGS.group_size))
    scale, _ = calculate_qparams(x.amin(-1), x.amax(-1), MXFP4_ARGS)
    scheme = QuantizationScheme(targets=["Linear"], weights=MXFP4_ARGS)
    parts = MXFP4PackedCompressor.compress({"weight": w, "weight_scale": scale}, scheme)
    return parts, MXFP4PackedCompressor.decompress(parts, scheme)["weight"].float()


def library_config(preset: str, ignore: list[str], fmt: str = "nvfp4-pack-quantized") -> dict:
    """The ``quantization_config`` compressed-tensors serialises for ``preset`` on every Linear (llm-compressor's)."""
    scheme = QuantizationScheme(targets=["Linear"], **PRESET_SCHEMES[preset])
    return QuantizationConfig(config_groups={"group_0": scheme}, format=fmt, ignore=ignore,
                              quantization_status="compressed").model_dump(mode="json")


def build(path, layout: str, family: str = "v3", w4a4: bool = False) -> dict[str, torch.Tensor]:
    """A tiny random BF16 ``family`` model saved with every linear weight of a width divisible by its groups (16;
    MXFP4's 32: attention, dense and expert projections) NVFP4 in ``layout`` (``MX``: MXFP4 in compressed-tensors';
    the rest BF16 and listed as unquantized: ``ignore`` / ``exclude_modules``); ``w4a4``: the activations' scales
    beside them too, as NVFP4 (W4A4) exports store them. Returns the library's FP32 decoding of each quantized
    weight, by weight name."""
    state = save_bf16(family, path)
    out, want, left = {}, {}, ["lm_head"]
    group = MXFP4_ARGS.group_size if layout == MX else NVFP4_GROUP
    for k, v in state.items():
        stem = k.removesuffix(".weight")
        if not (k.endswith("proj.weight") and v.dim() == 2 and v.shape[1] % group == 0):
            out[k] = v
            left += [stem] if v.dim() == 2 and k.endswith(("_proj.weight", "_mqa.weight")) else []
            continue
        parts, want[k] = library_mxfp4(v) if layout == MX else library_nvfp4(v)
        act = torch.tensor([448.0 * 6 / 3.5])  # an activations' global scale: stored, never read
        if layout == MX:
            out.update({stem + ".weight_packed": parts["weight_packed"], stem + ".weight_scale": parts["weight_scale"]})
        elif layout == CT:
            out.update({stem + ".weight_packed": parts["weight_packed"], stem + ".weight_scale": parts["weight_scale"],
                        stem + ".weight_global_scale": parts["weight_global_scale"]})
            out.update({stem + ".input_global_scale": act} if w4a4 else {})
        else:  # ModelOpt: the codes as .weight, the tensor scale itself (the global scale's reciprocal), scalars
            out.update({k: parts["weight_packed"], stem + ".weight_scale": parts["weight_scale"],
                        stem + ".weight_scale_2": (1 / parts["weight_global_scale"].double()).float().reshape(())})
            out.update({stem + ".input_scale": (1 / act).reshape(())} if w4a4 else {})
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
    d = json.loads((path / "config.json").read_text())
    q = library_config("MXFP4" if w4a4 else "MXFP4A16", left, "mxfp4-pack-quantized") if layout == MX else \
        library_config("NVFP4" if w4a4 else "NVFP4A16", left) if layout == CT else {
        "quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": NVFP4_GROUP, "kv_cache_quant_algo": None,
        "exclude_modules": left}
    (path / "config.json").write_text(json.dumps({**d, "quantization_config": q}))
    return want


def to_hf_quant_config(path) -> None:
    """Move a ModelOpt directory's ``quantization_config`` out of config.json into an hf_quant_config.json, where
    NVIDIA's first FP4 and FP8 releases carry it alone."""
    d = json.loads((path / "config.json").read_text())
    q = d.pop("quantization_config")
    (path / "config.json").write_text(json.dumps(d))
    (path / "hf_quant_config.json").write_text(json.dumps({
        "producer": {"name": "modelopt", "version": "0.23.0"},
        "quantization": {k: v for k, v in q.items() if k != "quant_method"}}))


@pytest.mark.parametrize("layout, family, w4a4", [(CT, "v3", False), (CT, "v3", True), (CT, "qwen3_moe", False),
                                                  (MX, "v3", False), (MX, "v3", True)])
def test_compressed_tensors_model_holds_the_librarys_decompression(tmp_path, layout, family, w4a4):
    """Every NVFP4 linear (``MX``: MXFP4, DeepSeek-V4's FP4 layout, a UE8M0 scale per 32 columns) of a DeepseekV3
    (MLA, dense MLP, shared and routed experts) or Qwen3-MoE, weight-only or W4A4 (its activations' scales stored and
    not read: run as W4A16), loads as the library decodes it: flyer's model of the directory equals its model of a
    plain twin holding those weights, in FP32 and in BF16 (each rounded once; MXFP4's values exact in both)."""
    want = build(tmp_path / "q", layout, family, w4a4)
    for dtype in (torch.float32, torch.bfloat16):
        plain_twin(tmp_path / "q", {k: v.to(dtype) for k, v in want.items()}, tmp_path / f"plain-{dtype}")
        got = load_hf(tmp_path / "q", dtype=dtype)[0].state_dict()
        ref = load_hf(tmp_path / f"plain-{dtype}", dtype=dtype)[0].state_dict()
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in got), dtype


@pytest.mark.parametrize("in_config", [True, False])
def test_modelopt_model_runs_as_transformers_on_the_decoded_weights(tmp_path, in_config):
    """A ModelOpt NVFP4 DeepseekV3 (its quantization in config.json, or only in hf_quant_config.json as NVIDIA's
    first FP4 releases carry it): each weight within two FP32 roundings of the format's FP64 value, and FP32 logits
    within ``logit_tolerance`` of transformers' model of a plain twin holding the format's values."""
    want = build(tmp_path / "q", MODELOPT, w4a4=True)
    if not in_config:
        to_hf_quant_config(tmp_path / "q")
    files = load_file(str(tmp_path / "q" / "model.safetensors"))
    exact = {k: torch.tensor(modelopt_reference(files[k], files[k[:-len("weight")] + "weight_scale"],
                                                float(files[k[:-len("weight")] + "weight_scale_2"])),
                             dtype=torch.float64) for k in want}
    model, cfg, _ = load_hf(tmp_path / "q", dtype=torch.float32)
    plain_twin(tmp_path / "q", {k: v.float() for k, v in exact.items()}, tmp_path / "plain")
    twin = load_hf(tmp_path / "plain", dtype=torch.float32)[0]
    u = 2.0 ** -24
    for (k, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert ((a.double() - b.double()).abs() <= (2 * u + u * u) * 2 * b.double().abs()).all(), k
    ref = FAMILIES["v3"][0].from_pretrained(tmp_path / "plain", dtype=torch.float32).eval()
    assert_logits_match(model, ref, cfg)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")  # run_compressed off, as asked
def test_compressed_tensors_logits_equal_transformers(tmp_path):
    """transformers' model of the same directory, which compressed-tensors decompresses as it loads, holds flyer's
    BF16 weights (each decoded value rounded once); both upcast, FP32 logits within ``logit_tolerance``."""
    want = build(tmp_path, CT, "llama")
    model, cfg, _ = load_hf(tmp_path, dtype=torch.bfloat16)
    model.float()
    ref = transformers_decompressed(tmp_path, FAMILIES["llama"][0])
    name = "model.layers.1.self_attn.o_proj.weight"
    assert torch.equal(ref.state_dict()[name], want[name].bfloat16().float())
    assert_logits_match(model, ref, cfg)


def _nvfp4_group(**weights) -> dict:
    q = library_config("NVFP4A16", ["lm_head"])
    q["config_groups"]["group_0"]["weights"].update(weights)
    return q


@pytest.mark.parametrize("q, field", [
    (_nvfp4_group(group_size=32), "config_groups.group_0.weights.group_size"),
    (_nvfp4_group(type="int"), "config_groups.group_0.weights.type"),
    (_nvfp4_group(scale_dtype="torch.bfloat16"), "config_groups.group_0.weights.scale_dtype"),
    ({**_nvfp4_group(), "config_groups": {"group_0": {**_nvfp4_group()["config_groups"]["group_0"],
                                                      "input_activations": {"num_bits": 8, "type": "int"}}}},
     "config_groups.group_0.input_activations.num_bits"),
    ({"quant_method": "modelopt", "quant_algo": "FP8_PER_CHANNEL_PER_TOKEN"}, "quant_algo"),
])
def test_config_refusals_name_the_field(tmp_path, capsys, q, field):
    """One line naming the field, exit 2: NVFP4 arguments other than the format's, integer activations beside NVFP4
    weights (only NVFP4's own W4A4 runs, as W4A16), ModelOpt algorithms other than NVFP4 and FP8."""
    d = json.loads(json.dumps({**_COMMON, "model_type": "llama", "quantization_config": q}))
    _config_error(tmp_path, capsys, d, f"quantization_config.{field}")


def test_checkpoint_refusals_name_the_tensor(tmp_path):
    """A ModelOpt weight quantized though ``exclude_modules`` lists it, or with block scales off its codes' shape;
    a compressed-tensors NVFP4 weight without its global scale; an FP8 KV cache's scales in hf_quant_config.json:
    one line naming the tensor (or field)."""
    build(tmp_path / "mo", MODELOPT)
    d = json.loads((tmp_path / "mo" / "config.json").read_text())
    stem = "model.layers.1.self_attn.o_proj"
    d["quantization_config"]["exclude_modules"].append("model.layers.[1-9].self_attn.o_proj")
    (tmp_path / "mo" / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=rf"tensor {stem}\.weight is quantized, but .*exclude_modules"):
        load_hf(tmp_path / "mo")
    d["quantization_config"]["exclude_modules"].pop()
    (tmp_path / "mo" / "config.json").write_text(json.dumps(d))
    files = load_file(str(tmp_path / "mo" / "model.safetensors"))
    save_file({**files, stem + ".weight_scale": files[stem + ".weight_scale"][:, :-1].contiguous()},
              str(tmp_path / "mo" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"tensor {stem}\.weight .* not an NVFP4 weight"):
        load_hf(tmp_path / "mo")
    build(tmp_path / "ct", CT)
    files = load_file(str(tmp_path / "ct" / "model.safetensors"))
    files.pop(stem + ".weight_global_scale")
    save_file(files, str(tmp_path / "ct" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"tensor {stem}\.weight_packed has no {stem}\.weight_global_scale"):
        load_hf(tmp_path / "ct")
    (tmp_path / "hq").mkdir()
    (tmp_path / "hq" / "config.json").write_text(json.dumps({**_COMMON, "model_type": "llama"}))
    (tmp_path / "hq" / "hf_quant_config.json").write_text(json.dumps({"quantization": {
        "quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8", "group_size": 16, "exclude_modules": ["lm_head"]}}))
    with pytest.raises(ConfigError, match=r"hf_quant_config.json: field 'quantization\.kv_cache_quant_algo'"):
        quant_scheme(tmp_path / "hq")


@pytest.mark.parametrize("layout", [CT, MODELOPT])
def test_export_writes_the_decoded_weights(tmp_path, layout):
    """``flyer export`` (streamed, one tensor at a time) of either layout: plain BF16 weights, each the decoded value
    rounded once, no NVFP4 tensor left."""
    want = build(tmp_path / "q", layout, w4a4=True)
    export(tmp_path / "q", tmp_path / "out", "bf16")
    out = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        out.update(load_file(str(f)))
    assert not any(k.endswith(("_scale", "_scale_2", "_packed")) for k in out)
    for k, v in want.items():  # ModelOpt's tensor scale is the reciprocal's FP32 rounding: at most a BF16 ulp off
        assert torch.equal(out[k], v.bfloat16()) if layout == CT else \
            ((out[k].float() - v).abs() <= 2.0 ** -8 * v.abs()).all(), k


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")  # run_compressed off, as asked
def test_compressed_tensors_mxfp4_logits_equal_transformers(tmp_path):
    build(tmp_path, MX, "llama")
    model, cfg, _ = load_hf(tmp_path, dtype=torch.float32)
    assert_logits_match(model, transformers_decompressed(tmp_path, FAMILIES["llama"][0]), cfg)


def test_mxfp4_arguments_other_than_the_formats_are_one_line(tmp_path, capsys):
    q = library_config("MXFP4A16", ["lm_head"], "mxfp4-pack-quantized")
    q["config_groups"]["group_0"]["weights"]["group_size"] = 16
    d = json.loads(json.dumps({**_COMMON, "model_type": "llama", "quantization_config": q}))
    _config_error(tmp_path, capsys, d, "quantization_config.config_groups.group_0.weights.group_size")
