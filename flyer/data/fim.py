"""Fill-in-the-middle (FIM) in the Prefix-Suffix-Middle (PSM) layout: a document split into prefix, middle and
suffix is written

    BEGIN prefix HOLE suffix END middle

so a left-to-right model learns to write a middle from the text on both sides (DeepSeek-V3 report, section 4.1:
"Prefix-Suffix-Middle (PSM) framework", applied at the document level before packing at a rate of 0.1;
DeepSeek-Coder-V2's paper used 0.5), and serving puts a request's prompt and suffix there and generates the middle
(DeepSeek's API: FIM completion, ``prompt`` + ``suffix``).

The three markers are the tokenizer's own special tokens, named per model family (``FAMILIES``): DeepSeek's
(V2, V3, Coder: ``<｜fim▁begin｜>``, ``<｜fim▁hole｜>``, ``<｜fim▁end｜>``, in V3's tokenizer 128801, 128800, 128802)
and Qwen2.5-Coder's (``<|fim_prefix|>``, ``<|fim_suffix|>``, ``<|fim_middle|>``). ``fim_tokens`` finds the family a
tokenizer holds; one that holds none cannot do FIM. ``fim_prompt`` is a request's prompt + suffix as ids.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
import tokenizers

from flyer.data.presplit import presplit_of, set_presplit
from flyer.errors import FieldError

# added tokens that are controls whatever their flag: chat markers spelled <|...|> or <｜...｜> (DeepSeek's <｜User｜>),
# and reasoning's tags. Not every tag: Gemma's <table>, <h1>... are how its tokenizer spells ordinary HTML
_CONTROL_LOOKING = re.compile(r"<\|[^<>\s]{1,64}\|>|<\uff5c[^<>\s]{1,64}\uff5c>|</?think>")


@dataclass(frozen=True)
class FimTokens:
    """One family's markers: ``begin`` before the prefix, ``hole`` before the suffix, ``end`` before the middle."""
    begin: str
    hole: str
    end: str

    def psm(self, prefix: str, suffix: str, middle: str = "") -> str:
        """The PSM text of a split (without the middle: the prompt a model completes with it)."""
        return f"{self.begin}{prefix}{self.hole}{suffix}{self.end}{middle}"


