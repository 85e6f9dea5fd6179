"""Closed-form parameter counts, KV cache sizes and FLOPs per token for a ``ModelConfig``.

These are the numbers ``flyer info`` and ``flyer plan`` report. ``flyer.model.info.meta_counts``
counts the same things from a model built on the meta device; a test holds the two together for
every preset. Pure arithmetic on the config: the cluster models use it without building a model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import NamedTuple

from flyer.config import INDEXER_TRAIN_MODES, ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    total: int  # main model (embedding, blocks, final norm, head); MTP excluded
    # main-model parameters one token touches (K routed + shared experts), embedding and head included.
    # DeepSeek's published "activated" figures leave the embedding table (a lookup) out: V3 37B (36.6B here
    # without it, 37.6B with it), V4-Flash 13B (13.27B without, 13.80B with), V4-Pro 49B (48.85B / 49.78B)
    activated: int
    mtp: int  # the MTP modules' own parameters (embedding and head are shared)
    embedding: int
    head: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def compress_ratio(cfg: ModelConfig, layer_id: int) -> int:
    """Hybrid layer ``layer_id``'s compress ratio r (0: the sliding window only); an id past the main layers
    is an MTP block, whose attention DeepSeek-V4 does not compress. 0 for other attention kinds."""
    if cfg.attn != "hybrid" or layer_id >= cfg.n_layers:
        return 0
    return cfg.compress_ratios[layer_id]


def attention_params(cfg: ModelConfig, layer_id: int = 0) -> int:
    """One block's attention parameters; ``layer_id`` matters for hybrid attention (its compressor) and for DSA
    layers that share another's selection (GLM-5: no indexer)."""
    D, H = cfg.dim, cfg.n_heads
    if cfg.attn == "hybrid":
        return _hybrid_attention_params(cfg, layer_id)
    if cfg.attn == "gqa":
        q, kv = H * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        bias = (q + 2 * kv) if cfg.attn_bias else 0
        head_norms = 2 * cfg.head_dim if cfg.qk_norm else 0  # one weight per head channel, for q and for k
        return D * q + 2 * D * kv + bias + head_norms + q * D
    if cfg.q_lora_rank == 0:
        q = D * H * cfg.qk_head_dim
    else:
        q = D * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim
    kv = D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
    kv += cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return q + kv + H * cfg.v_head_dim * D + (indexer_params(cfg) if cfg.has_indexer(layer_id) else 0)


def indexer_param_total(cfg: ModelConfig) -> int:
    """The parameters of every lightning indexer of the model and its MTP modules (``indexer_params`` each): DSA's
    (MLA) in the layers with their own and in every MTP block, DeepSeek-V4's in its CSA layers; what
    ``--indexer-train`` freezes ("off") or trains alone ("warmup")."""
    layers = range(cfg.n_layers + cfg.mtp_depth)
    return indexer_params(cfg) * sum(cfg.has_indexer(i) or cfg.is_csa(i) for i in layers)


def indexed_layers(cfg: ModelConfig) -> int:
    """Main layers with their own DSA indexer (MLA): every one, or GLM-5's "full" ones; 0 without DSA."""
    return sum(map(cfg.has_indexer, range(cfg.n_layers)))


def _hybrid_attention_params(cfg: ModelConfig, layer_id: int) -> int:
    """wq_a (R, D), q_norm (R), wq_b (H hd, R), wkv (hd, D), kv_norm (hd), wo_a (G L, H hd / G), wo_b (D, G L),
    attn_sink (H); with r > 0 the compressor: wkv and wgate (c hd, D), ape (r, c hd), norm (hd), c = 2 for CSA
    (two overlapping series) else 1; CSA adds the indexer (``indexer_params``)."""
    D, H, hd, R = cfg.dim, cfg.n_heads, cfg.head_dim, cfg.q_lora_rank
    q = D * R + R + R * H * hd
    kv = D * hd + hd
    out = H * hd * cfg.o_lora_rank + cfg.o_groups * cfg.o_lora_rank * D  # wo_a is block-diagonal over G groups
    total = q + kv + out + H
    r = compress_ratio(cfg, layer_id)
    if r:
        c = 2 if r == cfg.csa_ratio else 1
        total += 2 * c * hd * D + r * c * hd + hd
        if r == cfg.csa_ratio:
            total += indexer_params(cfg)
    return total


