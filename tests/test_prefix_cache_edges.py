"""Edges of the on-disk prefix cache (``flyer.infer.prefix_cache``) and DeepSeek-V4's decode cache
(``flyer.infer.hybrid_cache``) a mutation sweep found unpinned (each assertion fails on the mutant it names): what
eviction leaves alone (a live writer's file, names the cache would not write), a directory it refuses, a block that
can never fit, an entry whose tensors hold no bytes, entries whose header disagrees with the block, a held FP8
model's scales in its fingerprint, a slot snapshot that fills its blocks exactly, rows kept after a shrink."""

import hashlib
import json
import os
import struct
import tempfile

import pytest
import torch

from flyer.config import preset
from flyer.errors import FieldError
from flyer.infer import prefix_cache
from flyer.infer.hybrid_cache import HybridCache
from flyer.infer.prefix_cache import PrefixCache, model_fingerprint
from flyer.infer.weights import hold_weights
from flyer.model.transformer import Transformer


def _cache(tmp_path, **kw) -> PrefixCache:
    return PrefixCache(tmp_path, "fp", block_size=4, **kw)


def test_eviction_leaves_a_live_writers_file_and_foreign_names(tmp_path):
    """A temporary file another process is writing (younger than ten minutes: only a killed writer's older one is
    removed), and a block-like name in a subdirectory the cache would not write it to, are neither counted nor
    deleted."""
    pc = _cache(tmp_path, max_bytes=10)
    (tmp_path / "ab").mkdir()
    (tmp_path / "00").mkdir()
    fd, live = tempfile.mkstemp(dir=tmp_path / "ab", prefix=prefix_cache._TMP_PREFIX, suffix=".tmp")
    os.write(fd, b"x" * 100)
    os.close(fd)
    stray = tmp_path / "00" / ("ff" + "0" * 62 + ".blk")
    stray.write_bytes(b"x" * 100)
    assert pc.disk_bytes() == 0 and pc.evict() == 0
    assert os.path.exists(live) and stray.exists()
    old = os.stat(live).st_mtime - 601
    os.utime(live, (old, old))
    _cache(tmp_path, max_bytes=10).evict()  # another process's first eviction lists the directory
    assert not os.path.exists(live) and stray.exists()


def test_a_directory_holding_other_files_is_refused(tmp_path):
    (tmp_path / "thesis.tex").write_text("a user's work")
    with pytest.raises(FieldError, match="is not empty and is not a prefix cache"):
        _cache(tmp_path)
    assert not (tmp_path / prefix_cache.MARKER).exists()


def test_a_block_larger_than_the_cache_is_not_stored(tmp_path):
    """Stored, it would evict every other block and then itself."""
    pc = _cache(tmp_path, max_bytes=3000)
    small = [pc.block_keys([i] * 4)[0] for i in range(3)]
    for i, k in enumerate(small):
        assert pc.store(k, [i] * 4, {"x": torch.ones(10)})
    pc.evict()
    assert not pc.store(pc.block_keys([9] * 4)[0], [9] * 4, {"x": torch.ones(1000)})
    pc.evict()
    assert all(pc.path(k).exists() for k in small)


def test_an_entry_of_empty_tensors_is_a_hit(tmp_path):
    pc = _cache(tmp_path)
    k = pc.block_keys([1, 2, 3, 4])[0]
    assert pc.store(k, [1, 2, 3, 4], {"x": torch.empty(0, 8)})
    got = pc.load(k, [1, 2, 3, 4], {"x": ((0, 8), torch.float32)})
    assert got is not None and got["x"].shape == (0, 8) and pc.stats.corrupt == 0


def _write_entry(pc, key, tokens, table, payload):
    header = json.dumps({"version": prefix_cache.FORMAT_VERSION, "fingerprint": pc.fingerprint, "key": key,
                         "tokens": tokens, "tensors": table, "sha256": hashlib.sha256(payload).hexdigest()}).encode()
    pc.path(key).parent.mkdir(parents=True, exist_ok=True)
    pc.path(key).write_bytes(prefix_cache.MAGIC + struct.pack("<I", len(header)) + header + payload)


def test_an_entry_whose_header_disagrees_is_a_miss(tmp_path):
    """The header is not under the checksum: a block read under another prompt's tokens (the key chains them, so
    only a caller's mix-up or a collision gets here), or a tensor at a negative offset, is no hit."""
    pc = _cache(tmp_path)
    k = pc.block_keys([1, 2, 3, 4])[0]
    assert pc.store(k, [1, 2, 3, 4], {"x": torch.ones(2)})
    assert pc.load(k, [9, 9, 9, 9], {"x": ((2,), torch.float32)}) is None
    payload = torch.tensor([1.0, 2.0, 3.0, 4.0]).numpy().tobytes()
    table = [{"name": "a", "dtype": "torch.float32", "shape": [2], "offset": 0, "nbytes": 8},
             {"name": "b", "dtype": "torch.float32", "shape": [2], "offset": -8, "nbytes": 24}]
    k = pc.block_keys([7, 7, 7, 7])[0]
    _write_entry(pc, k, [7, 7, 7, 7], table, payload)
    corrupt = pc.stats.corrupt
    assert pc.load(k, [7, 7, 7, 7], {"a": ((2,), torch.float32), "b": ((2,), torch.float32)}) is None
    assert pc.stats.corrupt == corrupt + 1


