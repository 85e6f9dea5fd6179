"""Training plan: FLOPs per token, GPU-hours, days, cost, MFU and per-GPU memory for a layout.

Throughput comes either from a measurement (tokens per day on the whole cluster, as the V3
report gives it) or from an assumed MFU against the dense BF16 peak:

    tokens/s/GPU = tokens_per_day / 86400 / gpus            (measured)
    tokens/s/GPU = mfu x peak / flops_per_token_causal      (assumed MFU)
    gpu_hours    = tokens / (tokens/s/GPU) / 3600
    mfu          = flops_per_token x tokens/s/GPU / peak    (causal and non-causal)

Memory per GPU for a PP x EP x DP layout with ZeRO-1 (DeepSeek-V3's recipe: BF16 weights, FP32
gradients, FP32 master weights plus BF16 AdamW moments, optimizer states sharded over data
parallel ranks). Expert weights are split over EP ranks; everything else is replicated over the
``gpus / pp`` ranks of a stage. The heaviest stage holds ``ceil(layers / pp)`` MoE layers and the
larger of embedding and output head (both when ``pp == 1``); the MTP module is not counted.
Activations are an estimate (see ``activation_bytes_per_token_layer``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from flyer.cluster.hardware import GIB, GPUSpec
from flyer.cluster.pipeline import schedule_cost
from flyer.config import ModelConfig, check_indexer_train
from flyer.errors import FieldError
from flyer.model.attention import window_chunks
from flyer.model.dsa_chunks import dsa_gathers
from flyer.model.counts import (block_params, compress_ratio, hyper_head_params, kv_cache_bytes_per_token,
                                kv_window_bytes, mtp_params_stored, mtp_training_flops_per_token, param_counts,
                                training_flops_per_token)
from flyer.model.hybrid_chunks import CHUNK_ROWS

SECONDS_PER_DAY = 86400.0


@dataclass(frozen=True)
class Layout:
    gpus: int
    pp: int = 1
    ep: int = 1
    micro_batch: int = 1  # sequences per micro-batch
    schedule: str = "1f1b"
    weight_bytes: int = 2  # BF16 working weights
    grad_bytes: int = 4  # FP32 gradient accumulation
    optimizer_bytes: int = 8  # FP32 master (4) + BF16 first and second moments (2 + 2)
    activation_bytes: int = 2  # BF16 saved activations
    recompute: bool = True  # DeepSeek-V3's recomputation and FP8 activation caching

    @property
    def dp(self) -> int:
        """Replicas of a non-expert weight: all ranks of one pipeline stage."""
        return self.gpus // self.pp

    @property
    def expert_dp(self) -> int:
        """Replicas of an expert weight: the stage's ranks divided over EP."""
        return self.dp // self.ep


def validate_layout(cfg: ModelConfig, lay: Layout) -> None:
    if lay.gpus < 1:
        raise FieldError("gpus", f"must be >= 1 (got {lay.gpus})")
    if lay.pp < 1 or lay.gpus % lay.pp:
        raise FieldError("pp", f"must divide the {lay.gpus} GPUs (got {lay.pp})")
    if lay.pp > cfg.n_layers:
        raise FieldError("pp", f"must be <= the model's {cfg.n_layers} layers (got {lay.pp})")
    if cfg.shortcut_moe and lay.pp > cfg.n_layers // 2:  # a stage holds whole block pairs (LongCat-Flash)
        raise FieldError("pp", f"must be <= the model's {cfg.n_layers // 2} block pairs (shortcut_moe; got {lay.pp})")
    if lay.ep < 1 or lay.dp % lay.ep:
        raise FieldError("ep", f"must divide the {lay.dp} GPUs of a pipeline stage (got {lay.ep})")
    if lay.ep > 1 and not cfg.is_moe:
        raise FieldError("ep", f"must be 1 for a dense model (no routed experts to shard; got {lay.ep})")
    if lay.ep > 1 and cfg.n_routed_experts % lay.ep:
        raise FieldError("ep", f"must divide the model's {cfg.n_routed_experts} routed experts (got {lay.ep})")
    if lay.micro_batch < 1:
        raise FieldError("micro_batch", f"must be >= 1 (got {lay.micro_batch})")


def auto_layout(cfg: ModelConfig, gpus: int) -> tuple[int, int, str]:
    """DeepSeek-V3's layout (PP 16, EP 64, DualPipe) where it is valid, else PP 1, EP 1, 1F1B."""
    try:
        validate_layout(cfg, Layout(gpus, 16, 64, schedule="dualpipe"))
        return 16, 64, "dualpipe"
    except FieldError:
        return 1, 1, "1f1b"


