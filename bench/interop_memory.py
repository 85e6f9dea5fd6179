"""Peak resident memory of importing and exporting a Hugging Face checkpoint, as a ratio to its size.

Writes a random DeepSeek-V3-layout bf16 checkpoint of about ``--gb`` GB in two shards (streamed:
it is never whole in memory), then measures in fresh processes, each from the resident memory
after its imports (``base``) to its high-water mark (``VmHWM``):

- ``import``: ``flyer.interop.hf.load_hf`` (bf16, tensor by tensor into the parameters);
- ``export``: ``flyer export`` of that directory to bf16 shards (streamed: each tensor read,
  converted and written before the next, never the model);
- ``export_fp8``: ``flyer export`` of the FP8 checkpoint below to bf16 (each weight dequantized
  with its block scales as it is read); as a ratio to the FP8 checkpoint's bytes;
- peer ``mmap_stream``: the same model filled tensor by tensor through safetensors' memory-mapped
  reader (``safe_open(...).get_tensor``), whose touched pages stay resident until the file closes;
- peer ``shard_convert`` / ``shard_convert_fp8``: the conversion DeepSeek's ``fp8_cast_bf16.py``
  makes, a shard at a time with safetensors (``load_file`` a shard, each FP8 weight times its
  block scales, ``save_file`` it as bf16, fsync it): the peer of ``export`` / ``export_fp8``;
- ``bf16_held``: loaded as ``--weight-dtype bf16`` loads it (``load_hf(..., held=bfloat16)``: the
  GEMM weights written into BF16 parameters as they are read, the rest in FP32), against
  ``bf16_widened``: the FP32 model loaded first, then held (``hold_weights``);
- ``fp8_held``: that checkpoint exported in DeepSeek's FP8 format, loaded as ``--weight-dtype fp8``
  loads it (``load_hf(..., held=float8_e4m3fn)``: the E4M3 weights' codes and scales written as
  read), against ``fp8_requantized``: every weight dequantized into the FP32 model first, then
  held (what the load costs without the codes kept); both as ratios to the FP8 checkpoint's bytes.

Prints one JSON object; ``ratio`` = (VmHWM - base) / bytes on disk; ``seconds``: the step's time.
    python bench/interop_memory.py [--gb 1.1] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models

from flyer.config import preset
from flyer.interop.export import export
from flyer.interop.export_config import hf_config
from flyer.interop.hf import INDEX, TextTokenizer, build_empty, load_hf, read_hf_config
from flyer.interop.hf_names import hf_names
from flyer.infer.weights import FP8, hold_weights
from flyer.interop.tensorfile import write_tensors
from flyer.model.transformer import Transformer

# V3-shaped: MLA, 64 routed experts of 512 channels per MoE layer; 6 layers are 0.995 GB in bf16
BENCH = dict(vocab_size=32000, dim=1024, n_layers=6, n_dense_layers=1, inter_dim=2816, n_heads=16, q_lora_rank=384,
             kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, moe_inter_dim=512,
             n_routed_experts=64, n_activated_experts=6, n_expert_groups=8, n_limited_groups=4, mtp_depth=0,
             max_seq_len=4096, original_seq_len=4096)
MEASURES = ("import", "export", "export_fp8", "mmap_stream", "shard_convert", "shard_convert_fp8", "bf16_held",
            "bf16_widened", "fp8_held", "fp8_requantized")


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def make_checkpoint(out: Path, gb: float) -> int:
    """A random bf16 checkpoint in two shards; returns its bytes of tensor data."""
    layers = max(2, round(BENCH["n_layers"] * gb / 0.995))
    cfg = preset("tiny", **{**BENCH, "n_layers": layers})
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    items = []
    for name, slot in hf_names(cfg, rope_half=False).items():
        shape = shapes[slot.key][1:] if slot.expert is not None else shapes[slot.key]
        dtype = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
        items.append((name, shape, dtype, lambda s=shape, d=dtype: (torch.randn(s) * 0.02).to(d)))
    out.mkdir(parents=True, exist_ok=True)
    half = len(items) // 2
    total = 0
    weight_map = {}
    for i, part in enumerate((items[:half], items[half:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        total += write_tensors(out / fname, part)
        weight_map.update(dict.fromkeys((it[0] for it in part), fname))
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1}, unk_token="<unk>"))
    (out / "tokenizer.json").write_text(tok.to_str())
    (out / "config.json").write_text(json.dumps(hf_config(cfg, TextTokenizer(tok), "bf16")))
    return total


def shard_convert(path: Path, out: Path) -> None:
    """Every shard of ``path`` read whole with safetensors, its FP8 weights multiplied by their
    128x128 block scales, and written as bf16 (DeepSeek's ``fp8_cast_bf16.py``, one shard at a time)."""
    out.mkdir()
    weight_map = {}
    for f in sorted(path.glob("*.safetensors")):
        ts = load_file(f)
        conv = {}
        for name, t in ts.items():
            if name.endswith("_scale_inv"):
                continue
            if t.dtype == FP8:
                s = ts[name + "_scale_inv"].repeat_interleave(128, 0).repeat_interleave(128, 1)
                t = (t.float() * s[:t.shape[0], :t.shape[1]]).to(torch.bfloat16)
            conv[name] = t  # the rest as stored
        save_file(conv, out / f.name, metadata={"format": "pt"})
        with open(out / f.name, "rb") as h:  # on disk, as flyer export leaves its files: a like-for-like time
            os.fsync(h.fileno())
        weight_map.update(dict.fromkeys(conv, f.name))
        del ts, conv
    (out / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def measure(what: str, path: Path) -> dict:
    """Run one measurement in this (fresh) process."""
    base = _status("VmRSS")
    t0 = time.perf_counter()
    if what == "import":
        load_hf(path)
    elif what in ("export", "export_fp8"):
        with tempfile.TemporaryDirectory(dir=path.parent) as d:
            export(path, Path(d) / "out", "bf16", "500MB")
    elif what in ("shard_convert", "shard_convert_fp8"):
        with tempfile.TemporaryDirectory(dir=path.parent) as d:
            shard_convert(path, Path(d) / "out")
    elif what in ("bf16_held", "fp8_held"):
        load_hf(path, dtype=torch.float32, held=torch.bfloat16 if what == "bf16_held" else FP8)
    elif what in ("bf16_widened", "fp8_requantized"):
        hold_weights(load_hf(path, dtype=torch.float32)[0], torch.bfloat16 if what == "bf16_widened" else FP8)
    else:
        cfg, raw = read_hf_config(path)
        model = build_empty(cfg, "cpu", torch.bfloat16)
        state, slots = model.state_dict(), hf_names(cfg, rope_half=False)
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(str(f), "pt") as sf, torch.no_grad():
                for name in sf.keys():
                    slot = slots[name]
                    dest = state[slot.key] if slot.expert is None else state[slot.key][slot.expert]
                    dest.copy_(sf.get_tensor(name))
    return {"base_rss": base, "peak_rss": _status("VmHWM"), "seconds": round(time.perf_counter() - t0, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.1, help="checkpoint size to write (GB, 10^9 bytes)")
    ap.add_argument("--dir", help="where to write it (default: a temporary directory)")
    ap.add_argument("--measure", choices=MEASURES,
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, Path(args.dir))))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        ckpt = Path(tmp) / "hf"
        size = make_checkpoint(ckpt, args.gb)
        fp8 = Path(tmp) / "fp8"
        export(ckpt, fp8, "fp8", "500MB")
        fp8_size = sum(f.stat().st_size for f in fp8.glob("*.safetensors"))
        result = {"checkpoint_bytes": size, "fp8_checkpoint_bytes": fp8_size}
        for what in MEASURES:
            src, n = (fp8, fp8_size) if what.startswith("fp8") or what.endswith("_fp8") else (ckpt, size)
            r = json.loads(subprocess.run([sys.executable, __file__, "--measure", what, "--dir", str(src)],
                                          check=True, capture_output=True, text=True).stdout)
            r["ratio"] = round((r["peak_rss"] - r["base_rss"]) / n, 3)
            r["peak_over_size"] = round(r["peak_rss"] / n, 3)
            result[what] = r
        print(json.dumps(result))


if __name__ == "__main__":
    main()
