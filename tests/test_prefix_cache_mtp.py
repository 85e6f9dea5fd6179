"""One on-disk prefix cache per checkpoint, whichever MTP setting wrote it (``flyer.infer.prefix_cache``'s
``MTP_PREFIX``): the entries are keyed without the MTP setting, the main model's rows are shared, and an entry's MTP
rows (MLA: a block's MTP cache rows; DeepSeek-V4: a snapshot's MTP part) serve the readers that need them.

- an entry a speculating run wrote (``generate --speculative mtp``) serves ``serve`` without speculation, which
  leaves its MTP rows out: every block (and V4 snapshot) a hit, the tokens the uncached run's;
- an entry written without MTP rows (``serve`` without speculation) serves ``generate`` without ``--speculative``
  (hits, its tokens), and is a miss for a speculating reader (``generate --speculative mtp``, ``serve
  --speculative mtp``): its MTP entries need the main model's hidden states of every position before, a whole
  prefill, so it recomputes the prompt (the uncached tokens, drafts and accepted counts) and overwrites the entry
  with its MTP rows, which the next speculating reader then loads;
- V4: a run without speculation that resumed from a snapshot without its MTP part leaves its later snapshots
  without theirs too (its MTP window lacks the positions before): a speculating reader does not resume from them.

MLA (random dense layers, an MTP module: ``tests/test_cache_fp8.py``'s ``_dense_model``) in FP32 and FP8; V4: the
``tests/test_serve_v4_disk.py`` model. Tokens exactly (greedy; ``tests/test_infer_prefix.py`` argues the ties)."""

import json

import pytest
import torch

from flyer.cli import main
from flyer.infer import GenerationConfig, PrefixCache, generate
from flyer.infer.cache_fp8 import FP8
from flyer.infer.generate import open_prefix_cache
from flyer.serve.disk_tier import open_disk_prefix_cache
from flyer.serve.engine import SamplingOptions
from tests.test_cache_fp8 import _dense_model
from tests.test_cache_fp8 import _engine as mla_engine
from tests.test_cache_fp8_prefix import serve_engine
from tests.test_cache_fp8_prefix_interop import BLOCK, NEW, _prompt
from tests import test_serve_v4_disk
from tests.test_serve_v4_disk import BS, PROMPTS, _run, _tokens
from tests.test_serve_v4_disk import _engine as v4_engine

DTYPES = {"fp32": torch.float32, "fp8": FP8}
v4 = test_serve_v4_disk.model  # the same fixture: tiny-v4 random, window 8, ratios 0 / 4 / 16 / 4, an MTP module


@pytest.fixture(scope="module")
def mla():
    m = _dense_model()
    assert len(m.mtp) == 1
    return m


def _gen(model, prompt, pc, dtype, spec=False, n=NEW):
    return generate(model, [prompt], GenerationConfig(max_new_tokens=n, cache_dtype=dtype, prefix_cache=pc,
                                                      speculative="mtp" if spec else None))


def _serve(model, prompt, root, dtype, spec=False):
    """(tokens, disk statistics) of ``prompt`` alone on a fresh engine over directory ``root``."""
    pc = open_disk_prefix_cache(model, root, dtype, BLOCK)
    eng, tokens = mla_engine(model, dtype, block_size=BLOCK, speculative="mtp" if spec else None, prefix_cache=pc), []
    eng.submit(prompt, SamplingOptions(max_tokens=NEW), lambda e: tokens.append(e.token))
    eng.run_until_idle()
    return tokens, pc.stats


def _gen_pc(model, root, dtype):
    return open_prefix_cache(model, root, cache_dtype=dtype, block_size=BLOCK)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_mla_a_speculating_writer_serves_readers_without_mtp(mla, tmp_path, dtype):
    dtype = DTYPES[dtype]
    prompt = _prompt()  # 3 full blocks before its last token
    cold = _gen(mla, prompt, None, dtype).tokens[0]
    wrote = _gen(mla, prompt, _gen_pc(mla, tmp_path, dtype), dtype, spec=True)
    assert wrote.prefix["stored"] == 3 and wrote.tokens[0] == cold
    tokens, stats = _serve(mla, prompt, tmp_path, dtype)
    assert (stats.hits, stats.tokens_loaded, stats.mismatched) == (3, 3 * BLOCK, 0) and tokens == cold


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_mla_a_writer_without_mtp_rows(mla, tmp_path, dtype):
    dtype = DTYPES[dtype]
    prompt = _prompt(seed=2)
    cold = _gen(mla, prompt, None, dtype)
    cold_spec = _gen(mla, prompt, None, dtype, spec=True)
    tokens, stats = _serve(mla, prompt, tmp_path / "g", dtype)
    assert stats.stored == 3 and tokens == cold.tokens[0]
    plain = _gen(mla, prompt, _gen_pc(mla, tmp_path / "g", dtype), dtype)
    assert plain.prefix["hits"] == 3 and plain.tokens == cold.tokens
    spec = _gen(mla, prompt, _gen_pc(mla, tmp_path / "g", dtype), dtype, spec=True)
    assert [spec.prefix[k] for k in ("hits", "misses", "mismatched", "stored")] == [0, 1, 0, 3]
    assert spec.tokens == cold.tokens and (spec.drafted, spec.accepted) == (cold_spec.drafted, cold_spec.accepted)
    again = _gen(mla, prompt, _gen_pc(mla, tmp_path / "g", dtype), dtype, spec=True)  # the rewritten entries
    assert again.prefix["hits"] == 3 and again.tokens == cold.tokens
    # serve under speculation: the same miss, then the entries rewritten with the MTP pool's rows
    _serve(mla, prompt, tmp_path / "s", dtype)
    tokens, stats = _serve(mla, prompt, tmp_path / "s", dtype, spec=True)
    assert (stats.hits, stats.misses, stats.stored) == (0, 1, 3) and tokens == cold.tokens[0]
    tokens, stats = _serve(mla, prompt, tmp_path / "s", dtype, spec=True)
    assert stats.hits == 3 and tokens == cold.tokens[0]


