"""Training and evaluation batches read by random access from token shards.

No shuffle buffer and no prefetch stage: each training row is ``seq_len + 1`` tokens read from a
uniformly random offset anywhere in the shards, the way 3FS serves data loaders. Batch ``n``
is a pure function of ``(seed, n)``: its offsets come from a PCG64 generator seeded with the
pair, so a run resumed at position ``n`` reads exactly what an uninterrupted run would.
"""

from __future__ import annotations

import numpy as np
import torch

from flyer.data.shards import TokenShards
from flyer.errors import DataError, FieldError

STATE_VERSION = 1


def _check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"{name} must be a positive integer (got {value!r})")
    return value


def _check_fits(tokens: TokenShards, seq_len: int, split: str) -> None:
    if len(tokens) < seq_len + 1:
        raise FieldError("seq_len", f"the {split} split has {len(tokens)} tokens, fewer than {{seq_len}} + 1 = "
                                    f"{seq_len + 1}; lower it or give more data", ("seq_len",))


def _rows(tokens: TokenShards, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    buf = np.stack([tokens.read(int(s), seq_len + 1) for s in starts])  # (B, T+1) int64
    buf_t = torch.from_numpy(buf)
    return buf_t[:, :-1].contiguous(), buf_t[:, 1:].contiguous()


class BatchSampler:
    """Random-offset next-token batches.

    ``next_batch()`` returns ``x, y``, both (batch_size, seq_len) int64, with
    ``y[b, t] == x[b, t + 1]`` for ``t < seq_len - 1`` (row b is tokens [s_b, s_b + seq_len]).
    ``position`` counts batches drawn; ``state_dict`` / ``load_state_dict`` carry it through
    checkpoints as plain JSON.
    """

    def __init__(self, tokens: TokenShards, batch_size: int, seq_len: int, seed: int):
        self.tokens = tokens
        self.batch_size = _check_positive("batch_size", batch_size)
        self.seq_len = _check_positive("seq_len", seq_len)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise DataError(f"seed must be a non-negative integer (got {seed!r})")
        self.seed = seed
        self.position = 0
        _check_fits(tokens, seq_len, "training")

    def offsets(self, n: int) -> np.ndarray:
        """Row start offsets of batch ``n``: (batch_size,) int64 in [0, len - seq_len - 1]."""
        rng = np.random.Generator(np.random.PCG64([self.seed, n]))
        return rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size, dtype=np.int64)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = _rows(self.tokens, self.offsets(self.position), self.seq_len)
        self.position += 1
        return x, y

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "position": self.position,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "n_tokens": len(self.tokens),
        }

    def load_state_dict(self, d: dict) -> None:
        """Resume from ``state_dict()`` output. The saved seed wins; a different batch shape or
        token count would silently change the sample stream, so those raise ``DataError``."""
        if d.get("version") != STATE_VERSION:
            raise DataError(f"sampler state has version {d.get('version')!r}; expected {STATE_VERSION}")
        for key, mine in (("batch_size", self.batch_size), ("seq_len", self.seq_len), ("n_tokens", len(self.tokens))):
            if d.get(key) != mine:
                raise DataError(f"sampler state was saved with {key}={d.get(key)!r} but this sampler has {key}={mine}; "
                                "resuming would read different samples")
        position = d.get("position")
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise DataError(f"sampler state has invalid position {position!r}")
        self.seed = int(d["seed"])
        self.position = position

    def load_resized(self, states: list[dict], replica: int) -> None:
        """Resume data-parallel replica ``replica`` (this sampler: its own seed) from the states of a run with
        ``len(states)`` replicas (``states[r]``: replica r's, all at one position): a replica the run had goes on
        with its stream, a new one starts its own at that position (each position of a stream is fresh windows)."""
        own = states[replica] if replica < len(states) else {**states[0], "seed": self.seed}
        self.load_state_dict(own)


TEXT_TENSORS = 2  # an evaluation batch's (B, seq_len) int64 tensors: x, y (chat rows' too)


def eval_batches_bytes(batch_size: int, seq_len: int, n_batches: int, tensors: int = TEXT_TENSORS) -> int:
    """Host bytes the validation batches hold, at most: ``tensors`` int64 tensors (batch_size, seq_len) per batch
    (``TEXT_TENSORS``: ``eval_batches``' and ``chat_eval_batches``' x, y; packed rows carry their documents too,
    ``flyer.data.chat_pack.PACKED_TENSORS``), and per window ``eval_batches``' float and int start while it reads."""
    return batch_size * n_batches * (tensors * seq_len * 8 + 16)


def eval_batches(tokens: TokenShards, batch_size: int, seq_len: int,
                 n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n_batches`` fixed batches of (batch_size, seq_len) int64 ``x, y``: the
    ``batch_size * n_batches`` windows are evenly spaced from the start to the end of
    ``tokens`` (overlapping when the split is short), identical on every call."""
    _check_positive("batch_size", batch_size)
    _check_positive("seq_len", seq_len)
    _check_positive("n_batches", n_batches)
    _check_fits(tokens, seq_len, "validation")
    n_windows = batch_size * n_batches
    last = len(tokens) - seq_len - 1
    starts = np.rint(np.linspace(0, last, n_windows)).astype(np.int64) if n_windows > 1 else np.zeros(1, np.int64)
    return [_rows(tokens, starts[i * batch_size:(i + 1) * batch_size], seq_len) for i in range(n_batches)]
