"""The on-disk prefix cache of ``flyer serve`` for DeepSeek-V4 (``flyer.serve.engine`` over
``flyer.infer.prefix_cache_hybrid``'s files): an engine stores its prompts' blocks and boundary snapshots, and a
second engine (new pool, new ``PrefixCache``, the same directory) resumes from them:

- greedy and seeded tokens equal those of an engine without any prefix cache (and greedy ``generate`` alone), with
  and without MTP speculation, and under speculation the same drafts and accepted counts request by request, the
  first-draft MTP logits within the tolerance of the uncached run's; the disk's hit counters and the tokens taken
  from it are positive;
- the mutations: a snapshot file set without its MTP part (its MTP window) moves those logits far outside the
  tolerance and the drafts; another boundary's snapshot for the one looked up changes the tokens;
- one format: a directory ``flyer generate --prefix-cache`` wrote serves the engine, and the other way round;
- a corrupt snapshot file is ignored (the prompt recomputed, the file written again);
- the CLI: ``flyer serve --preset tiny-v4 --prefix-cache DIR`` builds an engine whose disk cache has its block size,
  and a block size a ratio does not divide is one line naming --block-size, before anything is written.

Tiny-v4 random (window 8, ratios 0 / 4 / 16 / 4, CSA top-4, an MTP module; ``tests/test_v4_speculative.py``'s
``_config``), FP32, CPU; blocks of 16 tokens.

Tolerance: tokens and drafts exactly, as ``tests/test_serve_v4_share_spec.py`` asks of in-memory sharing (a resumed
request sums as an uncached one in other chunks, so an argmax differs only where two logits lie within that, which
random FP32 weights make improbable); the first-draft logits by ``rel`` within ``v4_tolerance`` of the main model
and the MTP block as one more layer; with 32-token chunks the resumed request's chunks after the boundary are the
uncached one's, so its logprobs are compared exactly."""

import pytest
import torch

import flyer.serve.cli as serve_cli
import flyer.serve.disk_tier as disk_tier
from flyer.cli import main
from flyer.config import preset
from flyer.infer.generate import GenerationConfig, generate, open_prefix_cache
from flyer.infer.hybrid_cache import HybridCache
from flyer.infer.prefix_cache_hybrid import snapshot_key
from flyer.model.transformer import Transformer
from flyer.serve.disk_tier import open_disk_prefix_cache
from flyer.serve.engine import Engine, EngineConfig, SamplingOptions
from flyer.serve.paged_hybrid import make_mtp_hybrid_cache
from tests.test_serve_v4_share_spec import PROMPTS, _logit_errors, _record, _tolerance
from tests.test_v4_speculative import _config

BS = 16
# ``PROMPTS`` (tests/test_serve_v4_share_spec.py): a 32-token system prompt, then 1, 3, 1, 18 and 3 tokens. A first
# engine, one after another, leaves snapshots at 32 (the first request: its last full block) and 48 (the fourth);
# a second engine takes each from disk or, once one of its requests loaded it, from its own memory
RESUMED = [32, 32, 32, 48, 32]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(_config()).eval()
    assert len(m.mtp) == 1 and m.cfg.compress_ratios == (0, 4, 16, 4)
    return m


@pytest.fixture(scope="module")
def plain_model():
    """The same shapes without an MTP module (its disk files hold no MTP part either)."""
    torch.manual_seed(0)
    return Transformer(preset("tiny-v4", vocab_size=256, window_size=8, index_topk=4, mtp_depth=0)).eval()


def _engine(model, pc=None, spec: bool = False, sharing: bool = True, blocks: int = 80, batch: int = 3,
            chunk: int = 16) -> Engine:
    probe = HybridCache.paged(model.cfg, 1, 1, BS, torch.float32, "meta")
    slot = probe.window_bytes() + (make_mtp_hybrid_cache(model.cfg, 1, torch.float32, "meta").window_bytes()
                                   if spec else 0)
    return Engine(model, EngineConfig(kv_cache_bytes=batch * slot + blocks * probe.block_bytes(), block_size=BS,
                                      max_batch_size=batch, cache_dtype=torch.float32, prefix_sharing=sharing,
                                      prefill_chunk=chunk, speculative="mtp" if spec else None,
                                      draft_tokens=2 if spec else 1, prefix_cache=pc))


