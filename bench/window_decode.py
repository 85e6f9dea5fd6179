"""Decode of a model whose layers slide (Mistral 7B v0.1's kind) at contexts past its window: flyer's sliding
layers, which read each row's last window + T - 1 cached slots (``Rows.window_read``), against their peer, the same
layers reading every cached slot with those outside the window masked, and against the same model without a window
(full attention: the cost of not sliding).

``decode.py``'s GQA model ("small" with 16 heads over 4 KV heads of 32, 6 layers), every layer sliding ``--window``,
random weights and a BF16 cache filled with ``--contexts`` random entries per row (decode cost does not depend on
them); ``--steps`` greedy decode steps of a batch of ``--batch`` timed, the three interleaved for ``--rounds`` rounds,
best of each kept (``decode.py``'s ``best_of``). Per context: tokens/s of each, the ratios (flyer / peer), and the
largest difference between flyer's and the peer's logits for one step from the same cache, beside the largest
logit (the same sums, FP32: they differ by rounding alone). One JSON object.

    python bench/window_decode.py [--contexts 2048,8192,32768] [--window 512] [--batch 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
from decode import GQA_BENCH, DecodeRun, best_of  # bench/decode.py, beside this script

from flyer.config import preset
from flyer.infer.attention import Rows
from flyer.model.transformer import Transformer
from flyer.runtime import tune_malloc


@contextlib.contextmanager
def every_slot():
    """Sliding layers reading every cached slot, the window masked (``Rows.window_read`` None: the path a layer
    takes where its span is no narrower): the peer."""
    read = Rows.window_read
    Rows.window_read = lambda self, window: None
    try:
        yield
    finally:
        Rows.window_read = read


def models(window: int, max_len: int) -> tuple[Transformer, Transformer]:
    """(the model sliding every layer by ``window``, the same weights attending fully), seeded."""
    shape = dict(GQA_BENCH, max_seq_len=max_len, original_seq_len=max_len)
    torch.manual_seed(0)
    sliding = Transformer(preset("small", **shape, window_size=window,
                                 sliding_layers=tuple(range(preset("small").n_layers)))).eval()
    full = Transformer(preset("small", **shape)).eval()
    full.load_state_dict(sliding.state_dict())
    return sliding, full


@torch.inference_mode()
def step_logits(run: DecodeRun, switch) -> torch.Tensor:
    """One decode step's FP32 logits from ``run``'s cache as filled (the step's own write lands past it)."""
    tok = torch.arange(run.batch).view(-1, 1) % run.vocab
    with switch():
        return run.dec.logits(run.dec.forward(tok, torch.full((run.batch,), run.ctx))).float()


def runs(sliding: Transformer, full: Transformer, ctx: int, batch: int, steps: int) -> dict[str, DecodeRun]:
    """flyer, its peer reading every slot (the same cached entries) and the model without a window, at ``ctx``."""
    out = {"flyer": DecodeRun(sliding, "absorbed", ctx, batch, steps),
           "every_slot": DecodeRun(sliding, "absorbed", ctx, batch, steps, switch=every_slot),
           "full": DecodeRun(full, "absorbed", ctx, batch, steps)}
    out["every_slot"].dec.cache.tensors = out["flyer"].dec.cache.tensors
    return out


def logit_diff(by: dict[str, DecodeRun]) -> tuple[float, float]:
    """(the largest difference between flyer's and the peer's logits of one step, the largest logit)."""
    a, b = step_logits(by["flyer"], contextlib.nullcontext), step_logits(by["every_slot"], every_slot)
    return float((a - b).abs().max()), float(a.abs().max())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="2048,8192,32768")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8, help="timed decode steps per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved measurements per path (best kept)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    tune_malloc()  # as flyer's CLI and Trainer do
    torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    t0 = time.perf_counter()
    sliding, full = models(args.window, max(contexts) + args.steps + 1)
    out: dict = {"model": {"base_preset": "small", **{k: v for k, v in GQA_BENCH.items() if "seq_len" not in k},
                           "n_layers": sliding.cfg.n_layers, "window": args.window, "cache_dtype": "bf16"},
                 "batch": args.batch, "steps": args.steps, "rounds": args.rounds, "threads": args.threads}
    for ctx in contexts:
        by = runs(sliding, full, ctx, args.batch, args.steps)
        out[f"max_logit_diff_ctx{ctx}"], out[f"max_logit_ctx{ctx}"] = logit_diff(by)
        best = best_of(by, args.rounds)
        for name, v in best.items():
            out[f"tokens_per_s_{name}_ctx{ctx}"] = round(v, 1)
        out[f"speedup_vs_every_slot_ctx{ctx}"] = round(best["flyer"] / best["every_slot"], 2)
        out[f"speedup_vs_full_ctx{ctx}"] = round(best["flyer"] / best["full"], 2)
        del by
    out["bench_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
