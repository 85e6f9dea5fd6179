"""The on-disk prefix cache for DeepSeek-V4 in ``flyer generate`` (``flyer.infer.prefix_cache_hybrid``: blocks of
compressed entries, slot snapshots at block boundaries): cold and warm runs, a next turn and a prompt forking from a
cached one give the uncached run's tokens (greedy and seeded sampling, with and without MTP speculation); a warm
prefill leaves the caches (the MTP module's too) and logits of the run that stored them; corrupt block
or snapshot files are ignored and rewritten; an evicted snapshot falls back to an earlier one or to a full
recompute; MLA files never match; blocks without their snapshot, or with another boundary's, miss by far; the CLI
end to end and its one-line refusal of a block size a ratio does not divide. Tiny random model (window 8, ratios
0 / 4 / 16 / 4, CSA top-4, an MTP module), FP32, CPU.

Tolerance: a prefill cut at snapshot boundaries sums in other orders than one chunk (other GEMM row counts, the
attention's keys in window + chunk + entries), which ``v4_tolerance`` bounds (``tests/test_deepseek_v4_decode.py``
holds chunked prefills to it); tokens are compared exactly, as there, a greedy or sampled token differing only where
two logits lie within that bound. Where the chunks and rows are the same (a warm run of one prompt repeats its storing
run's chunks after the boundary) the comparison is exact; a row resuming from blocks another row of the storing batch
computed is held to the bound too (a GEMM may round a row by its place in the batch)."""

import json

import pytest
import torch

from flyer.cli import main
from flyer.config import preset
from flyer.errors import FieldError
from flyer.infer import GenerationConfig, PrefixCache, generate
from flyer.infer.decoder import Decoder
from flyer.infer.generate import open_prefix_cache, prefill
from flyer.infer.prefix_cache_hybrid import snapshot_key
from flyer.model.transformer import Transformer
from tests.test_deepseek_v4 import v4_tolerance
from tests.test_qwen3 import rel

BLOCK = 16  # the least multiple of the ratios 4 and 16
NEW = 8


