"""DeepSeek-V4's hybrid attention at long sequences: flyer's query-chunked ``HybridAttention`` against
transformers' ``DeepseekV4Attention`` (eager: the whole (B, H, T, T + T / r) scores) on the same random weights.

One layer of ``tiny-v4``'s shape (``--heads`` overrides its 4 heads) of each ``--kinds`` (csa, hca, window), FP32,
at each ``--seq-lens``; flyer's chunk is ``query_chunk``'s rule unless ``--chunk``. Per run: the output's relative
difference (also over the queries without a CSA score tie at the indexer's top-k cut, which the two break each
their own way; their count is printed), forward (no grad) and forward + backward medians and their ratios
(transformers' time / flyer's), the bytes autograd saves for backward (distinct storages,
``saved_tensors_hooks``) and, in a fresh child process per implementation, the resident-memory high-water of
one forward + backward above the process's RSS before it.
Prints one JSON object per line.

    python bench/v4_attention.py [--seq-lens 2048 4096] [--kinds csa hca] [--heads 4] [--steps 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing

import torch
from transformers import DeepseekV4Config
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming, apply_renamings
from transformers.masking_utils import create_sliding_window_causal_mask
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Attention, DeepseekV4RotaryEmbedding
from v4_step import timed  # bench/v4_step.py, beside this script

from flyer.config import preset
from flyer.interop.hf_config_v4 import to_v4_config
from flyer.model.hybrid import HybridAttention, hybrid_rope_config
from flyer.model.hybrid_chunks import query_chunk
from flyer.model.rope import rope_cos_sin
from flyer.runtime import tune_malloc

LAYER = {"window": 0, "csa": 1, "hca": 2}  # tiny-v4's compress_ratios (0, 4, 16, 4)


def build(heads: int, kind: str, max_len: int, seed: int = 0):
    """(flyer's config, its layer, transformers' layer) of ``kind`` with the same random weights (transformers'
    renaming of DeepSeek's checkpoint names maps one onto the other), sinks and gate biases nonzero."""
    cfg = preset("tiny-v4").replace(n_heads=heads, max_seq_len=max_len)
    hf = DeepseekV4Config(**to_v4_config(cfg), vocab_size=cfg.vocab_size, max_position_embeddings=max_len,
                          rms_norm_eps=cfg.norm_eps)
    hf._attn_implementation = "eager"
    layer = LAYER[kind]
    mine, ref = HybridAttention(cfg, layer), DeepseekV4Attention(hf, layer)
    renames = [t for t in get_checkpoint_conversion_mapping("deepseek_v4") if isinstance(t, WeightRenaming)]
    prefix = f"layers.{layer}.self_attn."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in mine.named_parameters():
            z = torch.randn(p.shape, generator=g)
            value = z if name.endswith("ape") else 2 + z if name == "attn_sink" else (
                1 + 0.2 * z if name.endswith("norm.weight") else z / p.shape[1] ** 0.5)
            p.copy_(value)
            ref.get_parameter(apply_renamings(f"layers.{layer}.attn.{name}", renames).removeprefix(prefix)).copy_(value)
    return cfg, mine, ref, hf


def callers(cfg, mine, ref, hf, layer: int, T: int, chunk: int | None):
    """(flyer's call, transformers' call) of x (B, T, D), each as its model calls the layer."""
    cos, sin = rope_cos_sin(cfg.rope_dim, T, hybrid_rope_config(cfg, layer))
    pos = torch.arange(T).unsqueeze(0)
    rotary = DeepseekV4RotaryEmbedding(hf)

    def theirs(x):
        emb = {k: rotary(x, pos, layer_type=k) for k in ("main", "compress")}
        mask = create_sliding_window_causal_mask(config=hf, inputs_embeds=x, attention_mask=None, cache=None,
                                                 position_ids=pos)
        return ref(x, emb, pos, mask)[0]

    return (lambda x: mine(x, cos, sin, chunk=chunk)), theirs


def tied_queries(cfg, mine, layer: int, x) -> torch.Tensor:
    """Bool (B, T): the queries whose index_topk-th and next visible CSA entry score alike (exact 0s: every index
    head's ReLU zeroes both), which flyer breaks towards the earliest entry and transformers by its top-k kernel."""
    T = x.shape[1]
    cos, sin = rope_cos_sin(cfg.rope_dim, T, hybrid_rope_config(cfg, layer))
    scores = mine.indexer.scores(x, mine.q_norm(mine.wq_a(x)), cos, sin)
    N, k = scores.shape[-1], cfg.index_topk
    complete = torch.arange(N).view(1, -1) < ((torch.arange(T) + 1) // mine.ratio).view(-1, 1)
    ranked = scores.masked_fill(~complete, float("-inf")).topk(k + 1, dim=-1).values
    return (ranked[..., k - 1] == ranked[..., k]) & (complete.sum(-1) > k)


def saved_bytes(call, x) -> int:
    """Bytes of the distinct storages autograd saves for backward in ``call(x)``."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        call(x)
    return sum(seen.values())


def _status_bytes(field: str) -> int:
    """A /proc/self/status field (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _peak_child(args: tuple, which: int, out) -> None:
    """In a fresh process: build, then one forward + backward of flyer's (0) or transformers' (1) layer; sends the
    resident-memory high-water during it above the RSS before it, in bytes (VmHWM, reset first where the kernel
    allows: ru_maxrss would carry the parent's high-water across exec)."""
    heads, kind, batch, T, chunk, threads = args
    tune_malloc()
    if threads:
        torch.set_num_threads(threads)
    cfg, mine, ref, hf = build(heads, kind, T)
    call = callers(cfg, mine, ref, hf, LAYER[kind], T, chunk)[which]
    x = torch.randn(batch, T, cfg.dim, generator=torch.Generator().manual_seed(1), requires_grad=True)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = _status_bytes("VmRSS")
    call(x).square().mean().backward()
    out.send(_status_bytes("VmHWM") - before)


def peak_rss(args: tuple, which: int) -> int:
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_peak_child, args=(args, which, send))
    p.start()
    value = recv.recv()
    p.join()
    return value


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--kinds", nargs="+", choices=list(LAYER), default=["csa", "hca"])
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=None, help="query rows per chunk (default: query_chunk's rule)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-rss", action="store_true", help="skip the child processes' RSS high-water")
    args = ap.parse_args()
    tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    for T in args.seq_lens:
        for kind in args.kinds:
            cfg, mine, ref, hf = build(args.heads, kind, T)
            layer = LAYER[kind]
            mine_call, ref_call = callers(cfg, mine, ref, hf, layer, T, args.chunk)
            x = torch.randn(args.batch_size, T, cfg.dim, generator=torch.Generator().manual_seed(1))
            r = cfg.compress_ratios[layer]
            N = T // r if r else 0
            indexed = cfg.is_csa(layer) and N > cfg.index_topk
            chunk = args.chunk or query_chunk(args.batch_size, T, cfg.n_heads, cfg.window_size, N,
                                              cfg.index_n_heads if indexed else 0)
            with torch.no_grad():
                got, want = mine_call(x), ref_call(x)
                tied = tied_queries(cfg, mine, layer, x) if indexed else torch.zeros(x.shape[:2], dtype=torch.bool)
            diff = (got - want).abs().amax(-1).masked_fill(tied, 0)
            out = {"kind": kind, "seq_len": T, "batch_size": args.batch_size, "heads": cfg.n_heads,
                   "chunk": min(chunk, T), "threads": torch.get_num_threads(),
                   "out_rel_diff": float((got - want).abs().max() / want.abs().max()),
                   "queries_tied_at_topk_cut": int(tied.sum()),
                   "out_rel_diff_untied": float(diff.max() / want.abs().max())}
            xg = x.clone().requires_grad_(True)

            def forward(call):
                def run():
                    with torch.no_grad():
                        call(x)
                return run

            def train(call):
                def run():
                    call(xg).square().mean().backward()
                return run

            for name, make in (("forward", forward), ("forward_backward", train)):
                t_mine, t_ref = timed(make(mine_call), args.steps), timed(make(ref_call), args.steps)
                out[f"{name}_s"], out[f"peer_{name}_s"] = round(t_mine, 4), round(t_ref, 4)
                out[f"{name}_ratio_vs_peer"] = round(t_ref / t_mine, 3)
            s_mine, s_ref = saved_bytes(mine_call, xg), saved_bytes(ref_call, xg)
            out |= {"saved_mb": round(s_mine / 2**20, 1), "peer_saved_mb": round(s_ref / 2**20, 1),
                    "saved_ratio_peer_over_flyer": round(s_ref / s_mine, 2)}
            if not args.no_rss:
                child = (args.heads, kind, args.batch_size, T, args.chunk, args.threads)
                p_mine, p_ref = peak_rss(child, 0), peak_rss(child, 1)
                out |= {"peak_rss_mb": round(p_mine / 2**20, 1), "peer_peak_rss_mb": round(p_ref / 2**20, 1),
                        "peak_ratio_peer_over_flyer": round(p_ref / p_mine, 2)}
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
