"""Smoke test of bench/ep_dispatch.py (4 gloo ranks as 2 nodes x 2): one JSON object with the
acceptance keys, and the issue's bound on inter-node bytes for every node limit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "ep_dispatch.py"


@pytest.mark.slow
def test_ep_dispatch_bench_json():
    out = subprocess.run([sys.executable, str(BENCH), "--tokens", "32", "--dim", "128", "--repeats", "1"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    r = json.loads(out)
    for key in ("inter_node_bytes_flat", "inter_node_bytes_hierarchical", "intra_node_bytes_hierarchical"):
        assert isinstance(r[key], int) and r[key] > 0
    assert r["inter_node_bytes_hierarchical"] < r["inter_node_bytes_flat"]
    assert [row["limit"] for row in r["by_limit"]] == [1, 2, 3, 4]
    for row in r["by_limit"]:
        assert row["bound_ok"], row
        assert row["max_nodes_per_token"] <= min(row["limit"], 2)
    assert r["by_limit"][0]["max_nodes_per_token"] == 1  # M = 1: one node per token
    # a training step's gradients retrace both routes in the other direction's formats (combine's gradient in FP8
    # as dispatch's rows, dispatch's in BF16 as combine's): twice the forward's payload
    for row in r["by_limit"]:
        for kind in ("flat", "hierarchical"):
            for where in ("inter", "intra"):
                assert row[f"train_{where}_node_bytes_{kind}"] == 2 * row[f"{where}_node_bytes_{kind}"] > 0, row
