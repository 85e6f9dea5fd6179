"""Model core: causality, router invariants, grouped MoE vs a per-token loop, bias balancing,
MTP alignment, RoPE/YaRN, both attention kinds."""

import math

import pytest
import torch
import torch.nn.functional as F
from bounds import assert_fp32_gemm, bf16_experts_bound

from flyer import kernels
from flyer.config import ConfigError, preset
from flyer.model import experts as experts_module
from flyer.model.dispatch import LocalDispatcher
from flyer.model.experts import Experts, expert_ffn_fused, expert_ffn_grouped_mm, expert_ffn_loop
from flyer.model.moe import MoE, sequence_balance_loss, update_router_bias
from flyer.model.norm import rms_norm
from flyer.model.rope import apply_rope, rope_cos_sin, rope_frequencies
from flyer.model.transformer import Transformer


def small_cfg(**kw):
    base = dict(vocab_size=97, dim=64, n_layers=3, n_dense_layers=1, inter_dim=96, n_heads=4, q_lora_rank=32,
                kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, moe_inter_dim=32,
                n_routed_experts=16, n_shared_experts=1, n_activated_experts=4, n_expert_groups=4,
                n_limited_groups=2, max_seq_len=64, original_seq_len=64, mtp_depth=2, init_std=0.05)
    base.update(kw)
    return preset("tiny", **base)


@pytest.mark.parametrize("attn", ["mla", "mla_noq", "gqa"])
def test_causality(attn):
    kw = {"mla": {}, "mla_noq": {"q_lora_rank": 0}, "gqa": {"attn": "gqa", "n_kv_heads": 2, "head_dim": 16}}[attn]
    model = Transformer(small_cfg(**kw)).eval()
    x = torch.randint(0, 97, (2, 12))
    y = x.clone()
    y[:, 7:] = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-5)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_router_invariants_and_bias_selects_only():
    cfg = small_cfg(n_routed_experts=32, n_expert_groups=8, n_limited_groups=3, n_activated_experts=6)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=0.5)
    x = torch.randn(200, cfg.dim)
    w, ids, scores = moe.gate(x)
    assert ids.shape == (200, 6)
    assert all(len(set(r)) == 6 for r in ids.tolist())
    groups = ids // (32 // 8)
    assert max(len(set(r)) for r in groups.tolist()) <= 3
    # weights are the normalised unbiased scores times route_scale
    g = scores.gather(1, ids)
    assert torch.allclose(w, g / g.sum(-1, keepdim=True) * cfg.route_scale)
    # a bias changes which experts are chosen but gate values stay the unbiased scores
    moe.gate.bias.copy_(torch.linspace(-1, 1, 32))
    w2, ids2, scores2 = moe.gate(x)
    assert not torch.equal(ids, ids2)
    assert torch.equal(scores, scores2)
    g2 = scores2.gather(1, ids2)
    assert torch.allclose(w2, g2 / g2.sum(-1, keepdim=True) * cfg.route_scale)


