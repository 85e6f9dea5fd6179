"""``--cache-dtype fp8`` with the on-disk prefix cache (``--prefix-cache DIR``): an FP8 run's entries hold the FP8
rows as written (codes, scales, rope values: 656 bytes a token and layer at V3's dims, against BF16's 1,152), keyed
by the cache dtype and the row layout, so a warm run restores the cold run's rows bit for bit:

- ``generate``: a warm run's loaded rows are the cold run's bytes, its greedy tokens the cold run's and its first
  logits within the FP32 decode tolerance of ``tests/test_cache_fp8.py`` (the positions it recomputes sum in
  another chunk shape; where that moves a code, within the E4M3 one);
- ``serve``'s disk tier: a second engine (new pool, same directory bounded below its blocks: LRU eviction on disk),
  under preemption and in-memory eviction, with and without MTP speculation, gives each request its ``generate``
  tokens; ``flyer serve --cache-dtype fp8 --prefix-cache DIR`` builds such an engine, keyed as ``generate``'s;
- a BF16 run's entries are never read by an FP8 run, nor the reverse (other keys: a miss; a file put at the
  other's key: mismatched);
- mutations: rows restored without their scales leave the cold run's bytes, land outside even the E4M3 bound
  (and 100 times the FP32 one) and change a served request's tokens.

Tolerance: tokens exactly (greedy ties are improbable with random FP32 weights, as ``tests/test_infer_prefix.py``
argues); logits by ``tests.test_cache_fp8``'s FP32 decode tolerance."""

import json
import sys

import pytest
import torch
from bounds import FP32_U
from trained import counting_model

import flyer.serve.cli as serve_cli
from flyer.cli import main
from flyer.config import preset
from flyer.infer import GenerationConfig, PrefixCache, generate
from flyer.infer.cache_fp8 import FP8, token_bytes
from flyer.infer.decoder import Decoder
from flyer.infer.generate import open_prefix_cache, prefill
from flyer.infer.prefix_cache import _split
from flyer.model.transformer import Transformer
from flyer.serve.disk_tier import open_disk_prefix_cache
from flyer.serve.engine import Engine
from flyer.serve.paged import PagedCache
from test_cache_fp8 import E4M3_U, V, _dense_model, _engine, _progression, _rel, _served

BLOCK = 8
# the serve tests' directory, by MTP rows or not: 8 of the 12 blocks' files (1.7 KiB each, 2.3 KiB with MTP's)
BOUND = {False: 14 << 10, True: 19 << 10}


@pytest.fixture(scope="module")
def trained():
    return counting_model(V)


def _tolerances(cfg) -> tuple[float, float]:
    """(FP32 decode tolerance, FP8 decode tolerance), ``test_cache_fp8.test_decode_logits_within_the_e4m3_bound``'s
    pair: each layer's FP32 sums, then E4M3's rounding carried through each layer (3 x 2^-4 of the output's
    scale) and the rope key's BF16 on top."""
    fp32 = cfg.n_layers * (cfg.dim + cfg.inter_dim + cfg.q_lora_rank + cfg.kv_lora_rank + cfg.qk_rope_head_dim + 18) \
        * FP32_U
    return fp32, cfg.n_layers * (3 * E4M3_U + 2 * 2.0**-9) + fp32


def _gen(model, prompt, pc, dtype=FP8):
    return generate(model, [prompt], GenerationConfig(max_new_tokens=6, cache_dtype=dtype, prefix_cache=pc))


def _prompt(n=29, seed=0):
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _rows(model, prompt, pc) -> torch.Tensor:
    """(L, len(prompt), token_bytes) uint8: the FP8 rows after ``prefill`` (of the main model's cache)."""
    dec = Decoder(model, 1, len(prompt) + 1, "absorbed", FP8, with_mtp=len(model.mtp) > 0)
    prefill(dec, [prompt], pc)
    return dec.cache.packed[:, 0, :len(prompt)].clone()


def _drop_scales(monkeypatch):
    """The mutation: blocks restored with their codes but scales of 1 (the codes alone)."""
    load = PrefixCache.load

    def without_scales(self, *a, **k):
        blk = load(self, *a, **k)
        return None if blk is None else {n: torch.ones_like(t) if n.endswith("latent_scale") else t
                                         for n, t in blk.items()}
    monkeypatch.setattr(PrefixCache, "load", without_scales)


