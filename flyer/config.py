"""Model configuration: one dataclass, named presets, DeepSeek / Hugging Face JSON loading.

Field names follow DeepSeek-V3's `inference/model.py` ModelArgs (``dim``, ``inter_dim``,
``moe_inter_dim``, ``n_dense_layers``, ...). ``ModelConfig.from_json`` also accepts the keys of a
Hugging Face ``config.json`` for DeepseekV2 / DeepseekV3 / DeepseekV3.2 / GLM-5 / Mistral 4 / LongCat-Flash /
Kimi K2.5's text model
(and Llama / Mistral / Qwen2 / Qwen3 / GLM-4.5 for the GQA presets).
Every constructed config is validated; an impossible value raises ``ConfigError`` with one line
naming the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import stat
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from flyer.errors import ConfigError, FieldError
from flyer.interop.hf_config import ROPE_TYPES, from_hf_config, is_hf_config, yarn_mscale
from flyer.interop.model_args import from_model_args, is_model_args
from flyer.limits import SIZE_LIMITS
from flyer.parse import json_loads, toml_loads
from flyer.presets import PRESETS



def parse_size(text: str, field: str = "size") -> int:
    """'2G', '512M', '64k' (binary: 2^30, 2^20, 2^10), '5GB', '500MB' (decimal, as transformers reads
    ``max_shard_size``), '2GiB' (binary), '1e9' or a plain byte count -> bytes; ``field`` names the
    setting in the error."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([kmgt]?)(i?b?)\s*", text, re.IGNORECASE)
    if not m or (m.group(3) and not m.group(2)) or m.group(3).lower() == "i":
        raise FieldError(field, f"expected a size like 5GB or 500MB (got {text!r})")
    power = "_kmgt".index(m.group(2).lower() or "_")
    base = 1000 if m.group(3).lower() == "b" else 1024
    size = float(m.group(1)) * base**power
    if not math.isfinite(size) or size > 2**60:  # '1e400' is inf; no memory or file is an exbibyte
        raise FieldError(field, f"must be at most 1 EiB, 2^60 bytes (got {text!r})")
    return int(size)

