"""Serving steps replayed from CUDA graphs (``flyer serve`` on a GPU).

On a GPU a small model's step is host work: an H200 took 13.1 ms for a `small` decode step of one request and
13.4 ms for sixteen (docs/performance.md), the Python and kernel launches of about a thousand ATen ops, between
which the GPU idles; a step that also takes a prompt's chunk issues more of them. A CUDA graph records a step's
kernels once and launches them all again with one call. It fixes shapes and addresses, so the step a graph holds
(``StaticStep``) is a list of token rows, each a token at its position attending through its request's block table
over the slots up to it:

- a decoding request is one row, and one more per MTP draft it verifies (at the positions after it); a prompt's
  chunk is a row per token, all on the prompt's table. Each layer writes every row's entry before any row reads, so
  a prompt token sees the chunk's earlier tokens (a draft its request's earlier drafts) as the packed forward's
  causal mask lets it. A row below its request's first position to write (a position recomputed in a shared block,
  ``PagedCache.view``'s ``write_from``) writes into the null block instead;
- the rows are padded to a bucket (``row_buckets``): a padding row feeds token 0 at position 0 through a table of
  null blocks, so it writes into the null block only and attends to the one slot it wrote;
- every row attends over a bucket of slots (a power of two of blocks), the slots past its position masked as ever;
- nothing is read back to the host: the slots' bound comes from the host (``Decoder.decode_rows``), and every MoE
  routes with fixed shapes (``flyer.model.moe.fixed_shapes``);
- the inputs are read from static buffers, which the host fills with two copies a step, and the hidden states are
  left in a static buffer too, which the next step overwrites; the caller takes logits of the rows it needs.

``StepGraphs`` captures a graph per (row bucket, slot bucket) the first time a step needs it, all in one memory
pool, and replays it. The engine runs its steps there (``EngineConfig.cuda_graphs``), except those past the budgets
below, which run eagerly in the packed forward; the MTP module's passes have graphs of their own (``mtp``).
Without ``capture`` (the CPU; the tests) the same static step runs eagerly: the tests hold its values to the eager
step's, and run it on the meta device, where reading a value back fails.
"""

from __future__ import annotations

import math
import sys
from typing import NamedTuple

import torch

from flyer.infer.decoder import Decoder
from flyer.model.experts import Experts
from flyer.model.moe import MoE, fixed_shapes
from flyer.serve.paged import NULL_BLOCK, PagedCache
from flyer.serve.request import Request


