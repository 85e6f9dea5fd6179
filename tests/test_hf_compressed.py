"""compressed-tensors' weight-only integer checkpoints beyond Kimi's INT4 (``flyer.interop.compressed``), as
llm-compressor's GPTQ / AWQ / RTN recipes write them: pack-quantized or int8-stored (naive-quantized) codes of 4 or 8
bits (3: codes straddling words), symmetric or with zero points, in groups or per output channel, columns in order or
activation-ordered (``weight_g_idx``). The oracle is the compressed-tensors library: it quantizes and packs every
linear of a tiny random Qwen3-MoE / Llama / DeepseekV3 (scales and zero points from its ``calculate_qparams``) and
decompresses them; flyer's weights equal its decompression bit for bit, and flyer's logits transformers' (which
loads the directory through the library) within ``tests.test_hf_mistral4.logit_tolerance``; a rank reads only its
experts; export streams the decoded weights. The library (0.20) no
longer reads actorder "group": those columns are quantized by it in g_idx order, then stored in the model's order.
Each refused field is a one-line error naming it."""

import json
import re
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.utils.quantization_config import CompressedTensorsConfig

from flyer.errors import CheckpointError
from flyer.interop.compressed import dequantize, unpack_int32
from flyer.interop.export import export
from flyer.interop.hf import load_hf
from flyer.interop.hf_config_quant import KIMI_GROUP_SIZE, compressed_scheme
from flyer.interop.int4_pack import dequantize_int4, quantize_int4
from flyer.interop.load import load_init_weights, load_pretrained
from flyer.interop.tensorfile import TensorFile
from flyer.model.experts import Experts
from flyer.model.transformer import Transformer
from tests.hf_models import FAMILIES, VOCAB, plain_twin, save_bf16
from tests.test_hf_int4 import KIMI_K2_HUB
from tests.test_hf_mistral4 import logit_tolerance
from tests.test_qwen3 import _config_error, rel

pytest.importorskip("compressed_tensors")  # the oracle: pyproject's test extra
from compressed_tensors.compressors import NaiveQuantizationCompressor, PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402

GROUP = 16  # divides every tiny model's input widths (64, 96, 32)
PACK, NAIVE = "pack-quantized", "naive-quantized"
# (format, num_bits, symmetric, strategy, actorder): every accepted kind at 4 and 8 bits, 3 bits packed once
COMBOS = [(fmt, bits, sym, strategy, order) for fmt in (PACK, NAIVE) for bits in (4, 8) for sym in (True, False)
          for strategy, order in (("group", None), ("group", "group"), ("channel", None))] + [
    (PACK, 3, False, "group", "group"), (PACK, 8, True, "group", "weight"),
    ("int-quantized", 8, False, "channel", None)]
IDS = [f"{f[:4]}-{b}b-{'sym' if s else 'asym'}-{st}{'-' + o if o else ''}" for f, b, s, st, o in COMBOS]


def combo_config(fmt: str, bits: int, symmetric: bool, strategy: str, actorder: str | None,
                 group: int = GROUP) -> dict:
    """The ``quantization_config`` llm-compressor writes for the scheme: one group targeting every Linear, the head
    and the routers left unquantized."""
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": strategy,
               "group_size": group if strategy == "group" else None, "dynamic": False, "actorder": actorder,
               "observer": "minmax"}
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "kv_cache_scheme": None, "config_groups": {"group_0": {
                "targets": ["Linear"], "input_activations": None, "output_activations": None, "weights": weights}},
            "ignore": ["lm_head", r"re:.*mlp\.gate$"]}


