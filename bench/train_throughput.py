"""Training-step throughput of flyer versus Hugging Face transformers' DeepseekV3ForCausalLM.

Both run the same architecture (the `small` preset by default, MTP off for the comparison since
transformers does not train MTP) with the same batch and the same step: autocast in the chosen
precision, forward, backward, clip, fused AdamW (CPU by default; ``--device cuda``). transformers'
expert implementations (eager, batched_mm, grouped_mm) are each measured and the fastest is the
peer. Steps of the two are interleaved so that load on the machine affects both alike. The rate
of the fastest GEMM this machine offers in the step's precision, measured in the same run, is the
MFU denominator. Prints one JSON object.

``--precision auto`` (the default) is ``flyer train``'s: bf16 where the device multiplies BF16 in
hardware, else fp32. Both sides always run the same precision: on a CPU without BF16 hardware a
bf16 comparison would pit flyer's FP32-kernel BF16 GEMMs (``flyer.model.lowp``) against ATen's
slow ones, which is not what this bench is for.

    python bench/train_throughput.py [--preset small] [--batch-size 8] [--seq-len 256] [--steps 4] [--device cuda]
                                     [--precision auto|bf16|fp32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from flyer.config import preset
from flyer.model.transformer import Transformer
from flyer.runtime import autocast, resolve_precision, tune_malloc
from flyer.train.metrics import fastest_gemm, model_flops_per_token


def hf_model(cfg, experts_impl: str):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    hcfg = DeepseekV3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.inter_dim,
        moe_intermediate_size=cfg.moe_inter_dim, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads, n_shared_experts=cfg.n_shared_experts, n_routed_experts=cfg.n_routed_experts,
        routed_scaling_factor=cfg.route_scale, kv_lora_rank=cfg.kv_lora_rank, q_lora_rank=cfg.q_lora_rank or None,
        qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, qk_nope_head_dim=cfg.qk_nope_head_dim,
        n_group=cfg.n_expert_groups, topk_group=cfg.n_limited_groups, num_experts_per_tok=cfg.n_activated_experts,
        first_k_dense_replace=cfg.n_dense_layers, norm_topk_prob=cfg.norm_topk_prob,
        max_position_embeddings=cfg.max_seq_len, initializer_range=cfg.init_std, rms_norm_eps=cfg.norm_eps,
        num_mtp_layers=0, use_cache=False, attn_implementation="sdpa", experts_implementation=experts_impl)
    return DeepseekV3ForCausalLM(hcfg)


def make_step(model, x, loss_fn, precision):
    """One training step, the same for flyer and the peer: autocast, clip, fused AdamW."""
    model = model.to(x.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    def step():
        with autocast(precision, x.device):
            loss = loss_fn(model, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # .item() waits for the device

    return step


def timed(step) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--max-gib", type=float, default=4.0, help="skip peers that would need more memory")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    args = ap.parse_args()
    tune_malloc()  # as flyer's CLI and Trainer do
    device = torch.device(args.device)
    precision = resolve_precision(args.precision, device)
    torch.manual_seed(0)
    cfg = preset(args.preset, mtp_depth=0)
    B, T = args.batch_size, args.seq_len
    x = torch.randint(0, cfg.vocab_size, (B, T + 1), device=device)
    flyer_loss = lambda m, x: m.compute_loss(x[:, :-1], x[:, 1:]).loss  # noqa: E731
    hf_loss = lambda m, x: m(input_ids=x[:, :-1], labels=x[:, :-1]).loss  # noqa: E731

    flyer_step = make_step(Transformer(cfg), x, flyer_loss, precision)
    mtp_cfg = preset(args.preset)
    flyer_mtp_step = make_step(Transformer(mtp_cfg), x, flyer_loss, precision)
    peers: dict[str, object] = {}
    # batched_mm gathers one weight copy per routed token: (B*T*K) x 3 x F x D floats
    batched_bytes = B * T * cfg.n_activated_experts * 3 * cfg.moe_inter_dim * cfg.dim * 4
    for impl in ("eager", "batched_mm", "grouped_mm"):
        if impl == "batched_mm" and batched_bytes > args.max_gib * 2**30:
            peers[impl] = f"skipped: gathers ~{batched_bytes / 2**30:.0f} GiB of per-token expert weights"
            continue
        try:
            s = make_step(hf_model(cfg, impl), x, hf_loss, precision)
            s()  # warm-up; also proves the implementation runs here
            peers[impl] = s
        except Exception as e:  # an implementation this torch/CPU cannot run
            peers[impl] = f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    flyer_step()
    flyer_mtp_step()
    times: dict[str, list[float]] = {"flyer": [], "flyer_mtp": [], **{k: [] for k, v in peers.items() if callable(v)}}
    for _ in range(args.steps):  # interleaved, so machine load hits everyone alike
        times["flyer"].append(timed(flyer_step))
        times["flyer_mtp"].append(timed(flyer_mtp_step))
        for impl, s in peers.items():
            if callable(s):
                times[impl].append(timed(s))
    med = {k: statistics.median(v) for k, v in times.items() if v}
    tok = B * T
    hf_impls = {k: tok / v for k, v in med.items() if k in peers}
    best = max(hf_impls, key=hf_impls.get) if hf_impls else None
    peak, peak_gemm = fastest_gemm(torch.bfloat16 if precision == "bf16" else torch.float32, device)
    tokens_per_s = tok / med["flyer"]
    print(json.dumps({
        "preset": args.preset, "device": str(device), "precision": precision, "batch_size": B, "seq_len": T,
        "threads": torch.get_num_threads(),
        "tokens_per_s": tokens_per_s,
        "mfu": model_flops_per_token(cfg, T) * tokens_per_s / peak,
        "tokens_per_s_with_mtp": tok / med["flyer_mtp"],
        "gemm_peak_flops": peak, "peak_gemm": peak_gemm,
        "hf_tokens_per_s": hf_impls.get(best) if best else None,
        "hf_experts_implementation": best,
        "hf_tokens_per_s_by_impl": hf_impls,
        "hf_unavailable": {k: v for k, v in peers.items() if not callable(v)},
        "speedup_vs_hf": tokens_per_s / hf_impls[best] if best else None,
    }))


if __name__ == "__main__":
    main()