@pytest.mark.parametrize("mutated", [False, True])
def test_generate_warm_restores_the_cold_rows(tmp_path, monkeypatch, mutated):
    model, prompt = _dense_model(), _prompt()  # 3 full blocks + 5 tokens
    cold = _gen(model, prompt, None)
    cold_rows = _rows(model, prompt, None)
    pc = open_prefix_cache(model, tmp_path, cache_dtype=FP8, block_size=BLOCK)
    first = _gen(model, prompt, pc)
    assert first.prefix["hits"] == 0 and first.prefix["stored"] == 3
    assert first.tokens == cold.tokens and torch.equal(first.first_logits, cold.first_logits)
    if mutated:
        _drop_scales(monkeypatch)
    warm = _gen(model, prompt, pc)
    assert warm.prefix["hits"] == 3 and warm.prefix["tokens_loaded"] == 24
    # the loaded rows [0, 23) (position 23 is recomputed for its hidden state) are the cold run's bytes; the
    # recomputed ones [23, 29) differ from the cold run's by FP32 summation order alone, which can move a code
    # across an E4M3 rounding point on another CPU's kernels: then the logits are held to E4M3's bound
    rows = _rows(model, prompt, pc)
    err, (fp32_tol, fp8_tol) = _rel(warm.first_logits, cold.first_logits), _tolerances(model.cfg)
    if not mutated:
        assert torch.equal(rows[:, :23], cold_rows[:, :23]) and warm.tokens == cold.tokens
        tol = fp32_tol if torch.equal(rows, cold_rows) else fp8_tol
        assert err <= tol, (err, tol)
    else:
        assert not torch.equal(rows[:, :23], cold_rows[:, :23])
        assert err > fp8_tol and err > 100 * fp32_tol, (err, fp8_tol, fp32_tol)


def test_an_entry_holds_the_fp8_rows_656_bytes_a_token_and_layer(tmp_path):
    """V3's latent widths (C = 512, R = 64): an FP8 entry's payload is the codes, 4 FP32 scales and 64 BF16 rope
    values of each token and layer (656 bytes), a BF16 run's 1,152; the file names each part's dtype."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=V, n_layers=1, n_dense_layers=1, n_heads=2, kv_lora_rank=512,
                               qk_rope_head_dim=64)).eval()
    L = model.cfg.n_layers + len(model.mtp)  # entries hold the MTP module's cache too
    assert token_bytes(512, 64) == 656 and L == 2
    payload = {}
    for dtype in (FP8, torch.bfloat16):
        root = tmp_path / str(dtype)
        _gen(model, _prompt(BLOCK + 3), open_prefix_cache(model, root, cache_dtype=dtype, block_size=BLOCK),
             dtype)
        (f,) = root.glob("*/*.blk")
        header, payload[dtype] = _split(f.read_bytes())
        if dtype == FP8:
            table = {e["name"]: (e["dtype"], e["shape"]) for e in header["tensors"]}
            assert table["latent"] == ("torch.float8_e4m3fn", [1, BLOCK, 512])
            assert table["latent_scale"] == ("torch.float32", [1, BLOCK, 4])
            assert table["rope_key"] == ("torch.bfloat16", [1, BLOCK, 64])
    # the main layer's BLOCK tokens, and the MTP module's BLOCK - 1 (its entry j needs token j + 1)
    tokens = BLOCK + BLOCK - 1
    assert len(payload[FP8]) == tokens * 656 and len(payload[torch.bfloat16]) == tokens * 1152


def test_bf16_entries_are_not_read_by_an_fp8_run_nor_the_reverse(tmp_path, monkeypatch):
    """The fingerprint keys entries by the cache dtype and the FP8 row layout: each run finds only its own (both
    kinds live in one directory); a file of the other kind put at a run's key is mismatched, never loaded."""
    model, prompt = _dense_model(), _prompt()
    cold = {dt: _gen(model, prompt, None, dt) for dt in (FP8, torch.bfloat16)}
    opened = {dt: lambda dt=dt: open_prefix_cache(model, tmp_path, cache_dtype=dt, block_size=BLOCK)
              for dt in cold}
    for writer, reader in ((torch.bfloat16, FP8), (FP8, torch.bfloat16)):
        for p in tmp_path.glob("*/*.blk"):
            p.unlink()
        _gen(model, prompt, opened[writer](), writer)
        r = _gen(model, prompt, opened[reader](), reader)  # finds none: stores its own beside
        assert r.prefix["hits"] == 0 and r.prefix["stored"] == 3 and r.tokens == cold[reader].tokens
        assert _gen(model, prompt, opened[writer](), writer).prefix["hits"] == 3  # the writer's are still there
        # the writer's files moved to the reader's keys: mismatched (fingerprint, tensor table), recomputed
        w, rd = opened[writer](), opened[reader]()
        for wk, rk in zip(w.block_keys(prompt), rd.block_keys(prompt)):
            rd.path(rk).write_bytes(w.path(wk).read_bytes())
        r = _gen(model, prompt, rd, reader)
        assert r.prefix["hits"] == 0 and r.prefix["mismatched"] == 1 and r.tokens == cold[reader].tokens
        torch.testing.assert_close(r.first_logits, cold[reader].first_logits, atol=0, rtol=0)
    # the row layout is part of the key: another layout or scale rule would miss
    fp = opened[FP8]().fingerprint
    monkeypatch.setattr(sys.modules["flyer.infer.generate"], "ROWS_LAYOUT", "another")  # the module, not generate()
    assert opened[FP8]().fingerprint != fp


