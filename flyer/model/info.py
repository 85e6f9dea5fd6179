"""``flyer info PRESET``: parameter counts and KV cache size, from a model built on the meta device."""

from __future__ import annotations

import json

import torch

from flyer.config import PRESETS, ModelConfig, resolve_config
from flyer.errors import UserError
from flyer.model.counts import (ParamCounts, activated_params_min, indexed_layers, kv_cache_bytes_per_token,
                                kv_cache_bytes_per_token_fp8, kv_compressor_state_bytes, kv_window_bytes,
                                kv_window_bytes_fp8, mtp_params_stored, param_counts)
from flyer.model.experts import Experts
from flyer.model.transformer import Transformer


def meta_counts(cfg: ModelConfig) -> ParamCounts:
    """``param_counts`` counted on a ``Transformer`` built on the meta device (no memory used)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    main = [p for n, p in model.named_parameters() if not n.startswith("mtp.")]
    total = sum(p.numel() for p in main)
    inactive = 0
    for name, m in model.named_modules():
        if isinstance(m, Experts) and not name.startswith("mtp."):
            per_expert = sum(w[0].numel() for w in (m.w1, m.w2, m.w3))
            inactive += (m.n_local - min(cfg.n_activated_experts, cfg.n_routed_experts)) * per_expert
    mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    head = 0 if cfg.tie_embeddings else model.head.weight.numel()
    return ParamCounts(total=total, activated=total - inactive, mtp=mtp, embedding=model.embed.weight.numel(),
                       head=head)


def info(preset: str | None, config: str | None = None) -> dict:
    cfg = resolve_config(preset, config)
    counts = meta_counts(cfg)  # built on the meta device: no memory, any size
    closed = param_counts(cfg)
    if counts != closed:  # the closed form and the real module tree must agree
        raise AssertionError(f"closed-form counts {closed} differ from the model's {counts}")
    return {
        "preset": preset,
        "total_params": counts.total,
        "activated_params": counts.activated,
        "activated_params_without_embedding": counts.activated - counts.embedding,  # DeepSeek's papers' count
        "mtp_params": counts.mtp,
        "mtp_params_stored": mtp_params_stored(cfg),  # V3's layout: with each module's embedding and head
        "embedding_params": counts.embedding,
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(cfg),
        "kv_cache_bytes_per_token_naive": kv_cache_bytes_per_token(cfg, absorbed=False),
        "kv_cache_bytes_per_token_fp8": kv_cache_bytes_per_token_fp8(cfg),  # --cache-dtype fp8, scales counted
        "kv_window_bytes": kv_window_bytes(cfg),  # hybrid attention's window, per sequence whatever its length
        "kv_window_bytes_fp8": kv_window_bytes_fp8(cfg),  # the same with --cache-dtype fp8
        "kv_compressor_state_bytes": kv_compressor_state_bytes(cfg),  # hybrid: partial windows, FP32, per sequence
        "attention": cfg.attn,
        "layers": cfg.n_layers,
        "routed_experts": cfg.n_routed_experts,
        "activated_experts": cfg.n_activated_experts if cfg.n_routed_experts else 0,
        # LongCat-Flash: identity experts the router may pick instead (activated_params counts K FFN experts, the
        # most a token runs), and MoE layers as shortcuts over block pairs
        "zero_experts": cfg.n_zero_experts,
        "activated_params_min": activated_params_min(cfg),  # every pick it can, a zero expert's
        "shortcut_moe": cfg.shortcut_moe,
        "index_topk": cfg.index_topk,  # DeepSeek Sparse Attention: keys each query keeps (0: dense)
        "indexer_layers": indexed_layers(cfg),  # layers with their own indexer (GLM-5's shared ones reuse a selection)
        # GQA's sliding windows: the layers attending to their last sliding_window keys alone
        "sliding_window": cfg.window_size if cfg.attn == "gqa" else 0,
        "sliding_layers": len(cfg.sliding_layers),
    }


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _run(args) -> int:
    if args.preset_flag is not None:
        if args.preset is not None and args.preset != args.preset_flag:
            raise UserError(f"--preset: {args.preset_flag} differs from PRESET {args.preset}: give one")
        args.preset = args.preset_flag
    if args.preset is None and args.config is None:  # README: `flyer info PRESET`; no unlabeled DeepSeek-V3
        raise UserError(f"PRESET: required, one of {', '.join(PRESETS)} (or --config FILE)")
    out = info(args.preset, args.config)
    if args.json:
        print(json.dumps(out))
        return 0
    ffn = (f"{out['routed_experts']} routed experts (top-{out['activated_experts']})" if out["routed_experts"] else
           "dense FFNs")
    print(f"{out['preset'] or args.config}: {out['attention'].upper()}, {out['layers']} layers, {ffn}")
    print(f"  total params       {_human(out['total_params'])} ({out['total_params']:,})")
    print(f"  activated / token  {_human(out['activated_params'])} ({out['activated_params']:,}); "
          f"{_human(out['activated_params_without_embedding'])} without the embedding (a lookup), as DeepSeek counts")
    if out["zero_experts"]:  # LongCat-Flash: a pick of a zero-computation expert runs no FFN
        print(f"  activated, fewest  {_human(out['activated_params_min'])} ({out['activated_params_min']:,}), "
              f"picks of the {out['zero_experts']} zero-computation experts running none")
    print(f"  MTP params         {_human(out['mtp_params'])} ({out['mtp_params']:,})" + (
        f"; {_human(out['mtp_params_stored'])} as stored" + (", with its copies of the embedding and head"
                                                            if out["attention"] != "hybrid" else "")
        if out["mtp_params"] else ""))
    if out["attention"] == "hybrid":  # DeepSeek-V4: compressed entries per token, the window per sequence
        print(f"  KV cache / token   {out['kv_cache_bytes_per_token']:,} bytes (BF16): compressed entries and CSA "
              f"indexer keys (top-{out['index_topk']} entries per query), plus {out['kv_window_bytes']:,} bytes per "
              f"sequence for the sliding windows")
        print(f"  KV cache / token   {out['kv_cache_bytes_per_token_fp8']:,} bytes (--cache-dtype fp8: E4M3 keys, a "
              f"power-of-two scale per 64 values, BF16 rope; rotated FP4 indexer keys, a scale per 32), plus "
              f"{out['kv_window_bytes_fp8']:,} bytes per sequence for the windows")
        print(f"  per sequence       also {out['kv_compressor_state_bytes']:,} bytes (FP32, either cache) for the "
              f"compressors' partial windows")
        return 0
    shared = (f"; {out['layers'] - out['indexer_layers']} layers reuse another's selection"
              if out["indexer_layers"] < out["layers"] else "")
    dsa = f", indexer keys included (DSA: top-{out['index_topk']} keys per query{shared})" if out["index_topk"] else ""
    print(f"  KV cache / token   {out['kv_cache_bytes_per_token']:,} bytes (BF16){dsa}")
    if out["sliding_layers"]:
        print(f"  sliding window     {out['sliding_window']:,} keys in {out['sliding_layers']} of {out['layers']} "
              f"layers")
    if out["kv_cache_bytes_per_token_fp8"] is not None:
        print(f"  KV cache / token   {out['kv_cache_bytes_per_token_fp8']:,} bytes (--cache-dtype fp8: E4M3 latent, a "
              f"scale per 128 values, BF16 rope key{'; E4M3 index keys, a scale each' if out['index_topk'] else ''})")
    return 0


PATHS = {"config"}  # paths that may not be empty (flyer.cli)


def register(sub) -> None:
    p = sub.add_parser("info", help="parameter counts and KV cache bytes per token of a preset or config")
    p.add_argument("preset", nargs="?", choices=list(PRESETS), metavar="PRESET",
                   help=f"one of: {', '.join(PRESETS)}")
    p.add_argument("--preset", dest="preset_flag", choices=list(PRESETS), metavar="PRESET",
                   help="PRESET given as train, generate and plan take it")
    p.add_argument("--config", help="a DeepSeek config_*.json, HF config.json (or its model directory), or TOML file "
                                    "(overrides the preset)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_run)
