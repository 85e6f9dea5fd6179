"""``bench/serve.py``'s engine alone, in its process (flyer serve's weights, threads and engine settings, no HTTP):
the clients' requests replayed in the same closed loop, decode-only steps, and under ``--speculative`` the same
requests without speculation, without prefix sharing and (``--speculative-max-batch``) without the batch cutoff,
whose greedy tokens must equal the speculative run's."""

from __future__ import annotations

import contextlib
import functools
import random
import statistics
import time

import numpy as np
import torch

from decode import gathered_attention  # bench/decode.py, beside this module
from _serve_capacity import TOKEN_RANGE  # beside it too

from flyer import kernels
from flyer.config import parse_size
from flyer.model.transformer import Transformer
from flyer.serve.engine import Engine, EngineConfig, SamplingOptions

MAX_BATCH = 64  # flyer serve --max-batch-size, and the in-process engine's (``engine_replay``)


def step_ops(eng: Engine) -> int:
    """Top-level ATen ops (not called from within another) of one ``eng.step()``, counted with torch.profiler:
    each a host-side dispatch, of which a small model's step on a GPU mostly consists."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        eng.step()
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def _decoding(model: Transformer, batch: int, context: int, rng: random.Random, opts: SamplingOptions,
              **settings) -> tuple[Engine, list]:
    """An engine (``settings``; an FP32 cache of 1 GiB) with ``batch`` requests of ``context`` random tokens, each
    past its prefill, and those requests."""
    eng = Engine(model, EngineConfig(**{"kv_cache_bytes": 1 << 30, "cache_dtype": torch.float32, **settings}))
    reqs = [eng.submit([rng.randrange(TOKEN_RANGE) for _ in range(context)], opts, lambda e: None)
            for _ in range(batch)]
    while any(r.generated == 0 for r in reqs):  # every prompt prefilled
        eng.step()
    return eng, reqs


def _interleaved(eng: Engine, paths: dict, steps: int, before=lambda: None) -> dict[str, float]:
    """Median ms of ``steps`` steps of ``eng`` under each of ``paths`` (name: context manager), the paths interleaved
    step by step (``before`` each step: what it is to take)."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(steps):
        for name, path in paths.items():
            before()
            with path():
                t0 = time.perf_counter()
                eng.step()
                times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def _with_eager(eng: Engine, paths: dict) -> dict:
    """``paths`` and, where ``eng`` steps in fixed shapes (on a GPU: replayed from CUDA graphs), its eager step
    beside them (``_eager``)."""
    return {**paths, "_eager": functools.partial(without_graphs, eng)} if eng.graphs is not None else paths


def decode_steps(model: Transformer, batches: tuple[int, ...], context: int, steps: int = 30) -> dict[str, float]:
    """ms per decode-only step of the engine alone (no HTTP, no prefill in the step), B requests at ``context``
    tokens: the batching gain before prefill steps and HTTP take their share (median of ``steps`` steps). At the
    largest B of MLA also with the paged cache gathered per layer instead of read in place
    (``kernels.mla_decode``), the two interleaved. ``decode_ops_b{B}``: top-level ATen ops of one more such step
    (``step_ops``), and where the CPU kernels run, ``decode_ops_b{B}_eager`` without them: the eager code a GPU
    runs. On a GPU, where steps replay CUDA graphs (``flyer.serve.graphs``; ``cuda_graphs`` says how many were
    captured, or why none), the eager steps run beside them, interleaved: ``decode_step_ms_b{B}_eager`` and
    ``decode_ops_b{B}_eager``."""
    rng, out = random.Random(1), {}
    for B in batches:
        # prefill's token, up to three timed paths, two counted steps
        eng, _ = _decoding(model, B, context, rng, SamplingOptions(max_tokens=4 * steps + 3), max_batch_size=B)
        paths = {"": contextlib.nullcontext}
        mla_cpu = model.cfg.attn == "mla" and model.embed.weight.is_cpu
        if B == max(batches) and kernels.cpu_ops() is not None and mla_cpu:
            paths["_gathered"] = gathered_attention
        for name, ms in _interleaved(eng, _with_eager(eng, paths), steps).items():
            out[f"decode_step_ms_b{B}{name}"] = ms
        out[f"decode_ops_b{B}"] = step_ops(eng)
        if eng.graphs is not None:
            with without_graphs(eng):
                out[f"decode_ops_b{B}_eager"] = step_ops(eng)
            out["cuda_graphs"] = f"off: {eng.graphs.failed}" if eng.graphs.failed else \
                f"{len(eng.graphs.graphs)} captured" if eng.graphs.capture else "fixed shapes, eager"
        elif kernels.cpu_ops() is not None and model.embed.weight.is_cpu:
            with kernels.disabled():
                out[f"decode_ops_b{B}_eager"] = step_ops(eng)
    return out