def test_group_limited_matches_bruteforce():
    """Group score = sum of the top-2 biased scores; keep the best groups; top-k among them."""
    cfg = small_cfg(n_routed_experts=16, n_expert_groups=4, n_limited_groups=2, n_activated_experts=3)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=1.0)
    moe.gate.bias.normal_(0, 0.3)
    x = torch.randn(50, cfg.dim)
    _, ids, scores = moe.gate(x)
    for t in range(50):
        biased = (scores[t] + moe.gate.bias).tolist()
        gs = [sum(sorted(biased[g * 4:(g + 1) * 4])[-2:]) for g in range(4)]
        keep = sorted(range(4), key=lambda g: -gs[g])[:2]
        cand = [e for e in range(16) if e // 4 in keep]
        want = sorted(sorted(cand, key=lambda e: -biased[e])[:3])
        assert sorted(ids[t].tolist()) == want


def test_standalone_moe_parameters_are_initialised():
    """A MoE built outside a Transformer is usable: router and expert weights are N(0, init_std),
    not whatever torch.empty left (CI once drew NaNs there)."""
    cfg = small_cfg(init_std=0.05)
    for _ in range(3):  # reuse freed memory: garbage from a previous module must not survive
        moe = MoE(cfg)
        for name, p in [("gate", moe.gate.weight), ("w1", moe.experts.w1), ("w2", moe.experts.w2),
                        ("w3", moe.experts.w3)]:
            assert torch.isfinite(p).all(), name
            assert abs(p.std().item() - 0.05) < 0.01 and abs(p.mean().item()) < 0.01, name
        del moe


@pytest.mark.parametrize("over", [dict(), dict(tie_embeddings=True), dict(mtp_depth=2, n_dense_layers=2),
                                  dict(attn="gqa", n_heads=4, n_kv_heads=2, head_dim=16)])
def test_init_like_single_process_replays_the_one_process_build(over):
    """The init an EP or PP rank runs (``grads.init_like_single_process``: the one-process build's
    draws replayed module by module on a meta copy, no second model) == seeding and building the
    model in one process, bit for bit, from a model holding other values."""
    from flyer.parallel.grads import init_like_single_process

    cfg = preset("tiny", **over)
    torch.manual_seed(7)
    ref = Transformer(cfg)
    torch.manual_seed(8)
    model = Transformer(cfg)
    state = torch.random.get_rng_state()
    init_like_single_process(model, None, 7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's stream is left alone
    for (name, a), b in zip(ref.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_every_buffer_starts_at_zero(name):
    """A pipeline rank materialises its stages from the meta device and zeroes their buffers
    (``build_model``): right only while every buffer of a freshly built model is zero."""
    for over in (dict(), dict(router_bias=False)):
        model = Transformer(preset(name, **over))
        assert all(not b.any() for b in model.buffers())


def test_softmax_router_without_norm():
    cfg = small_cfg(score_func="softmax", norm_topk_prob=False, router_bias=False, route_scale=16.0,
                    n_expert_groups=4, n_limited_groups=2)
    moe = MoE(cfg)
    x = torch.randn(10, cfg.dim)
    w, ids, scores = moe.gate(x)
    assert torch.allclose(scores.sum(-1), torch.ones(10))
    assert torch.allclose(w, scores.gather(1, ids) * 16.0)


def test_grouped_moe_equals_per_token_loop():
    cfg = small_cfg()
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(3, 10, cfg.dim, requires_grad=True)
    y = moe(x)
    # naive: for every token, sum over its chosen experts, each a separate SwiGLU
    xt = x.reshape(-1, cfg.dim)
    w, ids, _ = moe.gate(xt)
    e = moe.experts
    ref = []
    for t in range(xt.shape[0]):
        acc = moe.shared(xt[t])
        for k in range(cfg.n_activated_experts):
            i = ids[t, k]
            h = F.silu(e.w1[i] @ xt[t]) * (e.w3[i] @ xt[t])
            acc = acc + w[t, k] * (e.w2[i] @ h)
        ref.append(acc)
    ref = torch.stack(ref).view_as(y)
    assert torch.allclose(y, ref, atol=1e-5)
    (gy,) = torch.autograd.grad(y.square().sum(), x)
    (gr,) = torch.autograd.grad(ref.square().sum(), x)
    assert torch.allclose(gy, gr, atol=1e-4)
    assert moe.last_counts.sum() == 30 * cfg.n_activated_experts


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_local_moe_equals_composed_dispatch(autocast, cpu_kernels):
    """``_LocalRoutedExperts`` (gather into the padded layout, experts, FP32 weighted sum) gives the
    composed LocalDispatcher -> experts -> combine path's output and every gradient (input, gate,
    experts, shared expert) bitwise, in FP32 and under bf16 autocast (64-row padding), with some
    experts receiving no token. With the fused CPU kernels the gate-weight gradients' dot products
    add in another order: the input and router gradients (which they feed) agree to FP32 rounding,
    everything else stays bitwise."""
    cfg = small_cfg(n_expert_groups=1, n_limited_groups=1)
    torch.manual_seed(0)
    fused = MoE(cfg)
    for p in fused.parameters():
        torch.nn.init.normal_(p, std=0.1)
    fused.gate.bias[:5] = -10.0  # the selection bias: experts 0-4 are never chosen
    composed = MoE(cfg, fuse_local=False)
    composed.load_state_dict(fused.state_dict())
    assert fused.path == "fused_local" and composed.path == "dispatched"
    x = torch.randn(3, 37, cfg.dim)
    g = torch.randn(3, 37, cfg.dim)
    results = []
    for moe in (fused, composed):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = moe(xi)
        params = [xi, moe.gate.weight, moe.experts.w1, moe.experts.w2, moe.experts.w3, moe.shared.w1.weight]
        results.append((y, torch.autograd.grad(y, params, g)))
    assert (fused.last_counts[:5] == 0).all() and fused.last_counts.sum() == 3 * 37 * cfg.n_activated_experts
    (y_f, g_f), (y_c, g_c) = results
    assert y_f.dtype == y_c.dtype == torch.float32 and torch.equal(y_f, y_c)
    for i, (a, b) in enumerate(zip(g_f, g_c)):
        assert a.dtype == b.dtype
        if cpu_kernels and i < 2:  # input, gate weight
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max())), i
        else:
            assert torch.equal(a, b), i


def test_experts_impl_is_resolved_when_built_and_when_moved(monkeypatch):
    """'auto' is grouped_mm for weights on CUDA and fused elsewhere, decided when the experts are
    built and again when they move (not from each forward's input); a named impl stays."""
    assert Experts(2, 8, 4).impl == "fused" and Experts(2, 8, 4, impl="grouped_mm").impl == "grouped_mm"
    assert experts_module.resolve_experts_impl("auto", torch.device("cuda")) == (
        "grouped_mm" if hasattr(torch, "_grouped_mm") else "fused")
    with pytest.raises(ConfigError, match="experts_impl 'bmm' is unknown"):
        Experts(2, 8, 4, impl="bmm")
    ex, named = Experts(2, 8, 4), Experts(2, 8, 4, impl="fused")
    monkeypatch.setattr(experts_module, "resolve_experts_impl", lambda impl, device: f"{impl}@{device.type}")
    assert ex.to("meta").impl == "auto@meta" and named.to("meta").impl == "fused@meta"


def test_auto_experts_keep_an_fp32_model_in_fp32_where_grouped_mm_would_round_to_bf16(monkeypatch):
    """'auto' resolved to grouped_mm (weights on CUDA) runs torch._grouped_mm, BF16, only for BF16 GEMMs (autocast
    or BF16 inputs): an FP32 model's experts run the fused FP32 path, equal to the oracle (on an H200 BF16 experts
    moved a random small model's logits by 0.19 of their scale from the CPU's; FP32 ones by 1.3e-6). A named
    grouped_mm stays BF16. Forced here on the CPU: the impl set as CUDA resolves it, grouped_mm recorded."""
    calls = []
    monkeypatch.setattr(experts_module, "expert_ffn_grouped_mm",
                        lambda x, *a, **k: calls.append(x.dtype) or x.new_zeros(x.shape))
    torch.manual_seed(0)
    auto, named = Experts(4, 16, 8), Experts(4, 16, 8, impl="grouped_mm")
    named.load_state_dict(auto.state_dict())
    auto.impl = "grouped_mm"  # what resolve_experts_impl gives weights on CUDA
    x, counts = torch.randn(10, 16), torch.tensor([3, 0, 5, 2])
    want = expert_ffn_loop(x, counts, auto.w1, auto.w2, auto.w3)
    torch.testing.assert_close(auto(x, counts), want, rtol=1e-5, atol=1e-6)  # FP32: not grouped_mm
    assert calls == []
    auto(x.bfloat16(), counts)  # BF16 GEMMs: grouped_mm
    named(x, counts)  # named: grouped_mm whatever the dtype
    assert calls == [torch.bfloat16, torch.float32]


@pytest.mark.parametrize("packed", [True, False])
def test_auto_experts_serve_an_fp32_model_through_fp32_grouped_mm(monkeypatch, packed):
    """Without gradients (serving) 'auto' experts resolved to grouped_mm (CUDA) run an FP32 model's experts through
    torch._grouped_mm in FP32, not a Python loop of per-expert GEMMs (launch-bound steps), w1|w3 as one GEMM where
    they are packed. Integer inputs make the up-projections exact whatever their order, so the SwiGLU's outputs
    are known; each row of the output is then an FP32 GEMM of them within ``assert_fp32_gemm``'s bound. Forced
    here on the CPU: the impl set as CUDA resolves it."""
    calls = []
    grouped = experts_module.expert_ffn_grouped_mm
    monkeypatch.setattr(experts_module, "expert_ffn_grouped_mm", lambda *a, **k: calls.append(k) or grouped(*a, **k))
    torch.manual_seed(0)
    ex = Experts(4, 16, 8)
    with torch.no_grad():
        for w in (ex.w1, ex.w3):
            w.copy_(torch.randint(-3, 4, w.shape))  # h = x w^T: integers well inside FP32's exact range
    if packed:
        ex.pack_w13_()
    ex.impl = "grouped_mm"
    x, counts = torch.randint(-3, 4, (10, 16)).float(), torch.tensor([3, 0, 5, 2])
    with torch.no_grad():
        y = ex(x, counts)
    assert calls == [{"fp32": True}] and y.dtype == torch.float32
    rows = x.split(counts.tolist())
    a = torch.cat([experts_module.swiglu(r @ w1.T, r @ w3.T) for r, w1, w3 in zip(rows, ex.w1, ex.w3)])

    def check(y):
        # a's elements, vectorised or not by their layout, agree to a few ulps (exp within one ulp, then three
        # rounded operations on either side): eight more roundings per term cover them
        for ys, a_e, w2 in zip(y.split(counts.tolist()), a.split(counts.tolist()), ex.w2):
            assert_fp32_gemm(ys, a_e, w2.detach().T, extra_roundings=8)
    check(y)
    assert ex(x.requires_grad_(), counts).requires_grad and len(calls) == 1  # training: the fused FP32 path
    monkeypatch.setattr(experts_module, "fp32_grouped_mm", lambda device: False)  # a torch without the FP32 fallback
    with torch.no_grad():
        check(ex(x, counts))
    assert len(calls) == 1


def test_moe_path_is_chosen_from_the_dispatcher_and_the_experts():
    cfg = small_cfg()
    E = cfg.n_routed_experts
    assert MoE(cfg).path == "fused_local"
    assert MoE(cfg, fuse_local=False).path == "dispatched"  # the oracle
    assert MoE(cfg, LocalDispatcher(E, fp8=True)).path == "dispatched"  # wire roundings to emulate
    assert MoE(cfg, LocalDispatcher(E, combine_dtype=torch.bfloat16)).path == "dispatched"
    assert MoE(cfg, experts_impl="grouped_mm").path == "dispatched"


def test_fused_local_moe_gradcheck():
    """FP64 gradcheck of the fused path (input and gate weight), 4-row padding."""
    from flyer.model.experts import _LocalRoutedExperts

    torch.manual_seed(0)
    T, D, Fd, E, K = 6, 5, 4, 3, 2
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, K, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(E, Fd, D, dtype=torch.float64, requires_grad=True),
          torch.randn(E, D, Fd, dtype=torch.float64, requires_grad=True),
          torch.randn(E, Fd, D, dtype=torch.float64, requires_grad=True)]
    ids = torch.tensor([[0, 2], [2, 0], [0, 2], [2, 0], [0, 2], [0, 2]])  # expert 1 empty
    counts = torch.bincount(ids.flatten(), minlength=E).tolist()
    f = lambda x_, w_, *ws_: _LocalRoutedExperts.apply(x_, w_, *ws_, ids, counts, 4, torch.float64)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, *ws))


