"""Smoke test of bench/serve.py's DeepSeek-V4 path (``--preset tiny-v4``) at its smallest: one JSON object with
the serving keys of the MLA bench, V4's peer (transformers' DeepseekV4 generate) named with the result of its
padding check, the engine's greedy tokens compared with the peer's, and V4's cache capacity in place of the
MLA/GQA payoff (``_serve_capacity.hybrid_capacity`` checks its count against the engine's own admissions,
raising otherwise). And its ``--speculative`` replays on the engine alone (``_serve_engine.speculation_variants``,
in this process): the keys, shared prefixes found with and without speculation and none without sharing, drafts
kept by a trained module, and the greedy tokens equal in every variant (exactly, as the engine's speculation tests
ask: random or trained FP32 weights leave no two logits within the verify pass's reordering error), where a
speculation that skips its rollback parts them. And bench/serve_step_ops.py's keys and ordering."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from flyer.infer.hybrid_cache import HybridCache
from flyer.model.transformer import Transformer
from tests.test_v4_speculative import PATTERN, _config, pattern_trained

BENCH = Path(__file__).resolve().parents[1] / "bench" / "serve.py"


@pytest.mark.slow
def test_serve_bench_v4_json():
    out = subprocess.run([sys.executable, str(BENCH), "--preset", "tiny-v4", "--no-peer-serve", "--concurrency", "1",
                          "16", "--requests-per-client", "1", "--system-prompt", "8", "--prompt-min", "40",
                          "--prompt-max", "56", "--new-min", "4", "--new-max", "8", "--payoff-memory", "16M"],
                         capture_output=True, text=True, timeout=600, check=True,
                         # one torch thread (flyer serve, the engine, its experts and the peer), as the tests run: two
                         # threads' parallel regions on 2 shared cores waited on each other past the timeout
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    r = json.loads(out)
    assert r["preset"] == "tiny-v4" and r["prefix_sharing"] is True and r["flyer_exit_code"] == 0
    for c in (1, 16):
        for key in ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms",
                    "engine_tokens_per_s"):
            assert r[f"{key}_c{c}"] > 0, (key, c)
        assert 0 <= r[f"prefix_hit_rate_c{c}"] <= 1  # shared with boundary snapshots
        # the server's steps (its /metrics) within the run's wall time, each as long as the engine alone's within
        # this host's spread (an order of magnitude: one request's steps are milliseconds, a misread sum is seconds)
        assert 0 < r[f"busy_share_c{c}"] <= 1 and r[f"graph_step_share_c{c}"] == 0  # (no CUDA graphs on the CPU)
        assert 0.1 < r[f"step_ms_c{c}"] / r[f"engine_step_ms_c{c}"] < 10
    assert r["cuda_graphs_served"] == 0
    for key in ("peer_tokens_per_s_c16", "ratio_c16_vs_peer", "ratio_c16_vs_c1", "ratio_c16_vs_c1_memory_bound",
                "decode_step_ms_b1", "decode_step_ms_b16"):
        assert r[key] > 0, key
    # the peer: batched generate only where every padded row of the first batch gave the request's own tokens
    assert r["peer_padded_rows"] == 16 and 0 <= r["peer_padded_rows_agree"] <= 16
    batched = r["peer_padded_rows_agree"] == 16
    assert r["peer"] == ("transformers generate (batched)" if batched else
                         "transformers generate (per request, unpadded)")
    assert batched or "not V4 with padding" in r["peer_note"]
    # the same weight values, greedy: FP32 sums in another order (logits ~1e-6 apart, no random logits that near
    # a tie), and at most 56 + 8 tokens, so no CSA query sees more than index_topk 16 entries: no selection, where
    # exact-zero score ties could part flyer's (earliest entries kept) from transformers' topk. Every request's
    # tokens agree; a wrong export or cache would part them at once (random weights)
    assert r["flyer_peer_outputs"] == 16 and r["flyer_peer_outputs_agree"] == 16
    # V4's capacity instead of MLA's payoff: per token 4 + 1 + 4 compressed entries per 16 tokens of the 4 layers
    # (ratios 0, 4, 16, 4), 64 channels each, CSA's 32-channel index keys too, BF16
    assert "max_seqs_mla" not in r and r["payoff_seq_len"] == 1024
    assert r["cache_bytes_per_token_v4"] == 2 * (2 * (64 + 32) / 4 + 64 / 16)
    assert r["window_bytes_per_seq_v4"] == 2 * 4 * 32 * 64 and r["slot_bytes_v4"] > r["window_bytes_per_seq_v4"]
    assert r["max_seqs_v4"] > 0


def test_metrics_read_a_labelled_series(monkeypatch):
    """The bench reads /metrics series by their full name, labels included (``graph_step_share_c*``'s steps by
    how they ran), and 0 for a series the server has not written."""
    monkeypatch.syspath_prepend(str(BENCH.parent))
    serve = importlib.import_module("serve")
    text = ('flyer_fixed_shape_steps_total{how="cuda_graph"} 7.0\nflyer_fixed_shape_steps_total{how="eager"} 3.0\n'
            "flyer_step_seconds_sum 1.5\n")
    monkeypatch.setattr(serve.httpx, "get", lambda url: SimpleNamespace(text=text))
    names = ('flyer_fixed_shape_steps_total{how="cuda_graph"}', 'flyer_fixed_shape_steps_total{how="eager"}',
             "flyer_step_seconds_sum", "flyer_cuda_graphs")
    assert serve._metrics("http://server", *names) == [7.0, 3.0, 1.5, 0.0]


def _variants(monkeypatch, model, draft_tokens: int, max_batch: int | None = None) -> dict:
    """``speculation_variants`` after ``engine_replay`` as bench/serve.py runs them (``--speculative mtp``, sharing
    on, ``--speculative-max-batch max_batch``), two clients, on 4 requests that share 2 blocks (32 tokens) of
    ``PATTERN`` and go on with more of it."""
    monkeypatch.syspath_prepend(str(BENCH.parent))  # bench/'s helpers import each other from beside them
    bench = importlib.import_module("_serve_engine")
    args = SimpleNamespace(kv_cache_memory="16M", prefill_chunk=256, speculative="mtp", draft_tokens=draft_tokens,
                           prefix_sharing=True, speculative_max_batch=max_batch)
    reqs = [((PATTERN * 6)[:32 + 5 + 3 * i], 8) for i in range(4)]
    stats, outputs = bench.engine_replay(model, reqs, 2, args)
    stats.update(bench.speculation_variants(model, reqs, 2, args, stats, outputs))
    return stats


@pytest.fixture(scope="module")
def trained():
    """The pattern-trained V4 model, built once for the variants' tests (they only decode with it)."""
    return pattern_trained()


