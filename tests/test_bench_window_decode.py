"""Smoke test of bench/window_decode.py at small sizes: one JSON object with every context's keys, and flyer's logits
(each row reading its window's span) within the FP32 bound of its peer's (reading every slot, the window masked)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

from bounds import decode_logit_bound
from child_env import child_env

BENCH = Path(__file__).resolve().parents[1] / "bench" / "window_decode.py"


def test_window_decode_bench_json():
    out = subprocess.run([sys.executable, str(BENCH), "--contexts", "16,96", "--window", "24", "--batch", "2",
                          "--steps", "2", "--rounds", "1"], capture_output=True, text=True, timeout=600,
                         env=child_env(), check=True).stdout
    r = json.loads(out)
    assert r["model"]["window"] == 24 and r["model"]["n_layers"] == 6
    for ctx in (16, 96):
        for key in ("tokens_per_s_flyer", "tokens_per_s_every_slot", "tokens_per_s_full", "speedup_vs_every_slot",
                    "speedup_vs_full", "max_logit_diff", "max_logit"):
            assert r[f"{key}_ctx{ctx}"] >= 0, key


def test_the_span_and_every_slot_give_the_same_logits_within_the_bound(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH.parent))  # bench/'s helpers import each other from beside them
    bench = importlib.import_module("window_decode")
    sliding, full = bench.models(24, 200)
    for ctx in (16, 150):  # the span no narrower than every slot; then a quarter of them
        diff, _ = bench.logit_diff(bench.runs(sliding, full, ctx, 2, 1))
        assert diff <= decode_logit_bound(sliding, ctx + 1)