def test_grouped_mm_path_agrees_with_loop():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not available")
    E, Fd, D = 4, 32, 16
    counts = torch.tensor([5, 0, 7, 3])
    x = torch.randn(15, D)
    w1, w3, w2 = torch.randn(E, Fd, D) * 0.2, torch.randn(E, Fd, D) * 0.2, torch.randn(E, D, Fd) * 0.2
    try:
        fast = expert_ffn_grouped_mm(x, counts, w1, w2, w3).float()
    except RuntimeError as err:  # some CPU builds lack the bf16 grouped GEMM
        pytest.skip(f"grouped_mm unsupported here: {err}")
    exact, bound = bf16_experts_bound(x, counts, w1, w2, w3)
    assert ((fast.double() - exact).abs() <= bound).all()


def test_bias_update_drives_skewed_load_to_balance():
    cfg = small_cfg(n_routed_experts=16, n_expert_groups=1, n_limited_groups=1, n_activated_experts=2,
                    bias_update_speed=0.01)
    moe = MoE(cfg).train()
    torch.nn.init.normal_(moe.gate.weight, std=0.1)
    skew = torch.randn(cfg.dim)
    skew /= skew.norm()
    moe.gate.weight.data[:3] += 0.5 * skew  # three experts favoured by a shared input direction
    x = torch.randn(1024, cfg.dim) + 2 * skew
    imbalance = []
    with torch.no_grad():
        for _ in range(120):
            moe(x.unsqueeze(0))
            imbalance.append(update_router_bias(moe)["load_imbalance"])
    assert imbalance[0] > 2.0
    assert max(imbalance[-20:]) < 1.25
    assert moe.tokens_per_expert.sum() == 0  # reset after each update


