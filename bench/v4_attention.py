"""DeepSeek-V4's hybrid attention at long sequences: flyer's query-chunked ``HybridAttention`` against
transformers' ``DeepseekV4Attention`` (eager: the whole (B, H, T, T + T / r) scores) on the same random weights,
or (``--peer masked``) against flyer's own chunks with CSA's entries masked rather than gathered (``gather=False``:
each query scores every entry it may see, (B, H, C, N) per chunk, instead of its index_topk picks).

One layer of ``tiny-v4``'s shape (``--heads`` overrides its 4 heads) of each ``--kinds`` (csa, hca, window), FP32,
at each ``--seq-lens``; flyer's chunk is ``query_chunk``'s rule unless ``--chunk``. Per run: the output's relative
difference (also over the queries without a CSA score tie at the indexer's top-k cut, which the two break each
their own way; their count is printed), forward (no grad) and forward + backward medians and their ratios
(transformers' time / flyer's), the bytes autograd saves for backward (distinct storages,
``saved_tensors_hooks``) and, in a fresh child process per implementation, the resident-memory high-water of
one forward + backward above the process's RSS before it.
Prints one JSON object per line ("peer": transformers or masked). ``--break-even``: instead, one chunk of
``CHUNK_ROWS`` queries' attention alone (``chunk_attention``, forward + backward) masked against gathered, its
entries m x index_topk for m in 1 .. 16: where gathering starts to pay (``GATHER_OVER``).

    python bench/v4_attention.py [--seq-lens 2048 4096] [--kinds csa hca] [--heads 4] [--steps 3] [--threads N]
    python bench/v4_attention.py --peer masked --kinds csa --seq-lens 8192 16384 --heads 16
    python bench/v4_attention.py --break-even --heads 16 --index-topk 64 --steps 21
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
from flyer.model.attention import select_topk
from flyer.model.hybrid_chunks import CHUNK_ROWS, Gathered, chunk_attention, entry_picks, gathers, query_chunk
from flyer.model.rope import rope_cos_sin
from flyer.parallel.memory import saved_bytes
from flyer.runtime import tune_malloc

LAYER = {"window": 0, "csa": 1, "hca": 2}  # tiny-v4's compress_ratios (0, 4, 16, 4)


def build(heads: int, kind: str, max_len: int, seed: int = 0, index_topk: int | None = None):
    """(flyer's config, its layer, transformers' layer) of ``kind`` with the same random weights (transformers'
    renaming of DeepSeek's checkpoint names maps one onto the other), sinks and gate biases nonzero."""
    cfg = preset("tiny-v4").replace(n_heads=heads, max_seq_len=max_len)
    cfg = cfg if index_topk is None else cfg.replace(index_topk=index_topk)
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


def callers(cfg, mine, ref, hf, layer: int, T: int, chunk: int | None, peer: str = "transformers"):
    """(flyer's call, the peer's call) of x (B, T, D), each as its model calls the layer; ``peer`` "masked":
    flyer's layer with CSA's entries masked, not gathered."""
    cos, sin = rope_cos_sin(cfg.rope_dim, T, hybrid_rope_config(cfg, layer))
    if peer == "masked":
        return (lambda x: mine(x, cos, sin, chunk=chunk)), (lambda x: mine(x, cos, sin, chunk=chunk, gather=False))
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


def _status_bytes(field: str) -> int:
    """A /proc/self/status field (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _peak_child(args: tuple, which: int, out) -> None:
    """In a fresh process: build, then one forward + backward of flyer's (0) or transformers' (1) layer; sends the
    resident-memory high-water during it above the RSS before it, in bytes (VmHWM, reset first where the kernel
    allows: ru_maxrss would carry the parent's high-water across exec)."""
    heads, kind, batch, T, chunk, threads, peer, index_topk = args
    tune_malloc()
    if threads:
        torch.set_num_threads(threads)
    cfg, mine, ref, hf = build(heads, kind, T, index_topk=index_topk)
    call = callers(cfg, mine, ref, hf, LAYER[kind], T, chunk, peer)[which]
    x = torch.randn(batch, T, cfg.dim, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out.send(rss_high_water(lambda: call(x).square().mean().backward()))


def rss_high_water(run) -> int:
    """Bytes of resident memory ``run()`` peaks at above the RSS before it (VmHWM, reset first where the kernel
    allows)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = _status_bytes("VmRSS")
    run()
    return _status_bytes("VmHWM") - before


def peak_rss(args: tuple, which: int, child=_peak_child) -> int:
    """``child(args, which, pipe)``'s measurement (``rss_high_water``), in a fresh spawned process."""
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=child, args=(args, which, send))
    p.start()
    value = recv.recv()
    p.join()
    return value


def break_even(heads: int, index_topk: int | None, steps: int) -> None:
    """One chunk of CHUNK_ROWS queries (batch 1, its band of C + W - 1 tokens all visible) with n = m index_topk
    entries and a random top-k of them per query: forward + backward of ``chunk_attention`` masked and gathered,
    one JSON line per m (the ratio: masked's time over gathered's)."""
    cfg, mine, _, _ = build(heads, "csa", 4096, index_topk=index_topk)
    g = torch.Generator().manual_seed(0)
    C, W, H, d, k = CHUNK_ROWS, cfg.window_size, cfg.n_heads, cfg.head_dim, cfg.index_topk
    for m in (1, 2, 4, 8, 16):
        n = m * k
        q = torch.randn(1, C, H, d, generator=g, requires_grad=True)
        band = torch.randn(1, C + W - 1, 1, d, generator=g, requires_grad=True)
        entries = torch.randn(1, n, d, generator=g, requires_grad=True)
        band_mask = torch.ones(1, C, C + W - 1, dtype=torch.bool)
        chosen = select_topk(torch.randn(1, C, n, generator=g), torch.ones(1, C, n, dtype=torch.bool), k)
        ways = {"masked": torch.cat([band_mask, chosen], dim=-1),
                "gathered": Gathered(band_mask, entry_picks(chosen, k))}
        t = {name: timed(lambda v=v: chunk_attention(mine.attend, q, band, entries, v).square().sum().backward(),
                         steps) for name, v in ways.items()}
        print(json.dumps({"heads": H, "head_dim": d, "index_topk": k, "chunk": C, "entries": n, "entries_over_topk": m,
                          "masked_ms": round(t["masked"] * 1e3, 2), "gathered_ms": round(t["gathered"] * 1e3, 2),
                          "ratio_masked_over_gathered": round(t["masked"] / t["gathered"], 2)}), flush=True)


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
    ap.add_argument("--peer", choices=["transformers", "masked"], default="transformers",
                    help="masked: flyer's chunks with CSA's entries masked, not gathered")
    ap.add_argument("--index-topk", type=int, default=None, help="CSA's entries kept per query (tiny-v4: 16)")
    ap.add_argument("--break-even", action="store_true", help="one chunk's attention, masked against gathered")
    args = ap.parse_args()
    tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.break_even:
        return break_even(args.heads, args.index_topk, args.steps)
    for T in args.seq_lens:
        for kind in args.kinds:
            cfg, mine, ref, hf = build(args.heads, kind, T, index_topk=args.index_topk)
            layer = LAYER[kind]
            mine_call, ref_call = callers(cfg, mine, ref, hf, layer, T, args.chunk, args.peer)
            x = torch.randn(args.batch_size, T, cfg.dim, generator=torch.Generator().manual_seed(1))
            r = cfg.compress_ratios[layer]
            N = T // r if r else 0
            indexed = cfg.is_csa(layer) and N > cfg.index_topk
            topk = cfg.index_topk if indexed and gathers(N, cfg.index_topk) else 0
            chunk = args.chunk or query_chunk(args.batch_size, T, cfg.n_heads, cfg.window_size, N,
                                              cfg.index_n_heads if indexed else 0, topk=topk, head_dim=cfg.head_dim)
            with torch.no_grad():
                got, want = mine_call(x), ref_call(x)
                # the masked peer selects as flyer does: no tie is broken otherwise
                tied = (tied_queries(cfg, mine, layer, x) if indexed and args.peer == "transformers"
                        else torch.zeros(x.shape[:2], dtype=torch.bool))
            diff = (got - want).abs().amax(-1).masked_fill(tied, 0)
            out = {"kind": kind, "peer": args.peer, "seq_len": T, "batch_size": args.batch_size,
                   "heads": cfg.n_heads, "entries": N, "index_topk": cfg.index_topk if indexed else None,
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
            s_mine, s_ref = saved_bytes(lambda: mine_call(xg)), saved_bytes(lambda: ref_call(xg))
            out |= {"saved_mb": round(s_mine / 2**20, 1), "peer_saved_mb": round(s_ref / 2**20, 1),
                    "saved_ratio_peer_over_flyer": round(s_ref / s_mine, 2)}
            if not args.no_rss:
                child = (args.heads, kind, args.batch_size, T, args.chunk, args.threads, args.peer, args.index_topk)
                p_mine, p_ref = peak_rss(child, 0), peak_rss(child, 1)
                out |= {"peak_rss_mb": round(p_mine / 2**20, 1), "peer_peak_rss_mb": round(p_ref / 2**20, 1),
                        "peak_ratio_peer_over_flyer": round(p_ref / p_mine, 2)}
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
