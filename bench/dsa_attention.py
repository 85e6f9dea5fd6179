"""DeepSeek Sparse Attention (V3.2 / GLM-5) at long sequences: flyer's ``MLA`` attending to each query's
index_topk picks gathered in query chunks (``flyer.model.dsa_chunks``) against its masked form (``gather=False``:
the whole sequence's indexer scores, a (B, 1, T, T) selection mask, dense attention over every key).

One DSA layer of ``tiny``'s shape (4 heads, kv_lora_rank 32; ``--heads`` overrides), ``--index-topk`` (256) keys
per query, ``--index-heads`` indexer heads of 32, FP32, batch 1, at each ``--seq-lens``. Per length: the outputs'
relative difference, forward (no grad) and forward + backward medians and their ratio (masked's time / gathered's),
the bytes autograd saves for backward (distinct storages) and, in a fresh child process per form, the
resident-memory high-water of one forward + backward above the RSS before it. ``rule_gathers`` (``_training``: under
autograd): whether ``dsa_gathers`` picks gathering at that length (the gathered column is measured either way).
One JSON line each.
``--forms``: instead, one chunk of ``CHUNK_ROWS`` queries' attention over its gathered picks (forward + backward),
absorbed (``absorbed_attend``, over the latents) against the compute-bound form on gathered per-head keys/values.

    python bench/dsa_attention.py [--seq-lens 4096 8192 16384] [--steps 3] [--threads N] [--no-rss]
    python bench/dsa_attention.py --seq-lens 512 1024 2048 --no-rss     # around dsa_gathers' crossover
    python bench/dsa_attention.py --forms
"""

from __future__ import annotations

import argparse
import json

import torch
from v4_attention import peak_rss, rss_high_water  # bench/v4_attention.py, beside this script
from v4_step import timed

import flyer.model.attention as attention
from flyer.config import preset
from flyer.model.attention import MLA
from flyer.model.dsa_chunks import absorbed_attend
from flyer.model.hybrid_chunks import CHUNK_ROWS, gather_entries
from flyer.model.transformer import layer_rope_tables
from flyer.parallel.memory import saved_bytes
from flyer.runtime import tune_malloc


def build(heads: int, index_topk: int, index_heads: int, T: int, seed: int = 0) -> MLA:
    """A DSA layer (layer 1 of ``tiny``'s shape) with random weights of unit-scale outputs."""
    cfg = preset("tiny").replace(n_heads=heads, index_topk=index_topk, index_n_heads=index_heads, index_head_dim=32,
                                 max_seq_len=T)
    layer = MLA(cfg, 1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            z = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * z if p.dim() == 1 and "bias" not in name else z / p.shape[-1] ** 0.5 if p.dim() > 1
                    else 0.1 * z)
    return layer


def callers(layer: MLA, T: int):
    """(gathered call, masked call) of x (B, T, D); the gathered one gathers at every length (``dsa_gathers``
    forced), so the lengths below its crossover are measured too."""
    cos, sin = layer_rope_tables(layer.cfg, [1], T, "cpu")[0]

    def gathered(x):
        rule, attention.dsa_gathers = attention.dsa_gathers, lambda attn, T, training=False: True
        try:
            return layer(x, cos, sin)
        finally:
            attention.dsa_gathers = rule

    return gathered, lambda x: layer(x, cos, sin, gather=False)