def activation_bytes_per_token_layer(cfg: ModelConfig, moe: bool, recompute: bool = True,
                                     bytes_per_element: int = 2, layer_id: int | None = None,
                                     mla_recompute: bool = False, fp8_cache: bool = False,
                                     seq_len: int | None = None, packed: bool = False) -> float:
    """Bytes a layer saves for backward per token (FlashAttention-style: no S x S scores).

    Without recomputation, a dense MLA, a DSA (given the ``seq_len`` tokens it reads, and whether they are ``packed``
    documents) or a GQA layer saves what flyer's keeps (``attention_saved_bytes``: ``mla_attention_saved_bytes``,
    ``dsa_attention_saved_bytes``, ``gqa_attention_saved_bytes``; under ``fp8_cache``, whose linear layers keep FP8
    tiles of their inputs, the count below, which stays under it); the count below is otherwise its input and normed
    input, the q latent, the kv latent + rope key, q, k, v, the attention output and the softmax log-sum-exp (one per
    head). The FFN saves its norm's input, output and
    FP32 inverse RMS, its dense or shared experts' projections and product, per routed pick the expert input, gate/up
    outputs, product and output, plus the router scores (not counted: the router's picks and the experts' row
    bookkeeping, integers a few a pick, nor an expert kernel's row padding).

    ``recompute=True`` is DeepSeek-V3's recipe (report, sections 3.3.2-3.3.3): RMSNorm outputs and
    the MLA up-projections (q, k, v) are recomputed from the saved latents, the SwiGLU output from
    its saved inputs, and both the expert inputs and the SwiGLU inputs are cached in FP8 with the
    fine-grained tiles (half a BF16 element each).

    Hybrid attention (DeepSeek-V4) without recomputation: what flyer's keeps (``hybrid_attention_saved_bytes``); with
    recomputation or under ``fp8_cache``, the q latent, the one shared key/value head, the grouped output projection's
    latent and its compressors' projections: those of layer ``layer_id``, or of a CSA layer (the heaviest kind) without
    one. Hyper-connections (``flyer.model.hyper``) add, around the attention and the FFN each, the m input streams its
    mix reads and the block's output, which the streams' update keeps for post's gradient, and their maps' few values a
    token (``hyper_connection_saved_bytes``).

    ``mla_recompute`` (what ``flyer train --recompute mla`` runs, ``flyer.model.recompute``): only the MLA
    up-projections are recomputed, an MLA layer's q, k, v and normed latents not saved (a DSA layer's masked form's,
    ``dsa_attention_saved_bytes``).

    ``fp8_cache`` (flyer's FP8 training with its FP8 activation cache, ``flyer.fp8.linear``): without recomputation,
    every FFN (routed, shared, dense) keeps its input's and its SwiGLU inputs' FP8 tiles, a byte an element, as the
    recipe above; a MoE's router still keeps its normed input.

    LongCat-Flash (``shortcut_moe``; ``moe`` is then ignored): every block's dense FFN, and on a pair's first block
    (``layer_id`` even, or None: the heavier) the shortcut MoE, which reads the dense FFN's normed input.
    """
    e, d = bytes_per_element, cfg.dim
    hyper = 2 * hyper_connection_saved_bytes(cfg, e, e if recompute else 4)  # around the attention and the FFN
    attn = attention_saved_bytes(cfg, layer_id, e, recompute, mla_recompute, fp8_cache, seq_len, packed)
    inverse_rms = 0 if recompute or fp8_cache else 4  # the FFN norm's, FP32
    if not cfg.shortcut_moe:
        return attn + _ffn_saved(cfg, moe, recompute, fp8_cache, e) + inverse_rms + hyper
    ffn = _ffn_saved(cfg, False, recompute, fp8_cache, e)
    if layer_id is None or cfg.has_shortcut_moe(layer_id):
        # the norm's input is the dense FFN's, and in FP32 its output too (below, each casts a copy of its own)
        shared = 0 if recompute or fp8_cache else 4 * d * (2 if e == 4 else 1)
        ffn += _ffn_saved(cfg, True, recompute, fp8_cache, e) - shared
    return attn + ffn + inverse_rms + hyper


def attention_saved_bytes(cfg: ModelConfig, layer_id: int | None, e: int, recompute: bool = False,
                          mla_recompute: bool = False, fp8_cache: bool = False, seq_len: int | None = None,
                          packed: bool = False) -> float:
    """Bytes per token an attention layer and its norm keep for backward (``activation_bytes_per_token_layer``'s
    attention, its arguments). Under ``fp8_cache`` the generic count: a DSA layer's gathered form keeps less than
    its per-head q, k and v, what its own count gives with every element a byte (FP8 tiles) where that is lower."""
    exact = not recompute and not fp8_cache  # FP8 linear layers keep FP8 tiles: the generic count, lower
    dsa = cfg.attn == "mla" and cfg.index_topk and seq_len is not None
    layer = cfg.n_layers if layer_id is None else layer_id
    if cfg.attn == "hybrid" and exact:
        return hybrid_attention_saved_bytes(cfg, layer_id, e)
    if cfg.attn == "mla" and not cfg.index_topk and exact:
        return mla_attention_saved_bytes(cfg, e, mla_recompute)
    if dsa and exact:
        return dsa_attention_saved_bytes(cfg, layer, seq_len, e, packed, mla_recompute)
    if cfg.attn == "gqa" and exact:
        return gqa_attention_saved_bytes(cfg, e, layer_id, seq_len)
    generic = _attention_saved(cfg, recompute, layer_id, mla_recompute) * e
    if dsa and not recompute and dsa_gathers(cfg, seq_len, training=True):
        return min(generic, dsa_attention_saved_bytes(cfg, layer, seq_len, 1, packed, mla_recompute))
    return generic


