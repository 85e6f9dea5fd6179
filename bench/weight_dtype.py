"""``--weight-dtype`` on a BF16 checkpoint: how ``flyer generate`` runs it with each choice.

Saves the ``small`` preset (random weights, seed 0, rounded to BF16) as a BF16 Hugging Face
directory (``flyer export --dtype bf16``: what published checkpoints are), then runs
``flyer generate --ckpt DIR --device cpu --json`` on one prompt, ``--rounds`` times in turn for

- ``fp32``: the weights not held, so the model is the checkpoint's BF16 one (its GEMMs in BF16:
  native where the CPU has BF16 instructions, else through the FP32 kernel on BF16-rounded
  operands, ``flyer.model.lowp``), the peer;
- ``bf16``: the GEMM weights held in BF16, FP32 compute on the kernels (``flyer.infer.weights``);
- ``auto``, the default: what it settles to here (``weight_dtype_auto``).

Reports decode tokens/s (median of the rounds), the process's peak resident memory, and the
ratios of each to fp32's. Prints one JSON object.
    python bench/weight_dtype.py [--rounds 3] [--new-tokens 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from serve import _save_run  # bench/serve.py, beside this script

from flyer.interop.export import export

CHOICES = ("fp32", "bf16", "auto")
# the child's peak resident memory (VmHWM: getrusage's ru_maxrss starts at the forking parent's), printed
# after its JSON line
PEAK = ("import re, runpy, sys; sys.argv = ['flyer'] + sys.argv[1:]\n"
        "try:\n    runpy.run_module('flyer', run_name='__main__')\n"
        "finally:\n    status = open('/proc/self/status').read()\n"
        "    print(int(re.search(r'VmHWM:\\s+(\\d+)', status).group(1)) * 1024)")


def _generate(ckpt: Path, choice: str, args) -> tuple[dict, int]:
    cmd = [sys.executable, "-c", PEAK, "generate", "--ckpt", str(ckpt), "--prompt", "the quick brown fox " * 8,
           "--max-new-tokens", str(args.new_tokens), "--eos-id", "-1", "--device", "cpu", "--json",
           "--threads", str(args.threads), "--weight-dtype", choice]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"flyer generate --weight-dtype {choice} failed: {run.stderr[-1000:]}")
    lines = run.stdout.strip().splitlines()
    return json.loads(lines[-2]), int(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="flyer generate --threads")
    args = ap.parse_args()
    rates: dict[str, list[float]] = {c: [] for c in CHOICES}
    peak: dict[str, int] = {}
    out: dict = {"preset": "small", "checkpoint": "bf16", "new_tokens": args.new_tokens, "threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        run = _save_run(Path(tmp) / "run", "small", "bf16", None)
        export(run, Path(tmp) / "hf", dtype="bf16")
        for _ in range(args.rounds):
            for choice in CHOICES:
                res, peak[choice] = _generate(Path(tmp) / "hf", choice, args)
                rates[choice].append(res["decode_tokens_per_s"])
                if choice == "auto":
                    out["weight_dtype_auto"] = res["weight_dtype"]
    for choice in CHOICES:
        out[f"decode_tokens_per_s_{choice}"] = statistics.median(rates[choice])
        out[f"peak_rss_mb_{choice}"] = peak[choice] / 1e6
    for choice in ("bf16", "auto"):
        out[f"speedup_{choice}_vs_fp32"] = out[f"decode_tokens_per_s_{choice}"] / out["decode_tokens_per_s_fp32"]
        out[f"memory_{choice}_vs_fp32"] = peak[choice] / peak["fp32"]
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
