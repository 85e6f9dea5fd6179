"""DeepSeek-V4's hybrid attention (``flyer.model.hybrid``) against transformers' ``DeepseekV4Attention`` (no cache,
eager attention, its sliding-window causal mask), for each layer kind: sliding window only, CSA (overlapping
windows, the indexer keeping 4 entries per query) and HCA (every complete entry). The parameters carry DeepSeek's
checkpoint names (transformers' own renaming maps them onto its modules one to one); random weights with nonzero
sinks and gate biases; the outputs agree within a derived FP32 rounding bound, and plausible mistakes (no sinks,
no output un-rotation, the window off by one, CSA without overlap, the indexer ignored, the wrong RoPE base) land
far outside it. Tiny model (64 channels, 4 heads of 32, window 8, CSA 4 / HCA 16 on 62 tokens), FP32, CPU."""

import math

import pytest
import torch
from transformers import DeepseekV4Config
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming, apply_renamings
from transformers.masking_utils import create_sliding_window_causal_mask
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Attention, DeepseekV4RotaryEmbedding

from flyer.config import ModelConfig
from flyer.model.hybrid import HybridAttention, hybrid_rope_config, select_topk
from flyer.model.init import deferred_init
from flyer.model.rope import rope_cos_sin
from tests.bounds import FP32_U

WINDOW, CSA, HCA, TOPK, ROPE = 8, 4, 16, 4, 8
LAYER = {"window": 0, "csa": 1, "hca": 2}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1}
T_LONG = 62  # not a multiple of 4 or 16: the last, incomplete window makes no entry

HF = DeepseekV4Config(
    hidden_size=64, num_attention_heads=4, head_dim=32, qk_rope_head_dim=ROPE, q_lora_rank=32, o_groups=2,
    o_lora_rank=16, sliding_window=WINDOW, index_topk=TOPK, index_n_heads=8, index_head_dim=16,
    compress_rates={"compressed_sparse_attention": CSA, "heavily_compressed_attention": HCA},
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
    num_hidden_layers=3, vocab_size=128, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    rope_theta=1e4, compress_rope_theta=16e4, rope_parameters=dict(YARN), max_position_embeddings=64,
    rms_norm_eps=1e-5)
HF._attn_implementation = "eager"
CFG = ModelConfig(
    vocab_size=128, dim=64, n_layers=3, n_dense_layers=0, attn="hybrid", n_heads=4, head_dim=32,
    qk_rope_head_dim=ROPE, q_lora_rank=32, window_size=WINDOW, compress_ratios=(0, CSA, HCA), csa_ratio=CSA,
    o_groups=2, o_lora_rank=16, index_topk=TOPK, index_n_heads=8, index_head_dim=16, rope_theta=1e4,
    compress_rope_theta=16e4, rope_type="yarn", rope_factor=4.0, original_seq_len=16, beta_fast=32, beta_slow=1,
    max_seq_len=64, norm_eps=1e-5, mtp_depth=0, moe_inter_dim=32, n_routed_experts=4, n_activated_experts=2,
    n_expert_groups=1, n_limited_groups=1)
RENAMES = [t for t in get_checkpoint_conversion_mapping("deepseek_v4") if isinstance(t, WeightRenaming)]


def hf_name(layer: int, native: str) -> str:
    """transformers' name (under ``self_attn``) of the checkpoint tensor ``layers.{layer}.attn.{native}``, by
    transformers' own renaming of DeepSeek's checkpoints."""
    key, prefix = apply_renamings(f"layers.{layer}.attn.{native}", RENAMES), f"layers.{layer}.self_attn."
    assert key.startswith(prefix), key
    return key[len(prefix):]


def _pair(layer: int, seed: int = 0) -> tuple[DeepseekV4Attention, HybridAttention]:
    """transformers' layer and flyer's with the same random weights: matrices N(0, 1/fan_in), norm weights
    1 + N(0, 0.2^2), gate biases N(0, 1) and sinks 2 + N(0, 1) (about the log of a window's softmax mass, so
    they take a good share of it)."""
    g = torch.Generator().manual_seed(seed)
    ref, mine = DeepseekV4Attention(HF, layer).eval(), HybridAttention(CFG, layer)
    theirs = dict(ref.named_parameters())
    with torch.no_grad():
        for name, p in mine.named_parameters():
            z = torch.randn(p.shape, generator=g)
            if name.endswith("ape"):
                value = z
            elif name == "attn_sink":
                value = 2 + z
            elif name.endswith("norm.weight"):
                value = 1 + 0.2 * z
            else:
                value = z / math.sqrt(p.shape[1])
            p.copy_(value)
            theirs.pop(hf_name(layer, name)).copy_(value)
    assert not theirs, f"transformers' parameters with no native counterpart: {sorted(theirs)}"
    return ref, mine


