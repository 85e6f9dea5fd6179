"""Tiny random Hugging Face checkpoints built locally with transformers (nothing downloaded):
the families and config spellings flyer imports, a tokenizer, and DeepSeek-layout MTP weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers, decoders
from transformers import (DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM,
                          DeepseekV32Config, DeepseekV32ForCausalLM, DeepseekV4Config, DeepseekV4ForCausalLM,
                          Glm4MoeConfig, Glm4MoeForCausalLM, Glm4MoeLiteConfig, Glm4MoeLiteForCausalLM,
                          LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, MixtralConfig,
                          MixtralForCausalLM, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig,
                          Qwen3MoeForCausalLM)
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

VOCAB = 320
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
               max_position_embeddings=256, initializer_range=0.1, bos_token_id=1, eos_token_id=2)
_MLA = dict(moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1,
            kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_shared_experts=1)
_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 0.8,
         "mscale_all_dim": 0.6, "beta_fast": 32, "beta_slow": 1, "rope_theta": 10000.0}

# name -> (model class, config class, config kwargs)
FAMILIES = {
    "v3": (DeepseekV3ForCausalLM, DeepseekV3Config, dict(
        **_MLA, q_lora_rank=24, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
        rms_norm_eps=1e-5, rope_parameters=_YARN, rope_interleave=True, tie_word_embeddings=False)),
    "v3-tied-half": (DeepseekV3ForCausalLM, DeepseekV3Config, dict(
        **_MLA, q_lora_rank=24, n_group=4, topk_group=2, routed_scaling_factor=1.5, norm_topk_prob=False,
        rms_norm_eps=1e-6, rope_parameters=_YARN, rope_interleave=False, tie_word_embeddings=True)),
    "v2-lite": (DeepseekV2ForCausalLM, DeepseekV2Config, dict(
        **_MLA, q_lora_rank=None, topk_method="greedy", routed_scaling_factor=1.0,
        rope_parameters={**_YARN, "mscale": 0.707, "mscale_all_dim": 0.707})),
    "v2-grouped": (DeepseekV2ForCausalLM, DeepseekV2Config, dict(
        **_MLA, q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        routed_scaling_factor=2.0)),
    "llama": (LlamaForCausalLM, LlamaConfig, dict(num_key_value_heads=2, rope_parameters={
        "rope_type": "default", "rope_theta": 500000.0}, rms_norm_eps=1e-5)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=True,
                                                  rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # sliding windows (flyer's window_size / sliding_layers) shorter than the tests' prompts and outputs: Mistral
    # slides every layer; Qwen2 layers max_window_layers and up; Qwen3 the ones its layer_types lists
    "mistral": (MistralForCausalLM, MistralConfig, dict(num_key_value_heads=2, sliding_window=5, rms_norm_eps=1e-5,
                                                        rope_parameters={"rope_type": "default", "rope_theta": 1e4})),
    "qwen2-sliding": (Qwen2ForCausalLM, Qwen2Config, dict(
        num_key_value_heads=2, use_sliding_window=True, sliding_window=6, max_window_layers=1,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen3-sliding": (Qwen3ForCausalLM, Qwen3Config, dict(
        num_key_value_heads=1, head_dim=24, use_sliding_window=True, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # head_dim 24, not hidden_size / heads = 16 (as Qwen3-0.6B: 128, not 64); q_norm / k_norm random (``build``)
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, dict(num_key_value_heads=2, head_dim=24, tie_word_embeddings=True,
                                                  rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # layer 0 dense (mlp_only_layers), then 8 experts top-2 renormalised, no shared expert; head_dim 24 != 16
    "qwen3_moe": (Qwen3MoeForCausalLM, Qwen3MoeConfig, dict(
        num_key_value_heads=2, head_dim=24, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, mlp_only_layers=[0], rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # every layer 8 experts (intermediate_size 96 each) top-2, renormalised; no head norms; head_dim 24 != 16
    "mixtral": (MixtralForCausalLM, MixtralConfig, dict(
        num_key_value_heads=2, head_dim=24, num_local_experts=8, num_experts_per_tok=2, sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # GLM-4.5: q/k/v biases (random, ``build``), head norms, half of each head rotating (12 of head_dim 24 != 16);
    # layer 0 dense, then 8 experts top-2 from 1 of 2 groups (sigmoid + correction bias), one shared expert
    "glm4_moe": (Glm4MoeForCausalLM, Glm4MoeConfig, dict(
        num_key_value_heads=2, head_dim=24, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
        n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
        norm_topk_prob=True, attention_bias=True, use_qk_norm=True, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5})),
    # GLM-4.7-Flash: DeepseekV3's MLA, router (1 of 2 groups) and scaling, its dense layer from mlp_layer_types;
    # its config names one MTP layer, as the hub's does (loaded where the weights hold it)
    "glm4_moe_lite": (Glm4MoeLiteForCausalLM, Glm4MoeLiteConfig, dict(
        **{k: v for k, v in _MLA.items() if k != "first_k_dense_replace"}, q_lora_rank=24, n_group=2, topk_group=1,
        routed_scaling_factor=1.8, norm_topk_prob=True, rms_norm_eps=1e-5, rope_interleave=True,
        num_nextn_predict_layers=1, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # DeepSeek-V3.2: V3 with DSA's indexer keeping 8 keys per query (sequences of 24+ tokens drop some); 8 indexer
    # heads of 32 channels (8 rotating, first, rotate-half), so exact-zero ReLU ties between keys are rare;
    # k_norm's weight and bias random (``build``); layer 0 dense (first_k_dense_replace); one MTP layer named, as
    # the hub's config does (loaded where the weights hold it)
    "v32": (DeepseekV32ForCausalLM, DeepseekV32Config, dict(
        **_MLA, q_lora_rank=24, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
        rms_norm_eps=1e-5, rope_parameters=_YARN, index_topk=8, index_n_heads=8, index_head_dim=32,
        num_nextn_predict_layers=1)),
    # DeepSeek-V4: hybrid attention (a window of 8 keys in every layer; CSA every 4 tokens keeping 4 entries, HCA
    # every 16), 4 hyper-connection streams, 2 hash-routed layers then top-2 of 8 sqrtsoftplus experts, one shared;
    # a quarter of each 32-channel head rotating (last), YaRN on the compressed layers; SwiGLU clamped at 1 (random
    # weights reach it); sinks, compressor position biases and hyper-connection biases and scales random (``build``)
    "v4": (DeepseekV4ForCausalLM, DeepseekV4Config, dict(
        num_hidden_layers=4, moe_intermediate_size=32, head_dim=32, qk_rope_head_dim=8, q_lora_rank=32, o_groups=2,
        o_lora_rank=16, sliding_window=8, compress_rates={"compressed_sparse_attention": 4,
                                                          "heavily_compressed_attention": 16},
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                     "compressed_sparse_attention"], mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, routed_scaling_factor=1.5, index_topk=4,
        index_n_heads=8, index_head_dim=16, hc_mult=4, swiglu_limit=1.0, rms_norm_eps=1e-6, rope_theta=10000.0,
        compress_rope_theta=160000.0, rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32,
                                                       "beta_slow": 1, "original_max_position_embeddings": 64})),
    # GLM-4.5-Air's kind (no head norms), a quarter of each head rotating (8 of 32), not renormalised, tied
    "glm4_moe-air": (Glm4MoeForCausalLM, Glm4MoeConfig, dict(
        num_key_value_heads=2, head_dim=32, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
        n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=1.0,
        norm_topk_prob=False, attention_bias=True, use_qk_norm=False, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25})),
}


def make_tokenizer(out: Path) -> None:
    """A byte-level BPE (vocabulary < VOCAB) with a BOS post-processor, saved as transformers does."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog", "hello world, flyer reads checkpoints"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=VOCAB - 20, special_tokens=["<pad>", "<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(out)


def to_transformers_4(path: Path) -> None:
    """Rewrite a saved config.json in the transformers-4 / DeepSeek hub spelling: ``rope_theta`` and
    ``rope_scaling`` (``type``) instead of ``rope_parameters``, ``partial_rotary_factor`` beside them; V3's
    ``topk_method``/``scoring_func``."""
    p = path / "config.json"
    d = json.loads(p.read_text())
    rp = dict(d.pop("rope_parameters"))
    d["rope_theta"] = rp.pop("rope_theta")
    if "partial_rotary_factor" in rp:  # GLM-4.5's hub files keep it beside rope_theta
        d["partial_rotary_factor"] = rp.pop("partial_rotary_factor")
    kind = rp.pop("rope_type")
    d["rope_scaling"] = None if kind == "default" else {"type": kind, **rp}
    if d["model_type"] == "deepseek_v3":
        d.update(topk_method="noaux_tc", scoring_func="sigmoid")
    p.write_text(json.dumps(d, indent=2))


@torch.no_grad()
def trained_bias(model) -> None:
    """Give a transformers model's routers a trained-looking balancing bias (``e_score_correction_bias``), not
    zeros: a bias read into the wrong place, or not at all, then changes the routes."""
    for n, b in model.named_buffers():
        if n.endswith("e_score_correction_bias"):
            b.copy_(torch.rand_like(b) * 0.1)


def save_tiny(model, out: Path, name: str = "") -> None:
    """Save the random transformers ``model`` with a tokenizer under ``out``, its weights first made to tell a
    wrong reading apart (``build``'s): a trained-looking router bias, per-channel head norms and index-key norms,
    V4's zero-initialised parameters non-zero; ``name``: its ``FAMILIES`` name (GLM's q/k/v biases not zeros)."""
    trained_bias(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")):  # Qwen3's per-head norms:
                p.uniform_(0.25, 2.0)  # a different weight per channel, or a wrong channel order would pass
            if name.startswith("glm4_moe") and n.endswith("_proj.bias"):  # GLM's q/k/v biases: not zeros
                p.normal_(0.0, 0.5)
            if n.endswith("indexer.k_norm.weight"):  # DSA's key LayerNorm: per channel, or a wrong order passes
                p.uniform_(0.25, 2.0)
            if n.endswith("indexer.k_norm.bias"):
                p.uniform_(-0.5, 0.5)
            if n.endswith(("sinks", "position_bias", "hc.base", "hc_head.hc_base")):  # V4's zero-initialised ones
                p.normal_(0.0, 0.5)
            if n.endswith(("hc.scale", "hc_head.hc_scale")):
                p.uniform_(0.5, 1.5)
        for n, b in model.named_buffers():
            if n.endswith("tid2eid"):  # V4's hash table: K distinct experts per token id
                E, K = model.config.n_routed_experts, b.shape[1]
                b.copy_(torch.stack([torch.randperm(E)[:K] for _ in range(b.shape[0])]))
    model.save_pretrained(out)
    make_tokenizer(out)


def save_bf16(family: str, path: Path) -> dict[str, torch.Tensor]:
    """A random tiny ``family`` model (seed 0, a trained-looking router bias) saved in BF16 with a tokenizer under
    ``path``, where the quantized checkpoints' tests start; returns its saved tensors by name."""
    cls, config_cls, kw = FAMILIES[family]
    torch.manual_seed(0)
    model = cls(config_cls(**_COMMON, **kw))
    trained_bias(model)
    model.to(torch.bfloat16).save_pretrained(path)
    make_tokenizer(path)
    return load_file(str(path / "model.safetensors"))


def plain_twin(path: Path, want: dict[str, torch.Tensor], out: Path) -> None:
    """``path``'s quantized model as an unquantized directory ``out``: ``want``'s weights (by name), the tensors of
    every other module as they are (a quantized module's codes and scales left out), its config without
    ``quantization_config``, its tokenizer."""
    out.mkdir()
    stems = {k.removesuffix(".weight") for k in want}
    tensors = {k: v for k, v in load_file(str(path / "model.safetensors")).items() if k.rpartition(".")[0] not in stems}
    save_file({**tensors, **want}, str(out / "model.safetensors"), metadata={"format": "pt"})
    d = json.loads((path / "config.json").read_text())
    d.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(d))
    (out / "tokenizer.json").write_bytes((path / "tokenizer.json").read_bytes())


def build(name: str, out: Path, spelling: int = 5, seed: int = 0):
    """Save a random tiny ``name`` model (FP32) with a tokenizer under ``out``; return the model."""
    cls, cfg_cls, kw = FAMILIES[name]
    torch.manual_seed(seed)
    common = {k: v for k, v in _COMMON.items() if not (name == "v4" and k == "intermediate_size")}  # V4: an alias
    model = cls(cfg_cls(**{**common, **kw})).eval()
    save_tiny(model, out, name)
    if spelling == 4:
        to_transformers_4(out)
    return model


def add_mtp_layer(model, out: Path, seed: int = 1) -> dict[str, torch.Tensor]:
    """Append DeepSeek-layout MTP weights (decoder layer ``num_hidden_layers``: enorm, hnorm, eh_proj,
    shared_head.{norm,head}, embed_tokens and the block) as a second shard with an index; return them."""
    cfg = model.config
    L, D = cfg.num_hidden_layers, cfg.hidden_size
    torch.manual_seed(seed)
    # the model's own (MoE) decoder layer, DeepseekV3's or GLM's, built as the last layer is (Glm4MoeLite's
    # mlp_layer_types has no entry past it)
    layer = type(model.model.layers[-1])(cfg, L - 1)
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0.0, 0.1) if p.ndim > 1 else torch.nn.init.uniform_(p, 0.5, 1.5)
    pre = f"model.layers.{L}."
    w = {}
    for k, v in layer.state_dict().items():  # transformers' fused experts -> DeepSeek's one tensor per expert
        if k == "mlp.experts.gate_up_proj":
            gates, ups = v.chunk(2, dim=1)
            for e in range(v.shape[0]):
                w[f"{pre}mlp.experts.{e}.gate_proj.weight"] = gates[e].clone().contiguous()
                w[f"{pre}mlp.experts.{e}.up_proj.weight"] = ups[e].clone().contiguous()
        elif k == "mlp.experts.down_proj":
            for e, down in enumerate(v):
                w[f"{pre}mlp.experts.{e}.down_proj.weight"] = down.clone().contiguous()
        else:
            w[pre + k] = v.detach().clone().contiguous()
    w.update({pre + "enorm.weight": torch.rand(D) + 0.5, pre + "hnorm.weight": torch.rand(D) + 0.5,
              pre + "shared_head.norm.weight": torch.rand(D) + 0.5, pre + "eh_proj.weight": torch.randn(D, 2 * D) * 0.1,
              pre + "embed_tokens.weight": model.model.embed_tokens.weight.detach().clone(),
              pre + "shared_head.head.weight": model.lm_head.weight.detach().clone()})
    save_file(w, str(out / "model-mtp.safetensors"))
    main = out / "model.safetensors"
    main.rename(out / "model-main.safetensors")
    with safe_open(str(out / "model-main.safetensors"), "pt") as f:
        names = list(f.keys())
    index = {"metadata": {}, "weight_map": {**dict.fromkeys(names, "model-main.safetensors"),
                                            **dict.fromkeys(w, "model-mtp.safetensors")}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return w, layer


def reference_mtp_logits(model, w: dict[str, torch.Tensor], layer, tokens: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch MTP from DeepSeek's layout on transformers' modules: position i predicts t_{i+2}
    from the main model's final-normed h_i and Emb(t_{i+1}): head(norm(block(eh_proj([enorm(e); hnorm(h)]))))."""
    cfg = model.config
    L, D = cfg.num_hidden_layers, cfg.hidden_size
    pre = f"model.layers.{L}."
    with torch.no_grad():
        h = model.model(tokens).last_hidden_state[:, :-1]
        e = model.model.embed_tokens(tokens[:, 1:])

        def norm(name):
            n = DeepseekV3RMSNorm(D, cfg.rms_norm_eps)
            n.weight.copy_(w[pre + name])
            return n
        x = torch.cat([norm("enorm.weight")(e), norm("hnorm.weight")(h)], -1) @ w[pre + "eh_proj.weight"].t()
        layer.eval()
        T = x.shape[1]
        pos = torch.arange(T).unsqueeze(0)
        mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
        y = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=model.model.rotary_emb(x, pos))
        y = y[0] if isinstance(y, tuple) else y
        return norm("shared_head.norm.weight")(y) @ w[pre + "shared_head.head.weight"].t()
