"""DeepSeek-V4's CSA attending to its indexer's picks gathered (``flyer.model.hybrid_chunks.Gathered``) against
the masked form (every visible entry scored, the unselected masked: the oracle), in chunks past ``GATHER_OVER`` x
index_topk entries and in the decode cache (``flyer.infer.hybrid_cache``): the same outputs and gradients (of q,
the tokens' keys, the entries, the sinks) within a derived FP32 rounding bound, for T well past index_topk,
several chunk sizes, two batch rows, queries seeing fewer than k entries (empty slots); gathering the wrong
entries (one off) or letting empty slots count lands far outside it. Tiny CSA layer of
tests/test_hybrid_attention.py (4 heads of 32, window 8, ratio 4, index_topk 4), FP32, CPU."""

import math

import pytest
import torch

import flyer.infer.hybrid_cache as hybrid_cache
import flyer.model.hybrid as hybrid
import flyer.model.hybrid_chunks as hybrid_chunks
from flyer.infer.hybrid_cache import HybridCache, hybrid_attention, hybrid_rows, hybrid_tables
from flyer.model.attention import select_topk
from flyer.model.hybrid_chunks import (GATHER_OVER, GATHERED_COPIES, LIVE_SCORE_COPIES, Gathered, chunked_attention,
                                       entry_picks, gather_entries, gathers, query_chunk, span_visible, spans)
from tests.bounds import FP32_U
from tests.test_hybrid_attention import CFG, CSA, LAYER, TOPK, WINDOW, _input, _pair, _tables, rel
from tests.test_hybrid_attention_chunked import chunk_tolerance

T = 254  # 63 entries, 15 x index_topk: chunks past GATHER_OVER x index_topk = 16 entries gather
CHUNKS = [5, 16, 37, 100]  # 100: the first chunk gathers and holds queries seeing 0 .. 3 < k entries


def _outputs(mine, T: int, chunk: int, gather: bool, grad: bool):
    """(output, the input's gradient, {parameter: gradient}) of the CSA layer on the test input (2 rows); the
    gradients of sum(output * w) for a fixed random w (None without ``grad``)."""
    x = _input(T).requires_grad_(grad)
    for p in mine.parameters():
        p.grad = None
    with torch.set_grad_enabled(grad):
        out = mine(x, *_tables(LAYER["csa"], T), chunk=chunk, gather=gather)
    if not grad:
        return out, None, None
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in mine.named_parameters() if p.grad is not None}


@pytest.fixture
def gathered_picks(monkeypatch):
    """The picks every gathering call is given (a list, filled as the layer runs)."""
    seen = []

    def spy(entries, picks):
        seen.append(picks)
        return gather_entries(entries, picks)

    monkeypatch.setattr(hybrid_chunks, "gather_entries", spy)
    return seen


