"""DeepSeek-V4's full-sequence step, flyer against transformers' DeepseekV4ForCausalLM on the same weights.

A random transformers model of ``tiny-v4``'s shape (or ``--dim`` / ``--layers`` overrides) is saved and loaded
into flyer (``load_hf_weights``); both then run the same batches, forward (no grad) and forward + backward of the
mean cross-entropy, FP32. Prints one JSON object: tokens/s each, their ratios, and the logits' relative
difference: about 1e-6 unless some query's CSA entries tie at the indexer's top-k cut (entries every indexer
head's ReLU zeroes score exactly 0; random weights make such ties), which flyer breaks towards the earliest
entries and transformers by its top-k kernel's order.

    python bench/v4_step.py [--batch-size 2] [--seq-len 512] [--steps 5] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, DeepseekV4Config, DeepseekV4ForCausalLM

from flyer.config import preset
from flyer.interop.hf import build_empty, load_hf_weights, read_hf_config
from flyer.runtime import tune_malloc


def reference_config(dim: int, layers: int) -> DeepseekV4Config:
    """transformers' config of ``tiny-v4`` (its ratios repeated over ``layers``), width ``dim``."""
    c = preset("tiny-v4")
    ratios = [c.compress_ratios[i % len(c.compress_ratios)] for i in range(layers)]
    kinds = {0: "sliding_attention", c.csa_ratio: "compressed_sparse_attention"}
    return DeepseekV4Config(
        vocab_size=c.vocab_size, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=c.n_heads,
        head_dim=c.head_dim, qk_rope_head_dim=c.qk_rope_head_dim, q_lora_rank=c.q_lora_rank, o_groups=c.o_groups,
        o_lora_rank=c.o_lora_rank, sliding_window=c.window_size, index_topk=c.index_topk,
        index_n_heads=c.index_n_heads, index_head_dim=c.index_head_dim, hc_mult=c.hc_mult,
        moe_intermediate_size=c.moe_inter_dim, n_routed_experts=c.n_routed_experts, n_shared_experts=1,
        num_experts_per_tok=c.n_activated_experts, routed_scaling_factor=c.route_scale, swiglu_limit=c.swiglu_limit,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
        layer_types=[kinds.get(r, "heavily_compressed_attention") for r in ratios],
        mlp_layer_types=["hash_moe"] * c.n_hash_layers + ["moe"] * (layers - c.n_hash_layers),
        max_position_embeddings=c.max_seq_len, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
        num_nextn_predict_layers=0)  # transformers' DeepseekV4 saves no MTP module: none read, none compared


def timed(fn, steps: int) -> float:
    """Median seconds of ``fn()`` over ``steps`` calls, after one warm-up."""
    fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        DeepseekV4ForCausalLM(reference_config(args.dim, args.layers)).save_pretrained(d)
        ref = AutoModelForCausalLM.from_pretrained(d).float().train()
        cfg, _ = read_hf_config(d)
        model = build_empty(cfg)
        load_hf_weights(model, Path(d), rope_half=False)
        model.train()
    x = torch.randint(0, model.cfg.vocab_size, (args.batch_size, args.seq_len + 1))
    tokens, targets = x[:, :-1], x[:, 1:]

    def flyer_step():
        model.compute_loss(tokens, targets).main_loss.backward()

    def ref_step():
        logits = ref(tokens, use_cache=False).logits
        F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).backward()

    def forward(m, call):
        def run():
            with torch.no_grad():
                call(m)
        return run

    with torch.no_grad():
        diff = float((model(tokens) - ref(tokens, use_cache=False).logits).abs().max() / model(tokens).abs().max())
    n = args.batch_size * args.seq_len
    out = {"batch_size": args.batch_size, "seq_len": args.seq_len, "dim": args.dim, "layers": args.layers,
           "threads": torch.get_num_threads(), "logits_rel_diff": diff}
    runs = {"forward": (forward(model, lambda m: m(tokens)), forward(ref, lambda m: m(tokens, use_cache=False))),
            "train_step": (flyer_step, ref_step)}
    for name, (mine, theirs) in runs.items():
        t_mine, t_ref = timed(mine, args.steps), timed(theirs, args.steps)
        out[f"{name}_tokens_per_s"] = round(n / t_mine, 1)
        out[f"peer_{name}_tokens_per_s"] = round(n / t_ref, 1)
        out[f"{name}_ratio_vs_peer"] = round(t_ref / t_mine, 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
