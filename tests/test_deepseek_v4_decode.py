"""DeepSeek-V4 decoding (``flyer.infer.hybrid_cache``): a prefill then token-by-token steps, or prefill chunks,
give the training path's logits at every position, as the window slides, CSA and HCA windows complete
mid-decode and CSA's indexer drops entries; batched rows of different lengths (right-padded) get their
alone-results; greedy ``flyer generate`` gives transformers' ``generate`` tokens; the cache's bytes per token
are ``flyer.model.counts``'; the CLI generates and names the flags it cannot take. Tiny random model, FP32, CPU.

Tolerance: ``v4_tolerance(cfg, T)`` bounds two FP32 evaluations of one V4 model that sum in different orders
(it is derived for flyer against transformers); the cached path differs from the training path in just that
way (its attention sums over the window's W + new tokens + N entries, fewer than T + T / 4 keys; the
projections see other row counts), so the same bound holds for it."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from flyer.cli import main
from flyer.config import preset
from flyer.infer import hybrid_fp8
from flyer.infer.decoder import Decoder
from flyer.infer.generate import GenerationConfig, generate
from flyer.infer.hybrid_cache import HybridCache
from flyer.interop.hf import load_hf
from flyer.model.counts import kv_cache_bytes_per_token, kv_compressor_state_bytes, kv_window_bytes, kv_window_bytes_fp8
from tests.hf_models import VOCAB, build
from tests.test_deepseek_v4 import v4_tolerance
from tests.test_qwen3 import rel

T_ALL = 70  # > window 8; CSA (r 4) entries 17 > index_topk 4; HCA (r 16) entries complete at 16, 32, 48, 64


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    """(directory, flyer's model of it, its config, the training path's logits (2, T_ALL, V) of ``_tokens``)."""
    path = tmp_path_factory.mktemp("v4")
    build("v4", path)
    model, cfg, _ = load_hf(path)
    model.eval()
    assert (cfg.window_size, cfg.compress_ratios, cfg.index_topk) == (8, (0, 4, 16, 4), 4)
    with torch.no_grad():
        full = model(_tokens(2, T_ALL))
    return path, model, cfg, full


def _tokens(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _run_chunks(model, x: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Logits (B, T, V) of x fed to a fresh FP32-cache decoder in chunks of these sizes (all rows alike)."""
    B, T = x.shape
    dec = Decoder(model, B, T, cache_dtype=torch.float32)
    out, at = [], 0
    for n in chunks:
        out.append(dec.logits(dec.forward(x[:, at:at + n], torch.full((B,), at))))
        at += n
    assert at == T
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("chunks", [[13] + [1] * (T_ALL - 13), [5, 19, 1, 2, 9, 30, 1, 3]],
                         ids=["prefill-then-steps", "chunked-prefill"])
def test_decode_equals_the_training_path(v4, chunks):
    """Every position's logits within the tolerance of the full-sequence model's. The chunks cross windows
    mid-chunk, and some are longer than a window and than CSA's 2r compressor state."""
    _, model, cfg, full = v4
    got = _run_chunks(model, _tokens(2, T_ALL), chunks)
    tol = v4_tolerance(cfg, T_ALL)
    errs = [rel(got[:, t], full[:, t]) for t in range(T_ALL)]
    assert max(errs) <= tol, f"position {errs.index(max(errs))}: {max(errs):.3g} > {tol:.3g}"


def test_batched_rows_get_their_alone_results(v4):
    """Rows with prompts of 5, 17 and 11 tokens prefilled in one right-padded chunk, then stepped together
    (each at its own position), a row leaving the batch midway (``keep_rows``, the others reordered): each row's
    logits are those of its tokens decoded alone, and the training path's."""
    _, model, cfg, _ = v4
    lens, steps = [5, 17, 11], 40
    seqs = _tokens(3, 17 + steps, seed=1)
    with torch.no_grad():
        want = [model(seqs[b:b + 1, :lens[b] + steps])[0] for b in range(3)]
    dec = Decoder(model, 3, 17 + steps, cache_dtype=torch.float32)
    h = dec.forward(seqs[:, :17], torch.zeros(3, dtype=torch.long), lens)
    got = [[dec.logits(h[b, :lens[b]])] for b in range(3)]  # (positions, V) per row
    live, pos = [0, 1, 2], torch.tensor(lens)
    for s in range(steps):
        if s == 15:  # row 1 leaves; rows 2 and 0 go on, in that order
            live = [2, 0]
            dec.keep_rows(torch.tensor([2, 0]))
            pos = pos[[2, 0]]
        x = torch.stack([seqs[b, lens[b] + s] for b in live]).view(-1, 1)
        out = dec.logits(dec.forward(x, pos))[:, 0]
        for i, b in enumerate(live):
            got[b].append(out[i:i + 1])
        pos = pos + 1
    tol = v4_tolerance(cfg, 17 + steps)
    for b in range(3):
        g = torch.cat(got[b])
        alone = _run_chunks(model, seqs[b:b + 1, :len(g)], [lens[b]] + [1] * (len(g) - lens[b]))[0]
        assert rel(g, alone) <= tol, f"row {b} against itself alone"
        assert rel(g, want[b][:len(g)]) <= tol, f"row {b} against the training path"


