"""What Kimi's cut of long runs (``flyer.data.presplit``) costs ``encode``: 1M characters of ordinary text and 1M
with a 300,000-character run, encoded by one tokenizer with and without the cut (the peer, same run), and the
cut's own scan. Prints JSON; ``presplit_over_whole`` is the ratio. Run: ``.venv/bin/python bench/presplit.py``."""

from __future__ import annotations

import json
import time

from flyer.data.presplit import PreSplit, encode, set_presplit
from flyer.data.tokenizer import train_bpe

WORDS = ("The quick brown fox jumps over the lazy dog's back; it's 2024 and we're 12345 strong! 中文分词测试 "
         "def tokenize(text):\n    return [t for t in text.split()]  # a comment\n\tindented café naïve ")


def best(f, n: int = 5) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    tok = train_bpe([WORDS] * 50, 600)
    cut = PreSplit()
    texts = {"ordinary_1M": (WORDS * 6000)[:1_000_000],
             "with_300k_run_1M": "the" * 100_000 + " " + (WORDS * 4000)[:700_000]}
    out = {}
    for name, text in texts.items():
        set_presplit(tok, None)
        whole = best(lambda: tok.encode(text, add_special_tokens=False))
        set_presplit(tok, cut)
        pieces = best(lambda: encode(tok, text, add_special_tokens=False))
        scan = best(lambda: cut.spans(text))
        out[name] = {"chars": len(text), "pieces": len(cut.spans(text)), "spans_s": round(scan, 4),
                     "encode_whole_s": round(whole, 4), "encode_presplit_s": round(pieces, 4),
                     "presplit_over_whole": round(pieces / whole, 3)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
