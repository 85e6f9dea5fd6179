"""Each fused CPU kernel against the eager PyTorch code it replaces (both through the ``flyer.kernels``
facade, with the kernels off and on), same run.

Prints one JSON object: per kernel, the eager and kernel times (ms, median of interleaved rounds)
and ``speedup`` = eager / kernel, on the small preset's shapes (2048 tokens, dim 384, 32 experts
of width 256 with top-4 routing padded to 64 rows, a 512 x 8192 logits chunk, a 2048 x 1152 FP8
activation in 1x128 tiles, the argmax of a 16-request decode step's 16 x 8192 logits; the FP32
grouped GEMM of the 32 experts' up-projections at 1 to 24 rows each, against one ``torch.mm`` per
expert; ``mla_decode_*``: one layer's absorbed MLA decode attention over a paged cache, read in
place against gathered, at B rows of S slots; ``grouped_mm_bf16_*``: the same up-projections held
in BF16 at 2 to 24 rows each, against ``torch.mm`` on each expert's weight
widened to FP32, what the eager path runs). Then the
grouped GEMM streaming 8 layers' experts from memory: on one and two expert threads
(``grouped_mm_expert_threads``), and with the weights held in BF16 and in FP8 (E4M3 codes with
128x128 block scales, DeepSeek's checkpoint format) against FP32 (``grouped_mm_held``). Last, a
prefill chunk's held-weight GEMM on one and two expert threads against ``torch.mm`` on one and two
torch threads (``linear_held_prefill``).

    python bench/cpu_kernels.py [--rounds 7] [--threads N] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from types import SimpleNamespace

import torch

from flyer import kernels
from flyer.config import preset
from flyer.fp8.quant import dequantize, quantize_blocks_batched, quantize_tiles
from flyer.infer.attention import Rows, causal_slot_mask, mla_absorbed_cached
from flyer.model.norm import rms_norm
from flyer.runtime import tune_malloc
from flyer.serve.paged import make_paged_cache


def _time(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def cases() -> dict:
    """name: a facade call on the small preset's shapes, timed with the kernels off and on."""
    g = torch.Generator().manual_seed(0)
    bf = torch.bfloat16
    T, K, D, Fd, n_pad, V = 2048, 4, 384, 256, 9280, 8192
    logits = (3 * torch.randn(512, V, generator=g)).to(bf)
    tgt = torch.randint(0, V, (512,), generator=g)
    logp_t = torch.empty(512, 1)
    step_logits = torch.randn(16, V, generator=g)  # a 16-request decode step's, greedy
    h13 = torch.randn(n_pad, 2 * Fd, generator=g).to(bf)
    da = torch.randn(n_pad, Fd, generator=g).to(bf)
    src = torch.full((n_pad,), T)
    src[torch.randperm(n_pad, generator=g)[:T * K]] = torch.arange(T).repeat_interleave(K)
    y = torch.randn(n_pad, D, generator=g).to(bf)
    w = torch.rand(n_pad, generator=g)
    gT = torch.randn(T, D, generator=g)
    index = kernels.token_index(src, T, y, w)  # each timing picks the path the facade would
    with kernels.disabled():
        eager_index = kernels.token_index(src, T, y, w)
    x = torch.randn(T, D, generator=g, requires_grad=True)
    nw = torch.ones(D, requires_grad=True)
    gn = torch.randn(T, D, generator=g)

    def norm_fwd_bwd():
        out = rms_norm(x, nw, 1e-6)
        return torch.autograd.grad(out, (x, nw), gn)

    q = quantize_tiles(torch.randn(T, 1152, generator=g))  # an FP8 activation: 2048 x 1152 in 1x128 tiles

    def indexed(fn):
        return lambda: fn(eager_index if kernels.cpu_ops() is None else index)

    w13 = torch.randn(32, 2 * Fd, D, generator=g)  # the experts' up-projections, FP32 (serving)
    w13_bf16 = w13.bfloat16()
    grouped = {}
    for r in (1, 4, 8, 16, 24):  # rows per expert: decode steps of 8 to 192 tokens; past FEW_ROWS both are torch.mm
        xr = torch.randn(32 * r, D, generator=g)
        grouped[f"grouped_mm_{r}_rows"] = lambda xr=xr, r=r: kernels.grouped_mm(xr, [r] * 32, w13)
    for r in (2, 6, 12, 24):  # held in BF16 (flyer serve's default), against torch.mm on each expert widened
        xr = torch.randn(32 * r, D, generator=g)
        grouped[f"grouped_mm_bf16_{r}_rows"] = lambda xr=xr, r=r: kernels.grouped_mm(xr, [r] * 32, w13_bf16)

    mla = {f"mla_decode_{name}_b{B}_s{S}": _mla_decode_case(name, B, S, g)
           for name, B, S in (("small", 1, 128), ("small", 16, 128), ("small", 16, 1024), ("small", 16, 4096),
                              ("dsv3", 4, 1024))}
    return {
        **grouped,
        **mla,
        "xent_chunk": lambda: kernels.xent_chunk(logits, tgt, True, logp_t),
        "swiglu": lambda: kernels.swiglu(h13),
        "swiglu_backward": lambda: kernels.swiglu_backward(da, h13),
        "combine": indexed(lambda i: kernels.combine(y, w, i)),
        "combine_backward": indexed(lambda i: kernels.combine_backward(gT, y, w, i, True)),
        "segment_sum": indexed(lambda i: kernels.segment_sum(y, i)),
        "rms_norm_fwd_bwd": norm_fwd_bwd,
        "fp8_dequantize": lambda: dequantize(q.data, q.scale),
        "argmax_16_rows": lambda: kernels.argmax(step_logits),
    }


