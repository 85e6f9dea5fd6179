"""Smoke test of bench/model_step.py (the acceptance interface: one JSON object with tokens_per_s
and mfu_vs_bf16_gemm) on the tiny preset, in its default precision (bf16)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "model_step.py"


@pytest.mark.slow
def test_model_step_bench_json():
    out = subprocess.run([sys.executable, str(BENCH), "--preset", "tiny", "--batch-size", "2", "--seq-len", "32",
                          "--steps", "1", "--profile-steps", "1"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    r = json.loads(out)
    assert r["precision"] == "bf16"
    for key in ("tokens_per_s", "mfu_vs_bf16_gemm", "mfu_vs_peer_gemm", "bf16_gemm_flops_per_s",
                "peer_gemm_flops_per_s"):
        assert r[key] > 0, key
    assert 0 < r["gemm_time_fraction"] <= 1 and r["bf16_gemm"] in ("hardware", "widened", "reference")
    assert r["peer_gemm"].startswith("bfloat16") and r["peer_gemm"] == r["bf16_peer_gemm"]
    assert r["mfu_vs_peer_gemm"] == r["mfu_vs_bf16_gemm"]
