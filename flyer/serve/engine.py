"""The serving engine: one scheduler owns the model and the paged cache.

It is single-threaded: its driver (``flyer.serve.link.EngineHost`` in ``flyer serve``, which
hears the HTTP process's submissions and cancellations between steps; or a test or benchmark)
calls ``submit`` and ``cancel`` and then ``step``, and each request's ``emit`` hears its tokens
during the step. Each scheduler step:

1. drops cancelled requests (their blocks freed);
2. admits waiting requests, oldest first, while the batch has room and the pool has blocks for
   the whole prompt (after taking its cached prefix blocks; a model whose every layer slides: for the most its
   window holds, its blocks taken as its prefill chunks reach them): a request joins the running batch
   at the next step, without waiting for the batch to finish; one whose prompt starts with blocks a
   running request is still prefilling waits for them and shares them (n choices of one prompt, a
   burst with a common header: computed once); the prompt tokens its first admission took from cached blocks
   come with its first token (``TokenEvent.cached_tokens``: ``usage``'s ``cached_tokens``);
3. gives back the blocks a model whose every layer slides (Mistral 7B v0.1) will not read again, wholly behind
   the window of a request's next token (none with MTP drafts, whose block attends fully); gives every decoding
   request a slot for its next token; when no block is left, the most
   recently admitted request is preempted: its blocks freed, it goes back to the front of the
   queue and is recomputed (prompt and tokens so far) when readmitted, so nothing is lost or
   repeated;
4. runs one forward over one token per decoding request and at most ``prefill_chunk`` prompt
   tokens (chunks of one or more prompts; a chunk a prompt's sliding window cannot get blocks for waits, and where
   no row of a step could go on, the most recently admitted request is preempted), so a long prompt advances a
   chunk per step while the
   others keep decoding (more during a burst: ``prefill_budget``). Both kinds of rows go through
   the model together (``Decoder.forward_groups``): the routed experts' weights, most of the bytes
   a step reads, are read once for both. On a GPU a step runs in fixed shapes, a token row per decoding
   request, draft and prompt token, replayed from a CUDA graph (``flyer.serve.graphs``,
   ``EngineConfig.cuda_graphs``);
5. samples each request's next token with its own options (greedy, temperature / top-p with its
   own seeded generator; with a grammar, among the tokens it allows: ``flyer.serve.grammar``, after the
   reasoning end marker for a request that reasons first) and hands it to the request's ``emit``; finished
   requests leave.

With ``speculative="mtp"`` each decode step first drafts tokens with the model's MTP module, which has a
paged cache of its own on the same block tables, and the forward of step 4 verifies them
(``flyer.serve.speculation``; a grammar row's drafts follow its grammar); a step with more than
``speculative_max_batch`` decoding rows drafts none.

DeepSeek-V4 (attn "hybrid", ``flyer.serve.paged_hybrid``): a running request also holds a slot (its windows,
the compressors' partial states) from admission to its end or preemption; its compressed entries fill its
blocks. A shared prefix needs the slot's state at its end too: requests leave snapshots of their slots at chosen
block boundaries (their prefill chunks end there) and a match is used up to its deepest snapshot, which the new
request's slot copies (``BoundarySnapshots``; with MTP speculation its MTP slot too, and the hidden streams of the
boundary's last position that its MTP entry needs). Its on-disk prefix cache holds the blocks' entries and
the snapshots at those boundaries in ``flyer generate``'s files (``flyer.serve.disk_tier``): a match goes
on with the blocks on disk and resumes at the deepest snapshot in memory or on disk.

A request's state is its tokens (prompt + generated) and ``n_cached``, how many of them are in
its blocks. Every forward feeds ``tokens[n_cached:]`` (a chunk of them); when the cache catches
up with the tokens, the last logits give the next token. Decode and recompute are the same rule, but for a
recomputed request's last token, which its prefill leaves to the next step's decoding rows (drafting under MTP):
its seeded draws are those it makes never preempted.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
import traceback
from collections import deque
from typing import Callable, Sequence

import torch

from flyer import kernels
from flyer.errors import FieldError
from flyer.infer.decoder import Decoder, Group
from flyer.infer.prefix_cache import chain_keys
from flyer.infer.sampling import SamplingParams, sample
from flyer.model.transformer import Transformer
from flyer.serve import step_logits
from flyer.serve.grammar import GrammarMasks
from flyer.serve.graphs import StepGraphs, graphs_unsupported
from flyer.serve.metrics import ServeMetrics
from flyer.serve.paged import NULL_BLOCK
from flyer.serve.pool import build_pool
# the request-side types, importable from here as well (tests, benchmarks, ``flyer.serve.cli``)
from flyer.serve.request import (EngineConfig, Limits, QueueFull, Request, SamplingOptions, TokenEvent,
                                 most_blocks)
from flyer.serve.speculation import MtpSpeculator


def _padded(xs: list[int], n: int, pad: int) -> list[int]:
    """``xs`` right-padded with ``pad`` to ``n`` items (one tensor built from rows of equal length)."""
    return xs + [pad] * (n - len(xs))


class Engine:
    """Continuous batching of ``model`` (eval mode) over a paged cache of ``cfg.kv_cache_bytes``."""

    def __init__(self, model: Transformer, cfg: EngineConfig | None = None, metrics: ServeMetrics | None = None,
                 tokenizer=None):
        """``tokenizer``: flyer's (``TextTokenizer``, ``ByteTokenizer``), for requests with a grammar (structured
        outputs, ``flyer.serve.grammar``); None: those are refused."""
        self.cfg = cfg = cfg or EngineConfig()
        cfg.validate()
        self.model = model.eval()
        self.metrics = metrics or ServeMetrics()
        mcfg = model.cfg
        device = model.embed.weight.device
        self.spec = cfg.speculative == "mtp"
        if self.spec and len(model.mtp) == 0:
            raise FieldError("speculative", "mtp needs a model trained with MTP (mtp_depth >= 1; this one has 0)")
        pool = build_pool(model, cfg, self.spec, device)  # the cache memory (``flyer.serve.pool``)
        self.cache, self.alloc, self.mtp_cache, self.slots = pool.cache, pool.alloc, pool.mtp_cache, pool.slots
        self.hybrid, self.sharing, self.snapshots, self.disk = pool.hybrid, pool.sharing, pool.snapshots, pool.disk
        self.dec = Decoder(model, 1, mcfg.max_seq_len, cache=self.cache, mtp_cache=self.mtp_cache, with_mtp=self.spec)
        self.device = device
        # every layer sliding and no drafts (the MTP block attends fully): blocks behind the window go back
        every = mcfg.attn == "gqa" and len(mcfg.sliding_layers) == mcfg.n_layers
        self.window = mcfg.window_size if every and not self.spec else 0
        self.graphs = self._step_graphs(cfg.cuda_graphs, device)
        self.speculator = MtpSpeculator(self.dec, self.mtp_cache, cfg.draft_tokens, self._tables, self.metrics,
                                        device, self.cache if self.hybrid else None, cfg.speculative_max_batch,
                                        cfg.block_size, self._step_graphs(cfg.cuda_graphs, device, mtp=True)
                                        ) if self.spec else None
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._ids = itertools.count()
        self.tokenizer, self.grammars = tokenizer, None  # GrammarMasks, built at the first grammar request
        # admitted prompts' full blocks before their last token (what sharing can spare), and those
        # shared or loaded from the on-disk tier instead of computed
        self.prefix_blocks = self.prefix_found = 0
        self._update_gauges()

    # ---- the driver's side ------------------------------------------------------------------
    @property
    def limits(self) -> Limits:
        return Limits(self.model.cfg.vocab_size, self.model.cfg.max_seq_len, self.cfg.block_size,
                      self.alloc.capacity, self.cfg.max_queue, grammars=self.tokenizer is not None,
                      window_blocks=self.window_blocks)

    @property
    def window_blocks(self) -> int:
        """The most blocks a request holds at once where blocks go back behind the window (0: none go back): a
        prefill chunk's positions (``prefill_chunk`` at most, ``_plan_prefill``) and the window - 1 before them,
        however they fall on blocks."""
        if not self.window:
            return 0
        bs = self.cfg.block_size
        return (self.window + self.cfg.prefill_chunk - 1 + bs - 2) // bs + 1

    def check(self, prompt: Sequence[int], opts: SamplingOptions) -> None:
        """``FieldError`` when the request can never run (``Limits.check``)."""
        self.limits.check(prompt, opts)

    def submit(self, prompt: Sequence[int], opts: SamplingOptions, emit: Callable[[TokenEvent], None],
               bounded: bool = True) -> Request:
        """Queue a request; ``emit`` hears each of its ``TokenEvent`` during the steps. Raises
        ``FieldError`` (see ``check``) or, when ``bounded``, ``QueueFull`` (the link's HTTP side
        bounds the queue itself: ``flyer.serve.link``)."""
        self.check(prompt, opts)
        if bounded and len(self.waiting) >= self.cfg.max_queue:
            raise QueueFull(f"{self.cfg.max_queue} requests are waiting already")
        req = Request(next(self._ids), list(prompt), opts, emit, tokens=list(prompt), submitted=time.perf_counter())
        if opts.seed is not None:
            req.generator = torch.Generator(device=self.device).manual_seed(opts.seed)
        if opts.prompt_logprobs:
            req.prompt_lp = [None]
        if opts.grammar is not None:  # reasoning first: the matcher waits for the end marker (``GrammarMasks.follow``)
            req.matcher, req.deferred = self._grammar_masks().start(opts)
        self.waiting.append(req)
        return req

    def _grammar_masks(self) -> GrammarMasks:
        """The engine's ``GrammarMasks`` (llguidance's tokenizer, built once); ``check`` has refused a grammar
        without a tokenizer (``Limits.grammars``)."""
        if self.grammars is None:
            self.grammars = GrammarMasks(self.tokenizer, self.model.cfg.vocab_size, self.device)
            if self.spec:  # its rows draft under their grammars
                self.speculator.grammars = self.grammars
        return self.grammars

    def cancel(self, req: Request, reason: str = "cancelled") -> None:
        """End ``req`` at the next step and free its blocks: ``reason`` its finish reason, as its final event and
        ``/metrics`` count it ("cancelled": client gone; "stop": a stop string the HTTP side matched); the first
        reason given holds (the HTTP side cancels whatever of a request is left as it ends)."""
        req.cancelled = req.cancelled or reason

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def drafted(self) -> int:
        """MTP drafts proposed so far (0 without speculation)."""
        return self.speculator.drafted if self.spec else 0

    @property
    def accepted(self) -> int:
        """MTP drafts kept so far."""
        return self.speculator.accepted if self.spec else 0

    def _step_graphs(self, wanted: bool | None, device: torch.device, mtp: bool = False) -> StepGraphs | None:
        """Where steps (``mtp``: the MTP module's passes) run in fixed shapes (``EngineConfig.cuda_graphs``):
        captured in CUDA graphs on a GPU, eagerly elsewhere; None: eagerly in the packed forward. A step's rows: its
        decoding requests, each with the drafts it verifies, and the tokens of ``prefill_chunk`` (what a step
        prefills but in a burst, ``prefill_budget``); as many for an MTP pass (the entries it writes)."""
        if wanted is False or (wanted is None and device.type != "cuda"):
            return None
        reason = graphs_unsupported(self.dec)
        if reason is not None:
            if wanted:
                raise FieldError("cuda_graphs", f"this model cannot step in fixed shapes: {reason}")
            return None
        cfg = self.cfg
        rows = cfg.max_batch_size * (1 + (cfg.draft_tokens if self.spec else 0)) + cfg.prefill_chunk
        return StepGraphs(self.dec, self.mtp_cache if mtp else self.cache, cfg.max_batch_size, rows,
                          self.model.cfg.max_seq_len, capture=device.type == "cuda", mtp=mtp)

    def safe_step(self) -> None:
        """``step``; a failure (a bug) is printed and ends every request with "error" instead of
        leaving clients waiting forever, and the engine goes on with the next requests."""
        try:
            self.step()
        except Exception:
            traceback.print_exc(file=sys.stderr)
            for r in list(self.running) + list(self.waiting):
                self._finish(r, "error", emit=True)
            self.waiting.clear()

    def run_until_idle(self, max_steps: int = 100_000) -> None:
        """Step until no request is left (tests and benchmarks without the thread)."""
        for _ in range(max_steps):
            if not self.busy:
                return
            self.step()
        raise RuntimeError(f"still busy after {max_steps} steps")

    @torch.inference_mode()
    def step(self) -> None:
        """One scheduling step (see the module docstring)."""
        t0 = time.perf_counter()
        self.admit()
        if self.spec:  # drafting or not, decided once: the drafts' slots reserved below and the forward agree
            self.speculator.begin_step(sum(len(r.tokens) - r.n_cached == 1 for r in self.running))
        if self.window:
            for r in self.running:
                self._release_behind(r)
        decoding = self._reserve_decode_slots()
        prefilling, lens = self._plan_prefill()
        while self.window and not (decoding or prefilling) and len(self.running) > 1:
            # every prefilling row waits for a block another holds (their windows' blocks are taken as they go):
            # the most recently admitted goes back to the queue, as a decoding row short of a block preempts
            self._preempt(self.running[-1])
            prefilling, lens = self._plan_prefill()
        self._forward(decoding, prefilling, lens)
        self._update_gauges()
        self.metrics.step_seconds.observe(time.perf_counter() - t0)  # (sampling read the tokens back: synced)

    def admit(self) -> int:
        """Drop cancelled requests, admit what fits; returns the running count (step 1 and 2 of a
        step; the benchmark counts sequences held at once with it alone)."""
        for r in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(r)
            self._finish(r, r.cancelled, emit=True)
        for r in [r for r in self.running if r.cancelled]:
            self._finish(r, r.cancelled, emit=True)
        self._admit()
        return len(self.running)

    def _admit(self) -> None:
        bs = self.cfg.block_size
        while self.waiting and len(self.running) < self.cfg.max_batch_size:
            r = self.waiting[0]
            if self.sharing and r.prompt_lp is None and self._sibling_prefilling(r):
                return  # the queue waits (in order) for blocks it will share, rather than computing them too
            blocks, keys, on_disk = [], [], {}
            shares = self.sharing and r.prompt_lp is None
            if shares:
                # the last token is always recomputed (its logits pick the next token), so at
                # most the full blocks before it are shared
                limit = (len(r.tokens) - 1) // bs
                blocks, keys = self.alloc.match(r.tokens, limit)
                in_memory = len(blocks)
                if self.disk:  # (every layer sliding: holding its window's blocks only as it loads)
                    self.disk.extend(r.tokens, blocks, keys, self._behind, self._most(r))
                if self.snapshots:  # usable up to the deepest snapshot (in memory, else on disk: ``on_disk``)
                    files = self.disk.snapshot_files(r.tokens, on_disk) if self.disk else None
                    blocks, keys, plan = self.snapshots.usable(blocks, keys, limit, files)
            snap = on_disk.get(len(keys))  # V4: the snapshot file the prefix resumes from (None: in memory)
            need = math.ceil(len(r.tokens) / bs) - len(blocks)
            behind = self._behind(len(blocks) * bs)
            if behind:  # a long cached prefix: only its window's blocks stay held (``extend`` gave back some)
                self.alloc.release([b for b in blocks[:behind] if b != NULL_BLOCK], evict_first=True)
                blocks[:behind] = [NULL_BLOCK] * behind
            if self.window:  # taken as its prefill reaches them (``_plan_prefill``): admitted where the most it
                # holds fits beside what the running requests may still take (a block two of them share counted for
                # each: the pool can run short once they part, and then preempts as for a decoding row)
                need = self._most(r) - (len(blocks) - behind) + sum(self._most(q) - len(self._held(q))
                                                                    for q in self.running)
            if self.alloc.available < need:
                self.alloc.release(blocks[behind:])
                if not self.running:  # nothing will free blocks: cannot happen (check bounds the need)
                    raise RuntimeError(f"request {r.id} needs {need} blocks, {self.alloc.available} available")
                return
            self.waiting.popleft()
            try:
                # counted at the first admission, as usage's cached_tokens (a retry looks them up again; a preempted
                # request finds its own blocks, as vLLM counts apart)
                if shares and not r.admitted:
                    self.prefix_blocks += (len(r.tokens) - 1) // bs
                    self.prefix_found += len(blocks)
                hidden = None
                if self.hybrid:
                    r.slot = self.slots.take()
                    if self.snapshots and shares:  # the snapshot is read before allocating, which may evict it
                        hidden = self.snapshots.begin(r.slot, keys, plan)
                    if snap is not None:  # begin set the plan only
                        hidden = self.disk.resume(r.slot, snap, (len(keys) - min(in_memory, len(keys))) * bs)
                r.blocks, r.released = list(blocks), behind  # taken: a failure from here releases them with r
                for _ in range(0 if self.window else need):
                    r.blocks.append(self.alloc.allocate())
                if snap is not None:  # kept in memory for the next requests too, once r's blocks are taken
                    self.snapshots.save(keys[-1], r.slot, hidden)
                r.keys, r.n_cached = keys, len(blocks) * bs
                r.n_shared = r.n_cached
                if self.spec and r.n_cached:  # the shared MTP entries (blocks; V4: the snapshot's) reach n_cached - 2
                    r.mtp_len = r.n_cached - 1
                    if self.hybrid:  # the snapshot's hidden streams of n_cached - 1 write its entry with the next token
                        r.h_prev = hidden.unsqueeze(0)
                    else:  # recompute the last shared position for its hidden state (not written)
                        r.n_cached -= 1
                if not r.admitted:  # once: a preempted request comes back
                    r.admitted, r.cached_prompt = True, len(blocks) * bs
                    self.metrics.prompt_tokens.inc(len(r.prompt))
            except BaseException:  # back at the queue's front, holding what it took: safe_step ends it
                r.blocks, r.released = (r.blocks, r.released) if r.blocks else (blocks, behind)
                self.waiting.appendleft(r)
                raise
            self.running.append(r)

    def _sibling_prefilling(self, r: Request) -> bool:
        """Whether a running request is still prefilling full blocks of r's prompt (same tokens from
        the start) that are not registered yet: r admitted now would compute them again (n choices of
        one prompt, a burst with a common header), admitted once they are written it shares them."""
        bs = self.cfg.block_size
        limit = (len(r.tokens) - 1) // bs  # r's blocks that can be shared (``_admit``)
        for q in self.running:
            if len(q.tokens) - q.n_cached <= 1 or len(q.keys) >= limit:
                continue  # decoding, or its blocks r could share are registered already
            if q.released and not self.disk and self.alloc.block_of.get(q.keys[0]) is None:
                continue  # its head, given back behind its window, is evicted: r could share none of its chain
            common = 0  # leading full blocks of equal tokens
            span = slice(0, bs)
            while common < limit and r.tokens[span] == q.tokens[span]:
                common += 1
                span = slice(common * bs, (common + 1) * bs)
            if common > len(q.keys):
                if self.snapshots:  # V4: q leaves a snapshot where the common blocks end, for r to resume from
                    self.snapshots.want(q.slot, common)
                return True
        return False

    def _reserve_decode_slots(self) -> list[Request]:
        """Decoding requests (one pending token), each with a block for that token's slot;
        preempts the most recently admitted requests while blocks are short."""
        bs = self.cfg.block_size
        rows = []
        for r in list(self.running):
            if r not in self.running or len(r.tokens) - r.n_cached != 1:
                continue
            while len(r.blocks) * bs <= r.n_cached + self._n_drafts(r):  # speculative: slots for the drafts too
                b = self.alloc.allocate()
                if b is not None:
                    r.blocks.append(b)
                    continue
                victim = self.running[-1]
                self._preempt(victim)
                if victim is r:
                    break
            if r in self.running:
                rows.append(r)
        return [r for r in rows if r in self.running]

    def _release_behind(self, r: Request) -> None:
        """Give back r's blocks wholly before its next token's window (it, position ``n_cached``, and every later one
        sees slots from n_cached - window + 1 on); their table entries become ``NULL_BLOCK``, so the table keeps its
        positions. Each was registered when it filled (``_register_full_blocks``, after every forward): with sharing
        it stays cached for a later prompt with the same prefix, and the disk tier stored it then."""
        end = self._behind(r.n_cached)
        if end > r.released:
            # evicted before other cached blocks, the deepest first: the chain's head stays cached the longest
            self.alloc.release(r.blocks[r.released:end], evict_first=True)
            r.blocks[r.released:end] = [NULL_BLOCK] * (end - r.released)
            r.released = end

    def _most(self, r: Request) -> int:
        """The most blocks r holds at once (``Limits.blocks``)."""
        return most_blocks(len(r.prompt) + r.opts.max_tokens, self.cfg.block_size, self.window_blocks)

    def _behind(self, n_cached: int) -> int:
        """Leading blocks wholly before the window of position ``n_cached`` (0 where none are given back)."""
        return max(0, n_cached - self.window + 1) // self.cfg.block_size if self.window else 0

    def _release_all(self, r: Request) -> None:
        """Give back every block r holds, its chain's blocks given back behind its window (still cached) then put
        in the order a chain leaves the cache, its tail first (``BlockAllocator.reorder``)."""
        self.alloc.release(self._held(r))
        if r.released:
            self.alloc.reorder(r.keys[:r.released])

    def _held(self, r: Request) -> list[int]:
        """r's blocks it holds a reference to (not those given back behind a window)."""
        return r.blocks[r.released:]

    def _n_drafts(self, r: Request) -> int:
        """Drafts r verifies this step (``MtpSpeculator.n_drafts``)."""
        return self.speculator.n_drafts(r) if self.spec else 0

    def _preempt(self, r: Request) -> None:
        self.running.remove(r)
        self._release_all(r)
        self._free_slot(r)
        r.blocks, r.keys, r.n_cached, r.n_shared, r.mtp_len, r.h_prev = [], [], 0, 0, 0, None
        r.released = 0
        self.waiting.appendleft(r)
        self.metrics.preemptions.inc()

    def _free_slot(self, r: Request) -> None:
        if r.slot is not None:
            if self.snapshots:
                self.snapshots.end(r.slot)
            self.slots.give_back(r.slot)
            r.slot = None

    def _tables(self, rows: list[Request], n_slots: int) -> torch.Tensor:
        """Block tables (B, n) of ``rows`` covering ``n_slots`` positions (NULL_BLOCK past a row's)."""
        width = math.ceil(n_slots / self.cfg.block_size)
        return torch.tensor([_padded(r.blocks[:width], width, NULL_BLOCK) for r in rows], device=self.device)

    def _group(self, rows: list[Request], chunks: list[list[int]]) -> Group:
        """Rows feeding ``chunks`` (their next tokens, from position n_cached) as one batch."""
        lengths = [len(c) for c in chunks]
        T = max(lengths)
        tokens = torch.tensor([_padded(c, T, 0) for c in chunks], device=self.device)
        start = [r.n_cached for r in rows]
        tables = self._tables(rows, max(start) + T)
        if self.hybrid:  # each row's slot too (its windows and partial states)
            view = self.cache.view(tables, torch.tensor([r.slot for r in rows], device=self.device))
        else:
            protect = [r.n_shared for r in rows] if any(r.n_cached < r.n_shared for r in rows) else None
            view = self.cache.view(tables, None if protect is None else torch.tensor(protect, device=self.device))
        return Group(tokens, torch.tensor(start, device=self.device), None if min(lengths) == T else lengths, view)

    def _forward(self, decoding: list[Request], prefilling: list[Request], lens: list[int]) -> None:
        """One main-model pass over every decoding row's next token(s) and every prefilling row's
        chunk (``Decoder.forward_groups``: the weights are read once a step), one head GEMM for
        every row that needs logits, then each row's token(s) chosen and emitted."""
        ks = [self._n_drafts(r) for r in decoding]
        plain = [r for r, k in zip(decoding, ks) if k == 0]
        drafting = [(r, k) for r, k in zip(decoding, ks) if k > 0]
        drafted = self.speculator.draft(*zip(*drafting)) if drafting else []
        if not (plain or drafted or prefilling):
            return
        fixed = None if self.graphs is None else self.graphs.forward(
            plain, [(rows, drafts) for rows, _, drafts, *_ in drafted], prefilling, lens,
            with_prompts=self.spec or any(r.prompt_lp is not None for r in prefilling))
        if fixed is not None:
            mtp_graphs = self.speculator.graphs.graphs if self.spec else {}  # the MTP module's passes
            self.metrics.fixed_steps.labels("cuda_graph" if self.graphs.capture else "eager").inc()
            self.metrics.cuda_graphs.set(len(self.graphs.graphs) + len(mtp_graphs))
            h_plain, h_drafts, logits, h_pre, ending = fixed
        else:
            batches = [(plain, [[r.tokens[-1]] for r in plain])] if plain else []
            for rows, _, drafts, *_ in drafted:  # one group per draft count: verified without padding
                batches.append((rows, [[r.tokens[-1], *d] for r, d in zip(rows, drafts)]))
            if prefilling:
                batches.append((prefilling, [r.tokens[r.n_cached:r.n_cached + n] for r, n in zip(prefilling, lens)]))
            hs = self.dec.forward_groups([self._group(rows, chunks) for rows, chunks in batches])
            h_plain = hs.pop(0) if plain else None
            h_drafts = [hs.pop(0) for _ in drafted]
            h_pre = hs.pop(0) if prefilling else None
            ending = [i for i, (r, n) in enumerate(zip(prefilling, lens)) if r.n_cached + n == len(r.tokens)]
            need = [h_plain[:, 0]] if plain else []
            need += [h.flatten(0, 1) for h in h_drafts]
            if ending:
                need.append(h_pre[ending, [lens[i] - 1 for i in ending]])
            logits = self.dec.logits(torch.cat(need) if len(need) > 1 else need[0]) if need else None
        if logits is not None and any(r.opts.adjusts for r in self.running):
            step_logits.adjust(logits, plain, drafted, [prefilling[i] for i in ending])
        if logits is not None and self.grammars is not None:  # grammar rows (plain, verifying drafts, ending a prompt)
            step_logits.mask(self.grammars, logits, plain, drafted, [prefilling[i] for i in ending])
        # one argmax for the step, not one per row
        greedy = kernels.argmax(logits).tolist() if logits is not None else []
        for i, r in enumerate(plain):
            r.n_cached += 1
            if self.spec:  # (1, D) at the position just fed
                r.h_prev = h_plain[i].clone() if r.h_prev is None else torch.cat([r.h_prev, h_plain[i]])
            self._advance(r, logits[i], greedy[i])
        if self.spec and plain:  # their MTP entries written every block's worth of plain steps (``bound_pending``)
            for r in self.speculator.bound_pending([r for r in plain if r in self.running]):
                self._register_full_blocks(r)
        done = len(plain)
        for (rows, q, drafts, params, _), h in zip(drafted, h_drafts):
            n = h.shape[0] * h.shape[1]
            self._verify(rows, h, logits[done:done + n].view(h.shape[0], h.shape[1], -1), q, drafts, params)
            done += n
        if prefilling:
            self._after_prefill(prefilling, lens, h_pre, dict(zip(ending, range(done, done + len(ending)))),
                                logits, greedy)

    def _verify(self, rows: list[Request], hv: torch.Tensor, logits: torch.Tensor, q: list, drafts: list[list[int]],
                params: list[SamplingParams]) -> None:
        """Keep each row's accepted tokens of [pending, *drafts] (``MtpSpeculator.accept``) and emit
        them. hv (B, k + 1, D), logits (B, k + 1, V). DeepSeek-V4's rows that rejected a draft roll back first."""
        news = [self.speculator.accept(r, hv[i], logits[i], q[i], drafts[i], params[i]) for i, r in enumerate(rows)]
        self.speculator.roll_back(rows, [len(new) for new in news], drafts)
        for i, (r, new) in enumerate(zip(rows, news)):
            self._register_full_blocks(r)
            # the step's time shared by the tokens it kept: emitted microseconds apart, they would
            # read as intervals of ~0 after one of the whole step (a row whose first token this is
            # has no interval to share: its first token's is the time to first token)
            tpot = None if r.last_token_at is None else (time.perf_counter() - r.last_token_at) / len(new)
            for j, tok in enumerate(new):
                if self._emit_token(r, tok, logits[i, j], tpot):
                    break

    def prefill_budget(self) -> int:
        """Prompt tokens this step may prefill: ``prefill_chunk``, times how many requests wait for
        their first token per decoding one when they outnumber the decoding ones (a burst). A
        step's prefill stalls each decoding request as long as it advances each waiting one, and
        one forward over many prompts' tokens costs less than the same tokens in several steps."""
        waiting = sum(1 for r in self.running if r.generated == 0 and len(r.tokens) - r.n_cached > 1)
        decoding = sum(1 for r in self.running if r.generated > 0)
        return self.cfg.prefill_chunk * max(1, waiting // max(decoding, 1)) if waiting > decoding \
            else self.cfg.prefill_chunk

    def _plan_prefill(self) -> tuple[list[Request], list[int]]:
        """The rows with prompt tokens to feed this step and how many each, within the budget."""
        budget = self.prefill_budget()
        rows, lens = [], []
        for r in self.running:
            pending = len(r.tokens) - r.n_cached
            if pending > 1 and budget > 0:
                # a request recomputed after preemption stops before its last token, which the next step feeds as
                # a decoding row's (drafting, under MTP, as it would have): its seeded draws do not depend on it
                n = min(pending - 1 if r.generated else pending, budget)
                if self.window:  # the blocks it reaches, taken now: a chunk the pool is short for is cut or waits
                    n = self._take_blocks(r, min(n, self.cfg.prefill_chunk))  # (at most ``window_blocks`` held)
                    if n == 0:
                        continue
                rows.append(r)
                lens.append(self.snapshots.clip(r.slot, r.n_cached, n) if self.snapshots else n)  # to its boundary
                budget -= lens[-1]
        return rows, lens

    def _take_blocks(self, r: Request, n: int) -> int:
        """Blocks for r's next ``n`` positions, as many as the pool has free; how many of them r's blocks cover."""
        bs = self.cfg.block_size
        while len(r.blocks) * bs < r.n_cached + n:
            b = self.alloc.allocate()
            if b is None:
                break
            r.blocks.append(b)
        return min(n, len(r.blocks) * bs - r.n_cached)

    def _after_prefill(self, rows: list[Request], lens: list[int], h: torch.Tensor, logit_row: dict[int, int],
                       logits: torch.Tensor | None, greedy: list[int]) -> None:
        """Prefilled chunks: MTP entries (speculative), prompt scores, then the first token of each
        row whose prompt is done (its logits are row ``logit_row[i]`` of the step's)."""
        if self.spec:
            self.speculator.after_prefill(rows, lens, h)
        for i, (r, n) in enumerate(zip(rows, lens)):
            if r.prompt_lp is not None and r.n_cached < len(r.prompt):
                self._score_prompt(r, h[i, :n])
            r.n_cached += n
            self._register_full_blocks(r, h[i, n - 1] if self.spec else None)  # (again in ``_advance``: a no-op)
            if i in logit_row:
                self._advance(r, logits[logit_row[i]], greedy[logit_row[i]])

    def _score_prompt(self, r: Request, h_TD: torch.Tensor) -> None:
        """Log-probabilities of the prompt tokens after each fed position (evaluation harnesses)."""
        logp = self.dec.logits(h_TD).log_softmax(-1)
        lo = r.n_cached
        nxt = r.tokens[lo + 1:lo + 1 + h_TD.shape[0]]
        for j, t in enumerate(nxt):
            if lo + 1 + j == len(r.prompt_lp) < len(r.prompt):  # a recompute after preemption scores nothing twice
                r.prompt_lp.append(self._logprobs(logp[j], t, r.opts.logprobs))

    @staticmethod
    def _logprobs(logp_V: torch.Tensor, token: int, top: int | None) -> tuple[float, dict[int, float] | None]:
        """(logprob of ``token``, the ``top`` most likely tokens' logprobs or None when top is 0/None)."""
        if not top:
            return float(logp_V[token]), None
        vals, ids = logp_V.topk(top)  # less the tokens a grammar forbids (-inf: not JSON)
        return float(logp_V[token]), {i: v for i, v in zip(ids.tolist(), vals.tolist()) if v > -math.inf}

    def _register_full_blocks(self, r: Request, hidden: torch.Tensor | None = None) -> None:
        """Index r's newly full blocks (and leave a snapshot at a boundary of its plan: V4; ``hidden``, with MTP,
        the main hidden streams of its last position, which a snapshot keeps)."""
        if not self.sharing:
            return
        bs = self.cfg.block_size
        first = len(r.keys)
        # speculative: block i is whole once its MTP entries, positions up to (i + 1) bs - 2, are written too
        full = min(r.n_cached, r.mtp_len + 1) if self.spec else r.n_cached
        for i in range(first, full // bs):
            key = chain_keys(r.tokens[i * bs:(i + 1) * bs], bs, seed=r.keys[-1] if r.keys else "")[0]
            r.keys.append(key)
            if self.alloc.register(r.blocks[i], key) and (i + 1) * bs <= len(r.prompt):
                r.written_prompt += bs
        at = self.snapshots.reached(r.slot, r.n_cached, r.keys, hidden) if self.snapshots else None
        if self.disk:
            self.disk.store(r.tokens, len(r.prompt), r.blocks, r.slot, first, len(r.keys), at, hidden)

    def _advance(self, r: Request, logits_V: torch.Tensor, argmax: int) -> None:
        """The cache holds all of r's tokens: choose the next one from ``logits_V`` (``argmax``:
        its argmax, computed with the batch's) and emit it; with ``max_tokens`` 0, end r without one."""
        self._register_full_blocks(r)
        o = r.opts
        if o.max_tokens == 0:  # the prompt only (echo's scoring): done, without a token
            self._finish(r, "length", emit=False)
            r.emit(TokenEvent(None, finish_reason="length", prompt_logprobs=r.prompt_lp, cached_tokens=r.cached_prompt,
                              written_tokens=r.written_prompt))
            return
        if o.temperature == 0:
            tok = argmax
        else:
            tok = int(sample(logits_V.unsqueeze(0), o.params, r.generator)[0])
        self._emit_token(r, tok, logits_V)

    def _emit_token(self, r: Request, tok: int, logits_V: torch.Tensor, tpot: float | None = None) -> bool:
        """Append ``tok`` (chosen from ``logits_V``) to r, emit it; True when that finished r.
        ``tpot``: its time per output token (else the time since r's last token)."""
        o = r.opts
        lp = top = None
        if o.logprobs is not None:
            lp, top = self._logprobs(logits_V.float().log_softmax(-1), tok, o.logprobs)
        r.tokens.append(tok)
        now = time.perf_counter()
        if r.last_token_at is None:
            self.metrics.ttft.observe(now - r.submitted)
        else:
            self.metrics.tpot.observe(now - r.last_token_at if tpot is None else tpot)
        r.last_token_at = now
        self.metrics.generation_tokens.inc()
        # a grammar complete ends r as a stop token does (EOS, which it allows only there, is one)
        reason = "stop" if tok in o.stop_ids else self.grammars.follow(r, tok) if self.grammars else None
        reason = reason or ("length" if r.generated >= o.max_tokens else None)
        first = r.generated == 1
        if reason is not None:  # blocks freed before the caller hears the request is done
            self._finish(r, reason, emit=False)
        r.emit(TokenEvent(tok, lp, top, reason, r.prompt_lp if first and r.prompt_lp is not None else None,
                          r.cached_prompt if first else None, r.written_prompt if reason is not None else None))
        return reason is not None

    def _finish(self, r: Request, reason: str, emit: bool) -> None:
        if r in self.running:
            self.running.remove(r)
        self._release_all(r)
        self._free_slot(r)
        r.blocks, r.done = [], True
        self.metrics.requests.labels(reason).inc()
        if emit:
            r.emit(TokenEvent(None, finish_reason=reason, written_tokens=r.written_prompt))

    def _update_gauges(self) -> None:
        m = self.metrics
        m.running.set(len(self.running))
        m.waiting.set(len(self.waiting))
        m.blocks_used.set(self.alloc.used)
        m.blocks_free.set(self.alloc.available)
        m.prefix_hit_rate.set(self.prefix_hit_rate)

    @property
    def prefix_hit_rate(self) -> float:
        """Admitted prompts' blocks shared or loaded instead of computed, of those that could have been."""
        return self.prefix_found / self.prefix_blocks if self.prefix_blocks else 0.0
