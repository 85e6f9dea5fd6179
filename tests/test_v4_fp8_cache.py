"""DeepSeek-V4's FP8 KV cache (``--cache-dtype fp8`` for attn "hybrid": ``flyer.infer.hybrid_fp8``) against an
oracle written here from DeepSeek's released V4 ``inference/model.py`` / ``kernel.py``: ``act_quant`` on the keys'
NoPE channels in tiles of 64 with UE8M0 scales, max(amax, 1e-4) / 448 rounded up to a power of two (by frexp on
FP64, no float log), E4M3 round-to-nearest-even by its own step arithmetic in numpy, the rope channels BF16.

The rows hold exactly that (codes, scale bytes, rope bytes at their offsets); the cache reads back within E4M3's
bound (2^-4 |x| for normal codes, 2^-10 scale below) of what was written, the rope values the BF16 cache's bit for
bit; ``generate`` with an FP8 cache gives the greedy tokens of the eager whole-sequence model whose window keys and
compressed entries go through the oracle's quantizer and whose CSA index keys and queries go through the release's
rotation and fp4_act_quant (``tests.test_v4_fp4_indexer``'s oracle; logit and index-selection margins far above
FP32 rounding guard the comparison), its first logits within ``v4_tolerance`` of that oracle's and far from the
unquantized model's (and, at 33 tokens, from the oracle with BF16 index keys), and MTP speculation (rollback of the
FP8 slots) the same tokens; the serving pool (uint8 rows, sized by their bytes) gives ``generate``'s tokens; the
code's bytes per token are the layout's (584-byte rows, 68-byte index rows at V4's dims); the on-disk prefix cache
restores the rows bit for bit and a BF16 run, or a file of the earlier layout, misses them; serve's disk tier and
``generate`` read each other's FP8 files. Tiny random model (window 8, ratios 0 / 4 / 16 / 4, CSA top-4, head_dim
112: two NoPE tiles, the second partial), FP32, CPU. Mutations (the FlashMLA scale rule, no power-of-two rounding,
64-channel tiles as 128, the rope part quantized, wrong scale or rope offsets, the new keys unquantized, BF16 left in
the pool, entries left out of the FP8 rows; the index keys unrotated, the queries not FP4, index rows counted as
BF16) fail."""

import json
import math
import sys

import numpy as np
import pytest
import torch

from flyer.cli import main
from flyer.config import preset
from flyer.errors import FieldError
from flyer.infer import hybrid_fp8, hybrid_index_fp4
from flyer.infer.cache_fp8 import FP8
from flyer.infer.decoder import Decoder
from flyer.infer.generate import GenerationConfig, generate, open_prefix_cache, prefill
from flyer.infer.hybrid_cache import HybridCache, hybrid_rows, hybrid_tables
from flyer.infer.prefix_cache_hybrid import read_block
from flyer.model.counts import kv_cache_bytes_per_token, kv_cache_bytes_per_token_fp8, kv_window_bytes_fp8
from flyer.model.hybrid import Compressor, HybridAttention, Indexer
from flyer.model.transformer import Transformer
from flyer.serve.disk_tier import open_disk_prefix_cache
from flyer.serve.engine import Engine, EngineConfig, SamplingOptions
from flyer.serve.paged_hybrid import hybrid_blocks_for_memory
from tests.test_deepseek_v4 import v4_tolerance
from tests.test_dsa_fp8_indexer import assert_engine_is_generate
from tests.test_qwen3 import rel
from tests.test_v4_fp4_indexer import ref_index_round

E4M3_U = 2.0**-4  # E4M3's unit roundoff: 3 mantissa bits, round to nearest
E4M3_SUB = 2.0**-10  # half E4M3's subnormal step (2^-9), in units of the scale
BLOCK = 16  # the least multiple of the ratios 4 and 16


# ---- the oracle: the release's act_quant, by its own arithmetic ---------------------------------------------

def _ref_scale_exp(amax: float) -> int:
    """k with 2^k = the smallest power of two >= max(amax, 1e-4) / 448 (frexp: exact, no log)."""
    m, e = math.frexp(max(amax, 1e-4) / 448.0)
    return e - 1 if m == 0.5 else e


