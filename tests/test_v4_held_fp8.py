"""DeepSeek-V4 FP8 checkpoints (``flyer export --dtype fp8``: E4M3 with UE8M0 128x128 block scales, routed experts
FP4 E2M1 with a UE8M0 scale per 32 inputs) held as FP8 by ``flyer generate`` / ``flyer serve`` on the CPU.

Oracle: the same directory loaded as an FP32 model (``load_hf(dtype=float32)``: every code times its scale, exact
in FP32; tests/test_v4_export_fp8.py holds those values to the encoders' and to transformers'). Held, each FP8
weight's codes times its block scales (``kernels.dequantize_held``, what the held kernels compute with) must be
those values bit for bit, the weights the file stores in BF16 (the compressors, the head) held in BF16 as they
are, and the logits those of the FP32 model: bit for bit where the held GEMMs run torch's (``kernels.disabled``),
within two FP32 evaluations' bound (``v4_tolerance``) where flyer's kernels sum in their own order. Mutation
checks: requantizing the same values (what ``--weight-dtype fp8`` did on a V4 checkpoint) is far from them."""

import copy
import json
import math
import shutil

import pytest
import torch
from bounds import rel_error

from flyer import kernels
from flyer.cli import main
from flyer.errors import CheckpointError
from flyer.infer.weights import FP8, HeldFP8Experts, HeldFP8Linear, hold_weights
from flyer.interop.export import export_model
from flyer.interop.hf import load_tokenizer, weight_files
from flyer.interop.load import load_pretrained, loaded_bytes, stored_weight_dtype
from flyer.interop.tensorfile import TensorFile
from flyer.interop.v4_quant import (dequantize_fp4_e2m1, dequantize_ue8m0_blocks, held_e4m3_blocks,
                                    published_format, quantize_fp4_e2m1, quantize_ue8m0_blocks)
from flyer.model.lowp import Linear
from flyer.model.transformer import Transformer
from tests.hf_models import VOCAB, build
from tests.test_deepseek_v4 import v4_tolerance
from tests.test_v4_counts import _small_hybrid

T = 48  # positions: every V4 layer kind's compressed entries and the sliding window take part


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """{"tiny": transformers' tiny random V4 exported ``--dtype fp8`` (every weight one 128x128 block, the
    experts' w1|w3 two tensors), "blocks": a flyer V4 model with partial blocks (dim 160, 320 query rows,
    q_lora_rank 144) and 128-row expert blocks (moe_inter_dim 128: w1|w3 packed), exported alike}."""
    root = tmp_path_factory.mktemp("v4held")
    build("v4", root / "src")
    assert main(["export", str(root / "src"), "--out", str(root / "tiny"), "--dtype", "fp8"]) == 0
    cfg = _small_hybrid(vocab_size=VOCAB, dim=160, n_heads=8, head_dim=40, q_lora_rank=144, moe_inter_dim=128,
                        o_lora_rank=40, n_layers=3, compress_ratios=(0, 4, 5))
    torch.manual_seed(1)
    export_model(Transformer(cfg).eval(), load_tokenizer(root / "src"), root / "blocks", "fp8")
    return {"tiny": root / "tiny", "blocks": root / "blocks"}


def _held_values(held: Transformer) -> dict[str, torch.Tensor]:
    """Every FP8-held weight's values, its codes times its block scales, by state-dict key."""
    out = {}
    for name, m in held.named_modules():
        if isinstance(m, HeldFP8Linear):
            out[f"{name}.weight"] = kernels.dequantize_held(m.weight, m.weight_scale)
        elif isinstance(m, HeldFP8Experts):
            for w in ("w1", "w2", "w3"):
                codes, scale = getattr(m, w), getattr(m, f"{w}_scale")
                out[f"{name}.{w}"] = torch.stack([kernels.dequantize_held(c, s) for c, s in zip(codes, scale)])
    return out


def _quantized_keys(path) -> set[str]:
    """The state-dict keys the directory stores quantized (E4M3 or FP4), from its tensor names."""
    keys = set()
    for name in weight_files(path):
        kind = published_format(name)
        if kind == "fp4":  # layers.i.ffn.experts.e.wk.weight -> the stack layers.i.ffn.experts.wk
            stem, _, rest = name.partition(".experts.")
            keys.add(f"{stem}.experts.{rest.split('.')[1]}")
        elif kind == "fp8_ue8m0":
            keys.add(name.replace(".ffn.shared_experts.", ".ffn.shared."))
    return keys


