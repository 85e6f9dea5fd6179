"""MoE edges a mutation sweep of ``flyer.model.moe`` / ``flyer.model.experts`` found unpinned: a fresh hash table's
draws, the loads' columns with zero experts, two shared experts, the SwiGLU limit under fixed shapes, the padded
layout, fixed shapes' loads and refusal; and a NaN balance loss for packed rows of padding only. Oracles:
transformers' DeepseekV3MoE, DeepSeek-V3's MoE written out in FP64 (tolerances from the FP32 bound, u = 2^-24)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

from bounds import FP32_U
from flyer.config import preset
from flyer.model.experts import Experts, padded_layout
from flyer.model.moe import MoE, counting_only, fixed_shapes

D, FF = 32, 16


def _cfg(**kw):
    base = dict(vocab_size=97, dim=D, moe_inter_dim=FF, n_routed_experts=16, n_shared_experts=1,
                n_activated_experts=4, n_expert_groups=4, n_limited_groups=2, max_seq_len=64,
                original_seq_len=64, mtp_depth=0, init_std=0.1)
    base.update(kw)
    return preset("tiny", **base)


# ---- M17: a fresh hash-routed gate's table ------------------------------------------------------------------
def test_fresh_hash_table_draws_k_distinct_experts_among_all_e():
    """A fresh hash layer's tid2eid holds, per token id, K distinct experts drawn among all E (not only
    the first K): with V = 97 ids, the chance that a given expert is in no row is (1 - K/E)^V < 1e-12."""
    cfg = _cfg(n_routed_experts=16, n_activated_experts=4, n_expert_groups=1, n_limited_groups=1,
               score_func="sqrtsoftplus", n_hash_layers=1)
    torch.manual_seed(0)
    moe = MoE(cfg, hash_routed=True)
    t = moe.gate.tid2eid
    assert t.shape == (97, 4)
    assert all(len(set(r)) == 4 for r in t.tolist())
    assert int(t.min()) >= 0 and int(t.max()) < 16
    assert set(t.flatten().tolist()) == set(range(16))


# ---- M18: zero-computation columns counted when no token picks one ----------------------------------------
def test_loads_have_every_routing_column_when_no_identity_expert_is_picked():
    """LongCat-Flash's zero experts: ``last_counts`` and ``tokens_per_expert`` have E + Z columns whatever the
    batch picks. A decode step whose token picks routed experts only (ids < E + Z - 1) must run and count 0 on
    the Z identity columns (bincount's length is the largest id + 1 unless given a minlength)."""
    E, Z, K = 8, 4, 4
    cfg = preset("tiny", dim=D, moe_inter_dim=FF, n_routed_experts=E, n_zero_experts=Z, n_activated_experts=K,
                 n_expert_groups=1, n_limited_groups=1, n_shared_experts=1, score_func="softmax",
                 norm_topk_prob=False, route_scale=2.0, seq_aux_alpha=0.0)
    torch.manual_seed(0)
    moe = MoE(cfg)
    ids = torch.tensor([[0, 3, 5, 7]])
    moe.gate._select = lambda scores: ids
    for train in (False, True):
        moe.train(train)
        moe.tokens_per_expert.zero_()
        with torch.no_grad():
            y = moe(torch.randn(1, 1, D))
        assert torch.isfinite(y).all()
        want = torch.bincount(ids.flatten(), minlength=E + Z).float()
        assert torch.equal(moe.last_counts, want)
        if train:
            assert torch.equal(moe.tokens_per_expert, want)


# ---- M25: n_shared_experts > 1 -----------------------------------------------------------------------------
def test_moe_with_two_shared_experts_matches_transformers_deepseek_v3():
    """DeepseekV3MoE's shared experts are one MLP of n_shared_experts * moe_intermediate_size: a checkpoint with
    2 shared experts loads (shapes) and the block's output is transformers' within the FP32 bound of the exact
    (FP64, same routing) value; the routing (ids, gate values) equal transformers' bitwise."""

    E, K, G, TG, S = 16, 4, 4, 2, 2
    hf_cfg = transformers.DeepseekV3Config(hidden_size=D, moe_intermediate_size=FF, n_routed_experts=E,
                                           num_experts_per_tok=K, n_group=G, topk_group=TG, n_shared_experts=S,
                                           routed_scaling_factor=2.5, norm_topk_prob=True)
    blk = DeepseekV3MoE(hf_cfg).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        blk.gate.weight.normal_(0.0, 0.2, generator=g)
        blk.gate.e_score_correction_bias.copy_(torch.rand(E, generator=g) * 0.1)
        blk.experts.gate_up_proj.normal_(0.0, 0.2, generator=g)
        blk.experts.down_proj.normal_(0.0, 0.2, generator=g)
        for lin in (blk.shared_experts.gate_proj, blk.shared_experts.up_proj, blk.shared_experts.down_proj):
            lin.weight.normal_(0.0, 0.2, generator=g)
    cfg = _cfg(n_routed_experts=E, n_activated_experts=K, n_expert_groups=G, n_limited_groups=TG,
               n_shared_experts=S, route_scale=2.5, norm_topk_prob=True, score_func="sigmoid")
    moe = MoE(cfg).eval()
    with torch.no_grad():
        moe.gate.weight.copy_(blk.gate.weight)
        moe.gate.bias.copy_(blk.gate.e_score_correction_bias)
        moe.experts.w1.copy_(blk.experts.gate_up_proj[:, :FF])
        moe.experts.w3.copy_(blk.experts.gate_up_proj[:, FF:])
        moe.experts.w2.copy_(blk.experts.down_proj)
        moe.shared.w1.weight.copy_(blk.shared_experts.gate_proj.weight)  # (S F, D): shapes must match
        moe.shared.w3.weight.copy_(blk.shared_experts.up_proj.weight)
        moe.shared.w2.weight.copy_(blk.shared_experts.down_proj.weight)
        x = torch.randn(2, 12, D, generator=g)
        want = blk(x)
        got = moe(x)
        _, hf_w, hf_ids = blk.gate(x)
        w, ids, _ = moe.gate(x.reshape(-1, D))
    s_hf, s_fl = hf_ids.sort(-1), ids.sort(-1)
    assert torch.equal(s_hf.values, s_fl.values)
    assert torch.equal(hf_w.gather(1, s_hf.indices), w.gather(1, s_fl.indices))
    # exact value for this routing (FP64) and the magnitude of the same computation on absolute values
    xt = x.reshape(-1, D).double()
    w1, w2, w3 = (t.detach().double() for t in (moe.experts.w1, moe.experts.w2, moe.experts.w3))
    sw = [moe.shared.w1.weight.double(), moe.shared.w2.weight.double(), moe.shared.w3.weight.double()]

    def ffn(v, a, b, c, absval=False):
        if absval:
            return (1.1 * (v.abs() @ a.abs().T) * (v.abs() @ c.abs().T)) @ b.abs().T
        return (F.silu(v @ a.T) * (v @ c.T)) @ b.T

    exact, mag = ffn(xt, *sw), ffn(xt, *sw, absval=True)
    wd = w.double()
    for k in range(K):
        e = ids[:, k]
        for t in range(xt.shape[0]):
            i = int(e[t])
            exact[t] += wd[t, k] * ffn(xt[t:t + 1], w1[i], w2[i], w3[i])[0]
            mag[t] += wd[t, k].abs() * ffn(xt[t:t + 1], w1[i], w2[i], w3[i], absval=True)[0]
    rounds = D + S * FF + 8 + K
    bound = rounds * FP32_U * mag
    for name, out in (("flyer", got), ("transformers", want)):
        err = (out.reshape(-1, D).double() - exact).abs()
        assert (err <= bound).all(), f"{name}: error / bound {float((err / bound).max()):.3g}"


# ---- E14: routed_fixed (fixed_shapes, CUDA graphs) keeps the SwiGLU clamp ----------------------------------
def test_routed_fixed_clamps_like_routed_local_and_the_fp64_oracle():
    """``Experts.routed_fixed`` (every expert over every token, weights 0 where not picked: what
    ``fixed_shapes`` serving runs off Hopper, and on the CPU) clamps the SwiGLU inputs with ``swiglu_limit`` as
    every other implementation does (DeepSeek-V4). Oracle: the per-token FP64 sum of the picked experts'
    silu(min(w1 x, L)) * clamp(w3 x, -L, L), within the FP32 bound on the magnitudes (silu Lipschitz 1.1)."""

    E, K, T, L = 8, 2, 24, 0.5
    torch.manual_seed(0)
    ex = Experts(E, D, FF, init_std=0.3, swiglu_limit=L)
    x = torch.randn(T, D)
    ids = torch.rand(T, E).topk(K, dim=-1).indices
    w = torch.rand(T, K)
    with torch.no_grad():
        fixed = ex.routed_fixed(x, w, ids)
        local = ex.routed_local(x, w, ids, torch.bincount(ids.flatten(), minlength=E))
    xd = x.double()
    w1, w2, w3 = (p.detach().double() for p in (ex.w1, ex.w2, ex.w3))
    exact, mag = torch.zeros(T, D, dtype=torch.float64), torch.zeros(T, D, dtype=torch.float64)
    clamped = 0
    for t in range(T):
        for k in range(K):
            e = int(ids[t, k])
            h1, h3 = w1[e] @ xd[t], w3[e] @ xd[t]
            clamped += int((h1 > L).sum() + (h3.abs() > L).sum())
            exact[t] += float(w[t, k]) * (w2[e] @ (F.silu(h1.clamp(max=L)) * h3.clamp(-L, L)))
            mag[t] += float(w[t, k]) * (w2[e].abs() @ (1.1 * (w1[e].abs() @ xd[t].abs()) * (w3[e].abs() @ xd[t].abs())))
    assert clamped > 0.2 * T * K * 2 * FF  # the clamp is active on a good share of the projections
    bound = (D + FF + 8 + K) * FP32_U * mag
    for name, got in (("routed_fixed", fixed), ("routed_local", local)):
        err = (got.double() - exact).abs()
        assert (err <= bound).all(), f"{name}: error / bound {float((err / bound).max()):.3g}"


# ---- E05: the padded layout's contract -------------------------------------------------------------------
def test_padded_layout_pads_each_slice_to_the_next_multiple():
    """Each expert's slice padded up to the next multiple of ``row_multiple`` (0 stays 0), the starts their
    prefix sums: the GEMM shapes the oneDNN path buckets (values are the same for any padding >= the counts)."""

    lay = padded_layout([3, 64, 0, 65, 1], 64)
    assert lay.padded == [64, 64, 0, 128, 64]
    assert lay.starts == [0, 64, 128, 128, 256] and lay.total == 320
    assert lay.positions("cpu").tolist() == [0, 1, 2, *range(64, 128), *range(128, 193), 256]
    assert padded_layout([3, 0, 5], 1).padded == [3, 0, 5]


# ---- defect: packed rows with no document give a NaN balance loss ----------------------------------------
def test_balance_loss_of_packed_rows_without_documents_is_zero_not_nan():
    """A micro-batch of packed rows that are all padding (documents -1) adds 0 to the balance loss (it was 0 / 0), as
    ``valid_BT``'s path gives for rows of padding only; a NaN would reach every gradient (NaN * share 0 stays
    NaN in the trainer's weighted sum)."""
    cfg = preset("tiny", dim=D, moe_inter_dim=FF, n_routed_experts=8, n_activated_experts=2, n_expert_groups=1,
                 n_limited_groups=1, seq_aux_alpha=0.01)
    torch.manual_seed(0)
    moe = MoE(cfg).train()
    x = torch.randn(2, 6, D)
    with counting_only(moe, None, torch.full((2, 6), -1)):
        moe(x)
    assert torch.isfinite(moe.aux_loss) and float(moe.aux_loss.detach()) == 0.0
    with counting_only(moe, torch.zeros(2, 6, dtype=torch.bool)):
        moe(x)
    assert float(moe.aux_loss.detach()) == 0.0


# ---- F06, F07: fixed_shapes' statistics and its refusal of a dispatched MoE ---------------------------------
def test_fixed_shapes_counts_the_loads_and_refuses_a_dispatched_moe():
    """Under ``fixed_shapes`` the loads (``last_counts``, counted by a scatter there) are the gate's picks per
    expert, as eagerly (bincount); and a MoE whose copies go through the dispatcher (``fuse_local=False``, the
    oracle path; an EP dispatcher likewise) is refused: ``routed_fixed`` would skip the dispatch."""

    cfg = _cfg()
    torch.manual_seed(0)
    moe = MoE(cfg).eval()
    x = torch.randn(2, 5, D)
    with torch.inference_mode():
        _, ids, _ = moe.gate(x.reshape(-1, D))
        moe(x)
        eager = moe.last_counts.clone()
        with fixed_shapes():
            moe(x)
    want = torch.bincount(ids.flatten(), minlength=cfg.n_routed_experts).float()
    assert torch.equal(eager, want) and torch.equal(moe.last_counts, want)
    dispatched = MoE(cfg, fuse_local=False).eval()
    assert dispatched.path == "dispatched"
    with torch.inference_mode(), fixed_shapes(), pytest.raises(ValueError, match="every routed expert"):
        dispatched(x)


def test_the_router_computes_in_fp32_under_autocast():
    """The gate's GEMM leaves autocast (DeepSeek keeps the router in FP32): its weights, picks and scores under a BF16
    autocast are those without it, bit for bit."""
    torch.manual_seed(0)
    gate = MoE(_cfg()).eval().gate
    x = torch.randn(24, D)
    with torch.no_grad():
        want = gate(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = gate(x)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