def indexer_params(cfg: ModelConfig) -> int:
    """The lightning indexer's, per layer that has one; 0 without one. DSA (MLA, ``index_topk > 0``): wq_b from
    the query latent, wk, k_norm (weight and bias) and weights_proj. Hybrid (CSA layers): wq_b (Hi di, R),
    weights_proj (Hi, D) and its own compressor of keys: wkv and wgate (2 di, D), ape (csa_ratio, 2 di), norm (di)."""
    if cfg.index_topk == 0:
        return 0
    Hi, d = cfg.index_n_heads, cfg.index_head_dim
    if cfg.attn == "hybrid":
        return cfg.q_lora_rank * Hi * d + cfg.dim * Hi + 2 * 2 * d * cfg.dim + cfg.csa_ratio * 2 * d + d
    return cfg.q_lora_rank * Hi * d + cfg.dim * d + 2 * d + cfg.dim * Hi


def hyper_params(cfg: ModelConfig) -> int:
    """One hyper-connection's (two per block, around attention and FFN, when hc_mult = m > 1): fn (m(m+2), m D)
    giving each token's m pre, m post and m x m comb weights, base (m(m+2)), scale (3)."""
    m = cfg.hc_mult
    return 0 if m == 1 else m * (m + 2) * (m * cfg.dim + 1) + 3


def hyper_head_params(cfg: ModelConfig) -> int:
    """The final collapse of the m streams (hc_head): fn (m, m D), base (m), scale (1); 0 when hc_mult = 1."""
    m = cfg.hc_mult
    return 0 if m == 1 else m * (m * cfg.dim + 1) + 1


def _moe_params(cfg: ModelConfig, activated: bool) -> int:
    """Gate weight (E + Z, D: LongCat-Flash's zero experts score too) and the experts; hash-routed layers' token
    table is a buffer, not a parameter. Activated: K routed experts, the most a token runs (a pick of a zero
    expert runs none: LongCat-Flash's activated count varies per token, its FLOPs with it)."""
    expert = 3 * cfg.dim * cfg.moe_inter_dim
    routed = min(cfg.n_activated_experts, cfg.n_routed_experts) if activated else cfg.n_routed_experts
    return cfg.n_route_columns * cfg.dim + (routed + cfg.n_shared_experts) * expert


def has_routed_experts(cfg: ModelConfig, layer_id: int) -> bool:
    """Whether block ``layer_id`` (``n_layers`` onward: an MTP module's) holds routed experts: past the dense layers,
    or LongCat-Flash's pairs' first blocks (``has_shortcut_moe``: never an MTP block)."""
    if cfg.n_routed_experts == 0:
        return False
    return cfg.has_shortcut_moe(layer_id) if cfg.shortcut_moe else layer_id >= cfg.n_dense_layers


def routed_expert_params(cfg: ModelConfig) -> int:
    """The routed experts' parameters, the main model's and the MTP modules': the share expert parallelism splits."""
    blocks = sum(has_routed_experts(cfg, i) for i in range(cfg.n_layers + cfg.mtp_depth))
    return blocks * cfg.n_routed_experts * 3 * cfg.dim * cfg.moe_inter_dim


def block_params(cfg: ModelConfig, layer_id: int, activated: bool = False) -> int:
    """Block ``layer_id``'s parameters (``n_layers`` onward: an MTP module's block): its two norms, two
    hyper-connections, attention and FFN."""
    norms = 2 * cfg.dim
    if layer_id < cfg.n_dense_layers or cfg.n_routed_experts == 0 or cfg.shortcut_moe:
        ffn = 3 * cfg.dim * cfg.inter_dim  # with the shortcut MoE: every block's dense FFN, the pair's MoE below
        ffn += _moe_params(cfg, activated) if cfg.has_shortcut_moe(layer_id) else 0
    else:
        ffn = _moe_params(cfg, activated)
    return norms + 2 * hyper_params(cfg) + attention_params(cfg, layer_id) + ffn


