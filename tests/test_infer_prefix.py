"""On-disk prefix cache: a hit gives the cold run's logits, corrupt / mismatched entries are
ignored, LRU bound, several processes at once."""

import multiprocessing as mp
import os

import pytest
import torch

from flyer.config import preset
from flyer.infer import GenerationConfig, PrefixCache, generate
from flyer.infer.generate import open_prefix_cache
from flyer.model.transformer import Transformer
from tests.bounds import decode_logit_bound

BLOCK = 8


def _model(seed=0, **over):
    torch.manual_seed(seed)
    return Transformer(preset("tiny", **over)).eval()


def _run(model, prompts, pc, dtype=torch.float32, **kw):
    return generate(model, prompts, GenerationConfig(max_new_tokens=6, cache_dtype=dtype, prefix_cache=pc, **kw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hit_gives_cold_logits_and_tokens(tmp_path, dtype):
    model = _model()
    prompt = torch.randint(0, 2048, (29,)).tolist()  # 3 full blocks + 5 tokens
    cold = _run(model, [prompt], None, dtype)
    pc = open_prefix_cache(model, tmp_path, cache_dtype=dtype, block_size=BLOCK)
    first = _run(model, [prompt], pc, dtype)
    assert first.prefix["hits"] == 0 and first.prefix["stored"] == 3
    warm = _run(model, [prompt], pc, dtype)
    assert warm.prefix["hits"] == 3 and warm.prefix["tokens_loaded"] == 24 and warm.prefix["hit_rate"] == 1.0
    for r in (first, warm):
        torch.testing.assert_close(r.first_logits, cold.first_logits, atol=decode_logit_bound(model, 29), rtol=0)
        assert r.tokens == cold.tokens
    # a prompt sharing two blocks loads those two and recomputes from there
    other = prompt[:16] + [7] * 10
    shared = _run(model, [other, prompt], pc, dtype)
    assert shared.prefix["tokens_loaded"] == 16 + 24
    torch.testing.assert_close(shared.first_logits[0], _run(model, [other], None, dtype).first_logits[0],
                               atol=decode_logit_bound(model, 29), rtol=0)


def test_block_aligned_prompt_and_speculative_hit(tmp_path):
    model = _model()
    prompt = torch.randint(0, 2048, (16,)).tolist()  # fully cached: the last token is recomputed
    plain = _run(model, [prompt], None)
    pc = open_prefix_cache(model, tmp_path, cache_dtype=torch.float32, block_size=BLOCK)
    _run(model, [prompt], pc)
    warm = _run(model, [prompt], pc, speculative="mtp")
    assert warm.prefix["hits"] == 2
    assert warm.tokens == plain.tokens
    torch.testing.assert_close(warm.first_logits, plain.first_logits, atol=decode_logit_bound(model, 16), rtol=0)


@pytest.mark.parametrize("speculative", [None, "mtp"])
def test_a_row_that_loads_its_prompt_batches_with_a_cold_one(tmp_path, speculative):
    """One row loads all but its last token, the other loads nothing: the first row's padding in
    the shared prefill chunk runs past its cache (a ValueError before positions were clamped);
    each row's tokens == its prompt alone."""
    model = _model()
    g = torch.Generator().manual_seed(1)
    warm, cold = (torch.randint(0, 2048, (40,), generator=g).tolist() for _ in range(2))
    pc = open_prefix_cache(model, tmp_path, cache_dtype=torch.float32, block_size=BLOCK)
    _run(model, [warm], pc)
    both = _run(model, [warm, cold], pc, speculative=speculative)
    assert both.prefix["tokens_loaded"] == 40
    assert both.tokens == [_run(model, [p], None).tokens[0] for p in (warm, cold)]


def _block_files(root):
    return sorted(p for p in root.glob("*/*.blk"))


@pytest.mark.parametrize("damage", ["flip_payload", "truncate", "garbage", "empty"])
def test_corrupt_entry_is_ignored(tmp_path, damage):
    model = _model()
    prompt = torch.randint(0, 2048, (12,)).tolist()  # one block
    cold = _run(model, [prompt], None)
    pc = open_prefix_cache(model, tmp_path, block_size=BLOCK, cache_dtype=torch.float32)
    _run(model, [prompt], pc)
    (f,) = _block_files(tmp_path)
    data = bytearray(f.read_bytes())
    if damage == "flip_payload":
        data[-3] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(os.urandom(len(data)))
    else:
        data = bytearray()
    f.write_bytes(bytes(data))
    res = _run(model, [prompt], pc)
    assert res.prefix["hits"] == 0 and res.prefix["corrupt"] == 1
    torch.testing.assert_close(res.first_logits, cold.first_logits, atol=decode_logit_bound(model, 12), rtol=0)
    assert res.tokens == cold.tokens
    assert _run(model, [prompt], pc).prefix["hits"] == 1  # the recomputed block replaced it


def test_other_model_or_config_entries_are_mismatched(tmp_path):
    prompt = torch.randint(0, 2048, (12,)).tolist()
    a, b = _model(seed=0), _model(seed=1)  # same config, other weights
    pa = open_prefix_cache(a, tmp_path / "a", block_size=BLOCK, cache_dtype=torch.float32)
    pb = open_prefix_cache(b, tmp_path / "b", block_size=BLOCK, cache_dtype=torch.float32)
    assert pa.fingerprint != pb.fingerprint
    assert pa.fingerprint != open_prefix_cache(a, tmp_path / "c", block_size=BLOCK).fingerprint  # bf16 layout
    assert pa.fingerprint != open_prefix_cache(a, tmp_path / "d", block_size=4, cache_dtype=torch.float32).fingerprint
    _run(a, [prompt], pa)
    _run(b, [prompt], pb)
    # plant model a's entry where model b looks for this prefix
    (fa,) = _block_files(tmp_path / "a")
    (fb,) = _block_files(tmp_path / "b")
    fb.write_bytes(fa.read_bytes())
    res = _run(b, [prompt], pb)
    assert res.prefix["hits"] == 0 and res.prefix["mismatched"] == 1
    torch.testing.assert_close(res.first_logits, _run(b, [prompt], None).first_logits, atol=decode_logit_bound(b, 12),
                               rtol=0)


def _tensors(i):
    return {"latent": torch.full((2, BLOCK, 4), float(i)), "rope_key": torch.zeros(2, BLOCK, 2)}


def _expect():
    return {"latent": ((2, BLOCK, 4), torch.float32), "rope_key": ((2, BLOCK, 2), torch.float32)}


def test_lru_eviction_keeps_the_bound_and_recent_entries(tmp_path):
    pc = PrefixCache(tmp_path, "fp", block_size=BLOCK, max_bytes=6_000)
    prompts = [[i] * BLOCK for i in range(12)]
    keys = [pc.block_keys(p)[0] for p in prompts]
    for i, (k, p) in enumerate(zip(keys, prompts)):
        pc.store(k, p, _tensors(i))
        os.utime(pc.path(k), (1000 + i, 1000 + i))  # distinct access times
        if i == 8:
            assert pc.load(keys[0], prompts[0], _expect()) is not None  # touched: now most recent
    pc.evict()
    assert pc.disk_bytes() <= 6_000
    present = [pc.path(k).exists() for k in keys]
    assert present[0] and present[-1] and not present[1]  # oldest evicted, the touched one kept
    assert pc.stats.evicted == present.count(False)


def _block_bytes(root) -> int:
    """The bytes of one block's file (``_tensors``' shapes)."""
    pc = PrefixCache(root, "fp", block_size=BLOCK)
    pc.store(pc.block_keys([0] * BLOCK)[0], [0] * BLOCK, _tensors(0))
    return pc.disk_bytes()


def test_eviction_takes_a_chains_tail_before_its_head(tmp_path):
    """Two prompts' chains of 3 blocks in a directory bounded to 4: the first's tail goes, its head stays (loadable,
    so its chain is found as far as it goes), when each chain is marked used (``touch``, as ``flyer generate`` and
    ``flyer serve`` do after a prompt) however quickly the files were written (mtimes tick in jiffies)."""
    one = _block_bytes(tmp_path / "probe")
    pc = PrefixCache(tmp_path / "cache", "fp", block_size=BLOCK, max_bytes=4 * one)
    chains = [[i] * 3 * BLOCK for i in (1, 2)]
    keys = [pc.block_keys(p) for p in chains]
    for p, ks in zip(chains, keys):
        for i, k in enumerate(ks):
            assert pc.store(k, p[i * BLOCK:(i + 1) * BLOCK], _tensors(i))
        pc.touch(ks)
    pc.evict()
    present = [[pc.path(k).exists() for k in ks] for ks in keys]
    assert present == [[True, False, False], [True, True, True]]


def test_eviction_lists_the_directory_past_the_bound_or_after_a_while(tmp_path, monkeypatch):
    """``evict`` lists every file (a server's step waits for it) at its first call, then only when what this process
    stored since passes the bound, or ``RESCAN_S`` after the last listing (other processes' blocks)."""
    one = _block_bytes(tmp_path / "probe")
    pc = PrefixCache(tmp_path / "cache", "fp", block_size=BLOCK, max_bytes=3 * one)
    scans = []
    own = pc._own_files
    monkeypatch.setattr(pc, "_own_files", lambda: scans.append(1) or own())
    for i in range(5):
        pc.store(pc.block_keys([i] * BLOCK)[0], [i] * BLOCK, _tensors(i))
        pc.evict()
    assert len(scans) == 1 + 2  # the first, then at the 4th and 5th blocks
    pc.evict()
    assert len(scans) == 3
    monkeypatch.setattr(pc, "RESCAN_S", 0.0)
    pc.evict()
    assert len(scans) == 4 and pc.disk_bytes() <= 3 * one


def test_block_keys_chain_the_whole_prefix():
    pc_keys = PrefixCache.__new__(PrefixCache)
    pc_keys.fingerprint, pc_keys.block_size = "fp", 4
    a = pc_keys.block_keys([1, 2, 3, 4, 5, 6, 7, 8, 9])
    b = pc_keys.block_keys([1, 2, 3, 0, 5, 6, 7, 8])
    assert len(a) == 2 and len(b) == 2 and a[1] != b[1] and a[0] != b[0]


def _worker(root, seed, out):
    torch.set_num_threads(1)
    pc = PrefixCache(root, "fp", block_size=BLOCK, max_bytes=20_000)
    g = torch.Generator().manual_seed(seed)
    bad = 0
    for _ in range(60):
        i = int(torch.randint(0, 16, (), generator=g))
        p = [i] * BLOCK
        k = pc.block_keys(p)[0]
        got = pc.load(k, p, _expect())
        if got is None:
            pc.store(k, p, _tensors(i))
            pc.evict()
        elif not bool((got["latent"] == i).all()):
            bad += 1
    pc.record_stats()
    out.put((bad, pc.stats.corrupt, pc.stats.mismatched))


def test_concurrent_processes(tmp_path):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(tmp_path, s, q)) for s in range(3)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert all(r == (0, 0, 0) for r in results)  # no torn reads, nothing wrong returned
    assert PrefixCache(tmp_path, "fp", block_size=BLOCK).disk_bytes() <= 20_000
    import json

    totals = json.loads((tmp_path / "stats.json").read_text())
    assert totals["lookups"] == 180 and totals["hits"] + totals["misses"] == 180
    assert not list(tmp_path.glob("*/*.tmp"))
