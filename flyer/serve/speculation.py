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
own block k) without writing it: shared blocks are never written. DeepSeek-V4 shares a prefix
through a snapshot of the slots at its end instead, which keeps that hidden state (the MTP slot
too: ``flyer.serve.paged_hybrid.BoundarySnapshots``; on disk, ``flyer.infer.prefix_cache_hybrid``'s
snapshot files, whose blocks hold no MTP entries), so nothing is recomputed there.

DeepSeek-V4 (attn "hybrid"): the MTP block's one window-only layer keeps a ring of its last W keys in a slot of
its own pool (``flyer.serve.paged_hybrid.make_mtp_hybrid_cache``) at the request's main slot id, position p at
p % W (no shift), and the MTP module reads and chains the residual streams (C, N, D). Rings keep no per-token
history, so rejected drafts are rolled back as ``flyer generate`` rolls them back (``flyer.infer.speculative``):
``draft`` copies the drafting rows' main slots (windows, compressor rings) before the verify pass, and
``roll_back`` gives a row that rejected a draft (before its last: the last one's writes are never read) its copy
back and re-feeds its kept tokens (pending and accepted drafts) in one more forward of those rows only; the MTP
slots are copied after the catch-up and put back after
chained drafts, whose scratch keys would overwrite ring slots still in the window. Compressed entries that
rejected tokens completed stay in the row's own blocks past its real tokens (a block holds only the request's
positions and is registered for sharing only once full of real ones), masked until the real token completing
the entry rewrites it.

``speculative_max_batch`` N: verifying k + 1 tokens a row costs more than the kept drafts win back once a step is
bound by compute rather than by reading the weights (a CPU; a GPU at a large batch), so a step with more than N
decoding rows drafts for none (``begin_step``, decided before the engine reserves the drafts' slots). Its rows
decode plainly and keep their main hidden states for the MTP entries (``h_prev``); a row holding a block's worth
writes them in one batched ``catch_up`` (``bound_pending``), so h_prev stays under a block and its blocks' MTP
entries, which their sharing waits for, lag its main ones by less than a block.

A row with a grammar (structured outputs, ``flyer.serve.grammar``) drafts under it: each draft position's MTP
logits are masked with its matcher's state after the drafts before it, which consumes each draft tentatively, and
a draft that completes the grammar is the row's last (nothing after it could be kept). Those bitmasks, and one
filled after the last draft, mask the verify pass's logits at the same positions (``Drafted``'s last item), so
greedy keeps exactly the tokens of plain masked greedy decoding and sampling accepts on the masked
distributions; ``accept`` rolls back the drafts the row rejected. A row whose grammar waits for the reasoning end
marker (``Request.deferred``) drafts freely, a draft completing the marker its last: that draft is verified as
any other (refusing it for its value would draft from q given "not the marker" while accepting by q's ratio, and
give the marker p(marker)^2 where plain sampling gives p(marker)), and once kept ``accept`` keeps no token after
it, so none was chosen unmasked (the grammar chooses the next one, on the next step).
A row whose output may still open reasoning itself (``flyer.serve.grammar.Matcher.opening``) drafts nothing: its
verify pass chooses the next token under the mask that allows the begin marker's.

The engine owns the requests, their blocks and the main-model pass; ``MtpSpeculator`` keeps a
request's MTP entries in step with its main cache, drafts, and accepts what the pass verified.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Protocol, Sequence

import torch

from flyer import kernels
from flyer.infer.decoder import Decoder, Group
from flyer.infer.hybrid_cache import HybridCache
from flyer.infer.generate import mtp_span
from flyer.infer.sampling import SamplingParams, probabilities
from flyer.infer.speculative import accept_drafts
from flyer.serve.grammar import GrammarMasks
from flyer.serve.graphs import StepGraphs
from flyer.serve.metrics import ServeMetrics
from flyer.serve.paged import PagedCache


