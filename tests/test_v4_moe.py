"""DeepSeek-V4's MoE: sqrt(softplus) scores, hash-routed layers and the clamped SwiGLU.

Against transformers' DeepseekV4SparseMoeBlock (the independent oracle), and every routed-experts
implementation against the FP64 loop oracle (``expert_ffn_loop``), forward and backward.

Tolerances come from a first-order rounding bound: an FP32 evaluation of the experts is off from
the exact value by at most R u M, element by element, with u = 2^-24, M the same computation on
absolute values (``_magnitudes``: GEMMs on |operands|, silu majorised by its Lipschitz constant
1.1, its derivative by 1.1 + 0.5 |h1|) and R the longest chain of roundings (GEMM lengths plus a
few element-wise ops). The clamp is Lipschitz too, but its gradient mask is not: each test first
checks that no projection lies within its own rounding bound of +-limit, so every evaluation
clamps the same entries (``_masks_agree``).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from flyer import kernels
from flyer.config import ConfigError, preset
from flyer.model import experts as experts_module
from flyer.model.experts import Experts, expert_ffn_fused, expert_ffn_grouped_mm, expert_ffn_loop
from flyer.model.moe import MLP, Gate, MoE, update_router_bias

U32 = 2.0**-24
U_BF16 = 2.0**-8
D, FF, E, K, V = 64, 32, 8, 2, 100  # model dim, expert hidden dim, experts, activated, vocab
LIMIT = 1.0  # projections have std ~1.6 below: the clamp is active on roughly a third of them


def v4_cfg(**kw):
    base = dict(vocab_size=V, dim=D, n_layers=3, n_dense_layers=0, inter_dim=96, n_heads=4, q_lora_rank=32,
                kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, moe_inter_dim=FF,
                n_routed_experts=E, n_shared_experts=1, n_activated_experts=K, n_expert_groups=1,
                n_limited_groups=1, score_func="sqrtsoftplus", route_scale=1.5, norm_topk_prob=True,
                n_hash_layers=1, swiglu_limit=LIMIT, max_seq_len=64, original_seq_len=64, mtp_depth=0)
    base.update(kw)
    return preset("tiny", **base)


# ---- the rounding bound --------------------------------------------------------------------------

def _magnitudes(x_ND, counts, w1, w2, w3, dy_ND):
    """Per expert slice, the magnitudes M (FP64) of y and of the gradients dx, dw1, dw2, dw3 for
    output gradient dy: the derivation in the module docstring, term by term."""
    x, dy = x_ND.detach().double().abs(), dy_ND.detach().double().abs()
    w1, w2, w3 = (w.detach().double().abs() for w in (w1, w2, w3))
    y, dx = torch.zeros_like(x), torch.zeros_like(x)
    dw1, dw2, dw3 = torch.zeros_like(w1), torch.zeros_like(w2), torch.zeros_like(w3)
    start = 0
    for e, n in enumerate(counts):
        r = slice(start, start + n)
        start += n
        h1, h3 = x[r] @ w1[e].T, x[r] @ w3[e].T
        s, up = 1.1 * h1, h3  # |silu(min(h1, L))| <= 1.1 |h1|, |clamp(h3)| <= |h3|, errors likewise
        a = s * up
        y[r] = a @ w2[e].T
        da = dy[r] @ w2[e]
        d_up, d_g = da * s, da * up * (1.1 + 0.5 * h1)
        dx[r] = d_g @ w1[e] + d_up @ w3[e]
        dw1[e], dw2[e], dw3[e] = d_g.T @ x[r], dy[r].T @ a, d_up.T @ x[r]
    return y, dx, dw1, dw2, dw3


def _rounds(n_rows: int) -> int:
    """R: the longest chain of FP32 roundings of any output or gradient of the experts (backward:
    3 GEMMs over D, 2 over F or one over the rows, and a few element-wise ops)."""
    return 3 * D + 2 * FF + n_rows + 16


# the forward alone: a GEMM over D, silu and a product (at most 5 roundings), a GEMM over F; then the
# weighted sum of K routed outputs and the shared one
FORWARD_ROUNDS = D + FF + 5 + K + 2
# a mutation must miss by this many bounds (the bounds are worst cases: the right code stays within
# ~1e-4 of them, so this is some 1e5 times its actual error)
MUTATION_RATIO = 10


def _masks_agree(x_ND, counts, w1, w3, limit, unit=U32):
    """Every projection farther from +-limit than its rounding bound (D + 1) u |x||w| (``unit``: the
    precision the projections are computed in): any evaluation clamps exactly the entries the exact
    one does. Returns the share of entries clamped."""
    x = x_ND.detach().double()
    start, clamped, total = 0, 0, 0
    for e, n in enumerate(counts):
        xs = x[start:start + n]
        start += n
        for w, both in ((w1[e], False), (w3[e], True)):
            h, bound = xs @ w.detach().double().T, (D + 1) * unit * (xs.abs() @ w.detach().double().abs().T)
            assert ((h - limit).abs() > bound).all(), "a gate projection within rounding of the limit"
            assert not both or ((h + limit).abs() > bound).all(), "an up projection within rounding of -limit"
            clamped += int((h > limit).sum() + ((h < -limit).sum() if both else 0))
            total += h.numel()
    return clamped / total


def _check(got, exact, magnitude, rounds, name, unit=U32, bf16_rounds=0, factor=1.0):
    """|got - exact| <= factor (rounds u + bf16_rounds u_bf16) M, element by element; returns the
    largest error / bound."""
    bound = factor * (rounds * unit + bf16_rounds * U_BF16) * magnitude + 1e-300
    ratio = float(((got.detach().double() - exact.detach().double()).abs() / bound).max())
    assert ratio <= 1.0, f"{name}: error / bound {ratio:.3g}"
    return ratio


# ---- transformers' DeepseekV4SparseMoeBlock ------------------------------------------------------

def _hf_block(is_hash: bool):
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4SparseMoeBlock

    hf_cfg = transformers.DeepseekV4Config(hidden_size=D, n_routed_experts=E, num_experts_per_tok=K,
                                           moe_intermediate_size=FF, swiglu_limit=LIMIT, vocab_size=V,
                                           num_hidden_layers=2, num_hash_layers=1, routed_scaling_factor=1.5)
    blk = DeepseekV4SparseMoeBlock(hf_cfg, 0 if is_hash else 1).eval()
    assert blk.is_hash == is_hash
    g = torch.Generator().manual_seed(1 if is_hash else 12)
    with torch.no_grad():
        blk.gate.weight.normal_(0.0, 0.1, generator=g)
        blk.experts.gate_up_proj.normal_(0.0, 0.2, generator=g)
        blk.experts.down_proj.normal_(0.0, 0.2, generator=g)
        for lin in (blk.shared_experts.gate_proj, blk.shared_experts.up_proj, blk.shared_experts.down_proj):
            lin.weight.normal_(0.0, 0.2, generator=g)
        if is_hash:  # K distinct experts per token id
            blk.gate.tid2eid.copy_(torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(V)]))
        else:
            blk.gate.e_score_correction_bias.normal_(0.0, 0.1, generator=g)
    return blk


def _flyer_from_hf(blk, cfg, hash_routed: bool) -> MoE:
    """Flyer's MoE with the block's weights: gate_up_proj = [w1; w3] per expert, down_proj = w2,
    shared gate/up/down = w1/w3/w2, e_score_correction_bias = gate.bias, tid2eid as it is."""
    moe = MoE(cfg, hash_routed=hash_routed).eval()
    with torch.no_grad():
        moe.gate.weight.copy_(blk.gate.weight)
        if hash_routed:
            moe.gate.tid2eid.copy_(blk.gate.tid2eid)
        elif not blk.is_hash:  # (a hash block's weights in a top-k MoE keep a zero bias: a mutation below)
            moe.gate.bias.copy_(blk.gate.e_score_correction_bias)
        moe.experts.w1.copy_(blk.experts.gate_up_proj[:, :FF])
        moe.experts.w3.copy_(blk.experts.gate_up_proj[:, FF:])
        moe.experts.w2.copy_(blk.experts.down_proj)
        moe.shared.w1.weight.copy_(blk.shared_experts.gate_proj.weight)
        moe.shared.w3.weight.copy_(blk.shared_experts.up_proj.weight)
        moe.shared.w2.weight.copy_(blk.shared_experts.down_proj.weight)
    return moe


def _inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 16, D, generator=g), torch.randint(0, V, (2, 16), generator=g)


def _exact_and_bound(moe, x_BTD, weights_TK, ids_TK):
    """The exact (FP64) MoE output for the given routing (FP32 gate values, exact inputs here) and
    the bound on any FP32 evaluation's error: routed copies and shared expert, weighted and summed."""
    x = x_BTD.reshape(-1, D)
    T = x.shape[0]
    order = torch.argsort(ids_TK.flatten(), stable=True)
    counts = torch.bincount(ids_TK.flatten(), minlength=E).tolist()
    xs, w_rows, src = x[order // K], weights_TK.flatten()[order].double(), order // K
    ws64 = [w.detach().double() for w in (moe.experts.w1, moe.experts.w2, moe.experts.w3)]
    y_rows = expert_ffn_loop(xs.double(), torch.tensor(counts), *ws64, swiglu_limit=LIMIT)
    m_rows = _magnitudes(xs, counts, *ws64, torch.zeros_like(xs))[0]
    sh = [moe.shared.w1.weight[None], moe.shared.w2.weight[None], moe.shared.w3.weight[None]]
    y_sh = expert_ffn_loop(x.double(), torch.tensor([T]), *(w.detach().double() for w in sh), swiglu_limit=LIMIT)
    m_sh = _magnitudes(x, [T], *sh, torch.zeros_like(x))[0]
    exact = torch.zeros(T, D, dtype=torch.float64).index_add_(0, src, y_rows * w_rows[:, None]) + y_sh
    magnitude = torch.zeros(T, D, dtype=torch.float64).index_add_(0, src, m_rows * w_rows[:, None]) + m_sh
    share = _masks_agree(xs, counts, moe.experts.w1, moe.experts.w3, LIMIT)
    _masks_agree(x, [T], *sh[::2], LIMIT)
    return exact.view_as(x_BTD), magnitude.view_as(x_BTD), share


@pytest.mark.parametrize("is_hash", [True, False], ids=["hash", "topk"])
def test_moe_matches_transformers(is_hash):
    """The same experts and the same gate values as transformers' block (bitwise: the same FP32
    ops), and outputs that agree within twice the FP32 bound of the exact value."""
    blk = _hf_block(is_hash)
    cfg = v4_cfg()
    moe = _flyer_from_hf(blk, cfg, is_hash)
    x, tokens = _inputs()
    with torch.no_grad():
        want = blk(x, tokens if is_hash else None)
        _, hf_w, hf_ids = blk.gate(x, tokens) if is_hash else blk.gate(x)
        got = moe(x, tokens)
        w, ids, _ = moe.gate(x.reshape(-1, D), tokens.reshape(-1))
    # transformers' top-k is unsorted: compare (expert, weight) pairs in expert order
    s_hf, s_fl = hf_ids.sort(-1), ids.sort(-1)
    assert torch.equal(s_hf.values, s_fl.values)
    assert torch.equal(hf_w.gather(1, s_hf.indices), w.gather(1, s_fl.indices))
    if is_hash:
        assert torch.equal(ids, moe.gate.tid2eid[tokens.reshape(-1)])
    exact, magnitude, share = _exact_and_bound(moe, x, w, ids)
    assert share > 0.2, share  # the clamp is active on a good share of the entries
    ratios = [_check(got, exact, magnitude, FORWARD_ROUNDS, "flyer"),
              _check(want, exact, magnitude, FORWARD_ROUNDS, "transformers"),
              _check(got, want, magnitude, FORWARD_ROUNDS, "flyer vs transformers", factor=2.0)]
    print(f"clamped share {share:.2f}, error / bound (flyer, transformers, between): {ratios}")


def _both_ways(h13, limit):  # mutation: the gate clamped below too
    F_ = h13.shape[1] // 2
    return torch.cat([h13[:, :F_].clamp(-limit, limit), h13[:, F_:].clamp(-limit, limit)], 1)


def _shared_both_ways(h1, h3, limit):
    return F.silu(h1.clamp(-limit, limit)) * h3.clamp(-limit, limit)


@pytest.mark.parametrize("mutation", ["clamp off", "gate clamped both ways", "sigmoid scores", "hash ignored"])
def test_mutations_land_far_outside_the_bound(mutation, monkeypatch):
    """Each plausible wrong convention misses transformers' output by orders of magnitude more
    than the bound the right one meets."""
    is_hash = mutation == "hash ignored" or mutation == "clamp off"
    blk = _hf_block(is_hash)
    x, tokens = _inputs()
    right = _flyer_from_hf(blk, v4_cfg(), is_hash)
    cfg = v4_cfg(swiglu_limit=0.0) if mutation == "clamp off" else v4_cfg(
        score_func="sigmoid") if mutation == "sigmoid scores" else v4_cfg()
    wrong = _flyer_from_hf(blk, cfg, is_hash and mutation != "hash ignored")
    if mutation == "gate clamped both ways":
        monkeypatch.setattr(kernels, "clamp_gate_up", _both_ways)
        monkeypatch.setattr(experts_module, "swiglu", _shared_both_ways)  # the shared MLP's
    with torch.no_grad():
        want = blk(x, tokens if is_hash else None)
        w, ids, _ = right.gate(x.reshape(-1, D), tokens.reshape(-1))
        got = wrong(x, tokens)
    _, magnitude, _ = _exact_and_bound(right, x, w, ids)
    bound = 2 * FORWARD_ROUNDS * U32 * magnitude
    ratio = float(((got.double() - want.double()).abs() / bound).max())
    print(f"{mutation}: error / bound {ratio:.3g}")
    assert ratio > MUTATION_RATIO, f"{mutation}: error / bound only {ratio:.3g}"


# ---- every routed-experts implementation against the FP64 loop oracle -----------------------------

def _expert_problem(seed=4, dyadic=False):
    """Expert-sorted rows (one expert empty), weights and an output gradient. ``dyadic``: inputs
    multiples of 1/2 in [-2, 2], weights of 1/32 in [-1/4, 1/4]: the projections are multiples of
    1/64, exact in bf16 near the limit (a limit off that grid: the clamp masks agree in any precision)."""
    g = torch.Generator().manual_seed(seed)
    counts = [7, 0, 12, 3, 9, 1, 5, 8]
    N = sum(counts)
    if dyadic:
        def draw(*shape, scale=1.0):
            return (torch.randint(-4, 5, shape, generator=g).float() / 2 if scale == 1.0
                    else torch.randint(-8, 9, shape, generator=g).float() / 32)
    else:
        def draw(*shape, scale=1.0):
            return torch.randn(*shape, generator=g) * scale
    x = draw(N, D)
    ws = [draw(E, FF, D, scale=0.2), draw(E, D, FF, scale=0.2), draw(E, FF, D, scale=0.2)]
    dy = draw(N, D)
    return x, counts, ws, dy


def _oracle(x, counts, ws, dy, limit):
    x64, ws64 = x.double().requires_grad_(), [w.double().requires_grad_() for w in ws]
    y = expert_ffn_loop(x64, torch.tensor(counts), *ws64, swiglu_limit=limit)
    return y, torch.autograd.grad(y, [x64, *ws64], dy.double())


def _run(impl, x, counts, ws, dy, limit):
    x, ws = x.clone().requires_grad_(), [w.clone().requires_grad_() for w in ws]
    c = torch.tensor(counts)
    if impl == "loop":
        y = expert_ffn_loop(x, c, *ws, swiglu_limit=limit)
    elif impl == "fused":
        y = expert_ffn_fused(x, c, *ws, swiglu_limit=limit)
    elif impl == "fused padded":
        y = expert_ffn_fused(x, c, *ws, row_multiple=16, swiglu_limit=limit)
    elif impl == "experts module":
        ex = Experts(E, D, FF, impl="fused", swiglu_limit=limit)
        ex.w1, ex.w2, ex.w3 = (torch.nn.Parameter(w) for w in ws)
        y = ex(x, c)
        ws = [ex.w1, ex.w2, ex.w3]
    elif impl == "grouped_mm":
        y = expert_ffn_grouped_mm(x.bfloat16(), c, *ws, swiglu_limit=limit)
    return y, torch.autograd.grad(y, [x, *ws], dy.to(y.dtype))


@pytest.mark.parametrize("impl", ["loop", "fused", "fused padded", "experts module"])
def test_routed_experts_match_the_oracle_with_the_clamp(impl, cpu_kernels):
    """Forward and the gradients w.r.t. x, w1, w2, w3 of each FP32 implementation, with the clamp
    active, within the rounding bound of the FP64 oracle; the clamp wired wrong lands far outside."""
    x, counts, ws, dy = _expert_problem()
    share = _masks_agree(x, counts, ws[0], ws[2], LIMIT)
    assert share > 0.2, share
    y64, g64 = _oracle(x, counts, ws, dy, LIMIT)
    mags = _magnitudes(x, counts, *ws, dy)
    R = _rounds(x.shape[0])
    y, grads = _run(impl, x, counts, ws, dy, LIMIT)
    ratios = [_check(got, exact, m, R, f"{impl} {name}")
              for name, got, exact, m in zip(["y", "dx", "dw1", "dw2", "dw3"], [y, *grads], [y64, *g64], mags)]
    print(f"{impl}: error / bound (y, dx, dw1, dw2, dw3) max {max(ratios):.3g}")
    if impl == "loop":
        return
    # mutations: no clamp, the gate clamped both ways (forward), the backward unmasked
    y_off, _ = _run(impl, x, counts, ws, dy, 0.0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "clamp_gate_up", _both_ways)
        y_both, _ = _run(impl, x, counts, ws, dy, LIMIT)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "swiglu_backward", _unmasked_backward)
        _, g_unmasked = _run(impl, x, counts, ws, dy, LIMIT)
    for name, got, exact, m in [("clamp off", y_off, y64, mags[0]), ("gate both ways", y_both, y64, mags[0]),
                                ("unmasked backward dx", g_unmasked[0], g64[0], mags[1])]:
        ratio = float(((got.detach().double() - exact.detach()).abs() / (R * U32 * m)).max())
        print(f"{impl} {name}: error / bound {ratio:.3g}")
        assert ratio > MUTATION_RATIO, f"{impl} {name}: error / bound only {ratio:.3g}"