def compress(w: torch.Tensor, fmt: str, bits: int, symmetric: bool, strategy: str, actorder: str | None,
             g: torch.Generator, group: int = GROUP) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(the stored tensors by suffix, the library's decompression) of the (R, C) weight ``w``: min-max scales (BF16,
    as the model) and zero points from ``calculate_qparams``, codes and packing from the format's compressor.
    actorder "group": a random column order ``perm`` is quantized in contiguous groups (what the library can still
    do), then its codes stored back in the model's column order with ``weight_g_idx`` naming each column's group."""
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy,
                            group_size=group if strategy == "group" else None)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    perm = torch.randperm(w.shape[1], generator=g) if actorder == "group" else torch.arange(w.shape[1])
    wp = w[:, perm]
    x = wp.float().unflatten(-1, (-1, group)) if strategy == "group" else wp.float().unsqueeze(1)
    scale, zero = calculate_qparams(x.amin(-1), x.amax(-1), args)
    state = {"weight": wp, "weight_scale": scale.to(w.dtype), "weight_zero_point": zero}
    comp = PackedQuantizationCompressor if fmt == PACK else NaiveQuantizationCompressor
    parts = comp.compress(state, scheme)
    want = comp.decompress(parts, scheme)["weight"]
    if actorder == "group":
        back = torch.argsort(perm)  # column perm[i] of the model is column i of the quantized order
        if fmt == PACK:
            q = unpack_from_int32(parts["weight_packed"], bits, wp.shape)[:, back]
            parts["weight_packed"] = pack_to_int32(q, bits)
        else:
            parts["weight"] = parts["weight"][:, back]
        g_idx = torch.empty(w.shape[1], dtype=torch.int32)
        g_idx[perm] = torch.arange(w.shape[1], dtype=torch.int32) // group
        parts["weight_g_idx"], want = g_idx, want[:, back]
    return parts, want


def build(path, combo, family: str = "qwen3_moe", group: int = GROUP) -> dict[str, torch.Tensor]:
    """A tiny random BF16 model of ``family`` saved with every ``*proj.weight`` compressed as ``combo`` says (the
    head and routers left BF16); returns the library's decompression of each, by weight name."""
    state = save_bf16(family, path)
    g = torch.Generator().manual_seed(1)
    out, want = {}, {}
    for k, v in state.items():
        if not (k.endswith("proj.weight") and v.dim() == 2 and v.shape[1] % group == 0):  # else left BF16
            out[k] = v
            continue
        parts, want[k] = compress(v, *combo, g, group)
        out.update({k.removesuffix("weight") + n: t for n, t in parts.items()})
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
    d = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**d, "quantization_config": combo_config(*combo, group)}))
    return want


@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_unpack_is_the_librarys(monkeypatch, byteorder):
    """Every bit width 1-8, column counts a multiple of 32 and not: ``unpack_int32`` is ``unpack_from_int32`` (codes
    straddling words where b does not divide 32), along rows (codes) and down columns (zero points); 4 and 8 bits
    read as bytes on a little-endian host, by shifts on a big-endian one (the path it would take there)."""
    monkeypatch.setattr(sys, "byteorder", byteorder)
    g = torch.Generator().manual_seed(0)
    for bits in range(1, 9):
        for cols in (64, 29, 37):
            lo = -(1 << (bits - 1))
            q = torch.randint(lo, -lo, (6, cols), generator=g, dtype=torch.int8)
            assert torch.equal(unpack_int32(pack_to_int32(q, bits), bits, cols), q), (bits, cols)
            zero = pack_to_int32(q.T.contiguous(), bits, packed_dim=0)  # (ceil(cols*b/32), 6)
            assert torch.equal(unpack_int32(zero.T, bits, cols).T, q.T), (bits, cols)


def test_dequantize_subtracts_the_zero_point_of_each_columns_group():
    """By hand: w = (q - z) * scale, each column's group by g_idx (or j // (C/G)); one rounding to the scale's
    dtype; bad shapes name the weight."""
    q = torch.tensor([[3, -2, 7, 0]], dtype=torch.int8)
    scale, zero = torch.tensor([[0.5, 2.0]]), torch.tensor([[1, -3]], dtype=torch.int8)
    assert dequantize(q, scale, zero).tolist() == [[1.0, -1.5, 20.0, 6.0]]
    g_idx = torch.tensor([1, 0, 0, 1])
    assert dequantize(q, scale, zero, g_idx).tolist() == [[12.0, -1.5, 3.0, 6.0]]
    third = torch.tensor([[1 / 3]], dtype=torch.bfloat16)  # 3 * bf16(1/3), rounded once to BF16
    assert dequantize(torch.tensor([[3]], dtype=torch.int8), third, out_dtype=torch.bfloat16).item() == \
        (3 * third.float()).bfloat16().item()
    for bad in ((q, scale, zero, torch.tensor([0, 2, 0, 1])), (q, scale, zero[:, :1]), (q, torch.ones(1, 3))):
        with pytest.raises(ValueError, match="w.up"):
            dequantize(*bad, name="w.up")


