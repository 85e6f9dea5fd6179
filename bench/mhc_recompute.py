"""DeepSeek-V4's hyper-connections (mHC) with their mix recomputed in backward: memory and step time.

One tiny-v4-shaped model, its training step run in lockstep under three choices (one step each in turn, so
machine-load drift hits them alike), BF16 autocast:

* ``kept``: nothing recomputed (the peer);
* ``mix``: flyer's, the mix's normalised streams recomputed (``flyer.model.hyper._recomputed_mix``);
* ``maps``: the whole maps recomputed, the Sinkhorn iterations too (the alternative flyer did not take).

Prints one JSON object: ``step_time_ratio_<choice>`` (median of the paired steps' ratios to ``kept``),
``held_mib_<choice>`` (what one training forward keeps alive for backward, ``flyer.parallel.memory.held_bytes``)
and ``same_gradients`` (every gradient equal bit for bit across the three).

    python bench/mhc_recompute.py                 # tiny-v4, 4 x 256 tokens, 30 paired steps, ~1 minute on 2 cores
    python bench/mhc_recompute.py --dim 512 --steps 10
"""

from __future__ import annotations

import argparse
import functools
import json

from _lockstep import add_step_args, batch_tokens, compare

import flyer.model.hyper as hyper
from flyer.config import preset
from flyer.model.recompute import recomputed
from flyer.model.transformer import Transformer


def _maps_recomputed(self, h):
    """``HyperConnection.forward`` with the whole maps under one recomputed region."""
    pre, post, comb = recomputed(self._maps, h, selective=False)
    return post, comb, hyper.as_dtype((pre.unsqueeze(-1) * h).sum(dim=2), h.dtype)


CHOICES = {"kept": (hyper.HyperConnection.forward, hyper._mix),
           "mix": (hyper.HyperConnection.forward, hyper._recomputed_mix),
           "maps": (_maps_recomputed, hyper._mix)}


def _use(choice: str) -> None:
    hyper.HyperConnection.forward, hyper._recomputed_mix = CHOICES[choice]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=None, help="replaces tiny-v4's width")
    add_step_args(ap, steps=30)
    args = ap.parse_args()
    cfg = preset("tiny-v4", **({} if args.dim is None else {"dim": args.dim}))
    tokens = batch_tokens(args, cfg.vocab_size)
    model = Transformer(cfg).train()
    out: dict = {"dim": cfg.dim, "tokens": args.batch * args.seq, "steps": args.steps}
    try:
        out |= compare(model, tokens, {c: functools.partial(_use, c) for c in CHOICES}, args.steps, peer="kept")
    finally:
        _use("mix")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
