"""Preference pairs for Direct Preference Optimization (``flyer train --dpo``, ``flyer.train.dpo``): a ``.jsonl``
file in TRL's preference format (explicit prompt), one pair a line, tokenized as TRL's ``DPOTrainer`` tokenizes it.

Conversational: ``{"prompt": [messages...], "chosen": [messages...], "rejected": [messages...]}`` (``{role,
content}`` objects, content a string; the completions hold the assistant's turn(s)), ``"tools"`` and
``"chat_template_kwargs"`` optional, as a chat line's. prompt+chosen and prompt+rejected are each rendered whole with
the chat template and masked as SFT masks a conversation (``encode_conversation``): the trained tokens are the
completion's assistant turns (content and the template's closing tokens, not the header), the prompt's assistant
turns are context. For a completion of one assistant turn these are TRL's tokens; of several turns TRL trains the
user turns between them too, flyer only what the policy would write. A completion that renders no trained token, or
that starts with another role than the assistant's, is refused.

Plain text: ``{"prompt": str, "chosen": str, "rejected": str}``, no chat template, as TRL reads it: prompt+chosen
(and prompt+rejected) encoded as one text with the tokenizer's own special tokens (an HF tokenizer's BOS), the
tokenizer's ``eos_token`` appended to the completion unless it ends with it; trained are the tokens past the longest
prefix the prompt's own encoding shares with both (``plain_pair``). A line mixing the two forms is refused.

Pair p's chosen is sample 2p and its rejected sample 2p + 1 of a ``ChatSplit``, so ``chat_rows`` builds their rows
(2 rows a pair, next to each other). Validation holds out pairs as chat data holds out conversations (``held_out``).
A pair is never truncated: a sample longer than seq_len+1 tokens is refused, naming its line, where the sampler is
built (DPO compares whole completions; a cut one would compare a part of one with all of the other). Files are
encoded in memory on every run (no cache: preference sets are small next to SFT corpora).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
import torch

from flyer.data.chat_data import ChatSplit, _read_lines, encode_conversation, held_out, json_object
from flyer.data.chat_sampler import ChatSampler, chat_rows
from flyer.data.chat_template import chat_renderer
from flyer.data.deepseek_encoding import ChatTemplate
from flyer.data.tokenizer import ensure_eos
from flyer.errors import DataError, FieldError
from flyer.interop.hf_tokenizer import TextTokenizer

PREF_KEYS = ("prompt", "chosen", "rejected")


def _problem(path: Path, line: int, what: str) -> DataError:
    return DataError(f"{path}:{line}: {what}")


def _messages(value, key: str, path: Path, line: int) -> list[dict]:
    """``value`` of ``key`` as a list of messages, or a one-line ``DataError`` naming ``path:line`` and the key."""
    if not isinstance(value, list) or not value:
        raise _problem(path, line, f"{key}: expected a non-empty list of {{role, content}} messages")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise _problem(path, line, f"{key}[{i}]: expected an object with role and content strings")
    if key != "prompt" and value[0]["role"] != "assistant":  # both sides must continue the same context
        raise _problem(path, line, f"{key}: a completion starts with the assistant's turn (got "
                                   f"{value[0]['role']!r}); earlier turns belong to the prompt")
    if key != "prompt" and not any(m["role"] == "assistant" and m["content"] for m in value):
        raise _problem(path, line, f"{key}: empty completion (no assistant message with content)")
    return value


def parse_pair(raw: bytes, path: Path, line: int) -> tuple[list[dict] | str, list[dict] | str, list[dict] | str,
                                                            list | None, dict | None]:
    """(prompt, chosen, rejected, tools, chat_template_kwargs) of one line (module doc): message lists, or three
    strings for a plain-text pair; a one-line ``DataError`` naming ``path:line`` and the key otherwise."""
    d = json_object(raw, path, line, "prompt, chosen and rejected")
    missing = [k for k in PREF_KEYS if k not in d]
    if missing:
        raise _problem(path, line, f"{missing[0]}: missing (a preference pair has prompt, chosen and rejected)")
    tools, kwargs = d.get("tools"), d.get("chat_template_kwargs")
    if all(isinstance(d[k], str) for k in PREF_KEYS):  # plain text: no template, so no tools or template kwargs
        for k in ("chosen", "rejected"):
            if not d[k]:
                raise _problem(path, line, f"{k}: empty completion")
        for k in ("tools", "chat_template_kwargs"):
            if d.get(k) is not None:
                raise _problem(path, line, f"{k}: applies to conversational pairs (message lists); a plain-text "
                                           "pair is read without a chat template")
        return d["prompt"], d["chosen"], d["rejected"], None, None
    if text := next((k for k in PREF_KEYS if isinstance(d[k], str)), None):
        other = next(k for k in PREF_KEYS if not isinstance(d[k], str))
        raise _problem(path, line, f"{other}: expected a string, as {text} is (a plain-text pair has three strings, a "
                                   "conversational one three lists of {role, content} messages)")
    prompt, chosen, rejected = (_messages(d[k], k, path, line) for k in PREF_KEYS)
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise _problem(path, line, "tools: expected a list of objects")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise _problem(path, line, f"chat_template_kwargs: expected an object, got {type(kwargs).__name__}")
    return prompt, chosen, rejected, tools or None, kwargs


def plain_pair(tok: TextTokenizer, prompt: str, chosen: str, rejected: str) -> list[tuple[list[int], list[int]]]:
    """(ids, mask) of prompt+chosen and prompt+rejected, a plain-text pair as TRL's ``DPOTrainer`` tokenizes one: each
    text encoded whole with the tokenizer's own special tokens, its ``eos_token`` appended to a completion that does
    not end with it; the prompt is the longest prefix its own encoding shares with both (a token merging across the
    boundary belongs to the completions), the rest trained. ``ValueError`` without an ``eos_token``."""
    eos = tok.special_tokens().get("eos_token")
    if not eos:
        raise ValueError("a plain-text pair ends its completions with the tokenizer's eos_token; this tokenizer "
                         "names none")
    prompt_ids = tok.encode_ids(prompt)
    sides = [tok.encode_ids(prompt + c + ("" if c.endswith(eos) else eos)) for c in (chosen, rejected)]
    n = min(len(os.path.commonprefix([prompt_ids, ids])) for ids in sides)  # (commonprefix takes any sequences)
    return [(ids, [0] * n + [1] * (len(ids) - n)) for ids in sides]


@dataclass
class PrefSplit:
    """Tokenized pairs (module doc): pair p's chosen is ``samples``' sample 2p, its rejected 2p + 1."""
    samples: ChatSplit
    lines: np.ndarray  # (n_pairs,) int64: each pair's line in ``source``
    source: Path

    @property
    def n_pairs(self) -> int:
        return len(self.lines)

    def __len__(self) -> int:
        return len(self.samples)


@dataclass
class PrefData:
    """What ``prepare_prefs`` gives the trainer: the fields of ``ChatData`` it reads."""
    tokenizer: tokenizers.Tokenizer
    train: PrefSplit
    val: PrefSplit
    vocab_size: int
    eos_id: int
    unigram_val_loss: float  # the baseline the validation loss is shown against: ln 2, the DPO loss at the reference
    baseline: str = "the reference's DPO loss (validation): ln 2 ="  # how the log and plot name it


def _split(ids: list[list[int]], masks: list[list[int]], lines: list[int], keep: list[bool], path: Path) -> PrefSplit:
    picked = [s for s in range(len(ids)) if keep[s // 2]]
    lengths = [len(ids[s]) for s in picked]
    samples = ChatSplit(np.asarray([t for s in picked for t in ids[s]], dtype=np.int64),
                        np.asarray([t for s in picked for t in masks[s]], dtype=np.uint8),
                        np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64))
    return PrefSplit(samples, np.asarray([n for n, k in zip(lines, keep) if k], dtype=np.int64), path)


def prepare_prefs(path: str | Path, tok: TextTokenizer, template: ChatTemplate,
                  kwargs: dict | None = None) -> PrefData:
    """Read and tokenize the preference file ``path`` (module doc) with ``tok`` and its chat ``template`` (None:
    flyer's default); ``kwargs``: the chat_template_kwargs every line renders with (a line's own override them).
    A bad line: a one-line ``DataError`` naming ``path:line`` (the first, in file order)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: not a file" if path.exists() else f"{path}: does not exist")
    render = chat_renderer(template, tok.special_tokens())

    def encode(text: str) -> list[int]:
        return tok.encode_ids(text, add_special_tokens=False)

    ids, masks, lines = [], [], []
    for line, raw in _read_lines(path):
        prompt, chosen, rejected, tools, own = parse_pair(raw, path, line)
        if isinstance(prompt, str):
            try:
                pair = plain_pair(tok, prompt, chosen, rejected)
            except ValueError as e:
                raise _problem(path, line, str(e)) from None
        else:
            extra = {**(kwargs or {}), **(own or {})} or None
            pair = [_encode_side(prompt, completion, key, tools, extra, bool(own), render, encode, path, line)
                    for key, completion in (("chosen", chosen), ("rejected", rejected))]
        for key, (got, mask) in zip(("chosen", "rejected"), pair):
            if not any(mask):
                raise _problem(path, line, f"{key}: the completion renders no trained token")
            ids.append(got)
            masks.append(mask)
        lines.append(line)
    if len(lines) < 2:
        raise DataError(f"{path}: {len(lines)} preference pair(s); at least 2 are needed (one is held out for "
                        "validation)")
    val = held_out(len(lines))
    eos = tok.eos_id()
    train, held = (_split(ids, masks, lines, keep, path) for keep in ([not v for v in val], val))
    return PrefData(tok.tok, train, held, tok.tok.get_vocab_size(), eos if eos is not None else ensure_eos(tok.tok),
                    math.log(2))


