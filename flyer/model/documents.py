"""Packed documents: several sequences back to back in one row (``flyer train --pack``), each computed as if alone.

A packed batch carries ``documents_BT`` (B, T) int64: the document each position belongs to, numbered from 0 in
each row in order (contiguous runs), -1 for padding (after the row's last document). From it the model derives
once per forward (``Documents``):

- attention within each document only: ``attend`` gathers each document's positions into a row of its own (rows
  grouped by length, each group right-padded to its longest), where causal attention runs as in an unpacked row
  (its fused kernel, no T x T mask: about each document's own cost), and gathers the outputs back; padding
  positions attend to nothing (zeros: no real position sees them, and they carry no target);
- RoPE positions restarting at 0 at each document's first token;
- MTP depth k's targets: position i predicts token i+k+1, so it keeps its target only where position i+k is in
  i's document (``depth_targets``; the target of a document's last token is ignored by the data already).

DSA (V3.2, GLM-5: ``index_topk`` > 0) and DeepSeek-V4's hybrid attention cannot go through ``attend``: the indexer
selects among a query's causal keys before attention, so it would select across documents, and V4's compression
blocks would pool across them (and the DSA indexer's L_I and gathered chunks are the unpacked forward's own).
``each`` therefore moves the packing one step earlier: it gathers the attention module's *input* x into the same
length-grouped rows and runs the whole unpacked attention forward on each group (selection, gathered chunks, L_I,
V4's sliding window and compression blocks as for rows of their own, from position 0), scattering the outputs
back. That reuses every path as it is, its oracles' tests included, at the price of running the attention
projections on the groups' padding slots too (a group's rows are at most twice as long as their shortest), where
gathering per-document tensors after the projections would need a packed-aware indexer, chunk plan and compressor.
A group's padding slots (past a document's end) come after its real queries, so no real query sees them (nor a V4
compressed entry a real query sees: an entry is visible once its whole block is); they count in nothing: L_I
averages over ``real`` slots only, and GLM-5's shared layers take the selection their own group's full layer made
(``flyer.model.attention.Selection.group``).

``documents_BT`` None is the unpacked path, unchanged.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # flyer.model.loss's (and torch's) ignore_index


def document_positions(documents_BT: torch.Tensor) -> torch.Tensor:
    """(B, T) int64: each position's offset from its document's first position (documents contiguous)."""
    T = documents_BT.shape[1]
    idx = torch.arange(T, device=documents_BT.device).expand_as(documents_BT)
    starts = torch.ones_like(documents_BT, dtype=torch.bool)
    starts[:, 1:] = documents_BT[:, 1:] != documents_BT[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # the run's first index
    return idx - first


def document_segments(documents_BT: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(gathers, scatter) int64 for attention per document of ``documents_BT`` (B, T), the documents grouped by
    length (each group's rows as long as its longest: lengths in (2^(j-1), 2^j] together, so a short document
    is not padded to the batch's longest). Group g's gather (N_g, L_g): row n's j-th entry the flat position
    (b * T + t) of its document's j-th token, past the document's end its last (after every real query: causal
    attention never shows it to them). scatter (B*T,): position p's slot in the groups' outputs flattened and
    concatenated, padding (id < 0) the one slot past them all (which ``attend`` fills with zeros)."""
    B, T = documents_BT.shape
    d = documents_BT.cpu()  # the plan is the host's: a few small index tensors, then one copy each to the device
    starts = torch.ones(B, T, dtype=torch.bool)
    starts[:, 1:] = d[:, 1:] != d[:, :-1]
    starts = starts.flatten()
    first = starts.nonzero().squeeze(1)  # flat start of every run (every row starts one)
    lengths = torch.diff(first, append=first.new_tensor([B * T]))
    real = d.flatten()[first] >= 0  # padding runs attend to nothing
    first, lengths = first[real], lengths[real]
    bucket = torch.ceil(torch.log2(lengths.double())).long()
    slot = torch.full((B * T,), -1, dtype=torch.int64)  # a run's first slot, at its first position
    gathers, offset = [], 0
    for b in bucket.unique().tolist():
        sel = (bucket == b).nonzero().squeeze(1)
        L = int(lengths[sel].max())
        j = torch.arange(L)
        gathers.append((first[sel].unsqueeze(1) + torch.minimum(j, lengths[sel].unsqueeze(1) - 1)).to(
            documents_BT.device))
        slot[first[sel]] = offset + torch.arange(len(sel)) * L
        offset += len(sel) * L
    run_first = torch.where(starts, torch.arange(B * T), 0).cummax(0).values  # each position's run start
    base = slot[run_first]
    scatter = torch.where(base >= 0, base + torch.arange(B * T) - run_first, offset)
    return gathers, scatter.to(documents_BT.device)


def document_slots(gather_NL: torch.Tensor) -> torch.Tensor:
    """Bool (N, L): the slots of a group's gather (``document_segments``) within their document, not past its end
    (where the gather repeats the document's last position)."""
    lengths = gather_NL[:, -1:] - gather_NL[:, :1] + 1  # a document's positions are consecutive
    return torch.arange(gather_NL.shape[1], device=gather_NL.device) < lengths


