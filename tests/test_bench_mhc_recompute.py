"""Smoke test of bench/mhc_recompute.py: the three choices give the same gradients bit for bit, and recomputing the
mix keeps less than keeping it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "mhc_recompute.py"


def test_mhc_recompute_bench_json():
    out = subprocess.run([sys.executable, str(BENCH), "--batch", "1", "--seq", "64", "--steps", "1", "--threads", "1"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r["same_gradients"]
    assert r["held_mib_maps"] < r["held_mib_mix"] < r["held_mib_kept"]
    assert r["step_time_ratio_mix"] > 0 and r["step_time_ratio_maps"] > 0
