"""Long-context MLA: subnormal softmax probabilities and the prefill form, as ratios in one run.

1. The decode step's ``p @ latents`` with a peaked softmax at ``--context`` slots, subnormal
   probabilities kept and flushed (the ratio: ``p_latents_speedup_flush_C*``); then whole decode
   steps at ``--context`` tokens with an FP32 latent cache (``decode.py``'s MLA_BENCH model,
   random weights, cached latents scaled by SPREAD), flushed (flyer's path: ``kernels.mla_decode``,
   which flushes as the eager path does) and kept (the old path: the eager read, no flush), and at
   64 tokens of context. Random weights attend too flatly for many probabilities to
   underflow, so the whole-step ratio stays near 1 there; the primitive shows what a trained
   model's peaked attention meets.
2. Prefill of ``--context`` tokens: the compute-bound form (up-projected K/V, fused SDPA; what
   ``mla_absorbed`` takes for a prefill chunk) against the absorbed form over the same chunk.
3. The training path (fused SDPA forward + backward at the same length), with FTZ/DAZ on and off:
   the fused kernel works on blocks of normal numbers, so flushing changes little there.

    python bench/denormals.py [--context 2048] [--steps 16]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from decode import MLA_BENCH, gathered_attention  # bench/decode.py, beside this script

from flyer.config import preset
from flyer.infer import Decoder, attention
from flyer.model.transformer import Transformer

SPREAD = 300.0  # cached latents scaled so softmax is as peaked as a trained model's (many tiny probabilities)


def _decode_tps(model, context: int, steps: int) -> float:
    dec = Decoder(model, 1, context + steps + 1, cache_dtype=torch.float32)
    torch.manual_seed(0)
    dec.forward(torch.randint(0, model.cfg.vocab_size, (1, context)), torch.zeros(1, dtype=torch.long))
    dec.cache.packed.mul_(SPREAD)  # random weights score flat; a trained model's attention is peaked
    tok = torch.zeros(1, 1, dtype=torch.long)
    t0 = time.perf_counter()
    for i in range(steps):
        dec.forward(tok, torch.tensor([context + i]))
    return steps / (time.perf_counter() - t0)


def _p_latents_s(S: int, H: int, C: int, flush: bool) -> float:
    """The decode step's ``p @ latents`` (H x S probabilities of a peaked softmax, S x C latents)."""
    torch.manual_seed(0)
    p = (torch.randn(1, H, S) * 30).softmax(-1)
    if flush:
        p = p.masked_fill(p < attention.FP32_TINY, 0.0)
    lat = torch.randn(1, S, C)
    t0 = time.perf_counter()
    for _ in range(20):
        torch.bmm(p, lat)
    return (time.perf_counter() - t0) / 20


def _prefill_s(model, context: int, dense: bool) -> float:
    dec = Decoder(model, 1, context, cache_dtype=torch.float32)
    tokens = torch.randint(0, model.cfg.vocab_size, (1, context))
    saved = attention.dense_prefill_pays
    attention.dense_prefill_pays = (lambda attn, T: T > 1) if dense else (lambda attn, T: False)
    try:
        t0 = time.perf_counter()
        dec.forward(tokens, torch.zeros(1, dtype=torch.long))
        return time.perf_counter() - t0
    finally:
        attention.dense_prefill_pays = saved


def _sdpa_s(T: int, H: int, d: int, flush: bool) -> float:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, T, d) * 3).requires_grad_(), torch.randn(1, H, T, d) * 3, torch.randn(1, H, T, d)
    torch.set_flush_denormal(flush)
    try:
        t0 = time.perf_counter()
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
        return time.perf_counter() - t0
    finally:
        torch.set_flush_denormal(False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Transformer(preset("small", **MLA_BENCH)).eval()
    out = {"context": args.context, "threads": args.threads}
    with torch.inference_mode():
        out["decode_tps_flushed"] = _decode_tps(model, args.context, args.steps)
        out["decode_tps_short_context"] = _decode_tps(model, 64, args.steps)
        saved = attention.FP32_TINY
        attention.FP32_TINY = 0.0  # keep subnormals: the path before the fix (the eager read; the kernel flushes)
        try:
            with gathered_attention():
                out["decode_tps_subnormals_kept"] = _decode_tps(model, args.context, args.steps)
        finally:
            attention.FP32_TINY = saved
        out["prefill_s_dense"] = min(_prefill_s(model, args.context, True) for _ in range(2))
        out["prefill_s_absorbed"] = min(_prefill_s(model, args.context, False) for _ in range(2))
    H, C = model.cfg.n_heads, model.cfg.kv_lora_rank
    for C_ in (C, 512):  # this model's latent and V3's
        kept, flushed = (min(_p_latents_s(args.context, H, C_, f) for _ in range(3)) for f in (False, True))
        out[f"p_latents_speedup_flush_C{C_}"] = kept / flushed
    out["decode_speedup_flush"] = out["decode_tps_flushed"] / out["decode_tps_subnormals_kept"]
    out["prefill_speedup_dense"] = out["prefill_s_absorbed"] / out["prefill_s_dense"]
    H, d = model.cfg.n_heads, model.cfg.qk_head_dim
    out["train_sdpa_s_ftz"] = min(_sdpa_s(args.context, H, d, True) for _ in range(2))
    out["train_sdpa_s_no_ftz"] = min(_sdpa_s(args.context, H, d, False) for _ in range(2))
    out["train_sdpa_ratio_no_ftz_over_ftz"] = out["train_sdpa_s_no_ftz"] / out["train_sdpa_s_ftz"]
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
