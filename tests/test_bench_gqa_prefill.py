"""Smoke test of bench/gqa_prefill.py at small sizes: one JSON object with every path's keys (the eager peer only up
to ``--eager-max``), and flyer's last logits within the FP32 bound of transformers' on the same weights."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

from bounds import decode_logit_bound
from child_env import child_env

from flyer.interop.hf import load_hf_weights, read_hf_config, rope_half_layout, weight_files
from flyer.model.transformer import Transformer

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gqa_prefill.py"


def test_gqa_prefill_bench_json(monkeypatch, tmp_path):
    out = subprocess.run([sys.executable, str(BENCH), "--lengths", "48,96", "--eager-max", "48", "--hidden", "64"],
                         capture_output=True, text=True, timeout=600, env=child_env(), check=True).stdout
    r = json.loads(out)
    assert r["model"]["head_dim"] == 4 and r["model"]["kv_heads"] == 4
    for key in ("flyer_s_48", "eager_s_48", "transformers_s_48", "speedup_vs_eager_48", "flyer_s_96",
                "transformers_s_96", "speedup_vs_transformers_96", "flyer_peak_mib_96"):
        assert r[key] >= 0, key
    assert "eager_s_96" not in r  # past --eager-max
    monkeypatch.syspath_prepend(str(BENCH.parent))
    importlib.import_module("gqa_prefill").save_model(tmp_path, 64, 96)  # the bench's weights (seeded)
    files = weight_files(tmp_path)
    cfg, raw = read_hf_config(tmp_path, files)
    model = Transformer(cfg)
    load_hf_weights(model, tmp_path, rope_half_layout(raw), files)
    for n in (48, 96):
        assert r[f"max_logit_diff_vs_transformers_{n}"] <= decode_logit_bound(model.eval(), n)