def _pc(model, path):
    return open_disk_prefix_cache(model, path, torch.float32, BS)


def _run(eng: Engine, prompts, logprobs: int | None = None, **opts) -> tuple[list[list], list]:
    """Each request's events' (token, logprob), one request after another, and the requests."""
    outs, reqs = [[] for _ in prompts], []
    for i, (p, n) in enumerate(prompts):
        o = SamplingOptions(max_tokens=n, logprobs=logprobs,
                            **{k: v + i if k == "seed" else v for k, v in opts.items()})
        reqs.append(eng.submit(p, o, lambda e, i=i: outs[i].append((e.token, e.logprob))))
        eng.run_until_idle()
    return outs, reqs


def _tokens(outs) -> list[list[int]]:
    return [[t for t, _ in o] for o in outs]


SAMPLING = {"greedy": {}, "seeded": dict(temperature=0.8, seed=7)}


@pytest.fixture(scope="module")
def uncached(model):
    """``(spec, sampling)`` -> an engine without any prefix cache on ``PROMPTS``, one after another: its events, and
    under speculation its draft records and first-draft logits. Memoized: the runs are deterministic (greedy, or
    seeded), and the resume and mutation tests compare against the same ones."""
    memo = {}

    def run(spec: bool, sampling: str):
        if (spec, sampling) not in memo:
            plain = _engine(model, spec=spec, sharing=False)
            log, first = _record(plain) if spec else ({}, {})
            want, _ = _run(plain, PROMPTS, **SAMPLING[sampling])
            memo[spec, sampling] = want, dict(log), dict(first)
        return memo[spec, sampling]
    return run


@pytest.fixture(scope="module")
def alone(model):
    """Greedy ``generate`` on each prompt alone."""
    return [generate(model, [p], GenerationConfig(max_new_tokens=n, cache_dtype=torch.float32)).tokens[0]
            for p, n in PROMPTS]


@pytest.mark.parametrize("spec", [False, True])
@pytest.mark.parametrize("sampling", list(SAMPLING))
def test_a_second_engine_resumes_from_disk(model, uncached, alone, tmp_path, sampling, spec):
    opts = SAMPLING[sampling]
    want, log_plain, first_plain = uncached(spec, sampling)
    if sampling == "greedy":
        assert _tokens(want) == alone
    first = _engine(model, _pc(model, tmp_path), spec)
    got, reqs = _run(first, PROMPTS, **opts)
    assert _tokens(got) == _tokens(want) and reqs[0].n_shared == 0
    assert first.cfg.prefix_cache.stats.stored == 3 + 2  # 3 blocks; snapshots at 32 and 48
    pc = _pc(model, tmp_path)  # a new server on the same directory
    second = _engine(model, pc, spec)
    log, first_logits = _record(second) if spec else ({}, {})
    got, reqs = _run(second, PROMPTS, **opts)
    print(f"spec={spec} {sampling}: {pc.summary()}; shared {[r.n_shared for r in reqs]}")
    assert _tokens(got) == _tokens(want)
    assert [r.n_shared for r in reqs] == RESUMED
    # the first request's 2 blocks and snapshot at 32, the fourth's third block and snapshot at 48
    assert pc.stats.hits == 5 and pc.stats.tokens_loaded == 32 + 16 and pc.stats.corrupt == 0
    if spec:
        errs, tol = _logit_errors(first_logits, first_plain), _tolerance(model.cfg)
        print(f"draft logits' errors {[f'{e:.1e}' for e in errs.values()]} (tolerance {tol:.1e}); accepted "
              f"{second.accepted} of {second.drafted}")
        assert dict(log) == dict(log_plain) and max(errs.values()) <= tol


