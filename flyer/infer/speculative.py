"""MTP speculative decoding (DeepSeek-V3 report, section 5.4.3).

Each step, for every row whose cache holds positions [0, n) and whose next token t_n (the
"pending" token) is already chosen:

1. draft: MTP module 1 catches up on the positions it has not seen (h_j of the main model with
   token t_{j+1}), and its output at position n-1 predicts d_1 ~ t_{n+1}. For more than one draft
   the module is reapplied to its own output with the drafted token (d_2, d_3, ...).
2. verify: one main-model forward over [t_n, d_1, ..., d_K] at positions n..n+K gives the target
   distribution at every drafted position.
3. accept: greedy keeps the longest prefix of drafts equal to the target argmax, then appends
   the target's own token, so the output is exactly plain greedy decoding. With sampling, draft
   d_i is kept with probability min(1, p(d_i) / q(d_i)) and the first rejection is replaced by a
   sample from max(p - q, 0) (Leviathan et al. 2023), which leaves the output distribution that
   of the main model.

Rejected drafts are rolled back by position alone: their cache slots lie beyond the new length
and are overwritten later (``flyer.infer.cache``).

DeepSeek-V4 (attn "hybrid") keeps no per-token slots: a row's window ring holds the last W keys at p % W and
its compressors' rings the unfinished windows (``flyer.infer.hybrid_cache``), so a rejected draft's write
overwrites a key the row still needs. Rollback there is by snapshot and re-feed: before the verify pass the
main cache's fixed state (windows, rings) is copied (``HybridCache.copy_slots``); a row that keeps j < K of its
drafts gets its copy back and is fed its accepted tokens t_n, d_1 .. d_j again (one more forward of j + 1
tokens, for those rows only). A row whose only rejected draft is its last (every rejection with one draft a
step) needs neither: what that draft wrote at position n + K is read by no later query (ring slot (n + K) % W
holds "position n + K - W", outside every window from n + K on; an entry it completed lies past the row's real
tokens) and the next token, at n + K, overwrites it. Chosen over deferring the ring writes of a multi-token
call: it reuses the decode path unchanged (the re-feed is an ordinary forward, so the cache ends exactly as
plain decoding leaves it), costs a copy of the fixed state a step and a short forward only on rejection, and
touches no attention code. The entries (compressed) need no copy: one completed by a rejected token lies at an
index the row's real tokens have not completed, masked until the real token completing it rewrites it. The MTP
block's window (its own one-layer cache) is copied after the catch-up, when it holds exactly the positions
before the pending token, and put back after chained drafts (K > 1) wrote past them. V4's drafter reads and
chains the residual streams (B, T, N, D), not the collapsed hidden states.
"""

from __future__ import annotations

from typing import Collection, Sequence

import torch

from flyer import kernels
from flyer.errors import FieldError
from flyer.infer.decoder import Decoder, Group, PrefillState, finished, gather_rows, shrink_batch
from flyer.infer.sampling import SamplingParams, draw_rows, probabilities


def check_speculation(speculative: str | None, draft_tokens: int) -> None:
    """``FieldError`` for a speculation setting flyer cannot run: ``speculative`` other than None / "mtp", or
    ``draft_tokens`` below 1, or above 1 without speculation (``flyer generate``'s and ``flyer serve``'s flags)."""
    if draft_tokens < 1:
        raise FieldError("draft_tokens", f"must be >= 1 (got {draft_tokens})")
    if speculative not in (None, "mtp"):
        raise FieldError("speculative", f"must be None or 'mtp' (got {speculative!r})")
    if draft_tokens > 1 and speculative is None:
        raise FieldError("draft_tokens", f"{draft_tokens} drafts need speculative decoding (--speculative mtp)")


def accept_drafts(p_KV1: torch.Tensor, q_KV: torch.Tensor | None, drafts: list[int], params: SamplingParams,
            generator: torch.Generator | None) -> list[int]:
    """Accepted drafts plus one token from the target. p: (K+1, V) target probabilities (greedy:
    any scores, only their argmax is used), q: (K, V) draft probabilities (unused when greedy),
    drafts: K token ids."""
    if params.greedy:
        g = kernels.argmax(p_KV1).tolist()
        a = 0
        while a < len(drafts) and drafts[a] == g[a]:
            a += 1
        return drafts[:a] + [g[a]]
    out = []
    for i, d in enumerate(drafts):
        u = torch.rand((), generator=generator, device=p_KV1.device)
        if u * q_KV[i, d] <= p_KV1[i, d]:  # accept with probability min(1, p/q)
            out.append(d)
            continue
        residual = (p_KV1[i] - q_KV[i]).clamp_min(0)
        residual = residual / residual.sum() if residual.sum() > 0 else p_KV1[i]
        return out + [int(torch.multinomial(residual, 1, generator=generator))]
    return out + [int(torch.multinomial(p_KV1[len(drafts)], 1, generator=generator))]