def _encode_side(prompt: list[dict], completion: list[dict], key: str, tools, extra, own: bool, render, encode,
                 path: Path, line: int) -> tuple[list[int], list[int]]:
    """(ids, mask) of a conversational pair's prompt+``completion``: the completion's assistant turns trained (from
    message len(prompt) on), as SFT masks a turn; a one-line ``DataError`` naming ``key`` when it cannot render.
    Kwargs the template refuses: the run's (``own`` False) are the flag's ``FieldError``, a line's own its line's."""
    try:
        return encode_conversation(prompt + completion, tools, render, encode, len(prompt), extra)
    except FieldError as e:
        if e.field == "chat_template_kwargs" and not own:
            raise
        raise _problem(path, line, str(e)) from None
    except ValueError as e:
        raise _problem(path, line, f"{key}: {e}") from None
    except Exception as e:  # a template's raise_exception, or a render error: the user's line or template
        raise _problem(path, line, f"{key}: the chat template cannot render it ({e})") from None


def refuse_long(split: PrefSplit, seq_len: int) -> None:
    """A one-line ``DataError`` naming the first pair (file order) with a sample longer than seq_len+1 tokens: a
    row holds seq_len+1 tokens (inputs and the last target), and pairs are not truncated (module doc)."""
    lengths = np.diff(split.samples.offsets)
    long = np.flatnonzero(lengths > seq_len + 1)
    if len(long):
        s = int(long[0])
        raise _problem(split.source, int(split.lines[s // 2]),
                       f"prompt+{('chosen', 'rejected')[s % 2]} is {int(lengths[s])} tokens, more than seq_len+1 = "
                       f"{seq_len + 1}; DPO does not truncate a pair: raise seq_len or shorten it")


def pair_samples(pairs) -> np.ndarray:
    """The samples of ``pairs`` (n,): (2n,) int64, each pair's chosen then its rejected."""
    pairs = np.asarray(pairs, dtype=np.int64)
    return np.stack([2 * pairs, 2 * pairs + 1], 1).reshape(-1)


class PairSampler(ChatSampler):
    """Training batches of ``batch_size`` pairs, ``ChatSampler``'s contract and order (epochs of seeded
    permutations, a pure function of (seed, batch number)) over the pairs: ``next_batch()`` -> x, y
    (2 * batch_size, W), row 2b pair b's chosen, 2b + 1 its rejected, trimmed to the batch's longest
    (``chat_rows``)."""

    def __init__(self, split: PrefSplit, batch_size: int, seq_len: int, seed: int, replica: int = 0,
                 replicas: int = 1):
        refuse_long(split, seq_len)
        self.split, self.batch_size, self.seq_len, self.seed, self.trim = split.samples, batch_size, seq_len, seed, True
        self.replica, self.replicas = replica, replicas
        self.pool, self.cut, self.position, self.order = np.arange(split.n_pairs, dtype=np.int64), 0, 0, "epochs"

    def conversations(self, n: int) -> np.ndarray:
        """The samples of batch ``n``: (2 * batch_size,) int64 (``pair_samples``)."""
        return pair_samples(super().conversations(n))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "kind": "dpo"}


def pair_eval_batches(split: PrefSplit, batch_size: int, seq_len: int,
                      n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Validation: the held-out pairs in file order, ``batch_size`` a batch (the last may be smaller), at most
    ``n_batches``; rows as ``PairSampler``'s."""
    refuse_long(split, seq_len)
    return [chat_rows(split.samples, pair_samples(range(s, min(s + batch_size, split.n_pairs))), seq_len, trim=True)
            for s in range(0, min(split.n_pairs, batch_size * n_batches), batch_size)]
