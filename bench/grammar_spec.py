"""Structured outputs with and without MTP speculation at concurrency 1: tokens per second of json_schema requests
through the engine (``flyer.serve.engine``, byte tokens, random weights of a preset), speculation's ratio over the
same requests without it in the same run. A random model's drafts are kept where the schema forces the text (key
names, enum tails, punctuation): the figure is for that share of a JSON output, not for a trained model's.

    .venv/bin/python bench/grammar_spec.py [--preset tiny] [--requests 4] [--draft-tokens 1 2]

Prints one JSON object: per variant its best tok/s over ``--rounds`` interleaved rounds (``bench/decode.py``'s
``best_of``: robust to a loaded host), drafts proposed and kept in a round, and the ratio to no speculation."""

from __future__ import annotations

import argparse
import json
import time

import torch

from decode import best_of  # bench/decode.py: interleaved rounds, best of each

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


class SpecRun:
    """The prompts one after another (c1) through a fresh engine of one variant; ``grammar`` None: plain
    requests of 150 tokens (speculation's ratio without a grammar, for comparison)."""

    def __init__(self, model, grammar: str | None, prompts: list[list[int]], **spec):
        self.model, self.grammar, self.prompts, self.spec = model, grammar, prompts, spec
        self.last: dict = {}

    def tokens_per_s(self) -> float:
        eng = Engine(self.model, EngineConfig(kv_cache_bytes=64 << 20, block_size=16, cache_dtype=torch.float32,
                                              **self.spec), tokenizer=ByteTokenizer())
        tokens, t0 = 0, time.perf_counter()
        for p in self.prompts:
            out = []
            eng.submit(p, SamplingOptions(max_tokens=200 if self.grammar else 150, grammar=self.grammar), out.append)
            eng.run_until_idle()
            assert out[-1].finish_reason == ("stop" if self.grammar else "length"), out[-1]
            tokens += sum(e.token is not None for e in out)
        self.last = dict(tokens=tokens, drafted=eng.drafted, accepted=eng.accepted)
        return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--draft-tokens", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every variant; best of them")
    ap.add_argument("--plain", action="store_true", help="requests without a grammar (the same ratio without one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Transformer(preset(args.preset)).eval()  # the presets have an MTP module (mtp_depth 1)
    grammar = None if args.plain else json_grammar(SCHEMA)
    prompts = [list(f"ticket {i}: summarise as JSON".encode()) for i in range(args.requests)]
    runs = {"off": SpecRun(model, grammar, prompts)}
    runs.update({f"mtp_k{k}": SpecRun(model, grammar, prompts, speculative="mtp", draft_tokens=k)
                 for k in args.draft_tokens})
    best = best_of(runs, args.rounds)
    res = {"preset": args.preset, "threads": args.threads, "requests": args.requests, "grammar": not args.plain,
           "rounds": args.rounds}
    for name, run in runs.items():
        res[name] = {"tok_s": round(best[name], 1), **run.last, "ratio": round(best[name] / best["off"], 3)}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
