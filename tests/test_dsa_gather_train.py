"""DeepSeek Sparse Attention's training / prefill path in query chunks over gathered picks
(``flyer.model.dsa_chunks``) against the masked form (``MLA.forward(gather=False)``: the whole sequence's
(B, 1, T, T) selection mask over dense attention, the oracle): the per-chunk selection is the whole sequence's
exactly, ties at the cut included; the output and the gradients of the input and every trainable parameter are
within a derived FP32 rounding bound for chunk sizes below, not dividing, and above T, the indexer frozen; under
autograd the saved state is linear in T; a V3.2-shaped tiny model and a GLM-5 one (shared layers reusing the
full layer's picks) give the masked model's logits and gradients; wrong picks (one key off) or a shared layer
handed another layer's picks land far outside the bound. Tiny MLA (4 heads, nope 32, rope 16, v 32, latent 32),
index_topk 8, FP32, CPU."""

import math

import pytest
import torch

import flyer.model.attention as attention
import flyer.model.dsa_chunks as dsa_chunks
from flyer.config import preset
from flyer.model.attention import MLA, Selection, select_topk
from flyer.model.dsa_chunks import chunk_plan, dsa_gathers, select_chunks
from flyer.model.hybrid_chunks import entry_picks
from flyer.model.transformer import Transformer, layer_rope_tables
from tests.bounds import FP32_U
from tests.test_deepseek_v32_decode import decode_tolerance
from flyer.parallel.memory import saved_bytes

TOPK = 8
CFG = preset("tiny", index_topk=TOPK, index_n_heads=4, index_head_dim=32, vocab_size=256)
T = 100  # past dsa_gathers' 32 (4 x 8 picks of 80 multiply-adds per head against 80 per key)
CHUNKS = [1, 7, 16, 37, 99, 100, 128]  # one row, not dividing T, one short of T, T, above T (one chunk)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b|."""
    return float((a.detach().double() - b.double()).abs().max() / b.double().abs().max())


def _layer(seed: int = 0) -> MLA:
    """Layer 1 of ``CFG`` with random weights of unit-scale outputs, norms' weights and biases not 1 / 0."""
    layer = MLA(CFG, 1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            z = torch.randn(p.shape, generator=g)
            p.copy_(z / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.1 * z if name.endswith("bias") else 1 + 0.2 * z)
    return layer


def _tables(T: int):
    return layer_rope_tables(CFG, [1], T, "cpu")[0]


def _input(T: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, T, CFG.dim, generator=torch.Generator().manual_seed(seed))


def _outputs(layer: MLA, T: int, chunk: int | None, gather: bool, grad: bool, selection: Selection | None = None):
    """(output, the input's gradient, {trainable parameter: gradient}) of sum(output * w), w fixed random."""
    x = _input(T).requires_grad_(grad)
    for p in layer.parameters():
        p.grad = None
    with torch.set_grad_enabled(grad):
        out = layer(x, *_tables(T), selection, gather=gather, chunk=chunk)
    if not grad:
        return out, None, None
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}


