"""DeepSeek-V4's ``config.json`` (``model_type`` ``deepseek_v4``) <-> flyer model fields (no torch).

Two spellings exist. DeepSeek's hub files give each layer a ``compress_ratios`` entry (0: the sliding
window only, 4: CSA, 128: HCA; one more entry for the MTP layer), ``num_hash_layers``, ``rope_theta``
with a top-level YaRN ``rope_scaling`` and ``compress_rope_theta``, and ``qk_rope_head_dim``.
transformers 5 (``save_pretrained``) writes ``layer_types`` with a ``compress_rates`` table,
``mlp_layer_types`` ('hash_moe' then 'moe') and ``rope_parameters`` keyed 'main' / 'compress' with a
``partial_rotary_factor``. Both are read; the second is written (with ``compress_ratios`` beside it for
readers of the first).

As transformers computes V4: window-only layers rotate at ``rope_theta`` unscaled, compressed layers at
``compress_rope_theta`` with the scaling and cos/sin unscaled (its ``attention_factor`` 1 unless the
file sets one); the softmax scale is head_dim^-0.5; the router always renormalises its top-k weights;
DeepseekV4Config's defaults (V4-Flash's values) fill missing fields.

The MTP layers (``num_nextn_predict_layers``, DeepseekV4Config's default 1; tensors ``mtp.k.*``) are flyer's
``mtp_depth`` (``v4_mtp_depth``), as V3's are; a checkpoint read with its tensor names builds the ones its files
hold (``flyer.interop.hf.read_hf_config``: transformers neither builds nor saves them). Their attention is
window-only: ``compress_ratios``' extra entries must be 0, and are written so.
"""

from __future__ import annotations

from typing import Any

from flyer.errors import ConfigError
from flyer.interop.hf_rope import rope_fields

_CSA, _HCA, _WINDOW = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"
# DeepseekV4Config's defaults where a missing field would otherwise read as flyer's (V4-Flash's values)
_DEFAULTS = {
    "vocab_size": 129280, "hidden_size": 4096, "moe_intermediate_size": 2048, "num_hidden_layers": 43,
    "num_attention_heads": 64, "num_key_value_heads": 1, "head_dim": 512, "q_lora_rank": 1024,
    "num_experts_per_tok": 6, "n_routed_experts": 256, "n_shared_experts": 1, "scoring_func": "sqrtsoftplus",
    "routed_scaling_factor": 1.5, "max_position_embeddings": 1048576, "rope_theta": 10000.0,
    "compress_rope_theta": 160000.0, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "swiglu_limit": 10.0,
    "sliding_window": 128, "o_groups": 8, "o_lora_rank": 1024, "index_n_heads": 64, "index_head_dim": 128,
    "index_topk": 512, "rms_norm_eps": 1e-6, "initializer_range": 0.02,
}
_COMPRESS_RATES = {_CSA: 4, _HCA: 128}
_INTS = ("vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim", "q_lora_rank", "num_experts_per_tok", "n_routed_experts",
         "n_shared_experts", "max_position_embeddings", "hc_mult", "hc_sinkhorn_iters", "sliding_window", "o_groups",
         "o_lora_rank", "index_n_heads", "index_head_dim", "index_topk")
_NUMBERS = ("routed_scaling_factor", "rope_theta", "compress_rope_theta", "hc_eps", "swiglu_limit", "rms_norm_eps",
            "initializer_range")


def _bad(where: str, field: str, problem: str) -> ConfigError:
    return ConfigError(f"{where}: field '{field}': {problem}")


