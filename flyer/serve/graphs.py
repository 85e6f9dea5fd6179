"""Decode steps replayed from CUDA graphs (``flyer serve`` on a GPU).

On a GPU a small model's decode step is host work: an H200 took 13.1 ms for a `small` step of one request and
13.4 ms for sixteen (docs/performance.md), the Python and kernel launches of about a thousand ATen ops, between
which the GPU idles. A CUDA graph records a step's kernels once and launches them all again with one call. It
fixes shapes and addresses, so the step a graph holds (``StaticDecode``):

- has its batch padded to a bucket (``batch_buckets``): a padding row feeds token 0 at position 0 through a block
  table of null blocks, so it writes into the null block only and attends to the one slot it wrote;
- attends over a bucket of slots (a power of two of blocks), the slots past each row's position masked as ever;
- reads nothing back to the host: the slots' bound comes from the host (``Decoder.decode_rows``), and every MoE
  routes with fixed shapes (``flyer.model.moe.fixed_shapes``);
- reads its inputs from static buffers, which the host fills with one copy a step, and leaves its outputs (hidden
  states and logits) in static buffers too, which the next step overwrites.

``DecodeGraphs`` captures a graph per (batch bucket, slot bucket) the first time a step needs it, all in one memory
pool, and replays it. The engine runs its decode-only steps there (``EngineConfig.cuda_graphs``) and every other
step (prefill chunks, drafts) eagerly. Without ``capture`` (the CPU; the tests) the same static step runs eagerly:
the tests hold its values to the eager step's, and run it on the meta device, where reading a value back fails.
"""

from __future__ import annotations

import math
import sys

import torch

from flyer.infer.decoder import Decoder
from flyer.model.experts import Experts
from flyer.model.moe import MoE, fixed_shapes
from flyer.serve.paged import NULL_BLOCK, PagedCache


def graphs_unsupported(dec: Decoder) -> str | None:
    """Why ``dec``'s model cannot decode in fixed shapes (None: it can): DeepSeek-V4's hybrid attention and DSA's
    indexer select slots by value, held or FP8 experts run flyer's CPU kernels or their own grouped GEMMs, and an
    expert-parallel MoE exchanges rows with other ranks."""
    cfg = dec.cfg
    if cfg.attn == "hybrid":
        return "DeepSeek-V4's hybrid attention selects its entries by value"
    if cfg.index_topk:
        return "DSA's indexer selects the attended slots by value"
    if cfg.attn not in ("mla", "gqa"):
        return f"attention '{cfg.attn}' has no fixed-shape step"
    for m in dec.model.modules():
        if isinstance(m, MoE) and not m.fuse_local:
            return "an MoE layer's experts are dispatched to other ranks"
        if isinstance(m, Experts) and (type(m) is not Experts or m.weight_quant is not None):
            return f"routed experts of {type(m).__name__} have no fixed-shape form"
    return None


