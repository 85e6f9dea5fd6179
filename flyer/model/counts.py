"""Closed-form parameter counts, KV cache sizes and FLOPs per token for a ``ModelConfig``.

These are the numbers ``flyer info`` and ``flyer plan`` report. ``flyer.model.info.meta_counts``
counts the same things from a model built on the meta device; a test holds the two together for
every preset. Pure arithmetic on the config: the cluster models use it without building a model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from flyer.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    total: int  # main model (embedding, blocks, final norm, head); MTP excluded
    activated: int  # main-model parameters one token touches (K routed + shared experts)
    mtp: int  # the MTP modules' own parameters (embedding and head are shared)
    embedding: int
    head: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def attention_params(cfg: ModelConfig) -> int:
    D, H = cfg.dim, cfg.n_heads
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
    return q + kv + H * cfg.v_head_dim * D + indexer_params(cfg)


def indexer_params(cfg: ModelConfig) -> int:
    """The DSA indexer's (``index_topk > 0``): wq_b from the query latent, wk, k_norm (weight and bias)
    and weights_proj; 0 without one."""
    if cfg.index_topk == 0:
        return 0
    Hi, d = cfg.index_n_heads, cfg.index_head_dim
    return cfg.q_lora_rank * Hi * d + cfg.dim * d + 2 * d + cfg.dim * Hi


def _moe_params(cfg: ModelConfig, activated: bool) -> int:
    expert = 3 * cfg.dim * cfg.moe_inter_dim
    routed = cfg.n_activated_experts if activated else cfg.n_routed_experts
    return cfg.n_routed_experts * cfg.dim + (routed + cfg.n_shared_experts) * expert


def block_params(cfg: ModelConfig, layer_id: int, activated: bool = False) -> int:
    norms = 2 * cfg.dim
    if layer_id < cfg.n_dense_layers or cfg.n_routed_experts == 0:
        ffn = 3 * cfg.dim * cfg.inter_dim
    else:
        ffn = _moe_params(cfg, activated)
    return norms + attention_params(cfg) + ffn


def param_counts(cfg: ModelConfig) -> ParamCounts:
    emb = cfg.vocab_size * cfg.dim
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim
    total = emb + head + cfg.dim + sum(block_params(cfg, i) for i in range(cfg.n_layers))
    act = emb + head + cfg.dim + sum(block_params(cfg, i, activated=True) for i in range(cfg.n_layers))
    mtp = cfg.mtp_depth * (3 * cfg.dim + 2 * cfg.dim * cfg.dim + block_params(cfg, cfg.n_layers))
    return ParamCounts(total=total, activated=act, mtp=mtp, embedding=emb, head=head)


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_element: int = 2, absorbed: bool = True) -> int:
    """Bytes cached per token over all layers.

    MLA (absorbed decode) caches the latent c_KV and the shared rope key; the naive MLA path
    (``absorbed=False``) caches full per-head keys and values; GQA caches K and V per KV head. With
    DeepSeek Sparse Attention each layer also caches the token's indexer key (``index_head_dim``), in
    either MLA path: the indexer scores every earlier key at each step.
    """
    if cfg.attn == "gqa":
        per_layer = 2 * cfg.n_kv_heads * cfg.head_dim
    elif absorbed:
        per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    else:
        per_layer = cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    if cfg.index_topk:
        per_layer += cfg.index_head_dim
    return cfg.n_layers * per_layer * bytes_per_element


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Forward FLOPs per token of one layer's attention core (the projections are matmul parameters):
    2 H (qk_head_dim + v_head_dim) per attended key, a query seeing seq_len / 2 keys on average when
    causal. With DeepSeek Sparse Attention a query attends to its index_topk selected keys at most
    (causal: k - k^2 / (2 seq_len) on average past seq_len = k), while the indexer scores every key it
    sees: 2 H_index (index_head_dim + 1) each (the heads' dot products, then their weighted sum)."""
    qk, v = (cfg.qk_head_dim, cfg.v_head_dim) if cfg.attn == "mla" else (cfg.head_dim, cfg.head_dim)
    seen = seq_len / 2 if causal else seq_len
    attended, k = seen, cfg.index_topk
    if k and k < seq_len:
        attended = k - k * k / (2 * seq_len) if causal else k
    flops = 2 * cfg.n_heads * (qk + v) * attended
    if k:
        flops += 2 * cfg.index_n_heads * (cfg.index_head_dim + 1) * seen
    return flops


def training_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward), MTP excluded:
    3 x [2 x activated matmul parameters (head included, embedding excluded)
         + layers x ``attention_flops_per_token``]."""
    pc = param_counts(cfg)
    matmul = pc.activated - pc.embedding - _non_matmul_params(cfg)
    return 3.0 * (2.0 * matmul + cfg.n_layers * attention_flops_per_token(cfg, seq_len, causal))


def _non_matmul_params(cfg: ModelConfig) -> int:
    """Norm weights and attention biases (parameters that are not GEMM operands)."""
    norms = cfg.dim + cfg.n_layers * 2 * cfg.dim
    if cfg.attn == "mla":
        norms += cfg.n_layers * (cfg.kv_lora_rank + (cfg.q_lora_rank if cfg.q_lora_rank else 0))
        if cfg.index_topk:  # the indexer's key LayerNorm, weight and bias
            norms += cfg.n_layers * 2 * cfg.index_head_dim
    else:
        if cfg.attn_bias:
            norms += cfg.n_layers * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        if cfg.qk_norm:
            norms += cfg.n_layers * 2 * cfg.head_dim
    return norms