def test_mtp_depth_k_sees_token_i_plus_k_and_predicts_i_plus_k_plus_1():
    cfg = small_cfg(mtp_depth=2)
    model = Transformer(cfg).eval()
    x = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        h = model.hidden(x)
        hs = model.mtp_hidden(h, x)
    assert [t.shape[1] for t in hs] == [15, 14]
    i = 5
    for k in (1, 2):
        y = x.clone()
        y[0, i + k] = (y[0, i + k] + 1) % 97  # the token module k embeds at position i
        z = x.clone()
        z[0, i + k + 1] = (z[0, i + k + 1] + 1) % 97  # the token it predicts: must not be seen
        with torch.no_grad():
            hy = model.mtp_hidden(model.hidden(y), y)[k - 1]
            hz = model.mtp_hidden(model.hidden(z), z)[k - 1]
        assert not torch.allclose(hy[0, i], hs[k - 1][0, i])
        assert torch.allclose(hz[0, : i + 1], hs[k - 1][0, : i + 1], atol=1e-5)
    # the loss pairs depth k's output at position i with target t_{i+k+1}
    tokens, targets = x[:, :-1], x[:, 1:]
    out = model.compute_loss(tokens, targets)
    with torch.no_grad():
        h = model.hidden(tokens)
        for k, (mod, hk) in enumerate(zip(model.mtp, model.mtp_hidden(h, tokens)), start=1):
            logits = model.head(mod.norm(hk))
            want = F.cross_entropy(logits[0], x[0, k + 1:])
            assert torch.allclose(out.mtp_losses[k - 1], want, atol=1e-5)
    expected = out.main_loss + cfg.mtp_loss_weight * torch.stack(out.mtp_losses).mean()
    assert torch.allclose(out.loss, expected)