def _input(T: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, T, CFG.dim, generator=torch.Generator().manual_seed(seed))


def _tables(layer: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_cos_sin(ROPE, T, hybrid_rope_config(CFG, layer))


def _reference(ref: DeepseekV4Attention, x: torch.Tensor) -> torch.Tensor:
    """transformers' output as its model calls the layer: both rope kinds' cos/sin, the sliding-window mask."""
    pos = torch.arange(x.shape[1]).unsqueeze(0)
    rotary = DeepseekV4RotaryEmbedding(HF)
    emb = {kind: rotary(x, pos, layer_type=kind) for kind in ("main", "compress")}
    mask = create_sliding_window_causal_mask(config=HF, inputs_embeds=x, attention_mask=None, cache=None,
                                             position_ids=pos)
    return ref(x, emb, pos, mask)[0]


def _table_error(layer: int, T: int, cfg_layer: int | None = None) -> float:
    """max |flyer's cos/sin - transformers'| for layer ``layer``'s rope kind (flyer's tables of
    ``cfg_layer``'s, default the same layer). flyer's tables hold each pair's cos twice and its sin as
    (-sin, sin)."""
    kind = "main" if CFG.compress_ratios[layer] == 0 else "compress"
    cos_h, sin_h = DeepseekV4RotaryEmbedding(HF)(torch.zeros(1), torch.arange(T).unsqueeze(0), layer_type=kind)
    cos, sin = _tables(layer if cfg_layer is None else cfg_layer, T)
    assert torch.equal(cos[..., 0::2], cos[..., 1::2]) and torch.equal(sin[..., 0::2], -sin[..., 1::2])
    return max(float((cos[:, 0, 0::2] - cos_h[0]).abs().max()), float((sin[:, 0, 1::2] - sin_h[0]).abs().max()))


def tolerance(mine: HybridAttention, T: int, table_err: float) -> float:
    """Bound on max|flyer - transformers| / max|output| of two FP32 evaluations of one layer, to first order,
    each sum's terms' absolute sum taken as its scale (random weights): the queries are off by
    eps_q = (D + R + d + 8) u (two GEMMs, the head norm; 8 for rsqrt and the like), keys and values by
    eps_k = (D + 2 r + d + 8) u (a GEMM, the compressor's 2r slots, a norm), and both by 2 e more from RoPE
    tables e apart (e measured: transformers' FP32 frequencies). A score scale q.k is then off by
    delta = A (eps_q + eps_k + (d + 1) u + 4 e), A = scale sum|q_i k_i| <= sqrt(d) max|norm weight| (q has unit
    RMS, k at most the norm weight's); delta moves each probability by 2 delta of itself; the output adds its
    sum over S = T + T/r keys, the values' error, the un-rotation (2 e) and the two output GEMMs (H d / G, G L)."""
    u, d, D, R = FP32_U, CFG.head_dim, CFG.dim, CFG.q_lora_rank
    r = mine.ratio
    S = T + (T // r if r else 0)
    norms = [mine.kv_norm.weight] + ([mine.compressor.norm.weight] if r else [])
    A = math.sqrt(d) * max(float(w.detach().abs().max()) for w in norms)
    eps_q, eps_k = (D + R + d + 8) * u, (D + 2 * r + d + 8) * u
    delta = A * (eps_q + eps_k + (d + 1) * u + 4 * table_err)
    proj = CFG.n_heads * d // CFG.o_groups + CFG.o_groups * CFG.o_lora_rank
    return 2 * delta + eps_k + 2 * table_err + (S + proj + 8) * u


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max() / b.detach().abs().max())


def _selections(mine: HybridAttention, ref: DeepseekV4Attention, x: torch.Tensor):
    """(flyer's output, transformers', flyer's visible compressed entries (B, T, N), transformers' indexer
    picks as the same mask): the one from what ``attend`` is given, the other from the indexer's indices."""
    T, N = x.shape[1], x.shape[1] // mine.ratio
    seen = []
    attend = mine.attend
    mine.attend = lambda q, kv, visible: seen.append(visible[..., T:]) or attend(q, kv, visible)
    picks = []
    hook = ref.compressor.indexer.register_forward_hook(lambda m, a, out: picks.append(out))
    try:
        with torch.no_grad():
            got, want = mine(x, *_tables(LAYER["csa"], T)), _reference(ref, x)
    finally:
        hook.remove()
        del mine.attend
    idx = picks[0]  # (B, T, k), -1 for picks past the query's complete entries
    theirs = torch.zeros(*idx.shape[:2], N + 1, dtype=torch.bool).scatter_(-1, idx.where(idx >= 0, N), True)
    return got, want, seen[0], theirs[..., :N]


def test_rope_tables_are_transformers_per_layer_kind():
    """``hybrid_rope_config``: window-only layers rotate at rope_theta unscaled, compressed layers at
    compress_rope_theta with YaRN, no cos/sin factor: flyer's tables (FP64 frequencies, rounded once) are within
    transformers' frequency rounding, an angle t f off by at most T (ln theta + 8) u (``logit_tolerance`` in
    test_rope_scaling), of its own; a compressed layer given the window layers' tables is far off."""
    T = 64
    for kind, layer in LAYER.items():
        theta = CFG.rope_theta if kind == "window" else CFG.compress_rope_theta
        err, bound = _table_error(layer, T), T * (math.log(theta) + 8) * FP32_U
        assert err <= bound, f"{kind}: {err:.3g} > {bound:.3g}"
    assert _table_error(LAYER["csa"], T, cfg_layer=LAYER["window"]) > 1000 * T * (math.log(16e4) + 8) * FP32_U
    assert hybrid_rope_config(CFG, 0).rope_factor == 1.0 and hybrid_rope_config(CFG, 1).rope_theta == 16e4


@pytest.mark.parametrize("T", [T_LONG, 12])
@pytest.mark.parametrize("kind", list(LAYER))
def test_output_equals_transformers(kind, T):
    """Within ``tolerance`` of transformers, at 62 tokens (windows, the sliding window and the top-k cut all bite)
    and at 12 (HCA: no complete window yet, the window alone; CSA: 3 entries, all kept without the indexer)."""
    layer = LAYER[kind]
    ref, mine = _pair(layer)
    x = _input(T)
    with torch.no_grad():
        got, want = mine(x, *_tables(layer, T)), _reference(ref, x)
    err, tol = rel(got, want), tolerance(mine, T, _table_error(layer, T))
    assert err <= tol, f"{kind}, T={T}: {err:.3g} > {tol:.3g}"


def test_csa_selects_transformers_entries_without_ties_at_the_cut():
    """At 62 tokens (15 entries) each query from token 19 on keeps 4 of its complete entries; flyer's picks are
    transformers' for every query. No score ties at the cut (ties go to the earliest entries in flyer, to
    top-k's kernel order in transformers): on these weights the 4th and 5th visible scores of every query
    differ by at least 1e-4 of its largest, far above FP32 rounding (~1e-6), so both top-k's choose alike."""
    ref, mine = _pair(LAYER["csa"])
    x = _input(T_LONG)
    _, _, seen, theirs = _selections(mine, ref, x)
    assert torch.equal(seen, theirs)
    complete = torch.arange(T_LONG // CSA).view(1, -1) < ((torch.arange(T_LONG) + 1) // CSA).view(-1, 1)
    assert (seen.sum(-1) == complete.sum(-1).clamp(max=TOPK)).all() and (complete.sum(-1) > TOPK).sum() > 30
    with torch.no_grad():
        scores = mine.indexer.scores(x, mine.q_norm(mine.wq_a(x)), *_tables(LAYER["csa"], T_LONG))
    ranked = scores.masked_fill(~complete, float("-inf")).sort(-1, descending=True).values
    rows = complete.sum(-1) > TOPK
    gap = (ranked[..., TOPK - 1] - ranked[..., TOPK])[:, rows]
    assert (gap >= 1e-4 * ranked[..., 0].abs()[:, rows]).all(), f"closest cut {gap.min():.3g}"


def test_topk_ties_at_the_cut_go_to_the_earliest_entries():
    """flyer's V3.2 convention (``Indexer.select``): of entries tied at the k-th score the earliest are kept, so
    a selection does not depend on top-k's kernel (transformers' keeps whichever its top-k returns); never an
    entry the query does not see, all it sees when that is k or fewer."""
    scores = torch.tensor([[[3.0, 0.0, 0.0, 0.0, 5.0, 0.0]]])
    visible = torch.tensor([[[True, True, True, True, True, False]]])
    assert select_topk(scores, visible, 3).int().tolist() == [[[1, 1, 0, 0, 1, 0]]]
    assert select_topk(scores, visible & (torch.arange(6) < 2), 3).int().tolist() == [[[1, 1, 0, 0, 0, 0]]]


def _no_sinks(mine):
    mine.attn_sink.fill_(float("-inf"))  # a sink of weight 0: plain softmax


def _no_unrotation(mine):
    out = mine.output
    mine.output = lambda o, cos, sin: out(o, torch.ones_like(cos), torch.zeros_like(sin))


def _window(delta):
    def mutate(mine):
        mine.window = WINDOW + delta
    return mutate


def _no_overlap(mine):
    mine.compressor.ape[:, : CFG.head_dim] = float("-inf")  # series a weighs 0: entry i pools window i alone


def _indexer_ignored(mine):
    mine.indexer.topk = 10**6  # every complete entry kept


MUTATIONS = [
    ("window", "no sinks", _no_sinks), ("hca", "no sinks", _no_sinks),
    ("window", "no output un-rotation", _no_unrotation), ("csa", "no output un-rotation", _no_unrotation),
    ("window", "window + 1", _window(1)), ("window", "window - 1", _window(-1)), ("hca", "window + 1", _window(1)),
    ("csa", "CSA without overlap", _no_overlap), ("csa", "indexer selection ignored", _indexer_ignored),
]


@pytest.mark.parametrize("kind,name,mutate", MUTATIONS, ids=[f"{k}-{n}" for k, n, _ in MUTATIONS])
def test_mutations_land_far_outside_the_tolerance(kind, name, mutate):
    """Each plausible mistake moves the output by over 100 times the tolerance."""
    layer = LAYER[kind]
    ref, mine = _pair(layer)
    x = _input(T_LONG)
    with torch.no_grad():
        want = _reference(ref, x)
        mutate(mine)
        err = rel(mine(x, *_tables(layer, T_LONG)), want)
    tol = tolerance(mine, T_LONG, _table_error(layer, T_LONG))
    assert err > 100 * tol, f"{kind}, {name}: {err:.3g} is within 100x the tolerance {tol:.3g}"


@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_compressed_layer_with_window_rope_is_far_outside_the_tolerance(kind):
    """A compressed layer rotated with the window layers' tables (rope_theta, no YaRN) is far off."""
    layer = LAYER[kind]
    ref, mine = _pair(layer)
    x = _input(T_LONG)
    with torch.no_grad():
        err = rel(mine(x, *_tables(LAYER["window"], T_LONG)), _reference(ref, x))
    assert err > 100 * tolerance(mine, T_LONG, _table_error(layer, T_LONG))


@pytest.mark.parametrize("kind", list(LAYER))
def test_gradients_equal_transformers_and_skip_the_indexer(kind):
    """The compressor learns through attention: its wkv, wgate and ape get nonzero gradients (CSA: its overlap
    series a too), and every gradient (the input's, each parameter's) is transformers' within ``tolerance`` plus
    the weight gradients' sum over the B T tokens (backward runs the forward's sums transposed). The indexer is
    frozen and out of the graph: no parameter of it requires or gets a gradient."""
    layer = LAYER[kind]
    ref, mine = _pair(layer)
    x = _input(T_LONG).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    (mine(x, *_tables(layer, T_LONG)) * w).sum().backward()
    (_reference(ref, x_ref) * w).sum().backward()
    tol = tolerance(mine, T_LONG, _table_error(layer, T_LONG)) + x.shape[0] * T_LONG * FP32_U
    assert rel(x.grad, x_ref.grad) <= tol
    for name, p in mine.named_parameters():
        if name.startswith("indexer."):
            assert not p.requires_grad and p.grad is None, name
            continue
        assert p.grad is not None and (p.grad != 0).any(), name
        err = rel(p.grad, ref.get_parameter(hf_name(layer, name)).grad)
        assert err <= tol, f"{name}: {err:.3g} > {tol:.3g}"
    if kind == "csa":
        assert (mine.compressor.wkv.weight.grad[: CFG.head_dim] != 0).any()  # series a: the next entry's
    if kind != "window":
        assert {"compressor.wkv.weight", "compressor.wgate.weight", "compressor.ape"} <= {
            n for n, p in mine.named_parameters() if p.grad is not None}


def test_bf16_autocast_runs_forward_and_backward():
    """Under BF16 autocast every layer kind runs forward and backward: a BF16 output (the last GEMM's), finite
    gradients; the indexer still scores in FP32."""
    for kind, layer in LAYER.items():
        _, mine = _pair(layer)
        x = _input(T_LONG).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = mine(x, *_tables(layer, T_LONG))
            if kind == "csa":
                q_latent = mine.q_norm(mine.wq_a(x))
                assert mine.indexer.scores(x, q_latent, *_tables(layer, T_LONG)).dtype == torch.float32
        assert out.dtype == torch.bfloat16 and out.shape == x.shape and out.isfinite().all()
        out.float().square().mean().backward()
        assert x.grad.isfinite().all() and mine.attn_sink.grad.isfinite().all()


def _expected_shapes(kind: str) -> dict[str, tuple[int, ...]]:
    """DeepSeek's checkpoint tensors of one attention layer and their shapes."""
    H, d, D, R, G, L = 4, 32, 64, 32, 2, 16
    shapes = {"wq_a.weight": (R, D), "q_norm.weight": (R,), "wq_b.weight": (H * d, R), "wkv.weight": (d, D),
              "kv_norm.weight": (d,), "wo_a.weight": (G * L, H * d // G), "wo_b.weight": (D, G * L),
              "attn_sink": (H,)}
    if kind != "window":
        c, r = (2, CSA) if kind == "csa" else (1, HCA)
        shapes |= {"compressor.wkv.weight": (c * d, D), "compressor.wgate.weight": (c * d, D),
                   "compressor.ape": (r, c * d), "compressor.norm.weight": (d,)}
    if kind == "csa":
        Hi, di = 8, 16
        shapes |= {"indexer.wq_b.weight": (Hi * di, R), "indexer.weights_proj.weight": (Hi, D),
                   "indexer.compressor.wkv.weight": (2 * di, D), "indexer.compressor.wgate.weight": (2 * di, D),
                   "indexer.compressor.ape": (CSA, 2 * di), "indexer.compressor.norm.weight": (di,)}
    return shapes


@pytest.mark.parametrize("kind", list(LAYER))
def test_checkpoint_names_and_shapes_and_meta_build(kind):
    """The state dict is DeepSeek's checkpoint's for the layer (names, shapes; sinks and gate biases FP32), each
    name transformers' renaming of a parameter of its layer, one to one; it builds on the meta device and under
    ``deferred_init``; ``reset_parameters`` zeroes the sinks and gate biases."""
    layer = LAYER[kind]
    with torch.device("meta"):
        meta = HybridAttention(CFG, layer)
    assert all(p.is_meta for p in meta.parameters())
    shapes = {n: tuple(t.shape) for n, t in meta.state_dict().items()}
    assert shapes == _expected_shapes(kind)
    assert all(p.dtype == torch.float32 for n, p in meta.named_parameters() if n.endswith(("ape", "attn_sink")))
    ref = DeepseekV4Attention(HF, layer)
    theirs = {n: tuple(t.shape) for n, t in ref.state_dict().items()}
    assert {hf_name(layer, n): s for n, s in shapes.items()} == theirs
    with deferred_init():
        built = HybridAttention(CFG, layer)
    with torch.no_grad():
        for p in built.parameters():
            p.fill_(1.0)
    built.reset_parameters()
    zeroed = {n for n, p in built.named_parameters() if (p == 0).all()}
    assert zeroed == {n for n in shapes if n.endswith(("ape", "attn_sink"))}
