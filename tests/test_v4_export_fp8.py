"""``flyer export --dtype fp8`` of DeepSeek-V4 writes DeepSeek's published V4 checkpoint format: attention,
indexer-query and shared-expert weights as E4M3 codes with a UE8M0 scale per 128x128 block (``<stem>.scale``),
routed experts as FP4 E2M1 two to a byte with a UE8M0 scale per 32 inputs, the rest BF16 / FP32 / int64.

Oracles: the tensor list ``tests/test_v4_counts.checkpoint_tensors`` (which reproduces V4-Flash's published
index byte for byte) for the layout and DeepSeek's published V4-Flash config for the quantization keys; the
encoders of ``flyer.interop.v4_quant`` (held to transformers' and brute-force oracles in tests/test_v4_quant.py)
for the values; transformers' DeepseekV4 loading the directory (its own FP8 / FP4 dequantizer) for an outside
reading. Every weight is a code times a power of two, exact in FP32, so values compare bit for bit."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV4ForCausalLM
from transformers.utils.quantization_config import FineGrainedFP8Config

from flyer.cli import main
from flyer.errors import ConfigError
from flyer.interop import export as export_module
from flyer.interop import v4_quant
from flyer.interop.export import export, export_model
from flyer.interop.hf import load_hf, load_tokenizer, read_hf_config, weight_files
from flyer.interop.hf_names import hf_names
from flyer.interop.tensorfile import DTYPES, TensorFile
from flyer.interop.v4_quant import (dequantize_fp4_e2m1, dequantize_ue8m0_blocks, published_format,
                                    quantize_fp4_e2m1, quantize_ue8m0_blocks)
from flyer.model.transformer import Transformer
from tests.hf_models import VOCAB, build
from tests.test_deepseek_v4 import FLASH, v4_tolerance
from tests.test_qwen3 import rel
from tests.test_v4_counts import _small_hybrid, checkpoint_tensors

T = 48  # positions: windows of 8 slide, 12 CSA entries of which queries keep 4, 3 HCA entries


def _tokens(T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


def _header(path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """(safetensors dtype, shape) of every tensor of the directory, from its headers."""
    out = {}
    for name, f in weight_files(path).items():
        tf = TensorFile(f)
        out[name] = (tf.entries[name]["dtype"], tf.shape(name))
    return out


def _files(path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


def _encoded(w: torch.Tensor, kind: str) -> torch.Tensor:
    """The FP32 values the export stores for ``w``: its codes times its scales (``kind``: "fp8_ue8m0", "fp4")."""
    if kind == "fp4":
        return dequantize_fp4_e2m1(*quantize_fp4_e2m1(w))
    return dequantize_ue8m0_blocks(*quantize_ue8m0_blocks(w))


def _expected(source: Transformer, path) -> dict[str, torch.Tensor]:
    """``source``'s state as the FP8 directory ``path`` should hold it: each weight the published format quantizes
    as its encoder's dequantized value, each other tensor rounded to the published dtype (``checkpoint_tensors``)."""
    cfg = source.cfg
    dtypes = {n: DTYPES[d] for n, d, _, _ in checkpoint_tensors(cfg)}
    state = {k: v.detach().clone() for k, v in source.state_dict().items()}
    for name, slot in hf_names(cfg, False).items():
        t = state[slot.key] if slot.expert is None else state[slot.key][slot.expert]
        kind = published_format(name)
        t.copy_(_encoded(t, kind) if kind != "plain" else t.to(dtypes[name]).to(t.dtype))
    return state


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    """(transformers' tiny random V4 directory in FP32, flyer's model of it, the ``flyer export --dtype fp8`` of
    it). Its weights are each one 128x128 block (dims <= 128): transformers' dequantizer derives a block as
    rows / scale rows, which holds for whole blocks only (see ``test_partial_blocks...`` for flyer's)."""
    root = tmp_path_factory.mktemp("v4fp8")
    build("v4", root / "src")
    assert main(["export", str(root / "src"), "--out", str(root / "fp8"), "--dtype", "fp8"]) == 0
    return root / "src", load_hf(root / "src")[0], root / "fp8"


# --- 1. the published layout -----------------------------------------------------------------------------------

