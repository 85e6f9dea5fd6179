"""``eval_batches_bytes``, the host-memory estimate the trainer checks before building its validation batches,
against what the batches hold (their tensors' nbytes summed) for text, chat and packed chat rows: never less, and
at most the per-window starts ``eval_batches`` reads with (16 bytes a window) more."""

import numpy as np
import pytest
import torch

from flyer.data.chat_data import ChatSplit
from flyer.data.chat_sampler import chat_eval_batches
from flyer.data.chat_pack import PACKED_TENSORS, packed_eval_batches
from flyer.data.sampler import TEXT_TENSORS, eval_batches, eval_batches_bytes
from flyer.train import build
from tests import test_sft
from tests.test_data import _shards
from tests.test_sft_pack import T as SFT_T
from tests.test_sft_pack import _trainer

B, T, N = 3, 16, 4


def _held(batches) -> int:
    return sum(t.nbytes for batch in batches for t in batch)


def _split(lengths) -> ChatSplit:
    """Conversations of ``lengths`` tokens, every token after the first an assistant's (each has a target)."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = np.random.default_rng(0).integers(3, 100, offsets[-1]).astype(np.int64)
    mask = np.ones(offsets[-1], dtype=np.uint8)
    mask[offsets[:-1]] = 0
    return ChatSplit(ids, mask, offsets)


def _check(batches, tensors: int) -> None:
    windows = sum(len(batch[0]) for batch in batches)
    assert windows == B * N  # full batches: the estimate's case
    held, est = _held(batches), eval_batches_bytes(B, T, N, tensors)
    assert held <= est <= held + 16 * windows, (held, est)


def test_text(tmp_path):
    tokens = np.arange(500, dtype=np.int64) % 1000
    _check(eval_batches(_shards(tmp_path, tokens, 10_000), B, T, N), TEXT_TENSORS)


def test_chat():
    # seq_len+1 tokens or more: every row as wide as seq_len (the widest a trimmed one gets)
    _check(chat_eval_batches(_split([T + 1 + i % 5 for i in range(B * N + 2)]), B, T, N), TEXT_TENSORS)


@pytest.mark.parametrize("short", [False, True])
def test_packed_chat(short):
    """Packed rows carry x, y and their documents: three int64 tensors a row (two were counted before)."""
    lengths = [3, 5, 2] * (3 * B * N) if short else [T + 1] * (B * N + 2)
    batches = packed_eval_batches(_split(lengths), B, T, N)
    assert all(len(batch) == 3 and all(t.dtype == torch.int64 for t in batch) for batch in batches)
    _check(batches, PACKED_TENSORS)


hf = test_sft.hf  # a tiny DeepSeek-V3 directory with a chat template, and chats.jsonl


@pytest.mark.parametrize("pack", [False, True])
def test_the_trainer_checks_what_its_batches_hold(hf, tmp_path, monkeypatch, pack):
    """The estimate the trainer checks covers its validation batches: one row (batch 1, one batch), which packed
    holds both held-out conversations. Mutation: the trainer's estimate with packed rows' documents left out."""
    seen = []

    def spy(*args, **kw):
        seen.append(eval_batches_bytes(*args, **kw))
        return seen[-1]
    monkeypatch.setattr(build, "eval_batches_bytes", spy)  # the check before a run (build.require_training_memory)
    t = _trainer(hf, tmp_path, batch_size=1, eval_batches=1, pack=pack)
    assert len(t.eval_data) == 1 and len(t.eval_data[0][0]) == 1
    assert seen == [eval_batches_bytes(1, SFT_T, 1, PACKED_TENSORS if pack else TEXT_TENSORS)]
    assert _held(t.eval_data) <= seen[0]
    if pack:  # a packed row is seq_len wide (a chat row is trimmed to what its batch needs: less)
        assert seen[0] <= _held(t.eval_data) + 16