def mtp_slots(i: int, n: int) -> slice:
    """The slots of block i of the engine's MTP cache (position p in slot p + 1) that hold the
    positions the on-disk prefix cache stores with block i (``mtp_span``): all of them, but slot 0
    of block 0 (position -1)."""
    lo, hi = mtp_span(i, n)
    return slice(lo + 1 - i * n, hi + 1 - i * n)


class Row(Protocol):
    """What speculation reads and writes of an engine request (``flyer.serve.request.Request``)."""

    tokens: list[int]  # prompt + generated
    n_cached: int  # leading tokens whose main cache entries are written
    mtp_len: int  # leading positions whose MTP cache entries are written
    h_prev: torch.Tensor | None  # main hidden states (C, D) of positions [mtp_len, n_cached)
    generator: torch.Generator | None
    slot: int | None  # its hybrid pools' slot (DeepSeek-V4)
    blocks: list[int]  # its block ids (MLA / GQA: the MTP cache's as the main cache's)
    opts: Any  # its ``SamplingOptions``: temperature, top_p, max_tokens
    matcher: Any  # its grammar's ``flyer.serve.grammar.Matcher``, or None
    deferred: Any  # that matcher while it waits for the reasoning end marker (``opts.grammar_after``), or None

    @property
    def generated(self) -> int: ...


# rows drafting k tokens each: (rows, draft distributions (k, V) per row, None for a greedy one;
# the drafts; the rows' sampling parameters; the tokens each row's grammar allows at its k + 1 verified
# positions (k + 1, V) bool, None for a row without a grammar)
Drafted = tuple[list[Row], list, list[list[int]], list[SamplingParams], list]