def _ref_e4m3(v: np.ndarray) -> np.ndarray:
    """E4M3 round-to-nearest-even of |v| <= 448 (FP64): step 2^(E - 3) at exponent E >= -6, 2^-9 below."""
    _, e = np.frexp(np.abs(v))
    step = np.where(np.abs(v) >= 2.0**-6, np.ldexp(1.0, e - 1 - 3), 2.0**-9)
    return np.round(v / step) * step  # np.round: half to even


def _ref_quant(x: torch.Tensor, R: int) -> tuple[np.ndarray, np.ndarray]:
    """(values (..., d) FP64 as the release's act_quant(kv[..., :-R], 64, "ue8m0") leaves them, the rope part
    rounded to BF16; scale exponents (..., ceil((d - R) / 64)))."""
    a = x.detach().double().numpy()
    C = a.shape[-1] - R
    out, exps = a.copy(), []
    for lo in range(0, C, 64):
        tile = a[..., lo:min(lo + 64, C)]
        k = np.vectorize(_ref_scale_exp)(np.abs(tile).max(-1))
        exps.append(k)
        out[..., lo:min(lo + 64, C)] = _ref_e4m3(tile / np.ldexp(1.0, k)[..., None]) * np.ldexp(1.0, k)[..., None]
    out[..., C:] = x[..., C:].to(torch.bfloat16).double().numpy()
    return out, np.stack(exps, -1)


def _ref_round_trip(x: torch.Tensor, R: int) -> torch.Tensor:
    return torch.from_numpy(_ref_quant(x, R)[0]).to(x.dtype)


def _cfg(**kw):
    return preset("tiny-v4", vocab_size=256, window_size=8, index_topk=4, head_dim=112, **kw)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(_cfg()).eval()
    assert m.cfg.compress_ratios == (0, 4, 16, 4) and m.cfg.head_dim - m.cfg.rope_dim == 96
    return m


