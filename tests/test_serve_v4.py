"""Serving DeepSeek-V4 (attn "hybrid", ``flyer.serve.paged_hybrid``): each request's greedy tokens under continuous
batching (requests joining mid-run, chunked prefill, prompts crossing window and compression boundaries) and under
preemption == ``generate`` on its prompt alone (``HybridCache``, no paging); cancellation gives slots and blocks
back; the pool's blocks and slots are those ``kv_cache_bytes`` holds by ``flyer.model.counts``; ``flyer serve``
on a V4 run answers the ``openai`` client with generate's text and refuses a block size a ratio does not divide
(and --speculative mtp for a model without MTP) in one line (its on-disk prefix cache:
``tests/test_serve_v4_disk.py``). Tiny random model (``tests/hf_models.py``: window 8, ratios 0 / 4 / 16 / 4,
CSA top-4), FP32, CPU.

Tokens are compared exactly, as ``tests/test_serve_engine.py`` does: the batched paged path and the alone path
differ only by FP32 summation order (``tests/test_deepseek_v4_decode.py`` bounds that by ``v4_tolerance``), and a
wrong slot or block mapping changes the tokens (``test_a_wrong_slot_mapping_changes_the_tokens``)."""

import json
import signal
import subprocess
import sys

import httpx
import openai
import pytest
import torch
from child_env import child_env
from hf_models import VOCAB, build

from flyer.cli import main
from flyer.errors import FieldError
from flyer.infer import GenerationConfig, generate
from flyer.infer.hybrid_cache import HybridCache
from flyer.infer.prefix_cache import PrefixCache
from flyer.interop.hf import load_hf
from flyer.model.counts import kv_cache_bytes_per_token, kv_window_bytes
from flyer.serve.engine import Engine, EngineConfig, SamplingOptions
from flyer.train.checkpoint import save_checkpoint

BS = 16  # the least block size the ratios 4 and 16 divide


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    """(HF directory, flyer's model of it, its config)."""
    path = tmp_path_factory.mktemp("v4")
    build("v4", path)
    model, cfg, _ = load_hf(path)
    assert (cfg.window_size, cfg.compress_ratios, cfg.index_topk) == (8, (0, 4, 16, 4), 4)
    return path, model.eval(), cfg


def _slot_bytes(cfg, size: int) -> int:
    """A request's fixed state: its windows (``kv_window_bytes``) and the compressors' FP32 rings (2r slots of
    2 (32 + 16) channels per CSA layer, attention's and the indexer's; r of 32 for HCA; kv and gate each)."""
    csa, hca = 2 * (8 * 2 * 32 + 8 * 2 * 16), 2 * 16 * 32
    return kv_window_bytes(cfg, size) + 4 * (2 * csa + hca)


def _bytes(cfg, blocks: int, batch: int, block_size: int = BS) -> int:
    """kv_cache_bytes holding ``batch`` slots and ``blocks`` blocks (FP32), by the counts (not the cache)."""
    return batch * _slot_bytes(cfg, 4) + blocks * kv_cache_bytes_per_token(cfg, 4) * block_size


def _engine(model, cfg, blocks=64, batch=3, **over) -> Engine:
    return Engine(model, EngineConfig(kv_cache_bytes=_bytes(cfg, blocks, batch), block_size=BS, max_batch_size=batch,
                                      cache_dtype=torch.float32, **over))


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _alone(model, prompt, n):
    return generate(model, [prompt], GenerationConfig(max_new_tokens=n, cache_dtype=torch.float32)).tokens[0]


# prompt lengths: under a window, across CSA (4) and HCA (16) boundaries, longer than a block and several chunks
PROMPTS = [(3, 20), (9, 14), (21, 25), (38, 12), (70, 18), (1, 16)]