def graphs_unsupported(dec: Decoder) -> str | None:
    """Why ``dec``'s model cannot step in fixed shapes (None: it can): DeepSeek-V4's hybrid attention and DSA's
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


# FLOPs a fixed-shape step may spend in forms the eager step would not take: dense routed experts (every expert over
# every row, ``Experts.routed_fixed``), and attention in the absorbed form for the rows past one a request (a prompt's
# chunk: the packed forward may prefill it in fewer FLOPs). A millisecond or two of an H200's FP32 rate, a tenth of
# the host time an eager step of a launch-bound model takes: ``small``'s 94 MFLOP a row of experts and 15 kFLOP a row
# and slot let a decode batch and a 256-token chunk fit. A step past it runs eagerly: a larger model is not
# launch-bound (dsv2-lite's FP32 experts: 29 GFLOP a row; its chunk of 256 at 2,048 slots: 490 GFLOP of attention).
FLOPS_BUDGET = 64e9
# slots a row of a captured step attends over at most: past them its attention is bandwidth-bound work (a millisecond
# or more for a batch), no longer launch-bound
GRAPH_MAX_SLOTS = 8192
# (row, slot) pairs a captured step attends over at most: each layer gathers their latents, which the graphs' pool
# keeps from the rest of the serving (V3 in BF16, 64 rows of 8,192 slots: 604 MB)
GRAPH_MAX_ROW_SLOTS = 64 * GRAPH_MAX_SLOTS


def attention_flops_per_slot(cfg, n_layers: int) -> int:
    """FLOPs of one row attending to one slot in a fixed-shape step of ``n_layers`` layers: MLA absorbed (scores over
    the latent and the rope key, then the latents weighted), GQA per head (scores over the key, then the value)."""
    per_head = 2 * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim) if cfg.attn == "mla" else 2 * 2 * cfg.head_dim
    return n_layers * cfg.n_heads * per_head


def row_buckets(max_rows: int) -> list[int]:
    """Row counts a graph is captured for: 1, 2, 4, multiples of 8 up to 64, then of 32, the last ``max_rows`` (a
    step's rows are padded to the next one: at most 7 rows of padding in a decode batch, 31 beside a prompt's chunk,
    each a few more GEMM rows)."""
    sizes = [1, 2, 4, *range(8, 65, 8), *range(96, max_rows, 32)]
    return [b for b in sizes if b < max_rows] + [max_rows]


class FixedForward(NamedTuple):
    """``StepGraphs.forward``'s results, as the engine's packed forward gives them: the plain rows' hidden states
    (B, 1, D; a view of the static output, read within the step), each drafted group's (B_g, k + 1, D; copies, which
    the speculator keeps), the logits (plain rows, then drafted rows, then each prompt this step ends; None: none),
    the prompts' hidden states (n, T, D; None unless asked for) and the prompts it ends (indices into the step's
    prefilling requests)."""

    plain: torch.Tensor | None
    drafts: list[torch.Tensor]
    logits: torch.Tensor | None
    prompts: torch.Tensor | None
    ending: list[int]


def token_rows(decoding: list[tuple[Request, list[int]]], prefilling: list[Request], lens: list[int]
               ) -> tuple[list[tuple[int, int, int, int]], list[list[int]], list[int]]:
    """A step's rows (``StaticStep.fill``; tables: ``decoding``'s then ``prefilling``'s): each decoding request's
    pending token and the MTP drafts it verifies (``decoding``: (request, drafts)), at its next positions; then the
    last token of each prompt whose chunk (``lens[i]`` tokens of ``prefilling[i]`` from its ``n_cached``) ends it;
    then every other prompt token: the rows that need logits first, in the engine's order. Each row writes from its
    request's ``n_shared`` on (positions recomputed in shared blocks are not written). Also the row of each prompt
    token, and the ending prompts (indices into ``prefilling``)."""
    ending = [i for i, (r, n) in enumerate(zip(prefilling, lens)) if r.n_cached + n == len(r.tokens)]
    B = len(decoding)
    rows = [(t, r.n_cached + k, j, r.n_shared) for j, (r, drafts) in enumerate(decoding)
            for k, t in enumerate([r.tokens[-1], *drafts])]
    rows += [(prefilling[i].tokens[-1], len(prefilling[i].tokens) - 1, B + i, prefilling[i].n_shared) for i in ending]
    at, first_ending = [], len(rows) - len(ending)
    for i, (r, n) in enumerate(zip(prefilling, lens)):
        last = [first_ending + ending.index(i)] if i in ending else []
        at.append([*range(len(rows), len(rows) + n - len(last)), *last])
        rows += [(r.tokens[p], p, B + i, r.n_shared) for p in range(r.n_cached, r.n_cached + n - len(last))]
    return rows, at, ending


class StaticStep:
    """One step of ``dec`` over a paged ``cache`` in fixed shapes, its inputs in static buffers for up to
    ``max_rows`` token rows of up to ``max_tables`` requests, ``max_blocks`` blocks a table. ``mtp``: a pass of the
    MTP module (``Decoder.mtp_layer``: a row's token is the next one, its hidden state an input too, and position p
    sits in slot p + 1 of ``cache``, the MTP cache) instead of the main model's layers."""

    def __init__(self, dec: Decoder, cache: PagedCache, max_tables: int, max_rows: int, max_blocks: int,
                 mtp: bool = False):
        reason = graphs_unsupported(dec)
        if reason is not None:
            raise ValueError(f"fixed-shape steps: {reason}")
        self.dec, self.cache, self.mtp, self.shift = dec, cache, mtp, int(mtp)
        self.block_size, self.max_tables, self.max_blocks = cache.block_size, max_tables, max_blocks
        self.row_buckets = row_buckets(max_rows)
        device, dtype = dec.model.embed.weight.device, dec.model.embed.weight.dtype
        layers = dec.model.mtp if mtp else dec.model.layers
        self.dense_flops_per_row = sum(m.dense_flops_per_token(dtype) for m in layers.modules()
                                       if isinstance(m, Experts))
        self.attn_flops_per_slot = attention_flops_per_slot(dec.cfg, 1 if mtp else dec.cfg.n_layers)
        pinned = device.type == "cuda"
        # per row [token, position, its table, its first position to write], and the tables (a table of null
        # blocks after the step's own, for the padding rows), laid out (tables + 1, W) for a step of W blocks a
        # row: each filled with one copy a step
        self.rows = torch.zeros(max_rows, 4, dtype=torch.long, device=device)
        self.tables = torch.full(((max_tables + 1) * max_blocks,), NULL_BLOCK, dtype=torch.long, device=device)
        self._host_rows = torch.zeros_like(self.rows, device="cpu", pin_memory=pinned)
        self._host_tables = torch.zeros_like(self.tables, device="cpu", pin_memory=pinned)
        # the last step's copies out of them: a step that reads nothing back (a prompt's chunk that does not end it)
        # leaves the GPU behind the host, and the next fill must not overwrite what a pending copy has yet to read
        self._copied = torch.cuda.Event() if pinned else None
        # the output, one for every shape: a graph copies its own into it, so that what it allocates is free for
        # the next capture in the shared pool; an MTP pass's input hidden states too
        self.hidden = torch.zeros(max_rows, 1, dec.cfg.dim, dtype=dtype, device=device)
        self.hidden_in = torch.zeros_like(self.hidden) if mtp else None

    def buckets(self, n_rows: int, n_slots: int) -> tuple[int, int] | None:
        """(rows, blocks a row) of the step for ``n_rows`` rows attending over ``n_slots`` slots at most (an MTP
        pass's slots: positions + 1); None past the largest row bucket."""
        if n_rows > self.row_buckets[-1]:
            return None
        rows = next(b for b in self.row_buckets if b >= n_rows)
        blocks = min(1 << max(0, math.ceil(n_slots / self.block_size) - 1).bit_length(), self.max_blocks)
        return rows, blocks

    def fill(self, rows: list[tuple[int, int, int, int]], tables: list[list[int]], shape: tuple[int, int],
             hidden: torch.Tensor | None = None) -> None:
        """The static inputs of a step of ``shape`` (``buckets``): ``rows`` (token, position, index into ``tables``,
        the first position it may write) and ``tables`` (each request's block ids, at least to its rows' slots);
        the padding rows token 0 at position 0 on the table of null blocks. An MTP pass's ``hidden`` (N, D): each
        row's input hidden state (the padding rows keep what they held: their outputs are never read)."""
        P, W = shape[:2]
        R = len(tables)
        table_rows = [blocks[:W] + [NULL_BLOCK] * (W - len(blocks[:W])) for blocks in tables]
        if self._copied is not None:
            self._copied.synchronize()
        host = self._host_tables[:(R + 1) * W].view(R + 1, W)
        host[:R] = torch.tensor(table_rows).view(R, W)
        host[R] = NULL_BLOCK
        self.tables[:host.numel()].copy_(host.view(-1), non_blocking=True)
        host = self._host_rows[:P]
        host[:len(rows)] = torch.tensor(rows).view(-1, 4)
        host[len(rows):] = torch.tensor([0, 0, R, 0])  # padding rows: token 0 at position 0, null blocks
        self.rows[:P].copy_(host, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        if self.mtp:
            self.hidden_in[:len(rows), 0].copy_(hidden)

    @torch.inference_mode()
    def run(self, shape: tuple) -> torch.Tensor:
        """Hidden states (P, 1, D) of the step ``fill`` set up, in ``hidden[:P]``: the main model's before the final
        norm, or (``mtp``; ``shape``'s third item: the inputs are the main model's, not a previous pass's) the MTP
        module's."""
        P, W = shape[:2]
        rows, dec = self.rows[:P], self.dec
        tables = self.tables[:(self.max_tables + 1) * W].view(-1, W).index_select(0, rows[:, 2])
        at = dec.decode_rows(rows[:, 1], W * self.block_size, self.shift)
        cache = self.cache.view(tables, rows[:, 3])
        with fixed_shapes():
            if self.mtp:
                h = dec.mtp_layer(self.hidden_in[:P], rows[:, :1], at, cache, from_main=shape[2])
            else:
                h = dec.lone_layers(dec.model.embed(rows[:, :1]), at, cache)
        return self.hidden[:P].copy_(h)


class StepGraphs:
    """``StaticStep``'s steps (``mtp``: the MTP module's passes), each (row bucket, slot bucket) captured in a CUDA
    graph on first use and replayed after (``capture``; without it they run eagerly). A capture that fails turns
    graphs off for good, with one line on stderr: the eager step is always there."""

    def __init__(self, dec: Decoder, cache: PagedCache, max_tables: int, max_rows: int, max_len: int, capture: bool,
                 mtp: bool = False):
        self.static = StaticStep(dec, cache, max_tables, max_rows, math.ceil((max_len + mtp) / cache.block_size), mtp)
        self.capture = capture
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.failed: str | None = None

    def step(self, rows: list[tuple[int, int, int, int]], tables: list[list[int]], hidden: torch.Tensor | None = None,
             from_main: bool = True) -> torch.Tensor | None:
        """Hidden states (N, 1, D) of the N token ``rows`` (``StaticStep.fill``: token, position, index into
        ``tables``, each a request's block ids, and the first position it may write; an MTP pass's ``hidden`` (N, D)
        too, the main model's or (not ``from_main``) the module's own), a view of the static output, valid until
        the next step. None once a capture has failed, or where the step's rows pass the largest bucket, its dense
        experts and its prompts' attention ``FLOPS_BUDGET``, or its slots ``GRAPH_MAX_SLOTS`` a row or
        ``GRAPH_MAX_ROW_SLOTS`` in all (the caller runs the step eagerly)."""
        static = self.static
        shape = static.buckets(len(rows), max(row[1] for row in rows) + 1 + static.shift)
        if self.failed is not None or shape is None:
            return None
        P, slots = shape[0], shape[1] * static.block_size
        flops = P * static.dense_flops_per_row + (len(rows) - len(tables)) * slots * static.attn_flops_per_slot
        if flops > FLOPS_BUDGET or slots > GRAPH_MAX_SLOTS or P * slots > GRAPH_MAX_ROW_SLOTS:
            return None  # dense experts or attention costing more than the launches a graph saves: eagerly
        if static.mtp:
            shape = (*shape, from_main)
        static.fill(rows, tables, shape, hidden)
        if not self.capture:
            return static.run(shape)[:len(rows)]
        graph = self.graphs.get(shape) or self._capture(shape)
        if graph is None:
            return None
        graph.replay()
        return static.hidden[:len(rows)]

    def forward(self, plain: list[Request], drafted: list[tuple[list[Request], list[list[int]]]],
                prefilling: list[Request], lens: list[int], with_prompts: bool) -> FixedForward | None:
        """The engine's pass over a step's rows (``token_rows``: ``plain`` decoding requests, each drafted group's
        (requests, their drafts), ``lens[i]`` prompt tokens of ``prefilling[i]``) in fixed shapes, and the logits of
        the rows that need them; ``with_prompts``: the prompts' hidden states too. None where the step runs eagerly
        (``step``)."""
        decoding = [(r, []) for r in plain] + [(r, d) for rows, drafts in drafted for r, d in zip(rows, drafts)]
        rows, at, ending = token_rows(decoding, prefilling, lens)
        h = self.step(rows, [r.blocks for r, _ in decoding] + [r.blocks for r in prefilling])
        if h is None:
            return None
        off, h_drafts = len(plain), []
        for group, drafts in drafted:  # every row of a group verifies as many drafts
            n = len(group) * (len(drafts[0]) + 1)
            h_drafts.append(h[off:off + n].view(len(group), len(drafts[0]) + 1, -1).clone())
            off += n
        n_logits = off + len(ending)
        logits = self.static.dec.logits(h[:n_logits, 0]) if n_logits else None
        h_pre = None
        if prefilling and with_prompts:
            T = max(lens)
            index = torch.tensor([a + a[-1:] * (T - len(a)) for a in at], device=h.device)  # padding: the last
            h_pre = h[:, 0].index_select(0, index.view(-1)).view(len(prefilling), T, -1)
        return FixedForward(h[:len(plain)] if plain else None, h_drafts, logits, h_pre, ending)

    def _capture(self, shape: tuple):
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
            print(f"flyer serve: CUDA graphs off, capturing a step failed ({self.failed})", file=sys.stderr)
            return None
        self.graphs[shape] = graph
        return graph
