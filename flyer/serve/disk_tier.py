"""The on-disk prefix cache under the serving engine's paged pool (``EngineConfig.prefix_cache``): the second tier
of prefix sharing, in ``flyer generate --prefix-cache``'s files (``flyer.infer.prefix_cache``), so a directory
either command wrote serves the other at the same model, cache dtype and block size, whichever MTP setting.

- MLA family: a file holds one pool block of every layer's cache, and with MTP speculation the MTP cache's slots
  of the positions its chain key covers (``flyer.serve.speculation.mtp_slots``: an engine without speculation
  leaves them out of what it reads and writes; one with it finds a file without them a miss, recomputes the block
  and overwrites the file with them: its MTP entries need the main model's hidden states of every position
  before, a whole prefill); an FP8 pool's (``--cache-dtype fp8``) as its rows are, codes, scales and rope values
  copied bit for bit (``flyer.infer.cache_fp8``);
- DeepSeek-V4 (``flyer.infer.prefix_cache_hybrid``): a file holds one block's compressed entries; the slot state at
  a block boundary is a SNAPSHOT file (with MTP: the MTP slot and the hidden streams of the boundary's last
  position, which an engine without speculation leaves out, and one with it needs), read where
  ``flyer.serve.paged_hybrid.BoundarySnapshots.usable`` finds no deeper one in memory and
  written where it takes one (``reached``).

Admission continues a prompt's in-memory match with its blocks on disk (``extend``: loaded into new pool blocks,
keyed for sharing as computed ones are); full prompt blocks, and V4's snapshots, are written as they are registered
(``store``). Only prompt blocks are stored: generated tokens are one request's.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from flyer.infer.generate import open_prefix_cache
from flyer.infer.hybrid_cache import HybridCache
from flyer.infer.prefix_cache import PrefixCache, chain_keys
from flyer.infer.prefix_cache_hybrid import (block_entries, check_block_ratios, load_snapshot, put_block, read_block,
                                             set_snapshot, snapshot_expect, store_snapshot)
from flyer.model.transformer import Transformer
from flyer.serve.paged import NULL_BLOCK, BlockAllocator, PagedCache
from flyer.serve.speculation import mtp_slots


def open_disk_prefix_cache(model: Transformer, root, cache_dtype: torch.dtype, block_size: int,
                           max_bytes: int = 1 << 30) -> PrefixCache:
    """The on-disk prefix cache under the paged one: blocks of ``block_size`` tokens keyed to this
    model, layout and dtype. Its entries hold the main model's cache, and from an engine with
    ``speculative="mtp"`` the MTP module's too, so they are the ones ``flyer generate
    --prefix-cache`` writes at the same block size, whichever MTP setting either has. DeepSeek-V4:
    ``FieldError`` naming ``block_size`` unless every compression ratio divides it (the pool's blocks)."""
    if model.cfg.attn == "hybrid":
        check_block_ratios(model.cfg, block_size, "block_size")
    return open_prefix_cache(model, root, cache_dtype=cache_dtype, block_size=block_size, max_bytes=max_bytes)


class DiskTier:
    """``pc`` under the pool ``cache`` (a ``PagedCache``, or V4's ``HybridCache``) whose blocks ``alloc`` hands out;
    ``mtp_cache``: the MTP pool under speculation (MLA: paged entries on the same tables; V4: slots); ``hidden``:
    V4 with MTP, the (shape, dtype) of one position's main hidden streams, which its snapshots keep."""

    def __init__(self, pc: PrefixCache, cache: PagedCache | HybridCache, alloc: BlockAllocator,
                 mtp_cache: PagedCache | HybridCache | None = None,
                 hidden: tuple[tuple[int, ...], torch.dtype] | None = None):
        self.pc, self.cache, self.alloc, self.mtp_cache = pc, cache, alloc, mtp_cache
        self.bs = alloc.block_size
        self.hybrid = isinstance(cache, HybridCache)
        # what a V4 snapshot file holds (the same names and shapes as ``flyer generate``'s)
        self.snapshot = snapshot_expect(cache, mtp_cache, hidden) if self.hybrid else None

    def extend(self, tokens: Sequence[int], blocks: list[int], keys: list[str], behind: Callable[[int], int],
               most: int) -> None:
        """Extend the shared blocks ``blocks`` (with their in-memory ``keys``) of a prompt ``tokens`` with the blocks
        on disk, while the pool has room for what the request may still take (the rest of the prompt, and no more
        than ``most``, the most blocks it holds at once); each is keyed for sharing as a computed one is. At most the
        full blocks before the last token (its logits pick the next token). ``behind(n)`` leading blocks, wholly
        behind position n's window (0 but where every layer slides), are given back as it goes (``NULL_BLOCK`` in
        ``blocks``; still cached)."""
        bs = self.bs
        limit = (len(tokens) - 1) // bs
        if len(blocks) >= limit:
            return
        disk_keys = self.pc.block_keys(tokens[:limit * bs])
        mem_keys = chain_keys(tokens, bs, n_blocks=limit)
        gone = 0  # leading entries given back
        for i in range(len(blocks), limit):
            rest = math.ceil(len(tokens) / bs) - len(blocks)
            if self.alloc.available < min(rest, most - (len(blocks) - gone)):
                return
            blk = self._read(disk_keys[i], tokens[i * bs:(i + 1) * bs], i)
            if blk is None:
                return
            b = self.alloc.allocate()
            self._put(b, i, blk)
            self.alloc.register(b, mem_keys[i])
            blocks.append(b)
            keys.append(mem_keys[i])
            end = behind(len(blocks) * bs)
            if end > gone:
                self.alloc.release([x for x in blocks[gone:end] if x != NULL_BLOCK], evict_first=True)
                blocks[gone:end] = [NULL_BLOCK] * (end - gone)
                gone = end

    def snapshot_files(self, tokens: Sequence[int], found: dict) -> Callable[[int], bool]:
        """DeepSeek-V4: ``BoundarySnapshots.usable``'s ``on_disk`` for a prompt ``tokens``, which reads the snapshot
        file at j blocks into ``found[j]`` (None: none there)."""
        bs = self.bs
        disk_keys = self.pc.block_keys(tokens[:(len(tokens) - 1) // bs * bs])

        def on_disk(j: int) -> bool:
            found[j] = load_snapshot(self.pc, disk_keys, tokens, j * bs, self.snapshot)
            return found[j] is not None
        return on_disk

    def resume(self, slot: int, snap: dict[str, torch.Tensor], tokens_from_disk: int) -> torch.Tensor | None:
        """DeepSeek-V4: slot ``slot`` (and its MTP slot) := the snapshot file ``snap`` read; counts the
        ``tokens_from_disk`` it resumes past the in-memory match. Returns, with MTP, the hidden streams of the
        boundary's last position on the pool's device."""
        hidden = set_snapshot(self.cache, slot, snap, self.mtp_cache)
        self.pc.stats.tokens_loaded += tokens_from_disk
        return None if hidden is None else hidden.to(self.cache.layers[0]["window"].device)

    def store(self, tokens: Sequence[int], n_prompt: int, blocks: list[int], slot: int | None, first: int, end: int,
              at: int | None = None, hidden: torch.Tensor | None = None) -> None:
        """Write full prompt blocks [first, end) of a request (``tokens``, its first ``n_prompt`` the prompt's, in
        pool ``blocks``) and, V4, the snapshot of its ``slot`` at boundary ``at`` (blocks; ``hidden``: with MTP, the
        main hidden streams of its last position), which ``BoundarySnapshots.reached`` just took in memory."""
        pc, bs = self.pc, self.bs
        end = min(end, n_prompt // bs)
        at = at if at is not None and at <= n_prompt // bs else None  # as blocks: the prompt's only
        if first >= end and at is None:
            return
        disk_keys = pc.block_keys(tokens[:max(end, at or 0) * bs])
        for i in range(first, end):
            pc.store(disk_keys[i], tokens[i * bs:(i + 1) * bs], self._tensors(blocks[i], i))
        if at is not None:
            store_snapshot(pc, disk_keys, tokens, at * bs, self.cache, slot, self.mtp_cache,
                           None if hidden is None else hidden.to(self.snapshot["mtp.hidden"][1]))
        if end == n_prompt // bs and first < end:  # the prompt's last full block: its chain, the head most recent
            pc.touch(disk_keys[:end])
        pc.evict()

    def _mtp_pool(self) -> dict[str, torch.Tensor]:
        """MLA under speculation: the MTP cache's pool tensors (V4's MTP slots go with its snapshots)."""
        return self.mtp_cache.pool.tensors if self.mtp_cache is not None and not self.hybrid else {}

    def _read(self, key: str, tokens: Sequence[int], i: int) -> dict[str, torch.Tensor] | None:
        """Block i of a prompt from disk (``key``, ``tokens``: its own), or None."""
        if self.hybrid:  # the entries of its compressed layers (the MTP block completes none)
            return read_block(self.pc, key, tokens, self.cache)
        expect = {k: ((t.shape[0], self.bs, *t.shape[3:]), t.dtype) for k, t in self.cache.pool.tensors.items()}
        span = mtp_slots(i, self.bs)
        expect.update({f"mtp.{k}": ((1, span.stop - span.start, *t.shape[3:]), t.dtype)
                       for k, t in self._mtp_pool().items()})
        return self.pc.load(key, tokens, expect)

    def _put(self, b: int, i: int, blk: dict[str, torch.Tensor]) -> None:
        """Pool block b := block i of a prompt as ``_read`` read it."""
        if self.hybrid:
            put_block(self.cache, b, 0, self.bs, blk)
            return
        for k, t in self.cache.pool.tensors.items():
            t[:, b] = blk[k].to(t.device)
        for k, t in self._mtp_pool().items():
            t[:, b, mtp_slots(i, self.bs)] = blk[f"mtp.{k}"].to(t.device)

    def _tensors(self, b: int, i: int) -> dict[str, torch.Tensor]:
        """Pool block b, block i of a prompt, as a file stores it."""
        if self.hybrid:
            return block_entries(self.cache, b, 0, self.bs)
        blk = {k: t[:, b] for k, t in self.cache.pool.tensors.items()}
        blk.update({f"mtp.{k}": t[:, b, mtp_slots(i, self.bs)] for k, t in self._mtp_pool().items()})
        return blk