def test_sequence_balance_loss_in_training_only():
    cfg = small_cfg(seq_aux_alpha=0.01)
    model = Transformer(cfg).train()
    x = torch.randint(0, 97, (2, 9))
    out = model.compute_loss(x[:, :-1], x[:, 1:])
    assert out.aux_loss is not None and out.aux_loss > 0
    out.loss.backward()
    assert model.layers[1].ffn.gate.weight.grad.abs().sum() > 0
    model.eval()
    assert model.compute_loss(x[:, :-1], x[:, 1:]).aux_loss is None


def test_yarn_frequencies():
    cfg = preset("dsv3")
    plain = rope_frequencies(64, cfg.replace(rope_factor=1.0))
    yarn = rope_frequencies(64, cfg)
    assert torch.allclose(yarn[:4], plain[:4])  # highest frequencies kept
    assert torch.allclose(yarn[-4:], plain[-4:] / 40)  # lowest interpolated by the factor
    assert math.isclose(cfg.softmax_scale, 192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)


def test_bf16_autocast_trains():
    model = Transformer(small_cfg())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 97, (4, 17))
    losses = []
    for _ in range(8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.compute_loss(x[:, :-1], x[:, 1:])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.main_loss.item())
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize("row_multiple", [1, 64])
def test_fused_experts_match_loop(row_multiple):
    """The hand-written grouped SwiGLU (with and without zero-row padding) equals autograd
    through the per-expert loop: outputs and every gradient, empty experts included."""
    E, Fd, D = 5, 24, 16
    counts = torch.tensor([3, 0, 70, 1, 64])
    x = torch.randn(int(counts.sum()), D, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(E, Fd, D, dtype=torch.float64, requires_grad=True),
          torch.randn(E, D, Fd, dtype=torch.float64, requires_grad=True),
          torch.randn(E, Fd, D, dtype=torch.float64, requires_grad=True)]
    dy = torch.randn(x.shape[0], D, dtype=torch.float64)
    a = expert_ffn_loop(x, counts, *ws)
    ga = torch.autograd.grad(a, [x, *ws], dy)
    b = expert_ffn_fused(x, counts, *ws, row_multiple=row_multiple)
    gb = torch.autograd.grad(b, [x, *ws], dy)
    torch.testing.assert_close(b, a)
    for u, v in zip(gb, ga):
        torch.testing.assert_close(u, v)
    small = [t.detach()[:2].clone().requires_grad_() for t in ws]
    assert torch.autograd.gradcheck(lambda x_, *w: expert_ffn_fused(x_, torch.tensor([2, 3]), *w, row_multiple=4),
                                    (x.detach()[:5].clone().requires_grad_(), *small))


