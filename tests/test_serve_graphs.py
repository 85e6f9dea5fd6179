"""Serving steps in fixed shapes (``flyer.serve.graphs``), what a CUDA graph captures: token rows of decoding requests
and prompt chunks. On the CPU they run eagerly, so their values are held here to the eager step's and to
``generate``, and a meta-device run shows that they read nothing back to the host (what a capture forbids); the
capture itself needs a GPU (``bench/serve.py --device cuda`` reports whether its steps were captured)."""

import contextlib
import copy
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from trained import counting_model

from flyer import kernels
from flyer.config import preset
from flyer.errors import FieldError
from flyer.infer import GenerationConfig, generate
from flyer.infer.decoder import Decoder, Group
from flyer.model.experts import Experts
from flyer.model.moe import MoE, fixed_shapes
from flyer.model.transformer import Transformer
from flyer.serve.engine import Engine, EngineConfig, SamplingOptions
from flyer.serve.graphs import StaticStep, StepGraphs, attention_flops_per_slot, graphs_unsupported, row_buckets
from flyer.serve.paged import NULL_BLOCK, make_paged_cache

V = 64
GQA = dict(attn="gqa", n_heads=4, n_kv_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def trained():
    return counting_model(V)


def _engine(model, block_size: int = 4, cache_dtype: torch.dtype = torch.float32, **over) -> Engine:
    return Engine(model, EngineConfig(kv_cache_bytes=1 << 22, block_size=block_size, cache_dtype=cache_dtype, **over))


def _run(eng: Engine, prompts, max_tokens: list[int]) -> list[list[int]]:
    outs = [[] for _ in prompts]
    for i, (p, n) in enumerate(zip(prompts, max_tokens)):
        eng.submit(p, SamplingOptions(max_tokens=n), lambda e, i=i: outs[i].append(e.token))
    eng.run_until_idle()
    return outs


def _prompts() -> list[list[int]]:
    return [[(s + d * i) % V for i in range(n)] for s, d, n in ((3, 2, 5), (7, 1, 19), (1, 3, 2), (9, 2, 11),
                                                                   (4, 1, 30))]


def test_row_buckets():
    assert row_buckets(1) == [1]
    assert row_buckets(3) == [1, 2, 3]
    assert row_buckets(12) == [1, 2, 4, 8, 12]
    assert row_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert row_buckets(320)[10:] == [64, 96, 128, 160, 192, 224, 256, 288, 320]  # beside a chunk of 256


def _check_a_lone_long_prompt(eng: Engine, model: Transformer) -> None:
    """A 40-token prompt alone on ``eng`` (prefill_chunk 6): its first six steps take no logits, then it decodes
    generate's tokens."""
    lone = [(5 + 3 * i) % V for i in range(40)]
    ref = generate(model, [lone], GenerationConfig(max_new_tokens=6, cache_dtype=torch.float32)).tokens[0]
    fixed = eng.metrics.fixed_steps.labels("cuda_graph" if eng.graphs.capture else "eager")._value.get()
    assert _run(eng, [lone], [6]) == [ref]
    assert eng.metrics.fixed_steps.labels("cuda_graph" if eng.graphs.capture else "eager")._value.get() == fixed + 12


def _recording(eng: Engine) -> list[tuple[int, int]]:
    """(rows, requests) of each step ``eng`` runs in fixed shapes."""
    seen, step = [], eng.graphs.step

    def record(rows, tables):
        h = step(rows, tables)
        if h is not None:
            seen.append((len(rows), len(tables)))
        return h
    eng.graphs.step = record
    return seen


SPEC = {"none": {}, "cutoff": dict(speculative="mtp", speculative_max_batch=1),
        "two_drafts": dict(speculative="mtp", draft_tokens=2)}


@pytest.mark.parametrize("spec", list(SPEC))
def test_fixed_shape_steps_equal_generate_alone(trained, spec):
    """Every step that fits the largest row bucket in fixed shapes (rows padded to 1, 2, 4, 8, 16 or 24 and the last;
    attended slots to powers of two of blocks), prompts in chunks of 6 tokens beside the decoding rows: each request's
    greedy tokens are generate's on its prompt alone. With MTP drafting only while one row decodes (``cutoff``), plain
    steps of several rows alternate with drafting ones (the prompts' and plain steps' hidden states kept for the MTP
    module's entries); with two drafts a row at every batch size, plain rows beside rows verifying two drafts. The MTP
    module's passes run in fixed shapes too (the second draft's on the module's own output), and its entries are the
    eager passes' (FP64, to the FP32 softmax's rounding: ``softmax_bound``)."""
    prompts, lengths = _prompts(), [8, 14, 5, 10, 30]  # the last one decodes alone at the end
    ref = [generate(trained, [p], GenerationConfig(max_new_tokens=n, cache_dtype=torch.float32)).tokens[0]
           for p, n in zip(prompts, lengths)]
    over = SPEC[spec]
    eng = _engine(trained, max_batch_size=8, prefill_chunk=6, cuda_graphs=True, **over)
    forwards, forward = [], eng._forward
    eng._forward = lambda *a: forwards.append(a) or forward(*a)
    steps = _recording(eng)
    passes = []  # the MTP module's fixed passes: whether on the main model's hidden states
    if over:
        mtp_step = eng.speculator.graphs.step

        def mtp_record(rows, tables, hidden, from_main=True):
            h = mtp_step(rows, tables, hidden, from_main)
            if h is not None:
                passes.append(from_main)
            return h
        eng.speculator.graphs.step = mtp_record
    assert _run(eng, prompts, lengths) == ref
    assert len(steps) > 10 and max(n for _, n in steps) == len(prompts)  # the fixed path ran, at the full batch too
    assert any(r > n for r, n in steps)  # with prompt chunks' rows
    # every step, but the first burst's prefill where its 5 prompts' 30 tokens pass the largest bucket: 8 decoding
    # requests and a chunk of 6, each request with its drafts (16 + 6 with one, 24 + 6 with two)
    burst_eager = 30 > eng.graphs.static.row_buckets[-1]
    assert burst_eager == (spec != "two_drafts")
    assert len(steps) == len([a for a in forwards if a[0] or a[1]]) - burst_eager
    assert eng.metrics.fixed_steps.labels("eager")._value.get() == len(steps)  # (no capture on the CPU)
    assert eng.alloc.used == 0
    if not over:
        _check_a_lone_long_prompt(eng, trained)
        return
    assert eng.drafted > 0  # (every drafting step among the fixed ones)
    assert passes.count(True) > 10 and (passes.count(False) > 0) == (spec == "two_drafts")
    model64, pools = copy.deepcopy(trained).double(), []
    for graphs in (True, False):
        eng = _engine(model64, max_batch_size=8, prefill_chunk=6, cuda_graphs=graphs, cache_dtype=torch.float64,
                      **over)
        assert _run(eng, prompts, lengths) == ref
        pools.append(eng.mtp_cache.pool.packed[:, 1:])  # (the null block: padding's)
    S = 64  # the last request's 60 positions, padded
    d = (pools[0] - pools[1]).abs()
    assert eng.accepted > 0 and d.max() <= softmax_bound(S) * pools[1].abs().max()


def test_hidden_states_kept_past_the_step_are_copies(trained):
    """A request drafting alone (``speculative_max_batch`` 1) keeps the verified positions' hidden states for its next
    MTP entries; when a second request joins, it decodes plainly and writes those entries a step later, after the
    next step has overwritten the static output: what it kept must be a copy. Its MTP entries and both requests'
    tokens are the eager engine's (FP64, ``softmax_bound``)."""
    model64 = copy.deepcopy(trained).double()
    first, second = _prompts()[4], _prompts()[1]
    pools, outs = [], []
    for graphs in (True, False):
        eng = _engine(model64, max_batch_size=4, cuda_graphs=graphs, cache_dtype=torch.float64, speculative="mtp",
                      speculative_max_batch=1)
        got = [[], []]
        eng.submit(first, SamplingOptions(max_tokens=24), lambda e: got[0].append(e.token))
        for _ in range(6):
            eng.step()
        drafted = eng.drafted
        eng.submit(second, SamplingOptions(max_tokens=12), lambda e: got[1].append(e.token))
        eng.run_until_idle()
        assert drafted > 0 and eng.speculator.off_steps > 0  # it drafted alone, then decoded plainly beside the other
        pools.append(eng.mtp_cache.pool.packed[:, 1:])
        outs.append(got)
    assert outs[0] == outs[1]
    assert (pools[0] - pools[1]).abs().max() <= softmax_bound(64) * pools[1].abs().max()


def test_fixed_shape_prompt_scores_equal_the_eager_ones(trained):
    """A prompt's log-probabilities (``prompt_logprobs``: echo) from the prompt rows of fixed-shape steps, in chunks
    beside other requests' decoding rows, are the packed forward's (FP64 model, the FP32 softmax's bound as above,
    passed on through the log-softmax: within a few times it of the logits' scale)."""
    model64 = copy.deepcopy(trained).double()
    prompts = _prompts()
    got = []
    for graphs in (True, False):
        eng = _engine(model64, max_batch_size=8, prefill_chunk=6, cuda_graphs=graphs, cache_dtype=torch.float64)
        events = [[] for _ in prompts]
        for i, p in enumerate(prompts):
            eng.submit(p, SamplingOptions(max_tokens=3, prompt_logprobs=True, logprobs=2),
                       lambda e, i=i: events[i].append(e))
        eng.run_until_idle()
        got.append([[lp for lp, _ in ev[0].prompt_logprobs[1:]] for ev in events])
    assert [len(x) for x in got[0]] == [len(p) - 1 for p in prompts]
    flat = [torch.tensor(sum(g, [])) for g in got]
    assert (flat[0] - flat[1]).abs().max() <= 4 * softmax_bound(32) * flat[1].abs().max()


@pytest.mark.parametrize("graphs", [True, False])
def test_a_recomputed_shared_position_is_not_written(trained, graphs):
    """Under speculation a request that shares a prefix recomputes its last shared position (for the hidden state
    its MTP entry needs) without writing into the shared block: here that slot's entries are marked first, and the
    second request leaves them as they are, in fixed shapes as in the packed forward."""
    p1 = [(3 + 2 * i) % V for i in range(13)]
    eng = _engine(trained, max_batch_size=4, speculative="mtp", cuda_graphs=graphs)
    _run(eng, [p1], [4])
    r = eng.submit(p1[:9] + [5, 6, 7], SamplingOptions(max_tokens=4), lambda e: None)
    eng.admit()
    pos = r.n_shared - 1
    assert r.n_cached == pos == 7  # two shared blocks of 4, the last position recomputed
    block = r.blocks[pos // 4]
    eng.cache.pool.packed[:, block, pos % 4] += 1.0  # (layers, entry)
    marked = eng.cache.pool.packed[:, block].clone()
    eng.run_until_idle()
    assert torch.equal(eng.cache.pool.packed[:, block], marked)


@pytest.mark.parametrize("limit", ["flops", "slots", "row_slots"])
def test_buckets_past_the_budgets_run_eagerly(trained, monkeypatch, limit):
    """A bucket whose dense experts would cost more than ``FLOPS_BUDGET``, that attends over more than
    ``GRAPH_MAX_SLOTS`` a row or ``GRAPH_MAX_ROW_SLOTS`` in all runs its step eagerly; the tokens are generate's
    either way. Here a budget for 2 rows (steps of 3 or more rows, buckets 4 and 8, take the packed forward), for 32
    slots a row (8 blocks of 4), or for 64 (row, slot) pairs."""
    prompts, lengths = _prompts(), [8, 14, 5, 10, 30]
    ref = [generate(trained, [p], GenerationConfig(max_new_tokens=n, cache_dtype=torch.float32)).tokens[0]
           for p, n in zip(prompts, lengths)]
    eng = _engine(trained, max_batch_size=8, cuda_graphs=True)
    per_row = eng.graphs.static.dense_flops_per_row
    # the main model's routed experts only: the MTP module's run in passes of their own
    assert per_row == _dense(trained.layers) and _dense(trained.mtp) > 0
    patch, cap = {"flops": ("FLOPS_BUDGET", 2.5 * per_row), "slots": ("GRAPH_MAX_SLOTS", 32),
                  "row_slots": ("GRAPH_MAX_ROW_SLOTS", 64)}[limit]
    monkeypatch.setattr(f"flyer.serve.graphs.{patch}", cap)
    shapes = []
    run = eng.graphs.static.run
    eng.graphs.static.run = lambda shape: shapes.append(shape) or run(shape)
    assert _run(eng, prompts, lengths) == ref
    # rows, slots, or their product, of the steps that ran fixed: up to the cap, where unlimited they reach 8 rows
    # and 64 slots
    sizes = [{"flops": P, "slots": W * 4, "row_slots": P * W * 4}[limit] for P, W in shapes]
    assert sizes and max(sizes) == (2 if limit == "flops" else cap)
    assert eng.metrics.fixed_steps.labels("eager")._value.get() == len(shapes)


@pytest.mark.parametrize("budget", [160, 159])
def test_prompt_attention_past_the_budget_runs_eagerly(trained, monkeypatch, budget):
    """A prompt's chunk attends in the absorbed form, each row past one a request over the step's slots, whose FLOPs
    count against ``FLOPS_BUDGET`` (here alone, the dense experts' left out). Each chunk after the first burst's
    (whose 30 rows pass the largest bucket) is 5 rows past one over 32 slots: with a budget of 160 (row, slot) pairs
    they run fixed, with 159 eagerly, with generate's tokens either way."""
    prompts, lengths = _prompts(), [8, 14, 5, 10, 30]
    ref = [generate(trained, [p], GenerationConfig(max_new_tokens=n, cache_dtype=torch.float32)).tokens[0]
           for p, n in zip(prompts, lengths)]
    eng = _engine(trained, max_batch_size=8, prefill_chunk=6, cuda_graphs=True)
    static = eng.graphs.static
    static.dense_flops_per_row = 0
    monkeypatch.setattr("flyer.serve.graphs.FLOPS_BUDGET", budget * static.attn_flops_per_slot)
    chunks, step = [], eng.graphs.step

    def record(rows, tables):
        h = step(rows, tables)
        shape = static.buckets(len(rows), max(r[1] for r in rows) + 1)
        if shape is not None and len(rows) > len(tables):
            chunks.append((len(rows) - len(tables), shape[1] * 4, h is not None))
        return h
    eng.graphs.step = record
    assert _run(eng, prompts, lengths) == ref
    assert len(chunks) > 3 and set(chunks) == {(5, 32, budget == 160)}


@pytest.mark.parametrize("attn", ["mla", "gqa"])
def test_attention_flops_per_slot_is_what_the_step_attends(trained, attn):
    """``attention_flops_per_slot`` against torch's FLOP counter: the same rows over 16 and then 32 blocks of slots
    differ by rows x slots x it, every other FLOP of the step being the same (the trained MLA model, a random GQA
    one; the CPU kernels off: their calls are not counted, and a GPU runs these ops)."""
    torch.manual_seed(1)
    model = trained if attn == "mla" else Transformer(preset("tiny", vocab_size=V, **GQA)).eval()
    cfg = model.cfg
    cache = make_paged_cache(cfg, cfg.n_layers, 64, 4, torch.float32)
    static = StaticStep(Decoder(model, 1, cfg.max_seq_len, cache=cache), cache, 4, 8, cfg.max_seq_len // 4)
    rows = [(3, 5, 0, 0), (4, 9, 1, 0), (6, 10, 1, 0)]
    flops = []
    for W in (16, 32):
        static.fill(rows, [list(range(1, 17)), list(range(17, 33))], (4, W))
        with FlopCounterMode(display=False) as counter, kernels.disabled():
            static.run((4, W))
        flops.append(counter.get_total_flops())
    assert static.attn_flops_per_slot == attention_flops_per_slot(cfg, cfg.n_layers)
    assert flops[1] - flops[0] == 4 * 16 * 4 * static.attn_flops_per_slot


def _dense(layers) -> int:
    """FLOPs of every routed expert of ``layers`` over one token (``Experts.routed_fixed``'s dense form)."""
    return sum(2 * 3 * e.n_local * e.w1.shape[1] * e.w1.shape[2] for e in layers.modules() if isinstance(e, Experts))


def softmax_bound(S: int) -> float:
    """Relative bound of the difference between a fixed-shape step's hidden states and the eager step's, computed in
    FP64: the attention's softmax runs in FP32 whatever the model's dtype (``flyer.infer.attention._softmax``),
    over S padded slots in the fixed step and fewer in the eager one, which may sum in another order: each
    probability within S u32 of the other's; the MoE's sums in another order add FP64 rounding (~1e-16). A wrong
    slot, row, expert or hidden state moves them by their own scale."""
    return S * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("attn", ["mla", "gqa"])
def test_padding_rows_write_the_null_block_only(trained, attn):
    """A step of 3 decoding rows and a prompt's chunk of 6 tokens (positions 3 to 8, its first 3 cached: the pool's
    stale entries; position 3 in a shared block, recomputed and not written), the chunk's rows in reverse order: 9
    rows in the bucket of 16 and 8 blocks of slots. The pool changes at the real rows' slots (position 3's in the
    null block) and in the null block, nowhere else, and the hidden states and written entries equal the eager
    packed forward's over the two groups (FP64, ``softmax_bound``). The trained MLA model; a random GQA one
    (per-head keys and values paged the same way)."""
    torch.manual_seed(1)
    model = copy.deepcopy(trained) if attn == "mla" else Transformer(preset("tiny", vocab_size=V, **GQA)).eval()
    model, cfg = model.double(), model.cfg
    cache = make_paged_cache(cfg, cfg.n_layers, 40, 4, torch.float64)
    pool = cache.pool.tensors  # (L, blocks, slots, ...) each
    for t in pool.values():
        t.normal_()  # stale entries everywhere: masked reads of them must not matter
    dec = Decoder(model, 1, cfg.max_seq_len, cache=cache)
    static = StaticStep(dec, cache, 8, 16, cfg.max_seq_len // 4)
    tokens, positions = [5, 9, 2], [6, 29, 0]
    tables = [[3, 4], [10, 11, 12, 13, 14, 15, 16, 17], [20], [30, 31, 32]]
    chunk = [7, 1, 8, 2, 8, 1]  # the prompt's tokens at positions 3..8, written from 4 on
    rows = [(t, p, i, 0) for i, (t, p) in enumerate(zip(tokens, positions))]
    rows += [(t, 3 + j, 3, 4) for j, t in reversed(list(enumerate(chunk)))]
    shape = static.buckets(len(rows), max(positions) + 1)
    assert shape == (16, 8)
    before = {k: t.clone() for k, t in pool.items()}
    static.fill(rows, tables, shape)
    h = static.run(shape)
    changed = sum((t != before[k]).flatten(3).any(-1).any(0) for k, t in pool.items()).bool()  # (blocks, slots)
    written = torch.zeros_like(changed)
    written[NULL_BLOCK, 0] = True  # the padding rows: position 0
    for _, p, i, first in rows:
        written[tables[i][p // 4] if p >= first else NULL_BLOCK, p % 4] = True
    assert changed[written].all() and not changed[~written].any()
    after = {k: t.clone() for k, t in pool.items()}
    for k, t in pool.items():
        t.copy_(before[k])
    tables_t = torch.tensor([t + [NULL_BLOCK] * (8 - len(t)) for t in tables])
    eager = dec.forward_groups([Group(torch.tensor(tokens).view(3, 1), torch.tensor(positions), None,
                                      cache.view(tables_t[:3])),
                                Group(torch.tensor([chunk]), torch.tensor([3]), None,
                                      cache.view(tables_t[3:], torch.tensor([4])))])
    pairs = [(h[:3], eager[0]), (h[3:9].flip(0).view(1, 6, -1), eager[1])]
    pairs += [(after[k][:, 1:], t[:, 1:]) for k, t in pool.items()]  # (the null block: padding's)
    for got, want in pairs:
        assert (got - want).abs().max() <= softmax_bound(32) * want.abs().max()


def test_host_buffers_wait_for_the_last_copy_out_of_them(trained):
    """On a GPU the static inputs are copied from pinned host buffers asynchronously, and a step without logits
    reads nothing back, so the host may run a step ahead: ``fill`` waits for the last step's copies before it
    writes the buffers again. An event stand-in records the buffers at each record and finds them unchanged at the
    next wait (nothing written in between), and every fill after the first waits."""
    cfg = trained.cfg
    cache = make_paged_cache(cfg, cfg.n_layers, 16, 4, torch.float32)
    static = StaticStep(Decoder(trained, 1, cfg.max_seq_len, cache=cache), cache, 4, 8, cfg.max_seq_len // 4)
    log = []

    class Event:
        def record(self):
            log.append("record")
            self.seen = static._host_rows.clone(), static._host_tables.clone()

        def synchronize(self):
            log.append("wait")
            if hasattr(self, "seen"):
                assert torch.equal(self.seen[0], static._host_rows) and torch.equal(self.seen[1], static._host_tables)
    static._copied = Event()
    for t in range(3):
        rows = [(t + 1, 5 + t, 0, 0), (2, 3, 1, 0)]
        static.fill(rows, [[1, 2], [3]], static.buckets(2, 8))
    assert log == ["wait", "record"] * 3


@pytest.mark.parametrize("impl,dtype,host_offsets", [("fused", torch.float64, False),
                                                     ("grouped_mm", torch.bfloat16, False),
                                                     ("grouped_mm", torch.bfloat16, True)])
def test_fixed_shape_moe_equals_the_eager_moe(impl, dtype, host_offsets, monkeypatch):
    """``fixed_shapes``' routed experts against the eager ones on the same routing. FP64 (every expert over every
    token): both within FP64 rounding of the exact sums of at most D + F + K terms (~1e-13 of the scale here; 1e-9
    leaves room, a wrong expert or weight moves the output by its own scale). BF16 through ``torch._grouped_mm``,
    and where its groups would be looped on the host (``host_offsets``: a GPU before SM90, where a capture
    fails) every expert over every token in BF16 (its FLOPs then counted against the graphs' budget): the same
    per-expert GEMMs (each row's products its own), so only the combine's FP32 order differs: within (K - 1) u32 of
    the terms' absolute sum, bounded by K max|w y|."""
    monkeypatch.setattr("flyer.model.experts.grouped_mm_reads_offsets", lambda device: host_offsets)
    torch.manual_seed(0)
    cfg = preset("small")
    moe = MoE(cfg, experts_impl=impl).eval().to(dtype)
    experts = [m for m in moe.modules() if isinstance(m, Experts)]
    assert all((e.dense_flops_per_token(dtype) > 0) == (dtype == torch.float64 or host_offsets) for e in experts)
    x = torch.randn(3, 5, cfg.dim, dtype=dtype)
    with torch.inference_mode():
        eager = moe(x)
        with fixed_shapes():
            fixed = moe(x)
    scale = float(eager.abs().max())
    K = cfg.n_activated_experts
    tol = 1e-9 * scale if dtype == torch.float64 else (K - 1) * torch.finfo(torch.float32).eps * K * scale \
        + torch.finfo(torch.bfloat16).eps * scale  # the result rounded to BF16 once more
    assert (fixed.double() - eager.double()).abs().max() <= tol
    moe.train()
    with fixed_shapes(), pytest.raises(ValueError, match="eval mode"):
        moe(x)


@contextlib.contextmanager
def _meta_autocast():
    """Autocast knows no meta device type: asked about it, the model's modules would fail before any kernel."""
    real = torch.is_autocast_enabled

    def enabled(*args):
        return False if args and args[0] == "meta" else real(*args)
    torch.is_autocast_enabled = enabled
    try:
        yield
    finally:
        torch.is_autocast_enabled = real


@pytest.mark.parametrize("attn,dtype,impl,host_offsets", [("mla", torch.float32, "auto", False),
                                                          ("mla", torch.bfloat16, "grouped_mm", False),
                                                          ("mla", torch.bfloat16, "grouped_mm", True),
                                                          ("gqa", torch.float32, "auto", False)])
def test_fixed_shape_step_reads_nothing_back(attn, dtype, impl, host_offsets, monkeypatch):
    """On the meta device every value read back to the host fails (``.item()``, ``.tolist()``, ``bincount``'s and
    ``nonzero``'s shapes), as it fails inside a CUDA graph's capture: the fixed-shape step runs there (and takes
    the non-CPU branches a GPU takes; BF16 experts every one over every token where ``torch._grouped_mm`` would read
    its offsets back); the eager step, which reads its positions' maximum back, does not."""
    monkeypatch.setattr("flyer.model.experts.grouped_mm_reads_offsets", lambda device: host_offsets)
    cfg = preset("tiny", **(GQA if attn == "gqa" else {}))
    with torch.device("meta"):
        model = Transformer(cfg, experts_impl=impl).eval().to(dtype)
    cache = make_paged_cache(cfg, cfg.n_layers, 64, 4, dtype, "meta")
    dec = Decoder(model, 1, cfg.max_seq_len, cache=cache)
    static = StaticStep(dec, cache, 8, 16, cfg.max_seq_len // 4)
    rows = [(1, 10, 0, 0), (2, 39, 1, 0), (3, 5, 2, 0), *[(4, p, 3, 9) for p in range(8, 12)]]  # and a prompt's
    shape = static.buckets(len(rows), 40)
    static.fill(rows, [[1, 2, 3], list(range(4, 14)), [14, 15], [16, 17, 18]], shape)
    with _meta_autocast():
        h = static.run(shape)
        assert h.shape == (8, 1, cfg.dim)
        tables = torch.zeros(3, 16, dtype=torch.long, device="meta")
        group = Group(torch.zeros(3, 1, dtype=torch.long, device="meta"), torch.zeros(3, dtype=torch.long,
                                                                                      device="meta"), None,
                      cache.view(tables))
        with pytest.raises(RuntimeError, match="meta"):
            dec.forward_groups([group])


@pytest.mark.parametrize("from_main", [True, False])
def test_fixed_shape_mtp_pass_reads_nothing_back(from_main):
    """The MTP module's pass in fixed shapes (its entries at position + 1), on the meta device as above: on the main
    model's hidden states (a catch-up) or on its own (a chained draft); the eager pass, whose rows read their
    positions' maximum back, does not."""
    cfg = preset("tiny", mtp_depth=1)
    with torch.device("meta"):
        model = Transformer(cfg).eval()
    cache, mtp_cache = (make_paged_cache(cfg, n, 64, 4, torch.float32, "meta") for n in (cfg.n_layers, 1))
    dec = Decoder(model, 1, cfg.max_seq_len, cache=cache, mtp_cache=mtp_cache, with_mtp=True)
    static = StaticStep(dec, mtp_cache, 8, 16, cfg.max_seq_len // 4 + 1, mtp=True)
    rows = [(1, 10, 0, 0), (2, 39, 1, 0), *[(4, p, 2, 0) for p in range(3, 7)]]
    shape = (*static.buckets(len(rows), 41), from_main)
    assert shape == (8, 16, from_main)
    static.fill(rows, [[1, 2, 3], list(range(4, 15)), [15, 16]], shape, torch.zeros(len(rows), cfg.dim, device="meta"))
    with _meta_autocast():
        assert static.run(shape).shape == (8, 1, cfg.dim)
        mtp_cache.tables = torch.zeros(3, 16, dtype=torch.long, device="meta")
        with pytest.raises(RuntimeError, match="meta"):
            dec.mtp_forward(torch.zeros(3, 1, cfg.dim, device="meta"), torch.zeros(3, 1, dtype=torch.long,
                            device="meta"), torch.zeros(3, dtype=torch.long, device="meta"), from_main, shift=1)


def test_models_without_a_fixed_shape_step_are_refused_or_left_eager():
    v4 = Transformer(preset("tiny-v4")).eval()
    with pytest.raises(FieldError, match="cuda_graphs.*DeepSeek-V4's hybrid attention"):
        _engine(v4, block_size=16, max_batch_size=2, cuda_graphs=True)
    assert _engine(v4, block_size=16, max_batch_size=2).graphs is None  # auto: only a GPU captures, and not this model


def test_a_failed_capture_leaves_the_eager_step(trained, capsys):
    """Capturing needs CUDA: here it fails at once, which turns graphs off with one line on stderr, and every step
    runs eagerly with the same tokens."""
    prompts = _prompts()[:3]
    ref = _run(_engine(trained, cuda_graphs=False), prompts, [6] * 3)
    eng = _engine(trained, cuda_graphs=True)
    eng.graphs = StepGraphs(eng.dec, eng.cache, eng.cfg.max_batch_size, eng.cfg.max_batch_size + eng.cfg.prefill_chunk,
                            trained.cfg.max_seq_len, capture=True)
    assert _run(eng, prompts, [6] * 3) == ref
    assert eng.graphs.failed is not None and not eng.graphs.graphs
    assert capsys.readouterr().err.count("CUDA graphs off") == 1


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("spec", list(SPEC))
def test_cuda_graphs_replay_the_eager_steps(trained, spec):
    """On a GPU: steps captured (one graph per bucket used) and replayed give each request generate's greedy tokens on
    its prompt alone, as the eager steps do, prompts in chunks beside decoding rows, without and with MTP drafts
    (``SPEC``: the module's passes captured too); then without drafts a lone 40-token prompt, whose first six steps read
    nothing back (no logits): each step's inputs, copied from the host's static buffers, are its own, not the next
    step's."""
    model = copy.deepcopy(trained).cuda()
    prompts, lengths = _prompts(), [8, 14, 5, 10, 30]
    ref = [generate(model, [p], GenerationConfig(max_new_tokens=n, cache_dtype=torch.float32)).tokens[0]
           for p, n in zip(prompts, lengths)]
    over = SPEC[spec]
    eng = _engine(model, max_batch_size=8, prefill_chunk=6, **over)  # auto: graphs on CUDA
    assert _run(eng, prompts, lengths) == ref
    assert eng.graphs.failed is None and len(eng.graphs.graphs) >= 4  # batches of 8, 4, 2 and 1 at least
    assert eng.metrics.fixed_steps.labels("cuda_graph")._value.get() > 10
    mtp_graphs = len(eng.speculator.graphs.graphs) if over else 0  # the MTP module's passes, captured too
    assert (mtp_graphs > 0) == bool(over)
    assert eng.metrics.cuda_graphs._value.get() == len(eng.graphs.graphs) + mtp_graphs
    if not over:  # (its decode steps would draft)
        _check_a_lone_long_prompt(eng, model)


def _models_dec(model):
    """What ``graphs_unsupported`` reads of a ``Decoder``: its config and model."""
    return SimpleNamespace(cfg=model.cfg, model=model)


def test_models_without_a_fixed_shape_step_are_named():
    """A plain MLA MoE model steps in fixed shapes; DSA's indexer, routed experts through a weight quantizer
    (FP4 QAT's) and an MoE that dispatches its experts to other ranks do not, each named, and ``StaticStep``
    refuses them."""
    torch.manual_seed(0)
    tiny = Transformer(preset("tiny")).eval()
    assert graphs_unsupported(_models_dec(tiny)) is None
    dsa = Transformer(preset("tiny", index_topk=8, index_n_heads=2, index_head_dim=32)).eval()
    quant, dispatched = copy.deepcopy(tiny), copy.deepcopy(tiny)
    for m in quant.modules():
        if isinstance(m, Experts):
            m.weight_quant = lambda w: w
    for m in dispatched.modules():
        if isinstance(m, MoE):
            m.fuse_local = False
    for model, reason in ((dsa, "DSA's indexer"), (quant, "routed experts of Experts"),
                          (dispatched, "dispatched to other ranks")):
        assert reason in graphs_unsupported(_models_dec(model))
        with pytest.raises(ValueError, match=f"fixed-shape steps: .*{reason}"):
            StaticStep(_models_dec(model), None, 4, 8, 16)


def test_budgets_count_the_padded_rows(monkeypatch):
    """A step's budgets count the rows of its bucket, padding included: 3 decoding rows (positions up to 15, 16
    slots) run as 4 rows, so ``GRAPH_MAX_ROW_SLOTS`` of 64 (row, slot) pairs and ``FLOPS_BUDGET`` of 4 rows'
    dense experts let the step run in fixed shapes, one less makes it eager (None)."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=64)).eval()
    cfg = model.cfg
    cache = make_paged_cache(cfg, cfg.n_layers, 16, 4, torch.float32)
    graphs = StepGraphs(Decoder(model, 1, cfg.max_seq_len, cache=cache), cache, 4, 8, cfg.max_seq_len, capture=False)
    rows, tables = [(1, 15, 0, 0), (2, 3, 1, 0), (3, 7, 2, 0)], [[1, 2, 3, 4], [5], [6, 7]]
    assert graphs.static.buckets(len(rows), 16) == (4, 4)
    per_row = graphs.static.dense_flops_per_row
    assert per_row > 0
    for name, at in (("GRAPH_MAX_ROW_SLOTS", 4 * 16), ("FLOPS_BUDGET", 4 * per_row)):
        monkeypatch.setattr(f"flyer.serve.graphs.{name}", at)
        assert graphs.step(rows, tables).shape == (3, 1, cfg.dim)
        monkeypatch.setattr(f"flyer.serve.graphs.{name}", at - 1)
        assert graphs.step(rows, tables) is None
        monkeypatch.undo()


def test_an_mtp_pass_at_the_last_position_covers_its_slot():
    """The MTP module's entry of position p sits in slot p + 1: a pass of a row at the model's last position
    (``max_seq_len`` - 1) attends over ``max_seq_len`` + 1 slots, which the step's slot bucket must cover."""
    cfg = preset("tiny", mtp_depth=1)
    model = Transformer(cfg).eval()
    cache, mtp_cache = (make_paged_cache(cfg, n, 64, 4, torch.float32) for n in (cfg.n_layers, 1))
    dec = Decoder(model, 1, cfg.max_seq_len, cache=cache, mtp_cache=mtp_cache, with_mtp=True)
    graphs = StepGraphs(dec, mtp_cache, 4, 8, cfg.max_seq_len, capture=False, mtp=True)
    rows, blocks = graphs.static.buckets(1, cfg.max_seq_len + 1)
    assert blocks * mtp_cache.block_size >= cfg.max_seq_len + 1
