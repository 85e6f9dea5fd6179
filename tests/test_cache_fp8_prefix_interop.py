"""``flyer generate`` and ``flyer serve`` share one on-disk prefix cache under ``--cache-dtype fp8``: FP8 blocks
``generate`` wrote are restored by ``serve``'s disk tier, and the reverse, at the same block size (a model with MTP
under ``--speculative mtp``, whose files hold the MTP cache's rows too; across MTP settings:
``tests/test_prefix_cache_mtp.py``).

Each reader finds every full block the writer stored before the prompt's last token, its restored rows (main and MTP
caches: codes, scales, rope values as uint8) are the writer's bytes bit for bit, and its greedy tokens are the cold
run's (no cache). Rows are compared on the positions a reader takes from disk: ``serve`` takes whole blocks (its MTP
pool one slot on: ``mtp_slots``), ``generate`` recomputes the last loaded position (its hidden state). Then the two
commands as a user runs them (``flyer generate --prefix-block 16``, the engine ``flyer serve --block-size 16``
builds), each way.

Tolerance: rows and tokens exactly (greedy ties are improbable with random FP32 weights, as
``tests/test_infer_prefix.py`` argues; serve's and generate's greedy tokens agree under FP8 without a prefix cache,
``tests/test_cache_fp8.py``, and are checked to here too)."""

import json

import pytest
import torch
from test_cache_fp8 import V, _dense_model, _engine
from test_cache_fp8_prefix import serve_engine

from flyer.cli import main
from flyer.config import preset
from flyer.infer import GenerationConfig, generate
from flyer.infer.cache_fp8 import FP8
from flyer.infer.decoder import Decoder
from flyer.infer.generate import open_prefix_cache, prefill
from flyer.model.transformer import Transformer
from flyer.serve.disk_tier import open_disk_prefix_cache
from flyer.serve.engine import Engine, SamplingOptions

BLOCK, NEW = 8, 6


@pytest.fixture(scope="module")
def models():
    """(model, speculative): random MLA layers with dense FFNs, without MTP; and with an MTP module, served with its
    drafts (a model with MTP stores its MTP rows, which ``serve`` restores under ``--speculative mtp``)."""
    torch.manual_seed(0)
    plain = Transformer(preset("tiny", vocab_size=V, n_dense_layers=4, mtp_depth=0)).eval()
    return [(plain, None), (_dense_model(), "mtp")]


def _prompt(n=29, seed=0):
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _gen(model, prompt, pc):
    return generate(model, [prompt], GenerationConfig(max_new_tokens=NEW, cache_dtype=FP8, prefix_cache=pc))


def _gen_rows(model, prompt, pc) -> list[torch.Tensor]:
    """``generate``'s rows after its prefill (with ``pc``: what it loads), main then MTP cache: each (L, T, bytes)."""
    dec = Decoder(model, 1, len(prompt) + 1, "absorbed", FP8, with_mtp=len(model.mtp) > 0)
    prefill(dec, [prompt], pc)
    return [c.packed[:, 0, :len(prompt)].clone() for c in (dec.cache, dec.mtp_cache) if c is not None]


def _served(model, prompt, speculative, pc) -> tuple[list[int], list[torch.Tensor]]:
    """(tokens, rows) of ``prompt`` alone on a fresh engine over ``pc`` (None: no disk tier); rows as ``_gen_rows``
    gives them, read off the pool through the request's blocks once its prompt is in the cache (its first token)."""
    eng = _engine(model, FP8, block_size=BLOCK, speculative=speculative, prefix_cache=pc)
    tokens, rows = [], []

    def heard(e):
        if not rows:  # the MTP pool keeps position p in slot p + 1 (``mtp_slots``)
            for c, at in ((eng.cache, 0), (eng.mtp_cache, 1)):
                if c is not None:
                    rows.append(torch.cat([c.pool.packed[:, b] for b in req.blocks], 1)[:, at:at + len(prompt)])
        tokens.append(e.token)
    req = eng.submit(prompt, SamplingOptions(max_tokens=NEW), heard)
    eng.run_until_idle()
    return tokens, rows


def _caches(model, root, speculative):
    """(generate's, serve's) prefix caches of ``root``: the same fingerprint."""
    gen_pc = open_prefix_cache(model, root, cache_dtype=FP8, block_size=BLOCK)
    serve_pc = open_disk_prefix_cache(model, root, FP8, BLOCK)
    assert gen_pc.fingerprint == serve_pc.fingerprint
    return gen_pc, serve_pc


