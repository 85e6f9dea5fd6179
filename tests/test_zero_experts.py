"""LongCat-Flash's zero-computation (identity) experts run no FFN rows: the fused local path (with autograd,
and the no-grad decode path, kernels and eager), and the composed dispatcher path give, bit for bit, what
moving each identity pick to a routed expert with weight 0 gave (transformers' way, flyer's before), for the
outputs and every gradient."""

import pytest
import torch
import torch.nn.functional as F

from bounds import FP32_U
from flyer import kernels
from flyer.config import preset
from flyer.model import experts as experts_mod
from flyer.model.moe import MoE

E, Z, K = 8, 4, 4


def _moved_picks(x_TD, weights_TK, topk_ids_TK):
    """What flyer computed before skipping (and transformers does): the identity sum, and each identity pick
    moved to routed expert (id - E) E / Z with weight 0."""
    identity = topk_ids_TK >= E
    identity_TD = x_TD.float() * weights_TK.masked_fill(~identity, 0.0).sum(-1, keepdim=True)
    moved = torch.where(identity, (topk_ids_TK - E) * E // Z, topk_ids_TK)
    return identity_TD, weights_TK.masked_fill(identity, 0.0), moved, torch.bincount(moved.flatten(), minlength=E)


def _moved_forward(moe: MoE, x_BTD: torch.Tensor) -> torch.Tensor:
    """``MoE.forward``'s output (inference statistics left out) with the identity picks moved."""
    B, T, D = x_BTD.shape
    x_TD = x_BTD.reshape(B * T, D)
    weights_TK, topk_ids_TK, _ = moe.gate(x_TD)
    identity_TD, weights_TK, topk_ids_TK, counts = _moved_picks(x_TD, weights_TK, topk_ids_TK)
    if moe.path == "fused_local":
        y_TD = moe.experts.routed_local(x_TD, weights_TK, topk_ids_TK, counts)
    else:
        x_sorted, local_counts, ctx = moe.dispatcher.dispatch(x_TD, topk_ids_TK)
        y_TD = moe.dispatcher.combine(moe.experts(x_sorted, local_counts), weights_TK, ctx)
    y_TD = (y_TD + identity_TD).to(x_BTD.dtype)
    if moe.shared is not None:
        y_TD = y_TD + moe.shared(x_TD)
    return y_TD.view(B, T, D)


def _forced_ids(T: int, seed: int) -> torch.Tensor:
    """(T, K) distinct picks among E + Z columns. T = 2 (decoding): token 0 picks identities 0 and 1 and experts
    1 and 3, token 1 identities 2 and 3 and experts 5 and 7: one row per expert either way, the moved picks on
    0, 2, 4, 6. Else about a third identities; token 0 picks only identities, token 1 none, token 2 every
    identity column but one routed expert."""
    if T == 2:
        return torch.tensor([[E, 1, E + 1, 3], [5, E + 2, 7, E + 3]])
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(T, E + Z, generator=g).topk(K, dim=-1).indices
    ids[0] = torch.arange(E, E + K)
    ids[1] = torch.arange(K)
    ids[2] = torch.tensor([E + 3, 5, E, E + 1])
    return ids


def _reordered_sums(moe: MoE, x_TD: torch.Tensor, g_TD: torch.Tensor, ids_TK: torch.Tensor) -> dict:
    """{gradient name: (the sum of the absolute values of the terms each of its elements adds up, how many)} for the
    sums whose order the GEMM library picks from the shapes: each expert weight's over its picks (the most rows
    either way, (E, 1, 1)), the input's over a pick's 2F hidden units and a token's K picks. In FP64 from the routed
    picks of ``ids_TK``: what bounds two evaluations of those sums in different orders."""
    with torch.no_grad():
        weights_TK = moe.gate(x_TD)[0].double()
    t, k = (ids_TK < E).nonzero(as_tuple=True)
    e = ids_TK[t, k]
    x, gw = x_TD.detach().double()[t], g_TD.double()[t] * weights_TK[t, k, None]  # gw: d loss / d (the pick's output)
    w1, w2, w3 = (getattr(moe.experts, n).detach().double()[e] for n in ("w1", "w2", "w3"))
    h1 = torch.einsum("nfd,nd->nf", w1, x).requires_grad_()
    h3 = torch.einsum("nfd,nd->nf", w3, x).requires_grad_()
    a = F.silu(h1) * h3
    dh1, dh3 = torch.autograd.grad((torch.einsum("ndf,nf->nd", w2, a) * gw).sum(), (h1, h3))

    def per_expert(p_N, q_N):  # sum over an expert's picks of |p| (outer) |q|
        terms = p_N.abs().unsqueeze(2) * q_N.abs().unsqueeze(1)
        return torch.zeros(E, *terms.shape[1:], dtype=torch.float64).index_add_(0, e, terms)
    dx = torch.einsum("nf,nfd->nd", dh1.abs(), w1.abs()) + torch.einsum("nf,nfd->nd", dh3.abs(), w3.abs())
    rows = torch.maximum(_moved_picks(x_TD, weights_TK, ids_TK)[3], torch.bincount(e, minlength=E))
    n_weights = rows.double().view(E, 1, 1)
    return {"x": (torch.zeros_like(x_TD, dtype=torch.float64).index_add_(0, t, dx), 2 * moe.experts.w1.shape[1] + K),
            "experts.w1": (per_expert(dh1, x), n_weights), "experts.w2": (per_expert(gw, a.detach()), n_weights),
            "experts.w3": (per_expert(dh3, x), n_weights)}


def _moe(fuse_local: bool, seed: int = 0) -> MoE:
    cfg = preset("tiny", dim=32, moe_inter_dim=16, n_routed_experts=E, n_zero_experts=Z, n_activated_experts=K,
                 n_expert_groups=1, n_limited_groups=1, n_shared_experts=1, score_func="softmax",
                 norm_topk_prob=False, route_scale=2.0, seq_aux_alpha=0.0)
    torch.manual_seed(seed)
    return MoE(cfg, fuse_local=fuse_local)


def _force(moe: MoE, ids: torch.Tensor) -> None:
    moe.gate._select = lambda scores: ids  # the gate weights stay the scores there (differentiable)


def _grads(moe: MoE, x: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    moe.zero_grad(set_to_none=True)
    x.grad = None
    (y * g).sum().backward()
    return [x.grad] + [p.grad for _, p in sorted(moe.named_parameters())]


@pytest.mark.parametrize("fuse_local", [True, False], ids=["fused", "dispatched"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [2, 160])
def test_skipping_identity_picks_is_bitwise_the_moved_picks(cpu_kernels, fuse_local, dtype, T):
    """Training (autograd) and no-grad forwards, FP32 (no pad rows) and BF16 (on the CPU, oneDNN's pad rows):
    outputs and the gradients of the input, router and shared expert equal bit for bit. The dropped copies added
    exactly +-0 to every sum; what skipping them changes is each expert's GEMM shapes, and MKL's and flyer's FP32
    GEMMs add a row's terms in an order that depends on the row count (below 12 rows; ``kernels.FEW_ROWS``), as any
    other change of batch does. So the shapes here keep that order: one row per expert either way (T 2, decoding),
    or 17 to 150 either way (160). Where the library picks the order from the shapes and the hardware (AVX2 MKL's
    FP32 kernels, AMX's BF16 tiles, which pair the rows), the sums over an expert's rows (its weight gradients) and
    over a token's picks (the input's gradient) may differ in the last bits: bit for bit with one row per expert,
    else within twice the bound of an n-term FP32 sum, (n - 1) u times its terms' absolute sum (``_reordered_sums``),
    plus in BF16 one unit in the last place of the rounded result."""
    moe = _moe(fuse_local).to(dtype)
    ids = _forced_ids(T, 1)
    counts_moved = _moved_picks(torch.zeros(T, 1), torch.zeros(T, K), ids)[3]
    counts_kept = torch.bincount(ids.flatten(), minlength=E + Z)[:E]
    if T == 2:
        assert counts_moved.tolist() == [1] * E and counts_kept.tolist() == [0, 1] * (E // 2)
    else:
        assert kernels.FEW_ROWS < int(counts_kept.min()) and int(counts_moved.max()) < 150
    _force(moe, ids)
    assert moe.path == ("fused_local" if fuse_local else "dispatched")
    x = torch.randn(2, T // 2, 32, generator=torch.Generator().manual_seed(2)).to(dtype).requires_grad_()
    g = torch.randn(2, T // 2, 32, generator=torch.Generator().manual_seed(3)).to(dtype)
    rows = []
    real = experts_mod._swiglu_forward

    def spy(x, *args, **kw):
        rows.append(x.shape[0])
        return real(x, *args, **kw)

    experts_mod._swiglu_forward = spy
    try:
        y = moe(x)
        y_ref = _moved_forward(moe, x)
    finally:
        experts_mod._swiglu_forward = real
    assert torch.equal(y, y_ref)
    n_identity = int((ids >= E).sum())
    assert 0 < n_identity < T * K
    if fuse_local and dtype == torch.float32:  # the FFN's rows: the routed picks only
        assert rows == [T * K - n_identity, T * K]
    got, ref = _grads(moe, x, y, g), _grads(moe, x, y_ref, g)
    assert all(r is not None for r in ref)
    sums = _reordered_sums(moe, x.view(T, -1), g.view(T, -1), ids)
    for name, a, b in zip(["x"] + [n for n, _ in sorted(moe.named_parameters())], got, ref):
        if T == 2 or name not in sums:
            assert torch.equal(a, b), name
            continue
        terms, n = sums[name]
        big = torch.maximum(a.abs(), b.abs()).double()
        # n-term sums in two orders; the input's gradient then adds the same identity, shared-expert and router
        # terms to each (3 roundings, u of the result each); a BF16 result is its FP32 sum rounded once more, up to
        # half a BF16 ulp (2^-8 relative) on each side
        bound = 2 * (n - 1) * FP32_U * terms.view_as(big) + (6 * FP32_U if name == "x" else 0.0) * big
        if dtype == torch.bfloat16:
            bound = bound + 2.0**-7 * big
        assert ((a.double() - b.double()).abs() <= bound).all(), name
    assert moe.gate.weight.grad[E:].abs().sum() > 0  # the identity columns learn through the identity sum
    with torch.no_grad():
        assert torch.equal(moe(x), _moved_forward(moe, x))
        assert torch.equal(moe(x), y)


def test_a_token_of_identity_picks_only_gets_its_input_times_their_weights(cpu_kernels):
    """Token 0 picks only identities: its MoE output is the shared expert plus x times the sum of its weights
    (no routed expert's output); token 1, no identity: the plain routed sum."""
    moe = _moe(True)
    ids = _forced_ids(8, 4)
    _force(moe, ids)
    x = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = moe(x)[0]
        w = moe.gate(x[0])[0]
        shared = moe.shared(x[0])
        assert torch.equal(y[0], (x[0, 0] * w[0].sum() + shared[0]))
        routed = moe.experts.routed_local(x[0, 1:2], w[1:2], ids[1:2], torch.bincount(ids[1], minlength=E))
        assert torch.equal(y[1], (routed[0] + shared[1]))