@torch.inference_mode()
def mtp_decode(dec: Decoder, prompts: Sequence[Sequence[int]], first: torch.Tensor, state: PrefillState,
               params: SamplingParams, max_new: int, stop_ids: Collection[int], n_draft: int = 1,
               generators: Sequence[torch.Generator] | None = None, adjust=None) -> tuple[list[list[int]], int, int]:
    """Decode after ``prefill`` (which filled the MTP cache up to len - 1). ``first``: (B,) the
    token chosen from the prefill logits; ``state``: the prefill's hidden states. Rows advance
    independently (per-row positions); a row ends at any of ``stop_ids`` (kept) and leaves the batch. ``adjust``:
    ``GenerationConfig.adjust`` or None, on the target's logits (the drafts' stay as they are: any
    draft distribution keeps speculative sampling exact). Returns (new tokens per row, drafts
    proposed, accepted). A row drafts min(``n_draft``, tokens it has left to make - 1) a step, as
    flyer serve does (more are never kept), alone or in a batch; a batch drafts the most any row
    does, the others' extra drafts being padding kept inside their own rows' caches, so no write
    passes a row's last new token: the caches need prompt + ``max_new`` positions (``cache_length``).

    Invariant at the top of each step, per row: the main cache holds [0, n), the MTP cache
    [0, mtp_len) with mtp_len < n, and ``h_prev`` holds the main hidden states of [mtp_len, n).
    """
    device = first.device
    hybrid = dec.cfg.attn == "hybrid"
    K = n_draft
    seq = [list(p) + [int(t)] for p, t in zip(prompts, first)]  # seq[b][j] = t_j; last = pending
    out = [[int(t)] for t in first]
    live = [b for b, o in enumerate(out) if not finished(o, max_new, stop_ids)[1]]  # batch rows still decoding
    n = dec.cache.lengths.clone()  # main cache valid length (position of the pending token)
    mtp_len = dec.mtp_cache.lengths.clone()  # MTP cache valid length
    h_prev, h_start = state.hidden, state.start.clone()  # main hidden states at h_start + t
    n, mtp_len, h_prev, h_start = shrink_batch(dec, live, range(len(out)), n, mtp_len, h_prev, h_start)
    drafted = accepted = 0
    arangeK = torch.arange(min(K, max_new) + 1, device=device)  # a step's catch-up: at most Ks + 1 <= this
    while live:
        B = len(live)
        k_B = [min(K, max_new - len(out[b]) - 1) for b in live]  # drafts each row can still keep
        Ks = max(k_B)
        # a row past its own drafts re-drafts at one slot past them: beyond its tokens, inside the cache
        last_B = (torch.tensor(k_B, device=device) - 1).clamp_min(0)
        # 1. MTP catch-up over positions [mtp_len, n): inputs h_j and t_{j+1}
        c = (n - mtp_len).clamp_min(1)
        C = int(c.max())
        idx = (mtp_len.view(-1, 1) + arangeK[:C] - h_start.view(-1, 1)).clamp(0, h_prev.shape[1] - 1)
        h_in = h_prev[torch.arange(B, device=device).view(-1, 1), idx]  # (B, C, D) or V4's streams (B, C, N, D)
        nxt = torch.zeros(B, C, dtype=torch.long, device=device)
        for i, b in enumerate(live):
            m, ci = int(mtp_len[i]), int(c[i])
            nxt[i, :ci] = torch.tensor(seq[b][m + 1:m + 1 + ci], device=device)
        # (B, D) at position n-1; a row's padding past its c positions stays inside the cache
        h1 = gather_rows(dec.mtp_forward(h_in, nxt, mtp_len, lengths=c.tolist()), c - 1)
        # V4: the MTP window now holds [0, n) exactly; chained drafts write past it (put back below)
        every = torch.arange(B, device=device)  # V4: the rows, the slots of generate's caches
        mtp_snap = dec.mtp_cache.copy_slots(every) if hybrid and Ks > 1 else None
        drafts, q = [], []
        for k in range(Ks):
            q_logits = dec.mtp_logits(h1)
            if params.greedy:  # no distributions needed: drafts and targets are argmaxes
                d = kernels.argmax(q_logits)
            else:
                q.append(probabilities(q_logits, params))
                if generators is None or k < min(k_B):
                    d = draw_rows(q[-1], generators, live)
                else:  # a row past its own drafts (padding, never kept) draws nothing from its generator: its
                    d = kernels.argmax(q_logits)  # stream is the one it has alone
                    keep = [i for i in range(B) if k < k_B[i]]
                    if keep:
                        d[keep] = draw_rows(q[-1][keep], generators, [live[i] for i in keep])
            drafts.append(d)
            if k + 1 < Ks:  # reapply the module on its own output and the drafted token
                h1 = dec.mtp_forward(h1.unsqueeze(1), d.view(B, 1), n + last_B.clamp(max=k), from_main=False)[:, 0]
        if mtp_snap is not None:
            dec.mtp_cache.restore_slots(mtp_snap, every)
        # 2. verify every draft in one main-model pass
        # V4: the rings before the drafts' writes (with one draft a step, no rejection needs them: see the doc)
        snap = dec.cache.copy_slots(every) if hybrid and Ks > 1 else None
        pending = torch.tensor([seq[b][-1] for b in live], device=device)
        tokens = torch.cat([pending.view(B, 1), *(d.view(B, 1) for d in drafts)], 1)  # (B, Ks+1)
        hv = dec.forward(tokens, n, [k + 1 for k in k_B])  # a row's padding goes past its tokens
        logits = dec.logits(hv)  # (B, Ks+1, V)
        drafts_BK = tokens[:, 1:].tolist()
        if adjust is not None:  # the target row after drafts d[:j] counts them as generated, as flyer serve does
            for i, b in enumerate(live):
                for j in range(k_B[i] + 1):
                    adjust(logits[i, j], out[b] + drafts_BK[i][:j])
        if params.greedy:
            p, q_BKV = logits, [None] * B
        else:
            p = probabilities(logits.flatten(0, 1), params).view(B, Ks + 1, -1)
            q_BKV = torch.stack(q, 1) if q else [None] * B
        # 3. accept; a row that finishes leaves the batch
        n_old = n.clone()
        still, refeed = [], []  # refeed: (batch index, tokens kept in the cache) of V4 rows that rejected a draft
        for i, b in enumerate(live):
            k = k_B[i]
            new = accept_drafts(p[i, :k + 1], None if q_BKV[i] is None else q_BKV[i][:k], drafts_BK[i][:k], params,
                                None if generators is None else generators[b])
            drafted += k
            accepted += len(new) - 1
            n[i] += len(new)
            mtp_len[i] = n_old[i]
            seq[b] += new
            out[b], done = finished(out[b] + new, max_new, stop_ids)
            if not done:
                still.append(b)
                if snap is not None and len(new) < k:  # a draft before the last rejected
                    refeed.append((i, len(new)))
        if refeed:
            _refeed(dec, snap, refeed, tokens, n_old)
        n, mtp_len, h_prev, h_start = shrink_batch(dec, still, live, n, mtp_len, hv, n_old)
        live = still
    return out, drafted, accepted


def _refeed(dec: Decoder, snap: list[torch.Tensor], refeed: list[tuple[int, int]], tokens_BT: torch.Tensor,
            start_B: torch.Tensor) -> None:
    """DeepSeek-V4's rollback: the rows ``refeed`` names (batch index i, kept m) get the fixed state of
    ``snap`` (taken before the verify pass) back and are fed their first m verified tokens ``tokens_BT[i, :m]``
    (the pending token and the accepted drafts) at ``start_B[i]`` again, through a view of just those rows."""
    rows = torch.tensor([i for i, _ in refeed], dtype=torch.long, device=tokens_BT.device)
    kept = [m for _, m in refeed]
    dec.cache.restore_slots(snap, torch.arange(len(snap[0]), device=rows.device), rows)
    view = dec.cache.view(rows.view(-1, 1), rows)  # row b's entries in "block" b: the contiguous cache's own row
    dec.forward_groups([Group(tokens_BT.index_select(0, rows)[:, :max(kept)], start_B.index_select(0, rows), kept,
                              view)])
