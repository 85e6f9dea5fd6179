"""Meituan's LongCat-Flash ``config.json`` (``model_type`` ``longcat_flash``) <-> flyer model fields (no torch).

As transformers' LongcatFlash computes it: ``num_layers`` decoder layers of two sublayers each (flyer: 2 num_layers
blocks), every sublayer DeepseekV3's MLA (interleaved rope rows, the query always low-rank) and a dense SwiGLU
(``ffn_hidden_size``), and one shortcut MoE per layer (flyer's ``shortcut_moe``): its input sublayer 0's
post-attention-normed state, its output added at the end of sublayer 1. Its router: softmax over the
``n_routed_experts`` + ``zero_expert_num`` columns in FP32, top-``moe_topk`` by score + ``e_score_correction_bias``,
the chosen scores (not renormalised) times ``routed_scaling_factor``; the zero experts are identities (flyer's
``n_zero_experts``). MLA's "LoRA scaling" (q times sqrt(hidden / q_lora_rank), the normed kv latent times
sqrt(hidden / kv_lora_rank)) is folded into ``q_b_proj``'s rows and ``kv_a_layernorm``'s weight on the way in and
out (``flyer.interop.hf_names``). RoPE rotates ``head_dim`` channels, which must be the rope head's.
LongcatFlashConfig's defaults (LongCat-Flash-Chat's values) fill missing fields.

The released checkpoints' MTP module (``model.mtp.*``, which transformers' LongcatFlash skips on load) is read as
flyer's (``mtp_depth`` 1) where Meituan's config declares it (``num_nextn_predict_layers``: 1; transformers' config
has no such field: none) and the files hold it. As SGLang's ``longcat_flash_nextn.py`` and vLLM's
``longcat_flash_mtp.py`` compute it (they agree): ``eh_proj([enorm(Emb(t_{i+1})); hnorm(h_i)])``, h the main
model's output after its final norm; one decoder sublayer, MLA (its LoRA scaling too) then a dense SwiGLU of
``ffn_hidden_size``, no MoE (``nextn_use_scmoe``: false); the module's final norm, then the main model's head. Its
embedding and head are the main model's (SGLang takes both from it; vLLM reads the file's copy of the embedding,
``model.mtp.embed_tokens``, written by ``flyer export`` from the shared one).
"""

from __future__ import annotations

from typing import Any

from flyer.errors import ConfigError


def _bad(where: str, field: str, problem: str) -> ConfigError:
    return ConfigError(f"{where}: field '{field}': {problem}")


# LongcatFlashConfig's defaults (LongCat-Flash-Chat's values), in its own spelling
LONGCAT_DEFAULTS = {
    "vocab_size": 131072, "hidden_size": 6144, "num_layers": 28, "num_attention_heads": 64,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "ffn_hidden_size": 12288, "q_lora_rank": 1536,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "head_dim": 64, "v_head_dim": 128,
    "moe_topk": 12, "n_routed_experts": 512, "zero_expert_num": 256, "expert_ffn_hidden_size": 2048,
    "routed_scaling_factor": 6.0}
LONGCAT_THETA = 10000000.0  # LongcatFlashConfig's default_theta
# LongcatFlashConfig's attribute_map: an alias read where the file lacks the field's own name
_ALIASES = {"num_local_experts": "n_routed_experts", "num_experts_per_tok": "moe_topk",
            "intermediate_size": "ffn_hidden_size", "moe_intermediate_size": "expert_ffn_hidden_size"}


