"""Packed chat rows under pipeline parallelism (``flyer train --data chats.jsonl --pack --pp 2``) against the same
pipeline on unpacked rows (one conversation per ``--seq-len`` row: a pipeline's stages run that fixed shape), the
peer: seconds per trained target (assistant token) of a training step, both modes alternating round by round on
the same 2 ranks (gloo, 1F1B; so machine load affects both alike).

Data: ``bench/chat_rows.py``'s synthetic chats (``--min-tokens`` to ``--max-tokens``). Each round runs one step of
each mode (``--micro-batches`` micro-batches of ``--batch-size`` rows) on the same model, each mode drawing its own
sampler's next batches from the same stream of conversations. Prints one JSON object: median seconds per trained
target of each, their ratio (unpacked / packed), conversations per packed row and the padding share of each.

    python bench/chat_pack_pp.py [--preset tiny] [--seq-len 1024] [--batch-size 2] [--micro-batches 4] [--steps 4]
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

from chat_rows import chat_bench_args, write_chats  # beside it (bench/ is the script's directory)

from flyer.data.chat_data import IGNORE_INDEX
from flyer.data.chat_sampler import ChatSampler
from flyer.parallel.launch import run_ranks
from flyer.train.config import TrainConfig
from flyer.train.trainer import Trainer


def _rank(rank: int, a, chats: str, tokenizer: str, root: str) -> dict:
    """Rank ``rank`` of PP2: ``a.steps`` + 1 rounds (the first a warm-up) of a packed then an unpacked step."""
    tc = TrainConfig(preset=a.preset, config=a.config, tokenizer=tokenizer, data=chats, pack=True,
                     data_cache=f"{root}/cache",
                     out=f"{root}/run{rank}", seq_len=a.seq_len, batch_size=a.batch_size, pp=2,
                     micro_batches=a.micro_batches, steps=10 * (a.steps + 1), device="cpu", precision=a.precision,
                     threads=a.threads or 1, plots=False, progress=False, collective_timeout_s=300)
    t = Trainer(tc, log=lambda m: None)
    samplers = {"packed": t.sampler, "unpacked": ChatSampler(t.data.train, a.batch_size, a.seq_len, seed=1)}
    out = {"per_target": {m: [] for m in samplers}, "pad": {m: [] for m in samplers}, "per_row": [],
           "precision": t.precision}
    for n in range(a.steps + 1):
        for mode, sampler in samplers.items():
            drawn = []

            def draw(nxt=sampler.next_batch, drawn=drawn):
                batch = nxt()
                drawn.append(batch)
                return batch

            t.sampler, t.tc.pack = sampler, mode == "packed"
            t.sampler.next_batch = draw
            rec = t.train_step()
            del t.sampler.next_batch  # the class's again
            if n:  # round 0: warm-up
                targets = sum(int((b[1] != IGNORE_INDEX).sum()) for b in drawn)
                out["per_target"][mode].append(rec["step_time_s"] / targets)
                out["pad"][mode].append(sum(float((b[0] < 0).sum()) for b in drawn) / sum(b[0].numel() for b in drawn))
                if mode == "packed":
                    out["per_row"].append(sum(int(b[2].max(1).values.add(1).sum()) for b in drawn)
                                          / sum(b[0].shape[0] for b in drawn))
    t.close()
    t.mesh.destroy()
    return out


def main() -> None:
    sys.argv, mb = _micro_batches(sys.argv)
    a = chat_bench_args(__doc__, 1024, 2, 4, "rounds measured, after one warm-up round", 400, 20, 500)
    a.micro_batches = mb
    if a.device != "cpu":  # two gloo ranks on this host's CPU: a GPU pipeline is another bench's
        print(f"chat_pack_pp.py: --device: runs its 2 pipeline ranks on the CPU only (got {a.device!r})",
              file=sys.stderr)
        sys.exit(2)
    with tempfile.TemporaryDirectory() as tmp:
        chats, tokenizer = write_chats(Path(tmp), a.conversations, a.min_tokens, a.max_tokens)
        r = run_ranks(_rank, 2, a, str(chats), str(tokenizer), tmp)[0]
    p, u = (statistics.median(r["per_target"][m]) for m in ("packed", "unpacked"))
    print(json.dumps({"preset": a.preset, "seq_len": a.seq_len, "batch_size": a.batch_size, "pp": 2,
                      "schedule": "1f1b", "micro_batches": a.micro_batches, "precision": r["precision"],
                      "steps": a.steps, "tokens": [a.min_tokens, a.max_tokens],
                      "conversations_per_packed_row": statistics.mean(r["per_row"]),
                      "padding_share_packed": statistics.mean(r["pad"]["packed"]),
                      "padding_share_unpacked": statistics.mean(r["pad"]["unpacked"]),
                      "s_per_target_packed": p, "s_per_target_unpacked": u, "speedup": u / p}, indent=1))


def _micro_batches(argv: list[str]) -> tuple[list[str], int]:
    """``--micro-batches N`` taken out of argv (the shared chat flags do not have it): (the rest, N; default 4)."""
    if "--micro-batches" not in argv:
        return argv, 4
    i = argv.index("--micro-batches")
    return argv[:i] + argv[i + 2:], int(argv[i + 1])


if __name__ == "__main__":
    main()
