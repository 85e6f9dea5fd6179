"""DeepSeek-V4's FP8-UE8M0 and FP4-E2M1 weight formats (flyer.interop.v4_quant).

Oracles: value tables built here from the format definitions (E4M3: bias 7, no infinities, S.1111.111
NaN; E2M1: bias 1; E8M0: 2**(b - 127), 0xFF NaN), and transformers' own CPU dequantize op
(``Fp8Dequantize._dequantize_one``, the one its loader runs) and FP8 quantize op. Every product of a
code and a power-of-two scale is exact in FP32, so all comparisons are bit for bit."""

import math

import pytest
import torch

from flyer.interop import v4_quant as vq
from flyer.interop.v4_quant import (dequantize_fp4_e2m1, dequantize_ue8m0_blocks, quantize_fp4_e2m1,
                                    quantize_ue8m0_blocks, stored_format)

E8M0 = torch.float8_e8m0fnu


def e4m3_value(code: int) -> float:
    sign = -1.0 if code & 0x80 else 1.0
    exponent, mantissa = (code >> 3) & 0xF, code & 7
    if exponent == 0xF and mantissa == 7:
        return math.nan
    if exponent == 0:
        return sign * math.ldexp(mantissa / 8, -6)
    return sign * math.ldexp(1 + mantissa / 8, exponent - 7)


def e2m1_value(code: int) -> float:
    sign = -1.0 if code & 8 else 1.0
    exponent, mantissa = (code >> 1) & 3, code & 1
    return sign * (mantissa / 2 if exponent == 0 else math.ldexp(1 + mantissa / 2, exponent - 1))


def e8m0(bytes_) -> torch.Tensor:
    return torch.as_tensor(bytes_, dtype=torch.uint8).view(E8M0)