def longcat_as_mla(d: dict[str, Any], where: str) -> dict[str, Any]:
    """LongCat-Flash's config in DeepseekV3's spelling (``flyer.interop.hf_config`` reads MLA from it), checked:
    2 num_layers blocks, no dense-only or shared-expert layers, at most one MTP layer, a dense one."""
    d = dict(d)
    if "num_layers" not in d and isinstance(d.get("num_hidden_layers"), int):  # LongcatFlashConfig's setter
        d["num_layers"] = d["num_hidden_layers"] // 2
    for alias, own in _ALIASES.items():
        if own not in d and alias in d:
            d[own] = d[alias]
    d = {**LONGCAT_DEFAULTS, **{k: v for k, v in d.items() if k not in _ALIASES}}
    d.setdefault("rope_theta", LONGCAT_THETA)  # where rope_parameters / rope_scaling give none
    n = d["num_layers"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise _bad(where, "num_layers", f"expected an integer >= 1 (got {n!r:.40})")
    # Meituan's remote-code config writes num_hidden_layers = num_layers, transformers' derives 2 num_layers (the
    # sublayers): either is read as num_layers decoder layers, as the weights are; another value is refused
    if d.get("num_hidden_layers", n) not in (n, 2 * n):
        raise _bad(where, "num_hidden_layers", f"{d['num_hidden_layers']!r:.40} is neither num_layers ({n}) nor "
                                               f"2 num_layers ({2 * n}), the sublayers transformers counts")
    for key, need in (("zero_expert_type", "identity"), ("mla_scale_q_lora", True), ("mla_scale_kv_lora", True),
                      ("router_bias", False), ("norm_topk_prob", False)):
        if key in d and d[key] != need:  # transformers' LongcatFlash computes only these
            raise _bad(where, key, f"only {need!r} is supported (got {d[key]!r:.40})")
    if d["head_dim"] != d["qk_rope_head_dim"]:  # its RoPE tables are head_dim wide, applied to the rope head
        raise _bad(where, "head_dim", f"must equal qk_rope_head_dim ({d['qk_rope_head_dim']!r:.20}): transformers' "
                                      f"LongcatFlash rotates the rope head by head_dim-wide tables "
                                      f"(got {d['head_dim']!r:.20})")
    qk = d.get("qk_head_dim")
    if qk is not None and qk != d["qk_nope_head_dim"] + d["qk_rope_head_dim"]:
        raise _bad(where, "qk_head_dim", f"must be qk_nope_head_dim + qk_rope_head_dim (got {qk!r:.20})")
    if not d.get("q_lora_rank"):
        raise _bad(where, "q_lora_rank", "required: LongCat-Flash always compresses the query")
    # Meituan's field (transformers' config has no MTP layer); the files name one layer, and the module's final norm
    # (model.mtp.norm) is one
    mtp = d.get("num_nextn_predict_layers") or 0
    if mtp not in (0, 1) or isinstance(mtp, bool):
        raise _bad(where, "num_nextn_predict_layers", f"LongCat-Flash's MTP module has one layer: 0 or 1 "
                                                      f"(got {mtp!r:.40})")
    if mtp and d.get("nextn_use_scmoe"):  # SGLang and vLLM build the layer dense, as flyer does
        raise _bad(where, "nextn_use_scmoe", f"only False is supported: an MTP layer with the shortcut MoE "
                                             f"(got {d['nextn_use_scmoe']!r:.40})")
    zero = d.get("zero_expert_num") or 0
    if not isinstance(zero, int) or isinstance(zero, bool) or zero < 0:
        raise _bad(where, "zero_expert_num", f"expected an integer >= 0 (got {zero!r:.40})")
    d.update(num_hidden_layers=2 * n, intermediate_size=d["ffn_hidden_size"],
             moe_intermediate_size=d["expert_ffn_hidden_size"], num_experts_per_tok=d["moe_topk"],
             n_shared_experts=0, first_k_dense_replace=0, num_nextn_predict_layers=mtp, zero_expert_num=zero)
    return d


def longcat_fields(d: dict[str, Any]) -> dict[str, Any]:
    """flyer's router, zero experts and shortcut MoE for a config ``longcat_as_mla`` returned (module doc)."""
    return dict(score_func="softmax", router_bias=True, norm_topk_prob=False, n_expert_groups=1, n_limited_groups=1,
                n_zero_experts=d["zero_expert_num"], shortcut_moe=True, n_dense_layers=0,
                mtp_depth=d["num_nextn_predict_layers"])


def check_longcat(cfg: Any) -> None:
    """A model with zero experts or the shortcut MoE computes as transformers' LongcatFlash only with the rest of
    it: MLA with a compressed query, the shortcut MoE, its router, no shared expert, no indexer or temperature; and
    its files hold one MTP module at most (``model.mtp.*``)."""
    grouped = cfg.n_expert_groups > 1 and cfg.n_limited_groups < cfg.n_expert_groups
    checks = (("attn", cfg.attn == "mla", "'mla'"), ("q_lora_rank", cfg.q_lora_rank > 0, "> 0"),
              ("shortcut_moe", cfg.shortcut_moe, "true"), ("score_func", cfg.score_func == "softmax", "'softmax'"),
              ("router_bias", cfg.router_bias, "true"), ("norm_topk_prob", not cfg.norm_topk_prob, "false"),
              ("n_limited_groups", not grouped, "n_expert_groups (no group limit)"),
              ("n_shared_experts", cfg.n_shared_experts == 0, "0"), ("index_topk", cfg.index_topk == 0, "0"),
              ("llama4_attn_beta", cfg.llama4_attn_beta == 0, "0"), ("mtp_depth", cfg.mtp_depth <= 1, "0 or 1"))
    for field, ok, need in checks:
        if not ok:
            raise ConfigError(f"config field '{field}': a model with zero experts or the shortcut MoE exports as "
                              f"LongCat-Flash (longcat_flash), which needs {need} (got {getattr(cfg, field)!r})")


def to_longcat_config(cfg: Any) -> dict[str, Any]:
    """LongcatFlashConfig's own fields for ``cfg`` (a ``ModelConfig`` that ``check_longcat`` passed), in its
    spelling; the common ones (vocabulary, width, norms, RoPE, tokens) come from ``flyer.interop.export_config``."""
    return dict(num_layers=cfg.n_layers // 2, num_key_value_heads=cfg.n_heads, ffn_hidden_size=cfg.inter_dim,
                q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                qk_rope_head_dim=cfg.qk_rope_head_dim, head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
                qk_head_dim=cfg.qk_head_dim, moe_topk=cfg.n_activated_experts, n_routed_experts=cfg.n_routed_experts,
                zero_expert_num=cfg.n_zero_experts, expert_ffn_hidden_size=cfg.moe_inter_dim,
                routed_scaling_factor=cfg.route_scale, output_router_logits=False,
                num_nextn_predict_layers=cfg.mtp_depth, nextn_use_scmoe=False)  # Meituan's fields: model.mtp.*


__all__ = ["LONGCAT_DEFAULTS", "check_longcat", "longcat_as_mla", "longcat_fields", "to_longcat_config"]
