"""Hugging Face / DeepSeek ``config.json`` -> flyer model fields (no torch: ``flyer.config`` uses it).

Reads every spelling the ecosystem writes for the architectures flyer runs:

- transformers 5 (``save_pretrained``): RoPE in ``rope_parameters`` (``rope_theta``, ``rope_type``,
  YaRN keys); no ``topk_method`` / ``scoring_func`` for DeepseekV3;
- transformers 4 and DeepSeek's hub files: ``rope_theta`` plus ``rope_scaling`` (``type`` or
  ``rope_type``), ``topk_method``, ``scoring_func``, ``quantization_config``.

RoPE scaling: ``default``, ``yarn`` (DeepSeek), ``llama3`` (Llama 3.1 / 3.2 / 3.3) and ``linear``;
``dynamic`` (NTK, recomputed per sequence length) and the others are refused.

The architecture (``model_type``) decides semantics as transformers implements them: DeepseekV3
always routes with sigmoid scores, the ``e_score_correction_bias`` and expert groups; DeepseekV2
with softmax, ``greedy`` or ``group_limited_greedy`` (max score per group). Mistral is Llama with
an optional sliding window on every layer (``window_size`` / ``sliding_layers``).
Qwen2 has a bias on q, k and v; Qwen3 none, but an RMSNorm over each head's query and key (``qk_norm``) and a
``head_dim`` of its own (transformers' default 128, not hidden_size / heads); both slide the layers
``layer_types`` lists, or else with ``use_sliding_window`` those ``max_window_layers`` and up. Qwen3-MoE is Qwen3's
attention (its ``head_dim`` defaulting to hidden_size / heads; every layer slides with ``use_sliding_window``) with
a sparse MoE block in each layer that ``mlp_only_layers`` does not list and ``decoder_sparse_step`` does not
skip: softmax over every expert in FP32, top-k, renormalised when ``norm_topk_prob``; no shared expert, no
scaling. flyer runs its dense layers first, so only configs whose dense layers are layers 0..k-1 are read. Mixtral
is Mistral's attention (its window too) with the sparse block in
every layer, its experts ``intermediate_size`` wide: softmax over every expert in FP32, top-k, always
renormalised; no shared expert, no dense layer, no head norms. GLM-4.5 / 4.6 (``glm4_moe``) is GQA
with q/k/v biases (``attention_bias``: o_proj has none), optional head norms (``use_qk_norm``) and
partial rotary (``partial_rotary_factor``, 0.5 when missing: each head's first channels rotate, in
rotate-half layout) with DeepseekV3's router and MTP layers (sigmoid, correction bias, groups, a
shared expert, ``first_k_dense_replace`` dense layers first). GLM-4.7-Flash (``glm4_moe_lite``) is
DeepseekV3 whose dense layers ``mlp_layer_types`` names. DeepSeek-V3.2 (``deepseek_v32``) is DeepseekV3
(its MLA always interleaved: it has no ``rope_interleave``) with DeepSeek Sparse Attention
(``index_topk``, ``index_n_heads``, ``index_head_dim``), its dense layers ``mlp_layer_types``' or else
``first_k_dense_replace``'s, and DeepseekV32Config's defaults for missing fields (those of V3.2-Exp).
GLM-5 / GLM-5.1 / GLM-5.2 (``glm_moe_dsa``) is DeepSeek-V3.2 (GlmMoeDsaConfig's defaults: GLM-5's) whose
indexer rotates interleaved pairs (``indexer_rope_interleave`` and ``rope_interleave`` true or missing), with
GLM-5.2's cross-layer top-k sharing (IndexShare): ``indexer_types`` marks each layer "full" (its
own indexer) or "shared" (none: it reuses the selection of the nearest full layer before it); missing, it
comes from ``index_topk_pattern`` ("F"/"S" per layer, or a list), else ``index_topk_freq`` and
``index_skip_topk_offset`` (default 1 and 2: every layer full), as GlmMoeDsaConfig derives it.
Mistral 4 (``mistral4``) is DeepseekV3's MLA and MoE with a softmax router and Llama 4's query temperature
(``flyer.interop.hf_config_mistral4``). Meituan's LongCat-Flash (``longcat_flash``) is DeepseekV3's MLA in block
pairs sharing a shortcut MoE, with zero-computation experts (``flyer.interop.hf_config_longcat``).
Kimi K2.5 (``kimi_k25``) is a vision-language wrapper around a DeepseekV3 text model (``text_config``, its
``model_type`` ``deepseek_v3`` or the hub's ``kimi_k2``): flyer reads that text model (``text_config``), its
embeddings tied as the wrapper's ``tie_word_embeddings`` says (transformers ties by it, default true, whatever
the text config says); the vision tower and projector are not read (``flyer.interop.hf``: text in, text out).
Kimi K2 / K2-Thinking (top-level ``model_type`` ``kimi_k2``) is a DeepseekV3 config. Upstage's Solar Open
(``solar_open``) and rednote's dots.llm1 (``dots1``) are GLM-4.5 with fixed fields (their notes below).
Quantized weights: DeepSeek's FP8 blocks, compressed-tensors' integer (Kimi-K2-Thinking's, K2.5's INT4; on the
wrapper or its text config), FP8 and NVFP4 weights, and ModelOpt's FP8 and NVFP4 (``flyer.interop.hf_config_quant``);
any other quantization is refused.
A field a file leaves out takes its transformers config class's default, and an alias names its field
(``flyer.interop.hf_defaults``). A value flyer cannot run is a ``ConfigError`` naming the file and the field,
never silently ignored.
"""

