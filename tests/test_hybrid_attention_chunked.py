"""DeepSeek-V4's hybrid attention in chunks of queries (``flyer.model.hybrid_chunks``) against the eager
whole-sequence computation (one chunk, the oracle): the same outputs and gradients within a derived FP32 rounding
bound for every layer kind and chunk sizes that do not divide T, are below the window, above T; CSA's per-chunk
top-k is the whole sequence's exactly, ties at the cut included; under autograd the saved state is O(T (H d + W +
C + N)) bytes, not the eager path's O(H T^2); the whole model with small chunks is transformers' DeepseekV4.
Tiny layers of tests/test_hybrid_attention.py (4 heads of 32, window 8, CSA 4 / HCA 16), FP32, CPU."""

import dataclasses
import math
from functools import partial

import pytest
import torch
from transformers import AutoModelForCausalLM

import flyer.model.hybrid as hybrid
from flyer.interop.hf import load_hf
from flyer.model.hybrid import HybridAttention
from flyer.model.hybrid_chunks import (CHUNK_ROWS, LIVE_SCORE_COPIES, Span, chunked_attention, query_chunk,
                                       span_visible, spans)
from tests.bounds import FP32_U
from tests.hf_models import build
from flyer.parallel.memory import saved_bytes
from tests.test_deepseek_v4 import _tokens, v4_tolerance
from tests.test_hybrid_attention import CFG, CSA, LAYER, TOPK, WINDOW, _input, _pair, _tables, rel

T = 62  # not a multiple of 4 or 16: the last, incomplete window makes no entry
# chunk sizes: below the window, not dividing T, one short of T, above T
CHUNKS = [1, 3, 5, 7, 16, 61, 100]