@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
def test_weights_equal_the_librarys_decompression(tmp_path, combo):
    """Every compressed linear of a Qwen3-MoE (attention, dense MLP, experts) loads as the library's decompression
    bit for bit: flyer's model of the compressed directory equals, tensor for tensor, its model of a plain
    directory holding the library's weights (BF16, the scales' dtype)."""
    want = build(tmp_path / "q", combo)
    plain_twin(tmp_path / "q", want, tmp_path / "plain")
    got, ref = load_hf(tmp_path / "q")[0].state_dict(), load_hf(tmp_path / "plain")[0].state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in got)


def assert_logits_match(model, ref, cfg, T: int = 24) -> None:
    """flyer's ``model`` and transformers' ``ref`` (both computing in FP32) on the same random 2 x ``T`` tokens:
    logits within ``logit_tolerance``."""
    x = torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel(model(x), ref(x).logits) <= logit_tolerance(cfg, T)


def transformers_decompressed(path, cls):
    """transformers' model of ``path`` decompressed by compressed-tensors as it loads (``run_compressed`` off: plain
    weights in the scales' BF16, none left compressed), then upcast (exact) so it computes in FP32."""
    ref = cls.from_pretrained(path, quantization_config=CompressedTensorsConfig(run_compressed=False)).eval()
    assert not any("weight_" in k for k in ref.state_dict())
    return ref.float()


# transformers fuses Qwen3-MoE's experts as it loads them, and that conversion drops zero points and fails on
# channel scales and int8 codes: its MoE checks take the Kimi scheme, the rest are checked on Llama
@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")  # run_compressed off, as asked
@pytest.mark.parametrize("combo, family", [(c, "llama") for c in COMBOS if c[4] != "group"] + [
    ((PACK, 4, True, "group", None), "qwen3_moe")], ids=[i for c, i in zip(COMBOS, IDS) if c[4] != "group"] + [
    "qwen3_moe-pack-4b-sym-group"])
def test_logits_equal_transformers(tmp_path, combo, family):
    """FP32 logits within ``logit_tolerance`` of transformers' model of the same directory, decompressed by the
    library; its weights are the library's decompression (``build``'s)."""
    want = build(tmp_path, combo, family)
    model, cfg, _ = load_hf(tmp_path, dtype=torch.float32)
    ref = transformers_decompressed(tmp_path, FAMILIES[family][0])
    assert_logits_match(model, ref, cfg)
    name = "model.layers.1.self_attn.o_proj.weight"
    assert torch.equal(ref.state_dict()[name], want[name].float())


def test_a_rank_reads_only_its_experts(tmp_path, monkeypatch):
    """A rank holding experts 4..7 (expert parallelism's ``Experts.first``) of an asymmetric activation-ordered
    checkpoint reads no tensor of experts 0..3 (codes, scales, zero points, g_idx: headers only), each of its own
    once, and gets the whole model's values."""
    build(tmp_path, (PACK, 4, False, "group", "group"))
    whole, cfg, _ = load_pretrained(tmp_path)
    rank = Transformer(cfg)
    for layer in rank.layers[cfg.n_dense_layers:]:
        layer.ffn.experts = Experts(4, cfg.dim, cfg.moe_inter_dim, first=4)
    reads, read_into = [], TensorFile.read_into
    monkeypatch.setattr(TensorFile, "read_into", lambda tf, name, out, rows=None: (
        reads.append(name), read_into(tf, name, out, rows))[1])
    load_init_weights(rank, tmp_path)
    experts = [int(m.group(1)) for n in reads if (m := re.search(r"experts\.(\d+)\.", n))]
    assert len(experts) == len(set(reads) & {n for n in reads if "experts." in n}) == 4 * 3 * 5 * (
        cfg.n_layers - cfg.n_dense_layers) and min(experts) == 4
    for mine, full in zip(rank.layers[cfg.n_dense_layers:], whole.layers[cfg.n_dense_layers:]):
        for w in ("w1", "w2", "w3"):
            assert torch.equal(getattr(mine.ffn.experts, w), getattr(full.ffn.experts, w)[4:])