def layer_tolerance(layer: MLA, T: int) -> tuple[float, float]:
    """(output bound, gradient bound) on max|gathered - masked| / max|masked| of one layer, to first order. Both
    compute the queries and latents by the same ops on the same tensors (bitwise alike) and differ only in
    attention: masked scores q_nope . (W_UK c) + q_rope . k_rope, gathered (q_nope W_UK) . c + q_rope . k_rope, each
    within (nope + C + R) u A of exact (A: the score's absolute terms, scaled: measured here, the largest over
    every query, head and key), moving each probability by 2 (nope + C + R) u A of itself; the outputs sum over at
    most T keys and C (W_UV), and ``wo`` over H v: (T + C + v + H v + 8) u more. Two evaluations: twice that. The
    gradients repeat the forward's sums and add those over the H T (query, head) pairs a key meets and the B T
    tokens of a weight's gradient, with the probabilities' error twice (P and dS)."""
    u, H, nope, R, C, v = FP32_U, layer.n_heads, layer.qk_nope_head_dim, layer.qk_rope_head_dim, \
        layer.kv_lora_rank, layer.v_head_dim
    with torch.no_grad():
        x = _input(T).double()
        cos, sin = (t.double() for t in _tables(T))
        layer_d = _layer().double()
        q_nope, q_rope = layer_d.queries(x, cos, sin)
        c, kr = layer_d.latents(x, cos, sin)
        w = layer_d.wkv_b.weight.view(H, nope + v, C)[:, :nope]
        A = layer.softmax_scale * float((torch.einsum("bthn,hnc,bsc->bhts", q_nope.abs(), w.abs(), c.abs())
                                         + torch.einsum("bthr,bsr->bhts", q_rope.abs(), kr.abs())).amax())
    n = nope + C + R
    forward = 2 * (2 * n * u * A + (T + C + v + H * v + 8) * u)
    grads = 2 * (4 * n * u * A + (T + C + v + H * v + H * T + 2 * T + 8) * u)
    return forward, grads


def test_gather_rule_is_the_cost_count():
    """``dsa_gathers``: past GATHER_OVER x index_topk x (2 C + R) / (nope + R + v) queries, 32 for this layer;
    under autograd past GATHER_OVER_TRAINING x the same, 80."""
    layer = _layer()
    assert [dsa_gathers(layer, n) for n in (8, 32, 33, 4096)] == [False, False, True, True]
    assert [dsa_gathers(layer, n, True) for n in (33, 80, 81, 4096)] == [False, False, True, True]


def _picked(layer: MLA, T: int, chunk: int) -> torch.Tensor:
    """Bool (B, T, T): the keys each query attends to, from ``select_chunks``' picks with ``chunk`` rows."""
    x = _input(T)
    with torch.no_grad():
        chunks = select_chunks(layer, x, layer.query_latent(x), *_tables(T), chunk)
    out = torch.zeros(2, T, T + 1, dtype=torch.bool)
    for s, v in zip(chunks.plan, chunks.visible, strict=True):
        assert v.picks.shape == (2, s.stop - s.start, TOPK) and v.band.numel() == 0 and s.n_entries == s.stop
        out[:, s.start:s.stop].scatter_(-1, v.picks.long().masked_fill(v.picks < 0, T), True)  # -1: the spare column
    return out[..., :T]


@pytest.mark.parametrize("ties", [False, True])
def test_selection_per_chunk_is_the_whole_sequence_mask(ties, monkeypatch):
    """The picks of every chunk size are, as bools, ``sparse_mask``'s (the whole sequence's select), min(k, t + 1)
    per query, the indexer scoring one chunk's rows against the keys they may see. ``ties``: the index scores
    rounded to integers, so many queries tie at the cut; the earliest tied keys are kept whatever the chunk, and a
    latest-first rule would choose otherwise, so the ties decide something."""
    layer = _layer()
    if ties:
        exact = layer.indexer.scores
        monkeypatch.setattr(layer.indexer, "scores", lambda *a: exact(*a).round())
    x = _input(T)
    with torch.no_grad():
        want = layer.sparse_mask(x, layer.query_latent(x), *_tables(T)).squeeze(1)
    assert (want.sum(-1) == (torch.arange(T) + 1).clamp(max=TOPK)).all()
    shapes = []
    scores = layer.indexer.scores
    monkeypatch.setattr(layer.indexer, "scores", lambda x, *a: shapes.append(x.shape[1]) or scores(x, *a))
    for chunk in CHUNKS:
        shapes.clear()
        assert torch.equal(_picked(layer, T, chunk), want), f"chunk {chunk}"
        assert max(shapes) <= chunk
    if ties:
        with torch.no_grad():
            s = layer.indexer.scores(x, layer.query_latent(x), layer.indexer.keys(x, *_tables(T)), *_tables(T))
        causal = torch.ones(T, T, dtype=torch.bool).tril().expand(2, T, T)
        ranked = s.masked_fill(~causal, float("-inf")).sort(-1, descending=True).values
        assert int(((ranked[..., TOPK - 1] == ranked[..., TOPK]) & (causal.sum(-1) > TOPK)).sum()) > 20
        latest = select_topk(s.flip(-1), causal.flip(-1), TOPK).flip(-1)
        assert not torch.equal(latest, want)


