"""Smoke test of bench/v4_step.py: flyer and transformers' DeepseekV4ForCausalLM on the same random weights, one
JSON object with both sides' tokens/s and the logits' relative difference (FP32: within a few ulps' worth)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "v4_step.py"


@pytest.mark.slow
def test_v4_step_bench_json():
    out = subprocess.run([sys.executable, str(BENCH), "--batch-size", "1", "--seq-len", "64", "--dim", "64",
                          "--layers", "2", "--steps", "1", "--threads", "1"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    for key in ("forward_tokens_per_s", "peer_forward_tokens_per_s", "train_step_tokens_per_s",
                "peer_train_step_tokens_per_s"):
        assert r[key] > 0, key
    # 64 tokens: fewer CSA entries than index_topk, so no top-k tie can split the two; each FP32 sum is over at most
    # 512 terms (n u ~ 3e-5 to first order), a few of them in series
    assert r["logits_rel_diff"] < 1e-4