def _attention_saved(cfg: ModelConfig, recompute: bool, layer_id: int | None, mla_recompute: bool) -> int:
    """Elements per token an attention layer saves (``activation_bytes_per_token_layer``): MLA, GQA, and hybrid
    attention under DeepSeek-V3's recomputation."""
    d, h = cfg.dim, cfg.n_heads
    if cfg.attn == "hybrid":
        qk = v = cfg.head_dim
        latents = cfg.q_lora_rank + cfg.head_dim + cfg.o_groups * cfg.o_lora_rank + _compressor_saved(cfg, layer_id)
        qkv = h * qk + cfg.head_dim
    elif cfg.attn == "mla":
        qk, v = cfg.qk_head_dim, cfg.v_head_dim
        latents = cfg.q_lora_rank + cfg.kv_lora_rank + cfg.qk_rope_head_dim
        qkv = 0 if mla_recompute else h * (2 * qk + v)  # a DSA layer's gathered form keeps q: under its count
    else:
        qk = v = cfg.head_dim
        latents = 0
        qkv = h * qk + 2 * cfg.n_kv_heads * qk
    return d + latents + h * v + h if recompute else 2 * d + latents + qkv + h * v + h


def mla_attention_saved_bytes(cfg: ModelConfig, bytes_per_element: int, recompute_up: bool = False) -> int:
    """Bytes per token that a dense MLA layer (``flyer.model.attention.MLA`` without DSA's indexer) and its norm keep
    for backward, each in ``bytes_per_element`` but the FP32 ones: its input (the residual stream, FP32 in every
    precision) and normed input (D each); the query latent and its normed copy (R each; none without a query LoRA);
    ``wkv_a``'s output [c_KV | k_rope] and the normed c_KV; each head's q and k as wide as the wider of the query/key
    and value heads (SDPA's fused kernels take one width: ``causal_attention`` zero-pads the narrower), and v so padded,
    or where it is the wider ``wkv_b``'s whole output, of which it is a view; the fused attention's output at that width
    and its FP32 log-sum-exp (one a head), and where v is the narrower the copy of its first v channels that ``wo``
    reads; the norms' FP32 inverse RMS.
    ``recompute_up`` (``flyer train --recompute mla``, ``flyer.model.recompute``): the latents' norms, q, k and v
    are recomputed in backward, so neither they nor the norms' inverse RMS are kept."""
    e, H, R, v = bytes_per_element, cfg.n_heads, cfg.q_lora_rank, cfg.v_head_dim
    wide = max(cfg.qk_head_dim, v)
    attended = H * wide + (H * v if v < wide else 0)  # wo reads a copy of the first v channels, or the output
    kept = 4 * cfg.dim + e * (cfg.dim + R + cfg.kv_lora_rank + cfg.qk_rope_head_dim + attended) + 4 * H + 4
    if not recompute_up:
        values = H * wide if v < wide else H * (cfg.qk_nope_head_dim + v)  # padded, or a view of wkv_b's output
        kept += e * (R + cfg.kv_lora_rank + 2 * H * wide + values) + 4 * (2 if R else 1)
    return kept


