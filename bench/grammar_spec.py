"""Structured outputs with and without MTP speculation at concurrency 1: tokens per second of json_schema requests
through the engine (``flyer.serve.engine``, byte tokens, random weights of a preset), speculation's ratio over the
same requests without it in the same run. A random model's drafts are kept where the schema forces the text (key
names, enum tails, punctuation): the figure is for that share of a JSON output, not for a trained model's.

    .venv/bin/python bench/grammar_spec.py [--preset tiny] [--requests 4] [--draft-tokens 1 2]

Prints one JSON object: per variant tok/s, drafts proposed and kept, and the ratio to no speculation."""

from __future__ import annotations

import argparse
import json
import time

import torch

from flyer.config import preset
from flyer.infer.cli import ByteTokenizer
from flyer.model.transformer import Transformer
from flyer.serve.engine import Engine, EngineConfig, SamplingOptions
from flyer.serve.grammar import json_grammar

SCHEMA = {"type": "object", "properties": {
    "customer_name": {"type": "string", "maxLength": 12}, "priority_level": {"enum": ["urgent", "normal", "low"]},
    "requires_follow_up": {"type": "boolean"}, "estimated_minutes": {"type": "integer", "minimum": 0, "maximum": 999},
    "assigned_department": {"enum": ["billing", "technical_support", "sales"]}},
    "required": ["customer_name", "priority_level", "requires_follow_up", "estimated_minutes",
                 "assigned_department"], "additionalProperties": False}


def run(model, grammar: str | None, prompts: list[list[int]], **spec) -> dict:
    """The prompts one after another (c1) through a fresh engine; tok/s over the whole run (a warm-up first).
    ``grammar`` None: plain requests of 150 tokens (speculation's ratio without a grammar, for comparison)."""
    eng = Engine(model, EngineConfig(kv_cache_bytes=64 << 20, block_size=16, cache_dtype=torch.float32, **spec),
                 tokenizer=ByteTokenizer())
    tokens = 0
    for i, p in enumerate([prompts[0], *prompts]):
        if i == 1:
            t0, tokens, base = time.perf_counter(), 0, (eng.drafted, eng.accepted)
        out = []
        eng.submit(p, SamplingOptions(max_tokens=200 if grammar else 150, grammar=grammar), out.append)
        eng.run_until_idle()
        assert out[-1].finish_reason == ("stop" if grammar else "length"), out[-1]
        tokens += sum(e.token is not None for e in out)
    dt = time.perf_counter() - t0
    return dict(tok_s=round(tokens / dt, 1), tokens=tokens, drafted=eng.drafted - base[0],
                accepted=eng.accepted - base[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--draft-tokens", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plain", action="store_true", help="requests without a grammar (the same ratio without one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Transformer(preset(args.preset)).eval()  # the presets have an MTP module (mtp_depth 1)
    grammar = None if args.plain else json_grammar(SCHEMA)
    prompts = [list(f"ticket {i}: summarise as JSON".encode()) for i in range(args.requests)]
    res = {"preset": args.preset, "threads": args.threads, "requests": args.requests, "grammar": not args.plain,
           "off": run(model, grammar, prompts)}
    for k in args.draft_tokens:
        r = run(model, grammar, prompts, speculative="mtp", draft_tokens=k)
        res[f"mtp_k{k}"] = {**r, "ratio": round(r["tok_s"] / res["off"]["tok_s"], 3)}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