@pytest.mark.parametrize("speculative,mutated", [(None, False), ("mtp", False), (None, True)])
def test_serve_disk_tier_under_preemption_and_eviction_gives_the_cold_tokens(trained, tmp_path, monkeypatch,
                                                                              speculative, mutated):
    """A first engine writes its prompts' blocks to a directory bounded below them (the disk evicts, least recently
    used first); a second (new pool, same directory, a pool small enough to preempt requests and evict its shared
    blocks) loads what is left and recomputes the rest: each request's tokens are its cold ``generate`` ones. With
    MTP speculation the files hold the MTP pool's FP8 rows too."""
    head = _progression(3, 2, 17)
    prompts = [head + _progression(5, 3, n) for n in (3, 14)] + [_progression(7, 1, 22), head + [9]]
    alone = [generate(trained, [p], GenerationConfig(max_new_tokens=10, cache_dtype=FP8)).tokens[0] for p in prompts]
    mtp = speculative == "mtp"
    first_pc = open_disk_prefix_cache(trained, tmp_path, FP8, 4, max_bytes=BOUND[mtp])
    first = _engine(trained, FP8, speculative=speculative, prefix_cache=first_pc)
    assert _served(first, prompts, 10) == alone
    assert first_pc.stats.stored > 0 and first_pc.stats.evicted > 0
    if mutated:
        _drop_scales(monkeypatch)
    pc = open_disk_prefix_cache(trained, tmp_path, FP8, 4, max_bytes=BOUND[mtp])
    second = _engine(trained, FP8, blocks=14, prefill_chunk=8, speculative=speculative, prefix_cache=pc)
    got = _served(second, prompts, 10)
    assert pc.stats.hits > 0 and pc.stats.misses > 0
    if mutated:
        assert got != alone
        return
    assert got == alone
    assert second.metrics.preemptions._value.get() > 0
    assert second.alloc.used == 0


def test_cli_generate_with_fp8_and_a_prefix_cache(tmp_path, capsys):
    """``flyer generate --cache-dtype fp8 --prefix-cache DIR``: the second run loads the first one's blocks and
    prints its tokens."""
    argv = ["generate", "--preset", "tiny", "--prompt", "a prompt of some forty characters, or more",
            "--max-new-tokens", "3", "--cache-dtype", "fp8", "--prefix-cache", str(tmp_path), "--prefix-block", "8",
            "--json"]
    runs = []
    for _ in range(2):
        assert main(argv) == 0
        runs.append(json.loads(capsys.readouterr().out))
    stored = runs[0]["prefix_cache"]["stored"]
    assert stored > 0 and runs[1]["prefix_cache"]["hits"] == stored
    assert runs[1]["token_ids"] == runs[0]["token_ids"] and runs[1]["cache_dtype"] == "fp8"


class _Built(Exception):
    pass


def serve_engine(monkeypatch, *flags: str) -> Engine:
    """The engine ``flyer serve --preset tiny --device cpu --port 0 --kv-cache-memory 8M FLAGS`` builds, taken
    before it serves."""
    built = []

    def stand_in(model, cfg, **kw):
        built.append(Engine(model, cfg, **kw))
        raise _Built
    monkeypatch.setattr(serve_cli, "Engine", stand_in)
    with pytest.raises(_Built):
        main(["serve", "--preset", "tiny", "--device", "cpu", "--port", "0", "--kv-cache-memory", "8M", *flags])
    return built[0]


def test_cli_serve_with_fp8_and_a_prefix_cache(tmp_path, monkeypatch):
    """``flyer serve --cache-dtype fp8 --prefix-cache DIR`` builds an engine whose FP8 pool has the disk tier, its
    entries keyed as ``flyer generate``'s FP8 ones at the same block size."""
    eng = serve_engine(monkeypatch, "--cache-dtype", "fp8", "--prefix-cache", str(tmp_path), "--block-size", "16")
    assert isinstance(eng.cache, PagedCache) and eng.cache.pool.packed.dtype == torch.uint8
    assert eng.disk is not None and eng.cfg.cache_dtype == FP8
    same = open_prefix_cache(eng.model, tmp_path, cache_dtype=FP8, block_size=16)
    assert eng.cfg.prefix_cache.fingerprint == same.fingerprint
