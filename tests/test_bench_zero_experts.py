"""Smoke test of bench/zero_experts.py at tiny sizes (64 tokens, dim 32, 8 routed + 4 zero experts, one timed step):
one JSON object with its keys and sane values, and the two peers' outputs (identity picks skipped / moved to a routed
expert with weight 0) agreeing.

Agreement bound: the peers compute the same sums in other orders (the moved picks' rows sit in other GEMM shapes; the
identity sum joins the routed ones apart), so an output element differs by at most n u times its terms' absolute sum
on either side, n the terms summed along the longest chain (dim, then inter, then K + 1 in the combine). The JSON gives
the largest difference over max |y|; at these random weights a row's terms do not cancel below its size, so n u
bounds it (measured 1.8e-9 against 4.1e-6). A peer that kept the moved picks' weights is off by O(1).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bounds import FP32_U
from child_env import child_env

BENCH = Path(__file__).resolve().parents[1] / "bench" / "zero_experts.py"
SIZES = dict(tokens=64, dim=32, inter=32, experts=8, zero=4, k=3)


@pytest.mark.slow
def test_zero_experts_bench_json():
    flags = [f"--{k}={v}" for k, v in SIZES.items()]
    out = subprocess.run([sys.executable, str(BENCH), *flags, "--steps", "1"], capture_output=True, text=True,
                         timeout=300, check=True, env=child_env(OMP_NUM_THREADS="1")).stdout
    r = json.loads(out)
    assert {k: r[k] for k in SIZES} == SIZES and r["path"] == "fused_local" and r["threads"] == 1
    # softmax over E + Z columns with random weights: about Z / (E + Z) of the picks are identities, never all
    assert 0 < r["identity_pick_share"] < 1
    n = SIZES["dim"] + SIZES["inter"] + SIZES["k"] + 1
    assert 0 <= r["max_rel_diff"] <= n * FP32_U, r["max_rel_diff"]
    for kind in ("fwd_bwd", "no_grad"):
        assert r[f"skipped_{kind}_s"] > 0 and r[f"moved_{kind}_s"] > 0
        ratio = r[f"moved_{kind}_s"] / r[f"skipped_{kind}_s"]
        assert r[f"{kind}_speedup"] == pytest.approx(ratio, abs=5e-4 + 1e-9)  # the printed times' ratio, 3 digits
