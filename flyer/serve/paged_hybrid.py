"""The paged cache of DeepSeek-V4 (attn "hybrid") for the serving engine: slots for what is fixed per sequence,
blocks for what grows.

A hybrid layer keeps per sequence (``flyer.infer.hybrid_cache``) the ring of its last ``window_size`` keys and
its compressors' (and CSA's indexer's) unfinished-window states: a fixed size whatever the length. These live in
one of ``max_batch_size`` SLOTS, taken when a request is admitted and given back when it finishes, is cancelled
or is preempted (a recomputed request restarts from position 0, where it reads nothing of the slot it did not
write: window slots and compressor slots before position 0 are masked). The completed compressed entries (and
CSA's indexer keys) grow with the sequence and live in the engine's BLOCKS: a block of ``block_size`` tokens
holds, for each compressed layer of ratio r, ``block_size // r`` entries, through the same block tables,
``BlockAllocator`` and preemption as the MLA pool (``flyer.serve.paged``); block 0 stays the null block, read
by table padding (masked) and never written (only a row's completed entries are).

The attention is ``flyer.infer.hybrid_cache.hybrid_attention`` on a ``HybridCache.view`` of the pool per batch.
A block's entries could be shared, but the window and partial states at its boundary are not in it, so a
shared prefix would still be computed: the engine does not share hybrid blocks (no prefix sharing, no on-disk
prefix cache), and MTP speculation has no hybrid cache yet.
"""

from __future__ import annotations

import torch

from flyer.config import ModelConfig
from flyer.errors import FieldError
from flyer.infer.hybrid_cache import HybridCache


def check_hybrid_serving(cfg: ModelConfig, block_size: int, speculative: str | None, prefix_cache: object) -> None:
    """``FieldError`` for what the hybrid pool cannot take: a ``block_size`` that some compressed layer's ratio
    does not divide, ``speculative`` or an on-disk ``prefix_cache``."""
    ratios = sorted({r for r in cfg.compress_ratios[:cfg.n_layers] if r > 0})
    if any(block_size % r for r in ratios):
        raise FieldError("block_size", f"must be a multiple of every compression ratio {ratios} of DeepSeek-V4's "
                                       f"hybrid attention (got {block_size})")
    for name, value in (("speculative", speculative), ("prefix_cache", prefix_cache)):
        if value is not None:
            raise FieldError(name, "not available for DeepSeek-V4's hybrid attention yet (its cache keeps windows "
                                   "and compressed entries, not per-token slots)")


def hybrid_blocks_for_memory(cfg: ModelConfig, memory_bytes: int, block_size: int, n_slots: int,
                             dtype: torch.dtype) -> int:
    """How many blocks (the null block included) ``memory_bytes`` holds once the ``n_slots`` slots' fixed state
    is taken from it: (memory - n_slots * slot bytes) // block bytes, from the cache's own tensors."""
    probe = HybridCache.paged(cfg, 1, 1, block_size, dtype, "meta")
    return max(memory_bytes - n_slots * probe.window_bytes(), 0) // probe.block_bytes()


def make_paged_hybrid_cache(cfg: ModelConfig, memory_bytes: int, block_size: int, n_slots: int, dtype: torch.dtype,
                            device=None) -> tuple[HybridCache, int]:
    """(the pool, its block count (the null block included)): ``n_slots`` slots, then as many blocks of
    ``block_size`` tokens as the rest of ``memory_bytes`` holds; ``FieldError`` naming ``kv_cache_bytes`` when
    that is fewer than 2."""
    n_blocks = hybrid_blocks_for_memory(cfg, memory_bytes, block_size, n_slots, dtype)
    if n_blocks < 2:
        raise FieldError("kv_cache_bytes", f"{memory_bytes} bytes hold {n_blocks} blocks of {block_size} tokens "
                                           f"beside {n_slots} requests' windows; at least 2 are needed")
    return HybridCache.paged(cfg, n_slots, n_blocks, block_size, dtype, device), n_blocks


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