def param_counts(cfg: ModelConfig) -> ParamCounts:
    emb = cfg.vocab_size * cfg.dim
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim
    top = emb + head + cfg.dim + hyper_head_params(cfg)  # embedding, head, final norm, stream collapse
    total = top + sum(block_params(cfg, i) for i in range(cfg.n_layers))
    act = top + sum(block_params(cfg, i, activated=True) for i in range(cfg.n_layers))
    return ParamCounts(total=total, activated=act, mtp=cfg.mtp_depth * mtp_module_params(cfg), embedding=emb,
                       head=head)


def activated_params_min(cfg: ModelConfig) -> int:
    """``ParamCounts.activated`` for a token whose picks go to zero-computation experts wherever they can (LongCat-
    Flash: max(0, K - Z) FFN experts per MoE layer, not K); the same as ``activated`` without zero experts.
    LongCat-Flash-Chat: 19.50B to 32.18B with its embedding, 18.69B to 31.38B without (its report: 18.6B-31.3B)."""
    moe_layers = sum(has_routed_experts(cfg, i) for i in range(cfg.n_layers))
    K = min(cfg.n_activated_experts, cfg.n_routed_experts)
    skipped = K - max(0, K - cfg.n_zero_experts)
    return param_counts(cfg).activated - moe_layers * skipped * 3 * cfg.dim * cfg.moe_inter_dim


def mtp_module_params(cfg: ModelConfig) -> int:
    """One MTP module's own parameters: enorm, hnorm, norm, the (D, 2D) projection of [embedding; hidden]
    (DeepSeek-V4: e_proj and h_proj, (D, D) each), a block (``block_params(cfg, n_layers)``: DeepSeek-V4's
    attention uncompressed) and, with hyper-connections, its own hc_head (as DeepSeek-V4-Flash's mtp.0)."""
    return 3 * cfg.dim + 2 * cfg.dim * cfg.dim + hyper_head_params(cfg) + block_params(cfg, cfg.n_layers)


def mtp_params_stored(cfg: ModelConfig) -> int:
    """The MTP modules' parameters as DeepSeek's checkpoints store them: their own (``ParamCounts.mtp``) and their
    routers' balancing bias (a buffer, stored), and in V3's layout each module's own copies of the embedding and the
    head (``embed_tokens``, ``shared_head.head``), which V4's leaves out (its ``mtp.0`` shares the model's). DeepSeek-
    V3's "MTP module adds about 14B" counts them so (13.46B here)."""
    bias = cfg.n_routed_experts if cfg.router_bias else 0
    copies = 0 if cfg.attn == "hybrid" else 2 * cfg.vocab_size * cfg.dim
    return cfg.mtp_depth * (mtp_module_params(cfg) + copies + bias)


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_element: int = 2, absorbed: bool = True) -> float:
    """Bytes cached per token over all layers (an int, except a hybrid cache's fractional per-token share).

    MLA (absorbed decode) caches the latent c_KV and the shared rope key; the naive MLA path
    (``absorbed=False``) caches full per-head keys and values; GQA caches K and V per KV head. With
    DeepSeek Sparse Attention each layer with an indexer also caches the token's indexer key (``index_head_dim``),
    in either MLA path: the indexer scores every earlier key at each step (GLM-5's shared layers cache none).

    Hybrid attention (``absorbed`` ignored) grows by one ``head_dim`` entry (its shared key and value) per r
    tokens in each layer of compress ratio r > 0, and a CSA layer also by one ``index_head_dim`` indexer key per
    r tokens: this is the long-context rate. Its sliding window is a constant per sequence on top of it,
    ``kv_window_bytes``.
    """
    if cfg.attn == "hybrid":
        values = Fraction(0)
        for i in range(cfg.n_layers):
            r = compress_ratio(cfg, i)
            if r:
                values += Fraction(cfg.head_dim + (cfg.index_head_dim if r == cfg.csa_ratio else 0), r)
        total = values * bytes_per_element
        return int(total) if total.denominator == 1 else float(total)
    if cfg.attn == "gqa":
        per_layer = 2 * cfg.n_kv_heads * cfg.head_dim
    elif absorbed:
        per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    else:
        per_layer = cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return (cfg.n_layers * per_layer + indexed_layers(cfg) * cfg.index_head_dim) * bytes_per_element