def _layer_ratios(d: dict[str, Any], where: str, n_layers: int) -> tuple[tuple[int, ...], int]:
    """(each layer's compress ratio, the CSA ratio) from ``layer_types`` + ``compress_rates`` or
    ``compress_ratios`` (whose extra entries are the MTP layers')."""
    given = d.get("compress_rates") or {}
    if not isinstance(given, dict):
        raise _bad(where, "compress_rates", f"expected an object of ratios by layer type (got {given!r:.40})")
    rates = {**_COMPRESS_RATES, **given}
    for k in ("compress_rate_csa", "compress_rate_hca"):  # transformers' older scalar spelling
        if d.get(k) is not None:
            rates[_CSA if k.endswith("csa") else _HCA] = d[k]
    if not all(isinstance(rates.get(k), int) and rates[k] > 0 for k in (_CSA, _HCA)) or rates[_CSA] == rates[_HCA]:
        raise _bad(where, "compress_rates", f"expected two different positive integers for CSA and HCA (got {rates})")
    types = d.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) < n_layers or not set(types[:n_layers]) <= {_CSA, _HCA, _WINDOW}:
            raise _bad(where, "layer_types", f"expected {n_layers} of {_WINDOW!r}, {_CSA!r}, {_HCA!r} "
                                             f"(got {_listed(types)})")
        return tuple(0 if t == _WINDOW else rates[t] for t in types[:n_layers]), rates[_CSA]
    ratios = d.get("compress_ratios")
    if ratios is None:  # transformers' default: two HCA layers, then HCA and CSA in turn
        return tuple(rates[_HCA] if i < 2 or i % 2 == 0 else rates[_CSA] for i in range(n_layers)), rates[_CSA]
    known = {0: 0, 4: 4, 128: 128}  # transformers maps these three only
    if not isinstance(ratios, list) or len(ratios) < n_layers or any(r not in known for r in ratios[:n_layers]):
        raise _bad(where, "compress_ratios", f"expected {n_layers} entries of 0, 4 or 128 (got {_listed(ratios)})")
    return tuple(rates[_CSA] if r == 4 else rates[_HCA] if r == 128 else 0 for r in ratios[:n_layers]), rates[_CSA]


def _listed(value: Any) -> str:
    """A per-layer list as an error names it: its length first (the part shown may end before the problem)."""
    return f"{len(value)} entries: {value!r:.60}" if isinstance(value, list) else f"{value!r:.60}"


def _hash_layers(d: dict[str, Any], where: str, n_layers: int) -> int:
    kinds = d.get("mlp_layer_types")
    if kinds is None:
        n = d.get("num_hash_layers", 3)
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise _bad(where, "num_hash_layers", f"expected an integer >= 0 (got {n!r:.40})")
        return min(n, n_layers)
    if not isinstance(kinds, list) or len(kinds) < n_layers or not set(kinds[:n_layers]) <= {"hash_moe", "moe"}:
        raise _bad(where, "mlp_layer_types", f"expected {n_layers} of 'hash_moe' or 'moe' (got {_listed(kinds)})")
    n = kinds[:n_layers].count("hash_moe")
    if kinds[:n] != ["hash_moe"] * n:
        raise _bad(where, "mlp_layer_types", "hash-routed layers after top-k ones: flyer hash-routes the first layers")
    return n


def _rope(d: dict[str, Any], where: str) -> dict[str, Any]:
    """Main and compressed layers' RoPE: flyer's scaling fields come from the compressed layers'."""
    rp = d.get("rope_parameters")
    if isinstance(rp, dict) and isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        main, comp = rp["main"], {k: v for k, v in rp["compress"].items() if k != "partial_rotary_factor"}
        if main.get("rope_type", "default") != "default":
            raise _bad(where, "rope_parameters.main.rope_type", f"only 'default' is supported (got "
                                                                f"{main['rope_type']!r:.40})")
        theta, comp_theta = main.get("rope_theta", d["rope_theta"]), comp.get("rope_theta", d["compress_rope_theta"])
    else:  # one flat dict, rope_scaling's or rope_parameters' (transformers 5's name; rope_scaling wins, as there)
        flat = d.get("rope_scaling") or (rp if isinstance(rp, dict) else None) or {}
        comp = {k: v for k, v in flat.items() if k not in ("partial_rotary_factor", "main", "compress")}
        theta, comp_theta = d["rope_theta"], d["compress_rope_theta"]
    out = rope_fields({"rope_theta": comp_theta, "rope_scaling": comp,
                       "max_position_embeddings": d["max_position_embeddings"]}, where)
    # transformers sets YaRN's attention_factor to 1 for V4 unless the file gives one
    attn_factor = comp.get("attention_factor", 1.0) if out["rope_type"] == "yarn" else 1.0
    return {**out, "rope_theta": theta, "compress_rope_theta": comp_theta, "rope_attn_factor": attn_factor,
            "mscale": 0.0}


