"""The serving engine's cache memory, built once from the model and ``EngineConfig``.

A pool is the main paged cache (``flyer.serve.paged``; DeepSeek-V4's blocks and per-request slots:
``flyer.serve.paged_hybrid``), its block allocator, the MTP module's cache under ``speculative="mtp"``,
and what prefix sharing adds: V4's snapshots of the slots at block boundaries and the on-disk tier
(``flyer.serve.disk_tier``). The engine (``flyer.serve.engine``) schedules requests over it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from flyer.errors import FieldError
from flyer.infer.cache_fp8 import check_fp8_cache_flags
from flyer.infer.hybrid_cache import mtp_hidden_spec
from flyer.infer.prefix_cache_hybrid import check_block_ratios
from flyer.model.transformer import Transformer
from flyer.serve.disk_tier import DiskTier
from flyer.serve.paged import BlockAllocator, blocks_for_memory, make_paged_cache
from flyer.serve.paged_hybrid import BoundarySnapshots, SlotAllocator, make_mtp_hybrid_cache, make_paged_hybrid_cache
from flyer.serve.request import EngineConfig


@dataclass
class CachePool:
    """``cache``: the main model's paged cache (``PagedCache``; V4's ``HybridCache.paged``);
    ``alloc``: its blocks; ``slots``: V4's per-request slots (None otherwise); ``mtp_cache``: the MTP
    module's (speculative; None otherwise); ``sharing``: whether full blocks are shared between requests;
    ``snapshots``: V4's slot states at block boundaries (sharing); ``disk``: the on-disk prefix tier."""

    cache: Any
    alloc: BlockAllocator
    hybrid: bool
    slots: SlotAllocator | None = None
    mtp_cache: Any = None
    sharing: bool = False
    snapshots: BoundarySnapshots | None = None
    disk: DiskTier | None = None


def build_pool(model: Transformer, cfg: EngineConfig, speculative: bool, device: torch.device) -> CachePool:
    """The pool ``cfg.kv_cache_bytes`` buys for ``model``: ``FieldError`` naming the field where it holds
    fewer than 2 blocks, or the settings disagree (an FP8 cache the model cannot use, V4 block ratios, an
    on-disk tier of another block size)."""
    mcfg = model.cfg
    check_fp8_cache_flags(mcfg, cfg.cache_dtype, "absorbed")
    hybrid = mcfg.attn == "hybrid"
    slots = None
    if hybrid:  # slots for max_batch_size requests, then blocks
        check_block_ratios(mcfg, cfg.block_size, "block_size")
        cache, n_blocks = make_paged_hybrid_cache(mcfg, cfg.kv_cache_bytes, cfg.block_size, cfg.max_batch_size,
                                                  cfg.cache_dtype, device, speculative)
        slots = SlotAllocator(cfg.max_batch_size)
    else:
        n_blocks = blocks_for_memory(mcfg, cfg.kv_cache_bytes, cfg.block_size, cfg.cache_dtype, speculative)
        if n_blocks < 2:
            raise FieldError("kv_cache_bytes", f"{cfg.kv_cache_bytes} bytes hold {n_blocks} blocks of "
                                               f"{cfg.block_size} tokens; at least 2 are needed")
        cache = make_paged_cache(mcfg, mcfg.n_layers, n_blocks, cfg.block_size, cfg.cache_dtype, device)
    if cfg.prefix_cache is not None and cfg.prefix_cache.block_size != cfg.block_size:
        raise FieldError("prefix_cache", f"holds blocks of {cfg.prefix_cache.block_size} tokens, the engine's are "
                                         f"{cfg.block_size} (open it with the engine's block_size)")
    pool = CachePool(cache, BlockAllocator(n_blocks, cfg.block_size), hybrid, slots)
    if speculative:  # V4: the MTP block's window in slots at the main slot ids; else entries on the main tables
        pool.mtp_cache = make_mtp_hybrid_cache(mcfg, cfg.max_batch_size, cfg.cache_dtype, device) if hybrid \
            else make_paged_cache(mcfg, 1, n_blocks, cfg.block_size, cfg.cache_dtype, device)
    pool.sharing = cfg.prefix_sharing and not (hybrid and cache.block_bytes() == 0)
    # V4: the slots' states at block boundaries, which a shared prefix needs besides its blocks; with MTP the
    # MTP slot's too and the main hidden streams of the boundary's last position (its MTP entry's input)
    hidden = mtp_hidden_spec(mcfg, model.embed.weight.dtype) if hybrid and speculative else None
    if pool.sharing and hybrid:
        pool.snapshots = BoundarySnapshots(cache, pool.alloc, pool.mtp_cache, hidden)
    if cfg.prefix_cache is not None and pool.sharing:  # the on-disk tier under the pool's sharing
        pool.disk = DiskTier(cfg.prefix_cache, cache, pool.alloc, pool.mtp_cache, hidden)
    return pool