def test_fused_experts_cast_fp32_weights_like_autocast():
    """FP32 master weights with bf16 compute: the same output as casting first (bitwise), and the
    gradients come back in FP32, equal to autograd through the casts."""
    torch.manual_seed(0)
    E, Fd, D = 3, 64, 32
    counts = torch.tensor([9, 0, 30])
    x = torch.randn(int(counts.sum()), D, requires_grad=True)
    ws = [(torch.randn(E, Fd, D) / 4).requires_grad_(), (torch.randn(E, D, Fd) / 8).requires_grad_(),
          (torch.randn(E, Fd, D) / 4).requires_grad_()]
    dy = torch.randn(x.shape[0], D, dtype=torch.bfloat16)
    got = expert_ffn_fused(x, counts, *ws, row_multiple=16, dtype=torch.bfloat16)
    g_got = torch.autograd.grad(got, [x, *ws], dy)
    want = expert_ffn_fused(x.bfloat16(), counts, *(w.bfloat16() for w in ws), row_multiple=16)
    g_want = torch.autograd.grad(want, [x, *ws], dy)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    for u, v in zip(g_got, g_want):
        assert u.dtype == torch.float32
        torch.testing.assert_close(u, v, atol=0, rtol=0)


def test_fused_experts_bf16_close_to_loop(cpu_kernels):
    """In bf16 the eager fused path runs the same ops as autograd would: agreement to bf16
    rounding. Either way (the fused CPU kernels round the SwiGLU once, not per op) its normwise
    error against FP64 is no worse than the per-expert loop's."""
    torch.manual_seed(0)
    E, Fd, D = 4, 64, 32
    counts = torch.tensor([40, 7, 0, 81])
    x = torch.randn(int(counts.sum()), D, dtype=torch.bfloat16, requires_grad=True)
    ws = [(torch.randn(E, Fd, D) / 4).bfloat16().requires_grad_(),
          (torch.randn(E, D, Fd) / 8).bfloat16().requires_grad_(),
          (torch.randn(E, Fd, D) / 4).bfloat16().requires_grad_()]
    dy = torch.randn(x.shape[0], D, dtype=torch.bfloat16)
    a = expert_ffn_loop(x, counts, *ws)
    ga = torch.autograd.grad(a, [x, *ws], dy)
    assert kernels.usable(x) == cpu_kernels
    b = expert_ffn_fused(x, counts, *ws, row_multiple=64)
    gb = torch.autograd.grad(b, [x, *ws], dy)
    assert b.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in gb)
    x64, ws64 = x.detach().double().requires_grad_(), [w.detach().double().requires_grad_() for w in ws]
    r = expert_ffn_loop(x64, counts, *ws64)
    gr = torch.autograd.grad(r, [x64, *ws64], dy.double())
    for got, loop, ref in [(b, a, r), *zip(gb, ga, gr)]:
        if not cpu_kernels:
            torch.testing.assert_close(got, loop, atol=5e-2, rtol=2e-2)
        err = lambda t: float((t.detach().double() - ref.detach()).norm() / ref.detach().norm())  # noqa: E731
        assert err(got) <= 1.25 * err(loop) + 1e-4, (err(got), err(loop))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@needs_cuda