class MtpSpeculator:
    """Drafts for the engine's decoding rows from ``dec``'s MTP module over the paged ``cache``
    (position p in slot p + 1; DeepSeek-V4: the MTP pool of slots), and the verified ones accepted.
    ``tables(rows, n_slots)``: the rows' block tables (B, n) covering ``n_slots`` positions.
    ``main``: DeepSeek-V4's main pool (``HybridCache``), rolled back for rows that rejected drafts
    (``roll_back``); None otherwise. ``max_batch``: a step with more decoding rows drafts none (None: any
    number drafts). ``pending_limit``: the main hidden states a plain row holds before ``bound_pending`` writes
    their MTP entries (the engine's block size). ``drafted`` / ``accepted``: drafts proposed and kept so far,
    ``off_steps``: steps ``max_batch`` turned drafting off (also counted in ``metrics``). ``grammars``: the engine's
    ``GrammarMasks`` once a request with a grammar came (its rows draft under their grammars). ``graphs``: the MTP
    module's passes in fixed shapes (``flyer.serve.graphs``; None: eagerly)."""

    def __init__(self, dec: Decoder, cache: PagedCache | HybridCache, draft_tokens: int,
                 tables: Callable[[Sequence[Row], int], torch.Tensor], metrics: ServeMetrics, device: torch.device,
                 main: HybridCache | None = None, max_batch: int | None = None, pending_limit: int = 16,
                 graphs: StepGraphs | None = None):
        self.dec, self.cache, self.draft_tokens, self.graphs = dec, cache, draft_tokens, graphs
        self.tables, self.metrics, self.device = tables, metrics, device
        self.main = main
        self.max_batch, self.pending_limit = max_batch, pending_limit
        self.drafting = True  # this step's decision (``begin_step``)
        self.grammars: GrammarMasks | None = None
        self.drafted = self.accepted = self.off_steps = 0
        self._saved: tuple[dict[int, int], torch.Tensor, list[torch.Tensor]] | None = None  # V4: ``draft``'s copy

    def _address(self, rows: Sequence[Row], n_slots: int) -> None:
        """Point the MTP cache at ``rows``' storage: their block tables over ``n_slots`` positions, or
        (DeepSeek-V4) their slots, through a view the decoder's MTP forward uses."""
        if self.main is None:
            self.cache.tables = self.tables(rows, n_slots)
        else:
            slots = self._slots(rows)
            self.dec.mtp_cache = self.cache.view(slots.view(-1, 1), slots)

    def _slots(self, rows: Sequence[Row]) -> torch.Tensor:
        return torch.tensor([r.slot for r in rows], device=self.device)

    def begin_step(self, n_rows: int) -> None:
        """A step of ``n_rows`` decoding rows begins: it drafts (``n_drafts``) unless they outnumber
        ``max_batch``. Decided once a step, before the engine reserves the drafts' slots."""
        self.drafting = self.max_batch is None or n_rows <= self.max_batch
        if not self.drafting:
            self.off_steps += 1
            self.metrics.spec_off_steps.inc()

    def n_drafts(self, r: Row) -> int:
        """Drafts r verifies this step: none in a step over ``max_batch`` (``begin_step``), none before its first
        token (a prompt whose prefill chunks left one token decodes it; drafts there would draw its first token
        by acceptance, after the drafts' draws, where a prefill ending at the prompt's end samples it: a seeded
        request's text would hang on its chunks, so on the other requests and the cached prefixes) and none past
        the tokens it has left (its last step verifies its pending token alone)."""
        if r.generated == 0 or not self.drafting:
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
        h1 = self._catch_up_fixed(rows, c) if self.graphs is not None else None
        if h1 is not None:
            for r, ci in zip(rows, c):
                r.h_prev, r.mtp_len = r.h_prev[ci:], r.mtp_len + ci
            return h1
        C = max(c)
        h_in = torch.zeros(len(rows), C, *rows[0].h_prev.shape[1:], dtype=rows[0].h_prev.dtype, device=self.device)
        nxt = torch.zeros(len(rows), C, dtype=torch.long)
        for i, (r, ci) in enumerate(zip(rows, c)):
            h_in[i, :ci] = r.h_prev[:ci]
            nxt[i, :ci] = torch.tensor(r.tokens[r.mtp_len + 1:r.mtp_len + 1 + ci])
        start = torch.tensor([r.mtp_len for r in rows], device=self.device)
        self._address(rows, int(start.max()) + C + 1)
        h1 = self.dec.mtp_forward(h_in, nxt.to(self.device), start, shift=1, lengths=c)  # position p in slot p + 1
        for r, ci in zip(rows, c):
            r.h_prev, r.mtp_len = r.h_prev[ci:], r.mtp_len + ci
        return h1[torch.arange(len(rows)), torch.tensor([max(ci - 1, 0) for ci in c])]

    def _catch_up_fixed(self, rows: list[Row], c: list[int]) -> torch.Tensor | None:
        """``catch_up``'s pass in fixed shapes: a token row per entry, row i's ``c[i]`` positions from its mtp_len,
        each fed its next token and its main hidden state. (B, D) each row's last output (a row without entries:
        another's), or None where the pass runs eagerly (``StepGraphs.step``)."""
        token_rows = [(r.tokens[r.mtp_len + 1 + j], r.mtp_len + j, i, 0) for i, (r, ci) in enumerate(zip(rows, c))
                      for j in range(ci)]
        hidden = torch.cat([r.h_prev[:ci] for r, ci in zip(rows, c) if ci])
        h = self.graphs.step(token_rows, [r.blocks for r in rows], hidden)
        if h is None:
            return None
        last = torch.tensor([max(end - 1, 0) for end in itertools.accumulate(c)], device=self.device)
        return h[:, 0].index_select(0, last)

    def bound_pending(self, rows: Sequence[Row]) -> list[Row]:
        """After a step that decoded ``rows`` plainly (each with one pending token, its last hidden state in
        h_prev): those holding ``pending_limit`` hidden states write their MTP entries, one ``catch_up`` for
        all, up to the one their next draft starts from (kept). Returns them (their blocks' MTP entries
        advanced: shareable now). Every block rather than every step: the MTP pass's fixed cost is paid once a block
        (measured by hand: 16 rows of ``small`` / ``tiny-v4`` on one CPU thread, 4% / 1% over no catch-up
        against 19% / 18% every step)."""
        due = [r for r in rows if r.h_prev is not None and r.h_prev.shape[0] >= self.pending_limit]
        if due:
            self.catch_up(due, hold_decode_entry=True)
        return due

    def draft(self, rows: Sequence[Row], ks: Sequence[int]) -> list[Drafted]:
        """Up to ``ks[i]`` MTP drafts for row i (``n_drafts``; ``flyer.infer.speculative``), the rows grouped
        by their number of drafts (``Drafted``), fewest first. A row with a grammar drafts under it (the module
        docstring), fewer when a draft completes it."""
        rows, ks, grammars = list(rows), list(ks), self.grammars
        params = [r.opts.params for r in rows]
        q = [[] for _ in rows]
        drafts = [[] for _ in rows]
        allowed = [[] for _ in rows]  # grammar rows: (V,) bool at each position drafted from
        h1 = self.catch_up(rows)  # (B, D) at position n - 1, which predicts t_{n+1}: every row has it to write
        slots = self._slots(rows) if self.main is not None else None
        # V4: the MTP rings now hold exactly the positions before n; chained drafts write past them (put back below)
        mtp_saved = self.cache.copy_slots(slots) if slots is not None and max(ks) > 1 else None
        live = list(range(len(rows)))  # the rows still drafting, and h1 for them
        for k in range(max(ks)):
            q_logits = self.dec.mtp_logits(h1)
            ruled = [j for j, i in enumerate(live) if rows[i].matcher is not None]
            if ruled:  # one fill per grammar row and position, kept for the verify pass's logits there
                masks = grammars.allowed([rows[live[j]].matcher for j in ruled])
                grammars.mask(q_logits, [], [(j, masks[n:n + 1]) for n, j in enumerate(ruled)])
                for n, j in enumerate(ruled):
                    allowed[live[j]].append(masks[n])
            argmax = kernels.argmax(q_logits).tolist()  # one for the batch, not one per row
            for j, i in enumerate(live):
                m = rows[i].matcher
                q_j = None if params[i].greedy else probabilities(q_logits[j:j + 1], params[i])
                d = argmax[j] if q_j is None else int(torch.multinomial(q_j[0], 1, generator=rows[i].generator))
                if m is not None and not grammars.hold(m, d):
                    ks[i] = k  # refused (its grammar allows none of the model's ids): the drafts end before it
                    continue
                drafts[i].append(d)
                if q_j is not None:
                    q[i].append(q_j)
                if m is not None and m.llg.is_stopped():
                    ks[i] = k + 1  # complete: nothing after this draft could be kept
                elif rows[i].deferred is not None and grammars.ends_reasoning(rows[i], drafts[i]):
                    ks[i] = k + 1  # the reasoning end marker: verified as any draft, ``accept`` keeps nothing after it
            more = [j for j, i in enumerate(live) if ks[i] > k + 1]
            if not more:
                break
            # the module on its own output and its draft, at position n + k (slot n + k + 1): a scratch
            # entry, overwritten by the next step's catch-up with the main model's state
            live = [live[j] for j in more]
            sub = [rows[i] for i in live]
            h = None if self.graphs is None else self.graphs.step(
                [(drafts[i][-1], r.n_cached + k, j, 0) for j, (i, r) in enumerate(zip(live, sub))],
                [r.blocks for r in sub], h1[more], from_main=False)
            if h is not None:  # (read by the next draft's logits and pass, before the static output changes)
                h1 = h[:, 0]
            else:
                start = torch.tensor([r.n_cached + k for r in sub], device=self.device)
                self._address(sub, int(start.max()) + 2)
                d = torch.tensor([drafts[i][-1] for i in live], device=self.device).view(-1, 1)
                h1 = self.dec.mtp_forward(h1[more].unsqueeze(1), d, start, from_main=False, shift=1)[:, 0]
        if mtp_saved is not None:
            self.cache.restore_slots(mtp_saved, slots)
        if slots is not None:  # V4: the main slots before the verify pass writes the drafts into their rings
            self._saved = ({r.slot: i for i, r in enumerate(rows)}, slots, self.main.copy_slots(slots))
        last = [i for i, r in enumerate(rows) if r.matcher is not None and len(allowed[i]) == len(drafts[i])]
        if last:  # the position after each grammar row's last draft (a refused one's was filled already)
            for i, a in zip(last, grammars.allowed([rows[i].matcher for i in last])):
                allowed[i].append(a)
        groups = []
        for n in sorted({len(d) for d in drafts}):
            idx = [i for i, d in enumerate(drafts) if len(d) == n]
            groups.append(([rows[i] for i in idx], [torch.cat(q[i]) if q[i] else None for i in idx],
                           [drafts[i] for i in idx], [params[i] for i in idx],
                           [torch.stack(allowed[i]) if allowed[i] else None for i in idx]))
        return groups

    def accept(self, r: Row, hv_KD: torch.Tensor, logits_KV: torch.Tensor, q: torch.Tensor | None,
               drafts: list[int], p: SamplingParams) -> list[int]:
        """r's accepted tokens of [pending, *drafts] (``accept_drafts``: greedy keeps exactly plain
        greedy decoding's tokens), counted; r's cache then holds them and ``h_prev`` their hidden
        states. hv (k + 1, D) and logits (k + 1, V): the main model's at r's verified positions;
        q: the drafts' distributions (k, V), None for a greedy row."""
        target = logits_KV if p.greedy else probabilities(logits_KV, p)
        new = accept_drafts(target, q, drafts, p, r.generator)
        accepted = len(new) - 1
        if r.matcher is not None:  # it holds the drafts (``draft``): those rejected rolled back
            GrammarMasks.settle(r.matcher, accepted)
        elif accepted == len(drafts) > 0 and r.deferred is not None and self.grammars.ends_reasoning(r, drafts):
            new = new[:-1]  # the reasoning end marker kept: the token after it is its grammar's, chosen next step
        self.drafted += len(drafts)
        self.accepted += accepted
        self.metrics.draft_tokens.inc(len(drafts))
        self.metrics.accepted_tokens.inc(accepted)
        r.h_prev = hv_KD[:len(new)]  # positions n .. n + len(new) - 1
        r.n_cached += len(new)
        return new

    def roll_back(self, rows: Sequence[Row], kept: Sequence[int], drafts: Sequence[Sequence[int]]) -> None:
        """DeepSeek-V4, after ``accept`` (``kept[i]``: row i's tokens the verify pass wrote and it keeps, the
        pending one and its accepted drafts; n_cached advanced past them): a row that rejected a draft before its
        last gets its main slot as ``draft`` copied it and is fed its kept tokens again from where they start, so
        its windows and rings end as plain decoding leaves them (the hidden states stay the verify pass's). A row
        that rejected its last draft only (all of K = 1's rejections) needs none: that draft's position n is
        where the row's next token goes, and what it left in the rings is read by no later query (ring slot
        n % W holds "position n - W", outside every window from n on; compressor slot n % S a position before
        every window an entry from n on pools) and overwritten there."""
        back = [i for i, (m, d) in enumerate(zip(kept, drafts)) if m < len(d)]
        if self.main is None or not back:
            return
        index, slots, saved = self._saved
        self.main.restore_slots(saved, slots, torch.tensor([index[rows[i].slot] for i in back], device=self.device))
        sub = [rows[i] for i in back]
        lengths = [kept[i] for i in back]
        T = max(lengths)
        tokens = torch.tensor([([r.tokens[-1], *drafts[i]] + [0] * T)[:T] for r, i in zip(sub, back)],
                              device=self.device)
        start = torch.tensor([r.n_cached - m for r, m in zip(sub, lengths)], device=self.device)
        view = self.main.view(self.tables(sub, int(start.max()) + T), self._slots(sub))
        self.dec.forward_groups([Group(tokens, start, None if min(lengths) == T else lengths, view)])