def _serve(eng: Engine, prompts, late_after: int = 0, late_from: int | None = None) -> list[list[int]]:
    """Each request's tokens; requests from ``late_from`` on are submitted after ``late_after`` steps."""
    outs = [[] for _ in prompts]
    late_from = len(prompts) if late_from is None else late_from
    for i, (p, n) in enumerate(prompts[:late_from]):
        eng.submit(p, SamplingOptions(max_tokens=n), lambda e, i=i: outs[i].append(e.token))
    for _ in range(late_after):
        eng.step()
    for i, (p, n) in enumerate(prompts[late_from:], late_from):
        eng.submit(p, SamplingOptions(max_tokens=n), lambda e, i=i: outs[i].append(e.token))
    eng.run_until_idle()
    return outs


@pytest.fixture(scope="module")
def requests(v4):
    """(prompt, max_tokens) per request and each one's tokens decoded alone."""
    model = v4[1]
    reqs = [(_prompt(n, seed), m) for seed, (n, m) in enumerate(PROMPTS)]
    return reqs, [_alone(model, p, m) for p, m in reqs]


def test_concurrent_requests_equal_generate_alone(v4, requests):
    """Three slots for six requests (the rest wait and join as others finish), two submitted after 5 steps
    (joining a running batch), 7-token prefill chunks (a prompt spread over steps, beside decoding rows)."""
    _, model, cfg = v4
    reqs, want = requests
    eng = _engine(model, cfg, prefill_chunk=7)
    assert eng.sharing  # blocks shared with boundary snapshots (tests/test_serve_v4_prefix.py)
    got = _serve(eng, reqs, late_after=5, late_from=4)
    assert got == want
    assert eng.alloc.used == 0 and eng.slots.available == 3


def test_preemption_recomputes_and_loses_nothing(v4, requests):
    """A pool of 6 usable blocks for requests needing 2 to 6 each: requests are preempted (slot and blocks given
    back) and recomputed from position 0; every one still makes its alone tokens, none lost or repeated."""
    _, model, cfg = v4
    reqs, want = requests
    eng = _engine(model, cfg, blocks=7, prefill_chunk=32)
    got = _serve(eng, reqs)
    assert eng.metrics.preemptions._value.get() > 0
    assert got == want
    assert eng.alloc.available == eng.alloc.capacity == 6 and eng.slots.available == 3


def test_cancellation_gives_back_slots_and_blocks(v4):
    _, model, cfg = v4
    eng = _engine(model, cfg, batch=2)
    events = [[] for _ in range(3)]
    reqs = [eng.submit(_prompt(20, i), SamplingOptions(max_tokens=40), events[i].append) for i in range(3)]
    eng.step()
    eng.step()
    assert eng.slots.available == 0 and eng.alloc.used == 4  # two running, 2 blocks each; one waits
    eng.cancel(reqs[0])
    eng.cancel(reqs[2])  # the waiting one
    eng.step()
    assert [e[-1].finish_reason for e in (events[0], events[2])] == ["cancelled", "cancelled"]
    assert eng.slots.available == 1 and eng.alloc.used == 2 and len(eng.running) == 1
    eng.cancel(reqs[1])
    eng.step()
    assert eng.slots.available == 2 and eng.alloc.available == eng.alloc.capacity and not eng.busy


def test_blocks_and_slots_from_kv_cache_bytes(v4, tmp_path):
    """Slots for max_batch_size requests first (the windows ``kv_window_bytes`` counts and the compressors'
    states), then whole blocks of ``kv_cache_bytes_per_token`` * block_size; one FieldError per bad field."""
    _, model, cfg = v4
    for batch, blocks in ((3, 5), (8, 2)):
        for spare in (0, kv_cache_bytes_per_token(cfg, 4) * BS - 1):
            eng = Engine(model, EngineConfig(kv_cache_bytes=_bytes(cfg, blocks, batch) + spare, block_size=BS,
                                             max_batch_size=batch, cache_dtype=torch.float32))
            assert eng.alloc.n_blocks == blocks and eng.limits.capacity == blocks - 1
            assert eng.slots.available == batch
            pool = eng.cache.layers
            assert sum(t.numel() * t.element_size() for s in pool for t in s.values()) == _bytes(cfg, blocks, batch)
    assert HybridCache.paged(cfg, 1, 1, BS, torch.bfloat16, "meta").window_bytes() == \
        kv_window_bytes(cfg, 2) + _slot_bytes(cfg, 4) - kv_window_bytes(cfg, 4)  # the states stay FP32
    bad = [(dict(kv_cache_bytes=_bytes(cfg, 2, 3) - 1), "kv_cache_bytes"),
           (dict(kv_cache_bytes=_bytes(cfg, 9, 3), block_size=8), "block_size"),
           (dict(kv_cache_bytes=_bytes(cfg, 9, 3), block_size=24), "block_size"),
           (dict(kv_cache_bytes=_bytes(cfg, 9, 3), prefix_cache=PrefixCache(tmp_path, "fp", block_size=32)),
            "prefix_cache")]  # an on-disk cache of other blocks than the pool's
    for over, field in bad:
        with pytest.raises(FieldError) as e:
            Engine(model, EngineConfig(**{"block_size": BS, "max_batch_size": 3, "cache_dtype": torch.float32,
                                          **over}))
        assert e.value.field == field and "\n" not in str(e.value)


