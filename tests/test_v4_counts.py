"""DeepSeek-V4's closed-form counts (``flyer.model.counts``) against oracles written apart from them: the tensor
list of DeepSeek's released V4-Flash checkpoint (its shapes and dtypes, from the safetensors header) summed
tensor by tensor, whose stored bytes must come to the published index's total_size; the published parameter
totals; attention FLOPs summed position by position; the decode cache counted entry by entry."""

import json
import math
from collections import Counter
from fractions import Fraction

import pytest

from flyer.cli import main
from flyer.cluster.costs import Layout, memory_per_gpu
from flyer.config import ModelConfig, preset
from flyer.model.counts import (attention_flops_per_token, block_params, forward_flops_per_token, hyper_head_params,
                                kv_cache_bytes_per_token, kv_window_bytes, mtp_module_params, mtp_params_stored,
                                param_counts, training_flops_per_token)

# the published model.safetensors.index.json of deepseek-ai/DeepSeek-V4-Flash (main model and mtp.0)
FLASH_TOTAL_SIZE, FLASH_TENSORS = 159_609_485_896, 69_187
# its tensors by header dtype (a public manifest of the 46 shards' headers; the sum is 69,187)
FLASH_DTYPES = {"BF16": 433, "F32": 417, "F8_E4M3": 375, "F8_E8M0": 34167, "I64": 3, "I8": 33792}
DTYPE_BYTES = {"BF16": 2, "F32": 4, "F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "I64": 8}


def _small_hybrid(**overrides) -> ModelConfig:
    """Every layer kind: sliding window only, CSA (ratio 4), HCA (ratio 5: head_dim 24 / 5 is fractional)."""
    fields = dict(vocab_size=64, dim=32, n_layers=4, n_dense_layers=0, attn="hybrid", n_heads=4, head_dim=24,
                  q_lora_rank=16, qk_rope_head_dim=8, window_size=8, compress_ratios=(0, 4, 5, 4), csa_ratio=4,
                  o_groups=2, o_lora_rank=12, index_topk=3, index_n_heads=2, index_head_dim=8, hc_mult=3,
                  moe_inter_dim=16, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=1,
                  n_limited_groups=1, score_func="sqrtsoftplus", n_hash_layers=1, swiglu_limit=10.0, mtp_depth=0,
                  max_seq_len=256, rope_factor=1.0, original_seq_len=256)
    return ModelConfig(**(fields | overrides))


# ---- the checkpoint's tensor list, from its published shapes (not from flyer.model.counts) -------------------
def checkpoint_tensors(cfg: ModelConfig, mtp: bool = False) -> list[tuple[str, str, tuple[int, ...], str]]:
    """(name, dtype, stored shape, role) of every tensor DeepSeek's V4 checkpoint format holds for ``cfg``. role:
    "gemm" (a weight a token multiplies), "expert" (a routed expert's: FP4 packed two per byte into I8, one
    E8M0 scale per 32 values), "other" (a parameter that is no GEMM operand: norms, sinks, hc base/scale, ape),
    "embed", "scale" (block scales), "buffer" (no parameter: hash tables, balancing biases)."""
    D, H, hd, R, m = cfg.dim, cfg.n_heads, cfg.head_dim, cfg.q_lora_rank, cfg.hc_mult
    Hi, di, F, E = cfg.index_n_heads, cfg.index_head_dim, cfg.moe_inter_dim, cfg.n_routed_experts
    out = []

    def add(name, dtype, shape, role):
        out.append((name, dtype, tuple(shape), role))

    def fp8(name, rows, cols):  # E4M3 with one E8M0 scale per 128 x 128 block
        add(f"{name}.weight", "F8_E4M3", (rows, cols), "gemm")
        add(f"{name}.scale", "F8_E8M0", (-(-rows // 128), -(-cols // 128)), "scale")

    def hc(prefix, rows, scales):
        add(f"{prefix}_fn", "F32", (rows, m * D), "gemm")
        add(f"{prefix}_base", "F32", (rows,), "other")
        add(f"{prefix}_scale", "F32", (scales,), "other")

    def block(p, ratio, hashed):
        add(f"{p}.attn_norm.weight", "BF16", (D,), "other")
        add(f"{p}.ffn_norm.weight", "BF16", (D,), "other")
        for site in ("attn", "ffn"):
            hc(f"{p}.hc_{site}", m * (m + 2), 3)
        a = f"{p}.attn"
        fp8(f"{a}.wq_a", R, D)
        add(f"{a}.q_norm.weight", "BF16", (R,), "other")
        fp8(f"{a}.wq_b", H * hd, R)
        fp8(f"{a}.wkv", hd, D)
        add(f"{a}.kv_norm.weight", "BF16", (hd,), "other")
        fp8(f"{a}.wo_a", cfg.o_groups * cfg.o_lora_rank, H * hd // cfg.o_groups)
        fp8(f"{a}.wo_b", D, cfg.o_groups * cfg.o_lora_rank)
        add(f"{a}.attn_sink", "F32", (H,), "other")
        if ratio:
            c = 2 if ratio == cfg.csa_ratio else 1
            add(f"{a}.compressor.wkv.weight", "BF16", (c * hd, D), "gemm")
            add(f"{a}.compressor.wgate.weight", "BF16", (c * hd, D), "gemm")
            add(f"{a}.compressor.ape", "F32", (ratio, c * hd), "other")
            add(f"{a}.compressor.norm.weight", "BF16", (hd,), "other")
            if c == 2:
                fp8(f"{a}.indexer.wq_b", Hi * di, R)
                add(f"{a}.indexer.weights_proj.weight", "BF16", (Hi, D), "gemm")
                add(f"{a}.indexer.compressor.wkv.weight", "BF16", (2 * di, D), "gemm")
                add(f"{a}.indexer.compressor.wgate.weight", "BF16", (2 * di, D), "gemm")
                add(f"{a}.indexer.compressor.ape", "F32", (ratio, 2 * di), "other")
                add(f"{a}.indexer.compressor.norm.weight", "BF16", (di,), "other")
        f = f"{p}.ffn"
        add(f"{f}.gate.weight", "BF16", (E, D), "gemm")
        if hashed:
            add(f"{f}.gate.tid2eid", "I64", (cfg.vocab_size, cfg.n_activated_experts), "buffer")
        else:
            add(f"{f}.gate.bias", "F32", (E,), "buffer")
        for e in range(E):
            for w, (rows, cols) in (("w1", (F, D)), ("w2", (D, F)), ("w3", (F, D))):
                add(f"{f}.experts.{e}.{w}.weight", "I8", (rows, cols // 2), "expert")
                add(f"{f}.experts.{e}.{w}.scale", "F8_E8M0", (rows, cols // 32), "scale")
        for w, (rows, cols) in (("w1", (F, D)), ("w2", (D, F)), ("w3", (F, D))):
            fp8(f"{f}.shared_experts.{w}", rows, cols)

    add("embed.weight", "BF16", (cfg.vocab_size, D), "embed")
    add("head.weight", "BF16", (cfg.vocab_size, D), "gemm")
    add("norm.weight", "BF16", (D,), "other")
    hc("hc_head", m, 1)
    for i in range(cfg.n_layers):
        block(f"layers.{i}", cfg.compress_ratios[i], i < cfg.n_hash_layers)
    if mtp:  # mtp.0: an uncompressed attention block, a learned-routed MoE, its projections and its own hc_head
        block("mtp.0", 0, False)
        for norm in ("enorm", "hnorm", "norm"):
            add(f"mtp.0.{norm}.weight", "BF16", (D,), "other")
        fp8("mtp.0.e_proj", D, D)
        fp8("mtp.0.h_proj", D, D)
        hc("mtp.0.hc_head", m, 1)
    return out


def _values(shape, role) -> int:
    """Parameters a stored tensor holds: an I8 expert tensor packs two FP4 values per byte."""
    return math.prod(shape) * (2 if role == "expert" else 1)


def _params(tensors, prefix=None) -> int:
    return sum(_values(s, r) for n, _, s, r in tensors
               if r not in ("scale", "buffer") and (prefix is None or n.startswith(prefix)))


# ---- parameter counts -----------------------------------------------------------------------------------------
def test_counts_equal_the_tensor_list_of_a_small_hybrid_model():
    """Every layer kind and the top, tensor by tensor: the sliding-window layer, CSA (overlapping compressor,
    indexer), HCA, a hash-routed layer, the hyper-connections and hc_head. A convention off by one tensor
    (the CSA compressor with one series, hyper-connections without scales) misses by that tensor's size."""
    cfg = _small_hybrid()
    ts = checkpoint_tensors(cfg)
    pc = param_counts(cfg)
    for i in range(cfg.n_layers):
        assert block_params(cfg, i) == _params(ts, f"layers.{i}."), i
    assert pc.total == _params(ts)
    assert pc.embedding == pc.head == 64 * 32 and pc.mtp == 0
    inactive = cfg.n_layers * (cfg.n_routed_experts - cfg.n_activated_experts) * 3 * cfg.dim * cfg.moe_inter_dim
    assert pc.activated == pc.total - inactive
    assert hyper_head_params(cfg) == _params(ts, "hc_head") == 3 * 96 + 3 + 1
    # the layer kinds apart, by hand: CSA adds wkv, wgate (48, 32), ape (4, 48), norm (24) and the indexer's wq_b
    # (16, 16), weights_proj (2, 32), wkv, wgate (16, 32), ape (4, 16), norm (8); HCA wkv, wgate (24, 32), ape
    # (5, 24), norm (24); hyper-connections (m = 3): fn (15, 96), base (15), scale (3) twice a block, hc_head 292
    assert block_params(cfg, 1) - block_params(cfg, 0) == 3072 + 192 + 24 + 256 + 64 + 1024 + 64 + 8
    assert block_params(cfg, 2) - block_params(cfg, 0) == 1536 + 120 + 24
    assert param_counts(_small_hybrid(hc_mult=1)).total == pc.total - 4 * 2 * (15 * 96 + 15 + 3) - (3 * 96 + 4)


def test_counts_equal_the_meta_model_of_a_small_hybrid_model():
    from flyer.model.info import meta_counts

    cfg = _small_hybrid()
    assert meta_counts(cfg) == param_counts(cfg)


def test_published_totals():
    """V4-Flash 284B total, 13B activated; V4-Pro 1.6T, 49B. DeepSeek's activated figure leaves the embedding
    table out (with it: 13.80B and 49.78B, which round to 14B and 50B)."""
    flash, pro = param_counts(preset("dsv4-flash")), param_counts(preset("dsv4-pro"))
    assert round(flash.total / 1e9) == 284 and round((flash.activated - flash.embedding) / 1e9) == 13
    assert round(pro.total / 1e12, 1) == 1.6 and round((pro.activated - pro.embedding) / 1e9) == 49
    assert round((flash.activated) / 1e9) == 14 and round(pro.activated / 1e9) == 50  # why the embedding is left out
    # one MTP module each (num_nextn_predict_layers 1), outside the totals as V3's 14B are
    assert flash.mtp == mtp_module_params(preset("dsv4-flash")) > 0 and pro.mtp == mtp_module_params(preset("dsv4-pro"))


def test_flash_checkpoint_bytes_from_the_config_alone():
    """The published index's total_size to the byte and its 69,187 tensors, dtype by dtype: FP8 E4M3 GEMM
    weights with an E8M0 byte per 128 x 128 block, FP4 routed experts (half a byte per value) with an E8M0 byte
    per 32 values, BF16 norms / gates / compressor and indexer projections / embedding / head, F32 sinks /
    hyper-connections / ape / balancing biases, I64 hash tables. The parameters among them are
    ``param_counts`` (main model) and ``mtp_module_params`` (mtp.0)."""
    cfg = preset("dsv4-flash")
    ts = checkpoint_tensors(cfg, mtp=True)
    stored = sum(math.prod(s) * DTYPE_BYTES[d] for _, d, s, _ in ts)
    assert stored == FLASH_TOTAL_SIZE
    assert len(ts) == FLASH_TENSORS and len({n for n, *_ in ts}) == FLASH_TENSORS
    assert Counter(d for _, d, _, _ in ts) == FLASH_DTYPES
    main_model = [t for t in ts if not t[0].startswith("mtp.")]
    assert param_counts(cfg).total == _params(main_model) == 284_332_230_231
    assert mtp_module_params(cfg) == _params(ts, "mtp.0.")
    # as stored: its parameters and its router's bias, no copy of the embedding or head (V3's layout has them)
    assert mtp_params_stored(cfg) == sum(_values(s, r) for n, _, s, r in ts if n.startswith("mtp.0.") and r != "scale")
    # the byte total tells single tensors apart: e.g. I32 hash tables, or one F32 hc scale fewer per block
    assert 3 * 129280 * 6 * 4 == 9_308_160 and 87 * 2 * 4 == 696


# ---- FLOPs ----------------------------------------------------------------------------------------------------
def _brute_attention(cfg: ModelConfig, layer: int, S: int, causal: bool, shift: int = 1) -> tuple[Fraction, Fraction]:
    """Sums over query positions t, divided by S: (its keys' attention cost, its indexer's scoring), the indexer
    scoring all n entries of a query that sees more than index_topk (one that sees fewer keeps them all).
    ``shift`` = 0: the mutation t -> floor(t / r), min(W, t)."""
    r, k = cfg.compress_ratios[layer], cfg.index_topk
    per_key, per_scored = 2 * cfg.n_heads * 2 * cfg.head_dim, 2 * cfg.index_n_heads * (cfg.index_head_dim + 1)
    attention = scoring = 0
    for t in (range(S) if causal else [S - 1] * S):
        u = t + shift
        n = u // r if r else 0
        attended = min(k, n) if r == cfg.csa_ratio else n
        attention += per_key * (min(cfg.window_size, u) + attended)
        scoring += per_scored * n if r == cfg.csa_ratio and n > k else 0
    return Fraction(attention, S), Fraction(scoring, S)


@pytest.mark.parametrize("name", ["small", "dsv4-flash"])
def test_attention_flops_equal_the_sum_over_positions(name):
    """Each layer kind at lengths around the window, the ratios and index_topk * csa_ratio (where the CSA
    selection starts to bind), exactly (the closed form divides the same integer sum by seq_len)."""
    cfg = _small_hybrid() if name == "small" else preset("dsv4-flash")
    W, k, r = cfg.window_size, cfg.index_topk, cfg.csa_ratio
    layers = {cfg.compress_ratios.index(x): x for x in set(cfg.compress_ratios)}  # one layer per ratio
    lengths = {1, 2, 3, 4, 5, 7, W - 1, W, W + 1, k * r - 1, k * r, k * r + 1, k * r + 3, 2 * k * r + 5}
    lengths |= {4096} if name != "small" else {200}
    for S in sorted(lengths):
        for i in layers:
            for causal in (True, False):
                want = sum(_brute_attention(cfg, i, S, causal))
                assert attention_flops_per_token(cfg, S, causal, layer_id=i) == float(want), (S, i, causal)
    # the off-by-one convention (position t sees min(W, t) keys, floor(t / r) entries) lands far outside exact
    # equality: within the window, a whole key per query
    i_csa = cfg.compress_ratios.index(r)
    got = attention_flops_per_token(cfg, W, True, layer_id=i_csa)
    assert got - float(sum(_brute_attention(cfg, i_csa, W, True, shift=0))) >= 4 * cfg.n_heads * cfg.head_dim
    with pytest.raises(ValueError, match="layer_id"):
        attention_flops_per_token(cfg, 64)


def test_training_flops_count_the_checkpoints_gemms():
    """3 x (2 x activated GEMM weights + attention), the GEMM weights summed from the tensor list (head and
    hyper-connection fn included; embedding, norms, sinks, ape and hc base/scale not), routed experts K of E; the CSA
    indexers' GEMMs and scoring (frozen: no gradient reaches them) forward only, where the sequence has more
    entries than index_topk (else nothing is selected, and they do not run)."""
    ran = set()
    for cfg in (_small_hybrid(), preset("dsv4-flash")):
        tensors = checkpoint_tensors(cfg)
        gemm = sum(_values(s, r) for n, _, s, r in tensors if r in ("gemm", "expert"))
        routed = cfg.n_layers * cfg.n_routed_experts * 3 * cfg.dim * cfg.moe_inter_dim
        activated = gemm - routed + routed * cfg.n_activated_experts // cfg.n_routed_experts
        indexer = [sum(_values(s, r) for n, _, s, r in tensors if r == "gemm" and f"layers.{i}.attn.indexer" in n)
                   for i in range(cfg.n_layers)]
        for S in (100, 4096):
            parts = [_brute_attention(cfg, i, S, True) for i in range(cfg.n_layers)]
            selects = [r == cfg.csa_ratio and S // r > cfg.index_topk for r in cfg.compress_ratios]
            ran.add(any(selects))
            indexers = sum(w for w, on in zip(indexer, selects) if on)
            want = (3 * (2 * (activated - sum(indexer)) + float(sum(a for a, _ in parts))) + 2 * indexers
                    + float(sum(s for _, s in parts)))
            assert training_flops_per_token(cfg, S) == pytest.approx(want, rel=1e-14)
    assert ran == {True, False}  # V4-Flash's 512 picks of 100 tokens' 25 entries select nothing
    # V4-Flash at 4K and 1M tokens: the window keeps attention small; the compressed entries grow it
    flash = preset("dsv4-flash")
    assert 84e9 < training_flops_per_token(flash, 4096) < 85e9
    # a token at 1M tokens of context (non-causal: every query counted as the last), forward: the V4 report puts
    # V4-Flash's single-token FLOPs near a tenth of V3.2's there
    v32 = preset("dsv32")
    assert forward_flops_per_token(flash, 1 << 20, False) < 0.15 * forward_flops_per_token(v32, 1 << 20, False)


# ---- KV cache -------------------------------------------------------------------------------------------------
def _cache_values(cfg: ModelConfig, T: int) -> int:
    """Values a decode cache holds after T tokens: each layer's last window keys and every complete entry."""
    total = 0
    for r in cfg.compress_ratios:
        total += min(T, cfg.window_size) * cfg.head_dim
        if r:
            total += (T // r) * (cfg.head_dim + (cfg.index_head_dim if r == cfg.csa_ratio else 0))
    return total


def test_kv_cache_bytes_per_token_and_window():
    flash = preset("dsv4-flash")  # 21 CSA layers: (512 + 128) / 4 per token; 20 HCA: 512 / 128
    assert kv_cache_bytes_per_token(flash) == (21 * 160 + 20 * 4) * 2 == 6880
    assert kv_window_bytes(flash) == 43 * 128 * 512 * 2
    assert kv_cache_bytes_per_token(flash, absorbed=False) == 6880  # one path for hybrid
    for cfg in (flash, preset("dsv4-pro"), _small_hybrid()):
        for b in (1, 2):
            per_token, window = kv_cache_bytes_per_token(cfg, b), kv_window_bytes(cfg, b)
            rounding = 2.0**-52 * per_token  # per token, where the rate is a float (the small model's 41.6)
            T = 128 * 4 * 5 * 1000  # a multiple of every ratio: the count is exactly linear past the window
            assert abs(_cache_values(cfg, T) * b - (window + per_token * T)) <= rounding * T
            slack = sum(cfg.head_dim + cfg.index_head_dim for _ in cfg.compress_ratios) * b  # incomplete windows
            for T in (1000, 12345):
                assert -rounding * T <= window + per_token * T - _cache_values(cfg, T) * b <= slack + rounding * T
    # a cache without the CSA indexer keys would grow 1,344 bytes a token slower
    assert kv_cache_bytes_per_token(flash) - 2 * (21 * 512 // 4 + 20 * 512 // 128) == 2 * 21 * 128 // 4 == 1344
    small = kv_cache_bytes_per_token(_small_hybrid())
    assert isinstance(small, float) and small == float(2 * (2 * Fraction(24 + 8, 4) + Fraction(24, 5))) == 41.6
    assert kv_window_bytes(preset("dsv3")) == 0


# ---- planners and CLIs -----------------------------------------------------------------------------------------
def test_plan_memory_holds_the_heaviest_hybrid_layer():
    """One layer per stage: a stage holds the largest layer (a CSA one), not layer 0 (sliding window only)."""
    cfg = preset("dsv4-flash")
    got = memory_per_gpu(cfg, Layout(gpus=43, pp=43, ep=1), 4096, 80)["params_per_gpu"]
    heaviest = max(block_params(cfg, i) for i in range(cfg.n_layers))
    top = max(param_counts(cfg).embedding, param_counts(cfg).head) + cfg.dim + hyper_head_params(cfg)
    assert got == heaviest + top
    assert heaviest - block_params(cfg, 0) > 10_000_000  # the CSA compressor and indexer a layer-0 plan would miss


def test_plan_and_info_cli(capsys):
    assert main(["plan", "--preset", "dsv4-flash"]) == 0
    assert "6,880 bytes" in capsys.readouterr().out
    assert main(["plan", "--preset", "dsv4-flash", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kv_cache_bytes_per_token"] == 6880 and out["kv_cache_window_bytes"] == 5_636_096
    assert out["total_params"] == 284_332_230_231 and 84e9 < out["flops_per_token_causal"] < 85e9
    assert out["memory"]["fits"]
    assert main(["info", "dsv4-flash", "--json"]) == 0  # builds the meta model: its counts equal the closed form
    info = json.loads(capsys.readouterr().out)
    assert info["total_params"] == 284_332_230_231 and info["kv_cache_bytes_per_token"] == 6880
