"""A V4 decode forward's rows make what every layer derives from them once (``HybridRows.once``): where the new
tokens go in a ring is made again for another cache view's slots and for a ring of another size."""

import torch

from flyer.config import preset
from flyer.infer.hybrid_cache import HybridCache, hybrid_rows, hybrid_tables


def test_ring_writes_of_one_forward_follow_each_views_slots_and_each_rings_size():
    cfg = preset("tiny-v4")  # layer 1 is CSA (ratio 4): its kv ring has 8 slots, every window ring 32
    pool = HybridCache.paged(cfg, n_slots=4, n_blocks=2, block_size=16, dtype=torch.float32)
    tables = torch.zeros(2, 1, dtype=torch.long)
    rows = hybrid_rows(hybrid_tables(cfg, 64, "cpu"), 64, torch.tensor([45, 9]), 1)  # 45 % 32 = 13, 45 % 8 = 5
    a, b = pool.view(tables, torch.tensor([0, 1])), pool.view(tables, torch.tensor([3, 2]))
    window = torch.randn(2, 1, cfg.head_dim)
    a.write_ring(0, "window", window, rows)
    b.write_ring(0, "window", window + 1, rows)  # the same rows, another view: its own slots 3, 2
    kv = torch.randn(2, 1, pool.layers[1]["kv_state"].shape[-1])
    b.write_ring(1, "kv_state", kv, rows)  # the same rows and view, a ring of 8 slots

    ring = pool.layers[0]["window"]
    # exact: a write copies values
    assert torch.equal(ring[0, 13], window[0, 0]) and torch.equal(ring[1, 9], window[1, 0])
    assert torch.equal(ring[3, 13], window[0, 0] + 1) and torch.equal(ring[2, 9], window[1, 0] + 1)
    assert int((ring != 0).any(-1).sum()) == 4  # nothing written elsewhere
    states = pool.layers[1]["kv_state"]
    assert torch.equal(states[3, 5], kv[0, 0]) and torch.equal(states[2, 1], kv[1, 0])
    assert int((states != 0).any(-1).sum()) == 2