def dsa_attention_saved_bytes(cfg: ModelConfig, layer_id: int, seq_len: int, bytes_per_element: int,
                              packed: bool = False, recompute_up: bool = False) -> int:
    """Bytes per token that a DSA layer (``flyer.model.attention.MLA`` with the lightning indexer, or a GLM-5 layer
    sharing a full layer's selection) and its norm keep for backward over T = ``seq_len`` tokens, each in
    ``bytes_per_element`` but the FP32 ones. Its indexer selects without autograd and keeps nothing (but under L_I:
    ``indexer_loss_saved_bytes_per_token``).

    - T <= index_topk: no query selects, and the layer keeps what dense MLA keeps (``mla_attention_saved_bytes``).
    - The masked form (``flyer.model.dsa_chunks.dsa_gathers`` false under autograd): that, plus the (T, T) visibility
      mask, which SDPA keeps as an additive bias in the compute dtype: T elements a query. With ``recompute_up``
      (``--recompute mla``, its indexer not training) what dense MLA keeps so, and the bool mask the region keeps, T
      bytes a query (a shared layer's region holds its full layer's; not counted where that full layer trains its
      indexer, recomputing nothing, and the shared layers' regions keep its bool mask alive). Where SDPA runs the
      masked form on its math path instead of a fused kernel (a CPU does for some head widths: values wider than
      q's) it keeps the scores too: more.
    - The gathered form recomputes each query chunk in backward and keeps what the chunks start from: its input (the
      residual stream, FP32) and normed input (D each), the query latent and its normed copy (R each), ``wkv_a``'s
      output and the gathered [c_KV | k_rope] (kv_lora_rank + rope each), the queries [q_nope | q_rope] (H
      qk_head_dim), the output ``wo`` reads (H v), the norms' FP32 inverse RMS and, in a layer with an indexer of its
      own, its int32 picks (index_topk a query; a shared layer holds its full layer's). One chunk (T <=
      ``flyer.model.hybrid_chunks.CHUNK_ROWS``, where only toy models gather) keeps its whole graph: more.

    ``packed`` (``flyer train --pack``): each document runs as a row of its own, so its length, up to T, picks the
    form; the least of the forms its documents may take, a lower bound (a packed row also keeps its documents'
    index bookkeeping). Its documents run without the recomputation."""
    e, H, R = bytes_per_element, cfg.n_heads, cfg.q_lora_rank
    recompute_up = recompute_up and not packed
    dense = mla_attention_saved_bytes(cfg, e, recompute_up)
    if seq_len <= cfg.index_topk:
        return dense
    if not dsa_gathers(cfg, seq_len, training=True):
        mask = (1 if cfg.has_indexer(layer_id) else 0) if recompute_up else e  # bytes a key and query
        return dense if packed else dense + mask * seq_len
    latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    picks = 4 * cfg.index_topk if cfg.has_indexer(layer_id) else 0
    gathered = (4 * cfg.dim + e * (cfg.dim + 2 * R + 2 * latent + H * (cfg.qk_head_dim + cfg.v_head_dim))
                + 4 * (3 if R else 2) + picks)
    return min(dense, gathered) if packed else gathered


def gqa_attention_saved_bytes(cfg: ModelConfig, bytes_per_element: int, layer_id: int | None = None,
                              seq_len: int | None = None) -> int:
    """Bytes per token that a grouped-query attention layer (``flyer.model.attention.GQA``) and its norm keep for
    backward, each in ``bytes_per_element`` but the FP32 ones: its input (the residual stream, FP32) and normed input
    (D each); the rotated queries and the keys and values repeated to every query head (H head_dim each: SDPA's
    fused kernels take as many key heads as query heads), the attention's output, which ``wo`` reads, and its FP32
    log-sum-exp; with ``qk_norm`` the queries' and keys' projections and their heads' FP32 inverse RMS; the norm's
    FP32 inverse RMS. A sliding layer (``layer_id``) over ``seq_len`` tokens that its windowed attention splits
    into chunks (``window_chunks``) keeps their outputs besides the copy ``wo`` reads (and one visibility band, shared
    by the layers, not counted a token)."""
    e, H, KV, hd = bytes_per_element, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    kept = 4 * cfg.dim + e * (cfg.dim + 4 * H * hd) + 4 * H + 4
    if cfg.qk_norm:
        kept += (e * hd + 4) * (H + KV)
    if layer_id is not None and seq_len is not None and window_chunks(cfg.window(layer_id), seq_len):
        kept += e * H * hd
    return kept


def hybrid_attention_saved_bytes(cfg: ModelConfig, layer_id: int | None, bytes_per_element: int) -> float:
    """Bytes per token that DeepSeek-V4's hybrid attention of layer ``layer_id`` (``flyer.model.hybrid``; None: a
    CSA layer, the heaviest) and its norm keep for backward, each in ``bytes_per_element`` but the FP32 ones:

    - its input (collapsed from the streams: FP32 in every precision) and normed input (D each), the query latent
      and its normed copy (R each), q, its RoPE'd copy and each head's scale (2 H d + H; the scale is recomputed in
      backward from q), the key/value head and its RoPE'd copy (2 d), the heads' outputs rotated back (H d) and
      the grouped output latent (o_groups o_lora_rank);
    - the three norms' inverse RMS (FP32);
    - with a compressor of ratio r (c = 2 series for CSA, else 1): the window slots' kv (c d), the gate's softmax
      (c d in FP32, and its copy in the forward's dtype below FP32), and per r tokens the pooled entry, its norm's
      inverse RMS (FP32) and its RoPE'd copy.

    Not counted: what each query chunk's visibility takes (``flyer.model.hybrid_chunks``: a CSA chunk's bool mask
    over its band and entries, n_keys + n_entries bytes a query, or its picks, 4 index_topk), and with one chunk its
    scores, which the chunks otherwise recompute in backward. The indexer keeps nothing but under its L_I
    (``indexer_loss_saved_bytes_per_token``): it selects without autograd."""
    e, H, d = bytes_per_element, cfg.n_heads, cfg.head_dim
    r = cfg.csa_ratio if layer_id is None else compress_ratio(cfg, layer_id)
    kept = 4 * cfg.dim + e * (cfg.dim + 2 * cfg.q_lora_rank + 3 * H * d + H + 2 * d + cfg.o_groups * cfg.o_lora_rank)
    kept += 3 * 4  # the norms' inverse RMS
    if r:
        c = 2 if r == cfg.csa_ratio else 1
        kept += c * d * (e + 4 + (e if e < 4 else 0)) + (2 * d * e + 4) / r
    return kept