@dataclass
class ModelConfig:
    # vocabulary and trunk
    vocab_size: int = 129280
    dim: int = 7168
    n_layers: int = 61
    n_dense_layers: int = 3
    inter_dim: int = 18432
    norm_eps: float = 1e-6
    # attention: "mla" (Multi-head Latent Attention), "gqa" (grouped-query / multi-head) or "hybrid"
    # (DeepSeek-V4: one shared key/value head over a sliding window plus compressed entries, see below)
    attn: str = "mla"
    n_heads: int = 128
    q_lora_rank: int = 1536  # 0 = no query compression (DeepSeek-V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # a lightning indexer picks each query's index_topk keys (mla: DSA, V3.2; hybrid: CSA layers' entries, V4)
    index_topk: int = 0  # 0 = no indexer: dense MLA
    index_n_heads: int = 64
    index_head_dim: int = 128  # its first qk_rope_head_dim channels rotate
    # GLM-5.2's cross-layer top-k sharing (IndexShare): one per layer, "full" (the layer's own indexer selects its
    # keys) or "shared" (no indexer: the layer attends to the keys the nearest full layer before it selected); layer
    # 0 is full. () = every layer full, DeepSeek-V3.2's indexers; a list (even all "full") is GLM-5's layout, which
    # exports as glm_moe_dsa (its indexer rotates interleaved pairs, V3.2's rotate-half). MTP blocks are full.
    indexer_types: tuple[str, ...] = ()
    n_kv_heads: int = 0  # gqa only
    head_dim: int = 0  # gqa and hybrid (hybrid: its last qk_rope_head_dim channels rotate)
    attn_bias: bool = False  # gqa only: bias on q/k/v projections (Qwen2)
    qk_norm: bool = False  # gqa only: RMSNorm over each head's query and key before RoPE (Qwen3)
    rotary_dim: int = 0  # gqa only: RoPE rotates each head's first rotary_dim channels (GLM-4.5: half); 0 = all
    # gqa only: the main layers that attend to their last window_size tokens alone, as transformers' sliding
    # windows (Mistral 7B v0.1: every layer; Qwen2/Qwen3: layers max_window_layers and up); MTP blocks attend fully
    sliding_layers: tuple[int, ...] = ()
    # DeepSeek-V4's hybrid attention (attn "hybrid"): every layer attends to the last window_size tokens (gqa: the
    # sliding_layers do; 0 = none slides); a layer with compress_ratios[i] = r > 0 also to one compressed entry per
    # r tokens: CSA (r = csa_ratio: overlapping windows, the indexer keeps index_topk entries per query) or HCA (any
    # other r: every entry)
    window_size: int = 0
    compress_ratios: tuple[int, ...] = ()  # one per main layer; 0 = the sliding window only (MTP blocks: always 0)
    csa_ratio: int = 4
    compress_rope_theta: float = 160000.0  # compressed layers' RoPE base (with the rope scaling); others: rope_theta
    o_groups: int = 0  # grouped output projection: head groups, each projected to o_lora_rank channels
    o_lora_rank: int = 0
    # Manifold-constrained hyper-connections (DeepSeek-V4): hc_mult residual streams mixed around each
    # attention and FFN block by a Sinkhorn-normalised matrix; 1 = the plain residual
    hc_mult: int = 1
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # DeepSeekMoE
    moe_inter_dim: int = 2048
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 8
    n_expert_groups: int = 8
    n_limited_groups: int = 4
    score_func: str = "sigmoid"  # or "softmax", or "sqrtsoftplus" (DeepSeek-V4: sqrt(softplus(logit)))
    route_scale: float = 2.5
    norm_topk_prob: bool = True
    router_bias: bool = True  # aux-loss-free balancing bias (selection only)
    bias_update_speed: float = 0.001  # gamma
    seq_aux_alpha: float = 0.0001  # complementary sequence-wise balance loss weight
    n_hash_layers: int = 0  # DeepSeek-V4: the first n MoE layers route each token by a fixed token-id table
    swiglu_limit: float = 0.0  # DeepSeek-V4: SwiGLU's gate clamped above, its up-projection to +-limit; 0 = none
    # LongCat-Flash's zero-computation experts: routing columns n_routed_experts .. + n_zero_experts - 1, each an
    # identity (a token routed there adds weight * its MoE input, no FFN); the router scores and biases them all
    n_zero_experts: int = 0
    # LongCat-Flash's shortcut MoE (ScMoE): every block has a dense FFN (inter_dim); blocks 2i and 2i+1 share one
    # MoE, its input block 2i's FFN input, its output added to block 2i+1's output (``flyer.model.transformer``); an
    # MTP block is MLA + the dense FFN alone, as LongCat-Flash's released MTP layer
    shortcut_moe: bool = False
    # positions: RoPE, its frequencies scaled for a context rope_factor times original_seq_len
    max_seq_len: int = 4096 * 40
    rope_theta: float = 10000.0
    rope_type: str = "yarn"  # the scaling when rope_factor > 1: yarn, llama3 or linear; default = never scaled
    rope_factor: float = 40.0  # 1.0 = not scaled (whatever rope_type)
    original_seq_len: int = 4096
    beta_fast: int = 32  # yarn
    beta_slow: int = 1  # yarn
    low_freq_factor: float = 1.0  # llama3: wavelengths above original_seq_len / low_freq_factor are interpolated
    high_freq_factor: float = 4.0  # llama3: wavelengths below original_seq_len / high_freq_factor are kept
    mscale: float = 1.0  # yarn: softmax scale * yarn_mscale(rope_factor, mscale)^2 (HF: mscale_all_dim)
    rope_attn_factor: float = 1.0  # factor on cos/sin (YaRN's; HF: attention_factor, m(mscale)/m(mscale_all_dim))
    # Llama 4's attention temperature (Mistral 4, mla only): each query at position p (nope and rope parts) times
    # 1 + beta ln(1 + floor(p / original_seq_len)), sharpening attention past the original context; 0 = none
    llama4_attn_beta: float = 0.0
    # multi-token prediction
    mtp_depth: int = 1
    mtp_loss_weight: float = 0.3
    # initialisation
    init_std: float = 0.006
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived quantities -------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_route_columns(self) -> int:
        """The router's columns: the routed experts, then the zero-computation (identity) experts."""
        return self.n_routed_experts + self.n_zero_experts

    def has_shortcut_moe(self, layer: int) -> bool:
        """Whether block ``layer`` holds a shortcut MoE (``shortcut_moe``: the first block of each pair; never an
        MTP block, ``n_layers`` onward)."""
        return self.shortcut_moe and layer < self.n_layers and layer % 2 == 0

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0 and self.n_layers > self.n_dense_layers

    @property
    def rope_dim(self) -> int:
        """Channels RoPE rotates per head: MLA's rope head, hybrid's last ``qk_rope_head_dim``; GQA's first
        ``rotary_dim`` (0: the whole head)."""
        return self.qk_rope_head_dim if self.attn in ("mla", "hybrid") else self.rotary_dim or self.head_dim

    def window(self, layer: int) -> int:
        """The sliding window of GQA layer ``layer`` (an MTP block's: ``n_layers`` and up): 0 = it attends to
        every causal key."""
        return self.window_size if layer in self.sliding_layers else 0

    def has_indexer(self, layer: int) -> bool:
        """Whether MLA layer ``layer`` runs its own DSA indexer (``n_layers`` onward: an MTP block, which does);
        False without DSA, and for a layer ``indexer_types`` marks "shared"."""
        if self.attn != "mla" or self.index_topk == 0:
            return False
        return layer >= len(self.indexer_types) or self.indexer_types[layer] == "full"

    def is_csa(self, layer: int) -> bool:
        """Whether hybrid layer ``layer`` is CSA (overlapping compressed windows and the indexer); an MTP block
        (``n_layers`` onward) is not: DeepSeek-V4's attends by the sliding window only."""
        return self.attn == "hybrid" and layer < self.n_layers and self.compress_ratios[layer] == self.csa_ratio

    @property
    def softmax_scale(self) -> float:
        """Attention softmax scale, with YaRN's mscale^2 correction (llama3 and linear scaling have none).

        YaRN applies whenever ``rope_factor > 1``, as in transformers; DeepSeek's reference applies it
        only when ``max_seq_len > original_seq_len``: we follow the checkpoints' transformers semantics,
        so a model does not change with the context it is run at."""
        d = self.qk_head_dim if self.attn == "mla" else self.head_dim
        scale = d ** -0.5
        if self.attn == "hybrid":  # DeepSeek-V4's checkpoints: YaRN stretches the frequencies only
            return scale
        if self.rope_type == "yarn" and self.rope_factor > 1.0:
            m = yarn_mscale(self.rope_factor, self.mscale)
            scale = scale * m * m
        return scale

    # ---- validation ---------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"config field '{name}': {msg} (got {getattr(self, name)!r})")

        for f in fields(self):
            v = getattr(self, f.name)
            need(not isinstance(v, float) or math.isfinite(v), f.name, "must be a finite number")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            need(int(getattr(self, name)) > 0, name, "must be a positive integer")
        for name, most in SIZE_LIMITS.items():  # before anything loops over layers or multiplies sizes
            need(getattr(self, name) <= most, name, f"must be at most {most:,} (far past any published model)")
        need(all(r <= SIZE_LIMITS["csa_ratio"] for r in self.compress_ratios), "compress_ratios",
             f"entries must be at most {SIZE_LIMITS['csa_ratio']:,}")
        need(0 <= self.n_dense_layers <= self.n_layers, "n_dense_layers", f"must be in [0, n_layers={self.n_layers}]")
        need(self.attn in ("mla", "gqa", "hybrid"), "attn", "must be 'mla', 'gqa' or 'hybrid'")
        need(self.norm_eps > 0, "norm_eps", "must be > 0")
        need(self.init_std > 0, "init_std", "must be > 0")
        if self.n_dense_layers > 0 or self.n_routed_experts == 0:
            need(self.inter_dim > 0, "inter_dim", "must be > 0 when dense FFN layers exist")
        if self.attn == "mla":
            need(self.q_lora_rank >= 0, "q_lora_rank", "must be >= 0 (0 = no query compression)")
            need(self.kv_lora_rank > 0, "kv_lora_rank", "must be > 0 for MLA")
            need(self.qk_nope_head_dim > 0, "qk_nope_head_dim", "must be > 0 for MLA")
            need(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
                 "must be a positive even number")
            need(self.v_head_dim > 0, "v_head_dim", "must be > 0 for MLA")
            need(not self.qk_norm, "qk_norm", "applies to gqa attention only (MLA normalises its latents)")
            need(self.rotary_dim == 0, "rotary_dim", "applies to gqa attention only (MLA has qk_rope_head_dim)")
        elif self.attn == "hybrid":
            self._validate_hybrid(need)
        else:
            need(self.n_kv_heads > 0, "n_kv_heads", "must be > 0 for gqa attention")
            need(self.n_heads % self.n_kv_heads == 0, "n_kv_heads", f"must divide n_heads={self.n_heads}")
            need(self.head_dim > 0 and self.head_dim % 2 == 0, "head_dim", "must be a positive even number for gqa")
            need(0 <= self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0, "rotary_dim",
                 f"must be an even number in [0, head_dim={self.head_dim}] (0 = the whole head)")
            need(self.window_size >= 0, "window_size", "must be >= 0 (0 = no sliding window)")
            need(bool(self.window_size) == bool(self.sliding_layers), "sliding_layers",
                 "must name the sliding layers exactly when window_size > 0")
            need(list(self.sliding_layers) == sorted(set(self.sliding_layers)) and
                 all(0 <= i < self.n_layers for i in self.sliding_layers), "sliding_layers",
                 f"must be ascending distinct layer indices in [0, n_layers={self.n_layers})")
        if self.attn != "gqa":
            need(not self.sliding_layers, "sliding_layers", "applies to gqa attention only")
        need(self.index_topk >= 0, "index_topk", "must be >= 0 (0 = no DSA indexer: dense attention)")
        if self.index_topk > 0:
            need(self.attn in ("mla", "hybrid"), "index_topk", "the indexer applies to mla and hybrid attention only "
                                                              "(0 = none)")
            need(self.q_lora_rank > 0, "q_lora_rank", "must be > 0 with the DSA indexer (index_topk > 0): its "
                                                      "queries are projected from MLA's query latent")
            need(self.index_n_heads > 0, "index_n_heads", "must be > 0")
            need(self.index_head_dim >= self.qk_rope_head_dim and self.index_head_dim % 2 == 0, "index_head_dim",
                 f"must be an even number >= qk_rope_head_dim={self.qk_rope_head_dim} (its rope channels)")
        if self.indexer_types:
            need(self.attn == "mla" and self.index_topk > 0, "indexer_types", "applies to mla attention with the DSA "
                                                                             "indexer only (index_topk > 0)")
            need(len(self.indexer_types) == self.n_layers, "indexer_types", f"must have one entry per layer "
                                                                           f"(n_layers={self.n_layers})")
            need(set(self.indexer_types) <= {"full", "shared"}, "indexer_types", "entries must be 'full' or 'shared'")
            need(self.indexer_types[0] == "full", "indexer_types", "layer 0 must be 'full' (a shared layer reuses "
                                                                  "the selection of a full layer before it)")
        need(self.n_routed_experts >= 0, "n_routed_experts", "must be >= 0")
        if self.n_routed_experts > 0:
            need(self.moe_inter_dim > 0, "moe_inter_dim", "must be > 0 with routed experts")
            need(self.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
            need(self.score_func in SCORE_FUNCS, "score_func", f"must be one of {', '.join(SCORE_FUNCS)}")
            need(self.n_expert_groups >= 1, "n_expert_groups", "must be >= 1")
            need(self.n_routed_experts % self.n_expert_groups == 0, "n_routed_experts",
                 f"must be divisible by n_expert_groups={self.n_expert_groups}")
            need(1 <= self.n_limited_groups <= self.n_expert_groups, "n_limited_groups",
                 f"must be in [1, n_expert_groups={self.n_expert_groups}]")
            per_group = self.n_routed_experts // self.n_expert_groups
            allowed = per_group * self.n_limited_groups
            need(1 <= self.n_activated_experts <= allowed, "n_activated_experts",
                 f"must be in [1, {allowed}] (experts in the {self.n_limited_groups} allowed groups of {per_group})")
            if self.n_expert_groups > 1 and self.router_bias:
                need(per_group >= 2, "n_expert_groups",
                     "leaves fewer than 2 experts per group (group score sums the top 2)")
            need(self.route_scale > 0, "route_scale", "must be > 0")
            need(self.bias_update_speed >= 0, "bias_update_speed", "must be >= 0")
            need(self.seq_aux_alpha >= 0, "seq_aux_alpha", "must be >= 0")
        need(0 <= self.n_hash_layers <= self.n_layers - self.n_dense_layers, "n_hash_layers",
             f"must be in [0, {self.n_layers - self.n_dense_layers}] (the MoE layers)")
        if self.n_hash_layers:
            need(self.n_routed_experts > 0, "n_hash_layers", "needs routed experts (n_routed_experts > 0)")
        need(self.swiglu_limit >= 0, "swiglu_limit", "must be >= 0 (0 = no clamp)")
        self._validate_longcat(need)
        need(self.hc_mult >= 1, "hc_mult", "must be >= 1 (1 = the plain residual)")
        if self.hc_mult > 1:
            need(self.hc_sinkhorn_iters >= 1, "hc_sinkhorn_iters", "must be >= 1")
            need(self.hc_eps > 0, "hc_eps", "must be > 0")
        need(self.rope_theta > 0, "rope_theta", "must be > 0")
        need(self.rope_type in ROPE_TYPES, "rope_type", f"must be one of {', '.join(ROPE_TYPES)}")
        need(self.rope_factor >= 1.0, "rope_factor", "must be >= 1 (1 = not scaled)")
        if self.rope_type == "default":
            need(self.rope_factor == 1.0, "rope_factor", "must be 1 with rope_type 'default' (never scaled)")
        need(self.original_seq_len > 0, "original_seq_len", "must be > 0")
        need(self.rope_attn_factor > 0, "rope_attn_factor", "must be > 0")
        if self.rope_type in ("llama3", "linear"):  # transformers' llama3 / linear RoPE has no cos/sin factor
            need(self.rope_attn_factor == 1.0, "rope_attn_factor", f"must be 1 with rope_type '{self.rope_type}'")
        if self.rope_type == "llama3":
            need(self.low_freq_factor > 0, "low_freq_factor", "must be > 0")
            need(self.high_freq_factor > self.low_freq_factor, "high_freq_factor",
                 f"must be > low_freq_factor={self.low_freq_factor}")
        need(self.llama4_attn_beta >= 0, "llama4_attn_beta", "must be >= 0 (0 = no query scaling)")
        if self.llama4_attn_beta:  # the scale rides in MLA's rope tables (flyer.model.rope.rope_cos_sin)
            need(self.attn == "mla" and self.index_topk == 0, "llama4_attn_beta",
                 "applies to mla attention without the DSA indexer only (0 = none)")
        need(self.mtp_depth >= 0, "mtp_depth", "must be >= 0")
        need(self.mtp_loss_weight >= 0, "mtp_loss_weight", "must be >= 0")

    def _validate_longcat(self, need) -> None:
        """Zero-computation experts and the shortcut MoE (LongCat-Flash)."""
        need(self.n_zero_experts >= 0, "n_zero_experts", "must be >= 0 (0 = none)")
        if self.n_zero_experts:
            need(self.n_routed_experts > 0, "n_zero_experts", "needs routed experts (n_routed_experts > 0)")
            need(self.n_expert_groups == 1, "n_zero_experts", "applies without expert groups only "
                                                              "(n_expert_groups 1)")
            need(self.n_hash_layers == 0, "n_zero_experts", "applies to learned routers only (n_hash_layers 0)")
            need(self.n_activated_experts <= self.n_route_columns, "n_activated_experts",
                 f"must be at most n_routed_experts + n_zero_experts = {self.n_route_columns}")
        if self.shortcut_moe:
            need(self.n_layers % 2 == 0, "n_layers", "must be even with shortcut_moe (blocks pair around one MoE)")
            need(self.n_routed_experts > 0, "shortcut_moe", "needs routed experts (n_routed_experts > 0)")
            need(self.n_dense_layers == 0, "n_dense_layers", "must be 0 with shortcut_moe (every block has a dense "
                                                            "FFN, each pair a shortcut MoE)")
            need(self.inter_dim > 0, "inter_dim", "must be > 0 with shortcut_moe (every block's dense FFN)")
            need(self.attn != "hybrid" and self.hc_mult == 1, "shortcut_moe", "applies to mla and gqa attention "
                                                                              "with the plain residual only")
            need(self.n_hash_layers == 0, "n_hash_layers", "must be 0 with shortcut_moe")

    def _validate_hybrid(self, need) -> None:
        need(self.head_dim > self.qk_rope_head_dim, "head_dim", f"must exceed qk_rope_head_dim={self.qk_rope_head_dim}"
                                                               " for hybrid attention")
        need(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
             "must be a positive even number")
        need(self.q_lora_rank > 0, "q_lora_rank", "must be > 0 for hybrid attention (its queries are low-rank)")
        need(self.window_size > 0, "window_size", "must be > 0 for hybrid attention")
        need(len(self.compress_ratios) == self.n_layers, "compress_ratios", f"must have one entry per layer "
                                                                            f"(n_layers={self.n_layers})")
        need(all(r >= 0 for r in self.compress_ratios), "compress_ratios", "must be >= 0 (0 = no compression)")
        need(self.csa_ratio > 0, "csa_ratio", "must be > 0")
        need(self.o_groups > 0 and self.n_heads % self.o_groups == 0, "o_groups", f"must divide n_heads={self.n_heads}")
        need(self.o_lora_rank > 0, "o_lora_rank", "must be > 0 for hybrid attention")
        need(self.compress_rope_theta > 0, "compress_rope_theta", "must be > 0")
        if self.csa_ratio in self.compress_ratios:
            need(self.index_topk > 0, "index_topk", f"must be > 0: layers with compress ratio {self.csa_ratio} "
                                                    "(csa_ratio) select entries by the indexer")
        for name in ("qk_norm", "attn_bias"):
            need(not getattr(self, name), name, "applies to gqa attention only")
        need(self.rotary_dim == 0, "rotary_dim", "applies to gqa attention only (hybrid has qk_rope_head_dim)")

    # ---- construction helpers -----------------------------------------------------------
    def replace(self, **overrides: Any) -> "ModelConfig":
        known = {f.name for f in fields(self)}
        for k in overrides:
            if k not in known:
                raise ConfigError(f"unknown config field '{k}' (known: {', '.join(sorted(known))})")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from flyer's own keys, DeepSeek's config_*.json keys, or HF config.json keys."""
        if is_hf_config(d):
            d = from_hf_config(d)
        known = {f.name: f for f in fields(cls)}
        kw: dict[str, Any] = {}
        for k, v in d.items():
            if k in _IGNORED_KEYS:
                continue
            if k not in known:
                raise ConfigError(f"unknown config field '{k}'")
            kw[k] = _coerce(k, v, known[k].type)
        return cls(**kw)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        """Load DeepSeek's config_*.json, a Hugging Face config.json, or flyer's own JSON."""
        return cls.from_dict(read_config_file(path))


# Keys DeepSeek's / HF's files carry that do not describe the architecture.
_IGNORED_KEYS = {"dtype", "max_batch_size", "scale_fmt", "architectures", "model_type", "torch_dtype",
                 "transformers_version", "bos_token_id", "eos_token_id", "pad_token_id", "use_cache",
                 "attention_dropout", "auto_map", "quantization_config", "pretraining_tp", "ep_size",
                 "moe_layer_freq", "topk_method", "aux_loss_alpha", "seq_aux", "hidden_act",
                 "attention_bias", "rope_scaling", "sliding_window", "use_sliding_window",
                 "max_window_layers", "_name_or_path", "tie_word_embeddings", "mlp_bias"}


class RequiredFields(dict):
    """A config file's object: reading a field it lacks is a ``ConfigError`` naming the field and
    the file (``.get`` for optional fields is unchanged)."""

    def __init__(self, pairs, where: Path):
        super().__init__(pairs)
        self.where = where

    def __missing__(self, key: str):
        raise ConfigError(f"config file {self.where}: required field '{key}' is missing")


def _coerce(name: str, v: Any, typ: Any) -> Any:
    t = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    if t in ("tuple[int, ...]", "tuple[str, ...]"):
        item = t[6:9]
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"config field '{name}': expected a list of {'integers' if item == 'int' else 'strings'}"
                              f", got {v!r}")
        return tuple(_coerce(name, x, item) for x in v)
    try:
        if t == "int":  # not a bool, a str ("12" went through int()) or a fraction
            if isinstance(v, (bool, str)) or (isinstance(v, float) and not v.is_integer()):
                raise TypeError
            return int(v)
        if t == "float":
            if isinstance(v, (bool, str)):
                raise TypeError
            return float(v)
        if t == "bool":
            if not isinstance(v, bool):
                raise TypeError
            return v
        if t == "str":
            if not isinstance(v, str):
                raise TypeError
            return v
    except (TypeError, ValueError):
        raise ConfigError(f"config field '{name}': expected {t}, got {v!r:.80}") from None
    return v


SCORE_FUNCS = ("sigmoid", "softmax", "sqrtsoftplus")
# how a training run treats DSA's lightning indexers (flyer.model.indexer_loss); here for the FLOP counts too
INDEXER_TRAIN_MODES = ("off", "warmup", "sparse")


def check_indexer_train(mode: str, cfg: ModelConfig) -> None:
    """``FieldError`` naming ``indexer_train`` unless ``mode`` is "off" or the model has lightning indexers: V3.2's
    DSA (attn "mla", index_topk > 0) or DeepSeek-V4's CSA layers (attn "hybrid", some compress_ratios entry
    csa_ratio; their L_I: ``flyer.model.hybrid_indexer_loss``), nor for a mode not in ``INDEXER_TRAIN_MODES``."""
    if mode not in INDEXER_TRAIN_MODES:
        raise FieldError("indexer_train", f"must be one of {', '.join(INDEXER_TRAIN_MODES)} (got {mode!r})")
    if mode == "off":
        return
    if not any(map(cfg.has_indexer, range(cfg.n_layers))) and not any(map(cfg.is_csa, range(cfg.n_layers))):
        raise FieldError("indexer_train", f"{mode} trains lightning indexers, and this model has none (attn "
                                          f"{cfg.attn!r}, index_topk {cfg.index_topk}; DeepSeek-V4's hybrid attention: "
                                          f"no layer of compress_ratio csa_ratio {cfg.csa_ratio})")


# ---- presets (flyer.presets) ----------------------------------------------------------------
def preset_fields(name: str) -> dict[str, Any]:
    """The fields preset ``name`` sets: the one lookup in ``PRESETS``, and so the one check of a name."""
    if name not in PRESETS:
        raise FieldError("preset", f"unknown preset '{name}' (choose from: {', '.join(PRESETS)})")
    return PRESETS[name]


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset, optionally with fields overridden."""
    return ModelConfig.from_dict({**preset_fields(name), **overrides})


