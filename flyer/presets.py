"""The model presets: each one's fields over ``flyer.config.ModelConfig``'s defaults (DeepSeek-V3's), from "tiny"
(trains on a CPU in seconds) to the published configs. No imports: ``flyer.config`` reads them."""

from __future__ import annotations

from typing import Any

_NO_YARN = dict(rope_factor=1.0)
_DENSE = dict(n_routed_experts=0, n_shared_experts=0, mtp_depth=0, q_lora_rank=0)

_DSV4_FLASH = dict(
    vocab_size=129280, dim=4096, n_layers=43, n_dense_layers=0, attn="hybrid", n_heads=64, head_dim=512,
    q_lora_rank=1024, qk_rope_head_dim=64, window_size=128, compress_ratios=(0, 0) + (4, 128) * 20 + (4,),
    o_groups=8, o_lora_rank=1024, index_topk=512, index_n_heads=64, index_head_dim=128, hc_mult=4,
    moe_inter_dim=2048, n_routed_experts=256, n_shared_experts=1, n_activated_experts=6, n_expert_groups=1,
    n_limited_groups=1, score_func="sqrtsoftplus", route_scale=1.5, n_hash_layers=3, swiglu_limit=10.0,
    max_seq_len=1048576, rope_factor=16.0, original_seq_len=65536, mscale=0.0, mtp_depth=1, init_std=0.02,
)

# CPU presets: gamma 0.01 (V3: 0.001), or the bias lags few large AdamW steps and routing collapses onto one expert.
PRESETS: dict[str, dict[str, Any]] = {
    # a few M parameters; trains on a CPU in seconds
    "tiny": dict(
        vocab_size=2048, dim=128, n_layers=4, n_dense_layers=1, inter_dim=384, n_heads=4,
        q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        moe_inter_dim=64, n_routed_experts=16, n_shared_experts=1, n_activated_experts=4,
        n_expert_groups=4, n_limited_groups=2, route_scale=2.5, max_seq_len=1024, original_seq_len=1024,
        mtp_depth=1, init_std=0.02, bias_update_speed=0.01, **_NO_YARN,
    ),
    # ~58M parameters (+10M in its MTP module), 32 routed experts; the default CPU training model
    "small": dict(
        vocab_size=8192, dim=384, n_layers=6, n_dense_layers=1, inter_dim=1152, n_heads=6,
        q_lora_rank=192, kv_lora_rank=96, qk_nope_head_dim=48, qk_rope_head_dim=16, v_head_dim=48,
        moe_inter_dim=256, n_routed_experts=32, n_shared_experts=1, n_activated_experts=4,
        n_expert_groups=4, n_limited_groups=2, route_scale=2.5, max_seq_len=2048, original_seq_len=2048,
        mtp_depth=1, init_std=0.02, bias_update_speed=0.01, **_NO_YARN,
    ),
    # official DeepSeek-V2-Lite (15.7B total, 2.4B activated)
    "dsv2-lite": dict(
        vocab_size=102400, dim=2048, n_layers=27, n_dense_layers=1, inter_dim=10944, n_heads=16,
        q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        moe_inter_dim=1408, n_routed_experts=64, n_shared_experts=2, n_activated_experts=6,
        n_expert_groups=1, n_limited_groups=1, score_func="softmax", route_scale=1.0, norm_topk_prob=False,
        router_bias=False, seq_aux_alpha=0.001, max_seq_len=163840, rope_factor=40.0, original_seq_len=4096,
        beta_fast=32, beta_slow=1, mscale=0.707, mtp_depth=0, init_std=0.02,
    ),
    # official DeepSeek-V2 (236B total, 21B activated)
    "dsv2": dict(
        vocab_size=102400, dim=5120, n_layers=60, n_dense_layers=1, inter_dim=12288, n_heads=128,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        moe_inter_dim=1536, n_routed_experts=160, n_shared_experts=2, n_activated_experts=6,
        n_expert_groups=8, n_limited_groups=3, score_func="softmax", route_scale=16.0, norm_topk_prob=False,
        router_bias=False, seq_aux_alpha=0.003, max_seq_len=163840, rope_factor=40.0, original_seq_len=4096,
        beta_fast=32, beta_slow=1, mscale=0.707, mtp_depth=0, init_std=0.006,
    ),
    # official DeepSeek-V3 (671B total, 37B activated; its MTP module's own weights 11.6B, 14B as DeepSeek counts)
    "dsv3": dict(),
    # official DeepSeek-V3.2-Exp: V3 with DeepSeek Sparse Attention (a lightning indexer keeping 2048 keys per query)
    "dsv32": dict(index_topk=2048, index_n_heads=64, index_head_dim=128),
    # DeepSeek-V4's architecture at "tiny"'s size: window-only, CSA and HCA layers, 4 hyper-connection streams,
    # a hash-routed first layer; trains on a CPU in seconds
    "tiny-v4": dict(
        vocab_size=2048, dim=128, n_layers=4, n_dense_layers=0, attn="hybrid", n_heads=4, head_dim=64,
        q_lora_rank=64, qk_rope_head_dim=16, window_size=32, compress_ratios=(0, 4, 16, 4), o_groups=2,
        o_lora_rank=64, index_topk=16, index_n_heads=8, index_head_dim=32, hc_mult=4, moe_inter_dim=64,
        n_routed_experts=16, n_shared_experts=1, n_activated_experts=4, n_expert_groups=1, n_limited_groups=1,
        score_func="sqrtsoftplus", route_scale=1.5, n_hash_layers=1, swiglu_limit=10.0, max_seq_len=1024,
        original_seq_len=1024, mscale=0.0, mtp_depth=1, init_std=0.02, bias_update_speed=0.01, **_NO_YARN,
    ),
    # official DeepSeek-V4-Flash (284B total, 13B activated; one MTP module beside them): hybrid attention,
    # hyper-connections, hash-routed layers
    "dsv4-flash": _DSV4_FLASH,
    # official DeepSeek-V4-Pro (1.6T total, 49B activated): V4-Flash's design, wider and deeper
    "dsv4-pro": dict(
        _DSV4_FLASH, dim=7168, n_layers=61, n_heads=128, q_lora_rank=1536,
        compress_ratios=(128, 128) + (4, 128) * 29 + (4,), o_groups=16, index_topk=1024, moe_inter_dim=3072,
        n_routed_experts=384, route_scale=2.5,
    ),
    # dense GQA references
    "qwen2.5-72b": dict(
        vocab_size=152064, dim=8192, n_layers=80, n_dense_layers=80, inter_dim=29568, attn="gqa", n_heads=64,
        n_kv_heads=8, head_dim=128, attn_bias=True, rope_theta=1e6, max_seq_len=32768, original_seq_len=32768,
        norm_eps=1e-5, init_std=0.02, **_DENSE, **_NO_YARN,
    ),
    "llama3.1-405b": dict(
        vocab_size=128256, dim=16384, n_layers=126, n_dense_layers=126, inter_dim=53248, attn="gqa", n_heads=128,
        n_kv_heads=8, head_dim=128, rope_theta=5e5, max_seq_len=131072, norm_eps=1e-5, init_std=0.02, **_DENSE,
        # Llama 3.1's published config: 8K positions trained, stretched 8x by its llama3 RoPE scaling
        rope_type="llama3", rope_factor=8.0, original_seq_len=8192, low_freq_factor=1.0, high_freq_factor=4.0,
        mscale=0.0,  # as imported GQA models: softmax scale head_dim^-0.5, no YaRN factor
    ),
}
