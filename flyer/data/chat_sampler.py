"""Conversations as training rows: ``chat_rows`` (each conversation's first tokens, right-padded, the loss on its
assistant tokens), ``ChatSampler`` (seeded epochs of conversations, shared out among data-parallel replicas,
resumable on another number of them) and ``chat_eval_batches``; over the splits ``flyer.data.chat_data`` builds."""

from __future__ import annotations

import numpy as np
import torch

from flyer.data.chat_data import IGNORE_INDEX, PAD_ID, ChatSplit
from flyer.errors import DataError, FieldError

STATE_VERSION = 1
ROW_MULTIPLE = 16  # trimmed rows' widths: few distinct shapes, so kernels and the allocator's blocks are reused


def row_width(split: ChatSplit, convs, seq_len: int) -> int:
    """The width trimmed rows of conversations ``convs`` need: the longest row's input, min(length, seq_len) tokens
    (its last real token too, routed as in a padded row, so padding after it changes nothing), rounded up to a
    multiple of ``ROW_MULTIPLE``, at most ``seq_len``."""
    lengths = np.diff(split.offsets)[np.asarray(convs, dtype=np.int64)]
    longest = int(np.minimum(lengths, seq_len).max())
    return min(seq_len, -(-longest // ROW_MULTIPLE) * ROW_MULTIPLE)


def chat_rows(split: ChatSplit, convs, seq_len: int, trim: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y (len(convs), W) int64, W = seq_len, or with ``trim`` the batch's ``row_width``: row b is conversation
    convs[b]'s first seq_len+1 tokens, right-padded (x with ``PAD_ID``, which the model cannot embed: the
    trainer's business); ``y[b, t]`` is token t+1 where it is an assistant token, else ``IGNORE_INDEX``. Causal
    attention: a trimmed batch gives each kept position what the seq_len-wide one does."""
    width = row_width(split, convs, seq_len) if trim else seq_len
    x = np.full((len(convs), width), PAD_ID, dtype=np.int64)
    y = np.full((len(convs), width), IGNORE_INDEX, dtype=np.int64)
    for b, c in enumerate(convs):
        ids, mask = split.conversation(int(c))
        n = min(len(ids), seq_len + 1)
        x[b, :min(n, seq_len)] = ids[:min(n, seq_len)]  # a short row's last token too: a real, routed token
        y[b, :n - 1] = np.where(mask[1:n] == 1, ids[1:n], IGNORE_INDEX)
    return torch.from_numpy(x), torch.from_numpy(y)


def trainable(split: ChatSplit, seq_len: int) -> tuple[np.ndarray, int]:
    """(conversations with an assistant target in their first seq_len+1 tokens, how many are longer than that)."""
    keep = [c for c in range(split.n_conversations) if split.conversation(c)[1][1:seq_len + 1].any()]
    cut = int((np.diff(split.offsets) > seq_len + 1).sum())
    return np.asarray(keep, dtype=np.int64), cut


class ChatSampler:
    """Training batches of whole conversations, ``BatchSampler``'s contract: ``next_batch()`` -> ``x, y``
    (``chat_rows``; with ``trim`` as wide as the batch's longest row needs: the trainer's choice, off under a
    pipeline, whose stages are built for seq_len) of the conversations with a trained token in their first
    seq_len+1 (``trainable``), in epochs: each epoch a permutation of them by a PCG64 generator seeded with
    (seed, epoch), batch n its positions n * batch_size on (an epoch's end runs into the next's start), so every
    conversation trains once an epoch, as a fine-tuning epoch goes; a pure function of (seed, n), so a resumed run
    draws what an uninterrupted one would. ``replica`` of ``replicas`` data-parallel replicas (same seed) takes
    block n * replicas + replica of that stream as its batch n: the replicas' step n is the stream's next
    replicas * batch_size positions, so an epoch trains each conversation once across them all (their own
    permutations would train some several times an epoch and skip others). A state saved before replicas shared
    the stream (no ``replicas``) resumes its replica's own, and one saved before epochs (no ``order``) its uniform
    draws with replacement, seeded with (seed, n)."""

    _held: tuple[int, np.ndarray] | None = None  # (epoch, its permutation): the last one asked for

    def __init__(self, split: ChatSplit, batch_size: int, seq_len: int, seed: int, trim: bool = False,
                 replica: int = 0, replicas: int = 1):
        self.split, self.batch_size, self.seq_len, self.seed, self.trim = split, batch_size, seq_len, seed, trim
        self.replica, self.replicas = replica, replicas
        self.pool, self.cut = trainable(split, seq_len)
        self.position, self.order = 0, "epochs"
        if not len(self.pool):
            raise FieldError("seq_len", f"{seq_len}: no training conversation has an assistant token in its first "
                                        f"seq_len+1 tokens")

    def conversations(self, n: int) -> np.ndarray:
        """Conversation indices of batch ``n``: (batch_size,) int64."""
        if self.order == "draws":
            rng = np.random.Generator(np.random.PCG64([self.seed, n]))
            return self.pool[rng.integers(0, len(self.pool), size=self.batch_size)]
        block = n * self.replicas + self.replica
        k = np.arange(block * self.batch_size, (block + 1) * self.batch_size)
        epoch, at = np.divmod(k, len(self.pool))
        out = np.empty(self.batch_size, dtype=np.int64)
        for e in np.unique(epoch):
            mine = epoch == e
            out[mine] = self.pool[self._permutation(int(e))[at[mine]]]
        return out

    def _permutation(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s order of the pool, the last one asked for kept (batches walk forward)."""
        if self._held is None or self._held[0] != epoch:
            self._held = (epoch, np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(len(self.pool)))
        return self._held[1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = chat_rows(self.split, self.conversations(self.position), self.seq_len, self.trim)
        self.position += 1
        return x, y

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "kind": "chat", "seed": self.seed, "position": self.position,
                "batch_size": self.batch_size, "seq_len": self.seq_len, "n_tokens": len(self.split),
                "n_conversations": len(self.pool), "order": self.order, "replica": self.replica,
                "replicas": self.replicas}

    def load_state_dict(self, d: dict) -> None:
        """Resume from ``state_dict()`` output; another batch shape or data would draw other samples: ``DataError``."""
        mine = self.state_dict()
        for key in ("version", "kind", "batch_size", "seq_len", "n_tokens", "n_conversations"):
            if d.get(key) != mine[key]:
                raise DataError(f"sampler state was saved with {key}={d.get(key)!r} but this sampler has "
                                f"{key}={mine[key]!r}; resuming would read different samples")
        position = d.get("position")
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise DataError(f"sampler state has invalid position {position!r}")
        order = d.get("order", "draws")  # a state from before epochs: its draws go on as they were
        if order not in ("epochs", "draws"):
            raise DataError(f"sampler state has an unknown order {order!r}")
        # a state from before replicas shared the stream: this replica's own stream (its seed) goes on alone
        share = (d.get("replica", 0), d.get("replicas", 1))
        if "replicas" in d and share != (self.replica, self.replicas):
            raise DataError(f"sampler state was saved by data-parallel replica {share[0]} of {share[1]}, but this is "
                            f"replica {self.replica} of {self.replicas}; resuming would read different samples")
        self.seed, self.position, self.order, self._held = int(d["seed"]), position, order, None
        self.replica, self.replicas = share

    def load_resized(self, states: list[dict], replica: int) -> None:
        """Resume this replica (``replica``: its index, as built) from the states of a run with ``len(states)`` replicas
        sharing the stream: it goes on where they stopped together (blocks position x replicas), so a step
        draws the blocks it would have, shared out otherwise. A consumed count this many replicas cannot split, or a
        state from before the replicas shared the stream: ``DataError``."""
        d = states[0]
        if "replicas" not in d or d.get("replicas") != len(states):
            raise DataError(f"sampler state of {d.get('replicas', 'unshared')} replicas, not the {len(states)} saved; "
                            "resume with as many data-parallel replicas")
        consumed = d.get("position") * len(states) if isinstance(d.get("position"), int) else None
        if consumed is None or consumed % self.replicas:
            raise DataError(f"the run's replicas drew {consumed} blocks, which {self.replicas} replicas cannot "
                            "share out; resume with as many data-parallel replicas as it saved")
        self.load_state_dict({**d, "replica": self.replica, "replicas": self.replicas,
                              "position": consumed // self.replicas})


def chat_eval_batches(split: ChatSplit, batch_size: int, seq_len: int, n_batches: int,
                      trim: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Validation: the held-out conversations with a trained token (``trainable``), in file order, in batches
    of ``batch_size`` (the last may be smaller; each trimmed as ``ChatSampler``'s with ``trim``), at most
    ``n_batches`` of them; identical on every call."""
    pool, _ = trainable(split, seq_len)
    if not len(pool):
        raise FieldError("seq_len", f"{seq_len}: no validation conversation has an assistant token in its first "
                                    f"seq_len+1 tokens")
    return [chat_rows(split, pool[s:s + batch_size], seq_len, trim)
            for s in range(0, min(len(pool), batch_size * n_batches), batch_size)]