def hyper_connection_saved_bytes(cfg: ModelConfig, bytes_per_element: int, stream_bytes: int = 4) -> int:
    """Bytes per token one hyper-connection (``flyer.model.hyper``: around an attention or an FFN block) keeps
    for backward beside its block's input: the m input streams its mix reads (FP32 in every precision, as the
    residual stream; below FP32 also the copy the streams' update multiplies), the block's output, which the update
    keeps for post's gradient, and the mix's m (m + 2) values (``bytes_per_element`` each; the mix's normalised
    streams are recomputed in backward); in FP32 the maps' intermediates: pre, its sigmoid and post's, and each of
    the 2 I - 1 Sinkhorn divisions' denominator (m each), comb's softmax, its first normalisation and the divisions'
    numerators (m^2 each, 2 I in all, for I ``hc_sinkhorn_iters``); and post and comb as the update reads them (m
    in the streams' dtype, m^2 ``bytes_per_element``). ``stream_bytes``: the streams' element size, FP32 in flyer's
    training; DeepSeek-V3's recipe (``activation_bytes_per_token_layer``'s ``recompute``) keeps them in the
    forward's dtype. 0 without hyper-connections."""
    m, e, s, iters = cfg.hc_mult, bytes_per_element, stream_bytes, cfg.hc_sinkhorn_iters
    if m == 1:
        return 0
    streams = m * cfg.dim * s + (m * cfg.dim * e if s != e else 0)  # and the update's copy in the forward's dtype
    maps = 4 * (m * (2 * iters + 2) + m * m * 2 * iters)
    return streams + cfg.dim * e + m * (m + 2) * e + maps + m * s + m * m * e


def expert_weights_saved_bytes(cfg: ModelConfig, bytes_per_element: int) -> int:
    """Bytes of one routed expert's weights that its GEMMs keep for backward, made anew in each forward
    (``flyer.model.experts``), besides the activations: in FP32 (4-byte elements) w1|w3 stacked into one copy,
    2 F D of them (w2 is read as it is); in BF16 all three cast, 3 F D."""
    F_, D = cfg.moe_inter_dim, cfg.dim
    return 2 * F_ * D * 4 if bytes_per_element == 4 else 3 * F_ * D * bytes_per_element


def _ffn_saved(cfg: ModelConfig, moe: bool, recompute: bool, fp8_cache: bool, e: int) -> float:
    """Bytes per token an FFN saves (``activation_bytes_per_token_layer``), for elements of ``e`` bytes: with
    recomputation the FP8-cached expert and SwiGLU inputs and the router's scores; with ``fp8_cache`` also the normed
    input a MoE's router keeps and the picks' outputs. Without either what flyer's keeps: its norm's input (the FP32
    residual stream) and output as its GEMMs read it (below FP32 a copy; a MoE's router reads the FP32 output too, which
    it keeps); the dense FFN's or shared experts' projections and product (``flyer.model.experts.kept_swiglu``); per
    routed pick its input, gate/up outputs, product and output (the fused kernels and ``torch._grouped_mm`` alike); and
    the router's FP32 scores (and the logits under DeepSeek-V4's sqrt(softplus)). Not counted: the router's picks and
    the experts' row bookkeeping, integers a few a pick, nor an expert kernel's row padding."""
    experts = cfg.n_activated_experts + cfg.n_shared_experts if moe else 1
    inter = cfg.moe_inter_dim if moe else cfg.inter_dim
    router = cfg.n_route_columns if moe else 0  # the router's scores (LongCat-Flash's zero experts' too)
    if recompute:
        return (experts * 0.5 * (cfg.dim + 2 * inter) + router) * e
    outputs = cfg.n_activated_experts * cfg.dim if moe else 0  # each pick's output: its gate weight's gradient
    if fp8_cache:
        return (cfg.dim * moe + experts * 0.5 * (cfg.dim + 2 * inter) + router + outputs) * e
    mlp = 3 * (cfg.n_shared_experts * cfg.moe_inter_dim if moe else cfg.inter_dim)
    routed = cfg.n_activated_experts * (cfg.dim + 3 * inter) if moe else 0
    scores = (2 if cfg.score_func == "sqrtsoftplus" else 1) * router
    router_input = 4 * cfg.dim if moe and e < 4 else 0  # the FP32 normed input the router reads, beside the copy
    return 4 * cfg.dim + router_input + e * (cfg.dim + mlp + routed + outputs) + 4 * scores


