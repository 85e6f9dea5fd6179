"""``--cache-dtype fp8``: MLA's latent cache in DeepSeek's FP8 rows (FlashMLA's "FP8 with scale" layout, 656 bytes a
token and layer at V3's dims). The quantizer's codes and scales are the published rule's (UE8M0 scales per 128
values), the rows lie at the published offsets; decode logits stay within the bound E4M3's rounding carries through
the attention, and read back exactly the dequantized latents; ``flyer generate`` and the serving engine give the same
greedy tokens (with MTP drafts too); the serve pool holds 1152/656 times the tokens of BF16; what it does not
cover is refused in one line naming --cache-dtype."""

import pytest
import torch
from bounds import FP32_U, mla_attention_bound
from trained import counting_model

from flyer.cli import main
from flyer.config import preset
from flyer.errors import FieldError
from flyer.infer import GenerationConfig, generate
from flyer.infer.cache import Fp8LatentCache, LatentCache, make_cache
from flyer.infer.cache_fp8 import FP8, dequantize_latent, pack_rows, quantize_latent, token_bytes
from flyer.infer.attention import causal_slot_mask, mla_absorbed_core
from flyer.infer.decoder import Decoder
from flyer.model.transformer import Transformer
from flyer.model.counts import kv_cache_bytes_per_token, kv_cache_bytes_per_token_fp8
from flyer.serve.engine import Engine, EngineConfig, SamplingOptions
from flyer.serve.paged import blocks_for_memory

V = 64
E4M3_U = 2.0**-4  # E4M3's unit roundoff: 3 mantissa bits, round to nearest


@pytest.fixture(scope="module")
def trained():
    return counting_model(V)


