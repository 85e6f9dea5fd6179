"""Smoke test of bench/pipeline.py at its smallest (PP 2 x EP 2 on 4 gloo ranks, 4 layers, one
measured step): one JSON object with the acceptance keys and sane values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from ranks import needs_split_backward

BENCH = Path(__file__).resolve().parents[1] / "bench" / "pipeline.py"


@pytest.mark.slow
@needs_split_backward
def test_pipeline_bench_json():
    out = subprocess.run([sys.executable, str(BENCH), "--steps", "1", "--global-batch", "8", "--micro-batches", "4",
                          "--seq-len", "8", "--n-layers", "4", "--layouts", "pp2_ep2"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    r = json.loads(out)
    for key in ("tokens_per_s_1f1b", "tokens_per_s_dualpipev", "tokens_per_s_one_process"):
        assert r[key] > 0
    for key in ("bubble_1f1b", "bubble_dualpipev", "bubble_predicted_1f1b", "bubble_predicted_dualpipev",
                "comm_hidden_fraction_dualpipev", "comm_beside_compute_fraction_dualpipev"):
        assert 0.0 <= r[key] <= 1.0, (key, r[key])
    # 1F1B on 2 ranks with 4 micro-batches: (PP-1) / (PP-1+M) whatever F and B are
    assert r["bubble_predicted_1f1b"] == pytest.approx(1 / 5)
    runs = r["layouts"]["pp2_ep2"]
    assert set(runs) >= {"1f1b", "dualpipev", "dualpipev_overlap"}
    assert runs["dualpipev"]["ep_comm_s"] > 0 and len(runs["dualpipev_overlap"]["per_rank"]) == 4
    assert r["comm_beside_compute_fraction_dualpipev"] > 0  # the overlapped chunks did exchange beside compute
