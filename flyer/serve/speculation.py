"""MTP speculative decoding in the serving engine (``EngineConfig(speculative="mtp")``).

The MTP module has a paged one-layer cache on the same block tables as the main model's; each
decode step first writes the MTP entries a request can (its main hidden states with the next
tokens), drafts a token from the last, reapplies the module to its own output and that draft for
each further one (``draft_tokens``, as ``flyer generate`` does: those entries are scratch,
overwritten by the next step's), and the engine verifies [pending, drafts] in one main-model pass
(``flyer.infer.speculative.accept_drafts``: greedy keeps plain greedy's tokens). A request drafts
no more tokens than it has left to produce, so its writes stay within its prompt + max_tokens. The
MTP entry of position p needs token p + 1, so the MTP cache keeps it in slot p + 1: block i then
holds the entries of positions [i n - 1, (i + 1) n - 1), all set by the tokens block i's chain
key covers, and is shared with the main cache's block i (the on-disk prefix cache stores the
same span with each block: ``mtp_slots``). A request that takes k shared blocks recomputes
position k n - 1 (its main hidden state feeds the MTP entry of that position, in the request's
own block k) without writing it: shared blocks are never written.

The engine owns the requests, their blocks and the main-model pass; ``MtpSpeculator`` keeps a
request's MTP entries in step with its main cache, drafts, and accepts what the pass verified.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import torch

from flyer import kernels
from flyer.infer.decoder import Decoder
from flyer.infer.generate import mtp_span
from flyer.infer.sampling import SamplingParams, probabilities
from flyer.infer.speculative import accept_drafts
from flyer.serve.metrics import ServeMetrics
from flyer.serve.paged import PagedCache


def mtp_slots(i: int, n: int) -> slice:
    """The slots of block i of the engine's MTP cache (position p in slot p + 1) that hold the
    positions the on-disk prefix cache stores with block i (``mtp_span``): all of them, but slot 0
    of block 0 (position -1)."""
    lo, hi = mtp_span(i, n)
    return slice(lo + 1 - i * n, hi + 1 - i * n)


class Row(Protocol):
    """What speculation reads and writes of an engine request (``flyer.serve.engine.Request``)."""

    tokens: list[int]  # prompt + generated
    n_cached: int  # leading tokens whose main cache entries are written
    mtp_len: int  # leading positions whose MTP cache entries are written
    h_prev: torch.Tensor | None  # main hidden states (C, D) of positions [mtp_len, n_cached)
    generator: torch.Generator | None
    opts: Any  # its ``SamplingOptions``: temperature, top_p, max_tokens

    @property
    def generated(self) -> int: ...


# rows drafting k tokens each: (rows, draft distributions (k, V) per row, None for a greedy one;
# the drafts; the rows' sampling parameters)
Drafted = tuple[list[Row], list, list[list[int]], list[SamplingParams]]


class MtpSpeculator:
    """Drafts for the engine's decoding rows from ``dec``'s MTP module over the paged ``cache``
    (position p in slot p + 1), and the verified ones accepted. ``tables(rows, n_slots)``: the
    rows' block tables (B, n) covering ``n_slots`` positions. ``drafted`` / ``accepted``: drafts
    proposed and kept so far (also counted in ``metrics``)."""

    def __init__(self, dec: Decoder, cache: PagedCache, draft_tokens: int,
                 tables: Callable[[Sequence[Row], int], torch.Tensor], metrics: ServeMetrics, device: torch.device):
        self.dec, self.cache, self.draft_tokens = dec, cache, draft_tokens
        self.tables, self.metrics, self.device = tables, metrics, device
        self.drafted = self.accepted = 0

    def n_drafts(self, r: Row) -> int:
        """Drafts r verifies this step: none before its first hidden state (a one-token prompt) and
        none past the tokens it has left (its last step verifies its pending token alone)."""
        if r.n_cached == 0:
            return 0
        return min(self.draft_tokens, r.opts.max_tokens - r.generated - 1)

    def after_prefill(self, rows: Sequence[Row], lens: Sequence[int], h_BTD: torch.Tensor) -> None:
        """Prefilled chunks (``lens[i]`` tokens of row i from n_cached, main hidden states h (B, T, D),
        n_cached not advanced yet): keep their hidden states and write the MTP entries they allow."""
        for i, (r, n) in enumerate(zip(rows, lens)):
            r.h_prev = h_BTD[i, :n] if r.h_prev is None else torch.cat([r.h_prev, h_BTD[i, :n]])
            r.n_cached += n
        self.catch_up(list(rows), hold_decode_entry=True)
        for r, n in zip(rows, lens):
            r.n_cached -= n

    def catch_up(self, rows: list[Row], hold_decode_entry: bool = False) -> torch.Tensor | None:
        """Write the MTP cache entries each row can: positions [mtp_len, min(n_cached, len - 1))
        from the main hidden states and the next tokens. Returns (B, D) the MTP output at each
        row's last such position (None when no row has any). ``hold_decode_entry`` (prefill): a
        row left with one pending token decodes next, and its decode step drafts from the entry
        at n_cached - 1, so that one is left for it."""
        c = [max(min(r.n_cached, len(r.tokens) - 1) - r.mtp_len
                 - int(hold_decode_entry and len(r.tokens) - r.n_cached == 1), 0) for r in rows]
        if max(c) == 0:
            return None
        C, D = max(c), self.dec.cfg.dim
        h_in = torch.zeros(len(rows), C, D, dtype=rows[0].h_prev.dtype, device=self.device)
        nxt = torch.zeros(len(rows), C, dtype=torch.long)
        for i, (r, ci) in enumerate(zip(rows, c)):
            h_in[i, :ci] = r.h_prev[:ci]
            nxt[i, :ci] = torch.tensor(r.tokens[r.mtp_len + 1:r.mtp_len + 1 + ci])
        start = torch.tensor([r.mtp_len for r in rows], device=self.device)
        self.cache.tables = self.tables(rows, int(start.max()) + C + 1)
        h1 = self.dec.mtp_forward(h_in, nxt.to(self.device), start, shift=1, lengths=c)  # position p in slot p + 1
        for r, ci in zip(rows, c):
            r.h_prev, r.mtp_len = r.h_prev[ci:], r.mtp_len + ci
        return h1[torch.arange(len(rows)), torch.tensor([max(ci - 1, 0) for ci in c])]

    def draft(self, rows: Sequence[Row], ks: Sequence[int]) -> list[Drafted]:
        """``ks[i]`` MTP drafts for row i (``n_drafts``; ``flyer.infer.speculative``), the rows grouped
        by their number of drafts (``Drafted``), fewest first."""
        rows = list(rows)
        params = [SamplingParams(r.opts.temperature, r.opts.top_p) for r in rows]
        q = [[] for _ in rows]
        drafts = [[] for _ in rows]
        h1 = self.catch_up(rows)  # (B, D) at position n - 1, which predicts t_{n+1}: every row has it to write
        live = list(range(len(rows)))  # the rows still drafting, and h1 for them
        for k in range(max(ks)):
            q_logits = self.dec.mtp_logits(h1)
            argmax = kernels.argmax(q_logits).tolist()  # one for the batch, not one per row
            for j, i in enumerate(live):
                if params[i].greedy:
                    drafts[i].append(argmax[j])
                else:
                    q[i].append(probabilities(q_logits[j:j + 1], params[i]))
                    drafts[i].append(int(torch.multinomial(q[i][-1][0], 1, generator=rows[i].generator)))
            more = [j for j, i in enumerate(live) if ks[i] > k + 1]
            if not more:
                break
            # the module on its own output and its draft, at position n + k (slot n + k + 1): a scratch
            # entry, overwritten by the next step's catch-up with the main model's state
            live = [live[j] for j in more]
            sub = [rows[i] for i in live]
            start = torch.tensor([r.n_cached + k for r in sub], device=self.device)
            self.cache.tables = self.tables(sub, int(start.max()) + 2)
            d = torch.tensor([drafts[i][-1] for i in live], device=self.device).view(-1, 1)
            h1 = self.dec.mtp_forward(h1[more].unsqueeze(1), d, start, from_main=False, shift=1)[:, 0]
        groups = []
        for n in sorted(set(ks)):
            idx = [i for i, k in enumerate(ks) if k == n]
            groups.append(([rows[i] for i in idx], [None if params[i].greedy else torch.cat(q[i]) for i in idx],
                           [drafts[i] for i in idx], [params[i] for i in idx]))
        return groups

    def accept(self, r: Row, hv_KD: torch.Tensor, logits_KV: torch.Tensor, q: torch.Tensor | None,
               drafts: list[int], p: SamplingParams) -> list[int]:
        """r's accepted tokens of [pending, *drafts] (``accept_drafts``: greedy keeps exactly plain
        greedy decoding's tokens), counted; r's cache then holds them and ``h_prev`` their hidden
        states. hv (k + 1, D) and logits (k + 1, V): the main model's at r's verified positions;
        q: the drafts' distributions (k, V), None for a greedy row."""
        target = logits_KV if p.greedy else probabilities(logits_KV, p)
        new = accept_drafts(target, q, drafts, p, r.generator)
        self.drafted += len(drafts)
        self.accepted += len(new) - 1
        self.metrics.draft_tokens.inc(len(drafts))
        self.metrics.accepted_tokens.inc(len(new) - 1)
        r.h_prev = hv_KD[:len(new)]  # positions n .. n + len(new) - 1
        r.n_cached += len(new)
        return new