def _compressor_saved(cfg: ModelConfig, layer_id: int | None) -> int:
    """Per token, a hybrid layer's compressor kv and gate projections (c head_dim each) and, for CSA, the
    indexer's query heads, weights and key compressor's projections."""
    r = cfg.csa_ratio if layer_id is None else compress_ratio(cfg, layer_id)
    if not r:
        return 0
    if r != cfg.csa_ratio:
        return 2 * cfg.head_dim
    Hi, di = cfg.index_n_heads, cfg.index_head_dim
    return 4 * cfg.head_dim + Hi * di + Hi + 4 * di


def indexer_loss_saved_bytes_per_token(cfg: ModelConfig, layer_id: int, indexer_train: str, bytes_per_element: int,
                                       seq_len: int, fp8_cache: bool = False) -> float:
    """Bytes per token that layer ``layer_id``'s L_I (``flyer train --indexer-train``: ``flyer.model.indexer_loss``,
    ``flyer.model.hybrid_indexer_loss``) keeps for backward besides what its block saves
    (``activation_bytes_per_token_layer``); 0 when "off" or for a layer without an indexer of its own. What the code
    keeps per token, each in the forward's dtype (``bytes_per_element``) but the keys:

    - the indexer's keys in FP32 (a CSA layer's: its entries', index_head_dim / csa_ratio channels a token); the
      keys' projections are recomputed in backward from the indexer's input x, which is kept;
    - in the warm-up, whose frozen block saves nothing itself, that input x and the query latent; in sparse training
      too under FP8 with its FP8 activation cache (``fp8_cache``), whose linear layers keep FP8 tiles of them
      (otherwise the block saves both);
    - once the layer's ``seq_len`` tokens (an MTP block's T - k) exceed one query chunk (``CHUNK_ROWS``, or a wider
      window: several chunks, each recomputed in backward), the target's inputs each chunk reads again: a DSA
      layer's queries of every head and its latents [c_KV | k_rope]; in a CSA warm-up the queries, the tokens' key
      and the entries (a sparse run's block saves these too).
    One chunk keeps its scores instead (quadratic in T, not estimated), as may a micro-batch whose scores' budget
    cuts T <= ``CHUNK_ROWS`` into chunks: there the estimate is a lower bound."""
    if indexer_train == "off":
        return 0.0
    warm, e, di = indexer_train == "warmup", bytes_per_element, cfg.index_head_dim
    inputs = e * (cfg.dim + cfg.q_lora_rank) if warm or fp8_cache else 0
    if cfg.has_indexer(layer_id):
        chunked = seq_len > CHUNK_ROWS
        target = e * (cfg.n_heads * cfg.qk_head_dim + cfg.kv_lora_rank + cfg.qk_rope_head_dim) if chunked else 0
        return 4 * di + inputs + target
    if cfg.is_csa(layer_id):
        r, hd = cfg.csa_ratio, cfg.head_dim
        chunked = seq_len > max(CHUNK_ROWS, cfg.window_size)
        target = e * (cfg.n_heads * hd + hd + hd / r) if warm and chunked else 0
        return 4 * di / r + inputs + target
    return 0.0


def head_saved_bytes(cfg: ModelConfig, tokens: int) -> int:
    """Bytes the main and MTP heads' losses keep for backward over ``tokens`` tokens: the fused cross-entropy
    (``flyer.model.loss``) computes its gradients in the forward and keeps them instead of the logits, the FP32 head
    weight's (V, D) and the FP32 hidden states' (tokens, D) per head; the logits exist a chunk of rows at a time."""
    return (1 + cfg.mtp_depth) * (cfg.vocab_size + tokens) * cfg.dim * 4 if tokens else 0