MAX_CONFIG_BYTES = 16 << 20  # a config file is a few KB; /dev/zero or a data file given by mistake is not read whole


def read_config_sections(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model fields, train fields) from a config file.

    JSON: DeepSeek's config_*.json (its ModelArgs' fields: ``flyer.interop.model_args``), an HF config.json, or
    flyer's own fields (model fields only). TOML: model fields at the top level and/or in a [model] table (a field
    in one of the two), trainer options in a [train] table. A model directory stands for its ``config.json``.
    """
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file():  # a Hugging Face model's (or an export's) directory
        p = p / "config.json"
    try:
        st = p.stat()
        if not stat.S_ISREG(st.st_mode):  # a directory, a device (/dev/zero never ends), a FIFO (the read blocks)
            raise FieldError("config", f"cannot read config file {p}: not a regular file"
                                       + (" (a directory without config.json)" if p.is_dir() else ""))
        if st.st_size > MAX_CONFIG_BYTES:
            raise FieldError("config", f"config file {p} is larger than {MAX_CONFIG_BYTES >> 20} MiB "
                                       f"({st.st_size} bytes)")
        with p.open(encoding="utf-8") as f:
            text = f.read(MAX_CONFIG_BYTES + 1)  # bounded even where the file grows after the check
        if len(text) > MAX_CONFIG_BYTES:
            raise FieldError("config", f"config file {p} is larger than {MAX_CONFIG_BYTES >> 20} MiB")
    except OSError as e:
        raise FieldError("config", f"cannot read config file {p}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise FieldError("config", f"config file {p} is not UTF-8 text (byte {e.start})") from None
    train: Any = {}
    if p.suffix == ".json":
        try:
            d = json_loads(text, object_pairs_hook=lambda pairs: RequiredFields(pairs, where=p))
        except json.JSONDecodeError as e:
            raise FieldError("config", f"config file {p} is not valid JSON: {e.msg} at line {e.lineno}") from None
    else:
        try:
            d = toml_loads(text)
        except tomllib.TOMLDecodeError as e:
            raise FieldError("config", f"config file {p} is not valid TOML: {e}") from None
        train, model = d.pop("train", {}), d.pop("model", {})
        for name, table in (("model", model), ("train", train)):
            if not isinstance(table, dict):
                raise FieldError("config", f"config file {p}: {name} must be a table ([{name}]), got "
                                           f"{type(table).__name__}")
        both = sorted(model.keys() & d.keys())
        if both:  # which of the two was meant is not ours to guess
            raise FieldError("config", f"config file {p}: {both[0]} is set both at the top level and in [model]")
        d = {**model, **d}
    if not isinstance(d, dict) or not isinstance(train, dict):
        raise FieldError("config", f"config file {p} must hold a table/object of fields")
    if is_hf_config(d):
        return from_hf_config(d, str(p)), train
    return (from_model_args(d) if p.suffix == ".json" and is_model_args(d) else d), train


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Model field overrides from a config file (see ``read_config_sections``)."""
    return read_config_sections(path)[0]