def _peak_child(args: tuple, which: int, out) -> None:
    """In a fresh process: one forward + backward of the gathered (0) or masked (1) layer; sends the resident-memory
    high-water during it above the RSS before it, in bytes."""
    heads, topk, index_heads, T, threads = args
    tune_malloc()
    if threads:
        torch.set_num_threads(threads)
    layer = build(heads, topk, index_heads, T)
    call = callers(layer, T)[which]
    x = torch.randn(1, T, layer.cfg.dim, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out.send(rss_high_water(lambda: call(x).square().mean().backward()))


def per_head_attend(layer: MLA, q_BCHd: torch.Tensor, picked_BCkL: torch.Tensor, valid_BCk: torch.Tensor):
    """The compute-bound form of ``absorbed_attend``: each pick's per-head key and value up-projected by ``wkv_b``
    from its gathered latent (B, C, k, H, nope + v), then per-head scores and p @ v."""
    H, nope, v, C = layer.n_heads, layer.qk_nope_head_dim, layer.v_head_dim, layer.kv_lora_rank
    B, Cq, k, _ = picked_BCkL.shape
    kv = layer.wkv_b(picked_BCkL[..., :C]).view(B, Cq, k, H, nope + v)
    k_rope = picked_BCkL[..., C:].unsqueeze(3).expand(B, Cq, k, H, -1)
    keys = torch.cat([kv[..., :nope], k_rope], dim=-1).permute(0, 1, 3, 2, 4)  # (B, C, H, k, nope + R)
    scores = (q_BCHd.unsqueeze(-2) @ keys.transpose(-1, -2)).squeeze(-2) * layer.softmax_scale
    p = torch.where(valid_BCk.unsqueeze(2), scores, float("-inf")).softmax(-1)
    return (p.unsqueeze(-2) @ kv[..., nope:].permute(0, 1, 3, 2, 4)).squeeze(-2)


def forms(heads: int, topk: int, steps: int) -> None:
    """One chunk of CHUNK_ROWS queries, each with ``topk`` random picks among 4 topk tokens: forward + backward of the
    absorbed and the per-head form (the same maths), one JSON line."""
    layer = build(heads, topk, 4, 4 * topk)
    g = torch.Generator().manual_seed(0)
    C, H, L = CHUNK_ROWS, layer.n_heads, layer.kv_lora_rank + layer.qk_rope_head_dim
    q = torch.randn(1, C, H, layer.qk_nope_head_dim + layer.qk_rope_head_dim, generator=g, requires_grad=True)
    latents = torch.randn(1, 4 * topk, L, generator=g, requires_grad=True)
    picks = torch.rand(1, C, 4 * topk, generator=g).argsort(-1)[..., :topk].int()
    run = {"absorbed": lambda: absorbed_attend(layer, q, *gather_entries(latents, picks)),
           "per_head": lambda: per_head_attend(layer, q, *gather_entries(latents, picks))}
    with torch.no_grad():
        diff = float((run["absorbed"]() - run["per_head"]()).abs().max())
    t = {name: timed(lambda f=f: f().square().sum().backward(), steps) for name, f in run.items()}
    print(json.dumps({"heads": H, "kv_lora_rank": layer.kv_lora_rank, "index_topk": topk, "chunk": C,
                      "absorbed_ms": round(t["absorbed"] * 1e3, 2), "per_head_ms": round(t["per_head"] * 1e3, 2),
                      "ratio_per_head_over_absorbed": round(t["per_head"] / t["absorbed"], 2),
                      "max_abs_diff": diff}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--index-topk", type=int, default=256)
    ap.add_argument("--index-heads", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-rss", action="store_true", help="skip the child processes' RSS high-water")
    ap.add_argument("--forms", action="store_true", help="one chunk: absorbed against per-head gathered attention")
    args = ap.parse_args()
    tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.forms:
        return forms(args.heads, args.index_topk, args.steps)
    for T in args.seq_lens:
        layer = build(args.heads, args.index_topk, args.index_heads, T)
        gathered, masked = callers(layer, T)
        x = torch.randn(1, T, layer.cfg.dim, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            got, want = gathered(x), masked(x)
        out = {"seq_len": T, "heads": layer.n_heads, "index_topk": layer.index_topk, "index_heads": args.index_heads,
               "threads": torch.get_num_threads(), "rule_gathers": attention.dsa_gathers(layer, T),
               "rule_gathers_training": attention.dsa_gathers(layer, T, True),
               "out_rel_diff": float((got - want).norm() / want.norm())}
        xg = x.clone().requires_grad_(True)
        for name, run in (("forward", lambda f: torch.no_grad()(f)(x)),
                          ("forward_backward", lambda f: f(xg).square().mean().backward())):
            t_g, t_m = timed(lambda: run(gathered), args.steps), timed(lambda: run(masked), args.steps)
            out |= {f"{name}_ms": round(t_g * 1e3, 1), f"masked_{name}_ms": round(t_m * 1e3, 1),
                    f"{name}_ratio_masked_over_gathered": round(t_m / t_g, 2)}
        s_g, s_m = saved_bytes(lambda: gathered(xg)), saved_bytes(lambda: masked(xg))
        out |= {"saved_mb": round(s_g / 2**20, 1), "masked_saved_mb": round(s_m / 2**20, 1)}
        if not args.no_rss:
            child = (args.heads, args.index_topk, args.index_heads, T, args.threads)
            p_g, p_m = peak_rss(child, 0, _peak_child), peak_rss(child, 1, _peak_child)
            out |= {"peak_rss_mb": round(p_g / 2**20, 1), "masked_peak_rss_mb": round(p_m / 2**20, 1)}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
