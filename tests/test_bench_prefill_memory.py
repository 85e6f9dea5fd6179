"""Smoke test of bench/prefill_memory.py at small sizes: one JSON object with each kind's chunked and whole peaks,
seconds and ratio, and an unknown kind refused naming it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from child_env import child_env

BENCH = Path(__file__).resolve().parents[1] / "bench" / "prefill_memory.py"


def test_prefill_memory_bench_json():
    out = subprocess.run([sys.executable, str(BENCH), "--lengths", "48", "--chunk", "16", "--kinds", "dsa,v4"],
                         capture_output=True, text=True, timeout=600, env=child_env(), check=True).stdout
    r = json.loads(out)
    assert r["chunk"] == 16
    for kind in ("dsa", "v4"):
        for key in ("chunked_peak_mib", "whole_peak_mib", "chunked_s", "whole_s", "memory_ratio"):
            assert r[f"{kind}_{key}_48"] >= 0, (kind, key)
    bad = subprocess.run([sys.executable, str(BENCH), "--kinds", "mamba"], capture_output=True, text=True,
                         timeout=600, env=child_env())
    assert bad.returncode != 0 and "--kinds: unknown ['mamba']" in bad.stderr