def resolve_config(preset_name: str | None = None, config_path: str | Path | None = None,
                   overrides: dict[str, Any] | None = None) -> ModelConfig:
    """A preset (None = the dataclass defaults, i.e. DeepSeek-V3) with file and keyword overrides."""
    d: dict[str, Any] = dict(preset_fields(preset_name)) if preset_name is not None else {}
    if config_path is not None:
        d.update(read_config_file(config_path))
    d.update(overrides or {})
    return ModelConfig.from_dict(d)


def resolve_device(name: str, field: str = "device"):
    """``auto`` is CUDA when available, else CPU; a CUDA device that is not there is a
    ``FieldError`` naming ``field``."""
    import torch  # here only: the config and its validation load without torch (flyer plan, flyer net)

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FieldError(field, f"unknown device {name!r} (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FieldError(field, f"{name} asked for, but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise FieldError(field, f"{name} asked for, but this machine has {n} CUDA device(s)")
    elif device.type != "cpu":
        raise FieldError(field, f"unsupported device {name!r} (auto, cpu, cuda or cuda:N)")
    return device


__all__ = ["ModelConfig", "ConfigError", "FieldError", "PRESETS", "ROPE_TYPES", "preset", "preset_fields",
           "resolve_config", "read_config_file", "read_config_sections", "resolve_device", "yarn_mscale"]