def _published_rows(x_NC: torch.Tensor, rope_NR: torch.Tensor, tile: int = 128, round_scale: bool = True,
                    rope_fp8: bool = False) -> torch.Tensor:
    """FlashMLA ``tests/quant.py`` ``quantize_k_cache`` (V32_FP8Sparse), written from its text: per token 512 E4M3
    codes, 4 FP32 scales (amax / 448, clamped at 1e-4, rounded up to a power of two), 64 BF16 rope values. The
    keyword arguments are mutations: scales per ``tile`` values, unrounded scales, the rope key in FP8 too."""
    N, C = x_NC.shape
    t = x_NC.float().view(N, C // tile, tile)
    s = (t.abs().amax(-1) / 448.0).clamp(min=1e-4)
    if round_scale:
        s = torch.pow(2, s.double().log2().ceil()).float()  # log2 in FP64: exact at the FP32 quotient's powers of two
    codes = (t / s.unsqueeze(-1)).to(FP8).view(N, C)
    rope = rope_NR.to(FP8).view(torch.uint8) if rope_fp8 else rope_NR.to(torch.bfloat16).view(torch.uint8)
    return torch.cat([codes.view(torch.uint8), s.view(torch.uint8), rope], dim=-1)


def _latents(N: int = 48, C: int = 512) -> torch.Tensor:
    """Latents whose 128-channel tiles span magnitudes 1e-6 .. 1e3, an all-zero tile, and a tile whose amax / 448
    is exactly a power of two (the rounding's edge)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, generator=g) * torch.logspace(-6, 3, N).view(N, 1)
    x[0, :128] = 0
    x[1, 128:256] = x[1, 128:256].clamp(-1, 1)
    x[1, 130] = 448.0 * 2.0**-3
    return x


def _assert_layout(raw: torch.Tensor, x_NC: torch.Tensor, rope_NR: torch.Tensor) -> None:
    """The rows are the published ones: 656 bytes, codes at 0, 4 FP32 scales at 512, 64 BF16 rope values at 528."""
    assert raw.dtype == torch.uint8 and raw.shape[-1] == 656, tuple(raw.shape)
    want = _published_rows(x_NC, rope_NR)
    assert torch.equal(raw[:, 512:528].contiguous().view(torch.float32), want[:, 512:528].view(torch.float32))
    assert torch.equal(raw[:, :512], want[:, :512])  # the codes, bit for bit
    assert torch.equal(raw[:, 528:].contiguous().view(torch.bfloat16), rope_NR.to(torch.bfloat16))


def test_rows_are_deepseeks_layout_and_scale_rule():
    x, rope = _latents(), torch.randn(48, 64)
    raw = pack_rows(x, rope)
    _assert_layout(raw, x, rope)
    codes, scales = quantize_latent(x)
    assert codes.dtype == FP8 and scales.dtype == torch.float32 and tuple(scales.shape) == (48, 4)
    # UE8M0: powers of two, the smallest with |x| / scale <= 448 (clamped: the all-zero tile's 2^-13)
    assert torch.equal(scales, torch.exp2(scales.log2().round()))
    tiles = x.view(48, 4, 128).abs().amax(-1)
    assert (tiles / scales <= 448).all() and ((tiles / scales > 224) | (scales == 2.0**-13)).all()
    assert scales[0, 0] == 2.0**-13 and scales[1, 1] == 2.0**-3
    # each element within E4M3's rounding of its scaled value: 2^-4 relative (normal), 2^-10 scale (subnormal)
    back = dequantize_latent(codes, scales, torch.float64)
    s = scales.double().repeat_interleave(128, -1)
    assert ((back - x.double()).abs() <= torch.maximum(E4M3_U * x.double().abs(), 2.0**-10 * s)).all()
    # mutations: a scale per 64 values or per token, the rope key in FP8, unrounded (amax / 448) scales
    for bad in (dict(tile=64), dict(tile=512), dict(rope_fp8=True), dict(round_scale=False)):
        with pytest.raises(AssertionError):
            _assert_layout(_published_rows(x, rope, **bad), x, rope)


def test_bytes_per_token_from_the_allocated_tensors():
    for name, C_R in (("dsv3", (512, 64)), ("dsv32", (512, 64)), ("tiny", (32, 16))):
        cfg = preset(name)
        cache = make_cache(cfg, cfg.n_layers, 1, 1, "absorbed", FP8, "meta")
        assert isinstance(cache, Fp8LatentCache)
        assert cache.bytes_per_token() == kv_cache_bytes_per_token_fp8(cfg)
        if name == "dsv3":  # 512 codes + 4 scales x 4 bytes + 64 x 2 bytes a token and layer
            assert token_bytes(*C_R) == 656 and cache.bytes_per_token() == 61 * 656
            assert kv_cache_bytes_per_token(cfg) == 61 * 1152
    assert Fp8LatentCache(1, 1, 1, 512, 64).packed.shape[-1] == 656


def _decode_logits(model, cache_dtype: torch.dtype, encode=None, decode=None) -> torch.Tensor:
    """FP32 logits (B, 18, V) of a prefill of 12 tokens then 6 single-token steps (the generated tokens: greedy
    under an FP32 cache, fed to every variant alike). ``encode`` / ``decode``: the cache's write / read hooks."""
    g = torch.Generator().manual_seed(1)
    tokens = (torch.randint(0, V, (2, 1), generator=g) + torch.randint(1, 4, (2, 1), generator=g)
              * torch.arange(18)) % V
    dec = Decoder(model, 2, 32, "absorbed", cache_dtype)
    if encode is not None:
        dec.cache.encode = encode
    if decode is not None:
        dec.cache.decode_packed = decode
    zero = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        out = [dec.logits(dec.forward(tokens[:, :12], zero))]
        out += [dec.logits(dec.forward(tokens[:, t:t + 1], zero + t)) for t in range(12, 18)]
    return torch.cat(out, dim=1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _requantized(quantize):
    """An FP32 cache's write hook that stores ``quantize``(latent) and the rope key rounded to BF16."""
    def encode(values):
        v = dict(values)
        v["latent"], v["rope_key"] = quantize(v["latent"]), v["rope_key"].to(torch.bfloat16).float()
        return {k: t.float() for k, t in v.items()}
    return encode


E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # FP4 (E2M1): one mantissa bit


def _fp4(c: torch.Tensor) -> torch.Tensor:
    """A deliberately worse quantizer: E2M1 codes (relative 2^-2) on per-128 power-of-two scales (amax / 6 rounded
    up), round to nearest."""
    C = c.shape[-1]
    t = c.unflatten(-1, (-1, 128)) if C % 128 == 0 else c.unsqueeze(-2)
    s = torch.exp2((t.abs().amax(-1, keepdim=True) / 6).clamp(min=1e-30).log2().ceil())
    y = t / s
    q = E2M1_GRID[(y.abs().unsqueeze(-1) - E2M1_GRID).abs().argmin(-1)] * y.sign()
    return (q * s).reshape(c.shape)


def _dense_model():
    """Random tiny MLA layers with dense FFNs: no routing, whose expert choices would jump at a near-tie (the bound
    is first order in the latent's error)."""
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=V, n_dense_layers=4)).eval()


