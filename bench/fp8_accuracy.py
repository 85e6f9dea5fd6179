"""FP8 vs BF16 training accuracy, the accumulation-precision experiment, LogFMT, step-time ratio.

Trains the same preset from the same initialisation on the same batches twice, in lockstep (one
BF16 step, then one FP8 step, so machine-load drift hits both alike): BF16 autocast, and BF16
autocast with ``convert_to_fp8`` (E4M3 GEMMs, 1x128 / 128x128 scales, CPU emulation here).
Prints one JSON object:

* ``loss_bf16``, ``loss_fp8``, ``rel_gap``: final validation losses and (fp8 - bf16) / bf16
  (the paper's bar: |gap| < 0.25%); ``train_*``: the same for the training loss averaged over
  the last ``--smooth`` steps. ``loss_fp8_input``, ``rel_gap_fp8_input``: a third model in the same
  lockstep, FP8 with ``FP8Recipe(activation_cache="input")`` (backward keeps the layer inputs
  themselves instead of their FP8 tiles).
* ``saved_mib_bf16`` / ``_fp8`` / ``_fp8_input``: what one training forward of a batch keeps for
  backward (``flyer.parallel.memory.saved_bytes``, the parameters left out), and
  ``saved_ratio_fp8_vs_bf16``: the FP8 activation cache against BF16.
* ``accum_err_no_promotion``, ``accum_err_promotion``: max relative error of a K=4096 FP8 GEMM
  with a 13-mantissa-bit accumulator, without / with promotion to FP32 every 128
  (``accumulation`` has both rounding models).
* ``step_time_ratio``: median FP8 step time / median BF16 step time on this machine (the FP8
  GEMMs are emulated in FP32 on CPU, so this measures the emulation, not FP8 hardware).
* ``logfmt``: relative error (Frobenius) of E4M3, E5M2 (1x128 tiles), LogFMT-8, LogFMT-10 and
  BF16 on real activations (inputs of the FP8 linears) and activation gradients, captured from
  one training step of the trained BF16 model.

    python bench/fp8_accuracy.py                 # ~3-5 minutes on 2 cores
    python bench/fp8_accuracy.py --steps 40      # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from flyer.config import preset
from flyer.data import BatchSampler, eval_batches, prepare_data
from flyer.fp8 import FP8Recipe, convert_to_fp8, fake_quantize
from flyer.fp8.gemm import accumulation_experiment
from flyer.fp8.logfmt import logfmt_roundtrip
from flyer.model.moe import update_router_bias
from flyer.model.transformer import Transformer
from flyer.parallel.memory import saved_bytes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--smooth", type=int, default=20, help="training loss: mean over the last N steps")
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary built for the bench corpus")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (0 = torch's default); 1 keeps timings stable on shared cores")
    p.add_argument("--accum-k", type=int, default=4096)
    p.add_argument("--out", default="runs/bench_fp8", help="cache directory for the tokenizer and shards")
    return p.parse_args(argv)


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def forward(model, x, y):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model.compute_loss(x, y)


def train_step(model, opt, x, y, lr) -> tuple[float, float]:
    for g in opt.param_groups:
        g["lr"] = lr
    t0 = time.perf_counter()
    out = forward(model, x, y)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    update_router_bias(model)
    return float(out.main_loss.detach()), time.perf_counter() - t0


@torch.no_grad()
def evaluate(model, batches) -> float:
    model.eval()
    losses = []
    for x, y in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses.append(float(model.compute_loss(x, y).main_loss))
    model.train()
    return sum(losses) / len(losses)


def format_errors(model, x, y) -> dict:
    """Relative errors of each number format on the inputs and output gradients of the linear
    layers that run in FP8 (captured with hooks during one BF16 training step)."""
    acts, grads, hooks = [], [], []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and not name.endswith("head"):
            hooks.append(m.register_forward_hook(lambda mod, inp, out: acts.append(inp[0].detach().float())))
            hooks.append(m.register_full_backward_hook(lambda mod, gin, gout: grads.append(gout[0].detach().float())))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.compute_loss(x, y)
    out.loss.backward()
    for h in hooks:
        h.remove()
    model.zero_grad(set_to_none=True)

    formats = {
        "e4m3": lambda t: fake_quantize(t, "tile", "e4m3"),
        "e5m2": lambda t: fake_quantize(t, "tile", "e5m2"),
        "logfmt8": lambda t: logfmt_roundtrip(t, 8),
        "logfmt10": lambda t: logfmt_roundtrip(t, 10),
        "bf16": lambda t: t.bfloat16().float(),
    }

    def errors(tensors):
        res = {}
        for fmt, fn in formats.items():
            errs = []
            for t in tensors:
                t2 = t.reshape(-1, t.shape[-1])
                if t2.norm() > 0:
                    errs.append(float((fn(t2) - t2).norm() / t2.norm()))
            res[fmt] = statistics.mean(errs)
        return res

    return {"n_activation_tensors": len(acts), "n_gradient_tensors": len(grads),
            "activations": errors(acts), "gradients": errors(grads)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    data = prepare_data(None, Path(args.out) / "data", vocab_size=args.vocab_size)
    cfg = preset(args.preset, vocab_size=data.vocab_size, max_seq_len=max(args.seq_len, 64),
                 original_seq_len=max(args.seq_len, 64))
    torch.manual_seed(args.seed)
    base = Transformer(cfg)
    models = {"bf16": copy.deepcopy(base), "fp8": convert_to_fp8(copy.deepcopy(base)),
              "fp8_input": convert_to_fp8(copy.deepcopy(base), recipe=FP8Recipe(activation_cache="input"))}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
            for k, m in models.items()}
    sampler = BatchSampler(data.train, args.batch_size, args.seq_len, args.seed)
    val = eval_batches(data.val, args.batch_size, args.seq_len, args.eval_batches)
    saved = {k: saved_bytes(lambda: forward(m, *val[0]), m) for k, m in models.items()}
    losses = {k: [] for k in models}
    times = {k: [] for k in models}
    for step in range(args.steps):
        x, y = sampler.next_batch()
        for k in models:  # lockstep: same batch, same moment
            loss, dt = train_step(models[k], opts[k], x, y, lr_at(step, args))
            losses[k].append(loss)
            times[k].append(dt)
        if not all(math.isfinite(losses[k][-1]) for k in models):
            print(f"non-finite loss at step {step}: {[losses[k][-1] for k in models]}", file=sys.stderr)
            return 1
    val_loss = {k: evaluate(m, val) for k, m in models.items()}
    train_loss = {k: sum(v[-args.smooth:]) / len(v[-args.smooth:]) for k, v in losses.items()}
    skip = min(5, args.steps - 1)  # first steps warm allocator and caches
    med = {k: statistics.median(v[skip:]) for k, v in times.items()}

    accum = {r: accumulation_experiment(K=args.accum_k, rounding=r) for r in ("truncate", "nearest")}
    fmt_err = format_errors(models["bf16"], *sampler.next_batch())

    result = {
        "preset": args.preset, "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "tokens_per_step": args.batch_size * args.seq_len, "vocab_size": data.vocab_size,
        "loss_bf16": val_loss["bf16"], "loss_fp8": val_loss["fp8"],
        "rel_gap": (val_loss["fp8"] - val_loss["bf16"]) / val_loss["bf16"],
        "train_loss_bf16": train_loss["bf16"], "train_loss_fp8": train_loss["fp8"],
        "train_rel_gap": (train_loss["fp8"] - train_loss["bf16"]) / train_loss["bf16"],
        "loss_fp8_input": val_loss["fp8_input"],
        "rel_gap_fp8_input": (val_loss["fp8_input"] - val_loss["bf16"]) / val_loss["bf16"],
        "train_loss_fp8_input": train_loss["fp8_input"],
        **{f"saved_mib_{k}": v / 2**20 for k, v in saved.items()},
        "saved_ratio_fp8_vs_bf16": saved["fp8"] / saved["bf16"],
        "initial_loss": losses["bf16"][0],
        "paper_bar_rel_gap": 0.0025,
        "accum_err_no_promotion": accum["truncate"]["accum_err_no_promotion"],
        "accum_err_promotion": accum["truncate"]["accum_err_promotion"],
        "accumulation": accum,
        "step_time_bf16_s": med["bf16"], "step_time_fp8_s": med["fp8"],
        "step_time_ratio": med["fp8"] / med["bf16"],
        "step_time_fp8_input_s": med["fp8_input"],
        "logfmt": fmt_err,
        "threads": torch.get_num_threads(),
        "wall_s": time.perf_counter() - t_start,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