@pytest.mark.parametrize("which", [0, 1], ids=["no-mtp", "mtp"])
def test_serve_restores_what_generate_wrote(models, tmp_path, which):
    model, speculative = models[which]
    prompt = _prompt()  # 3 full blocks + 5 tokens: 3 blocks before the last token
    cold = _gen(model, prompt, None).tokens[0]
    cold_served, _ = _served(model, prompt, speculative, None)
    assert cold_served == cold
    gen_pc, serve_pc = _caches(model, tmp_path, speculative)
    wrote = _gen(model, prompt, gen_pc)
    assert wrote.prefix["stored"] == 3 and wrote.tokens[0] == cold
    written = _gen_rows(model, prompt, None)  # the rows generate computed and stored (its cold prefill's)
    tokens, rows = _served(model, prompt, speculative, serve_pc)
    assert serve_pc.stats.hits == 3 and serve_pc.stats.tokens_loaded == 3 * BLOCK
    assert tokens == cold
    assert len(rows) == len(written) == 1 + (speculative == "mtp")
    for got, want in zip(rows, written):
        n = 3 * BLOCK if got is rows[0] else 3 * BLOCK - 1  # the MTP rows a block carries end a token short
        assert torch.equal(got[:, :n], want[:, :n])


@pytest.mark.parametrize("which", [0, 1], ids=["no-mtp", "mtp"])
def test_generate_restores_what_serve_wrote(models, tmp_path, which):
    model, speculative = models[which]
    prompt = _prompt(seed=1)
    cold = _gen(model, prompt, None).tokens[0]
    gen_pc, serve_pc = _caches(model, tmp_path, speculative)
    tokens, written = _served(model, prompt, speculative, serve_pc)
    assert serve_pc.stats.stored == 3 and tokens == cold
    warm = _gen(model, prompt, gen_pc)
    assert warm.prefix["hits"] == 3 and warm.prefix["tokens_loaded"] == 3 * BLOCK
    assert warm.tokens[0] == cold
    rows = _gen_rows(model, prompt, gen_pc)
    assert len(rows) == len(written) == 1 + (speculative == "mtp")
    for got, want in zip(rows, written):  # generate recomputes the last loaded position (23): [0, 23) loaded
        assert torch.equal(got[:, :3 * BLOCK - 1], want[:, :3 * BLOCK - 1])


def _serve_engine(monkeypatch, root) -> Engine:
    """The engine ``flyer serve --preset tiny --cache-dtype fp8 --prefix-cache ROOT --block-size 16 --speculative
    mtp`` builds (the preset has an MTP module: generate's files hold its rows), taken before it serves."""
    return serve_engine(monkeypatch, "--threads", "1", "--expert-threads", "1", "--cache-dtype", "fp8",
                        "--prefix-cache", str(root), "--block-size", "16", "--speculative", "mtp")


def test_the_commands_share_their_files(tmp_path, monkeypatch, capsys):
    """The commands as a user runs them, on the same preset weights and directory: ``flyer generate --prefix-block
    16`` then the engine ``flyer serve --block-size 16`` builds, and the reverse; each reads the other's blocks and
    gives the tokens ``flyer generate`` gives without a cache."""
    def generate_cli(prompt: str, cache: bool) -> dict:
        argv = ["generate", "--preset", "tiny", "--device", "cpu", "--prompt", prompt, "--max-new-tokens", str(NEW),
                "--cache-dtype", "fp8", "--json"] + (["--prefix-cache", str(tmp_path), "--prefix-block", "16"]
                                                     if cache else [])
        assert main(argv) == 0
        return json.loads(capsys.readouterr().out)

    def serve(prompt: str) -> tuple[list[int], Engine]:
        eng, tokens = _serve_engine(monkeypatch, tmp_path), []
        eng.submit(list(prompt.encode()), SamplingOptions(max_tokens=NEW), lambda e: tokens.append(e.token))
        eng.run_until_idle()
        return tokens, eng

    first, second = "forty bytes of a prompt, give or take a few", "another prompt of forty-odd bytes, to write"
    for prompt in (first, second):
        assert len(prompt) // 16 == 2 and (len(prompt) - 1) // 16 == 2  # 2 blocks stored, 2 read
    # generate writes, serve reads
    wrote = generate_cli(first, True)
    assert wrote["prefix_cache"]["stored"] == 2
    tokens, eng = serve(first)
    assert eng.disk.pc.stats.hits == 2 and tokens == wrote["token_ids"][0]
    # serve writes, generate reads
    tokens, eng = serve(second)
    assert eng.disk.pc.stats.stored == 2
    read = generate_cli(second, True)
    assert read["prefix_cache"]["hits"] == 2 and read["token_ids"][0] == tokens == generate_cli(second, False)[
        "token_ids"][0]
