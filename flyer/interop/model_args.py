"""DeepSeek's own ``config_*.json`` (``inference/configs`` of DeepSeek-V3 and V3.2-Exp) -> flyer model fields (no
torch: ``flyer.config`` uses it).

DeepSeek's ``generate.py`` reads such a file as ``ModelArgs(**json)``: a field it leaves out takes ``ModelArgs``'
default (``MODEL_ARGS``: DeepSeek-V2-Lite's values, softmax routing, no groups, route_scale 1), and its
``model.py`` decides the rest from them. flyer's own defaults are DeepSeek-V3's, so each of these is set here:

- the router's balancing bias exists only when ``dim == 7168`` (``Gate.__init__``: V3, V3.1, V3.2), and the
  top-k weights are renormalised only with sigmoid scores (``Gate.forward``);
- YaRN (its frequencies and the softmax's mscale^2) applies only when ``max_seq_len > original_seq_len``;
- the released checkpoints of the 7168-wide models carry one MTP layer (layer 61, which ``convert.py`` skips and
  ``model.py`` never builds), DeepSeek-V2's none: ``mtp_depth`` 1 or 0 by the same width;
- V3.2-Exp's indexer is there when the file names its fields (V3's ``model.py`` has none).

``max_seq_len`` is ``generate.py``'s cache length, not the model's context: a file without it leaves flyer's.
"""

from __future__ import annotations

from typing import Any

from flyer.errors import ConfigError

# DeepSeek-V3's inference/model.py ModelArgs (V3.2-Exp's adds the index_* fields, read only where a file gives them)
MODEL_ARGS: dict[str, Any] = {
    "max_batch_size": 8, "max_seq_len": 4096 * 4, "dtype": "bf16", "scale_fmt": None, "vocab_size": 102400,
    "dim": 2048, "inter_dim": 10944, "moe_inter_dim": 1408, "n_layers": 27, "n_dense_layers": 1, "n_heads": 16,
    "n_routed_experts": 64, "n_shared_experts": 2, "n_activated_experts": 6, "n_expert_groups": 1,
    "n_limited_groups": 1, "score_func": "softmax", "route_scale": 1.0, "q_lora_rank": 0, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "original_seq_len": 4096,
    "rope_theta": 10000.0, "rope_factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0}
INDEX_DEFAULTS = {"index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048}
INDEX_ARGS = tuple(INDEX_DEFAULTS)
# the width at which DeepSeek's Gate has a bias (and its releases an MTP layer)
V3_DIM = 7168


def is_model_args(d: dict[str, Any]) -> bool:
    """Whether ``d`` (a JSON config's object) is DeepSeek's format: every key a ModelArgs field."""
    return bool(d) and set(d) <= set(MODEL_ARGS) | set(INDEX_ARGS)


def from_model_args(d: dict[str, Any]) -> dict[str, Any]:
    """flyer's fields of a DeepSeek ``config_*.json`` object (module doc)."""
    args = {**MODEL_ARGS, **d}
    out = {k: v for k, v in args.items() if k not in ("max_batch_size", "max_seq_len", "dtype", "scale_fmt")}
    if "max_seq_len" in d:
        out["max_seq_len"] = d["max_seq_len"]
    for k in ("max_seq_len", "original_seq_len"):  # compared below, before ModelConfig validates what they make
        if not isinstance(args[k], (int, float)) or isinstance(args[k], bool):
            raise ConfigError(f"config field '{k}': expected an integer (got {args[k]!r:.40})")
    wide = args["dim"] == V3_DIM
    out.update(router_bias=wide, norm_topk_prob=args["score_func"] == "sigmoid", mtp_depth=int(wide), attn="mla",
               rope_type="yarn")
    if not args["max_seq_len"] > args["original_seq_len"]:  # model.py's precompute_freqs_cis and MLA's mscale
        out["rope_factor"] = 1.0
    if any(k in d for k in INDEX_ARGS):  # V3.2-Exp's ModelArgs defaults for the others
        out.update({**INDEX_DEFAULTS, **{k: d[k] for k in INDEX_ARGS if k in d}})
    return out


__all__ = ["INDEX_ARGS", "INDEX_DEFAULTS", "MODEL_ARGS", "V3_DIM", "from_model_args", "is_model_args"]
