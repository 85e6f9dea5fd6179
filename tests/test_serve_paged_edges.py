"""Unit-level pins of the serving engine's paged cache bookkeeping (``flyer.serve.paged``), its DeepSeek-V4 slots
(``flyer.serve.paged_hybrid``) and MTP speculation's per-row rules (``flyer.serve.speculation``)."""

from types import SimpleNamespace

import pytest
import torch

from flyer.config import preset
from flyer.infer.cache import make_cache
from flyer.infer.prefix_cache import chain_keys
from flyer.infer.sampling import SamplingParams
from flyer.serve.metrics import ServeMetrics
from flyer.serve.paged import BlockAllocator, PagedCache, blocks_for_memory
from flyer.infer.hybrid_cache import HybridCache
from flyer.serve.paged_hybrid import BoundarySnapshots, SlotAllocator, hybrid_blocks_for_memory
from flyer.serve.speculation import MtpSpeculator, mtp_slots


def test_allocator_needs_a_block_beside_the_null_block():
    """An allocator of fewer than 2 blocks (the null block only) is refused; 2 blocks give capacity 1."""
    with pytest.raises(ValueError):
        BlockAllocator(1, 4)
    a = BlockAllocator(2, 4)
    assert a.capacity == 1 and a.available == 1 and a.used == 0
    assert a.allocate() == 1 and a.allocate() is None and a.used == 1


def test_match_stops_at_the_first_uncached_block():
    """A prefix match ends at its first miss: a later block of the chain cached on its own is not taken."""
    a = BlockAllocator(8, 2)
    keys = chain_keys([1, 2, 3, 4, 5, 6], 2)
    b0, _, b2 = a.allocate(), a.allocate(), a.allocate()
    a.register(b0, keys[0])
    a.register(b2, keys[2])
    got, got_keys = a.match([1, 2, 3, 4, 5, 6, 7], 3)
    assert got == [b0] and got_keys == [keys[0]]
    assert a.lookups == 2 and a.hits == 1 and a.hit_rate == 0.5
    assert a.refs[b2] == 1  # untouched


def test_register_keeps_one_key_per_block():
    """A block already keyed is not keyed again under another key (nor a key taken twice)."""
    a = BlockAllocator(4, 2)
    b, c = a.allocate(), a.allocate()
    assert a.register(b, "k1") is True
    assert a.register(b, "k2") is False and "k2" not in a.block_of and a.key_of[b] == "k1"
    assert a.register(c, "k1") is False and c not in a.key_of


def test_a_matched_cached_block_leaves_the_lru():
    """Matching a cached, unreferenced block references it: it is no longer available nor evictable."""
    a = BlockAllocator(3, 2)  # blocks 1, 2
    b = a.allocate()
    a.register(b, chain_keys([7, 8], 2)[0])
    a.release([b])
    assert a.available == 2 and list(a.lru) == [b]
    got, _ = a.match([7, 8, 9], 1)
    assert got == [b] and a.refs[b] == 1 and a.available == 1 and b not in a.lru
    other = a.allocate()
    assert other != b and a.allocate() is None  # the referenced block is never handed out


def test_forget_frees_an_unreferenced_cached_block():
    """Forgetting a cached, unreferenced block drops its key and puts it on the free list at once."""
    a = BlockAllocator(3, 2)
    b = a.allocate()
    a.register(b, "k")
    a.release([b])
    a.forget(b)
    assert b in a.free and b not in a.lru and "k" not in a.block_of and a.available == 2
    assert sorted([a.allocate(), a.allocate()]) == [1, 2]


def test_slot_allocator_hands_out_slot_zero_first():
    """Slots are taken lowest first, a given-back slot is taken again next, and an exhausted pool raises."""
    s = SlotAllocator(3)
    assert [s.take(), s.take()] == [0, 1] and s.available == 1
    s.give_back(0)
    assert s.take() == 0
    s.take()
    with pytest.raises(RuntimeError):
        s.take()


def test_mtp_slots_match_the_disk_spans():
    """Block i of the MTP cache (position p in slot p + 1) holds positions [i n - 1, (i + 1) n - 1): slot 0 of block 0
    is unused."""
    assert mtp_slots(0, 4) == slice(1, 4)
    assert mtp_slots(1, 4) == slice(0, 4)
    assert mtp_slots(3, 2) == slice(0, 2)


def _spec(draft_tokens=3, max_batch=None):
    return MtpSpeculator(None, None, draft_tokens, None, ServeMetrics(), torch.device("cpu"), max_batch=max_batch)


