"""Upper bounds of a model config's sizes, each far past any published or planned model (about 100x the largest),
so that a typo or a hostile config (``n_layers`` 1e8) is refused in one line before anything builds, counts or
loops over what it describes. ``ModelConfig.validate`` checks them all; the Hugging Face reader checks the layer
count before it builds its per-layer lists. No imports: both read them.
"""

MAX_LAYERS = 1 << 12  # 32x Llama 3.1 405B's 126 layers, 4x DeepNet's 1,000; built layer by layer (flyer info: ~8 s)
_WIDTH = 1 << 21  # 100x the widest hidden size published (MT-NLG: 20,480)
_HEAD = 1 << 16  # 128x the widest attention head (DeepSeek-V4: 512)
_HEADS = 1 << 14  # 128x the most attention heads (DeepSeek-V3, Llama 3.1 405B: 128)
_EXPERTS = 1 << 16  # 128x the most routed experts (Qwen3-Next: 512)
_POSITIONS = 1 << 30  # 100x the longest context (Llama 4 Scout: 10M tokens)

SIZE_LIMITS = {
    "vocab_size": 1 << 24,  # 64x the largest vocabulary (Gemma 3: 262,144)
    "n_layers": MAX_LAYERS,
    "mtp_depth": 1 << 7,  # 128x DeepSeek-V3's one MTP module; each is a block
    "dim": _WIDTH,
    "inter_dim": 1 << 23,  # 100x the widest FFN (PaLM: 73,728)
    "moe_inter_dim": 1 << 23,
    "q_lora_rank": _WIDTH,
    "kv_lora_rank": _WIDTH,
    "o_lora_rank": _WIDTH,
    "qk_nope_head_dim": _HEAD,
    "qk_rope_head_dim": _HEAD,
    "v_head_dim": _HEAD,
    "head_dim": _HEAD,
    "index_head_dim": _HEAD,
    "n_heads": _HEADS,
    "index_n_heads": _HEADS,
    "n_routed_experts": _EXPERTS,
    "n_zero_experts": _EXPERTS,
    "n_shared_experts": 1 << 8,  # 64x the most shared experts (Qwen1.5-MoE: 4)
    "hc_mult": 1 << 8,  # 64x DeepSeek-V4's 4 residual streams
    "hc_sinkhorn_iters": 1 << 12,  # 200x V4's 20: a loop in every block's forward
    "max_seq_len": _POSITIONS,
    "original_seq_len": _POSITIONS,
    "window_size": _POSITIONS,
    "index_topk": _POSITIONS,
    "csa_ratio": _POSITIONS,
}
# the fields SIZE_LIMITS leaves out are bounded by one it holds: n_dense_layers and n_hash_layers by n_layers,
# n_activated_experts, n_expert_groups and n_limited_groups by n_routed_experts, n_kv_heads and o_groups by n_heads,
# rotary_dim by head_dim; compress_ratios' entries as csa_ratio; beta_fast and beta_slow are YaRN's arithmetic only