def from_v4_config(d: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """flyer fields of a ``deepseek_v4`` config dict."""
    if "moe_intermediate_size" not in d and "intermediate_size" in d:  # DeepseekV4Config's alias for it
        d = {**d, "moe_intermediate_size": d["intermediate_size"]}
    d = {**_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
    for k in _INTS + _NUMBERS:
        v = d[k]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or (k in _INTS and not float(v).is_integer()):
            raise _bad(where, k, f"expected {'an integer' if k in _INTS else 'a number'} (got {v!r:.40})")
    for k, allowed in (("num_key_value_heads", (1,)), ("hidden_act", ("silu",)), ("attention_bias", (False,)),
                       ("mlp_bias", (False,)), ("norm_topk_prob", (True,)),
                       ("scoring_func", ("sqrtsoftplus", "sigmoid", "softmax"))):
        if d.get(k, allowed[0]) not in allowed:  # transformers' V4 router renormalises whatever norm_topk_prob says
            raise _bad(where, k, f"unsupported value {d[k]!r:.40} (supported: {', '.join(map(repr, allowed))})")
    for k, least in (("hc_mult", 2), ("n_shared_experts", 1)):  # flyer's hc_mult 1 is the plain residual
        if d[k] < least or (k == "n_shared_experts" and d[k] != 1):
            raise _bad(where, k, f"only {'>= 2' if k == 'hc_mult' else '1'} is supported (got {d[k]!r})")
    if d["swiglu_limit"] <= 0:  # transformers clamps at whatever the file says: 0 would zero every expert
        raise _bad(where, "swiglu_limit", f"must be > 0 (got {d['swiglu_limit']!r})")
    n_layers, head_dim = int(d["num_hidden_layers"]), int(d["head_dim"])
    rope_dim, factor = d.get("qk_rope_head_dim"), d.get("partial_rotary_factor")
    for k, v, types, top in (("qk_rope_head_dim", rope_dim, int, head_dim), ("partial_rotary_factor", factor,
                                                                            (int, float), 1)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, types) or not 0 < v <= top):
            raise _bad(where, k, f"expected a number in (0, {top}] (got {v!r:.40})")
    factor = factor or ((rope_dim / head_dim) if rope_dim else 64 / 512)
    rope_dim = int(head_dim * factor)
    if d.get("qk_rope_head_dim") not in (None, rope_dim):
        raise _bad(where, "qk_rope_head_dim", f"{d['qk_rope_head_dim']} disagrees with partial_rotary_factor "
                                              f"{factor} of head_dim {head_dim}")
    ratios, csa = _layer_ratios(d, where, n_layers)
    return {
        "vocab_size": d["vocab_size"], "dim": d["hidden_size"], "n_layers": n_layers, "n_dense_layers": 0,
        "attn": "hybrid", "n_heads": d["num_attention_heads"], "head_dim": head_dim, "qk_rope_head_dim": rope_dim,
        "q_lora_rank": d["q_lora_rank"], "window_size": d["sliding_window"], "compress_ratios": ratios,
        "csa_ratio": csa, "o_groups": d["o_groups"], "o_lora_rank": d["o_lora_rank"],
        "index_topk": d["index_topk"] if csa in ratios else 0, "index_n_heads": d["index_n_heads"],
        "index_head_dim": d["index_head_dim"], "hc_mult": d["hc_mult"], "hc_sinkhorn_iters": d["hc_sinkhorn_iters"],
        "hc_eps": d["hc_eps"], "moe_inter_dim": d["moe_intermediate_size"], "n_routed_experts": d["n_routed_experts"],
        "n_shared_experts": d["n_shared_experts"], "n_activated_experts": d["num_experts_per_tok"],
        "n_expert_groups": 1, "n_limited_groups": 1, "score_func": d["scoring_func"], "norm_topk_prob": True,
        "router_bias": True, "route_scale": d["routed_scaling_factor"],
        "n_hash_layers": _hash_layers(d, where, n_layers),
        "swiglu_limit": d["swiglu_limit"], "norm_eps": d["rms_norm_eps"], "max_seq_len": d["max_position_embeddings"],
        "init_std": d["initializer_range"], "tie_embeddings": bool(d.get("tie_word_embeddings", False)),
        "mtp_depth": v4_mtp_depth(d, where), **_rope(d, where),
    }


def v4_mtp_depth(d: dict[str, Any], where: str = "config.json") -> int:
    """The MTP layers a ``deepseek_v4`` config declares (``num_nextn_predict_layers``, DeepseekV4Config's default
    1), each window-only: an extra ``compress_ratios`` entry for one that is not 0 is a ``ConfigError``."""
    depth = d.get("num_nextn_predict_layers", 1)
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise _bad(where, "num_nextn_predict_layers", f"expected an integer >= 0 (got {depth!r:.40})")
    n_layers, ratios = d.get("num_hidden_layers", _DEFAULTS["num_hidden_layers"]), d.get("compress_ratios")
    if isinstance(ratios, list) and any(r != 0 for r in ratios[n_layers:n_layers + depth]):
        raise _bad(where, "compress_ratios", f"the MTP layers' entries (after the {n_layers} layers') must be 0: "
                                             f"flyer's MTP attends by the sliding window only (got "
                                             f"{ratios[n_layers:n_layers + depth]})")
    return depth


def to_v4_config(cfg) -> dict[str, Any]:
    """The architecture keys of flyer's ``cfg`` (attn 'hybrid') as transformers' DeepseekV4Config reads them."""
    layer_types = [_WINDOW if r == 0 else _CSA if r == cfg.csa_ratio else _HCA for r in cfg.compress_ratios]
    hca = sorted({r for r in cfg.compress_ratios if r not in (0, cfg.csa_ratio)})
    if len(hca) > 1:
        raise ConfigError(f"config field 'compress_ratios': transformers' DeepseekV4 has one HCA ratio (got {hca})")
    if cfg.swiglu_limit <= 0:  # transformers' DeepseekV4 always clamps
        raise ConfigError("config field 'swiglu_limit': DeepSeek-V4 exports need a clamp > 0 (got 0: none)")
    scaled = cfg.rope_factor > 1.0
    compress = {"rope_type": cfg.rope_type if scaled else "default", "rope_theta": cfg.compress_rope_theta,
                "partial_rotary_factor": cfg.rope_dim / cfg.head_dim}
    if scaled:
        if cfg.rope_type != "yarn":
            raise ConfigError(f"config field 'rope_type': DeepSeek-V4 exports YaRN scaling only "
                              f"(got {cfg.rope_type!r})")
        compress.update(factor=cfg.rope_factor, original_max_position_embeddings=cfg.original_seq_len,
                        beta_fast=cfg.beta_fast, beta_slow=cfg.beta_slow, attention_factor=cfg.rope_attn_factor)
    return {
        "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": 1, "head_dim": cfg.head_dim, "q_lora_rank": cfg.q_lora_rank,
        "qk_rope_head_dim": cfg.rope_dim, "partial_rotary_factor": cfg.rope_dim / cfg.head_dim,
        "sliding_window": cfg.window_size, "layer_types": layer_types,
        "compress_rates": {_CSA: cfg.csa_ratio, _HCA: hca[0] if hca else _COMPRESS_RATES[_HCA]},
        # each layer's own ratio, as DeepSeek's inference code reads it (transformers takes layer_types before it)
        "compress_ratios": list(cfg.compress_ratios) + [0] * cfg.mtp_depth,
        "compress_rope_theta": cfg.compress_rope_theta, "o_groups": cfg.o_groups, "o_lora_rank": cfg.o_lora_rank,
        "index_topk": max(cfg.index_topk, 1), "index_n_heads": cfg.index_n_heads, "index_head_dim": cfg.index_head_dim,
        "hc_mult": cfg.hc_mult, "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters, "hc_eps": cfg.hc_eps,
        "moe_intermediate_size": cfg.moe_inter_dim, "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts, "num_experts_per_tok": cfg.n_activated_experts,
        "scoring_func": cfg.score_func, "norm_topk_prob": True, "routed_scaling_factor": cfg.route_scale,
        "mlp_layer_types": ["hash_moe"] * cfg.n_hash_layers + ["moe"] * (cfg.n_layers - cfg.n_hash_layers),
        "swiglu_limit": cfg.swiglu_limit, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"main": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                                     "partial_rotary_factor": cfg.rope_dim / cfg.head_dim}, "compress": compress},
        "num_nextn_predict_layers": cfg.mtp_depth,
    }


__all__ = ["from_v4_config", "to_v4_config", "v4_mtp_depth"]