def test_decode_logits_within_the_e4m3_bound():
    """To first order, as ``logit_tolerance`` bounds FP32 sums: every cached latent value is off by at most 2^-4
    of itself (E4M3 on a power-of-two scale; the subnormal floor 2^-10 scale <= 2^-17 of its tile's amax is below
    it), the rope key not at all past BF16 (2^-9); in each layer that moves the attention scores' latent part by
    2^-4 of their absolute sum (the probabilities by 2 x 2^-4 of themselves) and the values by 2^-4: at most
    3 x 2^-4 of the output's scale per layer, the logit scale taken for it, plus the FP32 decode tolerance."""
    model = _dense_model()
    cfg = model.cfg
    layers = cfg.n_layers
    fp32_tol = layers * (cfg.dim + cfg.inter_dim + cfg.q_lora_rank + cfg.kv_lora_rank + cfg.qk_rope_head_dim + 18) \
        * FP32_U
    tol = layers * (3 * E4M3_U + 2 * 2.0**-9) + fp32_tol
    ref = _decode_logits(model, torch.float32)
    fp8 = _decode_logits(model, FP8)
    err = _rel(fp8, ref)
    assert err <= tol, (err, tol)
    # the read path is exactly the dequantization: an FP32 cache holding the dequantized latents agrees to rounding
    oracle = _decode_logits(model, torch.float32, encode=_requantized(
        lambda c: dequantize_latent(*quantize_latent(c), torch.float32)))
    assert _rel(fp8, oracle) <= fp32_tol
    # closer to the FP32 cache than a coarser quantizer's (FP4 codes on the same tiles)
    assert err < _rel(_decode_logits(model, torch.float32, encode=_requantized(_fp4)), ref)