def chunk_tolerance(mine: HybridAttention, T: int) -> float:
    """Bound on max|chunked - eager| / max|output| of one layer, to first order. Both compute the queries, the
    tokens' keys and the entries by the same ops on the same whole-sequence tensors (bitwise alike), so they
    differ only inside attention and after it. Each evaluation: a score's d-term dot product and scaling is
    within (d + 1) u A of exact (A = scale sum|q_i k_i| <= sqrt(d) max|norm weight|, as in
    ``tests.test_hybrid_attention.tolerance``), which moves each probability by 2 (d + 1) u A of itself; the
    softmax's normaliser and the output's sum over at most S = T + N keys and the sink, the un-rotation and the
    two output GEMMs (H d / G, G L terms) add (S + proj + 8) u. Two evaluations: twice that."""
    u, d = FP32_U, CFG.head_dim
    r = mine.ratio
    S = T + (T // r if r else 0)
    norms = [mine.kv_norm.weight] + ([mine.compressor.norm.weight] if r else [])
    A = math.sqrt(d) * max(float(w.detach().abs().max()) for w in norms)
    proj = CFG.n_heads * d // CFG.o_groups + CFG.o_groups * CFG.o_lora_rank
    return 2 * (2 * (d + 1) * u * A + (S + proj + 8) * u)


def _outputs(mine: HybridAttention, layer: int, T: int, chunk: int | None, grad: bool):
    """(output, the input's gradient, {parameter: gradient}) of ``mine`` on the test input with ``chunk``; the
    gradients of sum(output * w) for a fixed random w (None without ``grad``)."""
    x = _input(T).requires_grad_(grad)
    for p in mine.parameters():
        p.grad = None
    with torch.set_grad_enabled(grad):
        out = mine(x, *_tables(layer, T), chunk=chunk)
    if not grad:
        return out, None, None
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in mine.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", list(LAYER))
def test_chunked_forward_equals_eager(kind):
    """Every chunk size (without gradient) within ``chunk_tolerance`` of one chunk; T = 62 is not a multiple of
    either ratio; chunk >= T is the eager computation itself, bit for bit."""
    layer = LAYER[kind]
    _, mine = _pair(layer)
    want, _, _ = _outputs(mine, layer, T, T, grad=False)
    tol = chunk_tolerance(mine, T)
    for chunk in CHUNKS:
        got, _, _ = _outputs(mine, layer, T, chunk, grad=False)
        err = rel(got, want)
        assert err <= tol, f"{kind}, chunk {chunk}: {err:.3g} > {tol:.3g}"
        if chunk >= T:
            assert torch.equal(got, want)


@pytest.mark.parametrize("kind", list(LAYER))
def test_chunked_gradients_equal_eager(kind):
    """Under autograd (recomputed chunks): the output, the input's gradient and every trained parameter's within
    ``chunk_tolerance`` plus the B T u of the weight gradients' sums over the tokens, as
    ``tests.test_hybrid_attention`` bounds gradients; the sinks and compressors get theirs through the chunks."""
    layer = LAYER[kind]
    _, mine = _pair(layer)
    want, gx_want, gp_want = _outputs(mine, layer, T, None, grad=True)
    tol = chunk_tolerance(mine, T) + 2 * T * FP32_U
    for chunk in (3, 7, 16):
        got, gx, gp = _outputs(mine, layer, T, chunk, grad=True)
        assert rel(got, want) <= chunk_tolerance(mine, T)
        assert rel(gx, gx_want) <= tol, f"{kind}, chunk {chunk}: input gradient"
        assert gp.keys() == gp_want.keys() and "attn_sink" in gp
        for name, g in gp.items():
            err = rel(g, gp_want[name])
            assert err <= tol, f"{kind}, chunk {chunk}, {name}: {err:.3g} > {tol:.3g}"


def _later_band(plan):
    """A band starting one token late: a query misses the oldest key of its window."""
    return [dataclasses.replace(s, key_start=min(s.key_start + 1, s.start)) for s in plan]


def _one_entry_fewer(plan):
    """A chunk's last complete entry left out."""
    return [dataclasses.replace(s, n_entries=max(0, s.n_entries - 1)) for s in plan]


MUTATIONS = [("window", "band one late", _later_band), ("hca", "band one late", _later_band),
             ("hca", "one entry fewer", _one_entry_fewer), ("csa", "one entry fewer", _one_entry_fewer)]


@pytest.mark.parametrize("kind,name,mutate", MUTATIONS, ids=[f"{k}-{n}" for k, n, _ in MUTATIONS])
def test_mutated_chunks_land_far_outside_the_tolerance(kind, name, mutate, monkeypatch):
    """A chunk plan off by one key or one entry moves the output by over 100 times ``chunk_tolerance``."""
    layer = LAYER[kind]
    _, mine = _pair(layer)
    want, _, _ = _outputs(mine, layer, T, T, grad=False)
    monkeypatch.setattr(hybrid, "spans", lambda *a: mutate(spans(*a)))
    got, _, _ = _outputs(mine, layer, T, 7, grad=False)
    assert rel(got, want) > 100 * chunk_tolerance(mine, T), name


def test_sinks_left_out_of_the_recomputation_get_no_gradient(monkeypatch):
    """The mutation the gradient test catches: ``attend``'s sinks not declared to the recomputation get none."""
    layer = LAYER["window"]
    _, mine = _pair(layer)
    monkeypatch.setattr(hybrid, "chunked_attention", partial(_without_params, chunked_attention))
    _, _, gp = _outputs(mine, layer, T, 7, grad=True)
    assert "attn_sink" not in gp and "wq_a.weight" in gp


def _without_params(fn, *args, params=()):
    return fn(*args)


def _entry_picks(mine: HybridAttention, T: int, chunk: int, monkeypatch) -> tuple[torch.Tensor, list[int]]:
    """(the entries each query attends to, bool (B, T, N), from the masks ``attend`` is given chunk by chunk;
    the query rows of each indexer call)."""
    plan, masks, rows = spans(T, chunk, mine.window, mine.ratio), [], []
    attend, scores = mine.attend, mine.indexer.scores
    with monkeypatch.context() as m, torch.no_grad():
        m.setattr(mine, "attend", lambda q, kv, visible: masks.append(visible) or attend(q, kv, visible))
        m.setattr(mine.indexer, "scores", lambda x, *a: rows.append(x.shape[1]) or scores(x, *a))
        mine(_input(T), *_tables(LAYER["csa"], T), chunk=chunk)
    picks = torch.zeros(2, T, T // mine.ratio, dtype=torch.bool)
    for s, v in zip(plan, masks, strict=True):
        picks[:, s.start:s.stop, :s.n_entries] = v[..., s.n_keys:]
    return picks, rows


def _tied_at_the_cut(scores: torch.Tensor, visible: torch.Tensor, k: int) -> int:
    """Queries whose k-th and (k+1)-th best visible scores are equal."""
    ranked = scores.masked_fill(~visible, float("-inf")).sort(-1, descending=True).values
    rows = visible.sum(-1) > k
    return int(((ranked[..., k - 1] == ranked[..., k]) & rows).sum())


@pytest.mark.parametrize("ties", [False, True])
def test_csa_selection_per_chunk_is_the_whole_sequence_selection(ties, monkeypatch):
    """The entries the chunked path attends to are, as bools, the whole sequence's, for every chunk size; each
    indexer call scores one chunk's queries. ``ties``: the index scores rounded to integers, so many queries tie
    at the top-k cut (the earliest tied entries are kept, whatever the chunk); a latest-first tie rule would
    choose otherwise, so the ties decide something."""
    _, mine = _pair(LAYER["csa"])
    if ties:
        exact = mine.indexer.scores
        monkeypatch.setattr(mine.indexer, "scores", lambda *a: exact(*a).round())
    want, rows = _entry_picks(mine, T, T, monkeypatch)
    assert rows == [T]
    N = T // CSA
    complete = torch.arange(N).view(1, -1) < ((torch.arange(T) + 1) // CSA).view(-1, 1)
    assert (want.sum(-1) == complete.sum(-1).clamp(max=TOPK)).all()
    for chunk in CHUNKS:
        got, rows = _entry_picks(mine, T, chunk, monkeypatch)
        assert torch.equal(got, want), f"chunk {chunk}"
        assert rows and max(rows) <= chunk  # the indexer scores one chunk's queries at a time
    if ties:
        with torch.no_grad():
            x = _input(T)
            scores = mine.indexer.scores(x, mine.q_norm(mine.wq_a(x)), *_tables(LAYER["csa"], T))
        assert _tied_at_the_cut(scores, complete.expand_as(scores), TOPK) > 20
        latest = hybrid.select_topk(scores.flip(-1), complete.flip(-1).expand_as(scores), TOPK).flip(-1)
        assert not torch.equal(latest, want)


def test_select_topk_on_a_chunk_of_columns_is_the_whole_selection():
    """``select_topk`` of a chunk's queries on the first n columns (the entries any of them sees) equals the
    whole call's rows: constructed ties at the cut (zeros), rows seeing fewer than k, chunks whose n is below k."""
    g = torch.Generator().manual_seed(0)
    T, N, k = 40, 10, 3
    scores = torch.randint(-1, 2, (2, T, N), generator=g).float().relu()  # zeros and ones: ties everywhere
    visible = (torch.arange(N).view(1, -1) < ((torch.arange(T) + 1) // 4).view(-1, 1)).expand(2, T, N)
    want = hybrid.select_topk(scores, visible, k)
    assert _tied_at_the_cut(scores, visible, k) > 10
    for chunk in (1, 3, 7, 40):
        for s in spans(T, chunk, 8, 4):
            got = hybrid.select_topk(scores[:, s.start:s.stop, :s.n_entries], visible[:, s.start:s.stop, :s.n_entries],
                                     k)
            assert torch.equal(got, want[:, s.start:s.stop, :s.n_entries])
            assert not want[:, s.start:s.stop, s.n_entries:].any()


def _mask_bytes(plan: list[Span], B: int) -> int:
    """Bytes of the chunks' masks (C_c, band_c + N_c), held for B rows."""
    return B * sum((s.stop - s.start) * (s.n_keys + s.n_entries) for s in plan)


@pytest.mark.parametrize("kind", ["window", "csa", "hca"])
def test_saved_state_is_linear_in_chunks_not_quadratic(kind):
    """Under autograd, ``chunked_attention`` over C = 16 queries at T = 512 saves exactly q (4 B T H d bytes), the
    tokens' keys (4 B T d), the entries (4 B N d) and the chunks' masks (B sum_c C_c (band_c + N_c) <=
    B T (C + W - 1 + N)), far below the 4 B H T (T + N) of the eager path's probabilities alone (which one chunk
    saves). The whole layer's saved bytes, masks aside, grow linearly with T (doubling T at most doubles them);
    the eager layer's grow by far more."""
    layer = LAYER[kind]
    _, mine = _pair(layer)
    B, H, d, W, C, r = 2, CFG.n_heads, CFG.head_dim, WINDOW, 16, mine.ratio
    N = lambda T: T // r if r else 0  # noqa: E731
    T = 512
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, T, H, d, generator=g, requires_grad=True)
    kv = torch.randn(B, T, 1, d, generator=g, requires_grad=True)
    entries = torch.randn(B, N(T), d, generator=g, requires_grad=True)

    def core(chunk):
        plan = spans(T, chunk, W, r)
        visible = [span_visible(s, W, r).expand(B, -1, -1) for s in plan]
        return plan, lambda: chunked_attention(mine.attend, plan, q, kv, entries, visible, (mine.attn_sink,))

    plan, run = core(C)
    formula = 4 * B * (T * H * d + T * d + N(T) * d) + B * T * (C + W - 1 + N(T))
    saved = saved_bytes(run)
    # the masks here are one (C, band + N) expanded over the rows, as the layer's are without the indexer
    assert saved == 4 * B * (T * H * d + T * d + N(T) * d) + _mask_bytes(plan, 1) <= formula
    eager = 4 * B * H * T * (T + N(T))
    assert formula < eager / 8 and saved_bytes(core(T)[1]) > eager

    def layer_bytes(T, chunk):
        x = _input(T).requires_grad_(True)
        return saved_bytes(lambda: mine(x, *_tables(layer, T), chunk=chunk))

    masks = lambda T: _mask_bytes(spans(T, C, W, r), B)  # noqa: E731  (at most: some are expanded views)
    assert layer_bytes(512, C) - masks(512) <= 2 * (layer_bytes(256, C) - masks(256))
    assert layer_bytes(512, 512) > 3 * layer_bytes(256, 256)


def test_query_chunk_is_the_rows_or_the_largest_within_the_budget():
    """``query_chunk``: CHUNK_ROWS (the window if wider) where the budget allows, else the C whose score tensors
    fit it while C + 1's do not; clamped to [1, T]; a chunk below 1 is refused naming the field."""
    B, H, W, N, Hi, budget = 2, 64, 128, 2048, 64, 1 << 28

    def need(C):
        return LIVE_SCORE_COPIES * 4 * B * C * (H * (C + W + N) + Hi * N)

    C = query_chunk(B, 8192, H, W, N, Hi, budget_bytes=budget)
    assert need(C) <= budget < need(C + 1) and 1 < C < CHUNK_ROWS
    assert query_chunk(1, 8192, 4, 32, 2048, 8) == CHUNK_ROWS and query_chunk(1, 8192, 4, 512, 0) == 512
    assert query_chunk(B, 100, 4, 8, 25) == 100 and query_chunk(64, 8192, H, W, N, Hi, budget_bytes=1) == 1
    with pytest.raises(ValueError, match="chunk"):
        spans(10, 0, 4, 4)


def test_autocast_chunked_runs_forward_and_backward():
    """Under BF16 autocast the recomputation runs as the forward did: a BF16 output, finite gradients."""
    for layer in LAYER.values():
        _, mine = _pair(layer)
        x = _input(T).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = mine(x, *_tables(layer, T), chunk=7)
        assert out.dtype == torch.bfloat16 and out.isfinite().all()
        out.float().square().mean().backward()
        assert x.grad.isfinite().all() and mine.attn_sink.grad.isfinite().all() and (mine.attn_sink.grad != 0).any()


def _counted(attend, calls, q, kv, visible):
    calls.append(q.shape[1])
    return attend(q, kv, visible)


def test_model_with_small_chunks_equals_transformers(tmp_path, monkeypatch):
    """The tiny V4 model (tests/hf_models.py: every layer kind, 4 streams) with every attention layer forced to
    chunks of 5 queries gives transformers' DeepseekV4 logits within ``v4_tolerance``, as the eager path does
    (tests/test_deepseek_v4.py), at 64 tokens: 13 chunks, each seeing a band and its entries only; with the
chunks' bands one token late, far outside it."""
    build("v4", tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model, cfg, _ = load_hf(tmp_path)
    calls = []
    for block in model.layers:
        attn = block.attn
        monkeypatch.setattr(attn, "forward", partial(attn.forward, chunk=5))
        monkeypatch.setattr(attn, "attend", partial(_counted, attn.attend, calls))
    x = _tokens(64, 64)
    with torch.no_grad():
        err, tol = rel(model(x), ref(x).logits), v4_tolerance(cfg, 64)
    assert err <= tol, f"{err:.3g} > {tol:.3g}"
    assert len(calls) == cfg.n_layers * 13 and max(calls) == 5
    monkeypatch.setattr(hybrid, "spans", lambda *a: _later_band(spans(*a)))
    with torch.no_grad():
        assert rel(model(x), ref(x).logits) > 100 * tol  # chunks' bands one token late: far off