def test_export_writes_the_dequantized_weights(tmp_path):
    """``flyer export`` of an asymmetric 8-bit channel directory (streamed, one tensor at a time): plain BF16 weights
    equal to the library's decompression."""
    want = build(tmp_path / "q", (PACK, 8, False, "channel", None), "v3")
    export(tmp_path / "q", tmp_path / "out", "bf16")
    out = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        out.update(load_file(str(f)))
    assert not any("weight_" in k for k in out)
    for k, v in want.items():
        assert torch.equal(out[k], v), k


def test_export_int4_requantizes_another_scheme(tmp_path):
    """``--dtype int4`` from a 4-bit asymmetric source in Kimi's groups of 32 and BF16 scales: its codes mean nothing
    without their zero points, so its experts are quantized again from their values, as from any other source."""
    want = build(tmp_path / "q", (PACK, 4, False, "group", None), "v3", group=KIMI_GROUP_SIZE)
    export(tmp_path / "q", tmp_path / "out", "int4")
    model = load_hf(tmp_path / "out")[0]
    for k, v in want.items():
        if m := re.fullmatch(r".*layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)_proj\.weight", k):
            w = getattr(model.layers[int(m[1])].ffn.experts, {"gate": "w1", "down": "w2", "up": "w3"}[m[3]])
            assert torch.equal(w[int(m[2])], dequantize_int4(*quantize_int4(v, KIMI_GROUP_SIZE))
                               .to(torch.bfloat16)), k


def _scheme(**change) -> dict:
    q = combo_config(PACK, 4, False, "group", None)
    return {**KIMI_K2_HUB, "quantization_config": {**q, "config_groups": {"group_0": {
        **q["config_groups"]["group_0"], "weights": {**q["config_groups"]["group_0"]["weights"], **change}}}}}


_W = "quantization_config.config_groups.group_0.weights"
_Q = "quantization_config"


@pytest.mark.parametrize("d, field", [
    (_scheme(num_bits=16), f"{_W}.num_bits"), (_scheme(num_bits=0), f"{_W}.num_bits"),
    (_scheme(type="float"), f"{_W}.type"), (_scheme(symmetric=None), f"{_W}.symmetric"),
    (_scheme(strategy="tensor", group_size=None), f"{_W}.strategy"), (_scheme(strategy="block"), f"{_W}.strategy"),
    (_scheme(strategy="tensor_group"), f"{_W}.strategy"), (_scheme(strategy="token"), f"{_W}.strategy"),
    (_scheme(group_size=None, strategy=None), f"{_W}.strategy"),
    (_scheme(strategy="channel"), f"{_W}.group_size"), (_scheme(group_size=-1), f"{_W}.group_size"),
    (_scheme(block_structure=[128, 128]), f"{_W}.block_structure"), (_scheme(dynamic=True), f"{_W}.dynamic"),
    (_scheme(actorder="group", strategy="channel", group_size=None), f"{_W}.actorder"),
    (_scheme(actorder="random"), f"{_W}.actorder"),
    ({**KIMI_K2_HUB, _Q: {**_scheme()[_Q], "format": "float-quantized"}}, f"{_Q}.format"),
    ({**KIMI_K2_HUB, _Q: {**_scheme()[_Q], "format": "nvfp4-pack-quantized"}}, f"{_W}.type"),  # NVFP4's own
    ({**KIMI_K2_HUB, _Q: {**_scheme()[_Q], "kv_cache_scheme": {"num_bits": 8}}}, f"{_Q}.kv_cache_scheme"),
    ({**KIMI_K2_HUB, _Q: {**_scheme()[_Q], "sparsity_config": {"format": "sparse-24-bitmask"}}},
     f"{_Q}.sparsity_config"),
    ({**KIMI_K2_HUB, _Q: {**_scheme()[_Q], "transform_config": {"config_groups": {}}}}, f"{_Q}.transform_config"),
    ({**KIMI_K2_HUB, _Q: {**_scheme()[_Q], "config_groups": {"group_0": {
        **_scheme()[_Q]["config_groups"]["group_0"], "output_activations": {"num_bits": 8}}}}},
     f"{_Q}.config_groups.group_0.output_activations"),
    ({**KIMI_K2_HUB, _Q: {**_scheme()[_Q], "config_groups": {
        "group_0": _scheme()[_Q]["config_groups"]["group_0"],
        "group_1": _scheme(num_bits=16)[_Q]["config_groups"]["group_0"]}}},
     f"{_Q}.config_groups.group_1.weights.num_bits"),  # each group's fields checked
], ids=["bits16", "bits0", "float", "symmetric", "tensor", "block", "tensor_group", "token", "no-strategy",
        "channel-size", "size-minus-1", "block_structure", "dynamic", "actorder-channel", "actorder", "format-float",
        "format-nvfp4", "kv_cache", "sparsity", "transform", "output-activations", "second-group"])