def test_greedy_tokens_equal_transformers_generate(v4):
    """``generate`` at temperature 0 on 2 prompts (11 and 30 tokens) batched, 24 new tokens each: transformers'
    ``generate(do_sample=False, use_cache=False)`` of each prompt alone makes the same tokens. Without its cache:
    transformers 5.25's V4 cache parts from its own forward at some positions (a tiny model's greedy token 39 of a
    40-token prompt: 161 cached, 160 by the forward and by flyer)."""
    path, model, _, _ = v4
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    prompts = [_tokens(1, 11, seed=2)[0].tolist(), _tokens(1, 30, seed=3)[0].tolist()]
    res = generate(model, prompts, GenerationConfig(max_new_tokens=24, temperature=0.0, cache_dtype=torch.float32))
    for p, toks in zip(prompts, res.tokens):
        with torch.no_grad():
            want = ref.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                                pad_token_id=0, use_cache=False)[0, len(p):]
        assert toks == want.tolist()


def test_cache_bytes_per_token_are_the_counts(v4, capsys):
    """Its growth per token is ``kv_cache_bytes_per_token`` (the tiny model's: two CSA layers (32 + 16) / 4, one
    HCA 32 / 16 channels, 26 elements), its fixed part the windows ``kv_window_bytes`` counts plus the
    compressors' states (2r slots of 2 (32 + 16) FP32 channels per CSA layer, r of 32 for HCA, twice: kv and
    gate)."""
    _, _, cfg, _ = v4
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        cache = HybridCache(cfg, 2, 64, dtype)
        assert cache.bytes_per_token() == kv_cache_bytes_per_token(cfg, size) == 26 * size
        csa, hca = 2 * (8 * 2 * 32 + 8 * 2 * 16), 2 * 16 * 32  # kv and gate: attention's, the indexer's
        states = 4 * (2 * csa + hca)  # FP32 whatever the cache dtype
        assert cache.window_bytes() == kv_window_bytes(cfg, size) + states == kv_window_bytes(cfg, size) + \
            kv_compressor_state_bytes(cfg)
    for name in ("dsv4-flash", "dsv4-pro"):  # the released configs, on the meta device: what `flyer info` says
        big = preset(name)
        fp8 = HybridCache(big, 1, 128, hybrid_fp8.FP8, "meta")
        assert fp8.window_bytes() == kv_window_bytes_fp8(big) + kv_compressor_state_bytes(big)
        assert main(["info", name, "--json"]) == 0
        said = json.loads(capsys.readouterr().out)
        assert said["kv_window_bytes_fp8"] + said["kv_compressor_state_bytes"] == fp8.window_bytes()


def test_cli_generates_and_names_the_flags_it_cannot_take(v4, capsys, tmp_path):
    path = str(v4[0])
    assert main(["generate", "--ckpt", path, "--prompt", "hello", "--prompt", "the quick brown fox",
                 "--max-new-tokens", "4", "--json"]) == 0
    assert "token_ids" in capsys.readouterr().out
    # --prefix-cache takes V4 (tests/test_prefix_cache_v4.py) with blocks of whole compressed entries
    assert main(["generate", "--ckpt", path, "--prompt", "hi", "--prefix-cache", str(tmp_path / "pc"),
                 "--prefix-block", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--prefix-block" in err[0] and "compression ratio" in err[0], err
    # --speculative mtp drafts with V4's MTP module (tests/test_v4_speculative.py); this checkpoint has none
    assert main(["generate", "--ckpt", path, "--prompt", "hi", "--speculative", "mtp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "speculative" in err[0] and "MTP" in err[0], err