_swiglu_backward = kernels.swiglu_backward


def _unmasked_backward(da, h13, limit=0.0):  # mutation: the clamped values' gradient, no mask
    return _swiglu_backward(da, kernels.clamp_gate_up(h13, limit) if limit > 0 else h13)


def _bf16_forward_bound(x, counts, ws, y64, limit):
    """The error bound of a bf16 evaluation of the experts on exact bf16 inputs whose projections
    are exact: silu and the product each rounded once to bf16 (2 u_bf |a|), the second GEMM
    accumulated in FP32 over F and rounded to bf16 (u_bf |y|); 1% slack for second-order terms."""
    w1, w2, w3 = (w.double() for w in ws)
    xs, start, wa = x.double(), 0, torch.zeros_like(y64)
    for e, n in enumerate(counts):
        r = slice(start, start + n)
        start += n
        a = F.silu((xs[r] @ w1[e].T).clamp(max=limit)) * (xs[r] @ w3[e].T).clamp(-limit, limit)
        wa[r] = a.abs() @ w2[e].abs().T
    return 1.01 * ((2 * U_BF16 + (FF + 8) * U32) * wa + U_BF16 * y64.detach().abs())


def test_grouped_mm_matches_the_oracle_with_the_clamp():
    """'grouped_mm' (bf16) on exact dyadic data, with the clamp active: the output within bf16's
    rounding of the FP64 oracle, the gradients within the (looser) general bound with bf16
    roundings along each chain; without the clamp it misses."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not available")
    limit = 129 / 128  # off the 1/64 grid of the projections, exact in bf16
    x, counts, ws, dy = _expert_problem(dyadic=True)
    try:
        y, grads = _run("grouped_mm", x, counts, ws, dy, limit)
    except RuntimeError as e:
        pytest.skip(f"torch._grouped_mm does not run here ({e})")
    share = _masks_agree(x, counts, ws[0], ws[2], limit)
    assert share > 0.2, share
    y64, g64 = _oracle(x, counts, ws, dy, limit)
    bound = _bf16_forward_bound(x, counts, ws, y64, limit)
    err = (y.detach().double() - y64.detach()).abs()
    assert (err <= bound).all(), float((err / bound).max())
    mags = _magnitudes(x, counts, *ws, dy)
    R = _rounds(x.shape[0])
    for name, got, exact, m in zip(["dx", "dw1", "dw2", "dw3"], grads, g64, mags[1:]):
        _check(got, exact, m, R, f"grouped_mm {name}", bf16_rounds=8)  # at most 8 bf16 roundings on a chain
    y_off, _ = _run("grouped_mm", x, counts, ws, dy, 0.0)
    ratio = float(((y_off.detach().double() - y64.detach()).abs() / bound).max())
    print(f"grouped_mm: error / bound {float((err / bound).max()):.3g}, clamp off {ratio:.3g}")
    assert ratio > MUTATION_RATIO


def _routed_problem(seed=5):
    g = torch.Generator().manual_seed(seed)
    T = 24
    x = torch.randn(T, D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    ids[ids == 1] = 0  # expert 1 receives nothing
    ids[:, 1] = torch.where(ids[:, 1] == ids[:, 0], (ids[:, 0] + 2) % E, ids[:, 1])
    weights = torch.rand(T, K, generator=g) + 0.5
    ws = [torch.randn(E, FF, D, generator=g) * 0.2, torch.randn(E, D, FF, generator=g) * 0.2,
          torch.randn(E, FF, D, generator=g) * 0.2]
    return x, ids, weights, ws, torch.randn(T, D, generator=g)


def _routed_oracle(x, ids, weights, ws, gy, limit):
    """FP64: out_t = sum_k w_tk expert_{ids_tk}(x_t), by autograd; and the magnitudes of out and of
    the gradients w.r.t. x, the gate weights, w1, w2, w3."""
    T = x.shape[0]
    x64, w64 = x.double().requires_grad_(), weights.double().requires_grad_()
    ws64 = [w.double().requires_grad_() for w in ws]
    order = torch.argsort(ids.flatten(), stable=True)
    counts = torch.bincount(ids.flatten(), minlength=E).tolist()
    src = order // K
    y_rows = expert_ffn_loop(x64[src], torch.tensor(counts), *ws64, swiglu_limit=limit)
    w_rows = w64.flatten()[order]
    out = torch.zeros(T, D, dtype=torch.float64).index_add(0, src, y_rows * w_rows[:, None])
    grads = torch.autograd.grad(out, [x64, w64, *ws64], gy.double())
    m_y, m_dx, m_w1, m_w2, m_w3 = _magnitudes(x[src], counts, *ws, gy[src] * weights.flatten()[order][:, None])
    wa = weights.double().flatten()[order][:, None]
    m_out = torch.zeros(T, D, dtype=torch.float64).index_add(0, src, m_y * wa)
    m_x = torch.zeros(T, D, dtype=torch.float64).index_add(0, src, m_dx)
    m_w = torch.zeros(T * K, dtype=torch.float64)
    m_w[order] = (gy.double().abs()[src] * m_y).sum(1)
    return out, grads, (m_out, m_x, m_w.view(T, K), m_w1, m_w2, m_w3), counts


@pytest.mark.parametrize("grad", [True, False], ids=["fused function", "no-grad path"])
def test_routed_local_matches_the_oracle_with_the_clamp(grad, cpu_kernels):
    """``Experts.routed_local`` (dispatch, clamped experts and combine in one function; without
    gradients the leaner ``local_routed_no_grad``): the output and the gradients w.r.t. x, the gate
    weights, w1, w2, w3 within the rounding bound of the FP64 oracle."""
    x, ids, weights, ws, gy = _routed_problem()
    exact, g64, mags, counts = _routed_oracle(x, ids, weights, ws, gy, LIMIT)
    order = torch.argsort(ids.flatten(), stable=True)
    assert _masks_agree(x[order // K], counts, ws[0], ws[2], LIMIT) > 0.2
    ex = Experts(E, D, FF, impl="fused", swiglu_limit=LIMIT)
    with torch.no_grad():
        for p, w in zip((ex.w1, ex.w2, ex.w3), ws):
            p.copy_(w)
    R = _rounds(x.shape[0] * K) + 2 * K + D + 4  # the weighted sum over K; the gate weights' dot products
    counts_E = torch.tensor(counts)
    if not grad:
        with torch.no_grad():
            got = ex.routed_local(x, weights, ids, counts_E)
        print(f"no-grad routed_local: error / bound {_check(got, exact, mags[0], R, 'no-grad out'):.3g}")
        # the no-grad path is the function's forward: the same bits
        xr, wr = x.clone().requires_grad_(), weights.clone().requires_grad_()
        assert torch.equal(got, ex.routed_local(xr, wr, ids, counts_E))
        return
    xr, wr = x.clone().requires_grad_(), weights.clone().requires_grad_()
    out = ex.routed_local(xr, wr, ids, counts_E)
    grads = torch.autograd.grad(out, [xr, wr, ex.w1, ex.w2, ex.w3], gy)
    ratios = [_check(out, exact, mags[0], R, "out")]
    ratios += [_check(got, want, m, R, name)
               for name, got, want, m in zip(["dx", "dweights", "dw1", "dw2", "dw3"], grads, g64, mags[1:])]
    print(f"routed_local: error / bound (out, dx, dweights, dw1, dw2, dw3) max {max(ratios):.3g}")


def test_held_fp8_experts_clamp():
    """Inference on experts held as FP8 codes (``HeldFP8Experts``, their own activation call): within
    the FP32 rounding bound of the FP64 oracle on the dequantized weights; the clamp off misses."""
    from flyer.infer.weights import _hold_experts_fp8

    x, ids, weights, ws, gy = _routed_problem(seed=6)
    held = []
    for limit in (LIMIT, 0.0):
        ex = Experts(E, D, FF, impl="fused", swiglu_limit=limit)
        with torch.no_grad():
            for p, w in zip((ex.w1, ex.w2, ex.w3), ws):
                p.copy_(w)
        _hold_experts_fp8(ex, "experts", None)
        held.append(ex)
    deq = [torch.stack([kernels.dequantize_held(getattr(held[0], n)[e], getattr(held[0], f"{n}_scale")[e])
                        for e in range(E)]) for n in ("w1", "w2", "w3")]
    exact, _, mags, counts = _routed_oracle(x, ids, weights, deq, gy, LIMIT)
    order = torch.argsort(ids.flatten(), stable=True)
    assert _masks_agree(x[order // K], counts, deq[0], deq[2], LIMIT) > 0.2
    counts_E = torch.bincount(ids.flatten(), minlength=E)
    with torch.no_grad():
        got, off = (m.routed_local(x, weights, ids, counts_E) for m in held)
    R = _rounds(0) + 2 * K + 4
    ratio = _check(got, exact, mags[0], R, "held fp8")
    off_ratio = float(((off.double() - exact.detach()).abs() / (R * U32 * mags[0])).max())
    print(f"held fp8: error / bound {ratio:.3g}, clamp off {off_ratio:.3g}")
    assert off_ratio > MUTATION_RATIO


@pytest.mark.parametrize("impl", ["loop", "fused", "fused padded", "experts module"])
def test_an_inactive_clamp_changes_no_bit(impl, cpu_kernels):
    """A limit no projection reaches gives the unclamped results bit for bit (the clamp and the mask
    are exact where inactive); limit 0 runs the unclamped code itself."""
    x, counts, ws, dy = _expert_problem()
    y0, g0 = _run(impl, x, counts, ws, dy, 0.0)
    y1, g1 = _run(impl, x, counts, ws, dy, 1e30)
    assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(g0, g1))


# ---- gate, hash routing, MoE API -----------------------------------------------------------------

def test_sqrtsoftplus_gate():
    """scores = sqrt(softplus(logits)) in FP32 (softplus's threshold 20 included); top-k on
    scores + bias; weights from the unbiased scores, renormalised, times route_scale."""
    cfg = v4_cfg()
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.normal_(0.0, 3.0)  # logits past softplus's threshold 20 too
        gate.bias.normal_(0.0, 0.3)
    x = torch.randn(40, D)
    w, ids, scores = gate(x)
    logits = x @ gate.weight.T
    assert (logits.abs() > 20).any()
    torch.testing.assert_close(scores, torch.sqrt(torch.log1p(torch.exp(logits.double()))).float(),
                               rtol=4 * U32, atol=0)
    assert torch.equal(ids, (scores + gate.bias).topk(K, dim=-1).indices)
    g = scores.gather(1, ids)
    assert torch.equal(w, g / (g.sum(-1, keepdim=True) + 1e-20) * 1.5)
    with pytest.raises(ConfigError, match="score_func"):
        Gate(_bad_score_cfg(cfg))


def _bad_score_cfg(cfg):
    bad = dataclasses.replace(cfg)
    bad.score_func = "relu"  # set after the config's own validation: the gate refuses it too
    return bad


def test_hash_gate_state_and_errors():
    """A hash-routed gate: a persistent int64 (vocab, K) ``tid2eid`` (at init, K distinct experts per token id)
    and no bias; token ids are required; no balance loss and no bias update for it."""
    cfg = v4_cfg(seq_aux_alpha=0.01)
    moe = MoE(cfg, hash_routed=True)
    table = moe.gate.tid2eid
    assert moe.gate.bias is None and table.dtype == torch.int64 and table.shape == (V, K)
    assert all(len(set(row)) == K for row in table.tolist()) and 0 <= int(table.min()) and int(table.max()) < E
    assert len(set(table[:, 0].tolist())) > 1  # not one expert for every token
    keys = set(moe.state_dict())
    assert "gate.tid2eid" in keys and "gate.bias" not in keys
    x, tokens = _inputs()
    with pytest.raises(ValueError, match="tokens_BT"):
        moe(x)
    with pytest.raises(ValueError, match="tokens_T"):
        moe.gate(x.reshape(-1, D))
    topk = MoE(cfg)
    model = torch.nn.ModuleList([moe, topk]).train()
    moe(x, tokens)
    topk(x)
    assert moe.aux_loss is None and topk.aux_loss is not None and torch.isfinite(topk.aux_loss)
    assert moe.tokens_per_expert.sum() == x.shape[0] * x.shape[1] * K
    bias = topk.gate.bias.clone()
    update_router_bias(model)
    assert moe.tokens_per_expert.sum() == 0 and topk.tokens_per_expert.sum() == 0
    assert not torch.equal(topk.gate.bias, bias) and moe.gate.bias is None


def test_shared_mlp_limit():
    """The shared experts' MLP clamps as the routed experts do; limit 0 is the plain SwiGLU."""
    mlp, plain = MLP(D, FF, limit=LIMIT), MLP(D, FF)
    plain.load_state_dict(mlp.state_dict())
    x = torch.randn(5, D) * 4
    h1, h3 = x @ mlp.w1.weight.T, x @ mlp.w3.weight.T
    want = (F.silu(h1.clamp(max=LIMIT)) * h3.clamp(-LIMIT, LIMIT)) @ mlp.w2.weight.T
    torch.testing.assert_close(mlp(x), want, rtol=0, atol=0)
    assert torch.equal(plain(x), (F.silu(h1) * h3) @ plain.w2.weight.T)


def test_fp8_experts_keep_the_limit():
    """Conversion to FP8 experts keeps the limit, and their activation clamps."""
    from flyer.fp8 import FP8Experts

    ex = Experts(E, D, FF, swiglu_limit=LIMIT, init_std=0.2)
    fp8 = FP8Experts.from_experts(ex)
    assert fp8.swiglu_limit == LIMIT
    x = torch.randn(16, D) * 4
    counts = torch.tensor([16, 0, 0, 0, 0, 0, 0, 0])
    off = FP8Experts.from_experts(Experts(E, D, FF, swiglu_limit=0.0))
    off.w1, off.w2, off.w3 = fp8.w1, fp8.w2, fp8.w3
    assert not torch.equal(fp8(x, counts), off(x, counts))
