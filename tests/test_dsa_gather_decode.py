"""DeepSeek Sparse Attention decode over gathered latents (``dsa_gathered``): each query reads and scores its
``index_topk`` selected slots only, [c | k_rope] gathered by slot from the contiguous or the paged cache, against
the masked path over every slot (``dsa_masked``, the oracle). Both are within ``mla_attention_bound`` (FP32 sums in
any order) of the exact attention over the same selection, for rows of different lengths (below and above
index_topk), with ties at the cut, and with the MTP cache's shifted slots; the gathered slots are exactly the
mask's. The decoder's logits gathered and masked agree within ``decode_tolerance`` on the tiny V3.2 and GLM-5 models
(shared layers reuse their full layer's slots, derived once per selection); greedy ``generate`` and the serving
engine give the same tokens. The tiny models' calls never pay for gathering by ``dsa_gather_pays`` (tested on
V3.2's shapes), so these tests switch the path by hand. Mutations (slots shifted by one, the top-k of the negated
scores) land far outside the bounds. FP32, CPU."""

from types import SimpleNamespace

import pytest
import torch
from bounds import mla_attention_bound

from flyer.config import preset
from flyer.infer import attention
from flyer.infer.attention import (Rows, causal_slot_mask, dsa_gathered, dsa_gathered_core, dsa_masked,
                                   dsa_gather_pays)
from flyer.infer.cache import LatentCache
from flyer.infer.decoder import Decoder
from flyer.infer.generate import GenerationConfig, generate
from flyer.interop.hf import load_hf
from flyer.model.attention import select_topk
from flyer.serve.paged import PagedCache, make_paged_cache
from tests.hf_models import VOCAB, build
from tests.test_deepseek_v32_decode import _alone, _engine, _run, _tokens, decode_tolerance, selection_margin
from tests.test_glm_moe_dsa import FULL, build_glm

TOPK = 8


@pytest.fixture(scope="module")
def v32(tmp_path_factory):
    path = tmp_path_factory.mktemp("v32-gather")
    build("v32", path)
    model = load_hf(path)[0]
    assert model.cfg.index_topk == TOPK
    return model


@pytest.fixture(scope="module")
def glm5(tmp_path_factory):
    path = tmp_path_factory.mktemp("glm5-gather")
    build_glm(path)
    model = load_hf(path)[0]
    assert [i for i, layer in enumerate(model.layers) if not layer.attn.shares_selection] == FULL
    return model


def _caches(cfg, B: int, n_slots: int, bs: int = 4) -> tuple[LatentCache, PagedCache]:
    """A contiguous cache and a paged one over shuffled blocks, each one layer of ``n_slots`` slots per row."""
    n = -(-n_slots // bs)
    paged = make_paged_cache(cfg, 1, 1 + B * n, bs, torch.float32)
    paged.tables = torch.randperm(B * n, generator=torch.Generator().manual_seed(1)).add(1).view(B, n)
    return LatentCache(1, B, n * bs, cfg.kv_lora_rank, cfg.qk_rope_head_dim, torch.float32), paged


def _selection_rows(ends: list[int], T: int, first: int, scores_BTS: torch.Tensor | None = None,
                    seed: int = 0) -> tuple[Rows, torch.Tensor]:
    """Rows of T new tokens per row ending at positions ``ends`` (in slots ``first`` past them) with a DSA
    selection of TOPK among integer scores in [0, 4) (ties at the cut, broken to the earliest slots, as
    ``select_topk`` breaks them), or ``scores_BTS``'s; and the scores."""
    pos = torch.tensor(ends).view(-1, 1) - T + torch.arange(T)
    slots = pos + first
    S = int(slots.max()) + 1
    mask = causal_slot_mask(slots, S, first)
    if scores_BTS is None:
        g = torch.Generator().manual_seed(seed)
        scores_BTS = torch.randint(0, 4, (len(ends), T, S - first), generator=g).float()
    selected = select_topk(scores_BTS, mask[:, 0, :, first:], TOPK).unsqueeze(1)
    return Rows(slots, None, None, S, mask, first, selected=selected), scores_BTS


def _queries(attn, B: int, T: int, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, attn.n_heads, attn.qk_nope_head_dim, generator=g),
            torch.randn(B, T, attn.n_heads, attn.qk_rope_head_dim, generator=g))