@pytest.mark.parametrize("a_offset", [4, 8])
def test_a_table_that_does_not_lay_the_payload_out_end_to_end_is_corrupt(tmp_path, a_offset):
    """A flipped digit of an offset in the header, which the checksum does not cover, read one tensor off another's
    bytes inside the payload, a hit of wrong KV (a generation's tokens changed); tensors lie end to end in table
    order, as written."""
    pc = _cache(tmp_path)
    payload = torch.arange(4.0).numpy().tobytes()
    table = [{"name": "a", "dtype": "torch.float32", "shape": [2], "offset": a_offset, "nbytes": 8},
             {"name": "b", "dtype": "torch.float32", "shape": [2], "offset": 8, "nbytes": 8}]
    k = pc.block_keys([7, 7, 7, 7])[0]
    _write_entry(pc, k, [7, 7, 7, 7], table, payload)
    assert pc.load(k, [7, 7, 7, 7], {"a": ((2,), torch.float32), "b": ((2,), torch.float32)}) is None
    assert pc.stats.corrupt == 1
    table[0].update(offset=0)  # as written: a hit
    _write_entry(pc, k, [7, 7, 7, 7], table, payload)
    got = pc.load(k, [7, 7, 7, 7], {"a": ((2,), torch.float32), "b": ((2,), torch.float32)})
    assert got is not None and got["b"].tolist() == [2.0, 3.0]


def test_a_users_files_under_the_caches_names_are_no_cache(tmp_path):
    """Without the marker, names alone made a cache (a version before the marker left only its own): a user's
    stats.json was then written over with the counters, a two-hex-digit directory of the user's files marked."""
    user = b'{"experiment": "run 7", "accuracy": 0.93}'
    (tmp_path / "a" / "20").mkdir(parents=True)
    (tmp_path / "a" / "20" / "notes.txt").write_text("a user's")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "stats.json").write_bytes(user)
    for d in (tmp_path / "a", tmp_path / "b"):
        with pytest.raises(FieldError, match="is not empty and is not a prefix cache"):
            _cache(d)
        assert not (d / prefix_cache.MARKER).exists()
    assert (tmp_path / "b" / "stats.json").read_bytes() == user
    old = tmp_path / "old"  # what a cache before the marker left: its counters, an empty lock, blocks
    pc = _cache(old)
    k = pc.block_keys([1, 2, 3, 4])[0]
    assert pc.store(k, [1, 2, 3, 4], {"x": torch.ones(2)})
    pc.record_stats()
    (old / ".lock").touch()
    (old / prefix_cache.MARKER).unlink()
    _cache(old)
    assert (old / prefix_cache.MARKER).is_file()


def test_what_is_not_the_caches_is_neither_written_through_nor_over(tmp_path):
    """A directory at a block's path failed the write as a full disk would: storing stopped for the run. A
    subdirectory that is a symlink out of the cache took blocks outside it, never counted nor evicted."""
    root, outside = tmp_path / "cache", tmp_path / "outside"
    outside.mkdir()
    pc = _cache(root, max_bytes=1000)
    keys, i = [], 0
    while len(keys) < 3:  # blocks that land in subdirectory "ab"
        if (k := pc.block_keys([i] * 4)[0]).startswith("ab"):
            keys.append((k, i))
        i += 1
    os.symlink(outside, root / "ab")
    assert not any(pc.store(k, [t] * 4, {"x": torch.ones(100)}) for k, t in keys)
    assert os.listdir(outside) == []
    os.unlink(root / "ab")
    pc.path(keys[0][0]).mkdir(parents=True)
    assert not pc.store(keys[0][0], [keys[0][1]] * 4, {"x": torch.ones(4)})
    assert pc.store(keys[1][0], [keys[1][1]] * 4, {"x": torch.ones(4)}) and pc.storing
    target = outside / "elsewhere"
    target.write_text("x")
    os.utime(target, ns=(0, 0))
    os.symlink(target, pc.path(keys[2][0]))
    pc.touch([keys[2][0]])
    assert target.stat().st_mtime_ns == 0


def test_a_held_fp8_models_scales_are_in_its_fingerprint():
    """FP8-held weights keep their block scales in non-persistent buffers: two models of the same codes and other
    scales compute otherwise, so they must not share cached KV."""
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=64, n_layers=1)
    a, b = Transformer(cfg), Transformer(cfg)
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        hold_weights(m, torch.float8_e4m3fn)
    name, scale = next((n, t) for n, t in b.named_buffers() if n.endswith("weight_scale"))
    assert name not in b.state_dict() and model_fingerprint(a) == model_fingerprint(b)
    scale.mul_(2)
    assert model_fingerprint(a) != model_fingerprint(b)


def test_a_slot_snapshot_that_fills_its_blocks_exactly():
    """A snapshot of ceil(bytes / block_bytes) blocks (``flyer.serve.paged_hybrid``'s size) may fill them to the
    last byte: saved and read back bit for bit."""
    c = HybridCache.paged(preset("tiny-v4", vocab_size=256), 2, 64, 16)
    wb, bb = c.window_bytes(), c.block_bytes()
    k = -(-wb // bb)
    extra = torch.arange(k * bb - wb, dtype=torch.int64).to(torch.uint8)
    c.layers[0]["window"][0].normal_()
    c.save_slot(0, torch.arange(k), (extra,))
    back = c.load_slot(1, torch.arange(k))
    assert torch.equal(c.slot_bytes(1), c.slot_bytes(0)) and torch.equal(back, extra)


def test_kept_rows_keep_their_lengths():
    c = HybridCache(preset("tiny-v4", vocab_size=256), 3, 32)
    c.lengths.copy_(torch.tensor([5, 17, 11]))
    c.keep_rows(torch.tensor([2, 0]))
    assert c.batch == 2 and c.lengths.tolist() == [11, 5]