def depth_queries(documents_BT: torch.Tensor, k: int) -> torch.Tensor:
    """Bool (B, T-k): the positions i of MTP depth k (position i reads token i+k) that a document alone has too:
    i and i+k in one document (id >= 0). Depth 0: the real positions."""
    T = documents_BT.shape[1]
    return (documents_BT[:, :T - k] >= 0) & (documents_BT[:, :T - k] == documents_BT[:, k:])


def query_count(valid_BT: torch.Tensor, documents_BT: torch.Tensor | None, k: int) -> int:
    """The real queries of MTP depth k that an indexer's L_I averages over: positions reading real tokens k..T-1
    (``valid_BT`` (B, T) bool), packed those with i + k in i's document too (``depth_queries``)."""
    return int(depth_queries(documents_BT, k).sum() if documents_BT is not None else valid_BT[:, k:].sum())


def depth_targets(targets_BT: torch.Tensor, documents_BT: torch.Tensor | None, k: int) -> torch.Tensor:
    """MTP depth k's targets (B, T-k): ``targets_BT[:, k:]`` (position i predicts token i+k+1), with
    ``IGNORE_INDEX`` where position i+k is in another document than i (packed rows; None: unchanged)."""
    y = targets_BT[:, k:]
    if documents_BT is None or k == 0:
        return y
    T = targets_BT.shape[1]
    same = documents_BT[:, :T - k] == documents_BT[:, k:]
    return y.masked_fill(~same, IGNORE_INDEX)


class Documents:
    """What one forward of a packed batch derives from ``documents_BT`` (module doc): ``positions`` (B, T) and the
    groups ``attend`` and ``each`` run (``document_segments``); ``real`` (B, T) bool: the positions a document alone
    has too (``depth_queries``); ``first(T)``: the same for the first T positions (an MTP module's, whose position i
    sits in i's document and reads token i + k, k = the batch's T minus T)."""

    __slots__ = ("ids", "positions", "gathers", "scatter", "real", "slots")

    def __init__(self, documents_BT: torch.Tensor, real_BT: torch.Tensor | None = None):
        self.ids = documents_BT
        self.positions = document_positions(documents_BT)
        self.gathers, self.scatter = document_segments(documents_BT)
        self.real = documents_BT >= 0 if real_BT is None else real_BT
        self.slots: list[tuple[torch.Tensor, int]] | None = None  # ``each``'s, made once per forward

    def first(self, T: int) -> Documents:
        return Documents(self.ids[:, :T], depth_queries(self.ids, self.ids.shape[1] - T))

    def attend(self, attention, q_BTHK: torch.Tensor, k_BTHK: torch.Tensor, v_BTHV: torch.Tensor) -> torch.Tensor:
        """(B, T, H, V): ``attention(q, k, v)`` (causal, each (N, L, H, .) -> (N, L, H, V)) run on each group of
        documents, every document a row of its own from its first token; padding positions get zeros. Gathers
        both ways, so autograd carries the gradients."""
        outs = [attention(*(x.flatten(0, 1)[g] for x in (q_BTHK, k_BTHK, v_BTHV))).flatten(0, 1)
                for g in self.gathers]
        flat = torch.cat(outs + [outs[0].new_zeros(1, *outs[0].shape[1:])])
        return flat[self.scatter].view(*self.ids.shape, *flat.shape[1:])

    def each(self, forward, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             real_BT: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, D'): ``forward(g, x, cos, sin, real)`` run on each group g of documents (module doc), x (N, L, D)
        every document a row of its own from its first token (past its end its last token again), cos / sin (L, 1, d)
        the tables at positions 0..L-1 (the group's longest row's: it runs from 0 to L-1), real (N, L) bool: the
        slots that are a real position of ``real_BT`` (None: ``self.real``) and not past their document's end; it
        returns (N, L, D'). Padding positions get zeros. cos / sin: (B, T, 1, d) at the packed positions
        (``rope``)."""
        real_BT = self.real if real_BT is None else real_BT
        if self.slots is None:  # once, not per layer: the longest row's index syncs with the device
            self.slots = [(document_slots(g), int((g[:, -1] - g[:, 0]).argmax())) for g in self.gathers]
        outs = []
        for i, (g, (within, longest)) in enumerate(zip(self.gathers, self.slots)):
            tables = [t.flatten(0, 1)[g[longest]] for t in (cos, sin)]
            out = forward(i, x_BTD.flatten(0, 1)[g], *tables, real_BT.flatten()[g] & within)
            outs.append(out.flatten(0, 1))
        flat = torch.cat(outs + [outs[0].new_zeros(1, *outs[0].shape[1:])])
        return flat[self.scatter].view(*self.ids.shape, *flat.shape[1:])

    def layer_tables(self, tables: list[tuple[torch.Tensor, torch.Tensor]], T: int) -> list[tuple[torch.Tensor,
                                                                                                  torch.Tensor]]:
        """``rope`` of each layer's tables (``layer_rope_tables``), each distinct table gathered once (layers share
        one, or V4's two kinds), not once per layer."""
        done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for cos, sin in tables:
            if id(cos) not in done:
                done[id(cos)] = self.rope(cos, sin, T)
        return [done[id(cos)] for cos, _ in tables]

    def rope(self, cos: torch.Tensor, sin: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``rope_cos_sin``'s tables (>= max position + 1 rows, 1, d) at the first T positions: (B, T, 1, d)."""
        pos = self.positions[:, :T]
        return cos[pos], sin[pos]
