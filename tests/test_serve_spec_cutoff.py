"""``EngineConfig(speculative_max_batch=N)`` (``flyer serve --speculative-max-batch N``): a step with more than N
decoding rows drafts for none of them (``MtpSpeculator.begin_step``), and their rows' MTP entries are written a
block's worth at a time (``MtpSpeculator.bound_pending``). Requests finishing at different lengths put the batch
over N for the first part of a run and at or under N for the rest; for the counting MLA model with MTP
(``tests/trained.py``) and tiny-v4 trained a few steps (``tests/test_v4_speculative.py``; 2 drafts: rejections roll
back):

- each request's greedy tokens equal plain greedy ``generate`` alone and the engine's without speculation;
- the steps over N verify no draft, those at or under N do, and the metric counts the steps over N;
- the first-draft MTP logits at every position the cutoff run drafts from (the first drafts after the period
  without drafts among them) are those of a run that drafts at every position (its drafts all rejected, so it
  advances one token a step), within the tolerance below; a catch-up that skips the period's positions (the
  mutation) lands far outside it;
- a row's pending hidden states (``h_prev``) stay under a block and the drafts over a long period without drafts,
  and its blocks are registered for sharing within a block of its tokens (without the bound, the mutation: neither);
- a cutoff below 1, or without speculation, is refused in one line naming the field, and the flag at the CLI
  (exit 2).

Tolerance: tokens exactly (the engine's batches compute plain decoding's sums in other orders; a greedy token
differs only where two logits lie within that difference: ``tests/test_serve_v4_speculative.py``). The draft
logits: ``rel`` (max error over max logit) within the FP32 bound of the main model and the MTP block as one more
layer over the longest request, ``logit_tolerance`` (MLA) and ``v4_tolerance`` (V4), as
``tests/test_serve_v4_share_spec.py`` derives it: the MTP entries are the same sums, written in chunks of a block
instead of one a step."""

from dataclasses import replace

import pytest
import torch

from flyer.cli import main as flyer_main
from flyer.errors import FieldError
from flyer.infer.generate import GenerationConfig, generate
from flyer.infer.hybrid_cache import HybridCache
from flyer.infer.speculative import accept_drafts
from flyer.serve import speculation
from flyer.serve.engine import Engine, EngineConfig, SamplingOptions
from flyer.serve.paged_hybrid import make_mtp_hybrid_cache
from flyer.serve.speculation import MtpSpeculator
from tests.test_deepseek_v4 import v4_tolerance
from tests.test_qwen3 import rel
from tests.test_rope_scaling import logit_tolerance
from tests.test_serve_engine import V, _engine, _progression
from tests.test_v4_speculative import PATTERN, pattern_trained
from tests.trained import counting_model

N = 2  # the cutoff: 5 requests decode together at first, 2 at the end
V4_BS = 16  # the least block size tiny-v4's ratios 4 and 16 divide

# (prompt, max_tokens): five requests ending at different lengths (the batch goes 5, 4, 3, 2, 1 rows)
MLA_PROMPTS = [(_progression(3, 2, 13), 34), (_progression(7, 1, 6), 8), (_progression(5, 3, 9), 12),
               (_progression(11, 2, 5), 16), (_progression(2, 5, 20), 26)]