def test_every_tensor_has_the_published_name_dtype_and_shape(v4):
    src, source, fp8 = v4
    cfg = read_hf_config(fp8)[0]
    assert cfg == source.cfg
    want = {n: (d, s) for n, d, s, _ in checkpoint_tensors(cfg)}
    got = _header(fp8)
    assert sorted(set(got) ^ set(want)) == [] and {n: got[n] for n in want} == want
    kinds = {d for d, _ in got.values()}
    assert kinds == {"F8_E4M3", "F8_E8M0", "I8", "BF16", "F32", "I64"}
    assert got["layers.2.ffn.experts.5.w2.scale"] == ("F8_E8M0", (64, 1))  # one scale per 32 of moe_inter_dim
    assert got["layers.1.attn.wq_b.scale"] == ("F8_E8M0", (1, 1))
    config = json.loads((fp8 / "config.json").read_text())
    assert config["quantization_config"] == FLASH["quantization_config"]  # DeepSeek's own, key for key
    assert config["expert_dtype"] == FLASH["expert_dtype"] == "fp4"
    assert config["model_type"] == "deepseek_v4"


# --- 2. flyer reads back the encoder's values ------------------------------------------------------------------

def test_flyer_reads_every_weight_as_the_encoders_value(v4):
    """Each quantized weight bit for bit its codes times its scales; the rest the source rounded to BF16 / FP32
    (the hash tables exact). A weight stored unquantized where the format quantizes it, or with a different
    scale rule, fails: the FP8 and FP4 values are far from the source's own."""
    _, source, fp8 = v4
    loaded = load_hf(fp8, dtype=torch.float32)[0].state_dict()
    want = _expected(source, fp8)
    assert loaded.keys() == want.keys()
    assert [k for k in want if not torch.equal(loaded[k], want[k])] == []
    w1 = source.state_dict()["layers.2.ffn.experts.w1"]
    assert not torch.equal(loaded["layers.2.ffn.experts.w1"], w1)  # FP4 moved it: the check can fail
    assert torch.equal(loaded["layers.0.ffn.gate.tid2eid"], source.state_dict()["layers.0.ffn.gate.tid2eid"])


def test_partial_blocks_of_a_flyer_model(tmp_path, v4):
    """A flyer model whose weights span partial 128x128 blocks (dim 160, 320 query rows, q_lora_rank 144),
    written from memory (``export_model``) and streamed from its FP32 export: the same bytes, the published
    layout and the encoder's values."""
    cfg = _small_hybrid(vocab_size=VOCAB, dim=160, n_heads=8, head_dim=40, q_lora_rank=144, moe_inter_dim=96,
                        o_lora_rank=40, n_layers=3, compress_ratios=(0, 4, 5))
    torch.manual_seed(1)
    model = Transformer(cfg).eval()
    tok = load_tokenizer(v4[0])
    export_model(model, tok, tmp_path / "fp8", "fp8")
    export_model(model, tok, tmp_path / "fp32", "fp32")
    export(tmp_path / "fp32", tmp_path / "streamed", "fp8")
    assert _files(tmp_path / "streamed") == _files(tmp_path / "fp8")
    got = _header(tmp_path / "fp8")
    assert got == {n: (d, s) for n, d, s, _ in checkpoint_tensors(cfg)}
    assert got["layers.0.attn.wq_b.scale"] == ("F8_E8M0", (3, 2))  # (320, 144): partial rows and columns
    loaded = load_hf(tmp_path / "fp8", dtype=torch.float32)[0].state_dict()
    want = _expected(model, tmp_path / "fp8")
    assert [k for k in want if not torch.equal(loaded[k], want[k])] == []


# --- 3. logits ---------------------------------------------------------------------------------------------------

