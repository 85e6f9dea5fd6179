"""Serving memory of a model whose every layer slides (Mistral 7B v0.1's kind): flyer's engine, which gives back a
request's blocks wholly behind its window and takes them as its prefill reaches them, against its peer, the same
engine keeping every block as for full attention (``Engine.window`` 0).

A ``tiny`` GQA model (2 KV heads of 32, every layer sliding ``--window``), blocks of ``--block-size``, prefill
chunks of ``--prefill-chunk``, FP32 cache. Two JSON lines:

- ``batch``: ``--requests`` prompts of ``--prompt`` random tokens, ``--new`` greedy tokens each, in a pool that
  holds every row: the blocks in use between steps (peak and mean) both ways and their ratios (peer / flyer),
  preemptions, and whether the tokens are equal.
- ``long_rows``: ``--long-requests`` rows of ``--long-prompt`` + ``--long-new`` tokens in a pool of ``--long-pool``
  blocks, fewer than one row needs: whether the peer refuses them (``Limits.check``), flyer's peak blocks, steps and
  preemptions, and whether its tokens equal ``generate`` alone for the first row.

    python bench/window_serving.py [--window 64] [--requests 8 --prompt 256 --new 256] [--long-pool 64]
"""

from __future__ import annotations

import argparse
import json

import torch

from flyer.config import preset
from flyer.errors import FieldError
from flyer.infer import GenerationConfig, generate
from flyer.model.transformer import Transformer
from flyer.serve.engine import Engine, EngineConfig, SamplingOptions


def serve(model: Transformer, args, blocks: int, prompts: list[list[int]], new: int, keep: bool) -> dict:
    """Each prompt's greedy tokens and the blocks in use between steps (``keep``: every block kept, the peer)."""
    cfg = model.cfg
    per_block = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4 * args.block_size
    eng = Engine(model, EngineConfig(kv_cache_bytes=(blocks + 1) * per_block, block_size=args.block_size,
                                     prefill_chunk=args.prefill_chunk, cache_dtype=torch.float32))
    if keep:
        eng.window = 0
    outs = [[] for _ in prompts]
    for i, p in enumerate(prompts):
        eng.submit(p, SamplingOptions(max_tokens=new), lambda e, i=i: outs[i].append(e.token))
    used = []
    while eng.busy:
        eng.step()
        used.append(eng.alloc.used)
    return dict(tokens=outs, peak=max(used), mean=sum(used) / len(used), steps=len(used),
                preemptions=int(eng.metrics.preemptions._value.get()), window_blocks=eng.window_blocks)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--long-requests", type=int, default=4)
    ap.add_argument("--long-prompt", type=int, default=1536)
    ap.add_argument("--long-new", type=int, default=512)
    ap.add_argument("--long-pool", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    longest = max(args.prompt + args.new, args.long_prompt + args.long_new)
    cfg = preset("tiny", attn="gqa", n_kv_heads=2, head_dim=32, window_size=args.window, mtp_depth=0,
                 sliding_layers=tuple(range(preset("tiny").n_layers)), max_seq_len=longest)
    model = Transformer(cfg).eval()
    g = torch.Generator().manual_seed(1)
    draw = lambda n: torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist()  # noqa: E731

    prompts = [draw(args.prompt) for _ in range(args.requests)]
    roomy = args.requests * -(-(args.prompt + args.new) // args.block_size)
    peer, flyer = (serve(model, args, roomy, prompts, args.new, keep) for keep in (True, False))
    print(json.dumps(dict(case="batch", requests=args.requests, prompt=args.prompt, new=args.new, window=args.window,
                          pool_blocks=roomy, flyer_peak=flyer["peak"], peer_peak=peer["peak"],
                          flyer_mean=round(flyer["mean"], 1), peer_mean=round(peer["mean"], 1),
                          ratio_peak=round(peer["peak"] / flyer["peak"], 2),
                          ratio_mean=round(peer["mean"] / flyer["mean"], 2), steps=[flyer["steps"], peer["steps"]],
                          preemptions=[flyer["preemptions"], peer["preemptions"]],
                          tokens_equal=flyer["tokens"] == peer["tokens"])), flush=True)

    rows = [draw(args.long_prompt) for _ in range(args.long_requests)]
    try:
        serve(model, args, args.long_pool, rows, args.long_new, keep=True)
        refused = None
    except FieldError as e:
        refused = str(e)
    long = serve(model, args, args.long_pool, rows, args.long_new, keep=False)
    alone = generate(model, [rows[0]], GenerationConfig(max_new_tokens=args.long_new, cache_dtype=torch.float32))
    print(json.dumps(dict(case="long_rows", requests=args.long_requests, row=args.long_prompt + args.long_new,
                          row_blocks=-(-(args.long_prompt + args.long_new) // args.block_size),
                          pool_blocks=args.long_pool, window_blocks=long["window_blocks"], peer_refuses=refused,
                          flyer_peak=long["peak"], steps=long["steps"], preemptions=long["preemptions"],
                          first_equals_generate=long["tokens"][0] == alone.tokens[0])), flush=True)


if __name__ == "__main__":
    main()