def _random(n: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# the pattern (drafts mostly kept) and random tokens (mostly rejected), across blocks of 16
V4_PROMPTS = [((PATTERN * 6)[:13], 44), (_random(9, 1), 10), ((PATTERN * 6)[3:20], 14), (_random(21, 2), 18),
              ((PATTERN * 6)[5:30], 30)]


@pytest.fixture(scope="module")
def models():
    return {"mla": counting_model(V), "v4": pattern_trained()}


def _v4_engine(model, **over) -> Engine:
    probe = HybridCache.paged(model.cfg, 1, 1, V4_BS, torch.float32, "meta")
    slot = probe.window_bytes() + make_mtp_hybrid_cache(model.cfg, 1, torch.float32, "meta").window_bytes()
    return Engine(model, EngineConfig(kv_cache_bytes=5 * slot + 60 * probe.block_bytes(), block_size=V4_BS,
                                      max_batch_size=5, cache_dtype=torch.float32, **over))


def _make(kind: str, model, **over) -> Engine:
    return _engine(model, blocks=96, **over) if kind == "mla" else _v4_engine(model, **over)


def _prompts(kind: str):
    return MLA_PROMPTS if kind == "mla" else V4_PROMPTS


def _steps(eng: Engine, prompts, check=None) -> list[list[int]]:
    """Each request's tokens, all submitted at once; ``check(eng, rows, drafted)`` after each step hears the
    decoding rows it began with and the drafts it verified."""
    outs = [[] for _ in prompts]
    for i, (p, n) in enumerate(prompts):
        eng.submit(p, SamplingOptions(max_tokens=n), lambda e, i=i: outs[i].append(e.token))
    while eng.busy:
        eng.admit()  # the step's rows (step admits again: nothing new)
        rows = [r for r in eng.running if len(r.tokens) - r.n_cached == 1]
        before = eng.drafted
        eng.step()
        if check:
            check(eng, rows, eng.drafted - before)
    return outs


@pytest.mark.parametrize("kind, K", [("mla", 1), ("mla", 2), ("v4", 2)])
def test_steps_over_the_cutoff_draft_none_and_keep_greedy_tokens(models, kind, K):
    model, prompts = models[kind], _prompts(kind)
    alone = [generate(model, [p], GenerationConfig(max_new_tokens=n, cache_dtype=torch.float32)).tokens[0]
             for p, n in prompts]
    plain = _steps(_make(kind, model), prompts)
    over, under = [], []

    def check(eng, rows, drafted):
        if len(rows) > N:
            over.append(drafted)
        elif any(r.n_cached > 0 and r.opts.max_tokens - r.generated > 1 for r in rows):  # a row with drafts to make
            under.append(drafted)
    eng = _make(kind, model, speculative="mtp", draft_tokens=K, speculative_max_batch=N)
    got = _steps(eng, prompts, check)
    print(f"{kind} K={K}: {len(over)} steps over {N} rows, {len(under)} at or under; accepted {eng.accepted} of "
          f"{eng.drafted} drafts")
    assert got == alone == plain
    assert len(over) >= 8 and not any(over)
    assert len(under) >= 4 and all(under)
    assert eng.metrics.spec_off_steps._value.get() == eng.speculator.off_steps == len(over)
    assert f"\nflyer_spec_off_steps_total {float(len(over))}\n" in eng.metrics.render().decode()  # /metrics' text
    assert 0 < eng.accepted and eng.alloc.used == 0


def _record_first_drafts(eng: Engine) -> dict[tuple[int, int], torch.Tensor]:
    """(request id, position of its pending token) -> the MTP logits (V,) of its first draft there."""
    first, drafting = {}, []
    draft, mtp_logits = eng.speculator.draft, eng.dec.mtp_logits

    def drafting_rows(rows, ks):
        drafting[:] = [[(r.id, r.n_cached) for r in rows]]
        return draft(rows, ks)

    def first_logits(h1):
        out = mtp_logits(h1)
        for key, row in zip(drafting.pop() if drafting else (), out):  # a draft's first call: every drafting row
            first[key] = row
        return out
    eng.speculator.draft, eng.dec.mtp_logits = drafting_rows, first_logits
    return first


def _keep_no_draft(p, q, drafts, params, generator):
    """``accept_drafts`` that rejects every draft (the target's token at the pending position alone)."""
    return accept_drafts(p[:1], None if q is None else q[:0], [], params, generator)


def _skip_off_positions(self, rows):
    """Mutation of ``bound_pending``: the held positions' MTP entries are never written (h_prev still bounded)."""
    due = [r for r in rows if r.h_prev is not None and r.h_prev.shape[0] >= self.pending_limit]
    for r in due:
        r.h_prev, r.mtp_len = r.h_prev[-1:], r.n_cached - 1
    return due


def _tolerance(kind: str, cfg) -> float:
    T = max(len(p) + n for p, n in _prompts(kind))
    if kind == "mla":
        return logit_tolerance(replace(cfg, n_layers=cfg.n_layers + 1), T)
    return v4_tolerance(replace(cfg, n_layers=cfg.n_layers + 1, compress_ratios=(*cfg.compress_ratios, 0)), T)


@pytest.mark.parametrize("kind", ["mla", "v4"])
def test_first_drafts_after_the_cutoff_equal_drafting_every_step(models, kind, monkeypatch):
    model, prompts = models[kind], _prompts(kind)
    with monkeypatch.context() as m:  # the reference drafts at every position of every request
        m.setattr(speculation, "accept_drafts", _keep_no_draft)
        ref_eng = _make(kind, model, speculative="mtp")
        want = _record_first_drafts(ref_eng)
        _steps(ref_eng, prompts)
    tol = _tolerance(kind, model.cfg)
    errors = {}
    for mutated in (False, True):
        with monkeypatch.context() as m:
            if mutated:
                m.setattr(MtpSpeculator, "bound_pending", _skip_off_positions)
            eng = _make(kind, model, speculative="mtp", speculative_max_batch=N)
            got = _record_first_drafts(eng)
            ended_off = {}  # request id -> its position when the last step without drafts ended

            def check(eng, rows, drafted):
                if len(rows) > N:
                    ended_off.update({r.id: r.n_cached for r in rows if r in eng.running})
            _steps(eng, prompts, check)
        assert set(got) <= set(want)
        after = [min(k for k in got if k[0] == i and k[1] >= at) for i, at in ended_off.items()
                 if any(k[0] == i and k[1] >= at for k in got)]  # each request's first draft after the period
        assert len(after) >= 2 and all(at > len(prompts[i][0]) + 4 for i, at in after)
        errors[mutated] = (max(rel(got[k], want[k]) for k in got), min(rel(got[k], want[k]) for k in after))
    print(f"{kind}: draft logits' largest error {errors[False][0]:.1e} (tolerance {tol:.1e}); mutation's first "
          f"drafts after the period: smallest error {errors[True][1]:.1e}")
    assert errors[False][0] <= tol
    assert errors[True][1] > 10 * tol


@pytest.mark.parametrize("kind", ["mla", "v4"])
@pytest.mark.parametrize("bounded", [True, False])
def test_pending_hidden_states_stay_within_a_block(models, kind, bounded):
    """Cutoff 1, three requests of 60 tokens and 2 drafts: steps of three rows draft none, the last row drafts."""
    model, K = models[kind], 2
    eng = _make(kind, model, speculative="mtp", draft_tokens=K, speculative_max_batch=1)
    if not bounded:  # the mutation: pending hidden states never written before the next draft
        eng.speculator.pending_limit = 1 << 30
    bs = eng.cfg.block_size
    most, lag = [0], [0]

    def check(eng, rows, drafted):
        for r in eng.running:
            most[0] = max(most[0], 0 if r.h_prev is None else r.h_prev.shape[0])
            lag[0] = max(lag[0], r.n_cached // bs - len(r.keys))  # full blocks not yet registered
    prompts = [(p, 60) for p, _ in _prompts(kind)[:3]]
    _steps(eng, prompts, check)
    print(f"{kind}, bounded={bounded}: h_prev held up to {most[0]} positions, registration lagged {lag[0]} blocks")
    assert (most[0] <= bs + K and lag[0] <= 1) == bounded
    assert eng.speculator.off_steps >= 40 and eng.alloc.used == 0


def test_a_bad_cutoff_is_refused_naming_the_field(capsys):
    with pytest.raises(FieldError, match="^speculative_max_batch: must be >= 1 \\(got 0\\)$"):
        EngineConfig(speculative="mtp", speculative_max_batch=0).validate()
    with pytest.raises(FieldError, match="^speculative_max_batch: needs speculative decoding"):
        EngineConfig(speculative_max_batch=4).validate()
    for flags in (["--speculative-max-batch", "4"], ["--speculative", "mtp", "--speculative-max-batch", "-3"]):
        assert flyer_main(["serve", "--preset", "tiny", "--port", "0", *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("flyer: error: --speculative-max-batch: "), err