def _worst(got: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> float:
    """max |got - exact| / bound."""
    return float(((got.double() - exact).abs() / bound).max())


@pytest.mark.parametrize("first", [0, 1])
@pytest.mark.parametrize("T", [1, 3])
@torch.no_grad()
def test_gathered_and_masked_attention_are_within_the_fp32_bound(v32, T, first):
    """Rows ending at positions 5, 14 and 41 (the first sees fewer than index_topk slots: its empty slots
    masked), T new tokens each, ``first`` empty slots before position 0 (the server's MTP cache): over the
    contiguous cache and shuffled paged blocks, gathered and masked attention each lie within
    ``mla_attention_bound`` of the exact attention over the selected slots, which are exactly the mask's.
    Gathering the slots shifted by one, or the top-k of the negated scores, is far outside it."""
    attn = v32.layers[0].attn
    C, R = attn.kv_lora_rank, attn.qk_rope_head_dim
    ends = [5, 14, 41]
    B = len(ends)
    rows, scores = _selection_rows(ends, T, first)
    S = rows.n_slots
    slots_BTk, valid_BTk = rows.selected_slots(TOPK)
    picked = torch.zeros(B, T, S + 1, dtype=torch.bool).scatter_(-1, slots_BTk.where(valid_BTk, S), True)[..., :S]
    assert torch.equal(picked[..., first:], rows.selected[:, 0]) and not picked[..., :first].any()
    assert (valid_BTk.sum(-1) == rows.selected[:, 0].sum(-1)).all() and not valid_BTk[0].all()

    q_nope, q_rope = _queries(attn, B, T)
    kv = torch.randn(B, S + 1, C + R, generator=torch.Generator().manual_seed(3))  # slot S: past every row
    exact, bound = mla_attention_bound(attn, q_nope, q_rope, kv[:, first:S], rows.selected)
    negated = _selection_rows(ends, T, first, -scores)[0]
    for cache in _caches(v32.cfg, B, S + 1):
        cache.write(0, torch.arange(S + 1).expand(B, S + 1), latent=kv[..., :C], rope_key=kv[..., C:])
        assert torch.equal(cache.gather_packed(0, slots_BTk, torch.float32),
                           kv[torch.arange(B).view(-1, 1, 1), slots_BTk])  # the gather itself is exact
        gathered = dsa_gathered(attn, q_nope, q_rope, rows, cache, 0)
        masked = dsa_masked(attn, q_nope, q_rope, rows, cache, 0)
        assert _worst(gathered, exact, bound) <= 1 and _worst(masked, exact, bound) <= 1
        shifted = dsa_gathered_core(attn, q_nope, q_rope, cache.gather_packed(0, slots_BTk + 1, torch.float32),
                                    valid_BTk)
        assert _worst(shifted, exact, bound) > 1e3
        assert _worst(dsa_gathered(attn, q_nope, q_rope, negated, cache, 0), exact, bound) > 1e3


def _shape(name: str, **over) -> SimpleNamespace:
    """What ``dsa_gather_pays`` reads of an MLA layer, of preset ``name`` (no weights built)."""
    cfg = preset(name, **over)
    return SimpleNamespace(kv_lora_rank=cfg.kv_lora_rank, qk_rope_head_dim=cfg.qk_rope_head_dim, n_heads=cfg.n_heads,
                           qk_nope_head_dim=cfg.qk_nope_head_dim, v_head_dim=cfg.v_head_dim, index_topk=cfg.index_topk)


def test_dsa_gather_pays_by_its_cost_rule(v32):
    """``dsa_gather_pays``: V3.2's shape (index_topk 2048) gathers just past index_topk; smaller heads
    need longer contexts or more rows to pay for the gather's fixed cost (the tiny model: never at these
    lengths, so the tests below force it)."""
    bench = _shape("small", n_heads=16, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, kv_lora_rank=64,
                   index_topk=256)  # bench/decode.py's DSA model
    v32_shape, tiny = _shape("dsv32"), v32.layers[0].attn
    assert dsa_gather_pays(v32_shape, 1, 1, 2048 + 64) and not dsa_gather_pays(v32_shape, 1, 1, 2049)
    assert dsa_gather_pays(bench, 1, 1, 2048) and not dsa_gather_pays(bench, 1, 1, 1024)
    assert dsa_gather_pays(bench, 4, 1, 1024) and dsa_gather_pays(bench, 4, 2, 512)
    assert not dsa_gather_pays(tiny, 2, 1, 64) and dsa_gather_pays(tiny, 2, 1, 8192)
    # a prefill chunk over a short prompt keeps the compute-bound masked form; over a long one it gathers
    # (tests/test_dsa_gather_prefill.py holds the crossovers)
    assert not dsa_gather_pays(v32_shape, 1, 1024, 8192) and dsa_gather_pays(v32_shape, 1, 1024, 65536)


def _gather(monkeypatch, on: bool) -> None:
    """Every DSA call with a selection gathered (``dsa_gathered``) or masked (``dsa_masked``), whatever its size."""
    monkeypatch.setattr(attention, "dsa_gather_pays", lambda *args: on)


class _Spy:
    """Counts calls to ``attention.<name>`` (monkeypatched), passing them on."""

    def __init__(self, monkeypatch, name: str):
        self.n, orig = 0, getattr(attention, name)

        def spy(*args, **kw):
            self.n += 1
            return orig(*args, **kw)
        monkeypatch.setattr(attention, name, spy)


def _decode_logits(model, prompts: list[list[int]], steps: list[list[int]]) -> torch.Tensor:
    """Logits (B, 1 + len(steps), V) of a batched prefill of ``prompts`` (different lengths: right-padded)
    then one token per row per step at each row's own position."""
    B, P = len(prompts), max(map(len, prompts))
    dec = Decoder(model, B, P + len(steps) + 1, "absorbed", torch.float32)
    tokens = torch.tensor([p + [0] * (P - len(p)) for p in prompts])
    lengths = [len(p) for p in prompts]
    h = dec.forward(tokens, torch.zeros(B, dtype=torch.long), lengths)
    out = [dec.logits(h)[torch.arange(B), torch.tensor(lengths) - 1].unsqueeze(1)]
    for i, step in enumerate(steps):
        start = torch.tensor(lengths) + i
        out.append(dec.logits(dec.forward(torch.tensor(step).view(B, 1), start)))
    return torch.cat(out, 1)


def _compare_decode(model, monkeypatch, n_steps: int, full_per_step: int) -> None:
    """Gathered and masked decoding of rows with prompts of 3 and 20 tokens (one below index_topk for the first
    steps, one above): logits within ``decode_tolerance``; the gathered run gathered in every layer and derived
    the slots once per full layer's selection; slots shifted by one are far outside."""
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (3, 20)]
    steps = torch.randint(3, VOCAB, (n_steps, 2), generator=g).tolist()
    gathered, picks = _Spy(monkeypatch, "dsa_gathered"), _Spy(monkeypatch, "entry_picks")
    _gather(monkeypatch, True)
    got = _decode_logits(model, prompts, steps)
    L = model.cfg.n_layers
    calls = n_steps + 1  # the prefill (20 slots) too
    assert gathered.n == L * calls and picks.n == full_per_step * calls
    _gather(monkeypatch, False)
    want = _decode_logits(model, prompts, steps)
    assert gathered.n == L * calls
    _gather(monkeypatch, True)
    tol = decode_tolerance(model.cfg, 20 + n_steps)
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= tol, f"{err:.3g} > {tol:.3g}"
    orig = Rows.selected_slots
    monkeypatch.setattr(Rows, "selected_slots", lambda self, k: (orig(self, k)[0] + 1, orig(self, k)[1]))
    wrong = _decode_logits(model, prompts, steps)
    assert float((wrong - want).abs().max() / want.abs().max()) > 100 * tol