def _tiles(shape, d: int, seed: int) -> torch.Tensor:
    """Keys (..., d) whose 64-channel tiles span magnitudes: amax from 2^-20 (below the 1e-4 floor) to 2^6, and
    tiles whose amax is exactly 448 2^k (the power-of-two boundary) or one FP32 step past it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, d, generator=g)
    mag = torch.pow(2.0, torch.randint(-20, 7, (*shape, -(-d // 64)), generator=g).float())
    x = x * mag.repeat_interleave(64, -1)[..., :d]
    flat, t = x.view(-1, d), 448 * 2.0**-9
    flat[0, :64] = t * torch.linspace(-1, 1, 64)  # amax 448 2^-9 exactly: scale 2^-9
    flat[1, :64] = flat[0, :64]
    flat[1, 63] = torch.nextafter(torch.tensor(t), torch.tensor(1.0))  # one FP32 step past: 2^-8
    flat[2, :64] = 0.01 * torch.linspace(-1, 1, 64)  # amax 0.01 < 0.0448: the release's and FlashMLA's rules differ
    return x


# ---- the rows ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d,R", [(512, 64), (112, 16)], ids=["v4", "partial-tile"])
def test_rows_are_the_releases_act_quant_in_v4s_layout(d, R):
    x = _tiles((6, 5), d, seed=d)
    raw = hybrid_fp8.pack_rows(x, R)
    C, n = d - R, -(-(d - R) // 64)
    assert raw.dtype == torch.uint8 and raw.shape[-1] == hybrid_fp8.row_bytes(d, R) == C + 2 * R + 8
    want, exps = _ref_quant(x, R)
    assert torch.equal(raw[..., C + 2 * R:C + 2 * R + n].int(), torch.from_numpy(exps + 127).int())  # UE8M0 bytes
    assert not raw[..., C + 2 * R + n:].any()  # the pad
    codes = raw[..., :C].contiguous().view(FP8).double() * torch.pow(2.0, torch.from_numpy(exps).double()
                                                                     ).repeat_interleave(64, -1)[..., :C]
    assert torch.equal(codes, torch.from_numpy(want[..., :C]))
    assert torch.equal(raw[..., C:C + 2 * R], x[..., C:].to(torch.bfloat16).contiguous().view(torch.uint8))
    assert torch.equal(hybrid_fp8.unpack_rows(raw, d, R, torch.float64), torch.from_numpy(want))  # exact
    assert torch.equal(hybrid_fp8.round_trip(x, R), _ref_round_trip(x, R))
    # the boundary tiles (``_tiles``), and amax 0.01: 2^-15, where FlashMLA's floor on amax / 448 gives 2^-13
    assert exps.reshape(-1, n)[:3, 0].tolist() == [-9, -8, -15]


def test_cache_reads_back_within_the_e4m3_bound_and_the_rope_values_bit_for_bit():
    """Window ring and entries written through a paged view of an FP8 pool and of a BF16 one: the NoPE values
    within 2^-4 |x| + 2^-10 scale of the written ones, the rope values the BF16 pool's."""
    cfg = _cfg()
    d, R, W = cfg.head_dim, cfg.rope_dim, cfg.window_size
    pools = {dt: HybridCache.paged(cfg, 3, 5, BLOCK, dt) for dt in (FP8, torch.bfloat16)}
    assert pools[FP8].layers[1]["index_keys"].dtype == torch.uint8  # FP4 rows (tests/test_v4_fp4_indexer.py)
    assert pools[FP8].layers[1]["entries"].dtype == pools[FP8].layers[0]["window"].dtype == torch.uint8
    tables, slots = torch.tensor([[3, 1], [2, 4]]), torch.tensor([2, 0])
    x = _tiles((2, W), d, seed=1)
    rows = hybrid_rows(hybrid_tables(cfg, 64, "cpu"), 64, torch.tensor([0, 3]), W)
    b, i = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 5, 2, 7])  # entries in both blocks of each row
    e = _tiles((4,), d, seed=2)
    got = {}
    for dt, pool in pools.items():
        v = pool.view(tables, slots)
        v.write_ring(0, "window", x, rows)
        v.write_entries(1, "entries", b, i, e)
        got[dt] = (v.ring(0, "window")[torch.arange(2).view(-1, 1), (rows.start.view(-1, 1) + torch.arange(W)) % W],
                   v.read_entries(1, "entries", 8)[b, i], v.gather_entries(1, "entries", i.view(2, 1, 2))[:, 0])
    for j, val in enumerate((x, e)):  # the window keys, the entries
        f8, bf, C = got[FP8][j], got[torch.bfloat16][j], d - R
        scale = torch.pow(2.0, torch.from_numpy(_ref_quant(val, R)[1]).double()).repeat_interleave(64, -1)[..., :C]
        err = (f8[..., :C].double() - val[..., :C].double()).abs()
        assert (err <= E4M3_U * val[..., :C].double().abs() + E4M3_SUB * scale).all()
        assert torch.equal(f8[..., C:], bf[..., C:])
    assert torch.equal(got[FP8][2].flatten(0, 1), got[FP8][1])  # the gathered picks are the read entries


def test_first_layers_cached_window_is_within_the_bound_of_the_bf16_caches(model):
    """A real prefill: layer 0 sees the same inputs under either cache, so its window keys differ by E4M3's
    rounding of the written x (and BF16's, 2^-9 |x|) only."""
    cfg = model.cfg
    d, R = cfg.head_dim, cfg.rope_dim
    x = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(3))
    rings = {}
    for dt in (FP8, torch.bfloat16):
        dec = Decoder(model, 1, 16, cache_dtype=dt)
        dec.forward(x, torch.zeros(1, dtype=torch.long))
        rings[dt] = dec.cache.ring(0, "window")[0].double()
    raw = Decoder(model, 1, 16, cache_dtype=FP8)
    raw.forward(x, torch.zeros(1, dtype=torch.long))
    scale = raw.cache.layers[0]["window"][0, :, d + R:d + R + 2].view(torch.float8_e8m0fnu).double()
    scale = scale.repeat_interleave(64, -1)[..., :d - R]
    f8, bf = rings[FP8], rings[torch.bfloat16]
    x_abs = bf[..., :d - R].abs() / (1 - 2.0**-9)
    assert ((f8[..., :d - R] - bf[..., :d - R]).abs() <= (E4M3_U + 2.0**-9) * x_abs + E4M3_SUB * scale).all()
    assert torch.equal(f8[..., d - R:], bf[..., d - R:]) and not torch.equal(f8, bf)


# ---- generate, serve ------------------------------------------------------------------------------------------