def test_stored_weight_dtype_is_fp8(dirs, tmp_path):
    """``--weight-dtype auto``'s reading of the directory: fp8 (it answered fp32 for V4's format, by its BF16
    embedding: bf16; the V3 answer, from ``weight_scale_inv``, is tests/test_infer_weights.py's); its BF16
    export: bf16."""
    assert stored_weight_dtype(dirs["tiny"]) == stored_weight_dtype(dirs["blocks"]) == "fp8"
    assert main(["export", str(dirs["tiny"]), "--out", str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    assert stored_weight_dtype(tmp_path / "bf16") == "bf16"


@pytest.mark.parametrize("which", ["tiny", "blocks"])
def test_held_weights_are_the_files_values(dirs, which):
    """Every weight the file stores as E4M3 or FP4 is held as FP8, and its codes times its power-of-two block
    scales are the file's values bit for bit; every other tensor is the FP32 load's, the BF16 ones (compressors,
    head) held in BF16 as stored. ``loaded_bytes`` counts what loading allocates. Requantizing the same values
    (amax / 448 per block, what ``hold_weights`` does to an FP32 model) changes most of them."""
    want = load_pretrained(dirs[which], dtype=torch.float32)[0]
    held = load_pretrained(dirs[which], dtype=torch.float32, held=FP8)[0]
    values, ref = _held_values(held), want.state_dict()
    assert set(values) == _quantized_keys(dirs[which])
    assert [k for k, v in values.items() if not torch.equal(v, ref[k])] == []
    scales = [b for n, b in held.named_buffers() if n.endswith("_scale")]
    assert all(torch.equal(s, torch.exp2(torch.log2(s).round())) for s in scales)  # powers of two
    bf16 = {n for n, p in held.named_parameters() if p.dtype == torch.bfloat16}
    assert "head.weight" in bf16 and "layers.1.attn.compressor.wkv.weight" in bf16
    assert all(".compressor." in n or n == "head.weight" for n in bf16), bf16
    for name, p in held.named_parameters():
        if p.dtype != FP8:
            assert torch.equal(p.float(), ref[name]), name
    unique = {id(t): t for t in (*held.parameters(), *held.buffers())}
    assert loaded_bytes(dirs[which], torch.float32, FP8) == sum(t.numel() * t.element_size() for t in unique.values())
    requantized = copy.deepcopy(want)
    hold_weights(requantized, FP8)
    moved = [k for k, v in _held_values(requantized).items() if not torch.equal(v, ref[k])]
    assert len(moved) > len(values) // 2, (len(moved), len(values))


@pytest.mark.parametrize("which", ["tiny", "blocks"])
def test_logits_are_the_fp32_models(dirs, which):
    """The held model's logits are the FP32 model's: bit for bit through torch's ops (``kernels.disabled``, both
    models: the held weights widened, then the FP32 model's ops), within ``v4_tolerance`` (two FP32 evaluations
    summing in different orders) through flyer's held kernels. The old hold (the same values requantized) is
    > 100x that away."""
    want = load_pretrained(dirs[which], dtype=torch.float32)[0]
    held = load_pretrained(dirs[which], dtype=torch.float32, held=FP8)[0]
    requantized = copy.deepcopy(want)
    hold_weights(requantized, FP8)
    x = torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))
    tol = v4_tolerance(want.cfg, T)
    with torch.no_grad():
        with kernels.disabled():
            assert torch.equal(held(x), want(x))
        ref = want(x)
        err, old = rel_error(held(x), ref), rel_error(requantized(x), ref)
    print(f"{which}: held FP8 vs FP32 relative logit error {err:.3g}, requantized {old:.3g}, tolerance {tol:.3g}")
    assert err <= tol and old > 100 * tol


