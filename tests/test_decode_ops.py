"""The decode step's op-lean forms against the forms they replace: bit for bit, so no tolerance."""

import importlib
from pathlib import Path
from types import SimpleNamespace

import torch

from flyer import kernels
from flyer.config import preset
from flyer.infer.cache import LatentCache
from flyer.model.transformer import Transformer
from flyer.serve.paged import PagedCache


def test_grouped_mm_eager_is_each_groups_mm():
    """``kernels.grouped_mm`` without the kernel (a GPU, kernels off): each group's rows times its weight, groups
    without rows (first, inner, last) skipped, weights of x's dtype or widened to it: one ``torch.mm`` per group on
    its rows, so the same bits."""
    for w in (torch.randn(6, 5, 8), torch.randn(6, 5, 8).bfloat16()):
        for rows in ([0, 3, 0, 1, 2, 0], [1, 1, 1, 1, 1, 1], [0] * 6):
            x = torch.randn(sum(rows), 8)
            starts = [sum(rows[:g]) for g in range(7)]
            want = torch.cat([x[starts[g]:starts[g + 1]] @ w[g].float().t() for g in range(6)])
            with kernels.disabled():
                got = kernels.grouped_mm(x, rows, w)
            assert got.shape == want.shape and torch.equal(got, want)


def _pool(layers=2, blocks=6, block_size=4, C=8, R=4):
    return LatentCache(layers, blocks, block_size, C, R, dtype=torch.float32)


def test_paged_reads_follow_the_tables_and_slot_count():
    """``read_packed`` through its per-forward flat slot index: each row's slots [0, n) in table order, for every
    layer and whenever n or the tables change (the index is rebuilt, not reused)."""
    pool = _pool()
    pool.packed.copy_(torch.randn(pool.packed.shape))
    bs = pool.max_len

    def want(tables, layer, n):
        return pool.packed[layer][tables].flatten(1, 2)[:, :n]

    tables = torch.tensor([[3, 1, 5], [2, 4, 0]])
    cache = PagedCache(pool, tables)
    for layer, n in ((0, 9), (1, 9), (1, 5), (0, 3 * bs)):
        assert torch.equal(cache.read_packed(layer, n, torch.float32), want(tables, layer, n))
    cache.tables = torch.tensor([[5, 2, 1], [1, 3, 4]])  # a new step's tables, same slot count
    assert torch.equal(cache.read_packed(0, 3 * bs, torch.float32), want(cache.tables, 0, 3 * bs))


def test_paged_writes_land_in_their_blocks_and_flat_views_follow_kept_rows():
    """``write`` stores (B, T, ...) rows at their blocks' slots through the pool's kept flat views; after
    ``keep_rows`` replaces a cache's tensors the views are made anew from them."""
    pool = _pool()
    tables = torch.tensor([[3, 1], [2, 4]])
    cache = PagedCache(pool, tables)
    pos = torch.tensor([[2, 5], [0, 7]])
    c, k = torch.randn(2, 2, 8), torch.randn(2, 2, 4)
    cache.write(1, pos, latent=c, rope_key=k)
    for b in range(2):
        for t in range(2):
            blk, slot = tables[b, pos[b, t] // 4], pos[b, t] % 4
            assert torch.equal(pool.packed[1, blk, slot], torch.cat([c[b, t], k[b, t]]))
    pool.flat_storage("latent", 0)
    pool.keep_rows(torch.tensor([4, 3]))
    pool.packed.copy_(torch.randn(pool.packed.shape))
    assert torch.equal(pool.flat_storage("latent", 0), pool.storage("latent", 0).flatten(0, 1))


def _bench(monkeypatch):
    """bench/_serve_engine, importable as bench/serve.py imports it (its helpers sit beside it)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    return importlib.import_module("_serve_engine")


def test_step_ops_counts_top_level_ops_only(monkeypatch):
    """Ops called from within another ATen op (``ones``' fill, ``sum``'s own calls) are not dispatched by the
    step's Python and are not counted."""
    step = SimpleNamespace(step=lambda: torch.ones(3).add(1).sum())
    assert _bench(monkeypatch).step_ops(step) == 3


def test_mixed_steps_decode_the_batch_and_prefill_a_prompt(monkeypatch):
    """``mixed_step_ms_b{B}``: each timed step decodes every request of the batch (checked inside) beside a fresh
    prompt's whole chunk; eagerly on the CPU, so no ``_eager`` key beside it."""
    out = _bench(monkeypatch).mixed_steps(Transformer(preset("tiny")).eval(), 2, context=20, chunk=12, steps=2)
    assert list(out) == ["mixed_step_ms_b2"] and out["mixed_step_ms_b2"] > 0


def test_decode_steps_report_op_counts(monkeypatch):
    """``decode_ops_b{B}`` beside each batch size's time, ``_eager`` too where the CPU kernels run (they fold ops
    into one call each, so the eager step dispatches more)."""
    out = _bench(monkeypatch).decode_steps(Transformer(preset("tiny")).eval(), (1, 2), context=20, steps=1)
    for B in (1, 2):
        assert out[f"decode_step_ms_b{B}"] > 0 and out[f"decode_ops_b{B}"] > 0
        if kernels.usable(torch.zeros(1)):
            assert out[f"decode_ops_b{B}_eager"] > out[f"decode_ops_b{B}"]
        else:
            assert f"decode_ops_b{B}_eager" not in out
