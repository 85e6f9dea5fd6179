"""The on-disk prefix cache (``flyer.infer.prefix_cache``) for DeepSeek-V4's hybrid cache (attn "hybrid"): what a
block file and a SNAPSHOT file hold, the lookup that resumes a prompt from them, and where a prompt leaves snapshots.

A hybrid layer keeps per sequence (``flyer.infer.hybrid_cache``) a fixed-size state (its window ring, the
compressor's and CSA indexer's rings of unfinished windows) and the completed compressed entries (CSA: and index
keys), ``n // r`` per block of n tokens for a layer of ratio r. On disk, as ``flyer.serve.paged_hybrid`` keeps them
in memory:

- block i's file (chain key key_i) holds the entries of positions [i n, (i + 1) n) of every compressed layer,
  "{layer}.entries" (n // r, d) and "{layer}.index_keys" (n // r, index_head_dim) (an FP8 cache's: its uint8 rows,
  ``flyer.infer.hybrid_fp8`` and ``flyer.infer.hybrid_index_fp4``, as they are); n must be a multiple of every
  ratio (``check_block_ratios``, a ``FieldError`` naming the caller's field: ``prefix_block``, ``block_size``);
- the fixed state at a boundary P = j n is a SNAPSHOT: one more file of the same cache, keyed
  ``snapshot_key(key_{j-1})`` (so ownership, atomic writes, checksums and LRU eviction are the blocks'), holding
  every layer's rings "{layer}.{name}" (each (S, C), the slot's tensors). With the MTP module's cache (``mtp``): its
  window ring "mtp.0.window" and the main model's hidden state at P - 1, "mtp.hidden" (the residual streams
  (hc_mult, dim)): the MTP entry of position P - 1 needs token P, which key_{j-1} does not name, so the snapshot
  holds the MTP cache of positions < P - 1 and the prefill that resumes computes entry P - 1 from that hidden
  state and its own token P;
- the rings hold position p in slot p % S and a prefill to P writes exactly the positions < P, and P is a multiple
  of every ratio, so every entry before P is complete: the j blocks and the snapshot are all the state at P.

Lookup (``resume``): the prompt's leading blocks until the first miss are loaded, then the snapshot at the deepest
of their boundaries that has one (deepest first; only boundaries before the prompt's last token, which a prefill
needs to compute); the blocks past it are recomputed. Each file read counts as a lookup in ``PrefixCache.stats``
(blocks and snapshots alike); ``tokens_loaded`` counts the tokens resumed from, P.

Where a prompt leaves snapshots (``Resume.cuts``), as the serving pool chooses: at its last full block before its
last token (a repeat, another sample, the next turn of a conversation resumes there), and where its blocks on disk
ended when no snapshot reached that far (it forks from a cached prompt there: the common system prompt of the
prompts after it). ``flyer.infer.generate`` cuts the prefill at each (one more forward chunk each) and stores the
snapshot as the cut is reached, so a prompt resuming at P repeats the storing run's chunks after P and computes
its outputs bit for bit.

``flyer serve`` reads and writes the same files (``flyer.serve.disk_tier``: one format, a directory either command
wrote serves the other at the same model, dtype and block size): a pool block holds a whole block's entries
(``block_entries`` at lo 0: ``read_block``, ``put_block``), a request's slot takes a snapshot (``load_snapshot``,
``set_snapshot``) and leaves one where ``flyer.serve.paged_hybrid.BoundarySnapshots`` leaves its in-memory ones.

Either MTP setting: blocks hold no MTP part; a reader without MTP leaves a snapshot's MTP part out, and one that
drafts finds a snapshot without it a miss (its MTP window needs the main hidden states of the positions before, a
whole prefill) and falls back to an earlier one, then leaves the snapshot again with its MTP part.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import torch

from flyer.config import ModelConfig
from flyer.errors import FieldError
from flyer.infer.hybrid_cache import ENTRY_NAMES, HybridCache
from flyer.infer.prefix_cache import MTP_PREFIX, PrefixCache

SNAPSHOT_FORMAT = 1  # in the fingerprint: a change of what a snapshot holds makes old files miss
Expect = dict[str, tuple[tuple[int, ...], torch.dtype]]


def check_block_ratios(cfg: ModelConfig, block_size: int, field_name: str) -> None:
    """``FieldError`` naming ``field_name`` (``prefix_block`` in ``flyer generate``, ``block_size`` in ``flyer serve``)
    unless every compressed layer's ratio divides ``block_size`` (a block holds whole entries)."""
    ratios = sorted({r for r in cfg.compress_ratios[:cfg.n_layers] if r > 0})
    if any(block_size % r for r in ratios):
        raise FieldError(field_name, f"must be a multiple of every compression ratio {ratios} of DeepSeek-V4's hybrid "
                                f"attention (got {block_size})")


