"""Hugging Face tensor names and RoPE layouts: which HF tensor each flyer tensor is, and the rows to permute.

Tensor names follow transformers' DeepseekV3 / V2 / Llama / Qwen2 / Qwen3 / Qwen3-MoE / Mixtral layout (DeepSeek's
released checkpoints use the same names):

    flyer                          Hugging Face (layer i; MTP module k is layer n_layers + k)
    embed / norm / head            model.embed_tokens / model.norm / lm_head
    layers.i.attn_norm, ffn_norm   model.layers.i.input_layernorm, post_attention_layernorm
    attn.wq_a, q_norm, wq_b, wq    self_attn.q_a_proj, q_a_layernorm, q_b_proj, q_proj
    attn.wkv_a, kv_norm, wkv_b     self_attn.kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj
    attn.wk, wv, wo                self_attn.k_proj, v_proj, o_proj
    attn.q_head_norm, k_head_norm  self_attn.q_norm, k_norm (Qwen3's per-head RMSNorms; MLA's are above)
    attn.indexer.*                 self_attn.indexer.{wq_b,wk,weights_proj}, k_norm.{weight,bias} (V3.2, GLM-5)
    ffn.w1 / w2 / w3               mlp.gate_proj / down_proj / up_proj (dense and shared_experts)
    ffn.gate.weight, .bias         mlp.gate.weight, mlp.gate.e_score_correction_bias
    ffn.experts.w1[e] (stacked)    mlp.experts.e.gate_proj (one tensor per expert, as save_pretrained writes)
    ffn.experts.w1|w3, w2          fused: mlp.experts.gate_up_proj (E, 2F, D), down_proj (E, D, F) (Mistral 4)
    ffn.gate, ffn.experts.w1[e]    Mixtral: block_sparse_moe.gate, block_sparse_moe.experts.e.w1 (w2, w3 alike)
    mtp.k.enorm, hnorm, eh_proj    model.layers.(L+k).enorm, hnorm, eh_proj
    mtp.k.norm                     model.layers.(L+k).shared_head.norm
    mtp.k.block.*                  model.layers.(L+k).* (as a decoder layer)
    V4: mtp.k.e_proj, h_proj, ...  mtp.k.e_proj, h_proj, enorm, hnorm, norm, hc_head_*; mtp.k.block.* as mtp.k.*
    (Kimi K2.5: any of these)      language_model.<name> (decoder layers "layers" or "blocks"; ``text_name``)

flyer rotates interleaved rope pairs; checkpoints laid out for rotate-half RoPE (Llama, Qwen2, Qwen3(-MoE), Mixtral,
DeepseekV3 with ``rope_interleave: false``) get their rope rows permuted on the way in and out, and
so do Qwen3's per-head norm weights: one per head channel, they follow the channels they scale.
GLM-4.5 (``glm4_moe``) has the GQA names, DeepseekV3's router and MTP layers, and rotates only each
head's first ``rotary_dim`` rows: only those are permuted. DeepSeek-V3.2's MLA rotates interleaved pairs,
its DSA indexer rotate-half: the indexer's rope rows (the first ``qk_rope_head_dim`` of each head of
``wq_b``, of ``wk``, and of ``k_norm``'s weight and bias, which follow the channels they scale) are
always permuted. GLM-5 (``glm_moe_dsa``, read with ``indexer_types``) has V3.2's names, its indexer
rotating interleaved pairs (nothing permuted); its shared layers have no indexer tensors.
LongCat-Flash (``shortcut_moe``) pairs flyer's blocks into its decoder layers and names its MTP module
``model.mtp.*`` (``_longcat_entries``).
DeepSeek-V4 (hybrid attention) keeps DeepSeek's own names (``layers.i.attn.wq_a``, ``ffn.experts.e.w1``,
``hc_attn_fn``, ``embed``, ``head``: ``_v4_entries``; transformers' saved spelling read through ``v4_name``),
and its FP8 weights carry UE8M0 block scales as ``<name>.scale``, its routed experts FP4 (``v4_quant``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch

from flyer.config import ModelConfig
from flyer.model.transformer import Transformer

_BLOCK = {  # flyer name inside a block -> HF name inside a decoder layer
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight", "attn.wq.bias": "self_attn.q_proj.bias",
    "attn.wk.weight": "self_attn.k_proj.weight", "attn.wk.bias": "self_attn.k_proj.bias",
    "attn.wv.weight": "self_attn.v_proj.weight", "attn.wv.bias": "self_attn.v_proj.bias",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight", "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight", "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight", "attn.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "attn.q_head_norm.weight": "self_attn.q_norm.weight", "attn.k_head_norm.weight": "self_attn.k_norm.weight",
    **{f"attn.indexer.{n}": f"self_attn.indexer.{n}" for n in (
        "wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight")},
    "ffn.w1.weight": "mlp.gate_proj.weight", "ffn.w2.weight": "mlp.down_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.gate.weight": "mlp.gate.weight", "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.shared.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared.w2.weight": "mlp.shared_experts.down_proj.weight",
    "ffn.shared.w3.weight": "mlp.shared_experts.up_proj.weight",
}
_EXPERTS = {"ffn.experts.w1": "gate_proj", "ffn.experts.w2": "down_proj", "ffn.experts.w3": "up_proj"}
# Mixtral's sparse block (transformers' save_pretrained writes these names, as the published checkpoints have them)
_MIXTRAL_EXPERTS = {"ffn.experts.w1": "w1", "ffn.experts.w2": "w2", "ffn.experts.w3": "w3"}
_MIXTRAL_GATE = {"ffn.gate.weight": "block_sparse_moe.gate.weight"}
_MTP = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
        "norm.weight": "shared_head.norm.weight"}
_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "head.weight": "lm_head.weight"}
# stored by DeepSeek beside each MTP layer: copies of the shared embedding and head
MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")


@dataclass(frozen=True)
class Slot:
    """Where an HF tensor goes: flyer state-dict key, expert index (stacked experts) or None,
    and the rope rows to permute (``rope_rows``: (head size, rope offset, rope dim) or None).
    ``fused``: the whole expert stacks an HF tensor concatenates on dim 1, ``key`` first (transformers' fused
    ``gate_up_proj``: w1 then w3 of each expert; ``down_proj``: w2 alone); () for any other tensor.
    ``scale``: flyer's tensor is the file's times this (LongCat-Flash's MLA scaling, folded into the weights)."""

    key: str
    expert: int | None = None
    rope_rows: tuple[int, int, int] | None = None
    fused: tuple[str, ...] = ()
    scale: float = 1.0


def hf_names(cfg: ModelConfig, rope_half: bool, fused: bool = False) -> dict[str, Slot]:
    """HF tensor name -> ``Slot`` for every tensor a model of ``cfg`` has. ``rope_half``: the
    checkpoint's rope rows are in rotate-half layout (else interleaved, as flyer's). ``fused``: routed
    experts as transformers' fused stacks (``FUSED_EXPERTS``), else one tensor per expert."""
    model = meta_model(cfg)
    out: dict[str, Slot] = {}
    mixtral = is_mixtral(cfg)  # the model's MoE names, once
    for key, t in model.state_dict().items():
        if cfg.tie_embeddings and key == "head.weight":
            continue  # tied: the file holds the embedding only
        for name, slot in _hf_entries(key, t.shape, cfg, rope_half, mixtral, fused):
            out[name] = slot
    return out


# transformers' fused expert stacks, as it writes them for architectures without a per-expert conversion (Mistral 4)
FUSED_EXPERTS = re.compile(r"model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)")


def has_fused_experts(names) -> bool:
    """Whether a checkpoint's tensor ``names`` hold its routed experts fused (``FUSED_EXPERTS``)."""
    return any(FUSED_EXPERTS.fullmatch(n) for n in names)


def is_mixtral(cfg: ModelConfig) -> bool:
    """GQA with softmax-routed experts in every layer, no head norms and whole heads rotating: what Mixtral
    computes (Qwen3-MoE has head norms, GLM-4.5 routes by sigmoid or rotates part of each head), so its
    tensors take Mixtral's names."""
    return (cfg.attn == "gqa" and cfg.is_moe and cfg.n_dense_layers == 0 and not cfg.qk_norm
            and cfg.score_func == "softmax" and cfg.rope_dim == cfg.head_dim)  # else GLM-4.5's (mlp.*) names


def meta_model(cfg: ModelConfig) -> Transformer:
    """A model of ``cfg`` on the meta device: its tensors' names and shapes, no storage."""
    with torch.device("meta"):
        return Transformer(cfg)


# the DSA indexer's tensors whose rows (or channels) are its keys' and queries': rotate-half in V3.2's checkpoints
# (GLM-5's rotate interleaved pairs: nothing to permute)
_INDEXER_ROPE = ("attn.indexer.wq_b.weight", "attn.indexer.wk.weight", "attn.indexer.k_norm.weight",
                 "attn.indexer.k_norm.bias")


def _rope_rows(sub: str, cfg: ModelConfig, rope_half: bool) -> tuple[int, int, int] | None:
    if sub in _INDEXER_ROPE:  # whatever MLA's layout: its rope channels come first in each head
        # V3.2's rotate-half; GLM-5's (the layout indexer_types lists) interleaved, as flyer's
        return None if cfg.indexer_types else (cfg.index_head_dim, 0, cfg.qk_rope_head_dim)
    if not rope_half:
        return None
    if cfg.attn == "gqa":  # q and k rows (weight and bias) per head, and the head norms' channels alike
        heads = ("attn.wq.", "attn.wk.", "attn.q_head_norm.", "attn.k_head_norm.")
        return (cfg.head_dim, 0, cfg.rope_dim) if sub.startswith(heads) else None  # GLM-4.5: rotary_dim rows
    if sub in ("attn.wq.weight", "attn.wq_b.weight"):
        return cfg.qk_head_dim, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    if sub == "attn.wkv_a.weight":
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    return None


def _v4_entries(key: str, shape) -> Iterator[tuple[str, Slot]]:
    """DeepSeek-V4's names, as its hub checkpoints spell them (``v4_name`` reads transformers' too): flyer's
    own but for the hyper-connections' (``hc_attn.fn`` -> ``hc_attn_fn``), the shared experts' and one tensor
    per routed expert; MTP module k's block is named as a decoder layer under ``mtp.k`` (``mtp.k.attn.wq_a``,
    ``mtp.k.hc_attn_fn``), beside its own ``e_proj``, ``h_proj``, norms and ``hc_head_*``. Every V4 RoPE
    rotates interleaved pairs: nothing is permuted."""
    name = re.sub(r"^(mtp\.\d+\.)block\.", r"\1", key)
    m = re.fullmatch(r"((?:layers|mtp)\.\d+\.)?(hc_head|hc_attn|hc_ffn)\.(fn|base|scale)", name)
    if m:
        yield f"{m.group(1) or ''}{m.group(2)}_{m.group(3)}", Slot(key)
        return
    m = re.fullmatch(r"((?:layers|mtp)\.\d+\.ffn\.)experts\.(w[123])", name)
    if m:
        for e in range(shape[0]):
            yield f"{m.group(1)}experts.{e}.{m.group(2)}.weight", Slot(key, e)
        return
    yield name.replace(".ffn.shared.", ".ffn.shared_experts."), Slot(key)


# copies of the shared embedding and head an MTP layer may carry (vLLM's V4 loader maps them; DeepSeek's converter
# drops them): flyer's MTP modules share the model's
V4_MTP_COPIES = ("emb.", "head.weight")

# transformers' save_pretrained of a DeepseekV4 model prefixes "model." and renames a few of DeepSeek's names (its
# reverse renaming also turns the attention's kv_norm into "norm", the compressors' name)
_V4_SAVED = {"embed_tokens.weight": "embed.weight", "hc_head.hc_fn": "hc_head_fn", "hc_head.hc_base": "hc_head_base",
             "hc_head.hc_scale": "hc_head_scale"}


def v4_name(name: str) -> str:
    """A DeepSeek-V4 checkpoint tensor's name as DeepSeek's hub files spell it (``_v4_entries``)."""
    name = name.removeprefix("model.")
    return _V4_SAVED.get(name) or re.sub(r"^(layers\.\d+\.attn)\.norm\.", r"\1.kv_norm.", name)


# LongCat-Flash's MTP module as its released checkpoints name it (SGLang's and vLLM's loaders map these names):
# one layer, its norms' weights under ".m", its dense FFN under "transformer_layer.mlp", the final norm the module's
LONGCAT_MTP = "model.mtp."
_LONGCAT_MTP = {"enorm.weight": "layers.0.enorm.m.weight", "hnorm.weight": "layers.0.hnorm.m.weight",
                "eh_proj.weight": "layers.0.eh_proj.weight", "norm.weight": "norm.weight"}
# its copy of the shared embedding (vLLM's loader reads it, SGLang's takes the main model's): flyer shares the model's
LONGCAT_MTP_EMBED = LONGCAT_MTP + "embed_tokens.weight"


def _longcat_entries(key: str, shape, cfg: ModelConfig, fused: bool) -> Iterator[tuple[str, Slot]]:
    """LongCat-Flash's names: flyer block 2i + s is sublayer s of decoder layer i (``self_attn.s``, ``mlps.s``,
    ``input_layernorm.s``, ``post_attention_layernorm.s``); block 2i's shortcut MoE is layer i's ``mlp`` (its
    router ``mlp.router.classifier``, the bias ``e_score_correction_bias``; its experts one tensor per expert,
    as save_pretrained and the released files store them, or transformers' fused stacks). Its MLA scales q by
    sqrt(hidden / q_lora_rank) and the normed kv latent by sqrt(hidden / kv_lora_rank): folded into q_b_proj's
    rows and kv_a_layernorm's weight (``Slot.scale``). Rope rows interleaved, as flyer's. The MTP module (one,
    ``mtp.0``) is ``model.mtp.*`` (``_LONGCAT_MTP``): its block's attention and norms as a decoder layer's under
    ``model.mtp.layers.0`` (unnumbered: one sublayer), the MLA scales folded alike, its dense FFN under
    ``transformer_layer.mlp``."""
    if key in _TOP:
        yield _TOP[key], Slot(key)
        return
    m = re.fullmatch(r"mtp\.0\.(.+)", key)
    if m is not None:
        yield from _longcat_mtp_entries(m.group(1), key, cfg)
        return
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
    if m is None:
        raise ValueError(f"no LongCat-Flash name for flyer tensor {key}")
    (i, s), sub = divmod(int(m.group(1)), 2), m.group(2)
    pre = f"model.layers.{i}."
    if sub in ("shortcut.gate.weight", "shortcut.gate.bias"):
        yield pre + ("mlp.router.classifier.weight" if sub.endswith("weight") else
                     "mlp.router.e_score_correction_bias"), Slot(key)
        return
    if sub.startswith("shortcut.experts.") and fused:
        if sub.endswith("w2"):
            yield pre + "mlp.experts.down_proj", Slot(key, fused=(key,))
        elif sub.endswith("w1"):
            yield pre + "mlp.experts.gate_up_proj", Slot(key, fused=(key, key[:-2] + "w3"))
        return
    if sub.startswith("shortcut.experts."):
        for e in range(shape[0]):
            yield pre + f"mlp.experts.{e}.{_EXPERTS['ffn.' + sub[len('shortcut.'):]]}.weight", Slot(key, e)
        return
    head, _, tail = _BLOCK[sub].partition(".")
    yield f"{pre}{'mlps' if head == 'mlp' else head}.{s}.{tail}", Slot(key, scale=_mla_scale(sub, cfg))


def _mla_scale(sub: str, cfg: ModelConfig) -> float:
    """LongCat-Flash's MLA scaling folded into block tensor ``sub`` (1 for the rest)."""
    return {"attn.wq_b.weight": (cfg.dim / cfg.q_lora_rank) ** 0.5,
            "attn.kv_norm.weight": (cfg.dim / cfg.kv_lora_rank) ** 0.5}.get(sub, 1.0)


def _longcat_mtp_entries(sub: str, key: str, cfg: ModelConfig) -> Iterator[tuple[str, Slot]]:
    """The name of MTP module 0's tensor ``sub`` (``key`` in flyer) under ``model.mtp.`` (``_longcat_entries``)."""
    if sub in _LONGCAT_MTP:
        yield LONGCAT_MTP + _LONGCAT_MTP[sub], Slot(key)
        return
    sub = sub.removeprefix("block.")
    name = _BLOCK.get(sub, "")
    if not name.startswith(("input_layernorm.", "post_attention_layernorm.", "self_attn.", "mlp.")) or (
            name.startswith("mlp.") and not sub.startswith("ffn.w")):
        raise ValueError(f"no LongCat-Flash name for flyer tensor {key}")  # its MTP block is MLA + a dense FFN
    where = "layers.0.transformer_layer." if name.startswith("mlp.") else "layers.0."
    yield LONGCAT_MTP + where + name, Slot(key, scale=_mla_scale(sub, cfg))


def _hf_entries(key: str, shape, cfg: ModelConfig, rope_half: bool, mixtral: bool,
                fused: bool = False) -> Iterator[tuple[str, Slot]]:
    if cfg.attn == "hybrid":
        yield from _v4_entries(key, shape)
        return
    if cfg.shortcut_moe:
        yield from _longcat_entries(key, shape, cfg, fused)
        return
    if key in _TOP:
        yield _TOP[key], Slot(key)
        return
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", key) or re.fullmatch(r"mtp\.(\d+)\.block\.(.+)", key)
    if m:
        i = int(m.group(1)) + (cfg.n_layers if key.startswith("mtp.") else 0)
        sub = m.group(2)
        if sub in _EXPERTS and fused:  # w1 and w3 in one stack (under w1's entry), w2 a stack alone
            if sub == "ffn.experts.w2":
                yield f"model.layers.{i}.mlp.experts.down_proj", Slot(key, fused=(key,))
            elif sub == "ffn.experts.w1":
                yield f"model.layers.{i}.mlp.experts.gate_up_proj", Slot(key, fused=(key, key[:-2] + "w3"))
            return
        if sub in _EXPERTS:
            moe, names = ("block_sparse_moe", _MIXTRAL_EXPERTS) if mixtral else ("mlp", _EXPERTS)
            for e in range(shape[0]):
                yield f"model.layers.{i}.{moe}.experts.{e}.{names[sub]}.weight", Slot(key, e)
            return
        if mixtral and sub in _MIXTRAL_GATE:
            yield f"model.layers.{i}.{_MIXTRAL_GATE[sub]}", Slot(key)
            return
        if sub in _BLOCK:
            yield f"model.layers.{i}.{_BLOCK[sub]}", Slot(key, None, _rope_rows(sub, cfg, rope_half))
            return
    m = re.fullmatch(r"mtp\.(\d+)\.(.+)", key)
    if m and m.group(2) in _MTP:
        yield f"model.layers.{cfg.n_layers + int(m.group(1))}.{_MTP[m.group(2)]}", Slot(key)
        return
    raise ValueError(f"no Hugging Face name for flyer tensor {key}")  # a module this table does not know


def rope_permutation(d: int) -> torch.Tensor:
    """Row order taking a rotate-half rope head (x_0..x_{d/2-1} paired with x_{d/2}..) to
    interleaved pairs: interleaved[2i] = half[i], interleaved[2i+1] = half[i + d/2]."""
    return torch.arange(d).view(2, d // 2).t().reshape(-1)


def permute_rope(t: torch.Tensor, rows: tuple[int, int, int], inverse: bool = False) -> torch.Tensor:
    """``t`` (R, ...) seen as heads of ``rows[0]`` rows, whose rows [off, off + d) are rope rows,
    permuted from rotate-half to interleaved layout (``inverse``: back)."""
    head, off, d = rows
    perm = rope_permutation(d)
    if inverse:
        perm = torch.argsort(perm)
    idx = torch.arange(head)
    idx[off:off + d] = off + perm
    return t.view(-1, head, *t.shape[1:])[:, idx].reshape(t.shape)


__all__ = ["FUSED_EXPERTS", "LONGCAT_MTP", "LONGCAT_MTP_EMBED", "MTP_COPIES", "Slot", "V4_MTP_COPIES",
           "has_fused_experts", "hf_names", "is_mixtral", "meta_model", "permute_rope", "rope_permutation", "v4_name"]
