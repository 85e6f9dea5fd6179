"""Packed chat rows (``flyer train --pack``): several whole conversations back to back in each seq_len-wide row.

A row is a buffer of seq_len+1 tokens (x its first seq_len, y its last seq_len, as text rows), holding conversations
from position 0 on, each its first seq_len+1 tokens (a longer one is cut, as in ``chat_rows``); the rest is padding.
``documents`` (B, seq_len) int64 numbers each x position's conversation within its row (0, 1, ...; -1: padding),
from which the model attends within each conversation only, at positions restarting at 0 (``flyer.model.documents``).
A conversation's y is what its own row would hold (``chat_rows``): the assistant's next tokens, ``IGNORE_INDEX``
elsewhere, its last token's too (there the next conversation's first token: no target crosses a boundary).

The packer is first-fit over a stream of conversations: each goes into the first row with room; the first one
that fits in none closes the batch and opens the next. The stream is ``ChatSampler``'s: block n is the batch_size
conversations it draws for batch n (a slice of an epoch's permutation), so packed and unpacked runs train on the
same conversations in the same order; the state is the stream's cursor (block, index in it).
"""

from __future__ import annotations

import numpy as np
import torch

from flyer.data.chat_data import IGNORE_INDEX, PAD_ID, ChatSplit
from flyer.data.chat_sampler import ChatSampler, trainable
from flyer.errors import DataError, FieldError

STATE_VERSION = 1
PACKED_TENSORS = 3  # a packed batch's (B, seq_len) int64 tensors: x, y, documents (``eval_batches_bytes``)


def packed_rows(split: ChatSplit, rows: list[list[int]], seq_len: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, y, documents (len(rows), seq_len) int64: row b holds conversations ``rows[b]`` back to back (module doc);
    their first seq_len+1 tokens each must fit in seq_len+1 together."""
    x = np.full((len(rows), seq_len), PAD_ID, dtype=np.int64)
    y = np.full((len(rows), seq_len), IGNORE_INDEX, dtype=np.int64)
    docs = np.full((len(rows), seq_len), -1, dtype=np.int64)
    for b, convs in enumerate(rows):
        o = 0
        for d, c in enumerate(convs):
            ids, mask = split.conversation(int(c))
            n = min(len(ids), seq_len + 1)
            if o + n > seq_len + 1:
                raise ValueError(f"row {b}: conversations of {o + n} tokens do not fit in seq_len+1 = {seq_len + 1}")
            end = min(o + n, seq_len)  # a conversation ending the buffer: its last token only a target
            x[b, o:end] = ids[:end - o]
            docs[b, o:end] = d
            y[b, o:o + n - 1] = np.where(mask[1:n] == 1, ids[1:n], IGNORE_INDEX)  # its last token's: ignored
            o += n
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(docs)


def first_fit(lengths, batch_size: int, capacity: int) -> tuple[list[list[int]], int]:
    """(rows of indices into ``lengths``, how many of them were taken): first-fit of the lengths in order into
    ``batch_size`` rows of ``capacity``, stopping at the first that fits in no row."""
    rows: list[list[int]] = [[] for _ in range(batch_size)]
    fill = [0] * batch_size
    taken = 0
    for i, n in enumerate(lengths):
        b = next((b for b in range(batch_size) if fill[b] + n <= capacity), None)
        if b is None:
            break
        rows[b].append(i)
        fill[b] += n
        taken = i + 1
    return [r for r in rows if r], taken


class PackedChatSampler:
    """Training batches of packed rows, ``ChatSampler``'s contract but for the third tensor: ``next_batch()`` ->
    ``x, y, documents`` (``packed_rows``), the conversations ``ChatSampler`` would draw, in its order, first-fit
    packed (module doc). ``last_conversations``: the conversations of the last batch, in stream order."""

    def __init__(self, split: ChatSplit, batch_size: int, seq_len: int, seed: int, replica: int = 0,
                 replicas: int = 1):
        # its conversations(n): block n of this replica's share of the stream
        self.stream = ChatSampler(split, batch_size, seq_len, seed, replica=replica, replicas=replicas)
        self.split, self.batch_size, self.seq_len = split, batch_size, seq_len
        self.cut = self.stream.cut
        self.lengths = np.minimum(np.diff(split.offsets), seq_len + 1)
        self.position, self.offset = 0, 0  # the stream's cursor: block, index in it
        self.last_conversations: list[int] = []

    @property
    def seed(self) -> int:
        return self.stream.seed

    def _upcoming(self):
        """Conversations from the cursor on: (block, index, conversation)."""
        n, i = self.position, self.offset
        while True:
            block = self.stream.conversations(n)
            for j in range(i, len(block)):
                yield n, j, int(block[j])
            n, i = n + 1, 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seen: list[tuple[int, int, int]] = []

        def lengths():
            for item in self._upcoming():
                seen.append(item)
                yield int(self.lengths[item[2]])

        rows, taken = first_fit(lengths(), self.batch_size, self.seq_len + 1)
        self.position, self.offset = seen[taken][:2]  # the first that fit in no row opens the next batch
        self.last_conversations = [c for _, _, c in seen[:taken]]
        return packed_rows(self.split, [[seen[i][2] for i in r] for r in rows], self.seq_len)

    def state_dict(self) -> dict:
        return {**self.stream.state_dict(), "version": STATE_VERSION, "pack": True, "position": self.position,
                "offset": self.offset}

    def load_resized(self, states: list[dict], replica: int) -> None:
        """Packed replicas do not go through the stream together (each packs as many conversations as fit), so
        another number of them cannot pick up where they stopped: ``DataError``."""
        n = len(states)
        raise DataError(f"packed rows: the place in the stream of {n} data-parallel replica{'s' * (n != 1)} does not "
                        f"carry over to {self.stream.replicas}; resume with {n} replica{'s' * (n != 1)}")

    def load_state_dict(self, d: dict) -> None:
        """Resume from ``state_dict()``; an unpacked sampler's state, another batch shape's or data's: ``DataError``."""
        if not d.get("pack"):
            raise DataError("sampler state was saved without packing; resuming with packing would read different "
                            "samples")
        self.stream.load_state_dict({**d, "position": 0})  # its checks of the shape and data, and its seed
        cursor = (d.get("position"), d.get("offset"))
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in cursor) or cursor[1] >= self.batch_size:
            raise DataError(f"sampler state has an invalid cursor {cursor!r}")
        self.position, self.offset = cursor


def packed_eval_batches(split: ChatSplit, batch_size: int, seq_len: int,
                        n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Validation packed as training is: the held-out conversations with a trained token (``trainable``), in file
    order, first-fit into batches of ``batch_size`` rows, at most ``n_batches`` of them; identical on every call."""
    pool, _ = trainable(split, seq_len)
    if not len(pool):
        raise FieldError("seq_len", f"{seq_len}: no validation conversation has an assistant token in its first "
                                    f"seq_len+1 tokens")
    lengths = np.minimum(np.diff(split.offsets), seq_len + 1)[pool]
    out, s = [], 0
    while s < len(pool) and len(out) < n_batches:
        rows, taken = first_fit(lengths[s:], batch_size, seq_len + 1)
        out.append(packed_rows(split, [[int(pool[s + i]) for i in r] for r in rows], seq_len))
        s += taken
    return out


def document_lengths(documents_BT: torch.Tensor) -> list[int]:
    """The x positions of every document of a packed batch (``documents`` (B, T), -1 padding), row by row."""
    return [int(n) for row in documents_BT for n in torch.bincount(row[row >= 0]) if n]