def test_logits_are_those_of_the_dequantized_source(v4):
    """The loaded model computes as the source with its weights replaced by their stored values: the same values
    through the same code path, equal logits. The source itself, and the same directory read with the nibbles of
    each FP4 byte swapped (a writer / reader disagreeing on the order), are more than 100x the FP32 tolerance
    (``v4_tolerance``) away: quantization moves the logits by far more than rounding does."""
    _, source, fp8 = v4
    model, cfg, _ = load_hf(fp8, dtype=torch.float32)
    replaced = Transformer(cfg).eval()
    replaced.load_state_dict(_expected(source, fp8))
    x = _tokens(T, 1)
    with torch.no_grad():
        got, want, plain = model(x), replaced(x), source(x)
    tol = v4_tolerance(cfg, T)
    assert torch.equal(got, want)  # the same weights, the same code path: no rounding apart
    quantization = rel(plain, got)
    print(f"relative logit error of the FP8/FP4 export vs the FP32 source: {quantization:.3g} (tolerance {tol:.3g})")
    assert quantization > 100 * tol
    original = v4_quant._fp4_codes
    try:
        v4_quant._fp4_codes = lambda p: original(p).view(*p.shape, 2).flip(-1).flatten(-2)
        swapped = load_hf(fp8, dtype=torch.float32)[0]
    finally:
        v4_quant._fp4_codes = original
    with torch.no_grad():
        assert rel(swapped(x), want) > 100 * tol


# --- 4. transformers reads it ------------------------------------------------------------------------------------

def test_transformers_loads_the_directory_as_flyer_does(v4):
    """transformers' DeepseekV4 with its fine-grained FP8 quantizer (``scale_fmt`` ue8m0, ``expert_dtype`` fp4 from
    the config) loads the directory on the CPU by dequantizing it (``dequantize=True``, what it does on a CPU
    anyway; asked for so a GPU machine does too): no weight missing or unexpected, every quantized weight bit for
    bit flyer's, and its logits flyer's within the FP32 tolerance; the unquantized source's are far outside."""
    _, source, fp8 = v4
    model, cfg, _ = load_hf(fp8, dtype=torch.float32)
    ref, info = AutoModelForCausalLM.from_pretrained(
        fp8, dtype=torch.float32, output_loading_info=True,
        quantization_config=FineGrainedFP8Config(dequantize=True, scale_fmt="ue8m0", expert_dtype="fp4"))
    assert isinstance(ref, DeepseekV4ForCausalLM)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    ours = model.state_dict()
    theirs = dict(ref.named_parameters())
    pairs = {"attn.wq_a.weight": "self_attn.q_a_proj.weight", "attn.wq_b.weight": "self_attn.q_b_proj.weight",
             "attn.wkv.weight": "self_attn.kv_proj.weight", "attn.wo_a.weight": "self_attn.o_a_proj.weight",
             "attn.wo_b.weight": "self_attn.o_b_proj.weight",
             "ffn.shared.w1.weight": "mlp.shared_experts.gate_proj.weight",
             "ffn.shared.w2.weight": "mlp.shared_experts.down_proj.weight",
             "ffn.shared.w3.weight": "mlp.shared_experts.up_proj.weight", "ffn.experts.w2": "mlp.experts.down_proj"}
    for i in range(cfg.n_layers):
        for mine, hf in pairs.items():
            assert torch.equal(ours[f"layers.{i}.{mine}"], theirs[f"model.layers.{i}.{hf}"]), (i, mine)
        gate_up = torch.cat((ours[f"layers.{i}.ffn.experts.w1"], ours[f"layers.{i}.ffn.experts.w3"]), 1)
        assert torch.equal(gate_up, theirs[f"model.layers.{i}.mlp.experts.gate_up_proj"]), i
    assert torch.equal(ours["layers.1.attn.indexer.wq_b.weight"],
                       theirs["model.layers.1.self_attn.compressor.indexer.q_b_proj.weight"])
    x = _tokens(T, 2)
    with torch.no_grad():
        want = ref(x).logits
        err, tol = rel(model(x), want), v4_tolerance(cfg, T)
        assert err <= tol, f"{err:.3g} > {tol:.3g}"
        assert rel(source(x), want) > 100 * tol


# --- 5. no double rounding ---------------------------------------------------------------------------------------

def test_re_export_keeps_codes_and_scales_byte_for_byte(v4, tmp_path, monkeypatch):
    """``flyer export`` of the FP8 directory to FP8 writes the same files, byte for byte. Quantizing its values
    again instead (what a re-export without the source's codes does) changes the bytes of the FP4 groups whose
    largest code is 3 (the same values at half the scale, ``v4_quant``): the comparison can fail."""
    _, _, fp8 = v4
    assert main(["export", str(fp8), "--out", str(tmp_path / "again"), "--dtype", "fp8"]) == 0
    assert _files(tmp_path / "again") == _files(fp8)
    monkeypatch.setattr(export_module, "_v4_source_codes", lambda files, headers: {})
    export(fp8, tmp_path / "requantized", "fp8")
    a, b = _files(fp8), _files(tmp_path / "requantized")
    assert [k for k in a if a[k] != b[k]] == ["model.safetensors"]
    assert all(torch.equal(u, v) for u, v in zip(load_hf(fp8, dtype=torch.float32)[0].state_dict().values(),
                                                 load_hf(tmp_path / "requantized", dtype=torch.float32)[0]
                                                 .state_dict().values()))