def _v4_gen(model, prompt, n, root=None, spec=False):
    pc = None if root is None else open_prefix_cache(model, root, cache_dtype=torch.float32, block_size=BS)
    return _gen(model, prompt, pc, torch.float32, spec, n)


def _v4_serve(model, prompt, n, root, spec=False):
    pc = open_disk_prefix_cache(model, root, torch.float32, BS)
    got, reqs = _run(v4_engine(model, pc, spec), [(prompt, n)])
    return _tokens(got)[0], reqs[0], pc.stats


def test_v4_a_speculating_writer_serves_readers_without_mtp(v4, tmp_path):
    prompt, n = PROMPTS[1]  # 35 tokens: 2 blocks and the snapshot at 32 before its last token
    want = _v4_gen(v4, prompt, n).tokens[0]
    wrote = _v4_gen(v4, prompt, n, tmp_path, spec=True)
    assert wrote.prefix["stored"] == 3 and wrote.tokens[0] == want
    tokens, req, stats = _v4_serve(v4, prompt, n, tmp_path)
    assert req.n_shared == 32 and (stats.hits, stats.mismatched) == (3, 0) and tokens == want


def test_v4_a_writer_without_the_mtp_part(v4, tmp_path):
    prompt, n = PROMPTS[1]
    want, want_spec = _v4_gen(v4, prompt, n), _v4_gen(v4, prompt, n, spec=True)
    _v4_serve(v4, prompt, n, tmp_path)  # 2 blocks, the snapshot at 32 without an MTP part
    plain = _v4_gen(v4, prompt, n, tmp_path)
    assert (plain.prefix["hits"], plain.prefix["tokens_loaded"]) == (3, 32) and plain.tokens == want.tokens
    spec = _v4_gen(v4, prompt, n, tmp_path, spec=True)  # the blocks hit, the snapshots at 32 and 16 miss: from 0
    assert (spec.prefix["hits"], spec.prefix["misses"], spec.prefix["tokens_loaded"]) == (2, 2, 0)
    assert spec.tokens == want.tokens and (spec.drafted, spec.accepted) == (want_spec.drafted, want_spec.accepted)
    again = _v4_gen(v4, prompt, n, tmp_path, spec=True)  # the snapshot left again, with its MTP part
    assert (again.prefix["hits"], again.prefix["tokens_loaded"]) == (3, 32) and again.tokens == want.tokens
    tokens, req, stats = _v4_serve(v4, prompt, n, tmp_path, spec=True)
    assert req.n_shared == 32 and stats.hits == 3 and tokens == want.tokens[0]
    # serve under speculation: the same miss, then the snapshot left with its MTP part
    _v4_serve(v4, prompt, n, tmp_path / "s")
    tokens, req, stats = _v4_serve(v4, prompt, n, tmp_path / "s", spec=True)
    assert (req.n_shared, stats.hits, stats.misses) == (0, 2, 2) and tokens == want.tokens[0]
    assert stats.stored == 3  # its recomputed blocks and the snapshot at 32
    tokens, req, stats = _v4_serve(v4, prompt, n, tmp_path / "s", spec=True)
    assert (req.n_shared, stats.hits) == (32, 3) and tokens == want.tokens[0]


def test_v4_a_run_resumed_without_the_mtp_part_leaves_snapshots_without_it(v4, tmp_path):
    """``generate`` without speculation resumes the fourth prompt (50 tokens) at 32 from a snapshot ``serve`` left
    without its MTP part and leaves one at 48: without an MTP part too, so a speculating run resumes from neither.
    Mutation (the snapshot at 48 with the MTP window the run had: positions before 32 missing): it resumes at 48."""
    (head, _), (prompt, n) = PROMPTS[1], PROMPTS[3]
    _v4_serve(v4, head, 4, tmp_path)
    plain = _v4_gen(v4, prompt, n, tmp_path)
    assert (plain.prefix["tokens_loaded"], plain.prefix["stored"]) == (32, 2)  # its third block, the snapshot at 48
    spec = _v4_gen(v4, prompt, n, tmp_path, spec=True)
    want = _v4_gen(v4, prompt, n, spec=True)
    # its 3 blocks hit; the snapshots at 48 and 32 (without the MTP part) and 16 (none) miss
    assert (spec.prefix["hits"], spec.prefix["misses"], spec.prefix["tokens_loaded"]) == (3, 3, 0)
    assert spec.tokens == want.tokens and (spec.drafted, spec.accepted) == (want.drafted, want.accepted)


