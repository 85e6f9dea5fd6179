"""The paged decode cache: every sequence's cache lives in fixed-size blocks of one shared pool.

Per layer and block, a block holds ``block_size`` tokens of what the model caches: for MLA the
latent and rope key ([c | k_rope], kv_lora_rank + rope channels per token) and, with DSA (V3.2),
the indexer key (``index_head_dim``) under the same block ids, for GQA per-KV-head keys and values.
A sequence owns a block table (its blocks in position order); position p lives in slot
``p % block_size`` of block ``table[p // block_size]``. ``PagedCache`` gives the decoder the
interface of ``flyer.infer.cache`` (write / read / read_packed) through the tables, so the
attention code (absorbed MLA, GQA) is the one ``flyer generate`` runs, reading gathered slots. An FP8 pool
(``--cache-dtype fp8``, ``flyer.infer.cache.Fp8LatentCache``) holds DeepSeek's 656-byte FP8 rows (V3) per token
and layer, with DSA its FP8 index keys (132 bytes; ``flyer.infer.indexer_fp8``): the pool quantizes what is
written; the fused CPU kernel reads its rows in place (``kernels.mla_decode``),
other reads dequantize what they gather.

``BlockAllocator`` keeps the free list and, for prefix sharing, the full blocks keyed by a chain
hash of their tokens (``flyer.infer.prefix_cache.chain_keys``): a new sequence whose prompt starts
with cached blocks takes them (reference-counted) instead of recomputing them; blocks nobody
references stay cached, least recently used first out, until a block is needed.

Block 0 is the null block: table padding points there, so right-padded rows of a batched
prefill write their padding into it and never into a live block. Attention masks it by position.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from flyer.config import ModelConfig
from flyer.infer.cache import make_cache
from flyer.infer.prefix_cache import chain_keys

NULL_BLOCK = 0


class PagedCache:
    """A decode cache over ``pool`` (a ``flyer.infer.cache`` cache shaped (L, n_blocks,
    block_size, ...)) addressed through ``tables`` (B, n) int64 block ids, set per step, or
    fixed in a ``view``."""

    def __init__(self, pool, tables: torch.Tensor | None = None, write_from: torch.Tensor | None = None):
        self.pool, self.kind = pool, pool.kind
        self.n_blocks, self.block_size = pool.batch, pool.max_len
        self.tables = torch.zeros(1, 1, dtype=torch.long) if tables is None else tables
        self.write_from = write_from
        self._slot_key: tuple = ()  # (positions, tables) tensors the cached slots were computed for
        self._slot_cache: torch.Tensor | None = None
        self._read_key: tuple = ()  # (n_slots, tables) the cached read index was computed for
        self._read_index: torch.Tensor | None = None
        self._span: tuple = ()  # (slots, tables, flat indices) of the last ``read_slots``

    def view(self, tables: torch.Tensor, write_from: torch.Tensor | None = None) -> PagedCache:
        """The same pool addressed through ``tables`` (one batch of a packed forward). ``write_from``
        (B,): row b's writes at positions below it go to the null block (positions recomputed in
        a shared block, whose entries are already there: a shared block is never written)."""
        return PagedCache(self.pool, tables, write_from)

    @property
    def dtype(self) -> torch.dtype:
        return self.pool.dtype

    @property
    def index_rotation(self) -> torch.Tensor | None:
        """The pool's (``flyer.infer.cache``): its DSA index keys are DeepSeek's FP8 ones where not None."""
        return self.pool.index_rotation

    def bytes_per_token(self) -> int:
        return self.pool.bytes_per_token()

    def _slots(self, pos_BT: torch.Tensor) -> torch.Tensor:
        """Flat slot index (B, T) of each position; positions past a row's table: the null block.
        Every layer of a forward writes the same positions: computed once per positions tensor."""
        if not (self._slot_key and self._slot_key[0] is pos_BT and self._slot_key[1] is self.tables):
            tables = F.pad(self.tables, (0, 1), value=NULL_BLOCK)
            blk = (pos_BT // self.block_size).clamp(max=tables.shape[1] - 1)
            self._slot_key = (pos_BT, self.tables)
            slots = tables.gather(1, blk) * self.block_size + pos_BT % self.block_size
            if self.write_from is not None:
                null = NULL_BLOCK * self.block_size + pos_BT % self.block_size
                slots = torch.where(pos_BT < self.write_from.view(-1, 1), null, slots)
            self._slot_cache = slots
        return self._slot_cache

    def write(self, layer: int, pos_BT: torch.Tensor, **values: torch.Tensor) -> None:
        """Store ``values[name]`` (B, T, ...) of ``layer`` at positions ``pos_BT`` (B, T)."""
        slots = self._slots(pos_BT)
        for name, v in self.pool.encode(values).items():  # an FP8 pool: quantized rows (``Fp8LatentCache``)
            self.pool.flat_storage(name, layer)[slots] = v  # (B, T) slots take (B, T, ...) rows: no reshapes

    def _gather(self, name: str, layer: int, n_slots: int) -> torch.Tensor:
        """(B, n_slots, ...): slots [0, n_slots) of every row of the pool's ``name`` entry of ``layer``, one
        index op on its flat view through flat slot indices made once per forward (every layer reads the same)."""
        if not (self._read_key and self._read_key[0] == n_slots and self._read_key[1] is self.tables):
            if self.tables.shape[1] * self.block_size < n_slots:
                raise ValueError(f"block tables cover {self.tables.shape[1] * self.block_size} slots, need {n_slots}")
            s = torch.arange(n_slots, device=self.tables.device)
            self._read_index = self.tables[:, s // self.block_size] * self.block_size + s % self.block_size
            self._read_key = (n_slots, self.tables)
        return self.pool.flat_storage(name, layer)[self._read_index]

    def blocks(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(``layer``'s pool (n_blocks, block_size, kv_lora_rank + rope) of an MLA pool, the tables
        (B, n)): what a kernel needs to read each row's slots in place (``kernels.mla_decode``)."""
        return self.pool.packed[layer], self.tables

    def index_key_blocks(self, row: int, name: str = "index_key") -> tuple[torch.Tensor, torch.Tensor]:
        """(indexer row ``row``'s keys (n_blocks, block_size, index_head_dim) of a DSA pool, or with ``name``
        "index_key_scale" an FP8 pool's key scales (n_blocks, block_size, 1), the tables (B, n)): what
        ``kernels.index_scores`` reads each row's slots through, in place."""
        return self.pool.tensors[name][row], self.tables

    def read_packed(self, layer: int, n_slots: int, dtype: torch.dtype) -> torch.Tensor:
        """(B, n_slots, kv_lora_rank + rope) of an MLA pool, in ``dtype`` (an FP8 pool's rows dequantized)."""
        return self.pool.decode_packed(self._gather("packed", layer, n_slots), dtype)

    def gather_packed(self, layer: int, slots_BTk: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, T, k, kv_lora_rank + rope) of an MLA pool in ``dtype``: row b's slot ``slots[b, t, j]`` (int64;
        DSA's selected slots per query) read through its block table, k per query, not every slot."""
        flat = self.flat_slots(slots_BTk).view(-1)
        return self.pool.decode_packed(self.pool.flat_storage("packed", layer).index_select(0, flat)
                                       .view(*slots_BTk.shape, -1), dtype)

    def read(self, layer: int, name: str, n_slots: int, dtype: torch.dtype, heads_first: bool = False) -> torch.Tensor:
        t = self._gather(name, layer, n_slots)
        return (t.transpose(1, 2) if heads_first else t).to(dtype)

    def read_slots(self, layer: int, name: str, slots_BS: torch.Tensor, dtype: torch.dtype,
                   heads_first: bool = False) -> torch.Tensor:
        """``read`` of row b's slots ``slots_BS[b]`` (a sliding layer's span, ``flyer.infer.attention.Rows``), through
        the tables: the blocks given back behind a window are never read. A slot past the tables reads their last
        block (the caller masks it). The flat indices are made once per forward, every layer reading the same."""
        if not (self._span and self._span[0] is slots_BS and self._span[1] is self.tables):
            self._span = (slots_BS, self.tables, self.flat_slots(slots_BS))
        t = self.pool.flat_storage(name, layer)[self._span[2]]
        return (t.transpose(1, 2) if heads_first else t).to(dtype)

    def flat_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """Row b's slots ``slots[b, ...]`` (int64) as the pool's ``flat_storage`` indices through its block table
        (block * block_size + slot % block_size); a slot past the table names a slot of its last block."""
        bs = self.block_size
        blk = self.tables.gather(1, (slots // bs).flatten(1).clamp(max=self.tables.shape[1] - 1)).view_as(slots)
        return blk * bs + slots % bs


def make_paged_cache(cfg: ModelConfig, n_layers: int, n_blocks: int, block_size: int, dtype: torch.dtype,
                     device=None) -> PagedCache:
    """A pool of ``n_blocks`` blocks (the null block included) in the absorbed (MLA) or GQA layout."""
    return PagedCache(make_cache(cfg, n_layers, n_blocks, block_size, "absorbed", dtype, device))


def blocks_for_memory(cfg: ModelConfig, memory_bytes: int, block_size: int, dtype: torch.dtype,
                      with_mtp: bool = False) -> int:
    """How many blocks (the null block included) ``memory_bytes`` holds: the main model's cache
    (plus the MTP module's one layer) at ``block_size`` tokens each, from the cache's own tensors."""
    probe = make_cache(cfg, cfg.n_layers + int(with_mtp), 1, 1, "absorbed", dtype, "meta")
    return memory_bytes // (probe.bytes_per_token() * block_size)


class BlockAllocator:
    """Block ids 1 .. n_blocks - 1: a free list, reference counts, and the prefix index (chain
    key -> block) with an LRU of cached blocks nobody references."""

    def __init__(self, n_blocks: int, block_size: int):
        if n_blocks < 2:
            raise ValueError(f"a paged cache needs at least 2 blocks (the null block and one more), got {n_blocks}")
        self.n_blocks, self.block_size = n_blocks, block_size
        self.free: deque[int] = deque(range(1, n_blocks))
        self.refs = [0] * n_blocks
        self.key_of: dict[int, str] = {}
        self.block_of: dict[str, int] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first
        self.lookups = self.hits = 0  # prefix blocks looked up / found
        # hears (block, key) when a cached block leaves the index to be reused (DeepSeek-V4's boundary snapshots)
        self.on_evict: Callable[[int, str], None] | None = None

    @property
    def capacity(self) -> int:
        """Blocks a sequence can ever use (all but the null block)."""
        return self.n_blocks - 1

    @property
    def available(self) -> int:
        """Blocks an allocation can take now: free ones and cached ones nobody references."""
        return len(self.free) + len(self.lru)

    @property
    def used(self) -> int:
        return self.capacity - self.available

    def allocate(self) -> int | None:
        """A block with reference count 1 (a free one, else the least recently used cached one,
        dropped from the prefix index); None when every block is referenced."""
        if self.free:
            b = self.free.popleft()
        elif self.lru:
            b, _ = self.lru.popitem(last=False)
            key = self.key_of.pop(b)
            del self.block_of[key]
            if self.on_evict is not None:
                self.on_evict(b, key)
        else:
            return None
        self.refs[b] = 1
        return b

    def forget(self, block: int) -> None:
        """Drop ``block``'s key from the index; unreferenced, it is free at once (not cached)."""
        key = self.key_of.pop(block, None)
        if key is not None:
            del self.block_of[key]
            if block in self.lru:  # cached, unreferenced
                del self.lru[block]
                self.free.append(block)

    def release(self, blocks: Sequence[int], evict_first: bool = False) -> None:
        """Drop one reference to each block of a table; unreferenced blocks stay cached when keyed, else free. Last
        block first: a chain is found from its head, so its tail is the first to go when memory is needed (its head
        first would leave the rest cached and unreachable). ``evict_first``: blocks given back behind a sliding window
        (a chain's leading ones, a few at a time) are evicted before any other cached block, the deepest first (a
        call's before those of the calls before it), so the chain's head stays cached the longest and a row longer
        than the pool does not flush other prompts' cached blocks."""
        for b in (blocks if evict_first else reversed(blocks)):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self.key_of:
                    self.lru[b] = None
                    if evict_first:
                        self.lru.move_to_end(b, last=False)
                else:
                    self.free.append(b)

    def reorder(self, keys: Sequence[str]) -> None:
        """The cached, unreferenced blocks of a chain's ``keys`` (leading blocks) made the newest, its head last: at
        a request's end, the blocks it gave back behind its window (``evict_first``) join its tail's order, and the
        chain leaves the cache tail first, as one released at once."""
        for key in reversed(keys):
            b = self.block_of.get(key)
            if b is not None and b in self.lru:
                self.lru.move_to_end(b)

    def match(self, tokens: Sequence[int], max_blocks: int) -> tuple[list[int], list[str]]:
        """Cached blocks holding the leading full blocks of ``tokens`` (at most ``max_blocks``),
        each with one more reference, and their chain keys."""
        blocks, keys = [], []
        for key in chain_keys(tokens, self.block_size, n_blocks=max_blocks):
            self.lookups += 1
            b = self.block_of.get(key)
            if b is None:
                break
            self.hits += 1
            if self.refs[b] == 0:
                del self.lru[b]
            self.refs[b] += 1
            blocks.append(b)
            keys.append(key)
        return blocks, keys

    def register(self, block: int, key: str) -> bool:
        """Key a full block so later prompts can share it (a key another block already holds
        stays with that one); whether it was keyed now."""
        if key not in self.block_of and block not in self.key_of:
            self.block_of[key], self.key_of[block] = block, key
            return True
        return False

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0