def test_what_flyer_cannot_decode_is_one_line(tmp_path, capsys, d, field):
    """A scheme flyer cannot decode: exit 2, one line naming the field."""
    _config_error(tmp_path, capsys, d, field)


def test_accepted_spellings():
    """compressed-tensors' defaults and aliases: group_size -1 is a channel, a positive one a group; "static" is
    "weight" (no g_idx), "dynamic" and true are "group"."""
    def read(**change):
        return compressed_scheme(_scheme(**change)).groups[0][2]
    assert read(strategy=None, group_size=-1).group_size is None and read(strategy=None).group_size == GROUP
    assert not read(actorder="static").g_idx and read(actorder="dynamic").g_idx and read(actorder=True).g_idx
    assert read(num_bits=8, symmetric=False).num_bits == 8 and not read(symmetric=False).symmetric


@pytest.mark.parametrize("change, problem", [
    (lambda t, s: t.pop(s + "weight_zero_point"), "has no .*weight_zero_point"),
    (lambda t, s: t.pop(s + "weight_g_idx"), "has no .*weight_g_idx"),
    (lambda t, s: t.update({s + "weight_g_idx": torch.zeros(96, dtype=torch.int32)}), "has a .*weight_g_idx"),
    (lambda t, s: t.update({s + "weight_scale": t[s + "weight_scale"][:, :2].contiguous()}), "groups of 16 columns"),
], ids=["no-zero-point", "no-g_idx", "extra-g_idx", "scale-groups"])
def test_missing_or_unexpected_parts_are_one_line(tmp_path, change, problem):
    """A zero point or g_idx the config calls for missing (or one it does not, present), or a scale of another
    group count: a ``CheckpointError`` naming the tensor, from the headers."""
    build(tmp_path, (PACK, 4, False, "group", None if problem.startswith("has a ") else "group"))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    change(tensors, "model.layers.1.self_attn.o_proj.")
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=problem):
        load_hf(tmp_path)


@pytest.mark.parametrize("stored, said", [("group", "channel"), ("channel", "group")])
@pytest.mark.parametrize("fmt", [PACK, NAIVE])
def test_scales_of_another_strategy_are_refused(tmp_path, fmt, stored, said):
    """Tensors quantized per group under a config saying per channel, or the reverse: a ``CheckpointError`` naming
    the tensor, never a weight decoded with the wrong scales."""
    build(tmp_path, (fmt, 4, False, stored, None))
    d = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**d, "quantization_config": combo_config(
        fmt, 4, False, said, None)}))
    with pytest.raises(CheckpointError, match="are not a 4-bit weight in"):
        load_hf(tmp_path)