V4_FP8_TILE = 64  # DeepSeek-V4's FP8 rows (``flyer.infer.hybrid_fp8``): NoPE channels per UE8M0 scale byte
V4_FP8_SCALE_ALIGN = 8  # a row's scale bytes padded to 8, as FlashMLA's 7 + 1


def v4_fp8_scale_bytes(d: int, R: int) -> int:
    """Bytes of a V4 FP8 row's scale group: one per 64 of its d - R NoPE channels, padded to 8 (V4: 7 scales, 8)."""
    return -(-(-(-(d - R) // V4_FP8_TILE)) // V4_FP8_SCALE_ALIGN) * V4_FP8_SCALE_ALIGN


def v4_fp8_row_bytes(d: int, R: int) -> int:
    """Bytes of one DeepSeek-V4 FP8 key / entry row (``flyer.infer.hybrid_fp8``): d - R E4M3 codes, the R rope
    values in BF16, the scale group (V4: 448 + 128 + 8 = 584)."""
    return d - R + 2 * R + v4_fp8_scale_bytes(d, R)


V4_INDEX_FP4_TILE = 32  # DeepSeek-V4's FP4 index keys (``flyer.infer.hybrid_index_fp4``): channels per UE8M0 scale


def v4_index_fp4_row_bytes(di: int) -> int:
    """Bytes of one DeepSeek-V4 FP4 index key row (``flyer.infer.hybrid_index_fp4``): di E2M1 codes two to a byte,
    one UE8M0 scale byte per 32 of them (V4: 64 + 4 = 68, against BF16's 256)."""
    return di // 2 + -(-di // V4_INDEX_FP4_TILE)


def kv_cache_bytes_per_token_fp8(cfg: ModelConfig) -> int | float | None:
    """Bytes cached per token over all layers with ``--cache-dtype fp8`` (``flyer.infer.cache_fp8``), None
    where it does not apply (not MLA nor hybrid): per layer DeepSeek's FP8 row, kv_lora_rank E4M3 codes, a 4-byte
    FP32 scale per 128 of them and qk_rope_head_dim BF16 rope values (V3: 512 + 16 + 128 = 656 bytes); DSA's
    indexer keys as DeepSeek's FP8 ones, index_head_dim E4M3 codes and one FP32 scale (V3.2: 132 bytes).
    Hybrid (DeepSeek-V4): ``kv_cache_bytes_per_token``'s entries as ``v4_fp8_row_bytes`` rows, the CSA indexer
    keys as ``v4_index_fp4_row_bytes`` rows (a fraction where r does not divide the bytes)."""
    if cfg.attn == "hybrid":
        total, row = Fraction(0), v4_fp8_row_bytes(cfg.head_dim, cfg.rope_dim)
        index_row = v4_index_fp4_row_bytes(cfg.index_head_dim)
        for i in range(cfg.n_layers):
            r = compress_ratio(cfg, i)
            if r:
                total += Fraction(row + (index_row if r == cfg.csa_ratio else 0), r)
        return int(total) if total.denominator == 1 else float(total)
    if cfg.attn != "mla":
        return None
    row = cfg.kv_lora_rank + 4 * -(-cfg.kv_lora_rank // 128) + 2 * cfg.qk_rope_head_dim
    return cfg.n_layers * row + indexed_layers(cfg) * (cfg.index_head_dim + 4)


def kv_window_bytes(cfg: ModelConfig, bytes_per_element: int = 2) -> int:
    """Bytes a decode cache holds per sequence whatever its length, beside ``kv_cache_bytes_per_token``: each
    hybrid layer's last ``window_size`` keys (``head_dim`` values each, one head read as key and value); 0 for
    MLA and GQA. The compressors' not-yet-complete windows come beside it (``kv_compressor_state_bytes``: their
    layout a choice of the implementation, flyer's)."""
    if cfg.attn != "hybrid":
        return 0
    return cfg.n_layers * cfg.window_size * cfg.head_dim * bytes_per_element


def kv_compressor_state_bytes(cfg: ModelConfig) -> int:
    """Bytes per sequence of the compressors' not-yet-complete windows, beside ``kv_window_bytes`` (FP32 whatever the
    cache's dtype: their softmax is FP32), in flyer's layout (``flyer.infer.hybrid_cache``): each compressed layer's
    kv and gate projections of its last S positions, S = 2r of two series for CSA, r of one for HCA, and a CSA
    layer's indexer's (2 index_head_dim each); 0 for MLA and GQA."""
    if cfg.attn != "hybrid":
        return 0
    total = 0
    for i in range(cfg.n_layers):
        r = compress_ratio(cfg, i)
        if r:
            csa = cfg.is_csa(i)
            S, width = (2 * r, 2 * cfg.head_dim + 2 * cfg.index_head_dim) if csa else (r, cfg.head_dim)
            total += 2 * S * width * 4  # kv and gate
    return total


def kv_window_bytes_fp8(cfg: ModelConfig) -> int:
    """``kv_window_bytes`` with ``--cache-dtype fp8``: each window key a ``v4_fp8_row_bytes`` row; 0 for MLA and GQA."""
    return cfg.n_layers * cfg.window_size * v4_fp8_row_bytes(cfg.head_dim, cfg.rope_dim) if cfg.attn == "hybrid" else 0


class _Attention(NamedTuple):
    """One layer's attention FLOPs per token, forward: ``core`` the main attention's (2 H (qk + v) per attended key;
    hybrid: 2 H 2 head_dim), ``selection`` its own indexer's scoring to choose the keys (2 H_index (index_head_dim
    + 1) per scored key: the heads' dot products, then their weighted sum), ``index_attended`` that scoring over the
    attended keys alone (the indexer's KL loss, L_I), ``index_unscored`` the part of it the selection did not score
    (the keys of queries that see at most index_topk: all of it where nothing is selected), ``selects`` whether the
    indexer runs at this length."""
    core: float
    selection: float
    index_attended: float
    index_unscored: float
    selects: bool


def _attention(cfg: ModelConfig, seq_len: int, causal: bool, layer_id: int | None, dense: bool) -> _Attention:
    """Causal: a query sees seq_len / 2 keys on average (a sliding GQA layer: ``_window_keys`` / seq_len). DeepSeek
    Sparse Attention: a query attends to its index_topk selected keys at most (causal: k - k^2 / (2 seq_len) on
    average past seq_len = k), and its indexer scores the keys of the queries that see more than k ((seq_len^2 -
    k^2) / (2 seq_len) on average); a query seeing k or fewer keeps them all and needs no score. ``dense``: the
    indexer's dense warm-up, where every layer attends to every causal key and nothing is selected."""
    if cfg.attn == "hybrid":
        if layer_id is None:
            raise ValueError("attention_flops_per_token: hybrid attention differs per layer; pass layer_id")
        return _hybrid_attention(cfg, seq_len, causal, layer_id, dense)
    S, k = seq_len, cfg.index_topk
    qk, v = (cfg.qk_head_dim, cfg.v_head_dim) if cfg.attn == "mla" else (cfg.head_dim, cfg.head_dim)
    sparse = 0 < k < S and not dense
    attended = (k - k * k / (2 * S) if causal else k) if sparse else (S / 2 if causal else S)
    window = cfg.window(layer_id) if cfg.attn == "gqa" and layer_id is not None else 0
    if window:  # a sliding GQA layer
        attended = _window_keys(S, window, causal) / S
    core = 2 * cfg.n_heads * (qk + v) * attended
    if not (k and cfg.has_indexer(cfg.n_layers if layer_id is None else layer_id)):
        return _Attention(core, 0.0, 0.0, 0.0, sparse)
    per_key = 2 * cfg.index_n_heads * (cfg.index_head_dim + 1)
    scored = ((S * S - k * k) / (2 * S) if causal else S) if sparse else 0.0
    unscored = (k * k / (2 * S) if causal else 0.0) if sparse else attended  # the queries t <= k: t keys each
    return _Attention(core, per_key * scored, per_key * attended, per_key * unscored, sparse)


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True,
                              layer_id: int | None = None) -> float:
    """Forward FLOPs per token of one layer's attention core (the projections are matmul parameters): the main
    attention's and, with DeepSeek Sparse Attention, its indexer's scoring to select (``_attention``), in a layer
    with its own indexer (``layer_id``: None or an MTP block's, one that has; GLM-5's shared layers have none).

    Hybrid attention differs per layer: ``layer_id`` is required (see ``_hybrid_attention``); a GQA layer of
    ``sliding_layers`` attends over its window (None: as a layer that does not slide)."""
    a = _attention(cfg, seq_len, causal, layer_id, dense=False)
    return a.core + a.selection


def _window_keys(S: int, W: int, causal: bool) -> int:
    """Keys a window of W attends over a sequence of S: query t (0-based) sees min(W, t + 1) causally, so the sum
    of u = 1 .. S less what the last S - W queries' windows leave behind; non-causal min(W, S) each."""
    if not causal:
        return min(W, S) * S
    past = max(0, S - W)
    return S * (S + 1) // 2 - past * (past + 1) // 2


def _floor_sum(n: int, r: int) -> int:
    """sum_{u=1..n} floor(u / r) for n >= 0: q full steps of r below q r, then q for each u in [q r, n]."""
    q = n // r
    return r * q * (q - 1) // 2 + q * (n - q * r + 1) if n > 0 else 0


def _hybrid_attention(cfg: ModelConfig, seq_len: int, causal: bool, layer_id: int, dense: bool) -> _Attention:
    """The position at index t (0-based) attends to min(window_size, t + 1) window keys and to the
    n = floor((t + 1) / r) compressed entries complete by then (HCA: all of them; CSA: the indexer's best
    index_topk, the indexer scoring all n where n > index_topk). Every key costs 2 H (head_dim + head_dim):
    scores and values share the head. Causal: the exact mean over t = 0 .. seq_len - 1; non-causal: every query
    counted as the last one (t = seq_len - 1). The pooling of each window into its entry (~2 c head_dim per token)
    is left out, as small as a norm. ``dense``: CSA's dense warm-up, every complete entry attended."""
    S, W, r, k = seq_len, cfg.window_size, compress_ratio(cfg, layer_id), cfg.index_topk
    csa = r > 0 and r == cfg.csa_ratio
    sparse = csa and not dense
    window = _window_keys(S, W, causal)
    if causal:  # sums over u = t + 1 = 1 .. S, divided by S below
        entries = _floor_sum(S, r) if r else 0
        # sum of min(k, n_u) = sum of n_u - sum of max(0, n_u - k), and n_u - k = floor((u - k r) / r)
        attended = entries - _floor_sum(S - k * r, r) if sparse else entries
        # the n_u of the queries with n_u > k, those u >= (k + 1) r
        scored = entries - _floor_sum(min(S, (k + 1) * r - 1), r) if sparse else 0
    else:
        entries = (S // r) * S if r else 0
        attended = min(k, S // r) * S if sparse else entries
        scored = entries if sparse and S // r > k else 0
    core = 2 * cfg.n_heads * 2 * cfg.head_dim * (window + attended) / S
    if not csa:
        return _Attention(core, 0.0, 0.0, 0.0, False)
    per_key = 2 * cfg.index_n_heads * (cfg.index_head_dim + 1)
    # the entries of the queries with n <= k, which attend to all theirs unscored (every entry where none selects)
    if not sparse:
        unscored = attended
    elif causal:
        unscored = entries - scored
    else:
        unscored = 0 if S // r > k else attended
    # the indexer runs where the sequence has more than index_topk entries (the queries of its first (k + 1) r
    # positions then project theirs too: ``HybridAttention.forward`` selects per chunk, the count per token)
    return _Attention(core, per_key * scored / S, per_key * attended / S, per_key * unscored / S,
                      sparse and S // r > k)


def indexer_matmul_params(cfg: ModelConfig, layer_id: int) -> int:
    """The GEMM weights of block ``layer_id``'s own lightning indexer (``indexer_params`` less its norms and, for
    CSA, its compressor's ape); 0 without one."""
    Hi, d, D = cfg.index_n_heads, cfg.index_head_dim, cfg.dim
    if cfg.attn == "hybrid":
        r = compress_ratio(cfg, layer_id)
        own = cfg.index_topk > 0 and r > 0 and r == cfg.csa_ratio
        return cfg.q_lora_rank * Hi * d + D * Hi + 2 * 2 * d * D if own else 0
    return cfg.q_lora_rank * Hi * d + D * d + D * Hi if cfg.has_indexer(layer_id) else 0


def layer_flops_per_token(cfg: ModelConfig, seq_len: int, layer_id: int, causal: bool = True,
                          indexer_train: str = "off", backward: bool = True) -> float:
    """Block ``layer_id``'s FLOPs per token (``n_layers`` onward: an MTP module's): its GEMMs (2 per activated
    matmul parameter) and its attention core (``_attention``), forward and, with ``backward``, backward (twice the
    forward) of what trains, the model's FLOPs (recomputation left out).

    A DSA indexer (``indexer_train``: one of ``INDEXER_TRAIN_MODES``, ``flyer.model.indexer_loss``) gets no gradient
    of the model's loss: "off" runs it forward once to select, its projections and its scores; "sparse" adds its KL
    loss L_I over the attended keys, whose forward is the selection's scores (a query that sees at most index_topk
    keys is scored there first) and whose backward costs twice that, and the weight gradient of its projections
    (their inputs are detached: no input gradient); "warmup" freezes every other weight (the block runs forward
    only) and attends densely, L_I's scoring then forward and backward over every causal key. Recomputation is not
    counted: flyer's L_I runs the indexer's forward again apart from the selection, its keys' projections once more
    in backward (which keeps their input only), and its target, the main attention's probabilities, scores the
    attended keys again (absorbed, ``indexer_loss._target``: at 128K tokens of V3.2's warm-up about as much again
    as this count) where the attention has them."""
    if indexer_train not in INDEXER_TRAIN_MODES:
        raise ValueError(f"indexer_train: must be one of {', '.join(INDEXER_TRAIN_MODES)} (got {indexer_train!r})")
    warm = indexer_train == "warmup"
    a = _attention(cfg, seq_len, causal, layer_id, dense=warm)
    idx = indexer_matmul_params(cfg, layer_id)
    main = 2 * (block_params(cfg, layer_id, activated=True) - _block_non_matmul(cfg, layer_id) - idx) + a.core
    flops = (3 if backward and not warm else 1) * main + a.selection
    if backward and idx and indexer_train != "off":  # the projections forward once, then their weight gradient
        return flops + 2 * 2 * idx + 2 * a.index_attended + a.index_unscored
    return flops + (2 * idx if a.selects else 0)


def _top_matmul(cfg: ModelConfig) -> int:
    """The GEMM weights past the blocks: the output head (the embedding's table too where they are tied: the head
    is a GEMM either way) and hc_head's fn (m, m D)."""
    m = cfg.hc_mult
    return cfg.vocab_size * cfg.dim + (m * m * cfg.dim if m > 1 else 0)


def head_flops_per_token(cfg: ModelConfig, indexer_train: str = "off", backward: bool = True) -> float:
    """The FLOPs per token of the GEMMs past the blocks (``_top_matmul``): forward, and with ``backward`` twice
    that again, but in the indexers' warm-up, which freezes them."""
    return (3 if backward and indexer_train != "warmup" else 1) * 2.0 * _top_matmul(cfg)


def _model_flops(cfg: ModelConfig, seq_len: int, causal: bool, indexer_train: str, backward: bool) -> float:
    """The main model's FLOPs per token: its blocks' (``layer_flops_per_token``) and the GEMMs past them."""
    return head_flops_per_token(cfg, indexer_train, backward) + sum(
        layer_flops_per_token(cfg, seq_len, i, causal, indexer_train, backward) for i in range(cfg.n_layers))


def training_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True,
                             indexer_train: str = "off") -> float:
    """Training FLOPs per token, MTP excluded: forward + backward = 3 x forward of 2 x activated matmul parameters
    (head included, embedding excluded) and every layer's attention core, each layer's DSA indexer as
    ``indexer_train`` trains it (``layer_flops_per_token``; "warmup": the frozen model forward only).
    Hyper-connections count by their fn projections (matmuls); mixing the m streams (~2 m (m + 2) D per block
    and token, under 0.1% for DeepSeek-V4) is left out."""
    return _model_flops(cfg, seq_len, causal, indexer_train, backward=True)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """``training_flops_per_token``'s forward alone (a frozen model's: DPO's reference), MTP excluded."""
    return _model_flops(cfg, seq_len, causal, "off", backward=False)


def mtp_training_flops_per_token(cfg: ModelConfig, seq_len: int, indexer_train: str = "off") -> float:
    """The MTP modules' training FLOPs per token of a ``seq_len`` row (causal attention; 0 without them), which
    ``training_flops_per_token`` leaves out: module k runs on the row's first seq_len - k positions (the rest have no
    token k + 1 ahead to predict), its block (``layer_flops_per_token`` at that length), its projection of
    [embedding; hidden] (V3's eh_proj; V4's e_proj, and h_proj per stream), V4's own hc_head and the shared head,
    3 x forward (1 x in the indexer's warm-up, which freezes them)."""
    gemm = (1 + max(cfg.hc_mult, 1)) * cfg.dim * cfg.dim + _top_matmul(cfg)  # its projection, hc_head and head
    passes = 1 if indexer_train == "warmup" else 3
    total = 0.0
    for k in range(1, cfg.mtp_depth + 1):
        n = seq_len - k
        if n > 0:  # V4: the block attends by the window only
            total += n * (passes * 2.0 * gemm + layer_flops_per_token(cfg, n, cfg.n_layers, True, indexer_train))
    return total / seq_len


def _block_non_matmul(cfg: ModelConfig, layer_id: int) -> int:
    """Block ``layer_id``'s (``n_layers`` onward: an MTP module's): its two norms, its hyper-connections' base and
    scale (their fn are GEMMs), attention's norms (MLA's latents', the DSA indexer's key LayerNorm, weight and bias)
    or biases and head norms (GQA), hybrid attention's (``_hybrid_non_matmul``)."""
    out = 2 * cfg.dim
    m = cfg.hc_mult
    if m > 1:
        out += 2 * (m * (m + 2) + 3)
    if cfg.attn == "hybrid":
        return out + _hybrid_non_matmul(cfg, layer_id)
    if cfg.attn == "mla":
        return out + cfg.kv_lora_rank + (cfg.q_lora_rank or 0) + (2 * cfg.index_head_dim
                                                                  if cfg.has_indexer(layer_id) else 0)
    if cfg.attn_bias:
        out += (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    if cfg.qk_norm:
        out += 2 * cfg.head_dim
    return out


def _hybrid_non_matmul(cfg: ModelConfig, layer_id: int) -> int:
    """Hybrid attention ``layer_id``'s: q_norm, kv_norm, attn_sink, and the compressors' ape and norm."""
    out = cfg.q_lora_rank + cfg.head_dim + cfg.n_heads
    r = compress_ratio(cfg, layer_id)
    if r:
        c = 2 if r == cfg.csa_ratio else 1
        out += r * c * cfg.head_dim + cfg.head_dim
        if r == cfg.csa_ratio:
            out += r * 2 * cfg.index_head_dim + cfg.index_head_dim
    return out
