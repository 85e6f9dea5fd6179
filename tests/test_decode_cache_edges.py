"""Direct contracts of the decode caches (``flyer.infer.cache``, ``cache_fp8``, ``hybrid_cache``) that the model-level
tests leave unpinned: read dtypes, index keys of shared-indexer layers, FP8 rows at any byte offset, V4's refusals
and position bound, rows kept and slots restored, paged views writing their own slots. Oracles: hand-built values
and the documented contracts."""

import pytest
import torch

from flyer.config import preset
from flyer.infer.cache import LatentCache, make_cache
from flyer.infer.cache_fp8 import fp8_cache_problem, pack_rows, token_bytes, unpack_rows
from flyer.infer.hybrid_cache import HybridCache, hybrid_rows, hybrid_tables


def test_read_returns_the_requested_dtype():
    """read() of a BF16 cache's index keys asked in FP32 gives FP32 values equal to the stored ones."""
    c = LatentCache(1, 2, 4, 8, 4, dtype=torch.bfloat16, index_dim=8)
    k = torch.randn(2, 4, 8)
    c.write(0, torch.arange(4).expand(2, 4), index_key=k)
    got = c.read(0, "index_key", 3, torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, k[:, :3].bfloat16().float())


def test_cache_keeps_index_keys_only_for_layers_with_an_indexer():
    """With GLM-5's shared layers, the index keys are allocated for the layers with their own indexer only."""
    cfg = preset("tiny", index_topk=8, index_n_heads=2, index_head_dim=16, indexer_types=("full", "shared") * 2)
    c = make_cache(cfg, 4, 1, 8, "absorbed", torch.bfloat16)
    assert c.tensors["index_key"].shape[0] == 2
    assert c.bytes_per_token() == 2 * (4 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + 2 * 16)


def test_unpack_rows_reads_rows_at_any_byte_offset():
    """unpack_rows decodes FP8 rows sliced 2 bytes into a wider buffer (misaligned scales) as it does aligned ones."""
    torch.manual_seed(0)
    C, R = 128, 4
    rows = pack_rows(torch.randn(3, C), torch.randn(3, R))
    buf = torch.zeros(3, 2 + token_bytes(C, R), dtype=torch.uint8)
    buf[:, 2:] = rows
    shifted = buf[:, 2:]
    assert shifted.storage_offset() == 2 and shifted.stride(-1) == 1
    assert torch.equal(unpack_rows(shifted, C, torch.float32), unpack_rows(rows, C, torch.float32))
    flat = torch.zeros(2 + rows.numel(), dtype=torch.uint8)  # contiguous rows 2 bytes into their storage
    flat[2:] = rows.reshape(-1)
    packed = flat[2:].view(3, -1)
    assert packed.is_contiguous() and packed.storage_offset() == 2
    assert torch.equal(unpack_rows(packed, C, torch.float32), unpack_rows(rows, C, torch.float32))


def test_v4_fp8_refuses_index_head_dim_a_multiple_of_32_but_not_a_power_of_two():
    """DeepSeek-V4 FP8 index keys need a power-of-two index_head_dim: 96 (3 tiles of 32) is refused."""
    problem = fp8_cache_problem(preset("tiny-v4", index_head_dim=96))
    assert problem is not None and "index_head_dim=96 must be a power of two" in problem
    assert fp8_cache_problem(preset("tiny-v4", index_head_dim=64)) is None


def test_hybrid_rows_refuses_a_position_at_max_len():
    """A real token at position max_len (one past the last slot) is refused; max_len - 1 is accepted."""
    cfg = preset("tiny-v4")
    tables = hybrid_tables(cfg, 16, None)
    hybrid_rows(tables, 16, torch.tensor([15]), 1)
    with pytest.raises(ValueError, match="exceeds the decoder's max_len 16"):
        hybrid_rows(tables, 16, torch.tensor([16]), 1)
    with pytest.raises(ValueError, match="max_len"):
        hybrid_rows(tables, 16, torch.tensor([14]), 3)


def test_hybrid_keep_rows_keeps_each_rows_length():
    """HybridCache.keep_rows reorders lengths with the kept rows (rows [2, 0] of lengths [3, 5, 7]: [7, 3])."""
    c = HybridCache(preset("tiny-v4"), 3, 16)
    c.lengths = torch.tensor([3, 5, 7])
    c.layers[1]["window"][2] = 1.0
    c.keep_rows(torch.tensor([2, 0]))
    assert c.lengths.tolist() == [7, 3] and c.batch == 2
    assert bool((c.layers[1]["window"][0] == 1.0).all()) and bool((c.layers[1]["window"][1] == 0.0).all())


def test_ring_writes_of_two_views_sharing_rows_land_in_their_own_slots():
    """Two views of a paged hybrid pool (different slots) writing the same forward's rows each write their own slot."""
    cfg = preset("tiny-v4")
    pool = HybridCache.paged(cfg, n_slots=3, n_blocks=2, block_size=16)
    tables = torch.zeros(1, 1, dtype=torch.long)
    a, b = pool.view(tables, torch.tensor([0])), pool.view(tables, torch.tensor([2]))
    rows = hybrid_rows(hybrid_tables(cfg, 16, None), 16, torch.tensor([0]), 2)
    d = cfg.head_dim
    a.write_ring(0, "window", torch.ones(1, 2, d), rows)
    b.write_ring(0, "window", torch.full((1, 2, d), 2.0), rows)
    w = pool.layers[0]["window"]
    assert bool((w[0, :2] == 1).all()) and bool((w[2, :2] == 2).all()) and bool((w[1] == 0).all())


def test_restore_slots_without_rows_restores_every_saved_slot():
    """restore_slots(saved, slots) with no rows puts back the saved fixed state of every slot in slots."""
    c = HybridCache(preset("tiny-v4"), 3, 16)
    slots = torch.tensor([0, 2])
    saved = c.copy_slots(slots)
    fixed = [t for state in c.layers for k, t in state.items() if k not in ("entries", "index_keys")]
    for t in fixed:
        t.fill_(5)
    c.restore_slots(saved, slots)
    for t in fixed:
        assert bool((t[0] == 0).all()) and bool((t[2] == 0).all()) and bool((t[1] == 5).all())