def hybrid_layout(cfg: ModelConfig) -> dict:
    """The cache layout a fingerprint names (``flyer.infer.prefix_cache.model_fingerprint``'s extra): files of
    another layout (MLA's latents, other ratios or window) never match."""
    return {"layout": "hybrid", "ratios": list(cfg.compress_ratios[:cfg.n_layers]), "window": cfg.window_size,
            "index_head_dim": cfg.index_head_dim, "snapshot_format": SNAPSHOT_FORMAT}


def snapshot_key(block_key: str) -> str:
    """The key of the snapshot at the end of the block keyed ``block_key`` (a file name like a block's)."""
    return hashlib.sha256(block_key.encode() + b"snapshot").hexdigest()


def block_entries(cache: HybridCache, block: int, lo: int, n: int) -> dict[str, torch.Tensor]:
    """Views of the entries (and index keys) of tokens [lo, lo + n) held in entry block ``block`` of ``cache``, per
    compressed layer: "{layer}.{name}" (n // r, C). ``flyer generate``'s cache: block b is row b's, ``lo`` = i n;
    a paged pool: its block of ``block_size`` = n tokens, ``lo`` = 0."""
    return {f"{i}.{name}": state[name][block, lo // r:(lo + n) // r]
            for i, (state, r) in enumerate(zip(cache.layers, cache.ratios)) for name in ENTRY_NAMES if name in state}


def slot_state(cache: HybridCache, slot: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """Views of slot ``slot``'s fixed state (every layer's window and rings), "{prefix}{layer}.{name}" (S, C)."""
    return {f"{prefix}{i}.{name}": t[slot] for i, state in enumerate(cache.layers) for name, t in state.items()
            if name not in ENTRY_NAMES}


def _expect(views: dict[str, torch.Tensor]) -> Expect:
    return {k: (tuple(v.shape), v.dtype) for k, v in views.items()}


def _snapshot_views(cache: HybridCache, slot: int, mtp_cache: HybridCache | None) -> dict[str, torch.Tensor]:
    views = slot_state(cache, slot)
    if mtp_cache is not None:
        views.update(slot_state(mtp_cache, slot, "mtp."))
    return views


def snapshot_expect(cache: HybridCache, mtp_cache: HybridCache | None = None,
                    hidden: tuple[tuple[int, ...], torch.dtype] | None = None) -> Expect:
    """What a snapshot file of ``cache`` (and ``mtp_cache``, with ``hidden``: the (shape, dtype) of one position's
    main hidden state) holds: name -> (shape, dtype), for ``load_snapshot``."""
    expect = _expect(_snapshot_views(cache, 0, mtp_cache))
    return expect | ({"mtp.hidden": hidden} if mtp_cache is not None else {})


def read_block(pc: PrefixCache, key: str, tokens: Sequence[int], cache: HybridCache) -> dict[str, torch.Tensor] | None:
    """Block file ``key`` (``tokens``: the block's) as ``block_entries`` names one block of ``cache`` (each
    (n // r, C)), or None (a miss, corrupt, mismatched: counted); its tokens are not counted as loaded."""
    return pc.load(key, tokens, _expect(block_entries(cache, 0, 0, pc.block_size)), count_tokens=False)


def put_block(cache: HybridCache, block: int, lo: int, n: int, blk: dict[str, torch.Tensor]) -> None:
    """Tokens [lo, lo + n) of entry block ``block`` of ``cache`` (``block_entries``) := ``read_block``'s ``blk``."""
    for k, v in block_entries(cache, block, lo, n).items():
        v.copy_(blk[k])


def load_snapshot(pc: PrefixCache, keys: Sequence[str], prompt: Sequence[int], at: int,
                  expect: Expect, need_mtp: bool = True) -> dict[str, torch.Tensor] | None:
    """The snapshot file at boundary ``at`` (tokens) of ``prompt`` (``keys``: its block keys), or None (a miss,
    corrupt, mismatched: counted); ``expect``: ``snapshot_expect``'s. ``need_mtp`` False: its MTP part is taken
    where the file has one (a file without is a hit too)."""
    n = pc.block_size
    optional = {} if need_mtp else {k: v for k, v in expect.items() if k.startswith(MTP_PREFIX)}
    expect = {k: v for k, v in expect.items() if k not in optional}
    return pc.load(snapshot_key(keys[at // n - 1]), prompt[at - n:at], expect, count_tokens=False, optional=optional)


def set_snapshot(cache: HybridCache, slot: int, snap: dict[str, torch.Tensor],
                 mtp_cache: HybridCache | None = None) -> torch.Tensor | None:
    """Slot ``slot`` of ``cache`` (and of ``mtp_cache``, where ``snap`` has its part) := the snapshot ``snap``
    (``load_snapshot``'s); returns its main hidden state at the boundary's last position ("mtp.hidden"; None
    without an MTP cache or part)."""
    mtp_cache = mtp_cache if "mtp.hidden" in snap else None
    for k, v in _snapshot_views(cache, slot, mtp_cache).items():
        v.copy_(snap[k])
    return snap.get("mtp.hidden") if mtp_cache is not None else None


@dataclass
class Resume:
    """Where a prompt's prefill starts after ``resume``: at ``tokens`` (P, a boundary; 0: nothing used), with the
    main hidden state at P - 1 for the MTP cache (``hidden``; None without one, or at 0); ``found``: its leading
    blocks on disk; ``cuts``: the boundaries past P (in tokens) where its prefill is to leave a snapshot; ``mtp``:
    whether the MTP cache holds the state at P (False: resumed from a snapshot without its MTP part, so the
    snapshots it leaves are to go without theirs)."""

    tokens: int = 0
    found: int = 0
    hidden: torch.Tensor | None = None
    cuts: list[int] = field(default_factory=list)
    mtp: bool = True


def resume(pc: PrefixCache, keys: Sequence[str], prompt: Sequence[int], cache: HybridCache, slot: int,
           mtp_cache: HybridCache | None = None, hidden: tuple[tuple[int, ...], torch.dtype] | None = None,
           need_mtp: bool = True) -> Resume:
    """Load ``prompt``'s cached state into entry block and slot ``slot`` of ``cache`` (and of ``mtp_cache``, with
    ``hidden``: the (shape, dtype) of one position's main hidden state): its leading blocks, then the deepest snapshot
    among their boundaries (module docstring); ``need_mtp`` False: one without the MTP part too. ``keys``:
    ``pc.block_keys(prompt)``. Loaded blocks past the snapshot's boundary are left in the cache (the prefill
    recomputes their positions)."""
    n = pc.block_size
    found = 0
    while found < len(keys) and (blk := read_block(pc, keys[found], prompt[found * n:(found + 1) * n],
                                                   cache)) is not None:
        put_block(cache, slot, found * n, n, blk)
        found += 1
    last = (len(prompt) - 1) // n  # the deepest boundary with a prompt token after it
    expect = snapshot_expect(cache, mtp_cache, hidden)
    j, snap = min(found, last), None
    while j > 0 and (snap := load_snapshot(pc, keys, prompt, j * n, expect, need_mtp)) is None:
        j -= 1
    got = None
    if snap is not None:
        got = set_snapshot(cache, slot, snap, mtp_cache)
        pc.stats.tokens_loaded += j * n
    at = {b for b in (found, last) if j < b <= last}  # a prompt ending on a boundary: no snapshot at its end
    return Resume(j * n, found, got, sorted(b * n for b in at), snap is None or "mtp.hidden" in snap)


def store_snapshot(pc: PrefixCache, keys: Sequence[str], prompt: Sequence[int], at: int, cache: HybridCache,
                   slot: int, mtp_cache: HybridCache | None = None, hidden: torch.Tensor | None = None) -> bool:
    """Slot ``slot``'s state, now at boundary ``at`` (tokens) of ``prompt``, as the snapshot after its block
    (with ``mtp_cache``: its state of the positions < at - 1 and ``hidden``, the main hidden state at at - 1)."""
    j = at // pc.block_size
    views = _snapshot_views(cache, slot, mtp_cache)
    if mtp_cache is not None:
        views["mtp.hidden"] = hidden
    return pc.store(snapshot_key(keys[j - 1]), prompt[at - pc.block_size:at], views)


def store_blocks(pc: PrefixCache, keys: Sequence[str], prompt: Sequence[int], cache: HybridCache, slot: int,
                 first: int) -> None:
    """Blocks ``first`` .. of ``prompt`` (the ones not on disk) from entry block ``slot`` of ``cache``, whose
    entries cover the whole prompt."""
    n = pc.block_size
    for i in range(first, len(keys)):
        pc.store(keys[i], prompt[i * n:(i + 1) * n], block_entries(cache, slot, i * n, n))