def _quantization_bound(attn, q_nope, q_rope, kv_BSK, mask_B1TS) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact attention output (B, T, H, v) over the exact latents ``kv`` in FP64, bound on how far the exact output
    over their FP8 rows is from it), from the scale rule alone: each latent value c within e = 2^-4 |c| +
    2^-10 scale of its tile (E4M3's rounding of c / scale, normal or subnormal), the rope key exact (BF16 in, BF16
    kept). A score moves by at most d = softmax_scale sum_c |q W_UK|_c e_c, so each probability by at most
    (exp(2 max d) - 1) of itself; the output sum_s p_s W_UV c_s by that times sum_s p_s |W_UV| (|c_s| + e_s),
    plus sum_s p_s |W_UV| e_s."""
    H, nope, C = attn.n_heads, attn.qk_nope_head_dim, attn.kv_lora_rank
    w = attn.wkv_b.weight.detach().double().view(H, nope + attn.v_head_dim, C)
    c, kr = kv_BSK[..., :C].double(), kv_BSK[..., C:].double()
    e = E4M3_U * c.abs() + 2.0**-10 * quantize_latent(kv_BSK[..., :C])[1].double().repeat_interleave(128, -1)
    q_abs = torch.einsum("bthd,hdc->bhtc", q_nope.double(), w[:, :nope])
    scores = (torch.einsum("bhtc,bsc->bhts", q_abs, c) + torch.einsum("bthr,bsr->bhts", q_rope.double(), kr)) \
        * attn.softmax_scale
    p = scores.masked_fill(~mask_B1TS, float("-inf")).softmax(-1)
    exact = torch.einsum("bhts,hjc,bsc->bthj", p, w[:, nope:], c)
    d_max = (attn.softmax_scale * torch.einsum("bhtc,bsc->bhts", q_abs.abs(), e)).masked_fill(~mask_B1TS, 0).amax(-1)
    wv = w[:, nope:].abs()
    moved = torch.einsum("bhts,hjc,bsc->bthj", p, wv, c.abs() + e)
    return exact, torch.expm1(2 * d_max).transpose(1, 2).unsqueeze(-1) * moved + \
        torch.einsum("bhts,hjc,bsc->bthj", p, wv, e)


def test_attention_over_fp8_rows_within_the_scale_rules_bound():
    """V3's latent widths (512 + 64, four scale tiles of different magnitudes per token): absorbed attention over
    the rows an FP8 cache reads back stays within the scale rule's bound of the exact attention over the written
    latents (plus FP32's rounding bound, ``mla_attention_bound``); rows read without their scales land far out."""
    torch.manual_seed(0)
    attn = Transformer(preset("tiny", vocab_size=V, n_layers=1, n_dense_layers=1, n_heads=2, kv_lora_rank=512,
                              qk_rope_head_dim=64)).eval().layers[0].attn
    B, S, T, C, R = 2, 40, 3, 512, 64
    tiles = torch.logspace(-2, 0, 8)[torch.randint(0, 8, (B, S, 4))].repeat_interleave(128, -1)
    kv = torch.cat([torch.randn(B, S, C) * tiles, torch.randn(B, S, R).bfloat16().float()], dim=-1)
    q_nope, q_rope = torch.randn(B, T, 2, attn.qk_nope_head_dim), torch.randn(B, T, 2, R)
    pos = torch.arange(S - T, S).expand(B, T)
    mask = causal_slot_mask(pos, S)
    cache = make_cache(attn_cfg := preset("tiny", kv_lora_rank=C, qk_rope_head_dim=R), 1, B, S, "absorbed", FP8)
    assert attn_cfg.kv_lora_rank == C
    cache.write(0, torch.arange(S).expand(B, S), latent=kv[..., :C], rope_key=kv[..., C:])
    kv8 = cache.read_packed(0, S, torch.float32)
    assert torch.equal(kv8[..., C:], kv[..., C:])  # the rope key is kept, not quantized
    with torch.no_grad():
        got = mla_absorbed_core(attn, q_nope, q_rope, kv8, mask)
        unscaled = kv8.clone()
        unscaled[..., :C] = cache.tensors["latent"][0].float()  # the codes alone: the mutation
        wrong = mla_absorbed_core(attn, q_nope, q_rope, unscaled, mask)
    exact, quant = _quantization_bound(attn, q_nope, q_rope, kv, mask)
    bound = quant + mla_attention_bound(attn, q_nope, q_rope, kv8, mask)[1]
    err = (got.double() - exact).abs()
    assert (err <= bound).all(), float((err / bound).max())
    assert float(((wrong.double() - exact).abs() / bound).max()) > 10


def _engine(model, cache_dtype, blocks: int = 48, block_size: int = 4, **over) -> Engine:
    mtp = over.get("speculative") == "mtp"
    bpt = make_cache(model.cfg, model.cfg.n_layers + mtp, 1, 1, "absorbed", cache_dtype, "meta").bytes_per_token()
    return Engine(model, EngineConfig(kv_cache_bytes=blocks * block_size * bpt, block_size=block_size,
                                      cache_dtype=cache_dtype, **over))


def _served(eng: Engine, prompts, n: int) -> list[list[int]]:
    outs = [[] for _ in prompts]
    for i, p in enumerate(prompts):
        eng.submit(p, SamplingOptions(max_tokens=n), lambda e, i=i: outs[i].append(e.token))
    eng.run_until_idle()
    return outs


def _progression(start, step, n):
    return [(start + step * i) % V for i in range(n)]


def _dsa_model():
    """Random tiny MLA with DeepSeek Sparse Attention (V3.2's indexer, top-8 keys): past 8 slots each query reads
    its selected latents, gathered from the FP8 rows (``gather_packed``); the index keys are DeepSeek's FP8 ones
    (``tests/test_dsa_fp8_indexer.py``)."""
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=V, index_topk=8, index_n_heads=2, index_head_dim=32)).eval()


