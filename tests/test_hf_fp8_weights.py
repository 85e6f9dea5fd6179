"""FP8 E4M3 weights with per-tensor, per-channel or block scales (``flyer.interop.fp8_scaled``): compressed-tensors'
"float-quantized" (llm-compressor's FP8 / FP8_DYNAMIC / FP8_BLOCK presets; "naive-quantized" when weight-only) and
NVIDIA ModelOpt's ``quant_algo`` "FP8".

The oracle of the first is the compressed-tensors library: its ``calculate_qparams`` gives the scales (in the
model's BF16, as llm-compressor stores them, or FP32), its ``FloatQuantizationCompressor`` quantizes and decompresses,
and flyer's weights equal that decompression bit for bit; transformers, loading the directory through the library,
gives flyer's logits within ``logit_tolerance``. ModelOpt's layout has no library here: its reference is the format's
values, code x scale in FP64 (exact: 4 x 24 significant bits), which the FP32 product rounds once, as flyer's does.
DeepSeek's own FP8 blocks (``weight_scale_inv``) are tests/test_interop_hf.py's."""

import json
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file, save_file

from flyer import kernels
from flyer.errors import CheckpointError, ConfigError
from flyer.infer.weights import FP8
from flyer.interop.export import export
from flyer.interop.fp8_scaled import decode_fp8, held_fp8
from flyer.interop.hf import load_hf, quant_scheme
from flyer.interop.hf_config_quant import compressed_scheme, modelopt_config
from flyer.interop.tensorfile import TensorFile
from tests.hf_models import _COMMON, FAMILIES, plain_twin, save_bf16
from tests.test_hf_compressed import assert_logits_match, transformers_decompressed
from tests.test_hf_nvfp4 import to_hf_quant_config
from tests.test_qwen3 import _config_error
from tests.test_v4_held_fp8 import _held_values

pytest.importorskip("compressed_tensors")  # the oracle: pyproject's test extra
from compressed_tensors.compressors import FloatQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402

# (preset, block_structure): the three presets; FP8_BLOCK's 128x128 blocks would each cover a whole tiny weight, so
# its strategy is also tried with blocks that divide no width (24 x 40: partial last blocks both ways)
STRATEGIES = [("FP8", None), ("FP8_DYNAMIC", None), ("FP8_BLOCK", None), ("FP8_BLOCK", [24, 40])]
IDS = ["tensor", "channel", "block128", "block24x40"]


def weight_args(preset: str, block: list[int] | None = None) -> QuantizationArgs:
    args = PRESET_SCHEMES[preset]["weights"]
    return args.model_copy(update={"block_structure": block}) if block else args