def test_gathered_forward_equals_masked():
    """Without gradient every chunk size is within ``layer_tolerance`` of the masked form; the indexer keys once."""
    layer = _layer()
    tol, _ = layer_tolerance(layer, T)
    want, _, _ = _outputs(layer, T, None, gather=False, grad=False)
    for chunk in CHUNKS:
        err = rel(_outputs(layer, T, chunk, gather=True, grad=False)[0], want)
        assert err <= tol, f"chunk {chunk}: {err:.3g} > {tol:.3g}"


def test_gathered_gradients_equal_masked():
    """Under autograd (several chunks: recomputed in backward, ``_Recompute``; one: plain autograd) the output, the
    input's gradient and every trainable parameter's (queries, latents, ``wkv_b`` through the absorbed products,
    ``wo``) within ``layer_tolerance``; the frozen indexer gets none."""
    layer = _layer()
    tol, gtol = layer_tolerance(layer, T)
    want, gx_want, gp_want = _outputs(layer, T, None, gather=False, grad=True)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert gp_want.keys() == trainable and not any(n.startswith("indexer.") for n in trainable)
    for chunk in (7, 37, 128):
        got, gx, gp = _outputs(layer, T, chunk, gather=True, grad=True)
        assert rel(got, want) <= tol
        assert rel(gx, gx_want) <= gtol, f"chunk {chunk}: input gradient"
        assert gp.keys() == trainable
        for name, g in gp.items():
            err = rel(g, gp_want[name])
            assert err <= gtol, f"chunk {chunk}, {name}: {err:.3g} > {gtol:.3g}"


def _one_off(selected, k):
    """The picks one key later (the last wraps to key 0): wrong keys, still causal-looking."""
    return entry_picks(selected.roll(1, dims=-1), k)


def test_wrong_picks_land_far_outside_the_tolerance(monkeypatch):
    """Gathering each query's keys one off, or the empty slots of the first queries counted as key 0, moves the
    output by over 100 times ``layer_tolerance``."""
    layer = _layer()
    tol, _ = layer_tolerance(layer, T)
    want, _, _ = _outputs(layer, T, None, gather=False, grad=False)
    for name, wrong in (("one off", _one_off), ("empty slots count", lambda s, k: entry_picks(s, k).clamp(min=0))):
        with monkeypatch.context() as m:
            m.setattr(dsa_chunks, "entry_picks", wrong)
            err = rel(_outputs(layer, T, 16, gather=True, grad=False)[0], want)
        assert err > 100 * tol, f"{name}: {err:.3g}"


def test_saved_state_is_linear_in_t():
    """Under autograd with chunks of 16 the layer saves O(T (H d + C + k)) bytes: doubling T from 512 to 1024 at most
    doubles them, while the masked form's grow faster than linearly and hold at least the (B, 1, T, T) mask more."""
    layer = _layer()

    def saved(T, gather):
        x = _input(T).requires_grad_(True)
        return saved_bytes(lambda: layer(x, *_tables(T), gather=gather, chunk=16))

    assert saved(1024, True) <= 2 * saved(512, True)
    assert saved(1024, False) > 2.2 * saved(512, False)
    assert saved(1024, False) - saved(1024, True) > 2 * 1024 * 1024


def _model(indexer_types=(), seed: int = 0) -> Transformer:
    cfg = CFG.replace(n_layers=4, indexer_types=indexer_types, mtp_depth=0)
    torch.manual_seed(seed)
    return Transformer(cfg)