def weights(shape, seed, spread=True):
    """Random weights whose blocks span many binades (the scales then differ block to block)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    if spread:
        w = w * torch.exp2(torch.randint(-12, 4, (shape[0], 1), generator=g).float())
        w = w * torch.exp2(torch.randint(-3, 3, (1, shape[1]), generator=g).float())
    return w


@pytest.fixture(scope="module")
def hf_dequantize():
    pytest.importorskip("transformers")
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer
    from transformers.utils.quantization_config import FineGrainedFP8Config

    # as its loader builds them for DeepSeek-V4-Flash's quantization_config, on a CPU (dequantize)
    config = FineGrainedFP8Config(activation_scheme="dynamic", weight_block_size=[128, 128], scale_fmt="ue8m0",
                                  expert_dtype="fp4", dequantize=True)
    quantizer = FineGrainedFP8HfQuantizer(config)
    return Fp8Dequantize(quantizer), Fp8Quantize(quantizer)


# --- the value tables ----------------------------------------------------------------------------

def test_every_finite_e4m3_code_and_every_scale_byte_decode_to_their_defined_values():
    finite = [c for c in range(256) if (c & 0x7F) != 0x7F]  # 254 codes
    data = torch.tensor(finite, dtype=torch.uint8).view(torch.float8_e4m3fn).repeat(2, 1)  # (2, 254)
    for scale_byte in (0, 1, 117, 127, 130, 200, 246):  # 2**-127 (an FP32 subnormal) .. 2**119
        out = dequantize_ue8m0_blocks(data, e8m0([[scale_byte, scale_byte]]))
        want = torch.tensor([e4m3_value(c) * math.ldexp(1.0, scale_byte - 127) for c in finite])
        assert torch.equal(out, want.repeat(2, 1)), scale_byte
        assert torch.equal(out.signbit(), want.signbit().repeat(2, 1))  # -0 stays -0
    # all 255 finite scale bytes, one per block of one code 1.0 (0x38)
    ones = torch.full((1, 255 * 128), 0x38, dtype=torch.uint8).view(torch.float8_e4m3fn)
    out = dequantize_ue8m0_blocks(ones, e8m0([list(range(255))]))
    assert torch.equal(out[0, ::128], torch.tensor([math.ldexp(1.0, b - 127) for b in range(255)]))


def test_every_fp4_code_in_both_nibbles_decodes_to_its_defined_value_low_nibble_first():
    packed = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.int8).repeat(3, 1)  # (3, 256): K=512
    scale_bytes = torch.randint(100, 140, (3, 16), dtype=torch.int32).to(torch.uint8)
    out = dequantize_fp4_e2m1(packed, scale_bytes.view(E8M0))
    want = torch.empty(3, 512, dtype=torch.float64)
    for r in range(3):
        for b in range(256):
            for col, code in ((2 * b, b & 0xF), (2 * b + 1, b >> 4)):
                want[r, col] = e2m1_value(code) * math.ldexp(1.0, int(scale_bytes[r, col // 32]) - 127)
    assert torch.equal(out, want.float()) and torch.equal(out.signbit(), want.signbit())
    assert sorted({e2m1_value(c) for c in range(8)}) == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


def test_bf16_output_is_the_fp32_result_rounded_once_and_exact_at_checkpoint_scales():
    w = weights((256, 256), 1)
    codes, scale = quantize_ue8m0_blocks(w)
    fp32 = dequantize_ue8m0_blocks(codes, scale)
    bf16 = dequantize_ue8m0_blocks(codes, scale, torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16.float(), fp32)  # 4 significant bits fit in 8
    packed, s4 = quantize_fp4_e2m1(w)
    assert torch.equal(dequantize_fp4_e2m1(packed, s4, torch.bfloat16).float(), dequantize_fp4_e2m1(packed, s4))


# --- against transformers ------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(128, 128), (256, 384), (384, 256)])
def test_fp8_quantizer_and_dequantizer_agree_with_transformers_bit_for_bit(hf_dequantize, shape):
    deq, quant = hf_dequantize
    w = weights(shape, 2)
    codes, scale = quantize_ue8m0_blocks(w)
    theirs = quant._quantize_one("layers.0.attn.wq_a.weight", w)
    assert torch.equal(codes.view(torch.uint8), theirs["layers.0.attn.wq_a.weight"].view(torch.uint8))
    assert torch.equal(scale.view(torch.uint8), theirs["layers.0.attn.wq_a.weight_scale_inv"].view(torch.uint8))
    ours = dequantize_ue8m0_blocks(codes, scale)
    assert torch.equal(ours, deq._dequantize_one(codes, scale, output_dtype=torch.float32))
    # the loader's entry point, into BF16 (its default for byte-sized scales)
    loaded = deq.convert({"weight": [codes], "weight_scale_inv": [scale]})["weight"]
    assert loaded.dtype == torch.bfloat16 and torch.equal(loaded, dequantize_ue8m0_blocks(codes, scale, torch.bfloat16))
    # quantization error of round-to-nearest E4M3: half a unit in the last place (2**-4 relative),
    # or half the smallest subnormal step 2**-10 times the scale
    s = scale.float().repeat_interleave(128, 0).repeat_interleave(128, 1)
    assert ((ours - w).abs() <= torch.maximum(w.abs() * 2**-4, s * 2**-10)).all()


@pytest.mark.parametrize("shape", [(64, 256), (5, 4096)])
def test_fp4_dequantizer_agrees_with_transformers_bit_for_bit(hf_dequantize, shape):
    deq, _ = hf_dequantize
    packed, scale = quantize_fp4_e2m1(weights(shape, 3))
    assert packed.dtype == torch.int8 and packed.shape == (shape[0], shape[1] // 2)
    assert scale.dtype == E8M0 and scale.shape == (shape[0], shape[1] // 32)
    ours = dequantize_fp4_e2m1(packed, scale)
    assert torch.equal(ours, deq._dequantize_one(packed, scale, output_dtype=torch.float32))
    loaded = deq.convert({"weight": [packed], "weight_scale_inv": [scale]})["weight"]
    assert torch.equal(loaded, dequantize_fp4_e2m1(packed, scale, torch.bfloat16))


def fp4_oracle(w: torch.Tensor):
    """Independent FP4 encoder: scale 2**ceil(log2(amax/6)) from a float64 log2, then the nearest of
    the 15 E2M1 values by brute force, a tie going to the even code; (values (N, K), scale (N, K/32))."""
    N, K = w.shape
    g = w.double().view(N, K // 32, 32)
    amax = g.abs().amax(-1)
    e = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6)), torch.zeros_like(amax))
    q = g / torch.exp2(e).unsqueeze(-1)
    grid = torch.tensor([e2m1_value(c) for c in range(8)], dtype=torch.float64)
    d = (q.abs().clamp(max=6).unsqueeze(-1) - grid).abs()
    tied = d == d.min(-1, keepdim=True).values
    even = tied & (torch.arange(8) % 2 == 0)
    code = torch.where(even.any(-1), even.int().argmax(-1), tied.int().argmax(-1))
    values = grid[code] * torch.where(q.signbit(), -1.0, 1.0) * torch.exp2(e).unsqueeze(-1)
    return values.view(N, K).float(), torch.exp2(e).float()


def test_fp4_quantizer_matches_a_brute_force_nearest_even_encoder():
    w = weights((64, 512), 4)
    # plant every tie: midpoints between grid values, at a block whose scale is 1 (amax 6)
    w[0, :32] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] * 4) * torch.tensor([1.0, -1.0]).repeat(16)
    packed, scale = quantize_fp4_e2m1(w)
    want, want_scale = fp4_oracle(w)
    got = dequantize_fp4_e2m1(packed, scale)
    assert torch.equal(scale.float(), want_scale)
    assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())
    assert got[0, 1:8].tolist() == [-0.0, 1.0, -1.0, 2.0, -2.0, 4.0, -4.0]


# --- round trips ---------------------------------------------------------------------------------

def blocks_max_code(codes: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    c = codes.abs()
    return c.view(c.shape[0] // rows, rows, -1, cols).amax((1, 3))


def test_fp8_round_trip_reproduces_every_byte_but_the_blocks_topped_by_code_224(hf_dequantize):
    deq, _ = hf_dequantize
    w = weights((1024, 1024), 5, spread=False)
    amax = w.view(8, 128, 8, 128).abs().amax((1, 3), keepdim=True)
    # block maxima log-uniform over a binade, so some (about 5%) round down to code 224; two planted
    target = torch.exp2(torch.rand(8, 1, 8, 1, generator=torch.Generator().manual_seed(5)) - 10)
    target[0, 0, :2] = torch.tensor([226.0, 229.0]).view(2, 1) * 2**-18
    codes, scale = quantize_ue8m0_blocks((w.view(8, 128, 8, 128) * (target / amax)).view(1024, 1024))  # a checkpoint
    values = dequantize_ue8m0_blocks(codes, scale)
    assert torch.equal(values, deq._dequantize_one(codes, scale, output_dtype=torch.float32))
    again, again_scale = quantize_ue8m0_blocks(values)
    assert torch.equal(dequantize_ue8m0_blocks(again, again_scale), values)  # always: the same weights
    top = blocks_max_code(codes.float(), 128, 128)
    low = top == 224  # the ceil rule re-encodes these at half the scale, every code doubled
    assert 0 < int(low.sum()) < low.numel()
    same = ~low.repeat_interleave(128, 0).repeat_interleave(128, 1)
    assert torch.equal(again.view(torch.uint8)[same], codes.view(torch.uint8)[same])
    assert torch.equal(again_scale.view(torch.uint8)[~low], scale.view(torch.uint8)[~low])
    assert torch.equal(again_scale.view(torch.uint8)[low], scale.view(torch.uint8)[low] - 1)
    # with the checkpoint's scales, every byte
    kept, kept_scale = quantize_ue8m0_blocks(values, scale)
    assert torch.equal(kept.view(torch.uint8), codes.view(torch.uint8)) and kept_scale.view(torch.uint8).equal(
        scale.view(torch.uint8))


def test_fp4_round_trip_reproduces_every_byte_but_the_groups_topped_by_code_3():
    packed, scale = quantize_fp4_e2m1(weights((256, 1024), 6, spread=False) * 1e-2)
    values = dequantize_fp4_e2m1(packed, scale)
    again, again_scale = quantize_fp4_e2m1(values)
    assert torch.equal(dequantize_fp4_e2m1(again, again_scale), values)
    top = (values.view(256, 32, 32).abs().amax(-1) / scale.float())  # the largest |code| of each group
    low = top == 3
    assert 0 < int(low.sum()) < low.numel()
    same = ~low.repeat_interleave(16, 1)  # 16 bytes a group
    assert torch.equal(again[same], packed[same])
    assert torch.equal(again_scale.view(torch.uint8)[low], scale.view(torch.uint8)[low] - 1)
    kept, kept_scale = quantize_fp4_e2m1(values, scale)
    assert torch.equal(kept, packed) and torch.equal(kept_scale.view(torch.uint8), scale.view(torch.uint8))


@pytest.mark.parametrize("shape", [(130, 200), (5, 7), (128, 129), (257, 128), (1, 1)])
def test_fp8_shapes_that_are_not_whole_blocks_use_their_blocks_scale(shape):
    N, K = shape
    g = torch.Generator().manual_seed(N * 1000 + K)
    raw = torch.randint(0, 256, shape, generator=g, dtype=torch.int32).to(torch.uint8)
    raw[(raw & 0x7F) == 0x7F] = 0x38  # no NaN codes
    data = raw.view(torch.float8_e4m3fn)
    sb = torch.randint(110, 140, (-(-N // 128), -(-K // 128)), generator=g, dtype=torch.int32).to(torch.uint8)
    out = dequantize_ue8m0_blocks(data, sb.view(E8M0))
    table = torch.tensor([e4m3_value(c) if (c & 0x7F) != 0x7F else 0.0 for c in range(256)])
    rows, cols = torch.arange(N) // 128, torch.arange(K) // 128
    want = table[raw.long()] * torch.exp2(sb.float() - 127)[rows][:, cols]
    assert torch.equal(out, want)
    codes, scale = quantize_ue8m0_blocks(out)  # partial blocks round-trip too
    assert codes.shape == shape and scale.shape == sb.shape
    assert torch.equal(dequantize_ue8m0_blocks(codes, scale), out)
    kept, _ = quantize_ue8m0_blocks(out, sb.view(E8M0))
    assert torch.equal(kept.view(torch.uint8), raw)


def test_zero_blocks_get_scale_one_and_negative_zero_survives():
    w = torch.zeros(128, 256)
    w[0, 130] = -0.0
    codes, scale = quantize_ue8m0_blocks(w)
    assert scale.view(torch.uint8).tolist() == [[127, 127]]
    assert dequantize_ue8m0_blocks(codes, scale)[0, 130].signbit()
    packed, s4 = quantize_fp4_e2m1(w)
    assert (s4.view(torch.uint8) == 127).all()
    assert dequantize_fp4_e2m1(packed, s4)[0, 130].signbit()


# --- mutations: the conventions the tests pin down -----------------------------------------------

def relative_rms(a, b):
    return float((a - b).norm() / b.norm())


def test_swapped_nibbles_or_a_128_wide_fp4_scale_are_far_off(hf_dequantize, monkeypatch):
    deq, _ = hf_dequantize
    w = weights((64, 1024), 7)
    packed, scale = quantize_fp4_e2m1(w)
    theirs = deq._dequantize_one(packed, scale, output_dtype=torch.float32)
    assert relative_rms(dequantize_fp4_e2m1(packed, scale), theirs) == 0.0
    noise = relative_rms(theirs, w)  # FP4's own rounding error, the yardstick
    # one scale per 128 input channels (the FP8 block width) instead of per 32
    values = torch.tensor([e2m1_value(c) for c in range(16)])[vq._fp4_codes(packed).long()]
    per_128 = scale.float()[:, torch.arange(1024) // 128]
    wide = relative_rms(values * per_128, theirs)
    # high nibble first
    monkeypatch.setattr(vq, "_fp4_codes", lambda p: torch.stack((p.view(torch.uint8) >> 4, p.view(torch.uint8) & 0xF),
                                                                   -1).flatten(-2))
    swapped = relative_rms(dequantize_fp4_e2m1(packed, scale), theirs)
    print(f"relative RMS vs transformers: 128-wide scale {wide:.3f}, swapped nibbles {swapped:.3f} "
          f"(FP4 rounding itself {noise:.3f})")
    assert wide > 3 * noise and swapped > 3 * noise


def test_a_round_to_nearest_power_of_two_scale_rule_disagrees_with_transformers(hf_dequantize, monkeypatch):
    _, quant = hf_dequantize
    w = weights((512, 512), 8)
    want = quant._quantize_one("x.weight", w)["x.weight_scale_inv"].view(torch.uint8)
    assert torch.equal(quantize_ue8m0_blocks(w)[1].view(torch.uint8), want)
    monkeypatch.setattr(vq, "_ceil_log2", lambda x: torch.round(torch.log2(x)).int())
    assert int((quantize_ue8m0_blocks(w)[1].view(torch.uint8) != want).sum()) >= 4  # of 16 blocks


# --- errors --------------------------------------------------------------------------------------

def one_line_error(fn, *args, match, **kw):
    with pytest.raises(ValueError, match=match) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value) and str(e.value).startswith("layers.0.")


def test_errors_name_the_tensor_and_the_problem():
    codes, scale = quantize_ue8m0_blocks(torch.randn(200, 300))
    name = "layers.0.attn.wq_a.weight"
    one_line_error(dequantize_ue8m0_blocks, codes, e8m0([[127] * 3]), name=name,
                   match=r"scale shape \(1, 3\).*\(2, 3\)")
    bad = scale.view(torch.uint8).clone()
    bad[1, 2] = 0xFF
    one_line_error(dequantize_ue8m0_blocks, codes, bad.view(E8M0), name=name,
                   match="1 of its UE8M0 scale bytes are 0xFF")
    nan = codes.view(torch.uint8).clone()
    nan[3, 4], nan[5, 6] = 0x7F, 0xFF
    one_line_error(dequantize_ue8m0_blocks, nan.view(torch.float8_e4m3fn), scale, name=name,
                   match="2 of its FP8 codes are NaN")
    one_line_error(dequantize_ue8m0_blocks, codes.float(), scale, name=name, match="float8_e4m3fn")
    one_line_error(dequantize_ue8m0_blocks, codes, scale.float(), name=name, match="scale dtype")
    big = torch.full((1, 1), 0x7E, dtype=torch.uint8).view(torch.float8_e4m3fn)  # 448
    one_line_error(dequantize_ue8m0_blocks, big, e8m0([[254]]), name=name, match="overflow FP32")

    packed, s4 = quantize_fp4_e2m1(torch.randn(4, 64))
    name = "layers.0.ffn.experts.0.w1.weight"
    one_line_error(dequantize_fp4_e2m1, packed, s4[:, :1], name=name, match=r"scale shape \(4, 1\).*\(4, 2\)")
    one_line_error(dequantize_fp4_e2m1, packed, s4.view(torch.uint8).t().contiguous(), name=name, match="scale shape")
    bad = s4.view(torch.uint8).clone()
    bad[0, 0] = 0xFF
    one_line_error(dequantize_fp4_e2m1, packed, bad, name=name, match="0xFF")
    one_line_error(dequantize_fp4_e2m1, packed[:, :8], s4, name=name, match="multiple of 32")
    one_line_error(quantize_fp4_e2m1, torch.randn(4, 48), name=name, match="multiple of 32")
    one_line_error(quantize_ue8m0_blocks, torch.tensor([[1.0, math.nan]]), name=name, match="non-finite")
    one_line_error(quantize_fp4_e2m1, torch.full((1, 32), math.inf), name=name, match="non-finite")
    one_line_error(quantize_fp4_e2m1, torch.randn(4, 64), s4[:2], name=name, match="scale shape")


def test_stored_format_from_names_and_dtypes():
    keys = {"layers.0.attn.wq_a.weight", "layers.0.attn.wq_a.scale", "layers.0.ffn.experts.0.w1.weight",
            "layers.0.ffn.experts.0.w1.scale", "layers.0.attn_norm.weight", "layers.0.hc_attn_scale",
            "layers.0.attn.compressor.ape", "embed.weight"}
    assert stored_format("layers.0.attn.wq_a.weight", keys, torch.float8_e4m3fn) == "fp8_ue8m0"
    assert stored_format("layers.0.ffn.experts.0.w1.weight", keys, torch.int8) == "fp4"
    for plain in ("layers.0.attn_norm.weight", "layers.0.hc_attn_scale", "layers.0.attn.compressor.ape",
                  "embed.weight"):
        assert stored_format(plain, keys, torch.bfloat16) == "plain"
    one_line_error(stored_format, "layers.0.attn.wq_a.weight", keys, torch.bfloat16,
                   match="bfloat16 weight with a block")