def test_gathered_forward_equals_masked(gathered_picks):
    """Without gradient (the chunk loop), every chunk size gives the masked output within ``chunk_tolerance``
    (the two differ only inside attention: the same queries, keys and entries, bit for bit, the same picks, FP32
    sums of another order); the chunks past 16 entries did gather, the first chunk of 100 with empty slots
    (queries 0 .. 15 see fewer than 4 entries, 0 .. 3 none) and no row's picks repeated."""
    _, mine = _pair(LAYER["csa"])
    tol = chunk_tolerance(mine, T)
    for chunk in CHUNKS:
        gathered_picks.clear()
        want, _, _ = _outputs(mine, T, chunk, gather=False, grad=False)
        assert not gathered_picks
        got, _, _ = _outputs(mine, T, chunk, gather=True, grad=False)
        err = rel(got, want)
        assert err <= tol, f"chunk {chunk}: {err:.3g} > {tol:.3g}"
        plan = spans(T, chunk, WINDOW, CSA)
        assert len(gathered_picks) == sum(gathers(s.n_entries, TOPK) for s in plan) > 0
        for p in gathered_picks:
            valid = p.sort(-1).values
            assert p.shape[-1] == TOPK and not ((valid[..., 1:] == valid[..., :-1]) & (valid[..., 1:] >= 0)).any()
    first = gathered_picks[0]  # chunk 100's first: queries 0 .. 99
    assert ((first >= 0).sum(-1)[:, :16] == (torch.arange(16) + 1) // CSA).all()
    assert ((first >= 0).sum(-1)[:, 16:] == TOPK).all()


def test_one_chunk_and_short_layers_keep_the_masked_path(gathered_picks):
    """One chunk (the eager whole-sequence computation, the oracle) and a sequence up to 16 entries never gather;
    the chunked path without gathering is the masked oracle, bit for bit (gather=False changes nothing there)."""
    _, mine = _pair(LAYER["csa"])
    eager, _, _ = _outputs(mine, T, T, gather=True, grad=False)
    assert torch.equal(eager, _outputs(mine, T, T, gather=False, grad=False)[0])
    assert torch.equal(_outputs(mine, 66, 7, gather=True, grad=False)[0],
                       _outputs(mine, 66, 7, gather=False, grad=False)[0])
    assert not gathered_picks


def test_gathered_gradients_equal_masked():
    """Under autograd (``_Recompute``: recomputed chunks, gathered in backward too): the output, the input's
    gradient and every trained parameter's (the queries' and keys' projections, the compressor's, the sinks)
    within ``chunk_tolerance`` plus the 2 T u of the weight gradients' sums over the tokens, as
    tests/test_hybrid_attention_chunked.py bounds chunked against eager; the indexer gets none."""
    _, mine = _pair(LAYER["csa"])
    tol = chunk_tolerance(mine, T) + 2 * T * FP32_U
    for chunk in (16, 37, 100):
        want, gx_want, gp_want = _outputs(mine, T, chunk, gather=False, grad=True)
        got, gx, gp = _outputs(mine, T, chunk, gather=True, grad=True)
        assert rel(got, want) <= chunk_tolerance(mine, T)
        assert rel(gx, gx_want) <= tol, f"chunk {chunk}: input gradient"
        assert gp.keys() == gp_want.keys() and {"attn_sink", "compressor.wkv.weight", "wkv.weight"} <= gp.keys()
        assert not any(name.startswith("indexer.") for name in gp)
        for name, g in gp.items():
            err = rel(g, gp_want[name])
            assert err <= tol, f"chunk {chunk}, {name}: {err:.3g} > {tol:.3g}"


def _core(mine, T: int, chunk: int, gather: bool, picks_of=entry_picks, seed: int = 3):
    """``chunked_attention`` on leaf q (2, T, H, d), the tokens' keys (2, T, 1, d) and entries (2, T // 4, d), each
    row of unit RMS, with a random top-k selection of the complete entries: (output, gradients of q, the keys,
    the entries and the sinks of sum(output * w)). ``gather``: the chunks past 16 entries gathered (the picks by
    ``picks_of``), else masked."""
    g = torch.Generator().manual_seed(seed)
    B, H, d, N = 2, CFG.n_heads, CFG.head_dim, T // CSA

    def unit(*shape):
        x = torch.randn(*shape, generator=g)
        return (x * torch.rsqrt(x.square().mean(-1, keepdim=True))).requires_grad_(True)

    q, kv, entries = unit(B, T, H, d), unit(B, T, 1, d), unit(B, N, d)
    complete = torch.arange(N).view(1, -1) < ((torch.arange(T) + 1) // CSA).view(-1, 1)
    selected = select_topk(torch.randn(B, T, N, generator=g), complete.expand(B, T, N), TOPK)
    plan, visible = spans(T, chunk, WINDOW, CSA), []
    for s in plan:
        band = span_visible(s, WINDOW, CSA)[:, :s.n_keys].expand(B, -1, -1)
        chosen = selected[:, s.start:s.stop, :s.n_entries]
        if gather and gathers(s.n_entries, TOPK):
            visible.append(Gathered(band, picks_of(chosen, TOPK)))
        else:
            visible.append(torch.cat([band, chosen], dim=-1))
    mine.attn_sink.grad = None
    out = chunked_attention(mine.attend, plan, q, kv, entries, visible, (mine.attn_sink,))
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    return out.detach(), q.grad, kv.grad, entries.grad, mine.attn_sink.grad.clone()


def core_tolerance(T: int, d: int, H: int) -> tuple[float, float]:
    """(output bound, gradient bound) on max|gathered - masked| / max|masked| of ``_core``, to first order, each
    sum's terms' absolute sum taken as its scale (as tests/test_hybrid_attention.py's ``tolerance``). Unit-RMS q
    and keys: A = scale sum|q_i k_i| <= sqrt(d); a score's dot product is within (d + 1) u A of exact, moving its
    probability by 2 (d + 1) u A of itself; the output sums over at most S = T + T / 4 keys and the sink. The
    gradients sum over the same S keys (q), the H (C + W) or H T (query, head) pairs a key or an entry meets, and
    d channels (dP = g . v): (S + H T + d + 8) u more, and the probabilities' error twice (P and dS). Two
    evaluations: twice each."""
    u, A, S = FP32_U, math.sqrt(d), T + T // CSA
    forward = 2 * (2 * (d + 1) * u * A + (S + 8) * u)
    return forward, 2 * (4 * (d + 1) * u * A + (S + H * T + d + 8) * u)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_gathered_core_gradients_of_q_keys_entries_and_sinks(chunk):
    """``chunked_attention`` itself, leaf inputs: the output and the gradients of q, the tokens' keys, the entries
    and the sinks within ``core_tolerance`` of the masked form's, a random selection (every complete entry can be
    picked, not only those the layer's indexer favours)."""
    _, mine = _pair(LAYER["csa"])
    tol, gtol = core_tolerance(T, CFG.head_dim, CFG.n_heads)
    want = _core(mine, T, chunk, gather=False)
    got = _core(mine, T, chunk, gather=True)
    assert rel(got[0], want[0]) <= tol
    for name, a, b in zip(("q", "keys", "entries", "sinks"), got[1:], want[1:]):
        err = rel(a, b)
        assert err <= gtol, f"chunk {chunk}, gradient of {name}: {err:.3g} > {gtol:.3g}"


def _off_by_one(selected, k):
    """The picks one entry later (the last wraps to entry 0)."""
    return entry_picks(selected.roll(1, dims=-1), k)


def _empty_slots_count(selected, k):
    """Empty slots filled with entry 0 as if picked: a query seeing fewer than k entries attends to entry 0
    again (and sees it though incomplete)."""
    return entry_picks(selected, k).clamp(min=0)


@pytest.mark.parametrize("name,picks_of", [("one entry off", _off_by_one), ("empty slots count", _empty_slots_count)])
def test_wrong_picks_land_far_outside_the_tolerance(name, picks_of):
    """Gathering the entries one off, or counting the empty slots as entry 0, moves the output by over 100 times
    ``core_tolerance`` (chunk 100: its first chunk gathers for queries with empty slots)."""
    _, mine = _pair(LAYER["csa"])
    tol, _ = core_tolerance(T, CFG.head_dim, CFG.n_heads)
    want = _core(mine, T, 100, gather=False)[0]
    assert rel(_core(mine, T, 100, gather=True, picks_of=picks_of)[0], want) > 100 * tol, name


def test_layer_with_picks_one_off_lands_far_outside(monkeypatch):
    """The whole layer with its gathering chunks' picks one entry off: far outside ``chunk_tolerance``."""
    _, mine = _pair(LAYER["csa"])
    want, _, _ = _outputs(mine, T, 37, gather=False, grad=False)
    monkeypatch.setattr(hybrid, "entry_picks", _off_by_one)
    got, _, _ = _outputs(mine, T, 37, gather=True, grad=False)
    assert rel(got, want) > 100 * chunk_tolerance(mine, T)


def test_entry_picks_are_the_selection_then_empty_slots():
    """``entry_picks``: a mask's True columns ascending, then -1; k above the columns pads too."""
    sel = torch.tensor([[[0, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]]], dtype=torch.bool)
    assert entry_picks(sel, 3).tolist() == [[[1, 3, 4], [-1, -1, -1], [0, -1, -1]]]
    assert entry_picks(sel, 7).tolist()[0][0] == [1, 3, 4, -1, -1, -1, -1]
    assert entry_picks(sel, 3).dtype == torch.int32


def test_query_chunk_counts_the_gathered_tensors():
    """``query_chunk`` with ``topk``: the budget holds the attention's (B, H, C, C + W + GATHER_OVER k) scores,
    the indexer's (B, C, index heads, N) and ``GATHERED_COPIES`` (B, C, k, d) entries, not (B, H, C, N); so a
    CSA layer at dsv4-flash's shape (64 heads of 512, window 128, index_topk 512, 64 index heads) at 64K tokens
    gets more rows than the masked rule allows."""
    B, H, d, W, N, Hi, k, budget = 1, 64, 512, 128, 16384, 64, 512, 1 << 30

    def need(C):
        return (LIVE_SCORE_COPIES * 4 * B * C * (H * (C + W + GATHER_OVER * k) + Hi * N)
                + GATHERED_COPIES * 4 * B * C * k * d)

    C = query_chunk(B, 65536, H, W, N, Hi, budget_bytes=budget, topk=k, head_dim=d)
    assert need(C) <= budget < need(C + 1)
    assert C > query_chunk(B, 65536, H, W, N, Hi, budget_bytes=budget)


# decode: the tiny CSA layer against its own cache, prefill then steps and a chunk, two rows of other lengths
STEPS = [(37, 29), (1, 1), (1, 1), (9, 9)] + [(1, 1)] * 40 + [(55, 60), (1, 1), (1, 1)]  # per call: rows' tokens
MAX_LEN = sum(max(n) for n in STEPS)


def _decode(mine, gather: bool, paged: bool, monkeypatch=None, picks_of=None) -> list[torch.Tensor]:
    """Each call's outputs (2, T, D) of ``hybrid_attention`` over ``STEPS`` (right-padded rows), FP32 cache;
    ``paged``: a pool of 3 slots and 16-token blocks, the rows' blocks interleaved and their slots swapped."""
    if picks_of is not None:
        monkeypatch.setattr(hybrid_cache, "entry_picks", picks_of)
    layer, tables = LAYER["csa"], hybrid_tables(CFG, MAX_LEN, None)
    if paged:
        per = -(-MAX_LEN // 16)
        cache = HybridCache.paged(CFG, 3, 2 * per + 1, 16, torch.float32)
        cache = cache.view(torch.arange(2 * per).view(per, 2).T.flip(0).contiguous(), torch.tensor([2, 0]))
    else:
        cache = HybridCache(CFG, 2, MAX_LEN, torch.float32)
    x = _input(MAX_LEN, seed=4)
    start, outs = torch.zeros(2, dtype=torch.long), []
    with torch.no_grad():
        for n in STEPS:
            Tn = max(n)
            chunk = torch.stack([x[b, start[b]:start[b] + Tn] for b in range(2)]) if Tn > 1 else \
                x[torch.arange(2), start].unsqueeze(1)
            rows = hybrid_rows(tables, MAX_LEN, start, Tn, list(n))
            outs.append(hybrid_attention(mine, chunk, rows, cache, layer, gather=gather))
            start = start + torch.tensor(n)
    return outs


def _rel_real(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """max relative difference over the calls' real tokens (a row's padding past its length is not compared)."""
    errs = []
    for g, w, n in zip(got, want, STEPS):
        for b in range(2):
            errs.append(rel(g[b, :n[b]], w[b, :n[b]]))
    return max(errs)


def test_gathered_decode_equals_masked_decode(monkeypatch):
    """The cached path (two rows of other lengths, prefill, steps, chunks, crossing 16 entries mid-decode) gathers
    each query's picks, from slot-per-row and paged caches alike, within ``chunk_tolerance`` of the masked
    decode; with the picks one entry off, far outside it."""
    _, mine = _pair(LAYER["csa"])
    calls = []
    real = hybrid_cache.entry_picks
    monkeypatch.setattr(hybrid_cache, "entry_picks", lambda s, k: calls.append(s.shape) or real(s, k))
    want = _decode(mine, gather=False, paged=False)
    assert not calls  # the oracle masks every entry, gathering none
    tol = chunk_tolerance(mine, MAX_LEN)
    for paged in (False, True):
        err = _rel_real(_decode(mine, gather=True, paged=paged), want)
        assert err <= tol, f"paged {paged}: {err:.3g} > {tol:.3g}"
    assert len(calls) >= 2 * 20  # the steps past 16 entries gathered
    wrong = _decode(mine, gather=True, paged=True, monkeypatch=monkeypatch, picks_of=_off_by_one)
    assert _rel_real(wrong, want) > 100 * tol


def test_autocast_gathered_runs_forward_and_backward(gathered_picks):
    """Under BF16 autocast the gathering chunks run (and are recomputed) as the forward did: a BF16 output, finite
    gradients into the input, the sinks and the compressor."""
    _, mine = _pair(LAYER["csa"])
    x = _input(T).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mine(x, *_tables(LAYER["csa"], T), chunk=37)
    assert gathered_picks and out.dtype == torch.bfloat16 and out.isfinite().all()
    out.float().square().mean().backward()
    assert x.grad.isfinite().all() and mine.attn_sink.grad.isfinite().all() and (mine.attn_sink.grad != 0).any()
    assert mine.compressor.wkv.weight.grad.isfinite().all()