def test_serve_bench_speculation_variants(monkeypatch, trained):
    r = _variants(monkeypatch, trained, 1)
    for key in ("tokens_per_s", "tokens_per_s_no_spec", "tokens_per_s_no_sharing", "speedup_vs_no_spec",
                "speedup_vs_no_sharing"):
        assert r[key] > 0, key
    # each prompt has 2 full blocks before its last token, the shared ones: at most the 3 later prompts' 6 of 8 found
    assert 0 < r["prefix_hit_rate"] <= 0.75 and r["prefix_hit_rate_no_spec"] == r["prefix_hit_rate"]
    assert r["prefix_hit_rate_no_sharing"] == 0
    assert r["draft_acceptance"] > 0.5  # the pattern-trained module drafts the pattern
    assert r["variants_requests"] == 4 and r["variants_agree"] == 4


def test_serve_bench_speculation_variants_with_a_batch_cutoff(monkeypatch, trained):
    """``--speculative-max-batch 1``: the steps decoding both clients' requests draft none; a variant without the
    cutoff, and the same tokens in every variant."""
    r = _variants(monkeypatch, trained, 1, max_batch=1)
    assert r["tokens_per_s_no_cutoff"] > 0 and r["speedup_vs_no_cutoff"] > 0 and r["spec_off_steps"] > 0
    assert r["variants_requests"] == 4 and r["variants_agree"] == 4


def test_serve_bench_speculation_variants_catch_a_wrong_speculation(monkeypatch):
    """The mutation: rejected drafts' writes left in the windows and rings (no rollback), K = 2 on a random module
    (most drafts rejected): the speculative runs' tokens part from the plain run's, and ``variants_agree`` says so."""
    torch.manual_seed(0)
    model = Transformer(_config()).eval()
    assert _variants(monkeypatch, model, 2)["variants_agree"] == 4
    monkeypatch.setattr(HybridCache, "restore_slots", lambda self, saved, slots, rows=None: None)
    assert _variants(monkeypatch, model, 2)["variants_agree"] < 4


def test_serve_step_ops_json():
    """bench/serve_step_ops.py on ``tiny``: its keys, CUDA's grouped FP32 experts issuing fewer ops than the CPU's
    per-expert GEMMs in both kinds of step (each live expert costs the latter ops of its own), and a step replayed
    from a graph fewer still (the host's ops around the replay)."""
    out = subprocess.run([sys.executable, str(BENCH.with_name("serve_step_ops.py")), "--preset", "tiny", "--batch",
                          "4", "--prompt", "40"], capture_output=True, text=True, timeout=300, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    r = json.loads(out)
    assert (r["preset"], r["batch"], r["prompt"]) == ("tiny", 4, 40)
    for step in ("decode", "mixed"):
        assert 0 < r[f"{step}_ops_graphed"] < r[f"{step}_ops_grouped_mm"] < r[f"{step}_ops_fused"]


@pytest.mark.slow
def test_weight_dtype_bench_json():
    """bench/weight_dtype.py (which calls serve.py's ``_save_run``: an old call of it crashed every run) at its
    smallest: one JSON object, each choice's decode rate and the ratios against FP32."""
    out = subprocess.run([sys.executable, str(BENCH.parent / "weight_dtype.py"), "--rounds", "1", "--new-tokens", "2"],
                         capture_output=True, text=True, timeout=600, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    r = json.loads(out)
    assert r["weight_dtype_auto"] in ("bf16", "fp32")
    assert all(r[f"decode_tokens_per_s_{c}"] > 0 for c in ("fp32", "bf16", "auto"))
    assert r["speedup_bf16_vs_fp32"] > 0 and 0 < r["memory_bf16_vs_fp32"] < 1