def _seq(n: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


HEAD = _seq(40, 1)
A = HEAD  # 2 full blocks: leaves a snapshot at 32 (its last full block before its last token)
NEXT = HEAD + _seq(13, 2)  # the next turn: resumes at A's 32, leaves one at 48
FORK = HEAD[:16] + _seq(21, 3)  # forks from A after one block: leaves snapshots at 16 (the fork) and 32


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(preset("tiny-v4", vocab_size=256, window_size=8, index_topk=4)).eval()
    assert len(m.mtp) == 1 and m.cfg.compress_ratios == (0, 4, 16, 4)
    return m


def _gen(model, prompts, pc=None, **kw):
    return generate(model, prompts, GenerationConfig(max_new_tokens=NEW, cache_dtype=torch.float32,
                                                     prefix_cache=pc, **kw))


@pytest.fixture(scope="module")
def uncached(model):
    """``_gen`` of ``model`` without a prefix cache, memoized: the tests compare against the same few uncached runs
    (generation is deterministic: greedy, or sampling from a seed)."""
    memo = {}

    def run(prompts, **kw):
        key = (tuple(map(tuple, prompts)), tuple(sorted((k, v) for k, v in kw.items() if v is not None)))
        if key not in memo:
            memo[key] = _gen(model, prompts, **kw)
        return memo[key]
    return run


def _pc(model, path, **kw) -> PrefixCache:
    return open_prefix_cache(model, path, cache_dtype=torch.float32, block_size=BLOCK, **kw)


def _snap_path(pc: PrefixCache, prompt: list[int], boundary: int):
    return pc.path(snapshot_key(pc.block_keys(prompt)[boundary // BLOCK - 1]))


def _close(got, want, T, cfg):
    err, tol = rel(got, want), v4_tolerance(cfg, T)
    assert err <= tol, f"{err:.3g} > {tol:.3g}"


SAMPLING = {"greedy": {}, "seeded": dict(temperature=1.0, top_p=0.9, seed=7)}


@pytest.mark.parametrize("speculative", [None, "mtp"])
@pytest.mark.parametrize("sampling", list(SAMPLING))
def test_cold_warm_next_turn_and_fork_give_the_uncached_tokens(model, uncached, tmp_path, sampling, speculative):
    kw = dict(SAMPLING[sampling], speculative=speculative)
    plain = uncached([A], **kw)
    pc = _pc(model, tmp_path)
    cold = _gen(model, [A], pc, **kw)
    assert cold.prefix["hits"] == 0 and cold.prefix["stored"] == 3  # 2 blocks and the snapshot at 32
    warm = _gen(model, [A], pc, **kw)
    assert warm.prefix["hits"] == 3 and warm.prefix["tokens_loaded"] == 32 and warm.prefix["stored"] == 0
    assert cold.tokens == warm.tokens == plain.tokens
    assert torch.equal(warm.first_logits, cold.first_logits)  # the same last chunk, [32, 40)
    _close(cold.first_logits, plain.first_logits, len(A), model.cfg)
    # a next turn resumes at 32; the fork finds one block and no snapshot before it: all recomputed
    both = _gen(model, [NEXT, FORK], pc, **kw)
    assert both.prefix["tokens_loaded"] == 32 and both.prefix["stored"] == 1 + 1 + 2 + 1  # blocks, snapshots
    assert both.tokens == uncached([NEXT, FORK], **kw).tokens
    assert _snap_path(pc, FORK, 16).is_file() and _snap_path(pc, NEXT, 48).is_file()
    # another prompt forking there resumes at the fork's snapshot
    again = _gen(model, [HEAD[:16] + _seq(9, 4)], pc, **kw)
    assert again.prefix["tokens_loaded"] == 16
    assert again.tokens == uncached([HEAD[:16] + _seq(9, 4)], **kw).tokens


@pytest.mark.parametrize("speculative", [None, "mtp"])
def test_a_prompt_ending_on_a_block_boundary(model, uncached, tmp_path, speculative):
    """48 tokens: 3 blocks stored, the snapshot at 32 (a snapshot at 48 would leave no token to compute); a warm
    run loads all three blocks and resumes at 32."""
    prompt = NEXT[:48]
    pc = _pc(model, tmp_path)
    cold = _gen(model, [prompt], pc, speculative=speculative)
    assert cold.prefix["stored"] == 4
    warm = _gen(model, [prompt], pc, speculative=speculative)
    assert warm.prefix["hits"] == 4 and warm.prefix["tokens_loaded"] == 32 and warm.prefix["stored"] == 0
    assert torch.equal(warm.first_logits, cold.first_logits)
    assert warm.tokens == cold.tokens == uncached([prompt], speculative=speculative).tokens


def test_a_model_without_mtp_resumes_too(tmp_path):
    torch.manual_seed(0)
    m = Transformer(preset("tiny-v4", vocab_size=256, window_size=8, index_topk=4, mtp_depth=0)).eval()
    pc = _pc(m, tmp_path)
    cold, warm = _gen(m, [NEXT], pc), _gen(m, [NEXT], pc)
    assert warm.prefix["tokens_loaded"] == 48 and torch.equal(warm.first_logits, cold.first_logits)
    assert warm.tokens == _gen(m, [NEXT]).tokens


def _prefilled(model, prompts, pc):
    """(decoder, prefill state) of ``prompts`` with an MTP cache, FP32."""
    dec = Decoder(model, len(prompts), max(map(len, prompts)) + 2, cache_dtype=torch.float32, with_mtp=True)
    return dec, prefill(dec, prompts, pc)


def _state(dec) -> list[torch.Tensor]:
    return [t for c in (dec.cache, dec.mtp_cache) for layer in c.layers for t in layer.values()]


def test_warm_prefill_leaves_the_storing_runs_caches(model, tmp_path, monkeypatch):
    """Every tensor of both caches (windows, rings, entries; the MTP window, whose entry P - 1 the resuming prefill
    computes from the snapshot's hidden state and token P), the logits and the last pass's hidden states, within
    the chunk-order bound: NEXT resumes from blocks that A's row of the storing batch computed (the same tokens), and
    a GEMM may round a row by its place in the batch (AVX2's MKL does; AVX-512 and AMX machines gave equal bits).
    The mutation: the snapshot's hidden state zeroed leaves another MTP window (the same main cache), by far."""
    pc = _pc(model, tmp_path)
    prompts, T = [NEXT, A], len(NEXT)
    cold, cold_state = _prefilled(model, prompts, pc)
    warm, warm_state = _prefilled(model, prompts, pc)
    assert warm_state.hit_tokens == [48, 32]  # the snapshots the cold batch left; the same last pass
    for a, b in [*zip(_state(cold), _state(warm), strict=True), (cold_state.logits, warm_state.logits),
                 (cold_state.hidden, warm_state.hidden)]:
        _close(b, a, T, model.cfg)
    load = PrefixCache.load

    def zero_hidden(self, key, tokens, expect, count_tokens=True, **kw):
        got = load(self, key, tokens, expect, count_tokens, **kw)
        if got is not None and "mtp.hidden" in got:
            got["mtp.hidden"] = torch.zeros_like(got["mtp.hidden"])
        return got
    monkeypatch.setattr(PrefixCache, "load", zero_hidden)
    wrong, _ = _prefilled(model, prompts, pc)
    for a, b in zip(_state(cold)[:-1], _state(wrong)[:-1]):
        _close(b, a, T, model.cfg)
    assert rel(_state(wrong)[-1], _state(cold)[-1]) > 100 * v4_tolerance(model.cfg, T)


@pytest.mark.parametrize("mutation", ["no snapshot state", "another boundary's snapshot"])
def test_blocks_without_their_snapshot_miss_by_far(model, uncached, tmp_path, monkeypatch, mutation):
    """A's two blocks with the slot state left fresh (zeros), or with FORK's snapshot at 16 for A's at 32: A's
    last logits miss the uncached ones by more than 100 x the tolerance."""
    pc = _pc(model, tmp_path)
    _gen(model, [A], pc)
    _gen(model, [FORK], pc)  # leaves the snapshot at 16, keyed by A's first block too
    mine = snapshot_key(pc.block_keys(A)[1])
    other = snapshot_key(pc.block_keys(A)[0])
    assert pc.path(mine).is_file() and pc.path(other).is_file()
    load = PrefixCache.load

    def wrong(self, key, tokens, expect, count_tokens=True, **kw):
        if key != mine:
            return load(self, key, tokens, expect, count_tokens, **kw)
        if mutation == "no snapshot state":
            return {k: torch.zeros(s, dtype=d) for k, (s, d) in expect.items()}
        return load(self, other, A[:16], expect, count_tokens, **kw)
    monkeypatch.setattr(PrefixCache, "load", wrong)
    got = _gen(model, [A], pc)
    assert got.prefix["tokens_loaded"] == 32
    err, tol = rel(got.first_logits, uncached([A]).first_logits), v4_tolerance(model.cfg, len(A))
    assert err > 100 * tol, f"{mutation}: {err:.3g} within 100 x {tol:.3g}"


@pytest.mark.parametrize("damage", ["flip", "truncate"])
@pytest.mark.parametrize("which", ["block", "snapshot"])
def test_a_corrupt_file_is_ignored_and_rewritten(model, uncached, tmp_path, which, damage):
    plain = uncached([A])
    pc = _pc(model, tmp_path)
    _gen(model, [A], pc)
    f = pc.path(pc.block_keys(A)[0]) if which == "block" else _snap_path(pc, A, 32)
    data = bytearray(f.read_bytes())
    if damage == "flip":
        data[-3] ^= 0xFF
    else:
        del data[len(data) // 2:]
    f.write_bytes(bytes(data))
    res = _gen(model, [A], pc)
    assert res.prefix["corrupt"] == 1 and res.prefix["tokens_loaded"] == 0  # nothing resumed: recomputed
    assert res.tokens == plain.tokens
    assert f.read_bytes() != bytes(data)  # rewritten
    after = _gen(model, [A], pc)
    assert after.prefix["corrupt"] == 0 and after.prefix["tokens_loaded"] == 32 and after.tokens == plain.tokens


def test_an_evicted_snapshot_falls_back_to_an_earlier_one_then_to_a_full_recompute(model, uncached, tmp_path):
    plain = uncached([A])
    pc = _pc(model, tmp_path)
    _gen(model, [A], pc)
    _gen(model, [FORK], pc)  # the snapshot at 16
    _snap_path(pc, A, 32).unlink()
    earlier = _gen(model, [A], pc)
    assert earlier.prefix["tokens_loaded"] == 16 and earlier.tokens == plain.tokens
    assert _snap_path(pc, A, 32).is_file()  # left again
    _snap_path(pc, A, 32).unlink()
    _snap_path(pc, A, 16).unlink()
    full = _gen(model, [A], pc)
    assert full.prefix["tokens_loaded"] == 0 and full.prefix["hits"] == 2 and full.tokens == plain.tokens


def test_mla_files_never_match_a_v4_prompt(model, uncached, tmp_path):
    """The same directory for an MLA model (``tiny``) and the V4 one: other fingerprints, so other keys; an MLA
    block planted at the V4 block's path is mismatched. The layout is in the fingerprint: ratios, window, dtype."""
    torch.manual_seed(0)
    mla = Transformer(preset("tiny", vocab_size=256)).eval()
    pm, pv = _pc(mla, tmp_path), _pc(model, tmp_path)
    assert len({pm.fingerprint, pv.fingerprint, open_prefix_cache(model, tmp_path, block_size=BLOCK).fingerprint}) == 3
    _gen(mla, [A], pm)
    assert _gen(model, [A], pv).prefix["hits"] == 0
    pv.path(pv.block_keys(A)[0]).write_bytes(pm.path(pm.block_keys(A)[0]).read_bytes())
    res = _gen(model, [A], pv)
    assert res.prefix["mismatched"] == 1 and res.prefix["tokens_loaded"] == 0
    assert res.tokens == uncached([A]).tokens


def test_a_block_size_a_ratio_does_not_divide_is_refused(model, tmp_path):
    with pytest.raises(FieldError, match="prefix_block: must be a multiple of every compression ratio"):
        open_prefix_cache(model, tmp_path, block_size=8)
    with pytest.raises(FieldError, match="prefix_block"):
        _gen(model, [A], PrefixCache(tmp_path, "fp", block_size=24))


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_end_to_end_and_a_bad_block_size(capsys, tmp_path):
    base = ["generate", "--preset", "tiny-v4", "--prompt", "the quick brown fox jumps over the lazy dog!",
            "--max-new-tokens", "4", "--json"]
    flags = ["--prefix-cache", str(tmp_path), "--prefix-block", "16"]
    plain = _json(capsys, base)
    cold = _json(capsys, base + flags)
    warm = _json(capsys, base + flags)
    spec = _json(capsys, base + flags + ["--speculative", "mtp"])
    assert cold["prefix_cache"]["hits"] == 0 and cold["prefix_cache"]["stored"] == 3
    for r in (warm, spec):
        assert r["prefix_cache"]["hits"] == 3 and r["prefix_cache"]["tokens_loaded"] == 32
    assert plain["text"] == cold["text"] == warm["text"] == spec["text"]
    assert main(base + ["--prefix-cache", str(tmp_path / "b"), "--prefix-block", "24"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flyer: error: --prefix-block: must be a multiple")
    assert "[4, 16] of DeepSeek-V4's hybrid attention (got 24)" in err[0]
