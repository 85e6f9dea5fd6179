"""Smoke test of bench/window_serving.py at tiny sizes (window 8, blocks of 4, chunks of 8): two JSON lines, the
given-back engine holding fewer blocks than its peer with equal tokens, and rows twice the pool served where the
peer refuses them, the first equal to ``generate`` alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from child_env import child_env

BENCH = Path(__file__).resolve().parents[1] / "bench" / "window_serving.py"
FLAGS = dict(window=8, block_size=4, prefill_chunk=8, requests=3, prompt=30, new=20, long_requests=2, long_prompt=60,
             long_new=20, long_pool=10)


def test_window_serving_bench_json():
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in FLAGS.items()]
    out = subprocess.run([sys.executable, str(BENCH), *flags], capture_output=True, text=True, timeout=600,
                         env=child_env(), check=True).stdout
    batch, long = (json.loads(line) for line in out.splitlines())
    assert batch["case"] == "batch" and batch["tokens_equal"] and batch["preemptions"] == [0, 0]
    assert batch["flyer_peak"] < batch["peer_peak"] <= batch["pool_blocks"] == 3 * 13
    assert batch["ratio_mean"] > 1
    # the window 8 and chunks of 8 reach 15 positions: 5 blocks of 4 however they fall; a row needs 20
    assert (long["case"], long["row_blocks"], long["window_blocks"]) == ("long_rows", 20, 5)
    assert long["peer_refuses"].startswith("max_tokens: ") and "need 20 cache blocks" in long["peer_refuses"]
    assert long["flyer_peak"] <= long["pool_blocks"] == 10 and long["first_equals_generate"]
