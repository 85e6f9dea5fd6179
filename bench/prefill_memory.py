"""Peak memory of `flyer generate`'s prefill of one long prompt: fed ``--chunk`` positions a forward
(``GenerationConfig.prefill_chunk``, flyer's default 256) against its peer, the whole prompt in one forward, per
attention kind: DSA (V3.2's indexer scores every attended slot), DeepSeek-V4's hybrid attention, MLA's naive form
(per-head keys and values) and its absorbed form in BF16 (the eager form: the CPU kernel takes FP32), and GQA.

Random ``tiny`` models (``tiny-v4`` for V4; DSA with an indexer of 4 heads of 32 keeping 64), the MTP module's cache
filled where the model has one, as ``generate`` fills it. Each (kind, length, chunk) runs in a child process of its
own, one thread: the peak resident memory the prefill added over the loaded model (``ru_maxrss``) and its seconds.
Per kind and length: both, and the ratio (whole / chunked). One JSON object.

    python bench/prefill_memory.py [--lengths 1024,2048,4096] [--chunk 256] [--kinds dsa,v4,naive,absorbed-bf16,gqa]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

KINDS = {
    "dsa": dict(index_topk=64, index_n_heads=4, index_head_dim=32),
    "v4": {},
    "naive": {},
    "absorbed-bf16": {},
    "gqa": dict(attn="gqa", n_kv_heads=2, head_dim=32),
}


def child(kind: str, length: int, chunk: int) -> dict:
    """One prefill of a ``length``-token prompt of ``kind`` in this process, ``chunk`` positions a forward."""
    from flyer.config import preset  # (a child process: imports after the parent's argument checks)
    from flyer.infer.decoder import Decoder  # (as above)
    from flyer.infer.generate import prefill  # (as above)
    from flyer.model.transformer import Transformer  # (as above)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Transformer(preset("tiny-v4" if kind == "v4" else "tiny", max_seq_len=length, original_seq_len=length,
                               **KINDS[kind])).eval()
    dtype = torch.bfloat16 if kind == "absorbed-bf16" else torch.float32
    model = model.to(dtype)
    prompt = torch.randint(0, model.cfg.vocab_size, (length,), generator=torch.Generator().manual_seed(1)).tolist()
    dec = Decoder(model, 1, length, "naive" if kind == "naive" else "absorbed", dtype, with_mtp=len(model.mtp) > 0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    prefill(dec, [prompt], chunk=chunk)
    return {"s": round(time.perf_counter() - t0, 2),
            "peak_mib": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--child", nargs=3, metavar=("KIND", "LENGTH", "CHUNK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, length, chunk = args.child
        print(json.dumps(child(kind, int(length), int(chunk))))
        return 0
    kinds = args.kinds.split(",")
    if unknown := [k for k in kinds if k not in KINDS]:
        raise SystemExit(f"--kinds: unknown {unknown} (known: {', '.join(KINDS)})")
    t0 = time.perf_counter()
    out: dict = {"chunk": args.chunk, "threads": 1}
    for kind in kinds:
        for n in (int(x) for x in args.lengths.split(",")):
            for name, chunk in (("chunked", args.chunk), ("whole", n)):
                r = json.loads(subprocess.run([sys.executable, __file__, "--child", kind, str(n), str(chunk)],
                                              capture_output=True, text=True, check=True).stdout)
                out[f"{kind}_{name}_peak_mib_{n}"], out[f"{kind}_{name}_s_{n}"] = r["peak_mib"], r["s"]
            out[f"{kind}_memory_ratio_{n}"] = round(out[f"{kind}_whole_peak_mib_{n}"]
                                                    / max(out[f"{kind}_chunked_peak_mib_{n}"], 1), 1)
    out["bench_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