def test_a_resumed_request_continues_bit_for_bit(model, tmp_path):
    """The fourth prompt (50 tokens): the storing engine's prefill stops at 48 (its snapshot) and feeds [48, 50);
    a new engine resumed at 48 from disk feeds the same chunk, so its logprobs are exactly the storing run's (and
    its tokens the uncached engine's)."""
    prompt = [(PROMPTS[3][0], 6)]
    want, _ = _run(_engine(model, sharing=False, chunk=32), prompt, logprobs=3)
    stored, _ = _run(_engine(model, _pc(model, tmp_path), chunk=32), prompt, logprobs=3)
    got, reqs = _run(_engine(model, _pc(model, tmp_path), chunk=32), prompt, logprobs=3)
    assert reqs[0].n_shared == 48 and got == stored and _tokens(got) == _tokens(want)


def _drop_mtp_part(monkeypatch) -> None:
    """Mutation: a snapshot file's main slot and hidden streams set, its MTP window not (the slot keeps zeros or its
    last occupant's ring)."""
    set_snapshot = disk_tier.set_snapshot

    def main_only(cache, slot, snap, mtp_cache=None):
        set_snapshot(cache, slot, snap)
        return snap["mtp.hidden"]
    monkeypatch.setattr(disk_tier, "set_snapshot", main_only)


def _another_boundary(monkeypatch) -> None:
    """Mutation: the snapshot at 48 read from the file at 32 (the same names and shapes)."""
    load = disk_tier.load_snapshot
    monkeypatch.setattr(disk_tier, "load_snapshot", lambda pc, keys, prompt, at, expect:
                        load(pc, keys, prompt, 32 if at == 48 else at, expect))


def test_a_snapshot_file_without_its_mtp_part_changes_the_drafts(model, uncached, tmp_path, monkeypatch):
    """Each request run in a new engine on the stored directory, so each resumes from disk: with the MTP window
    dropped, the draft logits of requests resuming near the boundary are far outside the tolerance (measured:
    see the printout) and the random model drafts other tokens; the greedy tokens stay (speculation keeps them)."""
    want, log_plain, first_plain = uncached(True, "greedy")
    _run(_engine(model, _pc(model, tmp_path), True), PROMPTS)
    _drop_mtp_part(monkeypatch)
    log, first, got = {}, {}, []
    for i, prompt in enumerate(PROMPTS):
        eng = _engine(model, _pc(model, tmp_path), True)
        eng._ids = iter(range(i, i + 1))  # the request ids of the uncached run
        lg, fl = _record(eng)
        out, reqs = _run(eng, [prompt])
        assert reqs[0].n_shared == RESUMED[i]
        got += out
        log.update(lg)
        first.update(fl)
    errs, tol = _logit_errors(first, first_plain), _tolerance(model.cfg)
    differ = sum(a != b for i in log_plain for a, b in zip(log[i], log_plain[i], strict=True))
    print(f"no MTP part: draft logits' errors {[f'{e:.1e}' for e in errs.values()]} (tolerance {tol:.1e}); "
          f"{differ} verifications drafted otherwise")
    assert _tokens(got) == _tokens(want)
    assert min(errs[i] for i in (1, 2, 4)) > 10 * tol and differ > 0


@pytest.mark.parametrize("mutated", [False, True])
def test_another_boundarys_snapshot_changes_the_tokens(model, tmp_path, monkeypatch, mutated):
    """The fourth prompt (50 tokens) alone in a new engine resumes at 48 from disk: its uncached tokens, and other
    tokens when the file at 32 is read for the one at 48."""
    prompt = [(PROMPTS[3][0], 12)]
    want, _ = _run(_engine(model, sharing=False), prompt)
    _run(_engine(model, _pc(model, tmp_path)), PROMPTS[:1] + prompt)  # snapshots at 32 and 48
    if mutated:
        _another_boundary(monkeypatch)
    got, reqs = _run(_engine(model, _pc(model, tmp_path)), prompt)
    assert reqs[0].n_shared == 48
    assert (_tokens(got) == _tokens(want)) != mutated


