"""The paged cache of DeepSeek-V4 (attn "hybrid") for the serving engine: slots for what is fixed per sequence,
blocks for what grows, and prefix sharing through snapshots of the slots at block boundaries.

A hybrid layer keeps per sequence (``flyer.infer.hybrid_cache``) the ring of its last ``window_size`` keys and
its compressors' (and CSA's indexer's) unfinished-window states: a fixed size whatever the length. These live in
one of ``max_batch_size`` SLOTS, taken when a request is admitted and given back when it finishes, is cancelled
or is preempted (a recomputed request restarts from position 0, where it reads nothing of the slot it did not
write: window slots and compressor slots before position 0 are masked). The completed compressed entries (and
CSA's indexer keys) grow with the sequence and live in the engine's BLOCKS: a block of ``block_size`` tokens
holds, for each compressed layer of ratio r, ``block_size // r`` entries, through the same block tables,
``BlockAllocator`` and preemption as the MLA pool (``flyer.serve.paged``); block 0 stays the null block, read
by table padding (masked) and never written (only a row's completed entries are).

Prefix sharing (``BoundarySnapshots``), as state-space models are prefix-cached: the full blocks of a prompt are
keyed and shared as MLA's are, but a block does not hold the window and partial states at its end, so a request
also keeps a SNAPSHOT of its slot at chosen block boundaries P = j * block_size. The rings index position p at
p % S and a fresh prefill to P writes exactly positions < P in them (slots before position 0 are masked), and P
is a multiple of every ratio, so every entry before P is complete and in blocks 0 .. j - 1: the j blocks and the
snapshot are all the state at P, and a request that takes both and prefills from P computes what one that
prefilled to P would (bit for bit where its chunks are the same). Design:

- where: a snapshot lives in the pool's own blocks (``HybridCache.save_slot``: the slot's bytes over the entry
  storage of ceil(window_bytes / block_bytes) blocks; with MTP speculation its MTP part too: ``size``), keyed in
  the allocator's index and unreferenced, so it is counted, cached and evicted, least recently used first, as a
  cached prefix block is: no bytes of
  ``kv_cache_bytes`` are set apart, and cache blocks used / free count snapshots as cached blocks;
- which boundaries: a snapshot at every block would cost ~20 blocks each, so a request leaves one only where a
  later prompt is likely to resume: at its last full block before its last token (repeats, n choices, a next
  turn of a conversation), where its prompt's match in the index ended (where it forks from a cached prompt:
  the common system prompt of the requests after it), and where a waiting request's common blocks with it end
  (``want``: the first request of a burst leaves the system prompt's snapshot for its siblings). Its prefill
  chunks end there (``clip``): an extra forward step each, as vLLM's aligned state caching splits its chunks;
- use: a match is usable up to its deepest block with a snapshot (the rest are released and recomputed); the
  hit rate counts those blocks only;
- eviction: when a snapshot block or the prefix block its key names leaves the index, the whole snapshot goes
  (``BlockAllocator.on_evict``); preemption and cancellation give the slot and its plan back (``end``), a
  readmitted request matches again (its own snapshots too). Nothing but the index holds a snapshot.

The attention is ``flyer.infer.hybrid_cache.hybrid_attention`` on a ``HybridCache.view`` of the pool per batch.

The on-disk prefix cache under it (``flyer.serve.disk_tier``, in ``flyer.infer.prefix_cache_hybrid``'s files, those of
``flyer generate --prefix-cache``): a match continues with the blocks on disk (loaded into the request's pool
blocks and keyed here), ``usable`` then asks the disk for a snapshot at each boundary deeper than the deepest one
in memory (``on_disk``), and a snapshot taken at a boundary of a plan (``reached``) is written to disk too.

MTP speculation (``flyer.serve.speculation``): the MTP block's one window-only layer has a pool of its own, slots
only (``make_mtp_hybrid_cache``: a window-only layer completes no entries), one per running request at the same
slot id as its main slot, its bytes taken from ``kv_cache_bytes`` beside the main slots'. A snapshot at P then
holds the request's MTP slot too, and the main model's hidden streams (N, D) of position P - 1: the MTP entry of
position p takes the hidden streams of p and token p + 1, so at P the MTP ring holds the entries before P - 1, or
before P when the prompt went on (either way the ring slot of P - 1 is read by no query from P - 1 on but as that
entry). A request resuming from it takes n_cached = P, the MTP slot, and the hidden streams as the first of its
``h_prev`` (``mtp_len`` = P - 1): it writes the entry of P - 1 with token P at its first prefill chunk or draft,
and recomputes nothing (the MLA path re-feeds position P - 1 for its hidden state; here that would rewrite its
compressed entry in a shared block).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from flyer.config import ModelConfig
from flyer.errors import FieldError
from flyer.infer.hybrid_cache import HybridCache
from flyer.serve.paged import BlockAllocator


def hybrid_blocks_for_memory(cfg: ModelConfig, memory_bytes: int, block_size: int, n_slots: int,
                             dtype: torch.dtype, mtp: bool = False) -> int:
    """How many blocks (the null block included) ``memory_bytes`` holds once the ``n_slots`` slots' fixed state
    (``mtp``: the MTP pool's slots too) is taken from it: (memory - n_slots * slot bytes) // block bytes, from the
    caches' own tensors."""
    probe = HybridCache.paged(cfg, 1, 1, block_size, dtype, "meta")
    slot = probe.window_bytes() + (make_mtp_hybrid_cache(cfg, 1, dtype, "meta").window_bytes() if mtp else 0)
    return max(memory_bytes - n_slots * slot, 0) // probe.block_bytes()


def make_paged_hybrid_cache(cfg: ModelConfig, memory_bytes: int, block_size: int, n_slots: int, dtype: torch.dtype,
                            device=None, mtp: bool = False) -> tuple[HybridCache, int]:
    """(the pool, its block count (the null block included)): ``n_slots`` slots, then as many blocks of
    ``block_size`` tokens as the rest of ``memory_bytes`` holds (``mtp``: beside ``make_mtp_hybrid_cache``'s
    slots); ``FieldError`` naming ``kv_cache_bytes`` when that is fewer than 2."""
    n_blocks = hybrid_blocks_for_memory(cfg, memory_bytes, block_size, n_slots, dtype, mtp)
    if n_blocks < 2:
        raise FieldError("kv_cache_bytes", f"{memory_bytes} bytes hold {n_blocks} blocks of {block_size} tokens "
                                           f"beside {n_slots} requests' windows; at least 2 are needed")
    return HybridCache.paged(cfg, n_slots, n_blocks, block_size, dtype, device), n_blocks


def make_mtp_hybrid_cache(cfg: ModelConfig, n_slots: int, dtype: torch.dtype, device=None) -> HybridCache:
    """The MTP block's pool: ``n_slots`` slots of its one window-only layer (ratio 0: no entries, so no blocks but
    the one its shapes need), addressed through ``view`` with the main pool's slot ids."""
    return HybridCache(cfg, n_slots, 1, dtype, device, n_blocks=1, block_size=1, ratios=(0,))


class SlotAllocator:
    """Slot ids 0 .. n - 1 of a hybrid pool, one per running request."""

    def __init__(self, n: int):
        self.n = n
        self.free = list(range(n - 1, -1, -1))  # popped from the end: slot 0 first

    def take(self) -> int:
        if not self.free:  # the engine runs at most max_batch_size requests, one slot each
            raise RuntimeError(f"all {self.n} slots are taken")
        return self.free.pop()

    def give_back(self, slot: int) -> None:
        self.free.append(slot)

    @property
    def available(self) -> int:
        return len(self.free)


class BoundarySnapshots:
    """Slot states at prompts' block boundaries, kept in blocks of ``alloc`` (see the module docstring): a snapshot
    at P = j * block_size is keyed by the chain key of block j - 1, ``size`` blocks of ``cache`` hold it. With MTP
    speculation (``mtp``: the MTP pool, ``make_mtp_hybrid_cache``) it holds the request's MTP slot too and the main
    model's hidden streams of position P - 1 (``hidden``: their shape, one position's, and dtype)."""

    def __init__(self, cache: HybridCache, alloc: BlockAllocator, mtp: HybridCache | None = None,
                 hidden: tuple[tuple[int, ...], torch.dtype] | None = None):
        self.cache, self.alloc, self.mtp = cache, alloc, mtp
        if (mtp is None) != (hidden is None):
            raise ValueError("an MTP pool's snapshots need the hidden streams' shape and dtype, and only they do")
        self.hidden = hidden
        self.extra = (mtp.window_bytes() + math.prod(hidden[0]) * hidden[1].itemsize) if mtp is not None else 0
        self.size = -(-(cache.window_bytes() + self.extra) // cache.block_bytes())  # blocks per snapshot
        self.device = cache.layers[0]["window"].device
        self.blocks_of: dict[str, list[int]] = {}  # prefix key -> the blocks its snapshot lies in
        self.key_of: dict[int, str] = {}  # snapshot block -> its prefix key
        self.plans: dict[int, set[int]] = {}  # slot -> boundaries (in blocks) its request is to leave snapshots at
        alloc.on_evict = self._evicted

    def usable(self, blocks: list[int], keys: list[str], limit: int, on_disk: Callable[[int], bool] | None = None
               ) -> tuple[list[int], list[str], set[int]]:
        """``BlockAllocator.match``'s blocks and keys of a prompt (and those the on-disk tier added) cut to the
        deepest one with a snapshot (the rest released), and the boundaries its request is to leave snapshots at:
        where the match ended and ``limit`` (its full blocks before its last token), those past the cut.
        ``on_disk(j)``: whether the on-disk tier holds (and has read) the snapshot at j blocks, asked deepest first
        at the boundaries deeper than the deepest one here."""
        j = next((i for i in range(len(keys), 0, -1)
                  if keys[i - 1] in self.blocks_of or (on_disk is not None and on_disk(i))), 0)
        self.alloc.release(blocks[j:])
        return blocks[:j], keys[:j], {n for n in (len(blocks), limit) if n > j}

    def begin(self, slot: int, keys: list[str], plan: set[int]) -> torch.Tensor | None:
        """A request admitted into ``slot`` with the usable prefix ``keys``: the slot := the snapshot at its end
        (before any block is allocated: that may evict it); ``plan``: ``usable``'s boundaries. Returns, with MTP,
        the hidden streams of the prefix's last position (a copy), which with its next token write that
        position's MTP entry; else None. A prefix whose snapshot ``usable`` took from disk (none here) only sets
        the plan: the engine sets the slot from the file."""
        hidden = None
        if keys and keys[-1] in self.blocks_of:
            held = self.blocks_of[keys[-1]]
            rest = self.cache.load_slot(slot, torch.tensor(held, device=self.device))
            if self.mtp is not None:
                n = self.mtp.window_bytes()
                self.mtp.set_slot_bytes(slot, rest[:n])
                shape, dtype = self.hidden
                hidden = rest[n:self.extra].clone().view(dtype).view(shape)  # aligned for its dtype
            for b in held:  # recently used: evicted after older cached blocks
                self.alloc.lru.move_to_end(b)
        self.plans[slot] = plan
        return hidden

    def want(self, slot: int, boundary: int) -> None:
        """The request in ``slot`` is to leave a snapshot at ``boundary`` (blocks) too: a waiting request shares
        its prompt's blocks up to there (``Engine._sibling_prefilling``: a burst with a common system prompt)."""
        if slot in self.plans:
            self.plans[slot].add(boundary)

    def clip(self, slot: int, n_cached: int, n: int) -> int:
        """Prompt tokens the request in ``slot`` feeds from ``n_cached``: at most n, ending at its next boundary."""
        bs = self.alloc.block_size
        return min([n, *(b * bs - n_cached for b in self.plans.get(slot, ()) if b * bs > n_cached)])

    def reached(self, slot: int, n_cached: int, keys: list[str], hidden: torch.Tensor | None = None) -> int | None:
        """After a forward (``keys``: the request's full blocks' chain keys; ``hidden``: with MTP, the main hidden
        streams of position n_cached - 1): at one of its boundaries, the slot's state is saved under the key of
        the block before it. Returns that boundary (blocks; the slot holds its whole state: with MTP, ``hidden``
        given), which the on-disk tier stores too, else None. Not where the keys stop short of the boundary: with
        MTP a block is keyed once its MTP entries are written, which a plainly decoded row (its prompt's last
        token, left by its chunks) has not done yet."""
        plan, j = self.plans.get(slot), n_cached // self.alloc.block_size
        if plan and j in plan and n_cached % self.alloc.block_size == 0 and len(keys) >= j:
            plan.discard(j)
            self.save(keys[j - 1], slot, hidden)
            return j if self.mtp is None or hidden is not None else None
        return None

    def end(self, slot: int) -> None:
        """The request in ``slot`` left (finished, cancelled, preempted): no more snapshots from it."""
        self.plans.pop(slot, None)

    def save(self, key: str, slot: int, hidden: torch.Tensor | None = None) -> None:
        """Slot ``slot``'s state (with MTP: its MTP slot and ``hidden``, the main hidden streams of the boundary's
        last position) as the snapshot after the block keyed ``key`` (none while the pool has fewer than ``size``
        free or cached blocks: a snapshot never preempts a request; none with MTP but no ``hidden``)."""
        if key in self.blocks_of or self.alloc.available < self.size or (self.mtp is not None and hidden is None):
            return
        held = [self.alloc.allocate() for _ in range(self.size)]
        if key not in self.alloc.block_of:  # its prefix block was evicted for room: the snapshot would be unreachable
            self.alloc.release(held)
            return
        extra = () if self.mtp is None else \
            (self.mtp.slot_bytes(slot), hidden.to(self.hidden[1]).reshape(-1).view(torch.uint8))
        self.cache.save_slot(slot, torch.tensor(held, device=self.device), extra)
        for i, b in enumerate(held):
            self.alloc.register(b, f"snapshot {i} after {key}")
            self.key_of[b] = key
        self.blocks_of[key] = held
        self.alloc.release(held)  # unreferenced and keyed: cached in the LRU

    def _evicted(self, block: int, key: str) -> None:
        """A cached block left the index to be reused: one of a snapshot's (the others are freed) or the prefix
        block a snapshot follows (which no match reaches now). The snapshot's blocks are zeroed for the requests
        that take them (``HybridCache.clear_blocks``)."""
        held = self.blocks_of.pop(self.key_of.get(block, key), [])
        if held:
            self.cache.clear_blocks(torch.tensor(held, device=self.device))
        for b in held:
            del self.key_of[b]
            if b != block:
                self.alloc.forget(b)
