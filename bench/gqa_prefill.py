"""Prefill of a long prompt through the decode cache of a GQA model (Llama's kind): flyer, whose attention over more
than one new token is one fused attention reading the KV heads grouped (``flyer.infer.attention._fused_grouped``),
against its peers: the same decoder scoring eagerly (its decode steps' core: (H x T x S) FP32 scores, then the
softmax and a second GEMM) and transformers' ``LlamaForCausalLM`` (SDPA, with its cache) on the same weights.

A random ``LlamaForCausalLM`` (``--hidden`` 512, 4 layers, 16 heads over 4 KV heads of 32, FP32) saved with
``save_pretrained`` and loaded by flyer from that directory. Each (path, prompt length) runs in a child process of
its own, one thread: the prompt prefilled whole twice, the faster kept, and the peak resident memory it added over
the loaded model (``ru_maxrss``). Per length: seconds and peak MiB of each, the ratios (peer / flyer), and the largest
difference between flyer's and transformers' logits at the last position. ``--eager-max`` caps the lengths the eager
peer runs (its scores grow as the square). One JSON object.

    python bench/gqa_prefill.py [--lengths 1024,4096,16384] [--eager-max 4096]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PATHS = ("flyer", "eager", "transformers")


def save_model(out: Path, hidden: int, max_len: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging
    logging.disable_progress_bar()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=4,
                      num_attention_heads=16, num_key_value_heads=4, head_dim=hidden // 16,
                      max_position_embeddings=max_len, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(out)


def eager_grouped(q_BTHK, k, v, mask_B1TS, scale, group):
    """``_fused_grouped``'s result by the eager core (``_grouped_attention``, ``wo`` left to the caller)."""
    from flyer.infer.attention import _grouped_attention, causal_slot_mask
    if mask_B1TS is None:  # causal from slot 0
        T = q_BTHK.shape[1]
        mask_B1TS = causal_slot_mask(torch.arange(T).expand(q_BTHK.shape[0], T), T)
    return _grouped_attention(q_BTHK, k, v, mask_B1TS, scale, group, torch.nn.Identity())


def child(path: str, model_dir: Path, length: int, logits_out: Path) -> dict:
    """One prefill of ``length`` tokens by ``path``, twice, in this process: the faster's seconds, the peak MiB
    added over the loaded model."""
    torch.set_num_threads(1)
    ids = torch.randint(0, 4096, (1, length), generator=torch.Generator().manual_seed(1))
    if path == "transformers":
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)
        model.eval()

        def run():
            return model(ids, use_cache=True, logits_to_keep=1).logits[0, -1]
    else:
        from flyer.infer import attention
        from flyer.infer.decoder import Decoder
        from flyer.interop.hf import build_empty, load_hf_weights, read_hf_config, rope_half_layout, weight_files
        files = weight_files(model_dir)
        cfg, raw = read_hf_config(model_dir, files)
        model = build_empty(cfg, "cpu", torch.float32)
        load_hf_weights(model, model_dir, rope_half_layout(raw), files)
        model.eval()
        if path == "eager":
            attention._fused_grouped = eager_grouped

        def run():
            dec = Decoder(model, 1, length, cache_dtype=torch.float32)
            return dec.logits(dec.forward(ids, torch.tensor([0]))[:, -1:])[0, -1]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    best = float("inf")
    with torch.inference_mode():
        for _ in range(2):
            t0 = time.perf_counter()
            logits = run()
            best = min(best, time.perf_counter() - t0)
    torch.save(logits.float(), logits_out)
    return {"s": round(best, 3), "peak_mib": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,4096,16384")
    ap.add_argument("--eager-max", type=int, default=4096, help="the longest prompt the eager peer prefills")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--child", nargs=4, metavar=("PATH", "MODEL_DIR", "LENGTH", "LOGITS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        path, model_dir, length, logits = args.child
        print(json.dumps(child(path, Path(model_dir), int(length), Path(logits))))
        return 0
    lengths = [int(n) for n in args.lengths.split(",")]
    t0 = time.perf_counter()
    out: dict = {"model": {"arch": "LlamaForCausalLM", "hidden": args.hidden, "layers": 4, "heads": 16,
                           "kv_heads": 4, "head_dim": args.hidden // 16, "dtype": "fp32"}, "threads": 1}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        save_model(model_dir, args.hidden, max(lengths))
        for n in lengths:
            logits = {}
            for path in PATHS:
                if path == "eager" and n > args.eager_max:
                    continue
                f = Path(tmp) / f"{path}-{n}.pt"
                r = json.loads(subprocess.run([sys.executable, __file__, "--child", path, str(model_dir), str(n),
                                               str(f)], capture_output=True, text=True, check=True).stdout)
                out[f"{path}_s_{n}"], out[f"{path}_peak_mib_{n}"] = r["s"], r["peak_mib"]
                logits[path] = torch.load(f)
            for peer in ("eager", "transformers"):
                if f"{peer}_s_{n}" in out:
                    out[f"speedup_vs_{peer}_{n}"] = round(out[f"{peer}_s_{n}"] / out[f"flyer_s_{n}"], 2)
            out[f"max_logit_diff_vs_transformers_{n}"] = float((logits["flyer"] - logits["transformers"]).abs().max())
            out[f"max_logit_{n}"] = float(logits["transformers"].abs().max())
    out["bench_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