@pytest.mark.parametrize("speculative", [None, "mtp"])
@pytest.mark.parametrize("family", ["v3", "v32"])
def test_serve_equals_generate_under_fp8(trained, family, speculative):
    """The same quantized rows and the same math: each request's greedy tokens are its ``generate`` ones (shared
    prefix blocks, chunked prefill, and with MTP drafts checked against the FP8 cache); V3.2's sparse attention
    reads the selected FP8 rows of the paged pool as the contiguous cache's."""
    model = trained if family == "v3" else _dsa_model()
    head = _progression(3, 2, 9)
    prompts = [head + _progression(5, 3, n) for n in (3, 14)] + [_progression(7, 1, n) for n in (1, 22)]
    gen = GenerationConfig(max_new_tokens=10, cache_dtype=FP8, speculative=speculative)
    alone = [generate(model, [p], gen).tokens[0] for p in prompts]
    eng = _engine(model, FP8, prefill_chunk=8, speculative=speculative)
    assert isinstance(eng.cache.pool, Fp8LatentCache)
    assert eng.mtp_cache is None or isinstance(eng.mtp_cache.pool, Fp8LatentCache)
    assert _served(eng, prompts, 10) == alone
    assert eng.alloc.used == 0
    if speculative:
        assert eng.drafted > 0 and (family != "v3" or eng.accepted > 0)


def test_serve_pool_holds_1152_over_656_the_tokens(trained):
    big = 64 * 2**30
    cfg = preset("dsv3")
    ratio = blocks_for_memory(cfg, big, 64, FP8) / blocks_for_memory(cfg, big, 64, torch.bfloat16)
    assert abs(ratio - 1152 / 656) < 1e-3, ratio
    memory = 300 * 4 * 96 * trained.cfg.n_layers  # 300 blocks of 4 tokens at BF16's 96 bytes per token and layer
    n = {dt: Engine(trained, EngineConfig(kv_cache_bytes=memory, block_size=4, cache_dtype=dt)).alloc.n_blocks
         for dt in (torch.bfloat16, FP8)}
    assert n[torch.bfloat16] == 300 and n[FP8] == memory // (4 * 68 * trained.cfg.n_layers)  # tiny: 32 + 4 + 32


@pytest.mark.parametrize("argv,why", [  # DeepSeek-V4 takes fp8 (tests/test_v4_fp8_cache.py)
    (["generate", "--preset", "tiny", "--attention", "naive"], "per-head"),
])
def test_what_fp8_does_not_cover_is_refused_in_one_line(argv, why, capsys):
    extra = ["--prompt", "hi", "--max-new-tokens", "1"] if argv[0] == "generate" else []
    rc = main(argv + extra + ["--cache-dtype", "fp8"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("flyer: error: --cache-dtype: fp8") and why in err, err
    assert len(err.strip().splitlines()) == 1


def test_library_refuses_gqa_and_naive():
    gqa = preset("tiny", attn="gqa", n_kv_heads=2, head_dim=32)
    with pytest.raises(FieldError, match="cache_dtype: fp8 covers MLA and DeepSeek-V4 caches only"):
        make_cache(gqa, 1, 1, 4, "absorbed", FP8)
    with pytest.raises(FieldError, match="cache_dtype"):
        make_cache(preset("tiny"), 1, 1, 4, "naive", FP8)
    assert type(make_cache(preset("tiny"), 1, 1, 4, "absorbed", torch.bfloat16)) is LatentCache


def test_generate_and_the_engine_refuse_what_fp8_does_not_cover():
    """The library's entry points check as the commands do: a GQA engine (its pools would cast to FP8 without
    scales) or ``generate`` under an FP8 cache is a FieldError (the on-disk prefix cache is covered:
    ``tests/test_cache_fp8_prefix.py``; DeepSeek-V4 takes fp8: ``tests/test_v4_fp8_cache.py``)."""
    torch.manual_seed(0)
    gqa = Transformer(preset("tiny", attn="gqa", n_kv_heads=2, head_dim=32)).eval()
    with pytest.raises(FieldError, match="cache_dtype: fp8 covers MLA and DeepSeek-V4 caches only"):
        Engine(gqa, EngineConfig(kv_cache_bytes=8 << 20, block_size=16, cache_dtype=FP8))
    with pytest.raises(FieldError, match="cache_dtype: fp8"):
        generate(gqa, [[1, 2, 3]], GenerationConfig(max_new_tokens=1, cache_dtype=FP8))
