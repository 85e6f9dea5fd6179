"""SwiGLU's SiLU output (and DeepSeek-V4's clamped projections) recomputed in backward: memory and step time.

The dense FFNs, the shared experts and, through ``torch._grouped_mm`` (CUDA's path), the routed experts run
``flyer.model.experts.kept_swiglu``, which keeps h1, h3 and the product for backward, as the fused expert kernel
does; the peer keeps what autograd keeps of ``swiglu`` (4 tensors of the width, 6 with V4's clamp). One model, its
training step run in lockstep under both (one step each in turn, so machine-load drift hits them alike), BF16
autocast.

Prints one JSON object: ``held_mib_kept`` / ``held_mib_recomputed`` (what one training forward keeps alive for
backward, ``flyer.parallel.memory.held_bytes``), ``step_time_ratio_recomputed`` (median of the paired steps'
ratios, recomputed over kept) and ``same_gradients`` (every gradient equal bit for bit).

    python bench/swiglu_recompute.py                      # tiny-v4, 4 x 256 tokens, 20 paired steps
    python bench/swiglu_recompute.py --preset small --experts-impl fused
"""

from __future__ import annotations

import argparse
import functools
import json

from _lockstep import add_step_args, batch_tokens, compare

import flyer.model.experts as experts
from flyer.config import preset
from flyer.model.transformer import Transformer

CHOICES = {"kept": experts.swiglu, "recomputed": experts.kept_swiglu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-v4")
    ap.add_argument("--experts-impl", default="grouped_mm", choices=experts.EXPERT_IMPLS)
    add_step_args(ap, steps=20)
    args = ap.parse_args()
    cfg = preset(args.preset)
    tokens = batch_tokens(args, cfg.vocab_size)
    model = Transformer(cfg, experts_impl=args.experts_impl).train()
    out: dict = {"preset": args.preset, "experts_impl": args.experts_impl, "tokens": args.batch * args.seq,
                 "steps": args.steps}
    try:
        out |= compare(model, tokens, {c: functools.partial(setattr, experts, "kept_swiglu", fn)
                                       for c, fn in CHOICES.items()}, args.steps, peer="kept")
    finally:
        experts.kept_swiglu = CHOICES["recomputed"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