def _row(n_cached=5, generated=1, max_tokens=10):
    return SimpleNamespace(n_cached=n_cached, generated=generated, opts=SimpleNamespace(max_tokens=max_tokens),
                           matcher=None, deferred=None, generator=None, h_prev=None)


def test_batch_cutoff_drafts_at_max_batch_and_not_above():
    """A step of exactly max_batch rows drafts; one more row turns drafting off for the step, counted."""
    s = _spec(max_batch=2)
    s.begin_step(2)
    assert s.drafting and s.off_steps == 0 and s.n_drafts(_row()) == 3
    s.begin_step(3)
    assert not s.drafting and s.off_steps == 1 and s.n_drafts(_row()) == 0


def test_drafts_stop_before_the_tokens_left():
    """A row drafts at most max_tokens - generated - 1 (its last step verifies its pending token alone), none before its
    first token (its prompt's last token, left by its chunks, decodes plainly: its first token is sampled as a
    prefill's)."""
    s = _spec(draft_tokens=3)
    assert s.n_drafts(_row(generated=1, max_tokens=10)) == 3
    assert s.n_drafts(_row(generated=7, max_tokens=10)) == 2
    assert s.n_drafts(_row(generated=9, max_tokens=10)) == 0
    assert s.n_drafts(_row(generated=0)) == s.n_drafts(_row(n_cached=0, generated=0)) == 0


def test_accept_counts_only_kept_drafts():
    """Greedy verification keeps drafts up to the first disagreement; drafted/accepted count drafts, not the bonus
    token."""
    s = _spec(draft_tokens=2)
    r = _row(n_cached=5)
    V = 6
    logits = torch.full((3, V), -1.0)
    logits[0, 2] = logits[1, 4] = logits[2, 1] = 5.0  # the target's argmax at each verified position: 2, 4, 1
    hv = torch.arange(3 * 2, dtype=torch.float32).view(3, 2)
    new = s.accept(r, hv, logits, None, [2, 3], SamplingParams())
    assert new == [2, 4] and s.drafted == 2 and s.accepted == 1
    assert r.n_cached == 7 and torch.equal(r.h_prev, hv[:2])
    r2 = _row(n_cached=5)
    assert s.accept(r2, hv, logits, None, [2, 4], SamplingParams()) == [2, 4, 1]
    assert s.drafted == 4 and s.accepted == 3 and torch.equal(r2.h_prev, hv)


def test_blocks_for_memory_counts_the_mtp_layer():
    """With the MTP module the pool holds n_layers + 1 layers per token: fewer blocks for the same bytes."""
    cfg = preset("tiny")
    per_layer = make_cache(cfg, 1, 1, 1, "absorbed", torch.float32, "meta").bytes_per_token()
    mem = 4 * per_layer * (cfg.n_layers + 1) * 10
    assert blocks_for_memory(cfg, mem, 4, torch.float32) == mem // (4 * per_layer * cfg.n_layers)
    assert blocks_for_memory(cfg, mem, 4, torch.float32, with_mtp=True) == 10


def _pool(n_blocks=4, bs=2):
    cfg = preset("tiny")
    return PagedCache(make_cache(cfg, 1, n_blocks, bs, "absorbed", torch.float32, "cpu")), cfg


def test_paged_reads_see_writes_through_tables_and_cover_exactly():
    """Writes through a block table land where reads of the same table find them; a table covering exactly n slots reads
    n, fewer raise."""
    pc, cfg = _pool()
    D = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    tables = torch.tensor([[3, 1]])
    pc.tables = tables
    pos = torch.arange(4).view(1, 4)
    vals = torch.arange(4 * D, dtype=torch.float32).view(1, 4, D)
    pc.write(0, pos, latent=vals[..., :cfg.kv_lora_rank], rope_key=vals[..., cfg.kv_lora_rank:])
    got = pc.read_packed(0, 4, torch.float32)
    assert torch.equal(got, vals)
    assert torch.equal(pc.pool.packed[0, 3], vals[0, :2]) and torch.equal(pc.pool.packed[0, 1], vals[0, 2:])
    with pytest.raises(ValueError):
        pc.read_packed(0, 5, torch.float32)
    assert torch.equal(pc.read_packed(0, 2, torch.float32), vals[:, :2])  # a shorter read after a longer one