@pytest.mark.parametrize("spec", [False, True])
def test_generate_and_serve_read_each_others_files(model, plain_model, tmp_path, spec):
    """Same model, dtype and block size (``flyer generate --prefix-block 16``; a model with MTP: serve under
    ``--speculative mtp``, whose files hold the MTP part generate's hold): either one's directory resumes the
    other's prompt at 32 with its uncached tokens."""
    m = model if spec else plain_model
    prompt, n = PROMPTS[1]

    def gen(pc=None):
        return generate(m, [prompt], GenerationConfig(max_new_tokens=n, cache_dtype=torch.float32, prefix_cache=pc))
    want = gen().tokens[0]
    gen_pc = open_prefix_cache(m, tmp_path / "g", cache_dtype=torch.float32, block_size=BS)
    assert gen_pc.fingerprint == _pc(m, tmp_path / "g").fingerprint
    assert gen(gen_pc).prefix["stored"] == 3  # 2 blocks, the snapshot at 32
    pc = _pc(m, tmp_path / "g")
    got, reqs = _run(_engine(m, pc, spec), [(prompt, n)])
    assert reqs[0].n_shared == 32 and pc.stats.hits == 3 and _tokens(got) == [want]
    _run(_engine(m, _pc(m, tmp_path / "s"), spec), [(prompt, n)])
    warm = gen(open_prefix_cache(m, tmp_path / "s", cache_dtype=torch.float32, block_size=BS))
    assert warm.prefix["hits"] == 3 and warm.prefix["tokens_loaded"] == 32 and warm.tokens[0] == want


def test_a_corrupt_snapshot_file_is_ignored_and_written_again(model, tmp_path):
    prompt = [PROMPTS[0]]
    want, _ = _run(_engine(model, sharing=False), prompt)
    pc = _pc(model, tmp_path)
    _run(_engine(model, pc), prompt)
    f = pc.path(snapshot_key(pc.block_keys(prompt[0][0])[1]))
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    pc = _pc(model, tmp_path)
    got, reqs = _run(_engine(model, pc), prompt)
    assert pc.stats.corrupt == 1 and reqs[0].n_shared == 0 and _tokens(got) == _tokens(want)
    assert f.read_bytes() != bytes(data)  # its request left it again
    pc = _pc(model, tmp_path)
    got, reqs = _run(_engine(model, pc), prompt)
    assert pc.stats.corrupt == 0 and reqs[0].n_shared == 32 and _tokens(got) == _tokens(want)


class _Built(Exception):
    """Raised by the stand-in Engine once the real one is built: the server is not started."""


def test_cli_takes_a_v4_prefix_cache(tmp_path, monkeypatch, capsys):
    """``flyer serve --preset tiny-v4 --prefix-cache DIR``: the engine is built with a disk cache of its block
    size (the default, 16 for ratios 4 and 16); --block-size 24 is refused in one line before DIR is made."""
    built = []

    def stand_in(model, cfg, **kw):
        built.append(Engine(model, cfg, **kw))
        raise _Built
    monkeypatch.setattr(serve_cli, "Engine", stand_in)
    base = ["serve", "--preset", "tiny-v4", "--device", "cpu", "--port", "0", "--kv-cache-memory", "16M"]
    with pytest.raises(_Built):
        main(base + ["--prefix-cache", str(tmp_path / "pc")])
    eng = built[0]
    assert eng.cfg.block_size == eng.cfg.prefix_cache.block_size == 16 and eng.disk.snapshot is not None
    assert (tmp_path / "pc").is_dir()
    assert main(base + ["--prefix-cache", str(tmp_path / "bad"), "--block-size", "24"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flyer: error: --block-size: must be a multiple"), err
    assert "[4, 16] of DeepSeek-V4's hybrid attention (got 24)" in err[0]
    assert not (tmp_path / "bad").exists()