def mixed_steps(model: Transformer, batch: int, context: int, chunk: int, steps: int = 10) -> dict[str, float]:
    """ms per step of the engine alone that decodes ``batch`` requests at ``context`` tokens and prefills a fresh
    ``chunk``-token prompt whole (whose first token ends it), as the steps that carry prompt tokens do
    (``engine_prefill_step_share_c*``: their share of ``engine_replay``'s time). On a GPU replayed from CUDA graphs
    as the decode steps are (``mixed_step_ms_b{B}``), the eager steps beside them, interleaved (``_eager``); median
    of ``steps`` steps each."""
    rng = random.Random(2)
    eng, reqs = _decoding(model, batch, context, rng, SamplingOptions(max_tokens=model.cfg.max_seq_len - context),
                          max_batch_size=batch + 1, prefill_chunk=chunk)  # (none of them ends within the timed steps)
    paths = _with_eager(eng, {"": contextlib.nullcontext})
    before = [r.generated for r in reqs]
    ms = _interleaved(eng, paths, steps, lambda: eng.submit([rng.randrange(TOKEN_RANGE) for _ in range(chunk)],
                                                            SamplingOptions(max_tokens=1), lambda e: None))
    assert [r.generated for r in reqs] == [n + len(paths) * steps for n in before]  # each step decoded the batch
    return {f"mixed_step_ms_b{batch}{name}": v for name, v in ms.items()}


@contextlib.contextmanager
def without_graphs(eng: Engine):
    """``eng``'s steps eagerly, in the packed forward, not in fixed shapes (``flyer.serve.graphs``)."""
    graphs, eng.graphs = eng.graphs, None
    try:
        yield
    finally:
        eng.graphs = graphs