def _eager(model, prompt: list[int], n: int, quantize: bool = True, index_fp4: bool | None = None):
    """(greedy tokens, logits at the prompt's last token, smallest margin) of the whole-sequence model, its window
    keys and compressed entries through the oracle's quantizer when ``quantize``, and (``index_fp4``, default
    ``quantize``) the indexer's keys and queries through the release's rotation and fp4_act_quant
    (``tests.test_v4_fp4_indexer.ref_index_round``). The margin, relative to the largest value: a step's greedy
    logit against the runner-up, and each query's index_topk-th selection score against the next (exact ties
    aside)."""
    cfg = model.cfg
    index_fp4 = quantize if index_fp4 is None else index_fp4
    shared_kv, pool, select, scores = HybridAttention.shared_kv, Compressor.pool, Indexer.select, Indexer.scores
    main_compressors = {id(b.attn.compressor) for b in model.layers if b.attn.compressor is not None}
    margins = []

    def q_kv(self, x, cos, sin):
        return _ref_round_trip(shared_kv(self, x, cos, sin), cfg.rope_dim)

    def q_pool(self, kv, gate, cos, sin):
        out = pool(self, kv, gate, cos, sin)
        if id(self) in main_compressors:
            return _ref_round_trip(out, cfg.rope_dim) if quantize else out
        return ref_index_round(out) if index_fp4 else out  # an indexer's compressor: its keys

    def fp4_scores(self, x, q_latent, cos, sin, keys=None, queries=None):
        return scores(self, x, q_latent, cos, sin, keys, ref_index_round)

    def guarded(self, x, q_latent, cos, sin, visible, keys=None):
        s = self.scores(x, q_latent, cos, sin, keys).masked_fill(~visible.expand(x.shape[0], -1, -1), float("-inf"))
        top = s.topk(min(self.topk + 1, s.shape[-1])).values
        ok = top[..., -1] > float("-inf")
        gap = ((top[..., -2] - top[..., -1]) / top[..., 0].abs())[ok]
        if gap.numel() and bool((gap > 0).any()):
            margins.append(float(gap[gap > 0].min()))
        return select(self, x, q_latent, cos, sin, visible, keys)

    if quantize:
        HybridAttention.shared_kv = q_kv
    if index_fp4:
        Indexer.scores = fp4_scores
    Compressor.pool, Indexer.select = q_pool, guarded
    try:
        seq, first = list(prompt), None
        with torch.no_grad():
            for _ in range(n):
                logits = model(torch.tensor([seq]))[0, -1]
                first = logits if first is None else first
                two = logits.topk(2).values
                margins.append(float((two[0] - two[1]) / logits.abs().max()))
                seq.append(int(logits.argmax()))
    finally:
        HybridAttention.shared_kv, Compressor.pool, Indexer.select, Indexer.scores = shared_kv, pool, select, scores
    return seq[len(prompt):], first, min(margins)


PROMPT = [(5 + 7 * i) % 200 + 3 for i in range(21)]  # 21 + 12 tokens: the window slides, CSA selects 4 of 8


def test_generate_fp8_is_the_eager_oracle(model):
    cfg = model.cfg
    res = generate(model, [PROMPT], GenerationConfig(max_new_tokens=12, cache_dtype=FP8))
    want, first, margin = _eager(model, PROMPT, 12)
    assert res.tokens[0] == want and margin > 1e-4, margin
    tol = v4_tolerance(cfg, len(PROMPT))
    assert rel(res.first_logits[0], first) <= tol
    _, plain, _ = _eager(model, PROMPT, 1, quantize=False)
    assert rel(res.first_logits[0], plain) > 10 * tol  # the quantization is there, and the oracle sees it
    assert res.cache_bytes_per_token == kv_cache_bytes_per_token_fp8(cfg)
    spec = generate(model, [PROMPT], GenerationConfig(max_new_tokens=12, cache_dtype=FP8, speculative="mtp"))
    assert spec.tokens == res.tokens  # MTP drafts verified, rejected ones rolled back in the FP8 slots