def test_flyer_generate_reads_it_as_its_values(v4, tmp_path, capsys):
    """``flyer generate`` of the FP8 directory gives the tokens it gives for its BF16 export (the same values:
    every code times its scale is exact in BF16), with the weights held as the CPU holds them by default (as each
    stores them: FP8 codes for the FP8 directory, BF16 for its export, computed in FP32) and not held
    (``--weight-dtype fp32``: an FP32 model)."""
    _, _, fp8 = v4
    assert main(["export", str(fp8), "--out", str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    for held in ("auto", "fp32"):  # auto: held as stored, computed in FP32; fp32: FP32 weights
        tokens = []
        for path in (fp8, tmp_path / "bf16"):
            capsys.readouterr()
            assert main(["generate", "--ckpt", str(path), "--prompt", "the quick brown fox", "--max-new-tokens", "8",
                         "--json", "--eos-id", "-1", "--weight-dtype", held]) == 0
            tokens.append(json.loads(capsys.readouterr().out)["token_ids"])
        assert tokens[0] == tokens[1] and len(tokens[0][0]) == 8, (held, tokens)


# --- 6. errors ---------------------------------------------------------------------------------------------------

def _one_line_exit_2(args, capsys, *words) -> str:
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(w in err[0] for w in words), err
    return err[0]


def _nothing_written(out) -> None:
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []  # no partial directory


@pytest.mark.parametrize("field, change", [("moe_inter_dim", dict(moe_inter_dim=48)), ("dim", dict(dim=48))])
def test_a_model_fp4_cannot_hold_is_one_line_and_writes_nothing(v4, tmp_path, capsys, field, change):
    """FP4 experts hold one scale per 32 inputs: a dim or moe_inter_dim not a multiple of 32 is refused, naming
    the field, before anything is written (the FP32 export of the same model is fine)."""
    model = Transformer(_small_hybrid(vocab_size=VOCAB, **change)).eval()
    tok = load_tokenizer(v4[0])
    with pytest.raises(ConfigError, match=f"'{field}'.*multiple of 32"):
        export_model(model, tok, tmp_path / "mem", "fp8")
    _nothing_written(tmp_path / "mem")
    export_model(model, tok, tmp_path / "fp32", "fp32")
    line = _one_line_exit_2(["export", str(tmp_path / "fp32"), "--out", str(tmp_path / "out"), "--dtype", "fp8"],
                            capsys, field, "32")
    assert "FP4" in line
    _nothing_written(tmp_path / "out")


def test_a_corrupt_scale_in_an_fp8_source_is_one_line_and_writes_nothing(v4, tmp_path, capsys):
    """A NaN UE8M0 byte (0xFF) in the last routed expert's scale of an FP8 source: its re-export, which writes
    the source's own codes, checks them as the loader does; the failure names the tensor and leaves nothing."""
    _, _, fp8 = v4
    bad = tmp_path / "bad"
    shutil.copytree(fp8, bad)
    name = "layers.3.ffn.experts.7.w3.scale"
    raw = bytearray((bad / "model.safetensors").read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")  # the data follows the 8-byte length and the JSON header
    raw[start + TensorFile(bad / "model.safetensors").entries[name]["data_offsets"][0]] = 0xFF
    (bad / "model.safetensors").write_bytes(bytes(raw))
    _one_line_exit_2(["export", str(bad), "--out", str(tmp_path / "out"), "--dtype", "fp8"], capsys,
                     "layers.3.ffn.experts.7.w3.weight", "0xFF")
    _nothing_written(tmp_path / "out")
    _one_line_exit_2(["export", str(bad), "--out", str(tmp_path / "out"), "--dtype", "bf16"], capsys,
                     "layers.3.ffn.experts.7.w3.weight", "0xFF")  # the loader's own check, alike
    _nothing_written(tmp_path / "out")