def memory_per_gpu(cfg: ModelConfig, lay: Layout, seq_len: int, hbm_gib: float) -> dict:
    """Bytes per GPU on the heaviest pipeline stage, split by kind (see module docstring)."""
    validate_layout(cfg, lay)
    moe = cfg.is_moe
    layers = math.ceil(cfg.n_layers / lay.pp)
    # a layer of the heaviest kind: an MoE layer, and with hybrid attention the largest compressor
    heavy_layer = max(range(cfg.n_dense_layers if moe else 0, cfg.n_layers), key=lambda i: block_params(cfg, i))
    layer_total = block_params(cfg, heavy_layer)
    routed = cfg.n_routed_experts * 3 * cfg.dim * cfg.moe_inter_dim if moe else 0
    # a sliding GQA layer of that kind keeps more past one query chunk (``gqa_attention_saved_bytes``)
    sliding = [i for i in cfg.sliding_layers if block_params(cfg, i) == layer_total][:1]
    per_token = max(activation_bytes_per_token_layer(cfg, moe, lay.recompute, lay.activation_bytes, i,
                                                     seq_len=seq_len) for i in [heavy_layer, *sliding])
    if cfg.shortcut_moe:  # whole pairs a stage, one shortcut MoE each: per block half a pair
        layers = 2 * math.ceil(cfg.n_layers / 2 / lay.pp)
        layer_total, routed = (block_params(cfg, 0) + block_params(cfg, 1)) / 2, routed / 2
        per_token = sum(activation_bytes_per_token_layer(cfg, moe, lay.recompute, lay.activation_bytes, i,
                                                         seq_len=seq_len) for i in (0, 1)) / 2
    pc = param_counts(cfg)
    ends = pc.embedding + pc.head if lay.pp == 1 else max(pc.embedding, pc.head)
    dense_params = layers * (layer_total - routed) + ends + cfg.dim + hyper_head_params(cfg)
    expert_params = layers * routed // lay.ep
    cost = schedule_cost(lay.schedule, lay.pp) if lay.pp > 1 else schedule_cost("1f1b", 1)
    copies = cost.param_copies
    params = copies * (dense_params + expert_params)
    weights = params * lay.weight_bytes
    grads = params * lay.grad_bytes
    optimizer = copies * (dense_params / lay.dp + expert_params / lay.expert_dp) * lay.optimizer_bytes
    activations = cost.activation_microbatches * lay.micro_batch * seq_len * layers * per_token
    total = weights + grads + optimizer + activations
    return {
        "pp": lay.pp, "ep": lay.ep, "dp": lay.dp, "expert_dp": lay.expert_dp, "schedule": lay.schedule,
        "micro_batch": lay.micro_batch, "recompute": lay.recompute, "layers_per_stage": layers,
        "params_per_gpu": int(params),
        "weights_gib": weights / GIB, "gradients_gib": grads / GIB, "optimizer_gib": optimizer / GIB,
        "activations_gib": activations / GIB, "total_gib": total / GIB, "hbm_gib": hbm_gib,
        "fits": total / GIB <= hbm_gib,
    }


def require_finite(field: str, **results: float) -> None:
    """Raise ``FieldError(field)`` when one of ``results`` (name -> a value computed from ``field``)
    is not finite: the one check that keeps inf and NaN out of ``flyer plan``'s table and JSON."""
    for name, value in results.items():
        if not math.isfinite(value):
            raise FieldError(field, f"makes {name.replace('_', ' ')} non-finite ({value}); "
                                    f"use a value that keeps it finite")


@dataclass(frozen=True)
class Throughput:
    """A measured cluster throughput (tokens per day, or seconds per optimizer step of ``batch_tokens`` tokens:
    DeepSeek-V3's 19.926 s for 15,360 sequences of 4,096) or an assumed MFU."""

    tokens_per_day: float | None = None
    mfu: float | None = None
    step_seconds: float | None = None
    batch_tokens: float | None = None

    @property
    def source(self) -> str:
        """The field the throughput comes from."""
        return "tokens_per_day" if self.tokens_per_day is not None else "step_seconds" \
            if self.step_seconds is not None else "mfu"

    def tokens_per_s_per_gpu(self, gpus: int, flops_per_token: float, peak_flops: float) -> float:
        if self.tokens_per_day is not None:
            if self.tokens_per_day <= 0:
                raise FieldError("tokens_per_day", f"must be > 0 (got {self.tokens_per_day})")
            return self.tokens_per_day / SECONDS_PER_DAY / gpus
        if self.step_seconds is not None:
            if not self.batch_tokens or self.batch_tokens <= 0:
                raise FieldError("batch_size", "needed with step_seconds: the sequences one step trains on")
            if self.step_seconds <= 0:
                raise FieldError("step_seconds", f"must be > 0 (got {self.step_seconds})")
            return self.batch_tokens / self.step_seconds / gpus
        mfu = 0.4 if self.mfu is None else self.mfu
        if not 0 < mfu <= 1:
            raise FieldError("mfu", f"must be in (0, 1] (got {mfu})")
        return mfu * peak_flops / flops_per_token