def library_fp8(w: torch.Tensor, args: QuantizationArgs, scale_dtype: torch.dtype
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(compressed-tensors' stored tensors of the (R, C) weight ``w`` by suffix, its decompression): min-max scales
    per the strategy (``calculate_qparams``, stored in ``scale_dtype``), codes from its compressor."""
    x, (R, C) = w.float(), w.shape
    if args.strategy == "tensor":
        lo, hi = x.amin().reshape(1), x.amax().reshape(1)
    elif args.strategy == "channel":
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    else:  # each block's extremes, the partial last ones padded with zeros as the library pads them
        bh, bw = args.block_structure
        gr, gc = -(-R // bh), -(-C // bw)
        blocks = torch.nn.functional.pad(x, (0, gc * bw - C, 0, gr * bh - R)).view(gr, bh, gc, bw)
        lo, hi = blocks.amin((1, 3)), blocks.amax((1, 3))
    scale, _ = calculate_qparams(lo, hi, args)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    parts = FloatQuantizationCompressor.compress({"weight": w, "weight_scale": scale.to(scale_dtype)}, scheme)
    return parts, FloatQuantizationCompressor.decompress(dict(parts), scheme)["weight"].contiguous()  # sliced


@pytest.mark.parametrize("preset, block", STRATEGIES, ids=IDS)
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(48, 64), (7, 150), (200, 300)])
def test_decode_equals_the_librarys_decompression(preset, block, scale_dtype, shape):
    """Bit for bit, in the scale's dtype (BF16 products rounded once, FP32 ones as well), partial blocks included."""
    torch.manual_seed(0)
    w = (torch.randn(*shape) * torch.logspace(-3, 0, shape[0]).unsqueeze(1)).to(torch.bfloat16)  # rows apart
    args = weight_args(preset, block)
    parts, want = library_fp8(w, args, scale_dtype)
    R, C = shape
    cover = {"tensor": (R, C), "channel": (1, C)}.get(args.strategy) or tuple(args.block_structure)
    got = decode_fp8(parts["weight"], parts["weight_scale"], cover, "w")
    assert got.dtype == want.dtype == scale_dtype and torch.equal(got, want)
    assert (got != 0).float().mean() > 0.9  # the comparison is not vacuous


@pytest.mark.parametrize("bad, problem", [
    (lambda c, s: (c.view(torch.int8), s), "2-D float8_e4m3fn"),
    (lambda c, s: (c.to(torch.float8_e5m2), s), "2-D float8_e4m3fn"),
    (lambda c, s: (c, s[:-1]), r"one float scale per 1x64 block of a \(8, 64\) weight \(8, 1\)"),
    (lambda c, s: (c, s.to(torch.float64)), "one float scale"),
    (lambda c, s: (c, torch.where(torch.arange(8).unsqueeze(1) == 3, torch.nan, s)), "non-finite"),
    (lambda c, s: (c, s * torch.inf), "non-finite"),
    (lambda c, s: (c, -s), "negative"),  # as DeepSeek's block scales are refused (flyer.interop.hf.read_fp8_scales)
])
def test_decode_refuses_inconsistent_tensors(bad, problem):
    parts, _ = library_fp8(torch.randn(8, 64, dtype=torch.bfloat16), weight_args("FP8_DYNAMIC"), torch.float32)
    with pytest.raises(ValueError, match=f"^layer.w: .*{problem}"):
        decode_fp8(*bad(parts["weight"], parts["weight_scale"]), (1, 64), "layer.w")


@pytest.mark.parametrize("block, kept", [((300, 200), True), ((128, 128), True), ((256, 128), True),
                                         ((300, 128), True), ((1, 200), False), ((24, 40), False), ((64, 128), False)])
def test_held_tiles_take_their_blocks_scale(block, kept):
    """Where every 128x128 tile lies in one block (a tensor's scale, FP8_BLOCK's, blocks of multiples of 128), the
    held codes with their tiles' FP32 scales are ``decode_fp8``'s FP32 values bit for bit; else None (decoded)."""
    torch.manual_seed(0)
    codes = (torch.randn(300, 200) * 100).to(torch.float8_e4m3fn)
    grid = (-(-300 // block[0]), -(-200 // block[1]))
    scale = torch.rand(grid) + 0.5
    tiles = held_fp8(codes, scale, block, "w")
    assert (tiles is not None) == kept
    if kept:
        assert tiles.shape == (3, 2) and torch.equal(kernels.dequantize_held(codes, tiles),
                                                     decode_fp8(codes, scale, block, "w"))


# ---- whole checkpoints ---------------------------------------------------------------------------------------

CT, NAIVE, MODELOPT = "float-quantized", "naive-quantized", "modelopt"


def library_config(preset: str, block: list[int] | None, fmt: str, ignore: list[str]) -> dict:
    """The ``quantization_config`` compressed-tensors serialises for ``preset`` on every Linear (llm-compressor's);
    "naive-quantized": its weights alone (the format the library infers for FP8 weights without activations)."""
    kw = dict(PRESET_SCHEMES[preset], weights=weight_args(preset, block))
    if fmt == NAIVE:
        kw.pop("input_activations")
    scheme = QuantizationScheme(targets=["Linear"], **kw)
    return QuantizationConfig(config_groups={"group_0": scheme}, format=fmt, ignore=ignore,
                              quantization_status="compressed").model_dump(mode="json")


def build(path, layout: str, preset: str = "FP8_DYNAMIC", block: list[int] | None = None, family: str = "v3",
          scale_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A tiny random BF16 ``family`` model saved with every ``*proj`` linear FP8 in ``layout`` (the head, routers
    and any other linear BF16, listed as unquantized); static activations (preset "FP8", ModelOpt's) store their
    ``input_scale``, never read. Returns each quantized weight's reference values by name: the library's
    decompression; ModelOpt's, code x scale in FP64."""
    state = save_bf16(family, path)
    out, want, left = {}, {}, ["lm_head"]
    args = weight_args("FP8" if layout == MODELOPT else preset, block)
    for k, v in state.items():
        stem = k.removesuffix(".weight")
        if not (k.endswith("proj.weight") and v.dim() == 2):
            out[k] = v
            left += [stem] if v.dim() == 2 and k.endswith(("_proj.weight", "_mqa.weight")) else []
            continue
        parts, want[k] = library_fp8(v, args, torch.float32 if layout == MODELOPT else scale_dtype)
        out.update({k: parts["weight"], stem + ".weight_scale": parts["weight_scale"]})
        if layout == MODELOPT:  # a scalar FP32 scale, the activations' beside it
            scale = parts["weight_scale"].reshape(())
            out.update({stem + ".weight_scale": scale, stem + ".input_scale": torch.tensor(0.02)})
            want[k] = parts["weight"].double() * scale.double()
        elif preset == "FP8" and layout == CT:
            out[stem + ".input_scale"] = torch.tensor([0.02], dtype=scale_dtype)
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
    d = json.loads((path / "config.json").read_text())
    q = library_config(preset, block, layout, left) if layout != MODELOPT else {
        "quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": left}
    (path / "config.json").write_text(json.dumps({**d, "quantization_config": q}))
    return want


@pytest.mark.parametrize("preset, block, family, fmt", [
    ("FP8", None, "v3", CT), ("FP8_DYNAMIC", None, "qwen3_moe", CT), ("FP8_BLOCK", [24, 40], "v3", CT),
    ("FP8_DYNAMIC", None, "v3", NAIVE)], ids=["tensor-v3", "channel-qwen3_moe", "block-v3", "weight-only-v3"])
def test_compressed_tensors_model_holds_the_librarys_decompression(tmp_path, preset, block, family, fmt):
    """Every FP8 linear of a DeepseekV3 (MLA, dense MLP, shared and routed experts) or Qwen3-MoE, W8A8 (static
    activations' ``input_scale`` stored and not read, or dynamic ones) or weight-only, loads as the library decodes
    it: flyer's model of the directory equals its model of a plain twin holding those weights, in FP32 and in BF16
    (the library's BF16 values, exact in both)."""
    want = build(tmp_path / "q", fmt, preset, block, family)
    assert all(v.dtype == torch.bfloat16 for v in want.values())
    for dtype in (torch.float32, torch.bfloat16):
        plain_twin(tmp_path / "q", {k: v.to(dtype) for k, v in want.items()}, tmp_path / f"plain-{dtype}")
        got = load_hf(tmp_path / "q", dtype=dtype)[0].state_dict()
        ref = load_hf(tmp_path / f"plain-{dtype}", dtype=dtype)[0].state_dict()
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in got), dtype


def test_fp32_scales_decode_in_fp32(tmp_path):
    """FP32 scales (as newer llm-compressor releases may store them): the FP32 product, rounded once to BF16 when
    the model is BF16, equal to the library's FP32 decompression so rounded."""
    want = build(tmp_path / "q", CT, "FP8_BLOCK", [24, 40], "llama", torch.float32)
    assert all(v.dtype == torch.float32 for v in want.values())
    for dtype in (torch.float32, torch.bfloat16):
        plain_twin(tmp_path / "q", {k: v.to(dtype) for k, v in want.items()}, tmp_path / f"plain-{dtype}")
        got = load_hf(tmp_path / "q", dtype=dtype)[0].state_dict()
        ref = load_hf(tmp_path / f"plain-{dtype}", dtype=dtype)[0].state_dict()
        assert all(torch.equal(got[k], ref[k]) for k in got), dtype


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")  # run_compressed off, as asked
@pytest.mark.parametrize("preset, block", [("FP8", None), ("FP8_DYNAMIC", None), ("FP8_BLOCK", [24, 40])],
                         ids=["tensor", "channel", "block"])
def test_compressed_tensors_logits_equal_transformers(tmp_path, preset, block):
    """transformers' model of the same directory, which compressed-tensors decompresses as it loads, holds flyer's
    weights; FP32 logits within ``logit_tolerance``."""
    want = build(tmp_path, CT, preset, block, "llama")
    model, cfg, _ = load_hf(tmp_path, dtype=torch.float32)
    ref = transformers_decompressed(tmp_path, FAMILIES["llama"][0])
    name = "model.layers.1.self_attn.o_proj.weight"
    assert torch.equal(ref.state_dict()[name], want[name].float())
    assert_logits_match(model, ref, cfg)


@pytest.mark.parametrize("in_config", [True, False])
def test_modelopt_model_runs_as_transformers_on_the_format_values(tmp_path, in_config):
    """A ModelOpt FP8 DeepseekV3 (its quantization in config.json, or only in hf_quant_config.json): each FP32
    weight is the format's FP64 value rounded once (equal to the plain twin's), BF16 the FP32 one rounded; FP32
    logits within ``logit_tolerance`` of transformers' model of the twin."""
    want = build(tmp_path / "q", MODELOPT)
    if not in_config:
        to_hf_quant_config(tmp_path / "q")
    assert quant_scheme(tmp_path / "q").algo == "FP8"
    model, cfg, _ = load_hf(tmp_path / "q", dtype=torch.float32)
    plain_twin(tmp_path / "q", {k: v.float() for k, v in want.items()}, tmp_path / "plain")
    twin = load_hf(tmp_path / "plain", dtype=torch.float32)[0]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
    half = load_hf(tmp_path / "q", dtype=torch.bfloat16)[0]
    assert all(torch.equal(a, b.to(a.dtype)) for a, b in zip(half.state_dict().values(), twin.state_dict().values()))
    ref = FAMILIES["v3"][0].from_pretrained(tmp_path / "plain", dtype=torch.float32).eval()
    assert_logits_match(model, ref, cfg)


@pytest.mark.parametrize("layout", [CT, MODELOPT])
def test_export_writes_the_decoded_weights(tmp_path, layout):
    """``flyer export`` (streamed, one tensor at a time) of either layout: plain BF16 weights, each the decoded value
    rounded once (the library's BF16 values themselves), no FP8 tensor or scale left."""
    want = build(tmp_path / "q", layout, "FP8")
    export(tmp_path / "q", tmp_path / "out", "bf16")
    out = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        out.update(load_file(str(f)))
    assert not any(k.endswith("_scale") or v.dtype == torch.float8_e4m3fn for k, v in out.items())
    for k, v in want.items():
        assert torch.equal(out[k], v.float().bfloat16()), k


# ---- refusals ------------------------------------------------------------------------------------------------

def _fp8_group(preset: str = "FP8_DYNAMIC", fmt: str = CT, **weights) -> dict:
    q = library_config(preset, None, fmt, ["lm_head"])
    q["config_groups"]["group_0"]["weights"].update(weights)
    return q


def _inputs(**args) -> dict:
    q = _fp8_group()
    q["config_groups"]["group_0"]["input_activations"].update(args)
    return q


_W = "config_groups.group_0.weights"


@pytest.mark.parametrize("q, field", [
    (_fp8_group(strategy="token"), f"{_W}.strategy"),
    (_fp8_group(strategy="group", group_size=128), f"{_W}.strategy"),
    (_fp8_group(strategy="tensor_group", group_size=16), f"{_W}.strategy"),
    (_fp8_group(num_bits=4), f"{_W}.num_bits"),
    (_fp8_group(symmetric=False), f"{_W}.symmetric"),
    (_fp8_group(dynamic=True), f"{_W}.dynamic"),
    (_fp8_group(actorder="weight"), f"{_W}.actorder"),
    (_fp8_group(group_size=128), f"{_W}.group_size"),
    (_fp8_group(block_structure=[128, 128]), f"{_W}.block_structure"),
    (_fp8_group(strategy="block"), f"{_W}.block_structure"),
    (_fp8_group(strategy="block", block_structure=[128, 0]), f"{_W}.block_structure"),
    (_fp8_group(fmt="pack-quantized"), f"{_W}.type"),
    (_fp8_group(type="int"), "format"),  # float-quantized holds FP8 weights
    (_inputs(type="int"), "config_groups.group_0.input_activations.type"),
    (_inputs(num_bits=4), "config_groups.group_0.input_activations.num_bits"),
    ({**_fp8_group(), "config_groups": {"group_0": {**_fp8_group()["config_groups"]["group_0"],
                                                    "output_activations": {"num_bits": 8, "type": "float"}}}},
     "config_groups.group_0.output_activations"),
    ({**_fp8_group(), "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor"}}, "kv_cache_scheme"),
    ({"quant_method": "modelopt", "quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}, "kv_cache_quant_algo"),
], ids=["token", "group", "tensor_group", "bits4", "asymmetric", "dynamic", "actorder", "group_size",
        "block_structure-channel", "block-no-structure", "block-zero", "packed", "int-weights", "int-inputs",
        "fp4-inputs", "output-activations", "kv-cache", "modelopt-kv-cache"])
def test_config_refusals_name_the_field(tmp_path, capsys, q, field):
    """One line naming the field, exit 2: FP8 arguments flyer does not decode (token / group strategies, other
    widths, dynamic or asymmetric weights, a block without its structure), non-FP8 activations beside FP8 weights,
    and any KV cache quantization."""
    d = json.loads(json.dumps({**_COMMON, "model_type": "llama", "quantization_config": q}))
    _config_error(tmp_path, capsys, d, f"quantization_config.{field}")


def test_accepted_spellings():
    """The presets as the library writes them; strategy by group_size's default (null: "tensor", -1: "channel");
    ModelOpt's algorithm in any case."""
    def fp8(q):
        return compressed_scheme({"quantization_config": q}).groups[0][2].fp8
    assert fp8(_fp8_group("FP8")) == (0, 0) and fp8(_fp8_group()) == (1, 0)
    assert fp8(library_config("FP8_BLOCK", None, CT, [])) == (128, 128)
    assert fp8(_fp8_group(strategy=None)) == (0, 0) and fp8(_fp8_group(strategy=None, group_size=-1)) == (1, 0)
    assert fp8(library_config("FP8", None, NAIVE, [])) == (0, 0)
    assert modelopt_config({"quant_algo": "fp8"}, "config.json").algo == "FP8"
    with pytest.raises(ConfigError, match="'quantization_config.quant_algo'"):
        modelopt_config({"quant_algo": "FP8_PB_WO"}, "config.json")


STEM = "model.layers.1.self_attn.o_proj"


def _rewrite(path, change) -> None:
    files = load_file(str(path / "model.safetensors"))
    change(files)
    save_file(files, str(path / "model.safetensors"))


@pytest.mark.parametrize("layout, change, problem", [
    (CT, lambda t: t.update({STEM + ".weight_scale": t[STEM + ".weight_scale"][:1].contiguous()}),
     rf"tensor {STEM}\.weight .* not an FP8 weight \(float8_e4m3fn codes, a scale per row\)"),
    (CT, lambda t: t.update({STEM + ".weight": t[STEM + ".weight"].view(torch.int8)}), "not an FP8 weight"),
    (CT, lambda t: t.update({STEM + ".weight": t[STEM + ".weight"].to(torch.float8_e5m2)}), "not an FP8 weight"),
    (CT, lambda t: t.update({STEM + ".weight_zero_point": torch.zeros(64, 1, dtype=torch.int8)}),
     rf"tensor {STEM}\.weight has a {STEM}\.weight_zero_point"),
    (CT, lambda t: t[STEM + ".weight_scale"].__setitem__(3, torch.nan),
     rf"tensor {STEM}\.weight: .*weight_scale holds non-finite"),
    (MODELOPT, lambda t: t.update({STEM + ".weight_scale": t[STEM + ".weight_scale"].expand(64).contiguous()}),
     rf"tensor {STEM}\.weight .* not an FP8 weight \(float8_e4m3fn codes, one scale\)"),
    (MODELOPT, lambda t: t.update({STEM + ".weight_scale": torch.tensor(float("inf"))}),
     rf"tensor {STEM}\.weight: .*non-finite"),
], ids=["ct-scale-shape", "ct-int8-codes", "ct-e5m2-codes", "ct-zero-point", "ct-nan-scale", "mo-scale-shape",
        "mo-inf-scale"])
def test_checkpoint_refusals_name_the_tensor(tmp_path, layout, change, problem):
    """Scales off the strategy's grid, codes of another dtype, a companion the scheme has not, a non-finite scale:
    a ``CheckpointError`` naming the tensor, never a weight decoded with the wrong numbers."""
    build(tmp_path, layout, family="llama")
    _rewrite(tmp_path, change)
    with pytest.raises(CheckpointError, match=problem):
        load_hf(tmp_path)


def test_scales_of_another_strategy_are_refused(tmp_path):
    """Per-channel scales under a config saying per tensor or per block, and the reverse: refused from the
    headers."""
    build(tmp_path, CT, "FP8_DYNAMIC", family="llama")
    d = json.loads((tmp_path / "config.json").read_text())
    for preset, block in (("FP8", None), ("FP8_BLOCK", [24, 40])):
        (tmp_path / "config.json").write_text(json.dumps({**d, "quantization_config": library_config(
            preset, block, CT, d["quantization_config"]["ignore"])}))
        with pytest.raises(CheckpointError, match="are not an FP8 weight"):
            load_hf(tmp_path)


def test_modelopt_exclusions_are_refused_when_quantized(tmp_path):
    """A ModelOpt FP8 weight stored quantized though ``exclude_modules`` lists it: one line naming it."""
    build(tmp_path, MODELOPT, family="llama")
    d = json.loads((tmp_path / "config.json").read_text())
    d["quantization_config"]["exclude_modules"].append(STEM)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=rf"tensor {STEM}\.weight is quantized, but .*exclude_modules"):
        load_hf(tmp_path)


@pytest.mark.parametrize("layout, preset", [(CT, "FP8"), (MODELOPT, "FP8"), (CT, "FP8_DYNAMIC")],
                         ids=["ct-tensor", "modelopt", "ct-channel"])
def test_a_model_holding_fp8_keeps_the_codes(tmp_path, monkeypatch, layout, preset):
    """``--weight-dtype fp8`` (FP8 held with 128x128 block scales) of a DeepseekV3 with FP32 scales: per-tensor
    scales keep the file's codes, each weight's values the FP32 load's bit for bit, as DeepSeek's blocks are kept;
    per-channel ones cannot (a tile spans rows of different scales): decoded and quantized anew, most values moved.
    Either way each tensor is read from the file once (whether codes can be kept is known from the header).
    The codes are shrunk by 3/4 first, so that no tile's largest is 448 and requantizing moves most values."""
    build(tmp_path, layout, preset, scale_dtype=torch.float32)
    _rewrite(tmp_path, lambda t: t.update({k: (v.float() * 0.75).to(v.dtype) for k, v in t.items()
                                           if v.dtype == torch.float8_e4m3fn}))
    ref = load_hf(tmp_path, dtype=torch.float32)[0].state_dict()
    reads, read = Counter(), TensorFile.read
    monkeypatch.setattr(TensorFile, "read", lambda tf, name, *a, **k: reads.update([name]) or read(tf, name, *a, **k))
    values = _held_values(load_hf(tmp_path, dtype=torch.float32, held=FP8)[0])
    assert len(values) > 10 and reads and max(reads.values()) == 1, reads.most_common(2)
    moved = [k for k, v in values.items() if not torch.equal(v, ref[k])]
    assert moved == [] if preset == "FP8" else len(moved) > len(values) // 2
