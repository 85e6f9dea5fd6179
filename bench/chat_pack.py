"""Packed chat rows (``flyer train --data chats.jsonl --pack``, ``flyer.data.chat_pack``) against the same
conversations in trimmed rows of their own (the default without ``--pp``, ``bench/chat_rows.py``'s), the peer:
seconds per trained target (assistant token) of a training step, both modes alternating round by round in one
process (so machine load affects both alike).

Data: ``--conversations`` synthetic chats of ``--min-tokens`` to ``--max-tokens`` tokens (``bench/chat_rows.py``'s
``write_chats``: a wide spread by default). Round n: the packed trainer's sampler packs its next batch
(``--batch-size`` rows of ``--seq-len``); the trimmed trainer runs the same conversations as one optimizer step of
``--batch-size``-row micro-batches (gradient accumulation: the step's loss is the same). Prints one JSON object:
median seconds per trained target of each, their ratio (trimmed / packed), conversations per packed row, and the
share of positions that are padding in each mode.

    python bench/chat_pack.py [--preset tiny] [--config dsa.toml] [--seq-len 1024] [--batch-size 4] [--steps 5]
        [--device cpu]
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import torch
from chat_rows import chat_bench_args, write_chats  # beside it (bench/ is the script's directory)

from flyer.data.chat_data import IGNORE_INDEX
from flyer.data.chat_sampler import chat_rows
from flyer.train.config import TrainConfig
from flyer.train.trainer import Trainer


def main() -> None:
    a = chat_bench_args(__doc__, 1024, 4, 5, "rounds measured, after one warm-up round", 400, 20, 500)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        chats, tokenizer = write_chats(root, a.conversations, a.min_tokens, a.max_tokens)

        def trainer(name: str, pack: bool) -> Trainer:
            tc = TrainConfig(preset=a.preset, config=a.config, tokenizer=str(tokenizer), data=str(chats),
                             pack=pack, data_cache=str(root / "cache"), out=str(root / name), seq_len=a.seq_len,
                             batch_size=a.batch_size, steps=10 * (a.steps + 1), device=a.device,
                             precision=a.precision, threads=a.threads, plots=False, progress=False)
            return Trainer(tc, log=lambda m: None)

        packed_t, trimmed_t = trainer("packed", True), trainer("trimmed", False)
        per_target: dict[str, list[float]] = {"packed": [], "trimmed": []}
        per_row, pad = [], {"packed": [], "trimmed": []}
        for n in range(a.steps + 1):
            batch = packed_t.sampler.next_batch()
            convs = packed_t.sampler.last_conversations
            x, y, d = batch
            targets = int((y != IGNORE_INDEX).sum())
            packed_t.sampler.next_batch = iter([batch]).__next__
            rec = packed_t.train_step()
            del packed_t.sampler.next_batch  # the class's again
            chunks = [chat_rows(trimmed_t.data.train, convs[s:s + a.batch_size], a.seq_len, trim=True)
                      for s in range(0, len(convs), a.batch_size)]
            trimmed_t.tc.grad_accum = len(chunks)  # one optimizer step over the same conversations
            trimmed_t.sampler.next_batch = iter(chunks).__next__
            rec_t = trimmed_t.train_step()
            if n:  # round 0: warm-up (allocator, kernel selection)
                per_target["packed"].append(rec["step_time_s"] / targets)
                per_target["trimmed"].append(rec_t["step_time_s"] / targets)
                per_row.append(len(convs) / x.shape[0])
                pad["packed"].append(float((d < 0).float().mean()))
                pad["trimmed"].append(sum(float((c[0] < 0).sum()) for c in chunks) / sum(c[0].numel() for c in chunks))
        packed_t.close()
        trimmed_t.close()
        if torch.device(a.device).type == "cuda":
            torch.cuda.synchronize()
    p, t = statistics.median(per_target["packed"]), statistics.median(per_target["trimmed"])
    print(json.dumps({"preset": a.preset, "seq_len": a.seq_len, "batch_size": a.batch_size, "device": a.device,
                      "precision": packed_t.precision, "steps": a.steps, "tokens": [a.min_tokens, a.max_tokens],
                      "conversations_per_packed_row": statistics.mean(per_row),
                      "padding_share_packed": statistics.mean(pad["packed"]),
                      "padding_share_trimmed": statistics.mean(pad["trimmed"]),
                      "s_per_target_packed": p, "s_per_target_trimmed": t, "speedup": t / p}, indent=1))


if __name__ == "__main__":
    main()
