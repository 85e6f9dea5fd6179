"""What ``bench/serve.py`` computes rather than times: the weight bytes a decode step reads per token (the
memory-bound ceiling of ``ratio_c16_vs_c1``) and how many whole sequences a cache of a given size holds (the MLA
payoff against GQA; DeepSeek-V4's slots and blocks), each checked against the engine's own admissions."""

from __future__ import annotations

import torch

from flyer.config import preset
from flyer.infer.hybrid_cache import HybridCache
from flyer.infer.weights import WEIGHT_DTYPES, hold_weights
from flyer.model.counts import kv_cache_bytes_per_token, kv_window_bytes
from flyer.model.transformer import Transformer
from flyer.serve.engine import Engine, EngineConfig, SamplingOptions

TOKEN_RANGE = 256  # prompt token ids: the tokenizer's byte tokens


def weight_bytes_per_token(name: str, rows: int, weight_dtype: str) -> float:
    """Weight bytes a decode step of ``rows`` tokens reads per token (as ``flyer serve --weight-dtype``
    holds them): every dense weight (the embedding is a gather, MTP does not run) plus, per MoE
    layer, the routed experts its tokens choose: E (1 - (1 - K/E)^rows) distinct ones expected under
    uniform routing. Where a step is bound by memory traffic, the ratio for 16 and 1 rows bounds
    ``ratio_c16_vs_c1``. (V4's hash-routed layers choose K experts a token too, uniform over a vocabulary.)"""
    cfg = preset(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    hold_weights(model, WEIGHT_DTYPES[weight_dtype])
    routed = dense = 0
    for name, p in model.named_parameters():
        if name.startswith("mtp") or name.startswith("embed"):
            continue
        if ".experts." in name:
            routed += p.numel() * p.element_size()
        else:
            dense += p.numel() * p.element_size()
    E, K = cfg.n_routed_experts, cfg.n_activated_experts
    chosen = E * (1 - (1 - K / E) ** rows)
    return (dense + routed * chosen / E) / rows


def max_seqs(cfg_over: dict, memory: int, seq_len: int) -> tuple[int, int]:
    """(2K-token sequences the engine admits at once within ``memory`` bytes, cache bytes per token)."""
    torch.manual_seed(0)
    model = Transformer(preset("small", **cfg_over)).eval()
    eng = Engine(model, EngineConfig(kv_cache_bytes=memory, max_batch_size=1 << 20, max_queue=1 << 20,
                                     prefix_sharing=False))
    n = 0
    while True:
        eng.submit([n % TOKEN_RANGE] * (seq_len - 1), SamplingOptions(max_tokens=1), lambda e: None)
        if eng.admit() == n:  # the last one did not fit
            return n, kv_cache_bytes_per_token(model.cfg)
        n += 1


def hybrid_capacity(memory: int) -> dict[str, float]:
    """tiny-v4's counterpart of the MLA/GQA payoff, in the engine's default cache dtype: its cache bytes per
    token (the compressed entries' long-context rate, ``flyer.model.counts``), a slot's bytes (a running
    request's windows and compressors' states, whatever its length), and B, the most sequences of its whole
    context (1024 tokens) an engine of B slots admits at once within ``memory``: B slots and their blocks beside
    the null block, (memory - block) // (slot + blocks * block) by the pool's sizes, checked by an engine
    admitting all B while one of B + 1 slots does not admit B + 1."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny-v4")).eval()
    cfg, ecfg = model.cfg, EngineConfig()
    seq_len = cfg.max_seq_len
    probe = HybridCache.paged(cfg, 1, 1, ecfg.block_size, ecfg.cache_dtype, "meta")
    slot, block = probe.window_bytes(), probe.block_bytes()
    B = (memory - block) // (slot + -(-seq_len // ecfg.block_size) * block)

    def admitted(slots: int) -> int:
        eng = Engine(model, EngineConfig(kv_cache_bytes=memory, max_batch_size=slots, max_queue=1 << 20,
                                         prefix_sharing=False))  # sequences held apart, as max_seqs counts them
        for n in range(slots):
            eng.submit([n % TOKEN_RANGE] * (seq_len - 1), SamplingOptions(max_tokens=1), lambda e: None)
        return eng.admit()

    if admitted(B) != B or admitted(B + 1) > B:
        raise RuntimeError(f"the engine's admissions disagree with the pool's sizes ({B} sequences of {seq_len})")
    size = torch.finfo(ecfg.cache_dtype).bits // 8
    return {"payoff_seq_len": seq_len, "max_seqs_v4": B, "slot_bytes_v4": slot,
            "cache_bytes_per_token_v4": kv_cache_bytes_per_token(cfg, size),
            "window_bytes_per_seq_v4": kv_window_bytes(cfg, size)}