def test_a_wrong_slot_mapping_changes_the_tokens(v4, requests, monkeypatch):
    """The mutation check of the equality above: rows reading each other's slots (their windows and partial
    states) make other tokens."""
    _, model, cfg = v4
    reqs, want = requests
    view = HybridCache.view
    monkeypatch.setattr(HybridCache, "view", lambda self, tables, slots: view(self, tables, slots.flip(0)))
    assert _serve(_engine(model, cfg, prefill_chunk=7), reqs[:3]) != want[:3]


@pytest.fixture(scope="module")
def run_dir(v4, tmp_path_factory):
    """A flyer run of the V4 model (its config, weights and the HF directory's tokenizer)."""
    path, model, cfg = v4
    run = tmp_path_factory.mktemp("v4run")
    save_checkpoint(run / "checkpoints", 3, {"model.safetensors": model.state_dict(), "config.json": cfg.to_dict(),
                                             "tokenizer.json": json.loads((path / "tokenizer.json").read_text())})
    return run


def test_cli_serves_v4_like_generate(run_dir, capsys):
    """``flyer serve`` on a free loopback port: the openai client's completions (whole and streamed, a prompt
    past several windows and entries) are ``flyer generate``'s greedy text."""
    prompts = ["the quick brown fox", "hello world, flyer reads checkpoints " * 3]
    proc = subprocess.Popen([sys.executable, "-m", "flyer", "serve", "--ckpt", str(run_dir), "--port", "0",
                             "--cache-dtype", "fp32", "--kv-cache-memory", "4M", "--threads", "1", "--device", "cpu",
                             "--max-batch-size", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        want = []  # while the server starts (one thread each)
        for p in prompts:
            assert main(["generate", "--ckpt", str(run_dir), "--prompt", p, "--max-new-tokens", "12", "--cache-dtype",
                         "fp32", "--device", "cpu", "--json", "--threads", "1"]) == 0
            want.append(json.loads(capsys.readouterr().out)["text"])
        line = proc.stdout.readline()
        assert line.startswith("flyer serve: ready on http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split()[4]
        assert httpx.get(url + "/health").status_code == 200
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        name = client.models.list().data[0].id
        for p, w in zip(prompts, want):
            r = client.completions.create(model=name, prompt=p, max_tokens=12, temperature=0)
            assert r.choices[0].text == w
            stream = client.completions.create(model=name, prompt=p, max_tokens=12, temperature=0, stream=True)
            assert "".join(c.choices[0].text for c in stream) == w
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("flags, flag, why", [(["--prefix-cache", "PC", "--block-size", "24"], "--block-size",
                                               "compression ratio"),
                                              (["--block-size", "8"], "--block-size", "compression ratio"),
                                              (["--speculative", "mtp"], "--speculative", "mtp_depth")])
def test_cli_refuses_what_v4_cannot_serve_in_one_line(run_dir, tmp_path, capsys, flags, flag, why):
    """--speculative mtp serves V4 (``tests/test_serve_v4_speculative.py``); this model has no MTP module."""
    flags = [str(tmp_path / f) if f == "PC" else f for f in flags]
    assert main(["serve", "--ckpt", str(run_dir), "--device", "cpu", "--port", "0", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and why in err[0], err
