"""Chat rows trimmed to their batch's longest (``flyer train --data chats.jsonl`` without ``--pp``,
``flyer.data.chat_sampler.row_width``) against the same batches padded to ``--seq-len``, the peer: seconds per
training step, and real (non-padding) tokens per second, of one trainer alternating the two step by step (so
machine load affects both alike).

Data: ``--conversations`` synthetic chats (a user turn and an assistant turn of random words, together
``--min-tokens`` to ``--max-tokens`` tokens under a byte-level BPE trained on them here) in a temporary
directory, with flyer's default chat template. Each step draws its batch from the trainer's sampler (the same
conversations in both modes, as both run the same batch index n). Prints one JSON object: the median step
seconds of each, the ratio padded / trimmed, the mean trimmed width and real tokens per second of each.

    python bench/chat_rows.py [--preset tiny] [--seq-len 512] [--batch-size 8] [--steps 6] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from pathlib import Path

import torch

from flyer.data.tokenizer import train_bpe
from flyer.train.config import TrainConfig
from flyer.train.trainer import Trainer

WORDS = ("the a model reads tokens of every chat turn and the assistant answers with short or long replies about "
         "weather code maths travel books music cooking gardens rivers").split()


def write_chats(root: Path, n: int, lo: int, hi: int, seed: int = 0) -> tuple[Path, Path]:
    """chats.jsonl of ``n`` conversations of about ``lo``-``hi`` tokens (words here: about one token each under
    the BPE trained on them) and that BPE's tokenizer.json."""
    rng = random.Random(seed)
    say = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    chats = []
    for _ in range(n):
        total = rng.randint(lo, hi) - 12  # about 12 tokens of template: headers and line ends
        user = rng.randint(total // 4, total // 2)
        chats.append({"messages": [{"role": "user", "content": say(user)},
                                   {"role": "assistant", "content": say(total - user)}]})
    tok = train_bpe([" ".join(WORDS)] * 4, 512)
    tok.save(str(root / "tokenizer.json"))
    (root / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    return root / "chats.jsonl", root / "tokenizer.json"


def chat_bench_args(doc: str, seq_len: int, batch_size: int, steps: int, steps_help: str, conversations: int,
                    min_tokens: int, max_tokens: int) -> argparse.Namespace:
    """The chat benches' flags (this one's and ``chat_pack.py``'s), with their defaults."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--config", default=None, help="TOML overriding model fields ([model]): e.g. a DSA model")
    ap.add_argument("--seq-len", type=int, default=seq_len)
    ap.add_argument("--batch-size", type=int, default=batch_size)
    ap.add_argument("--steps", type=int, default=steps, help=steps_help)
    ap.add_argument("--conversations", type=int, default=conversations)
    ap.add_argument("--min-tokens", type=int, default=min_tokens)
    ap.add_argument("--max-tokens", type=int, default=max_tokens)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    return ap.parse_args()


def main() -> None:
    a = chat_bench_args(__doc__, 512, 8, 6, "steps of each mode, after one warm-up step of each", 200, 60, 200)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        chats, tokenizer = write_chats(root, a.conversations, a.min_tokens, a.max_tokens)
        tc = TrainConfig(preset=a.preset, config=a.config, tokenizer=str(tokenizer), data=str(chats),
                         data_cache=str(root / "cache"),
                         out=str(root / "run"), seq_len=a.seq_len, batch_size=a.batch_size, steps=2 * a.steps + 2,
                         device=a.device, precision=a.precision, threads=a.threads, plots=False, progress=False)
        t = Trainer(tc, log=lambda m: None)
        times: dict[bool, list[float]] = {True: [], False: []}
        real: dict[bool, list[float]] = {True: [], False: []}
        widths = []
        for n in range(a.steps + 1):
            for trim in (True, False):
                t.sampler.trim, t.sampler.position = trim, n  # batch n in both modes
                x, _ = t.sampler.next_batch()
                t.sampler.position = n
                rec = t.train_step()
                if n:  # step 0 of each: warm-up (allocator, kernel selection)
                    times[trim].append(rec["step_time_s"])
                    real[trim].append(float((x >= 0).sum()) / rec["step_time_s"])
                    widths += [x.shape[1]] if trim else []
        t.close()
        if torch.device(a.device).type == "cuda":
            torch.cuda.synchronize()
    trimmed, padded = statistics.median(times[True]), statistics.median(times[False])
    print(json.dumps({"preset": a.preset, "seq_len": a.seq_len, "batch_size": a.batch_size, "device": a.device,
                      "precision": t.precision, "steps": a.steps, "mean_trimmed_width": statistics.mean(widths),
                      "step_s_trimmed": trimmed, "step_s_padded": padded, "speedup": padded / trimmed,
                      "real_tokens_per_s_trimmed": statistics.median(real[True]),
                      "real_tokens_per_s_padded": statistics.median(real[False])}, indent=1))


if __name__ == "__main__":
    main()
