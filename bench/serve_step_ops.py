"""Host-side ops of the serving engine's steps, as a GPU runs them: prints one JSON object.

On a GPU a small model's step is mostly host dispatch, one per top-level ATen op (``_serve_engine.step_ops``), so
their count says how much of a GPU step the host takes. Counted here on the CPU with flyer's CPU kernels off (the
eager code a GPU runs), with the routed experts as each device resolves them: ``fused`` (the CPU's: a GEMM per live
expert and projection) and ``grouped_mm`` (CUDA's: ``torch._grouped_mm``, in FP32 for an FP32 model without
gradients). Steps: ``decode`` (B requests, one token each) and ``mixed`` (the same B plus a long prompt's first chunk),
run eagerly: what a GPU runs when its CUDA graphs are off, or where a step passes their budgets
(``flyer.serve.graphs``). ``graphed``: the ops the host still issues for such a step replayed from a CUDA graph
(filling the graph's inputs, the logits of the rows that need them, sampling), besides the one launch of the graph:
counted with the fixed-shape step left out.

    python bench/serve_step_ops.py [--preset small] [--batch 16] [--prompt 600]
"""

from __future__ import annotations

import argparse
import json
import random

import torch
from _serve_engine import step_ops  # bench/, beside this script

from flyer import kernels
from flyer.config import preset
from flyer.model.experts import Experts
from flyer.model.transformer import Transformer
from flyer.serve.engine import Engine, EngineConfig, SamplingOptions


def _decoding(model: Transformer, batch: int, cuda_graphs: bool) -> tuple[Engine, random.Random]:
    """An engine with ``batch`` requests decoding at 88 tokens of context, and the generator of its prompts."""
    rng = random.Random(1)
    eng = Engine(model, EngineConfig(kv_cache_bytes=1 << 28, max_batch_size=batch + 1, cache_dtype=torch.float32,
                                     cuda_graphs=cuda_graphs))
    reqs = [eng.submit([rng.randrange(100) for _ in range(88)], SamplingOptions(max_tokens=8), lambda e: None)
            for _ in range(batch)]
    while any(r.generated == 0 for r in reqs):
        eng.step()
    return eng, rng


def _two_steps(eng: Engine, rng: random.Random, prompt: int) -> tuple[int, int]:
    """Ops of a decode-only step, then of one that also takes a ``prompt``-token prompt's first chunk."""
    decode = step_ops(eng)
    eng.submit([rng.randrange(100) for _ in range(prompt)], SamplingOptions(max_tokens=2), lambda e: None)
    return decode, step_ops(eng)


def counts(model: Transformer, impl: str, batch: int, prompt: int) -> dict[str, int]:
    """Ops of one decode-only step of ``batch`` requests at 88 tokens of context, then of one step that also takes
    a ``prompt``-token prompt's first chunk, the routed experts run as ``impl``."""
    for m in model.modules():
        if isinstance(m, Experts):
            m.impl = impl  # as the weights' device would resolve 'auto'
    eng, rng = _decoding(model, batch, cuda_graphs=False)
    with kernels.disabled():
        decode, mixed = _two_steps(eng, rng, prompt)
    return {f"decode_ops_{impl}": decode, f"mixed_ops_{impl}": mixed}


def graphed_counts(model: Transformer, batch: int, prompt: int) -> dict[str, int]:
    """``counts``' steps in fixed shapes, the step itself replaced by what its graph's replay leaves (the static
    hidden states): the host's ops around the replay."""
    eng, rng = _decoding(model, batch, cuda_graphs=True)
    static = eng.graphs.static
    static.run = lambda shape: static.hidden[:shape[0]]
    before = eng.metrics.fixed_steps.labels("eager")._value.get()
    decode, mixed = _two_steps(eng, rng, prompt)
    assert eng.metrics.fixed_steps.labels("eager")._value.get() == before + 2  # both steps took the fixed path
    return {"decode_ops_graphed": decode, "mixed_ops_graphed": mixed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt", type=int, default=600)
    args = p.parse_args()
    torch.manual_seed(0)
    model = Transformer(preset(args.preset)).eval()
    out = {"preset": args.preset, "batch": args.batch, "prompt": args.prompt}
    for impl in ("fused", "grouped_mm"):
        out.update(counts(model, impl, args.batch, args.prompt))
    out.update(graphed_counts(model, args.batch, args.prompt))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