def test_writes_before_write_from_go_to_the_null_block():
    """With write_from, positions below it (shared blocks) are written to the null block only, from it on to the row's
    blocks."""
    pc, cfg = _pool()
    D = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    v = pc.view(torch.tensor([[2, 3]]), write_from=torch.tensor([2]))
    vals = torch.ones(1, 4, D)
    v.write(0, torch.arange(4).view(1, 4), latent=vals[..., :cfg.kv_lora_rank], rope_key=vals[..., cfg.kv_lora_rank:])
    assert (pc.pool.packed[0, 2] == 0).all()  # the shared block untouched
    assert (pc.pool.packed[0, 3] == 1).all()  # position 2 (write_from) and 3 written
    assert (pc.pool.packed[0, 0] == 1).all()  # padding into the null block


def test_positions_past_the_table_write_the_null_block():
    """A position past a row's table (batch padding) writes the null block, never the row's last block."""
    pc, cfg = _pool()
    D = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    pc.tables = torch.tensor([[2]])
    vals = torch.arange(4.0).view(1, 4, 1).expand(1, 4, D).contiguous()
    pc.write(0, torch.tensor([[0, 1, 2, 3]]),
             latent=vals[..., :cfg.kv_lora_rank], rope_key=vals[..., cfg.kv_lora_rank:])
    assert (pc.pool.packed[0, 2, 0] == 0).all() and (pc.pool.packed[0, 2, 1] == 1).all()
    assert (pc.pool.packed[0, 0, 0] == 2).all() and (pc.pool.packed[0, 0, 1] == 3).all()


def test_successive_writes_through_one_table_land_at_their_own_positions():
    """Two writes through the same table at different positions each land at their positions (no stale slot index)."""
    pc, cfg = _pool()
    D = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    pc.tables = torch.tensor([[1, 2]])
    for lo, val in ((0, 1.0), (2, 2.0)):
        vals = torch.full((1, 2, D), val)
        pc.write(0, torch.tensor([[lo, lo + 1]]),
                 latent=vals[..., :cfg.kv_lora_rank], rope_key=vals[..., cfg.kv_lora_rank:])
    assert (pc.pool.packed[0, 1] == 1).all() and (pc.pool.packed[0, 2] == 2).all()


def _v4(n_blocks=40, bs=16, n_slots=2):
    cfg = preset("tiny-v4")
    cache = HybridCache.paged(cfg, n_slots, n_blocks, bs, torch.float32, "cpu")
    alloc = BlockAllocator(n_blocks, bs)
    return cfg, cache, alloc, BoundarySnapshots(cache, alloc)


def test_hybrid_blocks_for_memory_takes_every_slot_first():
    """Blocks = (memory - n_slots * a slot's bytes) // a block's bytes, never negative."""
    cfg = preset("tiny-v4")
    probe = HybridCache.paged(cfg, 1, 1, 16, torch.float32, "meta")
    wb, bb = probe.window_bytes(), probe.block_bytes()
    assert hybrid_blocks_for_memory(cfg, 3 * wb + 7 * bb + bb - 1, 16, 3, torch.float32) == 7
    assert hybrid_blocks_for_memory(cfg, 2 * wb, 16, 3, torch.float32) == 0