from __future__ import annotations

from typing import Any

from flyer.errors import ConfigError
from flyer.interop.hf_config_longcat import longcat_as_mla, longcat_fields
from flyer.interop.hf_config_mistral4 import MISTRAL4_DEFAULTS, MISTRAL4_ROPE, mistral4_fields
from flyer.interop.hf_config_quant import compressed_scheme
from flyer.interop.hf_config_v4 import from_v4_config
from flyer.interop.hf_defaults import with_class_defaults
from flyer.interop.hf_rope import ROPE_TYPES, rope_dict, rope_fields, yarn_attention_factor, yarn_mscale
from flyer.limits import MAX_LAYERS, SIZE_LIMITS

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral",
                         "glm4_moe", "glm4_moe_lite", "deepseek_v32", "glm_moe_dsa", "deepseek_v4", "mistral4",
                         "kimi_k2", "kimi_k25", "solar_open", "dots1", "longcat_flash")
# vision-language wrappers whose text model (``text_config``) flyer reads, and the text model types each holds
WRAPPER_MODEL_TYPES = {"kimi_k25": ("deepseek_v3", "kimi_k2")}
# the MLA architectures (as read, after _SAME_AS)
MLA_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "mistral4", "longcat_flash")
# the GQA architectures flyer reads and writes (dense, and Qwen3-MoE / Mixtral), all laid out for rotate-half
# RoPE and without an MTP module (as read, after _SAME_AS)
GQA_MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral")
# GQA laid out for rotate-half RoPE too, but with DeepSeek's MTP layers (GLM-4.5)
HALF_ROPE_MODEL_TYPES = GQA_MODEL_TYPES + ("mistral", "glm4_moe")  # mistral: what a sliding Llama exports as
# model types that compute as another flyer reads: Mistral is Llama (with its sliding window); GLM-4.7-Flash
# (glm4_moe_lite) is DeepseekV3's MLA, router and MTP layer, its dense layers named by mlp_layer_types;
# DeepSeek-V3.2 is DeepseekV3 with the DSA indexer (read from its own keys), GLM-5 V3.2 with shared selections;
# Kimi K2 (Moonshot's hub config: model_type kimi_k2, architectures DeepseekV3ForCausalLM) is DeepseekV3
_SAME_AS = {"mistral": "llama", "glm4_moe_lite": "deepseek_v3", "deepseek_v32": "deepseek_v3",
            "glm_moe_dsa": "deepseek_v3", "kimi_k2": "deepseek_v3", "solar_open": "glm4_moe", "dots1": "glm4_moe"}
# Upstage's Solar Open (solar_open) is GLM-4.5's MoE on Llama attention: every layer MoE, full rotary, no head
# norms, no MTP layer; the fields its modeling does not have (its config deletes them): fixed, whatever a
# config.json says
_SOLAR_OPEN_FIXED = {"first_k_dense_replace": 0, "partial_rotary_factor": 1.0, "use_qk_norm": False,
                     "num_nextn_predict_layers": 0}
# rednote's dots.llm1 (dots1) is DeepseekV3's MoE on Qwen3 attention (head norms, whole heads rotating, no bias, no
# MTP layer): GLM-4.5's with these fixed; Dots1Config has no default for the expert counts (transformers cannot
# build a model without them): flyer asks for them
_DOTS1_FIXED = {"partial_rotary_factor": 1.0, "use_qk_norm": True, "num_nextn_predict_layers": 0}
_DOTS1_REQUIRED = ("n_routed_experts", "n_shared_experts", "num_experts_per_tok")
# the architectures with DeepSeek Sparse Attention's indexer (read from index_topk, index_n_heads, index_head_dim)
DSA_MODEL_TYPES = ("deepseek_v32", "glm_moe_dsa")
# Keys that only exist in Hugging Face configs (their presence switches the parser).
HF_KEYS = frozenset({"hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"})