def plan(cfg: ModelConfig, gpu: GPUSpec, lay: Layout, tokens: float, seq_len: int, throughput: Throughput,
         price_per_gpu_hour: float = 2.0, extra_gpu_hours: float = 0.0, indexer_train: str = "off") -> dict:
    """Everything ``flyer plan`` prints, as one flat dict (memory nested under ``memory``); the FLOPs count DSA
    indexers as ``flyer train --indexer-train`` trains them (``indexer_train``)."""
    if tokens <= 0:
        raise FieldError("tokens", f"must be > 0 (got {tokens})")
    if seq_len < 1:
        raise FieldError("seq_len", f"must be >= 1 (got {seq_len})")
    for name, value in (("price_per_gpu_hour", price_per_gpu_hour), ("extra_gpu_hours", extra_gpu_hours)):
        if value < 0:
            raise FieldError(name, f"must be >= 0 (got {value})")
    check_indexer_train(indexer_train, cfg)
    validate_layout(cfg, lay)
    if lay.gpus > gpu.gpus_per_node and lay.gpus % gpu.gpus_per_node:
        # nothing below depends on the node size; say so rather than pass the partial node silently
        full, rest = divmod(lay.gpus, gpu.gpus_per_node)
        warnings.warn(f"{lay.gpus} GPUs are {full} nodes of {gpu.gpus_per_node} and a partial node of {rest}; "
                      f"the plan counts GPUs, not nodes", stacklevel=2)
    pc = param_counts(cfg)
    causal = training_flops_per_token(cfg, seq_len, causal=True, indexer_train=indexer_train)
    noncausal = training_flops_per_token(cfg, seq_len, causal=False, indexer_train=indexer_train)
    peak = gpu.bf16_tflops * 1e12
    require_finite("hw", bf16_peak_flops=peak)
    tps = throughput.tokens_per_s_per_gpu(lay.gpus, causal, peak)
    source = throughput.source
    # causal FLOPs are the ones a run executes (masked attention is skipped), so they bound MFU
    mfu = causal / peak * tps  # in this order: finite for any finite throughput
    if source != "mfu" and mfu > 1:
        raise FieldError(source, f"{tps * lay.gpus * SECONDS_PER_DAY:g} tokens/day on {lay.gpus} {gpu.name}s "
                                 f"implies MFU {100 * mfu:.4g}% of their {gpu.bf16_tflops:g} TFLOPS BF16 peak (at "
                                 f"most 100%)")
    # tokens / (tokens per GPU-second) = GPU-seconds; a throughput that underflowed to 0 takes forever
    train_hours = tokens / (tps * 3600.0) if tps > 0 else math.inf
    wall_s = tokens / (tps * lay.gpus) if tps > 0 else math.inf
    # finite inputs overflow in this order: a throughput under ~1 token/s/GPU, then the sums, then the price
    require_finite(source, training_gpu_hours=train_hours, days=wall_s / SECONDS_PER_DAY,
                   tokens_per_day=tps * lay.gpus * SECONDS_PER_DAY)
    gpu_hours = train_hours + extra_gpu_hours
    require_finite("extra_gpu_hours", gpu_hours=gpu_hours)
    require_finite("price_per_gpu_hour", cost_usd=gpu_hours * price_per_gpu_hour)
    return {
        "gpu": gpu.name,
        "gpus": lay.gpus,
        "gpus_per_node": gpu.gpus_per_node,
        "tokens": tokens,
        "seq_len": seq_len,
        "throughput_source": source,
        "total_params": pc.total,
        "activated_params": pc.activated,
        "mtp_params": pc.mtp,
        "mtp_params_stored": mtp_params_stored(cfg),  # V3's layout: with each module's embedding and head
        "activated_params_without_embedding": pc.activated - pc.embedding,  # DeepSeek's papers' count (37B for V3)
        "flops_per_token_causal": causal,  # the main model's, as the V3 paper counts them (MFU is of these)
        "flops_per_token_noncausal": noncausal,
        "indexer_train": indexer_train,
        "flops_per_token_mtp": mtp_training_flops_per_token(cfg, seq_len, indexer_train),  # the MTP modules'
        "tokens_per_s_per_gpu": tps,
        "tokens_per_day": tps * lay.gpus * SECONDS_PER_DAY,
        "tflops_per_gpu_causal": causal * tps / 1e12,
        "tflops_per_gpu_noncausal": noncausal * tps / 1e12,
        "mfu_causal": causal * tps / peak,
        "mfu_noncausal": noncausal * tps / peak,
        "peak_bf16_tflops": gpu.bf16_tflops,
        "training_gpu_hours": train_hours,
        "extra_gpu_hours": extra_gpu_hours,
        "gpu_hours": gpu_hours,
        "gpu_hours_per_trillion_tokens": train_hours / (tokens / 1e12),
        "days": wall_s / SECONDS_PER_DAY,
        "price_per_gpu_hour": price_per_gpu_hour,
        "cost_usd": gpu_hours * price_per_gpu_hour,
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(cfg),
        "kv_cache_window_bytes": kv_window_bytes(cfg),  # per sequence, beside the per-token bytes (hybrid)
        "memory": memory_per_gpu(cfg, lay, seq_len, gpu.hbm_gib),
    }