def test_cuda_model_matches_cpu():
    """The same model on CUDA, in fp32 with the loop experts (grouped_mm is bf16 and has its own
    test below), gives the CPU oracle's loss and gradients."""
    cfg = preset("tiny")
    torch.manual_seed(0)
    cpu = Transformer(cfg)
    gpu = Transformer(cfg, experts_impl="fused")  # fp32 on both sides, for a tight comparison
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    x = torch.randint(0, cfg.vocab_size, (2, 33))
    a = cpu.compute_loss(x[:, :-1], x[:, 1:]).loss
    b = gpu.compute_loss(x[:, :-1].cuda(), x[:, 1:].cuda()).loss
    a.backward()
    b.backward()
    torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=1e-4)
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.cuda
@needs_cuda
def test_cuda_grouped_mm_experts_forward_and_backward():
    """torch._grouped_mm experts (the CUDA default) against the loop oracle, values and grads."""
    torch.manual_seed(0)
    E, Fd, D = 8, 128, 64
    counts = torch.tensor([37, 0, 5, 64, 1, 90, 16, 3], device="cuda")
    x = torch.randn(int(counts.sum()), D, device="cuda", requires_grad=True)
    ws = [(torch.randn(E, Fd, D, device="cuda") / 8).requires_grad_(),
          (torch.randn(E, D, Fd, device="cuda") / 12).requires_grad_(),
          (torch.randn(E, Fd, D, device="cuda") / 8).requires_grad_()]
    dy = torch.randn(x.shape[0], D, device="cuda")
    fast = expert_ffn_grouped_mm(x, counts, *ws).float()
    g_fast = torch.autograd.grad(fast, [x, *ws], dy)
    ref = expert_ffn_loop(x, counts, *ws)
    g_ref = torch.autograd.grad(ref, [x, *ws], dy)
    rel = lambda u, v: float((u.float() - v).detach().norm() / v.detach().norm())  # noqa: E731  (bf16 vs fp32)
    assert rel(fast, ref) < 1e-2
    assert all(rel(u, v) < 2e-2 for u, v in zip(g_fast, g_ref)), [rel(u, v) for u, v in zip(g_fast, g_ref)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_rms_norm_matches_torch(dtype, tol, cpu_kernels):
    """The hand-written RMSNorm equals torch's rms_norm: values, input and weight gradients."""
    x = (torch.randn(3, 40, 96) * 3).to(dtype).requires_grad_()
    w = (torch.rand(96) + 0.5).requires_grad_()
    g = torch.randn(3, 40, 96).to(dtype)
    want = F.rms_norm(x, (96,), w.to(dtype), 1e-6)
    got = rms_norm(x, w, 1e-6)
    assert got.dtype == dtype
    # BF16: flyer rounds at most twice (the normalised x, its product with the weight: 2 units of 2^-8 from the exact
    # value), torch the output once: 3 units apart, plus second-order terms and FP32's arithmetic (under 2^-12); a 2%
    # error in the weight or the scale exceeds it
    value_tol = dict(atol=tol, rtol=tol) if dtype == torch.float32 else dict(atol=0, rtol=3 * 2**-8 + 2**-12)
    torch.testing.assert_close(got, want, **value_tol)
    for u, v in zip(torch.autograd.grad(got, [x, w], g), torch.autograd.grad(want, [x, w], g)):
        assert u.dtype == v.dtype
        torch.testing.assert_close(u.float(), v.float(), atol=tol * float(v.abs().max()), rtol=tol)
    x64 = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    w64 = torch.rand(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-6), (x64, w64))


def test_experts_packed_in_place_compute_the_same():
    """``pack_w13_`` re-stores w1|w3 as one tensor (decoding): same parameters, same values, and the
    fused path reads the stack without copying it, bit for bit as before."""
    torch.manual_seed(0)
    ex = Experts(8, 32, 24)
    x, w = torch.randn(10, 32), torch.rand(10, 2)
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(10)])
    counts = torch.bincount(ids.flatten(), minlength=8)
    params = [ex.w1, ex.w3]
    w1, w3 = ex.w1.detach().clone(), ex.w3.detach().clone()
    with torch.no_grad():
        before = ex.routed_local(x, w, ids, counts)
    assert experts_module.packed_w13(ex.w1, ex.w3) is None
    ex.pack_w13_()
    w13 = experts_module.packed_w13(ex.w1, ex.w3)
    assert w13 is not None and torch.equal(w13, torch.cat([w1, w3], 1))
    assert ex.w1 is params[0] and ex.w3 is params[1] and torch.equal(ex.w1, w1) and torch.equal(ex.w3, w3)
    with torch.no_grad():
        assert torch.equal(ex.routed_local(x, w, ids, counts), before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("attn_factor", [1.0, 1.3])
def test_rope_rotates_each_interleaved_pair(dtype, attn_factor):
    """``apply_rope`` (x cos + swap(x) sin on the expanded tables) == the pairwise rotation
    (x0 c - x1 s, x0 s + x1 c) bit for bit, forward and backward: the same products and sums."""
    cfg = preset("tiny", rope_attn_factor=attn_factor)
    R, T = 8, 11
    cos2, sin2 = rope_cos_sin(R, T, cfg)
    inv = rope_frequencies(R, cfg)
    ang = torch.outer(torch.arange(T, dtype=torch.float32), inv)
    c, s = ang.cos() * attn_factor, ang.sin() * attn_factor
    x = torch.randn(2, T, 3, R).to(dtype).float().requires_grad_()
    pairs = x.unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c, s = c.unsqueeze(-2), s.unsqueeze(-2)
    want = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), -1).flatten(-2)
    xa = x.detach().clone().requires_grad_()
    got = apply_rope(xa, cos2, sin2)
    assert torch.equal(got, want)
    g = torch.randn_like(want)
    want.backward(g)
    got.backward(g)
    assert torch.equal(xa.grad, x.grad)
    xd = x.detach().to(dtype)
    assert torch.equal(apply_rope(xd, cos2, sin2), want.detach().to(dtype))  # computed in FP32, rounded once