def is_hf_config(d: dict[str, Any]) -> bool:
    return any(k in d for k in HF_KEYS) or d.get("model_type") in WRAPPER_MODEL_TYPES


def text_config(d: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """The config of the text model a wrapper (``WRAPPER_MODEL_TYPES``: Kimi K2.5) holds, as a DeepseekV3 config
    with the wrapper's ``tie_word_embeddings`` (default true, as Kimi_K25Config's: transformers ties by it); any
    other config as it is."""
    kinds = WRAPPER_MODEL_TYPES.get(d.get("model_type"))
    if kinds is None:
        return d
    text = d.get("text_config")
    if not isinstance(text, dict):
        raise _bad(where, "text_config", f"expected the text model's config object (got {text!r:.40})")
    if text.get("model_type", kinds[0]) not in kinds:
        raise _bad(where, "text_config.model_type", f"unsupported text model {text['model_type']!r:.40} (supported: "
                                                    f"{', '.join(kinds)})")
    out = {**text, "model_type": kinds[0], "tie_word_embeddings": d.get("tie_word_embeddings", True)}
    quant = d.get("quantization_config") or text.get("quantization_config")  # Kimi K2.5's: in text_config
    return out if quant is None else {**out, "quantization_config": quant}


def _bad(where: str, field: str, problem: str) -> ConfigError:
    return ConfigError(f"{where}: field '{field}': {problem}")


def model_type(d: dict[str, Any], where: str = "config.json") -> str:
    """The architecture of an HF config: its ``model_type``, or (files without one) inferred from
    the MLA keys; ``mistral`` reads as ``llama`` (``from_hf_config`` refuses a sliding window).
    Anything but ``SUPPORTED_MODEL_TYPES`` is a ``ConfigError``; a wrapper's is its text model's."""
    d = text_config(d, where)
    mt = d.get("model_type")
    if mt is None:
        if "kv_lora_rank" not in d:
            mt = "llama"
        elif d.get("topk_method") == "noaux_tc" or d.get("scoring_func") == "sigmoid":
            mt = "deepseek_v3"
        else:
            mt = "deepseek_v2"
    if mt not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(SUPPORTED_MODEL_TYPES)
        raise _bad(where, "model_type", f"unsupported architecture {mt!r} (supported: {supported})")
    return _SAME_AS.get(mt, mt)


def _require(d: dict[str, Any], where: str, field: str, allowed: tuple, default: Any) -> Any:
    v = d.get(field, default)
    if v not in allowed:
        raise _bad(where, field, f"unsupported value {v!r} (supported: {', '.join(map(repr, allowed))})")
    return v


_REQUIRED_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
_MLA_INTS = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
# read as ``d.get(k) or default``: null means the default
_OPTIONAL_INTS = ("q_lora_rank", "first_k_dense_replace", "moe_intermediate_size", "n_routed_experts",
                  "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group", "num_nextn_predict_layers",
                  "num_mtp_layers", "num_key_value_heads", "head_dim", "num_experts", "num_local_experts",
                  "decoder_sparse_step")
_INTS = ("intermediate_size", "max_position_embeddings", "index_topk", "index_n_heads", "index_head_dim")
_NUMBERS = ("rms_norm_eps", "initializer_range", "routed_scaling_factor", "rope_theta", "aux_loss_alpha",
            "router_aux_loss_coef", "router_jitter_noise")


def _check_types(d: dict[str, Any], where: str, mla: bool) -> None:
    """Each field flyer reads has its JSON type, so a bad one is named here, not a TypeError later."""
    for k in _REQUIRED_INTS + (_MLA_INTS if mla else ()):
        try:
            d[k]  # a config file's RequiredFields words its own error
        except KeyError:
            raise _bad(where, k, "required field is missing") from None
    for k in _REQUIRED_INTS + (_MLA_INTS if mla else ()) + _OPTIONAL_INTS + _INTS + _NUMBERS:
        v = d.get(k)
        if v is None and (k in _OPTIONAL_INTS or k not in d):
            continue
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if not number or (k not in _NUMBERS and isinstance(v, float) and not v.is_integer()):  # 2.0 reads as 2
            raise _bad(where, k, f"expected {'an integer' if k not in _NUMBERS else 'a number'} (got {v!r:.40})")
        # sizes and counts: read (divided by, iterated over) before ModelConfig validates what they make
        least = 1 if k in _REQUIRED_INTS or k == "max_position_embeddings" else 0
        if k not in _NUMBERS and v < least:
            raise _bad(where, k, f"must be >= {least} (got {v})")


def _window(where: str, window: Any) -> int:
    """A file's ``sliding_window`` as flyer's ``window_size`` (transformers masks key s from query t iff
    s <= t - window), kept where it reaches past ``max_position_embeddings`` too: a run may train longer rows (``train
    --init --seq-len``), which transformers would slide; 0 past any row flyer runs (``SIZE_LIMITS``)."""
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise _bad(where, "sliding_window", f"expected a positive integer or null (got {window!r:.40})")
    return window if window <= SIZE_LIMITS["window_size"] else 0


def _layer_types(d: dict[str, Any], where: str, n_layers: int) -> list[int] | None:
    """The layers a file's ``layer_types`` slides, where it lists them (None: it does not)."""
    types = d.get("layer_types")
    if types is None:
        return None
    if not isinstance(types, list) or len(types) != n_layers:
        raise _bad(where, "layer_types", f"expected a list of {n_layers} layer types (got {types!r:.60})")
    for i, t in enumerate(types):
        if t not in ("full_attention", "sliding_attention"):
            raise _bad(where, "layer_types", f"layer {i} is {t!r:.40}: expected 'full_attention' or "
                                             f"'sliding_attention'")
    return [i for i, t in enumerate(types) if t == "sliding_attention"]


def _sliding_fields(d: dict[str, Any], where: str, mt: str, n_layers: int) -> dict[str, Any]:
    """flyer's ``window_size`` / ``sliding_layers`` for a GQA family's sliding window, as transformers 5 slides:
    Mistral, Mixtral and Qwen3-MoE every layer when ``sliding_window`` is set (Qwen3-MoE: and
    ``use_sliding_window``); Qwen2 and Qwen3 the layers ``layer_types`` lists, or else those ``max_window_layers``
    and up, with ``use_sliding_window`` on (its window otherwise null); dots1 as Qwen2 with no switch."""
    if mt in ("mistral", "mixtral", "qwen3_moe"):
        window = d.get("sliding_window", 4096 if mt == "qwen3_moe" else None)
        if mt == "qwen3_moe" and not d.get("use_sliding_window"):
            window = None
        listed = list(range(n_layers)) if window is not None else []
    elif mt in ("qwen2", "qwen3", "dots1"):
        window = d.get("sliding_window", 4096)
        if mt != "dots1" and not d.get("use_sliding_window"):
            window = None
        listed = _layer_types(d, where, n_layers)
        if listed is None:
            first = d.get("max_window_layers", 28)  # Qwen2Config's default (dots1's is in its class defaults)
            if not isinstance(first, int) or isinstance(first, bool):
                raise _bad(where, "max_window_layers", f"expected an integer (got {first!r:.40})")
            listed = list(range(max(first, 0), n_layers)) if window is not None else []
        elif listed and window is None:  # transformers cannot build its mask
            raise _bad(where, "layer_types", f"layer {listed[0]} slides but the window is null "
                                             f"({'sliding_window' if mt == 'dots1' else 'use_sliding_window'})")
    else:
        if d.get("use_sliding_window"):
            raise _bad(where, "use_sliding_window", "sliding-window attention is supported for Mistral, Mixtral, "
                                                    "Qwen2, Qwen3(-MoE) and dots1 only")
        return {}
    size = _window(where, window) if listed else 0
    return dict(window_size=size, sliding_layers=tuple(listed)) if size else {}


def balance_scale(n_activated: int, n_moe_layers: int) -> float:
    """flyer's ``seq_aux_alpha`` per unit of transformers' ``router_aux_loss_coef`` (Qwen3-MoE, Mixtral): their
    loss pools every layer's routing over the batch and is K (experts per token) at balance; flyer's is per layer
    and sequence, 1 at balance, summed over the L MoE layers. K / L weighs a balanced router's gradient alike
    (the coefficient as it stands weighed flyer's L / K times: 6x for Qwen3-30B-A3B, 16x for Mixtral)."""
    return n_activated / max(n_moe_layers, 1)


def _qwen3_moe_fields(d: dict[str, Any], where: str, n_layers: int) -> dict[str, Any]:
    """Qwen3-MoE's FFN fields. transformers gives layer i the sparse block unless ``mlp_only_layers``
    lists it or ``(i + 1) % decoder_sparse_step != 0``; flyer's dense layers are its first
    ``n_dense_layers``, so any other pattern is refused naming the field that makes it. Missing
    fields take Qwen3MoeConfig's defaults (128 experts, top-8, 768, norm_topk_prob false)."""
    n_experts = next((d[k] for k in ("num_experts", "num_local_experts") if d.get(k) is not None), 128)
    if n_experts == 0:  # transformers: every layer is the dense MLP, whatever the pattern fields say
        return dict(n_routed_experts=0, n_shared_experts=0, n_dense_layers=n_layers)
    step = d.get("decoder_sparse_step") or 1
    if step < 1:
        raise _bad(where, "decoder_sparse_step", f"must be >= 1 (got {step})")
    only = d.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
        raise _bad(where, "mlp_only_layers", f"expected a list of layer indices (got {only!r:.60})")
    by_step = [i for i in range(n_layers) if (i + 1) % step]
    dense = sorted(set(by_step) | {i for i in only if 0 <= i < n_layers})  # a listed index past the end: none
    if dense != list(range(len(dense))):
        field = "decoder_sparse_step" if by_step != list(range(len(by_step))) else "mlp_only_layers"
        raise _bad(where, field, f"dense layers {dense[:8]}{'...' if len(dense) > 8 else ''} are not the first "
                                 f"layers: flyer runs its dense (MLP) layers first, then the MoE layers")
    aux = d.get("router_aux_loss_coef")
    k = d.get("num_experts_per_tok") or 8
    return dict(n_routed_experts=n_experts, n_shared_experts=0, n_dense_layers=len(dense),
                moe_inter_dim=d.get("moe_intermediate_size") or 768, n_activated_experts=k,
                score_func="softmax", router_bias=False, norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                route_scale=1.0, n_expert_groups=1, n_limited_groups=1,
                # transformers adds its balance loss only with output_router_logits (false in the released
                # configs, which are for inference); flyer trains with its own, weighed as transformers' would be
                seq_aux_alpha=(0.001 if aux is None else aux) * balance_scale(k, n_layers - len(dense)))


def _mixtral_fields(d: dict[str, Any], where: str, n_layers: int) -> dict[str, Any]:
    """Mixtral's FFN fields: a sparse block in every layer (no dense layer, no shared expert), its
    experts ``intermediate_size`` wide; missing fields take MixtralConfig's defaults (8 experts, top-2).
    transformers' router jitter multiplies the input by noise in training, which flyer does not."""
    n_experts = next((d[k] for k in ("num_local_experts", "num_experts") if d.get(k) is not None), 8)
    if n_experts < 1:
        raise _bad(where, "num_local_experts", f"must be >= 1: Mixtral routes every layer (got {n_experts})")
    if d.get("router_jitter_noise"):
        raise _bad(where, "router_jitter_noise", f"only 0 is supported (got {d['router_jitter_noise']!r})")
    aux = d.get("router_aux_loss_coef")
    inter = d.get("intermediate_size", 14336)
    k = d.get("num_experts_per_tok") or 2
    return dict(n_routed_experts=n_experts, n_shared_experts=0, n_dense_layers=0, inter_dim=inter,
                moe_inter_dim=inter, n_activated_experts=k,
                score_func="softmax", router_bias=False, norm_topk_prob=True, route_scale=1.0, n_expert_groups=1,
                n_limited_groups=1, seq_aux_alpha=(0.001 if aux is None else aux) * balance_scale(k, n_layers))


def _glm4_moe_fields(d: dict[str, Any], where: str, n_layers: int, head_dim: int) -> dict[str, Any]:
    """GLM-4.5's attention and FFN fields. transformers rotates each head's first
    int(head_dim * partial_rotary_factor) channels (rotate-half pairs within them) and passes the rest;
    its router is DeepseekV3's. Missing fields take Glm4MoeConfig's defaults (0.5 rotary, 128 experts
    top-8, 1408 wide, one shared expert, one dense layer, norm_topk_prob true, scaling 1, no head norms)."""
    rp = rope_dict(d)[1]
    factor = rp.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.5))
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not 0 < factor <= 1:
        raise _bad(where, "partial_rotary_factor", f"expected a number in (0, 1] (got {factor!r:.40})")
    rotary = int(head_dim * factor)  # transformers' rotary width
    if rotary == 0 or rotary % 2:
        raise _bad(where, "partial_rotary_factor", f"{factor} of head_dim {head_dim} rotates {rotary} channels: "
                                                   f"only an even number > 0 is supported")
    n_experts = next((d[k] for k in ("n_routed_experts", "num_local_experts") if d.get(k) is not None), 128)
    if n_experts < 1:
        raise _bad(where, "n_routed_experts", f"must be >= 1: GLM-4.5 routes every layer past the dense ones "
                                              f"(got {n_experts})")
    shared, dense = (1 if d.get(k) is None else d[k] for k in ("n_shared_experts", "first_k_dense_replace"))
    if shared < 1:  # transformers would build a zero-width shared expert
        raise _bad(where, "n_shared_experts", f"only >= 1 is supported (got {shared!r})")
    for k in ("attention_bias", "use_qk_norm", "norm_topk_prob"):
        if not isinstance(d.get(k, False), bool):
            raise _bad(where, k, f"expected true or false (got {d[k]!r:.40})")
    return dict(rotary_dim=0 if rotary == head_dim else rotary, attn_bias=d.get("attention_bias", False),
                qk_norm=d.get("use_qk_norm", False), n_routed_experts=n_experts, n_shared_experts=shared,
                n_dense_layers=min(dense, n_layers),
                moe_inter_dim=d.get("moe_intermediate_size") or 1408,
                n_activated_experts=d.get("num_experts_per_tok") or 8, score_func="sigmoid", router_bias=True,
                n_expert_groups=d.get("n_group") or 1, n_limited_groups=d.get("topk_group") or 1,
                norm_topk_prob=d.get("norm_topk_prob", True), route_scale=d.get("routed_scaling_factor", 1.0),
                mtp_depth=d.get("num_nextn_predict_layers", d.get("num_mtp_layers", 1)) or 0, seq_aux_alpha=0.0001)