def _mla_decode_case(name: str, B: int, S: int, g: torch.Generator):
    """One layer's absorbed MLA decode attention (one new token per row, ``name`` preset's heads and
    latent dims) over S cached slots per row in a paged FP32 cache of shuffled 16-slot blocks: the
    kernel reads the blocks in place, the eager path gathers them, then two matmuls and a softmax."""
    cfg = preset(name)
    H, nope, v, C, R = cfg.n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    attn = SimpleNamespace(n_heads=H, qk_nope_head_dim=nope, v_head_dim=v, kv_lora_rank=C, qk_rope_head_dim=R,
                           softmax_scale=(nope + R) ** -0.5,
                           wkv_b=SimpleNamespace(weight=torch.randn(H * (nope + v), C, generator=g) * C**-0.5))
    nb = -(-S // 16)
    cache = make_paged_cache(cfg, 1, B * nb + 1, 16, torch.float32)
    cache.pool.packed.normal_(generator=g)
    cache.tables = torch.randperm(B * nb, generator=g).add(1).view(B, nb)
    pos = torch.full((B, 1), S - 1)
    rows = Rows(pos, None, None, S, causal_slot_mask(pos, S))
    q_nope, q_rope = torch.randn(B, 1, H, nope, generator=g), torch.randn(B, 1, H, R, generator=g)
    return lambda: mla_absorbed_cached(attn, q_nope, q_rope, cache, 0, rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", nargs="+", default=None,
                    help="only the entries whose names contain one of these (e.g. grouped_mm)")
    args = ap.parse_args()
    wanted = (lambda name: any(o in name for o in args.only)) if args.only else (lambda name: True)
    tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    if kernels.cpu_ops() is None:
        raise SystemExit("bench/cpu_kernels.py: flyer's CPU kernels are not built here (no C++ compiler?)")
    # mla_decode's tile products run on torch's BLAS where it exports one, else on a plain loop;
    # where that BLAS runs narrower vectors than the kernel, held weights' GEMMs and mla_decode's
    # tile products stay on the kernel at any row count (kernels.blas_narrower)
    out = {"threads": torch.get_num_threads(), "mla_decode_blas": kernels.cpu_ops().has_blas(),
           "blas_narrower": kernels.blas_narrower(), "kernels": {}}
    for name, call in cases().items():
        if not wanted(name):
            continue
        times = {"eager": [], "kernel": []}
        for _ in range(args.rounds):  # interleaved: drift on a shared host hits both alike
            with kernels.disabled():
                times["eager"].append(_time(call, args.reps))
            times["kernel"].append(_time(call, args.reps))
        e, k = statistics.median(times["eager"]), statistics.median(times["kernel"])
        out["kernels"][name] = {"eager_ms": round(e, 3), "kernel_ms": round(k, 3), "speedup": round(e / k, 2)}
    layers = [torch.randn(32, 512, 384, generator=torch.Generator().manual_seed(1)) for _ in range(8)]
    if wanted("grouped_mm_expert_threads"):
        out["grouped_mm_expert_threads"] = _expert_threads(layers, args.rounds)
    if wanted("grouped_mm_held"):
        out["grouped_mm_held"] = _held(layers, args.rounds)
    if wanted("linear_held_prefill"):
        out["linear_held_prefill"] = _prefill_gemm(args.rounds, args.reps)
    print(json.dumps(out))


def _streamed(ws: list, rows: int, threads: int, rounds: int) -> float:
    """ms per layer of the experts' up-projection kernel at ``rows`` rows per expert, over the
    layers' weights ``ws`` in turn (they stream from memory, as in a decode step); a weight is a
    tensor or FP8 (codes, block scales)."""
    x = torch.randn(32 * rows, 384, generator=torch.Generator().manual_seed(2))
    kernels.set_expert_threads(threads)
    ws = [w if isinstance(w, tuple) else (w, None) for w in ws]
    try:
        times = [_time(lambda: [kernels.grouped_mm(x, [rows] * 32, w, scale=s) for w, s in ws], 2)
                 for _ in range(rounds)]
    finally:
        kernels.set_expert_threads(1)
    return statistics.median(times) / len(ws)


def _expert_threads(ws: list[torch.Tensor], rounds: int) -> dict:
    """GB/s of the experts' up-projection kernel at 4 rows per expert over 8 layers of FP32 weights
    ``ws`` (200 MB), on torch's threads alone and split over two (``kernels.set_expert_threads(2)``,
    what ``flyer serve`` does where torch runs one thread)."""
    res = {f"expert_threads_{n}_gb_s": round(ws[0].nbytes / _streamed(ws, 4, n, rounds) / 1e6, 1) for n in (1, 2)}
    return {"torch_threads": torch.get_num_threads(), **res}


def _held(fp32: list[torch.Tensor], rounds: int) -> dict:
    """The same streamed up-projections with the weights held in BF16 and in FP8 (``flyer serve
    --weight-dtype bf16 | fp8``) against FP32, at 1 and 4 rows per expert on two expert threads: ms
    per layer and the speedups over FP32 (the bytes halve and quarter: 2 and 4 are the memory-bound
    ceilings)."""
    held = {"fp32": fp32, "bf16": [w.bfloat16() for w in fp32],
            "fp8": [(c.contiguous(), s) for c, s in map(quantize_blocks_batched, fp32)]}
    res = {}
    for rows in (1, 4):
        ms = {}
        for _ in range(rounds):  # interleaved, as the kernels above
            for name, ws in held.items():
                ms.setdefault(name, []).append(_streamed(ws, rows, 2, 1))
        med = {name: statistics.median(t) for name, t in ms.items()}
        res[f"{rows}_rows"] = {**{f"{name}_ms": round(t, 3) for name, t in med.items()},
                               "speedup_bf16": round(med["fp32"] / med["bf16"], 2),
                               "speedup_fp8": round(med["fp32"] / med["fp8"], 2)}
    return res


def _prefill_gemm(rounds: int, reps: int) -> dict:
    """A prefill chunk's dense GEMM as ``flyer serve`` runs it: 256 rows times a 1152 x 384 weight held
    in BF16 (``kernels.linear_held``: blocks of the weight widened, BLAS GEMMs on them) with torch on one
    thread and the work on one and two expert threads, against the peer ``torch.mm`` on the weight in
    FP32 on one and two torch threads. ms, median of interleaved rounds."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(256, 384, generator=g), torch.randn(1152, 384, generator=g).bfloat16()
    wide = w.float()
    threads = torch.get_num_threads()

    def held(n):
        torch.set_num_threads(1)
        kernels.set_expert_threads(n)
        return _time(lambda: kernels.linear_held(x, w), reps)

    def peer(n):
        torch.set_num_threads(n)
        kernels.set_expert_threads(1)
        return _time(lambda: torch.mm(x, wide.t()), reps)

    ms: dict = {}
    try:
        for _ in range(rounds):
            for name, f, n in (("held_1", held, 1), ("held_2", held, 2), ("torch_mm_1", peer, 1),
                               ("torch_mm_2", peer, 2)):
                ms.setdefault(name, []).append(f(n))
    finally:
        torch.set_num_threads(threads)
        kernels.set_expert_threads(1)
    med = {name: statistics.median(t) for name, t in ms.items()}
    return {**{f"{name}_ms": round(t, 3) for name, t in med.items()},
            "speedup_two_expert_threads": round(med["held_1"] / med["held_2"], 2),
            "held_2_vs_torch_mm_2": round(med["torch_mm_2"] / med["held_2"], 2)}


if __name__ == "__main__":
    main()
