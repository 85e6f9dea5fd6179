"""DeepSeek-V3's recomputation of the MLA up-projections (``flyer train --recompute mla``): memory and step time.

One model, its training step run in lockstep with recomputation off and on (one step each in turn, so machine-load
drift hits both alike), in each precision. Prints one JSON object:

* ``held_mib_<precision>_none`` / ``_mla``: what one training forward of the batch keeps alive for backward
  (``flyer.parallel.memory.held_bytes``, parameters left out), and ``held_ratio_<precision>`` (mla / none);
* ``estimate_mib_<precision>_none`` / ``_mla``: the trainer's lower-bound estimate of the same
  (``flyer.parallel.memory.activation_bytes``);
* ``step_time_ratio_<precision>``: median step time (forward and backward) with recomputation / without;
* ``same_gradients``: every gradient equal bit for bit in every precision;
* ``layer_ratio_<preset>``: the estimate of one MoE layer's saved bytes per token with / without, for the real
  geometries (``flyer.cluster.costs.activation_bytes_per_token_layer``; DeepSeek-V3.2's DSA layers at 4,096 tokens,
  their masked form), where the heads are many.

    python bench/recompute.py                    # small preset, 2 x 256 tokens, ~1 minute on 2 cores
    python bench/recompute.py --heads 32         # the small preset with 32 heads
    python bench/recompute.py --dsa 64           # every layer DSA's (V3.2's), its indexer keeping 64 keys: masked
    python bench/recompute.py --preset tiny --reps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from flyer.cluster.costs import activation_bytes_per_token_layer
from flyer.config import preset
from flyer.fp8 import convert_to_fp8
from flyer.model.recompute import MODES, set_recompute
from flyer.model.transformer import Transformer
from flyer.parallel.memory import activation_bytes, held_bytes

MIB = 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heads", type=int, default=None, help="replaces the preset's n_heads (the saving grows with it)")
    ap.add_argument("--dsa", type=int, default=0, metavar="TOPK",
                    help="every layer a DSA layer (V3.2's lightning indexer, 4 heads of 64) keeping TOPK keys a query")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    over = ({} if args.heads is None else {"n_heads": args.heads}) | (
        {"index_topk": args.dsa, "index_n_heads": 4, "index_head_dim": 64} if args.dsa else {})
    cfg = preset(args.preset, **over)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    out: dict = {"preset": args.preset, "n_heads": cfg.n_heads, "index_topk": cfg.index_topk,
                 "tokens": args.batch * args.seq, "same_gradients": True}
    for precision in ("fp32", "bf16", "fp8"):
        torch.manual_seed(0)
        model = Transformer(cfg)
        if precision == "fp8":
            convert_to_fp8(model)

        def step(mode: str):
            set_recompute(model, mode)
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", torch.bfloat16, enabled=precision != "fp32"):
                t0 = time.perf_counter()
                model.compute_loss(tokens, tokens).loss.backward()
                return time.perf_counter() - t0, {n: p.grad for n, p in model.named_parameters()}

        times: dict[str, list[float]] = {m: [] for m in MODES}
        grads = {}
        for _ in range(args.reps):
            for mode in MODES:
                t, grads[mode] = step(mode)
                times[mode].append(t)
        out["same_gradients"] &= all(torch.equal(grads["none"][n], grads["mla"][n]) for n in grads["none"]
                                     if grads["none"][n] is not None)
        for mode in MODES:
            set_recompute(model, mode)
            with torch.autocast("cpu", torch.bfloat16, enabled=precision != "fp32"):
                held = held_bytes(lambda: model.compute_loss(tokens, tokens), model)
            out[f"held_mib_{precision}_{mode}"] = round(held / MIB, 1)
            estimate = activation_bytes(cfg, 1, 0, "1f1b", args.seq, args.batch, precision, recompute=mode)
            out[f"estimate_mib_{precision}_{mode}"] = round(estimate / MIB, 1)
        out[f"held_ratio_{precision}"] = round(out[f"held_mib_{precision}_mla"] / out[f"held_mib_{precision}_none"], 3)
        out[f"step_time_ratio_{precision}"] = round(statistics.median(times["mla"]) / statistics.median(times["none"]),
                                                    3)
    for name in ("dsv2-lite", "dsv3", "dsv32"):
        c = preset(name)
        per = [activation_bytes_per_token_layer(c, True, recompute=False, mla_recompute=m, seq_len=4096)
               for m in (True, False)]
        out[f"layer_ratio_{name}"] = round(per[0] / per[1], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
