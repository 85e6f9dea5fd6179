"""Building the tokenized chat cache (``flyer train --data chats.jsonl``, ``flyer.data.chat_data.prepare_chat``)
against transformers, the peer: a ``PreTrainedTokenizerFast`` over the same ``tokenizer.json`` with the same chat
template, ``apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)`` on
every conversation, its ids and masks held in memory as Python lists (what one would run without flyer).
Prints the seconds, conversations/s, tokens/s and peak RSS of each (the whole process's, and the growth over the
process's start), flyer's seconds and RSS growth to read its built cache into its splits, and ``same_tokens``:
whether every conversation's ids and assistant mask in flyer's cache equal transformers'.

Data: ``--conversations`` synthetic chats whose user/assistant turn pairs follow a long tail (1 to
``--max-pairs`` pairs, Pareto-distributed: most short, a few of 20-60 turns; a system turn in one of four),
user turns of about 5-150 words and assistant turns of about 20-400, under a byte-level BPE trained on them
here with DeepSeek-V3's special tokens and a DeepSeek-like template (``<｜User｜>``, ``<｜Assistant｜>``,
``<｜end▁of▁sentence｜>`` closing each assistant turn, inside transformers' ``{% generation %}`` block). Each
build runs in its own process (peak RSS is per process: ``resource.getrusage``), the two alternated
``--repeats`` times; prints one JSON object.

    python bench/chat_build.py [--conversations 2000] [--max-pairs 30] [--repeats 1]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
            "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
            "{% else %}<｜Assistant｜>{% generation %}{{ m['content'] }}<｜end▁of▁sentence｜>{% endgeneration %}"
            "{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}")
WORDS = ("the a model reads tokens of every chat turn and the assistant answers with short or long replies about "
         "weather code maths travel books music cooking gardens rivers, which; is: not (really) 42 3.14 def x = y "
         "return print if else for while import numpy as np\n").split(" ")


def write_data(root: Path, n: int, max_pairs: int, seed: int = 0) -> tuple[Path, Path]:
    """chats.jsonl of ``n`` conversations (module doc) and the BPE's tokenizer.json under ``root``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(seed)
    say = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    lines = []
    for _ in range(n):
        pairs = min(max_pairs, int(rng.paretovariate(1.3)))
        msgs = [{"role": "system", "content": say(rng.randint(5, 40))}] if rng.random() < 0.25 else []
        for _ in range(pairs):
            msgs += [{"role": "user", "content": say(int(rng.lognormvariate(3.3, 0.8)) % 150 + 5)},
                     {"role": "assistant", "content": say(int(rng.lognormvariate(4.5, 0.8)) % 400 + 20)}]
        lines.append(json.dumps({"messages": msgs}) + "\n")
    (root / "chats.jsonl").write_text("".join(lines))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([" ".join(WORDS)] * 8 + lines[:50], trainers.BpeTrainer(
        vocab_size=2000, special_tokens=[BOS, EOS, USER, ASSISTANT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(root / "tokenizer.json"))
    return root / "chats.jsonl", root / "tokenizer.json"


def flyer_worker(chats: Path, tokenizer: Path, cache: Path) -> dict:
    """``prepare_chat`` of ``chats`` into a new cache under ``cache``, in this process."""
    import jinja2.sandbox  # noqa: F401  imported before the timer, as transformers' import does for its worker
    from tokenizers import Tokenizer

    from flyer.data import chat_data
    from flyer.interop.hf_tokenizer import TextTokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    tt = TextTokenizer(tok, eos=tok.token_to_id(EOS), bos=tok.token_to_id(BOS))
    build, built = chat_data._build, {}

    def measured(*args):  # the build's own peak: before prepare_chat reads back the cache it wrote
        build(*args)
        built["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    chat_data._build = measured
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    data = chat_data.prepare_chat(chats, cache, tt, TEMPLATE)
    seconds = time.perf_counter() - t0
    digest = hashlib.blake2b(digest_size=16)
    for name in ("ids.npy", "mask.npy", "offsets.npy", "meta.json"):
        digest.update((data.cache_dir / name).read_bytes())
    return {"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_growth_mib": (built["rss"] - base) / 1024, "tokens": len(data.train) + len(data.val),
            "conversations": data.train.n_conversations + data.val.n_conversations, "digest": digest.hexdigest(),
            "cache": str(data.cache_dir)}


def read_worker(cache: Path) -> dict:
    """flyer's reading of the built cache ``cache`` into its splits in this process: seconds, the RSS it adds."""
    from flyer.data import chat_data

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    train, val = chat_data.read_splits(cache)
    return {"seconds": time.perf_counter() - t0, "tokens": len(train) + len(val),
            "rss_growth_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}


def transformers_worker(chats: Path, tokenizer: Path, cache: Path) -> dict:
    """transformers' ``apply_chat_template`` on every conversation of ``chats`` in this process, then (untimed, after
    the peak RSS is taken) a comparison with flyer's built cache ``cache``, conversation by conversation."""
    import numpy as np
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(tokenizer)), bos_token=BOS,
                                  eos_token=EOS, chat_template=TEMPLATE)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    ids, masks = [], []
    with open(chats) as f:
        for line in f:
            out = ref.apply_chat_template(json.loads(line)["messages"], tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True)
            ids.append(out["input_ids"])
            masks.append(out["assistant_masks"])
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # the cache holds the conversations in file order (the splits are taken when it is read)
    want_ids, want_mask = (np.load(cache / f"{n}.npy", mmap_mode="r") for n in ("ids", "mask"))
    offsets = np.load(cache / "offsets.npy")
    differ = [c for c in range(max(len(ids), len(offsets) - 1)) if c >= len(ids) or c >= len(offsets) - 1
              or list(ids[c]) != want_ids[offsets[c]:offsets[c + 1]].tolist()
              or list(masks[c]) != want_mask[offsets[c]:offsets[c + 1]].tolist()]
    return {"seconds": seconds, "peak_rss_mib": peak / 1024, "rss_growth_mib": (peak - base) / 1024,
            "tokens": sum(map(len, ids)), "conversations": len(ids),
            "differ": len(differ), "first_differ": differ[:5]}


def run_worker(which: str, root: Path, cache: Path | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, __file__, "--worker", which, "--dir", str(root)] + (["--cache", str(cache)] if cache else [])
    return json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conversations", type=int, default=2000)
    ap.add_argument("--max-pairs", type=int, default=30, help="most user/assistant pairs in a conversation")
    ap.add_argument("--repeats", type=int, default=1, help="builds of each, alternated")
    ap.add_argument("--worker", choices=["flyer", "transformers", "read"], help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    a = ap.parse_args()
    for flag, v, least in (("--conversations", a.conversations, 2), ("--max-pairs", a.max_pairs, 1),
                           ("--repeats", a.repeats, 1)):
        if v < least:
            ap.error(f"{flag}: {v}; expected at least {least}")
    if a.worker:
        root = Path(a.dir)
        out = {"flyer": lambda: flyer_worker(root / "chats.jsonl", root / "tokenizer.json",
                                             Path(tempfile.mkdtemp(dir=root))),
               "transformers": lambda: transformers_worker(root / "chats.jsonl", root / "tokenizer.json",
                                                           Path(a.cache)),
               "read": lambda: read_worker(Path(a.cache))}[a.worker]()
        print(json.dumps(out))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        chats, _ = write_data(root, a.conversations, a.max_pairs)
        turns = [len(json.loads(x)["messages"]) for x in chats.open()]
        runs: dict[str, list[dict]] = {"flyer": [], "transformers": [], "read": []}
        for r in range(a.repeats):  # flyer first on the first round: transformers' run compares with its cache
            for which in ("flyer", "transformers") if r % 2 == 0 else ("transformers", "flyer"):
                runs[which].append(run_worker(which, root, runs["flyer"][0]["cache"] if runs["flyer"] else None))
            runs["read"].append(run_worker("read", root, runs["flyer"][-1]["cache"]))
    fl, tf = runs["flyer"], runs["transformers"]
    med = {w: statistics.median(r["seconds"] for r in runs[w]) for w in runs}
    tokens, convs = fl[0]["tokens"], fl[0]["conversations"]
    print(json.dumps({
        "conversations": convs, "tokens": tokens, "mean_turns": statistics.mean(turns), "max_turns": max(turns),
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"), "repeats": a.repeats,
        "seconds_flyer": med["flyer"], "seconds_transformers": med["transformers"],
        "speedup": med["transformers"] / med["flyer"],
        "conversations_per_s_flyer": convs / med["flyer"],
        "conversations_per_s_transformers": convs / med["transformers"],
        "tokens_per_s_flyer": tokens / med["flyer"], "tokens_per_s_transformers": tokens / med["transformers"],
        "peak_rss_mib_flyer": max(r["peak_rss_mib"] for r in fl),
        "peak_rss_mib_transformers": max(r["peak_rss_mib"] for r in tf),
        "rss_growth_mib_flyer": max(r["rss_growth_mib"] for r in fl),
        "rss_growth_mib_transformers": max(r["rss_growth_mib"] for r in tf),
        "read_seconds_flyer": med["read"], "read_rss_growth_mib_flyer": max(r["rss_growth_mib"] for r in runs["read"]),
        "same_tokens": all(r["differ"] == 0 and r["tokens"] == tokens for r in tf),
        "differing_conversations": max(r["differ"] for r in tf), "first_differing": tf[0]["first_differ"],
        "flyer_builds_identical": len({r["digest"] for r in fl}) == 1}, indent=1))


if __name__ == "__main__":
    main()