def engine_replay(model: Transformer, reqs, concurrency: int, args, **override) -> tuple[dict, list[list[int]]]:
    """The HTTP run's requests ``reqs`` ((prompt ids, new tokens) each) on the engine alone with flyer serve's engine
    settings from ``args`` (``override``: ``EngineConfig`` fields in their place, e.g. ``speculative=None``):
    ``concurrency`` clients in a closed loop, each submitting its next request when its last one ends, as the HTTP
    clients do. Returns output tokens/s without HTTP, SSE and the clients' processes; its mean step (``step_ms``); the
    share of the engine's time in steps that carry prompt tokens (with the decode rows they also advance); its prefix
    hit rate (and with speculation the share of drafts kept, ``draft_acceptance``); and a least-squares fit of each
    step's time as ms_per_step + ms_per_decode_row * rows + ms_per_prompt_token * tokens, with the share of the engine's
    time the prompt tokens take by that fit (with more than one client). And each request's greedy tokens, in ``reqs``'
    order."""
    settings = dict(kv_cache_bytes=parse_size(args.kv_cache_memory, "kv_cache_memory"), max_batch_size=MAX_BATCH,
                    prefill_chunk=args.prefill_chunk, cache_dtype=torch.float32,  # flyer serve --cache-dtype fp32
                    speculative=args.speculative, draft_tokens=args.draft_tokens, prefix_sharing=args.prefix_sharing,
                    speculative_max_batch=args.speculative_max_batch)
    eng = Engine(model, EngineConfig(**{**settings, **override}))
    pending, tokens = iter(enumerate(reqs)), [0]
    outputs: list[list[int]] = [[] for _ in reqs]

    def submit() -> None:
        i, nxt = next(pending, (None, None))
        if nxt is not None:
            eng.submit(nxt[0], SamplingOptions(max_tokens=nxt[1]), lambda e: on_event(i, e))

    def on_event(i: int, e) -> None:
        if e.token is not None:
            tokens[0] += 1
            outputs[i].append(e.token)
        if e.finish_reason is not None:
            submit()

    for _ in range(concurrency):
        submit()
    steps = []  # (decode rows, prompt tokens, seconds) per step
    while eng.busy:
        t0 = time.perf_counter()
        eng.admit()  # the step's rows (step admits again: nothing new)
        before = [(r, r.n_cached, len(r.tokens) - r.n_cached == 1) for r in eng.running]
        eng.step()
        dt = time.perf_counter() - t0
        decode = sum(1 for _, _, dec in before if dec)
        prompt = sum(max(r.n_cached - n, 0) for r, n, dec in before if not dec)
        steps.append((decode, prompt, dt))
    a = np.array(steps)
    total = a[:, 2].sum()
    out = {"tokens_per_s": tokens[0] / total, "prefill_step_share": a[a[:, 1] > 0, 2].sum() / total,
           "prefix_hit_rate": eng.prefix_hit_rate, "step_ms": 1e3 * total / len(a)}
    if eng.spec:  # and the steps the batch cutoff ran without drafts (--speculative-max-batch)
        out["draft_acceptance"] = eng.accepted / max(eng.drafted, 1)
        out["spec_off_steps"] = eng.speculator.off_steps
    if concurrency > 1:  # one client's step decodes its row or prefills, never both: no fit to make
        fit = np.linalg.lstsq(np.c_[np.ones(len(a)), a[:, :2]], a[:, 2], rcond=None)[0]
        out.update(ms_per_step=1e3 * fit[0], ms_per_decode_row=1e3 * fit[1], ms_per_prompt_token=1e3 * fit[2],
                   prompt_share=fit[2] * a[:, 1].sum() / total)
    return out, outputs


def speculation_variants(model: Transformer, reqs, concurrency: int, args, stats: dict[str, float],
                         outputs: list[list[int]]) -> dict[str, float]:
    """Under ``--speculative``: ``reqs`` replayed again on the engine alone (``engine_replay``) without speculation
    (``no_spec``), under ``--speculative-max-batch`` with speculation at every batch size too (``no_cutoff``), and
    where sharing is on with speculation and ``--no-prefix-sharing`` (``no_sharing``), after the speculative run
    that gave ``stats`` and ``outputs``. Each variant's tokens/s and prefix hit rate, the speculative run's speedup
    over each, and ``variants_agree``: of ``variants_requests``, the requests whose greedy tokens are the same in
    every variant (speculation and sharing change how the tokens are computed, never which)."""
    variants = {"no_spec": dict(speculative=None, draft_tokens=1, speculative_max_batch=None)}
    if args.speculative_max_batch:
        variants["no_cutoff"] = dict(speculative_max_batch=None)
    if args.prefix_sharing:
        variants["no_sharing"] = dict(prefix_sharing=False)
    out: dict[str, float] = {}
    same = [True] * len(reqs)
    for name, override in variants.items():
        got, tokens = engine_replay(model, reqs, concurrency, args, **override)
        out[f"tokens_per_s_{name}"] = got["tokens_per_s"]
        out[f"prefix_hit_rate_{name}"] = got["prefix_hit_rate"]
        out[f"speedup_vs_{name}"] = stats["tokens_per_s"] / got["tokens_per_s"]
        same = [s and a == b for s, a, b in zip(same, tokens, outputs)]
    out.update(variants_agree=sum(same), variants_requests=len(reqs))
    return out