def test_snapshot_round_trips_a_slot_and_uses_ceil_blocks():
    """A snapshot takes ceil(slot bytes / block bytes) blocks, stays cached unreferenced, and restores the slot bit for
    bit."""
    cfg, cache, alloc, snaps = _v4()
    wb, bb = cache.window_bytes(), cache.block_bytes()
    assert snaps.size == -(-wb // bb)
    g = torch.Generator().manual_seed(0)
    for t in cache._slot_state(0):
        t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
    before = cache.slot_bytes(0)
    keys = chain_keys(list(range(32)), 16)
    table = [alloc.allocate(), alloc.allocate()]
    for b, k in zip(table, keys):
        alloc.register(b, k)
    snaps.plans[0] = {2}
    assert snaps.reached(0, 33, keys) is None and keys[1] not in snaps.blocks_of  # past the boundary, not at it
    assert snaps.reached(0, 32, keys) == 2
    held = snaps.blocks_of[keys[1]]
    assert len(held) == snaps.size and all(alloc.refs[b] == 0 and b in alloc.lru for b in held)
    alloc.release(table)
    got, got_keys = alloc.match(list(range(33)), 2)
    blocks, ks, plan = snaps.usable(got, got_keys, 2)
    assert blocks == table and ks == keys and plan == set()
    snaps.begin(1, ks, plan)
    assert torch.equal(cache.slot_bytes(1), before)
    assert list(alloc.lru)[-len(held):] == held  # just used: evicted last


def test_usable_cuts_a_match_at_its_deepest_snapshot():
    """A match is cut to its deepest boundary with a snapshot, the rest released; later boundaries are planned."""
    cfg, cache, alloc, snaps = _v4()
    keys = chain_keys(list(range(48)), 16)
    table = [alloc.allocate() for _ in range(3)]
    for b, k in zip(table, keys):
        alloc.register(b, k)
    snaps.blocks_of[keys[0]] = []  # a snapshot after block 0 only
    alloc.release(table)
    got, got_keys = alloc.match(list(range(49)), 3)
    blocks, ks, plan = snaps.usable(got, got_keys, 3)
    assert blocks == table[:1] and ks == keys[:1] and plan == {3}
    assert alloc.refs[table[0]] == 1 and alloc.refs[table[1]] == 0 and alloc.refs[table[2]] == 0
    got, got_keys = alloc.match(list(range(49)), 2)
    assert snaps.usable(got, got_keys, 3)[2] == {2, 3}


def test_a_snapshot_fits_when_exactly_its_blocks_are_available():
    """A snapshot is saved when the pool has exactly as many free or cached blocks as it needs."""
    size = _v4()[3].size
    keys = chain_keys(list(range(16)), 16)
    cfg, cache, alloc, snaps = _v4(n_blocks=1 + 1 + size)
    b = alloc.allocate()
    alloc.register(b, keys[0])
    assert alloc.available == size
    snaps.save(keys[0], 0)
    assert len(snaps.blocks_of[keys[0]]) == size


def test_evicting_one_snapshot_block_drops_the_whole_snapshot():
    """When one of a snapshot's blocks is reused, its other blocks are freed and the snapshot is gone."""
    cfg, cache, alloc, snaps = _v4()
    keys = chain_keys(list(range(16)), 16)
    b = alloc.allocate()
    alloc.register(b, keys[0])
    snaps.save(keys[0], 0)
    held = snaps.blocks_of[keys[0]]
    assert len(held) >= 2
    while alloc.free:
        alloc.allocate()
    victim = alloc.allocate()  # the least recently used cached block: one of the snapshot's
    assert victim in held
    assert keys[0] not in snaps.blocks_of and not snaps.key_of
    assert all(h in alloc.free for h in held if h != victim) and keys[0] in alloc.block_of
    assert alloc.available == len(held) - 1 and not alloc.lru


def test_no_snapshot_when_making_room_evicts_its_own_prefix_block():
    """A snapshot whose allocation evicts the prefix block it follows is dropped (unreachable), its blocks freed."""
    size = _v4()[3].size
    cfg, cache, alloc, snaps = _v4(n_blocks=1 + size)
    keys = chain_keys(list(range(16)), 16)
    b = alloc.allocate()
    alloc.register(b, keys[0])
    alloc.release([b])  # cached, unreferenced: the last block the snapshot's allocation can take
    assert alloc.available == size
    snaps.save(keys[0], 0)
    assert keys[0] not in snaps.blocks_of and not snaps.key_of and not alloc.block_of
    assert alloc.available == size and len(alloc.free) == size and not alloc.lru


def test_bound_pending_writes_rows_holding_exactly_the_limit():
    """Rows whose pending hidden states reach pending_limit (not only those past it) get their MTP entries written."""
    s = MtpSpeculator(None, None, 2, None, ServeMetrics(), torch.device("cpu"), pending_limit=4)
    seen = []
    s.catch_up = lambda rows, hold_decode_entry=False: seen.append((list(rows), hold_decode_entry))
    at, below = _row(), _row()
    at.h_prev, below.h_prev = torch.zeros(4, 2), torch.zeros(3, 2)
    assert s.bound_pending([at, below]) == [at] and seen == [([at], True)]


class _FakeMtp:
    def mtp_forward(self, h, nxt, start, shift=1, lengths=None):
        return torch.zeros(h.shape[0], h.shape[1], h.shape[-1])


def test_catch_up_holds_back_only_a_decoding_rows_last_entry():
    """Prefill's catch-up writes every entry a mid-prompt row can, and holds back one only for a row left with one
    pending token."""
    s = MtpSpeculator(_FakeMtp(), SimpleNamespace(tables=None), 2, lambda rows, n: torch.zeros(len(rows), 1),
                      ServeMetrics(), torch.device("cpu"))
    mid = SimpleNamespace(tokens=list(range(10)), n_cached=4, mtp_len=0, h_prev=torch.zeros(4, 2))
    last = SimpleNamespace(tokens=list(range(10)), n_cached=9, mtp_len=0, h_prev=torch.zeros(9, 2))
    s.catch_up([mid, last], hold_decode_entry=True)
    assert mid.mtp_len == 4 and mid.h_prev.shape[0] == 0
    assert last.mtp_len == 8 and last.h_prev.shape[0] == 1