def test_generate_fp8_selects_entries_by_the_releases_fp4_index(model):
    """33 prompt tokens: 8 CSA entries at the last one, 4 selected. The release's rotated FP4 index keys and queries
    pick other entries there than BF16 ones would (the two oracles' first logits differ far beyond the tolerance);
    ``generate`` gives the FP4 oracle's logits and greedy tokens."""
    prompt = [(5 + 7 * i) % 200 + 3 for i in range(33)]
    res = generate(model, [prompt], GenerationConfig(max_new_tokens=4, cache_dtype=FP8))
    want, first, margin = _eager(model, prompt, 4)
    tol = v4_tolerance(model.cfg, len(prompt))
    assert res.tokens[0] == want and margin > 1e-4, margin
    assert rel(res.first_logits[0], first) <= tol
    _, bf16_index, _ = _eager(model, prompt, 1, index_fp4=False)
    assert rel(first, bf16_index) > 10 * tol


def test_cli_generates_with_fp8_and_counts_its_bytes(capsys):
    assert main(["generate", "--preset", "tiny-v4", "--prompt", "hello world", "--max-new-tokens", "3",
                 "--cache-dtype", "fp8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cache_bytes_per_token"] == kv_cache_bytes_per_token_fp8(preset("tiny-v4")) == 58
    assert main(["info", "dsv4-flash", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["kv_cache_bytes_per_token"], info["kv_cache_bytes_per_token_fp8"]) == (6880, 3514.25)


def test_serve_pool_holds_fp8_rows_and_equals_generate(model):
    cfg = model.cfg
    probe = HybridCache.paged(cfg, 1, 1, BLOCK, FP8, "meta")
    memory = 4 * probe.window_bytes() + 30 * probe.block_bytes()
    eng = Engine(model, EngineConfig(kv_cache_bytes=memory, block_size=BLOCK, cache_dtype=FP8, max_batch_size=4,
                                     prefill_chunk=8))
    layer = eng.cache.layers[1]  # CSA
    assert eng.alloc.n_blocks == 30 and layer["window"].dtype == layer["entries"].dtype == torch.uint8
    assert layer["index_keys"].dtype == torch.uint8
    assert_engine_is_generate(eng, model, [PROMPT, PROMPT[:9] + [4, 9, 11], [7] * 3], 8)


def test_bytes_per_token_are_the_layouts():
    """From the allocated tensors (``HybridCache``), the closed form (``flyer.model.counts``) and the layout:
    per compressed layer of ratio r one (d - R) + 2 R + 8 byte row per r tokens (CSA: an FP4 index key row too,
    di / 2 code bytes and di / 32 scale bytes)."""
    for cfg in (_cfg(), preset("tiny-v4"), preset("dsv4-flash"), preset("dsv4-pro")):
        d, R, W, di = cfg.head_dim, cfg.rope_dim, cfg.window_size, cfg.index_head_dim
        row = (d - R) + 2 * R + 8 * math.ceil(math.ceil((d - R) / 64) / 8)
        layout = sum((row + (di // 2 + di // 32 if r == cfg.csa_ratio else 0)) / r
                     for r in cfg.compress_ratios[:cfg.n_layers] if r)
        cache = HybridCache(cfg, 1, 256, FP8, "meta")
        assert cache.bytes_per_token() == kv_cache_bytes_per_token_fp8(cfg) == layout
        assert kv_window_bytes_fp8(cfg) == cfg.n_layers * W * row
        rings = HybridCache(cfg, 1, 256, torch.float32, "meta").window_bytes() - cfg.n_layers * W * d * 4
        assert cache.window_bytes() == kv_window_bytes_fp8(cfg) + rings  # the compressors' FP32 rings unchanged
    flash = preset("dsv4-flash")
    assert hybrid_fp8.row_bytes(flash.head_dim, flash.rope_dim) == 584  # FlashMLA's MODEL1 row: 448 + 128 + 8
    assert hybrid_index_fp4.row_bytes(flash.index_head_dim) == 68  # 128 E2M1 codes, 4 scale bytes
    big = 64 * 2**30
    n = {dt: hybrid_blocks_for_memory(flash, big, 128, 0, dt) for dt in (FP8, torch.bfloat16)}
    assert abs(n[FP8] / n[torch.bfloat16] - kv_cache_bytes_per_token(flash) / kv_cache_bytes_per_token_fp8(flash)) \
        < 1e-4


# ---- the prefix cache --------------------------------------------------------------------------------------

def test_prefix_cache_restores_the_rows_bit_for_bit_and_a_bf16_run_misses_them(model, tmp_path, monkeypatch):
    prompt = PROMPT + PROMPT[:19]  # 40 tokens: 2 blocks and the snapshot at 32

    def filled(dtype):
        dec = Decoder(model, 1, 48, cache_dtype=dtype)
        pc = open_prefix_cache(model, tmp_path, cache_dtype=dtype, block_size=BLOCK)
        return dec, prefill(dec, [prompt], pc), pc

    cold, cold_state, pc = filled(FP8)
    assert (pc.stats.hits, pc.stats.stored) == (0, 3)
    hot, hot_state, pc = filled(FP8)
    assert pc.stats.hits == 3 and hot_state.hit_tokens == [32]
    for a, b in zip(cold.cache.layers, hot.cache.layers, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(cold_state.logits, hot_state.logits)
    entry = read_block(pc, pc.block_keys(prompt)[1], prompt[16:32], cold.cache)
    assert entry["1.entries"].dtype == entry["1.index_keys"].dtype == torch.uint8  # the rows as written
    assert torch.equal(entry["1.entries"], cold.cache.layers[1]["entries"][0, 4:8])
    assert torch.equal(entry["1.index_keys"], cold.cache.layers[1]["index_keys"][0, 4:8])
    _, _, pc = filled(torch.bfloat16)
    assert pc.stats.hits == 0  # a BF16 run misses the FP8 run's entries
    assert "e2m1" in hybrid_fp8.ROWS_LAYOUT  # entries written with BF16 index keys (another layout) miss too
    monkeypatch.setattr(sys.modules["flyer.infer.generate"], "HYBRID_ROWS_LAYOUT", "v4_fp8 ...; index keys bf16")
    _, _, pc = filled(FP8)
    assert pc.stats.hits == 0


def test_what_fp8_rows_cannot_hold_is_refused_naming_cache_dtype():
    odd = preset("tiny-v4", head_dim=65)  # 49 NoPE codes: the BF16 rope values would sit at an odd offset
    torch.manual_seed(0)
    m = Transformer(odd).eval()
    with pytest.raises(FieldError, match="cache_dtype: fp8 rows keep BF16 rope values .* must be even"):
        generate(m, [[1, 2, 3]], GenerationConfig(max_new_tokens=1, cache_dtype=FP8))
    with pytest.raises(FieldError, match="cache_dtype"):
        Engine(m, EngineConfig(kv_cache_bytes=8 << 20, block_size=BLOCK, cache_dtype=FP8))
    m = Transformer(preset("tiny-v4", index_head_dim=48)).eval()  # FP4 tiles of 32 after a Hadamard rotation
    with pytest.raises(FieldError, match="cache_dtype: fp8 index keys .* index_head_dim=48 must be a power of two"):
        generate(m, [[1, 2, 3]], GenerationConfig(max_new_tokens=1, cache_dtype=FP8))


def test_serve_disk_tier_keeps_fp8_rows_that_generate_reads(model, tmp_path):
    """``flyer serve``'s disk tier stores the FP8 pool's blocks and snapshots; a second engine and ``generate``
    resume from them (one format) with the uncached tokens."""
    prompt = PROMPT + PROMPT[:19]
    want = generate(model, [prompt], GenerationConfig(max_new_tokens=6, cache_dtype=FP8)).tokens[0]
    for stored, hits in ((3, 0), (0, 3)):
        pc = open_disk_prefix_cache(model, tmp_path, FP8, BLOCK)
        eng = Engine(model, EngineConfig(kv_cache_bytes=4 << 20, block_size=BLOCK, cache_dtype=FP8, prefix_cache=pc))
        out = []
        eng.submit(prompt, SamplingOptions(max_tokens=6), lambda e: out.append(e.token))
        eng.run_until_idle()
        assert out == want and (pc.stats.stored, pc.stats.hits) == (stored, hits)
    res = generate(model, [prompt], GenerationConfig(max_new_tokens=6, cache_dtype=FP8,
                                                     prefix_cache=open_prefix_cache(model, tmp_path, cache_dtype=FP8,
                                                                                    block_size=BLOCK)))
    assert res.tokens[0] == want and res.prefix["tokens_loaded"] == 32