def _model_outputs(model: Transformer, tokens: torch.Tensor, gather: bool, monkeypatch, chunk: int = 16):
    """(logits, {trainable parameter: gradient of the mean logit square}) with every DSA layer gathering in chunks
    of ``chunk`` rows, or (``gather`` False) masked."""
    for p in model.parameters():
        p.grad = None
    with monkeypatch.context() as m:
        m.setattr(dsa_chunks, "query_chunk", lambda *a, **k: chunk)
        if not gather:
            m.setattr(attention, "dsa_gathers", lambda attn, T, training=False: False)
        logits = model(tokens)
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("types", [(), ("full", "shared", "full", "shared")], ids=["v32", "glm5"])
def test_models_gathered_equal_masked(types, monkeypatch):
    """A V3.2-shaped tiny model and a GLM-5 one (layers 1 and 3 shared: they attend to the picks layers 0 and 2
    hand on) on 2 x 100 tokens: logits within ``decode_tolerance`` (the absorbed order of each layer's sums against
    the dense one's) and every trainable parameter's gradient within twice that plus the 2 B T u of a weight
    gradient's sum over the tokens; the shared layers were handed picks, not masks."""
    model = _model(types)
    tokens = torch.randint(0, CFG.vocab_size, (2, T), generator=torch.Generator().manual_seed(3))
    handed = []
    if types:
        shared = model.layers[1].attn
        orig = shared.forward
        monkeypatch.setattr(shared, "forward", lambda x, cos, sin, sel: handed.append(
            (sel.mask, sel.chunks)) or orig(x, cos, sin, sel))
    want, g_want = _model_outputs(model, tokens, False, monkeypatch)
    got, g = _model_outputs(model, tokens, True, monkeypatch)
    tol = decode_tolerance(model.cfg, T)
    assert rel(got, want) <= tol
    assert g.keys() == g_want.keys()
    gtol = 2 * tol + 2 * 2 * T * FP32_U
    for name, grad in g.items():
        assert rel(grad, g_want[name]) <= gtol, name
    if types:
        (m_mask, m_chunks), (g_mask, g_chunks) = handed[:2]
        assert m_mask is not None and m_chunks is None and g_mask is None
        assert len(g_chunks.plan) == math.ceil(T / 16)


def test_shared_layer_with_another_layers_picks_lands_far_outside(monkeypatch):
    """GLM-5 with layer 2 not handing on its picks (layer 3 reuses layer 0's) is far outside ``decode_tolerance``."""
    model = _model(("full", "shared", "full", "shared"))
    tokens = torch.randint(0, CFG.vocab_size, (2, T), generator=torch.Generator().manual_seed(3))
    want, _ = _model_outputs(model, tokens, True, monkeypatch)
    layer2 = model.layers[2].attn
    orig = layer2.forward
    monkeypatch.setattr(layer2, "forward", lambda x, cos, sin, sel: orig(x, cos, sin))
    got, _ = _model_outputs(model, tokens, True, monkeypatch)
    assert rel(got, want) > 100 * decode_tolerance(model.cfg, T)


def test_chunk_plan_rows_and_errors():
    """``chunk_plan``: chunks of the given rows (the last shorter), each seeing the keys up to its last query; the
    default is ``query_chunk``'s 128 rows at these shapes; a chunk below 1 is refused naming ``chunk``."""
    layer = _layer()
    plan = chunk_plan(2, T, layer, 37)
    assert [(s.start, s.stop, s.n_entries, s.n_keys) for s in plan] == [(0, 37, 37, 0), (37, 74, 74, 0),
                                                                         (74, 100, 100, 0)]
    assert len(chunk_plan(1, 4096, layer)) == 4096 // 128
    with pytest.raises(ValueError, match="chunk"):
        chunk_plan(2, T, layer, 0)
