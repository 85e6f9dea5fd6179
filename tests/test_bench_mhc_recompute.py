"""Smoke tests of the benches that run training steps in lockstep under choices of what backward recomputes
(``bench/_lockstep.py``): bench/mhc_recompute.py (the three choices give the same gradients bit for bit, and
recomputing the mix keeps less than keeping it) and bench/swiglu_recompute.py (likewise for the SwiGLU's SiLU); and
bench/recompute.py (--recompute mla), with DSA layers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run(bench: str) -> dict:
    out = subprocess.run([sys.executable, str(BENCH / bench), "--batch", "1", "--seq", "64", "--steps", "1",
                          "--threads", "1"], capture_output=True, text=True, timeout=300, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_mhc_recompute_bench_json():
    r = _run("mhc_recompute.py")
    assert r["same_gradients"]
    assert r["held_mib_maps"] < r["held_mib_mix"] < r["held_mib_kept"]
    assert r["step_time_ratio_mix"] > 0 and r["step_time_ratio_maps"] > 0


def test_swiglu_recompute_bench_json():
    r = _run("swiglu_recompute.py")
    assert r["same_gradients"]
    assert r["held_mib_recomputed"] < r["held_mib_kept"]
    assert r["step_time_ratio_recomputed"] > 0


def test_mla_recompute_bench_json_with_dsa_layers():
    out = subprocess.run([sys.executable, str(BENCH / "recompute.py"), "--preset", "tiny", "--dsa", "8", "--batch", "1",
                          "--seq", "64", "--reps", "1", "--threads", "1"], capture_output=True, text=True, timeout=300,
                         check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r["same_gradients"] and r["index_topk"] == 8
    for precision in ("fp32", "bf16", "fp8"):
        assert r[f"held_ratio_{precision}"] < 1 and r[f"step_time_ratio_{precision}"] > 0
        assert r[f"estimate_mib_{precision}_mla"] < r[f"estimate_mib_{precision}_none"]
    assert r["layer_ratio_dsv32"] < r["layer_ratio_dsv3"] < 1  # V3.2 also keeps its mask as bools, not BF16