def test_generate_auto_holds_fp8_with_the_bf16_exports_tokens(dirs, tmp_path, capsys):
    """``flyer generate`` with the default ``--weight-dtype auto`` holds the FP8 directory as FP8 and its BF16
    export as BF16 (the same values: E4M3 / E2M1 times a power of two is exact in BF16): the same greedy tokens."""
    fp8 = dirs["tiny"]
    assert main(["export", str(fp8), "--out", str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    runs = {}
    for path, held in ((fp8, "fp8"), (tmp_path / "bf16", "bf16")):
        capsys.readouterr()
        assert main(["generate", "--ckpt", str(path), "--prompt", "the quick brown fox", "--max-new-tokens", "8",
                     "--json", "--eos-id", "-1", "--device", "cpu"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["weight_dtype"] == held
        runs[held] = out["token_ids"]
    assert runs["fp8"] == runs["bf16"] and len(runs["fp8"][0]) == 8, runs


def test_fp8_holds_about_half_the_bytes_of_bf16(dirs):
    """Measured from the held tensors: each weight the file quantizes takes one byte a value held as FP8 (plus
    one FP32 scale per 128x128 block) against BF16's two; the rest (BF16 compressors and head) is alike."""
    for which, path in dirs.items():
        fp8 = load_pretrained(path, dtype=torch.float32, held=FP8)[0]
        bf16 = load_pretrained(path, dtype=torch.float32, held=torch.bfloat16)[0]

        def held_bytes(model):
            held = {id(t): t for n, t in (*model.named_parameters(), *model.named_buffers())
                    if t.dtype in (FP8, torch.bfloat16) or n.endswith("_scale")}
            return sum(t.numel() * t.element_size() for t in held.values())
        codes = {id(p): p for p in fp8.parameters() if p.dtype == FP8}
        n_codes = sum(p.numel() for p in codes.values())
        n_scales = sum(b.numel() for n, b in fp8.named_buffers() if n.endswith("_scale"))
        a, b = held_bytes(fp8), held_bytes(bf16)
        print(f"{which}: held FP8 {a} bytes, held BF16 {b} bytes: {a / b:.3f} (quantized weights "
              f"{(n_codes + 4 * n_scales) / (2 * n_codes):.4f} of their BF16 bytes)")
        assert a == b - n_codes + 4 * n_scales
        assert n_codes + 4 * n_scales <= 0.51 * (2 * n_codes)
        assert a <= 0.6 * b  # the BF16 head and compressors are a tenth of the tiny models' GEMM weights


def _edit(path, name: str, edit) -> None:
    """Call ``edit`` on the bytes (a uint8 tensor view) of tensor ``name`` of the directory's safetensors file."""
    f = path / "model.safetensors"
    raw = bytearray(f.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")  # the data follows the 8-byte length and the JSON header
    lo, hi = TensorFile(f).entries[name]["data_offsets"]
    data = torch.frombuffer(raw, dtype=torch.uint8)[start + lo:start + hi]
    edit(data)
    f.write_bytes(bytes(raw))


EXPERT = "layers.2.ffn.experts.5.w2"  # (dim 64, moe_inter_dim 32): one 128x128 block of 64 rows of one FP4 group


def _with_row0_scale(src, dst, binades_below: int) -> int:
    """Copy ``src`` to ``dst`` with row 0 of ``EXPERT`` rescaled to 2**(S - binades_below), S its block's E4M3
    scale exponent (set by the other rows: row 0 is made small), and its first value the code 0.5: held, that
    value is 2**(S - binades_below - 1) / 2**S = 2**-(binades_below + 1) times the scale, an E4M3 subnormal
    (multiple of 2**-9) iff binades_below <= 8. Returns S."""
    shutil.copytree(src, dst)
    values = load_pretrained(src, dtype=torch.float32)[0].state_dict()["layers.2.ffn.experts.w2"][5]
    amax = float(values[1:].abs().max())
    S = math.ceil(math.log2(amax / 448))
    assert 448 * 2.0 ** (S - 1) < amax <= 448 * 2.0 ** S  # S is the block's: ceil(log2(amax / 448))
    _edit(dst, f"{EXPERT}.scale", lambda b: b.__setitem__(0, S - binades_below + 127))  # UE8M0: bias 127

    def code_half(b):  # low nibble of byte 0: column 0, code 1 = +0.5
        b[0] = (b[0] & 0xF0) | 1
    _edit(dst, f"{EXPERT}.weight", code_half)
    return S


def test_an_expert_block_past_e4m3s_range_is_refused_naming_the_tensor(dirs, tmp_path, capsys):
    """The exactness condition (``held_e4m3_blocks``) at its edge: a group scale 8 binades under the block's
    E4M3 scale holds its 0.5 code as the subnormal 2**-9 (held, bit for bit the file's values); 9 binades under,
    that value falls between E4M3's values: the load is refused, in one line naming the tensor and the remedy
    (``flyer generate`` too, exit 2), and ``--weight-dtype bf16`` loads it (exactly: BF16 holds it). Mutation:
    the E4M3 rounding of that block, what holding it regardless would give, is not the file's values."""
    edge = tmp_path / "edge"
    S = _with_row0_scale(dirs["tiny"], edge, 8)
    want = load_pretrained(edge, dtype=torch.float32)[0].state_dict()["layers.2.ffn.experts.w2"][5]
    assert want[0, 0] == 2.0 ** (S - 9)  # the edit took: 0.5 * 2**(S - 8)
    held = load_pretrained(edge, dtype=torch.float32, held=FP8)[0]
    assert torch.equal(_held_values(held)["layers.2.ffn.experts.w2"][5], want)

    bad = tmp_path / "bad"
    _with_row0_scale(dirs["tiny"], bad, 9)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(bad, dtype=torch.float32, held=FP8)
    msg = str(e.value)
    assert "\n" not in msg and f"{EXPERT}.weight" in msg and "bf16" in msg and "1 of its 128x128 blocks" in msg
    values = load_pretrained(bad, dtype=torch.float32)[0].state_dict()["layers.2.ffn.experts.w2"][5]
    assert values[0, 0] == 2.0 ** (S - 10)
    assert not torch.equal(dequantize_ue8m0_blocks(*quantize_ue8m0_blocks(values)), values)  # rounding moves it

    capsys.readouterr()
    args = ["generate", "--ckpt", str(bad), "--prompt", "hello", "--max-new-tokens", "2", "--device", "cpu",
            "--json", "--eos-id", "-1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{EXPERT}.weight" in err[0] and "bf16" in err[0], err
    assert main([*args, "--weight-dtype", "bf16"]) == 0
    bf16 = load_pretrained(bad, dtype=torch.float32, held=torch.bfloat16)[0].state_dict()["layers.2.ffn.experts.w2"]
    assert torch.equal(bf16[5].float(), values)


def test_rows_permuted_keep_their_values_or_are_refused():
    """``held_e4m3_blocks``' row order (a rope permutation, as ``fill_tensor`` passes for V3's layouts; V4 has
    none), on partial blocks (200 rows, 96 columns): E4M3 rows that keep their 128-row block move with their codes
    under the file's scales; rows that cross blocks are re-blocked, exact where the blocks' scales agree, and
    refused where a block's values would round (rows from a block of a smaller scale carry bits below the new
    block's E4M3 grid), never rounded. FP4 rows crossing blocks: the same values (scales within 15 binades)."""
    torch.manual_seed(0)
    w = torch.randn(200, 96) * torch.logspace(-2, 2, 200).unsqueeze(1)  # row scales spanning 4 decades
    codes, scale = quantize_ue8m0_blocks(w)
    values = dequantize_ue8m0_blocks(codes, scale)
    within = torch.arange(200).view(-1, 8).flip(1).reshape(-1)  # 8-row groups reversed: all stay in their blocks
    across = torch.arange(200).flip(0)
    for order in (None, within):
        c, s = held_e4m3_blocks("fp8_ue8m0", codes, scale, "w", order)
        rows = values if order is None else values[order]
        assert torch.equal(kernels.dequantize_held(c, s), rows)
        moved = codes if order is None else codes[order]  # the file's codes and scales
        assert torch.equal(c.view(torch.uint8), moved.view(torch.uint8))
        assert torch.equal(s, torch.exp2(scale.view(torch.uint8).float() - 127))
    with pytest.raises(ValueError, match=r"w: 1 of its 128x128 blocks .* cannot hold them exactly"):
        held_e4m3_blocks("fp8_ue8m0", codes, scale, "w", across)
    rounded = dequantize_ue8m0_blocks(*quantize_ue8m0_blocks(values[across]))
    assert not torch.equal(rounded, values[across])  # what holding them regardless would give
    one_scale = quantize_ue8m0_blocks(w.clamp(-100, 100), scale=torch.full_like(scale.view(torch.uint8), 127 - 1)
                                      .view(scale.dtype))  # every block 2**-1: the values' grid is one
    c, s = held_e4m3_blocks("fp8_ue8m0", *one_scale, "w", across)
    assert torch.equal(kernels.dequantize_held(c, s), dequantize_ue8m0_blocks(*one_scale)[across])
    packed, groups = quantize_fp4_e2m1(w)
    c, s = held_e4m3_blocks("fp4", packed, groups, "w", across)
    assert torch.equal(kernels.dequantize_held(c, s), dequantize_fp4_e2m1(packed, groups)[across])


def test_weights_a_bf16_model_holds_as_fp8_are_unchanged(dirs):
    """Holding an FP32 model in FP8 without a checkpoint (``hold_weights``, ``--preset``) still quantizes every
    GEMM weight, the compressors included: ``as_stored`` is what the loader passes for a checkpoint's own."""
    model = load_pretrained(dirs["tiny"], dtype=torch.float32)[0]
    hold_weights(model, FP8)
    assert model.layers[1].attn.compressor.wkv.weight.dtype == FP8
    assert not any(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if n != "head.weight")
    assert all(isinstance(m, HeldFP8Linear) for n, m in model.named_modules()
               if isinstance(m, Linear) and n.endswith("compressor.wgate"))