def test_v32_decoder_logits_gathered_equal_masked(v32, monkeypatch):
    _compare_decode(v32, monkeypatch, 16, v32.cfg.n_layers)


def test_glm5_shared_layers_reuse_the_full_layers_slots(glm5, monkeypatch):
    _compare_decode(glm5, monkeypatch, 16, len(FULL))


@pytest.mark.parametrize("family", ["v32", "glm5"])
def test_greedy_generate_gathered_equals_masked(family, request, monkeypatch):
    """Prompts of 5 and 13 tokens batched, 24 new tokens each (past index_topk): greedy ``generate`` (what
    ``flyer generate`` runs) gives the same tokens gathered as masked, on selections without near-ties."""
    model = request.getfixturevalue(family)
    prompts = [_tokens(13, 5)[0, :5].tolist(), _tokens(13, 5)[1].tolist()]  # the V3.2 and GLM-5 tests' prompts
    gen = GenerationConfig(max_new_tokens=24, cache_dtype=torch.float32, eos_id=None)
    gathered = _Spy(monkeypatch, "dsa_gathered")
    _gather(monkeypatch, True)
    got = generate(model, prompts, gen).tokens
    assert gathered.n > 0
    assert min(selection_margin(model, p + w) for p, w in zip(prompts, got)) > 1e-4
    _gather(monkeypatch, False)
    assert generate(model, prompts, gen).tokens == got


def test_engine_gathers_from_paged_blocks_as_generate(v32, monkeypatch):
    """The serving engine (paged cache, chunked prefill, prompts of 1 to 15 tokens: rows seeing fewer than
    index_topk slots beside rows past it) gathers each decoding row's slots through its block table, and each
    request's greedy tokens are ``generate``'s on its prompt alone, gathered and masked."""
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (15, 1, 9, 4)]
    gathers = []
    orig = PagedCache.gather_packed
    monkeypatch.setattr(PagedCache, "gather_packed", lambda self, *a: gathers.append(1) or orig(self, *a))
    _gather(monkeypatch, True)
    got = _run(_engine(v32, blocks=64, prefill_chunk=8), prompts, 20)
    assert gathers
    assert min(selection_margin(v32, p + w) for p, w in zip(prompts, got)) > 1e-4
    assert got == _alone(v32, prompts, 20)
    _gather(monkeypatch, False)
    assert got == _alone(v32, prompts, 20)