DEEPSEEK = FimTokens("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>")
QWEN = FimTokens("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
FAMILIES = (DEEPSEEK, QWEN)


def fim_tokens(tok: tokenizers.Tokenizer) -> FimTokens | None:
    """The first family of ``FAMILIES`` whose three markers ``tok`` encodes each as its one token (a marker in the
    vocabulary that text splits would train or prompt nothing a FIM model reads), or None."""
    def one(t: str) -> bool:
        i = tok.token_to_id(t)
        return i is not None and tok.encode(t, add_special_tokens=False).ids == [i]

    for family in FAMILIES:
        if all(map(one, (family.begin, family.hole, family.end))):
            return family
    return None


def fim_prompt(tok, prefix: str, suffix: str) -> list[int]:
    """The token ids a model completes with the middle between ``prefix`` and ``suffix``: their PSM text in the
    markers ``tok`` holds, encoded as its checkpoint encodes any prompt: a BOS first where its tokenizer adds one
    (DeepSeek's; Qwen's adds none), no chat template. So transformers encodes the PSM text in DeepSeek-Coder's FIM
    example, and llama.cpp's /infill lays out BOS and markers alike. The middle ends at the checkpoint's EOS as any
    completion: DeepSeek's and Qwen's END marker opens the middle (it is in the prompt), the model closes the
    middle with EOS (V3's generation_config: <｜end▁of▁sentence｜>), so no marker is a stop.

    The prompt and suffix are text: a marker, BOS or EOS they spell is their characters (``encode_text``), as
    llama.cpp's /infill reads them and as training encodes documents; transformers, encoding the whole PSM string,
    would read one as a control token, and so read a different layout (the same ids whenever neither spells one).

    ``tok``: a flyer text tokenizer (``encode_ids``, ``encode_text``, ``fim_tokens()``: the family its vocabulary
    holds, or None). ``FieldError`` naming ``suffix`` when it holds none."""
    markers = tok.fim_tokens()
    if markers is None:
        raise FieldError("suffix", "this model's tokenizer has no fill-in-the-middle tokens (DeepSeek's "
                                   f"{DEEPSEEK.begin} ... or Qwen's {QWEN.begin} ...): send the prompt without it")
    frame = tok.encode_ids(markers.psm("", ""))  # [BOS] BEGIN HOLE END, as the checkpoint encodes any prompt
    hole = frame.index(tok.encode_ids(markers.hole, add_special_tokens=False)[0])
    return [*frame[:hole], *tok.encode_text(prefix), frame[hole], *tok.encode_text(suffix), *frame[hole + 1:]]


def text_tokenizer(tok: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """A copy of ``tok`` that encodes text as text: a special token, FIM marker (``FAMILIES``) or other control
    token a text spells is its characters, not its id, so that only the ids put in on purpose (EOS, the markers of
    a FIM split or prompt) are controls. ``encode_special_tokens`` does that for special tokens; DeepSeek's
    tokenizers hold their FIM markers and chat tokens (``<｜User｜>``) as added tokens that are not special, which it
    leaves matched, so the copy makes those special first: the FIM markers, and every added token that looks like a
    chat control (``<|im_start|>``, ``<｜User｜>``, ``<think>``), as llama.cpp types such tokens CONTROL. Other added
    tokens (DeepSeek-Coder's single characters, Gemma's HTML tags) stay as they are: they are how the tokenizer
    spells text.
    The copy keeps ``tok``'s ``PreSplit`` (``flyer.data.presplit``)."""
    d = json.loads(tok.to_str())
    names = {m for f in FAMILIES for m in (f.begin, f.hole, f.end)}
    for t in d.get("added_tokens", []):
        if t.get("content") in names or _CONTROL_LOOKING.fullmatch(t.get("content") or ""):
            t["special"] = True
    out = tokenizers.Tokenizer.from_str(json.dumps(d))
    out.encode_special_tokens = True
    return set_presplit(out, presplit_of(tok))


def draw_split(n_chars: int, rng: np.random.Generator) -> tuple[int, int]:
    """Split points ``0 <= i <= j <= n_chars`` of a document of ``n_chars`` characters: prefix ``[0, i)``, middle
    ``[i, j)``, suffix ``[j, n_chars)``. Two positions drawn uniformly and independently from ``{0, ..., n_chars}``,
    then sorted: the character-level split of Bavarian et al. 2022, which DeepSeek-Coder's document-level FIM
    follows (any part may be empty)."""
    i, j = sorted(int(x) for x in rng.integers(0, n_chars + 1, size=2))
    return i, j


def fim_split(text: str, rng: np.random.Generator, rate: float) -> tuple[str, str, str] | None:
    """With probability ``rate``, ``text``'s (prefix, suffix, middle) at split points ``draw_split`` takes from
    ``rng``; else (and for an empty text) None. The Bernoulli draw comes first, so the same ``rng`` state decides
    both whether and where."""
    if not (rng.random() < rate and text):
        return None
    i, j = draw_split(len(text), rng)
    return text[:i], text[j:], text[i:j]


def fim_document(text: str, rng: np.random.Generator, rate: float, markers: FimTokens) -> str:
    """``text`` rewritten as PSM with ``markers`` where ``fim_split`` splits it, else unchanged."""
    split = fim_split(text, rng, rate)
    return text if split is None else markers.psm(*split)


__all__ = ["DEEPSEEK", "FAMILIES", "FimTokens", "QWEN", "draw_split", "fim_document", "fim_prompt", "fim_split",
           "fim_tokens"]