def _indexer_types(d: dict[str, Any], where: str, n_layers: int) -> tuple[str, ...]:
    """GLM-5's per-layer indexer types as GlmMoeDsaConfig reads them: ``indexer_types``, else
    ``index_topk_pattern`` ("F"/"S" per layer, or a list of types), else layer i full when
    max(i - offset + 1, 0) % freq == 0 (``index_topk_freq``, at least 1, default 1;
    ``index_skip_topk_offset``, default 2). Each entry "full" or "shared", layer 0 full (a shared layer
    reuses a selection made before it)."""
    field, types = "indexer_types", d.get("indexer_types")
    if types is None and d.get("index_topk_pattern") is not None:
        field, pattern = "index_topk_pattern", d["index_topk_pattern"]
        if isinstance(pattern, str):
            if not set(pattern) <= {"F", "S"}:
                raise _bad(where, field, f"expected one 'F' (full) or 'S' (shared) per layer (got {pattern!r:.60})")
            pattern = ["full" if c == "F" else "shared" for c in pattern]
        types = pattern
    elif types is None:
        freq, offset = d.get("index_topk_freq", 1), d.get("index_skip_topk_offset", 2)
        for k, v in (("index_topk_freq", freq), ("index_skip_topk_offset", offset)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise _bad(where, k, f"expected an integer (got {v!r:.40})")
        field = "index_skip_topk_offset" if offset < 1 else "index_topk_freq"
        types = ["full" if max(i - offset + 1, 0) % max(freq, 1) == 0 else "shared" for i in range(n_layers)]
    if not isinstance(types, list) or len(types) != n_layers or not set(types) <= {"full", "shared"}:
        raise _bad(where, field, f"expected {n_layers} entries of 'full' or 'shared' (got {types!r:.60})")
    if types[0] != "full":
        raise _bad(where, field, "layer 0 is 'shared': a shared layer reuses the top-k selection of a full layer "
                                 "before it, and layer 0 has none")
    return tuple(types)


def _mla_dense_layers(d: dict[str, Any], where: str, n_layers: int) -> int:
    """The leading dense layers of a DeepSeek config: ``first_k_dense_replace``. transformers' Glm4MoeLite
    reads ``mlp_layer_types`` instead (default: layer 0 dense, the rest sparse) and ignores that key;
    DeepseekV32 and GlmMoeDsa read ``mlp_layer_types`` too, and derive it from ``first_k_dense_replace``
    (default 3) only when it is missing. Where both are given, a disagreeing ``first_k_dense_replace`` is refused
    rather than read one way by flyer and another by transformers."""
    mt = d.get("model_type")
    first_k = min(d.get("first_k_dense_replace") or 0, n_layers)
    if mt not in ("glm4_moe_lite",) + DSA_MODEL_TYPES:
        return first_k
    kinds = d.get("mlp_layer_types")
    if kinds is None and mt in DSA_MODEL_TYPES:
        return min(d.get("first_k_dense_replace", 3) or 0, n_layers)
    if kinds is None:
        kinds = ["dense"] + ["sparse"] * (n_layers - 1)
    elif not isinstance(kinds, list) or len(kinds) != n_layers or not set(kinds) <= {"dense", "sparse"}:
        raise _bad(where, "mlp_layer_types", f"expected {n_layers} entries of 'dense' or 'sparse' (got {kinds!r:.60})")
    dense = kinds.count("dense")
    if kinds[:dense] != ["dense"] * dense:
        raise _bad(where, "mlp_layer_types", "dense layers after sparse ones: flyer runs its dense (MLP) layers "
                                             "first, then the MoE layers")
    if "first_k_dense_replace" in d and first_k != dense:
        raise _bad(where, "first_k_dense_replace", f"{d['first_k_dense_replace']} disagrees with mlp_layer_types' "
                                                   f"{dense} dense layers, which transformers follows")
    return dense


def from_hf_config(d: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """flyer ``ModelConfig`` fields from an HF / DeepSeek hub ``config.json`` dict (see module doc)."""
    d = text_config(d, where)
    mt = model_type(d, where)
    n_layers = d.get("num_hidden_layers")
    if isinstance(n_layers, (int, float)) and n_layers > MAX_LAYERS:  # before the per-layer lists built from it
        raise _bad(where, "num_hidden_layers", f"must be at most {MAX_LAYERS:,} (far past any published model; "
                                               f"got {n_layers!r:.40})")
    compressed_scheme(d, where)  # a quantization flyer cannot decode is refused here, naming the field
    if mt == "deepseek_v4":  # its own spellings (flyer.interop.hf_config_v4)
        return from_v4_config(d, where)
    d = with_class_defaults(d)
    if d.get("model_type") == "solar_open":
        d = {**d, **_SOLAR_OPEN_FIXED}
    if d.get("model_type") == "dots1":
        d = {**d, **_DOTS1_FIXED}
        for k in _DOTS1_REQUIRED:
            if d.get(k) is None:
                raise _bad(where, k, "missing: Dots1Config has no default for it (transformers cannot build the model)")
        _require(d, where, "attention_bias", (False,), False)  # Qwen3's bias would cover o_proj, flyer's GQA has none
    dsa = d.get("model_type") in DSA_MODEL_TYPES
    if mt == "mistral4":
        d = {**MISTRAL4_DEFAULTS, **d}
        if not d.get("rope_parameters") and not d.get("rope_scaling"):
            d["rope_parameters"] = MISTRAL4_ROPE
        if d.get("n_routed_experts") is None and d.get("num_local_experts") is not None:  # Mistral4Config's alias
            d["n_routed_experts"] = d["num_local_experts"]
    if mt == "longcat_flash":  # read in DeepseekV3's spelling (flyer.interop.hf_config_longcat)
        d = longcat_as_mla(d, where)
    mla = mt in MLA_MODEL_TYPES
    _check_types(d, where, mla)
    _require(d, where, "hidden_act", ("silu",), "silu")
    _require(d, where, "mlp_bias", (False,), False)
    n_layers = d["num_hidden_layers"]
    sliding = _sliding_fields(d, where, d.get("model_type"), n_layers)
    out: dict[str, Any] = {
        "vocab_size": d["vocab_size"], "dim": d["hidden_size"], "n_layers": n_layers,
        "n_heads": d["num_attention_heads"], "inter_dim": d.get("intermediate_size", 0),
        "norm_eps": d.get("rms_norm_eps", 1e-6), "max_seq_len": d.get("max_position_embeddings", 4096),
        "init_std": d.get("initializer_range", 0.02), "tie_embeddings": bool(d.get("tie_word_embeddings", False)),
        **rope_fields(d, where, mla, partial=mt in ("glm4_moe", "mistral4")),
    }
    if mla:
        _require(d, where, "attention_bias", (False,), False)
        _require(d, where, "moe_layer_freq", (1,), 1)
        out.update(
            attn="mla", q_lora_rank=d.get("q_lora_rank") or 0, kv_lora_rank=d["kv_lora_rank"],
            qk_nope_head_dim=d["qk_nope_head_dim"], qk_rope_head_dim=d["qk_rope_head_dim"],
            v_head_dim=d["v_head_dim"], n_dense_layers=_mla_dense_layers(d, where, n_layers),
            moe_inter_dim=d.get("moe_intermediate_size") or 0, n_routed_experts=d.get("n_routed_experts") or 0,
            n_shared_experts=d.get("n_shared_experts") or 0, n_activated_experts=d.get("num_experts_per_tok") or 1,
            route_scale=d.get("routed_scaling_factor", 1.0),
            mtp_depth=d.get("num_nextn_predict_layers", d.get("num_mtp_layers", 0)) or 0,
        )
        if dsa:
            if d["index_topk"] < 1:  # transformers would select no key at all
                raise _bad(where, "index_topk", f"must be >= 1 (got {d['index_topk']})")
            out.update(index_topk=d["index_topk"], index_n_heads=d["index_n_heads"], index_head_dim=d["index_head_dim"])
            if d["model_type"] == "glm_moe_dsa":  # listed even when all full: GLM-5's layout (flyer.config)
                out["indexer_types"] = _indexer_types(d, where, n_layers)
                # GLM-5.2's config says both rotate interleaved pairs, as transformers' GlmMoeDsa always does
                # (it ignores the keys); vLLM reads indexer_rope_interleave: a checkpoint saying otherwise would
                # be read one way by each, so it is refused rather than guessed
                for key in ("rope_interleave", "indexer_rope_interleave"):
                    _require(d, where, key, (True,), True)
            else:  # V3.2's indexer rotates halves (DeepSeek's fix of its inference code; vLLM: missing is false)
                _require(d, where, "indexer_rope_interleave", (False,), False)
        if mt == "mistral4":
            out.update(mistral4_fields(d, where))
        elif mt == "longcat_flash":
            out.update(longcat_fields(d))
        elif mt == "deepseek_v3":  # transformers' DeepseekV3 gate: sigmoid + correction bias + groups, always
            _require(d, where, "scoring_func", ("sigmoid",), "sigmoid")
            _require(d, where, "topk_method", ("noaux_tc",), "noaux_tc")
            out.update(score_func="sigmoid", router_bias=True, n_expert_groups=d.get("n_group") or 1,
                       n_limited_groups=d.get("topk_group") or 1, norm_topk_prob=bool(d.get("norm_topk_prob", True)),
                       # the report's alpha: the file's aux_loss_alpha (0.001) is V2's, and DeepSeek's V3 gate code
                       # never trains (noaux_tc asserts not training). Its initializer_range (0.02, not the
                       # report's 0.006) is kept: that code initialises with it
                       seq_aux_alpha=0.0001)
        else:
            _require(d, where, "scoring_func", ("softmax",), "softmax")
            topk = _require(d, where, "topk_method", ("greedy", "group_limited_greedy"), "greedy")
            grouped = topk == "group_limited_greedy"
            # transformers' DeepseekV2 router never renormalises the top-k weights (norm_topk_prob is unused)
            out.update(score_func="softmax", router_bias=False, norm_topk_prob=False,
                       n_expert_groups=(d.get("n_group") or 1) if grouped else 1,
                       n_limited_groups=(d.get("topk_group") or 1) if grouped else 1)
            if "aux_loss_alpha" in d:
                out["seq_aux_alpha"] = d["aux_loss_alpha"]
    else:  # GQA (Llama, Mistral, Qwen2, Qwen3(-MoE), Mixtral): softmax scale head_dim^-0.5 whatever mscale_all_dim says
        out["mscale"] = 0.0
        # their attention_bias also biases o_proj, which flyer's GQA has not (Mixtral's attention reads none)
        if mt in ("llama", "qwen3", "qwen3_moe"):
            _require(d, where, "attention_bias", (False,), False)
        n_kv = d.get("num_key_value_heads") or d["num_attention_heads"]
        # Qwen3Config's head_dim defaults to 128; the others' (Qwen3MoeConfig's, MixtralConfig's) to hidden_size / heads
        head_dim = d.get("head_dim") or (128 if mt == "qwen3" else d["hidden_size"] // d["num_attention_heads"])
        out.update(
            attn="gqa", n_kv_heads=n_kv, head_dim=head_dim, attn_bias=mt == "qwen2",
            qk_norm=mt in ("qwen3", "qwen3_moe"), mtp_depth=0, q_lora_rank=0, **sliding,
            **(_qwen3_moe_fields(d, where, n_layers) if mt == "qwen3_moe" else _mixtral_fields(d, where, n_layers)
               if mt == "mixtral" else dict(n_routed_experts=0, n_shared_experts=0, n_dense_layers=n_layers)),
        )
        if mt == "glm4_moe":
            out.update(_glm4_moe_fields(d, where, n_layers, head_dim))
    return out


__all__ = ["DSA_MODEL_TYPES", "GQA_MODEL_TYPES", "HALF_ROPE_MODEL_TYPES", "HF_KEYS", "MLA_MODEL_TYPES", "ROPE_TYPES",
           "SUPPORTED_MODEL_TYPES", "WRAPPER_MODEL_TYPES", "from_hf_config", "is_hf_config", "model_type",
           "rope_fields", "text_config",
           "yarn_attention_factor", "yarn_mscale"]