# FLOPs a fixed-shape step may spend on dense routed experts (every expert over every row, ``Experts.routed_fixed``):
# about a third of a millisecond of an H200's FP32 rate, what a few hundred launches cost the eager step (``small``:
# 94 MFLOP a row). A bucket past it runs eagerly: a larger FP32 model (dsv2-lite: 29 GFLOP a row) is not launch-bound.
DENSE_FLOPS_BUDGET = 20e9
# slots a captured step attends over at most: past them a step's attention is bandwidth-bound work (a millisecond or
# more for a batch), no longer launch-bound, and the graphs' pool would keep its gathered latents (V3 in BF16, 64 rows
# of 8,192 slots: 604 MB) from the rest of the serving
GRAPH_MAX_SLOTS = 8192


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes a graph is captured for: 1, 2, 4, then multiples of 8, the last ``max_batch`` (a step's rows are
    padded to the next one: at most 7 rows of padding, each a few more GEMM rows)."""
    return [b for b in (1, 2, 4) if b < max_batch] + [min(b, max_batch) for b in range(8, max_batch + 8, 8)]


class StaticDecode:
    """One decode step of ``dec`` over a paged ``cache`` in fixed shapes, its inputs in static buffers for up to
    ``max_batch`` rows and ``max_blocks`` blocks a row."""

    def __init__(self, dec: Decoder, cache: PagedCache, max_batch: int, max_blocks: int):
        reason = graphs_unsupported(dec)
        if reason is not None:
            raise ValueError(f"fixed-shape decoding: {reason}")
        self.dec, self.cache = dec, cache
        self.block_size, self.max_blocks = cache.block_size, max_blocks
        self.batch_buckets = batch_buckets(max_batch)
        device, dtype = dec.model.embed.weight.device, dec.model.embed.weight.dtype
        self.dense_flops_per_row = sum(m.dense_flops_per_token(dtype) for m in dec.model.modules()
                                       if isinstance(m, Experts))
        # per row: [token, position, block ids...], filled with one copy a step
        self.inputs = torch.zeros(max_batch, 2 + max_blocks, dtype=torch.long, device=device)
        self._host = torch.zeros_like(self.inputs, device="cpu", pin_memory=device.type == "cuda")
        # the outputs, one pair for every shape: a graph copies its own into them, so that what it allocates
        # is free for the next capture in the shared pool (a V3 vocabulary's logits of 64 rows: 33 MB a graph)
        self.hidden = torch.zeros(max_batch, 1, dec.cfg.dim, dtype=dtype, device=device)
        self.logits = torch.zeros(max_batch, dec.cfg.vocab_size, device=device)

    def buckets(self, batch: int, n_slots: int) -> tuple[int, int]:
        """(rows, blocks a row) of the step for ``batch`` rows attending over ``n_slots`` slots."""
        rows = next(b for b in self.batch_buckets if b >= batch)
        blocks = min(1 << max(0, math.ceil(n_slots / self.block_size) - 1).bit_length(), self.max_blocks)
        return rows, blocks

    def fill(self, tokens: list[int], positions: list[int], tables: list[list[int]], shape: tuple[int, int]) -> None:
        """The static inputs of a step of ``shape`` (``buckets``) for these rows: each row's next token, its position
        and its blocks; the padding rows token 0 at position 0 in the null block."""
        P, W = shape
        rows = [[t, p, *blocks[:W], *[NULL_BLOCK] * (W - len(blocks[:W]))]
                for t, p, blocks in zip(tokens, positions, tables)]
        rows += [[0, 0, *[NULL_BLOCK] * W]] * (P - len(rows))  # padding rows: token 0 at position 0, null blocks
        host = self._host[:P, :2 + W]
        host.copy_(torch.tensor(rows))
        self.inputs[:P, :2 + W].copy_(host, non_blocking=True)

    @torch.inference_mode()
    def run(self, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states (P, 1, D) before the final norm and FP32 logits (P, V) of the step ``fill`` set up, in
        ``hidden[:P]`` and ``logits[:P]``."""
        P, W = shape
        inp = self.inputs[:P]
        dec = self.dec
        rows = dec.decode_rows(inp[:, 1], W * self.block_size)
        with fixed_shapes():
            h = dec.lone_layers(dec.model.embed(inp[:, :1]), rows, self.cache.view(inp[:, 2:2 + W].contiguous()))
            logits = dec.logits(h[:, 0])
        return self.hidden[:P].copy_(h), self.logits[:P].copy_(logits)


class DecodeGraphs:
    """``StaticDecode``'s steps, each (batch bucket, slot bucket) captured in a CUDA graph on first use and replayed
    after (``capture``; without it they run eagerly). A capture that fails turns graphs off for good, with one
    line on stderr: the eager step is always there."""

    def __init__(self, dec: Decoder, cache: PagedCache, max_batch: int, max_len: int, capture: bool):
        self.static = StaticDecode(dec, cache, max_batch, math.ceil(max_len / cache.block_size))
        self.capture = capture
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.failed: str | None = None

    def step(self, tokens: list[int], positions: list[int], tables: list[list[int]]
             ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Hidden states (B, 1, D) and FP32 logits (B, V) of one decode step of these B rows (each its next token,
        its position and its block table); views of the static outputs, valid until the next step. None once a
        capture has failed, or where the step's dense experts pass ``DENSE_FLOPS_BUDGET`` or its slots
        ``GRAPH_MAX_SLOTS`` (the caller runs the step eagerly)."""
        if self.failed is not None:
            return None
        B = len(tokens)
        shape = self.static.buckets(B, max(positions) + 1)
        if shape[0] * self.static.dense_flops_per_row > DENSE_FLOPS_BUDGET or \
                shape[1] * self.static.block_size > GRAPH_MAX_SLOTS:
            return None  # dense experts or attention costing more than the launches a graph saves: eagerly
        self.static.fill(tokens, positions, tables, shape)
        if not self.capture:
            h, logits = self.static.run(shape)
            return h[:B], logits[:B]
        graph = self.graphs.get(shape)
        if graph is None:
            graph = self._capture(shape)
            if graph is None:
                return None
        graph.replay()
        return self.static.hidden[:B], self.static.logits[:B]

    def _capture(self, shape: tuple[int, int]):
        """Record the step of ``shape`` on the inputs ``fill`` just set: warmed up on a side stream (which also
        computes this step: its cache writes are the replay's), then captured into the shared pool."""
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # lazy initialisations (cuBLAS handles, workspaces) before, not during, capture
                    self.static.run(shape)
            torch.cuda.current_stream().wait_stream(side)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.static.run(shape)
        except Exception as e:  # noqa: BLE001 - any capture failure leaves the eager step, which always works
            self.failed = f"{type(e).__name__}: {e}".splitlines()[0]
            print(f"flyer serve: CUDA graphs off, capturing a decode step failed ({self.failed})", file=sys.stderr)
            return None
        self.graphs[shape] = graph
        return graph