@pytest.mark.cuda
@needs_cuda
def test_cuda_inference_norm_is_within_fp32_rounding_of_the_exact_one():
    """Without gradients a CUDA norm is torch's fused kernel (one launch): each output x w r within (D / 2 + 4) u
    of the exact one's relative value (the sum of D squares D u, halved by the square root, the root and
    reciprocal, then two products)."""
    D = 384
    x, w = torch.randn(64, D), torch.rand(D) + 0.5
    want = kernels.rms_norm(x.double(), w.double(), 1e-6, torch.float64)[0]
    with torch.no_grad():
        got = rms_norm(x.cuda(), w.cuda(), 1e-6).cpu().double()
    assert ((got - want).abs() <= (D / 2 + 4) * 2.0**-24 * want.abs()).all()


def test_group_limit_holds_when_every_biased_score_is_negative():
    """Experts of dropped groups are masked with -inf, not 0: with a negative balancing bias (an overloaded
    router's) every allowed expert's biased score is below 0, and a 0 mask would let dropped groups' experts win."""
    torch.manual_seed(0)
    cfg = small_cfg(n_routed_experts=16, n_expert_groups=4, n_limited_groups=2, n_activated_experts=3)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=1.0)
    moe.gate.bias.fill_(-2.0)  # sigmoid scores < 1: every biased score is negative
    x = torch.randn(64, cfg.dim)
    _, ids, _ = moe.gate(x)
    # DeepSeek's gate: a group's score the sum of its two best biased scores, the best n_limited_groups kept
    biased = torch.sigmoid(x @ moe.gate.weight.t()) + moe.gate.bias
    kept = biased.view(64, 4, 4).topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices
    assert all(set(g) <= set(k) for g, k in zip((ids // 4).tolist(), kept.tolist()))


def test_load_imbalance_is_the_worst_layers_and_zero_without_tokens():
    """``update_router_bias`` reports the largest over layers of max load / mean load, not the first layer's, and a
    layer that counted no token adds no NaN."""
    cfg = small_cfg(n_routed_experts=4, n_expert_groups=1, n_limited_groups=1, n_activated_experts=1)
    a, b = MoE(cfg), MoE(cfg)
    a.tokens_per_expert.copy_(torch.tensor([1.0, 1.0, 1.0, 1.0]))  # balanced: 1.0
    b.tokens_per_expert.copy_(torch.tensor([4.0, 0.0, 0.0, 0.0]))  # all on one expert: 4.0
    assert update_router_bias(torch.nn.ModuleList([a, b]))["load_imbalance"] == 4.0
    assert update_router_bias(torch.nn.ModuleList([MoE(small_cfg())]))["load_imbalance"] == 0.0


def test_sequence_balance_loss_is_the_v3_formula_with_normalised_scores():
    """V3 report eq. 17-20: L = alpha sum_i f_i P_i, f_i = E / (K T) x #(tokens routed to i), P_i = the mean over
    tokens of s_it / sum_j s_jt, each sequence's, averaged over the batch. Sigmoid scores do not sum to 1, so the
    normalisation counts (a softmax router's, pinned elsewhere, already sum to 1)."""
    cfg = small_cfg(seq_aux_alpha=0.01)
    B, T, E, K = 2, 7, 16, 4
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(B, T, E, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(B * T)]).view(B, T, K)
    want = 0.0
    for b in range(B):
        f = E / (K * T) * torch.bincount(ids[b].flatten(), minlength=E).double()
        P = (scores[b] / scores[b].sum(-1, keepdim=True)).mean(0)
        want += 0.01 * float((f * P).sum()) / B
    # in the scores' dtype (FP64 here, the counts too): the normalising sum over E, the mean over T and the sum over E
    # round, u each
    assert abs(float(sequence_balance_loss(scores, ids, cfg)) - want) <= (2 * E + T + 8) * 2.0**-53 * want
