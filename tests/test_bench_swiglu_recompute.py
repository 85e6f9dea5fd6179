"""Smoke test of bench/swiglu_recompute.py: the SwiGLU recomputed in backward gives the same gradients bit for bit
as the one kept, and keeps less."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "swiglu_recompute.py"


def test_swiglu_recompute_bench_json():
    out = subprocess.run([sys.executable, str(BENCH), "--batch", "1", "--seq", "64", "--steps", "1", "--threads", "1"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r["same_gradients"]
    assert r["held_mib_recomputed"] < r["held_mib_kept"]
    assert r["step_time_ratio"] > 0