def test_load_takes_or_leaves_out_the_mtp_rows(tmp_path):
    """``PrefixCache.load``'s rule on names: an entry's MTP rows the caller does not name are left out; the ones it
    expects and the entry lacks make a miss (counted as one); optional ones are taken all or none; any other
    difference in names (or in shape, dtype) is a mismatch."""
    pc = PrefixCache(tmp_path, "fp", block_size=2)
    main, mtp = torch.arange(4.0).view(1, 2, 2), torch.ones(1, 1, 2)
    spec = {"kv": ((1, 2, 2), torch.float32)}
    rows = {"mtp.kv": ((1, 1, 2), torch.float32), "mtp.rope": ((1, 1, 2), torch.float32)}
    keys = pc.block_keys([1, 2, 3, 4, 5, 6])
    pc.store(keys[0], [1, 2], {"kv": main, "mtp.kv": mtp, "mtp.rope": mtp})
    pc.store(keys[1], [3, 4], {"kv": main})
    pc.store(keys[2], [5, 6], {"kv": main, "mtp.kv": mtp, "other": mtp})
    got = pc.load(keys[0], [1, 2], spec)
    assert list(got) == ["kv"] and torch.equal(got["kv"], main)
    assert sorted(pc.load(keys[0], [1, 2], spec | rows)) == ["kv", "mtp.kv", "mtp.rope"]
    assert sorted(pc.load(keys[0], [1, 2], spec, optional=rows)) == ["kv", "mtp.kv", "mtp.rope"]
    assert list(pc.load(keys[1], [3, 4], spec, optional=rows)) == ["kv"]
    assert (pc.stats.hits, pc.stats.misses, pc.stats.mismatched) == (4, 0, 0)
    assert pc.load(keys[1], [3, 4], spec | rows) is None and pc.stats.misses == 1  # no MTP rows: a miss
    assert pc.load(keys[2], [5, 6], spec) is None and pc.stats.mismatched == 1  # a name not the MTP module's
    pc.store(keys[2], [5, 6], {"kv": main, "mtp.kv": mtp})
    assert pc.load(keys[2], [5, 6], spec, optional=rows) is None and pc.stats.mismatched == 2  # half the optional
    assert pc.load(keys[0], [1, 2], spec | {"mtp.kv": ((1, 2, 2), torch.float32)}) is None  # another shape
    assert pc.stats.mismatched == 3


def test_the_commands_share_their_files_across_mtp_settings(tmp_path, monkeypatch, capsys):
    """As a user runs them (the ``tiny`` preset has an MTP module): ``flyer generate --speculative mtp`` writes, the
    engine ``flyer serve`` builds without ``--speculative`` reads every block; ``serve`` without it writes, ``flyer
    generate --speculative mtp`` misses (then rewrites) and prints the uncached tokens, and ``generate`` without it
    reads every block."""
    def generate_cli(prompt: str, *flags: str) -> dict:
        argv = ["generate", "--preset", "tiny", "--device", "cpu", "--prompt", prompt, "--max-new-tokens", str(NEW),
                "--cache-dtype", "fp8", "--json", *flags]
        assert main(argv) == 0
        return json.loads(capsys.readouterr().out)

    def serve(prompt: str) -> tuple[list[int], object]:
        eng, tokens = serve_engine(monkeypatch, "--threads", "1", "--expert-threads", "1", "--cache-dtype", "fp8",
                                   "--prefix-cache", str(tmp_path), "--block-size", "16"), []
        assert not eng.spec
        eng.submit(list(prompt.encode()), SamplingOptions(max_tokens=NEW), lambda e: tokens.append(e.token))
        eng.run_until_idle()
        return tokens, eng.disk.pc.stats

    cache = ["--prefix-cache", str(tmp_path), "--prefix-block", "16"]
    first, second = "forty bytes of a prompt, give or take a few", "another prompt of forty-odd bytes, to write"
    wrote = generate_cli(first, *cache, "--speculative", "mtp")
    assert wrote["prefix_cache"]["stored"] == 2
    tokens, stats = serve(first)
    assert (stats.hits, stats.mismatched) == (2, 0) and tokens == wrote["token_ids"][0]
    tokens, stats = serve(second)
    assert stats.stored == 2
    cold = generate_cli(second)["token_ids"][0]
    spec = generate_cli(second, *cache, "--speculative", "mtp")
    assert [spec["prefix_cache"][k] for k in ("hits", "misses", "stored")] == [0, 1, 2]
    assert spec["token_ids"][0] == tokens == cold
    plain = generate_cli(second, *cache)
    assert plain["prefix_cache"]["hits"] == 2 and plain["token_ids"][0] == cold
